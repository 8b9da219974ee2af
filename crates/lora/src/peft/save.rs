//! Writing a [`LoraModel`]'s adapter as PEFT does: `adapter_config.json` describing what is held now (ranks
//! and alphas that differ from the most common ones as patterns, targets by their short names where those
//! select exactly the adapted modules) and `adapter_model.safetensors` with PEFT's tensor names, both
//! written atomically; PiSSA/OLoRA optionally converted to the plain LoRA of rank 2r with the same update.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::Tensor;

use super::config::peft_config_json;
use super::files::{bad, CONFIG_FILE, META_BASE_SHA256, PEFT_PREFIX, WEIGHTS_FILE};
use crate::config::{Init, LoraConfig, Scaling};
use crate::error::Result;
use crate::io::{safetensors_bytes, write_dir_atomic};
use crate::model::LoraModel;
use crate::peft::matching::{Pattern, Targets};

/// Options for [`LoraModel::save_adapter`].
#[derive(Debug, Clone, Default)]
pub struct SaveOptions {
    /// Write a PiSSA/OLoRA adapter as the plain LoRA of rank 2r with the same update on the original base
    /// (PEFT's `path_initial_model_for_weight_conversion`); other adapters are written as they are.
    pub convert_to_lora: bool,
    /// Written as `base_model_name_or_path`.
    pub base_model_name_or_path: Option<String>,
    /// Written as `task_type` (e.g. `CAUSAL_LM`, which makes PEFT load it as a `PeftModelForCausalLM`).
    pub task_type: Option<String>,
    /// Written as `lora_rs.base_sha256` in the safetensors metadata.
    pub base_fingerprint: Option<String>,
    /// More metadata entries.
    pub metadata: BTreeMap<String, String>,
}
impl LoraModel {
    /// The PEFT config describing adapter `name` as it is held now (ranks/alphas differing from the
    /// most common ones go to `rank_pattern`/`alpha_pattern`).
    pub fn peft_config(&self, name: &str) -> Result<LoraConfig> {
        let base = self.adapter_config(name)?.clone();
        // Written as the explicit list of what is adapted, so the rules that chose it are not needed again.
        let mut c = LoraConfig {
            rank_pattern: Pattern::new(),
            alpha_pattern: Pattern::new(),
            target_modules: Targets::default(),
            exclude_modules: None,
            layers_to_transform: Vec::new(),
            layers_pattern: Vec::new(),
            ..base
        };
        let mut adapted: Vec<String> = Vec::new();
        let mut suffixes: Vec<String> = Vec::new();
        for (module, layer) in self.layers() {
            if let Ok(ad) = layer.adapter(name) {
                adapted.push(module.to_string());
                let last = module.rsplit('.').next().unwrap_or(module).to_string();
                if !suffixes.contains(&last) {
                    suffixes.push(last);
                }
                // Pattern keys are regular expressions: a module's own name, escaped, matches only it.
                if ad.rank() != c.r {
                    c.rank_pattern.insert(regex::escape(module), ad.rank());
                }
                if ad.alpha() != c.alpha {
                    c.alpha_pattern.insert(regex::escape(module), ad.alpha());
                }
            }
        }
        // Name the targets as a user would (`q_proj`, not every `model.layers.N.self_attn.q_proj`) when the
        // short names select exactly the adapted modules under PEFT's suffix match.
        let selected: Vec<&str> = self.layer_names().filter(|m| suffixes.iter().any(|s| m == s || m.ends_with(&format!(".{s}")))).collect();
        c.target_modules = Targets::Names(if selected.len() == adapted.len() { suffixes } else { adapted });
        Ok(c)
    }

