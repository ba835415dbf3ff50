//! Every WGSL file parses and validates with naga (the same front end wgpu uses), with the
//! capabilities volfuse may request. A failure names the shader.

use naga::valid::{Capabilities, ValidationFlags, Validator};

#[test]
fn every_shader_validates_with_naga() {
    let mut failures = Vec::new();
    for shader in volfuse::shaders::ALL {
        let module = match naga::front::wgsl::parse_str(shader.text) {
            Ok(m) => m,
            Err(e) => {
                failures.push(format!(
                    "{}: {}",
                    shader.name,
                    e.emit_to_string(shader.text)
                ));
                continue;
            }
        };
        let caps = Capabilities::SUBGROUP
            | Capabilities::SHADER_FLOAT16
            | Capabilities::SHADER_FLOAT16_IN_FLOAT32;
        if let Err(e) = Validator::new(ValidationFlags::all(), caps).validate(&module) {
            failures.push(format!(
                "{}: {}",
                shader.name,
                e.emit_to_string(shader.text)
            ));
        }
        assert!(
            !module.entry_points.is_empty() || shader.text.trim_start().starts_with("//"),
            "{} has no entry point",
            shader.name
        );
    }
    assert!(
        failures.is_empty(),
        "invalid shaders:\n{}",
        failures.join("\n")
    );
}

#[test]
fn portable_variants_validate_without_subgroups() {
    // What devices without subgroup operations compile (Shader::portable).
    let mut failures = Vec::new();
    for shader in volfuse::shaders::ALL {
        let p = shader.portable();
        assert!(
            !p.text.contains("subgroupBroadcast"),
            "{} keeps subgroup code",
            p.name
        );
        let caps = Capabilities::SHADER_FLOAT16_IN_FLOAT32;
        match naga::front::wgsl::parse_str(p.text) {
            Ok(m) => {
                if let Err(e) = Validator::new(ValidationFlags::all(), caps).validate(&m) {
                    failures.push(format!("{}: {}", p.name, e.emit_to_string(p.text)));
                }
            }
            Err(e) => failures.push(format!("{}: {}", p.name, e.emit_to_string(p.text))),
        }
    }
    assert!(
        failures.is_empty(),
        "invalid portable shaders:\n{}",
        failures.join("\n")
    );
}

#[test]
fn every_shader_file_is_registered() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
    for entry in std::fs::read_dir(dir).expect("shaders/") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            continue; // shaders/lib: helpers appended to families, not families themselves
        }
        let name = path
            .file_stem()
            .expect("stem")
            .to_string_lossy()
            .to_string();
        assert!(
            volfuse::shaders::ALL.iter().any(|s| s.name == name),
            "shaders/{name}.wgsl is not in src/shaders.rs"
        );
    }
}
