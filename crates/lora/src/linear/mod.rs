//! [`LoraLinear`]: a frozen base linear layer with named low-rank adapters.
//!
//! For input x of shape (…, in) and base weight W0 (out, in), bias b (out):
//!
//! ```text
//! y = x·W0ᵀ + b + Σ_{active, unmerged k} s_k · (drop(x)·A_kᵀ)·B_kᵀ
//! ```
//!
//! with A_k (r_k, in) and B_k (out, r_k). Only the delta is scaled (unlike candle-lora, which also scales
//! the base output). The delta is computed factorised: `(batch, in)·(in, r) → (batch, r)`, then
//! `(batch, r)·(r, out) → (batch, out)`, costing `r·(in + out)` per row instead of `in·out`.
//!
//! PEFT's variants, per adapter:
//!
//! ```text
//! lora_bias:     delta += s·b_B                                        b_B (out), trained
//! DoRA:          f = m / ‖W0 + s·B·A‖_row   (the norm treated as a constant, as PEFT and the paper do)
//!                y = x·W0ᵀ + b + (f − 1)⊙(drop(x)·W0ᵀ) + f⊙s·(drop(x)·Aᵀ)·Bᵀ      m (out), trained
//! PiSSA / OLoRA: y = x·W0ᵀ + b − s·(x·A0ᵀ)·B0ᵀ + s·(drop(x)·Aᵀ)·Bᵀ
//! ```
//!
//! An embedding (PEFT's LoRA on `nn.Embedding`) is the same layer seen as a linear map of one-hot rows:
//! its table E (V, H) is stored as it is (Wᵀ, so in = V, out = H), a token's row is `E[id] + s·(Aᵀ[id])·Bᵀ`
//! with A (r, V) and B (H, r) — PEFT's `lora_embedding_A` / `lora_embedding_B` — and merging adds
//! `(s·B·A)ᵀ` to E. PEFT initialises them the other way round from linear layers: A = 0, B ~ N(0, 1).
//!
//! An adapter can also bring its own copies of the layer's tensors (PEFT's trained biases, `bias = "all"` or
//! `"lora_only"`, and `modules_to_save`): while it is active the layer computes with its copies in place of
//! W0 and b, and the base copies stay untouched.
//!
//! where (A0, B0) are the adapter's frozen starting factors: PEFT rewrites the base to the residual
//! W0 − s·B0·A0; lora-rs keeps that correction inside the adapter, so the base stays bit-exact and
//! other adapters on it are unaffected.
//!
//! Merging folds the update into W (for zero-overhead inference); it is the only operation that writes the
//! base weight. DoRA merges as PEFT does: `W ← f ⊙ (W + s·B·A)` with the norm taken before the merge
//! and kept for the unmerge, `W ← W / f − s·B·A`.
//!
//! One concept per file: the layer and its adapters by name here; [`Adapter`] and [`AdapterSpec`] in
//! `adapter.rs`; an adapter's own copies of the layer's tensors in `copies.rs`; how a new adapter starts
//! in `init.rs`; merge, unmerge and exact restore in `merge.rs`; the forward in `forward.rs` (the choice of
//! path), `fused.rs` (one custom op on `lora-kernels`) and `reference.rs` (plain candle ops, with dropout);
//! the embedding table read by token id in `embedding.rs`.

use std::collections::BTreeMap;
use std::sync::Mutex;

use candle_core::{DType, Tensor, Var};

use crate::error::{LoraError, Result};

mod adapter;
mod copies;
mod embedding;
mod forward;
mod fused;
mod init;
mod merge;
mod reference;
#[cfg(test)]
pub(crate) mod testing;

pub use adapter::{Adapter, AdapterSpec};
use copies::{Displaced, Override};
pub use forward::Backend;

/// A linear layer `y = x·Wᵀ + b` with named LoRA adapters, an active set, a merged set and an off switch.
#[derive(Debug)]
pub struct LoraLinear {
    weight: Var,       // (out, in)
    bias: Option<Var>, // (out)
    weight_trainable: bool,
    bias_trainable: bool,
    adapters: BTreeMap<String, Adapter>,
    overrides: BTreeMap<String, Override>, // adapter → its copies of this layer's weight / bias
    active: Vec<String>,
    merged: Vec<String>,
    dora_norms: BTreeMap<String, Tensor>, // merged DoRA adapter → the row norms its merge used
    disabled: bool,
    rng: Mutex<reference::DropoutRng>,
    displaced: Option<Displaced>, // the base tensors a merged adapter's copies took the place of
    backend: Backend,
    embedding: bool, // the weight is an embedding table (in, out), read by token id
}

