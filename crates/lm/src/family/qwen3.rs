//! Qwen3: transformers' `Qwen3ForCausalLM`, a Qwen2 without the fixed q/k/v biases (`attention_bias` for
//! q/k/v/o instead) whose queries and keys are RMS-normalised per head (`q_norm`, `k_norm`, width d) before
//! RoPE. `head_dim` defaults to 128.

use serde_json::{Map, Value};

use super::{absent, plain, read_qwen_windows, write_qwen_windows, Activation, FamilySpec, Norm};
use crate::config::{ModelConfig, Reader};
use crate::error::Result;

pub(super) const SPEC: FamilySpec = FamilySpec {
    architecture: "Qwen3ForCausalLM",
    model_type: "qwen3",
    projections: &crate::model::PROJECTIONS,
    norms: &[
        (Norm::AttnIn, "input_layernorm"),
        (Norm::MlpIn, "post_attention_layernorm"),
        (Norm::Q, "self_attn.q_norm"),
        (Norm::K, "self_attn.k_norm"),
    ],
    norm_plus_one: false,
    embed_scale: false,
    activation_key: "hidden_act",
    default_activation: Activation::Silu,
    default_context: 32768,
    default_tied: false,
    read,
    write,
    validate: |c| {
        plain(c, true)?;
        absent(c, "mlp_bias", c.mlp_bias)
    },
    bias: |c, proj| c.attention_bias && matches!(proj, "q_proj" | "k_proj" | "v_proj" | "o_proj"),
};

fn read(r: &Reader, c: &mut ModelConfig) -> Result<()> {
    if r.raw("head_dim").is_none() {
        c.head_dim = 128;
    }
    c.attention_bias = r.opt_bool("attention_bias")?.unwrap_or(false);
    read_qwen_windows(r, c)
}

fn write(c: &ModelConfig, o: &mut Map<String, Value>) {
    o.insert("attention_bias".into(), c.attention_bias.into());
    write_qwen_windows(c, o);
}
