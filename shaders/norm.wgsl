// Normalisation kernels.
//   layernorm: over the last dim D of a (rows, D) view; biased variance, eps inside the sqrt.
//   batchnorm: eval form over dim 1 of (N, C, S...), with running statistics.
// Bindings: 1 x, 2 weight, 3 bias, 4 out; batchnorm also reads 5 running_mean, 6 running_var.

struct Params {
    n: u32,     // layernorm: rows; batchnorm: elements
    d: u32,     // layernorm: D; batchnorm: inner size (product of S...)
    c: u32,     // batchnorm: channels
    eps: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> weight: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

const WG: u32 = 64u;

fn index(wg: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wg.x + wg.y * nwg.x) * WG + lid;
}

// Portable layernorm, one invocation per row: three sweeps (mean, centred sum of squares,
// normalise) with no reductions across invocations. The row is shifted by its first
// element before summing: x - x0 is exact for nearby values, so a large common offset
// costs no precision in the mean or the variance.
@compute @workgroup_size(64)
fn layernorm(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let row = index(wg, nwg, lid);
    let d = p.d;
    if (row >= p.n) { return; }
    let base = row * d;
    let x0 = x[base];
    var sum = 0.0;
    for (var j = 0u; j < d; j++) { sum += x[base + j] - x0; }
    let mean = sum / f32(d); // mean of the shifted row
    var sq = 0.0;
    for (var j = 0u; j < d; j++) {
        let c = (x[base + j] - x0) - mean;
        sq += c * c;
    }
    let rstd = 1.0 / sqrt(sq / f32(d) + p.eps);
    for (var j = 0u; j < d; j++) {
        out[base + j] = ((x[base + j] - x0) - mean) * rstd * weight[j] + bias[j];
    }
}

@group(0) @binding(5) var<storage, read> running_mean: array<f32>;
@group(0) @binding(6) var<storage, read> running_var: array<f32>;

override G: u32 = 1u; // batchnorm: consecutive elements per invocation (same channel)

// Batchnorm, G consecutive elements of one channel per invocation (the host picks G
// dividing the inner size), so the four per-channel values are read once per G elements.
@compute @workgroup_size(64)
fn batchnorm(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let i0 = index(wg, nwg, lid) * G;
    let n = p.n;
    if (i0 >= n) { return; }
    let c = (i0 / p.d) % p.c;
    let mean = running_mean[c];
    let scale = weight[c] / sqrt(running_var[c] + p.eps);
    let shift = bias[c];
    for (var i = i0; i < min(i0 + G, n); i++) { out[i] = (x[i] - mean) * scale + shift; }
}

// Batchnorm in two passes, for devices with fewer than 6 storage buffers per shader stage
// (downlevel limits allow 4): batchnorm_normalize writes (x - mean) / sqrt(var + eps) to
// out, batchnorm_affine scales and shifts it in place.
@compute @workgroup_size(64)
fn batchnorm_normalize(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                       @builtin(local_invocation_index) lid: u32) {
    let i0 = index(wg, nwg, lid) * G;
    let n = p.n;
    if (i0 >= n) { return; }
    let c = (i0 / p.d) % p.c;
    let mean = running_mean[c];
    let rstd = 1.0 / sqrt(running_var[c] + p.eps);
    for (var i = i0; i < min(i0 + G, n); i++) { out[i] = (x[i] - mean) * rstd; }
}

@compute @workgroup_size(64)
fn batchnorm_affine(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
    let i0 = index(wg, nwg, lid) * G;
    let n = p.n;
    if (i0 >= n) { return; }
    let c = (i0 / p.d) % p.c;
    let scale = weight[c];
    let shift = bias[c];
    for (var i = i0; i < min(i0 + G, n); i++) { out[i] = out[i] * scale + shift; }
}

// BEGIN subgroups (stripped on devices without subgroup operations)
//
// layernorm_sg, for CPU-like devices with subgroups of at least 8 lanes (lavapipe), where
// each lane's storage load is a slow scalar loop but arithmetic is cheap: a workgroup is
// one subgroup of 8 lanes that keeps weight and bias in registers and walks rows (grid
// stride); lane L holds the vec4 chunks L, L+8, L+16, ... of the row, so x is read once,
// and the two-pass (shifted) mean/variance reductions are subgroupAdds. x arrives as an
// rgba32float texture copied in by the dispatch (texel i at (i % TW, i / TW), TW =
// 2^TW_LOG2), since a texture fetch is a vector gather there. Needs D % 32 == 0 and
// D <= 4096; DS (= D) is an override so every chunk index folds to a constant.

