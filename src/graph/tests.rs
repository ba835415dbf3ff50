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

/// x, y → a = relu(x) (x's last reader) → b = sigmoid(a) → c = b + a → d = c · y; outputs
/// d and y. x's buffer is free after `a`, so `b` takes it (and later `d`); y is also an
/// output, so its buffer is never handed on.
fn input_reuse_graph(n: usize) -> Graph {
    let mut g = Graph::new();
    let x = g.input("x", &[n]);
    let y = g.input("y", &[n]);
    let a = g.op(Unary::Relu, &[x]).unwrap();
    let b = g.op(Unary::Sigmoid, &[a]).unwrap();
    let c = g.op(Binary::add(), &[b, a]).unwrap();
    let d = g.op(Binary::mul(), &[c, y]).unwrap();
    g.output(d);
    g.output(y);
    g
}

#[test]
fn input_buffers_are_reused_after_their_last_reader() {
    let n = 1001;
    let g = input_reuse_graph(n);
    let shared = g.plan(true);
    let unshared = g.plan(false);
    let slot = |p: &Plan, v: usize| p.slot_of[v].expect("planned");
    // Values: 0 x, 1 y, 2 a, 3 b, 4 c, 5 d.
    assert_eq!(slot(&shared, 3), slot(&shared, 0), "{}", shared.describe());
    assert!((2..6).all(|v| slot(&shared, v) != slot(&shared, 1)));
    // x/b/d (d, an output, is made after b's last reader), y, a, c: four buffers, not six.
    assert_eq!(slot(&shared, 5), slot(&shared, 0), "{}", shared.describe());
    assert_eq!(shared.slot_bytes.len(), 4);
    assert_eq!(shared.live_bytes, 4 * 4 * n as u64); // x, y, a alive when b is made
    assert!(shared.peak_bytes < unshared.peak_bytes);
    let exe = GpuExecutor::new(ctx(), &g, &shared, &mut ConstCache::new()).unwrap();
    let plain = GpuExecutor::new(ctx(), &g, &unshared, &mut ConstCache::new()).unwrap();
    let mut r = rng();
    // Repeated runs with fresh inputs: each run rewrites x's buffer, which the previous run
    // left holding b.
    for round in 0..3 {
        let (x, y) = (random(&mut r, n), random(&mut r, n));
        let want = CpuExecutor::run(&g, &unshared, &[&x, &y]).unwrap();
        let cpu = CpuExecutor::run_owned(
            &g,
            &shared,
            vec![x.clone(), y.clone()],
            &mut Default::default(),
        )
        .unwrap();
        assert_eq!(cpu, want);
        for i in 0..2 {
            ctx().fill(exe.output_buffer(i).unwrap(), f32::NAN);
        }
        let got = if round % 2 == 0 {
            exe.run(ctx(), &g, &[&x, &y]).unwrap()
        } else {
            exe.run_owned(ctx(), &g, vec![x.clone(), y.clone()])
                .unwrap()
        };
        assert!(rel_err(&got[0], &want[0]) < 1e-5);
        assert_eq!(got[1], y);
        assert_eq!(got, plain.run(ctx(), &g, &[&x, &y]).unwrap());
    }
    // The per-node profile takes the inputs by value too and leaves the same outputs.
    let (x, y) = (random(&mut r, n), random(&mut r, n));
    let want = CpuExecutor::run(&g, &unshared, &[&x, &y]).unwrap();
    let secs = exe.profile_nodes(ctx(), &g, vec![x, y.clone()]).unwrap();
    assert_eq!(secs.len(), g.len());
    let d = ctx().read_buffer(exe.output_buffer(0).unwrap(), n).unwrap();
    assert!(rel_err(&d, &want[0]) < 1e-5);
}

#[test]
fn bounded_writes_arrive_whole() {
    // Larger than one staging piece, and not a multiple of it.
    let n = (crate::gpu::WRITE_PIECE_BYTES / 4) as usize * 2 + 777;
    let mut r = rng();
    let data = random(&mut r, n);
    let buf = ctx().empty(&[n]).unwrap();
    ctx().fill(&buf.buffer, f32::NAN);
    ctx().write_bounded(&buf.buffer, &data).unwrap();
    assert_eq!(ctx().read_buffer(&buf.buffer, n).unwrap(), data);
}

