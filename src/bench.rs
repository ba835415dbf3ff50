//! Kernel benchmarking shared by `cargo bench` and `volfuse bench`: times an op's GPU
//! dispatches (timestamp queries where the adapter has them, wall clock otherwise) after
//! a warm-up that pays the shader JIT.

use crate::error::Result;
use crate::gpu::GpuContext;
use crate::ops::{numel, Op};
use std::time::Instant;

/// One benchmark case: an op and its input shapes.
pub struct Case {
    pub label: String,
    pub op: Box<dyn Op>,
    pub shapes: Vec<Vec<usize>>,
}

impl Case {
    pub fn new(label: impl Into<String>, op: impl Op + 'static, shapes: Vec<Vec<usize>>) -> Self {
        Case {
            label: label.into(),
            op: Box::new(op),
            shapes,
        }
    }
}

/// Timing of one case.
#[derive(Debug, Clone)]
pub struct Timing {
    pub label: String,
    pub seconds: f64,
    /// Process CPU seconds per run (CPU backend, where measurable).
    pub cpu_seconds: Option<f64>,
    pub gflops: f64,
    pub gbytes_per_s: f64,
}

impl std::fmt::Display for Timing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:<44} {:>10.3} ms {:>9.2} GFLOP/s {:>8.2} GB/s",
            self.label,
            self.seconds * 1e3,
            self.gflops,
            self.gbytes_per_s
        )?;
        if let Some(c) = self.cpu_seconds {
            write!(f, " {:>9.3} CPU-s", c)?;
        }
        Ok(())
    }
}

/// Runs `case` on the GPU: one warm-up run, then `iters` timed runs (median).
pub fn time_gpu(ctx: &GpuContext, case: &Case, iters: usize) -> Result<Timing> {
    let shapes: Vec<&[usize]> = case.shapes.iter().map(|s| s.as_slice()).collect();
    let out_shape = case.op.output_shape(&shapes)?;
    // A matmul with f16 weights reads its B as packed halves.
    let w_f16 = case
        .op
        .as_any()
        .and_then(|a| a.downcast_ref::<crate::ops::matmul::Matmul>())
        .is_some_and(|m| m.w_f16);
    let inputs = case
        .shapes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let n = numel(s);
            let data: Vec<f32> = (0..n)
                .map(|j| (((j * 7 + i * 13) % 29) as f32 - 14.0) / 29.0)
                .collect();
            if i == 1 && w_f16 {
                ctx.upload_f16(&data, s)
            } else {
                ctx.upload(&data, s)
            }
        })
        .collect::<Result<Vec<_>>>()?;
    let out = ctx.empty(&out_shape)?;
    let bufs: Vec<&wgpu::Buffer> = inputs.iter().map(|t| t.buffer.as_ref()).collect();
    let dispatches = case.op.gpu(ctx, &bufs, &shapes, &out.buffer)?;
    ctx.run(&dispatches)?; // warm-up: JIT
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        // Device timestamps where the adapter has them, wall clock otherwise.
        let t0 = Instant::now();
        match ctx.time_dispatches(&dispatches)? {
            Some(t) if t > 0.0 => times.push(t),
            _ => times.push(t0.elapsed().as_secs_f64()),
        }
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let seconds = times[times.len() / 2];
    let bytes: usize =
        case.shapes.iter().map(|s| numel(s) * 4).sum::<usize>() + numel(&out_shape) * 4;
    Ok(Timing {
        label: case.label.clone(),
        seconds,
        cpu_seconds: None,
        gflops: case.op.flops(&shapes) as f64 / seconds / 1e9,
        gbytes_per_s: bytes as f64 / seconds / 1e9,
    })
}

/// The adapter's arithmetic ceiling in GFLOP/s: [`crate::ops::peak::MuladdPeak`], a kernel
/// of nothing but multiplies and adds (median of 5 runs after a warm-up). No kernel that
/// also loads and stores can beat it, so a model's GFLOP/s over this is how much of the
/// adapter it uses.
pub fn arithmetic_ceiling(ctx: &GpuContext) -> Result<f64> {
    Ok(time_gpu(ctx, &crate::ops::peak::ceiling_case(), 5)?.gflops)
}

/// Runs `case` with the CPU reference (median of `iters`).
pub fn time_cpu(case: &Case, iters: usize) -> Result<Timing> {
    let shapes: Vec<&[usize]> = case.shapes.iter().map(|s| s.as_slice()).collect();
    let out_shape = case.op.output_shape(&shapes)?;
    let data: Vec<Vec<f32>> = case.shapes.iter().map(|s| vec![0.5f32; numel(s)]).collect();
    let refs: Vec<&[f32]> = data.iter().map(|d| d.as_slice()).collect();
    let mut out = vec![0f32; numel(&out_shape)];
    case.op.cpu(&refs, &shapes, &mut out);
    let mut times = Vec::new();
    let c0 = process_cpu_seconds();
    for _ in 0..iters.max(1) {
        let t0 = Instant::now();
        case.op.cpu(&refs, &shapes, &mut out);
        times.push(t0.elapsed().as_secs_f64());
    }
    let cpu_seconds = c0
        .zip(process_cpu_seconds())
        .map(|(a, b)| (b - a) / iters.max(1) as f64);
    times.sort_by(|a, b| a.total_cmp(b));
    let seconds = times[times.len() / 2];
    let bytes: usize = case.shapes.iter().map(|s| numel(s) * 4).sum::<usize>() + out.len() * 4;
    Ok(Timing {
        label: case.label.clone(),
        seconds,
        cpu_seconds,
        gflops: case.op.flops(&shapes) as f64 / seconds / 1e9,
        gbytes_per_s: bytes as f64 / seconds / 1e9,
    })
}

