//! A small graph executor: build a DAG of [`Op`]s (shapes checked as it is built), plan
//! buffer reuse by liveness, then run it on the GPU ([`GpuExecutor`]) or with the CPU
//! reference ([`CpuExecutor`]) — the same graph, the same plan, the same numbers.
//!
//! ```
//! use volfuse::graph::Graph;
//! use volfuse::ops::elementwise::{Binary, Unary};
//! let mut g = Graph::new();
//! let x = g.input("x", &[2, 3]);
//! let y = g.op(Unary::Relu, &[x]).unwrap();
//! let z = g.op(Binary::add(), &[y, x]).unwrap();
//! g.output(z);
//! let plan = g.plan(true);
//! let out = volfuse::graph::CpuExecutor::run(&g, &plan, &[&[-1.0, 2.0, -3.0, 4.0, 5.0, -6.0]]).unwrap();
//! assert_eq!(out[0], vec![-1.0, 4.0, -3.0, 8.0, 10.0, -6.0]);
//! ```

mod constant;
mod cpu;
mod gpu;
mod plan;
pub mod split;

pub use constant::{Constant, IntoConstant, Parked};
pub use cpu::{CpuExecutor, CpuSlots};
pub use gpu::{ConstCache, GpuExecutor, GraphInput};
pub use plan::{Plan, Step};

use crate::error::{Error, Result};
use crate::ops::{numel, Op};
use std::sync::Arc;

/// A value in the graph (an op's output, an input or a constant).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Value(pub(crate) usize);

#[derive(Debug, Clone)]
pub(crate) enum Source {
    Input,
    Const(Arc<Constant>),
    Computed,
}

#[derive(Debug)]
pub(crate) struct ValueInfo {
    pub name: String,
    pub shape: Vec<usize>,
    pub source: Source,
}

#[derive(Debug)]
pub(crate) struct Node {
    pub op: Box<dyn Op>,
    pub inputs: Vec<Value>,
    pub output: Value,
}

/// A DAG of ops, in insertion (= topological) order.
#[derive(Debug, Default)]
pub struct Graph {
    pub(crate) values: Vec<ValueInfo>,
    pub(crate) nodes: Vec<Node>,
    pub(crate) inputs: Vec<Value>,
    pub(crate) outputs: Vec<Value>,
}

impl Graph {
    /// Per-op totals (op name, seconds, FLOPs), slowest first, from (node, seconds) pairs:
    /// the profile both executors report.
    pub fn profile_by_op(&self, node_secs: impl IntoIterator<Item = (usize, f64)>) -> cpu::Profile {
        let mut by_op: std::collections::BTreeMap<String, (f64, u64)> = Default::default();
        for (node, t) in node_secs {
            let n = &self.nodes[node];
            let shapes: Vec<&[usize]> = n
                .inputs
                .iter()
                .map(|v| self.values[v.0].shape.as_slice())
                .collect();
            let e = by_op.entry(n.op.name().to_string()).or_default();
            e.0 += t;
            e.1 += n.op.flops(&shapes);
        }
        let mut v: cpu::Profile = by_op.into_iter().map(|(k, (t, f))| (k, t, f)).collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        v
    }

    pub fn new() -> Self {
        Self::default()
    }

    fn push_value(&mut self, name: String, shape: Vec<usize>, source: Source) -> Value {
        self.values.push(ValueInfo {
            name,
            shape,
            source,
        });
        Value(self.values.len() - 1)
    }

    /// A graph input, written by the caller on every run.
    pub fn input(&mut self, name: &str, shape: &[usize]) -> Value {
        let v = self.push_value(name.to_string(), shape.to_vec(), Source::Input);
        self.inputs.push(v);
        v
    }

    /// Moves every constant's values to the spill file ([`Constant::spill`]): for a graph
    /// whose constants are on a device and need not stay on the host.
    pub fn spill_constants(&self) -> Result<()> {
        for v in &self.values {
            if let Source::Const(c) = &v.source {
                c.spill()?;
            }
        }
        Ok(())
    }

