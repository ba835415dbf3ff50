//! DINOv3 ViT parity with HF transformers on fixtures from tools/make_vit_fixtures.py
//! (random non-trivial weights; GELU and SwiGLU; f32, f16 and bf16 weights; square and
//! non-square images), on the CPU reference and the GPU backends.

mod common;

use common::{fixture, gpu, rel_err};
use volfuse::io::npy;
use volfuse::models::{Backend, Runner, Vit};

fn check(model: &str, input: &str, backend: Backend) {
    check_tol(model, input, backend, 1e-4);
}

fn check_tol(model: &str, input: &str, backend: Backend, tol: f32) -> f32 {
    let vit = Vit::load(&fixture(model)).expect("load fixture model");
    let input_dir = if model.starts_with("vit_gelu_") {
        "vit_gelu"
    } else {
        model
    };
    let x = npy::read(&fixture(&format!("{input_dir}/input_{input}.npy"))).expect("input");
    let want = npy::read(&fixture(&format!("{model}/output_{input}.npy"))).expect("output");
    let [n, _, h, w] = x.shape[..] else {
        panic!("input shape {:?}", x.shape)
    };
    let mut runner = Runner::new(backend.clone());
    let got = vit.run(&mut runner, &x.to_f32(), n, h, w, 8).expect("run");
    let e = rel_err(&got, &want.to_f32());
    eprintln!("{model} {input} on {}: rel err {e:.2e}", backend.describe());
    assert!(
        e <= tol,
        "{model} {input} on {}: rel err {e}",
        backend.describe()
    );
    e
}

fn all(backend: Backend) {
    for model in ["vit_gelu", "vit_swiglu", "vit_gelu_f16", "vit_gelu_bf16"] {
        for input in ["32x32", "48x32"] {
            check(model, input, backend.clone());
        }
    }
}

#[test]
fn cpu_matches_transformers() {
    all(Backend::Cpu);
}

#[test]
fn gpu_matches_transformers() {
    all(Backend::Gpu(gpu()));
}

#[test]
fn batches_split_to_any_size_give_the_same_tokens() {
    let vit = Vit::load(&fixture("vit_gelu")).unwrap();
    let x = npy::read(&fixture("vit_gelu/input_32x32.npy"))
        .unwrap()
        .to_f32();
    let mut runner = Runner::new(Backend::Gpu(gpu()));
    let whole = vit.run(&mut runner, &x, 2, 32, 32, 2).unwrap();
    let split = vit.run(&mut runner, &x, 2, 32, 32, 1).unwrap();
    assert!(rel_err(&split, &whole) < 1e-6);
}

