#!/usr/bin/env bash
# Replays the bad-input matrix (tests/bad_input.rs generates it) through the release binary and checks,
# for every case: exit code != 0, no "panicked" and no backtrace on stderr, and the expected file/field/value
# named in the message. Prints one line per case and a summary; exits 1 if any case misbehaves.
set -uo pipefail
cd "$(dirname "$0")/.."
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cargo build --release -q
LORA_BAD_INPUT_DIR="$dir" cargo test --release -q --test bad_input >/dev/null 2>&1 || true
[ -f "$dir/cases.tsv" ] || { echo "no cases.tsv generated" >&2; exit 1; }
bin="$PWD/target/release/lora"
pass=0; fail=0
while IFS=$'\t' read -r name expect args; do
  IFS=$'\t' read -r -a argv <<<"$args"
  err=$(cd "$dir" && "$bin" "${argv[@]}" 2>&1 >/dev/null); rc=$?
  if [ $rc -ne 0 ] && ! grep -q -e panicked -e "stack backtrace" <<<"$err" && grep -qF -- "$expect" <<<"$err"; then
    pass=$((pass + 1)); printf 'ok    %-28s exit %d  %s\n' "$name" "$rc" "$(head -c 150 <<<"$err" | tr '\n' ' ')"
  else
    fail=$((fail + 1)); printf 'FAIL  %-28s exit %d  %s\n' "$name" "$rc" "$err"
  fi
done <"$dir/cases.tsv"
echo "$pass passed, $fail failed"
[ $fail -eq 0 ]
