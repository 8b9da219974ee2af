"""Computes per-token language-model losses with Hugging Face transformers + PEFT and compares them with lora-rs'.

Usage:
  python3 scripts/hf_lm_parity.py --model DIR [--adapter NAME=DIR ...] --data FILE [--ours TOKENS.json]
                                  [--context N] [--json OUT] [--rtol 1e-4] [--batch 8] [--threads N]

--model DIR      a transformers checkpoint of any family lora-rs reads (config.json + safetensors), loaded with
                 AutoModelForCausalLM.from_pretrained(DIR) in float32 on CPU, eager attention, eval mode
--adapter N=DIR  a PEFT LoRA adapter, loaded onto the model under the name N (repeatable); model "base" is the
                 model with every adapter disabled (PeftModel.disable_adapter())
--data FILE      text to score. A .jsonl or .jsonl.gz file: the rows whose "split" is "validation" (every row
                 when no row has a "split" field), each row's "text" tokenised on its own and cut into windows;
                 any other file: its whole contents tokenised once and cut into windows
--context N      window length in tokens (default: max_position_embeddings from config.json). Windows are
                 consecutive and non-overlapping, the last one of a text shorter; a window of L >= 2 tokens gives
                 L - 1 losses (token i+1 given tokens 0..i); shorter windows give none
--ours FILE      lora-rs' per-token losses, as written by `lora lm eval --token-losses FILE`:
                 {"<basename of --data>": {"<model: base or adapter name>": [[nats of window 0], ...]}}
                 (a file written by this script's --json is accepted too). Empty windows are ignored on both
                 sides. Each loss is compared: |ours - hf| / max(|hf|, 1e-6); exit 1 if any exceeds --rtol
--json OUT       write the figures and per-token losses computed here as JSON

Tokenisation: when config.json has "lora_rs_tokenizer": "bytes", the token ids are the UTF-8 bytes of the text
(no special tokens); otherwise DIR/tokenizer.json through PreTrainedTokenizerFast, add_special_tokens=True.

Printed per model: mean loss in nats per predicted token, bits per byte (sum of nats / ln 2 / number of UTF-8 bytes
of the predicted tokens) and the token count. A token's bytes: for the byte tokeniser 1; for tokenizer.json the
text from the end of the previous token's character span to the end of its own (so spaces a tokeniser leaves out
of spans count for the token after them, and special tokens count 0).
Exit status: 0 computed (and, with --ours, agrees), 1 --ours disagrees, 2 bad input.
"""
import argparse
import gzip
import json
import math
import os
import sys
import warnings

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def fail(msg):
    print(f"hf_lm_parity: {msg}", file=sys.stderr)
    sys.exit(2)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR")
    p.add_argument("--data", required=True)
    p.add_argument("--ours")
    p.add_argument("--context", type=int)
    p.add_argument("--json", dest="json_out")
    p.add_argument("--rtol", type=float, default=1e-4, help="largest relative difference allowed (default 1e-4)")
    p.add_argument("--batch", type=int, default=8, help="windows per forward pass (default 8)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    a = p.parse_args()
    adapters = []
    for spec in a.adapter:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            fail(f"--adapter wants NAME=DIR, got {spec!r}")
        if name == "base" or name in [n for n, _ in adapters]:
            fail(f"adapter name {name!r} is reserved or given twice")
        adapters.append((name, path))
    a.adapters = adapters
    if a.context is not None and a.context < 2:
        fail("--context must be at least 2")
    return a


# ---------------------------------------------------------------------------------------------------------------
# Text and tokens


def read_texts(path):
    """The texts to score, each tokenised on its own."""
    name = os.path.basename(path)
    if name.endswith(".jsonl") or name.endswith(".jsonl.gz"):
        opener = gzip.open if name.endswith(".gz") else open
        rows = []
        with opener(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        fail(f"{path}:{n}: not JSON ({e})")
        if any(isinstance(r, dict) and "split" in r for r in rows):
            rows = [r for r in rows if isinstance(r, dict) and r.get("split") == "validation"]
            if not rows:
                fail(f"{path}: rows have a split field but none is \"validation\"")
        texts = []
        for r in rows:
            if not isinstance(r, dict) or not isinstance(r.get("text"), str):
                fail(f"{path}: a row without a string \"text\" field")
            texts.append(r["text"])
        return texts
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return [raw.decode("utf-8")]
    except UnicodeDecodeError as e:
        fail(f"{path}: not UTF-8 ({e})")


class Tokeniser:
    def __init__(self, model_dir, config):
        self.bytes = config.get("lora_rs_tokenizer") == "bytes"
        if self.bytes:
            self.name = "bytes"
            return
        path = os.path.join(model_dir, "tokenizer.json")
        if not os.path.exists(path):
            fail(f"{model_dir}: no tokenizer.json and config.json does not say \"lora_rs_tokenizer\": \"bytes\"")
        from transformers import PreTrainedTokenizerFast
        self.tok = PreTrainedTokenizerFast(tokenizer_file=path)
        self.name = path

    def encode(self, text):
        """(token ids, UTF-8 byte count of each token)."""
        if self.bytes:
            ids = list(text.encode("utf-8"))
            return ids, [1] * len(ids)
        enc = self.tok(text, add_special_tokens=True, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        # byte position of every character boundary
        pos = [0]
        for ch in text:
            pos.append(pos[-1] + len(ch.encode("utf-8")))
        counts, prev = [], 0
        for _, end in offsets:
            end = max(prev, end)
            counts.append(pos[end] - pos[prev])
            prev = end
        return ids, counts


def windows(ids, counts, n):
    return [(ids[i:i + n], counts[i:i + n]) for i in range(0, len(ids), n)]


# ---------------------------------------------------------------------------------------------------------------
# Models


def load_model(model_dir, adapters):
    import transformers
    from transformers import AutoModelForCausalLM
    # `torch_dtype` is called `dtype` from transformers 4.56 on (the old name warns there).
    new = tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (4, 56)
    kw = {"dtype": torch.float32} if new else {"torch_dtype": torch.float32}
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", **kw)
    if adapters:
        from peft import PeftModel
        (first, path), rest = adapters[0], adapters[1:]
        model = PeftModel.from_pretrained(model, path, adapter_name=first)
        for name, path in rest:
            model.load_adapter(path, adapter_name=name)
    model.eval()
    for p in model.parameters():
        if p.dtype != torch.float32:
            fail(f"a parameter is {p.dtype}, not float32")
    return model


class Active:
    """Context manager: run with adapter `name` active, or every adapter disabled for "base"."""

    def __init__(self, model, name):
        self.model, self.name, self.ctx = model, name, None

    def __enter__(self):
        if self.name == "base":
            if hasattr(self.model, "disable_adapter"):
                self.ctx = self.model.disable_adapter()
                self.ctx.__enter__()
        else:
            self.model.set_adapter(self.name)
        return self

    def __exit__(self, *exc):
        if self.ctx is not None:
            return self.ctx.__exit__(*exc)
        return False


def window_losses(model, wins, batch):
    """Per-token losses (nats, float64 from float32 logits) of every window, in order."""
    out = [None] * len(wins)
    by_len = {}
    for i, (w, _) in enumerate(wins):
        if len(w) >= 2:
            by_len.setdefault(len(w), []).append(i)
        else:
            out[i] = []
    with torch.no_grad():
        for L, idx in by_len.items():
            for s in range(0, len(idx), batch):
                chunk = idx[s:s + batch]
                x = torch.tensor([wins[i][0] for i in chunk], dtype=torch.long)
                logits = model(input_ids=x).logits
                lp = F.log_softmax(logits[:, :-1].double(), dim=-1)
                nll = -lp.gather(-1, x[:, 1:, None]).squeeze(-1)
                for j, i in enumerate(chunk):
                    out[i] = nll[j].tolist()
    return out


# ---------------------------------------------------------------------------------------------------------------
# Comparison


def load_ours(path, data_name):
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        fail(f"--ours {path}: {e}")
    if isinstance(d, dict) and isinstance(d.get("token_losses"), dict):   # a file written by --json
        d = d["token_losses"]
    if not isinstance(d, dict) or data_name not in d:
        keys = list(d) if isinstance(d, dict) else type(d).__name__
        fail(f"--ours {path}: no entry {data_name!r} (has {keys})")
    return d[data_name]


def compare(name, hf_wins, ours_wins, rtol):
    """(ok, max relative difference, description of the worst place)."""
    hf = [(i, w) for i, w in enumerate(hf_wins) if w]
    ours = [(i, w) for i, w in enumerate(ours_wins) if w]
    if len(hf) != len(ours):
        return False, math.inf, f"{len(ours)} non-empty windows in ours, {len(hf)} here"
    worst, where = 0.0, "-"
    for (hi, h), (oi, o) in zip(hf, ours):
        if len(h) != len(o):
            return False, math.inf, f"window {hi}: {len(o)} losses in ours (its window {oi}), {len(h)} here"
        for pos, (hv, ov) in enumerate(zip(h, o)):
            if not isinstance(ov, (int, float)) or isinstance(ov, bool) or not math.isfinite(ov):
                return False, math.inf, f"window {hi} position {pos}: ours is {ov!r}, hf {hv!r}"
            rel = abs(ov - hv) / max(abs(hv), 1e-6)
            if rel > worst:
                worst, where = rel, f"window {hi} position {pos} (predicting token {pos + 1}): ours {ov!r}, hf {hv!r}"
    return worst <= rtol, worst, where


def main():
    a = parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg_path = os.path.join(a.model, "config.json")
    try:
        with open(cfg_path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        fail(f"{cfg_path}: {e}")
    n = a.context or config.get("max_position_embeddings")
    if not n:
        fail("no --context and no max_position_embeddings in config.json")
    if n > config.get("max_position_embeddings", n):
        print(f"hf_lm_parity: warning: context {n} > max_position_embeddings {config['max_position_embeddings']}",
              file=sys.stderr)
    vocab = config.get("vocab_size")

    tok = Tokeniser(a.model, config)
    wins = []
    for text in read_texts(a.data):
        ids, counts = tok.encode(text)
        wins.extend(windows(ids, counts, n))
    top = max((max(w) for w, _ in wins if w), default=-1)
    if vocab is not None and top >= vocab:
        fail(f"token id {top} is outside the model's vocabulary of {vocab}")
    n_bytes = sum(sum(c[1:]) for w, c in wins if len(w) >= 2)

    model = load_model(a.model, a.adapters)
    names = ["base"] + [name for name, _ in a.adapters]
    data_name = os.path.basename(a.data)
    results, losses = {}, {}
    print(f"{data_name}: {len(wins)} windows of up to {n} tokens, tokeniser {tok.name}")
    for name in names:
        with Active(model, name):
            ls = window_losses(model, wins, a.batch)
        total = sum(sum(w) for w in ls)
        count = sum(len(w) for w in ls)
        r = {"mean_nats_per_token": total / count if count else None,
             "bits_per_byte": total / math.log(2) / n_bytes if n_bytes else None,
             "tokens": count, "bytes": n_bytes}
        results[name], losses[name] = r, ls
        mean = f"{r['mean_nats_per_token']:.6f}" if count else "-"
        bpb = f"{r['bits_per_byte']:.6f}" if n_bytes else "-"
        print(f"  {name:<16} {mean} nats/token  {bpb} bits/byte  {count} tokens")

    if a.json_out:
        import transformers
        import peft
        with open(a.json_out, "w") as f:
            json.dump({"model": a.model, "adapters": dict(a.adapters), "data": a.data, "context": n,
                       "tokenizer": tok.name, "results": results, "token_losses": {data_name: losses},
                       "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                    "peft": peft.__version__}}, f)
            f.write("\n")

    if not a.ours:
        return 0
    ours = load_ours(a.ours, data_name)
    bad = []
    for name in names:
        if name not in ours:
            bad.append(name)
            print(f"  {name:<16} missing from {a.ours} (has {list(ours)})")
            continue
        ok, worst, where = compare(name, losses[name], ours[name], a.rtol)
        if math.isinf(worst):
            print(f"  {name:<16} cannot compare: {where}")
        else:
            print(f"  {name:<16} max relative difference {worst:.3e}" + ("" if ok else f"  > {a.rtol:g} at {where}"))
        if not ok:
            bad.append(name)
    if bad:
        print(f"disagree: {', '.join(bad)}")
        return 1
    total = sum(results[nm]["tokens"] for nm in names)
    print(f"agree: {len(names)} models, {total} token losses within relative {a.rtol:g} of transformers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
