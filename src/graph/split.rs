//! Ops on tensors larger than the device's largest storage binding (lavapipe: 128 MiB; a
//! 32-channel 128³ activation is 256 MiB).
//!
//! Such a tensor lives in one buffer (up to the device's max buffer size) that no kernel
//! binds whole. An op touching one runs in depth slabs: for output rows `[o0, o1)` the
//! input rows it needs (its [`DepthRule`]: a halo of 1 for a 3×3×3 conv, twice the rows for
//! pooling, half plus a halo for ×2 upsampling) are copied into scratch buffers with
//! `copy_buffer_to_buffer` (a memcpy; one copy per leading index, since depth is the third
//! from last axis), the op's unchanged kernels run on the slab, and the rows of the slab's
//! output that are exact (not touched by the slab's own zero padding or edge clamping) are
//! copied back. Every slab computes each output row exactly as the whole tensor would, so
//! the result matches the unsplit op bit for bit in the op's arithmetic; ops whose tensors
//! fit keep their fast path untouched. Weights and biases are bound whole.
//!
//! A node is split when one of its activations exceeds `caps.split_binding` (the binding
//! limit, unless [`crate::gpu::GpuOptions::split_binding`] lowers it so tests split small
//! tensors) or when one of its buffers — a liveness slot shared with a large tensor —
//! exceeds the binding limit.

use super::{Graph, Source};
use crate::error::{Error, Result};
use crate::gpu::{BufferCopy, Dispatch, GpuContext};
use crate::ops::{numel, DepthMap, DepthRule, Op};
use std::sync::Arc;

/// One depth slab: global output rows `[o0, o1)` from input rows `[i0, i1)`; the slab op
/// makes `out_rows` rows, of which row `crop` is global row `o0`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slab {
    pub o0: usize,
    pub o1: usize,
    pub i0: usize,
    pub i1: usize,
    pub crop: usize,
    pub out_rows: usize,
}

/// The slab for output rows `[o0, o1)` under `map` (input depth `d_in`).
pub fn slab(map: DepthMap, d_in: usize, o0: usize, o1: usize) -> Slab {
    match map {
        DepthMap::Same { halo } => {
            let i0 = o0.saturating_sub(halo);
            let i1 = (o1 + halo).min(d_in);
            Slab {
                o0,
                o1,
                i0,
                i1,
                crop: o0 - i0,
                out_rows: i1 - i0,
            }
        }
        DepthMap::Down { factor } => Slab {
            o0,
            o1,
            i0: factor * o0,
            i1: (factor * o1).min(d_in),
            crop: 0,
            out_rows: o1 - o0,
        },
        DepthMap::Up { factor } => {
            // One input row of halo each side keeps the slab's edge clamping out of the
            // rows we keep (o0 is a multiple of the factor).
            let i0 = (o0 / factor).saturating_sub(1);
            let i1 = (o1.div_ceil(factor) + 1).min(d_in);
            Slab {
                o0,
                o1,
                i0,
                i1,
                crop: o0 - factor * i0,
                out_rows: factor * (i1 - i0),
            }
        }
    }
}

/// Depth slabs of at most `rows` output rows each.
pub fn slabs(map: DepthMap, d_in: usize, d_out: usize, rows: usize) -> Vec<Slab> {
    (0..d_out)
        .step_by(rows.max(1))
        .map(|o0| slab(map, d_in, o0, (o0 + rows).min(d_out)))
        .collect()
}

/// Whether `map` relates these depths (the rule's precondition).
fn consistent(map: DepthMap, d_in: usize, d_out: usize) -> bool {
    match map {
        DepthMap::Same { .. } => d_in == d_out,
        DepthMap::Down { factor } => factor > 0 && d_out == d_in / factor,
        DepthMap::Up { factor } => factor > 0 && d_out == d_in * factor,
    }
}

/// (leading elements, depth, plane elements) of a `(.., D, H, W)` tensor.
fn geometry(shape: &[usize]) -> (usize, usize, usize) {
    let n = shape.len();
    (
        numel(&shape[..n - 3]),
        shape[n - 3],
        shape[n - 2] * shape[n - 1],
    )
}

