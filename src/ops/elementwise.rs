//! Element-wise ops: GELU (erf form), SiLU, sigmoid, ReLU, and broadcasting add / mul.

use super::{expect_inputs, numel, Op};
use crate::error::{Error, Result};
use crate::gpu::{Dispatch, GpuContext, KernelArgs};
use crate::shaders::ELEMENTWISE;

/// A unary activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unary {
    Gelu,
    Silu,
    Sigmoid,
    Relu,
}

/// Coefficients of P(t) in GELU's erfc fit, c₀ first (as published, beyond f32's digits).
#[allow(clippy::excessive_precision)]
const P_ERFC: [f32; 10] = [
    -1.265_512_23,
    1.000_023_68,
    0.374_091_96,
    0.096_784_18,
    -0.186_288_06,
    0.278_868_07,
    -1.135_203_98,
    1.488_515_87,
    -0.822_152_23,
    0.170_872_77,
];

/// GELU, exact erf form: 0.5·x·(1 + erf(x/√2)), through erfc so that negative x loses
/// nothing to cancellation: with u = x/√2, 1 + erf(u) = 2 − erfc(u) for u ≥ 0 and
/// erfc(|u|) for u < 0. erfc(z), z ≥ 0, is Numerical Recipes' Chebyshev fit
/// `t·exp(−z² + P(t))`, t = 1/(1 + z/2) (fractional error < 1.2e-7; the GPU kernels'
/// `erf_` is the same fit), with the softmax's polynomial exp: no branches or library
/// calls, so a loop of it vectorises (libm's `erff` was ≈ 8 % of a tile's CPU time).
/// Within 1e-6 relative of the f64 definition (test `gelu_matches_definition`).
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    // erfc(|x|/√2) < 1e-87 beyond 20: clamping keeps ±∞ out of the exps (NaN stays NaN).
    let xc = x.clamp(-20.0, 20.0);
    let z = (xc * std::f32::consts::FRAC_1_SQRT_2).abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    // P(t) = Σ cᵢ tⁱ by Estrin's scheme (pairs, then pairs of pairs: a chain of four
    // multiply-adds where Horner's would be nine).
    let fma = f32::mul_add;
    let (t2, c) = (t * t, P_ERFC);
    let t4 = t2 * t2;
    let q = |i: usize| fma(c[i + 1], t, c[i]);
    let p = fma(fma(q(6), t2, q(4)), t4, fma(q(2), t2, q(0)));
    let p = fma(q(8), t4 * t4, p);
    // exp(p − z²) with −z² = −x²/2 = −h²/2 − (x − h)(x + h)/2, h = x to 12 bits: h²/2 is
    // exact and enters the exp's argument reduction apart from the small rest (a rounded
    // z or z² would cost up to z²·2⁻²³ relative: 1e-5 at x = −12).
    let h = f32::from_bits(xc.to_bits() & 0xFFFF_F000);
    let erfc = t * super::attention::exp_sum(-0.5 * (h * h), p - 0.5 * ((xc - h) * (xc + h)));
    let one_plus_erf = if x >= 0.0 { 2.0 - erfc } else { erfc };
    0.5 * x * one_plus_erf
}
avx2_too! {
    /// `out[i] = gelu(x[i])`.
    fn gelu_slice(x: &[f32], out: &mut [f32]) {
        for i in 0..out.len() {
            out[i] = gelu(x[i]);
        }
    }
}

/// SiLU: x·σ(x).
pub fn silu(x: f32) -> f32 {
    x * sigmoid(x)
}
/// Logistic sigmoid.
pub fn sigmoid(x: f32) -> f32 {
    (1.0 / (1.0 + (-(x as f64)).exp())) as f32
}
/// max(x, 0).
pub fn relu(x: f32) -> f32 {
    x.max(0.0)
}

impl Unary {
    pub fn apply(self, x: f32) -> f32 {
        match self {
            Unary::Gelu => gelu(x),
            Unary::Silu => silu(x),
            Unary::Sigmoid => sigmoid(x),
            Unary::Relu => relu(x),
        }
    }
}

