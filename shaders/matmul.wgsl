// Batched matmul out[b] = act(op(A[b]) · op(B[b]) + bias), strides in elements; act is
// identity, GELU or SiLU (the epilogue, so an MLP's activation costs no extra pass).
// Variant "matmul": each invocation computes a 4x4 tile in registers; no shared memory.
// With W16 (pipeline constant) B holds f16 pairs packed in u32 words (unpacked to f32 in
// registers, accumulation in f32); else B's words are f32 bit patterns.

struct Params {
    m: u32, n: u32, k: u32, batch: u32,
    a_rs: u32, a_cs: u32, a_bs: u32,
    b_rs: u32, b_cs: u32, b_bs: u32,
    has_bias: u32, tiles_n: u32,
}

// The epilogue activation, a pipeline constant so each variant compiles only its own:
// 0 identity, 1 GELU (erf), 2 SiLU.
override ACT: u32 = 0u;
override W16: bool = false;

fn activate(v: f32) -> f32 {
    if (ACT == 1u) { return gelu_(v); }
    if (ACT == 2u) { return silu_(v); }
    return v;
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<u32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

// Element e of B as f32.
fn bload(e: u32) -> f32 {
    if (W16) { return unpack2x16float(b[e >> 1u])[e & 1u]; }
    return bitcast<f32>(b[e]);
}

@compute @workgroup_size(64)
fn matmul(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let tile = (wg.x + wg.y * nwg.x) * 64u + lid;
    let r0 = (tile / p.tiles_n) * 4u;
    let c0 = (tile % p.tiles_n) * 4u;
    let bi = wg.z;
    if (r0 >= p.m) { return; }
    let ab = bi * p.a_bs;
    let bb = bi * p.b_bs;
    var acc: array<array<f32, 4>, 4>;
    for (var i = 0u; i < 4u; i++) { for (var j = 0u; j < 4u; j++) { acc[i][j] = 0.0; } }
    // Clamp indices so loads stay in bounds; clamped rows/cols are never stored.
    var ra: array<u32, 4>;
    var cb: array<u32, 4>;
    for (var i = 0u; i < 4u; i++) {
        ra[i] = ab + min(r0 + i, p.m - 1u) * p.a_rs;
        cb[i] = bb + min(c0 + i, p.n - 1u) * p.b_cs;
    }
    for (var l = 0u; l < p.k; l++) {
        var av: array<f32, 4>;
        var bv: array<f32, 4>;
        for (var i = 0u; i < 4u; i++) {
            av[i] = a[ra[i] + l * p.a_cs];
            bv[i] = bload(cb[i] + l * p.b_rs);
        }
        for (var i = 0u; i < 4u; i++) {
            for (var j = 0u; j < 4u; j++) { acc[i][j] = fma(av[i], bv[j], acc[i][j]); }
        }
    }
    for (var i = 0u; i < 4u; i++) {
        let r = r0 + i;
        if (r >= p.m) { break; }
        for (var j = 0u; j < 4u; j++) {
            let c = c0 + j;
            if (c < p.n) {
                var v = acc[i][j];
                if (p.has_bias != 0u) { v += bias[c]; }
                out[bi * p.m * p.n + r * p.n + c] = activate(v);
            }
        }
    }
}

// In-place epilogues run after a matmul that could not fuse them (generic kernel, GL,
// downlevel limits, head sizes the texture path cannot pair up). No loop or branch is
// bounded by a uniform except through the invocation index (lavapipe recompiles such
// shaders per dispatch).
//   rope_inplace:     RoPE on rows of (B·T, N) with N = heads·hd; one invocation per
//                     rotation pair (row, head, j < hd/2); rows t % T < prefix untouched;
//                     cos/sin are (T − prefix, hd/2) (HF's table is tiled: cos[j] = cos[j + hd/2]).
//   residual_inplace: out = resid + λ ⊙ out, λ along the last axis (N).
struct EpiParams {
    total: u32,  // pairs (rope) or elements (residual)
    n: u32,      // columns of the output
    t: u32,      // tokens per image (rope)
    prefix: u32, // leading tokens left unrotated (rope)
    half: u32,   // hd / 2 (rope)
    _e0: u32, _e1: u32, _e2: u32,
}

@group(0) @binding(0) var<uniform> ep: EpiParams;
@group(0) @binding(1) var<storage, read_write> eo: array<f32>;
@group(0) @binding(2) var<storage, read> e1: array<f32>;
@group(0) @binding(3) var<storage, read> e2: array<f32>;

@compute @workgroup_size(64)
fn rope_inplace(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let i = (wg.x + wg.y * nwg.x) * 64u + lid;
    if (i >= ep.total) { return; }
    let pairs_per_row = ep.n / 2u;
    let row = i / pairs_per_row;
    let pr = i % pairs_per_row;
    let tok = row % ep.t;
    if (tok < ep.prefix) { return; }
    let h = pr / ep.half;
    let j = pr % ep.half;
    let o1 = row * ep.n + h * 2u * ep.half + j;
    let o2 = o1 + ep.half;
    let tb = (tok - ep.prefix) * ep.half + j;
    let c = e1[tb];
    let s = e2[tb];
    let a1 = eo[o1];
    let a2 = eo[o2];
    eo[o1] = a1 * c - a2 * s;
    eo[o2] = a2 * c + a1 * s;
}

@compute @workgroup_size(64)
fn residual_inplace(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
    let i = (wg.x + wg.y * nwg.x) * 64u + lid;
    if (i >= ep.total) { return; }
    eo[i] = e1[i] + e2[i % ep.n] * eo[i];
}

// BEGIN subgroups (stripped on devices without subgroup operations)
// ---------------------------------------------------------------------------------------
// Texture path, for x·Wᵀ with K % 4 == 0 (Linear layers): one dispatch per block of
// 16 (two windows of 8) or 4 output columns. Built for adapters where storage-buffer loads are expensive
// per lane (lavapipe runs every SSBO load as a per-lane loop) and texel fetches and
// uniform-buffer loads are cheap:
//   - X streams through the texture unit (copied into a linear rgba32f texture first);
//   - the W block sits in a 64 KiB uniform window bound at a dynamic offset;
//   - lane j of each subgroup loads column j's 4-vector, subgroupBroadcast hands it to all.
// One invocation = one row of X × the block's columns, accumulated in registers.

struct TexParams {
    m: u32,       // rows of X (batch folded in)
    n: u32,       // columns of the output
    k4: u32,      // K / 4
    c0: u32,      // first column of this block
    w_base: u32,  // vec4 index of column c0 inside the uniform window
    has_bias: u32,
    w_base2: u32, // vec4 index of column c2 inside the second window (16-column blocks)
    c2: u32,      // first column of the second group of 8 (c0 + 8, or c0 + hd/2 for RoPE)
    t: u32,       // RoPE: tokens per image (rows are images × tokens)
    prefix: u32,  // RoPE: leading tokens of each image left unrotated (CLS, registers)
    q4: u32,      // RoPE: texels per row of the cos/sin tables (hd/2 / 4)
    rj: u32,      // RoPE: texel of column c0's angle within a table row (j0 / 4)
}

@group(0) @binding(0) var<uniform> tp: TexParams;
@group(0) @binding(1) var<uniform> wu: array<vec4<f32>, 4096>;
@group(0) @binding(2) var xt: texture_2d<f32>;
@group(0) @binding(3) var<storage, read> tbias: array<f32>;
@group(0) @binding(4) var<storage, read_write> tout: array<f32>;
@group(0) @binding(5) var<uniform> wu2: array<vec4<f32>, 4096>;

// The block of output columns this invocation computes: first columns of its two groups
// of 8 (bc0, bc2) and, for RoPE, the texel of bc0's angle in a table row (brj). The
// window kernels (one dispatch per block) take them from the parameter block
// (block_from_params); the W-texture kernels (every block in one dispatch) derive them
// from the workgroup's y index (block16, block_rope). Set first thing in every entry point.
var<private> bc0: u32;
var<private> bc2: u32;
var<private> brj: u32;

fn block_from_params() {
    bc0 = tp.c0;
    bc2 = tp.c2;
    brj = tp.rj;
}

fn xload(t: u32) -> vec4<f32> {
    return textureLoad(xt, vec2<u32>(t & 1023u, t >> 10u), 0);
}

// The window index of column (c0 + lane) at k-step l; lanes past the last column re-read it.
fn widx(lane: u32, l: u32) -> u32 {
    let c = min(bc0 + lane, tp.n - 1u) - bc0;
    return tp.w_base + c * tp.k4 + l;
}

fn bc8(acc: ptr<function, array<f32, 16>>, o: u32, xv: vec4<f32>, w: vec4<f32>) {
    (*acc)[o + 0u] += dot(xv, subgroupBroadcast(w, 0u));
    (*acc)[o + 1u] += dot(xv, subgroupBroadcast(w, 1u));
    (*acc)[o + 2u] += dot(xv, subgroupBroadcast(w, 2u));
    (*acc)[o + 3u] += dot(xv, subgroupBroadcast(w, 3u));
    (*acc)[o + 4u] += dot(xv, subgroupBroadcast(w, 4u));
    (*acc)[o + 5u] += dot(xv, subgroupBroadcast(w, 5u));
    (*acc)[o + 6u] += dot(xv, subgroupBroadcast(w, 6u));
    (*acc)[o + 7u] += dot(xv, subgroupBroadcast(w, 7u));
}

fn bc4(acc: ptr<function, array<f32, 16>>, xv: vec4<f32>, w: vec4<f32>) {
    (*acc)[0] += dot(xv, subgroupBroadcast(w, 0u));
    (*acc)[1] += dot(xv, subgroupBroadcast(w, 1u));
    (*acc)[2] += dot(xv, subgroupBroadcast(w, 2u));
    (*acc)[3] += dot(xv, subgroupBroadcast(w, 3u));
}

// Adds the bias of columns c .. c + 7 to acc[o ..]: lane j loads column c + j's bias (one
// storage-buffer load per lane instead of eight) and broadcasts it. Call in uniform control
// flow, before any lane returns.
fn add_bias8(acc: ptr<function, array<f32, 16>>, o: u32, c: u32, lane: u32) {
    if (tp.has_bias == 0u) { return; }
    add_bc8(acc, o, tbias[min(c + lane, tp.n - 1u)]);
}

// acc[o + j] += lane j's b, j < 8.
fn add_bc8(acc: ptr<function, array<f32, 16>>, o: u32, b: f32) {
    (*acc)[o + 0u] += subgroupBroadcast(b, 0u);
    (*acc)[o + 1u] += subgroupBroadcast(b, 1u);
    (*acc)[o + 2u] += subgroupBroadcast(b, 2u);
    (*acc)[o + 3u] += subgroupBroadcast(b, 3u);
    (*acc)[o + 4u] += subgroupBroadcast(b, 4u);
    (*acc)[o + 5u] += subgroupBroadcast(b, 5u);
    (*acc)[o + 6u] += subgroupBroadcast(b, 6u);
    (*acc)[o + 7u] += subgroupBroadcast(b, 7u);
}

// Output column of accumulator j: c0 + j for the first group of 8, c2 + j − 8 after.
fn col_of(j: u32) -> u32 {
    return select(bc0 + j, bc2 + j - 8u, j >= 8u);
}

fn store_row(row: u32, acc: array<f32, 16>, cols: u32) {
    if (row >= tp.m) { return; }
    for (var j = 0u; j < cols; j++) {
        let c = col_of(j);
        if (c < tp.n) {
            tout[row * tp.n + c] = activate(acc[j]);
        }
    }
}

// ---- Fused epilogues (entry points *_rope, *_res) ----
// RoPE: the block's two groups are the two halves of the same rotation pairs
// (c2 = c0 + hd/2), so lane-local: o1 = a1·cos − a2·sin, o2 = a2·cos + a1·sin. cos/sin
// are (P, hd/2) tables streamed through textures (linear rgba32f texels).
@group(0) @binding(6) var cos_t: texture_2d<f32>;
@group(0) @binding(7) var sin_t: texture_2d<f32>;
// Residual: out = resid + λ ⊙ acc; resid (rows, n) with n % 4 == 0 streams through a
// texture (linear rgba32f texels: 4 columns of a row each), λ is a storage buffer.
@group(0) @binding(6) var res_t: texture_2d<f32>;
@group(0) @binding(7) var<storage, read> tlam: array<f32>;

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

fn rope16(acc: ptr<function, array<f32, 16>>, row: u32) {
    let tok = min(row, tp.m - 1u) % tp.t;
    let on = tok >= tp.prefix;
    let tb = select(0u, tok - tp.prefix, on) * tp.q4 + brj;
    rot4(acc, 0u, cos4(tb), sin4(tb), on);
    rot4(acc, 4u, cos4(tb + 1u), sin4(tb + 1u), on);
}

// acc[o ..] *= λ of columns c .. c + 7 (one load per lane + broadcast, as add_bias8).
fn scale8(acc: ptr<function, array<f32, 16>>, o: u32, c: u32, lane: u32) {
    mul_bc8(acc, o, tlam[min(c + lane, tp.n - 1u)]);
}

// acc[o + j] *= lane j's l, j < 8.
fn mul_bc8(acc: ptr<function, array<f32, 16>>, o: u32, l: f32) {
    (*acc)[o + 0u] *= subgroupBroadcast(l, 0u);
    (*acc)[o + 1u] *= subgroupBroadcast(l, 1u);
    (*acc)[o + 2u] *= subgroupBroadcast(l, 2u);
    (*acc)[o + 3u] *= subgroupBroadcast(l, 3u);
    (*acc)[o + 4u] *= subgroupBroadcast(l, 4u);
    (*acc)[o + 5u] *= subgroupBroadcast(l, 5u);
    (*acc)[o + 6u] *= subgroupBroadcast(l, 6u);
    (*acc)[o + 7u] *= subgroupBroadcast(l, 7u);
}

fn res4(t: u32) -> vec4<f32> {
    return textureLoad(res_t, vec2<u32>(t & 1023u, t >> 10u), 0);
}

// Adds the residual to acc and stores the row (columns past n are neither read from a
// texel that matters nor stored).
fn store_res(row: u32, acc: array<f32, 16>, cols: u32) {
    let base = min(row, tp.m - 1u) * tp.n;
    var r: array<f32, 16>;
    let a = res4((base + bc0) / 4u);
    r[0] = a.x;
    r[1] = a.y;
    r[2] = a.z;
    r[3] = a.w;
    if (cols == 16u) {
        let b = res4((base + bc0) / 4u + 1u);
        let c = res4((base + bc2) / 4u);
        let d = res4((base + bc2) / 4u + 1u);
        r[4] = b.x;
        r[5] = b.y;
        r[6] = b.z;
        r[7] = b.w;
        r[8] = c.x;
        r[9] = c.y;
        r[10] = c.z;
        r[11] = c.w;
        r[12] = d.x;
        r[13] = d.y;
        r[14] = d.z;
        r[15] = d.w;
    }
    if (row >= tp.m) { return; }
    for (var j = 0u; j < cols; j++) {
        let c = col_of(j);
        if (c < tp.n) {
            tout[row * tp.n + c] = r[j] + acc[j];
        }
    }
}

// Row of X this invocation computes (rows past tp.m compute garbage, never stored).
fn tex_row(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * 64u;
}

// The four-row kernels run workgroups of one subgroup (8 invocations = 32 rows): a ViT-L
// batch of one image (1029 rows) is then 33 workgroups per column block, not 5, so a CPU
// adapter's threads share each dispatch evenly.
fn tex_row8(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * 8u;
}

// The 16-column block's accumulators, bias added: columns c0 … c0 + 7 from the first
// window, c2 … c2 + 7 from the second; past the last column, lanes re-read it.
fn acc16(row: u32, sl: u32) -> array<f32, 16> {
    let xr = min(row, tp.m - 1u) * tp.k4;
    var acc: array<f32, 16>;
    let wa = widx(sl, 0u);
    let wb = tp.w_base2 + (min(bc2 + sl, max(tp.n - 1u, bc2)) - bc2) * tp.k4;
    for (var l = 0u; l < tp.k4; l++) {
        let xv = xload(xr + l);
        bc8(&acc, 0u, xv, wu[wa + l]);
        bc8(&acc, 8u, xv, wu2[wb + l]);
    }
    add_bias8(&acc, 0u, bc0, sl);
    add_bias8(&acc, 8u, bc2, sl);
    return acc;
}

fn acc4(row: u32, sl: u32) -> array<f32, 16> {
    let xr = min(row, tp.m - 1u) * tp.k4;
    var acc: array<f32, 16>;
    let wa = widx(min(sl, 3u), 0u);
    for (var l = 0u; l < tp.k4; l++) {
        bc4(&acc, xload(xr + l), wu[wa + l]);
    }
    add_bias8(&acc, 0u, bc0, sl);
    return acc;
}

@compute @workgroup_size(64)
fn matmul_tex16(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(subgroup_invocation_id) sl: u32) {
    block_from_params();
    let row = tex_row(gid, nwg);
    store_row(row, acc16(row, sl), 16u);
}

@compute @workgroup_size(64)
fn matmul_tex16_rope(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(subgroup_invocation_id) sl: u32) {
    block_from_params();
    let row = tex_row(gid, nwg);
    var acc = acc16(row, sl);
    rope16(&acc, row);
    store_row(row, acc, 16u);
}

@compute @workgroup_size(64)
fn matmul_tex16_res(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(subgroup_invocation_id) sl: u32) {
    block_from_params();
    let row = tex_row(gid, nwg);
    var acc = acc16(row, sl);
    scale8(&acc, 0u, bc0, sl);
    scale8(&acc, 8u, bc2, sl);
    store_res(row, acc, 16u);
}

@compute @workgroup_size(64)
fn matmul_tex4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(subgroup_invocation_id) sl: u32) {
    block_from_params();
    let row = tex_row(gid, nwg);
    store_row(row, acc4(row, sl), 4u);
}

