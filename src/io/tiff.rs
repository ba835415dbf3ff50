//! TIFF stacks: one grayscale page per z (uint8, uint16 or float32).
//!
//! - Reading: a multi-page `.tif`/`.tiff` (plain or BigTIFF; uncompressed, LZW or deflate),
//!   or a folder of single-page TIFFs sorted by file name. int8, int16 and float16 pages are
//!   converted to float32 exactly. An ImageJ hyperstack with `channels=K` (pages ordered z,
//!   then channel) is returned as `(K, D, H, W)`.
//! - Writing ([`create_writer`]): `(D, H, W)` as D pages; `(K, D, H, W)` as an ImageJ
//!   hyperstack of D·K pages in ImageJ's order (z, then channel), so slabs stream straight to
//!   the file. Pages are uncompressed; BigTIFF is used past 4 GB.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ::tiff::decoder::{Decoder, DecodingResult, Limits};
use ::tiff::encoder::{colortype, TiffEncoder, TiffKind, TiffKindBig, TiffKindStandard};
use ::tiff::tags::Tag;

use crate::error::{Error, Result};
use crate::io::cleanup::TempPath;
use crate::io::volume::{
    before_slab, check_finish, check_slab, kdp, unsupported_dtype, ArrayData, OutType, SlabBuf,
    SlabData, SlabWriter,
};

const CORRUPT_FIX: &str = "the file was probably cut short while being copied or written, or \
                           is not a TIFF; write it again";

/// Pages read so far, in the first page's element type.
enum Pages {
    U8(Vec<u8>),
    U16(Vec<u16>),
    F32(Vec<f32>),
}

struct StackReader {
    pages: Option<Pages>,
    count: usize,
    hw: (usize, usize),
    converted: Option<&'static str>,
    channels: usize,
}

impl StackReader {
    fn new() -> StackReader {
        StackReader {
            pages: None,
            count: 0,
            hw: (0, 0),
            converted: None,
            channels: 1,
        }
    }

