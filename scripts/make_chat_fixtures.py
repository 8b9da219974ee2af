"""Writes tests/fixtures/chat/: real chat templates, what transformers renders with them, and the input ids and
labels TRL's SFTTrainer builds for instruction data in each of its formats, for testing that lora-rs renders
templates as transformers does and puts the loss on the tokens TRL puts it on.

Usage:  python3 scripts/make_chat_fixtures.py [--out tests/fixtures/chat]
Needs transformers, trl, tokenizers, jinja2 and torch (CPU). No network: the templates come from the installed
`trl` package (trl/chat_templates/, which stores the original templates of the model repos byte for byte, and
TRL's training variants with {% generation %} marks) and from templates/mistral_nemo.jinja, committed (see
README.md). Rerunning it with the same library versions rewrites the same bytes.

Writes (everything but templates/mistral_nemo.jinja and README.md's hand-written part is regenerated):
  templates/*.jinja         the templates (see TEMPLATES)
  rendered.json             per template and conversation: transformers' apply_chat_template(tokenize=False) text,
                            or the error message the template raised
  trl/tokenizer.json        a byte-level BPE tokenizer (every family's control tokens added), no BOS added
  trl/tokenizer-bos.json    the same with a post-processor adding <|begin_of_text|> (as Llama 3's)
  trl/{text,prompt_completion,messages,chat_prompt_completion}.jsonl   instruction rows in TRL's four formats
  trl/expected.json         per case (tokenizer, template, rows, loss settings): TRL's input_ids and labels per row
"""
import argparse
import json
import os
import platform
import shutil
import tempfile
import warnings

import jinja2
import tokenizers
import torch
import transformers
import trl
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import SFTConfig, SFTTrainer

warnings.filterwarnings("ignore")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRL_TEMPLATES = os.path.join(os.path.dirname(trl.__file__), "chat_templates")

# ChatML as transformers' chat-template documentation writes it (also lora-rs' default, lora_lm::chat::CHATML).
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
          "'\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

# name -> (source file in trl/chat_templates or None, special tokens as the model repo's tokenizer_config.json sets them)
TEMPLATES = {
    "llama3": ("llama3.jinja", {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
    "llama3_2": ("llama3_2.jinja", {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
    "qwen2_5": ("qwen2_5.jinja", {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}),
    "gemma2": ("gemma.jinja", {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>"}),
    "phi3_5": ("phi3_5.jinja", {"bos_token": "<s>", "eos_token": "<|endoftext|>", "unk_token": "<unk>"}),
    "mistral_nemo": (None, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}),
    "chatml": (None, {"eos_token": "<|im_end|>"}),
    "llama3_training": ("llama3_training.jinja", {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
    "qwen2_5_training": ("qwen2_5_training.jinja", {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}),
}

CONVERSATIONS = {
    "one_user": [{"role": "user", "content": "What is 2 + 2?"}],
    "system_multi": [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
    ],
    "user_assistant": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}],
    "whitespace_unicode": [
        {"role": "user", "content": "  Trim me?\n\n"},
        {"role": "assistant", "content": "\n Déjà vu: \"∑\" {x}\t"},
        {"role": "user", "content": "ok"},
        {"role": "assistant", "content": "done "},
    ],
    "two_users": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
}
# Llama 3.1/3.2 print today's date unless given one.
EXTRA = {"llama3_2": {"date_string": "26 Jul 2024"}}

CONTROL = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
           "<|eot_id|>", "<bos>", "<eos>", "<pad>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<s>", "</s>", "<|user|>",
           "<|assistant|>", "<|system|>", "<|end|>", "[INST]", "[/INST]"]
CORPUS = [
    "What is 2 + 2? It is 4. What is the capital of France? Paris is the capital of France.",
    "def add(a, b):\n    return a + b\n", "SELECT name FROM users WHERE id = 1;", "Say hi. Hi! Hello there.",
    "You answer in one word. And of Italy? Rome.", "Translate to French: cat -> chat, dog -> chien.",
    "Write a haiku about rust: metal slowly turns to red.", "assistant user system: the roles of a chat.",
]

ROWS = {
    "text": [
        {"text": "The capital of France is Paris."},
        {"text": "def add(a, b):\n    return a + b\n"},
        {"text": "Already ends with the end token<|im_end|>"},
    ],
    "prompt_completion": [
        {"prompt": "The capital of France is", "completion": " Paris."},
        {"prompt": "def add(a, b):\n", "completion": "    return a + b\n"},
        {"prompt": "Q: 2 + 2?\nA:", "completion": " 4<|im_end|>"},
    ],
    "messages": [
        {"messages": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "It is 4."}]},
        {"messages": [{"role": "system", "content": "You answer in one word."},
                      {"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."},
                      {"role": "user", "content": "And of Italy?"}, {"role": "assistant", "content": "Rome."}]},
        {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "  Hi!\n"}]},
    ],
    "chat_prompt_completion": [
        {"prompt": [{"role": "user", "content": "What is 2 + 2?"}], "completion": [{"role": "assistant", "content": "It is 4."}]},
        {"prompt": [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Capital of France?"}],
         "completion": [{"role": "assistant", "content": "Paris."}]},
        {"prompt": [{"role": "user", "content": "Say hi."}], "completion": [{"role": "assistant", "content": "  Hi!\n"}]},
    ],
}

# (tokenizer file, template, rows, assistant_only_loss, completion_only_loss): what TRL builds for each.
CASES = [
    ("tokenizer.json", "chatml", "text", False, None),
    ("tokenizer.json", "chatml", "prompt_completion", False, None),
    ("tokenizer.json", "chatml", "prompt_completion", False, False),
    ("tokenizer.json", "chatml", "messages", False, None),
    ("tokenizer.json", "chatml", "chat_prompt_completion", False, None),
    ("tokenizer.json", "qwen2_5", "chat_prompt_completion", False, None),
    ("tokenizer.json", "qwen2_5_training", "messages", True, None),
    ("tokenizer.json", "qwen2_5_training", "chat_prompt_completion", True, None),
    ("tokenizer-bos.json", "llama3", "text", False, None),
    ("tokenizer-bos.json", "llama3", "prompt_completion", False, None),
    ("tokenizer-bos.json", "llama3", "chat_prompt_completion", False, None),
    ("tokenizer-bos.json", "llama3_training", "messages", True, None),
    ("tokenizer-bos.json", "phi3_5", "chat_prompt_completion", False, None),
]


def build_tokenizer(bos: bool) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.add_special_tokens(CONTROL)
    steps = [processors.ByteLevel(trim_offsets=False)]
    if bos:
        bos_id = tok.token_to_id("<|begin_of_text|>")
        steps.append(processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                                                   special_tokens=[("<|begin_of_text|>", bos_id)]))
    tok.post_processor = processors.Sequence(steps)
    return tok


