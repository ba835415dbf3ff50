//! Tests of [`super`]: the CPU reference against naive definitions, every kernel
//! against the reference on random inputs.

use super::*;
use crate::ops::numel;
use crate::ops::testing::{check_op, ctx, random, rel_err, rng};

/// The 7-loop definition, to check the im2col reference itself.
fn naive(d: ConvDims, x: &[f32], w: &[f32], b: &[f32]) -> Vec<f32> {
    let (k, pad) = (d.k, (d.k / 2) as isize);
    let mut out = vec![0f32; d.n * d.o * d.voxels()];
    for n in 0..d.n {
        for o in 0..d.o {
            for z in 0..d.d {
                for y in 0..d.h {
                    for xo in 0..d.w {
                        let mut s = b[o] as f64;
                        for c in 0..d.c {
                            for kd in 0..k {
                                for kh in 0..k {
                                    for kw in 0..k {
                                        let zz = z as isize + kd as isize - pad;
                                        let yy = y as isize + kh as isize - pad;
                                        let xx = xo as isize + kw as isize - pad;
                                        if zz < 0
                                            || yy < 0
                                            || xx < 0
                                            || zz >= d.d as isize
                                            || yy >= d.h as isize
                                            || xx >= d.w as isize
                                        {
                                            continue;
                                        }
                                        let xi = (((n * d.c + c) * d.d + zz as usize) * d.h
                                            + yy as usize)
                                            * d.w
                                            + xx as usize;
                                        let wi = (((o * d.c + c) * k + kd) * k + kh) * k + kw;
                                        s += x[xi] as f64 * w[wi] as f64;
                                    }
                                }
                            }
                        }
                        out[(((n * d.o + o) * d.d + z) * d.h + y) * d.w + xo] = s as f32;
                    }
                }
            }
        }
    }
    out
}

fn shapes(n: usize, c: usize, o: usize, s: [usize; 3], k: usize) -> Vec<Vec<usize>> {
    vec![vec![n, c, s[0], s[1], s[2]], vec![o, c, k, k, k], vec![o]]
}

#[test]
fn reference_matches_naive() {
    let mut r = rng();
    for k in [1, 3] {
        for (n, c, o, s) in [
            (1, 3, 5, [5, 7, 9]),
            (2, 2, 3, [1, 1, 1]),
            (1, 4, 2, [17, 6, 3]),
            (2, 1, 1, [2, 3, 1]),
        ] {
            let sh = shapes(n, c, o, s, k);
            let data: Vec<Vec<f32>> = sh.iter().map(|x| random(&mut r, numel(x))).collect();
            let refs: Vec<&[usize]> = sh.iter().map(|x| x.as_slice()).collect();
            let d = Conv3d::new(k).dims(&refs).unwrap();
            let mut out = vec![0f32; d.n * d.o * d.voxels()];
            conv3d(d, &data[0], &data[1], &data[2], &mut out);
            let want = naive(d, &data[0], &data[1], &data[2]);
            let e = rel_err(&out, &want);
            assert!(e < 1e-5, "{d:?}: {e}");
        }
    }
}

#[test]
fn reference_chunks_depth() {
    // Large enough that the im2col scratch is split into several row chunks.
    let mut r = rng();
    let sh = shapes(1, 40, 2, [6, 64, 64], 3);
    let data: Vec<Vec<f32>> = sh.iter().map(|x| random(&mut r, numel(x))).collect();
    let refs: Vec<&[usize]> = sh.iter().map(|x| x.as_slice()).collect();
    let d = Conv3d::new(3).dims(&refs).unwrap();
    // Several row chunks, the last one short.
    let per = COL_LIMIT / (d.c * 27 * d.w);
    assert!(per < d.d * d.h && !(d.d * d.h).is_multiple_of(per));
    let mut out = vec![0f32; d.n * d.o * d.voxels()];
    conv3d(d, &data[0], &data[1], &data[2], &mut out);
    let want = naive(d, &data[0], &data[1], &data[2]);
    assert!(rel_err(&out, &want) < 1e-5);
}

