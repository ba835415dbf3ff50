//! NumPy `.npy` files: read format 1.0, 2.0 and 3.0; write 1.0 (2.0 when the header needs it).
//!
//! Only C-order, little-endian (or single-byte) arrays of plain numeric dtypes are supported;
//! anything else is refused with a message that says how to convert the array in NumPy.
//!
//! ```no_run
//! use volfuse::io::npy::{self, Npy};
//! # fn main() -> volfuse::Result<()> {
//! let volume: Npy = npy::read("raw.npy".as_ref())?;
//! let values: Vec<f32> = volume.to_f32();
//! npy::write("copy.npy".as_ref(), &volume.shape, &values, false)?;
//! # Ok(()) }
//! ```

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

use half::f16;

use crate::error::{Error, Result};

const MAGIC: &[u8; 6] = b"\x93NUMPY";
/// Headers (magic .. newline) are padded to a multiple of this, as NumPy does.
const ALIGN: usize = 64;
/// Refuse headers larger than this (NumPy itself refuses > 10000 bytes unless told otherwise).
const MAX_HEADER: usize = 1 << 24;

const SUPPORTED: &str =
    "float32 '<f4', float64 '<f8', float16 '<f2', uint8 '|u1', uint16 '<u2', uint32 '<u4', \
     int16 '<i2', int32 '<i4', int64 '<i8', bool '|b1'";

/// Element type of an array.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F64,
    F16,
    U8,
    U16,
    U32,
    I16,
    I32,
    I64,
    Bool,
}

impl DType {
    /// The NumPy `descr` string volfuse writes for this dtype.
    pub fn descr(self) -> &'static str {
        match self {
            DType::F32 => "<f4",
            DType::F64 => "<f8",
            DType::F16 => "<f2",
            DType::U8 => "|u1",
            DType::U16 => "<u2",
            DType::U32 => "<u4",
            DType::I16 => "<i2",
            DType::I32 => "<i4",
            DType::I64 => "<i8",
            DType::Bool => "|b1",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::U8 | DType::Bool => 1,
            DType::F16 | DType::U16 | DType::I16 => 2,
            DType::F32 | DType::U32 | DType::I32 => 4,
            DType::F64 | DType::I64 => 8,
        }
    }

    /// Parses a NumPy `descr` such as `<f4` or `|u1`.
    fn from_descr(descr: &str) -> std::result::Result<DType, String> {
        let mut chars = descr.chars();
        let order = chars.next().unwrap_or(' ');
        let code = chars.as_str();
        let (order, code) = if matches!(order, '<' | '>' | '|' | '=') {
            (order, code)
        } else {
            // NumPy always writes a byte-order character; be lenient with hand-made headers.
            ('=', descr)
        };
        let dtype = match code {
            "f4" => DType::F32,
            "f8" => DType::F64,
            "f2" => DType::F16,
            "u1" => DType::U8,
            "u2" => DType::U16,
            "u4" => DType::U32,
            "i2" => DType::I16,
            "i4" => DType::I32,
            "i8" => DType::I64,
            "b1" | "?" => DType::Bool,
            _ => {
                return Err(format!(
                    "unsupported dtype '{descr}'{}; volfuse reads {SUPPORTED}.\n  \
                     fix: convert in NumPy, e.g. numpy.save(path, arr.astype(numpy.float32))",
                    describe_unsupported(code)
                ))
            }
        };
        if dtype.size() > 1 {
            match order {
                '<' => {}
                '>' => {
                    return Err(format!(
                        "big-endian data ('{descr}') is not supported.\n  fix: convert to \
                         little-endian in NumPy: numpy.save(path, arr.astype(arr.dtype.newbyteorder('<')))"
                    ))
                }
                _ => {
                    return Err(format!(
                        "the dtype '{descr}' does not say its byte order.\n  fix: save the \
                         array again with numpy.save, which writes '<' or '>'"
                    ))
                }
            }
        }
        Ok(dtype)
    }
}

fn describe_unsupported(code: &str) -> &'static str {
    match code.chars().next() {
        Some('c') => " (complex)",
        Some('O') => " (Python objects, pickled)",
        Some('U') | Some('S') | Some('a') => " (strings)",
        Some('M') | Some('m') => " (dates/times)",
        Some('V') => " (raw bytes / structured)",
        _ => "",
    }
}

