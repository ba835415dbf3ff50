//! The supported entry point for applications: an [`Engine`] (a device, or the CPU
//! reference) and the [`Model`]s loaded on it.
//!
//! # Headless or on your device
//!
//! - [`Engine::new`] picks an adapter as the `volfuse` command does (discrete > integrated >
//!   virtual > CPU, narrowed by [`GpuOptions`]).
//! - [`Engine::from_device`] wraps a `wgpu::Device` and `Queue` an application already has
//!   (they are cheap handles: pass clones and keep using yours). Kernel variants follow that
//!   device's own features and limits: a device with WebGPU's default limits and no
//!   optional features works (`examples/own_device.rs` creates exactly that); the
//!   adapter's own limits (`adapter.limits()`) and `SUBGROUP` / `SHADER_F16` allow larger
//!   ViT batches and faster kernels, and a tile whose buffers exceed the storage-binding
//!   limit is refused with [`Error::TooLarge`].
//! - [`Engine::cpu`] runs the same graphs on the CPU reference ops.
//!
//! # Host arrays or device buffers
//!
//! [`Model::segment`] takes host [`Volume`]s and returns a host [`Segmentation`].
//! [`Model::segment_buffer`] takes a [`DeviceVolume`] (a caller's `wgpu::Buffer` on the
//! engine's device) and returns a [`DeviceSegmentation`] whose buffers the caller can bind.
//! What moves where on the device path, per tile:
//!
//! | step | where | copies |
//! |---|---|---|
//! | volume (u8, u16 or f32 voxels) | caller's buffer → host | **one device → host read of the volume** (and of the context): the orthogonal-plane preprocessing (normal downsample, skimage-exact resize, per-slice quantisation) runs on the host, bit-exact with dinov3_playground |
//! | ViT on slice batches, token lift | device | pixels host → device, tokens and lifted planes device → host, per batch (as [`Model::segment`]) |
//! | features (C, d, h, w) f32 | host → device | one upload per volume into the UNet's input buffer: C·d·h·w·4 bytes, the largest transfer (C = the ViT width: ViT-S at 64³ is 403 MB per volume) |
//! | UNet, softmax / sigmoid, argmax | device | none |
//! | logits, probabilities, labels | device → device | copied into new buffers owned by the caller (the engine's own buffers are reused by the next run); labels converted to `u32` by a kernel; **nothing is read back** unless you call [`DeviceSegmentation::read_labels`] and friends |
//!
//! So the outputs never cross the host (the host path reads back (2K+1)·d·h·w·4 bytes), the
//! input crosses it once, and the features stage round-trips through the host as it does
//! on the host path; moving the preprocessing onto the device (and keeping the features
//! there) is future work that will not change this API.
//!
//! # Threads
//!
//! [`Engine`], [`Model`] and [`DeviceSegmentation`] are `Send + Sync` (checked at compile
//! time below). An `Engine` is a cheap handle (`Clone`); share a `Model` across threads
//! with `Arc<Model>`. A `Model` owns one set of device buffers per input shape, so calls on
//! one `Model` are serialised by an internal lock; for parallel runs load the bundle twice
//! (each `Model` uploads its own weights). Models on one engine share the device's
//! pipelines and scratch textures, which is safe: every kernel that streams through a
//! scratch texture is submitted in the same command buffer as the copy that fills it.
//!
//! # Sizes
//!
//! One call segments one tile: the volume is resampled to the model's input grid
//! ([`Model::input_size`]) as dinov3_playground does. Sliding-window segmentation of larger
//! volumes will be a separate method on [`Model`].

