//! Softmax and argmax: `softmax` over the last dim of `(.., L)` (attention rows);
//! `channel_softmax` over dim 1 of `(N, K, S..)` (class probabilities of a segmentation
//! head) and `channel_argmax` over dim 1, giving `(N, S..)` with the index as f32 (the
//! first maximum wins, like `torch.argmax`). All subtract the maximum before `exp`.

use super::pool3d::check_u32;
use super::{expect_inputs, numel, Op};
use crate::error::{Error, Result};
use crate::gpu::{Dispatch, GpuContext, KernelArgs};
use crate::shaders::SOFTMAX;

/// Rows per workgroup of `softmax` (one per lane).
const ROWS_PER_WORKGROUP: u64 = 64;
/// Voxels per workgroup of the channel ops: 64 lanes × 4 (see `shaders/softmax.wgsl`).
const VOXELS_PER_WORKGROUP: u64 = 256;
/// `channel_softmax` keeps up to this many channels in registers (`MAXK` in the shader).
const MAX_CACHED_K: usize = 32;

/// Softmax over the last dim.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Softmax;

/// Softmax over dim 1 of `(N, K, S..)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ChannelSoftmax;

/// Argmax over dim 1 of `(N, K, S..)` → `(N, S..)`, indices as f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ChannelArgmax;

/// Numerically stable softmax of one strided row `x[a + k·stride]`, `k < len`.
fn softmax_strided(x: &[f32], out: &mut [f32], a: usize, len: usize, stride: usize) {
    let m = (0..len)
        .map(|k| x[a + k * stride])
        .fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = (0..len)
        .map(|k| ((x[a + k * stride] - m) as f64).exp())
        .sum();
    let inv = 1.0 / sum;
    for k in 0..len {
        out[a + k * stride] = (((x[a + k * stride] - m) as f64).exp() * inv) as f32;
    }
}

/// CPU reference: softmax over rows of length `len` (`x.len() / len` rows).
pub fn softmax(x: &[f32], len: usize, out: &mut [f32]) {
    if len == 0 {
        return;
    }
    for r in 0..x.len() / len {
        softmax_strided(x, out, r * len, len, 1);
    }
}

/// CPU reference: softmax over dim 1 of `(n, k, s)`.
pub fn channel_softmax(x: &[f32], n: usize, k: usize, s: usize, out: &mut [f32]) {
    for l in 0..n {
        for v in 0..s {
            softmax_strided(x, out, l * k * s + v, k, s);
        }
    }
}

/// CPU reference: index of the first maximum over dim 1 of `(n, k, s)`, as f32.
pub fn channel_argmax(x: &[f32], n: usize, k: usize, s: usize, out: &mut [f32]) {
    for l in 0..n {
        for v in 0..s {
            let a = l * k * s + v;
            let mut best = 0;
            for c in 1..k {
                if x[a + c * s] > x[a + best * s] {
                    best = c;
                }
            }
            out[l * s + v] = best as f32;
        }
    }
}

/// (N, K, S) of a channel op's input, K ≥ 1.
fn channel_dims(op: &str, inputs: &[&[usize]]) -> Result<(usize, usize, usize)> {
    expect_inputs(op, inputs, 1)?;
    let x = inputs[0];
    if x.len() < 2 || x[1] == 0 {
        return Err(Error::shape(
            op,
            format!("input must be (N, K, ..) with K ≥ 1, got {x:?}"),
        ));
    }
    Ok((x[0], x[1], numel(&x[2..])))
}

fn params(n: usize, len: usize, s: usize) -> [u32; 4] {
    [n as u32, len as u32, s as u32, 0]
}

impl Softmax {
    /// (rows, len) of the input.
    fn dims(&self, inputs: &[&[usize]]) -> Result<(usize, usize)> {
        expect_inputs("softmax", inputs, 1)?;
        let x = inputs[0];
        match x.last() {
            Some(&len) if len > 0 => Ok((numel(x) / len, len)),
            _ => Err(Error::shape(
                "softmax",
                format!("input needs a non-empty last dim, got {x:?}"),
            )),
        }
    }
}

impl Op for Softmax {
    fn name(&self) -> &'static str {
        "softmax"
    }
    fn output_shape(&self, inputs: &[&[usize]]) -> Result<Vec<usize>> {
        self.dims(inputs)?;
        Ok(inputs[0].to_vec())
    }
    fn cpu(&self, inputs: &[&[f32]], shapes: &[&[usize]], out: &mut [f32]) {
        let (_, len) = self
            .dims(shapes)
            .expect("shapes were checked when the graph was built");
        softmax(inputs[0], len, out);
    }
    fn gpu(
        &self,
        ctx: &GpuContext,
        inputs: &[&wgpu::Buffer],
        shapes: &[&[usize]],
        out: &wgpu::Buffer,
    ) -> Result<Vec<Dispatch>> {
        let (rows, len) = self.dims(shapes)?;
        check_u32(self.name(), rows * len)?;
        Ok(vec![ctx.dispatch(KernelArgs {
            shader: &SOFTMAX,
            entry: self.name(),
            constants: &[],
            buffers: &[inputs[0], out],
            params: bytemuck::cast_slice(&params(rows, len, 1)),
            workgroups: ctx.grid((rows as u64).div_ceil(ROWS_PER_WORKGROUP))?,
        })?])
    }
    fn flops(&self, shapes: &[&[usize]]) -> u64 {
        // max, subtract, exp, add, subtract, exp, scale: counted as 5 per element.
        self.dims(shapes)
            .map(|(r, l)| 5 * (r * l) as u64)
            .unwrap_or(0)
    }
}