@group(0) @binding(7) var xt: texture_2d<f32>;
@group(0) @binding(8) var<storage, read> w4: array<vec4<f32>>;
@group(0) @binding(9) var<storage, read> b4: array<vec4<f32>>;
@group(0) @binding(10) var<storage, read_write> out4: array<vec4<f32>>;

override DS: u32 = 384u;
override TW_LOG2: u32 = 10u;
const CMAX: u32 = 128u;

var<private> xr: array<vec4<f32>, CMAX>;
var<private> wr: array<vec4<f32>, CMAX>;
var<private> br: array<vec4<f32>, CMAX>;
var<private> lane: u32;
var<private> part: vec4<f32>;

fn ln_params(c: u32) {
    if (c * 32u < DS) {
        wr[c] = w4[c * 8u + lane];
        br[c] = b4[c * 8u + lane];
    }
}

fn ln_load(c: u32, base: u32) {
    if (c * 32u < DS) {
        let i = base + c * 8u + lane;
        xr[c] = textureLoad(xt, vec2<u32>(i & ((1u << TW_LOG2) - 1u), i >> TW_LOG2), 0);
    }
}

// Shifts by the row's first element (exact for nearby values, see layernorm above).
fn ln_shift(c: u32, x0: f32) {
    if (c * 32u < DS) {
        xr[c] -= vec4<f32>(x0);
        part += xr[c];
    }
}

fn ln_centre(c: u32, mean: f32) {
    if (c * 32u < DS) {
        xr[c] -= vec4<f32>(mean);
        part += xr[c] * xr[c];
    }
}

fn ln_store(c: u32, base: u32, rstd: f32) {
    if (c * 32u < DS) { out4[base + c * 8u + lane] = xr[c] * rstd * wr[c] + br[c]; }
}

