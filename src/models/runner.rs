//! Runs graphs on a backend, caching one planned graph (and its GPU executor) per input
//! shape, with weights uploaded once.

use crate::error::{Error, Result};
use crate::gpu::GpuContext;
use crate::graph::{ConstCache, CpuExecutor, CpuSlots, GpuExecutor, Graph, GraphInput, Plan};
use std::collections::HashMap;
use std::sync::Arc;

/// Where graphs run.
#[derive(Clone)]
pub enum Backend {
    /// The CPU reference ops.
    Cpu,
    /// wgpu kernels on a device.
    Gpu(Arc<GpuContext>),
}

impl Backend {
    /// The largest single buffer this backend can bind (unbounded on the CPU).
    pub fn max_binding(&self) -> u64 {
        match self {
            Backend::Cpu => u64::MAX,
            Backend::Gpu(ctx) => ctx.caps.max_binding,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Backend::Cpu => "CPU reference".to_string(),
            Backend::Gpu(ctx) => ctx.describe(),
        }
    }
}

/// Graph inputs, lent or handed over.
enum Inputs<'a> {
    Borrowed(&'a [&'a [f32]]),
    Owned(Vec<Vec<f32>>),
}

struct Prepared {
    graph: Graph,
    plan: Plan,
    exe: Option<GpuExecutor>,
    /// The CPU backend's buffers, reused by every run.
    cpu: std::sync::Mutex<CpuSlots>,
    /// For a graph run with [`Runner::run_beside`]: the graph it was last run beside (its
    /// executor survives that graph's runs).
    beside_of: Option<String>,
}

/// A backend plus the graphs prepared on it, keyed by a caller-chosen string (e.g. the
/// input shape).
pub struct Runner {
    pub backend: Backend,
    consts: ConstCache,
    prepared: HashMap<String, Prepared>,
    /// Runs and wall seconds per key since the last [`Runner::take_timings`] (benchmarks).
    timings: HashMap<String, (usize, f64)>,
    /// The last graph run with [`Runner::run`] / [`Runner::run_owned`].
    last_main: Option<String>,
    /// See [`Runner::set_keep_all`].
    keep_all: bool,
}

impl Runner {
    pub fn new(backend: Backend) -> Self {
        // Stages take turns on software adapters, whose "device" memory is the host RAM
        // the whole process competes for; a real GPU keeps every stage's weights resident
        // (uploaded once per run, not once per tile).
        let keep_all = match &backend {
            Backend::Gpu(ctx) => !ctx.caps.cpu_like,
            Backend::Cpu => false,
        };
        Runner {
            backend,
            consts: ConstCache::new(),
            prepared: HashMap::new(),
            timings: HashMap::new(),
            last_main: None,
            keep_all,
        }
    }

    /// On the GPU backend, whether every prepared graph keeps its executor (activation
    /// buffers, bind groups) and weights on the device between runs. On by default on
    /// hardware adapters; off on CPU-like ones (lavapipe), where a run
    /// of one graph first frees the executors of the others — except graphs run beside it
    /// ([`Runner::run_beside`]) — with their weights and scratch textures, so device memory
    /// (host RAM on a software adapter) holds one stage at a time (the ViT, then the UNet),
    /// not all of them. A freed executor is rebuilt on its graph's next run from the cached
    /// pipelines: buffers, bind groups and a weight upload, a few ms for a ViT.
    pub fn set_keep_all(&mut self, keep: bool) {
        self.keep_all = keep;
    }

    /// On a CPU-like GPU (see [`Runner::set_keep_all`]): frees every graph's executor,
    /// weights and scratch textures (all rebuilt on the next run). Nothing otherwise.
    pub fn evict_all(&mut self) {
        self.evict_others("");
        self.last_main = None;
    }

