//! DINOv3 ViT (HF transformers `DINOv3ViTModel`): patch embedding, CLS + register tokens,
//! pre-norm blocks with RoPE attention and LayerScale, final norm. Output is
//! `last_hidden_state` (B, 1 + R + gh·gw, D). Facts: shared/reference/dinov3_vit.md.

use super::runner::{Backend, Runner};
use crate::error::{Error, Result};
use crate::graph::{Constant, Graph, Value};
use crate::io::Weights;
use crate::ops::attention::Attention;
use crate::ops::elementwise::Binary;
use crate::ops::matmul::{Activation, Epilogue, Matmul};
use crate::ops::norm::LayerNorm;
use crate::ops::tokens::{Patchify, PrependTokens};
use serde::Deserialize;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// The fields of HF's `DINOv3ViTConfig` that the forward pass uses (others are ignored).
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct VitConfig {
    pub patch_size: usize,
    pub num_channels: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    pub rope_theta: f64,
    pub query_bias: bool,
    pub key_bias: bool,
    pub value_bias: bool,
    pub proj_bias: bool,
    pub mlp_bias: bool,
    pub use_gated_mlp: bool,
    pub num_register_tokens: usize,
}

impl Default for VitConfig {
    fn default() -> Self {
        VitConfig {
            patch_size: 16,
            num_channels: 3,
            hidden_size: 384,
            intermediate_size: 1536,
            num_hidden_layers: 12,
            num_attention_heads: 6,
            hidden_act: "gelu".into(),
            layer_norm_eps: 1e-5,
            rope_theta: 100.0,
            query_bias: true,
            key_bias: false,
            value_bias: true,
            proj_bias: true,
            mlp_bias: true,
            use_gated_mlp: false,
            num_register_tokens: 0,
        }
    }
}

