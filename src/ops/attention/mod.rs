//! Fused multi-head attention without a mask, as torch SDPA on `(B, H, T, hd)` views:
//! per head `softmax(q·kᵀ·scale)·v`, heads concatenated in order.
//!
//! Inputs: q `(B, Tq, H·hd)`, k `(B, Tk, H·hd)`, v `(B, Tk, H·hd)`; head h owns channels
//! `[h·hd, (h+1)·hd)`. Output `(B, Tq, H·hd)`. The kernels stream over keys with an online
//! softmax, so the `Tq×Tk` score matrix is never stored.
//!
//! Kernels (`shaders/attention.wgsl`):
//! - `attention`: portable, one invocation per query row. Used on GPUs.
//! - `attention_sg`: for CPU-like devices with subgroups of at least 8 lanes (lavapipe),
//!   where every storage-buffer load is a slow per-lane loop but texture fetches are vector
//!   gathers. q, k and v are copied into rgba32float textures before the kernel runs (the
//!   dispatches carry the copies); a subgroup of 8 lanes (4 queries each) streams over the
//!   keys, sharing each fetched key row through subgroup broadcasts.

use super::{expect_inputs, Op};
use crate::error::{Error, Result};
use crate::gpu::{Dispatch, GpuContext, KernelArgs, TextureCopy};
use crate::ops::matmul::gemm_strided;
use crate::shaders::ATTENTION;
use std::sync::Arc;

/// The largest head size the GPU kernels handle (ViT-7B's).
pub const MAX_HEAD_DIM: usize = 128;

/// Queries per lane of `attention_sg` (its override `R`, at most 8); a workgroup covers 8·R.
/// 8 is ~5% faster at T = 1029 but compiles twice as long and pads short sequences more.
const SG_QUERIES_PER_LANE: usize = 4;

/// The attention op.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Attention {
    pub heads: usize,
    /// Score scale; `None` means `hd^-0.5`.
    pub scale: Option<f32>,
    /// f16 activations (`Precision::F16Act`): q, k and v are packed halves on the GPU,
    /// read through rgba16float textures (the staged kernel only); the output stays f32.
    /// The CPU reference takes its inputs as they are (already rounded by their producer).
    pub in_f16: bool,
}

/// Resolved sizes of one attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    pub batch: usize,
    pub tq: usize,
    pub tk: usize,
    pub heads: usize,
    pub hd: usize,
}

impl Attention {
    /// `heads` heads with the default scale `hd^-0.5`.
    pub fn new(heads: usize) -> Self {
        Attention {
            heads,
            scale: None,
            in_f16: false,
        }
    }

    /// The scale used for head size `hd`.
    pub fn scale_for(&self, hd: usize) -> f32 {
        self.scale
            .unwrap_or_else(|| (1.0 / (hd as f64).sqrt()) as f32)
    }

    pub fn dims(&self, inputs: &[&[usize]]) -> Result<Dims> {
        let err = |m: String| Error::shape("attention", m);
        expect_inputs("attention", inputs, 3)?;
        let (q, k, v) = (inputs[0], inputs[1], inputs[2]);
        if q.len() != 3 || k.len() != 3 || v.len() != 3 {
            return Err(err(format!(
                "q, k, v must be (B, T, heads·hd), got {q:?}, {k:?}, {v:?}"
            )));
        }
        if k != v {
            return Err(err(format!("k {k:?} and v {v:?} differ")));
        }
        if q[0] != k[0] || q[2] != k[2] {
            return Err(err(format!("q {q:?} and k {k:?} differ in batch or width")));
        }
        if self.heads == 0 || q[2] == 0 || q[2] % self.heads != 0 {
            return Err(err(format!(
                "width {} does not split into {} heads",
                q[2], self.heads
            )));
        }
        if k[1] == 0 {
            return Err(err(format!("needs at least one key, got k {k:?}")));
        }
        Ok(Dims {
            batch: q[0],
            tq: q[1],
            tk: k[1],
            heads: self.heads,
            hd: q[2] / self.heads,
        })
    }
}

/// Most query rows and key rows per block of the CPU reference; a sequence is cut into
/// equal blocks (T = 261 is one block, not 256 + 5).
const CPU_QUERY_BLOCK: usize = 256;
const CPU_KEY_BLOCK: usize = 512;

