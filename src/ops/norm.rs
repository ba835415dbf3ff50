//! Layer normalisation over the last dimension, as torch `LayerNorm`: biased variance,
//! eps inside the square root, then the affine `weight`/`bias`.
//!
//! Inputs: x `[.., D]`, weight `[D]`, bias `[D]`. Output: the shape of x.
//!
//! Kernels (`shaders/norm.wgsl`): `layernorm`, one invocation per row (portable), and
//! `layernorm_sg` for CPU-like devices with subgroups of at least 8 lanes, which fetches
//! each element once, through the context's scratch texture, into registers (D a
//! multiple of 32, at most 4096).

use super::{expect_inputs, numel, Op};
use crate::error::{Error, Result};
use crate::gpu::{Dispatch, GpuContext, KernelArgs};
use crate::shaders::{Shader, NORM, NORM_F16};

/// The largest D of `layernorm_sg` (8 lanes × 128 vec4 chunks).
const SG_MAX_D: usize = 4096;

/// The layernorm op.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayerNorm {
    pub eps: f32,
    /// f16 activations (`Precision::F16Act`): the output is stored as packed halves
    /// (`layernorm_sg_o16`: subgroup devices, D % 32 == 0, D ≤ 4096); the CPU reference
    /// rounds it to f16.
    pub out_f16: bool,
}

impl Default for LayerNorm {
    /// eps = 1e-5, torch's default and DINOv3's `layer_norm_eps`.
    fn default() -> Self {
        LayerNorm {
            eps: 1e-5,
            out_f16: false,
        }
    }
}

impl LayerNorm {
    pub fn new(eps: f32) -> Self {
        LayerNorm {
            eps,
            out_f16: false,
        }
    }

    /// (rows, D) of the input, after checking the shapes.
    pub fn dims(&self, inputs: &[&[usize]]) -> Result<(usize, usize)> {
        expect_inputs("layernorm", inputs, 3)?;
        let x = inputs[0];
        let Some(&d) = x.last() else {
            return Err(Error::shape("layernorm", "input must be at least 1-D"));
        };
        if d == 0 {
            return Err(Error::shape(
                "layernorm",
                format!("cannot normalise over an empty last dim: {x:?}"),
            ));
        }
        for (name, s) in [("weight", inputs[1]), ("bias", inputs[2])] {
            if s != [d] {
                return Err(Error::shape(
                    "layernorm",
                    format!("{name} must be [{d}] for input {x:?}, got {s:?}"),
                ));
            }
        }
        Ok((numel(&x[..x.len() - 1]), d))
    }
}

/// The CPU reference: each row of `d` values of `x` is normalised with its mean and biased
/// variance (two passes, f64), then scaled by `weight` and shifted by `bias`.
/// Rows are split across threads.
pub fn layernorm(x: &[f32], weight: &[f32], bias: &[f32], d: usize, eps: f32, out: &mut [f32]) {
    if d == 0 {
        return;
    }
    super::par::for_units(out, d, 64, |r0, rows| {
        layernorm_rows(&x[r0 * d..], weight, bias, d, eps, rows)
    });
}

/// Lanes of the row sums: independent f64 accumulators, so the compiler vectorises them
/// (one sequential sum cannot be reordered).
const LANES: usize = 8;

/// `Σ f(x)` over a row in f64, lane by lane.
#[inline(always)]
fn lane_sum(x: &[f32], f: impl Fn(f64) -> f64) -> f64 {
    let mut lanes = [0f64; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for (l, v) in lanes.iter_mut().zip(c) {
            *l += f(*v as f64);
        }
    }
    let tail: f64 = chunks.remainder().iter().map(|v| f(*v as f64)).sum();
    lanes.iter().sum::<f64>() + tail
}

avx2_too! {
    fn layernorm_rows(x: &[f32], weight: &[f32], bias: &[f32], d: usize, eps: f32, out: &mut [f32]) {
        for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
            // Two passes in f64 (mean, then the centred variance): no cancellation.
            let mean = lane_sum(xr, |v| v) / d as f64;
            let var = lane_sum(xr, |v| (v - mean) * (v - mean)) / d as f64;
            let rstd = 1.0 / (var + eps as f64).sqrt();
            for (((o, v), w), b) in or.iter_mut().zip(xr).zip(weight).zip(bias) {
                *o = ((*v as f64 - mean) * rstd * *w as f64 + *b as f64) as f32;
            }
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    d: u32,
    c: u32,
    eps: f32,
}

/// The norm shader that compiles on this device.
pub(crate) fn shader_for(ctx: &GpuContext) -> &'static Shader {
    if ctx.caps.subgroups {
        &NORM
    } else {
        NORM.portable()
    }
}