impl VitConfig {
    /// Reads an HF `config.json`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let c: VitConfig = serde_json::from_str(&text)
            .map_err(|e| Error::io(path, format!("not a DINOv3ViTConfig: {e}")))?;
        c.validate().map_err(|m| Error::io(path, m))?;
        Ok(c)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        let (d, h) = (self.hidden_size, self.num_attention_heads);
        if d == 0 || h == 0 || d % h != 0 || (d / h) % 4 != 0 {
            return Err(format!(
                "hidden_size {d} must split into {h} heads with a head size divisible by 4"
            ));
        }
        if self.patch_size == 0 || self.num_hidden_layers == 0 || self.intermediate_size == 0 {
            return Err(
                "patch_size, num_hidden_layers and intermediate_size must be positive".into(),
            );
        }
        self.activation()?;
        Ok(())
    }

    /// The MLP activation, applied in the epilogue of its first matmul.
    fn activation(&self) -> std::result::Result<Activation, String> {
        match self.hidden_act.as_str() {
            "gelu" => Ok(Activation::Gelu),
            "silu" | "swish" => Ok(Activation::Silu),
            other => Err(format!(
                "hidden_act '{other}' is not supported (gelu or silu)"
            )),
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// CLS + registers.
    pub fn prefix_tokens(&self) -> usize {
        1 + self.num_register_tokens
    }

    /// Tokens for an H×W image.
    pub fn tokens(&self, h: usize, w: usize) -> usize {
        self.prefix_tokens() + (h / self.patch_size) * (w / self.patch_size)
    }
}

/// RoPE tables for a gh×gw patch grid, as HF computes them (fp32): (P, hd) cos and sin.
pub fn rope_tables(cfg: &VitConfig, gh: usize, gw: usize) -> (Vec<f32>, Vec<f32>) {
    let hd = cfg.head_dim();
    let nf = hd / 4;
    let base = cfg.rope_theta as f32;
    let inv_freq: Vec<f32> = (0..nf)
        .map(|i| 1.0 / base.powf(i as f32 * (4.0 / hd as f32)))
        .collect();
    let two_pi = 2.0 * std::f32::consts::PI;
    let mut cos = Vec::with_capacity(gh * gw * hd);
    let mut sin = Vec::with_capacity(gh * gw * hd);
    for y in 0..gh {
        for x in 0..gw {
            let cy = 2.0 * ((y as f32 + 0.5) / gh as f32) - 1.0;
            let cx = 2.0 * ((x as f32 + 0.5) / gw as f32) - 1.0;
            let mut angles = Vec::with_capacity(hd);
            for c in [cy, cx] {
                angles.extend(inv_freq.iter().map(|f| (two_pi * c) * f));
            }
            let tiled: Vec<f32> = angles.iter().chain(angles.iter()).copied().collect();
            cos.extend(tiled.iter().map(|a| a.cos()));
            sin.extend(tiled.iter().map(|a| a.sin()));
        }
    }
    (cos, sin)
}

/// Which matmul operands are f16 activations (see [`Vit::build_with`]).
#[derive(Clone, Copy, Debug, Default)]
struct F16Io {
    x: bool,
    out: bool,
}

impl F16Io {
    fn on(self, m: Matmul) -> Matmul {
        Matmul {
            x_f16: self.x,
            out_f16: self.out,
            ..m
        }
    }
}

/// A loaded DINOv3 ViT.
pub struct Vit {
    pub config: VitConfig,
    w: HashMap<String, (Arc<Constant>, Vec<usize>)>,
}

fn linear_shapes(cfg: &VitConfig) -> Vec<(String, Vec<usize>)> {
    let (d, f, c, ps, r) = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_channels,
        cfg.patch_size,
        cfg.num_register_tokens,
    );
    let mut s: Vec<(String, Vec<usize>)> = vec![
        ("embeddings.cls_token".into(), vec![1, 1, d]),
        (
            "embeddings.patch_embeddings.weight".into(),
            vec![d, c, ps, ps],
        ),
        ("embeddings.patch_embeddings.bias".into(), vec![d]),
        ("norm.weight".into(), vec![d]),
        ("norm.bias".into(), vec![d]),
    ];
    if r > 0 {
        s.push(("embeddings.register_tokens".into(), vec![1, r, d]));
    }
    for l in 0..cfg.num_hidden_layers {
        let p = format!("layer.{l}.");
        let mut add = |name: &str, shape: Vec<usize>| s.push((format!("{p}{name}"), shape));
        for n in ["norm1", "norm2"] {
            add(&format!("{n}.weight"), vec![d]);
            add(&format!("{n}.bias"), vec![d]);
        }
        for (proj, bias) in [
            ("q_proj", cfg.query_bias),
            ("k_proj", cfg.key_bias),
            ("v_proj", cfg.value_bias),
            ("o_proj", cfg.proj_bias),
        ] {
            add(&format!("attention.{proj}.weight"), vec![d, d]);
            if bias {
                add(&format!("attention.{proj}.bias"), vec![d]);
            }
        }
        add("layer_scale1.lambda1", vec![d]);
        add("layer_scale2.lambda1", vec![d]);
        let mut mlp = vec![("up_proj", vec![f, d]), ("down_proj", vec![d, f])];
        if cfg.use_gated_mlp {
            mlp.push(("gate_proj", vec![f, d]));
        }
        for (name, shape) in mlp {
            let out = shape[0];
            add(&format!("mlp.{name}.weight"), shape);
            if cfg.mlp_bias {
                add(&format!("mlp.{name}.bias"), vec![out]);
            }
        }
    }
    s
}

impl Vit {
    /// Loads an HF folder: `config.json` + `model.safetensors` (or a sharded index).
    pub fn load(dir: &Path) -> Result<Vit> {
        let cfg_path = dir.join("config.json");
        if !cfg_path.is_file() {
            return Err(Error::io(dir, "no config.json: point --backbone to an HF DINOv3 folder (config.json + model.safetensors)"));
        }
        let config = VitConfig::load(&cfg_path)?;
        let weights = Weights::load(dir)?;
        Self::from_weights(config, weights)
    }

