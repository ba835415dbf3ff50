//! 3-D convolution, PyTorch `nn.Conv3d(C, O, k, padding=k/2)` with k = 1 or 3, stride 1:
//! inputs `[x (N, C, D, H, W), weight (O, C, k, k, k), bias (O)]`, output `(N, O, D, H, W)`,
//! cross-correlation with zero padding. Also the eval-mode BatchNorm fold.
//!
//! GPU: an implicit GEMM (no im2col buffer). Kernels in `shaders/conv3d.wgsl`: `conv3d`
//! (any device: one voxel × 8 channels per invocation) and, on CPU-like devices with
//! subgroups, `conv3d_k3_sg` / `conv3d_k1_sg{32,64}`: a subgroup computes a tile of
//! 8 x × 8 y × 4 z × 16 channels (K = 3) or 64 voxels × 32/64 channels (K = 1) and shares its
//! loads through subgroup broadcasts, because on lavapipe every storage-buffer load is a
//! per-lane scalar loop. `conv3d_k3_sg_tex` is `conv3d_k3_sg` reading x through a texture
//! copy (texel fetches are cheaper still), used when x fills whole rgba32float texels.
//! Those kernels are generated code (see `sg_source` in the tests). [`Conv3dCat`]
//! (`conv3d_cat`, in `cat.rs`) is the conv of a channel concat, its texture filled from the
//! concat's two inputs.

use super::{expect_inputs, Op};
use crate::error::{Error, Result};
use crate::gpu::{Dispatch, GpuContext, KernelArgs, TextureCopy};
use crate::ops::matmul::gemm_strided;
use crate::ops::par;
use crate::shaders::CONV3D;
use std::sync::Arc;

mod cat;
pub use cat::{conv3d_cat, Conv3dCat};

/// The conv3d op: `kernel` is 1 (no padding) or 3 (padding 1); with `relu`, followed by
/// a ReLU (fused into the kernels' store).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv3d {
    pub kernel: usize,
    pub relu: bool,
}

/// Resolved sizes of one conv3d call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvDims {
    pub n: usize,
    pub c: usize,
    pub o: usize,
    pub d: usize,
    pub h: usize,
    pub w: usize,
    pub k: usize,
}

impl ConvDims {
    fn voxels(&self) -> usize {
        self.d * self.h * self.w
    }
}

impl Conv3d {
    pub fn new(kernel: usize) -> Self {
        Conv3d {
            kernel,
            relu: false,
        }
    }

    /// `relu(conv3d(x))` in one op.
    pub fn with_relu(kernel: usize) -> Self {
        Conv3d { kernel, relu: true }
    }

    pub fn dims(&self, inputs: &[&[usize]]) -> Result<ConvDims> {
        let err = |m: String| Error::shape("conv3d", m);
        expect_inputs("conv3d", inputs, 3)?;
        let k = self.kernel;
        if k != 1 && k != 3 {
            return Err(err(format!("kernel size must be 1 or 3, got {k}")));
        }
        let (x, w, b) = (inputs[0], inputs[1], inputs[2]);
        if x.len() != 5 {
            return Err(err(format!("input must be (N, C, D, H, W), got {x:?}")));
        }
        let (o, c) = (w.first().copied().unwrap_or(0), x[1]);
        if w != [o, c, k, k, k] {
            return Err(err(format!(
                "weight must be (O, {c}, {k}, {k}, {k}) for input {x:?}, got {w:?}"
            )));
        }
        if b != [o] {
            return Err(err(format!("bias must be [{o}], got {b:?}")));
        }
        Ok(ConvDims {
            n: x[0],
            c,
            o,
            d: x[2],
            h: x[3],
            w: x[4],
            k,
        })
    }
}

/// Floats of im2col scratch per task of the CPU reference (4 MiB: it stays in cache).
const COL_LIMIT: usize = 1 << 20;

