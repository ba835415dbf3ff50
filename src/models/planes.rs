//! Orthogonal-plane 3D DINOv3 features: dinov3_playground's `extract_dinov3_features_3d`
//! (shared/reference/dinov3_playground.md §d; step by step in `tools/reference_features.py`).
//!
//! For each plane — xy (normal D), xz (normal H), yz (normal W), in that order — the slices
//! along the normal are taken (downsampled along the normal first when `n_in/n_out > 2`),
//! resized to S×S, quantised to uint8, normalised, run through the ViT in batches, and the
//! patch tokens are lifted bilinearly to the plane's output grid and stacked into the
//! (C, d, h, w) output. The three planes are averaged.
//!
//! # Where each step runs
//!
//! | step | where | vs the reference |
//! |---|---|---|
//! | 1–5: normal downsample, linspace, slicing, skimage resize, quantisation, processor | host ([`super::preprocess`]) | bit-exact (f64/f32 as NumPy; resized and quantised slices identical) |
//! | 6: ViT (`last_hidden_state`) | runner backend ([`Vit::run`]) | fp32 instead of bf16 autocast (see below) |
//! | drop CLS + registers, (B, T, Cd) → (B, Cd, g, g) | host | exact (a copy) |
//! | optional projection (1×1×1 conv, Cd → C) | runner backend (`conv3d` k1) | see "Projection-first" |
//! | 7: bilinear lift to the plane grid | runner backend (`bilinear`) | PyTorch formula; last-bit FMA/ordering differences |
//! | 8–9: stacking, mean of the planes | host, into one accumulator | bit-exact `((xy + xz) + yz) / 3` in f32 |
//!
//! The normal-axis downsample is computed slice by slice from the original volume (the same
//! f32 `fma` and truncating cast as the reference's whole-volume `F.interpolate`), so the
//! downsampled volume is never stored; only the slices of one ViT batch are in memory.
//!
//! # Deviations from the reference, and their size
//!
//! - **fp32 ViT.** The reference runs the ViT under bf16 autocast; volfuse computes in fp32
//!   and matches an fp32 run of the reference. bf16 vs fp32 moves the features of the tiny
//!   test ViT by 6e-3–1.1e-2 of max |f| (tools/README.md, "bf16 autocast vs fp32").
//! - **Token lift.** Same taps and weights as `F.interpolate(bilinear, align_corners=False)`,
//!   evaluated separably on the device: differences in the last bits. With the ViT's own
//!   ~1e-6, the features agree with the fp32 reference to ≤ 7.4e-7 (CPU) and ≤ 1.3e-6
//!   (lavapipe) of max |f| on the fixtures.
//! - **Batching.** Slices go through the ViT in equal batches of at most
//!   [`FeatureParams::batch`] (further capped so one image batch fits a storage binding); a
//!   short last batch is padded with copies of its last slice, whose outputs are discarded,
//!   so one ViT graph serves a whole plane. The batch size only changes the matmul shapes
//!   (≤ 7e-7 on the fixtures, as in the reference with batch 3 vs 512).
//! - **Projection-first.** With a [`Projection`] (the UNet's `input_conv`, Cd → C) the map
//!   is applied to the tokens before the lift: everything after the ViT is linear and the
//!   bilinear weights of every output sum to 1, so `mean(lift(P·t + b)) = P·mean(lift(t)) +
//!   b` up to rounding (tests: ≤ 1e-5 relative to lift-then-project). The Cd-channel volume
//!   at full resolution then never exists.
//! - **Not supported:** `use_anyup=True` (a hub-loaded learned upsampler, weights
//!   unavailable) and the bf16 autocast itself.
//!
//! # Memory
//!
//! The output accumulator (C·d·h·w f32, host RAM) is the only full-resolution array; the
//! planes are added into it slice batch by slice batch. On the device live the ViT weights,
//! the activations of one ViT batch graph per distinct batch size (a short last batch is
//! padded, so a cube needs one), and one lift graph per distinct plane grid, lifting chunks
//! of at most 32 MiB of buffers. [`plan_memory`] adds these up from the graph plans.
//!
//! 512³ volume → 128³ features, S = 512, lavapipe (128 MiB bindings, so ViT-S runs 19
//! and ViT-L 7 slices per batch); MiB, "peak" = ViT + lift activations + accumulator:
//!
//! | backbone | C | ViT act. | lift | accumulator | peak | ÷ | + weights |
//! |---|---|---|---|---|---|---|---|
//! | ViT-S (384) | 384 | 401 | 26 | 3072 | 3498 | 1 | 3581 |
//! | ViT-S | 32 (projection-first) | 401 | 25 | 256 | 682 | 5.1× | 765 |
//! | ViT-S, batch 4 | 32 vs 384 | 84 | 14 | 256 | 355 | 9.0× | 438 |
//! | ViT-L (1024) | 1024 | 359 | 68 | 8192 | 8619 | 1 | 9775 |
//! | ViT-L | 64 | 359 | 25 | 512 | 895 | 9.6× | 2052 |
//! | ViT-L | 32 | 359 | 24 | 256 | 639 | 13.5× | 1796 |
//!
//! Projection-first divides the feature buffers by Cd/C; what remains is the ViT batch's
//! activations, which a smaller [`FeatureParams::batch`] reduces (the
//! `memory_figures_for_a_512_cube_to_128` test prints the whole table).

use super::preprocess::{self, Sample, Tap};
use super::runner::{Backend, Runner};
use super::vit::{Vit, VitConfig};
use crate::error::{Error, Result};
use crate::graph::{Constant, Graph};
use crate::io::npy::{DType, Npy, NpyData};
use crate::ops::conv3d::Conv3d;
use crate::ops::resize::Bilinear;
use std::path::Path;
use std::sync::Arc;

/// ImageNet normalisation (DINOv3's LVD-1689M backbones).
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];
/// SAT-493M normalisation (DINOv3's satellite backbones).
pub const SAT493M_MEAN: [f32; 3] = [0.430, 0.411, 0.296];
pub const SAT493M_STD: [f32; 3] = [0.213, 0.156, 0.143];

