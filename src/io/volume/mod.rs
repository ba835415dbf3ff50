//! Output volumes written z-slab by z-slab, so a tiled run never holds the whole output.
//!
//! A [`SlabWriter`] receives consecutive slabs along the first spatial axis (z) of an
//! array of shape `(D, H, W)` (labels) or `(K, D, H, W)` (probabilities, logits). Each slab
//! is `(nz, H, W)` or `(K, nz, H, W)` in C order, and slabs arrive in order, covering
//! `0..D` exactly once. [`SlabWriter::finish`] makes the output visible (rename of the
//! temporary file); dropping a writer without `finish` leaves nothing at the output path.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::io::cleanup::TempPath;
use crate::io::npy::{self, NpyData, NpyElement};

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
    if per_z == 0 || !len.is_multiple_of(per_z) {
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
    /// OME-Zarr: the multiscale level to read (0 = full resolution, the default).
    pub level: Option<usize>,
}

/// The elements of an array read from a file (uint8, uint16 or float32).
pub use crate::models::planes::VolumeData as ArrayData;

/// Which Zarr format a `.zarr` output is written in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ZarrVersion {
    V2,
    #[default]
    V3,
}

/// How to write an output array (see [`create_writer_with`]).
#[derive(Clone, Debug, Default)]
pub struct WriteOptions {
    /// Replace an existing output.
    pub force: bool,
    /// `.zarr` outputs: Zarr v3 (OME-NGFF 0.5, the default) or v2 (OME-NGFF 0.4).
    pub zarr_version: ZarrVersion,
    /// `.zarr` outputs: chunk edge along z, y and x (default 64, clamped to the shape).
    pub chunk: Option<usize>,
}

/// The file formats volfuse reads and writes, chosen by extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// NumPy `.npy`.
    Npy,
    /// A multi-page TIFF (`.tif`, `.tiff`): one page per z.
    Tiff,
    /// A folder of single-page TIFFs, one per z, sorted by file name (input only).
    TiffFolder,
    /// OME-Zarr (v2 or v3) or a plain Zarr array: a `.zarr` folder.
    Zarr,
}

const FORMATS: &str = ".npy, .tif/.tiff (a multi-page stack), .zarr (OME-Zarr v2/v3 or a plain zarr array), or a folder of single-page .tif files";

fn has_ext(path: &Path, exts: &[&str]) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| exts.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

/// The format of an input path: by extension, or by what a folder holds.
pub fn input_format(path: &Path) -> Result<Format> {
    if has_ext(path, &["npy"]) {
        return Ok(Format::Npy);
    }
    if has_ext(path, &["tif", "tiff"]) {
        return Ok(Format::Tiff);
    }
    if has_ext(path, &["zarr"]) {
        return Ok(Format::Zarr);
    }
    if path.is_dir() {
        if [".zarray", ".zgroup", "zarr.json"]
            .iter()
            .any(|f| path.join(f).is_file())
        {
            return Ok(Format::Zarr);
        }
        return Ok(Format::TiffFolder);
    }
    if !path.exists() {
        return Err(Error::io(path, "file not found"));
    }
    Err(Error::io(
        path,
        format!("unknown volume format (by its extension); volfuse reads {FORMATS}"),
    ))
}

/// The format of an output path, by extension.
pub fn output_format(path: &Path) -> Result<Format> {
    if has_ext(path, &["npy"]) {
        Ok(Format::Npy)
    } else if has_ext(path, &["tif", "tiff"]) {
        Ok(Format::Tiff)
    } else if has_ext(path, &["zarr"]) {
        Ok(Format::Zarr)
    } else {
        Err(Error::io(
            path,
            "unknown output format; name the output .npy, .tif/.tiff or .zarr",
        ))
    }
}

