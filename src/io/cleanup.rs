//! Temporary outputs that must not outlive an interrupted run.
//!
//! Every writer puts its bytes in a temporary path beside the target (a file, or a folder
//! for OME-Zarr) and renames it into place when complete. [`TempPath`] registers that path
//! in a process-wide registry; dropping it (an error, a panic unwinding) removes the path,
//! and [`install_interrupt_handler`] — called once by the binary at start — removes every
//! registered path on Ctrl-C (SIGINT, and SIGTERM/SIGHUP) and exits with status 130.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock, RwLockReadGuard};

use crate::error::{Error, Result};

static REGISTRY: Mutex<BTreeMap<u64, PathBuf>> = Mutex::new(BTreeMap::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(0);
static INTERRUPTED: AtomicBool = AtomicBool::new(false);
/// Writers hold it (shared) while they write to a temporary path; the interrupt handler
/// takes it exclusively, so it never removes a path in the middle of a write that could
/// recreate part of it, and no write starts after the removal.
static WRITE_GATE: RwLock<()> = RwLock::new(());

/// Held while writing to a temporary output (see [`remove_all`]). Refuses once the
/// process was interrupted.
pub fn write_guard() -> Result<RwLockReadGuard<'static, ()>> {
    let g = WRITE_GATE.read().unwrap_or_else(|p| p.into_inner());
    check_interrupted()?;
    Ok(g)
}

/// A temporary output path, removed when dropped unless [`TempPath::commit`] renamed it.
#[derive(Debug)]
pub struct TempPath {
    id: u64,
    path: PathBuf,
}

impl TempPath {
    /// A fresh temporary name beside `target` (`.NAME.PID-N.tmp` in the same folder, so the
    /// final rename never crosses file systems), registered for removal. Nothing is created.
    pub fn beside(target: &Path) -> Result<TempPath> {
        let name = target.file_name().ok_or_else(|| {
            Error::io(
                target,
                "is not a file path; give the path of a file to write",
            )
        })?;
        let dir = match target.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!(
            ".{}.{}-{id}.tmp",
            name.to_string_lossy(),
            std::process::id()
        ));
        lock().insert(id, path.clone());
        Ok(TempPath { id, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Renames the temporary path onto `target` and forgets it. A folder target that
    /// exists (allowed by the caller's `--force` check) is moved aside first and removed
    /// after the rename, so the new output appears in one step.
    pub fn commit(self, target: &Path) -> Result<()> {
        let _gate = write_guard()?;
        let mut aside = None;
        if target.is_dir() {
            let old = TempPath::beside(target)?;
            std::fs::rename(target, old.path()).map_err(|e| {
                Error::io(
                    target,
                    format!("could not move the existing output aside: {e}"),
                )
            })?;
            aside = Some(old);
        }
        if let Err(e) = std::fs::rename(&self.path, target) {
            if let Some(old) = aside.take() {
                let _ = std::fs::rename(old.path(), target);
                old.forget();
            }
            return Err(Error::io(
                target,
                format!("could not move the finished output into place: {e}"),
            ));
        }
        self.forget();
        drop(aside); // removes the previous output
        Ok(())
    }

    fn forget(self) {
        lock().remove(&self.id);
        std::mem::forget(self);
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        lock().remove(&self.id);
        remove_path(&self.path);
    }
}

fn lock() -> std::sync::MutexGuard<'static, BTreeMap<u64, PathBuf>> {
    REGISTRY.lock().unwrap_or_else(|p| p.into_inner())
}

fn remove_path(p: &Path) {
    if p.is_dir() {
        let _ = std::fs::remove_dir_all(p);
    } else {
        let _ = std::fs::remove_file(p);
    }
}

/// The temporary paths currently registered (for tests and diagnostics).
pub fn registered() -> Vec<PathBuf> {
    lock().values().cloned().collect()
}

/// Removes every registered temporary path and marks the process as interrupted: writers
/// refuse further slabs from then on, so nothing recreates what was removed.
pub fn remove_all() {
    let gate = WRITE_GATE.write().unwrap_or_else(|p| p.into_inner());
    INTERRUPTED.store(true, Ordering::SeqCst);
    // the gate stays closed: this process is about to exit
    std::mem::forget(gate);
    let mut reg = lock();
    for p in reg.values() {
        remove_path(p);
    }
    reg.clear();
}

/// An error once [`remove_all`] ran (the run was interrupted).
pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        return Err(Error::Invalid("interrupted".into()));
    }
    Ok(())
}

/// Installs the Ctrl-C (SIGINT, SIGTERM, SIGHUP) handler: remove every temporary output,
/// then exit with status 130. Call once, at the start of `main`.
pub fn install_interrupt_handler() -> Result<()> {
    ctrlc::set_handler(|| {
        remove_all();
        eprintln!("interrupted: temporary outputs removed, nothing was written");
        std::process::exit(130);
    })
    .map_err(|e| Error::Invalid(format!("could not install the Ctrl-C handler: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropped_temp_paths_are_removed_and_committed_ones_kept() {
        let dir = std::env::temp_dir().join(format!("volfuse-cleanup-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let target = dir.join("out.bin");
        let t = TempPath::beside(&target).unwrap();
        std::fs::write(t.path(), b"partial").unwrap();
        let tmp = t.path().to_path_buf();
        assert!(registered().contains(&tmp));
        drop(t);
        assert!(!tmp.exists() && !registered().contains(&tmp));

        let t = TempPath::beside(&target).unwrap();
        std::fs::write(t.path(), b"done").unwrap();
        let tmp = t.path().to_path_buf();
        t.commit(&target).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"done");
        assert!(!tmp.exists() && !registered().contains(&tmp));

        // a folder output replaces an existing folder
        let ztarget = dir.join("out.zarr");
        std::fs::create_dir_all(ztarget.join("old")).unwrap();
        let t = TempPath::beside(&ztarget).unwrap();
        std::fs::create_dir_all(t.path().join("new")).unwrap();
        t.commit(&ztarget).unwrap();
        assert!(ztarget.join("new").is_dir() && !ztarget.join("old").exists());
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
