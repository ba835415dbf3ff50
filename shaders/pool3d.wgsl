// 3-D pooling, kernel 2 stride 2, over the last three axes of (L.., D, H, W); odd sizes
// are floored. Each invocation writes PER outputs, WG apart, so adjacent lanes write
// adjacent outputs. The output coordinate is decomposed once per workgroup (uniform
// divisions) and then advanced by carries, so no lane ever divides.

struct Params {
    n: u32,      // output elements
    wo: u32,     // output W, H, D
    ho: u32,
    do_: u32,
    wi: u32,     // input W, H, D
    hi: u32,
    di: u32,
    _pad: u32,
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

// Index of the window's first input element.
fn corner(c: vec4<u32>) -> u32 {
    return ((c.w * p.di + 2u * c.z) * p.hi + 2u * c.y) * p.wi + 2u * c.x;
}

@compute @workgroup_size(64)
fn maxpool3d(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let base = (wg.x + wg.y * nwg.x) * (WG * PER);
    var c = start(base, lid);
    let plane = p.hi * p.wi;
    for (var r = 0u; r < PER; r++) {
        let i = base + r * WG + lid;
        if (i >= p.n) { return; }
        let a = corner(c);
        let b = a + plane;
        let m0 = max(max(x[a], x[a + 1u]), max(x[a + p.wi], x[a + p.wi + 1u]));
        let m1 = max(max(x[b], x[b + 1u]), max(x[b + p.wi], x[b + p.wi + 1u]));
        out[i] = max(m0, m1);
        c = advance(c, WG);
    }
}

@compute @workgroup_size(64)
fn avgpool3d(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let base = (wg.x + wg.y * nwg.x) * (WG * PER);
    var c = start(base, lid);
    let plane = p.hi * p.wi;
    for (var r = 0u; r < PER; r++) {
        let i = base + r * WG + lid;
        if (i >= p.n) { return; }
        let a = corner(c);
        let b = a + plane;
        let s0 = (x[a] + x[a + 1u]) + (x[a + p.wi] + x[a + p.wi + 1u]);
        let s1 = (x[b] + x[b + 1u]) + (x[b + p.wi] + x[b + p.wi + 1u]);
        out[i] = (s0 + s1) * 0.125;
        c = advance(c, WG);
    }
}