/// Reads an array (any rank) from `.npy`, a TIFF stack or Zarr. uint8, uint16 and float32
/// are returned as they are; int8, int16 and float16 are converted to float32 exactly (the
/// returned notes say so); other dtypes are refused with a message naming them.
pub fn read_array(path: &Path, opts: &ReadOptions) -> Result<(Vec<usize>, ArrayData, Vec<String>)> {
    let format = input_format(path)?;
    if format != Format::Zarr && opts.level.is_some_and(|l| l > 0) {
        return Err(Error::io(
            path,
            "has a single scale; multiscale levels (--level) exist only in OME-Zarr inputs",
        ));
    }
    match format {
        Format::Npy => {
            let npy = crate::io::npy::read(path)?;
            let mut notes = Vec::new();
            let dtype = npy.dtype();
            let data = match npy.data {
                NpyData::U8(v) => ArrayData::U8(v),
                NpyData::U16(v) => ArrayData::U16(v),
                NpyData::F32(v) => ArrayData::F32(v),
                d @ (NpyData::F16(_) | NpyData::I16(_)) => {
                    notes.push(format!(
                        "{}: {} converted to float32 (exact)",
                        path.display(),
                        dtype_name(dtype)
                    ));
                    ArrayData::F32(d.into_f32())
                }
                _ => return Err(unsupported_dtype(path, dtype_name(dtype))),
            };
            Ok((npy.shape, data, notes))
        }
        Format::Tiff => crate::io::tiff::read(path),
        Format::TiffFolder => crate::io::tiff::read_folder(path),
        Format::Zarr => crate::io::zarr::read(path, opts.level.unwrap_or(0)),
    }
}

fn dtype_name(d: crate::io::DType) -> &'static str {
    use crate::io::DType;
    match d {
        DType::F32 => "float32",
        DType::F64 => "float64",
        DType::F16 => "float16",
        DType::U8 => "uint8",
        DType::U16 => "uint16",
        DType::U32 => "uint32",
        DType::I16 => "int16",
        DType::I32 => "int32",
        DType::I64 => "int64",
        DType::Bool => "bool",
    }
}

/// The error for a volume dtype volfuse does not take.
pub(crate) fn unsupported_dtype(path: &Path, dtype: &str) -> Error {
    Error::io(
        path,
        format!(
            "volume dtype {dtype} is not supported: volfuse takes uint8, uint16 or float32 \
             (int8, int16 and float16 are converted to float32).\n  fix: convert the volume, \
             e.g. in NumPy vol.astype(numpy.float32)"
        ),
    )
}

/// Reads an input volume `(D, H, W)`: `.npy`, a TIFF stack (a multi-page `.tif`, or a
/// folder of single-page TIFFs sorted by name), or OME-Zarr v2/v3 (`.zarr`; the multiscale
/// level `opts.level`, default 0) or a plain zarr array. Leading axes of size 1 (OME-Zarr's
/// t, c) are dropped. Also returns notes (dtype conversions) for the user.
pub fn read_volume_noted(
    path: &Path,
    opts: &ReadOptions,
) -> Result<(crate::models::Volume, Vec<String>)> {
    let (shape, data, notes) = read_array(path, opts)?;
    let mut dims: Vec<usize> = shape.clone();
    while dims.len() > 3 && dims[0] == 1 {
        dims.remove(0);
    }
    let shape3: [usize; 3] = dims[..].try_into().map_err(|_| {
        Error::io(
            path,
            format!(
                "the volume must be 3-D (D, H, W), got shape {shape:?}{}",
                if shape.len() == 2 {
                    ".\n  fix: a single image needs a depth axis, e.g. numpy.save(path, img[None]), \
                     or a TIFF stack with one page per z"
                } else if shape.len() > 3 {
                    ".\n  fix: volfuse takes one channel; select it first"
                } else {
                    ""
                }
            ),
        )
    })?;
    let vol = crate::models::Volume::new(shape3, data).map_err(|e| match e {
        Error::Invalid(m) => Error::io(path, m),
        e => e,
    })?;
    Ok((vol, notes))
}

/// Reads an input volume `(D, H, W)`; see [`read_volume_noted`] (this drops the notes).
pub fn read_volume(path: &Path, opts: &ReadOptions) -> Result<crate::models::Volume> {
    read_volume_noted(path, opts).map(|(v, _)| v)
}

/// Creates a streaming writer for `path`, the format chosen by extension (`.npy`,
/// `.tif`/`.tiff`, `.zarr` as OME-Zarr v3). Refuses an existing `path` unless `force`, and
/// a missing folder. Nothing appears at `path` until [`SlabWriter::finish`].
pub fn create_writer(
    path: &Path,
    shape: &[usize],
    ty: OutType,
    force: bool,
) -> Result<Box<dyn SlabWriter>> {
    create_writer_with(
        path,
        shape,
        ty,
        &WriteOptions {
            force,
            ..WriteOptions::default()
        },
    )
}

