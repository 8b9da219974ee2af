#!/usr/bin/env bash
# Runs `lora bench` and the PyTorch peer script back to back on the same machine and threads, then prints
# each key and the ratio lora-rs / PyTorch (below 1: lora-rs is faster or smaller).
#
#   scripts/bench-vs-pytorch.sh [THREADS] [PYTHON]      (defaults: all cores; /tmp/torch-venv/bin/python)
#   PyTorch once:  python3 -m venv /tmp/torch-venv && /tmp/torch-venv/bin/pip install torch numpy
# Extra flags for `lora bench` (e.g. --reference) go in LORA_BENCH_FLAGS.
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-$(nproc)}
python=${2:-/tmp/torch-venv/bin/python}
out=${BENCH_OUT:-runs/bench}
mkdir -p "$out"
cargo build --release --quiet
echo "lora bench (threads $threads)..." >&2
# shellcheck disable=SC2086
./target/release/lora bench --threads "$threads" --json "$out/lora.json" ${LORA_BENCH_FLAGS:-} >/dev/null
echo "PyTorch (threads $threads)..." >&2
"$python" scripts/pytorch_workloads.py data/mnist --threads "$threads" >"$out/pytorch.json"
"$python" - "$out/lora.json" "$out/pytorch.json" <<'PY'
import json, sys
ours, theirs = (json.load(open(p)) for p in sys.argv[1:3])
print(f"{'key':<18} {ours['impl']:>28} {theirs['impl']:>22} {'ratio':>7}")
for k in ("pretrain_epoch_s", "full_step_ms", "lora_step_ms", "eval_s", "peak_rss_mb"):
    print(f"{k:<18} {ours[k]:>28} {theirs[k]:>22} {ours[k] / theirs[k]:>7.3f}")
print(f"{'lora/full step':<18} {ours['lora_step_ms'] / ours['full_step_ms']:>28.3f} {theirs['lora_step_ms'] / theirs['full_step_ms']:>22.3f}")
print(f"threads: {ours['threads']} / {theirs['threads']}")
PY
