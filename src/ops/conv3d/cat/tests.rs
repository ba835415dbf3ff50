//! Tests of [`super`]: the fused op against the CPU reference on fresh random inputs
//! (outputs poisoned), on the texture path and on the concat fallback.

use super::*;
use crate::ops::concat::Concat;
use crate::ops::run_cpu;
use crate::ops::testing::{check_op, ctx, random, rel_err, rng};

fn shapes(n: usize, ca: usize, cb: usize, o: usize, s: [usize; 3], k: usize) -> Vec<Vec<usize>> {
    vec![
        vec![n, ca, s[0], s[1], s[2]],
        vec![n, cb, s[0], s[1], s[2]],
        vec![o, ca + cb, k, k, k],
        vec![o],
    ]
}

/// (n, ca, cb, o, spatial): odd sizes, channel counts not multiples of 4 (whose runs are
/// whole texels only when D·H·W is a multiple of 4), N = 1 and 2.
const CASES: [(usize, usize, usize, usize, [usize; 3]); 8] = [
    (1, 3, 5, 7, [5, 7, 9]),
    (2, 3, 2, 5, [5, 7, 9]),
    (1, 5, 3, 17, [4, 6, 6]),
    (2, 1, 6, 19, [3, 4, 5]),
    (2, 4, 4, 16, [4, 9, 10]),
    (1, 6, 2, 33, [8, 8, 8]),
    (2, 7, 9, 3, [2, 3, 1]),
    (1, 20, 13, 24, [4, 17, 20]),
];

#[test]
fn kernel_matches_reference() {
    for k in [3, 1] {
        for (n, ca, cb, o, s) in CASES {
            check_op(&Conv3dCat::new(k), &shapes(n, ca, cb, o, s, k), 1e-5);
            check_op(&Conv3dCat::with_relu(k), &shapes(n, ca, cb, o, s, k), 1e-5);
        }
    }
}

#[test]
fn reference_is_concat_then_conv3d() {
    // The reference builds its im2col blocks from both inputs (K = 3) or adds one gemm per
    // input (K = 1): against the plain concat and the plain conv3d reference.
    let mut r = rng();
    for (k, relu) in [(3, false), (3, true), (1, false), (1, true)] {
        let op = Conv3dCat { kernel: k, relu };
        for (n, ca, cb, o, s) in [(2, 3, 2, 4, [3, 5, 4]), (1, 1, 6, 70, [17, 6, 65])] {
            let sh = shapes(n, ca, cb, o, s, k);
            let data: Vec<Vec<f32>> = sh.iter().map(|x| random(&mut r, numel(x))).collect();
            let io = crate::ops::testing::pairs(&data, &sh);
            let (got, gs) = run_cpu(&op, &io).unwrap();
            let (cat, cs) = run_cpu(&Concat, &io[..2]).unwrap();
            let conv = Conv3d { kernel: k, relu };
            let (want, ws) = run_cpu(&conv, &[(&cat, &cs), io[2], io[3]]).unwrap();
            assert_eq!(gs, ws);
            let e = rel_err(&got, &want);
            assert!(e <= 1e-6, "{sh:?}: {e}");
        }
    }
}

#[test]
fn texture_path_fills_from_both_inputs() {
    // Where the texture kernel applies, the op is that one kernel, its texture filled by
    // one copy per input and sample; elsewhere the plain conv, the concat copied in
    // before it (one buffer copy per input and sample).
    let c = ctx();
    let sg = super::super::use_subgroup_kernel(c);
    for (n, ca, cb, s, tex) in [
        (1, 3, 5, [4, 6, 6], true),
        (2, 1, 6, [3, 4, 5], true),
        (2, 3, 2, [5, 7, 9], false),
    ] {
        let op = Conv3dCat::with_relu(3);
        let sh = shapes(n, ca, cb, 5, s, 3);
        let refs: Vec<&[usize]> = sh.iter().map(|x| x.as_slice()).collect();
        let t: Vec<_> = sh
            .iter()
            .map(|s| c.upload(&vec![0.0; numel(s)], s).unwrap())
            .collect();
        let bufs: Vec<&wgpu::Buffer> = t.iter().map(|t| t.buffer.as_ref()).collect();
        let out = c.empty(&op.output_shape(&refs).unwrap()).unwrap();
        let ds = op.gpu(c, &bufs, &refs, &out.buffer).unwrap();
        let names: Vec<&str> = ds.iter().map(|d| d.name).collect();
        if sg && tex {
            assert_eq!(names, ["conv3d_k3_sg_tex"], "{sh:?}");
            assert_eq!(ds[0].copies.len(), 2 * n, "{sh:?}");
        } else {
            assert_eq!(names.len(), 1, "{sh:?}: {names:?}");
            assert_ne!(names[0], "conv3d_k3_sg_tex", "{sh:?}");
            assert_eq!(ds[0].before.len(), 2 * n, "{sh:?}");
        }
    }
}

