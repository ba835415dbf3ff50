//! The `volfuse` command line.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use volfuse::gpu::{list_adapters, Api, GpuContext, GpuOptions};
use volfuse::io::{npy, DType};
use volfuse::models::{Backend as ModelBackend, Runner, Vit};

#[derive(Parser)]
#[command(
    name = "volfuse",
    version,
    about = "Context-fused 3D segmentation of EM and CT volumes (DINOv3 + 3D UNet) on wgpu"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum Backend {
    /// wgpu on any adapter (lavapipe included)
    Gpu,
    /// the CPU reference path
    Cpu,
}

#[derive(clap::Args, Clone, Debug)]
struct DeviceArgs {
    /// Compute backend.
    #[arg(long, value_enum, default_value_t = Backend::Gpu)]
    backend: Backend,
    /// Substring of the adapter name (also VOLFUSE_ADAPTER).
    #[arg(long)]
    adapter: Option<String>,
    /// Graphics API: native (Vulkan/Metal/DX12), vulkan, metal, dx12 or gl (also VOLFUSE_API).
    #[arg(long)]
    api: Option<String>,
    /// Keep every kernel's default variant: no timing, no autotune cache (also VOLFUSE_NO_AUTOTUNE=1).
    #[arg(long)]
    no_autotune: bool,
}

impl DeviceArgs {
    fn backend(&self) -> Result<ModelBackend> {
        Ok(match self.backend {
            Backend::Cpu => ModelBackend::Cpu,
            Backend::Gpu => ModelBackend::Gpu(Arc::new(self.gpu()?)),
        })
    }