/// Whether `layernorm_sg` runs rows of `d` on this device.
fn use_subgroup_kernel(ctx: &GpuContext, d: usize) -> bool {
    ctx.caps.cpu_like
        && ctx.caps.subgroups
        && ctx.caps.min_subgroup_size >= 8
        && d.is_multiple_of(32)
        && d <= SG_MAX_D
}

fn gpu_layernorm(
    ctx: &GpuContext,
    rows: usize,
    d: usize,
    eps: f32,
    subgroup: bool,
    inputs: &[&wgpu::Buffer],
    out: &wgpu::Buffer,
) -> Result<Vec<Dispatch>> {
    if rows == 0 {
        return Ok(vec![]);
    }
    if rows * d > u32::MAX as usize {
        return Err(Error::shape(
            "layernorm",
            format!("{rows}x{d} exceeds 2^32 elements"),
        ));
    }
    let p = Params {
        n: rows as u32,
        d: d as u32,
        c: 0,
        eps,
    };
    if !subgroup {
        return Ok(vec![ctx.dispatch(KernelArgs {
            shader: shader_for(ctx),
            entry: "layernorm",
            constants: &[],
            buffers: &[inputs[0], inputs[1], inputs[2], out],
            params: bytemuck::bytes_of(&p),
            workgroups: ctx.grid((rows as u64).div_ceil(64))?,
        })?]);
    }
    sg_dispatch(ctx, &NORM, "layernorm_sg", rows, d, &p, inputs, out)
}

/// Whether [`LayerNorm::out_f16`] can run on `ctx` for rows of `d`.
pub fn supports_f16_output(ctx: &GpuContext, d: usize) -> bool {
    use_subgroup_kernel(ctx, d)
}

/// `layernorm_sg_o16` (shaders/norm_f16.wgsl): as the subgroup kernel, output packed f16.
fn gpu_layernorm_o16(
    ctx: &GpuContext,
    rows: usize,
    d: usize,
    eps: f32,
    inputs: &[&wgpu::Buffer],
    out: &wgpu::Buffer,
) -> Result<Vec<Dispatch>> {
    if !use_subgroup_kernel(ctx, d) {
        return Err(Error::Gpu(format!(
            "layernorm with an f16 output needs the subgroup kernel (a CPU-like device with \
             subgroups of ≥ 8 lanes, D % 32 == 0, D ≤ {SG_MAX_D}); D = {d} on {}: use \
             --precision f16 or f32",
            ctx.info.name
        )));
    }
    if rows == 0 {
        return Ok(Vec::new());
    }
    let p = Params {
        n: rows as u32,
        d: d as u32,
        c: 0,
        eps,
    };
    sg_dispatch(ctx, &NORM_F16, "layernorm_sg_o16", rows, d, &p, inputs, out)
}

/// The subgroup layernorm kernels' dispatch (`layernorm_sg`, `layernorm_sg_o16`): one
/// subgroup per workgroup walking rows with a grid stride, weight and bias read once per
/// workgroup, so a few hundred workgroups are plenty; x goes through the context's scratch
/// texture, copied in right before the kernel.
#[allow(clippy::too_many_arguments)]
fn sg_dispatch(
    ctx: &GpuContext,
    shader: &'static crate::shaders::Shader,
    entry: &'static str,
    rows: usize,
    d: usize,
    p: &Params,
    inputs: &[&wgpu::Buffer],
    out: &wgpu::Buffer,
) -> Result<Vec<Dispatch>> {
    let (view, copy) = ctx.staged_f32(0, inputs[0], (rows * d / 4) as u64)?;
    let constants = [
        ("DS", d as f64),
        ("TW_LOG2", GpuContext::TEXTURE_WIDTH.trailing_zeros() as f64),
    ];
    let pipeline = ctx.pipeline(shader, entry, &constants)?;
    let params = ctx.uniform(bytemuck::bytes_of(p));
    let entries = [
        (0, params.as_entire_binding()),
        (7, wgpu::BindingResource::TextureView(&view)),
        (8, inputs[1].as_entire_binding()),
        (9, inputs[2].as_entire_binding()),
        (10, out.as_entire_binding()),
    ]
    .map(|(binding, resource)| wgpu::BindGroupEntry { binding, resource });
    let bind_group = ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some(entry),
        layout: &pipeline.get_bind_group_layout(0),
        entries: &entries,
    });
    Ok(vec![Dispatch {
        name: entry,
        before: Vec::new(),
        after: Vec::new(),
        pipeline,
        bind_group,
        workgroups: [rows.min(256) as u32, 1, 1],
        offsets: Vec::new(),
        copies: vec![copy],
    }])
}

