//! Replays the kept fuzz corpus (`fuzz/corpus/<target>/`) and every crash the fuzzers ever found
//! (`fuzz/regressions/<target>/`) through the same harness the cargo-fuzz targets use, so a fixed bug
//! stays fixed without a fuzzer. Each input must be handled without a panic.

#[allow(dead_code)]
#[path = "../fuzz/harness.rs"]
mod harness;

use std::path::Path;

fn replay(target: &str, f: fn(&[u8])) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut n = 0;
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else { continue };
        for e in entries {
            let p = e.unwrap().path();
            let data = std::fs::read(&p).unwrap();
            if std::panic::catch_unwind(|| f(&data)).is_err() {
                panic!("{target}: input {} panics", p.display());
            }
            n += 1;
        }
    }
    n
}

#[test]
fn idx_corpus_and_crashes_are_handled() {
    assert!(replay("idx", harness::idx) >= 8);
}

#[test]
fn safetensors_model_corpus_and_crashes_are_handled() {
    assert!(replay("safetensors_model", harness::safetensors_model) >= 5);
}

#[test]
fn adapter_config_corpus_and_crashes_are_handled() {
    assert!(replay("adapter_config", harness::adapter_config) >= 2);
}

#[test]
fn adapter_files_corpus_and_crashes_are_handled() {
    assert!(replay("adapter_files", harness::adapter_files) >= 2);
}
