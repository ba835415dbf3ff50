//! `volfuse demo`: the shipped demo models (demo/with_context, demo/no_context, trained by
//! tools/train_demo.py on [`crate::synth`] volumes) run on a generated volume.
//!
//! Volumes larger than the models' tile go through the sliding window of
//! [`crate::tiling`]; each tile's context is the concentric crop of the volume's context
//! (which spans `ratio`× the raw extent around the same centre, with the same voxel
//! shape), i.e. the training geometry.

use crate::error::{Error, Result};
use crate::io::volume::{check_slab, SlabData, SlabWriter};
use crate::models::planes::VolumeData;
use crate::models::{Bundle, Runner, Volume};
use crate::tiling::{run_tiled, Context, Outputs, TileOptions};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// `volfuse demo`'s default volume: seed, side and distance of its centre from a nucleus
/// centre (fraction of the radius). The side is larger than the models' 32³ tile, so the
/// sliding window runs several tiles, and the nucleus boundary crosses the volume, so it
/// holds every class; tests/demo.rs scores the shipped models on exactly this volume.
pub const DEFAULT_SEED: u64 = 1;
pub const DEFAULT_SIZE: usize = 48;
pub const DEFAULT_NUCLEUS_OFFSET: f64 = 1.0;

/// The demo models' folder in the source tree.
pub fn models_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("demo")
}

/// RGB colour per class (background, nucleus, pore, mitochondrion, others grey).
pub fn class_colour(k: u16) -> [u8; 3] {
    match k {
        0 => [30, 30, 30],
        1 => [70, 110, 230],
        2 => [255, 200, 40],
        3 => [230, 60, 60],
        _ => [160, 160, 160],
    }
}

/// Collects label slabs into one array (the demo volumes are small).
struct CollectLabels {
    shape: Vec<usize>,
    next_z: usize,
    out: Arc<Mutex<Vec<u16>>>,
}

impl SlabWriter for CollectLabels {
    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn write_slab(&mut self, z0: usize, slab: SlabData<'_>) -> Result<()> {
        self.next_z += check_slab(&self.shape, self.next_z, z0, slab.len())?;
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        match slab {
            SlabData::U8(v) => out.extend(v.iter().map(|x| *x as u16)),
            SlabData::U16(v) => out.extend_from_slice(v),
            SlabData::F32(v) => out.extend(v.iter().map(|x| *x as u16)),
        }
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<()> {
        Ok(())
    }
}

/// Segments a (D, H, W) uint8 volume with its concentric context (same voxel shape, `ratio`×
/// the extent) by the sliding window of [`crate::tiling::run_tiled`]: tiles of the model's
/// input size (the demo models see raw voxels 1:1), 25 % overlap, Gaussian blending, each
/// tile's context the concentric crop of the context volume — the training geometry.
pub fn segment_tiles(
    b: &Bundle,
    runner: &mut Runner,
    raw: &[u8],
    context: &[u8],
    shape: [usize; 3],
    ratio: usize,
    batch: usize,
) -> Result<Vec<u16>> {
    let n: usize = shape.iter().product();
    if raw.len() != n || context.len() != n {
        return Err(Error::Invalid(format!(
            "raw ({}) and context ({}) must both hold {n} voxels for shape {shape:?}",
            raw.len(),
            context.len()
        )));
    }
    let raw = Volume::new(shape, VolumeData::U8(raw.to_vec()))?;
    let context = Volume::new(shape, VolumeData::U8(context.to_vec()))?;
    let labels = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let outputs = Outputs {
        labels: Some(Box::new(CollectLabels {
            shape: shape.to_vec(),
            next_z: 0,
            out: labels.clone(),
        })),
        probabilities: None,
        logits: None,
    };
    let opts = TileOptions {
        tile: Some(b.unet.config.input_size),
        batch,
        ..TileOptions::default()
    };
    run_tiled(
        b,
        runner,
        &raw,
        Context::Volume {
            volume: &context,
            scale: ratio as f64,
        },
        &opts,
        outputs,
        &mut |_| {},
    )?;
    let labels = std::mem::take(&mut *labels.lock().unwrap_or_else(|e| e.into_inner()));
    if labels.len() != n {
        return Err(Error::Invalid(format!(
            "the tiled run wrote {} of {n} labels",
            labels.len()
        )));
    }
    Ok(labels)
}

/// A PNG of the middle z slice: raw | truth | each labelling, side by side, `scale`× enlarged.
pub fn preview_png(
    raw: &[u8],
    truth: &[u8],
    labels: &[&[u16]],
    shape: [usize; 3],
    scale: usize,
) -> Result<Vec<u8>> {
    let [d, h, w] = shape;
    let z = d / 2;
    let panels = 2 + labels.len();
    let gap = 4;
    let (pw, ph) = (w * scale, h * scale);
    let width = panels * pw + (panels - 1) * gap;
    let mut img = image::RgbImage::from_pixel(width as u32, ph as u32, image::Rgb([255, 255, 255]));
    for y in 0..ph {
        for x in 0..pw {
            let i = (z * h + y / scale) * w + x / scale;
            let mut put = |panel: usize, c: [u8; 3]| {
                img.put_pixel((panel * (pw + gap) + x) as u32, y as u32, image::Rgb(c));
            };
            put(0, [raw[i]; 3]);
            put(1, class_colour(truth[i] as u16));
            for (p, l) in labels.iter().enumerate() {
                put(2 + p, class_colour(l[i]));
            }
        }
    }
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .map_err(|e| Error::Invalid(format!("could not encode the preview PNG: {e}")))?;
    Ok(out)
}
