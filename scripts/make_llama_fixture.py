"""Writes tests/fixtures/llama-peft-tiny/: a tiny Llama made and saved by Hugging Face transformers, a LoRA
adapter for it trained and saved by PEFT, and the logits / token losses they compute, for testing that lora-rs
loads real transformers / PEFT checkpoints and computes the same numbers.

Usage:  python3 scripts/make_llama_fixture.py [--out tests/fixtures/llama-peft-tiny]
Needs torch, transformers, peft, safetensors, numpy. CPU, float32, one thread, fixed seeds: rerunning it with
the same library versions rewrites byte-identical files.

Writes (the directory is emptied first):
  base/           a random LlamaForCausalLM (vocab 96, hidden 32, MLP 64, 2 layers, 4 query / 2 key-value heads,
                  head dim 8, RoPE theta 500, RMSNorm eps 1e-6, untied, no biases), save_pretrained,
                  safetensors, re-initialised with N(0, 0.2) weights and U(0.5, 1.5) RMSNorm weights (seed 1)
  base-sharded/   the same weights saved with a small max_shard_size (several shards + index)
  tied/           the same config with tie_word_embeddings=True, its own weights (seed 2): no lm_head.weight
  adapter/        PEFT LoRA (r 4, alpha 6, dropout 0, q/k/v/o/gate/up/down) on base/, 20 AdamW steps
                  (lr 1e-2) on random tokens with labels = input_ids (seed 3), save_pretrained
  expected.json   logits and per-token losses for two fixed 12-token rows (see README.md written alongside)
  README.md
"""
import argparse
import inspect
import json
import math
import os
import platform
import shutil
import sys
import warnings

import numpy as np
import safetensors
import torch
import torch.nn.functional as F
import transformers
import peft
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEED_BASE, SEED_TIED, SEED_TRAIN = 1, 2, 3
ROPE_THETA = 500.0
# Two fixed rows of 12 token ids (< 96), chosen by hand; they include 0 and 95, the ends of the vocabulary.
INPUT_IDS = [[1, 17, 42, 5, 88, 23, 61, 0, 34, 95, 12, 70],
             [64, 3, 3, 29, 51, 77, 8, 46, 90, 19, 2, 55]]
SHARD_SIZE = "40KB"          # transformers counts KB as 1000 bytes; the base is about 99 KB of float32


def llama_config(tied):
    kw = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
              rms_norm_eps=1e-6, tie_word_embeddings=tied, attention_bias=False, mlp_bias=False,
              hidden_act="silu")
    # transformers 5 takes RoPE settings as `rope_parameters`; earlier versions as `rope_theta`.
    if "rope_parameters" in inspect.signature(LlamaConfig.__init__).parameters:
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": ROPE_THETA}
    else:
        kw["rope_theta"] = ROPE_THETA
    return LlamaConfig(**kw)


