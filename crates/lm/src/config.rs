//! [`ModelConfig`]: the keys of Hugging Face's `config.json` for the decoder families lora-rs implements
//! (see [`Family`]), read and written; `LlamaConfig` is its former name.
//!
//! Shapes follow from the config: hidden size H, `num_attention_heads` n_h query heads of `head_dim` d
//! (default H / n_h), `num_key_value_heads` n_kv key/value heads (n_h a multiple of n_kv: each K/V head
//! serves n_h / n_kv query heads), MLP width I, vocabulary V. Per layer, q_proj (n_h·d, H), k_proj and
//! v_proj (n_kv·d, H), o_proj (H, n_h·d), gate_proj and up_proj (I, H), down_proj (H, I) (Phi-3 fuses q/k/v
//! into qkv_proj and gate/up into gate_up_proj), the family's RMSNorm weights; then the final norm (H), the
//! embedding (V, H) and lm_head (V, H) unless it is tied to the embedding. lora-rs' own key
//! `lora_rs_tokenizer: "bytes"` marks models whose tokens are UTF-8 bytes.
//!
//! Reading is strict: every key of `config.json` is either read (and its value checked), or known not to
//! change the model's function (metadata such as `transformers_version`, generation defaults); any other key
//! is refused by name, so a checkpoint asking for something lora-rs does not implement never loads as
//! something else.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::path::Path;

use serde_json::{json, Map, Value};

use crate::error::{LmError, Result};
pub use crate::family::{Activation, Family, LayerType};
use crate::rope_scaling::RopeScaling;

/// Where a model's tokens come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenizerKind {
    /// Token ids are the bytes of the UTF-8 text (vocabulary 256): models trained by lora-rs.
    Bytes,
    /// The model directory's `tokenizer.json`, read with the `tokenizers` crate.
    File,
}

/// The former name of [`ModelConfig`] (every family's config is one struct).
pub type LlamaConfig = ModelConfig;

/// The architecture of a decoder of one of the [`Family`]s, as `config.json` describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// The model family (`architectures` / `model_type`).
    pub family: Family,
    /// Vocabulary size V.
    pub vocab_size: usize,
    /// Hidden size H.
    pub hidden_size: usize,
    /// MLP width I.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads n_h.
    pub num_attention_heads: usize,
    /// Key/value heads n_kv (n_h is a multiple of it).
    pub num_key_value_heads: usize,
    /// Width d of one head.
    pub head_dim: usize,
    /// Context length the model was built for (the longest sequence it is given, except with dynamic RoPE:
    /// [`ModelConfig::context_len`]).
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base θ.
    pub rope_theta: f64,
    /// RoPE scaling (`rope_parameters` / `rope_scaling`).
    pub rope_scaling: RopeScaling,
    /// The share of each head's features RoPE rotates (the first `head_dim · factor`; Phi-3 only).
    pub partial_rotary_factor: f64,
    /// Whether lm_head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Biases on the attention projections (which ones: the family's, [`Family::bias`]).
    pub attention_bias: bool,
    /// Biases on the MLP projections.
    pub mlp_bias: bool,
    /// The MLP's gate activation.
    pub hidden_act: Activation,
    /// Keys a sliding-window layer sees: those at most `window − 1` slots before the query.
    pub sliding_window: Option<usize>,
    /// Each layer's attention when they differ (Qwen2/3's `max_window_layers`, Gemma 2's alternation);
    /// `None`: every layer sliding when `sliding_window` is set, else full.
    pub layer_types: Option<Vec<LayerType>>,
    /// Attention scale 1/√(this) instead of 1/√d (Gemma 2's `query_pre_attn_scalar`).
    pub query_pre_attn_scalar: Option<f64>,
    /// Attention scores become c·tanh(s/c) (Gemma 2).
    pub attn_logit_softcapping: Option<f64>,
    /// Logits become c·tanh(z/c) (Gemma 2).
    pub final_logit_softcapping: Option<f64>,
    /// Standard deviation of the random initialisation.
    pub initializer_range: f64,
    /// Beginning-of-sequence token, if any.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence tokens (generation stops at any of them).
    pub eos_token_ids: Vec<u32>,
    /// Padding token, if any (written back; not used).
    pub pad_token_id: Option<u32>,
    /// Where tokens come from.
    pub tokenizer: TokenizerKind,
}

