//! Per-adapter kernel autotuning: for an op with several GPU variants that compute the same
//! thing, time every variant once per (adapter + driver, op family, shape class), remember
//! the fastest in a JSON map in the user's cache dir, and use it from then on.
//!
//! - Cache file: `$XDG_CACHE_HOME/volfuse/autotune.json`, else `~/.cache/volfuse/autotune.json`
//!   (or `VOLFUSE_AUTOTUNE_CACHE`). A map `"adapter|driver|family|class" → variant name`.
//!   A missing file is an empty map; an unreadable or corrupt one is ignored with a warning
//!   (and replaced on the next save); the file is written through a temporary file.
//! - `VOLFUSE_NO_AUTOTUNE=1` (the command line's `--no-autotune`) turns it off: every op
//!   keeps its default variant. The default must always be correct on its own: tuning only
//!   ever picks among variants that compute the same numbers.
//! - A cached name that is not among the variants offered now (an older volfuse) is
//!   dropped and the default variant runs; the next first use times the variants again.
//! - Graph executors ([`crate::graph::GpuExecutor::new`]) consult the process-wide cache
//!   ([`with_global`]) when the context has `autotune` on (the command line's default):
//!   every matmul with the `Auto` kernel gets its tuned kernel; a choice timed now is
//!   saved at once.
//!
//! Shape classes round every dimension up to a power of two, so nearby shapes share one
//! measurement.

use crate::bench::{time_gpu, Case};
use crate::error::{Error, Result};
use crate::gpu::GpuContext;
use crate::ops::Op;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Whether autotuning is on (`VOLFUSE_NO_AUTOTUNE` unset, empty or `0`).
pub fn enabled() -> bool {
    !matches!(std::env::var("VOLFUSE_NO_AUTOTUNE"), Ok(v) if !v.is_empty() && v != "0")
}

/// The cache file: `VOLFUSE_AUTOTUNE_CACHE`, `$XDG_CACHE_HOME/volfuse/autotune.json` or
/// `$HOME/.cache/volfuse/autotune.json`; None when none of these is set.
pub fn default_path() -> Option<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(p) = var("VOLFUSE_AUTOTUNE_CACHE") {
        return Some(p);
    }
    var("XDG_CACHE_HOME")
        .or_else(|| var("HOME").map(|h| h.join(".cache")))
        .map(|d| d.join("volfuse").join("autotune.json"))
}

/// The adapter part of a key: name and driver (a driver update retunes).
pub fn adapter_key(ctx: &GpuContext) -> String {
    format!(
        "{} [{:?}] {} {}",
        ctx.info.name, ctx.info.backend, ctx.info.driver, ctx.info.driver_info
    )
}

/// Every dimension rounded up to a power of two, joined with `x`.
pub fn shape_class(dims: &[usize]) -> String {
    dims.iter()
        .map(|d| d.max(&1).next_power_of_two().to_string())
        .collect::<Vec<_>>()
        .join("x")
}

/// The choices made so far, as stored in the cache file.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct TuneCache {
    /// Where it is saved (None: memory only).
    pub path: Option<PathBuf>,
    pub map: BTreeMap<String, String>,
}

impl TuneCache {
    /// Reads `path`. A missing file gives an empty cache; a file that cannot be read or
    /// parsed gives an empty cache and the warning to print.
    pub fn load(path: &Path) -> (TuneCache, Option<String>) {
        let empty = TuneCache {
            path: Some(path.to_path_buf()),
            map: BTreeMap::new(),
        };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (empty, None),
            Err(e) => {
                return (
                    empty,
                    Some(format!(
                        "warning: ignoring the autotune cache {}: {e}",
                        path.display()
                    )),
                )
            }
        };
        match serde_json::from_str::<BTreeMap<String, String>>(&text) {
            Ok(map) => (
                TuneCache {
                    path: Some(path.to_path_buf()),
                    map,
                },
                None,
            ),
            Err(e) => (
                empty,
                Some(format!(
                    "warning: ignoring the corrupt autotune cache {} ({e}); it will be rewritten",
                    path.display()
                )),
            ),
        }
    }

    /// The default cache ([`default_path`]), warnings printed to stderr.
    pub fn open_default() -> TuneCache {
        match default_path() {
            Some(p) => {
                let (c, warn) = TuneCache::load(&p);
                if let Some(w) = warn {
                    eprintln!("{w}");
                }
                c
            }
            None => TuneCache::default(),
        }
    }

    /// Writes the map (through a temporary file in the same folder).
    pub fn save(&self) -> Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        let text = serde_json::to_string_pretty(&self.map)
            .map_err(|e| Error::Invalid(format!("autotune cache: {e}")))?;
        let tmp = path.with_extension(format!("json.tmp{}", std::process::id()));
        std::fs::write(&tmp, text).map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.map.get(key).map(|s| s.as_str())
    }
}

