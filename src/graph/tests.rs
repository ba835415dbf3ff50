use super::*;
use crate::ops::elementwise::{Binary, BinaryKind, Unary};
use crate::ops::matmul::Matmul;
use crate::ops::testing::{ctx, random, rel_err, rng};

/// x → linear(W1,b1) → gelu → linear(W2) → + x → relu … a residual MLP, twice.
fn mlp_graph(rows: usize, d: usize, hidden: usize) -> (Graph, Vec<f32>) {
    let mut r = rng();
    let mut g = Graph::new();
    let x = g.input("x", &[rows, d]);
    let mut h = x;
    for layer in 0..2 {
        let w1 = g
            .constant(
                &format!("w1.{layer}"),
                Arc::new(random(&mut r, hidden * d)),
                &[hidden, d],
            )
            .unwrap();
        let b1 = g
            .constant(
                &format!("b1.{layer}"),
                Arc::new(random(&mut r, hidden)),
                &[hidden],
            )
            .unwrap();
        let w2 = g
            .constant(
                &format!("w2.{layer}"),
                Arc::new(random(&mut r, d * hidden)),
                &[d, hidden],
            )
            .unwrap();
        let ls = g
            .constant(&format!("ls.{layer}"), Arc::new(random(&mut r, d)), &[d])
            .unwrap();
        let a = g.op(Matmul::linear(true), &[h, w1, b1]).unwrap();
        let a = g.op(Unary::Gelu, &[a]).unwrap();
        let a = g.op(Matmul::linear(false), &[a, w2]).unwrap();
        let a = g.op(Binary::along(BinaryKind::Mul, 1), &[a, ls]).unwrap();
        let a = g.op(Binary::add(), &[a, h]).unwrap();
        h = g.op(Unary::Sigmoid, &[a]).unwrap();
    }
    g.output(h);
    let input = random(&mut r, rows * d);
    (g, input)
}

#[test]
fn reuse_gives_same_numbers_with_less_memory() {
    let (g, x) = mlp_graph(37, 24, 70);
    let shared = g.plan(true);
    let unshared = g.plan(false);
    assert!(
        shared.peak_bytes < unshared.peak_bytes,
        "{}",
        shared.describe()
    );
    assert_eq!(unshared.peak_bytes, unshared.unshared_bytes);
    let cpu_shared = CpuExecutor::run(&g, &shared, &[&x]).unwrap();
    let cpu_unshared = CpuExecutor::run(&g, &unshared, &[&x]).unwrap();
    assert_eq!(cpu_shared, cpu_unshared);
    let mut cache = ConstCache::new();
    let gpu_shared = GpuExecutor::new(ctx(), &g, &shared, &mut cache)
        .unwrap()
        .run(ctx(), &g, &[&x])
        .unwrap();
    let gpu_unshared = GpuExecutor::new(ctx(), &g, &unshared, &mut cache)
        .unwrap()
        .run(ctx(), &g, &[&x])
        .unwrap();
    assert!(rel_err(&gpu_shared[0], &cpu_shared[0]) < 1e-5);
    assert_eq!(gpu_shared, gpu_unshared);
}

#[test]
fn constants_are_uploaded_once_per_cache() {
    let (g, x) = mlp_graph(5, 8, 16);
    let plan = g.plan(true);
    let mut cache = ConstCache::new();
    let e1 = GpuExecutor::new(ctx(), &g, &plan, &mut cache).unwrap();
    let bytes = cache.bytes();
    let e2 = GpuExecutor::new(ctx(), &g, &plan, &mut cache).unwrap();
    assert_eq!(cache.bytes(), bytes);
    assert_eq!(bytes, plan.const_bytes);
    let a = e1.run(ctx(), &g, &[&x]).unwrap();
    let b = e2.run(ctx(), &g, &[&x]).unwrap();
    assert_eq!(a, b);
}

#[test]
fn replay_with_new_inputs_matches_cpu() {
    let (g, _) = mlp_graph(9, 16, 12);
    let plan = g.plan(true);
    let exe = GpuExecutor::new(ctx(), &g, &plan, &mut ConstCache::new()).unwrap();
    let mut r = rng();
    for _ in 0..3 {
        let x = random(&mut r, 9 * 16);
        let want = CpuExecutor::run(&g, &plan, &[&x]).unwrap();
        let got = exe.run(ctx(), &g, &[&x]).unwrap();
        assert!(rel_err(&got[0], &want[0]) < 1e-5);
    }
}

#[test]
fn wrong_shape_is_an_error_naming_the_op() {
    let mut g = Graph::new();
    let x = g.input("x", &[4, 5]);
    let w = g.constant("w", Arc::new(vec![0.5; 12]), &[3, 4]).unwrap();
    let e = g
        .op(Matmul::linear(false), &[x, w])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("matmul") && e.contains("x [4, 5]") && e.contains("w [3, 4]"),
        "{e}"
    );
}

#[test]
fn wrong_input_length_is_an_error() {
    let (g, _) = mlp_graph(3, 4, 5);
    let plan = g.plan(true);
    let e = CpuExecutor::run(&g, &plan, &[&[1.0, 2.0]])
        .unwrap_err()
        .to_string();
    assert!(e.contains("'x'"), "{e}");
}

#[test]
fn plan_is_inspectable() {
    let (g, _) = mlp_graph(3, 4, 5);
    let plan = g.plan(true);
    let text = plan.describe();
    assert!(text.contains("matmul") && text.contains("gelu"), "{text}");
    assert_eq!(plan.steps.len(), g.len());
    assert!(g.flops() > 0);
}
