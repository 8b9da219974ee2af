#!/usr/bin/env bash
# The page's screenshots in README.md, docs/serving.md and docs/chat.md (docs/serve-lm.png, docs/serve-mnist.png,
# docs/serve-chat.png), taken
# by tests/serve_browser.rs in headless Chromium from the demos' real models rather than the tests' tiny
# random ones:
#   - the language model: `lora lm demo`'s runs/lm-demo (its base, and the sql, js and chat adapters);
#   - the classifier: `lora demo`'s runs/demo (its base, and its adapter fine-tuned on the digit the base
#     gets wrong most often), plus `lora finetune --digit 7` into runs/demo/digit7, as docs/serving.md does.
# Missing runs are made first (the two demos take a few minutes on two cores). Needs Debian's chromium
# (`apt-get install chromium`; LORA_CHROMIUM=PATH for another).
#
#   scripts/serve-screenshots.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
lora=./target/release/lora
if [ ! -f runs/demo/base.safetensors ] || [ ! -f runs/demo/adapter/adapter_config.json ]; then
  $lora demo >/dev/null
fi
if [ ! -f runs/demo/digit7/adapter_config.json ]; then
  $lora finetune --model runs/demo/base.safetensors --digit 7 --out runs/demo/digit7 >/dev/null
fi
if [ ! -f runs/lm-demo/base/config.json ]; then
  $lora lm demo >/dev/null
fi
log=target/serve-screenshots.log
if ! LORA_UPDATE_SCREENSHOTS=1 LORA_SCREENSHOT_MNIST=runs/demo LORA_SCREENSHOT_LM=runs/lm-demo \
  cargo test --release --test serve_browser -- --nocapture --test-threads 1 the_language_model_page the_chat_mode the_classifier_page >"$log" 2>&1; then
  cat "$log"
  exit 1
fi
grep -E '^test |the drawn 7' "$log"
ls -l docs/serve-lm.png docs/serve-chat.png docs/serve-mnist.png
