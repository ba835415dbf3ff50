//! The GPU context: adapter choice, device, pipeline cache, buffers and dispatch recording.
//!
//! A [`GpuContext`] is created headless ([`GpuContext::new`]) or around a caller's own
//! `wgpu::Device` and `Queue` ([`GpuContext::from_device`]). Kernels are compiled once per
//! (shader, entry point, constants) and cached.

mod buffers;
mod dispatch;

pub use buffers::{pack_f16, unpack_f16, DType, GpuTensor, WRITE_PIECE_BYTES};
pub use dispatch::{record_all, BufferCopy, Dispatch, KernelArgs, TextureCopy};

use crate::error::{Error, Result};
use crate::shaders::Shader;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Which graphics API wgpu may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Api {
    /// Vulkan, Metal or DX12: the native compute APIs. GL is never picked silently.
    #[default]
    Native,
    Vulkan,
    Metal,
    Dx12,
    /// OpenGL (ES) through EGL; only when asked for.
    Gl,
}

impl Api {
    fn backends(self) -> wgpu::Backends {
        match self {
            Api::Native => wgpu::Backends::VULKAN | wgpu::Backends::METAL | wgpu::Backends::DX12,
            Api::Vulkan => wgpu::Backends::VULKAN,
            Api::Metal => wgpu::Backends::METAL,
            Api::Dx12 => wgpu::Backends::DX12,
            Api::Gl => wgpu::Backends::GL,
        }
    }

    /// Parses `vulkan`, `metal`, `dx12`, `gl` or `native`.
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "native" | "auto" | "" => Ok(Api::Native),
            "vulkan" | "vk" => Ok(Api::Vulkan),
            "metal" => Ok(Api::Metal),
            "dx12" | "d3d12" => Ok(Api::Dx12),
            "gl" | "gles" | "opengl" => Ok(Api::Gl),
            other => Err(Error::Invalid(format!(
                "unknown graphics API '{other}': use one of native, vulkan, metal, dx12, gl"
            ))),
        }
    }
}

/// Which device limits to request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LimitsChoice {
    /// Everything the adapter offers (lavapipe: 128 MiB storage bindings).
    #[default]
    Adapter,
    /// `wgpu::Limits::default()` — WebGPU's defaults; for portability tests.
    WebGpuDefault,
    /// `wgpu::Limits::downlevel_defaults()`.
    Downlevel,
}

impl LimitsChoice {
    /// Parses `adapter`, `default` (or `webgpu`) or `downlevel`.
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "adapter" | "" => Ok(LimitsChoice::Adapter),
            "default" | "webgpu" => Ok(LimitsChoice::WebGpuDefault),
            "downlevel" => Ok(LimitsChoice::Downlevel),
            other => Err(Error::Invalid(format!(
                "unknown limits '{other}': use one of adapter, default, downlevel"
            ))),
        }
    }

    /// The limits to request from an adapter offering `adapter`: the adapter's own, or
    /// the chosen preset made no better than the adapter anywhere (a preset value the
    /// adapter cannot meet is lowered to the adapter's).
    pub fn resolve(self, adapter: &wgpu::Limits) -> wgpu::Limits {
        match self {
            LimitsChoice::Adapter => adapter.clone(),
            LimitsChoice::WebGpuDefault => wgpu::Limits::default().or_worse_values_from(adapter),
            LimitsChoice::Downlevel => {
                wgpu::Limits::downlevel_defaults().or_worse_values_from(adapter)
            }
        }
    }
}

/// Storage precision of the graph executor's weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Precision {
    /// Everything f32 (the default).
    #[default]
    F32,
    /// Matmul weights stored as f16 on the device (packed pairs, unpacked to f32 in
    /// registers with WGSL's core `unpack2x16float`, so no `SHADER_F16` is needed);
    /// activations and accumulation stay f32. A weight matrix with a value outside f16's
    /// range (e.g. from bf16) stays f32.
    F16,
    /// f16 weights as [`Precision::F16`] plus f16 activations in the ViT on the GPU's
    /// texture path (docs/precision.md): the tensors between its kernels stored as packed
    /// halves, read through rgba16float textures, accumulation in f32.
    F16Act,
}

impl Precision {
    /// Parses `f32` or `f16`.
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" | "" => Ok(Precision::F32),
            "f16" | "fp16" | "half" | "float16" => Ok(Precision::F16),
            "f16-act" | "f16act" | "f16-all" => Ok(Precision::F16Act),
            other => Err(Error::Invalid(format!(
                "unknown precision '{other}': use f32, f16 (weights) or f16-act (weights and activations)"
            ))),
        }
    }

    /// Matmul weights stored as f16.
    pub fn f16_weights(self) -> bool {
        matches!(self, Precision::F16 | Precision::F16Act)
    }
}