impl LoraLinear {
    /// Wraps a base weight (out, in) and optional bias (out). The base starts trainable (for pre-training);
    /// call [`LoraLinear::freeze_base`] before fine-tuning adapters.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (out, _) = weight.dims2()?;
        if let Some(b) = &bias {
            if b.dims() != [out] {
                return Err(LoraError::Shape { tensor: "bias".into(), expected: vec![out], found: b.dims().to_vec() });
            }
        }
        let var = |t: Tensor| -> Result<Var> { Ok(Var::from_tensor(&t.to_dtype(DType::F32)?.contiguous()?)?) };
        Ok(LoraLinear {
            weight: var(weight)?,
            bias: bias.map(var).transpose()?,
            weight_trainable: true,
            bias_trainable: true,
            adapters: BTreeMap::new(),
            overrides: BTreeMap::new(),
            displaced: None,
            active: Vec::new(),
            merged: Vec::new(),
            dora_norms: BTreeMap::new(),
            disabled: false,
            rng: Mutex::new(reference::DropoutRng::new(0)),
            backend: Backend::default(),
            embedding: false,
        })
    }

    /// Input features (the vocabulary size of an embedding).
    pub fn in_features(&self) -> usize {
        self.weight.dims()[if self.embedding { 0 } else { 1 }]
    }
    /// Output features (the width of an embedding).
    pub fn out_features(&self) -> usize {
        self.weight.dims()[if self.embedding { 1 } else { 0 }]
    }

    /// An update (out, in) in the layout of the stored weight (transposed for an embedding).
    fn stored(&self, delta: Tensor) -> Result<Tensor> {
        Ok(if self.embedding { delta.t()?.contiguous()? } else { delta })
    }
    /// The weight as stored now (W0, or W0 plus merged adapters), shape (out, in).
    pub fn weight(&self) -> &Var {
        &self.weight
    }
    /// The bias (out), if any.
    pub fn bias(&self) -> Option<&Var> {
        self.bias.as_ref()
    }
    /// Stops gradients for weight and bias (they become constants in the graph).
    pub fn freeze_base(&mut self) {
        self.weight_trainable = false;
        self.bias_trainable = false;
    }
    /// Sets which base tensors train.
    pub fn set_base_trainable(&mut self, weight: bool, bias: bool) {
        self.weight_trainable = weight;
        self.bias_trainable = bias;
    }
    /// Whether (weight, bias) train.
    pub fn base_trainable(&self) -> (bool, bool) {
        (self.weight_trainable, self.bias_trainable)
    }

    /// Adds an existing adapter; its shapes must fit this layer.
    pub fn insert_adapter(&mut self, name: &str, adapter: Adapter) -> Result<()> {
        if self.adapters.contains_key(name) {
            return Err(LoraError::DuplicateAdapter(name.to_string()));
        }
        if self.embedding && !adapter.is_plain() {
            let key = if adapter.magnitude.is_some() {
                "use_dora"
            } else if adapter.lora_bias.is_some() {
                "lora_bias"
            } else {
                "init_lora_weights"
            };
            return Err(LoraError::config(key, name, "is not supported on an embedding layer by lora-rs (plain LoRA only)"));
        }
        let (r, inp) = adapter.a.dims2()?;
        if inp != self.in_features() {
            return Err(LoraError::Shape { tensor: format!("{name}.lora_A"), expected: vec![r, self.in_features()], found: vec![r, inp] });
        }
        let (out, _) = adapter.b.dims2()?;
        if out != self.out_features() {
            return Err(LoraError::Shape { tensor: format!("{name}.lora_B"), expected: vec![self.out_features(), r], found: vec![out, r] });
        }
        self.adapters.insert(name.to_string(), adapter);
        Ok(())
    }

    /// Removes an adapter (it must not be merged); returns its LoRA pair, if it had one here.
    pub fn remove_adapter(&mut self, name: &str) -> Result<Option<Adapter>> {
        if self.merged.iter().any(|m| m == name) {
            return Err(LoraError::State(format!("adapter {name:?} is merged: unmerge it before removing it")));
        }
        if !self.has_adapter(name) {
            return Err(self.unknown(name));
        }
        let ad = self.adapters.remove(name);
        self.overrides.remove(name);
        self.active.retain(|a| a != name);
        self.dora_norms.remove(name);
        Ok(ad)
    }

    fn unknown(&self, name: &str) -> LoraError {
        let known: Vec<&str> = self.adapter_names().collect();
        LoraError::UnknownAdapter(name.to_string(), if known.is_empty() { "none".into() } else { known.join(", ") })
    }

    /// The adapter called `name`.
    pub fn adapter(&self, name: &str) -> Result<&Adapter> {
        self.adapters.get(name).ok_or_else(|| self.unknown(name))
    }
    /// Whether an adapter called `name` is loaded.
    pub fn has_adapter(&self, name: &str) -> bool {
        self.adapters.contains_key(name) || self.overrides.contains_key(name)
    }
    /// Names of the loaded adapters (LoRA pairs or copies of this layer's tensors), sorted.
    pub fn adapter_names(&self) -> impl Iterator<Item = &str> {
        let names: std::collections::BTreeSet<&str> = self.adapters.keys().chain(self.overrides.keys()).map(String::as_str).collect();
        names.into_iter()
    }
    /// Sets the active adapters (applied in forward, summed); an empty slice means none. No weight is copied.
    /// At most one of them may bring its own copy of this layer's tensors.
    pub fn set_active(&mut self, names: &[&str]) -> Result<()> {
        if let Some(n) = names.iter().find(|n| !self.has_adapter(n)) {
            return Err(self.unknown(n));
        }
        let with_copies: Vec<&str> = names.iter().copied().filter(|n| self.overrides.contains_key(*n)).collect();
        if with_copies.len() > 1 {
            return Err(LoraError::State(format!(
                "adapters {with_copies:?} each bring their own copy of this layer (modules_to_save or trained biases): activate one at a time"
            )));
        }
        self.active = names.iter().map(|s| s.to_string()).collect();
        Ok(())
    }
    /// The active adapters.
    pub fn active(&self) -> &[String] {
        &self.active
    }
    /// The adapters merged into the weight.
    pub fn merged(&self) -> &[String] {
        &self.merged
    }
    /// Turns every adapter off (`true`) or back on. Refused while adapters are merged, since the
    /// weight then holds their update and the base alone cannot be computed exactly.
    pub fn set_disabled(&mut self, disabled: bool) -> Result<()> {
        if disabled && !self.merged.is_empty() {
            return Err(LoraError::State(format!("cannot disable adapters while {:?} are merged: unmerge first", self.merged)));
        }
        self.disabled = disabled;
        Ok(())
    }
    /// Whether adapters are switched off.
    pub fn is_disabled(&self) -> bool {
        self.disabled
    }

    /// The trainable tensors: unfrozen base weight/bias and A, B of each active, unmerged adapter.
    pub fn trainable_vars(&self) -> Vec<Var> {
        let mut v = Vec::new();
        if self.weight_trainable {
            v.push(self.weight.clone());
        }
        if let (true, Some(b)) = (self.bias_trainable, &self.bias) {
            v.push(b.clone());
        }
        if !self.disabled {
            for name in self.active.iter().filter(|n| !self.merged.contains(n)) {
                v.extend(self.adapter_vars(name).into_iter().map(|(_, var)| var.clone()));
            }
        }
        v
    }

    /// Every tensor adapter `name` holds in this layer, named as in a PEFT file after `<module>.`: `lora_A.weight`,
    /// `lora_B.weight`, `lora_magnitude_vector`, `lora_B.bias`, and its copies `weight` / `bias`.
    pub fn adapter_vars(&self, name: &str) -> Vec<(&'static str, &Var)> {
        let mut v = Vec::new();
        if let Some(ad) = self.adapters.get(name) {
            v.push(("lora_A.weight", &ad.a));
            v.push(("lora_B.weight", &ad.b));
            if let Some(m) = &ad.magnitude {
                v.push(("lora_magnitude_vector", m));
            }
            if let Some(b) = &ad.lora_bias {
                v.push(("lora_B.bias", b));
            }
        }
        if let Some(o) = self.overrides.get(name) {
            v.extend(o.weight.as_ref().map(|w| ("weight", w)));
            v.extend(o.bias.as_ref().map(|b| ("bias", b)));
        }
        v
    }

    fn param(var: &Var, trainable: bool) -> Tensor {
        if trainable {
            var.as_tensor().clone()
        } else {
            var.as_detached_tensor()
        }
    }

    /// Parameters adapter `name` holds in this layer (LoRA pair and any copies of the layer's tensors).
    pub fn num_adapter_params(&self, name: &str) -> usize {
        self.adapters.get(name).map_or(0, Adapter::num_params)
            + self.overrides.get(name).map_or(0, |o| o.vars().map(|v| v.elem_count()).sum())
    }

    /// Base parameter count (weight + bias).
    pub fn num_base_params(&self) -> usize {
        self.weight.elem_count() + self.bias.as_ref().map_or(0, |b| b.elem_count())
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{layer_with_adapter, rand_vec, t2 as t};
    use super::*;

    #[test]
    fn shape_mismatch_is_named() {
        let mut l = LoraLinear::new(t(vec![0.0; 6], (2, 3)), None).unwrap();
        let ad = Adapter::from_tensors(&t(vec![0.0; 4], (1, 4)), &t(vec![0.0; 2], (2, 1)), 1.0, 1.0, 0.0).unwrap();
        let e = l.insert_adapter("z", ad).unwrap_err().to_string();
        assert!(e.contains("z.lora_A") && e.contains("[1, 3]"), "{e}");
    }

    #[test]
    fn switching_active_adapter_gives_each_adapters_own_output() {
        let (mut l, _) = layer_with_adapter(8, 5, 2, 2.0, 41);
        let other = Adapter::from_tensors(&t(rand_vec(16, 42), (2, 8)), &t(rand_vec(10, 43), (5, 2)), 4.0, 2.0, 0.0).unwrap();
        l.insert_adapter("y", other).unwrap();
        let x = t(rand_vec(3 * 8, 44), (3, 8));
        let yx = l.forward(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        l.set_active(&["y"]).unwrap();
        let yy = l.forward(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        l.set_active(&["x"]).unwrap();
        let yx2 = l.forward(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_ne!(yx, yy);
        assert_eq!(yx, yx2);
        assert!(l.set_active(&["nope"]).unwrap_err().to_string().contains("nope"));
    }
}