/// [`create_writer`] with options (Zarr version, chunk size).
pub fn create_writer_with(
    path: &Path,
    shape: &[usize],
    ty: OutType,
    opts: &WriteOptions,
) -> Result<Box<dyn SlabWriter>> {
    let format = output_format(path)?;
    check_slab(shape, 0, 0, 0)?;
    if shape.contains(&0) {
        return Err(Error::Invalid(format!(
            "cannot write {}: output shape {shape:?} has an empty axis",
            path.display()
        )));
    }
    if format != Format::Zarr && path.is_dir() {
        return Err(Error::io(
            path,
            "is a folder; give the path of a file to write",
        ));
    }
    crate::io::check_output(path, opts.force)?;
    Ok(match format {
        Format::Npy => Box::new(NpyWriter::create(path, shape, ty, opts.force)?),
        Format::Tiff => crate::io::tiff::create_writer(path, shape, ty, opts.force)?,
        Format::Zarr => crate::io::zarr::create_writer(path, shape, ty, opts)?,
        Format::TiffFolder => unreachable!("not an output format"),
    })
}

// ---------------------------------------------------------------------------------------------
// Slab buffers shared by the writers
// ---------------------------------------------------------------------------------------------

/// A typed buffer of output values, filled from slabs of any type (converted as Rust's `as`
/// does for floats → integers: saturating, NaN → 0; integers are clamped).
#[derive(Clone, Debug)]
pub(crate) enum SlabBuf {
    U8(Vec<u8>),
    U16(Vec<u16>),
    F32(Vec<f32>),
}

impl SlabBuf {
    pub(crate) fn zeros(ty: OutType, n: usize) -> SlabBuf {
        match ty {
            OutType::U8 => SlabBuf::U8(vec![0; n]),
            OutType::U16 => SlabBuf::U16(vec![0; n]),
            OutType::F32 => SlabBuf::F32(vec![0.0; n]),
        }
    }

    /// Copies `src[range]` (converted) to `self[dst..]`.
    pub(crate) fn copy_from(
        &mut self,
        dst: usize,
        src: SlabData<'_>,
        range: std::ops::Range<usize>,
    ) {
        /// `d[i] = f(s[i])`.
        fn map<S: Copy, D>(d: &mut [D], s: &[S], f: impl Fn(S) -> D) {
            for (o, x) in d.iter_mut().zip(s) {
                *o = f(*x);
            }
        }
        let n = range.len();
        match (self, src) {
            (SlabBuf::U8(d), SlabData::U8(s)) => d[dst..dst + n].copy_from_slice(&s[range]),
            (SlabBuf::U8(d), SlabData::U16(s)) => map(&mut d[dst..dst + n], &s[range], |x| {
                x.min(u8::MAX as u16) as u8
            }),
            (SlabBuf::U8(d), SlabData::F32(s)) => map(&mut d[dst..dst + n], &s[range], |x| x as u8),
            (SlabBuf::U16(d), SlabData::U8(s)) => {
                map(&mut d[dst..dst + n], &s[range], |x| x as u16)
            }
            (SlabBuf::U16(d), SlabData::U16(s)) => d[dst..dst + n].copy_from_slice(&s[range]),
            (SlabBuf::U16(d), SlabData::F32(s)) => {
                map(&mut d[dst..dst + n], &s[range], |x| x as u16)
            }
            (SlabBuf::F32(d), SlabData::U8(s)) => {
                map(&mut d[dst..dst + n], &s[range], |x| x as f32)
            }
            (SlabBuf::F32(d), SlabData::U16(s)) => {
                map(&mut d[dst..dst + n], &s[range], |x| x as f32)
            }
            (SlabBuf::F32(d), SlabData::F32(s)) => d[dst..dst + n].copy_from_slice(&s[range]),
        }
    }

    /// The values `[range]` as little-endian bytes.
    pub(crate) fn le_bytes(&self, range: std::ops::Range<usize>) -> std::borrow::Cow<'_, [u8]> {
        fn le<T: NpyElement>(v: &[T]) -> std::borrow::Cow<'_, [u8]> {
            if cfg!(target_endian = "little") {
                std::borrow::Cow::Borrowed(bytemuck::cast_slice(v))
            } else {
                let w: Vec<T> = v.iter().map(|x| x.to_le()).collect();
                std::borrow::Cow::Owned(bytemuck::cast_slice(&w).to_vec())
            }
        }
        match self {
            SlabBuf::U8(v) => le(&v[range]),
            SlabBuf::U16(v) => le(&v[range]),
            SlabBuf::F32(v) => le(&v[range]),
        }
    }
}

/// `(K, D, H·W)` of a writer's shape.
pub(crate) fn kdp(shape: &[usize]) -> (usize, usize, usize) {
    match shape {
        [d, h, w] => (1, *d, h * w),
        [k, d, h, w] => (*k, *d, h * w),
        _ => (1, 0, 0),
    }
}