    /// Bytes of this graph's constants whose values are in host memory (not spilled).
    pub fn constant_bytes_on_host(&self) -> u64 {
        self.values
            .iter()
            .filter_map(|v| match &v.source {
                Source::Const(c) if !c.is_spilled() => Some(4 * c.len() as u64),
                _ => None,
            })
            .sum()
    }

    /// A constant (weights): a `Vec<f32>`, an `Arc<Vec<f32>>` or a shared
    /// [`Constant`]. The same `Arc<Constant>` is uploaded once per [`ConstCache`].
    pub fn constant(
        &mut self,
        name: &str,
        data: impl IntoConstant,
        shape: &[usize],
    ) -> Result<Value> {
        let data = data.into_constant();
        if data.len() != numel(shape) {
            return Err(Error::shape(
                "constant",
                format!(
                    "'{name}': shape {shape:?} needs {} values, got {}",
                    numel(shape),
                    data.len()
                ),
            ));
        }
        Ok(self.push_value(name.to_string(), shape.to_vec(), Source::Const(data)))
    }

    /// Adds `op` applied to `inputs`. The output shape is checked now: a wrong shape is an
    /// error naming the op and its input values, never a GPU fault later.
    pub fn op(&mut self, op: impl Op + 'static, inputs: &[Value]) -> Result<Value> {
        self.op_boxed(Box::new(op), inputs)
    }

    /// As [`Graph::op`], for an already boxed op.
    pub fn op_boxed(&mut self, op: Box<dyn Op>, inputs: &[Value]) -> Result<Value> {
        for v in inputs {
            if v.0 >= self.values.len() {
                return Err(Error::shape(
                    op.name(),
                    "input value is not from this graph",
                ));
            }
        }
        let shapes: Vec<&[usize]> = inputs
            .iter()
            .map(|v| self.values[v.0].shape.as_slice())
            .collect();
        let shape = op.output_shape(&shapes).map_err(|e| {
            let names: Vec<String> = inputs
                .iter()
                .map(|v| format!("{} {:?}", self.values[v.0].name, self.values[v.0].shape))
                .collect();
            Error::shape(
                format!(
                    "{} (node {}, inputs: {})",
                    op.name(),
                    self.nodes.len(),
                    names.join(", ")
                ),
                e.to_string(),
            )
        })?;
        let name = format!("{}#{}", op.name(), self.nodes.len());
        let out = self.push_value(name, shape, Source::Computed);
        self.nodes.push(Node {
            op,
            inputs: inputs.to_vec(),
            output: out,
        });
        Ok(out)
    }

    /// Marks `v` as a graph output (returned by the executors, in this order).
    pub fn output(&mut self, v: Value) {
        self.outputs.push(v);
    }

    /// The shape of a value.
    pub fn shape(&self, v: Value) -> &[usize] {
        &self.values[v.0].shape
    }

    /// Number of ops.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Total floating-point operations of one run.
    pub fn flops(&self) -> u64 {
        self.nodes
            .iter()
            .map(|n| {
                let shapes: Vec<&[usize]> = n
                    .inputs
                    .iter()
                    .map(|v| self.values[v.0].shape.as_slice())
                    .collect();
                n.op.flops(&shapes)
            })
            .sum()
    }

    /// Plans buffers; with `reuse`, intermediates share buffers once their last reader ran.
    pub fn plan(&self, reuse: bool) -> Plan {
        Plan::new(self, reuse)
    }

    pub(crate) fn check_inputs(&self, inputs: &[&[f32]]) -> Result<()> {
        if inputs.len() != self.inputs.len() {
            return Err(Error::Invalid(format!(
                "the graph has {} inputs but {} were given",
                self.inputs.len(),
                inputs.len()
            )));
        }
        for (v, d) in self.inputs.iter().zip(inputs) {
            let info = &self.values[v.0];
            if numel(&info.shape) != d.len() {
                return Err(Error::shape(
                    "graph input",
                    format!(
                        "'{}' has shape {:?} ({} values) but {} were given",
                        info.name,
                        info.shape,
                        numel(&info.shape),
                        d.len()
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
