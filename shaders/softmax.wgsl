// Softmax kernels; one lane per row (or voxel), adjacent lanes on adjacent rows.
// "softmax": over the last dim of (rows, len), rows contiguous.
// "channel_softmax" / "channel_argmax": over dim 1 of (N, K, S): voxel (l, s) reads
// x[(l·K + k)·S + s], so adjacent lanes read adjacent addresses. Voxels are decomposed
// once per workgroup and advanced by carries (no per-lane division).

struct Params {
    n: u32,      // rows (softmax) or voxels N·S
    len: u32,    // softmax: row length; channel ops: K
    s: u32,      // channel ops: S (elements per channel)
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

const WG: u32 = 64u;
const PER: u32 = 4u;

// Two passes over the row: a running max and a sum rescaled when the max grows, then
// the output (2 loads and 1 store per element instead of 3 and 1).
@compute @workgroup_size(64)
fn softmax(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) lid: u32) {
    let row = (wg.x + wg.y * nwg.x) * WG + lid;
    if (row >= p.n) { return; }
    let a = row * p.len;
    var m = x[a];
    var sum = 0.0;
    for (var j = 0u; j < p.len; j++) {
        let v = x[a + j];
        let mn = max(m, v);
        sum = sum * exp(m - mn) + exp(v - mn);
        m = mn;
    }
    let inv = 1.0 / sum;
    for (var j = 0u; j < p.len; j++) { out[a + j] = exp(x[a + j] - m) * inv; }
}

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

// First voxel (s, l) of this lane.
fn first_voxel(base: u32, lid: u32) -> vec2<u32> {
    let c = split(base % p.s + lid, p.s);
    return vec2<u32>(c.y, base / p.s + c.x);
}

fn next_voxel(v: vec2<u32>) -> vec2<u32> {
    let c = split(v.x + WG, p.s);
    return vec2<u32>(c.y, v.y + c.x);
}

// K specialised (1..=MAXK): the K values stay in registers, so each is loaded once.
// KC = 0: any K, three passes over memory.
override KC: u32 = 0u;
const MAXK: u32 = 32u;

@compute @workgroup_size(64)
fn channel_softmax(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let base = (wg.x + wg.y * nwg.x) * (WG * PER);
    var v = first_voxel(base, lid);
    for (var r = 0u; r < PER; r++) {
        if (base + r * WG + lid >= p.n) { return; }
        let a = v.y * p.len * p.s + v.x;
        if (KC > 0u) {
            var e: array<f32, MAXK>;
            e[0] = x[a];
            var m = e[0];
            for (var k = 1u; k < KC; k++) {
                e[k] = x[a + k * p.s];
                m = max(m, e[k]);
            }
            var sum = 0.0;
            for (var k = 0u; k < KC; k++) {
                e[k] = exp(e[k] - m);
                sum += e[k];
            }
            let inv = 1.0 / sum;
            for (var k = 0u; k < KC; k++) { out[a + k * p.s] = e[k] * inv; }
        } else {
            var m = x[a];
            for (var k = 1u; k < p.len; k++) { m = max(m, x[a + k * p.s]); }
            var sum = 0.0;
            for (var k = 0u; k < p.len; k++) { sum += exp(x[a + k * p.s] - m); }
            let inv = 1.0 / sum;
            for (var k = 0u; k < p.len; k++) {
                out[a + k * p.s] = exp(x[a + k * p.s] - m) * inv;
            }
        }
        v = next_voxel(v);
    }
}

// The index of the first maximum, as f32; out is (N, S).
@compute @workgroup_size(64)
fn channel_argmax(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    let base = (wg.x + wg.y * nwg.x) * (WG * PER);
    var v = first_voxel(base, lid);
    for (var r = 0u; r < PER; r++) {
        let i = base + r * WG + lid;
        if (i >= p.n) { return; }
        let a = v.y * p.len * p.s + v.x;
        var m = x[a];
        var best = 0u;
        for (var k = 1u; k < p.len; k++) {
            let e = x[a + k * p.s];
            best = select(best, k, e > m);
            m = max(m, e);
        }
        out[i] = f32(best);
        v = next_voxel(v);
    }
}