/// The CPU reference. K = 1: one gemm per sample, `W (O×C) · x[n] (C×DHW)`. K = 3:
/// the (z, y) rows of each sample are split into chunks of a few rows; per chunk an im2col
/// block `(C·27) × voxels` (zero padded) is built and multiplied by `W (O × C·27)`; chunks
/// run in parallel, each writing its own voxels of every output channel.
pub fn conv3d(d: ConvDims, x: &[f32], weight: &[f32], bias: &[f32], out: &mut [f32]) {
    conv3d_parts(d, &[(x, d.c)], weight, bias, out);
}

/// [`conv3d`] of the channel concatenation of `parts` (each `(x, channels)`, x being
/// `(N, channels, D, H, W)`; the channels sum to `d.c`) without making the concat: the
/// im2col blocks (K = 3) read each channel from its part, K = 1 adds one gemm per part.
pub(crate) fn conv3d_parts(
    d: ConvDims,
    parts: &[(&[f32], usize)],
    weight: &[f32],
    bias: &[f32],
    out: &mut [f32],
) {
    let ConvDims { n, c, o, k, .. } = d;
    let (w, hw, dhw) = (d.w, d.h * d.w, d.voxels());
    let (kkk, pad) = (k * k * k, (k / 2) as isize);
    let ck = c * kkk;
    assert_eq!(parts.iter().map(|p| p.1).sum::<usize>(), c);
    assert!(parts.iter().all(|(x, pc)| x.len() >= n * pc * dhw));
    assert!(weight.len() >= o * ck && bias.len() >= o);
    assert!(out.len() >= n * o * dhw);
    if dhw == 0 || o == 0 {
        return;
    }
    if k == 1 {
        for ni in 0..n {
            let on = &mut out[ni * o * dhw..(ni + 1) * o * dhw];
            par::for_units(on, dhw, 1, |o0, rows| {
                for (i, row) in rows.chunks_mut(dhw).enumerate() {
                    row.fill(bias[o0 + i]);
                }
            });
            let mut c0 = 0;
            for &(x, pc) in parts {
                let xn = &x[ni * pc * dhw..(ni + 1) * pc * dhw];
                let wp = &weight[c0..];
                gemm_strided((o, dhw, pc), on, dhw, wp, (c, 1), xn, (dhw, 1), true);
                c0 += pc;
            }
        }
        return;
    }
    // Channel ci of sample ni: (part, channel within it).
    let channel = |ni: usize, ci: usize| -> &[f32] {
        let mut ci = ci;
        for &(x, pc) in parts {
            if ci < pc {
                return &x[(ni * pc + ci) * dhw..][..dhw];
            }
            ci -= pc;
        }
        unreachable!("channel counts were checked")
    };
    let rows = d.d * d.h;
    let per = (COL_LIMIT / (ck * w).max(1)).clamp(1, rows);
    let chunks = rows.div_ceil(per);
    let shared = par::SharedOut::new(out);
    for ni in 0..n {
        par::for_each_index_init(
            chunks,
            || (vec![0f32; ck * per * w], vec![0f32; o * per * w]),
            |(col, tmp), ch| {
                let (r0, r1) = (ch * per, ((ch + 1) * per).min(rows));
                let vc = (r1 - r0) * w;
                for ci in 0..c {
                    let xc = channel(ni, ci);
                    for t in 0..kkk {
                        let (kd, kh) = ((t / (k * k)) as isize, ((t / k) % k) as isize);
                        let shift = (t % k) as isize - pad;
                        let crow = &mut col[(ci * kkk + t) * vc..][..vc];
                        for r in r0..r1 {
                            let dst = &mut crow[(r - r0) * w..][..w];
                            let zz = (r / d.h) as isize + kd - pad;
                            let yy = (r % d.h) as isize + kh - pad;
                            if zz < 0 || zz >= d.d as isize || yy < 0 || yy >= d.h as isize {
                                dst.fill(0.0);
                                continue;
                            }
                            let src = &xc[zz as usize * hw + yy as usize * w..][..w];
                            // dst[x] = src[x + shift], zero outside the row.
                            let s = shift.unsigned_abs().min(w);
                            if shift >= 0 {
                                dst[..w - s].copy_from_slice(&src[s..]);
                                dst[w - s..].fill(0.0);
                            } else {
                                dst[s..].copy_from_slice(&src[..w - s]);
                                dst[..s].fill(0.0);
                            }
                        }
                    }
                }
                gemm_strided((o, vc, ck), tmp, vc, weight, (ck, 1), col, (vc, 1), false);
                for oi in 0..o {
                    // SAFETY: chunk `ch` writes only voxels r0·w..r1·w of each channel.
                    let dst = unsafe { shared.slice((ni * o + oi) * dhw + r0 * w, vc) };
                    for (v, t) in dst.iter_mut().zip(&tmp[oi * vc..(oi + 1) * vc]) {
                        *v = t + bias[oi];
                    }
                }
            },
        );
    }
}

