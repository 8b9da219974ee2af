//! [`Llama`]: the decoder of every [`crate::Family`] (transformers' `LlamaForCausalLM` and the families
//! built from its blocks) with every projection a [`lora::LoraLinear`].
//!
//! For token ids (B, T):
//!
//! ```text
//! h₀ = E[ids] (· √H for Gemma)                                     (B, T, H)
//! per layer l:  x = N(h; w_attn_in)
//!               q, k, v = x·W_qᵀ, x·W_kᵀ, x·W_vᵀ   (Phi-3: x·W_qkvᵀ split in three; biases where the family has them)
//!               q, k = N_head(q; w_q), N_head(k; w_k)  (Qwen3: RMSNorm of each head)
//!               q, k = RoPE(q), RoPE(k)           (the family's scaling; Phi-3: the first r features of a head)
//!               a = W_o · attention(q, [cache_k, k], [cache_v, v])   (causal, grouped K/V, the layer's window,
//!                                                                      scale and soft-capping)
//!               h = h + a   (Gemma: h + N(a; w_attn_out))
//!               x = N(h; w_mlp_in)
//!               m = W_down·(act(W_gate·x) ⊙ W_up·x)   (act: silu or tanh GELU; Phi-3: gate, up = halves of W_gate_up·x)
//!               h = h + m   (Gemma: h + N(m; w_mlp_out))
//! logits = N(h; w_final) · W_headᵀ  (Gemma: c·tanh(logits/c))     (B, T, V)
//! N(x; w) = RMSNorm with weight w (Gemma: 1 + w)
//! ```
//!
//! The norms, RoPE, attention, SwiGLU gate (and the training loss) run as the fused CPU kernels of
//! [`crate::fused`] by default; [`Llama::set_fused`]`(false)` selects the reference ops of [`crate::ops`]
//! (plain candle ops), which the fused ones are tested against.
//!
//! Each `W·` above is a LoRA layer (`W₀ + s·B·A` when an adapter is active) named as transformers names
//! the module (`model.layers.0.self_attn.q_proj`, …, `lm_head`), so PEFT adapter files map one to one.
//! With `tie_word_embeddings`, `lm_head` holds the embedding's own weight: one tensor, two uses.
//!
//! A checkpoint's BF16 matrices (the embedding and every projection) are held in bf16 ([`lora::io::Weight`]):
//! half the bytes of f32, and every product reads them with the bits of their f32 values, so a model
//! computes the same numbers either way. Such a base is frozen; [`Llama::unfreeze_base`] widens it to f32.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use lora::io::Weight;
use lora::{LoraLinear, LoraModel};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

use crate::config::LlamaConfig;
use crate::error::{LmError, Result};
use crate::family::{Activation, Norm};
use crate::fused::{self, AttentionOpts, AttentionShape, RopeOp, RopeTables};
use crate::ops::{apply_rope, attention_with, causal_mask_window, rms_norm, rope_cos_sin};
use crate::rope_cache::RopeCache;

/// The seven projections of a Llama decoder layer, in PEFT's usual `target_modules` order (a family's own:
/// [`LlamaConfig::projections`]).
pub const PROJECTIONS: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
/// The module name of the output projection.
pub const LM_HEAD: &str = "lm_head";
/// Module name of the input embedding (a LoRA target like the projections: PEFT's embedding LoRA).
pub const EMBED: &str = "model.embed_tokens";

/// The transformers module name of projection `proj` in layer `layer`.
pub fn module_name(layer: usize, proj: &str) -> String {
    let group = if matches!(proj, "gate_proj" | "up_proj" | "down_proj" | "gate_up_proj") { "mlp" } else { "self_attn" };
    format!("model.layers.{layer}.{group}.{proj}")
}

/// Keys and values of every layer for the slots seen so far (generation).
///
/// Each layer's keys and values live in one buffer per tensor of shape (B, capacity, n_kv, d), filled
/// slot by slot; the capacity grows geometrically (up to the model's context), so a generation step
/// copies only its own new slots.
#[derive(Debug, Clone)]
pub struct KvCache {
    pub(crate) layers: Vec<(Vec<f32>, Vec<f32>)>, // (B, cap, n_kv, d) each
    width: usize,                                 // n_kv · d
    pub(crate) cap: usize,
    max: usize,
    pad: Vec<usize>,
    pub(crate) len: usize,
}

impl KvCache {
    /// An empty cache for `rows` sequences whose first `pad[row]` slots will be left padding.
    pub fn new(config: &LlamaConfig, pad: Vec<usize>) -> Self {
        KvCache {
            layers: vec![(Vec::new(), Vec::new()); config.num_hidden_layers],
            width: config.num_key_value_heads * config.head_dim,
            cap: 0,
            max: config.context_len(),
            pad,
            len: 0,
        }
    }

