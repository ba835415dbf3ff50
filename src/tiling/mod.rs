//! Sliding-window inference over volumes of any size, with memory bounded by the tile.
//!
//! [`run_tiled`] segments a (D, H, W) raw volume with a model bundle tile by tile and writes
//! labels, probabilities and logits on the **raw volume's voxel grid** through
//! [`SlabWriter`]s, z-slab by z-slab as they finish.
//!
//! # Geometry (shared/reference/dinov3_playground.md §e)
//!
//! - **Tile.** A tile of raw is `input_size · base_resolution / min_resolution_for_raw`
//!   voxels per axis (e.g. 128³ · 16 nm / 4 nm = 512³): the extent the model was trained on.
//!   Its features are extracted at `input_size`, the UNet's logits come out at `input_size`
//!   and are resized trilinearly (`align_corners=False`) back to the tile's raw extent before
//!   blending, so the outputs have the raw volume's shape. A bundle without those two
//!   resolutions gets tiles of `input_size` raw voxels (a note says so);
//!   [`TileOptions::tile`] overrides the extent.
//! - **Windows.** Tiles overlap by [`TileOptions::overlap`] (default 25 %): stride
//!   `⌊T·(1−overlap)⌋`, the last tile flush with the volume's end. Overlaps are blended with a
//!   constant or Gaussian window ([`Blend`], MONAI semantics: σ = 0.125·T, normalised to a
//!   maximum of 1, zeros raised to the smallest positive weight), normalised by the summed
//!   weights, so the weights of every voxel sum to one.
//! - **Small volumes.** Along an axis shorter than a tile the volume is centred in one tile
//!   and mirror-padded (numpy `reflect`); the outputs are cropped back to the volume. The
//!   summary's notes say so. (Refusing would make small crops unusable; resizing would
//!   silently change the scale the model sees.)
//! - **Context.** A context tile is the region concentric with the raw tile, `R` times its
//!   extent (`R` = context voxel size / raw voxel size), at the context's resolution: the
//!   same voxel shape as the raw tile. With [`Context::Volume`] the context volume is taken
//!   to be **concentric with the raw volume** (its centre is the raw volume's centre; this
//!   covers a multiscale pyramid level of the same region, and a larger context region
//!   around a raw crop); it must cover at least the raw volume (`shape ≥ ⌊raw/R⌋`), else it
//!   is refused as a ratio/extent mismatch. Context voxels outside the context volume are
//!   mirror-padded, as the raw ones. With [`Context::FromRaw`] the context volume is the raw
//!   volume mean-downsampled by `R` (integer `R`), computed once.
//! - **Foreground skipping.** With [`TileOptions::foreground`], a tile whose fraction of raw
//!   voxels above the threshold is below the minimum ratio is not run; voxels that no run
//!   tile covers are background: logits `[0, −100, −100, …]` (labels models; probabilities
//!   one-hot class 0) or `−100` everywhere (sigmoid heads; probabilities 0), label 0.
//!
//! # Memory
//!
//! Tiles run in z-major order. Blended logits live only for the z-range the current row of
//! tiles covers (`(K+1)·T_z·H·W` f32); planes below the next row's start are final and are
//! emitted (softmax or sigmoid, argmax) to the writers at once. Host memory is therefore
//! bounded by the tile depth times the cross-section, independent of the volume's depth
//! (the input volume itself is read whole by `io::volume::read_volume`, and is reported
//! separately). [`Summary::host_peak_bytes`] adds the accumulator, one tile's crops,
//! features and logits; [`Summary::device_bytes`] the prepared graphs' buffers and weights.

mod preview;
mod window;

pub use preview::{palette, render_preview, write_preview, PreviewSlices};
pub use window::{crop_reflect, reflect, window_1d, Blend, Blender, Layout, Plane, Window};

use crate::error::{Error, Result};
use crate::io::volume::{OutType, SlabData, SlabWriter};
use crate::models::planes::VolumeData;
use crate::models::{pipeline, Bundle, Head, Runner, Volume};
use std::time::Instant;

/// Logit of the classes other than background where no tile ran (see the module docs).
pub const BACKGROUND_LOGIT: f32 = -100.0;