impl Op for LayerNorm {
    fn name(&self) -> &'static str {
        "layernorm"
    }
    fn output_shape(&self, inputs: &[&[usize]]) -> Result<Vec<usize>> {
        self.dims(inputs)?;
        Ok(inputs[0].to_vec())
    }
    fn cpu(&self, inputs: &[&[f32]], shapes: &[&[usize]], out: &mut [f32]) {
        let d = shapes[0].last().copied().unwrap_or(1).max(1);
        layernorm(inputs[0], inputs[1], inputs[2], d, self.eps, out);
        if self.out_f16 {
            out.iter_mut()
                .for_each(|v| *v = half::f16::from_f32(*v).to_f32());
        }
    }
    fn gpu(
        &self,
        ctx: &GpuContext,
        inputs: &[&wgpu::Buffer],
        shapes: &[&[usize]],
        out: &wgpu::Buffer,
    ) -> Result<Vec<Dispatch>> {
        let (rows, d) = self.dims(shapes)?;
        if self.out_f16 {
            return gpu_layernorm_o16(ctx, rows, d, self.eps, inputs, out);
        }
        let sg = use_subgroup_kernel(ctx, d);
        gpu_layernorm(ctx, rows, d, self.eps, sg, inputs, out)
    }
    fn output_f16(&self) -> bool {
        self.out_f16
    }
    fn flops(&self, shapes: &[&[usize]]) -> u64 {
        // subtract+add, square+add, subtract, multiply, fma: ~8 per element.
        self.dims(shapes)
            .map(|(r, d)| 8 * (r * d) as u64)
            .unwrap_or(0)
    }
}