    /// Makes room for `slots` slots per row, keeping the filled ones.
    pub(crate) fn reserve(&mut self, slots: usize) {
        if slots <= self.cap {
            return;
        }
        let cap = slots.max(2 * self.cap).max(16).min(self.max.max(slots));
        let (rows, w, old) = (self.pad.len(), self.width, self.cap);
        for (k, v) in &mut self.layers {
            for buf in [k, v] {
                let mut grown = vec![0f32; rows * cap * w];
                for r in 0..rows {
                    grown[r * cap * w..][..self.len * w].copy_from_slice(&buf[r * old * w..][..self.len * w]);
                }
                *buf = grown;
            }
        }
        self.cap = cap;
    }

    /// Writes `t` new slots (B, t, n_kv, d) of layer `l` after the filled ones (room reserved).
    pub(crate) fn write(&mut self, l: usize, k: &[f32], v: &[f32], t: usize) {
        let (cap, w, len) = (self.cap, self.width, self.len);
        let (kb, vb) = &mut self.layers[l];
        for (buf, new) in [(kb, k), (vb, v)] {
            for (r, rows) in new.chunks_exact(t * w).enumerate() {
                buf[(r * cap + len) * w..][..t * w].copy_from_slice(rows);
            }
        }
    }

    /// Layer `l`'s keys and values of slots `0..slots` as tensors (B, slots, n_kv, d).
    fn tensors(&self, l: usize, slots: usize, d: usize) -> Result<(Tensor, Tensor)> {
        let (rows, w, cap) = (self.pad.len(), self.width, self.cap);
        let take = |buf: &[f32]| -> Result<Tensor> {
            let mut out = Vec::with_capacity(rows * slots * w);
            for r in 0..rows {
                out.extend_from_slice(&buf[r * cap * w..][..slots * w]);
            }
            Ok(Tensor::from_vec(out, (rows, slots, w / d, d), &Device::Cpu)?)
        };
        Ok((take(&self.layers[l].0)?, take(&self.layers[l].1)?))
    }
    /// Forgets every slot after the first `len` (a later forward overwrites them); no memory is freed.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
    /// Slots filled so far.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Left padding of each row.
    pub fn pad(&self) -> &[usize] {
        &self.pad
    }
}

/// One decoder layer's norm weights and projection names.
#[derive(Debug)]
pub(crate) struct Layer {
    pub norms: Vec<(Norm, String, Var)>, // role, tensor name, weight: (H), or (d) for q/k norms
    pub proj: Vec<String>,               // module names, the family's projection order
}

impl Layer {
    pub fn norm(&self, role: Norm) -> Option<&Var> {
        self.norms.iter().find(|(r, _, _)| *r == role).map(|(_, _, v)| v)
    }
}

/// One base tensor of [`Llama::base_tensors`], made when asked for.
enum BaseTensor<'a> {
    Var(&'a Var),
    Weight(&'a LoraLinear),
}

impl BaseTensor<'_> {
    fn get(&self) -> Result<Tensor> {
        Ok(match self {
            BaseTensor::Var(v) => v.as_tensor().clone(),
            BaseTensor::Weight(l) => l.weight()?,
        })
    }
}

/// A decoder of one of the [`crate::Family`]s whose projections are LoRA layers.
#[derive(Debug)]
pub struct Llama {
    pub(crate) config: LlamaConfig,
    pub(crate) layers: Vec<Layer>, // norms and projection names per layer
    pub(crate) final_norm: Var,    // (H)
    pub(crate) lora: LoraModel,    // projections (layer by layer, the family's order), lm_head, embed_tokens
    base_trainable: bool,          // embedding and norms train (pre-training)
    pub(crate) rope: RopeCache,
    fused: bool,
}

fn var(t: Tensor) -> Result<Var> {
    Ok(Var::from_tensor(&t.to_dtype(DType::F32)?.contiguous()?)?)
}

impl Llama {
    /// A model with random weights as transformers initialises them (normal(0, initializer_range) for the
    /// embedding and projections, ones for the norms — zeros where they multiply by 1 + w), from `seed`.
    pub fn random(config: &LlamaConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        let mut rng = StdRng::seed_from_u64(seed);
        let normal = Normal::new(0.0f32, config.initializer_range as f32)
            .map_err(|e| LmError::invalid("initializer_range", config.initializer_range, e.to_string()))?;
        let mut tensors = BTreeMap::new();
        let dev = Device::Cpu;
        for (name, shape) in expected_shapes(config) {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = if name.ends_with("norm.weight") {
                vec![if config.family.spec().norm_plus_one { 0.0 } else { 1.0 }; n]
            } else if name.ends_with(".bias") {
                vec![0.0; n]
            } else {
                (0..n).map(|_| normal.sample(&mut rng)).collect()
            };
            tensors.insert(name, Tensor::from_vec(v, shape, &dev)?);
        }
        Self::from_tensors(config, tensors, Path::new("(random init)"))
    }

