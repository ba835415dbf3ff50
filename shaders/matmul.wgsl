// Batched matmul out[b] = op(A[b]) · op(B[b]) + bias, strides in elements.
// Variant "matmul": each invocation computes a 4x4 tile in registers; no shared memory.

struct Params {
    m: u32, n: u32, k: u32, batch: u32,
    a_rs: u32, a_cs: u32, a_bs: u32,
    b_rs: u32, b_cs: u32, b_bs: u32,
    has_bias: u32, tiles_n: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

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
            bv[i] = b[cb[i] + l * p.b_rs];
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
                out[bi * p.m * p.n + r * p.n + c] = v;
            }
        }
    }
}
