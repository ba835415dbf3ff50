// Token layout kernels of the ViT.
//   patchify:       (B, C, H, W) → (B, gh·gw, C·ps·ps), patches row-major, each patch in
//                   (c, ky, kx) order — the flattening of a Conv2d(k = s = ps) weight.
//   prepend_tokens: (B, P, D) with a shared (Tp, D) prefix → (B, Tp + P, D).

struct Params {
    n: u32,
    c: u32, h: u32, w: u32,   // patchify input; prepend: c = Tp, h = P, w = D
    ps: u32, gh: u32, gw: u32,
    _p: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<storage, read> prefix: array<f32>;

fn linear(wg: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wg.x + wg.y * nwg.x) * 64u + lid;
}

@compute @workgroup_size(64)
fn patchify(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let i = linear(wg, nwg, lid);
    if (i >= p.n) { return; }
    let kk = p.ps * p.ps;
    let row = p.c * kk;
    let e = i % row;
    let pt = (i / row) % (p.gh * p.gw);
    let b = i / (row * p.gh * p.gw);
    let ch = e / kk;
    let ky = (e % kk) / p.ps;
    let kx = e % p.ps;
    let y = (pt / p.gw) * p.ps + ky;
    let xx = (pt % p.gw) * p.ps + kx;
    out[i] = x[((b * p.c + ch) * p.h + y) * p.w + xx];
}

@compute @workgroup_size(64)
fn prepend_tokens(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    let i = linear(wg, nwg, lid);
    if (i >= p.n) { return; }
    let d = p.w;
    let t = (i / d) % (p.c + p.h);
    let b = i / (d * (p.c + p.h));
    let e = i % d;
    if (t < p.c) {
        out[i] = prefix[t * d + e];
    } else {
        out[i] = x[(b * p.h + (t - p.c)) * d + e];
    }
}
