//! The WGSL kernel families in `shaders/`, embedded at build time.

use crate::gpu::Caps;
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

/// One `.wgsl` file: a kernel family.
#[derive(Debug)]
pub struct Shader {
    pub name: &'static str,
    pub text: &'static str,
}

impl Shader {
    /// The source to compile on a device with `caps`.
    pub fn source(&self, _caps: &Caps) -> String {
        self.text.to_string()
    }

    /// This family without its `// BEGIN subgroups` … `// END subgroups` section (to the
    /// end of the file when there is no END): the portable kernels alone, which compile on
    /// devices without subgroup operations. Built once per shader.
    pub fn portable(&'static self) -> &'static Shader {
        self.derived("no subgroups", without_subgroups)
    }

    /// This family with its streamed operands (`xt`; attention's `qt`, `kt`, `vt`)
    /// declared as read-only rgba32float storage textures instead of sampled ones
    /// ([`with_storage_x`]): the form of the texture kernels of `matmul`, `conv3d` and
    /// `attention` on CPU adapters. Built once per shader.
    pub fn storage_x(&'static self) -> &'static Shader {
        self.derived("storage X", with_storage_x)
    }

    /// The variant `what` of this family, made from its text by `make` once.
    fn derived(&'static self, what: &'static str, make: fn(&str) -> String) -> &'static Shader {
        type Cache = Mutex<HashMap<(&'static str, &'static str), &'static Shader>>;
        static CACHE: OnceLock<Cache> = OnceLock::new();
        let mut map = match CACHE.get_or_init(Default::default).lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.entry((self.name, what)).or_insert_with(|| {
            let text = make(self.text);
            let name = format!("{} ({what})", self.name);
            Box::leak(Box::new(Shader {
                name: Box::leak(name.into_boxed_str()),
                text: Box::leak(text.into_boxed_str()),
            }))
        })
    }
}

/// `text` with its streamed operands — `xt` (matmul, conv3d), matmul's epilogue tables
/// `cos_t`, `sin_t`, `res_t`, and `qt`, `kt`, `vt` (attention) — declared as read-only
/// rgba32float storage textures instead of sampled
/// ones: each `var NAME: texture_2d<f32>;` becomes `texture_storage_2d<rgba32float, read>`
/// and its `textureLoad(NAME, coords, 0)` calls lose the mip level. On lavapipe a sampled
/// `textureLoad` is an out-of-line function call that clobbers every vector register,
/// while a storage-image load is inlined (docs/lavapipe.md).
pub fn with_storage_x(text: &str) -> String {
    let mut out = text.to_string();
    for name in ["xt", "qt", "kt", "vt", "cos_t", "sin_t", "res_t"] {
        out = out.replace(
            &format!("var {name}: texture_2d<f32>;"),
            &format!("var {name}: texture_storage_2d<rgba32float, read>;"),
        );
        // Every `textureLoad(name, …, 0)`: drop the `, 0` before its closing parenthesis.
        let open = format!("textureLoad({name},");
        let mut done = String::with_capacity(out.len());
        let mut rest = out.as_str();
        while let Some(at) = rest.find(&open) {
            let start = at + open.len();
            let mut depth = 1usize;
            let mut close = None;
            for (i, ch) in rest[start..].char_indices() {
                match ch {
                    '(' => depth += 1,
                    ')' => {
                        depth -= 1;
                        if depth == 0 {
                            close = Some(start + i);
                            break;
                        }
                    }
                    _ => {}
                }
            }
            let Some(close) = close else { break };
            let args = &rest[start..close];
            done.push_str(&rest[..start]);
            done.push_str(args.strip_suffix(", 0").unwrap_or(args));
            rest = &rest[close..];
        }
        done.push_str(rest);
        out = done;
    }
    out
}

/// `text` without its subgroup section (see [`Shader::portable`]).
pub fn without_subgroups(text: &str) -> String {
    match text.find("// BEGIN subgroups") {
        None => text.to_string(),
        Some(a) => match text[a..].find("// END subgroups") {
            Some(len) => {
                let b = a + len;
                let rest = text[b..]
                    .find('\n')
                    .map(|n| b + n + 1)
                    .unwrap_or(text.len());
                format!("{}{}", &text[..a], &text[rest..])
            }
            None => text[..a].to_string(),
        },
    }
}

/// `NAME => "file"` embeds `shaders/file.wgsl`; `+ "lib"` appends `shaders/lib/lib.wgsl`
/// (helper functions shared by several families, e.g. the activations).
macro_rules! shaders {
    ($($id:ident => $file:literal $(+ $lib:literal)*),* $(,)?) => {
        $(pub static $id: Shader = Shader {
            name: $file,
            text: concat!(
                include_str!(concat!("../shaders/", $file, ".wgsl")),
                $("\n", include_str!(concat!("../shaders/lib/", $lib, ".wgsl")),)*
            ),
        };)*
        /// Every shader, for validation and cross-compilation tests.
        pub static ALL: &[&Shader] = &[$(&$id),*];
    };
}

shaders! {
    ELEMENTWISE => "elementwise" + "activation",
    MATMUL => "matmul" + "activation",
    MATMUL_F16 => "matmul_f16" + "activation",
    NORM => "norm",
    NORM_F16 => "norm_f16",
    SOFTMAX => "softmax",
    ATTENTION => "attention",
    CONV3D => "conv3d",
    CONV_TRANSPOSE3D => "conv_transpose3d",
    POOL3D => "pool3d",
    RESIZE => "resize",
    CONCAT => "concat",
    ROPE => "rope",
    TOKENS => "tokens",
    FUSION => "fusion",
    LABELS => "labels",
    PEAK => "peak",
}

/// Every source text the engine may hand to a device: each family as written (chosen on
/// devices with subgroup operations), its [`Shader::portable`] form (chosen without), and
/// the [`Shader::storage_x`] forms of `matmul` and `conv3d` (their texture kernels on CPU
/// adapters).
/// Kernel code asks for shaders only through these, so this list is what the
/// cross-compilation tests translate; `GpuContext::compiled_kernels` reports which of them
/// (by name) a device actually compiled, with which entry points and constants.
pub fn variants() -> Vec<&'static Shader> {
    let mut v: Vec<&'static Shader> = ALL.iter().flat_map(|s| [*s, s.portable()]).collect();
    v.extend([
        MATMUL.storage_x(),
        CONV3D.storage_x(),
        ATTENTION.storage_x(),
    ]);
    v
}

/// The variant named `name` (a family's name, or its portable name).
pub fn variant(name: &str) -> Option<&'static Shader> {
    variants().into_iter().find(|s| s.name == name)
}

impl Shader {
    /// True when this text uses subgroup operations (its device needs `SUBGROUP`).
    pub fn uses_subgroups(&self) -> bool {
        self.text.contains("subgroup")
            && self
                .text
                .lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .any(|l| l.contains("subgroup"))
    }
}