    /// Writes adapter `name` to `dir` as PEFT does (both files atomically). Merged adapters are saved
    /// too (their A and B are unchanged by merging).
    pub fn save_adapter(&self, name: &str, dir: &Path, opts: &SaveOptions) -> Result<()> {
        let mut config = self.peft_config(name)?;
        let convert = opts.convert_to_lora && config.init.rewrites_base();
        let mut tensors = Vec::new();
        for (module, layer) in self.layers() {
            if let Ok(ad) = layer.adapter(name) {
                let (mut a, mut b) = (ad.a().as_tensor().clone(), ad.b().as_tensor().clone());
                if let (true, Some((a0, b0))) = (convert, ad.initial()) {
                    // ΔW = s·(B·A − B0·A0) = s·[B, −B0]·[A; A0]: a plain LoRA of rank 2r, as PEFT's
                    // subtract_mutated_init.
                    a = Tensor::cat(&[&a, a0], 0)?;
                    b = Tensor::cat(&[&b, &b0.neg()?], 1)?;
                }
                let (ka, kb) =
                    if layer.is_embedding() { ("lora_embedding_A", "lora_embedding_B") } else { ("lora_A.weight", "lora_B.weight") };
                tensors.push((format!("{PEFT_PREFIX}{module}.{ka}"), a));
                tensors.push((format!("{PEFT_PREFIX}{module}.{kb}"), b));
                if let Some(m) = ad.magnitude() {
                    tensors.push((format!("{PEFT_PREFIX}{module}.lora_magnitude_vector"), m.as_tensor().clone()));
                }
                if let Some(lb) = ad.lora_bias() {
                    tensors.push((format!("{PEFT_PREFIX}{module}.lora_B.bias"), lb.as_tensor().clone()));
                }
            }
            if let Some((w, b)) = layer.override_of(name) {
                if let Some(w) = w {
                    tensors.push((format!("{PEFT_PREFIX}{module}.weight"), w.as_tensor().clone()));
                }
                if let Some(b) = b {
                    // As PEFT names it: the bias of a LoRA-wrapped layer lives in its base_layer.
                    let key = if layer.adapter(name).is_ok() { "base_layer.bias" } else { "bias" };
                    tensors.push((format!("{PEFT_PREFIX}{module}.{key}"), b.as_tensor().clone()));
                }
            }
        }
        if convert {
            // Twice the rank at the same scale: alpha doubles (√2 with rsLoRA's alpha/√r), as PEFT's
            // save_pretrained(path_initial_model_for_weight_conversion=…) writes it (PEFT doubles
            // alpha_pattern values even with rsLoRA, which changes their scale; lora-rs keeps the scale).
            let f = if config.scaling == Scaling::RankStabilized { 2f64.sqrt() } else { 2.0 };
            config.r *= 2;
            config.alpha *= f;
            config.rank_pattern = config.rank_pattern.iter().map(|(k, v)| (k.clone(), 2 * v)).collect();
            config.alpha_pattern = config.alpha_pattern.iter().map(|(k, v)| (k.clone(), f * v)).collect();
            config.init = Init::Kaiming;
        } else if let Init::Pissa { niter: Some(_) } = config.init {
            config.init = Init::Pissa { niter: None }; // lora-rs' PiSSA always takes the exact SVD
        }
        let mut meta: HashMap<String, String> = opts.metadata.clone().into_iter().collect();
        meta.insert("format".into(), "pt".into());
        if let Some(fp) = &opts.base_fingerprint {
            meta.insert(META_BASE_SHA256.into(), fp.clone());
        }
        let weights = safetensors_bytes(&tensors, &meta).map_err(|e| bad(&dir.join(WEIGHTS_FILE), e.to_string()))?;
        let json = peft_config_json(&config, opts.base_model_name_or_path.as_deref(), opts.task_type.as_deref());
        let text = serde_json::to_string_pretty(&json).map_err(|e| bad(&dir.join(CONFIG_FILE), e.to_string()))?;
        // Both files or neither: the adapter folder appears whole (the config, which makes it an adapter, last).
        Ok(write_dir_atomic(dir, &[(WEIGHTS_FILE, &weights), (CONFIG_FILE, format!("{text}\n").as_bytes())])?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peft::testing::{bits, model};
    use crate::peft::LoadOptions;
    use crate::Scaling;
    use candle_core::Device;
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use serde_json::Value;

    #[test]
    fn save_then_load_gives_bit_identical_tensors_and_the_same_scales() {
        let mut m = model();
        let mut c = LoraConfig::new(2, 3.0);
        c.scaling = Scaling::RankStabilized;
        c.rank_pattern.insert("linear2", 3);
        m.add_adapter("a", &c, &mut StdRng::seed_from_u64(5)).unwrap();
        for (_, l) in m.layers() {
            let b = l.adapter("a").unwrap().b();
            b.set(&Tensor::randn(0f32, 1.0, b.shape(), &Device::Cpu).unwrap()).unwrap();
        }
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let opts = SaveOptions { base_fingerprint: Some("abc".into()), ..Default::default() };
        m.save_adapter("a", &dir, &opts).unwrap();
        let cfg: Value = serde_json::from_str(&std::fs::read_to_string(dir.join(CONFIG_FILE)).unwrap()).unwrap();
        assert_eq!(cfg["rank_pattern"]["linear2"], 3);
        assert_eq!(cfg["use_rslora"], true);
        assert_eq!(cfg["init_lora_weights"], "gaussian");
        let mut m2 = model();
        let lo = LoadOptions { base_fingerprint: Some("abc".into()), force: false };
        m2.load_adapter("b", &dir, &lo).unwrap();
        for ((_, l1), (_, l2)) in m.layers().zip(m2.layers()) {
            let (a1, a2) = (l1.adapter("a").unwrap(), l2.adapter("b").unwrap());
            assert_eq!(bits(a1.a().as_tensor()), bits(a2.a().as_tensor()));
            assert_eq!(bits(a1.b().as_tensor()), bits(a2.b().as_tensor()));
            assert_eq!(a1.scale(), a2.scale());
        }
        let lo = LoadOptions { base_fingerprint: Some("other".into()), force: false };
        let e = model().load_adapter("b", &dir, &lo).unwrap_err().to_string();
        assert!(e.contains("different base model") && e.contains("must be forced") && !e.contains("--"), "{e}");
        model().load_adapter("b", &dir, &LoadOptions { force: true, ..lo }).unwrap();
    }
}
