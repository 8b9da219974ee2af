"""Writes tests/fixtures/families/: for each model family lora-rs loads (Llama, Mistral, Qwen2, Qwen3, Gemma 2, Phi-3)
a tiny random model made by transformers' own class, a PEFT LoRA adapter on it, and the logits both compute; the
RoPE inverse frequencies of every scaling transformers defines; and two tokenizers (byte-level BPE as Llama 3 and
Qwen use, SentencePiece-style BPE with byte fallback as Llama 2 and Mistral use) with what transformers makes of
a set of texts. lora-rs must reproduce every number (crates/lm/tests/families.rs).

Usage:  python3 scripts/make_family_fixtures.py [--out tests/fixtures/families]
Needs torch, transformers (5.x: `rope_parameters`), peft, safetensors, tokenizers, numpy. CPU, float32, one
thread, fixed seeds: rerunning it with the same library versions rewrites the same numbers.

Writes (the directory is emptied first):
  <family>/base/             save_pretrained of the random model (config.json, model.safetensors)
  <family>/adapter/          PEFT save_pretrained of a random LoRA (r 4, alpha 8, init_lora_weights=False, so A and
                             B are both non-zero) on every projection
  <family>/expected.safetensors  logits (float32) of `ids` (2 x 16 tokens) and `short` (1 x 6) with and without
                             the adapter, each from the saved files loaded back with from_pretrained (eager attention)
  <family>/expected.json     the token ids, what the fixture exercises, the versions
  rope.json                  inv_freq and attention_factor from transformers' ROPE_INIT_FUNCTIONS for configs of
                             every RoPE type (including real checkpoints' values)
  tokenizers/<kind>/         tokenizer.json, tokenizer_config.json (PreTrainedTokenizerFast.save_pretrained) and
                             expected.json (ids, decoded texts) for texts with added and special tokens
"""
import argparse
import json
import math
import os
import platform
import shutil
import sys
import warnings

import numpy as np
import safetensors
import tokenizers
import torch
import transformers
import peft
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (AutoModelForCausalLM, AutoTokenizer, Gemma2Config, LlamaConfig, MistralConfig, Phi3Config,
                          PreTrainedTokenizerFast, Qwen2Config, Qwen3Config)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

warnings.filterwarnings("ignore", category=FutureWarning)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 64
COMMON = dict(vocab_size=VOCAB, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=24, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0)

