//! The IDX reader: `magic (u32 BE) · dims (u32 BE each) · data (u8, prod(dims) bytes)`.
//!
//! Every check names the file: magic number, number of dimensions, non-zero sizes, data length equal to
//! the product of the dimensions (truncated and over-long files both fail), and gzip integrity.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;

/// Magic number of an IDX image file: unsigned bytes, 3 dimensions (count, rows, cols).
pub const IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic number of an IDX label file: unsigned bytes, 1 dimension (count).
pub const LABELS_MAGIC: u32 = 0x0000_0801;

/// Which IDX layout a file is expected to hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdxKind {
    /// Images: magic 2051, dims (count, rows, cols).
    Images,
    /// Labels: magic 2049, dims (count).
    Labels,
}

impl IdxKind {
    fn magic(self) -> u32 {
        match self {
            IdxKind::Images => IMAGES_MAGIC,
            IdxKind::Labels => LABELS_MAGIC,
        }
    }
    fn name(self) -> &'static str {
        match self {
            IdxKind::Images => "images",
            IdxKind::Labels => "labels",
        }
    }
}

/// What went wrong reading an IDX file; every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum IdxError {
    /// The file could not be opened or read (including a corrupt gzip stream).
    #[error("{path}: cannot read: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error (shown in the message, so not chained again as a source).
        error: std::io::Error,
    },
    /// The file is shorter than its header.
    #[error("{path}: truncated header: {len} bytes, need at least {need}")]
    TruncatedHeader {
        /// The file.
        path: PathBuf,
        /// Bytes present.
        len: usize,
        /// Bytes the header needs.
        need: usize,
    },
    /// The magic number is not the expected one.
    #[error("{path}: wrong magic number {found} (0x{found:08x}), expected {expected} for an IDX {kind} file")]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// The magic found.
        found: u32,
        /// The magic expected.
        expected: u32,
        /// "images" or "labels".
        kind: &'static str,
    },
    /// A dimension is zero or the dimensions are not what the caller requires.
    #[error("{path}: bad dimensions {dims:?}: {why}")]
    BadDims {
        /// The file.
        path: PathBuf,
        /// The dimensions in the header.
        dims: Vec<u32>,
        /// What is wrong with them.
        why: String,
    },
    /// The data section length does not equal the product of the dimensions.
    #[error("{path}: data has {found} bytes but the header's dimensions {dims:?} need {expected} ({})",
        if found < expected { "file truncated" } else { "trailing bytes" })]
    BadLength {
        /// The file.
        path: PathBuf,
        /// The dimensions in the header.
        dims: Vec<u32>,
        /// Bytes needed.
        expected: usize,
        /// Bytes present.
        found: usize,
    },
    /// A label is outside 0..=9.
    #[error("{path}: label {value} at index {index} is not a digit 0-9")]
    BadLabel {
        /// The file.
        path: PathBuf,
        /// Position of the label.
        index: usize,
        /// Its value.
        value: u8,
    },
    /// Image and label files disagree on the number of items.
    #[error("{images} holds {n_images} images but {labels} holds {n_labels} labels")]
    CountMismatch {
        /// The image file.
        images: PathBuf,
        /// Items in it.
        n_images: usize,
        /// The label file.
        labels: PathBuf,
        /// Items in it.
        n_labels: usize,
    },
    /// Neither `NAME` nor `NAME.gz` exists in the data directory.
    #[error("{dir}: missing {name} (looked for {name} and {name}.gz)")]
    Missing {
        /// The data directory.
        dir: PathBuf,
        /// The base file name.
        name: String,
    },
}

/// A decoded IDX file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxData {
    /// The dimensions from the header, outermost first.
    pub dims: Vec<usize>,
    /// The `prod(dims)` data bytes, row-major.
    pub data: Vec<u8>,
}

/// Largest file we accept after decompression (MNIST train images are 47 MB): guards against gzip bombs.
const MAX_BYTES: u64 = 1 << 30;

/// Decompresses `raw` when it starts with the gzip signature `1f 8b`; otherwise returns it as is.
fn gunzip_if_needed(path: &Path, raw: Vec<u8>) -> Result<Vec<u8>, IdxError> {
    let io = |error| IdxError::Io { path: path.to_path_buf(), error };
    if !raw.starts_with(&[0x1f, 0x8b]) {
        return Ok(raw);
    }
    let mut out = Vec::new();
    GzDecoder::new(&raw[..]).take(MAX_BYTES + 1).read_to_end(&mut out).map_err(io)?;
    if out.len() as u64 > MAX_BYTES {
        return Err(io(std::io::Error::other("decompresses to more than 1 GiB")));
    }
    Ok(out)
}

/// Parses IDX bytes already in memory; `path` only names the source in errors.
pub fn parse_idx(path: &Path, raw: &[u8], kind: IdxKind) -> Result<IdxData, IdxError> {
    let p = || path.to_path_buf();
    if raw.len() < 4 {
        return Err(IdxError::TruncatedHeader { path: p(), len: raw.len(), need: 4 });
    }
    let be = |i: usize| u32::from_be_bytes([raw[i], raw[i + 1], raw[i + 2], raw[i + 3]]);
    let magic = be(0);
    if magic != kind.magic() {
        return Err(IdxError::BadMagic { path: p(), found: magic, expected: kind.magic(), kind: kind.name() });
    }
    let ndim = (magic & 0xff) as usize;
    let need = 4 + 4 * ndim;
    if raw.len() < need {
        return Err(IdxError::TruncatedHeader { path: p(), len: raw.len(), need });
    }
    let dims32: Vec<u32> = (0..ndim).map(|d| be(4 + 4 * d)).collect();
    if dims32.contains(&0) {
        return Err(IdxError::BadDims { path: p(), dims: dims32, why: "a dimension is zero".into() });
    }
    let expected = dims32
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d as usize))
        .filter(|&n| n as u64 <= MAX_BYTES)
        .ok_or_else(|| IdxError::BadDims { path: p(), dims: dims32.clone(), why: "more than 1 GiB of data".into() })?;
    let found = raw.len() - need;
    if found != expected {
        return Err(IdxError::BadLength { path: p(), dims: dims32, expected, found });
    }
    Ok(IdxData { dims: dims32.iter().map(|&d| d as usize).collect(), data: raw[need..].to_vec() })
}

