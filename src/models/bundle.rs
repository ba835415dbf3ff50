//! Model bundles (shared/reference/interfaces.md): a folder with `volfuse.json`,
//! `unet.safetensors` and the DINOv3 backbone in HF layout.

use super::unet3d::{Unet3d, UnetConfig};
use super::vit::Vit;
use crate::error::{Error, Result};
use crate::io::Weights;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// The bundle format this version reads.
pub const FORMAT: &str = "volfuse-model/1";

#[derive(Debug, Deserialize)]
struct Manifest {
    format: String,
    model_config: serde_json::Value,
    #[serde(default)]
    training_config: serde_json::Value,
    #[serde(default = "default_backbone")]
    backbone: String,
    #[serde(default = "imagenet_mean")]
    image_mean: [f32; 3],
    #[serde(default = "imagenet_std")]
    image_std: [f32; 3],
}

fn default_backbone() -> String {
    "backbone".into()
}
fn imagenet_mean() -> [f32; 3] {
    [0.485, 0.456, 0.406]
}
fn imagenet_std() -> [f32; 3] {
    [0.229, 0.224, 0.225]
}

/// A loaded bundle: backbone, UNet and the preprocessing it was trained with.
pub struct Bundle {
    pub dir: PathBuf,
    pub vit: Vit,
    pub unet: Unet3d,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
    /// dinov3_slice_size S (slices are resized to S×S before the ViT).
    pub slice_size: usize,
    /// Features from the three orthogonal planes (training_config.use_orthogonal_planes).
    pub orthogonal_planes: bool,
    pub model_config: serde_json::Value,
    pub training_config: serde_json::Value,
}

impl Bundle {
    /// Loads `dir`. Every problem names the file and what to do about it.
    pub fn load(dir: &Path) -> Result<Bundle> {
        let manifest_path = dir.join("volfuse.json");
        if !manifest_path.is_file() {
            return Err(Error::io(
                dir,
                "is not a volfuse model bundle (no volfuse.json); convert a dinov3_playground export with tools/convert_checkpoint.py",
            ));
        }
        let text =
            std::fs::read_to_string(&manifest_path).map_err(|e| Error::io(&manifest_path, e))?;
        let m: Manifest = serde_json::from_str(&text)
            .map_err(|e| Error::io(&manifest_path, format!("invalid manifest: {e}")))?;
        if m.format != FORMAT {
            return Err(Error::io(
                &manifest_path,
                format!(
                    "format '{}' is not '{FORMAT}'; this volfuse reads {FORMAT}",
                    m.format
                ),
            ));
        }
        let config: UnetConfig = serde_json::from_value(m.model_config.clone())
            .map_err(|e| Error::io(&manifest_path, format!("model_config: {e}")))?;
        let unet_path = dir.join("unet.safetensors");
        if !unet_path.is_file() {
            return Err(Error::io(dir, "no unet.safetensors in the bundle"));
        }
        let unet = Unet3d::from_weights(config, Weights::load(&unet_path)?)?;
        let vit = Vit::load(&dir.join(&m.backbone))?;
        if vit.config.hidden_size != unet.config.input_channels {
            return Err(Error::Weights(format!(
                "  the backbone's hidden_size {} differs from the UNet's input_channels {}",
                vit.config.hidden_size, unet.config.input_channels
            )));
        }
        let slice_size = unet.config.dinov3_slice_size.map(|s| s as usize).unwrap_or(
            m.training_config
                .get("image_size")
                .and_then(|v| v.as_f64())
                .unwrap_or(224.0) as usize,
        );
        let orthogonal_planes = m
            .training_config
            .get("use_orthogonal_planes")
            .and_then(|v| v.as_bool())
            .or_else(|| {
                m.model_config
                    .get("use_orthogonal_planes")
                    .and_then(|v| v.as_bool())
            })
            .unwrap_or(false);
        Ok(Bundle {
            dir: dir.to_path_buf(),
            vit,
            unet,
            image_mean: m.image_mean,
            image_std: m.image_std,
            slice_size,
            orthogonal_planes,
            model_config: m.model_config,
            training_config: m.training_config,
        })
    }

    /// What `volfuse info --model` prints.
    pub fn describe(&self) -> String {
        let v = &self.vit.config;
        let u = &self.unet.config;
        let classes = self
            .training_config
            .get("class_names")
            .and_then(|c| c.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            });
        let mut s = String::new();
        s += &format!("bundle: {}\n", self.dir.display());
        s += &format!(
            "backbone: DINOv3 ViT, hidden {} × {} layers, {} heads, MLP {} ({}), patch {}, {} registers\n",
            v.hidden_size,
            v.num_hidden_layers,
            v.num_attention_heads,
            v.intermediate_size,
            if v.use_gated_mlp { "SwiGLU" } else { "GELU" },
            v.patch_size,
            v.num_register_tokens
        );
        s += &format!(
            "UNet: base channels {}, {} output channels ({}), input {:?}\n",
            u.base_channels, u.num_classes, u.output_type, u.input_size
        );
        if let Some(c) = classes {
            s += &format!("classes: {c}\n");
        }
        s += &format!(
            "context fusion: {}\n",
            if self.unet.fusion {
                "yes (gated at the four skips)"
            } else {
                "no"
            }
        );
        s += &format!(
            "learned upsampling: {}\n",
            if self.unet.upsample_stages > 0 {
                format!("{} stage(s)", self.unet.upsample_stages)
            } else {
                "no".into()
            }
        );
        s += &format!(
            "slice size: {} px; planes: {}\n",
            self.slice_size,
            if self.orthogonal_planes {
                "xy, xz, yz"
            } else {
                "xy only"
            }
        );
        if let (Some(raw), Some(base)) = (
            self.model_config
                .get("min_resolution_for_raw")
                .and_then(|v| v.as_f64()),
            self.model_config
                .get("base_resolution")
                .and_then(|v| v.as_f64()),
        ) {
            let [d, h, w] = u.input_size;
            let f = base / raw;
            s += &format!(
                "expected input: {:.0}×{:.0}×{:.0} voxels at {raw} nm (output at {base} nm)\n",
                d as f64 * f,
                h as f64 * f,
                w as f64 * f
            );
        }
        if let Some(cs) = self
            .model_config
            .get("context_scale")
            .and_then(|v| v.as_f64())
        {
            s += &format!("context scale: {cs} nm\n");
        }
        s += &format!(
            "normalisation: mean {:?}, std {:?}\n",
            self.image_mean, self.image_std
        );
        s
    }
}