# Each family: its config class, the settings that make it exercise what the family has (every value chosen so
# the feature is visible: a sliding window shorter than the 16-token rows, a scaled RoPE past its original
# context, biases, grouped K/V heads), the LoRA targets, and what it exercises (written to expected.json).
FAMILIES = {
    "llama": (LlamaConfig, dict(
        hidden_size=16, head_dim=8, attention_bias=True, mlp_bias=True, max_position_embeddings=64,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500.0, "factor": 4.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
        SEVEN, "llama3 RoPE (all three frequency bands), q/k/v/o and MLP biases, head_dim 8 with hidden 16"),
    "mistral": (MistralConfig, dict(
        hidden_size=16, head_dim=8, sliding_window=5, max_position_embeddings=64,
        rope_parameters={"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0}),
        SEVEN, "sliding window 5 on every layer (rows of 16), linear RoPE factor 2"),
    "qwen2": (Qwen2Config, dict(
        hidden_size=32, tie_word_embeddings=True, use_sliding_window=True, sliding_window=5, max_window_layers=1,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "yarn", "rope_theta": 500.0, "factor": 4.0,
                         "original_max_position_embeddings": 64, "beta_fast": 8.0, "beta_slow": 1.0}),
        SEVEN, "q/k/v biases, tied embeddings, layer 0 full and layer 1 sliding (window 5), yarn RoPE with a real "
               "ramp, head_dim from hidden / heads"),
    "qwen3": (Qwen3Config, dict(
        hidden_size=16, head_dim=8, use_sliding_window=True, sliding_window=5, max_window_layers=1,
        max_position_embeddings=12,
        rope_parameters={"rope_type": "dynamic", "rope_theta": 500.0, "factor": 2.5}),
        SEVEN, "per-head q/k RMSNorm, dynamic NTK RoPE (rows of 16 past max_position_embeddings 12; the short row "
               "within it), layer 1 sliding"),
    "gemma2": (Gemma2Config, dict(
        hidden_size=16, head_dim=8, query_pre_attn_scalar=12, sliding_window=5, attn_logit_softcapping=5.0,
        final_logit_softcapping=8.0, max_position_embeddings=64, hidden_activation="gelu_pytorch_tanh",
        rope_parameters={"rope_type": "linear", "rope_theta": 500.0, "factor": 1.5}),
        SEVEN, "GeGLU (tanh), (1 + w) RMSNorms, sqrt(hidden)-scaled embedding, attention and final soft-capping, "
               "layer 0 sliding (window 5) and layer 1 global, pre- and post-norms, query_pre_attn_scalar 12, tied"),
    "phi3": (Phi3Config, dict(
        hidden_size=32, max_position_embeddings=32, original_max_position_embeddings=8, sliding_window=6,
        rope_parameters={"rope_type": "longrope", "rope_theta": 500.0, "partial_rotary_factor": 0.5,
                         "short_factor": [1.0, 1.5], "long_factor": [3.0, 5.0]}),
        ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
        "fused qkv_proj and gate_up_proj (PEFT targets them as such), longrope (long factors for the 16-token rows, "
        "short for the 6-token row), partial rotary 0.5, sliding window 6"),
}


def build(family, seed):
    cls, kw, _, _ = FAMILIES[family]
    config = cls(**COMMON, **kw)
    config.architectures = None
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                # Gemma's norms multiply by (1 + w): centre its weights on 0, the others on 1.
                p.uniform_(-0.5, 0.5) if family == "gemma2" else p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.2)
    return model.eval()


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()


def logits_of(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids).logits
    assert out.dtype == torch.float32
    return out.contiguous()


def make_family(family, out, seed, versions):
    _, _, targets, exercises = FAMILIES[family]
    d = os.path.join(out, family)
    base_dir, adapter_dir = os.path.join(d, "base"), os.path.join(d, "adapter")
    model = build(family, seed)
    model.save_pretrained(base_dir, safe_serialization=True)
    gen = os.path.join(base_dir, "generation_config.json")
    if os.path.exists(gen):
        os.remove(gen)  # the token ids are in config.json too; nothing here is about generation settings

    torch.manual_seed(seed + 100)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, bias="none", task_type="CAUSAL_LM",
                     init_lora_weights=False)
    pm = get_peft_model(load(base_dir), cfg)
    pm.peft_config["default"].base_model_name_or_path = "base"
    cwd = os.getcwd()
    os.chdir(d)
    try:
        pm.save_pretrained("adapter")
    finally:
        os.chdir(cwd)
    readme = os.path.join(adapter_dir, "README.md")
    if os.path.exists(readme):
        os.remove(readme)

    g = torch.Generator().manual_seed(seed + 200)
    ids = torch.randint(0, VOCAB, (2, 16), generator=g)
    short = torch.randint(0, VOCAB, (1, 6), generator=g)
    base = load(base_dir)
    adapted = PeftModel.from_pretrained(load(base_dir), adapter_dir).eval()
    tensors = {
        "base_logits": logits_of(base, ids), "adapter_logits": logits_of(adapted, ids),
        "base_short_logits": logits_of(base, short), "adapter_short_logits": logits_of(adapted, short),
    }
    from safetensors.torch import load_file
    ad = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    assert all(v.abs().max().item() > 0 for v in ad.values()), "an adapter matrix is all zeros"
    diff = (tensors["adapter_logits"] - tensors["base_logits"]).abs().max().item()
    assert diff > 0.1, f"{family}: the adapter barely changes the logits ({diff})"
    spread = tensors["base_logits"].std(-1).mean().item()
    assert spread > 0.3, f"{family}: logits too close to uniform ({spread})"
    save_file(tensors, os.path.join(d, "expected.safetensors"), metadata={"format": "pt"})
    lp = torch.log_softmax(tensors["base_logits"][:, :-1].double(), -1)
    loss = -lp.gather(-1, ids[:, 1:, None]).mean().item()
    with open(os.path.join(d, "expected.json"), "w") as f:
        json.dump({"family": family, "exercises": exercises, "ids": ids.tolist(), "short": short.tolist(),
                   "lora_targets": targets, "lora_scale": 8 / 4, "base_mean_loss": loss, "versions": versions},
                  f, indent=1)
        f.write("\n")
    print(f"{family:8s} max |adapter - base| {diff:.3f}, logit std {spread:.3f}, base loss {loss:.3f} "
          f"(uniform {math.log(VOCAB):.3f})", file=sys.stderr)


