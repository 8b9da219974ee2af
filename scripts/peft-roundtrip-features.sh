#!/usr/bin/env bash
# Adapters lora-rs writes with each PEFT feature, loaded by Hugging Face PEFT itself: for every variant,
# `lora finetune` trains one on a small MNIST base, `lora eval --json` scores it, and
# scripts/peft_roundtrip.py loads it with PeftModel.from_pretrained and must find the same accuracy and the
# same wrong count for every digit on the 10,000 test images. Combinations (`lora merge --combination …
# --adapter-out`) are checked the same way.
#
# Needs the PEFT venv: python3 -m venv /tmp/torch-venv && /tmp/torch-venv/bin/pip install torch transformers peft numpy safetensors
# Usage: bash scripts/peft-roundtrip-features.sh [WORK_DIR]   (exit 0 when every case agrees)
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-runs/peft-roundtrip}
PY=${PYTHON:-/tmp/torch-venv/bin/python}
cargo build --release -q
L=target/release/lora
rm -rf "$W" && mkdir -p "$W"
$L pretrain --hidden1 64 --hidden2 32 --out "$W/base.safetensors" > /dev/null
fail=0
check() { # name: eval the adapter in $W/name with lora-rs, then with PEFT
  $L eval --model "$W/base.safetensors" --adapter "x=$W/$1" --json "$W/$1.json" > /dev/null
  if out=$("$PY" scripts/peft_roundtrip.py "$W/base.safetensors" "$W/$1" "$W/$1.json" 2>&1); then
    echo "ok    $1: $(echo "$out" | tail -1)"
  else
    echo "FAIL  $1:"; echo "$out" | tail -2; fail=1
  fi
}
ft() { # name, flags…
  local n=$1; shift
  $L finetune --model "$W/base.safetensors" --out "$W/$n" --steps 100 --rank 4 --alpha 8 "$@" > /dev/null
  check "$n"
}
ft plain
ft rslora --rslora --init kaiming
ft dora --use-dora --init kaiming
ft lora_bias --lora-bias --init random
ft pissa --init pissa
ft pissa_converted --init pissa --convert-to-lora
ft olora --init olora
ft bias_all --bias all --init kaiming
ft bias_lora_only --bias lora-only --target-modules linear1,linear2
ft modules_to_save --target-modules linear1,linear2 --modules-to-save linear3
ft d3 --digit 3
ft d5 --digit 5
for c in "cat" "linear" "svd --svd-rank 4" "svd --svd-clamp 0.9" "ties --density 0.5" "ties --density 0.5 --majority-sign frequency" \
  "dare_linear --density 0.7 --seed 3" "dare_ties --density 0.7 --seed 3" "magnitude_prune --density 0.5" \
  "ties_svd --density 0.5" "dare_linear_svd --density 0.7" "dare_ties_svd --density 0.7" "magnitude_prune_svd --density 0.5"; do
  n="combined-${c// /_}"
  $L merge --model "$W/base.safetensors" --adapter "$W/d3:0.7" --adapter "$W/d5:0.5" --combination $c \
    --adapter-out "$W/$n" --out "$W/$n.safetensors" > /dev/null
  check "$n"
done
exit $fail
