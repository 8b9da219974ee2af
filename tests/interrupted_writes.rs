//! Nothing half-written, whatever stops a run: a file-size limit hit while writing (`ulimit -f`, a full
//! disk) and SIGKILL at any moment of `lora lm finetune` leave the old file intact or no file, never a
//! partial one — an adapter or model folder holds all its files or none of this run's.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

fn lora() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lora"))
}

fn ok(dir: &Path, args: &[&str]) {
    let o = lora().args(args).current_dir(dir).output().unwrap();
    assert!(o.status.success(), "lora {}: {}", args.join(" "), String::from_utf8_lossy(&o.stderr));
}

/// `lora ARGS` under `ulimit -f BLOCKS` (the shell's file-size limit), from `dir`.
fn limited(dir: &Path, blocks: u32, args: &[&str]) -> std::process::Output {
    let cmd = format!("ulimit -f {blocks}; exec \"$0\" \"$@\"");
    Command::new("sh").arg("-c").arg(cmd).arg(env!("CARGO_BIN_EXE_lora")).args(args).current_dir(dir).output().unwrap()
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

#[test]
fn a_file_size_limit_hit_while_writing_leaves_the_old_file_or_none_and_no_temporary() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // An MNIST base of 210 KB replaced (by the same weights) under a 20-40 KB limit: the write fails, the
    // old file stays byte for byte.
    let mnist = concat!(env!("CARGO_MANIFEST_DIR"), "/data/mnist");
    let pre =
        ["pretrain", "--data", mnist, "--hidden1", "64", "--hidden2", "32", "--batch-size", "600", "--seed", "4", "--out", "m.safetensors"];
    ok(d, &pre);
    let before = std::fs::read(d.join("m.safetensors")).unwrap();
    let o = limited(d, 40, &pre);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("m.safetensors") && err.contains("too large"), "{err}");
    assert_eq!(std::fs::read(d.join("m.safetensors")).unwrap(), before, "the old file was damaged");

    // A language-model adapter (≈ 120 KB) into a new folder: no folder at all.
    std::fs::write(d.join("t.txt"), "SELECT name FROM users WHERE id = 1;\n".repeat(40)).unwrap();
    let shape = ["--hidden", "64", "--intermediate", "128", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--context", "32"];
    let train = ["--steps", "2", "--batch-size", "2", "--seq-len", "16"];
    ok(d, &[&["lm", "pretrain", "--out", "base", "--data", "t.txt"][..], &shape, &train].concat());
    let o =
        limited(d, 40, &[&["lm", "finetune", "--model", "base", "--data", "t.txt", "--out", "ad", "--rank", "16"][..], &train].concat());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("ad") && err.contains("too large"), "{err}");
    assert!(!d.join("ad").exists(), "a partial adapter folder was left");
    assert_eq!(names(d), ["base", "m.safetensors", "t.txt"], "temporary files or folders were left behind");
}

#[test]
fn sigkill_at_any_moment_of_a_fine_tune_leaves_a_whole_adapter_or_none() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::write(d.join("t.txt"), "function f(x) { return x * 2; }\n".repeat(60)).unwrap();
    let shape = ["--hidden", "128", "--intermediate", "256", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--context", "32"];
    ok(
        d,
        &[&["lm", "pretrain", "--out", "base", "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--data", "t.txt"][..], &shape]
            .concat(),
    );
    // A large adapter (rank 64 on every projection and lm_head, ≈ 1.3 MB) so the write takes a while.
    let args = |out: &str| {
        vec![
            "lm",
            "finetune",
            "--model",
            "base",
            "--data",
            "t.txt",
            "--steps",
            "3",
            "--batch-size",
            "2",
            "--seq-len",
            "16",
            "--rank",
            "64",
            "--target-modules",
            "all-linear",
            "--out",
            out,
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>()
    };
    let t0 = Instant::now();
    let o = lora().args(args("whole")).current_dir(d).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let full = t0.elapsed();
    let (mut whole, mut none) = (0, 0);
    // Kills spread over the run, densest near its end, where the adapter is written.
    for i in 0..16u32 {
        let at = full.mul_f64(0.3 + 0.05 * i as f64);
        let out = format!("k{i}");
        let mut child = lora().args(args(&out)).current_dir(d).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        std::thread::sleep(at);
        let _ = child.kill(); // SIGKILL (it may have finished already)
        child.wait().unwrap();
        let dir = d.join(&out);
        if !dir.exists() || names(&dir).is_empty() {
            none += 1;
            continue;
        }
        assert_eq!(names(&dir), ["adapter_config.json", "adapter_model.safetensors"], "killed at {at:?}: a partial adapter");
        let o = lora().args(["inspect", &out]).current_dir(d).output().unwrap();
        assert!(o.status.success(), "killed at {at:?}: the adapter does not read: {}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(
            std::fs::read(dir.join("adapter_model.safetensors")).unwrap(),
            std::fs::read(d.join("whole/adapter_model.safetensors")).unwrap(),
            "killed at {at:?}: the adapter differs from an uninterrupted run's"
        );
        whole += 1;
    }
    println!("16 kills: {none} left no adapter, {whole} a whole one (run {full:?}), none a partial one");
    assert!(none > 0, "no kill landed before the end: the test proves nothing ({whole} whole)");
}
