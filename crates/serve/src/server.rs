//! [`Server`]: the loaded base, its adapters, the batching worker, the limits, timeouts and access rules,
//! behind a router.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::Duration;

use lora_lm::chat::ChatTemplate;
use lora_lm::Tokenizer;
use lora_train::ExpensiveNet;
use sha2::{Digest, Sha256};

use crate::admission::Admission;
use crate::classifier::{ClassifierEngine, Normalization};
use crate::error::{Result, ServeError};
use crate::lm::{BatchSettings, LmEngine};
use crate::metrics::Metrics;
use crate::registry::{Packer, Registry};
use crate::worker::WorkerHealth;

/// What the server runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    /// A Llama-architecture language model: `/v1/completions`.
    Lm,
    /// An MNIST classifier: `/v1/predict`.
    Classifier,
}

impl ModelKind {
    /// `"lm"` or `"classifier"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelKind::Lm => "lm",
            ModelKind::Classifier => "classifier",
        }
    }
}

/// Limits on requests; a request over one gets a 4xx naming it, or a 503 past the admission limit.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest request body, bytes.
    pub max_body_bytes: usize,
    /// Most images in one prediction request.
    pub max_images: usize,
    /// Most prompts in one completion request.
    pub max_prompts: usize,
    /// Largest `max_tokens`.
    pub max_tokens: usize,
    /// Most completions and predictions in the server at once, queued or running; one more gets a 503
    /// with `Retry-After` at once (see [`crate::admission`]).
    pub max_concurrent_requests: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_body_bytes: 8 << 20, max_images: 512, max_prompts: 16, max_tokens: 512, max_concurrent_requests: 128 }
    }
}

/// How long things may take.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// A completion or prediction not finished this long after it arrived is stopped (504, or an error
    /// event in a stream).
    pub request: Duration,
    /// A connection whose client has read nothing for this long while the server has bytes for it is
    /// dropped (see [`crate::net`]).
    pub write: Duration,
    /// A stream with nothing to send for this long sends an SSE comment, so that proxies and clients
    /// keep the connection.
    pub keep_alive: Duration,
    /// After the shutdown signal, requests in flight get this long to finish; then the server stops.
    pub shutdown: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            request: Duration::from_secs(300),
            write: Duration::from_secs(30),
            keep_alive: Duration::from_secs(15),
            shutdown: Duration::from_secs(30),
        }
    }
}

/// Who may do what.
#[derive(Clone, Default)]
pub struct Access {
    /// When set, every `/v1` route wants `Authorization: Bearer KEY` (401 otherwise), as vLLM's
    /// `--api-key`. `/`, `/health` and `/metrics` stay open.
    pub api_key: Option<String>,
    /// Whether `/v1/load_lora_adapter` and `/v1/unload_lora_adapter` are served (403 otherwise).
    pub allow_adapter_updates: bool,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access")
            .field("api_key", &self.api_key.as_ref().map(|_| "(set)"))
            .field("allow_adapter_updates", &self.allow_adapter_updates)
            .finish()
    }
}

/// What a classifier needs besides its weights: the pixel normalisation of its training set, and test
/// images for `/v1/mnist/sample`. The caller reads them (the `lora` binary, from MNIST); this crate
/// knows no data set.
#[derive(Debug, Clone)]
pub struct ClassifierInputs {
    /// `(p/255 − mean)/std`.
    pub normalization: Normalization,
    /// Sample images, `labels.len()` of `pixels` bytes each, row-major.
    pub images: Vec<u8>,
    /// Their labels.
    pub labels: Vec<u8>,
    /// Pixels per image; must be the model's inputs.
    pub pixels: usize,
}

