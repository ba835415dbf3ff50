use super::*;
use crate::io::volume::{MemoryWriter, SlabData, SlabWriter};
use crate::ops::resize::{trilinear, Axis};
use crate::ops::testing::{random, rel_err, rng};
use rand::Rng;
use std::cell::RefCell;
use std::rc::Rc;

/// A writer whose slabs stay readable after `finish`, logging every write.
#[derive(Clone)]
struct Shared {
    mem: Rc<RefCell<MemoryWriter>>,
    log: Rc<RefCell<Vec<String>>>,
    name: &'static str,
    shape: Vec<usize>,
    finished: Rc<RefCell<bool>>,
}

impl Shared {
    fn new(shape: &[usize], name: &'static str, log: &Rc<RefCell<Vec<String>>>) -> Shared {
        Shared {
            mem: Rc::new(RefCell::new(MemoryWriter::new(shape))),
            log: log.clone(),
            name,
            shape: shape.to_vec(),
            finished: Rc::new(RefCell::new(false)),
        }
    }
    fn values(&self) -> Vec<f32> {
        self.mem
            .borrow()
            .values()
            .iter()
            .map(|v| *v as f32)
            .collect()
    }
}

impl SlabWriter for Shared {
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn write_slab(&mut self, z0: usize, slab: SlabData<'_>) -> Result<()> {
        self.log.borrow_mut().push(format!("{} z{z0}", self.name));
        self.mem.borrow_mut().write_slab(z0, slab)
    }
    fn finish(self: Box<Self>) -> Result<()> {
        let mem = self.mem.borrow();
        let d = self.shape[self.shape.len() - 3];
        let got = mem.channels[0].len()
            / (self.shape[self.shape.len() - 1] * self.shape[self.shape.len() - 2]);
        if got != d {
            return Err(Error::Invalid(format!(
                "finished after {got} of {d} planes"
            )));
        }
        *self.finished.borrow_mut() = true;
        Ok(())
    }
}

fn volume_f32(shape: [usize; 3], v: Vec<f32>) -> Volume {
    Volume::new(shape, VolumeData::F32(v)).unwrap()
}

/// A synthetic "model" on a model grid equal to the tile (identity resize): its logits are
/// a fixed linear function of the global voxel position, the same in every tile, so any
/// correct blend reproduces that function exactly, and any placement error shows.
fn linear_logits(k: usize, start: [isize; 3], tile: [usize; 3], coef: &[[f32; 4]]) -> Vec<f32> {
    let [td, th, tw] = tile;
    let mut out = Vec::with_capacity(k * td * th * tw);
    for c in coef.iter().take(k) {
        for z in 0..td {
            for y in 0..th {
                for x in 0..tw {
                    let (gz, gy, gx) = (
                        start[0] + z as isize,
                        start[1] + y as isize,
                        start[2] + x as isize,
                    );
                    out.push(c[0] + c[1] * gz as f32 + c[2] * gy as f32 + c[3] * gx as f32);
                }
            }
        }
    }
    out
}