fn with_depth(shape: &[usize], d: usize) -> Vec<usize> {
    let mut s = shape.to_vec();
    let n = s.len();
    s[n - 3] = d;
    s
}

/// How one node runs in slabs.
#[derive(Clone, Debug)]
pub struct NodeSplit {
    pub rule: DepthRule,
    pub slabs: Vec<Slab>,
    /// Largest slab bytes of each input (0 for inputs bound whole) and of the output.
    pub in_bytes: Vec<u64>,
    pub out_bytes: u64,
}

/// Plans the slabs of `op` so every slab tensor fits `limit` bytes, with as many output
/// rows per slab as fit; operands bound whole must fit `whole_limit`. Errors when the op
/// has no depth rule or one row is too large.
pub fn plan_node(
    op: &dyn Op,
    shapes: &[&[usize]],
    out_shape: &[usize],
    limit: u64,
    whole_limit: u64,
) -> Result<NodeSplit> {
    let too_large = |bytes: u64, why: &str| {
        Error::Invalid(format!(
        "{}: a tensor of {bytes} bytes exceeds the largest storage binding ({limit} bytes) and {why}.\n  fix: use a smaller tile, or --backend cpu",
        op.name()
    ))
    };
    let biggest = shapes
        .iter()
        .map(|s| numel(s) as u64 * 4)
        .chain([numel(out_shape) as u64 * 4])
        .max()
        .unwrap_or(0);
    let rule = op
        .depth_rule(shapes)
        .ok_or_else(|| too_large(biggest, "this op cannot run in depth slabs"))?;
    if out_shape.len() < 3 || rule.sliced.len() != shapes.len() {
        return Err(too_large(biggest, "this op cannot run in depth slabs"));
    }
    let (_, d_out, _) = geometry(out_shape);
    let mut d_in = None;
    for (s, sliced) in shapes.iter().zip(&rule.sliced) {
        if *sliced {
            if s.len() < 3 || d_in.is_some_and(|d| d != s[s.len() - 3]) {
                return Err(too_large(biggest, "its inputs differ in depth"));
            }
            d_in = Some(s[s.len() - 3]);
        } else if numel(s) as u64 * 4 > whole_limit {
            return Err(too_large(
                numel(s) as u64 * 4,
                "it is an operand bound whole",
            ));
        }
    }
    let d_in = d_in.ok_or_else(|| too_large(biggest, "no input is sliced"))?;
    if !consistent(rule.map, d_in, d_out) {
        return Err(too_large(biggest, "its depths do not follow its slab rule"));
    }
    let row_bytes = |s: &[usize]| {
        let (lead, _, plane) = geometry(s);
        (lead * plane) as u64 * 4
    };
    let out_row = row_bytes(out_shape);
    let step = match rule.map {
        DepthMap::Up { factor } => factor,
        _ => 1,
    };
    for rows in (1..=d_out).rev() {
        if rows < d_out && rows % step != 0 {
            continue;
        }
        let sl = slabs(rule.map, d_in, d_out, rows);
        let mut in_bytes = vec![0u64; shapes.len()];
        let mut out_bytes = 0u64;
        for s in &sl {
            for (k, (shape, sliced)) in shapes.iter().zip(&rule.sliced).enumerate() {
                if *sliced {
                    in_bytes[k] = in_bytes[k].max(row_bytes(shape) * (s.i1 - s.i0) as u64);
                }
            }
            out_bytes = out_bytes.max(out_row * s.out_rows as u64);
        }
        if out_bytes <= limit && in_bytes.iter().all(|b| *b <= limit) {
            return Ok(NodeSplit {
                rule,
                slabs: sl,
                in_bytes,
                out_bytes,
            });
        }
    }
    Err(too_large(
        biggest,
        "even one depth row of it does not fit (split by channels is not implemented)",
    ))
}

