//! Data-parallel training through the real binary under a real `mpirun` (docs/distributed.md): two ranks
//! train the model one process trains (`lora lm pretrain`, `lora lm finetune`, `lora pretrain`, `lora
//! finetune`), rank 0 alone prints and writes, a failing or killed rank ends the run with nothing half
//! written, and a run checkpointed on two ranks resumes on one.
//!
//! `.ci/run` runs it as `LORA_MPIRUN="mpirun --allow-run-as-root --oversubscribe --mca btl self,vader --mca
//! oob_tcp_if_include lo" cargo test --release --features mpi --test mpi` (the launcher without `-np`: each
//! test adds `-np 2`, or its own per-rank command lines). Without the `mpi` feature or without
//! `LORA_MPIRUN` every test says by name that it skipped. The library tests (`crates/{train,lm}/tests/
//! distributed.rs`) check the same equivalences with ranks as threads in every `cargo test`.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output};

/// The launcher from `LORA_MPIRUN`, or `None` after saying by name why `test` skips.
fn launcher(test: &str) -> Option<Vec<String>> {
    let why = if !cfg!(feature = "mpi") {
        "the binary is built without the mpi feature"
    } else {
        match std::env::var("LORA_MPIRUN") {
            Ok(s) if !s.trim().is_empty() => return Some(s.split_whitespace().map(String::from).collect()),
            _ => "LORA_MPIRUN is not set (the launcher without -np, e.g. \"mpirun --oversubscribe\")",
        }
    };
    // Straight to stderr, past the harness's capture, so the skip shows in every run.
    let _ = writeln!(std::io::stderr(), "skipped {test}: {why}");
    None
}

const LORA: &str = env!("CARGO_BIN_EXE_lora");

fn run(dir: &Path, program: &str, args: &[String]) -> Output {
    Command::new(program).args(args).current_dir(dir).output().unwrap_or_else(|e| panic!("starting {program}: {e}"))
}

fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

