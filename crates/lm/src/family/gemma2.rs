//! Gemma 2: transformers' `Gemma2ForCausalLM`. Against Llama: the embedding is multiplied by √H, every
//! RMSNorm multiplies by (1 + w), each layer normalises attention's and the MLP's outputs too (pre- and
//! post-norms: `input_layernorm` → attention → `post_attention_layernorm` → residual, `pre_feedforward_layernorm`
//! → MLP → `post_feedforward_layernorm` → residual), the MLP is GeGLU (`hidden_activation`, tanh GELU),
//! attention scores are scaled by `query_pre_attn_scalar`^−½ and soft-capped (c·tanh(s/c),
//! `attn_logit_softcapping`), layers alternate sliding-window (even) and global (odd) attention (or as
//! `layer_types` lists them), and the logits are soft-capped (`final_logit_softcapping`). `hidden_act` is
//! read and not used, as transformers does.

use serde_json::{Map, Value};

use super::{absent, Activation, FamilySpec, LayerType, Norm};
use crate::config::{ModelConfig, Reader};
use crate::error::Result;

pub(super) const SPEC: FamilySpec = FamilySpec {
    architecture: "Gemma2ForCausalLM",
    model_type: "gemma2",
    projections: &crate::model::PROJECTIONS,
    norms: &[
        (Norm::AttnIn, "input_layernorm"),
        (Norm::AttnOut, "post_attention_layernorm"),
        (Norm::MlpIn, "pre_feedforward_layernorm"),
        (Norm::MlpOut, "post_feedforward_layernorm"),
    ],
    norm_plus_one: true,
    embed_scale: true,
    activation_key: "hidden_activation",
    default_activation: Activation::GeluTanh,
    default_context: 8192,
    default_tied: true,
    read,
    write,
    validate: |c| {
        absent(c, "mlp_bias", c.mlp_bias)?;
        super::plain(
            &ModelConfig { query_pre_attn_scalar: None, attn_logit_softcapping: None, final_logit_softcapping: None, ..c.clone() },
            true,
        )
    },
    bias: |c, proj| c.attention_bias && matches!(proj, "q_proj" | "k_proj" | "v_proj" | "o_proj"),
};

/// A soft-capping key: absent → transformers' default, `null` → none.
fn cap(r: &Reader, key: &str, default: f64) -> Result<Option<f64>> {
    match r.raw(key) {
        None => Ok(Some(default)),
        Some(Value::Null) => Ok(None),
        Some(_) => r.opt_f64(key),
    }
}

fn read(r: &Reader, c: &mut ModelConfig) -> Result<()> {
    if r.raw("head_dim").is_none() {
        c.head_dim = 256;
    }
    r.get("hidden_act"); // transformers' Gemma2MLP reads hidden_activation only
    r.only("use_bidirectional_attention", false, "lora-rs implements causal attention only")?;
    c.attention_bias = r.opt_bool("attention_bias")?.unwrap_or(false);
    c.query_pre_attn_scalar = Some(r.opt_f64("query_pre_attn_scalar")?.unwrap_or(256.0));
    c.attn_logit_softcapping = cap(r, "attn_logit_softcapping", 50.0)?;
    c.final_logit_softcapping = cap(r, "final_logit_softcapping", 30.0)?;
    c.sliding_window = match r.raw("sliding_window") {
        None => Some(4096),
        Some(Value::Null) => None,
        Some(_) => r.opt_usize("sliding_window")?,
    };
    c.layer_types = Some(match r.get("layer_types") {
        Some(v) => LayerType::read(r, v)?,
        None => (0..c.num_hidden_layers).map(|i| if (i + 1) % 2 == 1 { LayerType::Sliding } else { LayerType::Full }).collect(),
    });
    Ok(())
}

fn write(c: &ModelConfig, o: &mut Map<String, Value>) {
    let opt = |x: Option<f64>| x.map_or(Value::Null, Value::from);
    o.insert("hidden_activation".into(), c.hidden_act.name().into());
    o.insert("attention_bias".into(), c.attention_bias.into());
    // transformers' Gemma2Config types it as an int and refuses a float.
    let scalar = c.query_pre_attn_scalar.map_or(Value::Null, |x| {
        if x.fract() == 0.0 && x.abs() < 1e15 {
            Value::from(x as i64)
        } else {
            Value::from(x)
        }
    });
    o.insert("query_pre_attn_scalar".into(), scalar);
    o.insert("attn_logit_softcapping".into(), opt(c.attn_logit_softcapping));
    o.insert("final_logit_softcapping".into(), opt(c.final_logit_softcapping));
    o.insert("sliding_window".into(), c.sliding_window.map_or(Value::Null, Value::from));
    let types: Vec<LayerType> =
        (0..c.num_hidden_layers).map(|l| if c.window(l).is_some() { LayerType::Sliding } else { LayerType::Full }).collect();
    o.insert("layer_types".into(), LayerType::write(&types));
}
