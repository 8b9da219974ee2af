//! Qwen2 / Qwen2.5: transformers' `Qwen2ForCausalLM`, a Llama whose q/k/v projections always have biases
//! (o and the MLP none), with sliding-window attention on the layers from `max_window_layers` on when
//! `use_sliding_window` (or as `layer_types` lists them).

use serde_json::{Map, Value};

use super::{absent, plain, read_qwen_windows, write_qwen_windows, Activation, FamilySpec, Norm};
use crate::config::ModelConfig;

pub(super) const SPEC: FamilySpec = FamilySpec {
    architecture: "Qwen2ForCausalLM",
    model_type: "qwen2",
    projections: &crate::model::PROJECTIONS,
    norms: &[(Norm::AttnIn, "input_layernorm"), (Norm::MlpIn, "post_attention_layernorm")],
    norm_plus_one: false,
    embed_scale: false,
    activation_key: "hidden_act",
    default_activation: Activation::Silu,
    default_context: 32768,
    default_tied: false,
    read: read_qwen_windows,
    write,
    validate: |c| {
        plain(c, true)?;
        absent(c, "attention_bias", c.attention_bias)?;
        absent(c, "mlp_bias", c.mlp_bias)
    },
    bias: |_, proj| matches!(proj, "q_proj" | "k_proj" | "v_proj"),
};

fn write(c: &ModelConfig, o: &mut Map<String, Value>) {
    write_qwen_windows(c, o);
}
