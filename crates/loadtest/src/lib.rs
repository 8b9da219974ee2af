//! lora-loadtest: a bounded load generator for a `lora serve` on this machine. N clients send completions
//! or predictions to the given models in turn for S seconds; optionally one more client keeps loading,
//! replacing and unloading adapters meanwhile (`churn`, which needs a server started with
//! `--allow-adapter-updates`).
//!
//! Each client sends one request at a time (closed loop), so the offered load is N requests in flight.
//! Latency is measured per request from send to the last byte; throughput counts the generated tokens
//! (`usage.completion_tokens`) or the classified images of successful requests over the run's length.
//!
//! The crate is an HTTP client only: it knows the server's routes and JSON shapes, not its code, so it
//! drives any build of `lora serve` (and the server does not carry an HTTP client). `lora loadtest` calls
//! [`run`].
#![deny(missing_docs)]

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::Mutex;

/// Why a load test could not run.
#[derive(Debug, thiserror::Error)]
pub enum LoadtestError {
    /// A setting is out of range; names the setting and value.
    #[error("invalid setting {name} = {value}: {why}")]
    Setting {
        /// The setting (the command-line flag's name without dashes).
        name: &'static str,
        /// Its value.
        value: String,
        /// Why it is refused.
        why: String,
    },
    /// Nothing accepts connections at the address.
    #[error("nothing listens at {addr}: start the server first (lora serve --addr {addr} …), or give the address it printed with --addr")]
    NoServer {
        /// The address tried.
        addr: String,
    },
    /// The server answered, but not as a `lora serve` does, or refused the run.
    #[error("{0}")]
    Http(String),
}

/// Result with [`LoadtestError`].
pub type Result<T> = std::result::Result<T, LoadtestError>;

fn setting(name: &'static str, value: impl std::fmt::Display, why: impl Into<String>) -> LoadtestError {
    LoadtestError::Setting { name, value: value.to_string(), why: why.into() }
}

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
    /// Sent as `Authorization: Bearer KEY` (a server started with `--api-key`).
    pub api_key: Option<String>,
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

/// The value at percentile `p` of `sorted` (nearest rank; 0 for none).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn http(e: impl std::fmt::Display) -> LoadtestError {
    LoadtestError::Http(e.to_string())
}

/// The loopback socket address of `addr`, or an error naming it.
pub fn loopback(addr: &str) -> Result<SocketAddr> {
    let resolved: Vec<SocketAddr> = addr.to_socket_addrs().map_err(|e| setting("addr", addr, format!("not a host:port ({e})")))?.collect();
    resolved
        .into_iter()
        .find(|a| a.ip().is_loopback())
        .ok_or_else(|| setting("addr", addr, "the load generator only drives servers on this machine (a loopback address)"))
}

/// GETs `url` as JSON; a refused connection is [`LoadtestError::NoServer`], a 401 says to pass the key.
async fn get_json(client: &reqwest::Client, addr: SocketAddr, url: &str) -> Result<Value> {
    let r = client.get(url).send().await.map_err(|e| {
        if e.is_connect() {
            LoadtestError::NoServer { addr: addr.to_string() }
        } else {
            http(format!("{url}: {e}"))
        }
    })?;
    if r.status() == reqwest::StatusCode::UNAUTHORIZED {
        return Err(http(format!("{url}: 401: the server wants an API key (pass --api-key KEY or set LORA_API_KEY)")));
    }
    let status = r.status();
    let v: Value = r.json().await.map_err(|e| http(format!("{url}: {status}, not a lora serve ({e})")))?;
    Ok(v)
}

