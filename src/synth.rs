//! Synthetic EM-like volumes with ground truth, for the demo model (`volfuse demo`,
//! `volfuse synth`, `tools/train_demo.py`).
//!
//! The scene is an implicit function of continuous coordinates (units: raw voxels), so the
//! raw volume and its context volume sample the same scene:
//!
//! - **cells**: a jittered cubic lattice of seeds (spacing [`CELL_SPACING`]); every point
//!   belongs to the nearest seed (Voronoi). Cell membranes are thin dark sheets along the
//!   Voronoi faces.
//! - **nuclei**: one large sphere per cell (radius ≈ 2 tiles of the demo models: a 32³ tile
//!   is often entirely inside a nucleus or entirely in cytoplasm), darker than the cytoplasm.
//! - **pores** (class 2): small dark blobs inside nuclei.
//! - **mitochondria** (class 3): small dark blobs in the cytoplasm, drawn from the *same*
//!   radius distribution, at the *same* number per voxel, with the *same* darkening factor
//!   as the pores.
//!
//! Intensities are multiplicative (cytoplasm `0.75` × a per-cell brightness in
//! `0.85..1.15`, × `0.6` in a nucleus, × `0.4` in a blob, × down to `0.45` on a membrane)
//! and so is the noise (`× (1 + 0.08·N(0,1))`). The
//! feature extraction min-max-normalises every slice, so a region that lies entirely inside
//! a nucleus looks statistically the same as one that lies entirely in cytoplasm: a blob
//! there is a pore or a mitochondrion depending only on where the nucleus boundary is,
//! which the context volume (4× the extent) shows and the raw tile often does not.
//!
//! Geometry (dinov3_playground's training geometry, `dinov3_playground.md` §e): the raw
//! volume (D, H, W) samples the scene at unit spacing around the origin; the context volume
//! has the **same voxel shape**, is **concentric**, and samples the scene at spacing
//! `context_ratio` (so its extent is `context_ratio`× larger). Each raw voxel is the mean
//! of 2×2×2 point samples, blurred by a Gaussian (σ = 0.8 voxel); each context voxel is the
//! mean of 3×3×3 point samples spread over its coarse voxel (a box acquisition). Noise is
//! added last and values are quantised to uint8 (`round(255 · v)`, clipped).
//!
//! Labels (truth, uint8, the raw grid): see [`CLASS_NAMES`]; sampled at voxel centres.
//! Everything is deterministic in `seed` (a SplitMix64 stream; no platform-dependent maths
//! beyond `f64` `exp`/`ln`/`cos`/`sqrt`).

use crate::error::{Error, Result};
use std::collections::HashMap;

/// Class names by label value.
pub const CLASS_NAMES: [&str; 4] = ["background", "nucleus", "pore", "mitochondrion"];
/// Lattice spacing of the cell seeds, in raw voxels.
pub const CELL_SPACING: f64 = 192.0;
/// Default context ratio (context voxel size / raw voxel size).
pub const DEFAULT_CONTEXT_RATIO: usize = 4;

const JITTER: f64 = 0.1; // seed jitter, fraction of the spacing (each axis, ±)
const NUCLEUS_RADIUS: (f64, f64) = (0.32, 0.36); // fraction of the spacing
const BLOB_RADIUS: (f64, f64) = (2.6, 3.6); // voxels, pores and mitochondria alike
/// Blobs per voxel of nucleus (pores) and of cytoplasm (mitochondria) alike, so that the
/// blob density does not tell the two apart.
const BLOB_DENSITY: f64 = 1.2e-3;
const CYTOPLASM: f64 = 0.75;
const BRIGHTNESS: (f64, f64) = (0.85, 1.15); // per-cell factor on every intensity
const NUCLEUS_FACTOR: f64 = 0.6;
const BLOB_FACTOR: f64 = 0.4;
const MEMBRANE_DEPTH: f64 = 0.55;
const MEMBRANE_SIGMA: f64 = 0.8;
const BLUR_SIGMA: f64 = 0.8;
const NOISE: f64 = 0.08;

