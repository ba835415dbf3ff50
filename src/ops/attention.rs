//! Fused multi-head attention without a mask, as torch SDPA on `(B, H, T, hd)` views:
//! per head `softmax(q·kᵀ·scale)·v`, heads concatenated in order.
//!
//! Inputs: q `(B, Tq, H·hd)`, k `(B, Tk, H·hd)`, v `(B, Tk, H·hd)`; head h owns channels
//! `[h·hd, (h+1)·hd)`. Output `(B, Tq, H·hd)`. The kernel streams over keys with an online
//! softmax, so the `Tq×Tk` score matrix is never stored.

use super::{expect_inputs, Op};
use crate::error::{Error, Result};
use crate::gpu::{Dispatch, GpuContext, KernelArgs};
use crate::shaders::ATTENTION;

/// The largest head size the GPU kernel handles (ViT-7B's).
pub const MAX_HEAD_DIM: usize = 128;

/// The attention op.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Attention {
    pub heads: usize,
    /// Score scale; `None` means `hd^-0.5`.
    pub scale: Option<f32>,
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
        Attention { heads, scale: None }
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
            return Err(err(format!(
                "q {q:?} and k {k:?} differ in batch or width"
            )));
        }
        if self.heads == 0 || q[2] % self.heads != 0 || q[2] == 0 {
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

/// The CPU reference: for each batch, head and query row, the scores against every key
/// (f64), their softmax, and the weighted sum of value rows.
pub fn attention(q: &[f32], k: &[f32], v: &[f32], d: Dims, scale: f32, out: &mut [f32]) {
    let w = d.heads * d.hd;
    let mut scores = vec![0f64; d.tk];
    let mut acc = vec![0f64; d.hd];
    for b in 0..d.batch {
        for h in 0..d.heads {
            let col = h * d.hd;
            for i in 0..d.tq {
                let qr = &q[(b * d.tq + i) * w + col..][..d.hd];
                for (j, s) in scores.iter_mut().enumerate() {
                    let kr = &k[(b * d.tk + j) * w + col..][..d.hd];
                    let dot: f64 = qr.iter().zip(kr).map(|(x, y)| *x as f64 * *y as f64).sum();
                    *s = dot * scale as f64;
                }
                let max = scores.iter().fold(f64::NEG_INFINITY, |m, s| m.max(*s));
                let mut sum = 0.0;
                for s in &mut scores {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                acc.fill(0.0);
                for (j, s) in scores.iter().enumerate() {
                    let vr = &v[(b * d.tk + j) * w + col..][..d.hd];
                    for (a, x) in acc.iter_mut().zip(vr) {
                        *a += s * *x as f64;
                    }
                }
                let o = &mut out[(b * d.tq + i) * w + col..][..d.hd];
                for (o, a) in o.iter_mut().zip(&acc) {
                    *o = (a / sum) as f32;
                }
            }
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    tq: u32,
    tk: u32,
    heads: u32,
    stride: u32,
    scale: f32,
    _pad: [u32; 3],
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
        if d.hd > MAX_HEAD_DIM {
            return Err(Error::shape(
                "attention",
                format!(
                    "head size {} exceeds the kernel's maximum {MAX_HEAD_DIM}",
                    d.hd
                ),
            ));
        }
        if d.batch == 0 || d.tq == 0 {
            return Ok(vec![]);
        }
        let w = d.heads * d.hd;
        let wg = 8usize;
        let max = ctx.caps.max_workgroups_per_dim as usize;
        let groups = [d.tq.div_ceil(wg), d.heads, d.batch];
        let elems = d.batch * d.tq.max(d.tk) * w;
        if groups.iter().any(|g| *g > max) || elems > u32::MAX as usize {
            return Err(Error::shape(
                "attention",
                format!("{d:?} is too large for one kernel launch"),
            ));
        }
        let p = Params {
            tq: d.tq as u32,
            tk: d.tk as u32,
            heads: d.heads as u32,
            stride: w as u32,
            scale: self.scale_for(d.hd),
            _pad: [0; 3],
        };
        let shader = dev_shader();
        Ok(vec![ctx.dispatch(KernelArgs {
            shader,
            entry: "attention",
            constants: &[("WG", wg as f64), ("HD", d.hd as f64)],
            buffers: &[inputs[0], inputs[1], inputs[2], out],
            params: bytemuck::bytes_of(&p),
            workgroups: groups.map(|g| g as u32),
        })?])
    }
    fn flops(&self, shapes: &[&[usize]]) -> u64 {
        self.dims(shapes)
            .map(|d| 4 * (d.batch * d.heads * d.tq * d.tk * d.hd) as u64)
            .unwrap_or(0)
    }
}

// DEV ONLY: load the kernel from VOLFUSE_DEV_ATTN for fast iteration.
fn dev_shader() -> &'static crate::shaders::Shader {
    use std::sync::OnceLock;
    static S: OnceLock<&'static crate::shaders::Shader> = OnceLock::new();
    S.get_or_init(|| match std::env::var("VOLFUSE_DEV_ATTN") {
        Ok(path) => {
            let text = std::fs::read_to_string(&path).expect("dev shader");
            Box::leak(Box::new(crate::shaders::Shader {
                name: "attention_dev",
                text: Box::leak(text.into_boxed_str()),
            }))
        }
        Err(_) => &ATTENTION,
    })
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
mod tests {
    use super::*;
    use crate::ops::testing::{check_op, check_op_with, random, rel_err, rng};

    fn shapes(b: usize, tq: usize, tk: usize, heads: usize, hd: usize) -> Vec<Vec<usize>> {
        vec![
            vec![b, tq, heads * hd],
            vec![b, tk, heads * hd],
            vec![b, tk, heads * hd],
        ]
    }

    #[test]
    fn kernel_matches_reference() {
        for (b, tq, tk, heads, hd) in [
            (1, 1, 1, 1, 64),
            (2, 7, 7, 3, 64),
            (1, 201, 201, 6, 64),
            (2, 257, 257, 2, 32),
            (1, 9, 130, 2, 128),
            (3, 33, 5, 4, 32),
            (1, 17, 17, 1, 8),
        ] {
            check_op(&Attention::new(heads), &shapes(b, tq, tk, heads, hd), 1e-5);
        }
        let s = Attention {
            heads: 2,
            scale: Some(0.3),
        };
        check_op(&s, &shapes(2, 15, 23, 2, 64), 1e-5);
    }

    /// Inputs scaled so each softmax is far from uniform (a few keys dominate).
    #[test]
    fn kernel_matches_reference_peaked() {
        let mut r = rng();
        for (b, tq, tk, heads, hd) in [(2, 201, 201, 6, 64), (1, 65, 257, 2, 128), (1, 31, 7, 1, 32)] {
            let s = shapes(b, tq, tk, heads, hd);
            let mut data: Vec<Vec<f32>> = s
                .iter()
                .map(|x| random(&mut r, x.iter().product()))
                .collect();
            for x in &mut data[..2] {
                for v in x.iter_mut() {
                    *v *= 3.0;
                }
            }
            check_op_with(&Attention::new(heads), &data, &s, 1e-5);
        }
    }

    /// The reference on a case worked by hand: one key dominates, two keys tie.
    #[test]
    fn reference_by_hand() {
        let d = Dims {
            batch: 1,
            tq: 1,
            tk: 2,
            heads: 1,
            hd: 2,
        };
        let mut out = vec![0.0; 2];
        attention(&[1.0, 0.0], &[0.0, 0.0, 0.0, 0.0], &[1.0, 2.0, 3.0, 4.0], d, 1.0, &mut out);
        assert!(rel_err(&out, &[2.0, 3.0]) < 1e-7, "{out:?}");
        attention(&[100.0, 0.0], &[1.0, 0.0, 0.0, 0.0], &[1.0, 2.0, 3.0, 4.0], d, 1.0, &mut out);
        assert!(rel_err(&out, &[1.0, 2.0]) < 1e-7, "{out:?}");
    }

    #[test]
    fn rejects_bad_shapes() {
        let a = Attention::new(4);
        for bad in [
            shapes(1, 3, 3, 4, 8)[..2].to_vec(),
            vec![vec![1, 3, 32], vec![1, 4, 32], vec![1, 5, 32]],
            vec![vec![1, 3, 32], vec![2, 4, 32], vec![2, 4, 32]],
            vec![vec![1, 3, 32], vec![1, 4, 16], vec![1, 4, 16]],
            vec![vec![1, 3, 30], vec![1, 4, 30], vec![1, 4, 30]],
            vec![vec![3, 32], vec![4, 32], vec![4, 32]],
            vec![vec![1, 3, 32], vec![1, 0, 32], vec![1, 0, 32]],
        ] {
            let refs: Vec<&[usize]> = bad.iter().map(|s| s.as_slice()).collect();
            let e = a.output_shape(&refs).unwrap_err();
            assert!(e.to_string().contains("attention"), "{e}");
        }
        let e = Attention::new(0)
            .output_shape(&[&[1, 3, 32], &[1, 3, 32], &[1, 3, 32]])
            .unwrap_err();
        assert!(e.to_string().contains("attention"), "{e}");
    }

    #[test]
    fn gpu_rejects_oversized_heads() {
        let a = Attention::new(1);
        let s = [1usize, 2, 256];
        let buf = crate::ops::testing::ctx().empty(&s).unwrap();
        let b = buf.buffer.as_ref();
        let e = a
            .gpu(crate::ops::testing::ctx(), &[b, b, b], &[&s, &s, &s], b)
            .unwrap_err();
        assert!(e.to_string().contains("attention"), "{e}");
    }

    #[test]
    #[ignore]
    fn dev_small() {
        check_op(&Attention::new(1), &shapes(1, 8, 8, 1, 64), 1e-5);
    }

    /// DEV: timing of the bench shapes in a test build (kernel speed does not depend on
    /// the Rust optimisation level).
    #[test]
    #[ignore]
    fn dev_time() {
        let ctx = crate::ops::testing::ctx();
        eprintln!("{}", ctx.describe());
        let f = std::env::var("DEV_FILTER").unwrap_or_default();
        for c in bench_cases().into_iter().filter(|c| c.label.contains(&f)) {
            eprintln!("{}", crate::bench::time_gpu(ctx, &c, 3).unwrap());
        }
    }
}
