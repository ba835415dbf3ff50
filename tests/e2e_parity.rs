//! The whole pipeline (features from three planes of raw and context → UNet with context
//! fusion → softmax/argmax) against the Python reference on the tiny bundle
//! (tools/make_e2e_fixtures.py), on both backends.

mod common;

use common::{fixture, gpu, rel_err};
use volfuse::io::npy;
use volfuse::models::pipeline::segment;
use volfuse::models::{Backend, Bundle, Runner, Volume};

fn check(backend: Backend, with_context: bool) {
    let bundle = Bundle::load(&fixture("bundle_tiny_ctx")).unwrap();
    let raw = Volume::read(&fixture("e2e_tiny_ctx/raw.npy")).unwrap();
    let ctx = Volume::read(&fixture("e2e_tiny_ctx/context.npy")).unwrap();
    let mut runner = Runner::new(backend.clone());
    let seg = segment(&bundle, &mut runner, &raw, with_context.then_some(&ctx), 64).unwrap();
    let name = if with_context {
        "logits"
    } else {
        "logits_nocontext"
    };
    let want_logits = npy::read(&fixture(&format!("e2e_tiny_ctx/{name}.npy")))
        .unwrap()
        .to_f32();
    let e = rel_err(&seg.logits, &want_logits);
    eprintln!("{name} on {}: logits rel err {e:.2e}", backend.describe());
    assert!(
        e <= 1e-3,
        "{name} on {}: logits rel err {e}",
        backend.describe()
    );
    if with_context {
        let want_p = npy::read(&fixture("e2e_tiny_ctx/probabilities.npy"))
            .unwrap()
            .to_f32();
        let ep = rel_err(&seg.probabilities, &want_p);
        assert!(ep <= 1e-3, "probabilities rel err {ep}");
        let want_l = npy::read(&fixture("e2e_tiny_ctx/labels.npy"))
            .unwrap()
            .to_f32();
        let agree = seg
            .labels
            .iter()
            .zip(&want_l)
            .filter(|(a, b)| **a as f32 == **b)
            .count();
        let frac = agree as f64 / want_l.len() as f64;
        eprintln!("labels agree on {:.4}% of voxels", frac * 100.0);
        assert!(frac >= 0.999, "labels agree on only {frac}");
    } else {
        assert!(seg.notes.iter().any(|n| n.contains("degraded")));
    }
}

#[test]
fn cpu_matches_the_reference_pipeline() {
    check(Backend::Cpu, true);
    check(Backend::Cpu, false);
}

#[test]
fn gpu_matches_the_reference_pipeline() {
    check(Backend::Gpu(gpu()), true);
    check(Backend::Gpu(gpu()), false);
}

#[test]
fn affinity_models_use_a_sigmoid_head() {
    let mut bundle = Bundle::load(&fixture("bundle_tiny_ctx")).unwrap();
    bundle.unet.config.output_type = "affinities".into();
    let raw = Volume::read(&fixture("e2e_tiny_ctx/raw.npy")).unwrap();
    let mut runner = Runner::new(Backend::Gpu(gpu()));
    let seg = segment(&bundle, &mut runner, &raw, Some(&raw), 64).unwrap();
    let want: Vec<f32> = seg
        .logits
        .iter()
        .map(|x| 1.0 / (1.0 + (-x).exp()))
        .collect();
    assert!(rel_err(&seg.probabilities, &want) < 1e-5);
}