/// Folds an eval-mode BatchNorm that follows a conv into the conv's weight and bias:
/// `BN(conv(x)) = conv'(x)` with `w'[o] = w[o]·s[o]`, `b'[o] = (b[o] − mean[o])·s[o] + beta[o]`,
/// `s = gamma / sqrt(var + eps)`. `weight` is `(out_channels, ...)` (the Conv3d layout).
#[allow(clippy::too_many_arguments)]
pub fn fold_batchnorm(
    weight: &mut [f32],
    bias: &mut [f32],
    out_channels: usize,
    gamma: &[f32],
    beta: &[f32],
    running_mean: &[f32],
    running_var: &[f32],
    eps: f32,
) -> Result<()> {
    let oc = out_channels;
    let lens = [
        bias.len(),
        gamma.len(),
        beta.len(),
        running_mean.len(),
        running_var.len(),
    ];
    if lens.iter().any(|&l| l != oc) || oc == 0 || !weight.len().is_multiple_of(oc) {
        return Err(Error::shape(
            "fold_batchnorm",
            format!(
                "{oc} channels: weight has {} values, bias/gamma/beta/mean/var have {lens:?}",
                weight.len()
            ),
        ));
    }
    let per = weight.len() / oc;
    for o in 0..oc {
        let s = (gamma[o] as f64 / (running_var[o] as f64 + eps as f64).sqrt()) as f32;
        for w in &mut weight[o * per..(o + 1) * per] {
            *w *= s;
        }
        bias[o] = ((bias[o] as f64 - running_mean[o] as f64) * s as f64 + beta[o] as f64) as f32;
    }
    Ok(())
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    c: u32,
    o: u32,
    d: u32,
    h: u32,
    w: u32,
    dhw: u32,
    groups: u32,
    tiles_x: u32,
    tiles_y: u32,
    /// 1: ReLU in the store. A value, not a pipeline constant: one pipeline (and one copy
    /// of its compiled code, megabytes on a software adapter) serves both; a select, not a
    /// branch, so lavapipe does not recompile per dispatch (docs/lavapipe.md).
    relu: u32,
    /// The K = 3 subgroup kernels: this dispatch's output slices [z_lo, z_hi) …
    z_lo: u32,
    z_hi: u32,
    /// … from an x that holds `t_dhw` values per (n, c), input slices t_z0 on (a depth
    /// slab in the texture; 0 and dhw for the whole input).
    t_z0: u32,
    t_dhw: u32,
    _pad: [u32; 2],
}

