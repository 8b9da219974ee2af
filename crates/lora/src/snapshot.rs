//! [`BaseSnapshot`]: exact copies of every base weight and bias of a [`LoraModel`], for a bit-exact restore
//! after merges (unmerging is exact only up to one rounding per element each way).
//!
//! ```text
//! snap = model.snapshot_base()       W_l, b_l copied for every layer l
//! model.restore_base(&snap)          W_l ← snap, b_l ← snap, every merge forgotten, adapters kept whole
//! ```

use std::sync::Arc;

use candle_core::Tensor;
use lora_kernels::Bf16Matrix;

use crate::error::Result;
use crate::model::LoraModel;

/// A weight as saved: an f32 copy, or a bf16 weight itself (never written in place, so sharing it is a copy).
#[derive(Debug, Clone)]
enum Saved {
    F32(Tensor),
    Bf16(Arc<Bf16Matrix>),
}

/// Exact copies of every base weight and bias, for a bit-exact restore after merges.
#[derive(Debug, Clone)]
pub struct BaseSnapshot {
    tensors: Vec<(String, Saved, Option<Tensor>)>,
}

impl LoraModel {
    /// Copies every layer's weight and bias as stored now.
    pub fn snapshot_base(&self) -> Result<BaseSnapshot> {
        let mut tensors = Vec::new();
        for (n, l) in self.layers() {
            let w = match l.weight_bf16() {
                Some(m) => Saved::Bf16(m.clone()),
                None => Saved::F32(l.weight()?.copy()?),
            };
            tensors.push((n.to_string(), w, l.bias().map(|b| b.as_tensor().copy()).transpose()?));
        }
        Ok(BaseSnapshot { tensors })
    }

    /// Writes a snapshot back (bit-exact) and forgets every merge.
    pub fn restore_base(&mut self, snap: &BaseSnapshot) -> Result<()> {
        for (n, w, b) in &snap.tensors {
            let layer = self.layer_mut(n)?;
            match w {
                Saved::F32(w) => layer.restore_base(w, b.as_ref())?,
                Saved::Bf16(m) => layer.restore_base_bf16(m, b.as_ref())?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::combine::tests::model_with;
    use crate::{Bias, LoraConfig};
    use candle_core::Device;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn restoring_a_snapshot_keeps_the_trained_biases_of_a_merged_adapter() {
        // PEFT's bias = "all": the adapter owns trained copies of every bias. Merged, they sit in the layers;
        // a restore puts the base back and must leave the adapter its biases.
        let mut m = model_with(&[]);
        let c = LoraConfig { bias: Bias::All, ..LoraConfig::new(2, 4.0) };
        m.add_adapter("b", &c, &mut StdRng::seed_from_u64(1)).unwrap();
        let trained = |m: &LoraModel| -> Vec<u32> {
            m.layers()
                .flat_map(|(_, l)| l.override_of("b").unwrap().1.unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap())
                .map(f32::to_bits)
                .collect()
        };
        for (_, l) in m.layers() {
            let b = l.override_of("b").unwrap().1.unwrap();
            b.set(&Tensor::randn(0f32, 1.0, b.shape(), &Device::Cpu).unwrap()).unwrap();
            // "trained"
        }
        let before = trained(&m);
        let snap = m.snapshot_base().unwrap();
        m.merge("b", true).unwrap();
        m.restore_base(&snap).unwrap();
        assert_eq!(trained(&m), before);
    }

    #[test]
    fn snapshot_restore_is_bit_exact_after_merge_and_unmerge() {
        let mut m = model_with(&[("a", 2, 3.0)]);
        let snap = m.snapshot_base().unwrap();
        let bits = |m: &LoraModel| -> Vec<u32> {
            m.base_state().unwrap().iter().flat_map(|(_, t)| t.flatten_all().unwrap().to_vec1::<f32>().unwrap()).map(f32::to_bits).collect()
        };
        let before = bits(&m);
        m.merge("a", true).unwrap();
        assert_ne!(bits(&m), before);
        m.unmerge("a").unwrap();
        m.merge("a", true).unwrap();
        m.restore_base(&snap).unwrap();
        assert_eq!(bits(&m), before);
        assert!(m.layers().all(|(_, l)| l.merged().is_empty()));
    }
}
