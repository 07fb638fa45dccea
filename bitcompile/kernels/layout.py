"""The K-blocked kernel layouts of packed trits (``bitcompile.numerics.packing.to_kblocked``).

``relayout(wq, k)`` converts canonical bytes on the GPU (one read, one write of the packed
bytes; 15 µs at 8192² on an H100, ~1.5% of that GEMM at 8192 tokens). ``kblocked(wq, k)`` does
it once per packed tensor and keeps the result while ``wq`` lives and is unchanged: for
inference, which feeds the same cached packed weights on every call (``ops.weight_cache``).
QAT re-packs every step, so its ops re-lay out per call and keep nothing
(``ternary_matmul(..., keep=False)``: a kept copy made while a CUDA graph is recorded would
be memory the graph does not track). ``once`` is that per-tensor cache, also for the conv's
re-ordered weights (``conv.conv_taps``).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import triton
import triton.language as tl
from torch.utils.weak import WeakIdKeyDictionary

from bitcompile.kernels import tuning
from bitcompile.numerics.packing import KBLOCK, KBLOCK_ORDERS, kblocked_columns

QUARTER = KBLOCK // 4  # bytes per row per block; also the trits one quarter of a word run yields


@triton.jit
def pair_digits(byte):
    """Canonical codes (trit + 1) -> the "nibbles" order's pair digits (+1 -> 0, -1 -> 1, 0 -> 2;
    ``packing.PAIR_DIGIT``), the four 2-bit fields of a byte at once: high bit = (code == 1),
    low bit = (code == 0)."""
    lo = byte & 0x55
    hi = (byte >> 1) & 0x55
    return ((lo & ~hi) << 1) | (~(lo | hi) & 0x55)


@triton.jit
def _relayout_kernel(P, OUT, N, K, KB, stride_p, stride_o, BN: tl.constexpr, Q: tl.constexpr):
    # A block of 4Q trits is Q canonical bytes per row, four runs of Q/4: byte c of run i
    # holds trits k = i*Q + 4c + s (field s), and output word c holds trit i*Q + 4c + s (quarter
    # i, nibble s): the pair code of runs 2h and 2h + 1, field s, goes to nibble s of half h.
    # Element-wise on [BN, Q/4] tiles, contiguous loads and stores, nothing exchanged between
    # threads (a gather formulation takes ~600 us at 8192^2, this one ~15).
    rows = tl.program_id(0) * BN + tl.arange(0, BN)[:, None]
    blk = tl.program_id(1)
    c = tl.arange(0, Q // 4)[None, :]
    out = tl.zeros((BN, Q // 4), dtype=tl.int32)
    for i in tl.static_range(4):
        col = blk * Q + i * (Q // 4) + c
        byte = tl.load(P + rows.to(tl.int64) * stride_p + col, mask=(rows < N) & (col < KB), other=0x55).to(tl.int32)
        # Fields past K (the last byte's padding, whatever its bits) become the zero trit 01.
        valid = tl.minimum(tl.maximum(K - (blk * 4 * Q + i * Q + 4 * c), 0), 4)
        trit_bits = (1 << (2 * valid)) - 1
        d = pair_digits((byte & trit_bits) | (0x55 & ~trit_bits))
        for s in tl.static_range(4):  # pair code = even digit + 3 x odd digit
            out += (((d >> (2 * s)) & 3) * (1 + 2 * (i % 2))) << (16 * (i // 2) + 4 * s)
    tl.store(OUT + rows.to(tl.int64) * stride_o + blk * (Q // 4) + c, out, mask=rows < N)


def relayout(wq: torch.Tensor, k: int, wrap: Optional[Callable] = None) -> torch.Tensor:
    """Canonical packed ``uint8 [N, ceil(k/4)]`` -> K-blocked ("nibbles") ``uint8 [N, kblocked_columns(k)]``
    (``wrap``: launched through ``torch.library.wrap_triton``, ``tuning.traceable``)."""
    if wq.dtype != torch.uint8 or wq.dim() != 2 or wq.shape[1] != (k + 3) // 4:
        raise ValueError(
            f"relayout needs canonical packed uint8 [N, ceil(k/4)] weights, got {wq.dtype} {tuple(wq.shape)} for k={k}"
        )
    wq = wq.contiguous()
    n = wq.shape[0]
    kbo = kblocked_columns(k)
    out = torch.empty((n, kbo), device=wq.device, dtype=torch.uint8)
    if n and kbo:
        bn = 16 if tuning.interpreting() else 32  # sm_90: 4 loads + 1 16-byte store per thread, no shared memory
        words = out.view(torch.int32)  # rows of whole 64-byte blocks: word aligned
        kernel = tuning.traceable(_relayout_kernel, wrap)
        kernel[(triton.cdiv(n, bn), kbo // QUARTER)](
            wq, words, n, k, wq.shape[1], wq.stride(0), words.stride(0), BN=bn, Q=QUARTER, num_warps=4
        )
    return out


@triton.jit
def _transposed_kernel(P, OUT, N, K, KB, stride_p, stride_o, BC: tl.constexpr, Q: tl.constexpr, NIBBLES: tl.constexpr):
    # Input: a [4Q rows, BC bytes] tile of canonical bytes, read along the bytes (coalesced).
    # Output row k = 4c + s (field s of byte column c), block b = program_id(1): the trit of
    # input row n = b*4Q + i*Q + j (quarter i, word j // 4, n' = j % 4) goes to byte j, bits 2i
    # ("fields"), or, in one pair code with quarter i ^ 1, to bits 16 (i // 2) + 4 n' of word
    # j // 4 ("nibbles"). Triton transposes between the load's and the stores' layouts through
    # shared memory.
    c = tl.program_id(0) * BC + tl.arange(0, BC)
    i = tl.arange(0, 4)[:, None, None]
    n = tl.program_id(1) * 4 * Q + i * Q + tl.arange(0, Q)[None, :, None]
    valid = (n < N) & (c[None, None, :] < KB)
    src = tl.load(P + n.to(tl.int64) * stride_p + c[None, None, :], mask=valid, other=0x55)  # 0x55: zero trits
    src = src.to(tl.int32)
    if NIBBLES:
        src = pair_digits(src)
    out_rows = OUT + tl.program_id(1) * Q + tl.arange(0, Q)[:, None]
    for s in tl.static_range(4):
        if NIBBLES:
            # [i, j, c] = [2 h, 2 q, Q/4 w, 2 b, 2 n', c]: byte 4w + 2h + b holds, at bits 4 n', the
            # pair code (even digit + 3 x odd digit) of quarters 2h and 2h + 1, j = 4w + 2b + n'.
            e = tl.reshape((src >> (2 * s)) & 3, (2, 2, Q // 4, 2, 2, BC))
            q = tl.arange(0, 2)[None, :, None, None, None, None]
            nl = tl.arange(0, 2)[None, None, None, None, :, None]
            out = tl.sum(tl.sum((e * (1 + 2 * q)) << (4 * nl), axis=4), axis=1)  # [h, w, b, c]
            out = tl.reshape(tl.permute(out, (1, 0, 2, 3)), (Q, BC))
        else:
            out = tl.sum(((src >> (2 * s)) & 3) << (2 * i), axis=0)  # [Q, BC]
        k = 4 * c[None, :] + s
        tl.store(out_rows + k.to(tl.int64) * stride_o, out.to(tl.uint8), mask=k < K)


def transposed_kblocked(
    wq: torch.Tensor, k: int, wrap: Optional[Callable] = None, order: str = "nibbles"
) -> torch.Tensor:
    """Canonical packed trits ``T [N, ceil(k/4)]`` -> ``T^T`` K-blocked, ``uint8 [k,
    kblocked_columns(N)]``, in ``order`` (``bitcompile.numerics.packing``): "nibbles" lets the
    forward matmul kernel compute ``g @ T`` (the int8 QAT input gradient), "fields" is the
    16-bit input-gradient kernel's operand. One read and one write of the packed bytes."""
    if order not in KBLOCK_ORDERS:
        raise ValueError(f"unknown K-blocked order {order!r}; supported: {', '.join(KBLOCK_ORDERS)}")
    if wq.dtype != torch.uint8 or wq.dim() != 2 or wq.shape[1] != (k + 3) // 4:
        raise ValueError(
            f"transposed_kblocked needs canonical packed uint8 [N, ceil(k/4)] weights, got {wq.dtype} "
            f"{tuple(wq.shape)} for k={k}"
        )
    wq = wq.contiguous()
    n, kb = wq.shape
    cols = kblocked_columns(n)
    out = torch.empty((k, cols), device=wq.device, dtype=torch.uint8)
    if k and cols:
        bc = 16 if tuning.interpreting() else 32
        kernel = tuning.traceable(_transposed_kernel, wrap)
        kernel[(triton.cdiv(kb, bc), cols // QUARTER)](
            wq, out, n, k, kb, wq.stride(0), out.stride(0), BC=bc, Q=QUARTER, NIBBLES=order == "nibbles", num_warps=4
        )
    return out


_cache = WeakIdKeyDictionary()  # packed tensor -> {key: (version, derived tensor)}


def once(wq: torch.Tensor, key: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``make()``, a tensor derived from ``wq``, computed once per packed tensor and ``key`` (re-done
    if ``wq`` is modified or its storage replaced; kept while ``wq`` lives). Not kept for inference
    tensors (no version counter) or while a CUDA graph is recorded (memory the graph does not
    track)."""
    if wq.is_inference():
        return make()
    version = (wq._version, wq.data_ptr())
    entries = _cache.setdefault(wq, {})
    hit = entries.get(key)
    if hit is not None and hit[0] == version:
        return hit[1]
    out = make()
    if not (wq.is_cuda and torch.cuda.is_current_stream_capturing()):
        entries[key] = (version, out)
    return out


def kblocked(wq: torch.Tensor, k: int) -> torch.Tensor:
    """``relayout(wq, k)``, once per packed tensor (:func:`once`)."""
    return once(wq, ("kblocked", k), lambda: relayout(wq, k))
