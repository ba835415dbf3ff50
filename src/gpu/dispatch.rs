//! A recorded kernel launch: pipeline, bind group and workgroup counts. Built once,
//! replayed every time a graph runs. A launch may first copy a buffer into a texture
//! (kernels that read their streaming operand through the texture unit) and may bind
//! uniform windows at dynamic offsets.

use super::GpuContext;
use crate::error::{Error, Result};
use crate::shaders::Shader;
use std::sync::Arc;

/// A buffer-to-texture copy recorded before a dispatch.
#[derive(Debug, Clone)]
pub struct TextureCopy {
    pub buffer: wgpu::Buffer,
    pub texture: wgpu::Texture,
    /// Texels per texture row (the row pitch of the buffer is `width * texel_bytes`).
    pub width: u32,
    pub texel_bytes: u32,
    /// Total texels to copy (rows of `width`, then a partial row).
    pub texels: u64,
}

impl TextureCopy {
    fn record(&self, enc: &mut wgpu::CommandEncoder) {
        let full_rows = (self.texels / self.width as u64) as u32;
        let rest = (self.texels % self.width as u64) as u32;
        let pitch = self.width * self.texel_bytes;
        let mut copy = |offset: u64, w: u32, h: u32, y: u32| {
            enc.copy_buffer_to_texture(
                wgpu::TexelCopyBufferInfo {
                    buffer: &self.buffer,
                    layout: wgpu::TexelCopyBufferLayout {
                        offset,
                        bytes_per_row: Some(pitch),
                        rows_per_image: Some(h),
                    },
                },
                wgpu::TexelCopyTextureInfo {
                    texture: &self.texture,
                    mip_level: 0,
                    origin: wgpu::Origin3d { x: 0, y, z: 0 },
                    aspect: wgpu::TextureAspect::All,
                },
                wgpu::Extent3d {
                    width: w,
                    height: h,
                    depth_or_array_layers: 1,
                },
            );
        };
        if full_rows > 0 {
            copy(0, self.width, full_rows, 0);
        }
        if rest > 0 {
            copy(full_rows as u64 * pitch as u64, rest, 1, full_rows);
        }
    }
}

/// A buffer-to-buffer copy recorded around a dispatch (outside the compute pass): the
/// depth slabs of tensors larger than one storage binding go in and out this way.
#[derive(Debug, Clone)]
pub struct BufferCopy {
    pub src: wgpu::Buffer,
    pub src_offset: u64,
    pub dst: wgpu::Buffer,
    pub dst_offset: u64,
    pub bytes: u64,
}

impl BufferCopy {
    fn record(&self, enc: &mut wgpu::CommandEncoder) {
        if self.bytes > 0 {
            enc.copy_buffer_to_buffer(
                &self.src,
                self.src_offset,
                &self.dst,
                self.dst_offset,
                self.bytes,
            );
        }
    }
}

/// One compute dispatch, ready to record.
#[derive(Debug, Clone)]
pub struct Dispatch {
    pub name: &'static str,
    pub pipeline: Arc<wgpu::ComputePipeline>,
    pub bind_group: wgpu::BindGroup,
    pub workgroups: [u32; 3],
    /// Dynamic offsets for the bind group, in binding order.
    pub offsets: Vec<u32>,
    /// Copies recorded before this dispatch (outside the compute pass). A kernel that
    /// reads a scratch texture carries the copy that fills it, so the pair is never split.
    pub copies: Vec<Arc<TextureCopy>>,
    /// Buffer copies recorded before this dispatch (and before its texture copies).
    pub before: Vec<BufferCopy>,
    /// Buffer copies recorded after this dispatch.
    pub after: Vec<BufferCopy>,
}

impl Dispatch {
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        pass.set_pipeline(&self.pipeline);
        pass.set_bind_group(0, &self.bind_group, &self.offsets);
        let [x, y, z] = self.workgroups;
        pass.dispatch_workgroups(x, y, z);
    }
}

