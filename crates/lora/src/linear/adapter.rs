//! [`Adapter`]: one named adapter of one layer, the pair (A (r, in), B (out, r)) with its scale s, and
//! PEFT's optional parts; [`AdapterSpec`]: how a new one starts.
//!
//! ```text
//! delta_weight = s·B·A  (− s·B0·A0 for PiSSA / OLoRA)                       (out, in)
//! DoRA:  f = m / ‖W + s·B·A‖_row, a constant of the graph                    (out)
//! lora_bias: s·b_B added to the output                                      (out)
//! ```

use candle_core::{DType, Tensor, Var};

use crate::config::Init;
use crate::error::{LoraError, Result};

/// One named adapter of one layer: the pair (A, B), its scale, and PEFT's optional parts.
#[derive(Debug)]
pub struct Adapter {
    pub(super) a: Var, // (r, in)
    pub(super) b: Var, // (out, r)
    pub(super) alpha: f64,
    pub(super) scale: f64,
    pub(super) dropout: f64,
    pub(super) magnitude: Option<Var>,            // (out): DoRA's m
    pub(super) lora_bias: Option<Var>,            // (out): the bias of B
    pub(super) initial: Option<(Tensor, Tensor)>, // PiSSA/OLoRA's frozen (A0 (r, in), B0 (out, r))
}

/// How [`crate::LoraLinear::add_adapter`] builds a new adapter (one module's share of a [`crate::LoraConfig`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdapterSpec {
    /// Rank r (≥ 1).
    pub rank: usize,
    /// Alpha as configured.
    pub alpha: f64,
    /// The factor s on the update.
    pub scale: f64,
    /// Dropout on the adapter's input while training.
    pub dropout: f64,
    /// How A and B start.
    pub init: Init,
    /// DoRA: add a magnitude vector.
    pub use_dora: bool,
    /// Give B a bias.
    pub lora_bias: bool,
}

impl AdapterSpec {
    /// A plain adapter: rank, alpha, scale; no dropout, the seed's initialisation, no variant.
    pub fn new(rank: usize, alpha: f64, scale: f64) -> Self {
        AdapterSpec { rank, alpha, scale, dropout: 0.0, init: Init::Normal, use_dora: false, lora_bias: false }
    }
}

impl Adapter {
    /// An adapter from explicit A (r, in) and B (out, r); `scale` is the factor applied to `B·A`.
    pub fn from_tensors(a: &Tensor, b: &Tensor, alpha: f64, scale: f64, dropout: f64) -> Result<Self> {
        let (r, _) = a.dims2()?;
        let (_, rb) = b.dims2()?;
        if rb != r {
            return Err(LoraError::Shape { tensor: "lora_B".into(), expected: vec![b.dim(0)?, r], found: b.dims().to_vec() });
        }
        let a = Var::from_tensor(&a.to_dtype(DType::F32)?.contiguous()?.copy()?)?;
        let b = Var::from_tensor(&b.to_dtype(DType::F32)?.contiguous()?.copy()?)?;
        Ok(Adapter { a, b, alpha, scale, dropout, magnitude: None, lora_bias: None, initial: None })
    }

    fn out_vector(&self, t: &Tensor, what: &str) -> Result<Var> {
        let out = self.b.dims()[0];
        if t.dims() != [out] {
            return Err(LoraError::Shape { tensor: what.into(), expected: vec![out], found: t.dims().to_vec() });
        }
        Ok(Var::from_tensor(&t.to_dtype(DType::F32)?.contiguous()?.copy()?)?)
    }

    /// Makes this a DoRA adapter with magnitude `m` (out).
    pub fn with_magnitude(mut self, m: &Tensor) -> Result<Self> {
        if self.initial.is_some() || self.lora_bias.is_some() {
            return Err(LoraError::config("use_dora", true, "is not supported with lora_bias, PiSSA or OLoRA"));
        }
        self.magnitude = Some(self.out_vector(m, "lora_magnitude_vector")?);
        Ok(self)
    }

    /// Gives B a bias `b` (out) (PEFT's `lora_bias`).
    pub fn with_lora_bias(mut self, b: &Tensor) -> Result<Self> {
        if self.magnitude.is_some() {
            return Err(LoraError::config("lora_bias", true, "is not supported together with use_dora (as in PEFT)"));
        }
        self.lora_bias = Some(self.out_vector(b, "lora_B.bias")?);
        Ok(self)
    }

