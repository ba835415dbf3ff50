//! Batch normalisation in eval form over dim 1 of `(N, C, S...)`:
//! `(x − running_mean) / sqrt(running_var + eps) · weight + bias`, as torch `BatchNorm3d`
//! in `eval()`. (Folding it into a preceding convolution is done by the graph.)
//!
//! Inputs: x, weight `[C]`, bias `[C]`, running_mean `[C]`, running_var `[C]`.
//! Output: the shape of x. The kernel lives in `shaders/norm.wgsl`.

use super::{expect_inputs, numel, Op};
use crate::error::{Error, Result};
use crate::gpu::{Dispatch, GpuContext, KernelArgs};

/// The batchnorm op.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchNorm {
    pub eps: f32,
}

impl Default for BatchNorm {
    /// eps = 1e-5, torch's default.
    fn default() -> Self {
        BatchNorm { eps: 1e-5 }
    }
}

/// Sizes of one batchnorm call: x viewed as `[outer, c, inner]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    pub outer: usize,
    pub c: usize,
    pub inner: usize,
}

impl BatchNorm {
    pub fn new(eps: f32) -> Self {
        BatchNorm { eps }
    }

    pub fn dims(&self, inputs: &[&[usize]]) -> Result<Dims> {
        expect_inputs("batchnorm", inputs, 5)?;
        let x = inputs[0];
        if x.len() < 2 {
            return Err(Error::shape(
                "batchnorm",
                format!("input must be (N, C, ...), got {x:?}"),
            ));
        }
        let c = x[1];
        let names = ["weight", "bias", "running_mean", "running_var"];
        for (name, s) in names.iter().zip(&inputs[1..]) {
            if *s != [c] {
                return Err(Error::shape(
                    "batchnorm",
                    format!("{name} must be [{c}] for input {x:?}, got {s:?}"),
                ));
            }
        }
        Ok(Dims {
            outer: x[0],
            c,
            inner: numel(&x[2..]),
        })
    }
}

/// The CPU reference over x viewed as `[outer, c, inner]` (f64 arithmetic).
#[allow(clippy::too_many_arguments)]
pub fn batchnorm(
    x: &[f32],
    weight: &[f32],
    bias: &[f32],
    running_mean: &[f32],
    running_var: &[f32],
    d: Dims,
    eps: f32,
    out: &mut [f32],
) {
    if d.inner == 0 {
        return;
    }
    // Planes (one channel of one batch element) are split across threads.
    crate::ops::par::for_units(out, d.inner, (1 << 15) / d.inner + 1, |p0, planes| {
        let x = &x[p0 * d.inner..];
        for (k, (xp, op)) in x
            .chunks_exact(d.inner)
            .zip(planes.chunks_exact_mut(d.inner))
            .enumerate()
        {
            batchnorm_plane(
                xp,
                weight,
                bias,
                running_mean,
                running_var,
                (p0 + k) % d.c,
                eps,
                op,
            );
        }
    });
}

#[allow(clippy::too_many_arguments)]
fn batchnorm_plane(
    xp: &[f32],
    weight: &[f32],
    bias: &[f32],
    running_mean: &[f32],
    running_var: &[f32],
    c: usize,
    eps: f32,
    op: &mut [f32],
) {
    let mean = running_mean[c] as f64;
    let scale = weight[c] as f64 / (running_var[c] as f64 + eps as f64).sqrt();
    for (o, v) in op.iter_mut().zip(xp) {
        *o = ((*v as f64 - mean) * scale + bias[c] as f64) as f32;
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    inner: u32,
    c: u32,
    eps: f32,
}

impl Op for BatchNorm {
    fn name(&self) -> &'static str {
        "batchnorm"
    }
    fn output_shape(&self, inputs: &[&[usize]]) -> Result<Vec<usize>> {
        self.dims(inputs)?;
        Ok(inputs[0].to_vec())
    }
    fn cpu(&self, inputs: &[&[f32]], shapes: &[&[usize]], out: &mut [f32]) {
        let d = self
            .dims(shapes)
            .expect("shapes were checked when the graph was built");
        batchnorm(
            inputs[0], inputs[1], inputs[2], inputs[3], inputs[4], d, self.eps, out,
        );
    }
    fn gpu(
        &self,
        ctx: &GpuContext,
        inputs: &[&wgpu::Buffer],
        shapes: &[&[usize]],
        out: &wgpu::Buffer,
    ) -> Result<Vec<Dispatch>> {
        let d = self.dims(shapes)?;
        let n = d.outer * d.c * d.inner;
        if n == 0 {
            return Ok(vec![]);
        }
        if n > u32::MAX as usize - 64 {
            return Err(Error::shape(
                "batchnorm",
                format!("{:?} has too many elements for one kernel", shapes[0]),
            ));
        }
        let p = Params {
            n: n as u32,
            inner: d.inner as u32,
            c: d.c as u32,
            eps: self.eps,
        };
        // Consecutive elements per invocation: they must share a channel.
        let g = [16usize, 8, 4, 2, 1]
            .into_iter()
            .find(|g| d.inner % g == 0)
            .unwrap_or(1);
        let shader = super::norm::shader_for(ctx);
        let workgroups = ctx.grid((n.div_ceil(g) as u64).div_ceil(64))?;
        let constants = [("G", g as f64)];
        if ctx.caps.max_storage_buffers_per_stage < 6 {
            // Two passes of at most 4 storage buffers each (downlevel devices).
            let args = |entry, buffers| KernelArgs {
                shader,
                entry,
                constants: &constants,
                buffers,
                params: bytemuck::bytes_of(&p),
                workgroups,
            };
            return Ok(vec![
                ctx.dispatch_bound(
                    args(
                        "batchnorm_normalize",
                        &[inputs[0], out, inputs[3], inputs[4]],
                    ),
                    &[1, 4, 5, 6],
                )?,
                ctx.dispatch_bound(
                    args("batchnorm_affine", &[inputs[1], inputs[2], out]),
                    &[2, 3, 4],
                )?,
            ]);
        }
        Ok(vec![ctx.dispatch(KernelArgs {
            shader,
            entry: "batchnorm",
            constants: &constants,
            buffers: &[inputs[0], inputs[1], inputs[2], out, inputs[3], inputs[4]],
            params: bytemuck::bytes_of(&p),
            workgroups,
        })?])
    }
    fn flops(&self, shapes: &[&[usize]]) -> u64 {
        // subtract, divide, fma per element.
        self.dims(shapes)
            .map(|d| 4 * (d.outer * d.c * d.inner) as u64)
            .unwrap_or(0)
    }
}