/// The planner on random DAGs of tensors of different sizes (element-wise ops and channel
/// concats): values sharing a buffer never live at the same time, every buffer holds its
/// values, no buffer set is larger than one buffer per value or smaller than the bytes
/// alive at once, and the CPU and GPU results equal the unplanned ones.
#[test]
fn random_graphs_plan_without_overlap() {
    use crate::ops::concat::Concat;
    use rand::Rng;
    let mut r = rng();
    for round in 0..12 {
        let mut g = Graph::new();
        let n_in = r.random_range(1..4);
        let mut vals: Vec<Value> = (0..n_in)
            .map(|i| g.input(&format!("x{i}"), &[1, r.random_range(1..4), 3, 5, 7]))
            .collect();
        for _ in 0..r.random_range(4..24) {
            let a = vals[r.random_range(0..vals.len())];
            let same: Vec<Value> = vals
                .iter()
                .copied()
                .filter(|v| g.shape(*v) == g.shape(a))
                .collect();
            let v = match r.random_range(0..4) {
                0 => g.op(Unary::Relu, &[a]),
                1 => g.op(Binary::add(), &[a, same[r.random_range(0..same.len())]]),
                2 if g.shape(a)[1] < 12 => {
                    let b = vals[r.random_range(0..vals.len())];
                    g.op(Concat, &[a, b])
                }
                _ => g.op(Unary::Sigmoid, &[a]),
            }
            .unwrap();
            vals.push(v);
        }
        // The last value and a random earlier one are outputs.
        g.output(*vals.last().unwrap());
        g.output(vals[r.random_range(0..vals.len())]);
        let shared = g.plan(true);
        let unshared = g.plan(false);
        // Lifetimes as the planner defines them (inputs at 0, node i's output at i + 1).
        let nn = g.nodes.len();
        let mut life = vec![None::<(usize, usize)>; g.values.len()];
        for v in &g.inputs {
            life[v.0] = Some((0, 0));
        }
        for (i, n) in g.nodes.iter().enumerate() {
            life[n.output.0] = Some((i + 1, i + 1));
            for v in &n.inputs {
                if let Some((_, e)) = life[v.0].as_mut() {
                    *e = (*e).max(i + 1);
                }
            }
        }
        for v in &g.outputs {
            if let Some((_, e)) = life[v.0].as_mut() {
                *e = nn + 1;
            }
        }
        let bytes = |v: usize| 4 * numel(&g.values[v].shape) as u64;
        for a in 0..g.values.len() {
            let Some(sa) = shared.slot_of[a] else {
                continue;
            };
            assert!(shared.slot_bytes[sa] >= bytes(a), "round {round}");
            for b in a + 1..g.values.len() {
                if shared.slot_of[b] == Some(sa) {
                    let ((a0, a1), (b0, b1)) = (life[a].unwrap(), life[b].unwrap());
                    assert!(
                        a1 < b0 || b1 < a0,
                        "round {round}: values {a} and {b} share slot {sa} while both alive\n{}",
                        shared.describe()
                    );
                }
            }
        }
        assert!(shared.peak_bytes <= unshared.peak_bytes);
        assert!(shared.peak_bytes >= shared.live_bytes);
        let inputs: Vec<Vec<f32>> = g
            .inputs
            .iter()
            .map(|v| random(&mut r, numel(&g.values[v.0].shape)))
            .collect();
        let refs: Vec<&[f32]> = inputs.iter().map(|v| v.as_slice()).collect();
        let cpu_a = CpuExecutor::run(&g, &shared, &refs).unwrap();
        let cpu_b = CpuExecutor::run(&g, &unshared, &refs).unwrap();
        assert_eq!(cpu_a, cpu_b, "round {round}");
        let mut cache = ConstCache::new();
        let exe = GpuExecutor::new(ctx(), &g, &shared, &mut cache).unwrap();
        for _ in 0..2 {
            let gpu = exe.run(ctx(), &g, &refs).unwrap();
            for (x, y) in gpu.iter().zip(&cpu_a) {
                assert!(rel_err(x, y) < 1e-5, "round {round}");
            }
        }
    }
}