/// What every streaming writer checks before it commits: all `D` z-planes of `shape` were
/// written, and (without `force`) `target` did not appear meanwhile.
pub(crate) fn check_finish(
    target: &Path,
    shape: &[usize],
    next_z: usize,
    force: bool,
) -> Result<()> {
    let (_, d, _) = kdp(shape);
    if next_z != d {
        return Err(Error::io(
            target,
            format!("output finished after z {next_z} of {d}; nothing was written"),
        ));
    }
    if !force && target.exists() {
        return Err(Error::io(
            target,
            "appeared while writing; pass --force to overwrite it",
        ));
    }
    Ok(())
}

/// Test hook: `VOLFUSE_TEST_SLAB_DELAY_MS` makes every streaming writer sleep before each
/// slab, so the Ctrl-C test can interrupt a run mid-write. Returns the guard to hold while
/// writing the slab (refused after an interrupt).
pub(crate) fn before_slab() -> Result<std::sync::RwLockReadGuard<'static, ()>> {
    if let Some(ms) = std::env::var("VOLFUSE_TEST_SLAB_DELAY_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
    crate::io::cleanup::write_guard()
}

// ---------------------------------------------------------------------------------------------
// .npy streaming writer
// ---------------------------------------------------------------------------------------------

/// Writes a `.npy` file slab by slab: the header goes in first, each channel's part of a
/// slab is written at its own offset, and the finished file is renamed into place.
pub struct NpyWriter {
    tmp: TempPath,
    file: File,
    target: PathBuf,
    shape: Vec<usize>,
    ty: OutType,
    force: bool,
    header_len: u64,
    next_z: usize,
}

impl NpyWriter {
    pub fn create(path: &Path, shape: &[usize], ty: OutType, force: bool) -> Result<NpyWriter> {
        let dtype = match ty {
            OutType::U8 => crate::io::DType::U8,
            OutType::U16 => crate::io::DType::U16,
            OutType::F32 => crate::io::DType::F32,
        };
        let header = npy::header_bytes(dtype, shape);
        let total = shape
            .iter()
            .try_fold(dtype.size() as u64, |a, &s| a.checked_mul(s as u64))
            .and_then(|n| n.checked_add(header.len() as u64))
            .ok_or_else(|| Error::Invalid(format!("output shape {shape:?} is too large")))?;
        let tmp = TempPath::beside(path)?;
        let ioerr = |e: std::io::Error| Error::io(path, format!("could not write the file: {e}"));
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(tmp.path())
            .map_err(ioerr)?;
        file.write_all(&header).map_err(ioerr)?;
        file.set_len(total).map_err(ioerr)?;
        Ok(NpyWriter {
            tmp,
            file,
            target: path.to_path_buf(),
            shape: shape.to_vec(),
            ty,
            force,
            header_len: header.len() as u64,
            next_z: 0,
        })
    }
}

impl SlabWriter for NpyWriter {
    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn write_slab(&mut self, z0: usize, slab: SlabData<'_>) -> Result<()> {
        let nz = check_slab(&self.shape, self.next_z, z0, slab.len())?;
        let _gate = before_slab()?;
        let (k, d, plane) = kdp(&self.shape);
        let per_k = nz * plane;
        let es = match self.ty {
            OutType::U8 => 1,
            OutType::U16 => 2,
            OutType::F32 => 4,
        };
        let mut buf = SlabBuf::zeros(self.ty, per_k);
        for c in 0..k {
            buf.copy_from(0, slab, c * per_k..(c + 1) * per_k);
            let off = self.header_len + ((c * d + z0) * plane * es) as u64;
            let r = self
                .file
                .seek(SeekFrom::Start(off))
                .and_then(|_| self.file.write_all(&buf.le_bytes(0..per_k)));
            r.map_err(|e| Error::io(&self.target, format!("could not write the file: {e}")))?;
        }
        self.next_z += nz;
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<()> {
        check_finish(&self.target, &self.shape, self.next_z, self.force)?;
        self.file
            .sync_all()
            .map_err(|e| Error::io(&self.target, format!("could not write the file: {e}")))?;
        let NpyWriter {
            tmp, file, target, ..
        } = *self;
        drop(file);
        tmp.commit(&target)
    }
}

/// A fresh, empty scratch directory `volfuse-{tag}-{pid}-{name}` of the unit tests.
#[cfg(test)]
pub(crate) fn test_dir(tag: &str, name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("volfuse-{tag}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[cfg(test)]
mod tests;
