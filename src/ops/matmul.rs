//! Batched matrix product with optional transposes and a bias epilogue:
//! `out[b] = op(A[b]) · op(B[b]) + bias`, `op` = identity or transpose.
//!
//! Shapes: A is `[batch.., M, K]` (`[batch.., K, M]` with `trans_a`); B is `[K, N]`
//! (`[N, K]` with `trans_b`, the PyTorch Linear weight layout) or carries the same batch
//! dims as A; bias is `[N]`. Output `[batch.., M, N]`.
//!
//! An [`Epilogue`] may follow (after the bias and activation), with its inputs after the
//! bias: RoPE on q/k projections, or the LayerScale residual `resid + λ ⊙ y`.

use super::{expect_inputs, numel, Op};
use crate::error::{Error, Result};
use crate::gpu::{Dispatch, GpuContext, KernelArgs};
use crate::shaders::{MATMUL, MATMUL_F16};

/// The matmul op.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Matmul {
    pub trans_a: bool,
    pub trans_b: bool,
    /// A third input `[N]` is added to every row.
    pub bias: bool,
    /// Kernel choice; `Auto` picks from the device's features and limits.
    pub kernel: MatmulKernel,
    /// Applied to every output element after the bias (the epilogue).
    pub act: Activation,
    /// B is stored as f16 (pairs packed in u32 words, [`crate::gpu::pack_f16`]) on the GPU
    /// and unpacked to f32 in registers; products accumulate in f32. The CPU reference
    /// rounds B to f16 the same way, so both compute the same numbers.
    pub w_f16: bool,
    /// Work fused after the bias and activation (inputs after the bias).
    pub epi: Epilogue,
    /// f16 activations (`Precision::F16Act`, texture path only): A is stored as packed
    /// halves on the GPU and read through an rgba16float texture. The CPU reference takes
    /// A as it is (a producer with `out_f16` has already rounded it).
    pub x_f16: bool,
    /// The output is stored as packed halves (16-column texture blocks, N even); the CPU
    /// reference rounds it to f16.
    pub out_f16: bool,
}

/// What a [`Matmul`] does with its result before storing it (after bias and activation).
/// On the GPU's texture path it runs in registers; elsewhere as an in-place pass over the
/// output. The CPU reference is the matmul followed by the separate op.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Epilogue {
    #[default]
    None,
    /// DINOv3's rotary embedding ([`super::rope::rope`]) on the output `(B, T, heads·hd)`,
    /// rows `t < prefix` of each image (CLS, registers) untouched. Two more inputs:
    /// cos and sin `(T − prefix, hd/2)`, the first half of HF's tiled tables
    /// (HF's `cos[j] = cos[j + hd/2]`, so the half is the whole table).
    Rope { heads: usize, prefix: usize },
    /// LayerScale and the residual: `out = resid + λ ⊙ y`. Two more inputs: resid (the
    /// output's shape) and λ `[N]`.
    Residual,
}

impl Epilogue {
    /// Inputs the epilogue adds after the bias.
    pub fn inputs(self) -> usize {
        match self {
            Epilogue::None => 0,
            Epilogue::Rope { .. } | Epilogue::Residual => 2,
        }
    }
}

/// The epilogue activation of a [`Matmul`]: an MLP's `act(x·Wᵀ + b)` in one pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Activation {
    #[default]
    Identity,
    /// GELU with the exact erf, as `elementwise::gelu`.
    Gelu,
    /// SiLU, as `elementwise::silu`.
    Silu,
}

impl Activation {
    /// The value of the shader's `ACT` pipeline constant.
    fn code(self) -> f64 {
        match self {
            Activation::Identity => 0.0,
            Activation::Gelu => 1.0,
            Activation::Silu => 2.0,
        }
    }

    /// The CPU reference: the element-wise ops' own functions.
    pub fn apply(self, x: f32) -> f32 {
        match self {
            Activation::Identity => x,
            Activation::Gelu => super::elementwise::gelu(x),
            Activation::Silu => super::elementwise::silu(x),
        }
    }
}

/// The GPU kernel variants of [`Matmul`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MatmulKernel {
    /// The texture path when the shapes and device allow it, else the generic kernel.
    #[default]
    Auto,
    /// Register-tiled kernel reading storage buffers: any shape, any device.
    Generic,
}

/// Resolved sizes of one matmul call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// B has a batch dimension (else it is shared by every batch).
    pub b_batched: bool,
}

impl Matmul {
    /// `x · Wᵀ + b`: a PyTorch Linear.
    pub fn linear(bias: bool) -> Self {
        Matmul {
            trans_a: false,
            trans_b: true,
            bias,
            kernel: MatmulKernel::Auto,
            act: Activation::Identity,
            w_f16: false,
            epi: Epilogue::None,
            x_f16: false,
            out_f16: false,
        }
    }

    /// This matmul with `act` applied in its epilogue.
    pub fn with_act(self, act: Activation) -> Self {
        Matmul { act, ..self }
    }

    /// This matmul with `epi` fused after the bias and activation.
    pub fn with_epilogue(self, epi: Epilogue) -> Self {
        Matmul { epi, ..self }
    }

    /// This matmul without its epilogue (the inputs it takes are the first
    /// `2 + bias` of the fused op's).
    pub fn plain(self) -> Self {
        Matmul {
            epi: Epilogue::None,
            ..self
        }
    }

    pub fn dims(&self, inputs: &[&[usize]]) -> Result<Dims> {
        let err = |m: String| Error::shape("matmul", m);
        let nb = 2 + self.bias as usize;
        expect_inputs("matmul", inputs, nb + self.epi.inputs())?;
        let (a, b) = (inputs[0], inputs[1]);
        if a.len() < 2 || b.len() < 2 {
            return Err(err(format!(
                "operands must be at least 2-D, got {a:?} and {b:?}"
            )));
        }
        let (ar, ac) = (a[a.len() - 2], a[a.len() - 1]);
        let (m, k) = if self.trans_a { (ac, ar) } else { (ar, ac) };
        let (br, bc) = (b[b.len() - 2], b[b.len() - 1]);
        let (kb, n) = if self.trans_b { (bc, br) } else { (br, bc) };
        if k != kb {
            return Err(err(format!(
                "inner sizes differ: A {a:?} (trans {}) has K={k}, B {b:?} (trans {}) has K={kb}",
                self.trans_a, self.trans_b
            )));
        }
        let batch = numel(&a[..a.len() - 2]);
        let b_batched = b.len() > 2;
        if b_batched && b[..b.len() - 2] != a[..a.len() - 2] {
            return Err(err(format!("batch dims of A {a:?} and B {b:?} differ")));
        }
        if self.bias && inputs[2] != [n] {
            return Err(err(format!("bias must be [{n}], got {:?}", inputs[2])));
        }
        match self.epi {
            Epilogue::None => {}
            Epilogue::Rope { heads, prefix } => {
                if heads == 0 || n % heads != 0 || (n / heads) % 2 != 0 {
                    return Err(err(format!(
                        "RoPE needs the {n} output columns to split into {heads} heads of even size"
                    )));
                }
                if m < prefix {
                    return Err(err(format!(
                        "RoPE: {m} tokens per image but {prefix} prefix tokens"
                    )));
                }
                let table = [m - prefix, n / heads / 2];
                if inputs[nb] != table || inputs[nb + 1] != table {
                    return Err(err(format!(
                        "RoPE cos and sin must be {table:?} (patch tokens, head size / 2), got {:?} and {:?}",
                        inputs[nb],
                        inputs[nb + 1]
                    )));
                }
            }
            Epilogue::Residual => {
                let mut out = a[..a.len() - 2].to_vec();
                out.extend([m, n]);
                if inputs[nb] != out.as_slice() || inputs[nb + 1] != [n] {
                    return Err(err(format!(
                        "the residual must have the output's shape {out:?} and λ must be [{n}], got {:?} and {:?}",
                        inputs[nb],
                        inputs[nb + 1]
                    )));
                }
            }
        }
        Ok(Dims {
            batch,
            m,
            n,
            k,
            b_batched,
        })
    }
}

/// Work on a block of finished product rows while they are still in cache:
/// `post(first_row, rows)`, rows counted over the whole `[batch·m, n]` output.
pub type RowPost<'a> = &'a (dyn Fn(usize, &mut [f32]) + Sync);

/// Rows per block of the blocked CPU product: the block's output stays in the core's
/// cache for the bias, activation and epilogue that follow, and the packing of B (once
/// per block) costs little beside the block's arithmetic.
const BLOCK_ROWS: usize = 512;

/// The CPU reference (through the `gemm` crate, split across the CPU threads). `bias` is
/// `[n]` or empty.
pub fn matmul(m: &Matmul, d: Dims, a: &[f32], b: &[f32], bias: &[f32], out: &mut [f32]) {
    matmul_post(m, d, a, b, bias, out, &|_, _| {})
}

