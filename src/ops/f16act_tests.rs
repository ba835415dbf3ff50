//! Randomized tests of the f16-activation kernel variants (`Precision::F16Act`, see
//! docs/precision.md) against the CPU reference: f16 operands are rounded to f16 on the
//! CPU and uploaded as packed halves, outputs are poisoned with f16 NaNs first.

use super::attention::Attention;
use super::matmul::{Activation, Epilogue, Matmul};
use super::testing::{ctx, random, rel_err, rng};
use super::{numel, run_cpu, Op};
use crate::gpu::{pack_f16, unpack_f16, GpuContext};

/// Both halves of the word are f16 NaNs.
const POISON16: u32 = 0x7e00_7e00;

fn round16(v: &[f32]) -> Vec<f32> {
    v.iter().map(|x| half::f16::from_f32(*x).to_f32()).collect()
}

/// The texture path the f16 variants need (else the tests have nothing to check).
fn texture_path(c: &GpuContext) -> bool {
    c.caps.subgroups
        && c.caps.cpu_like
        && c.caps.min_subgroup_size >= 8
        && c.caps.max_uniform_binding >= 65536
}

/// Uploads `d` as packed halves (`f16`) or f32 into a buffer of at least 64 KiB.
fn upload(c: &GpuContext, d: &[f32], f16: bool) -> wgpu::Buffer {
    let words: Vec<u32> = if f16 {
        pack_f16(d)
    } else {
        d.iter().map(|v| v.to_bits()).collect()
    };
    let b = c
        .storage_buffer("test", ((words.len() * 4) as u64).max(65536))
        .unwrap();
    c.queue.write_buffer(&b, 0, bytemuck::cast_slice(&words));
    b
}

/// Runs `op` with inputs `f16_in[i]` packed, the output packed when `out16`; returns the
/// output as f32 and the dispatch names.
fn run(
    op: &dyn Op,
    data: &[Vec<f32>],
    shapes: &[Vec<usize>],
    f16_in: &[bool],
    out16: bool,
) -> (Vec<f32>, Vec<&'static str>) {
    let c = ctx();
    let sh: Vec<&[usize]> = shapes.iter().map(|x| x.as_slice()).collect();
    let bufs: Vec<wgpu::Buffer> = data
        .iter()
        .zip(f16_in)
        .map(|(d, f)| upload(c, d, *f))
        .collect();
    let n = numel(&op.output_shape(&sh).unwrap());
    let out = c.storage_buffer("out", (n * 4) as u64).unwrap();
    let poison = if out16 { POISON16 } else { f32::NAN.to_bits() };
    c.queue
        .write_buffer(&out, 0, bytemuck::cast_slice(&vec![poison; n]));
    let refs: Vec<&wgpu::Buffer> = bufs.iter().collect();
    let ds = op.gpu(c, &refs, &sh, &out).unwrap();
    let names = ds.iter().map(|d| d.name).collect();
    c.run(&ds).unwrap();
    let got = if out16 {
        let words = c.read_buffer(&out, n.div_ceil(2)).unwrap();
        let words: Vec<u32> = words.iter().map(|v| v.to_bits()).collect();
        unpack_f16(&words, n)
    } else {
        c.read_buffer(&out, n).unwrap()
    };
    (got, names)
}

#[test]
fn f16_activation_matmuls_match_reference() {
    let c = ctx();
    if !texture_path(c) {
        eprintln!("no texture path on {}: nothing to test", c.info.name);
        return;
    }
    let mut r = rng();
    let mut seen = std::collections::BTreeSet::new();
    // (batch, rows, n, k, bias, act, epilogue, w_f16, x_f16, out_f16)
    let rope = |heads, prefix| Epilogue::Rope { heads, prefix };
    let cases = [
        (
            1,
            67,
            38,
            64,
            true,
            Activation::Gelu,
            Epilogue::None,
            false,
            false,
            true,
        ),
        (
            1,
            67,
            38,
            64,
            true,
            Activation::Silu,
            Epilogue::None,
            true,
            true,
            true,
        ),
        (
            1,
            9,
            50,
            1536,
            false,
            Activation::Identity,
            Epilogue::None,
            false,
            true,
            true,
        ),
        (
            2,
            13,
            64,
            72,
            true,
            Activation::Identity,
            rope(2, 3),
            false,
            true,
            true,
        ),
        (
            3,
            11,
            96,
            40,
            false,
            Activation::Identity,
            rope(3, 5),
            true,
            false,
            true,
        ),
        (
            1,
            45,
            20,
            136,
            true,
            Activation::Identity,
            Epilogue::Residual,
            false,
            true,
            false,
        ),
        (
            2,
            23,
            36,
            1544,
            true,
            Activation::Identity,
            Epilogue::Residual,
            true,
            true,
            false,
        ),
        (
            1,
            33,
            21,
            4000,
            true,
            Activation::Identity,
            Epilogue::None,
            false,
            true,
            false,
        ),
        (
            1,
            29,
            12,
            4000,
            true,
            Activation::Identity,
            Epilogue::Residual,
            false,
            true,
            false,
        ),
    ];
    for (batch, rows, n, k, bias, act, epi, w_f16, x_f16, out_f16) in cases {
        let m = Matmul {
            w_f16,
            x_f16,
            out_f16,
            ..Matmul::linear(bias).with_act(act).with_epilogue(epi)
        };
        let mut s = vec![vec![batch, rows, k], vec![n, k]];
        if bias {
            s.push(vec![n]);
        }
        match epi {
            Epilogue::Rope { heads, prefix } => {
                let half = n / heads / 2;
                s.extend([vec![rows - prefix, half], vec![rows - prefix, half]]);
            }
            Epilogue::Residual => s.extend([vec![batch, rows, n], vec![n]]),
            Epilogue::None => {}
        }
        let mut data: Vec<Vec<f32>> = s.iter().map(|x| random(&mut r, numel(x))).collect();
        if x_f16 {
            data[0] = round16(&data[0]);
        }
        let inputs = crate::ops::testing::pairs(&data, &s);
        let (want, _) = run_cpu(&m, &inputs).unwrap();
        let plain = Matmul {
            w_f16: false,
            x_f16: false,
            out_f16: false,
            ..m
        };
        let (want32, _) = run_cpu(&plain, &inputs).unwrap();
        let mut f16_in = vec![false; s.len()];
        f16_in[0] = x_f16;
        f16_in[1] = w_f16;
        let (got, names) = run(&m, &data, &s, &f16_in, out_f16);
        seen.extend(names.iter().copied());
        let e = rel_err(&got, &want);
        let e32 = rel_err(&got, &want32);
        // Same numbers up to the f16 rounding of the store (one f16 ulp ≈ 4.9e-4 of the
        // value) and f32 summation order.
        assert!(e <= 2e-3, "{m:?} {s:?} {names:?}: {e} vs the f16 reference");
        assert!(
            e32 <= 1e-2,
            "{m:?} {s:?} {names:?}: {e32} vs the f32 reference"
        );
        if !out_f16 && !w_f16 {
            assert!(e <= 1e-5, "{m:?} {s:?} {names:?}: {e} (f32 output)");
        }
    }
    for e in [
        "matmul_tex16_o16",
        "matmul_tex16_rope_o16",
        "matmul_tex16r4_res",
        "matmul_tex16r4h_res",
        "matmul_tex4",
        "matmul_tex4_res",
    ] {
        assert!(seen.contains(e), "{e} did not run: {seen:?}");
    }
}