// ---------------------------------------------------------------------------------------------
// Planes
// ---------------------------------------------------------------------------------------------

/// One of the three orthogonal slicing planes of a (D, H, W) volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Plane {
    /// Slices `vol[z]` (H, W), stacked along D.
    Xy,
    /// Slices `vol[:, y, :]` (D, W), stacked along H.
    Xz,
    /// Slices `vol[:, :, x]` (D, H), stacked along W.
    Yz,
}

impl Plane {
    /// The reference's order.
    pub const ALL: [Plane; 3] = [Plane::Xy, Plane::Xz, Plane::Yz];

    pub fn name(self) -> &'static str {
        match self {
            Plane::Xy => "xy",
            Plane::Xz => "xz",
            Plane::Yz => "yz",
        }
    }

    /// The axis of (D, H, W) normal to the plane.
    pub fn normal_axis(self) -> usize {
        match self {
            Plane::Xy => 0,
            Plane::Xz => 1,
            Plane::Yz => 2,
        }
    }

    /// (rows, cols) of a slice of a volume of this shape: xy (H, W), xz (D, W), yz (D, H).
    pub fn slice_shape(self, [d, h, w]: [usize; 3]) -> [usize; 2] {
        match self {
            Plane::Xy => [h, w],
            Plane::Xz => [d, w],
            Plane::Yz => [d, h],
        }
    }

    /// The grid the tokens are lifted to for an output of `input_size` (d, h, w).
    pub fn output_hw(self, input_size: [usize; 3]) -> [usize; 2] {
        self.slice_shape(input_size)
    }
}

// ---------------------------------------------------------------------------------------------
// Volumes
// ---------------------------------------------------------------------------------------------

/// The voxels of a [`Volume`], in one of the dtypes the reference extraction handles.
#[derive(Clone, Debug, PartialEq)]
pub enum VolumeData {
    U8(Vec<u8>),
    U16(Vec<u16>),
    F32(Vec<f32>),
}

impl VolumeData {
    pub fn len(&self) -> usize {
        match self {
            VolumeData::U8(v) => v.len(),
            VolumeData::U16(v) => v.len(),
            VolumeData::F32(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The NumPy dtype name.
    pub fn dtype(&self) -> &'static str {
        match self {
            VolumeData::U8(_) => u8::NAME,
            VolumeData::U16(_) => u16::NAME,
            VolumeData::F32(_) => f32::NAME,
        }
    }
}

/// A (D, H, W) volume in C order: uint8, uint16 or finite float32.
#[derive(Clone, Debug, PartialEq)]
pub struct Volume {
    shape: [usize; 3],
    data: VolumeData,
}

impl Volume {
    /// Checks that the shape is (D, H, W) with positive sizes, matches the data, and that
    /// float data is finite.
    pub fn new(shape: [usize; 3], data: VolumeData) -> Result<Volume> {
        if shape.contains(&0) {
            return Err(Error::Invalid(format!(
                "the volume is empty: shape {shape:?} (D, H, W) must have every size ≥ 1"
            )));
        }
        let n = shape
            .iter()
            .try_fold(1usize, |a, &s| a.checked_mul(s))
            .ok_or_else(|| Error::Invalid(format!("volume shape {shape:?} is too large")))?;
        if n != data.len() {
            return Err(Error::Invalid(format!(
                "volume shape {shape:?} needs {n} voxels but {} were given",
                data.len()
            )));
        }
        if let VolumeData::F32(v) = &data {
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                let (z, y, x) = (
                    i / (shape[1] * shape[2]),
                    i / shape[2] % shape[1],
                    i % shape[2],
                );
                return Err(Error::Invalid(format!(
                    "the volume has a non-finite value ({}) at (z, y, x) = ({z}, {y}, {x}); \
                     the per-slice min-max quantisation needs finite voxels.\n  fix: replace \
                     them in NumPy, e.g. numpy.save(path, numpy.nan_to_num(vol))",
                    v[i]
                )));
            }
        }
        Ok(Volume { shape, data })
    }

    /// A volume from a `.npy` array: 3-D, uint8, uint16 or float32, finite.
    pub fn from_npy(npy: Npy) -> Result<Volume> {
        let shape: [usize; 3] = npy.shape[..].try_into().map_err(|_| {
            Error::Invalid(format!(
                "the volume must be 3-D (D, H, W), got shape {:?}{}",
                npy.shape,
                if npy.shape.len() == 2 {
                    ".\n  fix: a single image needs a depth axis, e.g. numpy.save(path, img[None])"
                } else {
                    ""
                }
            ))
        })?;
        let data = match npy.data {
            NpyData::U8(v) => VolumeData::U8(v),
            NpyData::U16(v) => VolumeData::U16(v),
            NpyData::F32(v) => VolumeData::F32(v),
            other => {
                let name = match other.dtype() {
                    DType::F64 => "float64",
                    DType::F16 => "float16",
                    DType::U32 => "uint32",
                    DType::I16 => "int16",
                    DType::I32 => "int32",
                    DType::I64 => "int64",
                    DType::Bool => "bool",
                    _ => "unknown",
                };
                return Err(Error::Invalid(format!(
                    "volume dtype {name} is not supported: feature extraction takes uint8, \
                     uint16 or float32 (as dinov3_playground).\n  fix: convert in NumPy, e.g. \
                     numpy.save(path, vol.astype(numpy.float32))"
                )));
            }
        };
        Volume::new(shape, data)
    }

    /// Reads a `.npy` volume.
    pub fn read(path: &Path) -> Result<Volume> {
        let npy = crate::io::npy::read(path)?;
        Volume::from_npy(npy).map_err(|e| match e {
            Error::Invalid(m) => Error::io(path, m),
            e => e,
        })
    }

    /// (D, H, W).
    pub fn shape(&self) -> [usize; 3] {
        self.shape
    }

    pub fn data(&self) -> &VolumeData {
        &self.data
    }

    /// The NumPy dtype name.
    pub fn dtype(&self) -> &'static str {
        self.data.dtype()
    }
}

