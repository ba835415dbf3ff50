// ContextAttentionFusion's last step, fused:
//   out[n, o, v] = raw[n, o, v] + (Σ_c W[o, c]·raw[n, c, v] + b[o]) · σ(gate[n, o, v])
// i.e. the 1×1×1 raw projection, the sigmoid gate and the residual in one pass, so the
// projection never goes to memory. One invocation = one voxel × 4 output channels.
//
// The channel count is the pipeline constant C, not a uniform: lavapipe (Mesa 22.3)
// "inlines" uniforms that bound loops by recompiling the shader with their values at every
// dispatch, and never frees the variants: with `p.c` as the loop bound each dispatch cost
// ~40 ms of LLVM compilation and leaked ~0.5 MB (docs/lavapipe.md).

// Channels; always set by ContextGate::gpu (the default only lets the shader translate
// without constants, tests/portability.rs).
override C: u32 = 4u;

struct Params {
    c: u32,       // channels (unused by the kernels: they read C)
    s: u32,       // voxels per channel
    n: u32,       // batch
    oblocks: u32, // ceil(c / 4)
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> raw: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read> b: array<f32>;
@group(0) @binding(4) var<storage, read> gate: array<f32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;

// Σ_c W[o, c]·raw[n, c, v] for the 4 output channels o0..o0+3 (clamped to the last
// channel) of voxel v; base = n·c·s.
fn project(base: u32, o0: u32, v: u32) -> vec4<f32> {
    var acc = vec4<f32>(0.0);
    for (var c = 0u; c < C; c++) {
        let r = raw[base + c * p.s + v];
        let wr = vec4<f32>(w[min(o0, C - 1u) * C + c], w[min(o0 + 1u, C - 1u) * C + c],
                           w[min(o0 + 2u, C - 1u) * C + c], w[min(o0 + 3u, C - 1u) * C + c]);
        acc += wr * r;
    }
    return acc;
}

@compute @workgroup_size(64)
fn context_gate(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(workgroup_id) wg: vec3<u32>) {
    let v = gid.x;
    let ob = wg.y % p.oblocks;
    let n = wg.y / p.oblocks;
    if (v >= p.s) { return; }
    let base = n * C * p.s;
    let o0 = ob * 4u;
    let acc = project(base, o0, v);
    for (var j = 0u; j < 4u; j++) {
        let o = o0 + j;
        if (o < C) {
            let i = base + o * p.s + v;
            out[i] = raw[i] + (acc[j] + b[o]) / (1.0 + exp(-gate[i]));
        }
    }
}

// The same in two passes, for devices with fewer than 5 storage buffers per shader stage
// (downlevel limits allow 4): context_gate_proj writes the projection Σ W·raw + b to out,
// context_gate_apply turns it into raw + out · σ(gate) in place.
@compute @workgroup_size(64)
fn context_gate_proj(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(workgroup_id) wg: vec3<u32>) {
    let v = gid.x;
    let ob = wg.y % p.oblocks;
    let n = wg.y / p.oblocks;
    if (v >= p.s) { return; }
    let base = n * C * p.s;
    let o0 = ob * 4u;
    let acc = project(base, o0, v);
    for (var j = 0u; j < 4u; j++) {
        let o = o0 + j;
        if (o < C) { out[base + o * p.s + v] = acc[j] + b[o]; }
    }
}

@compute @workgroup_size(64)
fn context_gate_apply(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(workgroup_id) wg: vec3<u32>) {
    let v = gid.x;
    let ob = wg.y % p.oblocks;
    let n = wg.y / p.oblocks;
    if (v >= p.s) { return; }
    let base = n * C * p.s;
    for (var j = 0u; j < 4u; j++) {
        let o = ob * 4u + j;
        if (o < C) {
            let i = base + o * p.s + v;
            out[i] = raw[i] + out[i] / (1.0 + exp(-gate[i]));
        }
    }
}
