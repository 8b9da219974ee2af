//! The `lora` binary, run as a user would: small networks and few steps on the shipped MNIST.

use std::path::Path;
use std::process::Command;

fn lora(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_lora")).args(args).current_dir(env!("CARGO_MANIFEST_DIR")).output().unwrap()
}

fn demo(out: &Path) -> serde_json::Value {
    let o = lora(&[
        "demo",
        "--hidden1",
        "64",
        "--hidden2",
        "32",
        "--steps",
        "40",
        "--rank",
        "2",
        "--alpha",
        "4",
        "--seed",
        "3",
        "--out",
        out.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "demo failed: {stdout}\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains("Accuracy: ") && stdout.contains("Number 9 wrong count"), "{stdout}");
    serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap()
}

fn strip_times(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            // Timings and output paths differ between runs; every other number must not.
            m.retain(|k, v| k != "seconds" && !v.is_string());
            m.values_mut().for_each(strip_times);
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(strip_times),
        _ => {}
    }
}

#[test]
fn demo_report_has_the_promised_keys_and_is_reproducible() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = demo(&dir.path().join("a"));
    assert_eq!(a["data"]["train"], 60000);
    assert_eq!(a["data"]["test"], 10000);
    assert!((a["data"]["mean"].as_f64().unwrap() - 0.1307).abs() < 1e-4);
    assert_eq!(a["params"]["base"], 784 * 64 + 64 + 64 * 32 + 32 + 32 * 10 + 10);
    assert_eq!(a["params"]["lora"], 2 * (784 + 64) + 2 * (64 + 32) + 2 * (32 + 10));
    assert_eq!(a["params"]["layers"][0]["lora_A"], serde_json::json!([2, 784]));
    assert_eq!(a["base_unchanged"], true);
    assert_eq!(a["lora_off"]["wrong"], a["pretrain"]["wrong"]);
    assert_eq!(a["lora_off"]["accuracy"], a["pretrain"]["accuracy"]);
    let d = a["finetune"]["digit"].as_u64().unwrap() as usize;
    assert!(a["lora_on"]["wrong"][d].as_u64().unwrap() < a["pretrain"]["wrong"][d].as_u64().unwrap());
    assert!(dir.path().join("a/base.safetensors").is_file());
    let mut b = demo(&dir.path().join("b"));
    strip_times(&mut a);
    strip_times(&mut b);
    assert_eq!(a, b, "same seed, different numbers");
}

#[test]
fn eval_reads_the_model_the_demo_wrote_and_params_counts_the_seed_network() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m.safetensors");
    let o = lora(&["pretrain", "--hidden1", "32", "--hidden2", "16", "--out", model.to_str().unwrap(), "--batch-size", "600"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j = dir.path().join("e.json");
    let o = lora(&["eval", "--model", model.to_str().unwrap(), "--json", j.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let e: serde_json::Value = serde_json::from_slice(&std::fs::read(&j).unwrap()).unwrap();
    assert!(e["accuracy"].as_f64().unwrap() > 0.5);
    let o = lora(&["params"]);
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(s.contains("2,807,010") && s.contains("6,794") && s.contains("+0.242%"), "{s}");
}

#[test]
fn bad_flags_and_missing_files_fail_cleanly() {
    for args in [
        vec!["demo", "--rank", "0"],
        vec!["demo", "--digit", "11"],
        vec!["demo", "--epochs", "0"],
        vec!["demo", "--batch-size", "0"],
        vec!["eval", "--model", "/nonexistent/model.safetensors"],
        vec!["demo", "--data", "/nonexistent/mnist"],
    ] {
        let o = lora(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
        assert!(err.contains("error"), "{args:?}: {err}");
    }
    let o = lora(&["eval", "--model", "/nonexistent/model.safetensors"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent/model.safetensors"));
}

/// Runs `lora ARGS` with stdout read for one line and then closed (as `| head -1` does); returns the exit
/// status and stderr.
fn with_stdout_closed_after_one_line(args: &[&str]) -> (std::process::ExitStatus, String) {
    use std::io::{BufRead, Read};
    let mut child = Command::new(env!("CARGO_BIN_EXE_lora"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap(); // the reader is dropped: the pipe closes
    assert!(!line.is_empty(), "no first line");
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    (child.wait().unwrap(), err)
}

#[test]
fn a_closed_stdout_ends_the_demo_quietly_and_leaves_no_half_written_output_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    let args = ["demo", "--hidden1", "64", "--hidden2", "32", "--steps", "40", "--out", out.to_str().unwrap()];
    let (status, err) = with_stdout_closed_after_one_line(&args);
    assert!(status.success(), "exit {status:?}: {err}");
    assert!(!err.contains("panicked") && !err.contains("Broken pipe") && !err.contains("error"), "{err}");
    assert!(!out.exists(), "the unfinished run's folder was left behind");
}

#[test]
fn pretraining_never_replaces_a_base_with_different_weights_but_a_rerun_with_the_same_settings_passes() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m.safetensors");
    let pre = |seed: &str| {
        lora(&["pretrain", "--hidden1", "24", "--hidden2", "12", "--batch-size", "600", "--seed", seed, "--out", model.to_str().unwrap()])
    };
    assert!(pre("1").status.success());
    let first = std::fs::read(&model).unwrap();
    let again = pre("1");
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    assert_eq!(std::fs::read(&model).unwrap(), first, "the same settings give the same file");
    let other = pre("2");
    let err = String::from_utf8_lossy(&other.stderr);
    assert!(!other.status.success() && err.contains("already holds another model") && err.contains("m.safetensors"), "{err}");
    assert_eq!(std::fs::read(&model).unwrap(), first, "the refused run left the old base as it was");
}