    /// Appends every page of one TIFF file.
    fn read_file(&mut self, path: &Path) -> Result<()> {
        let file = File::open(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::io(path, "file not found")
            } else {
                Error::io(path, format!("cannot open: {e}"))
            }
        })?;
        let corrupt = |e: ::tiff::TiffError| {
            Error::io(
                path,
                format!("cannot read the TIFF (truncated or corrupt: {e}); {CORRUPT_FIX}"),
            )
        };
        let mut dec = Decoder::new(BufReader::new(file))
            .map_err(corrupt)?
            .with_limits(Limits::unlimited());
        let first_file = self.count == 0;
        if first_file {
            if let Ok(Some(::tiff::decoder::ifd::Value::Ascii(desc))) =
                dec.find_tag(Tag::ImageDescription)
            {
                self.channels = imagej_channels(&desc).unwrap_or(1);
            }
        }
        loop {
            let page = self.count;
            let (w, h) = dec.dimensions().map_err(corrupt)?;
            let (w, h) = (w as usize, h as usize);
            match dec.colortype().map_err(corrupt)? {
                ::tiff::ColorType::Gray(_) => {}
                other => {
                    return Err(Error::io(
                        path,
                        format!(
                            "page {page} is {other:?}; volfuse reads grayscale stacks (one \
                             sample per pixel).\n  fix: convert the stack to grayscale"
                        ),
                    ))
                }
            }
            if page == 0 {
                self.hw = (h, w);
            } else if self.hw != (h, w) {
                return Err(Error::io(
                    path,
                    format!(
                        "page {page} is {h}×{w} (H×W) but the first page is {}×{}; every page \
                         of a stack must have the same size",
                        self.hw.0, self.hw.1
                    ),
                ));
            }
            let img = dec.read_image().map_err(corrupt)?;
            self.push(path, page, img)?;
            self.count += 1;
            if !dec.more_images() {
                break;
            }
            dec.next_image().map_err(corrupt)?;
        }
        Ok(())
    }

    fn push(&mut self, path: &Path, page: usize, img: DecodingResult) -> Result<()> {
        let (name, conv): (&'static str, Option<Vec<f32>>) = match &img {
            DecodingResult::U8(_) => ("uint8", None),
            DecodingResult::U16(_) => ("uint16", None),
            DecodingResult::F32(_) => ("float32", None),
            DecodingResult::I8(v) => ("int8", Some(v.iter().map(|x| *x as f32).collect())),
            DecodingResult::I16(v) => ("int16", Some(v.iter().map(|x| *x as f32).collect())),
            DecodingResult::F16(v) => ("float16", Some(v.iter().map(|x| x.to_f32()).collect())),
            DecodingResult::U32(_) => return Err(unsupported_dtype(path, "uint32")),
            DecodingResult::U64(_) => return Err(unsupported_dtype(path, "uint64")),
            DecodingResult::I32(_) => return Err(unsupported_dtype(path, "int32")),
            DecodingResult::I64(_) => return Err(unsupported_dtype(path, "int64")),
            DecodingResult::F64(_) => return Err(unsupported_dtype(path, "float64")),
        };
        if conv.is_some() {
            self.converted = Some(name);
        }
        let mismatch = |first: &str| {
            Error::io(
                path,
                format!("page {page} is {name} but the first page is {first}; every page must have one dtype"),
            )
        };
        match (&mut self.pages, img, conv) {
            (None, _, Some(v)) => self.pages = Some(Pages::F32(v)),
            (None, DecodingResult::U8(v), None) => self.pages = Some(Pages::U8(v)),
            (None, DecodingResult::U16(v), None) => self.pages = Some(Pages::U16(v)),
            (None, DecodingResult::F32(v), None) => self.pages = Some(Pages::F32(v)),
            (Some(Pages::F32(acc)), _, Some(v)) => acc.extend(v),
            (Some(Pages::U8(acc)), DecodingResult::U8(v), None) => acc.extend(v),
            (Some(Pages::U16(acc)), DecodingResult::U16(v), None) => acc.extend(v),
            (Some(Pages::F32(acc)), DecodingResult::F32(v), None) => acc.extend(v),
            (Some(Pages::U8(_)), ..) => return Err(mismatch("uint8")),
            (Some(Pages::U16(_)), ..) => return Err(mismatch("uint16")),
            (Some(Pages::F32(_)), ..) => return Err(mismatch("float32")),
            (None, ..) => unreachable!("every other type returned above"),
        }
        Ok(())
    }

    fn finish(self, path: &Path) -> Result<(Vec<usize>, ArrayData, Vec<String>)> {
        let (h, w) = self.hw;
        let data = match self.pages {
            Some(Pages::U8(v)) => ArrayData::U8(v),
            Some(Pages::U16(v)) => ArrayData::U16(v),
            Some(Pages::F32(v)) => ArrayData::F32(v),
            None => return Err(Error::io(path, "the TIFF stack has no pages")),
        };
        let mut notes = Vec::new();
        if let Some(t) = self.converted {
            notes.push(format!(
                "{}: {t} pages converted to float32 (exact)",
                path.display()
            ));
        }
        let k = self.channels;
        if k > 1 && self.count.is_multiple_of(k) {
            let d = self.count / k;
            // ImageJ order (z, c, y, x) → (c, z, y, x)
            let plane = h * w;
            fn reorder<T: Copy>(v: &[T], k: usize, d: usize, plane: usize) -> Vec<T> {
                let mut out = Vec::with_capacity(v.len());
                for c in 0..k {
                    for z in 0..d {
                        let s = (z * k + c) * plane;
                        out.extend_from_slice(&v[s..s + plane]);
                    }
                }
                out
            }
            let data = match data {
                ArrayData::U8(v) => ArrayData::U8(reorder(&v, k, d, plane)),
                ArrayData::U16(v) => ArrayData::U16(reorder(&v, k, d, plane)),
                ArrayData::F32(v) => ArrayData::F32(reorder(&v, k, d, plane)),
            };
            return Ok((vec![k, d, h, w], data, notes));
        }
        if self.count == 1 {
            return Ok((vec![h, w], data, notes));
        }
        Ok((vec![self.count, h, w], data, notes))
    }
}

/// `channels=K` of an ImageJ description.
fn imagej_channels(desc: &str) -> Option<usize> {
    if !desc.starts_with("ImageJ=") {
        return None;
    }
    desc.lines()
        .find_map(|l| l.strip_prefix("channels="))
        .and_then(|v| v.trim().parse().ok())
}

/// Reads a multi-page TIFF: `(D, H, W)` (a single page gives `(H, W)`), or `(K, D, H, W)`
/// for an ImageJ hyperstack with channels.
pub fn read(path: &Path) -> Result<(Vec<usize>, ArrayData, Vec<String>)> {
    let mut r = StackReader::new();
    r.read_file(path)?;
    r.finish(path)
}

