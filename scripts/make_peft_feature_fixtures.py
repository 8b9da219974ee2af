"""Writes tests/fixtures/peft-features/: adapters saved by real Hugging Face PEFT for the LoRA features beyond plain
LoRA, each with the numbers PEFT computes from them, so lora-rs can be checked against PEFT itself:

  base.safetensors     an MLP Net 20 -> 16 -> 12 -> 10 (linear1..linear3, ReLU), PyTorch default init, seed 0
  inputs.json          x (8 x 20, torch.randn, seed 1) and base_logits (8 x 10)
  dora/                use_dora=True, magnitudes perturbed
  dora_rslora/         use_dora + use_rslora + rank_pattern + alpha_pattern
  lora_bias/           lora_bias=True (a bias on every lora_B)
  bias_all/            bias="all" (every bias of the model is trained and saved)
  bias_lora_only/      bias="lora_only" (the biases of the targeted layers are trained and saved)
  modules_to_save/     modules_to_save=["linear3"] (a full trainable copy of linear3)
  pissa/, olora/       init_lora_weights="pissa" / "olora": initial/, adapter/ (trained), converted/ (plain LoRA
                       made by save_pretrained(path_initial_model_for_weight_conversion=...))
  combinations/        three adapters a, b, c and what add_weighted_adapter makes of them, every combination type
  loraplus/            create_loraplus_optimizer's parameter groups and 3 AdamW steps
  llama-embedding/, llama-dora/, llama-modules-to-save/
                       the same on the tiny Llama of tests/fixtures/llama-peft-tiny/base
  README.md            what every case is and every key of every expected.json

Every case directory has adapter/ (PeftModel.save_pretrained output, the PEFT model-card README.md deleted,
base_model_name_or_path set to null for the MLP and "base" for the Llama) and expected.json with at least "config"
(the LoraConfig kwargs), "logits" (PeftModel, eval mode, adapter active, unmerged) and "merged_logits" (after
merge_and_unload() of a copy). Every float32 is written as float(np.float32 value), whose Python repr reads back as
the same float32; matrices are nested lists of rows.

CPU, float32, torch.set_num_threads(1), torch.manual_seed per case: rerunning it with the same versions rewrites the
same bytes. It was run with Python 3.11.7, torch 2.15.0+cu132, transformers 5.24.0, peft 0.21.2, safetensors 0.8.0,
numpy 2.4.6.

Venv once:  python3 -m venv /tmp/torch-venv && /tmp/torch-venv/bin/pip install torch transformers peft numpy safetensors
Usage:      /tmp/torch-venv/bin/python scripts/make_peft_feature_fixtures.py [--out tests/fixtures/peft-features]
            (run from the repository root; it deletes and recreates the output directory)
Check an adapter against logits computed elsewhere: scripts/peft_check.py.
"""
import argparse
import copy
import json
import os
import platform
import re
import shutil
import textwrap
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import peft
import safetensors
import safetensors.torch
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from peft.optimizers import create_loraplus_optimizer

warnings.filterwarnings("ignore")
transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA_DIR = os.path.join(ROOT, "tests", "fixtures", "llama-peft-tiny")
MLP_LAYERS = ["linear1", "linear2", "linear3"]
TOL = 1e-5


class Net(torch.nn.Module):
    def __init__(self, dims=(20, 16, 12, 10)):
        super().__init__()
        self.linear1 = torch.nn.Linear(dims[0], dims[1])
        self.linear2 = torch.nn.Linear(dims[1], dims[2])
        self.linear3 = torch.nn.Linear(dims[2], dims[3])

    def forward(self, x):
        return self.linear3(torch.relu(self.linear2(torch.relu(self.linear1(x)))))


# ---------------------------------------------------------------------------------------------------------------
# helpers


def fl(t):
    """A tensor as (nested lists of) Python floats, each float(np.float32 value)."""
    if isinstance(t, torch.Tensor):
        t = t.detach().to(torch.float32).cpu().numpy()
    a = np.asarray(t, dtype=np.float32)
    return a.tolist() if a.ndim else float(a)


def f32(v):
    return float(np.float32(v))


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, separators=(",", ":"))
        f.write("\n")


def load_base(out):
    net = Net()
    net.load_state_dict(safetensors.torch.load_file(os.path.join(out, "base.safetensors")))
    return net.eval()


def load_llama():
    m = transformers.LlamaForCausalLM.from_pretrained(os.path.join(LLAMA_DIR, "base"), dtype=torch.float32)
    return m.eval()


def llama_ids():
    with open(os.path.join(LLAMA_DIR, "expected.json")) as f:
        return torch.tensor(json.load(f)["input_ids"], dtype=torch.long)


def forward(model, inp):
    model.eval()
    with torch.no_grad():
        if inp.dtype == torch.long:
            out = model(input_ids=inp).logits
        else:
            out = model(inp)
    assert out.dtype == torch.float32
    return out


