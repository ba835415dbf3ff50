//! `volfuse bench`: kernels, autotune, whole models and single layers, with the ratio to
//! PyTorch on the same machine where `tools/.venv` has torch.

use super::{Backend, DeviceArgs};
use anyhow::{Context, Result};
use volfuse::models::{Backend as ModelBackend, Runner};

/// Every kernel benchmark case (or those whose label contains a filter word).
pub(crate) fn kernels(device: &DeviceArgs, filter: &[String], iters: usize) -> Result<()> {
    use volfuse::bench::{time_cpu, time_gpu};
    let cases: Vec<_> = volfuse::bench::all_cases()
        .into_iter()
        .filter(|c| filter.is_empty() || filter.iter().any(|f| c.label.contains(f.as_str())))
        .collect();
    match device.backend {
        Backend::Gpu => {
            let ctx = device.gpu().context("choosing a GPU adapter")?;
            println!("adapter: {}", ctx.describe());
            for c in &cases {
                println!("{}", time_gpu(&ctx, c, iters)?);
            }
        }
        Backend::Cpu => {
            println!("backend: CPU reference");
            for c in &cases {
                println!("{}", time_cpu(c, iters)?);
            }
        }
    }
    Ok(())
}

/// Times every autotuned kernel's variants and saves the choices.
pub(crate) fn autotune(device: &DeviceArgs, iters: usize) -> Result<()> {
    use volfuse::autotune;
    if !autotune::enabled() || device.no_autotune {
        anyhow::bail!(
            "--autotune with autotuning turned off (--no-autotune or VOLFUSE_NO_AUTOTUNE)"
        );
    }
    let ctx = device.gpu().context("choosing a GPU adapter")?;
    println!("adapter: {}", ctx.describe());
    let mut cache = autotune::TuneCache::open_default();
    let mut rows = autotune::bench(&ctx, &mut cache, iters)?;
    rows.extend(autotune::bench_precision(&ctx, iters)?);
    for r in &rows {
        let times: Vec<String> = r
            .variants
            .iter()
            .map(|(n, s)| {
                format!(
                    "{n} {}",
                    s.map_or("failed".into(), |s| format!("{:.3} ms", s * 1e3))
                )
            })
            .collect();
        println!(
            "{:<44} {}  → {} (gain over the default {:.2}×)",
            r.label,
            times.join(", "),
            r.chosen,
            r.gain
        );
    }
    match &cache.path {
        Some(p) => {
            cache.save()?;
            println!("choices saved to {}", p.display());
        }
        None => println!("no cache dir (set XDG_CACHE_HOME or HOME): choices not saved"),
    }
    Ok(())
}

