//! Tests of [`super`]: the CPU reference against naive definitions, every kernel
//! against the reference on random inputs.

use super::*;
use crate::ops::numel;
use crate::ops::testing::{check_op, ctx, random, rel_err, rng};

fn shapes(n: usize, ci: usize, co: usize, s: [usize; 3]) -> Vec<Vec<usize>> {
    vec![
        vec![n, ci, s[0], s[1], s[2]],
        vec![ci, co, 4, 4, 4],
        vec![co],
    ]
}

/// Gather form written independently of the kernels: every (output, input, tap)
/// triple with o = 2i − 1 + k, per axis.
fn gather(d: TransposeDims, x: &[f32], w: &[f32], b: &[f32]) -> Vec<f32> {
    let (od, oh, ow) = (2 * d.d, 2 * d.h, 2 * d.w);
    let mut out = vec![0f32; d.n * d.co * od * oh * ow];
    let taps = |o: usize, n: usize| -> Vec<(usize, usize)> {
        (0..n)
            .flat_map(|i| (0..4).map(move |k| (i, k)))
            .filter(|&(i, k)| 2 * i + k == o + 1)
            .collect()
    };
    for n in 0..d.n {
        for o in 0..d.co {
            for oz in 0..od {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut s = b[o] as f64;
                        for (iz, kz) in taps(oz, d.d) {
                            for (iy, ky) in taps(oy, d.h) {
                                for (ix, kx) in taps(ox, d.w) {
                                    for c in 0..d.ci {
                                        let xi =
                                            (((n * d.ci + c) * d.d + iz) * d.h + iy) * d.w + ix;
                                        let wi = (c * d.co + o) * 64 + (kz * 4 + ky) * 4 + kx;
                                        s += x[xi] as f64 * w[wi] as f64;
                                    }
                                }
                            }
                        }
                        out[(((n * d.co + o) * od + oz) * oh + oy) * ow + ox] = s as f32;
                    }
                }
            }
        }
    }
    out
}

/// The definition's plain loops (the former reference): scatter every input voxel
/// into its 4×4×4 output window.
fn scatter_naive(d: TransposeDims, x: &[f32], w: &[f32], b: &[f32]) -> Vec<f32> {
    let (od, oh, ow) = (2 * d.d, 2 * d.h, 2 * d.w);
    let ov = od * oh * ow;
    let mut out = vec![0f32; d.n * d.co * ov];
    for n in 0..d.n {
        for o in 0..d.co {
            out[(n * d.co + o) * ov..][..ov].fill(b[o]);
        }
        for c in 0..d.ci {
            for i in 0..d.voxels() {
                let (iz, iy, ix) = (i / (d.h * d.w), (i / d.w) % d.h, i % d.w);
                let xv = x[(n * d.ci + c) * d.voxels() + i];
                for o in 0..d.co {
                    for k in 0..64 {
                        let (oz, oy, ox) = (
                            (2 * iz + k / 16) as isize - 1,
                            (2 * iy + (k / 4) % 4) as isize - 1,
                            (2 * ix + k % 4) as isize - 1,
                        );
                        if oz < 0 || oy < 0 || ox < 0 {
                            continue;
                        }
                        let (oz, oy, ox) = (oz as usize, oy as usize, ox as usize);
                        if oz >= od || oy >= oh || ox >= ow {
                            continue;
                        }
                        out[(n * d.co + o) * ov + (oz * oh + oy) * ow + ox] +=
                            xv * w[(c * d.co + o) * 64 + k];
                    }
                }
            }
        }
    }
    out
}

