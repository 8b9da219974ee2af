#!/usr/bin/env bash
# The one prepared GPU check (docs/gpu.md): everything the first run on an NVIDIA GPU should tell, in one
# call of the device tool, bounded by timeouts (at most 375 s of steps), every step's failure recorded and
# none fatal to the rest.
#
#   scripts/gpu-check.sh --prepare   HERE (a machine with cargo): builds the release binary, puts it (stripped,
#                                    gzipped) and the GPU peer scripts from ../shared/bench/ into gpu-carry/
#                                    (git-ignored), and prints the device command to run.
#   scripts/gpu-check.sh             ON THE GPU MACHINE, from the repository root, gpu-carry carried: writes
#                                    under $OUT (8 files, flat):
#       summary.json     every step: command, exit code, seconds, timed out or not, its last stdout and stderr lines;
#                        the machine (nvidia-smi, the CUDA libraries found, the binary's shared libraries)
#       gpu-info.json    lora gpu info --json            gpu-check.json   lora gpu check --json
#       <step>.log       each step's stdout and stderr (5 files)
#   scripts/gpu-check.sh --dry-run   prints the steps, their timeouts and commands, runs nothing.
set -uo pipefail
cd "$(dirname "$0")/.."

CARRY=gpu-carry
BIN=/tmp/lora-gpu-check
# name | timeout (s) | command
STEPS=(
  "gpu-info|45|$BIN gpu info --json \$OUT/gpu-info.json"
  "gpu-check|120|$BIN gpu check --json \$OUT/gpu-check.json --reps 10"
  "peer-lm|120|python3 $CARRY/pytorch_lm_gpu_workloads.py --shapes tiny,1b"
  "peer-mnist-best|45|python3 $CARRY/pytorch_gpu_best.py data/mnist"
  "peer-mnist|45|python3 scripts/pytorch_workloads.py data/mnist --device cuda"
)
# The CUDA libraries lora-cuda loads, and where a CUDA image keeps them when the loader does not know them.
LIBS=(libcuda.so.1 libnvrtc.so.13 libcublas.so.13 libcublasLt.so.13)
LIB_DIRS=(/usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda-13.0/lib64 /usr/lib/x86_64-linux-gnu)

usage() {
  echo "usage: scripts/gpu-check.sh [--prepare | --dry-run]" >&2
  exit 2
}

prepare() {
  set -e
  for f in ../shared/bench/pytorch_lm_gpu_workloads.py ../shared/bench/pytorch_gpu_best.py; do
    [ -f "$f" ] || { echo "gpu-check --prepare: $f is missing (the GPU peer scripts live in ../shared/bench/)" >&2; exit 1; }
  done
  cargo build --release --bin lora
  mkdir -p "$CARRY"
  strip -o "$CARRY/lora" target/release/lora
  gzip -9 -f "$CARRY/lora"
  cp ../shared/bench/pytorch_lm_gpu_workloads.py ../shared/bench/pytorch_gpu_best.py "$CARRY/"
  local tracked carry
  tracked=$(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1)
  carry=$(du -cb "$CARRY" | tail -1 | cut -f1)
  echo "gpu-carry/: $(ls "$CARRY" | tr '\n' ' ')($((carry / 1048576)) MiB); with the tracked files $(((tracked + carry) / 1048576)) MiB travel (the limit is 64 MiB)"
  if [ $((tracked + carry)) -gt $((60 * 1048576)) ]; then
    echo "gpu-check --prepare: over 60 MiB would travel: leave something out" >&2
    exit 1
  fi
  echo "next, in the GPU session: the device tool's run with carry [\"gpu-carry\"], timeout_s 420, command:"
  echo "  bash scripts/gpu-check.sh"
}