def build_model(tied, seed):
    """A float32 LlamaForCausalLM with large random weights, so logits are far from uniform."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM._from_config(llama_config(tied), attn_implementation="eager")
    with torch.no_grad():
        # named_parameters() lists a tied embedding / lm_head once, so it is initialised once.
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.2)
    if tied:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model.eval()


def load(path):
    # `torch_dtype` was renamed `dtype` in transformers 4.56 (the old name warns from then on).
    new = tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (4, 56)
    kw = {"dtype": torch.float32} if new else {"torch_dtype": torch.float32}
    return LlamaForCausalLM.from_pretrained(path, attn_implementation="eager", **kw).eval()


def logits_of(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids).logits
    assert out.dtype == torch.float32, out.dtype
    return out


def token_losses(logits, ids):
    """Cross-entropy in nats of token i+1 given tokens <= i, from float32 logits (computed in float64)."""
    lp = F.log_softmax(logits[:, :-1].double(), dim=-1)
    return -lp.gather(-1, ids[:, 1:, None]).squeeze(-1)


def f32_list(t):
    """Each float32 value as the shortest decimal that reads back as the same float32 (a Python float)."""
    return [float(str(np.float32(v))) for v in t.detach().float().reshape(-1).numpy()]


def f64_list(t):
    return [float(v) for v in t.detach().double().reshape(-1).numpy()]


def train_adapter(base_dir):
    model = load(base_dir)
    cfg = LoraConfig(r=4, lora_alpha=6, lora_dropout=0.0, target_modules=LORA_TARGETS, bias="none",
                     task_type="CAUSAL_LM")
    torch.manual_seed(SEED_TRAIN)
    pm = get_peft_model(model, cfg)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    pm.train()
    first = last = None
    for step in range(20):
        x = torch.randint(0, 96, (4, 16))
        loss = pm(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        first = loss.item() if first is None else first
        last = loss.item()
    print(f"adapter training loss {first:.4f} -> {last:.4f}", file=sys.stderr)
    pm.eval()
    return pm


def tensor_summary(path):
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        return {k: (str(f.get_slice(k).get_dtype()), f.get_slice(k).get_shape()) for k in f.keys()}


def main():
    # PEFT writes target_modules in set order, which depends on Python's string hash seed: fix the seed so that
    # adapter_config.json comes out the same on every run.
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, "PYTHONHASHSEED": "0"})
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures", "llama-peft-tiny"))
    out = ap.parse_args().out
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out)
    d = {k: os.path.join(out, k) for k in ["base", "base-sharded", "tied", "adapter"]}

    base = build_model(False, SEED_BASE)
    base.save_pretrained(d["base"], safe_serialization=True)
    base.save_pretrained(d["base-sharded"], safe_serialization=True, max_shard_size=SHARD_SIZE)
    tied = build_model(True, SEED_TIED)
    tied.save_pretrained(d["tied"], safe_serialization=True)
    shards = sorted(f for f in os.listdir(d["base-sharded"]) if f.endswith(".safetensors"))
    assert len(shards) >= 2 and os.path.exists(os.path.join(d["base-sharded"], "model.safetensors.index.json")), shards
    assert "lm_head.weight" not in tensor_summary(os.path.join(d["tied"], "model.safetensors"))

    pm = train_adapter(d["base"])
    # "base", not this machine's absolute path; saved from inside the fixture directory so that PEFT's check of
    # the base config (it looks at base_model_name_or_path) finds base/ rather than asking the Hub.
    pm.peft_config["default"].base_model_name_or_path = "base"
    cwd = os.getcwd()
    os.chdir(out)
    try:
        pm.save_pretrained("adapter")
    finally:
        os.chdir(cwd)
    # PEFT also writes a model card template (README.md) that names this machine's path to base/; not needed.
    os.remove(os.path.join(d["adapter"], "README.md"))

    # The expected numbers come from the files as saved, loaded back the way a user would load them.
    ids = torch.tensor(INPUT_IDS)
    base_l = logits_of(load(d["base"]), ids)
    sharded_l = logits_of(load(d["base-sharded"]), ids)
    tied_l = logits_of(load(d["tied"]), ids)
    peft_model = PeftModel.from_pretrained(load(d["base"]), d["adapter"]).eval()
    adapter_l = logits_of(peft_model, ids)
    with peft_model.disable_adapter():
        disabled_l = logits_of(peft_model, ids)
    assert torch.equal(base_l, logits_of(base, ids)), "base reloaded differs from the model in memory"
    assert torch.equal(base_l, sharded_l), "sharded base differs"
    assert torch.equal(tied_l, logits_of(tied, ids)), "tied reloaded differs"
    assert torch.equal(adapter_l, logits_of(pm, ids)), "adapter reloaded differs from the trained one"
    assert torch.allclose(base_l, disabled_l, rtol=0, atol=1e-6), "disable_adapter differs from base"
    diff = (adapter_l - base_l).abs().max().item()
    assert diff > 1e-2, f"adapter barely changes the logits ({diff})"
    from safetensors.torch import load_file
    ad = load_file(os.path.join(d["adapter"], "adapter_model.safetensors"))
    assert all(v.abs().max().item() > 0 for v in ad.values()), "an adapter matrix is all zeros"

    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__, "peft": peft.__version__,
                "safetensors": safetensors.__version__, "numpy": np.__version__}
    expected = {
        "input_ids": INPUT_IDS,
        "shape": list(base_l.shape),
        "base_logits": f32_list(base_l),
        "adapter_logits": f32_list(adapter_l),
        "tied_logits": f32_list(tied_l),
        "base_token_losses": [f64_list(r) for r in token_losses(base_l, ids)],
        "adapter_token_losses": [f64_list(r) for r in token_losses(adapter_l, ids)],
        "tied_token_losses": [f64_list(r) for r in token_losses(tied_l, ids)],
        "lora_scale": 6 / 4,
        "versions": versions,
    }
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(expected, f, separators=(",", ":"))
        f.write("\n")

    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(README.format(shard_size=SHARD_SIZE, n_shards=len(shards), seed_base=SEED_BASE,
                              seed_tied=SEED_TIED, seed_train=SEED_TRAIN, **versions))

    print(f"max |adapter - base| logit {diff:.4f}; base mean loss "
          f"{token_losses(base_l, ids).mean().item():.4f}, adapter {token_losses(adapter_l, ids).mean().item():.4f}, "
          f"tied {token_losses(tied_l, ids).mean().item():.4f} nats (uniform would be {math.log(96):.4f})",
          file=sys.stderr)
    total = 0
    for dirpath, _, files in os.walk(out):
        for fn in sorted(files):
            p = os.path.join(dirpath, fn)
            total += os.path.getsize(p)
            print(f"{os.path.getsize(p):8d}  {os.path.relpath(p, out)}", file=sys.stderr)
    print(f"{total:8d}  total", file=sys.stderr)


README = """\
# A tiny Llama and a LoRA adapter for it, written by Hugging Face transformers {transformers} and PEFT {peft}

