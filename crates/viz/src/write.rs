//! Atomic file writes: the bytes go to a temporary file in the destination's directory (made when missing;
//! `tempfile`), are flushed to disk, and the file is renamed over the destination, so a reader sees the old
//! file or the whole new one, never a part.

use std::io::Write;
use std::path::Path;

use crate::error::{Result, VizError};

/// Writes `bytes` to `path` atomically.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |error: std::io::Error| VizError::Io { path: path.display().to_string(), error };
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
    tmp.write_all(bytes).map_err(io)?;
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_replaces_the_whole_file_and_leaves_no_temporary_behind() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.txt");
        write_atomic(&p, b"first, longer contents").unwrap();
        write_atomic(&p, b"second").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"second");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1, "only a.txt");
        // Missing directories are made; a directory that cannot be made is named.
        write_atomic(&d.path().join("new/dir/b.txt"), b"x").unwrap();
        let e = write_atomic(&p.join("under-a-file.txt"), b"x").unwrap_err().to_string();
        assert!(e.contains("a.txt/under-a-file.txt"), "{e}");
    }
}
