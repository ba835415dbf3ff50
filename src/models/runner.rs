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

struct Prepared {
    graph: Graph,
    plan: Plan,
    exe: Option<GpuExecutor>,
    /// The CPU backend's buffers, reused by every run.
    cpu: std::sync::Mutex<CpuSlots>,
}

/// A backend plus the graphs prepared on it, keyed by a caller-chosen string (e.g. the
/// input shape).
pub struct Runner {
    pub backend: Backend,
    consts: ConstCache,
    prepared: HashMap<String, Prepared>,
    /// Runs and wall seconds per key since the last [`Runner::take_timings`] (benchmarks).
    timings: HashMap<String, (usize, f64)>,
}

impl Runner {
    pub fn new(backend: Backend) -> Self {
        Runner {
            backend,
            consts: ConstCache::new(),
            prepared: HashMap::new(),
            timings: HashMap::new(),
        }
    }

    /// Builds and plans the graph stored under `key` with `build` (and its GPU executor on
    /// the GPU backend) unless it is prepared already.
    fn prepare(&mut self, key: &str, build: impl FnOnce() -> Result<Graph>) -> Result<()> {
        if !self.prepared.contains_key(key) {
            let graph = build()?;
            let plan = graph.plan(true);
            let exe = match &self.backend {
                Backend::Cpu => None,
                Backend::Gpu(ctx) => Some(GpuExecutor::new(ctx, &graph, &plan, &mut self.consts)?),
            };
            self.prepared.insert(
                key.to_string(),
                Prepared {
                    graph,
                    plan,
                    exe,
                    cpu: Default::default(),
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
        self.prepare(key, build)?;
        if matches!(self.backend, Backend::Cpu) {
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
            (Backend::Gpu(ctx), Some(exe)) => exe.run(ctx, &p.graph, inputs),
            _ => {
                let mut slots = p.cpu.lock().unwrap_or_else(|e| e.into_inner());
                CpuExecutor::run_with(&p.graph, &p.plan, inputs, &mut slots)
            }
        };
        let e = self.timings.entry(key.to_string()).or_default();
        e.0 += 1;
        e.1 += t0.elapsed().as_secs_f64();
        out
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
                self.prepared.values().map(|p| p.plan.peak_bytes).sum(),
                self.consts.bytes(),
            ),
        }
    }

    /// Wall seconds of every node of a prepared graph, from one run with a wait after each
    /// node (GPU). None for an unknown key or the CPU backend.
    pub fn profile_nodes(&self, key: &str, inputs: &[&[f32]]) -> Result<Option<Vec<f64>>> {
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
    /// its own) and of the weights uploaded to the device (0 on the CPU backend).
    pub fn memory(&self) -> (u64, u64) {
        let act = self.prepared.values().map(|p| p.plan.peak_bytes).sum();
        let weights = match self.backend {
            Backend::Cpu => 0,
            Backend::Gpu(_) => self.consts.bytes(),
        };
        (act, weights)
    }

    /// The plan of a prepared graph.
    pub fn plan(&self, key: &str) -> Option<&Plan> {
        self.prepared.get(key).map(|p| &p.plan)
    }
}
