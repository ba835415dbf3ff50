//! The four context-fusion gate maps of one tile, σ(ctx_proj(ctx_k)) at the skips k = 1..4,
//! for inspection (`volfuse run --dump-gates DIR`).

use super::bundle::Bundle;
use super::pipeline::feature_params;
use super::planes::{extract_features, Volume};
use super::runner::Runner;
use crate::error::{Error, Result};
use crate::graph::Graph;

/// One gate map: values in (0, 1), shape (Ck, d_k, h_k, w_k).
pub struct Gate {
    pub data: Vec<f32>,
    pub shape: [usize; 4],
}

/// Runs one tile (raw + context, as [`super::pipeline::segment`]) and returns the four gate
/// maps. Errors if the model has no context fusion.
pub fn gate_maps(
    b: &Bundle,
    runner: &mut Runner,
    raw: &Volume,
    context: &Volume,
    batch: usize,
) -> Result<Vec<Gate>> {
    if !b.unet.fusion {
        return Err(Error::Invalid(format!(
            "the model {} has no context fusion, so it has no gate maps; --dump-gates needs a context-fused model",
            b.dir.display()
        )));
    }
    if context.shape() != raw.shape() {
        return Err(Error::Invalid(format!(
            "the context volume {:?} must have the raw volume's voxel shape {:?}",
            context.shape(),
            raw.shape()
        )));
    }
    let params = feature_params(b, batch);
    let feats = extract_features(&b.vit, runner, raw, &params, None)?;
    let ctx = extract_features(&b.vit, runner, context, &params, None)?;
    let [d, h, w] = b.unet.config.input_size;
    let cd = b.unet.config.input_channels;
    let mut shapes = Vec::new();
    let build = || -> Result<Graph> {
        let mut g = Graph::new();
        let f = g.input("features", &[1, cd, d, h, w]);
        let c = g.input("context", &[1, cd, d, h, w]);
        let (_, gates) = b.unet.build_with_gates(&mut g, f, c)?;
        for v in gates {
            g.output(v);
        }
        Ok(g)
    };
    let key = format!("unet gates {d}x{h}x{w}");
    let out = runner.run(&key, build, &[&feats, &ctx])?;
    for k in 0..out.len() {
        let s = 1usize << k;
        shapes.push([b.unet.config.base_channels << k, d / s, h / s, w / s]);
    }
    if out.len() != 4 {
        return Err(Error::Gpu(format!(
            "the gate graph returned {} outputs instead of 4",
            out.len()
        )));
    }
    out.into_iter()
        .zip(shapes)
        .map(|(data, shape)| {
            if data.len() != shape.iter().product::<usize>() {
                return Err(Error::Gpu(format!(
                    "gate map of {} values does not fit the expected shape {shape:?}",
                    data.len()
                )));
            }
            Ok(Gate { data, shape })
        })
        .collect()
}
