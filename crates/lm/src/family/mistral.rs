//! Mistral: transformers' `MistralForCausalLM`, a Llama without biases whose every layer attends over a
//! sliding window of `sliding_window` keys (`null`: full attention).

use serde_json::{Map, Value};

use super::{absent, plain, Activation, FamilySpec, Norm};
use crate::config::{ModelConfig, Reader};
use crate::error::Result;

pub(super) const SPEC: FamilySpec = FamilySpec {
    architecture: "MistralForCausalLM",
    model_type: "mistral",
    projections: &crate::model::PROJECTIONS,
    norms: &[(Norm::AttnIn, "input_layernorm"), (Norm::MlpIn, "post_attention_layernorm")],
    norm_plus_one: false,
    embed_scale: false,
    activation_key: "hidden_act",
    default_activation: Activation::Silu,
    default_context: 131072,
    default_tied: false,
    read,
    write,
    validate: |c| {
        plain(c, true)?;
        absent(c, "layer_types", c.layer_types.is_some())?;
        absent(c, "attention_bias", c.attention_bias)?;
        absent(c, "mlp_bias", c.mlp_bias)
    },
    bias: |_, _| false,
};

fn read(r: &Reader, c: &mut ModelConfig) -> Result<()> {
    // transformers' default window when the key is absent is 4096; an explicit null is full attention.
    c.sliding_window = match r.raw("sliding_window") {
        None => Some(4096),
        Some(Value::Null) => None,
        Some(_) => r.opt_usize("sliding_window")?,
    };
    r.only("attention_bias", false, "a MistralForCausalLM has no attention biases")?;
    r.only("mlp_bias", false, "a MistralForCausalLM has no MLP biases")?;
    Ok(())
}

fn write(c: &ModelConfig, o: &mut Map<String, Value>) {
    o.insert("sliding_window".into(), c.sliding_window.map_or(Value::Null, Value::from));
}
