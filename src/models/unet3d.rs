//! DINOv3UNet3D (dinov3_playground) with sigmoid-gated context fusion at the four skips.
//! Facts: shared/reference/dinov3_playground.md §(a)–(c). BatchNorm (eval) is folded into
//! the conv before it, which is exact up to rounding.

use super::planes::Projection;
use crate::error::{Error, Result};
use crate::graph::{Constant, Graph, Value};
use crate::io::Weights;
use crate::ops::conv3d::{fold_batchnorm, Conv3d, Conv3dCat};
use crate::ops::conv_transpose3d::{fold_batchnorm_transposed, ConvTranspose3d};
use crate::ops::elementwise::Unary;
use crate::ops::fusion::ContextGate;
use crate::ops::pool3d::Pool3d;
use crate::ops::resize::Trilinear;
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::Arc;

const BN_EPS: f32 = 1e-5;

/// The dinov3_playground `model_config` keys the network needs (others are ignored).
#[derive(Clone, Debug, Deserialize)]
pub struct UnetConfig {
    pub num_classes: usize,
    pub base_channels: usize,
    pub input_size: [usize; 3],
    pub input_channels: usize,
    #[serde(default)]
    pub use_context_fusion: bool,
    #[serde(default)]
    pub learn_upsampling: bool,
    #[serde(default)]
    pub dinov3_slice_size: Option<f64>,
    #[serde(default = "default_output_type")]
    pub output_type: String,
}

fn default_output_type() -> String {
    "labels".into()
}

/// How logits become probabilities.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Head {
    /// softmax over classes, argmax labels.
    Labels,
    /// sigmoid of every channel (affinities, LSDs).
    Sigmoid,
}

impl UnetConfig {
    pub fn head(&self) -> Result<Head> {
        match self.output_type.as_str() {
            "labels" | "" => Ok(Head::Labels),
            "affinities" | "affinities_lsds" => Ok(Head::Sigmoid),
            other => Err(Error::Invalid(format!(
                "output_type '{other}' is not supported (labels, affinities, affinities_lsds)"
            ))),
        }
    }
}

const BLOCKS: [&str; 9] = [
    "enc1",
    "enc2",
    "enc3",
    "enc4",
    "bottleneck",
    "dec4",
    "dec3",
    "dec2",
    "dec1",
];

/// A loaded DINOv3UNet3D with BatchNorms folded.
pub struct Unet3d {
    pub config: UnetConfig,
    /// Whether the checkpoint has the context branch (fusion at the skips).
    pub fusion: bool,
    /// Learned upsampling stages (0 when absent).
    pub upsample_stages: usize,
    w: HashMap<String, (Arc<Constant>, Vec<usize>)>,
}

/// Input/output channels of each 3×3×3 block, from the base width C.
fn block_channels(c: usize) -> [(usize, usize); 9] {
    [
        (c, c),
        (c, 2 * c),
        (2 * c, 4 * c),
        (4 * c, 8 * c),
        (8 * c, 16 * c),
        (24 * c, 8 * c),
        (12 * c, 4 * c),
        (6 * c, 2 * c),
        (3 * c, c),
    ]
}

struct Loader<'a> {
    w: &'a mut Weights,
    problems: Vec<String>,
    /// Every missing (name, shape), so a caller can make a model from scratch.
    missing: Vec<(String, Vec<usize>)>,
}

impl Loader<'_> {
    fn take(&mut self, name: &str, shape: &[usize]) -> Vec<f32> {
        match self.w.get(name) {
            Ok(t) if t.shape == shape => self.w.take(name).map(|t| t.data).unwrap_or_default(),
            Ok(t) => {
                self.problems.push(format!(
                    "  '{name}': expected shape {shape:?}, found {:?}",
                    t.shape
                ));
                vec![0.0; shape.iter().product()]
            }
            Err(_) => {
                self.problems
                    .push(format!("  '{name}': missing (expected shape {shape:?})"));
                self.missing.push((name.to_string(), shape.to_vec()));
                vec![0.0; shape.iter().product()]
            }
        }
    }

    /// A conv (weight, bias) followed by BatchNorm `bn`, folded.
    fn conv_bn(
        &mut self,
        conv: &str,
        bn: &str,
        shape: &[usize],
        transposed: bool,
    ) -> (Vec<f32>, Vec<f32>) {
        let out = if transposed { shape[1] } else { shape[0] };
        let mut w = self.take(&format!("{conv}.weight"), shape);
        let mut b = self.take(&format!("{conv}.bias"), &[out]);
        let g = self.take(&format!("{bn}.weight"), &[out]);
        let be = self.take(&format!("{bn}.bias"), &[out]);
        let m = self.take(&format!("{bn}.running_mean"), &[out]);
        let v = self.take(&format!("{bn}.running_var"), &[out]);
        let r = if transposed {
            fold_batchnorm_transposed(&mut w, &mut b, shape[0], out, &g, &be, &m, &v, BN_EPS)
        } else {
            fold_batchnorm(&mut w, &mut b, out, &g, &be, &m, &v, BN_EPS)
        };
        if let Err(e) = r {
            self.problems.push(format!("  {conv}: {e}"));
        }
        (w, b)
    }
}

