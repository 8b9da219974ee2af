#!/usr/bin/env bash
# Replays every command of the README and docs/, in order, as written, on a fresh clone: the ```sh blocks of
# README.md, docs/serving.md, docs/reliability.md, docs/chat.md (when present), docs/distributed.md (when
# present) and docs/benchmarks.md. `lora` is on the PATH (as after `cargo install --path .`); a `lora serve`
# line starts the server in the background and waits for /health (the one before it is stopped). Skipped,
# and said so: `bash .ci/run` (CI itself), the PyTorch peers when /tmp/torch-venv is missing, `cargo bench`
# unless REPLAY_BENCH=1, and a command run already (the same text again). Exits 1 if any command fails.
#
#   scripts/replay-docs.sh [WORK_DIR]      (default: a new temporary folder; the build reuses ./target)
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$(mktemp -d)}
git clone -q "$repo" "$work/lora-rs" || exit 1
cd "$work/lora-rs"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$repo/target}
cargo build --release -q || exit 1
export PATH="$CARGO_TARGET_DIR/release:$PATH"
server=""
stop_server() { [ -n "$server" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null; server=""; }
trap stop_server EXIT
ran=0; skipped=0; failed=0; seen=""
run() {
  local cmd=$1 key
  key=$(sed -E 's/[[:space:]]+#.*$//; s/[[:space:]]+/ /g' <<<"$cmd")
  case "$cmd" in
    "bash .ci/run"*) echo "skip  (CI itself) $key"; skipped=$((skipped + 1)); return ;;
    "cargo bench"*) [ -z "${REPLAY_BENCH:-}" ] && { echo "skip  (REPLAY_BENCH unset) $key"; skipped=$((skipped + 1)); return; } ;;
    *torch-venv*|*bench-vs-pytorch*|*bench-lm-vs-pytorch*)
      [ -x /tmp/torch-venv/bin/python ] || { echo "skip  (no /tmp/torch-venv) $key"; skipped=$((skipped + 1)); return; } ;;
  esac
  if grep -qxF -- "$key" <<<"$seen"; then echo "skip  (ran above) $key"; skipped=$((skipped + 1)); return; fi
  seen+="$key"$'\n'
  if [[ "$key" == "lora serve "* ]]; then
    stop_server
    bash -c "$cmd" >"$work/serve.log" 2>&1 &
    server=$!
    for _ in $(seq 600); do curl -sf localhost:8080/health >/dev/null && break; sleep 0.5; done
    if curl -sf localhost:8080/health >/dev/null; then echo "ok    (serving) $key"; ran=$((ran + 1)); else
      echo "FAIL  $key"; tail -5 "$work/serve.log"; failed=$((failed + 1)); fi
    return
  fi
  local t0=$SECONDS out
  if out=$(bash -c "set -o pipefail; $cmd" 2>&1); then
    echo "ok    ($((SECONDS - t0)) s) $key"; ran=$((ran + 1))
  else
    echo "FAIL  ($((SECONDS - t0)) s) $key"; tail -15 <<<"$out"; failed=$((failed + 1))
  fi
}
for doc in README.md docs/serving.md docs/reliability.md docs/chat.md docs/distributed.md docs/benchmarks.md; do
  [ -f "$doc" ] || continue
  echo "== $doc"
  cmd=""
  while IFS= read -r line; do
    cmd+="$line"
    if [[ "$line" == *\\ ]]; then cmd="${cmd%\\}"; continue; fi
    [ -n "${cmd// }" ] && run "$cmd"
    cmd=""
  done < <(awk '/^```sh/{p=1; next} /^```/{p=0} p' "$doc")
done
stop_server
echo "$ran ran, $skipped skipped, $failed failed (in $work/lora-rs)"
[ "$failed" -eq 0 ]
