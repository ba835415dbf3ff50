//! Batched matrix product with optional transposes and a bias epilogue:
//! `out[b] = op(A[b]) · op(B[b]) + bias`, `op` = identity or transpose.
//!
//! Shapes: A is `[batch.., M, K]` (`[batch.., K, M]` with `trans_a`); B is `[K, N]`
//! (`[N, K]` with `trans_b`, the PyTorch Linear weight layout) or carries the same batch
//! dims as A; bias is `[N]`. Output `[batch.., M, N]`.

use super::{expect_inputs, numel, Op};
use crate::error::{Error, Result};
use crate::gpu::{Dispatch, GpuContext, KernelArgs};
use crate::shaders::MATMUL;

/// The matmul op.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Matmul {
    pub trans_a: bool,
    pub trans_b: bool,
    /// A third input `[N]` is added to every row.
    pub bias: bool,
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
        }
    }

    pub fn dims(&self, inputs: &[&[usize]]) -> Result<Dims> {
        let err = |m: String| Error::shape("matmul", m);
        expect_inputs("matmul", inputs, 2 + self.bias as usize)?;
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
        Ok(Dims {
            batch,
            m,
            n,
            k,
            b_batched,
        })
    }
}

/// The CPU reference (through the `gemm` crate). `bias` is `[n]` or empty.
pub fn matmul(m: &Matmul, d: Dims, a: &[f32], b: &[f32], bias: &[f32], out: &mut [f32]) {
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
    for bi in 0..batch {
        let a_off = bi * rows * k;
        let b_off = if b_batched { bi * k * n } else { 0 };
        let o = &mut out[bi * rows * n..(bi + 1) * rows * n];
        if !bias.is_empty() {
            for row in o.chunks_mut(n) {
                row.copy_from_slice(&bias[..n]);
            }
        }
        if rows == 0 || n == 0 {
            continue;
        }
        if k == 0 {
            if bias.is_empty() {
                o.fill(0.0);
            }
            continue;
        }
        // SAFETY: the pointers cover [rows x k], [k x n] and [rows x n] with the strides
        // given (checked by the asserts above and the slicing of `o`).
        unsafe {
            gemm::gemm(
                rows,
                n,
                k,
                o.as_mut_ptr(),
                1,
                n as isize,
                !bias.is_empty(),
                a.as_ptr().add(a_off),
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
                gemm::Parallelism::None,
            );
        }
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
        matmul(self, d, inputs[0], inputs[1], bias, out);
    }
    fn gpu(
        &self,
        ctx: &GpuContext,
        inputs: &[&wgpu::Buffer],
        shapes: &[&[usize]],
        out: &wgpu::Buffer,
    ) -> Result<Vec<Dispatch>> {
        let d = self.dims(shapes)?;
        gpu_matmul(ctx, self, d, inputs, out)
    }
    fn flops(&self, shapes: &[&[usize]]) -> u64 {
        self.dims(shapes)
            .map(|d| 2 * (d.batch * d.m * d.n * d.k) as u64)
            .unwrap_or(0)
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
        shader: &MATMUL,
        entry: "matmul",
        constants: &[],
        buffers: &[inputs[0], inputs[1], bias, out],
        params: bytemuck::bytes_of(&p),
        workgroups: {
            let [x, y, _] = ctx.grid(tiles.div_ceil(64))?;
            [x, y, d.batch as u32]
        },
    })?])
}

/// Benchmark cases for `cargo bench`.
pub fn bench_cases() -> Vec<crate::bench::Case> {
    use crate::bench::Case;
    vec![
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
                    out[bi * d.m * d.n + i * d.n + j] = s as f32;
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
        for (ta, tb, bias) in [
            (false, false, false),
            (true, false, true),
            (false, true, true),
            (true, true, false),
        ] {
            let m = Matmul {
                trans_a: ta,
                trans_b: tb,
                bias,
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
