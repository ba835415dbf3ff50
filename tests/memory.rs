//! Memory of repeated GPU runs: tiled inference must not accumulate wgpu objects or host
//! memory per tile (issue 6: RSS grew ≈1.3 MB per tile on lavapipe, because the context
//! gate's loop was bounded by a uniform and Mesa 22.3's lavapipe recompiled — and leaked —
//! such a shader at every dispatch; see docs/lavapipe.md).

mod common;

use volfuse::graph::Graph;
use volfuse::io::volume::MemoryWriter;
use volfuse::models::{Backend, Bundle, Runner, Volume};
use volfuse::tiling::{run_tiled, Context, Outputs, TileOptions};
use volfuse::VolumeData;

/// The tests of this file run one at a time (RSS is per process), each on its own context
/// (wgpu's object counts are per instance).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn own_context() -> std::sync::Arc<volfuse::GpuContext> {
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        std::env::set_var("XDG_RUNTIME_DIR", std::env::temp_dir());
    }
    let opts = volfuse::GpuOptions::from_env().expect("VOLFUSE_* settings");
    std::sync::Arc::new(volfuse::GpuContext::new(&opts).expect("a GPU adapter"))
}

/// Resident set size of this process in KiB (0 where /proc is unavailable).
fn vm_rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// A random uint8 volume.
fn volume(seed: u64, shape: [usize; 3]) -> Volume {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let data: Vec<u8> = (0..shape.iter().product::<usize>())
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 56) as u8
        })
        .collect();
    Volume::new(shape, VolumeData::U8(data)).expect("volume")
}

fn tiny_bundle() -> Bundle {
    let b = Bundle::load(&common::fixture("bundle_tiny_ctx")).expect("bundle");
    assert!(
        b.unet.fusion,
        "the fixture must fuse context (it exercises the gates)"
    );
    b
}

/// The UNet with context fusion (context gates at every level) of the tiny bundle, as the
/// tiled pipeline runs it. RSS must not grow with the number of runs: before the fix each
/// run leaked ≈1.3 MB inside lavapipe (four gate dispatches, each a fresh shader compile),
/// 12 runs ≈ 15 MB; the 6 MB bound leaves room for allocator noise. wgpu's live objects must
/// not change at all.
#[test]
fn repeated_unet_runs_hold_memory_flat() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let ctx = own_context();
    let bundle = tiny_bundle();
    let mut runner = Runner::new(Backend::Gpu(ctx.clone()));
    let [d, h, w] = bundle.unet.config.input_size;
    let cd = bundle.unet.config.input_channels;
    let feats: Vec<f32> = (0..cd * d * h * w)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let ctx_feats: Vec<f32> = feats.iter().rev().copied().collect();
    let build = || {
        let mut g = Graph::new();
        let f = g.input("features", &[1, cd, d, h, w]);
        let c = g.input("context", &[1, cd, d, h, w]);
        let logits = bundle.unet.build(&mut g, f, Some(c))?;
        g.output(logits);
        Ok(g)
    };
    let mut run = || {
        runner
            .run("unet", build, &[&feats, &ctx_feats])
            .expect("UNet run")
    };
    // Warm up: pipelines compiled, buffers and allocator blocks in place.
    let first = run();
    for _ in 0..2 {
        run();
    }
    assert_runs_stay_flat(&ctx, "UNet", first, run);
}

fn run_tiles(bundle: &Bundle, runner: &mut Runner, shape: [usize; 3], seed: u64) -> usize {
    let raw = volume(seed, shape);
    let ctx_vol = volume(seed + 1, shape);
    let outputs = Outputs {
        labels: Some(Box::new(MemoryWriter::new(&shape))),
        ..Default::default()
    };
    let s = run_tiled(
        bundle,
        runner,
        &raw,
        Context::Volume {
            volume: &ctx_vol,
            scale: 1.0,
        },
        &TileOptions::default(),
        outputs,
        &mut |_| {},
    )
    .expect("tiled run");
    s.tiles_run
}

/// The tiled segmentation on N tiles, then on 3N tiles with the same runner: the live wgpu
/// objects (buffers, textures, bind groups, pipelines, …) after the second run equal those
/// after the first — executors, bind groups and uniforms are built once per graph, not
/// per tile, and nothing per-call (read-back staging, encoders) outlives its call.
#[test]
fn tiled_runs_do_not_accumulate_wgpu_objects() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let ctx = own_context();
    let bundle = tiny_bundle();
    let (tile, _) = volfuse::tiling::tile_extent(&bundle);
    let mut runner = Runner::new(Backend::Gpu(ctx.clone()));
    // One tile, then three along x (stride = 3/4 of a tile).
    let n1 = run_tiles(&bundle, &mut runner, tile, 3);
    let live1 = ctx
        .live_resources()
        .expect("a headless context reports its objects");
    let long = [tile[0], tile[1], tile[2] + tile[2] / 4 * 3 * 2];
    let n3 = run_tiles(&bundle, &mut runner, long, 5);
    assert_eq!((n1, n3), (1, 3), "tile counts");
    let live3 = ctx.live_resources().expect("live objects");
    assert_eq!(
        live3, live1,
        "wgpu objects after {n3} tiles differ from those after {n1}"
    );
    assert!(live1.buffers > 0 && live1.bind_groups > 0 && live1.compute_pipelines > 0);
}

