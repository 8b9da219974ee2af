//! Model directories in the Hugging Face layout, both ways: `config.json` plus `model.safetensors`, or
//! shards listed by `model.safetensors.index.json` (`{"weight_map": {tensor: shard file}}`). F32, F16
//! and BF16 weights load (converted to F32 exactly); lora-rs writes F32 (or BF16, rounded to nearest even, as
//! `model.to(torch.bfloat16).save_pretrained()` does) and transformers' tensor names.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::Device;
use lora::io::TensorFile;
use serde_json::Value;

use crate::config::{LlamaConfig, TokenizerKind};
use crate::error::{LmError, Result};
use crate::model::Llama;
use crate::tokenizer::Tokenizer;

/// `config.json`.
pub const CONFIG_FILE: &str = "config.json";
/// The single-file weights.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The index of sharded weights.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// The tokenizer of models that are not byte-level.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// Safetensors metadata key holding the model's base fingerprint (written by lora-rs).
pub const META_FINGERPRINT: &str = "lora_rs.base_sha256";

/// What was read from a model directory besides the model.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    /// The directory.
    pub dir: PathBuf,
    /// The weight files read (one, or the shards).
    pub weight_files: Vec<PathBuf>,
    /// Stored dtype → number of tensors.
    pub dtypes: BTreeMap<String, usize>,
    /// Bytes of the weight files.
    pub bytes: u64,
}

/// Reads `DIR/config.json`.
pub fn read_config(dir: &Path) -> Result<LlamaConfig> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| LmError::io(&path, e))?;
    LlamaConfig::from_json(&path, &text)
}

/// Loads a model directory: config, weights (single file or shards), checked against each other.
pub fn load_model(dir: &Path) -> Result<(Llama, ModelFiles)> {
    if !dir.is_dir() {
        return Err(LmError::file(dir, "not a directory (a model is a directory holding config.json and model.safetensors)"));
    }
    let config = read_config(dir)?;
    let single = dir.join(WEIGHTS_FILE);
    let index = dir.join(INDEX_FILE);
    let mut tensors = BTreeMap::new();
    let mut files = ModelFiles { dir: dir.to_path_buf(), weight_files: Vec::new(), dtypes: BTreeMap::new(), bytes: 0 };
    let mut add = |f: TensorFile, only: Option<&[String]>, files: &mut ModelFiles| -> Result<()> {
        for (name, dt) in &f.dtypes {
            if let Some(only) = only {
                if !only.contains(name) {
                    return Err(LmError::file(&f.path, format!("tensor {name} is not listed for this shard in {INDEX_FILE}")));
                }
            }
            *files.dtypes.entry(dt.clone()).or_default() += 1;
        }
        files.bytes += f.bytes;
        files.weight_files.push(f.path.clone());
        for (name, t) in f.tensors {
            tensors.insert(name, t);
        }
        Ok(())
    };
    let source = if single.exists() {
        add(TensorFile::load(&single, &Device::Cpu)?, None, &mut files)?;
        single
    } else if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| LmError::io(&index, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| LmError::file(&index, format!("not valid JSON: {e}")))?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| LmError::file(&index, "missing key weight_map (an object: tensor name → shard file)"))?;
        let mut shards: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (name, shard) in map {
            let s = shard.as_str().ok_or_else(|| LmError::file(&index, format!("weight_map.{name} = {shard}: must be a file name")))?;
            if s.contains('/') || s.contains('\\') || s.starts_with('.') {
                return Err(LmError::file(&index, format!("weight_map.{name} = {s:?}: must be a file name inside the model directory")));
            }
            shards.entry(s.to_string()).or_default().push(name.clone());
        }
        for (shard, names) in &shards {
            let p = dir.join(shard);
            if !p.exists() {
                return Err(LmError::file(&p, format!("missing shard listed in {INDEX_FILE}")));
            }
            add(TensorFile::load(&p, &Device::Cpu)?, Some(names), &mut files)?;
        }
        for name in map.keys() {
            if !tensors.contains_key(name) {
                return Err(LmError::file(
                    &dir.join(map[name].as_str().unwrap_or("?")),
                    format!("tensor {name} listed in {INDEX_FILE} is missing"),
                ));
            }
        }
        index
    } else {
        return Err(LmError::file(dir, format!("holds neither {WEIGHTS_FILE} nor {INDEX_FILE}")));
    };
    let model = Llama::from_tensors(&config, tensors, &source)?;
    tracing::info!(dir = %dir.display(), params = model.num_params(), files = files.weight_files.len(), bytes = files.bytes, "loaded model");
    Ok((model, files))
}