#[test]
fn kernel_matches_reference() {
    for k in [1, 3] {
        for (n, c, o, s) in [
            (1, 3, 5, [5, 7, 9]),
            (2, 3, 5, [1, 1, 1]),
            (1, 3, 5, [17, 6, 3]),
            (2, 4, 17, [3, 9, 10]),
            (1, 20, 33, [4, 17, 19]),
            (1, 6, 70, [3, 5, 11]),
            (1, 8, 70, [3, 5, 11]),
            (1, 70, 40, [4, 9, 10]),
        ] {
            check_op(&Conv3d::new(k), &shapes(n, c, o, s, k), 1e-5);
            check_op(&Conv3d::with_relu(k), &shapes(n, c, o, s, k), 1e-5);
        }
    }
    // The 64-channel K = 1 tile runs only from SG64_MIN_VOXELS voxels on (a partial
    // second group of 64 here).
    const { assert!(64 * 64 * 64 >= SG64_MIN_VOXELS) };
    check_op(
        &Conv3d::with_relu(1),
        &shapes(1, 5, 70, [64, 64, 64], 1),
        1e-5,
    );
}

#[test]
fn k1_tile_is_64_channels_only_for_large_volumes() {
    assert_eq!(k1_tile(70, SG64_MIN_VOXELS), 64);
    assert_eq!(k1_tile(64, 2 * SG64_MIN_VOXELS), 64);
    assert_eq!(k1_tile(70, SG64_MIN_VOXELS - 1), 32);
    assert_eq!(k1_tile(63, 2 * SG64_MIN_VOXELS), 32);
    assert_eq!(k1_tile(5, 1), 32);
}

#[test]
fn portable_kernel_matches_reference() {
    // The kernel used on devices without the subgroup variant.
    let c = ctx();
    let mut r = rng();
    let sh = shapes(2, 3, 11, [5, 7, 9], 3);
    let data: Vec<Vec<f32>> = sh.iter().map(|x| random(&mut r, numel(x))).collect();
    let refs: Vec<&[usize]> = sh.iter().map(|x| x.as_slice()).collect();
    let d = Conv3d::new(3).dims(&refs).unwrap();
    let mut want = vec![0f32; d.n * d.o * d.voxels()];
    conv3d(d, &data[0], &data[1], &data[2], &mut want);
    let t: Vec<_> = data
        .iter()
        .zip(&sh)
        .map(|(x, s)| c.upload(x, s).unwrap())
        .collect();
    let out = c.empty(&[d.n, d.o, d.d, d.h, d.w]).unwrap();
    c.fill(&out.buffer, f32::NAN);
    let p = Params {
        c: d.c as u32,
        o: d.o as u32,
        d: d.d as u32,
        h: d.h as u32,
        w: d.w as u32,
        dhw: d.voxels() as u32,
        groups: d.o.div_ceil(8) as u32,
        tiles_x: 0,
        tiles_y: 0,
        relu: 0,
        ..bytemuck::Zeroable::zeroed()
    };
    let disp = c
        .dispatch(KernelArgs {
            shader: CONV3D.portable(),
            entry: "conv3d",
            constants: &[("K", 3.0)],
            buffers: &[&t[0].buffer, &t[1].buffer, &t[2].buffer, &out.buffer],
            params: bytemuck::bytes_of(&p),
            workgroups: [
                d.voxels().div_ceil(64) as u32,
                1,
                (d.n * d.o.div_ceil(8)) as u32,
            ],
        })
        .unwrap();
    c.run(&[disp]).unwrap();
    let got = c.download(&out).unwrap();
    assert!(rel_err(&got, &want) <= 1e-5);
    assert!(!CONV3D.portable().text.contains("subgroupBroadcast"));
}

