"""Writes tests/fixtures/llama-peft-tiny/tokenizer/: a tiny Llama/SentencePiece-style BPE tokenizer.json (96 tokens,
the vocabulary size of the fixture's model) trained by Hugging Face `tokenizers`, the files transformers needs to
load it with AutoTokenizer, and the ids, offsets, decoded texts and per-token losses (base/ and base/ + adapter/)
of three fixed texts, for testing that lora-rs tokenises like transformers and scores tokenised text the same.

Usage:  python3 scripts/make_tokenizer_fixture.py [--fixture tests/fixtures/llama-peft-tiny]
Needs tokenizers, transformers, torch, peft, safetensors, and the fixture written by scripts/make_llama_fixture.py
(that script empties the whole fixture directory: run this one after it). CPU, float32, one thread; training the
tokenizer is deterministic: rerunning it with the same library versions rewrites byte-identical files.

Writes (tokenizer/ is emptied first; nothing else in the fixture is touched except README.md):
  tokenizer/tokenizer.json           the tokenizer (see TOKENIZER below)
  tokenizer/tokenizer_config.json    as PreTrainedTokenizerFast.save_pretrained writes it
  tokenizer/special_tokens_map.json  as transformers 4.x save_pretrained writes it (5.x no longer does)
  tokenizer/expected.json            ids, offsets, tokens, decoded texts and token losses of TEXTS
  README.md                          the section "## tokenizer/" is replaced (or appended when absent)
"""
import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import warnings

import safetensors
import tokenizers
import torch
import torch.nn.functional as F
import transformers
import peft
from peft import PeftModel
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast

warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB_SIZE = 96                      # the fixture model's vocab_size: every id must be below it
CONTEXT = 64                         # the fixture model's max_position_embeddings
SPECIAL = ["<unk>", "<s>", "</s>"]   # ids 0, 1, 2 (the BpeTrainer puts special tokens first, in this order)
META = "\u2581"                      # "▁", SentencePiece's space marker
# The initial alphabet: every character the tokenizer knows. Anything else (upper case, accents, newlines, tabs)
# becomes <unk>. 3 special + 26 + 10 + 1 + 16 = 56 tokens, leaving 40 for merges.
ALPHABET = list("abcdefghijklmnopqrstuvwxyz") + list("0123456789") + [META] + list("();,.=*'\"_<>+-{}")

# The training corpus: lower-case SQL- and JavaScript-like lines, only characters of ALPHABET (and spaces).
CORPUS = [
    "select name from users where id = 1;",
    "select id, name, email from users order by name;",
    "select count(*) from orders where total > 100;",
    "select * from orders where user_id = 42 and status = 'open';",
    "insert into users (id, name) values (7, 'ada');",
    "insert into orders (user_id, total) values (3, 250);",
    "update users set name = 'bob' where id = 2;",
    "update orders set status = 'done' where total < 10;",
    "delete from orders where status = 'void';",
    "select u.name, o.total from users u join orders o on o.user_id = u.id;",
    "select name from users where name like 'a_' limit 5;",
    "create table users (id int primary key, name text);",
    "create table orders (id int, user_id int, total int);",
    "drop table if exists tmp_users;",
    "select max(total), min(total) from orders group by user_id;",
    "select distinct status from orders;",
    "select id from users where id in (1, 2, 3);",
    "alter table users add column email text;",
    "select sum(total) as s from orders where user_id <> 0;",
    "select name from users where id >= 10 and id <= 20;",
    "function add(a, b) { return a + b; }",
    "function sub(a, b) { return a - b; }",
    "const total = items.length * 2;",
    "let name = \"ada\";",
    "var count = 0;",
    "for (let i = 0; i < 10; i++) { count += i; }",
    "if (x > 0) { return x; } else { return -x; }",
    "const user = new_user(1, 'bob');",
    "function get_name(user) { return user.name; }",
    "console.log(\"total\", total);",
    "while (n > 1) { n = n - 1; }",
    "const items = list(1, 2, 3).map(x => x * 2);",
    "return a === b;",
    "let s = 'select' + \" from\";",
    "function max(a, b) { if (a > b) { return a; } return b; }",
    "const sum = items.reduce((a, b) => a + b, 0);",
    "if (name == null) { name = 'none'; }",
    "export function run() { return main(); }",
    "let ok = true, done = false;",
    "count = count + 1;",
]

TEXTS = [
    "select name from users where id = 1;",
    "function add(a, b) { return a + b; }",
    "SELECT é ∑ from t;",               # upper case, a 2-byte and a 3-byte UTF-8 character: all <unk>
]