/// Loads the tokenizer a model uses: bytes, or the directory's `tokenizer.json`.
pub fn load_tokenizer(dir: &Path, config: &LlamaConfig) -> Result<Tokenizer> {
    match config.tokenizer {
        TokenizerKind::Bytes => Ok(Tokenizer::bytes()),
        TokenizerKind::File => Tokenizer::from_file(&dir.join(TOKENIZER_FILE), config),
    }
}

/// The dtype a model's weights are written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightDtype {
    /// f32: the weights exactly as trained.
    #[default]
    F32,
    /// bfloat16, each value rounded to the nearest (ties to even): half the bytes on disk, and in memory
    /// where the model is served ([`Llama::pack_base`]). A model read back is that rounded model.
    Bf16,
}

impl WeightDtype {
    /// The name `config.json`'s `torch_dtype` gives it.
    pub fn torch_name(self) -> &'static str {
        match self {
            WeightDtype::F32 => "float32",
            WeightDtype::Bf16 => "bfloat16",
        }
    }
}

/// Writes a model directory: `config.json` and `model.safetensors` (F32, sorted names, the base
/// fingerprint in the metadata), each atomically. `extra` metadata entries are added.
pub fn save_model(model: &Llama, dir: &Path, extra: &BTreeMap<String, String>) -> Result<()> {
    save_model_as(model, dir, extra, WeightDtype::F32)
}

/// [`save_model`] with the weights in `dtype`; the fingerprint is that of the weights as written (the model
/// [`load_model`] reads back).
pub fn save_model_as(model: &Llama, dir: &Path, extra: &BTreeMap<String, String>, dtype: WeightDtype) -> Result<()> {
    let mut state = model.base_state()?;
    if dtype == WeightDtype::Bf16 {
        for (_, t) in &mut state {
            *t = t.to_dtype(candle_core::DType::BF16)?;
        }
    }
    let mut meta: HashMap<String, String> = extra.clone().into_iter().collect();
    meta.insert("format".into(), "pt".into());
    meta.insert(META_FINGERPRINT.into(), lora::io::fingerprint(&state)?);
    let weights = lora::io::safetensors_bytes(&state, &meta)?;
    let mut config = model.config().to_json();
    config["torch_dtype"] = dtype.torch_name().into();
    let text = serde_json::to_string_pretty(&config).map_err(|e| LmError::file(&dir.join(CONFIG_FILE), e.to_string()))?;
    // Both files or neither: the model folder appears whole (config.json, which makes it a model, last).
    lora::io::write_dir_atomic(dir, &[(WEIGHTS_FILE, &weights), (CONFIG_FILE, format!("{text}\n").as_bytes())])?;
    Ok(())
}

/// Reads the PEFT adapter in `dir` and adds it to the model as `name` (not activated). An adapter that
/// records the fingerprint of another base is refused unless `force`.
pub fn load_adapter(model: &mut Llama, name: &str, dir: &Path, force: bool) -> Result<lora::AdapterFiles> {
    let opts = lora::LoadOptions { base_fingerprint: Some(model.fingerprint()?), force };
    Ok(model.lora_mut().load_adapter(name, dir, &opts)?)
}

/// Writes adapter `name` as a PEFT directory (`task_type: "CAUSAL_LM"`, the base fingerprint in the
/// weights' metadata), both files atomically; `convert_to_lora` writes a PiSSA/OLoRA adapter as the plain
/// LoRA with the same update (see [`lora::SaveOptions`]).
pub fn save_adapter(
    model: &Llama,
    name: &str,
    dir: &Path,
    base_model_name_or_path: Option<String>,
    metadata: BTreeMap<String, String>,
    convert_to_lora: bool,
) -> Result<()> {
    let opts = lora::SaveOptions {
        base_model_name_or_path,
        base_fingerprint: Some(model.fingerprint()?),
        metadata,
        task_type: Some("CAUSAL_LM".into()),
        convert_to_lora,
    };
    Ok(model.lora().save_adapter(name, dir, &opts)?)
}
