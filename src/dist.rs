//! The process's place in a data-parallel run (`lora_dist`, docs/distributed.md): joined once when the
//! program starts ([`init`]), handed to the training jobs ([`group`]), summed up when it ends ([`summary`]).
//! Under `mpirun` every rank runs the same command line on its share of each batch; rank 0 alone prints
//! and writes. Without a launcher (or with one rank) this is one process, exactly as before.

use std::sync::OnceLock;

use lora_dist::{Group, World};

use crate::cli::Command;
use crate::lm_cli::LmCommand;

static GROUP: OnceLock<Group> = OnceLock::new();

/// Joins the launcher's run, if one started this process; keep the [`World`] until the program ends
/// (dropping it finalises MPI).
pub fn init() -> lora_dist::Result<World> {
    let world = World::init()?;
    let _ = GROUP.set(world.group().clone());
    Ok(world)
}

/// This process's group (one process alone before [`init`]).
pub fn group() -> Group {
    GROUP.get().cloned().unwrap_or_default()
}

/// Under a launcher with several ranks only the training commands run (data-parallel); any other would
/// run once per rank and print and write as many times.
pub fn check_command(command: &Command) -> anyhow::Result<()> {
    let g = group();
    let parallel = match command {
        Command::Pretrain(_) | Command::Finetune(_) => true,
        Command::Lm(a) => matches!(a.command, LmCommand::Pretrain(_) | LmCommand::Finetune(_)),
        _ => false,
    };
    if g.is_distributed() && !parallel {
        anyhow::bail!(
            "started as rank {} of {}: only `lora pretrain`, `lora finetune`, `lora lm pretrain` and `lora lm finetune` train \
             data-parallel; run this command as one process (without mpirun)",
            g.rank(),
            g.size()
        );
    }
    Ok(())
}

/// The line rank 0 prints on stderr after a data-parallel run: ranks, transport, and what the all-reduces
/// cost (one per step).
pub fn summary() -> Option<String> {
    let g = group();
    if !g.is_distributed() || !g.is_root() {
        return None;
    }
    let s = g.stats();
    let per = |x: f64| if s.calls == 0 { 0.0 } else { x / s.calls as f64 };
    Some(format!(
        "data-parallel: {} ranks over {}; {} all-reduces of {:.0} f32 values ({:.2} MB) each: {:.3} ms per step in the all-reduce, \
         {:.3} ms per step waiting for the slowest rank",
        g.size(),
        g.transport(),
        s.calls,
        per(s.values as f64),
        per(s.values as f64) * 4.0 / 1e6,
        per(s.seconds) * 1e3,
        per(s.wait_seconds) * 1e3
    ))
}