/// What to generate.
#[derive(Clone, Debug)]
pub struct SynthConfig {
    pub seed: u64,
    /// Raw (and context) voxel shape (D, H, W).
    pub shape: [usize; 3],
    /// Context voxel size over raw voxel size (≥ 1).
    pub context_ratio: usize,
    /// Place the volume's centre at this distance from a nucleus centre, as a fraction of
    /// that nucleus' radius (random direction). `None`: a random position in the scene.
    pub nucleus_offset: Option<f64>,
}

impl SynthConfig {
    pub fn new(seed: u64, shape: [usize; 3]) -> SynthConfig {
        SynthConfig {
            seed,
            shape,
            context_ratio: DEFAULT_CONTEXT_RATIO,
            nucleus_offset: None,
        }
    }
}

/// A generated volume: raw, concentric context (same voxel shape) and truth, C order.
pub struct SynthVolume {
    pub shape: [usize; 3],
    pub raw: Vec<u8>,
    pub context: Vec<u8>,
    pub truth: Vec<u8>,
}

/// SplitMix64: small, fast and identical everywhere.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }
    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

fn hash3(seed: u64, c: [i64; 3], salt: u64) -> u64 {
    let mut r = Rng::new(
        seed ^ (c[0] as u64).wrapping_mul(0x9E37_79B1)
            ^ (c[1] as u64).wrapping_mul(0x85EB_CA77_C2B2_AE63)
            ^ (c[2] as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
            ^ salt.wrapping_mul(0x1656_67B1_9E37_79F9),
    );
    r.next_u64();
    r.next_u64()
}

type P3 = [f64; 3];

fn d2(a: P3, b: P3) -> f64 {
    (a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2) + (a[2] - b[2]).powi(2)
}

struct Cell {
    seed: P3,
    nucleus: P3,
    radius: f64,
    brightness: f64,
}

#[derive(Clone, Copy)]
struct Blob {
    c: P3,
    r: f64,
    class: u8,
}

/// The scene: lattice cells (seed, nucleus) and blobs, with a bin grid for blob look-ups.
struct Scene {
    seed: u64,
    origin: P3,
    /// Cells of the lattice box `lo ..= lo + dims - 1`, dense, z-major.
    cells: Vec<Cell>,
    lo: [i64; 3],
    dims: [i64; 3],
    blobs: Vec<Blob>,
    bins: HashMap<[i64; 3], Vec<u32>>,
}

const BIN: f64 = 8.0;
/// Bin size of the per-cell no-overlap check: ≥ the largest centre distance checked
/// (2 · 3.6 + 2), so the 27 neighbouring bins hold every blob that could overlap.
const OVERLAP_BIN: f64 = 10.0;

impl Scene {
    fn cell_raw(seed: u64, origin: P3, c: [i64; 3]) -> Cell {
        let mut r = Rng::new(hash3(seed, c, 1));
        let mut s = [0.0; 3];
        for a in 0..3 {
            s[a] = origin[a] + (c[a] as f64 + 0.5 + r.range(-JITTER, JITTER)) * CELL_SPACING;
        }
        let radius = r.range(NUCLEUS_RADIUS.0, NUCLEUS_RADIUS.1) * CELL_SPACING;
        let mut n = s;
        for v in n.iter_mut() {
            *v += r.range(-0.04, 0.04) * CELL_SPACING;
        }
        let brightness = r.range(BRIGHTNESS.0, BRIGHTNESS.1);
        Cell {
            seed: s,
            nucleus: n,
            radius,
            brightness,
        }
    }

    fn cell(&self, k: [i64; 3]) -> &Cell {
        let r = [0, 1, 2].map(|a| (k[a] - self.lo[a]).clamp(0, self.dims[a] - 1));
        &self.cells[((r[0] * self.dims[1] + r[1]) * self.dims[2] + r[2]) as usize]
    }

    fn lattice(&self, p: P3) -> [i64; 3] {
        [0, 1, 2].map(|a| ((p[a] - self.origin[a]) / CELL_SPACING).floor() as i64)
    }

    /// Nearest seed's cell key and the distance to the nearest Voronoi face.
    fn locate(&self, p: P3) -> ([i64; 3], f64) {
        let l = self.lattice(p);
        let mut best = (f64::INFINITY, [0i64; 3]);
        let mut near: [([i64; 3], P3); 27] = [([0; 3], [0.0; 3]); 27];
        let mut i = 0;
        for dz in -1..=1 {
            for dy in -1..=1 {
                for dx in -1..=1 {
                    let k = [l[0] + dz, l[1] + dy, l[2] + dx];
                    let s = self.cell(k).seed;
                    near[i] = (k, s);
                    i += 1;
                    let dd = d2(p, s);
                    if dd < best.0 {
                        best = (dd, k);
                    }
                }
            }
        }
        let s1 = self.cell(best.1).seed;
        let mut face = f64::INFINITY;
        for (k, s) in near.iter() {
            if *k == best.1 {
                continue;
            }
            let dist = d2(s1, *s).sqrt();
            let f = (d2(p, *s) - best.0) / (2.0 * dist);
            face = face.min(f);
        }
        (best.1, face)
    }

    fn build(cfg: &SynthConfig) -> Result<Scene> {
        let [d, h, w] = cfg.shape;
        let ratio = cfg.context_ratio as f64;
        let seed = cfg.seed;
        let mut rng = Rng::new(hash3(seed, [0, 0, 0], 7));
        let mut origin = [0.0; 3];
        match cfg.nucleus_offset {
            None => {
                for o in origin.iter_mut() {
                    *o = -rng.uniform() * CELL_SPACING;
                }
            }
            Some(f) => {
                if !(f.is_finite() && f >= 0.0) {
                    return Err(Error::Invalid(format!(
                        "the nucleus offset must be a finite number ≥ 0, got {f}"
                    )));
                }
                let c0 = Scene::cell_raw(seed, [0.0; 3], [0, 0, 0]);
                // a random direction
                let mut v = [rng.normal(), rng.normal(), rng.normal()];
                let n = d2(v, [0.0; 3]).sqrt().max(1e-12);
                for x in v.iter_mut() {
                    *x *= f * c0.radius / n;
                }
                // nucleus centre of cell 0 at -v, so the volume centre (0) is at +v from it
                for a in 0..3 {
                    origin[a] = -v[a] - c0.nucleus[a];
                }
            }
        }
        // Extent to cover: the context grid (ratio × the raw extent) plus one cell.
        let half = [d, h, w].map(|n| 0.5 * n as f64 * ratio + 4.0);
        let mut scene = Scene {
            seed,
            origin,
            cells: Vec::new(),
            lo: [0; 3],
            dims: [0; 3],
            blobs: Vec::new(),
            bins: HashMap::new(),
        };
        let lo = scene.lattice([-half[0], -half[1], -half[2]]).map(|v| v - 2);
        let hi = scene.lattice(half).map(|v| v + 2);
        scene.lo = lo;
        scene.dims = [0, 1, 2].map(|a| hi[a] - lo[a] + 1);
        for z in lo[0]..=hi[0] {
            for y in lo[1]..=hi[1] {
                for x in lo[2]..=hi[2] {
                    scene.cells.push(Scene::cell_raw(seed, origin, [z, y, x]));
                }
            }
        }
        // Blobs of the cells that can reach the extent (a cell's blobs lie within
        // ±0.6 spacing of its seed plus a blob radius; each cell's blobs depend only on the
        // cell, so skipping the others changes nothing inside the extent).
        let reach = 0.6 * CELL_SPACING + BLOB_RADIUS.1 + 1.0;
        for z in lo[0] + 1..hi[0] {
            for y in lo[1] + 1..hi[1] {
                for x in lo[2] + 1..hi[2] {
                    let s = scene.cell([z, y, x]).seed;
                    if (0..3).all(|a| s[a].abs() < half[a] + reach) {
                        scene.add_blobs([z, y, x]);
                    }
                }
            }
        }
        for (i, b) in scene.blobs.iter().enumerate() {
            let r = b.r + 0.5;
            let a = [0, 1, 2].map(|k| ((b.c[k] - r) / BIN).floor() as i64);
            let e = [0, 1, 2].map(|k| ((b.c[k] + r) / BIN).floor() as i64);
            for bz in a[0]..=e[0] {
                for by in a[1]..=e[1] {
                    for bx in a[2]..=e[2] {
                        scene.bins.entry([bz, by, bx]).or_default().push(i as u32);
                    }
                }
            }
        }
        Ok(scene)
    }

    fn add_blobs(&mut self, k: [i64; 3]) {
        let mut rng = Rng::new(hash3(self.seed, k, 2));
        let (nc, nr, seed) = {
            let c = self.cell(k);
            (c.nucleus, c.radius, c.seed)
        };
        let mut mine: Vec<Blob> = Vec::new();
        // this cell's blobs by OVERLAP_BIN bins, for the no-overlap check
        let mut grid: HashMap<[i64; 3], Vec<u32>> = HashMap::new();
        let key = |c: P3| [0, 1, 2].map(|a| (c[a] / OVERLAP_BIN).floor() as i64);
        let ok = |mine: &[Blob], grid: &HashMap<[i64; 3], Vec<u32>>, c: P3, r: f64| {
            let g = key(c);
            for dz in -1..=1 {
                for dy in -1..=1 {
                    for dx in -1..=1 {
                        if let Some(ids) = grid.get(&[g[0] + dz, g[1] + dy, g[2] + dx]) {
                            for &i in ids {
                                let b = &mine[i as usize];
                                if d2(b.c, c) <= (b.r + r + 2.0) * (b.r + r + 2.0) {
                                    return false;
                                }
                            }
                        }
                    }
                }
            }
            true
        };
        let push = |mine: &mut Vec<Blob>, grid: &mut HashMap<[i64; 3], Vec<u32>>, b: Blob| {
            grid.entry(key(b.c)).or_default().push(mine.len() as u32);
            mine.push(b);
        };
        // pores: inside the nucleus
        let vol = 4.0 / 3.0 * std::f64::consts::PI * nr.powi(3);
        let n_pores = (BLOB_DENSITY * vol).round() as usize;
        for _ in 0..n_pores * 3 {
            if mine.len() >= n_pores {
                break;
            }
            let r = rng.range(BLOB_RADIUS.0, BLOB_RADIUS.1);
            let lim = nr - r - 1.5;
            let c = [0, 1, 2].map(|a| nc[a] + rng.range(-lim, lim));
            if d2(c, nc) < lim * lim && ok(&mine, &grid, c, r) {
                push(&mut mine, &mut grid, Blob { c, r, class: 2 });
            }
        }
        let pores = mine.len();
        // mitochondria: in this cell's cytoplasm, away from the nucleus and the membranes
        let n_mitos = (BLOB_DENSITY * (CELL_SPACING.powi(3) - vol)).round() as usize;
        for _ in 0..n_mitos * 4 {
            if mine.len() >= pores + n_mitos {
                break;
            }
            let r = rng.range(BLOB_RADIUS.0, BLOB_RADIUS.1);
            let c = [0, 1, 2].map(|a| seed[a] + rng.range(-0.6, 0.6) * CELL_SPACING);
            let far = nr + r + 2.0;
            if d2(c, nc) < far * far {
                continue;
            }
            let l = self.lattice(c);
            if (0..3).any(|a| (l[a] - k[a]).abs() > 1) {
                continue;
            }
            if !ok(&mine, &grid, c, r) {
                continue;
            }
            let (owner, face) = self.locate(c);
            if owner != k || face < r + 2.0 {
                continue;
            }
            push(&mut mine, &mut grid, Blob { c, r, class: 3 });
        }
        self.blobs.extend(mine);
    }

    /// Clean intensity and label at a point.
    fn sample(&self, p: P3) -> (f64, u8) {
        let (k, face) = self.locate(p);
        let cell = self.cell(k);
        let mut v = CYTOPLASM * cell.brightness;
        let mut label = 0u8;
        if d2(p, cell.nucleus) < cell.radius * cell.radius {
            v *= NUCLEUS_FACTOR;
            label = 1;
        }
        let bin = [0, 1, 2].map(|a| (p[a] / BIN).floor() as i64);
        if let Some(ids) = self.bins.get(&bin) {
            for &i in ids {
                let b = &self.blobs[i as usize];
                if d2(p, b.c) < b.r * b.r {
                    v *= BLOB_FACTOR;
                    label = b.class;
                    break;
                }
            }
        }
        v *= 1.0 - MEMBRANE_DEPTH * (-(face * face) / (2.0 * MEMBRANE_SIGMA.powi(2))).exp();
        (v, label)
    }
}

fn gauss_blur(v: &mut [f64], shape: [usize; 3], sigma: f64) {
    let rad = (3.0 * sigma).ceil() as isize;
    let k: Vec<f64> = (-rad..=rad)
        .map(|i| (-(i * i) as f64 / (2.0 * sigma * sigma)).exp())
        .collect();
    let sum: f64 = k.iter().sum();
    let k: Vec<f64> = k.iter().map(|x| x / sum).collect();
    let strides = [shape[1] * shape[2], shape[2], 1];
    for axis in 0..3 {
        let n = shape[axis] as isize;
        let s = strides[axis];
        let mut line = vec![0.0; shape[axis]];
        let src = v.to_vec();
        for base in 0..v.len() {
            if !(base / s).is_multiple_of(shape[axis]) {
                continue;
            }
            for (i, l) in line.iter_mut().enumerate() {
                let mut acc = 0.0;
                for (j, kw) in k.iter().enumerate() {
                    let mut t = i as isize + j as isize - rad;
                    // mirror edges (x[-1] = x[1])
                    if n == 1 {
                        t = 0;
                    } else {
                        let period = 2 * (n - 1);
                        t = t.rem_euclid(period);
                        if t >= n {
                            t = period - t;
                        }
                    }
                    acc += kw * src[base + t as usize * s];
                }
                *l = acc;
            }
            for (i, l) in line.iter().enumerate() {
                v[base + i * s] = *l;
            }
        }
    }
}

fn quantise(v: f64) -> u8 {
    (v * 255.0).round().clamp(0.0, 255.0) as u8
}

/// Generates raw, context and truth for `cfg`.
pub fn generate(cfg: &SynthConfig) -> Result<SynthVolume> {
    let [d, h, w] = cfg.shape;
    if cfg.shape.contains(&0) || cfg.shape.iter().any(|&n| n > 1024) {
        return Err(Error::Invalid(format!(
            "synthetic volume size {:?}: every side must be between 1 and 1024 voxels",
            cfg.shape
        )));
    }
    if cfg.context_ratio == 0 || cfg.context_ratio > 16 {
        return Err(Error::Invalid(format!(
            "context ratio {} must be between 1 and 16",
            cfg.context_ratio
        )));
    }
    let scene = Scene::build(cfg)?;
    let n = d * h * w;
    let centre = |i: usize, len: usize| i as f64 + 0.5 - 0.5 * len as f64;
    let mut raw = vec![0.0f64; n];
    let mut truth = vec![0u8; n];
    let mut ctx = vec![0.0f64; n];
    let ratio = cfg.context_ratio as f64;
    let sub = [-ratio / 3.0, 0.0, ratio / 3.0];
    let scene = &scene;
    // One z-slice per work item, spread over the available cores (the result does not
    // depend on the thread count: every voxel is computed independently).
    let slice = |z: usize, raw: &mut [f64], truth: &mut [u8], ctx: &mut [f64]| {
        for y in 0..h {
            for x in 0..w {
                let i = y * w + x;
                let p = [centre(z, d), centre(y, h), centre(x, w)];
                truth[i] = scene.sample(p).1;
                let mut acc = 0.0;
                for oz in [-0.25, 0.25] {
                    for oy in [-0.25, 0.25] {
                        for ox in [-0.25, 0.25] {
                            acc += scene.sample([p[0] + oz, p[1] + oy, p[2] + ox]).0;
                        }
                    }
                }
                raw[i] = acc / 8.0;
                let q = p.map(|c| c * ratio);
                let mut acc = 0.0;
                for oz in sub {
                    for oy in sub {
                        for ox in sub {
                            acc += scene.sample([q[0] + oz, q[1] + oy, q[2] + ox]).0;
                        }
                    }
                }
                ctx[i] = acc / 27.0;
            }
        }
    };
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 16);
    let per = d.div_ceil(threads);
    std::thread::scope(|s| {
        let chunks = raw
            .chunks_mut(per * h * w)
            .zip(truth.chunks_mut(per * h * w))
            .zip(ctx.chunks_mut(per * h * w));
        for (t, ((r, tr), c)) in chunks.enumerate() {
            s.spawn(move || {
                for (k, ((r, tr), c)) in r
                    .chunks_mut(h * w)
                    .zip(tr.chunks_mut(h * w))
                    .zip(c.chunks_mut(h * w))
                    .enumerate()
                {
                    slice(t * per + k, r, tr, c);
                }
            });
        }
    });
    gauss_blur(&mut raw, cfg.shape, BLUR_SIGMA);
    let mut noise = Rng::new(hash3(cfg.seed, [1, 2, 3], 3));
    let raw: Vec<u8> = raw
        .iter()
        .map(|v| quantise(v * (1.0 + NOISE * noise.normal())))
        .collect();
    let context: Vec<u8> = ctx
        .iter()
        .map(|v| quantise(v * (1.0 + NOISE * noise.normal())))
        .collect();
    Ok(SynthVolume {
        shape: cfg.shape,
        raw,
        context,
        truth,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_seed_dependent() {
        let a = generate(&SynthConfig::new(3, [8, 9, 10])).unwrap();
        let b = generate(&SynthConfig::new(3, [8, 9, 10])).unwrap();
        let c = generate(&SynthConfig::new(4, [8, 9, 10])).unwrap();
        assert_eq!(a.raw, b.raw);
        assert_eq!(a.context, b.context);
        assert_eq!(a.truth, b.truth);
        assert_ne!(a.raw, c.raw);
        assert_eq!(a.raw.len(), 720);
    }

    #[test]
    fn centred_on_a_nucleus_has_every_class_and_the_intensities_fit() {
        let mut cfg = SynthConfig::new(11, [32, 32, 32]);
        cfg.nucleus_offset = Some(0.9);
        let v = generate(&cfg).unwrap();
        let mut count = [0usize; 4];
        let mut mean = [0f64; 4];
        for (t, r) in v.truth.iter().zip(&v.raw) {
            count[*t as usize] += 1;
            mean[*t as usize] += *r as f64;
        }
        for k in 0..4 {
            assert!(
                count[k] > 30,
                "class {k} has {} voxels: {count:?}",
                count[k]
            );
            mean[k] /= count[k] as f64;
        }
        // nucleus darker than cytoplasm; blobs darker than their surroundings
        assert!(mean[1] < 0.8 * mean[0], "{mean:?}");
        assert!(mean[3] < 0.75 * mean[0], "{mean:?}");
        assert!(mean[2] < 0.75 * mean[1], "{mean:?}");
        // the volume centre is inside the nucleus (offset 0.9 R < R)
        assert_eq!(v.truth[(16 * 32 + 16) * 32 + 16] & 1, 1);
    }

    #[test]
    fn context_is_concentric_and_coarser() {
        // A context ratio of 1 samples the same points as the raw grid (before blur and
        // noise), so its mean intensity must be close to the raw one.
        let mut cfg = SynthConfig::new(5, [16, 16, 16]);
        cfg.context_ratio = 1;
        cfg.nucleus_offset = Some(0.0);
        let v = generate(&cfg).unwrap();
        let m = |a: &[u8]| a.iter().map(|x| *x as f64).sum::<f64>() / a.len() as f64;
        assert!((m(&v.raw) - m(&v.context)).abs() < 8.0);
        // centred on a nucleus of radius > 40: the raw tile is all nucleus (+ pores) while a
        // ratio-8 context (extent 128) also shows the cytoplasm around it.
        cfg.context_ratio = 8;
        let v = generate(&cfg).unwrap();
        assert!(v.truth.iter().all(|t| *t == 1 || *t == 2));
        let corner = v.context[0] as f64;
        let centre = v.context[(8 * 16 + 8) * 16 + 8] as f64;
        assert!(corner > centre, "corner {corner} centre {centre}");
    }

    #[test]
    fn rejects_bad_sizes() {
        assert!(generate(&SynthConfig::new(1, [0, 4, 4])).is_err());
        let mut cfg = SynthConfig::new(1, [4, 4, 4]);
        cfg.context_ratio = 0;
        assert!(generate(&cfg).is_err());
        cfg.context_ratio = 2;
        cfg.nucleus_offset = Some(f64::NAN);
        assert!(generate(&cfg).is_err());
    }
}