impl Unet3d {
    /// Builds the network from a dinov3_playground state dict. Fusion is on when the config
    /// says so or any key mentions "context"; learned upsampling when any key mentions
    /// "learned_upsample" (as the reference's loader decides). Every missing or mis-shaped
    /// key is reported at once.
    pub fn from_weights(config: UnetConfig, weights: Weights) -> Result<Unet3d> {
        Self::load(config, weights).0
    }

    /// A network with deterministic pseudo-random weights for `config` (benchmarks):
    /// BatchNorm statistics are non-trivial, learned upsampling is off.
    pub fn random(config: UnetConfig, seed: u64) -> Result<Unet3d> {
        let (_, needed) = Self::load(config.clone(), Weights::new());
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        let mut next = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let mut w = Weights::new();
        for (name, shape) in needed {
            let n: usize = shape.iter().product();
            let fan_in = if shape.len() > 1 {
                shape[1..].iter().product::<usize>()
            } else {
                1
            };
            let scale =
                if name.contains("running_var") || name.ends_with(".weight") && shape.len() == 1 {
                    0.0 // filled below
                } else {
                    2.0 / (fan_in as f32).sqrt()
                };
            let data: Vec<f32> = (0..n)
                .map(|_| {
                    if scale == 0.0 {
                        1.0 + 0.4 * next()
                    } else {
                        scale * next()
                    }
                })
                .collect();
            w.insert(name, shape, data)?;
        }
        Self::from_weights(config, w)
    }

    fn load(
        config: UnetConfig,
        mut weights: Weights,
    ) -> (Result<Unet3d>, Vec<(String, Vec<usize>)>) {
        let mut missing = Vec::new();
        let r = Self::load_into(config, &mut weights, &mut missing);
        (r, missing)
    }

