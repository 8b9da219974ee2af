//! The official `openai` Python client against a real `lora serve` (scripts/openai_client_check.py): it lists the
//! models, completes and chats with an adapter as the model, streamed and not, with an API key, and gets what the
//! server answers over plain HTTP. Skipped, saying so by name, where Python has no `openai` package (`.ci/run`
//! installs it; `LORA_PYTHON` picks the interpreter, default `python3`).

mod serve_support;

use std::io::Write;
use std::process::Command;

use serde_json::{json, Value};
use serve_support::{fixture_context, post, s, Served};

fn python() -> String {
    std::env::var("LORA_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

/// Whether the interpreter imports `openai`.
fn has_openai() -> bool {
    Command::new(python()).args(["-c", "import openai"]).output().is_ok_and(|o| o.status.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_python_client_lists_completes_and_chats_streamed_and_not() {
    if !has_openai() {
        // Straight to stderr, not through the test harness' capture: the skip shows in every run.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED the_openai_python_client_lists_completes_and_chats_streamed_and_not: `{} -c \"import openai\"` fails \
             (pip install openai, or set LORA_PYTHON to a Python that has it)",
            python()
        );
        return;
    }
    let d = tempfile::tempdir().unwrap();
    fixture_context(d.path(), 256);
    let (m, a) = (d.path().join("base"), d.path().join("adapters"));
    let server = Served::start(&["--model", s(&m), "--adapters", s(&a), "--threads", "2", "--api-key", "sekrit"]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/openai_client_check.py");
    let o = Command::new(python())
        .args([script, "--url", &server.url, "--model", "sql", "--api-key", "sekrit", "--max-tokens", "16"])
        .output()
        .unwrap();
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "the client failed:\n{out}\n{err}\nserver: {}", server.output());
    let got: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"));

    // The same requests over plain HTTP.
    let c = reqwest::Client::new();
    let auth = |r: reqwest::RequestBuilder| r.bearer_auth("sekrit");
    let call = |path: &str, body: Value| {
        let (c, url) = (c.clone(), format!("{}{path}", server.url));
        async move {
            let r = auth(c.post(url).json(&body)).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.unwrap()
        }
    };
    let completion =
        call("/v1/completions", json!({"model": "sql", "prompt": "SELECT name FROM", "max_tokens": 16, "temperature": 0})).await;
    let messages = json!([{"role": "system", "content": "Answer with Python."}, {"role": "user", "content": "Return the sum of a and b."}]);
    let chat = call("/v1/chat/completions", json!({"model": "sql", "messages": messages, "max_tokens": 16, "temperature": 0})).await;

    assert_eq!(got["models"], json!(["base", "js", "sql"]));
    assert_eq!(got["completion"]["text"], completion["choices"][0]["text"]);
    assert_eq!(got["completion_stream"], completion["choices"][0]["text"]);
    assert_eq!(got["completion"]["usage"], completion["usage"]);
    let want = &chat["choices"][0];
    assert_eq!(got["chat"]["content"], want["message"]["content"]);
    assert_eq!(
        (got["chat"]["role"].as_str(), got["chat"]["object"].as_str(), got["chat"]["model"].as_str()),
        (Some("assistant"), Some("chat.completion"), Some("sql"))
    );
    assert_eq!(got["chat"]["finish_reason"], want["finish_reason"]);
    assert_eq!(got["chat"]["usage"], chat["usage"]);
    assert_eq!(got["chat_stream"]["content"], want["message"]["content"]);
    assert_eq!(got["chat_stream"]["roles"], json!(["assistant"]));
    assert_eq!(got["chat_stream"]["finish_reasons"], json!([want["finish_reason"]]));
    assert_eq!(got["chat_stream"]["usage"], chat["usage"]);
    assert_eq!(got["not_found"]["status"], 404, "{}", got["not_found"]);
    assert!(got["not_found"]["message"].as_str().unwrap().contains("no-such-adapter"), "{}", got["not_found"]);
    // Without the key the server refuses (the client sent it).
    let (status, _) = post(&c, &format!("{}/v1/chat/completions", server.url), &json!({"model": "sql", "messages": messages})).await;
    assert_eq!(status, 401);
    assert!(server.stop().success());
}
