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
//! The base weight is held as an f32 variable, or — a checkpoint's bf16 weight, frozen — as a
//! `lora_kernels::Bf16Matrix` (half the bytes): every product reads it with the bits its f32 widening gives,
//! so the layer computes the same numbers either way. Whatever writes the base (merging, training it, an
//! adapter's copies) first widens it to an f32 variable, exactly; a weight shared with another layer (a tied
//! output embedding) is only widened for both at once ([`crate::LoraModel::widen_base`]).
//!
//! One concept per file: the layer and its adapters by name here; [`Adapter`] and [`AdapterSpec`] in
//! `adapter.rs`; an adapter's own copies of the layer's tensors in `copies.rs`; how a new adapter starts
//! in `init.rs`; merge, unmerge and exact restore in `merge.rs`; the forward in `forward.rs` (the choice of
//! path), `fused.rs` (one custom op on `lora-kernels`) and `reference.rs` (plain candle ops, with dropout);
//! the embedding table read by token id in `embedding.rs`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor, Var};
use lora_kernels::Bf16Matrix;

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

/// A layer's base weight as held.
#[derive(Debug, Clone)]
pub(crate) enum Base {
    /// f32: a variable (it can train, and merges write it).
    F32(Var),
    /// bf16 and frozen (a checkpoint's bf16 weights: half the bytes of f32, and the products read it with
    /// the bits of its f32 values). Widened to an f32 variable, exactly, when something must write it.
    Bf16(Arc<Bf16Matrix>),
}

/// Which weight a layer holds: equal for layers that share one (a variable's id, a bf16 matrix's address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum WeightKey {
    F32(candle_core::TensorId),
    Bf16(usize),
}

