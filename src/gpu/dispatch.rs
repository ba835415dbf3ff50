//! A recorded kernel launch: pipeline, bind group and workgroup counts. Built once,
//! replayed every time a graph runs.

use super::GpuContext;
use crate::error::{Error, Result};
use crate::shaders::Shader;
use std::sync::Arc;

/// One compute dispatch, ready to record.
#[derive(Debug, Clone)]
pub struct Dispatch {
    pub name: &'static str,
    pub pipeline: Arc<wgpu::ComputePipeline>,
    pub bind_group: wgpu::BindGroup,
    pub workgroups: [u32; 3],
}

impl Dispatch {
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        pass.set_pipeline(&self.pipeline);
        pass.set_bind_group(0, &self.bind_group, &[]);
        let [x, y, z] = self.workgroups;
        pass.dispatch_workgroups(x, y, z);
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
                .enumerate()
                .map(|(i, b)| wgpu::BindGroupEntry {
                    binding: i as u32 + 1,
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
        })
    }
}
