//! `volfuse bench --model`: one tile of the whole pipeline, stage by stage — time, FLOPs,
//! bytes moved and device bytes per stage — from the same building blocks `volfuse run`
//! uses ([`crate::models::extract_features`], [`crate::models::pipeline`]'s UNet graph).
//!
//! Stages: features of the raw volume (ViT; token lift + plane mean; host preprocessing),
//! the same for the context volume, the UNet (without the fusion branch and the head), the
//! context-fusion branch (context input conv, pooling, projections, sigmoid gates), the head
//! (softmax/sigmoid + argmax), and file I/O (reading the two volumes, writing labels and
//! probabilities as `.npy`).
//!
//! FLOPs are the ops' own [`Op::flops`](crate::ops::Op::flops); bytes moved are the inputs
//! plus the output of every op (f32), i.e. what a kernel that reads each operand once
//! moves; "device" is the planned activation buffers (liveness reuse) plus the constants of
//! the stage's graphs. The same numbers come without running anything from [`costs`].

use crate::error::{Error, Result};
use crate::graph::{Graph, Plan};
use crate::models::pipeline::{feature_params, unet_graph};
use crate::models::planes::{Plane, VolumeData};
use crate::models::{
    extract_features, Backend, Bundle, Runner, Unet3d, UnetConfig, Vit, VitConfig, Volume,
};
use crate::ops::conv3d::Conv3d;
use crate::ops::numel;
use crate::ops::resize::Bilinear;
use std::time::Instant;

/// What a random-weight bundle looks like (`random:vit-s,base32,input64,...`).
#[derive(Clone, Debug)]
pub struct RandomSpec {
    pub vit: VitConfig,
    /// Name for labels ("s", "l", …).
    pub vit_name: String,
    pub base_channels: usize,
    /// UNet input grid side (d = h = w).
    pub input: usize,
    /// ViT slice size S.
    pub slice: usize,
    pub context: bool,
    pub classes: usize,
    pub orthogonal_planes: bool,
}

impl RandomSpec {
    /// Parses the part after `random:`: comma-separated `vit-s` (any preset), `base32`
    /// (also `unet-base32`), `input64`, `slice224`, `classes3`, `noctx`, `xy` (one plane).
    /// Defaults: ViT-S, base 32, input 64, slice 224, 3 classes, context, three planes.
    pub fn parse(s: &str) -> Result<RandomSpec> {
        let mut spec = RandomSpec {
            vit: VitConfig::preset("s")?,
            vit_name: "s".into(),
            base_channels: 32,
            input: 64,
            slice: 224,
            context: true,
            classes: 3,
            orthogonal_planes: true,
        };
        let num = |t: &str, prefix: &str| -> Result<usize> {
            t[prefix.len()..].parse::<usize>().map_err(|_| {
                Error::Invalid(format!(
                    "random model spec: '{t}' needs a number after '{prefix}'"
                ))
            })
        };
        for t in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            if let Some(v) = t.strip_prefix("vit-") {
                spec.vit = VitConfig::preset(v)?;
                spec.vit_name = v.to_string();
            } else if t.starts_with("unet-base") {
                spec.base_channels = num(t, "unet-base")?;
            } else if t.starts_with("base") {
                spec.base_channels = num(t, "base")?;
            } else if t.starts_with("input") {
                spec.input = num(t, "input")?;
            } else if t.starts_with("slice") {
                spec.slice = num(t, "slice")?;
            } else if t.starts_with("classes") {
                spec.classes = num(t, "classes")?;
            } else if t == "noctx" {
                spec.context = false;
            } else if t == "ctx" {
                spec.context = true;
            } else if t == "xy" {
                spec.orthogonal_planes = false;
            } else {
                return Err(Error::Invalid(format!(
                    "random model spec: unknown part '{t}'; use vit-s|vit-l|…, base32, input64, slice224, classes3, noctx, xy"
                )));
            }
        }
        if spec.base_channels == 0 || spec.classes == 0 || spec.input == 0 || spec.input % 16 != 0 {
            return Err(Error::Invalid(format!(
                "random model spec: base channels and classes must be ≥ 1 and input a positive multiple of 16, got {spec:?}"
            )));
        }
        if spec.slice == 0 || spec.slice % spec.vit.patch_size != 0 {
            return Err(Error::Invalid(format!(
                "random model spec: slice {} must be a positive multiple of the patch size {}",
                spec.slice, spec.vit.patch_size
            )));
        }
        Ok(spec)
    }

    /// A bundle with deterministic pseudo-random weights of this shape.
    pub fn bundle(&self) -> Result<Bundle> {
        let vit = Vit::random(self.vit.clone(), 7)?;
        let unet = Unet3d::random(
            UnetConfig {
                num_classes: self.classes,
                base_channels: self.base_channels,
                input_size: [self.input; 3],
                input_channels: self.vit.hidden_size,
                use_context_fusion: self.context,
                learn_upsampling: false,
                dinov3_slice_size: Some(self.slice as f64),
                output_type: "labels".into(),
            },
            11,
        )?;
        Ok(Bundle {
            dir: std::path::PathBuf::from(format!("random:{}", self.label())),
            vit,
            unet,
            image_mean: crate::models::planes::IMAGENET_MEAN,
            image_std: crate::models::planes::IMAGENET_STD,
            slice_size: self.slice,
            orthogonal_planes: self.orthogonal_planes,
            model_config: serde_json::Value::Null,
            training_config: serde_json::Value::Null,
        })
    }

    pub fn label(&self) -> String {
        format!(
            "vit-{},base{},input{},slice{},classes{}{}{}",
            self.vit_name,
            self.base_channels,
            self.input,
            self.slice,
            self.classes,
            if self.context { "" } else { ",noctx" },
            if self.orthogonal_planes { "" } else { ",xy" }
        )
    }
}

