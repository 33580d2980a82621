"""What the LoRA kernels (lora.py), the multi-adapter kernels (lora_multi.py)
and the QLoRA kernels (nf4.py) share.

* ``@triton.jit`` helpers: the dropout keep-mask of a tile (:func:`keep_mask`),
  the dots (:func:`dot_acc`, :func:`dot_f32_lhs`), the grouped tile order of
  the GEMMs (:func:`grouped_tile`), their dense main loop (:func:`gemm_tile`)
  and their epilogue (:func:`add_rank_term` = :func:`rank_dots` + the dropout
  mask, :func:`add_bias`): ``acc + D(scaling * L E)`` and ``+ bias``; the
  deterministic split reduction (:func:`arrive_and_sum`).
* launch plumbing: one launch counter for every kernel module
  (:func:`launch`, :func:`launch_count`), argument checks that name what they
  got and what they expected, the padded rank, dropout arguments.

Nothing here touches a GPU driver at import time.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import reference

# ----------------------------------------------------------------------------
# jit helpers
# ----------------------------------------------------------------------------


@triton.jit
def keep_mask(seed, rows, col0, n_cols, keep_levels, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """Dropout keep-mask of the tile rows x [col0, col0 + BLOCK_COLS) of an
    [*, n_cols] tensor, bool [BLOCK_ROWS, BLOCK_COLS].

    Philox4x32-10 (``tl.randint4x``) keyed by ``seed`` gives four 32-bit words
    per counter; element (row, col) uses word ``col % 4`` of counter
    ``row * cdiv(n_cols, 4) + col // 4`` and is kept when the word's top 16 bits
    are < ``keep_levels`` (keep probability keep_levels / 2**16, the same
    rounding as ``fastlora.reference``). ``col0`` must be a multiple of 4.
    Every kernel builds its mask here, so forward and backward agree exactly.
    """
    groups = (tl.cast(n_cols, tl.int64) + 3) // 4
    gcols = (col0 // 4 + tl.arange(0, BLOCK_COLS // 4)).to(tl.int64)
    counters = rows.to(tl.int64)[:, None] * groups + gcols[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, counters)
    # NOTE: join(join(r0, r2), join(r1, r3)) is [.., 4 groups, 2, 2] with
    # [g, a, b] = word 2a+b of group g; the row-major reshape lays them out as
    # columns 4g .. 4g+3. Philox thus runs once per 4 elements.
    words = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [BLOCK_ROWS, BLOCK_COLS])
    return (words >> 16).to(tl.int32) < keep_levels


@triton.jit
def dot_acc(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b. IEEE: both operands upcast to fp32 (exact) and multiplied in
    IEEE precision (never TF32), as torch's fp32 matmul; otherwise a and b share
    a 16-bit dtype and accumulate in fp32 on the tensor cores."""
    if IEEE:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _pow2_scales(amax):
    """(2**k, 2**-k) per element of ``amax`` (>= 0, fp32): k brings amax into
    [2**14, 2**15) (fp16's top binade but one), k >= -24, and k = 0 for zero,
    inf and NaN. Built from the exponent bits: exact powers of two."""
    biased = (amax.to(tl.int32, bitcast=True) >> 23) & 0xFF  # floor(log2(amax)) + 127 for normal amax
    # NOTE: k >= -24: never scale up by more than 2**24 (the accumulator is
    # scaled up by as much and must stay finite).
    k = tl.where((amax > 0.0) & (biased != 255), tl.maximum(biased - (127 + 14), -24), 0)
    up = ((127 + k) << 23).to(tl.float32, bitcast=True)
    down = ((127 - k) << 23).to(tl.float32, bitcast=True)
    return up, down


@triton.jit
def _split(a, DTYPE: tl.constexpr):
    """fp32 a = hi + lo (+ ~2**-16 (bf16) / 2**-22 (fp16) relative), hi and lo in
    DTYPE; lo = 0 where hi is exactly a (an inf stays inf, not inf - inf)."""
    hi = a.to(DTYPE)
    hi32 = hi.to(tl.float32)
    lo = tl.where(hi32 == a, 0.0, a - hi32).to(DTYPE)
    return hi, lo