/// The elements of an array, one variant per supported dtype.
#[derive(Debug, Clone, PartialEq)]
pub enum NpyData {
    F32(Vec<f32>),
    F64(Vec<f64>),
    F16(Vec<f16>),
    U8(Vec<u8>),
    U16(Vec<u16>),
    U32(Vec<u32>),
    I16(Vec<i16>),
    I32(Vec<i32>),
    I64(Vec<i64>),
    Bool(Vec<bool>),
}

impl NpyData {
    pub fn dtype(&self) -> DType {
        match self {
            NpyData::F32(_) => DType::F32,
            NpyData::F64(_) => DType::F64,
            NpyData::F16(_) => DType::F16,
            NpyData::U8(_) => DType::U8,
            NpyData::U16(_) => DType::U16,
            NpyData::U32(_) => DType::U32,
            NpyData::I16(_) => DType::I16,
            NpyData::I32(_) => DType::I32,
            NpyData::I64(_) => DType::I64,
            NpyData::Bool(_) => DType::Bool,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            NpyData::F32(v) => v.len(),
            NpyData::F64(v) => v.len(),
            NpyData::F16(v) => v.len(),
            NpyData::U8(v) => v.len(),
            NpyData::U16(v) => v.len(),
            NpyData::U32(v) => v.len(),
            NpyData::I16(v) => v.len(),
            NpyData::I32(v) => v.len(),
            NpyData::I64(v) => v.len(),
            NpyData::Bool(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Converts every element to f32 (integers above 2^24 and f64 values are rounded; bool
    /// becomes 0.0 / 1.0).
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            NpyData::F32(v) => v.clone(),
            NpyData::F64(v) => v.iter().map(|&x| x as f32).collect(),
            NpyData::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            NpyData::U8(v) => v.iter().map(|&x| x as f32).collect(),
            NpyData::U16(v) => v.iter().map(|&x| x as f32).collect(),
            NpyData::U32(v) => v.iter().map(|&x| x as f32).collect(),
            NpyData::I16(v) => v.iter().map(|&x| x as f32).collect(),
            NpyData::I32(v) => v.iter().map(|&x| x as f32).collect(),
            NpyData::I64(v) => v.iter().map(|&x| x as f32).collect(),
            NpyData::Bool(v) => v.iter().map(|&x| if x { 1.0 } else { 0.0 }).collect(),
        }
    }

    /// Like [`NpyData::to_f32`] but reuses the buffer when the data already is f32.
    pub fn into_f32(self) -> Vec<f32> {
        match self {
            NpyData::F32(v) => v,
            other => other.to_f32(),
        }
    }
}

/// An n-dimensional array read from or written to a `.npy` file, in C order.
#[derive(Debug, Clone, PartialEq)]
pub struct Npy {
    pub shape: Vec<usize>,
    pub data: NpyData,
}

impl Npy {
    /// An array from its shape and elements; fails when they do not agree.
    pub fn new(shape: Vec<usize>, data: NpyData) -> Result<Npy> {
        let n = element_count(&shape)
            .ok_or_else(|| Error::Invalid(format!("array shape {shape:?} is too large")))?;
        if n != data.len() {
            return Err(Error::Invalid(format!(
                "array shape {shape:?} needs {n} elements but {} were given",
                data.len()
            )));
        }
        Ok(Npy { shape, data })
    }

    /// Reads a `.npy` file.
    pub fn read(path: &Path) -> Result<Npy> {
        read(path)
    }

    /// Parses the bytes of a whole `.npy` file.
    pub fn from_bytes(bytes: &[u8]) -> Result<Npy> {
        let mut r = bytes;
        decode(&mut r, bytes.len() as u64).map_err(|m| Error::io("<in-memory .npy>", m))
    }

    /// The bytes of this array as a `.npy` file.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(ALIGN + self.data.len() * self.dtype().size());
        // Writing to a Vec cannot fail.
        let _ = self.write_to(&mut out);
        out
    }

    /// Writes this array to `path` (see [`write()`] for the overwrite rules).
    pub fn write(&self, path: &Path, force: bool) -> Result<()> {
        super::write_atomic(path, force, |w| self.write_to(w))
    }

    fn write_to(&self, w: &mut impl std::io::Write) -> std::io::Result<()> {
        w.write_all(&header_bytes(self.dtype(), &self.shape))?;
        match &self.data {
            NpyData::F32(v) => write_elements(w, v),
            NpyData::F64(v) => write_elements(w, v),
            NpyData::F16(v) => write_elements(w, v),
            NpyData::U8(v) => write_elements(w, v),
            NpyData::U16(v) => write_elements(w, v),
            NpyData::U32(v) => write_elements(w, v),
            NpyData::I16(v) => write_elements(w, v),
            NpyData::I32(v) => write_elements(w, v),
            NpyData::I64(v) => write_elements(w, v),
            NpyData::Bool(v) => {
                let bytes: Vec<u8> = v.iter().map(|&b| b as u8).collect();
                w.write_all(&bytes)
            }
        }
    }

    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The elements as f32 (see [`NpyData::to_f32`]).
    pub fn to_f32(&self) -> Vec<f32> {
        self.data.to_f32()
    }

    /// The elements as f32, without a copy when they already are.
    pub fn into_f32(self) -> Vec<f32> {
        self.data.into_f32()
    }

    /// The elements when the array is float32.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            NpyData::F32(v) => Some(v),
            _ => None,
        }
    }
}

