//! Atomic file writes, the one implementation every lora-rs crate writes its files with (`lora::io` and
//! `lora-viz` wrap it in their own errors; `lora-viz` does not depend on `lora`, so this crate sits below
//! both and knows nothing else).
//!
//! ```text
//! write_atomic(path, bytes):  dir = path's directory (made when missing)
//!                             dir/.NAME.XXXXXX.tmp  ← bytes, fsync     (a fresh name per call: tempfile)
//!                             rename over path, fsync dir               (the rename itself made durable)
//! write_dir_atomic(dir, files): the files of one output that belong together (an adapter's config and
//!                             weights, a model's config and weights) written into a fresh sibling folder
//!                             .NAME.XXXXXX.tmp/, each fsynced, then renamed to dir in one step when dir
//!                             is missing or empty; into an existing non-empty dir, file by file (each
//!                             atomic, the last one named last: the one that makes the folder an output)
//! ```
//!
//! A reader (or a crash) sees the old file or the whole new one, never a part. Each call writes its own
//! temporary file, so writers of one path in one process (threads) or in several do not trample each
//! other's bytes: the last rename wins, whole. On error the temporary file is removed and the destination
//! is untouched.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

use std::io::{Error, ErrorKind, Write};
use std::path::Path;

/// Writes `bytes` to `path` atomically (see the crate docs). The error is the operating system's; callers
/// name the path in their own error type.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let name = path.file_name().ok_or_else(|| Error::new(ErrorKind::InvalidInput, "not a file name"))?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::Builder::new().prefix(&format!(".{}.", name.to_string_lossy())).suffix(".tmp").tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    // The rename is durable once the directory is synced (POSIX); best effort where a directory cannot be
    // opened as a file (Windows).
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Writes the files of one output folder so that `dir` holds all of them or none of this write's: see the
/// crate docs. `files` are (file name, bytes); the last one is the one that marks the folder as complete
/// (a config) and is written last when the folder already holds other files.
pub fn write_dir_atomic(dir: &Path, files: &[(&str, &[u8])]) -> std::io::Result<()> {
    let name = dir.file_name().ok_or_else(|| Error::new(ErrorKind::InvalidInput, "not a folder name"))?;
    let parent = dir.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let empty = match std::fs::read_dir(dir) {
        Ok(mut entries) => entries.next().is_none(),
        Err(e) if e.kind() == ErrorKind::NotFound => true,
        Err(e) => return Err(e),
    };
    if !empty {
        for (f, bytes) in files {
            write_atomic(&dir.join(f), bytes)?;
        }
        return Ok(());
    }
    std::fs::create_dir_all(parent)?;
    let staging = tempfile::Builder::new().prefix(&format!(".{}.", name.to_string_lossy())).suffix(".tmp").tempdir_in(parent)?;
    for (f, bytes) in files {
        let mut file = std::fs::File::create(staging.path().join(f))?;
        file.write_all(bytes)?;
        file.sync_all()?;
    }
    if let Ok(d) = std::fs::File::open(staging.path()) {
        let _ = d.sync_all();
    }
    // rename(2) replaces an empty directory, or creates the name: either way in one step.
    std::fs::rename(staging.path(), dir)?;
    let _ = staging.keep(); // renamed away: nothing left to remove
    if let Ok(d) = std::fs::File::open(parent) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }

    #[test]
    fn a_write_replaces_the_whole_file_and_leaves_no_temporary_behind() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.txt");
        write_atomic(&p, b"first, longer contents").unwrap();
        write_atomic(&p, b"second").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"second");
        assert_eq!(entries(d.path()), ["a.txt"]);
        // Missing directories are made.
        write_atomic(&d.path().join("new/dir/b.txt"), b"x").unwrap();
        assert_eq!(std::fs::read(d.path().join("new/dir/b.txt")).unwrap(), b"x");
    }

    #[test]
    fn a_failed_write_leaves_the_destination_and_no_temporary() {
        let d = tempfile::tempdir().unwrap();
        // The destination is a non-empty directory: the rename fails after the bytes were written.
        let target = d.path().join("taken");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("keep"), b"k").unwrap();
        assert!(write_atomic(&target, b"new").is_err());
        assert_eq!(entries(d.path()), ["taken"]);
        assert_eq!(std::fs::read(target.join("keep")).unwrap(), b"k");
        // A path under a file cannot be made; a path without a file name is refused.
        std::fs::write(d.path().join("f"), b"").unwrap();
        assert!(write_atomic(&d.path().join("f/under"), b"x").is_err());
        assert_eq!(write_atomic(Path::new("/"), b"x").unwrap_err().kind(), ErrorKind::InvalidInput);
    }

    #[test]
    fn concurrent_writers_of_one_path_each_succeed_and_the_file_is_one_of_theirs_whole() {
        // Threads of one process writing the same file (a server saving an adapter twice at once): a
        // temporary name shared by the process (NAME.tmp-PID) let one writer rename the other's half-written
        // file into place, or fail to find its own.
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("shared.bin");
        let contents: Vec<Vec<u8>> = (0..8u8).map(|i| vec![i; 1 << 16]).collect();
        std::thread::scope(|s| {
            for c in &contents {
                let p = &p;
                s.spawn(move || {
                    for _ in 0..20 {
                        write_atomic(p, c).unwrap();
                    }
                });
            }
        });
        let got = std::fs::read(&p).unwrap();
        assert!(contents.contains(&got), "the file is no writer's whole contents");
        assert_eq!(entries(d.path()), ["shared.bin"]);
    }

    #[test]
    fn a_folder_gets_all_its_files_in_one_step_or_none() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("adapter");
        write_dir_atomic(&out, &[("weights.bin", b"w"), ("config.json", b"{}")]).unwrap();
        assert_eq!(entries(&out), ["config.json", "weights.bin"]);
        assert_eq!(entries(d.path()), ["adapter"], "no staging folder left behind");
        // An existing empty folder is replaced in one step too.
        let empty = d.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        write_dir_atomic(&empty, &[("a", b"1")]).unwrap();
        assert_eq!(entries(&empty), ["a"]);
        // A folder holding other files keeps them; each file is replaced whole.
        write_dir_atomic(&out, &[("weights.bin", b"w2"), ("config.json", b"{\"r\": 2}")]).unwrap();
        assert_eq!(std::fs::read(out.join("weights.bin")).unwrap(), b"w2");
        assert_eq!(entries(&out), ["config.json", "weights.bin"]);
        // A write that fails (a file name that is a folder path) leaves nothing behind.
        let bad = d.path().join("bad");
        assert!(write_dir_atomic(&bad, &[("a", b"1"), ("no/such/sub", b"2")]).is_err());
        assert!(!bad.exists());
        assert_eq!(entries(d.path()), ["adapter", "empty"], "the staging folder was removed");
    }
}
