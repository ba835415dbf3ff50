//! The shipped demo models (demo/) on generated volumes, `volfuse eval` and
//! `volfuse run --dump-gates`.

mod common;

use common::{fixture, tmp, volfuse};
use std::path::PathBuf;
use volfuse::eval::score;
use volfuse::io::npy;
use volfuse::models::{Backend, Bundle, Runner};
use volfuse::synth::{generate, SynthConfig, DEFAULT_CONTEXT_RATIO};

fn models(v: &str) -> PathBuf {
    volfuse::demo::models_dir().join(v)
}

/// Volumes the test scores besides the demo's default: 32³ (one tile) centred at these
/// distances from a nucleus centre (fractions of its radius): deep inside a nucleus (pores
/// only in sight), on its boundary, and out in the cytoplasm (mitochondria only) — the
/// first and last are the cases where only the context tells pores from mitochondria.
const CASES: [(u64, f64); 3] = [(101, 0.3), (102, 1.0), (103, 1.5)];

/// Labels of both shipped models (no context, with context) on a generated volume.
fn segment_both(
    models: [&Bundle; 2],
    runner: &mut Runner,
    seed: u64,
    size: usize,
    offset: f64,
) -> ([Vec<u16>; 2], Vec<u16>) {
    let mut cfg = SynthConfig::new(seed, [size; 3]);
    cfg.nucleus_offset = Some(offset);
    let v = generate(&cfg).unwrap();
    let labels = models.map(|b| {
        volfuse::demo::segment_tiles(
            b,
            runner,
            &v.raw,
            &v.context,
            v.shape,
            DEFAULT_CONTEXT_RATIO,
            32,
        )
        .unwrap()
    });
    (labels, v.truth.iter().map(|t| *t as u16).collect())
}

type Scores = volfuse::eval::Scores;