/// `--model` argument: a bundle folder or `random:SPEC`.
pub fn load_model(arg: &str) -> Result<Bundle> {
    match arg.strip_prefix("random:") {
        Some(spec) => RandomSpec::parse(spec)?.bundle(),
        None => Bundle::load(std::path::Path::new(arg)),
    }
}

/// Work of a set of ops.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cost {
    pub flops: u64,
    /// Inputs + output of every op, f32.
    pub bytes: u64,
}

impl std::ops::AddAssign for Cost {
    fn add_assign(&mut self, o: Cost) {
        self.flops += o.flops;
        self.bytes += o.bytes;
    }
}

impl Cost {
    fn times(self, n: usize) -> Cost {
        Cost {
            flops: self.flops * n as u64,
            bytes: self.bytes * n as u64,
        }
    }
}

/// The cost of node `i` of `g`.
fn node_cost(g: &Graph, i: usize) -> Cost {
    let n = &g.nodes[i];
    let shapes: Vec<&[usize]> = n
        .inputs
        .iter()
        .map(|v| g.values[v.0].shape.as_slice())
        .collect();
    let bytes = shapes.iter().map(|s| numel(s)).sum::<usize>() + numel(&g.values[n.output.0].shape);
    Cost {
        flops: n.op.flops(&shapes),
        bytes: bytes as u64 * 4,
    }
}

/// The cost of the nodes of `g` for which `pick(i)` holds.
fn graph_cost(g: &Graph, pick: impl Fn(usize) -> bool) -> Cost {
    let mut c = Cost::default();
    for i in (0..g.nodes.len()).filter(|i| pick(*i)) {
        c += node_cost(g, i);
    }
    c
}

/// FLOPs and bytes of a graph per op name (most FLOPs first).
pub fn op_breakdown(g: &Graph) -> Vec<(&'static str, Cost)> {
    let mut m: std::collections::BTreeMap<&'static str, Cost> = Default::default();
    for i in 0..g.nodes.len() {
        *m.entry(g.nodes[i].op.name()).or_default() += node_cost(g, i);
    }
    let mut v: Vec<_> = m.into_iter().collect();
    v.sort_by(|a, b| b.1.flops.cmp(&a.1.flops).then(b.1.bytes.cmp(&a.1.bytes)));
    v
}

/// The per-op table of one ViT image and of the UNet graph of `b` (for `--costs-only`).
pub fn op_tables(b: &Bundle) -> Result<String> {
    let s = b.slice_size;
    let mut out = String::new();
    let (_, build) = unet_graph(b, b.unet.fusion);
    for (title, g) in [
        (format!("ViT, one {s}x{s} image"), b.vit.graph(1, s, s)?),
        ("UNet graph (with fusion and head)".to_string(), build()?),
    ] {
        out += &format!(
            "{title}:\n{:<20} {:>12} {:>10} {:>8}\n",
            "op", "GFLOP", "GB moved", "FLOP/B"
        );
        for (name, c) in op_breakdown(&g) {
            out += &format!(
                "{name:<20} {:>12.3} {:>10.3} {:>8.1}\n",
                c.flops as f64 / 1e9,
                c.bytes as f64 / 1e9,
                c.flops as f64 / c.bytes.max(1) as f64
            );
        }
    }
    Ok(out)
}

/// The stage each node of the UNet graph (from `unet_graph`) belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum UnetPart {
    Body,
    Fusion,
    Head,
}

