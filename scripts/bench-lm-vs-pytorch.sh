#!/usr/bin/env bash
# Runs `lora lm bench` and the transformers + PEFT peer (scripts/pytorch_lm_workloads.py) alternately,
# RUNS times each, same threads, then prints every run and the median of each key with the ratio
# ours / theirs (time and memory: below 1 is better; tokens per second: above 1 is better).
#
#   scripts/bench-lm-vs-pytorch.sh [THREADS] [RUNS] [PEER] [PYTHON]
#   defaults: all cores; 3 runs; scripts/pytorch_lm_workloads.py; /tmp/torch-venv/bin/python
#   PyTorch once: python3 -m venv /tmp/torch-venv && /tmp/torch-venv/bin/pip install torch transformers peft numpy safetensors
# Extra flags for both sides (e.g. --quick) go in LM_BENCH_FLAGS.
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-$(nproc)}
runs=${2:-3}
peer=${3:-scripts/pytorch_lm_workloads.py}
python=${4:-/tmp/torch-venv/bin/python}
out=${BENCH_OUT:-runs/bench-lm}
mkdir -p "$out"
cargo build --release --quiet
for i in $(seq 1 "$runs"); do
  echo "run $i/$runs: lora lm bench (threads $threads)..." >&2
  # shellcheck disable=SC2086
  ./target/release/lora lm bench --threads "$threads" ${LM_BENCH_FLAGS:-} --json "$out/lora-$i.json" >/dev/null
  echo "run $i/$runs: transformers + PEFT (threads $threads)..." >&2
  # shellcheck disable=SC2086
  "$python" "$peer" --threads "$threads" ${LM_BENCH_FLAGS:-} | tail -n 1 >"$out/pytorch-$i.json"
done
"$python" - "$out" "$runs" <<'PY'
import json, statistics, sys
out, runs = sys.argv[1], int(sys.argv[2])
ours = [json.load(open(f"{out}/lora-{i}.json")) for i in range(1, runs + 1)]
theirs = [json.load(open(f"{out}/pytorch-{i}.json")) for i in range(1, runs + 1)]
keys = ["full_step_ms", "lora_step_ms", "eval_tokens_per_s", "generate_tokens_per_s", "generate_batch8_tokens_per_s", "peak_rss_mb"]
print(f"ours: {ours[0]['impl']}; theirs: {theirs[0]['impl']} (attention {theirs[0]['attn']}); threads {ours[0]['threads']} / {theirs[0]['threads']}")
for i, (o, t) in enumerate(zip(ours, theirs), 1):
    print(f"run {i}: " + ", ".join(f"{k} {o[k]} / {t[k]} = {o[k] / t[k]:.3f}" for k in keys))
print(f"{'key':<30} {'ours (median)':>14} {'theirs (median)':>16} {'ratio':>7}")
for k in keys:
    a, b = statistics.median(o[k] for o in ours), statistics.median(t[k] for t in theirs)
    print(f"{k:<30} {a:>14.1f} {b:>16.1f} {a / b:>7.3f}")
PY
