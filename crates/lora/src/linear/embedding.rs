//! A [`LoraLinear`] as an embedding table (PEFT's LoRA on `nn.Embedding`): the table E (V, H) stored as it
//! is (so in = V, out = H), read by token id:
//!
//! ```text
//! row(id) = E[id] + Σ_k s_k·(A_kᵀ[id])·B_kᵀ        A (r, V), B (H, r)   (no dropout, as PEFT)
//! ```

use candle_core::Tensor;

use super::LoraLinear;
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
        let table = match ow {
            Some(w) => w.as_tensor().clone(),
            None => Self::param(&self.weight, self.weight_trainable),
        };
        let mut y = table.index_select(&ids, 0)?; // (n, H)
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
