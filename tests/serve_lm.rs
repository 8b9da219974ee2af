//! `lora serve` with a language model, through the real binary and real HTTP: completions equal `lora lm
//! generate`, a mixed batch gives every row what it gets alone, bad requests get a 4xx and the server
//! keeps serving, and adapters load, reload and unload while 16 clients stream.

mod serve_support;

use std::path::Path;

use futures_util::future::join_all;
use serde_json::json;
use serve_support::{fixture, fixture_bf16, get, post, post_raw, s, stream, Served};

/// `lora serve` of ROOT/base with ROOT/adapters, adapter updates over HTTP allowed, and `extra` flags.
fn start(root: &Path, extra: &[&str]) -> Served {
    let (m, a) = (root.join("base"), root.join("adapters"));
    let mut args = vec!["--model", s(&m), "--adapters", s(&a), "--threads", "2", "--allow-adapter-updates"];
    args.extend_from_slice(extra);
    Served::start(&args)
}

async fn complete(c: &reqwest::Client, url: &str, model: &str, prompt: &str, max_tokens: usize) -> String {
    let (status, v) =
        post(c, &format!("{url}/v1/completions"), &json!({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}))
            .await;
    assert_eq!(status, 200, "{model}: {v}");
    v["choices"][0]["text"].as_str().unwrap().to_string()
}

