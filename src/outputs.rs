//! Nothing half-written: a command claims the outputs it will create before it starts; if it then fails,
//! or stops because its stdout was closed (`lora demo | head`), every claimed path that did not exist
//! before is removed, so a run leaves its outputs complete or not at all. Each file is itself written
//! atomically (temporary name, fsync, rename), so a killed run never leaves a partial file either.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

static CLAIMED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Claims `paths` for this run: each that does not exist now is removed if the run does not finish.
/// A path that exists already (a resumed run's earlier output, a file to be replaced) is left alone.
pub fn claim<'a>(paths: impl IntoIterator<Item = &'a Path>) {
    let mut c = CLAIMED.lock().unwrap_or_else(|e| e.into_inner());
    for p in paths {
        if !p.exists() {
            c.push(p.to_path_buf());
        }
    }
}

/// Removes every claimed path that now exists (a file or a whole folder); returns what it removed.
pub fn discard() -> Vec<PathBuf> {
    let claimed = std::mem::take(&mut *CLAIMED.lock().unwrap_or_else(|e| e.into_inner()));
    let mut removed = Vec::new();
    for p in claimed.into_iter().rev() {
        let r = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
        if r.is_ok() {
            removed.push(p);
        }
    }
    removed
}

/// Whether `e` (or anything in its chain) is a write to a closed pipe: stdout went away (`| head`).
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe))
}

/// Makes a closed stdout or stderr end the program quietly, as ripgrep does: `println!` panics on a
/// broken pipe, so the panic hook catches exactly that panic, discards the run's partial outputs and exits
/// with status 0. Every other panic goes to the default hook.
pub fn quiet_on_broken_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.starts_with("failed printing to std") && msg.contains("Broken pipe") {
            discard();
            std::process::exit(0);
        }
        default(info);
    }));
}