    fn load_into(
        config: UnetConfig,
        weights: &mut Weights,
        missing_out: &mut Vec<(String, Vec<usize>)>,
    ) -> Result<Unet3d> {
        let names: Vec<String> = weights.names().iter().map(|s| s.to_string()).collect();
        let fusion = config.use_context_fusion || names.iter().any(|n| n.contains("context"));
        let upsample_stages = if names.iter().any(|n| n.contains("learned_upsample")) {
            // Stages: ConvTranspose3d at learned_upsample.0, .3, .6 (those with 5-D weights of k4).
            (0..3)
                .take_while(|s| {
                    names
                        .iter()
                        .any(|n| n == &format!("learned_upsample.{}.weight", 3 * s))
                        && weights
                            .get(&format!("learned_upsample.{}.weight", 3 * s))
                            .map(|t| t.shape.len() == 5 && t.shape[2] == 4)
                            .unwrap_or(false)
                })
                .count()
        } else {
            0
        };
        let (cd, c, k) = (
            config.input_channels,
            config.base_channels,
            config.num_classes,
        );
        let mut ld = Loader {
            w: weights,
            problems: Vec::new(),
            missing: Vec::new(),
        };
        let mut w: HashMap<String, (Arc<Constant>, Vec<usize>)> = HashMap::new();
        let mut put = |name: String, data: Vec<f32>, shape: Vec<usize>| {
            w.insert(name, (Constant::new(data), shape));
        };
        let plain = |ld: &mut Loader,
                     put: &mut dyn FnMut(String, Vec<f32>, Vec<usize>),
                     name: &str,
                     shape: Vec<usize>| {
            let wt = ld.take(&format!("{name}.weight"), &shape);
            let b = ld.take(&format!("{name}.bias"), &[shape[0]]);
            put(format!("{name}.weight"), wt, shape.clone());
            put(format!("{name}.bias"), b, vec![shape[0]]);
        };
        plain(&mut ld, &mut put, "input_conv", vec![c, cd, 1, 1, 1]);
        plain(&mut ld, &mut put, "final_conv", vec![k, c, 1, 1, 1]);
        for (name, (ci, co)) in BLOCKS.iter().zip(block_channels(c)) {
            for (conv, bn, cin) in [("0", "1", ci), ("3", "4", co)] {
                let shape = vec![co, cin, 3, 3, 3];
                let (wt, b) = ld.conv_bn(
                    &format!("{name}.{conv}"),
                    &format!("{name}.{bn}"),
                    &shape,
                    false,
                );
                put(format!("{name}.{conv}.weight"), wt, shape);
                put(format!("{name}.{conv}.bias"), b, vec![co]);
            }
        }
        for s in 0..upsample_stages {
            let shape = vec![c, c, 4, 4, 4];
            let (wt, b) = ld.conv_bn(
                &format!("learned_upsample.{}", 3 * s),
                &format!("learned_upsample.{}", 3 * s + 1),
                &shape,
                true,
            );
            put(format!("up{s}.weight"), wt, shape);
            put(format!("up{s}.bias"), b, vec![c]);
        }
        if upsample_stages > 0 {
            plain(
                &mut ld,
                &mut put,
                &format!("learned_upsample.{}", 3 * upsample_stages),
                vec![c, c, 3, 3, 3],
            );
        }
        if fusion {
            plain(
                &mut ld,
                &mut put,
                "context_input_conv",
                vec![c, cd, 1, 1, 1],
            );
            for (i, ck) in [c, 2 * c, 4 * c, 8 * c].into_iter().enumerate() {
                let i = i + 1;
                plain(
                    &mut ld,
                    &mut put,
                    &format!("context_proj{i}"),
                    vec![ck, c, 1, 1, 1],
                );
                let f = format!("context_fusion{i}");
                let q = ck / 4;
                let shape = vec![q, ck, 1, 1, 1];
                let (wt, b) = ld.conv_bn(
                    &format!("{f}.context_proj.0"),
                    &format!("{f}.context_proj.1"),
                    &shape,
                    false,
                );
                put(format!("{f}.context_proj.0.weight"), wt, shape);
                put(format!("{f}.context_proj.0.bias"), b, vec![q]);
                plain(
                    &mut ld,
                    &mut put,
                    &format!("{f}.context_proj.3"),
                    vec![ck, q, 1, 1, 1],
                );
                plain(
                    &mut ld,
                    &mut put,
                    &format!("{f}.raw_proj"),
                    vec![ck, ck, 1, 1, 1],
                );
            }
        }
        *missing_out = std::mem::take(&mut ld.missing);
        if !ld.problems.is_empty() {
            return Err(Error::Weights(format!(
                "the UNet state dict does not match model_config (input_channels {cd}, base_channels {c}, num_classes {k}, context fusion {fusion}, learned upsampling stages {upsample_stages}):\n{}",
                ld.problems.join("\n")
            )));
        }
        let [d, h, wd] = config.input_size;
        if d % 16 != 0 || h % 16 != 0 || wd % 16 != 0 || d == 0 || h == 0 || wd == 0 {
            return Err(Error::Invalid(format!(
                "input_size {:?} must be positive multiples of 16 (four poolings)",
                config.input_size
            )));
        }
        config.head()?;
        Ok(Unet3d {
            config,
            fusion,
            upsample_stages,
            w,
        })
    }

    fn c(&self, g: &mut Graph, name: &str) -> Result<Value> {
        let (data, shape) = self
            .w
            .get(name)
            .ok_or_else(|| Error::Weights(format!("  '{name}' was not loaded")))?;
        g.constant(name, data, shape)
    }

    fn conv(&self, g: &mut Graph, x: Value, name: &str, kernel: usize) -> Result<Value> {
        let w = self.c(g, &format!("{name}.weight"))?;
        let b = self.c(g, &format!("{name}.bias"))?;
        g.op(Conv3d::new(kernel), &[x, w, b])
    }

