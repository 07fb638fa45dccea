"""Custom quantization schemes as the ``bitnet`` backend's weight
quantizer. The model is plain PyTorch; the scheme is a backend option, and its
learnable parameters (LSQ step sizes, soft-quantizer scale, ...) are trained
through the compiled graph together with the model.

    python examples/custom_quant.py --train --quantization-scheme lsq --bits 4
    schemes: lsq, log, soft, blockwise, outlier, ternary (the backend default)
"""

import argparse
import time

import torch
from image_data import accuracy, load_images, train_epochs
from torch import nn

import bitcompile.quant as Q


class MLP(nn.Module):
    def __init__(self, d_in: int, hidden: int = 256, classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.lm_head = nn.Linear(hidden, classes)  # excluded by default, as in LLMs

    def forward(self, x):
        h = torch.relu(self.fc1(x.flatten(1)))
        return self.lm_head(self.norm(torch.relu(self.fc2(h))))


def make_quantizer(scheme: str, bits: int, model: MLP):
    w = model.fc2.weight
    if scheme == "lsq":  # one learned step size per linear, initialized from its weights
        return Q.PerLayerQuantizer.for_model(model, lambda weight: Q.LSQQuantizer.from_tensor(weight, bits))
    if scheme == "log":
        return Q.LogQuantizer(bits)
    if scheme == "soft":
        return Q.SoftQuantizer(temperature=0.5, scale=w.detach().abs().mean().item())
    if scheme == "blockwise":
        return Q.BlockwiseMixedPrecisionQuantizer(block_size=32, low_bits=2, high_bits=bits)
    if scheme == "outlier":
        return Q.OutlierAwareQuantizer(outlier_fraction=0.01)
    return Q.TernaryQuantizer()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", action="store_true")
    p.add_argument(
        "--quantization-scheme", default="lsq", choices=["lsq", "log", "soft", "blockwise", "outlier", "ternary"]
    )
    p.add_argument("--bits", type=int, default=4, help="bits for lsq / log; high-precision bits for blockwise")
    p.add_argument("--dataset", default="digits", choices=["digits", "cifar10"])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--limit", type=int, default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    xtr, xte, ytr, yte = load_images(args.dataset, args.data_dir, args.limit)
    model = MLP(xtr[0].numel())
    quantizer = make_quantizer(args.quantization_scheme, args.bits, model)
    compiled = torch.compile(model, backend="bitnet", options={"weight": quantizer})
    learnable = list(quantizer.parameters())
    before = [t.detach().clone() for t in learnable]
    if args.train:
        start = time.perf_counter()
        train_epochs(model, compiled, xtr, ytr, args.epochs, extra_params=learnable)
        print(f"trained in {time.perf_counter() - start:.1f}s (first step includes compilation)")
    print(f"{args.quantization_scheme}: test accuracy {accuracy(compiled, xte, yte):.3f}")
    for i, (t, b) in enumerate(zip(learnable, before)):
        print(f"  quantizer parameter {i}: {b.flatten()[:3].tolist()} -> {t.detach().flatten()[:3].tolist()}")
    with torch.no_grad():
        per_layer = isinstance(quantizer, Q.PerLayerQuantizer)
        q = quantizer.quantize(model.fc2.weight, "fc2") if per_layer else quantizer.quantize(model.fc2.weight)
        report = Q.validate_quantization(model.fc2.weight, q)
    print(f"  fc2 weight: MSE {report.mse:.2e}, MAE {report.mae:.2e}")


if __name__ == "__main__":
    main()
