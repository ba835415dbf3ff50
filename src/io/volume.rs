//! Output volumes written z-slab by z-slab, so a tiled run never holds the whole output.
//!
//! A [`SlabWriter`] receives consecutive slabs along the first spatial axis (z) of an
//! array of shape `(D, H, W)` (labels) or `(K, D, H, W)` (probabilities, logits). Each slab
//! is `(nz, H, W)` or `(K, nz, H, W)` in C order, and slabs arrive in order, covering
//! `0..D` exactly once. [`SlabWriter::finish`] makes the output visible (rename of the
//! temporary file); dropping a writer without `finish` leaves nothing at the output path.

use std::path::Path;

use crate::error::{Error, Result};
use crate::io::npy::{self, NpyElement};

/// One slab of output values.
#[derive(Clone, Copy, Debug)]
pub enum SlabData<'a> {
    U8(&'a [u8]),
    U16(&'a [u16]),
    F32(&'a [f32]),
}

impl SlabData<'_> {
    pub fn len(&self) -> usize {
        match self {
            SlabData::U8(v) => v.len(),
            SlabData::U16(v) => v.len(),
            SlabData::F32(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Element type of an output array.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutType {
    U8,
    U16,
    F32,
}

/// Receives an output array slab by slab along z.
pub trait SlabWriter {
    /// Full shape: `[D, H, W]` or `[K, D, H, W]`.
    fn shape(&self) -> &[usize];
    /// Writes slab `z0 .. z0 + nz`, where `nz = slab.len() / (K·H·W)`.
    fn write_slab(&mut self, z0: usize, slab: SlabData<'_>) -> Result<()>;
    /// Completes the output (all of `0..D` must have been written).
    fn finish(self: Box<Self>) -> Result<()>;
}

/// Checks a slab against the writer's shape and the next expected z; returns `nz`.
pub fn check_slab(shape: &[usize], next_z: usize, z0: usize, len: usize) -> Result<usize> {
    let (k, d, plane) = match shape {
        [d, h, w] => (1, *d, h * w),
        [k, d, h, w] => (*k, *d, h * w),
        _ => {
            return Err(Error::Invalid(format!(
                "output shape {shape:?} is not (D,H,W) or (K,D,H,W)"
            )))
        }
    };
    let per_z = k * plane;
    if per_z == 0 || len % per_z != 0 {
        return Err(Error::Invalid(format!(
            "a slab of {len} values is not a whole number of z-planes of {per_z} values (shape {shape:?})"
        )));
    }
    let nz = len / per_z;
    if z0 != next_z || z0 + nz > d {
        return Err(Error::Invalid(format!(
            "slab z {z0}..{} out of order or out of range (expected to start at {next_z}, depth {d})",
            z0 + nz
        )));
    }
    Ok(nz)
}

/// Gathers slabs in memory (for tests, and the fallback writer).
pub struct MemoryWriter {
    shape: Vec<usize>,
    next_z: usize,
    /// One Vec per channel, each (D, H, W), filled as slabs arrive.
    pub channels: Vec<Vec<f64>>,
    on_finish: Option<Box<dyn FnOnce(&[usize], Vec<Vec<f64>>) -> Result<()>>>,
}

impl MemoryWriter {
    pub fn new(shape: &[usize]) -> MemoryWriter {
        let k = if shape.len() == 4 { shape[0] } else { 1 };
        MemoryWriter {
            shape: shape.to_vec(),
            next_z: 0,
            channels: vec![Vec::new(); k],
            on_finish: None,
        }
    }

    /// Values of the whole array in C order, as f64.
    pub fn values(&self) -> Vec<f64> {
        self.channels.concat()
    }
}

impl SlabWriter for MemoryWriter {
    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn write_slab(&mut self, z0: usize, slab: SlabData<'_>) -> Result<()> {
        let nz = check_slab(&self.shape, self.next_z, z0, slab.len())?;
        let k = self.channels.len();
        let per_k = slab.len() / k;
        for (c, ch) in self.channels.iter_mut().enumerate() {
            let r = c * per_k..(c + 1) * per_k;
            match slab {
                SlabData::U8(v) => ch.extend(v[r].iter().map(|x| *x as f64)),
                SlabData::U16(v) => ch.extend(v[r].iter().map(|x| *x as f64)),
                SlabData::F32(v) => ch.extend(v[r].iter().map(|x| *x as f64)),
            }
        }
        self.next_z += nz;
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        let d = self.shape[self.shape.len() - 3];
        if self.next_z != d {
            return Err(Error::Invalid(format!(
                "output finished after z {} of {d}",
                self.next_z
            )));
        }
        match self.on_finish.take() {
            Some(f) => f(&self.shape, std::mem::take(&mut self.channels)),
            None => Ok(()),
        }
    }
}

/// How to read an input volume.
#[derive(Clone, Debug, Default)]
pub struct ReadOptions {
    /// OME-Zarr: the multiscale level to read (0 = full resolution).
    pub level: Option<usize>,
}

/// Reads an input volume `(D, H, W)` (format chosen by extension). The interim
/// implementation reads `.npy`; TIFF stacks and OME-Zarr follow.
pub fn read_volume(path: &Path, opts: &ReadOptions) -> Result<crate::models::Volume> {
    let _ = opts;
    crate::models::Volume::read(path)
}

/// Creates a writer for `path` (format chosen by extension). Refuses an existing `path`
/// unless `force`. The interim implementation buffers in memory and writes `.npy` at
/// `finish`; streaming writers (npy, TIFF, OME-Zarr) replace it.
pub fn create_writer(
    path: &Path,
    shape: &[usize],
    ty: OutType,
    force: bool,
) -> Result<Box<dyn SlabWriter>> {
    if path.exists() && !force {
        return Err(Error::io(
            path,
            "already exists; pass --force to overwrite it, or choose another output path",
        ));
    }
    let path = path.to_path_buf();
    let mut w = MemoryWriter::new(shape);
    w.on_finish = Some(Box::new(move |shape: &[usize], ch: Vec<Vec<f64>>| {
        let all: Vec<f64> = ch.concat();
        fn conv<T: NpyElement>(v: &[f64], f: impl Fn(f64) -> T) -> Vec<T> {
            v.iter().map(|x| f(*x)).collect()
        }
        match ty {
            OutType::U8 => npy::write(&path, shape, &conv(&all, |x| x as u8), force),
            OutType::U16 => npy::write(&path, shape, &conv(&all, |x| x as u16), force),
            OutType::F32 => npy::write(&path, shape, &conv(&all, |x| x as f32), force),
        }
    }));
    Ok(Box::new(w))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_writer_checks_order_and_completion() {
        let mut w = MemoryWriter::new(&[2, 3, 2, 2]);
        let slab: Vec<f32> = (0..16).map(|i| i as f32).collect();
        w.write_slab(0, SlabData::F32(&slab)).unwrap();
        assert!(w.write_slab(0, SlabData::F32(&slab)).is_err());
        assert!(Box::new(MemoryWriter::new(&[3, 2, 2])).finish().is_err());
        let slab1: Vec<f32> = (16..24).map(|i| i as f32).collect();
        w.write_slab(2, SlabData::F32(&slab1)).unwrap();
        // channel 0 holds z 0..3 of channel 0: slab values 0..8 then 16..20
        assert_eq!(
            &w.channels[0][..],
            &[0., 1., 2., 3., 4., 5., 6., 7., 16., 17., 18., 19.]
        );
        assert_eq!(&w.channels[1][8..], &[20., 21., 22., 23.]);
        Box::new(w).finish().unwrap();
    }
}