/// How to start a server.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// An LM model directory (config.json + safetensors) or an MNIST model file (safetensors).
    pub model: PathBuf,
    /// The adapters folder: each sub-folder holding an adapter is loaded under its name; run-time loads
    /// come from inside it only. `None`: the base alone, no loading.
    pub adapters: Option<PathBuf>,
    /// The base's name in requests (default: the model path's file name).
    pub name: Option<String>,
    /// A classifier's normalisation and sample images (required for a classifier; unused for an LM).
    pub classifier: Option<ClassifierInputs>,
    /// Most adapters held in memory (least recently used beyond it go back to disk).
    pub max_loaded: usize,
    /// Most rows per batched step: sequences (LM) or images (classifier).
    pub max_batch: usize,
    /// How long an idle batcher waits for more requests after the first.
    pub batch_window: Duration,
    /// Request limits.
    pub limits: Limits,
    /// Timeouts.
    pub timeouts: Timeouts,
    /// Access rules.
    pub access: Access,
    /// A chat template (Jinja file) for `/v1/chat/completions` in place of the model's own (an LM only).
    pub chat_template: Option<PathBuf>,
}

pub(crate) struct LmState {
    pub engine: LmEngine,
    pub tokenizer: Arc<Tokenizer>,
    pub context: usize,
    /// The model's end tokens (`config.json` and `generation_config.json`): where completions stop.
    pub end_ids: Arc<[u32]>,
    /// The chat template, or why there is none (chat requests get a 400 saying so).
    pub chat: std::result::Result<Chat, String>,
}

/// What `/v1/chat/completions` renders and stops with.
pub(crate) struct Chat {
    pub template: Arc<ChatTemplate>,
    /// The model's end tokens and the template's end token.
    pub end_ids: Arc<[u32]>,
    /// Text that ends a reply where the tokenizer spells it out (the byte-level default's `<|im_end|>`).
    pub stops: Vec<String>,
}

/// The chat settings of an LM: its template (or `--chat-template`), the end tokens a reply stops at.
fn chat_of(
    o: &ServeOptions,
    config: &lora_lm::LlamaConfig,
    tokenizer: &Tokenizer,
    end_ids: &[u32],
) -> Result<std::result::Result<Chat, String>> {
    // A broken template fails the start; a model without one serves completions, and chats get a 400 saying why.
    let Some(template) = lora_lm::hf::find_chat_template(&o.model, config, o.chat_template.as_deref())? else {
        let why = format!(
            "this model has no chat template ({} has no chat_template and there is no {}): start the server with --chat-template FILE",
            lora_lm::hf::TOKENIZER_CONFIG_FILE,
            lora_lm::hf::CHAT_TEMPLATE_FILE
        );
        tracing::warn!(model = %o.model.display(), "no chat template: /v1/chat/completions is refused");
        return Ok(Err(why));
    };
    let mut ids = end_ids.to_vec();
    if let Some(id) = template.special().eos.as_deref().and_then(|t| tokenizer.token_id(t)) {
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    let stops = if tokenizer.is_bytes() { template.end_text().map(String::from).into_iter().collect() } else { Vec::new() };
    Ok(Ok(Chat { template: Arc::new(template), end_ids: ids.into(), stops }))
}

pub(crate) struct ClassifierState {
    pub engine: ClassifierEngine,
    pub samples: ClassifierInputs,
}

pub(crate) struct State {
    pub kind: ModelKind,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    pub timeouts: Timeouts,
    /// SHA-256 of the API key (compared digest to digest, so the comparison's time says nothing of the key).
    pub api_key: Option<[u8; 32]>,
    pub allow_adapter_updates: bool,
    pub admission: Arc<Admission>,
    /// Set once the shutdown signal came: `/health` says so and new work is refused.
    pub draining: AtomicBool,
    pub created: u64,
    pub lm: Option<LmState>,
    pub classifier: Option<ClassifierState>,
    pub next_id: AtomicU64,
}

impl State {
    /// The batching worker's health.
    pub fn worker(&self) -> &Arc<WorkerHealth> {
        match (&self.lm, &self.classifier) {
            (Some(lm), _) => lm.engine.health(),
            (None, Some(c)) => c.engine.health(),
            (None, None) => unreachable!("a server runs a language model or a classifier"),
        }
    }
}

/// SHA-256 of `key`.
pub(crate) fn key_digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// The refusal for a path that is an adapter folder (or a file in one) given as the model, naming its base
/// when its config records one.
fn adapter_given_as_model(model: &Path) -> Option<ServeError> {
    let dir = if model.is_dir() { model } else { model.parent()? };
    let config = dir.join(lora::adapter::CONFIG_FILE);
    if !config.is_file() || dir.join("config.json").is_file() {
        return None;
    }
    let base = std::fs::read_to_string(&config)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["base_model_name_or_path"].as_str().map(String::from))
        .filter(|b| !b.is_empty());
    let parent = dir.parent().map_or_else(|| ".".to_string(), |p| p.display().to_string());
    let parent = if parent.is_empty() { ".".to_string() } else { parent };
    let base = base.unwrap_or_else(|| "BASE".to_string());
    Some(ServeError::path(
        model,
        format!(
            "this is a LoRA adapter (it holds {}), not a base model: give the base with --model and the folder \
             holding the adapter folders with --adapters, e.g. --model {base} --adapters {parent}",
            lora::adapter::CONFIG_FILE
        ),
    ))
}

