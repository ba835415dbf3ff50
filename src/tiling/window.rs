//! Sliding-window geometry, blending windows and the z-slab accumulator.
//!
//! Everything here is model-free: [`Layout`] places the tiles, [`window_1d`] gives the
//! blending weights, and [`Blender`] accumulates weighted tile logits for the z-range still
//! open and hands finished z-planes to a callback. `run_tiled` (the parent module) feeds it
//! the model's tiles; the tests feed it synthetic ones.

use crate::error::{Error, Result};
use crate::ops::resize::{taps, Axis};

/// How overlapping tiles are blended (MONAI's `BlendMode`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Blend {
    /// Every voxel of a tile has weight 1: overlaps are plain averages.
    Constant,
    /// A separable Gaussian centred on the tile, σ = `sigma_scale` × tile extent per axis
    /// (MONAI's default `sigma_scale` is 0.125), normalised to a maximum of 1; weights that
    /// underflow to zero are raised to the smallest positive weight.
    Gaussian { sigma_scale: f64 },
}

impl Default for Blend {
    fn default() -> Self {
        Blend::Gaussian { sigma_scale: 0.125 }
    }
}

/// One axis of a blending window: `n` weights, normalised so the largest is 1.
///
/// Gaussian: `exp(−x²/(2σ²))` at `x = i − (n−1)/2`, σ = `sigma_scale·n` (MONAI's
/// `compute_importance_map`). The product of the three axes' windows is the 3-D window
/// (its maximum is the product of the maxima, so normalising per axis normalises the
/// product).
pub fn window_1d(n: usize, blend: Blend) -> Vec<f32> {
    match blend {
        Blend::Constant => vec![1.0; n],
        Blend::Gaussian { sigma_scale } => {
            let sigma = sigma_scale * n as f64;
            let c = (n as f64 - 1.0) / 2.0;
            let w: Vec<f64> = (0..n)
                .map(|i| {
                    let x = i as f64 - c;
                    (-(x * x) / (2.0 * sigma * sigma)).exp()
                })
                .collect();
            let max = w.iter().cloned().fold(0.0f64, f64::max);
            w.iter().map(|v| (v / max) as f32).collect()
        }
    }
}

/// The 3-D blending window of a tile, separable: `w(z,y,x) = max(wz·wy·wx, floor)` where
/// `floor` is the smallest positive product (MONAI: zeros clamped to the smallest positive
/// weight, so every voxel a tile covers counts).
#[derive(Clone, Debug)]
pub struct Window {
    pub axes: [Vec<f32>; 3],
    pub floor: f32,
}

impl Window {
    pub fn new(tile: [usize; 3], blend: Blend) -> Window {
        let axes = tile.map(|n| window_1d(n, blend));
        let mins = axes.clone().map(|a| {
            a.iter()
                .cloned()
                .filter(|v| *v > 0.0)
                .fold(1.0f32, f32::min)
        });
        let mut floor = mins[0] * mins[1] * mins[2];
        if floor <= 0.0 {
            floor = f32::MIN_POSITIVE;
        }
        Window { axes, floor }
    }

    /// Weight at tile-local (z, y, x).
    #[inline]
    pub fn at(&self, z: usize, y: usize, x: usize) -> f32 {
        (self.axes[0][z] * self.axes[1][y] * self.axes[2][x]).max(self.floor)
    }
}

/// Where the tiles go: per axis the start of each tile (negative when a volume smaller than
/// a tile is padded on both sides).
#[derive(Clone, Debug, PartialEq)]
pub struct Layout {
    /// Volume (D, H, W).
    pub shape: [usize; 3],
    /// Tile extent (raw voxels).
    pub tile: [usize; 3],
    /// Tile starts per axis, ascending.
    pub starts: [Vec<isize>; 3],
    /// Axes along which the volume is smaller than a tile (and therefore padded).
    pub padded: [bool; 3],
}