use crate::error::{Error, Result};
use crate::gpu::{GpuContext, GpuOptions, KernelArgs};
use crate::graph::GraphInput;
use crate::models::pipeline::{unet_features, unet_graph, Segmentation};
use crate::models::planes::VolumeData;
use crate::models::{Backend, Bundle, Runner, Volume};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Where volfuse runs: a wgpu device (its own or the caller's) or the CPU reference.
///
/// ```
/// # fn main() -> volfuse::Result<()> {
/// let engine = volfuse::Engine::new(&volfuse::GpuOptions::from_env()?)?;
/// println!("running on {}", engine.describe());
/// let model = engine.load_model(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/bundle_tiny_ctx"))?;
/// let [d, h, w] = [20, 18, 22];
/// let voxels: Vec<u8> = (0..d * h * w).map(|i| (i * 7 % 251) as u8).collect();
/// let raw = volfuse::Volume::new([d, h, w], volfuse::VolumeData::U8(voxels))?;
/// let seg = model.segment(&raw, Some(&raw))?;
/// assert_eq!(seg.labels.len(), 16 * 16 * 16); // the model's input grid
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Engine {
    backend: Backend,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("backend", &self.backend.describe())
            .finish()
    }
}

impl Engine {
    /// A headless engine on the best adapter matching `opts` (see
    /// [`GpuOptions::from_env`] for `VOLFUSE_ADAPTER` / `VOLFUSE_API`). Fails with
    /// [`Error::NoAdapter`] when wgpu finds none; [`Engine::cpu`] always works.
    pub fn new(opts: &GpuOptions) -> Result<Engine> {
        Ok(Engine::from_context(Arc::new(GpuContext::new(opts)?)))
    }

    /// The CPU reference path: the same graphs, no device.
    pub fn cpu() -> Engine {
        Engine {
            backend: Backend::Cpu,
        }
    }

    /// An engine on a caller's device and queue; `info` is `adapter.get_info()` of the
    /// adapter they came from. volfuse submits its own command buffers to `queue` and
    /// waits on the device (`Device::poll`) when it must read something back, which also
    /// waits for the caller's submitted work.
    pub fn from_device(
        device: wgpu::Device,
        queue: wgpu::Queue,
        info: wgpu::AdapterInfo,
    ) -> Engine {
        Engine::from_context(Arc::new(GpuContext::from_device(device, queue, info)))
    }

    /// An engine on an existing [`GpuContext`] (shares its pipeline cache).
    pub fn from_context(ctx: Arc<GpuContext>) -> Engine {
        Engine {
            backend: Backend::Gpu(ctx),
        }
    }

    /// The device context, or `None` for the CPU engine.
    pub fn gpu(&self) -> Option<&Arc<GpuContext>> {
        match &self.backend {
            Backend::Gpu(ctx) => Some(ctx),
            Backend::Cpu => None,
        }
    }

    /// The backend graphs run on (for the building blocks in [`crate::models`]).
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// One line naming the adapter, API and driver, or the CPU reference.
    pub fn describe(&self) -> String {
        self.backend.describe()
    }

    /// Loads a model bundle folder (`volfuse.json`, `unet.safetensors`, `backbone/`).
    /// Weights go to the device on the first run.
    pub fn load_model(&self, dir: impl AsRef<Path>) -> Result<Model> {
        Ok(self.model(Bundle::load(dir.as_ref())?))
    }

    /// A model from an already loaded (possibly edited) [`Bundle`].
    pub fn model(&self, bundle: Bundle) -> Model {
        Model {
            engine: self.clone(),
            runner: Mutex::new(Runner::new(self.backend.clone())),
            bundle,
            batch: DEFAULT_BATCH,
            output_usage: OUTPUT_USAGE,
        }
    }
}

/// Slices per ViT call unless [`Model::with_batch`] says otherwise (as `volfuse run`).
pub const DEFAULT_BATCH: usize = 16;

/// Usage flags of every buffer in a [`DeviceSegmentation`], plus what
/// [`Model::with_output_usage`] adds.
pub const OUTPUT_USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

