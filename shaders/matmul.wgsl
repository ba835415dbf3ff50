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
    w_base2: u32, // vec4 index of column c0 + 8 inside the second window (16-column blocks)
    _p1: u32,
}

@group(0) @binding(0) var<uniform> tp: TexParams;
@group(0) @binding(1) var<uniform> wu: array<vec4<f32>, 4096>;
@group(0) @binding(2) var xt: texture_2d<f32>;
@group(0) @binding(3) var<storage, read> tbias: array<f32>;
@group(0) @binding(4) var<storage, read_write> tout: array<f32>;
@group(0) @binding(5) var<uniform> wu2: array<vec4<f32>, 4096>;

fn xload(t: u32) -> vec4<f32> {
    return textureLoad(xt, vec2<u32>(t & 1023u, t >> 10u), 0);
}

// The window index of column (c0 + lane) at k-step l; lanes past the last column re-read it.
fn widx(lane: u32, l: u32) -> u32 {
    let c = min(tp.c0 + lane, tp.n - 1u) - tp.c0;
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

fn store_row(row: u32, acc: array<f32, 16>, cols: u32) {
    if (row >= tp.m) { return; }
    for (var j = 0u; j < cols; j++) {
        let c = tp.c0 + j;
        if (c < tp.n) {
            tout[row * tp.n + c] = activate(acc[j]);
        }
    }
}

@compute @workgroup_size(64)
fn matmul_tex16(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(subgroup_invocation_id) sl: u32) {
    let row = gid.x + gid.y * nwg.x * 64u;
    let xr = min(row, tp.m - 1u) * tp.k4;
    var acc: array<f32, 16>;
    let wa = widx(sl, 0u);
    // Columns c0 + 8 … in the second window; past the last column, lanes re-read it.
    let c2 = tp.c0 + 8u;
    let wb = tp.w_base2 + (min(c2 + sl, max(tp.n - 1u, c2)) - c2) * tp.k4;
    for (var l = 0u; l < tp.k4; l++) {
        let xv = xload(xr + l);
        bc8(&acc, 0u, xv, wu[wa + l]);
        bc8(&acc, 8u, xv, wu2[wb + l]);
    }
    add_bias8(&acc, 0u, tp.c0, sl);
    add_bias8(&acc, 8u, c2, sl);
    store_row(row, acc, 16u);
}

@compute @workgroup_size(64)
fn matmul_tex4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(subgroup_invocation_id) sl: u32) {
    let row = gid.x + gid.y * nwg.x * 64u;
    let xr = min(row, tp.m - 1u) * tp.k4;
    var acc: array<f32, 16>;
    let wa = widx(min(sl, 3u), 0u);
    for (var l = 0u; l < tp.k4; l++) {
        bc4(&acc, xload(xr + l), wu[wa + l]);
    }
    add_bias8(&acc, 0u, tp.c0, sl);
    store_row(row, acc, 4u);
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

@compute @workgroup_size(64)
fn matmul_tex16h(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(subgroup_invocation_id) sl: u32) {
    let row = gid.x + gid.y * nwg.x * 64u;
    let xr = min(row, tp.m - 1u) * tp.k4;
    let k8 = tp.k4 / 2u;
    var acc: array<f32, 16>;
    let wa = tp.w_base + (min(tp.c0 + sl, tp.n - 1u) - tp.c0) * k8;
    let c2 = tp.c0 + 8u;
    let wb = tp.w_base2 + (min(c2 + sl, max(tp.n - 1u, c2)) - c2) * k8;
    for (var l = 0u; l < k8; l++) {
        let x0 = xload(xr + 2u * l);
        let x1 = xload(xr + 2u * l + 1u);
        bc8h(&acc, 0u, x0, x1, wh[wa + l]);
        bc8h(&acc, 8u, x0, x1, wh2[wb + l]);
    }
    add_bias8(&acc, 0u, tp.c0, sl);
    add_bias8(&acc, 8u, c2, sl);
    store_row(row, acc, 16u);
}

@compute @workgroup_size(64)
fn matmul_tex4h(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(subgroup_invocation_id) sl: u32) {
    let row = gid.x + gid.y * nwg.x * 64u;
    let xr = min(row, tp.m - 1u) * tp.k4;
    let k8 = tp.k4 / 2u;
    var acc: array<f32, 16>;
    let wa = tp.w_base + (min(tp.c0 + min(sl, 3u), tp.n - 1u) - tp.c0) * k8;
    for (var l = 0u; l < k8; l++) {
        bc4h(&acc, xload(xr + 2u * l), xload(xr + 2u * l + 1u), wh[wa + l]);
    }
    add_bias8(&acc, 0u, tp.c0, sl);
    store_row(row, acc, 4u);
}
// END subgroups