impl Layout {
    /// Tiles of `tile` voxels over `shape` with `overlap` (fraction of the tile, in [0, 1)).
    ///
    /// Per axis (MONAI's rule): stride `s = max(1, ⌊T·(1−overlap)⌋)`, starts `0, s, 2s, …`,
    /// the last one placed flush with the volume's end (`L − T`), so no tile hangs over the
    /// edge. A volume shorter than the tile along an axis gets one tile, centred: it starts
    /// at `−⌊(T−L)/2⌋` and the voxels outside the volume are mirror-padded.
    pub fn new(shape: [usize; 3], tile: [usize; 3], overlap: f64) -> Result<Layout> {
        if !(0.0..1.0).contains(&overlap) || !overlap.is_finite() {
            return Err(Error::Invalid(format!(
                "the overlap must be a fraction in [0, 1), got {overlap}; e.g. --overlap 0.25"
            )));
        }
        if shape.contains(&0) || tile.contains(&0) {
            return Err(Error::Invalid(format!(
                "volume {shape:?} and tile {tile:?} must have every size ≥ 1"
            )));
        }
        let mut padded = [false; 3];
        let starts = std::array::from_fn(|a| {
            let (l, t) = (shape[a], tile[a]);
            if l <= t {
                padded[a] = l < t;
                return vec![-(((t - l) / 2) as isize)];
            }
            let stride = ((t as f64 * (1.0 - overlap)).floor() as usize).max(1);
            let n = (l - t).div_ceil(stride) + 1;
            (0..n).map(|i| (i * stride).min(l - t) as isize).collect()
        });
        Ok(Layout {
            shape,
            tile,
            starts,
            padded,
        })
    }

    /// Tiles per axis.
    pub fn grid(&self) -> [usize; 3] {
        [
            self.starts[0].len(),
            self.starts[1].len(),
            self.starts[2].len(),
        ]
    }

    pub fn count(&self) -> usize {
        self.grid().iter().product()
    }

    /// Tile starts in z-major order (z slowest, x fastest).
    pub fn tiles(&self) -> impl Iterator<Item = [isize; 3]> + '_ {
        self.starts[0].iter().flat_map(move |&z| {
            self.starts[1]
                .iter()
                .flat_map(move |&y| self.starts[2].iter().map(move |&x| [z, y, x]))
        })
    }
}

/// numpy's `pad(mode="reflect")` index: the mirror image of `i` in `0..n` without repeating
/// the edge voxel (…, 2, 1, 0, 1, 2, …, n−2, n−1, n−2, …).
#[inline]
pub fn reflect(i: isize, n: usize) -> usize {
    if n == 1 {
        return 0;
    }
    let p = 2 * (n as isize - 1);
    let m = i.rem_euclid(p);
    (if m >= n as isize { p - m } else { m }) as usize
}

/// Copies the box `start .. start + size` of a (D, H, W) array, mirror-padding outside.
pub fn crop_reflect<T: Copy>(
    data: &[T],
    shape: [usize; 3],
    start: [isize; 3],
    size: [usize; 3],
) -> Vec<T> {
    let [d, h, w] = shape;
    let xs: Vec<usize> = (0..size[2])
        .map(|i| reflect(start[2] + i as isize, w))
        .collect();
    let contiguous = start[2] >= 0 && start[2] as usize + size[2] <= w;
    let mut out = Vec::with_capacity(size.iter().product());
    for z in 0..size[0] {
        let sz = reflect(start[0] + z as isize, d);
        for y in 0..size[1] {
            let sy = reflect(start[1] + y as isize, h);
            let row = &data[(sz * h + sy) * w..][..w];
            if contiguous {
                out.extend_from_slice(&row[start[2] as usize..][..size[2]]);
            } else {
                out.extend(xs.iter().map(|&x| row[x]));
            }
        }
    }
    out
}

/// A finished z-plane of blended logits: (K, H, W), plus which voxels no computed tile
/// covered (only skipped tiles).
pub struct Plane<'a> {
    pub z: usize,
    /// (K, H, W) blended logits; voxels with `covered[i] == false` hold zeros.
    pub logits: &'a [f32],
    pub covered: &'a [bool],
}