def merged_forward(model, inp):
    m = copy.deepcopy(model).merge_and_unload()
    return forward(m, inp)


def logits_entry(t):
    """MLP logits as rows; Llama logits flattened row-major with their shape."""
    if t.dim() == 2:
        return fl(t)
    return fl(t.reshape(-1))


def randomize_lora(model, scale=0.3, embedding=True):
    """Every lora_A / lora_B weight (and lora_embedding_A / _B) <- randn * scale, in named_parameters order."""
    for name, p in model.named_parameters():
        is_ab = (".lora_A." in name or ".lora_B." in name) and name.endswith(".weight")
        is_emb = embedding and (".lora_embedding_A." in name or ".lora_embedding_B." in name)
        if is_ab or is_emb:
            p.data = torch.randn_like(p) * scale


def perturb_magnitudes(model):
    """Every DoRA lora_magnitude_vector weight *= U(0.8, 1.2)."""
    n = 0
    for name, p in model.named_parameters():
        if "lora_magnitude_vector" in name:
            p.data = p.data * torch.empty_like(p).uniform_(0.8, 1.2)
            n += 1
    assert n > 0


def saved_keys(adapter_dir):
    with safetensors.safe_open(os.path.join(adapter_dir, "adapter_model.safetensors"), "pt") as f:
        return sorted(f.keys())


def tidy_adapter_dirs(out):
    """Delete PEFT's model cards (they name absolute paths); base_model_name_or_path -> null (MLP) or "base"."""
    for dirpath, _, files in sorted(os.walk(out)):
        if "README.md" in files and dirpath != out:
            os.remove(os.path.join(dirpath, "README.md"))
        if "adapter_config.json" in files:
            p = os.path.join(dirpath, "adapter_config.json")
            with open(p) as f:
                cfg = json.load(f)
            if cfg.get("base_model_name_or_path") is not None:
                cfg["base_model_name_or_path"] = "base"
            # PEFT keeps target_modules as a set and writes it in hash order, which changes from run to run
            # (PYTHONHASHSEED); sort it so rerunning writes the same bytes.
            for key in ("target_modules", "exclude_modules"):
                if isinstance(cfg.get(key), list):
                    cfg[key] = sorted(cfg[key])
            with open(p, "w") as f:
                f.write(json.dumps(cfg, indent=2, sort_keys=True))


def save_adapter(model, path, **kw):
    model.save_pretrained(path, **kw)
    card = os.path.join(path, "README.md")
    if os.path.exists(card):
        os.remove(card)


def reload_logits(out, adapter_dir, inp, llama=False):
    base = load_llama() if llama else load_base(out)
    m = PeftModel.from_pretrained(base, adapter_dir)
    return forward(m, inp), merged_forward(m, inp)


def check_close(what, a, b, tol=TOL):
    d = (a - b).abs().max().item()
    assert d <= tol, f"{what}: max abs diff {d}"
    return d


def layer_of(model, name):
    return model.base_model.model.get_submodule(name)


# ---------------------------------------------------------------------------------------------------------------
# cases


def plain_case(out, x, name, seed, config, perturb=None, llama=False, record_saved_keys=False, extra_notes=None):
    """get_peft_model(config), random A/B, optional extra perturbation, save adapter/, write expected.json."""
    case = os.path.join(out, name)
    os.makedirs(case)
    torch.manual_seed(seed)
    base = load_llama() if llama else load_base(out)
    model = get_peft_model(base, LoraConfig(**config))
    randomize_lora(model)
    if perturb is not None:
        perturb(model)
    logits = forward(model, x)
    merged = merged_forward(model, x)
    check_close(f"{name} merged vs unmerged", logits, merged, 1e-4)
    adapter = os.path.join(case, "adapter")
    save_adapter(model, adapter)
    rl, rm = reload_logits(out, adapter, x, llama)
    check_close(f"{name} reloaded", rl, logits)
    check_close(f"{name} reloaded merged", rm, merged)
    exp = {"config": config}
    if llama:
        exp["input_ids"] = x.tolist()
        exp["shape"] = list(logits.shape)
    exp["logits"] = logits_entry(logits)
    exp["merged_logits"] = logits_entry(merged)
    if record_saved_keys:
        exp["saved_keys"] = saved_keys(adapter)
    write_json(os.path.join(case, "expected.json"), exp)
    return exp


MLP_DEFAULT = dict(target_modules=MLP_LAYERS, r=2, lora_alpha=4, init_lora_weights=False)


def dora_cases(out, x):
    plain_case(out, x, "dora", 101, dict(MLP_DEFAULT, use_dora=True), perturb_magnitudes)
    plain_case(out, x, "dora_rslora", 102,
               dict(MLP_DEFAULT, use_dora=True, use_rslora=True, rank_pattern={"linear2": 4},
                    alpha_pattern={"linear3": 3.0}),
               perturb_magnitudes)


