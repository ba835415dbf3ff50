//! Ops: one file each, holding the shape rule, the CPU reference (a plain function with the
//! op's name), the GPU wrapper (dispatch math + uniforms for the kernel of the same name in
//! `shaders/`) and a randomized test of the kernel against the reference.

use crate::error::Result;
use crate::gpu::{Dispatch, GpuContext};

#[macro_use]
mod multiversion;
pub mod attention;
pub mod batchnorm;
pub mod concat;
pub mod conv3d;
pub mod conv_transpose3d;
pub mod elementwise;
pub mod fusion;
pub mod matmul;
pub mod norm;
pub mod par;
pub mod peak;
pub mod pool3d;
pub mod resize;
pub mod rope;
pub mod softmax;
pub mod tokens;

#[cfg(test)]
mod f16act_tests;
#[cfg(test)]
pub(crate) mod testing;

/// An operation the graph can run on either backend. All tensors are f32, C order.
pub trait Op: Send + Sync + std::fmt::Debug {
    /// The op's name: the same as its shader entry point family and CPU reference function.
    fn name(&self) -> &'static str;
    /// The output shape for these input shapes, or a shape error naming the op.
    fn output_shape(&self, inputs: &[&[usize]]) -> Result<Vec<usize>>;
    /// Runs the CPU reference. `out` has the output shape's size.
    fn cpu(&self, inputs: &[&[f32]], shapes: &[&[usize]], out: &mut [f32]);
    /// Builds the GPU dispatches that compute `out` from `inputs`.
    fn gpu(
        &self,
        ctx: &GpuContext,
        inputs: &[&wgpu::Buffer],
        shapes: &[&[usize]],
        out: &wgpu::Buffer,
    ) -> Result<Vec<Dispatch>>;
    /// Floating-point operations for these shapes (for benchmarks), 0 if not meaningful.
    fn flops(&self, _shapes: &[&[usize]]) -> u64 {
        0
    }
    /// How the op runs in depth slabs when its tensors exceed one storage binding
    /// (`graph::split`); None when it cannot be split that way.
    fn depth_rule(&self, _shapes: &[&[usize]]) -> Option<DepthRule> {
        None
    }
    /// The op as `Any`, for executors that choose variants of particular ops (autotune,
    /// f16 weights); None for ops without variants.
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        None
    }
    /// The GPU stores the output as packed halves (f16 activations): 2 bytes per element
    /// in the executor's buffer plan. The CPU executor keeps f32 (the reference rounds).
    fn output_f16(&self) -> bool {
        false
    }
}

/// How output depth rows depend on input depth rows, the depth axis being the third from
/// last of every sliced tensor (`(.., D, H, W)`; the leading dims are kept whole).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DepthMap {
    /// Same depth; output row `o` reads input rows `o - halo ..= o + halo` (zero padded
    /// at the volume's faces, as the op itself does).
    Same { halo: usize },
    /// Output row `o` reads input rows `f·o .. f·o + f` (pooling with kernel = stride = f).
    Down { factor: usize },
    /// Output depth `f·D`, sampled at `(o + ½)/f − ½` with edge clamping (linear
    /// upsampling by a power of two, align_corners=False).
    Up { factor: usize },
}

/// Which inputs are sliced in depth (the rest — weights, biases — are bound whole) and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DepthRule {
    pub sliced: Vec<bool>,
    pub map: DepthMap,
}

impl DepthRule {
    /// The same map for the first `n` inputs of `total`.
    pub fn first(n: usize, total: usize, map: DepthMap) -> Self {
        DepthRule {
            sliced: (0..total).map(|i| i < n).collect(),
            map,
        }
    }
}

pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// Checks the number of inputs of an op.
pub(crate) fn expect_inputs(op: &str, inputs: &[&[usize]], n: usize) -> Result<()> {
    if inputs.len() != n {
        return Err(crate::Error::shape(
            op,
            format!("expects {n} inputs, got {}", inputs.len()),
        ));
    }
    Ok(())
}

/// Runs one op eagerly on the CPU.
pub fn run_cpu(op: &dyn Op, inputs: &[(&[f32], &[usize])]) -> Result<(Vec<f32>, Vec<usize>)> {
    let shapes: Vec<&[usize]> = inputs.iter().map(|(_, s)| *s).collect();
    let out_shape = op.output_shape(&shapes)?;
    let data: Vec<&[f32]> = inputs.iter().map(|(d, _)| *d).collect();
    let mut out = vec![0.0; numel(&out_shape)];
    op.cpu(&data, &shapes, &mut out);
    Ok((out, out_shape))
}

/// Runs one op eagerly on the GPU (uploads, dispatches, downloads). `poison` fills the
/// output buffer first, so a kernel that skips an element cannot pass a test by luck.
pub fn run_gpu(
    ctx: &GpuContext,
    op: &dyn Op,
    inputs: &[(&[f32], &[usize])],
    poison: Option<f32>,
) -> Result<(Vec<f32>, Vec<usize>)> {
    let shapes: Vec<&[usize]> = inputs.iter().map(|(_, s)| *s).collect();
    let out_shape = op.output_shape(&shapes)?;
    let tensors = inputs
        .iter()
        .map(|(d, s)| ctx.upload(d, s))
        .collect::<Result<Vec<_>>>()?;
    let out = ctx.empty(&out_shape)?;
    if let Some(p) = poison {
        ctx.fill(&out.buffer, p);
    }
    let bufs: Vec<&wgpu::Buffer> = tensors.iter().map(|t| t.buffer.as_ref()).collect();
    let dispatches = op.gpu(ctx, &bufs, &shapes, &out.buffer)?;
    ctx.run(&dispatches)?;
    Ok((ctx.download(&out)?, out_shape))
}