/// A model bundle loaded on an [`Engine`]. `Send + Sync`: share it with `Arc<Model>`;
/// concurrent calls on one `Model` run one after the other.
pub struct Model {
    engine: Engine,
    bundle: Bundle,
    runner: Mutex<Runner>,
    batch: usize,
    output_usage: wgpu::BufferUsages,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("bundle", &self.bundle.dir)
            .field("engine", &self.engine)
            .finish()
    }
}

/// The element type of a [`DeviceVolume`]'s voxels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VoxelType {
    U8,
    U16,
    F32,
}

impl VoxelType {
    /// Bytes per voxel.
    pub fn bytes(self) -> u64 {
        match self {
            VoxelType::U8 => 1,
            VoxelType::U16 => 2,
            VoxelType::F32 => 4,
        }
    }
}

/// A (D, H, W) volume in a caller's buffer on the engine's device: voxels tightly packed in
/// C order (x fastest), little-endian, starting at `offset`.
///
/// The buffer needs `COPY_SRC` usage; `offset` must be a multiple of 4 and the range read,
/// `D·H·W·bytes` rounded up to a multiple of 4, must lie inside the buffer (pad a u8 or u16
/// volume's buffer to a multiple of 4 bytes). Float voxels must be finite.
///
/// A buffer of another device of the same `wgpu::Instance`, or a destroyed buffer, is an
/// [`Error::Invalid`]. A buffer from a *different* `wgpu::Instance` cannot be told apart
/// by wgpu and trips an assertion inside wgpu-core: create the engine from the device that
/// owns your buffers ([`Engine::from_device`]).
#[derive(Clone, Copy, Debug)]
pub struct DeviceVolume<'a> {
    pub buffer: &'a wgpu::Buffer,
    pub offset: u64,
    pub shape: [usize; 3],
    pub voxel: VoxelType,
}

impl<'a> DeviceVolume<'a> {
    /// A volume at the start of `buffer`.
    pub fn new(buffer: &'a wgpu::Buffer, shape: [usize; 3], voxel: VoxelType) -> Self {
        DeviceVolume {
            buffer,
            offset: 0,
            shape,
            voxel,
        }
    }
}

/// The outputs of [`Model::segment_buffer`], in new buffers on the engine's device that the
/// caller owns. Every buffer has [`OUTPUT_USAGE`] (`STORAGE | COPY_SRC | COPY_DST`) plus
/// what [`Model::with_output_usage`] added, and holds exactly its array (sizes in bytes:
/// 4 per element).
///
/// The work that fills them has been submitted to the engine's queue but not waited for:
/// anything submitted to the same queue afterwards sees the results, and the `read_*`
/// methods wait.
#[derive(Debug)]
pub struct DeviceSegmentation {
    /// (K, d, h, w) f32.
    pub logits: wgpu::Buffer,
    /// (K, d, h, w) f32: softmax over classes, or sigmoid for affinity models.
    pub probabilities: wgpu::Buffer,
    /// (d, h, w) u32: argmax over classes.
    pub labels: wgpu::Buffer,
    /// (K, d, h, w).
    pub shape: [usize; 4],
    /// Things the caller should know (context ignored, degraded mode, …).
    pub notes: Vec<String>,
    ctx: Arc<GpuContext>,
}

impl DeviceSegmentation {
    fn voxels(&self) -> usize {
        let [_, d, h, w] = self.shape;
        d * h * w
    }

    /// Reads the labels back to the host (waits for the run).
    pub fn read_labels(&self) -> Result<Vec<u32>> {
        let words = self.ctx.read_buffer(&self.labels, self.voxels())?;
        Ok(words.iter().map(|v| v.to_bits()).collect())
    }

    /// Reads the probabilities back to the host (waits for the run).
    pub fn read_probabilities(&self) -> Result<Vec<f32>> {
        self.ctx
            .read_buffer(&self.probabilities, self.shape[0] * self.voxels())
    }

    /// Reads the logits back to the host (waits for the run).
    pub fn read_logits(&self) -> Result<Vec<f32>> {
        self.ctx
            .read_buffer(&self.logits, self.shape[0] * self.voxels())
    }