    /// On the GPU: frees the executors of all graphs but `key` and those run beside it,
    /// then the weights and scratch textures nothing uses any more.
    fn evict_others(&mut self, key: &str) {
        let Backend::Gpu(ctx) = &self.backend else {
            return;
        };
        if self.keep_all {
            return;
        }
        let mut freed = false;
        for (k, p) in self.prepared.iter_mut() {
            if k != key && p.beside_of.as_deref() != Some(key) && p.exe.is_some() {
                p.exe = None;
                freed = true;
            }
        }
        if freed {
            self.consts.release_unused();
            ctx.release_scratch_textures();
            // (compiled pipelines stay: compiling the ViT's and the UNet's again cost
            // 2.3 s per tile on lavapipe; the ViT's ~40 MiB held through the UNet stage
            // make that stage the tile's peak, docs/memory.md)
            // wgpu destroys dropped buffers and textures only once the device is polled
            // after their last submission: wait here, so the next stage's buffers do not
            // coexist with this one's (both would count in a software adapter's host RAM).
            if let Err(e) = ctx.wait() {
                log::warn!("waiting for freed device memory: {e}");
            }
            GpuContext::trim_host_heap();
        }
    }

    /// Builds and plans the graph stored under `key` with `build` (and its GPU executor on
    /// the GPU backend) unless it is prepared already.
    fn prepare(&mut self, key: &str, build: impl FnOnce() -> Result<Graph>) -> Result<()> {
        if let (Some(p), Backend::Gpu(ctx)) = (self.prepared.get_mut(key), &self.backend) {
            // Freed by `evict_others`: rebuilt (pipelines are cached by the context).
            if p.exe.is_none() {
                p.exe = Some(GpuExecutor::new(ctx, &p.graph, &p.plan, &mut self.consts)?);
            }
        }
        if !self.prepared.contains_key(key) {
            let graph = build()?;
            let plan = graph.plan(true);
            let exe = match &self.backend {
                Backend::Cpu => None,
                Backend::Gpu(ctx) => {
                    let exe = GpuExecutor::new(ctx, &graph, &plan, &mut self.consts)?;
                    // The weights are on the device now: their host copies go to the spill
                    // file (read back only to upload them again after an eviction).
                    if let Err(e) = graph.spill_constants() {
                        log::warn!("weights stay in host memory: {e}");
                    }
                    Some(exe)
                }
            };
            self.prepared.insert(
                key.to_string(),
                Prepared {
                    graph,
                    plan,
                    exe,
                    cpu: Default::default(),
                    beside_of: None,
                },
            );
        }
        Ok(())
    }

    /// Runs the graph stored under `key`, building it with `build` on first use.
    pub fn run(
        &mut self,
        key: &str,
        build: impl FnOnce() -> Result<Graph>,
        inputs: &[&[f32]],
    ) -> Result<Vec<Vec<f32>>> {
        self.run_impl(key, build, Inputs::Borrowed(inputs), false)
    }

    /// As [`Runner::run`], taking the inputs by value: on the CPU each is freed after its
    /// last reader in the graph, on the GPU once it is on the device (a UNet's feature
    /// volumes need not stay alive beside its decoder's activations).
    pub fn run_owned(
        &mut self,
        key: &str,
        build: impl FnOnce() -> Result<Graph>,
        inputs: Vec<Vec<f32>>,
    ) -> Result<Vec<Vec<f32>>> {
        self.run_impl(key, build, Inputs::Owned(inputs), false)
    }

    /// As [`Runner::run`], for a small graph run between runs of a large one (the token
    /// lift between ViT batches): on the CPU the other graphs keep their buffers, so the
    /// large one does not allocate (and page-fault) them again on its next run.
    pub fn run_beside(
        &mut self,
        key: &str,
        build: impl FnOnce() -> Result<Graph>,
        inputs: &[&[f32]],
    ) -> Result<Vec<Vec<f32>>> {
        self.run_impl(key, build, Inputs::Borrowed(inputs), true)
    }

