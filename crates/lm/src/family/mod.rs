//! The model families lora-rs reads, trains, serves and writes: one file per transformers model type, each a
//! [`FamilySpec`] (its `config.json` keys, tensor names and the blocks it uses), over one shared decoder
//! ([`crate::Llama`]):
//!
//! ```text
//! family    projections per layer                 norms per layer                     what differs
//! llama     q k v o gate up down                  input, post_attention               biases (attention_bias, mlp_bias)
//! mistral   q k v o gate up down                  input, post_attention               sliding window
//! qwen2     q k v o gate up down                  input, post_attention               q/k/v biases, window from layer max_window_layers
//! qwen3     q k v o gate up down                  input, post_attention, q_norm, k_norm   per-head q/k RMSNorm before RoPE
//! gemma2    q k v o gate up down                  input, post_attention, pre_/post_feedforward   GeGLU, (1 + w) norms,
//!                                                   √H-scaled embedding, soft-capping, alternating windows, sandwich norms
//! phi3      qkv o gate_up down                    input, post_attention               fused projections, partial rotary
//! ```
//!
//! Adding a family is a file with its [`FamilySpec`] (keys read and written, defaults, which blocks it uses)
//! and a variant of [`Family`]; a block no family has yet goes in the shared decoder behind a switch here.

mod gemma2;
mod llama;
mod mistral;
mod phi3;
mod qwen2;
mod qwen3;

use serde_json::{Map, Value};

use crate::config::{ModelConfig, Reader};
use crate::error::{LmError, Result};

/// A model family: transformers' `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// `LlamaForCausalLM` (Llama 2, Llama 3.x).
    Llama,
    /// `MistralForCausalLM`.
    Mistral,
    /// `Qwen2ForCausalLM` (Qwen2, Qwen2.5).
    Qwen2,
    /// `Qwen3ForCausalLM`.
    Qwen3,
    /// `Gemma2ForCausalLM`.
    Gemma2,
    /// `Phi3ForCausalLM` (Phi-3, Phi-3.5, Phi-4-mini).
    Phi3,
}

/// Every family, in the order of the docs' table.
pub const FAMILIES: [Family; 6] = [Family::Llama, Family::Mistral, Family::Qwen2, Family::Qwen3, Family::Gemma2, Family::Phi3];

/// The MLP's gate activation: `down(act(gate(x)) ⊙ up(x))`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// silu(z) = z·σ(z) (SwiGLU).
    Silu,
    /// GELU, tanh approximation: 0.5·z·(1 + tanh(√(2/π)·(z + 0.044715·z³))) (GeGLU; `gelu_pytorch_tanh`).
    GeluTanh,
}

impl Activation {
    /// transformers' name.
    pub fn name(self) -> &'static str {
        match self {
            Activation::Silu => "silu",
            Activation::GeluTanh => "gelu_pytorch_tanh",
        }
    }
    /// The activation transformers' `ACT2FN` maps `name` to, if lora-rs implements it.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "silu" | "swish" => Some(Activation::Silu),
            "gelu_pytorch_tanh" => Some(Activation::GeluTanh),
            _ => None,
        }
    }
}

/// A layer's attention: over every earlier key, or over a sliding window of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerType {
    /// Causal attention over every earlier key (`"full_attention"`).
    Full,
    /// Causal attention over the last `sliding_window` keys (`"sliding_attention"`).
    Sliding,
}

impl LayerType {
    pub(crate) fn name(self) -> &'static str {
        match self {
            LayerType::Full => "full_attention",
            LayerType::Sliding => "sliding_attention",
        }
    }
    pub(crate) fn read(r: &Reader, v: &Value) -> Result<Vec<LayerType>> {
        let a = v.as_array().ok_or_else(|| r.bad("layer_types", v, "must be a list"))?;
        a.iter()
            .map(|x| match x.as_str() {
                Some("full_attention") => Ok(LayerType::Full),
                Some("sliding_attention") => Ok(LayerType::Sliding),
                _ => Err(r.bad("layer_types", x, "lora-rs implements \"full_attention\" and \"sliding_attention\" layers")),
            })
            .collect()
    }
    pub(crate) fn write(types: &[LayerType]) -> Value {
        Value::Array(types.iter().map(|t| Value::from(t.name())).collect())
    }
}

/// The role of a norm weight in a decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Norm {
    /// Before attention.
    AttnIn,
    /// After attention, before the residual add (Gemma 2).
    AttnOut,
    /// Before the MLP.
    MlpIn,
    /// After the MLP, before the residual add (Gemma 2).
    MlpOut,
    /// Each query head, before RoPE (Qwen3).
    Q,
    /// Each key head, before RoPE (Qwen3).
    K,
}

