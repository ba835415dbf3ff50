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

#[test]
fn features_match_the_reference_extraction() {
    let out = tmp("feats.npy");
    let _ = std::fs::remove_file(&out);
    let (ok, log) = volfuse(&[
        "features",
        "--backbone",
        fixture("vit_gelu").to_str().unwrap(),
        "--input",
        fixture("features_u8/volume.npy").to_str().unwrap(),
        "--size",
        "8",
        "8",
        "8",
        "--slice-size",
        "32",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{log}");
    let got = npy::read(&out).unwrap();
    let want = npy::read(&fixture("features_u8/features.npy")).unwrap();
    assert_eq!(got.shape, want.shape);
    assert!(rel_err(&got.to_f32(), &want.to_f32()) < 1e-3);
}

#[test]
fn run_writes_labels_probabilities_and_logits() {
    let raw = tmp("raw.npy");
    let vol: Vec<u8> = (0..24 * 20 * 28).map(|i| ((i * 37) % 251) as u8).collect();
    npy::write(&raw, &[24, 20, 28], &vol, true).unwrap();
    let (labels, probs, logits) = (tmp("labels.npy"), tmp("probs.npy"), tmp("logits.npy"));
    for p in [&labels, &probs, &logits] {
        let _ = std::fs::remove_file(p);
    }
    let model = fixture("bundle_tiny_ctx");
    let args = [
        "run",
        "--model",
        model.to_str().unwrap(),
        "--input",
        raw.to_str().unwrap(),
        "--context",
        raw.to_str().unwrap(),
        "--output",
        labels.to_str().unwrap(),
        "--probabilities",
        probs.to_str().unwrap(),
        "--logits",
        logits.to_str().unwrap(),
    ];
    let (ok, log) = volfuse(&args);
    assert!(ok, "{log}");
    // Tiled: outputs on the raw volume's grid (smaller than one tile: padded, and said so).
    assert!(log.contains("mirror-padded"), "{log}");
    let l = npy::read(&labels).unwrap();
    assert_eq!(l.shape, vec![24, 20, 28]);
    assert_eq!(l.dtype(), volfuse::io::DType::U8);
    let p = npy::read(&probs).unwrap();
    assert_eq!(p.shape, vec![3, 24, 20, 28]);
    let pv = p.to_f32();
    let s = 24 * 20 * 28;
    for v in 0..s {
        let sum: f32 = (0..3).map(|k| pv[k * s + v]).sum();
        assert!(
            (sum - 1.0).abs() < 1e-5,
            "probabilities of voxel {v} sum to {sum}"
        );
    }
    assert_eq!(npy::read(&logits).unwrap().shape, vec![3, 24, 20, 28]);
    // A second run without --force changes nothing and says why.
    let (ok, log) = volfuse(&args);
    assert!(!ok && log.contains("--force"), "{log}");
    // Without context, a fusion model runs degraded and says so.
    let mut no_ctx: Vec<&str> = args.to_vec();
    no_ctx.drain(5..7);
    no_ctx.truncate(7);
    no_ctx.push("--force");
    let (ok, log) = volfuse(&no_ctx);
    assert!(ok && log.contains("degraded"), "{log}");
}

#[test]
fn run_refuses_bad_volumes_and_bundles() {
    let labels = tmp("bad_labels.npy");
    let model = fixture("bundle_tiny_ctx");
    let flat = tmp("flat2d.npy");
    npy::write(&flat, &[8, 8], &[1u8; 64], true).unwrap();
    let (ok, log) = volfuse(&[
        "run",
        "--model",
        model.to_str().unwrap(),
        "--input",
        flat.to_str().unwrap(),
        "--output",
        labels.to_str().unwrap(),
    ]);
    assert!(!ok && !log.contains("panicked"), "{log}");
    let (ok, log) = volfuse(&[
        "run",
        "--model",
        "/tmp",
        "--input",
        flat.to_str().unwrap(),
        "--output",
        labels.to_str().unwrap(),
    ]);
    assert!(!ok && log.contains("volfuse.json"), "{log}");
    assert!(!labels.exists());
}

// ---- tiled runs (`volfuse run` over volumes of any size) ----------------------------------

fn run_args<'a>(
    model: &'a str,
    input: &'a str,
    output: &'a str,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut v = vec![
        "run",
        "--model",
        model,
        "--input",
        input,
        "--output",
        output,
        "--backend",
        "cpu",
        "--force",
    ];
    v.extend_from_slice(extra);
    v
}

