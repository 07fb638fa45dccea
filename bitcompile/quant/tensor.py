"""``QuantizedTensor`` and ``TernaryTensor``: integer codes with their scale.

A quantizer's result keeps three things together: the integer codes (int8), the
scale(s) that map them back to real values, and, when gradients are wanted, a
*gradient carrier*: a tensor whose value is exactly zero but whose autograd graph
is the quantizer's surrogate gradient (STE, sigmoid surrogate, LSQ, ...). Adding
the carrier in :meth:`dequantize` makes ``dequantize(quantize(x))`` differentiable
with the quantizer's own rule while the forward value stays exactly ``codes * scale``.

``TernaryTensor`` is the ternary case (codes in {-1, 0, +1}): it packs to the
canonical 2-bit format (``bitcompile.numerics.packing``) and back. Both classes
interoperate with torch through ``__torch_function__``: a torch function given one
receives its dequantized value, so ``x @ t`` or ``torch.relu(t)`` just work.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from bitcompile.numerics.packing import pack_ternary, unpack_ternary

ScaleLike = Union[float, torch.Tensor]


def _as_scale(scale: ScaleLike, like: torch.Tensor) -> torch.Tensor:
    if isinstance(scale, torch.Tensor):
        return scale
    return torch.tensor(float(scale), dtype=torch.float32, device=like.device)


class QuantizedTensor:
    """Integer ``codes`` (int8) with ``scale`` (broadcastable to the codes).

    ``neg_scale``, if given, scales the negative codes (asymmetric ternary, as in
    learned quantization); ``zero_point`` is added after scaling. ``grad_carrier``
    is a zero-valued tensor of the dequantized shape carrying the surrogate gradient.
    """

    def __init__(
        self,
        codes: torch.Tensor,
        scale: ScaleLike = 1.0,
        *,
        neg_scale: Optional[ScaleLike] = None,
        zero_point: Optional[ScaleLike] = None,
        grad_carrier: Optional[torch.Tensor] = None,
    ):
        if codes.dtype != torch.int8:
            raise TypeError(f"codes must be int8, got {codes.dtype}")
        self.codes = codes
        self.scale = _as_scale(scale, codes)
        self.neg_scale = None if neg_scale is None else _as_scale(neg_scale, codes)
        self.zero_point = None if zero_point is None else _as_scale(zero_point, codes)
        self.grad_carrier = grad_carrier

    # -- shape-like conveniences ------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def numel(self) -> int:
        return self.codes.numel()

    def dim(self) -> int:
        return self.codes.dim()

    def __len__(self) -> int:
        return len(self.codes)

    # -- values -------------------------------------------------------------------
    def dequantize(self, scale: ScaleLike = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``codes * self.scale * scale`` (negative codes use ``neg_scale`` if set),
        plus ``zero_point``, plus the gradient carrier; returned as ``dtype``."""
        c = self.codes.float()
        s = self.scale if self.neg_scale is None else torch.where(self.codes < 0, self.neg_scale, self.scale)
        y = c * s
        if not (isinstance(scale, (int, float)) and scale == 1.0):
            y = y * scale
        if self.zero_point is not None:
            y = y + self.zero_point
        if self.grad_carrier is not None:
            y = y + self.grad_carrier
        return y.to(dtype)

    def counts(self) -> dict[int, int]:
        """How many elements have each code value."""
        values, counts = torch.unique(self.codes, return_counts=True)
        return {int(v): int(c) for v, c in zip(values.tolist(), counts.tolist())}

    def __eq__(self, other):  # compares codes, so ``(q == -1).sum()`` counts the -1 codes
        other = other.codes if isinstance(other, QuantizedTensor) else other
        return self.codes == other

    def __ne__(self, other):
        other = other.codes if isinstance(other, QuantizedTensor) else other
        return self.codes != other

    __hash__ = object.__hash__

    def __repr__(self) -> str:
        scale = self.scale.detach().flatten()[:4].tolist()
        return f"{type(self).__name__}(shape={tuple(self.shape)}, scale={scale}, counts={self.counts()})"

    # -- torch interop ------------------------------------------------------------
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        unwrap = lambda a: a.dequantize() if isinstance(a, QuantizedTensor) else a  # noqa: E731
        args = tuple(torch.utils._pytree.tree_map(unwrap, list(args)))
        kwargs = torch.utils._pytree.tree_map(unwrap, kwargs)
        return func(*args, **kwargs)

    def __matmul__(self, other):
        return torch.matmul(self.dequantize(), other.dequantize() if isinstance(other, QuantizedTensor) else other)

    def __rmatmul__(self, other):
        return torch.matmul(other, self.dequantize())

    def __mul__(self, other):
        return self.dequantize() * other

    __rmul__ = __mul__

    def __neg__(self):
        return -self.dequantize()


class TernaryTensor(QuantizedTensor):
    """Trits in {-1, 0, +1} (int8) with their scale; packs to the canonical 2-bit format."""

    def __init__(self, trits: torch.Tensor, scale: ScaleLike = 1.0, **kwargs):
        super().__init__(trits.to(torch.int8) if trits.dtype != torch.int8 else trits, scale, **kwargs)
        # Checked only on real tensors: fake ones (compiler tracing) have no values to read.
        real = type(self.codes) is torch.Tensor and not torch.compiler.is_compiling()
        if real and self.codes.numel() and bool((self.codes.abs() > 1).any()):
            raise ValueError("TernaryTensor trits must lie in {-1, 0, 1}")

    @property
    def trits(self) -> torch.Tensor:
        return self.codes

    def pack(self) -> torch.Tensor:
        """The canonical packed form: uint8 ``[..., ceil(K/4)]`` (scale kept separately)."""
        return pack_ternary(self.codes)

    @classmethod
    def from_packed(cls, packed: torch.Tensor, k: int, scale: ScaleLike = 1.0) -> "TernaryTensor":
        return cls(unpack_ternary(packed, k), scale)

    def sparsity(self) -> float:
        """Fraction of zero trits."""
        return float((self.codes == 0).float().mean()) if self.codes.numel() else 0.0