impl Op for ChannelSoftmax {
    fn name(&self) -> &'static str {
        "channel_softmax"
    }
    fn output_shape(&self, inputs: &[&[usize]]) -> Result<Vec<usize>> {
        channel_dims(self.name(), inputs)?;
        Ok(inputs[0].to_vec())
    }
    fn cpu(&self, inputs: &[&[f32]], shapes: &[&[usize]], out: &mut [f32]) {
        let (n, k, s) = channel_dims(self.name(), shapes)
            .expect("shapes were checked when the graph was built");
        channel_softmax(inputs[0], n, k, s, out);
    }
    fn gpu(
        &self,
        ctx: &GpuContext,
        inputs: &[&wgpu::Buffer],
        shapes: &[&[usize]],
        out: &wgpu::Buffer,
    ) -> Result<Vec<Dispatch>> {
        let (n, k, s) = channel_dims(self.name(), shapes)?;
        check_u32(self.name(), n * k * s)?;
        // K up to MAX_CACHED_K gets a pipeline specialised to it (values kept in registers).
        let kc = if k <= MAX_CACHED_K { k } else { 0 };
        Ok(vec![ctx.dispatch(KernelArgs {
            shader: &SOFTMAX,
            entry: self.name(),
            constants: &[("KC", kc as f64)],
            buffers: &[inputs[0], out],
            params: bytemuck::cast_slice(&params(n * s, k, s.max(1))),
            workgroups: ctx.grid(((n * s) as u64).div_ceil(VOXELS_PER_WORKGROUP))?,
        })?])
    }
    fn flops(&self, shapes: &[&[usize]]) -> u64 {
        channel_dims(self.name(), shapes)
            .map(|(n, k, s)| 5 * (n * k * s) as u64)
            .unwrap_or(0)
    }
}

impl Op for ChannelArgmax {
    fn name(&self) -> &'static str {
        "channel_argmax"
    }
    fn output_shape(&self, inputs: &[&[usize]]) -> Result<Vec<usize>> {
        channel_dims(self.name(), inputs)?;
        let mut s = inputs[0].to_vec();
        s.remove(1);
        Ok(s)
    }
    fn cpu(&self, inputs: &[&[f32]], shapes: &[&[usize]], out: &mut [f32]) {
        let (n, k, s) = channel_dims(self.name(), shapes)
            .expect("shapes were checked when the graph was built");
        channel_argmax(inputs[0], n, k, s, out);
    }
    fn gpu(
        &self,
        ctx: &GpuContext,
        inputs: &[&wgpu::Buffer],
        shapes: &[&[usize]],
        out: &wgpu::Buffer,
    ) -> Result<Vec<Dispatch>> {
        let (n, k, s) = channel_dims(self.name(), shapes)?;
        check_u32(self.name(), n * k * s)?;
        Ok(vec![ctx.dispatch(KernelArgs {
            shader: &SOFTMAX,
            entry: self.name(),
            constants: &[],
            buffers: &[inputs[0], out],
            params: bytemuck::cast_slice(&params(n * s, k, s.max(1))),
            workgroups: ctx.grid(((n * s) as u64).div_ceil(VOXELS_PER_WORKGROUP))?,
        })?])
    }
}