    /// `relu(conv(x))` as one op (the ReLU runs in the conv kernel's store).
    fn conv_relu(&self, g: &mut Graph, x: Value, name: &str, kernel: usize) -> Result<Value> {
        let w = self.c(g, &format!("{name}.weight"))?;
        let b = self.c(g, &format!("{name}.bias"))?;
        g.op(Conv3d::with_relu(kernel), &[x, w, b])
    }

    /// Conv3d → BN → ReLU → Conv3d → BN → ReLU (BN folded; dropout is identity at eval).
    fn block(&self, g: &mut Graph, x: Value, name: &str) -> Result<Value> {
        let x = self.conv_relu(g, x, &format!("{name}.0"), 3)?;
        self.conv_relu(g, x, &format!("{name}.3"), 3)
    }

    /// [`Unet3d::block`] on `cat([a, b], dim=1)`, the concat fused into the first conv
    /// ([`Conv3dCat`]: on the texture path no concat tensor exists).
    fn block_cat(&self, g: &mut Graph, a: Value, b: Value, name: &str) -> Result<Value> {
        let w = self.c(g, &format!("{name}.0.weight"))?;
        let bias = self.c(g, &format!("{name}.0.bias"))?;
        let x = g.op(Conv3dCat::with_relu(3), &[a, b, w, bias])?;
        self.conv_relu(g, x, &format!("{name}.3"), 3)
    }

    /// Learned upsampling (same weights for raw and context), then back to input_size.
    fn upsample(&self, g: &mut Graph, mut x: Value) -> Result<Value> {
        if self.upsample_stages == 0 {
            return Ok(x);
        }
        for s in 0..self.upsample_stages {
            let w = self.c(g, &format!("up{s}.weight"))?;
            let b = self.c(g, &format!("up{s}.bias"))?;
            x = g.op(ConvTranspose3d, &[x, w, b])?;
            x = g.op(Unary::Relu, &[x])?;
        }
        x = self.conv(
            g,
            x,
            &format!("learned_upsample.{}", 3 * self.upsample_stages),
            3,
        )?;
        if g.shape(x)[2..] != self.config.input_size {
            x = g.op(Trilinear::to(self.config.input_size), &[x])?;
        }
        Ok(x)
    }

    /// `skip + raw_proj(skip) ⊙ σ(conv3(ReLU(BN(conv0(ctx)))))` for level `i` (1-based).
    /// With `gates`, the gate σ(…) is also computed as a value of its own and pushed there.
    fn fuse(
        &self,
        g: &mut Graph,
        skip: Value,
        ctx: Value,
        i: usize,
        gates: Option<&mut Vec<Value>>,
    ) -> Result<Value> {
        let f = format!("context_fusion{i}");
        let a = self.conv_relu(g, ctx, &format!("{f}.context_proj.0"), 1)?;
        let gate = self.conv(g, a, &format!("{f}.context_proj.3"), 1)?;
        if let Some(gates) = gates {
            gates.push(g.op(Unary::Sigmoid, &[gate])?);
        }
        let w = self.c(g, &format!("{f}.raw_proj.weight"))?;
        let b = self.c(g, &format!("{f}.raw_proj.bias"))?;
        g.op(ContextGate, &[skip, w, b, gate])
    }

    /// Adds the network to `g`: features (N, Cd, d, h, w) [+ context features of the same
    /// shape] → logits (N, K, d, h, w). Without `ctx` the skips are not fused.
    pub fn build(&self, g: &mut Graph, feats: Value, ctx: Option<Value>) -> Result<Value> {
        self.build_inner(g, feats, ctx, None, false)
    }

    /// [`Unet3d::build`] for features that already went through `input_conv` (and context
    /// features through `context_input_conv`): (N, C, d, h, w) with C = base channels, as
    /// feature extraction with [`Unet3d::input_projections`] produces them
    /// ("projection-first"); the two 1×1×1 input convs are skipped.
    pub fn build_projected(
        &self,
        g: &mut Graph,
        feats: Value,
        ctx: Option<Value>,
    ) -> Result<Value> {
        self.build_inner(g, feats, ctx, None, true)
    }