/// Tile of the K = 3 subgroup kernel `conv3d_k3_sg`: rows of y per lane, slices of z,
/// output channels. Per input channel it loads 54 weights and 6 × 13 inputs per lane for
/// 13824 FMAs; measured on lavapipe it beat 16 × 1 × 16, 16 × 1 × 32 and 32 × 1 × 32
/// (whose 1024 accumulators also take about a minute to JIT).
const SG3_TILE: (usize, usize, usize) = (8, 4, 16);
/// Voxels per lane and output-channel counts of the K = 1 subgroup kernels
/// `conv3d_k1_sg{channels}` (chosen like the K = 3 tiles).
const SG1_V: usize = 8;
const SG1_TILES: [usize; 2] = [32, 64];

/// Voxels per sample from which the 64-channel K = 1 tile is used. On lavapipe it is
/// barely faster than two passes of the 32-channel tile below that, but each compiled
/// pipeline of it holds 7–13 MiB and takes 0.1–0.2 s to compile (docs/memory.md), so a
/// UNet whose 64-channel levels are small never compiles it.
pub(crate) const SG64_MIN_VOXELS: usize = 64 * 64 * 64;

/// The widest K = 1 subgroup tile (output channels per workgroup) not above `o`, for
/// `voxels` voxels per sample.
fn k1_tile(o: usize, voxels: usize) -> usize {
    if voxels < SG64_MIN_VOXELS {
        return SG1_TILES[0];
    }
    SG1_TILES
        .iter()
        .copied()
        .rfind(|&to| to <= o)
        .unwrap_or(SG1_TILES[0])
}

/// The `conv3d` family as compiled on a device with subgroups: with the texture kernel's
/// input `xt` read as a read-only storage texture where `GpuContext::storage_x` holds
/// (lavapipe inlines storage-image loads, docs/lavapipe.md). Every subgroup-device conv
/// pipeline takes the same form, so the large module is parsed once.
fn sg_shader(ctx: &GpuContext) -> &'static crate::shaders::Shader {
    if ctx.storage_x() {
        CONV3D.storage_x()
    } else {
        &CONV3D
    }
}

/// Whether the subgroup kernels fit this device (subgroups of at least 8 lanes, CPU-like).
fn use_subgroup_kernel(ctx: &GpuContext) -> bool {
    ctx.caps.cpu_like && ctx.caps.subgroups && ctx.info.subgroup_min_size >= 8
}

/// One input of the K = 3 texture kernel: a `(N, channels, D, H, W)` tensor in `buffer`.
/// The conv's input is the parts concatenated along channels (`conv3d_cat`'s `up` and
/// `skip`; a plain conv has one part).
#[derive(Clone, Copy, Debug)]
pub(crate) struct TexPart<'a> {
    pub buffer: &'a wgpu::Buffer,
    pub channels: usize,
}

/// Most bytes of input the K = 3 texture kernel copies into its scratch texture at once.
/// A larger input goes through in depth slabs (each with its one-slice halo): the texture
/// is as large as the largest slab, so a UNet's full-resolution decoder conv (96 channels
/// × 64³, 96 MiB) needs 15 MiB of texture instead of 96 (docs/memory.md).
pub(crate) const TEX_SLAB_BYTES: u64 = 16 << 20;

/// Output slices per depth slab of the texture kernel for `d` when one slab's input may
/// fill `limit` bytes of texture: the whole depth when it fits, else a multiple of the
/// tile's slices (at least one tile), so slabs never split a workgroup's tile. Slabs need
/// whole texels per (n, c) slice run: H·W % 4 == 0 (else the whole depth).
fn slab_slices(d: &ConvDims, limit: u64) -> usize {
    let rz = SG3_TILE.1;
    let slice = (d.n * d.c * d.h * d.w * 4) as u64;
    if (d.n * d.c * d.voxels() * 4) as u64 <= limit || !(d.h * d.w).is_multiple_of(4) {
        return d.d;
    }
    let fit = (limit / slice.max(1)) as usize;
    (fit.saturating_sub(2) / rz * rz).max(rz).min(d.d)
}