/// Benchmark cases for `cargo bench` (keep this function).
pub fn bench_cases() -> Vec<crate::bench::Case> {
    use crate::bench::Case;
    vec![
        Case::new(
            "channel_softmax (1,4,128,128,128)",
            ChannelSoftmax,
            vec![vec![1, 4, 128, 128, 128]],
        ),
        Case::new(
            "channel_argmax (1,4,128,128,128)",
            ChannelArgmax,
            vec![vec![1, 4, 128, 128, 128]],
        ),
        Case::new(
            "softmax (6,1024,1024) rows",
            Softmax,
            vec![vec![6, 1024, 1024]],
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::run_cpu;
    use crate::ops::run_gpu;
    use crate::ops::testing::{check_op, check_op_with, ctx, random, rng, POISON};

    #[test]
    fn softmax_kernel_matches_reference() {
        for shape in [
            vec![1],
            vec![7],
            vec![5, 7, 9],
            vec![3, 64, 65],
            vec![130, 3],
            vec![2, 4, 1025],
        ] {
            check_op(&Softmax, &[shape], 1e-5);
        }
    }

    #[test]
    fn channel_softmax_kernel_matches_reference() {
        for shape in [
            vec![1, 1],
            vec![1, 1, 1, 1, 1],
            vec![2, 3],
            vec![2, 5, 7, 9],
            vec![3, 4, 64, 65],
            vec![1, 19, 5, 7, 9],
            vec![2, 2, 1, 1, 131],
            vec![1, 32, 3, 67],
            vec![2, 33, 5, 3],
            vec![1, 70, 9],
        ] {
            check_op(&ChannelSoftmax, &[shape], 1e-5);
        }
    }

    #[test]
    fn kernels_are_stable_for_large_logits() {
        // Rows rising to +-3000: exp without the max subtracted would overflow, and the
        // running max of the online softmax is rescaled many times.
        let mut r = rng();
        for (op, shape) in [
            (&Softmax as &dyn Op, vec![7, 300]),
            (&ChannelSoftmax, vec![2, 5, 77]),
            (&ChannelSoftmax, vec![1, 40, 9]),
        ] {
            let x: Vec<f32> = random(&mut r, numel(&shape))
                .iter()
                .enumerate()
                .map(|(i, v)| v * 100.0 + (i % 300) as f32 * 10.0 - 1500.0)
                .collect();
            check_op_with(op, &[x], &[shape], 1e-5);
        }
    }

    #[test]
    fn channel_argmax_kernel_matches_exactly() {
        let mut r = rng();
        for shape in [
            vec![1, 2],
            vec![1, 1, 1, 1, 1],
            vec![2, 5, 7, 9],
            vec![3, 4, 64, 65],
            vec![1, 19, 5, 7, 9],
            vec![4, 3, 1, 1, 33],
        ] {
            let x = random(&mut r, numel(&shape));
            let (want, _) = run_cpu(&ChannelArgmax, &[(&x, &shape)]).unwrap();
            let (got, _) = run_gpu(ctx(), &ChannelArgmax, &[(&x, &shape)], Some(POISON)).unwrap();
            // Poisoned (unwritten) elements are NaN, which `as i64` would turn into 0.
            assert!(
                got.iter().all(|v| v.is_finite() && v.fract() == 0.0),
                "{got:?}"
            );
            let want: Vec<i64> = want.iter().map(|v| *v as i64).collect();
            let got: Vec<i64> = got.iter().map(|v| *v as i64).collect();
            assert_eq!(got, want, "{shape:?}");
        }
    }

    #[test]
    fn reference_is_softmax() {
        let x = [1.0f32, 2.0, 3.0, 1000.0, 1000.0, 1000.0];
        let (o, _) = run_cpu(&Softmax, &[(&x, &[2, 3])]).unwrap();
        let e: Vec<f64> = [1.0f64, 2.0, 3.0].iter().map(|v| v.exp()).collect();
        let z: f64 = e.iter().sum();
        for i in 0..3 {
            assert!((o[i] as f64 - e[i] / z).abs() < 1e-7);
            // Large logits do not overflow: max is subtracted first.
            assert!((o[3 + i] - 1.0 / 3.0).abs() < 1e-7);
        }
        // Channel softmax of (1, 2, 2) equals softmax of its transpose.
        let c = [0.0f32, 5.0, 1.0, -5.0];
        let (o, _) = run_cpu(&ChannelSoftmax, &[(&c, &[1, 2, 2])]).unwrap();
        let (t, _) = run_cpu(&Softmax, &[(&[0.0, 1.0, 5.0, -5.0], &[2, 2])]).unwrap();
        assert_eq!(o, vec![t[0], t[2], t[1], t[3]]);
        // First maximum wins.
        let a = [1.0f32, 3.0, 3.0, 2.0, 3.0, 1.0];
        let (o, s) = run_cpu(&ChannelArgmax, &[(&a, &[1, 3, 2])]).unwrap();
        assert_eq!(s, vec![1, 2]);
        assert_eq!(o, vec![1.0, 0.0]);
    }

    #[test]
    fn rejects_bad_shapes() {
        let e = Softmax.output_shape(&[&[3, 0]]).unwrap_err();
        assert!(e.to_string().contains("softmax"), "{e}");
        let e = Softmax.output_shape(&[&[]]).unwrap_err();
        assert!(e.to_string().contains("softmax"), "{e}");
        let e = ChannelSoftmax.output_shape(&[&[4]]).unwrap_err();
        assert!(e.to_string().contains("channel_softmax"), "{e}");
        let e = ChannelArgmax.output_shape(&[&[2, 0, 3]]).unwrap_err();
        assert!(e.to_string().contains("channel_argmax"), "{e}");
        let e = ChannelArgmax.output_shape(&[&[2, 3], &[2, 3]]).unwrap_err();
        assert!(e.to_string().contains("channel_argmax"), "{e}");
        assert_eq!(
            ChannelArgmax.output_shape(&[&[2, 4, 5, 6]]).unwrap(),
            vec![2, 5, 6]
        );
    }
}
