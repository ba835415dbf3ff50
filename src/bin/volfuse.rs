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
}

impl DeviceArgs {
    fn backend(&self) -> Result<ModelBackend> {
        Ok(match self.backend {
            Backend::Cpu => ModelBackend::Cpu,
            Backend::Gpu => ModelBackend::Gpu(Arc::new(self.gpu()?)),
        })
    }

    fn gpu(&self) -> Result<GpuContext> {
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
        /// Also write the four context-fusion gate maps (gate1.npy … gate4.npy, (Ck, d, h, w)) into this folder.
        #[arg(long)]
        dump_gates: Option<PathBuf>,
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// Segment a generated EM-like volume with the shipped demo models (with and without context) and score both against the truth.
    Demo {
        /// Seed of the generated volume.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Volume side (a multiple of the models' 32-voxel tile; 32 = one tile per model).
        #[arg(long, default_value_t = 32)]
        size: usize,
        /// Centre the volume this far from a nucleus centre (fraction of its radius).
        #[arg(long, default_value_t = 0.8)]
        nucleus_offset: f64,
        /// Where to write the volumes, labels and preview.png.
        #[arg(long, default_value = "volfuse-demo")]
        output_dir: PathBuf,
        /// Folder holding the two demo bundles with_context/ and no_context/ (default: the source tree's demo/).
        #[arg(long)]
        models: Option<PathBuf>,
        /// Slices per ViT batch.
        #[arg(long, default_value_t = 32)]
        batch: usize,
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// Generate a synthetic EM-like volume with ground truth: raw.npy, context.npy (concentric, coarser, same voxel shape), truth.npy.
    Synth {
        /// Random seed (the same seed gives the same files).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Volume size D H W.
        #[arg(long, num_args = 3, value_names = ["D", "H", "W"], default_values_t = [64, 64, 64])]
        size: Vec<usize>,
        /// Context voxel size / raw voxel size.
        #[arg(long, default_value_t = volfuse::synth::DEFAULT_CONTEXT_RATIO)]
        context_ratio: usize,
        /// Centre the volume this far from a nucleus centre (fraction of its radius); default: anywhere.
        #[arg(long)]
        nucleus_offset: Option<f64>,
        /// Folder for raw.npy, context.npy and truth.npy (created if missing).
        #[arg(long)]
        output_dir: PathBuf,
        #[arg(long)]
        force: bool,
    },
    /// Score labels against a ground truth: per-class IoU and Dice, confusion counts, mean IoU.
    Eval {
        /// Predicted labels (D, H, W) .npy, integer.
        #[arg(long)]
        labels: PathBuf,
        /// True labels (D, H, W) .npy, integer, same shape.
        #[arg(long)]
        truth: PathBuf,
        /// Class names in label order, for the table (default: the synthetic volumes' names).
        #[arg(long, num_args = 1..)]
        names: Option<Vec<String>>,
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
            dump_gates: gates_dir,
            force,
            device,
        } => {
            if let Some(dir) = &gates_dir {
                dump_gates(&model, &input, context.as_deref(), dir, batch, force, &device)?;
            }
            run_model(
            &model,
            &input,
            context.as_deref(),
            &output,
            probabilities.as_deref(),
            logits.as_deref(),
            batch,
            force,
            &device,
        )
        }
        Cmd::Demo {
            seed,
            size,
            nucleus_offset,
            output_dir,
            models,
            batch,
            force,
            device,
        } => run_demo(
            seed,
            size,
            nucleus_offset,
            &output_dir,
            models,
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
        Cmd::Synth {
            seed,
            size,
            context_ratio,
            nucleus_offset,
            output_dir,
            force,
        } => run_synth(
            seed,
            &size,
            context_ratio,
            nucleus_offset,
            &output_dir,
            force,
        ),
        Cmd::Eval {
            labels,
            truth,
            names,
        } => run_eval(&labels, &truth, names),
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

fn run_synth(
    seed: u64,
    size: &[usize],
    context_ratio: usize,
    nucleus_offset: Option<f64>,
    dir: &Path,
    force: bool,
) -> Result<()> {
    let [d, h, w] = size[..] else {
        anyhow::bail!("--size needs three numbers D H W")
    };
    let files = ["raw.npy", "context.npy", "truth.npy"].map(|f| dir.join(f));
    for f in &files {
        check_output(f, force)?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut cfg = volfuse::synth::SynthConfig::new(seed, [d, h, w]);
    cfg.context_ratio = context_ratio;
    cfg.nucleus_offset = nucleus_offset;
    let t0 = std::time::Instant::now();
    let v = volfuse::synth::generate(&cfg)?;
    npy::write(&files[0], &v.shape, &v.raw, force)?;
    npy::write(&files[1], &v.shape, &v.context, force)?;
    npy::write(&files[2], &v.shape, &v.truth, force)?;
    let mut counts = [0usize; 4];
    for t in &v.truth {
        counts[*t as usize] += 1;
    }
    eprintln!(
        "synth: seed {seed}, {:?} voxels, context ×{context_ratio} → {} in {:.2} s; voxels per class {}",
        v.shape,
        dir.display(),
        t0.elapsed().as_secs_f64(),
        volfuse::synth::CLASS_NAMES
            .iter()
            .zip(counts)
            .map(|(n, c)| format!("{n} {c}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

/// A label volume as u16 values: integer dtypes only, values checked.
fn read_labels(path: &Path) -> Result<(Vec<usize>, Vec<u16>)> {
    let x = npy::read(path)?;
    let shape = x.shape.clone();
    if !matches!(
        x.dtype(),
        DType::U8 | DType::U16 | DType::U32 | DType::I16 | DType::I32 | DType::I64
    ) {
        anyhow::bail!(
            "{}: labels must be an integer array, found {:?}; save the argmax of your predictions as integers",
            path.display(),
            x.dtype()
        );
    }
    let mut out = Vec::with_capacity(x.len());
    for (i, v) in x.to_f32().into_iter().enumerate() {
        if !(0.0..=65535.0).contains(&v) {
            anyhow::bail!(
                "{}: label {v} at index {i} is outside 0..=65535; labels must be class indices",
                path.display()
            );
        }
        out.push(v as u16);
    }
    Ok((shape, out))
}

fn run_eval(labels: &Path, truth: &Path, names: Option<Vec<String>>) -> Result<()> {
    let (ps, p) = read_labels(labels)?;
    let (ts, t) = read_labels(truth)?;
    if ps != ts {
        anyhow::bail!(
            "the labels {} have shape {ps:?} but the truth {} has {ts:?}; they must match",
            labels.display(),
            truth.display()
        );
    }
    let names: Vec<String> = names.unwrap_or_else(|| {
        volfuse::synth::CLASS_NAMES
            .iter()
            .map(|s| s.to_string())
            .collect()
    });
    let names: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
    let s = volfuse::eval::score(&p, &t, 0)?;
    print!("{}", volfuse::eval::table(&names, &[("prediction", &s)]));
    println!("accuracy {:.4}", s.accuracy());
    println!("confusion (voxels):");
    print!("{}", volfuse::eval::confusion_text(&names, &s));
    Ok(())
}

fn dump_gates(
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
        anyhow::bail!("--dump-gates needs --context: the gates are computed from the context volume");
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

/// Writes bytes through a temporary file in the same folder, renamed into place.
fn write_file_atomic(path: &Path, bytes: &[u8], force: bool) -> Result<()> {
    check_output(path, force)?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    std::fs::write(&tmp, bytes)
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            anyhow::anyhow!("writing {}: {e}", path.display())
        })
}

#[allow(clippy::too_many_arguments)]
fn run_demo(
    seed: u64,
    size: usize,
    nucleus_offset: f64,
    out: &Path,
    models: Option<PathBuf>,
    batch: usize,
    force: bool,
    device: &DeviceArgs,
) -> Result<()> {
    use volfuse::eval::{score, table};
    use volfuse::synth::{generate, SynthConfig, CLASS_NAMES};
    let t_all = std::time::Instant::now();
    let names = [
        "raw.npy",
        "context.npy",
        "truth.npy",
        "labels_no_context.npy",
        "labels_context.npy",
        "preview.png",
    ];
    let files: Vec<PathBuf> = names.iter().map(|n| out.join(n)).collect();
    for f in &files {
        check_output(f, force)?;
    }
    let models = models.unwrap_or_else(volfuse::demo::models_dir);
    let load = |v: &str| {
        let dir = models.join(v);
        volfuse::models::Bundle::load(&dir).with_context(|| {
            format!(
                "loading the demo model {} (the demo models ship in the source tree's demo/ folder; pass --models DIR if you moved them)",
                dir.display()
            )
        })
    };
    let no_ctx = load("no_context")?;
    let with_ctx = load("with_context")?;
    let ratio = volfuse::synth::DEFAULT_CONTEXT_RATIO;
    let mut cfg = SynthConfig::new(seed, [size; 3]);
    cfg.nucleus_offset = Some(nucleus_offset);
    let t0 = std::time::Instant::now();
    let v = generate(&cfg)?;
    eprintln!(
        "demo: generated a {size}³ EM-like volume (seed {seed}) + its ×{ratio} context in {:.2} s",
        t0.elapsed().as_secs_f64()
    );
    let backend = device.backend()?;
    eprintln!("demo: running both models on {}", backend.describe());
    let mut runner = Runner::new(backend);
    let shape = v.shape;
    let mut run = |b: &volfuse::models::Bundle, label: &str| -> Result<Vec<u16>> {
        let t = std::time::Instant::now();
        let l = volfuse::demo::segment_tiles(b, &mut runner, &v.raw, &v.context, shape, ratio, batch.max(1))?;
        eprintln!("demo: {label}: {:.2} s", t.elapsed().as_secs_f64());
        Ok(l)
    };
    let l0 = run(&no_ctx, "without context")?;
    let l1 = run(&with_ctx, "with context")?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    npy::write(&files[0], &shape, &v.raw, force)?;
    npy::write(&files[1], &shape, &v.context, force)?;
    npy::write(&files[2], &shape, &v.truth, force)?;
    let to_u8 = |l: &[u16]| l.iter().map(|x| *x as u8).collect::<Vec<u8>>();
    npy::write(&files[3], &shape, &to_u8(&l0), force)?;
    npy::write(&files[4], &shape, &to_u8(&l1), force)?;
    let png = volfuse::demo::preview_png(&v.raw, &v.truth, &[&l0, &l1], shape, (256 / size).max(1))?;
    write_file_atomic(&files[5], &png, force)?;
    let truth: Vec<u16> = v.truth.iter().map(|x| *x as u16).collect();
    let s0 = score(&l0, &truth, CLASS_NAMES.len())?;
    let s1 = score(&l1, &truth, CLASS_NAMES.len())?;
    println!(
        "{}",
        table(&CLASS_NAMES, &[("no context", &s0), ("with context", &s1)])
    );
    println!(
        "wrote {} (raw, context, truth, labels, preview.png: middle slice raw | truth | no context | with context) in {:.1} s",
        out.display(),
        t_all.elapsed().as_secs_f64()
    );
    Ok(())
}