/// One variant of an op: a name (stored in the cache) and the op configured for it.
pub struct Variant {
    pub name: &'static str,
    pub op: Box<dyn Op>,
}

/// What [`choose`] decided.
#[derive(Debug, Clone)]
pub struct Choice {
    /// Index into the variants.
    pub index: usize,
    pub name: &'static str,
    /// Whether it came from the cache (no timing this time).
    pub cached: bool,
    /// Median seconds per variant when timed now (same order as the variants).
    pub seconds: Vec<Option<f64>>,
}

/// The cache key of `family` on `shapes` for this adapter.
pub fn key(ctx: &GpuContext, family: &str, shapes: &[Vec<usize>]) -> String {
    let class: Vec<String> = shapes.iter().map(|s| shape_class(s)).collect();
    format!("{}|{family}|{}", adapter_key(ctx), class.join(","))
}

/// Picks the variant of `family` for `shapes`: the default (index 0) when autotuning is off,
/// the cached choice when there is one naming a current variant, else the fastest by the
/// median of `iters` timed runs (a variant whose first run takes over twice the best so
/// far is timed once only). The choice is stored in `cache`, not saved.
pub fn choose(
    ctx: &GpuContext,
    cache: &mut TuneCache,
    family: &str,
    shapes: &[Vec<usize>],
    variants: Vec<Variant>,
    iters: usize,
) -> Result<Choice> {
    if variants.is_empty() {
        return Err(Error::Invalid(format!("autotune {family}: no variants")));
    }
    let none = vec![None; variants.len()];
    if !enabled() {
        return Ok(Choice {
            index: 0,
            name: variants[0].name,
            cached: false,
            seconds: none,
        });
    }
    let k = key(ctx, family, shapes);
    if let Some(name) = cache.get(&k) {
        if let Some(i) = variants.iter().position(|v| v.name == name) {
            return Ok(Choice {
                index: i,
                name: variants[i].name,
                cached: true,
                seconds: none,
            });
        }
        // A name this volfuse does not offer: the default now, retuned on a later first use.
        log::warn!("autotune: unknown variant '{name}' for {family}; using the default");
        cache.map.remove(&k);
        return Ok(Choice {
            index: 0,
            name: variants[0].name,
            cached: false,
            seconds: none,
        });
    }
    let names: Vec<&'static str> = variants.iter().map(|v| v.name).collect();
    let mut seconds = Vec::with_capacity(variants.len());
    for v in variants {
        let case = Case {
            label: format!("{family} {}", v.name),
            op: v.op,
            shapes: shapes.to_vec(),
        };
        // A variant that cannot run here (e.g. it needs a feature) is skipped, not fatal.
        // One run first; a variant over twice the best so far is not timed further.
        let best = seconds
            .iter()
            .flatten()
            .fold(f64::INFINITY, |m: f64, s: &f64| m.min(*s));
        let once = time_gpu(ctx, &case, 1).ok().map(|t| t.seconds);
        seconds.push(match once {
            Some(t) if iters > 1 && t <= 2.0 * best => {
                time_gpu(ctx, &case, iters).ok().map(|t| t.seconds)
            }
            other => other,
        });
    }
    let index = seconds
        .iter()
        .enumerate()
        .filter_map(|(i, s)| s.map(|s| (i, s)))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(i, _)| i)
        .ok_or_else(|| {
            Error::Gpu(format!(
                "autotune {family}: no variant ran on {}",
                ctx.info.name
            ))
        })?;
    cache.map.insert(k, names[index].to_string());
    Ok(Choice {
        index,
        name: names[index],
        cached: false,
        seconds,
    })
}

