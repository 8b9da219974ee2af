//! A bounded load generator for a `lora serve` on this machine: N clients send completions or
//! predictions to the given models in turn for S seconds; optionally one more client keeps loading,
//! replacing and unloading adapters meanwhile (`churn`).
//!
//! Each client sends one request at a time (closed loop), so the offered load is N requests in flight.
//! Latency is measured per request from send to the last byte; throughput counts the generated tokens
//! (`usage.completion_tokens`) or the classified images of successful requests over the run's length.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::Mutex;

use crate::error::{Result, ServeError};

/// What to send.
#[derive(Debug, Clone)]
pub struct LoadtestOptions {
    /// The server, `host:port`; must be a loopback address.
    pub addr: String,
    /// Concurrent clients.
    pub clients: usize,
    /// Length of the run.
    pub seconds: f64,
    /// Models to address in turn (client c's i-th request goes to models[(c + i) mod len]).
    pub models: Vec<String>,
    /// Completion: `max_tokens` (greedy).
    pub max_tokens: usize,
    /// Completion: the prompt.
    pub prompt: String,
    /// Prediction: images per request.
    pub images: usize,
    /// Keep loading, replacing and unloading adapters during the run.
    pub churn: bool,
}

/// Latency percentiles, milliseconds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Slowest.
    pub max: f64,
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct LoadtestReport {
    /// `lm` or `classifier`.
    pub kind: String,
    /// Clients.
    pub clients: usize,
    /// Models addressed.
    pub models: Vec<String>,
    /// Measured length of the run, seconds.
    pub seconds: f64,
    /// Requests completed (successful or not).
    pub requests: usize,
    /// Requests that failed (transport error or non-2xx status).
    pub errors: usize,
    /// Requests per second.
    pub requests_per_s: f64,
    /// Generated tokens per second (language models).
    pub tokens_per_s: f64,
    /// Classified images per second (classifiers).
    pub images_per_s: f64,
    /// Latency of successful requests.
    pub latency_ms: Latency,
    /// Adapter loads, replacements and unloads done by the churn client.
    pub churn_ops: usize,
    /// Of those, how many failed.
    pub churn_errors: usize,
    /// The first few error messages.
    pub first_errors: Vec<String>,
}

#[derive(Default)]
struct Tally {
    requests: usize,
    errors: usize,
    tokens: u64,
    images: u64,
    latencies: Vec<f64>,
    first_errors: Vec<String>,
}