#[test]
fn padded_dispatch_grid_is_harmless() {
    // ctx.grid may round a long 1-D range up to a 2-D grid: extra workgroups must not
    // write anything.
    let c = ctx();
    let mut r = rng();
    for k in [1, 3] {
        let op = Conv3d::new(k);
        let sh = shapes(1, 3, 20, [3, 5, 9], k);
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
        for d in &mut disp {
            d.workgroups[1] += 1;
        }
        c.run(&disp).unwrap();
        assert!(rel_err(&c.download(&out).unwrap(), &want) <= 1e-5);
    }
}

#[test]
fn storage_and_texture_paths_match_reference() {
    // A shape whose input fills whole texels: on CPU-like devices the texture variant
    // is chosen, and the storage-buffer variant must agree too.
    let c = ctx();
    let mut r = rng();
    let sh = shapes(2, 4, 19, [5, 9, 10], 3);
    let data: Vec<Vec<f32>> = sh.iter().map(|x| random(&mut r, numel(x))).collect();
    let refs: Vec<&[usize]> = sh.iter().map(|x| x.as_slice()).collect();
    let d = Conv3d::new(3).dims(&refs).unwrap();
    let mut want = vec![0f32; d.n * d.o * d.voxels()];
    conv3d(d, &data[0], &data[1], &data[2], &mut want);
    let t: Vec<_> = data
        .iter()
        .zip(&sh)
        .map(|(x, s)| c.upload(x, s).unwrap())
        .collect();
    let bufs: Vec<&wgpu::Buffer> = t.iter().map(|t| t.buffer.as_ref()).collect();
    for allow_texture in [false, true] {
        let out = c.empty(&[d.n, d.o, d.d, d.h, d.w]).unwrap();
        c.fill(&out.buffer, f32::NAN);
        let disp = gpu_conv3d(c, d, &bufs, &out.buffer, allow_texture, false).unwrap();
        let textured = disp.iter().any(|d| !d.copies.is_empty());
        assert_eq!(textured, allow_texture && use_subgroup_kernel(c));
        c.run(&disp).unwrap();
        let e = rel_err(&c.download(&out).unwrap(), &want);
        assert!(e <= 1e-5, "texture {allow_texture}: {e}");
    }
}

