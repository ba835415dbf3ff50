// Fused multi-head attention: out[b, i, h] = softmax_j(q[b,i,h] · k[b,j,h] · scale) · v[b,j,h].
// q, k, v and out are (B, T, heads·HD) row-major; head h owns channels [h·HD, (h+1)·HD).
// Every kernel streams over keys with an online softmax (running max m, running sum l,
// accumulator rescaled by exp(m_old − m_new)), so the Tq×Tk score matrix is never stored.

struct Params {
    tq: u32,
    tk: u32,
    heads: u32,
    stride: u32, // floats per token row: heads·HD
    scale: f32,
    w4: u32,     // vec4 texels per token row: stride / 4 (attention_sg)
    _p0: u32,
    _p1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> k: array<f32>;
@group(0) @binding(3) var<storage, read> v: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

override HD: u32 = 64u; // head size, at most MAXHD
const MAXHD: u32 = 128u;
const KB: u32 = 8u;     // keys per online-softmax step
const NEG: f32 = -3.0e38;

// Portable kernel: one invocation per query row, keys in blocks of KB; q (pre-scaled) and
// the accumulator live in private arrays.
@compute @workgroup_size(64)
fn attention(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let h = wg.y;
    let b = wg.z;
    let i = wg.x * 64u + lid;
    let tq = p.tq;
    let tk = p.tk;
    let stride = p.stride;
    let iq = min(i, tq - 1u);
    let qbase = (b * tq + iq) * stride + h * HD;
    let kbase = b * tk * stride + h * HD;
    var qr: array<f32, MAXHD>;
    var acc: array<f32, MAXHD>;
    for (var d = 0u; d < HD; d++) {
        qr[d] = q[qbase + d] * p.scale;
        acc[d] = 0.0;
    }
    var m = NEG;
    var l = 0.0;
    for (var j0 = 0u; j0 < tk; j0 += KB) {
        var s: array<f32, KB>;
        var row: array<u32, KB>;
        for (var jj = 0u; jj < KB; jj++) {
            s[jj] = 0.0;
            row[jj] = kbase + min(j0 + jj, tk - 1u) * stride;
        }
        for (var d = 0u; d < HD; d++) {
            let qd = qr[d];
            for (var jj = 0u; jj < KB; jj++) { s[jj] = fma(qd, k[row[jj] + d], s[jj]); }
        }
        var mb = m;
        for (var jj = 0u; jj < KB; jj++) {
            s[jj] = select(NEG, s[jj], j0 + jj < tk);
            mb = max(mb, s[jj]);
        }
        let alpha = exp(m - mb);
        var ls = 0.0;
        for (var jj = 0u; jj < KB; jj++) {
            s[jj] = exp(s[jj] - mb);
            ls += s[jj];
        }
        l = l * alpha + ls;
        m = mb;
        for (var d = 0u; d < HD; d++) {
            var a = acc[d] * alpha;
            for (var jj = 0u; jj < KB; jj++) { a = fma(s[jj], v[row[jj] + d], a); }
            acc[d] = a;
        }
    }
    if (i < tq) {
        let inv = 1.0 / l;
        for (var d = 0u; d < HD; d++) { out[qbase + d] = acc[d] * inv; }
    }
}

// BEGIN subgroups (stripped on devices without subgroup operations)
//
// attention_sg, for CPU-like devices whose subgroups have at least 8 lanes (lavapipe). There
// a storage-buffer load costs a scalar loop over the lanes (~30 ns per lane for a vec4)
// while a texture fetch is a vector gather (~2 ns), and loops are only unrolled by hand.
// So q, k and v arrive as rgba32float textures (copied in by the dispatches, laid out
// linearly: texel i of a tensor at (i % TW, i / TW) with TW = 2^TW_LOG2), and one subgroup
// of 8 lanes per workgroup owns 8·R queries (lane L: rows i0 + L + 8r). Per step of 8 keys
// every lane fetches one key's K (then V) row, subgroupBroadcast hands each row to all
// lanes, and the lanes update scores, the online softmax and the accumulators of their R
// queries. All per-lane state sits in private arrays indexed only by constants (the
// helpers are called with literal arguments, so after inlining every index is a constant
// and nothing is gathered).

@group(0) @binding(5) var qt: texture_2d<f32>;
@group(0) @binding(6) var kt: texture_2d<f32>;
@group(0) @binding(7) var vt: texture_2d<f32>;
@group(0) @binding(8) var<storage, read_write> out4: array<vec4<f32>>;

override R: u32 = 4u;      // queries per lane, at most RMAX
const RMAX: u32 = 8u;
const H4MAX: u32 = 32u;   // vec4 chunks of the largest head

var<private> qv: array<array<vec4<f32>, H4MAX>, RMAX>;  // pre-scaled queries
var<private> acc: array<array<vec4<f32>, H4MAX>, RMAX>; // unnormalised outputs
var<private> row: array<vec4<f32>, H4MAX>;          // this lane's key (or value) row
var<private> kb: array<array<vec4<f32>, H4MAX>, 8>; // every lane's row, broadcast
var<private> s: array<array<f32, 8>, RMAX>;            // scores, then probabilities
var<private> m: array<f32, RMAX>;
var<private> l: array<f32, RMAX>;
var<private> alpha: array<f32, RMAX>;

override TW_LOG2: u32 = 10u; // log2 of the operand textures' width in texels

fn texel(i: u32) -> vec2<u32> {
    return vec2<u32>(i & ((1u << TW_LOG2) - 1u), i >> TW_LOG2);
}

fn fetch_k(d4: u32, i: u32) {
    if (d4 < HD / 4u) { row[d4] = textureLoad(kt, texel(i + d4), 0); }
}

fn fetch_v(d4: u32, i: u32) {
    if (d4 < HD / 4u) { row[d4] = textureLoad(vt, texel(i + d4), 0); }
}

fn fetch_k_row(i: u32) {
    fetch_k(0u, i); fetch_k(1u, i); fetch_k(2u, i); fetch_k(3u, i); fetch_k(4u, i); fetch_k(5u, i); fetch_k(6u, i); fetch_k(7u, i);
    fetch_k(8u, i); fetch_k(9u, i); fetch_k(10u, i); fetch_k(11u, i); fetch_k(12u, i); fetch_k(13u, i); fetch_k(14u, i); fetch_k(15u, i);
    fetch_k(16u, i); fetch_k(17u, i); fetch_k(18u, i); fetch_k(19u, i); fetch_k(20u, i); fetch_k(21u, i); fetch_k(22u, i); fetch_k(23u, i);
    fetch_k(24u, i); fetch_k(25u, i); fetch_k(26u, i); fetch_k(27u, i); fetch_k(28u, i); fetch_k(29u, i); fetch_k(30u, i); fetch_k(31u, i);
}

fn fetch_v_row(i: u32) {
    fetch_v(0u, i); fetch_v(1u, i); fetch_v(2u, i); fetch_v(3u, i); fetch_v(4u, i); fetch_v(5u, i); fetch_v(6u, i); fetch_v(7u, i);
    fetch_v(8u, i); fetch_v(9u, i); fetch_v(10u, i); fetch_v(11u, i); fetch_v(12u, i); fetch_v(13u, i); fetch_v(14u, i); fetch_v(15u, i);
    fetch_v(16u, i); fetch_v(17u, i); fetch_v(18u, i); fetch_v(19u, i); fetch_v(20u, i); fetch_v(21u, i); fetch_v(22u, i); fetch_v(23u, i);
    fetch_v(24u, i); fetch_v(25u, i); fetch_v(26u, i); fetch_v(27u, i); fetch_v(28u, i); fetch_v(29u, i); fetch_v(30u, i); fetch_v(31u, i);
}

fn share(d4: u32) {
    if (d4 < HD / 4u) {
        let x = row[d4];
        kb[0][d4] = subgroupBroadcast(x, 0u);
        kb[1][d4] = subgroupBroadcast(x, 1u);
        kb[2][d4] = subgroupBroadcast(x, 2u);
        kb[3][d4] = subgroupBroadcast(x, 3u);
        kb[4][d4] = subgroupBroadcast(x, 4u);
        kb[5][d4] = subgroupBroadcast(x, 5u);
        kb[6][d4] = subgroupBroadcast(x, 6u);
        kb[7][d4] = subgroupBroadcast(x, 7u);
    }
}

fn share_row() {
    share(0u); share(1u); share(2u); share(3u); share(4u); share(5u); share(6u); share(7u);
    share(8u); share(9u); share(10u); share(11u); share(12u); share(13u); share(14u); share(15u);
    share(16u); share(17u); share(18u); share(19u); share(20u); share(21u); share(22u); share(23u);
    share(24u); share(25u); share(26u); share(27u); share(28u); share(29u); share(30u); share(31u);
}

fn score(r: u32, d4: u32) {
    if (d4 < HD / 4u) {
        let x = qv[r][d4];
        s[r][0] += dot(x, kb[0][d4]);
        s[r][1] += dot(x, kb[1][d4]);
        s[r][2] += dot(x, kb[2][d4]);
        s[r][3] += dot(x, kb[3][d4]);
        s[r][4] += dot(x, kb[4][d4]);
        s[r][5] += dot(x, kb[5][d4]);
        s[r][6] += dot(x, kb[6][d4]);
        s[r][7] += dot(x, kb[7][d4]);
    }
}

fn scores(r: u32) {
    s[r] = array<f32, 8>(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
    score(r, 0u); score(r, 1u); score(r, 2u); score(r, 3u); score(r, 4u); score(r, 5u); score(r, 6u); score(r, 7u);
    score(r, 8u); score(r, 9u); score(r, 10u); score(r, 11u); score(r, 12u); score(r, 13u); score(r, 14u); score(r, 15u);
    score(r, 16u); score(r, 17u); score(r, 18u); score(r, 19u); score(r, 20u); score(r, 21u); score(r, 22u); score(r, 23u);
    score(r, 24u); score(r, 25u); score(r, 26u); score(r, 27u); score(r, 28u); score(r, 29u); score(r, 30u); score(r, 31u);
}

// Online softmax step for query r over keys j0..j0+8, of which `valid` exist.
fn softmax_step(r: u32, valid: u32) {
    s[r][0] = select(NEG, s[r][0], 0u < valid);
    s[r][1] = select(NEG, s[r][1], 1u < valid);
    s[r][2] = select(NEG, s[r][2], 2u < valid);
    s[r][3] = select(NEG, s[r][3], 3u < valid);
    s[r][4] = select(NEG, s[r][4], 4u < valid);
    s[r][5] = select(NEG, s[r][5], 5u < valid);
    s[r][6] = select(NEG, s[r][6], 6u < valid);
    s[r][7] = select(NEG, s[r][7], 7u < valid);
    let mb = max(m[r], max(max(max(s[r][0], s[r][1]), max(s[r][2], s[r][3])),
                           max(max(s[r][4], s[r][5]), max(s[r][6], s[r][7]))));
    alpha[r] = exp(m[r] - mb);
    s[r][0] = exp(s[r][0] - mb);
    s[r][1] = exp(s[r][1] - mb);
    s[r][2] = exp(s[r][2] - mb);
    s[r][3] = exp(s[r][3] - mb);
    s[r][4] = exp(s[r][4] - mb);
    s[r][5] = exp(s[r][5] - mb);
    s[r][6] = exp(s[r][6] - mb);
    s[r][7] = exp(s[r][7] - mb);
    l[r] = l[r] * alpha[r] + (((s[r][0] + s[r][1]) + (s[r][2] + s[r][3])) +
                              ((s[r][4] + s[r][5]) + (s[r][6] + s[r][7])));
    m[r] = mb;
}

fn accumulate(r: u32, d4: u32) {
    if (d4 < HD / 4u) {
        acc[r][d4] = acc[r][d4] * alpha[r]
            + (((s[r][0] * kb[0][d4] + s[r][1] * kb[1][d4]) + (s[r][2] * kb[2][d4] + s[r][3] * kb[3][d4]))
            + ((s[r][4] * kb[4][d4] + s[r][5] * kb[5][d4]) + (s[r][6] * kb[6][d4] + s[r][7] * kb[7][d4])));
    }
}

fn accumulate_all(r: u32) {
    accumulate(r, 0u); accumulate(r, 1u); accumulate(r, 2u); accumulate(r, 3u); accumulate(r, 4u); accumulate(r, 5u); accumulate(r, 6u); accumulate(r, 7u);
    accumulate(r, 8u); accumulate(r, 9u); accumulate(r, 10u); accumulate(r, 11u); accumulate(r, 12u); accumulate(r, 13u); accumulate(r, 14u); accumulate(r, 15u);
    accumulate(r, 16u); accumulate(r, 17u); accumulate(r, 18u); accumulate(r, 19u); accumulate(r, 20u); accumulate(r, 21u); accumulate(r, 22u); accumulate(r, 23u);
    accumulate(r, 24u); accumulate(r, 25u); accumulate(r, 26u); accumulate(r, 27u); accumulate(r, 28u); accumulate(r, 29u); accumulate(r, 30u); accumulate(r, 31u);
}

fn load_query(r: u32, d4: u32, i: u32) {
    if (d4 < HD / 4u) {
        qv[r][d4] = textureLoad(qt, texel(i + d4), 0) * p.scale;
        acc[r][d4] = vec4<f32>(0.0);
    }
}

fn load_queries(r: u32, i: u32) {
    load_query(r, 0u, i); load_query(r, 1u, i); load_query(r, 2u, i); load_query(r, 3u, i); load_query(r, 4u, i); load_query(r, 5u, i); load_query(r, 6u, i); load_query(r, 7u, i);
    load_query(r, 8u, i); load_query(r, 9u, i); load_query(r, 10u, i); load_query(r, 11u, i); load_query(r, 12u, i); load_query(r, 13u, i); load_query(r, 14u, i); load_query(r, 15u, i);
    load_query(r, 16u, i); load_query(r, 17u, i); load_query(r, 18u, i); load_query(r, 19u, i); load_query(r, 20u, i); load_query(r, 21u, i); load_query(r, 22u, i); load_query(r, 23u, i);
    load_query(r, 24u, i); load_query(r, 25u, i); load_query(r, 26u, i); load_query(r, 27u, i); load_query(r, 28u, i); load_query(r, 29u, i); load_query(r, 30u, i); load_query(r, 31u, i);
    m[r] = NEG;
    l[r] = 0.0;
}

fn store(r: u32, d4: u32, base: u32, inv: f32) {
    if (d4 < HD / 4u) { out4[base + d4] = acc[r][d4] * inv; }
}

fn store_all(r: u32, base: u32) {
    let inv = 1.0 / l[r];
    store(r, 0u, base, inv); store(r, 1u, base, inv); store(r, 2u, base, inv); store(r, 3u, base, inv);
    store(r, 4u, base, inv); store(r, 5u, base, inv); store(r, 6u, base, inv); store(r, 7u, base, inv);
    store(r, 8u, base, inv); store(r, 9u, base, inv); store(r, 10u, base, inv); store(r, 11u, base, inv);
    store(r, 12u, base, inv); store(r, 13u, base, inv); store(r, 14u, base, inv); store(r, 15u, base, inv);
    store(r, 16u, base, inv); store(r, 17u, base, inv); store(r, 18u, base, inv); store(r, 19u, base, inv);
    store(r, 20u, base, inv); store(r, 21u, base, inv); store(r, 22u, base, inv); store(r, 23u, base, inv);
    store(r, 24u, base, inv); store(r, 25u, base, inv); store(r, 26u, base, inv); store(r, 27u, base, inv);
    store(r, 28u, base, inv); store(r, 29u, base, inv); store(r, 30u, base, inv); store(r, 31u, base, inv);
}

// Grid (ceil(tq / (8·R)), heads, batch); a workgroup is one subgroup of 8 lanes.
@compute @workgroup_size(8)
fn attention_sg(@builtin(workgroup_id) wg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let h = wg.y;
    let b = wg.z;
    let tq = p.tq;
    let tk = p.tk;
    let w4 = p.w4;
    let hq = h * (HD / 4u);
    let i0 = wg.x * 8u * R + lid;
    if (0u < R) { load_queries(0u, (b * tq + min(i0 + 0u, tq - 1u)) * w4 + hq); }
    if (1u < R) { load_queries(1u, (b * tq + min(i0 + 8u, tq - 1u)) * w4 + hq); }
    if (2u < R) { load_queries(2u, (b * tq + min(i0 + 16u, tq - 1u)) * w4 + hq); }
    if (3u < R) { load_queries(3u, (b * tq + min(i0 + 24u, tq - 1u)) * w4 + hq); }
    if (4u < R) { load_queries(4u, (b * tq + min(i0 + 32u, tq - 1u)) * w4 + hq); }
    if (5u < R) { load_queries(5u, (b * tq + min(i0 + 40u, tq - 1u)) * w4 + hq); }
    if (6u < R) { load_queries(6u, (b * tq + min(i0 + 48u, tq - 1u)) * w4 + hq); }
    if (7u < R) { load_queries(7u, (b * tq + min(i0 + 56u, tq - 1u)) * w4 + hq); }
    for (var j0 = 0u; j0 < tk; j0 += 8u) {
        let kr = (b * tk + min(j0 + lid, tk - 1u)) * w4 + hq;
        fetch_k_row(kr);
        share_row();
        if (0u < R) { scores(0u); }
        if (1u < R) { scores(1u); }
        if (2u < R) { scores(2u); }
        if (3u < R) { scores(3u); }
        if (4u < R) { scores(4u); }
        if (5u < R) { scores(5u); }
        if (6u < R) { scores(6u); }
        if (7u < R) { scores(7u); }
        let valid = tk - j0;
        if (0u < R) { softmax_step(0u, valid); }
        if (1u < R) { softmax_step(1u, valid); }
        if (2u < R) { softmax_step(2u, valid); }
        if (3u < R) { softmax_step(3u, valid); }
        if (4u < R) { softmax_step(4u, valid); }
        if (5u < R) { softmax_step(5u, valid); }
        if (6u < R) { softmax_step(6u, valid); }
        if (7u < R) { softmax_step(7u, valid); }
        fetch_v_row(kr);
        share_row();
        if (0u < R) { accumulate_all(0u); }
        if (1u < R) { accumulate_all(1u); }
        if (2u < R) { accumulate_all(2u); }
        if (3u < R) { accumulate_all(3u); }
        if (4u < R) { accumulate_all(4u); }
        if (5u < R) { accumulate_all(5u); }
        if (6u < R) { accumulate_all(6u); }
        if (7u < R) { accumulate_all(7u); }
    }
    if (0u < R && i0 + 0u < tq) { store_all(0u, (b * tq + i0 + 0u) * w4 + hq); }
    if (1u < R && i0 + 8u < tq) { store_all(1u, (b * tq + i0 + 8u) * w4 + hq); }
    if (2u < R && i0 + 16u < tq) { store_all(2u, (b * tq + i0 + 16u) * w4 + hq); }
    if (3u < R && i0 + 24u < tq) { store_all(3u, (b * tq + i0 + 24u) * w4 + hq); }
    if (4u < R && i0 + 32u < tq) { store_all(4u, (b * tq + i0 + 32u) * w4 + hq); }
    if (5u < R && i0 + 40u < tq) { store_all(5u, (b * tq + i0 + 40u) * w4 + hq); }
    if (6u < R && i0 + 48u < tq) { store_all(6u, (b * tq + i0 + 48u) * w4 + hq); }
    if (7u < R && i0 + 56u < tq) { store_all(7u, (b * tq + i0 + 56u) * w4 + hq); }
}
// END subgroups
