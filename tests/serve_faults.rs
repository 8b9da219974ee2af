//! The fault suite: a real `lora serve` on loopback under overload and misbehaving clients, each case
//! bounded to seconds. 1,000 concurrent completions against a queue of 16 get only 200s and 503s (with
//! `Retry-After`), in bounded memory, while `/health` answers within a second; clients that stop reading
//! are dropped after `--write-timeout` and free their place; SIGTERM with stalled streams and live load
//! exits within `--shutdown-timeout`, every accepted request of the live clients finished. Worker panics
//! are injected through a test-only hook, so that case runs in process: `lora-serve`'s `routes` tests.
//!
//! Each case prints a `FAULTS` line with its figures (docs/reliability.md quotes them):
//! `cargo test --release --test serve_faults -- --nocapture --test-threads 1`.

mod serve_support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use serde_json::json;
use serve_support::{fixture, fixture_long, s, Served};

/// Polls `/health` every 50 ms until `stop`; the slowest answer and the number of answers that were
/// not a 200 within a second.
fn watch_health(url: String, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<(Duration, usize, usize)> {
    tokio::spawn(async move {
        let c = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
        let (mut slowest, mut polls, mut bad) = (Duration::ZERO, 0, 0);
        while !stop.load(Ordering::Relaxed) {
            let t = Instant::now();
            let ok = matches!(c.get(format!("{url}/health")).send().await, Ok(r) if r.status() == 200);
            let took = t.elapsed();
            slowest = slowest.max(took);
            polls += 1;
            bad += usize::from(!ok || took > Duration::from_secs(1));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        (slowest, polls, bad)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_completions_against_a_queue_of_16_get_only_200s_and_503s_while_health_answers() {
    let d = tempfile::tempdir().unwrap();
    fixture(d.path());
    let (m, a) = (d.path().join("base"), d.path().join("adapters"));
    let server = Served::start(&["--model", s(&m), "--adapters", s(&a), "--threads", "2", "--max-concurrent-requests", "16"]);
    let idle_mib = server.peak_rss_mib();
    let stop = Arc::new(AtomicBool::new(false));
    let health = watch_health(server.url.clone(), stop.clone());
    let c = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    let started = Instant::now();
    // Each client sends its completion until it is served, waiting as Retry-After says (1 s) plus its
    // own share of another second, so that the retries spread out.
    let answers = join_all((0..1000).map(|i| {
        let (c, url) = (c.clone(), server.url.clone());
        async move {
            let model = ["base", "sql", "js"][i % 3];
            let body = json!({"model": model, "prompt": format!("SELECT {i} FROM"), "max_tokens": 16, "temperature": 0});
            let mut shed = 0;
            for _ in 0..60 {
                let r = match c.post(format!("{url}/v1/completions")).json(&body).send().await {
                    Ok(r) => r,
                    Err(e) => return Err(format!("no answer: {e}")),
                };
                match r.status().as_u16() {
                    503 => {
                        let retry: u64 =
                            r.headers().get("retry-after").and_then(|v| v.to_str().ok()?.parse().ok()).ok_or("503 without Retry-After")?;
                        shed += 1;
                        tokio::time::sleep(Duration::from_millis(retry * 1000 + (i as u64 * 379) % 1000)).await;
                    }
                    200 => {
                        let v: serde_json::Value = r.json().await.map_err(|e| format!("a 200 cut short: {e}"))?;
                        return if v["choices"][0]["finish_reason"].is_string() {
                            Ok(shed)
                        } else {
                            Err(format!("a 200 without a finish: {v}"))
                        };
                    }
                    s => return Err(format!("status {s}: {}", r.text().await.unwrap_or_default())),
                }
            }
            Err("still refused after 60 tries".to_string())
        }
    }))
    .await;
    let burst = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (slowest, polls, bad_polls) = health.await.unwrap();
    let failed: Vec<&String> = answers.iter().filter_map(|a| a.as_ref().err()).collect();
    let served = answers.iter().filter(|a| a.is_ok()).count();
    let shed: usize = answers.iter().filter_map(|a| a.as_ref().ok()).sum();
    let first_try = answers.iter().filter(|a| matches!(a, Ok(0))).count();
    let peak_mib = server.peak_rss_mib();
    eprintln!(
        "FAULTS overload: 1000 concurrent clients, queue 16: all {served} served in {:.1} s ({first_try} at the first try), {shed} × 503 \
         with Retry-After on the way, {} failed; /health {polls} polls, slowest {:.0} ms, {bad_polls} late or failed; \
         server peak RSS {peak_mib:.0} MiB ({idle_mib:.0} MiB idle)",
        burst.as_secs_f64(),
        failed.len(),
        slowest.as_secs_f64() * 1e3
    );
    assert!(
        failed.is_empty(),
        "{} requests got something other than 200s and 503s with Retry-After: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert_eq!(served, 1000);
    assert!(shed > 0 && first_try < 1000, "no request was refused: the queue never filled");
    assert_eq!(bad_polls, 0, "/health was late (slowest {slowest:?}) or failed during the load");
    assert!(polls >= 10, "/health was polled only {polls} times");
    // Bounded: at most 16 requests in the worker, the rest refused before their bodies were read.
    assert!(peak_mib < idle_mib + 256.0, "peak RSS {peak_mib:.0} MiB against {idle_mib:.0} MiB idle");
    // The server still serves, and its gauge is back to zero.
    let (status, h) = serve_support::get(&c, &format!("{}/health", server.url)).await;
    assert_eq!((status, h["requests_in_flight"].as_u64()), (200, Some(0)), "{h}");
}

/// Opens a streamed completion of `prompts` prompts × `max_tokens` tokens on a socket with a tiny receive
/// buffer, and never reads the answer.
async fn stalled_stream(url: &str, prompts: usize, max_tokens: usize) -> std::net::TcpStream {
    use std::io::Write;
    let addr: std::net::SocketAddr = url.strip_prefix("http://").unwrap().parse().unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(addr).await.unwrap().into_std().unwrap();
    stream.set_nonblocking(false).unwrap();
    let prompt: Vec<String> = (0..prompts).map(|i| format!("stalled {i}")).collect();
    let body = json!({"model": "base", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": true}).to_string();
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    // A few hundred bytes into an empty socket buffer: the blocking write returns at once.
    (&stream).write_all(head.as_bytes()).unwrap();
    (&stream).write_all(body.as_bytes()).unwrap();
    stream
}

/// The value of an unlabelled counter in `/metrics`.
async fn counter(c: &reqwest::Client, url: &str, name: &str) -> f64 {
    let text = c.get(format!("{url}/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines().find_map(|l| l.strip_prefix(&format!("{name} "))).unwrap_or_else(|| panic!("no {name}:\n{text}")).trim().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_stop_reading_are_dropped_after_the_write_timeout_and_their_places_are_taken_again() {
    let d = tempfile::tempdir().unwrap();
    fixture_long(d.path(), 2048);
    let m = d.path().join("base");
    // Room for two requests; each stalled one asks for 16 × 2,000 tokens (about 5 MB of events), more
    // than the two sockets' buffers hold.
    let server = Served::start(&[
        "--model",
        s(&m),
        "--threads",
        "2",
        "--max-concurrent-requests",
        "2",
        "--max-tokens",
        "2000",
        "--write-timeout",
        "1",
    ]);
    let c = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let started = Instant::now();
    let stalled = [stalled_stream(&server.url, 16, 2000).await, stalled_stream(&server.url, 16, 2000).await];
    // Both places are taken while the stalled streams hold them (wait until the server has admitted them:
    // on a busy machine it may read the probe below before the two requests written just now)…
    while counter(&c, &server.url, "lora_requests_in_flight").await < 2.0 {
        assert!(started.elapsed() < Duration::from_secs(60), "the stalled requests were never admitted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut shed_while_stalled = 0;
    let body = json!({"model": "base", "prompt": "a", "max_tokens": 8, "temperature": 0});
    let served_after = loop {
        let r = c.post(format!("{}/v1/completions", server.url)).json(&body).send().await.unwrap();
        match r.status().as_u16() {
            503 => shed_while_stalled += 1,
            200 => break started.elapsed(),
            s => panic!("status {s}: {}", r.text().await.unwrap()),
        }
        assert!(started.elapsed() < Duration::from_secs(60), "the stalled clients were never dropped");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // …until the write timeout drops both connections.
    let dropped = counter(&c, &server.url, "lora_stalled_connections_dropped_total").await;
    eprintln!(
        "FAULTS stalled readers: 2 clients stop reading 16 × 2000-token streams; both dropped by --write-timeout 1 ({dropped} counted); \
         a request waiting meanwhile got {shed_while_stalled} × 503, then 200 after {:.1} s",
        served_after.as_secs_f64()
    );
    assert_eq!(dropped, 2.0, "the stalled connections were not dropped by the write timeout");
    assert!(shed_while_stalled > 0, "the stalled streams never held the places (the test proves nothing)");
    let (_, h) = serve_support::get(&c, &format!("{}/health", server.url)).await;
    assert_eq!(h["status"], "ok", "{h}");
    drop(stalled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_with_stalled_streams_exits_within_the_shutdown_timeout_and_loses_no_accepted_request() {
    let d = tempfile::tempdir().unwrap();
    fixture_long(d.path(), 2048);
    let m = d.path().join("base");
    // The write timeout (60 s) is longer than the drain (2 s): only the shutdown timeout can end the
    // stalled streams.
    let mut server = Served::start(&[
        "--model",
        s(&m),
        "--threads",
        "2",
        "--max-tokens",
        "2000",
        "--max-batch",
        "96",
        "--write-timeout",
        "60",
        "--shutdown-timeout",
        "2",
    ]);
    let url = server.url.clone();
    let c = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let _stalled = [stalled_stream(&url, 16, 2000).await, stalled_stream(&url, 16, 2000).await];
    // Eight clients streaming short completions one after another, until the server stops accepting.
    let (completed, lost, refused) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let clients: Vec<_> = (0..8)
        .map(|k| {
            let (c, url, completed, lost, refused) = (c.clone(), url.clone(), completed.clone(), lost.clone(), refused.clone());
            tokio::spawn(async move {
                for i in 0.. {
                    let body = json!({"model": "base", "prompt": format!("{k} {i}"), "max_tokens": 16, "temperature": 0, "stream": true});
                    match streamed(&c, &url, &body).await {
                        Outcome::Completed => completed.fetch_add(1, Ordering::Relaxed),
                        Outcome::NotAccepted => {
                            refused.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                        Outcome::Lost(e) => {
                            eprintln!("client {k}, request {i}: {e}");
                            lost.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    };
                }
            })
        })
        .collect();
    // Load for a moment, with the stalled streams admitted.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, h) = serve_support::get(&c, &format!("{url}/health")).await;
    assert!(h["requests_in_flight"].as_u64().unwrap() >= 2, "the stalled streams are not in flight: {h}");
    let before = completed.load(Ordering::Relaxed);
    let t = Instant::now();
    server.terminate();
    let status = server.wait_for_exit(Duration::from_secs(10));
    let exited = t.elapsed();
    for h in clients {
        h.await.unwrap();
    }
    let output = server.output();
    eprintln!(
        "FAULTS SIGTERM: 2 stalled 16 × 2000-token streams and 8 streaming clients ({before} completions before the signal, {} in all); \
         exited {:.2} s after SIGTERM with --shutdown-timeout 2; {} accepted requests lost, {} refused while stopping",
        completed.load(Ordering::Relaxed),
        exited.as_secs_f64(),
        lost.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed)
    );
    let status = status.unwrap_or_else(|| panic!("still running 10 s after SIGTERM with --shutdown-timeout 2:\n{output}"));
    assert!(status.success(), "{status}:\n{output}");
    assert!(exited < Duration::from_secs(5), "exited {exited:?} after SIGTERM; the drain may take 2 s");
    assert!(exited >= Duration::from_secs(2), "exited before the drain timeout: the stalled streams were not in flight");
    assert!(output.contains("stopped after --shutdown-timeout 2 s") && output.contains("still open were dropped"), "{output}");
    assert!(before > 0, "the live clients completed nothing before the signal");
    assert_eq!(lost.load(Ordering::Relaxed), 0, "accepted requests of reading clients were lost");
}

/// How a streamed request ended.
enum Outcome {
    /// 200, every chunk, `[DONE]`.
    Completed,
    /// No answer began: the connection was refused or closed before a status came, or a 503.
    NotAccepted,
    /// Accepted (or answered with another error), but not completed.
    Lost(String),
}

async fn streamed(c: &reqwest::Client, url: &str, body: &serde_json::Value) -> Outcome {
    let r = match c.post(format!("{url}/v1/completions")).json(body).send().await {
        Ok(r) => r,
        Err(_) => return Outcome::NotAccepted,
    };
    match r.status().as_u16() {
        200 => {}
        503 => return Outcome::NotAccepted,
        s => return Outcome::Lost(format!("status {s}")),
    }
    match r.text().await {
        Ok(t) if t.contains("data: [DONE]") && !t.contains("\"error\"") => Outcome::Completed,
        Ok(t) => Outcome::Lost(format!("incomplete stream: {t}")),
        Err(e) => Outcome::Lost(format!("stream cut: {e}")),
    }
}
