//! Files: atomic writes and safetensors reading/writing with checks that name the file and tensor.
//!
//! Every write goes through `lora-atomic` (the workspace's one atomic writer, shared with `lora-viz`): a
//! fresh temporary file in the target's directory, flushed and `fsync`ed, then renamed over the target, so
//! a crash leaves either the old file or the new one, never a torn one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
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

impl TensorFile {
    /// Reads and validates a safetensors file.
    pub fn load(path: &Path, device: &Device) -> Result<Self, FileError> {
        let raw = std::fs::read(path).map_err(|source| FileError::Io { path: path.to_path_buf(), error: source })?;
        Self::from_bytes(path, &raw, device)
    }

    /// Parses safetensors bytes; `path` names the source in errors.
    pub fn from_bytes(path: &Path, raw: &[u8], device: &Device) -> Result<Self, FileError> {
        let st = SafeTensors::deserialize(raw).map_err(|e| FileError::invalid(path, format!("not a valid safetensors file: {e}")))?;
        let (_, meta) = SafeTensors::read_metadata(raw).map_err(|e| FileError::invalid(path, format!("bad header: {e}")))?;
        let metadata = meta.metadata().clone().unwrap_or_default();
        let mut names: Vec<(usize, String)> =
            st.tensors().into_iter().map(|(n, v)| (v.data().as_ptr() as usize - raw.as_ptr() as usize, n)).collect();
        names.sort();
        let mut tensors = Vec::new();
        let mut dtypes = Vec::new();
        for (_, name) in names {
            let v = st.tensor(&name).map_err(|e| FileError::invalid(path, format!("tensor {name}: {e}")))?;
            let dt = match v.dtype() {
                Dtype::F32 => DType::F32,
                Dtype::F16 => DType::F16,
                Dtype::BF16 => DType::BF16,
                other => {
                    return Err(FileError::invalid(
                        path,
                        format!("tensor {name}: dtype {other:?} is not a float type (expected F32, F16 or BF16)"),
                    ))
                }
            };
            let bad = |e: candle_core::Error| FileError::invalid(path, format!("tensor {name}: {e}"));
            let t = Tensor::from_raw_buffer(v.data(), dt, v.shape(), device).and_then(|t| t.to_dtype(DType::F32)).map_err(bad)?;
            let vals = t.flatten_all().and_then(|t| t.to_vec1::<f32>()).map_err(bad)?;
            if let Some(i) = vals.iter().position(|x| !x.is_finite()) {
                return Err(FileError::invalid(path, format!("tensor {name}: non-finite value {} at flat index {i}", vals[i])));
            }
            dtypes.push((name.clone(), format!("{:?}", v.dtype())));
            tensors.push((name, t));
        }
        Ok(TensorFile { path: path.to_path_buf(), tensors, dtypes, metadata, bytes: raw.len() as u64 })
    }

    /// The tensor called `name`, if present.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }
}

/// SHA-256 (hex) over the names, shapes and little-endian f32 bytes of `tensors`, in the given order:
/// a fingerprint of a base model that adapters record to detect being loaded onto another base.
pub fn fingerprint(tensors: &[(String, Tensor)]) -> candle_core::Result<String> {
    let mut h = Sha256::new();
    for (n, t) in tensors {
        h.update(n.as_bytes());
        h.update(format!("{:?}", t.dims()).as_bytes());
        for x in t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()? {
            h.update(x.to_le_bytes());
        }
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
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
}