/// `n` split into the fewest blocks of at most `cap`, as equal as possible: the block size.
fn block_size(n: usize, cap: usize) -> usize {
    n.div_ceil(n.div_ceil(cap.max(1)).max(1)).max(1)
}

/// Lanes of the element-wise loops below: independent accumulators, so the compiler can
/// vectorise the reductions (a sequential `fold` cannot be reordered).
const LANES: usize = 8;

const LOG2E: f32 = std::f32::consts::LOG2_E;
// ln 2 in two parts, so k·LN2_HI is exact for |k| < 2^9.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
// 1.5·2^23: adding it rounds to an integer held in the low mantissa bits.
const ROUND: f32 = 12_582_912.0;

/// `exp(x)` in f32 for the softmax, written so a loop of it auto-vectorises (the libm call
/// does not): `x = k·ln2 + r` with `|r| ≤ ln2/2`, `exp(r)` by Cephes' degree-7 polynomial,
/// times `2^k` built in the exponent bits. Relative error ≤ 2 ulp on `[-87, 88]` (test
/// `fast_exp_matches_exp`); 0 below −87 (where `exp` < 1.7e-38), NaN stays NaN, large
/// inputs clamp at `exp(88)`.
#[inline(always)]
#[allow(clippy::manual_clamp)] // (written out: it vectorises, and NaN passes through)
pub(crate) fn fast_exp(x: f32) -> f32 {
    let xc = if x < -87.0 {
        -87.0
    } else if x > 88.0 {
        88.0
    } else {
        x // NaN too
    };
    let t = xc * LOG2E + ROUND;
    let k = t - ROUND;
    let r = xc - k * LN2_HI - k * LN2_LO;
    if x < -87.0 {
        0.0
    } else {
        exp_reduced(r, t)
    }
}

/// `exp(a + b)` as [`fast_exp`] computes it, for `a + b ≤ 88` given in two parts (`a`
/// large and exact, `b` small): the reduced argument is formed as `(a − k·ln2) + b`,
/// so the rounding of `a + b` itself never reaches the result (one exp where
/// `exp(a)·exp(b)` would take two).
#[inline(always)]
pub(crate) fn exp_sum(a: f32, b: f32) -> f32 {
    let x = a + b;
    let xc = if x < -87.0 { -87.0 } else { x };
    let t = xc * LOG2E + ROUND;
    let k = t - ROUND;
    let r = (a - k * LN2_HI) + b - k * LN2_LO;
    if x < -87.0 {
        0.0
    } else {
        exp_reduced(r, t)
    }
}

/// `e^r · 2^k` for `|r| ≤ ln2/2` and `t = k + ROUND` (the tail of [`fast_exp`]).
#[inline(always)]
#[allow(clippy::excessive_precision)]
fn exp_reduced(r: f32, t: f32) -> f32 {
    // Cephes' degree-7 polynomial 1 + r + r²·Σ cᵢ rⁱ, the sum by Estrin's scheme.
    let fma = f32::mul_add;
    let r2 = r * r;
    let p = fma(
        fma(
            fma(1.987_569_2e-4, r, 1.398_199_9e-3),
            r2,
            fma(8.333_452e-3, r, 4.166_579_6e-2),
        ),
        r2,
        fma(1.666_666_5e-1, r, 5.000_000_1e-1),
    );
    let e = fma(p, r2, r) + 1.0;
    // k as an integer is the low mantissa bits of t: 2^k has exponent bits k + 127.
    let ki = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let two_k = f32::from_bits((ki.wrapping_add(127) << 23) as u32);
    e * two_k
}

avx2_too! {
    /// `max_j row[j]·scale`.
    fn scaled_max(row: &[f32], scale: f32) -> f32 {
        let mut lanes = [f32::NEG_INFINITY; LANES];
        let mut chunks = row.chunks_exact(LANES);
        for c in &mut chunks {
            for (m, s) in lanes.iter_mut().zip(c) {
                *m = m.max(s * scale);
            }
        }
        let tail = chunks.remainder().iter().map(|s| s * scale);
        lanes
            .into_iter()
            .chain(tail)
            .fold(f32::NEG_INFINITY, f32::max)
    }
}

