//! [`LlamaConfig`]: the keys of Hugging Face's `config.json` for `LlamaForCausalLM`, read and written.
//!
//! Shapes follow from the config: hidden size H, `num_attention_heads` n_h query heads of `head_dim` d
//! (default H / n_h), `num_key_value_heads` n_kv key/value heads (n_h a multiple of n_kv: each K/V head
//! serves n_h / n_kv query heads), MLP width I, vocabulary V. Per layer, q_proj (n_h·d, H), k_proj and
//! v_proj (n_kv·d, H), o_proj (H, n_h·d), gate_proj and up_proj (I, H), down_proj (H, I), two RMSNorm
//! weights (H); then the final norm (H), the embedding (V, H) and lm_head (V, H) unless it is tied to the
//! embedding. lora-rs' own key `lora_rs_tokenizer: "bytes"` marks models whose tokens are UTF-8 bytes.

use std::path::Path;

use serde_json::{json, Map, Value};

use crate::error::{LmError, Result};

/// Where a model's tokens come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenizerKind {
    /// Token ids are the bytes of the UTF-8 text (vocabulary 256): models trained by lora-rs.
    Bytes,
    /// The model directory's `tokenizer.json`, read with the `tokenizers` crate.
    File,
}

/// The architecture of a Llama-family decoder, as `config.json` describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
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
    /// Context length the model was built for (the longest sequence it is given).
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base θ.
    pub rope_theta: f64,
    /// Whether lm_head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v/o projections.
    pub attention_bias: bool,
    /// Biases on the MLP projections.
    pub mlp_bias: bool,
    /// Standard deviation of the random initialisation.
    pub initializer_range: f64,
    /// Beginning-of-sequence token, if any.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence tokens (generation stops at any of them).
    pub eos_token_ids: Vec<u32>,
    /// Where tokens come from.
    pub tokenizer: TokenizerKind,
}

impl LlamaConfig {
    /// lora-rs' default byte-level base: hidden 256, MLP 768, 4 layers, 8 heads, 4 KV heads, context 256
    /// (3,279,104 parameters).
    pub fn byte_default() -> Self {
        LlamaConfig {
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
            tie_word_embeddings: false,
            attention_bias: false,
            mlp_bias: false,
            initializer_range: 0.02,
            bos_token_id: None,
            eos_token_ids: Vec::new(),
            tokenizer: TokenizerKind::Bytes,
        }
    }

    /// Total parameter count (lm_head counted once when tied).
    pub fn num_params(&self) -> usize {
        let (h, i, d) = (self.hidden_size, self.intermediate_size, self.head_dim);
        let (q, kv) = (self.num_attention_heads * d, self.num_key_value_heads * d);
        let attn_b = if self.attention_bias { q + 2 * kv + h } else { 0 };
        let mlp_b = if self.mlp_bias { 2 * i + h } else { 0 };
        let layer = h * q + 2 * h * kv + q * h + attn_b + 3 * h * i + mlp_b + 2 * h;
        let head = if self.tie_word_embeddings { 0 } else { self.vocab_size * h };
        self.vocab_size * h + self.num_hidden_layers * layer + h + head
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
        if self.max_position_embeddings > u32::MAX as usize {
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
        if !self.head_dim.is_multiple_of(2) {
            return Err(LmError::invalid("head_dim", self.head_dim, "must be even (RoPE rotates pairs of features)"));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(LmError::invalid("rms_norm_eps", self.rms_norm_eps, "must be a positive number"));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return Err(LmError::invalid("rope_theta", self.rope_theta, "must be a number above 1"));
        }
        if !(self.initializer_range.is_finite() && self.initializer_range >= 0.0) {
            return Err(LmError::invalid("initializer_range", self.initializer_range, "must be a non-negative number"));
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
        Ok(())
    }

    /// Reads `config.json` text; `path` names the file in errors.
    pub fn from_json(path: &Path, text: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text).map_err(|e| LmError::file(path, format!("not valid JSON: {e}")))?;
        let obj = v.as_object().ok_or_else(|| LmError::file(path, "not a JSON object"))?;
        let r = Reader { path, obj };
        if let Some(mt) = r.get("model_type") {
            if mt.as_str() != Some("llama") {
                return Err(r.bad("model_type", mt, "only \"llama\" models are supported"));
            }
        }
        if let Some(a) = r.get("architectures") {
            let ok = a.as_array().is_some_and(|a| a.iter().any(|x| x.as_str() == Some("LlamaForCausalLM")));
            if !ok {
                return Err(r.bad("architectures", a, "must include \"LlamaForCausalLM\""));
            }
        }
        if let Some(act) = r.get("hidden_act") {
            if act.as_str() != Some("silu") {
                return Err(r.bad("hidden_act", act, "only \"silu\" (SwiGLU) is supported"));
            }
        }
        if let Some(tp) = r.get("pretraining_tp") {
            if tp.as_u64() != Some(1) {
                return Err(r.bad("pretraining_tp", tp, "only 1 is supported"));
            }
        }
        let hidden_size = r.usize("hidden_size")?;
        let num_attention_heads = r.usize("num_attention_heads")?;
        let num_key_value_heads = r.opt_usize("num_key_value_heads")?.unwrap_or(num_attention_heads);
        let head_dim = match r.opt_usize("head_dim")? {
            Some(d) => d,
            None if num_attention_heads > 0 && hidden_size % num_attention_heads == 0 => hidden_size / num_attention_heads,
            None => {
                return Err(r.bad(
                    "hidden_size",
                    &json!(hidden_size),
                    format!("is not a multiple of num_attention_heads = {num_attention_heads} and no head_dim is given"),
                ))
            }
        };
        let rope_theta = r.rope_theta()?;
        let tokenizer = match r.get("lora_rs_tokenizer") {
            None => TokenizerKind::File,
            Some(Value::String(s)) if s == "bytes" => TokenizerKind::Bytes,
            Some(other) => return Err(r.bad("lora_rs_tokenizer", other, "the only value lora-rs knows is \"bytes\"")),
        };
        let eos_token_ids = match r.get("eos_token_id") {
            None => Vec::new(),
            Some(Value::Array(a)) => a.iter().map(|x| r.token_id("eos_token_id", x)).collect::<Result<_>>()?,
            Some(x) => vec![r.token_id("eos_token_id", x)?],
        };
        let bos_token_id = r.get("bos_token_id").map(|x| r.token_id("bos_token_id", x)).transpose()?;
        let c = LlamaConfig {
            vocab_size: r.usize("vocab_size")?,
            hidden_size,
            intermediate_size: r.usize("intermediate_size")?,
            num_hidden_layers: r.usize("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            max_position_embeddings: r.opt_usize("max_position_embeddings")?.unwrap_or(2048),
            rms_norm_eps: r.opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            tie_word_embeddings: r.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            attention_bias: r.opt_bool("attention_bias")?.unwrap_or(false),
            mlp_bias: r.opt_bool("mlp_bias")?.unwrap_or(false),
            initializer_range: r.opt_f64("initializer_range")?.unwrap_or(0.02),
            bos_token_id,
            eos_token_ids,
            tokenizer,
        };
        c.validate().map_err(|e| LmError::file(path, e.to_string()))?;
        Ok(c)
    }

    /// The `config.json` transformers writes for this architecture (float32 weights). RoPE θ is written
    /// both as `rope_theta` (transformers 4) and inside `rope_parameters` (transformers 5).
    pub fn to_json(&self) -> Value {
        let eos: Value = match self.eos_token_ids.as_slice() {
            [] => Value::Null,
            [one] => json!(one),
            many => json!(many),
        };
        let mut v = json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
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
            "rope_scaling": null,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "attention_dropout": 0.0,
            "mlp_bias": self.mlp_bias,
            "hidden_act": "silu",
            "initializer_range": self.initializer_range,
            "pretraining_tp": 1,
            "use_cache": true,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "torch_dtype": "float32",
        });
        if self.tokenizer == TokenizerKind::Bytes {
            v["lora_rs_tokenizer"] = json!("bytes");
        }
        v
    }
}

