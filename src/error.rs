//! Typed errors of the library. The binary wraps them with `anyhow`.

use std::path::PathBuf;

/// Everything that can go wrong inside volfuse.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No usable GPU adapter was found.
    #[error("no GPU adapter found{detail}.\n  fix: install a Vulkan driver (Debian/Ubuntu: `apt-get install mesa-vulkan-drivers libvulkan1`), choose another with --adapter / VOLFUSE_ADAPTER, or run on the CPU with --backend cpu")]
    NoAdapter { detail: String },

    /// The adapter refused to create a device.
    #[error("could not create a device on adapter '{adapter}': {source}")]
    Device {
        adapter: String,
        #[source]
        source: wgpu::RequestDeviceError,
    },

    /// A tensor or binding exceeds what the device allows.
    #[error("{what} needs {bytes} bytes but the adapter '{adapter}' allows at most {limit} bytes per storage binding.\n  fix: use a smaller tile or batch, or --backend cpu")]
    TooLarge {
        what: String,
        bytes: u64,
        limit: u64,
        adapter: String,
    },

    /// Shapes do not fit an operation.
    #[error("shape error in {op}: {msg}")]
    Shape { op: String, msg: String },

    /// A WGSL shader failed validation or pipeline creation.
    #[error("shader '{name}' failed: {msg}")]
    Shader { name: String, msg: String },

    /// The device ran out of memory, or an allocation would exceed the memory budget
    /// given in `GpuOptions::memory_budget` / `VOLFUSE_MEMORY_BUDGET`.
    #[error("out of GPU memory: {what} needs {bytes} bytes{detail}.\n  fix: use a smaller tile or batch, or --backend cpu")]
    OutOfMemory {
        what: String,
        bytes: u64,
        detail: String,
    },

    /// The device was lost (driver reset, GPU removed or hung, or the device destroyed).
    #[error("the GPU device was lost: {0}\n  fix: run again; if it recurs use a smaller tile, or --backend cpu")]
    DeviceLost(String),

    /// GPU execution failed (validation or an internal error).
    #[error("GPU execution failed: {0}\n  hint: try a smaller tile, or --backend cpu")]
    Gpu(String),

    /// Reading or writing a file failed.
    #[error("{path}: {msg}")]
    Io { path: PathBuf, msg: String },

    /// Invalid user input (arguments, data values).
    #[error("{0}")]
    Invalid(String),

    /// A model's weights are missing or have the wrong shape.
    #[error("model weights do not match the configuration:\n{0}")]
    Weights(String),
}

/// Result alias used throughout the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn shape(op: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Shape {
            op: op.into(),
            msg: msg.into(),
        }
    }
    pub(crate) fn io(path: impl Into<PathBuf>, msg: impl std::fmt::Display) -> Self {
        Error::Io {
            path: path.into(),
            msg: msg.to_string(),
        }
    }
}