@compute @workgroup_size(64)
fn matmul_tex4_res(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(subgroup_invocation_id) sl: u32) {
    block_from_params();
    let row = tex_row(gid, nwg);
    var acc = acc4(row, sl);
    scale8(&acc, 0u, bc0, sl);
    store_res(row, acc, 4u);
}

// f16 weights on the texture path (entry points ending in h): the window holds vec4<u32> =
// 8 halves of one column (K % 8 == 0), so twice the K fits a window; lanes broadcast the
// packed words (half the broadcasts of the f32 kernels) and every lane unpacks to f32.
@group(0) @binding(1) var<uniform> wh: array<vec4<u32>, 4096>;
@group(0) @binding(5) var<uniform> wh2: array<vec4<u32>, 4096>;

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

fn bc4h(acc: ptr<function, array<f32, 16>>, x0: vec4<f32>, x1: vec4<f32>, w: vec4<u32>) {
    (*acc)[0] += dot8(x0, x1, subgroupBroadcast(w, 0u));
    (*acc)[1] += dot8(x0, x1, subgroupBroadcast(w, 1u));
    (*acc)[2] += dot8(x0, x1, subgroupBroadcast(w, 2u));
    (*acc)[3] += dot8(x0, x1, subgroupBroadcast(w, 3u));
}