/// Field access on a config object with errors naming the file and key.
struct Reader<'a> {
    path: &'a Path,
    obj: &'a Map<String, Value>,
}

impl Reader<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }
    fn bad(&self, key: &str, v: &Value, why: impl Into<String>) -> LmError {
        LmError::file(self.path, format!("{key} = {v}: {}", why.into()))
    }
    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if n <= u32::MAX as u64 => Ok(Some(n as usize)),
                _ => Err(self.bad(key, v, "must be a non-negative integer")),
            },
        }
    }
    fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?.ok_or_else(|| LmError::file(self.path, format!("missing key {key}")))
    }
    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        self.get(key).map(|v| v.as_f64().ok_or_else(|| self.bad(key, v, "must be a number"))).transpose()
    }
    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key).map(|v| v.as_bool().ok_or_else(|| self.bad(key, v, "must be true or false"))).transpose()
    }
    fn token_id(&self, key: &str, v: &Value) -> Result<u32> {
        v.as_u64().filter(|&n| n <= u32::MAX as u64).map(|n| n as u32).ok_or_else(|| self.bad(key, v, "must be a token id"))
    }
    /// θ from `rope_parameters` (transformers 5) or `rope_theta`; any RoPE scaling is refused by name.
    fn rope_theta(&self) -> Result<f64> {
        for key in ["rope_parameters", "rope_scaling"] {
            if let Some(p) = self.get(key) {
                let obj = p.as_object().ok_or_else(|| self.bad(key, p, "must be an object"))?;
                let kind = obj.get("rope_type").or_else(|| obj.get("type")).and_then(Value::as_str).unwrap_or("default");
                if kind != "default" {
                    return Err(self.bad(&format!("{key}.rope_type"), &json!(kind), "only \"default\" RoPE (no scaling) is supported"));
                }
                if key == "rope_parameters" {
                    if let Some(t) = obj.get("rope_theta") {
                        return t.as_f64().ok_or_else(|| self.bad("rope_parameters.rope_theta", t, "must be a number"));
                    }
                }
            }
        }
        Ok(self.opt_f64("rope_theta")?.unwrap_or(10000.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(err(&with("rope_parameters", json!({"rope_type": "llama3", "rope_theta": 5e5}))).contains("rope_parameters.rope_type"));
        assert!(err(&with("lora_rs_tokenizer", json!("words"))).contains("lora_rs_tokenizer = \"words\""));
        assert!(err("[1]").contains("not a JSON object"));
        assert!(err("{").contains("not valid JSON"));
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
