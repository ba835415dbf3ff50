//! The `volfuse` command line.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use volfuse::gpu::{list_adapters, Api, GpuContext, GpuOptions};
use volfuse::io::{npy, DType};
use volfuse::models::{Backend as ModelBackend, Runner, Vit};

mod bench;
mod run;

use run::RunArgs;

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
    volfuse::GpuContext::tune_host_heap();
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
        } => bench::autotune(&device, iters),
        Cmd::Bench {
            model: Some(model),
            device,
            iters,
            batch,
            volume,
            costs_only,
            torch,
            ..
        } => bench::model(&model, &device, iters, batch, volume, costs_only, torch),
        Cmd::Bench {
            vit: Some(size),
            device,
            iters,
            image,
            batch,
            profile,
            torch,
            ..
        } => bench::vit(&device, &size, image, batch, iters, profile, torch),
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
        } => bench::unet(
            &device, base, channels, tile, context, iters, profile, torch,
        ),
        Cmd::Bench {
            conv3d: Some(channels),
            device,
            iters,
            tile,
            torch,
            ..
        } => bench::conv3d(&device, channels, tile, iters, torch),
        Cmd::Bench {
            filter,
            device,
            iters,
            ..
        } => bench::kernels(&device, &filter, iters),
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
        Cmd::Run(args) => run::run(&args),
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
    if std.contains(&0.0) {
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
