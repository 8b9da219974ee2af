//! Atomic file writes, the one implementation every lora-rs crate writes its files with (`lora::io` and
//! `lora-viz` wrap it in their own errors; `lora-viz` does not depend on `lora`, so this crate sits below
//! both and knows nothing else).
//!
//! ```text
//! write_atomic(path, bytes):  dir = path's directory (made when missing)
//!                             dir/.NAME.XXXXXX.tmp  ← bytes, fsync     (a fresh name per call: tempfile)
//!                             rename over path, fsync dir               (the rename itself made durable)
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
}