fn acc16h(row: u32, sl: u32) -> array<f32, 16> {
    let xr = min(row, tp.m - 1u) * tp.k4;
    let k8 = tp.k4 / 2u;
    var acc: array<f32, 16>;
    let wa = tp.w_base + (min(bc0 + sl, tp.n - 1u) - bc0) * k8;
    let wb = tp.w_base2 + (min(bc2 + sl, max(tp.n - 1u, bc2)) - bc2) * k8;
    for (var l = 0u; l < k8; l++) {
        let x0 = xload(xr + 2u * l);
        let x1 = xload(xr + 2u * l + 1u);
        bc8h(&acc, 0u, x0, x1, wh[wa + l]);
        bc8h(&acc, 8u, x0, x1, wh2[wb + l]);
    }
    add_bias8(&acc, 0u, bc0, sl);
    add_bias8(&acc, 8u, bc2, sl);
    return acc;
}

fn acc4h(row: u32, sl: u32) -> array<f32, 16> {
    let xr = min(row, tp.m - 1u) * tp.k4;
    let k8 = tp.k4 / 2u;
    var acc: array<f32, 16>;
    let wa = tp.w_base + (min(bc0 + min(sl, 3u), tp.n - 1u) - bc0) * k8;
    for (var l = 0u; l < k8; l++) {
        bc4h(&acc, xload(xr + 2u * l), xload(xr + 2u * l + 1u), wh[wa + l]);
    }
    add_bias8(&acc, 0u, bc0, sl);
    return acc;
}

