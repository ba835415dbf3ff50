//! Shader benchmarks: `cargo bench` prints GFLOP/s or GB/s per kernel and the adapter.
//! Filter with `cargo bench -- NAME`; `VOLFUSE_BENCH_CPU=1` also times the CPU reference.

use volfuse::bench::{all_cases, time_cpu, time_gpu};
use volfuse::gpu::{GpuContext, GpuOptions};

fn main() -> anyhow::Result<()> {
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        std::env::set_var("XDG_RUNTIME_DIR", std::env::temp_dir());
    }
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let ctx = GpuContext::new(&GpuOptions::from_env()?)?;
    println!("adapter: {}", ctx.describe());
    let cpu = std::env::var_os("VOLFUSE_BENCH_CPU").is_some();
    for case in all_cases()
        .iter()
        .filter(|c| filter.is_empty() || filter.iter().any(|f| c.label.contains(f.as_str())))
    {
        println!("gpu {}", time_gpu(&ctx, case, 5)?);
        if cpu {
            println!("cpu {}", time_cpu(case, 3)?);
        }
    }
    Ok(())
}
