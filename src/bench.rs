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
        )
    }
}

/// Runs `case` on the GPU: one warm-up run, then `iters` timed runs (median).
pub fn time_gpu(ctx: &GpuContext, case: &Case, iters: usize) -> Result<Timing> {
    let shapes: Vec<&[usize]> = case.shapes.iter().map(|s| s.as_slice()).collect();
    let out_shape = case.op.output_shape(&shapes)?;
    let inputs = case
        .shapes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let n = numel(s);
            let data: Vec<f32> = (0..n)
                .map(|j| (((j * 7 + i * 13) % 29) as f32 - 14.0) / 29.0)
                .collect();
            ctx.upload(&data, s)
        })
        .collect::<Result<Vec<_>>>()?;
    let out = ctx.empty(&out_shape)?;
    let bufs: Vec<&wgpu::Buffer> = inputs.iter().map(|t| t.buffer.as_ref()).collect();
    let dispatches = case.op.gpu(ctx, &bufs, &shapes, &out.buffer)?;
    ctx.run(&dispatches)?; // warm-up: JIT
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        let t0 = Instant::now();
        ctx.run(&dispatches)?;
        times.push(t0.elapsed().as_secs_f64());
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let seconds = times[times.len() / 2];
    let bytes: usize =
        case.shapes.iter().map(|s| numel(s) * 4).sum::<usize>() + numel(&out_shape) * 4;
    Ok(Timing {
        label: case.label.clone(),
        seconds,
        gflops: case.op.flops(&shapes) as f64 / seconds / 1e9,
        gbytes_per_s: bytes as f64 / seconds / 1e9,
    })
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
    for _ in 0..iters.max(1) {
        let t0 = Instant::now();
        case.op.cpu(&refs, &shapes, &mut out);
        times.push(t0.elapsed().as_secs_f64());
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let seconds = times[times.len() / 2];
    let bytes: usize = case.shapes.iter().map(|s| numel(s) * 4).sum::<usize>() + out.len() * 4;
    Ok(Timing {
        label: case.label.clone(),
        seconds,
        gflops: case.op.flops(&shapes) as f64 / seconds / 1e9,
        gbytes_per_s: bytes as f64 / seconds / 1e9,
    })
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
    ]
    .into_iter()
    .flatten()
    .collect()
}
