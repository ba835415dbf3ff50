//! 3-D pooling with kernel 2 and stride 2 over the last three axes of `(N, C, D, H, W)`
//! (or `(C, D, H, W)`): PyTorch's `MaxPool3d(2)` and `avg_pool3d(kernel_size=2, stride=2)`.
//! Odd sizes are floored (the last plane, row or column is dropped).

use super::{expect_inputs, numel, Op};
use crate::error::{Error, Result};
use crate::gpu::{Dispatch, GpuContext, KernelArgs};
use crate::shaders::POOL3D;

/// Outputs per workgroup: 64 lanes × 4 outputs each (see `shaders/pool3d.wgsl`).
const PER_WORKGROUP: u64 = 256;

/// Max or average pooling over 2×2×2 windows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pool3d {
    Max,
    Avg,
}

/// Sizes of one pooling call: `lead` = N·C, input (d, h, w).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolDims {
    pub lead: usize,
    pub d: usize,
    pub h: usize,
    pub w: usize,
}

impl PoolDims {
    pub fn out(&self) -> [usize; 3] {
        [self.d / 2, self.h / 2, self.w / 2]
    }
}

impl Pool3d {
    pub fn dims(&self, inputs: &[&[usize]]) -> Result<PoolDims> {
        expect_inputs(self.name(), inputs, 1)?;
        let x = inputs[0];
        if x.len() != 4 && x.len() != 5 {
            return Err(Error::shape(
                self.name(),
                format!("input must be (N, C, D, H, W) or (C, D, H, W), got {x:?}"),
            ));
        }
        let r = x.len();
        let (d, h, w) = (x[r - 3], x[r - 2], x[r - 1]);
        if d < 2 || h < 2 || w < 2 {
            return Err(Error::shape(
                self.name(),
                format!("spatial sizes of {x:?} must be at least 2 for a 2x2x2 window"),
            ));
        }
        Ok(PoolDims {
            lead: numel(&x[..r - 3]),
            d,
            h,
            w,
        })
    }
}

/// Sets every output of a 2×2×2, stride-2 pool to `f([8 window elements])`; output planes
/// are split across threads.
fn windows(x: &[f32], dims: PoolDims, out: &mut [f32], f: impl Fn([f32; 8]) -> f32 + Sync + Send) {
    let PoolDims { d, h, w, .. } = dims;
    let [od, oh, ow] = dims.out();
    let plane = oh * ow;
    if plane == 0 || od == 0 {
        return;
    }
    crate::ops::par::for_units(out, plane, (1 << 14) / plane + 1, |p0, planes| {
        for (k, op) in planes.chunks_mut(plane).enumerate() {
            let (l, z) = ((p0 + k) / od, (p0 + k) % od);
            for y in 0..oh {
                let row = |dz: usize, dy: usize| ((l * d + 2 * z + dz) * h + 2 * y + dy) * w;
                let (r00, r01, r10, r11) = (row(0, 0), row(0, 1), row(1, 0), row(1, 1));
                for c in 0..ow {
                    let x0 = 2 * c;
                    op[y * ow + c] = f([
                        x[r00 + x0],
                        x[r00 + x0 + 1],
                        x[r01 + x0],
                        x[r01 + x0 + 1],
                        x[r10 + x0],
                        x[r10 + x0 + 1],
                        x[r11 + x0],
                        x[r11 + x0 + 1],
                    ]);
                }
            }
        }
    });
}

/// CPU reference of `MaxPool3d(2)`: the max of each 2×2×2 window.
pub fn maxpool3d(x: &[f32], dims: PoolDims, out: &mut [f32]) {
    windows(x, dims, out, |v| {
        v.iter().copied().fold(f32::NEG_INFINITY, f32::max)
    });
}

/// CPU reference of `avg_pool3d(k=2, s=2)`: the mean of each 2×2×2 window.
pub fn avgpool3d(x: &[f32], dims: PoolDims, out: &mut [f32]) {
    windows(x, dims, out, |v| v.iter().sum::<f32>() / 8.0);
}

