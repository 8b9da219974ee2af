//! `lora gpu` on a machine without a usable GPU (this one and CI's): it must fail at once, exit non-zero,
//! say what is missing, never panic, and write nothing; bad flags are refused naming the value. And the
//! prepared GPU script's dry run (scripts/gpu-check.sh --dry-run) lists every step within its time bound.
//! On a machine with a GPU, the tests that need its absence say by name that they skipped.

use std::process::{Command, Output};

fn lora(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lora")).args(args).current_dir(env!("CARGO_MANIFEST_DIR")).output().unwrap()
}

fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

/// Whether this machine has a usable CUDA device (then the no-GPU tests skip, saying so).
fn gpu_here(test: &str) -> bool {
    let o = lora(&["gpu", "info"]);
    if o.status.success() {
        eprintln!("skipped {test}: this machine has a CUDA device ({})", text(&o).0.lines().next().unwrap_or(""));
        return true;
    }
    false
}

#[test]
fn gpu_info_without_a_gpu_fails_at_once_naming_the_missing_driver_library_and_writes_nothing() {
    if gpu_here("gpu_info_without_a_gpu_fails_at_once_naming_the_missing_driver_library_and_writes_nothing") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("info.json");
    let o = lora(&["gpu", "info", "--device", "cuda:0", "--json", json.to_str().unwrap()]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // The library that is missing here is the driver's (no NVIDIA driver on this machine); where a driver
    // library exists but no device or a later library is missing, the message names that instead.
    let says_what = ["libcuda", "libnvrtc", "libcublas", "no CUDA device", "cuInit"].iter().any(|w| err.contains(w));
    assert!(err.starts_with("error: opening CUDA device 0: ") && says_what, "{err}");
    assert!(!json.exists(), "a failed gpu info wrote {}", json.display());
}

#[test]
fn gpu_check_without_a_gpu_fails_the_same_way_and_writes_no_report() {
    if gpu_here("gpu_check_without_a_gpu_fails_the_same_way_and_writes_no_report") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("check.json");
    let o = lora(&["gpu", "check", "--json", json.to_str().unwrap()]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.starts_with("error: opening CUDA device 0: ") && !err.contains("panicked"), "{err}");
    assert!(!json.exists());
}

#[test]
fn a_bad_device_is_refused_naming_the_value_and_cpu_is_refused_for_lora_gpu() {
    for bad in ["gpu0", "cuda:x", "cuda:-1"] {
        let o = lora(&["gpu", "info", "--device", bad]);
        let (_, err) = text(&o);
        assert_eq!(o.status.code(), Some(2), "{bad}: {err}");
        assert!(err.contains(&format!("device \"{bad}\"")) && err.contains("expected cpu, cuda or cuda:N"), "{bad}: {err}");
    }
    let o = lora(&["gpu", "info", "--device", "cpu"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("--device cpu: lora gpu needs a CUDA device"), "{err}");
}

#[test]
fn the_gpu_check_scripts_dry_run_lists_every_step_with_its_timeout_within_the_time_bound() {
    let o = Command::new("bash").arg("scripts/gpu-check.sh").arg("--dry-run").current_dir(env!("CARGO_MANIFEST_DIR")).output().unwrap();
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    let steps = [
        ("gpu-info", "gpu info --json $OUT/gpu-info.json"),
        ("gpu-check", "gpu check --json $OUT/gpu-check.json"),
        ("peer-lm", "python3 gpu-carry/pytorch_lm_gpu_workloads.py --shapes tiny,1b"),
        ("peer-mnist-best", "python3 gpu-carry/pytorch_gpu_best.py data/mnist"),
        ("peer-mnist", "python3 scripts/pytorch_workloads.py data/mnist --device cuda"),
    ];
    let mut total = 0;
    for (name, cmd) in steps {
        let line =
            out.lines().find(|l| l.trim_start().starts_with(&format!("{name} "))).unwrap_or_else(|| panic!("no step {name} in:\n{out}"));
        assert!(line.contains(cmd), "{line}");
        let t: u32 = line
            .split("timeout")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{line}"));
        total += t;
    }
    // The whole run must fit the GPU session's call with room to spare (about 5–6 minutes of steps).
    assert!(total <= 390, "{total} s of steps");
    assert!(out.contains(&format!("at most {total} s of steps")), "{out}");
    let o = Command::new("bash").arg("scripts/gpu-check.sh").arg("--bogus").current_dir(env!("CARGO_MANIFEST_DIR")).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).1.contains("usage: scripts/gpu-check.sh [--prepare | --dry-run]"));
}
