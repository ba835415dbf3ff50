// Concatenation along dim 1: one dispatch per input copies its (N, Ci, S..) block into
// channels [offset, offset + Ci) of the (N, Ctotal, S..) output. Viewed as (N, inner)
// with inner = Ci·S, element (l, j) goes to out[l·outer + offset + j]. Each invocation
// copies PER elements, WG apart; (l, j) is decomposed once per workgroup and advanced by
// carries (no per-lane division).

struct Params {
    n: u32,       // elements of this input
    inner: u32,   // Ci·S
    outer: u32,   // Ctotal·S
    offset: u32,  // channel offset · S
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

@compute @workgroup_size(64)
fn concat(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let base = (wg.x + wg.y * nwg.x) * (WG * PER);
    let j0 = split(base % p.inner + lid, p.inner);
    var l = base / p.inner + j0.x;
    var j = j0.y;
    for (var r = 0u; r < PER; r++) {
        let i = base + r * WG + lid;
        if (i >= p.n) { return; }
        out[l * p.outer + p.offset + j] = x[i];
        let c = split(j + WG, p.inner);
        l += c.x;
        j = c.y;
    }
}