@compute @workgroup_size(64)
fn matmul_tex16h(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(subgroup_invocation_id) sl: u32) {
    block_from_params();
    let row = tex_row(gid, nwg);
    store_row(row, acc16h(row, sl), 16u);
}

@compute @workgroup_size(64)
fn matmul_tex16h_rope(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(subgroup_invocation_id) sl: u32) {
    block_from_params();
    let row = tex_row(gid, nwg);
    var acc = acc16h(row, sl);
    rope16(&acc, row);
    store_row(row, acc, 16u);
}

@compute @workgroup_size(64)
fn matmul_tex16h_res(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(subgroup_invocation_id) sl: u32) {
    block_from_params();
    let row = tex_row(gid, nwg);
    var acc = acc16h(row, sl);
    scale8(&acc, 0u, bc0, sl);
    scale8(&acc, 8u, bc2, sl);
    store_res(row, acc, 16u);
}

@compute @workgroup_size(64)
fn matmul_tex4h(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(subgroup_invocation_id) sl: u32) {
    block_from_params();
    let row = tex_row(gid, nwg);
    store_row(row, acc4h(row, sl), 4u);
}

@compute @workgroup_size(64)
fn matmul_tex4h_res(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(subgroup_invocation_id) sl: u32) {
    block_from_params();
    let row = tex_row(gid, nwg);
    var acc = acc4h(row, sl);
    scale8(&acc, 0u, bc0, sl);
    store_res(row, acc, 4u);
}
// ---- Four rows × 16 columns per invocation (matmul_tex16r4*, the default) ----
// The block of matmul_tex16 (two windows of 8 columns) for rows 4i … 4i + 3: each W vec4
// a lane loads and each broadcast feeds four rows, so per FLOP there are a quarter of the
// W gathers and broadcasts of matmul_tex16 and the same number of texel fetches. On
// lavapipe a texel fetch of rgba32float is an out-of-line call that clobbers every vector
// register, so the accumulators live on the stack anyway and 64 of them cost no more per
// FLOP than 16 (docs/lavapipe.md, session 8).

// Row r's 16 accumulators (columns c0 …, then c2 …).
alias Acc4 = array<array<f32, 16>, 4>;

fn bc8r4(acc: ptr<function, Acc4>, o: u32, x0: vec4<f32>, x1: vec4<f32>, x2: vec4<f32>, x3: vec4<f32>, w: vec4<f32>) {
    let w0 = subgroupBroadcast(w, 0u);
    (*acc)[0][o + 0u] += dot(x0, w0);
    (*acc)[1][o + 0u] += dot(x1, w0);
    (*acc)[2][o + 0u] += dot(x2, w0);
    (*acc)[3][o + 0u] += dot(x3, w0);
    let w1 = subgroupBroadcast(w, 1u);
    (*acc)[0][o + 1u] += dot(x0, w1);
    (*acc)[1][o + 1u] += dot(x1, w1);
    (*acc)[2][o + 1u] += dot(x2, w1);
    (*acc)[3][o + 1u] += dot(x3, w1);
    let w2 = subgroupBroadcast(w, 2u);
    (*acc)[0][o + 2u] += dot(x0, w2);
    (*acc)[1][o + 2u] += dot(x1, w2);
    (*acc)[2][o + 2u] += dot(x2, w2);
    (*acc)[3][o + 2u] += dot(x3, w2);
    let w3 = subgroupBroadcast(w, 3u);
    (*acc)[0][o + 3u] += dot(x0, w3);
    (*acc)[1][o + 3u] += dot(x1, w3);
    (*acc)[2][o + 3u] += dot(x2, w3);
    (*acc)[3][o + 3u] += dot(x3, w3);
    let w4 = subgroupBroadcast(w, 4u);
    (*acc)[0][o + 4u] += dot(x0, w4);
    (*acc)[1][o + 4u] += dot(x1, w4);
    (*acc)[2][o + 4u] += dot(x2, w4);
    (*acc)[3][o + 4u] += dot(x3, w4);
    let w5 = subgroupBroadcast(w, 5u);
    (*acc)[0][o + 5u] += dot(x0, w5);
    (*acc)[1][o + 5u] += dot(x1, w5);
    (*acc)[2][o + 5u] += dot(x2, w5);
    (*acc)[3][o + 5u] += dot(x3, w5);
    let w6 = subgroupBroadcast(w, 6u);
    (*acc)[0][o + 6u] += dot(x0, w6);
    (*acc)[1][o + 6u] += dot(x1, w6);
    (*acc)[2][o + 6u] += dot(x2, w6);
    (*acc)[3][o + 6u] += dot(x3, w6);
    let w7 = subgroupBroadcast(w, 7u);
    (*acc)[0][o + 7u] += dot(x0, w7);
    (*acc)[1][o + 7u] += dot(x1, w7);
    (*acc)[2][o + 7u] += dot(x2, w7);
    (*acc)[3][o + 7u] += dot(x3, w7);
}

