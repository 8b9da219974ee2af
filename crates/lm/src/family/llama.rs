//! Llama (2, 3.x): transformers' `LlamaForCausalLM`. Keys of its own: `attention_bias` (q/k/v/o),
//! `mlp_bias` (gate/up/down); RoPE scaling of every type.

use serde_json::{Map, Value};

use super::{plain, Activation, FamilySpec, Norm};
use crate::config::{ModelConfig, Reader};
use crate::error::Result;

pub(super) const SPEC: FamilySpec = FamilySpec {
    architecture: "LlamaForCausalLM",
    model_type: "llama",
    projections: &crate::model::PROJECTIONS,
    norms: &[(Norm::AttnIn, "input_layernorm"), (Norm::MlpIn, "post_attention_layernorm")],
    norm_plus_one: false,
    embed_scale: false,
    activation_key: "hidden_act",
    default_activation: Activation::Silu,
    default_context: 2048,
    default_tied: false,
    read,
    write,
    validate: |c| plain(c, false),
    bias: |c, proj| if matches!(proj, "gate_proj" | "up_proj" | "down_proj") { c.mlp_bias } else { c.attention_bias },
};

fn read(r: &Reader, c: &mut ModelConfig) -> Result<()> {
    c.attention_bias = r.opt_bool("attention_bias")?.unwrap_or(false);
    c.mlp_bias = r.opt_bool("mlp_bias")?.unwrap_or(false);
    Ok(())
}

fn write(c: &ModelConfig, o: &mut Map<String, Value>) {
    o.insert("attention_bias".into(), c.attention_bias.into());
    o.insert("mlp_bias".into(), c.mlp_bias.into());
    o.insert("pretraining_tp".into(), 1.into());
}