/// Accumulates weighted logits for the z-range still open and emits finished planes in
/// order. Memory: `(K + 1) · min(T_z, D) · H · W` f32, whatever the depth D.
pub struct Blender {
    shape: [usize; 3],
    k: usize,
    tile: [usize; 3],
    depth: usize,
    window: Window,
    acc: Vec<f32>,
    wsum: Vec<f32>,
    next_z: usize,
    plane: Vec<f32>,
    covered: Vec<bool>,
    // upsampling scratch: two xy-resized coarse planes (K, T_y, T_x) and their source z
    scratch: [Vec<f32>; 2],
    scratch_z: [usize; 2],
}

impl Blender {
    pub fn new(shape: [usize; 3], k: usize, tile: [usize; 3], blend: Blend) -> Result<Blender> {
        let [d, h, w] = shape;
        let depth = tile[0].min(d);
        let n = depth
            .checked_mul(h)
            .and_then(|v| v.checked_mul(w))
            .ok_or_else(|| Error::Invalid(format!("volume {shape:?} is too large")))?;
        let alloc = |len: usize| -> Result<Vec<f32>> {
            let mut v = Vec::new();
            v.try_reserve_exact(len).map_err(|_| {
                Error::Invalid(format!(
                    "cannot allocate the blending accumulator of {} bytes ({} classes × {depth} × {h} × {w} f32); use a smaller tile or split the volume in x/y",
                    len * 4,
                    k
                ))
            })?;
            v.resize(len, 0.0);
            Ok(v)
        };
        Ok(Blender {
            shape,
            k,
            tile,
            depth,
            window: Window::new(tile, blend),
            acc: alloc(k * n)?,
            wsum: alloc(n)?,
            next_z: 0,
            plane: alloc(k * h * w)?,
            covered: vec![false; h * w],
            scratch: [Vec::new(), Vec::new()],
            scratch_z: [usize::MAX; 2],
        })
    }

    /// Host bytes held by the accumulator (for the summary).
    pub fn bytes(&self) -> u64 {
        let f = std::mem::size_of::<f32>() as u64;
        (self.acc.len() + self.wsum.len() + self.plane.len()) as u64 * f
            + self.covered.len() as u64
            + self
                .scratch
                .iter()
                .map(|s| s.capacity() as u64 * f)
                .sum::<u64>()
    }

    /// The next z-plane not yet emitted.
    pub fn next_z(&self) -> usize {
        self.next_z
    }