@compute @workgroup_size(8)
fn layernorm_sg(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    lane = lid;
    ln_params(0u); ln_params(1u); ln_params(2u); ln_params(3u); ln_params(4u); ln_params(5u); ln_params(6u); ln_params(7u);
    ln_params(8u); ln_params(9u); ln_params(10u); ln_params(11u); ln_params(12u); ln_params(13u); ln_params(14u); ln_params(15u);
    ln_params(16u); ln_params(17u); ln_params(18u); ln_params(19u); ln_params(20u); ln_params(21u); ln_params(22u); ln_params(23u);
    ln_params(24u); ln_params(25u); ln_params(26u); ln_params(27u); ln_params(28u); ln_params(29u); ln_params(30u); ln_params(31u);
    ln_params(32u); ln_params(33u); ln_params(34u); ln_params(35u); ln_params(36u); ln_params(37u); ln_params(38u); ln_params(39u);
    ln_params(40u); ln_params(41u); ln_params(42u); ln_params(43u); ln_params(44u); ln_params(45u); ln_params(46u); ln_params(47u);
    ln_params(48u); ln_params(49u); ln_params(50u); ln_params(51u); ln_params(52u); ln_params(53u); ln_params(54u); ln_params(55u);
    ln_params(56u); ln_params(57u); ln_params(58u); ln_params(59u); ln_params(60u); ln_params(61u); ln_params(62u); ln_params(63u);
    ln_params(64u); ln_params(65u); ln_params(66u); ln_params(67u); ln_params(68u); ln_params(69u); ln_params(70u); ln_params(71u);
    ln_params(72u); ln_params(73u); ln_params(74u); ln_params(75u); ln_params(76u); ln_params(77u); ln_params(78u); ln_params(79u);
    ln_params(80u); ln_params(81u); ln_params(82u); ln_params(83u); ln_params(84u); ln_params(85u); ln_params(86u); ln_params(87u);
    ln_params(88u); ln_params(89u); ln_params(90u); ln_params(91u); ln_params(92u); ln_params(93u); ln_params(94u); ln_params(95u);
    ln_params(96u); ln_params(97u); ln_params(98u); ln_params(99u); ln_params(100u); ln_params(101u); ln_params(102u); ln_params(103u);
    ln_params(104u); ln_params(105u); ln_params(106u); ln_params(107u); ln_params(108u); ln_params(109u); ln_params(110u); ln_params(111u);
    ln_params(112u); ln_params(113u); ln_params(114u); ln_params(115u); ln_params(116u); ln_params(117u); ln_params(118u); ln_params(119u);
    ln_params(120u); ln_params(121u); ln_params(122u); ln_params(123u); ln_params(124u); ln_params(125u); ln_params(126u); ln_params(127u);
    let rows = p.n;
    let inv_d = 1.0 / f32(DS);
    for (var row = wg.x; row < rows; row += nwg.x) {
        let base = row * (DS / 4u);
        ln_load(0u, base); ln_load(1u, base); ln_load(2u, base); ln_load(3u, base); ln_load(4u, base); ln_load(5u, base); ln_load(6u, base); ln_load(7u, base);
        ln_load(8u, base); ln_load(9u, base); ln_load(10u, base); ln_load(11u, base); ln_load(12u, base); ln_load(13u, base); ln_load(14u, base); ln_load(15u, base);
        ln_load(16u, base); ln_load(17u, base); ln_load(18u, base); ln_load(19u, base); ln_load(20u, base); ln_load(21u, base); ln_load(22u, base); ln_load(23u, base);
        ln_load(24u, base); ln_load(25u, base); ln_load(26u, base); ln_load(27u, base); ln_load(28u, base); ln_load(29u, base); ln_load(30u, base); ln_load(31u, base);
        ln_load(32u, base); ln_load(33u, base); ln_load(34u, base); ln_load(35u, base); ln_load(36u, base); ln_load(37u, base); ln_load(38u, base); ln_load(39u, base);
        ln_load(40u, base); ln_load(41u, base); ln_load(42u, base); ln_load(43u, base); ln_load(44u, base); ln_load(45u, base); ln_load(46u, base); ln_load(47u, base);
        ln_load(48u, base); ln_load(49u, base); ln_load(50u, base); ln_load(51u, base); ln_load(52u, base); ln_load(53u, base); ln_load(54u, base); ln_load(55u, base);
        ln_load(56u, base); ln_load(57u, base); ln_load(58u, base); ln_load(59u, base); ln_load(60u, base); ln_load(61u, base); ln_load(62u, base); ln_load(63u, base);
        ln_load(64u, base); ln_load(65u, base); ln_load(66u, base); ln_load(67u, base); ln_load(68u, base); ln_load(69u, base); ln_load(70u, base); ln_load(71u, base);
        ln_load(72u, base); ln_load(73u, base); ln_load(74u, base); ln_load(75u, base); ln_load(76u, base); ln_load(77u, base); ln_load(78u, base); ln_load(79u, base);
        ln_load(80u, base); ln_load(81u, base); ln_load(82u, base); ln_load(83u, base); ln_load(84u, base); ln_load(85u, base); ln_load(86u, base); ln_load(87u, base);
        ln_load(88u, base); ln_load(89u, base); ln_load(90u, base); ln_load(91u, base); ln_load(92u, base); ln_load(93u, base); ln_load(94u, base); ln_load(95u, base);
        ln_load(96u, base); ln_load(97u, base); ln_load(98u, base); ln_load(99u, base); ln_load(100u, base); ln_load(101u, base); ln_load(102u, base); ln_load(103u, base);
        ln_load(104u, base); ln_load(105u, base); ln_load(106u, base); ln_load(107u, base); ln_load(108u, base); ln_load(109u, base); ln_load(110u, base); ln_load(111u, base);
        ln_load(112u, base); ln_load(113u, base); ln_load(114u, base); ln_load(115u, base); ln_load(116u, base); ln_load(117u, base); ln_load(118u, base); ln_load(119u, base);
        ln_load(120u, base); ln_load(121u, base); ln_load(122u, base); ln_load(123u, base); ln_load(124u, base); ln_load(125u, base); ln_load(126u, base); ln_load(127u, base);
        let x0 = subgroupBroadcast(xr[0].x, 0u);
        part = vec4<f32>(0.0);
        ln_shift(0u, x0); ln_shift(1u, x0); ln_shift(2u, x0); ln_shift(3u, x0); ln_shift(4u, x0); ln_shift(5u, x0); ln_shift(6u, x0); ln_shift(7u, x0);
        ln_shift(8u, x0); ln_shift(9u, x0); ln_shift(10u, x0); ln_shift(11u, x0); ln_shift(12u, x0); ln_shift(13u, x0); ln_shift(14u, x0); ln_shift(15u, x0);
        ln_shift(16u, x0); ln_shift(17u, x0); ln_shift(18u, x0); ln_shift(19u, x0); ln_shift(20u, x0); ln_shift(21u, x0); ln_shift(22u, x0); ln_shift(23u, x0);
        ln_shift(24u, x0); ln_shift(25u, x0); ln_shift(26u, x0); ln_shift(27u, x0); ln_shift(28u, x0); ln_shift(29u, x0); ln_shift(30u, x0); ln_shift(31u, x0);
        ln_shift(32u, x0); ln_shift(33u, x0); ln_shift(34u, x0); ln_shift(35u, x0); ln_shift(36u, x0); ln_shift(37u, x0); ln_shift(38u, x0); ln_shift(39u, x0);
        ln_shift(40u, x0); ln_shift(41u, x0); ln_shift(42u, x0); ln_shift(43u, x0); ln_shift(44u, x0); ln_shift(45u, x0); ln_shift(46u, x0); ln_shift(47u, x0);
        ln_shift(48u, x0); ln_shift(49u, x0); ln_shift(50u, x0); ln_shift(51u, x0); ln_shift(52u, x0); ln_shift(53u, x0); ln_shift(54u, x0); ln_shift(55u, x0);
        ln_shift(56u, x0); ln_shift(57u, x0); ln_shift(58u, x0); ln_shift(59u, x0); ln_shift(60u, x0); ln_shift(61u, x0); ln_shift(62u, x0); ln_shift(63u, x0);
        ln_shift(64u, x0); ln_shift(65u, x0); ln_shift(66u, x0); ln_shift(67u, x0); ln_shift(68u, x0); ln_shift(69u, x0); ln_shift(70u, x0); ln_shift(71u, x0);
        ln_shift(72u, x0); ln_shift(73u, x0); ln_shift(74u, x0); ln_shift(75u, x0); ln_shift(76u, x0); ln_shift(77u, x0); ln_shift(78u, x0); ln_shift(79u, x0);
        ln_shift(80u, x0); ln_shift(81u, x0); ln_shift(82u, x0); ln_shift(83u, x0); ln_shift(84u, x0); ln_shift(85u, x0); ln_shift(86u, x0); ln_shift(87u, x0);
        ln_shift(88u, x0); ln_shift(89u, x0); ln_shift(90u, x0); ln_shift(91u, x0); ln_shift(92u, x0); ln_shift(93u, x0); ln_shift(94u, x0); ln_shift(95u, x0);
        ln_shift(96u, x0); ln_shift(97u, x0); ln_shift(98u, x0); ln_shift(99u, x0); ln_shift(100u, x0); ln_shift(101u, x0); ln_shift(102u, x0); ln_shift(103u, x0);
        ln_shift(104u, x0); ln_shift(105u, x0); ln_shift(106u, x0); ln_shift(107u, x0); ln_shift(108u, x0); ln_shift(109u, x0); ln_shift(110u, x0); ln_shift(111u, x0);
        ln_shift(112u, x0); ln_shift(113u, x0); ln_shift(114u, x0); ln_shift(115u, x0); ln_shift(116u, x0); ln_shift(117u, x0); ln_shift(118u, x0); ln_shift(119u, x0);
        ln_shift(120u, x0); ln_shift(121u, x0); ln_shift(122u, x0); ln_shift(123u, x0); ln_shift(124u, x0); ln_shift(125u, x0); ln_shift(126u, x0); ln_shift(127u, x0);
        let mean = subgroupAdd((part.x + part.y) + (part.z + part.w)) * inv_d;
        part = vec4<f32>(0.0);
        ln_centre(0u, mean); ln_centre(1u, mean); ln_centre(2u, mean); ln_centre(3u, mean); ln_centre(4u, mean); ln_centre(5u, mean); ln_centre(6u, mean); ln_centre(7u, mean);
        ln_centre(8u, mean); ln_centre(9u, mean); ln_centre(10u, mean); ln_centre(11u, mean); ln_centre(12u, mean); ln_centre(13u, mean); ln_centre(14u, mean); ln_centre(15u, mean);
        ln_centre(16u, mean); ln_centre(17u, mean); ln_centre(18u, mean); ln_centre(19u, mean); ln_centre(20u, mean); ln_centre(21u, mean); ln_centre(22u, mean); ln_centre(23u, mean);
        ln_centre(24u, mean); ln_centre(25u, mean); ln_centre(26u, mean); ln_centre(27u, mean); ln_centre(28u, mean); ln_centre(29u, mean); ln_centre(30u, mean); ln_centre(31u, mean);
        ln_centre(32u, mean); ln_centre(33u, mean); ln_centre(34u, mean); ln_centre(35u, mean); ln_centre(36u, mean); ln_centre(37u, mean); ln_centre(38u, mean); ln_centre(39u, mean);
        ln_centre(40u, mean); ln_centre(41u, mean); ln_centre(42u, mean); ln_centre(43u, mean); ln_centre(44u, mean); ln_centre(45u, mean); ln_centre(46u, mean); ln_centre(47u, mean);
        ln_centre(48u, mean); ln_centre(49u, mean); ln_centre(50u, mean); ln_centre(51u, mean); ln_centre(52u, mean); ln_centre(53u, mean); ln_centre(54u, mean); ln_centre(55u, mean);
        ln_centre(56u, mean); ln_centre(57u, mean); ln_centre(58u, mean); ln_centre(59u, mean); ln_centre(60u, mean); ln_centre(61u, mean); ln_centre(62u, mean); ln_centre(63u, mean);
        ln_centre(64u, mean); ln_centre(65u, mean); ln_centre(66u, mean); ln_centre(67u, mean); ln_centre(68u, mean); ln_centre(69u, mean); ln_centre(70u, mean); ln_centre(71u, mean);
        ln_centre(72u, mean); ln_centre(73u, mean); ln_centre(74u, mean); ln_centre(75u, mean); ln_centre(76u, mean); ln_centre(77u, mean); ln_centre(78u, mean); ln_centre(79u, mean);
        ln_centre(80u, mean); ln_centre(81u, mean); ln_centre(82u, mean); ln_centre(83u, mean); ln_centre(84u, mean); ln_centre(85u, mean); ln_centre(86u, mean); ln_centre(87u, mean);
        ln_centre(88u, mean); ln_centre(89u, mean); ln_centre(90u, mean); ln_centre(91u, mean); ln_centre(92u, mean); ln_centre(93u, mean); ln_centre(94u, mean); ln_centre(95u, mean);
        ln_centre(96u, mean); ln_centre(97u, mean); ln_centre(98u, mean); ln_centre(99u, mean); ln_centre(100u, mean); ln_centre(101u, mean); ln_centre(102u, mean); ln_centre(103u, mean);
        ln_centre(104u, mean); ln_centre(105u, mean); ln_centre(106u, mean); ln_centre(107u, mean); ln_centre(108u, mean); ln_centre(109u, mean); ln_centre(110u, mean); ln_centre(111u, mean);
        ln_centre(112u, mean); ln_centre(113u, mean); ln_centre(114u, mean); ln_centre(115u, mean); ln_centre(116u, mean); ln_centre(117u, mean); ln_centre(118u, mean); ln_centre(119u, mean);
        ln_centre(120u, mean); ln_centre(121u, mean); ln_centre(122u, mean); ln_centre(123u, mean); ln_centre(124u, mean); ln_centre(125u, mean); ln_centre(126u, mean); ln_centre(127u, mean);
        let var_ = subgroupAdd((part.x + part.y) + (part.z + part.w)) * inv_d;
        let rstd = 1.0 / sqrt(var_ + p.eps);
        ln_store(0u, base, rstd); ln_store(1u, base, rstd); ln_store(2u, base, rstd); ln_store(3u, base, rstd); ln_store(4u, base, rstd); ln_store(5u, base, rstd); ln_store(6u, base, rstd); ln_store(7u, base, rstd);
        ln_store(8u, base, rstd); ln_store(9u, base, rstd); ln_store(10u, base, rstd); ln_store(11u, base, rstd); ln_store(12u, base, rstd); ln_store(13u, base, rstd); ln_store(14u, base, rstd); ln_store(15u, base, rstd);
        ln_store(16u, base, rstd); ln_store(17u, base, rstd); ln_store(18u, base, rstd); ln_store(19u, base, rstd); ln_store(20u, base, rstd); ln_store(21u, base, rstd); ln_store(22u, base, rstd); ln_store(23u, base, rstd);
        ln_store(24u, base, rstd); ln_store(25u, base, rstd); ln_store(26u, base, rstd); ln_store(27u, base, rstd); ln_store(28u, base, rstd); ln_store(29u, base, rstd); ln_store(30u, base, rstd); ln_store(31u, base, rstd);
        ln_store(32u, base, rstd); ln_store(33u, base, rstd); ln_store(34u, base, rstd); ln_store(35u, base, rstd); ln_store(36u, base, rstd); ln_store(37u, base, rstd); ln_store(38u, base, rstd); ln_store(39u, base, rstd);
        ln_store(40u, base, rstd); ln_store(41u, base, rstd); ln_store(42u, base, rstd); ln_store(43u, base, rstd); ln_store(44u, base, rstd); ln_store(45u, base, rstd); ln_store(46u, base, rstd); ln_store(47u, base, rstd);
        ln_store(48u, base, rstd); ln_store(49u, base, rstd); ln_store(50u, base, rstd); ln_store(51u, base, rstd); ln_store(52u, base, rstd); ln_store(53u, base, rstd); ln_store(54u, base, rstd); ln_store(55u, base, rstd);
        ln_store(56u, base, rstd); ln_store(57u, base, rstd); ln_store(58u, base, rstd); ln_store(59u, base, rstd); ln_store(60u, base, rstd); ln_store(61u, base, rstd); ln_store(62u, base, rstd); ln_store(63u, base, rstd);
        ln_store(64u, base, rstd); ln_store(65u, base, rstd); ln_store(66u, base, rstd); ln_store(67u, base, rstd); ln_store(68u, base, rstd); ln_store(69u, base, rstd); ln_store(70u, base, rstd); ln_store(71u, base, rstd);
        ln_store(72u, base, rstd); ln_store(73u, base, rstd); ln_store(74u, base, rstd); ln_store(75u, base, rstd); ln_store(76u, base, rstd); ln_store(77u, base, rstd); ln_store(78u, base, rstd); ln_store(79u, base, rstd);
        ln_store(80u, base, rstd); ln_store(81u, base, rstd); ln_store(82u, base, rstd); ln_store(83u, base, rstd); ln_store(84u, base, rstd); ln_store(85u, base, rstd); ln_store(86u, base, rstd); ln_store(87u, base, rstd);
        ln_store(88u, base, rstd); ln_store(89u, base, rstd); ln_store(90u, base, rstd); ln_store(91u, base, rstd); ln_store(92u, base, rstd); ln_store(93u, base, rstd); ln_store(94u, base, rstd); ln_store(95u, base, rstd);
        ln_store(96u, base, rstd); ln_store(97u, base, rstd); ln_store(98u, base, rstd); ln_store(99u, base, rstd); ln_store(100u, base, rstd); ln_store(101u, base, rstd); ln_store(102u, base, rstd); ln_store(103u, base, rstd);
        ln_store(104u, base, rstd); ln_store(105u, base, rstd); ln_store(106u, base, rstd); ln_store(107u, base, rstd); ln_store(108u, base, rstd); ln_store(109u, base, rstd); ln_store(110u, base, rstd); ln_store(111u, base, rstd);
        ln_store(112u, base, rstd); ln_store(113u, base, rstd); ln_store(114u, base, rstd); ln_store(115u, base, rstd); ln_store(116u, base, rstd); ln_store(117u, base, rstd); ln_store(118u, base, rstd); ln_store(119u, base, rstd);
        ln_store(120u, base, rstd); ln_store(121u, base, rstd); ln_store(122u, base, rstd); ln_store(123u, base, rstd); ln_store(124u, base, rstd); ln_store(125u, base, rstd); ln_store(126u, base, rstd); ln_store(127u, base, rstd);
    }
}
// END subgroups
