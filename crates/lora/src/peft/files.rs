//! Adapter files in the Hugging Face PEFT format: `adapter_config.json` + `adapter_model.safetensors`.
//!
//! For a LoRA on module `m` with rank r, the safetensors file holds `base_model.model.m.lora_A.weight`
//! (r, in_features) and `base_model.model.m.lora_B.weight` (out_features, r), F32, with metadata
//! `{"format": "pt"}`; the config carries `r`, `lora_alpha`, `use_rslora`, `rank_pattern`, `alpha_pattern`
//! and `target_modules`, from which each module's scale is `alpha_m / r_m` (or `alpha_m / √r_m`).
//! lora-rs adds `lora_rs.base_sha256` to the safetensors metadata: a fingerprint of the base the adapter
//! was trained on, checked when loading. Anything the format can express that lora-rs cannot honour
//! (DoRA, trained biases, `fan_in_fan_out`, `modules_to_save`, …) is refused with an error naming the key.
//!
//! This file reads the two files and checks them on their own ([`AdapterFiles`]); `load.rs` checks them
//! against a model and inserts them, `save.rs` writes a model's adapter.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use super::config::parse_peft_config;
use crate::config::{Bias, LoraConfig};
use crate::error::{LoraError, Result};
use crate::io::{FileError, TensorFile};

/// File name of the config inside an adapter directory.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// File name of the weights inside an adapter directory.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// Prefix PEFT puts before module names in tensor keys.
pub const PEFT_PREFIX: &str = "base_model.model.";
/// Safetensors metadata key holding the base model's SHA-256 fingerprint.
pub const META_BASE_SHA256: &str = "lora_rs.base_sha256";

/// An adapter read from disk and validated on its own (not yet checked against a model).
#[derive(Debug)]
pub struct AdapterFiles {
    /// The adapter directory.
    pub dir: PathBuf,
    /// The config, `target_modules` as written.
    pub config: LoraConfig,
    /// `base_model_name_or_path` from the config.
    pub base_model_name_or_path: Option<String>,
    /// Module → (A (r, in), B (out, r)), every pair's rank checked against the config.
    pub tensors: BTreeMap<String, (Tensor, Tensor)>,
    /// Module → DoRA magnitude (out) (`<module>.lora_magnitude_vector`), present exactly when `use_dora`.
    pub magnitudes: BTreeMap<String, Tensor>,
    /// Module → bias of B (out) (`<module>.lora_B.bias`), present exactly when `lora_bias`.
    pub lora_biases: BTreeMap<String, Tensor>,
    /// Module → the adapter's own (weight, bias) of that layer: trained biases (`bias = "all"` /
    /// `"lora_only"`, stored as `<module>.base_layer.bias` or `<module>.bias`) and `modules_to_save` copies
    /// (`<module>.weight`, `<module>.bias`).
    pub copies: BTreeMap<String, (Option<Tensor>, Option<Tensor>)>,
    /// Module → its base weight as PEFT saved it beside an embedding adapter (`<module>.base_layer.weight`):
    /// it must equal the model's own (lora-rs loads no resized or retrained tables).
    pub base_weights: BTreeMap<String, Tensor>,
    /// Safetensors metadata.
    pub metadata: HashMap<String, String>,
    /// Stored dtype per tensor name.
    pub dtypes: Vec<(String, String)>,
    /// Bytes of the config and the weights file.
    pub bytes: (u64, u64),
}

impl AdapterFiles {
    /// Trainable parameters held (Σ r·(in + out)).
    pub fn num_params(&self) -> usize {
        self.tensors.values().map(|(a, b)| a.elem_count() + b.elem_count()).sum::<usize>()
            + self.magnitudes.values().chain(self.lora_biases.values()).map(Tensor::elem_count).sum::<usize>()
            + self.copies.values().flat_map(|(w, b)| [w, b]).flatten().map(Tensor::elem_count).sum::<usize>()
    }
    /// The base fingerprint recorded by lora-rs, if any.
    pub fn base_fingerprint(&self) -> Option<&str> {
        self.metadata.get(META_BASE_SHA256).map(String::as_str)
    }
}

