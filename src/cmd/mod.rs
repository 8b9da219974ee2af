//! One module per subcommand.

mod bench;
mod demo;
mod eval;
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
        Command::Bench(a) => bench::run(a),
    }
}
