"""Small Triton helpers shared by the kernel families."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bitcompile.numerics import packing, spec


def rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t [..., width]`` as ``[rows, width]`` with unit stride along the row (the kernels'
    pointer arithmetic assumes it; a view when it already has it)."""
    t2 = t.reshape(-1, width)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


# Epilogue activations (constexpr ACTIVATION); names as the passes and ops spell them.
ACTIVATIONS = {name: code for code, name in enumerate(spec.ACTIVATIONS)}  # the epilogue's ACTIVATION codes
SWIGLU = tl.constexpr(ACTIVATIONS["swiglu"])
SILU = tl.constexpr(ACTIVATIONS["silu"])


@triton.jit
def round_half_even(y):
    """``torch.round`` semantics (ties to even) without libdevice, so it also runs
    in the interpreter."""
    f = tl.floor(y)
    d = y - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def round_to_int(y, lo, hi, USE_ASM: tl.constexpr):
    """int32 ``clamp(round(y), lo, hi)`` with ties to even and NaN -> 0 (torch's ``round``,
    ``clamp``, ``nan_to_num``). On the GPU one ``cvt.rni.s32.f32`` (NaN converts to 0) and two
    integer clamps: the float rounding, NaN select and clamps cost ~12 instructions per element,
    and the activation quantizer is instruction-bound at 8192-wide rows."""
    if USE_ASM:
        q = tl.inline_asm_elementwise("cvt.rni.s32.f32 $0, $1;", "=r,f", [y], dtype=tl.int32, is_pure=True, pack=1)
        return tl.minimum(tl.maximum(q, lo), hi)
    else:
        r = round_half_even(y)
        r = tl.where(r != r, 0.0, r)
        return tl.minimum(tl.maximum(r, lo.to(tl.float32)), hi.to(tl.float32)).to(tl.int32)


