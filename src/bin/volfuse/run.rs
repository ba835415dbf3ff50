//! `volfuse run`: a model bundle on a volume, tile by tile (or one tile, or the gates).

use super::*;

/// `volfuse run`: with --dump-gates, the gates of one tile first; then the whole volume.
pub(crate) fn run(a: &RunArgs) -> Result<()> {
    if let Some(dir) = &a.dump_gates {
        let ctx = match a.context.as_deref() {
                    None | Some("auto") | Some("none") => anyhow::bail!(
                        "--dump-gates needs --context FILE: the gates are computed on one tile of the raw volume and its context volume"
                    ),
                    Some(c) => PathBuf::from(c),
                };
        dump_gates(
            &a.model,
            &a.input,
            Some(&ctx),
            dir,
            a.batch,
            a.force,
            &a.device,
        )?;
    }
    run_model(a)
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub(crate) enum BlendArg {
    /// every voxel of a tile weighs the same
    Constant,
    /// MONAI's Gaussian window (σ = 0.125 × tile), less weight at tile edges
    Gaussian,
}

#[derive(clap::Args, Clone, Debug)]
pub(crate) struct RunArgs {
    /// Model bundle folder (volfuse.json, unet.safetensors, backbone/).
    #[arg(long)]
    model: PathBuf,
    /// Raw volume (D, H, W): .npy (uint8, uint16 or float32), TIFF stack or OME-Zarr.
    #[arg(long)]
    input: PathBuf,
    /// Context: a volume concentric with the raw one at a coarser resolution (see
    /// --context-scale), `auto` (the raw volume downsampled), or `none`. Default for a
    /// fusion model: `auto` when the raw volume is large enough (at least half a context
    /// tile per axis after downsampling), else none (degraded, with a note).
    #[arg(long)]
    context: Option<String>,
    /// Context voxel size / raw voxel size (default: the bundle's context_scale /
    /// min_resolution_for_raw).
    #[arg(long)]
    context_scale: Option<f64>,
    /// Labels (D, H, W), uint8 (uint16 beyond 256 classes).
    #[arg(long)]
    output: PathBuf,
    /// Probabilities (K, D, H, W) float32.
    #[arg(long)]
    probabilities: Option<PathBuf>,
    /// Logits (K, D, H, W) float32.
    #[arg(long)]
    logits: Option<PathBuf>,
    /// PNG with the middle xy, xz and yz label slices side by side, a colour per class.
    #[arg(long)]
    preview: Option<PathBuf>,
    /// Overlap between neighbouring tiles, a fraction of the tile in [0, 1).
    #[arg(long, default_value_t = 0.25)]
    overlap: f64,
    /// How overlapping tiles are blended.
    #[arg(long, value_enum, default_value_t = BlendArg::Gaussian)]
    blend: BlendArg,
    /// Raw tile extent D H W (default: the model's input_size × base_resolution /
    /// min_resolution_for_raw).
    #[arg(long, num_args = 3, value_names = ["D", "H", "W"])]
    tile_size: Option<Vec<usize>>,
    /// Skip tiles with too little foreground: a voxel is foreground above this value.
    #[arg(long)]
    fg_threshold: Option<f64>,
    /// With --fg-threshold: the fraction of foreground voxels a tile needs to run.
    #[arg(long, default_value_t = 0.01)]
    fg_min_ratio: f64,
    /// OME-Zarr: the multiscale level to read (0 = full resolution).
    #[arg(long)]
    level: Option<usize>,
    /// The whole volume as one tile at the model's grid, whatever its shape (the
    /// pre-tiling behaviour): outputs have the model's input_size; the context must have
    /// the raw volume's shape.
    #[arg(long)]
    single_tile: bool,
    /// Also write the four context-fusion gate maps (gate1.npy … gate4.npy, (Ck, d, h, w))
    /// of the model's single-tile run into this folder (needs --context FILE).
    #[arg(long)]
    dump_gates: Option<PathBuf>,
    /// Slices per ViT batch.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    device: DeviceArgs,
}

pub(crate) fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
}

