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
    /// The texture path when the shapes and device allow it (four rows × 16 columns per
    /// invocation where the block has 16 columns; X read as a storage texture on CPU
    /// adapters), else the generic kernel.
    #[default]
    Auto,
    /// Register-tiled kernel reading storage buffers: any shape, any device.
    Generic,
    /// The texture path with one row per invocation (`matmul_tex16*`, the kernels before
    /// the four-row ones) and X through a sampled texture, where it applies, else the
    /// generic kernel: an autotuning alternative to `Auto`.
    TexOneRow,
    /// As `Auto`, but X always through a sampled texture (`Auto` reads it as a storage
    /// texture on CPU adapters, `GpuContext::storage_x`): an autotuning alternative.
    TexSampled,
    /// As `Auto`, but W always through 64 KiB uniform windows, one dispatch per 16-column
    /// block (`Auto` reads f32 W from a texture with every block in one dispatch where X
    /// is a storage texture): an autotuning alternative.
    TexWindows,
    /// As `Auto`, but where W is read from a texture an invocation takes two 16-column
    /// blocks (`matmul_tex32r4w*`, 32 columns) instead of three (`matmul_tex48r4w*`):
    /// an autotuning alternative.
    TexPairs,
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
    // SAFETY (every call below): the pointers cover [r x k] of op(A) from row `r0`,
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
    if batch == 1 && crate::ops::par::may_split() && rows >= 2 * BLOCK_ROWS {
        // A whole number of blocks per thread, so no thread waits on a last odd block.
        let th = crate::ops::par::threads();
        let blocks = rows.div_ceil(BLOCK_ROWS).div_ceil(th) * th;
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
            Some(cols) if self.kernel != MatmulKernel::Generic => {
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

mod gpu;
use gpu::*;

#[cfg(test)]
mod tests;