#[test]
fn texture_depth_slabs_match_reference() {
    // The texture kernel in depth slabs (small texture limits), from one input or the
    // channel concat of two (conv3d_cat): slabs of one and two tiles, a last slab shorter
    // than the others, relu on and off; H·W % 4 != 0 takes the whole depth at once.
    let c = ctx();
    if !use_subgroup_kernel(c) {
        return;
    }
    let mut r = rng();
    for (n, parts, o, s, relu) in [
        (1, vec![3], 5, [13, 4, 8], false),
        (2, vec![2, 3], 17, [9, 5, 4], true),
        (1, vec![4, 1], 7, [16, 8, 6], false),
        (1, vec![5], 33, [7, 3, 4], true),
        (1, vec![4], 3, [9, 5, 5], false),
    ] {
        let ch: usize = parts.iter().sum();
        let vox = s.iter().product::<usize>();
        let xs: Vec<Vec<f32>> = parts
            .iter()
            .map(|pc| random(&mut r, n * pc * vox))
            .collect();
        let mut x = Vec::with_capacity(n * ch * vox);
        for ni in 0..n {
            for (xp, pc) in xs.iter().zip(&parts) {
                x.extend_from_slice(&xp[ni * pc * vox..(ni + 1) * pc * vox]);
            }
        }
        let (w, b) = (random(&mut r, o * ch * 27), random(&mut r, o));
        let sh = shapes(n, ch, o, s, 3);
        let refs: Vec<&[usize]> = sh.iter().map(|x| x.as_slice()).collect();
        let d = Conv3d::new(3).dims(&refs).unwrap();
        let mut want = vec![0f32; n * o * vox];
        conv3d(d, &x, &w, &b, &mut want);
        if relu {
            relu_in_place(&mut want);
        }
        let up: Vec<_> = xs
            .iter()
            .zip(&parts)
            .map(|(xp, pc)| c.upload(xp, &[n, *pc, s[0], s[1], s[2]]).unwrap())
            .collect();
        let tparts: Vec<TexPart> = up
            .iter()
            .zip(&parts)
            .map(|(t, pc)| TexPart {
                buffer: &t.buffer,
                channels: *pc,
            })
            .collect();
        let (wt, bt) = (c.upload(&w, &sh[1]).unwrap(), c.upload(&b, &sh[2]).unwrap());
        let slice = (n * ch * s[1] * s[2] * 4) as u64;
        let whole = !(s[1] * s[2]).is_multiple_of(4);
        // (X sampled, and as a storage texture where the device reads it so)
        for (rows, storage_x) in [(4, false), (8, false), (4, true), (8, true)] {
            let limit = slice * (rows as u64 + 2);
            let fits = s[0] as u64 * slice <= limit;
            let want_slabs = if whole || fits {
                1
            } else {
                s[0].div_ceil(rows)
            };
            let out = c.empty(&[n, o, s[0], s[1], s[2]]).unwrap();
            c.fill(&out.buffer, f32::NAN);
            let (w, b, o) = (&wt.buffer, &bt.buffer, &out.buffer);
            let disp = conv3d_tex_parts(c, d, &tparts, w, b, o, relu, limit, storage_x)
                .unwrap()
                .expect("texture path");
            assert_eq!(disp.len(), want_slabs, "{s:?} rows {rows}");
            c.run(&disp).unwrap();
            let e = rel_err(&c.download(&out).unwrap(), &want);
            assert!(
                e <= 1e-5,
                "{n} {parts:?} {s:?} slabs of {rows}, storage {storage_x}: {e}"
            );
        }
    }
}

#[test]
fn rejects_wrong_channels() {
    let e = Conv3d::new(3)
        .output_shape(&[&[1, 4, 5, 5, 5], &[2, 3, 3, 3, 3], &[2]])
        .unwrap_err();
    assert!(e.to_string().contains("conv3d"), "{e}");
    let e = Conv3d::new(1)
        .output_shape(&[&[1, 4, 5, 5, 5], &[2, 4, 3, 3, 3], &[2]])
        .unwrap_err();
    assert!(e.to_string().contains("conv3d"), "{e}");
    assert!(Conv3d::new(5)
        .output_shape(&[&[1, 4, 5, 5, 5], &[2, 4, 5, 5, 5], &[2]])
        .is_err());
    assert!(Conv3d::new(3)
        .output_shape(&[&[1, 4, 5, 5, 5], &[2, 4, 3, 3, 3], &[3]])
        .is_err());
}

#[test]
fn batchnorm_fold_matches_conv_then_bn() {
    let mut r = rng();
    let sh = shapes(1, 3, 4, [3, 4, 5], 3);
    let data: Vec<Vec<f32>> = sh.iter().map(|x| random(&mut r, numel(x))).collect();
    let refs: Vec<&[usize]> = sh.iter().map(|x| x.as_slice()).collect();
    let d = Conv3d::new(3).dims(&refs).unwrap();
    let gamma = random(&mut r, 4);
    let beta = random(&mut r, 4);
    let mean = random(&mut r, 4);
    let var: Vec<f32> = random(&mut r, 4).iter().map(|v| v.abs() + 0.1).collect();
    let eps = 1e-5;
    let mut conv = vec![0f32; d.n * d.o * d.voxels()];
    conv3d(d, &data[0], &data[1], &data[2], &mut conv);
    let v = d.voxels();
    let want: Vec<f32> = conv
        .iter()
        .enumerate()
        .map(|(i, y)| {
            let o = (i / v) % d.o;
            (y - mean[o]) / (var[o] + eps).sqrt() * gamma[o] + beta[o]
        })
        .collect();
    let (mut w, mut b) = (data[1].clone(), data[2].clone());
    fold_batchnorm(&mut w, &mut b, 4, &gamma, &beta, &mean, &var, eps).unwrap();
    let mut got = vec![0f32; conv.len()];
    conv3d(d, &data[0], &w, &b, &mut got);
    assert!(rel_err(&got, &want) < 1e-5);
    let e = fold_batchnorm(&mut w, &mut b, 3, &gamma, &beta, &mean, &var, eps).unwrap_err();
    assert!(e.to_string().contains("fold_batchnorm"), "{e}");
}