    /// Adds one tile starting at `start` (raw voxels): `coarse` holds its logits
    /// (K, d, h, w) on the model's grid, which are resized trilinearly (PyTorch
    /// `align_corners=False`) to the tile's raw extent and blended into the voxels inside
    /// the volume. The tile's z-range must not reach below [`Blender::next_z`].
    pub fn add_tile(
        &mut self,
        start: [isize; 3],
        coarse: &[f32],
        coarse_shape: [usize; 3],
    ) -> Result<()> {
        let [d, h, w] = self.shape;
        let [td, th, tw] = self.tile;
        let k = self.k;
        let [cd, ch, cw] = coarse_shape;
        if coarse.len() != k * cd * ch * cw || coarse.is_empty() {
            return Err(Error::Invalid(format!(
                "tile logits of {} values do not match ({k}, {cd}, {ch}, {cw})",
                coarse.len()
            )));
        }
        let axis = |n_in: usize, n_out: usize| Axis {
            n_in,
            n_out,
            scale: n_in as f32 / n_out as f32,
        };
        let tz = taps(axis(cd, td));
        let ty = taps(axis(ch, th));
        let tx = taps(axis(cw, tw));
        // The part of the tile inside the volume, tile-local.
        let range = |s: isize, t: usize, l: usize| {
            let lo = (-s).max(0) as usize;
            let hi = ((l as isize - s).min(t as isize)).max(0) as usize;
            lo..hi.max(lo)
        };
        let (rz, ry, rx) = (
            range(start[0], td, d),
            range(start[1], th, h),
            range(start[2], tw, w),
        );
        let (ny, nx) = (ry.len(), rx.len());
        self.scratch_z = [usize::MAX; 2];
        for s in &mut self.scratch {
            s.clear();
            s.resize(k * ny * nx, 0.0);
        }
        let mut vals = vec![0.0f32; k];
        for oz in rz {
            let gz = (start[0] + oz as isize) as usize;
            if gz < self.next_z || gz >= self.next_z + self.depth {
                return Err(Error::Invalid(format!(
                    "tile at z {} reaches z {gz}, outside the open slab {}..{} (tiles must come in z-major order)",
                    start[0],
                    self.next_z,
                    self.next_z + self.depth
                )));
            }
            let (z0, z1, wz0, wz1) = tz[oz];
            for (slot, src) in [(0, z0), (1, z1)] {
                if self.scratch_z[slot] != src {
                    // xy-resize coarse plane `src` into scratch[slot] (only the rows and
                    // columns inside the volume), as ops::resize::trilinear: W, then H.
                    let buf = &mut self.scratch[slot];
                    for c in 0..k {
                        for (j, oy) in ry.clone().enumerate() {
                            let (h0, h1, wh0, wh1) = ty[oy];
                            let row = |hy: usize| &coarse[((c * cd + src) * ch + hy) * cw..][..cw];
                            let (r0, r1) = (row(h0), row(h1));
                            for (i, ox) in rx.clone().enumerate() {
                                let (w0, w1, ww0, ww1) = tx[ox];
                                let a = r0[w0] * ww0 + r0[w1] * ww1;
                                let b = r1[w0] * ww0 + r1[w1] * ww1;
                                buf[(c * ny + j) * nx + i] = a * wh0 + b * wh1;
                            }
                        }
                    }
                    self.scratch_z[slot] = src;
                }
            }
            let slot = gz % self.depth;
            for (j, oy) in ry.clone().enumerate() {
                let gy = (start[1] + oy as isize) as usize;
                for (i, ox) in rx.clone().enumerate() {
                    let gx = (start[2] + ox as isize) as usize;
                    let wgt = self.window.at(oz, oy, ox);
                    let v = (slot * h + gy) * w + gx;
                    for (c, val) in vals.iter_mut().enumerate() {
                        let q = (c * ny + j) * nx + i;
                        *val = self.scratch[0][q] * wz0 + self.scratch[1][q] * wz1;
                    }
                    for (c, val) in vals.iter().enumerate() {
                        self.acc[c * self.depth * h * w + v] += wgt * val;
                    }
                    self.wsum[v] += wgt;
                }
            }
        }
        Ok(())
    }

    /// Emits every plane below `z_end` (exclusive) not yet emitted, in order, then clears
    /// their accumulator slots.
    pub fn emit_until(
        &mut self,
        z_end: usize,
        sink: &mut dyn FnMut(Plane<'_>) -> Result<()>,
    ) -> Result<()> {
        let [d, h, w] = self.shape;
        let z_end = z_end.min(d);
        let hw = h * w;
        while self.next_z < z_end {
            let z = self.next_z;
            let slot = z % self.depth;
            let ws = &mut self.wsum[slot * hw..][..hw];
            for (i, c) in self.covered.iter_mut().enumerate() {
                *c = ws[i] > 0.0;
            }
            for c in 0..self.k {
                let a = &mut self.acc[(c * self.depth + slot) * hw..][..hw];
                let p = &mut self.plane[c * hw..][..hw];
                for i in 0..hw {
                    p[i] = if ws[i] > 0.0 { a[i] / ws[i] } else { 0.0 };
                    a[i] = 0.0;
                }
            }
            ws.iter_mut().for_each(|v| *v = 0.0);
            sink(Plane {
                z,
                logits: &self.plane,
                covered: &self.covered,
            })?;
            self.next_z += 1;
        }
        Ok(())
    }
}