/// Fusion = nodes that depend on the context input but not on the features, plus the
/// gates (`context_gate`); head = the last two nodes (probabilities, labels).
fn unet_parts(g: &Graph) -> Vec<UnetPart> {
    let nv = g.values.len();
    let (mut from_f, mut from_c) = (vec![false; nv], vec![false; nv]);
    if let Some(f) = g.inputs.first() {
        from_f[f.0] = true;
    }
    if let Some(c) = g.inputs.get(1) {
        from_c[c.0] = true;
    }
    let n = g.nodes.len();
    g.nodes
        .iter()
        .enumerate()
        .map(|(i, node)| {
            let f = node.inputs.iter().any(|v| from_f[v.0]);
            let c = node.inputs.iter().any(|v| from_c[v.0]);
            from_f[node.output.0] = f;
            from_c[node.output.0] = c;
            if i + 2 >= n {
                UnetPart::Head
            } else if (c && !f) || node.op.name() == "context_gate" {
                UnetPart::Fusion
            } else {
                UnetPart::Body
            }
        })
        .collect()
}

/// One row of the stage table.
#[derive(Clone, Debug)]
pub struct Stage {
    pub name: String,
    /// Wall seconds per tile (None in a costs-only report, or not measured).
    pub seconds: Option<f64>,
    pub cost: Cost,
    /// Planned device bytes of the stage's graphs (activations + constants); None for host
    /// stages.
    pub device_bytes: Option<u64>,
    /// How the time was obtained, when not plainly measured.
    pub note: &'static str,
}

/// A stage report for one tile.
#[derive(Clone, Debug)]
pub struct StageReport {
    pub label: String,
    pub stages: Vec<Stage>,
    /// Wall seconds of the whole tile (sum of the stages as run, None for costs only).
    pub total_seconds: Option<f64>,
    /// Device bytes held after the tile: activations of every prepared graph + constants.
    pub device_bytes: Option<u64>,
    /// The process's peak resident memory (Linux VmHWM): over the timed tiles when
    /// `peak_rss_timed`, else over the whole run (warm-up and profile pass included).
    pub peak_rss: Option<u64>,
    pub peak_rss_timed: bool,
    /// CPU seconds (user + system, all threads, lavapipe's included) per timed tile: a
    /// fairer measure than wall time on a shared machine.
    pub cpu_seconds: Option<f64>,
}

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

impl std::fmt::Display for StageReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{}", self.label)?;
        writeln!(
            f,
            "{:<34} {:>10} {:>6} {:>11} {:>10} {:>8} {:>9} {:>10}",
            "stage", "ms", "%", "GFLOP", "GB moved", "FLOP/B", "GFLOP/s", "dev MiB"
        )?;
        let total = self.total_seconds.unwrap_or(0.0);
        let mut sum = Cost::default();
        for s in &self.stages {
            sum += s.cost;
            let (ms, pct, rate) = match s.seconds {
                Some(t) => (
                    format!("{:.1}", t * 1e3),
                    if total > 0.0 {
                        format!("{:.1}", 100.0 * t / total)
                    } else {
                        "-".into()
                    },
                    if s.cost.flops > 0 {
                        format!("{:.2}", s.cost.flops as f64 / t.max(1e-12) / 1e9)
                    } else {
                        "-".into()
                    },
                ),
                None => ("-".into(), "-".into(), "-".into()),
            };
            writeln!(
                f,
                "{:<34} {:>10} {:>6} {:>11.3} {:>10.3} {:>8} {:>9} {:>10}{}",
                s.name,
                ms,
                pct,
                s.cost.flops as f64 / 1e9,
                s.cost.bytes as f64 / 1e9,
                if s.cost.bytes > 0 {
                    format!("{:.1}", s.cost.flops as f64 / s.cost.bytes as f64)
                } else {
                    "-".into()
                },
                rate,
                s.device_bytes
                    .map_or("-".into(), |b| format!("{:.1}", mib(b))),
                if s.note.is_empty() {
                    String::new()
                } else {
                    format!("  ({})", s.note)
                }
            )?;
        }
        writeln!(
            f,
            "{:<34} {:>10} {:>6} {:>11.3} {:>10.3}",
            "total",
            self.total_seconds
                .map_or("-".into(), |t| format!("{:.1}", t * 1e3)),
            "",
            sum.flops as f64 / 1e9,
            sum.bytes as f64 / 1e9
        )?;
        if let Some(b) = self.device_bytes {
            writeln!(
                f,
                "device buffers held after the tile: {:.1} MiB (all prepared graphs + weights)",
                mib(b)
            )?;
        }
        if let Some(c) = self.cpu_seconds {
            writeln!(
                f,
                "CPU time per tile (user + system, all threads): {c:.1} s"
            )?;
        }
        if let Some(b) = self.peak_rss {
            let scope = if self.peak_rss_timed {
                "over the timed tiles"
            } else {
                "whole run"
            };
            writeln!(
                f,
                "process peak resident memory ({scope}): {:.1} MiB",
                mib(b)
            )?;
        }
        Ok(())
    }
}

