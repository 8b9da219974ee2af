//! Starting a real `lora serve` on a free loopback port, and talking to it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use candle_core::{Device, Tensor};
use lora::LoraConfig;
use lora_lm::hf::{load_model, save_adapter, save_model, save_model_as, WeightDtype};
use lora_lm::{Llama, LlamaConfig, PROJECTIONS};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

/// A running `lora serve`, killed when dropped.
pub struct Served {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// What it printed on stdout and stderr after its address, as it prints it.
    output: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Served {
    /// Starts `lora serve ARGS --addr 127.0.0.1:0` and waits until it listens.
    pub fn start(args: &[&str]) -> Served {
        let mut child = Command::new(env!("CARGO_BIN_EXE_lora"))
            .arg("serve")
            .args(args)
            .args(["--addr", "127.0.0.1:0"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let url = loop {
            match lines.next() {
                Some(Ok(l)) => {
                    if let Some(rest) = l.strip_prefix("lora serve: listening on ") {
                        break rest.trim().to_string();
                    }
                }
                _ => {
                    let mut err = String::new();
                    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
                    panic!("lora serve {args:?} did not start:\n{err}");
                }
            }
        };
        // Keep draining stdout and stderr so the server never blocks on a full pipe.
        let output = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let out = output.clone();
        std::thread::spawn(move || {
            for l in lines.map_while(Result::ok) {
                out.lock().unwrap().push_str(&format!("{l}\n"));
            }
        });
        let err = output.clone();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(stderr).lines().map_while(Result::ok) {
                err.lock().unwrap().push_str(&format!("{l}\n"));
            }
        });
        Served { child, url, output }
    }

    /// What the server printed after its address (stdout and stderr).
    pub fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Peak resident memory of the server so far (VmHWM), MiB.
    pub fn peak_rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kb: f64 = status.lines().find_map(|l| l.strip_prefix("VmHWM:")).unwrap().trim().trim_end_matches("kB").trim().parse().unwrap();
        kb / 1024.0
    }