@triton.jit
def dot_f32_lhs(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b for an fp32 ``a`` [BM, BK] (a LoRA intermediate: scaling * S,
    dS) and ``b`` [BK, BN].

    IEEE: an fp32 IEEE dot (b upcast). Otherwise ``a`` is split into hi + lo in
    b's 16-bit dtype (two tensor-core dots), keeping ~16 (bf16) / ~22 (fp16) bits
    of ``a`` instead of rounding it to 8 / 11 bits first.

    NOTE: fp16's range is 65504, yet ``a`` may be far larger (scaling * S with a
    large scaling, dS under a loss scaler) while the output is representable,
    and its small values fall into fp16's subnormals. So for fp16 each row of
    ``a`` is scaled by a power of two 2**-k_m bringing its max |.| into
    [2**14, 2**15) before the split, and the accumulator row is scaled by the
    same 2**-k_m before the dots and by 2**k_m after: exact (powers of two), so
    the result is acc + a @ b as if a had ~22 bits and fp32's range. bf16 has
    fp32's exponent range and needs no scaling. ``lo`` is 0 where ``hi`` is
    exactly ``a`` (so an inf in ``a`` gives inf, not inf - inf = NaN).
    """
    if IEEE:
        acc = tl.dot(a, b.to(tl.float32), acc, input_precision="ieee")
    elif b.dtype == tl.float16:
        up, down = _pow2_scales(tl.max(tl.abs(a), axis=1))
        hi, lo = _split(a * down[:, None], tl.float16)
        acc = acc * down[:, None]
        acc = tl.dot(hi, b, acc)
        acc = tl.dot(lo, b, acc)
        acc = acc * up[:, None]
    else:
        hi, lo = _split(a, b.dtype)
        acc = tl.dot(hi, b, acc)
        acc = tl.dot(lo, b, acc)
    return acc


@triton.jit
def dot_f32_f32(a, b, acc, DTYPE: tl.constexpr):
    """acc + a @ b for fp32 ``a`` [BM, BK] and fp32 ``b`` [BK, BN] on the 16-bit
    tensor cores of DTYPE: a = a_hi + a_lo, b = b_hi + b_lo (:func:`_split`) and
    acc + a_hi b_hi + a_hi b_lo + a_lo b_hi (three dots; the dropped a_lo b_lo
    and the splits cost ~2**-16 (bf16) / ~2**-22 (fp16) of |a| |b|). The LoRA
    term of a 16-bit GEMM with fp32 adapters: its output is rounded to 8 / 11
    bits, so this is far below the output's rounding, without an fp32 FMA dot
    next to a tensor-core accumulator (which spills, STACK 1.4-9 KB).
    fp16: rows of ``a`` and columns of ``b`` are scaled by powers of two into
    fp16's range first (as in :func:`dot_f32_lhs`), the accumulator by both.
    """
    if DTYPE == tl.float16:
        up_a, down_a = _pow2_scales(tl.max(tl.abs(a), axis=1))
        up_b, down_b = _pow2_scales(tl.max(tl.abs(b), axis=0))
        a = a * down_a[:, None]
        b = b * down_b[None, :]
        acc = acc * down_a[:, None] * down_b[None, :]
    a_hi, a_lo = _split(a, DTYPE)
    b_hi, b_lo = _split(b, DTYPE)
    acc = tl.dot(a_hi, b_hi, acc)
    # NOTE: an inf in a (an inf activation) times an exact b (b_lo = 0) would give
    # inf * 0 = NaN in the cross term; inf * b_hi already carries it.
    a_hi32 = a_hi.to(tl.float32)
    acc = tl.dot(tl.where(a_hi32 - a_hi32 == 0.0, a_hi, tl.zeros_like(a_hi)), b_lo, acc)
    acc = tl.dot(a_lo, b_hi, acc)
    if DTYPE == tl.float16:
        acc = acc * up_a[:, None] * up_b[None, :]
    return acc


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program ``pid`` in grouped order: GROUP_M row-tiles
    walk the column tiles together, so they share the right operand's column
    panels in L2 (Triton's matmul tutorial)."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_in_group = GROUP_M * num_pid_n
    group_id = pid // num_in_group
    first_m = group_id * GROUP_M
    group_size = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % num_in_group) % group_size)
    pid_n = (pid % num_in_group) // group_size
    return pid_m, pid_n


@triton.jit
def gemm_tile(
    p_ptr,  # [M, K] left operand (any strides)
    q_ptr,  # [K, N] right operand, via strides
    rows,  # [BLOCK_M] int64 rows of P the tile reads (a range, or gathered through a permutation)
    rn,  # [BLOCK_N] int64 columns of Q
    mask_m,
    mask_n,
    K,
    stride_pm,
    stride_pk,
    stride_qk,
    stride_qn,
    IEEE: tl.constexpr,  # fp32 P and Q: IEEE dots (never TF32)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The main loop of the dense GEMMs: P[rows] Q[:, rn] as a [BLOCK_M, BLOCK_N]
    fp32 tile, BLOCK_K columns of P per step (masked edges read zeros).

    NOTE: row and column offsets are int64 (M*K, N*K may exceed 2**31); the K
    offsets stay within one tile and the base pointers advance by BLOCK_K.
    """
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    p_ptrs = p_ptr + rows[:, None] * stride_pm + rk[None, :] * stride_pk
    q_ptrs = q_ptr + rk[:, None] * stride_qk + rn[None, :] * stride_qn
    for k0 in range(0, K, BLOCK_K):
        mask_k = (k0 + rk) < K
        p = tl.load(p_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        q = tl.load(q_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = dot_acc(p, q, acc, IEEE)
        p_ptrs += BLOCK_K * stride_pk
        q_ptrs += BLOCK_K * stride_qk
    return acc


@triton.jit
def rank_dots(
    term,  # [BLOCK_M, BLOCK_N] fp32 tile the products are added to
    l_ptr,  # [M, R] rank-r left factor
    e_ptr,  # [R, N] rank-r right factor (a strided view)
    rm,  # [BLOCK_M] int64 rows of L
    rn,  # [BLOCK_N] int64 columns of E
    mask_m,  # rows of L to read (others count as zero)
    mask_n,
    R,
    stride_lm,
    stride_lr,
    stride_er,
    stride_en,
    scale,  # fp32: multiplies L (in fp32, before any rounding to 16 bits)
    IEEE: tl.constexpr,
    DTYPE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    R_CHUNK: tl.constexpr,
):
    """term + (scale * L[rm]) E[:, rn], the rank in steps of R_CHUNK columns (the
    dots of :func:`add_rank_term`, without its dropout mask: the multi-adapter
    GEMM calls it once per adapter of a tile and masks the sum once)."""
    rr = tl.arange(0, R_CHUNK)
    # NOTE: unrolled (static_range over the padded rank): a runtime loop carrying
    # the accumulator spills on sm_80 (STACK 272-728 bytes at rank 64, pipelined
    # or not). The barrier between steps keeps the compiler from hoisting every
    # step's loads to the top (STACK 144-352 at rank 256 without it).
    for r0 in tl.static_range(0, BLOCK_R, R_CHUNK):
        if r0 > 0:
            tl.debug_barrier()
        mask_r = (r0 + rr) < R
        l = tl.load(l_ptr + rm[:, None] * stride_lm + (r0 + rr)[None, :] * stride_lr, mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        e = tl.load(e_ptr + (r0 + rr)[:, None] * stride_er + rn[None, :] * stride_en, mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        lf = l.to(tl.float32) * scale
        if (not IEEE) and (e.dtype == tl.float32):  # fp32 adapters on 16-bit activations
            term = dot_f32_f32(lf, e, term, DTYPE)
        else:
            term = dot_f32_lhs(lf, e, term, IEEE)
    return term


@triton.jit
def add_rank_term(
    acc,  # [BLOCK_M, BLOCK_N] fp32 tile
    l_ptr,  # [M, R] rank-r left factor (S, or dS in fp32)
    e_ptr,  # [R, N] rank-r right factor (a strided view: B^T, or A)
    rm,  # [BLOCK_M] int64 row indices of the tile
    rn,  # [BLOCK_N] int64 column indices of the tile
    mask_m,
    mask_n,
    R,
    stride_lm,
    stride_lr,
    stride_er,
    stride_en,
    scaling,  # multiplies the term (fp64 from inductor is cast to fp32)
    seed,  # dropout mask over the [*, N] output
    keep_levels,
    inv_keep,
    N,
    col0,  # first column of the tile (a multiple of 4)
    HAS_DROPOUT: tl.constexpr,
    IEEE: tl.constexpr,  # fp32 activations: the term as an fp32 IEEE dot
    DTYPE: tl.constexpr,  # the activations' dtype (the tensor-core dots' for 16-bit)
    BLOCK_R: tl.constexpr,  # the rank padded to a power of two
    R_CHUNK: tl.constexpr,  # rank columns per step (>= 16, a power of two, <= BLOCK_R)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """acc + D(scaling * L E): the LoRA term of a GEMM tile, added before its
    single store. D = keep-mask / keep on the output coordinates (dropout of dX).
    E in the activations' dtype: :func:`dot_f32_lhs`; fp32 E (fp32 adapters) on
    16-bit activations: :func:`dot_f32_f32`.

    The rank runs in steps of R_CHUNK columns (zero-padded by the masks), so the
    registers the epilogue needs do not grow with the rank. ``scaling * L`` is
    formed in fp32 and never rounded to 16 bits (see :func:`dot_f32_lhs`).
    NOTE: with dropout the mask applies to the term alone, so the term gets its
    own [BLOCK_M, BLOCK_N] fp32 registers (configs drop the largest tiles).
    """
    scale = tl.cast(scaling, tl.float32)
    if HAS_DROPOUT:
        scale = scale * tl.cast(inv_keep, tl.float32)
        term = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        term = acc
    term = rank_dots(term, l_ptr, e_ptr, rm, rn, mask_m, mask_n, R, stride_lm, stride_lr, stride_er, stride_en, scale,
                     IEEE, DTYPE, BLOCK_R, R_CHUNK)  # fmt: skip
    if HAS_DROPOUT:
        keep = keep_mask(seed, rm, col0, N, keep_levels, BLOCK_M, BLOCK_N)
        acc += tl.where(keep, term, 0.0)
    else:
        acc = term
    return acc


@triton.jit
def arrive_and_sum(ws_base, part_stride, offs, mask, part, index, n_parts, counter_ptr):
    """Deterministic cross-program sum: store ``part`` as partial ``index`` of
    ``n_parts`` (at ``ws_base + index * part_stride + offs``), then arrive at the
    int32 ``counter_ptr``; returns ``(last, total)``, ``last`` true for the program
    that arrived last, whose ``total`` is every partial summed in index order
    (zeros for the others). The caller stores ``total`` when ``last``.

    NOTE: a CTA barrier, then a gpu-scope acq_rel ``atomic_add`` (the pattern of
    Triton's own lock tests and of CUDA's grid sync); the last program reads the
    others' partials past L1 (``.cg``). No fp32 atomics: bit-identical reruns.
    """
    tl.store(ws_base + index * part_stride + offs, part, mask=mask)
    tl.debug_barrier()
    arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
    last = arrived == n_parts - 1
    total = tl.zeros_like(part)
    if last:
        for t in range(0, n_parts):
            total += tl.load(ws_base + t * part_stride + offs, mask=mask, other=0.0, cache_modifier=".cg")
    return last, total


@triton.jit
def add_bias(acc, bias_ptr, rn, mask_n, HAS_BIAS: tl.constexpr):
    """acc + bias[None, :] (bias [N], any float dtype, added in fp32)."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    return acc


# ----------------------------------------------------------------------------
# launch plumbing
# ----------------------------------------------------------------------------

_launches = 0


def launch_count() -> int:
    """Triton kernel launches made by fastlora's kernel modules since the last reset."""
    return _launches


def reset_launch_count() -> None:
    global _launches
    _launches = 0


def launch(kernel, grid: tuple | object, device: torch.device, *args, **kwargs) -> None:
    """Launch ``kernel[grid](*args, **kwargs)`` on ``device``, counting it."""
    global _launches
    _launches += 1
    if device.type == "cuda":
        with torch.cuda.device(device):
            kernel[grid](*args, **kwargs)
    else:
        kernel[grid](*args, **kwargs)


KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_dtype(t: Tensor, name: str) -> None:
    if t.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{name}: the Triton kernels take float32, float16 or bfloat16, got {t.dtype}")


def check_adapter_dtype(t: Tensor, name: str, x_dtype: torch.dtype) -> None:
    """Adapters are in the activations' dtype or float32 (mixed precision)."""
    if t.dtype not in (x_dtype, torch.float32):
        raise TypeError(f"{name} must be {x_dtype} (the activations' dtype) or torch.float32, got {t.dtype}")


def expect(t: Tensor, shape: tuple[int, ...], name: str, what: str) -> None:
    """Raise a ValueError naming ``name``, its shape and the expected ``what``."""
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {what} = {list(shape)}, got {list(t.shape)}")


def padded_rank(r: int) -> int:
    """The rank padded to a power of two >= 16 (the GPU's minimum tl.dot size)."""
    return max(16, triton.next_power_of_2(r))


def m_bucket(m: int) -> int:
    return min(triton.next_power_of_2(max(m, 1)), 1 << 16)


def dropout_args(dropout_p: float) -> tuple[bool, int, float]:
    """(has_dropout, keep_levels, 1/keep), with reference.py's keep probability."""
    if dropout_p <= 0.0:
        return False, 0, 1.0
    threshold, keep = reference.dropout_keep_threshold(dropout_p)
    return True, threshold + 32768, 1.0 / keep


_SM_COUNT: dict[int, int] = {}


def target_programs(device: torch.device) -> int:
    """How many programs fill the device: 2 per SM (4 under the interpreter,
    so tests exercise the split reductions on tiny shapes)."""
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return 2 * _SM_COUNT[idx]
