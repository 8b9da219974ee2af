//! The MPI communicator under a real `mpirun`: this test binary launches itself as the ranks.
//!
//! Run by `.ci/run` as `LORA_MPIRUN="mpirun --allow-run-as-root --oversubscribe --mca btl self,vader --mca
//! oob_tcp_if_include lo" cargo test --release --features mpi --test mpi` (the launcher without
//! `-np`: the test adds it). Without the `mpi` feature, or without `LORA_MPIRUN`, it says by name that it
//! skipped. Under the launcher (a rank) it runs the checks; a failed check panics, the rank exits non-zero
//! and `mpirun` fails the run.

use std::io::Write;
use std::process::Command;

/// The launcher command line from `LORA_MPIRUN`, or why the test skips.
fn launcher() -> Result<Vec<String>, &'static str> {
    if !lora_dist::MPI_BUILT {
        return Err("built without the mpi feature");
    }
    match std::env::var("LORA_MPIRUN") {
        Ok(s) if !s.trim().is_empty() => Ok(s.split_whitespace().map(String::from).collect()),
        _ => Err("LORA_MPIRUN is not set (the launcher without -np, e.g. \"mpirun --oversubscribe\")"),
    }
}

/// Runs `name` (this file's test) as 2 and as 3 ranks of `LORA_MPIRUN` and checks that they all succeed;
/// a rank runs `check` instead.
fn as_ranks(name: &str, check: impl FnOnce()) {
    if lora_dist::launched(|k| std::env::var(k).ok()).is_some() {
        check();
        return;
    }
    let mpirun = match launcher() {
        Ok(l) => l,
        Err(why) => {
            // Straight to stderr, past the test harness's capture, so the skip shows in every run.
            let _ = writeln!(std::io::stderr(), "skipped {name}: {why}");
            return;
        }
    };
    let exe = std::env::current_exe().unwrap();
    for np in ["2", "3"] {
        let out = Command::new(&mpirun[0])
            .args(&mpirun[1..])
            .args(["-np", np])
            .arg(&exe)
            .args(["--exact", name, "--nocapture", "--test-threads", "1"])
            .output()
            .unwrap_or_else(|e| panic!("starting {}: {e}", mpirun[0]));
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{name} under {mpirun:?} -np {np} failed:\n{text}");
        let passed: Vec<&str> = text.lines().filter(|l| l.contains("checks passed")).collect();
        assert_eq!(passed.len().to_string(), np, "every rank must have run the check:\n{text}");
        let _ = writeln!(std::io::stderr(), "{name}: {}", passed.join("; "));
    }
}

#[cfg(feature = "mpi")]
fn world() -> lora_dist::World {
    lora_dist::World::init().expect("joining MPI")
}

#[test]
fn mpi_ranks_sum_in_rank_order_and_agree_bit_for_bit() {
    as_ranks("mpi_ranks_sum_in_rank_order_and_agree_bit_for_bit", || {
        #[cfg(feature = "mpi")]
        {
            let w = world();
            let g = w.group();
            let (r, n) = (g.rank(), g.size());
            assert!(n >= 2, "run with at least two ranks");
            assert_eq!(g.transport(), "mpi");
            // Rank 0 holds 1e8, rank 1 holds 1 + i, the last rank (from three ranks on) −1e8, the others 0:
            // in rank order (1e8 + 1) − 1e8 = 0 in f32 (1e8 + 1 rounds to 1e8), in another order 1. Several
            // lengths, so the chunks are ragged and some ranks get none (3 values over more ranks).
            let value = |q: usize, i: usize| match q {
                0 => 1e8f32,
                1 => 1.0 + i as f32,
                _ if q == n - 1 => -1e8,
                _ => 0.0,
            };
            for len in [1usize, 3, 1000, 100_003] {
                let mut x: Vec<f32> = (0..len).map(|i| value(r, i)).collect();
                g.all_reduce_sum(&mut x).unwrap();
                for (i, v) in x.iter().enumerate() {
                    let want = (1..n).fold(value(0, i), |s, q| s + value(q, i));
                    assert_eq!(v.to_bits(), want.to_bits(), "len {len}, value {i}: {v} vs {want}");
                }
            }
            let mut b = vec![r as u8; 5];
            g.broadcast(&mut b, n - 1).unwrap();
            assert_eq!(b, vec![(n - 1) as u8; 5]);
            g.agree("the settings", b"same everywhere").unwrap();
            let e = g.agree("the data", if r == 1 { b"mine" } else { b"ours" }).unwrap_err().to_string();
            assert!(e.contains("ranks disagree on the data: rank 1 differs from rank 0"), "{e}");
            g.barrier().unwrap();
            println!("\nrank {r} of {n}: checks passed");
        }
    });
}