impl Op for Unary {
    fn name(&self) -> &'static str {
        match self {
            Unary::Gelu => "gelu",
            Unary::Silu => "silu",
            Unary::Sigmoid => "sigmoid",
            Unary::Relu => "relu",
        }
    }
    fn output_shape(&self, inputs: &[&[usize]]) -> Result<Vec<usize>> {
        expect_inputs(self.name(), inputs, 1)?;
        Ok(inputs[0].to_vec())
    }
    fn cpu(&self, inputs: &[&[f32]], _shapes: &[&[usize]], out: &mut [f32]) {
        fn map(x: &[f32], out: &mut [f32], f: impl Fn(f32) -> f32 + Sync + Send) {
            super::par::for_units(out, 1, 1 << 15, |i0, c| {
                for (o, x) in c.iter_mut().zip(&x[i0..]) {
                    *o = f(*x);
                }
            });
        }
        match self {
            // (compiled for AVX2 and FMA too: GELU's polynomials are multiply-adds)
            Unary::Gelu => {
                super::par::for_units(out, 1, 1 << 15, |i0, c| gelu_slice(&inputs[0][i0..], c))
            }
            Unary::Silu => map(inputs[0], out, silu),
            Unary::Sigmoid => map(inputs[0], out, sigmoid),
            Unary::Relu => map(inputs[0], out, relu),
        }
    }
    fn gpu(
        &self,
        ctx: &GpuContext,
        inputs: &[&wgpu::Buffer],
        shapes: &[&[usize]],
        out: &wgpu::Buffer,
    ) -> Result<Vec<Dispatch>> {
        let n = numel(shapes[0]) as u32;
        Ok(vec![ctx.dispatch(KernelArgs {
            shader: &ELEMENTWISE,
            entry: self.name(),
            constants: &[],
            buffers: &[inputs[0], out],
            params: bytemuck::cast_slice(&[n, 1, 1, 0]),
            workgroups: ctx.grid((n as u64).div_ceil(64))?,
        })?])
    }
    fn depth_rule(&self, shapes: &[&[usize]]) -> Option<super::DepthRule> {
        (shapes.len() == 1 && shapes[0].len() >= 3)
            .then(|| super::DepthRule::first(1, 1, super::DepthMap::Same { halo: 0 }))
    }
}

/// A binary op whose second operand is either the same shape as the first, or a vector
/// broadcast along one axis of it (`axis: Some(k)`, length `a.shape[k]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Binary {
    pub kind: BinaryKind,
    pub axis: Option<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinaryKind {
    Add,
    Mul,
}

impl Binary {
    pub fn add() -> Self {
        Binary {
            kind: BinaryKind::Add,
            axis: None,
        }
    }
    pub fn mul() -> Self {
        Binary {
            kind: BinaryKind::Mul,
            axis: None,
        }
    }
    /// `a ⊕ b[c]` with `b` a vector along `axis` of `a`.
    pub fn along(kind: BinaryKind, axis: usize) -> Self {
        Binary {
            kind,
            axis: Some(axis),
        }
    }
    /// (inner, len): b index = (i / inner) % len.
    fn broadcast(&self, a: &[usize]) -> (usize, usize) {
        match self.axis {
            None => (1, numel(a).max(1)),
            Some(k) => (numel(&a[k + 1..]).max(1), a[k].max(1)),
        }
    }
}

/// The CPU reference: `out[i] = a[i] ⊕ b[(i / inner) % len]` (split across threads in
/// runs that share one `b` value, or rows that share all of `b`).
pub fn binary(kind: BinaryKind, a: &[f32], b: &[f32], inner: usize, len: usize, out: &mut [f32]) {
    match kind {
        BinaryKind::Add => binary_with(a, b, inner, len, out, |x, y| x + y),
        BinaryKind::Mul => binary_with(a, b, inner, len, out, |x, y| x * y),
    }
}

fn binary_with(
    a: &[f32],
    b: &[f32],
    inner: usize,
    len: usize,
    out: &mut [f32],
    f: impl Fn(f32, f32) -> f32 + Sync + Send,
) {
    use super::par::for_units;
    let (inner, len) = (inner.max(1), len.max(1));
    const MIN: usize = 1 << 15; // elements per task at least
    if inner == 1 && len >= out.len() {
        // Same shapes: element by element.
        for_units(out, 1, MIN, |i0, c| {
            for ((o, x), y) in c.iter_mut().zip(&a[i0..]).zip(&b[i0..]) {
                *o = f(*x, *y);
            }
        });
    } else if inner == 1 {
        // b spans each row of `len`.
        for_units(out, len, MIN / len + 1, |r0, c| {
            for (k, orow) in c.chunks_mut(len).enumerate() {
                let arow = &a[(r0 + k) * len..];
                for ((o, x), y) in orow.iter_mut().zip(arow).zip(b) {
                    *o = f(*x, *y);
                }
            }
        });
    } else {
        // Each run of `inner` values shares one b value.
        for_units(out, inner, MIN / inner + 1, |u0, c| {
            for (k, orun) in c.chunks_mut(inner).enumerate() {
                let u = u0 + k;
                let y = b[u % len];
                for (o, x) in orun.iter_mut().zip(&a[u * inner..]) {
                    *o = f(*x, y);
                }
            }
        });
    }
}

