//! One module per subcommand.

mod bench;
mod bench_adapters;
mod demo;
mod eval;
mod finetune;
pub mod gpu;
mod graph;
mod inspect;
mod lm;
mod loadtest;
mod merge;
mod params;
mod pretrain;
mod serve;

use anyhow::Result;

use crate::cli::{Cli, Command};

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Demo(a) => demo::run(a),
        Command::Pretrain(a) => pretrain::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Params(a) => params::run(a),
        Command::Finetune(a) => finetune::run(a),
        Command::Merge(a) => merge::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::BenchAdapters(a) => bench_adapters::run(a),
        Command::Graph(a) => graph::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Lm(a) => lm::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Loadtest(a) => loadtest::run(a),
        Command::Gpu(a) => gpu::run(a),
    }
}

/// Sets the number of threads candle, gemm and rayon use (before their first parallel call): `threads`,
/// else every core. Returns it.
pub fn set_threads(threads: Option<u32>) -> usize {
    let n = threads.map(|t| t as usize).unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    n
}

/// The median (the mean of the middle two for an even count); 0 for none.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Rounded to 3 decimals, for JSON reports.
pub fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// Peak resident memory of this process (VmHWM), in MiB.
pub fn peak_rss_mb() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024)
}