/// Options for a headless context.
#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    pub api: Api,
    /// Substring of the adapter name (case-insensitive).
    pub adapter: Option<String>,
    pub limits: LimitsChoice,
    /// Most bytes of device memory volfuse may hold at once (None: no budget beyond the
    /// device's own). An allocation past it is [`Error::OutOfMemory`]. Counted from wgpu's
    /// allocator report where the backend has one (Vulkan, DX12); elsewhere (GL, Metal)
    /// every buffer volfuse created counts, freed or not.
    pub memory_budget: Option<u64>,
    /// Run graph nodes whose activations exceed this many bytes in depth slabs, as if the
    /// device's storage binding limit were this small (the smaller of the two counts).
    /// Weights are unaffected. For tests of the paths for tensors larger than one binding
    /// on small tensors (`VOLFUSE_SPLIT_BINDING`, e.g. `32K`).
    pub split_binding: Option<u64>,
    /// Weight storage precision (also `VOLFUSE_PRECISION`).
    pub precision: Precision,
    /// Graph executors choose kernel variants through the autotune cache
    /// (`crate::autotune`): timed on first use per adapter, op family and shape class.
    /// Off by default for embedders (no timing, no files written); the command line turns
    /// it on unless `--no-autotune` / `VOLFUSE_NO_AUTOTUNE`.
    pub autotune: bool,
}

/// Parses a byte count: `123`, `64K`, `512M`, `2G` (binary units, optional `iB`/`B`).
pub fn parse_bytes(s: &str) -> Result<u64> {
    let t = s.trim().to_ascii_uppercase();
    let t = t.trim_end_matches("IB").trim_end_matches('B');
    let (num, mul) = match t.chars().last() {
        Some('K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M') => (&t[..t.len() - 1], 1 << 20),
        Some('G') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .ok_or_else(|| {
            Error::Invalid(format!(
                "'{s}' is not a byte count (examples: 1048576, 64M, 2G)"
            ))
        })
}

impl GpuOptions {
    /// Options with `VOLFUSE_API`, `VOLFUSE_ADAPTER` and `VOLFUSE_LIMITS` applied where
    /// the fields are unset.
    pub fn from_env() -> Result<Self> {
        let mut o = GpuOptions::default();
        if let Ok(l) = std::env::var("VOLFUSE_LIMITS") {
            o.limits = LimitsChoice::parse(&l)?;
        }
        if let Ok(api) = std::env::var("VOLFUSE_API") {
            o.api = Api::parse(&api)?;
        }
        if let Ok(b) = std::env::var("VOLFUSE_MEMORY_BUDGET") {
            if !b.is_empty() {
                o.memory_budget = Some(parse_bytes(&b)?);
            }
        }
        if let Ok(b) = std::env::var("VOLFUSE_SPLIT_BINDING") {
            if !b.is_empty() {
                o.split_binding = Some(parse_bytes(&b)?);
            }
        }
        if let Ok(p) = std::env::var("VOLFUSE_PRECISION") {
            o.precision = Precision::parse(&p)?;
        }
        if let Ok(a) = std::env::var("VOLFUSE_ADAPTER") {
            if !a.is_empty() {
                o.adapter = Some(a);
            }
        }
        Ok(o)
    }
}

/// Capabilities the kernels care about, read from the device (never from the adapter name).
#[derive(Clone, Debug)]
pub struct Caps {
    pub f16: bool,
    pub subgroups: bool,
    pub timestamps: bool,
    pub max_binding: u64,
    /// Activations larger than this run in depth slabs (`graph::split`): `max_binding`
    /// unless [`GpuOptions::split_binding`] lowers it.
    pub split_binding: u64,
    pub max_buffer: u64,
    pub max_workgroups_per_dim: u32,
    pub max_storage_buffers_per_stage: u32,
    pub max_invocations: u32,
    pub max_workgroup_storage: u32,
    /// Smallest subgroup size the device may use (0 when unknown).
    pub min_subgroup_size: u32,
    pub uniform_offset_alignment: u32,
    pub max_uniform_binding: u64,
    pub max_texture_2d: u32,
    pub max_storage_textures_per_stage: u32,
    /// True for CPU adapters (lavapipe, llvmpipe, WARP): selects CPU-friendly kernel variants.
    pub cpu_like: bool,
}

type PipelineKey = (&'static str, &'static str, String);

/// A kernel a context compiled: the shader variant's name (see `shaders::variants`), the
/// entry point and the `override` constants it was specialised with.
#[derive(Clone, Debug, PartialEq)]
pub struct CompiledKernel {
    pub shader: &'static str,
    pub entry: &'static str,
    pub constants: Vec<(&'static str, f64)>,
}

/// Counts of live wgpu objects ([`GpuContext::live_resources`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LiveResources {
    pub buffers: usize,
    pub textures: usize,
    pub texture_views: usize,
    pub bind_groups: usize,
    pub bind_group_layouts: usize,
    pub pipeline_layouts: usize,
    pub compute_pipelines: usize,
    pub shader_modules: usize,
    pub command_encoders: usize,
    pub command_buffers: usize,
    pub query_sets: usize,
}

impl LiveResources {
    /// The sum of all counts.
    pub fn total(&self) -> usize {
        self.buffers
            + self.textures
            + self.texture_views
            + self.bind_groups
            + self.bind_group_layouts
            + self.pipeline_layouts
            + self.compute_pipelines
            + self.shader_modules
            + self.command_encoders
            + self.command_buffers
            + self.query_sets
    }
}

/// A wgpu device and queue plus everything volfuse caches on them.
pub struct GpuContext {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub caps: Caps,
    /// See [`GpuOptions::precision`] (F32 for [`GpuContext::from_device`]; set it after).
    pub precision: Precision,
    /// See [`GpuOptions::autotune`] (off for [`GpuContext::from_device`]; set it after).
    pub autotune: bool,
    pipelines: Mutex<HashMap<PipelineKey, Arc<wgpu::ComputePipeline>>>,
    /// Shader modules by shader variant name: each WGSL text is parsed and validated once,
    /// not once per entry point and constant set (naga's parse dominated the test suite).
    modules: Mutex<HashMap<&'static str, wgpu::ShaderModule>>,
    textures: Mutex<HashMap<(usize, u32, bool), wgpu::Texture>>,
    /// The shared scratch buffer ([`GpuContext::scratch_buffer`]), if any.
    scratch_buffer: Mutex<Option<wgpu::Buffer>>,
    /// Bumped whenever a scratch texture is replaced by a larger one of its slot (or the
    /// scratch buffer by a larger one).
    texture_generation: std::sync::atomic::AtomicU64,
    compiled: Mutex<Vec<CompiledKernel>>,
    /// See [`GpuOptions::memory_budget`].
    budget: Option<u64>,
    /// Bytes of every buffer created through the context (the budget's fallback count).
    created: std::sync::atomic::AtomicU64,
    /// Set by the device-lost callback (headless contexts) or when a submission fails.
    lost: Arc<Mutex<Option<String>>>,
    /// The instance of a headless context (for [`GpuContext::live_resources`]).
    instance: Option<wgpu::Instance>,
}

impl std::fmt::Debug for GpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuContext")
            .field("adapter", &self.info.name)
            .field("backend", &self.info.backend)
            .field("caps", &self.caps)
            .finish()
    }
}