/// [`matmul`] followed by `post` on every block of rows (after bias and activation).
pub fn matmul_post(
    m: &Matmul,
    d: Dims,
    a: &[f32],
    b: &[f32],
    bias: &[f32],
    out: &mut [f32],
    post: RowPost,
) {
    let Dims {
        batch,
        m: rows,
        n,
        k,
        b_batched,
    } = d;
    assert!(a.len() >= batch * rows * k && out.len() >= batch * rows * n);
    assert!(b.len() >= if b_batched { batch } else { 1 } * k * n);
    // (row stride, column stride) of op(A) [rows x k] and op(B) [k x n].
    let (a_rs, a_cs) = if m.trans_a {
        (1, rows as isize)
    } else {
        (k as isize, 1)
    };
    let (b_rs, b_cs) = if m.trans_b {
        (1, k as isize)
    } else {
        (n as isize, 1)
    };
    // A shared B and a row-major A: the batch is just more rows of one product.
    let (batch, rows) = if !b_batched && !m.trans_a && batch > 1 {
        (1, batch * rows)
    } else {
        (batch, rows)
    };
    let bias = if bias.is_empty() {
        None
    } else {
        Some(&bias[..n])
    };
    let act = m.act;
    // Bias then activation (x·Wᵀ + b, as the GPU kernels round it), then `post`, on rows
    // of the product starting at row `r0`.
    let finish = |r0: usize, c: &mut [f32]| {
        if let Some(b) = bias {
            add_rows(c, b);
        }
        activate(act, c);
        post(r0, c);
    };
    // SAFETY (both gemm calls): the pointers cover [r x k] of op(A) from row `r0`,
    // [k x n] of op(B) and the [r x n] output slice with the strides given (checked by
    // the asserts above and the slicing of the output).
    let product = |r0: usize, a_off: usize, b_off: usize, o: &mut [f32], par| unsafe {
        let r = o.len() / n;
        gemm::gemm(
            r,
            n,
            k,
            o.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr().add(a_off).offset(r0 as isize * a_rs),
            a_cs,
            a_rs,
            b.as_ptr().add(b_off),
            b_cs,
            b_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    };
    if rows == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out[..batch * rows * n].fill(0.0);
        crate::ops::par::for_units(&mut out[..batch * rows * n], n, 64, finish);
        return;
    }
    let target = BLOCK_ROWS;
    if batch == 1 && crate::ops::par::may_split() && rows >= 2 * target {
        // A whole number of blocks per thread, so no thread waits on a last odd block.
        let th = crate::ops::par::threads();
        let blocks = rows.div_ceil(target).div_ceil(th) * th;
        let block = rows.div_ceil(blocks);
        // One large product: blocks of rows, one single-threaded gemm each, finished while
        // the block is in cache (instead of further passes over the whole output).
        use rayon::prelude::*;
        out[..rows * n]
            .par_chunks_mut(block * n)
            .enumerate()
            .for_each(|(i, o)| {
                product(i * block, 0, 0, o, gemm::Parallelism::None);
                finish(i * block, o);
            });
        return;
    }
    // Many small batches go one per thread; otherwise one batch at a time, each product
    // split across threads by gemm, then finished in a threaded pass.
    if batch > 1 && crate::ops::par::may_split() && rows * n * k < (1 << 21) {
        let shared = crate::ops::par::SharedOut::new(out);
        crate::ops::par::for_each_index(batch, |bi| {
            let b_off = if b_batched { bi * k * n } else { 0 };
            // SAFETY: batch `bi` writes only its own [rows x n] block of `out`.
            let o = unsafe { shared.slice(bi * rows * n, rows * n) };
            product(0, bi * rows * k, b_off, o, gemm::Parallelism::None);
            finish(bi * rows, o);
        });
        return;
    }
    let par = crate::ops::par::gemm_parallelism();
    for bi in 0..batch {
        let b_off = if b_batched { bi * k * n } else { 0 };
        let o = &mut out[bi * rows * n..(bi + 1) * rows * n];
        product(0, bi * rows * k, b_off, o, par);
    }
    crate::ops::par::for_units(&mut out[..batch * rows * n], n, 1 + (1 << 14) / n, finish);
}

avx2_too! {
    /// `c[i] += b[i % b.len()]` (rows of `c` plus the bias row).
    fn add_rows(c: &mut [f32], b: &[f32]) {
        for row in c.chunks_exact_mut(b.len()) {
            for (v, x) in row.iter_mut().zip(b) {
                *v += *x;
            }
        }
    }
}

avx2_too! {
    /// `act` on every element of `c`: one loop per activation (not a match per element)
    /// so each vectorises; index loops, not `for_each` (a closure is a separate function,
    /// compiled without the caller's target features).
    fn activate(act: Activation, c: &mut [f32]) {
        match act {
            Activation::Identity => {}
            Activation::Gelu => {
                for i in 0..c.len() {
                    c[i] = super::elementwise::gelu(c[i]);
                }
            }
            Activation::Silu => {
                for i in 0..c.len() {
                    c[i] = super::elementwise::silu(c[i]);
                }
            }
        }
    }
}

/// The CPU reference of an [`Epilogue`] on rows `r0..` of a finished product (`Dims` of
/// the matmul, `extra` the epilogue's inputs, RoPE's tables as [`rope_tables`] tiles
/// them): the separate ops' references, one block of rows at a time.
fn epilogue_rows(epi: Epilogue, d: Dims, extra: &[&[f32]], r0: usize, rows: &mut [f32]) {
    match epi {
        Epilogue::None => {}
        Epilogue::Rope { heads, prefix } => {
            let hd = d.n / heads;
            super::rope::rope_rows_in_place(extra[0], extra[1], d.m, d.n, hd, prefix, r0, rows);
        }
        Epilogue::Residual => {
            super::elementwise::scale_add_rows(&extra[0][r0 * d.n..], extra[1], rows);
        }
    }
}

/// HF's RoPE tables are the half tiled twice along the head dimension: (cos, sin) of
/// `[P, hd/2]` to `[P, hd]`.
fn rope_tables(cos: &[f32], sin: &[f32], hd: usize) -> (Vec<f32>, Vec<f32>) {
    let tile = |t: &[f32]| -> Vec<f32> {
        t.chunks((hd / 2).max(1))
            .flat_map(|r| r.iter().chain(r.iter()).copied())
            .collect()
    };
    (tile(cos), tile(sin))
}

/// A strided product for the other CPU references (conv3d):
/// `dst[i·dst_rs + j] (+)= Σ_l a[i·a_rs + l·a_cs] · b[l·b_rs + j·b_cs]` for i < m, j < n,
/// l < k; with `accumulate` the product is added to `dst`, else it replaces it. Split
/// across the CPU threads unless called from inside a parallel task.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_strided(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_rs: usize,
    a: &[f32],
    (a_rs, a_cs): (usize, usize),
    b: &[f32],
    (b_rs, b_cs): (usize, usize),
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    // The last element each operand is read or written at must be in bounds.
    assert!((m - 1) * dst_rs + n <= dst.len());
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                dst[i * dst_rs..i * dst_rs + n].fill(0.0);
            }
        }
        return;
    }
    assert!((m - 1) * a_rs + (k - 1) * a_cs < a.len());
    assert!((k - 1) * b_rs + (n - 1) * b_cs < b.len());
    // SAFETY: every index touched is within the bounds asserted above.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            crate::ops::par::gemm_parallelism(),
        );
    }
}