    /// Takes every tensor the config calls for out of `weights`; all missing or
    /// mis-shaped keys are reported together.
    pub fn from_weights(config: VitConfig, mut weights: Weights) -> Result<Vit> {
        config.validate().map_err(Error::Invalid)?;
        let wanted = linear_shapes(&config);
        let req: Vec<(&str, &[usize])> = wanted
            .iter()
            .map(|(n, s)| (n.as_str(), s.as_slice()))
            .collect();
        weights.require(&req)?;
        let mut w = HashMap::new();
        for (name, shape) in wanted {
            let t = weights.take(&name)?;
            w.insert(name, (Constant::new(t.data), shape));
        }
        // The token prefix [CLS, registers] as one (1 + R, D) constant.
        let d = config.hidden_size;
        let mut prefix = w["embeddings.cls_token"].0.values()?.to_vec();
        if let Some((r, _)) = w.get("embeddings.register_tokens") {
            prefix.extend_from_slice(&r.values()?);
        }
        let rows = prefix.len() / d;
        w.insert("prefix".into(), (Constant::new(prefix), vec![rows, d]));
        Ok(Vit { config, w })
    }

    fn c(&self, g: &mut Graph, name: &str) -> Result<Value> {
        let (data, shape) = self
            .w
            .get(name)
            .ok_or_else(|| Error::Weights(format!("  '{name}' was not loaded")))?;
        g.constant(name, data, shape)
    }

    /// A constant with a different view of the same data (e.g. a conv weight as a matrix).
    fn c_as(&self, g: &mut Graph, name: &str, shape: &[usize]) -> Result<Value> {
        let (data, _) = self
            .w
            .get(name)
            .ok_or_else(|| Error::Weights(format!("  '{name}' was not loaded")))?;
        g.constant(name, data, shape)
    }

    /// `act(x·Wᵀ + b)` (the bias only when the checkpoint has one), the activation applied
    /// in the matmul's epilogue.
    fn linear_act(
        &self,
        g: &mut Graph,
        x: Value,
        prefix: &str,
        bias: bool,
        act: Activation,
        io: F16Io,
    ) -> Result<Value> {
        let w = self.c(g, &format!("{prefix}.weight"))?;
        if bias {
            let b = self.c(g, &format!("{prefix}.bias"))?;
            g.op(io.on(Matmul::linear(true).with_act(act)), &[x, w, b])
        } else {
            g.op(io.on(Matmul::linear(false).with_act(act)), &[x, w])
        }
    }

    fn layernorm(&self, g: &mut Graph, x: Value, prefix: &str, out_f16: bool) -> Result<Value> {
        let w = self.c(g, &format!("{prefix}.weight"))?;
        let b = self.c(g, &format!("{prefix}.bias"))?;
        let ln = LayerNorm {
            out_f16,
            ..LayerNorm::new(self.config.layer_norm_eps as f32)
        };
        g.op(ln, &[x, w, b])
    }

    /// `epi(x·Wᵀ + b)`: a Linear with an epilogue fused into the matmul; `extra` are the
    /// epilogue's inputs.
    fn linear_epi(
        &self,
        g: &mut Graph,
        x: Value,
        prefix: &str,
        bias: bool,
        epi: Epilogue,
        extra: &[Value],
        io: F16Io,
    ) -> Result<Value> {
        let mut inputs = vec![x, self.c(g, &format!("{prefix}.weight"))?];
        if bias {
            inputs.push(self.c(g, &format!("{prefix}.bias"))?);
        }
        inputs.extend_from_slice(extra);
        g.op(io.on(Matmul::linear(bias).with_epilogue(epi)), &inputs)
    }

    /// `h + λ ⊙ (x·Wᵀ + b)` (the projection, LayerScale and the residual add in one op).
    fn residual_linear(
        &self,
        g: &mut Graph,
        h: Value,
        x: Value,
        prefix: &str,
        bias: bool,
        lambda: &str,
        io: F16Io,
    ) -> Result<Value> {
        let l = self.c(g, lambda)?;
        self.linear_epi(g, x, prefix, bias, Epilogue::Residual, &[h, l], io)
    }

