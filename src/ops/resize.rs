//! Linear resizing, exactly PyTorch's `F.interpolate(mode="trilinear" | "bilinear",
//! align_corners=False, antialias=False)`:
//! `trilinear` resizes `(N, C, D, H, W)` and `bilinear` resizes `(N, C, H, W)` (any
//! number of leading dims). Per axis, with `scale = in/out` when a size is given and
//! `1/factor` when a scale factor is given (PyTorch's rule; for ×2 they agree):
//! `src = max(scale·(o+½) − ½, 0)`, `i0 = ⌊src⌋`, `i1 = min(i0+1, in−1)`, `w1 = src − i0`,
//! `out = x[i0]·(1−w1) + x[i1]·w1`, applied W first, then H, then D.

use super::pool3d::check_u32;
use super::{expect_inputs, numel, Op};
use crate::error::{Error, Result};
use crate::gpu::{Dispatch, GpuContext, KernelArgs};
use crate::shaders::RESIZE;

/// Blocks per workgroup: 64 lanes × 4 blocks each (see `shaders/resize.wgsl`).
const PER_WORKGROUP: u64 = 256;

/// The output of a resize along `A` spatial axes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Target<const A: usize> {
    /// `F.interpolate(size=...)`: the sampling scale is `in/out`.
    Size([usize; A]),
    /// `F.interpolate(scale_factor=...)`: the output is `⌊in·factor⌋` and the sampling
    /// scale is `1/factor`.
    Factor([f64; A]),
}

/// One axis of a resize: input and output sizes and the sampling scale (f32, as PyTorch).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Axis {
    pub n_in: usize,
    pub n_out: usize,
    pub scale: f32,
}

impl<const A: usize> Target<A> {
    fn axes(&self, op: &str, spatial: &[usize]) -> Result<[Axis; A]> {
        let mut axes = [Axis {
            n_in: 0,
            n_out: 0,
            scale: 0.0,
        }; A];
        for (k, ax) in axes.iter_mut().enumerate() {
            let n_in = spatial[k];
            let (n_out, scale) = match self {
                Target::Size(s) => (s[k], n_in as f32 / s[k].max(1) as f32),
                Target::Factor(f) => {
                    if !(f[k].is_finite() && f[k] > 0.0) {
                        return Err(Error::shape(
                            op,
                            format!("scale factors must be positive, got {f:?}"),
                        ));
                    }
                    ((n_in as f64 * f[k]).floor() as usize, (1.0 / f[k]) as f32)
                }
            };
            if n_in == 0 || n_out == 0 {
                return Err(Error::shape(
                    op,
                    format!(
                        "input and output sizes must be positive, got input {spatial:?} \
                         and target {self:?}"
                    ),
                ));
            }
            *ax = Axis { n_in, n_out, scale };
        }
        Ok(axes)
    }
}

/// Checks `inputs` and resolves the axes of an `A`-axis resize: (leading elements, axes).
fn resolve<const A: usize>(
    op: &str,
    target: &Target<A>,
    inputs: &[&[usize]],
) -> Result<(usize, [Axis; A])> {
    expect_inputs(op, inputs, 1)?;
    let x = inputs[0];
    if x.len() < A + 1 {
        return Err(Error::shape(
            op,
            format!(
                "input must have a leading (batch or channel) dim and {A} spatial dims, got {x:?}"
            ),
        ));
    }
    let r = x.len() - A;
    Ok((numel(&x[..r]), target.axes(op, &x[r..])?))
}

fn out_shape<const A: usize>(x: &[usize], axes: &[Axis; A]) -> Vec<usize> {
    let mut s = x[..x.len() - A].to_vec();
    s.extend(axes.iter().map(|a| a.n_out));
    s
}