#[test]
fn gemm_form_matches_plain_loops_in_chunks() {
    // Column limits from one z-plane per chunk to the whole sample; odd shapes.
    let mut r = rng();
    for (n, ci, co, s, limit) in [
        (2, 3, 5, [5, 3, 4], 1),
        (1, 7, 2, [3, 2, 5], 2 * 64 * 10),
        (1, 4, 3, [4, 4, 1], usize::MAX / 2),
        (3, 1, 1, [1, 1, 1], 1),
    ] {
        let sh = shapes(n, ci, co, s);
        let data: Vec<Vec<f32>> = sh.iter().map(|x| random(&mut r, numel(x))).collect();
        let refs: Vec<&[usize]> = sh.iter().map(|x| x.as_slice()).collect();
        let d = ConvTranspose3d.dims(&refs).unwrap();
        let mut out = vec![f32::NAN; d.n * d.co * d.voxels() * 8];
        conv_transpose3d_chunked(d, &data[0], &data[1], &data[2], &mut out, limit);
        let want = scatter_naive(d, &data[0], &data[1], &data[2]);
        assert!(rel_err(&out, &want) < 1e-5, "{d:?} limit {limit}");
    }
}

#[test]
fn reference_matches_gather_form() {
    let mut r = rng();
    for (n, ci, co, s) in [
        (1, 3, 5, [2, 3, 4]),
        (2, 2, 3, [1, 1, 1]),
        (1, 1, 2, [5, 1, 3]),
    ] {
        let sh = shapes(n, ci, co, s);
        let data: Vec<Vec<f32>> = sh.iter().map(|x| random(&mut r, numel(x))).collect();
        let refs: Vec<&[usize]> = sh.iter().map(|x| x.as_slice()).collect();
        let d = ConvTranspose3d.dims(&refs).unwrap();
        let mut out = vec![f32::NAN; d.n * d.co * d.voxels() * 8];
        conv_transpose3d(d, &data[0], &data[1], &data[2], &mut out);
        let want = gather(d, &data[0], &data[1], &data[2]);
        assert!(rel_err(&out, &want) < 1e-5, "{d:?}");
    }
}

#[test]
fn one_input_spreads_to_its_4x4x4_window() {
    // A single input voxel at (1, 1, 1) of 3³ with weights = k index: output voxel
    // 2·1 − 1 + k = 1 + k gets w[k].
    let d = TransposeDims {
        n: 1,
        ci: 1,
        co: 1,
        d: 3,
        h: 3,
        w: 3,
    };
    let mut x = vec![0f32; 27];
    x[13] = 1.0;
    let w: Vec<f32> = (0..64).map(|k| k as f32).collect();
    let mut out = vec![0f32; 216];
    conv_transpose3d(d, &x, &w, &[0.5], &mut out);
    for (i, v) in out.iter().enumerate() {
        let (z, y, xx) = (i / 36, (i / 6) % 6, i % 6);
        let inside = (1..5).contains(&z) && (1..5).contains(&y) && (1..5).contains(&xx);
        let want = if inside {
            (((z - 1) * 4 + y - 1) * 4 + xx - 1) as f32 + 0.5
        } else {
            0.5
        };
        assert_eq!(*v, want, "output {i}");
    }
}

#[test]
fn kernel_matches_reference() {
    for (n, ci, co, s) in [
        (1, 3, 5, [5, 7, 9]),
        (2, 3, 5, [1, 1, 1]),
        (1, 3, 5, [17, 6, 3]),
        (2, 4, 17, [3, 18, 10]),
        (1, 5, 33, [2, 9, 17]),
        (1, 3, 40, [2, 3, 9]),
        // Inputs filling whole texels: the subgroup (texture) kernels on CPU-like
        // devices.
        (1, 4, 33, [2, 9, 17]),
        (2, 2, 5, [3, 5, 7]),
    ] {
        check_op(&ConvTranspose3d, &shapes(n, ci, co, s), 1e-5);
    }
}