/// `conv3d_k3_sg_tex`: `conv3d_k3_sg` reading x, the channel concat of `parts`, through
/// the scratch texture, one dispatch per depth slab of at most `limit` bytes (see
/// [`slab_slices`]); each dispatch carries the copies that fill the texture with its slab.
/// Bindings 0 params, 2 weight, 3 bias, 4 out, 5 texture. None when x does not fit that
/// copy (runs of whole rgba32float texels, the device's texture size).
#[allow(clippy::too_many_arguments)]
fn tex_dispatches(
    ctx: &GpuContext,
    d: &ConvDims,
    p: &Params,
    parts: &[TexPart<'_>],
    weight: &wgpu::Buffer,
    bias: &wgpu::Buffer,
    out: &wgpu::Buffer,
    relu: bool,
    limit: u64,
    storage_x: bool,
) -> Result<Option<Vec<Dispatch>>> {
    let hw = (d.h * d.w) as u64;
    let dz = d.d as u64;
    let rows = slab_slices(d, limit);
    // (first input slice, slices) of every slab, and its output slices.
    let slabs: Vec<(usize, usize, usize, usize)> = (0..d.d)
        .step_by(rows.max(1))
        .map(|z_lo| {
            let z_hi = (z_lo + rows).min(d.d);
            if rows >= d.d {
                (0, d.d, z_lo, z_hi)
            } else {
                let i0 = z_lo.saturating_sub(1);
                (i0, (z_hi + 1).min(d.d) - i0, z_lo, z_hi)
            }
        })
        .collect();
    // Runs of floats per slab: per sample, per part, the whole (channels, D, H, W) block
    // when the slab is the whole depth, else one run of the slab's slices per channel.
    let runs_of = |(i0, si, _, _): (usize, usize, usize, usize)| -> Vec<(&wgpu::Buffer, u64, u64)> {
        let mut runs = Vec::new();
        for n in 0..d.n as u64 {
            for part in parts {
                let pc = part.channels as u64;
                if si == d.d {
                    runs.push((part.buffer, n * pc * dz * hw * 4, pc * dz * hw));
                } else {
                    for c in 0..pc {
                        let off = ((n * pc + c) * dz + i0 as u64) * hw * 4;
                        runs.push((part.buffer, off, si as u64 * hw));
                    }
                }
            }
        }
        runs
    };
    let width = GpuContext::TEXTURE_WIDTH as u64;
    let mut texels = 0;
    for s in &slabs {
        let runs = runs_of(*s);
        if runs
            .iter()
            .any(|(_, off, n)| !n.is_multiple_of(4) || !off.is_multiple_of(16))
        {
            return Ok(None);
        }
        texels = texels.max(runs.iter().map(|r| r.2).sum::<u64>() / 4);
    }
    if texels == 0 || texels.div_ceil(width) > ctx.caps.max_texture_2d as u64 {
        return Ok(None);
    }
    let entry = "conv3d_k3_sg_tex";
    let texture = ctx.scratch_texture(0, texels)?;
    let view = texture.create_view(&wgpu::TextureViewDescriptor::default());
    // X as a storage texture (sg_shader) or, for tests and devices without, sampled.
    let shader = if storage_x && ctx.storage_x() {
        CONV3D.storage_x()
    } else {
        &CONV3D
    };
    let pipeline = ctx.pipeline(shader, entry, &[("K", 3.0)])?;
    let layout = pipeline.get_bind_group_layout(0);
    fn buffer(binding: u32, b: &wgpu::Buffer) -> wgpu::BindGroupEntry<'_> {
        wgpu::BindGroupEntry {
            binding,
            resource: b.as_entire_binding(),
        }
    }
    let mut out_dispatches = Vec::with_capacity(slabs.len());
    for s in slabs {
        let (i0, si, z_lo, z_hi) = s;
        let p = Params {
            relu: relu as u32,
            z_lo: z_lo as u32,
            z_hi: z_hi as u32,
            t_z0: i0 as u32,
            t_dhw: (si as u64 * hw) as u32,
            ..*p
        };
        let params = ctx.uniform(bytemuck::bytes_of(&p));
        let bind_group = ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(entry),
            layout: &layout,
            entries: &[
                buffer(0, &params),
                buffer(2, weight),
                buffer(3, bias),
                buffer(4, out),
                wgpu::BindGroupEntry {
                    binding: 5,
                    resource: wgpu::BindingResource::TextureView(&view),
                },
            ],
        });
        let mut dst = 0;
        let copies = runs_of(s)
            .into_iter()
            .filter(|r| r.2 > 0)
            .map(|(buf, offset, floats)| {
                let c = TextureCopy {
                    buffer: buf.clone(),
                    texture: texture.clone(),
                    width: GpuContext::TEXTURE_WIDTH,
                    texel_bytes: 16,
                    texels: floats / 4,
                    buffer_offset: offset,
                    dst_texel: dst,
                };
                dst += floats / 4;
                Arc::new(c)
            })
            .collect();
        let blocks = (p.tiles_x * p.tiles_y) as u64 * (z_hi - z_lo).div_ceil(SG3_TILE.1) as u64;
        let [wx, wy, _] = ctx.grid(blocks)?;
        let z = (d.n as u32) * p.groups;
        out_dispatches.push(Dispatch {
            name: entry,
            before: Vec::new(),
            after: Vec::new(),
            pipeline: pipeline.clone(),
            bind_group,
            workgroups: [wx, wy, z],
            offsets: Vec::new(),
            copies,
        });
    }
    Ok(Some(out_dispatches))
}

