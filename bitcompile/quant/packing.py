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


# --- kernel layout (issue 3): K-blocked bytes, built from the canonical format ---------
# Within each block of KBLOCK trits of a row, byte j (0 <= j < KBLOCK/4) holds trits
# k = j + i * KBLOCK/4 in bits 2i..2i+1 (i = 0..3), codes as canonical. One shift of a
# byte run then yields KBLOCK/4 trits with *consecutive* K, which meet a contiguous slice
# of the activations (no stride-4 gathers in the kernels). K is padded to a whole block
# with zero trits. Only the CUDA kernels use it; what is saved and exchanged stays canonical.
KBLOCK = 256


def kblocked_columns(k: int) -> int:
    """Bytes per row of the K-blocked layout for K trits."""
    return -(-k // KBLOCK) * (KBLOCK // TRITS_PER_BYTE)


def to_kblocked(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Canonical ``uint8 [..., ceil(k/4)]`` -> K-blocked ``uint8 [..., kblocked_columns(k)]``."""
    trits = unpack_ternary(packed, k, torch.int16)
    pad = kblocked_columns(k) * TRITS_PER_BYTE - k
    codes = torch.nn.functional.pad(trits + 1, (0, pad), value=1).to(torch.uint8)
    codes = codes.reshape(*codes.shape[:-1], -1, TRITS_PER_BYTE, KBLOCK // TRITS_PER_BYTE)
    out = codes[..., 0, :] | (codes[..., 1, :] << 2) | (codes[..., 2, :] << 4) | (codes[..., 3, :] << 6)
    return out.reshape(*packed.shape[:-1], -1).contiguous()


def from_kblocked(blocked: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`to_kblocked`: back to the canonical format."""
    q = KBLOCK // TRITS_PER_BYTE
    b = blocked.reshape(*blocked.shape[:-1], -1, 1, q)
    codes = torch.cat([(b >> s) & 3 for s in _SHIFTS], dim=-2)  # [..., blocks, 4, q]: k = 256 blk + q i + j
    codes = codes.reshape(*blocked.shape[:-1], -1)[..., :k]
    return pack_ternary(codes.to(torch.int16) - 1)