#[test]
fn missing_weights_are_listed_by_name() {
    let dir = tempdir();
    std::fs::copy(fixture("vit_gelu/config.json"), dir.join("config.json")).unwrap();
    // A checkpoint with one layer's weights only: the second layer's keys are missing.
    let mut w = volfuse::io::Weights::load(&fixture("vit_gelu")).unwrap();
    let names: Vec<String> = w.names().iter().map(|s| s.to_string()).collect();
    let mut kept = volfuse::io::Weights::new();
    for n in names.iter().filter(|n| !n.contains("layer.1.")) {
        let t = w.take(n).unwrap();
        kept.insert(n.clone(), t.shape, t.data).unwrap();
    }
    let cfg = volfuse::models::VitConfig::load(&dir.join("config.json")).unwrap();
    let err = match Vit::from_weights(cfg, kept) {
        Ok(_) => panic!("a checkpoint without layer 1 loaded"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("layer.1.attention.q_proj.weight")
            && err.contains("layer.1.mlp.down_proj.bias"),
        "{err}"
    );
}

#[test]
fn non_hf_folder_is_a_clear_error() {
    let err = match Vit::load(&tempdir()) {
        Ok(_) => panic!("loaded an empty folder"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("config.json"), "{err}");
}

fn tempdir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!(
        "volfuse-test-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn gpu_f16_weights_match_transformers_within_1e_2() {
    use std::sync::Arc;
    use volfuse::gpu::{GpuContext, GpuOptions, Precision};
    let mut opts = GpuOptions::from_env().expect("VOLFUSE_* options");
    opts.precision = Precision::F16;
    let ctx = Arc::new(GpuContext::new(&opts).expect("a GPU adapter"));
    for model in ["vit_gelu", "vit_swiglu", "vit_gelu_f16", "vit_gelu_bf16"] {
        for input in ["32x32", "48x32"] {
            let e = check_tol(model, input, Backend::Gpu(ctx.clone()), 1e-2);
            // f32 checkpoints lose precision in f16 (so f16 storage is really in use);
            // f16 and (in range) bf16 checkpoints are exact in f16.
            if !model.ends_with("16") {
                assert!(e > 1e-5, "{model} {input}: {e}: were the weights f16?");
            }
        }
    }
}

/// f16 activations (`Precision::F16Act`, docs/precision.md): f16 weights plus q, k, v and
/// the MLP hidden layer stored as f16 between kernels. Within 1e-2 of transformers on every
/// fixture, and measurably not f32 (f16 rounding of the activations shows even with the
/// f16 checkpoints, whose weights are exact in f16).
#[test]
fn gpu_f16_activations_match_transformers_within_1e_2() {
    use std::sync::Arc;
    use volfuse::gpu::{GpuContext, GpuOptions, Precision};
    let mut opts = GpuOptions::from_env().expect("VOLFUSE_* options");
    opts.precision = Precision::F16Act;
    let ctx = Arc::new(GpuContext::new(&opts).expect("a GPU adapter"));
    let vit = Vit::load(&fixture("vit_gelu")).expect("fixture");
    if !vit.act_f16_on(&Backend::Gpu(ctx.clone())) {
        eprintln!("no f16-activation path on {}: skipped", ctx.describe());
        return;
    }
    for model in ["vit_gelu", "vit_swiglu", "vit_gelu_f16", "vit_gelu_bf16"] {
        for input in ["32x32", "48x32"] {
            let e = check_tol(model, input, Backend::Gpu(ctx.clone()), 1e-2);
            assert!(e > 1e-5, "{model} {input}: {e}: were the activations f16?");
        }
    }
    // f16 values take half the bytes in the executor's buffer plan (all values together;
    // the buffers, shared by liveness, are never larger).
    let plan = |f16: bool| vit.graph_with(2, 48, 32, f16).unwrap().plan(true);
    let (p32, p16) = (plan(false), plan(true));
    assert!(
        p16.unshared_bytes < p32.unshared_bytes && p16.peak_bytes <= p32.peak_bytes,
        "planned activation bytes f16 {}/{} vs f32 {}/{} (all values/buffers)",
        p16.unshared_bytes,
        p16.peak_bytes,
        p32.unshared_bytes,
        p32.peak_bytes
    );
    let compiled: Vec<&str> = ctx.compiled_kernels().iter().map(|k| k.entry).collect();
    for e in [
        "matmul_tex16_rope_o16",
        "matmul_tex16_o16",
        "attention_sg",
        "layernorm_sg_o16",
    ] {
        assert!(compiled.contains(&e), "{e} not used: {compiled:?}");
    }
}

/// The fixtures' weights are below one 64 KiB uniform window, so their projections run on
/// the generic kernel with the RoPE / residual epilogues as in-place passes. A ViT with
/// hidden size 128 (head size 16, 4 registers, non-square image) takes the texture path with
/// both epilogues fused; it must match the CPU reference path (which the fixtures tie to
/// transformers).
#[test]
fn gpu_fused_epilogues_match_cpu_backend() {
    let cfg = volfuse::models::VitConfig {
        hidden_size: 128,
        intermediate_size: 256,
        num_hidden_layers: 2,
        num_attention_heads: 8,
        num_register_tokens: 4,
        ..Default::default()
    };
    let vit = Vit::random(cfg, 11).expect("random ViT");
    let (n, h, w) = (3, 48, 80);
    let x: Vec<f32> = (0..n * 3 * h * w)
        .map(|i| (((i * 7919) % 2003) as f32 / 1001.0 - 1.0) * 2.0)
        .collect();
    let want = vit
        .run(&mut Runner::new(Backend::Cpu), &x, n, h, w, n)
        .expect("cpu run");
    let ctx = gpu();
    let got = vit
        .run(&mut Runner::new(Backend::Gpu(ctx.clone())), &x, n, h, w, n)
        .expect("gpu run");
    let e = rel_err(&got, &want);
    eprintln!("fused ViT on {}: rel err {e:.2e}", ctx.describe());
    assert!(e <= 1e-4, "rel err {e}");
    let caps = &ctx.caps;
    if caps.subgroups && caps.min_subgroup_size >= 8 && caps.max_uniform_binding >= 65536 {
        let compiled: Vec<&str> = ctx.compiled_kernels().iter().map(|k| k.entry).collect();
        // (matmul_tex48r4w_*: W from a texture, three column blocks per invocation, every
        // block in one dispatch, on CPU adapters; matmul_tex16r4_*: W through uniform
        // windows elsewhere)
        for e in ["_rope", "_res"] {
            let used = compiled
                .iter()
                .any(|k| k.starts_with("matmul_tex") && k.contains("r4") && k.ends_with(e));
            assert!(used, "no four-row {e} kernel: {compiled:?}");
        }
    }
}