def bias_cases(out, x):
    def lora_b_bias(model):
        n = 0
        for name, p in model.named_parameters():
            if ".lora_B." in name and name.endswith(".bias"):
                p.data = torch.randn_like(p) * 0.3
                n += 1
        assert n == 3

    plain_case(out, x, "lora_bias", 103, dict(MLP_DEFAULT, lora_bias=True), lora_b_bias)

    def all_biases(model):
        net = model.base_model.model
        for layer in MLP_LAYERS:
            b = net.get_submodule(layer).bias  # a LoraLayer forwards .bias to its base layer
            b.data = b.data + torch.randn_like(b) * 0.1

    plain_case(out, x, "bias_all", 104, dict(MLP_DEFAULT, target_modules=["linear1", "linear2"], bias="all"),
               all_biases, record_saved_keys=True)

    def lora_biases(model):
        net = model.base_model.model
        for layer in ["linear1", "linear2"]:
            b = net.get_submodule(layer).base_layer.bias
            b.data = b.data + torch.randn_like(b) * 0.1

    plain_case(out, x, "bias_lora_only", 105,
               dict(MLP_DEFAULT, target_modules=["linear1", "linear2"], bias="lora_only"),
               lora_biases, record_saved_keys=True)


def modules_to_save_case(out, x):
    def perturb_copy(model):
        copy_ = model.base_model.model.linear3.modules_to_save["default"]
        copy_.weight.data = copy_.weight.data + torch.randn_like(copy_.weight) * 0.1
        copy_.bias.data = copy_.bias.data + torch.randn_like(copy_.bias) * 0.1

    plain_case(out, x, "modules_to_save", 106,
               dict(MLP_DEFAULT, target_modules=["linear1", "linear2"], modules_to_save=["linear3"]),
               perturb_copy, record_saved_keys=True)


def init_conversion_case(out, x, name, seed, init):
    """PiSSA / OLoRA: initial/ (untrained init), adapter/ (after a fake training step), converted/ (plain LoRA)."""
    case = os.path.join(out, name)
    os.makedirs(case)
    config = dict(target_modules=MLP_LAYERS, r=2, lora_alpha=4, init_lora_weights=init)
    torch.manual_seed(seed)
    model = get_peft_model(load_base(out), LoraConfig(**config))
    net = model.base_model.model
    initial = {}
    for layer in MLP_LAYERS:
        m = net.get_submodule(layer)
        initial[layer] = {"lora_A": fl(m.lora_A["default"].weight), "lora_B": fl(m.lora_B["default"].weight),
                          "residual_weight": fl(m.base_layer.weight)}
    initial_logits = forward(model, x)
    # PEFT's PiSSA example: save the untrained initialisation, train, then save with path_initial_model_for_weight_
    # conversion pointing at it. (That later save rewrites initial/adapter_config.json with init_lora_weights=true.)
    initial_dir = os.path.join(case, "initial")
    save_adapter(model, initial_dir)
    # mimic training
    for pname, p in model.named_parameters():
        if (".lora_A." in pname or ".lora_B." in pname) and pname.endswith(".weight"):
            p.data = p.data + torch.randn_like(p) * 0.05
    logits = forward(model, x)
    merged = merged_forward(model, x)
    adapter = os.path.join(case, "adapter")
    save_adapter(model, adapter)
    converted = os.path.join(case, "converted")
    # The path must be a directory whose basename becomes a temporary adapter name; PEFT loads it with
    # load_adapter(dirname, subfolder=basename) after rewriting its config to init_lora_weights=True.
    save_adapter(model, converted, path_initial_model_for_weight_conversion=initial_dir)
    with open(os.path.join(converted, "adapter_config.json")) as f:
        ccfg = json.load(f)
    cl, cm = reload_logits(out, converted, x)
    check_close(f"{name} converted vs trained", cl, logits, 1e-4)
    al, am = reload_logits(out, adapter, x)  # adapter/ on the ORIGINAL base: PEFT redoes the init on load
    check_close(f"{name} adapter/ on the original base", al, logits)
    base_logits = forward(load_base(out), x)
    check_close(f"{name} initial == base", initial_logits, base_logits, 1e-4)
    exp = {
        "config": config,
        "initial": initial,
        "initial_logits": fl(initial_logits),
        "logits": fl(logits),
        "merged_logits": fl(merged),
        "trained": {layer: {"lora_A": fl(net.get_submodule(layer).lora_A["default"].weight),
                            "lora_B": fl(net.get_submodule(layer).lora_B["default"].weight)} for layer in MLP_LAYERS},
        "converted_logits": fl(cl),
        "converted_merged_logits": fl(cm),
        "converted_config": {k: ccfg[k] for k in ["r", "lora_alpha", "rank_pattern", "alpha_pattern",
                                                  "init_lora_weights", "use_rslora"]},
        "converted_saved_keys": saved_keys(converted),
    }
    write_json(os.path.join(case, "expected.json"), exp)


