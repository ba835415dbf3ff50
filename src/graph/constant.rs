//! Graph constants (weights) that can leave host memory once they are on a device.
//!
//! A [`Constant`] holds its values on the host until [`Constant::spill`] moves them to the
//! process's spill file: an unlinked temporary file, so the values sit in the kernel's page
//! cache (reclaimable, not part of the process's resident memory) and are read back only
//! when a device needs them again. On a software adapter (lavapipe) the device copy is host
//! RAM too, and the runner frees one stage's device weights while another stage runs: with
//! host copies kept, every weight would count twice (device + host) and the idle stage's
//! weights once more. [`crate::models::Runner`] spills a graph's constants after uploading
//! them, so weights cost host RAM only where they are in use.

use crate::error::{Error, Result};
use std::fs::File;
use std::sync::{Arc, Mutex, OnceLock};

/// The values of a graph constant: on the host, or spilled to the spill file.
#[derive(Debug)]
pub struct Constant {
    len: usize,
    stored: Mutex<Stored>,
}

#[derive(Debug)]
enum Stored {
    Host(Arc<Vec<f32>>),
    /// `len` f32 values (little endian) at this byte offset of the spill file.
    Spilled(u64),
}

impl Constant {
    pub fn new(values: Vec<f32>) -> Arc<Constant> {
        Self::shared(Arc::new(values))
    }

    /// A constant over values the caller may keep sharing (they stay alive while either
    /// holds them).
    pub fn shared(values: Arc<Vec<f32>>) -> Arc<Constant> {
        Arc::new(Constant {
            len: values.len(),
            stored: Mutex::new(Stored::Host(values)),
        })
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn stored(&self) -> std::sync::MutexGuard<'_, Stored> {
        self.stored.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the values live in the spill file (not in host memory).
    pub fn is_spilled(&self) -> bool {
        matches!(*self.stored(), Stored::Spilled(_))
    }

    /// The values: the host copy, or a fresh copy read back from the spill file (not kept:
    /// dropping it frees the memory again).
    pub fn values(&self) -> Result<Arc<Vec<f32>>> {
        match &*self.stored() {
            Stored::Host(v) => Ok(v.clone()),
            Stored::Spilled(offset) => spill_file()?.read(*offset, self.len).map(Arc::new),
        }
    }

    /// Moves the values to the spill file and drops this constant's host copy (other
    /// holders of a [`Constant::shared`] `Arc` keep theirs). Nothing happens where the
    /// platform has no unlinked temporary files (only Unix does).
    pub fn spill(&self) -> Result<()> {
        if !cfg!(unix) {
            return Ok(());
        }
        let mut s = self.stored();
        if let Stored::Host(v) = &*s {
            let offset = spill_file()?.append(v)?;
            *s = Stored::Spilled(offset);
        }
        Ok(())
    }
}

/// Turns weights into a [`Constant`] for [`crate::graph::Graph::constant`].
pub trait IntoConstant {
    fn into_constant(self) -> Arc<Constant>;
}

impl IntoConstant for Arc<Constant> {
    fn into_constant(self) -> Arc<Constant> {
        self
    }
}

impl IntoConstant for &Arc<Constant> {
    fn into_constant(self) -> Arc<Constant> {
        self.clone()
    }
}

impl IntoConstant for Vec<f32> {
    fn into_constant(self) -> Arc<Constant> {
        Constant::new(self)
    }
}

impl IntoConstant for Arc<Vec<f32>> {
    fn into_constant(self) -> Arc<Constant> {
        Constant::shared(self)
    }
}

/// The process's spill file: appended to, never shrunk (a constant is spilled once and
/// stays spilled); the file has no name, so the system frees it when the process ends.
struct SpillFile {
    file: Mutex<(File, u64)>,
    /// The name it had (for messages).
    path: std::path::PathBuf,
}

fn spill_file() -> Result<&'static SpillFile> {
    static FILE: OnceLock<std::result::Result<SpillFile, Error>> = OnceLock::new();
    FILE.get_or_init(SpillFile::create)
        .as_ref()
        .map_err(|e| Error::Invalid(e.to_string()))
}

/// `len` f32 values (little endian) at byte `offset` of `file`.
fn read_f32_at(file: &mut File, offset: u64, len: usize) -> std::io::Result<Vec<f32>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut v = vec![0f32; len];
    file.seek(SeekFrom::Start(offset))?;
    file.read_exact(bytemuck::cast_slice_mut(&mut v))?;
    Ok(v)
}