/// Scratch buffers the slabs are copied through: one per input position and one output,
/// each as large as the largest slab any split node puts there.
pub struct Scratch {
    pub inputs: Vec<Arc<wgpu::Buffer>>,
    pub output: Option<Arc<wgpu::Buffer>>,
}

impl Scratch {
    /// Bytes of each input scratch buffer and of the output one that `splits` need.
    pub fn sizes(splits: &[Option<NodeSplit>]) -> (Vec<u64>, u64) {
        let mut inb: Vec<u64> = Vec::new();
        let mut outb = 0u64;
        for s in splits.iter().flatten() {
            if inb.len() < s.in_bytes.len() {
                inb.resize(s.in_bytes.len(), 0);
            }
            for (a, b) in inb.iter_mut().zip(&s.in_bytes) {
                *a = (*a).max(*b);
            }
            outb = outb.max(s.out_bytes);
        }
        (inb, outb)
    }

    /// Allocates what `splits` need.
    pub fn new(ctx: &GpuContext, splits: &[Option<NodeSplit>]) -> Result<Self> {
        let (inb, outb) = Self::sizes(splits);
        let inputs = inb
            .iter()
            .enumerate()
            .map(|(k, b)| {
                ctx.storage_buffer(&format!("slab scratch {k}"), (*b).max(4))
                    .map(Arc::new)
            })
            .collect::<Result<Vec<_>>>()?;
        let output = if outb > 0 {
            Some(Arc::new(ctx.storage_buffer("slab scratch out", outb)?))
        } else {
            None
        };
        Ok(Scratch { inputs, output })
    }

    /// Device bytes held.
    pub fn bytes(&self) -> u64 {
        self.inputs
            .iter()
            .chain(self.output.iter())
            .map(|b| b.size())
            .sum()
    }
}

/// Decides which nodes of `g` run in slabs: those with an activation over
/// `caps.split_binding` or a buffer over the binding limit.
pub fn plan_graph(
    ctx: &GpuContext,
    g: &Graph,
    value_buf: &[Option<Arc<wgpu::Buffer>>],
) -> Result<Vec<Option<NodeSplit>>> {
    let limit = ctx.caps.split_binding;
    let device_limit = ctx.caps.max_binding;
    g.nodes
        .iter()
        .map(|n| {
            let vals = n.inputs.iter().chain([&n.output]);
            let big = vals.clone().any(|v| {
                let info = &g.values[v.0];
                let buf = value_buf[v.0].as_ref().map(|b| b.size()).unwrap_or(0);
                let konst = matches!(info.source, Source::Const(_));
                !konst && (numel(&info.shape) as u64 * 4 > limit || buf > device_limit)
            });
            if !big {
                return Ok(None);
            }
            let shapes: Vec<&[usize]> = n
                .inputs
                .iter()
                .map(|v| g.values[v.0].shape.as_slice())
                .collect();
            let out_shape = &g.values[n.output.0].shape;
            plan_node(&*n.op, &shapes, out_shape, limit, device_limit).map(Some)
        })
        .collect()
}

/// Bytes of the slab scratch buffers a [`crate::graph::GpuExecutor`] for `g` will hold
/// (for reports; nodes split only because they share a slot with a large tensor are not
/// counted).
pub fn scratch_bytes(ctx: &GpuContext, g: &Graph) -> Result<u64> {
    let splits = plan_graph(ctx, g, &vec![None; g.values.len()])?;
    let (inb, outb) = Scratch::sizes(&splits);
    Ok(inb.iter().sum::<u64>() + outb)
}

