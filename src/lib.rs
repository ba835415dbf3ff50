//! volfuse: context-fused 3D segmentation of EM and CT volumes on wgpu.
//!
//! DINOv3 ViT features from orthogonal planes feed a 3D UNet whose skips are fused with a
//! coarser context volume by a sigmoid gate. Every op runs as a hand-written WGSL kernel
//! ([`gpu`]) and as a plain CPU reference ([`ops`]); a small [`graph`] executor plans
//! buffer reuse and runs the same graph on either backend.

pub mod bench;
pub mod error;
pub mod gpu;
pub mod graph;
pub mod io;
pub mod models;
pub mod ops;
pub mod shaders;
pub mod synth;
pub mod eval;
pub mod demo;

pub use error::{Error, Result};
pub use gpu::{GpuContext, GpuOptions, GpuTensor};