/// A new temporary file, unlinked at once (the open file lives on until it is closed).
fn unlinked_temp(what: &str) -> Result<(File, std::path::PathBuf)> {
    let dir = std::env::temp_dir();
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = dir.join(format!("volfuse-{what}-{}-{n}.spill", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| {
            Error::io(
                &path,
                format!("cannot create the {what} spill file ({e}).\n  fix: set TMPDIR to a writable folder"),
            )
        })?;
    std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
    Ok((file, path))
}

impl SpillFile {
    fn create() -> Result<SpillFile> {
        let (file, path) = unlinked_temp("weights")?;
        Ok(SpillFile {
            file: Mutex::new((file, 0)),
            path,
        })
    }

    fn append(&self, values: &[f32]) -> Result<u64> {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let offset = f.1;
        let bytes: &[u8] = bytemuck::cast_slice(values);
        let io = |e: std::io::Error| Error::io(&self.path, format!("writing spilled weights: {e}"));
        f.0.seek(SeekFrom::Start(offset)).map_err(io)?;
        f.0.write_all(bytes).map_err(io)?;
        f.1 += bytes.len() as u64;
        Ok(offset)
    }

    fn read(&self, offset: u64, len: usize) -> Result<Vec<f32>> {
        let mut f = self.file.lock().unwrap_or_else(|e| e.into_inner());
        read_f32_at(&mut f.0, offset, len)
            .map_err(|e| Error::io(&self.path, format!("reading spilled weights: {e}")))
    }
}

/// Host values parked in an unlinked temporary file of their own while something else
/// needs the memory (the page cache holds them, not the process's resident set), taken
/// back whole; the file goes with them. The raw volume's features wait so while the
/// context's are computed (32 MiB for a base-32 UNet at 64³, 256 MiB at 128³). Where the
/// platform has no unlinked files (not Unix) the values simply stay in memory.
#[derive(Debug)]
pub enum Parked {
    Memory(Vec<f32>),
    File {
        file: File,
        len: usize,
        path: std::path::PathBuf,
    },
}

impl Parked {
    pub fn park(values: Vec<f32>) -> Result<Parked> {
        use std::io::Write;
        if !cfg!(unix) {
            return Ok(Parked::Memory(values));
        }
        let (mut file, path) = unlinked_temp("features")?;
        file.write_all(bytemuck::cast_slice(&values))
            .map_err(|e| Error::io(&path, format!("parking host values: {e}")))?;
        Ok(Parked::File {
            file,
            len: values.len(),
            path,
        })
    }

    /// Runs `f` with `values` parked, then puts them back (also when `f` fails).
    pub fn aside<T>(values: &mut Vec<f32>, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let parked = Parked::park(std::mem::take(values))?;
        let out = f();
        *values = parked.take()?;
        out
    }

    pub fn take(self) -> Result<Vec<f32>> {
        match self {
            Parked::Memory(v) => Ok(v),
            Parked::File {
                mut file,
                len,
                path,
            } => read_f32_at(&mut file, 0, len)
                .map_err(|e| Error::io(&path, format!("reading parked host values back: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parked_values_come_back_unchanged() {
        let a: Vec<f32> = (0..100_003)
            .map(|i| (i as f32 * 0.011).cos() * 7.5)
            .collect();
        let b: Vec<f32> = vec![f32::NAN, -0.0, 1e-38, f32::INFINITY];
        let (pa, pb) = (
            Parked::park(a.clone()).unwrap(),
            Parked::park(b.clone()).unwrap(),
        );
        assert_eq!(matches!(pa, Parked::File { .. }), cfg!(unix));
        let back = pb.take().unwrap();
        assert_eq!(
            back.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            b.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        assert_eq!(pa.take().unwrap(), a);
        assert!(Parked::park(Vec::new()).unwrap().take().unwrap().is_empty());
    }

    #[test]
    fn spilled_values_read_back_unchanged() {
        let a: Vec<f32> = (0..1001).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..17).map(|i| i as f32 - 3.5).collect();
        let (ca, cb) = (Constant::new(a.clone()), Constant::new(b.clone()));
        ca.spill().unwrap();
        cb.spill().unwrap();
        ca.spill().unwrap(); // twice: no second copy, same values
        assert_eq!(ca.is_spilled(), cfg!(unix));
        assert_eq!(*ca.values().unwrap(), a);
        assert_eq!(*cb.values().unwrap(), b);
        assert_eq!((ca.len(), cb.len()), (1001, 17));
    }
}