def rope_cases():
    """(name, config, seq_len) for every RoPE type; seq_len as the model's forward passes it (a tensor)."""
    def cfg(head_dim, params, max_pos, **kw):
        return LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim,
                           max_position_embeddings=max_pos, rope_parameters=dict(params), **kw)
    cases = [
        ("default", cfg(16, {"rope_type": "default", "rope_theta": 10000.0}, 2048), None),
        ("linear", cfg(16, {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}, 8192), None),
        ("dynamic within the context", cfg(16, {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}, 2048),
         None),
        ("dynamic at 3000 of 2048", cfg(16, {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}, 2048),
         torch.tensor(3000)),
        ("dynamic at 5001 of 2048, factor 3", cfg(16, {"rope_type": "dynamic", "rope_theta": 500.0, "factor": 3.0},
                                                  2048), torch.tensor(5001)),
        ("yarn as Qwen2.5", cfg(64, {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0,
                                     "original_max_position_embeddings": 32768}, 131072), None),
        ("yarn with mscale", cfg(32, {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "mscale": 1.0,
                                      "mscale_all_dim": 0.707, "beta_fast": 32.0, "beta_slow": 1.0,
                                      "original_max_position_embeddings": 4096}, 163840), None),
        ("yarn with attention_factor, no truncation", cfg(16, {"rope_type": "yarn", "rope_theta": 500.0,
                                                              "factor": 8.0, "attention_factor": 0.8,
                                                              "truncate": False,
                                                              "original_max_position_embeddings": 64}, 512), None),
        ("llama3 as Llama-3.2", cfg(64, {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 8192}, 131072), None),
        ("llama3 as Llama-3.1", cfg(128, {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192}, 131072), None),
    ]
    short = [1.0 + 0.05 * i for i in range(24)]
    long_ = [1.0 + 1.7 * i for i in range(24)]
    for name, seq in [("longrope short", None), ("longrope long", torch.tensor(5000))]:
        c = Phi3Config(hidden_size=48 * 2, num_attention_heads=2, max_position_embeddings=131072,
                       original_max_position_embeddings=4096,
                       rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": short,
                                        "long_factor": long_})
        cases.append((name, c, seq))
    return cases


def make_rope(out, versions):
    rows = []
    for name, config, seq in rope_cases():
        kind = config.rope_parameters["rope_type"]
        fn = ROPE_INIT_FUNCTIONS.get(kind)
        if fn is None:  # default
            from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
            inv, af = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
        else:
            inv, af = fn(config, "cpu", seq_len=seq)
        rows.append({"name": name, "config": json.loads(config.to_json_string(use_diff=False)),
                     "seq_len": None if seq is None else int(seq), "inv_freq": [float(x) for x in inv.float()],
                     "attention_factor": float(af)})
    with open(os.path.join(out, "rope.json"), "w") as f:
        json.dump({"cases": rows, "versions": versions}, f, indent=1)
        f.write("\n")


CORPUS = [
    "select name from users where id = 1;",
    "insert into orders (user_id, total) values (3, 250);",
    "function add(a, b) { return a + b; }",
    "const xs = [1, 2, 3].map((x) => x * 2);",
    "The quick brown fox jumps over the lazy dog.",
    "naïve café: déjà vu — 1.5 € per item",
    "    indented line\twith a tab\nand a newline",
]
TEXTS = [
    "select name from users where id = 42;",
    "Hello world!  Two spaces, CAPS and déjà vu.",
    "emoji 🦀 and 中文 fall back to bytes",
    "<|user|>write SQL<|end|> then <tool> runs",
    "  leading spaces\nnew line\ttab",
    "",
]


