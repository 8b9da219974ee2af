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

use std::collections::BTreeMap;
use std::sync::Mutex;

use candle_core::{DType, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

use crate::config::Init;
use crate::decompose::{qr, svd, Dense};
use crate::error::{LoraError, Result};

/// One named adapter of one layer: the pair (A, B), its scale, and PEFT's optional parts.
#[derive(Debug)]
pub struct Adapter {
    a: Var, // (r, in)
    b: Var, // (out, r)
    alpha: f64,
    scale: f64,
    dropout: f64,
    magnitude: Option<Var>,            // (out): DoRA's m
    lora_bias: Option<Var>,            // (out): the bias of B
    initial: Option<(Tensor, Tensor)>, // PiSSA/OLoRA's frozen (A0 (r, in), B0 (out, r))
}

/// An adapter's own copies of a layer's weight and/or bias (PEFT's `modules_to_save` and trained biases).
#[derive(Debug)]
struct Override {
    weight: Option<Var>, // (out, in)
    bias: Option<Var>,   // (out)
}

impl Override {
    fn vars(&self) -> impl Iterator<Item = &Var> {
        [self.weight.as_ref(), self.bias.as_ref()].into_iter().flatten()
    }
}

/// How [`LoraLinear::add_adapter`] builds a new adapter (one module's share of a [`crate::LoraConfig`]).
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
    fn dora_norm(&self, w: &Tensor) -> Result<Tensor> {
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

/// Which implementation a [`LoraLinear`] uses for its forward and backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// One fused custom op per layer on the CPU where the layer's state allows it (f32, at most one
    /// active unmerged adapter, no dropout while training, base either frozen or trained without
    /// adapters); otherwise the reference path. The default.
    #[default]
    Fused,
    /// Plain candle tensor ops and candle's autograd: the reference the fused ops are tested against.
    Reference,
}

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
    rng: Mutex<StdRng>,
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
            active: Vec::new(),
            merged: Vec::new(),
            dora_norms: BTreeMap::new(),
            disabled: false,
            rng: Mutex::new(StdRng::seed_from_u64(0)),
            backend: Backend::default(),
            embedding: false,
        })
    }

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
    /// Seeds the generator used for adapter dropout.
    pub fn seed_dropout(&self, seed: u64) {
        if let Ok(mut g) = self.rng.lock() {
            *g = StdRng::seed_from_u64(seed);
        }
    }

    /// Adds a new adapter started as `spec.init` says (see [`Init`]), drawing from `rng`. Every
    /// initialisation but [`Init::Random`] leaves the layer's output unchanged.
    pub fn add_adapter<R: Rng + ?Sized>(&mut self, name: &str, spec: AdapterSpec, rng: &mut R) -> Result<()> {
        let rank = spec.rank;
        if rank == 0 {
            return Err(LoraError::config("r", rank, "rank must be at least 1"));
        }
        let (out, inp) = (self.out_features(), self.in_features());
        let dev = self.weight.device().clone();
        let uniform = |n: usize, bound: f64, rng: &mut R| -> Vec<f32> {
            (0..n).map(|_| ((rng.random::<f64>() * 2.0 - 1.0) * bound) as f32).collect()
        };
        let normal = |n: usize, std: f32, rng: &mut R| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    let z: f32 = StandardNormal.sample(rng);
                    std * z
                })
                .collect()
        };
        let zeros = |n: usize| vec![0f32; n];
        if self.embedding && (spec.use_dora || spec.lora_bias || spec.init.rewrites_base()) {
            return Err(LoraError::config(
                "target_modules",
                name,
                "an embedding layer takes plain LoRA only (no DoRA, LoRA bias, PiSSA or OLoRA in lora-rs)",
            ));
        }
        let (a, b, initial) = match spec.init {
            // PEFT's embedding adapters: A = 0 and B ~ N(0, 1), or both N(0, 1) uninitialised (false).
            _ if self.embedding && spec.init == Init::Random => (normal(rank * inp, 1.0, rng), normal(out * rank, 1.0, rng), false),
            _ if self.embedding => (zeros(rank * inp), normal(out * rank, 1.0, rng), false),
            Init::Normal => (normal(rank * inp, 1.0, rng), zeros(out * rank), false),
            Init::PeftGaussian => (normal(rank * inp, 1.0 / rank as f32, rng), zeros(out * rank), false),
            Init::Kaiming => (uniform(rank * inp, 1.0 / (inp as f64).sqrt(), rng), zeros(out * rank), false),
            Init::Random => {
                (uniform(rank * inp, 1.0 / (inp as f64).sqrt(), rng), uniform(out * rank, 1.0 / (rank as f64).sqrt(), rng), false)
            }
            Init::Pissa { .. } | Init::Olora => {
                let (a, b) = self.factor_init(spec)?;
                (a, b, true)
            }
        };
        let (a, b) = (Tensor::from_vec(a, (rank, inp), &dev)?, Tensor::from_vec(b, (out, rank), &dev)?);
        let mut ad = Adapter::from_tensors(&a, &b, spec.alpha, spec.scale, spec.dropout)?;
        if initial {
            ad = ad.with_initial(&a, &b)?;
        }
        if spec.lora_bias {
            let v = if spec.init == Init::Random { uniform(out, 1.0 / (rank as f64).sqrt(), rng) } else { zeros(out) };
            ad = ad.with_lora_bias(&Tensor::from_vec(v, out, &dev)?)?;
        }
        if spec.use_dora {
            if !self.merged.is_empty() {
                return Err(LoraError::State(format!(
                    "cannot add DoRA adapter {name:?} while {:?} are merged: unmerge first",
                    self.merged
                )));
            }
            let norm = ad.dora_norm(self.weight.as_tensor())?;
            ad = ad.with_magnitude(&norm)?;
        }
        self.insert_adapter(name, ad)
    }

    /// PiSSA's or OLoRA's starting factors (A0 (r, in), B0 (out, r)) for `spec` from the weight as stored now.
    pub fn initial_factors(&self, spec: AdapterSpec) -> Result<(Tensor, Tensor)> {
        let (a, b) = self.factor_init(spec)?;
        let dev = self.weight.device();
        Ok((Tensor::from_vec(a, (spec.rank, self.in_features()), dev)?, Tensor::from_vec(b, (self.out_features(), spec.rank), dev)?))
    }

    fn factor_init(&self, spec: AdapterSpec) -> Result<(Vec<f32>, Vec<f32>)> {
        let (out, inp, r) = (self.out_features(), self.in_features(), spec.rank);
        if r > out.min(inp) {
            return Err(LoraError::config("r", r, format!("{:?} needs r ≤ min(out, in) = {}", spec.init, out.min(inp))));
        }
        let w = Dense::from_f32(&self.weight.as_tensor().flatten_all()?.to_vec1::<f32>()?, out, inp);
        let mut a = Vec::with_capacity(r * inp);
        let mut b = vec![0f32; out * r];
        match spec.init {
            Init::Olora => {
                let (q, rr) = qr(&w);
                a.extend(rr.data[..r * inp].iter().map(|&v| v as f32));
                for i in 0..out {
                    for k in 0..r {
                        b[i * r + k] = q.data[i * q.cols + k] as f32;
                    }
                }
            }
            _ => {
                // W = U·S·Vᵀ; S_r ← S_r / s; A = √S_r·V_rᵀ, B = U_r·√S_r, so s·B·A = U_r·S_r·V_rᵀ.
                let (u, sv, vt) = svd(&w, r);
                let root: Vec<f64> = sv.iter().map(|x| (x / spec.scale).sqrt()).collect();
                for k in 0..r {
                    a.extend(vt.data[k * inp..(k + 1) * inp].iter().map(|&v| (v * root[k]) as f32));
                }
                for i in 0..out {
                    for k in 0..r {
                        b[i * r + k] = (u.data[i * r + k] * root[k]) as f32;
                    }
                }
            }
        }
        Ok((a, b))
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
        let weight = weight.map(|w| copy(w, "weight", self.weight.dims())).transpose()?;
        let bias = bias.map(|b| copy(b, "bias", &[self.out_features()])).transpose()?;
        self.overrides.insert(name.to_string(), Override { weight, bias });
        Ok(())
    }

    /// Adapter `name`'s own copies of this layer's (weight, bias), when it has any.
    pub fn override_of(&self, name: &str) -> Option<(Option<&Var>, Option<&Var>)> {
        self.overrides.get(name).map(|o| (o.weight.as_ref(), o.bias.as_ref()))
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

    /// The copies of an active, unmerged adapter that replace this layer's own tensors now, if any.
    pub(crate) fn active_override(&self) -> Option<(Option<&Var>, Option<&Var>)> {
        if self.disabled {
            return None;
        }
        self.active.iter().filter(|n| !self.merged.contains(n)).find_map(|n| self.override_of(n))
    }

    fn param(var: &Var, trainable: bool) -> Tensor {
        if trainable {
            var.as_tensor().clone()
        } else {
            var.as_detached_tensor()
        }
    }

    /// Which implementation forward and backward use (default [`Backend::Fused`]).
    pub fn backend(&self) -> Backend {
        self.backend
    }
    /// Chooses the implementation of forward and backward; both give the same function.
    pub fn set_backend(&mut self, backend: Backend) {
        self.backend = backend;
    }

    /// The plain-candle forward (tensor ops and candle's autograd): the reference for the fused path.
    pub fn forward_reference_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if self.embedding {
            return Err(LoraError::State("an embedding layer reads token ids: use embed_t".into()));
        }
        let dims = x.dims().to_vec();
        let inp = *dims.last().ok_or_else(|| LoraError::State("input is a scalar".into()))?;
        if inp != self.in_features() {
            return Err(LoraError::Shape { tensor: "input".into(), expected: vec![self.in_features()], found: dims });
        }
        let x2 = x.reshape(((), inp))?; // (batch, in)
        let (ow, ob) = self.active_override().unwrap_or((None, None));
        let w = match ow {
            Some(w) => w.as_tensor().clone(),
            None => Self::param(&self.weight, self.weight_trainable),
        };
        let xw = x2.matmul(&w.t()?)?; // (batch, out)
        let mut y = xw.clone();
        match (ob, &self.bias) {
            (Some(b), _) => y = y.broadcast_add(b.as_tensor())?,
            (None, Some(b)) => y = y.broadcast_add(&Self::param(b, self.bias_trainable))?,
            (None, None) => {}
        }
        if !self.disabled {
            for name in self.active.iter().filter(|n| !self.merged.contains(n)) {
                let Some(ad) = self.adapters.get(name) else { continue };
                let dropped = train && ad.dropout > 0.0;
                let xin = if dropped { self.dropout(&x2, ad.dropout)? } else { x2.clone() };
                let xa = xin.matmul(&ad.a.as_tensor().t()?)?; // (batch, r)
                let d = xa.matmul(&ad.b.as_tensor().t()?)?; // (batch, out)
                if let Some(f) = ad.dora_factor(self.weight.as_tensor())? {
                    // (f − 1)⊙(drop(x)·W0ᵀ) + f⊙s·delta, as PEFT's DoraLinearLayer.
                    let base = if dropped { xin.matmul(&w.t()?)? } else { xw.clone() };
                    y = (y + base.broadcast_mul(&(&f - 1.0)?)? + d.broadcast_mul(&(f * ad.scale)?)?)?;
                    continue;
                }
                y = (y + (d * ad.scale)?)?;
                if let Some(lb) = &ad.lora_bias {
                    y = y.broadcast_add(&(lb.as_tensor() * ad.scale)?)?;
                }
                if let Some((a0, b0)) = &ad.initial {
                    // The residual base W0 − s·B0·A0, on the undropped input as PEFT's rewritten base layer.
                    y = (y - (x2.matmul(&a0.t()?)?.matmul(&b0.t()?)? * ad.scale)?)?;
                }
            }
        }
        let mut out_dims = x.dims().to_vec();
        *out_dims.last_mut().unwrap_or(&mut 0) = self.out_features();
        Ok(y.reshape(out_dims)?)
    }

    fn dropout(&self, x: &Tensor, p: f64) -> Result<Tensor> {
        let n = x.elem_count();
        let keep = 1.0 / (1.0 - p) as f32;
        let mask: Vec<f32> = {
            let mut g = self.rng.lock().map_err(|_| LoraError::State("dropout generator poisoned".into()))?;
            (0..n).map(|_| if g.random::<f64>() < p { 0.0 } else { keep }).collect()
        };
        Ok((x * Tensor::from_vec(mask, x.shape(), x.device())?)?)
    }

    /// The weight the layer applies now: W + Σ s·B·A over active, unmerged adapters (W alone when disabled).
    /// Shape (out, in). For proofs and export; training never forms it.
    pub fn effective_weight(&self) -> Result<Tensor> {
        let mut w = match self.active_override() {
            Some((Some(w), _)) => w.as_tensor().copy()?,
            _ => self.weight.as_tensor().copy()?,
        };
        if !self.disabled {
            for name in self.active.iter().filter(|n| !self.merged.contains(n)) {
                let ad = self.adapter(name)?;
                let f = ad.dora_factor(self.weight.as_tensor())?;
                w = (w + self.stored(ad.delta_weight()?)?)?;
                if let Some(f) = f {
                    w = w.broadcast_mul(&f.unsqueeze(1)?)?;
                }
            }
        }
        Ok(w)
    }

    /// Folds adapter `name` into the weight: W ← W + s·B·A (DoRA: W ← f ⊙ (W + s·B·A); a LoRA bias goes
    /// into the bias, b ← b + s·b_B). With `safe`, the new tensors are checked for NaN/Inf before they are
    /// written, and the layer is left unchanged on error.
    pub fn merge(&mut self, name: &str, safe: bool) -> Result<()> {
        if self.merged.iter().any(|m| m == name) {
            return Err(LoraError::State(format!("adapter {name:?} is already merged")));
        }
        if let Some(m) = self.merged.iter().find(|m| self.overrides.contains_key(*m)) {
            return Err(LoraError::State(format!(
                "cannot merge {name:?} on top of {m:?}, whose copy of this layer is merged: unmerge it first"
            )));
        }
        if !self.has_adapter(name) {
            return Err(self.unknown(name));
        }
        let copies = self.overrides.contains_key(name);
        if copies {
            // The adapter's copies of this layer's tensors: merging swaps them in (unmerge swaps them back,
            // exactly); the LoRA pair, if any, then merges on top.
            if !self.merged.is_empty() {
                return Err(LoraError::State(format!("cannot merge adapter {name:?} while {:?} are merged: unmerge first", self.merged)));
            }
            let ov = &self.overrides[name];
            if safe && !ov.vars().map(|v| all_finite(v.as_tensor())).collect::<Result<Vec<_>>>()?.into_iter().all(|ok| ok) {
                return Err(LoraError::NonFinite { tensor: format!("layer copy of {name}") });
            }
            self.swap_override(name)?;
        }
        if self.adapters.contains_key(name) {
            if let Err(e) = self.merge_pair(name, safe) {
                if copies {
                    self.swap_override(name)?;
                }
                return Err(e);
            }
        }
        self.merged.push(name.to_string());
        Ok(())
    }

    fn merge_pair(&mut self, name: &str, safe: bool) -> Result<()> {
        let ad = self.adapter(name)?;
        let mut new = (self.weight.as_tensor() + self.stored(ad.delta_weight()?)?)?;
        let mut norm = None;
        if ad.magnitude.is_some() {
            if self.merged.iter().any(|m| m != name) {
                return Err(LoraError::State(format!(
                    "cannot merge DoRA adapter {name:?} while {:?} are merged: unmerge first",
                    self.merged
                )));
            }
            let n = ad.dora_norm(self.weight.as_tensor())?;
            let f =
                ad.magnitude.as_ref().map(|m| m.as_tensor() / &n).transpose()?.ok_or_else(|| LoraError::State("no magnitude".into()))?;
            new = new.broadcast_mul(&f.unsqueeze(1)?)?;
            norm = Some(n);
        }
        let new_bias = match (&ad.lora_bias, &self.bias) {
            (None, _) => None,
            (Some(lb), Some(b)) => Some((b.as_tensor() + (lb.as_tensor() * ad.scale)?)?),
            (Some(_), None) => {
                return Err(LoraError::State(format!(
                    "cannot merge adapter {name:?}: it has a LoRA bias and the layer has no bias (as in PEFT)"
                )))
            }
        };
        if safe && (!all_finite(&new)? || !new_bias.as_ref().map_or(Ok(true), all_finite)?) {
            return Err(LoraError::NonFinite { tensor: format!("weight merged with {name}") });
        }
        self.weight.set(&new)?;
        if let (Some(nb), Some(b)) = (new_bias, &self.bias) {
            b.set(&nb)?;
        }
        if let Some(n) = norm {
            self.dora_norms.insert(name.to_string(), n);
        }
        Ok(())
    }

    /// Takes a merged adapter back out: W ← W − s·B·A (DoRA: W ← W / f − s·B·A with the merge's norm; a
    /// LoRA bias: b ← b − s·b_B). Exact up to float rounding of one add and one subtract per element
    /// (|error| ≤ ulp(|W| + |s·B·A|)); use a saved copy of W0 where bits matter.
    pub fn unmerge(&mut self, name: &str) -> Result<()> {
        let pos = self.merged.iter().position(|m| m == name).ok_or_else(|| LoraError::State(format!("adapter {name:?} is not merged")))?;
        if !self.adapters.contains_key(name) {
            self.swap_override(name)?;
            self.merged.remove(pos);
            return Ok(());
        }
        let ad = self.adapter(name)?;
        let mut w = self.weight.as_tensor().clone();
        if let (Some(m), Some(n)) = (&ad.magnitude, self.dora_norms.get(name)) {
            w = w.broadcast_div(&(m.as_tensor() / n)?.unsqueeze(1)?)?;
        }
        let new = (w - self.stored(ad.delta_weight()?)?)?;
        let new_bias = match (&ad.lora_bias, &self.bias) {
            (Some(lb), Some(b)) => Some((b.as_tensor() - (lb.as_tensor() * ad.scale)?)?),
            _ => None,
        };
        self.weight.set(&new)?;
        if let (Some(nb), Some(b)) = (new_bias, &self.bias) {
            b.set(&nb)?;
        }
        self.dora_norms.remove(name);
        if self.overrides.contains_key(name) {
            self.swap_override(name)?;
        }
        self.merged.remove(pos);
        Ok(())
    }

    /// Exchanges the layer's tensors with adapter `name`'s copies (bit-exact both ways).
    fn swap_override(&mut self, name: &str) -> Result<()> {
        let ov = self.overrides.get(name).ok_or_else(|| self.unknown(name))?;
        if let Some(w) = &ov.weight {
            let base = self.weight.as_tensor().copy()?;
            self.weight.set(&w.as_tensor().copy()?)?;
            w.set(&base)?;
        }
        if let (Some(b), Some(own)) = (&ov.bias, &self.bias) {
            let base = own.as_tensor().copy()?;
            own.set(&b.as_tensor().copy()?)?;
            b.set(&base)?;
        }
        Ok(())
    }

    /// Replaces the stored weight (and bias) with exact copies, forgetting merges: the exact-restore path.
    pub fn restore_base(&mut self, weight: &Tensor, bias: Option<&Tensor>) -> Result<()> {
        if weight.dims() != self.weight.dims() {
            return Err(LoraError::Shape { tensor: "weight".into(), expected: self.weight.dims().to_vec(), found: weight.dims().to_vec() });
        }
        // A merged copy sits in the layer and the base in its slot: put the copy back first.
        let swapped: Vec<String> =
            self.merged.iter().filter(|n| self.overrides.contains_key(*n) && !self.adapters.contains_key(*n)).cloned().collect();
        for name in &swapped {
            self.swap_override(name)?;
        }
        self.weight.set(weight)?;
        if let (Some(b), Some(src)) = (&self.bias, bias) {
            b.set(src)?;
        }
        self.merged.clear();
        self.dora_norms.clear();
        Ok(())
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

/// True when every element of `t` is finite.
pub(crate) fn all_finite(t: &Tensor) -> Result<bool> {
    Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?.iter().all(|x| x.is_finite()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Deterministic pseudo-random values in [-1, 1) (no shared generator: each test gets its own).
    fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut g = StdRng::seed_from_u64(seed);
        (0..n).map(|_| g.random::<f32>() * 2.0 - 1.0).collect()
    }

    fn t(v: Vec<f32>, shape: (usize, usize)) -> Tensor {
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// Plain triple loops in f64: an independent reference that shares no code with candle.
    #[allow(clippy::too_many_arguments)]
    fn reference(x: &[f32], w: &[f32], b: &[f32], a: &[f32], bb: &[f32], s: f64, n: usize, inp: usize, out: usize, r: usize) -> Vec<f64> {
        let mut y = vec![0f64; n * out];
        for i in 0..n {
            let mut xa = vec![0f64; r];
            for k in 0..r {
                xa[k] = (0..inp).map(|j| x[i * inp + j] as f64 * a[k * inp + j] as f64).sum();
            }
            for o in 0..out {
                let base: f64 = (0..inp).map(|j| x[i * inp + j] as f64 * w[o * inp + j] as f64).sum::<f64>() + b[o] as f64;
                let delta: f64 = (0..r).map(|k| xa[k] * bb[o * r + k] as f64).sum();
                y[i * out + o] = base + s * delta;
            }
        }
        y
    }

    fn layer_with_adapter(n_in: usize, n_out: usize, r: usize, alpha: f64, seed: u64) -> (LoraLinear, Vec<Vec<f32>>) {
        let w = rand_vec(n_out * n_in, seed);
        let b = rand_vec(n_out, seed + 1);
        let a = rand_vec(r * n_in, seed + 2);
        let bb = rand_vec(n_out * r, seed + 3);
        let mut l = LoraLinear::new(t(w.clone(), (n_out, n_in)), Some(Tensor::from_vec(b.clone(), n_out, &Device::Cpu).unwrap())).unwrap();
        let ad = Adapter::from_tensors(&t(a.clone(), (r, n_in)), &t(bb.clone(), (n_out, r)), alpha, alpha / r as f64, 0.0).unwrap();
        l.insert_adapter("x", ad).unwrap();
        l.set_active(&["x"]).unwrap();
        (l, vec![w, b, a, bb])
    }

    #[test]
    fn forward_matches_an_independent_loop_reference_with_alpha_not_equal_to_rank() {
        let (n, inp, out, r, alpha) = (5, 13, 7, 3, 5.0);
        let (l, p) = layer_with_adapter(inp, out, r, alpha, 1);
        let x = rand_vec(n * inp, 99);
        let y = l.forward(&t(x.clone(), (n, inp))).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want = reference(&x, &p[0], &p[1], &p[2], &p[3], alpha / r as f64, n, inp, out, r);
        // f32 dot products of length ≤ 13 with |terms| ≤ 1: rounding error well under 1e-5.
        for (g, w) in y.iter().zip(&want) {
            assert!((*g as f64 - w).abs() < 1e-5, "{g} vs {w}");
        }
    }

    #[test]
    fn only_the_delta_is_scaled_not_the_base_output() {
        // With B·A removed (disabled), output must be exactly x·Wᵀ + b whatever alpha is.
        let (mut l, p) = layer_with_adapter(4, 3, 2, 7.0, 3);
        l.set_disabled(true).unwrap();
        let x = rand_vec(2 * 4, 5);
        let y = l.forward(&t(x.clone(), (2, 4))).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want = reference(&x, &p[0], &p[1], &p[2], &[0.0; 6], 0.0, 2, 4, 3, 2);
        for (g, w) in y.iter().zip(&want) {
            assert!((*g as f64 - w).abs() < 1e-6);
        }
    }

    #[test]
    fn zero_b_leaves_outputs_bit_identical() {
        let w = rand_vec(6 * 9, 7);
        let mut l = LoraLinear::new(t(w, (6, 9)), None).unwrap();
        let x = t(rand_vec(4 * 9, 8), (4, 9));
        let before = l.forward(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        l.add_adapter("n", AdapterSpec::new(3, 2.0, 2.0 / 3.0), &mut StdRng::seed_from_u64(1)).unwrap();
        l.set_active(&["n"]).unwrap();
        let after = l.forward(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(before, after); // y + s·0 adds exact zeros
        assert!(l.adapter("n").unwrap().a().flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().any(|v| *v != 0.0));
    }

    #[test]
    fn gradients_of_a_and_b_match_finite_differences() {
        let (n, inp, out, r, alpha) = (3, 6, 4, 2, 3.0);
        let (mut l, _) = layer_with_adapter(inp, out, r, alpha, 11);
        l.freeze_base();
        let x = t(rand_vec(n * inp, 12), (n, inp));
        let c = t(rand_vec(n * out, 13), (n, out)); // loss = Σ c ⊙ y² / 2: non-linear in A and B
        let loss = |l: &LoraLinear| -> f64 {
            let y = l.forward(&x).unwrap().to_dtype(DType::F64).unwrap();
            (y.sqr().unwrap() * c.to_dtype(DType::F64).unwrap()).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap() / 2.0
        };
        let y = l.forward(&x).unwrap();
        let grads = ((y.sqr().unwrap() * &c).unwrap().sum_all().unwrap() / 2.0).unwrap().backward().unwrap();
        assert!(grads.get(l.weight().as_tensor()).is_none(), "frozen W0 got a gradient");
        let ad = l.adapter("x").unwrap();
        for var in [ad.a().clone(), ad.b().clone()] {
            let g = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let v0 = var.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for i in 0..v0.len() {
                // Central differences in f32 weights with h = 1e-2: truncation O(h²) ≈ 1e-4 times the third
                // derivative, plus f32 rounding of the loss ≈ 1e-6/h; 2e-3 relative + 2e-3 absolute covers both.
                let h = 1e-2f32;
                let mut v = v0.clone();
                v[i] += h;
                var.set(&Tensor::from_vec(v.clone(), var.shape(), &Device::Cpu).unwrap()).unwrap();
                let lp = loss(&l);
                v[i] -= 2.0 * h;
                var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap()).unwrap();
                let lm = loss(&l);
                var.set(&Tensor::from_vec(v0.clone(), var.shape(), &Device::Cpu).unwrap()).unwrap();
                let fd = (lp - lm) / (2.0 * h as f64);
                assert!((fd - g[i] as f64).abs() < 2e-3 + 2e-3 * fd.abs(), "param {i}: fd {fd} vs autograd {}", g[i]);
            }
        }
    }

    /// A DoRA layer: W, b, A, B random; m = 1 + |u| so f = m/‖W + sBA‖ is far from 1.
    fn dora_layer(inp: usize, out: usize, r: usize, seed: u64) -> LoraLinear {
        let (mut l, _) = layer_with_adapter(inp, out, r, 3.0, seed);
        let ad = l.remove_adapter("x").unwrap().unwrap();
        let m: Vec<f32> = rand_vec(out, seed + 9).iter().map(|u| 1.0 + u.abs()).collect();
        let ad = Adapter::from_tensors(ad.a().as_tensor(), ad.b().as_tensor(), 3.0, ad.scale(), 0.0)
            .unwrap()
            .with_magnitude(&Tensor::from_vec(m, out, &Device::Cpu).unwrap())
            .unwrap();
        l.insert_adapter("x", ad).unwrap();
        l.set_active(&["x"]).unwrap();
        l.freeze_base();
        l.set_backend(Backend::Reference);
        l
    }

    #[test]
    fn dora_forward_matches_an_f64_reference_of_the_rescaled_weight() {
        let (n, inp, out, r) = (4, 7, 5, 2);
        let l = dora_layer(inp, out, r, 51);
        let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (w, b, bias) = (v(l.weight().as_tensor()), v(l.adapter("x").unwrap().b().as_tensor()), v(l.bias().unwrap().as_tensor()));
        let (a, m, s) = (
            v(l.adapter("x").unwrap().a().as_tensor()),
            v(l.adapter("x").unwrap().magnitude().unwrap().as_tensor()),
            l.adapter("x").unwrap().scale(),
        );
        let x = rand_vec(n * inp, 52);
        let y = v(&l.forward(&t(x.clone(), (n, inp))).unwrap());
        // W' = m ⊙ (W + sBA) / ‖W + sBA‖_row, y = x·W'ᵀ + b, all in f64.
        for o in 0..out {
            let row: Vec<f64> = (0..inp)
                .map(|j| w[o * inp + j] as f64 + s * (0..r).map(|k| b[o * r + k] as f64 * a[k * inp + j] as f64).sum::<f64>())
                .collect();
            let norm = row.iter().map(|x| x * x).sum::<f64>().sqrt();
            for i in 0..n {
                let want = m[o] as f64 / norm * (0..inp).map(|j| x[i * inp + j] as f64 * row[j]).sum::<f64>() + bias[o] as f64;
                // f32 sums of 7 terms ≲ 3 and one division: < 1e-5.
                assert!((y[i * out + o] as f64 - want).abs() < 1e-5, "y[{i}, {o}] = {} vs {want}", y[i * out + o]);
            }
        }
    }

    #[test]
    fn dora_gradients_of_a_b_and_the_magnitude_match_finite_differences_with_the_norm_held_constant() {
        let (n, inp, out, r) = (3, 5, 4, 2);
        let l = dora_layer(inp, out, r, 61);
        let x = t(rand_vec(n * inp, 62), (n, inp));
        let c = t(rand_vec(n * out, 63), (n, out));
        let y = l.forward(&x).unwrap();
        let grads = ((y.sqr().unwrap() * &c).unwrap().sum_all().unwrap() / 2.0).unwrap().backward().unwrap();
        let ad = l.adapter("x").unwrap();
        // PEFT (and the paper, §4.3) treat ‖W + sBA‖ as a constant: the finite differences hold it at its
        // value for the unperturbed A, B by computing the loss through a fixed f.
        let norm = ad.dora_norm(l.weight().as_tensor()).unwrap();
        let loss = |a: &Tensor, b: &Tensor, m: &Tensor| -> f64 {
            let f = (m / &norm).unwrap().to_dtype(DType::F64).unwrap();
            let w = (l.weight().as_tensor() + (b.matmul(a).unwrap() * ad.scale()).unwrap()).unwrap().to_dtype(DType::F64).unwrap();
            let w = w.broadcast_mul(&f.unsqueeze(1).unwrap()).unwrap();
            let y = x
                .to_dtype(DType::F64)
                .unwrap()
                .matmul(&w.t().unwrap())
                .unwrap()
                .broadcast_add(&l.bias().unwrap().as_tensor().to_dtype(DType::F64).unwrap())
                .unwrap();
            (y.sqr().unwrap() * c.to_dtype(DType::F64).unwrap()).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap() / 2.0
        };
        let vars = [ad.a().as_tensor().clone(), ad.b().as_tensor().clone(), ad.magnitude().unwrap().as_tensor().clone()];
        for which in 0..3 {
            let g = grads.get(&vars[which]).expect("every DoRA tensor gets a gradient").flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let v0 = vars[which].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for i in 0..v0.len() {
                let h = 1e-2f32;
                let at = |d: f32| -> f64 {
                    let mut v = v0.clone();
                    v[i] += d;
                    let p = Tensor::from_vec(v, vars[which].shape(), &Device::Cpu).unwrap();
                    let mut args = vars.clone();
                    args[which] = p;
                    loss(&args[0], &args[1], &args[2])
                };
                let fd = (at(h) - at(-h)) / (2.0 * h as f64);
                // As the plain LoRA test: central differences with h = 1e-2, truncation O(h²).
                assert!((fd - g[i] as f64).abs() < 2e-3 + 2e-3 * fd.abs(), "tensor {which} [{i}]: fd {fd} vs autograd {}", g[i]);
            }
        }
    }

    #[test]
    fn dora_merge_gives_the_unmerged_outputs_and_unmerge_restores_the_weight() {
        let mut l = dora_layer(30, 20, 4, 71);
        let x = t(rand_vec(6 * 30, 72), (6, 30));
        let y0 = l.forward(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let w0 = l.weight().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        l.merge("x", true).unwrap();
        let y1 = l.forward(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // Sums of 30 terms in another association, one extra rounding of f: 1e-4 as the plain test.
        assert!(y0.iter().zip(&y1).all(|(a, b)| (a - b).abs() < 1e-4));
        l.unmerge("x").unwrap();
        let w2 = l.weight().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // W·f/f − ΔW + ΔW: four roundings of values ≲ 10.
        assert!(w0.iter().zip(&w2).all(|(a, b)| (a - b).abs() < 1e-5), "unmerge did not restore W");
    }

    #[test]
    fn kaiming_and_random_initialisations_draw_from_pytorchs_nn_linear_bounds() {
        // PEFT's true: A ~ U(±1/√in) (kaiming_uniform_ with a = √5), B = 0; false: nn.Linear's own init,
        // B ~ U(±1/√r) too. torch's generator cannot be reproduced: check support and variance instead.
        let (inp, out, r) = (400, 300, 8);
        let mut l = LoraLinear::new(t(vec![0.0; out * inp], (out, inp)), None).unwrap();
        let mut g = StdRng::seed_from_u64(3);
        l.add_adapter("k", AdapterSpec { init: Init::Kaiming, ..AdapterSpec::new(r, 1.0, 1.0) }, &mut g).unwrap();
        l.add_adapter("f", AdapterSpec { init: Init::Random, ..AdapterSpec::new(r, 1.0, 1.0) }, &mut g).unwrap();
        let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let check = |x: Vec<f32>, fan_in: usize, what: &str| {
            let bound = 1.0 / (fan_in as f64).sqrt();
            assert!(x.iter().all(|&a| (a as f64).abs() <= bound), "{what}: outside ±1/√{fan_in}");
            let var = x.iter().map(|&a| (a as f64).powi(2)).sum::<f64>() / x.len() as f64;
            // U(±b) has variance b²/3; with n ≥ 2400 draws its estimate's relative error is ≈ √(0.8/n) ≤ 2%:
            // 8% is 4σ.
            let want = bound * bound / 3.0;
            assert!((var - want).abs() < 0.08 * want, "{what}: variance {var} vs {want}");
        };
        check(v(l.adapter("k").unwrap().a().as_tensor()), inp, "true: A");
        assert!(v(l.adapter("k").unwrap().b().as_tensor()).iter().all(|b| *b == 0.0));
        check(v(l.adapter("f").unwrap().a().as_tensor()), inp, "false: A");
        check(v(l.adapter("f").unwrap().b().as_tensor()), r, "false: B");
    }

    #[test]
    fn effective_weight_is_w0_plus_scaled_ba() {
        let (l, p) = layer_with_adapter(5, 4, 2, 3.0, 21);
        let w = l.effective_weight().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for o in 0..4 {
            for j in 0..5 {
                let ba: f64 = (0..2).map(|k| p[3][o * 2 + k] as f64 * p[2][k * 5 + j] as f64).sum();
                let want = p[0][o * 5 + j] as f64 + 1.5 * ba;
                assert!((w[o * 5 + j] as f64 - want).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn unmerged_output_equals_merged_output() {
        let (mut l, _) = layer_with_adapter(30, 20, 4, 8.0, 31);
        let x = t(rand_vec(6 * 30, 32), (6, 30));
        let y0 = l.forward(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let w0 = l.weight().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        l.merge("x", true).unwrap();
        let y1 = l.forward(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // Same sums in a different association: |y| ≲ 30 terms of size ≤ 8, f32 eps 1.2e-7 → 1e-4 is generous.
        for (a, b) in y0.iter().zip(&y1) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
        assert!(l.set_disabled(true).is_err());
        l.unmerge("x").unwrap();
        let w2 = l.weight().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // One add and one subtract of the same delta: error ≤ 2 ulp of the larger magnitude (|W0|+|ΔW| ≤ 1 + 8).
        for (a, b) in w0.iter().zip(&w2) {
            assert!((a - b).abs() <= 2.0 * f32::EPSILON * 9.0);
        }
    }

    #[test]
    fn safe_merge_refuses_non_finite_weights_and_leaves_the_layer_unchanged() {
        let w = vec![1.0f32; 4];
        let mut l = LoraLinear::new(t(w, (2, 2)), None).unwrap();
        let ad = Adapter::from_tensors(&t(vec![f32::INFINITY, 0.0], (1, 2)), &t(vec![1.0, 1.0], (2, 1)), 1.0, 1.0, 0.0).unwrap();
        l.insert_adapter("bad", ad).unwrap();
        let e = l.merge("bad", true).unwrap_err().to_string();
        assert!(e.contains("non-finite") && e.contains("bad"), "{e}");
        assert_eq!(l.weight().flatten_all().unwrap().to_vec1::<f32>().unwrap(), vec![1.0; 4]);
        assert!(l.merged().is_empty());
    }

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