/// User + system CPU seconds this process has used so far (Linux `/proc/self/stat`, in
/// clock ticks of 1/100 s); None elsewhere. On a shared machine CPU time per unit of work is
/// steadier than wall time.
pub fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// The conv3d case `channels → channels`, kernel k, on an n³ input (batch 1).
pub fn conv3d_case(channels: usize, k: usize, n: usize) -> Case {
    Case::new(
        format!("conv3d {channels}->{channels} k{k} {n}^3"),
        crate::ops::conv3d::Conv3d::new(k),
        vec![
            vec![1, channels, n, n, n],
            vec![channels, channels, k, k, k],
            vec![channels],
        ],
    )
}

/// Every op's benchmark cases.
pub fn all_cases() -> Vec<Case> {
    use crate::ops;
    [
        ops::matmul::bench_cases(),
        ops::conv3d::bench_cases(),
        ops::conv_transpose3d::bench_cases(),
        ops::attention::bench_cases(),
        ops::norm::bench_cases(),
        ops::batchnorm::bench_cases(),
        ops::softmax::bench_cases(),
        ops::pool3d::bench_cases(),
        ops::resize::bench_cases(),
        ops::concat::bench_cases(),
        ops::elementwise::bench_cases(),
        ops::rope::bench_cases(),
        ops::tokens::bench_cases(),
        ops::fusion::bench_cases(),
        ops::peak::bench_cases(),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// Throughput of the DINOv3 ViT on a backend.
#[derive(Debug, Clone)]
pub struct VitTiming {
    pub label: String,
    pub images_per_s: f64,
    pub gflops: f64,
    /// Process CPU seconds per image (CPU backend, where measurable).
    pub cpu_seconds_per_image: Option<f64>,
    /// Per-op (name, seconds, flops) of one profiled batch.
    pub profile: Vec<(String, f64, u64)>,
}

impl std::fmt::Display for VitTiming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:<44} {:>8.3} images/s {:>8.2} GFLOP/s",
            self.label, self.images_per_s, self.gflops
        )?;
        match self.cpu_seconds_per_image {
            Some(c) => writeln!(f, " {c:>8.3} CPU-s/image")?,
            None => writeln!(f)?,
        }
        let total: f64 = self.profile.iter().map(|p| p.1).sum();
        for (op, s, fl) in &self.profile {
            writeln!(
                f,
                "    {op:<16} {:>9.1} ms {:>5.1}% {:>8.2} GFLOP/s",
                s * 1e3,
                100.0 * s / total.max(1e-12),
                *fl as f64 / s.max(1e-12) / 1e9
            )?;
        }
        Ok(())
    }
}

/// Runs a random-weight ViT of `size` ("s", "l", …) on `batch` images of h×w, after one
/// warm-up batch; `profile` adds a per-op breakdown (GPU).
pub fn vit(
    backend: crate::models::Backend,
    size: &str,
    h: usize,
    w: usize,
    batch: usize,
    iters: usize,
    profile: bool,
) -> Result<VitTiming> {
    use crate::models::{Runner, Vit, VitConfig};
    let vit = Vit::random(VitConfig::preset(size)?, 7)?;
    let images: Vec<f32> = (0..batch * 3 * h * w)
        .map(|i| ((i * 7919) % 255) as f32 / 128.0 - 1.0)
        .collect();
    let mut runner = Runner::new(backend.clone());
    let label = format!(
        "vit-{size}/16 {h}x{w} batch {batch} ({})",
        match &backend {
            crate::models::Backend::Cpu => "cpu".to_string(),
            crate::models::Backend::Gpu(c) => c.info.name.clone(),
        }
    );
    vit.run(&mut runner, &images, batch, h, w, batch)?; // warm-up: JIT, uploads
    let (t0, c0) = (Instant::now(), process_cpu_seconds());
    for _ in 0..iters.max(1) {
        vit.run(&mut runner, &images, batch, h, w, batch)?;
    }
    let secs = t0.elapsed().as_secs_f64() / iters.max(1) as f64;
    let cpu = match &backend {
        crate::models::Backend::Cpu => c0
            .zip(process_cpu_seconds())
            .map(|(a, b)| (b - a) / (iters.max(1) * batch.max(1)) as f64),
        crate::models::Backend::Gpu(_) => None,
    };
    let prof = if profile {
        let key = vit.run_key(&runner.backend, batch, h, w);
        runner.profile(&key, &[&images])?
    } else {
        Vec::new()
    };
    Ok(VitTiming {
        label,
        images_per_s: batch as f64 / secs,
        gflops: vit.flops(h, w) as f64 * batch as f64 / secs / 1e9,
        cpu_seconds_per_image: cpu,
        profile: prof,
    })
}

