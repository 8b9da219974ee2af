//! `lora`: the command-line face of lora-rs. Parses flags, prints tables and progress, writes files;
//! the work itself lives in the `lora`, `mnist` and `lora-train` crates.

mod cli;
mod cmd;
mod common;
mod progress;
mod report;
mod viz;

use clap::Parser;

fn main() {
    let cli = cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("LORA_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = cmd::run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
