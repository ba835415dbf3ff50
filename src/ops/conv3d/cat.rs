//! `conv3d_cat`: a conv3d of the channel concatenation of two tensors, without the concat
//! tensor: inputs `[a (N, Ca, D, H, W), b (N, Cb, D, H, W), weight (O, Ca + Cb, k, k, k),
//! bias (O)]`, output `conv3d(cat([a, b], dim=1))` (the UNet decoder's `block(cat[up, skip])`).
//!
//! GPU: where the texture kernel `conv3d_k3_sg_tex` applies (CPU-like devices with
//! subgroups, K = 3, `Ca·D·H·W` and `Cb·D·H·W` multiples of 4), its scratch texture is
//! filled straight from `a` and `b` (per sample: a's run, then b's: the concat's layout),
//! so no concat buffer exists. Elsewhere the concat is copied (buffer to buffer, in the
//! conv's dispatch) into the context's shared scratch buffer ([`GpuContext::scratch_buffer`],
//! outside the executor's buffer plan, one for all such convs) and the plain conv3d runs on
//! it; when that concat would exceed one storage binding, the op runs itself in depth slabs
//! (`graph::split`) small enough for it.

use super::{
    conv3d_parts, conv3d_tex_parts, gpu_conv3d, relu_in_place, Conv3d, ConvDims, TexPart,
    TEX_SLAB_BYTES,
};
use crate::error::{Error, Result};
use crate::gpu::{BufferCopy, Dispatch, GpuContext};
use crate::graph::split;
use crate::ops::{expect_inputs, numel, DepthMap, DepthRule, Op};

/// `conv3d(cat([a, b], dim=1))`, with a ReLU when `relu` (fused into the kernels' store).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv3dCat {
    pub kernel: usize,
    pub relu: bool,
}

impl Conv3dCat {
    pub fn new(kernel: usize) -> Self {
        Conv3dCat {
            kernel,
            relu: false,
        }
    }

    /// `relu(conv3d(cat([a, b])))` in one op.
    pub fn with_relu(kernel: usize) -> Self {
        Conv3dCat { kernel, relu: true }
    }

    /// The conv's sizes (C = Ca + Cb) and (Ca, Cb).
    pub fn dims(&self, inputs: &[&[usize]]) -> Result<(ConvDims, usize, usize)> {
        let err = |m: String| Error::shape("conv3d_cat", m);
        expect_inputs("conv3d_cat", inputs, 4)?;
        let (a, b) = (inputs[0], inputs[1]);
        if a.len() != 5 || b.len() != 5 || a[0] != b[0] || a[2..] != b[2..] {
            return Err(err(format!(
                "inputs must be (N, Ca, D, H, W) and (N, Cb, D, H, W), got {a:?} and {b:?}"
            )));
        }
        let cat = [a[0], a[1] + b[1], a[2], a[3], a[4]];
        let conv = Conv3d::new(self.kernel);
        let d = conv
            .dims(&[&cat, inputs[2], inputs[3]])
            .map_err(|e| err(format!("{e} (the concat of {a:?} and {b:?})")))?;
        Ok((d, a[1], b[1]))
    }
}

/// The CPU reference: the conv3d reference reading its channels from `a` then `b` (its
/// im2col blocks are built from both; no concat tensor), i.e. `conv3d(concat(a, b))` —
/// tested against exactly that.
#[allow(clippy::too_many_arguments)]
pub fn conv3d_cat(
    d: ConvDims,
    (ca, cb): (usize, usize),
    a: &[f32],
    b: &[f32],
    weight: &[f32],
    bias: &[f32],
    out: &mut [f32],
) {
    conv3d_parts(d, &[(a, ca), (b, cb)], weight, bias, out);
}

