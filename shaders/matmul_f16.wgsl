// f16 activations on the texture path (docs/precision.md, `--precision f16-act`): the
// 16-column texture matmul of matmul.wgsl with its output stored as packed halves
// (pack2x16float pairs in u32 words, low half = even column), so the next kernel reads it
// through an rgba16float texture. X arrives as a texture (rgba32float or rgba16float: the
// fetch returns f32 either way); accumulation, bias, activation and RoPE run in f32 and
// only the store rounds. W16 (pipeline constant) switches the weight windows between f32
// bit patterns (one vec4 = 4 K-steps of a column) and f16 pairs (one vec4 = 8 K-steps);
// an override, so each variant compiles only its own loop. Needs N even (every lane owns
// both columns of a word: blocks start at even columns).

struct TexParams {
    m: u32,
    n: u32,
    k4: u32,
    c0: u32,
    w_base: u32,
    has_bias: u32,
    w_base2: u32,
    c2: u32,
    t: u32,
    prefix: u32,
    q4: u32,
    rj: u32,
}

override ACT: u32 = 0u;
override W16: bool = false;

fn activate(v: f32) -> f32 {
    if (ACT == 1u) { return gelu_(v); }
    if (ACT == 2u) { return silu_(v); }
    return v;
}

// BEGIN subgroups
@group(0) @binding(0) var<uniform> tp: TexParams;
@group(0) @binding(1) var<uniform> wq: array<vec4<u32>, 4096>;
@group(0) @binding(2) var xt: texture_2d<f32>;
@group(0) @binding(3) var<storage, read> tbias: array<f32>;
@group(0) @binding(4) var<storage, read_write> tout: array<u32>;
@group(0) @binding(5) var<uniform> wq2: array<vec4<u32>, 4096>;
@group(0) @binding(6) var cos_t: texture_2d<f32>;
@group(0) @binding(7) var sin_t: texture_2d<f32>;

fn xload(t: u32) -> vec4<f32> {
    return textureLoad(xt, vec2<u32>(t & 1023u, t >> 10u), 0);
}

fn bc8(acc: ptr<function, array<f32, 16>>, o: u32, xv: vec4<f32>, wb: vec4<u32>) {
    let w = bitcast<vec4<f32>>(wb);
    (*acc)[o + 0u] += dot(xv, subgroupBroadcast(w, 0u));
    (*acc)[o + 1u] += dot(xv, subgroupBroadcast(w, 1u));
    (*acc)[o + 2u] += dot(xv, subgroupBroadcast(w, 2u));
    (*acc)[o + 3u] += dot(xv, subgroupBroadcast(w, 3u));
    (*acc)[o + 4u] += dot(xv, subgroupBroadcast(w, 4u));
    (*acc)[o + 5u] += dot(xv, subgroupBroadcast(w, 5u));
    (*acc)[o + 6u] += dot(xv, subgroupBroadcast(w, 6u));
    (*acc)[o + 7u] += dot(xv, subgroupBroadcast(w, 7u));
}

fn dot8(x0: vec4<f32>, x1: vec4<f32>, v: vec4<u32>) -> f32 {
    let lo = vec4<f32>(unpack2x16float(v.x), unpack2x16float(v.y));
    let hi = vec4<f32>(unpack2x16float(v.z), unpack2x16float(v.w));
    return dot(x0, lo) + dot(x1, hi);
}

fn bc8h(acc: ptr<function, array<f32, 16>>, o: u32, x0: vec4<f32>, x1: vec4<f32>, w: vec4<u32>) {
    (*acc)[o + 0u] += dot8(x0, x1, subgroupBroadcast(w, 0u));
    (*acc)[o + 1u] += dot8(x0, x1, subgroupBroadcast(w, 1u));
    (*acc)[o + 2u] += dot8(x0, x1, subgroupBroadcast(w, 2u));
    (*acc)[o + 3u] += dot8(x0, x1, subgroupBroadcast(w, 3u));
    (*acc)[o + 4u] += dot8(x0, x1, subgroupBroadcast(w, 4u));
    (*acc)[o + 5u] += dot8(x0, x1, subgroupBroadcast(w, 5u));
    (*acc)[o + 6u] += dot8(x0, x1, subgroupBroadcast(w, 6u));
    (*acc)[o + 7u] += dot8(x0, x1, subgroupBroadcast(w, 7u));
}

// Bias of columns c .. c + 7 added to acc[o ..]: one load per lane, broadcast.
fn add_bias8(acc: ptr<function, array<f32, 16>>, o: u32, c: u32, lane: u32) {
    if (tp.has_bias == 0u) { return; }
    let b = tbias[min(c + lane, tp.n - 1u)];
    (*acc)[o + 0u] += subgroupBroadcast(b, 0u);
    (*acc)[o + 1u] += subgroupBroadcast(b, 1u);
    (*acc)[o + 2u] += subgroupBroadcast(b, 2u);
    (*acc)[o + 3u] += subgroupBroadcast(b, 3u);
    (*acc)[o + 4u] += subgroupBroadcast(b, 4u);
    (*acc)[o + 5u] += subgroupBroadcast(b, 5u);
    (*acc)[o + 6u] += subgroupBroadcast(b, 6u);
    (*acc)[o + 7u] += subgroupBroadcast(b, 7u);
}