// ---------------------------------------------------------------------------------------------
// Parameters and projection
// ---------------------------------------------------------------------------------------------

/// The settings of one extraction (dinov3_playground's `extract_dinov3_features_3d`
/// arguments).
#[derive(Clone, Debug, PartialEq)]
pub struct FeatureParams {
    /// Output grid (d, h, w), whatever the volume's shape.
    pub input_size: [usize; 3],
    /// S: every slice is resized to S×S before the ViT (`dinov3_slice_size`).
    pub slice_size: usize,
    /// The image processor's normalisation.
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// Average xy, xz and yz (`use_orthogonal_planes=True`); false = xy only.
    pub orthogonal_planes: bool,
    /// Slices per ViT call (the reference uses 512); capped by the device's binding limit.
    pub batch: usize,
}

impl FeatureParams {
    /// ImageNet statistics, orthogonal planes, batches of 512 (the reference's defaults).
    pub fn new(input_size: [usize; 3], slice_size: usize) -> Self {
        FeatureParams {
            input_size,
            slice_size,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
            orthogonal_planes: true,
            batch: 512,
        }
    }

    /// The planes extracted, in order.
    pub fn planes(&self) -> &'static [Plane] {
        if self.orthogonal_planes {
            &Plane::ALL
        } else {
            &Plane::ALL[..1]
        }
    }

    /// Checks the parameters against the backbone.
    pub fn validate(&self, cfg: &VitConfig) -> Result<()> {
        if self.input_size.contains(&0) {
            return Err(Error::Invalid(format!(
                "the output size {:?} must have every size ≥ 1",
                self.input_size
            )));
        }
        if self.slice_size < cfg.patch_size {
            return Err(Error::Invalid(format!(
                "the slice size {} is smaller than the ViT's patch size {}",
                self.slice_size, cfg.patch_size
            )));
        }
        if cfg.num_channels != 3 {
            return Err(Error::Invalid(format!(
                "the backbone takes {} channels; feature extraction feeds RGB (3) slices",
                cfg.num_channels
            )));
        }
        if self.batch == 0 {
            return Err(Error::Invalid("the slice batch must be ≥ 1".into()));
        }
        if !self.mean.iter().chain(&self.std).all(|v| v.is_finite()) || self.std.contains(&0.0) {
            return Err(Error::Invalid(format!(
                "the normalisation must be finite with a nonzero std, got mean {:?} std {:?}",
                self.mean, self.std
            )));
        }
        Ok(())
    }
}

/// A 1×1×1 linear map of the features, `y = W·x + b` with W (C_out, Cd) and b (C_out): the
/// UNet's `input_conv`, applied to the tokens before the lift ("projection-first").
#[derive(Clone, Debug)]
pub struct Projection {
    weight: Arc<Constant>,
    bias: Arc<Constant>,
    out_channels: usize,
    in_channels: usize,
}

impl Projection {
    /// `weight` is (C_out, C_in) in C order (a (C_out, C_in, 1, 1, 1) conv weight has the
    /// same layout), `bias` is (C_out).
    pub fn new(
        weight: Vec<f32>,
        bias: Vec<f32>,
        out_channels: usize,
        in_channels: usize,
    ) -> Result<Projection> {
        if out_channels == 0 || in_channels == 0 {
            return Err(Error::Invalid(
                "a projection needs at least one input and one output channel".into(),
            ));
        }
        if weight.len() != out_channels * in_channels || bias.len() != out_channels {
            return Err(Error::Invalid(format!(
                "a projection {in_channels} → {out_channels} needs a ({out_channels}, \
                 {in_channels}) weight and a ({out_channels}) bias, got {} and {} values",
                weight.len(),
                bias.len()
            )));
        }
        if !weight.iter().chain(&bias).all(|v| v.is_finite()) {
            return Err(Error::Invalid(
                "the projection weights contain NaN or infinity".into(),
            ));
        }
        Ok(Projection {
            weight: Constant::new(weight),
            bias: Constant::new(bias),
            out_channels,
            in_channels,
        })
    }

    /// As [`Projection::new`] on weights shared with their owner (a model's conv), so the
    /// same weights give the same projection (graph keys and device constants reused).
    pub(crate) fn shared(
        weight: Arc<Constant>,
        bias: Arc<Constant>,
        out_channels: usize,
        in_channels: usize,
    ) -> Result<Projection> {
        if out_channels == 0
            || in_channels == 0
            || weight.len() != out_channels * in_channels
            || bias.len() != out_channels
        {
            return Err(Error::Invalid(format!(
                "a projection {in_channels} → {out_channels} needs a ({out_channels}, \
                 {in_channels}) weight and a ({out_channels}) bias, got {} and {} values",
                weight.len(),
                bias.len()
            )));
        }
        Ok(Projection {
            weight,
            bias,
            out_channels,
            in_channels,
        })
    }

    pub fn out_channels(&self) -> usize {
        self.out_channels
    }

    pub fn in_channels(&self) -> usize {
        self.in_channels
    }

    /// The (C_out, C_in) weight (read back if it was spilled, see [`Constant::spill`]).
    pub fn weight(&self) -> Result<Arc<Vec<f32>>> {
        self.weight.values()
    }

    /// The (C_out) bias.
    pub fn bias(&self) -> Result<Arc<Vec<f32>>> {
        self.bias.values()
    }

    /// Applies the map to a (C_in, N) array on the host (accumulating in f64): the
    /// lift-then-project reference.
    pub fn apply(&self, features: &[f32]) -> Result<Vec<f32>> {
        let (ci, co) = (self.in_channels, self.out_channels);
        if !features.len().is_multiple_of(ci) {
            return Err(Error::Invalid(format!(
                "{} values are not ({ci}, N) features",
                features.len()
            )));
        }
        let n = features.len() / ci;
        let (weight, bias) = (self.weight()?, self.bias()?);
        let mut acc = vec![0f64; co * n];
        for o in 0..co {
            let row = &mut acc[o * n..(o + 1) * n];
            row.iter_mut().for_each(|v| *v = bias[o] as f64);
            for c in 0..ci {
                let wt = weight[o * ci + c] as f64;
                for (a, x) in row.iter_mut().zip(&features[c * n..(c + 1) * n]) {
                    *a += wt * *x as f64;
                }
            }
        }
        Ok(acc.into_iter().map(|v| v as f32).collect())
    }

