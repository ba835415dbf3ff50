//! Host-side steps of dinov3_playground's 3D feature extraction (shared/reference/
//! dinov3_playground.md §d, steps 1–5), each a small function with the exact arithmetic of
//! `tools/reference_features.py`:
//!
//! | step | function | numerics |
//! |---|---|---|
//! | 1 | [`needs_normal_downsample`] | `n_in / n_out > 2.0` in f64, strictly |
//! | 1 | [`downsample_taps`], [`lerp_fma`], [`downsample_normal`] | PyTorch's CPU trilinear along one axis: f32 taps, `fma(l0, x0, l1·x1)`, truncating cast back |
//! | 2 | [`pick_slice_indices`] | `np.linspace(0, n−1, n_out, dtype=int)`: two f64 roundings, last index `n−1` |
//! | 4 | [`resize_slice`] | `skimage.transform.resize(preserve_range, anti_aliasing, order 1, reflect)` then `.astype`: [`gaussian_kernel_1d`] (numpy's [`pairwise_sum`]), [`gaussian_filter_axis`] (scipy's symmetric correlate, mirror edges), [`zoom_axis_coefficients`] + [`zoom_linear_mirror`] (scipy's order-1 zoom), clip, truncation |
//! | 5 | [`quantize_slice`] | `((x−min)/(max−min+1e-8)·255).astype(uint8)`: f64 for integer slices, f32 for f32 slices |
//! | 5 | [`preprocess_pixels`] | `f32(q)·f32(1/255)`, then `(x − mean_c) / std_c`, grey replicated to 3 channels |
//!
//! All of them are bit-exact with the reference (the unit tests below check them against
//! `tests/fixtures/features_steps`). They run on the host: they touch each voxel once or
//! twice, need f64 (which WGSL does not have) and integer truncation rules that a shader
//! would have to emulate, so a GPU port would gain nothing on a 2-core machine's lavapipe.

/// An element type of a volume: uint8, uint16 or float32 (the dtypes dinov3_playground's
/// extraction sees).
pub trait Sample: Copy + PartialOrd + Default + Send + Sync + std::fmt::Debug + 'static {
    /// Integer dtypes work in f64 in skimage and the quantisation; f32 stays f32.
    const INTEGER: bool;
    /// The NumPy name of the dtype.
    const NAME: &'static str;
    fn to_f32(self) -> f32;
    fn to_f64(self) -> f64;
    /// `float32.astype(Self)`: truncation toward zero (values are always in range here).
    fn from_f32(v: f32) -> Self;
    /// `float64.astype(Self)`: truncation toward zero for integers, rounding for f32.
    fn from_f64(v: f64) -> Self;
}