TOKENIZER = """\
model: BPE (unk_token "<unk>", no byte fallback, fuse_unk false, no dropout) trained by tokenizers' BpeTrainer
  (vocab_size {vocab}, special tokens <unk> <s> </s> = ids 0 1 2, initial_alphabet of {n_alpha} characters: a-z, 0-9,
  "{meta}", ( ) ; , . = * ' " _ < > + - {{ }}) on the {n_lines} built-in lines of scripts/make_tokenizer_fixture.py;
normalizer: none;
pre_tokenizer: Metaspace (replacement "{meta}", prepend_scheme "first", split true);
post_processor: TemplateProcessing, single "<s> $A", pair "<s> $A <s> $B:1" (as Llama's tokenizer.json);
decoder: Metaspace (replacement "{meta}", prepend_scheme "first", split true)."""


def build_tokenizer():
    bad = sorted({c for line in CORPUS for c in line if c != " " and c not in ALPHABET})
    assert not bad, f"corpus characters outside the alphabet: {bad}"
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=META, prepend_scheme="first", split=True)
    tok.decoder = decoders.Metaspace(replacement=META, prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=SPECIAL,
                                  initial_alphabet=ALPHABET, limit_alphabet=len(ALPHABET), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    vocab = tok.get_vocab(with_added_tokens=True)
    assert len(vocab) == VOCAB_SIZE, len(vocab)
    assert max(vocab.values()) == VOCAB_SIZE - 1
    assert [tok.token_to_id(s) for s in SPECIAL] == [0, 1, 2]
    missing = [c for c in ALPHABET if c not in vocab]
    assert not missing, f"alphabet characters missing from the vocabulary: {missing}"
    return tok


def load_model(path):
    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def token_losses(model, ids):
    """Cross-entropy in nats of token i+1 given tokens <= i, from float32 logits (computed in float64)."""
    x = torch.tensor([ids], dtype=torch.long)
    with torch.no_grad():
        logits = model(input_ids=x).logits
    assert logits.dtype == torch.float32, logits.dtype
    lp = F.log_softmax(logits[:, :-1].double(), dim=-1)
    return [float(v) for v in -lp.gather(-1, x[:, 1:, None]).squeeze(-1)[0]]


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def byte_offsets(text, offsets):
    pos = [0]
    for ch in text:
        pos.append(pos[-1] + len(ch.encode("utf-8")))
    return [[pos[s], pos[e]] for s, e in offsets]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fixture", default=os.path.join(ROOT, "tests", "fixtures", "llama-peft-tiny"))
    fixture = ap.parse_args().fixture
    base_dir, adapter_dir = os.path.join(fixture, "base"), os.path.join(fixture, "adapter")
    for p in [os.path.join(base_dir, "model.safetensors"), os.path.join(adapter_dir, "adapter_model.safetensors")]:
        if not os.path.exists(p):
            sys.exit(f"{p} missing: run scripts/make_llama_fixture.py first")
    with open(os.path.join(base_dir, "config.json")) as f:
        config = json.load(f)
    assert config["vocab_size"] == VOCAB_SIZE and config["max_position_embeddings"] == CONTEXT, config
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    out = os.path.join(fixture, "tokenizer")
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out)

    tok = build_tokenizer()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   model_max_length=CONTEXT)
    fast.save_pretrained(out)
    # transformers 5 no longer writes special_tokens_map.json; write the one 4.x would, for older loaders.
    special_map = os.path.join(out, "special_tokens_map.json")
    if not os.path.exists(special_map):
        with open(special_map, "w") as f:
            json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, f, indent=2, sort_keys=True)
            f.write("\n")
    tok_file = os.path.join(out, "tokenizer.json")
    assert Tokenizer.from_file(tok_file).to_str() == tok.to_str(), "saved tokenizer.json differs from the trained one"

    # The numbers come from the files as saved, loaded back the way hf_lm_parity.py and a user would load them.
    hf = PreTrainedTokenizerFast(tokenizer_file=tok_file)
    auto = AutoTokenizer.from_pretrained(out)
    raw = Tokenizer.from_file(tok_file)
    base = load_model(base_dir)
    adapted = PeftModel.from_pretrained(load_model(base_dir), adapter_dir).eval()
    rows = []
    for text in TEXTS:
        enc = hf(text, add_special_tokens=True, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), [list(o) for o in enc["offset_mapping"]]
        assert auto(text)["input_ids"] == ids, "AutoTokenizer disagrees"
        r = raw.encode(text)
        assert r.ids == ids and [list(o) for o in r.offsets] == offsets, "tokenizers.Tokenizer disagrees"
        assert ids[0] == 1 and max(ids) < VOCAB_SIZE and len(ids) <= CONTEXT
        decoded = hf.decode(ids, skip_special_tokens=True)
        assert auto.decode(ids, skip_special_tokens=True) == decoded
        rows.append({
            "text": text,
            "input_ids": ids,
            "tokens": hf.convert_ids_to_tokens(ids),
            "offsets": offsets,
            "byte_offsets": byte_offsets(text, offsets),
            "decoded": decoded,
            "decoded_with_special": hf.decode(ids, skip_special_tokens=False),
            "round_trips": decoded == text,
            "base_token_losses": token_losses(base, ids),
            "adapter_token_losses": token_losses(adapted, ids),
        })
    assert rows[0]["round_trips"] and rows[1]["round_trips"], [r["decoded"] for r in rows]
    assert 0 in rows[2]["input_ids"], "the third text should contain <unk>"

    versions = {"python": platform.python_version(), "tokenizers": tokenizers.__version__,
                "transformers": transformers.__version__, "torch": torch.__version__, "peft": peft.__version__,
                "safetensors": safetensors.__version__}
    expected = {
        "tokenizer": "tokenizer.json",
        "vocab_size": VOCAB_SIZE,
        "special_tokens": {"unk": 0, "bos": 1, "eos": 2},
        "offsets_are": "character (Unicode scalar) indices into text, as transformers' fast tokenizer returns them; "
                       "byte_offsets are the same spans in UTF-8 bytes, as the Rust tokenizers crate returns them",
        "losses_are": "nats of input_ids[i+1] given input_ids[..=i], log-softmax in float64 of float32 logits, "
                      "whole text as one sequence; base = base/, adapter = base/ + adapter/ (PeftModel)",
        "texts": rows,
        "model_files_sha256": {"base/model.safetensors": sha256(os.path.join(base_dir, "model.safetensors")),
                               "adapter/adapter_model.safetensors":
                                   sha256(os.path.join(adapter_dir, "adapter_model.safetensors"))},
        "versions": versions,
    }
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1, ensure_ascii=False)
        f.write("\n")

    write_readme(os.path.join(fixture, "README.md"), versions)

    for r in rows:
        print(f"{r['text']!r}: {len(r['input_ids'])} tokens, base mean loss "
              f"{sum(r['base_token_losses']) / len(r['base_token_losses']):.4f}, adapter "
              f"{sum(r['adapter_token_losses']) / len(r['adapter_token_losses']):.4f} nats "
              f"(uniform {math.log(VOCAB_SIZE):.4f}); decoded {r['decoded']!r}", file=sys.stderr)
    total = 0
    for fn in sorted(os.listdir(out)):
        size = os.path.getsize(os.path.join(out, fn))
        total += size
        print(f"{size:8d}  tokenizer/{fn}", file=sys.stderr)
    print(f"{total:8d}  total", file=sys.stderr)