    /// `input_conv` and (with fusion) `context_input_conv` as projections for
    /// projection-first feature extraction; they share this model's weight buffers, so
    /// every call gives the same (cache-friendly) projection.
    pub fn input_projections(&self) -> Result<(Projection, Option<Projection>)> {
        let get = |name: &str| -> Result<Projection> {
            let w = self.w.get(&format!("{name}.weight"));
            let b = self.w.get(&format!("{name}.bias"));
            match (w, b) {
                (Some((w, ws)), Some((b, _))) if ws.len() == 5 => {
                    Projection::shared(w.clone(), b.clone(), ws[0], ws[1])
                }
                _ => Err(Error::Weights(format!("  '{name}' was not loaded"))),
            }
        };
        let ctx = if self.fusion {
            Some(get("context_input_conv")?)
        } else {
            None
        };
        Ok((get("input_conv")?, ctx))
    }

    /// [`Unet3d::build`], also returning the four fusion gates σ(ctx_proj(ctx_k)) of shapes
    /// (N, Ck, d/2^(k-1), …), k = 1..4, as values of the graph (for inspection). Errors if the
    /// model has no context fusion or no context is given.
    pub fn build_with_gates(
        &self,
        g: &mut Graph,
        feats: Value,
        ctx: Value,
    ) -> Result<(Value, Vec<Value>)> {
        if !self.fusion {
            return Err(Error::Invalid(
                "this model has no context fusion, so it has no gates to show".into(),
            ));
        }
        let mut gates = Vec::with_capacity(4);
        let logits = self.build_inner(g, feats, Some(ctx), Some(&mut gates), false)?;
        Ok((logits, gates))
    }

    fn build_inner(
        &self,
        g: &mut Graph,
        feats: Value,
        ctx: Option<Value>,
        mut gates: Option<&mut Vec<Value>>,
        projected: bool,
    ) -> Result<Value> {
        let cfg = &self.config;
        let fs = g.shape(feats).to_vec();
        let channels = if projected {
            cfg.base_channels
        } else {
            cfg.input_channels
        };
        if fs.len() != 5
            || fs[1] != channels
            || !fs[2].is_multiple_of(16)
            || !fs[3].is_multiple_of(16)
            || !fs[4].is_multiple_of(16)
        {
            return Err(Error::Invalid(format!(
                "UNet features must be (N, {channels}, d, h, w) with d, h, w multiples of 16, got {fs:?}{}",
                if projected { " (projected by input_conv)" } else { "" }
            )));
        }
        if let Some(cv) = ctx {
            if g.shape(cv) != fs.as_slice() {
                return Err(Error::Invalid(format!(
                    "context features {:?} must match the raw features {fs:?}",
                    g.shape(cv)
                )));
            }
        }
        let x = if projected {
            feats
        } else {
            self.conv(g, feats, "input_conv", 1)?
        };
        let x = self.upsample(g, x)?;
        let mut skips = Vec::with_capacity(4);
        let mut h = x;
        for name in ["enc1", "enc2", "enc3", "enc4"] {
            let e = self.block(g, h, name)?;
            skips.push(e);
            h = g.op(Pool3d::Max, &[e])?;
        }
        let mut h = self.block(g, h, "bottleneck")?;
        if let (true, Some(cv)) = (self.fusion, ctx) {
            let cb = if projected {
                cv
            } else {
                self.conv(g, cv, "context_input_conv", 1)?
            };
            let mut c = self.upsample(g, cb)?;
            for (i, skip) in skips.iter_mut().enumerate() {
                // The next level's pooled context and this level's projection before the
                // gate, so this level's context (the full-size one at level 1) is dead
                // while the gate and the fused skip are made.
                let next = if i + 1 < 4 {
                    Some(g.op(Pool3d::Avg, &[c])?)
                } else {
                    None
                };
                let ck = self.conv(g, c, &format!("context_proj{}", i + 1), 1)?;
                *skip = self.fuse(g, *skip, ck, i + 1, gates.as_deref_mut())?;
                if let Some(n) = next {
                    c = n;
                }
            }
        }
        for (name, skip) in ["dec4", "dec3", "dec2", "dec1"]
            .iter()
            .zip(skips.iter().rev())
        {
            let up = g.op(Trilinear::by(2.0), &[h])?;
            h = self.block_cat(g, up, *skip, name)?;
        }
        self.conv(g, h, "final_conv", 1)
    }
}
