//! One module per subcommand.

mod bench;
mod bench_adapters;
mod demo;
mod eval;
mod finetune;
mod graph;
mod inspect;
mod lm;
mod merge;
mod params;
mod pretrain;

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
    }
}

/// Peak resident memory of this process (VmHWM), in MiB.
pub fn peak_rss_mb() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024)
}