/// Source taps of every output index along `axis`: (i0, i1, w0, w1), as PyTorch computes
/// them in f32.
pub fn taps(axis: Axis) -> Vec<(usize, usize, f32, f32)> {
    (0..axis.n_out)
        .map(|o| {
            let src = (axis.scale * (o as f32 + 0.5) - 0.5).max(0.0);
            let i0 = (src.floor() as usize).min(axis.n_in - 1);
            let i1 = (i0 + 1).min(axis.n_in - 1);
            let w1 = (src - i0 as f32).clamp(0.0, 1.0);
            (i0, i1, 1.0 - w1, w1)
        })
        .collect()
}

/// CPU reference of trilinear resizing of `lead` volumes `(D, H, W)` along `axes` (D, H, W).
/// Output planes are split across threads.
pub fn trilinear(x: &[f32], lead: usize, axes: [Axis; 3], out: &mut [f32]) {
    let [td, th, tw] = axes.map(taps);
    let [d, h, w] = axes.map(|a| a.n_in);
    let plane = th.len() * tw.len();
    if plane == 0 || td.is_empty() {
        return;
    }
    let out = &mut out[..lead * td.len() * plane];
    crate::ops::par::for_units(out, plane, (1 << 14) / plane + 1, |p0, planes| {
        for (k, op) in planes.chunks_mut(plane).enumerate() {
            let (l, (d0, d1, wd0, wd1)) = ((p0 + k) / td.len(), td[(p0 + k) % td.len()]);
            let mut o = 0;
            for &(h0, h1, wh0, wh1) in &th {
                let row = |dz: usize, hy: usize| &x[((l * d + dz) * h + hy) * w..][..w];
                let rows = [row(d0, h0), row(d0, h1), row(d1, h0), row(d1, h1)];
                for &(w0, w1, ww0, ww1) in &tw {
                    let [a, b, c, e] = rows.map(|r| r[w0] * ww0 + r[w1] * ww1);
                    let v0 = a * wh0 + b * wh1;
                    let v1 = c * wh0 + e * wh1;
                    op[o] = v0 * wd0 + v1 * wd1;
                    o += 1;
                }
            }
        }
    });
}

/// CPU reference of bilinear resizing of `lead` planes `(H, W)` along `axes` (H, W).
/// Planes are split across threads.
pub fn bilinear(x: &[f32], lead: usize, axes: [Axis; 2], out: &mut [f32]) {
    let [th, tw] = axes.map(taps);
    let [h, w] = axes.map(|a| a.n_in);
    let plane = th.len() * tw.len();
    if plane == 0 {
        return;
    }
    let out = &mut out[..lead * plane];
    crate::ops::par::for_units(out, plane, (1 << 14) / plane + 1, |l0, planes| {
        for (k, op) in planes.chunks_mut(plane).enumerate() {
            let l = l0 + k;
            let mut o = 0;
            for &(h0, h1, wh0, wh1) in &th {
                let r0 = &x[(l * h + h0) * w..][..w];
                let r1 = &x[(l * h + h1) * w..][..w];
                for &(w0, w1, ww0, ww1) in &tw {
                    let a = r0[w0] * ww0 + r0[w1] * ww1;
                    let b = r1[w0] * ww0 + r1[w1] * ww1;
                    op[o] = a * wh0 + b * wh1;
                    o += 1;
                }
            }
        }
    });
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    nbw: u32,
    nbh: u32,
    nbd: u32,
    wo: u32,
    ho: u32,
    do_: u32,
    _pad0: u32,
    wi: u32,
    hi: u32,
    di: u32,
    _pad1: u32,
    sw: f32,
    sh: f32,
    sd: f32,
    _pad2: f32,
}

