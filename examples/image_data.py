"""Image data for the image examples: scikit-learn's digits (ships with the package)
or, with ``--data-dir``, a CIFAR-10 directory in its python format
(``data_batch_1`` .. ``data_batch_5``, ``test_batch``)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Optional

import torch


def load_images(dataset: str = "digits", data_dir: Optional[str] = None, limit: Optional[int] = None):
    """``(x_train, x_test, y_train, y_test)`` with ``x`` as float ``[N, C, H, W]`` in [0, 1]."""
    if dataset == "digits":
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()  # 1797 8x8 grayscale digits
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(digits.target)
        xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    elif dataset == "cifar10":
        if data_dir is None:
            raise SystemExit("cifar10 needs --data-dir pointing at the extracted 'cifar-10-batches-py' directory")
        root = Path(data_dir)

        def batch(name):
            with open(root / name, "rb") as f:
                d = pickle.load(f, encoding="bytes")
            return torch.tensor(d[b"data"]).reshape(-1, 3, 32, 32).float() / 255.0, torch.tensor(d[b"labels"])

        parts = [batch(f"data_batch_{i}") for i in range(1, 6)]
        xtr, ytr = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        xte, yte = batch("test_batch")
    else:
        raise SystemExit(f"unknown dataset {dataset!r}; supported: digits, cifar10")
    if limit:
        xtr, ytr, xte, yte = xtr[:limit], ytr[:limit], xte[: limit // 4], yte[: limit // 4]
    return xtr, xte, ytr, yte


def accuracy(model, x, y, batch: int = 512) -> float:
    model.eval()
    with torch.no_grad():
        correct = sum(
            int((model(x[i : i + batch]).argmax(-1) == y[i : i + batch]).sum()) for i in range(0, len(x), batch)
        )
    return correct / len(x)


def train_epochs(model, forward, xtr, ytr, epochs: int, lr: float = 3e-3, extra_params=(), log_every: int = 5):
    """AdamW + cross-entropy; ``forward`` may be a compiled view of ``model``."""
    opt = torch.optim.AdamW([*model.parameters(), *extra_params], lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(0)
    for epoch in range(epochs):
        model.train()
        total = 0.0
        for idx in torch.randperm(len(xtr), generator=gen).split(64):
            loss = torch.nn.functional.cross_entropy(forward(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        if (epoch + 1) % log_every == 0 or epoch == epochs - 1:
            print(f"  epoch {epoch + 1:3d}/{epochs}  loss {total / len(xtr):.4f}")