def fast(tok_file: str, special: dict, template: str) -> PreTrainedTokenizerFast:
    f = PreTrainedTokenizerFast(tokenizer_file=tok_file, **special)
    f.chat_template = template
    return f


def trl_labels(tok_file, template, special, rows, assistant_only, completion_only):
    tokenizer = fast(tok_file, special, template)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=512)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(output_dir=out, report_to=[], max_length=None, packing=False,
                         assistant_only_loss=assistant_only, completion_only_loss=completion_only,
                         use_cpu=True, dataset_num_proc=None)
        t = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
        ds = t.train_dataset
        return [{"input_ids": list(r["input_ids"]), "labels": list(r["labels"])} for r in ds]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures", "chat"))
    out = ap.parse_args().out
    tdir = os.path.join(out, "templates")
    os.makedirs(tdir, exist_ok=True)
    sources = {}
    for name, (src, _) in TEMPLATES.items():
        path = os.path.join(tdir, f"{name}.jinja")
        if src is not None:
            shutil.copyfile(os.path.join(TRL_TEMPLATES, src), path)
        elif name == "chatml":
            with open(path, "w", encoding="utf-8") as f:
                f.write(CHATML)
        with open(path, encoding="utf-8") as f:
            sources[name] = f.read()

    # 1. Rendering: transformers' apply_chat_template on a tokenizer built with the template and special tokens.
    plain = build_tokenizer(bos=False)
    with tempfile.TemporaryDirectory() as tmp:
        tok_file = os.path.join(tmp, "tokenizer.json")
        plain.save(tok_file)
        rendered = {}
        for name, (_, special) in TEMPLATES.items():
            f = fast(tok_file, special, sources[name])
            cases = []
            for conv_name, conv in CONVERSATIONS.items():
                for gen in (False, True):
                    case = {"conversation": conv_name, "add_generation_prompt": gen}
                    try:
                        case["text"] = f.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen, **EXTRA.get(name, {}))
                    except jinja2.exceptions.TemplateError as e:
                        case["error"] = str(e)
                    cases.append(case)
            rendered[name] = {"special_tokens": special, "extra": EXTRA.get(name, {}), "cases": cases}
    with open(os.path.join(out, "rendered.json"), "w", encoding="utf-8") as f:
        json.dump({"conversations": CONVERSATIONS, "templates": rendered}, f, indent=1, ensure_ascii=False)
        f.write("\n")

    # 2. TRL's input ids and labels.
    tr = os.path.join(out, "trl")
    os.makedirs(tr, exist_ok=True)
    build_tokenizer(bos=False).save(os.path.join(tr, "tokenizer.json"))
    build_tokenizer(bos=True).save(os.path.join(tr, "tokenizer-bos.json"))
    for fmt, rows in ROWS.items():
        with open(os.path.join(tr, f"{fmt}.jsonl"), "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    expected = []
    for tok_name, template, fmt, assistant_only, completion_only in CASES:
        special = TEMPLATES[template][1]
        got = trl_labels(os.path.join(tr, tok_name), sources[template], special, ROWS[fmt], assistant_only, completion_only)
        expected.append({"tokenizer": tok_name, "template": template, "special_tokens": special, "rows": f"{fmt}.jsonl",
                         "assistant_only_loss": assistant_only, "completion_only_loss": completion_only, "examples": got})
        trained = sum(sum(1 for x in e["labels"] if x != -100) for e in got)
        total = sum(len(e["labels"]) for e in got)
        print(f"{tok_name:18} {template:17} {fmt:23} assistant_only={assistant_only!s:5} "
              f"completion_only={completion_only!s:5}: {trained}/{total} tokens trained")
    versions = {"python": platform.python_version(), "transformers": transformers.__version__, "trl": trl.__version__,
                "tokenizers": tokenizers.__version__, "jinja2": jinja2.__version__, "torch": torch.__version__}
    with open(os.path.join(tr, "expected.json"), "w", encoding="utf-8") as f:
        json.dump({"versions": versions, "cases": expected}, f, indent=None, ensure_ascii=False)
        f.write("\n")
    with open(os.path.join(out, "versions.json"), "w", encoding="utf-8") as f:
        json.dump(versions, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
