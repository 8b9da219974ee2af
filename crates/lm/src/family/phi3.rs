//! Phi-3 (Phi-3, Phi-3.5, Phi-4-mini): transformers' `Phi3ForCausalLM`. Its projections are fused:
//! `qkv_proj` ((n_h + 2·n_kv)·d, H) whose output splits into q, k, v in that order, and `gate_up_proj`
//! (2·I, H) whose output's first half is the gate and second the up projection; PEFT targets them as such.
//! RoPE may rotate only the first `partial_rotary_factor · d` features of each head, and scale as `longrope`
//! with `original_max_position_embeddings` (a top-level key, default 4096); `sliding_window` applies to every
//! layer. `embd_pdrop` and `resid_pdrop` act in training only and must be 0.

use serde_json::{Map, Value};

use super::{absent, plain, Activation, FamilySpec, Norm};
use crate::config::{ModelConfig, Reader};
use crate::error::{LmError, Result};
use crate::rope_scaling::RopeScaling;

pub(super) const SPEC: FamilySpec = FamilySpec {
    architecture: "Phi3ForCausalLM",
    model_type: "phi3",
    projections: &["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    norms: &[(Norm::AttnIn, "input_layernorm"), (Norm::MlpIn, "post_attention_layernorm")],
    norm_plus_one: false,
    embed_scale: false,
    activation_key: "hidden_act",
    default_activation: Activation::Silu,
    default_context: 4096,
    default_tied: false,
    read,
    write,
    validate: |c| {
        plain(c, true)?;
        absent(c, "layer_types", c.layer_types.is_some())?;
        absent(c, "attention_bias", c.attention_bias)?;
        absent(c, "mlp_bias", c.mlp_bias)?;
        if !matches!(c.rope_scaling, RopeScaling::Default | RopeScaling::LongRope { .. }) {
            return Err(LmError::invalid("rope_parameters.rope_type", c.rope_scaling.name(), "Phi-3 takes \"default\" or \"longrope\""));
        }
        Ok(())
    },
    bias: |_, _| false,
};

fn read(r: &Reader, c: &mut ModelConfig) -> Result<()> {
    c.sliding_window = r.opt_usize("sliding_window")?;
    r.zero("embd_pdrop")?;
    r.zero("resid_pdrop")?;
    r.only("attention_bias", false, "a Phi3ForCausalLM has no attention biases")?;
    Ok(())
}

fn write(c: &ModelConfig, o: &mut Map<String, Value>) {
    o.insert("sliding_window".into(), c.sliding_window.map_or(Value::Null, Value::from));
    o.insert("embd_pdrop".into(), 0.0.into());
    o.insert("resid_pdrop".into(), 0.0.into());
    let original = match &c.rope_scaling {
        RopeScaling::LongRope { original_max_position_embeddings, .. } => *original_max_position_embeddings,
        _ => c.max_position_embeddings,
    };
    o.insert("original_max_position_embeddings".into(), original.into());
}
