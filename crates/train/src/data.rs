//! A labelled data set held as two tensors: inputs (N, features) f32 and labels (N) u32.

use candle_core::{DType, Device, Tensor};

use crate::error::{Result, TrainError};

/// Inputs and class labels, already normalised, in memory.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// (N, features) f32.
    pub inputs: Tensor,
    /// (N) u32 class indices.
    pub labels: Tensor,
}

impl Dataset {
    /// Builds a data set from row-major inputs (N·features values) and labels.
    pub fn new(inputs: Vec<f32>, labels: &[u8], features: usize, device: &Device) -> Result<Self> {
        if features == 0 || inputs.len() != labels.len() * features {
            return Err(TrainError::setting("inputs", inputs.len(), &format!("expected {} labels × {features} features", labels.len())));
        }
        let n = labels.len();
        let labels: Vec<u32> = labels.iter().map(|&l| l as u32).collect();
        Ok(Dataset { inputs: Tensor::from_vec(inputs, (n, features), device)?, labels: Tensor::from_vec(labels, n, device)? })
    }
    /// Number of examples.
    pub fn len(&self) -> usize {
        self.labels.dims()[0]
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Labels as a vector.
    pub fn label_vec(&self) -> Result<Vec<u32>> {
        Ok(self.labels.to_dtype(DType::U32)?.to_vec1()?)
    }
    /// The examples at `idx` (a gather, no per-sample copies in Rust): ((k, features), (k)).
    pub fn batch(&self, idx: &[u32]) -> Result<(Tensor, Tensor)> {
        let t = Tensor::from_slice(idx, idx.len(), self.inputs.device())?;
        Ok((self.inputs.index_select(&t, 0)?, self.labels.index_select(&t, 0)?))
    }
    /// Examples `start..start+len` as views, ((len, features), (len)).
    pub fn range(&self, start: usize, len: usize) -> Result<(Tensor, Tensor)> {
        Ok((self.inputs.narrow(0, start, len)?, self.labels.narrow(0, start, len)?))
    }
}
