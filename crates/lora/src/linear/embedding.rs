//! A [`LoraLinear`] as an embedding table (PEFT's LoRA on `nn.Embedding`): the table E (V, H) stored as it
//! is (so in = V, out = H), read by token id:
//!
//! ```text
//! row(id) = E[id] + Σ_k s_k·(A_kᵀ[id])·B_kᵀ        A (r, V), B (H, r)   (no dropout, as PEFT)
//! ```

use std::sync::Arc;

use candle_core::{DType, Tensor};
use lora_kernels::Bf16Matrix;

use super::{Base, LoraLinear};
use crate::error::{LoraError, Result};

impl LoraLinear {
    /// Wraps an embedding table (V, H), read by token id with [`LoraLinear::embed_t`]: a layer with V inputs
    /// and H outputs (see the module docs). A variable passed in is shared, not copied.
    pub fn embedding(table: Tensor) -> Result<Self> {
        table.dims2()?;
        let mut l = Self::new(table, None)?;
        l.embedding = true;
        Ok(l)
    }

    /// Wraps an embedding table (V, H) held in bf16 (frozen, as [`LoraLinear::from_bf16`]): a token's row
    /// is widened when it is read.
    pub fn embedding_bf16(table: Arc<Bf16Matrix>) -> Result<Self> {
        let mut l = Self::from_bf16(table, None)?;
        l.embedding = true;
        Ok(l)
    }

    /// Whether this layer is an embedding table.
    pub fn is_embedding(&self) -> bool {
        self.embedding
    }

    /// The rows of token `ids` (any shape, u32) with the active adapters: (n, H) for n ids.
    pub fn embed_t(&self, ids: &Tensor, _train: bool) -> Result<Tensor> {
        if !self.embedding {
            return Err(LoraError::State("embed_t reads an embedding table; this layer is linear".into()));
        }
        let ids = ids.flatten_all()?;
        let (ow, _) = self.active_override().unwrap_or((None, None));
        let mut y = match (ow, &self.weight) {
            (Some(w), _) => w.as_tensor().index_select(&ids, 0)?,
            (None, Base::F32(w)) => Self::param(w, self.weight_trainable).index_select(&ids, 0)?,
            (None, Base::Bf16(table)) => {
                let (v, h) = (table.rows(), table.cols());
                let ids_v = ids.to_dtype(DType::U32)?.to_vec1::<u32>()?;
                let mut rows = vec![0f32; ids_v.len() * h];
                for (&id, row) in ids_v.iter().zip(rows.chunks_exact_mut(h.max(1))) {
                    if id as usize >= v {
                        return Err(LoraError::State(format!("token id {id} is outside the embedding table ({v} rows)")));
                    }
                    table.row_into(id as usize, row);
                }
                Tensor::from_vec(rows, (ids_v.len(), h), ids.device())?
            }
        }; // (n, H)
        if !self.disabled {
            for name in self.active.iter().filter(|n| !self.merged.contains(n)) {
                let Some(ad) = self.adapters.get(name) else { continue };
                // PEFT applies no dropout to embedding adapters.
                let xa = ad.a.as_tensor().t()?.contiguous()?.index_select(&ids, 0)?; // (n, r)
                y = (y + (xa.matmul(&ad.b.as_tensor().t()?)? * ad.scale)?)?;
            }
        }
        Ok(y)
    }
}
