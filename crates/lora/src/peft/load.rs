//! Loading a PEFT adapter into a [`LoraModel`]: the files checked against the model (every module exists
//! with matching shapes, every target has tensors, a saved base table equals the model's), the base
//! fingerprint compared, then the adapter inserted whole or not at all.

use std::path::Path;

use super::files::{bad, read_adapter, AdapterFiles, CONFIG_FILE, PEFT_PREFIX, WEIGHTS_FILE};
use crate::config::LoraConfig;
use crate::error::{LoraError, Result};
use crate::linear::Adapter;
use crate::model::LoraModel;
use crate::peft::matching::Targets;

/// Options for [`LoraModel::load_adapter`].
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Fingerprint of the loaded base ([`crate::io::fingerprint`] of its state); checked against the adapter's.
    pub base_fingerprint: Option<String>,
    /// Load even when the fingerprints differ.
    pub force: bool,
}

impl LoraModel {
    /// Checks validated files against this model: every module exists with matching shapes, every module
    /// the config targets has tensors, every named target exists.
    pub fn check_adapter_files(&self, files: &AdapterFiles) -> Result<()> {
        let wpath = files.dir.join(WEIGHTS_FILE);
        let known: Vec<String> = self.layer_names().map(String::from).collect();
        for (module, (a, b)) in &files.tensors {
            let layer = self.layer(module).map_err(|_| {
                bad(
                    &wpath,
                    format!("tensor {PEFT_PREFIX}{module}.lora_A.weight: the model has no module {module} (it has {})", known.join(", ")),
                )
            })?;
            let r = a.dims()[0];
            if a.dims() != [r, layer.in_features()] {
                return Err(bad(
                    &wpath,
                    format!("tensor {PEFT_PREFIX}{module}.lora_A.weight: shape {:?}, expected [{r}, {}]", a.dims(), layer.in_features()),
                ));
            }
            if b.dims() != [layer.out_features(), r] {
                return Err(bad(
                    &wpath,
                    format!("tensor {PEFT_PREFIX}{module}.lora_B.weight: shape {:?}, expected [{}, {r}]", b.dims(), layer.out_features()),
                ));
            }
            for (map, suffix) in [(&files.magnitudes, "lora_magnitude_vector"), (&files.lora_biases, "lora_B.bias")] {
                if let Some(t) = map.get(module).filter(|t| t.dims() != [layer.out_features()]) {
                    return Err(bad(
                        &wpath,
                        format!("tensor {PEFT_PREFIX}{module}.{suffix}: shape {:?}, expected [{}]", t.dims(), layer.out_features()),
                    ));
                }
            }
            if files.config.lora_bias && layer.bias().is_none() {
                return Err(bad(
                    &wpath,
                    format!("tensor {PEFT_PREFIX}{module}.lora_B.bias: module {module} has no bias (PEFT refuses lora_bias there)"),
                ));
            }
        }
        for (module, t) in &files.base_weights {
            let layer = self
                .layer(module)
                .map_err(|_| bad(&wpath, format!("tensor {PEFT_PREFIX}{module}.base_layer.weight: the model has no module {module}")))?;
            let same = t.dims() == layer.weight_dims()
                && t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?.iter().map(|v| v.to_bits()).eq(layer
                    .weight()?
                    .flatten_all()?
                    .to_vec1::<f32>()?
                    .iter()
                    .map(|v| v.to_bits()));
            if !same {
                return Err(bad(
                    &wpath,
                    format!(
                        "tensor {PEFT_PREFIX}{module}.base_layer.weight differs from the model's {module} (PEFT saved a resized or \
                         retrained table, which lora-rs does not load)"
                    ),
                ));
            }
        }
        for (module, (w, b)) in &files.copies {
            let layer = self.layer(module).map_err(|_| {
                bad(&wpath, format!("tensor {PEFT_PREFIX}{module}.*: the model has no module {module} (it has {})", known.join(", ")))
            })?;
            if let Some(w) = w.as_ref().filter(|w| w.dims() != layer.weight_dims()) {
                return Err(bad(
                    &wpath,
                    format!("tensor {PEFT_PREFIX}{module}.weight: shape {:?}, expected {:?}", w.dims(), layer.weight_dims()),
                ));
            }
            if let Some(b) = b {
                if layer.bias().is_none() {
                    return Err(bad(&wpath, format!("tensor {PEFT_PREFIX}{module}.bias: module {module} has no bias")));
                }
                if b.dims() != [layer.out_features()] {
                    return Err(bad(
                        &wpath,
                        format!("tensor {PEFT_PREFIX}{module}.bias: shape {:?}, expected [{}]", b.dims(), layer.out_features()),
                    ));
                }
            }
        }
        if let Some(m) = known.iter().find(|m| files.config.saves(m) && files.copies.get(*m).is_none_or(|(w, _)| w.is_none())) {
            return Err(bad(&wpath, format!("missing tensor {PEFT_PREFIX}{m}.weight (module_to_save {m})")));
        }
        let targets: Vec<String> = known.iter().filter(|m| files.config.targets(m) && !files.config.saves(m)).cloned().collect();
        if let Some(m) = targets.iter().find(|m| !files.tensors.contains_key(*m)) {
            return Err(bad(&wpath, format!("target module {m} has no tensors {PEFT_PREFIX}{m}.lora_A.weight / lora_B.weight")));
        }
        for t in files.config.target_modules.names() {
            if !known.iter().any(|m| m == t || m.ends_with(&format!(".{t}"))) {
                return Err(bad(
                    &files.dir.join(CONFIG_FILE),
                    format!("target_modules names {t}, which the model does not have (it has {})", known.join(", ")),
                ));
            }
        }
        Ok(())
    }

