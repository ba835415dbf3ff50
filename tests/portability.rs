//! Portability: every shader variant the engine can emit is translated by naga to the
//! languages of wgpu's other backends (MSL for Metal, HLSL for DX12, SPIR-V for Vulkan,
//! GLSL ES 3.10 and GLSL 4.30 for GL), and the engine runs under forced WebGPU-default and downlevel
//! limits, falling back to variants that fit.
//!
//! Where the variants come from: `volfuse::shaders::variants()` lists every source text
//! the kernels may hand to a device (each family with and without its subgroup section);
//! every entry point of each is translated with its default constants. The
//! specialisations (override constants) are the ones a real device compiled:
//! `GpuContext::compiled_kernels()` after building every benchmark case's dispatches and
//! running the bundled tiny model, so a new constant or variant is covered as soon as the
//! engine emits it — and an emitted shader name missing from `variants()` fails the test.

mod common;

use naga::back::{glsl, hlsl, msl, spv, PipelineConstants};
use naga::valid::{Capabilities, ModuleInfo, ValidationFlags, Validator};
use naga::{Module, ShaderStage};
use std::sync::Arc;
use volfuse::gpu::{CompiledKernel, GpuContext, GpuOptions, LimitsChoice};
use volfuse::shaders::{self, Shader};

/// The capabilities a device may offer for `shader`'s text.
fn caps_for(shader: &Shader) -> Capabilities {
    let base = Capabilities::SHADER_FLOAT16_IN_FLOAT32;
    if shader.uses_subgroups() {
        base | Capabilities::SUBGROUP | Capabilities::SHADER_FLOAT16
    } else {
        base
    }
}

fn parse(shader: &Shader) -> Result<(Module, ModuleInfo), String> {
    let module = naga::front::wgsl::parse_str(shader.text)
        .map_err(|e| format!("parse: {}", e.emit_to_string(shader.text)))?;
    let info = Validator::new(ValidationFlags::all(), caps_for(shader))
        .validate(&module)
        .map_err(|e| format!("validate: {}", e.emit_to_string(shader.text)))?;
    Ok((module, info))
}

