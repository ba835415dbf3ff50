//! Tests of [`super`].

use super::*;
use safetensors::tensor::TensorView;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("volfuse-weights-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Writes a safetensors file of (name, dtype, shape, raw little-endian bytes).
fn write_st(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.to_string(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn err(r: Result<impl std::fmt::Debug>) -> String {
    r.unwrap_err().to_string()
}

#[test]
fn dinov3_fixture_layout_and_aliases() {
    let w = Weights::load(&fixtures().join("vit_gelu")).unwrap();
    assert_eq!(w.len(), 5 + 2 * 17 + 2);
    // The file stores `layer.N.`; transformers ≥ 5 modules are `model.layer.N.`.
    assert!(w.names().contains(&"layer.0.norm1.weight"));
    let a = w.get("layer.0.attention.q_proj.weight").unwrap();
    let b = w.get("model.layer.0.attention.q_proj.weight").unwrap();
    assert_eq!(a.shape, vec![64, 64]);
    assert_eq!(a.stored, Dtype::F32);
    assert!(std::ptr::eq(a, b));
    assert_eq!(
        w.resolve("model.layer.1.norm2.bias"),
        Some("layer.1.norm2.bias")
    );
    let d = 64;
    let mut expect: Vec<(String, Vec<usize>)> = vec![
        ("embeddings.cls_token".into(), vec![1, 1, d]),
        ("embeddings.mask_token".into(), vec![1, 1, d]),
        ("embeddings.register_tokens".into(), vec![1, 4, d]),
        (
            "embeddings.patch_embeddings.weight".into(),
            vec![d, 3, 16, 16],
        ),
        ("embeddings.patch_embeddings.bias".into(), vec![d]),
        ("norm.weight".into(), vec![d]),
        ("norm.bias".into(), vec![d]),
    ];
    for l in 0..2 {
        for (k, s) in [
            ("norm1.weight", vec![d]),
            ("attention.q_proj.weight", vec![d, d]),
            ("attention.q_proj.bias", vec![d]),
            ("attention.k_proj.weight", vec![d, d]),
            ("attention.v_proj.weight", vec![d, d]),
            ("attention.o_proj.bias", vec![d]),
            ("layer_scale1.lambda1", vec![d]),
            ("mlp.up_proj.weight", vec![256, d]),
            ("mlp.down_proj.weight", vec![d, 256]),
            ("layer_scale2.lambda1", vec![d]),
        ] {
            expect.push((format!("model.layer.{l}.{k}"), s));
        }
    }
    let req: Vec<(&str, &[usize])> = expect
        .iter()
        .map(|(n, s)| (n.as_str(), s.as_slice()))
        .collect();
    w.require(&req).unwrap();
    // Layer scale was randomised in U(0.5, 1.5) by the fixture script.
    let l = w.get_shaped("layer.0.layer_scale1.lambda1", &[64]).unwrap();
    assert!(l.iter().all(|&x| (0.5..1.5).contains(&x)));
    assert!(l.iter().any(|&x| (x - 1.0).abs() > 0.1));
}

#[test]
fn f16_and_bf16_fixtures_are_exact_upcasts() {
    let w32 = Weights::load(&fixtures().join("vit_gelu")).unwrap();
    for (dir, dtype) in [("vit_gelu_f16", Dtype::F16), ("vit_gelu_bf16", Dtype::BF16)] {
        let w = Weights::load(&fixtures().join(dir)).unwrap();
        assert_eq!(w.names(), w32.names());
        for name in w.names() {
            let (t, r) = (w.get(name).unwrap(), w32.get(name).unwrap());
            assert_eq!(t.stored, dtype);
            assert_eq!(t.shape, r.shape);
            for (&x, &y) in t.data.iter().zip(&r.data) {
                let rounded = match dtype {
                    Dtype::F16 => f16::from_f32(y).to_f32(),
                    _ => bf16::from_f32(y).to_f32(),
                };
                assert_eq!(x.to_bits(), rounded.to_bits(), "{dir}: {name}");
            }
        }
    }
}

#[test]
fn swiglu_fixture_has_gate_proj() {
    let w = Weights::load(&fixtures().join("vit_swiglu/model.safetensors")).unwrap();
    let g: &[usize] = &[176, 64];
    let b: &[usize] = &[176];
    let dn: &[usize] = &[64, 176];
    w.require(&[
        ("layer.1.mlp.gate_proj.weight", g),
        ("layer.1.mlp.gate_proj.bias", b),
        ("layer.1.mlp.up_proj.weight", g),
        ("layer.1.mlp.down_proj.weight", dn),
    ])
    .unwrap();
}

#[test]
fn converts_f32_f16_bf16_and_keeps_other_dtypes_aside() {
    let dir = temp_dir("dtypes");
    let p = dir.join("m.safetensors");
    let vals = [1.0f32, -2.5, 0.333, 65504.0, -0.0, 1e-3];
    let h: Vec<u8> = vals
        .iter()
        .flat_map(|&x| f16::from_f32(x).to_le_bytes())
        .collect();
    let b: Vec<u8> = vals
        .iter()
        .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
        .collect();
    write_st(
        &p,
        &[
            ("a.f32", Dtype::F32, vec![2, 3], f32_bytes(&vals)),
            ("a.f16", Dtype::F16, vec![3, 2], h),
            ("a.bf16", Dtype::BF16, vec![6], b),
            (
                "bn.num_batches_tracked",
                Dtype::I64,
                vec![],
                7i64.to_le_bytes().to_vec(),
            ),
            ("scalar", Dtype::F32, vec![], f32_bytes(&[4.0])),
        ],
    );
    let w = Weights::load(&p).unwrap();
    assert_eq!(w.len(), 5);
    assert_eq!(w.get("a.f32").unwrap().data, vals);
    let t = w.get("a.f16").unwrap();
    assert_eq!((t.shape.clone(), t.stored), (vec![3, 2], Dtype::F16));
    let want: Vec<f32> = vals.iter().map(|&x| f16::from_f32(x).to_f32()).collect();
    assert_eq!(t.data, want);
    let want: Vec<f32> = vals.iter().map(|&x| bf16::from_f32(x).to_f32()).collect();
    assert_eq!(w.get("a.bf16").unwrap().data, want);
    assert_eq!(w.get_shaped("scalar", &[]).unwrap(), &[4.0]);
    let e = err(w.get("bn.num_batches_tracked"));
    assert!(
        e.contains("dtype I64") && e.contains("F32, F16 and BF16"),
        "{e}"
    );
    assert!(w.contains("bn.num_batches_tracked"));
    assert_eq!(w.num_values(), 6 * 3 + 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn require_reports_every_problem_at_once() {
    let mut w = Weights::new();
    w.insert("model.layer.0.norm1.weight", vec![4], vec![1.0; 4])
        .unwrap();
    w.insert("layer.0.q.weight", vec![4, 4], vec![0.0; 16])
        .unwrap();
    let r = w.require(&[
        ("layer.0.norm1.weight", &[4]),
        ("layer.0.q.weight", &[4, 8]),
        ("layer.0.k.weight", &[4, 4]),
        ("norm.bias", &[4]),
    ]);
    let Err(Error::Weights(msg)) = r else {
        panic!("expected Error::Weights, got {r:?}")
    };
    assert!(msg.contains("3 problem(s)"), "{msg}");
    assert!(
        msg.contains("wrong shape  layer.0.q.weight  expected [4, 8], found [4, 4]"),
        "{msg}"
    );
    assert!(
        msg.contains("missing      layer.0.k.weight  expected [4, 4]"),
        "{msg}"
    );
    assert!(
        msg.contains("missing      norm.bias  expected [4]"),
        "{msg}"
    );
    assert!(!msg.contains("norm1.weight  expected"), "{msg}");
    let e = err(w.get_shaped("layer.0.q.weight", &[16]));
    assert!(e.contains("expected shape [16], found [4, 4]"), "{e}");
    assert!(w.insert("x", vec![2], vec![1.0]).is_err());
}

#[test]
fn prefix_alias_strip_and_hint() {
    let mut w = Weights::new();
    w.insert("backbone.layer.0.w", vec![1], vec![1.0]).unwrap();
    w.insert("backbone.norm.w", vec![1], vec![2.0]).unwrap();
    let e = err(w.get("layer.0.w"));
    assert!(
        e.contains("stored as 'backbone.layer.0.w'") && e.contains("'backbone.'"),
        "{e}"
    );
    let w2 = w.clone().with_alias_prefix("backbone.");
    assert_eq!(w2.get("norm.w").unwrap().data, vec![2.0]);
    assert_eq!(w.strip_prefix("backbone.").unwrap(), 2);
    assert_eq!(w.names(), vec!["layer.0.w", "norm.w"]);
    assert_eq!(w.get("model.layer.0.w").unwrap().data, vec![1.0]);
    let t = w.take("model.norm.w").unwrap();
    assert_eq!(t.data, vec![2.0]);
    assert_eq!(w.names(), vec!["layer.0.w"]);
    assert!(err(w.get("nothing")).contains("e.g. 'layer.0.w'"));

    let mut c = Weights::new();
    c.insert("a.x", vec![1], vec![1.0]).unwrap();
    c.insert("x", vec![1], vec![1.0]).unwrap();
    assert!(err(c.strip_prefix("a.")).contains("already exist"));
}

#[test]
fn sharded_folder() {
    let dir = temp_dir("sharded");
    write_st(
        &dir.join("model-00001-of-00002.safetensors"),
        &[
            ("layer.0.w", Dtype::F32, vec![2], f32_bytes(&[1.0, 2.0])),
            ("layer.0.b", Dtype::F32, vec![1], f32_bytes(&[3.0])),
        ],
    );
    let h: Vec<u8> = [0.5f32, 4.0]
        .iter()
        .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
        .collect();
    write_st(
        &dir.join("model-00002-of-00002.safetensors"),
        &[("norm.w", Dtype::BF16, vec![2], h)],
    );
    let index = serde_json::json!({
        "metadata": {"total_size": 20},
        "weight_map": {
            "layer.0.w": "model-00001-of-00002.safetensors",
            "layer.0.b": "model-00001-of-00002.safetensors",
            "norm.w": "model-00002-of-00002.safetensors",
        }
    });
    std::fs::write(dir.join(INDEX_FILE), index.to_string()).unwrap();
    let w = Weights::load(&dir).unwrap();
    assert_eq!(w.names(), vec!["layer.0.b", "layer.0.w", "norm.w"]);
    assert_eq!(w.get("norm.w").unwrap().data, vec![0.5, 4.0]);
    assert_eq!(w.get("model.layer.0.w").unwrap().data, vec![1.0, 2.0]);

    // An index naming a tensor its shard lacks, and a missing shard.
    let bad = serde_json::json!({"weight_map": {
        "layer.0.w": "model-00001-of-00002.safetensors",
        "layer.9.w": "model-00001-of-00002.safetensors",
    }});
    std::fs::write(dir.join(INDEX_FILE), bad.to_string()).unwrap();
    let e = err(Weights::load(&dir));
    assert!(
        e.contains("'layer.9.w'") && e.contains("do not belong together"),
        "{e}"
    );
    let bad = serde_json::json!({"weight_map": {"x": "model-00003-of-00003.safetensors"}});
    std::fs::write(dir.join(INDEX_FILE), bad.to_string()).unwrap();
    assert!(err(Weights::load(&dir)).contains("shard listed in"));
    std::fs::write(dir.join(INDEX_FILE), "{\"weight_map\": 3}").unwrap();
    assert!(err(Weights::load(&dir)).contains("no \"weight_map\""));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn rejects_damaged_files() {
    let dir = temp_dir("damaged");
    let p = dir.join("m.safetensors");
    write_st(
        &p,
        &[("a", Dtype::F32, vec![4], f32_bytes(&[1.0, 2.0, 3.0, 4.0]))],
    );
    let good = std::fs::read(&p).unwrap();

    let cut = dir.join("cut.safetensors");
    std::fs::write(&cut, &good[..good.len() - 3]).unwrap();
    let e = err(Weights::load(&cut));
    assert!(
        e.contains("truncated") && e.contains("16 bytes") && e.contains("13"),
        "{e}"
    );

    std::fs::write(&cut, &good[..5]).unwrap();
    assert!(err(Weights::load(&cut)).contains("truncated"));

    let mut long = good.clone();
    long.extend_from_slice(&[0; 4]);
    std::fs::write(&cut, &long).unwrap();
    assert!(err(Weights::load(&cut)).contains("unexpected bytes"));

    std::fs::write(&cut, b"\x10\0\0\0\0\0\0\0{not json at all}").unwrap();
    assert!(err(Weights::load(&cut)).contains("does not parse"));
    std::fs::write(&cut, b"\xff\xff\xff\xff\0\0\0\0{}").unwrap();
    assert!(err(Weights::load(&cut)).contains("header claims"));

    assert!(err(Weights::load(&dir.join("none.safetensors"))).contains("file not found"));
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    assert!(err(Weights::load(&empty)).contains("holds neither"));
    std::fs::remove_dir_all(&dir).unwrap();
}
