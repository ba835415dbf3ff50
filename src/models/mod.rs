//! Models, written to read like the PyTorch they mirror, built as [`crate::graph::Graph`]s.

pub mod runner;
pub mod vit;

pub use runner::{Backend, Runner};
pub use vit::{Vit, VitConfig};
