//! Checkpoint and resume: a run killed with SIGKILL and resumed ends with the same weights, bit for bit,
//! as one that was never interrupted.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn lora() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lora"));
    c.current_dir(env!("CARGO_MANIFEST_DIR"));
    c
}

fn ok(args: &[&str]) {
    let o = lora().args(args).output().unwrap();
    assert!(o.status.success(), "{args:?}:\n{}", String::from_utf8_lossy(&o.stderr));
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Starts `lora ARGS`, waits until it has written `checkpoint`, lets it run `linger` longer, then kills it
/// with SIGKILL. Fails if the run ends on its own before its first checkpoint.
fn kill_after_first_checkpoint(args: &[&str], checkpoint: &Path, linger: Duration) {
    let mut child = lora().args(args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let t0 = Instant::now();
    while !checkpoint.exists() {
        assert!(t0.elapsed() < Duration::from_secs(300), "no checkpoint written");
        assert!(child.try_wait().unwrap().is_none(), "the run ended before its first checkpoint");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(linger);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
}

#[test]
fn pretraining_killed_mid_run_and_resumed_matches_an_uninterrupted_run_bit_for_bit() {
    let d = tempfile::tempdir().unwrap();
    let args = ["pretrain", "--hidden1", "256", "--hidden2", "128", "--epochs", "3", "--seed", "11"];
    let full = d.path().join("full.safetensors");
    ok(&[&args[..], &["--out", s(&full)]].concat());

    let out = d.path().join("killed.safetensors");
    let ckpt = d.path().join("run.ckpt.safetensors");
    let extra = ["--out", s(&out), "--checkpoint-every", "200", "--checkpoint", s(&ckpt)];
    kill_after_first_checkpoint(&[&args[..], &extra[..]].concat(), &ckpt, Duration::from_millis(300));
    assert!(!out.exists(), "the run finished before it was killed: the test proves nothing");

    // Resuming with other settings is refused, naming the setting.
    let o = lora()
        .args(["pretrain", "--hidden1", "256", "--hidden2", "128", "--epochs", "3", "--seed", "12"])
        .args(["--out", s(&out), "--resume", s(&ckpt)])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("seed = 11") && err.contains("seed = 12"), "{err}");
    assert!(!out.exists(), "a refused resume writes nothing");

    ok(&[&args[..], &["--out", s(&out), "--resume", s(&ckpt)]].concat());
    assert_eq!(std::fs::read(&full).unwrap(), std::fs::read(&out).unwrap(), "resumed weights differ from the uninterrupted run");
    assert!(!ckpt.exists(), "the finished run's checkpoint is removed");
}

#[test]
fn finetuning_killed_mid_run_and_resumed_writes_the_same_adapter() {
    let d = tempfile::tempdir().unwrap();
    let model = d.path().join("m.safetensors");
    ok(&["pretrain", "--hidden1", "48", "--hidden2", "24", "--batch-size", "300", "--out", s(&model)]);
    let args = ["finetune", "--model", s(&model), "--digit", "3", "--steps", "3000", "--rank", "2", "--alpha", "5"];
    let whole = d.path().join("whole");
    ok(&[&args[..], &["--out", s(&whole)]].concat());
    // Killed right after its first checkpoint (step 100 of 3,000), resumed: steps 101-3,000 redone exactly.
    let out = d.path().join("resumed");
    let ckpt = d.path().join("resumed.ckpt.safetensors");
    kill_after_first_checkpoint(&[&args[..], &["--out", s(&out), "--checkpoint-every", "100"]].concat(), &ckpt, Duration::ZERO);
    assert!(!out.join("adapter_model.safetensors").exists(), "the run finished before it was killed: the test proves nothing");
    ok(&[&args[..], &["--out", s(&out), "--resume", s(&ckpt)]].concat());
    assert_eq!(
        std::fs::read(whole.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(out.join("adapter_model.safetensors")).unwrap(),
        "the resumed adapter differs from the uninterrupted one"
    );
    assert!(!ckpt.exists(), "the finished run's checkpoint is removed");
}

fn report_numbers(p: &Path) -> serde_json::Value {
    fn strip(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                // Timings and paths differ between runs (the adapter's size includes its config, which names
                // the base's path); every other number must not.
                m.retain(|k, v| k != "seconds" && k != "adapter_bytes" && !v.is_string());
                m.values_mut().for_each(strip);
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
    strip(&mut v);
    v
}

#[test]
fn a_demo_killed_in_pretraining_or_resumed_in_finetuning_ends_like_an_uninterrupted_one() {
    let d = tempfile::tempdir().unwrap();
    let args = ["demo", "--hidden1", "256", "--hidden2", "128", "--epochs", "2", "--steps", "2000", "--seed", "5"];
    let full = d.path().join("full");
    ok(&[&args[..], &["--out", s(&full)]].concat());
    let same_as_full = |out: &Path| {
        for f in ["base.safetensors", "adapter/adapter_model.safetensors"] {
            assert_eq!(std::fs::read(full.join(f)).unwrap(), std::fs::read(out.join(f)).unwrap(), "{f} differs in {}", out.display());
        }
        assert_eq!(report_numbers(&full.join("report.json")), report_numbers(&out.join("report.json")));
    };

    // Killed during pre-training, resumed: pre-training continues from its checkpoint.
    let out = d.path().join("killed");
    let extra = ["--out", s(&out), "--checkpoint-every", "150"];
    kill_after_first_checkpoint(&[&args[..], &extra[..]].concat(), &out.join("checkpoint/pretrain.ckpt.safetensors"), Duration::ZERO);
    assert!(!out.join("report.json").exists(), "the demo finished before it was killed: the test proves nothing");
    ok(&[&args[..], &["--out", s(&out), "--checkpoint-every", "150", "--resume", s(&out.join("checkpoint"))]].concat());
    same_as_full(&out);

    // Killed during fine-tuning, resumed from its first fine-tuning checkpoint: pre-training is not redone.
    let out = d.path().join("ft");
    let extra = ["--out", s(&out), "--checkpoint-every", "100"];
    kill_after_first_checkpoint(&[&args[..], &extra[..]].concat(), &out.join("checkpoint/finetune.ckpt.safetensors"), Duration::ZERO);
    assert!(!out.join("report.json").exists(), "the demo finished before it was killed: the test proves nothing");
    let o = lora().args(args).args(["--out", s(&out), "--resume", s(&out.join("checkpoint"))]).output().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains("Pre-training already finished") && stdout.contains("Resuming fine-tuning"), "{stdout}");
    same_as_full(&out);
}

#[test]
fn language_model_pretraining_killed_mid_run_and_resumed_matches_an_uninterrupted_run_bit_for_bit() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("code.txt");
    std::fs::write(&data, "SELECT id FROM t WHERE x = 1;\nfunction f(a) { return a + 1; }\n".repeat(50)).unwrap();
    let shape = ["--hidden", "32", "--intermediate", "48", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--context", "64"];
    let train = ["--steps", "400", "--batch-size", "4", "--seq-len", "64", "--seed", "5", "--data", s(&data)];
    let args: Vec<&str> = ["lm", "pretrain"].iter().chain(&shape).chain(&train).copied().collect();
    let full = d.path().join("full");
    ok(&[&args[..], &["--out", s(&full)]].concat());

    let out = d.path().join("killed");
    let ckpt = d.path().join("killed.ckpt.safetensors");
    kill_after_first_checkpoint(&[&args[..], &["--out", s(&out), "--checkpoint-every", "40"]].concat(), &ckpt, Duration::from_millis(100));
    assert!(!out.join("model.safetensors").exists(), "the run finished before it was killed: the test proves nothing");

    ok(&[&args[..], &["--out", s(&out), "--resume", s(&ckpt)]].concat());
    let bytes = |dir: &Path| std::fs::read(dir.join("model.safetensors")).unwrap();
    assert_eq!(bytes(&full), bytes(&out), "resumed weights differ from the uninterrupted run");
    assert!(!ckpt.exists(), "the finished run's checkpoint is removed");
}