/// Records `dispatches` into `enc`: compute passes, broken where a copy must come first
/// (or after).
pub fn record_all(enc: &mut wgpu::CommandEncoder, dispatches: &[Dispatch]) {
    let mut start = 0;
    while start < dispatches.len() {
        for c in &dispatches[start].before {
            c.record(enc);
        }
        for c in &dispatches[start].copies {
            c.record(enc);
        }
        let mut end = start + 1;
        while end < dispatches.len()
            && dispatches[end - 1].after.is_empty()
            && dispatches[end].before.is_empty()
            && dispatches[end].copies.is_empty()
        {
            end += 1;
        }
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor::default());
        for d in &dispatches[start..end] {
            d.record(&mut pass);
        }
        drop(pass);
        for c in &dispatches[end - 1].after {
            c.record(enc);
        }
        start = end;
    }
}

/// What a kernel launch binds: a uniform parameter block at binding 0 and storage buffers
/// at bindings 1..=n, in the order given (the shader's declaration order).
pub struct KernelArgs<'a> {
    pub shader: &'a Shader,
    pub entry: &'static str,
    pub constants: &'a [(&'static str, f64)],
    pub buffers: &'a [&'a wgpu::Buffer],
    pub params: &'a [u8],
    /// Workgroup counts; use [`GpuContext::grid`] for a long 1-D range.
    pub workgroups: [u32; 3],
}

impl GpuContext {
    /// Splits a 1-D workgroup count over x and y so each stays within the device limit.
    /// Kernels recover the linear index as `wg.x + wg.y * num_workgroups.x`.
    pub fn grid(&self, n: u64) -> Result<[u32; 3]> {
        let max = self.caps.max_workgroups_per_dim as u64;
        if n <= max {
            return Ok([n.max(1) as u32, 1, 1]);
        }
        let y = n.div_ceil(max);
        if y > max {
            return Err(Error::Gpu(format!(
                "{n} workgroups exceed the device's dispatch limit"
            )));
        }
        Ok([n.div_ceil(y) as u32, y as u32, 1])
    }

    /// Builds a dispatch for `args`.
    pub fn dispatch(&self, args: KernelArgs<'_>) -> Result<Dispatch> {
        let bindings: Vec<u32> = (1..=args.buffers.len() as u32).collect();
        self.dispatch_bound(args, &bindings)
    }

    /// As [`GpuContext::dispatch`], with `args.buffers[i]` bound at `bindings[i]` instead
    /// of `i + 1`: for entry points that use a subset of their shader's bindings (the
    /// variants that fit devices with few storage buffers per stage).
    pub fn dispatch_bound(&self, args: KernelArgs<'_>, bindings: &[u32]) -> Result<Dispatch> {
        if bindings.len() != args.buffers.len() {
            return Err(Error::Gpu(format!(
                "{}: {} buffers for {} bindings",
                args.entry,
                args.buffers.len(),
                bindings.len()
            )));
        }
        let pipeline = self.pipeline(args.shader, args.entry, args.constants)?;
        let layout = pipeline.get_bind_group_layout(0);
        let uniform = if args.params.is_empty() {
            None
        } else {
            Some(self.uniform(args.params))
        };
        let mut entries: Vec<wgpu::BindGroupEntry> = Vec::with_capacity(args.buffers.len() + 1);
        if let Some(u) = &uniform {
            entries.push(wgpu::BindGroupEntry {
                binding: 0,
                resource: u.as_entire_binding(),
            });
        }
        entries.extend(
            args.buffers
                .iter()
                .zip(bindings)
                .map(|(b, i)| wgpu::BindGroupEntry {
                    binding: *i,
                    resource: b.as_entire_binding(),
                }),
        );
        let bind_group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(args.entry),
            layout: &layout,
            entries: &entries,
        });
        Ok(Dispatch {
            name: args.entry,
            pipeline,
            bind_group,
            workgroups: args.workgroups,
            offsets: Vec::new(),
            copies: Vec::new(),
            before: Vec::new(),
            after: Vec::new(),
        })
    }
}