impl ModelConfig {
    /// lora-rs' default byte-level base: a Llama of hidden 256, MLP 768, 4 layers, 8 heads, 4 KV heads,
    /// context 256 (3,279,104 parameters).
    pub fn byte_default() -> Self {
        ModelConfig {
            family: Family::Llama,
            vocab_size: 256,
            hidden_size: 256,
            intermediate_size: 768,
            num_hidden_layers: 4,
            num_attention_heads: 8,
            num_key_value_heads: 4,
            head_dim: 32,
            max_position_embeddings: 256,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: RopeScaling::Default,
            partial_rotary_factor: 1.0,
            tie_word_embeddings: false,
            attention_bias: false,
            mlp_bias: false,
            hidden_act: Activation::Silu,
            sliding_window: None,
            layer_types: None,
            query_pre_attn_scalar: None,
            attn_logit_softcapping: None,
            final_logit_softcapping: None,
            initializer_range: 0.02,
            bos_token_id: None,
            eos_token_ids: Vec::new(),
            pad_token_id: None,
            tokenizer: TokenizerKind::Bytes,
        }
    }

    /// The longest sequence the model takes: `max_position_embeddings`, or more where the RoPE scaling is
    /// dynamic NTK (which exists to go past it: `factor` times it).
    pub fn context_len(&self) -> usize {
        self.rope_scaling.context(self.max_position_embeddings)
    }

    /// The number of features of each head RoPE rotates (`int(head_dim · partial_rotary_factor)`).
    pub fn rotary_dim(&self) -> usize {
        (self.head_dim as f64 * self.partial_rotary_factor) as usize
    }

    /// The attention window of layer `l` (`None`: full causal attention).
    pub fn window(&self, l: usize) -> Option<usize> {
        match &self.layer_types {
            Some(types) if types.get(l) == Some(&LayerType::Full) => None,
            _ => self.sliding_window,
        }
    }

    /// The attention scale: 1/√(query_pre_attn_scalar) or 1/√d.
    pub fn attention_scale(&self) -> f64 {
        self.query_pre_attn_scalar.unwrap_or(self.head_dim as f64).powf(-0.5)
    }