pub(super) fn bad(path: &Path, why: impl Into<String>) -> LoraError {
    LoraError::File(FileError::invalid(path, why))
}

/// Splits `base_model.model.<module>.lora_X.weight` into (module, is_a).
/// What one tensor of an adapter file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    A,
    B,
    Magnitude,
    LoraBias,
    /// The adapter's own bias of the layer (`base_layer.bias` of an adapted layer, `bias` of another).
    CopyBias,
    /// The adapter's own weight of the layer (`modules_to_save`).
    CopyWeight,
    /// The base layer's own weight, which PEFT saves beside embedding adapters (`save_embedding_layers`).
    BaseWeight,
}

fn split_key(name: &str) -> Option<(&str, Part)> {
    let rest = name.strip_prefix(PEFT_PREFIX)?;
    [
        (".lora_A.weight", Part::A),
        (".lora_B.weight", Part::B),
        (".lora_embedding_A", Part::A),
        (".lora_embedding_B", Part::B),
        (".base_layer.weight", Part::BaseWeight),
        (".lora_magnitude_vector", Part::Magnitude),
        (".lora_B.bias", Part::LoraBias),
        (".base_layer.bias", Part::CopyBias),
        (".bias", Part::CopyBias),
        (".weight", Part::CopyWeight),
    ]
    .into_iter()
    .find_map(|(suffix, part)| rest.strip_suffix(suffix).map(|m| (m, part)))
}

/// Reads an adapter directory and checks it on its own: config keys, tensor names, A/B pairs, ranks
/// against the config, dtypes (float, converted to F32), finite values.
pub fn read_adapter(dir: &Path) -> Result<AdapterFiles> {
    let cpath = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&cpath).map_err(|error| FileError::Io { path: cpath.clone(), error })?;
    let wpath = dir.join(WEIGHTS_FILE);
    let weights = std::fs::read(&wpath).map_err(|error| FileError::Io { path: wpath.clone(), error })?;
    adapter_from_bytes(dir, &text, &weights)
}