    /// Adds the forward pass to `g` for `pixels` (B, C, H, W); returns last_hidden_state.
    pub fn build(&self, g: &mut Graph, pixels: Value) -> Result<Value> {
        self.build_with(g, pixels, false)
    }

    /// As [`Vit::build`]; with `act_f16`, the LayerNorm outputs, q, k, v and the
    /// (non-gated) MLP hidden layer are stored as f16 between their kernels (GPU texture
    /// path only, see docs/precision.md: their producers round the stores, the consumers
    /// read them through rgba16float textures). The residual stream (and so the final
    /// norm's input), the attention output and a gated MLP's hidden layer stay f32.
    pub fn build_with(&self, g: &mut Graph, pixels: Value, act_f16: bool) -> Result<Value> {
        let cfg = &self.config;
        let both16 = F16Io {
            x: act_f16,
            out: act_f16,
        };
        let in16 = F16Io {
            x: act_f16,
            out: false,
        };
        let shape = g.shape(pixels).to_vec();
        if shape.len() != 4
            || shape[1] != cfg.num_channels
            || shape[2] < cfg.patch_size
            || shape[3] < cfg.patch_size
        {
            return Err(Error::Invalid(format!(
                "images must be (N, {}, H, W) with H, W ≥ {}, got {shape:?}",
                cfg.num_channels, cfg.patch_size
            )));
        }
        let (d, ps) = (cfg.hidden_size, cfg.patch_size);
        let (gh, gw) = (shape[2] / ps, shape[3] / ps);
        let act = cfg.activation().map_err(Error::Invalid)?;

        // Embeddings: Conv2d(k = s = ps) as patchify + Linear, then [CLS, registers, patches].
        let patches = g.op(Patchify { patch: ps }, &[pixels])?;
        let pw = self.c_as(
            g,
            "embeddings.patch_embeddings.weight",
            &[d, cfg.num_channels * ps * ps],
        )?;
        let pb = self.c(g, "embeddings.patch_embeddings.bias")?;
        let patches = g.op(Matmul::linear(true), &[patches, pw, pb])?;
        let prefix = self.c(g, "prefix")?;
        let mut h = g.op(PrependTokens, &[patches, prefix])?;

        // RoPE runs in the q/k projections' epilogue, on the first half of HF's tables
        // (they are tiled: cos[j] = cos[j + hd/2]).
        let (cos, sin) = rope_tables(cfg, gh, gw);
        let hd = cfg.head_dim();
        let first_half = |t: Vec<f32>| -> Arc<Vec<f32>> {
            Arc::new(t.chunks(hd).flat_map(|r| r[..hd / 2].to_vec()).collect())
        };
        let cos = g.constant("rope.cos", first_half(cos), &[gh * gw, hd / 2])?;
        let sin = g.constant("rope.sin", first_half(sin), &[gh * gw, hd / 2])?;
        let rope = Epilogue::Rope {
            heads: cfg.num_attention_heads,
            prefix: cfg.prefix_tokens(),
        };

        for l in 0..cfg.num_hidden_layers {
            let p = format!("layer.{l}");
            // h = h + λ1 ⊙ Attn(LN1(h))
            let x = self.layernorm(g, h, &format!("{p}.norm1"), act_f16)?;
            let attn = format!("{p}.attention");
            let q = self.linear_epi(
                g,
                x,
                &format!("{attn}.q_proj"),
                cfg.query_bias,
                rope,
                &[cos, sin],
                both16,
            )?;
            let k = self.linear_epi(
                g,
                x,
                &format!("{attn}.k_proj"),
                cfg.key_bias,
                rope,
                &[cos, sin],
                both16,
            )?;
            let v = self.linear_act(
                g,
                x,
                &format!("{attn}.v_proj"),
                cfg.value_bias,
                Activation::Identity,
                both16,
            )?;
            let attention = Attention {
                in_f16: act_f16,
                ..Attention::new(cfg.num_attention_heads)
            };
            let a = g.op(attention, &[q, k, v])?;
            h = self.residual_linear(
                g,
                h,
                a,
                &format!("{attn}.o_proj"),
                cfg.proj_bias,
                &format!("{p}.layer_scale1.lambda1"),
                F16Io::default(),
            )?;
            // h = h + λ2 ⊙ MLP(LN2(h))
            let x = self.layernorm(g, h, &format!("{p}.norm2"), act_f16)?;
            // (the gated MLP's product is an f32 element-wise op: its hidden layer stays f32)
            let (m, down_io) = if cfg.use_gated_mlp {
                let gate =
                    self.linear_act(g, x, &format!("{p}.mlp.gate_proj"), cfg.mlp_bias, act, in16)?;
                let up = self.linear_act(
                    g,
                    x,
                    &format!("{p}.mlp.up_proj"),
                    cfg.mlp_bias,
                    Activation::Identity,
                    in16,
                )?;
                (g.op(Binary::mul(), &[gate, up])?, F16Io::default())
            } else {
                let up_io = both16;
                let m =
                    self.linear_act(g, x, &format!("{p}.mlp.up_proj"), cfg.mlp_bias, act, up_io)?;
                (m, in16)
            };
            h = self.residual_linear(
                g,
                h,
                m,
                &format!("{p}.mlp.down_proj"),
                cfg.mlp_bias,
                &format!("{p}.layer_scale2.lambda1"),
                down_io,
            )?;
        }
        self.layernorm(g, h, "norm", false)
    }