/// Translates one entry point of `module`, specialised with `constants`, to SPIR-V, MSL,
/// HLSL and GLSL. Returns the failures as "backend: message".
fn translate(
    module: &Module,
    info: &ModuleInfo,
    entry: &str,
    constants: &[(&str, f64)],
    subgroups: bool,
) -> Vec<String> {
    let mut failures = Vec::new();
    let mut pc = PipelineConstants::default();
    for (k, v) in constants {
        pc.insert(k.to_string(), *v);
    }
    let (module, info) = match naga::back::pipeline_constants::process_overrides(
        module,
        info,
        Some((ShaderStage::Compute, entry)),
        &pc,
    ) {
        Ok(r) => r,
        Err(e) => return vec![format!("constants: {e}")],
    };
    // The specialised module must still validate (an override may size an array).
    let mut caps = Capabilities::SHADER_FLOAT16_IN_FLOAT32;
    if subgroups {
        caps |= Capabilities::SUBGROUP | Capabilities::SHADER_FLOAT16;
    }
    if let Err(e) = Validator::new(ValidationFlags::all(), caps).validate(&module) {
        return vec![format!("specialised module invalid: {e}")];
    }

    // SPIR-V (Vulkan): the version wgpu's Vulkan backend targets on Vulkan 1.1+.
    let spv_opts = spv::Options {
        lang_version: (1, 3),
        ..Default::default()
    };
    let spv_pipe = spv::PipelineOptions {
        shader_stage: ShaderStage::Compute,
        entry_point: entry.to_string(),
    };
    match spv::write_vec(&module, &info, &spv_opts, Some(&spv_pipe)) {
        Ok(words) if words.len() > 5 && words[0] == 0x0723_0203 => {
            let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
            if let Some(e) = external("spirv-val", &["--target-env", "vulkan1.1"], &bytes, "spv") {
                failures.push(format!("spir-v (spirv-val): {e}"));
            }
        }
        Ok(_) => failures.push("spir-v: empty or bad magic".into()),
        Err(e) => failures.push(format!("spir-v: {e}")),
    }

    // MSL (Metal): 2.1 is enough for simd-group functions; wgpu needs macOS 10.15 / iOS 13.
    let msl_opts = msl::Options {
        lang_version: (2, 1),
        fake_missing_bindings: true,
        ..Default::default()
    };
    let msl_pipe = msl::PipelineOptions {
        entry_point: Some((ShaderStage::Compute, entry.to_string())),
        ..Default::default()
    };
    match msl::write_string(&module, &info, &msl_opts, &msl_pipe) {
        Ok((text, _)) if text.contains("kernel void") => {}
        Ok(_) => failures.push("msl: no kernel function written".into()),
        Err(e) => failures.push(format!("msl: {e}")),
    }

    // HLSL (DX12): shader model 6.0 for wave intrinsics, 5.1 (FXC) otherwise.
    let hlsl_opts = hlsl::Options {
        shader_model: if subgroups {
            hlsl::ShaderModel::V6_0
        } else {
            hlsl::ShaderModel::V5_1
        },
        fake_missing_bindings: true,
        ..Default::default()
    };
    let hlsl_pipe = hlsl::PipelineOptions {
        entry_point: Some((ShaderStage::Compute, entry.to_string())),
    };
    let mut text = String::new();
    match hlsl::Writer::new(&mut text, &hlsl_opts, &hlsl_pipe).write(&module, &info, None) {
        Ok(_) if text.contains("[numthreads(") => {}
        Ok(_) => failures.push("hlsl: no compute entry written".into()),
        Err(e) => failures.push(format!("hlsl: {e}")),
    }

    // GLSL (GL): compute shaders need GLSL ES 3.10, what wgpu's GL backend emits for an
    // OpenGL ES 3.1 context. Subgroup variants are never chosen there (wgpu's GL backend
    // does not expose SUBGROUP), so only the portable texts must translate.
    if !subgroups {
        // Desktop GLSL 4.30 too: what wgpu emits when EGL gives it a desktop GL context
        // (llvmpipe here reports "4.5 (Core Profile)").
        for version in [
            glsl::Version::Embedded {
                version: 310,
                is_webgl: false,
            },
            glsl::Version::Desktop(430),
        ] {
            let glsl_opts = glsl::Options {
                version,
                ..Default::default()
            };
            let glsl_pipe = glsl::PipelineOptions {
                shader_stage: ShaderStage::Compute,
                entry_point: entry.to_string(),
                multiview: None,
            };
            let mut text = String::new();
            match glsl::Writer::new(
                &mut text,
                &module,
                &info,
                &glsl_opts,
                &glsl_pipe,
                naga::proc::BoundsCheckPolicies::default(),
            )
            .and_then(|mut w| w.write())
            {
                Ok(_) if text.contains("layout(local_size_x") => {
                    if let Some(e) = external("glslangValidator", &[], text.as_bytes(), "comp") {
                        failures.push(format!("glsl {version} (glslang): {e}"));
                    }
                }
                Ok(_) => failures.push(format!("glsl {version}: no compute layout written")),
                Err(e) => failures.push(format!("glsl {version}: {e}")),
            }
        }
    }
    failures
}