// ---------------------------------------------------------------------------------------------
// Tunable ops
// ---------------------------------------------------------------------------------------------

use crate::ops::matmul::{Matmul, MatmulKernel};

/// The variants of a `Matmul` (its transposes and bias kept), default first.
pub fn matmul_variants(base: &Matmul) -> Vec<Variant> {
    [
        ("matmul:auto", MatmulKernel::Auto),
        ("matmul:sampled", MatmulKernel::TexSampled),
        ("matmul:windows", MatmulKernel::TexWindows),
        ("matmul:pairs", MatmulKernel::TexPairs),
        ("matmul:tex16", MatmulKernel::TexOneRow),
        ("matmul:generic", MatmulKernel::Generic),
    ]
    .into_iter()
    .map(|(name, kernel)| Variant {
        name,
        op: Box::new(Matmul { kernel, ..*base }),
    })
    .collect()
}

/// The op family of a matmul in cache keys (transposes, bias and weight precision; the
/// epilogue activation does not change which kernel is fastest).
pub fn matmul_family(base: &Matmul) -> String {
    format!(
        "matmul ta{} tb{} bias{}{}",
        base.trans_a as u8,
        base.trans_b as u8,
        base.bias as u8,
        if base.w_f16 { " w16" } else { "" }
    )
}

/// The kernel to use for `base` on `shapes`, from the cache or timed now (see [`choose`]).
pub fn tune_matmul(
    ctx: &GpuContext,
    cache: &mut TuneCache,
    base: &Matmul,
    shapes: &[Vec<usize>],
    iters: usize,
) -> Result<(MatmulKernel, Choice)> {
    let family = matmul_family(base);
    let choice = choose(ctx, cache, &family, shapes, matmul_variants(base), iters)?;
    let kernel = match choice.name {
        "matmul:generic" => MatmulKernel::Generic,
        "matmul:tex16" => MatmulKernel::TexOneRow,
        "matmul:sampled" => MatmulKernel::TexSampled,
        "matmul:windows" => MatmulKernel::TexWindows,
        "matmul:pairs" => MatmulKernel::TexPairs,
        _ => MatmulKernel::Auto,
    };
    Ok((kernel, choice))
}

/// The process-wide cache ([`TuneCache::open_default`], opened on first use), locked for
/// `f`.
pub fn with_global<R>(f: impl FnOnce(&mut TuneCache) -> R) -> R {
    static GLOBAL: std::sync::OnceLock<std::sync::Mutex<TuneCache>> = std::sync::OnceLock::new();
    let m = GLOBAL.get_or_init(|| std::sync::Mutex::new(TuneCache::open_default()));
    let mut guard = m.lock().unwrap_or_else(|e| e.into_inner());
    f(&mut guard)
}

/// Timed runs per variant when a graph executor tunes a shape on first use.
pub const EXECUTOR_ITERS: usize = 3;

/// The matmul a graph executor runs for `base` on `shapes`: `base` itself unless its kernel
/// is `Auto` and autotuning is on; then the kernel from `cache` (timed now and stored when
/// the cache has none; the caller saves).
pub fn matmul_for_graph(
    ctx: &GpuContext,
    cache: &mut TuneCache,
    base: &Matmul,
    shapes: &[Vec<usize>],
) -> Result<Matmul> {
    if base.kernel != MatmulKernel::Auto || !enabled() {
        return Ok(*base);
    }
    // A fused epilogue does not change which kernel is fastest: tune the plain product.
    let full = *base;
    let nb = (2 + base.bias as usize).min(shapes.len());
    let (base, shapes) = (&base.plain(), &shapes[..nb]);
    let k = key(ctx, &matmul_family(base), shapes);
    if cache.get(&k).is_none() && enabled() {
        // First use: time on at most TIMING_ROWS rows of A (the cost of a slow variant on
        // a CPU adapter is seconds per full ViT batch; rows scale every variant alike),
        // stored under the real shape's key.
        let mut small = TuneCache::default();
        let (_, ch) = tune_matmul(
            ctx,
            &mut small,
            base,
            &timing_shapes(base, shapes),
            EXECUTOR_ITERS,
        )?;
        cache.map.insert(k, ch.name.to_string());
    }
    let (kernel, _) = tune_matmul(ctx, cache, base, shapes, EXECUTOR_ITERS)?;
    Ok(Matmul { kernel, ..full })
}

