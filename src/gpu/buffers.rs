//! Device tensors: a storage buffer with a shape. Data is f32 on the device unless stated.

use super::GpuContext;
use crate::error::{Error, Result};
use std::sync::Arc;
use wgpu::util::DeviceExt;

/// Element type of a device tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DType {
    #[default]
    F32,
    /// IEEE half floats, two per 32-bit word (low half first). Kernels read them with
    /// WGSL's core `unpack2x16float`, so f16 storage works on every adapter, with or
    /// without `SHADER_F16`.
    F16,
}

impl DType {
    /// Bytes of `n` elements (f16 rounded up to whole words).
    pub fn bytes(self, n: usize) -> u64 {
        match self {
            DType::F32 => n as u64 * 4,
            DType::F16 => n.div_ceil(2) as u64 * 4,
        }
    }
}

/// A tensor in a device storage buffer (row-major / C order).
#[derive(Clone, Debug)]
pub struct GpuTensor {
    pub buffer: Arc<wgpu::Buffer>,
    pub shape: Vec<usize>,
    pub dtype: DType,
}

impl GpuTensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn bytes(&self) -> u64 {
        self.dtype.bytes(self.numel())
    }
}

/// Packs f32 values as f16 pairs (round to nearest even), the layout of [`DType::F16`].
pub fn pack_f16(data: &[f32]) -> Vec<u32> {
    data.chunks(2)
        .map(|p| {
            let lo = half::f16::from_f32(p[0]).to_bits() as u32;
            let hi = p
                .get(1)
                .map(|v| half::f16::from_f32(*v).to_bits() as u32)
                .unwrap_or(0);
            lo | (hi << 16)
        })
        .collect()
}

/// Unpacks `n` f16 values stored as pairs.
pub fn unpack_f16(words: &[u32], n: usize) -> Vec<f32> {
    words
        .iter()
        .flat_map(|w| {
            [
                half::f16::from_bits(*w as u16).to_f32(),
                half::f16::from_bits((*w >> 16) as u16).to_f32(),
            ]
        })
        .take(n)
        .collect()
}

const STORAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::UNIFORM)
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

/// Every buffer is at least this large, so kernels may bind any buffer as a 64 KiB
/// uniform window (see `matmul`'s texture path).
pub const MIN_BUFFER_BYTES: u64 = 65536;

/// The largest piece [`GpuContext::write_bounded`] stages at once (a multiple of 4).
pub const WRITE_PIECE_BYTES: u64 = 8 << 20;

impl GpuContext {
    /// Refuses a binding larger than the adapter's max storage binding, naming it.
    pub fn check_binding(&self, what: &str, bytes: u64) -> Result<()> {
        if bytes > self.caps.max_binding {
            return Err(Error::TooLarge {
                what: what.to_string(),
                bytes,
                limit: self.caps.max_binding,
                adapter: self.info.name.clone(),
            });
        }
        Ok(())
    }

    /// A storage buffer of `bytes` bytes (at least 4), uninitialised contents.
    pub fn storage_buffer(&self, what: &str, bytes: u64) -> Result<wgpu::Buffer> {
        self.check_binding(what, bytes)?;
        self.buffer_unchecked(what, bytes)
    }

    /// A storage buffer that may be larger than one storage binding (up to the device's
    /// max buffer size): kernels reach such a tensor in depth slabs copied in and out
    /// (`graph::split`), never by binding it whole.
    pub fn large_buffer(&self, what: &str, bytes: u64) -> Result<wgpu::Buffer> {
        if bytes > self.caps.max_buffer {
            return Err(Error::TooLarge {
                what: what.to_string(),
                bytes,
                limit: self.caps.max_buffer,
                adapter: self.info.name.clone(),
            });
        }
        self.buffer_unchecked(what, bytes)
    }

