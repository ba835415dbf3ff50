//! norm (to be written)

/// Benchmark cases for `cargo bench` (keep this function).
pub fn bench_cases() -> Vec<crate::bench::Case> {
    vec![]
}