impl Sample for u8 {
    const INTEGER: bool = true;
    const NAME: &'static str = "uint8";
    fn to_f32(self) -> f32 {
        self as f32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f32(v: f32) -> Self {
        v as u8
    }
    fn from_f64(v: f64) -> Self {
        v as u8
    }
}

impl Sample for u16 {
    const INTEGER: bool = true;
    const NAME: &'static str = "uint16";
    fn to_f32(self) -> f32 {
        self as f32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f32(v: f32) -> Self {
        v as u16
    }
    fn from_f64(v: f64) -> Self {
        v as u16
    }
}

impl Sample for f32 {
    const INTEGER: bool = false;
    const NAME: &'static str = "float32";
    fn to_f32(self) -> f32 {
        self
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f32(v: f32) -> Self {
        v
    }
    fn from_f64(v: f64) -> Self {
        v as f32
    }
}

// ---------------------------------------------------------------------------------------------
// Step 1: downsample along the normal axis
// ---------------------------------------------------------------------------------------------

/// Whether the normal axis is downsampled before slicing: `n_in / n_out > 2.0` in f64,
/// strictly (a ratio of exactly 2 is not; n_in < n_out never is).
pub fn needs_normal_downsample(n_in: usize, n_out: usize) -> bool {
    n_out > 0 && n_in as f64 / n_out as f64 > 2.0
}

/// The two source samples of one output of a linear resize along one axis and their weights.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tap {
    pub i0: usize,
    pub i1: usize,
    pub l0: f32,
    pub l1: f32,
}

/// Taps of PyTorch's CPU `upsample_trilinear3d` (align_corners=False, no antialias) along
/// one axis, in f32: `scale = f32(n_in)/f32(n_out)`, `src = max(scale·(o+½) − ½, 0)`,
/// `i0 = ⌊src⌋`, `i1 = min(i0+1, n_in−1)`, `l1 = src − i0`, `l0 = 1 − l1`.
pub fn downsample_taps(n_in: usize, n_out: usize) -> Vec<Tap> {
    let scale = n_in as f32 / n_out.max(1) as f32;
    (0..n_out)
        .map(|o| {
            let src = (scale * (o as f32 + 0.5) - 0.5).max(0.0);
            let i0 = (src as usize).min(n_in.saturating_sub(1));
            let i1 = (i0 + 1).min(n_in.saturating_sub(1));
            let l1 = (src - i0 as f32).clamp(0.0, 1.0);
            Tap {
                i0,
                i1,
                l0: 1.0 - l1,
                l1,
            }
        })
        .collect()
}

/// One output of the normal-axis downsample, as torch 2.15's AVX2 CPU kernel computes it:
/// `fma(l0, x0, l1·x1)` (the `l1` product rounded first, the `l0` product fused).
#[inline]
pub fn lerp_fma(t: Tap, x0: f32, x1: f32) -> f32 {
    t.l0.mul_add(x0, t.l1 * x1)
}

/// The f32 values of `F.interpolate(float32(volume), size, trilinear)` with only `axis`
/// (0, 1 or 2 of the (D, H, W) `shape`) resized to `n_out`, before the cast back.
pub fn downsample_normal_f32<T: Sample>(
    data: &[T],
    shape: [usize; 3],
    axis: usize,
    n_out: usize,
) -> Vec<f32> {
    let taps = downsample_taps(shape[axis], n_out);
    let mut out_shape = shape;
    out_shape[axis] = n_out;
    let [d, h, w] = out_shape;
    let mut out = Vec::with_capacity(d * h * w);
    let at = |z: usize, y: usize, x: usize| data[(z * shape[1] + y) * shape[2] + x].to_f32();
    for z in 0..d {
        for y in 0..h {
            for x in 0..w {
                let v = match axis {
                    0 => {
                        let t = taps[z];
                        lerp_fma(t, at(t.i0, y, x), at(t.i1, y, x))
                    }
                    1 => {
                        let t = taps[y];
                        lerp_fma(t, at(z, t.i0, x), at(z, t.i1, x))
                    }
                    _ => {
                        let t = taps[x];
                        lerp_fma(t, at(z, y, t.i0), at(z, y, t.i1))
                    }
                };
                out.push(v);
            }
        }
    }
    out
}

/// Step 1 of the reference: the volume resized along `axis` to `n_out` samples, then
/// `.astype(dtype)` (truncating for integers). The extraction itself computes the same
/// values slice by slice (see `planes`), so the downsampled volume is never stored.
pub fn downsample_normal<T: Sample>(
    data: &[T],
    shape: [usize; 3],
    axis: usize,
    n_out: usize,
) -> Vec<T> {
    downsample_normal_f32(data, shape, axis, n_out)
        .into_iter()
        .map(T::from_f32)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Step 2: pick the slices
// ---------------------------------------------------------------------------------------------

/// `np.linspace(0, n−1, n_out, dtype=int)` exactly as NumPy 2 computes it: `step =
/// f64(n−1)/f64(n_out−1)`, `idx[i] = ⌊f64(i)·step⌋`, the last index `n−1`; `n_out == 1`
/// gives `[0]` and `n == 1` all zeros. Not the exact-integer floor (n 3, n_out 99, i 49 → 0).
pub fn pick_slice_indices(n: usize, n_out: usize) -> Vec<usize> {
    if n_out == 0 {
        return Vec::new();
    }
    if n_out == 1 || n <= 1 {
        return vec![0; n_out];
    }
    let step = (n - 1) as f64 / (n_out - 1) as f64;
    let mut idx: Vec<usize> = (0..n_out)
        .map(|i| ((i as f64 * step).floor() as usize).min(n - 1))
        .collect();
    idx[n_out - 1] = n - 1;
    idx
}

// ---------------------------------------------------------------------------------------------
// Step 4: skimage.transform.resize
// ---------------------------------------------------------------------------------------------

/// NumPy's pairwise summation of f64 (`np.sum` of a contiguous array): fewer than 8 terms
/// left to right; up to 128 terms eight interleaved partial sums combined
/// `((p0+p1)+(p2+p3))+((p4+p5)+(p6+p7))`, then the rest left to right; above that, two
/// halves (the first a multiple of 8) summed recursively.
pub fn pairwise_sum(a: &[f64]) -> f64 {
    let n = a.len();
    if n < 8 {
        let mut res = 0.0;
        for v in a {
            res += v;
        }
        res
    } else if n <= 128 {
        let mut r = [0f64; 8];
        r.copy_from_slice(&a[..8]);
        let mut i = 8;
        while i < n - n % 8 {
            for j in 0..8 {
                r[j] += a[i + j];
            }
            i += 8;
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        while i < n {
            res += a[i];
            i += 1;
        }
        res
    } else {
        let mut n2 = n / 2;
        n2 -= n2 % 8;
        pairwise_sum(&a[..n2]) + pairwise_sum(&a[n2..])
    }
}

/// scipy.ndimage's Gaussian kernel (truncate 4): radius `int(4σ + ½)`, weights
/// `exp((−½/(σ·σ))·x²)` for x = −r..r, divided by their NumPy [`pairwise_sum`].
pub fn gaussian_kernel_1d(sigma: f64) -> Vec<f64> {
    let sigma2 = sigma * sigma;
    let radius = (4.0 * sigma + 0.5) as i64;
    let coef = -0.5 / sigma2;
    let phi: Vec<f64> = (-radius..=radius)
        .map(|x| (coef * (x * x) as f64).exp())
        .collect();
    let sum = pairwise_sum(&phi);
    phi.iter().map(|p| p / sum).collect()
}

/// scipy.ndimage's 'mirror' boundary (skimage 'reflect'): `x[−1] = x[1]`, period 2n−2;
/// n ≤ 1 maps everything to 0.
pub fn mirror_index(i: isize, n: usize) -> usize {
    if n <= 1 {
        return 0;
    }
    let n = n as isize;
    let s2 = 2 * n - 2;
    let mut i = i;
    if i < 0 {
        i += s2 * (-i / s2);
        i = if i <= 1 - n { i + s2 } else { -i };
    } else if i >= n {
        i -= s2 * (i / s2);
        if i >= n {
            i = s2 - i;
        }
    }
    i as usize
}

/// Rounds to f32 when the working dtype is f32 (skimage keeps f32 images in f32 and scipy
/// stores every pass in the image's dtype); identity for f64.
fn store(v: f64, f32_storage: bool) -> f64 {
    if f32_storage {
        v as f32 as f64
    } else {
        v
    }
}

/// `scipy.ndimage.gaussian_filter1d(img, sigma, axis, mode='mirror')` on a (rows, cols)
/// image: per output `acc = x[i]·w0`, then `acc += (x[i−k] + x[i+k])·w[k]` for k = r..1
/// (outermost pair first, no FMA), in f64; stored in f32 when `f32_storage`.
pub fn gaussian_filter_axis(
    img: &[f64],
    shape: [usize; 2],
    sigma: f64,
    axis: usize,
    f32_storage: bool,
) -> Vec<f64> {
    let w = gaussian_kernel_1d(sigma);
    let r = (w.len() - 1) / 2;
    let [rows, cols] = shape;
    let (n, lines) = if axis == 0 {
        (rows, cols)
    } else {
        (cols, rows)
    };
    // Element k of line l.
    let idx = |l: usize, k: usize| {
        if axis == 0 {
            k * cols + l
        } else {
            l * cols + k
        }
    };
    let ext_idx: Vec<usize> = (-(r as isize)..(n + r) as isize)
        .map(|j| mirror_index(j, n))
        .collect();
    let mut out = vec![0f64; img.len()];
    let mut line = vec![0f64; n + 2 * r];
    for l in 0..lines {
        for (e, &j) in line.iter_mut().zip(&ext_idx) {
            *e = img[idx(l, j)];
        }
        for i in 0..n {
            let c = i + r;
            let mut acc = line[c] * w[r];
            for k in (1..=r).rev() {
                acc += (line[c - k] + line[c + k]) * w[r + k];
            }
            out[idx(l, i)] = store(acc, f32_storage);
        }
    }
    out
}

/// One output sample of scipy's order-1 zoom along an axis: samples `i0`, `i1` (already
/// mirrored) with weights `w0`, `w1`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ZoomTap {
    pub i0: usize,
    pub i1: usize,
    pub w0: f64,
    pub w1: f64,
}

/// scipy's `NI_ZoomShift` coefficients (order 1, mode 'mirror', grid_mode=True), f64:
/// `c = ((o + ½)·zoom) − ½` with `zoom = in/out`; `c < 0 → −c`; `c ≥ n → 2n−2−c`, but
/// `n−1 < c < n` is left as is (it interpolates `x[n−1]` and the mirrored `x[n−2]`);
/// `w0 = 1 − (c − ⌊c⌋)`, `w1 = 1 − w0`.
pub fn zoom_axis_coefficients(n_in: usize, n_out: usize) -> Vec<ZoomTap> {
    let zoom = n_in as f64 / n_out as f64;
    let n = n_in as f64;
    let s2 = 2.0 * n - 2.0;
    (0..n_out)
        .map(|o| {
            let mut c = o as f64;
            c += 0.5;
            c *= zoom;
            c -= 0.5;
            if n_in <= 1 {
                c = 0.0;
            } else if c < 0.0 {
                c += s2 * (-c / s2).trunc();
                c = if c <= 1.0 - n { c + s2 } else { -c };
            } else if c > n - 1.0 {
                c -= s2 * (c / s2).trunc();
                if c >= n {
                    c = s2 - c;
                }
            }
            let start = c.floor();
            let w0 = 1.0 - (c - start);
            let w1 = 1.0 - w0;
            let start = start as isize;
            ZoomTap {
                i0: mirror_index(start, n_in),
                i1: mirror_index(start + 1, n_in),
                w0,
                w1,
            }
        })
        .collect()
}

/// 2-D `scipy.ndimage.zoom(img, order=1, mode='mirror', grid_mode=True)`: per output,
/// `t = 0; t += (x[r0,c0]·a0)·b0; t += (x[r0,c1]·a0)·b1; t += (x[r1,c0]·a1)·b0;
/// t += (x[r1,c1]·a1)·b1` in f64, stored in f32 when `f32_storage`.
pub fn zoom_linear_mirror(
    img: &[f64],
    shape: [usize; 2],
    out_shape: [usize; 2],
    f32_storage: bool,
) -> Vec<f64> {
    let rt = zoom_axis_coefficients(shape[0], out_shape[0]);
    let ct = zoom_axis_coefficients(shape[1], out_shape[1]);
    let cols = shape[1];
    let mut out = Vec::with_capacity(out_shape[0] * out_shape[1]);
    for r in &rt {
        let x0 = &img[r.i0 * cols..][..cols];
        let x1 = &img[r.i1 * cols..][..cols];
        for c in &ct {
            let mut t = 0.0;
            t += (x0[c.i0] * r.w0) * c.w0;
            t += (x0[c.i1] * r.w0) * c.w1;
            t += (x1[c.i0] * r.w1) * c.w0;
            t += (x1[c.i1] * r.w1) * c.w1;
            out.push(store(t, f32_storage));
        }
    }
    out
}

/// `skimage.transform.resize(sl, out_shape, preserve_range=True, anti_aliasing=True)`
/// before the cast back: working dtype f64 for integers, f32 (each pass rounded) for f32;
/// per axis `σ = max(0, (in/out − 1)/2)`, axes with σ ≤ 1e-15 skipped, axis 0 then 1; the
/// order-1 zoom; clipped to the slice's [min, max]. Always resizes (even to the same shape).
pub fn resize_slice_values<T: Sample>(
    sl: &[T],
    shape: [usize; 2],
    out_shape: [usize; 2],
) -> Vec<f64> {
    let f32_storage = !T::INTEGER;
    let mut img: Vec<f64> = sl.iter().map(|v| v.to_f64()).collect();
    let (lo, hi) = img
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    for axis in 0..2 {
        let factor = shape[axis] as f64 / out_shape[axis] as f64;
        let sigma = ((factor - 1.0) / 2.0).max(0.0);
        if sigma > 1e-15 {
            img = gaussian_filter_axis(&img, shape, sigma, axis, f32_storage);
        }
    }
    let mut out = if shape == out_shape {
        img
    } else {
        zoom_linear_mirror(&img, shape, out_shape, f32_storage)
    };
    for v in &mut out {
        *v = v.clamp(lo, hi);
    }
    out
}

/// Step 4: the slice resized to `out_shape` and cast back to its dtype (truncating for
/// integers), or returned unchanged when it already has that shape (as the reference only
/// resizes slices that are not S×S).
pub fn resize_slice<T: Sample>(sl: &[T], shape: [usize; 2], out_shape: [usize; 2]) -> Vec<T> {
    if shape == out_shape {
        return sl.to_vec();
    }
    resize_slice_values(sl, shape, out_shape)
        .into_iter()
        .map(T::from_f64)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Step 5: quantise, grey → RGB, the processor
// ---------------------------------------------------------------------------------------------

/// `((sl − min) / (max − min + 1e-8) · 255).astype(uint8)` with NumPy 2 promotion: f64 for
/// integer slices (the maximum maps to 254), f32 for f32 slices (the 1e-8 vanishes once
/// max − min > ~0.2 and the maximum maps to 255); truncation; a constant slice gives 0.
pub fn quantize_slice<T: Sample>(sl: &[T]) -> Vec<u8> {
    if sl.is_empty() {
        return Vec::new();
    }
    let (lo, hi) = sl.iter().fold((sl[0], sl[0]), |(lo, hi), &v| {
        (if v < lo { v } else { lo }, if v > hi { v } else { hi })
    });
    if T::INTEGER {
        let lo = lo.to_f64();
        let den = (hi.to_f64() - lo) + 1e-8;
        sl.iter()
            .map(|v| ((v.to_f64() - lo) / den * 255.0) as u8)
            .collect()
    } else {
        let lo = lo.to_f32();
        let den = (hi.to_f32() - lo) + 1e-8f32;
        sl.iter()
            .map(|v| ((v.to_f32() - lo) / den * 255.0f32) as u8)
            .collect()
    }
}

/// The HF `DINOv3ViTImageProcessor` on one grey slice (its resize is a no-op at S×S):
/// appends the (3, S, S) channels `(f32(q)·f32(1/255) − mean_c) / std_c` to `out`, the
/// grey value replicated into R, G and B.
pub fn preprocess_pixels(q: &[u8], mean: [f32; 3], std: [f32; 3], out: &mut Vec<f32>) {
    let rescale = (1.0f64 / 255.0) as f32;
    out.reserve(3 * q.len());
    for c in 0..3 {
        out.extend(q.iter().map(|&v| (v as f32 * rescale - mean[c]) / std[c]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::npy::{self, Npy, NpyData};
    use serde_json::Value;
    use std::path::PathBuf;

    fn steps(path: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/features_steps")
            .join(path)
    }

    fn json(path: &str) -> Value {
        let text = std::fs::read_to_string(steps(path)).expect("fixture json");
        serde_json::from_str(&text).expect("valid json")
    }

    fn read(path: &str) -> Npy {
        npy::read(&steps(path)).expect("fixture npy")
    }

    fn usizes(v: &Value) -> Vec<usize> {
        v.as_array()
            .expect("array")
            .iter()
            .map(|x| x.as_u64().expect("integer") as usize)
            .collect()
    }

    #[test]
    fn linspace_matches_numpy_exactly() {
        let cases = json("linspace_cases.json");
        let mut n_cases = 0;
        for c in cases["cases"].as_array().expect("cases") {
            let (n, n_out) = (
                c["n"].as_u64().expect("n") as usize,
                c["n_out"].as_u64().expect("n_out") as usize,
            );
            let want = usizes(&c["indices"]);
            assert_eq!(pick_slice_indices(n, n_out), want, "n {n} n_out {n_out}");
            assert_eq!(
                needs_normal_downsample(n, n_out),
                c["downsample_first"].as_bool().expect("bool"),
                "n {n} n_out {n_out}"
            );
            n_cases += 1;
        }
        assert!(n_cases >= 13);
        // The documented trap: the exact-integer floor would give 1.
        assert_eq!(pick_slice_indices(3, 99)[49], 0);
        assert!(!needs_normal_downsample(64, 32));
        assert!(needs_normal_downsample(65, 32));
    }

    fn check_downsample<T: Sample + PartialEq>(
        input: &[T],
        shape: [usize; 3],
        axis: usize,
        n_out: usize,
        before: &[f32],
        want: &[T],
        name: &str,
    ) {
        let f = downsample_normal_f32(input, shape, axis, n_out);
        assert_eq!(f.len(), before.len(), "{name}");
        for (i, (g, w)) in f.iter().zip(before).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "{name}: before-cast value {i}");
        }
        assert_eq!(downsample_normal(input, shape, axis, n_out), want, "{name}");
    }

    #[test]
    fn normal_downsample_is_bit_exact() {
        let cases = json("downsample_cases.json");
        for c in cases["cases"].as_array().expect("cases") {
            let name = c["name"].as_str().expect("name");
            let file = |k: &str| format!("downsample_cases/{}", c[k].as_str().expect("file"));
            let (x, before, want) = (
                read(&file("input")),
                read(&file("before_cast")),
                read(&file("output")),
            );
            let shape: [usize; 3] = x.shape[..].try_into().expect("3-D");
            let axis = c["axis"].as_u64().expect("axis") as usize;
            let n_out = c["n_out"].as_u64().expect("n_out") as usize;
            let before = before.to_f32();
            match (&x.data, &want.data) {
                (NpyData::U8(a), NpyData::U8(b)) => {
                    check_downsample(a, shape, axis, n_out, &before, b, name)
                }
                (NpyData::U16(a), NpyData::U16(b)) => {
                    check_downsample(a, shape, axis, n_out, &before, b, name)
                }
                (NpyData::F32(a), NpyData::F32(b)) => {
                    check_downsample(a, shape, axis, n_out, &before, b, name)
                }
                _ => panic!("{name}: unexpected dtypes"),
            }
        }
    }

    #[test]
    fn gaussian_weights_match_scipy_bit_for_bit() {
        // serde_json's default float parsing is not correctly rounded (1 ulp off at times),
        // so the numbers are read from the text with Rust's exact `str::parse`.
        let text = std::fs::read_to_string(steps("resize_cases.json")).expect("fixture");
        let number = |s: &str| -> f64 {
            let end = s
                .find(|ch: char| !(ch.is_ascii_digit() || "+-.eE".contains(ch)))
                .unwrap_or(s.len());
            s[..end].parse().expect("a number")
        };
        let mut checked = 0;
        for axis in text.split("\"sigma\":").skip(1) {
            let sigma = number(axis.trim_start());
            let Some(at) = axis.find("\"gaussian_weights\": [") else {
                continue;
            };
            let list = &axis[at + "\"gaussian_weights\": [".len()..];
            let list = &list[..list.find(']').expect("closing bracket")];
            let want: Vec<f64> = list.split(',').map(|v| number(v.trim())).collect();
            let got = gaussian_kernel_1d(sigma);
            assert_eq!(got.len(), want.len(), "sigma {sigma}");
            for (g, w) in got.iter().zip(&want) {
                assert_eq!(
                    g.to_bits(),
                    w.to_bits(),
                    "sigma {sigma}: {got:?} vs {want:?}"
                );
            }
            checked += 1;
        }
        assert!(checked >= 5, "{checked} kernels checked");
        eprintln!("{checked} Gaussian kernels bit-exact");
    }

    #[test]
    fn pairwise_sum_follows_numpy_blocks() {
        // 1e16 + 1 + 1 ... : left to right loses the ones, blocks keep some.
        let mut a = vec![1.0; 20];
        a[0] = 1e16;
        // Partial sums p0 = 1e16 + 1 (rounds back to 1e16), p1..p7 = 2, then 4 left over.
        let p0 = 1e16f64 + 1.0;
        let blocks = ((p0 + 2.0) + (2.0 + 2.0)) + ((2.0 + 2.0) + (2.0 + 2.0));
        let want = (((blocks + 1.0) + 1.0) + 1.0) + 1.0;
        assert_eq!(pairwise_sum(&a), want);
        assert_eq!(pairwise_sum(&[1.0, 2.0, 3.0]), 6.0);
        let big: Vec<f64> = (0..300).map(|i| i as f64 * 0.1).collect();
        let n2 = 144; // 150 rounded down to a multiple of 8
        assert_eq!(
            pairwise_sum(&big),
            pairwise_sum(&big[..n2]) + pairwise_sum(&big[n2..])
        );
    }

    #[test]
    fn mirror_follows_scipy() {
        let n = 4;
        let got: Vec<usize> = (-4..9).map(|i| mirror_index(i, n)).collect();
        assert_eq!(got, vec![2, 3, 2, 1, 0, 1, 2, 3, 2, 1, 0, 1, 2]);
        assert_eq!(mirror_index(-3, 1), 0);
    }

    fn check_resize<T: Sample + PartialEq>(
        x: &[T],
        shape: [usize; 2],
        out_shape: [usize; 2],
        before: Option<&[f64]>,
        want: &[T],
        name: &str,
    ) -> usize {
        let values = resize_slice_values(x, shape, out_shape);
        if let Some(before) = before {
            assert_eq!(values.len(), before.len(), "{name}");
            for (i, (g, w)) in values.iter().zip(before).enumerate() {
                assert_eq!(g.to_bits(), w.to_bits(), "{name}: value {i}: {g} vs {w}");
            }
        }
        let got = resize_slice(x, shape, out_shape);
        let bad = got.iter().zip(want).filter(|(g, w)| g != w).count();
        assert_eq!(bad, 0, "{name}: {bad} outputs differ");
        // How many outputs the truncating cast moved to value − 1.
        values
            .iter()
            .zip(&got)
            .filter(|(v, g)| T::INTEGER && (**v - g.to_f64()) > 0.999)
            .count()
    }

    #[test]
    fn skimage_resize_is_bit_exact() {
        let cases = json("resize_cases.json");
        let mut n = 0;
        let mut truncated = 0;
        for c in cases["cases"].as_array().expect("cases") {
            let name = c["name"].as_str().expect("name");
            let file = |k: &str| {
                c.get(k)
                    .and_then(|v| v.as_str())
                    .map(|f| read(&format!("resize_cases/{f}")))
            };
            let x = file("input").expect("input");
            let want = file("output").expect("output");
            let before: Option<Vec<f64>> = file("before_cast").map(|b| match b.data {
                NpyData::F64(v) => v,
                _ => panic!("{name}: before_cast must be float64"),
            });
            let shape: [usize; 2] = x.shape[..].try_into().expect("2-D");
            let out_shape: [usize; 2] = usizes(&c["out_shape"])[..].try_into().expect("2-D");
            truncated += match (&x.data, &want.data) {
                (NpyData::U8(a), NpyData::U8(b)) => {
                    check_resize(a, shape, out_shape, before.as_deref(), b, name)
                }
                (NpyData::U16(a), NpyData::U16(b)) => {
                    check_resize(a, shape, out_shape, before.as_deref(), b, name)
                }
                (NpyData::F32(a), NpyData::F32(b)) => {
                    check_resize(a, shape, out_shape, before.as_deref(), b, name)
                }
                _ => panic!("{name}: unexpected dtypes"),
            };
            n += 1;
        }
        assert_eq!(n, 9);
        eprintln!("resize: {n} cases bit-exact, {truncated} values truncated to integer − 1");
    }

    #[test]
    fn quantisation_follows_numpy_promotion() {
        // Integer input: f64, the maximum maps to 254, full range x → x − 1.
        let full: Vec<u8> = (0..=255).collect();
        let q = quantize_slice(&full);
        assert_eq!(q[0], 0);
        assert!(q[1..].iter().zip(&full[1..]).all(|(q, x)| *q == x - 1));
        // float32 input: the 1e-8 vanishes, the maximum maps to 255.
        let f = [-3.0f32, 0.5, 6.0];
        assert_eq!(quantize_slice(&f), vec![0, 99, 255]);
        assert_eq!(quantize_slice(&[7u16; 5]), vec![0; 5]);
        assert_eq!(quantize_slice(&[2.5f32; 3]), vec![0; 3]);
    }

    #[test]
    fn pixels_rescale_by_a_multiplication() {
        let mut out = Vec::new();
        preprocess_pixels(&[0, 255, 128], [0.5, 0.25, 0.0], [0.5, 1.0, 2.0], &mut out);
        let r = (1.0f64 / 255.0) as f32;
        assert_eq!(out.len(), 9);
        assert_eq!(out[0], (0.0 - 0.5) / 0.5);
        assert_eq!(out[1], (255.0 * r - 0.5) / 0.5);
        assert_eq!(out[5], (128.0 * r - 0.25) / 1.0);
        assert_eq!(out[8], (128.0 * r) / 2.0);
    }
}