#[test]
fn portable_kernel_matches_reference() {
    let c = ctx();
    let mut r = rng();
    let sh = shapes(2, 3, 11, [3, 5, 6]);
    let data: Vec<Vec<f32>> = sh.iter().map(|x| random(&mut r, numel(x))).collect();
    let refs: Vec<&[usize]> = sh.iter().map(|x| x.as_slice()).collect();
    let d = ConvTranspose3d.dims(&refs).unwrap();
    let mut want = vec![0f32; d.n * d.co * d.voxels() * 8];
    conv_transpose3d(d, &data[0], &data[1], &data[2], &mut want);
    let t: Vec<_> = data
        .iter()
        .zip(&sh)
        .map(|(x, s)| c.upload(x, s).unwrap())
        .collect();
    let out = c.empty(&[d.n, d.co, 2 * d.d, 2 * d.h, 2 * d.w]).unwrap();
    c.fill(&out.buffer, f32::NAN);
    let p = Params {
        ci: d.ci as u32,
        co: d.co as u32,
        d: d.d as u32,
        h: d.h as u32,
        w: d.w as u32,
        dhw: d.voxels() as u32,
        groups: d.co.div_ceil(8) as u32,
        tiles_x: 0,
        tiles_y: 0,
        px: 0,
        _pad: [0; 2],
    };
    let disp = c
        .dispatch(KernelArgs {
            shader: CONV_TRANSPOSE3D.portable(),
            entry: "conv_transpose3d",
            constants: &[],
            buffers: &[&t[0].buffer, &t[1].buffer, &t[2].buffer, &out.buffer],
            params: bytemuck::bytes_of(&p),
            workgroups: [
                (8 * d.voxels()).div_ceil(64) as u32,
                1,
                (d.n * d.co.div_ceil(8)) as u32,
            ],
        })
        .unwrap();
    c.run(&[disp]).unwrap();
    let got = c.download(&out).unwrap();
    assert!(rel_err(&got, &want) <= 1e-5);
    assert!(!CONV_TRANSPOSE3D
        .portable()
        .text
        .contains("subgroupBroadcast"));
}

#[test]
fn padded_dispatch_grid_is_harmless() {
    // ctx.grid may round a long 1-D range up to a 2-D grid: extra workgroups must not
    // write anything.
    let c = ctx();
    let mut r = rng();
    {
        let op = ConvTranspose3d;
        let sh = shapes(1, 4, 20, [3, 5, 9]);
        let data: Vec<Vec<f32>> = sh.iter().map(|x| random(&mut r, numel(x))).collect();
        let inputs = crate::ops::testing::pairs(&data, &sh);
        let (want, _) = crate::ops::run_cpu(&op, &inputs).unwrap();
        let refs: Vec<&[usize]> = sh.iter().map(|x| x.as_slice()).collect();
        let t: Vec<_> = data
            .iter()
            .zip(&sh)
            .map(|(x, s)| c.upload(x, s).unwrap())
            .collect();
        let out = c.empty(&op.output_shape(&refs).unwrap()).unwrap();
        c.fill(&out.buffer, f32::NAN);
        let bufs: Vec<&wgpu::Buffer> = t.iter().map(|t| t.buffer.as_ref()).collect();
        let mut disp = op.gpu(c, &bufs, &refs, &out.buffer).unwrap();
        let textured = disp.iter().any(|d| !d.copies.is_empty());
        let sg = c.caps.cpu_like && c.caps.subgroups && c.info.subgroup_min_size >= 8;
        assert_eq!(textured, sg);
        for d in &mut disp {
            d.workgroups[1] += 1;
        }
        c.run(&disp).unwrap();
        assert!(rel_err(&c.download(&out).unwrap(), &want) <= 1e-5);
    }
}

#[test]
fn rejects_wrong_channels() {
    let e = ConvTranspose3d
        .output_shape(&[&[1, 4, 5, 5, 5], &[3, 2, 4, 4, 4], &[2]])
        .unwrap_err();
    assert!(e.to_string().contains("conv_transpose3d"), "{e}");
    assert!(ConvTranspose3d
        .output_shape(&[&[1, 4, 5, 5, 5], &[4, 2, 3, 3, 3], &[2]])
        .is_err());
    assert!(ConvTranspose3d
        .output_shape(&[&[1, 4, 5, 5, 5], &[4, 2, 4, 4, 4], &[4]])
        .is_err());
}