/// [`tile_loop`] without context or progress, on the labels head; panics on an error.
fn run_labels(
    raw: &Volume,
    k: usize,
    model_grid: [usize; 3],
    tile: [usize; 3],
    opts: &TileOptions,
    outputs: Outputs,
    predict: &mut dyn FnMut(TileJob<'_>) -> Result<Option<Vec<f32>>>,
) -> Summary {
    tile_loop(
        raw,
        None,
        k,
        Head::Labels,
        model_grid,
        tile,
        opts,
        outputs,
        predict,
        &mut |_| {},
    )
    .unwrap()
}

fn expected_linear(k: usize, shape: [usize; 3], coef: &[[f32; 4]]) -> Vec<f32> {
    linear_logits(k, [0, 0, 0], shape, coef)
}

#[test]
fn windows_are_normalised_and_symmetric() {
    for n in [1usize, 2, 5, 16, 17, 64, 99] {
        let g = window_1d(n, Blend::default());
        let max = g.iter().cloned().fold(0.0f32, f32::max);
        assert!((max - 1.0).abs() < 1e-6, "n {n}: max {max}");
        for i in 0..n {
            assert!((g[i] - g[n - 1 - i]).abs() < 1e-6, "n {n} not symmetric");
            assert!(g[i] > 0.0);
        }
        if n > 4 {
            // σ = n/8: the ends are exp(−((n−1)/2)²/(2σ²)) ≈ e^−8 of the centre
            let sigma = 0.125 * n as f64;
            let c = (n as f64 - 1.0) / 2.0;
            let want = (-(c * c) / (2.0 * sigma * sigma)).exp()
                / g.iter().cloned().fold(0.0, f32::max) as f64;
            let centre = (-(((n / 2) as f64 - c).powi(2)) / (2.0 * sigma * sigma)).exp();
            assert!(
                ((g[0] as f64) - want / centre).abs() < 1e-5,
                "n {n}: {} vs {}",
                g[0],
                want / centre
            );
        }
        assert!(window_1d(n, Blend::Constant).iter().all(|v| *v == 1.0));
    }
    // zeros are raised to the smallest positive weight
    let w = Window::new([3, 3, 3], Blend::Gaussian { sigma_scale: 1e-3 });
    assert!(w.floor > 0.0 && w.at(0, 0, 0) == w.floor && w.at(1, 1, 1) == 1.0);
}

#[test]
fn layout_places_tiles_flush_and_covers_the_volume() {
    let mut r = rng();
    for _ in 0..200 {
        let l = r.random_range(1..300usize);
        let t = r.random_range(1..80usize);
        let ov = [0.0, 0.25, 0.5, 0.9][r.random_range(0..4)];
        let lay = Layout::new([l, 1, 1], [t, 1, 1], ov).unwrap();
        let s = &lay.starts[0];
        if l <= t {
            assert_eq!(s, &vec![-(((t - l) / 2) as isize)]);
            assert_eq!(lay.padded[0], l < t);
            continue;
        }
        let stride = ((t as f64 * (1.0 - ov)).floor() as usize).max(1);
        assert_eq!(s[0], 0);
        assert_eq!(
            *s.last().unwrap(),
            (l - t) as isize,
            "last tile flush (l {l} t {t})"
        );
        for p in s.windows(2) {
            assert!(
                p[1] > p[0] && (p[1] - p[0]) as usize <= stride,
                "l {l} t {t} ov {ov}: {s:?}"
            );
        }
        assert_eq!(s.len(), (l - t).div_ceil(stride) + 1);
    }
    assert!(Layout::new([4, 4, 4], [2, 2, 2], 1.0).is_err());
    assert!(Layout::new([4, 4, 4], [2, 2, 2], -0.1).is_err());
    let lay = Layout::new([10, 20, 30], [4, 8, 12], 0.25).unwrap();
    let tiles: Vec<_> = lay.tiles().collect();
    assert_eq!(tiles.len(), lay.count());
    assert!(tiles.windows(2).all(|p| p[0] < p[1]), "z-major order");
}

#[test]
fn reflect_padding_is_numpy_reflect() {
    // numpy.pad(arange(4), 6, mode="reflect")
    let want = [0, 1, 2, 3, 2, 1, 0, 1, 2, 3, 2, 1, 0, 1, 2, 3];
    let got: Vec<usize> = (-6..10).map(|i| reflect(i, 4)).collect();
    assert_eq!(got, want);
    assert_eq!(reflect(-5, 1), 0);
    let data: Vec<u8> = (0..2 * 3 * 4).map(|v| v as u8).collect();
    let c = crop_reflect(&data, [2, 3, 4], [-1, 1, 2], [3, 2, 3]);
    // z −1 → 1, 0, 1; y 1, 2; x 2, 3, 2
    let want: Vec<u8> = [1usize, 0, 1]
        .iter()
        .flat_map(|&z| {
            [1usize, 2].into_iter().flat_map(move |y| {
                [2usize, 3, 2]
                    .into_iter()
                    .map(move |x| (z * 12 + y * 4 + x) as u8)
            })
        })
        .collect();
    assert_eq!(c, want);
}

/// Blended synthetic logits reproduce the global function: the normalised weights sum to
/// one at every voxel (constant and Gaussian, odd sizes, several overlaps, padded axes).
#[test]
fn blending_weights_sum_to_one() {
    let mut r = rng();
    for case in 0..12 {
        let shape = [
            r.random_range(3..40usize),
            r.random_range(3..40),
            r.random_range(3..40),
        ];
        let tile = [
            r.random_range(2..20usize),
            r.random_range(2..20),
            r.random_range(2..50),
        ];
        let overlap = [0.0, 0.25, 0.5, 0.7][case % 4];
        let blend = if case % 2 == 0 {
            Blend::Constant
        } else {
            Blend::Gaussian { sigma_scale: 0.125 }
        };
        let k = 2;
        let coef: Vec<[f32; 4]> = (0..k)
            .map(|_| {
                [
                    r.random_range(-1.0..1.0),
                    r.random_range(-0.1..0.1),
                    r.random_range(-0.1..0.1),
                    r.random_range(-0.1..0.1),
                ]
            })
            .collect();
        let raw = volume_f32(shape, vec![0.0; shape.iter().product()]);
        let log = Rc::new(RefCell::new(Vec::new()));
        let lw = Shared::new(&[k, shape[0], shape[1], shape[2]], "logits", &log);
        let outputs = Outputs {
            logits: Some(Box::new(lw.clone())),
            ..Default::default()
        };
        let opts = TileOptions {
            overlap,
            blend,
            ..Default::default()
        };
        let mut predict = |j: TileJob<'_>| Ok(Some(linear_logits(k, j.start, tile, &coef)));
        let s = run_labels(&raw, k, tile, tile, &opts, outputs, &mut predict);
        let got = lw.values();
        let want = expected_linear(k, shape, &coef);
        let e = rel_err(&got, &want);
        assert!(
            e < 1e-5,
            "case {case} {shape:?} tile {tile:?} ov {overlap} {blend:?}: rel err {e}"
        );
        assert_eq!(s.tiles_run, s.grid.iter().product::<usize>());
        assert!(*lw.finished.borrow());
    }
}

/// The per-tile resize to the raw grid is PyTorch's trilinear (the CPU reference op), and a
/// one-tile volume passes the model's logits through unchanged by the blend.
#[test]
fn one_tile_is_the_resized_model_output() {
    let mut r = rng();
    let (k, grid, tile) = (3, [3usize, 4, 5], [7usize, 9, 11]);
    let coarse = random(&mut r, k * 60);
    let mut want = vec![0.0; k * 7 * 9 * 11];
    let ax = |i: usize, o: usize| Axis {
        n_in: i,
        n_out: o,
        scale: i as f32 / o as f32,
    };
    trilinear(&coarse, k, [ax(3, 7), ax(4, 9), ax(5, 11)], &mut want);
    for blend in [Blend::Constant, Blend::default()] {
        let raw = volume_f32(tile, vec![1.0; 7 * 9 * 11]);
        let log = Rc::new(RefCell::new(Vec::new()));
        let lw = Shared::new(&[k, 7, 9, 11], "logits", &log);
        let pw = Shared::new(&[k, 7, 9, 11], "probs", &log);
        let outputs = Outputs {
            logits: Some(Box::new(lw.clone())),
            probabilities: Some(Box::new(pw.clone())),
            ..Default::default()
        };
        let opts = TileOptions {
            blend,
            ..Default::default()
        };
        let mut predict = |_: TileJob<'_>| Ok(Some(coarse.clone()));
        run_labels(&raw, k, grid, tile, &opts, outputs, &mut predict);
        let got = lw.values();
        assert!(
            rel_err(&got, &want) < 1e-6,
            "{blend:?}: {}",
            rel_err(&got, &want)
        );
        let mut p = vec![0.0; want.len()];
        crate::ops::softmax::channel_softmax(&want, 1, k, 7 * 9 * 11, &mut p);
        assert!(rel_err(&pw.values(), &p) < 1e-6);
    }
}

/// Planes are written in order, each once, interleaved with the tiles (a plane leaves
/// memory as soon as no later tile touches it), and the host peak does not grow with depth.
#[test]
fn slabs_are_emitted_in_order_as_they_finish_and_memory_is_bounded() {
    let tile = [8usize, 8, 8];
    let mut peaks = Vec::new();
    for depth in [20usize, 90] {
        let shape = [depth, 13, 11];
        let raw = volume_f32(shape, vec![0.0; depth * 13 * 11]);
        let log = Rc::new(RefCell::new(Vec::new()));
        let lab = Shared::new(&shape, "labels", &log);
        let outputs = Outputs {
            labels: Some(Box::new(lab.clone())),
            ..Default::default()
        };
        let coef = [[0.0, 0.0, 0.0, 0.0], [0.5, 0.01, 0.0, -0.02]];
        let log2 = log.clone();
        let mut predict = |j: TileJob<'_>| {
            log2.borrow_mut().push(format!("tile z{}", j.start[0]));
            Ok(Some(linear_logits(2, j.start, tile, &coef)))
        };
        let s = run_labels(
            &raw,
            2,
            tile,
            tile,
            &TileOptions::default(),
            outputs,
            &mut predict,
        );
        let log = log.borrow();
        let planes: Vec<usize> = log
            .iter()
            .filter_map(|l| l.strip_prefix("labels z"))
            .map(|v| v.parse().unwrap())
            .collect();
        assert_eq!(planes, (0..depth).collect::<Vec<_>>());
        // plane 0 is written before the last row of tiles runs
        let first_plane = log.iter().position(|l| l == "labels z0").unwrap();
        let last_tile = log.iter().rposition(|l| l.starts_with("tile")).unwrap();
        assert!(first_plane < last_tile, "{log:?}");
        // no plane is written while a tile that covers it is still to come
        for (i, l) in log.iter().enumerate() {
            if let Some(z) = l.strip_prefix("labels z") {
                let z: isize = z.parse().unwrap();
                for later in &log[i..] {
                    if let Some(t) = later.strip_prefix("tile z") {
                        let t: isize = t.parse().unwrap();
                        assert!(t > z, "plane {z} written before tile at z {t}");
                    }
                }
            }
        }
        // labels: argmax of the linear logits
        let want: Vec<f32> = (0..depth * 13 * 11)
            .map(|i| {
                let (z, x) = (i / 143, i % 11);
                if 0.5 + 0.01 * z as f32 - 0.02 * x as f32 > 0.0 {
                    1.0
                } else {
                    0.0
                }
            })
            .collect();
        assert_eq!(lab.values(), want);
        assert_eq!(s.class_counts.iter().sum::<u64>(), (depth * 143) as u64);
        peaks.push(s.host_peak_bytes);
    }
    assert_eq!(peaks[0], peaks[1], "host peak bytes depend on the depth");
}

