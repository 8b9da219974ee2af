//! Atomic file writes through `lora-atomic` (the workspace's one atomic writer; `lora-viz` does not depend
//! on `lora`, so both use that tiny crate): a temporary file in the destination's directory (made when
//! missing), flushed to disk and renamed over the destination, so a reader sees the old file or the whole
//! new one, never a part.

use std::path::Path;

use crate::error::{Result, VizError};

/// Writes `bytes` to `path` atomically, naming the file in the error.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    lora_atomic::write_atomic(path, bytes).map_err(|error| VizError::Io { path: path.display().to_string(), error })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_replaces_the_whole_file_and_a_failure_names_the_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.txt");
        write_atomic(&p, b"first, longer contents").unwrap();
        write_atomic(&p, b"second").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"second");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1, "only a.txt");
        // A directory that cannot be made is named.
        let e = write_atomic(&p.join("under-a-file.txt"), b"x").unwrap_err().to_string();
        assert!(e.contains("a.txt/under-a-file.txt"), "{e}");
    }
}