/// Rows of A a graph executor times matmul variants on.
/// (1024: the default texture kernel computes four rows per invocation, so it gets as many
/// workgroups — CPU adapters' threads — as the one-row kernel had at 256.)
pub const TIMING_ROWS: usize = 1024;

/// `shapes` with A's rows (batch folded in) capped at [`TIMING_ROWS`] when B is shared and
/// A is not transposed; other matmuls are timed at their own shapes.
fn timing_shapes(base: &Matmul, shapes: &[Vec<usize>]) -> Vec<Vec<usize>> {
    let mut s = shapes.to_vec();
    let (Some(a), Some(b)) = (shapes.first(), shapes.get(1)) else {
        return s;
    };
    if base.trans_a || b.len() != 2 || a.len() < 2 {
        return s;
    }
    let k = a[a.len() - 1];
    let rows: usize = a[..a.len() - 1].iter().product();
    s[0] = vec![rows.min(TIMING_ROWS), k];
    s
}

/// [`matmul_for_graph`] on the process-wide cache, saved when something was timed (a
/// failed save is a warning: the choice still holds for this process).
pub fn matmul_for_graph_global(
    ctx: &GpuContext,
    base: &Matmul,
    shapes: &[Vec<usize>],
) -> Result<Matmul> {
    with_global(|cache| {
        let before = cache.map.len();
        let m = matmul_for_graph(ctx, cache, base, shapes)?;
        if cache.map.len() != before {
            if let Err(e) = cache.save() {
                eprintln!("warning: could not save the autotune cache: {e}");
            }
        }
        Ok(m)
    })
}

