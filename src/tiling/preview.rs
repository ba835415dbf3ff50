//! The middle xy, xz and yz label slices of a run, gathered as planes are emitted, and a
//! PNG of them side by side with a colour per class.

use crate::error::{Error, Result};
use std::path::Path;

/// Middle slices of a (D, H, W) label volume: xy at z = D/2 (H×W), xz at y = H/2 (D×W),
/// yz at x = W/2 (D×H).
#[derive(Clone, Debug, PartialEq)]
pub struct PreviewSlices {
    pub shape: [usize; 3],
    pub xy: Vec<u16>,
    pub xz: Vec<u16>,
    pub yz: Vec<u16>,
}

impl PreviewSlices {
    pub fn new(shape: [usize; 3]) -> Self {
        let [d, h, w] = shape;
        PreviewSlices {
            shape,
            xy: vec![0; h * w],
            xz: vec![0; d * w],
            yz: vec![0; d * h],
        }
    }

    /// Takes what the preview needs from label plane `z` (H×W).
    pub fn add_plane(&mut self, z: usize, labels: &[u16]) {
        let [d, h, w] = self.shape;
        if z >= d || labels.len() != h * w {
            return;
        }
        if z == d / 2 {
            self.xy.copy_from_slice(labels);
        }
        self.xz[z * w..][..w].copy_from_slice(&labels[(h / 2) * w..][..w]);
        for y in 0..h {
            self.yz[z * h + y] = labels[y * w + w / 2];
        }
    }

    pub fn bytes(&self) -> u64 {
        ((self.xy.len() + self.xz.len() + self.yz.len()) * 2) as u64
    }
}

/// A colour per class: 0 is black, the others spread around the hue circle (golden angle)
/// at full saturation.
pub fn palette(class: u16) -> [u8; 3] {
    if class == 0 {
        return [0, 0, 0];
    }
    let hue = (class as f64 * 137.507_764) % 360.0;
    let (s, v) = (0.85, 1.0);
    let c = v * s;
    let x = c * (1.0 - ((hue / 60.0) % 2.0 - 1.0).abs());
    let m = v - c;
    let (r, g, b) = match (hue / 60.0) as u32 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    [r, g, b].map(|u| ((u + m) * 255.0).round() as u8)
}

/// The three slices side by side (xy | xz | yz, 4-pixel grey gaps), each row top-down.
pub fn render_preview(p: &PreviewSlices) -> image::RgbImage {
    let [d, h, w] = p.shape;
    let gap = 4u32;
    let panels: [(&[u16], usize, usize); 3] = [(&p.xy, h, w), (&p.xz, d, w), (&p.yz, d, h)];
    let width = panels.iter().map(|(_, _, c)| *c as u32).sum::<u32>() + 2 * gap;
    let height = panels.iter().map(|(_, r, _)| *r as u32).max().unwrap_or(1);
    let mut img = image::RgbImage::from_pixel(width, height, image::Rgb([64, 64, 64]));
    let mut x0 = 0u32;
    for (data, rows, cols) in panels {
        for r in 0..rows {
            for c in 0..cols {
                img.put_pixel(
                    x0 + c as u32,
                    r as u32,
                    image::Rgb(palette(data[r * cols + c])),
                );
            }
        }
        x0 += cols as u32 + gap;
    }
    img
}

/// Writes [`render_preview`] as a PNG (atomically; an existing file only with `force`).
pub fn write_preview(path: &Path, p: &PreviewSlices, force: bool) -> Result<()> {
    let img = render_preview(p);
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| Error::io(path, format!("could not encode the preview PNG: {e}")))?;
    crate::io::write_atomic(path, force, |w| std::io::Write::write_all(w, &png))
}