    /// Everything as a host [`Segmentation`], as [`Model::segment`] returns it.
    pub fn to_host(&self) -> Result<Segmentation> {
        let labels = self
            .read_labels()?
            .into_iter()
            .map(|l| {
                u16::try_from(l).map_err(|_| {
                    Error::Invalid(format!(
                        "label {l} does not fit the host Segmentation's u16 labels; read_labels() returns u32"
                    ))
                })
            })
            .collect::<Result<Vec<u16>>>()?;
        Ok(Segmentation {
            logits: self.read_logits()?,
            probabilities: self.read_probabilities()?,
            labels,
            shape: self.shape,
            notes: self.notes.clone(),
        })
    }
}

impl Model {
    /// The bundle: backbone, UNet and preprocessing settings.
    pub fn bundle(&self) -> &Bundle {
        &self.bundle
    }

    /// The engine this model runs on.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The output grid (d, h, w) every volume is resampled to.
    pub fn input_size(&self) -> [usize; 3] {
        self.bundle.unet.config.input_size
    }

    /// Output channels K (classes, or affinity channels).
    pub fn num_classes(&self) -> usize {
        self.bundle.unet.config.num_classes
    }

    /// Whether the model fuses a context volume (then pass one to the `segment` calls).
    pub fn fuses_context(&self) -> bool {
        self.bundle.unet.fusion
    }

    /// Slices per ViT call (default [`DEFAULT_BATCH`]); lowered automatically to fit the
    /// device's binding limit. Only speed and memory change.
    pub fn with_batch(mut self, slices: usize) -> Result<Model> {
        if slices == 0 {
            return Err(Error::Invalid(
                "the slice batch must be ≥ 1 (slices per ViT call)".into(),
            ));
        }
        self.batch = slices;
        Ok(self)
    }

    /// Adds usages (e.g. `VERTEX`, `UNIFORM`, `INDIRECT`) to the buffers of every later
    /// [`DeviceSegmentation`]. Mapping usages are refused: wgpu allows `MAP_READ` only with
    /// `COPY_DST` and `MAP_WRITE` only with `COPY_SRC`; read results with the `read_*`
    /// methods or copy them into your own staging buffer.
    pub fn with_output_usage(mut self, extra: wgpu::BufferUsages) -> Result<Model> {
        if extra.intersects(wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::MAP_WRITE) {
            return Err(Error::Invalid(format!(
                "output buffers cannot have mapping usages ({extra:?}): they are STORAGE buffers.\n  fix: use DeviceSegmentation::read_labels()/read_probabilities(), or copy into your own MAP_READ buffer"
            )));
        }
        self.output_usage = OUTPUT_USAGE | extra;
        Ok(self)
    }

    fn runner(&self) -> std::sync::MutexGuard<'_, Runner> {
        // A panic in another thread cannot leave a half-written result behind: every run
        // rewrites its inputs, so the runner stays usable.
        self.runner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Segments one tile given as host arrays. `context` is the concentric, coarser volume
    /// with the raw volume's voxel shape (ignored, with a note, by models without fusion;
    /// without it a fusing model runs degraded, also with a note).
    ///
    /// ```
    /// # fn main() -> volfuse::Result<()> {
    /// let model = volfuse::Engine::cpu()
    ///     .load_model(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/bundle_tiny_ctx"))?;
    /// let raw = volfuse::Volume::new([8, 8, 8], volfuse::VolumeData::F32((0..512).map(|i| i as f32).collect()))?;
    /// let seg = model.segment(&raw, None)?;
    /// assert!(seg.notes.iter().any(|n| n.contains("degraded")));
    /// let [k, d, h, w] = seg.shape;
    /// assert_eq!(seg.probabilities.len(), k * d * h * w);
    /// assert!(seg.labels.iter().all(|&l| (l as usize) < k));
    /// # Ok(())
    /// # }
    /// ```
    pub fn segment(&self, raw: &Volume, context: Option<&Volume>) -> Result<Segmentation> {
        let mut runner = self.runner();
        let run = |runner: &mut Runner| {
            crate::models::pipeline::segment(&self.bundle, runner, raw, context, self.batch)
        };
        match self.engine.gpu() {
            Some(ctx) => captured(ctx, "segment", || run(&mut runner)),
            None => run(&mut runner),
        }
    }