// One implementation for both benches.
pub use crate::bench::process_cpu_seconds;

/// The process's peak resident set (VmHWM) on Linux.
pub fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Restarts the peak resident set (VmHWM) at the current resident set (Linux: "5" to
/// /proc/self/clear_refs); false where that is not possible.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// How the features of one volume are computed: per plane, ViT batch size and runs, and
/// lift chunk size and runs (as `extract_features` schedules them).
struct FeatureSchedule {
    /// (plane, slices, vit batch, lift batch)
    planes: Vec<(Plane, usize, usize, usize)>,
}

fn balanced(n: usize, cap: usize) -> usize {
    let batches = n.div_ceil(cap.max(1)).max(1);
    n.div_ceil(batches).max(1)
}

fn feature_schedule(b: &Bundle, backend: &Backend, batch: usize) -> Result<FeatureSchedule> {
    let params = feature_params(b, batch);
    // Projection-first, as `volfuse run` extracts them (the UNet's input conv on the tokens).
    let est = crate::models::planes::plan_memory_for(
        &b.vit,
        &params,
        params.input_size,
        Some(b.unet.config.base_channels),
        backend,
    )?;
    let s = params.slice_size;
    let cap = crate::models::planes::vit_batch_cap(&b.vit, backend, params.batch, s);
    let mut planes = Vec::new();
    for &p in params.planes() {
        let n = params.input_size[p.normal_axis()];
        let vb = balanced(n, cap);
        let hw = p.output_hw(params.input_size);
        let lb = est
            .lift_graphs
            .iter()
            .find(|(_, r, c)| [*r, *c] == hw)
            .map(|(l, _, _)| *l)
            .unwrap_or(vb);
        planes.push((p, n, vb, lb));
    }
    Ok(FeatureSchedule { planes })
}

/// FLOPs and bytes of one volume's features: (ViT, input conv + lift + plane mean), and
/// the planned device bytes of each (projection-first, as [`crate::models::pipeline`]).
fn feature_costs(b: &Bundle, sched: &FeatureSchedule) -> Result<((Cost, u64), (Cost, u64))> {
    let s = b.slice_size;
    let cd = b.vit.config.hidden_size;
    let c = b.unet.config.base_channels;
    let g = s / b.vit.config.patch_size;
    let [d, h, w] = b.unet.config.input_size;
    let (mut vit, mut lift) = (Cost::default(), Cost::default());
    let (mut vit_dev, mut lift_dev) = (0u64, 0u64);
    let mut seen_vit = Vec::new();
    let mut vit_consts = 0u64;
    for &(p, n, vb, lb) in &sched.planes {
        let runs = n.div_ceil(vb);
        let gr = b.vit.graph(vb, s, s)?;
        vit += graph_cost(&gr, |_| true).times(runs);
        if !seen_vit.contains(&vb) {
            // One prepared graph per distinct batch size; the weights are shared.
            let plan = gr.plan(true);
            vit_dev += plan.peak_bytes;
            vit_consts = vit_consts.max(plan.const_bytes);
            seen_vit.push(vb);
        }
        // Per ViT batch: ceil(real / lb) lift chunks of lb slices.
        let mut chunks = 0;
        let mut start = 0;
        while start < n {
            let real = vb.min(n - start);
            chunks += real.div_ceil(lb);
            start += real;
        }
        let hw = p.output_hw([d, h, w]);
        let mut lg = Graph::new();
        // Projection-first: the input conv (Cd → C, 1×1×1) on the tokens, then the lift.
        let x = lg.input("tokens", &[lb, cd, 1, g, g]);
        let wt = lg.constant("projection.weight", vec![0.0; c * cd], &[c, cd, 1, 1, 1])?;
        let bias = lg.constant("projection.bias", vec![0.0; c], &[c])?;
        let y = lg.op(Conv3d::new(1), &[x, wt, bias])?;
        let y = lg.op(Bilinear::to(hw), &[y])?;
        lg.output(y);
        lift += graph_cost(&lg, |_| true).times(chunks);
        lift_dev = lift_dev.max(lg.plan(true).peak_bytes);
    }
    // Host: scatter into the accumulator and the mean of the planes (read the lifted
    // slices, read + write the accumulator; one add per plane after the first, one divide).
    let vox = (c * d * h * w) as u64;
    let np = sched.planes.len() as u64;
    lift += Cost {
        flops: vox * np,
        bytes: vox * 4 * 3 * np,
    };
    Ok(((vit, vit_dev + vit_consts), (lift, lift_dev)))
}

/// The UNet graph's (body, fusion, head) costs and its planned device bytes.
fn unet_costs(b: &Bundle, with_ctx: bool) -> Result<([Cost; 3], u64, Graph)> {
    let (_, build) = unet_graph(b, with_ctx);
    let g = build()?;
    let parts = unet_parts(&g);
    let mut c = [Cost::default(); 3];
    for (i, p) in parts.iter().enumerate() {
        c[*p as usize] += node_cost(&g, i);
    }
    let plan: Plan = g.plan(true);
    Ok((c, plan.peak_bytes + plan.const_bytes, g))
}

/// The stage table of one tile without running anything: FLOPs, bytes and planned device
/// bytes per stage, for `backend`'s limits (they decide the batch sizes).
pub fn costs(b: &Bundle, backend: &Backend, batch: usize) -> Result<StageReport> {
    let with_ctx = b.unet.fusion;
    let sched = feature_schedule(b, backend, batch)?;
    let ((vit, vit_dev), (lift, lift_dev)) = feature_costs(b, &sched)?;
    let (u, udev, _) = unet_costs(b, with_ctx)?;
    let mut stages = vec![];
    let vols: &[&str] = if with_ctx {
        &["raw", "context"]
    } else {
        &["raw"]
    };
    for v in vols {
        stages.push(stage(
            format!("features {v}: ViT"),
            None,
            vit,
            Some(vit_dev),
        ));
        stages.push(stage(
            format!("features {v}: lift + plane mean"),
            None,
            lift,
            Some(lift_dev),
        ));
    }
    stages.push(stage(
        "UNet (without fusion, head)".into(),
        None,
        u[0],
        Some(udev),
    ));
    if with_ctx {
        stages.push(stage("context fusion gates".into(), None, u[1], None));
    }
    stages.push(stage("head (softmax, argmax)".into(), None, u[2], None));
    Ok(StageReport {
        label: format!(
            "{} — costs only ({})",
            describe_bundle(b, batch, &sched),
            backend.describe()
        ),
        stages,
        total_seconds: None,
        device_bytes: None,
        peak_rss: None,
        peak_rss_timed: false,
        cpu_seconds: None,
    })
}

fn stage(name: String, seconds: Option<f64>, cost: Cost, device_bytes: Option<u64>) -> Stage {
    Stage {
        name,
        seconds,
        cost,
        device_bytes,
        note: "",
    }
}

fn describe_bundle(b: &Bundle, batch: usize, sched: &FeatureSchedule) -> String {
    let c = &b.vit.config;
    let [d, h, w] = b.unet.config.input_size;
    format!(
        "tile {d}x{h}x{w}: ViT/{} (width {}, {} layers) on {} plane(s) of {}² slices (batch ≤ {batch}, used {:?}), UNet base {}{}, {} classes",
        c.patch_size,
        c.hidden_size,
        c.num_hidden_layers,
        sched.planes.len(),
        b.slice_size,
        sched.planes.iter().map(|p| p.2).collect::<Vec<_>>(),
        b.unet.config.base_channels,
        if b.unet.fusion { " + context fusion" } else { "" },
        b.unet.config.num_classes
    )
}

/// A deterministic pseudo-random u16 volume (EM-like range).
pub fn random_volume(shape: [usize; 3], seed: u64) -> Result<Volume> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let data: Vec<u16> = (0..numel(&shape))
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 52) as u16
        })
        .collect();
    Volume::new(shape, VolumeData::U16(data))
}

