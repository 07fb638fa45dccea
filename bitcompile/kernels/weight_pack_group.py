"""Several weights quantized and packed in two launches: the weight pack for a whole QAT step.

A QAT step re-quantizes every weight: with ``weight_pack.py`` that is two launches per linear
(abs-sum, pack), 84 of a 6-layer Llama's step, each a few microseconds of GPU time behind tens of
microseconds of host time. Here one abs-sum launch and one pack launch serve any number of
weights of one dtype: each program finds its weight in a table of the group (weight and output
addresses, shapes, where its programs start) and runs the same per-tile code as ``weight_pack.py``
(``_abs_sum_rows``, ``_pack_tile``), so every code, scale and sum is bitwise what the single-weight
kernels compute with the same tile sizes.

The table is an int64 ``[G, FIELDS]`` tensor of addresses and sizes, rebuilt every call (the
outputs are new tensors each step), so the op that launches these is opaque to Inductor (its
traced launches cannot take addresses) and not for CUDA-graph capture (the table's host-to-device
copy); ``ops.quantize.quantize_weights_group`` falls back to one pack per weight there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bitcompile.kernels.weight_pack import MAX_PARTS, SCALE_MIN, SCHEMES, Q, _abs_sum_rows, _pack_tile
from bitcompile.numerics.packing import kblocked_columns
from bitcompile.numerics.spec import EPS

# The table's columns (one row per weight): addresses of the weight, its canonical and K-blocked
# codes, scale, row sums and partial sums; its N, K and row stride; its first abs-sum and first pack
# program; its number of abs-sum programs (= partial sums).
_W, _CODES, _BLOCKED, _SCALE, _ROWSUM, _PART = (tl.constexpr(c) for c in range(6))
_N, _K, _STRIDE, _SUM_START, _PACK_START, _PARTS = (tl.constexpr(c) for c in range(6, 12))
FIELDS = tl.constexpr(12)
SUM_ROWS, SUM_COLS, SUM_WARPS, PACK_ROWS, PACK_WARPS = 16, 512, 4, 8, 4  # weight_pack's first configuration


@triton.jit
def _slot(T, START: tl.constexpr, G, GP: tl.constexpr):
    """The table row of this program: the last weight whose first program is at or before it."""
    g = tl.arange(0, GP)
    starts = tl.load(T + g * FIELDS + START, mask=g < G, other=2**62)
    return tl.sum((starts <= tl.program_id(0)).to(tl.int32), axis=0) - 1


@triton.jit
def _field(T, slot, column: tl.constexpr):
    return tl.load(T + slot * FIELDS + column)


@triton.jit
def _abs_sum_group_kernel(T, W0, G, GP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    slot = _slot(T, _SUM_START, G, GP)
    W = _field(T, slot, _W).to(tl.pointer_type(W0.dtype.element_ty))
    ROWSUM = _field(T, slot, _ROWSUM).to(tl.pointer_type(tl.float32))
    PART = _field(T, slot, _PART).to(tl.pointer_type(tl.float32))
    n, k, stride = _field(T, slot, _N), _field(T, slot, _K), _field(T, slot, _STRIDE)
    local = tl.program_id(0) - _field(T, slot, _SUM_START)
    part = _abs_sum_rows(W, ROWSUM, n, k, stride, local, _field(T, slot, _PARTS), BN, BK)
    tl.store(PART + local, part)


@triton.jit
def _pack_group_kernel(
    T,
    W0,
    G,
    GP: tl.constexpr,
    BN: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
    SCHEME: tl.constexpr,
    QB: tl.constexpr,
    PARTS: tl.constexpr,
):
    slot = _slot(T, _PACK_START, G, GP)
    W = _field(T, slot, _W).to(tl.pointer_type(W0.dtype.element_ty))
    P = _field(T, slot, _CODES).to(tl.pointer_type(tl.uint8))
    P2 = _field(T, slot, _BLOCKED).to(tl.pointer_type(tl.uint8))
    SCALE = _field(T, slot, _SCALE).to(tl.pointer_type(tl.float32))
    ROWSUM = _field(T, slot, _ROWSUM).to(tl.pointer_type(tl.float32))
    PART = _field(T, slot, _PART).to(tl.pointer_type(tl.float32))
    n, k, stride = _field(T, slot, _N), _field(T, slot, _K), _field(T, slot, _STRIDE)
    kb, kb2 = (k + 3) // 4, (k + 4 * QB - 1) // (4 * QB) * QB
    local = tl.program_id(0) - _field(T, slot, _PACK_START)
    blocks = (k + 4 * QB - 1) // (4 * QB)
    rows = (local // blocks) * BN + tl.arange(0, BN)
    blk = local % blocks
    if PER_CHANNEL:
        s = tl.maximum(tl.math.div_rn(tl.load(ROWSUM + rows, mask=rows < n, other=1.0), k.to(tl.float32)), SCALE_MIN)
        if blk == 0:
            tl.store(SCALE + rows, s, mask=rows < n)
        s = s[:, None, None]
    else:
        parts = tl.arange(0, PARTS)
        total = tl.sum(tl.load(PART + parts, mask=parts < _field(T, slot, _PARTS), other=0.0), axis=0)
        s = tl.maximum(tl.math.div_rn(total, (n * k).to(tl.float32)), SCALE_MIN)
        if (blk == 0) & (local == 0):
            tl.store(SCALE, s)
    _pack_tile(W, P, rows, blk, s, n, k, kb, stride, kb, BN, SCHEME, False, QB)
    _pack_tile(W, P2, rows, blk, s, n, k, kb2, stride, kb2, BN, SCHEME, True, QB)


def quantize_pack_group(weights: list[torch.Tensor], scheme: str = "ternary", per_channel: bool = False) -> list:
    """``[W_0, W_1, ...]`` (2-D, one dtype and device) -> ``[(canonical codes, scale, K-blocked
    codes), ...]``, each as ``weight_pack.quantize_pack_both`` gives it for that weight, from two
    launches in all."""
    if scheme not in SCHEMES:
        raise ValueError(f"the weight-pack kernel supports {', '.join(SCHEMES)} (got {scheme!r})")
    if not weights:
        return []
    first = weights[0]
    if any(w.dim() != 2 or w.dtype != first.dtype or w.device != first.device for w in weights):
        raise ValueError("quantize_pack_group takes 2-D weights of one dtype on one device")
    weights = [w if w.stride(-1) == 1 else w.contiguous() for w in weights]
    out, rows, sum_programs, pack_programs = [], [], 0, 0
    for w in weights:
        n, k = w.shape
        codes = torch.empty((n, (k + 3) // 4), device=w.device, dtype=torch.uint8)
        blocked = torch.empty((n, kblocked_columns(k)), device=w.device, dtype=torch.uint8)
        scale = torch.empty(n if per_channel else 1, device=w.device, dtype=torch.float32)
        out.append((codes, scale, blocked))
        if n == 0 or k == 0:  # nothing to launch for: the empty weight's scale and padding codes
            scale.fill_(EPS)
            codes.fill_(85), blocked.fill_(85)
            continue
        parts = min(triton.cdiv(n, SUM_ROWS), MAX_PARTS)
        row_sum = torch.empty(n, device=w.device, dtype=torch.float32)
        part = torch.empty(parts, device=w.device, dtype=torch.float32)
        out[-1] += (row_sum, part)  # (kept alive until the launches are queued)
        rows.append(
            [w.data_ptr(), codes.data_ptr(), blocked.data_ptr(), scale.data_ptr(), row_sum.data_ptr()]
            + [part.data_ptr(), n, k, w.stride(0), sum_programs, pack_programs, parts]
        )
        sum_programs += parts
        pack_programs += triton.cdiv(n, PACK_ROWS) * triton.cdiv(k, 4 * Q)
    if rows:
        table = torch.tensor(rows, dtype=torch.int64)
        if first.is_cuda:  # pinned and asynchronous: a pageable copy would wait for the GPU's queue
            table = table.pin_memory().to(first.device, non_blocking=True)
        g, gp = len(rows), triton.next_power_of_2(len(rows))
        _abs_sum_group_kernel[(sum_programs,)](table, first, g, GP=gp, BN=SUM_ROWS, BK=SUM_COLS, num_warps=SUM_WARPS)
        _pack_group_kernel[(pack_programs,)](
            table,
            first,
            g,
            GP=gp,
            BN=PACK_ROWS,
            PER_CHANNEL=per_channel,
            SCHEME=SCHEMES[scheme],
            QB=Q,
            PARTS=MAX_PARTS,
            num_warps=PACK_WARPS,
        )
    return [entry[:3] for entry in out]