#[test]
fn batchnorm_fold_matches_then_bn() {
    let mut r = rng();
    let sh = shapes(1, 3, 4, [2, 3, 2]);
    let data: Vec<Vec<f32>> = sh.iter().map(|x| random(&mut r, numel(x))).collect();
    let refs: Vec<&[usize]> = sh.iter().map(|x| x.as_slice()).collect();
    let d = ConvTranspose3d.dims(&refs).unwrap();
    let (gamma, beta, mean) = (random(&mut r, 4), random(&mut r, 4), random(&mut r, 4));
    let var: Vec<f32> = random(&mut r, 4).iter().map(|v| v.abs() + 0.1).collect();
    let eps = 1e-5;
    let mut y = vec![0f32; d.n * d.co * d.voxels() * 8];
    conv_transpose3d(d, &data[0], &data[1], &data[2], &mut y);
    let v = d.voxels() * 8;
    let want: Vec<f32> = y
        .iter()
        .enumerate()
        .map(|(i, y)| {
            let o = (i / v) % d.co;
            (y - mean[o]) / (var[o] + eps).sqrt() * gamma[o] + beta[o]
        })
        .collect();
    let (mut w, mut b) = (data[1].clone(), data[2].clone());
    fold_batchnorm_transposed(&mut w, &mut b, 3, 4, &gamma, &beta, &mean, &var, eps).unwrap();
    let mut got = vec![0f32; y.len()];
    conv_transpose3d(d, &data[0], &w, &b, &mut got);
    assert!(rel_err(&got, &want) < 1e-5);
    assert!(
        fold_batchnorm_transposed(&mut w, &mut b, 5, 4, &gamma, &beta, &mean, &var, eps).is_err()
    );
}

/// Generates the subgroup section of `shaders/conv_transpose3d.wgsl` (WGSL wants
/// subgroupBroadcast lane indices to be constants and the accumulators must be registers,
/// so the tile is written out).
fn sg_source() -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let w = &mut s;
    let _ = write!(
            w,
            "// BEGIN subgroups (stripped on devices without subgroup operations)
//
// Variants \"conv_transpose3d_sg_l\" / \"_sg_r\" (CPU-like devices with subgroups of at
// least 8 lanes, e.g. lavapipe, where every storage-buffer load is a slow per-lane loop; see
// conv3d.wgsl): one dispatch per x parity px (l: px = 0, the x-neighbour tap is on the
// left; r: px = 1, on the right). A workgroup is one subgroup computing, for one (pz, py)
// class and one input slice qz, outputs (2qz + pz, 2qy + py, 2qx + px) for 8 consecutive
// qx × {RY} rows qy × {TO} output channels (lane i owns qx = x0 + i). Per input channel
// each lane loads its column of the 2 × {NR} input rows, a share of the row edges and one
// weight per output channel (lane i holds tap (tz, ty, xs) = (i / 4, i / 2 % 2, i % 2)),
// shared by broadcast.
//
// Generated by `sg_source()` in src/ops/conv_transpose3d.rs (regenerate with
// VOLFUSE_REGEN_CONV3D=1 cargo test --lib ops::conv_transpose3d::tests::subgroup_kernel_is_generated).

fn from_left(v: f32, edge: f32, lane: u32) -> f32 {{
    var l = edge;
",
            RY = SG_RY,
            TO = SG_TO,
            NR = SG_RY + 1
        );
    for j in 0..7 {
        let _ = writeln!(
            w,
            "    l = select(l, subgroupBroadcast(v, {j}u), lane == {}u);",
            j + 1
        );
    }
    let _ = write!(
        w,
        "    return l;
}}

fn from_right(v: f32, edge: f32, lane: u32) -> f32 {{
    var g = edge;
"
    );
    for j in 0..7 {
        let _ = writeln!(
            w,
            "    g = select(g, subgroupBroadcast(v, {}u), lane == {j}u);",
            j + 1
        );
    }
    let _ = writeln!(
        w,
        "    return g;
}}

fn store_sg(i: u32, oc: u32, v: f32) {{
    if (oc < p.co) {{ out[i] = v + bias[oc]; }}
}}

// The input copied into an rgba32float texture, 4 consecutive values a texel, rows of
// 1024 texels (GpuContext::scratch_texture): texel fetches are much cheaper than
// storage-buffer loads on lavapipe.
@group(0) @binding(5) var xt: texture_2d<f32>;

fn xtex(i: u32) -> f32 {{
    let t = i >> 2u;
    return textureLoad(xt, vec2<u32>(t & 1023u, t >> 10u), 0)[i & 3u];
}}"
    );
    sg_entry(w, SG_TO, false);
    sg_entry(w, SG_TO, true);
    let _ = writeln!(w, "// END subgroups");
    s
}

