//! [`Server`]: the loaded base, its adapters, the batching worker and the limits, behind a router.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use lora_lm::Tokenizer;
use lora_train::ExpensiveNet;

use crate::classifier::ClassifierEngine;
use crate::error::{Result, ServeError};
use crate::lm::{BatchSettings, LmEngine};
use crate::metrics::Metrics;
use crate::registry::{Packer, Registry};

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

/// Limits on requests; a request over one gets a 4xx naming it.
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
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_body_bytes: 8 << 20, max_images: 512, max_prompts: 16, max_tokens: 512 }
    }
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
    /// MNIST data (a classifier's pixel normalisation and sample images).
    pub mnist_data: PathBuf,
    /// Most adapters held in memory (least recently used beyond it go back to disk).
    pub max_loaded: usize,
    /// Most rows per batched step: sequences (LM) or images (classifier).
    pub max_batch: usize,
    /// How long an idle batcher waits for more requests after the first.
    pub batch_window: Duration,
    /// Request limits.
    pub limits: Limits,
}

pub(crate) struct LmState {
    pub engine: LmEngine,
    pub tokenizer: Arc<Tokenizer>,
    pub context: usize,
}

pub(crate) struct ClassifierState {
    pub engine: ClassifierEngine,
    pub samples: mnist::Split,
}

pub(crate) struct State {
    pub kind: ModelKind,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    pub created: u64,
    pub lm: Option<LmState>,
    pub classifier: Option<ClassifierState>,
    pub next_id: AtomicU64,
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
            let tokenizer = Arc::new(lora_lm::hf::load_tokenizer(&o.model, model.config())?);
            let context = model.config().max_position_embeddings;
            let model = Arc::new(model);
            let m = model.clone();
            let packer: Packer = Arc::new(move |files| m.pack_adapter(files).map_err(|e| e.to_string()));
            let registry =
                Arc::new(Registry::new(o.adapters.as_deref(), o.max_loaded, &name, model.fingerprint()?, packer, metrics.clone())?);
            // The base never changes while serving: its bf16 weights (a checkpoint stored in bf16) are
            // packed once and every step reads them from half the memory.
            let base = model.pack_base()?;
            tracing::info!(layers = base.bf16_layers(), bytes = base.bytes(), "base weights held in bf16 for serving");
            metrics.base_bf16_bytes.set(base.bytes() as i64);
            let engine = LmEngine::start(model, base, tokenizer.clone(), settings, metrics.clone());
            (ModelKind::Lm, registry, Some(LmState { engine, tokenizer, context }), None)
        } else if o.model.is_file() {
            let mut net = ExpensiveNet::load(&o.model)?;
            net.model.freeze_base(lora::Bias::None);
            let data = mnist::Mnist::load(&o.mnist_data)
                .map_err(|e| ServeError::path(&o.mnist_data, format!("MNIST data (for the pixel normalisation): {e}")))?;
            if data.train.pixels() != net.sizes()?[0] {
                return Err(ServeError::path(
                    &o.model,
                    format!("the model takes {} inputs but the MNIST images have {} pixels", net.sizes()?[0], data.train.pixels()),
                ));
            }
            let (mean, std) = mnist::mean_std(&data.train.images);
            let fingerprint = lora::io::fingerprint(&net.model.base_state()?).map_err(lora::LoraError::from)?;
            let net = Arc::new(net);
            let n = net.clone();
            let packer: Packer = Arc::new(move |files| n.model.pack_adapter(files).map_err(|e| e.to_string()));
            let registry = Arc::new(Registry::new(o.adapters.as_deref(), o.max_loaded, &name, fingerprint, packer, metrics.clone())?);
            let engine = ClassifierEngine::start(net, mean, std, settings, metrics.clone())?;
            (ModelKind::Classifier, registry, None, Some(ClassifierState { engine, samples: data.test }))
        } else {
            return Err(ServeError::path(&o.model, "no such model: give an LM model directory or an MNIST model file"));
        };
        registry.scan()?;
        let state = State { kind, registry, metrics, limits: o.limits, created, lm, classifier, next_id: AtomicU64::new(1) };
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
}

/// Serves `server` on `listener` until `shutdown` completes, then stops taking connections and waits for
/// the requests in flight (streams included) to finish.
pub async fn serve(
    server: Server,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    axum::serve(listener, server.router()).with_graceful_shutdown(shutdown).await?;
    Ok(())
}