impl Op for Binary {
    fn name(&self) -> &'static str {
        match self.kind {
            BinaryKind::Add => "add",
            BinaryKind::Mul => "mul",
        }
    }
    fn output_shape(&self, inputs: &[&[usize]]) -> Result<Vec<usize>> {
        expect_inputs(self.name(), inputs, 2)?;
        let (a, b) = (inputs[0], inputs[1]);
        let ok = match self.axis {
            None => a == b,
            Some(k) => k < a.len() && numel(b) == a[k],
        };
        if !ok {
            return Err(Error::shape(
                self.name(),
                format!(
                    "cannot combine {a:?} with {b:?} (broadcast axis {:?})",
                    self.axis
                ),
            ));
        }
        Ok(a.to_vec())
    }
    fn cpu(&self, inputs: &[&[f32]], shapes: &[&[usize]], out: &mut [f32]) {
        let (inner, len) = self.broadcast(shapes[0]);
        binary(self.kind, inputs[0], inputs[1], inner, len, out);
    }
    fn gpu(
        &self,
        ctx: &GpuContext,
        inputs: &[&wgpu::Buffer],
        shapes: &[&[usize]],
        out: &wgpu::Buffer,
    ) -> Result<Vec<Dispatch>> {
        let n = numel(shapes[0]) as u32;
        let (inner, len) = self.broadcast(shapes[0]);
        Ok(vec![ctx.dispatch(KernelArgs {
            shader: &ELEMENTWISE,
            entry: self.name(),
            constants: &[],
            buffers: &[inputs[0], out, inputs[1]],
            params: bytemuck::cast_slice(&[n, inner as u32, len as u32, 0]),
            workgroups: ctx.grid((n as u64).div_ceil(64))?,
        })?])
    }
    fn depth_rule(&self, shapes: &[&[usize]]) -> Option<super::DepthRule> {
        let ok = self.axis.is_none()
            && shapes.len() == 2
            && shapes[0].len() >= 3
            && shapes[0] == shapes[1];
        ok.then(|| super::DepthRule::first(2, 2, super::DepthMap::Same { halo: 0 }))
    }
}

/// `x + λ ⊙ y` with `λ` a vector along the last axis: LayerScale and the residual add of a
/// transformer block in one pass. Inputs: x, y (same shape), λ.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ScaleAdd;

/// The CPU reference of [`ScaleAdd`]: `out[i] = x[i] + λ[i % c] · y[i]`, a product and
/// a sum as PyTorch's `h + λ * y` rounds them (a `mul_add` is a library call per element
/// without the `fma` target feature; the GPU kernels may fuse, within the tests' 1e-6).
/// Split across threads by rows.
pub fn scale_add(x: &[f32], y: &[f32], lambda: &[f32], out: &mut [f32]) {
    let c = lambda.len();
    super::par::for_units(out, c, 64, |r0, rows| {
        let (x, y) = (&x[r0 * c..], &y[r0 * c..]);
        for ((o, x), y) in rows.chunks_mut(c).zip(x.chunks(c)).zip(y.chunks(c)) {
            for (((o, x), y), l) in o.iter_mut().zip(x).zip(y).zip(lambda) {
                *o = x + l * y;
            }
        }
    });
}

/// `y ← x + λ ⊙ y` in place, λ along the last axis (the residual epilogue of a matmul):
/// [`scale_add`] without a copy of `y`. Split across threads by rows.
pub fn scale_add_into(x: &[f32], lambda: &[f32], y: &mut [f32]) {
    let c = lambda.len();
    super::par::for_units(y, c, 64, |r0, rows| {
        scale_add_rows(&x[r0 * c..], lambda, rows)
    });
}

