#!/usr/bin/env bash
# Runs every cargo-fuzz target for SECONDS each (default 600), one after another, with the kept corpus as
# seeds and a scratch corpus for new inputs. Crashes land in fuzz/artifacts/<target>/: copy them to
# fuzz/regressions/<target>/ so tests/fuzz_regressions.rs replays them forever. To keep what a run found,
# merge the scratch corpus into the kept one (only inputs with new coverage are added):
#   RUSTC_BOOTSTRAP=1 cargo fuzz run -O TARGET corpus/TARGET /tmp/lora-fuzz-corpus/TARGET -- -merge=1 -max_len=16384
# To shrink the kept corpus to the inputs that each add coverage (then set the floors in
# tests/fuzz_regressions.rs to the new counts):
#   cargo +nightly fuzz cmin -O TARGET corpus/TARGET -- -rss_limit_mb=4096 -max_len=65536
# cargo-fuzz needs nightly rustc flags; RUSTC_BOOTSTRAP=1 lets the stable toolchain accept them.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${1:-600}
scratch=${FUZZ_SCRATCH:-/tmp/lora-fuzz-corpus}
export RUSTC_BOOTSTRAP=1
cargo fuzz build -O
for t in idx safetensors_model adapter_config adapter_files; do
  mkdir -p "$scratch/$t"
  echo "== $t: ${secs}s"
  cargo fuzz run -O "$t" "$scratch/$t" "corpus/$t" -- -max_total_time="$secs" -rss_limit_mb=4096 -max_len=65536 2>&1 | grep -E "^#[0-9]+.*(DONE|pulse)|Done|ERROR|SUMMARY|crash-" | tail -3
done