/// Benchmark cases for `cargo bench` (keep this function).
pub fn bench_cases() -> Vec<crate::bench::Case> {
    use crate::bench::Case;
    vec![Case::new(
        "batchnorm 1x64x64^3",
        BatchNorm::default(),
        vec![
            vec![1, 64, 64, 64, 64],
            vec![64],
            vec![64],
            vec![64],
            vec![64],
        ],
    )]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{check_op_with, random, rng};

    fn shapes(x: &[usize]) -> Vec<Vec<usize>> {
        let c = x[1];
        let mut s = vec![x.to_vec()];
        s.extend(std::iter::repeat_n(vec![c], 4));
        s
    }

    /// Random inputs with a positive running variance of varied size.
    fn check(x: &[usize], eps: f32) {
        let mut r = rng();
        let s = shapes(x);
        let mut data: Vec<Vec<f32>> = s.iter().map(|sh| random(&mut r, numel(sh))).collect();
        for v in &mut data[4] {
            *v = 0.05 + 2.0 * v.abs();
        }
        check_op_with(&BatchNorm::new(eps), &data, &s, 1e-5);
    }

    #[test]
    fn kernel_matches_reference() {
        for x in [
            vec![1, 1],
            vec![1, 3, 5],
            vec![2, 7, 3, 5, 9],
            vec![1, 16, 17, 16, 15],
            vec![1, 8, 16, 16, 16],
            vec![2, 3, 6, 2],
            vec![3, 65, 1, 1, 1],
            vec![2, 4, 63],
        ] {
            check(&x, 1e-5);
        }
        check(&[1, 5, 4, 4, 4], 1e-3);
    }

    #[test]
    fn reference_uses_running_stats() {
        let d = Dims {
            outer: 1,
            c: 2,
            inner: 2,
        };
        let mut out = vec![0.0; 4];
        batchnorm(
            &[1.0, 3.0, 10.0, 14.0],
            &[2.0, 1.0],
            &[0.0, 1.0],
            &[1.0, 12.0],
            &[4.0, 16.0],
            d,
            0.0,
            &mut out,
        );
        assert_eq!(out, [0.0, 2.0, 0.5, 1.5]);
    }

    #[test]
    fn rejects_bad_shapes() {
        let bn = BatchNorm::default();
        for bad in [
            vec![vec![2, 3, 4], vec![3], vec![3], vec![3], vec![4]],
            vec![vec![3], vec![3], vec![3], vec![3], vec![3]],
            vec![vec![2, 3, 4], vec![3], vec![3, 1], vec![3], vec![3]],
        ] {
            let refs: Vec<&[usize]> = bad.iter().map(|s| s.as_slice()).collect();
            let e = bn.output_shape(&refs).unwrap_err();
            assert!(e.to_string().contains("batchnorm"), "{e}");
        }
        let e = bn.output_shape(&[&[2, 3, 4], &[3]]).unwrap_err();
        assert!(e.to_string().contains("batchnorm"), "{e}");
    }
}