fn rank(t: wgpu::DeviceType) -> u32 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    }
}

fn instance(api: Api) -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = api.backends();
    // Shader debug info (for graphics debuggers) only on request (WGPU_DEBUG=1): debug
    // builds and tests otherwise write it into every pipeline's SPIR-V, and naga finds each
    // statement's source line by scanning the WGSL text (14% of the library tests' time).
    desc.flags = (wgpu::InstanceFlags::default() - wgpu::InstanceFlags::DEBUG).with_env();
    wgpu::Instance::new(desc)
}

/// Names of the adapters wgpu can see for `api`, best first.
pub fn list_adapters(api: Api) -> Vec<wgpu::AdapterInfo> {
    let inst = instance(api);
    let mut infos: Vec<_> = pollster::block_on(inst.enumerate_adapters(api.backends()))
        .iter()
        .map(|a| a.get_info())
        .collect();
    infos.sort_by_key(|i| rank(i.device_type));
    infos
}

impl GpuContext {
    /// Creates a headless context on the best adapter matching `opts`.
    pub fn new(opts: &GpuOptions) -> Result<Self> {
        let inst = instance(opts.api);
        let mut adapters = pollster::block_on(inst.enumerate_adapters(opts.api.backends()));
        adapters.sort_by_key(|a| rank(a.get_info().device_type));
        let names: Vec<String> = adapters
            .iter()
            .map(|a| format!("{} ({:?})", a.get_info().name, a.get_info().backend))
            .collect();
        let adapter = match &opts.adapter {
            Some(want) => {
                let w = want.to_ascii_lowercase();
                adapters
                    .into_iter()
                    .find(|a| a.get_info().name.to_ascii_lowercase().contains(&w))
                    .ok_or_else(|| Error::NoAdapter {
                        detail: format!(
                            " whose name contains '{want}' (found: {})",
                            if names.is_empty() {
                                "none".into()
                            } else {
                                names.join(", ")
                            }
                        ),
                    })?
            }
            None => adapters
                .into_iter()
                .next()
                .ok_or_else(|| Error::NoAdapter {
                    detail: format!(" for {:?}", opts.api),
                })?,
        };
        let info = adapter.get_info();
        let wanted = wgpu::Features::SHADER_F16
            | wgpu::Features::SUBGROUP
            | wgpu::Features::TIMESTAMP_QUERY
            | wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS;
        let features = adapter.features() & wanted;
        let limits = opts.limits.resolve(&adapter.limits());
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("volfuse"),
            required_features: features,
            required_limits: limits,
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            // A software adapter's device memory is the process's RAM: small allocator
            // blocks (8–64 MiB instead of 128–256) go back to the system when emptied, so
            // memory freed between stages leaves the resident set.
            memory_hints: if info.device_type == wgpu::DeviceType::Cpu {
                wgpu::MemoryHints::MemoryUsage
            } else {
                wgpu::MemoryHints::Performance
            },
            trace: wgpu::Trace::Off,
        }))
        .map_err(|source| Error::Device {
            adapter: info.name.clone(),
            source,
        })?;
        let mut ctx = Self::from_device(device, queue, info);
        ctx.budget = opts.memory_budget;
        if let Some(m) = opts.split_binding {
            ctx.caps.split_binding = ctx.caps.max_binding.min(m.max(256) / 256 * 256);
        }
        ctx.instance = Some(inst);
        ctx.precision = opts.precision;
        ctx.autotune = opts.autotune;
        // The device is our own: its loss is recorded and reported as Error::DeviceLost by
        // the next wait, and errors nobody scoped are kept for it instead of panicking.
        let lost = ctx.lost.clone();
        ctx.device.set_device_lost_callback(move |reason, msg| {
            if let Ok(mut l) = lost.lock() {
                l.get_or_insert(format!("{reason:?}: {msg}"));
            }
        });
        let lost = ctx.lost.clone();
        ctx.device.on_uncaptured_error(Arc::new(move |e| {
            if let Ok(mut l) = lost.lock() {
                if let wgpu::Error::OutOfMemory { .. } = e {
                    l.get_or_insert(format!("out of memory: {e}"));
                    return;
                }
                if l.is_some() {
                    // After a loss every call fails; the loss itself is what we report.
                    log::debug!("wgpu after device loss: {e}");
                    return;
                }
            }
            // As wgpu's default: an unscoped validation error is a bug in volfuse.
            panic!("wgpu error: {e}");
        }));
        Ok(ctx)
    }

    /// Checks `bytes` more against the memory budget (no-op without one).
    pub(crate) fn reserve(&self, what: &str, bytes: u64) -> Result<()> {
        let Some(budget) = self.budget else {
            return Ok(());
        };
        let used = self
            .device
            .generate_allocator_report()
            .map(|r| r.total_allocated_bytes)
            .unwrap_or_else(|| self.created.load(std::sync::atomic::Ordering::Relaxed));
        if used.saturating_add(bytes) > budget {
            return Err(Error::OutOfMemory {
                what: what.to_string(),
                bytes,
                detail: format!(" but the memory budget is {budget} bytes with {used} in use"),
            });
        }
        Ok(())
    }

    /// Creates a buffer through `make` within the budget, turning wgpu's out-of-memory
    /// error into [`Error::OutOfMemory`].
    pub(crate) fn allocate(
        &self,
        what: &str,
        bytes: u64,
        make: impl FnOnce() -> wgpu::Buffer,
    ) -> Result<wgpu::Buffer> {
        self.check_lost()?;
        self.reserve(what, bytes)?;
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let buffer = make();
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(Error::OutOfMemory {
                what: what.to_string(),
                bytes,
                detail: format!(" and the device refused it ({e})"),
            });
        }
        self.created
            .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
        Ok(buffer)
    }

    /// [`Error::DeviceLost`] once the device is gone.
    pub fn check_lost(&self) -> Result<()> {
        // A non-blocking poll delivers a pending device-lost callback.
        let _ = self.device.poll(wgpu::PollType::Poll);
        match self.lost.lock().map(|l| l.clone()) {
            Ok(None) => Ok(()),
            Ok(Some(msg)) if msg.starts_with("out of memory") => Err(Error::OutOfMemory {
                what: "a GPU submission".into(),
                bytes: 0,
                detail: format!(" ({msg})"),
            }),
            Ok(Some(msg)) => Err(Error::DeviceLost(msg)),
            Err(_) => Err(Error::DeviceLost("state poisoned".into())),
        }
    }

    /// Wraps a caller's device and queue. Kernel choice follows the device's own
    /// features and limits; `info` names the adapter (from `adapter.get_info()`).
    pub fn from_device(device: wgpu::Device, queue: wgpu::Queue, info: wgpu::AdapterInfo) -> Self {
        let f = device.features();
        let l = device.limits();
        let caps = Caps {
            f16: f.contains(wgpu::Features::SHADER_F16),
            subgroups: f.contains(wgpu::Features::SUBGROUP),
            timestamps: f.contains(wgpu::Features::TIMESTAMP_QUERY),
            max_binding: l.max_storage_buffer_binding_size as u64,
            split_binding: l.max_storage_buffer_binding_size as u64,
            max_buffer: l.max_buffer_size,
            max_workgroups_per_dim: l.max_compute_workgroups_per_dimension,
            max_storage_buffers_per_stage: l.max_storage_buffers_per_shader_stage,
            max_invocations: l.max_compute_invocations_per_workgroup,
            max_workgroup_storage: l.max_compute_workgroup_storage_size,
            min_subgroup_size: if f.contains(wgpu::Features::SUBGROUP) {
                info.subgroup_min_size
            } else {
                0
            },
            uniform_offset_alignment: l.min_uniform_buffer_offset_alignment,
            max_uniform_binding: l.max_uniform_buffer_binding_size as u64,
            max_texture_2d: l.max_texture_dimension_2d,
            max_storage_textures_per_stage: l.max_storage_textures_per_shader_stage,
            cpu_like: info.device_type == wgpu::DeviceType::Cpu,
        };
        GpuContext {
            device,
            queue,
            info,
            caps,
            precision: Precision::F32,
            autotune: false,
            pipelines: Mutex::new(HashMap::new()),
            modules: Mutex::new(HashMap::new()),
            textures: Mutex::new(HashMap::new()),
            scratch_buffer: Mutex::new(None),
            texture_generation: std::sync::atomic::AtomicU64::new(0),
            compiled: Mutex::new(Vec::new()),
            budget: None,
            created: std::sync::atomic::AtomicU64::new(0),
            lost: Arc::new(Mutex::new(None)),
            instance: None,
        }
    }

    /// Live wgpu objects of this context's instance (buffers, textures, bind groups, …), from
    /// wgpu's hub report; `None` for a context around a caller's device
    /// ([`GpuContext::from_device`]), whose instance volfuse does not hold. Objects wgpu
    /// creates internally (staging buffers of `write_buffer`) are not counted.
    pub fn live_resources(&self) -> Option<LiveResources> {
        let r = self.instance.as_ref()?.generate_report()?;
        let h = r.hub_report();
        Some(LiveResources {
            buffers: h.buffers.num_kept_from_user,
            textures: h.textures.num_kept_from_user,
            texture_views: h.texture_views.num_kept_from_user,
            bind_groups: h.bind_groups.num_kept_from_user,
            bind_group_layouts: h.bind_group_layouts.num_kept_from_user,
            pipeline_layouts: h.pipeline_layouts.num_kept_from_user,
            compute_pipelines: h.compute_pipelines.num_kept_from_user,
            shader_modules: h.shader_modules.num_kept_from_user,
            command_encoders: h.command_encoders.num_kept_from_user,
            command_buffers: h.command_buffers.num_kept_from_user,
            query_sets: h.query_sets.num_kept_from_user,
        })
    }

    /// Bytes the device allocator holds: (allocated, reserved), when the backend reports
    /// them (Vulkan, D3D12, Metal). Textures included, unlike [`ConstCache`]-style counts.
    ///
    /// [`ConstCache`]: crate::graph::ConstCache
    pub fn allocator_bytes(&self) -> Option<(u64, u64)> {
        self.device
            .generate_allocator_report()
            .map(|r| (r.total_allocated_bytes, r.total_reserved_bytes))
    }

    /// Bytes of the shared scratch textures ([`GpuContext::scratch_texture`]).
    pub fn scratch_texture_bytes(&self) -> u64 {
        self.textures.lock().map_or(0, |m| {
            m.keys()
                .map(|(_, h, f16)| {
                    *h as u64 * Self::TEXTURE_WIDTH as u64 * if *f16 { 8 } else { 16 }
                })
                .sum()
        })
    }

    /// A one-line description: adapter name, API and driver.
    pub fn describe(&self) -> String {
        format!(
            "{} ({:?}, {:?}, driver {} {})",
            self.info.name,
            self.info.backend,
            self.info.device_type,
            self.info.driver,
            self.info.driver_info
        )
    }

    /// The compute pipeline for `entry` of `shader`, compiled on first use.
    /// `constants` are WGSL `override` values; they are part of the cache key.
    pub fn pipeline(
        &self,
        shader: &Shader,
        entry: &'static str,
        constants: &[(&'static str, f64)],
    ) -> Result<Arc<wgpu::ComputePipeline>> {
        let key_consts = constants
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        let key = (shader.name, entry, key_consts);
        let mut cache = self
            .pipelines
            .lock()
            .map_err(|_| Error::Gpu("pipeline cache poisoned".into()))?;
        if let Some(p) = cache.get(&key) {
            return Ok(p.clone());
        }
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let (module, new_module) = self.module(shader);
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(entry),
                layout: None,
                module: &module,
                entry_point: Some(entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants,
                    zero_initialize_workgroup_memory: false,
                },
                cache: None,
            });
        if let Some(err) = pollster::block_on(scope.pop()) {
            return Err(Error::Shader {
                name: format!("{}::{entry}", shader.name),
                msg: err.to_string(),
            });
        }
        self.keep_module(shader, new_module);
        let p = Arc::new(pipeline);
        mem_trace(
            Some(self),
            &format!("compiled {}::{entry} {}", shader.name, key.2),
        );
        cache.insert(key, p.clone());
        self.record_compiled(shader.name, entry, constants);
        Ok(p)
    }

    /// The module of `shader`: from the cache, or created now (then also returned as the
    /// second value, for [`GpuContext::keep_module`] once its pipeline built without error).
    fn module(&self, shader: &Shader) -> (wgpu::ShaderModule, Option<wgpu::ShaderModule>) {
        if let Some(m) = self
            .modules
            .lock()
            .ok()
            .and_then(|c| c.get(shader.name).cloned())
        {
            return (m, None);
        }
        let m = self
            .device
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(shader.name),
                source: wgpu::ShaderSource::Wgsl(shader.source(&self.caps).into()),
            });
        (m.clone(), Some(m))
    }

    /// Caches a module made by [`GpuContext::module`] (only valid ones get here).
    fn keep_module(&self, shader: &Shader, module: Option<wgpu::ShaderModule>) {
        if let (Some(m), Ok(mut c)) = (module, self.modules.lock()) {
            c.entry(shader.name).or_insert(m);
        }
    }

    fn record_compiled(
        &self,
        shader: &'static str,
        entry: &'static str,
        constants: &[(&'static str, f64)],
    ) {
        if let Ok(mut c) = self.compiled.lock() {
            c.push(CompiledKernel {
                shader,
                entry,
                constants: constants.to_vec(),
            });
        }
    }

    /// Every kernel this context compiled so far, in order: which shader variants, entry
    /// points and specialisation constants the engine chose for this device.
    pub fn compiled_kernels(&self) -> Vec<CompiledKernel> {
        self.compiled.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// A pipeline with an explicit bind group layout (needed for dynamic offsets).
    pub fn pipeline_with_layout(
        &self,
        shader: &Shader,
        entry: &'static str,
        layout: &[wgpu::BindGroupLayoutEntry],
    ) -> Result<(Arc<wgpu::ComputePipeline>, wgpu::BindGroupLayout)> {
        self.pipeline_with_layout_consts(shader, entry, &[], layout)
    }

    /// [`pipeline_with_layout`](Self::pipeline_with_layout) with WGSL `override` values
    /// (part of the cache key).
    pub fn pipeline_with_layout_consts(
        &self,
        shader: &Shader,
        entry: &'static str,
        constants: &[(&'static str, f64)],
        layout: &[wgpu::BindGroupLayoutEntry],
    ) -> Result<(Arc<wgpu::ComputePipeline>, wgpu::BindGroupLayout)> {
        let bgl = self
            .device
            .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                label: Some(entry),
                entries: layout,
            });
        let key_consts = constants
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        let key = (shader.name, entry, format!("explicit {key_consts}"));
        let mut cache = self
            .pipelines
            .lock()
            .map_err(|_| Error::Gpu("pipeline cache poisoned".into()))?;
        if let Some(p) = cache.get(&key) {
            return Ok((p.clone(), p.get_bind_group_layout(0)));
        }
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let (module, new_module) = self.module(shader);
        let pl = self
            .device
            .create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: Some(entry),
                bind_group_layouts: &[Some(&bgl)],
                immediate_size: 0,
            });
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(entry),
                layout: Some(&pl),
                module: &module,
                entry_point: Some(entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants,
                    zero_initialize_workgroup_memory: true,
                },
                cache: None,
            });
        if let Some(err) = pollster::block_on(scope.pop()) {
            return Err(Error::Shader {
                name: format!("{}::{entry}", shader.name),
                msg: err.to_string(),
            });
        }
        self.keep_module(shader, new_module);
        let p = Arc::new(pipeline);
        mem_trace(
            Some(self),
            &format!("compiled {}::{entry} {}", shader.name, key.2),
        );
        cache.insert(key, p.clone());
        self.record_compiled(shader.name, entry, &[]);
        Ok((p, bgl))
    }

    /// Width in texels of scratch textures (rgba32float rows of 16 KiB).
    pub const TEXTURE_WIDTH: u32 = 1024;

    /// A shared rgba32float scratch texture holding at least `texels` texels, laid out
    /// linearly in rows of [`GpuContext::TEXTURE_WIDTH`]. Every kernel that streams an
    /// operand through the texture unit carries the copy that fills it (see
    /// [`Dispatch::copies`]), so one texture per operand slot serves all of them: the
    /// smallest cached one that is large enough. A request larger than all of them makes a
    /// new one (height rounded up by at most 1/8) that replaces the smaller ones in the
    /// cache and bumps [`GpuContext::texture_generation`] (kernels built before keep theirs
    /// until dropped; `GpuExecutor` rebuilds its dispatches once when that happens, so a
    /// graph holds one texture per slot). `slot` tells apart the operands of one kernel
    /// (attention reads q, k and v).
    pub fn scratch_texture(&self, slot: usize, texels: u64) -> Result<wgpu::Texture> {
        self.scratch_texture_of(slot, texels, false)
    }

    /// The first `texels` rgba32f texels of f32 buffer `buffer` staged in scratch texture
    /// `slot`: the texture's view and the copy that fills it, for the dispatch that reads
    /// it to carry (recorded before it).
    pub fn staged_f32(
        &self,
        slot: usize,
        buffer: &wgpu::Buffer,
        texels: u64,
    ) -> Result<(wgpu::TextureView, Arc<TextureCopy>)> {
        let texture = self.scratch_texture(slot, texels)?;
        let view = texture.create_view(&Default::default());
        let copy = TextureCopy {
            buffer: buffer.clone(),
            texture,
            width: Self::TEXTURE_WIDTH,
            texel_bytes: 16,
            texels,
            buffer_offset: 0,
            dst_texel: 0,
        };
        Ok((view, Arc::new(copy)))
    }

    /// As [`GpuContext::scratch_texture`], rgba16float (8-byte texels: the layout of a
    /// packed-f16 buffer, so f16 activations copy in unchanged and read back as f32).
    pub fn scratch_texture_f16(&self, slot: usize, texels: u64) -> Result<wgpu::Texture> {
        self.scratch_texture_of(slot, texels, true)
    }

    fn scratch_texture_of(&self, slot: usize, texels: u64, f16: bool) -> Result<wgpu::Texture> {
        let w = Self::TEXTURE_WIDTH as u64;
        let rows = texels.div_ceil(w).max(1);
        let max_h = self.caps.max_texture_2d as u64;
        if rows > max_h {
            return Err(Error::TooLarge {
                what: "a texture operand".into(),
                bytes: texels * 16,
                limit: w * max_h * 16,
                adapter: self.info.name.clone(),
            });
        }
        let mut map = self
            .textures
            .lock()
            .map_err(|_| Error::Gpu("texture cache poisoned".into()))?;
        let fit = map
            .iter()
            .filter(|((s, h, f), _)| *s == slot && *f == f16 && *h as u64 >= rows)
            .min_by_key(|((_, h, _), _)| *h)
            .map(|(_, t)| t.clone());
        if let Some(t) = fit {
            return Ok(t);
        }
        // Few distinct sizes, little waste: a multiple of 1/8 of the next power of two.
        let step = (rows.next_power_of_two() / 8).max(1);
        let h = (rows.div_ceil(step) * step).min(max_h);
        let before = map.len();
        map.retain(|(s, _, f), _| !(*s == slot && *f == f16));
        if map.len() != before {
            self.texture_generation
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let t = self.device.create_texture(&wgpu::TextureDescriptor {
            label: Some("scratch"),
            size: wgpu::Extent3d {
                width: w as u32,
                height: h as u32,
                depth_or_array_layers: 1,
            },
            mip_level_count: 1,
            sample_count: 1,
            dimension: wgpu::TextureDimension::D2,
            format: if f16 {
                wgpu::TextureFormat::Rgba16Float
            } else {
                wgpu::TextureFormat::Rgba32Float
            },
            usage: wgpu::TextureUsages::TEXTURE_BINDING
                | wgpu::TextureUsages::COPY_DST
                | if !f16 && self.storage_x() {
                    wgpu::TextureUsages::STORAGE_BINDING
                } else {
                    wgpu::TextureUsages::empty()
                },
            view_formats: &[],
        });
        map.insert((slot, h as u32, f16), t.clone());
        Ok(t)
    }

    /// Whether the texture kernels (matmul, conv3d) may read their streamed operand as a
    /// read-only storage texture (`Shader::storage_x`): on CPU adapters, where lavapipe
    /// inlines storage-image loads but calls a function for every sampled fetch
    /// (docs/lavapipe.md), with subgroups (the texture path needs them); the rgba32float
    /// scratch textures then also allow storage use.
    pub fn storage_x(&self) -> bool {
        self.caps.cpu_like && self.caps.subgroups && self.caps.max_storage_textures_per_stage >= 1
    }

    /// A shared storage buffer of at least `bytes` bytes, for a kernel's private copy of
    /// an operand (`conv3d_cat`'s concat where its texture path does not apply). As with
    /// [`GpuContext::scratch_texture`], every dispatch that reads it carries the copies
    /// that fill it (its [`Dispatch::before`]), so one buffer serves all of them; a larger
    /// request replaces it (size rounded up by at most 1/8) and bumps
    /// [`GpuContext::texture_generation`], so a `GpuExecutor` holds one.
    pub fn scratch_buffer(&self, bytes: u64) -> Result<wgpu::Buffer> {
        let mut cur = self
            .scratch_buffer
            .lock()
            .map_err(|_| Error::Gpu("scratch buffer poisoned".into()))?;
        if let Some(b) = cur.as_ref().filter(|b| b.size() >= bytes) {
            return Ok(b.clone());
        }
        let step = (bytes.next_power_of_two() / 8).max(256);
        let size = (bytes.div_ceil(step) * step).min(self.caps.max_binding.max(bytes));
        let b = self.storage_buffer("scratch", size)?;
        if cur.replace(b.clone()).is_some() {
            self.texture_generation
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(b)
    }

    /// Bytes of the shared scratch buffer ([`GpuContext::scratch_buffer`]; 0 when none).
    pub fn scratch_buffer_bytes(&self) -> u64 {
        self.scratch_buffer
            .lock()
            .map_or(0, |b| b.as_ref().map_or(0, |b| b.size()))
    }

    /// Counts replacements of scratch textures by larger ones ([`GpuContext::scratch_texture`]).
    pub fn texture_generation(&self) -> u64 {
        self.texture_generation
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Forgets the cached scratch textures and buffer: each is freed once the kernels built
    /// on it are dropped, and the next kernels get new ones of the sizes they need. For a runner
    /// switching stages (a ViT's operand sizes are not a UNet's).
    pub fn release_scratch_textures(&self) {
        if let Ok(mut m) = self.textures.lock() {
            m.clear();
        }
        if let Ok(mut b) = self.scratch_buffer.lock() {
            *b = None;
        }
    }

    /// Makes the C heap give large blocks back to the system when they are freed (glibc:
    /// a fixed `M_MMAP_THRESHOLD` of 1 MiB, so every allocation of 1 MiB or more is its
    /// own mapping; by default the threshold climbs to the largest block freed so far, up
    /// to 32 MiB, and later blocks below it stay resident in the heap after `free`).
    /// A process call, for binaries: a tile's host vectors (weights read back for an
    /// upload, image batches, token blocks) then cost memory only while alive.
    pub fn tune_host_heap() {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        {
            extern "C" {
                fn mallopt(
                    param: std::os::raw::c_int,
                    value: std::os::raw::c_int,
                ) -> std::os::raw::c_int;
            }
            const M_MMAP_THRESHOLD: std::os::raw::c_int = -3;
            // VOLFUSE_MMAP_THRESHOLD: bytes, or 0 for glibc's default policy.
            let bytes = std::env::var("VOLFUSE_MMAP_THRESHOLD")
                .ok()
                .and_then(|v| v.trim().parse::<i32>().ok())
                .unwrap_or(1 << 20);
            if bytes > 0 {
                // SAFETY: mallopt only changes glibc's allocation policy; any value is valid.
                unsafe {
                    mallopt(M_MMAP_THRESHOLD, bytes);
                }
            }
        }
    }

    /// Returns the C heap's free pages to the system (glibc's `malloc_trim`; nothing
    /// elsewhere). A software adapter's device memory and a stage's host vectors come from
    /// that heap, and glibc keeps freed pages in the middle of it resident: called when
    /// a runner switches stages, so the next stage does not sit on the last one's pages.
    pub fn trim_host_heap() {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        {
            extern "C" {
                fn malloc_trim(pad: usize) -> std::os::raw::c_int;
            }
            // SAFETY: malloc_trim only releases free memory of glibc's own arenas; it takes
            // no pointers and is thread-safe (it locks each arena).
            unsafe {
                malloc_trim(0);
            }
        }
    }

    /// Submits `dispatches` in one compute pass and waits for completion.
    pub fn run(&self, dispatches: &[Dispatch]) -> Result<()> {
        let mut enc = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("volfuse"),
            });
        self.check_lost()?;
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        record_all(&mut enc, dispatches);
        self.queue.submit([enc.finish()]);
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(Error::OutOfMemory {
                what: "a GPU submission".into(),
                bytes: 0,
                detail: format!(" ({e})"),
            });
        }
        self.wait()
    }

    /// Runs `dispatches` once and returns the device time in seconds, measured with
    /// timestamp queries written into the command encoder; None when the device lacks
    /// `TIMESTAMP_QUERY_INSIDE_ENCODERS`.
    pub fn time_dispatches(&self, dispatches: &[Dispatch]) -> Result<Option<f64>> {
        if !self
            .device
            .features()
            .contains(wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS)
        {
            return Ok(None);
        }
        let qs = self.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("timing"),
            ty: wgpu::QueryType::Timestamp,
            count: 2,
        });
        let resolve = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("timestamps"),
            size: 16,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let mut enc = self.device.create_command_encoder(&Default::default());
        enc.write_timestamp(&qs, 0);
        record_all(&mut enc, dispatches);
        enc.write_timestamp(&qs, 1);
        enc.resolve_query_set(&qs, 0..2, &resolve, 0);
        self.queue.submit([enc.finish()]);
        let words = self.read_buffer(&resolve, 4)?;
        let raw: &[u64] = bytemuck::cast_slice(&words);
        let ticks = raw[1].saturating_sub(raw[0]) as f64;
        Ok(Some(
            ticks * self.queue.get_timestamp_period() as f64 * 1e-9,
        ))
    }

    /// Blocks until all submitted work has finished.
    pub fn wait(&self) -> Result<()> {
        self.check_lost()?;
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Gpu(e.to_string()))?;
        self.check_lost()
    }
}