@triton.jit
def grouped_tile(pid, grid_major, grid_minor, GROUP: tl.constexpr):
    """``(major, minor)`` tile indices of program ``pid`` in grouped order: GROUP consecutive
    major tiles sweep every minor tile together, so their shared operand stays in L2."""
    width = GROUP * grid_minor
    first = (pid // width) * GROUP
    rows = min(grid_major - first, GROUP)
    return first + (pid % width) % rows, (pid % width) // rows


@triton.jit
def unpack_trits(p, BKB: tl.constexpr, BN: tl.constexpr, USE_ASM: tl.constexpr):
    """Packed bytes ``[BN, BKB]`` (canonical format) -> int8 trits ``[BN, 4 * BKB]`` in K order."""
    w0 = trits_at(p, 0, USE_ASM)
    w1 = trits_at(p, 2, USE_ASM)
    w2 = trits_at(p, 4, USE_ASM)
    w3 = trits_at(p, 6, USE_ASM)
    # join(join(w0, w2), join(w1, w3))[n, c, q, p] = w_{2p+q}; flattening gives index 4c + 2q + p.
    w = tl.join(tl.join(w0, w2), tl.join(w1, w3))
    return tl.reshape(w, (BN, 4 * BKB))


# Four trits per 32-bit register: $0 = ((bytes of $1 >> $2) & 3) - 1. The subtraction would
# borrow across bytes; setting each byte's top bit first (or 0x80) and clearing it after
# (xor 0x80) keeps every byte's result its own. Checked on the CPU by interpreting this text
# (tests/kernels/test_common.py).
TRITS_PTX = tl.constexpr(
    "{ .reg .b32 t; shr.b32 t, $1, $2; and.b32 t, t, 0x03030303; or.b32 t, t, 0x80808080; "
    "sub.u32 t, t, 0x01010101; xor.b32 $0, t, 0x80808080; }"
)


@triton.jit
def trits_at(p, SHIFT: tl.constexpr, USE_ASM: tl.constexpr):
    """int8 trits ``((p >> SHIFT) & 3) - 1`` of packed bytes ``p``. On the GPU four bytes at
    a time in one register (``TRITS_PTX``): Triton's own int8 arithmetic unpacks each byte
    separately and repacks them with byte permutes, ~5 instructions per trit (SASS)."""
    if USE_ASM:
        shift = tl.full(p.shape, SHIFT, tl.int32)  # a constant: ptxas folds it into the shift
        return tl.inline_asm_elementwise(TRITS_PTX, "=r,r,r,r,r,r", [p, shift], dtype=tl.int8, is_pure=True, pack=4)
    else:
        return ((p >> SHIFT) & 3).to(tl.int8) - 1


# The "nibbles" order (bitcompile.numerics.packing): each nibble of a word is a pair code, the
# selector of a prmt (byte permute) into an 8-byte table; tables (a, b) for even quarters, then
# odd ones. ZERO_WORD: sixteen zero trits, as the int32 a masked load fills in.
PAIR_TABLES = packing.PAIR_TABLES
ZERO_WORD = tl.constexpr(packing.ZERO_PAIRS - (1 << 32))


def _kblock_ptx(quarters: tuple, word: str, tables: tuple = tuple(hex(t) for t in PAIR_TABLES)) -> tl.constexpr:
    """PTX: quarters ``g`` of the "nibbles" word ``word`` -> four signed trit bytes each, in
    $0, $1, ... The four pair codes of half g >> 1 are the selectors of one ``prmt`` into the
    table of quarter parity g & 1. prmt reads selector bits 0-15 only: the low half needs no
    mask, the high half one shift. ``tables``: the four table words (immediates or operands)."""
    body = ["shr.b32 h, %s, 16;" % word] if max(quarters) >= 2 else []
    for out, g in enumerate(quarters):
        a, b = tables[2 * (g & 1)], tables[2 * (g & 1) + 1]
        body.append(f"prmt.b32 ${out}, {a}, {b}, {word if g < 2 else 'h'};")
    return tl.constexpr("{ .reg .b32 h; " + " ".join(body) + " }")


# Per 16 trits: one shift and four byte permutes (docs/kernels.md compares the decodes). Checked
# on the CPU by interpreting the text (tests/kernels/test_ternary_matmul.py).
KBLOCK_PTX = _kblock_ptx((0, 1, 2, 3), "$4")
KBLOCK_PTX_Q0, KBLOCK_PTX_Q1, KBLOCK_PTX_Q2, KBLOCK_PTX_Q3 = (_kblock_ptx((g,), "$1") for g in range(4))
# The same with the quarter's table in operands $2 (a) and $6 (b) (each an int32 of a pack of
# four). SASS ``prmt`` takes its table from registers: given immediates, ptxas re-materialises
# them before every prmt; a table loaded from memory stays in its registers.
KBLOCK_PTX_T0, KBLOCK_PTX_T1, KBLOCK_PTX_T2, KBLOCK_PTX_T3 = (
    _kblock_ptx((g,), "$1", ("$2", "$6") * 2) for g in range(4)
)
# The same for int32 words (pack 1): the table in operands $2 (a) and $3 (b).
KBLOCK_PTX_W0, KBLOCK_PTX_W1, KBLOCK_PTX_W2, KBLOCK_PTX_W3 = (
    _kblock_ptx((g,), "$1", ("$2", "$3") * 2) for g in range(4)
)


def int32(word: int) -> int:
    """A 32-bit pattern as the int32 value that holds its bits (for kernel constants and tensors)."""
    return word - (1 << 32) if word >= 1 << 31 else word


PAIR_TABLE_WORDS = tuple(int32(t) for t in PAIR_TABLES)
# prmt tables of 16-bit trits by 2-bit code (grad_input.TRIT_PAIR_PTX): the low and the high
# bytes of -1, 0, 1 in bf16 (1.0 = 0x3F80) or fp16 (0x3C00).
ONE_TABLES = {"bf16": (0x80800080, 0x3F3F00BF), "fp16": (0x00000000, 0x3C3C00BC)}
_TA, _TB, _UA, _UB = (tl.constexpr(t) for t in PAIR_TABLE_WORDS)


@triton.jit
def pair_tables_in_registers(zero):
    """The prmt tables (even quarters a, b; odd a, b) as int32 tensors of ``zero``'s shape, for
    :func:`kblock_quarter_from`. ``zero`` must be 0 at run time, thread-varying, and unknown to
    the compiler: ptxas copies a constant (or a warp-uniform load) into a fresh register before
    every prmt (32 of a 136-instruction GEMV loop); a thread-varying value stays in its
    registers."""
    return zero + _TA, zero + _TB, zero + _UA, zero + _UB


@triton.jit
def pair_trit(d):
    """Trit of a pair-code digit (int32): 0 -> +1, 1 -> -1, 2 -> 0."""
    return tl.where(d == 2, 0, 1 - 2 * d)


@triton.jit
def pair_digit(code, ODD: tl.constexpr):
    """The even (code % 3) or odd (code // 3) quarter's digit of a pair code."""
    if ODD:
        return code // 3
    else:
        return code % 3


@triton.jit
def kblock_quarters(p, BN: tl.constexpr, Q: tl.constexpr, USE_ASM: tl.constexpr):
    """K-blocked ("nibbles") bytes ``[BN, Q]`` of one 256-trit block -> its four quarters as
    int8 trits ``[BN, Q]`` each: quarter g, column j holds trit 64g + j. The four bytes an
    asm call packs into a register are one little-endian word of the layout (the load's
    16-byte vectors keep them together)."""
    if USE_ASM:
        return tl.inline_asm_elementwise(
            KBLOCK_PTX, "=r,=r,=r,=r,r", [p], dtype=(tl.int8, tl.int8, tl.int8, tl.int8), is_pure=True, pack=4
        )
    else:
        # Byte 4w + 2h + b holds the pair codes of nibbles n = 2b (low) and 2b + 1 of half h.
        x = tl.reshape(p.to(tl.int32) & 0xFF, (BN, Q // 4, 2, 2))  # [BN, w, h, b]
        lo_half, hi_half = tl.split(tl.permute(x, (0, 1, 3, 2)))  # [BN, w, b] each
        return (
            _quarter_ref(lo_half, False, BN, Q),
            _quarter_ref(lo_half, True, BN, Q),
            _quarter_ref(hi_half, False, BN, Q),
            _quarter_ref(hi_half, True, BN, Q),
        )


@triton.jit
def kblock_quarter(p, G: tl.constexpr, BN: tl.constexpr, Q: tl.constexpr, USE_ASM: tl.constexpr):
    """Quarter G of :func:`kblock_quarters`, or, with ``Q == 0``, of int32 words ``p`` (each its
    four trits as signed bytes). One quarter at a time keeps one tile live: the four at once,
    each a shared-memory MMA operand, outgrow the H100's shared memory in 128 x 256 tiles."""
    if USE_ASM:
        pack: tl.constexpr = 1 if Q == 0 else 4
        if Q != 0:
            p = p.to(tl.int8, bitcast=True)  # the packed bytes may arrive as uint8
        if G == 0:
            return tl.inline_asm_elementwise(KBLOCK_PTX_Q0, "=r,r", [p], dtype=p.dtype, is_pure=True, pack=pack)
        elif G == 1:
            return tl.inline_asm_elementwise(KBLOCK_PTX_Q1, "=r,r", [p], dtype=p.dtype, is_pure=True, pack=pack)
        elif G == 2:
            return tl.inline_asm_elementwise(KBLOCK_PTX_Q2, "=r,r", [p], dtype=p.dtype, is_pure=True, pack=pack)
        else:
            return tl.inline_asm_elementwise(KBLOCK_PTX_Q3, "=r,r", [p], dtype=p.dtype, is_pure=True, pack=pack)
    elif Q == 0:
        out = tl.zeros_like(p)
        for n in tl.static_range(4):
            d = pair_digit((p >> (16 * (G // 2) + 4 * n)) & 15, G % 2 == 1)
            out |= (pair_trit(d) & 0xFF) << (8 * n)
        return out
    else:
        return kblock_quarters(p, BN, Q, USE_ASM)[G]


@triton.jit
def _quarter_asm(p, a, b, BYTES_PTX: tl.constexpr, WORDS_PTX: tl.constexpr):
    if p.dtype == tl.int8:  # four bytes per asm call (pack 4): each table operand spans 4 registers
        return tl.inline_asm_elementwise(BYTES_PTX, "=r,r" + ",r" * 8, [p, a, b], dtype=tl.int8, is_pure=True, pack=4)
    else:
        return tl.inline_asm_elementwise(WORDS_PTX, "=r,r,r,r", [p, a, b], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def kblock_quarter_from(p, ta, tb, ua, ub, G: tl.constexpr):
    """:func:`kblock_quarter` on the GPU of int8 bytes or int32 words ``p``, with the prmt tables
    as int32 tensors of ``p``'s shape kept in registers (loaded from memory, see KBLOCK_PTX_T0, or
    :func:`pair_tables_in_registers`): (ta, tb) for the even quarters, (ua, ub) for the odd ones."""
    if G == 0:
        return _quarter_asm(p, ta, tb, KBLOCK_PTX_T0, KBLOCK_PTX_W0)
    elif G == 1:
        return _quarter_asm(p, ua, ub, KBLOCK_PTX_T1, KBLOCK_PTX_W1)
    elif G == 2:
        return _quarter_asm(p, ta, tb, KBLOCK_PTX_T2, KBLOCK_PTX_W2)
    else:
        return _quarter_asm(p, ua, ub, KBLOCK_PTX_T3, KBLOCK_PTX_W3)


@triton.jit
def _quarter_ref(half, ODD: tl.constexpr, BN: tl.constexpr, Q: tl.constexpr):
    """Trits of one quarter (the even or odd digit of each pair code) of a half's bytes ``[BN, w, b]``."""
    lo, hi = pair_digit(half & 15, ODD), pair_digit((half >> 4) & 15, ODD)  # nibbles n = 2b, 2b + 1
    t = tl.join(pair_trit(lo), pair_trit(hi))  # [BN, w, b, n & 1]
    return tl.reshape(t, (BN, Q)).to(tl.int8)


@triton.jit
def unpack_kblock(p, BN: tl.constexpr, Q: tl.constexpr, USE_ASM: tl.constexpr):
    """One 256-trit block of K-blocked bytes ``[BN, Q]`` -> int8 trits ``[BN, 4 Q]`` in K order:
    the four quarters laid side by side (a register relabelling, no data exchanged between
    threads)."""
    w0, w1, w2, w3 = kblock_quarters(p, BN, Q, USE_ASM)
    # join(join(w0, w1), join(w2, w3))[n, j, y, x] = w_{2x+y}; order (n, x, y, j) is 64 i + j.
    w = tl.permute(tl.join(tl.join(w0, w1), tl.join(w2, w3)), (0, 3, 2, 1))
    return tl.reshape(w, (BN, 4 * Q))


@triton.jit
def apply_activation(y, ACTIVATION: tl.constexpr):
    """fp32 activation, formulas as torch computes them in fp32."""
    if ACTIVATION == 1:
        y = tl.maximum(y, 0.0)
    elif ACTIVATION == 2:  # exact GELU
        y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
    elif ACTIVATION == 3:
        y = y / (1.0 + tl.exp(-y))
    elif ACTIVATION == 4:
        r = tl.maximum(y, 0.0)
        y = r * r
    elif ACTIVATION == 5:  # tanh GELU: tanh(z) = 2 * sigmoid(2z) - 1
        z = 0.7978845608028654 * (y + 0.044715 * y * y * y)
        y = 0.5 * y * (1.0 + (2.0 / (1.0 + tl.exp(-2.0 * z)) - 1.0))
    return y


@triton.jit
def matmul_epilogue(
    acc,
    C,
    XS,
    WS,
    BIAS,
    RES,
    offs_m,
    offs_n,
    M,
    N,
    stride_cm,
    stride_rm,
    EPILOGUE: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    HAS_RES: tl.constexpr,
):
    """The packed-ternary matmuls' epilogue on an int32 tile ``acc [BM tokens, BN weight rows]``:
    ``acc * s_w * s_x (+ bias)``, activation, residual, cast, in the reference's order (or
    the int32 tile itself without EPILOGUE). SWIGLU: the tile's rows pair up (gate, up) and
    its BN / 2 outputs ``silu(gate) * up`` go to columns ``offs_n / 2`` of C, ``N / 2`` wide."""
    if EPILOGUE:
        if PER_CHANNEL:
            ws = tl.load(WS + offs_n, mask=offs_n < N, other=0.0)[None, :]
        else:
            ws = tl.load(WS)
        xs = tl.load(XS + offs_m, mask=offs_m < M, other=0.0)[:, None]
        y = acc.to(tl.float32) * ws
        y = y * xs
        if HAS_BIAS:
            y = y + tl.load(BIAS + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        if ACTIVATION == SWIGLU:
            gate, up = tl.split(tl.reshape(y, (y.shape[0], y.shape[1] // 2, 2)))
            y = apply_activation(gate, SILU) * up
            # The tile's outputs are contiguous from its first row / 2: said so (not derived from
            # offs_n through the split) so that their stores are wide and coalesced.
            first = tl.min(offs_n, axis=0) // 2
            if offs_n.shape[0] >= 16:  # tiles start at multiples of their height
                first = tl.multiple_of(first, offs_n.shape[0] // 2)
            offs_n = first + tl.arange(0, offs_n.shape[0] // 2)
            N = N // 2
        else:
            y = apply_activation(y, ACTIVATION)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    c_ptrs = C + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    if EPILOGUE:
        if HAS_RES:
            r = tl.load(RES + offs_m[:, None].to(tl.int64) * stride_rm + offs_n[None, :], mask=mask, other=0.0)
            y = y + r.to(tl.float32)
        tl.store(c_ptrs, y.to(C.dtype.element_ty), mask=mask)
    else:
        tl.store(c_ptrs, acc, mask=mask)


@triton.jit
def grid_dependency_wait():
    """``griddepcontrol.wait`` as inline PTX, for the Gluon kernel (whose language has no
    grid-dependency op; the Triton kernels use ``tl.extra.cuda.gdc_wait``): the kernel before
    this one, under programmatic dependent launch, has finished and its writes are visible."""
    tl.inline_asm_elementwise("griddepcontrol.wait;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def grid_dependency_launch_dependents():
    """``griddepcontrol.launch_dependents`` as inline PTX (see ``grid_dependency_wait``)."""
    tl.inline_asm_elementwise("griddepcontrol.launch_dependents;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _fence(USE_ASM: tl.constexpr):
    """A GPU-scope memory fence in every thread (the interpreter runs programs one by one)."""
    if USE_ASM:
        tl.inline_asm_elementwise("fence.acq_rel.gpu;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def split_k_total(
    out,
    at,
    PARTIAL,
    COUNT,
    tile,
    pid_k,
    TILE: tl.constexpr,
    SPLIT_K: tl.constexpr,
    STORE_PARTIALS: tl.constexpr,
    USE_ASM: tl.constexpr,
):
    """``(total, last)`` for the int32 partial tile ``out`` (``at``: its elements' offsets
    within a TILE-element tile): the last of the SPLIT_K programs of ``tile`` to arrive (acq_rel
    counter, which it resets for the next call) gets the tile's total; int32 sums are exact in
    any order. STORE_PARTIALS: each program stores its partial tile and the last adds the
    others' (fences: release of this thread's stores before the arrival, acquire before
    reading): per-element atomics into a zeroed tile cost more than the split saves (M=16,
    8192^2: 20 us with atomics, 13 with stored partials). Traced launches (torch.compile) use
    the atomics: stored partials produce NaN under mode="reduce-overhead" (cause unknown)."""
    if STORE_PARTIALS:
        base = PARTIAL + tile.to(tl.int64) * (SPLIT_K * TILE)
        tl.store(base + pid_k * TILE + at, out)
        _fence(USE_ASM)
    else:
        base = PARTIAL + tile.to(tl.int64) * TILE
        tl.atomic_add(base + at, out, sem="relaxed")
    tl.debug_barrier()
    done = tl.atomic_add(COUNT + tile, 1, sem="acq_rel")
    if done == SPLIT_K - 1:
        if STORE_PARTIALS:
            _fence(USE_ASM)
            for s in tl.static_range(SPLIT_K):
                out += tl.where(pid_k == s, 0, tl.load(base + s * TILE + at))
        else:  # the total, leaving zeros for the next call
            out = tl.atomic_xchg(base + at, tl.zeros_like(out), sem="acq_rel")
        tl.store(COUNT + tile, 0)
    return out, done == SPLIT_K - 1