    fn buffer_unchecked(&self, what: &str, bytes: u64) -> Result<wgpu::Buffer> {
        // Multiples of 256 bytes: any buffer's tail is a valid uniform-window offset.
        let size = bytes.max(MIN_BUFFER_BYTES).div_ceil(256) * 256;
        self.allocate(what, size, || {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(what),
                size,
                usage: STORAGE,
                mapped_at_creation: false,
            })
        })
    }

    /// A new device tensor with unspecified contents.
    pub fn empty(&self, shape: &[usize]) -> Result<GpuTensor> {
        let bytes = (shape.iter().product::<usize>() * 4) as u64;
        Ok(GpuTensor {
            buffer: Arc::new(self.storage_buffer("tensor", bytes)?),
            shape: shape.to_vec(),
            dtype: DType::F32,
        })
    }

    /// Uploads f32 data as a device tensor.
    pub fn upload(&self, data: &[f32], shape: &[usize]) -> Result<GpuTensor> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(Error::shape(
                "upload",
                format!(
                    "shape {shape:?} holds {n} values but {} were given",
                    data.len()
                ),
            ));
        }
        self.check_binding("tensor upload", (n * 4) as u64)?;
        let contents: &[u8] = if data.is_empty() {
            &[0u8; 4]
        } else {
            bytemuck::cast_slice(data)
        };
        // Created empty and then written (not mapped at creation), so a refused allocation
        // is an error to report rather than a panic inside wgpu.
        let size = (contents.len() as u64).div_ceil(4) * 4;
        let buffer = self.allocate("tensor upload", size, || {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("tensor"),
                size,
                usage: STORAGE,
                mapped_at_creation: false,
            })
        })?;
        self.queue.write_buffer(&buffer, 0, contents);
        Ok(GpuTensor {
            buffer: Arc::new(buffer),
            shape: shape.to_vec(),
            dtype: DType::F32,
        })
    }

    /// Uploads f32 data stored as f16 on the device (half the bytes; values rounded).
    pub fn upload_f16(&self, data: &[f32], shape: &[usize]) -> Result<GpuTensor> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(Error::shape(
                "upload_f16",
                format!(
                    "shape {shape:?} holds {n} values but {} were given",
                    data.len()
                ),
            ));
        }
        let words = pack_f16(data);
        let buffer = self.storage_buffer("f16 tensor", DType::F16.bytes(n))?;
        if !words.is_empty() {
            self.queue
                .write_buffer(&buffer, 0, bytemuck::cast_slice(&words));
        }
        Ok(GpuTensor {
            buffer: Arc::new(buffer),
            shape: shape.to_vec(),
            dtype: DType::F16,
        })
    }

    /// Overwrites a buffer with f32 data (queued; ordered before later submissions).
    pub fn write(&self, buffer: &wgpu::Buffer, data: &[f32]) {
        self.queue
            .write_buffer(buffer, 0, bytemuck::cast_slice(data));
    }

    /// [`GpuContext::write`] in pieces of at most [`WRITE_PIECE_BYTES`], waiting for each
    /// piece to reach the buffer before the next is queued: the queue's staging copy of a
    /// large upload (a UNet's feature volume, a ViT batch) never exceeds one piece, where
    /// one `write` stages all of it until the next submission completes. Ordered like
    /// `write` before later submissions.
    pub fn write_bounded(&self, buffer: &wgpu::Buffer, data: &[f32]) -> Result<()> {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        if bytes.len() as u64 <= WRITE_PIECE_BYTES {
            self.queue.write_buffer(buffer, 0, bytes);
            return Ok(());
        }
        for (k, piece) in bytes.chunks(WRITE_PIECE_BYTES as usize).enumerate() {
            self.queue
                .write_buffer(buffer, k as u64 * WRITE_PIECE_BYTES, piece);
            self.queue.submit([]);
            self.wait()?;
        }
        Ok(())
    }

    /// Fills a buffer with a constant (used to poison outputs in tests).
    pub fn fill(&self, buffer: &wgpu::Buffer, value: f32) {
        let n = (buffer.size() / 4) as usize;
        self.write(buffer, &vec![value; n]);
    }

    /// Copies `n` f32 values from a device buffer to the host.
    pub fn read_buffer(&self, buffer: &wgpu::Buffer, n: usize) -> Result<Vec<f32>> {
        let bytes = (n * 4) as u64;
        if bytes == 0 {
            return Ok(Vec::new());
        }
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size: bytes,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = self.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(buffer, 0, &staging, 0, bytes);
        self.queue.submit([enc.finish()]);
        let slice = staging.slice(..);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.wait()?;
        rx.recv()
            .map_err(|e| Error::Gpu(e.to_string()))?
            .map_err(|e| Error::Gpu(e.to_string()))?;
        let view = slice
            .get_mapped_range()
            .map_err(|e| Error::Gpu(e.to_string()))?;
        let out = bytemuck::cast_slice::<u8, f32>(&view).to_vec();
        drop(view);
        staging.unmap();
        Ok(out)
    }

    /// Downloads a tensor as f32 (f16 tensors are widened exactly).
    pub fn download(&self, t: &GpuTensor) -> Result<Vec<f32>> {
        match t.dtype {
            DType::F32 => self.read_buffer(&t.buffer, t.numel()),
            DType::F16 => {
                let words = self.read_buffer(&t.buffer, t.numel().div_ceil(2))?;
                Ok(unpack_f16(bytemuck::cast_slice(&words), t.numel()))
            }
        }
    }

    /// A uniform buffer holding `params` (a `#[repr(C)]` Pod struct or u32 array).
    pub fn uniform(&self, params: &[u8]) -> wgpu::Buffer {
        let mut data = params.to_vec();
        data.resize(data.len().max(16).div_ceil(16) * 16, 0);
        self.device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("params"),
                contents: &data,
                usage: wgpu::BufferUsages::UNIFORM,
            })
    }
}
