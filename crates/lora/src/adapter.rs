//! Adapter files in the Hugging Face PEFT format: `adapter_config.json` + `adapter_model.safetensors`.
//!
//! For a LoRA on module `m` with rank r, the safetensors file holds `base_model.model.m.lora_A.weight`
//! (r, in_features) and `base_model.model.m.lora_B.weight` (out_features, r), F32, with metadata
//! `{"format": "pt"}`; the config carries `r`, `lora_alpha`, `use_rslora`, `rank_pattern`, `alpha_pattern`
//! and `target_modules`, from which each module's scale is `alpha_m / r_m` (or `alpha_m / √r_m`).
//! lora-rs adds `lora_rs.base_sha256` to the safetensors metadata: a fingerprint of the base the adapter
//! was trained on, checked when loading. Anything the format can express that lora-rs cannot honour
//! (DoRA, trained biases, `fan_in_fan_out`, `modules_to_save`, …) is refused with an error naming the key.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::config::{Bias, Init, LoraConfig, Scaling};
use crate::error::{LoraError, Result};
use crate::io::{save_safetensors, write_atomic, FileError, TensorFile};
use crate::linear::Adapter;
use crate::matching::{Pattern, Targets};
use crate::model::LoraModel;
pub use crate::peft_config::{parse_peft_config, peft_config_json};

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

fn bad(path: &Path, why: impl Into<String>) -> LoraError {
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

/// Options for [`LoraModel::load_adapter`].
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Fingerprint of the loaded base ([`crate::io::fingerprint`] of its state); checked against the adapter's.
    pub base_fingerprint: Option<String>,
    /// Load even when the fingerprints differ.
    pub force: bool,
}

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
            let same = t.dims() == layer.weight().dims()
                && t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?.iter().map(|v| v.to_bits()).eq(layer
                    .weight()
                    .as_tensor()
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
            if let Some(w) = w.as_ref().filter(|w| w.dims() != layer.weight().dims()) {
                return Err(bad(
                    &wpath,
                    format!("tensor {PEFT_PREFIX}{module}.weight: shape {:?}, expected {:?}", w.dims(), layer.weight().dims()),
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
        std::fs::create_dir_all(dir).map_err(|source| FileError::Io { path: dir.to_path_buf(), error: source })?;
        save_safetensors(&dir.join(WEIGHTS_FILE), &tensors, &meta)?;
        let json = peft_config_json(&config, opts.base_model_name_or_path.as_deref(), opts.task_type.as_deref());
        let text = serde_json::to_string_pretty(&json).map_err(|e| bad(&dir.join(CONFIG_FILE), e.to_string()))?;
        write_atomic(&dir.join(CONFIG_FILE), format!("{text}\n").as_bytes())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linear::LoraLinear;
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use serde_json::Value;

    fn model() -> LoraModel {
        let mut m = LoraModel::new();
        for (n, i, o) in [("linear1", 7, 5), ("linear2", 5, 3)] {
            let w = Tensor::randn(0f32, 1.0, (o, i), &Device::Cpu).unwrap();
            m.push(n, LoraLinear::new(w, None).unwrap()).unwrap();
        }
        m
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect()
    }

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
