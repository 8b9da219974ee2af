//! One module per subcommand.

mod bench;
mod bench_adapters;
mod demo;
mod eval;
mod finetune;
mod graph;
mod inspect;
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
    }
}