    /// A model from named tensors with transformers' names; `source` names the file(s) in errors. Every
    /// expected tensor must be present with its shape; unknown tensors are refused by name.
    pub fn from_tensors(config: &LlamaConfig, tensors: BTreeMap<String, Tensor>, source: &Path) -> Result<Self> {
        Self::from_weights(config, tensors.into_iter().map(|(n, t)| (n, Weight::F32(t))).collect(), source)
    }

    /// [`Llama::from_tensors`] from weights as a file holds them: the embedding and projections given in bf16
    /// stay bf16 (the base is then frozen), everything else is f32.
    pub fn from_weights(config: &LlamaConfig, mut tensors: BTreeMap<String, Weight>, source: &Path) -> Result<Self> {
        config.validate().map_err(|e| LmError::file(source, e.to_string()))?;
        let expected = expected_shapes(config);
        for (name, shape) in &expected {
            let t = tensors
                .get(name)
                .ok_or_else(|| LmError::file(source, format!("missing tensor {name} (shape {shape:?} for this config.json)")))?;
            if t.dims() != shape.as_slice() {
                return Err(LmError::file(source, format!("tensor {name}: shape {:?}, config.json implies {shape:?}", t.dims())));
            }
        }
        let known: std::collections::HashSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
        for name in tensors.keys() {
            // transformers ignores a stored lm_head when tied, and old checkpoints carry RoPE tables.
            let ignorable = name.ends_with("rotary_emb.inv_freq") || (config.tie_word_embeddings && name == "lm_head.weight");
            if !known.contains(name.as_str()) && !ignorable {
                return Err(LmError::file(
                    source,
                    format!("unexpected tensor {name}: not part of a {} with this config.json", config.family.spec().architecture),
                ));
            }
        }
        let mut take = |name: &str| tensors.remove(name).ok_or_else(|| LmError::file(source, format!("missing tensor {name}")));
        let mut any_bf16 = false;
        let mut linear = |w: Weight, bias: Option<Weight>, embedding: bool| -> Result<LoraLinear> {
            let bias = bias.map(|b| b.to_f32()).transpose()?;
            Ok(match (w, embedding) {
                (Weight::Bf16(m), false) => {
                    any_bf16 = true;
                    LoraLinear::from_bf16(m, bias)?
                }
                (Weight::Bf16(m), true) => {
                    any_bf16 = true;
                    LoraLinear::embedding_bf16(m)?
                }
                (Weight::F32(t), false) => LoraLinear::new(t, bias)?,
                (Weight::F32(t), true) => LoraLinear::embedding(t)?,
            })
        };
        let mut embed = linear(take("model.embed_tokens.weight")?, None, true)?;
        let mut lora = LoraModel::new();
        let mut layers = Vec::new();
        let spec = config.family.spec();
        for l in 0..config.num_hidden_layers {
            let mut norms = Vec::new();
            for (role, n) in spec.norms {
                let name = format!("model.layers.{l}.{n}.weight");
                norms.push((*role, name.clone(), var(take(&name)?.to_f32()?)?));
            }
            let proj: Vec<String> = spec.projections.iter().map(|p| module_name(l, p)).collect();
            for (p, name) in spec.projections.iter().zip(&proj) {
                let w = take(&format!("{name}.weight"))?;
                let b = if config.family.bias(config, p) { Some(take(&format!("{name}.bias"))?) } else { None };
                lora.push(name, linear(w, b, false)?)?;
            }
            layers.push(Layer { norms, proj });
        }
        let final_norm = var(take("model.norm.weight")?.to_f32()?)?;
        // Tied: lm_head holds the embedding's weight itself (the f32 variable, or the bf16 matrix).
        let head =
            if config.tie_word_embeddings { LoraLinear::tied_to(&mut embed)? } else { linear(take("lm_head.weight")?, None, false)? };
        lora.push(LM_HEAD, head)?;
        // The input embedding, last (the projections keep their positions): the same weight, read by id.
        lora.push(EMBED, embed)?;
        // transformers' output embedding: PEFT's "all-linear" leaves it out.
        lora.set_output_layer(LM_HEAD)?;
        let rope = RopeCache::new(config.rope_theta, config.rotary_dim(), config.max_position_embeddings, config.rope_scaling.clone());
        let mut model = Llama { config: config.clone(), layers, final_norm, lora, base_trainable: true, rope, fused: true };
        if any_bf16 {
            model.freeze_base();
        }
        Ok(model)
    }

