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
    let f = unet_features(b, runner, raw, context, batch)?;
    let (key, build) = unet_graph(b, f.context.is_some());
    // Handed over: on the CPU each feature volume is freed after its last reader.
    let inputs: Vec<Vec<f32>> = std::iter::once(f.features).chain(f.context).collect();
    let mut out = runner.run_owned(&key, build, inputs)?.into_iter();
    let (logits, probabilities, labels) = match (out.next(), out.next(), out.next()) {
        (Some(l), Some(p), Some(a)) => (l, p, a),
        _ => return Err(Error::Gpu("the UNet graph returned too few outputs".into())),
    };
    Ok(Segmentation {
        logits,
        probabilities,
        labels: labels.iter().map(|v| *v as u16).collect(),
        shape: f.shape,
        notes: f.notes,
    })
}

/// The UNet's inputs for one tile: features of the raw volume (and of the context when the
/// model fuses it) already through the UNet's input convs, (C, d, h, w) f32 on the host
/// with C = base channels (the input of [`unet_graph`]).
pub(crate) struct UnetFeatures {
    pub features: Vec<f32>,
    pub context: Option<Vec<f32>>,
    /// (K, d, h, w) of the outputs.
    pub shape: [usize; 4],
    pub notes: Vec<String>,
}

/// Checks the context against the model and extracts the features of one tile.
pub(crate) fn unet_features(
    b: &Bundle,
    runner: &mut Runner,
    raw: &Volume,
    context: Option<&Volume>,
    batch: usize,
) -> Result<UnetFeatures> {
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
    // Projection-first: the UNet's input convs are applied to the ViT tokens, so the
    // features are C (base channels) wide, not Cd (see planes.rs, "Projection-first").
    let (proj, ctx_proj) = b.unet.input_projections()?;
    let mut features = extract_features(&b.vit, runner, raw, &params, Some(&proj))?;
    let context = match (ctx, &ctx_proj) {
        // The raw features wait outside the process's memory while the context's are
        // computed (graph::Parked).
        (Some(c), Some(p)) => Some(crate::graph::Parked::aside(&mut features, || {
            extract_features(&b.vit, runner, c, &params, Some(p))
        })?),
        _ => None,
    };
    let [d, h, w] = b.unet.config.input_size;
    Ok(UnetFeatures {
        features,
        context,
        shape: [b.unet.config.num_classes, d, h, w],
        notes,
    })
}

/// The runner key and builder of the UNet graph: inputs projected features (and context)
/// as [`unet_features`] gives them, (1, C, d, h, w) with C = base channels; outputs logits,
/// probabilities and labels (argmax, as f32), in that order.
pub(crate) fn unet_graph(
    b: &Bundle,
    with_ctx: bool,
) -> (String, impl FnOnce() -> Result<Graph> + '_) {
    let [d, h, w] = b.unet.config.input_size;
    let c = b.unet.config.base_channels;
    let key = format!("unet {d}x{h}x{w} ctx={with_ctx} projected");
    let build = move || -> Result<Graph> {
        let head = b.unet.config.head()?;
        let mut g = Graph::new();
        let f = g.input("features", &[1, c, d, h, w]);
        let cv = with_ctx.then(|| g.input("context", &[1, c, d, h, w]));
        let logits = b.unet.build_projected(&mut g, f, cv)?;
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
    (key, build)
}
