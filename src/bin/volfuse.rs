//! The `volfuse` command line.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use volfuse::gpu::{list_adapters, Api, GpuContext, GpuOptions};

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
    /// List the adapters wgpu finds and what volfuse would use.
    Info {
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
    },
}

fn main() -> Result<()> {
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        std::env::set_var("XDG_RUNTIME_DIR", std::env::temp_dir());
    }
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Info { device } => info(&device),
        Cmd::Bench {
            filter,
            device,
            iters,
        } => bench(&device, &filter, iters),
    }
}

fn info(device: &DeviceArgs) -> Result<()> {
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
