//! The language-model commands end to end through the real binary, on tiny shapes: pre-train, fine-tune
//! two adapters, evaluate them on one base, generate; and `lora lm demo`'s report holds the promised keys.

use std::path::Path;
use std::process::Command;

fn lora(dir: &Path, args: &[&str]) -> String {
    lora_out_err(dir, args).0
}

/// Runs `lora` (stderr is a pipe, not a terminal), asserts success, returns (stdout, stderr).
fn lora_out_err(dir: &Path, args: &[&str]) -> (String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_lora")).args(args).current_dir(dir).output().unwrap();
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "lora {}: failed\nstdout: {out}\nstderr: {err}", args.join(" "));
    (out.into_owned(), err.into_owned())
}

/// A one-layer model small enough to train in a test.
const SHAPE: [&str; 12] = ["--hidden", "16", "--intermediate", "24", "--layers", "1", "--heads", "2", "--kv-heads", "1", "--context", "32"];

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn pretrain_finetune_eval_and_generate_work_together_on_one_base() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::write(d.join("sql.txt"), "SELECT name FROM users WHERE id = 1;\n".repeat(40)).unwrap();
    std::fs::write(d.join("js.txt"), "function f(x) { return x * 2; }\n".repeat(40)).unwrap();
    let train = ["--steps", "4", "--batch-size", "2", "--seq-len", "16"];
    let mut args = vec!["lm", "pretrain", "--out", "base", "--data", "sql.txt:1", "--data", "js.txt:3", "--json", "pre.json"];
    args.extend(SHAPE);
    args.extend(train);
    let (_, err) = lora_out_err(d, &args);
    // Off a terminal the bar is hidden: plain progress lines instead (the first step, then every 10 s, the end).
    assert!(err.contains("Pre-training: step 1/4 (") && err.contains("Pre-training: 4 steps, loss="), "{err}");
    let pre = json(&d.join("pre.json"));
    assert_eq!(pre["steps"], 4);
    assert_eq!(pre["tokens"], 4 * 2 * 16);
    assert!(pre["final_loss"].as_f64().unwrap().is_finite());
    let cfg = json(&d.join("base/config.json"));
    assert_eq!((cfg["hidden_size"].as_u64(), cfg["lora_rs_tokenizer"].as_str()), (Some(16), Some("bytes")));

    for (name, data) in [("sql", "sql.txt"), ("js", "js.txt")] {
        let mut args =
            vec!["lm", "finetune", "--model", "base", "--data", data, "--out", name, "--rank", "2", "--alpha", "4", "--lr", "1e-2"];
        args.extend(train);
        let out = lora(d, &args);
        assert!(out.contains("base weights bit-for-bit unchanged: true"), "{out}");
        let c = json(&d.join(name).join("adapter_config.json"));
        assert_eq!(c["task_type"], "CAUSAL_LM");
        assert_eq!(c["target_modules"].as_array().unwrap().len(), 7);
    }

    let out = lora(
        d,
        &[
            "lm",
            "eval",
            "--model",
            "base",
            "--adapter",
            "sql=sql",
            "--adapter",
            "js=js",
            "--data",
            "sql.txt",
            "js.txt",
            "--json",
            "eval.json",
            "--token-losses",
            "tok.json",
        ],
    );
    assert!(out.contains("bits/byte"), "{out}");
    let e = json(&d.join("eval.json"));
    for file in ["sql.txt", "js.txt"] {
        for col in ["base", "sql", "js"] {
            let s = &e[file][col];
            assert!(s["loss"].as_f64().unwrap() > 0.0 && s["bits_per_byte"].as_f64().unwrap() > 0.0, "{file} {col}: {s}");
            // Every byte of the file but the first of each window of 32 is predicted.
            let bytes = std::fs::metadata(d.join(file)).unwrap().len() as usize;
            assert_eq!(s["tokens"].as_u64().unwrap(), (bytes - bytes.div_ceil(32)) as u64);
        }
    }
    let tok = json(&d.join("tok.json"));
    let windows = tok["sql.txt"]["sql"].as_array().unwrap();
    let total: f64 = windows.iter().flat_map(|w| w.as_array().unwrap().iter().map(|x| x.as_f64().unwrap())).sum();
    let n: usize = windows.iter().map(|w| w.as_array().unwrap().len()).sum();
    assert!((total / n as f64 - e["sql.txt"]["sql"]["loss"].as_f64().unwrap()).abs() < 1e-9, "per-token losses average to the loss");

    // A merged model scores as the base with the adapter on (up to the rounding of W + s·B·A).
    lora(d, &["merge", "--model", "base", "--adapter", "sql", "--out", "merged"]);
    lora(d, &["lm", "eval", "--model", "merged", "--data", "sql.txt", "--json", "merged.json"]);
    let (m, a) = (json(&d.join("merged.json"))["sql.txt"]["base"]["loss"].as_f64().unwrap(), e["sql.txt"]["sql"]["loss"].as_f64().unwrap());
    assert!((m - a).abs() < 1e-4 * a, "merged {m} vs adapter {a}");
    // LORA_LOG=info logs what was loaded and written (stderr; stdout keeps the table).
    let o = Command::new(env!("CARGO_BIN_EXE_lora"))
        .args(["lm", "eval", "--model", "base", "--adapter", "js=js", "--data", "js.txt", "--json", "logged.json"])
        .current_dir(d)
        .env("LORA_LOG", "info")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    for want in ["loaded model", "loaded adapter", "wrote file", "logged.json"] {
        assert!(err.contains(want), "LORA_LOG=info: {want:?} missing from stderr:\n{err}");
    }
    assert!(!err.contains('\u{1b}'), "no colour codes when stderr is not a terminal");
    let out = lora(d, &["inspect", "merged"]);
    assert!(out.contains("Llama model directory") && out.contains("context 32"), "{out}");

    let out = lora(d, &["lm", "generate", "--model", "base", "--adapter", "sql", "--prompt", "SELECT", "--max-tokens", "8"]);
    assert!(out.starts_with("SELECT") && out.len() >= 6, "{out:?}");
    let out = lora(
        d,
        &[
            "lm",
            "generate",
            "--model",
            "base",
            "--prompt",
            "SELECT",
            "--prompt",
            "fun",
            "--max-tokens",
            "5",
            "--temperature",
            "0.8",
            "--top-k",
            "5",
            "--top-p",
            "0.9",
            "--seed",
            "3",
        ],
    );
    assert!(out.contains("--- prompt 1 ---\nSELECT") && out.contains("--- prompt 2 ---\nfun"), "{out}");

    // A closed stdout (`| head -c 0`: closed before the model has loaded, so before the first write) ends
    // generation quietly: exit 0, nothing on stderr.
    use std::io::Read;
    let mut child = Command::new(env!("CARGO_BIN_EXE_lora"))
        .args(["lm", "generate", "--model", "base", "--prompt", "SELECT", "--max-tokens", "200"])
        .current_dir(d)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success() && err.is_empty(), "exit {status:?}, stderr {err:?}");
}