/// What a family is: its names, the `config.json` keys it reads and writes, and the blocks it uses.
pub struct FamilySpec {
    /// transformers' class, the `architectures` entry.
    pub architecture: &'static str,
    /// `model_type`.
    pub model_type: &'static str,
    /// The projections of a layer, transformers' module names.
    pub projections: &'static [&'static str],
    /// Each layer's norm weights and their names under `model.layers.N.`.
    pub norms: &'static [(Norm, &'static str)],
    /// RMSNorm multiplies by (1 + w) instead of w (Gemma).
    pub norm_plus_one: bool,
    /// The embedding is multiplied by √H (Gemma).
    pub embed_scale: bool,
    /// The key naming the activation, and its default.
    pub activation_key: &'static str,
    /// The activation when the key is absent.
    pub default_activation: Activation,
    /// `max_position_embeddings` when absent.
    pub default_context: usize,
    /// `tie_word_embeddings` when absent.
    pub default_tied: bool,
    /// Reads the family's own keys (after the shared ones).
    pub(crate) read: fn(&Reader, &mut ModelConfig) -> Result<()>,
    /// Writes the family's own keys.
    pub(crate) write: fn(&ModelConfig, &mut Map<String, Value>),
    /// Refuses what the family does not have.
    pub(crate) validate: fn(&ModelConfig) -> Result<()>,
    /// Whether projection `proj` has a bias.
    pub(crate) bias: fn(&ModelConfig, &str) -> bool,
}

impl Family {
    /// The family's description.
    pub fn spec(self) -> &'static FamilySpec {
        match self {
            Family::Llama => &llama::SPEC,
            Family::Mistral => &mistral::SPEC,
            Family::Qwen2 => &qwen2::SPEC,
            Family::Qwen3 => &qwen3::SPEC,
            Family::Gemma2 => &gemma2::SPEC,
            Family::Phi3 => &phi3::SPEC,
        }
    }

    /// Whether projection `proj` of a model with config `c` has a bias.
    pub fn bias(self, c: &ModelConfig, proj: &str) -> bool {
        (self.spec().bias)(c, proj)
    }

    /// The family of a `config.json`: its `model_type`, or without one its `architectures`, or Llama.
    pub(crate) fn of_config(r: &Reader) -> Result<Family> {
        let known = || FAMILIES.iter().map(|f| format!("\"{}\"", f.spec().model_type)).collect::<Vec<_>>().join(", ");
        if let Some(mt) = r.get("model_type") {
            return FAMILIES
                .into_iter()
                .find(|f| mt.as_str() == Some(f.spec().model_type))
                .ok_or_else(|| r.bad("model_type", mt, format!("lora-rs implements the model types {}", known())));
        }
        match r.get("architectures") {
            None => Ok(Family::Llama),
            Some(a) => FAMILIES
                .into_iter()
                .find(|f| a.as_array().is_some_and(|a| a.iter().any(|x| x.as_str() == Some(f.spec().architecture))))
                .ok_or_else(|| {
                    let archs = FAMILIES.iter().map(|f| f.spec().architecture).collect::<Vec<_>>().join(", ");
                    r.bad("architectures", a, format!("lora-rs implements {archs}"))
                }),
        }
    }
}

/// An error for a config field a family does not have.
pub(crate) fn absent(c: &ModelConfig, field: &str, set: bool) -> Result<()> {
    if set {
        return Err(LmError::invalid(field, "set", format!("a {} has no such setting", c.family.spec().architecture)));
    }
    Ok(())
}

/// Refuses the Gemma- and window-specific settings a family does not read.
pub(crate) fn plain(c: &ModelConfig, window: bool) -> Result<()> {
    absent(c, "query_pre_attn_scalar", c.query_pre_attn_scalar.is_some())?;
    absent(c, "attn_logit_softcapping", c.attn_logit_softcapping.is_some())?;
    absent(c, "final_logit_softcapping", c.final_logit_softcapping.is_some())?;
    if !window {
        absent(c, "sliding_window", c.sliding_window.is_some())?;
        absent(c, "layer_types", c.layer_types.is_some())?;
    }
    if c.partial_rotary_factor != 1.0 && c.family != Family::Phi3 {
        return Err(LmError::invalid(
            "partial_rotary_factor",
            c.partial_rotary_factor,
            format!("a {} rotates whole heads (transformers applies a partial factor only to Phi-3)", c.family.spec().architecture),
        ));
    }
    Ok(())
}

/// Qwen2/3's windows: `layer_types`, or layers from `max_window_layers` on sliding when `use_sliding_window`.
pub(crate) fn read_qwen_windows(r: &Reader, c: &mut ModelConfig) -> Result<()> {
    let use_sliding = r.opt_bool("use_sliding_window")?.unwrap_or(false);
    let window = r.opt_usize("sliding_window")?;
    let max_window_layers = r.opt_usize("max_window_layers")?.unwrap_or(28);
    c.sliding_window = if use_sliding { window.or(Some(4096)) } else { None };
    c.layer_types = Some(match r.get("layer_types") {
        Some(v) => LayerType::read(r, v)?,
        None => (0..c.num_hidden_layers)
            .map(|i| if c.sliding_window.is_some() && i >= max_window_layers { LayerType::Sliding } else { LayerType::Full })
            .collect(),
    });
    Ok(())
}

/// Writes Qwen2/3's window keys (both spellings: `layer_types` and `max_window_layers`).
pub(crate) fn write_qwen_windows(c: &ModelConfig, o: &mut Map<String, Value>) {
    let n = c.num_hidden_layers;
    let types: Vec<LayerType> = (0..n).map(|l| if c.window(l).is_some() { LayerType::Sliding } else { LayerType::Full }).collect();
    let first = types.iter().position(|t| *t == LayerType::Sliding).unwrap_or(n);
    o.insert("use_sliding_window".into(), Value::from(c.sliding_window.is_some()));
    o.insert("sliding_window".into(), c.sliding_window.map_or(Value::Null, Value::from));
    o.insert("max_window_layers".into(), Value::from(first));
    o.insert("layer_types".into(), LayerType::write(&types));
}
