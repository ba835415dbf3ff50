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
    /// GPU weight storage: f32, or f16 (matmul weights stored as f16, f32 accumulation;
    /// parity ~1e-3; also VOLFUSE_PRECISION), or f16-act (f16 weights plus the ViT's
    /// activations between kernels stored as f16; subgroup devices, see docs/precision.md).
    /// The CPU backend always computes in f32.
    #[arg(long)]
    precision: Option<String>,
}

impl DeviceArgs {
    fn backend(&self) -> Result<ModelBackend> {
        Ok(match self.backend {
            Backend::Cpu => ModelBackend::Cpu,
            Backend::Gpu => {
                let ctx = self.gpu()?;
                if ctx.caps.cpu_like {
                    eprintln!(
                        "note: adapter \"{}\" is a software renderer on the CPU; `--backend cpu` \
                         runs the same models several times faster on this machine",
                        ctx.info.name
                    );
                }
                ModelBackend::Gpu(Arc::new(ctx))
            }
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
        if let Some(p) = &self.precision {
            o.precision = volfuse::gpu::Precision::parse(p)?;
        }
        o.autotune = !self.no_autotune;
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
    /// Convert a volume between formats (.npy, .tif/.tiff stack, .zarr OME-Zarr), streamed slab by slab.
    Convert {
        /// Volume (D, H, W): .npy, .tif/.tiff, a folder of .tif pages, or .zarr (OME-Zarr v2/v3).
        #[arg(long)]
        input: PathBuf,
        /// OME-Zarr input: the multiscale level to read (0 = full resolution).
        #[arg(long, default_value_t = 0)]
        level: usize,
        /// Output: .npy, .tif/.tiff or .zarr.
        #[arg(long)]
        output: PathBuf,
        /// .zarr output: Zarr format 3 (OME-NGFF 0.5) or 2 (OME-NGFF 0.4).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(2..=3))]
        zarr_version: u8,
        #[arg(long)]
        force: bool,
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
    /// Segment a volume of any size with a model bundle, tile by tile: labels, and optionally
    /// probabilities and logits, on the raw volume's voxel grid.
    Run(RunArgs),
    /// Segment a generated EM-like volume with the shipped demo models (with and without context) and score both against the truth.
    Demo {
        /// Seed of the generated volume.
        #[arg(long, default_value_t = volfuse::demo::DEFAULT_SEED)]
        seed: u64,
        /// Volume side (≥ the models' 32-voxel tile; larger volumes run the sliding window).
        #[arg(long, default_value_t = volfuse::demo::DEFAULT_SIZE)]
        size: usize,
        /// Centre the volume this far from a nucleus centre (fraction of its radius).
        #[arg(long, default_value_t = volfuse::demo::DEFAULT_NUCLEUS_OFFSET)]
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
        /// Benchmark one conv3d with this many input and output channels (kernel 3, on a
        /// --tile³ input) instead; with --torch, next to PyTorch's Conv3d.
        #[arg(long)]
        conv3d: Option<usize>,
        /// With --vit / --unet: print time per op.
        #[arg(long)]
        profile: bool,
        /// With --vit / --unet / --conv3d: also time PyTorch CPU on the same model size and input
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
    if let Err(e) = volfuse::io::cleanup::install_interrupt_handler() {
        eprintln!("warning: {e}");
    }
    match dispatch(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn convert(input: &Path, level: usize, output: &Path, zarr_version: u8, force: bool) -> Result<()> {
    use volfuse::io::volume::{self as vol, OutType, SlabData};
    use volfuse::models::planes::VolumeData;
    let t = std::time::Instant::now();
    let opts = vol::ReadOptions { level: Some(level) };
    let (v, notes) = vol::read_volume_noted(input, &opts)?;
    for n in notes {
        eprintln!("note: {n}");
    }
    let [d, h, w] = v.shape();
    let ty = match v.data() {
        VolumeData::U8(_) => OutType::U8,
        VolumeData::U16(_) => OutType::U16,
        VolumeData::F32(_) => OutType::F32,
    };
    let wopts = vol::WriteOptions {
        force,
        zarr_version: if zarr_version == 2 {
            vol::ZarrVersion::V2
        } else {
            vol::ZarrVersion::V3
        },
        chunk: None,
    };
    let mut writer = vol::create_writer_with(output, &[d, h, w], ty, &wopts)?;
    let plane = h * w;
    for z0 in (0..d).step_by(16) {
        let r = z0 * plane..(z0 + 16).min(d) * plane;
        let slab = match v.data() {
            VolumeData::U8(x) => SlabData::U8(&x[r]),
            VolumeData::U16(x) => SlabData::U16(&x[r]),
            VolumeData::F32(x) => SlabData::F32(&x[r]),
        };
        writer.write_slab(z0, slab)?;
    }
    writer.finish()?;
    eprintln!(
        "converted {} ({d}×{h}×{w} {}) → {} in {:.2} s",
        input.display(),
        v.dtype(),
        output.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

fn dispatch(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Info { model, device } => info(model.as_deref(), &device),
        Cmd::Convert {
            input,
            level,
            output,
            zarr_version,
            force,
        } => convert(&input, level, &output, zarr_version, force),
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
                match volfuse::bench::torch_reference(&args) {
                    Some(v) if v["images_per_s"].as_f64().is_some() => {
                        let t = v["images_per_s"].as_f64().unwrap_or(1.0);
                        println!(
                            "pytorch cpu (2 threads): {t:.3} images/s; volfuse / pytorch = {:.3}",
                            ours.images_per_s / t
                        );
                        let torch_cpu = v["cpu_seconds"].as_f64().map(|c| c / batch as f64);
                        if let (Some(o), Some(p)) = (ours.cpu_seconds_per_image, torch_cpu) {
                            println!(
                                "  by CPU time: pytorch {p:.3} CPU-s/image, volfuse {o:.3}; volfuse / pytorch speed = {:.3}",
                                p / o
                            );
                        }
                    }
                    _ => println!(
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
            let ours_cpu = volfuse::bench::unet_cpu_seconds();
            if ours_cpu > 0.0 {
                println!("  {ours_cpu:.2} CPU-s per tile");
            }
            let [act, wts, scr] = volfuse::bench::unet_device_bytes();
            if act > 0 {
                let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
                println!(
                    "  device: {:.0} MiB activations + {:.0} MiB weights + {:.0} MiB slab scratch = {:.0} MiB",
                    mib(act),
                    mib(wts),
                    mib(scr),
                    mib(act + wts + scr)
                );
            }
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
                match volfuse::bench::torch_reference(&args) {
                    Some(v) if v["seconds"].as_f64().is_some() => {
                        let t = v["seconds"].as_f64().unwrap_or(1.0);
                        println!("pytorch cpu (2 threads): {t:.2} s per tile; volfuse / pytorch speed = {:.3}", t / secs);
                        if let Some(p) = v["cpu_seconds"].as_f64().filter(|_| ours_cpu > 0.0) {
                            println!(
                                "  by CPU time: pytorch {p:.2} CPU-s, volfuse {ours_cpu:.2} CPU-s; volfuse / pytorch speed = {:.3}",
                                p / ours_cpu
                            );
                        }
                    }
                    _ => println!(
                        "pytorch cpu: not available (create tools/.venv, see tools/README.md)"
                    ),
                }
            }
            Ok(())
        }
        Cmd::Bench {
            conv3d: Some(channels),
            device,
            iters,
            tile,
            torch,
            ..
        } => {
            let case = volfuse::bench::conv3d_case(channels, 3, tile);
            let ours = match device.backend()? {
                ModelBackend::Cpu => volfuse::bench::time_cpu(&case, iters)?,
                ModelBackend::Gpu(ctx) => volfuse::bench::time_gpu(&ctx, &case, iters)?,
            };
            println!("{ours}");
            if torch {
                let args: Vec<String> = ["conv3d", "--cin", &channels.to_string(), "--cout"]
                    .iter()
                    .map(|s| s.to_string())
                    .chain([channels.to_string(), "--kernel".into(), "3".into()])
                    .chain(["--input".into(), tile.to_string(), "--iters".into()])
                    .chain([iters.to_string()])
                    .collect();
                match volfuse::bench::torch_reference(&args) {
                    Some(v) if v["seconds"].as_f64().is_some() => {
                        let t = v["seconds"].as_f64().unwrap_or(1.0);
                        println!(
                            "pytorch cpu (2 threads): {:.3} s, {:.2} GFLOP/s; volfuse / pytorch speed = {:.3}",
                            t,
                            v["gflops"].as_f64().unwrap_or(0.0),
                            t / ours.seconds
                        );
                        if let (Some(o), Some(p)) = (ours.cpu_seconds, v["cpu_seconds"].as_f64()) {
                            println!(
                                "  by CPU time: pytorch {p:.3} CPU-s, volfuse {o:.3} CPU-s; volfuse / pytorch speed = {:.3}",
                                p / o
                            );
                        }
                    }
                    _ => println!(
                        "pytorch cpu: not available (create tools/.venv, see tools/README.md)"
                    ),
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
        Cmd::Run(args) => {
            if let Some(dir) = &args.dump_gates {
                let ctx = match args.context.as_deref() {
                    None | Some("auto") | Some("none") => anyhow::bail!(
                        "--dump-gates needs --context FILE: the gates are computed on one tile of the raw volume and its context volume"
                    ),
                    Some(c) => PathBuf::from(c),
                };
                dump_gates(
                    &args.model,
                    &args.input,
                    Some(&ctx),
                    dir,
                    args.batch,
                    args.force,
                    &args.device,
                )?;
            }
            run_model(&args)
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

fn bench_autotune(device: &DeviceArgs, iters: usize) -> Result<()> {
    use volfuse::autotune;
    if !autotune::enabled() || device.no_autotune {
        anyhow::bail!(
            "--autotune with autotuning turned off (--no-autotune or VOLFUSE_NO_AUTOTUNE)"
        );
    }
    let ctx = device.gpu().context("choosing a GPU adapter")?;
    println!("adapter: {}", ctx.describe());
    let mut cache = autotune::TuneCache::open_default();
    let mut rows = autotune::bench(&ctx, &mut cache, iters)?;
    rows.extend(autotune::bench_precision(&ctx, iters)?);
    for r in &rows {
        let times: Vec<String> = r
            .variants
            .iter()
            .map(|(n, s)| {
                format!(
                    "{n} {}",
                    s.map_or("failed".into(), |s| format!("{:.3} ms", s * 1e3))
                )
            })
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
                            .filter(|s| s.name.starts_with("UNet")
                                || s.name.contains("fusion")
                                || s.name.starts_with("head"))
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
                    println!(
                        "peak resident memory volfuse / pytorch = {:.3}",
                        r as f64 / p
                    );
                }
            }
            None => {
                println!("pytorch cpu: not available (create tools/.venv, see tools/README.md)")
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

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum BlendArg {
    /// every voxel of a tile weighs the same
    Constant,
    /// MONAI's Gaussian window (σ = 0.125 × tile), less weight at tile edges
    Gaussian,
}

#[derive(clap::Args, Clone, Debug)]
struct RunArgs {
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

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
}

fn class_names(bundle: &volfuse::models::Bundle) -> Vec<String> {
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

fn run_model(a: &RunArgs) -> Result<()> {
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
fn run_single_tile(a: &RunArgs) -> Result<()> {
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

/// Writes bytes through a temporary file in the same folder, renamed into place.
fn write_file_atomic(path: &Path, bytes: &[u8], force: bool) -> Result<()> {
    check_output(path, force)?;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
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
        let l = volfuse::demo::segment_tiles(
            b,
            &mut runner,
            &v.raw,
            &v.context,
            shape,
            ratio,
            batch.max(1),
        )?;
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
    let png =
        volfuse::demo::preview_png(&v.raw, &v.truth, &[&l0, &l1], shape, (256 / size).max(1))?;
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