/// Copies rows `[r0, r1)` of every leading index of a `(lead, d, plane)` tensor in `src`
/// to rows starting at `dst_row` of a `(lead, dst_d, plane)` tensor in `dst`.
fn row_copies(
    src: &wgpu::Buffer,
    (lead, d, plane): (usize, usize, usize),
    (r0, r1): (usize, usize),
    dst: &wgpu::Buffer,
    dst_d: usize,
    dst_row: usize,
) -> Vec<BufferCopy> {
    let row = plane as u64 * 4;
    let rows = (r1 - r0) as u64;
    if r0 == 0 && dst_row == 0 && r1 == d && dst_d == d {
        // Contiguous: one copy.
        return vec![BufferCopy {
            src: src.clone(),
            src_offset: 0,
            dst: dst.clone(),
            dst_offset: 0,
            bytes: lead as u64 * rows * row,
        }];
    }
    (0..lead as u64)
        .map(|l| BufferCopy {
            src: src.clone(),
            src_offset: (l * d as u64 + r0 as u64) * row,
            dst: dst.clone(),
            dst_offset: (l * dst_d as u64 + dst_row as u64) * row,
            bytes: rows * row,
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
/// The dispatches of `op` run slab by slab through `scratch`: input rows copied in before
/// each slab's first dispatch, the slab's exact output rows copied out after its last.
pub fn dispatches(
    ctx: &GpuContext,
    op: &dyn Op,
    split: &NodeSplit,
    inputs: &[&wgpu::Buffer],
    shapes: &[&[usize]],
    out: &wgpu::Buffer,
    out_shape: &[usize],
    scratch: &Scratch,
) -> Result<Vec<Dispatch>> {
    let internal = |m: String| Error::Gpu(format!("{} in depth slabs: {m}", op.name()));
    let tmp_out = scratch
        .output
        .as_deref()
        .ok_or_else(|| internal("no output scratch".into()))?;
    let (lead_o, d_out, plane_o) = geometry(out_shape);
    let mut all = Vec::new();
    for s in &split.slabs {
        let mut bufs: Vec<&wgpu::Buffer> = Vec::with_capacity(inputs.len());
        let mut slab_shapes: Vec<Vec<usize>> = Vec::with_capacity(inputs.len());
        let mut before = Vec::new();
        for (k, (buf, shape)) in inputs.iter().zip(shapes).enumerate() {
            if split.rule.sliced[k] {
                let tmp = scratch
                    .inputs
                    .get(k)
                    .ok_or_else(|| internal(format!("no scratch for input {k}")))?;
                let (lead, d, plane) = geometry(shape);
                let rows = s.i1 - s.i0;
                before.extend(row_copies(
                    buf,
                    (lead, d, plane),
                    (s.i0, s.i1),
                    tmp,
                    rows,
                    0,
                ));
                bufs.push(tmp.as_ref());
                slab_shapes.push(with_depth(shape, rows));
            } else {
                bufs.push(buf);
                slab_shapes.push(shape.to_vec());
            }
        }
        let refs: Vec<&[usize]> = slab_shapes.iter().map(|s| s.as_slice()).collect();
        let got = op.output_shape(&refs)?;
        if got != with_depth(out_shape, s.out_rows) {
            return Err(internal(format!(
                "slab {s:?} gives {got:?}, expected depth {}",
                s.out_rows
            )));
        }
        let mut ds = op.gpu(ctx, &bufs, &refs, tmp_out)?;
        let after = row_copies(
            tmp_out,
            (lead_o, s.out_rows, plane_o),
            (s.crop, s.crop + s.o1 - s.o0),
            out,
            d_out,
            s.o0,
        );
        let first = ds
            .first_mut()
            .ok_or_else(|| internal("the op made no dispatch".into()))?;
        // The slab's rows go in before anything the op itself copies (its texture copies
        // read the scratch buffer).
        let mut b = before;
        b.append(&mut first.before);
        first.before = b;
        if let Some(last) = ds.last_mut() {
            last.after.extend(after);
        }
        all.extend(ds);
    }
    Ok(all)
}

/// A slot buffer: bindable when it fits one binding, else a large buffer reached in slabs.
pub fn slot_buffer(ctx: &GpuContext, what: &str, bytes: u64) -> Result<wgpu::Buffer> {
    if bytes > ctx.caps.max_binding {
        ctx.large_buffer(what, bytes)
    } else {
        ctx.storage_buffer(what, bytes)
    }
}

#[cfg(test)]
mod tests;