/// Outputs per kernel block along `axis` and inputs the block reads. Two neighbouring
/// outputs are `scale` apart in the input, so with `scale ≤ 0.75` (margin for f32
/// rounding) their taps lie within 3 consecutive inputs. An identity axis (scale 1, so
/// `src = o` exactly and `w1 = 0`) reads one input: the second tap's weight is 0 and the
/// kernel's unread slot holds 0, so the result is the input, as in PyTorch.
fn block(axis: Axis) -> (usize, usize) {
    if axis.n_in == axis.n_out && axis.scale == 1.0 {
        return (1, 1);
    }
    let b = if axis.scale <= 0.75 && axis.n_out >= 2 {
        2
    } else {
        1
    };
    (b, (b + 1).min(axis.n_in))
}

/// Builds the dispatch of `entry` for `lead` volumes with axes (D, H, W).
fn gpu_resize(
    ctx: &GpuContext,
    entry: &'static str,
    lead: usize,
    [d, h, w]: [Axis; 3],
    input: &wgpu::Buffer,
    out: &wgpu::Buffer,
) -> Result<Vec<Dispatch>> {
    check_u32(
        entry,
        lead * (d.n_out * h.n_out * w.n_out).max(d.n_in * h.n_in * w.n_in),
    )?;
    let [(bd, cd), (bh, ch), (bw, cw)] = [d, h, w].map(block);
    let (nbd, nbh, nbw) = (
        d.n_out.div_ceil(bd),
        h.n_out.div_ceil(bh),
        w.n_out.div_ceil(bw),
    );
    let n = lead * nbd * nbh * nbw;
    let p = Params {
        n: n as u32,
        nbw: nbw as u32,
        nbh: nbh as u32,
        nbd: nbd as u32,
        wo: w.n_out as u32,
        ho: h.n_out as u32,
        do_: d.n_out as u32,
        _pad0: 0,
        wi: w.n_in as u32,
        hi: h.n_in as u32,
        di: d.n_in as u32,
        _pad1: 0,
        sw: w.scale,
        sh: h.scale,
        sd: d.scale,
        _pad2: 0.0,
    };
    let constants = [
        ("BW", bw as f64),
        ("BH", bh as f64),
        ("BD", bd as f64),
        ("CW", cw as f64),
        ("CH", ch as f64),
        ("CD", cd as f64),
    ];
    Ok(vec![ctx.dispatch(KernelArgs {
        shader: &RESIZE,
        entry,
        constants: &constants,
        buffers: &[input, out],
        params: bytemuck::bytes_of(&p),
        workgroups: ctx.grid((n as u64).div_ceil(PER_WORKGROUP))?,
    })?])
}

/// Whether `axis` doubles its input with PyTorch's scale 1/2 (`trilinear_up2` applies).
fn is_up2(axis: &Axis) -> bool {
    axis.n_out == 2 * axis.n_in && axis.scale == 0.5
}

/// `trilinear_up2`: `lead` volumes doubled along D, H and W; one invocation per 4 inputs
/// of a row.
fn gpu_up2(
    ctx: &GpuContext,
    lead: usize,
    [d, h, w]: [Axis; 3],
    input: &wgpu::Buffer,
    out: &wgpu::Buffer,
) -> Result<Vec<Dispatch>> {
    let entry = "trilinear_up2";
    check_u32(entry, lead * d.n_out * h.n_out * w.n_out)?;
    let nbw = w.n_in.div_ceil(4);
    let n = lead * d.n_in * h.n_in * nbw;
    check_u32(entry, n)?;
    let p = Params {
        n: n as u32,
        nbw: nbw as u32,
        nbh: h.n_in as u32,
        nbd: d.n_in as u32,
        wo: w.n_out as u32,
        ho: h.n_out as u32,
        do_: d.n_out as u32,
        _pad0: 0,
        wi: w.n_in as u32,
        hi: h.n_in as u32,
        di: d.n_in as u32,
        _pad1: 0,
        sw: w.scale,
        sh: h.scale,
        sd: d.scale,
        _pad2: 0.0,
    };
    Ok(vec![ctx.dispatch(KernelArgs {
        shader: &RESIZE,
        entry,
        constants: &[],
        buffers: &[input, out],
        params: bytemuck::bytes_of(&p),
        workgroups: ctx.grid((n as u64).div_ceil(64))?,
    })?])
}

