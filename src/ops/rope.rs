//! Rotary position embedding as DINOv3 applies it: to the patch tokens of q and k, after
//! the CLS and register tokens, with one (cos, sin) table shared by all heads.

use super::{expect_inputs, numel, Op};
use crate::error::{Error, Result};
use crate::gpu::{Dispatch, GpuContext, KernelArgs};
use crate::shaders::ROPE;

/// Inputs: x (B, T, H·hd), cos (P, hd), sin (P, hd) with P = T − prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rope {
    pub heads: usize,
    /// Leading tokens left unrotated (1 CLS + registers).
    pub prefix: usize,
}

/// The CPU reference: `x·cos + rotate_half(x)·sin` per head on tokens `prefix..` of each
/// (T, dim) slab of `x`, where `rotate_half(x) = [−x[hd/2..], x[..hd/2]]`.
pub fn rope(
    x: &[f32],
    cos: &[f32],
    sin: &[f32],
    t: usize,
    dim: usize,
    hd: usize,
    prefix: usize,
    out: &mut [f32],
) {
    if dim == 0 || t == 0 {
        return;
    }
    super::par::for_units(out, dim, 64, |r0, rows| {
        rope_rows(&x[r0 * dim..], cos, sin, t, dim, hd, prefix, r0, rows)
    });
}

/// [`rope`] on `x` in place (`x` as both input and output), split across threads by
/// rows; each task copies one row at a time.
pub fn rope_in_place(
    cos: &[f32],
    sin: &[f32],
    t: usize,
    dim: usize,
    hd: usize,
    prefix: usize,
    x: &mut [f32],
) {
    if dim == 0 || t == 0 {
        return;
    }
    super::par::for_units(x, dim, 64, |r0, rows| {
        rope_rows_in_place(cos, sin, t, dim, hd, prefix, r0, rows)
    });
}

avx2_too! {
    fn rope_rows(
        x: &[f32],
        cos: &[f32],
        sin: &[f32],
        t: usize,
        dim: usize,
        hd: usize,
        prefix: usize,
        r0: usize,
        out: &mut [f32],
    ) {
        let half = hd / 2;
        for (row, (xr, or)) in x.chunks(dim).zip(out.chunks_mut(dim)).enumerate() {
            let tok = (r0 + row) % t;
            if tok < prefix {
                or.copy_from_slice(xr);
                continue;
            }
            let p = tok - prefix;
            let (c, s) = (&cos[p * hd..(p + 1) * hd], &sin[p * hd..(p + 1) * hd]);
            // rotate_half(x)·sin: −x[j + half]·sin[j] below half, x[j − half]·sin[j] above
            // (both halves in one branch-free loop, so it vectorises; a − b is a + (−b) bit
            // for bit).
            for (xh, oh) in xr.chunks(hd).zip(or.chunks_mut(hd)) {
                let (lo, hi) = xh.split_at(half);
                let (olo, ohi) = oh.split_at_mut(half);
                for j in 0..half {
                    olo[j] = lo[j] * c[j] - hi[j] * s[j];
                    ohi[j] = hi[j] * c[half + j] + lo[j] * s[half + j];
                }
            }
        }
    }
}

/// [`rope`] in place on `rows` (whole rows of `dim`, the first being row `r0` of the
/// tensor), on the calling thread; one row is copied at a time.
#[allow(clippy::too_many_arguments)]
pub(crate) fn rope_rows_in_place(
    cos: &[f32],
    sin: &[f32],
    t: usize,
    dim: usize,
    hd: usize,
    prefix: usize,
    r0: usize,
    rows: &mut [f32],
) {
    let mut src = vec![0f32; dim];
    for (i, row) in rows.chunks_exact_mut(dim).enumerate() {
        src.copy_from_slice(row);
        rope_rows(&src, cos, sin, t, dim, hd, prefix, r0 + i, row);
    }
}

impl Rope {
    fn check(&self, inputs: &[&[usize]]) -> Result<(usize, usize, usize)> {
        expect_inputs("rope", inputs, 3)?;
        let x = inputs[0];
        let err = |m: String| Error::shape("rope", m);
        if x.len() != 3
            || self.heads == 0
            || !x[2].is_multiple_of(self.heads)
            || !(x[2] / self.heads).is_multiple_of(2)
        {
            return Err(err(format!(
                "x must be (B, T, heads·hd) with even hd and {} heads, got {x:?}",
                self.heads
            )));
        }
        let (t, dim) = (x[1], x[2]);
        let hd = dim / self.heads;
        if t < self.prefix {
            return Err(err(format!("{t} tokens but {} prefix tokens", self.prefix)));
        }
        let table = [t - self.prefix, hd];
        if inputs[1] != table || inputs[2] != table {
            return Err(err(format!(
                "cos and sin must be {table:?}, got {:?} and {:?}",
                inputs[1], inputs[2]
            )));
        }
        Ok((t, dim, hd))
    }
}