/// A plain element type that can be written to (and read from) `.npy` as is.
pub trait NpyElement: bytemuck::Pod {
    const DTYPE: DType;
    /// The value with its bytes in little-endian order (a no-op on little-endian hosts).
    fn to_le(self) -> Self;
}

macro_rules! int_element {
    ($t:ty, $d:ident) => {
        impl NpyElement for $t {
            const DTYPE: DType = DType::$d;
            fn to_le(self) -> Self {
                <$t>::to_le(self)
            }
        }
    };
}
int_element!(u8, U8);
int_element!(u16, U16);
int_element!(u32, U32);
int_element!(i16, I16);
int_element!(i32, I32);
int_element!(i64, I64);

impl NpyElement for f32 {
    const DTYPE: DType = DType::F32;
    fn to_le(self) -> Self {
        f32::from_bits(self.to_bits().to_le())
    }
}
impl NpyElement for f64 {
    const DTYPE: DType = DType::F64;
    fn to_le(self) -> Self {
        f64::from_bits(self.to_bits().to_le())
    }
}
impl NpyElement for f16 {
    const DTYPE: DType = DType::F16;
    fn to_le(self) -> Self {
        f16::from_bits(self.to_bits().to_le())
    }
}

/// Reads a `.npy` file.
pub fn read(path: &Path) -> Result<Npy> {
    let mut file = File::open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::io(path, "file not found")
        } else {
            Error::io(path, format!("cannot open: {e}"))
        }
    })?;
    let len = file
        .metadata()
        .map_err(|e| Error::io(path, format!("cannot read file metadata: {e}")))?
        .len();
    decode(&mut file, len).map_err(|m| Error::io(path, m))
}

/// Writes `data` with `shape` (C order) to `path` as a `.npy` file.
///
/// The file is written to a temporary file beside `path` and renamed into place. An existing
/// `path` is replaced only when `force` is true.
pub fn write<T: NpyElement>(path: &Path, shape: &[usize], data: &[T], force: bool) -> Result<()> {
    let n = element_count(shape)
        .ok_or_else(|| Error::Invalid(format!("array shape {shape:?} is too large")))?;
    if n != data.len() {
        return Err(Error::Invalid(format!(
            "cannot write {}: shape {shape:?} needs {n} elements but {} were given",
            path.display(),
            data.len()
        )));
    }
    super::write_atomic(path, force, |w| {
        w.write_all(&header_bytes(T::DTYPE, shape))?;
        write_elements(w, data)
    })
}

fn element_count(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))
}

fn write_elements<T: NpyElement>(w: &mut impl std::io::Write, data: &[T]) -> std::io::Result<()> {
    if cfg!(target_endian = "little") {
        w.write_all(bytemuck::cast_slice(data))
    } else {
        for chunk in data.chunks(1 << 16) {
            let le: Vec<T> = chunk.iter().map(|&x| x.to_le()).collect();
            w.write_all(bytemuck::cast_slice(&le))?;
        }
        Ok(())
    }
}

