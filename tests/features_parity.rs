//! 3D feature extraction (dinov3_playground `extract_dinov3_features_3d`) against the
//! reference of tools/reference_features.py: the fixtures tests/fixtures/features_{u8,u16,f32}
//! (fp32 ViT tests/fixtures/vit_gelu), on the CPU reference and the GPU backends; the xy
//! intermediates; projection-first; xy only; bad volumes; the memory figures.

mod common;

use common::{fixture, gpu, rel_err};
use serde_json::Value;
use volfuse::io::npy::{self, Npy, NpyData};
use volfuse::models::planes::{
    debug_plane, extract_features, plan_memory, plan_memory_for, FeatureParams, MemoryEstimate,
    Plane, PlaneSampler, Projection, Volume, VolumeData,
};
use volfuse::models::preprocess;
use volfuse::models::{Backend, Runner, Vit, VitConfig};

const FIXTURES: [&str; 3] = ["features_u8", "features_u16", "features_f32"];

struct Case {
    volume: Volume,
    params: FeatureParams,
    json: Value,
}

fn read(name: &str, file: &str) -> Npy {
    npy::read(&fixture(&format!("{name}/{file}"))).expect("fixture array")
}

fn three<T: Copy>(v: &Value, f: impl Fn(&Value) -> T) -> [T; 3] {
    let a = v.as_array().expect("array of 3");
    [f(&a[0]), f(&a[1]), f(&a[2])]
}

fn case(name: &'static str) -> Case {
    let text = std::fs::read_to_string(fixture(&format!("{name}/params.json"))).expect("params");
    let json: Value = serde_json::from_str(&text).expect("json");
    let volume = Volume::read(&fixture(&format!("{name}/volume.npy"))).expect("volume");
    let f32_of = |v: &Value| v.as_f64().expect("number") as f32;
    let params = FeatureParams {
        input_size: three(&json["input_size"], |v| v.as_u64().expect("size") as usize),
        slice_size: json["slice_size"].as_u64().expect("slice_size") as usize,
        mean: three(&json["mean"], f32_of),
        std: three(&json["std"], f32_of),
        orthogonal_planes: json["use_orthogonal_planes"].as_bool().expect("bool"),
        batch: 512,
    };
    Case {
        volume,
        params,
        json,
    }
}

fn vit() -> Vit {
    Vit::load(&fixture("vit_gelu")).expect("the fixture ViT")
}

fn check_features(backend: Backend, batch: usize) {
    let vit = vit();
    let mut runner = Runner::new(backend.clone());
    for name in FIXTURES {
        let c = case(name);
        let params = FeatureParams { batch, ..c.params };
        let want = read(name, "features.npy");
        let [d, h, w] = params.input_size;
        assert_eq!(want.shape, vec![vit.config.hidden_size, d, h, w]);
        let got = extract_features(&vit, &mut runner, &c.volume, &params, None).expect("extract");
        let e = rel_err(&got, &want.to_f32());
        eprintln!(
            "{name} ({} {:?}) on {} (batch {batch}): rel err {e:.2e}",
            c.volume.dtype(),
            c.volume.shape(),
            backend.describe()
        );
        assert!(e <= 1e-3, "{name} on {}: rel err {e}", backend.describe());
    }
}

#[test]
fn cpu_matches_reference() {
    check_features(Backend::Cpu, 512);
}

#[test]
fn gpu_matches_reference() {
    check_features(Backend::Gpu(gpu()), 512);
}

#[test]
fn padded_batches_give_the_same_features() {
    // Batches of 3: 8 slices → 3 + 3 + 2 (padded), 25 slices → 9 batches of 3 (2 padded).
    check_features(Backend::Gpu(gpu()), 3);
}

#[test]
fn slice_indices_and_downsampling_follow_the_reference() {
    for name in FIXTURES {
        let c = case(name);
        for plane in Plane::ALL {
            let p = &c.json["planes"][plane.name()];
            let n = c.params.input_size[plane.normal_axis()];
            let s = PlaneSampler::new(c.volume.shape(), plane, n);
            let want: Vec<usize> = p["slice_indices"]
                .as_array()
                .expect("indices")
                .iter()
                .map(|v| v.as_u64().expect("index") as usize)
                .collect();
            assert_eq!(s.indices(), &want[..], "{name} {}", plane.name());
            assert_eq!(
                s.downsampled(),
                p["downsampled"].as_bool().expect("bool"),
                "{name} {}",
                plane.name()
            );
        }
    }
}

fn same<T: PartialEq + std::fmt::Debug>(got: &[T], want: &[T]) -> usize {
    assert_eq!(got.len(), want.len());
    got.iter().zip(want).filter(|(g, w)| g != w).count()
}

