//! The adapter's arithmetic ceiling: a kernel that only multiplies and adds. Every model
//! kernel also loads, stores and computes addresses, so none can run faster than this one;
//! `volfuse bench --vit` prints a model's GFLOP/s as a share of it.

use super::{expect_inputs, Op};
use crate::error::{Error, Result};
use crate::gpu::{Dispatch, GpuContext, KernelArgs};
use crate::shaders::PEAK;

/// (N, 4) → (N, 4): per element, eight independent chains a_j ← a_j·m + c (a_j from
/// x + j, m = 0.5 + 0.25·x, c = x + 1.5), `8 · steps` updates each, summed
/// (shaders/peak.wgsl). For x in [-1, 1] every chain stays between 0.25 and 10 from its
/// first update on: no denormals, which CPUs process a hundred times slower.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MuladdPeak {
    pub steps: usize,
}

/// The CPU reference of [`MuladdPeak`] (a separate multiply and add per update, as the
/// WGSL spells it; an adapter that fuses them into an FMA differs by rounding only).
pub fn muladd_peak(x: &[f32], steps: usize, out: &mut [f32]) {
    for (o, &xv) in out.iter_mut().zip(x) {
        let (m, c) = (0.5 + 0.25 * xv, xv + 1.5);
        let mut a: [f32; 8] = std::array::from_fn(|j| xv + j as f32);
        for _ in 0..8 * steps {
            for aj in a.iter_mut() {
                *aj = *aj * m + c;
            }
        }
        *o = a.iter().fold(0.0, |s, v| s + v);
    }
}

impl MuladdPeak {
    fn rows(&self, inputs: &[&[usize]]) -> Result<usize> {
        expect_inputs("muladd_peak", inputs, 1)?;
        match inputs[0] {
            [n, 4] => Ok(*n),
            s => Err(Error::shape(
                "muladd_peak",
                format!("input must be (N, 4), got {s:?}"),
            )),
        }
    }
}

impl Op for MuladdPeak {
    fn name(&self) -> &'static str {
        "muladd_peak"
    }
    fn output_shape(&self, inputs: &[&[usize]]) -> Result<Vec<usize>> {
        Ok(vec![self.rows(inputs)?, 4])
    }
    fn cpu(&self, inputs: &[&[f32]], _shapes: &[&[usize]], out: &mut [f32]) {
        muladd_peak(inputs[0], self.steps, out);
    }
    fn gpu(
        &self,
        ctx: &GpuContext,
        inputs: &[&wgpu::Buffer],
        shapes: &[&[usize]],
        out: &wgpu::Buffer,
    ) -> Result<Vec<Dispatch>> {
        let n = self.rows(shapes)?;
        let params = [n as u32, self.steps as u32, 0, 0];
        Ok(vec![ctx.dispatch(KernelArgs {
            shader: &PEAK,
            entry: "muladd_peak",
            constants: &[],
            buffers: &[inputs[0], out],
            params: bytemuck::cast_slice(&params),
            workgroups: ctx.grid((n as u64).div_ceil(8))?,
        })?])
    }
    fn flops(&self, shapes: &[&[usize]]) -> u64 {
        // 8 chains × 8·steps updates × (multiply + add) per component
        self.rows(shapes)
            .map_or(0, |n| (n * 4 * 8 * 8 * self.steps * 2) as u64)
    }
}

/// The ceiling case: 65 536 × 4 elements, 2 048 updates per chain (~1.1 GFLOP).
pub fn ceiling_case() -> crate::bench::Case {
    crate::bench::Case::new(
        "muladd_peak 65536x4 (arithmetic ceiling)",
        MuladdPeak { steps: 32 },
        vec![vec![65536, 4]],
    )
}

pub fn bench_cases() -> Vec<crate::bench::Case> {
    vec![ceiling_case()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::check_op;

    #[test]
    fn muladd_peak_matches_reference() {
        for (n, steps) in [(1, 1), (37, 2), (64, 3), (1000, 1), (4099, 4)] {
            check_op(&MuladdPeak { steps }, &[vec![n, 4]], 1e-5);
        }
    }

    #[test]
    fn muladd_peak_counts_its_updates() {
        // x = -1.5 is outside the documented range but makes c = 0: m = 1/8 and every
        // chain shrinks 8× per update, a_j = (j - 1.5) / 8^(8·steps).
        let mut out = [0.0f32; 1];
        muladd_peak(&[-1.5], 1, &mut out);
        let want: f32 = (0..8).map(|j| (j as f32 - 1.5) / 8f32.powi(8)).sum();
        assert!(
            (out[0] - want).abs() <= 1e-6 * want.abs(),
            "{} vs {want}",
            out[0]
        );
        assert!(MuladdPeak { steps: 1 }.output_shape(&[&[3, 5]]).is_err());
    }
}