impl Op for Matmul {
    fn name(&self) -> &'static str {
        "matmul"
    }
    fn output_shape(&self, inputs: &[&[usize]]) -> Result<Vec<usize>> {
        let d = self.dims(inputs)?;
        let a = inputs[0];
        let mut s = a[..a.len() - 2].to_vec();
        s.extend([d.m, d.n]);
        Ok(s)
    }
    fn cpu(&self, inputs: &[&[f32]], shapes: &[&[usize]], out: &mut [f32]) {
        let d = self
            .dims(shapes)
            .expect("shapes were checked when the graph was built");
        let bias = if self.bias { inputs[2] } else { &[] };
        let nb = 2 + self.bias as usize;
        let tables = match self.epi {
            Epilogue::Rope { heads, .. } => {
                Some(rope_tables(inputs[nb], inputs[nb + 1], d.n / heads))
            }
            _ => None,
        };
        let extra: Vec<&[f32]> = match &tables {
            Some((c, s)) => vec![c, s],
            None => inputs[nb..].to_vec(),
        };
        let post = |r0: usize, rows: &mut [f32]| epilogue_rows(self.epi, d, &extra, r0, rows);
        let b: std::borrow::Cow<[f32]> = if self.w_f16 {
            inputs[1]
                .iter()
                .map(|v| half::f16::from_f32(*v).to_f32())
                .collect()
        } else {
            inputs[1].into()
        };
        matmul_post(self, d, inputs[0], &b, bias, out, &post);
        if self.out_f16 {
            out.iter_mut()
                .for_each(|v| *v = half::f16::from_f32(*v).to_f32());
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
        if self.x_f16 || self.out_f16 {
            return gpu_matmul_f16_act(ctx, self, d, inputs, out);
        }
        let nb = 2 + self.bias as usize;
        let plain = self.plain();
        let mut ds = match texture_path_cols(ctx, self, d, inputs[1]) {
            Some(cols) if self.kernel == MatmulKernel::Auto => {
                if fuses_on_texture_path(self, d, cols) {
                    return gpu_matmul_tex(ctx, self, d, cols, inputs, out);
                }
                gpu_matmul_tex(ctx, &plain, d, cols, &inputs[..nb], out)?
            }
            _ => gpu_matmul(ctx, &plain, d, &inputs[..nb], out)?,
        };
        ds.extend(epilogue_pass(ctx, self.epi, d, &inputs[nb..], out)?);
        Ok(ds)
    }
    fn flops(&self, shapes: &[&[usize]]) -> u64 {
        self.dims(shapes)
            .map(|d| 2 * (d.batch * d.m * d.n * d.k) as u64)
            .unwrap_or(0)
    }
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
    fn output_f16(&self) -> bool {
        self.out_f16
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    m: u32,
    n: u32,
    k: u32,
    batch: u32,
    // element strides: A row/col/batch, B row/col/batch (of op(A), op(B))
    a_rs: u32,
    a_cs: u32,
    a_bs: u32,
    b_rs: u32,
    b_cs: u32,
    b_bs: u32,
    has_bias: u32,
    tiles_n: u32,
}

fn gpu_matmul(
    ctx: &GpuContext,
    m: &Matmul,
    d: Dims,
    inputs: &[&wgpu::Buffer],
    out: &wgpu::Buffer,
) -> Result<Vec<Dispatch>> {
    let (a_rs, a_cs) = if m.trans_a { (1, d.m) } else { (d.k, 1) };
    let (b_rs, b_cs) = if m.trans_b { (1, d.k) } else { (d.n, 1) };
    let bias = if m.bias { inputs[2] } else { inputs[1] };
    let (tm, tn) = (4usize, 4usize);
    let tiles_n = d.n.div_ceil(tn);
    let p = Params {
        m: d.m as u32,
        n: d.n as u32,
        k: d.k as u32,
        batch: d.batch as u32,
        a_rs: a_rs as u32,
        a_cs: a_cs as u32,
        a_bs: (d.m * d.k) as u32,
        b_rs: b_rs as u32,
        b_cs: b_cs as u32,
        b_bs: if d.b_batched { (d.k * d.n) as u32 } else { 0 },
        has_bias: m.bias as u32,
        tiles_n: tiles_n as u32,
    };
    let tiles = (d.m.div_ceil(tm) * tiles_n) as u64;
    Ok(vec![ctx.dispatch(KernelArgs {
        shader: MATMUL.portable(),
        entry: "matmul",
        constants: &[("ACT", m.act.code()), ("W16", m.w_f16 as u8 as f64)],
        buffers: &[inputs[0], inputs[1], bias, out],
        params: bytemuck::bytes_of(&p),
        workgroups: {
            let [x, y, _] = ctx.grid(tiles.div_ceil(64))?;
            [x, y, d.batch as u32]
        },
    })?])
}

/// Whether the texture path with `cols` columns per block runs `m`'s epilogue in
/// registers: RoPE needs 16-column blocks whose two groups of 8 are the two halves of the
/// same rotation pairs (hd/2 % 8 == 0); both need the identity activation (the epilogue
/// acts on the biased product).
fn fuses_on_texture_path(m: &Matmul, d: Dims, cols: usize) -> bool {
    match m.epi {
        Epilogue::None => true,
        Epilogue::Rope { heads, .. } => {
            cols == 16 && m.act == Activation::Identity && (d.n / heads / 2) % 8 == 0
        }
        // (the residual streams through a texture of 4-column texels)
        Epilogue::Residual => m.act == Activation::Identity && d.n % 4 == 0,
    }
}

/// The in-place pass that applies `epi` to a finished product in `out` (None for
/// [`Epilogue::None`]); `extra` are the epilogue's inputs.
fn epilogue_pass(
    ctx: &GpuContext,
    epi: Epilogue,
    d: Dims,
    extra: &[&wgpu::Buffer],
    out: &wgpu::Buffer,
) -> Result<Option<Dispatch>> {
    let len = (d.batch * d.m * d.n) as u64;
    let (entry, total, t, prefix, half) = match epi {
        Epilogue::None => return Ok(None),
        Epilogue::Rope { heads, prefix } => ("rope_inplace", len / 2, d.m, prefix, d.n / heads / 2),
        Epilogue::Residual => ("residual_inplace", len, 1, 0, 1),
    };
    let params = [
        total as u32,
        d.n as u32,
        t as u32,
        prefix as u32,
        half as u32,
        0,
        0,
        0,
    ];
    Ok(Some(ctx.dispatch(KernelArgs {
        shader: MATMUL.portable(),
        entry,
        constants: &[],
        buffers: &[out, extra[0], extra[1]],
        params: bytemuck::cast_slice(&params),
        workgroups: ctx.grid(total.div_ceil(64))?,
    })?))
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct TexParams {
    m: u32,
    n: u32,
    k4: u32,
    c0: u32,
    w_base: u32,
    has_bias: u32,
    w_base2: u32,
    /// First column of the second group of 8 (16-column blocks).
    c2: u32,
    /// RoPE: tokens per image, prefix tokens, texels per table row, texel of column c0.
    t: u32,
    prefix: u32,
    q4: u32,
    rj: u32,
}

/// Bytes of the uniform window holding a block of W (the WGSL array size).
const WINDOW: u64 = 65536;

/// Columns per dispatch on the texture path, or None when it does not apply: it needs
/// x·Wᵀ with a shared W, K % 4 == 0, subgroups of at least 8 lanes, 64 KiB uniform
/// bindings, and a group of columns × K that fits a window. 16 columns are two groups of 8,
/// each in its own window (K ≤ 2048); 4 columns fit one window up to K = 4096.
fn texture_path_cols(ctx: &GpuContext, m: &Matmul, d: Dims, w: &wgpu::Buffer) -> Option<usize> {
    let c = &ctx.caps;
    let ok = !m.trans_a
        && m.trans_b
        && !d.b_batched
        && d.k % if m.w_f16 { 8 } else { 4 } == 0
        && d.k > 0
        && d.m > 0
        && d.n > 0
        && c.subgroups
        && c.min_subgroup_size >= 8
        && c.max_uniform_binding >= WINDOW
        && w.size() >= WINDOW
        && w.size() % (c.uniform_offset_alignment as u64).max(16) == 0
        && (d.batch * d.m * d.k / 4) as u64
            <= GpuContext::TEXTURE_WIDTH as u64 * c.max_texture_2d as u64;
    if !ok {
        return None;
    }
    [(16usize, 8usize), (4, 4)]
        .into_iter()
        .map(|(cols, group)| (cols, group * d.k * esize(m)))
        .find(|(_, group)| {
            // A group must fit its window even when the window's start is aligned down.
            let block = *group as u64;
            let align = (c.uniform_offset_alignment as u64).max(16);
            block + if block % align == 0 { 0 } else { align } <= WINDOW
        })
        .map(|(cols, _)| cols)
}

/// Bytes per element of B on the device.
fn esize(m: &Matmul) -> usize {
    if m.w_f16 {
        2
    } else {
        4
    }
}

/// A matmul with f16 activations: the texture path only (any tuned kernel choice is
/// ignored), every epilogue fused; f16 outputs need 16-column blocks and an even N.
fn gpu_matmul_f16_act(
    ctx: &GpuContext,
    m: &Matmul,
    d: Dims,
    inputs: &[&wgpu::Buffer],
    out: &wgpu::Buffer,
) -> Result<Vec<Dispatch>> {
    let cols = texture_path_cols(ctx, m, d, inputs[1]);
    let ok = match cols {
        Some(cols) => {
            fuses_on_texture_path(m, d, cols)
                && (!m.out_f16 || (cols == 16 && d.n % 2 == 0 && m.epi != Epilogue::Residual))
                && (!m.x_f16 || d.k % 4 == 0)
        }
        None => false,
    };
    match cols {
        Some(cols) if ok => gpu_matmul_tex(ctx, m, d, cols, inputs, out),
        _ => Err(Error::Gpu(format!(
            "f16 activations need the texture matmul (subgroups of ≥ 8 lanes, 64 KiB \
             uniform bindings, x·Wᵀ with K % 4 == 0 and an even N, 8 columns × K in one \
             64 KiB window for an f16 output); this matmul {m:?} {d:?} cannot: use \
             --precision f16 or f32"
        ))),
    }
}

fn gpu_matmul_tex(
    ctx: &GpuContext,
    m: &Matmul,
    d: Dims,
    cols: usize,
    inputs: &[&wgpu::Buffer],
    out: &wgpu::Buffer,
) -> Result<Vec<Dispatch>> {
    let rows = d.batch * d.m;
    let texels = (rows * d.k / 4) as u64;
    let texture = if m.x_f16 {
        ctx.scratch_texture_f16(0, texels)?
    } else {
        ctx.scratch_texture(0, texels)?
    };
    let view = texture.create_view(&Default::default());
    let entry: &'static str = match (cols, m.w_f16, m.epi) {
        _ if m.out_f16 && matches!(m.epi, Epilogue::Rope { .. }) => "matmul_tex16_rope_o16",
        _ if m.out_f16 => "matmul_tex16_o16",
        (16, false, Epilogue::None) => "matmul_tex16",
        (16, false, Epilogue::Rope { .. }) => "matmul_tex16_rope",
        (16, false, Epilogue::Residual) => "matmul_tex16_res",
        (_, false, Epilogue::None) => "matmul_tex4",
        (_, false, _) => "matmul_tex4_res",
        (16, true, Epilogue::None) => "matmul_tex16h",
        (16, true, Epilogue::Rope { .. }) => "matmul_tex16h_rope",
        (16, true, Epilogue::Residual) => "matmul_tex16h_res",
        (_, true, Epilogue::None) => "matmul_tex4h",
        (_, true, _) => "matmul_tex4h_res",
    };
    if matches!(m.epi, Epilogue::Rope { .. }) && cols != 16 {
        return Err(Error::Gpu(format!(
            "{entry}: RoPE fuses only into 16-column blocks"
        )));
    }
    let uniform = |binding, size: u64| wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer {
            ty: wgpu::BufferBindingType::Uniform,
            has_dynamic_offset: true,
            min_binding_size: std::num::NonZeroU64::new(size),
        },
        count: None,
    };
    let storage = |binding, read_only| wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer {
            ty: wgpu::BufferBindingType::Storage { read_only },
            has_dynamic_offset: false,
            min_binding_size: None,
        },
        count: None,
    };
    let texture_entry = |binding| wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Texture {
            sample_type: wgpu::TextureSampleType::Float { filterable: false },
            view_dimension: wgpu::TextureViewDimension::D2,
            multisampled: false,
        },
        count: None,
    };
    let params_size = std::mem::size_of::<TexParams>() as u64;
    let mut layout = vec![
        uniform(0, params_size),
        uniform(1, WINDOW),
        uniform(5, WINDOW),
        texture_entry(2),
        storage(3, true),
        storage(4, false),
    ];
    match m.epi {
        Epilogue::None => {}
        Epilogue::Rope { .. } => layout.extend([texture_entry(6), texture_entry(7)]),
        Epilogue::Residual => layout.extend([texture_entry(6), storage(7, true)]),
    }
    let (pipeline, bgl) = if m.out_f16 {
        let w16 = ("W16", m.w_f16 as u8 as f64);
        ctx.pipeline_with_layout_consts(&MATMUL_F16, entry, &[("ACT", m.act.code()), w16], &layout)?
    } else {
        ctx.pipeline_with_layout_consts(&MATMUL, entry, &[("ACT", m.act.code())], &layout)?
    };
    // RoPE: the cos and sin tables (P, hd/2) stream through scratch textures of their own
    // (slots 3 and 4; attention uses 0–2), filled by the first dispatch's copies; the
    // residual likewise (slot 5).
    let nb = 2 + m.bias as usize;
    let (half, tables) = match m.epi {
        Epilogue::Rope { heads, prefix } => {
            let half = d.n / heads / 2;
            let texels = ((d.m - prefix) * half / 4) as u64;
            let mut t = Vec::new();
            for (slot, buf) in [(3, inputs[nb]), (4, inputs[nb + 1])] {
                let tex = ctx.scratch_texture(slot, texels)?;
                t.push((
                    tex.create_view(&Default::default()),
                    std::sync::Arc::new(crate::gpu::TextureCopy {
                        buffer: buf.clone(),
                        texture: tex,
                        width: GpuContext::TEXTURE_WIDTH,
                        texel_bytes: 16,
                        texels,
                    }),
                ));
            }
            (half, t)
        }
        // The residual (rows, N) streams through scratch texture slot 5.
        Epilogue::Residual => {
            let texels = (rows * d.n / 4) as u64;
            let tex = ctx.scratch_texture(5, texels)?;
            let view = tex.create_view(&Default::default());
            let copy = std::sync::Arc::new(crate::gpu::TextureCopy {
                buffer: inputs[nb].clone(),
                texture: tex,
                width: GpuContext::TEXTURE_WIDTH,
                texel_bytes: 16,
                texels,
            });
            (0, vec![(view, copy)])
        }
        Epilogue::None => (0, Vec::new()),
    };
    // Column blocks: (c0, c2) = the first columns of the two groups of 8 (16-column
    // blocks), or (c0, c0) for 4-column blocks. RoPE pairs group 1 = columns h·hd + j0 …
    // + 7 with group 2 = the same + hd/2, so every lane holds both halves of each pair.
    let blocks: Vec<(usize, usize)> = match m.epi {
        Epilogue::Rope { heads, .. } => (0..heads)
            .flat_map(|h| {
                (0..half / 8).map(move |jb| (h * 2 * half + jb * 8, h * 2 * half + jb * 8 + half))
            })
            .collect(),
        _ if cols == 16 => (0..d.n.div_ceil(16))
            .map(|b| (b * 16, (b * 16 + 8).min(d.n - 1)))
            .collect(),
        _ => (0..d.n.div_ceil(cols))
            .map(|b| (b * cols, b * cols))
            .collect(),
    };
    // One parameter block per column block, at the device's uniform offset alignment.
    let align = params_size.next_multiple_of((ctx.caps.uniform_offset_alignment as u64).max(16));
    let w_bytes = inputs[1].size();
    let align_w = (ctx.caps.uniform_offset_alignment as u64).max(16);
    let mut param_bytes = vec![0u8; blocks.len() * align as usize];
    let mut offsets = Vec::with_capacity(blocks.len());
    let (t, prefix) = match m.epi {
        Epilogue::Rope { prefix, .. } => (d.m, prefix),
        _ => (1, 0),
    };
    for (b, &(c0, c2)) in blocks.iter().enumerate() {
        let col_byte = (c0 * d.k * esize(m)) as u64;
        // The window starts at column c0, or earlier for the last blocks so it stays
        // inside the buffer (every buffer is at least one window large).
        let start = col_byte.min(w_bytes - WINDOW) / align_w * align_w;
        // The second group of 8 columns (16-column blocks) has a window of its own.
        let col_byte2 = (c2 * d.k * esize(m)) as u64;
        let start2 = col_byte2.min(w_bytes - WINDOW) / align_w * align_w;
        let p = TexParams {
            m: rows as u32,
            n: d.n as u32,
            k4: (d.k / 4) as u32,
            c0: c0 as u32,
            w_base: ((col_byte - start) / 16) as u32,
            has_bias: m.bias as u32,
            w_base2: ((col_byte2 - start2) / 16) as u32,
            // (the unclamped start of the second group; the shader clamps its columns)
            c2: if matches!(m.epi, Epilogue::Rope { .. }) {
                c2 as u32
            } else {
                (c0 + 8) as u32
            },
            t: t as u32,
            prefix: prefix as u32,
            q4: (half / 4) as u32,
            rj: if half > 0 {
                ((c0 % (2 * half)) / 4) as u32
            } else {
                0
            },
        };
        let at = b * align as usize;
        param_bytes[at..at + params_size as usize].copy_from_slice(bytemuck::bytes_of(&p));
        offsets.push(vec![at as u32, start as u32, start2 as u32]);
    }
    let params = ctx.uniform(&param_bytes);
    let bias = if m.bias { inputs[2] } else { inputs[1] };
    let window = |buffer| {
        wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer,
            offset: 0,
            size: std::num::NonZeroU64::new(WINDOW),
        })
    };
    let mut entries = vec![
        wgpu::BindGroupEntry {
            binding: 0,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: &params,
                offset: 0,
                size: std::num::NonZeroU64::new(params_size),
            }),
        },
        wgpu::BindGroupEntry {
            binding: 1,
            resource: window(inputs[1]),
        },
        wgpu::BindGroupEntry {
            binding: 2,
            resource: wgpu::BindingResource::TextureView(&view),
        },
        wgpu::BindGroupEntry {
            binding: 3,
            resource: bias.as_entire_binding(),
        },
        wgpu::BindGroupEntry {
            binding: 4,
            resource: out.as_entire_binding(),
        },
        wgpu::BindGroupEntry {
            binding: 5,
            resource: window(inputs[1]),
        },
    ];
    match m.epi {
        Epilogue::None => {}
        Epilogue::Rope { .. } => {
            for (i, (v, _)) in tables.iter().enumerate() {
                entries.push(wgpu::BindGroupEntry {
                    binding: 6 + i as u32,
                    resource: wgpu::BindingResource::TextureView(v),
                });
            }
        }
        Epilogue::Residual => {
            entries.push(wgpu::BindGroupEntry {
                binding: 6,
                resource: wgpu::BindingResource::TextureView(&tables[0].0),
            });
            entries.push(wgpu::BindGroupEntry {
                binding: 7,
                resource: inputs[nb + 1].as_entire_binding(),
            });
        }
    }
    let bind_group = ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some(entry),
        layout: &bgl,
        entries: &entries,
    });
    let copy = std::sync::Arc::new(crate::gpu::TextureCopy {
        buffer: inputs[0].clone(),
        texture,
        width: GpuContext::TEXTURE_WIDTH,
        texel_bytes: if m.x_f16 { 8 } else { 16 },
        texels,
    });
    let mut first_copies = vec![copy];
    first_copies.extend(tables.iter().map(|(_, c)| c.clone()));
    let workgroups = ctx.grid(rows.div_ceil(64) as u64)?;
    Ok(offsets
        .into_iter()
        .enumerate()
        .map(|(i, offsets)| Dispatch {
            name: entry,
            before: Vec::new(),
            after: Vec::new(),
            pipeline: pipeline.clone(),
            bind_group: bind_group.clone(),
            workgroups,
            offsets,
            copies: if i == 0 {
                first_copies.clone()
            } else {
                Vec::new()
            },
        })
        .collect())
}