impl Op for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }
    fn output_shape(&self, inputs: &[&[usize]]) -> Result<Vec<usize>> {
        self.check(inputs)?;
        Ok(inputs[0].to_vec())
    }
    fn cpu(&self, inputs: &[&[f32]], shapes: &[&[usize]], out: &mut [f32]) {
        let (t, dim, hd) = self
            .check(shapes)
            .expect("shapes were checked when the graph was built");
        rope(
            inputs[0],
            inputs[1],
            inputs[2],
            t,
            dim,
            hd,
            self.prefix,
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
        let (t, dim, hd) = self.check(shapes)?;
        let n = numel(shapes[0]) as u32;
        let params = [
            n,
            t as u32,
            dim as u32,
            hd as u32,
            self.prefix as u32,
            0,
            0,
            0,
        ];
        Ok(vec![ctx.dispatch(KernelArgs {
            shader: &ROPE,
            entry: "rope",
            constants: &[],
            buffers: &[inputs[0], inputs[1], inputs[2], out],
            params: bytemuck::cast_slice(&params),
            workgroups: ctx.grid((n as u64).div_ceil(64))?,
        })?])
    }
}

/// Benchmark cases for `cargo bench`.
pub fn bench_cases() -> Vec<crate::bench::Case> {
    vec![crate::bench::Case::new(
        "rope vit-s 201 b32",
        Rope {
            heads: 6,
            prefix: 5,
        },
        vec![vec![32, 201, 384], vec![196, 64], vec![196, 64]],
    )]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::check_op;

    #[test]
    fn kernel_matches_reference() {
        for (b, t, heads, hd, prefix) in [
            (1, 5, 1, 2, 5),
            (2, 9, 4, 16, 5),
            (3, 37, 3, 64, 1),
            (1, 201, 6, 64, 5),
        ] {
            let r = Rope { heads, prefix };
            check_op(
                &r,
                &[
                    vec![b, t, heads * hd],
                    vec![t - prefix, hd],
                    vec![t - prefix, hd],
                ],
                1e-6,
            );
        }
    }

    #[test]
    fn reference_rotates_pairs() {
        // One head, hd 4, one patch token after one prefix token; angle θ on both pairs.
        let (c, s) = (0.6f32, 0.8f32);
        let x = [9.0, 9.0, 9.0, 9.0, 1.0, 2.0, 3.0, 4.0];
        let mut out = [0.0; 8];
        rope(&x, &[c; 4], &[s; 4], 2, 4, 4, 1, &mut out);
        assert_eq!(&out[..4], &x[..4]);
        let want = [
            1.0 * c - 3.0 * s,
            2.0 * c - 4.0 * s,
            3.0 * c + 1.0 * s,
            4.0 * c + 2.0 * s,
        ];
        for (o, w) in out[4..].iter().zip(want) {
            assert!((o - w).abs() < 1e-6);
        }
    }

    /// The in-place form (split by rows across threads) gives exactly the out-of-place
    /// reference, prefix rows untouched, on a batch large enough to split.
    #[test]
    fn in_place_matches_reference() {
        use crate::ops::testing::{random, rng};
        let mut r = rng();
        for (b, t, heads, hd, prefix) in [(16, 261, 6, 64, 5), (3, 37, 3, 8, 1), (1, 2, 1, 2, 2)] {
            let dim = heads * hd;
            let x = random(&mut r, b * t * dim);
            let (cos, sin) = (
                random(&mut r, (t - prefix) * hd),
                random(&mut r, (t - prefix) * hd),
            );
            let mut want = vec![f32::NAN; x.len()];
            rope(&x, &cos, &sin, t, dim, hd, prefix, &mut want);
            let mut got = x.clone();
            rope_in_place(&cos, &sin, t, dim, hd, prefix, &mut got);
            assert_eq!(got, want, "{b} {t} {heads} {hd} {prefix}");
        }
    }

    #[test]
    fn rejects_wrong_tables() {
        let e = Rope {
            heads: 2,
            prefix: 1,
        }
        .output_shape(&[&[1, 5, 8], &[5, 4], &[5, 4]])
        .unwrap_err();
        assert!(e.to_string().contains("rope"), "{e}");
    }
}
