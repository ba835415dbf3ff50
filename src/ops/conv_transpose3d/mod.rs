//! Transposed 3-D convolution, PyTorch `nn.ConvTranspose3d(Ci, Co, 4, stride=2, padding=1)`
//! (the learned-upsampling stage): inputs `[x (N, Ci, D, H, W), weight (Ci, Co, 4, 4, 4),
//! bias (Co)]`, output `(N, Co, 2D, 2H, 2W)`; input `i` feeds output `o = 2i − 1 + k`.
//!
//! GPU, gather form: per axis, output `o = 2q + p` sums exactly two taps `t ∈ {0, 1}`,
//! `k = 2t + 1 − p` at input `i = q + p − t`. Kernels in `shaders/conv_transpose3d.wgsl`:
//! `conv_transpose3d` (any device: one output voxel × 8 channels per invocation) and, on
//! CPU-like devices with subgroups, `conv_transpose3d_sg_l` / `_sg_r` (one dispatch per x
//! parity: a subgroup computes 8 x × 16 y × 32 channels of one parity class, reading x
//! through a texture copy and sharing its weight loads through subgroup broadcasts; see
//! conv3d.rs for why). They need x to fill whole rgba32float texels, else the portable
//! kernel runs.

use super::matmul::gemm_strided;
use super::{expect_inputs, par, Op};
use crate::error::{Error, Result};
use crate::gpu::{Dispatch, GpuContext, KernelArgs};
use crate::shaders::CONV_TRANSPOSE3D;

/// The op: ConvTranspose3d with kernel 4, stride 2, padding 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ConvTranspose3d;

/// Resolved sizes: input `(n, ci, d, h, w)`, `co` output channels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TransposeDims {
    pub n: usize,
    pub ci: usize,
    pub co: usize,
    pub d: usize,
    pub h: usize,
    pub w: usize,
}

impl TransposeDims {
    fn voxels(&self) -> usize {
        self.d * self.h * self.w
    }
}

impl ConvTranspose3d {
    pub fn dims(&self, inputs: &[&[usize]]) -> Result<TransposeDims> {
        let err = |m: String| Error::shape("conv_transpose3d", m);
        expect_inputs("conv_transpose3d", inputs, 3)?;
        let (x, w, b) = (inputs[0], inputs[1], inputs[2]);
        if x.len() != 5 {
            return Err(err(format!("input must be (N, C, D, H, W), got {x:?}")));
        }
        let (ci, co) = (x[1], w.get(1).copied().unwrap_or(0));
        if w != [ci, co, 4, 4, 4] {
            return Err(err(format!(
                "weight must be ({ci}, Co, 4, 4, 4) for input {x:?}, got {w:?}"
            )));
        }
        if b != [co] {
            return Err(err(format!("bias must be [{co}], got {b:?}")));
        }
        Ok(TransposeDims {
            n: x[0],
            ci,
            co,
            d: x[2],
            h: x[3],
            w: x[4],
        })
    }
}

/// Floats of the column block of one chunk of input z-planes (32 MiB).
const COL_LIMIT: usize = 8 << 20;

/// The CPU reference, in scatter form: `out[n, co, 2i−1+k] += x[n, ci, i] · w[ci, co, k]`
/// per axis, plus the bias. The products come from one gemm per chunk of input z-planes,
/// `P (Co·64 × voxels) = Wᵀ (Co·64 × Ci) · x (Ci × voxels)`, whose rows are then added
/// into the output at `2i − 1 + k` (col2im; output channels split across threads). The
/// tests check it against the plain loops of the definition.
pub fn conv_transpose3d(
    d: TransposeDims,
    x: &[f32],
    weight: &[f32],
    bias: &[f32],
    out: &mut [f32],
) {
    conv_transpose3d_chunked(d, x, weight, bias, out, COL_LIMIT)
}

