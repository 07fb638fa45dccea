"""A CNN of ``TernaryConv2d`` layers (learnable per-channel
thresholds and scales, running statistics, quantization report).

    python examples/custom_conv.py --train [--dataset digits|cifar10 --data-dir DIR] [--epochs 15]
"""

import argparse

import torch
from image_data import accuracy, load_images, train_epochs
from torch import nn

from bitcompile.nn import TernaryConv2d


class TernaryCNN(nn.Module):
    def __init__(self, channels: int, classes: int = 10, activation_bits=8):
        super().__init__()
        self.conv1 = TernaryConv2d(channels, 16, 3, padding=1, activation_bits=None)  # raw pixels stay float
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = TernaryConv2d(16, 32, 3, padding=1, activation_bits=activation_bits)
        self.bn2 = nn.BatchNorm2d(32)
        self.head = nn.Linear(32, classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean(dim=(2, 3)))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", action="store_true", help="train, then report accuracy and quantization statistics")
    p.add_argument("--dataset", default="digits", choices=["digits", "cifar10"])
    p.add_argument("--data-dir", default=None, help="CIFAR-10 python-format directory (for --dataset cifar10)")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--limit", type=int, default=None, help="use only this many training images")
    args = p.parse_args()
    torch.manual_seed(0)
    xtr, xte, ytr, yte = load_images(args.dataset, args.data_dir, args.limit)
    model = TernaryCNN(xtr.shape[1])
    if args.train:
        train_epochs(model, model, xtr, ytr, args.epochs)
    print(f"test accuracy: {accuracy(model, xte, yte):.3f}")
    for name in ("conv1", "conv2"):
        r = getattr(model, name).quantization_report()
        print(
            f"{name}: -1/0/+1 = {r['fraction_negative']:.1%} / {r['fraction_zero']:.1%} / "
            f"{r['fraction_positive']:.1%}, "
            f"weight MSE {r['mse']:.2e}, running input absmax {r['running_input_absmax']:.3f}, "
            f"mean threshold {sum(r['threshold']) / len(r['threshold']):.3f}"
        )


if __name__ == "__main__":
    main()