#[test]
fn foreground_skipping_labels_background_without_running() {
    let shape = [24usize, 16, 16];
    let tile = [8usize, 8, 8];
    // foreground only in z < 8
    let v: Vec<f32> = (0..24 * 256)
        .map(|i| if i / 256 < 8 { 200.0 } else { 0.0 })
        .collect();
    let raw = volume_f32(shape, v);
    let log = Rc::new(RefCell::new(Vec::new()));
    let lab = Shared::new(&shape, "labels", &log);
    let pw = Shared::new(&[2, 24, 16, 16], "probs", &log);
    let outputs = Outputs {
        labels: Some(Box::new(lab.clone())),
        probabilities: Some(Box::new(pw.clone())),
        ..Default::default()
    };
    let opts = TileOptions {
        overlap: 0.0,
        foreground: Some(Foreground {
            threshold: 100.0,
            min_ratio: 0.5,
        }),
        ..Default::default()
    };
    let mut calls = 0;
    let mut predict = |j: TileJob<'_>| {
        calls += 1;
        assert!(j.start[0] < 8);
        Ok(Some(linear_logits(
            2,
            j.start,
            tile,
            &[[0.0; 4], [1.0, 0.0, 0.0, 0.0]],
        )))
    };
    let s = run_labels(&raw, 2, tile, tile, &opts, outputs, &mut predict);
    assert_eq!((s.tiles_run, s.tiles_skipped), (4, 8));
    assert_eq!(calls, 4);
    let l = lab.values();
    assert!(l[..8 * 256].iter().all(|v| *v == 1.0));
    assert!(l[8 * 256..].iter().all(|v| *v == 0.0));
    let p = pw.values();
    let n = 24 * 256;
    assert!(
        p[8 * 256..n].iter().all(|v| *v == 1.0),
        "background probability 1"
    );
    assert!(p[n + 8 * 256..].iter().all(|v| *v < 1e-30));
}