fn conv_transpose3d_chunked(
    d: TransposeDims,
    x: &[f32],
    weight: &[f32],
    bias: &[f32],
    out: &mut [f32],
    col_limit: usize,
) {
    let TransposeDims { n, ci, co, .. } = d;
    let (od, oh, ow) = (2 * d.d, 2 * d.h, 2 * d.w);
    let (hw, dhw, ov) = (d.h * d.w, d.voxels(), od * oh * ow);
    assert!(x.len() >= n * ci * dhw && weight.len() >= ci * co * 64);
    assert!(bias.len() >= co && out.len() >= n * co * ov);
    if ov == 0 || co == 0 {
        return;
    }
    let rows = co * 64;
    let planes = (col_limit / (rows * hw).max(1)).clamp(1, d.d);
    let mut p = vec![0f32; rows * planes * hw];
    for ni in 0..n {
        let on = &mut out[ni * co * ov..(ni + 1) * co * ov];
        par::for_units(on, ov, 1, |o0, slab| {
            for (i, ch) in slab.chunks_mut(ov).enumerate() {
                ch.fill(bias[o0 + i]);
            }
        });
        let xn = &x[ni * ci * dhw..(ni + 1) * ci * dhw];
        let mut z0 = 0;
        while z0 < d.d {
            let nz = planes.min(d.d - z0);
            let v = nz * hw;
            // P[(o·64 + k), voxel] = Σ_c w[c, o, k] · x[c, z0·hw + voxel].
            gemm_strided(
                (rows, v, ci),
                &mut p,
                v,
                weight,
                (1, rows),
                &xn[z0 * hw..],
                (dhw, 1),
                false,
            );
            let p = &p[..rows * v];
            par::for_units(on, ov, 1, |o0, slab| {
                for (i, dst) in slab.chunks_mut(ov).enumerate() {
                    let o = o0 + i;
                    for k in 0..64 {
                        let (kz, ky, kx) = (k / 16, (k / 4) % 4, k % 4);
                        let src = &p[(o * 64 + k) * v..][..v];
                        for iz in 0..nz {
                            let Some(oz) = (2 * (z0 + iz) + kz).checked_sub(1).filter(|&t| t < od)
                            else {
                                continue;
                            };
                            for iy in 0..d.h {
                                let Some(oy) = (2 * iy + ky).checked_sub(1).filter(|&t| t < oh)
                                else {
                                    continue;
                                };
                                let row = &mut dst[(oz * oh + oy) * ow..][..ow];
                                let s = &src[(iz * d.h + iy) * d.w..][..d.w];
                                for (ix, pv) in s.iter().enumerate() {
                                    if let Some(ox) =
                                        (2 * ix + kx).checked_sub(1).filter(|&t| t < ow)
                                    {
                                        row[ox] += pv;
                                    }
                                }
                            }
                        }
                    }
                }
            });
            z0 += nz;
        }
    }
}

/// Folds an eval-mode BatchNorm over the output channels into a transposed conv's weight
/// `(in_channels, out_channels, ...)` and bias: `w'[:, o] = w[:, o]·s[o]`,
/// `b'[o] = (b[o] − mean[o])·s[o] + beta[o]`, `s = gamma / sqrt(var + eps)`.
#[allow(clippy::too_many_arguments)]
pub fn fold_batchnorm_transposed(
    weight: &mut [f32],
    bias: &mut [f32],
    in_channels: usize,
    out_channels: usize,
    gamma: &[f32],
    beta: &[f32],
    running_mean: &[f32],
    running_var: &[f32],
    eps: f32,
) -> Result<()> {
    let (ic, oc) = (in_channels, out_channels);
    let lens = [
        bias.len(),
        gamma.len(),
        beta.len(),
        running_mean.len(),
        running_var.len(),
    ];
    if lens.iter().any(|&l| l != oc) || ic * oc == 0 || !weight.len().is_multiple_of(ic * oc) {
        return Err(Error::shape(
            "fold_batchnorm_transposed",
            format!(
                "{ic}→{oc} channels: weight has {} values, bias/gamma/beta/mean/var have {lens:?}",
                weight.len()
            ),
        ));
    }
    let per = weight.len() / (ic * oc);
    let s: Vec<f32> = (0..oc)
        .map(|o| (gamma[o] as f64 / (running_var[o] as f64 + eps as f64).sqrt()) as f32)
        .collect();
    for (i, chunk) in weight.chunks_mut(per).enumerate() {
        let o = i % oc;
        for w in chunk {
            *w *= s[o];
        }
    }
    for o in 0..oc {
        bias[o] = ((bias[o] as f64 - running_mean[o] as f64) * s[o] as f64 + beta[o] as f64) as f32;
    }
    Ok(())
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    ci: u32,
    co: u32,
    d: u32,
    h: u32,
    w: u32,
    dhw: u32,
    groups: u32,
    tiles_x: u32,
    tiles_y: u32,
    px: u32,
    _pad: [u32; 2],
}