    fn gpu(&self) -> Result<GpuContext> {
        if self.no_autotune {
            std::env::set_var("VOLFUSE_NO_AUTOTUNE", "1");
        }
        let mut o = GpuOptions::from_env()?;
        if let Some(a) = &self.api {
            o.api = Api::parse(a)?;
        }
        if let Some(a) = &self.adapter {
            o.adapter = Some(a.clone());
        }
        Ok(GpuContext::new(&o)?)
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Describe a model bundle (with --model) and list the adapters wgpu finds.
    Info {
        /// A model bundle folder.
        #[arg(long)]
        model: Option<PathBuf>,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// Run the DINOv3 ViT on images: (N, 3, H, W) float32, already normalised → last_hidden_state (N, T, C).
    Backbone {
        /// HF DINOv3 folder (config.json + model.safetensors).
        #[arg(long)]
        backbone: PathBuf,
        /// Images (N, 3, H, W) as .npy (float32).
        #[arg(long)]
        input: PathBuf,
        /// Where to write last_hidden_state (N, T, C) float32 .npy.
        #[arg(long)]
        output: PathBuf,
        /// Images per batch (lowered automatically to fit the device's buffer limits).
        #[arg(long, default_value_t = 16)]
        batch: usize,
        /// Replace an existing output file.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// Orthogonal-plane DINOv3 features of a volume, as dinov3_playground's 3D extraction: (C, D, H, W) float32.
    Features {
        /// HF DINOv3 folder (config.json + model.safetensors).
        #[arg(long)]
        backbone: PathBuf,
        /// Volume (D, H, W) as .npy: uint8, uint16 or float32.
        #[arg(long)]
        input: PathBuf,
        /// Output grid D H W.
        #[arg(long, num_args = 3, value_names = ["D", "H", "W"])]
        size: Vec<usize>,
        /// Slices are resized to S×S before the ViT.
        #[arg(long)]
        slice_size: usize,
        /// Normalisation mean (default ImageNet).
        #[arg(long, num_args = 3, value_names = ["R", "G", "B"])]
        mean: Option<Vec<f32>>,
        /// Normalisation std (default ImageNet).
        #[arg(long, num_args = 3, value_names = ["R", "G", "B"])]
        std: Option<Vec<f32>>,
        /// Use the xy plane only (dinov3_playground's use_orthogonal_planes=False).
        #[arg(long)]
        xy_only: bool,
        /// Slices per ViT batch.
        #[arg(long, default_value_t = 16)]
        batch: usize,
        #[arg(long)]
        output: PathBuf,
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// Segment a volume with a model bundle: labels, and optionally probabilities and logits.
    Run {
        /// Model bundle folder (volfuse.json, unet.safetensors, backbone/).
        #[arg(long)]
        model: PathBuf,
        /// Raw volume (D, H, W) as .npy: uint8, uint16 or float32.
        #[arg(long)]
        input: PathBuf,
        /// Context volume: concentric, larger extent at a coarser resolution, same voxel shape.
        #[arg(long)]
        context: Option<PathBuf>,
        /// Labels (d, h, w), uint8 (uint16 beyond 256 classes).
        #[arg(long)]
        output: PathBuf,
        /// Probabilities (K, d, h, w) float32.
        #[arg(long)]
        probabilities: Option<PathBuf>,
        /// Logits (K, d, h, w) float32.
        #[arg(long)]
        logits: Option<PathBuf>,
        /// Slices per ViT batch.
        #[arg(long, default_value_t = 16)]
        batch: usize,
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// Benchmark the kernels on the chosen adapter (GFLOP/s, GB/s).
    Bench {
        /// Only cases whose label contains one of these words.
        filter: Vec<String>,
        #[command(flatten)]
        device: DeviceArgs,
        /// Timed repetitions per case (median reported).
        #[arg(long, default_value_t = 5)]
        iters: usize,
        /// Benchmark a whole random-weight DINOv3 ViT of this size (s, s+, b, l, h+) instead.
        #[arg(long)]
        vit: Option<String>,
        /// Image side for --vit.
        #[arg(long, default_value_t = 224)]
        image: usize,
        /// Batch for --vit.
        #[arg(long, default_value_t = 32)]
        batch: usize,
        /// Benchmark a random-weight DINOv3UNet3D with this many base channels instead.
        #[arg(long)]
        unet: Option<usize>,
        /// With --unet: tile side (voxels) and input feature channels.
        #[arg(long, default_value_t = 64)]
        tile: usize,
        #[arg(long, default_value_t = 64)]
        channels: usize,
        /// With --unet: with context fusion.
        #[arg(long)]
        context: bool,
        /// With --vit: print time per op.
        #[arg(long)]
        profile: bool,
        /// With --vit: also time PyTorch CPU on the same model size and input
        /// (tools/bench_torch.py in tools/.venv) and print the ratio.
        #[arg(long)]
        torch: bool,
        /// One tile of the whole pipeline, stage by stage: a bundle folder, or
        /// `random:vit-s,base32,input64[,slice224,classes3,noctx,xy]` (random weights).
        #[arg(long)]
        model: Option<String>,
        /// With --model: side of the random raw/context volumes (default: the model's input size).
        #[arg(long)]
        volume: Option<usize>,
        /// With --model: FLOPs, bytes and device memory per stage, without running anything.
        #[arg(long)]
        costs_only: bool,
        /// Time every variant of the tunable kernels on the bench shapes, print the gain of
        /// the tuned choice over the default and store the choices in the autotune cache.
        #[arg(long)]
        autotune: bool,
    },
}

fn main() -> std::process::ExitCode {
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        std::env::set_var("XDG_RUNTIME_DIR", std::env::temp_dir());
    }
    match dispatch(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Info { model, device } => info(model.as_deref(), &device),
        Cmd::Bench {
            autotune: true,
            device,
            iters,
            ..
        } => bench_autotune(&device, iters),
        Cmd::Bench {
            model: Some(model),
            device,
            iters,
            batch,
            volume,
            costs_only,
            torch,
            ..
        } => bench_model(&model, &device, iters, batch, volume, costs_only, torch),
        Cmd::Bench {
            vit: Some(size),
            device,
            iters,
            image,
            batch,
            profile,
            torch,
            ..
        } => {
            let backend = device.backend()?;
            let ours = volfuse::bench::vit(backend, &size, image, image, batch, iters, profile)?;
            println!("{ours}");
            if torch {
                let args: Vec<String> = [
                    "vit",
                    "--size",
                    &size,
                    "--image",
                    &image.to_string(),
                    "--batch",
                    &batch.to_string(),
                ]
                .iter()
                .map(|s| s.to_string())
                .collect();
                match volfuse::bench::torch_reference(&args)
                    .and_then(|v| v["images_per_s"].as_f64())
                {
                    Some(t) => println!(
                        "pytorch cpu (2 threads): {t:.3} images/s; volfuse / pytorch = {:.3}",
                        ours.images_per_s / t
                    ),
                    None => println!(
                        "pytorch cpu: not available (create tools/.venv, see tools/README.md)"
                    ),
                }
            }
            Ok(())
        }
        Cmd::Bench {
            unet: Some(base),
            device,
            iters,
            tile,
            channels,
            context,
            torch,
            profile,
            ..
        } => {
            let backend = device.backend()?;
            let label = backend.describe();
            let (secs, gflops, prof) =
                volfuse::bench::unet(backend, base, channels, tile, context, iters)?;
            println!(
                "unet base {base}, {channels} input channels, {tile}^3{} on {label}: {secs:.2} s per tile, {:.0} voxels/s, {gflops:.2} GFLOP/s",
                if context { " + context" } else { "" },
                (tile * tile * tile) as f64 / secs
            );
            if profile {
                for (op, s, f) in prof {
                    println!(
                        "    {op:<16} {:>9.1} ms {:>8.2} GFLOP/s",
                        s * 1e3,
                        f as f64 / s.max(1e-12) / 1e9
                    );
                }
            }
            if torch {
                let mut args: Vec<String> = [
                    "unet",
                    "--base",
                    &base.to_string(),
                    "--input",
                    &tile.to_string(),
                    "--channels",
                    &channels.to_string(),
                ]
                .iter()
                .map(|s| s.to_string())
                .collect();
                if context {
                    args.push("--context".into());
                }
                match volfuse::bench::torch_reference(&args).and_then(|v| v["seconds"].as_f64()) {
                    Some(t) => println!("pytorch cpu (2 threads): {t:.2} s per tile; volfuse / pytorch speed = {:.3}", t / secs),
                    None => println!("pytorch cpu: not available (create tools/.venv, see tools/README.md)"),
                }
            }
            Ok(())
        }
        Cmd::Bench {
            filter,
            device,
            iters,
            ..
        } => bench(&device, &filter, iters),
        Cmd::Features {
            backbone,
            input,
            size,
            slice_size,
            mean,
            std,
            xy_only,
            batch,
            output,
            force,
            device,
        } => run_features(
            &backbone, &input, &size, slice_size, mean, std, xy_only, batch, &output, force,
            &device,
        ),
        Cmd::Run {
            model,
            input,
            context,
            output,
            probabilities,
            logits,
            batch,
            force,
            device,
        } => run_model(
            &model,
            &input,
            context.as_deref(),
            &output,
            probabilities.as_deref(),
            logits.as_deref(),
            batch,
            force,
            &device,
        ),
        Cmd::Backbone {
            backbone,
            input,
            output,
            batch,
            force,
            device,
        } => run_backbone(&backbone, &input, &output, batch, force, &device),
    }
}

fn info(model: Option<&Path>, device: &DeviceArgs) -> Result<()> {
    if let Some(dir) = model {
        let b = volfuse::models::Bundle::load(dir)
            .with_context(|| format!("reading the bundle {}", dir.display()))?;
        print!("{}", b.describe());
    }
    for (label, api) in [("native (Vulkan/Metal/DX12)", Api::Native), ("GL", Api::Gl)] {
        let found = list_adapters(api);
        println!(
            "{label} adapters: {}",
            if found.is_empty() { "none" } else { "" }
        );
        for a in found {
            println!(
                "  {} ({:?}, {:?}, {} {})",
                a.name, a.backend, a.device_type, a.driver, a.driver_info
            );
        }
    }
    if device.backend == Backend::Gpu {
        match device.gpu() {
            Ok(ctx) => println!("using: {}\ncaps: {:?}", ctx.describe(), ctx.caps),
            Err(e) => println!("no usable GPU adapter: {e}"),
        }
    } else {
        println!("using: the CPU reference backend");
    }
    Ok(())
}

fn bench(device: &DeviceArgs, filter: &[String], iters: usize) -> Result<()> {
    use volfuse::bench::{time_cpu, time_gpu};
    let cases: Vec<_> = volfuse::bench::all_cases()
        .into_iter()
        .filter(|c| filter.is_empty() || filter.iter().any(|f| c.label.contains(f.as_str())))
        .collect();
    match device.backend {
        Backend::Gpu => {
            let ctx = device.gpu().context("choosing a GPU adapter")?;
            println!("adapter: {}", ctx.describe());
            for c in &cases {
                println!("{}", time_gpu(&ctx, c, iters)?);
            }
        }
        Backend::Cpu => {
            println!("backend: CPU reference");
            for c in &cases {
                println!("{}", time_cpu(c, iters)?);
            }
        }
    }
    Ok(())
}

fn bench_autotune(device: &DeviceArgs, iters: usize) -> Result<()> {
    use volfuse::autotune;
    if !autotune::enabled() || device.no_autotune {
        anyhow::bail!("--autotune with autotuning turned off (--no-autotune or VOLFUSE_NO_AUTOTUNE)");
    }
    let ctx = device.gpu().context("choosing a GPU adapter")?;
    println!("adapter: {}", ctx.describe());
    let mut cache = autotune::TuneCache::open_default();
    let rows = autotune::bench(&ctx, &mut cache, iters)?;
    for r in &rows {
        let times: Vec<String> = r
            .variants
            .iter()
            .map(|(n, s)| format!("{n} {}", s.map_or("failed".into(), |s| format!("{:.3} ms", s * 1e3))))
            .collect();
        println!(
            "{:<44} {}  → {} (gain over the default {:.2}×)",
            r.label,
            times.join(", "),
            r.chosen,
            r.gain
        );
    }
    match &cache.path {
        Some(p) => {
            cache.save()?;
            println!("choices saved to {}", p.display());
        }
        None => println!("no cache dir (set XDG_CACHE_HOME or HOME): choices not saved"),
    }
    Ok(())
}

fn bench_model(
    model: &str,
    device: &DeviceArgs,
    iters: usize,
    batch: usize,
    volume: Option<usize>,
    costs_only: bool,
    torch: bool,
) -> Result<()> {
    use volfuse::bench_stages as bs;
    let bundle = bs::load_model(model).with_context(|| format!("loading the model {model}"))?;
    let backend = device.backend()?;
    if costs_only {
        print!("{}", bs::costs(&bundle, &backend, batch)?);
        print!("{}", bs::op_tables(&bundle)?);
        return Ok(());
    }
    let mut runner = Runner::new(backend);
    let ours = bs::run(&bundle, &mut runner, batch, volume, iters)?;
    print!("{ours}");
    if torch {
        let args = bs::reference_args(&bundle, volume, iters.min(2));
        match bs::torch_pipeline(&args) {
            Some(v) => {
                let t = v["seconds"].as_f64().unwrap_or(f64::NAN);
                let ours_t = ours.total_seconds.unwrap_or(f64::NAN);
                println!(
                    "pytorch cpu reference ({} threads): {t:.2} s per tile (features {:.2} s, UNet {:.2} s), peak RSS {:.0} MiB",
                    v["threads"].as_u64().unwrap_or(0),
                    v["features_seconds"].as_f64().unwrap_or(f64::NAN),
                    v["unet_seconds"].as_f64().unwrap_or(f64::NAN),
                    v["peak_rss_bytes"].as_f64().unwrap_or(f64::NAN) / 1048576.0
                );
                println!(
                    "volfuse / pytorch speed = {:.3}; UNet alone {:.3}",
                    t / ours_t,
                    v["unet_seconds"].as_f64().unwrap_or(f64::NAN)
                        / ours
                            .stages
                            .iter()
                            .filter(|s| s.name.starts_with("UNet") || s.name.contains("fusion") || s.name.starts_with("head"))
                            .filter_map(|s| s.seconds)
                            .sum::<f64>()
                );
                if let (Some(p), Some(c)) = (v["cpu_seconds"].as_f64(), ours.cpu_seconds) {
                    println!(
                        "CPU seconds per tile: pytorch {p:.1}, volfuse {c:.1}; volfuse / pytorch speed by CPU time = {:.3}",
                        p / c
                    );
                }
                if let (Some(p), Some(r)) = (v["peak_rss_bytes"].as_f64(), ours.peak_rss) {
                    println!("peak resident memory volfuse / pytorch = {:.3}", r as f64 / p);
                }
            }
            None => println!("pytorch cpu: not available (create tools/.venv, see tools/README.md)"),
        }
    }
    Ok(())
}

fn check_output(path: &Path, force: bool) -> Result<()> {
    if path.exists() && !force {
        anyhow::bail!(
            "{} already exists; pass --force to replace it",
            path.display()
        );
    }
    Ok(())
}

fn run_backbone(
    dir: &Path,
    input: &Path,
    output: &Path,
    batch: usize,
    force: bool,
    device: &DeviceArgs,
) -> Result<()> {
    check_output(output, force)?;
    let vit =
        Vit::load(dir).with_context(|| format!("loading the backbone from {}", dir.display()))?;
    let x = npy::read(input)?;
    if !matches!(x.dtype(), DType::F32 | DType::F64) {
        anyhow::bail!(
            "{}: images must be float32 (already normalised), found {:?}; normalise them first, e.g. (x/255 - mean)/std",
            input.display(),
            x.dtype()
        );
    }
    let c = vit.config.num_channels;
    let [n, ch, h, w] = x.shape[..] else {
        anyhow::bail!(
            "{}: images must be (N, {c}, H, W), found shape {:?}",
            input.display(),
            x.shape
        );
    };
    if ch != c || h < vit.config.patch_size || w < vit.config.patch_size {
        anyhow::bail!(
            "{}: images must be (N, {c}, H, W) with H and W at least {} pixels, found {:?}",
            input.display(),
            vit.config.patch_size,
            x.shape
        );
    }
    let data = x.into_f32();
    if let Some(i) = data.iter().position(|v| !v.is_finite()) {
        anyhow::bail!(
            "{}: value {i} is not finite ({}); fix the input",
            input.display(),
            data[i]
        );
    }
    let backend = device.backend()?;
    eprintln!("backbone: {} images {h}x{w} on {}", n, backend.describe());
    let mut runner = Runner::new(backend);
    let t0 = std::time::Instant::now();
    let tokens = vit.run(&mut runner, &data, n, h, w, batch)?;
    let secs = t0.elapsed().as_secs_f64();
    let t = vit.config.tokens(h, w);
    npy::write(output, &[n, t, vit.config.hidden_size], &tokens, force)?;
    eprintln!(
        "wrote {} ({n}, {t}, {}) in {secs:.2} s ({:.2} images/s)",
        output.display(),
        vit.config.hidden_size,
        n as f64 / secs
    );
    Ok(())
}

fn triple(v: Option<Vec<f32>>, default: [f32; 3], what: &str) -> Result<[f32; 3]> {
    match v {
        None => Ok(default),
        Some(v) if v.len() == 3 && v.iter().all(|x| x.is_finite()) => Ok([v[0], v[1], v[2]]),
        Some(v) => anyhow::bail!("--{what} needs three finite numbers, got {v:?}"),
    }
}

#[allow(clippy::too_many_arguments)]
fn run_features(
    dir: &Path,
    input: &Path,
    size: &[usize],
    slice_size: usize,
    mean: Option<Vec<f32>>,
    std: Option<Vec<f32>>,
    xy_only: bool,
    batch: usize,
    output: &Path,
    force: bool,
    device: &DeviceArgs,
) -> Result<()> {
    use volfuse::models::planes::{IMAGENET_MEAN, IMAGENET_STD};
    check_output(output, force)?;
    let [d, h, w] = size[..] else {
        anyhow::bail!("--size needs three numbers D H W")
    };
    let std = triple(std, IMAGENET_STD, "std")?;
    if std.iter().any(|s| *s == 0.0) {
        anyhow::bail!("--std must not contain 0");
    }
    let params = volfuse::models::FeatureParams {
        input_size: [d, h, w],
        slice_size,
        mean: triple(mean, IMAGENET_MEAN, "mean")?,
        std,
        orthogonal_planes: !xy_only,
        batch: batch.max(1),
    };
    let vit =
        Vit::load(dir).with_context(|| format!("loading the backbone from {}", dir.display()))?;
    let volume = volfuse::models::Volume::read(input)?;
    let backend = device.backend()?;
    eprintln!(
        "features: {:?} volume → {:?} grid, slices {slice_size}² on {}",
        volume.shape(),
        [d, h, w],
        backend.describe()
    );
    let mut runner = Runner::new(backend);
    let t0 = std::time::Instant::now();
    let feats = volfuse::models::extract_features(&vit, &mut runner, &volume, &params, None)?;
    let c = vit.config.hidden_size;
    npy::write(output, &[c, d, h, w], &feats, force)?;
    eprintln!(
        "wrote {} ({c}, {d}, {h}, {w}) in {:.2} s",
        output.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn run_model(
    model: &Path,
    input: &Path,
    context: Option<&Path>,
    output: &Path,
    probabilities: Option<&Path>,
    logits: Option<&Path>,
    batch: usize,
    force: bool,
    device: &DeviceArgs,
) -> Result<()> {
    // Refuse before any work, so a run never leaves some outputs written and others not.
    for p in [Some(output), probabilities, logits].into_iter().flatten() {
        check_output(p, force)?;
    }
    let bundle = volfuse::models::Bundle::load(model)
        .with_context(|| format!("loading the model bundle {}", model.display()))?;
    let raw = volfuse::models::Volume::read(input)?;
    let ctx = context.map(volfuse::models::Volume::read).transpose()?;
    let backend = device.backend()?;
    eprintln!(
        "run: {:?} volume{} on {}",
        raw.shape(),
        if ctx.is_some() { " + context" } else { "" },
        backend.describe()
    );
    let mut runner = Runner::new(backend);
    let t0 = std::time::Instant::now();
    let seg =
        volfuse::models::pipeline::segment(&bundle, &mut runner, &raw, ctx.as_ref(), batch.max(1))?;
    for n in &seg.notes {
        eprintln!("note: {n}");
    }
    let [k, d, h, w] = seg.shape;
    if k <= 256 {
        let labels: Vec<u8> = seg.labels.iter().map(|v| *v as u8).collect();
        npy::write(output, &[d, h, w], &labels, force)?;
    } else {
        npy::write(output, &[d, h, w], &seg.labels, force)?;
    }
    if let Some(p) = probabilities {
        npy::write(p, &[k, d, h, w], &seg.probabilities, force)?;
    }
    if let Some(p) = logits {
        npy::write(p, &[k, d, h, w], &seg.logits, force)?;
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
        output.display(),
        t0.elapsed().as_secs_f64(),
        found.join(", ")
    );
    Ok(())
}