/// Benchmark cases for `cargo bench` (keep this function).
pub fn bench_cases() -> Vec<crate::bench::Case> {
    use crate::bench::Case;
    vec![Case::new(
        "layernorm 6432x384",
        LayerNorm::default(),
        vec![vec![6432, 384], vec![384], vec![384]],
    )]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{check_op, check_op_with, random, rel_err, rng};

    fn shapes(x: &[usize]) -> Vec<Vec<usize>> {
        let d = *x.last().unwrap();
        vec![x.to_vec(), vec![d], vec![d]]
    }

    /// LayerNorm with the kernel forced (`true`: layernorm_sg), to test each one here.
    #[derive(Debug)]
    struct Forced(LayerNorm, bool);

    impl Op for Forced {
        fn name(&self) -> &'static str {
            "layernorm"
        }
        fn output_shape(&self, inputs: &[&[usize]]) -> Result<Vec<usize>> {
            self.0.output_shape(inputs)
        }
        fn cpu(&self, inputs: &[&[f32]], shapes: &[&[usize]], out: &mut [f32]) {
            self.0.cpu(inputs, shapes, out)
        }
        fn gpu(
            &self,
            ctx: &GpuContext,
            inputs: &[&wgpu::Buffer],
            shapes: &[&[usize]],
            out: &wgpu::Buffer,
        ) -> Result<Vec<Dispatch>> {
            let (rows, d) = self.0.dims(shapes)?;
            gpu_layernorm(ctx, rows, d, self.0.eps, self.1, inputs, out)
        }
    }

    /// The subgroup kernel where this device has it.
    fn subgroup_ok() -> bool {
        let c = crate::ops::testing::ctx();
        c.caps.cpu_like && c.caps.subgroups && c.caps.min_subgroup_size >= 8
    }

    #[test]
    fn subgroup_kernel_matches_reference() {
        if !subgroup_ok() {
            return;
        }
        for x in [
            vec![1, 32],
            vec![7, 64],
            vec![201, 384],
            vec![2, 33, 768],
            vec![300, 96],
            vec![3, 4096],
        ] {
            check_op(&Forced(LayerNorm::default(), true), &shapes(&x), 1e-5);
        }
        let mut r = rng();
        let s = shapes(&[67, 384]);
        let mut x = random(&mut r, 67 * 384);
        for v in &mut x {
            *v += 1000.0;
        }
        let data = vec![x, random(&mut r, 384), random(&mut r, 384)];
        check_op_with(&Forced(LayerNorm::default(), true), &data, &s, 1e-5);
    }

    #[test]
    fn kernel_matches_reference() {
        for x in [
            vec![1],
            vec![5],
            vec![3, 5],
            vec![7, 63],
            vec![201, 384],
            vec![2, 65, 384],
            vec![130, 1],
            vec![4, 3, 1024],
        ] {
            check_op(&LayerNorm::default(), &shapes(&x), 1e-5);
            check_op(&Forced(LayerNorm::default(), false), &shapes(&x), 1e-5);
        }
        check_op(&LayerNorm::new(1e-6), &shapes(&[33, 17]), 1e-5);
        check_op(&LayerNorm::new(1e-3), &shapes(&[33, 64]), 1e-5);
    }

    /// A large common offset: a one-pass E[x²]−E[x]² would lose every digit here.
    #[test]
    fn kernel_is_stable_under_offset() {
        let mut r = rng();
        let s = shapes(&[67, 384]);
        let mut x = random(&mut r, 67 * 384);
        for v in &mut x {
            *v += 1000.0;
        }
        let data = vec![x, random(&mut r, 384), random(&mut r, 384)];
        check_op_with(&LayerNorm::default(), &data, &s, 1e-5);
        check_op_with(&Forced(LayerNorm::default(), false), &data, &s, 1e-5);
    }

    /// The reference against the plain definition (sequential f64 sums), random rows of
    /// odd widths, some with a large offset.
    #[test]
    fn reference_matches_definition() {
        let mut r = rng();
        for (rows, d) in [(1, 1), (3, 7), (5, 8), (9, 17), (33, 384), (2, 1031)] {
            for offset in [0.0, 300.0] {
                let x: Vec<f32> = random(&mut r, rows * d)
                    .iter()
                    .map(|v| v + offset)
                    .collect();
                let (w, b) = (random(&mut r, d), random(&mut r, d));
                let mut want = vec![0f32; rows * d];
                for (xr, o) in x.chunks(d).zip(want.chunks_mut(d)) {
                    let mean = xr.iter().map(|v| *v as f64).sum::<f64>() / d as f64;
                    let var = xr.iter().map(|v| (*v as f64 - mean).powi(2)).sum::<f64>() / d as f64;
                    for j in 0..d {
                        let n = (xr[j] as f64 - mean) / (var + 1e-5).sqrt();
                        o[j] = (n * w[j] as f64 + b[j] as f64) as f32;
                    }
                }
                let mut got = vec![f32::NAN; rows * d];
                layernorm(&x, &w, &b, d, 1e-5, &mut got);
                let e = rel_err(&got, &want);
                assert!(e < 1e-6, "{rows}x{d} offset {offset}: {e}");
            }
        }
    }

    #[test]
    fn reference_normalises() {
        let mut r = rng();
        let x = random(&mut r, 4 * 96);
        let (w, b) = (vec![1.0; 96], vec![0.0; 96]);
        let mut out = vec![0.0; x.len()];
        layernorm(&x, &w, &b, 96, 0.0, &mut out);
        for row in out.chunks(96) {
            let mean: f32 = row.iter().sum::<f32>() / 96.0;
            let var: f32 = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / 96.0;
            assert!(
                mean.abs() < 1e-5 && (var - 1.0).abs() < 1e-4,
                "{mean} {var}"
            );
        }
        // Constant rows normalise to the bias.
        let mut o = vec![0.0; 3];
        layernorm(&[2.0; 3], &[1.0; 3], &[0.5, -1.0, 0.0], 3, 1e-5, &mut o);
        assert!(rel_err(&o, &[0.5, -1.0, 0.0]) < 1e-6, "{o:?}");
    }

    #[test]
    fn rejects_bad_shapes() {
        let ln = LayerNorm::default();
        for bad in [
            vec![vec![4, 8], vec![7], vec![8]],
            vec![vec![4, 8], vec![8], vec![8, 1]],
            vec![vec![4, 0], vec![0], vec![0]],
            vec![vec![], vec![1], vec![1]],
        ] {
            let refs: Vec<&[usize]> = bad.iter().map(|s| s.as_slice()).collect();
            let e = ln.output_shape(&refs).unwrap_err();
            assert!(e.to_string().contains("layernorm"), "{e}");
        }
        let e = ln.output_shape(&[&[4, 8], &[8]]).unwrap_err();
        assert!(e.to_string().contains("layernorm"), "{e}");
    }
}