/// Skip tiles with too little foreground.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Foreground {
    /// A raw voxel is foreground when its value is above this.
    pub threshold: f64,
    /// A tile runs when at least this fraction of its voxels are foreground.
    pub min_ratio: f64,
}

/// Tiling settings; `TileOptions::default()` is what `volfuse run` uses.
#[derive(Clone, Debug, PartialEq)]
pub struct TileOptions {
    /// Overlap between neighbouring tiles, a fraction of the tile in [0, 1) (default 0.25).
    pub overlap: f64,
    /// Blending window (default Gaussian, σ = 0.125·T).
    pub blend: Blend,
    /// Raw tile extent; `None` = from the bundle ([`tile_extent`]).
    pub tile: Option<[usize; 3]>,
    /// Foreground skipping; `None` runs every tile.
    pub foreground: Option<Foreground>,
    /// Slices per ViT batch.
    pub batch: usize,
}

impl Default for TileOptions {
    fn default() -> Self {
        TileOptions {
            overlap: 0.25,
            blend: Blend::default(),
            tile: None,
            foreground: None,
            batch: 16,
        }
    }
}

/// Where each tile's context comes from.
#[derive(Clone, Copy, Debug)]
pub enum Context<'a> {
    /// No context: a fusion model runs without fusion (degraded; noted).
    None,
    /// A separate context volume, concentric with the raw volume, voxel size `scale` × the
    /// raw voxel size.
    Volume { volume: &'a Volume, scale: f64 },
    /// The raw volume mean-downsampled by `scale` (an integer ≥ 1).
    FromRaw { scale: usize },
}

/// The output writers; shapes `(D, H, W)` for labels and `(K, D, H, W)` for the others,
/// (D, H, W) = the raw volume's shape. Labels are uint8 for K ≤ 256, else uint16
/// ([`label_type`]). Writers are finished by [`run_tiled`] on success.
#[derive(Default)]
pub struct Outputs {
    pub labels: Option<Box<dyn SlabWriter>>,
    pub probabilities: Option<Box<dyn SlabWriter>>,
    pub logits: Option<Box<dyn SlabWriter>>,
}

/// Progress after each tile.
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    pub done: usize,
    pub total: usize,
    pub skipped: usize,
}

/// What a tiled run did.
#[derive(Clone, Debug)]
pub struct Summary {
    /// Raw volume (D, H, W) = output grid.
    pub shape: [usize; 3],
    /// Raw tile extent and the model's grid per tile.
    pub tile: [usize; 3],
    pub model_grid: [usize; 3],
    /// Tiles per axis.
    pub grid: [usize; 3],
    pub tiles_run: usize,
    pub tiles_skipped: usize,
    /// Voxels per label (index = class).
    pub class_counts: Vec<u64>,
    pub seconds: f64,
    /// Host bytes of the accumulator plus one tile's buffers (crops, features, logits):
    /// independent of the volume's depth. Not included: the input volumes
    /// ([`Summary::input_bytes`]) and the preview slices (`2·D·(H+W)` bytes).
    pub host_peak_bytes: u64,
    /// Host bytes of the input volumes (raw, context or derived context).
    pub input_bytes: u64,
    /// Device (or CPU-executor) bytes of the prepared graphs' buffers and weights.
    pub device_bytes: u64,
    /// What the context was.
    pub context: String,
    /// Things the user should know (padding, degraded mode, defaults taken).
    pub notes: Vec<String>,
    /// The middle xy, xz and yz label slices.
    pub preview: PreviewSlices,
}

/// Label element type for `k` classes: uint8 up to 256 classes, else uint16.
pub fn label_type(k: usize) -> OutType {
    if k <= 256 {
        OutType::U8
    } else {
        OutType::U16
    }
}

fn config_f64(b: &Bundle, key: &str) -> Option<f64> {
    b.model_config
        .get(key)
        .and_then(|v| v.as_f64())
        .or_else(|| b.training_config.get(key).and_then(|v| v.as_f64()))
        .filter(|v| v.is_finite() && *v > 0.0)
}