fn bc8r4h(acc: ptr<function, Acc4>, o: u32, x0: array<vec4<f32>, 2>, x1: array<vec4<f32>, 2>, x2: array<vec4<f32>, 2>, x3: array<vec4<f32>, 2>, w: vec4<u32>) {
    let w0 = subgroupBroadcast(w, 0u);
    (*acc)[0][o + 0u] += dot8(x0[0], x0[1], w0);
    (*acc)[1][o + 0u] += dot8(x1[0], x1[1], w0);
    (*acc)[2][o + 0u] += dot8(x2[0], x2[1], w0);
    (*acc)[3][o + 0u] += dot8(x3[0], x3[1], w0);
    let w1 = subgroupBroadcast(w, 1u);
    (*acc)[0][o + 1u] += dot8(x0[0], x0[1], w1);
    (*acc)[1][o + 1u] += dot8(x1[0], x1[1], w1);
    (*acc)[2][o + 1u] += dot8(x2[0], x2[1], w1);
    (*acc)[3][o + 1u] += dot8(x3[0], x3[1], w1);
    let w2 = subgroupBroadcast(w, 2u);
    (*acc)[0][o + 2u] += dot8(x0[0], x0[1], w2);
    (*acc)[1][o + 2u] += dot8(x1[0], x1[1], w2);
    (*acc)[2][o + 2u] += dot8(x2[0], x2[1], w2);
    (*acc)[3][o + 2u] += dot8(x3[0], x3[1], w2);
    let w3 = subgroupBroadcast(w, 3u);
    (*acc)[0][o + 3u] += dot8(x0[0], x0[1], w3);
    (*acc)[1][o + 3u] += dot8(x1[0], x1[1], w3);
    (*acc)[2][o + 3u] += dot8(x2[0], x2[1], w3);
    (*acc)[3][o + 3u] += dot8(x3[0], x3[1], w3);
    let w4 = subgroupBroadcast(w, 4u);
    (*acc)[0][o + 4u] += dot8(x0[0], x0[1], w4);
    (*acc)[1][o + 4u] += dot8(x1[0], x1[1], w4);
    (*acc)[2][o + 4u] += dot8(x2[0], x2[1], w4);
    (*acc)[3][o + 4u] += dot8(x3[0], x3[1], w4);
    let w5 = subgroupBroadcast(w, 5u);
    (*acc)[0][o + 5u] += dot8(x0[0], x0[1], w5);
    (*acc)[1][o + 5u] += dot8(x1[0], x1[1], w5);
    (*acc)[2][o + 5u] += dot8(x2[0], x2[1], w5);
    (*acc)[3][o + 5u] += dot8(x3[0], x3[1], w5);
    let w6 = subgroupBroadcast(w, 6u);
    (*acc)[0][o + 6u] += dot8(x0[0], x0[1], w6);
    (*acc)[1][o + 6u] += dot8(x1[0], x1[1], w6);
    (*acc)[2][o + 6u] += dot8(x2[0], x2[1], w6);
    (*acc)[3][o + 6u] += dot8(x3[0], x3[1], w6);
    let w7 = subgroupBroadcast(w, 7u);
    (*acc)[0][o + 7u] += dot8(x0[0], x0[1], w7);
    (*acc)[1][o + 7u] += dot8(x1[0], x1[1], w7);
    (*acc)[2][o + 7u] += dot8(x2[0], x2[1], w7);
    (*acc)[3][o + 7u] += dot8(x3[0], x3[1], w7);
}

// The first texel of row row + r of X (rows past the last read the last).
fn xrow(row: u32, r: u32) -> u32 {
    return min(row + r, tp.m - 1u) * tp.k4;
}

// Bias of the block's columns added to every row (call in uniform control flow).
// (every storage-buffer load is a loop over the lanes on lavapipe: the block's bias and
// λ are loaded once for the four rows, not per row)
// (rows unrolled by hand: in a loop lavapipe masks every private write lane by lane)
fn bias_r4(acc: ptr<function, Acc4>, sl: u32) {
    if (tp.has_bias == 0u) { return; }
    let b0 = tbias[min(bc0 + sl, tp.n - 1u)];
    let b2 = tbias[min(bc2 + sl, tp.n - 1u)];
    (*acc)[0] = bias_row((*acc)[0], b0, b2);
    (*acc)[1] = bias_row((*acc)[1], b0, b2);
    (*acc)[2] = bias_row((*acc)[2], b0, b2);
    (*acc)[3] = bias_row((*acc)[3], b0, b2);
}

fn bias_row(acc: array<f32, 16>, b0: f32, b2: f32) -> array<f32, 16> {
    var a = acc;
    add_bc8(&a, 0u, b0);
    add_bc8(&a, 8u, b2);
    return a;
}

// One k-step of the block for rows t (first texels of the four rows of X): W from the
// windows (wa, wb: this lane's column's first vec4 in each).
fn step16r4(acc: ptr<function, Acc4>, t: vec4<u32>, wa: u32, wb: u32, l: u32) {
    let x0 = xload(t.x + l);
    let x1 = xload(t.y + l);
    let x2 = xload(t.z + l);
    let x3 = xload(t.w + l);
    bc8r4(acc, 0u, x0, x1, x2, x3, wu[wa + l]);
    bc8r4(acc, 8u, x0, x1, x2, x3, wu2[wb + l]);
}

// The first texels of rows row … row + 3 of X.
fn rows_r4(row: u32) -> vec4<u32> {
    return vec4<u32>(xrow(row, 0u), xrow(row, 1u), xrow(row, 2u), xrow(row, 3u));
}