    fn check(&self, cd: usize) -> Result<()> {
        if self.in_channels != cd {
            return Err(Error::Invalid(format!(
                "the projection takes {} channels but the backbone gives {cd}",
                self.in_channels
            )));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Slicing (steps 1–5)
// ---------------------------------------------------------------------------------------------

/// How one plane's slices are taken from a volume: the normal-axis downsample (if any) and
/// the linspace picks.
#[derive(Clone, Debug)]
pub struct PlaneSampler {
    plane: Plane,
    shape: [usize; 3],
    downsample: Option<Vec<Tap>>,
    indices: Vec<usize>,
}

impl PlaneSampler {
    /// The sampler of `plane` for `n_out` slices from a volume of `shape`.
    pub fn new(shape: [usize; 3], plane: Plane, n_out: usize) -> Self {
        let axis = plane.normal_axis();
        let n_in = shape[axis];
        let (downsample, n) = if preprocess::needs_normal_downsample(n_in, n_out) {
            (Some(preprocess::downsample_taps(n_in, n_out)), n_out)
        } else {
            (None, n_in)
        };
        PlaneSampler {
            plane,
            shape,
            downsample,
            indices: preprocess::pick_slice_indices(n, n_out),
        }
    }

    /// Whether the normal axis is downsampled first.
    pub fn downsampled(&self) -> bool {
        self.downsample.is_some()
    }

    /// The picked slice indices (into the downsampled normal axis when downsampled).
    pub fn indices(&self) -> &[usize] {
        &self.indices
    }

    /// (rows, cols) of every slice.
    pub fn slice_shape(&self) -> [usize; 2] {
        self.plane.slice_shape(self.shape)
    }

    /// Slice `j` (0 ≤ j < n_out) after steps 1–3: `vol[k]`, `vol[:, k, :]` or `vol[:, :, k]`
    /// of the (downsampled) volume, `k = indices[j]`. `data` must have the sampler's shape.
    pub fn slice<T: Sample>(&self, data: &[T], j: usize) -> Vec<T> {
        let [_, h, w] = self.shape;
        let k = self.indices[j];
        let [rows, cols] = self.slice_shape();
        // Flat index of (row, col) at normal position `n`.
        let at = |r: usize, c: usize, n: usize| match self.plane {
            Plane::Xy => (n * h + r) * w + c,
            Plane::Xz => (r * h + n) * w + c,
            Plane::Yz => (r * h + c) * w + n,
        };
        let mut out = Vec::with_capacity(rows * cols);
        match &self.downsample {
            None => {
                for r in 0..rows {
                    out.extend((0..cols).map(|c| data[at(r, c, k)]));
                }
            }
            Some(taps) => {
                let t = taps[k];
                for r in 0..rows {
                    out.extend((0..cols).map(|c| {
                        let (x0, x1) = (data[at(r, c, t.i0)], data[at(r, c, t.i1)]);
                        T::from_f32(preprocess::lerp_fma(t, x0.to_f32(), x1.to_f32()))
                    }));
                }
            }
        }
        out
    }

    /// Slice `j` after steps 1–5: the S×S resized slice (input dtype) and its uint8 codes.
    pub fn prepare<T: Sample>(&self, data: &[T], j: usize, s: usize) -> (Vec<T>, Vec<u8>) {
        let sl = self.slice(data, j);
        let resized = preprocess::resize_slice(&sl, self.slice_shape(), [s, s]);
        let q = preprocess::quantize_slice(&resized);
        (resized, q)
    }
}

/// (B, T, Cd) hidden states → patch tokens (B, Cd, g, g): the first T − g² tokens (CLS and
/// registers) dropped, row-major patches.
fn patch_tokens(hidden: &[f32], b: usize, cd: usize, g2: usize) -> Vec<f32> {
    let t = hidden.len() / (b * cd).max(1);
    let prefix = t - g2;
    let mut out = vec![0f32; b * cd * g2];
    for bi in 0..b {
        for p in 0..g2 {
            let row = &hidden[(bi * t + prefix + p) * cd..][..cd];
            for (c, v) in row.iter().enumerate() {
                out[(bi * cd + c) * g2 + p] = *v;
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Scheduling
// ---------------------------------------------------------------------------------------------

/// How one plane is processed: slice count, output grid and batch sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PlanePlan {
    plane: Plane,
    slices: usize,
    out_hw: [usize; 2],
    vit_batch: usize,
    lift_batch: usize,
}

/// Bytes of lift-graph buffers per chunk of slices (at least one slice): the lift is a
/// cheap memory-bound op, so larger chunks would only add device memory.
const LIFT_CHUNK_BYTES: u64 = 32 << 20;

/// The batch size that splits `n` into the fewest batches of at most `cap`, as evenly as
/// possible (so padding the last one wastes less than one slice per batch).
fn balanced(n: usize, cap: usize) -> usize {
    let batches = n.div_ceil(cap.max(1)).max(1);
    n.div_ceil(batches).max(1)
}

/// On the CPU backend and on CPU-like adapters (lavapipe, whose device memory is host
/// RAM) a ViT batch is capped so its largest activation (the MLP hidden layer) stays within
/// this many bytes: larger batches run no faster there (CPU, ViT-S 256²: 0.239 CPU-s per
/// image at batch 32, 0.235 at 16; lavapipe, loaded: 1.25 at 32, 0.92 at 16; idle, session
/// 10: 4.65–4.71 images/s at 16, 4.66–4.68 at 8) but hold more memory (CPU 282 vs 188 MB;
/// lavapipe peak RSS 686 vs 545–562 MiB at 32 vs 16). ViT-S 256² gets batches of 8.
pub(crate) const CPU_VIT_ACTIVATION_BYTES: u64 = 13 << 20;

/// The most slices per ViT batch for S×S slices: `batch`, limited by what one storage
/// binding of `backend` holds and, on the CPU or a CPU-like adapter, by
/// [`CPU_VIT_ACTIVATION_BYTES`].
pub(crate) fn vit_batch_cap(vit: &Vit, backend: &Backend, batch: usize, s: usize) -> usize {
    let mut cap = batch.min(vit.max_batch(backend, s, s));
    let cpu_like = match backend {
        Backend::Cpu => true,
        Backend::Gpu(ctx) => ctx.caps.cpu_like,
    };
    if cpu_like {
        let cfg = &vit.config;
        let widest = cfg.intermediate_size.max(cfg.hidden_size);
        let per_image = (cfg.tokens(s, s) * widest * 4) as u64;
        cap = cap.min((CPU_VIT_ACTIVATION_BYTES / per_image.max(1)) as usize);
    }
    cap.max(1)
}

/// Batch sizes per plane; `lift_cap` (tests) further limits the lift chunks.
fn schedule(
    vit: &Vit,
    params: &FeatureParams,
    channels: usize,
    backend: &Backend,
    lift_cap: Option<usize>,
) -> Result<Vec<PlanePlan>> {
    let cfg = &vit.config;
    let s = params.slice_size;
    let g = s / cfg.patch_size;
    let cd = cfg.hidden_size;
    let vit_cap = vit_batch_cap(vit, backend, params.batch, s);
    params
        .planes()
        .iter()
        .map(|&plane| {
            let slices = params.input_size[plane.normal_axis()];
            let out_hw = plane.output_hw(params.input_size);
            let vit_batch = balanced(slices, vit_cap);
            // Per slice: the largest buffer of the lift graph, and all of its buffers.
            let (ab, g2) = (out_hw[0] * out_hw[1], g * g);
            let per_slice = (channels * ab).max(cd * g2).max(channels * g2) as u64 * 4;
            let all = if channels == cd {
                cd * g2 + cd * ab
            } else {
                cd * g2 + channels * g2 + channels * ab
            } as u64
                * 4;
            let fit = backend.max_binding() / per_slice.max(1);
            if fit == 0 {
                return Err(Error::TooLarge {
                    what: format!(
                        "the {} lift of one slice to {}×{} with {channels} channels",
                        plane.name(),
                        out_hw[0],
                        out_hw[1]
                    ),
                    bytes: per_slice,
                    limit: backend.max_binding(),
                    adapter: backend.describe(),
                });
            }
            let cap = fit
                .min(LIFT_CHUNK_BYTES / all.max(1))
                .min(lift_cap.unwrap_or(usize::MAX) as u64)
                .max(1);
            let lift_batch = balanced(vit_batch, cap.min(vit_batch as u64) as usize);
            Ok(PlanePlan {
                plane,
                slices,
                out_hw,
                vit_batch,
                lift_batch,
            })
        })
        .collect()
}

/// The lift graph: tokens (B, Cd, g, g) → [1×1×1 projection] → bilinear to `out_hw`.
fn lift_graph(
    b: usize,
    cd: usize,
    g: usize,
    out_hw: [usize; 2],
    projection: Option<&Projection>,
) -> Result<Graph> {
    let mut gr = Graph::new();
    let y = match projection {
        None => {
            let x = gr.input("tokens", &[b, cd, g, g]);
            gr.op(Bilinear::to(out_hw), &[x])?
        }
        Some(p) => {
            let co = p.out_channels;
            let x = gr.input("tokens", &[b, cd, 1, g, g]);
            let w = gr.constant("projection.weight", p.weight.clone(), &[co, cd, 1, 1, 1])?;
            let bias = gr.constant("projection.bias", p.bias.clone(), &[co])?;
            let y = gr.op(Conv3d::new(1), &[x, w, bias])?;
            gr.op(Bilinear::to(out_hw), &[y])?
        }
    };
    gr.output(y);
    Ok(gr)
}

fn lift_key(
    b: usize,
    cd: usize,
    g: usize,
    out_hw: [usize; 2],
    projection: Option<&Projection>,
) -> String {
    let proj = projection.map_or("none".to_string(), |p| {
        format!("{}@{:p}", p.out_channels, Arc::as_ptr(&p.weight))
    });
    format!(
        "features lift {b}x{cd}x{g}x{g} -> {}x{} projection {proj}",
        out_hw[0], out_hw[1]
    )
}

// ---------------------------------------------------------------------------------------------
// Extraction
// ---------------------------------------------------------------------------------------------

/// Adds (or, for the first plane, writes) `count` lifted slices (count, C, a, b), the first
/// being slice `j0` of `plane`, into the (C, d, h, w) output.
#[allow(clippy::too_many_arguments)]
fn scatter(
    lifted: &[f32],
    plane: Plane,
    j0: usize,
    count: usize,
    c: usize,
    [d, h, w]: [usize; 3],
    out: &mut [f32],
    first: bool,
) {
    let put = |dst: &mut [f32], src: &[f32]| {
        if first {
            dst.copy_from_slice(src);
        } else {
            dst.iter_mut().zip(src).for_each(|(o, v)| *o += v);
        }
    };
    let [a, b] = plane.output_hw([d, h, w]);
    for r in 0..count {
        let j = j0 + r;
        for ch in 0..c {
            let src = &lifted[(r * c + ch) * a * b..][..a * b];
            match plane {
                Plane::Xy => put(&mut out[(ch * d + j) * h * w..][..h * w], src),
                Plane::Xz => {
                    for z in 0..d {
                        put(
                            &mut out[((ch * d + z) * h + j) * w..][..w],
                            &src[z * w..][..w],
                        );
                    }
                }
                Plane::Yz => {
                    for z in 0..d {
                        for y in 0..h {
                            let o = &mut out[((ch * d + z) * h + y) * w + j];
                            let v = src[z * h + y];
                            if first {
                                *o = v;
                            } else {
                                *o += v;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Pixels (n, 3, S, S) of slices `j0..j0+n` of a plane, padded to `batch` images with
/// copies of the last one.
fn batch_pixels<T: Sample>(
    sampler: &PlaneSampler,
    data: &[T],
    j0: usize,
    n: usize,
    batch: usize,
    params: &FeatureParams,
) -> Vec<f32> {
    let s = params.slice_size;
    let per = 3 * s * s;
    let mut pixels = vec![0f32; batch * per];
    // Slices are independent: each thread prepares whole slices into its part of the batch.
    crate::ops::par::for_units(&mut pixels[..n * per], per, 1, |i0, part| {
        let mut buf = Vec::with_capacity(per);
        for (i, dst) in part.chunks_mut(per).enumerate() {
            let (_, q) = sampler.prepare(data, j0 + i0 + i, s);
            buf.clear();
            preprocess::preprocess_pixels(&q, params.mean, params.std, &mut buf);
            dst.copy_from_slice(&buf);
        }
    });
    pixels.truncate(n * per);
    let last = pixels.len() - per;
    for _ in n..batch {
        pixels.extend_from_within(last..last + per);
    }
    pixels
}

#[allow(clippy::too_many_arguments)]
fn run_plane<T: Sample>(
    vit: &Vit,
    runner: &mut Runner,
    data: &[T],
    shape: [usize; 3],
    params: &FeatureParams,
    projection: Option<&Projection>,
    pp: PlanePlan,
    out: &mut [f32],
    first: bool,
) -> Result<()> {
    let cfg = &vit.config;
    let s = params.slice_size;
    let g = s / cfg.patch_size;
    let cd = cfg.hidden_size;
    let c = projection.map_or(cd, |p| p.out_channels);
    let sampler = PlaneSampler::new(shape, pp.plane, pp.slices);
    let (vb, lb) = (pp.vit_batch, pp.lift_batch);
    let per_tokens = cd * g * g;
    let key = lift_key(lb, cd, g, pp.out_hw, projection);
    let mut start = 0;
    while start < pp.slices {
        let real = vb.min(pp.slices - start);
        let pixels = batch_pixels(&sampler, data, start, real, vb, params);
        let hidden = vit.run(runner, &pixels, vb, s, s, vb)?;
        let tokens = patch_tokens(&hidden, vb, cd, g * g);
        drop(hidden);
        let mut l0 = 0;
        while l0 < real {
            let lr = lb.min(real - l0);
            let chunk = &tokens[l0 * per_tokens..(l0 + lb).min(vb) * per_tokens];
            let padded;
            let input: &[f32] = if chunk.len() == lb * per_tokens {
                chunk
            } else {
                let mut p = chunk.to_vec();
                p.resize(lb * per_tokens, 0.0);
                padded = p;
                &padded
            };
            let lifted = runner
                .run_beside(
                    &key,
                    || lift_graph(lb, cd, g, pp.out_hw, projection),
                    &[input],
                )?
                .into_iter()
                .next()
                .ok_or_else(|| Error::Invalid("the lift graph returned no output".into()))?;
            scatter(
                &lifted,
                pp.plane,
                start + l0,
                lr,
                c,
                params.input_size,
                out,
                first,
            );
            l0 += lr;
        }
        start += real;
    }
    Ok(())
}

/// dinov3_playground's `extract_dinov3_features_3d` for one volume: the (C, d, h, w) f32
/// feature volume, (d, h, w) = `params.input_size` whatever the volume's shape, C = the
/// ViT width, or `projection`'s output channels when one is given (applied to the tokens
/// before the lift, see the module docs). The ViT and the lift run on `runner`'s backend.
pub fn extract_features(
    vit: &Vit,
    runner: &mut Runner,
    volume: &Volume,
    params: &FeatureParams,
    projection: Option<&Projection>,
) -> Result<Vec<f32>> {
    extract_impl(vit, runner, volume, params, projection, None)
}

fn extract_impl(
    vit: &Vit,
    runner: &mut Runner,
    volume: &Volume,
    params: &FeatureParams,
    projection: Option<&Projection>,
    lift_cap: Option<usize>,
) -> Result<Vec<f32>> {
    params.validate(&vit.config)?;
    let cd = vit.config.hidden_size;
    if let Some(p) = projection {
        p.check(cd)?;
    }
    let c = projection.map_or(cd, |p| p.out_channels);
    let [d, h, w] = params.input_size;
    let n = [c, d, h, w]
        .iter()
        .try_fold(1usize, |a, &s| a.checked_mul(s))
        .ok_or_else(|| Error::Invalid(format!("a ({c}, {d}, {h}, {w}) output is too large")))?;
    let mut out: Vec<f32> = Vec::new();
    out.try_reserve_exact(n).map_err(|_| {
        Error::Invalid(format!(
            "cannot allocate the ({c}, {d}, {h}, {w}) feature volume ({} bytes){}",
            n as u64 * 4,
            if projection.is_none() {
                "; a projection (the UNet's input_conv) applied first makes it smaller"
            } else {
                ""
            }
        ))
    })?;
    // Zeroed by the allocator (a large volume gets fresh zero pages from the system), not
    // written here: its pages are touched only when the first lift scatters into them,
    // after the ViT has taken the device from the previous stage (a UNet on a software
    // adapter) — a buffer written now would sit beside that stage's memory.
    drop(out);
    let mut out = vec![0.0f32; n];
    let plans = schedule(vit, params, c, &runner.backend, lift_cap)?;
    for (k, pp) in plans.iter().enumerate() {
        let first = k == 0;
        let shape = volume.shape;
        match &volume.data {
            VolumeData::U8(v) => run_plane(
                vit, runner, v, shape, params, projection, *pp, &mut out, first,
            )?,
            VolumeData::U16(v) => run_plane(
                vit, runner, v, shape, params, projection, *pp, &mut out, first,
            )?,
            VolumeData::F32(v) => run_plane(
                vit, runner, v, shape, params, projection, *pp, &mut out, first,
            )?,
        }
    }
    if plans.len() == 3 {
        out.iter_mut().for_each(|v| *v /= 3.0);
    }
    Ok(out)
}

/// The intermediates of one plane, as the reference's debug output (`tests/fixtures/
/// features_*/*_xy.npy`).
#[derive(Clone, Debug)]
pub struct PlaneDebug {
    /// Whether the normal axis was downsampled first.
    pub downsampled: bool,
    /// The picked slice indices.
    pub indices: Vec<usize>,
    /// The slices after the skimage resize, (n, S, S) in the volume's dtype.
    pub resized: VolumeData,
    /// The quantised slices (n, S, S).
    pub quantized: Vec<u8>,
    /// The processor output (n, 3, S, S).
    pub pixels: Vec<f32>,
    /// The patch tokens (Cd, n, g, g), before the lift.
    pub tokens: Vec<f32>,
}

fn debug_typed<T: Sample>(
    vit: &Vit,
    runner: &mut Runner,
    data: &[T],
    shape: [usize; 3],
    plane: Plane,
    params: &FeatureParams,
    wrap: fn(Vec<T>) -> VolumeData,
) -> Result<PlaneDebug> {
    let s = params.slice_size;
    let cd = vit.config.hidden_size;
    let g2 = (s / vit.config.patch_size).pow(2);
    let n = params.input_size[plane.normal_axis()];
    let sampler = PlaneSampler::new(shape, plane, n);
    let (mut resized, mut quantized, mut pixels) = (Vec::new(), Vec::new(), Vec::new());
    for j in 0..n {
        let (r, q) = sampler.prepare(data, j, s);
        preprocess::preprocess_pixels(&q, params.mean, params.std, &mut pixels);
        resized.extend(r);
        quantized.extend(q);
    }
    let hidden = vit.run(runner, &pixels, n, s, s, params.batch)?;
    let bt = patch_tokens(&hidden, n, cd, g2);
    let mut tokens = vec![0f32; bt.len()];
    for b in 0..n {
        for c in 0..cd {
            tokens[(c * n + b) * g2..][..g2].copy_from_slice(&bt[(b * cd + c) * g2..][..g2]);
        }
    }
    Ok(PlaneDebug {
        downsampled: sampler.downsampled(),
        indices: sampler.indices().to_vec(),
        resized: wrap(resized),
        quantized,
        pixels,
        tokens,
    })
}

/// Steps 1–6 of one plane with every intermediate kept (for tests and debugging; holds all
/// slices of the plane at once).
pub fn debug_plane(
    vit: &Vit,
    runner: &mut Runner,
    volume: &Volume,
    plane: Plane,
    params: &FeatureParams,
) -> Result<PlaneDebug> {
    params.validate(&vit.config)?;
    let shape = volume.shape;
    match &volume.data {
        VolumeData::U8(v) => debug_typed(vit, runner, v, shape, plane, params, VolumeData::U8),
        VolumeData::U16(v) => debug_typed(vit, runner, v, shape, plane, params, VolumeData::U16),
        VolumeData::F32(v) => debug_typed(vit, runner, v, shape, plane, params, VolumeData::F32),
    }
}

// ---------------------------------------------------------------------------------------------
// Memory
// ---------------------------------------------------------------------------------------------

/// Memory of one extraction, from the graph plans (activation buffers with liveness reuse;
/// the device rounds each buffer up to 256 bytes / 64 KiB, not counted).
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryEstimate {
    /// Output channels (Cd, or C_out with a projection).
    pub channels: usize,
    /// Distinct ViT batch sizes (one prepared ViT graph each).
    pub vit_batches: Vec<usize>,
    /// Distinct lift graphs: (slices, rows, cols).
    pub lift_graphs: Vec<(usize, usize, usize)>,
    /// ViT weights on the device (identical with or without a projection).
    pub vit_weight_bytes: u64,
    /// Activation buffers of the prepared ViT graphs.
    pub vit_activation_bytes: u64,
    /// The projection's weights on the device.
    pub lift_weight_bytes: u64,
    /// Activation buffers of the prepared lift graphs.
    pub lift_activation_bytes: u64,
    /// The (C, d, h, w) output accumulator (host RAM in this implementation).
    pub accumulator_bytes: u64,
}

impl MemoryEstimate {
    /// Peak bytes of the extraction's buffers: graph activations + accumulator (weights
    /// excluded: they are the same with and without projection-first).
    pub fn peak_bytes(&self) -> u64 {
        self.vit_activation_bytes + self.lift_activation_bytes + self.accumulator_bytes
    }

    /// [`MemoryEstimate::peak_bytes`] plus all weights.
    pub fn total_bytes(&self) -> u64 {
        self.peak_bytes() + self.vit_weight_bytes + self.lift_weight_bytes
    }

    /// One line per component.
    pub fn describe(&self) -> String {
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        format!(
            "C {}: ViT activations {:.1} MiB (batches {:?}), lift activations {:.1} MiB \
             (graphs {:?}), accumulator {:.1} MiB → peak {:.1} MiB; weights ViT {:.1} MiB + \
             projection {:.3} MiB → total {:.1} MiB",
            self.channels,
            mib(self.vit_activation_bytes),
            self.vit_batches,
            mib(self.lift_activation_bytes),
            self.lift_graphs,
            mib(self.accumulator_bytes),
            mib(self.peak_bytes()),
            mib(self.vit_weight_bytes),
            mib(self.lift_weight_bytes),
            mib(self.total_bytes()),
        )
    }
}

/// The memory [`extract_features`] needs for `params` on `backend` with a backbone of
/// `vit_config`, with or without a projection to `projection_channels`, from the plans of
/// the graphs it would prepare (built with random weights; nothing runs). The volume shape
/// does not enter the device figure: slicing and resizing happen on the host, one batch of
/// S×S slices at a time.
pub fn plan_memory(
    vit_config: &VitConfig,
    params: &FeatureParams,
    volume_shape: [usize; 3],
    projection_channels: Option<usize>,
    backend: &Backend,
) -> Result<MemoryEstimate> {
    params.validate(vit_config)?;
    let vit = Vit::random(vit_config.clone(), 0)?;
    plan_memory_for(&vit, params, volume_shape, projection_channels, backend)
}

/// [`plan_memory`] for a loaded (or random) backbone: builds the same graphs `vit` would
/// run, without running them.
pub fn plan_memory_for(
    vit: &Vit,
    params: &FeatureParams,
    volume_shape: [usize; 3],
    projection_channels: Option<usize>,
    backend: &Backend,
) -> Result<MemoryEstimate> {
    let vit_config = &vit.config;
    params.validate(vit_config)?;
    if volume_shape.contains(&0) {
        return Err(Error::Invalid(format!(
            "the volume shape {volume_shape:?} must have every size ≥ 1"
        )));
    }
    let cd = vit_config.hidden_size;
    let s = params.slice_size;
    let g = s / vit_config.patch_size;
    let projection = match projection_channels {
        Some(co) => Some(Projection::new(vec![0.0; co * cd], vec![0.0; co], co, cd)?),
        None => None,
    };
    let c = projection_channels.unwrap_or(cd);
    let plans = schedule(vit, params, c, backend, None)?;
    let mut est = MemoryEstimate {
        channels: c,
        vit_batches: Vec::new(),
        lift_graphs: Vec::new(),
        vit_weight_bytes: 0,
        vit_activation_bytes: 0,
        lift_weight_bytes: 0,
        lift_activation_bytes: 0,
        accumulator_bytes: params.input_size.iter().map(|&v| v as u64).product::<u64>()
            * c as u64
            * 4,
    };
    for pp in &plans {
        if !est.vit_batches.contains(&pp.vit_batch) {
            let plan = vit.graph(pp.vit_batch, s, s)?.plan(true);
            est.vit_batches.push(pp.vit_batch);
            est.vit_activation_bytes += plan.peak_bytes;
            est.vit_weight_bytes = est.vit_weight_bytes.max(plan.const_bytes);
        }
        let key = (pp.lift_batch, pp.out_hw[0], pp.out_hw[1]);
        if !est.lift_graphs.contains(&key) {
            let plan = lift_graph(pp.lift_batch, cd, g, pp.out_hw, projection.as_ref())?.plan(true);
            est.lift_graphs.push(key);
            est.lift_activation_bytes += plan.peak_bytes;
            est.lift_weight_bytes = est.lift_weight_bytes.max(plan.const_bytes);
        }
    }
    Ok(est)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_balanced() {
        assert_eq!(balanced(128, 7), 7);
        assert_eq!(balanced(8, 3), 3);
        assert_eq!(balanced(25, 512), 25);
        assert_eq!(balanced(10, 4), 4);
        assert_eq!(balanced(9, 4), 3);
        assert_eq!(balanced(1, 1), 1);
    }

    #[test]
    fn slices_follow_the_reference_layout() {
        // vol[z, y, x] = 100 z + 10 y + x.
        let shape = [3, 4, 5];
        let data: Vec<f32> = (0..60)
            .map(|i| (100 * (i / 20) + 10 * (i / 5 % 4) + i % 5) as f32)
            .collect();
        let xz = PlaneSampler::new(shape, Plane::Xz, 4);
        assert_eq!(xz.slice_shape(), [3, 5]);
        assert_eq!(
            xz.slice(&data, 2)[..6],
            [20.0, 21.0, 22.0, 23.0, 24.0, 120.0]
        );
        let yz = PlaneSampler::new(shape, Plane::Yz, 5);
        assert_eq!(yz.slice(&data, 3)[..5], [3.0, 13.0, 23.0, 33.0, 103.0]);
        // 5 → 2 along W is downsampled (2.5 > 2): src 0.75, 3.25.
        let yz = PlaneSampler::new(shape, Plane::Yz, 2);
        assert!(yz.downsampled());
        assert_eq!(yz.slice(&data, 1)[0], 3.25);
    }

    #[test]
    fn lift_chunks_of_any_size_give_the_same_features() {
        let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let vit = Vit::load(&root.join("vit_gelu")).expect("fixture ViT");
        let volume = Volume::read(&root.join("features_u16/volume.npy")).expect("volume");
        let params = FeatureParams {
            batch: 3,
            ..FeatureParams::new([8, 25, 8], 32)
        };
        let proj = Projection::new(
            (0..5 * 64)
                .map(|i| ((i * 37) % 17) as f32 / 17.0 - 0.5)
                .collect(),
            vec![0.25, -0.5, 0.0, 1.0, 2.0],
            5,
            64,
        )
        .expect("projection");
        let mut runner = Runner::new(Backend::Cpu);
        for p in [None, Some(&proj)] {
            let whole = extract_impl(&vit, &mut runner, &volume, &params, p, None).expect("run");
            // ViT batches of 3 lifted in chunks of 2 (the second padded) and of 1.
            for cap in [2, 1] {
                let split =
                    extract_impl(&vit, &mut runner, &volume, &params, p, Some(cap)).expect("run");
                assert_eq!(whole, split, "lift chunks of {cap}");
            }
        }
    }

    #[test]
    fn scatter_stacks_along_the_normal() {
        let size = [2, 3, 4];
        let mut out = vec![0f32; 24];
        // One channel; yz slice x = 1 has (d, h) = (2, 3) values.
        let lifted: Vec<f32> = (0..6).map(|v| v as f32).collect();
        scatter(&lifted, Plane::Yz, 1, 1, 1, size, &mut out, true);
        let at = |z: usize, y: usize, x: usize| (z * 3 + y) * 4 + x;
        assert_eq!(out[at(0, 1, 1)], 1.0);
        assert_eq!(out[at(1, 2, 1)], 5.0);
        let lifted: Vec<f32> = vec![1.0; 8];
        scatter(&lifted, Plane::Xz, 2, 1, 1, size, &mut out, false);
        assert_eq!(out[at(1, 2, 1)], 6.0);
    }
}