/// The uniforms of the conv kernels for `d` on this device, and the dispatch's z extent
/// (batch × output-channel groups). Errors when the tensors exceed 2^32 elements or the
/// device's dispatch limit.
fn conv_params(ctx: &GpuContext, d: &ConvDims) -> Result<(Params, u32)> {
    let dhw = d.voxels();
    if (d.n * d.c.max(d.o) * dhw) as u64 >= u32::MAX as u64 {
        return Err(Error::shape(
            "conv3d",
            format!("{d:?} exceeds 2^32 elements per tensor"),
        ));
    }
    let sg = use_subgroup_kernel(ctx);
    let (ry, _, to3) = SG3_TILE;
    let to1 = k1_tile(d.o, dhw);
    let (tiles_x, tiles_y) = (d.w.div_ceil(8), d.h.div_ceil(ry));
    let ot = match (sg, d.k) {
        (false, _) => 8,
        (true, 1) => to1,
        (true, _) => to3,
    };
    let groups = d.o.div_ceil(ot);
    let p = Params {
        c: d.c as u32,
        o: d.o as u32,
        d: d.d as u32,
        h: d.h as u32,
        w: d.w as u32,
        dhw: dhw as u32,
        groups: groups as u32,
        tiles_x: tiles_x as u32,
        tiles_y: tiles_y as u32,
        relu: 0,
        z_lo: 0,
        z_hi: d.d as u32,
        t_z0: 0,
        t_dhw: dhw as u32,
        _pad: [0; 2],
    };
    let z = (d.n * groups) as u32;
    if z > ctx.caps.max_workgroups_per_dim {
        return Err(Error::Gpu(format!(
            "conv3d: {z} batch × channel groups exceed the device's dispatch limit"
        )));
    }
    Ok((p, z))
}

