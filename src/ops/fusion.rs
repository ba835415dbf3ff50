//! The context gate of DINOv3UNet3D's `ContextAttentionFusion`, fused into one kernel:
//! `out = raw + raw_proj(raw) ⊙ σ(gate)`, where `raw_proj` is a 1×1×1 conv (C→C, bias) and
//! `gate` the logits of the context branch (before the sigmoid).

use super::{expect_inputs, Op};
use crate::error::{Error, Result};
use crate::gpu::{Dispatch, GpuContext, KernelArgs};
use crate::ops::elementwise::sigmoid;
use crate::ops::matmul::gemm_strided;
use crate::shaders::FUSION;

/// Inputs: raw (N, C, S...), raw_proj weight (C, C, 1, 1, 1) or (C, C), bias (C),
/// gate logits (N, C, S...) → (N, C, S...).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ContextGate;

/// The CPU reference of [`ContextGate`]: the 1×1×1 projection as a gemm into `out`, then
/// the gated sum, channels split across threads.
pub fn context_gate(
    raw: &[f32],
    w: &[f32],
    b: &[f32],
    gate: &[f32],
    n: usize,
    c: usize,
    s: usize,
    out: &mut [f32],
) {
    if s == 0 || c == 0 {
        return;
    }
    for ni in 0..n {
        let base = ni * c * s;
        let on = &mut out[base..base + c * s];
        // out[n] = W · raw[n] (a gemm), then out = raw + (out + b)·σ(gate) per channel.
        gemm_strided((c, s, c), on, s, w, (c, 1), &raw[base..], (s, 1), false);
        crate::ops::par::for_units(on, s, (1 << 15) / s + 1, |o0, rows| {
            for (k, row) in rows.chunks_mut(s).enumerate() {
                let o = o0 + k;
                let at = base + o * s;
                let (r, g) = (&raw[at..at + s], &gate[at..at + s]);
                for ((p, x), gv) in row.iter_mut().zip(r).zip(g) {
                    *p = x + (*p + b[o]) * sigmoid(*gv);
                }
            }
        });
    }
}

impl ContextGate {
    fn dims(&self, inputs: &[&[usize]]) -> Result<(usize, usize, usize)> {
        expect_inputs("context_gate", inputs, 4)?;
        let (raw, w, b, g) = (inputs[0], inputs[1], inputs[2], inputs[3]);
        let err = |m: String| Error::shape("context_gate", m);
        if raw.len() < 3 {
            return Err(err(format!("raw must be (N, C, spatial...), got {raw:?}")));
        }
        let c = raw[1];
        let w_ok = w.len() >= 2 && w[0] == c && w[1] == c && w[2..].iter().all(|k| *k == 1);
        if !w_ok || b != [c] || g != raw {
            return Err(err(format!(
                "raw {raw:?} needs raw_proj weight ({c}, {c}, 1, 1, 1), bias ({c}) and gate {raw:?}; got {w:?}, {b:?}, {g:?}"
            )));
        }
        Ok((raw[0], c, raw[2..].iter().product()))
    }
}

impl Op for ContextGate {
    fn name(&self) -> &'static str {
        "context_gate"
    }
    fn output_shape(&self, inputs: &[&[usize]]) -> Result<Vec<usize>> {
        self.dims(inputs)?;
        Ok(inputs[0].to_vec())
    }
    fn cpu(&self, inputs: &[&[f32]], shapes: &[&[usize]], out: &mut [f32]) {
        let (n, c, s) = self
            .dims(shapes)
            .expect("shapes were checked when the graph was built");
        context_gate(inputs[0], inputs[1], inputs[2], inputs[3], n, c, s, out);
    }
    fn gpu(
        &self,
        ctx: &GpuContext,
        inputs: &[&wgpu::Buffer],
        shapes: &[&[usize]],
        out: &wgpu::Buffer,
    ) -> Result<Vec<Dispatch>> {
        let (n, c, s) = self.dims(shapes)?;
        // On CPU-like devices with subgroups (lavapipe): the K = 1 conv kernel with the
        // gate in its epilogue, ~40× faster than the kernels below.
        let ins = [inputs[0], inputs[1], inputs[2], inputs[3]];
        if let Some(d) = crate::ops::conv3d::context_gate_dispatch(ctx, (n, c, s), ins, out)? {
            return Ok(vec![d]);
        }
        let two_pass = ctx.caps.max_storage_buffers_per_stage < 5;
        gpu_generic(ctx, (n, c, s), inputs, out, two_pass)
    }
    fn flops(&self, shapes: &[&[usize]]) -> u64 {
        self.dims(shapes)
            .map(|(n, c, s)| (2 * n * c * c * s + 4 * n * c * s) as u64)
            .unwrap_or(0)
    }
    fn depth_rule(&self, shapes: &[&[usize]]) -> Option<super::DepthRule> {
        self.dims(shapes).ok()?;
        (shapes[0].len() == 5).then(|| super::DepthRule {
            sliced: vec![true, false, false, true],
            map: super::DepthMap::Same { halo: 0 },
        })
    }
}

