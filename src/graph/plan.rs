//! Buffer planning by liveness: each value lives from its node until its last reader (an
//! output to the end of the run, an input from the start). Values whose lifetimes do not
//! overlap share a buffer ("slot"), assigned largest first, each to the smallest slot it
//! fits beside ("greedy by size"): the large tensors get their own buffers and the small
//! ones fill the gaps, so the buffers come close to the most bytes alive at once
//! ([`Plan::live_bytes`]). Inputs are written at the start of every run, so nothing needs
//! an input's contents after its last reader: on the GPU the large feature volumes of a
//! UNet free their buffers for the decoder. An output may take a buffer whose earlier
//! values died before it was made (outputs are read back only after the run).

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
    /// The most bytes of values alive at once (inputs, intermediates, outputs): what an
    /// ideal packing would need; `peak_bytes` is larger where slots grew to fit.
    pub live_bytes: u64,
    /// Bytes of values alive while each node runs (its inputs, its output and everything
    /// alive across it), in node order.
    pub live_at_step: Vec<u64>,
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
        // Lifetimes on a clock where inputs appear at 0 and node i's output at i + 1, a value
        // read by node i living through i + 1; outputs live to the end.
        let nn = g.nodes.len();
        let end_of = |v: usize, def: usize| -> usize {
            if pinned[v] {
                nn + 1
            } else {
                last_use[v].map_or(def, |u| u + 1)
            }
        };
        let mut life: Vec<Option<(usize, usize)>> = vec![None; nv];
        for v in &g.inputs {
            life[v.0] = Some((0, end_of(v.0, 0)));
        }
        for (i, n) in g.nodes.iter().enumerate() {
            let out = n.output.0;
            if !is_input[out] {
                life[out] = Some((i + 1, end_of(out, i + 1)));
            }
        }
        let mut live_at = vec![0u64; nn + 2];
        for (v, l) in life.iter().enumerate() {
            if let Some((a, b)) = l {
                live_at[*a..=*b].iter_mut().for_each(|x| *x += bytes(v));
            }
        }
        let live_bytes = live_at.iter().copied().max().unwrap_or(0);
        let live_at_step = live_at[1..=nn].to_vec();
        // Slots: without reuse one per value; with reuse, largest values first, each into
        // the smallest slot none of whose values' lifetimes overlaps its own ("greedy by
        // size": the big tensors get their own buffers, the small ones fill the gaps).
        let mut slot_bytes: Vec<u64> = Vec::new();
        let mut slot_lives: Vec<Vec<(usize, usize)>> = Vec::new();
        let mut slot_of = vec![None; nv];
        let mut order: Vec<usize> = (0..nv).filter(|v| life[*v].is_some()).collect();
        if reuse {
            order.sort_by_key(|v| (std::cmp::Reverse(bytes(*v)), life[*v]));
        }
        for v in order {
            let (a, b) = life[v].expect("ordered values have lifetimes");
            let need = bytes(v);
            let fit = if reuse {
                (0..slot_bytes.len())
                    .filter(|s| slot_lives[*s].iter().all(|(c, d)| b < *c || *d < a))
                    .min_by_key(|s| slot_bytes[*s])
            } else {
                None
            };
            let slot = match fit {
                Some(s) => {
                    slot_bytes[s] = slot_bytes[s].max(need);
                    s
                }
                None => {
                    slot_bytes.push(need);
                    slot_lives.push(Vec::new());
                    slot_bytes.len() - 1
                }
            };
            slot_lives[slot].push((a, b));
            slot_of[v] = Some(slot);
        }
        let steps = g
            .nodes
            .iter()
            .map(|n| Step {
                op: n.op.name(),
                output_shape: g.values[n.output.0].shape.clone(),
                output_bytes: bytes(n.output.0),
                slot: slot_of[n.output.0].expect("every op output has a slot"),
            })
            .collect();
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
            live_bytes,
            live_at_step,
            const_bytes,
        }
    }

    /// A human-readable table of the plan.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        for (i, st) in self.steps.iter().enumerate() {
            s += &format!(
                "{i:>4} {:<18} {:<24} {:>12} B  slot {:<3} {:>12} B alive\n",
                st.op,
                format!("{:?}", st.output_shape),
                st.output_bytes,
                st.slot,
                self.live_at_step.get(i).copied().unwrap_or(0)
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
