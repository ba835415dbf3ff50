//! Token layout ops of the ViT: cutting an image into patch rows, and putting the CLS and
//! register tokens in front of the patch tokens.

use super::{expect_inputs, Op};
use crate::error::{Error, Result};
use crate::gpu::{Dispatch, GpuContext, KernelArgs};
use crate::shaders::TOKENS;

/// (B, C, H, W) → (B, gh·gw, C·ps·ps) with gh = H div ps, gw = W div ps (leftover pixels
/// are ignored, as a stride-ps convolution does). A Linear with the Conv2d weight
/// flattened to (D, C·ps·ps) then equals the patch embedding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Patchify {
    pub patch: usize,
}

/// The CPU reference of [`Patchify`].
pub fn patchify(x: &[f32], b: usize, c: usize, h: usize, w: usize, ps: usize, out: &mut [f32]) {
    let (gh, gw) = (h / ps, w / ps);
    let mut i = 0;
    for bi in 0..b {
        for py in 0..gh {
            for px in 0..gw {
                for ch in 0..c {
                    for ky in 0..ps {
                        for kx in 0..ps {
                            out[i] = x[((bi * c + ch) * h + py * ps + ky) * w + px * ps + kx];
                            i += 1;
                        }
                    }
                }
            }
        }
    }
}

impl Patchify {
    fn dims(&self, inputs: &[&[usize]]) -> Result<[usize; 4]> {
        expect_inputs("patchify", inputs, 1)?;
        let x = inputs[0];
        if x.len() != 4 || self.patch == 0 || x[2] < self.patch || x[3] < self.patch {
            return Err(Error::shape(
                "patchify",
                format!(
                    "input must be (B, C, H, W) with H, W ≥ patch size {}, got {x:?}",
                    self.patch
                ),
            ));
        }
        Ok([x[0], x[1], x[2], x[3]])
    }
}

impl Op for Patchify {
    fn name(&self) -> &'static str {
        "patchify"
    }
    fn output_shape(&self, inputs: &[&[usize]]) -> Result<Vec<usize>> {
        let [b, c, h, w] = self.dims(inputs)?;
        let ps = self.patch;
        Ok(vec![b, (h / ps) * (w / ps), c * ps * ps])
    }
    fn cpu(&self, inputs: &[&[f32]], shapes: &[&[usize]], out: &mut [f32]) {
        let [b, c, h, w] = self
            .dims(shapes)
            .expect("shapes were checked when the graph was built");
        patchify(inputs[0], b, c, h, w, self.patch, out);
    }
    fn gpu(
        &self,
        ctx: &GpuContext,
        inputs: &[&wgpu::Buffer],
        shapes: &[&[usize]],
        out: &wgpu::Buffer,
    ) -> Result<Vec<Dispatch>> {
        let [b, c, h, w] = self.dims(shapes)?;
        let ps = self.patch;
        let n = (b * (h / ps) * (w / ps) * c * ps * ps) as u32;
        let params = [
            n,
            c as u32,
            h as u32,
            w as u32,
            ps as u32,
            (h / ps) as u32,
            (w / ps) as u32,
            0,
        ];
        Ok(vec![ctx.dispatch(KernelArgs {
            shader: &TOKENS,
            entry: "patchify",
            constants: &[],
            buffers: &[inputs[0], out],
            params: bytemuck::cast_slice(&params),
            workgroups: ctx.grid((n as u64).div_ceil(64))?,
        })?])
    }
}

/// Inputs: tokens (B, P, D) and a prefix (Tp, D) shared by the batch → (B, Tp + P, D).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PrependTokens;

/// The CPU reference of [`PrependTokens`].
pub fn prepend_tokens(x: &[f32], prefix: &[f32], b: usize, p: usize, d: usize, out: &mut [f32]) {
    let tp = prefix.len() / d.max(1);
    for bi in 0..b {
        let o = &mut out[bi * (tp + p) * d..(bi + 1) * (tp + p) * d];
        o[..tp * d].copy_from_slice(prefix);
        o[tp * d..].copy_from_slice(&x[bi * p * d..(bi + 1) * p * d]);
    }
}