/// Runs the load and measures it.
pub async fn run(o: &LoadtestOptions) -> Result<LoadtestReport> {
    if o.clients == 0 || o.clients > 1024 {
        return Err(setting("clients", o.clients, "must be 1 to 1024"));
    }
    if !(o.seconds > 0.0 && o.seconds <= 3600.0) {
        return Err(setting("seconds", o.seconds, "must be more than 0 and at most 3600"));
    }
    if o.models.is_empty() {
        return Err(setting("models", "", "name at least one model"));
    }
    let addr = loopback(&o.addr)?;
    let base = format!("http://{addr}");
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(key) = &o.api_key {
        let value = reqwest::header::HeaderValue::from_str(&format!("Bearer {key}"))
            .map_err(|_| setting("api-key", "(hidden)", "must be printable ASCII"))?;
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    let client = reqwest::Client::builder().pool_max_idle_per_host(o.clients + 2).default_headers(headers).build().map_err(http)?;
    let health = get_json(&client, addr, &format!("{base}/health")).await?;
    let kind = health["kind"].as_str().ok_or_else(|| http(format!("{base}/health: not a lora serve ({health})")))?.to_string();
    let listed = get_json(&client, addr, &format!("{base}/v1/models")).await?;
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
            return Err(setting("models", m, format!("the server at {base} serves no such model")));
        }
    }
    if o.churn && health["adapter_updates"] == json!(false) {
        return Err(setting("churn", true, format!("the server at {base} refuses adapter loads: start it with --allow-adapter-updates")));
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
        let (client, base, roots, tally) = (client.clone(), base.clone(), roots.clone(), tally.clone());
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
                    let failure = match client.post(format!("{base}/v1/{route}")).json(&body).send().await {
                        Ok(r) if r.status().is_success() => None,
                        Ok(r) => {
                            let status = r.status();
                            let v: Value = r.json().await.unwrap_or_default();
                            Some(format!("churn {route}: {status}: {}", v["error"]["message"]))
                        }
                        Err(e) => Some(format!("churn {route}: {e}")),
                    };
                    if let Some(f) = failure {
                        errors += 1;
                        let mut t = tally.lock().await;
                        if t.first_errors.len() < 5 {
                            t.first_errors.push(f);
                        }
                    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn options(addr: &str) -> LoadtestOptions {
        LoadtestOptions {
            addr: addr.to_string(),
            clients: 2,
            seconds: 0.1,
            models: vec!["m".into()],
            max_tokens: 4,
            prompt: "a".into(),
            images: 1,
            churn: false,
            api_key: None,
        }
    }

    #[test]
    fn percentiles_take_the_nearest_rank_of_the_sorted_values() {
        let v: Vec<f64> = (1..=101).map(f64::from).collect();
        assert_eq!((percentile(&v, 50.0), percentile(&v, 99.0), percentile(&v, 100.0)), (51.0, 100.0, 101.0));
        assert_eq!(percentile(&[], 50.0), 0.0);
    }

    #[test]
    fn only_loopback_addresses_are_driven() {
        assert!(loopback("127.0.0.1:80").is_ok());
        assert!(loopback("[::1]:80").is_ok());
        let e = loopback("192.0.2.1:80").unwrap_err().to_string();
        assert!(e.contains("addr = 192.0.2.1:80") && e.contains("loopback"), "{e}");
        let e = loopback("no port").unwrap_err().to_string();
        assert!(e.contains("not a host:port"), "{e}");
    }

    #[tokio::test]
    async fn a_port_where_nothing_listens_is_named_with_the_next_step() {
        // A port that was free a moment ago: bound, then released.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let e = run(&options(&format!("127.0.0.1:{port}"))).await.unwrap_err();
        assert!(matches!(e, LoadtestError::NoServer { .. }), "{e:?}");
        let e = e.to_string();
        assert!(e.contains(&format!("nothing listens at 127.0.0.1:{port}")) && e.contains("lora serve"), "{e}");
    }

    #[tokio::test]
    async fn settings_out_of_range_are_refused_by_name_before_any_connection() {
        for (o, want) in [
            (LoadtestOptions { clients: 0, ..options("127.0.0.1:9") }, "clients = 0"),
            (LoadtestOptions { seconds: -1.0, ..options("127.0.0.1:9") }, "seconds = -1"),
            (LoadtestOptions { models: vec![], ..options("127.0.0.1:9") }, "models"),
        ] {
            let e = run(&o).await.unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
    }

    #[tokio::test]
    async fn a_server_that_is_not_a_lora_serve_is_named() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let body = "{\"hello\": 1}";
                let _ = s
                    .write_all(format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len()).as_bytes())
                    .await;
            }
        });
        let e = run(&options(&addr.to_string())).await.unwrap_err().to_string();
        assert!(e.contains("not a lora serve"), "{e}");
    }
}