/// [`scale_add_into`] on whole rows of `y` (with `x` starting at the same row), on the
/// calling thread.
pub(crate) fn scale_add_rows(x: &[f32], lambda: &[f32], y: &mut [f32]) {
    for (o, x) in y.chunks_mut(lambda.len()).zip(x.chunks(lambda.len())) {
        for ((o, x), l) in o.iter_mut().zip(x).zip(lambda) {
            *o = x + l * *o;
        }
    }
}

impl Op for ScaleAdd {
    fn name(&self) -> &'static str {
        "scale_add"
    }
    fn output_shape(&self, inputs: &[&[usize]]) -> Result<Vec<usize>> {
        expect_inputs(self.name(), inputs, 3)?;
        let (x, y, l) = (inputs[0], inputs[1], inputs[2]);
        if x != y || x.is_empty() || numel(l) != x[x.len() - 1] {
            return Err(Error::shape(
                self.name(),
                format!("x {x:?} and y {y:?} must match, and λ {l:?} must be their last axis"),
            ));
        }
        Ok(x.to_vec())
    }
    fn cpu(&self, inputs: &[&[f32]], _shapes: &[&[usize]], out: &mut [f32]) {
        scale_add(inputs[0], inputs[1], inputs[2], out);
    }
    fn gpu(
        &self,
        ctx: &GpuContext,
        inputs: &[&wgpu::Buffer],
        shapes: &[&[usize]],
        out: &wgpu::Buffer,
    ) -> Result<Vec<Dispatch>> {
        let n = numel(shapes[0]) as u32;
        let c = numel(shapes[2]) as u32;
        Ok(vec![ctx.dispatch(KernelArgs {
            shader: &ELEMENTWISE,
            entry: "scale_add",
            constants: &[],
            buffers: &[inputs[0], out, inputs[1], inputs[2]],
            params: bytemuck::cast_slice(&[n, 1, c, 0]),
            workgroups: ctx.grid((n as u64).div_ceil(64))?,
        })?])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::check_op;

    #[test]
    fn scale_add_matches_reference() {
        for shape in [vec![1, 1], vec![67, 5], vec![3, 201, 384], vec![2, 7, 33]] {
            let c = shape[shape.len() - 1];
            check_op(&ScaleAdd, &[shape.clone(), shape, vec![c]], 1e-6);
        }
        assert!(ScaleAdd.output_shape(&[&[4, 5], &[4, 5], &[4]]).is_err());
    }

    /// GELU against the f64 definition 0.5·x·erfc(−x/√2) (= 0.5·x·(1 + erf(x/√2)))
    /// per element: relative error ≤ 1e-6 where GELU is above 1e-30 in magnitude
    /// (random and edge inputs), tiny or zero below; NaN and ±∞ as the definition.
    #[test]
    fn gelu_matches_definition() {
        use crate::ops::testing::rng;
        use rand::Rng;
        let mut r = rng();
        let mut xs: Vec<f32> = (0..200_000)
            .map(|_| r.random_range(-20.0f32..20.0))
            .collect();
        xs.extend((0..50_000).map(|_| r.random_range(-1e-3f32..1e-3)));
        xs.extend([0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30, 5.0, -5.0, 1e30, 3e38]);
        let mut worst = (0f64, 0f32);
        for x in xs {
            let xd = x as f64;
            let want = 0.5 * xd * libm::erfc(-xd * std::f64::consts::FRAC_1_SQRT_2);
            let got = gelu(x) as f64;
            if want.abs() > 1e-30 {
                let e = ((got - want) / want).abs();
                if e > worst.0 {
                    worst = (e, x);
                }
            } else {
                assert!(got.abs() <= 1e-30, "gelu({x}) = {got}, want {want}");
            }
        }
        assert!(
            worst.0 < 1e-6,
            "worst relative error {} at x = {}",
            worst.0,
            worst.1
        );
        assert!(gelu(f32::NAN).is_nan());
        assert_eq!(gelu(f32::INFINITY), f32::INFINITY);
        assert!(
            gelu(f32::NEG_INFINITY).is_nan(),
            "−∞·erfc(∞) = −∞·0, as the definition"
        );
        assert_eq!((gelu(0.0), gelu(25.0), gelu(-25.0)), (0.0, 25.0, 0.0));
    }

    #[test]
    fn unary_matches_reference() {
        for op in [Unary::Gelu, Unary::Silu, Unary::Sigmoid, Unary::Relu] {
            for shape in [vec![1], vec![63], vec![3, 5, 7], vec![1000, 65]] {
                check_op(&op, &[shape], 1e-6);
            }
        }
    }

    #[test]
    fn binary_matches_reference() {
        for kind in [BinaryKind::Add, BinaryKind::Mul] {
            check_op(
                &Binary { kind, axis: None },
                &[vec![17, 33], vec![17, 33]],
                1e-6,
            );
            check_op(&Binary::along(kind, 2), &[vec![2, 37, 13], vec![13]], 1e-6);
            check_op(
                &Binary::along(kind, 1),
                &[vec![2, 5, 3, 7, 9], vec![5]],
                1e-6,
            );
        }
    }

    /// The split reference against the one-line definition, on shapes large enough to be
    /// split across threads (runs, rows and whole arrays, odd sizes).
    #[test]
    fn binary_reference_matches_definition() {
        use crate::ops::testing::{random, rel_err, rng};
        let mut r = rng();
        for (n, inner, len) in [
            (70_001, 1, 70_001),
            (3 * 5 * 40_009, 1, 5),
            (6 * 1031 * 37, 37, 1031),
            (2 * 3 * 100_003, 100_003, 3),
            (7, 1, 7),
        ] {
            let a = random(&mut r, n);
            let b = random(&mut r, len);
            for kind in [BinaryKind::Add, BinaryKind::Mul] {
                let want: Vec<f32> = (0..n)
                    .map(|i| {
                        let y = b[(i / inner) % len];
                        match kind {
                            BinaryKind::Add => a[i] + y,
                            BinaryKind::Mul => a[i] * y,
                        }
                    })
                    .collect();
                let mut got = vec![f32::NAN; n];
                binary(kind, &a, &b, inner, len, &mut got);
                assert_eq!(rel_err(&got, &want), 0.0, "{n} {inner} {len}");
            }
        }
    }

    /// `scale_add` and the in-place `scale_add_into` (split by rows) against the
    /// one-line definition `x[i] + λ[i % c] · y[i]`, on sizes that split across threads.
    #[test]
    fn scale_add_reference_matches_definition() {
        use crate::ops::testing::{random, rng};
        let mut r = rng();
        for (rows, c) in [(16 * 261, 384), (1031, 37), (3, 5), (70_001, 1)] {
            let n = rows * c;
            let (x, y, l) = (random(&mut r, n), random(&mut r, n), random(&mut r, c));
            let want: Vec<f32> = (0..n).map(|i| x[i] + l[i % c] * y[i]).collect();
            let mut got = vec![f32::NAN; n];
            scale_add(&x, &y, &l, &mut got);
            assert_eq!(got, want, "{rows}x{c}");
            let mut got = y.clone();
            scale_add_into(&x, &l, &mut got);
            assert_eq!(got, want, "{rows}x{c} in place");
        }
    }

    #[test]
    fn binary_rejects_mismatched_shapes() {
        let e = Binary::add().output_shape(&[&[2, 3], &[3, 2]]).unwrap_err();
        assert!(e.to_string().contains("add"), "{e}");
    }
}

