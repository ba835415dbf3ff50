//! A recorded kernel launch: pipeline, bind group and workgroup counts. Built once,
//! replayed every time a graph runs. A launch may first copy a buffer into a texture
//! (kernels that read their streaming operand through the texture unit) and may bind
//! uniform windows at dynamic offsets.

use super::GpuContext;
use crate::error::{Error, Result};
use crate::shaders::Shader;
use std::sync::Arc;

/// A buffer-to-texture copy recorded before a dispatch: `texels` texels from byte
/// `buffer_offset` of `buffer` into the texture's texels `dst_texel..dst_texel + texels`,
/// the texture read linearly in rows of `width`. Several copies with consecutive
/// `dst_texel` ranges fill one texture from several buffers (a channel concat).
#[derive(Debug, Clone)]
pub struct TextureCopy {
    pub buffer: wgpu::Buffer,
    pub texture: wgpu::Texture,
    /// Texels per texture row (the row pitch of the buffer is `width * texel_bytes`).
    pub width: u32,
    pub texel_bytes: u32,
    /// Total texels to copy (a partial first row, full rows, a partial last row).
    pub texels: u64,
    /// Where the copy starts in the buffer, in bytes (a multiple of `texel_bytes`).
    pub buffer_offset: u64,
    /// The first texture texel written (linear index, row-major in rows of `width`).
    pub dst_texel: u64,
}

impl TextureCopy {
    /// The (buffer offset, x, y, width, rows) of each copy region: a partial first row
    /// when `dst_texel` is not at a row start, the full rows, a partial last row.
    fn regions(&self) -> Vec<(u64, u32, u32, u32, u32)> {
        let w = self.width as u64;
        let tb = self.texel_bytes as u64;
        let (mut t, end, mut src) = (
            self.dst_texel,
            self.dst_texel + self.texels,
            self.buffer_offset,
        );
        let mut out = Vec::with_capacity(3);
        let x = t % w;
        if x != 0 && t < end {
            let n = (w - x).min(end - t);
            out.push((src, x as u32, (t / w) as u32, n as u32, 1));
            t += n;
            src += n * tb;
        }
        let rows = (end - t) / w;
        if rows > 0 {
            out.push((src, 0, (t / w) as u32, w as u32, rows as u32));
            t += rows * w;
            src += rows * w * tb;
        }
        if t < end {
            out.push((src, 0, (t / w) as u32, (end - t) as u32, 1));
        }
        out
    }

    fn record(&self, enc: &mut wgpu::CommandEncoder) {
        let pitch = self.width * self.texel_bytes;
        for (offset, x, y, w, h) in self.regions() {
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
                    origin: wgpu::Origin3d { x, y, z: 0 },
                    aspect: wgpu::TextureAspect::All,
                },
                wgpu::Extent3d {
                    width: w,
                    height: h,
                    depth_or_array_layers: 1,
                },
            );
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{ctx, random, rng};
    use rand::Rng;

    /// Fills a poisoned texture from 2–3 buffers at random source and destination
    /// offsets (partial first rows, full rows, partial last rows) and reads it back.
    #[test]
    fn texture_copies_fill_ranges() {
        let c = ctx();
        let mut r = rng();
        let (width, height) = (32u32, 12u32);
        let total = (width * height) as usize;
        let texture = c.device.create_texture(&wgpu::TextureDescriptor {
            label: Some("texture copy test"),
            size: wgpu::Extent3d {
                width,
                height,
                depth_or_array_layers: 1,
            },
            mip_level_count: 1,
            sample_count: 1,
            dimension: wgpu::TextureDimension::D2,
            format: wgpu::TextureFormat::Rgba32Float,
            usage: wgpu::TextureUsages::COPY_DST | wgpu::TextureUsages::COPY_SRC,
            view_formats: &[],
        });
        let readback = c.storage_buffer("readback", total as u64 * 16).unwrap();
        for _ in 0..20 {
            // Poison every texel.
            let nan = c.upload(&vec![f32::NAN; total * 4], &[total * 4]).unwrap();
            let poison = TextureCopy {
                buffer: (*nan.buffer).clone(),
                texture: texture.clone(),
                width,
                texel_bytes: 16,
                texels: total as u64,
                buffer_offset: 0,
                dst_texel: 0,
            };
            // 2–3 consecutive ranges, starting anywhere, from buffers read at an offset.
            let parts = r.random_range(2..=3);
            let mut t = r.random_range(0..width as u64 * 2);
            let mut want = vec![f32::NAN; total * 4];
            let mut copies = vec![poison];
            let mut keep = Vec::new();
            for _ in 0..parts {
                let room = total as u64 - t;
                let n = r.random_range(1..=room.min(3 * width as u64 + 7));
                let skip = r.random_range(0..5u64);
                let data = random(&mut r, ((skip + n) * 4) as usize);
                want[(t * 4) as usize..((t + n) * 4) as usize]
                    .copy_from_slice(&data[(skip * 4) as usize..]);
                let buf = c.upload(&data, &[data.len()]).unwrap();
                copies.push(TextureCopy {
                    buffer: (*buf.buffer).clone(),
                    texture: texture.clone(),
                    width,
                    texel_bytes: 16,
                    texels: n,
                    buffer_offset: skip * 16,
                    dst_texel: t,
                });
                keep.push(buf);
                t += n;
            }
            let mut enc = c.device.create_command_encoder(&Default::default());
            for cp in &copies {
                cp.record(&mut enc);
            }
            enc.copy_texture_to_buffer(
                wgpu::TexelCopyTextureInfo {
                    texture: &texture,
                    mip_level: 0,
                    origin: wgpu::Origin3d::ZERO,
                    aspect: wgpu::TextureAspect::All,
                },
                wgpu::TexelCopyBufferInfo {
                    buffer: &readback,
                    layout: wgpu::TexelCopyBufferLayout {
                        offset: 0,
                        bytes_per_row: Some(width * 16),
                        rows_per_image: Some(height),
                    },
                },
                wgpu::Extent3d {
                    width,
                    height,
                    depth_or_array_layers: 1,
                },
            );
            c.queue.submit([enc.finish()]);
            let got = c.read_buffer(&readback, total * 4).unwrap();
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                    "float {i} (texel {}): got {g}, want {w}",
                    i / 4
                );
            }
        }
    }
}
