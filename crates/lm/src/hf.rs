//! Model directories in the Hugging Face layout, both ways: `config.json` plus `model.safetensors`, or
//! shards listed by `model.safetensors.index.json` (`{"weight_map": {tensor: shard file}}`). F32, F16
//! and BF16 weights load: BF16 matrices stay bf16 (read piece by piece, never widened: the model then holds
//! about its file's size), the rest converted to F32 exactly. lora-rs writes F32 (or BF16, rounded to nearest
//! even, as `model.to(torch.bfloat16).save_pretrained()` does) and transformers' tensor names.
//!
//! Chat: `tokenizer_config.json` (special tokens, `chat_template`), `chat_template.jinja` (where newer
//! transformers saves the template) and `generation_config.json` (`eos_token_id`, one or a list: where
//! generation stops, with `config.json`'s).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use lora::io::WeightFile;
use serde_json::Value;

use crate::chat::{ChatTemplate, SpecialTokens};
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
/// The tokenizer's settings: special tokens and the chat template.
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
/// The chat template where transformers ≥ 4.43 saves it.
pub const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";
/// Generation settings: `eos_token_id`.
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";
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
    let mut add = |f: WeightFile, only: Option<&[String]>, files: &mut ModelFiles| -> Result<()> {
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
        add(WeightFile::load(&single)?, None, &mut files)?;
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
            add(WeightFile::load(&p)?, Some(names), &mut files)?;
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
    let model = Llama::from_weights(&config, tensors, &source)?;
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

fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| LmError::io(path, e))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| LmError::file(path, format!("not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(LmError::file(path, "must hold a JSON object"));
    }
    Ok(Some(v))
}

/// The special tokens of `DIR/tokenizer_config.json` (none when the file is absent).
pub fn read_special_tokens(dir: &Path) -> Result<SpecialTokens> {
    let path = dir.join(TOKENIZER_CONFIG_FILE);
    match read_json(&path)? {
        Some(v) => SpecialTokens::from_config(&v, &path.display().to_string()),
        None => Ok(SpecialTokens::default()),
    }
}

/// A model's chat template, from the first of: `template_file` (a Jinja file given for it), `chat_template` in
/// `DIR/tokenizer_config.json` (a string, or a list of `{"name", "template"}`, the one named `default`),
/// `DIR/chat_template.jinja`; a byte-level model without one gets lora-rs' default ([`ChatTemplate::chatml`]).
/// Rendered with the special tokens of `tokenizer_config.json`. A model with a tokenizer but no template is an
/// error that says how to give one.
pub fn load_chat_template(dir: &Path, config: &LlamaConfig, template_file: Option<&Path>) -> Result<ChatTemplate> {
    find_chat_template(dir, config, template_file)?.ok_or_else(|| {
        LmError::file(
            dir,
            format!(
                "has no chat template ({TOKENIZER_CONFIG_FILE} has no chat_template and there is no {CHAT_TEMPLATE_FILE}): \
                 give one with --chat-template FILE (a Jinja file, e.g. tests/fixtures/chat/templates/chatml.jinja)"
            ),
        )
    })
}

/// [`load_chat_template`], `None` where a model with a tokenizer has no template.
pub fn find_chat_template(dir: &Path, config: &LlamaConfig, template_file: Option<&Path>) -> Result<Option<ChatTemplate>> {
    let special = read_special_tokens(dir)?;
    if let Some(f) = template_file {
        let source = std::fs::read_to_string(f).map_err(|e| LmError::io(f, e))?;
        return ChatTemplate::from_source(&source, special, &f.display().to_string()).map(Some);
    }
    let tc = dir.join(TOKENIZER_CONFIG_FILE);
    if let Some(v) = read_json(&tc)? {
        let source = match v.get("chat_template") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(list)) => {
                let named = list.iter().find(|t| t.get("name").and_then(Value::as_str) == Some("default"));
                match named.and_then(|t| t.get("template")).and_then(Value::as_str) {
                    Some(s) => Some(s.to_string()),
                    None => {
                        return Err(LmError::file(
                            &tc,
                            "chat_template is a list without a {\"name\": \"default\", \"template\": string} entry",
                        ))
                    }
                }
            }
            Some(other) => return Err(LmError::file(&tc, format!("chat_template = {:.40}: must be a string", other.to_string()))),
        };
        if let Some(source) = source {
            return ChatTemplate::from_source(&source, special, &tc.display().to_string()).map(Some);
        }
    }
    let jinja = dir.join(CHAT_TEMPLATE_FILE);
    if jinja.exists() {
        let source = std::fs::read_to_string(&jinja).map_err(|e| LmError::io(&jinja, e))?;
        return ChatTemplate::from_source(&source, special, &jinja.display().to_string()).map(Some);
    }
    Ok(match config.tokenizer {
        TokenizerKind::Bytes => Some(ChatTemplate::chatml()),
        TokenizerKind::File => None,
    })
}