impl Tally {
    fn error(&mut self, e: String) {
        self.errors += 1;
        if self.first_errors.len() < 5 {
            self.first_errors.push(e);
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn http(e: impl std::fmt::Display) -> ServeError {
    ServeError::Http(e.to_string())
}

/// The loopback socket address of `addr`, or an error naming it.
fn loopback(addr: &str) -> Result<SocketAddr> {
    let resolved: Vec<SocketAddr> =
        addr.to_socket_addrs().map_err(|e| ServeError::setting("addr", addr, format!("not a host:port ({e})")))?.collect();
    resolved
        .into_iter()
        .find(|a| a.ip().is_loopback())
        .ok_or_else(|| ServeError::setting("addr", addr, "the load generator only drives servers on this machine (a loopback address)"))
}

async fn get_json(client: &reqwest::Client, url: &str) -> Result<Value> {
    let r = client.get(url).send().await.map_err(|e| http(format!("{url}: {e}")))?;
    r.json::<Value>().await.map_err(|e| http(format!("{url}: {e}")))
}

/// Runs the load and measures it.
pub async fn run(o: &LoadtestOptions) -> Result<LoadtestReport> {
    if o.clients == 0 || o.clients > 1024 {
        return Err(ServeError::setting("clients", o.clients, "must be 1 to 1024"));
    }
    if !(o.seconds > 0.0 && o.seconds <= 3600.0) {
        return Err(ServeError::setting("seconds", o.seconds, "must be more than 0 and at most 3600"));
    }
    if o.models.is_empty() {
        return Err(ServeError::setting("models", "", "name at least one model"));
    }
    let addr = loopback(&o.addr)?;
    let base = format!("http://{addr}");
    let client = reqwest::Client::builder().pool_max_idle_per_host(o.clients + 2).build().map_err(http)?;
    let health = get_json(&client, &format!("{base}/health")).await?;
    let kind = health["kind"].as_str().ok_or_else(|| http(format!("{base}/health: not a lora serve ({health})")))?.to_string();
    let listed = get_json(&client, &format!("{base}/v1/models")).await?;
    let roots: Vec<(String, String)> = listed["data"]
        .as_array()
        .map(|d| {
            d.iter()
                .filter(|m| !m["parent"].is_null())
                .filter_map(|m| Some((m["id"].as_str()?.to_string(), m["root"].as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default();
    for m in &o.models {
        let known = m == health["model"].as_str().unwrap_or("") || roots.iter().any(|(n, _)| n == m);
        if !known {
            return Err(ServeError::setting("models", m, format!("the server at {base} serves no such model")));
        }
    }
    let tally = Arc::new(Mutex::new(Tally::default()));
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(o.seconds);
    let mut tasks = Vec::new();
    for c in 0..o.clients {
        let (client, tally, base, kind, o) = (client.clone(), tally.clone(), base.clone(), kind.clone(), o.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(c as u64);
            let images: Vec<Vec<u8>> = (0..o.images.max(1)).map(|_| (0..784).map(|_| rng.random::<u8>()).collect()).collect();
            let mut i = 0;
            while Instant::now() < deadline {
                let model = &o.models[(c + i) % o.models.len()];
                i += 1;
                let (url, body) = if kind == "lm" {
                    (
                        format!("{base}/v1/completions"),
                        json!({"model": model, "prompt": o.prompt, "max_tokens": o.max_tokens, "temperature": 0}),
                    )
                } else {
                    (format!("{base}/v1/predict"), json!({"model": model, "images": images}))
                };
                let t0 = Instant::now();
                let result = async {
                    let r = client.post(&url).json(&body).send().await.map_err(|e| e.to_string())?;
                    let status = r.status();
                    let v: Value = r.json().await.map_err(|e| e.to_string())?;
                    if !status.is_success() {
                        return Err(format!("{status}: {}", v["error"]["message"]));
                    }
                    Ok(v)
                }
                .await;
                let ms = t0.elapsed().as_secs_f64() * 1e3;
                let mut t = tally.lock().await;
                t.requests += 1;
                match result {
                    Ok(v) => {
                        t.latencies.push(ms);
                        t.tokens += v["usage"]["completion_tokens"].as_u64().unwrap_or(0);
                        t.images += v["predictions"].as_array().map_or(0, |p| p.len() as u64);
                    }
                    Err(e) => t.error(format!("{model}: {e}")),
                }
            }
        }));
    }
    let churn = if o.churn {
        let (client, base, roots) = (client.clone(), base.clone(), roots.clone());
        let models = o.models.clone();
        Some(tokio::spawn(async move {
            let (mut ops, mut errors) = (0usize, 0usize);
            let targets: Vec<(String, String)> = roots.into_iter().filter(|(n, _)| models.contains(n)).collect();
            let mut k = 0usize;
            while Instant::now() < deadline && !targets.is_empty() {
                let (name, root) = &targets[k % targets.len()];
                let extra = format!("loadtest-churn-{}", k % 4);
                k += 1;
                let calls = [
                    ("load_lora_adapter", json!({"lora_name": name, "lora_path": root, "load_inplace": true})),
                    ("load_lora_adapter", json!({"lora_name": extra, "lora_path": root, "load_inplace": true})),
                    ("unload_lora_adapter", json!({"lora_name": extra})),
                ];
                for (route, body) in calls {
                    ops += 1;
                    let ok = client.post(format!("{base}/v1/{route}")).json(&body).send().await.is_ok_and(|r| r.status().is_success());
                    errors += usize::from(!ok);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (ops, errors)
        }))
    } else {
        None
    };
    for t in tasks {
        t.await.map_err(http)?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let (churn_ops, churn_errors) = match churn {
        Some(h) => h.await.map_err(http)?,
        None => (0, 0),
    };
    let mut t = tally.lock().await;
    t.latencies.sort_by(f64::total_cmp);
    let l = &t.latencies;
    let latency_ms =
        Latency { p50: percentile(l, 50.0), p90: percentile(l, 90.0), p99: percentile(l, 99.0), max: l.last().copied().unwrap_or(0.0) };
    Ok(LoadtestReport {
        kind,
        clients: o.clients,
        models: o.models.clone(),
        seconds,
        requests: t.requests,
        errors: t.errors,
        requests_per_s: t.requests as f64 / seconds,
        tokens_per_s: t.tokens as f64 / seconds,
        images_per_s: t.images as f64 / seconds,
        latency_ms,
        churn_ops,
        churn_errors,
        first_errors: std::mem::take(&mut t.first_errors),
    })
}
