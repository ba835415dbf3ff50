//! Models, written to read like the PyTorch they mirror, built as [`crate::graph::Graph`]s.

pub mod bundle;
pub mod gates;
pub mod pipeline;
pub mod planes;
pub mod preprocess;
pub mod runner;
pub mod unet3d;
pub mod vit;

pub use bundle::Bundle;
pub use planes::{extract_features, plan_memory, FeatureParams, Projection, Volume};
pub use runner::{Backend, Runner};
pub use unet3d::{Head, Unet3d, UnetConfig};
pub use vit::{Vit, VitConfig};
