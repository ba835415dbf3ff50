//! Runs a planned graph with the CPU reference ops.

use super::{Graph, Plan, Source};
use crate::error::Result;
use crate::ops::numel;
use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

/// The CPU backend: every op's reference implementation, buffers as the plan says.
pub struct CpuExecutor;

/// The plan's buffers on the CPU, kept between runs of one graph so a repeated run
/// allocates (and page-faults) nothing new.
#[derive(Debug, Default)]
pub struct CpuSlots(Vec<Vec<f32>>);

/// Per-op-name (name, seconds, flops) totals, largest time first.
pub type Profile = Vec<(String, f64, u64)>;

fn borrowed<'a>(inputs: &[&'a [f32]]) -> Vec<Cow<'a, [f32]>> {
    inputs.iter().map(|d| Cow::Borrowed(*d)).collect()
}

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
        Self::execute(g, plan, borrowed(inputs), slots, None)
    }

    /// As [`CpuExecutor::run_with`], taking the inputs by value: each is freed after its
    /// last reader, so large inputs (a UNet's feature volumes) do not stay alive beside the
    /// activations of the whole graph.
    pub fn run_owned(
        g: &Graph,
        plan: &Plan,
        inputs: Vec<Vec<f32>>,
        slots: &mut CpuSlots,
    ) -> Result<Vec<Vec<f32>>> {
        Self::execute(
            g,
            plan,
            inputs.into_iter().map(Cow::Owned).collect(),
            slots,
            None,
        )
    }

    /// Runs once and returns the time per op name (with its flops), like
    /// `GpuExecutor::profile`.
    pub fn profile(
        g: &Graph,
        plan: &Plan,
        inputs: &[&[f32]],
        slots: &mut CpuSlots,
    ) -> Result<Profile> {
        let mut secs = Vec::new();
        Self::execute(g, plan, borrowed(inputs), slots, Some(&mut secs))?;
        Ok(g.profile_by_op(secs.into_iter().enumerate()))
    }

    /// Runs once with the inputs handed over (as [`CpuExecutor::run_owned`]) and returns
    /// the wall seconds of every node, in graph order.
    pub fn node_seconds(
        g: &Graph,
        plan: &Plan,
        inputs: Vec<Vec<f32>>,
        slots: &mut CpuSlots,
    ) -> Result<Vec<f64>> {
        let mut secs = Vec::new();
        let owned = inputs.into_iter().map(Cow::Owned).collect();
        Self::execute(g, plan, owned, slots, Some(&mut secs))?;
        Ok(secs)
    }

    fn execute(
        g: &Graph,
        plan: &Plan,
        inputs: Vec<Cow<'_, [f32]>>,
        slots: &mut CpuSlots,
        mut node_secs: Option<&mut Vec<f64>>,
    ) -> Result<Vec<Vec<f32>>> {
        {
            let data: Vec<&[f32]> = inputs.iter().map(|d| &d[..]).collect();
            g.check_inputs(&data)?;
        }
        // Inputs are read where the caller holds them (never copied into the plan's
        // buffers); inputs handed over by value are dropped after their last reader.
        let mut inputs: Vec<Option<Cow<'_, [f32]>>> = inputs.into_iter().map(Some).collect();
        let mut input_of = vec![None::<usize>; g.values.len()];
        for (i, v) in g.inputs.iter().enumerate() {
            input_of[v.0] = Some(i);
        }
        let mut last_read = vec![None::<usize>; inputs.len()];
        for (k, n) in g.nodes.iter().enumerate() {
            for v in &n.inputs {
                if let Some(i) = input_of[v.0] {
                    last_read[i] = Some(k);
                }
            }
        }
        for v in &g.outputs {
            if let Some(i) = input_of[v.0] {
                last_read[i] = None; // returned: kept to the end
            }
        }
        // Constants' values (an `Arc` of the host copy; spilled ones are read back for
        // this run).
        let consts: Vec<Option<Arc<Vec<f32>>>> = g
            .values
            .iter()
            .map(|v| match &v.source {
                Source::Const(c) => c.values().map(Some),
                _ => Ok(None),
            })
            .collect::<Result<_>>()?;
        let slots = &mut slots.0;
        slots.resize_with(plan.slot_bytes.len(), Vec::new);
        for (k, n) in g.nodes.iter().enumerate() {
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
                        match (&info.source, input_of[v.0]) {
                            (Source::Const(_), _) => &consts[v.0].as_deref().expect("constant")[..],
                            (_, Some(i)) => &inputs[i].as_deref().expect("input released")[..len],
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
                if let Some(p) = node_secs.as_deref_mut() {
                    p.push(t0.elapsed().as_secs_f64());
                }
            }
            slots[out_slot] = out;
            for (i, last) in last_read.iter().enumerate() {
                if *last == Some(k) {
                    inputs[i] = None;
                }
            }
        }
        // Outputs leave in their buffers (moved, not copied); a value listed twice is
        // copied from its first place.
        let mut done: Vec<(usize, usize)> = Vec::new();
        let mut outs: Vec<Vec<f32>> = Vec::with_capacity(g.outputs.len());
        for v in &g.outputs {
            let len = numel(&g.values[v.0].shape);
            let data = if let Some(&(_, k)) = done.iter().find(|(w, _)| *w == v.0) {
                outs[k].clone()
            } else {
                match (&g.values[v.0].source, input_of[v.0]) {
                    (Source::Const(_), _) => consts[v.0].as_deref().expect("constant").to_vec(),
                    (_, Some(i)) => inputs[i].as_deref().expect("input kept")[..len].to_vec(),
                    _ => {
                        let mut o = std::mem::take(&mut slots[plan.slot_of[v.0].expect("slot")]);
                        o.truncate(len);
                        o
                    }
                }
            };
            done.push((v.0, outs.len()));
            outs.push(data);
        }
        Ok(outs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::elementwise::{Binary, Unary};
    use crate::ops::testing::{random, rng};

    /// Inputs read in place, handed-over inputs dropped after their last reader, outputs
    /// moved out of the buffers (one listed twice, one a graph input, one a constant) and
    /// buffers reused between runs: all give what a plain evaluation gives.
    #[test]
    fn borrowed_owned_and_repeated_runs_agree() {
        let mut r = rng();
        let n = 37;
        let mut g = Graph::new();
        let a = g.input("a", &[n]);
        let b = g.input("b", &[n]);
        let cdata = random(&mut r, n);
        let c = g
            .constant("c", std::sync::Arc::new(cdata.clone()), &[n])
            .unwrap();
        let x = g.op(Unary::Relu, &[a]).unwrap(); // a's last reader
        let y = g.op(Unary::Sigmoid, &[x]).unwrap();
        let z = g.op(Binary::add(), &[y, b]).unwrap(); // b's last reader
        let w = g.op(Binary::add(), &[z, c]).unwrap();
        for v in [w, y, w, b, c] {
            g.output(v);
        }
        let plan = g.plan(true);
        let sig = |v: f32| 1.0 / (1.0 + (-v).exp());
        for _ in 0..3 {
            let (da, db) = (random(&mut r, n), random(&mut r, n));
            let yv: Vec<f32> = da.iter().map(|v| sig(v.max(0.0))).collect();
            let wv: Vec<f32> = (0..n).map(|i| yv[i] + db[i] + cdata[i]).collect();
            let want = vec![wv.clone(), yv, wv, db.clone(), cdata.clone()];
            let mut slots = CpuSlots::default();
            let borrowed = CpuExecutor::run_with(&g, &plan, &[&da, &db], &mut slots).unwrap();
            let again = CpuExecutor::run_with(&g, &plan, &[&da, &db], &mut slots).unwrap();
            let owned = CpuExecutor::run_owned(&g, &plan, vec![da.clone(), db.clone()], &mut slots)
                .unwrap();
            for got in [borrowed, again, owned] {
                assert_eq!(got.len(), want.len());
                for (k, (o, e)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(o.len(), e.len(), "output {k}");
                    for (p, q) in o.iter().zip(e) {
                        assert!(
                            (p - q).abs() <= 1e-6 * (1.0 + q.abs()),
                            "output {k}: {p} vs {q}"
                        );
                    }
                }
            }
        }
    }

    /// A wrong number or size of inputs is an error, borrowed or handed over.
    #[test]
    fn bad_inputs_are_errors() {
        let mut g = Graph::new();
        let a = g.input("a", &[4]);
        let y = g.op(Unary::Relu, &[a]).unwrap();
        g.output(y);
        let plan = g.plan(true);
        let mut slots = CpuSlots::default();
        assert!(CpuExecutor::run_with(&g, &plan, &[&[1.0; 3]], &mut slots).is_err());
        assert!(CpuExecutor::run_owned(&g, &plan, vec![], &mut slots).is_err());
        assert!(CpuExecutor::run_owned(&g, &plan, vec![vec![0.0; 5]], &mut slots).is_err());
    }
}