/// Reads a folder of TIFFs (one or more pages each), stacked in file-name order.
pub fn read_folder(dir: &Path) -> Result<(Vec<usize>, ArrayData, Vec<String>)> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, format!("cannot list the folder: {e}")))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                    e.eq_ignore_ascii_case("tif") || e.eq_ignore_ascii_case("tiff")
                })
        })
        .collect();
    if files.is_empty() {
        return Err(Error::io(
            dir,
            "is a folder with neither .tif files (a stack, one per z) nor zarr metadata \
             (.zarray, .zgroup, zarr.json)",
        ));
    }
    files.sort();
    let mut r = StackReader::new();
    for f in &files {
        r.read_file(f)?;
    }
    r.channels = 1;
    let (mut shape, data, notes) = r.finish(dir)?;
    if shape.len() == 2 {
        shape.insert(0, 1);
    }
    Ok((shape, data, notes))
}

// ---------------------------------------------------------------------------------------------
// Writer
// ---------------------------------------------------------------------------------------------

/// The file, shared between the encoder and the writer (to flush and sync at the end).
#[derive(Clone)]
struct Shared(Arc<Mutex<BufWriter<File>>>);

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, BufWriter<File>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.lock().write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.lock().flush()
    }
}

impl Seek for Shared {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        self.lock().seek(pos)
    }
}

struct TiffWriter<K: TiffKind> {
    enc: TiffEncoder<Shared, K>,
    file: Shared,
    tmp: TempPath,
    target: PathBuf,
    shape: Vec<usize>,
    force: bool,
    next_z: usize,
    description: Option<String>,
    buf: SlabBuf,
}

/// Creates a streaming TIFF writer (see the module docs).
pub fn create_writer(
    path: &Path,
    shape: &[usize],
    ty: OutType,
    force: bool,
) -> Result<Box<dyn SlabWriter>> {
    let (k, d, plane) = kdp(shape);
    let (h, w) = (shape[shape.len() - 2], shape[shape.len() - 1]);
    if h > u32::MAX as usize || w > u32::MAX as usize {
        return Err(Error::Invalid(format!(
            "output shape {shape:?} is too large for TIFF"
        )));
    }
    let es = match ty {
        OutType::U8 => 1,
        OutType::U16 => 2,
        OutType::F32 => 4,
    };
    let bytes = (k * d * plane * es) as u64;
    let description = if k > 1 {
        format!(
            "ImageJ=1.11a\nimages={}\nchannels={k}\nslices={d}\nhyperstack=true\nmode=grayscale\nloop=false\n",
            k * d
        )
    } else {
        format!("ImageJ=1.11a\nimages={d}\nslices={d}\nloop=false\n")
    };
    let tmp = TempPath::beside(path)?;
    let file = OpenOptions::new()
        .write(true)
        .read(true)
        .create_new(true)
        .open(tmp.path())
        .map_err(|e| Error::io(path, format!("could not write the file: {e}")))?;
    let file = Shared(Arc::new(Mutex::new(BufWriter::with_capacity(
        1 << 20,
        file,
    ))));
    let err = |e: ::tiff::TiffError| Error::io(path, format!("could not write the TIFF: {e}"));
    #[allow(clippy::too_many_arguments)]
    fn make<K: TiffKind + 'static>(
        enc: TiffEncoder<Shared, K>,
        file: Shared,
        tmp: TempPath,
        path: &Path,
        shape: &[usize],
        ty: OutType,
        force: bool,
        description: String,
        plane: usize,
    ) -> Box<dyn SlabWriter> {
        Box::new(TiffWriter {
            enc,
            file,
            tmp,
            target: path.to_path_buf(),
            shape: shape.to_vec(),
            force,
            next_z: 0,
            description: Some(description),
            buf: SlabBuf::zeros(ty, plane),
        })
    }
    // classic TIFF offsets are 32-bit: leave room for the page directories
    Ok(if bytes + (k * d) as u64 * 512 + 4096 < u32::MAX as u64 {
        let enc = TiffEncoder::<_, TiffKindStandard>::new_generic(file.clone()).map_err(err)?;
        make(enc, file, tmp, path, shape, ty, force, description, plane)
    } else {
        let enc = TiffEncoder::<_, TiffKindBig>::new_generic(file.clone()).map_err(err)?;
        make(enc, file, tmp, path, shape, ty, force, description, plane)
    })
}

impl<K: TiffKind> TiffWriter<K> {
    fn page(&mut self) -> ::tiff::TiffResult<()> {
        let (h, w) = (
            self.shape[self.shape.len() - 2] as u32,
            self.shape[self.shape.len() - 1] as u32,
        );
        let desc = self.description.take();
        macro_rules! page {
            ($ct:ty, $v:expr) => {{
                let mut img = self.enc.new_image::<$ct>(w, h)?;
                if let Some(d) = &desc {
                    img.encoder().write_tag(Tag::ImageDescription, d.as_str())?;
                }
                img.write_data($v)
            }};
        }
        match &self.buf {
            SlabBuf::U8(v) => page!(colortype::Gray8, v),
            SlabBuf::U16(v) => page!(colortype::Gray16, v),
            SlabBuf::F32(v) => page!(colortype::Gray32Float, v),
        }
    }
}