/// `lora lm generate`'s greedy 20 tokens after `prompt` on ROOT/base with ROOT/adapters/ADAPTER.
fn cli_greedy(root: &Path, adapter: Option<&str>, prompt: &str) -> String {
    let base = root.join("base");
    let dir = adapter.map(|a| root.join("adapters").join(a));
    let mut args = vec!["lm", "generate", "--model", s(&base), "--prompt", prompt, "--max-tokens", "20", "--temperature", "0"];
    if let Some(dir) = &dir {
        args.extend(["--adapter", s(dir)]);
    }
    serve_support::lora(&args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_equal_the_clis_greedy_generation_for_the_base_and_each_adapter() {
    let d = tempfile::tempdir().unwrap();
    fixture(d.path());
    let server = start(d.path(), &[]);
    let c = reqwest::Client::new();
    let (_, models) = get(&c, &format!("{}/v1/models", server.url)).await;
    let ids: Vec<&str> = models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["base", "js", "sql"]);
    assert_eq!(models["data"][2]["parent"], "base");
    assert_eq!(models["data"][2]["lora"]["rank"], 4);
    let prompt = "SELECT name FROM";
    let mut seen = Vec::new();
    for (model, adapter) in [("base", None), ("sql", Some("sql")), ("js", Some("js"))] {
        let text = complete(&c, &server.url, model, prompt, 20).await;
        let cli = cli_greedy(d.path(), adapter, prompt);
        assert_eq!(format!("{prompt}{text}\n"), cli, "{model}: the server and `lora lm generate` disagree");
        // Streamed, the same text arrives in pieces, then one finish reason and [DONE].
        let body = json!({"model": model, "prompt": prompt, "max_tokens": 20, "temperature": 0, "stream": true});
        let (streamed, finishes) = stream(&c, &server.url, &body, || {}).await.unwrap();
        assert_eq!(streamed, text, "{model}: streamed text differs");
        assert_eq!(finishes, ["length"]);
        seen.push(text);
    }
    assert!(seen[0] != seen[1] && seen[1] != seen[2] && seen[0] != seen[2], "the adapters change nothing: {seen:?}");
    // Several prompts in one request: one choice each, in order, each what it gets alone.
    let (status, v) = post(
        &c,
        &format!("{}/v1/completions", server.url),
        &json!({"model": "sql", "prompt": [prompt, "function f("], "max_tokens": 20, "temperature": 0}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(v["choices"][0]["text"], seen[1].as_str());
    assert_eq!(v["choices"][1]["text"], complete(&c, &server.url, "sql", "function f(", 20).await.as_str());
    assert_eq!(v["usage"]["completion_tokens"], 40);
    // A stop string cuts the completion before it.
    // (The random model writes random bytes; cut at an ASCII character past the first two characters.)
    let cut = seen[1].chars().skip(2).find(|c| c.is_ascii_graphic()).expect("an ASCII character in the completion").to_string();
    let cut = cut.as_str();
    let (_, v) = post(
        &c,
        &format!("{}/v1/completions", server.url),
        &json!({"model": "sql", "prompt": prompt, "max_tokens": 20, "temperature": 0, "stop": [cut]}),
    )
    .await;
    let want = &seen[1][..seen[1].find(cut).unwrap()];
    assert_eq!((v["choices"][0]["text"].as_str().unwrap(), v["choices"][0]["finish_reason"].as_str().unwrap()), (want, "stop"));
    // The same seed samples the same text as the CLI with that seed.
    let (_, v) = post(
        &c,
        &format!("{}/v1/completions", server.url),
        &json!({"model": "js", "prompt": prompt, "max_tokens": 12, "temperature": 0.8, "top_p": 0.9, "seed": 7}),
    )
    .await;
    let (base, js) = (d.path().join("base"), d.path().join("adapters/js"));
    let cli = serve_support::lora(&[
        "lm",
        "generate",
        "--model",
        s(&base),
        "--adapter",
        s(&js),
        "--prompt",
        prompt,
        "--max-tokens",
        "12",
        "--temperature",
        "0.8",
        "--top-p",
        "0.9",
        "--seed",
        "7",
    ]);
    assert_eq!(format!("{prompt}{}\n", v["choices"][0]["text"].as_str().unwrap()), cli);
    assert!(server.stop().success(), "SIGTERM should stop the server cleanly");
}

/// The value of an unlabelled Prometheus gauge in `/metrics`.
async fn gauge(c: &reqwest::Client, url: &str, name: &str) -> f64 {
    let text = c.get(format!("{url}/metrics")).send().await.unwrap().text().await.unwrap();
    let line = text.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"));
    line[name.len() + 1..].trim().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_base_stored_in_bf16_is_served_from_its_bf16_copy_and_completes_as_the_cli_does() {
    let d = tempfile::tempdir().unwrap();
    fixture_bf16(d.path());
    let server = start(d.path(), &[]);
    let c = reqwest::Client::new();
    // The fixture's projections and lm_head are held in bf16 (the f32 fixture below holds none).
    assert!(gauge(&c, &server.url, "lora_base_bf16_bytes").await > 0.0);
    let prompt = "SELECT name FROM";
    for (model, adapter) in [("base", None), ("sql", Some("sql"))] {
        let text = complete(&c, &server.url, model, prompt, 20).await;
        let cli = cli_greedy(d.path(), adapter, prompt);
        assert_eq!(format!("{prompt}{text}\n"), cli, "{model}: the server and `lora lm generate` disagree");
    }
    assert!(server.stop().success());
    let d = tempfile::tempdir().unwrap();
    fixture(d.path());
    let server = start(d.path(), &[]);
    assert_eq!(gauge(&c, &server.url, "lora_base_bf16_bytes").await, 0.0, "f32 weights as trained are served as they are");
    assert!(server.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_adapter_batch_gives_every_request_exactly_what_it_gets_alone() {
    let d = tempfile::tempdir().unwrap();
    fixture(d.path());
    // A long batching window: requests sent together start in one batch.
    let server = start(d.path(), &["--batch-window-ms", "400"]);
    let c = reqwest::Client::new();
    let requests: Vec<(&str, String)> = (0..9)
        .map(|i| (["base", "sql", "js"][i % 3], format!("{} {i} FROM t WHERE x = {}", ["SELECT", "UPDATE", "function"][i / 3], i * 7)))
        .collect();
    let together = join_all(requests.iter().map(|(m, p)| complete(&c, &server.url, m, p, 16))).await;
    let metrics = c.get(format!("{}/metrics", server.url)).send().await.unwrap().text().await.unwrap();
    let bucket = |le: &str| -> f64 {
        let key = format!("lora_batch_rows_bucket{{le=\"{le}\"}} ");
        metrics.lines().find_map(|l| l.strip_prefix(&key)).unwrap().parse().unwrap()
    };
    assert!(bucket("4.0") < bucket("16.0"), "no batch held more than 4 sequences:\n{metrics}");
    for ((model, prompt), got) in requests.iter().zip(&together) {
        let alone = complete(&c, &server.url, model, prompt, 16).await;
        assert_eq!(got, &alone, "{model} {prompt:?}: in a mixed batch it got another text than alone");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_request_gets_a_4xx_with_a_json_error_and_the_next_good_request_succeeds() {
    let d = tempfile::tempdir().unwrap();
    fixture(d.path());
    let server = start(d.path(), &["--max-body-bytes", "4096", "--max-prompts", "2", "--max-tokens", "32"]);
    let c = reqwest::Client::new();
    let u = |route: &str| format!("{}{route}", server.url);
    let ok = json!({"model": "sql", "prompt": "SELECT", "max_tokens": 4, "temperature": 0});
    let long = "x".repeat(60);
    let huge = "y".repeat(5000);
    let foreign = d.path().join("adapters/spare/foreign");
    let cases: Vec<(&str, &str, Vec<u8>, u16, &str)> = vec![
        ("malformed JSON", "/v1/completions", b"{\"model\": ".to_vec(), 400, "not valid JSON"),
        (
            "unknown model",
            "/v1/completions",
            json!({"model": "nope", "prompt": "a"}).to_string().into_bytes(),
            404,
            "`nope` does not exist",
        ),
        ("no model", "/v1/completions", json!({"prompt": "a"}).to_string().into_bytes(), 400, "missing field `model`"),
        (
            "prompt past the context",
            "/v1/completions",
            json!({"model": "sql", "prompt": long, "max_tokens": 8}).to_string().into_bytes(),
            400,
            "maximum context length is 64 tokens",
        ),
        (
            "max_tokens over the limit",
            "/v1/completions",
            json!({"model": "sql", "prompt": "a", "max_tokens": 33}).to_string().into_bytes(),
            400,
            "max_tokens = 33",
        ),
        (
            "body over the limit",
            "/v1/completions",
            json!({"model": "sql", "prompt": huge}).to_string().into_bytes(),
            413,
            "over the limit of 4096 bytes",
        ),
        (
            "too many prompts",
            "/v1/completions",
            json!({"model": "sql", "prompt": ["a", "b", "c"]}).to_string().into_bytes(),
            400,
            "3 prompts",
        ),
        ("empty prompt", "/v1/completions", json!({"model": "sql", "prompt": ""}).to_string().into_bytes(), 400, "empty"),
        ("prompt not text", "/v1/completions", json!({"model": "sql", "prompt": 5}).to_string().into_bytes(), 400, "prompt = 5"),
        (
            "temperature out of range",
            "/v1/completions",
            json!({"model": "sql", "prompt": "a", "temperature": 5}).to_string().into_bytes(),
            400,
            "temperature = 5",
        ),
        ("n > 1", "/v1/completions", json!({"model": "sql", "prompt": "a", "n": 2}).to_string().into_bytes(), 400, "n: only n = 1"),
        (
            "too many stop strings",
            "/v1/completions",
            json!({"model": "sql", "prompt": "a", "stop": ["a", "b", "c", "d", "e"]}).to_string().into_bytes(),
            400,
            "up to 4",
        ),
        (
            "a classifier route",
            "/v1/predict",
            json!({"model": "sql", "images": [[0]]}).to_string().into_bytes(),
            404,
            "/v1/predict is not served here",
        ),
        ("no such route", "/v2/nothing", b"{}".to_vec(), 404, "no route /v2/nothing"),
        (
            "adapter name not plain",
            "/v1/load_lora_adapter",
            json!({"lora_name": "../evil", "lora_path": "sql"}).to_string().into_bytes(),
            400,
            "not a plain name",
        ),
        (
            "adapter name of the base",
            "/v1/load_lora_adapter",
            json!({"lora_name": "base", "lora_path": "sql"}).to_string().into_bytes(),
            400,
            "the base model's name",
        ),
        (
            "load path outside the folder",
            "/v1/load_lora_adapter",
            json!({"lora_name": "x", "lora_path": "../base"}).to_string().into_bytes(),
            400,
            "outside the adapters folder",
        ),
        (
            "load path absolute outside",
            "/v1/load_lora_adapter",
            json!({"lora_name": "x", "lora_path": "/"}).to_string().into_bytes(),
            400,
            "outside the adapters folder",
        ),
        (
            "load path missing",
            "/v1/load_lora_adapter",
            json!({"lora_name": "x", "lora_path": "nothing-here"}).to_string().into_bytes(),
            400,
            "nothing-here",
        ),
        (
            "load path climbing out to nothing",
            "/v1/load_lora_adapter",
            json!({"lora_name": "x", "lora_path": "../no/such/thing"}).to_string().into_bytes(),
            400,
            "outside the adapters folder",
        ),
        (
            "adapter for another base",
            "/v1/load_lora_adapter",
            json!({"lora_name": "x", "lora_path": s(&foreign)}).to_string().into_bytes(),
            400,
            "trained on another base",
        ),
        (
            "a DoRA adapter (not served in mixed batches yet)",
            "/v1/load_lora_adapter",
            json!({"lora_name": "x", "lora_path": "spare/dora"}).to_string().into_bytes(),
            400,
            "use_dora = true",
        ),
        (
            "name in use",
            "/v1/load_lora_adapter",
            json!({"lora_name": "sql", "lora_path": "js"}).to_string().into_bytes(),
            400,
            "load_inplace",
        ),
        (
            "unload unknown",
            "/v1/unload_lora_adapter",
            json!({"lora_name": "ghost"}).to_string().into_bytes(),
            404,
            "no adapter named \"ghost\"",
        ),
    ];
    for (what, route, body, status, text) in cases {
        let (got, v) = post_raw(&c, &u(route), body).await;
        let message = v["error"]["message"].as_str().unwrap_or_default();
        assert_eq!(got, status, "{what}: {v}");
        assert!(message.contains(text), "{what}: {message:?} lacks {text:?}");
        let (after, v) = post(&c, &u("/v1/completions"), &ok).await;
        assert_eq!(after, 200, "after {what}, a good request failed: {v}");
    }
    // The errors are counted by route and status.
    let metrics = c.get(u("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("lora_request_errors_total{route=\"/v1/completions\",model=\"-\",status=\"413\"} 1"), "{metrics}");
    // No half-loaded adapter is left behind by the refused loads.
    let (_, models) = get(&c, &u("/v1/models")).await;
    assert_eq!(models["data"].as_array().unwrap().len(), 3, "{models}");
}

#[test]
fn a_server_that_cannot_start_says_why_and_exits_non_zero() {
    let d = tempfile::tempdir().unwrap();
    fixture(d.path());
    let base = d.path().join("base");
    let (sql, adapters) = (d.path().join("adapters/sql"), d.path().join("adapters"));
    let weights = sql.join("adapter_model.safetensors");
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (vec!["--model", "no/such/model"], vec!["no/such/model"]),
        (vec!["--model", s(&base), "--adapters", "no/such/dir"], vec!["no/such/dir"]),
        (vec!["--model", s(&base), "--addr", "not-an-address"], vec!["--addr not-an-address"]),
        (vec!["--model", s(&base), "--name", "a b"], vec!["name = a b"]),
        // An adapter given as the model: said so, with the flags to use instead.
        (vec!["--model", s(&sql)], vec!["is a LoRA adapter", "not a base model", "--adapters", s(&adapters)]),
        (vec!["--model", s(&weights)], vec!["is a LoRA adapter", "--adapters"]),
        // An adapter folder given as the adapters folder: said why nothing would be served.
        (
            vec!["--model", s(&base), "--adapters", s(&sql)],
            vec!["no sub-folder holds an adapter_config.json", "an adapter itself", "--adapters"],
        ),
        (vec!["--model", s(&base), "--request-timeout", "0"], vec!["--request-timeout 0"]),
        (vec!["--model", s(&base), "--api-key", "two words"], vec!["api-key"]),
    ];
    for (args, want) in cases {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_lora")).arg("serve").args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && want.iter().all(|w| err.contains(w)) && !err.contains("panicked"), "{args:?}: {err}");
        assert!(!err.contains("two words"), "the API key was printed: {err}");
    }
    // A folder holding an adapter for another base stops the start, naming the folder.
    std::fs::rename(d.path().join("adapters/spare/foreign"), d.path().join("adapters/foreign")).unwrap();
    let a = d.path().join("adapters");
    let o =
        std::process::Command::new(env!("CARGO_BIN_EXE_lora")).args(["serve", "--model", s(&base), "--adapters", s(&a)]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("foreign") && err.contains("another base"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapters_load_reload_and_unload_while_16_clients_stream_and_no_request_fails_or_gets_another_adapters_text() {
    let d = tempfile::tempdir().unwrap();
    fixture(d.path());
    let server = start(d.path(), &["--max-loaded-adapters", "2"]);
    let c = reqwest::Client::new();
    let url = server.url.clone();
    let load = |name: &str, path: &str| json!({"lora_name": name, "lora_path": path, "load_inplace": true});
    let prompt = "SELECT id FROM";
    // What each content gives alone.
    let (base, sql, js) = (
        complete(&c, &url, "base", prompt, 24).await,
        complete(&c, &url, "sql", prompt, 24).await,
        complete(&c, &url, "js", prompt, 24).await,
    );
    assert_eq!(post(&c, &format!("{url}/v1/load_lora_adapter"), &load("v2", "spare/sql_v2")).await.0, 200);
    let v2 = complete(&c, &url, "v2", prompt, 24).await;
    let all = [&base, &sql, &js, &v2];
    for (i, a) in all.iter().enumerate() {
        for b in &all[i + 1..] {
            assert_ne!(a, b, "two contents give the same text: the test could not tell them apart");
        }
    }
    // 16 clients stream while "sql" is reloaded in place with new weights and back, and a third adapter
    // is loaded and unloaded; only 2 adapters may be held, so others are evicted and read again.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churn = {
        let (c, url, stop) = (c.clone(), url.clone(), stop.clone());
        tokio::spawn(async move {
            let mut ops = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for (route, body) in [
                    ("load_lora_adapter", load("sql", "spare/sql_v2")),
                    ("load_lora_adapter", load("extra", "js")),
                    ("load_lora_adapter", load("sql", "sql")),
                    ("unload_lora_adapter", json!({"lora_name": "extra"})),
                ] {
                    let (status, v) = post(&c, &format!("{url}/v1/{route}"), &body).await;
                    assert_eq!(status, 200, "{route}: {v}");
                    ops += 1;
                }
            }
            ops
        })
    };
    let mut clients = Vec::new();
    for k in 0..16 {
        let (c, url) = (c.clone(), url.clone());
        let (base, sql, js, v2) = (base.clone(), sql.clone(), js.clone(), v2.clone());
        clients.push(tokio::spawn(async move {
            for i in 0..4 {
                let model = ["sql", "js", "base", "extra"][(k + i) % 4];
                let body = json!({"model": model, "prompt": prompt, "max_tokens": 24, "temperature": 0, "stream": true});
                let text = match stream(&c, &url, &body, || {}).await {
                    Ok((text, _)) => text,
                    // "extra" comes and goes: a request that finds it unloaded is refused before it starts.
                    Err(e) if model == "extra" && e.starts_with("404") => continue,
                    Err(e) => panic!("client {k}, {model}: {e}"),
                };
                let allowed: Vec<&String> = match model {
                    "sql" => vec![&sql, &v2], // either content "sql" had when the request started
                    "js" | "extra" => vec![&js],
                    _ => vec![&base],
                };
                assert!(allowed.contains(&&text), "client {k}: {model} got another adapter's text: {text:?}");
            }
        }));
    }
    for h in clients {
        h.await.unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(churn.await.unwrap() >= 4);
    // A name reloaded with new weights never serves the old ones.
    assert_eq!(post(&c, &format!("{url}/v1/load_lora_adapter"), &load("sql", "spare/sql_v2")).await.0, 200);
    assert_eq!(complete(&c, &url, "sql", prompt, 24).await, v2);
    let metrics = c.get(format!("{url}/metrics")).send().await.unwrap().text().await.unwrap();
    let evictions: f64 = metrics.lines().find_map(|l| l.strip_prefix("lora_adapter_evictions_total ")).unwrap().parse().unwrap();
    assert!(evictions > 0.0, "the cap of 2 never evicted:\n{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unloading_or_replacing_an_adapter_never_changes_a_request_already_accepted() {
    let d = tempfile::tempdir().unwrap();
    fixture(d.path());
    // An idle batcher waits 300 ms for company before it starts: a request accepted meanwhile is in flight
    // (its adapter resolved, its response begun) but not yet computed.
    let server = start(d.path(), &["--batch-window-ms", "300"]);
    let c = reqwest::Client::new();
    let url = server.url.clone();
    let prompt = "SELECT id FROM";
    let load = |name: &str, path: &str| json!({"lora_name": name, "lora_path": path, "load_inplace": true});
    let v2 = {
        assert_eq!(post(&c, &format!("{url}/v1/load_lora_adapter"), &load("tmp", "spare/sql_v2")).await.0, 200);
        complete(&c, &url, "tmp", prompt, 24).await
    };
    let sql = complete(&c, &url, "sql", prompt, 24).await;
    let js = complete(&c, &url, "js", prompt, 24).await;
    assert_ne!(sql, v2);
    let body = |model: &str| json!({"model": model, "prompt": prompt, "max_tokens": 24, "temperature": 0, "stream": true});
    // Unload while accepted: the stream's headers are in, its tokens are not.
    let r = c.post(format!("{url}/v1/completions")).json(&body("tmp")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(post(&c, &format!("{url}/v1/unload_lora_adapter"), &json!({"lora_name": "tmp"})).await.0, 200);
    assert_eq!(sse_text(r).await, v2, "the unload changed a request in flight");
    assert_eq!(post(&c, &format!("{url}/v1/completions"), &json!({"model": "tmp", "prompt": "a"})).await.0, 404);
    // Replace while accepted: the request keeps the weights it started with; the next one gets the new.
    let r = c.post(format!("{url}/v1/completions")).json(&body("sql")).send().await.unwrap();
    assert_eq!(post(&c, &format!("{url}/v1/load_lora_adapter"), &load("sql", "spare/sql_v2")).await.0, 200);
    assert_eq!(sse_text(r).await, sql, "the replacement changed a request in flight");
    assert_eq!(complete(&c, &url, "sql", prompt, 24).await, v2, "the replaced name served its old weights");
    // SIGTERM while a request is accepted: it still completes, then the server exits cleanly.
    let r = c.post(format!("{url}/v1/completions")).json(&body("js")).send().await.unwrap();
    server.terminate();
    assert_eq!(sse_text(r).await, js, "the drained request was cut short or changed");
    assert!(server.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_generator_reports_throughput_latency_and_no_errors_with_adapters_churning() {
    let d = tempfile::tempdir().unwrap();
    fixture(d.path());
    let server = start(d.path(), &[]);
    let addr = server.url.strip_prefix("http://").unwrap().to_string();
    let out = d.path().join("load.json");
    let o = tokio::task::spawn_blocking(move || {
        serve_support::lora(&[
            "loadtest",
            "--addr",
            &addr,
            "--clients",
            "4",
            "--seconds",
            "1.5",
            "--models",
            "base,sql,js",
            "--max-tokens",
            "8",
            "--churn",
            "--json",
            s(&out),
        ]);
        serde_json::from_slice::<serde_json::Value>(&std::fs::read(&out).unwrap()).unwrap()
    })
    .await
    .unwrap();
    assert_eq!((o["errors"].as_u64(), o["churn_errors"].as_u64()), (Some(0), Some(0)), "{o}");
    assert!(o["requests"].as_u64().unwrap() > 10 && o["churn_ops"].as_u64().unwrap() > 3, "{o}");
    assert!(
        o["tokens_per_s"].as_f64().unwrap() > 0.0 && o["latency_ms"]["p99"].as_f64().unwrap() >= o["latency_ms"]["p50"].as_f64().unwrap()
    );
    // Only servers on this machine.
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_lora"))
        .args(["loadtest", "--addr", "192.0.2.1:80", "--models", "m"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && err.contains("loopback"), "{err}");
    // Nothing listening: said so, with the next step (a port that was free a moment ago).
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_lora")).args(["loadtest", "--addr", &addr, "--models", "m"]).output().unwrap();
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && err.contains(&format!("nothing listens at {addr}")) && err.contains("lora serve"), "{err}");
    // Churn against a server that refuses adapter updates: refused before the run, naming the flag.
    let (m, a) = (d.path().join("base"), d.path().join("adapters"));
    let locked = Served::start(&["--model", s(&m), "--adapters", s(&a)]);
    let addr = locked.url.strip_prefix("http://").unwrap().to_string();
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_lora"))
        .args(["loadtest", "--addr", &addr, "--models", "sql", "--seconds", "1", "--churn"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && err.contains("--allow-adapter-updates"), "{err}");
}

/// The text of a streamed completion's body.
async fn sse_text(r: reqwest::Response) -> String {
    let body = r.text().await.unwrap();
    let mut text = String::new();
    for line in body.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if line != "[DONE]" {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            text.push_str(v["choices"][0]["text"].as_str().unwrap());
        }
    }
    assert!(body.contains("data: [DONE]"), "{body}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_allow_adapter_updates_loads_and_unloads_are_refused_with_a_403_naming_the_flag() {
    let d = tempfile::tempdir().unwrap();
    fixture(d.path());
    let (m, a) = (d.path().join("base"), d.path().join("adapters"));
    let server = Served::start(&["--model", s(&m), "--adapters", s(&a), "--threads", "2"]);
    let c = reqwest::Client::new();
    for (route, body) in [
        ("/v1/load_lora_adapter", json!({"lora_name": "v2", "lora_path": "spare/sql_v2"})),
        ("/v1/load_lora_adapter", json!({"lora_name": "sql", "lora_path": "spare/sql_v2", "load_inplace": true})),
        ("/v1/unload_lora_adapter", json!({"lora_name": "sql"})),
    ] {
        let (status, v) = post(&c, &format!("{}{route}", server.url), &body).await;
        assert_eq!(status, 403, "{route}: {v}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains("--allow-adapter-updates") && message.contains(route), "{message}");
    }
    // Nothing changed: the same adapters, and "sql" still completes as before.
    let (_, models) = get(&c, &format!("{}/v1/models", server.url)).await;
    let ids: Vec<&str> = models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["base", "js", "sql"]);
    complete(&c, &server.url, "sql", "SELECT", 4).await; // asserts a 200
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_api_key_the_v1_routes_want_it_and_the_load_generator_sends_it() {
    let d = tempfile::tempdir().unwrap();
    fixture(d.path());
    let (m, a) = (d.path().join("base"), d.path().join("adapters"));
    let server = Served::start(&["--model", s(&m), "--adapters", s(&a), "--threads", "2", "--api-key", "k3y"]);
    let c = reqwest::Client::new();
    let ok = json!({"model": "sql", "prompt": "SELECT", "max_tokens": 4, "temperature": 0});
    let (status, v) = post(&c, &format!("{}/v1/completions", server.url), &ok).await;
    assert_eq!(status, 401, "{v}");
    let r = c.post(format!("{}/v1/completions", server.url)).bearer_auth("k3y").json(&ok).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(get(&c, &format!("{}/health", server.url)).await.0, 200, "/health stays open");
    let addr = server.url.strip_prefix("http://").unwrap().to_string();
    let run = |key: Option<&str>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_lora"));
        cmd.args(["loadtest", "--addr", &addr, "--models", "sql", "--clients", "2", "--seconds", "0.5", "--max-tokens", "4"]);
        cmd.env_remove("LORA_API_KEY");
        if let Some(k) = key {
            cmd.env("LORA_API_KEY", k);
        }
        cmd.output().unwrap()
    };
    let o = tokio::task::block_in_place(|| run(None));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("API key"), "{err}");
    let o = tokio::task::block_in_place(|| run(Some("k3y")));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}