    /// A graph from images (batch, C, H, W) to last_hidden_state.
    pub fn graph(&self, batch: usize, h: usize, w: usize) -> Result<Graph> {
        self.graph_with(batch, h, w, false)
    }

    /// As [`Vit::graph`], with f16 activations when `act_f16` ([`Vit::build_with`]).
    pub fn graph_with(&self, batch: usize, h: usize, w: usize, act_f16: bool) -> Result<Graph> {
        let mut g = Graph::new();
        let x = g.input("pixel_values", &[batch, self.config.num_channels, h, w]);
        let y = self.build_with(&mut g, x, act_f16)?;
        g.output(y);
        Ok(g)
    }

    /// The [`Runner`] key of the graph [`Vit::run`] prepares for a batch of `b` H×W images.
    pub fn run_key(&self, backend: &Backend, b: usize, h: usize, w: usize) -> String {
        let c = self.config.num_channels;
        let f16 = if self.act_f16_on(backend) { " f16" } else { "" };
        format!("vit {b}x{c}x{h}x{w}{f16}")
    }

    /// Whether this model runs with f16 activations on `backend`: the GPU with
    /// `Precision::F16Act` on a device with the texture path (subgroups of ≥ 8 lanes,
    /// 64 KiB uniform bindings) and a hidden size whose 8-column weight block fits one
    /// 64 KiB window (≤ 2048 as f32, ≤ 4096 as f16). Otherwise activations stay f32.
    pub fn act_f16_on(&self, backend: &Backend) -> bool {
        let Backend::Gpu(ctx) = backend else {
            return false;
        };
        let c = &ctx.caps;
        let d = self.config.hidden_size;
        ctx.precision == crate::gpu::Precision::F16Act
            && c.subgroups
            && c.cpu_like
            && c.min_subgroup_size >= 8
            && c.max_uniform_binding >= 65536
            && d <= 2048
            && d.is_multiple_of(8)
            && self.config.intermediate_size.is_multiple_of(8)
            && crate::ops::norm::supports_f16_output(ctx, d)
    }

    /// Bytes of the largest activation of one image (the MLP hidden layer, or the input).
    fn largest_activation(&self, h: usize, w: usize) -> u64 {
        let t = self.config.tokens(h, w) as u64;
        let widest = self.config.intermediate_size.max(self.config.hidden_size) as u64;
        (t * widest).max((self.config.num_channels * h * w) as u64) * 4
    }