    /// Chooses the fused CPU kernels of [`crate::fused`] (`true`, the default) or the reference ops of
    /// [`crate::ops`] for the norms, RoPE, attention, SwiGLU and the training loss. The fused kernels
    /// serve f32 models on the CPU; others take the reference ops either way.
    pub fn set_fused(&mut self, fused: bool) {
        self.fused = fused;
    }

    /// Whether the fused kernels run now (chosen, and the model is f32 on the CPU).
    pub fn is_fused(&self) -> bool {
        self.fused && fused::supports(self.final_norm.as_tensor())
    }

    /// The architecture.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }
    /// The LoRA layers (projections and lm_head) by module name.
    pub fn lora(&self) -> &LoraModel {
        &self.lora
    }
    /// The LoRA layers, mutable: add, load, activate, merge adapters.
    pub fn lora_mut(&mut self) -> &mut LoraModel {
        &mut self.lora
    }

    /// Freezes every base tensor (embedding, norms, projection weights): only adapters train.
    pub fn freeze_base(&mut self) {
        self.base_trainable = false;
        self.lora.freeze_base(lora::Bias::None);
    }
    /// Makes every base tensor trainable again (pre-training); a base held in bf16 is widened to f32 first
    /// (exactly: twice its memory).
    pub fn unfreeze_base(&mut self) -> Result<()> {
        self.lora.unfreeze_base()?;
        self.base_trainable = true;
        Ok(())
    }

    /// Holds the frozen embedding and projections whose values are all bf16 numbers in bf16 (half the
    /// bytes; the same results). Returns how many weights it packed. See [`lora::LoraModel::hold_base_in_bf16`].
    pub fn hold_base_in_bf16(&mut self) -> Result<usize> {
        if self.base_trainable {
            return Err(LmError::invalid("base", "trainable", "only a frozen base is held in bf16: freeze it first"));
        }
        Ok(self.lora.hold_base_in_bf16()?)
    }

