"""Has transformers and PEFT load what lora-rs writes for every model family, and compares the losses.

Usage:  python3 scripts/family_roundtrip.py [--out DIR] [--rtol 1e-5] [FAMILY ...]
Runs `cargo run --release -p lora-lm --example family_roundtrip -- DIR FAMILY...` (lora-rs loads each fixture of
tests/fixtures/families/, trains a fresh LoRA adapter on every projection 20 steps, writes the model with
hf::save_model and the adapter with hf::save_adapter, and the per-token losses of the fixture's rows with the
adapter off and on), then loads DIR/<family>/model with AutoModelForCausalLM.from_pretrained (float32, eager
attention) and DIR/<family>/adapter with PeftModel.from_pretrained, computes the same losses and compares each:
|lora-rs - transformers| <= rtol * max(|transformers|, 1). Exit 1 when any differs. Needs torch, transformers,
peft and a Rust toolchain.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import warnings

import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import AutoModelForCausalLM

warnings.filterwarnings("ignore", category=FutureWarning)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3"]


def losses(model, ids):
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    lp = F.log_softmax(logits[:, :-1].double(), dim=-1)
    return (-lp.gather(-1, ids[:, 1:, None]).squeeze(-1)).tolist()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out")
    ap.add_argument("--rtol", type=float, default=1e-5)
    ap.add_argument("families", nargs="*", default=FAMILIES)
    a = ap.parse_args()
    out = a.out or tempfile.mkdtemp(prefix="family-roundtrip-")
    torch.set_num_threads(1)
    subprocess.run(["cargo", "run", "--release", "-q", "-p", "lora-lm", "--example", "family_roundtrip", "--", out] + a.families,
                   cwd=ROOT, check=True)
    bad = 0
    for name in a.families:
        d = os.path.join(out, name)
        ours = json.load(open(os.path.join(d, "losses.json")))
        ids = torch.tensor(ours["ids"])
        model = AutoModelForCausalLM.from_pretrained(os.path.join(d, "model"), dtype=torch.float32,
                                                     attn_implementation="eager").eval()
        assert model.config.model_type == name, model.config.model_type
        base = losses(model, ids)
        peft = PeftModel.from_pretrained(model, os.path.join(d, "adapter")).eval()
        adapted = losses(peft, ids)
        worst = 0.0
        for key, theirs in [("base", base), ("adapter", adapted)]:
            for row_o, row_t in zip(ours[key], theirs):
                for o, t in zip(row_o, row_t):
                    worst = max(worst, abs(o - t) / max(abs(t), 1.0))
        ok = worst <= a.rtol
        bad += not ok
        mean = lambda rows: sum(map(sum, rows)) / sum(map(len, rows))
        print(f"{name:8s} {'ok ' if ok else 'BAD'} transformers + PEFT loaded lora-rs' files: mean loss base "
              f"{mean(base):.4f}, adapter {mean(adapted):.4f}; max relative difference {worst:.1e}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
