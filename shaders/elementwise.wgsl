// Element-wise kernels: unary activations and broadcasting binary ops.
// One invocation per element; the linear index spans x and y of the dispatch grid.

struct Params {
    n: u32,        // elements of the output
    b_inner: u32,  // binary: b index = (i / b_inner) % b_len
    b_len: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

const WG: u32 = 64u;

fn index(wg: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wg.x + wg.y * nwg.x) * WG + lid;
}

// erf_, gelu_, silu_, sigmoid_: shaders/lib/activation.wgsl (appended).

@compute @workgroup_size(64)
fn gelu(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = index(wg, nwg, lid);
    if (i < p.n) { out[i] = gelu_(a[i]); }
}

@compute @workgroup_size(64)
fn silu(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = index(wg, nwg, lid);
    if (i < p.n) { out[i] = silu_(a[i]); }
}

@compute @workgroup_size(64)
fn sigmoid(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) lid: u32) {
    let i = index(wg, nwg, lid);
    if (i < p.n) { out[i] = sigmoid_(a[i]); }
}

@compute @workgroup_size(64)
fn relu(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = index(wg, nwg, lid);
    if (i < p.n) { out[i] = max(a[i], 0.0); }
}

// Binary ops read a second operand from binding 3, so the unary entry points share 0..2.
@group(0) @binding(3) var<storage, read> b: array<f32>;

@compute @workgroup_size(64)
fn add(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
       @builtin(local_invocation_index) lid: u32) {
    let i = index(wg, nwg, lid);
    if (i < p.n) { out[i] = a[i] + b[(i / p.b_inner) % p.b_len]; }
}

@compute @workgroup_size(64)
fn mul(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
       @builtin(local_invocation_index) lid: u32) {
    let i = index(wg, nwg, lid);
    if (i < p.n) { out[i] = a[i] * b[(i / p.b_inner) % p.b_len]; }
}

// x + λ ⊙ y with λ a vector along the last axis (LayerScale and the residual add in one pass):
// a = x, b = y, binding 4 = λ; λ index = (i / b_inner) % b_len.
@group(0) @binding(4) var<storage, read> lambda_: array<f32>;

@compute @workgroup_size(64)
fn scale_add(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let i = index(wg, nwg, lid);
    if (i < p.n) { out[i] = fma(lambda_[(i / p.b_inner) % p.b_len], b[i], a[i]); }
}

// f16 storage: halves packed two per u32 (low first), converted with the core builtins.
@group(0) @binding(1) var<storage, read> packed: array<u32>;

@compute @workgroup_size(64)
fn unpack_f16(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let i = index(wg, nwg, lid);
    if (i < p.n) { out[i] = unpack2x16float(packed[i / 2u])[i % 2u]; }
}

@group(0) @binding(2) var<storage, read_write> packed_out: array<u32>;

@compute @workgroup_size(64)
fn pack_f16(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let j = index(wg, nwg, lid); // one output word = elements 2j, 2j + 1
    if (2u * j < p.n) {
        let hi = select(0.0, a[min(2u * j + 1u, p.n - 1u)], 2u * j + 1u < p.n);
        packed_out[j] = pack2x16float(vec2<f32>(a[2u * j], hi));
    }
}