/// Tile of the subgroup kernels `conv_transpose3d_sg_{l,r}`: input rows (y) per lane and
/// output channels (32 beat 16 by ~17% per CPU second; one width keeps the JIT at ~25 s).
const SG_RY: usize = 16;
const SG_TO: usize = 32;

fn buffer_entry(binding: u32, b: &wgpu::Buffer) -> wgpu::BindGroupEntry<'_> {
    wgpu::BindGroupEntry {
        binding,
        resource: b.as_entire_binding(),
    }
}

fn gpu_conv_transpose3d(
    ctx: &GpuContext,
    d: TransposeDims,
    inputs: &[&wgpu::Buffer],
    out: &wgpu::Buffer,
) -> Result<Vec<Dispatch>> {
    let dhw = d.voxels();
    if (d.n * d.ci.max(d.co) * dhw * 8) as u64 >= u32::MAX as u64 {
        return Err(Error::shape(
            "conv_transpose3d",
            format!("{d:?} exceeds 2^32 elements per tensor"),
        ));
    }
    if d.n == 0 || d.co == 0 || dhw == 0 {
        return Ok(vec![]);
    }
    let sg = ctx.caps.cpu_like && ctx.caps.subgroups && ctx.info.subgroup_min_size >= 8;
    let numel = (d.n * d.ci * dhw) as u64;
    let texels = numel / 4;
    // The subgroup kernels read x through a texture copy: it must fill whole texels.
    let sg = sg
        && numel.is_multiple_of(4)
        && texels > 0
        && texels.div_ceil(GpuContext::TEXTURE_WIDTH as u64) <= ctx.caps.max_texture_2d as u64;
    let ot = if sg { SG_TO } else { 8 };
    let groups = d.co.div_ceil(ot);
    let (tiles_x, tiles_y) = (d.w.div_ceil(8), d.h.div_ceil(SG_RY));
    let z = (d.n * groups) as u32;
    if z > ctx.caps.max_workgroups_per_dim {
        return Err(Error::Gpu(format!(
            "conv_transpose3d: {z} batch × channel groups exceed the device's dispatch limit"
        )));
    }
    let params = |px: u32| Params {
        ci: d.ci as u32,
        co: d.co as u32,
        d: d.d as u32,
        h: d.h as u32,
        w: d.w as u32,
        dhw: dhw as u32,
        groups: groups as u32,
        tiles_x: tiles_x as u32,
        tiles_y: tiles_y as u32,
        px,
        _pad: [0; 2],
    };
    let buffers = [inputs[0], inputs[1], inputs[2], out];
    if sg {
        // Both parities read x through one texture copy, made before the first.
        let [wx, wy, _] = ctx.grid((tiles_x * tiles_y * d.d * 4) as u64)?;
        let (view, copy) = ctx.staged_f32(0, inputs[0], texels)?;
        let mut out_d = Vec::with_capacity(2);
        for (px, entry) in ["conv_transpose3d_sg_l", "conv_transpose3d_sg_r"]
            .into_iter()
            .enumerate()
        {
            let pipeline = ctx.pipeline(&CONV_TRANSPOSE3D, entry, &[])?;
            let layout = pipeline.get_bind_group_layout(0);
            let params = ctx.uniform(bytemuck::bytes_of(&params(px as u32)));
            let bind_group = ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(entry),
                layout: &layout,
                entries: &[
                    buffer_entry(0, &params),
                    buffer_entry(2, inputs[1]),
                    buffer_entry(3, inputs[2]),
                    buffer_entry(4, out),
                    wgpu::BindGroupEntry {
                        binding: 5,
                        resource: wgpu::BindingResource::TextureView(&view),
                    },
                ],
            });
            out_d.push(Dispatch {
                name: entry,
                before: Vec::new(),
                after: Vec::new(),
                pipeline,
                bind_group,
                workgroups: [wx, wy, z],
                offsets: Vec::new(),
                copies: if px == 0 {
                    vec![copy.clone()]
                } else {
                    Vec::new()
                },
            });
        }
        return Ok(out_d);
    }

    let shader = if ctx.caps.subgroups {
        &CONV_TRANSPOSE3D
    } else {
        CONV_TRANSPOSE3D.portable()
    };
    let [wx, wy, _] = ctx.grid((8 * dhw).div_ceil(64) as u64)?;
    Ok(vec![ctx.dispatch(KernelArgs {
        shader,
        entry: "conv_transpose3d",
        constants: &[],
        buffers: &buffers,
        params: bytemuck::bytes_of(&params(0)),
        workgroups: [wx, wy, z],
    })?])
}