/// The whole pipeline by stage on a model bundle (or a random one), next to PyTorch.
pub(crate) fn model(
    model: &str,
    device: &DeviceArgs,
    iters: usize,
    batch: usize,
    volume: Option<usize>,
    costs_only: bool,
    torch: bool,
) -> Result<()> {
    use volfuse::bench_stages as bs;
    let bundle = bs::load_model(model).with_context(|| format!("loading the model {model}"))?;
    volfuse::gpu::mem_trace(None, "model loaded");
    let backend = device.backend()?;
    if let volfuse::models::Backend::Gpu(ctx) = &backend {
        volfuse::gpu::mem_trace(Some(ctx), "device ready");
    }
    if costs_only {
        print!("{}", bs::costs(&bundle, &backend, batch)?);
        print!("{}", bs::op_tables(&bundle)?);
        return Ok(());
    }
    let mut runner = Runner::new(backend);
    let ours = bs::run(&bundle, &mut runner, batch, volume, iters)?;
    print!("{ours}");
    if torch {
        let args = bs::reference_args(&bundle, volume, iters.min(2));
        match bs::torch_pipeline(&args) {
            Some(v) => {
                let t = v["seconds"].as_f64().unwrap_or(f64::NAN);
                let ours_t = ours.total_seconds.unwrap_or(f64::NAN);
                println!(
                    "pytorch cpu reference ({} threads): {t:.2} s per tile (features {:.2} s, UNet {:.2} s), peak RSS {:.0} MiB",
                    v["threads"].as_u64().unwrap_or(0),
                    v["features_seconds"].as_f64().unwrap_or(f64::NAN),
                    v["unet_seconds"].as_f64().unwrap_or(f64::NAN),
                    v["peak_rss_bytes"].as_f64().unwrap_or(f64::NAN) / 1048576.0
                );
                println!(
                    "volfuse / pytorch speed = {:.3}; UNet alone {:.3}",
                    t / ours_t,
                    v["unet_seconds"].as_f64().unwrap_or(f64::NAN)
                        / ours
                            .stages
                            .iter()
                            .filter(|s| s.name.starts_with("UNet")
                                || s.name.contains("fusion")
                                || s.name.starts_with("head"))
                            .filter_map(|s| s.seconds)
                            .sum::<f64>()
                );
                if let (Some(p), Some(c)) = (v["cpu_seconds"].as_f64(), ours.cpu_seconds) {
                    println!(
                        "CPU seconds per tile: pytorch {p:.1}, volfuse {c:.1}; volfuse / pytorch speed by CPU time = {:.3}",
                        p / c
                    );
                }
                if let (Some(p), Some(r)) = (v["peak_rss_bytes"].as_f64(), ours.peak_rss) {
                    println!(
                        "peak resident memory volfuse / pytorch = {:.3}",
                        r as f64 / p
                    );
                }
            }
            None => {
                println!("pytorch cpu: not available (create tools/.venv, see tools/README.md)")
            }
        }
    }
    Ok(())
}

/// PyTorch's measurement for `args` (tools/bench_torch.py) and its `key` number, or a line
/// saying it is not available.
fn torch_reference(args: &[&str], key: &str) -> Option<(f64, serde_json::Value)> {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    match volfuse::bench::torch_reference(&args) {
        Some(v) => v[key].as_f64().map(|t| (t, v)),
        None => None,
    }
    .or_else(|| {
        println!("pytorch cpu: not available (create tools/.venv, see tools/README.md)");
        None
    })
}

/// The ratio line by CPU time (`unit` of the seconds: "CPU-s" or "CPU-s/image").
fn by_cpu_time(pytorch: Option<f64>, ours: Option<f64>, unit: &str) {
    if let (Some(p), Some(o)) = (pytorch, ours.filter(|o| *o > 0.0)) {
        println!(
            "  by CPU time: pytorch {p:.3} {unit}, volfuse {o:.3} {unit}; volfuse / pytorch speed = {:.3}",
            p / o
        );
    }
}

/// A whole random-weight ViT: images/s, GFLOP/s, per-op time, ratio to PyTorch.
pub(crate) fn vit(
    device: &DeviceArgs,
    size: &str,
    image: usize,
    batch: usize,
    iters: usize,
    profile: bool,
    torch: bool,
) -> Result<()> {
    let backend = device.backend()?;
    let ceiling = match &backend {
        volfuse::models::Backend::Gpu(ctx) => Some(volfuse::bench::arithmetic_ceiling(ctx)?),
        volfuse::models::Backend::Cpu => None,
    };
    let ours = volfuse::bench::vit(backend, size, image, image, batch, iters, profile)?;
    print!("{ours}");
    if let Some(c) = ceiling {
        println!(
            "adapter arithmetic ceiling (muladd_peak: multiplies and adds only): {c:.1} GFLOP/s; \
             this model runs at {:.0} % of it",
            100.0 * ours.gflops / c
        );
    }
    let (image, batch_s) = (image.to_string(), batch.to_string());
    let args = [
        "vit", "--size", size, "--image", &image, "--batch", &batch_s,
    ];
    if let Some((t, v)) = torch
        .then(|| torch_reference(&args, "images_per_s"))
        .flatten()
    {
        let torch_gflops = ours.gflops / ours.images_per_s * t;
        let vs_ceiling = ceiling
            .map(|c| format!(" = {:.2}× the adapter's ceiling", torch_gflops / c))
            .unwrap_or_default();
        println!(
            "pytorch cpu (2 threads): {t:.3} images/s ({torch_gflops:.1} GFLOP/s{vs_ceiling}); \
             volfuse / pytorch = {:.3}",
            ours.images_per_s / t
        );
        let torch_cpu = v["cpu_seconds"].as_f64().map(|c| c / batch as f64);
        by_cpu_time(torch_cpu, ours.cpu_seconds_per_image, "CPU-s/image");
    }
    Ok(())
}