COMBINATIONS = [
    # name, adapters, weights, combination_type, kwargs, random
    ("cat", ["a", "c"], [0.7, 0.4], "cat", {}, False),
    ("linear", ["a", "b"], [0.7, 0.4], "linear", {}, False),
    ("svd", ["a", "c"], [0.7, 0.4], "svd", {"svd_rank": 3}, False),
    ("svd_clamp", ["a", "c"], [0.7, 0.4], "svd", {"svd_rank": 3, "svd_clamp": 0.9}, False),
    ("ties", ["a", "b"], [0.7, 0.4], "ties", {"density": 0.5, "majority_sign_method": "total"}, False),
    ("ties_frequency", ["a", "b"], [0.7, 0.4], "ties", {"density": 0.5, "majority_sign_method": "frequency"}, False),
    ("magnitude_prune", ["a", "b"], [0.7, 0.4], "magnitude_prune", {"density": 0.5}, False),
    ("dare_linear", ["a", "b"], [0.7, 0.4], "dare_linear", {"density": 1.0}, False),
    ("dare_ties", ["a", "b"], [0.7, 0.4], "dare_ties", {"density": 1.0}, False),
    ("dare_linear_random", ["a", "b"], [0.7, 0.4], "dare_linear", {"density": 0.5, "seed": 5}, True),
    ("dare_ties_random", ["a", "b"], [0.7, 0.4], "dare_ties", {"density": 0.5, "seed": 5}, True),
    ("ties_svd", ["a", "c"], [0.7, 0.4], "ties_svd", {"svd_rank": 3, "density": 0.5, "majority_sign_method": "total"},
     False),
    ("dare_linear_svd", ["a", "c"], [0.7, 0.4], "dare_linear_svd", {"svd_rank": 3, "density": 1.0}, False),
    ("magnitude_prune_svd", ["a", "c"], [0.7, 0.4], "magnitude_prune_svd", {"svd_rank": 3, "density": 0.5}, False),
]
COMBO_SOURCES = {
    "a": dict(target_modules=MLP_LAYERS, r=2, lora_alpha=4, init_lora_weights=False),
    "b": dict(target_modules=MLP_LAYERS, r=2, lora_alpha=2, init_lora_weights=False),
    "c": dict(target_modules=MLP_LAYERS, r=3, lora_alpha=3, init_lora_weights=False),
}


def combinations_case(out, x):
    case = os.path.join(out, "combinations")
    os.makedirs(case)
    torch.manual_seed(109)
    model = get_peft_model(load_base(out), LoraConfig(**COMBO_SOURCES["a"]), adapter_name="a")
    model.add_adapter("b", LoraConfig(**COMBO_SOURCES["b"]))
    model.add_adapter("c", LoraConfig(**COMBO_SOURCES["c"]))
    torch.manual_seed(110)
    randomize_lora(model)
    net = model.base_model.model
    sources = {}
    for a in ["a", "b", "c"]:
        model.set_adapter(a)
        logits = forward(model, x)
        merged = merged_forward(model, x)
        sources[a] = {"config": COMBO_SOURCES[a], "logits": fl(logits), "merged_logits": fl(merged)}
    model.save_pretrained(case, selected_adapters=["a", "b", "c"])  # writes case/a, case/b, case/c
    os.remove(os.path.join(case, "README.md"))
    for a in ["a", "b", "c"]:
        rl, _ = reload_logits(out, os.path.join(case, a), x)
        check_close(f"combinations/{a} reloaded", rl, torch.tensor(sources[a]["logits"]))
    cases = []
    for name, adapters, weights, ctype, kwargs, random in COMBINATIONS:
        rec = {"name": name, "adapters": adapters, "weights": weights, "combination_type": ctype}
        rec.update(kwargs)
        rec["random"] = random
        call_kw = {k: v for k, v in kwargs.items() if k != "seed"}
        if "seed" in kwargs:
            torch.manual_seed(kwargs["seed"])
        try:
            model.add_weighted_adapter(adapters, weights, name, combination_type=ctype, **call_kw)
        except Exception as e:  # noqa: BLE001 - recorded in the fixture
            rec["error"] = f"{type(e).__name__}: {e}"
            if name in model.peft_config:
                model.delete_adapter(name)
            cases.append(rec)
            continue
        cfg = model.peft_config[name]
        rec["r"] = cfg.r
        rec["lora_alpha"] = cfg.lora_alpha
        rec["layers"] = {}
        for layer in MLP_LAYERS:
            m = net.get_submodule(layer)
            rec["layers"][layer] = {"lora_A": fl(m.lora_A[name].weight), "lora_B": fl(m.lora_B[name].weight),
                                    "scaling": f32(m.scaling[name])}
        model.set_adapter(name)
        rec["logits"] = fl(forward(model, x))
        cases.append(rec)
    exp = {
        "notes": ("Adapters a, b, c are the directories next to this file. Each case is "
                  "model.add_weighted_adapter(adapters, weights, name, combination_type=..., **kwargs) on one PeftModel "
                  "holding a, b, c (cases applied one after another in this order; earlier results do not feed later "
                  "ones). 'random': true marks dare_linear_random and dare_ties_random: density 0.5 draws a torch."
                  "bernoulli mask, reproduced only by torch.manual_seed(seed) immediately before the call with the "
                  "same torch version; compare their shapes, r, lora_alpha and scaling, not values. dare_* with "
                  "density 1.0 keeps every value (mask of ones, divided by 1.0) and is deterministic. 'logits' is "
                  "the PeftModel output with only the new adapter active."),
        "adapters": sources,
        "cases": cases,
    }
    write_json(os.path.join(case, "expected.json"), exp)
    return cases


