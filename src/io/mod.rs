//! Volume, array and weight I/O.
//!
//! - [`npy`]: NumPy `.npy` arrays (read every common dtype, write f32/u8/u16/…).
//! - [`volume`]: output arrays written z-slab by z-slab ([`volume::SlabWriter`]).
//! - [`weights`]: safetensors weights (single file or sharded folder), upcast to f32.
//!
//! Every writer goes through `write_atomic`: the bytes land in a temporary file beside the
//! target, which is renamed into place only when complete, and an existing file is replaced
//! only when the caller passes `force` (the CLI's `--force`).

pub mod npy;
pub mod volume;
pub mod weights;

pub use npy::{DType, Npy, NpyData, NpyElement};
pub use weights::{Tensor, Weights};

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

/// Writes a file atomically: `body` fills a temporary file in the same folder, which is
/// then renamed onto `path`. Refuses to replace an existing `path` unless `force` is set.
/// On any error the temporary file is removed and `path` is left untouched.
pub(crate) fn write_atomic(
    path: &Path,
    force: bool,
    body: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
) -> Result<()> {
    if path.is_dir() {
        return Err(Error::io(
            path,
            "is a folder; give the path of a file to write",
        ));
    }
    if path.exists() && !force {
        return Err(Error::io(
            path,
            "already exists; pass --force to overwrite it, or choose another output path",
        ));
    }
    let name = path
        .file_name()
        .ok_or_else(|| Error::io(path, "is not a file path; give the path of a file to write"))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(Error::io(
            path,
            format!(
                "the folder '{}' does not exist; create it first",
                dir.display()
            ),
        ));
    }

    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let tmp = dir.join(format!(
        ".{}.{}-{}.tmp",
        name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| -> std::io::Result<()> {
        let file = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        body(&mut w)?;
        w.flush()?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, format!("could not write the file: {e}")));
    }
    Ok(())
}