#[test]
fn context_tiles_are_concentric() {
    // one tile, context of the same shape: the whole context volume
    assert_eq!(
        context_start([64; 3], [64; 3], 16.0, [0; 3], [64; 3]),
        [0; 3]
    );
    // a pyramid level (same region at half resolution): tile at raw 0..64 centres at 32,
    // i.e. context voxel 16; the context tile is 64 context voxels around it
    assert_eq!(
        context_start([256; 3], [128; 3], 2.0, [0; 3], [64; 3]),
        [-16; 3]
    );
    assert_eq!(
        context_start([256; 3], [128; 3], 2.0, [192; 3], [64; 3]),
        [80; 3]
    );
    // a padded small volume: centred tile, concentric context
    assert_eq!(
        context_start([40, 36, 44], [40, 36, 44], 2.0, [-12, -14, -10], [64; 3]),
        [-12, -14, -10]
    );
    assert!(check_context([256; 3], [128; 3], 2.0).is_ok());
    let e = check_context([256; 3], [64, 128, 128], 2.0)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("mismatch") && e.contains("--context-scale"),
        "{e}"
    );
    assert!(check_context([256; 3], [128; 3], 0.0).is_err());
}

#[test]
fn downsample_is_a_block_mean() {
    let v: Vec<u8> = (0..4 * 4 * 5).map(|i| (i * 3 % 256) as u8).collect();
    let vol = Volume::new([4, 4, 5], VolumeData::U8(v.clone())).unwrap();
    let d = downsample(&vol, 2).unwrap();
    assert_eq!(d.shape(), [2, 2, 3]);
    let VolumeData::U8(out) = d.data() else {
        panic!()
    };
    let at = |z: usize, y: usize, x: usize| v[(z * 4 + y) * 5 + x] as f64;
    let m = (0..2)
        .flat_map(|z| (0..2).flat_map(move |y| (0..2).map(move |x| at(z, y, x))))
        .sum::<f64>()
        / 8.0;
    assert_eq!(out[0], m.round() as u8);
    // the last, partial block along x averages its 4 voxels
    let m2 = (0..2)
        .flat_map(|z| (0..2).map(move |y| at(z, y, 4)))
        .sum::<f64>()
        / 4.0;
    assert_eq!(out[2], m2.round() as u8);
}