impl Conv3dCat {
    /// The fallback: concat into a temporary buffer, then the plain conv; in depth slabs
    /// of this op when the concat or the output would exceed `limit` bytes (the device's
    /// storage binding; lower in tests).
    fn gpu_via_concat(
        &self,
        ctx: &GpuContext,
        d: ConvDims,
        inputs: &[&wgpu::Buffer],
        shapes: &[&[usize]],
        out: &wgpu::Buffer,
        limit: u64,
    ) -> Result<Vec<Dispatch>> {
        let cat_shape = [d.n, d.c, d.d, d.h, d.w];
        let out_shape = [d.n, d.o, d.d, d.h, d.w];
        let bytes = |s: &[usize]| numel(s) as u64 * 4;
        if bytes(&cat_shape) > limit || bytes(&out_shape) > limit {
            // Slabs whose a, b and output each take at most half a binding: their
            // concat fits one.
            let whole = ctx.caps.max_binding;
            let plan = split::plan_node(self, shapes, &out_shape, limit / 2, whole)?;
            let scratch = split::Scratch::new(ctx, std::slice::from_ref(&Some(plan.clone())))?;
            return split::dispatches(ctx, self, &plan, inputs, shapes, out, &out_shape, &scratch);
        }
        // The concat: per sample, a's channels then b's, copied into the shared scratch
        // buffer before the conv's dispatch (one dispatch: the pair is never split).
        let (ca, cb) = (shapes[0][1], shapes[1][1]);
        let dhw = (d.d * d.h * d.w) as u64;
        let tmp = ctx.scratch_buffer(bytes(&cat_shape))?;
        let mut before = Vec::with_capacity(2 * d.n);
        for l in 0..d.n as u64 {
            let mut dst = l * (ca + cb) as u64 * dhw * 4;
            for (x, c) in [(inputs[0], ca), (inputs[1], cb)] {
                let run = c as u64 * dhw * 4;
                before.push(BufferCopy {
                    src: x.clone(),
                    src_offset: l * run,
                    dst: tmp.clone(),
                    dst_offset: dst,
                    bytes: run,
                });
                dst += run;
            }
        }
        let mut ds = gpu_conv3d(ctx, d, &[&tmp, inputs[2], inputs[3]], out, true, self.relu)?;
        if let Some(first) = ds.first_mut() {
            before.append(&mut first.before);
            first.before = before;
        }
        Ok(ds)
    }
}

impl Op for Conv3dCat {
    fn name(&self) -> &'static str {
        "conv3d_cat"
    }
    fn output_shape(&self, inputs: &[&[usize]]) -> Result<Vec<usize>> {
        let (d, _, _) = self.dims(inputs)?;
        Ok(vec![d.n, d.o, d.d, d.h, d.w])
    }
    fn cpu(&self, inputs: &[&[f32]], shapes: &[&[usize]], out: &mut [f32]) {
        let (d, ca, cb) = self
            .dims(shapes)
            .expect("shapes were checked when the graph was built");
        conv3d_cat(d, (ca, cb), inputs[0], inputs[1], inputs[2], inputs[3], out);
        if self.relu {
            relu_in_place(&mut out[..d.n * d.o * d.d * d.h * d.w]);
        }
    }
    fn gpu(
        &self,
        ctx: &GpuContext,
        inputs: &[&wgpu::Buffer],
        shapes: &[&[usize]],
        out: &wgpu::Buffer,
    ) -> Result<Vec<Dispatch>> {
        let (d, ca, cb) = self.dims(shapes)?;
        let parts = [
            TexPart {
                buffer: inputs[0],
                channels: ca,
            },
            TexPart {
                buffer: inputs[1],
                channels: cb,
            },
        ];
        let (w, b) = (inputs[2], inputs[3]);
        let (limit, st) = (TEX_SLAB_BYTES, ctx.storage_x());
        match conv3d_tex_parts(ctx, d, &parts, w, b, out, self.relu, limit, st)? {
            Some(ds) => Ok(ds),
            None => self.gpu_via_concat(ctx, d, inputs, shapes, out, ctx.caps.max_binding),
        }
    }
    fn flops(&self, shapes: &[&[usize]]) -> u64 {
        self.dims(shapes)
            .map(|(d, _, _)| 2 * (d.n * d.o * d.d * d.h * d.w * d.c * d.k * d.k * d.k) as u64)
            .unwrap_or(0)
    }
    fn depth_rule(&self, shapes: &[&[usize]]) -> Option<DepthRule> {
        self.dims(shapes).ok()?;
        let map = DepthMap::Same {
            halo: self.kernel / 2,
        };
        Some(DepthRule::first(2, 4, map))
    }
}

#[cfg(test)]
mod tests;
