"""Writes a random bf16 checkpoint of Llama-3.2-1B's shape (not committed: 2.5 GB), for measuring what lora-rs
holds in memory and what a LoRA step costs at that size (docs/benchmarks.md, "A 1B bf16 checkpoint").

Usage:  python3 scripts/make_llama_1b_bf16.py OUT_DIR [--seed 0]
Needs torch and transformers. Builds transformers' own LlamaForCausalLM from Llama-3.2-1B's config.json values
(vocabulary 128,256, hidden 2048, MLP 8192, 16 layers, 32 query / 8 key-value heads, tied embeddings, RoPE
scaling "llama3"), its weights drawn by transformers' initialisation directly in bfloat16 (so no f32 copy is
ever made), and saves it with save_pretrained (safetensors, torch_dtype bfloat16), as the hub's checkpoint is
stored. The tokenizer is the committed byte-level BPE fixture (tests/fixtures/families/tokenizers/bytelevel-bpe:
Llama 3's kind, a small vocabulary whose ids all lie inside the model's); a corpus to score is any text file.
"""
import argparse
import os
import shutil

import torch
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# meta-llama/Llama-3.2-1B config.json, as published.
CONFIG = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling={
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    tie_word_embeddings=True,
    hidden_act="silu",
    attention_bias=False,
    mlp_bias=False,
    initializer_range=0.02,
    bos_token_id=128000,
    eos_token_id=128001,
)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    config = LlamaConfig(**CONFIG)
    torch.set_default_dtype(torch.bfloat16)
    with torch.no_grad():
        model = LlamaForCausalLM(config)
    n = sum(p.numel() for p in model.parameters())
    os.makedirs(a.out, exist_ok=True)
    model.save_pretrained(a.out, safe_serialization=True)
    shutil.copy(os.path.join(ROOT, "tests/fixtures/families/tokenizers/bytelevel-bpe/tokenizer.json"), a.out)
    size = sum(os.path.getsize(os.path.join(a.out, f)) for f in os.listdir(a.out) if f.endswith(".safetensors"))
    print(f"wrote {a.out}: {n:,} parameters, {size:,} bytes of safetensors")


if __name__ == "__main__":
    main()