#[test]
fn a_base_pretrained_with_dtype_bf16_is_written_in_bf16_and_adapts_and_generates_like_any_base() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::write(d.join("sql.txt"), "SELECT name FROM users WHERE id = 1;\n".repeat(40)).unwrap();
    let train = ["--steps", "2", "--batch-size", "2", "--seq-len", "16"];
    let mut args = vec!["lm", "pretrain", "--out", "base", "--data", "sql.txt", "--dtype", "bf16", "--json", "pre.json"];
    args.extend(SHAPE);
    args.extend(train);
    lora(d, &args);
    assert_eq!(json(&d.join("pre.json"))["dtype"], "bfloat16");
    assert_eq!(json(&d.join("base/config.json"))["torch_dtype"], "bfloat16");
    let file = lora::io::TensorFile::load(&d.join("base/model.safetensors"), &candle_core::Device::Cpu).unwrap();
    assert!(file.dtypes.iter().all(|(_, dt)| dt == "BF16"), "{:?}", file.dtypes);
    // An adapter records the fingerprint of the base as written, so generation accepts it on that base.
    let mut args = vec!["lm", "finetune", "--model", "base", "--data", "sql.txt", "--out", "sql", "--rank", "2"];
    args.extend(train);
    assert!(lora(d, &args).contains("base weights bit-for-bit unchanged: true"));
    let out = lora(
        d,
        &["lm", "generate", "--model", "base", "--adapter", "sql", "--prompt", "SELECT", "--max-tokens", "4", "--temperature", "0"],
    );
    assert!(out.starts_with("SELECT"), "{out}");
}