/// Whether `VOLFUSE_MEM_TRACE` is set (callers skip building trace labels otherwise).
pub fn mem_trace_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("VOLFUSE_MEM_TRACE").is_some())
}

/// With `VOLFUSE_MEM_TRACE` set: one line on stderr with the process's resident memory
/// (current and peak), the device allocator's bytes and the scratch textures', tagged
/// `what` (memory accounting of a run, stage by stage). Nothing otherwise.
pub fn mem_trace(ctx: Option<&GpuContext>, what: &str) {
    if !mem_trace_on() {
        return;
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = |key: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let mib = |b: u64| b as f64 / 1048576.0;
    let dev = ctx.map_or(String::new(), |c| {
        let (a, r) = c.allocator_bytes().unwrap_or((0, 0));
        format!(
            " device allocated {:.1} reserved {:.1} scratch textures {:.1} buffer {:.1}",
            mib(a),
            mib(r),
            mib(c.scratch_texture_bytes()),
            mib(c.scratch_buffer_bytes())
        )
    });
    // Resident KiB of: the brk heap, anonymous mappings ≥ 32 MiB (device memory blocks,
    // malloc arenas), smaller anonymous ones, file mappings.
    let (mut heap, mut big, mut small, mut file) = (0u64, 0u64, 0u64, 0u64);
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
    let mut kind = 0;
    let mut size = 0u64;
    let mut bigs = Vec::new();
    for l in smaps.lines() {
        let mut f = l.split_whitespace();
        let first = f.next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                let name = f.nth(4).unwrap_or("");
                size = (b - a) >> 20;
                kind = if name == "[heap]" {
                    0
                } else if name.is_empty() && b - a >= 32 << 20 {
                    1
                } else if name.is_empty() || name.starts_with('[') {
                    2
                } else {
                    3
                };
                continue;
            }
        }
        if first == "Rss:" {
            let v: u64 = f.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            *[&mut heap, &mut big, &mut small, &mut file][kind] += v;
            if kind == 1 {
                bigs.push(format!("{}/{size}", v >> 10));
            }
        }
    }
    eprintln!(
        "[mem] {what}: rss {:.1} peak {:.1}{dev} | heap {:.1} big anon {:.1} small anon {:.1} files {:.1} MiB;{} big anon rss/size MiB: {}",
        kib("VmRSS:") as f64 / 1024.0,
        kib("VmHWM:") as f64 / 1024.0,
        heap as f64 / 1024.0,
        big as f64 / 1024.0,
        small as f64 / 1024.0,
        file as f64 / 1024.0,
        malloc_use(),
        bigs.join(" ")
    );
}

/// glibc's malloc statistics as " malloc in use X (mmapped Y) free Z MiB", or "".
fn malloc_use() -> String {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        #[repr(C)]
        #[derive(Default)]
        struct Mallinfo2 {
            arena: usize,
            ordblks: usize,
            smblks: usize,
            hblks: usize,
            hblkhd: usize,
            usmblks: usize,
            fsmblks: usize,
            uordblks: usize,
            fordblks: usize,
            keepcost: usize,
        }
        extern "C" {
            fn mallinfo2() -> Mallinfo2;
        }
        // SAFETY: mallinfo2 (glibc ≥ 2.33) takes no arguments and returns a plain struct.
        let m = unsafe { mallinfo2() };
        let mib = |b: usize| b as f64 / 1048576.0;
        format!(
            " malloc in use {:.1} (mmapped {:.1}) free {:.1} MiB;",
            mib(m.uordblks + m.hblkhd),
            mib(m.hblkhd),
            mib(m.fordblks)
        )
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    String::new()
}
