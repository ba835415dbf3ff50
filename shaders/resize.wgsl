// Linear resizing as PyTorch's F.interpolate(align_corners=False, antialias=False):
// per axis src = max(scale * (o + 0.5) - 0.5, 0), i0 = floor(src), i1 = min(i0 + 1, n - 1),
// w1 = src - i0, with scale given per axis (in/out for a target size, 1/factor for a scale
// factor); interpolated along W, then H, then D. "trilinear" resizes (L.., D, H, W),
// "bilinear" (L.., H, W) and is dispatched with d = 1.
//
// Each invocation computes a block of BD x BH x BW outputs (1 or 2 per axis). Along an
// axis with scale <= 0.75, two neighbouring outputs read at most 3 distinct inputs, so a
// 2x2x2 block of a x2 upsample loads 27 inputs instead of 64. Per axis the block reads
// the C inputs base..base+C-1 (clamped) and each output picks its two taps among them.
// Each invocation handles PER blocks, WG apart; the block coordinate is decomposed once
// per workgroup and advanced by carries (no per-lane division).

struct Params {
    n: u32,      // blocks
    nbw: u32,    // block grid W, H, D
    nbh: u32,
    nbd: u32,
    wo: u32,     // output W, H, D
    ho: u32,
    do_: u32,
    _pad0: u32,
    wi: u32,     // input W, H, D
    hi: u32,
    di: u32,
    _pad1: u32,
    sw: f32,     // source scale per axis
    sh: f32,
    sd: f32,
    _pad2: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

// Outputs per block along each axis (1 or 2) and inputs read per block (<= 3).
override BW: u32 = 1u;
override BH: u32 = 1u;
override BD: u32 = 1u;
override CW: u32 = 2u;
override CH: u32 = 2u;
override CD: u32 = 2u;

const WG: u32 = 64u;
const PER: u32 = 4u;

// (v / d, v % d) for v < d + WG: a carry from adding at most WG to a reduced digit.
fn split(v: u32, d: u32) -> vec2<u32> {
    var q: u32;
    if (d >= WG) {
        q = select(0u, 1u, v >= d);
    } else {
        // v < 2 WG: exact in f32, and (v + 0.5) / d stays 0.5/d away from an integer.
        q = u32((f32(v) + 0.5) / f32(d));
    }
    return vec2<u32>(q, v - q * d);
}

// Block coordinate (w, h, d, leading) with w < nbw, h < nbh, d < nbd.
fn advance(c: vec4<u32>, k: u32) -> vec4<u32> {
    let w = split(c.x + k, p.nbw);
    let h = split(c.y + w.x, p.nbh);
    let d = split(c.z + h.x, p.nbd);
    return vec4<u32>(w.y, h.y, d.y, c.w + d.x);
}

fn start(base: u32, lid: u32) -> vec4<u32> {
    let t = base / p.nbw;
    let u = t / p.nbh;
    let c = vec4<u32>(base % p.nbw, t % p.nbh, u % p.nbd, u / p.nbd);
    return advance(c, lid);
}

// Taps of the (up to 2) outputs o0, o0+1 of a block along one axis of n inputs: the
// first input read, and per output the offsets of i0 and i1 from it and w1.
struct Taps {
    base: u32,
    s0: array<u32, 2>,
    s1: array<u32, 2>,
    w1: array<f32, 2>,
}

fn taps(o0: u32, b: u32, scale: f32, n: u32) -> Taps {
    var t: Taps;
    for (var j = 0u; j < b; j++) {
        let s = max(scale * (f32(o0 + j) + 0.5) - 0.5, 0.0);
        let i0 = min(u32(s), n - 1u);
        let i1 = min(i0 + 1u, n - 1u);
        if (j == 0u) { t.base = i0; }
        t.s0[j] = i0 - t.base;
        t.s1[j] = i1 - t.base;
        t.w1[j] = clamp(s - f32(i0), 0.0, 1.0);
    }
    return t;
}

fn pick(a: f32, b: f32, c: f32, s: u32) -> f32 {
    return select(select(a, b, s == 1u), c, s == 2u);
}

fn lerp(a: f32, b: f32, w1: f32) -> f32 {
    return a * (1.0 - w1) + b * w1;
}

fn resize(wg: vec3<u32>, nwg: vec3<u32>, lid: u32) {
    let base = (wg.x + wg.y * nwg.x) * (WG * PER);
    var c = start(base, lid);
    for (var r = 0u; r < PER; r++) {
        if (base + r * WG + lid >= p.n) { return; }
        let ow = c.x * BW;
        let oh = c.y * BH;
        let od = c.z * BD;
        let tw = taps(ow, BW, p.sw, p.wi);
        let th = taps(oh, BH, p.sh, p.hi);
        let td = taps(od, BD, p.sd, p.di);
        // Load the C inputs per axis, interpolating along W at once: a[dc][hc][jw].
        var a: array<array<array<f32, 2>, 3>, 3>;
        for (var dc = 0u; dc < CD; dc++) {
            let z = c.w * p.di + min(td.base + dc, p.di - 1u);
            for (var hc = 0u; hc < CH; hc++) {
                let row = (z * p.hi + min(th.base + hc, p.hi - 1u)) * p.wi;
                var v: array<f32, 3>;
                for (var wc = 0u; wc < CW; wc++) {
                    v[wc] = x[row + min(tw.base + wc, p.wi - 1u)];
                }
                for (var j = 0u; j < BW; j++) {
                    a[dc][hc][j] = lerp(pick(v[0], v[1], v[2], tw.s0[j]),
                                        pick(v[0], v[1], v[2], tw.s1[j]), tw.w1[j]);
                }
            }
        }
        // Along H: b[dc][jh][jw].
        var b: array<array<array<f32, 2>, 2>, 3>;
        for (var dc = 0u; dc < CD; dc++) {
            for (var jh = 0u; jh < BH; jh++) {
                for (var jw = 0u; jw < BW; jw++) {
                    let h0 = pick(a[dc][0][jw], a[dc][1][jw], a[dc][2][jw], th.s0[jh]);
                    let h1 = pick(a[dc][0][jw], a[dc][1][jw], a[dc][2][jw], th.s1[jh]);
                    b[dc][jh][jw] = lerp(h0, h1, th.w1[jh]);
                }
            }
        }
        // Along D, and store the outputs inside the volume.
        for (var jd = 0u; jd < BD; jd++) {
            for (var jh = 0u; jh < BH; jh++) {
                for (var jw = 0u; jw < BW; jw++) {
                    let d0 = pick(b[0][jh][jw], b[1][jh][jw], b[2][jh][jw], td.s0[jd]);
                    let d1 = pick(b[0][jh][jw], b[1][jh][jw], b[2][jh][jw], td.s1[jd]);
                    let z = od + jd;
                    let y = oh + jh;
                    let w = ow + jw;
                    if (z < p.do_ && y < p.ho && w < p.wo) {
                        out[((c.w * p.do_ + z) * p.ho + y) * p.wo + w] = lerp(d0, d1, td.w1[jd]);
                    }
                }
            }
        }
        c = advance(c, WG);
    }
}

@compute @workgroup_size(64)
fn trilinear(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    resize(wg, nwg, lid);
}

// Dispatched with do_ = di = 1, BD = CD = 1: c.w indexes (H, W) planes.
@compute @workgroup_size(64)
fn bilinear(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    resize(wg, nwg, lid);
}

// Exactly ×2 along D, H and W (scale 1/2: every output lies 1/4 or 3/4 of the way between
// two inputs). One invocation reads a (3 z × 3 y × 6 x) neighbourhood of inputs — x0 - 1 ..
// x0 + 4 with x0 = 4·segment, clamped at the borders as PyTorch's taps are — and writes the
// 2 × 2 × 8 outputs of the 4 inputs x0 .. x0 + 3 of row (z, y): 54 loads for 32 outputs
// instead of 27 for 8, no private arrays. Interpolates along D, then H, then W (the general
// kernel goes W, H, D: equal up to f32 rounding). Params: n = invocations, nbw = segments
// per row (ceil(wi / 4)), wi/hi/di the input sizes, wo = 2 wi.
struct Row6 { v0: f32, v1: f32, v2: f32, v3: f32, v4: f32, v5: f32, }

fn row6(at: u32, c0: u32, c1: u32, c2: u32, c3: u32, c4: u32, c5: u32) -> Row6 {
    return Row6(x[at + c0], x[at + c1], x[at + c2], x[at + c3], x[at + c4], x[at + c5]);
}

// a · wa + b · wb per element.
fn mix6(a: Row6, b: Row6, wa: f32, wb: f32) -> Row6 {
    return Row6(a.v0 * wa + b.v0 * wb, a.v1 * wa + b.v1 * wb, a.v2 * wa + b.v2 * wb,
                a.v3 * wa + b.v3 * wb, a.v4 * wa + b.v4 * wb, a.v5 * wa + b.v5 * wb);
}

// The 8 outputs along W of a row r holding inputs x0 - 1 .. x0 + 4, from output index
// at = row start + 2 x0; only the first `valid` inputs (x0 + k < wi) are written.
fn store_w(at: u32, r: Row6, valid: u32) {
    out[at] = r.v0 * 0.25 + r.v1 * 0.75;
    out[at + 1u] = r.v1 * 0.75 + r.v2 * 0.25;
    if (valid > 1u) {
        out[at + 2u] = r.v1 * 0.25 + r.v2 * 0.75;
        out[at + 3u] = r.v2 * 0.75 + r.v3 * 0.25;
    }
    if (valid > 2u) {
        out[at + 4u] = r.v2 * 0.25 + r.v3 * 0.75;
        out[at + 5u] = r.v3 * 0.75 + r.v4 * 0.25;
    }
    if (valid > 3u) {
        out[at + 6u] = r.v3 * 0.25 + r.v4 * 0.75;
        out[at + 7u] = r.v4 * 0.75 + r.v5 * 0.25;
    }
}

@compute @workgroup_size(64)
fn trilinear_up2(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let t = (wg.x + wg.y * nwg.x) * 64u + lid;
    if (t >= p.n) { return; }
    let seg = t % p.nbw;
    let r = t / p.nbw;
    let y = r % p.hi;
    let r2 = r / p.hi;
    let z = r2 % p.di;
    let l = r2 / p.di;
    let x0 = seg * 4u;
    let wl = p.wi - 1u;
    // Columns x0 - 1 .. x0 + 4, clamped.
    let c0 = select(x0 - 1u, 0u, x0 == 0u);
    let c1 = min(x0, wl);
    let c2 = min(x0 + 1u, wl);
    let c3 = min(x0 + 2u, wl);
    let c4 = min(x0 + 3u, wl);
    let c5 = min(x0 + 4u, wl);
    let valid = min(p.wi - x0, 4u);
    // Input rows z - 1, z, z + 1 and y - 1, y, y + 1, clamped.
    let zm = select(z - 1u, 0u, z == 0u);
    let zp = min(z + 1u, p.di - 1u);
    let ym = select(y - 1u, 0u, y == 0u);
    let yp = min(y + 1u, p.hi - 1u);
    let vol = l * p.di;
    // Along D for the input row yy: (output slice 2z, output slice 2z + 1).
    let am = row6(((vol + zm) * p.hi + ym) * p.wi, c0, c1, c2, c3, c4, c5);
    let a0 = row6(((vol + z) * p.hi + ym) * p.wi, c0, c1, c2, c3, c4, c5);
    let ap = row6(((vol + zp) * p.hi + ym) * p.wi, c0, c1, c2, c3, c4, c5);
    let m0 = mix6(am, a0, 0.25, 0.75);
    let m1 = mix6(a0, ap, 0.75, 0.25);
    let bm = row6(((vol + zm) * p.hi + y) * p.wi, c0, c1, c2, c3, c4, c5);
    let b0 = row6(((vol + z) * p.hi + y) * p.wi, c0, c1, c2, c3, c4, c5);
    let bp = row6(((vol + zp) * p.hi + y) * p.wi, c0, c1, c2, c3, c4, c5);
    let n0 = mix6(bm, b0, 0.25, 0.75);
    let n1 = mix6(b0, bp, 0.75, 0.25);
    // Output rows (2z + a, 2y): along H between input rows y - 1 and y.
    let ho = 2u * p.hi;
    let wo = 2u * p.wi;
    let oz0 = (l * 2u * p.di + 2u * z) * ho;
    let oz1 = oz0 + ho;
    let ox = 2u * x0;
    store_w((oz0 + 2u * y) * wo + ox, mix6(m0, n0, 0.25, 0.75), valid);
    store_w((oz1 + 2u * y) * wo + ox, mix6(m1, n1, 0.25, 0.75), valid);
    // Output rows (2z + a, 2y + 1): between input rows y and y + 1.
    let cm = row6(((vol + zm) * p.hi + yp) * p.wi, c0, c1, c2, c3, c4, c5);
    let c0r = row6(((vol + z) * p.hi + yp) * p.wi, c0, c1, c2, c3, c4, c5);
    let cp = row6(((vol + zp) * p.hi + yp) * p.wi, c0, c1, c2, c3, c4, c5);
    let q0 = mix6(cm, c0r, 0.25, 0.75);
    let q1 = mix6(c0r, cp, 0.75, 0.25);
    store_w((oz0 + 2u * y + 1u) * wo + ox, mix6(n0, q0, 0.75, 0.25), valid);
    store_w((oz1 + 2u * y + 1u) * wo + ox, mix6(n1, q1, 0.75, 0.25), valid);
}
