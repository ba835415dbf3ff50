//! The WGSL kernel families in `shaders/`, embedded at build time.

use crate::gpu::Caps;

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
}

macro_rules! shaders {
    ($($id:ident => $file:literal),* $(,)?) => {
        $(pub static $id: Shader = Shader { name: $file, text: include_str!(concat!("../shaders/", $file, ".wgsl")) };)*
        /// Every shader, for validation and cross-compilation tests.
        pub static ALL: &[&Shader] = &[$(&$id),*];
    };
}

shaders! {
    ELEMENTWISE => "elementwise",
    MATMUL => "matmul",
    NORM => "norm",
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
}