/// Trilinear resize of the last three axes of `(N, C, D, H, W)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Trilinear {
    pub target: Target<3>,
}

impl Trilinear {
    /// `F.interpolate(size=(d, h, w), mode="trilinear")`.
    pub fn to(size: [usize; 3]) -> Self {
        Trilinear {
            target: Target::Size(size),
        }
    }
    /// `F.interpolate(scale_factor=f, mode="trilinear")` (the UNet's `up` uses 2).
    pub fn by(factor: f64) -> Self {
        Trilinear {
            target: Target::Factor([factor; 3]),
        }
    }
}

impl Op for Trilinear {
    fn name(&self) -> &'static str {
        "trilinear"
    }
    fn output_shape(&self, inputs: &[&[usize]]) -> Result<Vec<usize>> {
        let (_, axes) = resolve(self.name(), &self.target, inputs)?;
        Ok(out_shape(inputs[0], &axes))
    }
    fn cpu(&self, inputs: &[&[f32]], shapes: &[&[usize]], out: &mut [f32]) {
        let (lead, axes) = resolve(self.name(), &self.target, shapes)
            .expect("shapes were checked when the graph was built");
        trilinear(inputs[0], lead, axes, out);
    }
    fn gpu(
        &self,
        ctx: &GpuContext,
        inputs: &[&wgpu::Buffer],
        shapes: &[&[usize]],
        out: &wgpu::Buffer,
    ) -> Result<Vec<Dispatch>> {
        let (lead, axes) = resolve(self.name(), &self.target, shapes)?;
        if axes.iter().all(is_up2) {
            return gpu_up2(ctx, lead, axes, inputs[0], out);
        }
        gpu_resize(ctx, self.name(), lead, axes, inputs[0], out)
    }
    fn flops(&self, shapes: &[&[usize]]) -> u64 {
        // 7 lerps of 3 flops per output.
        self.output_shape(shapes)
            .map(|s| 21 * numel(&s) as u64)
            .unwrap_or(0)
    }
    fn depth_rule(&self, shapes: &[&[usize]]) -> Option<super::DepthRule> {
        // Only a power-of-two factor in depth: 1/f is exact in f32, so every slab samples
        // at exactly the positions of the whole tensor.
        if shapes.len() != 1 || shapes[0].len() < 3 {
            return None;
        }
        // (A fixed target size would not follow the slab's depth.)
        let Target::Factor(f) = self.target else {
            return None;
        };
        let k = f[0].round().max(0.0) as usize;
        let exact = f[0] == k as f64;
        (exact && k >= 2 && k.is_power_of_two())
            .then(|| super::DepthRule::first(1, 1, super::DepthMap::Up { factor: k }))
    }
}

/// Bilinear resize of the last two axes of `(N, C, H, W)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bilinear {
    pub target: Target<2>,
}

impl Bilinear {
    /// `F.interpolate(size=(h, w), mode="bilinear")`.
    pub fn to(size: [usize; 2]) -> Self {
        Bilinear {
            target: Target::Size(size),
        }
    }
    /// `F.interpolate(scale_factor=f, mode="bilinear")`.
    pub fn by(factor: f64) -> Self {
        Bilinear {
            target: Target::Factor([factor; 2]),
        }
    }
}