/// The full header (magic, version, length, dict, padding, newline) for an array.
pub(crate) fn header_bytes(dtype: DType, shape: &[usize]) -> Vec<u8> {
    let shape_repr = match shape {
        [] => "()".to_string(),
        [n] => format!("({n},)"),
        dims => format!(
            "({})",
            dims.iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let dict = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': {shape_repr}, }}",
        dtype.descr()
    );
    // Version 1.0 stores the header length in a u16; bigger headers need 2.0 (u32).
    let padded = |prefix: usize| {
        let unpadded = prefix + dict.len() + 1;
        dict.len() + 1 + (ALIGN - unpadded % ALIGN) % ALIGN
    };
    let (major, prefix) = if padded(10) <= u16::MAX as usize {
        (1u8, 10)
    } else {
        (2u8, 12)
    };
    let header_len = padded(prefix);
    let mut out = Vec::with_capacity(prefix + header_len);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[major, 0]);
    if major == 1 {
        out.extend_from_slice(&(header_len as u16).to_le_bytes());
    } else {
        out.extend_from_slice(&(header_len as u32).to_le_bytes());
    }
    out.extend_from_slice(dict.as_bytes());
    out.resize(prefix + header_len - 1, b' ');
    out.push(b'\n');
    out
}

const TRUNCATED_FIX: &str =
    "the file was probably cut short while being copied or written; write it again";

/// Reads exactly `buf.len()` bytes or explains what is missing.
fn read_part(r: &mut impl Read, buf: &mut [u8], what: &str) -> std::result::Result<(), String> {
    let mut done = 0;
    while done < buf.len() {
        match r.read(&mut buf[done..]) {
            Ok(0) => {
                return Err(format!(
                    "file is truncated: it ends inside the {what} ({done} of {} bytes present); {TRUNCATED_FIX}",
                    buf.len()
                ))
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("read error in the {what}: {e}")),
        }
    }
    Ok(())
}

/// Decodes a whole `.npy` stream of `total` bytes.
fn decode(r: &mut impl Read, total: u64) -> std::result::Result<Npy, String> {
    let mut start = [0u8; 8];
    let have = total.min(8) as usize;
    read_part(r, &mut start[..have], "magic string")?;
    if !start[..have].starts_with(MAGIC) {
        return Err(not_npy_message(&start[..have]));
    }
    if have < 8 {
        return Err(format!(
            "file is truncated: it ends inside the format version; {TRUNCATED_FIX}"
        ));
    }
    let (major, minor) = (start[6], start[7]);
    let len_bytes = match (major, minor) {
        (1, 0) => 2,
        (2, 0) | (3, 0) => 4,
        _ => {
            return Err(format!(
            "unsupported .npy format version {major}.{minor}; volfuse reads 1.0, 2.0 and 3.0.\n  \
                 fix: save the array again with numpy.save"
        ))
        }
    };
    let mut len_buf = [0u8; 4];
    read_part(r, &mut len_buf[..len_bytes], "header length")?;
    let header_len = u32::from_le_bytes(len_buf) as usize;
    if header_len > MAX_HEADER {
        return Err(format!(
            "the .npy header claims {header_len} bytes, which is not plausible; the file is damaged"
        ));
    }
    let mut header = vec![0u8; header_len];
    read_part(r, &mut header, "header")?;
    let text: String = if major == 3 {
        String::from_utf8(header)
            .map_err(|_| "the .npy header is not valid UTF-8; the file is damaged".to_string())?
    } else {
        // Versions 1 and 2 are latin-1.
        header.iter().map(|&b| b as char).collect()
    };
    let (dtype, fortran, shape) = parse_header(&text)?;
    if fortran && shape.len() > 1 {
        return Err(
            "the array is stored in Fortran (column-major) order, which volfuse does not read.\n  \
             fix: save a C-order copy: numpy.save(path, numpy.ascontiguousarray(arr))"
                .to_string(),
        );
    }
    let n = element_count(&shape)
        .ok_or_else(|| format!("the shape {shape:?} in the header is too large"))?;
    let nbytes = n
        .checked_mul(dtype.size())
        .ok_or_else(|| format!("the shape {shape:?} in the header is too large"))?;
    let data_start = 8 + len_bytes as u64 + header_len as u64;
    let available = total.saturating_sub(data_start);
    if available < nbytes as u64 {
        return Err(format!(
            "file is truncated: the header says shape {shape:?} of '{}' ({nbytes} bytes of data) \
             but only {available} bytes follow the header; {TRUNCATED_FIX}",
            dtype.descr()
        ));
    }
    if available > nbytes as u64 {
        log::warn!(
            "{} bytes after the array data are ignored (numpy.load ignores them too)",
            available - nbytes as u64
        );
    }
    let data = match dtype {
        DType::F32 => NpyData::F32(read_elements(r, n)?),
        DType::F64 => NpyData::F64(read_elements(r, n)?),
        DType::F16 => NpyData::F16(read_elements(r, n)?),
        DType::U8 => NpyData::U8(read_elements(r, n)?),
        DType::U16 => NpyData::U16(read_elements(r, n)?),
        DType::U32 => NpyData::U32(read_elements(r, n)?),
        DType::I16 => NpyData::I16(read_elements(r, n)?),
        DType::I32 => NpyData::I32(read_elements(r, n)?),
        DType::I64 => NpyData::I64(read_elements(r, n)?),
        DType::Bool => NpyData::Bool(
            read_elements::<u8>(r, n)?
                .into_iter()
                .map(|b| b != 0)
                .collect(),
        ),
    };
    Ok(Npy { shape, data })
}

