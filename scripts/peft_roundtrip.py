"""Checks that real Hugging Face PEFT loads an adapter written by lora-rs and computes the same results.

Usage: python3 scripts/peft_roundtrip.py BASE.safetensors ADAPTER_DIR EVAL.json [--data data/mnist]
where EVAL.json is `lora eval --model BASE --adapter x=ADAPTER_DIR --json EVAL.json`. Builds the PyTorch
ExpensiveNet, loads the base weights, wraps it with `PeftModel.from_pretrained`, evaluates the MNIST test set
and compares accuracy and per-digit wrong counts with lora-rs'. Exit 0 when they are identical.
"""
import argparse, gzip, json, os, sys
import numpy as np, torch, torch.nn as nn
from safetensors.torch import load_file
from peft import PeftModel

p = argparse.ArgumentParser(); p.add_argument("base"); p.add_argument("adapter"); p.add_argument("eval_json")
p.add_argument("--data", default="data/mnist"); a = p.parse_args()
def idx(name):
    raw = gzip.open(os.path.join(a.data, name)).read()
    if int.from_bytes(raw[0:4], "big") == 2051: return np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 784)
    return np.frombuffer(raw, np.uint8, offset=8)
Xtr = idx("train-images-idx3-ubyte.gz")
Xte, Yte = idx("t10k-images-idx3-ubyte.gz"), idx("t10k-labels-idx1-ubyte.gz")
mean, std = Xtr.mean() / 255, Xtr.std(ddof=1) / 255
x = torch.from_numpy(((Xte.astype(np.float32) / 255 - mean) / std).astype(np.float32))
sd = load_file(a.base)
class Net(nn.Module):
    def __init__(s):
        super().__init__()
        s.linear1 = nn.Linear(*sd["linear1.weight"].shape[::-1]); s.linear2 = nn.Linear(*sd["linear2.weight"].shape[::-1])
        s.linear3 = nn.Linear(*sd["linear3.weight"].shape[::-1]); s.relu = nn.ReLU()
    def forward(s, x): return s.linear3(s.relu(s.linear2(s.relu(s.linear1(x)))))
net = Net(); net.load_state_dict(sd)
model = PeftModel.from_pretrained(net, a.adapter).eval()
with torch.no_grad(): pred = model(x).argmax(1).numpy()
acc = float((pred == Yte).mean()); wrong = [int(((pred != Yte) & (Yte == d)).sum()) for d in range(10)]
ours = next(iter(json.load(open(a.eval_json))["adapters"].values()))
print("PEFT   :", round(acc, 4), wrong); print("lora-rs:", round(ours["accuracy"], 4), ours["wrong"])
sys.exit(0 if wrong == ours["wrong"] else 1)