impl Op for Bilinear {
    fn name(&self) -> &'static str {
        "bilinear"
    }
    fn output_shape(&self, inputs: &[&[usize]]) -> Result<Vec<usize>> {
        let (_, axes) = resolve(self.name(), &self.target, inputs)?;
        Ok(out_shape(inputs[0], &axes))
    }
    fn cpu(&self, inputs: &[&[f32]], shapes: &[&[usize]], out: &mut [f32]) {
        let (lead, axes) = resolve(self.name(), &self.target, shapes)
            .expect("shapes were checked when the graph was built");
        bilinear(inputs[0], lead, axes, out);
    }
    fn gpu(
        &self,
        ctx: &GpuContext,
        inputs: &[&wgpu::Buffer],
        shapes: &[&[usize]],
        out: &wgpu::Buffer,
    ) -> Result<Vec<Dispatch>> {
        let (lead, [h, w]) = resolve(self.name(), &self.target, shapes)?;
        let d = Axis {
            n_in: 1,
            n_out: 1,
            scale: 1.0,
        };
        gpu_resize(ctx, self.name(), lead, [d, h, w], inputs[0], out)
    }
    fn flops(&self, shapes: &[&[usize]]) -> u64 {
        // 3 lerps of 3 flops per output.
        self.output_shape(shapes)
            .map(|s| 9 * numel(&s) as u64)
            .unwrap_or(0)
    }
}