/// A linear layer `y = x·Wᵀ + b` with named LoRA adapters, an active set, a merged set and an off switch.
#[derive(Debug)]
pub struct LoraLinear {
    weight: Base,      // (out, in)
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
    tied: bool,      // the weight is shared with another layer (a tied output embedding)
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
        Self::with_base(Base::F32(var(weight)?), bias.map(var).transpose()?)
    }

    /// Wraps a base weight (out, in) held in bf16 (a checkpoint's bf16 tensor, read without an f32 copy) and
    /// an optional bias (out). The base is frozen: every product reads the bf16 values with the bits their
    /// f32 widening would give; what must write the weight (training it, merging into it, an adapter's copy
    /// of it) first widens it to f32, exactly.
    pub fn from_bf16(weight: Arc<Bf16Matrix>, bias: Option<Tensor>) -> Result<Self> {
        let out = weight.rows();
        if let Some(b) = &bias {
            if b.dims() != [out] {
                return Err(LoraError::Shape { tensor: "bias".into(), expected: vec![out], found: b.dims().to_vec() });
            }
        }
        let bias = bias.map(|t| -> Result<Var> { Ok(Var::from_tensor(&t.to_dtype(DType::F32)?.contiguous()?)?) }).transpose()?;
        let mut l = Self::with_base(Base::Bf16(weight), bias)?;
        l.freeze_base();
        Ok(l)
    }

    fn with_base(weight: Base, bias: Option<Var>) -> Result<Self> {
        Ok(LoraLinear {
            weight,
            bias,
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
            tied: false,
        })
    }

    /// Input features (the vocabulary size of an embedding).
    pub fn in_features(&self) -> usize {
        self.weight_dims()[if self.embedding { 0 } else { 1 }]
    }
    /// Output features (the width of an embedding).
    pub fn out_features(&self) -> usize {
        self.weight_dims()[if self.embedding { 1 } else { 0 }]
    }
    /// The stored weight's shape: (out, in), or (V, H) for an embedding.
    pub fn weight_dims(&self) -> [usize; 2] {
        match &self.weight {
            Base::F32(v) => [v.dims()[0], v.dims()[1]],
            Base::Bf16(m) => [m.rows(), m.cols()],
        }
    }

    /// An update (out, in) in the layout of the stored weight (transposed for an embedding).
    fn stored(&self, delta: Tensor) -> Result<Tensor> {
        Ok(if self.embedding { delta.t()?.contiguous()? } else { delta })
    }
    /// The weight as stored now (W0, or W0 plus merged adapters), shape (out, in), in f32: the variable's
    /// tensor itself (gradients reach it when it trains), or the bf16 weight widened (a copy, exact).
    pub fn weight(&self) -> Result<Tensor> {
        match &self.weight {
            Base::F32(v) => Ok(v.as_tensor().clone()),
            Base::Bf16(m) => Ok(Tensor::from_vec(m.to_f32(), (m.rows(), m.cols()), &Device::Cpu)?),
        }
    }
    /// The weight's variable, when it is held in f32.
    pub fn weight_var(&self) -> Option<&Var> {
        match &self.weight {
            Base::F32(v) => Some(v),
            Base::Bf16(_) => None,
        }
    }
    /// The weight held in bf16, when it is.
    pub fn weight_bf16(&self) -> Option<&Arc<Bf16Matrix>> {
        match &self.weight {
            Base::F32(_) => None,
            Base::Bf16(m) => Some(m),
        }
    }
    /// A linear layer (no bias) holding `other`'s weight itself (a tied output embedding: one tensor, two
    /// uses), in whichever form it is held, frozen when that is bf16. Both layers then refuse to widen a bf16
    /// weight alone ([`crate::LoraModel::widen_base`] widens it once for both).
    pub fn tied_to(other: &mut LoraLinear) -> Result<Self> {
        let mut l = Self::with_base(other.weight.clone(), None)?;
        if l.weight_bf16().is_some() {
            l.freeze_base();
        }
        (l.tied, other.tied) = (true, true);
        Ok(l)
    }
    /// Whether the weight is shared with another layer ([`LoraLinear::tied_to`]).
    pub fn is_tied(&self) -> bool {
        self.tied
    }
    /// A key equal for layers that hold one weight.
    pub(crate) fn weight_key(&self) -> WeightKey {
        match &self.weight {
            Base::F32(v) => WeightKey::F32(v.as_tensor().id()),
            Base::Bf16(m) => WeightKey::Bf16(Arc::as_ptr(m) as usize),
        }
    }
    /// The weight as held.
    pub(crate) fn base(&self) -> &Base {
        &self.weight
    }
    /// Marks the weight as shared with another layer.
    pub(crate) fn mark_tied(&mut self) {
        self.tied = true;
    }
    /// Holds `base` as the weight (the caller has checked that it has this layer's values).
    pub(crate) fn replace_weight(&mut self, base: Base) {
        self.weight = base;
    }
    /// The weight's variable, widening a bf16 weight to f32 first (exactly) for what must write it. Refused
    /// when the bf16 weight is shared with another layer (tied embeddings: widening one would untie them).
    pub(crate) fn writable_weight(&mut self, why: &str) -> Result<&Var> {
        if let Base::Bf16(_) = &self.weight {
            if self.tied {
                return Err(LoraError::State(format!(
                    "{why} writes the base weight, which is held in bf16 and shared with another layer (tied embeddings): \
                     widen it for both first (LoraModel::widen_base)"
                )));
            }
            let v = Var::from_tensor(&self.weight()?)?;
            self.weight = Base::F32(v);
        }
        match &self.weight {
            Base::F32(v) => Ok(v),
            Base::Bf16(_) => unreachable!("widened above"),
        }
    }
    /// The weight as the forward reads it: tracked when it trains, detached otherwise.
    pub(crate) fn weight_param(&self) -> Result<Tensor> {
        match &self.weight {
            Base::F32(v) => Ok(Self::param(v, self.weight_trainable)),
            Base::Bf16(_) => self.weight(),
        }
    }
    /// The bias (out), if any.
    pub fn bias(&self) -> Option<&Var> {
        self.bias.as_ref()
    }
    /// Sets whether the bias trains (the weight's setting unchanged).
    pub fn set_bias_trainable(&mut self, bias: bool) {
        self.bias_trainable = bias;
    }
    /// Stops gradients for weight and bias (they become constants in the graph).
    pub fn freeze_base(&mut self) {
        self.weight_trainable = false;
        self.bias_trainable = false;
    }
    /// Sets which base tensors train. A weight held in bf16 that is to train is widened to f32 first
    /// (exactly; refused when it is shared with another layer, see [`LoraLinear::tied_to`]).
    pub fn set_base_trainable(&mut self, weight: bool, bias: bool) -> Result<()> {
        if weight {
            self.writable_weight("training")?;
        }
        self.weight_trainable = weight;
        self.bias_trainable = bias;
        Ok(())
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
        if let (true, Some(w)) = (self.weight_trainable, self.weight_var()) {
            v.push(w.clone());
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
        self.weight_dims().iter().product::<usize>() + self.bias.as_ref().map_or(0, |b| b.elem_count())
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

    /// A layer with one adapter and a frozen base whose values are bf16 numbers, held in f32 and in bf16.
    fn f32_and_bf16(inp: usize, out: usize, r: usize) -> (LoraLinear, LoraLinear) {
        let (mut a, _) = layer_with_adapter(inp, out, r, 4.0, 70);
        let w: Vec<f32> = rand_vec(out * inp, 71).into_iter().map(|v| f32::from_bits(v.to_bits() & 0xFFFF_0000)).collect();
        a.restore_base(&t(w.clone(), (out, inp)), None).unwrap();
        a.freeze_base();
        let mut b =
            LoraLinear::from_bf16(Arc::new(Bf16Matrix::pack(&w, out, inp).unwrap()), Some(a.bias().unwrap().as_tensor().copy().unwrap()))
                .unwrap();
        let ad = a.adapter("x").unwrap();
        let copy =
            Adapter::from_tensors(&ad.a().as_tensor().copy().unwrap(), &ad.b().as_tensor().copy().unwrap(), ad.alpha(), ad.scale(), 0.0)
                .unwrap();
        b.insert_adapter("x", copy).unwrap();
        b.set_active(&["x"]).unwrap();
        (a, b)
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f32::to_bits).collect()
    }

    #[test]
    fn a_base_held_in_bf16_gives_the_bits_of_its_f32_values_on_both_paths_forward_and_backward() {
        // A batch (the tiles) and a decode step (the dot products), each on the fused op and the reference ops.
        for (rows, backend) in [(40, Backend::Fused), (2, Backend::Fused), (40, Backend::Reference), (2, Backend::Reference)] {
            let (mut a, mut b) = f32_and_bf16(96, 80, 4);
            a.set_backend(backend);
            b.set_backend(backend);
            let x = Var::from_tensor(&t(rand_vec(rows * 96, 72), (rows, 96))).unwrap();
            let run = |l: &LoraLinear| {
                let y = l.forward(x.as_tensor()).unwrap();
                let g = (y.sqr().unwrap().sum_all().unwrap()).backward().unwrap();
                let ad = l.adapter("x").unwrap();
                [
                    bits(&y),
                    bits(g.get(x.as_tensor()).unwrap()),
                    bits(g.get(ad.a().as_tensor()).unwrap()),
                    bits(g.get(ad.b().as_tensor()).unwrap()),
                ]
            };
            assert!(run(&a) == run(&b), "{rows} rows, {backend:?}: y, dx, dA, dB must keep their bits");
            assert_eq!(b.trainable_vars().len(), 2, "only A and B train");
        }
    }

    #[test]
    fn a_bf16_base_widens_exactly_when_written_and_refuses_to_untie_a_shared_weight() {
        let (mut a, mut b) = f32_and_bf16(40, 24, 2);
        assert!(b.weight_var().is_none());
        let x = t(rand_vec(3 * 40, 73), (3, 40));
        // Merging writes the weight: it is widened first, and the merged layer computes as the f32 one does.
        a.merge("x", true).unwrap();
        b.merge("x", true).unwrap();
        assert!(b.weight_bf16().is_none());
        assert_eq!(bits(&a.forward(&x).unwrap()), bits(&b.forward(&x).unwrap()));
        // Training the base widens it too.
        let (_, mut c) = f32_and_bf16(40, 24, 2);
        c.set_base_trainable(true, true).unwrap();
        assert_eq!(c.trainable_vars().len(), 4, "W, b, A, B");
        // A shared (tied) bf16 weight is never widened by one of its layers alone.
        let (_, mut head) = f32_and_bf16(40, 24, 2);
        let mut other = LoraLinear::tied_to(&mut head).unwrap();
        let e = head.merge("x", true).unwrap_err().to_string();
        assert!(e.contains("bf16") && e.contains("shared"), "{e}");
        assert!(other.set_base_trainable(true, false).is_err());
        // An embedding table held in bf16 reads each token's row exactly.
        let table = head.weight_bf16().unwrap().clone();
        let emb = LoraLinear::embedding_bf16(table.clone()).unwrap();
        let ids = Tensor::new(&[3u32, 0, 23], &Device::Cpu).unwrap();
        let rows = emb.embed_t(&ids, false).unwrap().to_vec2::<f32>().unwrap();
        let wide = table.to_f32();
        for (row, id) in rows.iter().zip([3, 0, 23]) {
            assert_eq!(row.as_slice(), &wide[id * 40..(id + 1) * 40]);
        }
        assert!(emb.embed_t(&Tensor::new(&[24u32], &Device::Cpu).unwrap(), false).unwrap_err().to_string().contains("token id 24"));
    }
}