/// Generates the subgroup kernel of `shaders/conv3d.wgsl` (everything from the
/// "BEGIN subgroups" marker on): WGSL wants subgroupBroadcast lane indices to be
/// constants, and the accumulators must be registers, so the tile is written out.
fn sg_source() -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let w = &mut s;
    let _ = write!(
        w,
        "// BEGIN subgroups (stripped on devices without subgroup operations)
//
// Kernels for CPU-like devices with subgroups of at least 8 lanes (e.g. lavapipe). There
// every storage-buffer load is a per-lane scalar loop costing as much as dozens of FMAs,
// whatever its address, so these kernels minimise loads: a workgroup is one subgroup of 8
// lanes, the lanes load distinct weights and share them with subgroupBroadcast, and every
// write to a loop-carried variable (a masked blend and a spill) is made once per loop trip.
//
// Generated by `sg_source()` in src/ops/conv3d.rs (regenerate with
// VOLFUSE_REGEN_CONV3D=1 cargo test --lib ops::conv3d::tests::subgroup_kernel_is_generated).

// `v` of the lane to the left (lane 0 takes `edge`).
fn from_left(v: f32, edge: f32, lane: u32) -> f32 {{
    var l = edge;
",
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

// `v` of the lane to the right (lane 7 takes `edge`).
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
    let _ = write!(
        w,
        "    return g;
}}

fn store_sg(i: u32, oc: u32, v: f32) {{
    if (oc < p.o) {{ out[i] = act(v + bias[oc]); }}
}}

// The gate of DINOv3UNet3D's context fusion (ops/fusion.rs), for the K = 1 kernels
// `context_gate_k1_sg*`: the conv is the raw projection (O = C, so x[i] is the raw value
// at the output's index) and out = x + (W·x + b)·σ(gate).
@group(0) @binding(6) var<storage, read> gate: array<f32>;

fn store_gate(i: u32, oc: u32, v: f32) {{
    if (oc < p.o) {{ out[i] = x[i] + (v + bias[oc]) / (1.0 + exp(-gate[i])); }}
}}
"
    );
    let (ry, rz, to) = SG3_TILE;
    sg3_source(w, ry, rz, to, false);
    let _ = write!(
        w,
        "
// The input copied into an rgba32float texture, 4 consecutive values a texel, rows of
// 1024 texels (GpuContext::scratch_texture): texel fetches are much cheaper than
// storage-buffer loads on lavapipe.
@group(0) @binding(5) var xt: texture_2d<f32>;

fn xtex(i: u32) -> f32 {{
    let t = i >> 2u;
    return textureLoad(xt, vec2<u32>(t & 1023u, t >> 10u), 0)[i & 3u];
}}
"
    );
    sg3_source(w, ry, rz, to, true);
    for gate in [false, true] {
        for to in SG1_TILES {
            sg1_source(w, to, gate);
        }
    }
    let _ = writeln!(w, "// END subgroups");
    s
}

