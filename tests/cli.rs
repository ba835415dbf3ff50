//! The `volfuse` command line as a user runs it.

mod common;

use common::{fixture, rel_err, tmp, volfuse};
use std::path::PathBuf;
use std::process::Command;
use volfuse::io::npy;

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
    {
        let (_, l) = (ok, log);
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

// ---------------------------------------------------------------------------------------------
// Formats and safe outputs (issue #6): every bad input fails with a clear message, a non-zero
// exit and nothing written; Ctrl-C leaves nothing behind.
// ---------------------------------------------------------------------------------------------

/// A fresh folder for one test.
fn formats_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("volfuse-cli-fmt-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Names of temporary files or folders left in `dir`.
fn formats_leftovers(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect()
}

/// Runs volfuse expecting failure; checks the message, that nothing panicked, that `out`
/// does not exist and that no temporary file is left beside it.
fn formats_fails(args: &[&str], want: &[&str], out: &std::path::Path) {
    let (ok, log) = volfuse(args);
    assert!(!ok, "{args:?} succeeded: {log}");
    assert!(!log.contains("panicked"), "{log}");
    for w in want {
        assert!(log.contains(w), "{args:?}: expected '{w}' in: {log}");
    }
    assert!(!out.exists(), "{} was written", out.display());
    if let Some(dir) = out.parent().filter(|d| d.is_dir()) {
        assert!(
            formats_leftovers(dir).is_empty(),
            "{:?}",
            formats_leftovers(dir)
        );
    }
}

#[test]
fn formats_convert_round_trips_through_every_format() {
    let d = formats_dir("convert");
    let src = d.join("v.npy");
    let vals: Vec<u16> = (0..20 * 9 * 7).map(|i| (i * 37 % 60000) as u16).collect();
    npy::write(&src, &[20, 9, 7], &vals, false).unwrap();
    let chain = ["v.tif", "v2.zarr", "v3.zarr", "back.npy"];
    let mut prev = src.clone();
    for (i, name) in chain.iter().enumerate() {
        let out = d.join(name);
        let mut args = vec![
            "convert",
            "--input",
            prev.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ];
        if i == 1 {
            args.extend(["--zarr-version", "2"]);
        }
        let (ok, log) = volfuse(&args);
        assert!(ok, "{log}");
        prev = out;
    }
    assert!(d.join("v2.zarr/.zattrs").is_file() && d.join("v3.zarr/zarr.json").is_file());
    let back = npy::read(&prev).unwrap();
    assert_eq!(back.shape, vec![20, 9, 7]);
    assert_eq!(back.data, npy::NpyData::U16(vals));
    assert!(formats_leftovers(&d).is_empty());
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn formats_bad_inputs_and_outputs_fail_cleanly() {
    let d = formats_dir("bad");
    let model = fixture("bundle_tiny_ctx");
    let raw = fixture("e2e_tiny_ctx/raw.npy");
    let out = d.join("labels.npy");
    let m = model.to_str().unwrap();
    let o = out.to_str().unwrap();
    let run = |input: &str, model: &str, out: &str| -> Vec<String> {
        [
            "run",
            "--backend",
            "cpu",
            "--model",
            model,
            "--input",
            input,
            "--output",
            out,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let check = |args: Vec<String>, want: &[&str], out: &std::path::Path| {
        let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        formats_fails(&a, want, out);
    };

    // unreadable: missing, and not a .npy at all
    let missing = d.join("missing.npy");
    check(
        run(missing.to_str().unwrap(), m, o),
        &["missing.npy", "not found"],
        &out,
    );
    let garbage = d.join("garbage.npy");
    std::fs::write(&garbage, b"this is not numpy data at all, not even close").unwrap();
    check(run(garbage.to_str().unwrap(), m, o), &["garbage.npy"], &out);

    // truncated .npy and .tif
    let good = npy::read(&raw).unwrap();
    let trunc = d.join("trunc.npy");
    let bytes = std::fs::read(&raw).unwrap();
    std::fs::write(&trunc, &bytes[..bytes.len() * 2 / 3]).unwrap();
    check(
        run(trunc.to_str().unwrap(), m, o),
        &["trunc.npy", "truncated"],
        &out,
    );
    let tif = d.join("raw.tif");
    let (ok, log) = volfuse(&[
        "convert",
        "--input",
        raw.to_str().unwrap(),
        "--output",
        tif.to_str().unwrap(),
    ]);
    assert!(ok, "{log}");
    let tbytes = std::fs::read(&tif).unwrap();
    let ttrunc = d.join("trunc.tif");
    std::fs::write(&ttrunc, &tbytes[..tbytes.len() / 2]).unwrap();
    let tout = d.join("from_trunc.npy");
    formats_fails(
        &[
            "convert",
            "--input",
            ttrunc.to_str().unwrap(),
            "--output",
            tout.to_str().unwrap(),
        ],
        &["trunc.tif", "truncated or corrupt"],
        &tout,
    );

    // wrong dtype, 2-D, NaN and Inf
    let f64p = d.join("f64.npy");
    npy::write(
        &f64p,
        &good.shape,
        &good.to_f32().iter().map(|x| *x as f64).collect::<Vec<_>>(),
        false,
    )
    .unwrap();
    check(
        run(f64p.to_str().unwrap(), m, o),
        &["float64", "float32"],
        &out,
    );
    let flat = d.join("flat.npy");
    npy::write(&flat, &[8, 8], &[1u8; 64], false).unwrap();
    check(run(flat.to_str().unwrap(), m, o), &["3-D", "[8, 8]"], &out);
    for (name, bad) in [("nan.npy", f32::NAN), ("inf.npy", f32::NEG_INFINITY)] {
        let mut v = good.to_f32();
        v[5] = bad;
        let p = d.join(name);
        npy::write(&p, &good.shape, &v, false).unwrap();
        check(
            run(p.to_str().unwrap(), m, o),
            &[name, "non-finite", "nan_to_num"],
            &out,
        );
    }

    // missing bundle files
    let copy = |name: &str, skip: &str| -> PathBuf {
        let b = d.join(name);
        std::fs::create_dir_all(b.join("backbone")).unwrap();
        for f in [
            "volfuse.json",
            "unet.safetensors",
            "backbone/config.json",
            "backbone/model.safetensors",
        ] {
            if f != skip {
                std::fs::copy(model.join(f), b.join(f)).unwrap();
            }
        }
        b
    };
    let no_unet = copy("no_unet", "unet.safetensors");
    check(
        run(raw.to_str().unwrap(), no_unet.to_str().unwrap(), o),
        &["unet.safetensors"],
        &out,
    );
    let no_cfg = copy("no_cfg", "backbone/config.json");
    check(
        run(raw.to_str().unwrap(), no_cfg.to_str().unwrap(), o),
        &["config.json"],
        &out,
    );
    let no_manifest = copy("no_manifest", "volfuse.json");
    check(
        run(raw.to_str().unwrap(), no_manifest.to_str().unwrap(), o),
        &["volfuse.json"],
        &out,
    );

    // output folder missing
    let nowhere = d.join("no/such/folder/labels.npy");
    check(
        run(raw.to_str().unwrap(), m, nowhere.to_str().unwrap()),
        &["does not exist"],
        &nowhere,
    );
    for ext in ["npy", "tif", "zarr"] {
        let p = d.join(format!("no/such/folder/v.{ext}"));
        formats_fails(
            &[
                "convert",
                "--input",
                raw.to_str().unwrap(),
                "--output",
                p.to_str().unwrap(),
            ],
            &["does not exist"],
            &p,
        );
    }

    // an existing output is kept without --force (run and convert, file and folder outputs)
    std::fs::write(&out, b"precious").unwrap();
    let (ok, log) = volfuse(
        &run(raw.to_str().unwrap(), m, o)
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>(),
    );
    assert!(!ok && log.contains("--force"), "{log}");
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");
    let z = d.join("keep.zarr");
    std::fs::create_dir_all(&z).unwrap();
    std::fs::write(z.join("precious"), b"1").unwrap();
    let (ok, log) = volfuse(&[
        "convert",
        "--input",
        raw.to_str().unwrap(),
        "--output",
        z.to_str().unwrap(),
    ]);
    assert!(!ok && log.contains("--force"), "{log}");
    assert!(z.join("precious").is_file());
    let (ok, log) = volfuse(&[
        "convert",
        "--input",
        raw.to_str().unwrap(),
        "--output",
        z.to_str().unwrap(),
        "--force",
    ]);
    assert!(ok, "{log}");
    assert!(!z.join("precious").exists() && z.join("zarr.json").is_file());
    assert!(
        formats_leftovers(&d).is_empty(),
        "{:?}",
        formats_leftovers(&d)
    );
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn formats_ctrl_c_leaves_no_half_written_output() {
    let d = formats_dir("sigint");
    let src = d.join("v.npy");
    npy::write(&src, &[64, 16, 16], &vec![7u8; 64 * 256], false).unwrap();
    for name in ["out.npy", "out.tif", "out.zarr"] {
        let out = d.join(name);
        // 4 slabs of 16 z, 400 ms each: the writer is mid-output for over a second
        let child = Command::new(env!("CARGO_BIN_EXE_volfuse"))
            .args([
                "convert",
                "--input",
                src.to_str().unwrap(),
                "--output",
                out.to_str().unwrap(),
            ])
            .env("XDG_RUNTIME_DIR", std::env::temp_dir())
            .env("VOLFUSE_TEST_SLAB_DELAY_MS", "400")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run volfuse");
        let t = std::time::Instant::now();
        while formats_leftovers(&d).is_empty() {
            assert!(
                t.elapsed().as_secs() < 30,
                "{name}: no temporary output appeared"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
        let pid = child.id().to_string();
        let killed = Command::new("kill").args(["-INT", &pid]).status().unwrap();
        assert!(killed.success());
        let out_ = child.wait_with_output().unwrap();
        let log = String::from_utf8_lossy(&out_.stderr);
        assert_eq!(out_.status.code(), Some(130), "{name}: {log}");
        assert!(log.contains("interrupted"), "{name}: {log}");
        assert!(!out.exists(), "{name} was written");
        assert!(
            formats_leftovers(&d).is_empty(),
            "{name}: {:?}",
            formats_leftovers(&d)
        );
    }
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn bench_vit_prints_the_share_of_the_adapters_arithmetic_ceiling() {
    let (ok, log) = volfuse(&[
        "bench", "--vit", "s", "--image", "32", "--batch", "1", "--iters", "1",
    ]);
    assert!(ok, "{log}");
    assert!(log.contains("images/s"), "{log}");
    let line = log
        .lines()
        .find(|l| l.starts_with("adapter arithmetic ceiling"))
        .unwrap_or_else(|| panic!("no ceiling line in:\n{log}"));
    // "... : 112.2 GFLOP/s; this model runs at 58 % of it"
    let gflops: f64 = line
        .split("only): ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no number in {line}"));
    assert!(gflops > 0.0 && gflops.is_finite(), "{line}");
    assert!(line.contains("% of it"), "{line}");
}
