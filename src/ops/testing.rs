//! Test helpers: a shared GPU context, random data, and kernel-vs-reference comparison.

use super::{run_cpu, run_gpu, Op};
use crate::gpu::{GpuContext, GpuOptions};
use rand::{rngs::SmallRng, Rng, SeedableRng};
use std::sync::OnceLock;

/// The value written into output buffers before a kernel runs.
pub const POISON: f32 = f32::NAN;

/// One GPU context shared by all tests of a binary (pipelines compile once).
pub fn ctx() -> &'static GpuContext {
    static CTX: OnceLock<GpuContext> = OnceLock::new();
    CTX.get_or_init(|| {
        if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
            std::env::set_var("XDG_RUNTIME_DIR", std::env::temp_dir());
        }
        let opts = GpuOptions::from_env().expect("VOLFUSE_API");
        GpuContext::new(&opts).expect("a GPU adapter (install mesa-vulkan-drivers)")
    })
}

/// A fresh random generator (seeded from the clock: every run sees new data; the seed is
/// printed so a failure can be reproduced with VOLFUSE_SEED).
pub fn rng() -> SmallRng {
    let seed = std::env::var("VOLFUSE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    eprintln!("VOLFUSE_SEED={seed}");
    SmallRng::seed_from_u64(seed)
}

/// `n` uniform values in [-1, 1).
pub fn random(rng: &mut SmallRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// Max |a-b| / max(‖ref‖∞, tiny): relative to the reference's scale.
pub fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
    let mut worst = 0f32;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let d = (g - w).abs();
        if !d.is_finite() {
            panic!("element {i}: got {g}, want {w} (non-finite: an element was not written?)");
        }
        worst = worst.max(d / scale);
    }
    worst
}

/// Runs `op` on both backends with random inputs of `shapes` and asserts agreement.
/// Returns the inputs used (for extra checks).
pub fn check_op(op: &dyn Op, shapes: &[Vec<usize>], tol: f32) -> Vec<Vec<f32>> {
    let mut r = rng();
    let data: Vec<Vec<f32>> = shapes
        .iter()
        .map(|s| random(&mut r, s.iter().product()))
        .collect();
    check_op_with(op, &data, shapes, tol);
    data
}

/// Inputs `data` paired with their shapes, as `run_cpu` / `run_gpu` take them.
pub fn pairs<'a>(data: &'a [Vec<f32>], shapes: &'a [Vec<usize>]) -> Vec<(&'a [f32], &'a [usize])> {
    data.iter()
        .zip(shapes)
        .map(|(d, s)| (d.as_slice(), s.as_slice()))
        .collect()
}

/// As [`check_op`], with given inputs.
pub fn check_op_with(op: &dyn Op, data: &[Vec<f32>], shapes: &[Vec<usize>], tol: f32) {
    let inputs = pairs(data, shapes);
    let (want, ws) = run_cpu(op, &inputs).expect("cpu");
    let (got, gs) = run_gpu(ctx(), op, &inputs, Some(POISON)).expect("gpu");
    assert_eq!(ws, gs);
    // A test on zeros proves nothing; tiny outputs (relu of one negative value) may be.
    assert!(
        want.len() < 16 || want.iter().any(|v| *v != 0.0),
        "{}: reference output is all zeros",
        op.name()
    );
    let e = rel_err(&got, &want);
    assert!(e <= tol, "{} {:?}: rel err {e} > {tol}", op.name(), shapes);
}

/// Development aid for `#[ignore]`d lab tests: times `case` `LAB_RUNS` times (default 3)
/// and prints wall time and GFLOP per CPU-second of this process (lavapipe's threads), which
/// stays meaningful when other work shares the cores.
pub fn lab_time(ctx: &GpuContext, case: &crate::bench::Case) {
    let runs: usize = std::env::var("LAB_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let cpu = || {
        let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        let f: Vec<f64> = s[s.rfind(')').map_or(0, |i| i + 2)..]
            .split(' ')
            .map(|v| v.parse().unwrap_or(0.0))
            .collect();
        (f.get(11).unwrap_or(&0.0) + f.get(12).unwrap_or(&0.0)) / 100.0
    };
    eprintln!("{}", ctx.describe());
    for _ in 0..runs {
        let c0 = cpu();
        let t = crate::bench::time_gpu(ctx, case, 1).expect("time_gpu");
        let used = cpu() - c0;
        // time_gpu runs the dispatches twice (warm-up + timed).
        eprintln!(
            "{t}  cpu {used:.2} s  => {:.2} GFLOP/cpu-s",
            t.gflops * t.seconds * 2.0 / used.max(1e-9)
        );
    }
}

/// Checks that the generated subgroup section of `shader` (everything from its
/// `// BEGIN subgroups` marker) equals `want`; with `VOLFUSE_REGEN_CONV3D=1` rewrites the
/// file at `path` (relative: cargo runs tests in the package root) instead.
pub fn check_generated(shader: &crate::shaders::Shader, path: &str, want: &str) {
    let text = shader.text;
    let at = text.find("// BEGIN subgroups").unwrap_or(text.len());
    if std::env::var_os("VOLFUSE_REGEN_CONV3D").is_some() {
        std::fs::write(path, format!("{}{want}", &text[..at]))
            .expect("write the regenerated shader");
        return;
    }
    assert!(
        text[at..] == *want,
        "{path} is stale: regenerate it with VOLFUSE_REGEN_CONV3D=1 cargo test"
    );
}