    /// Waits for the process to exit, at most `limit`; its status, or `None` if it is still running.
    pub fn wait_for_exit(&mut self, limit: std::time::Duration) -> Option<std::process::ExitStatus> {
        let until = std::time::Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            if std::time::Instant::now() >= until {
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM (what Ctrl-C's SIGINT also does: drain, then exit).
    pub fn terminate(&self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        self.terminate();
        self.child.wait().unwrap()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// POSTs JSON; returns the status and the JSON body (every answer of the server is JSON).
pub async fn post(c: &reqwest::Client, url: &str, body: &Value) -> (u16, Value) {
    let r = c.post(url).json(body).send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{url}: not JSON ({e}): {text}")))
}

/// POSTs raw bytes as JSON.
pub async fn post_raw(c: &reqwest::Client, url: &str, body: Vec<u8>) -> (u16, Value) {
    let r = c.post(url).header("content-type", "application/json").body(body).send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{url}: not JSON ({e}): {text}")))
}

/// GETs JSON.
pub async fn get(c: &reqwest::Client, url: &str) -> (u16, Value) {
    let r = c.get(url).send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{url}: not JSON ({e}): {text}")))
}

/// A streamed completion: the concatenated text of every chunk, the finish reasons seen and whether
/// the stream ended with `[DONE]`. Calls `on_first` once the first chunk has arrived.
pub async fn stream(c: &reqwest::Client, url: &str, body: &Value, mut on_first: impl FnMut()) -> Result<(String, Vec<String>), String> {
    let mut r = c.post(format!("{url}/v1/completions")).json(body).send().await.map_err(|e| e.to_string())?;
    if !r.status().is_success() {
        return Err(format!("{}: {}", r.status(), r.text().await.unwrap_or_default()));
    }
    let (mut buf, mut text, mut finishes, mut done, mut first) = (String::new(), String::new(), Vec::new(), false, true);
    while let Some(chunk) = r.chunk().await.map_err(|e| e.to_string())? {
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let data = event.trim().strip_prefix("data:").ok_or_else(|| format!("not an SSE data line: {event:?}"))?.trim().to_string();
            if data == "[DONE]" {
                done = true;
                continue;
            }
            let v: Value = serde_json::from_str(&data).map_err(|e| format!("{e}: {data}"))?;
            if v.get("error").is_some() {
                return Err(format!("error event: {data}"));
            }
            text.push_str(v["choices"][0]["text"].as_str().unwrap_or(""));
            if let Some(f) = v["choices"][0]["finish_reason"].as_str() {
                finishes.push(f.to_string());
            }
            if first {
                first = false;
                on_first();
            }
        }
    }
    if !done {
        return Err("the stream ended without [DONE]".into());
    }
    Ok((text, finishes))
}

/// Runs the `lora` binary; panics with its output unless it succeeds.
pub fn lora(args: &[&str]) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_lora")).args(args).current_dir(env!("CARGO_MANIFEST_DIR")).output().unwrap();
    assert!(o.status.success(), "{args:?} failed:\n{}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A small MNIST base `DIR/m.safetensors` (hidden 48 and 24, one epoch) and a LoRA adapter per digit in
/// `DIR/adapters/digitD` (25 steps each, `extra` flags added), made with the real binary.
pub fn mnist_fixture(dir: &Path, digits: &[&str], extra: &[&str]) -> (std::path::PathBuf, std::path::PathBuf) {
    let m = dir.join("m.safetensors");
    lora(&["pretrain", "--hidden1", "48", "--hidden2", "24", "--batch-size", "300", "--out", s(&m)]);
    for digit in digits {
        let out = dir.join(format!("adapters/digit{digit}"));
        let mut args = vec!["finetune", "--model", s(&m), "--digit", digit, "--steps", "25", "--out", s(&out)];
        args.extend_from_slice(extra);
        lora(&args);
    }
    (m, dir.join("adapters"))
}

/// A path as &str.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn config() -> LlamaConfig {
    config_with_context(64)
}

fn config_with_context(context: usize) -> LlamaConfig {
    LlamaConfig {
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 8,
        max_position_embeddings: context,
        // Large random weights: the logits' top two are far apart, so greedy choices are robust to the
        // f32 rounding that batch sizes change.
        initializer_range: 0.3,
        ..LlamaConfig::byte_default()
    }
}

/// Writes adapter `name` (random non-zero B on every projection) for `m` into `dir`.
fn write_adapter(m: &mut Llama, name: &str, seed: u64, dir: &Path) {
    write_adapter_with(m, name, seed, dir, false)
}

/// [`write_adapter`], a DoRA adapter when `dora`.
fn write_adapter_with(m: &mut Llama, name: &str, seed: u64, dir: &Path, dora: bool) {
    let c = LoraConfig {
        target_modules: PROJECTIONS.iter().map(|s| s.to_string()).collect(),
        init: lora::Init::PeftGaussian,
        use_dora: dora,
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

/// base/ (the model), adapters/{sql,js} (registered at start), adapters/spare/{sql_v2,foreign,dora}
/// (loadable at run time; `foreign` was trained on another base; `dora` is a DoRA adapter, which mixed
/// batches do not serve yet).
pub fn fixture(root: &Path) {
    fixture_context(root, 64)
}

/// [`fixture`] with a base of `context` positions (long enough for chats rendered with a template).
pub fn fixture_context(root: &Path, context: usize) {
    let mut m = Llama::random(&config_with_context(context), 1).unwrap();
    save_model(&m, &root.join("base"), &BTreeMap::new()).unwrap();
    write_adapter(&mut m, "sql", 1, &root.join("adapters/sql"));
    write_adapter(&mut m, "js", 2, &root.join("adapters/js"));
    write_adapter(&mut m, "sql_v2", 3, &root.join("adapters/spare/sql_v2"));
    write_adapter_with(&mut m, "dora", 5, &root.join("adapters/spare/dora"), true);
    let mut other = Llama::random(&config_with_context(context), 99).unwrap();
    write_adapter(&mut other, "foreign", 4, &root.join("adapters/spare/foreign"));
}

/// base/ (the model with `context` positions, so that completions can be long) and an empty adapters/.
pub fn fixture_long(root: &Path, context: usize) {
    let m = Llama::random(&config_with_context(context), 1).unwrap();
    save_model(&m, &root.join("base"), &BTreeMap::new()).unwrap();
    std::fs::create_dir_all(root.join("adapters")).unwrap();
}

/// base/ written in bf16 and adapters/sql trained for it (on the model read back, whose fingerprint is the
/// file's).
pub fn fixture_bf16(root: &Path) {
    let m = Llama::random(&config(), 1).unwrap();
    save_model_as(&m, &root.join("base"), &BTreeMap::new(), WeightDtype::Bf16).unwrap();
    let (mut back, _) = load_model(&root.join("base")).unwrap();
    write_adapter(&mut back, "sql", 1, &root.join("adapters/sql"));
}
