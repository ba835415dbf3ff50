// Rotary position embedding (DINOv3 / HF rotate_half form) on the patch tokens of
// x (B, T, H·hd): tokens t < prefix (CLS, registers) pass through unchanged.
//   out[j]        = x[j]·cos[p, j] − x[j + hd/2]·sin[p, j]          (j < hd/2)
//   out[j + hd/2] = x[j + hd/2]·cos[p, j + hd/2] + x[j]·sin[p, j + hd/2]
// with p = t − prefix; cos/sin are (P, hd), shared by every head.

struct Params {
    n: u32,       // B·T·H·hd
    t: u32,       // tokens per batch element
    dim: u32,     // H·hd
    hd: u32,
    prefix: u32,
    _p0: u32, _p1: u32, _p2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> cos_t: array<f32>;
@group(0) @binding(3) var<storage, read> sin_t: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(64)
fn rope(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = (wg.x + wg.y * nwg.x) * 64u + lid;
    if (i >= p.n) { return; }
    let c = i % p.dim;
    let tok = (i / p.dim) % p.t;
    if (tok < p.prefix) {
        out[i] = x[i];
        return;
    }
    let j = c % p.hd;
    let half = p.hd / 2u;
    let pos = (tok - p.prefix) * p.hd + j;
    var partner: f32;
    if (j < half) {
        partner = -x[i + half];
    } else {
        partner = x[i - half];
    }
    out[i] = x[i] * cos_t[pos] + partner * sin_t[pos];
}