/// Repeated ViT runs with the fused q/k RoPE and LayerScale-residual matmul epilogues
/// (texture-path entry points with extra texture and storage bindings): nothing may be
/// recompiled or allocated per dispatch, so RSS and live wgpu objects stay flat.
#[test]
fn repeated_vit_runs_hold_memory_flat() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let ctx = own_context();
    // (weights of at least 64 KiB, so the projections take the texture path)
    let cfg = volfuse::models::vit::VitConfig {
        hidden_size: 128,
        intermediate_size: 256,
        num_hidden_layers: 2,
        num_attention_heads: 8,
        num_register_tokens: 4,
        ..Default::default()
    };
    let vit = volfuse::models::vit::Vit::random(cfg, 7).expect("random ViT");
    let mut runner = Runner::new(Backend::Gpu(ctx.clone()));
    let (n, h, w) = (2, 48, 32);
    let images: Vec<f32> = (0..n * 3 * h * w)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let mut run = || vit.run(&mut runner, &images, n, h, w, n).expect("ViT run");
    let first = run();
    for _ in 0..2 {
        run();
    }
    let caps = &ctx.caps;
    if caps.subgroups && caps.min_subgroup_size >= 8 && caps.max_uniform_binding >= 65536 {
        let compiled: Vec<&str> = ctx.compiled_kernels().iter().map(|k| k.entry).collect();
        // (matmul_tex48r4w_*: W from a texture, three column blocks per invocation, every
        // block in one dispatch, on CPU adapters; matmul_tex16r4_*: W through uniform
        // windows elsewhere)
        for e in ["_rope", "_res"] {
            let used = compiled
                .iter()
                .any(|k| k.starts_with("matmul_tex") && k.contains("r4") && k.ends_with(e));
            assert!(used, "no four-row {e} kernel: {compiled:?}");
        }
    }
    assert_runs_stay_flat(&ctx, "ViT", first, run);
}

/// Runs `run` 12 more times (after the caller's warm-up): every output must equal
/// `first`, wgpu's live objects must not change and RSS must grow by less than 6 MB —
/// a shader lavapipe recompiles per dispatch leaks ~0.5 MB each (docs/lavapipe.md).
fn assert_runs_stay_flat<T: PartialEq + std::fmt::Debug>(
    ctx: &volfuse::GpuContext,
    what: &str,
    first: T,
    mut run: impl FnMut() -> T,
) {
    let live0 = ctx.live_resources();
    let rss0 = vm_rss_kb();
    let n = 12;
    for _ in 0..n {
        assert_eq!(run(), first, "the same inputs gave different outputs");
    }
    let grown_kb = vm_rss_kb() as i64 - rss0 as i64;
    assert_eq!(
        ctx.live_resources(),
        live0,
        "wgpu objects accumulate across runs"
    );
    assert!(
        grown_kb < 6 * 1024,
        "RSS grew by {grown_kb} KiB over {n} {what} runs ({} KiB per run): something is \
         allocated per run (a shader lavapipe recompiles per dispatch? see docs/lavapipe.md)",
        grown_kb / n as i64
    );
}

