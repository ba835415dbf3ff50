//! Volume, array and weight I/O.
//!
//! - [`npy`]: NumPy `.npy` arrays (read every common dtype, write f32/u8/u16/…).
//! - [`volume`]: volumes in (.npy, TIFF stacks, OME-Zarr: [`volume::read_volume`]) and
//!   output arrays written z-slab by z-slab ([`volume::create_writer`]).
//! - [`tiff`], [`zarr`]: the TIFF-stack and OME-Zarr (v2, v3) readers and streaming writers.
//! - [`cleanup`]: temporary outputs removed on error and on Ctrl-C.
//! - [`weights`]: safetensors weights (single file or sharded folder), upcast to f32.
//!
//! Every writer goes through `write_atomic`: the bytes land in a temporary file beside the
//! target, which is renamed into place only when complete, and an existing file is replaced
//! only when the caller passes `force` (the CLI's `--force`).

pub mod cleanup;
pub mod npy;
pub mod tiff;
pub mod volume;
pub mod weights;
pub mod zarr;

pub use npy::{DType, Npy, NpyData, NpyElement};
pub use weights::{Tensor, Weights};

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::Path;

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
    check_output(path, force)?;
    let tmp = cleanup::TempPath::beside(path)?;
    let result = (|| -> std::io::Result<()> {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(tmp.path())?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        body(&mut w)?;
        w.flush()?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok(())
    })();
    if let Err(e) = result {
        return Err(Error::io(path, format!("could not write the file: {e}")));
    }
    tmp.commit(path)?;
    Ok(())
}

/// Checks that an output can be written at `path`: its folder exists, and it does not exist
/// yet unless `force`.
pub(crate) fn check_output(path: &Path, force: bool) -> Result<()> {
    if path.exists() && !force {
        return Err(Error::io(
            path,
            "already exists; pass --force to overwrite it, or choose another output path",
        ));
    }
    if path.file_name().is_none() {
        return Err(Error::io(
            path,
            "is not a file path; give the path of a file to write",
        ));
    }
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
    Ok(())
}
