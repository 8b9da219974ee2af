//! Replays the kept fuzz corpus (`fuzz/corpus/<target>/`) and every crash the fuzzers ever found
//! (`fuzz/regressions/<target>/`) through the same harness the cargo-fuzz targets use, so a fixed bug
//! stays fixed without a fuzzer. Each input must be handled without a panic. The floors are the sizes of the
//! kept corpora after `cargo fuzz cmin` (2026-11-29: 357, 1049, 1330 and 1640 inputs, each adding coverage),
//! so a corpus lost or emptied by accident fails here instead of replaying nothing.

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
    assert!(replay("idx", harness::idx) >= 357);
}

#[test]
fn safetensors_model_corpus_and_crashes_are_handled() {
    assert!(replay("safetensors_model", harness::safetensors_model) >= 1049);
}

#[test]
fn adapter_config_corpus_and_crashes_are_handled() {
    assert!(replay("adapter_config", harness::adapter_config) >= 1330);
}

#[test]
fn adapter_files_corpus_and_crashes_are_handled() {
    assert!(replay("adapter_files", harness::adapter_files) >= 1640);
}
