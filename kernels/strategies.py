"""Triton kernels and launchers of the strategies other than today's fused path.

Each strategy computes exactly what ``fastlora.reference`` specifies
(``y = x W^T + scaling * D(x) A^T B^T + bias`` and its gradients; QLoRA with
W = deq(qweight)); they differ in which launches do the work:

* ``lora="cublas"``: the frozen-weight GEMMs are ``torch.Tensor.addmm_`` (cuBLAS
  on CUDA) accumulating with beta=1 into a buffer that already holds the
  rank-r term: forward ``Y = [scaling * S B^T + bias] + X W^T``, backward
  ``dX = [D(dS A)] + dY W``. The bracket is :func:`rank_expand` (one Triton
  launch, fp32 math, the dropout mask applied there); S, dS/dB/dbias and dA
  come from the LoRA kernels (``lora_shrink``, ``lora_dy_pass``,
  ``lora_down_grad``).
* ``dropout="stored_bits"``: the forward's shrink also writes the keep-mask,
  1 bit per element (:func:`lora_shrink_store_bits`); the memory-bound passes
  of backward read it instead of re-running Philox (:func:`rank_expand`,
  :func:`lora_down_grad_bits`, :func:`qlora_gemv`). The bits are packed from
  the very Philox mask the "regenerate" kernels draw (the same jit helper), so
  both strategies drop the same elements; the compute-bound fused dX GEMM of
  ``lora="fused"`` keeps regenerating in its epilogue. Format and storage:
  ``fastlora.strategy_ops``.
* ``qlora="small_m"``: :func:`qlora_gemv`, a GEMV / split-K kernel for a few
  rows (M <= 16 is what the chooser offers it for; any M is correct) that
  reads each packed 4-bit weight byte from memory once and dequantizes it in
  registers, bit-identical to ``fastlora.quant.dequantize_4bit``.
* ``qlora="dequant_once"``: ``fastlora.kernels.nf4.dequantize_4bit`` (one
  launch), then the chosen LoRA path on the dequantized weight, freed on return.

Launches (all through the LoRA kernels' counter, ``fastlora.kernels.lora.launch_count()``;
the cuBLAS GEMMs through :func:`torch_gemm_count`):

================================  =================  ==================
strategy                          forward            backward
================================  =================  ==================
lora=fused (either dropout)       2                  3
lora=cublas                       2 + 1 cuBLAS       3 + 1 cuBLAS
qlora=dequant_in_gemm             2                  3
qlora=dequant_once, lora=fused    3                  4
qlora=dequant_once, lora=cublas   3 + 1 cuBLAS       4 + 1 cuBLAS
qlora=small_m                     2                  3
================================  =================  ==================

(backward as counted with dX, dA, dB requested; dW, when the frozen weight
requires grad, adds one cuBLAS GEMM.) The split reductions (``lora_dy_pass``,
:func:`lora_down_grad_bits`, :func:`qlora_gemv` with split > 1) are
deterministic: partials in fp32 workspaces summed in index order by the last
program to arrive (an int32 counter, the only atomic), as in
``fastlora.kernels.lora``. Nothing here writes into an input or a saved tensor
(the in-place ``addmm_`` writes the buffer this module just allocated).

File order as STYLE.md: jit helpers, kernels, launchers, then the
:class:`TritonStrategy` pairs (``lora_forward`` / ``lora_backward`` /
``dora_forward`` / ``qlora_forward`` / ``qlora_backward``, the signatures of
``fastlora.reference``). Importing this module touches no GPU driver.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._backend import interpreting
from ..quant import QuantizedWeight
from ..strategy_ops import bits_per_row, new_s_with_bits, stored_bits
from . import lora, nf4

# NOTE: the dropout mask must be bit-identical to the LoRA kernels' (the stored
# bits are packed from it, and the fused dX GEMM regenerates it), so the jit
# helpers are theirs (kernels/_common.py).
from ._common import arrive_and_sum, target_programs
from ._common import check_dtype as _check_float
from ._common import dot_acc as _dot
from ._common import dot_f32_lhs as _dot_f32_lhs
from ._common import dropout_args as _dropout_args
from ._common import expect as _expect
from ._common import keep_mask as _keep_mask
from ._common import launch as _launch
from ._common import padded_rank as _padded_rank
from .nf4 import _state_args

MASK_NONE, MASK_PHILOX, MASK_BITS = 0, 1, 2

# ----------------------------------------------------------------------------
# jit helpers
# ----------------------------------------------------------------------------


@triton.jit
def _pack_bits(keep, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """bool [BLOCK_ROWS, BLOCK_COLS] -> uint8 [BLOCK_ROWS, BLOCK_COLS // 8]:
    bit j of byte b = keep[:, 8 b + j] (the layout of ``fastlora.strategy_ops``)."""
    k3 = tl.reshape(keep.to(tl.int32), [BLOCK_ROWS, BLOCK_COLS // 8, 8])
    weights = 1 << tl.arange(0, 8)
    return tl.sum(k3 * weights[None, None, :], axis=2).to(tl.uint8)


@triton.jit
def _load_keep(bits_ptr, rows, mask_rows, col0, n_cols, stride_row, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """The stored keep-mask of the tile rows x [col0, col0 + BLOCK_COLS) of an
    [*, n_cols] tensor, bool [BLOCK_ROWS, BLOCK_COLS]; ``col0`` a multiple of 8.
    Out-of-range elements read as dropped."""
    rb = col0 // 8 + tl.arange(0, BLOCK_COLS // 8)
    mask = mask_rows[:, None] & (rb < (n_cols + 7) // 8)[None, :]
    byte = tl.load(bits_ptr + rows[:, None] * stride_row + rb[None, :], mask=mask, other=0).to(tl.int32)
    bit = (byte[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1
    return tl.reshape(bit, [BLOCK_ROWS, BLOCK_COLS]) != 0


@triton.jit
def _w4_values(
    flat,  # int64 tensor: flat indices into W [N_w, K_w]
    mask,
    packed_ptr,
    quant_map_ptr,
    absmax_ptr,
    nested_absmax_ptr,
    nested_map_ptr,
    offset_ptr,
    BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
):
    """fp32 W at ``flat`` from bitsandbytes' 4-bit layout (FACTS.md): the code of
    element i is the high nibble of byte i // 2 when i is even, else the low one;
    value = quant_map[code] * absmax[i // BLOCKSIZE], the absmax de-nested as
    ``nested_map[q] * nested_absmax[blk // NESTED_BLOCKSIZE] + offset`` when
    double-quantized.

    NOTE: the same arithmetic as nf4.py's ``_dequant_gather``, with the loads in
    another order: this kernel calling nf4's helper spills on sm_90 (dX with
    double quantization, 16x64 w8: STACK 8, REG 128, triton 3.9; AOT tier of
    tests/test_strategies.py). The launch turns fp fusion off so the
    de-nesting rounds twice, as bitsandbytes does, and the interpreter tests
    check bit-equality with ``fastlora.quant``."""
    byte = tl.load(packed_ptr + flat // 2, mask=mask, other=0).to(tl.int32)
    code = (byte >> ((1 - (flat % 2).to(tl.int32)) * 4)) & 0xF
    value = tl.load(quant_map_ptr + code, mask=mask, other=0.0)
    blk = flat // BLOCKSIZE
    if NESTED:
        q = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        scale = tl.load(nested_absmax_ptr + blk // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        absmax = tl.load(nested_map_ptr + q, mask=mask, other=0.0) * scale + tl.load(offset_ptr)
    else:
        absmax = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
    return value * absmax


@triton.jit
def _rank_epilogue(
    acc,  # [BLOCK_M, BLOCK_N] fp32: what the rank-r term is added to
    rm,
    rn,
    mask_m,
    mask_n,
    l_ptr,  # [M, R] S (x's dtype) or dS (fp32)
    e_ptr,  # [R, N] B^T or A (strided view)
    bias_ptr,  # [N] (HAS_BIAS)
    out_ptr,  # [M, N] written
    bits_ptr,  # [M, cdiv(N, 8)] uint8 stored mask (MASK == 2)
    R,
    N,
    stride_lm,
    stride_lr,
    stride_er,
    stride_en,
    stride_om,
    stride_on,
    stride_bm,
    scaling,
    seed,
    keep_levels,
    inv_keep,
    col0,  # first column of the tile (a multiple of 8)
    MASK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """OUT = acc + D(scaling * L E) + bias, stored; D = keep-mask / keep (Philox
    from ``seed`` or the stored bits), rank padded to BLOCK_R with zeros."""
    rr = tl.arange(0, BLOCK_R)
    mask_r = rr < R
    lv = tl.load(l_ptr + rm[:, None] * stride_lm + rr[None, :] * stride_lr, mask=mask_m[:, None] & mask_r[None, :], other=0.0)
    ev = tl.load(e_ptr + rr[:, None] * stride_er + rn[None, :] * stride_en, mask=mask_r[:, None] & mask_n[None, :], other=0.0)
    lv = lv.to(tl.float32) * tl.cast(scaling, tl.float32)
    if MASK == 0:
        acc = _dot_f32_lhs(lv, ev, acc, IEEE)
    else:
        term = _dot_f32_lhs(lv * tl.cast(inv_keep, tl.float32), ev, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), IEEE)
        if MASK == 1:
            keep = _keep_mask(seed, rm, col0, N, keep_levels, BLOCK_M, BLOCK_N)
        else:
            keep = _load_keep(bits_ptr, rm, mask_m, col0, N, stride_bm, BLOCK_M, BLOCK_N)
        acc += tl.where(keep, term, 0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# ----------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------


@triton.jit(do_not_specialize=["seed"])
def _shrink_bits_kernel(
    x_ptr,  # [M, K] input (any strides)
    a_ptr,  # [R, K] lora_A
    s_ptr,  # [M, R] output S, x's dtype
    bits_ptr,  # [M, cdiv(K, 8)] uint8 output: the keep-mask, 1 bit per element
    M,
    K,
    R,
    stride_xm,
    stride_xk,
    stride_ar,
    stride_ak,
    stride_sm,
    stride_sr,
    stride_bm,  # bytes per row of bits
    seed,
    keep_levels,
    inv_keep,
    IEEE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,  # a multiple of 8
):
    """S = D(X) A^T [M, R] and the packed keep-mask of X [M, K] in one pass.

    As ``lora._lora_shrink_kernel`` (one program per BLOCK_M rows, looping over
    K, fp32 accumulator, 1/keep applied once), the mask drawn by the same
    Philox helper; each [BLOCK_M, BLOCK_K] mask tile is also packed to
    [BLOCK_M, BLOCK_K / 8] bytes and stored (bits past K are 0).
    """
    pid_m = tl.program_id(0)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    rb = tl.arange(0, BLOCK_K // 8)
    mask_m = rm < M
    mask_r = rr < R
    n_bytes = (K + 7) // 8
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = (k0 + rk) < K
        keep = _keep_mask(seed, rm, k0, K, keep_levels, BLOCK_M, BLOCK_K) & mask_k[None, :]
        cols_b = k0 // 8 + rb
        tl.store(
            bits_ptr + rm[:, None] * stride_bm + cols_b[None, :],
            _pack_bits(keep, BLOCK_M, BLOCK_K),
            mask=mask_m[:, None] & (cols_b < n_bytes)[None, :],
        )
        x_ptrs = x_ptr + rm[:, None] * stride_xm + (k0 + rk)[None, :] * stride_xk
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        x = tl.where(keep, x, tl.zeros_like(x))
        a_ptrs = a_ptr + rr[None, :] * stride_ar + (k0 + rk)[:, None] * stride_ak
        a = tl.load(a_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        acc = _dot(x, a, acc, IEEE)
    acc = acc * tl.cast(inv_keep, tl.float32)
    s_ptrs = s_ptr + rm[:, None] * stride_sm + rr[None, :] * stride_sr
    tl.store(s_ptrs, acc.to(s_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_r[None, :])


@triton.jit(do_not_specialize=["seed"])
def _rank_expand_kernel(
    l_ptr,  # [M, R] S (forward) or dS (dX, fp32)
    e_ptr,  # [R, N] B^T (forward) or A (dX), via strides
    bias_ptr,  # [N] (HAS_BIAS)
    out_ptr,  # [M, N] output, written once
    bits_ptr,  # [M, cdiv(N, 8)] stored keep-mask (MASK == 2)
    M,
    N,
    R,
    stride_lm,
    stride_lr,
    stride_er,
    stride_en,
    stride_om,
    stride_on,
    stride_bm,
    scaling,
    seed,
    keep_levels,
    inv_keep,
    MASK: tl.constexpr,  # 0 none, 1 Philox from seed, 2 stored bits
    HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """OUT = D(scaling * L E) + bias [M, N], one [BLOCK_M, BLOCK_N] tile per program.

    The rank-r half of the "cublas" strategy: forward ``scaling * S B^T + bias``
    (then cuBLAS adds X W^T with beta=1), dX ``D(dS A)`` (then cuBLAS adds dY W).
    A rank-r outer product (Hu et al., LoRA, 2021): one (hi/lo for 16-bit
    inputs) dot per tile, memory bound on the [M, N] store.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    _rank_epilogue(
        acc, rm, rn, rm < M, rn < N, l_ptr, e_ptr, bias_ptr, out_ptr, bits_ptr, R, N,
        stride_lm, stride_lr, stride_er, stride_en, stride_om, stride_on, stride_bm,
        scaling, seed, keep_levels, inv_keep, pid_n * BLOCK_N,
        MASK, HAS_BIAS, IEEE, BLOCK_R, BLOCK_M, BLOCK_N,
    )  # fmt: skip


@triton.jit
def _down_grad_bits_kernel(
    ds_ptr,  # [M, R] dS (fp32 from the dY pass)
    x_ptr,  # [M, K] input saved by the forward
    bits_ptr,  # [M, cdiv(K, 8)] the stored keep-mask
    da_ptr,  # [R, K] output dA, x's dtype
    ws_ptr,  # [SPLIT_M, BLOCK_R, K] fp32 workspace (SPLIT_M > 1)
    cnt_ptr,  # [cdiv(K, BLOCK_K)] int32, zeroed: arrivals per column block
    M,
    K,
    R,
    stride_dsm,
    stride_dsr,
    stride_xm,
    stride_xk,
    stride_bm,
    inv_keep,
    SPLIT_M,
    IEEE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """dA = dS^T D(X) [R, K] with D read from the stored bits.

    Grid (cdiv(K, BLOCK_K), SPLIT_M), as ``lora._lora_down_grad_kernel``:
    program (k, s) accumulates row blocks s, s + SPLIT_M, ... in fp32; the
    splits are summed in index order by the last program to arrive, then
    scaled by 1/keep. Deterministic (no fp32 atomics).
    """
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    m_blocks = tl.cdiv(M, BLOCK_M)
    rk = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    rr = tl.arange(0, BLOCK_R)
    mask_k = rk < K
    mask_r = rr < R
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for mb in range(pid_s, m_blocks, SPLIT_M):
        rm = (mb * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask_m = rm < M
        ds_ptrs = ds_ptr + rr[:, None] * stride_dsr + rm[None, :] * stride_dsm
        ds_t = tl.load(ds_ptrs, mask=mask_r[:, None] & mask_m[None, :], other=0.0)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        keep = _load_keep(bits_ptr, rm, mask_m, pid_k * BLOCK_K, K, stride_bm, BLOCK_M, BLOCK_K)
        x = tl.where(keep, x, tl.zeros_like(x))
        acc = _dot_f32_lhs(ds_t.to(tl.float32), x, acc, IEEE)
    mask_rk = mask_r[:, None] & mask_k[None, :]
    out_off = rr[:, None] * K + rk[None, :]
    if SPLIT_M == 1:
        tl.store(da_ptr + out_off, (acc * tl.cast(inv_keep, tl.float32)).to(da_ptr.dtype.element_ty), mask=mask_rk)
    else:
        split_stride = tl.cast(K, tl.int64) * BLOCK_R
        ws_off = rr[:, None] * K + rk[None, :]
        tl.store(ws_ptr + pid_s * split_stride + ws_off, acc, mask=mask_rk)
        # NOTE: barrier then one acq_rel arrival per program (lora.py's pattern):
        # the last to arrive sees every partial; it reads them bypassing L1.
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + pid_k, 1, sem="acq_rel")
        if arrived == SPLIT_M - 1:
            total = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
            for j in range(0, SPLIT_M):
                total += tl.load(ws_ptr + j * split_stride + ws_off, mask=mask_rk, other=0.0, cache_modifier=".cg")
            tl.store(da_ptr + out_off, (total * tl.cast(inv_keep, tl.float32)).to(da_ptr.dtype.element_ty), mask=mask_rk)


@triton.jit(do_not_specialize=["seed"])
def _qgemv_kernel(
    p_ptr,  # [M, RED] X (forward) or dY (dX)
    packed_ptr,  # W [N_w, K_w] packed 4-bit codes, uint8
    quant_map_ptr,  # [16] fp32
    absmax_ptr,  # [nblocks] fp32, or uint8 codes (NESTED)
    nested_absmax_ptr,  # fp32 (NESTED)
    nested_map_ptr,  # [256] fp32 (NESTED)
    offset_ptr,  # [] fp32 (NESTED)
    l_ptr,  # [M, R] S (forward) or dS (dX, fp32)
    e_ptr,  # [R, OUT] B^T (forward) or A (dX), via strides
    bias_ptr,  # [OUT] (HAS_BIAS)
    out_ptr,  # [M, OUT] output, p's dtype
    bits_ptr,  # [M, cdiv(OUT, 8)] stored keep-mask (MASK == 2)
    ws_ptr,  # [SPLIT, M, OUT] fp32 partials (SPLIT > 1)
    cnt_ptr,  # [cdiv(M, BLOCK_M) * cdiv(OUT, BLOCK_OUT)] int32, zeroed
    M,
    OUT,
    RED,
    R,
    K_w,  # in_features of W: the row length of its flattened layout
    stride_pm,
    stride_pk,
    stride_lm,
    stride_lr,
    stride_er,
    stride_en,
    stride_om,
    stride_on,
    stride_bm,
    scaling,
    seed,
    keep_levels,
    inv_keep,
    SPLIT,  # programs along the reduction; program (o, s, m) takes blocks s, s + SPLIT, ...
    W_ROWS_ARE_OUT: tl.constexpr,  # True: forward (Y = X W^T); False: dX = dY W
    BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
    MASK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,  # 16: the rows of one dot (M <= 16 is one block)
    BLOCK_OUT: tl.constexpr,
    BLOCK_RED: tl.constexpr,
):
    """OUT = P deq(W)^(T) + D(scaling * L E) + bias for few rows, W read once.

    Forward: Y = X deq(W)^T + scaling * S B^T + bias   (RED = K, OUT = N)
    dX:      dX = dY deq(W) + D(dS A)                   (RED = N, OUT = K)
    Grid (cdiv(OUT, BLOCK_OUT), SPLIT, cdiv(M, BLOCK_M)). Each [BLOCK_OUT x
    BLOCK_RED] tile of W belongs to one program per row block (split-K GEMV, as
    in Stream-K / split-K GEMMs: Osama et al., PPoPP'23): with M <= 16 every
    packed byte is read from memory once. Partials go to an fp32 workspace;
    the last program of a (row block, column block) to arrive sums them in
    index order and runs the epilogue (the rank-r term, D, the bias).
    """
    pid_o = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    ro = (pid_o * BLOCK_OUT + tl.arange(0, BLOCK_OUT)).to(tl.int64)
    mask_m = rm < M
    mask_o = ro < OUT
    acc = tl.zeros((BLOCK_M, BLOCK_OUT), dtype=tl.float32)
    for rb in range(pid_s, tl.cdiv(RED, BLOCK_RED), SPLIT):
        rr = (rb * BLOCK_RED + tl.arange(0, BLOCK_RED)).to(tl.int64)
        mask_rr = rr < RED
        p = tl.load(p_ptr + rm[:, None] * stride_pm + rr[None, :] * stride_pk, mask=mask_m[:, None] & mask_rr[None, :], other=0.0)
        if W_ROWS_ARE_OUT:  # tile W[ro, rr] [BLOCK_OUT, BLOCK_RED], contiguous along rr
            w = _w4_values(
                ro[:, None] * K_w + rr[None, :], mask_o[:, None] & mask_rr[None, :], packed_ptr, quant_map_ptr,
                absmax_ptr, nested_absmax_ptr, nested_map_ptr, offset_ptr, BLOCKSIZE, NESTED, NESTED_BLOCKSIZE,
            )  # fmt: skip
            # NOTE: rounded to P's dtype first: the values of the reference's dequantized weight.
            acc = _dot(p, tl.trans(w.to(p_ptr.dtype.element_ty)), acc, IEEE)
        else:  # tile W[rr, ro] [BLOCK_RED, BLOCK_OUT], contiguous along ro
            w = _w4_values(
                rr[:, None] * K_w + ro[None, :], mask_rr[:, None] & mask_o[None, :], packed_ptr, quant_map_ptr,
                absmax_ptr, nested_absmax_ptr, nested_map_ptr, offset_ptr, BLOCKSIZE, NESTED, NESTED_BLOCKSIZE,
            )  # fmt: skip
            acc = _dot(p, w.to(p_ptr.dtype.element_ty), acc, IEEE)
    if SPLIT == 1:
        _rank_epilogue(
            acc, rm, ro, mask_m, mask_o, l_ptr, e_ptr, bias_ptr, out_ptr, bits_ptr, R, OUT,
            stride_lm, stride_lr, stride_er, stride_en, stride_om, stride_on, stride_bm,
            scaling, seed, keep_levels, inv_keep, pid_o * BLOCK_OUT, MASK, HAS_BIAS, IEEE, BLOCK_R, BLOCK_M, BLOCK_OUT,
        )  # fmt: skip
    else:
        mask_mo = mask_m[:, None] & mask_o[None, :]
        plane = tl.cast(M, tl.int64) * OUT
        ws_off = rm[:, None] * OUT + ro[None, :]
        last, total = arrive_and_sum(ws_ptr, plane, ws_off, mask_mo, acc, pid_s, SPLIT,
                                     cnt_ptr + pid_m * tl.num_programs(0) + pid_o)  # fmt: skip
        if last:
            _rank_epilogue(
                total, rm, ro, mask_m, mask_o, l_ptr, e_ptr, bias_ptr, out_ptr, bits_ptr, R, OUT,
                stride_lm, stride_lr, stride_er, stride_en, stride_om, stride_on, stride_bm,
                scaling, seed, keep_levels, inv_keep, pid_o * BLOCK_OUT, MASK, HAS_BIAS, IEEE, BLOCK_R, BLOCK_M, BLOCK_OUT,
            )  # fmt: skip


# ----------------------------------------------------------------------------
# configs (one small config under the interpreter; AOT-checked for sm_80 and
# sm_90 in tests/test_strategies.py, which fails on a spill)
# ----------------------------------------------------------------------------


def shrink_bits_config(dtype: torch.dtype, block_r: int) -> dict:
    """BLOCK_M rows per program, BLOCK_K columns per step (a multiple of 8).

    NOTE: the Philox mask of the tile and its packed bytes are live next to the
    accumulator: 64 x 64 with 4 warps reaches REG 255 at rank 16 and spills at
    rank 64 (sm_80 STACK 32, sm_90 STACK 328), hence 8 warps; fp32 (FMA dots) at
    rank 64 spills with 32 x 64 tiles on sm_90 under Triton 3.8 (STACK 8; 1 stage is
    worse, STACK 416): 32 x 32."""
    if interpreting():
        return dict(BLOCK_M=32, BLOCK_K=32, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_M=32, BLOCK_K=32, num_warps=8, num_stages=2)
    if block_r > 64:
        return dict(BLOCK_M=32, BLOCK_K=64, num_warps=8, num_stages=2)
    return dict(BLOCK_M=64, BLOCK_K=64, num_warps=8, num_stages=3)


def rank_expand_config(dtype: torch.dtype, block_r: int) -> dict:
    """A [BLOCK_M, BLOCK_N] output tile per program: memory bound on its store.

    NOTE: 64 x 128 with 4 warps spills with the Philox mask (sm_90 STACK 96 at
    rank 16, 184 at rank 64): 8 warps."""
    if interpreting():
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
    if dtype == torch.float32 or block_r > 64:  # FMA dots: REG 255 with 4 warps at rank 64
        return dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=1)
    return dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=1)


def down_grad_bits_config(dtype: torch.dtype, block_r: int) -> dict:
    """BLOCK_K columns of X per program, BLOCK_M rows per step.

    NOTE: the [BLOCK_R, BLOCK_K] fp32 accumulator grows with the rank: 64 x 128
    with 4 warps spills at rank 64 (STACK 448-456), so wider ranks take 64-wide
    column blocks and 8 warps."""
    if interpreting():
        return dict(BLOCK_M=32, BLOCK_K=32, num_warps=4, num_stages=1)
    if dtype == torch.float32 or block_r > 64:  # FMA dots: REG 254-255 at 32 x 64 (4 warps r=16, 8 warps r=64)
        return dict(BLOCK_M=32, BLOCK_K=64 if block_r <= 16 else 32, num_warps=8, num_stages=2)
    if block_r > 16:
        return dict(BLOCK_M=64, BLOCK_K=64, num_warps=8, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_K=128, num_warps=4, num_stages=3)


def qgemv_config(dtype: torch.dtype, block_r: int) -> dict:
    """BLOCK_OUT outputs per program, BLOCK_RED reduction steps; BLOCK_M = 16 rows.

    NOTE: the dequantized [BLOCK_OUT, BLOCK_RED] tile holds 64-bit gather
    addresses, codes and absmax per element next to the accumulator: 64 x 64
    with 4 warps spills (STACK 24-152), so 8 warps (16 elements per thread);
    memory-bound, the GEMV wants the extra warps in flight anyway."""
    if interpreting():
        return dict(BLOCK_M=16, BLOCK_OUT=32, BLOCK_RED=32, num_warps=4, num_stages=1)
    if dtype == torch.float32 or block_r > 64:
        return dict(BLOCK_M=16, BLOCK_OUT=32, BLOCK_RED=64, num_warps=8, num_stages=1)
    return dict(BLOCK_M=16, BLOCK_OUT=64, BLOCK_RED=64, num_warps=8, num_stages=1)


# ----------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------

_torch_gemms = 0


def torch_gemm_count() -> int:
    """torch GEMMs (cuBLAS on CUDA) this module ran since the last reset."""
    return _torch_gemms


def reset_torch_gemm_count() -> None:
    global _torch_gemms
    _torch_gemms = 0


def addmm_into(out: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``out += a @ b`` as one ``addmm_`` (cuBLAS with beta=1 on CUDA), counted.
    ``out`` is a buffer of this module, never an input."""
    global _torch_gemms
    _torch_gemms += 1
    return out.addmm_(a, b)


def mm(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` (cuBLAS on CUDA), counted."""
    global _torch_gemms
    _torch_gemms += 1
    return torch.mm(a, b)


def lora_shrink_store_bits(x: Tensor, lora_A: Tensor, dropout_p: float, seed: int) -> Tensor:
    """S = dropout(x) A^T [M, r] in x's dtype, returned with the keep-mask stored
    behind it (``fastlora.strategy_ops.stored_bits(s, K)`` finds it): the same
    S and the same Philox mask as ``lora.lora_shrink``. 1 launch (0 if M == 0)."""
    _check_float(x, "x")
    m, k = x.shape
    r = lora_A.shape[0]
    _expect(lora_A, (r, k), "lora_A", "[r, K]")
    if dropout_p <= 0.0:
        raise ValueError("lora_shrink_store_bits: stored bits need a dropout probability > 0")
    s, bits = new_s_with_bits(m, r, k, x.dtype, x.device)
    if m == 0:
        return s
    if k == 0:
        return s.zero_()
    _, keep_levels, inv_keep = _dropout_args(dropout_p)
    block_r = _padded_rank(r)
    cfg = shrink_bits_config(x.dtype, block_r)
    _launch(
        _shrink_bits_kernel,
        (triton.cdiv(m, cfg["BLOCK_M"]),),
        x.device,
        x, lora_A, s, bits, m, k, r,
        x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), s.stride(0), s.stride(1), bits.stride(0),
        int(seed), keep_levels, inv_keep,
        IEEE=x.dtype == torch.float32, BLOCK_R=block_r, **cfg,
    )  # fmt: skip
    return s


def rank_expand(
    l: Tensor,  # noqa: E741 - the rank-r left factor, named as in the kernels
    e: Tensor,
    scaling: float,
    bias: Tensor | None = None,
    *,
    out_dtype: torch.dtype,
    dropout_p: float = 0.0,
    seed: int = 0,
    bits: Tensor | None = None,
) -> Tensor:
    """OUT = D(scaling * l e) + bias [M, N] in ``out_dtype``: l [M, r] (S or an
    fp32 dS), e [r, N] (a strided view: B^T or A); D = the dropout mask / keep,
    from ``bits`` (uint8 [M, cdiv(N, 8)]) when given, else Philox from
    ``seed`` (none when ``dropout_p`` is 0). 1 launch (0 if the output is empty)."""
    m, r = l.shape
    n = e.shape[1]
    _expect(e, (r, n), "e", "[r, N]")
    out = torch.empty((m, n), dtype=out_dtype, device=l.device)
    if m == 0 or n == 0:
        return out
    if r == 0:
        return out.copy_(bias.expand(m, n)) if bias is not None else out.zero_()
    has_dropout, keep_levels, inv_keep = _dropout_args(dropout_p)
    mask = MASK_NONE if not has_dropout else (MASK_BITS if bits is not None else MASK_PHILOX)
    if bits is not None:
        _expect(bits, (m, bits_per_row(n)), "bits", "[M, cdiv(N, 8)]")
    block_r = _padded_rank(r)
    cfg = rank_expand_config(out_dtype, block_r)
    _launch(
        _rank_expand_kernel,
        (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"])),
        l.device,
        l, e, bias if bias is not None else out, out, bits if bits is not None else out,
        m, n, r,
        l.stride(0), l.stride(1), e.stride(0), e.stride(1), out.stride(0), out.stride(1),
        bits.stride(0) if bits is not None else 0,
        float(scaling), int(seed), keep_levels, inv_keep,
        MASK=mask, HAS_BIAS=bias is not None, IEEE=out_dtype == torch.float32, BLOCK_R=block_r, **cfg,
    )  # fmt: skip
    return out


def lora_down_grad_bits(ds: Tensor, x: Tensor, bits: Tensor, dropout_p: float) -> Tensor:
    """dA = dS^T dropout(x) [r, K] in x's dtype, the mask read from ``bits``
    (uint8 [M, cdiv(K, 8)]); as ``lora.lora_down_grad``. 1 launch; deterministic."""
    _check_float(x, "x")
    m, k = x.shape
    r = ds.shape[1]
    _expect(ds, (m, r), "ds", "[M, r]")
    _expect(bits, (m, bits_per_row(k)), "bits", "[M, cdiv(K, 8)]")
    dev = x.device
    da = torch.empty((r, k), dtype=x.dtype, device=dev)
    if m == 0 or k == 0 or r == 0:
        return da.zero_()
    _, _, inv_keep = _dropout_args(dropout_p)
    block_r = _padded_rank(r)
    cfg = dict(down_grad_bits_config(x.dtype, block_r))
    bm, bk = cfg["BLOCK_M"], cfg["BLOCK_K"]
    m_blocks, k_blocks = triton.cdiv(m, bm), triton.cdiv(k, bk)
    split = max(1, min(m_blocks, triton.cdiv(target_programs(dev), k_blocks)))
    counters = torch.zeros((k_blocks,), dtype=torch.int32, device=dev)
    ws = torch.empty((split, block_r, k) if split > 1 else (1,), dtype=torch.float32, device=dev)
    _launch(
        _down_grad_bits_kernel,
        (k_blocks, split),
        dev,
        ds, x, bits, da, ws, counters, m, k, r,
        ds.stride(0), ds.stride(1), x.stride(0), x.stride(1), bits.stride(0), inv_keep, split,
        IEEE=x.dtype == torch.float32, BLOCK_R=block_r, **cfg,
    )  # fmt: skip
    return da


def qlora_gemv(
    p: Tensor,
    qweight: QuantizedWeight,
    l: Tensor,  # noqa: E741 - the rank-r left factor, named as in the kernels
    e: Tensor,
    scaling: float,
    bias: Tensor | None = None,
    *,
    w_rows_are_out: bool,
    dropout_p: float = 0.0,
    seed: int = 0,
    bits: Tensor | None = None,
) -> Tensor:
    """OUT = p deq(W)^(T) + D(scaling * l e) + bias with W read once per 16 rows.

    Forward (``w_rows_are_out``): p = x [M, K], e = B^T [r, N] -> Y [M, N].
    dX: p = dY [M, N], l = dS (fp32), e = A [r, K], D = the forward's mask
    (``bits`` when given, else Philox from ``seed``) -> dX [M, K].
    1 launch (plus a zero-fill of its arrival counters); deterministic.
    """
    _check_float(p, "p")
    if not isinstance(qweight, QuantizedWeight):
        raise TypeError(f"qweight must be a fastlora.quant.QuantizedWeight, got {type(qweight).__name__}")
    if qweight.device != p.device:
        raise ValueError(f"qweight is on {qweight.device} but the activations are on {p.device}")
    n_w, k_w = qweight.shape
    m, red = p.shape
    out_n = n_w if w_rows_are_out else k_w
    if red != (k_w if w_rows_are_out else n_w):
        need = k_w if w_rows_are_out else n_w
        raise ValueError(f"qlora_gemv: p has {red} columns, the weight {list(qweight.shape)} needs {need}")
    r = l.shape[1]
    _expect(l, (m, r), "l", "[M, r]")
    _expect(e, (r, out_n), "e", "[r, OUT]")
    dev = p.device
    out = torch.empty((m, out_n), dtype=p.dtype, device=dev)
    if m == 0 or out_n == 0:
        return out
    has_dropout, keep_levels, inv_keep = _dropout_args(dropout_p)
    mask = MASK_NONE if not has_dropout else (MASK_BITS if bits is not None else MASK_PHILOX)
    if bits is not None:
        _expect(bits, (m, bits_per_row(out_n)), "bits", "[M, cdiv(OUT, 8)]")
    block_r = _padded_rank(max(r, 1))
    cfg = dict(qgemv_config(p.dtype, block_r))
    bm, bo, br = cfg["BLOCK_M"], cfg["BLOCK_OUT"], cfg["BLOCK_RED"]
    m_blocks, o_blocks, red_blocks = triton.cdiv(m, bm), triton.cdiv(out_n, bo), triton.cdiv(red, br)
    split = max(1, min(red_blocks, triton.cdiv(target_programs(dev), o_blocks * m_blocks)))
    counters = torch.zeros((m_blocks * o_blocks,), dtype=torch.int32, device=dev)
    ws = torch.empty((split, m, out_n) if split > 1 else (1,), dtype=torch.float32, device=dev)
    _launch(
        _qgemv_kernel,
        (o_blocks, split, m_blocks),
        dev,
        p, *_state_args(qweight), l, e, bias if bias is not None else out, out, bits if bits is not None else out,
        ws, counters,
        m, out_n, red, r, k_w,
        p.stride(0), p.stride(1), l.stride(0), l.stride(1), e.stride(0), e.stride(1), out.stride(0), out.stride(1),
        bits.stride(0) if bits is not None else 0,
        float(scaling), int(seed), keep_levels, inv_keep, split,
        W_ROWS_ARE_OUT=w_rows_are_out, BLOCKSIZE=qweight.blocksize, NESTED=qweight.double_quant,
        NESTED_BLOCKSIZE=qweight.nested_blocksize, MASK=mask, HAS_BIAS=bias is not None,
        IEEE=p.dtype == torch.float32, BLOCK_R=block_r, **cfg,
        # NOTE: no fused multiply-add, so the de-nested absmax rounds as bitsandbytes'.
        enable_fp_fusion=False,
    )  # fmt: skip
    return out


# ----------------------------------------------------------------------------
# the strategies: the same pairs as fastlora.reference
# ----------------------------------------------------------------------------

_NEEDS = (True, False, True, True, False)  # the reference's default: dx, dA, dB
LORA = ("fused", "cublas")
QLORA = ("dequant_in_gemm", "dequant_once", "small_m")
DROPOUT = ("regenerate", "stored_bits")


class TritonStrategy:
    """One combination of strategies on the Triton backend, with the backend
    module interface (``lora_forward``, ``lora_backward``, ``dora_forward``,
    ``qlora_forward``, ``qlora_backward``: the signatures of ``fastlora.reference``).

    ``lora``: "fused" | "cublas" (the frozen-weight GEMMs; for QLoRA it applies
    with ``qlora="dequant_once"``); ``qlora``: "dequant_in_gemm" |
    "dequant_once" | "small_m"; ``dropout``: "regenerate" | "stored_bits".
    Contract, whichever the names: saved tensors x and S (S carrying the mask
    bits under "stored_bits"), deterministic, nothing written into inputs.
    """

    def __init__(self, lora: str = "fused", qlora: str = "dequant_in_gemm", dropout: str = "regenerate") -> None:
        if lora not in LORA or qlora not in QLORA or dropout not in DROPOUT:
            raise ValueError(f"unknown strategy combination lora={lora!r}, qlora={qlora!r}, dropout={dropout!r}")
        self.lora, self.qlora, self.dropout = lora, qlora, dropout

    def __repr__(self) -> str:
        return f"TritonStrategy(lora={self.lora!r}, qlora={self.qlora!r}, dropout={self.dropout!r})"

    # -- the pieces ------------------------------------------------------------
    def _shrink(self, x: Tensor, lora_A: Tensor, dropout_p: float, seed: int) -> Tensor:
        if dropout_p > 0.0 and self.dropout == "stored_bits":
            return lora_shrink_store_bits(x, lora_A, dropout_p, seed)
        return lora.lora_shrink(x, lora_A, dropout_p, seed)

    def _expand(self, x: Tensor, weight: Tensor, s: Tensor, lora_B: Tensor, scaling: float, bias: Tensor | None) -> Tensor:
        if self.lora == "fused":
            return lora.lora_expand_gemm(x, weight, s, lora_B, scaling, bias)
        _expect(weight, (lora_B.shape[0], x.shape[1]), "weight", "[N, K]")
        y = rank_expand(s, lora_B.t(), scaling, bias, out_dtype=x.dtype)
        return addmm_into(y, x, weight.t())

    def _dx(self, dy, weight, ds, lora_A, dropout_p, seed, bits) -> Tensor:
        if self.lora == "fused":
            return lora.lora_dx_gemm(dy, weight, ds, lora_A, dropout_p, seed)
        _expect(weight, (dy.shape[1], lora_A.shape[1]), "weight", "[N, K]")
        dx = rank_expand(ds, lora_A, 1.0, out_dtype=dy.dtype, dropout_p=dropout_p, seed=seed, bits=bits)
        return addmm_into(dx, dy, weight)

    def _bits(self, s: Tensor, x: Tensor, dropout_p: float) -> Tensor | None:
        if dropout_p > 0.0 and self.dropout == "stored_bits":
            return stored_bits(s, x.shape[1])  # None (regenerate) where S lost them
        return None

    @staticmethod
    def _da(ds, x, dropout_p, seed, bits) -> Tensor:
        if bits is not None:
            return lora_down_grad_bits(ds, x, bits, dropout_p)
        return lora.lora_down_grad(ds, x, dropout_p, seed)

    # NOTE: the kernels here read the adapters in the activation dtype (what
    # FusedOp passes today). fp32 adapters on 16-bit activations (PEFT's mixed
    # precision, which the LoRA kernels are being taught) run the default
    # kernels' pair instead, forward and backward alike (S then carries no bits).
    @staticmethod
    def _mixed(x: Tensor, lora_A: Tensor) -> bool:
        return lora_A.dtype != x.dtype

    # -- LoRA ------------------------------------------------------------------
    def lora_forward(self, x, weight, lora_A, lora_B, scaling, bias=None, dropout_p=0.0, seed=0):
        """``(y, s)`` as ``fastlora.reference.lora_forward``."""
        if self._mixed(x, lora_A):
            return lora.lora_forward(x, weight, lora_A, lora_B, scaling, bias, dropout_p, seed)
        s = self._shrink(x, lora_A, dropout_p, seed)
        return self._expand(x, weight, s, lora_B, scaling, bias), s

    def lora_backward(self, dy, x, weight, lora_A, lora_B, s, scaling, dropout_p=0.0, seed=0, needs=_NEEDS):
        """``(dx, dweight, dA, dB, dbias)`` as ``fastlora.reference.lora_backward``."""
        if self._mixed(x, lora_A):
            return lora.lora_backward(dy, x, weight, lora_A, lora_B, s, scaling, dropout_p, seed, needs)
        need_x, need_w, need_a, need_b, need_bias = needs
        ds, db, dbias = lora.lora_dy_pass(dy, lora_B, s, scaling, need_x or need_a, need_b, need_bias)
        bits = self._bits(s, x, dropout_p)
        dx = self._dx(dy, weight, ds, lora_A, dropout_p, seed, bits) if need_x else None
        da = self._da(ds, x, dropout_p, seed, bits) if need_a else None
        dw = mm(dy.t(), x) if need_w else None
        return dx, dw, da, db, dbias

    def dora_forward(self, x, weight, lora_A, lora_B, scaling, col_scale, bias=None, dropout_p=0.0, seed=0):
        """DoRA's forward is the fused kernels' (its mask regenerated; the LoRA
        backward regenerates the same mask where S carries no bits)."""
        return lora.dora_forward(x, weight, lora_A, lora_B, scaling, col_scale, bias, dropout_p, seed)

    # -- QLoRA -----------------------------------------------------------------
    def qlora_forward(self, x, qweight, lora_A, lora_B, scaling, bias=None, dropout_p=0.0, seed=0):
        """``(y, s)`` as ``fastlora.reference.qlora_forward``."""
        if self._mixed(x, lora_A):
            return nf4.qlora_forward(x, qweight, lora_A, lora_B, scaling, bias, dropout_p, seed)
        s = self._shrink(x, lora_A, dropout_p, seed)
        if self.qlora == "dequant_in_gemm":
            y = nf4.qlora_expand_gemm(x, qweight, s, lora_B, scaling, bias)
        elif self.qlora == "dequant_once":
            # NOTE: the dequantized weight is a fresh tensor freed on return: on
            # CUDA the caching allocator hands the same block to the next call on
            # the stream (the per-device buffer, reused), with the stream
            # ordering a module-global buffer would have to redo by hand.
            y = self._expand(x, nf4.dequantize_4bit(qweight, x.dtype), s, lora_B, scaling, bias)
        else:
            _check_bias(bias, qweight.shape[0])
            y = qlora_gemv(x, qweight, s, lora_B.t(), scaling, bias, w_rows_are_out=True)
        return y, s

    def qlora_backward(self, dy, x, qweight, lora_A, lora_B, s, scaling, dropout_p=0.0, seed=0, needs=_NEEDS):
        """``(dx, None, dA, dB, dbias)`` as ``fastlora.reference.qlora_backward``."""
        if self._mixed(x, lora_A):
            return nf4.qlora_backward(dy, x, qweight, lora_A, lora_B, s, scaling, dropout_p, seed, needs)
        need_x, need_w, need_a, need_b, need_bias = needs
        if need_w:
            raise ValueError("qlora_backward: the 4-bit base weight is frozen; it has no gradient")
        ds, db, dbias = lora.lora_dy_pass(dy, lora_B, s, scaling, need_x or need_a, need_b, need_bias)
        bits = self._bits(s, x, dropout_p)
        dx = None
        if need_x:
            if self.qlora == "dequant_in_gemm":
                dx = nf4.qlora_dx_gemm(dy, qweight, ds, lora_A, dropout_p, seed)
            elif self.qlora == "dequant_once":
                dx = self._dx(dy, nf4.dequantize_4bit(qweight, dy.dtype), ds, lora_A, dropout_p, seed, bits)
            else:
                dx = qlora_gemv(dy, qweight, ds, lora_A, 1.0, w_rows_are_out=False, dropout_p=dropout_p, seed=seed, bits=bits)
        da = self._da(ds, x, dropout_p, seed, bits) if need_a else None
        return dx, None, da, db, dbias


def _check_bias(bias: Tensor | None, n: int) -> None:
    if bias is not None:
        _expect(bias, (n,), "bias", "[N]")


__all__ = [
    "TritonStrategy", "addmm_into", "lora_down_grad_bits", "lora_shrink_store_bits", "mm", "qlora_gemv",
    "rank_expand", "reset_torch_gemm_count", "torch_gemm_count",
]  # fmt: skip