    /// Segments a volume of any size with the sliding window of [`crate::tiling::run_tiled`]
    /// (overlap, blending, context per tile, foreground skipping as `opts` says); finished
    /// z-planes go to the `outputs` writers (e.g. [`crate::io::volume::create_writer`]), so
    /// host memory is bounded by a tile row, not the volume.
    ///
    /// ```
    /// # fn main() -> volfuse::Result<()> {
    /// use volfuse::io::volume::MemoryWriter;
    /// use volfuse::tiling::{Context, Outputs, TileOptions};
    /// use volfuse::{Engine, Volume, VolumeData};
    /// let model = Engine::cpu()
    ///     .load_model(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/bundle_tiny_ctx"))?;
    /// let shape = [20, 24, 28];
    /// let n = shape.iter().product::<usize>();
    /// let raw = Volume::new(shape, VolumeData::U8((0..n).map(|i| (i * 7 % 251) as u8).collect()))?;
    /// let outputs = Outputs {
    ///     labels: Some(Box::new(MemoryWriter::new(&shape))),
    ///     probabilities: None,
    ///     logits: None,
    /// };
    /// let opts = TileOptions { tile: Some([16, 16, 16]), ..TileOptions::default() };
    /// let summary = model.segment_volume(&raw, Context::FromRaw { scale: 2 }, &opts, outputs)?;
    /// assert!(summary.tiles_run > 1);
    /// # Ok(())
    /// # }
    /// ```
    pub fn segment_volume(
        &self,
        raw: &Volume,
        context: crate::tiling::Context<'_>,
        opts: &crate::tiling::TileOptions,
        outputs: crate::tiling::Outputs,
    ) -> Result<crate::tiling::Summary> {
        let mut runner = self.runner();
        let run = |runner: &mut Runner| {
            crate::tiling::run_tiled(
                &self.bundle,
                runner,
                raw,
                context,
                opts,
                outputs,
                &mut |_| {},
            )
        };
        match self.engine.gpu() {
            Some(ctx) => captured(ctx, "segment_volume", || run(&mut runner)),
            None => run(&mut runner),
        }
    }