/// Runs `tools/bench_torch.py ARGS` with the tools venv's Python (or `VOLFUSE_TORCH_PYTHON`)
/// and returns its JSON line; None when torch is not installed here.
pub fn torch_reference(args: &[String]) -> Option<serde_json::Value> {
    tools_python_json("tools/bench_torch.py", args, false)
}

/// Runs the Python script `script` (relative to the crate root) with the tools venv's Python
/// (or `VOLFUSE_TORCH_PYTHON`) and returns the last JSON line it prints; None when that
/// Python is not installed here. `report_failure`: print the script's stderr when it fails.
pub(crate) fn tools_python_json(
    script: &str,
    args: &[String],
    report_failure: bool,
) -> Option<serde_json::Value> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = std::env::var_os("VOLFUSE_TORCH_PYTHON")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("tools/.venv/bin/python"));
    if !python.exists() {
        return None;
    }
    let out = std::process::Command::new(python)
        .arg(root.join(script))
        .args(args)
        .output()
        .ok()?;
    if report_failure && !out.status.success() {
        eprintln!("{script} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
}

/// Runs a random-weight DINOv3UNet3D (base channels `base`, `channels` input features, an
/// n³ tile, with or without context fusion) after one warm-up run; returns (seconds per
/// tile, GFLOP/s, per-op profile). [`unet_cpu_seconds`] has the CPU time of the last call.
pub fn unet(
    backend: crate::models::Backend,
    base: usize,
    channels: usize,
    n: usize,
    context: bool,
    iters: usize,
) -> Result<(f64, f64, Vec<(String, f64, u64)>)> {
    use crate::graph::Graph;
    use crate::models::{Runner, Unet3d, UnetConfig};
    let config = UnetConfig {
        num_classes: 3,
        base_channels: base,
        input_size: [n, n, n],
        input_channels: channels,
        use_context_fusion: context,
        learn_upsampling: false,
        dinov3_slice_size: None,
        output_type: "labels".into(),
    };
    let unet = Unet3d::random(config, 11)?;
    let shape = [1, channels, n, n, n];
    let mut g = Graph::new();
    let f = g.input("features", &shape);
    let c = context.then(|| g.input("context", &shape));
    let y = unet.build(&mut g, f, c)?;
    g.output(y);
    let flops = g.flops();
    let scratch = match &backend {
        crate::models::Backend::Gpu(ctx) => crate::graph::split::scratch_bytes(ctx, &g)?,
        crate::models::Backend::Cpu => 0,
    };
    let data: Vec<f32> = (0..numel(&shape))
        .map(|i| ((i * 7919) % 255) as f32 / 128.0 - 1.0)
        .collect();
    let inputs: Vec<&[f32]> = if context {
        vec![&data, &data]
    } else {
        vec![&data]
    };
    let mut runner = Runner::new(backend);
    runner.run("unet", move || Ok(g), &inputs)?; // warm-up
    let (act, consts) = runner.device_bytes();
    let live = runner.plan("unet").map_or(0, |p| p.live_bytes);
    *UNET_DEVICE_BYTES.lock().unwrap_or_else(|e| e.into_inner()) = [act, consts, scratch, live];
    let (t0, c0) = (Instant::now(), process_cpu_seconds());
    for _ in 0..iters.max(1) {
        runner.run("unet", unreachable_graph, &inputs)?;
    }
    let secs = t0.elapsed().as_secs_f64() / iters.max(1) as f64;
    if let (Some(a), Some(b)) = (c0, process_cpu_seconds()) {
        UNET_CPU_MS.store(
            ((b - a) / iters.max(1) as f64 * 1e3) as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }
    let prof = runner.profile("unet", &inputs)?;
    Ok((secs, flops as f64 / secs / 1e9, prof))
}

static UNET_CPU_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

static UNET_DEVICE_BYTES: std::sync::Mutex<[u64; 4]> = std::sync::Mutex::new([0; 4]);

/// Device bytes of the last [`unet`] run on a GPU: [activations, weights, slab scratch,
/// most activation bytes alive at once ([`crate::graph::Plan::live_bytes`])].
pub fn unet_device_bytes() -> [u64; 4] {
    *UNET_DEVICE_BYTES.lock().unwrap_or_else(|e| e.into_inner())
}

/// Process CPU seconds per tile of the last [`unet`] run (0 where not measurable).
pub fn unet_cpu_seconds() -> f64 {
    UNET_CPU_MS.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1e3
}

fn unreachable_graph() -> Result<crate::graph::Graph> {
    Err(crate::Error::Invalid(
        "the UNet graph was prepared by the warm-up run".into(),
    ))
}