impl Op for ConvTranspose3d {
    fn name(&self) -> &'static str {
        "conv_transpose3d"
    }
    fn output_shape(&self, inputs: &[&[usize]]) -> Result<Vec<usize>> {
        let d = self.dims(inputs)?;
        Ok(vec![d.n, d.co, 2 * d.d, 2 * d.h, 2 * d.w])
    }
    fn cpu(&self, inputs: &[&[f32]], shapes: &[&[usize]], out: &mut [f32]) {
        let d = self
            .dims(shapes)
            .expect("shapes were checked when the graph was built");
        conv_transpose3d(d, inputs[0], inputs[1], inputs[2], out);
    }
    fn gpu(
        &self,
        ctx: &GpuContext,
        inputs: &[&wgpu::Buffer],
        shapes: &[&[usize]],
        out: &wgpu::Buffer,
    ) -> Result<Vec<Dispatch>> {
        let d = self.dims(shapes)?;
        gpu_conv_transpose3d(ctx, d, inputs, out)
    }
    /// 2·N·Ci·Co·64 per input voxel (every output voxel sums 8 taps per input channel).
    fn flops(&self, shapes: &[&[usize]]) -> u64 {
        self.dims(shapes)
            .map(|d| 2 * (d.n * d.ci * d.co * d.voxels()) as u64 * 64)
            .unwrap_or(0)
    }
    fn depth_rule(&self, shapes: &[&[usize]]) -> Option<super::DepthRule> {
        // k4 s2 p1: output row o reads input rows ⌈o/2⌉−1 ..= ⌊(o+1)/2⌋, inside the ×2
        // rule's halo of one input row.
        self.dims(shapes).ok()?;
        Some(super::DepthRule::first(
            1,
            3,
            super::DepthMap::Up { factor: 2 },
        ))
    }
}

/// Benchmark cases for `cargo bench` (keep this function).
pub fn bench_cases() -> Vec<crate::bench::Case> {
    use crate::bench::Case;
    vec![Case::new(
        "conv_transpose3d 32->32 k4s2 32^3->64^3",
        ConvTranspose3d,
        vec![vec![1, 32, 32, 32, 32], vec![32, 32, 4, 4, 4], vec![32]],
    )]
}

#[cfg(test)]
mod tests;
