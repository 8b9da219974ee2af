"""The seed tutorial's LoRA fine-tune in PyTorch, on a base saved by `lora demo`: a behavioural cross-check.

Usage: python3 scripts/seed_finetune_pytorch.py runs/demo/base.safetensors DIGIT [--data data/mnist] [--steps 100]
Loads the base, attaches rank-1 LoRA (A ~ N(0,1), B = 0, alpha 1) to the three layers exactly as the seed does
(parametrize-style W + B@A*scale), trains only A and B on DIGIT (batch 10, Adam 1e-3) and prints the test
accuracy and wrong counts with LoRA on, for comparison with the Rust demo's table.
"""
import argparse, gzip, os
import numpy as np, torch, torch.nn as nn
from safetensors.torch import load_file

p = argparse.ArgumentParser(); p.add_argument("base"); p.add_argument("digit", type=int)
p.add_argument("--data", default="data/mnist"); p.add_argument("--steps", type=int, default=100); p.add_argument("--seed", type=int, default=0)
a = p.parse_args(); torch.manual_seed(a.seed)
def idx(name):
    raw = gzip.open(os.path.join(a.data, name)).read()
    if int.from_bytes(raw[0:4], "big") == 2051: return np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 784)
    return np.frombuffer(raw, np.uint8, offset=8)
Xtr, Ytr = idx("train-images-idx3-ubyte.gz"), idx("train-labels-idx1-ubyte.gz")
Xte, Yte = idx("t10k-images-idx3-ubyte.gz"), idx("t10k-labels-idx1-ubyte.gz")
mean, std = Xtr.mean() / 255, Xtr.std(ddof=1) / 255
norm = lambda x: torch.from_numpy(((x.astype(np.float32) / 255 - mean) / std).astype(np.float32))
sd = load_file(a.base)
class LoRA(nn.Module):
    def __init__(s, w, b):
        super().__init__(); s.w, s.b = w, b
        s.A = nn.Parameter(torch.randn(1, w.shape[1])); s.B = nn.Parameter(torch.zeros(w.shape[0], 1))
    def forward(s, x): return x @ (s.w + s.B @ s.A).t() + s.b
layers = nn.ModuleList([LoRA(sd[f"linear{i}.weight"], sd[f"linear{i}.bias"]) for i in (1, 2, 3)])
def net(x): return layers[2](torch.relu(layers[1](torch.relu(layers[0](x)))))
xs, ys = norm(Xtr[Ytr == a.digit]), torch.from_numpy(Ytr[Ytr == a.digit].astype(np.int64))
opt = torch.optim.Adam(layers.parameters(), lr=1e-3); ce = nn.CrossEntropyLoss()
perm = torch.randperm(len(xs))
for k in range(a.steps):
    j = perm[k * 10:(k + 1) * 10]; opt.zero_grad(); ce(net(xs[j]), ys[j]).backward(); opt.step()
with torch.no_grad(): pred = net(norm(Xte)).argmax(1).numpy()
print("Accuracy:", round(float((pred == Yte).mean()), 3))
print("wrong per digit:", [int(((pred != Yte) & (Yte == d)).sum()) for d in range(10)])
