"""The canonical packed-ternary format (DESIGN.md).

Ternary weights ``[..., K]`` are stored as ``uint8 [..., ceil(K/4)]``: four trits
per byte along K, trit ``j`` of a byte in bits ``2j..2j+1`` (least significant
first), code = trit + 1 (0 -> -1, 1 -> 0, 2 -> +1; 3 is invalid), K padded with
zero trits. This is what is saved and exchanged; kernels may re-layout it.
"""
from __future__ import annotations

import torch

TRITS_PER_BYTE = 4
_SHIFTS = (0, 2, 4, 6)


def packed_columns(k: int) -> int:
    """Bytes per row for K trits."""
    return (k + TRITS_PER_BYTE - 1) // TRITS_PER_BYTE


def pack_ternary(trits: torch.Tensor) -> torch.Tensor:
    """Pack trits in {-1, 0, 1} (any integer or float dtype) along the last dim."""
    k = trits.shape[-1]
    pad = packed_columns(k) * TRITS_PER_BYTE - k
    codes = (trits.to(torch.int16) + 1).to(torch.uint8)
    if pad:
        # Padding is the zero trit, whose code is 1.
        codes = torch.nn.functional.pad(codes, (0, pad), value=1)
    codes = codes.reshape(*codes.shape[:-1], -1, TRITS_PER_BYTE)
    packed = codes[..., 0] | (codes[..., 1] << 2) | (codes[..., 2] << 4) | (codes[..., 3] << 6)
    return packed.contiguous()


def unpack_ternary(packed: torch.Tensor, k: int, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """Inverse of :func:`pack_ternary`: ``uint8 [..., ceil(k/4)] -> dtype [..., k]``.

    Raises ``ValueError`` on the invalid code 3 rather than returning a wrong trit.
    """
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed ternary weights must be uint8, got {packed.dtype}")
    if packed.shape[-1] != packed_columns(k):
        raise ValueError(f"k={k} needs {packed_columns(k)} packed columns, got {packed.shape[-1]}")
    codes = torch.stack([(packed >> s) & 3 for s in _SHIFTS], dim=-1)
    if not torch.compiler.is_compiling() and packed.device.type != "meta" and bool((codes == 3).any()):
        raise ValueError("packed ternary tensor contains the invalid code 3")
    codes = codes.reshape(*packed.shape[:-1], -1)[..., :k]
    return (codes.to(torch.int8) - 1).to(dtype)


# --- kernel layouts (issue 3): K-blocked words, built from the canonical format ---------
# A row's trits are cut in blocks of KBLOCK = 256 (K padded with zero trits), each 64 bytes,
# read as 16 little-endian 32-bit words: trit 64g + 4w + n of a block (quarter g, word w,
# n = 0..3) is in word w. One decode of a word run thus gives, per quarter, trits of
# *consecutive* K that meet a contiguous slice of the activations (no stride-4 gathers), and
# the four quarters side by side are the block's K order. Two orders within a word:
#   "nibbles" (the int8 matmul's): code e (trit -1 -> 0, +1 -> 1, 0 -> 3; 0xFF is four zero
#     trits) at bit 16 (g >> 1) + 4n + 2 (g & 1). Quarter g's four trits are one 2-bit field of
#     the four nibbles of one 16-bit half: an `and` and one `prmt` (byte permute, the nibbles
#     selecting from a constant table) make them four signed bytes (kernels/common.py).
#   "fields" (the 16-bit input-gradient kernel's): canonical code (trit + 1) at bit 8n + 2g,
#     i.e. byte j = 4w + n holds trit 64g + j in bits 2g..2g+1.
# Only the CUDA kernels use them; what is saved and exchanged stays canonical.
KBLOCK = 256
KBLOCK_ORDERS = ("nibbles", "fields")
_NIBBLE_CODES = (0, 3, 1)  # by trit + 1
_NIBBLE_TRITS = (-1, 1, 2, 0)  # by code; 2 marks the invalid code 2


def kblocked_columns(k: int) -> int:
    """Bytes per row of the K-blocked layout for K trits."""
    return -(-k // KBLOCK) * (KBLOCK // TRITS_PER_BYTE)


def _kblock_bits(order: str) -> torch.Tensor:
    """Bit of trit (g, n) within its word, ``[4 (g), 1 (w), 4 (n)]``."""
    if order not in KBLOCK_ORDERS:
        raise ValueError(f"unknown K-blocked order {order!r}; supported: {', '.join(KBLOCK_ORDERS)}")
    g, n = torch.arange(4).view(4, 1, 1), torch.arange(4).view(1, 1, 4)
    return 16 * (g >> 1) + 4 * n + 2 * (g & 1) if order == "nibbles" else 8 * n + 2 * g


def to_kblocked(packed: torch.Tensor, k: int, order: str = "nibbles") -> torch.Tensor:
    """Canonical ``uint8 [..., ceil(k/4)]`` -> K-blocked ``uint8 [..., kblocked_columns(k)]``."""
    bits = _kblock_bits(order)
    trits = unpack_ternary(packed, k, torch.int64)
    trits = torch.nn.functional.pad(trits, (0, kblocked_columns(k) * TRITS_PER_BYTE - k))
    codes = torch.tensor(_NIBBLE_CODES)[trits + 1] if order == "nibbles" else trits + 1
    codes = codes.reshape(*codes.shape[:-1], -1, 4, KBLOCK // 16, 4)  # [..., block, g, w, n]
    words = (codes << bits).sum(dim=(-3, -1))  # disjoint bits: the sum is the or
    out = torch.stack([(words >> (8 * b)) & 255 for b in range(4)], dim=-1)  # little-endian bytes
    return out.reshape(*packed.shape[:-1], -1).to(torch.uint8)


def from_kblocked(blocked: torch.Tensor, k: int, order: str = "nibbles") -> torch.Tensor:
    """Inverse of :func:`to_kblocked`: back to the canonical format."""
    bits = _kblock_bits(order)
    b = blocked.to(torch.int64).reshape(*blocked.shape[:-1], -1, 1, KBLOCK // 16, 4)
    words = sum(b[..., i] << (8 * i) for i in range(4))  # [..., block, 1, w]
    codes = (words[..., None] >> bits) & 3  # [..., block, g, w, n]: trit 64g + 4w + n
    invalid = 2 if order == "nibbles" else 3
    if not torch.compiler.is_compiling() and blocked.device.type != "meta" and bool((codes == invalid).any()):
        raise ValueError(f"K-blocked ({order}) tensor contains the invalid code {invalid}")
    trits = torch.tensor(_NIBBLE_TRITS)[codes] if order == "nibbles" else codes - 1
    trits = trits.reshape(*blocked.shape[:-1], -1)[..., :k]
    return pack_ternary(trits.to(torch.int16))