def loraplus_case(out, x):
    case = os.path.join(out, "loraplus")
    os.makedirs(case)
    config = dict(MLP_DEFAULT, lora_dropout=0.0)
    torch.manual_seed(111)
    model = get_peft_model(load_base(out), LoraConfig(**config))
    randomize_lora(model)
    initial_logits = forward(model, x)
    save_adapter(model, os.path.join(case, "initial"))
    torch.manual_seed(7)
    y = torch.randn(8, 10)
    lr, ratio = 1e-2, 16.0
    opt = create_loraplus_optimizer(model=model, optimizer_cls=torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {}
    for gi, g in enumerate(opt.param_groups):
        for p in g["params"]:
            groups[names[id(p)]] = {"group": gi, "lr": g["lr"],
                                    "weight_decay": g["weight_decay"], "betas": list(g["betas"]), "eps": g["eps"],
                                    "amsgrad": g["amsgrad"]}
    model.train()
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        losses.append(f32(loss.item()))
        loss.backward()
        opt.step()
    net = model.base_model.model
    final = {layer: {"lora_A": fl(net.get_submodule(layer).lora_A["default"].weight),
                     "lora_B": fl(net.get_submodule(layer).lora_B["default"].weight)} for layer in MLP_LAYERS}
    logits = forward(model, x)
    merged = merged_forward(model, x)
    save_adapter(model, os.path.join(case, "adapter"))
    rl, _ = reload_logits(out, os.path.join(case, "adapter"), x)
    check_close("loraplus reloaded", rl, logits)
    exp = {
        "config": config,
        "optimizer": "torch.optim.AdamW via peft.optimizers.create_loraplus_optimizer",
        "targets": fl(y),
        "lr": lr,
        "loraplus_lr_ratio": ratio,
        "param_groups": groups,
        "group_lrs": [g["lr"] for g in opt.param_groups],
        "group_sizes": [len(g["params"]) for g in opt.param_groups],
        "initial_logits": fl(initial_logits),
        "losses": losses,
        "final": final,
        "logits": fl(logits),
        "merged_logits": fl(merged),
    }
    write_json(os.path.join(case, "expected.json"), exp)


def llama_cases(out):
    ids = llama_ids()
    plain_case(out, ids, "llama-embedding", 121,
               dict(target_modules=["embed_tokens", "q_proj", "v_proj"], r=4, lora_alpha=8, init_lora_weights=False,
                    task_type="CAUSAL_LM"),
               llama=True, record_saved_keys=True)
    plain_case(out, ids, "llama-dora", 122,
               dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], r=4, lora_alpha=8,
                    init_lora_weights=False, use_dora=True, task_type="CAUSAL_LM"),
               perturb_magnitudes, llama=True)

    def lm_head_copy(model):
        w = model.base_model.model.lm_head.modules_to_save["default"].weight
        w.data = w.data + torch.randn_like(w) * 0.05

    plain_case(out, ids, "llama-modules-to-save", 123,
               dict(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"], r=4, lora_alpha=8,
                    init_lora_weights=False, task_type="CAUSAL_LM"),
               lm_head_copy, llama=True, record_saved_keys=True)


# ---------------------------------------------------------------------------------------------------------------


def versions():
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "safetensors": safetensors.__version__, "numpy": np.__version__}


def expected_keys(out):
    keys = {}
    for dirpath, _, files in sorted(os.walk(out)):
        if "expected.json" in files:
            with open(os.path.join(dirpath, "expected.json")) as f:
                keys[os.path.relpath(dirpath, out)] = list(json.load(f).keys())
    return keys