// Every kernel below runs four k-steps per loop iteration: lavapipe keeps the 64
// accumulators on the stack and blends every loop-carried value with the loop mask once
// per iteration, so each is loaded, blended and stored once per four k-steps, not every
// one (+12…+21 % GFLOP per wall second, docs/lavapipe.md, session 9).
fn acc16r4(row: u32, sl: u32) -> Acc4 {
    let t = rows_r4(row);
    var acc: Acc4;
    let wa = widx(sl, 0u);
    let wb = tp.w_base2 + (min(bc2 + sl, max(tp.n - 1u, bc2)) - bc2) * tp.k4;
    let k4u = tp.k4 - tp.k4 % 4u;
    for (var l = 0u; l < k4u; l += 4u) {
        step16r4(&acc, t, wa, wb, l);
        step16r4(&acc, t, wa, wb, l + 1u);
        step16r4(&acc, t, wa, wb, l + 2u);
        step16r4(&acc, t, wa, wb, l + 3u);
    }
    for (var l = k4u; l < tp.k4; l++) {
        step16r4(&acc, t, wa, wb, l);
    }
    bias_r4(&acc, sl);
    return acc;
}

// f16 weights: one window vec4<u32> = 8 halves of a column, two texels of X per row.
fn step16r4h(acc: ptr<function, Acc4>, t: vec4<u32>, wa: u32, wb: u32, l: u32) {
    let x0 = array<vec4<f32>, 2>(xload(t.x + 2u * l), xload(t.x + 2u * l + 1u));
    let x1 = array<vec4<f32>, 2>(xload(t.y + 2u * l), xload(t.y + 2u * l + 1u));
    let x2 = array<vec4<f32>, 2>(xload(t.z + 2u * l), xload(t.z + 2u * l + 1u));
    let x3 = array<vec4<f32>, 2>(xload(t.w + 2u * l), xload(t.w + 2u * l + 1u));
    bc8r4h(acc, 0u, x0, x1, x2, x3, wh[wa + l]);
    bc8r4h(acc, 8u, x0, x1, x2, x3, wh2[wb + l]);
}

fn acc16r4h(row: u32, sl: u32) -> Acc4 {
    let t = rows_r4(row);
    let k8 = tp.k4 / 2u;
    var acc: Acc4;
    let wa = tp.w_base + (min(bc0 + sl, tp.n - 1u) - bc0) * k8;
    let wb = tp.w_base2 + (min(bc2 + sl, max(tp.n - 1u, bc2)) - bc2) * k8;
    // (two k-steps of 8 per iteration: as many FLOPs as four of the f32 kernels)
    let k8u = k8 - k8 % 2u;
    for (var l = 0u; l < k8u; l += 2u) {
        step16r4h(&acc, t, wa, wb, l);
        step16r4h(&acc, t, wa, wb, l + 1u);
    }
    if (k8u < k8) {
        step16r4h(&acc, t, wa, wb, k8u);
    }
    bias_r4(&acc, sl);
    return acc;
}

// The four rows stored one float at a time (any N; rows past tp.m are computed on the
// last row, never stored). The vec4 stores and the RoPE and residual epilogues (rope_r4,
// res_r4; N % 4 == 0) are below, with the W-texture kernels.
fn store_r4(row: u32, acc: Acc4) {
    for (var r = 0u; r < 4u; r++) {
        store_row(row + r, acc[r], 16u);
    }
}

@compute @workgroup_size(8)
fn matmul_tex16r4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(subgroup_invocation_id) sl: u32) {
    block_from_params();
    let row = 4u * tex_row8(gid, nwg);
    store_r4(row, acc16r4(row, sl));
}

@compute @workgroup_size(8)
fn matmul_tex16r4_rope(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                       @builtin(subgroup_invocation_id) sl: u32) {
    block_from_params();
    let row = 4u * tex_row8(gid, nwg);
    rope_r4(row, acc16r4(row, sl));
}

@compute @workgroup_size(8)
fn matmul_tex16r4_res(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(subgroup_invocation_id) sl: u32) {
    block_from_params();
    let row = 4u * tex_row8(gid, nwg);
    res_r4(row, acc16r4(row, sl), sl);
}

@compute @workgroup_size(8)
fn matmul_tex16r4h(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(subgroup_invocation_id) sl: u32) {
    block_from_params();
    let row = 4u * tex_row8(gid, nwg);
    store_r4(row, acc16r4h(row, sl));
}

@compute @workgroup_size(8)
fn matmul_tex16r4h_rope(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                        @builtin(subgroup_invocation_id) sl: u32) {
    block_from_params();
    let row = 4u * tex_row8(gid, nwg);
    rope_r4(row, acc16r4h(row, sl));
}

@compute @workgroup_size(8)
fn matmul_tex16r4h_res(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                       @builtin(subgroup_invocation_id) sl: u32) {
    block_from_params();
    let row = 4u * tex_row8(gid, nwg);
    res_r4(row, acc16r4h(row, sl), sl);
}
// ---- W through a texture, every column block in one dispatch (matmul_tex32r4w*) ----
// The four-row kernels with W read from a read-only rgba32f storage texture (texel
// c·k4 + l = column c's k-step l, copied from the weight buffer before the dispatch)
// instead of uniform windows: a window can only be moved between dispatches, a texture
// covers every column, so one dispatch replaces one per 16-column block (on lavapipe
// every dispatch is a fork/join of its thread pool; the ViT-S qkv projection was 72).
// And with no window to fit, an invocation takes two 16-column blocks (2y and 2y + 1,
// workgroup y): four rows × 32 columns, every X fetch feeding 32 columns instead of 16
// (docs/lavapipe.md, session 9).
@group(0) @binding(8) var wt: texture_storage_2d<rgba32float, read>;

fn wload(t: u32) -> vec4<f32> {
    return textureLoad(wt, vec2<u32>(t & 1023u, t >> 10u));
}

// Block y of the 16-column blocks: columns 16y … 16y + 7 and 16y + 8 … 16y + 15.
fn block16(y: u32) {
    bc0 = 16u * y;
    bc2 = bc0 + 8u;
    brj = 0u;
}

// Block y of RoPE's blocks: head h = y / (half / 8) pairs columns h·hd + j0 … + 7 with the
// same + half (half = hd / 2 = 4·q4), j0 = 8·(y mod (half / 8)).
fn block_rope(y: u32) {
    let half = 4u * tp.q4;
    let per_head = half / 8u;
    let j0 = 8u * (y % per_head);
    bc0 = (y / per_head) * 2u * half + j0;
    bc2 = bc0 + half;
    brj = j0 / 4u;
}

// The first W texels of this lane's columns in the current block's two groups (columns
// past the last re-read it, as in the window kernels; a block past the last computes
// garbage that is never stored).
fn w_bases(sl: u32) -> vec2<u32> {
    return vec2<u32>(min(bc0 + sl, tp.n - 1u), min(bc2 + sl, tp.n - 1u)) * tp.k4;
}