avx2_too! {
    /// `row[j] = exp(row[j]·scale − m)`; returns their sum. Two passes: the exp loop
    /// vectorises on its own, and a separate lane-wise sum keeps it so (one fused loop
    /// with a running sum measured 3.6× slower).
    fn exp_row(row: &mut [f32], scale: f32, m: f32) -> f32 {
        for i in 0..row.len() {
            row[i] = fast_exp(row[i] * scale - m);
        }
        let mut lanes = [0f32; LANES];
        let mut chunks = row.chunks_exact(LANES);
        for c in &mut chunks {
            for (l, s) in lanes.iter_mut().zip(c) {
                *l += s;
            }
        }
        lanes.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
    }
}

/// The CPU reference, streaming like the kernels: for each batch, head and block of query
/// rows, the key blocks in order: scores `S = q·kᵀ·scale` (gemm), an online softmax (row max
/// `m`, row sum `l`; earlier partial results rescaled by `exp(m_old − m_new)`) and
/// `O += exp(S − m)·v` (gemm); finally `O / l`. Never holds more than a query block × key
/// block of scores; (batch, head, query block) tasks run in parallel.
pub fn attention(q: &[f32], k: &[f32], v: &[f32], d: Dims, scale: f32, out: &mut [f32]) {
    attention_blocked(q, k, v, d, scale, out, (CPU_QUERY_BLOCK, CPU_KEY_BLOCK))
}

/// [`attention`] with the largest (query, key) block sizes given (tests force small ones).
fn attention_blocked(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d: Dims,
    scale: f32,
    out: &mut [f32],
    (max_q, max_k): (usize, usize),
) {
    let (w, hd) = (d.heads * d.hd, d.hd);
    assert!(q.len() >= d.batch * d.tq * w && out.len() >= d.batch * d.tq * w);
    assert!(k.len() >= d.batch * d.tk * w && v.len() >= d.batch * d.tk * w);
    if d.tq == 0 || hd == 0 {
        return;
    }
    let bq = block_size(d.tq, max_q);
    let bk = block_size(d.tk, max_k);
    let qblocks = d.tq.div_ceil(bq);
    let shared = crate::ops::par::SharedOut::new(out);
    crate::ops::par::for_each_index_init(
        d.batch * d.heads * qblocks,
        || (vec![0f32; bq * bk], vec![0f32; bq * hd], vec![0f32; 2 * bq]),
        |(scores, acc, stats), task| {
            let (bh, qb) = (task / qblocks, task % qblocks);
            let (b, h) = (bh / d.heads, bh % d.heads);
            let (i0, nq) = (qb * bq, bq.min(d.tq - qb * bq));
            let col = h * hd;
            let (m, l) = stats.split_at_mut(bq);
            let qs = &q[(b * d.tq + i0) * w + col..];
            for j0 in (0..d.tk).step_by(bk) {
                let nk = bk.min(d.tk - j0);
                let first = j0 == 0;
                let ks = &k[(b * d.tk + j0) * w + col..];
                let vs = &v[(b * d.tk + j0) * w + col..];
                // scores[i][j] = q_i · k_j
                gemm_strided((nq, nk, hd), scores, nk, qs, (w, 1), ks, (1, w), false);
                for i in 0..nq {
                    let row = &mut scores[i * nk..(i + 1) * nk];
                    let mx = scaled_max(row, scale);
                    if first {
                        m[i] = mx;
                        l[i] = exp_row(row, scale, mx);
                    } else {
                        let m_new = m[i].max(mx);
                        let corr = (m[i] - m_new).exp();
                        l[i] = l[i] * corr + exp_row(row, scale, m_new);
                        m[i] = m_new;
                        if corr != 1.0 {
                            acc[i * hd..(i + 1) * hd]
                                .iter_mut()
                                .for_each(|a| *a *= corr);
                        }
                    }
                }
                // acc (+)= P · v
                gemm_strided((nq, hd, nk), acc, hd, scores, (nk, 1), vs, (w, 1), !first);
            }
            for i in 0..nq {
                // SAFETY: task (b, h, qb) writes only head h's channels of its query rows.
                let o = unsafe { shared.slice((b * d.tq + i0 + i) * w + col, hd) };
                let inv = 1.0 / l[i];
                for (o, a) in o.iter_mut().zip(&acc[i * hd..(i + 1) * hd]) {
                    *o = a * inv;
                }
            }
        },
    );
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    tq: u32,
    tk: u32,
    heads: u32,
    stride: u32,
    scale: f32,
    w4: u32,
    _pad: [u32; 2],
}

