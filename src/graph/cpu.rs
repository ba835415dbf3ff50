//! Runs a planned graph with the CPU reference ops.

use super::{Graph, Plan, Source};
use crate::error::Result;
use crate::ops::numel;
use std::time::Instant;

/// The CPU backend: every op's reference implementation, buffers as the plan says.
pub struct CpuExecutor;

/// The plan's buffers on the CPU, kept between runs of one graph so a repeated run
/// allocates (and page-faults) nothing new.
#[derive(Debug, Default)]
pub struct CpuSlots(Vec<Vec<f32>>);

/// Per-op-name (name, seconds, flops) totals, largest time first.
pub type Profile = Vec<(String, f64, u64)>;

impl CpuExecutor {
    /// Runs `g` on `inputs` (in the order of `Graph::input` calls); returns the outputs.
    pub fn run(g: &Graph, plan: &Plan, inputs: &[&[f32]]) -> Result<Vec<Vec<f32>>> {
        Self::run_with(g, plan, inputs, &mut CpuSlots::default())
    }

    /// As [`CpuExecutor::run`], in the buffers of `slots` (from an earlier run of the same
    /// graph and plan, or empty).
    pub fn run_with(
        g: &Graph,
        plan: &Plan,
        inputs: &[&[f32]],
        slots: &mut CpuSlots,
    ) -> Result<Vec<Vec<f32>>> {
        Self::execute(g, plan, inputs, slots, None)
    }

    /// Runs once and returns the time per op name (with its flops), like
    /// `GpuExecutor::profile`.
    pub fn profile(
        g: &Graph,
        plan: &Plan,
        inputs: &[&[f32]],
        slots: &mut CpuSlots,
    ) -> Result<Profile> {
        let mut by_op: std::collections::BTreeMap<String, (f64, u64)> = Default::default();
        Self::execute(g, plan, inputs, slots, Some(&mut by_op))?;
        let mut v: Profile = by_op.into_iter().map(|(k, (t, f))| (k, t, f)).collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        Ok(v)
    }

    fn execute(
        g: &Graph,
        plan: &Plan,
        inputs: &[&[f32]],
        slots: &mut CpuSlots,
        mut profile: Option<&mut std::collections::BTreeMap<String, (f64, u64)>>,
    ) -> Result<Vec<Vec<f32>>> {
        g.check_inputs(inputs)?;
        let slots = &mut slots.0;
        slots.resize_with(plan.slot_bytes.len(), Vec::new);
        for (v, d) in g.inputs.iter().zip(inputs) {
            if let Some(s) = plan.slot_of[v.0] {
                slots[s].clear();
                slots[s].extend_from_slice(d);
            }
        }
        for n in &g.nodes {
            let out_slot = plan.slot_of[n.output.0].expect("every op output has a slot");
            let mut out = std::mem::take(&mut slots[out_slot]);
            let len = numel(&g.values[n.output.0].shape);
            if out.len() < len {
                out.resize(len, 0.0);
            }
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
                let t0 = Instant::now();
                n.op.cpu(&data, &shapes, &mut out[..len]);
                if let Some(p) = profile.as_deref_mut() {
                    let e = p.entry(n.op.name().to_string()).or_default();
                    e.0 += t0.elapsed().as_secs_f64();
                    e.1 += n.op.flops(&shapes);
                }
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