    /// The largest batch whose every buffer fits one storage binding of `backend`.
    pub fn max_batch(&self, backend: &Backend, h: usize, w: usize) -> usize {
        (backend.max_binding() / self.largest_activation(h, w).max(1))
            .max(1)
            .min(4096) as usize
    }

    /// Floating-point operations for one H×W image.
    pub fn flops(&self, h: usize, w: usize) -> u64 {
        self.graph(1, h, w).map(|g| g.flops()).unwrap_or(0)
    }

    /// Runs `n` images (N, C, H, W) in batches of at most `batch`; returns (N, T, D).
    pub fn run(
        &self,
        runner: &mut Runner,
        images: &[f32],
        n: usize,
        h: usize,
        w: usize,
        batch: usize,
    ) -> Result<Vec<f32>> {
        let c = self.config.num_channels;
        if images.len() != n * c * h * w {
            return Err(Error::Invalid(format!(
                "{} values do not form ({n}, {c}, {h}, {w}) images",
                images.len()
            )));
        }
        let bs = batch.min(self.max_batch(&runner.backend, h, w)).max(1);
        if self.largest_activation(h, w) > runner.backend.max_binding() {
            return Err(Error::TooLarge {
                what: format!("one {h}×{w} image's activations"),
                bytes: self.largest_activation(h, w),
                limit: runner.backend.max_binding(),
                adapter: runner.backend.describe(),
            });
        }
        let per_in = c * h * w;
        let per_out = self.config.tokens(h, w) * self.config.hidden_size;
        let mut out = Vec::with_capacity(n * per_out);
        let mut start = 0;
        let f16 = self.act_f16_on(&runner.backend);
        while start < n {
            let b = bs.min(n - start);
            let key = self.run_key(&runner.backend, b, h, w);
            let res = runner.run(
                &key,
                || self.graph_with(b, h, w, f16),
                &[&images[start * per_in..(start + b) * per_in]],
            )?;
            out.extend_from_slice(&res[0]);
            start += b;
        }
        debug_assert_eq!(out.len(), n * per_out);
        Ok(out)
    }
}

impl VitConfig {
    /// The published sizes (dinov3_vit.md §7): "s", "s+", "b", "l", "h+", "7b".
    pub fn preset(name: &str) -> Result<VitConfig> {
        let base = VitConfig {
            num_register_tokens: 4,
            ..Default::default()
        };
        let (d, l, h, f, gated) = match name {
            "s" => (384, 12, 6, 1536, false),
            "s+" => (384, 12, 6, 1536, true),
            "b" => (768, 12, 12, 3072, false),
            "l" => (1024, 24, 16, 4096, false),
            "h+" => (1280, 32, 20, 5120, true),
            "7b" => (4096, 40, 32, 8192, true),
            other => {
                return Err(Error::Invalid(format!(
                    "unknown ViT size '{other}': s, s+, b, l, h+ or 7b"
                )))
            }
        };
        Ok(VitConfig {
            hidden_size: d,
            num_hidden_layers: l,
            num_attention_heads: h,
            intermediate_size: f,
            use_gated_mlp: gated,
            hidden_act: if gated { "silu".into() } else { "gelu".into() },
            query_bias: name != "7b",
            value_bias: name != "7b",
            ..base
        })
    }
}

impl Vit {
    /// A model with deterministic pseudo-random weights (for benchmarks and memory plans).
    pub fn random(config: VitConfig, seed: u64) -> Result<Vit> {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut next = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
        };
        let mut w = Weights::new();
        for (name, shape) in linear_shapes(&config) {
            let n: usize = shape.iter().product();
            let mut data: Vec<f32> = (0..n).map(|_| next()).collect();
            if name.contains("norm") && name.ends_with("weight") || name.contains("lambda") {
                data.iter_mut().for_each(|v| *v += 1.0);
            }
            w.insert(name, shape, data)?;
        }
        Vit::from_weights(config, w)
    }
}