/// Scores (no context, with context) of both shipped models on `volfuse demo`'s default
/// volume (sliding window over several tiles) and on the three single-tile volumes
/// (scored together), printed as tables.
fn shipped_model_scores() -> [(&'static str, Scores, Scores); 2] {
    let no_ctx = Bundle::load(&models("no_context")).unwrap();
    let with_ctx = Bundle::load(&models("with_context")).unwrap();
    assert!(with_ctx.unet.fusion && !no_ctx.unet.fusion);
    let mut runner = Runner::new(Backend::Cpu);
    let both = [&no_ctx, &with_ctx];
    use volfuse::demo::{DEFAULT_NUCLEUS_OFFSET, DEFAULT_SEED, DEFAULT_SIZE};
    let ([d0, d1], dt) = segment_both(
        both,
        &mut runner,
        DEFAULT_SEED,
        DEFAULT_SIZE,
        DEFAULT_NUCLEUS_OFFSET,
    );
    let (mut truth, mut l0, mut l1) = (Vec::new(), Vec::new(), Vec::new());
    for (seed, offset) in CASES {
        let ([a, b], t) = segment_both(both, &mut runner, seed, 32, offset);
        l0.extend(a);
        l1.extend(b);
        truth.extend(t);
    }
    let names = volfuse::synth::CLASS_NAMES;
    [
        ("volfuse demo's default volume", &d0, &d1, &dt),
        ("the test's three volumes", &l0, &l1, &truth),
    ]
    .map(|(what, l0, l1, t)| {
        let s0 = score(l0, t, 4).unwrap();
        let s1 = score(l1, t, 4).unwrap();
        eprintln!(
            "{what}\n{}",
            volfuse::eval::table(&names, &[("no context", &s0), ("with context", &s1)])
        );
        (what, s0, s1)
    })
}

/// The targets: the context model reaches mean IoU ≥ 0.8 and beats the no-context
/// model on the pore class by a clear margin (clear = ≥ 0.1 IoU), on both volume sets.
#[test]
fn shipped_models_segment_generated_volumes_and_context_helps() {
    for (what, s0, s1) in shipped_model_scores() {
        let m1 = s1.mean_iou().unwrap();
        assert!(m1 >= 0.8, "{what}: context model mean IoU {m1:.3} < 0.8");
        let (p0, p1) = (s0.iou[2].unwrap(), s1.iou[2].unwrap());
        assert!(
            p1 >= p0 + 0.1,
            "{what}: pore IoU with context {p1:.3} is not clearly (≥ 0.1) above the no-context model's {p0:.3}"
        );
    }
}

#[test]
fn eval_prints_known_scores() {
    let p = tmp("pred.npy");
    let t = tmp("truth.npy");
    // truth 0 0 0 1 1 2 / pred 0 0 1 1 1 0 → IoU 0.5, 0.667, 0
    npy::write(&t, &[1, 2, 3], &[0u8, 0, 0, 1, 1, 2], true).unwrap();
    npy::write(&p, &[1, 2, 3], &[0u8, 0, 1, 1, 1, 0], true).unwrap();
    let eval = |extra: &[&str]| {
        let mut a = vec![
            "eval",
            "--labels",
            p.to_str().unwrap(),
            "--truth",
            t.to_str().unwrap(),
        ];
        a.extend_from_slice(extra);
        volfuse(&a)
    };
    let (ok, out) = eval(&["--names", "bg", "a", "b"]);
    assert!(ok, "{out}");
    let row = |name: &str| {
        out.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no row {name} in {out}"))
            .to_string()
    };
    assert!(
        row("bg").contains("0.500") && row("bg").contains("0.667"),
        "{out}"
    );
    assert!(
        row("a ").contains("0.667") && row("a ").contains("0.800"),
        "{out}"
    );
    assert!(row("b ").contains("0.000"), "{out}");
    assert!(out.contains("accuracy 0.6667"), "{out}");
    // shapes must match
    npy::write(&p, &[6], &[0u8, 0, 1, 1, 1, 0], true).unwrap();
    let (ok, out) = eval(&[]);
    assert!(!ok && out.contains("must match"), "{out}");
}

#[test]
fn dump_gates_writes_four_maps_and_refuses_models_without_fusion() {
    // The context-fused fixture bundle (random weights, 16³ tile): the gate path does not
    // depend on trained weights.
    let m = fixture("bundle_tiny_ctx");
    let mut cfg = SynthConfig::new(7, [16; 3]);
    cfg.nucleus_offset = Some(0.8);
    let v = generate(&cfg).unwrap();
    let raw = tmp("g_raw.npy");
    let ctx = tmp("g_ctx.npy");
    npy::write(&raw, &[16, 16, 16], &v.raw, true).unwrap();
    npy::write(&ctx, &[16, 16, 16], &v.context, true).unwrap();
    let dir = tmp("gates");
    let labels = tmp("g_labels.npy");
    let args = |model: &PathBuf, gates: &PathBuf| -> Vec<String> {
        [
            "run",
            "--model",
            model.to_str().unwrap(),
            "--input",
            raw.to_str().unwrap(),
            "--context",
            ctx.to_str().unwrap(),
            "--output",
            labels.to_str().unwrap(),
            "--dump-gates",
            gates.to_str().unwrap(),
            "--backend",
            "cpu",
            "--force",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let a = args(&m, &dir);
    let (ok, out) = volfuse(&a.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    assert!(ok, "{out}");
    let c = Bundle::load(&m).unwrap().unet.config.base_channels;
    for k in 1..=4usize {
        let g = npy::read(&dir.join(format!("gate{k}.npy"))).unwrap();
        let s = 16 >> (k - 1);
        assert_eq!(g.shape, vec![c << (k - 1), s, s, s]);
        let d = g.to_f32();
        assert!(
            d.iter().all(|x| (0.0..=1.0).contains(x)),
            "gate{k} outside [0, 1]"
        );
        let (lo, hi) = d
            .iter()
            .fold((1f32, 0f32), |(a, b), x| (a.min(*x), b.max(*x)));
        assert!(hi - lo > 1e-4, "gate{k} is constant");
    }
    // Without --context there is nothing to gate with.
    let mut a = args(&m, &tmp("gates0"));
    let i = a.iter().position(|s| s == "--context").unwrap();
    a.drain(i..i + 2);
    let (ok, out) = volfuse(&a.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    assert!(!ok && out.contains("needs --context"), "{out}");
}

#[test]
fn a_model_without_fusion_has_no_gates() {
    use volfuse::graph::Graph;
    use volfuse::models::{Unet3d, UnetConfig};
    let cfg: UnetConfig = serde_json::from_value(serde_json::json!({
        "num_classes": 2, "base_channels": 4, "input_size": [16, 16, 16],
        "input_channels": 8, "use_context_fusion": false
    }))
    .unwrap();
    let u = Unet3d::random(cfg, 1).unwrap();
    let mut g = Graph::new();
    let f = g.input("f", &[1, 8, 16, 16, 16]);
    let c = g.input("c", &[1, 8, 16, 16, 16]);
    let e = u.build_with_gates(&mut g, f, c).expect_err("must fail");
    assert!(e.to_string().contains("no context fusion"), "{e}");
}