    fn run_impl(
        &mut self,
        key: &str,
        build: impl FnOnce() -> Result<Graph>,
        inputs: Inputs<'_>,
        keep_others: bool,
    ) -> Result<Vec<Vec<f32>>> {
        if !keep_others {
            self.evict_others(key);
            self.last_main = Some(key.to_string());
        }
        self.prepare(key, build)?;
        if keep_others {
            if let Some(p) = self.prepared.get_mut(key) {
                p.beside_of = self.last_main.clone();
            }
        }
        if matches!(self.backend, Backend::Cpu) && !keep_others {
            // Only the graph being run keeps CPU buffers: repeated runs reuse them, and
            // memory stays that of one graph.
            for (k, p) in self.prepared.iter_mut() {
                if k != key {
                    *p.cpu.get_mut().unwrap_or_else(|e| e.into_inner()) = CpuSlots::default();
                }
            }
        }
        let p = &self.prepared[key];
        let t0 = std::time::Instant::now();
        let out = match (&self.backend, &p.exe) {
            (Backend::Gpu(ctx), Some(exe)) => match inputs {
                Inputs::Owned(d) => exe.run_owned(ctx, &p.graph, d),
                Inputs::Borrowed(d) => exe.run(ctx, &p.graph, d),
            },
            _ => {
                let mut slots = p.cpu.lock().unwrap_or_else(|e| e.into_inner());
                match inputs {
                    Inputs::Borrowed(d) => CpuExecutor::run_with(&p.graph, &p.plan, d, &mut slots),
                    Inputs::Owned(d) => CpuExecutor::run_owned(&p.graph, &p.plan, d, &mut slots),
                }
            }
        };
        if let (Backend::Gpu(ctx), true) = (&self.backend, crate::gpu::mem_trace_on()) {
            let host: u64 = self
                .prepared
                .values()
                .map(|p| p.graph.constant_bytes_on_host())
                .sum();
            let what = format!(
                "{key} (weights on the host {:.1} MiB)",
                host as f64 / 1048576.0
            );
            crate::gpu::mem_trace(Some(ctx), &what);
        }
        let e = self.timings.entry(key.to_string()).or_default();
        e.0 += 1;
        e.1 += t0.elapsed().as_secs_f64();
        out
    }

    /// Builds and plans the graph stored under `key` with `build` unless it is prepared
    /// already (its GPU executor too), without running it.
    pub fn prepare_graph(
        &mut self,
        key: &str,
        build: impl FnOnce() -> Result<Graph>,
    ) -> Result<()> {
        if matches!(self.backend, Backend::Gpu(_)) {
            self.evict_others(key);
            self.last_main = Some(key.to_string());
        }
        self.prepare(key, build)
    }

    /// Frees the CPU buffers of every prepared graph (they are allocated again on the next
    /// run). Nothing to do on the GPU backend.
    pub fn release_cpu_buffers(&mut self) {
        for p in self.prepared.values_mut() {
            *p.cpu.get_mut().unwrap_or_else(|e| e.into_inner()) = CpuSlots::default();
        }
    }

    /// On the CPU backend: runs the prepared graph `key` once with the inputs handed over
    /// (as [`Runner::run_owned`]; the other graphs' buffers are freed first) and returns
    /// the wall seconds of every node. None for an unknown key or the GPU backend.
    pub fn cpu_node_seconds(
        &mut self,
        key: &str,
        inputs: Vec<Vec<f32>>,
    ) -> Result<Option<Vec<f64>>> {
        if !matches!(self.backend, Backend::Cpu) || !self.prepared.contains_key(key) {
            return Ok(None);
        }
        self.release_cpu_buffers();
        let p = &self.prepared[key];
        let mut slots = p.cpu.lock().unwrap_or_else(|e| e.into_inner());
        CpuExecutor::node_seconds(&p.graph, &p.plan, inputs, &mut slots).map(Some)
    }

