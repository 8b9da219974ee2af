#!/usr/bin/env bash
# The fault suite's figures (docs/reliability.md): worker panics injected through the test-only hook
# (lora-serve's in-process route tests), then a real `lora serve` under 1,000 concurrent clients, with
# clients that stop reading, and stopped by SIGTERM with stalled streams (tests/serve_faults.rs). Every case
# is bounded to seconds and talks to loopback only. Prints one FAULTS line per case; the whole output goes
# to target/serve-faults.log.
#
#   scripts/serve-faults.sh
set -euo pipefail
cd "$(dirname "$0")/.."
log=target/serve-faults.log
mkdir -p target
if ! { cargo test --release -p lora-serve routes::tests -- --nocapture --test-threads 1 &&
  cargo test --release --test serve_faults -- --nocapture --test-threads 1; } >"$log" 2>&1; then
  cat "$log"
  exit 1
fi
grep -o 'FAULTS .*' "$log"