README = """# PEFT feature fixtures: adapters written by Hugging Face PEFT {peft}, and the numbers PEFT computes with them

Made by `python3 scripts/make_peft_feature_fixtures.py` with Python {python}, torch {torch}, transformers
{transformers}, peft {peft}, safetensors {safetensors}, numpy {numpy}; CPU, float32, one thread, `torch.manual_seed`
per case, so rerunning it with the same versions rewrites the same bytes. `scripts/peft_check.py` loads any of these
adapters with `PeftModel.from_pretrained` and compares its logits with logits computed elsewhere (e.g. by lora-rs).

Every float is a float32 written as `float(np.float32(v))` (its Python repr, which reads back as the same float32);
matrices are nested lists of rows (`lora_A` is r x in, `lora_B` is out x r, weights out x in, as PyTorch stores them).
Every `adapter/` (and `initial/`, `converted/`, `combinations/a|b|c`) is `PeftModel.save_pretrained` output:
`adapter_config.json` and `adapter_model.safetensors`; PEFT's model-card `README.md` (which names absolute paths) is
deleted, and `base_model_name_or_path` is `null` (the MLP: a plain `nn.Module` has no name) or `"base"` (the Llama).

## Shared inputs

- `base.safetensors`: `Net`, an MLP with `linear1` = `nn.Linear(20, 16)`, `linear2` = `nn.Linear(16, 12)`, `linear3`
  = `nn.Linear(12, 10)`; forward `linear3(relu(linear2(relu(linear1(x)))))`; PyTorch's default initialisation under
  `torch.manual_seed(0)`; tensor names as its state_dict (`linear1.weight`, `linear1.bias`, ...).
- `inputs.json`: `x` (8 x 20, `torch.randn` after `torch.manual_seed(1)`) and `base_logits` (8 x 10, the base alone).
- The language-model cases use `tests/fixtures/llama-peft-tiny/base` (`LlamaForCausalLM`, vocabulary 96, 2 layers,
  untied `lm_head`) and the `input_ids` (2 x 12) of `tests/fixtures/llama-peft-tiny/expected.json`, repeated in each
  of their expected.json.

## Keys common to the cases

- `config`: the `LoraConfig(**config)` keyword arguments used.
- `logits`: the `PeftModel` (adapter active, not merged) in eval mode on `x` (8 x 10 rows) or, for the Llama cases,
  on `input_ids`, flattened row-major with `shape` = [2, 12, 96].
- `merged_logits`: the same after `merge_and_unload()` of a deep copy.
- `saved_keys`: the sorted tensor names of `adapter/adapter_model.safetensors`.
- Unless a case says otherwise: `target_modules` = ["linear1", "linear2", "linear3"], r = 2, lora_alpha = 4,
  `init_lora_weights=False`, and right after `get_peft_model` every `lora_A` / `lora_B` weight (in `named_parameters`
  order) is replaced by `torch.randn(shape) * 0.3`, so both are random and non-zero. Scale = lora_alpha / r (rsLoRA:
  lora_alpha / sqrt(r)).
- Every adapter was loaded back onto a fresh base with `PeftModel.from_pretrained` and reproduced `logits` and
  `merged_logits` to within 1e-5 before being written.

## Cases

1. `dora/`: `use_dora=True`. After the A/B replacement every `lora_magnitude_vector` is multiplied by U(0.8, 1.2)
   (`torch.empty_like(m).uniform_(0.8, 1.2)`), so the magnitude differs from the L2 norm of each output row of
   W + scale * B A (which PEFT computed at creation, from the A/B before replacement). PEFT saves it as `base_model.model.linearN.lora_magnitude_vector` (no `.weight`, no adapter name), shape [out].
   Keys: {k_dora}.
2. `dora_rslora/`: `use_dora=True, use_rslora=True, rank_pattern={{"linear2": 4}}, alpha_pattern={{"linear3": 3.0}}`,
   the same perturbations. Scales: linear1 4/sqrt(2), linear2 4/sqrt(4) = 2, linear3 3/sqrt(2). Keys: {k_dora_rslora}.
3. `lora_bias/`: `lora_bias=True` (`lora_B` has a bias, saved as `...lora_B.bias`); every `lora_B` bias is set to
   randn * 0.3. PEFT scales the bias too: the layer adds scale * (B A x + b_B), and merging adds scale * b_B to the
   base bias. Keys: {k_lora_bias}.
4. `bias_all/`: `bias="all"`, targets linear1 and linear2; every bias of the model (linear1, linear2 and the
   untargeted linear3) gets + randn * 0.1 after creation. PEFT saves every bias of the model, targeted ones under
   `base_layer`: {sk_bias_all}. Keys: {k_bias_all}.
5. `bias_lora_only/`: `bias="lora_only"`, targets linear1 and linear2; the biases of linear1 and linear2 get
   + randn * 0.1. Saved: {sk_bias_lora_only}. Keys: {k_bias_lora_only}.
6. `modules_to_save/`: targets linear1 and linear2, `modules_to_save=["linear3"]`; the trainable copy
   (`linear3.modules_to_save["default"]`) gets + randn * 0.1 on its weight and bias. PEFT saves the copy under the
   plain module name (no `modules_to_save.default`): {sk_modules_to_save}. Keys: {k_modules_to_save}.
7. `pissa/` and 8. `olora/`: `init_lora_weights="pissa"` (resp. `"olora"`), r = 2, lora_alpha = 4, no random A/B
   replacement. PiSSA: SVD W = V S U^T, A = sqrt(S_r / scale) U_r^T, B = V_r sqrt(S_r / scale); OLoRA: QR W = Q R,
   B = Q[:, :r], A = R[:r]; both rewrite the base weight to W - scale * B A. `initial` records, per layer, that
   `lora_A`, `lora_B` and `residual_weight` (the rewritten base weight); `initial_logits` (= base logits up to
   rounding). `initial/` is `save_pretrained` of that untrained state (PEFT's PiSSA flow). Then every lora_A /
   lora_B gets + randn * 0.05 (mimicking training): `trained` (the new A/B), `logits` / `merged_logits` (residual
   base + adapter); `adapter/` is saved (config still says `init_lora_weights: "pissa"` (resp. `"olora"`); loading it onto the
   ORIGINAL base with `from_pretrained` redoes the init, i.e. rewrites the base to the residual, and gives `logits`).
   `converted/` is `save_pretrained(converted, path_initial_model_for_weight_conversion=<abs path of initial/>)`:
   a plain LoRA with A' = [A; A0] (rows) and B' = [B, -B0] (columns), i.e. rank doubled, and PEFT doubles r and
   lora_alpha (rank_pattern / alpha_pattern values too) so the scale is unchanged: `converted_config` = its r,
   lora_alpha, rank_pattern, alpha_pattern, init_lora_weights, use_rslora. That call also rewrites
   `initial/adapter_config.json` with `init_lora_weights: true` (and `inference_mode: false`). `converted_logits` / `converted_merged_logits`:
   the original base.safetensors loaded fresh + `converted/` via `PeftModel.from_pretrained` (equal to `logits` up to
   rounding). `converted_saved_keys`: tensor names in `converted/`. Keys: {k_pissa}.
9. `combinations/`: three adapters on one PeftModel: `a` (r 2, alpha 4), `b` (r 2, alpha 2), `c` (r 3, alpha 3), all
   three layers, random A/B (randn * 0.3, seed 110 in named_parameters order), saved as standalone adapter dirs
   `combinations/a`, `b`, `c`. expected.json: `notes`, `adapters` ({{a|b|c: {{config, logits, merged_logits}}}}) and
   `cases`, one per `add_weighted_adapter` call: `name`, `adapters`, `weights`, `combination_type`, every keyword
   passed (`svd_rank`, `svd_clamp`, `density`, `majority_sign_method`; `seed` = the `torch.manual_seed` set just
   before the call), `random`, and, unless PEFT raised (then `error`), `r` and `lora_alpha` of the new adapter's
   peft_config, `layers` ({{linearN: {{lora_A, lora_B, scaling}}}}) and `logits` (only the new adapter active).
   PEFT sets the new adapter's lora_alpha = r, so its scaling is 1.0; the source scalings are folded in:
   `cat` concatenates weight * scale_i * A_i (rows) and B_i (columns), r = sum of ranks; `linear`, `ties`,
   `magnitude_prune`, `dare_*` combine the A's with weights sign(w_i s_i) sqrt(|w_i s_i|) and the B's with
   sqrt(|w_i s_i|) (needs equal ranks); `svd` and `*_svd` combine the full delta weights w_i * scale_i * B_i A_i and
   truncate an SVD to svd_rank (B = U S, A = V^T), `svd_clamp` clamping both to the given quantile. Cases:
   {combo_summary}. Keys of expected.json: {k_combinations}; of each case: {k_combo_case}.
10. `loraplus/`: a LoRA (r 2, alpha 4, random A/B, dropout 0) saved as `initial/` before training; targets
   `y` = randn(8, 10) after `torch.manual_seed(7)`; optimizer = `create_loraplus_optimizer(model=model,
   optimizer_cls=torch.optim.AdamW, lr=1e-2, loraplus_lr_ratio=16.0)`; 3 steps of
   `loss = ((model(x) - y) ** 2).mean()` in train mode; `adapter/` saved after them. `param_groups`: for every
   trainable parameter name, its group index, lr, weight_decay, betas, eps, amsgrad (lora_A: lr 1e-2; lora_B:
   lr 0.16; weight decay 0.0 in every group, not AdamW's default 0.01); `group_lrs`, `group_sizes` (4 groups:
   A, embedding, B, B without decay); `losses` (before each step); `final` ({{linearN: {{lora_A, lora_B}}}} after the
   3 steps); `initial_logits`; `logits` / `merged_logits` after training. Keys: {k_loraplus}.
11. Language-model cases (keys also `input_ids`, `shape`):
   - `llama-embedding/`: `target_modules=["embed_tokens", "q_proj", "v_proj"]`, r 4, lora_alpha 8,
     `task_type="CAUSAL_LM"`, random lora_A / lora_B and lora_embedding_A / lora_embedding_B (randn * 0.3). With an
     embedding targeted, PEFT's `save_embedding_layers="auto"` also saves the whole base embedding matrix. The
     embedding factors are saved as `...embed_tokens.lora_embedding_A` (r x vocabulary) and `lora_embedding_B`
     (hidden x r), no `.weight`; PEFT adds scale * (A^T[ids] B^T). Saved: {sk_llama_embedding}. Keys: {k_llama_embedding}.
   - `llama-dora/`: `use_dora=True` on q/k/v/o_proj, r 4, lora_alpha 8, random A/B, magnitudes x U(0.8, 1.2).
     Keys: {k_llama_dora}.
   - `llama-modules-to-save/`: targets q_proj, v_proj, `modules_to_save=["lm_head"]`, random A/B, the lm_head copy's
     weight + randn * 0.05. Saved: {sk_llama_mts}. Keys: {k_llama_mts}.
"""