impl<K: TiffKind> SlabWriter for TiffWriter<K> {
    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn write_slab(&mut self, z0: usize, slab: SlabData<'_>) -> Result<()> {
        let nz = check_slab(&self.shape, self.next_z, z0, slab.len())?;
        let _gate = before_slab()?;
        let (k, _, plane) = kdp(&self.shape);
        for z in 0..nz {
            for c in 0..k {
                let s = (c * nz + z) * plane;
                self.buf.copy_from(0, slab, s..s + plane);
                self.page().map_err(|e| {
                    Error::io(&self.target, format!("could not write the TIFF: {e}"))
                })?;
            }
        }
        self.next_z += nz;
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<()> {
        check_finish(&self.target, &self.shape, self.next_z, self.force)?;
        let TiffWriter {
            enc,
            file,
            tmp,
            target,
            ..
        } = *self;
        drop(enc);
        {
            let mut f = file.lock();
            let r = f.flush().and_then(|_| f.get_ref().sync_all());
            r.map_err(|e| Error::io(&target, format!("could not write the file: {e}")))?;
        }
        drop(file);
        tmp.commit(&target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::volume::{create_writer, read_array, read_volume, ReadOptions};

    fn dir(name: &str) -> PathBuf {
        crate::io::volume::test_dir("tiff", name)
    }

    #[test]
    fn truncated_and_non_tiff_files_are_refused() {
        let d = dir("trunc");
        let p = d.join("v.tif");
        let vals: Vec<u16> = (0..4 * 32 * 40).map(|i| (i * 7 % 65521) as u16).collect();
        let mut w = create_writer(&p, &[4, 32, 40], OutType::U16, false).unwrap();
        w.write_slab(0, SlabData::U16(&vals)).unwrap();
        w.finish().unwrap();
        assert!(read_volume(&p, &ReadOptions::default()).is_ok());
        let bytes = std::fs::read(&p).unwrap();
        for cut in [bytes.len() / 2, bytes.len() - 20, 6] {
            std::fs::write(&p, &bytes[..cut]).unwrap();
            let e = read_volume(&p, &ReadOptions::default())
                .unwrap_err()
                .to_string();
            assert!(e.contains("truncated or corrupt"), "cut {cut}: {e}");
        }
        std::fs::write(&p, b"not a tiff at all").unwrap();
        let e = read_volume(&p, &ReadOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("truncated or corrupt"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn single_page_is_2d_and_refused_as_a_volume() {
        let d = dir("page");
        let p = d.join("img.tif");
        let mut w = create_writer(&p, &[1, 8, 9], OutType::U8, false).unwrap();
        w.write_slab(0, SlabData::U8(&[3u8; 72])).unwrap();
        w.finish().unwrap();
        let (shape, _, _) = read_array(&p, &ReadOptions::default()).unwrap();
        assert_eq!(shape, vec![8, 9]);
        let e = read_volume(&p, &ReadOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("must be 3-D") && e.contains("depth axis"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn folder_of_pages_is_stacked_in_name_order() {
        let d = dir("folder");
        let stack = d.join("stack");
        std::fs::create_dir_all(&stack).unwrap();
        // written out of order: names decide
        for z in [2usize, 0, 1] {
            let p = stack.join(format!("slice_{z:03}.tif"));
            let vals: Vec<f32> = (0..6 * 5).map(|i| (z * 100 + i) as f32 + 0.5).collect();
            let mut w = create_writer(&p, &[1, 6, 5], OutType::F32, false).unwrap();
            w.write_slab(0, SlabData::F32(&vals)).unwrap();
            w.finish().unwrap();
        }
        let v = read_volume(&stack, &ReadOptions::default()).unwrap();
        assert_eq!(v.shape(), [3, 6, 5]);
        match v.data() {
            ArrayData::F32(x) => {
                for z in 0..3 {
                    assert_eq!(x[z * 30 + 7], (z * 100 + 7) as f32 + 0.5);
                }
            }
            other => panic!("dtype {}", other.dtype()),
        }
        let empty = d.join("empty");
        std::fs::create_dir_all(&empty).unwrap();
        let e = read_volume(&empty, &ReadOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("neither .tif files"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