    /// Inserts adapter `name` from validated files: every module must exist with matching shapes, and every
    /// module the config targets must have tensors. On error the model is left unchanged.
    pub fn insert_adapter_files(&mut self, name: &str, files: &AdapterFiles) -> Result<()> {
        if self.adapter_names().iter().any(|n| n == name) {
            return Err(LoraError::DuplicateAdapter(name.to_string()));
        }
        self.check_adapter_files(files)?;
        let mut built = Vec::new();
        for (module, (a, b)) in &files.tensors {
            let c = &files.config;
            let mut ad = Adapter::from_tensors(a, b, c.alpha_for(module), c.scale_for(module), c.dropout)?;
            if let Some(m) = files.magnitudes.get(module) {
                ad = ad.with_magnitude(m)?;
            }
            if let Some(lb) = files.lora_biases.get(module) {
                ad = ad.with_lora_bias(lb)?;
            }
            if c.init.rewrites_base() {
                // As PEFT's from_pretrained: the starting factors are recomputed from the base.
                let (a0, b0) = self.layer(module)?.initial_factors(c.spec_for(module))?;
                ad = ad.with_initial(&a0, &b0)?;
            }
            built.push((module, ad));
        }
        for (module, ad) in built {
            self.layer_mut(module)?.insert_adapter(name, ad)?;
        }
        for (module, (w, b)) in &files.copies {
            self.layer_mut(module)?.insert_override(name, w.as_ref(), b.as_ref())?;
        }
        self.set_adapter_config(
            name,
            LoraConfig { target_modules: Targets::Names(files.tensors.keys().cloned().collect()), ..files.config.clone() },
        );
        Ok(())
    }

    /// Reads the adapter in `dir` and adds it as `name` (not activated). Checks the base fingerprint
    /// when both the adapter and `opts` carry one.
    pub fn load_adapter(&mut self, name: &str, dir: &Path, opts: &LoadOptions) -> Result<AdapterFiles> {
        let files = read_adapter(dir)?;
        if let (Some(want), Some(have)) = (files.base_fingerprint(), &opts.base_fingerprint) {
            if want != have && !opts.force {
                return Err(LoraError::BaseMismatch {
                    path: dir.join(WEIGHTS_FILE).display().to_string(),
                    expected: want.to_string(),
                    found: have.clone(),
                });
            }
        }
        self.insert_adapter_files(name, &files)?;
        tracing::info!(adapter = name, dir = %dir.display(), params = files.num_params(), "loaded adapter");
        Ok(files)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::save_safetensors;
    use crate::peft::testing::model;
    use candle_core::{Device, Tensor};
    use std::collections::HashMap;

    #[test]
    fn unknown_modules_wrong_shapes_and_rank_mismatches_name_the_tensor() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let write = |cfg: &str, tensors: Vec<(&str, Vec<usize>)>| {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(CONFIG_FILE), cfg).unwrap();
            let ts: Vec<(String, Tensor)> = tensors
                .into_iter()
                .map(|(n, s)| (n.to_string(), Tensor::ones(s, candle_core::DType::F32, &Device::Cpu).unwrap()))
                .collect();
            save_safetensors(&dir.join(WEIGHTS_FILE), &ts, &HashMap::new()).unwrap();
        };
        let cfg = r#"{"peft_type":"LORA","r":1,"lora_alpha":1,"target_modules":["linear1","linear9"]}"#;
        write(cfg, vec![("base_model.model.linear9.lora_A.weight", vec![1, 7]), ("base_model.model.linear9.lora_B.weight", vec![5, 1])]);
        let e = model().load_adapter("x", &dir, &LoadOptions::default()).unwrap_err().to_string();
        assert!(e.contains("linear9.lora_A.weight") && e.contains("no module linear9"), "{e}");
        let cfg = r#"{"peft_type":"LORA","r":1,"lora_alpha":1,"target_modules":["linear1"]}"#;
        write(cfg, vec![("base_model.model.linear1.lora_A.weight", vec![1, 6]), ("base_model.model.linear1.lora_B.weight", vec![5, 1])]);
        let e = model().load_adapter("x", &dir, &LoadOptions::default()).unwrap_err().to_string();
        assert!(e.contains("linear1.lora_A.weight: shape [1, 6], expected [1, 7]"), "{e}");
        write(cfg, vec![("base_model.model.linear1.lora_A.weight", vec![2, 7]), ("base_model.model.linear1.lora_B.weight", vec![5, 2])]);
        let e = model().load_adapter("x", &dir, &LoadOptions::default()).unwrap_err().to_string();
        assert!(e.contains("rank 2 does not match r = 1"), "{e}");
        write(cfg, vec![("base_model.model.linear1.lora_A.weight", vec![1, 7])]);
        let e = model().load_adapter("x", &dir, &LoadOptions::default()).unwrap_err().to_string();
        assert!(e.contains("missing tensor base_model.model.linear1.lora_B.weight"), "{e}");
        write(
            cfg,
            vec![
                ("base_model.model.linear1.lora_A.weight", vec![1, 7]),
                ("base_model.model.linear1.lora_B.weight", vec![5, 1]),
                ("base_model.model.linear1.bias", vec![5]),
            ],
        );
        let e = model().load_adapter("x", &dir, &LoadOptions::default()).unwrap_err().to_string();
        assert!(e.contains("tensor base_model.model.linear1.bias") && e.contains("names no bias"), "{e}");
    }
}