// Columns c0 … c0 + 7 from the first window, c2 … c2 + 7 from the second; past the last
// column, lanes re-read it.
fn acc16(row: u32, sl: u32) -> array<f32, 16> {
    let xr = min(row, tp.m - 1u) * tp.k4;
    var acc: array<f32, 16>;
    let ca = min(tp.c0 + sl, tp.n - 1u) - tp.c0;
    let cb = min(tp.c2 + sl, max(tp.n - 1u, tp.c2)) - tp.c2;
    if (W16) {
        let k8 = tp.k4 / 2u;
        let wa = tp.w_base + ca * k8;
        let wb = tp.w_base2 + cb * k8;
        for (var l = 0u; l < k8; l++) {
            let x0 = xload(xr + 2u * l);
            let x1 = xload(xr + 2u * l + 1u);
            bc8h(&acc, 0u, x0, x1, wq[wa + l]);
            bc8h(&acc, 8u, x0, x1, wq2[wb + l]);
        }
    } else {
        let wa = tp.w_base + ca * tp.k4;
        let wb = tp.w_base2 + cb * tp.k4;
        for (var l = 0u; l < tp.k4; l++) {
            let xv = xload(xr + l);
            bc8(&acc, 0u, xv, wq[wa + l]);
            bc8(&acc, 8u, xv, wq2[wb + l]);
        }
    }
    add_bias8(&acc, 0u, tp.c0, sl);
    add_bias8(&acc, 8u, tp.c2, sl);
    return acc;
}

fn col_of(j: u32) -> u32 {
    return select(tp.c0 + j, tp.c2 + j - 8u, j >= 8u);
}

// Stores the row's 16 columns as 8 packed words (columns c, c + 1 per word; N even, c
// even, so c < N implies c + 1 < N).
fn store16(row: u32, acc: array<f32, 16>) {
    if (row >= tp.m) { return; }
    for (var j = 0u; j < 16u; j += 2u) {
        let c = col_of(j);
        if (c < tp.n) {
            tout[(row * tp.n + c) / 2u] =
                pack2x16float(vec2<f32>(activate(acc[j]), activate(acc[j + 1u])));
        }
    }
}

fn cos4(t: u32) -> vec4<f32> {
    return textureLoad(cos_t, vec2<u32>(t & 1023u, t >> 10u), 0);
}

fn sin4(t: u32) -> vec4<f32> {
    return textureLoad(sin_t, vec2<u32>(t & 1023u, t >> 10u), 0);
}

fn rot4(acc: ptr<function, array<f32, 16>>, o: u32, c: vec4<f32>, s: vec4<f32>, on: bool) {
    let a1 = vec4<f32>((*acc)[o + 0u], (*acc)[o + 1u], (*acc)[o + 2u], (*acc)[o + 3u]);
    let a2 = vec4<f32>((*acc)[o + 8u], (*acc)[o + 9u], (*acc)[o + 10u], (*acc)[o + 11u]);
    let r1 = select(a1, a1 * c - a2 * s, on);
    let r2 = select(a2, a2 * c + a1 * s, on);
    (*acc)[o + 0u] = r1.x;
    (*acc)[o + 1u] = r1.y;
    (*acc)[o + 2u] = r1.z;
    (*acc)[o + 3u] = r1.w;
    (*acc)[o + 8u] = r2.x;
    (*acc)[o + 9u] = r2.y;
    (*acc)[o + 10u] = r2.z;
    (*acc)[o + 11u] = r2.w;
}

fn tex_row(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * 64u;
}

@compute @workgroup_size(64)
fn matmul_tex16_o16(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(subgroup_invocation_id) sl: u32) {
    let row = tex_row(gid, nwg);
    store16(row, acc16(row, sl));
}

// RoPE as matmul_tex16_rope: group 2 = group 1's columns + hd/2, rows t < prefix untouched.
@compute @workgroup_size(64)
fn matmul_tex16_rope_o16(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                         @builtin(subgroup_invocation_id) sl: u32) {
    let row = tex_row(gid, nwg);
    var acc = acc16(row, sl);
    let tok = min(row, tp.m - 1u) % tp.t;
    let on = tok >= tp.prefix;
    let tb = select(0u, tok - tp.prefix, on) * tp.q4 + tp.rj;
    rot4(&acc, 0u, cos4(tb), sin4(tb), on);
    rot4(&acc, 4u, cos4(tb + 1u), sin4(tb + 1u), on);
    store16(row, acc);
}
// END subgroups