/// Where generation stops: `config.json`'s end tokens, then `DIR/generation_config.json`'s `eos_token_id` (a
/// number or a list), each once.
pub fn end_token_ids(dir: &Path, config: &LlamaConfig) -> Result<Vec<u32>> {
    let mut ids = config.eos_token_ids.clone();
    let path = dir.join(GENERATION_CONFIG_FILE);
    if let Some(v) = read_json(&path)? {
        let one = |x: &Value| -> Result<u32> {
            x.as_u64().filter(|&i| (i as usize) < config.vocab_size).map(|i| i as u32).ok_or_else(|| {
                LmError::file(&path, format!("eos_token_id = {x}: must be a token id below vocab_size = {}", config.vocab_size))
            })
        };
        let listed = match v.get("eos_token_id") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a.iter().map(one).collect::<Result<_>>()?,
            Some(x) => vec![one(x)?],
        };
        for id in listed {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
    }
    Ok(ids)
}

/// The dtype a model's weights are written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightDtype {
    /// f32: the weights exactly as trained.
    #[default]
    F32,
    /// bfloat16, each value rounded to the nearest (ties to even): half the bytes on disk and in memory (a
    /// model read back holds its matrices in bf16, frozen). A model read back is that rounded model.
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

/// The files beside a model's weights that say how to talk to it: the tokenizer, its config (special tokens,
/// chat template), `chat_template.jinja`, `generation_config.json` (end tokens), `special_tokens_map.json`.
pub const TALK_FILES: [&str; 5] =
    [TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, CHAT_TEMPLATE_FILE, GENERATION_CONFIG_FILE, "special_tokens_map.json"];

/// The [`TALK_FILES`] that `dir` holds, read (to write them beside a model made from it, e.g. a merged one).
pub fn talk_files(dir: &Path) -> Result<Vec<(&'static str, Vec<u8>)>> {
    let mut out = Vec::new();
    for name in TALK_FILES {
        let p = dir.join(name);
        if p.is_file() {
            out.push((name, std::fs::read(&p).map_err(|e| LmError::io(&p, e))?));
        }
    }
    Ok(out)
}

/// [`save_model`] with the weights in `dtype`; the fingerprint is that of the weights as written (the model
/// [`load_model`] reads back).
pub fn save_model_as(model: &Llama, dir: &Path, extra: &BTreeMap<String, String>, dtype: WeightDtype) -> Result<()> {
    save_model_with(model, dir, extra, dtype, &[])
}

/// [`save_model_as`], with more files (name, bytes) written into the same folder, all of it appearing at once.
pub fn save_model_with(
    model: &Llama,
    dir: &Path,
    extra: &BTreeMap<String, String>,
    dtype: WeightDtype,
    files: &[(&str, Vec<u8>)],
) -> Result<()> {
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
    // Every file or none: the model folder appears whole (config.json, which makes it a model, last).
    let config = format!("{text}\n");
    let mut all: Vec<(&str, &[u8])> = vec![(WEIGHTS_FILE, &weights)];
    all.extend(files.iter().filter(|(n, _)| *n != WEIGHTS_FILE && *n != CONFIG_FILE).map(|(n, b)| (*n, b.as_slice())));
    all.push((CONFIG_FILE, config.as_bytes()));
    lora::io::write_dir_atomic(dir, &all)?;
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