/// [`read_adapter`] on the two files' contents already in memory; `dir` names the source in errors.
pub fn adapter_from_bytes(dir: &Path, config_text: &str, weights: &[u8]) -> Result<AdapterFiles> {
    let (cpath, wpath) = (dir.join(CONFIG_FILE), dir.join(WEIGHTS_FILE));
    let text = config_text;
    let (config, base) = parse_peft_config(&cpath, text)?;
    let file = TensorFile::from_bytes(&wpath, weights, &Device::Cpu)?;
    let mut a_of = BTreeMap::new();
    let mut b_of = BTreeMap::new();
    let (mut magnitudes, mut lora_biases) = (BTreeMap::new(), BTreeMap::new());
    let mut copies: BTreeMap<String, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
    let mut base_weights = BTreeMap::new();
    for (name, t) in &file.tensors {
        // A layer's own tensors sit under a module name; a `lora_*` name there is a LoRA part lora-rs lacks.
        let own_tensor_of_lora_part = |(m, p): &(&str, Part)| {
            matches!(p, Part::CopyBias | Part::CopyWeight) && m.rsplit('.').next().is_some_and(|l| l.starts_with("lora_"))
        };
        let (module, part) = split_key(name).filter(|k| !own_tensor_of_lora_part(k)).ok_or_else(|| {
            bad(
                &wpath,
                format!(
                    "unexpected tensor {name} (expected {PEFT_PREFIX}<module>.lora_A.weight, .lora_B.weight, \
                     .lora_magnitude_vector with use_dora or .lora_B.bias with lora_bias)"
                ),
            )
        })?;
        if part == Part::BaseWeight {
            base_weights.insert(module.to_string(), t.clone());
            continue;
        }
        let copy = matches!(part, Part::CopyBias | Part::CopyWeight);
        if copy {
            let allowed = config.saves(module) || (part == Part::CopyBias && config.bias != Bias::None);
            if !allowed {
                let why = if part == Part::CopyWeight { "module_to_save" } else { "bias other than \"none\" nor module_to_save" };
                return Err(bad(&wpath, format!("tensor {name}: {CONFIG_FILE} names no {why} for {module}")));
            }
            let want_rank = if part == Part::CopyWeight { 2 } else { 1 };
            if t.rank() != want_rank {
                return Err(bad(&wpath, format!("tensor {name}: shape {:?}, expected {want_rank} dimension(s)", t.dims())));
            }
            let slot = copies.entry(module.to_string()).or_default();
            if part == Part::CopyWeight { &mut slot.0 } else { &mut slot.1 }.replace(t.clone());
            continue;
        }
        if !config.targets(module) {
            return Err(bad(&wpath, format!("tensor {name}: module {module} is not in target_modules {:?}", config.target_modules)));
        }
        match part {
            Part::A | Part::B => {
                if t.rank() != 2 {
                    return Err(bad(&wpath, format!("tensor {name}: shape {:?}, expected 2 dimensions", t.dims())));
                }
                let want = config.rank_for(module);
                let r = if part == Part::A { t.dims()[0] } else { t.dims()[1] };
                if r != want {
                    return Err(bad(&wpath, format!("tensor {name}: rank {r} does not match r = {want} for {module} in {CONFIG_FILE}")));
                }
                if part == Part::A { &mut a_of } else { &mut b_of }.insert(module.to_string(), t.clone());
            }
            Part::Magnitude | Part::LoraBias => {
                let (on, key, map) = match part {
                    Part::Magnitude => (config.use_dora, "use_dora", &mut magnitudes),
                    _ => (config.lora_bias, "lora_bias", &mut lora_biases),
                };
                if !on {
                    return Err(bad(&wpath, format!("tensor {name}: {CONFIG_FILE} has {key} = false")));
                }
                if t.rank() != 1 {
                    return Err(bad(&wpath, format!("tensor {name}: shape {:?}, expected 1 dimension", t.dims())));
                }
                map.insert(module.to_string(), t.clone());
            }
            Part::CopyBias | Part::CopyWeight | Part::BaseWeight => {}
        }
    }
    let mut tensors = BTreeMap::new();
    for (module, a) in a_of {
        let b = b_of.remove(&module).ok_or_else(|| bad(&wpath, format!("missing tensor {PEFT_PREFIX}{module}.lora_B.weight")))?;
        tensors.insert(module, (a, b));
    }
    if let Some(module) = b_of.keys().next() {
        return Err(bad(&wpath, format!("missing tensor {PEFT_PREFIX}{module}.lora_A.weight")));
    }
    if tensors.is_empty() {
        return Err(bad(&wpath, "holds no LoRA tensors"));
    }
    for (on, map, suffix) in [(config.use_dora, &magnitudes, "lora_magnitude_vector"), (config.lora_bias, &lora_biases, "lora_B.bias")] {
        if let Some(m) = tensors.keys().find(|m| on && !map.contains_key(*m)) {
            return Err(bad(&wpath, format!("missing tensor {PEFT_PREFIX}{m}.{suffix}")));
        }
        if let Some(m) = map.keys().find(|m| !tensors.contains_key(*m)) {
            return Err(bad(&wpath, format!("tensor {PEFT_PREFIX}{m}.{suffix} has no lora_A / lora_B")));
        }
    }
    Ok(AdapterFiles {
        dir: dir.to_path_buf(),
        config,
        base_model_name_or_path: base,
        tensors,
        magnitudes,
        lora_biases,
        copies,
        base_weights,
        metadata: file.metadata,
        dtypes: file.dtypes,
        bytes: (text.len() as u64, file.bytes),
    })
}