    /// The projections of each decoder layer (transformers' module names, PEFT's `target_modules`).
    pub fn projections(&self) -> &'static [&'static str] {
        self.family.spec().projections
    }

    /// Total parameter count (lm_head counted once when tied).
    pub fn num_params(&self) -> usize {
        let per_layer: usize = crate::model::expected_shapes(self)
            .iter()
            .filter(|(n, _)| n.starts_with("model.layers.0."))
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        let head = if self.tie_word_embeddings { 0 } else { self.vocab_size * self.hidden_size };
        self.vocab_size * self.hidden_size + self.num_hidden_layers * per_layer + self.hidden_size + head
    }

    /// Checks every field; the error names the field and its value.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (k, v) in positive {
            if v == 0 {
                return Err(LmError::invalid(k, v, "must be at least 1"));
            }
        }
        if self.context_len() > u32::MAX as usize {
            return Err(LmError::invalid(
                "max_position_embeddings",
                self.max_position_embeddings,
                "must be at most 4294967295 (positions are 32-bit)",
            ));
        }
        if !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return Err(LmError::invalid(
                "num_key_value_heads",
                self.num_key_value_heads,
                format!("must divide num_attention_heads = {}", self.num_attention_heads),
            ));
        }
        if !(self.partial_rotary_factor > 0.0 && self.partial_rotary_factor <= 1.0) {
            return Err(LmError::invalid("partial_rotary_factor", self.partial_rotary_factor, "must be in (0, 1]"));
        }
        let rot = self.rotary_dim();
        if rot < 2 || !rot.is_multiple_of(2) {
            let what = if self.partial_rotary_factor == 1.0 { "head_dim" } else { "head_dim · partial_rotary_factor" };
            return Err(LmError::invalid(what, rot, "must be even and at least 2 (RoPE rotates pairs of features)"));
        }
        self.rope_scaling.check(rot).map_err(|(k, why)| LmError::invalid(k, self.rope_scaling.name(), why))?;
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(LmError::invalid("rms_norm_eps", self.rms_norm_eps, "must be a positive number"));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return Err(LmError::invalid("rope_theta", self.rope_theta, "must be a number above 1"));
        }
        if !(self.initializer_range.is_finite() && self.initializer_range >= 0.0) {
            return Err(LmError::invalid("initializer_range", self.initializer_range, "must be a non-negative number"));
        }
        if self.sliding_window == Some(0) {
            return Err(LmError::invalid("sliding_window", 0, "must be at least 1"));
        }
        if let Some(types) = &self.layer_types {
            if types.len() != self.num_hidden_layers {
                return Err(LmError::invalid(
                    "layer_types",
                    format!("{} entries", types.len()),
                    format!("must have one per layer (num_hidden_layers = {})", self.num_hidden_layers),
                ));
            }
            if self.sliding_window.is_none() && types.contains(&LayerType::Sliding) {
                return Err(LmError::invalid("layer_types", "\"sliding_attention\"", "needs a sliding_window"));
            }
        }
        for (k, v) in [
            ("query_pre_attn_scalar", self.query_pre_attn_scalar),
            ("attn_logit_softcapping", self.attn_logit_softcapping),
            ("final_logit_softcapping", self.final_logit_softcapping),
        ] {
            if let Some(x) = v.filter(|x| !(x.is_finite() && *x > 0.0)) {
                return Err(LmError::invalid(k, x, "must be a positive number"));
            }
        }
        if self.tokenizer == TokenizerKind::Bytes && self.vocab_size < 256 {
            return Err(LmError::invalid("vocab_size", self.vocab_size, "a byte-level model needs at least 256 tokens"));
        }
        let v = self.vocab_size as u64;
        if let Some(id) = self.bos_token_id.filter(|&b| b as u64 >= v) {
            return Err(LmError::invalid("bos_token_id", id, format!("must be below vocab_size = {v}")));
        }
        if let Some(id) = self.eos_token_ids.iter().find(|&&e| e as u64 >= v) {
            return Err(LmError::invalid("eos_token_id", id, format!("must be below vocab_size = {v}")));
        }
        (self.family.spec().validate)(self)
    }

    /// Reads `config.json` text; `path` names the file in errors. The family comes from `model_type` (or,
    /// without one, `architectures`); every key is read by the family or known to be metadata, any other is
    /// refused by name.
    pub fn from_json(path: &Path, text: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text).map_err(|e| LmError::file(path, format!("not valid JSON: {e}")))?;
        let obj = v.as_object().ok_or_else(|| LmError::file(path, "not a JSON object"))?;
        let r = Reader { path, obj, seen: RefCell::new(BTreeSet::new()) };
        let family = Family::of_config(&r)?;
        let spec = family.spec();
        if let Some(a) = r.get("architectures") {
            let ok = a.as_array().is_some_and(|a| a.iter().any(|x| x.as_str() == Some(spec.architecture)));
            if !ok {
                return Err(r.bad("architectures", a, format!("model_type \"{}\" is read as a {}", spec.model_type, spec.architecture)));
            }
        }
        let mut c = r.common(family)?;
        (spec.read)(&r, &mut c)?;
        for (key, value) in obj {
            if !r.seen.borrow().contains(key.as_str()) && !value.is_null() && !IGNORED.contains(&key.as_str()) {
                return Err(r.bad(
                    key,
                    value,
                    format!("lora-rs does not implement this key of a {} (it may change what the model computes)", spec.architecture),
                ));
            }
        }
        c.validate().map_err(|e| LmError::file(path, e.to_string()))?;
        Ok(c)
    }

    /// The `config.json` transformers writes for this model (float32 weights): the keys every family shares,
    /// then the family's own. RoPE θ is written both as `rope_theta` (transformers 4) and inside
    /// `rope_parameters` (transformers 5).
    pub fn to_json(&self) -> Value {
        let spec = self.family.spec();
        let eos: Value = match self.eos_token_ids.as_slice() {
            [] => Value::Null,
            [one] => json!(one),
            many => json!(many),
        };
        let rope = self.rope_scaling.to_object(self.rope_theta, self.partial_rotary_factor);
        let mut v = json!({
            "architectures": [spec.architecture],
            "model_type": spec.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": if self.rope_scaling == RopeScaling::Default { Value::Null } else { rope.clone() },
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_dropout": 0.0,
            "hidden_act": self.hidden_act.name(),
            "initializer_range": self.initializer_range,
            "use_cache": true,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "float32",
        });
        (spec.write)(self, v.as_object_mut().expect("an object"));
        if self.tokenizer == TokenizerKind::Bytes {
            v["lora_rs_tokenizer"] = json!("bytes");
        }
        v
    }
}

