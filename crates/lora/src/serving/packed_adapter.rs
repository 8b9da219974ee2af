//! [`PackedAdapter`]: an adapter's tensors laid out for the mixed batches of one [`LoraModel`]: per layer, in
//! the model's order, A (r, in) then Bᵀ (r, out) in one allocation, or nothing for a layer it does not adapt.
//! A delta then reads contiguous rows, and a forward pass reads the adapter front to back.

use std::ops::Range;

use candle_core::Tensor;
use lora_kernels::DeltaRef;

use crate::bridge::values;
use crate::config::LoraConfig;
use crate::error::{LoraError, Result};
use crate::model::LoraModel;
use crate::peft::AdapterFiles;

/// Where one layer's delta lies in its adapter's [`PackedAdapter::data`].
#[derive(Debug, Clone)]
struct PackedDelta {
    a: Range<usize>,  // A, (r, in)
    bt: Range<usize>, // Bᵀ, (r, out)
    r: usize,
    scale: f32,
}

/// An adapter laid out for mixed batches of one [`LoraModel`]: per layer (in the model's order), the
/// delta or nothing. Immutable once built; share it with `Arc`.
#[derive(Debug, Clone)]
pub struct PackedAdapter {
    /// Every layer's A then Bᵀ, in the model's order of layers: one allocation, read front to back by a
    /// forward pass, so that the hardware prefetcher runs ahead from one layer's delta into the next's.
    data: Vec<f32>,
    layers: Vec<Option<PackedDelta>>,
    config: LoraConfig,
    params: usize,
}

impl PackedAdapter {
    /// The adapter's configuration (`target_modules` = the layers it adapts).
    pub fn config(&self) -> &LoraConfig {
        &self.config
    }
    /// Trainable parameters held (Σ r·(in + out)).
    pub fn num_params(&self) -> usize {
        self.params
    }
    /// Whether layer `i` (in the model's order) has a delta.
    pub fn adapts(&self, i: usize) -> bool {
        self.layers.get(i).is_some_and(Option::is_some)
    }
}

impl PackedAdapter {
    /// Layer `index`'s delta, if this adapter adapts it.
    pub(super) fn delta(&self, index: usize) -> Option<DeltaRef<'_>> {
        let d = self.layers.get(index)?.as_ref()?;
        Some(DeltaRef { a: &self.data[d.a.clone()], bt: &self.data[d.bt.clone()], rank: d.r, scale: d.scale })
    }
}

impl LoraModel {
    /// Lays out validated adapter files for [`LoraModel::forward_mixed`], after the same checks as
    /// [`LoraModel::insert_adapter_files`] (modules, shapes, targets). The model is not changed.
    pub fn pack_adapter(&self, files: &AdapterFiles) -> Result<PackedAdapter> {
        self.check_adapter_files(files)?;
        let c = &files.config;
        let copies = !files.copies.is_empty();
        if let Some((m, _)) = self.layers().find(|(m, l)| l.is_embedding() && files.tensors.contains_key(*m)) {
            return Err(LoraError::config(
                "target_modules",
                m,
                "embedding adapters are not served in mixed-adapter batches yet: merge the adapter",
            ));
        }
        for (on, key) in [
            (c.use_dora, "use_dora"),
            (c.lora_bias, "lora_bias"),
            (c.init.rewrites_base(), "init_lora_weights"),
            (copies, "modules_to_save / bias"),
        ] {
            if on {
                return Err(LoraError::config(
                    key,
                    if key == "init_lora_weights" { c.init.peft_value().to_string() } else { "true".into() },
                    "is not served in mixed-adapter batches yet: merge the adapter, or save PiSSA/OLoRA converted to plain LoRA",
                ));
            }
        }
        let (mut data, mut layers) = (Vec::new(), Vec::new());
        for (name, _) in self.layers() {
            let Some((a, b)) = files.tensors.get(name) else {
                layers.push(None);
                continue;
            };
            let mut append = |t: &Tensor| -> Result<Range<usize>> {
                let start = data.len();
                data.extend(values(&t.contiguous()?)?);
                Ok(start..data.len())
            };
            let (a_at, bt_at) = (append(a)?, append(&b.t()?)?);
            layers.push(Some(PackedDelta { a: a_at, bt: bt_at, r: a.dims()[0], scale: files.config.scale_for(name) as f32 }));
        }
        let config = LoraConfig { target_modules: files.tensors.keys().cloned().collect(), ..files.config.clone() };
        Ok(PackedAdapter { data, layers, config, params: files.num_params() })
    }
}
