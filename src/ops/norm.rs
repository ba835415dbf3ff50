//! Layer normalisation over the last dimension, as torch `LayerNorm`: biased variance,
//! eps inside the square root, then the affine `weight`/`bias`.
//!
//! Inputs: x `[.., D]`, weight `[D]`, bias `[D]`. Output: the shape of x.

use super::{expect_inputs, numel, Op};
use crate::error::{Error, Result};
use crate::gpu::{Dispatch, GpuContext, KernelArgs};
use crate::shaders::NORM;

/// The layernorm op.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayerNorm {
    pub eps: f32,
}

impl Default for LayerNorm {
    /// eps = 1e-5, torch's default and DINOv3's `layer_norm_eps`.
    fn default() -> Self {
        LayerNorm { eps: 1e-5 }
    }
}

impl LayerNorm {
    pub fn new(eps: f32) -> Self {
        LayerNorm { eps }
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
pub fn layernorm(x: &[f32], weight: &[f32], bias: &[f32], d: usize, eps: f32, out: &mut [f32]) {
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let mean = xr.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
        let var = xr
            .iter()
            .map(|&v| (v as f64 - mean) * (v as f64 - mean))
            .sum::<f64>()
            / d as f64;
        let rstd = 1.0 / (var + eps as f64).sqrt();
        for (j, o) in or.iter_mut().enumerate() {
            *o = ((xr[j] as f64 - mean) * rstd * weight[j] as f64 + bias[j] as f64) as f32;
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
    }
    fn gpu(
        &self,
        ctx: &GpuContext,
        inputs: &[&wgpu::Buffer],
        shapes: &[&[usize]],
        out: &wgpu::Buffer,
    ) -> Result<Vec<Dispatch>> {
        let (rows, d) = self.dims(shapes)?;
        if rows == 0 {
            return Ok(vec![]);
        }
        if rows * d > u32::MAX as usize {
            return Err(Error::shape(
                "layernorm",
                format!("{:?} has too many elements for one kernel", shapes[0]),
            ));
        }
        let p = Params {
            n: rows as u32,
            d: d as u32,
            c: 0,
            eps: self.eps,
        };
        Ok(vec![ctx.dispatch(KernelArgs {
            shader: &NORM,
            entry: "layernorm",
            constants: &[],
            buffers: &[inputs[0], inputs[1], inputs[2], out],
            params: bytemuck::bytes_of(&p),
            workgroups: ctx.grid((rows as u64).div_ceil(64))?,
        })?])
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
        }
        check_op(&LayerNorm::new(1e-6), &shapes(&[33, 17]), 1e-5);
    }

    /// A large common offset: a one-pass E[x²]−E[x]² would lose every digit here.
    #[test]
    fn kernel_is_stable_under_offset() {
        let mut r = rng();
        let s = shapes(&[67, 384]);
        let mut x = random(&mut r, 67 * 384);
        for v in &mut x {
            *v = 1000.0 + *v;
        }
        let data = vec![x, random(&mut r, 384), random(&mut r, 384)];
        check_op_with(&LayerNorm::default(), &data, &s, 1e-5);
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
            assert!(mean.abs() < 1e-5 && (var - 1.0).abs() < 1e-4, "{mean} {var}");
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
