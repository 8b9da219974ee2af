#!/usr/bin/env bash
# The figures of docs/distributed.md. `lora lm finetune` and `lora lm pretrain` at the demo's shapes (a 3.28 M
# parameter Llama, batches of 16 × 256 bytes; rank-8 adapters on every projection: 155,648 numbers), each as
# 1 process × 2 threads and as 2 ranks × 1 thread under mpirun, alternating, ROUNDS rounds of STEPS steps:
# the step time (training seconds / steps, from --json), and per step the time in the all-reduce and the
# time rank 0 waited for rank 1 before it (rank 0's "data-parallel:" line). Then the all-reduce's cost by
# buffer size (examples/allreduce.rs), and one process's step time at batches of 2 and 1 (a machine's share
# of a batch of 16 over 8 or more machines).
#
#   scripts/dist-bench.sh               # STEPS=20 ROUNDS=3 by default
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-20}
ROUNDS=${ROUNDS:-3}
cargo build --release --features mpi -q
cargo build --release -p lora-dist --features mpi --example allreduce -q
LORA=target/release/lora
MPI=(mpirun --allow-run-as-root --oversubscribe --mca btl self,vader --mca oob_tcp_if_include lo)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
"$LORA" lm pretrain --steps 30 --out "$out/base" >/dev/null 2>&1
field() { python3 -c "import json,sys; j=json.load(open(sys.argv[1])); print(j['seconds'] / j['steps'])" "$1"; }
for round in $(seq "$ROUNDS"); do
  for what in finetune pretrain; do
    for how in one two; do
      name="$out/$what-$how-$round"
      if [ "$what" = finetune ]; then
        args=(lm finetune --model "$out/base" --data data/code/sql.jsonl.gz --steps "$STEPS" --out "$name" --json "$name.json")
      else
        args=(lm pretrain --steps "$STEPS" --out "$name" --json "$name.json")
      fi
      if [ "$how" = one ]; then
        RAYON_NUM_THREADS=2 "$LORA" "${args[@]}" >/dev/null 2>"$name.err"
        echo "round $round lm $what, 1 process x 2 threads: $(field "$name.json" | awk '{printf "%.1f ms", $1 * 1000}') per step"
      else
        "${MPI[@]}" -np 2 -x RAYON_NUM_THREADS=1 "$LORA" "${args[@]}" >/dev/null 2>"$name.err"
        reduce=$(grep -o '[0-9.]* ms per step in the all-reduce' "$name.err" | cut -d' ' -f1)
        wait=$(grep -o '[0-9.]* ms per step waiting' "$name.err" | cut -d' ' -f1)
        echo "round $round lm $what, 2 ranks x 1 thread:  $(field "$name.json" | awk '{printf "%.1f ms", $1 * 1000}') per step; all-reduce ${reduce:-?} ms, waiting for the other rank ${wait:-?} ms per step"
      fi
    done
  done
done
# One machine's share of a global batch of 16 spread over 8 (2 sequences) or 16+ machines (1 sequence): the
# step time of 1 process x 2 threads at those batch sizes, for the scaling estimate.
for b in 2 1; do
  for what in finetune pretrain; do
    name="$out/$what-batch-$b"
    if [ "$what" = finetune ]; then
      args=(lm finetune --model "$out/base" --data data/code/sql.jsonl.gz --steps "$STEPS" --batch-size "$b" --out "$name" --json "$name.json")
    else
      args=(lm pretrain --steps "$STEPS" --batch-size "$b" --out "$name" --json "$name.json")
    fi
    RAYON_NUM_THREADS=2 "$LORA" "${args[@]}" >/dev/null 2>&1
    echo "lm $what, batch $b, 1 process x 2 threads: $(field "$name.json" | awk '{printf "%.1f ms", $1 * 1000}') per step"
  done
done
"${MPI[@]}" -np 2 target/release/examples/allreduce
