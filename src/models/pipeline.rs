//! One tile end to end, as dinov3_playground's `DINOv3UNet3DInference.predict` does it:
//! raw (and context) volume → orthogonal-plane DINOv3 features at `input_size` → UNet →
//! logits → probabilities (softmax or sigmoid) and labels (argmax).

use super::bundle::Bundle;
use super::planes::{extract_features, FeatureParams, Volume};
use super::runner::Runner;
use super::unet3d::Head;
use crate::error::{Error, Result};
use crate::graph::Graph;
use crate::ops::elementwise::Unary;
use crate::ops::softmax::{ChannelArgmax, ChannelSoftmax};

/// What one tile produced. Arrays are C order.
pub struct Segmentation {
    /// (K, d, h, w)
    pub logits: Vec<f32>,
    /// (K, d, h, w): softmax over classes (labels models) or sigmoid (affinities).
    pub probabilities: Vec<f32>,
    /// (d, h, w): argmax over classes (for sigmoid heads: argmax too, for a preview).
    pub labels: Vec<u16>,
    /// (K, d, h, w)
    pub shape: [usize; 4],
    /// Things the user should know (context ignored, degraded mode, …).
    pub notes: Vec<String>,
}

/// Feature extraction parameters of a bundle.
pub fn feature_params(b: &Bundle, batch: usize) -> FeatureParams {
    FeatureParams {
        input_size: b.unet.config.input_size,
        slice_size: b.slice_size,
        mean: b.image_mean,
        std: b.image_std,
        orthogonal_planes: b.orthogonal_planes,
        batch,
    }
}

/// Runs one tile. `context` is the concentric, coarser volume with the same voxel shape
/// (dinov3_playground's training geometry); it is ignored by models without fusion.
pub fn segment(
    b: &Bundle,
    runner: &mut Runner,
    raw: &Volume,
    context: Option<&Volume>,
    batch: usize,
) -> Result<Segmentation> {
    let mut notes = Vec::new();
    let ctx = match (b.unet.fusion, context) {
        (true, Some(c)) => {
            if c.shape() != raw.shape() {
                return Err(Error::Invalid(format!(
                    "the context volume {:?} must have the raw volume's voxel shape {:?} (concentric, larger extent at a coarser resolution)",
                    c.shape(),
                    raw.shape()
                )));
            }
            Some(c)
        }
        (true, None) => {
            notes.push("this model fuses context but no --context was given: running without fusion (degraded; results differ from training)".into());
            None
        }
        (false, Some(_)) => {
            notes.push("this model has no context fusion: --context is ignored".into());
            None
        }
        (false, None) => None,
    };
    let params = feature_params(b, batch);
    let feats = extract_features(&b.vit, runner, raw, &params, None)?;
    let ctx_feats = match ctx {
        Some(c) => Some(extract_features(&b.vit, runner, c, &params, None)?),
        None => None,
    };
    let [d, h, w] = b.unet.config.input_size;
    let cd = b.unet.config.input_channels;
    let k = b.unet.config.num_classes;
    let head = b.unet.config.head()?;
    let key = format!("unet {d}x{h}x{w} ctx={}", ctx_feats.is_some());
    let with_ctx = ctx_feats.is_some();
    let build = || -> Result<Graph> {
        let mut g = Graph::new();
        let f = g.input("features", &[1, cd, d, h, w]);
        let c = with_ctx.then(|| g.input("context", &[1, cd, d, h, w]));
        let logits = b.unet.build(&mut g, f, c)?;
        let probs = match head {
            Head::Labels => g.op(ChannelSoftmax, &[logits])?,
            Head::Sigmoid => g.op(Unary::Sigmoid, &[logits])?,
        };
        let labels = g.op(ChannelArgmax, &[logits])?;
        g.output(logits);
        g.output(probs);
        g.output(labels);
        Ok(g)
    };
    let mut inputs: Vec<&[f32]> = vec![&feats];
    if let Some(c) = &ctx_feats {
        inputs.push(c);
    }
    let mut out = runner.run(&key, build, &inputs)?.into_iter();
    let (logits, probabilities, labels) = match (out.next(), out.next(), out.next()) {
        (Some(l), Some(p), Some(a)) => (l, p, a),
        _ => return Err(Error::Gpu("the UNet graph returned too few outputs".into())),
    };
    Ok(Segmentation {
        logits,
        probabilities,
        labels: labels.iter().map(|v| *v as u16).collect(),
        shape: [k, d, h, w],
        notes,
    })
}