    /// Segments one tile whose voxels are in device buffers of the engine's device; the
    /// outputs stay on the device (see the [module docs](crate::engine) for what is copied where).
    /// An error on the CPU engine.
    ///
    /// ```
    /// # fn main() -> volfuse::Result<()> {
    /// use wgpu::util::DeviceExt;
    /// let engine = volfuse::Engine::new(&volfuse::GpuOptions::from_env()?)?;
    /// let model = engine.load_model(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/bundle_tiny_ctx"))?;
    /// let Some(ctx) = engine.gpu() else { unreachable!() };
    /// // A u16 volume in a buffer, as a viewer would hold it.
    /// let voxels: Vec<u16> = (0..12 * 10 * 14).map(|i| (i * 37 % 4096) as u16).collect();
    /// let buffer = ctx.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
    ///     label: Some("volume"),
    ///     contents: bytemuck::cast_slice(&voxels),
    ///     usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
    /// });
    /// let raw = volfuse::DeviceVolume::new(&buffer, [12, 10, 14], volfuse::VoxelType::U16);
    /// let seg = model.segment_buffer(&raw, Some(&raw))?;
    /// // seg.labels is a u32 STORAGE buffer (d, h, w) on ctx.device: bind it, or read it.
    /// assert_eq!(seg.labels.size(), 16 * 16 * 16 * 4);
    /// let labels = seg.read_labels()?;
    /// assert!(labels.iter().all(|&l| l < 3));
    /// # Ok(())
    /// # }
    /// ```
    pub fn segment_buffer(
        &self,
        raw: &DeviceVolume<'_>,
        context: Option<&DeviceVolume<'_>>,
    ) -> Result<DeviceSegmentation> {
        let ctx = self.engine.gpu().cloned().ok_or_else(|| {
            Error::Invalid(
                "segment_buffer needs a GPU engine (Engine::new or Engine::from_device); the CPU engine takes host volumes: use Model::segment".into(),
            )
        })?;
        let mut runner = self.runner();
        captured(&ctx, "segment_buffer", || {
            let raw = read_volume(&ctx, raw, "the raw volume")?;
            let context = context
                .map(|c| read_volume(&ctx, c, "the context volume"))
                .transpose()?;
            let f = unet_features(
                &self.bundle,
                &mut runner,
                &raw,
                context.as_ref(),
                self.batch,
            )?;
            let mut inputs = vec![GraphInput::Host(&f.features)];
            if let Some(c) = &f.context {
                inputs.push(GraphInput::Host(c));
            }
            let (key, build) = unet_graph(&self.bundle, f.context.is_some());
            let exe = runner.run_on_device(&key, build, &inputs)?;
            let [k, d, h, w] = f.shape;
            let n = d * h * w;
            let slot = |i: usize| {
                exe.output_buffer(i)
                    .ok_or_else(|| Error::Gpu("the UNet graph has fewer than three outputs".into()))
            };
            let new_buffer = |label: &str, bytes: u64| {
                ctx.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some(label),
                    size: bytes.max(4),
                    usage: self.output_usage,
                    mapped_at_creation: false,
                })
            };
            let bytes = (k * n * 4) as u64;
            let logits = new_buffer("volfuse logits", bytes);
            let probabilities = new_buffer("volfuse probabilities", bytes);
            let labels = new_buffer("volfuse labels", (n * 4) as u64);
            let params: [u32; 4] = [n as u32, 0, 0, 0];
            let to_u32 = ctx.dispatch(KernelArgs {
                shader: &crate::shaders::LABELS,
                entry: "labels_to_u32",
                constants: &[],
                buffers: &[slot(2)?, &labels],
                params: bytemuck::bytes_of(&params),
                workgroups: ctx.grid(n.div_ceil(64) as u64)?,
            })?;
            let mut enc = ctx
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("volfuse outputs"),
                });
            enc.copy_buffer_to_buffer(slot(0)?, 0, &logits, 0, bytes);
            enc.copy_buffer_to_buffer(slot(1)?, 0, &probabilities, 0, bytes);
            crate::gpu::record_all(&mut enc, &[to_u32]);
            ctx.queue.submit([enc.finish()]);
            Ok(DeviceSegmentation {
                logits,
                probabilities,
                labels,
                shape: f.shape,
                notes: f.notes,
                ctx: ctx.clone(),
            })
        })
    }
}

/// Runs `f` inside validation and out-of-memory error scopes, so that a wgpu error (a
/// buffer from another device, a device out of memory) comes back as [`Error::Gpu`]
/// instead of reaching the device's uncaptured-error handler (which panics by default).
fn captured<T>(ctx: &GpuContext, what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let oom = ctx.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
    let validation = ctx.device.push_error_scope(wgpu::ErrorFilter::Validation);
    let r = f();
    let v = pollster::block_on(validation.pop());
    let o = pollster::block_on(oom.pop());
    match (r, v.or(o)) {
        (Err(e), _) => Err(e),
        (Ok(_), Some(e)) => Err(Error::Gpu(format!("{what}: {e}"))),
        (Ok(t), None) => Ok(t),
    }
}