/// Benchmark cases for `cargo bench`.
pub fn bench_cases() -> Vec<crate::bench::Case> {
    use crate::bench::Case;
    vec![
        Case::new(
            "matmul 4096x384x1536 +bias (x·Wᵀ, MLP down)",
            Matmul::linear(true),
            vec![vec![4096, 1536], vec![384, 1536], vec![384]],
        ),
        Case::new(
            "matmul 4096x384x384 (x·Wᵀ)",
            Matmul::linear(false),
            vec![vec![4096, 384], vec![384, 384]],
        ),
        Case::new(
            "matmul 4096x1536x384 +bias (x·Wᵀ)",
            Matmul::linear(true),
            vec![vec![4096, 384], vec![1536, 384], vec![1536]],
        ),
        Case::new(
            "matmul 32x201x384x384 +bias (ViT-S q/v)",
            Matmul::linear(true),
            vec![vec![32, 201, 384], vec![384, 384], vec![384]],
        ),
        Case::new(
            "matmul 32x201x384x384 +bias +rope (ViT-S q)",
            Matmul::linear(true).with_epilogue(Epilogue::Rope {
                heads: 6,
                prefix: 5,
            }),
            vec![
                vec![32, 201, 384],
                vec![384, 384],
                vec![384],
                vec![196, 32],
                vec![196, 32],
            ],
        ),
        Case::new(
            "matmul 32x201x384x384 +bias +residual (ViT-S o_proj)",
            Matmul::linear(true).with_epilogue(Epilogue::Residual),
            vec![
                vec![32, 201, 384],
                vec![384, 384],
                vec![384],
                vec![32, 201, 384],
                vec![384],
            ],
        ),
        Case::new(
            "matmul 32x201x384x1536 +bias +residual (ViT-S down_proj)",
            Matmul::linear(true).with_epilogue(Epilogue::Residual),
            vec![
                vec![32, 201, 1536],
                vec![384, 1536],
                vec![384],
                vec![32, 201, 384],
                vec![384],
            ],
        ),
        Case::new(
            "matmul 4096x384x384 (x·W)",
            Matmul::default(),
            vec![vec![4096, 384], vec![384, 384]],
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{check_op, check_op_with, random, rng};

    /// Plain triple loop, to check the gemm-backed reference itself.
    fn naive(m: &Matmul, d: Dims, a: &[f32], b: &[f32], bias: &[f32]) -> Vec<f32> {
        let mut out = vec![0f32; d.batch * d.m * d.n];
        for bi in 0..d.batch {
            for i in 0..d.m {
                for j in 0..d.n {
                    let mut s = if bias.is_empty() {
                        0f64
                    } else {
                        bias[j] as f64
                    };
                    for l in 0..d.k {
                        let av = if m.trans_a {
                            a[bi * d.m * d.k + l * d.m + i]
                        } else {
                            a[bi * d.m * d.k + i * d.k + l]
                        };
                        let bo = if d.b_batched { bi * d.k * d.n } else { 0 };
                        let bv = if m.trans_b {
                            b[bo + j * d.k + l]
                        } else {
                            b[bo + l * d.n + j]
                        };
                        s += av as f64 * bv as f64;
                    }
                    out[bi * d.m * d.n + i * d.n + j] = m.act.apply(s as f32);
                }
            }
        }
        out
    }

    fn shapes(
        m: &Matmul,
        batch: Option<usize>,
        rows: usize,
        n: usize,
        k: usize,
        b_batched: bool,
    ) -> Vec<Vec<usize>> {
        let mut a = if m.trans_a {
            vec![k, rows]
        } else {
            vec![rows, k]
        };
        let mut b = if m.trans_b { vec![n, k] } else { vec![k, n] };
        if let Some(bt) = batch {
            a.insert(0, bt);
            if b_batched {
                b.insert(0, bt);
            }
        }
        let mut s = vec![a, b];
        if m.bias {
            s.push(vec![n]);
        }
        s
    }

    #[test]
    fn reference_matches_naive() {
        let mut r = rng();
        for (ta, tb, bias, act) in [
            (false, false, false, Activation::Identity),
            (true, false, true, Activation::Gelu),
            (false, true, true, Activation::Silu),
            (true, true, false, Activation::Identity),
        ] {
            let m = Matmul {
                trans_a: ta,
                trans_b: tb,
                bias,
                kernel: MatmulKernel::Auto,
                act,
                w_f16: false,
                epi: Epilogue::None,
                x_f16: false,
                out_f16: false,
            };
            let s = shapes(&m, Some(3), 7, 5, 9, true);
            let data: Vec<Vec<f32>> = s.iter().map(|x| random(&mut r, numel(x))).collect();
            let refs: Vec<&[usize]> = s.iter().map(|x| x.as_slice()).collect();
            let d = m.dims(&refs).unwrap();
            let mut out = vec![0f32; d.batch * d.m * d.n];
            let bias_d: &[f32] = if bias { &data[2] } else { &[] };
            matmul(&m, d, &data[0], &data[1], bias_d, &mut out);
            let want = naive(&m, d, &data[0], &data[1], bias_d);
            let e = crate::ops::testing::rel_err(&out, &want);
            assert!(e < 1e-5, "{m:?}: {e}");
        }
    }

    /// Products large enough for the blocked CPU path (rows in blocks, each finished in
    /// cache) with bias, GELU and each epilogue, against the naive product and the
    /// epilogues' definitions; rows not a multiple of any block size.
    #[test]
    fn blocked_reference_matches_naive() {
        let mut r = rng();
        let (b, t, k, heads, hd, prefix) = (5, 2 * BLOCK_ROWS / 5 + 13, 17, 2, 6, 3);
        let n = heads * hd;
        assert!(b * t >= 2 * BLOCK_ROWS, "the blocked path must run");
        let x = random(&mut r, b * t * k);
        let w = random(&mut r, n * k);
        let bias = random(&mut r, n);
        let (ch, sh) = (
            random(&mut r, (t - prefix) * hd / 2),
            random(&mut r, (t - prefix) * hd / 2),
        );
        let resid = random(&mut r, b * t * n);
        let lambda = random(&mut r, n);
        let gelu = Matmul {
            act: Activation::Gelu,
            ..Matmul::linear(true)
        };
        let d = Dims {
            batch: b,
            m: t,
            n,
            k,
            b_batched: false,
        };
        let plain = naive(&gelu, d, &x, &w, &bias);
        let ins = [(&x[..], &[b, t, k][..]), (&w, &[n, k]), (&bias, &[n])];
        let run = |m: &Matmul, extra: &[(&[f32], &[usize])]| {
            let all: Vec<(&[f32], &[usize])> = ins.iter().chain(extra).copied().collect();
            crate::ops::run_cpu(m, &all).unwrap().0
        };
        let got = run(&gelu, &[]);
        assert!(crate::ops::testing::rel_err(&got, &plain) < 1e-5);

        let with_rope = gelu.with_epilogue(Epilogue::Rope { heads, prefix });
        let got = run(
            &with_rope,
            &[(&ch, &[t - prefix, hd / 2]), (&sh, &[t - prefix, hd / 2])],
        );
        let mut want = plain.clone();
        for (row, o) in want.chunks_mut(n).enumerate() {
            let tok = row % t;
            if tok < prefix {
                continue;
            }
            let p = tok - prefix;
            for h in o.chunks_mut(hd) {
                let v = h.to_vec();
                for j in 0..hd {
                    let (c, s) = (ch[p * hd / 2 + j % (hd / 2)], sh[p * hd / 2 + j % (hd / 2)]);
                    let rot = if j < hd / 2 {
                        -v[j + hd / 2]
                    } else {
                        v[j - hd / 2]
                    };
                    h[j] = v[j] * c + rot * s;
                }
            }
        }
        assert!(crate::ops::testing::rel_err(&got, &want) < 1e-5);

        let with_resid = gelu.with_epilogue(Epilogue::Residual);
        let got = run(&with_resid, &[(&resid, &[b, t, n]), (&lambda, &[n])]);
        let want: Vec<f32> = (0..plain.len())
            .map(|i| resid[i] + lambda[i % n] * plain[i])
            .collect();
        assert!(crate::ops::testing::rel_err(&got, &want) < 1e-5);
    }

    #[test]
    fn texture_path_matches_reference() {
        // x·Wᵀ shapes that take the texture path: every column-block width, partial last
        // blocks, rows not a multiple of the workgroup, batch folded into rows.
        for bias in [false, true] {
            let m = Matmul::linear(bias);
            for (batch, rows, n, k) in [
                // (a single output of a 4-term dot product can cancel to ~0, where a
                // max-relative error is meaningless: keep a few outputs)
                (None, 2, 5, 4),
                (None, 67, 37, 64),
                (Some(3), 45, 70, 1024),
                (None, 130, 21, 1536),
                (None, 33, 9, 4000),
                (None, 257, 384, 384),
            ] {
                check_op(&m, &shapes(&m, batch, rows, n, k, false), 1e-5);
            }
        }
    }

    #[test]
    fn texture_path_is_chosen_where_it_applies() {
        let c = crate::ops::testing::ctx();
        let names = |m: Matmul, s: Vec<Vec<usize>>| -> Vec<&'static str> {
            let bufs: Vec<_> = s.iter().map(|x| c.empty(x).unwrap()).collect();
            let refs: Vec<&wgpu::Buffer> = bufs.iter().map(|t| t.buffer.as_ref()).collect();
            let sh: Vec<&[usize]> = s.iter().map(|x| x.as_slice()).collect();
            let out = c.empty(&[1]).unwrap();
            m.gpu(c, &refs, &sh, &out.buffer)
                .unwrap()
                .iter()
                .map(|d| d.name)
                .collect()
        };
        let lin = Matmul::linear(false);
        let expect_tex = c.caps.subgroups
            && c.caps.min_subgroup_size >= 8
            && c.caps.max_uniform_binding >= WINDOW;
        let got = names(lin, vec![vec![10, 384], vec![40, 384]]);
        if expect_tex {
            assert_eq!(got, vec!["matmul_tex16"; 3]);
            assert_eq!(
                names(lin, vec![vec![10, 1536], vec![8, 1536]]),
                vec!["matmul_tex16"]
            );
            assert_eq!(
                names(lin, vec![vec![10, 4096], vec![5, 4096]]),
                vec!["matmul_tex4"; 2]
            );
        }
        // K % 4 != 0 and transposed A always take the generic kernel.
        assert_eq!(names(lin, vec![vec![10, 6], vec![5, 6]]), vec!["matmul"]);
        let gen = Matmul {
            kernel: MatmulKernel::Generic,
            ..lin
        };
        assert_eq!(
            names(gen, vec![vec![10, 384], vec![40, 384]]),
            vec!["matmul"]
        );
    }

    #[test]
    fn kernel_matches_reference() {
        for (ta, tb, bias) in [
            (false, false, false),
            (false, true, true),
            (true, false, true),
            (true, true, false),
        ] {
            let m = Matmul {
                trans_a: ta,
                trans_b: tb,
                bias,
                kernel: MatmulKernel::Generic,
                act: Activation::Identity,
                w_f16: false,
                epi: Epilogue::None,
                x_f16: false,
                out_f16: false,
            };
            for (batch, rows, n, k, bb) in [
                (None, 1, 1, 1, false),
                (None, 33, 17, 65, false),
                (Some(3), 45, 70, 19, true),
                (Some(2), 130, 67, 200, false),
                (None, 257, 384, 384, false),
            ] {
                check_op(&m, &shapes(&m, batch, rows, n, k, bb), 1e-5);
            }
        }
    }

    #[test]
    fn epilogue_activation_matches_reference() {
        // Both kernels (texture path where the device has it, and the generic one), with
        // and without bias, odd sizes.
        for act in [Activation::Gelu, Activation::Silu] {
            for kernel in [MatmulKernel::Auto, MatmulKernel::Generic] {
                for bias in [false, true] {
                    let m = Matmul {
                        kernel,
                        ..Matmul::linear(bias).with_act(act)
                    };
                    for (batch, rows, n, k) in [(None, 67, 37, 64), (Some(2), 45, 70, 1536)] {
                        check_op(&m, &shapes(&m, batch, rows, n, k, false), 1e-5);
                    }
                }
            }
        }
    }

    /// Runs `m` on the GPU (B uploaded as packed f16 when `m.w_f16`), output poisoned;
    /// returns the output and the dispatch names.
    fn run_w16(m: &Matmul, data: &[Vec<f32>], s: &[Vec<usize>]) -> (Vec<f32>, Vec<&'static str>) {
        let c = crate::ops::testing::ctx();
        let sh: Vec<&[usize]> = s.iter().map(|x| x.as_slice()).collect();
        let t: Vec<_> = data
            .iter()
            .zip(s)
            .enumerate()
            .map(|(i, (d, x))| {
                if i == 1 && m.w_f16 {
                    c.upload_f16(d, x).unwrap()
                } else {
                    // (device buffers of at least 64 KiB, as the executor's: small
                    // weights take the texture path too)
                    let t = c.empty(x).unwrap();
                    c.write(&t.buffer, d);
                    t
                }
            })
            .collect();
        let out = c.empty(&m.output_shape(&sh).unwrap()).unwrap();
        c.fill(&out.buffer, f32::NAN);
        let bufs: Vec<&wgpu::Buffer> = t.iter().map(|x| x.buffer.as_ref()).collect();
        let ds = m.gpu(c, &bufs, &sh, &out.buffer).unwrap();
        let names = ds.iter().map(|d| d.name).collect();
        c.run(&ds).unwrap();
        (c.download(&out).unwrap(), names)
    }

    #[test]
    fn f16_weights_match_reference() {
        // Every kernel with B stored as f16: against the reference with B rounded to f16
        // (the same numbers: 1e-5) and against the f32 reference (f16 tolerance).
        let mut r = rng();
        let mut seen = std::collections::BTreeSet::new();
        for (kernel, ta, tb, bias, batch, rows, n, k, bb, act) in [
            (
                MatmulKernel::Auto,
                false,
                true,
                true,
                None,
                67,
                37,
                64,
                false,
                Activation::Gelu,
            ),
            (
                MatmulKernel::Auto,
                false,
                true,
                false,
                Some(2),
                45,
                70,
                1536,
                false,
                Activation::Identity,
            ),
            (
                MatmulKernel::Auto,
                false,
                true,
                true,
                None,
                33,
                21,
                4104,
                false,
                Activation::Silu,
            ),
            (
                MatmulKernel::Auto,
                false,
                true,
                true,
                None,
                9,
                13,
                20,
                false,
                Activation::Identity,
            ),
            (
                MatmulKernel::Generic,
                false,
                true,
                true,
                None,
                57,
                35,
                136,
                false,
                Activation::Gelu,
            ),
            (
                MatmulKernel::Generic,
                true,
                false,
                false,
                Some(3),
                31,
                17,
                19,
                true,
                Activation::Identity,
            ),
            (
                MatmulKernel::Generic,
                false,
                false,
                true,
                None,
                5,
                7,
                3,
                false,
                Activation::Identity,
            ),
        ] {
            let m = Matmul {
                trans_a: ta,
                trans_b: tb,
                bias,
                kernel,
                act,
                w_f16: true,
                epi: Epilogue::None,
                x_f16: false,
                out_f16: false,
            };
            let s = shapes(&m, batch, rows, n, k, bb);
            let data: Vec<Vec<f32>> = s.iter().map(|x| random(&mut r, numel(x))).collect();
            let inputs: Vec<(&[f32], &[usize])> = data
                .iter()
                .zip(&s)
                .map(|(d, x)| (d.as_slice(), x.as_slice()))
                .collect();
            let (want16, _) = crate::ops::run_cpu(&m, &inputs).unwrap();
            let (want32, _) = crate::ops::run_cpu(&Matmul { w_f16: false, ..m }, &inputs).unwrap();
            let (got, names) = run_w16(&m, &data, &s);
            seen.extend(names.iter().copied());
            let e16 = crate::ops::testing::rel_err(&got, &want16);
            let e32 = crate::ops::testing::rel_err(&got, &want32);
            assert!(
                e16 <= 1e-5,
                "{m:?} {s:?} {names:?}: {e16} vs the f16-weight reference"
            );
            assert!(
                e32 <= 1e-2,
                "{m:?} {s:?} {names:?}: {e32} vs the f32 reference"
            );
        }
        assert!(seen.contains("matmul"), "{seen:?}");
        let c = crate::ops::testing::ctx();
        if c.caps.subgroups && c.caps.min_subgroup_size >= 8 && c.caps.max_uniform_binding >= WINDOW
        {
            for e in ["matmul_tex16h", "matmul_tex4h"] {
                assert!(seen.contains(e), "{e} not exercised: {seen:?}");
            }
        }
    }

    /// Whether this device takes the texture path (and so the fused epilogues).
    fn has_texture_path() -> bool {
        let c = crate::ops::testing::ctx();
        c.caps.subgroups && c.caps.min_subgroup_size >= 8 && c.caps.max_uniform_binding >= WINDOW
    }

    /// Random inputs of `s`, runs `m` on both backends (output poisoned) and checks them
    /// against each other; returns the dispatch names.
    fn check_fused(
        m: &Matmul,
        s: &[Vec<usize>],
        r: &mut rand::rngs::SmallRng,
    ) -> Vec<&'static str> {
        let data: Vec<Vec<f32>> = s.iter().map(|x| random(r, numel(x))).collect();
        let inputs: Vec<(&[f32], &[usize])> = data
            .iter()
            .zip(s)
            .map(|(d, x)| (d.as_slice(), x.as_slice()))
            .collect();
        let (want, _) = crate::ops::run_cpu(m, &inputs).unwrap();
        let (got, names) = run_w16(m, &data, s);
        let e = crate::ops::testing::rel_err(&got, &want);
        assert!(e <= 1e-5, "{m:?} {s:?} {names:?}: rel err {e}");
        names
    }

    #[test]
    fn rope_epilogue_matches_reference() {
        // q/k projections with RoPE fused: odd token counts, registers, several heads,
        // bias or not, f32 and f16 weights, both kernels; hd/2 = 4 cannot pair on the
        // texture path and takes the in-place pass.
        let mut r = rng();
        let mut seen = std::collections::BTreeSet::new();
        for (batch, t, heads, hd, prefix, k) in [
            (Some(2), 37, 3, 16, 5, 64),
            (Some(3), 21, 2, 64, 1, 96),
            (None, 9, 4, 8, 1, 24),
            (Some(1), 203, 6, 64, 5, 384),
            (Some(2), 3, 2, 16, 3, 16),
        ] {
            for (kernel, w_f16, bias) in [
                (MatmulKernel::Auto, false, true),
                (MatmulKernel::Auto, false, false),
                (MatmulKernel::Auto, true, true),
                (MatmulKernel::Generic, false, true),
                (MatmulKernel::Generic, true, false),
            ] {
                let m = Matmul {
                    kernel,
                    w_f16,
                    ..Matmul::linear(bias).with_epilogue(Epilogue::Rope { heads, prefix })
                };
                let mut s = shapes(&m.plain(), batch, t, heads * hd, k, false);
                s.extend([vec![t - prefix, hd / 2], vec![t - prefix, hd / 2]]);
                let names = check_fused(&m, &s, &mut r);
                seen.extend(names.iter().copied());
                let fused = names.iter().any(|n| n.ends_with("_rope"));
                let pass = names.contains(&"rope_inplace");
                assert!(fused != pass, "{names:?}");
                if kernel == MatmulKernel::Auto && has_texture_path() {
                    assert_eq!(fused, (hd / 2) % 8 == 0, "{m:?} {s:?}: {names:?}");
                }
            }
        }
        if has_texture_path() {
            for e in ["matmul_tex16_rope", "matmul_tex16h_rope", "rope_inplace"] {
                assert!(seen.contains(e), "{e} not exercised: {seen:?}");
            }
        }
    }

    #[test]
    fn rope_epilogue_reference_is_matmul_then_rope() {
        // The fused CPU reference against the separate ops: Matmul, then the Rope op
        // with HF's full (tiled) tables.
        let mut r = rng();
        let (b, t, heads, hd, prefix, k) = (2, 11, 3, 8, 3, 20);
        let m = Matmul::linear(true).with_epilogue(Epilogue::Rope { heads, prefix });
        let x = random(&mut r, b * t * k);
        let w = random(&mut r, heads * hd * k);
        let bias = random(&mut r, heads * hd);
        let (ch, sh) = (
            random(&mut r, (t - prefix) * hd / 2),
            random(&mut r, (t - prefix) * hd / 2),
        );
        let n = heads * hd;
        let (got, _) = crate::ops::run_cpu(
            &m,
            &[
                (&x, &[b, t, k]),
                (&w, &[n, k]),
                (&bias, &[n]),
                (&ch, &[t - prefix, hd / 2]),
                (&sh, &[t - prefix, hd / 2]),
            ],
        )
        .unwrap();
        let (y, _) = crate::ops::run_cpu(
            &Matmul::linear(true),
            &[(&x, &[b, t, k]), (&w, &[n, k]), (&bias, &[n])],
        )
        .unwrap();
        let full = |h: &[f32]| -> Vec<f32> {
            h.chunks(hd / 2)
                .flat_map(|r| r.iter().chain(r).copied())
                .collect()
        };
        let rope = super::super::rope::Rope { heads, prefix };
        let (want, _) = crate::ops::run_cpu(
            &rope,
            &[
                (&y, &[b, t, n]),
                (&full(&ch), &[t - prefix, hd]),
                (&full(&sh), &[t - prefix, hd]),
            ],
        )
        .unwrap();
        assert_eq!(got, want);
        // The prefix rows are the plain product, the others are rotated.
        assert_eq!(got[..prefix * n], y[..prefix * n]);
        assert_ne!(got[prefix * n..t * n], y[prefix * n..t * n]);
    }

    /// The activation pass (AVX2 where the CPU has it) gives exactly the per-element
    /// functions, on odd lengths and inputs over GELU's whole range.
    #[test]
    fn activation_pass_is_the_elementwise_function() {
        use rand::Rng;
        let mut r = rng();
        for act in [Activation::Gelu, Activation::Silu, Activation::Identity] {
            for n in [1, 7, 8, 9, 1031] {
                let x: Vec<f32> = (0..n).map(|_| r.random_range(-30.0f32..30.0)).collect();
                let mut got = x.clone();
                activate(act, &mut got);
                let want: Vec<f32> = x.iter().map(|v| act.apply(*v)).collect();
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{act:?} n {n}");
            }
        }
    }

    #[test]
    fn residual_epilogue_reference_is_matmul_then_scale_add() {
        // The fused CPU reference (in place, split by rows) against the product and the
        // one-line definition resid[i] + λ[i % n] · y[i], on a size that splits.
        let mut r = rng();
        let (b, t, n, k) = (3, 261, 40, 24);
        let m = Matmul::linear(true).with_epilogue(Epilogue::Residual);
        let x = random(&mut r, b * t * k);
        let w = random(&mut r, n * k);
        let bias = random(&mut r, n);
        let resid = random(&mut r, b * t * n);
        let lambda = random(&mut r, n);
        let (got, _) = crate::ops::run_cpu(
            &m,
            &[
                (&x, &[b, t, k]),
                (&w, &[n, k]),
                (&bias, &[n]),
                (&resid, &[b, t, n]),
                (&lambda, &[n]),
            ],
        )
        .unwrap();
        let (y, _) = crate::ops::run_cpu(
            &Matmul::linear(true),
            &[(&x, &[b, t, k]), (&w, &[n, k]), (&bias, &[n])],
        )
        .unwrap();
        let want: Vec<f32> = (0..y.len())
            .map(|i| resid[i] + lambda[i % n] * y[i])
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn residual_epilogue_matches_reference() {
        // out = resid + λ ⊙ (x·Wᵀ + b): 16- and 4-column blocks (K up to 4104), partial
        // last blocks, bias or not, f32 and f16 weights, both kernels; an activation
        // before the residual takes the in-place pass.
        let mut r = rng();
        let mut seen = std::collections::BTreeSet::new();
        // (N % 4 != 0 cannot stream the residual as 4-column texels: in-place pass)
        for (batch, rows, n, k) in [
            (Some(2), 45, 68, 64),
            (None, 67, 36, 1536),
            (Some(3), 13, 20, 4000),
            (None, 33, 12, 4104),
            (Some(2), 7, 37, 64),
        ] {
            for (kernel, w_f16, bias, act) in [
                (MatmulKernel::Auto, false, true, Activation::Identity),
                (MatmulKernel::Auto, false, false, Activation::Identity),
                (MatmulKernel::Auto, true, true, Activation::Identity),
                (MatmulKernel::Auto, false, true, Activation::Gelu),
                (MatmulKernel::Generic, false, true, Activation::Identity),
                (MatmulKernel::Generic, true, false, Activation::Silu),
            ] {
                let m = Matmul {
                    kernel,
                    w_f16,
                    ..Matmul::linear(bias)
                        .with_act(act)
                        .with_epilogue(Epilogue::Residual)
                };
                let mut s = shapes(&m.plain(), batch, rows, n, k, false);
                let mut out = s[0].clone();
                *out.last_mut().unwrap() = n;
                s.extend([out, vec![n]]);
                let names = check_fused(&m, &s, &mut r);
                seen.extend(names.iter().copied());
                let fused = names.iter().any(|n| n.ends_with("_res"));
                assert!(fused != names.contains(&"residual_inplace"), "{names:?}");
                // (f32 weights with K = 4104 exceed a window: generic kernel)
                if names[0].starts_with("matmul_tex") {
                    assert_eq!(
                        fused,
                        act == Activation::Identity && n % 4 == 0,
                        "{names:?}"
                    );
                }
            }
        }
        if has_texture_path() {
            for e in [
                "matmul_tex16_res",
                "matmul_tex4_res",
                "matmul_tex16h_res",
                "matmul_tex4h_res",
                "residual_inplace",
            ] {
                assert!(seen.contains(e), "{e} not exercised: {seen:?}");
            }
        }
    }

    #[test]
    fn epilogues_reject_bad_inputs() {
        let rope = Matmul::linear(false).with_epilogue(Epilogue::Rope {
            heads: 2,
            prefix: 1,
        });
        // cos/sin must be (T − prefix, hd/2).
        let e = rope
            .output_shape(&[&[5, 8], &[16, 8], &[4, 8], &[4, 8]])
            .unwrap_err();
        assert!(e.to_string().contains("cos and sin"), "{e}");
        assert!(rope
            .output_shape(&[&[5, 8], &[16, 8], &[4, 4], &[4, 4]])
            .is_ok());
        // Head size must be even; missing tables are an input-count error.
        let e = Matmul::linear(false)
            .with_epilogue(Epilogue::Rope {
                heads: 3,
                prefix: 0,
            })
            .output_shape(&[&[5, 8], &[9, 8], &[5, 1], &[5, 1]])
            .unwrap_err();
        assert!(e.to_string().contains("even"), "{e}");
        assert!(rope.output_shape(&[&[5, 8], &[16, 8]]).is_err());
        let res = Matmul::linear(true).with_epilogue(Epilogue::Residual);
        let e = res
            .output_shape(&[&[2, 5, 8], &[6, 8], &[6], &[10, 6], &[6]])
            .unwrap_err();
        assert!(e.to_string().contains("residual"), "{e}");
        assert!(res
            .output_shape(&[&[2, 5, 8], &[6, 8], &[6], &[2, 5, 6], &[6]])
            .is_ok());
    }

    /// Times the bench cases whose label contains `LAB_FILTER` by GFLOP per CPU-second
    /// (development aid).
    #[test]
    #[ignore]
    fn lab_time() {
        let filter = std::env::var("LAB_FILTER").unwrap_or_default();
        for case in bench_cases() {
            if case.label.contains(&filter) {
                eprintln!("{}", case.label);
                crate::ops::testing::lab_time(crate::ops::testing::ctx(), &case);
            }
        }
    }

    /// The gemm crate's ceiling on the ViT-S linear shapes (M = 16·261 tokens, x·Wᵀ):
    /// our reference vs the crate with W transposed once to [K, N], with and without the
    /// pre-filled bias, with Rayon(threads) vs None, by GFLOP per process CPU-second
    /// (development aid: `cargo test --release --lib gemm_ceiling -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn gemm_ceiling() {
        use crate::bench::process_cpu_seconds;
        let mut r = rng();
        let rows = 16 * 261;
        let reps = 6;
        for (k, n) in [(384, 1152), (384, 384), (384, 1536), (1536, 384)] {
            let a = random(&mut r, rows * k);
            let w = random(&mut r, n * k);
            let bias = random(&mut r, n);
            let mut wt = vec![0f32; k * n];
            for j in 0..n {
                for l in 0..k {
                    wt[l * n + j] = w[j * k + l];
                }
            }
            let mut out = vec![f32::NAN; rows * n];
            let gf = 2.0 * (rows * n * k) as f64 * reps as f64 / 1e9;
            let time = |label: &str, f: &mut dyn FnMut(&mut [f32])| {
                let mut out = vec![f32::NAN; rows * n];
                f(&mut out);
                let (w0, c0) = (std::time::Instant::now(), process_cpu_seconds().unwrap());
                for _ in 0..reps {
                    f(&mut out);
                }
                let (wt, ct) = (
                    w0.elapsed().as_secs_f64(),
                    process_cpu_seconds().unwrap() - c0,
                );
                eprintln!(
                    "K={k:4} N={n:4} {label:40} {:6.1} GFLOP/s wall {:6.1} GFLOP/CPU-s",
                    gf / wt,
                    gf / ct
                );
                out
            };
            let m = Matmul::linear(true);
            let d = Dims {
                batch: 1,
                m: rows,
                n,
                k,
                b_batched: false,
            };
            let ours = time("reference (W [N,K], bias prefill)", &mut |o| {
                matmul(&m, d, &a, &w, &bias, o)
            });
            let raw = |o: &mut [f32], b: &[f32], (b_rs, b_cs): (isize, isize), pre: bool, par| unsafe {
                if pre {
                    for row in o.chunks_mut(n) {
                        row.copy_from_slice(&bias);
                    }
                }
                gemm::gemm(
                    rows,
                    n,
                    k,
                    o.as_mut_ptr(),
                    1,
                    n as isize,
                    pre,
                    a.as_ptr(),
                    1,
                    k as isize,
                    b.as_ptr(),
                    b_cs,
                    b_rs,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    par,
                );
            };
            let par = crate::ops::par::gemm_parallelism();
            let th = crate::ops::par::threads();
            for (label, wl, st, pre, p) in [
                ("W [N,K] no bias Rayon", &w, (1, k as isize), false, par),
                (
                    "W^T [K,N] bias prefill Rayon",
                    &wt,
                    (n as isize, 1),
                    true,
                    par,
                ),
                ("W^T [K,N] no bias Rayon", &wt, (n as isize, 1), false, par),
                (
                    "W^T [K,N] no bias None",
                    &wt,
                    (n as isize, 1),
                    false,
                    gemm::Parallelism::None,
                ),
            ] {
                time(label, &mut |o| raw(o, wl, st, pre, p));
            }
            // Row blocks, one per thread, each single-threaded.
            let _ = time("W^T [K,N] row blocks per thread", &mut |o| {
                let per = rows.div_ceil(th);
                let so = crate::ops::par::SharedOut::new(o);
                crate::ops::par::for_each_index(th, |t| {
                    let r0 = t * per;
                    let r1 = (r0 + per).min(rows);
                    let o = unsafe { so.slice(r0 * n, (r1 - r0) * n) };
                    unsafe {
                        gemm::gemm(
                            r1 - r0,
                            n,
                            k,
                            o.as_mut_ptr(),
                            1,
                            n as isize,
                            false,
                            a.as_ptr().add(r0 * k),
                            1,
                            k as isize,
                            wt.as_ptr(),
                            1,
                            n as isize,
                            1.0,
                            1.0,
                            false,
                            false,
                            false,
                            gemm::Parallelism::None,
                        );
                    }
                });
            });
            out.copy_from_slice(&ours);
        }
    }

    #[test]
    fn kernel_handles_k_zero_free_shapes() {
        let m = Matmul::linear(true);
        let s = shapes(&m, None, 5, 3, 4, false);
        let mut r = rng();
        let data: Vec<Vec<f32>> = s.iter().map(|x| random(&mut r, numel(x))).collect();
        check_op_with(&m, &data, &s, 1e-5);
    }

    #[test]
    fn rejects_mismatched_inner_size() {
        let e = Matmul::linear(false)
            .output_shape(&[&[4, 5], &[3, 4]])
            .unwrap_err();
        assert!(e.to_string().contains("inner sizes differ"), "{e}");
    }
}
