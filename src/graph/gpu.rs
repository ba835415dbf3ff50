//! Runs a planned graph on a wgpu device: buffers allocated once per plan, constants
//! uploaded once per [`ConstCache`], dispatches (pipelines + bind groups) built once and
//! replayed on every run, recorded into a few command buffers submitted in batches.

use super::{Constant, Graph, Plan, Source};
use crate::error::{Error, Result};
use crate::gpu::{Dispatch, GpuContext, Precision};
use crate::ops::matmul::Matmul;
use crate::ops::numel;
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

/// Device copies of constants, keyed by the host `Arc` they came from: weights shared by
/// several graphs (tile shapes, batch sizes) are uploaded once.
#[derive(Default)]
pub struct ConstCache {
    map: HashMap<usize, (Arc<Constant>, Arc<wgpu::Buffer>)>,
    /// f16 copies (precision f16); None when a value does not fit f16.
    map16: HashMap<usize, (Arc<Constant>, Option<Arc<wgpu::Buffer>>)>,
    /// Bytes uploaded since the queue's staging copies were last flushed.
    staged: u64,
}

impl ConstCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// After an upload of `bytes`: once more than [`crate::gpu::WRITE_PIECE_BYTES`] are
    /// staged, submits and waits, so the queue's staging copies of a model's weights (each
    /// upload stages its data until the next submission completes) never hold more than
    /// about one piece beside the device copies.
    fn staged(&mut self, ctx: &GpuContext, bytes: u64) -> Result<()> {
        self.staged += bytes;
        if self.staged > crate::gpu::WRITE_PIECE_BYTES {
            self.staged = 0;
            ctx.queue.submit([]);
            ctx.wait()?;
        }
        Ok(())
    }

    fn get(
        &mut self,
        ctx: &GpuContext,
        data: &Arc<Constant>,
        shape: &[usize],
    ) -> Result<Arc<wgpu::Buffer>> {
        let key = Arc::as_ptr(data) as usize;
        if let Some((_, b)) = self.map.get(&key) {
            return Ok(b.clone());
        }
        let t = ctx.upload(&data.values()?, shape)?;
        self.staged(ctx, t.buffer.size())?;
        self.map.insert(key, (data.clone(), t.buffer.clone()));
        Ok(t.buffer)
    }

    /// The constant stored as f16 pairs ([`crate::gpu::pack_f16`]), uploaded once; None when
    /// a value is not finite or outside f16's range (e.g. a bf16 weight), so it stays f32.
    fn get_f16(
        &mut self,
        ctx: &GpuContext,
        data: &Arc<Constant>,
        shape: &[usize],
    ) -> Result<Option<Arc<wgpu::Buffer>>> {
        let key = Arc::as_ptr(data) as usize;
        if let Some((_, b)) = self.map16.get(&key) {
            return Ok(b.clone());
        }
        let values = data.values()?;
        let fits = values
            .iter()
            .all(|v| v.is_finite() && v.abs() <= f32::from(half::f16::MAX));
        let b = if fits {
            let b = ctx.upload_f16(&values, shape)?.buffer;
            self.staged(ctx, b.size())?;
            Some(b)
        } else {
            None
        };
        self.map16.insert(key, (data.clone(), b.clone()));
        Ok(b)
    }

    /// Frees the device copies no executor holds any more (each [`GpuExecutor`] keeps a
    /// reference to the constants it binds), e.g. after a runner dropped a stage's executors.
    pub fn release_unused(&mut self) {
        self.map.retain(|_, (_, b)| Arc::strong_count(b) > 1);
        self.map16
            .retain(|_, (_, b)| b.as_ref().is_some_and(|b| Arc::strong_count(b) > 1));
    }

    /// Bytes held on the device.
    pub fn bytes(&self) -> u64 {
        self.map.values().map(|(_, b)| b.size()).sum::<u64>()
            + self
                .map16
                .values()
                .filter_map(|(_, b)| b.as_ref().map(|b| b.size()))
                .sum::<u64>()
    }
}

