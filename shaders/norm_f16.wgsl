// layernorm_sg_o16: LayerNorm over the last dimension D with the output stored as packed
// halves (f16 activations, docs/precision.md): the algorithm of norm.wgsl's layernorm_sg
// (one 8-lane subgroup per workgroup walking rows with a grid stride; lane L holds the
// vec4 chunks L, L + 8, … of a row; x, f32, through an rgba32float texture; shifted
// two-pass mean/variance with subgroupAdd; weight and bias kept in registers), written
// with loops whose trip count DS / 32 is a pipeline constant (D % 32 == 0, D ≤ 4096), and
// each chunk stored as two u32 words (pack2x16float). Statistics and the affine map run
// in f32; only the store rounds.

struct Params {
    n: u32,
    d: u32,
    c: u32,
    eps: f32,
}

override DS: u32 = 384u;
override TW_LOG2: u32 = 10u;
const CMAX: u32 = 128u;

// BEGIN subgroups
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(7) var xt: texture_2d<f32>;
@group(0) @binding(8) var<storage, read> w4: array<vec4<f32>>;
@group(0) @binding(9) var<storage, read> b4: array<vec4<f32>>;
@group(0) @binding(10) var<storage, read_write> out2: array<vec2<u32>>;

var<private> xr: array<vec4<f32>, CMAX>;
var<private> wr: array<vec4<f32>, CMAX>;
var<private> br: array<vec4<f32>, CMAX>;

@compute @workgroup_size(8)
fn layernorm_sg_o16(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) lane: u32) {
    let nc = DS / 32u;
    for (var c = 0u; c < nc; c++) {
        wr[c] = w4[c * 8u + lane];
        br[c] = b4[c * 8u + lane];
    }
    let inv_d = 1.0 / f32(DS);
    let mask = (1u << TW_LOG2) - 1u;
    for (var row = wg.x; row < p.n; row += nwg.x) {
        let base = row * (DS / 4u);
        for (var c = 0u; c < nc; c++) {
            let i = base + c * 8u + lane;
            xr[c] = textureLoad(xt, vec2<u32>(i & mask, i >> TW_LOG2), 0);
        }
        // Shifted by the row's first element (exact for nearby values, as layernorm_sg).
        let x0 = subgroupBroadcast(xr[0].x, 0u);
        var part = vec4<f32>(0.0);
        for (var c = 0u; c < nc; c++) {
            xr[c] -= vec4<f32>(x0);
            part += xr[c];
        }
        let mean = subgroupAdd((part.x + part.y) + (part.z + part.w)) * inv_d;
        part = vec4<f32>(0.0);
        for (var c = 0u; c < nc; c++) {
            xr[c] -= vec4<f32>(mean);
            part += xr[c] * xr[c];
        }
        let var_ = subgroupAdd((part.x + part.y) + (part.z + part.w)) * inv_d;
        let rstd = 1.0 / sqrt(var_ + p.eps);
        for (var c = 0u; c < nc; c++) {
            let y = xr[c] * rstd * wr[c] + br[c];
            out2[base + c * 8u + lane] = vec2<u32>(pack2x16float(y.xy), pack2x16float(y.zw));
        }
    }
}
// END subgroups
