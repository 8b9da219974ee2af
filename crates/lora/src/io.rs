//! Files: atomic writes and safetensors reading/writing with checks that name the file and tensor.
//!
//! Every write goes through `lora-atomic` (the workspace's one atomic writer, shared with `lora-viz`): a
//! fresh temporary file in the target's directory, flushed and `fsync`ed, then renamed over the target, so
//! a crash leaves either the old file or the new one, never a torn one.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use lora_kernels::Bf16Matrix;
use safetensors::tensor::{Dtype, Metadata, TensorView};
use sha2::{Digest, Sha256};

/// Errors reading or writing files; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// An I/O error.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause (shown in the message, so not chained again as a source).
        error: std::io::Error,
    },
    /// The file's content is not acceptable.
    #[error("{path}: {why}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
}

impl FileError {
    /// An [`FileError::Invalid`] for `path`.
    pub fn invalid(path: &Path, why: impl Into<String>) -> Self {
        FileError::Invalid { path: path.to_path_buf(), why: why.into() }
    }
}

/// Writes `bytes` to `path` atomically ([`lora_atomic::write_atomic`]: a temporary file in the same
/// directory, fsync, rename), naming the file in the error.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), FileError> {
    lora_atomic::write_atomic(path, bytes).map_err(|error| FileError::Io { path: path.to_path_buf(), error })?;
    tracing::info!(path = %path.display(), bytes = bytes.len(), "wrote file");
    Ok(())
}

/// Writes the files of one output folder (`(name, bytes)`, the marking file last) so that `dir` holds all
/// of them or none ([`lora_atomic::write_dir_atomic`]), naming the folder in the error.
pub fn write_dir_atomic(dir: &Path, files: &[(&str, &[u8])]) -> Result<(), FileError> {
    lora_atomic::write_dir_atomic(dir, files).map_err(|error| FileError::Io { path: dir.to_path_buf(), error })?;
    tracing::info!(path = %dir.display(), files = files.len(), "wrote folder");
    Ok(())
}