/// Which kernel runs an attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    /// `attention`: one invocation per query.
    Portable,
    /// `attention_sg`: q, k, v copied into textures, subgroup broadcasts; the textures
    /// are read as storage textures where [`GpuContext::storage_x`] holds (lavapipe
    /// inlines those loads; a sampled fetch is a function call) and f32.
    Staged,
    /// `attention_sg` with sampled q, k, v textures everywhere (a test of that form).
    #[cfg(test)]
    StagedSampled,
}

impl Kernel {
    /// The staged kernel where it fits the device and the shapes, else the portable one.
    fn choose(ctx: &GpuContext, d: Dims) -> Kernel {
        let c = &ctx.caps;
        let sg = c.cpu_like && c.subgroups && c.min_subgroup_size >= 8;
        let w4 = d.heads * d.hd / 4;
        let rows = |t: usize| (d.batch * t * w4).div_ceil(GpuContext::TEXTURE_WIDTH as usize);
        let fits = rows(d.tq.max(d.tk)) <= c.max_texture_2d as usize
            && d.tq.div_ceil(8 * SG_QUERIES_PER_LANE) <= c.max_workgroups_per_dim as usize;
        if sg && fits && d.hd.is_multiple_of(4) {
            Kernel::Staged
        } else {
            Kernel::Portable
        }
    }
}

fn gpu_attention(
    ctx: &GpuContext,
    d: Dims,
    scale: f32,
    kernel: Kernel,
    in_f16: bool,
    inputs: &[&wgpu::Buffer],
    out: &wgpu::Buffer,
) -> Result<Vec<Dispatch>> {
    if in_f16 && kernel != Kernel::Staged {
        return Err(Error::Gpu(format!(
            "attention with f16 inputs needs the staged (subgroup, texture) kernel, which \
             {d:?} cannot use on this device: use --precision f16 or f32"
        )));
    }
    if d.hd > MAX_HEAD_DIM {
        return Err(Error::shape(
            "attention",
            format!(
                "head size {} exceeds the kernels' maximum {MAX_HEAD_DIM}",
                d.hd
            ),
        ));
    }
    let w = d.heads * d.hd;
    if d.batch * d.tq.max(d.tk) * w > u32::MAX as usize {
        return Err(Error::shape(
            "attention",
            format!("{d:?} exceeds 2^32 elements per tensor"),
        ));
    }
    if d.batch == 0 || d.tq == 0 {
        return Ok(vec![]);
    }
    let max = ctx.caps.max_workgroups_per_dim as usize;
    if d.heads > max || d.batch > max {
        return Err(Error::Gpu(format!(
            "attention: {} heads × batch {} exceed the device's dispatch limit",
            d.heads, d.batch
        )));
    }
    let p = Params {
        tq: d.tq as u32,
        tk: d.tk as u32,
        heads: d.heads as u32,
        stride: w as u32,
        scale,
        w4: (w / 4) as u32,
        _pad: [0; 2],
    };
    let constants = [("HD", d.hd as f64)];
    match kernel {
        Kernel::Portable => {
            let groups = d.tq.div_ceil(64);
            if groups > max {
                return Err(Error::Gpu(format!(
                    "attention: {} queries exceed the device's dispatch limit",
                    d.tq
                )));
            }
            Ok(vec![ctx.dispatch(KernelArgs {
                shader: ATTENTION.portable(),
                entry: "attention",
                constants: &constants,
                buffers: &[inputs[0], inputs[1], inputs[2], out],
                params: bytemuck::bytes_of(&p),
                workgroups: [groups as u32, d.heads as u32, d.batch as u32],
            })?])
        }
        Kernel::Staged => {
            let storage = ctx.storage_x() && !in_f16;
            staged(ctx, d, &p, storage, in_f16, inputs, out)
        }
        #[cfg(test)]
        Kernel::StagedSampled => staged(ctx, d, &p, false, in_f16, inputs, out),
    }
}