For testing that lora-rs loads real transformers / PEFT Llama checkpoints and computes the same numbers.
Made on CPU in float32 by `python3 scripts/make_llama_fixture.py` (one thread, fixed seeds; rerunning it with the
same versions rewrites the same bytes) with Python {python}, torch {torch}, transformers {transformers},
peft {peft}, safetensors {safetensors}, numpy {numpy}.

The model: `LlamaForCausalLM`, vocabulary 96, hidden 32, MLP 64 (SiLU), 2 layers, 4 query heads and 2 key-value
heads (grouped), head dim 8, RoPE theta 500 (default rope type), RMSNorm eps 1e-6, max positions 64, no biases.
transformers {transformers} writes RoPE settings in config.json as `"rope_parameters": {{"rope_theta": 500.0,
"rope_type": "default"}}` (no top-level `rope_theta`), and writes `head_dim` and `"dtype": "float32"`.
All weights re-initialised after construction: N(0, 0.2) for every matrix, U(0.5, 1.5) for every RMSNorm weight,
so logits are far from uniform.

- `base/`: `save_pretrained(safe_serialization=True)` of that model (seed {seed_base}), untied: `config.json`,
  `generation_config.json`, `model.safetensors` (float32; `lm_head.weight` stored separately).
- `base-sharded/`: the same weights saved with `max_shard_size="{shard_size}"`: {n_shards} shards plus
  `model.safetensors.index.json`. Same logits as `base/`.
- `tied/`: the same config with `tie_word_embeddings: true` and its own weights (seed {seed_tied}); transformers
  does not store `lm_head.weight`, the output layer is `model.embed_tokens.weight`.
- `adapter/`: PEFT `save_pretrained` (`adapter_config.json`, `adapter_model.safetensors`) of
  `LoraConfig(r=4, lora_alpha=6, lora_dropout=0.0, target_modules=[q_proj, k_proj, v_proj, o_proj, gate_proj,
  up_proj, down_proj], bias="none", task_type="CAUSAL_LM")` on `base/` (scale alpha / r = 1.5), trained 20 AdamW
  steps (lr 1e-2, batches of 4 x 16 random tokens, labels = input_ids, seed {seed_train}) so that both A and B are
  non-zero. `base_model_name_or_path` is set to `"base"`; the model-card template PEFT also writes (`README.md`,
  which names the absolute path of base/) is deleted. Tensor names as PEFT writes them, e.g.
  `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` (no adapter name in them).
- `expected.json`: for `input_ids` (2 rows of 12 token ids), the logits of shape `shape` = [2, 12, 96] flattened
  row-major: `base_logits` (base/ alone), `adapter_logits` (base/ + adapter/ as a `PeftModel`), `tied_logits`
  (tied/), all in eval mode, each float32 written as the shortest decimal that reads back as the same float32;
  `base_token_losses`, `adapter_token_losses`, `tied_token_losses`: 2 x 11 cross-entropies in nats of
  `input_ids[:, 1:]` given `logits[:, :-1]` (log-softmax of the float32 logits, in float64); `lora_scale`;
  `versions`. Every number was computed from the saved files loaded back with `from_pretrained`.
"""

if __name__ == "__main__":
    main()