/// Where a graph input comes from when the outputs stay on the device
/// ([`GpuExecutor::submit_inputs`]).
#[derive(Clone, Copy, Debug)]
pub enum GraphInput<'a> {
    /// f32 values on the host, written into the input's buffer through the queue.
    Host(&'a [f32]),
    /// f32 values already on the device, copied buffer to buffer (no host round trip).
    /// The buffer needs `COPY_SRC` usage and at least the input's size in bytes.
    Device(&'a wgpu::Buffer),
}

/// How an executor chooses kernel variants.
enum Tuning<'a> {
    /// Every op's default.
    Off,
    /// The process-wide autotune cache (saved when something is timed).
    Global,
    /// A caller's cache (tests, benches).
    Cache(&'a mut crate::autotune::TuneCache),
}

impl Tuning<'_> {
    fn from_ctx(ctx: &GpuContext) -> Self {
        if ctx.autotune && crate::autotune::enabled() {
            Tuning::Global
        } else {
            Tuning::Off
        }
    }
}

/// A graph ready to run on a device.
pub struct GpuExecutor {
    slots: Vec<Arc<wgpu::Buffer>>,
    /// The constants (weights) this executor binds, shared with the [`ConstCache`]: while
    /// the executor lives, [`ConstCache::release_unused`] keeps them.
    _consts: Vec<Arc<wgpu::Buffer>>,
    /// Bytes of the scratch buffers of nodes run in depth slabs (0 when none).
    pub scratch_bytes: u64,
    dispatches: Vec<Dispatch>,
    /// The node each dispatch belongs to (for profiles).
    owner: Vec<usize>,
    inputs: Vec<(usize, usize)>,  // (slot, numel)
    outputs: Vec<(usize, usize)>, // (slot, numel)
    /// Dispatches recorded per command buffer.
    pub batch: usize,
}

impl GpuExecutor {
    /// Allocates the plan's buffers and builds every dispatch. With `ctx.autotune` on,
    /// kernel variants come from the process-wide autotune cache (timed on first use); with
    /// `ctx.precision` f16, matmul weights are stored as f16.
    pub fn new(ctx: &GpuContext, g: &Graph, plan: &Plan, consts: &mut ConstCache) -> Result<Self> {
        Self::build(ctx, g, plan, consts, Tuning::from_ctx(ctx), ctx.precision)
    }

    /// [`GpuExecutor::new`] with variants chosen through `cache` (None: every op's default
    /// kernel) and weights stored at `precision`, whatever the context says. Nothing is
    /// saved.
    pub fn with_tuning(
        ctx: &GpuContext,
        g: &Graph,
        plan: &Plan,
        consts: &mut ConstCache,
        cache: Option<&mut crate::autotune::TuneCache>,
        precision: Precision,
    ) -> Result<Self> {
        let t = match cache {
            Some(c) => Tuning::Cache(c),
            None => Tuning::Off,
        };
        Self::build(ctx, g, plan, consts, t, precision)
    }

