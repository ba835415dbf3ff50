//! Shared helpers of the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, OnceLock};
use volfuse::gpu::{GpuContext, GpuOptions};

/// One GPU context per test binary.
pub fn gpu() -> Arc<GpuContext> {
    static CTX: OnceLock<Arc<GpuContext>> = OnceLock::new();
    CTX.get_or_init(|| {
        if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
            std::env::set_var("XDG_RUNTIME_DIR", std::env::temp_dir());
        }
        let opts = GpuOptions::from_env().expect("VOLFUSE_API");
        Arc::new(GpuContext::new(&opts).expect("a GPU adapter (install mesa-vulkan-drivers)"))
    })
    .clone()
}

pub fn fixture(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(path)
}

/// max |got − want| / max |want|.
pub fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
    got.iter()
        .zip(want)
        .map(|(g, w)| {
            let d = (g - w).abs();
            assert!(d.is_finite(), "non-finite output {g} (want {w})");
            d / scale
        })
        .fold(0f32, f32::max)
}

/// Runs the `volfuse` binary of this build; returns (success, stdout + stderr).
pub fn volfuse(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_volfuse"))
        .args(args)
        .env("XDG_RUNTIME_DIR", std::env::temp_dir())
        // The CLI autotunes by default: keep the tests' choices out of the user's cache.
        .env(
            "VOLFUSE_AUTOTUNE_CACHE",
            std::env::temp_dir().join(format!("volfuse-test-autotune-{}.json", std::process::id())),
        )
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("run volfuse");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A path `name` in a scratch directory of this test process.
pub fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("volfuse-test-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}
