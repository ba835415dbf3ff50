//! Concatenation along dim 1 (channels) of two or more tensors `(N, Ci, S..)` with the
//! same `N` and trailing dims: `torch.cat([a, b, ..], dim=1)`, e.g. the UNet's
//! `cat[upsampled, skip]`.

use super::pool3d::check_u32;
use super::{numel, Op};
use crate::error::{Error, Result};
use crate::gpu::{Dispatch, GpuContext, KernelArgs};
use crate::shaders::CONCAT;

/// Elements per workgroup: 64 lanes × 4 each (see `shaders/concat.wgsl`).
const PER_WORKGROUP: u64 = 256;

/// Channel concatenation of all inputs, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Concat;

/// Sizes of one concat: leading `n`, per-input channels, trailing elements `s`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CatDims {
    pub n: usize,
    pub channels: Vec<usize>,
    pub s: usize,
}

impl Concat {
    pub fn dims(&self, inputs: &[&[usize]]) -> Result<CatDims> {
        let err = |m: String| Error::shape("concat", m);
        if inputs.len() < 2 {
            return Err(err(format!(
                "expects at least 2 inputs, got {}",
                inputs.len()
            )));
        }
        let first = inputs[0];
        if first.len() < 2 {
            return Err(err(format!(
                "inputs must be at least 2-D (N, C, ..), got {first:?}"
            )));
        }
        for s in &inputs[1..] {
            if s.len() != first.len() || s[0] != first[0] || s[2..] != first[2..] {
                return Err(err(format!("{s:?} and {first:?} differ outside dim 1")));
            }
        }
        Ok(CatDims {
            n: first[0],
            channels: inputs.iter().map(|s| s[1]).collect(),
            s: numel(&first[2..]),
        })
    }
}

/// CPU reference: `out[n, off_i + c, s] = inputs[i][n, c, s]`.
pub fn concat(inputs: &[&[f32]], d: &CatDims, out: &mut [f32]) {
    let total: usize = d.channels.iter().sum::<usize>() * d.s;
    let mut off = 0;
    for (x, c) in inputs.iter().zip(&d.channels) {
        let inner = c * d.s;
        for l in 0..d.n {
            out[l * total + off..][..inner].copy_from_slice(&x[l * inner..][..inner]);
        }
        off += inner;
    }
}

impl Op for Concat {
    fn name(&self) -> &'static str {
        "concat"
    }
    fn output_shape(&self, inputs: &[&[usize]]) -> Result<Vec<usize>> {
        let d = self.dims(inputs)?;
        let mut s = inputs[0].to_vec();
        s[1] = d.channels.iter().sum();
        Ok(s)
    }
    fn cpu(&self, inputs: &[&[f32]], shapes: &[&[usize]], out: &mut [f32]) {
        let d = self
            .dims(shapes)
            .expect("shapes were checked when the graph was built");
        concat(inputs, &d, out);
    }
    fn gpu(
        &self,
        ctx: &GpuContext,
        inputs: &[&wgpu::Buffer],
        shapes: &[&[usize]],
        out: &wgpu::Buffer,
    ) -> Result<Vec<Dispatch>> {
        let d = self.dims(shapes)?;
        let outer = d.channels.iter().sum::<usize>() * d.s;
        check_u32(self.name(), d.n * outer)?;
        let mut dispatches = Vec::with_capacity(inputs.len());
        let mut offset = 0;
        for (x, c) in inputs.iter().zip(&d.channels) {
            let inner = c * d.s;
            let n = d.n * inner;
            if n > 0 {
                let params = [n as u32, inner as u32, outer as u32, offset as u32];
                dispatches.push(ctx.dispatch(KernelArgs {
                    shader: &CONCAT,
                    entry: "concat",
                    constants: &[],
                    buffers: &[x, out],
                    params: bytemuck::cast_slice(&params),
                    workgroups: ctx.grid((n as u64).div_ceil(PER_WORKGROUP))?,
                })?);
            }
            offset += inner;
        }
        Ok(dispatches)
    }
    fn depth_rule(&self, shapes: &[&[usize]]) -> Option<super::DepthRule> {
        self.dims(shapes).ok()?;
        (shapes[0].len() == 5).then(|| {
            super::DepthRule::first(
                shapes.len(),
                shapes.len(),
                super::DepthMap::Same { halo: 0 },
            )
        })
    }
}

/// Benchmark cases for `cargo bench` (keep this function).
pub fn bench_cases() -> Vec<crate::bench::Case> {
    use crate::bench::Case;
    vec![
        Case::new(
            "concat (1,64,64³)+(1,64,64³)",
            Concat,
            vec![vec![1, 64, 64, 64, 64], vec![1, 64, 64, 64, 64]],
        ),
        Case::new(
            "concat (1,256,16³)+(1,128,16³)",
            Concat,
            vec![vec![1, 256, 16, 16, 16], vec![1, 128, 16, 16, 16]],
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::run_cpu;
    use crate::ops::testing::check_op;

    #[test]
    fn kernel_matches_reference() {
        for shapes in [
            vec![vec![1, 1, 1, 1, 1], vec![1, 1, 1, 1, 1]],
            vec![vec![2, 3, 5, 7, 9], vec![2, 1, 5, 7, 9]],
            vec![vec![3, 64, 65], vec![3, 2, 65]],
            vec![vec![5, 1], vec![5, 3], vec![5, 2]],
            vec![vec![7, 2, 3], vec![7, 5, 3], vec![7, 1, 3], vec![7, 4, 3]],
            vec![vec![1, 16, 8, 8, 8], vec![1, 8, 8, 8, 8]],
            vec![vec![2, 0, 4], vec![2, 3, 4]],
        ] {
            check_op(&Concat, &shapes, 0.0);
        }
    }

    #[test]
    fn reference_orders_inputs() {
        let a = [1.0, 2.0, 3.0, 4.0]; // (2, 1, 2)
        let b = [5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0]; // (2, 2, 2)
        let (o, s) = run_cpu(&Concat, &[(&a, &[2, 1, 2]), (&b, &[2, 2, 2])]).unwrap();
        assert_eq!(s, vec![2, 3, 2]);
        assert_eq!(o, vec![1., 2., 5., 6., 7., 8., 3., 4., 9., 10., 11., 12.]);
    }

    #[test]
    fn rejects_bad_shapes() {
        for shapes in [
            &[&[1, 2, 3][..]][..],
            &[&[1, 2, 3], &[2, 2, 3]],
            &[&[1, 2, 3], &[1, 2, 4]],
            &[&[1, 2, 3], &[1, 2]],
            &[&[4], &[4]],
        ] {
            let e = Concat.output_shape(shapes).unwrap_err();
            assert!(e.to_string().contains("concat"), "{e}");
        }
    }
}
