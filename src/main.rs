//! `lora`: the command-line face of lora-rs. Parses flags, prints tables and progress, writes files;
//! the work itself lives in the `lora`, `mnist` and `lora-train` crates.

mod cli;
mod cmd;
mod common;
mod dist;
mod json_report;
mod lm_cli;
mod outputs;
mod progress;
mod report_dir;

use clap::Parser;

/// mimalloc keeps freed blocks for reuse: a training step allocates and frees the same few buffers each
/// time, which the system allocator hands back to the kernel and faults in again.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A write past the file-size limit (`ulimit -f`, a full quota) would kill the process with SIGXFSZ and
/// leave its temporary file behind; ignored, the write fails with EFBIG instead, and the atomic writers
/// remove their temporary files and report the path.
fn ignore_file_size_signal() {
    #[cfg(unix)]
    // SAFETY: setting a signal's disposition to SIG_IGN installs no handler code, touches no Rust state and
    // is done once, before this program starts any thread.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}

fn main() {
    outputs::quiet_on_broken_pipe();
    ignore_file_size_signal();
    let cli = cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("LORA_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // Under mpirun: this process's rank (one process alone otherwise). Kept to the end: dropping it
    // finalises MPI.
    let world = match dist::init() {
        Ok(w) => w,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    let group = world.group().clone();
    if let Err(e) = dist::check_command(&cli.command).and_then(|()| cmd::run(cli)) {
        let removed = outputs::discard();
        if outputs::is_broken_pipe(&e) && !group.is_distributed() {
            std::process::exit(0); // stdout closed (`| head`): end quietly, as ripgrep does
        }
        if group.is_distributed() {
            eprintln!("error: rank {} of {}: {e:#}", group.rank(), group.size());
        } else {
            eprintln!("error: {e:#}");
        }
        for p in removed {
            eprintln!("note: removed the unfinished output {}", p.display());
        }
        // The library says what is wrong; the binary says which of its flags changes it.
        let base_mismatch = e.chain().any(|c| {
            matches!(c.downcast_ref::<lora::LoraError>(), Some(lora::LoraError::BaseMismatch { .. }))
                || matches!(c.downcast_ref::<lora_lm::LmError>(), Some(lora_lm::LmError::Lora(lora::LoraError::BaseMismatch { .. })))
        });
        if base_mismatch {
            eprintln!("hint: pass --force to load it anyway");
        }
        // Every rank of the run ends with this one: MPI_Abort (the others would wait for it forever).
        group.abort(1);
    }
    if let Some(line) = dist::summary() {
        eprintln!("{line}");
    }
    drop(world);
}
