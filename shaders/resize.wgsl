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