/// One row of `volfuse bench --autotune`.
#[derive(Debug, Clone)]
pub struct TuneRow {
    pub label: String,
    pub variants: Vec<(&'static str, Option<f64>)>,
    pub chosen: &'static str,
    /// default seconds / chosen seconds.
    pub gain: f64,
}

/// Tunes the matmul shapes of `ops::matmul::bench_cases` (ignoring the cache, so every
/// variant is timed) and stores the choices in `cache`.
pub fn bench(ctx: &GpuContext, cache: &mut TuneCache, iters: usize) -> Result<Vec<TuneRow>> {
    let mut rows = Vec::new();
    for case in crate::ops::matmul::bench_cases() {
        let Some(base) = matmul_from_case(&case) else {
            continue;
        };
        let mut scratch = TuneCache::default();
        let (_, choice) = tune_matmul(ctx, &mut scratch, &base, &case.shapes, iters)?;
        cache.map.extend(scratch.map);
        let names: Vec<&'static str> = matmul_variants(&base).iter().map(|v| v.name).collect();
        let def = choice.seconds.first().copied().flatten();
        let best = choice.seconds.get(choice.index).copied().flatten();
        rows.push(TuneRow {
            label: case.label.clone(),
            variants: names
                .iter()
                .copied()
                .zip(choice.seconds.iter().copied())
                .collect(),
            chosen: choice.name,
            gain: match (def, best) {
                (Some(d), Some(b)) if b > 0.0 => d / b,
                _ => f64::NAN,
            },
        });
    }
    Ok(rows)
}

/// f32 against f16 weights for the x·Wᵀ cases of `ops::matmul::bench_cases` (default
/// kernels both): a row per case, "chosen" the faster, gain = f32 seconds / f16 seconds.
/// Nothing is cached: the precision is the user's choice, not a variant of equal numbers.
pub fn bench_precision(ctx: &GpuContext, iters: usize) -> Result<Vec<TuneRow>> {
    let mut rows = Vec::new();
    for case in crate::ops::matmul::bench_cases() {
        let Some(base) = matmul_from_case(&case) else {
            continue;
        };
        if !base.trans_b {
            continue;
        }
        let mut secs = Vec::new();
        for w_f16 in [false, true] {
            let c = Case {
                label: case.label.clone(),
                op: Box::new(Matmul { w_f16, ..base }),
                shapes: case.shapes.clone(),
            };
            secs.push(time_gpu(ctx, &c, iters).ok().map(|t| t.seconds));
        }
        let (f, h) = (secs[0], secs[1]);
        rows.push(TuneRow {
            label: format!("{} weights", case.label),
            variants: vec![("f32", f), ("f16", h)],
            chosen: match (f, h) {
                (Some(f), Some(h)) if h < f => "f16",
                _ => "f32",
            },
            gain: match (f, h) {
                (Some(f), Some(h)) if h > 0.0 => f / h,
                _ => f64::NAN,
            },
        });
    }
    Ok(rows)
}

/// The `Matmul` of a bench case, recovered from its debug form (bench cases box their op).
fn matmul_from_case(case: &Case) -> Option<Matmul> {
    let s = format!("{:?}", case.op);
    // (cases with a fused epilogue are tuned as their plain product elsewhere)
    if !s.starts_with("Matmul") || !s.contains("epi: None") {
        return None;
    }
    let flag = |f: &str| s.contains(&format!("{f}: true"));
    Some(Matmul {
        trans_a: flag("trans_a"),
        trans_b: flag("trans_b"),
        bias: flag("bias"),
        kernel: MatmulKernel::Auto,
        // bench cases have no epilogue activation
        act: Default::default(),
        w_f16: false,
        epi: Default::default(),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{ctx, random, rel_err, rng};
    use crate::ops::{run_cpu, run_gpu};
    use rand::Rng;

    fn tmp(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("volfuse-autotune-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d.join("volfuse").join("autotune.json")
    }

    #[test]
    fn cache_round_trip() {
        let p = tmp("rt");
        let (mut c, warn) = TuneCache::load(&p);
        assert!(warn.is_none() && c.map.is_empty());
        c.map
            .insert("a|matmul|64x64".into(), "matmul:generic".into());
        c.map.insert("b|conv|8".into(), "x".into());
        c.save().unwrap();
        let (back, warn) = TuneCache::load(&p);
        assert!(warn.is_none());
        assert_eq!(back, c);
        let _ = std::fs::remove_dir_all(p.parent().unwrap().parent().unwrap());
    }

    #[test]
    fn corrupt_cache_is_ignored_with_a_warning() {
        let p = tmp("corrupt");
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        for bad in ["{not json", "[1, 2]", "{\"k\": 3}"] {
            std::fs::write(&p, bad).unwrap();
            let (c, warn) = TuneCache::load(&p);
            assert!(c.map.is_empty(), "{bad}");
            assert!(warn.is_some_and(|w| w.contains("corrupt")), "{bad}");
        }
        let _ = std::fs::remove_dir_all(p.parent().unwrap().parent().unwrap());
    }

    /// Whether the device offers matmul's texture path (subgroups of ≥ 8 lanes and 64 KiB
    /// uniform windows — not under forced downlevel limits).
    fn texture_path_possible(c: &GpuContext) -> bool {
        c.caps.subgroups && c.caps.min_subgroup_size >= 8 && c.caps.max_uniform_binding >= 65536
    }

    /// x [rows, k] → linear(W [n, k], b) + GELU, W large enough for the texture path.
    fn linear_graph(
        r: &mut rand::rngs::SmallRng,
    ) -> (crate::graph::Graph, Vec<f32>, Vec<Vec<usize>>, Matmul) {
        use crate::graph::Graph;
        use crate::ops::matmul::Activation;
        use std::sync::Arc;
        let (rows, n, k) = (
            r.random_range(20..90usize),
            r.random_range(65..100usize),
            8 * r.random_range(32..48usize),
        );
        let mut g = Graph::new();
        let x = g.input("x", &[rows, k]);
        let w = g
            .constant("w", Arc::new(random(r, n * k)), &[n, k])
            .unwrap();
        let b = g.constant("b", Arc::new(random(r, n)), &[n]).unwrap();
        let m = Matmul::linear(true).with_act(Activation::Gelu);
        let y = g.op(m, &[x, w, b]).unwrap();
        g.output(y);
        let shapes = vec![vec![rows, k], vec![n, k], vec![n]];
        (g, random(r, rows * k), shapes, m)
    }

    fn cpu_out(g: &crate::graph::Graph, x: &[f32]) -> Vec<f32> {
        let plan = g.plan(true);
        crate::graph::CpuExecutor::run(g, &plan, &[x])
            .unwrap()
            .remove(0)
    }

    #[test]
    fn executor_honours_the_cached_choice_and_ignores_stale_names() {
        use crate::gpu::Precision;
        use crate::graph::{ConstCache, GpuExecutor};
        let c = ctx();
        let mut r = rng();
        let (g, x, shapes, m) = linear_graph(&mut r);
        let want = cpu_out(&g, &x);
        let plan = g.plan(true);
        let mut consts = ConstCache::new();
        let build = |cache: Option<&mut TuneCache>, consts: &mut ConstCache| {
            GpuExecutor::with_tuning(c, &g, &plan, consts, cache, Precision::F32).unwrap()
        };
        let default = build(None, &mut consts).kernel_names();
        let k = key(c, &matmul_family(&m), &shapes);
        // A cache naming the non-default generic kernel: that kernel runs (nothing timed).
        let mut cache = TuneCache::default();
        cache.map.insert(k.clone(), "matmul:generic".into());
        let exe = build(Some(&mut cache), &mut consts);
        if enabled() {
            assert_eq!(exe.kernel_names(), vec!["matmul"]);
        } else {
            assert_eq!(exe.kernel_names(), default);
        }
        assert_eq!(cache.map.len(), 1, "nothing retuned");
        let got = exe.run(c, &g, &[&x]).unwrap().remove(0);
        assert!(rel_err(&got, &want) <= 1e-5, "{}", rel_err(&got, &want));
        // A stale name: the default kernel, the entry dropped, nothing timed.
        cache.map.insert(k.clone(), "matmul:from-the-future".into());
        let exe = build(Some(&mut cache), &mut consts);
        assert_eq!(exe.kernel_names(), default);
        assert!(cache.map.is_empty());
        let got = exe.run(c, &g, &[&x]).unwrap().remove(0);
        assert!(rel_err(&got, &want) <= 1e-5, "{}", rel_err(&got, &want));
        // The default where the device has the texture path; the cached one-row choice.
        if texture_path_possible(c) {
            // (W from a texture in one dispatch where X is a storage texture)
            // (three column blocks per invocation with vec4 stores where N % 4 == 0)
            let n = shapes[1][0];
            let four_rows = match (c.storage_x(), n % 4 == 0) {
                (true, true) => "matmul_tex48r4w",
                (true, false) => "matmul_tex32r4w",
                (false, true) => "matmul_tex16r4q",
                (false, false) => "matmul_tex16r4",
            };
            assert_eq!(default.first().copied(), Some(four_rows), "{default:?}");
            cache.map.insert(k.clone(), "matmul:tex16".into());
            let exe = build(Some(&mut cache), &mut consts);
            if enabled() {
                assert!(exe.kernel_names().iter().all(|n| *n == "matmul_tex16"));
            }
            let got = exe.run(c, &g, &[&x]).unwrap().remove(0);
            assert!(rel_err(&got, &want) <= 1e-5, "{}", rel_err(&got, &want));
        }
    }

    #[test]
    fn executor_stores_weights_as_f16_on_request() {
        use crate::gpu::Precision;
        use crate::graph::{ConstCache, GpuExecutor};
        let c = ctx();
        let mut r = rng();
        let (g, x, shapes, m) = linear_graph(&mut r);
        let want = cpu_out(&g, &x);
        let plan = g.plan(true);
        for generic in [false, true] {
            let mut consts = ConstCache::new();
            let mut cache = TuneCache::default();
            if generic {
                let m16 = Matmul { w_f16: true, ..m };
                cache.map.insert(
                    key(c, &matmul_family(&m16), &shapes),
                    "matmul:generic".into(),
                );
            }
            let exe = GpuExecutor::with_tuning(
                c,
                &g,
                &plan,
                &mut consts,
                Some(&mut cache),
                Precision::F16,
            )
            .unwrap();
            let names = exe.kernel_names();
            if generic && enabled() {
                assert_eq!(names, vec!["matmul"]);
            } else if texture_path_possible(c) && !generic {
                // Whichever texture variant tuning picked (one or four rows per
                // invocation: timing decides; vec4 stores where N % 4 == 0), with f16
                // weights.
                let first = names.first().copied().unwrap_or("");
                assert!(
                    ["matmul_tex16h", "matmul_tex16r4h", "matmul_tex16r4qh"].contains(&first),
                    "{names:?}"
                );
            }
            let got = exe.run(c, &g, &[&x]).unwrap().remove(0);
            let e = rel_err(&got, &want);
            assert!(e <= 1e-2 && e > 0.0, "{names:?}: {e} (f16 weights round)");
            // The weight is held as f16 only (no f32 copy beside it).
            let mut c32 = ConstCache::new();
            GpuExecutor::with_tuning(c, &g, &plan, &mut c32, None, Precision::F32).unwrap();
            assert!(
                consts.bytes() < c32.bytes(),
                "{} vs {}",
                consts.bytes(),
                c32.bytes()
            );
        }
        // A weight outside f16's range stays f32 (exact).
        let mut g2 = crate::graph::Graph::new();
        let xv = g2.input("x", &[3, 8]);
        let mut wv = random(&mut r, 16);
        wv[5] = 1e6;
        let w = g2.constant("w", std::sync::Arc::new(wv), &[2, 8]).unwrap();
        let y = g2.op(Matmul::linear(false), &[xv, w]).unwrap();
        g2.output(y);
        let x2 = random(&mut r, 24);
        let plan2 = g2.plan(true);
        let exe =
            GpuExecutor::with_tuning(c, &g2, &plan2, &mut ConstCache::new(), None, Precision::F16)
                .unwrap();
        let got = exe.run(c, &g2, &[&x2]).unwrap().remove(0);
        assert!(rel_err(&got, &cpu_out(&g2, &x2)) <= 1e-5);
    }

    #[test]
    fn shape_classes_round_up() {
        assert_eq!(shape_class(&[1000, 384, 1]), "1024x512x1");
        assert_eq!(shape_class(&[0, 64]), "1x64");
    }

    #[test]
    fn tuned_matmul_is_a_valid_variant_and_matches_the_reference() {
        let c = ctx();
        let mut r = rng();
        let (m, n, k) = (
            r.random_range(17..200usize),
            r.random_range(5..70usize),
            4 * r.random_range(2..40usize),
        );
        let bias = r.random_bool(0.5);
        let base = Matmul::linear(bias);
        let mut shapes = vec![vec![m, k], vec![n, k]];
        if bias {
            shapes.push(vec![n]);
        }
        let mut cache = TuneCache::default();
        let (kernel, choice) = tune_matmul(c, &mut cache, &base, &shapes, 1).unwrap();
        let names: Vec<&str> = matmul_variants(&base).iter().map(|v| v.name).collect();
        assert!(names.contains(&choice.name));
        if enabled() {
            assert!(!choice.cached);
            assert_eq!(cache.map.len(), 1);
            // Second time: from the cache, same choice, nothing timed.
            let (k2, ch2) = tune_matmul(c, &mut cache, &base, &shapes, 1).unwrap();
            assert!(ch2.cached && k2 == kernel && ch2.seconds.iter().all(|s| s.is_none()));
        }
        // A stale name in the cache is not trusted: the default runs, nothing is timed,
        // and the entry is dropped (a later first use retunes).
        if let Some(v) = cache.map.values_mut().next() {
            *v = "matmul:removed".into();
            let (k3, ch3) = tune_matmul(c, &mut cache, &base, &shapes, 1).unwrap();
            assert!(!ch3.cached && ch3.index == 0 && k3 == MatmulKernel::Auto);
            assert!(ch3.seconds.iter().all(|s| s.is_none()));
            assert!(cache.map.is_empty());
        }
        let data: Vec<Vec<f32>> = shapes
            .iter()
            .map(|s| random(&mut r, s.iter().product()))
            .collect();
        let inputs = crate::ops::testing::pairs(&data, &shapes);
        let (want, _) = run_cpu(&base, &inputs).unwrap();
        let tuned = Matmul { kernel, ..base };
        let (got, _) = run_gpu(c, &tuned, &inputs, Some(f32::NAN)).unwrap();
        let (def, _) = run_gpu(c, &base, &inputs, Some(f32::NAN)).unwrap();
        assert!(
            rel_err(&got, &want) <= 1e-5,
            "tuned {kernel:?}: {}",
            rel_err(&got, &want)
        );
        assert!(
            rel_err(&got, &def) <= 1e-5,
            "tuned vs default: {}",
            rel_err(&got, &def)
        );
    }
}
