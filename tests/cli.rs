//! The `volfuse` command line as a user runs it.

mod common;

use common::{fixture, rel_err};
use std::path::PathBuf;
use std::process::Command;
use volfuse::io::npy;

fn volfuse(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_volfuse"))
        .args(args)
        .env("XDG_RUNTIME_DIR", std::env::temp_dir())
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

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("volfuse-cli-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

#[test]
fn backbone_writes_last_hidden_state_on_both_backends() {
    let backbone = fixture("vit_gelu");
    let input = fixture("vit_gelu/input_48x32.npy");
    let want = npy::read(&fixture("vit_gelu/output_48x32.npy")).unwrap();
    for backend in ["gpu", "cpu"] {
        let out = tmp(&format!("tokens_{backend}.npy"));
        let _ = std::fs::remove_file(&out);
        let (ok, log) = volfuse(&[
            "backbone",
            "--backbone",
            backbone.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--backend",
            backend,
        ]);
        assert!(ok, "{log}");
        let got = npy::read(&out).unwrap();
        assert_eq!(got.shape, want.shape);
        assert!(rel_err(&got.to_f32(), &want.to_f32()) < 1e-4);
    }
}

#[test]
fn existing_output_is_kept_without_force() {
    let out = tmp("keep.npy");
    std::fs::write(&out, b"precious").unwrap();
    let backbone = fixture("vit_gelu");
    let input = fixture("vit_gelu/input_32x32.npy");
    let args = [
        "backbone",
        "--backbone",
        backbone.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ];
    let (ok, log) = volfuse(&args);
    assert!(!ok && log.contains("--force"), "{log}");
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");
    let mut forced = args.to_vec();
    forced.push("--force");
    let (ok, log) = volfuse(&forced);
    assert!(ok, "{log}");
    assert_eq!(npy::read(&out).unwrap().shape, vec![2, 9, 64]);
}

#[test]
fn bad_inputs_give_clear_errors() {
    let backbone = fixture("vit_gelu");
    let b = backbone.to_str().unwrap();
    let out = tmp("never.npy");
    let o = out.to_str().unwrap();
    // Missing file.
    let (ok, log) = volfuse(&[
        "backbone",
        "--backbone",
        b,
        "--input",
        "/nonexistent/x.npy",
        "--output",
        o,
    ]);
    assert!(!ok && log.contains("/nonexistent/x.npy"), "{log}");
    // A 2D array.
    let flat = tmp("flat.npy");
    npy::write(&flat, &[4, 4], &[0.5f32; 16], true).unwrap();
    let (ok, log) = volfuse(&[
        "backbone",
        "--backbone",
        b,
        "--input",
        flat.to_str().unwrap(),
        "--output",
        o,
    ]);
    assert!(!ok && log.contains("(N, 3, H, W)"), "{log}");
    // Integer images.
    let ints = tmp("ints.npy");
    npy::write(&ints, &[1, 3, 16, 16], &vec![7u8; 768], true).unwrap();
    let (ok, log) = volfuse(&[
        "backbone",
        "--backbone",
        b,
        "--input",
        ints.to_str().unwrap(),
        "--output",
        o,
    ]);
    assert!(!ok && log.contains("float32"), "{log}");
    // NaN in the input.
    let nan = tmp("nan.npy");
    let mut v = vec![0.1f32; 768];
    v[5] = f32::NAN;
    npy::write(&nan, &[1, 3, 16, 16], &v, true).unwrap();
    let (ok, log) = volfuse(&[
        "backbone",
        "--backbone",
        b,
        "--input",
        nan.to_str().unwrap(),
        "--output",
        o,
    ]);
    assert!(!ok && log.contains("not finite"), "{log}");
    // Not an HF folder.
    let (ok, log) = volfuse(&[
        "backbone",
        "--backbone",
        "/tmp",
        "--input",
        flat.to_str().unwrap(),
        "--output",
        o,
    ]);
    assert!(!ok && log.contains("config.json"), "{log}");
    assert!(!out.exists(), "a failed run left an output behind");
    for (_, l) in [(ok, log)] {
        assert!(!l.contains("panicked"), "{l}");
    }
}

#[test]
fn info_lists_adapters() {
    let (ok, log) = volfuse(&["info"]);
    assert!(ok && log.contains("adapters"), "{log}");
}
