"""The canonical packed-ternary format, and the K-blocked layouts the kernels read.

Ternary weights ``[..., K]`` are stored as ``uint8 [..., ceil(K/4)]``: four trits
per byte along K, trit ``j`` of a byte in bits ``2j..2j+1`` (least significant
first), code = trit + 1 (0 -> -1, 1 -> 0, 2 -> +1; 3 is invalid), K padded with
zero trits. This is what is saved and exchanged; kernels may re-layout it.
"""

from __future__ import annotations

import numbers

import torch

TRITS_PER_BYTE = 4
_SHIFTS = (0, 2, 4, 6)


def packed_columns(k: int) -> int:
    """Bytes per row for K trits."""
    return (k + TRITS_PER_BYTE - 1) // TRITS_PER_BYTE


def _checks_values(t: torch.Tensor) -> bool:
    # Reading values needs a real tensor: not while the compiler traces, not on the meta device.
    return not torch.compiler.is_compiling() and t.device.type != "meta"


def _trit_error(trits: torch.Tensor, bad: torch.Tensor) -> ValueError:
    values = trits[bad]
    shown = ", ".join(repr(v) for v in values[:5].tolist())
    more = f" (and {values.numel() - 5} more)" if values.numel() > 5 else ""
    return ValueError(
        f"pack_ternary needs trits exactly in {{-1, 0, 1}}; got {values.numel()} other value(s): {shown}{more}"
    )


def pack_ternary(trits: torch.Tensor) -> torch.Tensor:
    """Pack trits in {-1, 0, 1} (any integer, bool or float dtype) along the last dim.

    Raises ``ValueError`` naming the values that are not exactly -1, 0 or 1 (out of range,
    fractional, NaN, inf) rather than packing a wrong trit. While the compiler traces, or on the
    meta device, values are not read: out-of-range values are clamped to -1 / +1 there."""
    if not isinstance(trits, torch.Tensor) or trits.is_complex():
        got = trits.dtype if isinstance(trits, torch.Tensor) else type(trits).__name__
        raise TypeError(f"pack_ternary needs a real tensor of trits, got {got}")
    if trits.dim() == 0:
        raise ValueError("pack_ternary needs trits along a last dimension, got a 0-d tensor")
    k = trits.shape[-1]
    pad = packed_columns(k) * TRITS_PER_BYTE - k
    # Clamped first so that no value can reach a neighbour's bits; a valid trit survives the int16
    # round trip unchanged, anything else (5, 0.9999, NaN, inf) comes back different.
    low = -1 if trits.dtype.is_signed else 0  # clamp(-1) of an unsigned tensor would wrap
    ints = trits.to(torch.int16) if trits.dtype == torch.bool else trits.clamp(low, 1).to(torch.int16)
    if trits.dtype != torch.bool and _checks_values(trits):
        bad = ints != trits
        if bool(bad.any()):
            raise _trit_error(trits, bad)
    codes = (ints + 1).to(torch.uint8)
    if pad:
        # Padding is the zero trit, whose code is 1.
        codes = torch.nn.functional.pad(codes, (0, pad), value=1)
    codes = codes.reshape(*codes.shape[:-1], packed_columns(k), TRITS_PER_BYTE)
    packed = codes[..., 0] | (codes[..., 1] << 2) | (codes[..., 2] << 4) | (codes[..., 3] << 6)
    return packed.contiguous()