/// Benchmark cases for `cargo bench`.
pub fn bench_cases() -> Vec<crate::bench::Case> {
    use crate::bench::Case;
    vec![
        Case::new("gelu 16M", Unary::Gelu, vec![vec![1 << 24]]),
        Case::new("add 16M", Binary::add(), vec![vec![1 << 24], vec![1 << 24]]),
    ]
}

/// f16 storage → f32: the input holds `ceil(n/2)` 32-bit words, each two packed halves
/// (low first) as stored by [`crate::gpu::GpuContext::upload_f16`]; in the graph the words
/// travel as f32 bit patterns. Output: `shape` f32 values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnpackF16 {
    pub shape: Vec<usize>,
}

/// f32 → f16 storage (round to nearest even), the inverse layout of [`UnpackF16`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PackF16;

/// The CPU reference of [`UnpackF16`].
pub fn unpack_f16(words: &[f32], out: &mut [f32]) {
    let w: Vec<u32> = words.iter().map(|v| v.to_bits()).collect();
    out.copy_from_slice(&crate::gpu::unpack_f16(&w, out.len()));
}

/// The CPU reference of [`PackF16`].
pub fn pack_f16(x: &[f32], out: &mut [f32]) {
    for (o, w) in out.iter_mut().zip(crate::gpu::pack_f16(x)) {
        *o = f32::from_bits(w);
    }
}

