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

#[test]
fn pretraining_killed_mid_run_and_resumed_matches_an_uninterrupted_run_bit_for_bit() {
    let d = tempfile::tempdir().unwrap();
    let args = ["pretrain", "--hidden1", "256", "--hidden2", "128", "--epochs", "3", "--seed", "11"];
    let full = d.path().join("full.safetensors");
    ok(&[&args[..], &["--out", s(&full)]].concat());

    let out = d.path().join("killed.safetensors");
    let ckpt = d.path().join("ckpt");
    let mut child = lora()
        .args(args)
        .args(["--out", s(&out), "--checkpoint-every", "200", "--checkpoint-dir", s(&ckpt)])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let file = ckpt.join("checkpoint.safetensors");
    let t0 = Instant::now();
    while !file.exists() {
        assert!(t0.elapsed() < Duration::from_secs(300), "no checkpoint written");
        assert!(child.try_wait().unwrap().is_none(), "the run ended before its first checkpoint");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(!out.exists(), "the run finished before it was killed: the test proves nothing");

    ok(&[&args[..], &["--out", s(&out), "--resume", s(&ckpt)]].concat());
    assert_eq!(std::fs::read(&full).unwrap(), std::fs::read(&out).unwrap(), "resumed weights differ from the uninterrupted run");

    // Resuming with other settings is refused, naming the setting.
    let o = lora()
        .args(["pretrain", "--hidden1", "256", "--hidden2", "128", "--epochs", "3", "--seed", "12"])
        .args(["--out", s(&out), "--resume", s(&ckpt)])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("seed = 11") && err.contains("seed = 12"), "{err}");
}

#[test]
fn finetuning_resumed_from_a_checkpoint_writes_the_same_adapter() {
    let d = tempfile::tempdir().unwrap();
    let model = d.path().join("m.safetensors");
    ok(&["pretrain", "--hidden1", "48", "--hidden2", "24", "--batch-size", "300", "--out", s(&model)]);
    let ft = |out: &Path, extra: &[&str]| {
        ok(&[&["finetune", "--model", s(&model), "--digit", "3", "--steps", "40", "--rank", "2", "--alpha", "5", "--out", s(out)], extra]
            .concat());
    };
    let whole = d.path().join("whole");
    ft(&whole, &[]);
    // A run that checkpoints every 15 steps leaves its last checkpoint at step 30; resuming from it must
    // redo steps 31-40 exactly.
    let first = d.path().join("first");
    let ckpt = d.path().join("ft.ckpt");
    ft(&first, &["--checkpoint-every", "15", "--checkpoint-dir", s(&ckpt)]);
    let resumed = d.path().join("resumed");
    ft(&resumed, &["--resume", s(&ckpt)]);
    for dir in [&first, &resumed] {
        assert_eq!(
            std::fs::read(whole.join("adapter_model.safetensors")).unwrap(),
            std::fs::read(dir.join("adapter_model.safetensors")).unwrap(),
            "{} differs from the uninterrupted adapter",
            dir.display()
        );
    }
}
