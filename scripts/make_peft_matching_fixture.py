"""Writes tests/fixtures/peft-matching/cases.json: which modules real PEFT adapts, with which rank and alpha,
for configs exercising every module-matching rule of LoraConfig — target_modules as a list (names and
suffixes) or a regex string (full match), "all-linear", exclude_modules (list or regex),
layers_to_transform with and without layers_pattern, and rank_pattern / alpha_pattern keys (plain names,
suffixes, regexes; the first key in file order wins) — on two models with lora-rs' module names: a tiny
transformers LlamaForCausalLM (a PreTrainedModel, so "all-linear" leaves out lm_head) and the MNIST
ExpensiveNet (a plain nn.Module with linear1..linear3).

Usage:  /tmp/torch-venv/bin/python scripts/make_peft_matching_fixture.py [--out tests/fixtures/peft-matching]
Venv once: python3 -m venv /tmp/torch-venv && /tmp/torch-venv/bin/pip install torch transformers peft
Written with the versions recorded in the file (peft 0.21.2, transformers 5.24.0, torch 2.15.0).
"""
import argparse
import json
import os

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer


def llama():
    c = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=3,
                                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    return transformers.LlamaForCausalLM(c)


class ExpensiveNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear1 = torch.nn.Linear(12, 10)
        self.linear2 = torch.nn.Linear(10, 8)
        self.linear3 = torch.nn.Linear(8, 4)


CASES = [
    # (name, model, LoraConfig kwargs)
    ("list of suffixes", "llama", dict(target_modules=["q_proj", "v_proj"])),
    ("list with a full name and a dotted suffix", "llama", dict(target_modules=["model.layers.0.mlp.up_proj", "self_attn.o_proj"])),
    ("regex string, full match", "llama", dict(target_modules=r".*layers\.[02]\.self_attn\.(q|k)_proj")),
    ("regex string that only matches a part matches nothing there", "llama", dict(target_modules=r"q_proj|.*down_proj")),
    ("all-linear leaves out lm_head of a PreTrainedModel", "llama", dict(target_modules="all-linear")),
    ("all-linear on a plain module takes every linear layer", "mnist", dict(target_modules="all-linear")),
    ("exclude_modules as a list", "llama", dict(target_modules="all-linear", exclude_modules=["down_proj", "model.layers.1.self_attn.q_proj"])),
    ("exclude_modules as a regex", "llama", dict(target_modules=["q_proj", "k_proj", "v_proj"], exclude_modules=r".*\.1\..*")),
    ("layers_to_transform without layers_pattern", "llama", dict(target_modules=["q_proj", "up_proj"], layers_to_transform=[0, 2])),
    ("layers_to_transform as one int", "llama", dict(target_modules=["v_proj"], layers_to_transform=1)),
    ("layers_to_transform with layers_pattern", "llama", dict(target_modules=["gate_proj"], layers_to_transform=[1], layers_pattern="layers")),
    ("layers_to_transform with a regex target is refused", "llama", dict(target_modules=r".*\.q_proj", layers_to_transform=[0])),
    ("an exact name bypasses layers_to_transform; a suffix does not", "llama", dict(target_modules=["model.layers.1.self_attn.k_proj", "v_proj"], layers_to_transform=[0])),
    ("rank_pattern and alpha_pattern by suffix", "mnist", dict(target_modules=["linear1", "linear2", "linear3"], r=2, lora_alpha=3,
                                                              rank_pattern={"linear2": 5}, alpha_pattern={"linear3": 7})),
    ("pattern keys are regexes matched after a dot", "llama", dict(target_modules=["q_proj", "v_proj", "down_proj"], r=4, lora_alpha=8,
                                                                   rank_pattern={r"layers\.1\..*": 2, "down_proj": 6},
                                                                   alpha_pattern={r".*\.[01]\.self_attn\.q_proj": 1.5})),
    ("the first matching pattern key in file order wins", "llama", dict(target_modules=["q_proj"], r=4, lora_alpha=8,
                                                                         rank_pattern={"q_proj": 3, r"layers\.0\.self_attn\.q_proj": 5},
                                                                         alpha_pattern={r"model\.layers\.2\.self_attn\.q_proj": 2.5, "q_proj": 9})),
    ("a pattern key must match whole dotted parts", "llama", dict(target_modules=["q_proj", "k_proj"], r=4, lora_alpha=8,
                                                                  rank_pattern={"proj": 7, "_proj": 6, "elf_attn.k_proj": 5})),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/peft-matching")
    args = ap.parse_args()
    torch.manual_seed(0)
    out = []
    for name, kind, kwargs in CASES:
        model = llama() if kind == "llama" else ExpensiveNet()
        modules = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        try:
            pm = get_peft_model(model, LoraConfig(**kwargs))
            adapted = {}
            for n, m in pm.base_model.model.named_modules():
                if isinstance(m, LoraLayer):
                    adapted[n] = {"r": m.r["default"], "alpha": m.lora_alpha["default"]}
            result = {"adapted": adapted}
        except ValueError as e:
            result = {"error": str(e).splitlines()[0]}
        config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in kwargs.items()}
        # The config as PEFT saves it, as text: pattern keys keep their order (the first match wins).
        text = json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 8, **config})
        out.append({"name": name, "model": kind, "modules": modules, "adapter_config": text, **result})
    os.makedirs(args.out, exist_ok=True)
    doc = {"peft": peft.__version__, "transformers": transformers.__version__, "torch": torch.__version__, "cases": out}
    with open(os.path.join(args.out, "cases.json"), "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