def unpack_ternary(packed: torch.Tensor, k: int, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """Inverse of :func:`pack_ternary`: ``uint8 [..., ceil(k/4)] -> dtype [..., k]``.

    Raises ``ValueError`` on the invalid code 3 rather than returning a wrong trit.
    """
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed ternary weights must be uint8, got {packed.dtype}")
    if isinstance(k, bool) or not isinstance(k, (numbers.Integral, torch.SymInt)) or k < 0:
        raise ValueError(f"k (trits per row) must be an int >= 0, got {k!r}")
    if packed.dim() == 0 or packed.shape[-1] != packed_columns(k):
        cols = packed.shape[-1] if packed.dim() else "a 0-d tensor"
        raise ValueError(f"k={k} needs {packed_columns(k)} packed columns, got {cols}")
    codes = torch.stack([(packed >> s) & 3 for s in _SHIFTS], dim=-1)
    if _checks_values(packed) and bool((codes == 3).any()):
        raise ValueError("packed ternary tensor contains the invalid code 3")
    codes = codes.flatten(-2)[..., :k]
    return (codes.to(torch.int8) - 1).to(dtype)


# --- kernel layouts: K-blocked words, built from the canonical format ------------------
# A row's trits are cut in blocks of KBLOCK = 256 (K padded with zero trits), each 64 bytes,
# read as 16 little-endian 32-bit words: trit 64g + 4w + n of a block (quarter g, word w,
# n = 0..3) is in word w. One decode of a word run thus gives, per quarter, trits of
# *consecutive* K that meet a contiguous slice of the activations (no stride-4 gathers), and
# the four quarters side by side are the block's K order. Two orders within a word:
#   "nibbles" (the int8 matmul's): nibble n of 16-bit half h (bits 16h + 4n) holds the trit pair
#     (a, b) = (trit of quarter 2h, trit of quarter 2h + 1) as one 4-bit code d(a) + 3 d(b), with
#     d(+1) = 0, d(-1) = 1, d(0) = 2 (9 of 16 values; 8 = two zero trits, 0x88888888 a word of
#     zeros). The nibbles of one half are the selectors of a `prmt` (byte permute) from an 8-byte
#     table: one table (PAIR_TABLES) gives quarter 2h's four trits as signed bytes, another
#     quarter 2h + 1's, with no masking (prmt reads bits 0-15 only; code 8 takes byte 0 with its
#     sign replicated, hence d(+1) = 0: byte 0 of both tables is +1, sign-extended 0).
#   "fields" (the 16-bit input-gradient kernel's): canonical code (trit + 1) at bit 8n + 2g,
#     i.e. byte j = 4w + n holds trit 64g + j in bits 2g..2g+1.
# Only the CUDA kernels use them; what is saved and exchanged stays canonical.
KBLOCK = 256
KBLOCK_ORDERS = ("nibbles", "fields")
PAIR_DIGIT = (1, 2, 0)  # d(trit) by trit + 1
PAIR_TRIT = (1, -1, 0)  # trit by digit
ZERO_PAIRS = 0x88888888  # a "nibbles" word of sixteen zero trits


def _pair_tables() -> tuple[int, int, int, int]:
    """The prmt tables (a, b) of the "nibbles" order's even and odd quarters: byte v < 8 of
    table (a | b << 32) is the trit of code v; code 8 reads byte 0 sign-extended."""

    def word(trits):
        return sum((t & 0xFF) << (8 * i) for i, t in enumerate(trits))

    even = [PAIR_TRIT[v % 3] for v in range(8)]
    odd = [PAIR_TRIT[v // 3] for v in range(8)]
    return word(even[:4]), word(even[4:]), word(odd[:4]), word(odd[4:])


PAIR_TABLES = _pair_tables()


def kblocked_columns(k: int) -> int:
    """Bytes per row of the K-blocked layout for K trits."""
    return -(-k // KBLOCK) * (KBLOCK // TRITS_PER_BYTE)


def _check_order(order: str) -> None:
    if order not in KBLOCK_ORDERS:
        raise ValueError(f"unknown K-blocked order {order!r}; supported: {', '.join(KBLOCK_ORDERS)}")


def _words(units: torch.Tensor, bits: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Codes ``[..., block, a, w, b]`` placed at ``bits [a, 1, b]`` of word w -> little-endian bytes."""
    words = (units << bits).sum(dim=(-3, -1))  # disjoint bits: the sum is the or
    out = torch.stack([(words >> (8 * i)) & 255 for i in range(4)], dim=-1)
    return out.reshape(*shape[:-1], -1).to(torch.uint8)


def to_kblocked(packed: torch.Tensor, k: int, order: str = "nibbles") -> torch.Tensor:
    """Canonical ``uint8 [..., ceil(k/4)]`` -> K-blocked ``uint8 [..., kblocked_columns(k)]``."""
    _check_order(order)
    trits = unpack_ternary(packed, k, torch.int64)
    trits = torch.nn.functional.pad(trits, (0, kblocked_columns(k) * TRITS_PER_BYTE - k))
    trits = trits.reshape(*trits.shape[:-1], -1, 4, KBLOCK // 16, 4)  # [..., block, g, w, n]
    n = torch.arange(4).view(1, 1, 4)
    if order == "fields":
        return _words(trits + 1, 8 * n + 2 * torch.arange(4).view(4, 1, 1), packed.shape)
    d = torch.tensor(PAIR_DIGIT)[trits + 1]
    pairs = d[..., 0::2, :, :] + 3 * d[..., 1::2, :, :]  # [..., block, h, w, n]
    return _words(pairs, 16 * torch.arange(2).view(2, 1, 1) + 4 * n, packed.shape)


def from_kblocked(blocked: torch.Tensor, k: int, order: str = "nibbles") -> torch.Tensor:
    """Inverse of :func:`to_kblocked`: back to the canonical format."""
    _check_order(order)
    b = blocked.to(torch.int64).reshape(*blocked.shape[:-1], -1, 1, KBLOCK // 16, 4)
    words = sum(b[..., i] << (8 * i) for i in range(4))[..., None]  # [..., block, 1, w, 1]
    n = torch.arange(4).view(1, 1, 4)
    check = not torch.compiler.is_compiling() and blocked.device.type != "meta"
    if order == "fields":
        codes = (words >> (8 * n + 2 * torch.arange(4).view(4, 1, 1))) & 3  # [..., block, g, w, n]
        if check and bool((codes == 3).any()):
            raise ValueError("K-blocked (fields) tensor contains the invalid code 3")
        trits = codes - 1
    else:
        pairs = (words >> (16 * torch.arange(2).view(2, 1, 1) + 4 * n)) & 15  # [..., block, h, w, n]
        if check and bool((pairs > 8).any()):
            raise ValueError("K-blocked (nibbles) tensor contains an invalid pair code (> 8)")
        table = torch.tensor(PAIR_TRIT)
        trits = torch.stack([table[pairs % 3], table[pairs // 3]], dim=-3)  # [..., block, h, 2, w, n]
        trits = trits.flatten(-4, -3)  # quarter g = 2h + (0 | 1)
    trits = trits.reshape(*blocked.shape[:-1], -1)[..., :k]
    return pack_ternary(trits.to(torch.int16))