/// Keys that do not change what a model computes, accepted and not read: file metadata, and generation
/// defaults (lora-rs takes sampling settings from its caller).
const IGNORED: &[&str] = &[
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "use_cache",
    "auto_map",
    "cache_implementation",
    "tokenizer_class",
    "attn_implementation",
    "_attn_implementation",
    "_attn_implementation_autoset",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "use_return_dict",
    "torchscript",
    "id2label",
    "label2id",
    "problem_type",
    "finetuning_task",
    "task_specific_params",
    "prefix",
    "sep_token_id",
    "decoder_start_token_id",
    "is_encoder_decoder",
    "is_decoder",
    "add_cross_attention",
    "tie_encoder_decoder",
    "chunk_size_feed_forward",
    "pruned_heads",
    "tf_legacy_loss",
    "use_bfloat16",
    "max_length",
    "min_length",
    "do_sample",
    "early_stopping",
    "num_beams",
    "num_beam_groups",
    "diversity_penalty",
    "temperature",
    "top_k",
    "top_p",
    "typical_p",
    "repetition_penalty",
    "length_penalty",
    "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size",
    "bad_words_ids",
    "num_return_sequences",
    "output_scores",
    "return_dict_in_generate",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "remove_invalid_values",
    "exponential_decay_length_penalty",
    "suppress_tokens",
    "begin_suppress_tokens",
];

/// Field access on a config object with errors naming the file and key; remembers the keys read.
pub(crate) struct Reader<'a> {
    path: &'a Path,
    obj: &'a Map<String, Value>,
    seen: RefCell<BTreeSet<String>>,
}