#[test]
fn run_tiles_a_volume_larger_than_one_tile() {
    // 70 × 64 × 64 with 64³ tiles: two rows of tiles along z, blended; context derived.
    let raw = tmp("tiled_raw.npy");
    let vol: Vec<u8> = (0..70 * 64 * 64usize)
        .map(|i| ((i * 7919) % 253) as u8)
        .collect();
    npy::write(&raw, &[70, 64, 64], &vol, true).unwrap();
    let (labels, probs, preview) = (
        tmp("tiled_labels.npy"),
        tmp("tiled_probs.npy"),
        tmp("tiled_preview.png"),
    );
    let model = fixture("bundle_tiny_ctx");
    let (m, i, o, p, v) = (
        model.to_str().unwrap(),
        raw.to_str().unwrap(),
        labels.to_str().unwrap(),
        probs.to_str().unwrap(),
        preview.to_str().unwrap(),
    );
    let (ok, log) = volfuse(&run_args(
        m,
        i,
        o,
        &[
            "--probabilities",
            p,
            "--preview",
            v,
            "--context",
            "auto",
            "--blend",
            "constant",
            "--overlap",
            "0.5",
        ],
    ));
    assert!(ok, "{log}");
    assert!(log.contains("2 run, 0 skipped"), "{log}");
    for want in [
        "classes found",
        "peak memory",
        "adapter",
        "tiles/s",
        "derived from the raw volume",
    ] {
        assert!(log.contains(want), "missing '{want}' in {log}");
    }
    assert_eq!(npy::read(&labels).unwrap().shape, vec![70, 64, 64]);
    let pv = npy::read(&probs).unwrap();
    assert_eq!(pv.shape, vec![3, 70, 64, 64]);
    let img = image::open(&preview).unwrap();
    assert_eq!((img.width(), img.height()), (64 + 64 + 64 + 8, 70));
    // Foreground skipping: nothing is above 1000, every tile is skipped, all background.
    let (ok, log) = volfuse(&run_args(
        m,
        i,
        o,
        &["--fg-threshold", "1000", "--context", "none"],
    ));
    assert!(ok, "{log}");
    assert!(log.contains("0 run, 2 skipped"), "{log}");
    assert!(npy::read(&labels)
        .unwrap()
        .to_f32()
        .iter()
        .all(|v| *v == 0.0));
}

#[test]
fn run_pads_a_volume_smaller_than_a_tile_and_says_so() {
    let raw = tmp("small_raw.npy");
    let vol: Vec<u16> = (0..10 * 12 * 9).map(|i| (i * 31 % 4000) as u16).collect();
    npy::write(&raw, &[10, 12, 9], &vol, true).unwrap();
    let labels = tmp("small_labels.npy");
    let model = fixture("bundle_tiny_ctx");
    let (ok, log) = volfuse(&run_args(
        model.to_str().unwrap(),
        raw.to_str().unwrap(),
        labels.to_str().unwrap(),
        &["--context", "none"],
    ));
    assert!(ok, "{log}");
    assert!(
        log.contains("smaller than one tile") && log.contains("mirror-padded"),
        "{log}"
    );
    assert!(log.contains("degraded"), "{log}");
    assert_eq!(npy::read(&labels).unwrap().shape, vec![10, 12, 9]);
}

#[test]
fn run_refuses_a_context_that_does_not_cover_the_raw_volume() {
    let raw = tmp("mismatch_raw.npy");
    npy::write(&raw, &[40, 40, 40], &vec![5u8; 64000], true).unwrap();
    let ctx = tmp("mismatch_ctx.npy");
    npy::write(&ctx, &[10, 20, 20], &vec![5u8; 4000], true).unwrap();
    let labels = tmp("mismatch_labels.npy");
    let _ = std::fs::remove_file(&labels);
    let model = fixture("bundle_tiny_ctx");
    let (m, i, o, c) = (
        model.to_str().unwrap(),
        raw.to_str().unwrap(),
        labels.to_str().unwrap(),
        ctx.to_str().unwrap(),
    );
    let (ok, log) = volfuse(&run_args(
        m,
        i,
        o,
        &["--context", c, "--context-scale", "2"],
    ));
    assert!(
        !ok && log.contains("mismatch") && log.contains("--context-scale"),
        "{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
    assert!(!labels.exists());
    // a bad scale is refused too
    let (ok, log) = volfuse(&run_args(m, i, o, &["--context", c, "--context-scale=-1"]));
    assert!(!ok && log.contains("--context-scale"), "{log}");
    // auto needs an integer scale
    let (ok, log) = volfuse(&run_args(
        m,
        i,
        o,
        &["--context", "auto", "--context-scale", "1.5"],
    ));
    assert!(!ok && log.contains("integer"), "{log}");
}

#[test]
fn run_refuses_a_2d_input_with_a_hint() {
    let flat = tmp("tiled_flat2d.npy");
    npy::write(&flat, &[32, 32], &[1u8; 1024], true).unwrap();
    let labels = tmp("tiled_flat_labels.npy");
    let _ = std::fs::remove_file(&labels);
    let model = fixture("bundle_tiny_ctx");
    let (ok, log) = volfuse(&run_args(
        model.to_str().unwrap(),
        flat.to_str().unwrap(),
        labels.to_str().unwrap(),
        &[],
    ));
    assert!(
        !ok && log.contains("3-D") && log.contains("img[None]"),
        "{log}"
    );
    assert!(!log.contains("panicked") && !labels.exists(), "{log}");
}

#[test]
fn run_single_tile_keeps_the_model_grid() {
    let raw = fixture("e2e_tiny_ctx/raw.npy");
    let ctx = fixture("e2e_tiny_ctx/context.npy");
    let labels = tmp("single_labels.npy");
    let model = fixture("bundle_tiny_ctx");
    let (ok, log) = volfuse(&run_args(
        model.to_str().unwrap(),
        raw.to_str().unwrap(),
        labels.to_str().unwrap(),
        &["--context", ctx.to_str().unwrap(), "--single-tile"],
    ));
    assert!(ok, "{log}");
    let want = npy::read(&fixture("e2e_tiny_ctx/labels.npy"))
        .unwrap()
        .to_f32();
    let got = npy::read(&labels).unwrap();
    assert_eq!(got.shape, vec![16, 16, 16]);
    let same = got
        .to_f32()
        .iter()
        .zip(&want)
        .filter(|(a, b)| a == b)
        .count();
    assert!(
        same as f64 >= 0.999 * want.len() as f64,
        "{same} of {}",
        want.len()
    );
}
