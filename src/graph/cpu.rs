//! Runs a planned graph with the CPU reference ops.

use super::{Graph, Plan, Source};
use crate::error::Result;
use crate::ops::numel;

/// The CPU backend: every op's reference implementation, buffers as the plan says.
pub struct CpuExecutor;

impl CpuExecutor {
    /// Runs `g` on `inputs` (in the order of `Graph::input` calls); returns the outputs.
    pub fn run(g: &Graph, plan: &Plan, inputs: &[&[f32]]) -> Result<Vec<Vec<f32>>> {
        g.check_inputs(inputs)?;
        let mut slots: Vec<Vec<f32>> = plan.slot_bytes.iter().map(|_| Vec::new()).collect();
        for (v, d) in g.inputs.iter().zip(inputs) {
            if let Some(s) = plan.slot_of[v.0] {
                slots[s] = d.to_vec();
            }
        }
        for n in &g.nodes {
            let out_slot = plan.slot_of[n.output.0].expect("every op output has a slot");
            let mut out = std::mem::take(&mut slots[out_slot]);
            out.resize(numel(&g.values[n.output.0].shape), 0.0);
            {
                let data: Vec<&[f32]> = n
                    .inputs
                    .iter()
                    .map(|v| {
                        let info = &g.values[v.0];
                        let len = numel(&info.shape);
                        match &info.source {
                            Source::Const(c) => &c[..],
                            _ => &slots[plan.slot_of[v.0].expect("slot")][..len],
                        }
                    })
                    .collect();
                let shapes: Vec<&[usize]> = n
                    .inputs
                    .iter()
                    .map(|v| g.values[v.0].shape.as_slice())
                    .collect();
                n.op.cpu(&data, &shapes, &mut out);
            }
            slots[out_slot] = out;
        }
        Ok(g.outputs
            .iter()
            .map(|v| {
                let len = numel(&g.values[v.0].shape);
                match &g.values[v.0].source {
                    Source::Const(c) => c.to_vec(),
                    _ => slots[plan.slot_of[v.0].expect("slot")][..len].to_vec(),
                }
            })
            .collect())
    }
}