#[test]
fn f16_activation_matmul_without_texture_path_is_a_clear_error() {
    // An odd N cannot be stored as packed pairs: an error naming the fix, not a fault.
    let c = ctx();
    let m = Matmul {
        out_f16: true,
        ..Matmul::linear(false)
    };
    let s = [vec![5, 8], vec![7, 8]];
    let sh: Vec<&[usize]> = s.iter().map(|x| x.as_slice()).collect();
    let a = upload(c, &[0.5; 40], true);
    let b = upload(c, &[0.5; 56], false);
    let out = c.storage_buffer("out", 65536).unwrap();
    let e = m.gpu(c, &[&a, &b], &sh, &out).expect_err("an error");
    assert!(e.to_string().contains("--precision f16 or f32"), "{e}");
}

#[test]
fn f16_attention_inputs_match_reference() {
    let c = ctx();
    if !texture_path(c) {
        eprintln!("no texture path on {}: nothing to test", c.info.name);
        return;
    }
    let mut r = rng();
    for (b, tq, heads, hd) in [(2, 13, 3, 8), (1, 37, 2, 64), (3, 5, 1, 4)] {
        let op = Attention {
            in_f16: true,
            ..Attention::new(heads)
        };
        let s = vec![vec![b, tq, heads * hd]; 3];
        let data: Vec<Vec<f32>> = s
            .iter()
            .map(|x| round16(&random(&mut r, numel(x))))
            .collect();
        let inputs = crate::ops::testing::pairs(&data, &s);
        let (want, _) = run_cpu(&op, &inputs).unwrap();
        let (got, names) = run(&op, &data, &s, &[true; 3], false);
        assert_eq!(names, ["attention_sg"]);
        let e = rel_err(&got, &want);
        assert!(e <= 1e-5, "{b} {tq} {heads} {hd}: {e}");
    }
}

#[test]
fn f16_output_layernorm_matches_reference() {
    use super::norm::{supports_f16_output, LayerNorm};
    let c = ctx();
    if !supports_f16_output(c, 64) {
        eprintln!(
            "no f16-output layernorm on {}: nothing to test",
            c.info.name
        );
        return;
    }
    let mut r = rng();
    for (rows, d, offset) in [
        (37, 64, 0.0),
        (3, 384, 5.0),
        (301, 96, -2.0),
        (5, 4096, 0.5),
    ] {
        let op = LayerNorm {
            out_f16: true,
            ..LayerNorm::new(1e-5)
        };
        let s = [vec![rows, d], vec![d], vec![d]];
        let mut data: Vec<Vec<f32>> = s.iter().map(|x| random(&mut r, numel(x))).collect();
        data[0].iter_mut().for_each(|v| *v += offset);
        let inputs = crate::ops::testing::pairs(&data, &s);
        let (want, _) = run_cpu(&op, &inputs).unwrap();
        let (want32, _) = run_cpu(&LayerNorm::new(1e-5), &inputs).unwrap();
        let (got, names) = run(&op, &data, &s, &[false; 3], true);
        assert_eq!(names, ["layernorm_sg_o16"]);
        let e = rel_err(&got, &want);
        let e32 = rel_err(&got, &want32);
        assert!(e <= 2e-3, "{rows}x{d}: {e} vs the f16 reference");
        assert!(e32 <= 1e-2, "{rows}x{d}: {e32} vs the f32 reference");
    }
}