/// Benchmark cases for `cargo bench` (keep this function).
pub fn bench_cases() -> Vec<crate::bench::Case> {
    use crate::bench::Case;
    vec![
        Case::new(
            "trilinear x2 (1,256,16,16,16)",
            Trilinear::by(2.0),
            vec![vec![1, 256, 16, 16, 16]],
        ),
        Case::new(
            "trilinear x2 (1,64,32,32,32)",
            Trilinear::by(2.0),
            vec![vec![1, 64, 32, 32, 32]],
        ),
        Case::new(
            "bilinear 32x32->128x128 (384,1,32,32)",
            Bilinear::to([128, 128]),
            vec![vec![384, 1, 32, 32]],
        ),
        Case::new(
            "trilinear normal axis 512->128 (1,1,512,128,128)",
            Trilinear::to([128, 128, 128]),
            vec![vec![1, 1, 512, 128, 128]],
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::run_cpu;
    use crate::ops::testing::{check_op, random, rel_err, rng};

    fn resize_1d(x: &[f32], n_out: usize) -> Vec<f32> {
        let s = [1, 1, 1, 1, x.len()];
        run_cpu(&Trilinear::to([1, 1, n_out]), &[(x, &s)])
            .unwrap()
            .0
    }

    #[test]
    fn reference_doubles_by_the_quarter_rule() {
        let mut r = rng();
        let n = 7;
        let x = random(&mut r, n);
        let want = |o: usize| -> f32 {
            let k = o / 2;
            if o == 0 {
                x[0]
            } else if o == 2 * n - 1 {
                x[n - 1]
            } else if o.is_multiple_of(2) {
                0.25 * x[k - 1] + 0.75 * x[k]
            } else {
                0.75 * x[k] + 0.25 * x[k + 1]
            }
        };
        let want: Vec<f32> = (0..2 * n).map(want).collect();
        // By size, and by scale factor along each axis in turn.
        let got = resize_1d(&x, 2 * n);
        assert!(rel_err(&got, &want) < 1e-6, "{got:?} vs {want:?}");
        for (shape, axis) in [([n, 1, 1], 0), ([1, n, 1], 1), ([1, 1, n], 2)] {
            let s = [1, 1, shape[0], shape[1], shape[2]];
            let (got, gs) = run_cpu(&Trilinear::by(2.0), &[(&x, &s)]).unwrap();
            assert_eq!(gs[2 + axis], 2 * n);
            assert_eq!(numel(&gs), 8 * n);
            // Size-1 axes double too: the value depends only on the index along `axis`.
            let dims = [gs[2], gs[3], gs[4]];
            for (flat, v) in got.iter().enumerate() {
                let idx = [
                    flat / (dims[1] * dims[2]),
                    flat / dims[2] % dims[1],
                    flat % dims[2],
                ];
                assert!((v - want[idx[axis]]).abs() < 1e-6, "axis {axis} at {idx:?}");
            }
        }
    }

    #[test]
    fn reference_downsamples_512_to_128() {
        let mut r = rng();
        let x = random(&mut r, 512);
        let got = resize_1d(&x, 128);
        let want: Vec<f32> = (0..128)
            .map(|o| 0.5 * (x[4 * o + 1] + x[4 * o + 2]))
            .collect();
        assert!(rel_err(&got, &want) < 1e-6);
        // 32 → 128 (bilinear token resize) has scale 0.25: out[0..2] = x[0], then blends.
        let t = random(&mut r, 32);
        let s = [1, 1, 32];
        let (up, _) = run_cpu(&Bilinear::to([1, 128]), &[(&t, &s)]).unwrap();
        assert_eq!(up[0], t[0]);
        assert_eq!(up[1], t[0]);
        // o = 2: src = 0.25·2.5 − 0.5 = 0.125.
        assert!((up[2] - (0.875 * t[0] + 0.125 * t[1])).abs() < 1e-6);
        assert_eq!(up[127], t[31]);
    }

    #[test]
    fn reference_is_separable() {
        // A trilinear resize equals three 1-D resizes, one per axis.
        let mut r = rng();
        let (d, h, w) = (3, 5, 4);
        let x = random(&mut r, d * h * w);
        let target = [7, 2, 9];
        let (got, _) = run_cpu(&Trilinear::to(target), &[(&x, &[1, d, h, w])]).unwrap();
        let (a, _) = run_cpu(&Trilinear::to([d, h, 9]), &[(&x, &[1, d, h, w])]).unwrap();
        let (b, _) = run_cpu(&Trilinear::to([d, 2, 9]), &[(&a, &[1, d, h, 9])]).unwrap();
        let (c, _) = run_cpu(&Trilinear::to(target), &[(&b, &[1, d, 2, 9])]).unwrap();
        assert!(rel_err(&got, &c) < 1e-6);
        // Bilinear equals trilinear with a size-1 depth.
        let (bl, _) = run_cpu(&Bilinear::to([2, 9]), &[(&x, &[d, h, w])]).unwrap();
        let (tl, _) = run_cpu(&Trilinear::to([1, 2, 9]), &[(&x, &[d, 1, h, w])]).unwrap();
        assert_eq!(bl, tl);
    }

    #[test]
    fn trilinear_kernel_matches_reference() {
        for (shape, target) in [
            (vec![1, 1, 1, 1, 1], Target::Size([1, 1, 1])),
            (vec![1, 1, 1, 1, 1], Target::Size([3, 2, 5])),
            (vec![2, 3, 5, 7, 9], Target::Factor([2.0; 3])),
            (vec![2, 3, 5, 7, 9], Target::Size([3, 14, 4])),
            (vec![1, 3, 64, 65, 3], Target::Size([32, 130, 1])),
            (vec![1, 2, 16, 16, 16], Target::Factor([2.0; 3])),
            (vec![1, 1, 33, 20, 70], Target::Size([8, 20, 17])),
            (vec![4, 1, 3, 2], Target::Factor([1.5, 2.5, 0.75])),
            // Scales 0.75 (blocks of 2), 0.8 (blocks of 1), 5/7; 2 inputs; odd outputs.
            (vec![1, 2, 3, 4, 5], Target::Size([4, 5, 7])),
            (vec![1, 1, 2, 2, 2], Target::Size([5, 5, 5])),
            (vec![1, 2, 16, 16, 16], Target::Size([33, 31, 64])),
            (vec![2, 1, 9, 4, 6], Target::Factor([4.0, 0.5, 3.0])),
            // Identity axes (one input read) beside resized ones.
            (vec![1, 2, 17, 6, 7], Target::Size([4, 6, 7])),
            (vec![1, 1, 5, 6, 7], Target::Factor([1.0, 2.0, 1.0])),
            // Exact ×2 (`trilinear_up2`): sizes 1 and rows that are not whole segments
            // of 4, a size target of twice the input, a single leading dim.
            (vec![1, 1, 1, 1, 1], Target::Factor([2.0; 3])),
            (vec![2, 3, 3, 5, 6], Target::Size([6, 10, 12])),
            (vec![1, 2, 4, 1, 13], Target::Factor([2.0; 3])),
            (vec![3, 7, 2, 11], Target::Factor([2.0; 3])),
        ] {
            check_op(&Trilinear { target }, &[shape], 1e-5);
        }
    }

    /// ×2 takes `trilinear_up2`; the general kernel, which it replaces there, still
    /// matches the reference on ×2 too.
    #[test]
    fn up2_and_general_kernels_match_reference() {
        use crate::ops::testing::{ctx, POISON};
        let c = ctx();
        let mut r = rng();
        for shape in [vec![2, 3, 5, 7, 9], vec![1, 4, 8, 3, 17]] {
            let op = Trilinear::by(2.0);
            let x = random(&mut r, shape.iter().product());
            let (want, out_shape) = run_cpu(&op, &[(&x, &shape)]).unwrap();
            let t = c.upload(&x, &shape).unwrap();
            let out = c.empty(&out_shape).unwrap();
            let (lead, axes) = resolve("trilinear", &op.target, &[&shape]).unwrap();
            let chosen = op.gpu(c, &[&t.buffer], &[&shape], &out.buffer).unwrap();
            assert_eq!(chosen[0].name, "trilinear_up2");
            let general = gpu_resize(c, "trilinear", lead, axes, &t.buffer, &out.buffer).unwrap();
            for disp in [chosen, general] {
                c.fill(&out.buffer, POISON);
                c.run(&disp).unwrap();
                let e = rel_err(&c.download(&out).unwrap(), &want);
                assert!(e <= 1e-5, "{shape:?} {}: {e}", disp[0].name);
            }
        }
    }

    #[test]
    fn bilinear_kernel_matches_reference() {
        for (shape, target) in [
            (vec![1, 1, 1, 1], Target::Size([1, 1])),
            (vec![1, 1, 1, 1], Target::Size([4, 7])),
            (vec![2, 3, 7, 9], Target::Factor([2.0; 2])),
            (vec![3, 1, 32, 32], Target::Size([128, 128])),
            (vec![5, 64, 65], Target::Size([13, 200])),
            (vec![1, 2, 9, 5], Target::Size([9, 1])),
            (vec![2, 2, 2, 3], Target::Size([7, 4])),
            (vec![1, 1, 5, 5], Target::Factor([0.5, 4.0])),
            (vec![2, 1, 5, 6], Target::Size([5, 13])),
        ] {
            check_op(&Bilinear { target }, &[shape], 1e-5);
        }
    }

    #[test]
    fn rejects_bad_shapes() {
        let e = Trilinear::by(2.0).output_shape(&[&[4, 4, 4]]).unwrap_err();
        assert!(e.to_string().contains("trilinear"), "{e}");
        let e = Trilinear::to([0, 2, 2])
            .output_shape(&[&[1, 1, 4, 4, 4]])
            .unwrap_err();
        assert!(e.to_string().contains("trilinear"), "{e}");
        let e = Bilinear::by(0.1)
            .output_shape(&[&[1, 1, 4, 4]])
            .unwrap_err();
        assert!(e.to_string().contains("bilinear"), "{e}");
        let e = Bilinear::by(-1.0)
            .output_shape(&[&[1, 1, 4, 4]])
            .unwrap_err();
        assert!(e.to_string().contains("bilinear"), "{e}");
        let e = Bilinear::to([2, 2])
            .output_shape(&[&[1, 4, 4], &[1]])
            .unwrap_err();
        assert!(e.to_string().contains("bilinear"), "{e}");
        assert_eq!(
            Trilinear::by(2.0)
                .output_shape(&[&[1, 8, 3, 4, 5]])
                .unwrap(),
            vec![1, 8, 6, 8, 10]
        );
    }
}