fn not_npy_message(start: &[u8]) -> String {
    if start.starts_with(b"PK\x03\x04") {
        "this is a .npz archive, not a .npy file.\n  fix: extract one array: \
         numpy.save('a.npy', numpy.load(path)['name'])"
            .to_string()
    } else {
        "not a NumPy .npy file (it does not start with the magic string \\x93NUMPY).\n  \
         fix: write the array with numpy.save"
            .to_string()
    }
}

/// Reads `n` little-endian elements straight into their final buffer.
fn read_elements<T: NpyElement>(
    r: &mut impl Read,
    n: usize,
) -> std::result::Result<Vec<T>, String> {
    let mut v = vec![T::zeroed(); n];
    read_part(r, bytemuck::cast_slice_mut(&mut v), "array data")?;
    if cfg!(target_endian = "big") {
        for x in &mut v {
            // to_le is its own inverse: it swaps on big-endian hosts.
            *x = x.to_le();
        }
    }
    Ok(v)
}

// ---------------------------------------------------------------------------------------------
// The header is a Python dict literal: {'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }

#[derive(Debug, Clone, PartialEq)]
enum PyValue {
    Str(String),
    Bool(bool),
    Int(i128),
    None,
    Seq(Vec<PyValue>),
    Dict(Vec<(PyValue, PyValue)>),
}

struct PyParser<'a> {
    s: &'a [u8],
    pos: usize,
}