/// The K = 3 texture kernel for x = the channel concat of `parts` (each `(N, Cp, D, H,
/// W)`, the Cp summing to `d.c`), in depth slabs of at most `limit` bytes of texture
/// ([`TEX_SLAB_BYTES`] in the models), or None where that kernel does not apply (no
/// CPU-like subgroups, K = 1, runs not in whole texels, too large for a texture).
/// `storage_x`: read the texture as a storage texture where the device allows
/// (`GpuContext::storage_x`; the models pass that), else sampled.
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv3d_tex_parts(
    ctx: &GpuContext,
    d: ConvDims,
    parts: &[TexPart<'_>],
    weight: &wgpu::Buffer,
    bias: &wgpu::Buffer,
    out: &wgpu::Buffer,
    relu: bool,
    limit: u64,
    storage_x: bool,
) -> Result<Option<Vec<Dispatch>>> {
    if !use_subgroup_kernel(ctx) || d.k != 3 || d.n == 0 || d.o == 0 || d.voxels() == 0 {
        return Ok(None);
    }
    if parts.iter().map(|p| p.channels).sum::<usize>() != d.c {
        return Err(Error::Gpu(format!(
            "conv3d: the texture parts do not hold the input channels of {d:?}"
        )));
    }
    let (p, _) = conv_params(ctx, &d)?;
    tex_dispatches(
        ctx, &d, &p, parts, weight, bias, out, relu, limit, storage_x,
    )
}

fn gpu_conv3d(
    ctx: &GpuContext,
    d: ConvDims,
    inputs: &[&wgpu::Buffer],
    out: &wgpu::Buffer,
    allow_texture: bool,
    relu: bool,
) -> Result<Vec<Dispatch>> {
    let dhw = d.voxels();
    let (p, z) = conv_params(ctx, &d)?;
    if d.n == 0 || d.o == 0 || dhw == 0 {
        return Ok(vec![]);
    }
    let sg = use_subgroup_kernel(ctx);
    let (shader, entry, blocks) = if sg && d.k == 1 {
        let to1 = k1_tile(d.o, dhw);
        let entry = if to1 == 32 {
            "conv3d_k1_sg32"
        } else {
            "conv3d_k1_sg64"
        };
        (sg_shader(ctx), entry, dhw.div_ceil(8 * SG1_V) as u64)
    } else if sg {
        let blocks = (p.tiles_x * p.tiles_y) as usize * d.d.div_ceil(SG3_TILE.1);
        if allow_texture {
            let part = TexPart {
                buffer: inputs[0],
                channels: d.c,
            };
            let (w, b) = (inputs[1], inputs[2]);
            let limit = TEX_SLAB_BYTES;
            let st = ctx.storage_x();
            if let Some(t) = tex_dispatches(ctx, &d, &p, &[part], w, b, out, relu, limit, st)? {
                return Ok(t);
            }
        }
        (sg_shader(ctx), "conv3d_k3_sg", blocks as u64)
    } else if ctx.caps.subgroups {
        (sg_shader(ctx), "conv3d", dhw.div_ceil(64) as u64)
    } else {
        (CONV3D.portable(), "conv3d", dhw.div_ceil(64) as u64)
    };
    let [wx, wy, _] = ctx.grid(blocks)?;
    Ok(vec![ctx.dispatch(KernelArgs {
        shader,
        entry,
        constants: &[("K", d.k as f64)],
        buffers: &[inputs[0], inputs[1], inputs[2], out],
        params: bytemuck::bytes_of(&Params {
            relu: relu as u32,
            ..p
        }),
        workgroups: [wx, wy, z],
    })?])
}

/// The context gate `out = raw + (W·raw + b)·σ(gate)` of `ops::fusion` as the K = 1
/// subgroup kernel with a gated epilogue (`context_gate_k1_sg*`): raw (n, c, s), W (c, c),
/// b (c), gate (n, c, s). None where that kernel does not apply (no CPU-like subgroups,
/// fewer than 5 storage buffers per stage, or more than 2^32 elements).
pub(crate) fn context_gate_dispatch(
    ctx: &GpuContext,
    (n, c, s): (usize, usize, usize),
    inputs: [&wgpu::Buffer; 4],
    out: &wgpu::Buffer,
) -> Result<Option<Dispatch>> {
    if !use_subgroup_kernel(ctx)
        || ctx.caps.max_storage_buffers_per_stage < 5
        || (n * c * s) as u64 >= u32::MAX as u64
        || n * c * s == 0
    {
        return Ok(None);
    }
    let to = k1_tile(c, s);
    let groups = c.div_ceil(to);
    let z = (n * groups) as u32;
    if z > ctx.caps.max_workgroups_per_dim {
        return Ok(None);
    }
    let p = Params {
        c: c as u32,
        o: c as u32,
        d: 1,
        h: 1,
        w: s as u32,
        dhw: s as u32,
        groups: groups as u32,
        tiles_x: 0,
        tiles_y: 0,
        relu: 0,
        ..bytemuck::Zeroable::zeroed()
    };
    let entry = if to == 32 {
        "context_gate_k1_sg32"
    } else {
        "context_gate_k1_sg64"
    };
    let [wx, wy, _] = ctx.grid(s.div_ceil(8 * SG1_V) as u64)?;
    let [raw, w, b, gate] = inputs;
    let args = KernelArgs {
        shader: sg_shader(ctx),
        entry,
        constants: &[("K", 1.0)],
        buffers: &[raw, w, b, out, gate],
        params: bytemuck::bytes_of(&p),
        workgroups: [wx, wy, z],
    };
    Ok(Some(ctx.dispatch_bound(args, &[1, 2, 3, 4, 6])?))
}

/// `v = max(v, 0)` over a conv's output (the CPU side of the kernels' fused ReLU).
fn relu_in_place(out: &mut [f32]) {
    par::for_units(out, 1 << 16, 1, |_, v| {
        v.iter_mut().for_each(|v| *v = v.max(0.0))
    });
}

impl Op for Conv3d {
    fn name(&self) -> &'static str {
        "conv3d"
    }
    fn output_shape(&self, inputs: &[&[usize]]) -> Result<Vec<usize>> {
        let d = self.dims(inputs)?;
        Ok(vec![d.n, d.o, d.d, d.h, d.w])
    }
    fn cpu(&self, inputs: &[&[f32]], shapes: &[&[usize]], out: &mut [f32]) {
        let d = self
            .dims(shapes)
            .expect("shapes were checked when the graph was built");
        conv3d(d, inputs[0], inputs[1], inputs[2], out);
        if self.relu {
            relu_in_place(&mut out[..d.n * d.o * d.voxels()]);
        }
    }
    fn gpu(
        &self,
        ctx: &GpuContext,
        inputs: &[&wgpu::Buffer],
        shapes: &[&[usize]],
        out: &wgpu::Buffer,
    ) -> Result<Vec<Dispatch>> {
        let d = self.dims(shapes)?;
        gpu_conv3d(ctx, d, inputs, out, true, self.relu)
    }
    fn flops(&self, shapes: &[&[usize]]) -> u64 {
        self.dims(shapes)
            .map(|d| 2 * (d.n * d.o * d.voxels() * d.c * d.k * d.k * d.k) as u64)
            .unwrap_or(0)
    }
    fn depth_rule(&self, shapes: &[&[usize]]) -> Option<super::DepthRule> {
        self.dims(shapes).ok()?;
        let map = super::DepthMap::Same {
            halo: self.kernel / 2,
        };
        Some(super::DepthRule::first(1, 3, map))
    }
}

/// Benchmark cases for `cargo bench`.
pub fn bench_cases() -> Vec<crate::bench::Case> {
    use crate::bench::Case;
    vec![
        Case::new(
            "conv3d 32->32 k3 64^3",
            Conv3d::new(3),
            vec![vec![1, 32, 64, 64, 64], vec![32, 32, 3, 3, 3], vec![32]],
        ),
        Case::new(
            "conv3d 384->64 k1 32^3",
            Conv3d::new(1),
            vec![vec![1, 384, 32, 32, 32], vec![64, 384, 1, 1, 1], vec![64]],
        ),
    ]
}

#[cfg(test)]
mod tests;