    /// Records the frozen starting factors (A0 (r, in), B0 (out, r)) of a PiSSA/OLoRA adapter: the base it
    /// works on is W0 − s·B0·A0.
    pub fn with_initial(mut self, a0: &Tensor, b0: &Tensor) -> Result<Self> {
        if a0.dims() != self.a.dims() || b0.dims() != self.b.dims() {
            return Err(LoraError::Shape {
                tensor: "initial lora_A / lora_B".into(),
                expected: self.a.dims().to_vec(),
                found: a0.dims().to_vec(),
            });
        }
        if self.magnitude.is_some() {
            return Err(LoraError::config("use_dora", true, "is not supported with PiSSA or OLoRA in lora-rs"));
        }
        let c = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::F32)?.contiguous()?.copy()?) };
        self.initial = Some((c(a0)?, c(b0)?));
        Ok(self)
    }
    /// A (r, in).
    pub fn a(&self) -> &Var {
        &self.a
    }
    /// B (out, r).
    pub fn b(&self) -> &Var {
        &self.b
    }
    /// The rank r.
    pub fn rank(&self) -> usize {
        self.a.dim(0).unwrap_or(0)
    }
    /// Alpha as configured.
    pub fn alpha(&self) -> f64 {
        self.alpha
    }
    /// The factor s applied to `B·A`.
    pub fn scale(&self) -> f64 {
        self.scale
    }
    /// Dropout probability on the adapter's input during training.
    pub fn dropout(&self) -> f64 {
        self.dropout
    }
    /// DoRA's magnitude m (out), when this is a DoRA adapter.
    pub fn magnitude(&self) -> Option<&Var> {
        self.magnitude.as_ref()
    }
    /// The bias of B (out), when the adapter has one.
    pub fn lora_bias(&self) -> Option<&Var> {
        self.lora_bias.as_ref()
    }
    /// PiSSA/OLoRA's frozen starting factors (A0, B0).
    pub fn initial(&self) -> Option<(&Tensor, &Tensor)> {
        self.initial.as_ref().map(|(a, b)| (a, b))
    }
    /// Whether this adapter is plain LoRA (no DoRA, no LoRA bias, no PiSSA/OLoRA starting point).
    pub fn is_plain(&self) -> bool {
        self.magnitude.is_none() && self.lora_bias.is_none() && self.initial.is_none()
    }
    /// `s·B·A` (minus `s·B0·A0` for PiSSA/OLoRA), shape (out, in): the change this adapter's factors make to
    /// the weight (DoRA's rescaling and the LoRA bias are not part of it).
    pub fn delta_weight(&self) -> Result<Tensor> {
        let mut ba = self.b.as_tensor().matmul(self.a.as_tensor())?;
        if let Some((a0, b0)) = &self.initial {
            ba = (ba - b0.matmul(a0)?)?;
        }
        Ok((ba * self.scale)?)
    }
    /// DoRA's per-row factor `f = m / ‖W + s·B·A‖_row` (out) on weight `w` (out, in), as a constant.
    pub fn dora_factor(&self, w: &Tensor) -> Result<Option<Tensor>> {
        let Some(m) = &self.magnitude else { return Ok(None) };
        Ok(Some((m.as_tensor() / self.dora_norm(w)?)?))
    }
    /// `‖W + s·B·A‖` of each row of the weight the adapter would make from `w` (out, in), detached.
    pub(super) fn dora_norm(&self, w: &Tensor) -> Result<Tensor> {
        let ba = (self.b.as_detached_tensor().matmul(&self.a.as_detached_tensor())? * self.scale)?;
        Ok((w.detach() + ba)?.sqr()?.sum(1)?.sqrt()?)
    }
    /// Trainable parameter count `r·(in + out)` (plus out for a magnitude or a LoRA bias).
    pub fn num_params(&self) -> usize {
        self.a.elem_count()
            + self.b.elem_count()
            + self.magnitude.as_ref().map_or(0, |m| m.elem_count())
            + self.lora_bias.as_ref().map_or(0, |b| b.elem_count())
    }
}