/// Reads a [`DeviceVolume`] to the host (the preprocessing runs there).
fn read_volume(ctx: &GpuContext, v: &DeviceVolume<'_>, what: &str) -> Result<Volume> {
    let n = v
        .shape
        .iter()
        .try_fold(1u64, |a, &s| a.checked_mul(s as u64))
        .ok_or_else(|| Error::Invalid(format!("{what}: shape {:?} is too large", v.shape)))?;
    if n == 0 {
        return Err(Error::Invalid(format!(
            "{what}: shape {:?} (D, H, W) must have every size ≥ 1",
            v.shape
        )));
    }
    let bytes = n * v.voxel.bytes();
    let span = bytes.div_ceil(wgpu::COPY_BUFFER_ALIGNMENT) * wgpu::COPY_BUFFER_ALIGNMENT;
    if !v.offset.is_multiple_of(wgpu::COPY_BUFFER_ALIGNMENT) {
        return Err(Error::Invalid(format!(
            "{what}: offset {} is not a multiple of 4 bytes (wgpu copies whole words)",
            v.offset
        )));
    }
    if !v.buffer.usage().contains(wgpu::BufferUsages::COPY_SRC) {
        return Err(Error::Invalid(format!(
            "{what}: the buffer lacks COPY_SRC usage ({:?}).\n  fix: create it with wgpu::BufferUsages::COPY_SRC",
            v.buffer.usage()
        )));
    }
    if v.offset
        .checked_add(span)
        .is_none_or(|end| end > v.buffer.size())
    {
        return Err(Error::Invalid(format!(
            "{what}: {:?} {:?} voxels need bytes {}..{} (rounded up to whole 4-byte words) but the buffer holds {}.\n  fix: check the shape and voxel type, or pad the buffer to a multiple of 4 bytes",
            v.shape,
            v.voxel,
            v.offset,
            v.offset + span,
            v.buffer.size()
        )));
    }
    let staging = ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("volfuse volume readback"),
        size: span,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    // A buffer of another device (or a destroyed one) fails here: report it now, before
    // any work is done with what would be zeros.
    let scope = ctx.device.push_error_scope(wgpu::ErrorFilter::Validation);
    let mut enc = ctx.device.create_command_encoder(&Default::default());
    enc.copy_buffer_to_buffer(v.buffer, v.offset, &staging, 0, span);
    ctx.queue.submit([enc.finish()]);
    if let Some(e) = pollster::block_on(scope.pop()) {
        return Err(Error::Invalid(format!(
            "{what}: the buffer cannot be read on the engine's device ({}): {e}\n  fix: create the buffer on the device the Engine was made from (Engine::from_device), and do not destroy it before the call returns",
            ctx.info.name
        )));
    }
    let slice = staging.slice(..);
    let (tx, rx) = std::sync::mpsc::channel();
    slice.map_async(wgpu::MapMode::Read, move |r| {
        let _ = tx.send(r);
    });
    ctx.wait()?;
    rx.recv()
        .map_err(|e| Error::Gpu(format!("{what}: {e}")))?
        .map_err(|e| Error::Gpu(format!("{what}: reading the volume buffer failed: {e}")))?;
    let view = slice
        .get_mapped_range()
        .map_err(|e| Error::Gpu(e.to_string()))?;
    let b = &view[..bytes as usize];
    let data = match v.voxel {
        VoxelType::U8 => VolumeData::U8(b.to_vec()),
        VoxelType::U16 => VolumeData::U16(
            b.chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect(),
        ),
        VoxelType::F32 => VolumeData::F32(
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
    };
    drop(view);
    staging.unmap();
    Volume::new(v.shape, data).map_err(|e| match e {
        Error::Invalid(m) => Error::Invalid(format!("{what}: {m}")),
        e => e,
    })
}

/// Compile-time proof of the thread-safety promises in the module docs.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<Engine>();
    send_sync::<Model>();
    send_sync::<DeviceSegmentation>();
    send_sync::<Segmentation>();
    send_sync::<DeviceVolume<'static>>();
};
