"""Checks logits computed elsewhere (e.g. by lora-rs) against Hugging Face PEFT for one adapter directory.

Loads the base model, puts the adapter on it with PeftModel.from_pretrained (so DoRA, lora_bias, bias="all" /
"lora_only", modules_to_save, embedding LoRA, PiSSA/OLoRA re-initialisation, ... are all handled by PEFT itself),
computes the logits in eval mode, then again after merge_and_unload(), and compares both with --logits.

  MLP:    --base base.safetensors   the Net of scripts/make_peft_feature_fixtures.py (linear1..linear3 with biases,
                                    ReLU between; sizes read from the file); --inputs JSON with "x" (rows)
  Llama:  --llama BASE_DIR          a transformers LlamaForCausalLM directory; --inputs JSON with "input_ids"
  --logits FILE.json                {"logits": ...} (nested rows, or flat row-major; Llama: [batch, seq, vocab] in
                                    any nesting). If it also has "merged_logits", the merged model is compared with
                                    those, otherwise with "logits" again.

Prints the max abs differences and exits 0 if both are <= --tol (default 1e-5), else 1.

Usage:
  /tmp/torch-venv/bin/python scripts/peft_check.py --base tests/fixtures/peft-features/base.safetensors \\
      --adapter tests/fixtures/peft-features/dora/adapter --inputs tests/fixtures/peft-features/inputs.json \\
      --logits out.json
  /tmp/torch-venv/bin/python scripts/peft_check.py --llama tests/fixtures/llama-peft-tiny/base \\
      --adapter tests/fixtures/peft-features/llama-dora/adapter \\
      --inputs tests/fixtures/peft-features/llama-dora/expected.json --logits out.json
Venv once: python3 -m venv /tmp/torch-venv && /tmp/torch-venv/bin/pip install torch transformers peft numpy safetensors
"""
import argparse
import copy
import json
import os
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import safetensors.torch
import torch
import transformers
from peft import PeftModel

warnings.filterwarnings("ignore")
transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()


class Net(torch.nn.Module):
    def __init__(self, dims):
        super().__init__()
        self.linear1 = torch.nn.Linear(dims[0], dims[1])
        self.linear2 = torch.nn.Linear(dims[1], dims[2])
        self.linear3 = torch.nn.Linear(dims[2], dims[3])

    def forward(self, x):
        return self.linear3(torch.relu(self.linear2(torch.relu(self.linear1(x)))))


def load_mlp(path):
    sd = safetensors.torch.load_file(path)
    dims = [sd["linear1.weight"].shape[1], sd["linear1.weight"].shape[0], sd["linear2.weight"].shape[0],
            sd["linear3.weight"].shape[0]]
    net = Net(dims)
    net.load_state_dict(sd)
    return net.eval()


def load_llama(path):
    return transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def run(model, inp):
    model.eval()
    with torch.no_grad():
        if inp.dtype == torch.long:
            return model(input_ids=inp).logits
        return model(inp)


def max_diff(ours, theirs, what):
    theirs = np.asarray(theirs, dtype=np.float64).reshape(-1)
    ours = ours.detach().double().numpy().reshape(-1)
    if ours.shape != theirs.shape:
        print(f"{what}: shape mismatch, PEFT has {ours.size} values, the file {theirs.size}")
        return float("inf")
    return float(np.max(np.abs(ours - theirs)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--base", help="MLP base.safetensors")
    g.add_argument("--llama", help="LlamaForCausalLM base directory")
    ap.add_argument("--adapter", required=True, help="PEFT adapter directory")
    ap.add_argument("--inputs", required=True, help='JSON with "x" (MLP) or "input_ids" (Llama)')
    ap.add_argument("--logits", required=True, help='JSON with "logits" (and optionally "merged_logits")')
    ap.add_argument("--tol", type=float, default=1e-5)
    args = ap.parse_args()
    torch.set_num_threads(1)

    with open(args.inputs) as f:
        inputs = json.load(f)
    with open(args.logits) as f:
        theirs = json.load(f)
    if args.base:
        base = load_mlp(args.base)
        inp = torch.tensor(inputs["x"], dtype=torch.float32)
    else:
        base = load_llama(args.llama)
        inp = torch.tensor(inputs["input_ids"], dtype=torch.long)

    model = PeftModel.from_pretrained(base, args.adapter)
    unmerged = run(model, inp)
    merged = run(copy.deepcopy(model).merge_and_unload(), inp)

    d_unmerged = max_diff(unmerged, theirs["logits"], "logits")
    d_merged = max_diff(merged, theirs.get("merged_logits", theirs["logits"]), "merged_logits")
    ok = d_unmerged <= args.tol and d_merged <= args.tol
    print(f"{args.adapter}: max abs diff {d_unmerged:.3g} (unmerged), {d_merged:.3g} (merged), "
          f"tolerance {args.tol:g}: {'OK' if ok else 'MISMATCH'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
