//! Test fixtures: a tiny random language model with adapters written to a folder, and a server on a
//! loopback port in this process (so that tests can use the `cfg(test)` fault hooks of the workers).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use candle_core::{Device, Tensor};
use lora::LoraConfig;
use lora_lm::hf::{save_adapter, save_model};
use lora_lm::{Llama, LlamaConfig, PROJECTIONS};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::{Access, Limits, ServeOptions, Server, Stopped, Timeouts};

/// A 2-layer, 32-wide byte-level Llama with `context` positions.
pub fn config(context: usize) -> LlamaConfig {
    LlamaConfig {
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 8,
        max_position_embeddings: context,
        initializer_range: 0.3,
        ..LlamaConfig::byte_default()
    }
}

/// Writes adapter `name` (random non-zero B on every projection) for `m` into `dir`.
pub fn write_adapter(m: &mut Llama, name: &str, seed: u64, dir: &Path) {
    let c = LoraConfig {
        target_modules: PROJECTIONS.iter().map(|s| s.to_string()).collect(),
        init: lora::Init::PeftGaussian,
        ..LoraConfig::new(4, 8.0)
    };
    m.lora_mut().add_adapter(name, &c, &mut StdRng::seed_from_u64(seed)).unwrap();
    let mut g = StdRng::seed_from_u64(seed + 1000);
    for (_, l) in m.lora().layers() {
        if let Ok(ad) = l.adapter(name) {
            let b = ad.b();
            let v: Vec<f32> = (0..b.elem_count()).map(|_| g.random::<f32>() - 0.5).collect();
            b.set(&Tensor::from_vec(v, b.shape(), &Device::Cpu).unwrap()).unwrap();
        }
    }
    save_adapter(m, name, dir, None, BTreeMap::new(), false).unwrap();
    m.lora_mut().remove_adapter(name).unwrap();
}

/// ROOT/base (the model, `context` positions), ROOT/adapters/{a,b} and ROOT/adapters/spare/c.
pub fn write_lm(root: &Path, context: usize) {
    let mut m = Llama::random(&config(context), 1).unwrap();
    save_model(&m, &root.join("base"), &BTreeMap::new()).unwrap();
    write_adapter(&mut m, "a", 1, &root.join("adapters/a"));
    write_adapter(&mut m, "b", 2, &root.join("adapters/b"));
    write_adapter(&mut m, "c", 3, &root.join("adapters/spare/c"));
}

/// Options serving ROOT/base with ROOT/adapters (adapter updates allowed), short timeouts.
pub fn options(root: &Path) -> ServeOptions {
    ServeOptions {
        model: root.join("base"),
        adapters: Some(root.join("adapters")),
        name: None,
        classifier: None,
        max_loaded: 8,
        max_batch: 16,
        batch_window: Duration::from_millis(1),
        limits: Limits::default(),
        timeouts: Timeouts { shutdown: Duration::from_secs(5), ..Timeouts::default() },
        access: Access { api_key: None, allow_adapter_updates: true },
        chat_template: None,
    }
}

/// A server running in this process.
pub struct Running {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// The server (its worker's health).
    pub server: Server,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<crate::Result<Stopped>>,
}

impl Running {
    /// Opens `o` and serves it on a free loopback port.
    pub async fn start(o: ServeOptions) -> Running {
        let server = tokio::task::spawn_blocking(move || Server::open(&o)).await.unwrap().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(crate::serve(server.clone(), listener, async move {
            let _ = stopped.await;
        }));
        Running { url, server, stop: Some(stop), task }
    }

    /// Sends the shutdown signal and waits for `serve` to return.
    pub async fn stop(mut self) -> Stopped {
        let _ = self.stop.take().unwrap().send(());
        (&mut self.task).await.unwrap().unwrap()
    }
}

/// POSTs JSON to `url`; the status and the JSON body.
pub async fn post(c: &reqwest::Client, url: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
    let r = c.post(url).json(body).send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{url}: not JSON ({e}): {text}")))
}

/// GETs `url`; the status and the JSON body.
pub async fn get(c: &reqwest::Client, url: &str) -> (u16, serde_json::Value) {
    let r = c.get(url).send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{url}: not JSON ({e}): {text}")))
}
