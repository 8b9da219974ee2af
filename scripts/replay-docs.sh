#!/usr/bin/env bash
# Replays every command of the README and docs/, in order, as written, on a fresh clone: the ```sh blocks of
# README.md, docs/serving.md, docs/reliability.md, docs/chat.md, docs/distributed.md and docs/benchmarks.md
# (a command may span lines: a trailing backslash, an open quote, a here-document). `lora` is on the PATH (as
# after `cargo install --path .`) and ./target is the build's; a `lora serve` line starts the server in the
# background and waits for /health (the one before it is stopped). Skipped, and said so: `bash .ci/run` (CI
# itself), package installs (`apt-get`), downloads from the Hugging Face hub and what works on what they
# download (no network here), runs across several machines (`--hostfile`), the PyTorch peers when
# /tmp/torch-venv is missing or REPLAY_SKIP_PEERS is set, `cargo bench` unless REPLAY_BENCH=1, and a command
# run already but `lora serve` (the same text again; `cargo run --release -- X` is `lora X`). Exits 1 if any command fails.
#
#   scripts/replay-docs.sh [WORK_DIR]      (default: a new temporary folder; the build reuses ./target)
#   REPLAY_DRY=1 lists the commands (and the skips) without running them; REPLAY_ONLY="docs/x.md …" replays
#   only those documents (in a WORK_DIR replayed before, whose outputs they may need).
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$(mktemp -d)}
if [ -d "$work/lora-rs" ]; then # a folder replayed before: its outputs stay, the code is this repo's HEAD
  git -C "$work/lora-rs" fetch -q "$repo" HEAD && git -C "$work/lora-rs" reset -q --hard FETCH_HEAD || exit 1
else
  git clone -q "$repo" "$work/lora-rs" || exit 1
fi
cd "$work/lora-rs"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$repo/target}
cargo build --release -q || exit 1
export PATH="$CARGO_TARGET_DIR/release:$PATH"
[ -e target ] || ln -s "$CARGO_TARGET_DIR" target # the docs' ./target/release/lora
# mpirun refuses root unless told (a container's usual user).
[ "$(id -u)" = 0 ] && export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
server=""
stop_server() { [ -n "$server" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null; server=""; }
trap stop_server EXIT
ran=0; skipped=0; failed=0; seen=""
run() {
  local cmd=$1 key
  key=$(tr '\n' ' ' <<<"$cmd" | sed -E 's/[[:space:]]+#[^'"'"'"]*$//; s/[[:space:]]+/ /g; s/ $//; s/^cargo run --release -- /lora /')
  skip() { echo "skip  ($1) $key"; skipped=$((skipped + 1)); }
  case "$cmd" in
    "bash .ci/run"*) skip "CI itself"; return ;;
    *apt-get\ install*) skip "installs packages"; return ;;
    *huggingface-cli\ download*|*models/smollm2*|*adapters/sql-chat*) skip "needs the hub, no network here"; return ;;
    *--hostfile*) skip "several machines"; return ;;
    "cargo bench"*) [ -z "${REPLAY_BENCH:-}" ] && { skip "REPLAY_BENCH unset"; return; } ;;
    *torch-venv*|*bench-vs-pytorch*|*bench-lm-vs-pytorch*)
      [ -x /tmp/torch-venv/bin/python ] || { skip "no /tmp/torch-venv"; return; }
      [ -n "${REPLAY_SKIP_PEERS:-}" ] && { skip "REPLAY_SKIP_PEERS set"; return; } ;;
  esac
  # A server is started again where a document starts it (another may have run in between).
  if [[ "$key" != "lora serve "* ]] && grep -qxF -- "$key" <<<"$seen"; then echo "skip  (ran above) $key"; skipped=$((skipped + 1)); return; fi
  seen+="$key"$'\n'
  [ -n "${REPLAY_DRY:-}" ] && { echo "would $key"; return; }
  if [[ "$key" == "lora serve "* ]]; then
    stop_server
    bash -c "$cmd" </dev/null >"$work/serve.log" 2>&1 &
    server=$!
    for _ in $(seq 600); do curl -sf localhost:8080/health >/dev/null && break; sleep 0.5; done
    if curl -sf localhost:8080/health >/dev/null; then echo "ok    (serving) $key"; ran=$((ran + 1)); else
      echo "FAIL  $key"; tail -5 "$work/serve.log"; failed=$((failed + 1)); fi
    return
  fi
  local t0=$SECONDS out
  # stdin is not the documents' (mpirun, for one, would read the commands after it); curl -s exits 0 on an HTTP
  # error, so an answer holding an OpenAI-shaped "error" fails it.
  if out=$(bash -c "set -o pipefail; $cmd" </dev/null 2>&1) && ! { [[ "$key" == curl* ]] && grep -q '"error"' <<<"$out"; }; then
    echo "ok    ($((SECONDS - t0)) s) $key"; ran=$((ran + 1))
  else
    echo "FAIL  ($((SECONDS - t0)) s) $key"; tail -15 <<<"$out"; failed=$((failed + 1))
  fi
}
here_re="<<-?'?([A-Za-z_]+)'?[[:space:]]*$"
for doc in ${REPLAY_ONLY:-README.md docs/serving.md docs/reliability.md docs/chat.md docs/distributed.md docs/benchmarks.md}; do
  [ -f "$doc" ] || continue
  echo "== $doc"
  cmd=""; heredoc=""
  while IFS= read -r line; do
    if [ -n "$heredoc" ]; then # inside a here-document: up to its delimiter line
      cmd+=$'\n'"$line"
      [ "$line" = "$heredoc" ] && { heredoc=""; run "$cmd"; cmd=""; }
      continue
    fi
    [ -z "$cmd" ] && [[ "$line" =~ ^[[:space:]]*(#|$) ]] && continue # a comment or blank line
    cmd+="${cmd:+$'\n'}$line"
    if [[ "$line" == *\\ ]]; then continue; fi
    if [[ "$line" =~ $here_re ]]; then heredoc=${BASH_REMATCH[1]}; continue; fi
    bash -n -c "$cmd" 2>/dev/null || continue # an open quote: the command goes on
    run "$cmd"
    cmd=""
  done < <(awk '/^```sh/{p=1; next} /^```/{p=0} p' "$doc")
  [ -n "$cmd" ] && { echo "FAIL  (unterminated) $cmd"; failed=$((failed + 1)); }
done
stop_server
echo "$ran ran, $skipped skipped, $failed failed (in $work/lora-rs)"
[ "$failed" -eq 0 ]