/// The kernels of `fusion.wgsl` (any device): one pass, or with `two_pass` two passes of
/// at most 4 storage buffers each (devices with fewer than 5 per stage).
fn gpu_generic(
    ctx: &GpuContext,
    (n, c, s): (usize, usize, usize),
    inputs: &[&wgpu::Buffer],
    out: &wgpu::Buffer,
    two_pass: bool,
) -> Result<Vec<Dispatch>> {
    let oblocks = c.div_ceil(4);
    let wy = n * oblocks;
    if wy as u64 > ctx.caps.max_workgroups_per_dim as u64 {
        return Err(Error::Gpu(format!(
            "context_gate: {n}×{c} channels exceed the dispatch limit"
        )));
    }
    let params = [c as u32, s as u32, n as u32, oblocks as u32];
    // The channel count is a pipeline constant: lavapipe recompiles (and leaks) a shader
    // whose loop is bounded by a uniform at every dispatch (see fusion.wgsl).
    let constants = [("C", c as f64)];
    let args = |entry, buffers| KernelArgs {
        shader: &FUSION,
        entry,
        constants: &constants,
        buffers,
        params: bytemuck::cast_slice(&params),
        workgroups: [s.div_ceil(64) as u32, wy as u32, 1],
    };
    if two_pass {
        return Ok(vec![
            ctx.dispatch_bound(
                args("context_gate_proj", &[inputs[0], inputs[1], inputs[2], out]),
                &[1, 2, 3, 5],
            )?,
            ctx.dispatch_bound(
                args("context_gate_apply", &[inputs[0], inputs[3], out]),
                &[1, 4, 5],
            )?,
        ]);
    }
    Ok(vec![ctx.dispatch(args(
        "context_gate",
        &[inputs[0], inputs[1], inputs[2], inputs[3], out],
    ))?])
}