/// One subgroup entry point; `right`: px = 1.
fn sg_entry(w: &mut String, to: usize, right: bool) {
    use std::fmt::Write;
    let (ry, nr) = (SG_RY, SG_RY + 1);
    let ne = (2 * nr).div_ceil(8);
    let px = right as usize;
    let _ = write!(
        w,
        "
@compute @workgroup_size(8)
fn conv_transpose3d_sg_{name}(@builtin(workgroup_id) wg: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32) {{
    let tile = wg.x + wg.y * nwg.x;
    let txy = p.tiles_x * p.tiles_y;
    let qz = i32((tile / txy) % p.d);
    let cls = tile / (txy * p.d);
    if (cls >= 4u) {{ return; }}  // padding of a 2-D dispatch grid
    let pz = i32(cls / 2u);
    let py = i32(cls % 2u);
    let n = wg.z / p.groups;
    let o0 = (wg.z % p.groups) * {to}u;
    let hi = i32(p.h);
    let wi = i32(p.w);
    let hw = p.h * p.w;
    let x0 = i32((tile % p.tiles_x) * 8u);
    let y0 = i32(((tile / p.tiles_x) % p.tiles_y) * {ry}u);
    let xl = x0 + i32(lane);
    let xok = xl < wi;
    // z taps t: input slice qz + pz - t, kz = 2t + 1 - pz.
    let zk0 = qz + pz < i32(p.d);
    let zk1 = qz + pz - 1 >= 0;
    let zo0 = select(0u, u32(qz + pz) * hw, zk0);
    let zo1 = select(0u, u32(qz + pz - 1) * hw, zk1);
    // Input row j: y = y0 + py - 1 + j (output row r uses rows r + 1 (ty = 0) and r (ty = 1)).
",
        name = if right { "r" } else { "l" }
    );
    for j in 0..nr {
        let _ = writeln!(
                w,
                "    let ry{j} = y0 + py + {};\n    let rk{j} = xok && ry{j} >= 0 && ry{j} < hi;\n    let ro{j} = select(0u, u32(ry{j} * wi + xl), rk{j});",
                j as i64 - 1
            );
    }
    let _ = writeln!(
        w,
        "    // Edge slot s = 8k + lane: row s % {nr} of z tap s / {nr}, at x = {}.",
        if right { "x0 + 8" } else { "x0 - 1" }
    );
    for k in 0..ne {
        let _ = write!(
                w,
                "    let es{k} = {}u + lane;
    let et{k} = es{k} / {nr}u;
    let ey{k} = y0 + py + i32(es{k} % {nr}u) - 1;
    let ex{k} = x0 + {};
    let ek{k} = es{k} < {}u && select(zk1, zk0, et{k} == 0u) && ey{k} >= 0 && ey{k} < hi && ex{k} >= 0 && ex{k} < wi;
    let eo{k} = select(0u, select(zo1, zo0, et{k} == 0u) + u32(ey{k} * wi + ex{k}), ek{k});
",
                8 * k,
                if right { 8 } else { -1 },
                2 * nr
            );
    }
    let _ = write!(
            w,
            "    // Weight lane: tap (tz, ty, xs) = (lane / 4, lane / 2 % 2, lane % 2), xs = 1: neighbour.
    let wtz = i32(lane / 4u);
    let wty = i32((lane / 2u) % 2u);
    let wkx = select({}u, {}u, lane % 2u == 1u);
    let wl = u32(2 * wtz + 1 - pz) * 16u + u32(2 * wty + 1 - py) * 4u + wkx;
",
            1 + px,
            3 - 3 * px
        );
    for k in 0..to {
        let _ = writeln!(w, "    let wo{k} = min(o0 + {k}u, p.co - 1u) * 64u + wl;");
    }
    for r in 0..ry {
        let _ = write!(w, "   ");
        for o in 0..to {
            let _ = write!(w, " var a{r}_{o} = 0.0;");
        }
        let _ = writeln!(w);
    }
    let _ = writeln!(
        w,
        "    for (var c = 0u; c < p.ci; c++) {{
        let base = (n * p.ci + c) * p.dhw;
        let cw = c * p.co * 64u;"
    );
    for t in 0..2 {
        for j in 0..nr {
            let _ = writeln!(
                w,
                "        let v{t}_{j} = select(0.0, xtex(base + zo{t} + ro{j}), rk{j} && zk{t});"
            );
        }
    }
    for k in 0..ne {
        let _ = writeln!(
            w,
            "        let e{k} = select(0.0, xtex(base + eo{k}), ek{k});"
        );
    }
    for k in 0..to {
        let _ = writeln!(w, "        let w{k} = wt[wo{k} + cw];");
    }
    let side = if right { "from_right" } else { "from_left" };
    for t in 0..2 {
        for j in 0..nr {
            let s = t * nr + j;
            let _ = writeln!(
                w,
                "        let n{t}_{j} = {side}(v{t}_{j}, subgroupBroadcast(e{}, {}u), lane);",
                s / 8,
                s % 8
            );
        }
    }
    for o in 0..to {
        let _ = writeln!(w, "        {{");
        for q in 0..8 {
            let _ = writeln!(w, "            let q{q} = subgroupBroadcast(w{o}, {q}u);");
        }
        for r in 0..ry {
            let _ = write!(w, "            a{r}_{o} = ");
            for q in (0..8).rev() {
                let (t, ty, xs) = (q / 4, (q / 2) % 2, q % 2);
                let j = r + 1 - ty;
                let src = if xs == 0 { "v" } else { "n" };
                let _ = write!(w, "fma({src}{t}_{j}, q{q}, ");
            }
            let _ = writeln!(w, "a{r}_{o}{};", ")".repeat(8));
        }
        let _ = writeln!(w, "        }}");
    }
    let _ = write!(
        w,
        "    }}
    if (!xok) {{ return; }}
    let oh = 2u * p.h;
    let ow = 2u * p.w;
    let odhw = 8u * p.dhw;
    let oz = u32(2 * qz + pz);
    let ox = u32(2 * xl) + {px}u;
"
    );
    for r in 0..ry {
        let _ = writeln!(
                w,
                "    if (y0 + {r} < hi) {{\n        let ov = (oz * oh + u32(2 * (y0 + {r}) + py)) * ow + ox;"
            );
        for o in 0..to {
            let _ = writeln!(
                w,
                "        store_sg((n * p.co + o0 + {o}u) * odhw + ov, o0 + {o}u, a{r}_{o});"
            );
        }
        let _ = writeln!(w, "    }}");
    }
    let _ = writeln!(w, "}}");
}

#[test]
fn subgroup_kernel_is_generated() {
    crate::ops::testing::check_generated(
        &CONV_TRANSPOSE3D,
        "shaders/conv_transpose3d.wgsl",
        &sg_source(),
    );
}

/// Times the GPU kernel on `LAB_SHAPE=n,ci,co,d,h,w` (development aid).
#[test]
#[ignore]
fn lab_time() {
    let v: Vec<usize> = std::env::var("LAB_SHAPE")
        .unwrap_or("1,32,32,32,32,32".into())
        .split(',')
        .map(|s| s.parse().unwrap())
        .collect();
    let case = crate::bench::Case::new(
        "lab",
        ConvTranspose3d,
        shapes(v[0], v[1], v[2], [v[3], v[4], v[5]]),
    );
    let c = ctx();
    crate::ops::testing::lab_time(c, &case);
}