// First row of this invocation: 8 invocations × 4 rows per workgroup along x.
fn row_w(wg: vec3<u32>, li: u32) -> u32 {
    return 4u * (wg.x * 8u + li);
}

// One k-step of two blocks for rows t (first texels of the four rows of X): each row's
// texel once, W's columns from w (the blocks' w_bases), broadcast.
fn step32r4w(a: ptr<function, Acc4>, b: ptr<function, Acc4>, t: vec4<u32>, w: vec4<u32>, l: u32) {
    let x0 = xload(t.x + l);
    let x1 = xload(t.y + l);
    let x2 = xload(t.z + l);
    let x3 = xload(t.w + l);
    bc8r4(a, 0u, x0, x1, x2, x3, wload(w.x + l));
    bc8r4(a, 8u, x0, x1, x2, x3, wload(w.y + l));
    bc8r4(b, 0u, x0, x1, x2, x3, wload(w.z + l));
    bc8r4(b, 8u, x0, x1, x2, x3, wload(w.w + l));
}

fn acc32r4w(a: ptr<function, Acc4>, b: ptr<function, Acc4>, row: u32, w: vec4<u32>) {
    let t = rows_r4(row);
    // (four k-steps per iteration, as acc16r4)
    let k4u = tp.k4 - tp.k4 % 4u;
    for (var l = 0u; l < k4u; l += 4u) {
        step32r4w(a, b, t, w, l);
        step32r4w(a, b, t, w, l + 1u);
        step32r4w(a, b, t, w, l + 2u);
        step32r4w(a, b, t, w, l + 3u);
    }
    for (var l = k4u; l < tp.k4; l++) {
        step32r4w(a, b, t, w, l);
    }
}

// Block y: a 16-column block, or RoPE's (`rope` is a literal at every call).
fn block_w(y: u32, rope: bool) {
    if (rope) {
        block_rope(y);
    } else {
        block16(y);
    }
}

// Blocks 2y (into a) and 2y + 1 (into b) for rows row …, bias added; leaves block 2y + 1
// set.
fn two_blocks(a: ptr<function, Acc4>, b: ptr<function, Acc4>, row: u32, y: u32, sl: u32, rope: bool) {
    block_w(2u * y, rope);
    let w0 = w_bases(sl);
    block_w(2u * y + 1u, rope);
    acc32r4w(a, b, row, vec4<u32>(w0, w_bases(sl)));
    bias_r4(b, sl);
    block_w(2u * y, rope);
    bias_r4(a, sl);
    block_w(2u * y + 1u, rope);
}

@compute @workgroup_size(8)
fn matmul_tex32r4w(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32,
                   @builtin(subgroup_invocation_id) sl: u32) {
    let row = row_w(wg, li);
    var a: Acc4;
    var b: Acc4;
    two_blocks(&a, &b, row, wg.y, sl, false);
    store_r4(row, b);
    block16(2u * wg.y);
    store_r4(row, a);
}

@compute @workgroup_size(8)
fn matmul_tex32r4w_rope(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32,
                        @builtin(subgroup_invocation_id) sl: u32) {
    let row = row_w(wg, li);
    var a: Acc4;
    var b: Acc4;
    two_blocks(&a, &b, row, wg.y, sl, true);
    rope_r4(row, b);
    block_rope(2u * wg.y);
    rope_r4(row, a);
}

@compute @workgroup_size(8)
fn matmul_tex32r4w_res(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32,
                       @builtin(subgroup_invocation_id) sl: u32) {
    let row = row_w(wg, li);
    var a: Acc4;
    var b: Acc4;
    two_blocks(&a, &b, row, wg.y, sl, false);
    res_r4(row, b, sl);
    block16(2u * wg.y);
    res_r4(row, a, sl);
}
// ---- vec4 stores (every four-row epilogue where N % 4 == 0) ----
// Every storage-buffer store is a loop over the 8 lanes on lavapipe, per component; a
// vec4 store is one loop for four columns. Storing the block's rows as vec4s made the
// K = 384 matmuls +27…35 % faster (docs/lavapipe.md, session 10). With N % 4 == 0 each
// group of 4 columns of a block (all starting at multiples of 4) is in range or out of it
// as a whole, and rows start at multiples of 4 floats.
@group(0) @binding(4) var<storage, read_write> tout4: array<vec4<f32>>;

// First column of accumulators 4q … 4q + 3 (q < 4).
fn col4(q: u32) -> u32 {
    return select(bc0 + 4u * q, bc2 + 4u * q - 8u, q >= 2u);
}

fn quad(a: array<f32, 16>, q: u32) -> vec4<f32> {
    return vec4<f32>(a[4u * q], a[4u * q + 1u], a[4u * q + 2u], a[4u * q + 3u]);
}

// Columns 4q … of row `row`, activated.
fn store_quad(row: u32, a: array<f32, 16>, q: u32) {
    let c = col4(q);
    if (row < tp.m && c < tp.n) {
        let v = quad(a, q);
        tout4[(row * tp.n + c) / 4u] = vec4<f32>(activate(v.x), activate(v.y), activate(v.z), activate(v.w));
    }
}

// Columns 4q … of row `row` plus the residual (its texel read before the range checks,
// as in store_res).
fn store_quad_res(row: u32, a: array<f32, 16>, q: u32) {
    let c = col4(q);
    let r = res4((min(row, tp.m - 1u) * tp.n + c) / 4u);
    if (row < tp.m && c < tp.n) {
        tout4[(row * tp.n + c) / 4u] = r + quad(a, q);
    }
}

fn store_row_v4(row: u32, a: array<f32, 16>) {
    store_quad(row, a, 0u);
    store_quad(row, a, 1u);
    store_quad(row, a, 2u);
    store_quad(row, a, 3u);
}

fn store_res_v4(row: u32, a: array<f32, 16>) {
    store_quad_res(row, a, 0u);
    store_quad_res(row, a, 1u);
    store_quad_res(row, a, 2u);
    store_quad_res(row, a, 3u);
}

fn store_r4_v4(row: u32, acc: Acc4) {
    store_row_v4(row, acc[0]);
    store_row_v4(row + 1u, acc[1]);
    store_row_v4(row + 2u, acc[2]);
    store_row_v4(row + 3u, acc[3]);
}