/// A loaded server, ready to serve (see [`serve`]).
#[derive(Clone)]
pub struct Server {
    pub(crate) state: Arc<State>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("kind", &self.state.kind).finish_non_exhaustive()
    }
}

fn base_name(path: &Path) -> String {
    path.file_stem().map_or_else(|| "base".to_string(), |s| s.to_string_lossy().into_owned())
}

impl Server {
    /// Loads the model and every adapter in the adapters folder, and starts the batching worker.
    pub fn open(o: &ServeOptions) -> Result<Server> {
        if o.max_batch == 0 {
            return Err(ServeError::setting("max-batch", 0, "must be at least 1"));
        }
        for (name, v) in [("max-images", o.limits.max_images), ("max-prompts", o.limits.max_prompts), ("max-tokens", o.limits.max_tokens)] {
            if v == 0 {
                return Err(ServeError::setting(name, v, "must be at least 1"));
            }
        }
        if o.limits.max_body_bytes < 1024 {
            return Err(ServeError::setting("max-body-bytes", o.limits.max_body_bytes, "must be at least 1024"));
        }
        if o.limits.max_concurrent_requests == 0 {
            return Err(ServeError::setting("max-concurrent-requests", 0, "must be at least 1"));
        }
        let t = &o.timeouts;
        for (name, d) in [("request-timeout", t.request), ("write-timeout", t.write), ("keep-alive", t.keep_alive)] {
            if d.is_zero() {
                return Err(ServeError::setting(name, 0, "must be more than 0 seconds"));
            }
        }
        if o.access.api_key.as_ref().is_some_and(|k| k.is_empty() || k.chars().any(|c| c.is_whitespace() || c.is_control())) {
            return Err(ServeError::setting("api-key", "(hidden)", "must be non-empty, without spaces or control characters"));
        }
        if let Some(e) = adapter_given_as_model(&o.model) {
            return Err(e);
        }
        let name = o.name.clone().unwrap_or_else(|| base_name(&o.model));
        if !crate::registry::is_plain_name(&name) {
            return Err(ServeError::setting("name", &name, "a plain name (letters, digits, '_', '.', '-')"));
        }
        let metrics = Arc::new(Metrics::default());
        let settings = BatchSettings { max_batch: o.max_batch, window: o.batch_window };
        let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let (kind, registry, lm, classifier) = if o.model.is_dir() {
            let (mut model, _) = lora_lm::hf::load_model(&o.model)?;
            model.freeze_base();
            // The base never changes while serving: weights that are bf16 numbers (a checkpoint stored in
            // bf16 is loaded so already) are held in bf16, and every step reads half the bytes.
            let packed = model.hold_base_in_bf16()?;
            tracing::info!(packed, bytes = model.base_bytes(), "base weights for serving");
            metrics.base_bf16_bytes.set(model.base_bf16_bytes() as i64);
            let tokenizer = Arc::new(lora_lm::hf::load_tokenizer(&o.model, model.config())?);
            let context = model.config().max_position_embeddings;
            let end_ids: Arc<[u32]> = lora_lm::hf::end_token_ids(&o.model, model.config())?.into();
            let chat = chat_of(o, model.config(), &tokenizer, &end_ids)?;
            let model = Arc::new(model);
            let m = model.clone();
            let packer: Packer = Arc::new(move |files| m.pack_adapter(files).map_err(|e| e.to_string()));
            let registry =
                Arc::new(Registry::new(o.adapters.as_deref(), o.max_loaded, &name, model.fingerprint()?, packer, metrics.clone())?);
            let engine = LmEngine::start(model, tokenizer.clone(), settings, metrics.clone(), o.timeouts.request)?;
            (ModelKind::Lm, registry, Some(LmState { engine, tokenizer, context, end_ids, chat }), None)
        } else if o.model.is_file() {
            if let Some(t) = &o.chat_template {
                return Err(ServeError::path(t, "--chat-template is for a language model; this server runs a classifier"));
            }
            let mut net = ExpensiveNet::load(&o.model)?;
            net.model.freeze_base(lora::Bias::None);
            let inputs = o.classifier.clone().ok_or_else(|| {
                ServeError::path(&o.model, "a classifier needs its pixel normalisation and sample images (ServeOptions::classifier)")
            })?;
            if inputs.pixels != net.sizes()?[0] || inputs.images.len() != inputs.labels.len() * inputs.pixels {
                return Err(ServeError::path(
                    &o.model,
                    format!(
                        "the model takes {} inputs but the sample images have {} pixels ({} bytes for {} labels)",
                        net.sizes()?[0],
                        inputs.pixels,
                        inputs.images.len(),
                        inputs.labels.len()
                    ),
                ));
            }
            let fingerprint = lora::io::fingerprint(&net.model.base_state()?).map_err(lora::LoraError::from)?;
            let net = Arc::new(net);
            let n = net.clone();
            let packer: Packer = Arc::new(move |files| n.model.pack_adapter(files).map_err(|e| e.to_string()));
            let registry = Arc::new(Registry::new(o.adapters.as_deref(), o.max_loaded, &name, fingerprint, packer, metrics.clone())?);
            let engine = ClassifierEngine::start(net, inputs.normalization, settings, metrics.clone(), o.timeouts.request)?;
            (ModelKind::Classifier, registry, None, Some(ClassifierState { engine, samples: inputs }))
        } else {
            return Err(ServeError::path(&o.model, "no such model: give an LM model directory or an MNIST model file"));
        };
        registry.scan()?;
        // The model label goes to the base and the adapters found at start before any loaded later.
        metrics.models.label(registry.base_name());
        for a in registry.list() {
            metrics.models.label(&a.name);
        }
        let admission = Admission::new(o.limits.max_concurrent_requests, metrics.in_flight.clone());
        let state = State {
            kind,
            registry,
            metrics,
            limits: o.limits,
            timeouts: o.timeouts,
            api_key: o.access.api_key.as_deref().map(key_digest),
            allow_adapter_updates: o.access.allow_adapter_updates,
            admission,
            draining: AtomicBool::new(false),
            created,
            lm,
            classifier,
            next_id: AtomicU64::new(1),
        };
        Ok(Server { state: Arc::new(state) })
    }

    /// What the server runs.
    pub fn kind(&self) -> ModelKind {
        self.state.kind
    }
    /// The base's name.
    pub fn name(&self) -> &str {
        self.state.registry.base_name()
    }
    /// The registered adapters.
    pub fn adapters(&self) -> Vec<crate::AdapterInfo> {
        self.state.registry.list()
    }
    /// The routes.
    pub fn router(&self) -> axum::Router {
        crate::routes::router(self.state.clone())
    }
    /// The batching worker's health.
    pub fn worker(&self) -> Arc<WorkerHealth> {
        self.state.worker().clone()
    }
}