#[test]
fn preview_takes_the_middle_slices() {
    let shape = [5usize, 4, 6];
    let mut p = PreviewSlices::new(shape);
    for z in 0..5 {
        let plane: Vec<u16> = (0..24).map(|i| (z * 100 + i) as u16).collect();
        p.add_plane(z, &plane);
    }
    assert_eq!(p.xy, (200..224).collect::<Vec<u16>>());
    assert_eq!(&p.xz[6..12], &[112, 113, 114, 115, 116, 117]);
    assert_eq!(&p.yz[4..8], &[103, 109, 115, 121]);
    let img = render_preview(&p);
    assert_eq!(img.dimensions(), (6 + 6 + 4 + 8, 5));
    assert_eq!(img.get_pixel(0, 0).0, palette(200));
    assert_ne!(palette(1), palette(2));
    assert_eq!(palette(0), [0, 0, 0]);
}

// ---- with the tiny fixture bundle -------------------------------------------------------

fn fixture(p: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(p)
}

/// A volume exactly one tile (64³ for the tiny bundle): the tiled run equals the
/// single-tile pipeline's logits resized to the raw grid.
fn tiled_equals_single_tile(backend: crate::models::Backend) {
    let b = Bundle::load(&fixture("bundle_tiny_ctx")).unwrap();
    let (tile, note) = tile_extent(&b);
    assert_eq!((tile, note), ([64; 3], None));
    let mut r = rng();
    let mut random_volume = || {
        let v = (0..64 * 64 * 64)
            .map(|_| r.random_range(0..=255u8))
            .collect();
        Volume::new([64; 3], VolumeData::U8(v)).unwrap()
    };
    let raw = random_volume();
    let ctx = random_volume();
    let mut runner = Runner::new(backend);
    let seg = pipeline::segment(&b, &mut runner, &raw, Some(&ctx), 16).unwrap();
    let mut want = vec![0.0; 3 * 64 * 64 * 64];
    let ax = Axis {
        n_in: 16,
        n_out: 64,
        scale: 0.25,
    };
    trilinear(&seg.logits, 3, [ax; 3], &mut want);
    let log = Rc::new(RefCell::new(Vec::new()));
    let lw = Shared::new(&[3, 64, 64, 64], "logits", &log);
    let labw = Shared::new(&[64, 64, 64], "labels", &log);
    let outputs = Outputs {
        logits: Some(Box::new(lw.clone())),
        labels: Some(Box::new(labw.clone())),
        ..Default::default()
    };
    let mut ticks = 0;
    let s = run_tiled(
        &b,
        &mut runner,
        &raw,
        Context::Volume {
            volume: &ctx,
            scale: 16.0,
        },
        &TileOptions::default(),
        outputs,
        &mut |p| {
            ticks += 1;
            assert_eq!(p.total, 1);
        },
    )
    .unwrap();
    assert_eq!((s.tiles_run, ticks), (1, 1));
    let e = rel_err(&lw.values(), &want);
    assert!(e < 1e-5, "tiled vs single tile: {e}");
    assert!(s.notes.is_empty(), "{:?}", s.notes);
    assert!(s.device_bytes > 0 && s.host_peak_bytes > 0);
    assert_eq!(s.class_counts.iter().sum::<u64>(), 64 * 64 * 64);
}