#[test]
fn the_demo_writes_a_base_three_peft_adapters_and_the_promised_report() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/code");
    let out = lora(
        d,
        &[
            "lm",
            "demo",
            "--out",
            "run",
            "--data",
            data.to_str().unwrap(),
            "--pretrain-steps",
            "2",
            "--finetune-steps",
            "1",
            "--eval-tokens",
            "600",
            "--sample-tokens",
            "4",
            "--report",
            "rep",
        ],
    );
    assert!(out.contains("samples with the sql adapter"), "{out}");
    let r = json(&d.join("run/report.json"));
    assert_eq!(r["params"], 3_279_104);
    assert_eq!(r["pretrain"]["steps"], 2);
    assert_eq!(r["pretrain"]["tokens"], 2 * 16 * 256);
    assert!(r["pretrain"]["seconds"].as_f64().unwrap() > 0.0 && r["pretrain"]["final_loss"].as_f64().unwrap().is_finite());
    for corpus in ["sql", "js", "python", "chat"] {
        for col in ["base", "sql", "js", "chat"] {
            assert!(r["eval"][corpus][col].as_f64().unwrap() > 0.0, "eval.{corpus}.{col}");
        }
    }
    // The chat adapter trained on the shipped conversations, and a conversation with and without it.
    assert_eq!(r["finetune"]["chat"]["steps"], 1);
    assert_eq!(r["chat"].as_array().unwrap().iter().map(|c| c["adapter"].as_str().unwrap()).collect::<Vec<_>>(), ["base", "chat"]);
    assert!(out.contains("=== chat with the chat adapter (greedy) ==="), "{out}");
    for f in [
        "base/config.json",
        "base/model.safetensors",
        "adapters/sql/adapter_config.json",
        "adapters/js/adapter_model.safetensors",
        "adapters/chat/adapter_model.safetensors",
    ] {
        assert!(d.join("run").join(f).exists(), "{f}");
    }
    for f in ["report.html", "loss.png", "scores.png", "scores.svg", "metrics-pre-training.csv"] {
        assert!(d.join("rep").join(f).exists(), "report file {f}");
    }
}

#[test]
fn finetune_and_eval_take_chat_data_with_the_loss_on_the_answers() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::write(d.join("t.txt"), "def f(x): return x\n".repeat(40)).unwrap();
    let shape = ["--hidden", "16", "--intermediate", "24", "--layers", "1", "--heads", "2", "--kv-heads", "1", "--context", "96"];
    let mut args = vec!["lm", "pretrain", "--out", "base", "--data", "t.txt", "--steps", "2", "--batch-size", "2", "--seq-len", "32"];
    args.extend(shape);
    lora(d, &args);
    let rows = [
        ("Add one.", "def f(x): return x + 1", "train"),
        ("Double it.", "def g(x): return 2 * x", "train"),
        ("Negate.", "def h(x): return -x", "validation"),
    ];
    let body: String = rows
        .iter()
        .map(|(q, a, split)| {
            serde_json::json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], "split": split})
                .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(d.join("chat.jsonl"), body).unwrap();
    let train = ["--steps", "3", "--batch-size", "2", "--seq-len", "96", "--rank", "2", "--alpha", "4"];
    let mut args = vec!["lm", "finetune", "--model", "base", "--data", "chat.jsonl", "--out", "chat", "--json", "ft.json"];
    args.extend(train);
    let out = lora(d, &args);
    // Two train rows; each trains its answer and the end marker after it: "def f(x): return x + 1<|im_end|>\n".
    let trained: usize = rows[..2].iter().map(|(_, a, _)| a.len() + "<|im_end|>\n".len()).sum();
    assert!(out.contains("Instruction data chat.jsonl (messages rows): 2 examples"), "{out}");
    assert!(
        out.contains(&format!("{trained} trained (the loss on completions and assistant turns), chat template lora-rs' default ChatML")),
        "{out}"
    );
    assert_eq!(json(&d.join("ft.json"))["steps"], 3);
    assert!(d.join("chat/adapter_model.safetensors").exists());
    // Packed, and with the loss on every token: the same command takes both.
    let mut args = vec!["lm", "finetune", "--model", "base", "--data", "chat.jsonl", "--out", "packed", "--packing", "--loss-on", "all"];
    args.extend(train);
    let out = lora(d, &args);
    assert!(out.contains("(the loss on every token)"), "{out}");
    // Evaluation scores the held-out answer only.
    let out = lora(d, &["lm", "eval", "--model", "base", "--adapter", "chat=chat", "--data", "chat.jsonl", "t.txt", "--json", "e.json"]);
    assert!(out.contains("validation split"), "{out}");
    let e = json(&d.join("e.json"));
    let want = rows[2].1.len() + "<|im_end|>\n".len();
    for col in ["base", "chat"] {
        assert_eq!(e["chat.jsonl"][col]["tokens"], want, "{col}: {e}");
        assert!(e["chat.jsonl"][col]["loss"].as_f64().unwrap().is_finite());
    }
    assert!(e["t.txt"]["chat"]["tokens"].as_u64().unwrap() > 100, "{e}");
    // A merged model keeps the base's chat files (here a template of its own and its end tokens).
    let talk = [
        ("tokenizer_config.json", r#"{"chat_template": "{{ messages[0].content }}"}"#),
        ("generation_config.json", r#"{"eos_token_id": 10}"#),
    ];
    for (name, text) in talk {
        std::fs::write(d.join("base").join(name), text).unwrap();
    }
    let out = lora(d, &["merge", "--model", "base", "--adapter", "chat", "--out", "merged"]);
    assert!(out.contains("with the base's tokenizer_config.json, generation_config.json"), "{out}");
    for (name, text) in talk {
        assert_eq!(std::fs::read_to_string(d.join("merged").join(name)).unwrap(), text, "{name}");
    }
}