/// The raw tile extent of a bundle: `input_size · base_resolution / min_resolution_for_raw`
/// (rounded), and a note when the bundle lacks the resolutions (then `input_size`).
pub fn tile_extent(b: &Bundle) -> ([usize; 3], Option<String>) {
    let input = b.unet.config.input_size;
    match (
        config_f64(b, "base_resolution"),
        config_f64(b, "min_resolution_for_raw"),
    ) {
        (Some(base), Some(raw)) => (
            input.map(|n| ((n as f64 * base / raw).round() as usize).max(1)),
            None,
        ),
        _ => (
            input,
            Some(format!(
                "the bundle has no base_resolution / min_resolution_for_raw: tiles are the model's input size {input:?} raw voxels (set --tile-size if the raw data is finer than the model's output)"
            )),
        ),
    }
}

/// The bundle's context voxel size over its raw voxel size (`context_scale /
/// min_resolution_for_raw`), when it has both.
pub fn bundle_context_scale(b: &Bundle) -> Option<f64> {
    Some(config_f64(b, "context_scale")? / config_f64(b, "min_resolution_for_raw")?)
}

/// Mean-downsamples a volume by `r` per axis (partial blocks at the end average the voxels
/// they have); integer volumes are rounded to nearest.
pub fn downsample(v: &Volume, r: usize) -> Result<Volume> {
    if r == 0 {
        return Err(Error::Invalid("the context scale must be ≥ 1".into()));
    }
    let [d, h, w] = v.shape();
    let out = [d.div_ceil(r), h.div_ceil(r), w.div_ceil(r)];
    fn pool<T: Copy>(
        x: &[T],
        [d, h, w]: [usize; 3],
        r: usize,
        o: [usize; 3],
        f: impl Fn(T) -> f64,
    ) -> Vec<f64> {
        let mut sum = vec![0.0f64; o[0] * o[1] * o[2]];
        let mut cnt = vec![0u32; sum.len()];
        for z in 0..d {
            for y in 0..h {
                let row = &x[(z * h + y) * w..][..w];
                let base = ((z / r) * o[1] + y / r) * o[2];
                for (xx, v) in row.iter().enumerate() {
                    sum[base + xx / r] += f(*v);
                    cnt[base + xx / r] += 1;
                }
            }
        }
        sum.iter().zip(&cnt).map(|(s, c)| s / *c as f64).collect()
    }
    let data = match v.data() {
        VolumeData::U8(x) => VolumeData::U8(
            pool(x, [d, h, w], r, out, |v| v as f64)
                .iter()
                .map(|m| m.round() as u8)
                .collect(),
        ),
        VolumeData::U16(x) => VolumeData::U16(
            pool(x, [d, h, w], r, out, |v| v as f64)
                .iter()
                .map(|m| m.round() as u16)
                .collect(),
        ),
        VolumeData::F32(x) => VolumeData::F32(
            pool(x, [d, h, w], r, out, |v| v as f64)
                .iter()
                .map(|m| *m as f32)
                .collect(),
        ),
    };
    Volume::new(out, data)
}

fn crop_volume(v: &Volume, start: [isize; 3], size: [usize; 3]) -> Result<Volume> {
    let s = v.shape();
    let data = match v.data() {
        VolumeData::U8(x) => VolumeData::U8(crop_reflect(x, s, start, size)),
        VolumeData::U16(x) => VolumeData::U16(crop_reflect(x, s, start, size)),
        VolumeData::F32(x) => VolumeData::F32(crop_reflect(x, s, start, size)),
    };
    Volume::new(size, data)
}

fn volume_bytes(v: &Volume) -> u64 {
    let e = match v.data() {
        VolumeData::U8(_) => 1,
        VolumeData::U16(_) => 2,
        VolumeData::F32(_) => 4,
    };
    v.data().len() as u64 * e
}

/// Fraction of the voxels above `threshold`.
fn foreground_ratio(v: &Volume, threshold: f64) -> f64 {
    let n = v.data().len().max(1) as f64;
    let c = match v.data() {
        VolumeData::U8(x) => x.iter().filter(|a| **a as f64 > threshold).count(),
        VolumeData::U16(x) => x.iter().filter(|a| **a as f64 > threshold).count(),
        VolumeData::F32(x) => x.iter().filter(|a| **a as f64 > threshold).count(),
    };
    c as f64 / n
}