pub(crate) fn class_names(bundle: &volfuse::models::Bundle) -> Vec<String> {
    bundle
        .training_config
        .get("class_names")
        .and_then(|c| c.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

pub(crate) fn run_model(a: &RunArgs) -> Result<()> {
    use std::io::IsTerminal;
    use volfuse::io::volume::{create_writer, read_volume, OutType, ReadOptions};
    use volfuse::tiling::{self, Blend, Context as Ctx, Foreground, Outputs, TileOptions};

    // Refuse before any work, so a run never leaves some outputs written and others not.
    for p in [
        Some(&a.output),
        a.probabilities.as_ref(),
        a.logits.as_ref(),
        a.preview.as_ref(),
    ]
    .into_iter()
    .flatten()
    {
        check_output(p, a.force)?;
    }
    if a.single_tile {
        return run_single_tile(a);
    }
    let bundle = volfuse::models::Bundle::load(&a.model)
        .with_context(|| format!("loading the model bundle {}", a.model.display()))?;
    let ropts = ReadOptions { level: a.level };
    let raw = read_volume(&a.input, &ropts)?;
    let (tile, _) = match &a.tile_size {
        Some(t) if t.len() == 3 && t.iter().all(|v| *v > 0) => ([t[0], t[1], t[2]], None),
        Some(t) => anyhow::bail!("--tile-size needs three positive numbers D H W, got {t:?}"),
        None => tiling::tile_extent(&bundle),
    };
    let fusion = bundle.unet.fusion;
    let scale = || -> Result<f64> {
        match a.context_scale.or_else(|| tiling::bundle_context_scale(&bundle)) {
            Some(s) if s.is_finite() && s > 0.0 => Ok(s),
            Some(s) => anyhow::bail!("--context-scale must be a positive number, got {s}"),
            None => anyhow::bail!(
                "the context's voxel size is unknown: the bundle has no context_scale / min_resolution_for_raw.\n  fix: pass --context-scale R (context voxel size / raw voxel size, e.g. 2 for 8 nm context over 4 nm raw)"
            ),
        }
    };
    let int_scale = |s: f64| -> Result<usize> {
        let r = s.round();
        if (s - r).abs() > 1e-6 || r < 1.0 {
            anyhow::bail!("--context auto downsamples the raw volume by an integer factor; the context scale is {s}.\n  fix: pass a context volume with --context FILE, or an integer --context-scale");
        }
        Ok(r as usize)
    };
    let mut early_notes = Vec::new();
    let ctx_file;
    let context = match a.context.as_deref() {
        Some("none") => Ctx::None,
        Some("auto") => Ctx::FromRaw {
            scale: int_scale(scale()?)?,
        },
        Some(path) => {
            ctx_file = read_volume(Path::new(path), &ropts)
                .with_context(|| format!("reading the context volume {path}"))?;
            if fusion {
                Ctx::Volume {
                    volume: &ctx_file,
                    scale: scale()?,
                }
            } else {
                Ctx::Volume {
                    volume: &ctx_file,
                    scale: 1.0,
                }
            }
        }
        None if !fusion => Ctx::None,
        None => match a
            .context_scale
            .or_else(|| tiling::bundle_context_scale(&bundle))
        {
            Some(s) if (s - s.round()).abs() < 1e-6 && s >= 1.0 => {
                let r = s.round() as usize;
                let shape = raw.shape();
                let big = (0..3).all(|i| shape[i].div_ceil(r) * 2 >= tile[i]);
                if big {
                    early_notes.push(format!("no --context: the context is the raw volume downsampled {r}× (--context none to run without)"));
                    Ctx::FromRaw { scale: r }
                } else {
                    early_notes.push(format!("no --context, and the raw volume {shape:?} is too small to derive one at {r}× (needs half a {tile:?} context tile per axis)"));
                    Ctx::None
                }
            }
            _ => Ctx::None,
        },
    };
    let k = bundle.unet.config.num_classes;
    let [d, h, w] = raw.shape();
    let mut outputs = Outputs {
        labels: Some(create_writer(
            &a.output,
            &[d, h, w],
            tiling::label_type(k),
            a.force,
        )?),
        ..Default::default()
    };
    if let Some(p) = &a.probabilities {
        outputs.probabilities = Some(create_writer(p, &[k, d, h, w], OutType::F32, a.force)?);
    }
    if let Some(p) = &a.logits {
        outputs.logits = Some(create_writer(p, &[k, d, h, w], OutType::F32, a.force)?);
    }
    let opts = TileOptions {
        overlap: a.overlap,
        blend: match a.blend {
            BlendArg::Constant => Blend::Constant,
            BlendArg::Gaussian => Blend::default(),
        },
        tile: Some(tile),
        foreground: a.fg_threshold.map(|t| Foreground {
            threshold: t,
            min_ratio: a.fg_min_ratio,
        }),
        batch: a.batch.max(1),
    };
    if !(0.0..=1.0).contains(&a.fg_min_ratio) {
        anyhow::bail!(
            "--fg-min-ratio must be a fraction in [0, 1], got {}",
            a.fg_min_ratio
        );
    }
    let backend = a.device.backend()?;
    let adapter = backend.describe();
    let layout = tiling::Layout::new([d, h, w], tile, a.overlap)?;
    eprintln!(
        "run: {:?} {} volume in {} tiles of {tile:?} ({:?}, overlap {}, {:?} blend) on {adapter}",
        raw.shape(),
        raw.dtype(),
        layout.count(),
        layout.grid(),
        a.overlap,
        a.blend
    );
    for n in &early_notes {
        eprintln!("note: {n}");
    }
    let bar = if std::io::stderr().is_terminal() {
        let b = indicatif::ProgressBar::new(layout.count() as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} tiles  {per_sec}  ETA {eta}  {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut runner = Runner::new(backend);
    let summary = tiling::run_tiled(
        &bundle,
        &mut runner,
        &raw,
        context,
        &opts,
        outputs,
        &mut |p| {
            bar.set_position(p.done as u64);
            if p.skipped > 0 {
                bar.set_message(format!("{} skipped", p.skipped));
            }
        },
    )?;
    bar.finish_and_clear();
    if let Some(p) = &a.preview {
        tiling::write_preview(p, &summary.preview, a.force)?;
    }
    for n in &summary.notes {
        eprintln!("note: {n}");
    }
    let names = class_names(&bundle);
    let total: u64 = summary.class_counts.iter().sum();
    let found: Vec<String> = summary
        .class_counts
        .iter()
        .enumerate()
        .filter(|(_, c)| **c > 0)
        .map(|(i, c)| {
            let name = names
                .get(i)
                .cloned()
                .unwrap_or_else(|| format!("class {i}"));
            format!(
                "{i} {name}: {c} ({:.1} %)",
                *c as f64 * 100.0 / total.max(1) as f64
            )
        })
        .collect();
    let mut written = vec![a.output.display().to_string()];
    written.extend(
        [&a.probabilities, &a.logits, &a.preview]
            .into_iter()
            .flatten()
            .map(|p| p.display().to_string()),
    );
    eprintln!("wrote {} ({d}, {h}, {w})", written.join(", "));
    eprintln!("voxels: {total}; classes found: {}", found.join(", "));
    eprintln!("context: {}", summary.context);
    eprintln!(
        "tiles: {} run, {} skipped in {:.2} s ({:.2} tiles/s)",
        summary.tiles_run,
        summary.tiles_skipped,
        summary.seconds,
        (summary.tiles_run + summary.tiles_skipped) as f64 / summary.seconds.max(1e-9)
    );
    eprintln!(
        "peak memory: host {} (blending window + one tile), device {} (graph buffers + weights); input volumes {}",
        mib(summary.host_peak_bytes),
        mib(summary.device_bytes),
        mib(summary.input_bytes)
    );
    eprintln!("adapter: {adapter}");
    Ok(())
}

/// `--single-tile`: the whole volume through the model once, outputs at the model's grid.
pub(crate) fn run_single_tile(a: &RunArgs) -> Result<()> {
    let bundle = volfuse::models::Bundle::load(&a.model)
        .with_context(|| format!("loading the model bundle {}", a.model.display()))?;
    let ropts = volfuse::io::volume::ReadOptions { level: a.level };
    let raw = volfuse::io::volume::read_volume(&a.input, &ropts)?;
    let ctx = match a.context.as_deref() {
        None | Some("none") => None,
        Some("auto") => anyhow::bail!("--context auto needs tiling; drop --single-tile"),
        Some(p) => Some(volfuse::io::volume::read_volume(Path::new(p), &ropts)?),
    };
    let backend = a.device.backend()?;
    eprintln!(
        "run (single tile): {:?} volume{} on {}",
        raw.shape(),
        if ctx.is_some() { " + context" } else { "" },
        backend.describe()
    );
    let mut runner = Runner::new(backend);
    let t0 = std::time::Instant::now();
    let seg = volfuse::models::pipeline::segment(
        &bundle,
        &mut runner,
        &raw,
        ctx.as_ref(),
        a.batch.max(1),
    )?;
    for n in &seg.notes {
        eprintln!("note: {n}");
    }
    let [k, d, h, w] = seg.shape;
    if k <= 256 {
        let labels: Vec<u8> = seg.labels.iter().map(|v| *v as u8).collect();
        npy::write(&a.output, &[d, h, w], &labels, a.force)?;
    } else {
        npy::write(&a.output, &[d, h, w], &seg.labels, a.force)?;
    }
    if let Some(p) = &a.probabilities {
        npy::write(p, &[k, d, h, w], &seg.probabilities, a.force)?;
    }
    if let Some(p) = &a.logits {
        npy::write(p, &[k, d, h, w], &seg.logits, a.force)?;
    }
    if let Some(p) = &a.preview {
        let mut pv = volfuse::tiling::PreviewSlices::new([d, h, w]);
        for z in 0..d {
            pv.add_plane(z, &seg.labels[z * h * w..][..h * w]);
        }
        volfuse::tiling::write_preview(p, &pv, a.force)?;
    }
    let mut counts = vec![0usize; k.max(1)];
    for l in &seg.labels {
        if let Some(c) = counts.get_mut(*l as usize) {
            *c += 1;
        }
    }
    let found: Vec<String> = counts
        .iter()
        .enumerate()
        .filter(|(_, c)| **c > 0)
        .map(|(i, c)| format!("{i}: {c}"))
        .collect();
    eprintln!(
        "wrote {} ({d}, {h}, {w}) in {:.2} s; voxels per class {{{}}}",
        a.output.display(),
        t0.elapsed().as_secs_f64(),
        found.join(", ")
    );
    Ok(())
}

pub(crate) fn dump_gates(
    model: &Path,
    input: &Path,
    context: Option<&Path>,
    dir: &Path,
    batch: usize,
    force: bool,
    device: &DeviceArgs,
) -> Result<()> {
    let files: Vec<PathBuf> = (1..=4).map(|k| dir.join(format!("gate{k}.npy"))).collect();
    for f in &files {
        check_output(f, force)?;
    }
    let bundle = volfuse::models::Bundle::load(model)
        .with_context(|| format!("loading the model bundle {}", model.display()))?;
    if !bundle.unet.fusion {
        anyhow::bail!(
            "--dump-gates: the model {} has no context fusion, so it has no gate maps; drop --dump-gates or use a context-fused model",
            model.display()
        );
    }
    let Some(context) = context else {
        anyhow::bail!(
            "--dump-gates needs --context: the gates are computed from the context volume"
        );
    };
    let raw = volfuse::models::Volume::read(input)?;
    let ctx = volfuse::models::Volume::read(context)?;
    let mut runner = Runner::new(device.backend()?);
    let gates = volfuse::models::gates::gate_maps(&bundle, &mut runner, &raw, &ctx, batch.max(1))?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (g, f) in gates.iter().zip(&files) {
        npy::write(f, &g.shape, &g.data, force)?;
        let mean = g.data.iter().map(|v| *v as f64).sum::<f64>() / g.data.len().max(1) as f64;
        eprintln!("wrote {} {:?} (mean gate {mean:.3})", f.display(), g.shape);
    }
    Ok(())
}
