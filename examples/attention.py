"""A tiny vision transformer built on ``TernaryMultiheadAttention``
(fused ternary QKV projection, int8 activations), with attention visualization.

    python examples/attention.py --train --model vit [--dataset digits|cifar10 --data-dir DIR]
    python examples/attention.py --train --visualize-attention [--image IMG] [--out attention.png]

``--image`` takes a ``.npy`` array (H x W or C x H x W), or any image file when Pillow
is installed; without it a test digit is used. Cross-attention (a learned class query
attending to the patch tokens) pools the tokens; its map is what is saved.
"""

import argparse

import torch
from image_data import accuracy, load_images, train_epochs
from torch import nn

from bitcompile.nn import BitLinear, TernaryMultiheadAttention
from bitcompile.nn.ternary_attention import save_attention_heatmap


class TinyViT(nn.Module):
    def __init__(self, channels: int, image: int, patch: int, dim: int = 64, heads: int = 4, classes: int = 10):
        super().__init__()
        self.patch = patch
        tokens = (image // patch) ** 2
        self.embed = nn.Linear(channels * patch * patch, dim)  # pixel patches stay float
        self.pos = nn.Parameter(torch.zeros(1, tokens, dim))
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = TernaryMultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(BitLinear(dim, 2 * dim), nn.GELU(), BitLinear(2 * dim, dim))
        self.query = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pool = TernaryMultiheadAttention(dim, heads, batch_first=True)  # cross-attention pooling
        self.head = nn.Linear(dim, classes)

    def patches(self, x):
        b, c, _, _ = x.shape
        p = self.patch
        x = x.unfold(2, p, p).unfold(3, p, p)  # [B, C, H/p, W/p, p, p]
        return x.permute(0, 2, 3, 1, 4, 5).reshape(b, -1, c * p * p)

    def forward(self, x):
        t = self.embed(self.patches(x)) + self.pos
        h = self.norm1(t)
        t = t + self.self_attn(h, need_weights=False)[0]
        t = t + self.mlp(self.norm2(t))
        q = self.query.expand(len(t), -1, -1)
        pooled, _ = self.pool(q, t, t)  # key is value: one fused K/V projection
        return self.head(pooled.squeeze(1))


def load_image(path: str, like: torch.Tensor) -> torch.Tensor:
    if path.endswith(".npy"):
        import numpy as np

        img = torch.tensor(np.load(path), dtype=torch.float32)
    else:
        try:
            from PIL import Image
        except ImportError:
            raise SystemExit("reading image files needs Pillow; pass a .npy array instead")
        img = torch.tensor(
            list(Image.open(path).convert("L" if like.shape[0] == 1 else "RGB").getdata()), dtype=torch.float32
        )
        img = img.reshape(Image.open(path).size[1], Image.open(path).size[0], -1).permute(2, 0, 1)
    img = img.unsqueeze(0) if img.dim() == 2 else img
    img = img / img.max().clamp(min=1e-8)
    return nn.functional.interpolate(img.unsqueeze(0), size=like.shape[-2:], mode="bilinear", align_corners=False)[0]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", action="store_true")
    p.add_argument("--model", default="vit", choices=["vit"])
    p.add_argument("--dataset", default="digits", choices=["digits", "cifar10"])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument(
        "--visualize-attention", action="store_true", help="save the pooling attention map of one image as a PNG"
    )
    p.add_argument("--image", default=None, help=".npy array (or an image file with Pillow); default: a test digit")
    p.add_argument("--out", default="attention.png")
    args = p.parse_args()
    torch.manual_seed(0)
    xtr, xte, ytr, yte = load_images(args.dataset, args.data_dir, args.limit)
    model = TinyViT(xtr.shape[1], xtr.shape[-1], patch=2 if xtr.shape[-1] == 8 else 4)
    if args.train:
        train_epochs(model, model, xtr, ytr, args.epochs, lr=2e-3)
        print(f"test accuracy: {accuracy(model, xte, yte):.3f}")
    if args.visualize_attention:
        img = load_image(args.image, xte[0]) if args.image else xte[0]
        model.eval()
        with torch.no_grad():
            pred = model(img.unsqueeze(0)).argmax(-1).item()
        side = img.shape[-1] // model.patch
        attn = model.pool.last_attention[0, 0].reshape(side, side)  # the class query over the patch grid
        path = save_attention_heatmap(attn, args.out, title=f"class query over the patch grid (predicted {pred})")
        print(f"predicted class {pred}; attention over the {side}x{side} patch grid saved to {path}")


if __name__ == "__main__":
    main()