    /// The model a bf16 checkpoint of this one loads as: every base value (norms and biases too) rounded to
    /// the nearest bf16 (ties to even, as `model.to(torch.bfloat16)` rounds), the base frozen, and the
    /// embedding and projections held in bf16. Returns how many matrices it holds in bf16.
    pub fn round_base_to_bf16(&mut self) -> Result<usize> {
        if let Some((name, _)) = self.lora.layers().find(|(_, l)| !l.merged().is_empty()) {
            return Err(LmError::invalid("base", name, "holds merged adapters: unmerge them before rounding the base to bf16"));
        }
        let round = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::BF16)?.to_dtype(DType::F32)?) };
        for layer in &self.layers {
            for (_, _, v) in &layer.norms {
                v.set(&round(v.as_tensor())?)?;
            }
        }
        self.final_norm.set(&round(self.final_norm.as_tensor())?)?;
        for (_, l) in self.lora.layers_mut() {
            if l.weight_var().is_some() {
                let w = round(&l.weight()?)?;
                let b = l.bias().map(|b| round(b.as_tensor())).transpose()?;
                l.restore_base(&w, b.as_ref())?;
            }
        }
        self.freeze_base();
        self.hold_base_in_bf16()
    }

    /// Bytes of the base weights held in bf16 (a shared weight counted once).
    pub fn base_bf16_bytes(&self) -> usize {
        let skip_head = self.config.tie_word_embeddings;
        self.lora
            .layers()
            .filter(|(name, _)| !(skip_head && *name == LM_HEAD))
            .filter_map(|(_, l)| l.weight_bf16().map(|m| 2 * m.rows() * m.cols()))
            .sum()
    }

    /// Bytes the base weights hold now (bf16 matrices at 2 bytes a value, the rest at 4).
    pub fn base_bytes(&self) -> usize {
        let mut bytes = 0;
        for (name, l) in self.lora.layers() {
            if name == LM_HEAD && self.config.tie_word_embeddings {
                continue;
            }
            let n: usize = l.weight_dims().iter().product();
            bytes += if l.weight_bf16().is_some() { 2 * n } else { 4 * n } + l.bias().map_or(0, |b| 4 * b.elem_count());
        }
        bytes
            + 4 * (self.final_norm.elem_count() + self.layers.iter().flat_map(|l| &l.norms).map(|(_, _, v)| v.elem_count()).sum::<usize>())
    }

    /// The tensors that train now, each once (a tied embedding is not listed twice).
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        let mut out: Vec<(String, Var)> = Vec::new();
        if let (true, Some(embed)) = (self.base_trainable, self.lora.layer(EMBED).ok().and_then(|l| l.weight_var())) {
            out.push(("model.embed_tokens.weight".into(), embed.clone()));
            for layer in &self.layers {
                for (_, name, v) in &layer.norms {
                    out.push((name.clone(), v.clone()));
                }
            }
            out.push(("model.norm.weight".into(), self.final_norm.clone()));
        }
        for (name, layer) in self.lora.layers() {
            let (w, b) = layer.base_trainable();
            if let (true, Some(v)) = (w, layer.weight_var()) {
                out.push((format!("{name}.weight"), v.clone()));
            }
            if let (true, Some(bias)) = (b, layer.bias()) {
                out.push((format!("{name}.bias"), bias.clone()));
            }
            if !layer.is_disabled() {
                for ad in layer.active().iter().filter(|a| !layer.merged().contains(a)) {
                    // Every tensor the adapter trains here: A, B, DoRA's magnitude, B's bias, its own copies.
                    for (which, var) in layer.adapter_vars(ad) {
                        out.push((format!("{name}.{which}.{ad}"), var.clone()));
                    }
                }
            }
        }
        let mut seen = std::collections::HashSet::new();
        out.retain(|(_, v)| seen.insert(v.as_tensor().id()));
        out
    }

    /// A copy of the base weights with transformers' names, as stored now (lm_head omitted when tied),
    /// sorted by name. Copies, not views: later writes to the model (merge, training) do not change them.
    pub fn base_state(&self) -> Result<Vec<(String, Tensor)>> {
        self.base_tensors()?.into_iter().map(|(n, t)| Ok((n, t.get()?.copy()?))).collect()
    }

    /// The base tensors with transformers' names, sorted, each made only when asked for (a bf16 weight is
    /// widened then): what [`Llama::base_state`] copies and [`Llama::fingerprint`] hashes one at a time.
    fn base_tensors(&self) -> Result<Vec<(String, BaseTensor<'_>)>> {
        let mut out = Vec::new();
        for layer in &self.layers {
            for (_, name, v) in &layer.norms {
                out.push((name.clone(), BaseTensor::Var(v)));
            }
        }
        for (name, layer) in self.lora.layers() {
            if name == LM_HEAD && self.config.tie_word_embeddings {
                continue;
            }
            out.push((format!("{name}.weight"), BaseTensor::Weight(layer)));
            if let Some(b) = layer.bias() {
                out.push((format!("{name}.bias"), BaseTensor::Var(b)));
            }
        }
        out.push(("model.norm.weight".into(), BaseTensor::Var(&self.final_norm)));
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// SHA-256 fingerprint of the base weights (what adapters record to detect another base): over their
    /// f32 values, one tensor at a time, so the same for a base held in f32 or in bf16.
    pub fn fingerprint(&self) -> Result<String> {
        let mut h = lora::io::Fingerprint::default();
        for (name, t) in self.base_tensors()? {
            h.add(&name, &t.get()?)?;
        }
        Ok(h.finish())
    }

    /// Number of base parameters.
    pub fn num_params(&self) -> usize {
        self.config.num_params()
    }

    fn param(&self, v: &Var) -> Tensor {
        if self.base_trainable {
            v.as_tensor().clone()
        } else {
            v.as_detached_tensor()
        }
    }

    /// Logits (B, T, V) for token ids (B, T). With a cache, the ids continue the cached slots (and are
    /// added to it); `train` turns on adapter dropout.
    pub fn forward(&self, ids: &Tensor, cache: Option<&mut KvCache>, train: bool) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let logits = self.logits_rows(ids, cache, train)?;
        Ok(logits.reshape((b, t, self.config.vocab_size))?)
    }

    /// Logits as (B·T, V) rows (the shape the loss wants; the fused path never makes a 3-D tensor, whose
    /// reshapes would each copy a gradient in the backward).
    pub(crate) fn logits_rows(&self, ids: &Tensor, cache: Option<&mut KvCache>, train: bool) -> Result<Tensor> {
        let h = self.hidden_rows(ids, cache, train)?;
        self.head_logits(&h, train)
    }

    /// Logits (n, V) of final hidden rows h (n, H): lm_head and the family's soft-capping.
    pub(crate) fn head_logits(&self, h: &Tensor, train: bool) -> Result<Tensor> {
        let logits = self.softcap_logits(self.lora.layer(LM_HEAD)?.forward_t(h, train)?)?;
        Ok(if logits.rank() == 2 { logits } else { logits.reshape(((), self.config.vocab_size))? })
    }

    /// c·tanh(z/c) with the final soft-capping c (Gemma 2), else z.
    pub(crate) fn softcap_logits(&self, z: Tensor) -> Result<Tensor> {
        Ok(match self.config.final_logit_softcapping {
            Some(c) => ((z / c)?.tanh()? * c)?,
            None => z,
        })
    }

    /// The weight a norm multiplies by: w, or 1 + w (Gemma); detached when `detach` or the base is frozen.
    pub(crate) fn norm_weight(&self, w: &Var, detach: bool) -> Result<Tensor> {
        let w = if detach { w.as_detached_tensor() } else { self.param(w) };
        Ok(if self.config.family.spec().norm_plus_one { (w + 1.0)? } else { w })
    }

    /// RMSNorm of x (…, H) with weight w as the family applies it.
    pub(crate) fn norm(&self, x: &Tensor, w: &Var, fast: bool, detach: bool) -> Result<Tensor> {
        let w = self.norm_weight(w, detach)?;
        let eps = self.config.rms_norm_eps;
        Ok(if fast { fused::rms_norm(x, &w, eps)? } else { rms_norm(x, &w, eps)? })
    }

    /// The embedding of `ids` (B, T) as (B·T, H) rows, with any embedding adapters, scaled by √H where the
    /// family scales it (the factor rounded to f32 first, as transformers does).
    pub(crate) fn embed_rows(&self, ids: &Tensor, train: bool) -> Result<Tensor> {
        let h = self.lora.layer(EMBED)?.embed_t(ids, train)?;
        Ok(if self.config.family.spec().embed_scale { (h * ((self.config.hidden_size as f64).sqrt() as f32) as f64)? } else { h })
    }

    /// The attention options of layer `l`: its scale, window and soft-capping.
    pub(crate) fn attention_opts(&self, l: usize) -> AttentionOpts {
        let c = &self.config;
        AttentionOpts { scale: Some(c.attention_scale() as f32), window: c.window(l), softcap: c.attn_logit_softcapping.map(|x| x as f32) }
    }

    /// Decoder layer `l` on hidden states h (rows × H, any leading shape): the norms, the projections
    /// (`proj(i, x)` applies the i-th of the family's projections), q/k norms, attention (`attend(q, k, v)`,
    /// un-roped q and k: RoPE and the cache are the caller's), the MLP and both residual adds. `fast`: fused
    /// kernels; `detach`: norm weights as constants (serving).
    pub(crate) fn layer_forward(
        &self,
        l: usize,
        h: Tensor,
        fast: bool,
        detach: bool,
        proj: &dyn Fn(usize, &Tensor) -> Result<Tensor>,
        attend: &mut dyn FnMut(Tensor, Tensor, Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let spec = c.family.spec();
        let layer = &self.layers[l];
        let at = |name: &str| spec.projections.iter().position(|p| *p == name);
        let need =
            |name: &str| at(name).ok_or_else(|| LmError::invalid("projection", name, "internal error: not a projection of this family"));
        let (nh, nkv, d, inter) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size);
        let w = |role: Norm| layer.norm(role).ok_or_else(|| LmError::invalid("norm", format!("{role:?}"), "internal error: missing"));
        let x = self.norm(&h, w(Norm::AttnIn)?, fast, detach)?;
        let last = x.rank() - 1;
        let (q, k, v) = match at("qkv_proj") {
            Some(i) => {
                let qkv = proj(i, &x)?;
                (qkv.narrow(last, 0, nh * d)?, qkv.narrow(last, nh * d, nkv * d)?, qkv.narrow(last, (nh + nkv) * d, nkv * d)?)
            }
            None => (proj(need("q_proj")?, &x)?, proj(need("k_proj")?, &x)?, proj(need("v_proj")?, &x)?),
        };
        // Each head's d features normalised on their own: (rows, heads·d) as (rows·heads, d).
        let head_norm = |t: Tensor, role: Norm| -> Result<Tensor> {
            match layer.norm(role) {
                None => Ok(t),
                Some(wv) => {
                    let dims = t.dims().to_vec();
                    Ok(self.norm(&t.reshape((t.elem_count() / d, d))?, wv, fast, detach)?.reshape(dims)?)
                }
            }
        };
        let (q, k) = (head_norm(q, Norm::Q)?, head_norm(k, Norm::K)?);
        let a = attend(q, k, v)?;
        let mut o = proj(need("o_proj")?, &a)?;
        if let Some(wv) = layer.norm(Norm::AttnOut) {
            o = self.norm(&o, wv, fast, detach)?;
        }
        let h = (h + o)?;
        let x = self.norm(&h, w(Norm::MlpIn)?, fast, detach)?;
        let (g, u) = match at("gate_up_proj") {
            Some(i) => {
                let gu = proj(i, &x)?;
                (gu.narrow(last, 0, inter)?, gu.narrow(last, inter, inter)?)
            }
            None => (proj(need("gate_proj")?, &x)?, proj(need("up_proj")?, &x)?),
        };
        let gu = if fast {
            fused::gated(&g, &u, c.hidden_act)?
        } else {
            match c.hidden_act {
                Activation::Silu => (g.silu()? * u)?,
                Activation::GeluTanh => (g.gelu()? * u)?,
            }
        };
        let mut m = proj(need("down_proj")?, &gu)?;
        if let Some(wv) = layer.norm(Norm::MlpOut) {
            m = self.norm(&m, wv, fast, detach)?;
        }
        Ok((h + m)?)
    }

    /// The RoPE op of one batch: each row's positions (slot − its padding) in the table of its own length.
    pub(crate) fn rope_tables(&self, lengths: &[usize]) -> Result<(Vec<Arc<RopeTables>>, Vec<u32>)> {
        let mut tables: Vec<Arc<RopeTables>> = Vec::new();
        let mut which = Vec::with_capacity(lengths.len());
        for &n in lengths {
            let t = self.rope.fused(n.max(1))?;
            let i = match tables.iter().position(|x| Arc::ptr_eq(x, &t)) {
                Some(i) => i,
                None => {
                    tables.push(t);
                    tables.len() - 1
                }
            };
            which.push(i as u32);
        }
        Ok((tables, which))
    }

    /// The final hidden states (B, T, H), after the last norm.
    pub fn hidden(&self, ids: &Tensor, cache: Option<&mut KvCache>, train: bool) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        Ok(self.hidden_rows(ids, cache, train)?.reshape((b, t, self.config.hidden_size))?)
    }

    /// The final hidden states: (B·T, H) on the fused path, (B, T, H) on the reference path.
    pub(crate) fn hidden_rows(&self, ids: &Tensor, mut cache: Option<&mut KvCache>, train: bool) -> Result<Tensor> {
        let c = &self.config;
        let (b, t) = ids.dims2()?;
        let offset = cache.as_ref().map_or(0, |c| c.len);
        let pad: Vec<usize> = cache.as_ref().map_or_else(|| vec![0; b], |c| c.pad.clone());
        if pad.len() != b {
            return Err(LmError::invalid("batch", b, format!("the cache was made for {} rows", pad.len())));
        }
        if offset + t > self.rope.max_positions() {
            return Err(LmError::invalid(
                "sequence length",
                offset + t,
                format!("longer than the model's context (max_position_embeddings = {})", self.rope.max_positions()),
            ));
        }
        if let Some(cache) = cache.as_deref_mut() {
            cache.reserve(offset + t);
        }
        let dev = ids.device();
        let positions: Vec<u32> = pad.iter().flat_map(|&p| (offset..offset + t).map(move |s| s.saturating_sub(p) as u32)).collect();
        // Each row's table is that of its own length (its largest position + 1).
        let lengths: Vec<usize> = pad.iter().map(|&p| (offset + t).saturating_sub(p)).collect();
        let (tables, which) = self.rope_tables(&lengths)?;
        let fast = self.is_fused();
        let (nh, nkv, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let (cos_sin, rope_op) = if fast {
            let which = which.iter().flat_map(|&w| std::iter::repeat_n(w, t)).collect();
            (None, Some(RopeOp::with_tables(tables, which, positions, d)?))
        } else {
            let per_row: Vec<&RopeTables> = which.iter().map(|&w| tables[w as usize].as_ref()).collect();
            (Some(rope_cos_sin(&per_row, &positions, t, dev)?), None)
        };
        // Reference masks, one per window in use.
        let mut masks: Vec<(Option<usize>, Tensor)> = Vec::new();
        // The fused path keeps every activation as (B·T, features) rows, the layout of the projections'
        // inputs and outputs: no reshape enters the graph.
        let mut h = self.embed_rows(ids, train)?; // (B·T, H)
        if !fast {
            h = h.reshape((b, t, c.hidden_size))?;
        }
        for l in 0..self.layers.len() {
            let names = &self.layers[l].proj;
            let proj = |i: usize, x: &Tensor| -> Result<Tensor> { Ok(self.lora.layer(&names[i])?.forward_t(x, train)?) };
            let opts = self.attention_opts(l);
            if !fast && !masks.iter().any(|(w, _)| *w == opts.window) {
                masks.push((opts.window, causal_mask_window(t, offset + t, offset, &pad, opts.window, dev)?));
            }
            let cache_l = &mut cache;
            let mut attend = |q: Tensor, k: Tensor, v: Tensor| -> Result<Tensor> {
                if let Some(rope) = &rope_op {
                    let (q, k) = (rope.apply(&q)?, rope.apply(&k)?);
                    return self.fused_attention(l, q, k, v, cache_l.as_deref_mut(), train, &pad, opts);
                }
                let (cos, sin) =
                    cos_sin.as_ref().ok_or_else(|| LmError::invalid("backend", "reference", "internal error: tables missing"))?;
                let mask = &masks.iter().find(|(w, _)| *w == opts.window).ok_or_else(|| LmError::invalid("mask", l, "internal error"))?.1;
                // (B, heads, T, d) for the reference ops.
                let (q, k, v) = (q.reshape((b, t, nh, d))?, k.reshape((b, t, nkv, d))?, v.reshape((b, t, nkv, d))?);
                let q = apply_rope(&q.transpose(1, 2)?, cos, sin)?;
                let mut k = apply_rope(&k.transpose(1, 2)?, cos, sin)?; // (B, n_kv, T, d)
                let mut v = v.transpose(1, 2)?.contiguous()?;
                if let Some(cache) = cache_l.as_deref_mut() {
                    // Cached keys and values are constants: no graph is kept alive across generation steps.
                    let kt = k.detach().transpose(1, 2)?.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
                    let vt = v.detach().transpose(1, 2)?.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
                    cache.write(l, &kt, &vt, t);
                    let (ck, cv) = cache.tensors(l, offset + t, d)?;
                    k = ck.transpose(1, 2)?.contiguous()?;
                    v = cv.transpose(1, 2)?.contiguous()?;
                }
                let scale = c.attention_scale();
                Ok(attention_with(&q, &k, &v, mask, scale, c.attn_logit_softcapping)?.transpose(1, 2)?.reshape((b, t, nh * d))?)
            };
            h = self.layer_forward(l, h, fast, false, &proj, &mut attend)?;
            if !train {
                // Inference: cut the graph at each layer so intermediates are freed as soon as they are used.
                h = h.detach();
            }
        }
        if let Some(cache) = cache {
            cache.len += t;
        }
        self.norm(&h, &self.final_norm, fast, false)
    }

    /// The fused attention of layer `l` on roped q (B·T, n_h·d), k and v (B·T, n_kv·d), through the cache
    /// when there is one → (B·T, n_h·d).
    #[allow(clippy::too_many_arguments)]
    fn fused_attention(
        &self,
        l: usize,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        cache: Option<&mut KvCache>,
        train: bool,
        pad: &[usize],
        opts: AttentionOpts,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (nh, nkv, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let (q, k, v) = if train { (q, k, v) } else { (q.detach(), k.detach(), v.detach()) };
        let Some(cache) = cache else {
            return Ok(fused::attention(&q, &k, &v, nh, nkv, 0, pad, opts)?);
        };
        let b = pad.len();
        let t = q.dim(0)? / b.max(1);
        let offset = cache.len;
        // Cached keys and values are constants: no graph is kept alive across generation steps.
        let values = |x: &Tensor| -> Result<Vec<f32>> { Ok(x.detach().flatten_all()?.to_vec1::<f32>()?) };
        cache.write(l, &values(&k)?, &values(&v)?, t);
        if q.track_op() {
            let (ck, cv) = cache.tensors(l, offset + t, d)?;
            let rows = b * (offset + t);
            return Ok(fused::attention(&q, &ck.reshape((rows, nkv * d))?, &cv.reshape((rows, nkv * d))?, nh, nkv, offset, pad, opts)?);
        }
        let shape = AttentionShape { batch: b, tq: t, tk: offset + t, heads: nh, kv_heads: nkv, d, offset, pad: pad.to_vec(), opts };
        let (kb, vb) = &cache.layers[l];
        let (out, _) = fused::attention::attention_forward(&values(&q)?, kb, vb, cache.cap, &shape)?;
        Ok(Tensor::from_vec(out, (b * t, nh * d), q.device())?)
    }
}

/// Every base tensor a model with `config` holds, with its shape, in transformers' names.
pub fn expected_shapes(config: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
    let c = config;
    let spec = c.family.spec();
    let (h, i, q, kv) = (c.hidden_size, c.intermediate_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim);
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![c.vocab_size, h])];
    for l in 0..c.num_hidden_layers {
        for (role, name) in spec.norms {
            let width = if matches!(role, Norm::Q | Norm::K) { c.head_dim } else { h };
            out.push((format!("model.layers.{l}.{name}.weight"), vec![width]));
        }
        for proj in spec.projections {
            let (o, inp) = match *proj {
                "q_proj" => (q, h),
                "k_proj" | "v_proj" => (kv, h),
                "o_proj" => (h, q),
                "gate_proj" | "up_proj" => (i, h),
                "down_proj" => (h, i),
                "qkv_proj" => (q + 2 * kv, h),
                "gate_up_proj" => (2 * i, h),
                other => unreachable!("a family lists projection {other}, which has no shape here"),
            };
            let name = module_name(l, proj);
            out.push((format!("{name}.weight"), vec![o, inp]));
            if c.family.bias(c, proj) {
                out.push((format!("{name}.bias"), vec![o]));
            }
        }
    }
    out.push(("model.norm.weight".into(), vec![h]));
    if !c.tie_word_embeddings {
        out.push(("lm_head.weight".into(), vec![c.vocab_size, h]));
    }
    out
}
