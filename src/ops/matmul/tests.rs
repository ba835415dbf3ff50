//! Tests of [`super`]: the CPU reference against naive definitions, every kernel
//! against the reference on random inputs.

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
    let expect_tex =
        c.caps.subgroups && c.caps.min_subgroup_size >= 8 && c.caps.max_uniform_binding >= WINDOW;
    let got = names(lin, vec![vec![10, 384], vec![40, 384]]);
    let one = Matmul {
        kernel: MatmulKernel::TexOneRow,
        ..lin
    };
    // Four-row kernels: W from a texture, every block in one dispatch, where X is read as
    // a storage texture (CPU adapters); else W through windows, one dispatch per block.
    // (N % 4 == 0 in these shapes: the window kernels store vec4s, `matmul_tex16r4q`)
    let r4 = |blocks| {
        if c.storage_x() {
            vec!["matmul_tex48r4w"]
        } else {
            vec!["matmul_tex16r4q"; blocks]
        }
    };
    if expect_tex {
        // 16-column blocks: four rows per invocation, or one with TexOneRow; 4-column
        // blocks (K > 2048) one row either way.
        assert_eq!(got, r4(3));
        let windows = Matmul {
            kernel: MatmulKernel::TexWindows,
            ..lin
        };
        assert_eq!(
            names(windows, vec![vec![10, 384], vec![40, 384]]),
            vec!["matmul_tex16r4q"; 3]
        );
        assert_eq!(
            names(windows, vec![vec![10, 384], vec![42, 384]]),
            vec!["matmul_tex16r4"; 3]
        );
        assert_eq!(
            names(one, vec![vec![10, 384], vec![40, 384]]),
            vec!["matmul_tex16"; 3]
        );
        assert_eq!(names(lin, vec![vec![10, 1536], vec![8, 1536]]), r4(1));
        // (two blocks per invocation where asked)
        let pairs = Matmul {
            kernel: MatmulKernel::TexPairs,
            ..lin
        };
        if c.storage_x() {
            assert_eq!(
                names(pairs, vec![vec![10, 384], vec![40, 384]]),
                vec!["matmul_tex32r4w"]
            );
        }
        // (W from a texture has no window to fit: K = 4096 keeps 16-column blocks; an N
        // that is no multiple of 4 takes two blocks per invocation, stored column by
        // column)
        let k4096 = vec![vec![10, 4096], vec![5, 4096]];
        if c.storage_x() {
            assert_eq!(names(lin, k4096.clone()), vec!["matmul_tex32r4w"]);
            assert_eq!(
                names(lin, vec![vec![10, 4096], vec![8, 4096]]),
                vec!["matmul_tex48r4w"]
            );
        } else {
            assert_eq!(names(lin, k4096.clone()), vec!["matmul_tex4"; 2]);
        }
        for m in [windows, one] {
            assert_eq!(names(m, k4096.clone()), vec!["matmul_tex4"; 2]);
        }
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
    // On CPU adapters `Auto` compiles the storage-texture form of the family, `TexSampled`
    // the sampled one (same entry points).
    if expect_tex {
        let sampled = Matmul {
            kernel: MatmulKernel::TexSampled,
            ..lin
        };
        assert_eq!(
            names(sampled, vec![vec![10, 384], vec![40, 384]]),
            vec!["matmul_tex16r4q"; 3]
        );
        let compiled: Vec<&str> = c
            .compiled_kernels()
            .iter()
            .filter(|k| k.entry == "matmul_tex16r4q")
            .map(|k| k.shader)
            .collect();
        assert!(
            compiled.contains(&crate::shaders::MATMUL.name),
            "{compiled:?}"
        );
        let storage = crate::shaders::MATMUL.storage_x().name;
        assert_eq!(compiled.contains(&storage), c.storage_x(), "{compiled:?}");
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
            MatmulKernel::TexOneRow,
            false,
            true,
            true,
            Some(2),
            45,
            70,
            1536,
            false,
            Activation::Gelu,
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
        let want16 = cpu_reference(&m, &data, &s);
        let want32 = cpu_reference(&Matmul { w_f16: false, ..m }, &data, &s);
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
    if c.caps.subgroups && c.caps.min_subgroup_size >= 8 && c.caps.max_uniform_binding >= WINDOW {
        for e in ["matmul_tex16r4h", "matmul_tex16h", "matmul_tex4h"] {
            assert!(seen.contains(e), "{e} not exercised: {seen:?}");
        }
    }
}

/// Whether this device takes the texture path (and so the fused epilogues).
fn has_texture_path() -> bool {
    let c = crate::ops::testing::ctx();
    c.caps.subgroups && c.caps.min_subgroup_size >= 8 && c.caps.max_uniform_binding >= WINDOW
}

/// `m` on the CPU backend for inputs `data` of shapes `s`.
fn cpu_reference(m: &Matmul, data: &[Vec<f32>], s: &[Vec<usize>]) -> Vec<f32> {
    let inputs = crate::ops::testing::pairs(data, s);
    crate::ops::run_cpu(m, &inputs).unwrap().0
}

/// Random inputs of `s`, runs `m` on both backends (output poisoned) and checks them
/// against each other; returns the dispatch names.
fn check_fused(m: &Matmul, s: &[Vec<usize>], r: &mut rand::rngs::SmallRng) -> Vec<&'static str> {
    let data: Vec<Vec<f32>> = s.iter().map(|x| random(r, numel(x))).collect();
    let want = cpu_reference(m, &data, s);
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
            (MatmulKernel::TexOneRow, false, true),
            (MatmulKernel::TexOneRow, true, false),
            (MatmulKernel::TexSampled, false, true),
            (MatmulKernel::TexWindows, false, false),
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
            if kernel != MatmulKernel::Generic && has_texture_path() {
                assert_eq!(fused, (hd / 2) % 8 == 0, "{m:?} {s:?}: {names:?}");
            }
        }
    }
    if has_texture_path() {
        for e in [
            "matmul_tex16r4_rope",
            "matmul_tex16r4h_rope",
            "matmul_tex16_rope",
            "matmul_tex16h_rope",
            "rope_inplace",
        ] {
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
            (MatmulKernel::TexOneRow, false, true, Activation::Identity),
            (MatmulKernel::TexOneRow, true, false, Activation::Identity),
            (MatmulKernel::TexSampled, false, true, Activation::Gelu),
            (MatmulKernel::TexSampled, true, true, Activation::Identity),
            (MatmulKernel::TexWindows, false, true, Activation::Identity),
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
            "matmul_tex16r4_res",
            "matmul_tex16r4h_res",
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

/// The four-row kernels (`matmul_tex16r4*`) against the CPU reference on fresh random
/// inputs, output poisoned: row counts that leave 1, 2 or 3 rows of the last invocation
/// (and fewer rows than one invocation), partial last column blocks, batch folded into
/// rows, K up to a full window (f32: 2048; f16: 4096), bias or not, each activation and
/// epilogue, f32 and f16 weights; every output matches the one-row kernel's too.
#[test]
fn four_row_kernels_match_reference() {
    if !has_texture_path() {
        return;
    }
    let mut r = rng();
    let mut seen = std::collections::BTreeSet::new();
    for (batch, rows, n, k) in [
        (None, 1, 5, 8),
        (None, 3, 16, 16),
        (Some(3), 45, 70, 64),
        (None, 130, 21, 1536),
        (Some(2), 67, 40, 2048),
        (None, 257, 384, 384),
    ] {
        for (w_f16, bias, act) in [
            (false, true, Activation::Identity),
            (false, false, Activation::Gelu),
            (true, true, Activation::Silu),
            (true, false, Activation::Identity),
        ] {
            let m = Matmul {
                w_f16,
                ..Matmul::linear(bias).with_act(act)
            };
            let s = shapes(&m, batch, rows, n, k, false);
            let data: Vec<Vec<f32>> = s.iter().map(|x| random(&mut r, numel(x))).collect();
            let want = cpu_reference(&m, &data, &s);
            let (got, names) = run_w16(&m, &data, &s);
            seen.extend(names.iter().copied());
            let four_rows = ["matmul_tex16r4", "matmul_tex48r4w", "matmul_tex32r4w"];
            assert!(
                four_rows.iter().any(|k| names[0].starts_with(k)),
                "{s:?}: {names:?}"
            );
            let e = crate::ops::testing::rel_err(&got, &want);
            assert!(e <= 1e-5, "{m:?} {s:?} {names:?}: rel err {e}");
            let one = Matmul {
                kernel: MatmulKernel::TexOneRow,
                ..m
            };
            let (one_got, one_names) = run_w16(&one, &data, &s);
            assert!(!one_names[0].contains("r4"), "{one_names:?}");
            let e = crate::ops::testing::rel_err(&got, &one_got);
            assert!(e <= 1e-5, "{m:?} {s:?}: four rows vs one: rel err {e}");
            // X through a sampled texture, and W through uniform windows one dispatch per
            // block (Auto reads X, and f32 W in one dispatch, as storage textures on CPU
            // adapters): the window kernels, the same numbers.
            // Two column blocks per invocation instead of three: the same numbers too.
            for kernel in [
                MatmulKernel::TexSampled,
                MatmulKernel::TexWindows,
                MatmulKernel::TexPairs,
            ] {
                let v = Matmul { kernel, ..m };
                let (v_got, v_names) = run_w16(&v, &data, &s);
                if kernel != MatmulKernel::TexSampled {
                    seen.extend(v_names.iter().copied());
                }
                let want_names = if kernel == MatmulKernel::TexPairs && !w_f16 {
                    ["matmul_tex32r4w", "matmul_tex16r4"]
                } else {
                    ["matmul_tex16r4", "matmul_tex16r4"]
                };
                assert!(
                    v_names
                        .iter()
                        .all(|e| want_names.iter().any(|w| e.starts_with(w))),
                    "{v_names:?}"
                );
                let e = crate::ops::testing::rel_err(&v_got, &want);
                assert!(e <= 1e-5, "{v:?} {s:?}: rel err {e}");
            }
        }
        // The epilogues: RoPE on heads of 16 (hd/2 = 8 pairs with the block's halves) and,
        // where n allows, of 64 (four blocks per head: an invocation's three blocks span
        // two heads) with images of `rows` tokens, the residual on the output's shape.
        let prefix = rows.min(3);
        for (w_f16, kernel) in [
            (false, MatmulKernel::Auto),
            (true, MatmulKernel::Auto),
            (false, MatmulKernel::TexSampled),
            (false, MatmulKernel::TexWindows),
            (false, MatmulKernel::TexPairs),
        ] {
            // (matmul, output columns)
            let mut cases = vec![(Matmul::linear(true).with_epilogue(Epilogue::Residual), n)];
            for hd in [16, 64] {
                if n >= hd {
                    let heads = n / hd;
                    let rope = Epilogue::Rope { heads, prefix };
                    cases.push((Matmul::linear(true).with_epilogue(rope), heads * hd));
                }
            }
            for (m, n_out) in cases {
                let m = Matmul { w_f16, kernel, ..m };
                let half = match m.epi {
                    Epilogue::Rope { heads, .. } => n_out / heads / 2,
                    _ => 0,
                };
                if m.epi == Epilogue::Residual && n % 4 != 0 {
                    continue;
                }
                let mut s = shapes(&m.plain(), batch, rows, n_out, k, false);
                match m.epi {
                    Epilogue::Rope { .. } => {
                        s.extend([vec![rows - prefix, half], vec![rows - prefix, half]])
                    }
                    _ => {
                        let mut out = s[0].clone();
                        *out.last_mut().unwrap() = n_out;
                        s.extend([out, vec![n_out]]);
                    }
                }
                let names = check_fused(&m, &s, &mut r);
                seen.extend(names.iter().copied());
                assert!(
                    !names.is_empty()
                        && names.iter().all(|e| e.starts_with("matmul_tex16r4_")
                            || e.starts_with("matmul_tex16r4h_")
                            || e.starts_with("matmul_tex32r4w_")
                            || e.starts_with("matmul_tex48r4w_")),
                    "{m:?} {s:?}: {names:?}"
                );
            }
        }
    }
    let mut want = vec![
        "matmul_tex16r4",
        "matmul_tex16r4h",
        "matmul_tex16r4q",
        "matmul_tex16r4qh",
        "matmul_tex16r4_rope",
        "matmul_tex16r4h_rope",
        "matmul_tex16r4_res",
        "matmul_tex16r4h_res",
    ];
    if crate::ops::testing::ctx().storage_x() {
        want.extend([
            "matmul_tex32r4w",
            "matmul_tex32r4w_rope",
            "matmul_tex32r4w_res",
            "matmul_tex48r4w",
            "matmul_tex48r4w_rope",
            "matmul_tex48r4w_res",
        ]);
    }
    for e in want {
        assert!(seen.contains(e), "{e} not exercised: {seen:?}");
    }
}

/// W from a texture (CPU adapters): no window bounds K, so K > 2048 takes the four-row
/// kernel too (ViT-L's MLP down projection, K = 4096), with each epilogue; against the
/// CPU reference on fresh random inputs, output poisoned, odd row and column counts.
#[test]
fn w_texture_kernels_take_any_k() {
    if !has_texture_path() || !crate::ops::testing::ctx().storage_x() {
        return;
    }
    let mut r = rng();
    for (batch, rows, n, k) in [
        (None, 37, 40, 4096),
        (Some(2), 13, 21, 2052),
        (None, 5, 16, 8192),
    ] {
        let mut cases = vec![
            Matmul::linear(true).with_act(Activation::Gelu),
            Matmul::linear(false).with_epilogue(Epilogue::Residual),
        ];
        if n % 16 == 0 {
            cases.push(Matmul::linear(true).with_epilogue(Epilogue::Rope {
                heads: n / 16,
                prefix: 1,
            }));
        }
        let pairs: Vec<Matmul> = cases
            .iter()
            .map(|m| Matmul {
                kernel: MatmulKernel::TexPairs,
                ..*m
            })
            .collect();
        for m in cases.into_iter().chain(pairs) {
            if m.epi == Epilogue::Residual && n % 4 != 0 {
                continue;
            }
            let mut s = shapes(&m.plain(), batch, rows, n, k, false);
            match m.epi {
                Epilogue::Rope { .. } => s.extend([vec![rows - 1, 8], vec![rows - 1, 8]]),
                Epilogue::Residual => {
                    let mut out = s[0].clone();
                    *out.last_mut().unwrap() = n;
                    s.extend([out, vec![n]]);
                }
                Epilogue::None => {}
            }
            let names = check_fused(&m, &s, &mut r);
            assert_eq!(names.len(), 1, "{m:?} {s:?}: {names:?}");
            let want = if m.kernel == MatmulKernel::TexPairs || n % 4 != 0 {
                "matmul_tex32r4w"
            } else {
                "matmul_tex48r4w"
            };
            assert!(names[0].starts_with(want), "{m:?} {s:?}: {names:?}");
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

/// Texture-path kernel variants side by side on the ViT-S linear shapes (M = `LAB_M` rows,
/// default 16·261, in images of 261 tokens; (K, N) = qkv, o_proj, up, down with bias;
/// o_proj and down_proj also with the residual epilogue, q with RoPE): GFLOP per process
/// CPU-second (robust to other load on the machine) and per wall second (which also counts the
/// threads' idle time between dispatches), `LAB_ROUNDS` interleaved rounds of
/// `LAB_REPS` runs per variant, median; variants `LAB_KERNELS` (comma-separated of onerow,
/// auto, w16-onerow, w16-auto; default onerow,auto; the first is the baseline), shapes
/// filtered by `LAB_FILTER`. Outputs are checked against the first variant's (f16 weights
/// against the first variant of the same weight type).
/// (development aid: `cargo test --release --lib lab_variants -- --ignored --nocapture`)
#[test]
#[ignore]
fn lab_variants() {
    use crate::bench::process_cpu_seconds;
    let c = crate::ops::testing::ctx();
    eprintln!("{}", c.describe());
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let rows = env("LAB_M", 16 * 261);
    let (rounds, reps) = (env("LAB_ROUNDS", 5), env("LAB_REPS", 2));
    let filter = std::env::var("LAB_FILTER").unwrap_or_default();
    let wanted = std::env::var("LAB_KERNELS").unwrap_or("onerow,auto".into());
    let kernels: Vec<(&str, MatmulKernel, bool)> = wanted
        .split(',')
        .filter_map(|w| match w {
            "onerow" => Some((w, MatmulKernel::TexOneRow, false)),
            "auto" => Some((w, MatmulKernel::Auto, false)),
            "w16-onerow" => Some((w, MatmulKernel::TexOneRow, true)),
            "w16-auto" => Some((w, MatmulKernel::Auto, true)),
            "windows" => Some((w, MatmulKernel::TexWindows, false)),
            "pairs" => Some((w, MatmulKernel::TexPairs, false)),
            _ => None,
        })
        .collect();
    let (t, prefix) = (261, 5);
    let images = rows.div_ceil(t);
    let rows = images * t;
    let mut r = rng();
    for (label, k, n, epi) in [
        ("qkv", 384, 1152, Epilogue::None),
        ("o_proj", 384, 384, Epilogue::None),
        ("up", 384, 1536, Epilogue::None),
        ("down", 1536, 384, Epilogue::None),
        ("q+rope", 384, 384, Epilogue::Rope { heads: 6, prefix }),
        ("o_proj+res", 384, 384, Epilogue::Residual),
        ("down+res", 1536, 384, Epilogue::Residual),
    ] {
        if !label.contains(&filter) {
            continue;
        }
        let base = Matmul::linear(true).with_epilogue(epi);
        let mut s = vec![vec![images, t, k], vec![n, k], vec![n]];
        match epi {
            Epilogue::None => {}
            Epilogue::Rope { heads, prefix } => {
                let table = vec![t - prefix, n / heads / 2];
                s.extend([table.clone(), table]);
            }
            Epilogue::Residual => s.extend([vec![images, t, n], vec![n]]),
        }
        let sh: Vec<&[usize]> = s.iter().map(|x| x.as_slice()).collect();
        let data: Vec<Vec<f32>> = s.iter().map(|x| random(&mut r, numel(x))).collect();
        let up = |w16: bool| -> Vec<_> {
            data.iter()
                .zip(&s)
                .enumerate()
                .map(|(i, (d, x))| {
                    if i == 1 && w16 {
                        c.upload_f16(d, x).unwrap()
                    } else {
                        c.upload(d, x).unwrap()
                    }
                })
                .collect()
        };
        let (ins32, ins16) = (up(false), up(true));
        let gf = 2.0 * (rows * n * k) as f64 / 1e9;
        let mut runs = Vec::new();
        let mut first: [Option<Vec<f32>>; 2] = [None, None];
        for &(name, kernel, w_f16) in &kernels {
            let m = Matmul {
                kernel,
                w_f16,
                ..base
            };
            let ins = if w_f16 { &ins16 } else { &ins32 };
            let bufs: Vec<&wgpu::Buffer> = ins.iter().map(|t| t.buffer.as_ref()).collect();
            let out = c.empty(&[rows, n]).unwrap();
            c.fill(&out.buffer, f32::NAN);
            let ds = m.gpu(c, &bufs, &sh, &out.buffer).unwrap();
            c.run(&ds).unwrap(); // JIT
            let got = c.download(&out).unwrap();
            match &first[w_f16 as usize] {
                None => first[w_f16 as usize] = Some(got),
                Some(want) => {
                    let e = crate::ops::testing::rel_err(&got, want);
                    assert!(e <= 1e-5, "{label} {name} ({}): rel err {e}", ds[0].name);
                }
            }
            runs.push((name, ds[0].name, ds, Vec::new(), Vec::new()));
        }
        for _ in 0..rounds {
            for (_, _, ds, rates, walls) in runs.iter_mut() {
                let (c0, t0) = (process_cpu_seconds().unwrap(), std::time::Instant::now());
                for _ in 0..reps {
                    c.run(ds).unwrap();
                }
                let used = process_cpu_seconds().unwrap() - c0;
                rates.push(gf * reps as f64 / used.max(1e-9));
                walls.push(gf * reps as f64 / t0.elapsed().as_secs_f64());
            }
        }
        let med = |v: &mut Vec<f64>| {
            v.sort_by(|a, b| a.total_cmp(b));
            v[v.len() / 2]
        };
        let base_rate = med(&mut runs[0].3);
        let base_wall = med(&mut runs[0].4);
        for (name, entry, _, rates, walls) in runs.iter_mut() {
            let (m, w) = (med(rates), med(walls));
            eprintln!(
                "M={rows} K={k:4} N={n:4} {label:10} {name:6} {entry:18} {m:6.2} GFLOP/cpu-s  \
                 ({:+.1} %)  {w:6.2} GFLOP/s wall ({:+.1} %)  [{}]",
                (m / base_rate - 1.0) * 100.0,
                (w / base_wall - 1.0) * 100.0,
                rates
                    .iter()
                    .map(|v| format!("{v:.1}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
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
