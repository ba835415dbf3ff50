//! volfuse: context-fused 3D segmentation of EM and CT volumes on wgpu.
//!
//! DINOv3 ViT features from orthogonal planes feed a 3D UNet whose skips are fused with a
//! coarser context volume by a sigmoid gate. Every op runs as a hand-written WGSL kernel
//! ([`gpu`]) and as a plain CPU reference ([`ops`]); a small [`graph`] executor plans
//! buffer reuse and runs the same graph on either backend.
//!
//! # Supported API
//!
//! An [`Engine`] is where volfuse runs: headless on the best adapter ([`Engine::new`]), on
//! an application's own `wgpu::Device` and `Queue` ([`Engine::from_device`]), or on the CPU
//! reference ([`Engine::cpu`]). [`Engine::load_model`] loads a model bundle as a [`Model`],
//! which segments one tile from host arrays ([`Model::segment`] → [`Segmentation`]) or
//! from the application's device buffers ([`Model::segment_buffer`] with a
//! [`DeviceVolume`] → [`DeviceSegmentation`], buffers the application can bind). Errors are
//! [`Error`]s. The [`engine`] module documents what is copied where, and thread safety:
//! `Engine` and `Model` are `Send + Sync`.
//!
//! ```
//! # fn main() -> volfuse::Result<()> {
//! use volfuse::{Engine, Volume, VolumeData};
//! let model = Engine::cpu()
//!     .load_model(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/bundle_tiny_ctx"))?;
//! let [d, h, w] = [12, 16, 20];
//! let raw = Volume::new([d, h, w], VolumeData::U8((0..d * h * w).map(|i| (i % 200) as u8).collect()))?;
//! let context = Volume::new([d, h, w], VolumeData::U8(vec![100; d * h * w]))?;
//! let seg = model.segment(&raw, Some(&context))?;
//! let [k, d, h, w] = seg.shape; // (classes, the model's input grid)
//! assert_eq!((k, seg.labels.len()), (model.num_classes(), d * h * w));
//! # Ok(())
//! # }
//! ```
//!
//! # Building blocks
//!
//! The modules below are public for the `volfuse` command, the tests and the benchmarks;
//! they may change between versions: [`models`] (ViT, UNet, bundle, feature extraction,
//! the tile pipeline), [`graph`], [`gpu`], [`ops`], [`io`], [`shaders`], [`mod@bench`].

pub mod autotune;
pub mod bench;
pub mod bench_stages;
pub mod demo;
pub mod engine;
pub mod error;
pub mod eval;
pub mod gpu;
pub mod graph;
pub mod io;
pub mod models;
pub mod ops;
pub mod shaders;
pub mod synth;
pub mod tiling;

pub use engine::{DeviceSegmentation, DeviceVolume, Engine, Model, VoxelType};
pub use error::{Error, Result};
pub use gpu::{Api, GpuContext, GpuOptions, GpuTensor};
pub use models::pipeline::Segmentation;
pub use models::planes::VolumeData;
pub use models::Volume;
