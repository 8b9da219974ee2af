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

# Language models: a small byte-level Llama, adapters with embedding LoRA, DoRA, lm_head in modules_to_save,
# PiSSA (PEFT's own form) and OLoRA (converted); per-token losses from `lora lm eval --token-losses` against
# transformers + PEFT (scripts/hf_lm_parity.py, relative 1e-4). PiSSA is scored on its own: PEFT rewrites the
# shared base when it loads a PiSSA adapter, so its base and other adapters would no longer be the original.
$L lm pretrain --out "$W/lm" --steps 30 --hidden 64 --intermediate 128 --layers 2 --heads 4 --kv-heads 2 --context 64 \
  --seq-len 64 --batch-size 8 > /dev/null
"$PY" -c "import gzip, json; rows = [json.loads(l) for l in gzip.open('data/code/sql.jsonl.gz')]; open('$W/sample.txt', 'w').write('\n'.join(r['text'] for r in rows[:6])[:3000])"
lmft() { # name, flags…
  local n=$1; shift
  $L lm finetune --model "$W/lm" --data data/code/sql.jsonl.gz --out "$W/lm-$n" --steps 20 --rank 4 --alpha 8 --seq-len 64 \
    --batch-size 4 "$@" > /dev/null
}
lmft embedding --target-modules embed_tokens,q_proj,v_proj --init kaiming
lmft dora --use-dora --init kaiming
lmft lm_head_saved --target-modules q_proj,v_proj --modules-to-save lm_head --init kaiming
lmft olora --init olora --convert-to-lora
lmft pissa --init pissa --target-modules all-linear
lmcheck() { # adapters (NAME=DIR …)
  local args=()
  for a in "$@"; do args+=(--adapter "$a"); done
  $L lm eval --model "$W/lm" "${args[@]}" --data "$W/sample.txt" --token-losses "$W/ours.json" > /dev/null
  if out=$("$PY" scripts/hf_lm_parity.py --model "$W/lm" "${args[@]}" --data "$W/sample.txt" --ours "$W/ours.json" 2>&1); then
    echo "ok    lm $*: $(echo "$out" | tail -1)"
  else
    echo "FAIL  lm $*:"; echo "$out" | tail -3; fail=1
  fi
}
lmcheck "embedding=$W/lm-embedding" "dora=$W/lm-dora" "lm_head_saved=$W/lm-lm_head_saved" "olora=$W/lm-olora"
# PiSSA alone: only its own column can agree (PEFT's "base" is then the residual base, see above).
$L lm eval --model "$W/lm" --adapter "pissa=$W/lm-pissa" --data "$W/sample.txt" --token-losses "$W/ours.json" > /dev/null
line=$("$PY" scripts/hf_lm_parity.py --model "$W/lm" --adapter "pissa=$W/lm-pissa" --data "$W/sample.txt" --ours "$W/ours.json" 2>&1 | grep -E '^ +pissa +max' || true)
if [[ -n "$line" && "$line" != *">"* ]]; then echo "ok    lm pissa:$line"; else echo "FAIL  lm pissa: $line"; fail=1; fi
exit $fail