/// Start (context voxels) of the context tile concentric with the raw tile at `raw_start`:
/// the raw tile's centre, mapped into the context volume (concentric with the raw volume,
/// voxel size `scale`), minus half a tile, rounded to the nearest voxel.
pub fn context_start(
    raw_shape: [usize; 3],
    ctx_shape: [usize; 3],
    scale: f64,
    raw_start: [isize; 3],
    tile: [usize; 3],
) -> [isize; 3] {
    std::array::from_fn(|a| {
        let centre_raw = raw_start[a] as f64 + tile[a] as f64 / 2.0;
        let centre_ctx =
            (centre_raw - raw_shape[a] as f64 / 2.0) / scale + ctx_shape[a] as f64 / 2.0;
        (centre_ctx - tile[a] as f64 / 2.0 + 0.5).floor() as isize
    })
}

/// Checks that a context volume of `ctx_shape` at `scale` covers a raw volume of
/// `raw_shape` (concentric): every axis at least `⌊raw/scale⌋` voxels.
pub fn check_context(raw_shape: [usize; 3], ctx_shape: [usize; 3], scale: f64) -> Result<()> {
    if !(scale.is_finite() && scale > 0.0) {
        return Err(Error::Invalid(format!(
            "the context scale must be a positive number (context voxel size / raw voxel size), got {scale}"
        )));
    }
    for a in 0..3 {
        let need = (raw_shape[a] as f64 / scale).floor() as usize;
        if ctx_shape[a] < need {
            let axis = ["z", "y", "x"][a];
            return Err(Error::Invalid(format!(
                "raw/context extent or ratio mismatch: the context volume {ctx_shape:?} covers {:.0} raw voxels along {axis} at --context-scale {scale}, less than the raw volume's {} (it must be concentric with the raw volume and cover it: at least {need} context voxels).\n  fix: check --context-scale (context voxel size / raw voxel size), or pass a context volume that covers the raw region",
                ctx_shape[a] as f64 * scale,
                raw_shape[a]
            )));
        }
    }
    Ok(())
}

/// One tile handed to a predictor: its start (raw voxels, may be negative when padded) and
/// the raw crop (and context crop), both the tile's extent.
pub struct TileJob<'a> {
    pub start: [isize; 3],
    pub raw: &'a Volume,
    pub context: Option<&'a Volume>,
}

/// Host memory one tile needs beside the accumulator (an estimate the summary adds).
fn tile_host_bytes(b: &Bundle, tile: [usize; 3], elem: u64, with_ctx: bool) -> u64 {
    let t: u64 = tile.iter().map(|v| *v as u64).product();
    let [d, h, w] = b.unet.config.input_size;
    let grid = (d * h * w) as u64;
    let cd = b.unet.config.input_channels as u64;
    let k = b.unet.config.num_classes as u64;
    let n = if with_ctx { 2 } else { 1 };
    n * t * elem + n * cd * grid * 4 + 3 * k * grid * 4
}