    /// The kernel (entry point) of every dispatch, in order.
    pub fn kernel_names(&self) -> Vec<&'static str> {
        self.dispatches.iter().map(|d| d.name).collect()
    }

    fn build(
        ctx: &GpuContext,
        g: &Graph,
        plan: &Plan,
        consts: &mut ConstCache,
        mut tuning: Tuning<'_>,
        precision: Precision,
    ) -> Result<Self> {
        let slots = plan
            .slot_bytes
            .iter()
            .enumerate()
            .map(|(i, b)| super::split::slot_buffer(ctx, &format!("slot {i}"), *b).map(Arc::new))
            .collect::<Result<Vec<_>>>()?;
        // f16 weights first (precision f16): the B of a matmul that is a constant fitting
        // f16. A constant used only that way is never uploaded as f32.
        let mut w16_of: Vec<Option<Arc<wgpu::Buffer>>> = vec![None; g.nodes.len()];
        let mut f32_uses = vec![0usize; g.values.len()];
        for (i, n) in g.nodes.iter().enumerate() {
            for (pos, v) in n.inputs.iter().enumerate() {
                if pos == 1 && precision.f16_weights() {
                    let mm = n.op.as_any().and_then(|a| a.downcast_ref::<Matmul>());
                    if let (Some(m), Source::Const(c)) = (mm, &g.values[v.0].source) {
                        if !m.w_f16 {
                            w16_of[i] = consts.get_f16(ctx, c, &g.values[v.0].shape)?;
                            if w16_of[i].is_some() {
                                continue;
                            }
                        }
                    }
                }
                f32_uses[v.0] += 1;
            }
        }
        for v in &g.outputs {
            f32_uses[v.0] += 1;
        }
        let mut value_buf: Vec<Option<Arc<wgpu::Buffer>>> = vec![None; g.values.len()];
        for (i, v) in g.values.iter().enumerate() {
            value_buf[i] = match &v.source {
                Source::Const(c) if f32_uses[i] > 0 => Some(consts.get(ctx, c, &v.shape)?),
                Source::Const(_) => None,
                _ => plan.slot_of[i].map(|s| slots[s].clone()),
            };
        }
        let mut used_consts: Vec<Arc<wgpu::Buffer>> = g
            .values
            .iter()
            .zip(&value_buf)
            .filter(|(v, _)| matches!(v.source, Source::Const(_)))
            .filter_map(|(_, b)| b.clone())
            .collect();
        used_consts.extend(w16_of.iter().flatten().cloned());
        // Nodes whose tensors exceed one binding run in depth slabs (graph::split).
        let splits = super::split::plan_graph(ctx, g, &value_buf)?;
        let scratch = super::split::Scratch::new(ctx, &splits)?;
        let mut dispatches = Vec::new();
        let mut owner = Vec::new();
        // At most twice: when a scratch texture was replaced by a larger one of its slot
        // while building (GpuContext::scratch_texture), build again so that every kernel
        // of the graph shares the larger one and the smaller ones can be freed.
        for _attempt in 0..2 {
            let generation = ctx.texture_generation();
            dispatches.clear();
            owner.clear();
            for (i, n) in g.nodes.iter().enumerate() {
                let w16 = w16_of[i].clone();
                let mut bufs: Vec<&wgpu::Buffer> = n
                    .inputs
                    .iter()
                    .enumerate()
                    .map(|(pos, v)| match (&w16, pos) {
                        (Some(b), 1) => b.as_ref(),
                        _ => value_buf[v.0].as_deref().expect("every value has a buffer"),
                    })
                    .collect();
                let shapes: Vec<&[usize]> = n
                    .inputs
                    .iter()
                    .map(|v| g.values[v.0].shape.as_slice())
                    .collect();
                let out = value_buf[n.output.0]
                    .as_deref()
                    .expect("op outputs have slots");
                // Variant choice: f16 weights and the tuned kernel of a matmul.
                let mut variant: Option<Matmul> = None;
                if let Some(mm) = n.op.as_any().and_then(|a| a.downcast_ref::<Matmul>()) {
                    let mut m = *mm;
                    if let Some(b) = &w16 {
                        m.w_f16 = true;
                        bufs[1] = b.as_ref();
                    }
                    let owned: Vec<Vec<usize>> = shapes.iter().map(|s| s.to_vec()).collect();
                    m = match &mut tuning {
                        Tuning::Off => m,
                        Tuning::Global => {
                            crate::autotune::matmul_for_graph_global(ctx, &m, &owned)?
                        }
                        Tuning::Cache(c) => crate::autotune::matmul_for_graph(ctx, c, &m, &owned)?,
                    };
                    variant = Some(m);
                }
                let op: &dyn crate::ops::Op = match &variant {
                    Some(m) => m,
                    None => n.op.as_ref(),
                };
                let ds = match &splits[i] {
                    Some(split) => {
                        let out_shape = &g.values[n.output.0].shape;
                        super::split::dispatches(
                            ctx, op, split, &bufs, &shapes, out, out_shape, &scratch,
                        )?
                    }
                    None => op.gpu(ctx, &bufs, &shapes, out)?,
                };
                owner.extend(std::iter::repeat_n(i, ds.len()));
                dispatches.extend(ds);
            }
            if ctx.texture_generation() == generation {
                break;
            }
        }
        let io = |vs: &[super::Value]| -> Vec<(usize, usize)> {
            vs.iter()
                .map(|v| {
                    (
                        plan.slot_of[v.0].unwrap_or(usize::MAX),
                        numel(&g.values[v.0].shape),
                    )
                })
                .collect()
        };
        Ok(GpuExecutor {
            slots,
            _consts: used_consts,
            scratch_bytes: scratch.bytes(),
            dispatches,
            owner,
            inputs: io(&g.inputs),
            outputs: io(&g.outputs),
            batch: 64,
        })
    }

    /// Number of kernel launches per run.
    pub fn dispatch_count(&self) -> usize {
        self.dispatches.len()
    }

    /// Splits the dispatches into command buffers of about `batch` each. A split never
    /// falls between a kernel that fills a scratch texture and the dispatches after it that
    /// read the same texture (same pipeline, no copies of their own): another thread's
    /// submission could refill the texture in between.
    fn chunks(&self) -> Vec<&[Dispatch]> {
        let d = &self.dispatches;
        let mut out = Vec::new();
        let mut start = 0;
        for i in 1..d.len() {
            let safe = !d[i].copies.is_empty() || !Arc::ptr_eq(&d[i].pipeline, &d[i - 1].pipeline);
            if i - start >= self.batch.max(1) && safe {
                out.push(&d[start..i]);
                start = i;
            }
        }
        if start < d.len() {
            out.push(&d[start..]);
        }
        out
    }

    /// Records and submits all dispatches (inputs already written). Does not wait.
    pub fn submit(&self, ctx: &GpuContext) {
        for chunk in self.chunks() {
            let mut enc = ctx
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("graph"),
                });
            crate::gpu::record_all(&mut enc, chunk);
            ctx.queue.submit([enc.finish()]);
        }
    }

    /// Writes `inputs`, runs the graph and reads the outputs back.
    pub fn run(&self, ctx: &GpuContext, g: &Graph, inputs: &[&[f32]]) -> Result<Vec<Vec<f32>>> {
        g.check_inputs(inputs)?;
        for ((slot, _), d) in self.inputs.iter().zip(inputs) {
            ctx.write_bounded(&self.slots[*slot], d)?;
        }
        self.submit(ctx);
        self.read_outputs(ctx)
    }

    /// As [`GpuExecutor::run`], taking the inputs by value: each host copy is freed as soon
    /// as it is on the device, before the graph runs (a UNet's feature volumes need not stay
    /// on the host beside its activations).
    pub fn run_owned(
        &self,
        ctx: &GpuContext,
        g: &Graph,
        inputs: Vec<Vec<f32>>,
    ) -> Result<Vec<Vec<f32>>> {
        {
            let data: Vec<&[f32]> = inputs.iter().map(|d| d.as_slice()).collect();
            g.check_inputs(&data)?;
        }
        for ((slot, _), d) in self.inputs.iter().zip(inputs) {
            ctx.write_bounded(&self.slots[*slot], &d)?;
        }
        self.submit(ctx);
        self.read_outputs(ctx)
    }

    fn read_outputs(&self, ctx: &GpuContext) -> Result<Vec<Vec<f32>>> {
        self.outputs
            .iter()
            .map(|(slot, n)| ctx.read_buffer(&self.slots[*slot], *n))
            .collect()
    }

    /// Runs once more with a wait after every node and returns the wall time per op name
    /// (sorted, slowest first) — a coarse profile that works on every adapter.
    pub fn profile(
        &self,
        ctx: &GpuContext,
        g: &Graph,
        inputs: &[&[f32]],
    ) -> Result<Vec<(String, f64, u64)>> {
        let mut secs = Vec::new();
        let inputs = inputs.iter().map(|d| Cow::Borrowed(*d)).collect();
        self.run_timed(ctx, g, inputs, |node, t| secs.push((node, t)))?;
        Ok(g.profile_by_op(secs))
    }

    /// Runs once more with a wait after every node; returns the wall seconds of each node
    /// (nodes in graph order; 0 for nodes without dispatches). The inputs are handed over
    /// and freed once on the device, as [`GpuExecutor::run_owned`] does.
    pub fn profile_nodes(
        &self,
        ctx: &GpuContext,
        g: &Graph,
        inputs: Vec<Vec<f32>>,
    ) -> Result<Vec<f64>> {
        let mut secs = vec![0f64; g.nodes.len()];
        let inputs = inputs.into_iter().map(Cow::Owned).collect();
        self.run_timed(ctx, g, inputs, |node, s| secs[node] += s)?;
        Ok(secs)
    }

    /// Writes the inputs, then runs the dispatches node by node with a wait after each
    /// node's run of dispatches, calling `timed(node, wall seconds)` for each such run.
    fn run_timed(
        &self,
        ctx: &GpuContext,
        g: &Graph,
        inputs: Vec<Cow<'_, [f32]>>,
        mut timed: impl FnMut(usize, f64),
    ) -> Result<()> {
        {
            let data: Vec<&[f32]> = inputs.iter().map(|d| &d[..]).collect();
            g.check_inputs(&data)?;
        }
        for ((slot, _), d) in self.inputs.iter().zip(inputs) {
            ctx.write_bounded(&self.slots[*slot], &d)?;
        }
        ctx.wait()?;
        let mut i = 0;
        while i < self.dispatches.len() {
            let node = self.owner[i];
            let j = self.owner[i..]
                .iter()
                .position(|o| *o != node)
                .map(|p| i + p)
                .unwrap_or(self.owner.len());
            let t0 = std::time::Instant::now();
            ctx.run(&self.dispatches[i..j])?;
            timed(node, t0.elapsed().as_secs_f64());
            i = j;
        }
        Ok(())
    }

    /// The device buffer holding output `i` after a run (valid until the next run).
    pub fn output_buffer(&self, i: usize) -> Option<&wgpu::Buffer> {
        self.outputs
            .get(i)
            .and_then(|(s, _)| self.slots.get(*s))
            .map(|b| b.as_ref())
    }

    /// The device buffer for input `i` (write it, then [`GpuExecutor::submit`]).
    pub fn input_buffer(&self, i: usize) -> Option<&wgpu::Buffer> {
        self.inputs
            .get(i)
            .and_then(|(s, _)| self.slots.get(*s))
            .map(|b| b.as_ref())
    }

    /// Writes or copies `inputs` into the input buffers and submits the graph, without
    /// waiting and without reading anything back: the outputs stay in
    /// [`GpuExecutor::output_buffer`] until the next run, and anything submitted to the
    /// queue afterwards sees them.
    pub fn submit_inputs(
        &self,
        ctx: &GpuContext,
        g: &Graph,
        inputs: &[GraphInput<'_>],
    ) -> Result<()> {
        if inputs.len() != self.inputs.len() {
            return Err(Error::Invalid(format!(
                "the graph has {} inputs but {} were given",
                self.inputs.len(),
                inputs.len()
            )));
        }
        let mut copies = Vec::new();
        for (i, ((slot, n), input)) in self.inputs.iter().zip(inputs).enumerate() {
            let bytes = (*n * 4) as u64;
            let name = &g.values[g.inputs[i].0].name;
            match input {
                GraphInput::Host(d) => {
                    if d.len() != *n {
                        return Err(Error::shape(
                            "graph input",
                            format!("'{name}' holds {n} values but {} were given", d.len()),
                        ));
                    }
                    ctx.write_bounded(&self.slots[*slot], d)?;
                }
                GraphInput::Device(b) => {
                    if b.size() < bytes {
                        return Err(Error::shape(
                            "graph input",
                            format!(
                                "'{name}' needs {bytes} bytes but its device buffer holds {}",
                                b.size()
                            ),
                        ));
                    }
                    if !b.usage().contains(wgpu::BufferUsages::COPY_SRC) {
                        return Err(Error::Invalid(format!(
                            "the device buffer for graph input '{name}' lacks COPY_SRC usage.\n  fix: create it with wgpu::BufferUsages::COPY_SRC"
                        )));
                    }
                    copies.push((*b, *slot, bytes));
                }
            }
        }
        if !copies.is_empty() {
            let mut enc = ctx
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("graph inputs"),
                });
            for (b, slot, bytes) in copies {
                if bytes > 0 {
                    enc.copy_buffer_to_buffer(b, 0, &self.slots[slot], 0, bytes);
                }
            }
            ctx.queue.submit([enc.finish()]);
        }
        self.submit(ctx);
        Ok(())
    }

    /// The number of f32 values of output `i`.
    pub fn output_len(&self, i: usize) -> Option<usize> {
        self.outputs.get(i).map(|(_, n)| *n)
    }
}
