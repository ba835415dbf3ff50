// Linear resizing as PyTorch's F.interpolate(align_corners=False, antialias=False):
// per axis src = max(scale * (o + 0.5) - 0.5, 0), i0 = floor(src), i1 = min(i0 + 1, n - 1),
// w1 = src - i0, with scale given per axis (in/out for a target size, 1/factor for a scale
// factor). "trilinear" resizes (L.., D, H, W), "bilinear" (L.., H, W) with d = 1.
// Each invocation writes PER outputs, WG apart; coordinates are decomposed once per
// workgroup and advanced by carries (no per-lane division).

struct Params {
    n: u32,      // output elements
    wo: u32,     // output W, H, D
    ho: u32,
    do_: u32,
    wi: u32,     // input W, H, D
    hi: u32,
    di: u32,
    _pad0: u32,
    sw: f32,     // source scale per axis
    sh: f32,
    sd: f32,
    _pad1: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

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

// Output coordinate (w, h, d, leading) with w < wo, h < ho, d < do_.
fn advance(c: vec4<u32>, k: u32) -> vec4<u32> {
    let w = split(c.x + k, p.wo);
    let h = split(c.y + w.x, p.ho);
    let d = split(c.z + h.x, p.do_);
    return vec4<u32>(w.y, h.y, d.y, c.w + d.x);
}

fn start(base: u32, lid: u32) -> vec4<u32> {
    let t = base / p.wo;
    let u = t / p.ho;
    let c = vec4<u32>(base % p.wo, t % p.ho, u % p.do_, u / p.do_);
    return advance(c, lid);
}

// Source taps of output index o along an axis of n inputs: (i0, i1) and w1.
struct Taps {
    i0: u32,
    i1: u32,
    w1: f32,
}

fn taps(o: u32, scale: f32, n: u32) -> Taps {
    let s = max(scale * (f32(o) + 0.5) - 0.5, 0.0);
    let i0 = min(u32(s), n - 1u);
    var t: Taps;
    t.i0 = i0;
    t.i1 = min(i0 + 1u, n - 1u);
    t.w1 = clamp(s - f32(i0), 0.0, 1.0);
    return t;
}

fn lerp(a: f32, b: f32, w1: f32) -> f32 {
    return a * (1.0 - w1) + b * w1;
}

// Bilinear value of the (H, W) plane starting at `plane`.
fn plane_value(plane: u32, th: Taps, tw: Taps) -> f32 {
    let r0 = plane + th.i0 * p.wi;
    let r1 = plane + th.i1 * p.wi;
    let v0 = lerp(x[r0 + tw.i0], x[r0 + tw.i1], tw.w1);
    let v1 = lerp(x[r1 + tw.i0], x[r1 + tw.i1], tw.w1);
    return lerp(v0, v1, th.w1);
}

@compute @workgroup_size(64)
fn trilinear(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let base = (wg.x + wg.y * nwg.x) * (WG * PER);
    var c = start(base, lid);
    let plane = p.hi * p.wi;
    for (var r = 0u; r < PER; r++) {
        let i = base + r * WG + lid;
        if (i >= p.n) { return; }
        let tw = taps(c.x, p.sw, p.wi);
        let th = taps(c.y, p.sh, p.hi);
        let td = taps(c.z, p.sd, p.di);
        let vol = c.w * p.di;
        let v0 = plane_value((vol + td.i0) * plane, th, tw);
        let v1 = plane_value((vol + td.i1) * plane, th, tw);
        out[i] = lerp(v0, v1, td.w1);
        c = advance(c, WG);
    }
}

// Expects do_ = di = 1, so c.w is the leading index of an (H, W) plane.
@compute @workgroup_size(64)
fn bilinear(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let base = (wg.x + wg.y * nwg.x) * (WG * PER);
    var c = start(base, lid);
    let plane = p.hi * p.wi;
    for (var r = 0u; r < PER; r++) {
        let i = base + r * WG + lid;
        if (i >= p.n) { return; }
        let tw = taps(c.x, p.sw, p.wi);
        let th = taps(c.y, p.sh, p.hi);
        out[i] = plane_value(c.w * plane, th, tw);
        c = advance(c, WG);
    }
}