def fmt_keys(keys):
    return ", ".join(f"`{k}`" for k in keys)


def wrap_markdown(text, width=120):
    """Wrap long lines, continuing list items under their text."""
    lines = []
    for line in text.split("\n"):
        if len(line) <= width:
            lines.append(line)
            continue
        m = re.match(r"(\s*)(- |\d+\. )?", line)
        cont = " " * (len(m.group(1)) + len(m.group(2) or ""))
        lines.extend(textwrap.wrap(line, width, initial_indent="", subsequent_indent=cont, break_long_words=False,
                                   break_on_hyphens=False))
    return "\n".join(lines)


def write_readme(out, ver, combos):
    ek = expected_keys(out)
    sk = {}
    for name in ["bias_all", "bias_lora_only", "modules_to_save", "llama-embedding", "llama-modules-to-save"]:
        with open(os.path.join(out, name, "expected.json")) as f:
            keys = json.load(f)["saved_keys"]
        if name in ("llama-embedding", "llama-modules-to-save"):
            keys = [k for k in keys if "lora_" not in k] + [f"and {sum('lora_' in k for k in keys)} lora_* tensors"]
        sk[name] = ", ".join(f"`{k}`" if not k.startswith("and ") else k for k in keys)
    combo_summary = "; ".join(
        f"`{c['name']}` ({c['combination_type']} {'+'.join(c['adapters'])}"
        + "".join(f", {k}={c[k]}" for k in ["svd_rank", "svd_clamp", "density", "majority_sign_method", "seed"]
                  if k in c)
        + (f" -> error: {c['error']}" if "error" in c else f" -> r {c['r']}, alpha {c['lora_alpha']}")
        + ")" for c in combos)
    case_keys = sorted({k for c in combos for k in c}, key=lambda k: [k for c in combos for k in c].index(k))
    text = README.format(
        **ver,
        k_dora=fmt_keys(ek["dora"]), k_dora_rslora=fmt_keys(ek["dora_rslora"]), k_lora_bias=fmt_keys(ek["lora_bias"]),
        k_bias_all=fmt_keys(ek["bias_all"]), k_bias_lora_only=fmt_keys(ek["bias_lora_only"]),
        k_modules_to_save=fmt_keys(ek["modules_to_save"]), k_pissa=fmt_keys(ek["pissa"]),
        k_combinations=fmt_keys(ek["combinations"]), k_combo_case=fmt_keys(case_keys),
        k_loraplus=fmt_keys(ek["loraplus"]), k_llama_embedding=fmt_keys(ek["llama-embedding"]),
        k_llama_dora=fmt_keys(ek["llama-dora"]), k_llama_mts=fmt_keys(ek["llama-modules-to-save"]),
        sk_bias_all=sk["bias_all"], sk_bias_lora_only=sk["bias_lora_only"], sk_modules_to_save=sk["modules_to_save"],
        sk_llama_embedding=sk["llama-embedding"], sk_llama_mts=sk["llama-modules-to-save"],
        combo_summary=combo_summary)
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(wrap_markdown(text))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures", "peft-features"))
    args = ap.parse_args()
    out = os.path.abspath(args.out)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out)

    torch.manual_seed(0)
    base = Net()
    safetensors.torch.save_file({k: v.contiguous() for k, v in base.state_dict().items()},
                                os.path.join(out, "base.safetensors"))
    torch.manual_seed(1)
    x = torch.randn(8, 20)
    write_json(os.path.join(out, "inputs.json"), {"x": fl(x), "base_logits": fl(forward(load_base(out), x))})

    dora_cases(out, x)
    bias_cases(out, x)
    modules_to_save_case(out, x)
    init_conversion_case(out, x, "pissa", 107, "pissa")
    init_conversion_case(out, x, "olora", 108, "olora")
    combos = combinations_case(out, x)
    loraplus_case(out, x)
    llama_cases(out)

    tidy_adapter_dirs(out)
    write_readme(out, versions(), combos)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
