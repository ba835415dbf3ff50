//! The CPU reference path: the same model and graphs as on a GPU, run by plain Rust ops.
//! Useful on machines without a GPU driver, and as the oracle the GPU kernels are tested
//! against.
//!
//! ```sh
//! cargo run --example cpu                              # the tiny test bundle and volume
//! cargo run --example cpu -- MODEL RAW.npy [CONTEXT.npy]   # your own
//! ```
//!
//! `cargo test` runs it too (`[[example]] test = true` in Cargo.toml).

use anyhow::{bail, Result};
use std::path::{Path, PathBuf};
use volfuse::{Engine, Segmentation, Volume};

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

fn run(model_dir: &Path, raw: &Path, context: Option<&Path>) -> Result<Segmentation> {
    let engine = Engine::cpu();
    println!("engine: {}", engine.describe());
    let model = engine.load_model(model_dir)?;
    let raw = Volume::read(raw)?;
    let context = context.map(Volume::read).transpose()?;
    let t0 = std::time::Instant::now();
    let seg = model.segment(&raw, context.as_ref())?;
    for n in &seg.notes {
        println!("note: {n}");
    }
    let [k, d, h, w] = seg.shape;
    let mut counts = vec![0usize; k];
    for l in &seg.labels {
        counts[*l as usize] += 1;
    }
    println!(
        "{:?} {} volume → ({d}, {h}, {w}) labels in {:.2} s; voxels per class {counts:?}",
        raw.shape(),
        raw.dtype(),
        t0.elapsed().as_secs_f64()
    );
    Ok(seg)
}

fn main() -> Result<()> {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    match args.as_slice() {
        [] => {
            run(
                &fixture("bundle_tiny_ctx"),
                &fixture("e2e_tiny_ctx/raw.npy"),
                Some(&fixture("e2e_tiny_ctx/context.npy")),
            )?;
        }
        [model, raw] => {
            run(model, raw, None)?;
        }
        [model, raw, context] => {
            run(model, raw, Some(context))?;
        }
        _ => bail!("usage: cpu [MODEL RAW.npy [CONTEXT.npy]]"),
    }
    Ok(())
}

#[test]
fn cpu_example_matches_the_reference() {
    let seg = run(
        &fixture("bundle_tiny_ctx"),
        &fixture("e2e_tiny_ctx/raw.npy"),
        Some(&fixture("e2e_tiny_ctx/context.npy")),
    )
    .unwrap();
    let read = |name: &str| {
        volfuse::io::npy::read(&fixture(&format!("e2e_tiny_ctx/{name}.npy")))
            .unwrap()
            .to_f32()
    };
    let want_p = read("probabilities");
    let max_p = want_p.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let err = seg
        .probabilities
        .iter()
        .zip(&want_p)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max)
        / max_p;
    assert!(err <= 1e-3, "probabilities rel err {err}");
    let want_l = read("labels");
    let agree = seg
        .labels
        .iter()
        .zip(&want_l)
        .filter(|(a, b)| **a as f32 == **b)
        .count();
    assert!(
        agree as f64 >= 0.999 * want_l.len() as f64,
        "labels agree on only {agree} of {}",
        want_l.len()
    );
}