/// The tiled loop with any predictor: `predict` returns a tile's logits (K, d, h, w) on
/// `model_grid` (`None` = skipped, background). Used by [`run_tiled`] and by tests with a
/// synthetic model. `context` is `(volume, scale)` when tiles get context crops.
#[allow(clippy::too_many_arguments)]
pub fn tile_loop(
    raw: &Volume,
    context: Option<(&Volume, f64)>,
    k: usize,
    head: Head,
    model_grid: [usize; 3],
    tile: [usize; 3],
    opts: &TileOptions,
    outputs: Outputs,
    predict: &mut dyn FnMut(TileJob<'_>) -> Result<Option<Vec<f32>>>,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Summary> {
    let t0 = Instant::now();
    let shape = raw.shape();
    let [d, h, w] = shape;
    if k == 0 {
        return Err(Error::Invalid("the model has no output channels".into()));
    }
    let layout = Layout::new(shape, tile, opts.overlap)?;
    for (name, wr, want) in [
        ("labels", &outputs.labels, vec![d, h, w]),
        ("probabilities", &outputs.probabilities, vec![k, d, h, w]),
        ("logits", &outputs.logits, vec![k, d, h, w]),
    ] {
        if let Some(wr) = wr {
            if wr.shape() != want.as_slice() {
                return Err(Error::Invalid(format!(
                    "the {name} writer has shape {:?}, the run produces {want:?}",
                    wr.shape()
                )));
            }
        }
    }
    let mut notes = Vec::new();
    if layout.padded.iter().any(|p| *p) {
        notes.push(format!(
            "the volume {shape:?} is smaller than one tile {tile:?}: it was centred in the tile and mirror-padded; outputs are cropped back to {shape:?}"
        ));
    }
    let mut blender = Blender::new(shape, k, tile, opts.blend)?;
    let mut outputs = outputs;
    let mut counts = vec![0u64; k.max(2)];
    let mut preview = PreviewSlices::new(shape);
    let labels_u8 = label_type(k) == OutType::U8;
    let hw = h * w;
    let mut probs = vec![0.0f32; k * hw];
    let mut lab16 = vec![0u16; hw];
    let mut lab8 = vec![0u8; hw];
    let mut logit_plane = vec![0.0f32; k * hw];
    let mut sink = |p: Plane<'_>| -> Result<()> {
        // Background where no tile ran.
        logit_plane.copy_from_slice(p.logits);
        for i in 0..hw {
            if !p.covered[i] {
                for c in 0..k {
                    logit_plane[c * hw + i] = match (head, c) {
                        (Head::Labels, 0) => 0.0,
                        _ => BACKGROUND_LOGIT,
                    };
                }
            }
        }
        match head {
            Head::Labels => {
                crate::ops::softmax::channel_softmax(&logit_plane, 1, k, hw, &mut probs)
            }
            Head::Sigmoid => {
                for (o, x) in probs.iter_mut().zip(&logit_plane) {
                    *o = 1.0 / (1.0 + (-x).exp());
                }
            }
        }
        for i in 0..hw {
            let mut best = 0;
            for c in 1..k {
                if logit_plane[c * hw + i] > logit_plane[best * hw + i] {
                    best = c;
                }
            }
            lab16[i] = best as u16;
            counts[best] += 1;
        }
        preview.add_plane(p.z, &lab16);
        if let Some(wr) = outputs.labels.as_mut() {
            if labels_u8 {
                for (o, l) in lab8.iter_mut().zip(&lab16) {
                    *o = *l as u8;
                }
                wr.write_slab(p.z, SlabData::U8(&lab8))?;
            } else {
                wr.write_slab(p.z, SlabData::U16(&lab16))?;
            }
        }
        if let Some(wr) = outputs.probabilities.as_mut() {
            wr.write_slab(p.z, SlabData::F32(&probs))?;
        }
        if let Some(wr) = outputs.logits.as_mut() {
            wr.write_slab(p.z, SlabData::F32(&logit_plane))?;
        }
        Ok(())
    };
    let total = layout.count();
    let (mut run, mut skipped) = (0usize, 0usize);
    let zs = layout.starts[0].clone();
    let mut tiles = layout.tiles().peekable();
    for (iz, &z0) in zs.iter().enumerate() {
        while let Some(start) = tiles.next_if(|s| s[0] == z0) {
            let raw_tile = crop_volume(raw, start, tile)?;
            let ctx_tile = match context {
                Some((cv, scale)) => {
                    let cs = context_start(shape, cv.shape(), scale, start, tile);
                    Some(crop_volume(cv, cs, tile)?)
                }
                None => None,
            };
            let keep = match opts.foreground {
                Some(f) => foreground_ratio(&raw_tile, f.threshold) >= f.min_ratio,
                None => true,
            };
            let logits = if keep {
                predict(TileJob {
                    start,
                    raw: &raw_tile,
                    context: ctx_tile.as_ref(),
                })?
            } else {
                None
            };
            match logits {
                Some(l) => {
                    blender.add_tile(start, &l, model_grid)?;
                    run += 1;
                }
                None => skipped += 1,
            }
            progress(&Progress {
                done: run + skipped,
                total,
                skipped,
            });
        }
        let z_end = zs.get(iz + 1).map_or(d, |n| (*n).max(0) as usize);
        blender.emit_until(z_end, &mut sink)?;
    }
    blender.emit_until(d, &mut sink)?;
    drop(sink);
    for wr in [outputs.labels, outputs.probabilities, outputs.logits]
        .into_iter()
        .flatten()
    {
        wr.finish()?;
    }
    counts.truncate(k);
    Ok(Summary {
        shape,
        tile,
        model_grid,
        grid: layout.grid(),
        tiles_run: run,
        tiles_skipped: skipped,
        class_counts: counts,
        seconds: t0.elapsed().as_secs_f64(),
        host_peak_bytes: blender.bytes() + ((probs.len() + logit_plane.len()) * 4 + hw * 3) as u64,
        input_bytes: volume_bytes(raw) + context.map_or(0, |(c, _)| volume_bytes(c)),
        device_bytes: 0,
        context: String::new(),
        notes,
        preview,
    })
}

