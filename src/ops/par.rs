//! Threads for the CPU reference ops: rayon's global pool, sized by `VOLFUSE_THREADS`
//! (else `RAYON_NUM_THREADS`, else one thread per core). Work is split into a few large
//! chunks per thread, never one task per element; inside a pool task everything runs
//! sequentially (no nested parallel gemm).

use rayon::prelude::*;
use std::sync::Once;

static INIT: Once = Once::new();

/// Sizes the global pool from `VOLFUSE_THREADS` (once; later calls are no-ops).
fn init() {
    INIT.call_once(|| {
        if let Some(n) = std::env::var("VOLFUSE_THREADS")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .filter(|n| *n > 0)
        {
            // Fails only when the pool already exists; then its size stands.
            let _ = rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build_global();
        }
    });
}

/// Sets the number of CPU threads before the first CPU op runs (e.g. from a CLI flag).
/// Returns false when the pool was already started (its size then stands).
pub fn set_threads(n: usize) -> bool {
    let mut ok = false;
    INIT.call_once(|| {
        ok = rayon::ThreadPoolBuilder::new()
            .num_threads(n.max(1))
            .build_global()
            .is_ok();
    });
    ok
}

/// Threads the CPU ops use.
pub fn threads() -> usize {
    init();
    rayon::current_num_threads()
}

/// Whether this call may fan out: false inside a pool task (the caller is already split).
pub fn may_split() -> bool {
    rayon::current_thread_index().is_none() && threads() > 1
}

/// gemm parallelism for a product called from here.
pub fn gemm_parallelism() -> gemm::Parallelism {
    if may_split() {
        gemm::Parallelism::Rayon(threads())
    } else {
        gemm::Parallelism::None
    }
}

/// Splits `out` into chunks of whole `unit`-sized pieces (rows), at least `min_units`
/// per chunk and about four chunks per thread, and calls `f(first_unit, chunk)` for each,
/// in parallel. Small work runs inline.
pub fn for_units<T: Send>(
    out: &mut [T],
    unit: usize,
    min_units: usize,
    f: impl Fn(usize, &mut [T]) + Sync + Send,
) {
    let unit = unit.max(1);
    let units = out.len() / unit;
    if units == 0 {
        if !out.is_empty() {
            f(0, out);
        }
        return;
    }
    if !may_split() || units < 2 * min_units.max(1) {
        f(0, out);
        return;
    }
    let per = units.div_ceil(4 * threads()).max(min_units.max(1));
    out.par_chunks_mut(per * unit)
        .enumerate()
        .for_each(|(i, c)| f(i * per, c));
}

/// Calls `f(i)` for `i in 0..n` in parallel (each call should be a sizeable piece of work).
pub fn for_each_index(n: usize, f: impl Fn(usize) + Sync + Send) {
    if !may_split() || n < 2 {
        (0..n).for_each(f);
    } else {
        (0..n).into_par_iter().for_each(f);
    }
}

/// A raw output pointer shared by parallel tasks that write disjoint elements.
#[derive(Clone, Copy)]
pub(crate) struct SharedOut(*mut f32, usize);

// SAFETY: only used by tasks that write disjoint index sets (each use site says why).
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    pub fn new(out: &mut [f32]) -> Self {
        SharedOut(out.as_mut_ptr(), out.len())
    }
    /// A mutable view of `start..start + len`.
    ///
    /// # Safety
    /// No other live view may overlap this range.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice(&self, start: usize, len: usize) -> &mut [f32] {
        assert!(start + len <= self.1);
        std::slice::from_raw_parts_mut(self.0.add(start), len)
    }
}

/// As [`for_each_index`], with a scratch value made by `init` per worker (reused across
/// the indices that worker runs).
pub fn for_each_index_init<S>(
    n: usize,
    init: impl Fn() -> S + Sync + Send,
    f: impl Fn(&mut S, usize) + Sync + Send,
) {
    if !may_split() || n < 2 {
        let mut s = init();
        (0..n).for_each(|i| f(&mut s, i));
    } else {
        (0..n).into_par_iter().for_each_init(init, f);
    }
}
