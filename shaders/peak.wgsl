// The adapter's arithmetic ceiling.
//   muladd_peak: (N, 4) → (N, 4). Per element, eight independent chains
//                a_j ← a_j · m + c (a_j starting at x + j, m = 0.5 + 0.25·x, c = x + 1.5:
//                no chain decays into denormals, which are slow on CPUs), 8·steps
//                updates each, then out = a_0 + a_1 + … + a_7 (left to right). A multiply
//                and an add per update and no memory traffic inside the loop: what the
//                adapter's compiler makes of pure arithmetic, the ceiling for every other
//                kernel (docs/lavapipe.md, "The arithmetic ceiling").

struct Params {
    n: u32,
    steps: u32,
    _a: u32,
    _b: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> out: array<vec4<f32>>;

// One update of each chain.
fn update8(a0: ptr<function, vec4<f32>>, a1: ptr<function, vec4<f32>>, a2: ptr<function, vec4<f32>>,
           a3: ptr<function, vec4<f32>>, a4: ptr<function, vec4<f32>>, a5: ptr<function, vec4<f32>>,
           a6: ptr<function, vec4<f32>>, a7: ptr<function, vec4<f32>>, m: vec4<f32>, c: vec4<f32>) {
    *a0 = *a0 * m + c;
    *a1 = *a1 * m + c;
    *a2 = *a2 * m + c;
    *a3 = *a3 * m + c;
    *a4 = *a4 * m + c;
    *a5 = *a5 * m + c;
    *a6 = *a6 * m + c;
    *a7 = *a7 * m + c;
}

@compute @workgroup_size(8)
fn muladd_peak(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    // (invocations past the end compute on the last element and store nothing: an early
    // return would put the loop under a lane mask)
    let idx = (wg.x + wg.y * nwg.x) * 8u + lid;
    let i = min(idx, p.n - 1u);
    let xv = x[i];
    let m = 0.5 + 0.25 * xv;
    let c = xv + 1.5;
    var a0 = xv;
    var a1 = xv + 1.0;
    var a2 = xv + 2.0;
    var a3 = xv + 3.0;
    var a4 = xv + 4.0;
    var a5 = xv + 5.0;
    var a6 = xv + 6.0;
    var a7 = xv + 7.0;
    // (the eight updates written out eight times: a loop-carried value costs a blend with
    // the loop mask per iteration on SIMD-on-CPU adapters, so the loop runs 64 updates)
    for (var s = 0u; s < p.steps; s++) {
        update8(&a0, &a1, &a2, &a3, &a4, &a5, &a6, &a7, m, c);
        update8(&a0, &a1, &a2, &a3, &a4, &a5, &a6, &a7, m, c);
        update8(&a0, &a1, &a2, &a3, &a4, &a5, &a6, &a7, m, c);
        update8(&a0, &a1, &a2, &a3, &a4, &a5, &a6, &a7, m, c);
        update8(&a0, &a1, &a2, &a3, &a4, &a5, &a6, &a7, m, c);
        update8(&a0, &a1, &a2, &a3, &a4, &a5, &a6, &a7, m, c);
        update8(&a0, &a1, &a2, &a3, &a4, &a5, &a6, &a7, m, c);
        update8(&a0, &a1, &a2, &a3, &a4, &a5, &a6, &a7, m, c);
    }
    if (idx < p.n) {
        out[i] = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7;
    }
}
