// Fused multi-head attention: out[b, i, h] = softmax_j(q[b,i,h]·k[b,j,h]·scale) · v[b,j,h].
// Rows of q, k, v and out are (B, T, heads·HD), head h at channels [h·HD, (h+1)·HD).

struct Params {
    tq: u32,
    tk: u32,
    heads: u32,
    stride: u32, // heads·HD: elements per token row
    scale: f32,
    _p0: u32,
    _p1: u32,
    _p2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> k: array<f32>;
@group(0) @binding(3) var<storage, read> v: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

override WG: u32 = 8u;
override HD: u32 = 64u;
const KB: u32 = 8u;
const MAXHD: u32 = 128u;
const NEG: f32 = -3.0e38;

@compute @workgroup_size(WG)
fn attention(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let h = wg.y;
    let b = wg.z;
    let i = wg.x * WG + lid;
    let iq = min(i, p.tq - 1u);
    let qbase = (b * p.tq + iq) * p.stride + h * HD;
    let kbase = b * p.tk * p.stride + h * HD;
    var qr: array<f32, MAXHD>;
    var acc: array<f32, MAXHD>;
    for (var d = 0u; d < HD; d++) { qr[d] = q[qbase + d] * p.scale; acc[d] = 0.0; }
    var m = NEG;
    var l = 0.0;
    for (var j0 = 0u; j0 < p.tk; j0 += KB) {
        var s: array<f32, KB>;
        var row: array<u32, KB>;
        for (var jj = 0u; jj < KB; jj++) {
            s[jj] = 0.0;
            row[jj] = kbase + min(j0 + jj, p.tk - 1u) * p.stride;
        }
        for (var d = 0u; d < HD; d++) {
            let qd = qr[d];
            for (var jj = 0u; jj < KB; jj++) { s[jj] = fma(qd, k[row[jj] + d], s[jj]); }
        }
        var mb = m;
        for (var jj = 0u; jj < KB; jj++) {
            if (j0 + jj >= p.tk) { s[jj] = NEG; }
            mb = max(mb, s[jj]);
        }
        let alpha = exp(m - mb);
        var lsum = 0.0;
        for (var jj = 0u; jj < KB; jj++) { s[jj] = exp(s[jj] - mb); lsum += s[jj]; }
        l = fma(l, alpha, lsum);
        m = mb;
        for (var d = 0u; d < HD; d++) {
            var a = acc[d] * alpha;
            for (var jj = 0u; jj < KB; jj++) { a = fma(s[jj], v[row[jj] + d], a); }
            acc[d] = a;
        }
    }
    if (i < p.tq) {
        let inv = 1.0 / l;
        for (var d = 0u; d < HD; d++) { out[qbase + d] = acc[d] * inv; }
    }
}