#[test]
fn xy_intermediates_match_the_reference() {
    let vit = vit();
    let mut runner = Runner::new(Backend::Cpu);
    for name in FIXTURES {
        let c = case(name);
        let shape = c.volume.shape();
        let d = c.params.input_size[0];
        // Step 1 on the whole volume (the extraction does it slice by slice).
        let down = read(name, "downsampled_xy.npy");
        let bad = match (c.volume.data(), &down.data) {
            (VolumeData::U8(v), NpyData::U8(w)) => {
                same(&preprocess::downsample_normal(v, shape, 0, d), w)
            }
            (VolumeData::U16(v), NpyData::U16(w)) => {
                same(&preprocess::downsample_normal(v, shape, 0, d), w)
            }
            (VolumeData::F32(v), NpyData::F32(w)) => {
                same(&preprocess::downsample_normal(v, shape, 0, d), w)
            }
            _ => panic!("{name}: dtypes"),
        };
        assert_eq!(bad, 0, "{name}: downsampled voxels differ");

        let dbg = debug_plane(&vit, &mut runner, &c.volume, Plane::Xy, &c.params).expect("debug");
        let resized = read(name, "resized_xy.npy");
        let bad = match (&dbg.resized, &resized.data) {
            (VolumeData::U8(v), NpyData::U8(w)) => same(v, w),
            (VolumeData::U16(v), NpyData::U16(w)) => same(v, w),
            (VolumeData::F32(v), NpyData::F32(w)) => same(&bits(v), &bits(w)),
            _ => panic!("{name}: resized dtypes"),
        };
        assert_eq!(bad, 0, "{name}: resized slices differ");
        let NpyData::U8(q) = read(name, "slices_xy.npy").data else {
            panic!("{name}: slices_xy must be uint8")
        };
        assert_eq!(
            same(&dbg.quantized, &q),
            0,
            "{name}: quantised slices differ"
        );
        let pixels = read(name, "pixels_xy.npy").to_f32();
        assert_eq!(
            same(&bits(&dbg.pixels[..pixels.len()]), &bits(&pixels)),
            0,
            "{name}: processor output differs"
        );
        let tokens = read(name, "tokens_xy.npy").to_f32();
        let e = rel_err(&dbg.tokens, &tokens);
        eprintln!(
            "{name}: xy downsample, resize ({} slices), quantisation and pixels bit-exact; \
             tokens rel err {e:.2e}",
            dbg.indices.len()
        );
        assert!(e <= 1e-4, "{name}: tokens rel err {e}");
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn check_xy_only(backend: Backend) {
    let vit = vit();
    let mut runner = Runner::new(backend.clone());
    for name in FIXTURES {
        let c = case(name);
        let params = FeatureParams {
            orthogonal_planes: false,
            ..c.params
        };
        let got = extract_features(&vit, &mut runner, &c.volume, &params, None).expect("extract");
        let e = rel_err(&got, &read(name, "plane_xy.npy").to_f32());
        eprintln!("{name} xy only on {}: rel err {e:.2e}", backend.describe());
        assert!(e <= 1e-3, "{name} xy only: rel err {e}");
    }
}

#[test]
fn xy_only_matches_the_reference_plane() {
    check_xy_only(Backend::Cpu);
    check_xy_only(Backend::Gpu(gpu()));
}

/// A deterministic (C_out, C_in) projection with weights in ±0.5 and biases in ±1.
fn projection(co: usize, ci: usize) -> Projection {
    let mut s = 0x9e3779b97f4a7c15u64;
    let mut next = move || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let w: Vec<f32> = (0..co * ci).map(|_| next()).collect();
    let b: Vec<f32> = (0..co).map(|_| 2.0 * next()).collect();
    Projection::new(w, b, co, ci).expect("projection")
}

fn check_projection_first(backend: Backend) {
    let vit = vit();
    let cd = vit.config.hidden_size;
    let proj = projection(8, cd);
    let mut runner = Runner::new(backend.clone());
    for name in FIXTURES {
        let c = case(name);
        let full = extract_features(&vit, &mut runner, &c.volume, &c.params, None).expect("full");
        let want = proj.apply(&full).expect("lift then project");
        let got = extract_features(&vit, &mut runner, &c.volume, &c.params, Some(&proj))
            .expect("projection first");
        let [d, h, w] = c.params.input_size;
        assert_eq!(got.len(), 8 * d * h * w);
        let e = rel_err(&got, &want);
        eprintln!(
            "{name} on {}: projection-first vs lift-then-project rel err {e:.2e}",
            backend.describe()
        );
        assert!(e <= 1e-5, "{name} on {}: rel err {e}", backend.describe());
    }
}

#[test]
fn projection_first_equals_lift_then_project_cpu() {
    check_projection_first(Backend::Cpu);
}

#[test]
fn projection_first_equals_lift_then_project_gpu() {
    check_projection_first(Backend::Gpu(gpu()));
}

fn err_of<T>(r: volfuse::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_volumes_and_parameters_give_clear_errors() {
    let flat = Npy::new(vec![4, 5], NpyData::U8(vec![0; 20])).expect("npy");
    let e = err_of(Volume::from_npy(flat));
    assert!(e.contains("3-D") && e.contains("[4, 5]"), "{e}");

    let mut v = vec![1.0f32; 2 * 3 * 4];
    v[13] = f32::NAN;
    let e = err_of(Volume::from_npy(
        Npy::new(vec![2, 3, 4], NpyData::F32(v)).expect("npy"),
    ));
    assert!(e.contains("NaN") && e.contains("(1, 0, 1)"), "{e}");

    let e = err_of(Volume::new(
        [2, 2, 1],
        VolumeData::F32(vec![0.0, 1.0, f32::INFINITY, 2.0]),
    ));
    assert!(e.contains("non-finite") && e.contains("inf"), "{e}");

    let e = err_of(Volume::from_npy(
        Npy::new(vec![1, 2, 2], NpyData::I16(vec![0; 4])).expect("npy"),
    ));
    assert!(
        e.contains("int16") && e.contains("uint8, uint16 or float32"),
        "{e}"
    );

    let e = err_of(Volume::new([0, 2, 2], VolumeData::U8(Vec::new())));
    assert!(e.contains("empty"), "{e}");

    let vit = vit();
    let mut runner = Runner::new(Backend::Cpu);
    let c = case("features_u8");
    let small = FeatureParams {
        slice_size: 8,
        ..c.params.clone()
    };
    let e = err_of(extract_features(&vit, &mut runner, &c.volume, &small, None));
    assert!(e.contains("patch size"), "{e}");
    let e = err_of(extract_features(
        &vit,
        &mut runner,
        &c.volume,
        &c.params,
        Some(&projection(4, 32)),
    ));
    assert!(e.contains("32 channels") && e.contains("64"), "{e}");
    let e = err_of(Projection::new(vec![0.0; 5], vec![0.0; 2], 2, 3));
    assert!(e.contains("(2, 3)"), "{e}");
}

#[test]
fn memory_figures_for_a_512_cube_to_128() {
    let backend = Backend::Gpu(gpu());
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    eprintln!(
        "512³ volume → 128³ features, S = 512, on {} (max binding {:.0} MiB); MiB",
        backend.describe(),
        mib(backend.max_binding())
    );
    eprintln!(
        "{:<6} {:>5} {:>6} | {:>8} {:>8} {:>9} {:>9} | {:>9} {:>9} | {:>6} {:>6}",
        "ViT",
        "batch",
        "C",
        "ViT act",
        "lift act",
        "accum",
        "peak",
        "weights",
        "total",
        "peak÷",
        "total÷"
    );
    for size in ["s", "l"] {
        let cfg = VitConfig::preset(size).expect("preset");
        let vit = Vit::random(cfg.clone(), 0).expect("random ViT");
        for batch in [512, 16, 8, 4, 1] {
            let params = FeatureParams {
                batch,
                ..FeatureParams::new([128, 128, 128], 512)
            };
            let plan = |c: Option<usize>| {
                plan_memory_for(&vit, &params, [512; 3], c, &backend).expect("plan")
            };
            let full = plan(None);
            for c in [None, Some(64), Some(32)] {
                let m = if c.is_none() { full.clone() } else { plan(c) };
                let peak = full.peak_bytes() as f64 / m.peak_bytes() as f64;
                let total = full.total_bytes() as f64 / m.total_bytes() as f64;
                eprintln!(
                    "{:<6} {:>5} {:>6} | {:>8.0} {:>8.0} {:>9.0} {:>9.0} | {:>9.0} {:>9.0} | {:>5.1}× {:>5.1}×",
                    format!("{size} {}", cfg.hidden_size),
                    format!("{:?}", m.vit_batches),
                    m.channels,
                    mib(m.vit_activation_bytes),
                    mib(m.lift_activation_bytes),
                    mib(m.accumulator_bytes),
                    mib(m.peak_bytes()),
                    mib(m.vit_weight_bytes + m.lift_weight_bytes),
                    mib(m.total_bytes()),
                    peak,
                    total
                );
                // The buffers projection-first shrinks: lift + accumulator.
                let feature =
                    |m: &MemoryEstimate| (m.lift_activation_bytes + m.accumulator_bytes) as f64;
                if c == Some(32) {
                    let r = feature(&full) / feature(&m);
                    assert!(
                        r >= 8.0,
                        "ViT-{size} batch {batch}: feature buffers only {r:.1}× smaller"
                    );
                    // The whole peak: ViT-L at the binding-capped batch, ViT-S (whose batch
                    // activations are large next to 256 MiB of features) at batch ≤ 4.
                    if (size == "l" && batch == 512) || batch <= 4 {
                        assert!(
                            peak >= 8.0,
                            "ViT-{size} batch {batch}: peak only {peak:.1}× lower"
                        );
                    }
                }
            }
        }
    }
    // The configuration-only entry point gives the same figure.
    let params = FeatureParams::new([128, 128, 128], 512);
    let cfg = VitConfig::preset("s").expect("preset");
    let a = plan_memory(&cfg, &params, [512; 3], Some(32), &backend).expect("plan");
    let b = plan_memory_for(
        &Vit::random(cfg, 0).expect("vit"),
        &params,
        [512; 3],
        Some(32),
        &backend,
    )
    .expect("plan");
    assert_eq!(a, b);
}