README_HEADING = "## tokenizer/"
README = """\
## tokenizer/

A Llama/SentencePiece-style tokenizer for this model, and what transformers {transformers} makes of three texts
with it. Made by `python3 scripts/make_tokenizer_fixture.py` (run it after `make_llama_fixture.py`, which empties
this whole directory) with Python {python}, tokenizers {tokenizers}, transformers {transformers}, torch {torch},
peft {peft}; training is deterministic, rerunning it with the same versions rewrites the same bytes.

- `tokenizer.json`: {vocab} tokens in all (the model's vocabulary size), written by tokenizers {tokenizers}:
{tokenizer}
  Characters outside the alphabet (upper case, accents, newlines, ...) become `<unk>`, one per character.
- `tokenizer_config.json`: as `PreTrainedTokenizerFast.save_pretrained` writes it (transformers {transformers}:
  `"tokenizer_class": "TokenizersBackend"`, which transformers 4.x does not know), `model_max_length` {context};
  `special_tokens_map.json`: as transformers 4.x writes it (5.x no longer does). `AutoTokenizer.from_pretrained`
  loads the folder.
- `expected.json`: for each of the texts, `input_ids` of
  `PreTrainedTokenizerFast(tokenizer_file="tokenizer.json")(text, add_special_tokens=True)` (they start with
  `<s>` = 1), `tokens`, `offsets` (`return_offsets_mapping=True`: character indices; `<s>` is [0, 0]; the "{meta}"
  that Metaspace prepends to the first word counts in no character, so the first token's span starts at 0 and a
  lone prepended "{meta}" token gets the first character's span, overlapping the token after it; a "{meta}" made
  from a space spans that space), `byte_offsets` (the same spans in UTF-8 bytes, as the Rust `tokenizers` crate
  reports them), `decoded` (`decode(ids, skip_special_tokens=True)`; the third text, with `<unk>`s, does not
  round-trip), and `base_token_losses` / `adapter_token_losses`: nats of token i+1 given tokens 0..i of the
  whole text as one sequence, from `base/` alone and `base/` + `adapter/` (PeftModel), log-softmax of the
  float32 logits in float64. Also the SHA-256 of the model files the losses came from, and `versions`.
"""


def write_readme(path, versions):
    """Replace this section of README.md (from its heading to the end), or append it: rerunning changes nothing."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    at = text.find("\n" + README_HEADING + "\n")
    if at >= 0:
        text = text[:at + 1]
    tokenizer = "\n".join("  " + line for line in TOKENIZER.format(
        vocab=VOCAB_SIZE, n_alpha=len(ALPHABET), meta=META, n_lines=len(CORPUS)).split("\n"))
    section = README.format(vocab=VOCAB_SIZE, context=CONTEXT, meta=META, tokenizer=tokenizer, **versions)
    text = text.rstrip("\n") + "\n\n" + section
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


if __name__ == "__main__":
    main()