/// [`crate::gpu::mem_trace`] with the runner's device.
fn trace(runner: &Runner, what: &str) {
    let ctx = match &runner.backend {
        Backend::Gpu(c) => Some(c.as_ref()),
        Backend::Cpu => None,
    };
    crate::gpu::mem_trace(ctx, what);
}

/// Per-node wall seconds of a prepared graph on the GPU (one run with a wait after each
/// node), the inputs handed over (freed once on the device).
fn profile_nodes(runner: &Runner, key: &str, inputs: Vec<Vec<f32>>) -> Result<Vec<f64>> {
    runner
        .profile_nodes(key, inputs)?
        .ok_or_else(|| Error::Invalid(format!("graph '{key}' is not prepared on the GPU")))
}

/// Runs one tile of `b` stage by stage on `runner`'s backend: a warm-up tile (shader JIT,
/// weight uploads, graph preparation), then `iters` timed tiles (mean). The raw and context
/// volumes are random u16 volumes of side `volume` (default: the UNet input size).
pub fn run(
    b: &Bundle,
    runner: &mut Runner,
    batch: usize,
    volume: Option<usize>,
    iters: usize,
) -> Result<StageReport> {
    let with_ctx = b.unet.fusion;
    let [d, h, w] = b.unet.config.input_size;
    let vshape = volume.map_or([d, h, w], |n| [n, n, n]);
    let params = feature_params(b, batch);
    let sched = feature_schedule(b, &runner.backend, batch)?;
    let ((vit, vit_dev), (lift, lift_dev)) = feature_costs(b, &sched)?;
    let (u, udev, _) = unet_costs(b, with_ctx)?;
    let tmp = tempdir()?;
    let raw_path = tmp.join("raw.npy");
    let ctx_path = tmp.join("context.npy");
    let vols = [random_volume(vshape, 1)?, random_volume(vshape, 2)?];
    for (v, p) in vols.iter().zip([&raw_path, &ctx_path]) {
        if let VolumeData::U16(data) = v.data() {
            crate::io::npy::write(p, &vshape, data, true)?;
        }
    }
    let iters = iters.max(1);
    // [features raw: vit, lift, host] [features ctx: …] unet io_read io_write
    let mut acc = [0f64; 9];
    let mut node_secs: Vec<f64> = Vec::new();
    let mut sum_wall = 0.0;
    let mut cpu0 = None;
    let mut peak_rss_timed = false;
    for it in 0..=iters {
        if it == 1 {
            cpu0 = process_cpu_seconds();
            // The warm-up tile's op-by-op profile pass is not part of a real tile.
            peak_rss_timed = reset_peak_rss();
        }
        let t_tile = Instant::now();
        let t0 = Instant::now();
        let raw = Volume::read(&raw_path)?;
        let ctx = if with_ctx {
            Some(Volume::read(&ctx_path)?)
        } else {
            None
        };
        let t_read = t0.elapsed().as_secs_f64();
        runner.take_timings();
        let mut secs = [0f64; 9];
        secs[7] = t_read;
        let mut feats: Vec<Vec<f32>> = Vec::new();
        let (proj, ctx_proj) = b.unet.input_projections()?;
        let projs = std::iter::once(&proj).chain(ctx_proj.as_ref());
        for (k, (v, p)) in std::iter::once(&raw)
            .chain(ctx.as_ref())
            .zip(projs)
            .enumerate()
        {
            let t0 = Instant::now();
            // As `volfuse run` does: the raw features wait in a temporary file while the
            // context's are computed (counted in the context's host preprocessing).
            let mut extract = || extract_features(&b.vit, runner, v, &params, Some(p));
            let f = match feats.first_mut() {
                Some(raw) => crate::graph::Parked::aside(raw, extract)?,
                None => extract()?,
            };
            feats.push(f);
            trace(runner, &format!("tile {it}: features {k} done"));
            let total = t0.elapsed().as_secs_f64();
            let (mut tv, mut tl) = (0.0, 0.0);
            for (key, _, s) in runner.take_timings() {
                if key.starts_with("vit ") {
                    tv += s;
                } else {
                    tl += s;
                }
            }
            secs[3 * k] = tv;
            secs[3 * k + 1] = tl;
            secs[3 * k + 2] = (total - tv - tl).max(0.0);
        }
        let (key2, build) = unet_graph(b, with_ctx);
        let cpu = matches!(runner.backend, Backend::Cpu);
        if it == 0 {
            // Warm-up: one run of the UNet op by op for the stage split (on the CPU in the
            // runner's buffers; on the GPU with a wait after each node), with the features
            // handed over as `volfuse run` hands them (so the process's peak memory is that
            // of a real tile).
            runner.prepare_graph(&key2, build)?;
            let feats = std::mem::take(&mut feats);
            node_secs = if cpu {
                runner.cpu_node_seconds(&key2, feats)?.unwrap_or_default()
            } else {
                profile_nodes(runner, &key2, feats)?
            };
            trace(runner, "tile 0: UNet profiled");
            // A timed tile starts as a real one does (the last tile's stage still held on
            // a hardware GPU, nothing on a software one), and its peak memory is its own.
            runner.evict_all();
            continue;
        }
        let t0 = Instant::now();
        let out = runner.run_owned(&key2, build, std::mem::take(&mut feats))?;
        secs[6] = t0.elapsed().as_secs_f64();
        trace(runner, &format!("tile {it}: UNet done"));
        runner.take_timings();
        let t0 = Instant::now();
        if let (Some(probs), Some(labels)) = (out.get(1), out.get(2)) {
            let k = b.unet.config.num_classes;
            let l8: Vec<u8> = labels.iter().map(|v| *v as u8).collect();
            crate::io::npy::write(&tmp.join("labels.npy"), &[d, h, w], &l8, true)?;
            crate::io::npy::write(&tmp.join("probabilities.npy"), &[k, d, h, w], probs, true)?;
        }
        secs[8] = t0.elapsed().as_secs_f64();
        let wall = t_tile.elapsed().as_secs_f64();
        sum_wall += wall;
        for (a, s) in acc.iter_mut().zip(secs) {
            *a += s / iters as f64;
        }
    }
    let cpu_seconds = match (cpu0, process_cpu_seconds()) {
        (Some(a), Some(b)) => Some((b - a) / iters as f64),
        _ => None,
    };
    let _ = std::fs::remove_dir_all(&tmp);
    // Split the measured UNet time by the profile's shares.
    let (_, _, g) = unet_costs(b, with_ctx)?;
    let parts = unet_parts(&g);
    let mut share = [0f64; 3];
    for (i, p) in parts.iter().enumerate() {
        share[*p as usize] += node_secs.get(i).copied().unwrap_or(0.0);
    }
    let prof_total: f64 = share.iter().sum::<f64>().max(1e-12);
    let unet_t = acc[6];
    let split = |k: usize| Some(unet_t * share[k] / prof_total);
    let mut stages = vec![];
    let names = ["raw", "context"];
    for k in 0..if with_ctx { 2 } else { 1 } {
        stages.push(stage(
            format!("features {}: ViT", names[k]),
            Some(acc[3 * k]),
            vit,
            Some(vit_dev),
        ));
        stages.push(stage(
            format!("features {}: lift + plane mean", names[k]),
            Some(acc[3 * k + 1]),
            lift,
            Some(lift_dev),
        ));
        let mut hs = stage(
            format!("features {}: host preprocessing", names[k]),
            Some(acc[3 * k + 2]),
            Cost::default(),
            None,
        );
        hs.note = "slicing, resize, quantisation, token scatter";
        stages.push(hs);
    }
    let mut body = stage(
        "UNet (without fusion, head)".into(),
        split(0),
        u[0],
        Some(udev),
    );
    body.note = "UNet time split by a per-op profile";
    stages.push(body);
    if with_ctx {
        stages.push(stage("context fusion gates".into(), split(1), u[1], None));
    }
    stages.push(stage("head (softmax, argmax)".into(), split(2), u[2], None));
    let vbytes = (numel(&vshape) * 2) as u64 * if with_ctx { 2 } else { 1 };
    let k = b.unet.config.num_classes as u64;
    let obytes = (d * h * w) as u64 * (1 + 4 * k);
    stages.push(stage(
        "I/O: read volumes (.npy)".into(),
        Some(acc[7]),
        Cost {
            flops: 0,
            bytes: vbytes,
        },
        None,
    ));
    stages.push(stage(
        "I/O: write labels + probabilities".into(),
        Some(acc[8]),
        Cost {
            flops: 0,
            bytes: obytes,
        },
        None,
    ));
    let (act, consts) = runner.device_bytes();
    Ok(StageReport {
        label: format!(
            "{} on {}; volume {:?} u16; {iters} timed tile(s) after a warm-up",
            describe_bundle(b, batch, &sched),
            runner.backend.describe(),
            vshape
        ),
        stages,
        total_seconds: Some(sum_wall / iters as f64),
        device_bytes: match runner.backend {
            Backend::Cpu => None,
            Backend::Gpu(_) => Some(act + consts),
        },
        peak_rss: peak_rss(),
        peak_rss_timed,
        cpu_seconds,
    })
}