// (the four rows unrolled by hand: inside a loop lavapipe masks every write to a private
// variable lane by lane, and these epilogues write the row's accumulators)
fn rope_row_v4(row: u32, acc: array<f32, 16>) {
    var a = acc;
    rope16(&a, row);
    store_row_v4(row, a);
}

fn rope_r4(row: u32, acc: Acc4) {
    rope_row_v4(row, acc[0]);
    rope_row_v4(row + 1u, acc[1]);
    rope_row_v4(row + 2u, acc[2]);
    rope_row_v4(row + 3u, acc[3]);
}

fn res_row_v4(row: u32, acc: array<f32, 16>, l0: f32, l2: f32) {
    var a = acc;
    mul_bc8(&a, 0u, l0);
    mul_bc8(&a, 8u, l2);
    store_res_v4(row, a);
}

fn res_r4(row: u32, acc: Acc4, sl: u32) {
    let l0 = tlam[min(bc0 + sl, tp.n - 1u)];
    let l2 = tlam[min(bc2 + sl, tp.n - 1u)];
    res_row_v4(row, acc[0], l0, l2);
    res_row_v4(row + 1u, acc[1], l0, l2);
    res_row_v4(row + 2u, acc[2], l0, l2);
    res_row_v4(row + 3u, acc[3], l0, l2);
}

// The window kernels (`matmul_tex16r4*`, one dispatch per block) with the vec4 stores
// where N % 4 == 0: `matmul_tex16r4q` (f32 W), `matmul_tex16r4qh` (f16 W). (Their RoPE
// and residual forms always store vec4s: both need N % 4 == 0 on the texture path.)
@compute @workgroup_size(8)
fn matmul_tex16r4q(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(subgroup_invocation_id) sl: u32) {
    block_from_params();
    let row = 4u * tex_row8(gid, nwg);
    store_r4_v4(row, acc16r4(row, sl));
}

@compute @workgroup_size(8)
fn matmul_tex16r4qh(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(subgroup_invocation_id) sl: u32) {
    block_from_params();
    let row = 4u * tex_row8(gid, nwg);
    store_r4_v4(row, acc16r4h(row, sl));
}

// ---- Three blocks per invocation (matmul_tex48r4w*, the default where W is a texture) ----
// Blocks 3y, 3y + 1 and 3y + 2 (workgroup y): four rows × 48 columns, 192 accumulators,
// every X fetch feeding 48 columns. The accumulators live on the stack either way, so the
// extra ones cost a load and a store per four k-steps (docs/lavapipe.md, session 10).
fn step48r4w(a: ptr<function, Acc4>, b: ptr<function, Acc4>, c: ptr<function, Acc4>, t: vec4<u32>, w: vec4<u32>, w2: vec2<u32>, l: u32) {
    let x0 = xload(t.x + l);
    let x1 = xload(t.y + l);
    let x2 = xload(t.z + l);
    let x3 = xload(t.w + l);
    bc8r4(a, 0u, x0, x1, x2, x3, wload(w.x + l));
    bc8r4(a, 8u, x0, x1, x2, x3, wload(w.y + l));
    bc8r4(b, 0u, x0, x1, x2, x3, wload(w.z + l));
    bc8r4(b, 8u, x0, x1, x2, x3, wload(w.w + l));
    bc8r4(c, 0u, x0, x1, x2, x3, wload(w2.x + l));
    bc8r4(c, 8u, x0, x1, x2, x3, wload(w2.y + l));
}

// Blocks 3y (into a), 3y + 1 (b) and 3y + 2 (c) for rows row …, bias added; leaves block
// 3y + 2 set.
fn three_blocks(a: ptr<function, Acc4>, b: ptr<function, Acc4>, c: ptr<function, Acc4>, row: u32, y: u32, sl: u32, rope: bool) {
    block_w(3u * y, rope);
    let w0 = w_bases(sl);
    block_w(3u * y + 1u, rope);
    let w1 = w_bases(sl);
    block_w(3u * y + 2u, rope);
    let w2 = w_bases(sl);
    let t = rows_r4(row);
    let w = vec4<u32>(w0, w1);
    // (four k-steps per iteration, as acc16r4)
    let k4u = tp.k4 - tp.k4 % 4u;
    for (var l = 0u; l < k4u; l += 4u) {
        step48r4w(a, b, c, t, w, w2, l);
        step48r4w(a, b, c, t, w, w2, l + 1u);
        step48r4w(a, b, c, t, w, w2, l + 2u);
        step48r4w(a, b, c, t, w, w2, l + 3u);
    }
    for (var l = k4u; l < tp.k4; l++) {
        step48r4w(a, b, c, t, w, w2, l);
    }
    bias_r4(c, sl);
    block_w(3u * y, rope);
    bias_r4(a, sl);
    block_w(3u * y + 1u, rope);
    bias_r4(b, sl);
    block_w(3u * y + 2u, rope);
}

@compute @workgroup_size(8)
fn matmul_tex48r4w(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32,
                   @builtin(subgroup_invocation_id) sl: u32) {
    let row = row_w(wg, li);
    var a: Acc4;
    var b: Acc4;
    var c: Acc4;
    three_blocks(&a, &b, &c, row, wg.y, sl, false);
    store_r4_v4(row, c);
    block16(3u * wg.y + 1u);
    store_r4_v4(row, b);
    block16(3u * wg.y);
    store_r4_v4(row, a);
}

@compute @workgroup_size(8)
fn matmul_tex48r4w_rope(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32,
                        @builtin(subgroup_invocation_id) sl: u32) {
    let row = row_w(wg, li);
    var a: Acc4;
    var b: Acc4;
    var c: Acc4;
    three_blocks(&a, &b, &c, row, wg.y, sl, true);
    rope_r4(row, c);
    block_rope(3u * wg.y + 1u);
    rope_r4(row, b);
    block_rope(3u * wg.y);
    rope_r4(row, a);
}

@compute @workgroup_size(8)
fn matmul_tex48r4w_res(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32,
                       @builtin(subgroup_invocation_id) sl: u32) {
    let row = row_w(wg, li);
    var a: Acc4;
    var b: Acc4;
    var c: Acc4;
    three_blocks(&a, &b, &c, row, wg.y, sl, false);
    res_r4(row, c, sl);
    block16(3u * wg.y + 1u);
    res_r4(row, b, sl);
    block16(3u * wg.y);
    res_r4(row, a, sl);
}
// END subgroups