# Adds to LD_LIBRARY_PATH the folder of each CUDA library the loader does not already find: the known
# folders, then the nvidia-* Python packages' (pip's nvidia-cuda-nvrtc, nvidia-cublas).
find_libs() {
  local dirs=("${LIB_DIRS[@]}")
  local py
  py=$(python3 -c 'import nvidia, sys; print("\n".join(p for p in nvidia.__path__))' 2>/dev/null || true)
  for p in $py; do
    for d in "$p"/*/lib; do [ -d "$d" ] && dirs+=("$d"); done
  done
  for lib in "${LIBS[@]}"; do
    if ldconfig -p 2>/dev/null | grep -q " $lib "; then
      echo "$lib: known to the loader"
      continue
    fi
    local found=""
    for d in "${dirs[@]}"; do
      if [ -e "$d/$lib" ]; then found=$d; break; fi
    done
    if [ -n "$found" ]; then
      export LD_LIBRARY_PATH="$found${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
      echo "$lib: $found (added to LD_LIBRARY_PATH)"
    else
      echo "$lib: NOT FOUND in the loader's cache or ${dirs[*]}"
    fi
  done
}

dry_run() {
  echo "gpu-check: would unpack $CARRY/lora.gz to $BIN, look for ${LIBS[*]} (the loader's cache, then ${LIB_DIRS[*]} and the nvidia-* Python packages' lib folders), then run, each bounded by its timeout:"
  local total=0
  for s in "${STEPS[@]}"; do
    IFS='|' read -r name t cmd <<<"$s"
    total=$((total + t))
    printf '  %-16s timeout %3s s  %s\n' "$name" "$t" "$cmd"
  done
  echo "at most $total s of steps; outputs under \$OUT: summary.json, gpu-info.json, gpu-check.json, and one <step>.log per step"
}

run_all() {
  if [ -z "${OUT:-}" ]; then
    echo "gpu-check: \$OUT is not set (the device tool sets it); writing to runs/gpu-check" >&2
    OUT=runs/gpu-check
  fi
  mkdir -p "$OUT"
  export OUT PYTHONUNBUFFERED=1
  local records="$OUT/.records.tsv"
  : >"$records"
  local env_log
  env_log=$(mktemp)
  {
    echo "== machine"; uname -a; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.sm --format=csv 2>&1 | head -5
    echo "== libraries"; find_libs
    echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
    echo "== binary"
    if [ -f "$CARRY/lora.gz" ]; then gunzip -c "$CARRY/lora.gz" >"$BIN" && chmod +x "$BIN" && ldd "$BIN" 2>&1; else echo "$CARRY/lora.gz is missing: run scripts/gpu-check.sh --prepare first (and carry gpu-carry)"; fi
  } >"$env_log" 2>&1  # a group, not a subshell: find_libs' LD_LIBRARY_PATH holds for the steps
  for s in "${STEPS[@]}"; do
    IFS='|' read -r name t cmd <<<"$s"
    local out_file t0 rc last last_err
    out_file=$(mktemp)
    t0=$(date +%s%N)
    echo "== $name (timeout $t s): $cmd" >&2
    timeout --kill-after=5 "$t" bash -c "$cmd" >"$out_file" 2>"$OUT/$name.log.err"
    rc=$?
    cat "$out_file" "$OUT/$name.log.err" >"$OUT/$name.log"
    last=$(grep -v '^[[:space:]]*$' "$out_file" | tail -1 | tr '\t' ' ')
    last_err=$(grep -v '^[[:space:]]*$' "$OUT/$name.log.err" | tail -1 | tr '\t' ' ')
    rm -f "$OUT/$name.log.err"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( ($(date +%s%N) - t0) / 1000000 ))" "$t" "$cmd" "$last" "$last_err" >>"$records"
    echo "   exit $rc" >&2
    rm -f "$out_file"
  done
  python3 - "$OUT" "$records" "$env_log" <<'PY' || { echo "gpu-check: python3 could not write summary.json; the records:" >&2; cat "$records" >&2; }
import json, sys
out, records, env = sys.argv[1], sys.argv[2], sys.argv[3]
steps = []
for line in open(records):
    name, rc, secs, timeout, cmd, last, last_err = (line.rstrip("\n").split("\t") + [""] * 7)[:7]
    rc = int(rc)
    steps.append({"step": name, "command": cmd, "exit": rc, "timed_out": rc in (124, 137), "seconds": round(int(secs or 0) / 1000, 1),
                  "timeout_s": int(timeout), "last_stdout_line": last, "last_stderr_line": last_err, "ok": rc == 0})
json.dump({"steps": steps, "all_ok": all(s["ok"] for s in steps), "environment": open(env).read()}, open(f"{out}/summary.json", "w"), indent=2)
print(json.dumps({s["step"]: s["exit"] for s in steps}))
PY
  rm -f "$records" "$env_log"
}

case "${1:-}" in
  --prepare) prepare ;;
  --dry-run) dry_run ;;
  "") run_all ;;
  *) usage ;;
esac
