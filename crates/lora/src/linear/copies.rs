//! An adapter's own copies of a layer's tensors: PEFT's `modules_to_save` (weight and bias) and trained
//! biases (`bias = "all"` / `"lora_only"`). While the adapter is active and unmerged the layer computes with
//! its copies in place of W0 and b; the base copies stay untouched, so other adapters see the original.
//!
//! ```text
//! active, unmerged:  y = x·W_copyᵀ + b_copy (+ the adapter's delta)        the layer's slots hold W0, b
//! merged:            the slots hold W_copy, b_copy (+ the merged delta)     W0, b kept aside bit for bit
//! unmerged again / restore_base:  the slots get W0, b back
//! ```
//!
//! The copies themselves are never written by a merge, an unmerge or a restore: an adapter keeps its
//! trained values through all three.

use candle_core::{DType, Tensor, Var};

use super::LoraLinear;
use crate::error::{LoraError, Result};

/// An adapter's own copies of a layer's weight and/or bias (PEFT's `modules_to_save` and trained biases).
#[derive(Debug)]
pub(super) struct Override {
    pub(super) weight: Option<Var>, // (out, in)
    pub(super) bias: Option<Var>,   // (out)
}

impl Override {
    pub(super) fn vars(&self) -> impl Iterator<Item = &Var> {
        [self.weight.as_ref(), self.bias.as_ref()].into_iter().flatten()
    }
}

/// The layer's own tensors that a merged adapter's copies took the place of, exact copies.
#[derive(Debug)]
pub(super) struct Displaced {
    weight: Option<Tensor>, // (out, in)
    bias: Option<Tensor>,   // (out)
}

impl LoraLinear {
    /// Gives adapter `name` its own copy of this layer's weight (out, in) and/or bias (out): while the adapter
    /// is active the layer computes with them instead of its own (PEFT's `modules_to_save` and trained biases).
    pub fn insert_override(&mut self, name: &str, weight: Option<&Tensor>, bias: Option<&Tensor>) -> Result<()> {
        if self.overrides.contains_key(name) {
            return Err(LoraError::DuplicateAdapter(name.to_string()));
        }
        if self.adapters.get(name).is_some_and(|ad| ad.magnitude.is_some() && weight.is_some()) {
            return Err(LoraError::config("use_dora", true, "cannot be combined with a trained copy of the same layer (modules_to_save)"));
        }
        let copy = |t: &Tensor, what: &str, want: &[usize]| -> Result<Var> {
            if t.dims() != want {
                return Err(LoraError::Shape { tensor: format!("{name}.{what}"), expected: want.to_vec(), found: t.dims().to_vec() });
            }
            Ok(Var::from_tensor(&t.to_dtype(DType::F32)?.contiguous()?.copy()?)?)
        };
        if bias.is_some() && self.bias.is_none() {
            return Err(LoraError::State(format!("adapter {name:?} brings a bias for a layer without one")));
        }
        let weight = weight.map(|w| copy(w, "weight", &self.weight_dims())).transpose()?;
        let bias = bias.map(|b| copy(b, "bias", &[self.out_features()])).transpose()?;
        self.overrides.insert(name.to_string(), Override { weight, bias });
        Ok(())
    }

    /// Adapter `name`'s own copies of this layer's (weight, bias), when it has any.
    pub fn override_of(&self, name: &str) -> Option<(Option<&Var>, Option<&Var>)> {
        self.overrides.get(name).map(|o| (o.weight.as_ref(), o.bias.as_ref()))
    }
    /// The copies of an active, unmerged adapter that replace this layer's own tensors now, if any.
    pub(crate) fn active_override(&self) -> Option<(Option<&Var>, Option<&Var>)> {
        if self.disabled {
            return None;
        }
        self.active.iter().filter(|n| !self.merged.contains(n)).find_map(|n| self.override_of(n))
    }

    /// Puts adapter `name`'s copies into the layer's slots, keeping the tensors they displace (exact copies)
    /// for [`LoraLinear::put_back_displaced`]. The adapter's copies are not changed.
    pub(super) fn swap_in_copies(&mut self, name: &str) -> Result<()> {
        let ov = self.overrides.get(name).ok_or_else(|| self.unknown(name))?;
        let (w, b) = (ov.weight.as_ref().map(|w| w.as_tensor().copy()).transpose()?, ov.bias.clone());
        let mut displaced = Displaced { weight: None, bias: None };
        if let Some(w) = w {
            let own = self.writable_weight("merging an adapter's copy of the layer")?;
            displaced.weight = Some(own.as_tensor().copy()?);
            own.set(&w)?;
        }
        if let (Some(b), Some(own)) = (&b, &self.bias) {
            displaced.bias = Some(own.as_tensor().copy()?);
            own.set(&b.as_tensor().copy()?)?;
        }
        self.displaced = Some(displaced);
        Ok(())
    }

    /// Puts the tensors a merged adapter's copies displaced back into the layer's slots (bit-exact).
    pub(super) fn put_back_displaced(&mut self) -> Result<()> {
        if let Some(d) = self.displaced.take() {
            if let Some(w) = d.weight {
                self.writable_weight("restoring the base")?.set(&w)?;
            }
            if let (Some(b), Some(own)) = (d.bias, &self.bias) {
                own.set(&b)?;
            }
        }
        Ok(())
    }
}