/// Benchmark cases for `cargo bench`.
pub fn bench_cases() -> Vec<crate::bench::Case> {
    vec![crate::bench::Case::new(
        "context_gate 32ch 64^3",
        ContextGate,
        vec![
            vec![1, 32, 64, 64, 64],
            vec![32, 32, 1, 1, 1],
            vec![32],
            vec![1, 32, 64, 64, 64],
        ],
    )]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::check_op;

    #[test]
    fn kernel_matches_reference() {
        for (n, c, sp) in [
            (1, 1, vec![1, 1, 1]),
            (1, 4, vec![5, 7, 9]),
            (2, 6, vec![3, 8, 5]),
            (1, 16, vec![16, 16, 16]),
            // The subgroup kernels: partial 32- and 64-channel groups, voxel counts that
            // are not multiples of a workgroup's 64.
            (1, 33, vec![5, 6, 7]),
            (2, 32, vec![3, 5, 11]),
            (1, 70, vec![4, 9, 10]),
            (2, 64, vec![1, 3, 7]),
            // The 64-channel tile (used from SG64_MIN_VOXELS voxels on): one full group.
            (1, 64, vec![64, 64, 64]),
        ] {
            let mut raw = vec![n, c];
            raw.extend(&sp);
            check_op(
                &ContextGate,
                &[raw.clone(), vec![c, c, 1, 1, 1], vec![c], raw],
                1e-5,
            );
        }
    }

    /// The kernels of fusion.wgsl (one and two passes), which lavapipe no longer uses,
    /// against the reference; and the dispatch choice on this device.
    #[test]
    fn generic_kernels_match_reference() {
        use crate::ops::testing::{ctx, random, rel_err, rng, POISON};
        let c = ctx();
        let mut r = rng();
        for (n, ch, s) in [(1, 5, 7 * 9 * 11), (2, 33, 3 * 5 * 7)] {
            let sh = [vec![n, ch, s], vec![ch, ch], vec![ch], vec![n, ch, s]];
            let data: Vec<Vec<f32>> = sh
                .iter()
                .map(|s| random(&mut r, s.iter().product()))
                .collect();
            let mut want = vec![0f32; n * ch * s];
            context_gate(&data[0], &data[1], &data[2], &data[3], n, ch, s, &mut want);
            let t: Vec<_> = data
                .iter()
                .zip(&sh)
                .map(|(d, s)| c.upload(d, s).unwrap())
                .collect();
            let bufs: Vec<&wgpu::Buffer> = t.iter().map(|t| t.buffer.as_ref()).collect();
            let shapes: Vec<&[usize]> = sh.iter().map(|s| s.as_slice()).collect();
            // Where the subgroup kernel applies, ContextGate::gpu picks it (one dispatch).
            let out = c.empty(&sh[0]).unwrap();
            let disp = ContextGate.gpu(c, &bufs, &shapes, &out.buffer).unwrap();
            let sg = crate::ops::conv3d::context_gate_dispatch(
                c,
                (n, ch, s),
                [bufs[0], bufs[1], bufs[2], bufs[3]],
                &out.buffer,
            )
            .unwrap()
            .is_some();
            if sg {
                assert_eq!(disp.len(), 1);
                assert!(
                    disp[0].name.starts_with("context_gate_k1_sg"),
                    "{}",
                    disp[0].name
                );
            }
            let one_pass_fits = c.caps.max_storage_buffers_per_stage >= 5;
            for two_pass in [!one_pass_fits, true] {
                let disp = gpu_generic(c, (n, ch, s), &bufs, &out.buffer, two_pass).unwrap();
                assert_eq!(disp.len(), 1 + two_pass as usize);
                c.fill(&out.buffer, POISON);
                c.run(&disp).unwrap();
                let e = rel_err(&c.download(&out).unwrap(), &want);
                assert!(e <= 1e-5, "{n} {ch} {s} two-pass {two_pass}: {e}");
            }
        }
    }

    #[test]
    fn reference_is_raw_plus_gated_projection() {
        // C = 1: out = r + (w·r + b)·σ(g).
        let mut out = [0.0];
        context_gate(&[2.0], &[3.0], &[1.0], &[0.0], 1, 1, 1, &mut out);
        assert!((out[0] - (2.0 + 7.0 * 0.5)).abs() < 1e-6);
    }

    /// The gemm-based reference against the loops of the definition.
    #[test]
    fn reference_matches_definition() {
        use crate::ops::testing::{random, rel_err, rng};
        let mut r = rng();
        for (n, c, s) in [(1, 1, 1), (2, 5, 37), (1, 24, 9 * 11 * 13)] {
            let raw = random(&mut r, n * c * s);
            let gate = random(&mut r, n * c * s);
            let w = random(&mut r, c * c);
            let b = random(&mut r, c);
            let mut want = vec![0f32; n * c * s];
            for ni in 0..n {
                for o in 0..c {
                    for v in 0..s {
                        let mut p = b[o] as f64;
                        for ci in 0..c {
                            p += w[o * c + ci] as f64 * raw[(ni * c + ci) * s + v] as f64;
                        }
                        let i = (ni * c + o) * s + v;
                        want[i] = raw[i] + p as f32 * sigmoid(gate[i]);
                    }
                }
            }
            let mut got = vec![f32::NAN; n * c * s];
            context_gate(&raw, &w, &b, &gate, n, c, s, &mut got);
            let e = rel_err(&got, &want);
            assert!(e < 1e-6, "{n} {c} {s}: {e}");
        }
    }

    #[test]
    fn rejects_mismatched_gate() {
        let e = ContextGate
            .output_shape(&[&[1, 4, 2, 2, 2], &[4, 4, 1, 1, 1], &[4], &[1, 4, 2, 2, 1]])
            .unwrap_err();
        assert!(e.to_string().contains("context_gate"), "{e}");
    }
}