def bytelevel_bpe():
    """Llama 3 / Qwen2 style: the regex split, byte-level alphabet, BPE merges, no unk; <|begin_of_text|> added as
    BOS by the post-processor (Llama 3); special <|user|>, <|end|> and a non-special added <tool>."""
    pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
    tok = Tokenizer(models.BPE())
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    special = ["<|begin_of_text|>", "<|end_of_text|>", "<|user|>", "<|end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, min_frequency=2, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 3, trainer=trainer)
    tok.add_tokens([tokenizers.AddedToken("<tool>", special=False, normalized=False)])
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                                      special_tokens=[("<|begin_of_text|>", bos)])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    return tok, fast


def sentencepiece_bpe():
    """Llama 2 / Mistral style (as their tokenizer.json): normalizer Prepend("▁") + Replace(" ", "▁"), no
    pre-tokenizer, BPE with byte_fallback and the 256 <0xNN> tokens, decoder Replace + ByteFallback + Fuse + Strip;
    <s> added as BOS by the post-processor; special <|user|>, <|end|> and a non-special added <tool>."""
    meta = "\u2581"
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    special = ["<unk>", "<s>", "</s>"] + byte_tokens
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(meta), normalizers.Replace(" ", meta)])
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence([decoders.Replace(meta, " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1, right=0)])
    alphabet = sorted({c for line in CORPUS for c in line.replace(" ", meta)} | {meta})
    trainer = trainers.BpeTrainer(vocab_size=600, min_frequency=2, special_tokens=special, show_progress=False,
                                  initial_alphabet=[c for c in alphabet if c.isascii() or c == meta],
                                  limit_alphabet=200)
    tok.train_from_iterator([line.replace(" ", meta) for line in CORPUS] * 3, trainer=trainer)
    tok.add_special_tokens([tokenizers.AddedToken("<|user|>", special=True, normalized=False),
                            tokenizers.AddedToken("<|end|>", special=True, normalized=False)])
    tok.add_tokens([tokenizers.AddedToken("<tool>", special=False, normalized=False)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B:1",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    return tok, fast


def make_tokenizers(out, versions):
    for kind, make in [("bytelevel-bpe", bytelevel_bpe), ("sentencepiece-bpe", sentencepiece_bpe)]:
        d = os.path.join(out, "tokenizers", kind)
        tok, fast = make()
        fast.save_pretrained(d)
        auto = AutoTokenizer.from_pretrained(d)
        rows = []
        for text in TEXTS:
            ids = auto(text, add_special_tokens=True)["input_ids"]
            raw = Tokenizer.from_file(os.path.join(d, "tokenizer.json")).encode(text).ids
            assert raw == ids, f"{kind}: tokenizers and transformers disagree on {text!r}: {raw} vs {ids}"
            rows.append({"text": text, "input_ids": ids, "tokens": auto.convert_ids_to_tokens(ids),
                         "decoded": auto.decode(ids, skip_special_tokens=True),
                         "decoded_with_special": auto.decode(ids, skip_special_tokens=False)})
        with open(os.path.join(d, "expected.json"), "w") as f:
            json.dump({"kind": kind, "doc": (make.__doc__ or "").strip(), "vocab_size": len(auto),
                       "texts": rows, "versions": versions}, f, indent=1, ensure_ascii=False)
            f.write("\n")
        print(f"{kind}: {len(auto)} tokens; " + "; ".join(f"{len(r['input_ids'])} ids" for r in rows), file=sys.stderr)


def main():
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, "PYTHONHASHSEED": "0"})
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures", "families"))
    ap.add_argument("--only", nargs="*", help="families to write (default: all, plus rope.json and tokenizers)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__, "peft": peft.__version__,
                "safetensors": safetensors.__version__, "tokenizers": tokenizers.__version__, "numpy": np.__version__}
    if a.only is None and os.path.isdir(a.out):
        shutil.rmtree(a.out)
    os.makedirs(a.out, exist_ok=True)
    for i, family in enumerate(FAMILIES):
        if a.only is None or family in a.only:
            shutil.rmtree(os.path.join(a.out, family), ignore_errors=True)
            make_family(family, a.out, 10 + i, versions)
    if a.only is None:
        make_rope(a.out, versions)
        make_tokenizers(a.out, versions)
    total = 0
    for dirpath, _, files in os.walk(a.out):
        for fn in files:
            total += os.path.getsize(os.path.join(dirpath, fn))
    print(f"{total} bytes in {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