#[test]
fn tiled_equals_single_tile_cpu() {
    tiled_equals_single_tile(crate::models::Backend::Cpu);
}

#[test]
fn tiled_equals_single_tile_gpu() {
    let opts = crate::gpu::GpuOptions::from_env().unwrap();
    let ctx =
        crate::gpu::GpuContext::new(&opts).expect("a GPU adapter (install mesa-vulkan-drivers)");
    tiled_equals_single_tile(crate::models::Backend::Gpu(std::sync::Arc::new(ctx)));
}

/// The e2e fixture (raw 40×36×44 with a 2× concentric context) as one tile of its own
/// shape reproduces the PyTorch reference's logits, resized to the raw grid.
#[test]
fn fixture_volume_as_one_tile_matches_the_reference() {
    let b = Bundle::load(&fixture("bundle_tiny_ctx")).unwrap();
    let raw = Volume::read(&fixture("e2e_tiny_ctx/raw.npy")).unwrap();
    let ctx = Volume::read(&fixture("e2e_tiny_ctx/context.npy")).unwrap();
    let want16 = crate::io::npy::read(&fixture("e2e_tiny_ctx/logits.npy"))
        .unwrap()
        .to_f32();
    let shape = raw.shape();
    let ax = |o: usize| Axis {
        n_in: 16,
        n_out: o,
        scale: 16.0 / o as f32,
    };
    let mut want = vec![0.0; 3 * shape.iter().product::<usize>()];
    trilinear(&want16, 3, shape.map(ax), &mut want);
    let mut runner = Runner::new(crate::models::Backend::Cpu);
    let log = Rc::new(RefCell::new(Vec::new()));
    let lw = Shared::new(&[3, shape[0], shape[1], shape[2]], "logits", &log);
    let outputs = Outputs {
        logits: Some(Box::new(lw.clone())),
        ..Default::default()
    };
    let opts = TileOptions {
        tile: Some(shape),
        ..Default::default()
    };
    let s = run_tiled(
        &b,
        &mut runner,
        &raw,
        Context::Volume {
            volume: &ctx,
            scale: 2.0,
        },
        &opts,
        outputs,
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(s.tiles_run, 1);
    let e = rel_err(&lw.values(), &want);
    assert!(e < 1e-3, "vs reference: {e}");
}