impl PrependTokens {
    fn dims(&self, inputs: &[&[usize]]) -> Result<[usize; 4]> {
        expect_inputs("prepend_tokens", inputs, 2)?;
        let (x, pre) = (inputs[0], inputs[1]);
        if x.len() != 3 || pre.len() != 2 || pre[1] != x[2] {
            return Err(Error::shape(
                "prepend_tokens",
                format!("tokens must be (B, P, D) and the prefix (Tp, D), got {x:?} and {pre:?}"),
            ));
        }
        Ok([x[0], x[1], x[2], pre[0]])
    }
}

impl Op for PrependTokens {
    fn name(&self) -> &'static str {
        "prepend_tokens"
    }
    fn output_shape(&self, inputs: &[&[usize]]) -> Result<Vec<usize>> {
        let [b, p, d, tp] = self.dims(inputs)?;
        Ok(vec![b, tp + p, d])
    }
    fn cpu(&self, inputs: &[&[f32]], shapes: &[&[usize]], out: &mut [f32]) {
        let [b, p, d, _] = self
            .dims(shapes)
            .expect("shapes were checked when the graph was built");
        prepend_tokens(inputs[0], inputs[1], b, p, d, out);
    }
    fn gpu(
        &self,
        ctx: &GpuContext,
        inputs: &[&wgpu::Buffer],
        shapes: &[&[usize]],
        out: &wgpu::Buffer,
    ) -> Result<Vec<Dispatch>> {
        let [b, p, d, tp] = self.dims(shapes)?;
        let n = (b * (tp + p) * d) as u32;
        let params = [n, tp as u32, p as u32, d as u32, 0, 0, 0, 0];
        Ok(vec![ctx.dispatch(KernelArgs {
            shader: &TOKENS,
            entry: "prepend_tokens",
            constants: &[],
            buffers: &[inputs[0], out, inputs[1]],
            params: bytemuck::cast_slice(&params),
            workgroups: ctx.grid((n as u64).div_ceil(64))?,
        })?])
    }
}

/// Benchmark cases for `cargo bench`.
pub fn bench_cases() -> Vec<crate::bench::Case> {
    use crate::bench::Case;
    vec![Case::new(
        "patchify 32x3x224x224",
        Patchify { patch: 16 },
        vec![vec![32, 3, 224, 224]],
    )]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::check_op;

    #[test]
    fn patchify_matches_reference() {
        for (shape, ps) in [
            (vec![1, 1, 4, 4], 2),
            (vec![2, 3, 32, 48], 16),
            (vec![1, 3, 37, 21], 8),
            (vec![3, 2, 5, 7], 1),
        ] {
            check_op(&Patchify { patch: ps }, &[shape], 0.0);
        }
    }

    #[test]
    fn patchify_order_is_conv_weight_order() {
        // 1 image, 2 channels, 2x2 pixels, patch 2: one patch = [c0 (y,x)..., c1 ...].
        let x: Vec<f32> = (0..8).map(|v| v as f32).collect();
        let mut out = vec![0.0; 8];
        patchify(&x, 1, 2, 2, 2, 2, &mut out);
        assert_eq!(out, x);
    }

    #[test]
    fn prepend_matches_reference() {
        for (b, p, d, tp) in [(1, 1, 1, 1), (2, 4, 64, 5), (3, 17, 33, 2)] {
            check_op(&PrependTokens, &[vec![b, p, d], vec![tp, d]], 0.0);
        }
    }

    #[test]
    fn shape_errors_name_the_op() {
        let e = PrependTokens
            .output_shape(&[&[1, 4, 8], &[5, 7]])
            .unwrap_err();
        assert!(e.to_string().contains("prepend_tokens"), "{e}");
        let e = Patchify { patch: 16 }
            .output_shape(&[&[1, 3, 8, 8]])
            .unwrap_err();
        assert!(e.to_string().contains("patchify"), "{e}");
    }
}