impl Op for Pool3d {
    fn name(&self) -> &'static str {
        match self {
            Pool3d::Max => "maxpool3d",
            Pool3d::Avg => "avgpool3d",
        }
    }
    fn output_shape(&self, inputs: &[&[usize]]) -> Result<Vec<usize>> {
        let dims = self.dims(inputs)?;
        let x = inputs[0];
        let mut s = x[..x.len() - 3].to_vec();
        s.extend(dims.out());
        Ok(s)
    }
    fn cpu(&self, inputs: &[&[f32]], shapes: &[&[usize]], out: &mut [f32]) {
        let dims = self
            .dims(shapes)
            .expect("shapes were checked when the graph was built");
        match self {
            Pool3d::Max => maxpool3d(inputs[0], dims, out),
            Pool3d::Avg => avgpool3d(inputs[0], dims, out),
        }
    }
    fn gpu(
        &self,
        ctx: &GpuContext,
        inputs: &[&wgpu::Buffer],
        shapes: &[&[usize]],
        out: &wgpu::Buffer,
    ) -> Result<Vec<Dispatch>> {
        let dims = self.dims(shapes)?;
        let [od, oh, ow] = dims.out();
        let n = dims.lead * od * oh * ow;
        check_u32(self.name(), dims.lead * dims.d * dims.h * dims.w)?;
        let params = [
            n as u32,
            ow as u32,
            oh as u32,
            od as u32,
            dims.w as u32,
            dims.h as u32,
            dims.d as u32,
            0,
        ];
        Ok(vec![ctx.dispatch(KernelArgs {
            shader: &POOL3D,
            entry: self.name(),
            constants: &[],
            buffers: &[inputs[0], out],
            params: bytemuck::cast_slice(&params),
            workgroups: ctx.grid((n as u64).div_ceil(PER_WORKGROUP))?,
        })?])
    }
    fn flops(&self, shapes: &[&[usize]]) -> u64 {
        // 7 max or 7 adds + 1 scale per output.
        let per = match self {
            Pool3d::Max => 7,
            Pool3d::Avg => 8,
        };
        self.output_shape(shapes)
            .map(|s| per * numel(&s) as u64)
            .unwrap_or(0)
    }
    fn depth_rule(&self, shapes: &[&[usize]]) -> Option<super::DepthRule> {
        self.dims(shapes).ok()?;
        Some(super::DepthRule::first(
            1,
            1,
            super::DepthMap::Down { factor: 2 },
        ))
    }
}

/// Kernels index with u32 (plus up to one workgroup's span past the end).
pub(crate) fn check_u32(op: &str, elements: usize) -> Result<()> {
    if elements as u64 + (1 << 16) > u32::MAX as u64 {
        return Err(Error::shape(
            op,
            format!("{elements} elements exceed the kernels' 32-bit indexing"),
        ));
    }
    Ok(())
}

/// Benchmark cases for `cargo bench` (keep this function).
pub fn bench_cases() -> Vec<crate::bench::Case> {
    use crate::bench::Case;
    vec![
        Case::new(
            "maxpool3d (1,16,128,128,128)",
            Pool3d::Max,
            vec![vec![1, 16, 128, 128, 128]],
        ),
        Case::new(
            "avgpool3d (1,64,64,64,64)",
            Pool3d::Avg,
            vec![vec![1, 64, 64, 64, 64]],
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::run_cpu;
    use crate::ops::testing::check_op;

    #[test]
    fn kernel_matches_reference() {
        for op in [Pool3d::Max, Pool3d::Avg] {
            for shape in [
                vec![1, 1, 2, 2, 2],
                vec![1, 1, 3, 3, 3],
                vec![2, 3, 5, 7, 9],
                vec![3, 64, 65],
                vec![1, 3, 4, 64, 65],
                vec![2, 5, 9, 2, 131],
                vec![1, 4, 17, 33, 2],
                vec![1, 2, 16, 16, 16],
            ] {
                let shape = if shape.len() == 3 {
                    vec![1, shape[0], shape[1], shape[2]]
                } else {
                    shape
                };
                check_op(&op, &[shape], 1e-5);
            }
        }
    }

    #[test]
    fn reference_matches_hand_computed() {
        // (1, 1, 3, 2, 3): the last plane and column are dropped.
        let x: Vec<f32> = (0..18).map(|v| v as f32).collect();
        let s = [1, 1, 3, 2, 3];
        let (m, ms) = run_cpu(&Pool3d::Max, &[(&x, &s)]).unwrap();
        assert_eq!(ms, vec![1, 1, 1, 1, 1]);
        // window: planes 0,1 × rows 0,1 × cols 0,1 → indices 0,1,3,4,6,7,9,10
        assert_eq!(m, vec![10.0]);
        let (a, _) = run_cpu(&Pool3d::Avg, &[(&x, &s)]).unwrap();
        assert_eq!(a, vec![40.0 / 8.0]); // 0+1+3+4+6+7+9+10
    }

    #[test]
    fn rejects_bad_shapes() {
        for s in [&[2, 3, 4][..], &[1, 1, 1, 4, 4], &[1, 2, 3, 4, 5, 6]] {
            let e = Pool3d::Max.output_shape(&[s]).unwrap_err();
            assert!(e.to_string().contains("maxpool3d"), "{e}");
        }
        let e = Pool3d::Avg
            .output_shape(&[&[1, 4, 4, 4], &[1]])
            .unwrap_err();
        assert!(e.to_string().contains("avgpool3d"), "{e}");
        assert_eq!(
            Pool3d::Avg.output_shape(&[&[2, 3, 5, 7, 9]]).unwrap(),
            vec![2, 3, 2, 3, 4]
        );
    }
}