/// A random-weight UNet on one tile, next to PyTorch's.
#[allow(clippy::too_many_arguments)]
pub(crate) fn unet(
    device: &DeviceArgs,
    base: usize,
    channels: usize,
    tile: usize,
    context: bool,
    iters: usize,
    profile: bool,
    torch: bool,
) -> Result<()> {
    let backend = device.backend()?;
    let label = backend.describe();
    let (secs, gflops, prof) = volfuse::bench::unet(backend, base, channels, tile, context, iters)?;
    println!(
        "unet base {base}, {channels} input channels, {tile}^3{} on {label}: {secs:.2} s per tile, {:.0} voxels/s, {gflops:.2} GFLOP/s",
        if context { " + context" } else { "" },
        (tile * tile * tile) as f64 / secs
    );
    let ours_cpu = volfuse::bench::unet_cpu_seconds();
    if ours_cpu > 0.0 {
        println!("  {ours_cpu:.2} CPU-s per tile");
    }
    let [act, wts, scr, live] = volfuse::bench::unet_device_bytes();
    if act > 0 {
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        println!(
            "  device: {:.0} MiB activations (at most {:.0} MiB alive at once) + {:.0} MiB weights + {:.0} MiB slab scratch = {:.0} MiB",
            mib(act),
            mib(live),
            mib(wts),
            mib(scr),
            mib(act + wts + scr)
        );
    }
    if profile {
        for (op, s, f) in prof {
            println!(
                "    {op:<16} {:>9.1} ms {:>8.2} GFLOP/s",
                s * 1e3,
                f as f64 / s.max(1e-12) / 1e9
            );
        }
    }
    let (base, tile, channels) = (base.to_string(), tile.to_string(), channels.to_string());
    let mut args = vec![
        "unet",
        "--base",
        &base,
        "--input",
        &tile,
        "--channels",
        &channels,
    ];
    if context {
        args.push("--context");
    }
    if let Some((t, v)) = torch.then(|| torch_reference(&args, "seconds")).flatten() {
        println!(
            "pytorch cpu (2 threads): {t:.2} s per tile; volfuse / pytorch speed = {:.3}",
            t / secs
        );
        by_cpu_time(v["cpu_seconds"].as_f64(), Some(ours_cpu), "CPU-s");
    }
    Ok(())
}

/// One Conv3d C→C k3 on a tile³ input, next to PyTorch's.
pub(crate) fn conv3d(
    device: &DeviceArgs,
    channels: usize,
    tile: usize,
    iters: usize,
    torch: bool,
) -> Result<()> {
    let case = volfuse::bench::conv3d_case(channels, 3, tile);
    let ours = match device.backend()? {
        ModelBackend::Cpu => volfuse::bench::time_cpu(&case, iters)?,
        ModelBackend::Gpu(ctx) => volfuse::bench::time_gpu(&ctx, &case, iters)?,
    };
    println!("{ours}");
    let (c, tile, iters) = (channels.to_string(), tile.to_string(), iters.to_string());
    let args = [
        "conv3d", "--cin", &c, "--cout", &c, "--kernel", "3", "--input", &tile, "--iters", &iters,
    ];
    if let Some((t, v)) = torch.then(|| torch_reference(&args, "seconds")).flatten() {
        println!(
            "pytorch cpu (2 threads): {t:.3} s, {:.2} GFLOP/s; volfuse / pytorch speed = {:.3}",
            v["gflops"].as_f64().unwrap_or(0.0),
            t / ours.seconds
        );
        by_cpu_time(v["cpu_seconds"].as_f64(), ours.cpu_seconds, "CPU-s");
    }
    Ok(())
}