    /// (key, runs, wall seconds incl. uploads and read-back) of every [`Runner::run`] since
    /// the last call; clears them.
    pub fn take_timings(&mut self) -> Vec<(String, usize, f64)> {
        let mut v: Vec<_> = self.timings.drain().map(|(k, (n, s))| (k, n, s)).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// The graph and plan prepared under `key`.
    pub fn prepared(&self, key: &str) -> Option<(&Graph, &Plan)> {
        self.prepared.get(key).map(|p| (&p.graph, &p.plan))
    }

    /// Keys of the prepared graphs.
    pub fn keys(&self) -> Vec<String> {
        let mut v: Vec<String> = self.prepared.keys().cloned().collect();
        v.sort();
        v
    }

    /// Bytes of the device buffers this runner holds: (activations of every prepared graph,
    /// uploaded constants). Both 0 on the CPU backend.
    pub fn device_bytes(&self) -> (u64, u64) {
        match self.backend {
            Backend::Cpu => (0, 0),
            Backend::Gpu(_) => (
                self.prepared
                    .values()
                    .filter(|p| p.exe.is_some())
                    .map(|p| p.plan.peak_bytes)
                    .sum(),
                self.consts.bytes(),
            ),
        }
    }

    /// Wall seconds of every node of a prepared graph, from one run with a wait after each
    /// node (GPU), the inputs handed over. None for an unknown key or the CPU backend.
    pub fn profile_nodes(&self, key: &str, inputs: Vec<Vec<f32>>) -> Result<Option<Vec<f64>>> {
        match (&self.backend, self.prepared.get(key)) {
            (
                Backend::Gpu(ctx),
                Some(Prepared {
                    graph,
                    exe: Some(exe),
                    ..
                }),
            ) => exe.profile_nodes(ctx, graph, inputs).map(Some),
            _ => Ok(None),
        }
    }

    /// Runs the graph stored under `key` (built with `build` on first use) on the GPU and
    /// leaves its outputs on the device: returns the executor, whose
    /// [`GpuExecutor::output_buffer`]s hold them until the next run of this graph. Nothing
    /// is waited for or read back. An error on the CPU backend.
    pub fn run_on_device(
        &mut self,
        key: &str,
        build: impl FnOnce() -> Result<Graph>,
        inputs: &[GraphInput<'_>],
    ) -> Result<&GpuExecutor> {
        let ctx = match &self.backend {
            Backend::Gpu(ctx) => ctx.clone(),
            Backend::Cpu => {
                return Err(Error::Invalid(
                    "device buffers need a GPU backend; this runner uses the CPU reference".into(),
                ))
            }
        };
        self.evict_others(key);
        self.last_main = Some(key.to_string());
        self.prepare(key, build)?;
        let p = &self.prepared[key];
        match &p.exe {
            Some(exe) => {
                exe.submit_inputs(&ctx, &p.graph, inputs)?;
                Ok(exe)
            }
            None => Err(Error::Invalid(format!(
                "graph '{key}' was prepared without a GPU executor"
            ))),
        }
    }

    /// Per-op wall times of one run of a prepared graph (on the GPU it waits after every op).
    pub fn profile(&self, key: &str, inputs: &[&[f32]]) -> Result<Vec<(String, f64, u64)>> {
        match (&self.backend, self.prepared.get(key)) {
            (
                Backend::Gpu(ctx),
                Some(Prepared {
                    graph,
                    exe: Some(exe),
                    ..
                }),
            ) => exe.profile(ctx, graph, inputs),
            (Backend::Cpu, Some(p)) => {
                let mut slots = p.cpu.lock().unwrap_or_else(|e| e.into_inner());
                CpuExecutor::profile(&p.graph, &p.plan, inputs, &mut slots)
            }
            _ => Ok(Vec::new()),
        }
    }

    /// Bytes of the prepared graphs' activation buffers (summed: each prepared graph keeps
    /// its own; on the GPU only those whose executor is held, see [`Runner::set_keep_all`])
    /// and of the weights uploaded to the device (0 on the CPU backend).
    pub fn memory(&self) -> (u64, u64) {
        match self.backend {
            Backend::Cpu => (self.prepared.values().map(|p| p.plan.peak_bytes).sum(), 0),
            Backend::Gpu(_) => self.device_bytes(),
        }
    }

    /// The plan of a prepared graph.
    pub fn plan(&self, key: &str) -> Option<&Plan> {
        self.prepared.get(key).map(|p| &p.plan)
    }
}
