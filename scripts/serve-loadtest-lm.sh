#!/usr/bin/env bash
# The language-model half of scripts/serve-loadtest.sh, for comparing changes on a noisy host: one
# `lora serve`, 16 clients, one adapter and sixteen mixed alternately, ROUNDS rounds of SECONDS each. Uses the
# models scripts/serve-loadtest.sh trained into WORK for DTYPE (run that once first). Prints one line per
# run: which, tokens/s, errors, p50 and p99 ms. CHURN=1 adds the adapter-churning client (`--churn`) to every
# run.
#
#   scripts/serve-loadtest-lm.sh [ROUNDS] [SECONDS] [WORK] [DTYPE]     defaults: 2, 30, runs/serve-loadtest, f32
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-2}
seconds=${2:-30}
work=${3:-runs/serve-loadtest}
dtype=${4:-f32}
lm=$work/lm; [ "$dtype" = f32 ] || lm=$work/lm-$dtype
[ -f "$lm/base/config.json" ] || { echo "no models in $lm: run scripts/serve-loadtest.sh first" >&2; exit 2; }
cargo build --release --quiet
lora=./target/release/lora
port=18191
# --allow-adapter-updates: CHURN=1 loads and unloads adapters over HTTP.
$lora serve --model "$lm/base" --adapters "$lm/adapters" --addr "127.0.0.1:$port" --allow-adapter-updates >"$work/lm-ab-$dtype-server.log" 2>&1 &
pid=$!
trap 'kill -INT $pid 2>/dev/null; wait $pid || true' EXIT
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.2; done
all=$(seq -s, -f 'a%g' 0 15)
for r in $(seq 1 "$rounds"); do
  for which in one mixed; do
    models=a0; [ "$which" = mixed ] && models=$all
    json="$work/lm-ab-$dtype${CHURN:+-churn}-$which-$r.json"
    # shellcheck disable=SC2046
    $lora loadtest --addr "127.0.0.1:$port" --clients 16 --seconds "$seconds" --models "$models" $([ -n "${CHURN:-}" ] && echo --churn) \
      --json "$json" >/dev/null
    python3 -c "import json,sys; d=json.load(open(sys.argv[1])); l=d['latency_ms']; print(f\"{sys.argv[2]:5} {d['tokens_per_s']:9.0f} tokens/s  errors {d['errors']}  p50 {l['p50']:.1f} ms  p99 {l['p99']:.1f} ms  churn {d['churn_ops']} ({d['churn_errors']} failed)\")" "$json" "$which"
  done
done
