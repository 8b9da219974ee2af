#!/usr/bin/env bash
# The serving issue's load figures: one `lora serve` per model kind, 16 clients for SECONDS each,
# addressing one adapter, then 16 adapters mixed, each without and with adapters loading and unloading
# meanwhile (--churn). Prints each run's table; JSON goes to OUT/{lm,classifier}-{one,mixed}[-churn].json.
#
#   scripts/serve-loadtest.sh [SECONDS] [WORK] [DTYPE]     defaults: 30, runs/serve-loadtest, f32
#
# WORK keeps the models between runs: an LM base (`lora lm pretrain`, 300 steps, its weights written in
# DTYPE: f32, or bf16 as most Hugging Face checkpoints are) with 16 adapters (`lora lm finetune`, 20 steps,
# seeds 0-15, SQL and JavaScript alternately) in WORK/lm (WORK/lm-bf16 for bf16), and an MNIST base
# (`lora pretrain`) with 16 adapters (`lora finetune`, digits 0-9 and seeds).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-30}
work=${2:-runs/serve-loadtest}
dtype=${3:-f32}
lm=$work/lm; [ "$dtype" = f32 ] || lm=$work/lm-$dtype
mkdir -p "$work"
cargo build --release --quiet
lora=./target/release/lora
if [ ! -f "$lm/base/config.json" ]; then
  $lora lm pretrain --steps 300 --dtype "$dtype" --out "$lm/base" >/dev/null
fi
if [ ! -f "$work/mnist/base.safetensors" ]; then
  $lora pretrain --out "$work/mnist/base.safetensors" >/dev/null
fi
for i in $(seq 0 15); do
  corpus=sql; [ $((i % 2)) = 1 ] && corpus=js
  [ -f "$lm/adapters/a$i/adapter_config.json" ] ||
    $lora lm finetune --model "$lm/base" --data "data/code/$corpus.jsonl.gz" --steps 20 --seed "$i" --out "$lm/adapters/a$i" >/dev/null
  [ -f "$work/mnist/adapters/a$i/adapter_config.json" ] ||
    $lora finetune --model "$work/mnist/base.safetensors" --digit $((i % 10)) --seed "$i" --steps 50 --out "$work/mnist/adapters/a$i" >/dev/null
done
all=$(seq -s, -f 'a%g' 0 15)
run() { # kind model-path
  local kind=$1 port=$2
  # --allow-adapter-updates: the churn runs load and unload adapters over HTTP.
  $lora serve --model "$3" --adapters "$4" --addr "127.0.0.1:$port" --allow-adapter-updates >"$work/$kind-server.log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.2; done
  for churn in "" "--churn"; do
    for which in one mixed; do
      local models=a0; [ "$which" = mixed ] && models=$all
      echo "== $kind, $which adapter(s) ${churn:+with churn}, 16 clients, ${seconds} s"
      # shellcheck disable=SC2086
      $lora loadtest --addr "127.0.0.1:$port" --clients 16 --seconds "$seconds" --models "$models" $churn \
        --json "$work/$kind-$which${churn:+-churn}.json"
    done
  done
  kill -INT "$pid"; wait "$pid" || true
}
run "$(basename "$lm")" 18181 "$lm/base" "$lm/adapters"
run classifier 18182 "$work/mnist/base.safetensors" "$work/mnist/adapters"
python3 - "$work" "$(basename "$lm")" <<'PY'
import json, sys
w = sys.argv[1]
for kind, key in [(sys.argv[2], "tokens_per_s"), ("classifier", "images_per_s")]:
    for churn in ["", "-churn"]:
        one, mixed = (json.load(open(f"{w}/{kind}-{x}{churn}.json")) for x in ("one", "mixed"))
        print(f"{kind}{churn or ''}: {key} one adapter {one[key]:.1f}, 16 mixed {mixed[key]:.1f}, ratio {mixed[key] / one[key]:.3f}; "
              f"p50/p99 ms one {one['latency_ms']['p50']:.1f}/{one['latency_ms']['p99']:.1f}, mixed {mixed['latency_ms']['p50']:.1f}/{mixed['latency_ms']['p99']:.1f}; "
              f"errors {one['errors'] + mixed['errors']}, churn ops {one['churn_ops'] + mixed['churn_ops']} ({one['churn_errors'] + mixed['churn_errors']} failed)")
PY