/// A runner holds one stage on the device at a time (issue 8: on lavapipe device memory is
/// RAM, and the ViT's and the UNet's buffers, weights and scratch textures used to stay
/// side by side): running the UNet frees the ViT's executor, weights and textures; the ViT
/// is rebuilt on its next run (its weights read back from the spill file) and gives
/// bit-identical results; a graph run beside the ViT keeps its executor;
/// `set_keep_all(true)` keeps everything; cycles do not accumulate wgpu objects.
#[test]
fn stages_take_turns_on_the_device() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let ctx = own_context();
    let bundle = tiny_bundle();
    let mut runner = Runner::new(Backend::Gpu(ctx.clone()));
    let s = bundle.slice_size;
    let (vit_key, vit_build) = ("vit", || bundle.vit.graph(2, s, s));
    let images: Vec<f32> = (0..2 * 3 * s * s)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let [d, h, w] = bundle.unet.config.input_size;
    let c = bundle.unet.config.base_channels;
    // The projection-first UNet with context, as the pipeline builds it.
    let unet_key = "unet";
    let unet_build = || {
        let mut g = Graph::new();
        let f = g.input("features", &[1, c, d, h, w]);
        let cv = g.input("context", &[1, c, d, h, w]);
        let logits = bundle.unet.build_projected(&mut g, f, Some(cv))?;
        g.output(logits);
        Ok(g)
    };
    let feats: Vec<f32> = (0..c * d * h * w)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    // A small graph run beside the ViT (as the token lift is).
    let side_build = || {
        let mut g = Graph::new();
        let x = g.input("x", &[64]);
        let y = g.op(volfuse::ops::elementwise::Unary::Relu, &[x])?;
        g.output(y);
        Ok(g)
    };
    let side_in: Vec<f32> = (0..64).map(|i| i as f32 - 31.5).collect();
    let act = |r: &Runner, k: &str| r.plan(k).expect("prepared").peak_bytes;

    let vit_first = runner.run(vit_key, vit_build, &[&images]).expect("ViT");
    // Uploaded weights leave host memory for the spill file (read back on a rebuild).
    let (vit_graph, _) = runner.prepared(vit_key).expect("prepared");
    if cfg!(unix) {
        assert_eq!(vit_graph.constant_bytes_on_host(), 0);
    }
    runner
        .run_beside("side", side_build, &[&side_in])
        .expect("side graph");
    let (a_vit, w_vit) = runner.device_bytes();
    assert_eq!(a_vit, act(&runner, vit_key) + act(&runner, "side"));
    assert!(w_vit > 0);
    let tex_vit = ctx.scratch_texture_bytes();

    let unet_first = runner
        .run(unet_key, unet_build, &[&feats, &feats])
        .expect("UNet");
    let pipelines_both = ctx.live_resources().map(|r| r.compute_pipelines);
    let (a_unet, w_unet) = runner.device_bytes();
    assert_eq!(
        a_unet,
        act(&runner, unet_key),
        "the ViT's and the side graph's buffers must be freed"
    );
    let unet_weights: u64 = {
        let g = unet_build().expect("UNet graph");
        g.plan(true).const_bytes
    };
    assert!(
        w_unet <= unet_weights + (1 << 20),
        "only the UNet's weights may stay: {w_unet} B held, the UNet has {unet_weights} B"
    );
    assert!(
        w_unet < w_vit + unet_weights,
        "the ViT's weights were not freed"
    );

    // The ViT again: rebuilt, bit-identical, the UNet freed; textures no larger than before.
    let vit_again = runner
        .run(vit_key, vit_build, &[&images])
        .expect("ViT again");
    assert_eq!(vit_first, vit_again);
    assert_eq!(runner.device_bytes().0, act(&runner, vit_key));
    assert!(ctx.scratch_texture_bytes() <= tex_vit.max(1));
    // The side graph runs beside the ViT: the ViT keeps its executor.
    runner
        .run_beside("side", side_build, &[&side_in])
        .expect("side graph");
    assert_eq!(
        runner.device_bytes().0,
        act(&runner, vit_key) + act(&runner, "side")
    );
    // Compiled pipelines outlive the stage switches: none was compiled again, none lost.
    assert_eq!(
        ctx.live_resources().map(|r| r.compute_pipelines),
        pipelines_both
    );
    let unet_again = runner
        .run(unet_key, unet_build, &[&feats, &feats])
        .expect("UNet again");
    assert_eq!(unet_first, unet_again);

    // Cycles of both stages hold wgpu's live objects exactly.
    let cycle = |r: &mut Runner| {
        r.run(vit_key, vit_build, &[&images]).expect("ViT");
        r.run_beside("side", side_build, &[&side_in]).expect("side");
        r.run(unet_key, unet_build, &[&feats, &feats])
            .expect("UNet");
    };
    cycle(&mut runner);
    let live = ctx.live_resources();
    for _ in 0..2 {
        cycle(&mut runner);
    }
    assert_eq!(live, ctx.live_resources());

    // keep_all: both stay (the side graph went with the last UNet run).
    runner.set_keep_all(true);
    runner.run(vit_key, vit_build, &[&images]).expect("ViT");
    assert_eq!(
        runner.device_bytes().0,
        act(&runner, vit_key) + act(&runner, unet_key)
    );
}

/// Scratch textures: one per operand slot, the smallest large enough; a larger request
/// replaces the smaller ones (and says so through the generation counter).
#[test]
fn scratch_textures_are_shared_across_sizes() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let ctx = own_context();
    let row = volfuse::GpuContext::TEXTURE_WIDTH as u64;
    let g0 = ctx.texture_generation();
    let small = ctx.scratch_texture(9, 3 * row).expect("texture");
    assert_eq!(small.height(), 3);
    assert_eq!(ctx.texture_generation(), g0);
    let big = ctx.scratch_texture(9, 100 * row + 1).expect("texture");
    assert!(
        (101..=101 + 101 / 8).contains(&big.height()),
        "{}",
        big.height()
    );
    assert_eq!(
        ctx.texture_generation(),
        g0 + 1,
        "the smaller one was replaced"
    );
    // Smaller requests now get the large one; another slot gets its own.
    assert_eq!(ctx.scratch_texture(9, 5 * row).expect("texture"), big);
    let other = ctx.scratch_texture(10, 5 * row).expect("texture");
    assert_ne!(other, big);
    assert_eq!(
        ctx.scratch_texture_bytes(),
        (big.height() as u64 + other.height() as u64) * row * 16
    );
    ctx.release_scratch_textures();
    assert_eq!(ctx.scratch_texture_bytes(), 0);
}
