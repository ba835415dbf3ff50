//! `volfuse demo`: the shipped demo models (demo/with_context, demo/no_context, trained by
//! tools/train_demo.py on [`crate::synth`] volumes) run on a generated volume.
//!
//! Volumes larger than the models' tile are cut into non-overlapping tiles; each tile's
//! context is the concentric crop of the volume's context (which spans `ratio`× the raw
//! extent around the same centre, with the same voxel shape), i.e. the training geometry.
// TODO(tiling): switch to the sliding-window API once it lands (overlap + blending).

use crate::error::{Error, Result};
use crate::models::pipeline::segment;
use crate::models::planes::VolumeData;
use crate::models::{Bundle, Runner, Volume};
use std::path::PathBuf;

/// The demo models' folder in the source tree.
pub fn models_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("demo")
}

/// RGB colour per class (background, nucleus, pore, mitochondrion, others grey).
pub fn class_colour(k: u16) -> [u8; 3] {
    match k {
        0 => [30, 30, 30],
        1 => [70, 110, 230],
        2 => [255, 200, 40],
        3 => [230, 60, 60],
        _ => [160, 160, 160],
    }
}

fn crop(v: &[u8], shape: [usize; 3], start: [usize; 3], size: [usize; 3]) -> Vec<u8> {
    let mut out = Vec::with_capacity(size.iter().product());
    for z in 0..size[0] {
        for y in 0..size[1] {
            let row = ((start[0] + z) * shape[1] + start[1] + y) * shape[2] + start[2];
            out.extend_from_slice(&v[row..row + size[2]]);
        }
    }
    out
}

/// Segments a (D, H, W) uint8 volume with its concentric context (same shape, `ratio`× the
/// extent) by non-overlapping tiles of the model's input size. Each side must be a multiple
/// of the tile side, and tile centres must fall on the context grid.
pub fn segment_tiles(
    b: &Bundle,
    runner: &mut Runner,
    raw: &[u8],
    context: &[u8],
    shape: [usize; 3],
    ratio: usize,
    batch: usize,
) -> Result<Vec<u16>> {
    let t = b.unet.config.input_size;
    let n: usize = shape.iter().product();
    if raw.len() != n || context.len() != n {
        return Err(Error::Invalid(format!(
            "raw ({}) and context ({}) must both hold {n} voxels for shape {shape:?}",
            raw.len(),
            context.len()
        )));
    }
    for a in 0..3 {
        let off = (t[a] as isize - shape[a] as isize) / 2; // tile centre offset, first tile
        if shape[a] % t[a] != 0 || shape[a] < t[a] || off % ratio as isize != 0 {
            return Err(Error::Invalid(format!(
                "volume {shape:?}: every side must be a multiple of the model's tile {t:?}, with tile centres on the ×{ratio} context grid (e.g. sides 32, 64, 96 with ratio 4)"
            )));
        }
        let reach = shape[a] / 2 + (shape[a] - t[a]) / (2 * ratio) + t[a] / 2;
        if reach > shape[a] {
            return Err(Error::Invalid(format!(
                "volume {shape:?}: the context of the outer tiles would reach beyond the context volume; use a larger volume or a smaller context ratio"
            )));
        }
    }
    let mut labels = vec![0u16; n];
    let tiles = [0, 1, 2].map(|a| shape[a] / t[a]);
    for tz in 0..tiles[0] {
        for ty in 0..tiles[1] {
            for tx in 0..tiles[2] {
                let start = [tz * t[0], ty * t[1], tx * t[2]];
                let cstart = [0, 1, 2].map(|a| {
                    // tile centre relative to the volume centre, in context voxels
                    let rel = (start[a] + t[a] / 2) as isize - (shape[a] / 2) as isize;
                    ((shape[a] / 2) as isize + rel / ratio as isize - (t[a] / 2) as isize) as usize
                });
                let r = Volume::new(t, VolumeData::U8(crop(raw, shape, start, t)))?;
                let c = Volume::new(t, VolumeData::U8(crop(context, shape, cstart, t)))?;
                let seg = segment(b, runner, &r, Some(&c), batch)?;
                let [_, d, h, w] = seg.shape;
                for z in 0..d {
                    for y in 0..h {
                        let dst = ((start[0] + z) * shape[1] + start[1] + y) * shape[2] + start[2];
                        let src = (z * h + y) * w;
                        labels[dst..dst + w].copy_from_slice(&seg.labels[src..src + w]);
                    }
                }
            }
        }
    }
    Ok(labels)
}

/// A PNG of the middle z slice: raw | truth | each labelling, side by side, `scale`× enlarged.
pub fn preview_png(
    raw: &[u8],
    truth: &[u8],
    labels: &[&[u16]],
    shape: [usize; 3],
    scale: usize,
) -> Result<Vec<u8>> {
    let [d, h, w] = shape;
    let z = d / 2;
    let panels = 2 + labels.len();
    let gap = 4;
    let (pw, ph) = (w * scale, h * scale);
    let width = panels * pw + (panels - 1) * gap;
    let mut img = image::RgbImage::from_pixel(width as u32, ph as u32, image::Rgb([255, 255, 255]));
    for y in 0..ph {
        for x in 0..pw {
            let i = (z * h + y / scale) * w + x / scale;
            let mut put = |panel: usize, c: [u8; 3]| {
                img.put_pixel((panel * (pw + gap) + x) as u32, y as u32, image::Rgb(c));
            };
            put(0, [raw[i]; 3]);
            put(1, class_colour(truth[i] as u16));
            for (p, l) in labels.iter().enumerate() {
                put(2 + p, class_colour(l[i]));
            }
        }
    }
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .map_err(|e| Error::Invalid(format!("could not encode the preview PNG: {e}")))?;
    Ok(out)
}