/// The dispatch of `attention_sg`, carrying the copies of q, k and v into scratch
/// textures 0, 1 and 2, read as storage textures if `storage` (rgba32float only).
fn staged(
    ctx: &GpuContext,
    d: Dims,
    p: &Params,
    storage: bool,
    in_f16: bool,
    inputs: &[&wgpu::Buffer],
    out: &wgpu::Buffer,
) -> Result<Vec<Dispatch>> {
    let w4 = p.w4 as u64;
    let texels = [d.tq, d.tk, d.tk].map(|t| (d.batch * t) as u64 * w4);
    let textures = [0, 1, 2]
        .into_iter()
        .map(|slot| {
            if in_f16 {
                ctx.scratch_texture_f16(slot, texels[slot])
            } else {
                ctx.scratch_texture(slot, texels[slot])
            }
        })
        .collect::<Result<Vec<_>>>()?;
    let views: Vec<wgpu::TextureView> = textures
        .iter()
        .map(|t| t.create_view(&Default::default()))
        .collect();
    let constants = [
        ("HD", d.hd as f64),
        ("R", SG_QUERIES_PER_LANE as f64),
        ("TW_LOG2", GpuContext::TEXTURE_WIDTH.trailing_zeros() as f64),
    ];
    let shader = if storage {
        ATTENTION.storage_x()
    } else {
        &ATTENTION
    };
    let pipeline = ctx.pipeline(shader, "attention_sg", &constants)?;
    let params = ctx.uniform(bytemuck::bytes_of(p));
    let entries = [
        (0, params.as_entire_binding()),
        (5, wgpu::BindingResource::TextureView(&views[0])),
        (6, wgpu::BindingResource::TextureView(&views[1])),
        (7, wgpu::BindingResource::TextureView(&views[2])),
        (8, out.as_entire_binding()),
    ]
    .map(|(binding, resource)| wgpu::BindGroupEntry { binding, resource });
    let bind_group = ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some("attention_sg"),
        layout: &pipeline.get_bind_group_layout(0),
        entries: &entries,
    });
    let copies = [0, 1, 2]
        .map(|slot| {
            Arc::new(TextureCopy {
                buffer: inputs[slot].clone(),
                texture: textures[slot].clone(),
                width: GpuContext::TEXTURE_WIDTH,
                texel_bytes: if in_f16 { 8 } else { 16 },
                texels: texels[slot],
                buffer_offset: 0,
                dst_texel: 0,
            })
        })
        .to_vec();
    Ok(vec![Dispatch {
        name: "attention_sg",
        before: Vec::new(),
        after: Vec::new(),
        pipeline,
        bind_group,
        workgroups: [
            d.tq.div_ceil(8 * SG_QUERIES_PER_LANE) as u32,
            d.heads as u32,
            d.batch as u32,
        ],
        offsets: Vec::new(),
        copies,
    }])
}

impl Op for Attention {
    fn name(&self) -> &'static str {
        "attention"
    }
    fn output_shape(&self, inputs: &[&[usize]]) -> Result<Vec<usize>> {
        self.dims(inputs)?;
        Ok(inputs[0].to_vec())
    }
    fn cpu(&self, inputs: &[&[f32]], shapes: &[&[usize]], out: &mut [f32]) {
        let d = self
            .dims(shapes)
            .expect("shapes were checked when the graph was built");
        attention(
            inputs[0],
            inputs[1],
            inputs[2],
            d,
            self.scale_for(d.hd),
            out,
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
        let kernel = Kernel::choose(ctx, d);
        gpu_attention(
            ctx,
            d,
            self.scale_for(d.hd),
            kernel,
            self.in_f16,
            inputs,
            out,
        )
    }
    fn flops(&self, shapes: &[&[usize]]) -> u64 {
        self.dims(shapes)
            .map(|d| 4 * (d.batch * d.heads * d.tq * d.tk * d.hd) as u64)
            .unwrap_or(0)
    }
}

/// Benchmark cases for `cargo bench` (keep this function).
pub fn bench_cases() -> Vec<crate::bench::Case> {
    use crate::bench::Case;
    vec![
        Case::new(
            "attention vit-s 201 b32",
            Attention::new(6),
            vec![vec![32, 201, 384]; 3],
        ),
        Case::new(
            "attention vit-l 1029",
            Attention::new(16),
            vec![vec![1, 1029, 1024]; 3],
        ),
    ]
}

#[cfg(test)]
mod tests;