/// The K = 3 subgroup kernel `conv3d_k3_sg`: tile 8 x × `ry` y × `rz` z × `to` channels.
#[allow(non_snake_case)]
fn sg3_source(w: &mut String, ry: usize, rz: usize, to: usize, tex: bool) {
    use std::fmt::Write;
    let (RY, RZ, TO) = (ry, rz, to);
    let (name, how) = if tex {
        ("conv3d_k3_sg_tex", "reads x through the texture copy `xt`")
    } else {
        ("conv3d_k3_sg", "reads x from its storage buffer")
    };
    let NR = RY + 2;
    let NS = RZ + 2;
    let NW = TO * 27 / 8;
    let NE = (2 * NR).div_ceil(8);
    let load = |i: &str| {
        if tex {
            format!("xtex({i})")
        } else {
            format!("x[{i}]")
        }
    };
    let _ = write!(
        w,
        "
// Variant \"{name}\" (K = 3; {how}): a workgroup computes 8 consecutive x × {RY} rows (y)
// × {RZ} slices (z) × {TO} output channels (lane i owns column x0 + i: {acc} accumulators).
// Per input channel each lane loads {NW} weights, its own column of the {NS} × {NR} input
// rows and a share of their edges (x0 - 1, x0 + 8); x-neighbours come from the adjacent
// lanes. One statement per accumulator sums the channel's 27 taps.
@compute @workgroup_size(8)
fn {name}(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(subgroup_invocation_id) lane: u32) {{
    let tile = wg.x + wg.y * nwg.x;
    // This dispatch computes output slices [z_lo, z_hi) (a depth slab, or the whole depth).
    let z0 = i32(p.z_lo) + i32(tile / (p.tiles_x * p.tiles_y)) * {RZ};
    if (z0 >= i32(p.z_hi)) {{ return; }}  // padding of a 2-D dispatch grid
    let n = wg.z / p.groups;
    let o0 = (wg.z % p.groups) * {TO}u;
    let hi = i32(p.h);
    let wi = i32(p.w);
    let x0 = i32((tile % p.tiles_x) * 8u);
    let y0 = i32(((tile / p.tiles_x) % p.tiles_y) * {RY}u);
    let xl = x0 + i32(lane);
    let xok = xl < wi;
    let hw = p.h * p.w;
    // This lane's input rows: offsets within an (n, c, z) slice, and validity.
",
        acc = RY * RZ * TO
    );
    for r in 0..NR {
        let _ = writeln!(
                w,
                "    let rk{r} = xok && y0 + {} >= 0 && y0 + {} < hi;\n    let ro{r} = select(0u, u32((y0 + {}) * wi + xl), rk{r});",
                r as i64 - 1,
                r as i64 - 1,
                r as i64 - 1
            );
    }
    let _ = writeln!(
            w,
            "    // Edge slot s = 8k + lane: left edge (x0 - 1) of row s, right edge (x0 + 8) of row s - {NR}."
        );
    for k in 0..NE {
        let _ = write!(
            w,
            "    let es{k} = {}u + lane;
    let ey{k} = y0 + i32(es{k} % {NR}u) - 1;
    let ex{k} = select(x0 - 1, x0 + 8, es{k} >= {NR}u);
    let ek{k} = es{k} < {}u && ey{k} >= 0 && ey{k} < hi && ex{k} >= 0 && ex{k} < wi;
    let eo{k} = select(0u, u32(ey{k} * wi + ex{k}), ek{k});
",
            8 * k,
            2 * NR
        );
    }
    let _ = writeln!(
        w,
        "    // Weight slot s = 8k + lane: channel o0 + s / 27 (clamped), tap s % 27."
    );
    for k in 0..NW {
        let _ = writeln!(
                w,
                "    let wo{k} = min(o0 + ({}u + lane) / 27u, p.o - 1u) * p.c * 27u + ({}u + lane) % 27u;",
                8 * k,
                8 * k
            );
    }
    let _ = writeln!(
        w,
        "    // Input slices z0 - 1 + j: validity, and offsets within the (n, c) volume of x, whose
    // slices t_z0 … hold t_dhw / hw slices of the input."
    );
    for j in 0..NS {
        let _ = writeln!(
                w,
                "    let zk{j} = z0 + {} >= 0 && z0 + {} < i32(p.d);\n    let zo{j} = select(0u, u32(z0 + {} - i32(p.t_z0)) * hw, zk{j});",
                j as i64 - 1,
                j as i64 - 1,
                j as i64 - 1
            );
    }
    for rs in 0..RZ {
        for r in 0..RY {
            let _ = write!(w, "   ");
            for o in 0..TO {
                let _ = write!(w, " var a{rs}_{r}_{o} = 0.0;");
            }
            let _ = writeln!(w);
        }
    }
    let _ = writeln!(
            w,
            "    for (var c = 0u; c < p.c; c++) {{\n        let base = (n * p.c + c) * p.t_dhw;\n        let wb = c * 27u;"
        );
    for j in 0..NS {
        for r in 0..NR {
            let _ = writeln!(
                w,
                "        let v{j}_{r} = select(0.0, {}, rk{r} && zk{j});",
                load(&format!("base + zo{j} + ro{r}"))
            );
        }
        for k in 0..NE {
            let _ = writeln!(
                w,
                "        let e{j}_{k} = select(0.0, {}, ek{k} && zk{j});",
                load(&format!("base + zo{j} + eo{k}"))
            );
        }
    }
    for k in 0..NW {
        let _ = writeln!(w, "        let w{k} = wt[wo{k} + wb];");
    }
    for j in 0..NS {
        for r in 0..NR {
            let (a, b) = (r, NR + r);
            let _ = writeln!(
                    w,
                    "        let l{j}_{r} = from_left(v{j}_{r}, subgroupBroadcast(e{j}_{}, {}u), lane);\n        let g{j}_{r} = from_right(v{j}_{r}, subgroupBroadcast(e{j}_{}, {}u), lane);",
                    a / 8,
                    a % 8,
                    b / 8,
                    b % 8
                );
        }
    }
    // One statement per accumulator and input channel: every write to a loop-carried
    // variable costs lavapipe a masked blend and a spill store.
    for o in 0..TO {
        let _ = writeln!(w, "        {{");
        for t in 0..27 {
            let q = o * 27 + t;
            let _ = writeln!(
                w,
                "            let q{t} = subgroupBroadcast(w{}, {}u);",
                q / 8,
                q % 8
            );
        }
        for rs in 0..RZ {
            for r in 0..RY {
                let _ = write!(w, "            a{rs}_{r}_{o} = ");
                for t in (0..27).rev() {
                    let (j, i, src) = (rs + t / 9, r + (t / 3) % 3, ["l", "v", "g"][t % 3]);
                    let _ = write!(w, "fma({src}{j}_{i}, q{t}, ");
                }
                let _ = writeln!(w, "a{rs}_{r}_{o}{};", ")".repeat(27));
            }
        }
        let _ = writeln!(w, "        }}");
    }
    let _ = write!(
        w,
        "    }}
    if (!xok) {{ return; }}
"
    );
    for rs in 0..RZ {
        for r in 0..RY {
            let _ = writeln!(
                    w,
                    "    if (z0 + {rs} < i32(p.d) && y0 + {r} < hi) {{\n        let ov = u32(z0 + {rs}) * hw + u32((y0 + {r}) * wi + xl);"
                );
            for o in 0..TO {
                let _ = writeln!(
                        w,
                        "        store_sg((n * p.o + o0 + {o}u) * p.dhw + ov, o0 + {o}u, a{rs}_{r}_{o});"
                    );
            }
            let _ = writeln!(w, "    }}");
        }
    }
    let _ = writeln!(w, "}}");
}

/// The K = 1 subgroup kernel (a GEMM over channels), appended by [`sg_source`].
/// With `gate`, the context gate `context_gate_k1_sg{to}` (epilogue `store_gate`).
fn sg1_source(w: &mut String, to: usize, gate: bool) {
    use std::fmt::Write;
    const V: usize = SG1_V;
    let (name, store, what) = if gate {
        (
            format!("context_gate_k1_sg{to}"),
            "store_gate",
            " with the context gate's epilogue",
        )
    } else {
        (format!("conv3d_k1_sg{to}"), "store_sg", "")
    };
    let _ = write!(
        w,
        "
// Variant \"{name}\" (K = 1{what}): a workgroup computes {nv} voxels × {to} output
// channels; lane i owns voxels v0 + 8j + i, j < {V}. Per input channel each lane loads {V}
// inputs and {nw} weights, shared by broadcast.
@compute @workgroup_size(8)
fn {name}(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(subgroup_invocation_id) lane: u32) {{
    let tile = wg.x + wg.y * nwg.x;
    let n = wg.z / p.groups;
    let o0 = (wg.z % p.groups) * {to}u;
    let v0 = tile * {nv}u + lane;
",
        nv = 8 * V,
        nw = to / 8,
    );
    for j in 0..V {
        let _ = writeln!(
            w,
            "    let vk{j} = v0 + {}u < p.dhw;\n    let vi{j} = select(0u, v0 + {}u, vk{j});",
            8 * j,
            8 * j
        );
    }
    for k in 0..to / 8 {
        let _ = writeln!(
            w,
            "    let wo{k} = min(o0 + {}u + lane, p.o - 1u) * p.c;",
            8 * k
        );
    }
    for j in 0..V {
        let _ = write!(w, "   ");
        for o in 0..to {
            let _ = write!(w, " var a{j}_{o} = 0.0;");
        }
        let _ = writeln!(w);
    }
    let _ = writeln!(
        w,
        "    for (var c = 0u; c < p.c; c++) {{\n        let base = (n * p.c + c) * p.dhw;"
    );
    for j in 0..V {
        let _ = writeln!(w, "        let v{j} = select(0.0, x[base + vi{j}], vk{j});");
    }
    for k in 0..to / 8 {
        let _ = writeln!(w, "        let w{k} = wt[wo{k} + c];");
    }
    for o in 0..to {
        let _ = writeln!(
            w,
            "        {{\n            let q = subgroupBroadcast(w{}, {}u);",
            o / 8,
            o % 8
        );
        for j in 0..V {
            let _ = writeln!(w, "            a{j}_{o} = fma(v{j}, q, a{j}_{o});");
        }
        let _ = writeln!(w, "        }}");
    }
    let _ = writeln!(w, "    }}");
    for j in 0..V {
        let _ = writeln!(w, "    if (vk{j}) {{");
        for o in 0..to {
            let _ = writeln!(
                w,
                "        {store}((n * p.o + o0 + {o}u) * p.dhw + vi{j}, o0 + {o}u, a{j}_{o});"
            );
        }
        let _ = writeln!(w, "    }}");
    }
    let _ = writeln!(w, "}}");
}

#[test]
fn subgroup_kernel_is_generated() {
    crate::ops::testing::check_generated(&CONV3D, "shaders/conv3d.wgsl", &sg_source());
}

/// Times the GPU kernel on `LAB_SHAPE=n,c,o,d,h,w,k` (development aid).
#[test]
#[ignore]
fn lab_time() {
    let v: Vec<usize> = std::env::var("LAB_SHAPE")
        .unwrap_or("1,32,32,16,64,64,3".into())
        .split(',')
        .map(|s| s.parse().unwrap())
        .collect();
    let case = crate::bench::Case::new(
        "lab",
        Conv3d::new(v[6]),
        shapes(v[0], v[1], v[2], [v[3], v[4], v[5]], v[6]),
    );
    let c = ctx();
    crate::ops::testing::lab_time(c, &case);
}