/// Reads and validates an IDX file (raw or gzip) of the given kind.
///
/// # Errors
/// Any [`IdxError`]: unreadable file or corrupt gzip, wrong magic, zero dimensions, truncated or
/// over-long data, and for labels a value outside 0–9.
pub fn read_idx(path: &Path, kind: IdxKind) -> Result<IdxData, IdxError> {
    let io = |error| IdxError::Io { path: path.to_path_buf(), error };
    let file = File::open(path).map_err(io)?;
    if file.metadata().map_err(io)?.len() > MAX_BYTES {
        return Err(io(std::io::Error::other("larger than 1 GiB")));
    }
    let mut raw = Vec::new();
    BufReader::new(file).read_to_end(&mut raw).map_err(io)?;
    decode_idx(path, raw, kind)
}

/// [`read_idx`] on bytes already in memory (raw or gzip); `path` only names the source in errors.
pub fn decode_idx(path: &Path, raw: Vec<u8>, kind: IdxKind) -> Result<IdxData, IdxError> {
    let raw = gunzip_if_needed(path, raw)?;
    let idx = parse_idx(path, &raw, kind)?;
    if kind == IdxKind::Labels {
        if let Some((index, &value)) = idx.data.iter().enumerate().find(|(_, &v)| v > 9) {
            return Err(IdxError::BadLabel { path: path.to_path_buf(), index, value });
        }
    }
    Ok(idx)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;

    /// Builds IDX bytes from a magic, dims and data, with no validation (tests break them on purpose).
    pub(crate) fn idx_bytes(magic: u32, dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut v = magic.to_be_bytes().to_vec();
        for d in dims {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v.extend_from_slice(data);
        v
    }

    pub(crate) fn gz(bytes: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn reads_raw_and_gzip_images_identically() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..2 * 3 * 4).map(|i| i as u8 * 7).collect();
        let bytes = idx_bytes(IMAGES_MAGIC, &[2, 3, 4], &data);
        let raw = read_idx(&write(dir.path(), "a", &bytes), IdxKind::Images).unwrap();
        let z = read_idx(&write(dir.path(), "a.gz", &gz(&bytes)), IdxKind::Images).unwrap();
        assert_eq!(raw, z);
        assert_eq!(raw.dims, vec![2, 3, 4]);
        assert_eq!(raw.data, data);
    }

    #[test]
    fn wrong_magic_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "labels", &idx_bytes(IMAGES_MAGIC, &[1, 1, 1], &[0]));
        let e = read_idx(&p, IdxKind::Labels).unwrap_err().to_string();
        assert!(e.contains("wrong magic number 2051") && e.contains("labels"), "{e}");
    }

    #[test]
    fn truncated_data_and_trailing_bytes_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let short = write(dir.path(), "s", &idx_bytes(IMAGES_MAGIC, &[2, 2, 2], &[0; 7]));
        let e = read_idx(&short, IdxKind::Images).unwrap_err().to_string();
        assert!(e.contains("truncated") && e.contains("need 8"), "{e}");
        let long = write(dir.path(), "l", &idx_bytes(LABELS_MAGIC, &[2], &[0; 3]));
        let e = read_idx(&long, IdxKind::Labels).unwrap_err().to_string();
        assert!(e.contains("trailing bytes"), "{e}");
    }

    #[test]
    fn truncated_header_and_empty_file_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let empty = write(dir.path(), "empty", &[]);
        assert!(matches!(read_idx(&empty, IdxKind::Images), Err(IdxError::TruncatedHeader { .. })));
        let half = write(dir.path(), "half", &IMAGES_MAGIC.to_be_bytes()[..]);
        assert!(matches!(read_idx(&half, IdxKind::Images), Err(IdxError::TruncatedHeader { need: 16, .. })));
    }

    #[test]
    fn zero_dimension_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "z", &idx_bytes(IMAGES_MAGIC, &[0, 28, 28], &[]));
        assert!(matches!(read_idx(&p, IdxKind::Images), Err(IdxError::BadDims { .. })));
    }

    #[test]
    fn label_outside_digits_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "l", &idx_bytes(LABELS_MAGIC, &[3], &[1, 12, 3]));
        let e = read_idx(&p, IdxKind::Labels).unwrap_err().to_string();
        assert!(e.contains("label 12 at index 1"), "{e}");
    }

    #[test]
    fn corrupt_gzip_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let mut z = gz(&idx_bytes(LABELS_MAGIC, &[100], &[1; 100]));
        let n = z.len();
        z[n / 2] ^= 0xff;
        z.truncate(n - 5);
        let p = write(dir.path(), "bad.gz", &z);
        let e = read_idx(&p, IdxKind::Labels).unwrap_err().to_string();
        assert!(e.contains("bad.gz"), "{e}");
    }

    #[test]
    fn missing_file_is_an_io_error_naming_it() {
        let e = read_idx(Path::new("/nonexistent/x-idx"), IdxKind::Images).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/x-idx"), "{e}");
    }
}