/// Serialises named tensors (in the given order) with `metadata` to safetensors bytes: BF16 tensors as
/// BF16, every other as F32.
pub fn safetensors_bytes(tensors: &[(String, Tensor)], metadata: &HashMap<String, String>) -> candle_core::Result<Vec<u8>> {
    let data: Vec<(String, Dtype, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(n, t)| {
            let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            let (dtype, bytes) = if t.dtype() == DType::BF16 {
                // A BF16 value widened to f32 is its 16 bits followed by 16 zeros: write the 16.
                (Dtype::BF16, v.iter().flat_map(|x| ((x.to_bits() >> 16) as u16).to_le_bytes()).collect())
            } else {
                (Dtype::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect())
            };
            Ok((n.clone(), dtype, bytes, t.dims().to_vec()))
        })
        .collect::<candle_core::Result<_>>()?;
    let views: Vec<(String, TensorView<'_>)> = data
        .iter()
        .map(|(n, d, b, s)| TensorView::new(*d, s.clone(), b).map(|v| (n.clone(), v)))
        .collect::<Result<_, _>>()
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let bytes = safetensors::serialize(views, Some(metadata.clone())).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    Ok(canonical_header(bytes))
}

/// Rewrites a safetensors header with its JSON keys sorted (the `safetensors` crate writes the metadata
/// map in `HashMap` order, which differs from process to process), so equal tensors and metadata give
/// byte-identical files. The header stays space-padded to a multiple of 8 bytes; data offsets are relative
/// to the data section, so they do not change.
fn canonical_header(bytes: Vec<u8>) -> Vec<u8> {
    let Some(n) = bytes.get(..8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as usize) else { return bytes };
    let Some(header) = bytes.get(8..8 + n) else { return bytes };
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(header) else { return bytes };
    let mut h = value.to_string().into_bytes(); // serde_json's Map is a BTreeMap: keys come out sorted
    h.resize(h.len().div_ceil(8) * 8, b' ');
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend_from_slice(&bytes[8 + n..]);
    out
}

/// Saves named tensors atomically as a safetensors file with `metadata`.
pub fn save_safetensors(path: &Path, tensors: &[(String, Tensor)], metadata: &HashMap<String, String>) -> Result<(), FileError> {
    let bytes = safetensors_bytes(tensors, metadata).map_err(|e| FileError::invalid(path, e.to_string()))?;
    write_atomic(path, &bytes)
}

/// The tensors and metadata of a safetensors file, every tensor a float type, converted to F32, and finite.
#[derive(Debug)]
pub struct TensorFile {
    /// The file it came from.
    pub path: PathBuf,
    /// Tensors by name, in file order.
    pub tensors: Vec<(String, Tensor)>,
    /// Each tensor's dtype as stored in the file (`F32`, `F16`, `BF16`); values are converted to F32 exactly.
    pub dtypes: Vec<(String, String)>,
    /// The `__metadata__` map.
    pub metadata: HashMap<String, String>,
    /// Size on disk in bytes.
    pub bytes: u64,
}

/// A tensor as [`WeightFile::load`] reads it: converted to F32 (exact), or — a 2-D BF16 tensor — kept in
/// bf16 ([`Bf16Matrix`]), never widened.
#[derive(Debug, Clone)]
pub enum Weight {
    /// F32 values (from F32, F16 or BF16 in the file).
    F32(Tensor),
    /// A matrix stored as BF16, held so.
    Bf16(Arc<Bf16Matrix>),
}

impl Weight {
    /// The shape.
    pub fn dims(&self) -> Vec<usize> {
        match self {
            Weight::F32(t) => t.dims().to_vec(),
            Weight::Bf16(m) => vec![m.rows(), m.cols()],
        }
    }
    /// The values as an F32 tensor (a widened copy for a bf16 matrix).
    pub fn to_f32(&self) -> candle_core::Result<Tensor> {
        match self {
            Weight::F32(t) => Ok(t.clone()),
            Weight::Bf16(m) => Tensor::from_vec(m.to_f32(), (m.rows(), m.cols()), &Device::Cpu),
        }
    }
}

/// The tensors and metadata of a safetensors file, read piece by piece: each F32 or F16 tensor (and each
/// BF16 one that is not a matrix) converted to F32, each BF16 matrix packed into bf16 as it is read, so that
/// a bf16 checkpoint is held in its own size (no copy of the file, no f32 copy of a weight). Every value is
/// checked finite, and every error names the file and tensor.
#[derive(Debug)]
pub struct WeightFile {
    /// The file it came from.
    pub path: PathBuf,
    /// Tensors by name, in file order.
    pub tensors: Vec<(String, Weight)>,
    /// Each tensor's dtype as stored in the file (`F32`, `F16`, `BF16`).
    pub dtypes: Vec<(String, String)>,
    /// The `__metadata__` map.
    pub metadata: HashMap<String, String>,
    /// Size on disk in bytes.
    pub bytes: u64,
}

/// `path` opened for reading, with its length.
fn open(path: &Path) -> Result<(std::fs::File, u64), FileError> {
    let io = |error| FileError::Io { path: path.to_path_buf(), error };
    let f = std::fs::File::open(path).map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    Ok((f, len))
}

/// Bytes read at a time from a weight file (whole rows of a bf16 matrix, at least one).
const READ_CHUNK: usize = 16 << 20;

impl WeightFile {
    /// Reads and validates a safetensors file, keeping BF16 matrices in bf16.
    pub fn load(path: &Path) -> Result<Self, FileError> {
        let (mut f, len) = open(path)?;
        Self::read(path, &mut f, len, true)
    }

    /// Reads `len` bytes of safetensors from `r`; `path` names the source in errors. With `keep_bf16`, BF16
    /// matrices stay bf16; otherwise every tensor is converted to F32.
    fn read<R: Read + Seek>(path: &Path, r: &mut R, len: u64, keep_bf16: bool) -> Result<Self, FileError> {
        let invalid = |why: String| FileError::invalid(path, why);
        let io = |error| FileError::Io { path: path.to_path_buf(), error };
        let mut n = [0u8; 8];
        if len < 8 {
            return Err(invalid("not a valid safetensors file: shorter than its 8-byte header length".into()));
        }
        r.read_exact(&mut n).map_err(io)?;
        let n = u64::from_le_bytes(n);
        if n > 100_000_000 || 8 + n > len {
            return Err(invalid(format!("not a valid safetensors file: header length {n} does not fit the file ({len} bytes)")));
        }
        let mut header = vec![0u8; n as usize];
        r.read_exact(&mut header).map_err(io)?;
        let meta: Metadata =
            serde_json::from_slice(&header).map_err(|e| invalid(format!("not a valid safetensors file: bad header: {e}")))?;
        let data_len = len - 8 - n;
        let mut names: Vec<(usize, String)> = meta.tensors().into_iter().map(|(name, info)| (info.data_offsets.0, name)).collect();
        names.sort();
        let end = meta.tensors().values().map(|i| i.data_offsets.1 as u64).max().unwrap_or(0);
        if end != data_len {
            return Err(invalid(format!("not a valid safetensors file: its tensors hold {end} bytes of the {data_len} after the header")));
        }
        let mut out = WeightFile {
            path: path.to_path_buf(),
            tensors: Vec::new(),
            dtypes: Vec::new(),
            metadata: meta.metadata().clone().unwrap_or_default(),
            bytes: len,
        };
        for (offset, name) in names {
            let info = meta.info(&name).ok_or_else(|| invalid(format!("tensor {name}: missing from the header")))?;
            let bad = |why: String| invalid(format!("tensor {name}: {why}"));
            let dt = match info.dtype {
                Dtype::F32 => DType::F32,
                Dtype::F16 => DType::F16,
                Dtype::BF16 => DType::BF16,
                other => return Err(bad(format!("dtype {other:?} is not a float type (expected F32, F16 or BF16)"))),
            };
            r.seek(SeekFrom::Start(8 + n + offset as u64)).map_err(io)?;
            let size = info.data_offsets.1 - info.data_offsets.0;
            let non_finite = |i: usize, v: f32| bad(format!("non-finite value {v} at flat index {i}"));
            let w = match (dt, info.shape.as_slice()) {
                (DType::BF16, &[rows, cols]) if keep_bf16 => {
                    let mut m =
                        Bf16Matrix::zeros(rows, cols).ok_or_else(|| bad(format!("a {rows}x{cols} matrix does not fit in memory")))?;
                    let per = (READ_CHUNK / (2 * cols.max(1))).max(1);
                    let mut bytes = vec![0u8; per.min(rows) * cols * 2];
                    for r0 in (0..rows).step_by(per) {
                        let take = per.min(rows - r0);
                        let chunk = &mut bytes[..take * cols * 2];
                        r.read_exact(chunk).map_err(io)?;
                        let bits: Vec<u16> = chunk.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect();
                        // Exponent bits all set: an infinity or a NaN.
                        if let Some(i) = bits.iter().position(|b| b & 0x7F80 == 0x7F80) {
                            return Err(non_finite(r0 * cols + i, f32::from_bits((bits[i] as u32) << 16)));
                        }
                        if !m.write_rows(r0, &bits) {
                            return Err(bad("rows past the matrix".into()));
                        }
                    }
                    Weight::Bf16(Arc::new(m))
                }
                _ => {
                    let mut bytes = vec![0u8; size];
                    r.read_exact(&mut bytes).map_err(io)?;
                    let t = Tensor::from_raw_buffer(&bytes, dt, &info.shape, &Device::Cpu)
                        .and_then(|t| t.to_dtype(DType::F32))
                        .map_err(|e| bad(e.to_string()))?;
                    let vals = t.flatten_all().and_then(|t| t.to_vec1::<f32>()).map_err(|e| bad(e.to_string()))?;
                    if let Some(i) = vals.iter().position(|x| !x.is_finite()) {
                        return Err(non_finite(i, vals[i]));
                    }
                    Weight::F32(t)
                }
            };
            out.dtypes.push((name.clone(), format!("{:?}", info.dtype)));
            out.tensors.push((name, w));
        }
        Ok(out)
    }
}

impl TensorFile {
    /// Reads and validates a safetensors file.
    pub fn load(path: &Path, device: &Device) -> Result<Self, FileError> {
        let (mut f, len) = open(path)?;
        Self::from_weights(WeightFile::read(path, &mut f, len, false)?, device)
    }

    /// Parses safetensors bytes; `path` names the source in errors.
    pub fn from_bytes(path: &Path, raw: &[u8], device: &Device) -> Result<Self, FileError> {
        Self::from_weights(WeightFile::read(path, &mut std::io::Cursor::new(raw), raw.len() as u64, false)?, device)
    }

    fn from_weights(w: WeightFile, device: &Device) -> Result<Self, FileError> {
        let path = w.path.clone();
        let tensors = w
            .tensors
            .into_iter()
            .map(|(n, t)| {
                Ok((
                    n.clone(),
                    t.to_f32().and_then(|t| t.to_device(device)).map_err(|e| FileError::invalid(&path, format!("tensor {n}: {e}")))?,
                ))
            })
            .collect::<Result<_, FileError>>()?;
        Ok(TensorFile { path: w.path, tensors, dtypes: w.dtypes, metadata: w.metadata, bytes: w.bytes })
    }

    /// The tensor called `name`, if present.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }
}

/// SHA-256 (hex) over the names, shapes and little-endian f32 bytes of `tensors`, in the given order:
/// a fingerprint of a base model that adapters record to detect being loaded onto another base.
pub fn fingerprint(tensors: &[(String, Tensor)]) -> candle_core::Result<String> {
    let mut h = Fingerprint::default();
    for (n, t) in tensors {
        h.add(n, t)?;
    }
    Ok(h.finish())
}

/// [`fingerprint`] one tensor at a time, so that a model's tensors need not all exist at once (a bf16
/// model's weights are widened one by one).
#[derive(Debug, Default, Clone)]
pub struct Fingerprint(Sha256);

impl Fingerprint {
    /// Adds a tensor (its name, shape and f32 values).
    pub fn add(&mut self, name: &str, t: &Tensor) -> candle_core::Result<()> {
        self.0.update(name.as_bytes());
        self.0.update(format!("{:?}", t.dims()).as_bytes());
        for x in t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()? {
            self.0.update(x.to_le_bytes());
        }
        Ok(())
    }
    /// The hex digest.
    pub fn finish(self) -> String {
        self.0.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_then_load_is_bit_identical_and_keeps_metadata() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let p = dir.join("x.safetensors");
        let a = Tensor::from_vec(vec![1.5f32, -0.0, 3.25e-20, 7.0], (2, 2), &Device::Cpu).unwrap();
        let b = Tensor::from_vec(vec![9f32], 1, &Device::Cpu).unwrap();
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        save_safetensors(&p, &[("z.w".into(), a.clone()), ("a.b".into(), b)], &meta).unwrap();
        let f = TensorFile::load(&p, &Device::Cpu).unwrap();
        let bits = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(f.get("z.w").unwrap()), bits(&a));
        assert_eq!(f.metadata["format"], "pt");
        assert_eq!(std::fs::read_dir(dir).unwrap().count(), 1, "x.safetensors alone, no temporary file");
    }

    #[test]
    fn equal_tensors_and_metadata_give_byte_identical_files() {
        let t = Tensor::from_vec(vec![1f32, 2.0, 3.0], 3, &Device::Cpu).unwrap();
        let meta: HashMap<String, String> = (0..20).map(|i| (format!("key{i}"), i.to_string())).collect();
        let a = safetensors_bytes(&[("t".into(), t.clone())], &meta).unwrap();
        // A map built in another order (HashMap iteration order is random per map) serialises the same.
        let meta2: HashMap<String, String> = (0..20).rev().map(|i| (format!("key{i}"), i.to_string())).collect();
        let b = safetensors_bytes(&[("t".into(), t)], &meta2).unwrap();
        assert_eq!(a, b);
        let f = TensorFile::from_bytes(Path::new("x"), &a, &Device::Cpu).unwrap();
        assert_eq!(f.metadata.len(), 20);
        assert_eq!(f.get("t").unwrap().to_vec1::<f32>().unwrap(), vec![1.0, 2.0, 3.0]);
    }

    #[test]
    fn non_finite_values_and_garbage_are_named() {
        let p = Path::new("nan.safetensors");
        let t = Tensor::from_vec(vec![1f32, f32::NAN], 2, &Device::Cpu).unwrap();
        let bytes = safetensors_bytes(&[("w".into(), t)], &HashMap::new()).unwrap();
        let e = TensorFile::from_bytes(p, &bytes, &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("nan.safetensors") && e.contains("tensor w") && e.contains("index 1"), "{e}");
        let e = TensorFile::from_bytes(p, &bytes[..bytes.len() - 3], &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("not a valid safetensors"), "{e}");
    }

    #[test]
    fn fingerprint_changes_with_one_bit() {
        let a = Tensor::from_vec(vec![1f32, 2.0], 2, &Device::Cpu).unwrap();
        let b = Tensor::from_vec(vec![1f32, f32::from_bits(2f32.to_bits() + 1)], 2, &Device::Cpu).unwrap();
        assert_ne!(fingerprint(&[("w".into(), a)]).unwrap(), fingerprint(&[("w".into(), b)]).unwrap());
    }

    #[test]
    fn bf16_matrices_are_read_into_bf16_in_pieces_with_the_values_an_f32_read_gives() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        // A matrix larger than one read (so it arrives in several pieces of whole rows), a BF16 vector (kept
        // F32) and an F32 matrix (kept F32).
        let (rows, cols) = (READ_CHUNK / 2 / 300 + 7, 300);
        let big: Vec<f32> = (0..rows * cols).map(|i| ((i % 977) as f32 - 488.0) / 61.0).collect();
        let tensors = [
            ("big".to_string(), Tensor::from_vec(big, (rows, cols), &Device::Cpu).unwrap().to_dtype(DType::BF16).unwrap()),
            ("norm".to_string(), Tensor::from_vec(vec![0.5f32, 1.5], 2, &Device::Cpu).unwrap().to_dtype(DType::BF16).unwrap()),
            ("fc".to_string(), Tensor::from_vec(vec![0.1f32; 6], (2, 3), &Device::Cpu).unwrap()),
        ];
        // Written as stored (BF16 kept), as transformers writes a bf16 checkpoint.
        std::fs::write(&path, safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), None).unwrap()).unwrap();
        let w = WeightFile::load(&path).unwrap();
        let f = TensorFile::load(&path, &Device::Cpu).unwrap();
        let mut kinds: Vec<(&str, bool)> = w.tensors.iter().map(|(n, t)| (n.as_str(), matches!(t, Weight::Bf16(_)))).collect();
        kinds.sort();
        assert_eq!(kinds, [("big", true), ("fc", false), ("norm", false)]);
        for ((n, a), (_, b)) in w.tensors.iter().zip(&f.tensors) {
            let (a, b) =
                (a.to_f32().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(), b.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "{n}");
        }
        // An infinity in a bf16 matrix is named with its index; a file cut short is refused.
        let inf = Tensor::from_vec(vec![1f32, 2.0, f32::INFINITY, 3.0], (2, 2), &Device::Cpu).unwrap().to_dtype(DType::BF16).unwrap();
        std::fs::write(&path, safetensors::serialize([("w", &inf)], None).unwrap()).unwrap();
        let e = WeightFile::load(&path).unwrap_err().to_string();
        assert!(e.contains("tensor w") && e.contains("index 2") && e.contains("inf"), "{e}");
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        let e = WeightFile::load(&path).unwrap_err().to_string();
        assert!(e.contains("w.safetensors") && e.contains("not a valid safetensors"), "{e}");
    }
}