fn tempdir() -> Result<std::path::PathBuf> {
    // A counter, not the clock: tests call this concurrently within one process.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "volfuse-bench-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    Ok(dir)
}

/// The arguments of `tools/bench_reference.py` for the same model shape, input and volume.
pub fn reference_args(b: &Bundle, volume: Option<usize>, iters: usize) -> Vec<String> {
    let c = &b.vit.config;
    let u = &b.unet.config;
    let mut a: Vec<String> = vec![
        "--hidden".into(),
        c.hidden_size.to_string(),
        "--layers".into(),
        c.num_hidden_layers.to_string(),
        "--heads".into(),
        c.num_attention_heads.to_string(),
        "--mlp".into(),
        c.intermediate_size.to_string(),
        "--registers".into(),
        c.num_register_tokens.to_string(),
        "--patch".into(),
        c.patch_size.to_string(),
        "--base".into(),
        u.base_channels.to_string(),
        "--input".into(),
        u.input_size[0].to_string(),
        "--slice".into(),
        b.slice_size.to_string(),
        "--classes".into(),
        u.num_classes.to_string(),
        "--volume".into(),
        volume.unwrap_or(u.input_size[0]).to_string(),
        "--iters".into(),
        iters.max(1).to_string(),
    ];
    if c.use_gated_mlp {
        a.push("--gated".into());
    }
    if b.unet.fusion {
        a.push("--context".into());
    }
    if !b.orthogonal_planes {
        a.push("--xy-only".into());
    }
    a
}