impl Reader<'_> {
    /// The value of `key` (null counts as absent); the key counts as read.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.seen.borrow_mut().insert(key.to_string());
        self.obj.get(key).filter(|v| !v.is_null())
    }
    /// The value of `key` as written, `null` included; the key counts as read.
    pub fn raw(&self, key: &str) -> Option<&Value> {
        self.seen.borrow_mut().insert(key.to_string());
        self.obj.get(key)
    }
    /// An error naming the file, the key and its value.
    pub fn bad(&self, key: &str, v: &Value, why: impl Into<String>) -> LmError {
        LmError::file(self.path, format!("{key} = {v}: {}", why.into()))
    }
    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if n <= u32::MAX as u64 => Ok(Some(n as usize)),
                _ => Err(self.bad(key, v, "must be a non-negative integer")),
            },
        }
    }
    pub fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?.ok_or_else(|| LmError::file(self.path, format!("missing key {key}")))
    }
    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        self.get(key).map(|v| v.as_f64().ok_or_else(|| self.bad(key, v, "must be a number"))).transpose()
    }
    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key).map(|v| v.as_bool().ok_or_else(|| self.bad(key, v, "must be true or false"))).transpose()
    }
    pub fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        self.get(key).map(|v| v.as_str().ok_or_else(|| self.bad(key, v, "must be a string"))).transpose()
    }
    fn token_id(&self, key: &str, v: &Value) -> Result<u32> {
        v.as_u64().filter(|&n| n <= u32::MAX as u64).map(|n| n as u32).ok_or_else(|| self.bad(key, v, "must be a token id"))
    }
    /// A key that only acts in training the base (a dropout): 0 is accepted, anything else refused.
    pub fn zero(&self, key: &str) -> Result<()> {
        match self.opt_f64(key)? {
            Some(x) if x != 0.0 => Err(self.bad(key, &json!(x), "only 0 is supported (lora-rs applies no dropout to the base)")),
            _ => Ok(()),
        }
    }
    /// A boolean key of which lora-rs implements one value.
    pub fn only(&self, key: &str, want: bool, why: &str) -> Result<()> {
        match self.opt_bool(key)? {
            Some(b) if b != want => Err(self.bad(key, &json!(b), why)),
            _ => Ok(()),
        }
    }

    /// The keys every family reads the same way.
    fn common(&self, family: Family) -> Result<ModelConfig> {
        let spec = family.spec();
        if let Some(tp) = self.get("pretraining_tp") {
            if tp.as_u64() != Some(1) {
                return Err(self.bad("pretraining_tp", tp, "only 1 is supported"));
            }
        }
        self.zero("attention_dropout")?;
        let hidden_size = self.usize("hidden_size")?;
        let num_attention_heads = self.usize("num_attention_heads")?;
        let num_key_value_heads = self.opt_usize("num_key_value_heads")?.unwrap_or(num_attention_heads);
        let head_dim = match self.opt_usize("head_dim")? {
            Some(d) => d,
            None if num_attention_heads > 0 && hidden_size % num_attention_heads == 0 => hidden_size / num_attention_heads,
            None => {
                return Err(self.bad(
                    "hidden_size",
                    &json!(hidden_size),
                    format!("is not a multiple of num_attention_heads = {num_attention_heads} and no head_dim is given"),
                ))
            }
        };
        let tokenizer = match self.get("lora_rs_tokenizer") {
            None => TokenizerKind::File,
            Some(Value::String(s)) if s == "bytes" => TokenizerKind::Bytes,
            Some(other) => return Err(self.bad("lora_rs_tokenizer", other, "the only value lora-rs knows is \"bytes\"")),
        };
        let eos_token_ids = match self.get("eos_token_id") {
            None => Vec::new(),
            Some(Value::Array(a)) => a.iter().map(|x| self.token_id("eos_token_id", x)).collect::<Result<_>>()?,
            Some(x) => vec![self.token_id("eos_token_id", x)?],
        };
        let bos_token_id = self.get("bos_token_id").map(|x| self.token_id("bos_token_id", x)).transpose()?;
        let pad_token_id = self.get("pad_token_id").map(|x| self.token_id("pad_token_id", x)).transpose()?;
        let act_key = spec.activation_key;
        let hidden_act = match self.opt_str(act_key)? {
            None => spec.default_activation,
            Some(name) => Activation::from_name(name)
                .ok_or_else(|| self.bad(act_key, &json!(name), "lora-rs implements \"silu\" (SwiGLU) and \"gelu_pytorch_tanh\" (GeGLU)"))?,
        };
        let max_position_embeddings = self.opt_usize("max_position_embeddings")?.unwrap_or(spec.default_context);
        let mut c = ModelConfig {
            family,
            vocab_size: self.usize("vocab_size")?,
            hidden_size,
            intermediate_size: self.usize("intermediate_size")?,
            num_hidden_layers: self.usize("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            max_position_embeddings,
            rms_norm_eps: self.opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta: 10000.0,
            rope_scaling: RopeScaling::Default,
            partial_rotary_factor: 1.0,
            tie_word_embeddings: self.opt_bool("tie_word_embeddings")?.unwrap_or(spec.default_tied),
            attention_bias: false,
            mlp_bias: false,
            hidden_act,
            sliding_window: None,
            layer_types: None,
            query_pre_attn_scalar: None,
            attn_logit_softcapping: None,
            final_logit_softcapping: None,
            initializer_range: self.opt_f64("initializer_range")?.unwrap_or(0.02),
            bos_token_id,
            eos_token_ids,
            pad_token_id,
            tokenizer,
        };
        self.rope(&mut c)?;
        Ok(c)
    }

    /// θ, the scaling and the partial rotary factor, from `rope_scaling` (transformers 4; it wins when both are
    /// given, as in transformers) or `rope_parameters` (transformers 5), and the top-level `rope_theta` and
    /// `partial_rotary_factor`. A top-level `original_max_position_embeddings` overrides the object's, as
    /// transformers' `standardize_rope_params` does.
    fn rope(&self, c: &mut ModelConfig) -> Result<()> {
        let scaling = self.get("rope_scaling");
        let params = self.get("rope_parameters");
        let top_theta = self.opt_f64("rope_theta")?;
        let top_partial = self.opt_f64("partial_rotary_factor")?;
        let original = self.opt_usize("original_max_position_embeddings")?;
        let (key, obj) = match (scaling, params) {
            (Some(s), _) => ("rope_scaling", Some(s)),
            (None, Some(p)) => ("rope_parameters", Some(p)),
            (None, None) => ("rope_parameters", None),
        };
        let empty = Map::new();
        let obj = match obj {
            None => &empty,
            Some(v) => v.as_object().ok_or_else(|| self.bad(key, v, "must be an object"))?,
        };
        if let Some((k, _)) = obj.iter().find(|(_, v)| v.is_object()) {
            return Err(self.bad(&format!("{key}.{k}"), &obj[k], "per-layer-type RoPE parameters are not implemented"));
        }
        let num = |k: &str| -> Result<Option<f64>> {
            obj.get(k)
                .filter(|v| !v.is_null())
                .map(|v| v.as_f64().ok_or_else(|| self.bad(&format!("{key}.{k}"), v, "must be a number")))
                .transpose()
        };
        c.rope_theta = num("rope_theta")?.or(top_theta).unwrap_or(10000.0);
        c.partial_rotary_factor = num("partial_rotary_factor")?.or(top_partial).unwrap_or(1.0);
        let mut obj = obj.clone();
        if c.family == Family::Phi3 {
            // Phi-3's config maps the old names of its scaling to longrope.
            if let Some(t) = obj.get("rope_type").or_else(|| obj.get("type")).and_then(Value::as_str) {
                if t == "su" || t == "yarn" {
                    obj.insert("rope_type".into(), json!("longrope"));
                    obj.remove("type");
                }
            }
        }
        let original = if c.family == Family::Phi3 { Some(original.unwrap_or(4096)) } else { original };
        c.rope_scaling = RopeScaling::from_object(&obj, original, c.max_position_embeddings)
            .map_err(|(k, v, why)| self.bad(&format!("{key}.{k}"), &v, why))?;
        Ok(())
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::rope_scaling::RopeScaling;

    fn err(text: &str) -> String {
        LlamaConfig::from_json(Path::new("m/config.json"), text).unwrap_err().to_string()
    }

    #[test]
    fn the_default_byte_model_has_the_documented_parameter_count() {
        assert_eq!(LlamaConfig::byte_default().num_params(), 3_279_104);
    }

    #[test]
    fn written_config_reads_back_to_the_same_config() {
        let mut c = LlamaConfig::byte_default();
        c.eos_token_ids = vec![3, 7];
        c.bos_token_id = Some(1);
        let text = serde_json::to_string_pretty(&c.to_json()).unwrap();
        assert_eq!(LlamaConfig::from_json(Path::new("x"), &text).unwrap(), c);
    }

    #[test]
    fn missing_and_wrong_keys_are_named_with_the_file() {
        let ok = LlamaConfig::byte_default().to_json();
        let without = |k: &str| {
            let mut v = ok.clone();
            v.as_object_mut().unwrap().remove(k);
            v.to_string()
        };
        let with = |k: &str, x: Value| {
            let mut v = ok.clone();
            v[k] = x;
            v.to_string()
        };
        let e = err(&without("hidden_size"));
        assert!(e.contains("m/config.json") && e.contains("missing key hidden_size"), "{e}");
        assert!(err(&with("num_key_value_heads", json!(3))).contains("num_key_value_heads = 3: must divide num_attention_heads = 8"));
        assert!(err(&with("hidden_act", json!("gelu"))).contains("hidden_act = \"gelu\""));
        assert!(err(&with("model_type", json!("gpt2"))).contains("model_type = \"gpt2\""));
        assert!(err(&with("vocab_size", json!(-4))).contains("vocab_size = -4"));
        let e = err(&with("rope_parameters", json!({"rope_type": "llama3", "rope_theta": 5e5})));
        assert!(e.contains("rope_parameters.factor = null: is required by rope_type \"llama3\""), "{e}");
        let e = err(&with("rope_parameters", json!({"rope_type": "su", "rope_theta": 5e5})));
        assert!(e.contains("rope_parameters.rope_type = \"su\""), "{e}");
        let e = err(&with("rope_parameters", json!({"rope_type": "linear", "factor": 2.0, "low_freq_factor": 1.0})));
        assert!(e.contains("rope_parameters.low_freq_factor = 1.0: not a parameter of rope_type \"linear\""), "{e}");
        let e = err(&with("use_flash_rope", json!(true)));
        assert!(e.contains("use_flash_rope = true: lora-rs does not implement this key of a LlamaForCausalLM"), "{e}");
        let e = err(&with("attention_dropout", json!(0.1)));
        assert!(e.contains("attention_dropout = 0.1: only 0 is supported"), "{e}");
        let e = err(&with("partial_rotary_factor", json!(0.5)));
        assert!(e.contains("partial_rotary_factor = 0.5"), "{e}");
        let e = err(&with("sliding_window", json!(8)));
        assert!(e.contains("sliding_window = 8: lora-rs does not implement this key of a LlamaForCausalLM"), "{e}");
        assert!(err(&with("lora_rs_tokenizer", json!("words"))).contains("lora_rs_tokenizer = \"words\""));
        assert!(err("[1]").contains("not a JSON object"));
        assert!(err("{").contains("not valid JSON"));
    }

    /// config.json as the Hugging Face hub has it for real checkpoints (transformers 4 spellings:
    /// `rope_scaling`, `rope_theta`, `torch_dtype`), shapes cut down to load quickly.
    const HUB_CONFIGS: [(&str, &str); 6] = [
        (
            "Llama-3.2-1B",
            r#"{"architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0, "bos_token_id": 128000,
            "eos_token_id": [128001, 128008, 128009], "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048,
            "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": false,
            "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
            "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0,
            "low_freq_factor": 1.0, "original_max_position_embeddings": 8192, "rope_type": "llama3"}, "rope_theta": 500000.0,
            "tie_word_embeddings": true, "torch_dtype": "bfloat16", "transformers_version": "4.45.0.dev0", "use_cache": true,
            "vocab_size": 128256}"#,
        ),
        (
            "Qwen2.5-0.5B",
            r#"{"architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151643,
            "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02, "intermediate_size": 4864,
            "max_position_embeddings": 32768, "max_window_layers": 24, "model_type": "qwen2", "num_attention_heads": 14,
            "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
            "sliding_window": 32768, "tie_word_embeddings": true, "torch_dtype": "bfloat16", "transformers_version": "4.40.1",
            "use_cache": true, "use_sliding_window": false, "vocab_size": 151936}"#,
        ),
        (
            "Mistral-7B-v0.1",
            r#"{"architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
            "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 32768,
            "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
            "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": false,
            "torch_dtype": "bfloat16", "transformers_version": "4.34.0.dev0", "use_cache": true, "vocab_size": 32000}"#,
        ),
        (
            "gemma-2-2b",
            r#"{"architectures": ["Gemma2ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
            "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": 1,
            "final_logit_softcapping": 30.0, "head_dim": 256, "hidden_act": "gelu_pytorch_tanh",
            "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304, "initializer_range": 0.02, "intermediate_size": 9216,
            "max_position_embeddings": 8192, "model_type": "gemma2", "num_attention_heads": 8, "num_hidden_layers": 26,
            "num_key_value_heads": 4, "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06,
            "rope_theta": 10000.0, "sliding_window": 4096, "torch_dtype": "float32", "transformers_version": "4.42.4",
            "use_cache": true, "vocab_size": 256000}"#,
        ),
        (
            "Phi-3-mini-128k",
            r#"{"_name_or_path": "Phi-3-mini-128k-instruct", "architectures": ["Phi3ForCausalLM"], "attention_bias": false,
            "attention_dropout": 0.0, "auto_map": {"AutoConfig": "configuration_phi3.Phi3Config"}, "bos_token_id": 1,
            "embd_pdrop": 0.0, "eos_token_id": 32000, "hidden_act": "silu", "hidden_size": 3072, "initializer_range": 0.02,
            "intermediate_size": 8192, "max_position_embeddings": 131072, "model_type": "phi3", "num_attention_heads": 32,
            "num_hidden_layers": 32, "num_key_value_heads": 32, "original_max_position_embeddings": 4096, "pad_token_id": 32000,
            "resid_pdrop": 0.0, "rms_norm_eps": 1e-05, "rope_scaling": {"long_factor": [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7,
            1.8, 1.9, 2.0, 2.1, 2.2, 2.3, 2.4, 2.5, 2.6, 2.7, 2.8, 2.9, 3.0, 3.1, 3.2, 3.3, 3.4, 3.5, 3.6, 3.7, 3.8, 3.9, 4.0, 4.1,
            4.2, 4.3, 4.4, 4.5, 4.6, 4.7, 4.8, 4.9, 5.0, 5.1, 5.2, 5.3, 5.4, 5.5, 5.6, 5.7], "short_factor": [1.0, 1.0, 1.0, 1.0,
            1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0,
            1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], "type": "su"},
            "rope_theta": 10000.0, "sliding_window": 262144, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
            "transformers_version": "4.39.3", "use_cache": true, "vocab_size": 32064}"#,
        ),
        (
            "Qwen3-0.6B",
            r#"{"architectures": ["Qwen3ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0, "bos_token_id": 151643,
            "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 1024, "initializer_range": 0.02,
            "intermediate_size": 3072, "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3",
            "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
            "rope_scaling": null, "rope_theta": 1000000, "sliding_window": null, "tie_word_embeddings": true,
            "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": true, "use_sliding_window": false,
            "vocab_size": 151936}"#,
        ),
    ];

    #[test]
    fn hub_configs_of_every_family_read_as_transformers_reads_them_and_write_back_the_same() {
        for (name, text) in HUB_CONFIGS {
            let c = ModelConfig::from_json(Path::new(name), text).unwrap_or_else(|e| panic!("{name}: {e}"));
            let back = ModelConfig::from_json(Path::new(name), &c.to_json().to_string()).unwrap_or_else(|e| panic!("{name} written: {e}"));
            assert_eq!(back, c, "{name}: written config reads back the same");
            match name {
                "Llama-3.2-1B" => {
                    assert_eq!((c.family, c.head_dim, c.tie_word_embeddings, c.eos_token_ids.len()), (Family::Llama, 64, true, 3));
                    assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { factor: 32.0, original_max_position_embeddings: 8192, .. }));
                }
                "Qwen2.5-0.5B" => {
                    assert_eq!((c.family, c.head_dim, c.sliding_window), (Family::Qwen2, 64, None), "use_sliding_window false: no window");
                    assert!((0..24).all(|l| c.window(l).is_none()));
                    assert!(c.family.bias(&c, "k_proj") && !c.family.bias(&c, "o_proj"));
                }
                "Mistral-7B-v0.1" => assert_eq!((c.family, c.window(31)), (Family::Mistral, Some(4096))),
                "gemma-2-2b" => {
                    assert_eq!(
                        (c.family, c.hidden_act, c.window(0), c.window(1)),
                        (Family::Gemma2, Activation::GeluTanh, Some(4096), None)
                    );
                    assert_eq!(
                        (c.attn_logit_softcapping, c.final_logit_softcapping, c.attention_scale()),
                        (Some(50.0), Some(30.0), 1.0 / 16.0)
                    );
                }
                "Phi-3-mini-128k" => {
                    assert_eq!((c.family, c.projections().len()), (Family::Phi3, 4));
                    assert!(
                        matches!(&c.rope_scaling, RopeScaling::LongRope { original_max_position_embeddings: 4096, long_factor, .. } if long_factor.len() == 48),
                        "\"su\" is longrope"
                    );
                }
                _ => assert_eq!((c.family, c.head_dim, c.window(0)), (Family::Qwen3, 128, None)),
            }
        }
    }

    #[test]
    fn settings_a_family_does_not_have_are_refused_by_key() {
        let qwen: Value = serde_json::from_str(HUB_CONFIGS[1].1).unwrap();
        let mut v = qwen.clone();
        v["model_type"] = json!("gpt_neox");
        let e = err(&v.to_string());
        assert!(e.contains("model_type = \"gpt_neox\": lora-rs implements the model types \"llama\", \"mistral\""), "{e}");
        let mut v = qwen.clone();
        v.as_object_mut().unwrap().remove("model_type");
        v["architectures"] = json!(["GPTNeoXForCausalLM"]);
        assert!(err(&v.to_string()).contains("architectures = [\"GPTNeoXForCausalLM\"]: lora-rs implements LlamaForCausalLM"));
        let mut v = qwen.clone();
        v["architectures"] = json!(["LlamaForCausalLM"]);
        assert!(err(&v.to_string()).contains("model_type \"qwen2\" is read as a Qwen2ForCausalLM"));
        let mut v = qwen.clone();
        v["attn_logit_softcapping"] = json!(30.0);
        assert!(err(&v.to_string()).contains("attn_logit_softcapping = 30.0: lora-rs does not implement this key of a Qwen2ForCausalLM"));
        let mut v = qwen.clone();
        v["layer_types"] = json!(["full_attention", "chunked_attention"]);
        assert!(err(&v.to_string()).contains("layer_types = \"chunked_attention\""));
        let mut v: Value = serde_json::from_str(HUB_CONFIGS[4].1).unwrap();
        v["rope_scaling"]["type"] = json!("dynamic");
        assert!(err(&v.to_string()).contains("dynamic"));
        let mut v: Value = serde_json::from_str(HUB_CONFIGS[4].1).unwrap();
        v["resid_pdrop"] = json!(0.1);
        assert!(err(&v.to_string()).contains("resid_pdrop = 0.1: only 0 is supported"));
        let mut v: Value = serde_json::from_str(HUB_CONFIGS[3].1).unwrap();
        v["use_bidirectional_attention"] = json!(true);
        assert!(err(&v.to_string()).contains("use_bidirectional_attention = true"));
        v["use_bidirectional_attention"] = json!(false);
        v["hidden_activation"] = json!("relu");
        assert!(err(&v.to_string()).contains("hidden_activation = \"relu\""));
        let mut v: Value = serde_json::from_str(HUB_CONFIGS[0].1).unwrap();
        v["quantization_config"] = json!({"quant_method": "gptq"});
        assert!(err(&v.to_string()).contains("quantization_config = "));
    }

    #[test]
    fn head_dim_defaults_to_hidden_over_heads_and_theta_reads_both_spellings() {
        let mut v = LlamaConfig::byte_default().to_json();
        let o = v.as_object_mut().unwrap();
        o.remove("head_dim");
        o.remove("rope_parameters");
        o.insert("rope_theta".into(), json!(500.0));
        let c = LlamaConfig::from_json(Path::new("x"), &v.to_string()).unwrap();
        assert_eq!((c.head_dim, c.rope_theta), (32, 500.0));
        v["rope_parameters"] = json!({"rope_type": "default", "rope_theta": 20.0});
        assert_eq!(LlamaConfig::from_json(Path::new("x"), &v.to_string()).unwrap().rope_theta, 20.0);
    }
}
