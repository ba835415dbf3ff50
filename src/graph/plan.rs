//! Buffer planning by liveness: each value computed by an op lives from its node until its
//! last reader; buffers ("slots") are handed to later values once free. Outputs get slots
//! of their own. Inputs get slots of their own too (every input is written before a run
//! starts), which later values reuse once the input's last reader ran: an executor writes
//! all inputs at the start of every run, so nothing needs an input's contents afterwards
//! (on the GPU the large feature volumes of a UNet free their buffers for the decoder).

use super::{Graph, Source};
use crate::ops::numel;

/// One op of the plan, for inspection.
#[derive(Debug, Clone)]
pub struct Step {
    pub op: &'static str,
    pub output_shape: Vec<usize>,
    pub output_bytes: u64,
    pub slot: usize,
}

/// Where every value lives and how much device memory that takes.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Size in bytes of each buffer.
    pub slot_bytes: Vec<u64>,
    /// Slot of each value (None for constants).
    pub slot_of: Vec<Option<usize>>,
    pub steps: Vec<Step>,
    /// Bytes of all activation buffers (inputs, intermediates, outputs) with this plan.
    pub peak_bytes: u64,
    /// Bytes the same graph would need with one buffer per value.
    pub unshared_bytes: u64,
    /// Bytes of constants (weights), uploaded once.
    pub const_bytes: u64,
}

impl Plan {
    pub(crate) fn new(g: &Graph, reuse: bool) -> Plan {
        let nv = g.values.len();
        // f16 outputs (packed halves, `Op::output_f16`) take 2 bytes per element.
        let mut half = vec![false; nv];
        for n in &g.nodes {
            half[n.output.0] = n.op.output_f16();
        }
        let bytes = |v: usize| {
            let n = numel(&g.values[v].shape);
            if half[v] {
                (n.div_ceil(2) * 4) as u64
            } else {
                (n * 4) as u64
            }
        };
        let mut last_use = vec![None::<usize>; nv];
        for (i, n) in g.nodes.iter().enumerate() {
            for v in &n.inputs {
                last_use[v.0] = Some(i);
            }
        }
        // Outputs keep their buffers to the end (read back after the run); an input that is
        // also an output too.
        let mut pinned = vec![false; nv];
        for v in &g.outputs {
            pinned[v.0] = true;
        }
        let mut is_input = vec![false; nv];
        for v in &g.inputs {
            is_input[v.0] = true;
        }
        let mut slot_bytes: Vec<u64> = Vec::new();
        let mut slot_of = vec![None; nv];
        let mut free: Vec<usize> = Vec::new();
        for v in &g.inputs {
            slot_bytes.push(bytes(v.0));
            slot_of[v.0] = Some(slot_bytes.len() - 1);
        }
        let mut steps = Vec::with_capacity(g.nodes.len());
        for (i, n) in g.nodes.iter().enumerate() {
            let out = n.output.0;
            let need = bytes(out);
            let slot = if reuse && !pinned[out] && !is_input[out] {
                // Best fit: the smallest free slot that is large enough; else grow the largest.
                let fit = free
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| slot_bytes[**s] >= need)
                    .min_by_key(|(_, s)| slot_bytes[**s])
                    .map(|(k, _)| k)
                    .or_else(|| {
                        free.iter()
                            .enumerate()
                            .max_by_key(|(_, s)| slot_bytes[**s])
                            .map(|(k, _)| k)
                    });
                match fit {
                    Some(k) => {
                        let s = free.swap_remove(k);
                        slot_bytes[s] = slot_bytes[s].max(need);
                        s
                    }
                    None => {
                        slot_bytes.push(need);
                        slot_bytes.len() - 1
                    }
                }
            } else {
                slot_bytes.push(need);
                slot_bytes.len() - 1
            };
            slot_of[out] = Some(slot);
            steps.push(Step {
                op: n.op.name(),
                output_shape: g.values[out].shape.clone(),
                output_bytes: need,
                slot,
            });
            if reuse {
                // Release inputs read for the last time here, and an output nobody reads.
                let mut dying: Vec<usize> = n
                    .inputs
                    .iter()
                    .map(|v| v.0)
                    .filter(|v| last_use[*v] == Some(i))
                    .collect();
                if last_use[out].is_none() {
                    dying.push(out);
                }
                dying.sort_unstable();
                dying.dedup();
                for v in dying {
                    let planned = matches!(g.values[v].source, Source::Computed) || is_input[v];
                    if planned && !pinned[v] {
                        if let Some(s) = slot_of[v] {
                            free.push(s);
                        }
                    }
                }
            }
        }
        let const_bytes = g
            .values
            .iter()
            .enumerate()
            .filter(|(_, v)| matches!(v.source, Source::Const(_)))
            .map(|(i, _)| bytes(i))
            .sum();
        let unshared_bytes = g
            .values
            .iter()
            .enumerate()
            .filter(|(_, v)| !matches!(v.source, Source::Const(_)))
            .map(|(i, _)| bytes(i))
            .sum();
        Plan {
            peak_bytes: slot_bytes.iter().sum(),
            slot_bytes,
            slot_of,
            steps,
            unshared_bytes,
            const_bytes,
        }
    }

    /// A human-readable table of the plan.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        for (i, st) in self.steps.iter().enumerate() {
            s += &format!(
                "{i:>4} {:<18} {:<24} {:>12} B  slot {}\n",
                st.op,
                format!("{:?}", st.output_shape),
                st.output_bytes,
                st.slot
            );
        }
        s += &format!(
            "buffers: {} ({} B activations, {} B without reuse, {} B constants)\n",
            self.slot_bytes.len(),
            self.peak_bytes,
            self.unshared_bytes,
            self.const_bytes
        );
        s
    }
}