impl Op for UnpackF16 {
    fn name(&self) -> &'static str {
        "unpack_f16"
    }
    fn output_shape(&self, inputs: &[&[usize]]) -> Result<Vec<usize>> {
        expect_inputs("unpack_f16", inputs, 1)?;
        let n = numel(&self.shape);
        if numel(inputs[0]) != n.div_ceil(2) {
            return Err(Error::shape(
                "unpack_f16",
                format!(
                    "{n} halves need {} words, got {:?}",
                    n.div_ceil(2),
                    inputs[0]
                ),
            ));
        }
        Ok(self.shape.clone())
    }
    fn cpu(&self, inputs: &[&[f32]], _shapes: &[&[usize]], out: &mut [f32]) {
        unpack_f16(inputs[0], out);
    }
    fn gpu(
        &self,
        ctx: &GpuContext,
        inputs: &[&wgpu::Buffer],
        _shapes: &[&[usize]],
        out: &wgpu::Buffer,
    ) -> Result<Vec<Dispatch>> {
        let n = numel(&self.shape) as u32;
        Ok(vec![ctx.dispatch(KernelArgs {
            shader: &ELEMENTWISE,
            entry: "unpack_f16",
            constants: &[],
            buffers: &[inputs[0], out],
            params: bytemuck::cast_slice(&[n, 1, 1, 0]),
            workgroups: ctx.grid((n as u64).div_ceil(64))?,
        })?])
    }
}

impl Op for PackF16 {
    fn name(&self) -> &'static str {
        "pack_f16"
    }
    fn output_shape(&self, inputs: &[&[usize]]) -> Result<Vec<usize>> {
        expect_inputs("pack_f16", inputs, 1)?;
        Ok(vec![numel(inputs[0]).div_ceil(2)])
    }
    fn cpu(&self, inputs: &[&[f32]], _shapes: &[&[usize]], out: &mut [f32]) {
        pack_f16(inputs[0], out);
    }
    fn gpu(
        &self,
        ctx: &GpuContext,
        inputs: &[&wgpu::Buffer],
        shapes: &[&[usize]],
        out: &wgpu::Buffer,
    ) -> Result<Vec<Dispatch>> {
        let n = numel(shapes[0]) as u32;
        Ok(vec![ctx.dispatch(KernelArgs {
            shader: &ELEMENTWISE,
            entry: "pack_f16",
            constants: &[],
            buffers: &[inputs[0], out],
            params: bytemuck::cast_slice(&[n, 1, 1, 0]),
            workgroups: ctx.grid((n.div_ceil(2) as u64).div_ceil(64))?,
        })?])
    }
}

#[cfg(test)]
mod f16_tests {
    use super::*;
    use crate::ops::testing::{ctx, random, rng};
    use crate::ops::{run_cpu, run_gpu};

    #[test]
    fn f16_tensors_round_trip_through_the_device() {
        let mut r = rng();
        for n in [1usize, 2, 7, 1000, 4097] {
            let x: Vec<f32> = random(&mut r, n).iter().map(|v| v * 300.0).collect();
            let t = ctx().upload_f16(&x, &[n]).unwrap();
            assert_eq!(t.bytes(), n.div_ceil(2) as u64 * 4);
            let back = ctx().download(&t).unwrap();
            let want: Vec<f32> = x.iter().map(|v| half::f16::from_f32(*v).to_f32()).collect();
            assert_eq!(back, want);
        }
    }

    #[test]
    fn unpack_and_pack_kernels_match_reference() {
        let mut r = rng();
        for n in [1usize, 3, 64, 1001] {
            let x: Vec<f32> = random(&mut r, n).iter().map(|v| v * 70.0).collect();
            // pack: compare bit patterns exactly.
            let (want, _) = run_cpu(&PackF16, &[(&x, &[n])]).unwrap();
            let (got, _) = run_gpu(ctx(), &PackF16, &[(&x, &[n])], Some(f32::NAN)).unwrap();
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "pack_f16 n={n}");
            // unpack the packed words again.
            let op = UnpackF16 { shape: vec![n] };
            let (want2, _) = run_cpu(&op, &[(&want, &[want.len()])]).unwrap();
            let (got2, _) = run_gpu(ctx(), &op, &[(&want, &[want.len()])], Some(f32::NAN)).unwrap();
            assert_eq!(got2, want2, "unpack_f16 n={n}");
            let rounded: Vec<f32> = x.iter().map(|v| half::f16::from_f32(*v).to_f32()).collect();
            assert_eq!(want2, rounded);
        }
    }
}