/// Segments `raw` with `bundle` tile by tile (see the module docs) and writes the outputs.
///
/// `context` chooses each tile's context; a model without fusion ignores it (noted), a
/// fusion model with [`Context::None`] runs without fusion (noted as degraded). `progress`
/// is called after every tile. On success every writer in `outputs` is finished; on error
/// they are dropped (writers leave nothing at their paths).
pub fn run_tiled(
    bundle: &Bundle,
    runner: &mut Runner,
    raw: &Volume,
    context: Context<'_>,
    opts: &TileOptions,
    outputs: Outputs,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Summary> {
    let cfg = &bundle.unet.config;
    let k = cfg.num_classes;
    let head = cfg.head()?;
    let (tile, tile_note) = match opts.tile {
        Some(t) => (t, None),
        None => tile_extent(bundle),
    };
    let mut notes: Vec<String> = tile_note.into_iter().collect();
    let derived;
    let ctx: Option<(&Volume, f64)> = match (bundle.unet.fusion, context) {
        (false, Context::None) => None,
        (false, _) => {
            notes.push("this model has no context fusion: the context is ignored".into());
            None
        }
        (true, Context::None) => {
            notes.push("this model fuses context but none was given: running without fusion (degraded; results differ from training). Pass --context FILE or --context auto".into());
            None
        }
        (true, Context::Volume { volume, scale }) => {
            check_context(raw.shape(), volume.shape(), scale)?;
            Some((volume, scale))
        }
        (true, Context::FromRaw { scale }) => {
            derived = downsample(raw, scale)?;
            let small = derived.shape().iter().zip(&tile).any(|(c, t)| c < t);
            if small {
                notes.push(format!(
                    "the context derived from the raw volume ({:?} at 1/{scale}) is smaller than a context tile {tile:?}: context tiles are mostly mirror padding",
                    derived.shape()
                ));
            }
            Some((&derived, scale as f64))
        }
    };
    let context_desc = match (ctx, context) {
        (None, _) => "none".to_string(),
        (Some((v, s)), Context::FromRaw { .. }) => {
            format!(
                "derived from the raw volume: {:?} at {s}× the raw voxel size",
                v.shape()
            )
        }
        (Some((v, s)), _) => format!("{:?} at {s}× the raw voxel size", v.shape()),
    };
    let batch = opts.batch.max(1);
    let model_grid = cfg.input_size;
    let mut predict = |job: TileJob<'_>| -> Result<Option<Vec<f32>>> {
        let seg = pipeline::segment(bundle, runner, job.raw, job.context, batch)?;
        for n in seg.notes {
            if !notes.contains(&n) && !n.contains("no --context") {
                notes.push(n);
            }
        }
        Ok(Some(seg.logits))
    };
    let mut s = tile_loop(
        raw,
        ctx,
        k,
        head,
        model_grid,
        tile,
        opts,
        outputs,
        &mut predict,
        progress,
    )?;
    let elem = volume_bytes(raw) / raw.data().len().max(1) as u64;
    s.host_peak_bytes += tile_host_bytes(bundle, tile, elem, ctx.is_some());
    if let (Context::FromRaw { .. }, Some((v, _))) = (context, ctx) {
        s.input_bytes += volume_bytes(v);
    }
    let (act, weights) = runner.memory();
    s.device_bytes = act + weights;
    s.context = context_desc;
    notes.append(&mut s.notes);
    s.notes = notes;
    Ok(s)
}

#[cfg(test)]
mod tests;