/// `lora ARGS` as one process; asserts success.
fn one(dir: &Path, args: &[&str]) -> (String, String) {
    let o = run(dir, LORA, &args.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    let t = text(&o);
    assert!(o.status.success(), "lora {}: failed\n{}\n{}", args.join(" "), t.0, t.1);
    t
}

/// `mpirun -np 2 lora ARGS`; asserts success.
fn two(mpirun: &[String], dir: &Path, args: &[&str]) -> (String, String) {
    let mut a: Vec<String> = mpirun[1..].to_vec();
    a.extend(["-np", "2", LORA].map(String::from));
    a.extend(args.iter().map(|s| s.to_string()));
    let o = run(dir, &mpirun[0], &a);
    let t = text(&o);
    assert!(o.status.success(), "{}: failed\n{}\n{}", a.join(" "), t.0, t.1);
    assert!(t.1.contains("data-parallel: 2 ranks over mpi"), "rank 0 sums the run up: {}", t.1);
    t
}

/// Every f32 tensor of a safetensors file, by name.
fn tensors(path: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Each tensor within 1e-4 of its scale (its largest |value|, at least 1e-3). The ranks sum a weight's
/// gradient in two parts added in rank order where one process sums it whole: f32 rounding of ≈ 1e-7 per
/// step, which Adam (dividing by √v̂) and a few dozen steps compound (measured up to 1.6e-5, after the 31
/// steps of MNIST pre-training); a wrong reduction moves weights by ≈ lr per step, ≥ 1e-2 of their scale.
fn close(what: &str, got: &Path, want: &Path) {
    let (g, w) = (tensors(got), tensors(want));
    assert_eq!(g.iter().map(|t| &t.0).collect::<Vec<_>>(), w.iter().map(|t| &t.0).collect::<Vec<_>>(), "{what}: tensor names");
    let mut worst = 0f32;
    for ((n, a), (_, b)) in g.iter().zip(&w) {
        let scale = b.iter().fold(1e-3f32, |s, x| s.max(x.abs()));
        for (x, y) in a.iter().zip(b) {
            let d = (x - y).abs() / scale;
            worst = worst.max(d);
            assert!(d <= 1e-4, "{what}: {n}: {x} vs {y} (scale {scale})");
        }
    }
    let _ = writeln!(std::io::stderr(), "{what}: largest difference {worst:.2e} of a tensor's scale");
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A one-layer model small enough to train in a test.
const SHAPE: [&str; 12] = ["--hidden", "16", "--intermediate", "24", "--layers", "1", "--heads", "2", "--kv-heads", "1", "--context", "32"];

#[test]
fn mpi_two_ranks_pre_train_and_fine_tune_the_language_model_one_process_does() {
    let Some(mpirun) = launcher("mpi_two_ranks_pre_train_and_fine_tune_the_language_model_one_process_does") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::write(d.join("sql.txt"), "SELECT name FROM users WHERE id = 1;\n".repeat(40)).unwrap();
    std::fs::write(d.join("js.txt"), "function f(x) { return x * 2; }\n".repeat(40)).unwrap();
    // Batches of 3 sequences: rank 0 takes 2, rank 1 one.
    let train = ["--steps", "8", "--batch-size", "3", "--seq-len", "16"];
    for who in ["one", "two"] {
        let out = format!("{who}-base");
        let json = format!("{who}-pre.json");
        let mut args = vec!["lm", "pretrain", "--out", &out, "--data", "sql.txt:1", "--data", "js.txt:3", "--json", &json];
        args.extend(SHAPE);
        args.extend(train);
        let (stdout, _) = if who == "one" { one(d, &args) } else { two(&mpirun, d, &args) };
        assert_eq!(stdout.matches("Pre-training a ").count(), 1, "rank 0 alone prints: {stdout}");
    }
    close("lm pretrain", &d.join("two-base/model.safetensors"), &d.join("one-base/model.safetensors"));
    let (a, b) = (json(&d.join("two-pre.json")), json(&d.join("one-pre.json")));
    let (la, lb) = (a["final_loss"].as_f64().unwrap(), b["final_loss"].as_f64().unwrap());
    assert!((la - lb).abs() <= 1e-5 * lb, "final loss {la} vs {lb}");
    assert_eq!(a["tokens"], b["tokens"], "the ranks together saw the one process's tokens");

    // Both adapters on the one process's base, with adapter dropout (each rank draws its rows' masks).
    for who in ["one", "two"] {
        let out = format!("{who}-sql");
        let json = format!("{who}-ft.json");
        let mut args = vec!["lm", "finetune", "--model", "one-base", "--data", "sql.txt", "--out", &out, "--json", &json];
        args.extend(["--rank", "2", "--alpha", "4", "--lr", "1e-2", "--dropout", "0.1"]);
        args.extend(train);
        let (stdout, _) = if who == "one" { one(d, &args) } else { two(&mpirun, d, &args) };
        assert_eq!(stdout.matches("base weights bit-for-bit unchanged: true").count(), 1, "{stdout}");
    }
    close("lm finetune", &d.join("two-sql/adapter_model.safetensors"), &d.join("one-sql/adapter_model.safetensors"));
}

#[test]
fn mpi_two_ranks_pre_train_and_fine_tune_the_mnist_network_one_process_does() {
    let Some(mpirun) = launcher("mpi_two_ranks_pre_train_and_fine_tune_the_mnist_network_one_process_does") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let mnist = concat!(env!("CARGO_MANIFEST_DIR"), "/data/mnist");
    // 60,000 images in batches of 1,999: 31 steps, the last of 29 images (15 + 14 on the two ranks).
    for who in ["one", "two"] {
        let out = format!("{who}.safetensors");
        let args = ["pretrain", "--data", mnist, "--hidden1", "32", "--hidden2", "16", "--batch-size", "1999", "--out", &out];
        let (stdout, _) = if who == "one" { one(d, &args) } else { two(&mpirun, d, &args) };
        assert_eq!(stdout.matches("Pre-trained network on the test set").count(), 1, "rank 0 alone evaluates and prints: {stdout}");
    }
    close("pretrain", &d.join("two.safetensors"), &d.join("one.safetensors"));
    for who in ["one", "two"] {
        let out = format!("{who}-ad");
        let args = [
            "finetune",
            "--data",
            mnist,
            "--model",
            "one.safetensors",
            "--digit",
            "3",
            "--rank",
            "2",
            "--dropout",
            "0.1",
            "--steps",
            "12",
            "--batch-size",
            "15",
            "--out",
            &out,
        ];
        if who == "one" {
            one(d, &args);
        } else {
            two(&mpirun, d, &args);
        }
    }
    close("finetune", &d.join("two-ad/adapter_model.safetensors"), &d.join("one-ad/adapter_model.safetensors"));
}

/// The launcher's arguments for one command line per rank (`-np 1 A : -np 1 B`).
fn per_rank(mpirun: &[String], ranks: &[Vec<String>]) -> Vec<String> {
    let mut a: Vec<String> = mpirun[1..].to_vec();
    for (i, r) in ranks.iter().enumerate() {
        if i > 0 {
            a.push(":".into());
        }
        a.extend(["-np".to_string(), "1".to_string()]);
        a.extend(r.iter().cloned());
    }
    a
}

#[test]
fn mpi_a_rank_that_fails_ends_every_rank_naming_it_and_nothing_is_written() {
    let Some(mpirun) = launcher("mpi_a_rank_that_fails_ends_every_rank_naming_it_and_nothing_is_written") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::write(d.join("sql.txt"), "SELECT 1;\n".repeat(40)).unwrap();
    let args = |data: &str| -> Vec<String> {
        let mut a: Vec<String> =
            [LORA, "lm", "pretrain", "--out", "base", "--steps", "50", "--batch-size", "2", "--seq-len", "16", "--data"]
                .map(String::from)
                .to_vec();
        a.push(data.into());
        a.extend(SHAPE.map(String::from));
        a
    };
    // Rank 1's machine lacks the data file (here: another path).
    let o = run(d, &mpirun[0], &per_rank(&mpirun, &[args("sql.txt"), args("missing.txt")]));
    let (out, err) = text(&o);
    assert!(!o.status.success(), "{out}\n{err}");
    assert!(err.contains("error: rank 1 of 2: ") && err.contains("missing.txt"), "{err}");
    assert!(!d.join("base").exists(), "nothing written");
    // The ranks hold different data (rank 1 another corpus): refused before the first step, naming rank 1.
    std::fs::write(d.join("other.txt"), "SELECT 2;\n".repeat(41)).unwrap();
    let o = run(d, &mpirun[0], &per_rank(&mpirun, &[args("sql.txt"), args("other.txt")]));
    let (out, err) = text(&o);
    assert!(!o.status.success(), "{out}\n{err}");
    assert!(err.contains("ranks disagree on the training data: rank 1 differs from rank 0 (2 ranks)"), "{err}");
    assert!(!d.join("base").exists(), "nothing written");
    // Commands that do not train refuse to run on several ranks.
    let mut a: Vec<String> = mpirun[1..].to_vec();
    a.extend(["-np", "2", LORA, "params"].map(String::from));
    let o = run(d, &mpirun[0], &a);
    let (_, err) = text(&o);
    assert!(
        !o.status.success() && err.contains("only `lora pretrain`, `lora finetune`, `lora lm pretrain` and `lora lm finetune`"),
        "{err}"
    );
}

#[test]
fn mpi_a_killed_rank_ends_the_run_and_one_process_resumes_its_checkpoint() {
    let Some(mpirun) = launcher("mpi_a_killed_rank_ends_the_run_and_one_process_resumes_its_checkpoint") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::write(d.join("sql.txt"), "SELECT name FROM users WHERE id = 1;\n".repeat(40)).unwrap();
    let mut args: Vec<String> =
        ["lm", "pretrain", "--out", "base", "--data", "sql.txt", "--steps", "400", "--batch-size", "4", "--seq-len", "16", "--seed", "2"]
            .map(String::from)
            .to_vec();
    args.extend(SHAPE.map(String::from));
    let ck = ["--checkpoint-every", "5", "--checkpoint", "run.ckpt"].map(String::from);
    let mut rank0 = vec![LORA.to_string()];
    rank0.extend(args.iter().cloned());
    rank0.extend(ck.iter().cloned());
    // Rank 1 is SIGKILLed as soon as rank 0 has written the first checkpoint.
    let script =
        "\"$@\" & p=$!; while [ ! -e run.ckpt ]; do kill -0 $p 2>/dev/null || exit 3; sleep 0.02; done; kill -9 $p; wait $p".to_string();
    let mut rank1 = vec!["sh".to_string(), "-c".to_string(), script, "rank1".to_string(), LORA.to_string()];
    rank1.extend(args.iter().cloned());
    rank1.extend(ck.iter().cloned());
    let o = run(d, &mpirun[0], &per_rank(&mpirun, &[rank0, rank1]));
    let (out, err) = text(&o);
    assert!(!o.status.success(), "{out}\n{err}");
    // Open MPI names the rank as "process rank 1 … exited on signal 9" or as process "[[job,1],1]", exit code 137.
    assert!(err.contains("process rank 1") || err.contains(",1],1]"), "mpirun names the rank: {err}");
    assert!(!d.join("base").exists(), "no model written");
    assert!(d.join("run.ckpt").is_file(), "the checkpoint outlives the run");
    // One process resumes the two ranks' checkpoint and ends where one process running straight through ends.
    let mut resume: Vec<&str> = args.iter().map(String::as_str).collect();
    resume.extend(["--resume", "run.ckpt"]);
    one(d, &resume);
    let mut straight: Vec<&str> = args.iter().map(String::as_str).collect();
    straight[3] = "straight";
    one(d, &straight);
    close("killed on 2 ranks, resumed on 1", &d.join("base/model.safetensors"), &d.join("straight/model.safetensors"));
}