/// Runs an external validator (`spirv-val`, `glslangValidator`) on `data` when it is on
/// PATH: the translated code is then checked by the consumer's own front end, not only
/// produced. Returns its complaint, or None (valid, or the tool is not installed).
fn external(tool: &str, args: &[&str], data: &[u8], suffix: &str) -> Option<String> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let path = std::env::temp_dir().join(format!(
        "volfuse-portability-{}-{}.{suffix}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&path, data).ok()?;
    let out = std::process::Command::new(tool)
        .args(args)
        .arg(&path)
        .output();
    let _ = std::fs::remove_file(&path);
    let out = out.ok()?; // not installed
    EXTERNAL_RUNS.fetch_add(1, Ordering::Relaxed);
    if out.status.success() {
        None
    } else {
        Some(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

static EXTERNAL_RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn entry_points(module: &Module) -> Vec<String> {
    module
        .entry_points
        .iter()
        .filter(|e| e.stage == ShaderStage::Compute)
        .map(|e| e.name.clone())
        .collect()
}

#[test]
fn variants_list_every_family_with_and_without_subgroups() {
    let v = shaders::variants();
    // … and the storage-texture forms of matmul, conv3d and attention (texture kernels on
    // CPU adapters): every streamed operand declared and loaded as a storage texture.
    assert_eq!(v.len(), 2 * shaders::ALL.len() + 3);
    for (st, names) in [
        (
            shaders::MATMUL.storage_x(),
            &["xt", "cos_t", "sin_t", "res_t"][..],
        ),
        (shaders::CONV3D.storage_x(), &["xt"][..]),
        (shaders::ATTENTION.storage_x(), &["qt", "kt", "vt"][..]),
    ] {
        assert!(shaders::variant(st.name).is_some(), "{} missing", st.name);
        for n in names {
            let storage = format!("var {n}: texture_storage_2d<rgba32float, read>;");
            assert!(st.text.contains(&storage), "{}: {storage}", st.name);
            assert!(!st.text.contains(&format!("var {n}: texture_2d<f32>;")));
            // (no load of it keeps a mip level: the sampled loads all end in `, 0)`)
            let call = format!("textureLoad({n},");
            let loads: Vec<&str> = st.text.lines().filter(|l| l.contains(&call)).collect();
            assert!(!loads.is_empty(), "{}: no load of {n}", st.name);
            for l in loads {
                assert!(!l.contains(", 0)"), "{}: sampled load left: {l}", st.name);
            }
        }
    }
    for s in shaders::ALL {
        assert!(shaders::variant(s.name).is_some(), "{} missing", s.name);
        let p = s.portable();
        assert!(shaders::variant(p.name).is_some(), "{} missing", p.name);
        assert!(!p.uses_subgroups(), "{} keeps subgroup code", p.name);
    }
    // The detector is not vacuous: at least one family does use subgroups.
    assert!(shaders::ALL.iter().any(|s| s.uses_subgroups()));
}

#[test]
fn every_variant_and_entry_point_translates_to_msl_hlsl_spirv_glsl() {
    let mut failures = Vec::new();
    let mut translated = 0;
    for shader in shaders::variants() {
        let (module, info) = match parse(shader) {
            Ok(m) => m,
            Err(e) => {
                failures.push(format!("{}: {e}", shader.name));
                continue;
            }
        };
        for entry in entry_points(&module) {
            for f in translate(&module, &info, &entry, &[], shader.uses_subgroups()) {
                failures.push(format!("{}::{entry}: {f}", shader.name));
            }
            translated += 1;
        }
    }
    eprintln!(
        "translated {translated} (variant, entry point) pairs; {} external validator runs",
        EXTERNAL_RUNS.load(std::sync::atomic::Ordering::Relaxed)
    );
    assert!(translated > 2 * shaders::ALL.len());
    assert!(
        failures.is_empty(),
        "{} translation failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn translation_failures_name_the_shader_and_backend() {
    // A kernel that naga accepts but whose specialisation is missing a constant without
    // default must fail with a message, not pass silently.
    let text = "override N: u32;\n@group(0) @binding(0) var<storage, read_write> o: array<u32>;\n\
                @compute @workgroup_size(1) fn k() { o[0] = N; }\n";
    let module = naga::front::wgsl::parse_str(text).expect("parse");
    let info = Validator::new(ValidationFlags::all(), Capabilities::empty())
        .validate(&module)
        .expect("validate");
    assert!(!translate(&module, &info, "k", &[], false).is_empty());
    assert!(translate(&module, &info, "k", &[("N", 3.0)], false).is_empty());
}

/// Builds (without running) every benchmark case's dispatches, then runs the tiny model
/// end to end: the kernels the engine chooses on `ctx`, with their real constants.
fn exercise(ctx: &Arc<GpuContext>) {
    for case in volfuse::bench::all_cases() {
        let shapes: Vec<&[usize]> = case.shapes.iter().map(|s| s.as_slice()).collect();
        let Ok(out_shape) = case.op.output_shape(&shapes) else {
            continue;
        };
        // Cases too large for forced limits are refused with TooLarge: skip those.
        let Ok(bufs) = case
            .shapes
            .iter()
            .map(|s| ctx.empty(s))
            .collect::<Result<Vec<_>, _>>()
        else {
            continue;
        };
        let Ok(out) = ctx.empty(&out_shape) else {
            continue;
        };
        let refs: Vec<&wgpu::Buffer> = bufs.iter().map(|t| t.buffer.as_ref()).collect();
        match case.op.gpu(ctx, &refs, &shapes, &out.buffer) {
            Ok(_) | Err(volfuse::Error::TooLarge { .. }) => {}
            Err(e) => panic!("{}: {e}", case.label),
        }
    }
    let bundle = volfuse::models::Bundle::load(&common::fixture("bundle_tiny_ctx")).unwrap();
    let raw = volfuse::models::Volume::read(&common::fixture("e2e_tiny_ctx/raw.npy")).unwrap();
    let cv = volfuse::models::Volume::read(&common::fixture("e2e_tiny_ctx/context.npy")).unwrap();
    let mut runner = volfuse::models::Runner::new(volfuse::models::Backend::Gpu(ctx.clone()));
    volfuse::models::pipeline::segment(&bundle, &mut runner, &raw, Some(&cv), 64)
        .expect("tiny model runs");
}

fn check_compiled(kernels: &[CompiledKernel]) {
    let mut failures = Vec::new();
    let mut seen = std::collections::HashSet::new();
    // Each variant parsed and validated once, not once per specialisation (naga's WGSL
    // parse was a quarter of this test binary's time).
    let mut parsed: std::collections::HashMap<&str, Result<(Module, ModuleInfo), String>> =
        Default::default();
    for k in kernels {
        let key = format!("{}::{}{:?}", k.shader, k.entry, k.constants);
        if !seen.insert(key.clone()) {
            continue;
        }
        let Some(shader) = shaders::variant(k.shader) else {
            failures.push(format!(
                "{key}: the engine compiled a shader that shaders::variants() does not list"
            ));
            continue;
        };
        let (module, info) = match parsed.entry(shader.name).or_insert_with(|| parse(shader)) {
            Ok(m) => m,
            Err(e) => {
                failures.push(format!("{key}: {e}"));
                continue;
            }
        };
        for f in translate(module, info, k.entry, &k.constants, shader.uses_subgroups()) {
            failures.push(format!("{key}: {f}"));
        }
    }
    eprintln!("{} distinct specialisations translated", seen.len());
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

fn context(limits: LimitsChoice) -> Arc<GpuContext> {
    let mut opts = GpuOptions::from_env().expect("VOLFUSE_* variables");
    opts.limits = limits;
    common::gpu(); // sets XDG_RUNTIME_DIR when unset
    Arc::new(GpuContext::new(&opts).expect("a GPU adapter"))
}

#[test]
fn emitted_specialisations_translate_under_every_limits_choice() {
    for limits in [
        LimitsChoice::Adapter,
        LimitsChoice::WebGpuDefault,
        LimitsChoice::Downlevel,
    ] {
        let ctx = context(limits);
        eprintln!("{limits:?}: {}", ctx.describe());
        exercise(&ctx);
        let all = ctx.compiled_kernels();
        assert!(!all.is_empty(), "nothing was compiled");
        check_compiled(&all);
    }
}

#[test]
fn forced_limits_are_applied_and_no_better_than_the_adapter() {
    let adapter = context(LimitsChoice::Adapter);
    let a = adapter.device.limits();
    for (choice, preset) in [
        (LimitsChoice::WebGpuDefault, wgpu::Limits::default()),
        (LimitsChoice::Downlevel, wgpu::Limits::downlevel_defaults()),
    ] {
        let ctx = context(choice);
        let l = ctx.device.limits();
        assert_eq!(
            l.max_storage_buffers_per_shader_stage,
            preset
                .max_storage_buffers_per_shader_stage
                .min(a.max_storage_buffers_per_shader_stage),
            "{choice:?}"
        );
        assert_eq!(
            l.max_storage_buffer_binding_size,
            preset
                .max_storage_buffer_binding_size
                .min(a.max_storage_buffer_binding_size)
        );
        assert_eq!(
            l.max_compute_workgroup_storage_size,
            preset
                .max_compute_workgroup_storage_size
                .min(a.max_compute_workgroup_storage_size)
        );
        assert_eq!(ctx.caps.max_binding, l.max_storage_buffer_binding_size);
        assert_eq!(
            ctx.caps.max_uniform_binding,
            l.max_uniform_buffer_binding_size
        );
    }
    assert!(LimitsChoice::parse("downlevel").is_ok());
    assert!(LimitsChoice::parse("tiny").is_err());
}

fn budget_context(budget: u64) -> Arc<GpuContext> {
    let mut opts = GpuOptions::from_env().expect("VOLFUSE_* variables");
    opts.memory_budget = Some(budget);
    common::gpu(); // sets XDG_RUNTIME_DIR when unset
    Arc::new(GpuContext::new(&opts).expect("a GPU adapter"))
}

#[test]
fn a_tiny_memory_budget_is_a_typed_out_of_memory_error_with_a_hint() {
    use volfuse::ops::{elementwise, run_gpu};
    let ctx = budget_context(4 << 20);
    let relu = elementwise::Unary::Relu;
    // Small work fits the budget and still runs.
    let x: Vec<f32> = (0..1000).map(|i| i as f32 - 500.0).collect();
    let (y, _) = run_gpu(&ctx, &relu, &[(&x, &[1000])], None).expect("fits the budget");
    assert_eq!(y[0], 0.0);
    assert_eq!(y[999], 499.0);
    // 2 MiB in + 2 MiB out exceed 4 MiB together with what is already held.
    let big = vec![1.0f32; 1 << 19];
    let err = run_gpu(&ctx, &relu, &[(&big, &[1 << 19])], None).unwrap_err();
    assert!(
        matches!(err, volfuse::Error::OutOfMemory { .. }),
        "got {err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("smaller tile") && msg.contains("--backend cpu"),
        "{msg}"
    );

    // A whole model under a budget too small for it fails the same way, without a panic.
    let ctx = budget_context(1 << 20);
    let bundle = volfuse::models::Bundle::load(&common::fixture("bundle_tiny_ctx")).unwrap();
    let raw = volfuse::models::Volume::read(&common::fixture("e2e_tiny_ctx/raw.npy")).unwrap();
    let mut runner = volfuse::models::Runner::new(volfuse::models::Backend::Gpu(ctx));
    let err = volfuse::models::pipeline::segment(&bundle, &mut runner, &raw, None, 64)
        .err()
        .expect("1 MiB is too small for the tiny model");
    assert!(
        matches!(err, volfuse::Error::OutOfMemory { .. }),
        "got {err:?}"
    );
    assert!(volfuse::gpu::parse_bytes("64M").unwrap() == 64 << 20);
    assert!(volfuse::gpu::parse_bytes("lots").is_err());
}

#[test]
fn device_loss_is_a_typed_error_with_a_hint() {
    use volfuse::ops::{elementwise, run_gpu};
    let ctx = budget_context(u64::MAX);
    let x = vec![1.0f32; 256];
    run_gpu(&ctx, &elementwise::Unary::Relu, &[(&x, &[256])], None).expect("runs");
    ctx.device.destroy();
    let err = run_gpu(&ctx, &elementwise::Unary::Relu, &[(&x, &[256])], None).unwrap_err();
    assert!(matches!(err, volfuse::Error::DeviceLost(_)), "got {err:?}");
    assert!(err.to_string().contains("--backend cpu"), "{err}");
}

#[test]
fn every_entry_point_fits_webgpu_default_limits() {
    // WebGPU's defaults bound every device volfuse targets; entry points that need more
    // than the downlevel 4 storage buffers must have a fallback the engine picks instead
    // (proven by the downlevel run in emitted_specialisations_translate_...).
    let d = wgpu::Limits::default();
    let mut failures = Vec::new();
    let mut over_downlevel = Vec::new();
    for shader in shaders::variants() {
        let (module, info) = parse(shader).expect("validated above");
        for (i, ep) in module.entry_points.iter().enumerate() {
            let fi = info.get_entry_point(i);
            let mut storage = 0;
            let mut workgroup_bytes = 0u32;
            for (h, g) in module.global_variables.iter() {
                if fi[h].is_empty() {
                    continue;
                }
                match g.space {
                    naga::AddressSpace::Storage { .. } => storage += 1,
                    naga::AddressSpace::WorkGroup => {
                        workgroup_bytes += module.types[g.ty].inner.size(module.to_ctx())
                    }
                    _ => {}
                }
            }
            let [x, y, z] = ep.workgroup_size;
            let name = format!("{}::{}", shader.name, ep.name);
            if storage > d.max_storage_buffers_per_shader_stage {
                failures.push(format!("{name}: {storage} storage buffers"));
            }
            if x * y * z > d.max_compute_invocations_per_workgroup {
                failures.push(format!("{name}: workgroup {x}×{y}×{z}"));
            }
            if workgroup_bytes > d.max_compute_workgroup_storage_size {
                failures.push(format!("{name}: {workgroup_bytes} B workgroup storage"));
            }
            if storage > 4 {
                over_downlevel.push(format!("{name} ({storage})"));
            }
        }
    }
    eprintln!(
        "entry points needing more than 4 storage buffers: {}",
        over_downlevel.join(", ")
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
