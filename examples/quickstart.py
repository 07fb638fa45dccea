"""Quickstart: a ternary (BitNet b1.58) classifier on scikit-learn's digits.

The model code is plain PyTorch; `torch.compile(model, backend="bitnet")` makes
training quantization-aware (STE) and inference run on packed 2-bit weights with
int8 activations. A full-precision twin trained the same way is the baseline.

    python examples/quickstart.py [--epochs 40]
"""

import argparse
import copy
import time

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import bitcompile


class Classifier(nn.Module):
    def __init__(self, d_in=64, hidden=256, classes=10):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        h = self.norm(torch.relu(self.fc2(h)))
        return self.head(h)


def load_data():
    digits = load_digits()  # 1797 8x8 images, shipped inside scikit-learn
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    return xtr, xte, ytr, yte


def train(model, compiled, xtr, ytr, epochs, label):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        total = 0.0
        for idx in torch.randperm(len(xtr), generator=gen).split(64):
            loss = nn.functional.cross_entropy(compiled(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        sched.step()
        if epoch % 10 == 9 or epoch == epochs - 1:
            print(
                f"  [{label}] epoch {epoch + 1:3d}/{epochs}  loss {total / len(xtr):.4f}  "
                f"({time.perf_counter() - start:.1f}s)"
            )


@torch.no_grad()
def accuracy(model, compiled, x, y):
    model.eval()
    return (compiled(x).argmax(-1) == y).float().mean().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=40)
    args = parser.parse_args()
    torch.manual_seed(0)
    xtr, xte, ytr, yte = load_data()
    ternary = Classifier()
    full = copy.deepcopy(ternary)

    # exclude=[]: quantize every layer, the classifier head too.
    options = {"exclude": []}
    print("What the bitnet backend does to this model (training graph):")
    report = bitcompile.explain(ternary, xtr[:8], **options)
    print(report, "\n")

    print(f"Training {args.epochs} epochs on {len(xtr)} digits, test on {len(xte)}:")
    compiled = torch.compile(ternary, backend="bitnet", options=options)
    train(ternary, compiled, xtr, ytr, args.epochs, "ternary, backend='bitnet'")
    train(full, full, xtr, ytr, args.epochs, "full precision, eager")

    acc_t = accuracy(ternary, compiled, xte, yte)  # inference graph: packed weights, int8 activations
    acc_f = accuracy(full, full, xte, yte)
    full_bytes, packed_bytes = report.weight_memory(ternary)
    print()
    print(f"{'model':<34}{'test accuracy':>14}{'weight memory':>16}")
    print(f"{'full precision (fp32)':<34}{acc_f:>14.2%}{full_bytes / 1024:>13.1f} KiB")
    print(f"{'ternary (1.58-bit, int8 acts)':<34}{acc_t:>14.2%}{packed_bytes / 1024:>13.1f} KiB")
    print(f"\nweights {full_bytes / packed_bytes:.1f}x smaller; accuracy change {100 * (acc_t - acc_f):+.2f} points")


if __name__ == "__main__":
    main()