impl PyParser<'_> {
    fn skip_ws(&mut self) {
        while self.pos < self.s.len() && self.s[self.pos].is_ascii_whitespace() {
            self.pos += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.skip_ws();
        self.s.get(self.pos).copied()
    }

    fn expect(&mut self, c: u8) -> std::result::Result<(), String> {
        if self.peek() == Some(c) {
            self.pos += 1;
            Ok(())
        } else {
            Err(format!("expected '{}' at offset {}", c as char, self.pos))
        }
    }

    fn value(&mut self) -> std::result::Result<PyValue, String> {
        match self.peek() {
            Some(b'{') => {
                self.pos += 1;
                let mut items = Vec::new();
                loop {
                    if self.peek() == Some(b'}') {
                        self.pos += 1;
                        return Ok(PyValue::Dict(items));
                    }
                    let k = self.value()?;
                    self.expect(b':')?;
                    let v = self.value()?;
                    items.push((k, v));
                    if self.peek() == Some(b',') {
                        self.pos += 1;
                    } else {
                        self.expect(b'}')?;
                        return Ok(PyValue::Dict(items));
                    }
                }
            }
            Some(open @ (b'(' | b'[')) => {
                let close = if open == b'(' { b')' } else { b']' };
                self.pos += 1;
                let mut items = Vec::new();
                loop {
                    if self.peek() == Some(close) {
                        self.pos += 1;
                        return Ok(PyValue::Seq(items));
                    }
                    items.push(self.value()?);
                    if self.peek() == Some(b',') {
                        self.pos += 1;
                    } else {
                        self.expect(close)?;
                        return Ok(PyValue::Seq(items));
                    }
                }
            }
            Some(q @ (b'\'' | b'"')) => {
                self.pos += 1;
                let mut out = String::new();
                while let Some(&c) = self.s.get(self.pos) {
                    self.pos += 1;
                    if c == q {
                        return Ok(PyValue::Str(out));
                    }
                    if c == b'\\' {
                        if let Some(&e) = self.s.get(self.pos) {
                            self.pos += 1;
                            out.push(e as char);
                        }
                        continue;
                    }
                    out.push(c as char);
                }
                Err("unterminated string".to_string())
            }
            Some(c) if c.is_ascii_digit() || c == b'-' || c == b'+' => {
                let begin = self.pos;
                self.pos += 1;
                while self.pos < self.s.len() && self.s[self.pos].is_ascii_digit() {
                    self.pos += 1;
                }
                let text = std::str::from_utf8(&self.s[begin..self.pos]).unwrap_or("");
                // Python 2 wrote longs as 3L.
                if self.s.get(self.pos) == Some(&b'L') {
                    self.pos += 1;
                }
                text.parse::<i128>()
                    .map(PyValue::Int)
                    .map_err(|_| format!("bad number '{text}'"))
            }
            Some(c) if c.is_ascii_alphabetic() => {
                let begin = self.pos;
                while self.pos < self.s.len() && self.s[self.pos].is_ascii_alphanumeric() {
                    self.pos += 1;
                }
                match &self.s[begin..self.pos] {
                    b"True" => Ok(PyValue::Bool(true)),
                    b"False" => Ok(PyValue::Bool(false)),
                    b"None" => Ok(PyValue::None),
                    other => Err(format!(
                        "unexpected word '{}'",
                        String::from_utf8_lossy(other)
                    )),
                }
            }
            Some(c) => Err(format!(
                "unexpected character '{}' at offset {}",
                c as char, self.pos
            )),
            None => Err("unexpected end".to_string()),
        }
    }
}

/// Parses the header dict into (dtype, fortran_order, shape).
fn parse_header(text: &str) -> std::result::Result<(DType, bool, Vec<usize>), String> {
    let bad = |why: String| {
        format!(
            "the .npy header is malformed ({why}): {:?}.\n  fix: save the array again with numpy.save",
            text.trim_end()
        )
    };
    let mut p = PyParser {
        s: text.as_bytes(),
        pos: 0,
    };
    let value = p.value().map_err(bad)?;
    if p.peek().is_some() {
        return Err(bad(format!(
            "unexpected text after the dict at offset {}",
            p.pos
        )));
    }
    let PyValue::Dict(items) = value else {
        return Err(bad("it is not a dict".to_string()));
    };
    let get = |key: &str| {
        items
            .iter()
            .find(|(k, _)| *k == PyValue::Str(key.to_string()))
            .map(|(_, v)| v)
    };
    let dtype = match get("descr") {
        Some(PyValue::Str(d)) => DType::from_descr(d)?,
        Some(PyValue::Seq(_)) => {
            return Err(format!(
                "structured (record) arrays are not supported; volfuse reads {SUPPORTED}.\n  \
                 fix: save each field as its own plain array, e.g. numpy.save(path, arr['field'])"
            ))
        }
        _ => return Err(bad("no 'descr' string".to_string())),
    };
    let fortran = match get("fortran_order") {
        Some(PyValue::Bool(b)) => *b,
        _ => return Err(bad("no 'fortran_order' True/False".to_string())),
    };
    let shape = match get("shape") {
        Some(PyValue::Seq(dims)) => dims
            .iter()
            .map(|d| match d {
                PyValue::Int(i) => usize::try_from(*i).map_err(|_| bad(format!("dimension {i}"))),
                other => Err(bad(format!("dimension {other:?}"))),
            })
            .collect::<std::result::Result<Vec<usize>, String>>()?,
        _ => return Err(bad("no 'shape' tuple".to_string())),
    };
    Ok((dtype, fortran, shape))
}

#[cfg(test)]
mod tests;