/// Runs `tools/bench_reference.py` (the PyTorch CPU pipeline) with the tools venv and
/// returns its JSON line; None when torch is not installed here.
pub fn torch_pipeline(args: &[String]) -> Option<serde_json::Value> {
    crate::bench::tools_python_json("tools/bench_reference.py", args, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(context: bool) -> Bundle {
        let mut spec = RandomSpec::parse("input16,slice32,base4,classes2").expect("spec");
        spec.vit = VitConfig {
            hidden_size: 16,
            intermediate_size: 32,
            num_hidden_layers: 1,
            num_attention_heads: 2,
            num_register_tokens: 4,
            ..Default::default()
        };
        spec.context = context;
        spec.bundle().expect("bundle")
    }

    #[test]
    fn spec_parsing() {
        let s = RandomSpec::parse("vit-l,unet-base16,input32,slice512,noctx,xy,classes5").unwrap();
        assert_eq!(
            (
                s.vit.hidden_size,
                s.base_channels,
                s.input,
                s.slice,
                s.classes
            ),
            (1024, 16, 32, 512, 5)
        );
        assert!(!s.context && !s.orthogonal_planes);
        assert!(RandomSpec::parse("input30").is_err());
        assert!(RandomSpec::parse("slice100").is_err());
        assert!(RandomSpec::parse("bogus").is_err());
        assert!(RandomSpec::parse("basex").is_err());
        assert!(load_model("random:vit-q").is_err());
    }

    #[test]
    fn stage_costs_add_up_to_the_graphs() {
        let b = tiny(true);
        let rep = costs(&b, &Backend::Cpu, 8).unwrap();
        let (_, build) = unet_graph(&b, true);
        let g = build().unwrap();
        let unet: u64 = rep
            .stages
            .iter()
            .filter(|s| !s.name.starts_with("features"))
            .map(|s| s.cost.flops)
            .sum();
        assert_eq!(unet, g.flops());
        let fusion = rep
            .stages
            .iter()
            .find(|s| s.name.contains("fusion"))
            .unwrap();
        assert!(fusion.cost.flops > 0);
        // Without context: same body, no fusion row, and the body's flops are unchanged.
        let b2 = tiny(false);
        let rep2 = costs(&b2, &Backend::Cpu, 8).unwrap();
        assert!(rep2
            .stages
            .iter()
            .all(|s| s.name != "context fusion gates" && !s.name.starts_with("features context")));
        let body = |r: &StageReport| {
            r.stages
                .iter()
                .find(|s| s.name.starts_with("UNet"))
                .unwrap()
                .cost
        };
        assert_eq!(body(&rep).flops, body(&rep2).flops);
        // ViT: 3 planes × 16 slices, batch 8 → 6 runs of a batch-8 graph.
        let vg = b.vit.graph(8, 32, 32).unwrap();
        let vit = rep
            .stages
            .iter()
            .find(|s| s.name == "features raw: ViT")
            .unwrap();
        assert_eq!(vit.cost.flops, vg.flops() * 6);
    }

    #[test]
    fn stage_run_on_the_cpu_reference() {
        let b = tiny(true);
        let mut runner = Runner::new(Backend::Cpu);
        let rep = run(&b, &mut runner, 8, Some(20), 1).unwrap();
        let text = rep.to_string();
        for s in &rep.stages {
            assert!(
                s.seconds.is_some_and(|t| t >= 0.0),
                "{}: {:?}",
                s.name,
                s.seconds
            );
        }
        let vit = rep
            .stages
            .iter()
            .find(|s| s.name == "features context: ViT")
            .unwrap();
        assert!(vit.seconds.unwrap() > 0.0);
        let total = rep.total_seconds.unwrap();
        let sum: f64 = rep.stages.iter().filter_map(|s| s.seconds).sum();
        assert!(sum <= total * 1.05 + 1e-3, "{sum} vs {total}\n{text}");
        assert!(text.contains("context fusion gates"), "{text}");
        assert!(rep.cpu_seconds.is_some_and(|c| c >= 0.0), "{text}");
    }

    #[test]
    fn stage_run_on_the_gpu_splits_the_unet_by_its_profile() {
        let ctx = crate::gpu::GpuContext::new(&crate::gpu::GpuOptions::from_env().unwrap())
            .expect("a GPU adapter (install mesa-vulkan-drivers)");
        let b = tiny(true);
        let mut runner = Runner::new(Backend::Gpu(std::sync::Arc::new(ctx)));
        let rep = run(&b, &mut runner, 16, None, 1).unwrap();
        let text = rep.to_string();
        let get = |n: &str| {
            rep.stages
                .iter()
                .find(|s| s.name == n)
                .and_then(|s| s.seconds)
        };
        // The per-node profile attributed time to both the body and the fusion branch.
        assert!(
            get("UNet (without fusion, head)").is_some_and(|t| t > 0.0),
            "{text}"
        );
        assert!(
            get("context fusion gates").is_some_and(|t| t > 0.0),
            "{text}"
        );
        assert!(rep.device_bytes.is_some_and(|d| d > 0), "{text}");
        assert!(text.contains(&runner.backend.describe()));
    }
}