#[test]
fn fallback_matches_reference() {
    // The concat-then-conv path, whatever the device (the texture path is covered above),
    // whole and (with a tiny binding limit) in depth slabs of its own.
    let small = [(1, 3, 2, 3, [12, 5, 7]), (2, 1, 2, 2, [10, 6, 5])];
    for (limit, cases) in [(u64::MAX, &CASES[..]), (4096, &small[..])] {
        fallback_cases(limit, cases);
    }
}

fn fallback_cases(limit: u64, cases: &[(usize, usize, usize, usize, [usize; 3])]) {
    let c = ctx();
    let mut r = rng();
    for &(n, ca, cb, o, s) in cases {
        let op = Conv3dCat::with_relu(3);
        let sh = shapes(n, ca, cb, o, s, 3);
        let refs: Vec<&[usize]> = sh.iter().map(|x| x.as_slice()).collect();
        let data: Vec<Vec<f32>> = sh.iter().map(|x| random(&mut r, numel(x))).collect();
        let io = crate::ops::testing::pairs(&data, &sh);
        let (want, ws) = run_cpu(&op, &io).unwrap();
        let t: Vec<_> = data
            .iter()
            .zip(&sh)
            .map(|(x, s)| c.upload(x, s).unwrap())
            .collect();
        let bufs: Vec<&wgpu::Buffer> = t.iter().map(|t| t.buffer.as_ref()).collect();
        let out = c.empty(&ws).unwrap();
        c.fill(&out.buffer, f32::NAN);
        let (d, _, _) = op.dims(&refs).unwrap();
        let limit = limit.min(c.caps.max_binding);
        let ds = op
            .gpu_via_concat(c, d, &bufs, &refs, &out.buffer, limit)
            .unwrap();
        let slabs = ds.iter().filter(|d| !d.before.is_empty()).count();
        assert_eq!(slabs > 1, limit == 4096, "{sh:?}: {slabs} slabs");
        c.run(&ds).unwrap();
        let e = rel_err(&c.download(&out).unwrap(), &want);
        assert!(e <= 1e-5, "{sh:?} limit {limit}: {e}");
    }
}

#[test]
fn rejects_bad_shapes() {
    let op = Conv3dCat::new(3);
    for sh in [
        shapes(1, 2, 3, 4, [3, 3, 3], 3)[..3].to_vec(),
        vec![
            vec![1, 2, 3, 3, 3],
            vec![2, 3, 3, 3, 3],
            vec![4, 5, 3, 3, 3],
            vec![4],
        ],
        vec![
            vec![1, 2, 3, 3, 3],
            vec![1, 3, 3, 3, 4],
            vec![4, 5, 3, 3, 3],
            vec![4],
        ],
        vec![
            vec![1, 2, 3, 3, 3],
            vec![1, 3, 3, 3, 3],
            vec![4, 4, 3, 3, 3],
            vec![4],
        ],
        vec![
            vec![1, 2, 3, 3, 3],
            vec![1, 3, 3, 3, 3],
            vec![4, 5, 1, 1, 1],
            vec![4],
        ],
        vec![
            vec![1, 2, 3, 3, 3],
            vec![1, 3, 3, 3, 3],
            vec![4, 5, 3, 3, 3],
            vec![5],
        ],
    ] {
        let refs: Vec<&[usize]> = sh.iter().map(|x| x.as_slice()).collect();
        let e = op.output_shape(&refs).unwrap_err();
        assert!(e.to_string().contains("conv3d_cat"), "{sh:?}: {e}");
    }
    assert_eq!(
        op.flops(&[&[2, 3, 4, 5, 6], &[2, 1, 4, 5, 6], &[7, 4, 3, 3, 3], &[7]]),
        2 * 2 * 7 * 120 * 4 * 27
    );
}
