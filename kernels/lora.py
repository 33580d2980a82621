"""Triton kernels of the LoRA linear layer and their launchers.

``y = x W^T + scaling * D(x) A^T B^T + bias``, D = dropout with a Philox mask
regenerated from an integer seed (never stored). Shapes (2-D; the autograd
layer flattens leading dims): x [M, K], weight [N, K], lora_A [r, K],
lora_B [N, r], bias [N], s = D(x) A^T [M, r].

Dtypes (the contract of ``fastlora.reference``): x, weight, bias share one of
fp32 / fp16 / bf16; the adapters share it, or are fp32 on 16-bit activations
(PEFT's mixed precision). With fp32 adapters the LoRA branch is fp32: S, dA
and dB are fp32 and every rank-r product (shrink, the GEMMs' LoRA term, the dY
pass, dA) is an fp32 IEEE dot of exactly upcast operands, while the frozen
weight's GEMMs stay on 16-bit tensor cores; y and dX come back in x's dtype,
rounded once from fp32.

Launches per layer (each goes through ``_common.launch``, counted exactly by
:func:`launch_count`):

* forward, 2: ``lora_shrink`` (S = D(X) A^T) + ``lora_expand_gemm``
  (Y = X W^T + scaling * S B^T + bias, the LoRA term added in the tile before
  the single write of Y); DoRA's ``dora_forward`` is the same two launches, the
  GEMM's epilogue also writing Z (the tile before scale and bias) and scaling
  the tile by DoRA's per-column g = m / ||W + scaling B A|| before the bias;
* backward, <= 3: ``lora_dy_pass`` (dS, dB, dbias from one read of dY),
  ``lora_dx_gemm`` (dX = dY W + D(dS A)), ``lora_down_grad`` (dA = dS^T D(X)),
  plus one ``torch.mm`` (cuBLAS) for dW only when the frozen weight requires
  grad. The dY pass and dA also zero-fill their small int32 arrival counters
  (``torch.zeros``: a memset, not a kernel of this module, not counted).

Every reduction is deterministic: no fp32 atomics. Partial sums go to fp32
workspaces and the last program to finish a block (seen through an int32
arrival counter, the only atomic: ``tl.debug_barrier()`` then a gpu-scope
acq_rel ``atomic_add``, the pattern of Triton's own lock tests and of CUDA's
grid sync) adds them up in index order, so ``retain_graph=True`` backward
twice gives bit-identical gradients. Nothing here writes into an input or a
saved tensor.

The file follows STYLE.md: kernels first (their jit helpers are in
``_common.py``, shared with ``nf4.py``), then launchers, then the
``lora_forward`` / ``lora_backward`` pair that ``fastlora.functional`` calls
(the same signatures as ``fastlora.reference``). Importing it touches no GPU
driver; with ``TRITON_INTERPRET=1`` (set before import) it runs on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import reference
from . import configs
from ._common import (
    add_bias,
    add_rank_term,
    check_adapter_dtype,
    check_dtype,
    dot_acc,
    dot_f32_lhs,
    dropout_args,
    expect,
    gemm_tile,
    grouped_tile,
    keep_mask,
    launch,
    launch_count,
    m_bucket,
    padded_rank,
    reset_launch_count,
    target_programs,
)

__all__ = [
    "launch_count", "reset_launch_count", "lora_shrink", "lora_expand_gemm", "lora_dx_gemm", "lora_dy_pass",
    "lora_down_grad", "dropout_keep_mask", "lora_forward", "dora_forward", "lora_backward",
]  # fmt: skip

# ----------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------


@triton.jit
def _dropout_mask_kernel(
    out_ptr,  # [M, K] int8, written: 1 = kept
    M,
    K,
    seed,
    keep_levels,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[m, k] = keep(m, k): the mask every other kernel regenerates (tests)."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = keep_mask(seed, rm, pid_k * BLOCK_K, K, keep_levels, BLOCK_M, BLOCK_K)
    ptrs = out_ptr + rm[:, None] * K + rk[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(rm[:, None] < M) & (rk[None, :] < K))


@triton.autotune(
    configs=configs.all_shrink_configs(),
    key=["M_BUCKET", "K", "BLOCK_R", "HAS_DROPOUT", "IEEE"],
    prune_configs_by={"early_config_prune": lambda cs, nargs, **kw: _prune_shrink(cs, nargs, **kw)},
)
@triton.jit(do_not_specialize=["M_BUCKET", "seed"])
def _lora_shrink_kernel(
    x_ptr,  # [M, K] input (any strides)
    a_ptr,  # [R, K] lora_A
    s_ptr,  # [M, R] output S, lora_A's dtype
    M,
    K,
    R,
    stride_xm,
    stride_xk,
    stride_ar,
    stride_ak,
    stride_sm,
    stride_sr,
    seed,  # int dropout seed (Philox key)
    keep_levels,  # keep when the top 16 random bits < keep_levels
    inv_keep,  # 1 / keep probability
    M_BUCKET,  # next_pow2(M): autotune key only
    HAS_DROPOUT: tl.constexpr,
    IEEE: tl.constexpr,  # fp32 x or fp32 lora_A: an fp32 IEEE dot
    BLOCK_R: tl.constexpr,  # rank padded to a power of two >= 16
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """S = D(X) A^T: S[m, j] = sum_k D(X)[m, k] A[j, k] -> [M, R].

    D(X) = mask * X / keep. One program per BLOCK_M rows, looping over K;
    fp32 accumulator [BLOCK_M, BLOCK_R] (ranks r < BLOCK_R are zero-padded by
    the masks), scaled by 1/keep once at the end, stored in S's dtype.
    """
    pid_m = tl.program_id(0)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    mask_m = rm < M
    mask_r = rr < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    # NOTE: row offsets are int64 (M * K may exceed 2**31); the K offsets stay
    # within one tile and the base pointers advance by BLOCK_K columns.
    x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk
    a_ptrs = a_ptr + rr[None, :] * stride_ar + rk[:, None] * stride_ak
    for k0 in range(0, K, BLOCK_K):
        mask_k = (k0 + rk) < K
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if HAS_DROPOUT:
            keep = keep_mask(seed, rm, k0, K, keep_levels, BLOCK_M, BLOCK_K)
            x = tl.where(keep, x, tl.zeros_like(x))
        a = tl.load(a_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        acc = dot_acc(x, a, acc, IEEE)
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak
    if HAS_DROPOUT:
        acc = acc * tl.cast(inv_keep, tl.float32)
    s_ptrs = s_ptr + rm[:, None] * stride_sm + rr[None, :] * stride_sr
    tl.store(s_ptrs, acc.to(s_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_r[None, :])


@triton.autotune(
    configs=configs.all_gemm_configs(),
    key=["M_BUCKET", "N", "K", "BLOCK_R", "HAS_BIAS", "HAS_DROPOUT", "HAS_COL_SCALE", "STORE_PRE", "F32_ADAPTERS"],
    prune_configs_by={"early_config_prune": lambda cs, nargs, **kw: _prune_gemm(cs, nargs, **kw)},
)
@triton.jit(do_not_specialize=["M_BUCKET", "seed"])
def _lora_gemm_kernel(
    p_ptr,  # [M, K] left operand: X (forward) or dY (dX)
    q_ptr,  # [K, N] right operand: W^T (forward) or W (dX), via strides
    l_ptr,  # [M, R] LoRA left: S (forward) or dS (dX, fp32)
    e_ptr,  # [R, N] LoRA right: B^T (forward) or A (dX), via strides
    bias_ptr,  # [N] bias (read only when HAS_BIAS)
    out_ptr,  # [M, N] output Y or dX, written once
    colscale_ptr,  # [N] fp32 per-column scale g (read only when HAS_COL_SCALE; DoRA's m / norm)
    pre_ptr,  # [M, N] second output Z = the tile before scale and bias, out's dtype and strides (STORE_PRE)
    M,
    N,
    K,
    R,
    stride_pm,
    stride_pk,
    stride_qk,
    stride_qn,
    stride_lm,
    stride_lr,
    stride_er,
    stride_en,
    stride_om,
    stride_on,
    scaling,  # multiplies the LoRA term (fp64 from inductor is cast to fp32)
    seed,  # dropout seed; the mask is over the [M, N] output (= x's shape for dX)
    keep_levels,
    inv_keep,
    M_BUCKET,  # next_pow2(M): autotune key only
    HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    IEEE: tl.constexpr,  # fp32 P and Q: IEEE main loop
    BLOCK_R: tl.constexpr,  # the padded rank (configs and autotune key)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    HAS_COL_SCALE: tl.constexpr = False,
    STORE_PRE: tl.constexpr = False,
    F32_ADAPTERS: tl.constexpr = False,  # fp32 adapters on 16-bit activations (configs; the dots see E's dtype)
    R_CHUNK: tl.constexpr = 16,  # rank columns per epilogue step
):
    """OUT = g * (P Q + D(scaling * L E)) + bias, one [BLOCK_M, BLOCK_N] tile per program.

    Forward: Y = X W^T + scaling * S B^T + bias   (P=X, Q=W^T, L=S, E=B^T, no D)
    dX:      dX = dY W + D(dS A)                   (P=dY, Q=W, L=dS, E=A, scaling=1)
    DoRA:    Z = X W^T + scaling * S B^T, Y = g * Z + bias  (HAS_COL_SCALE, STORE_PRE)
    with D = mask / keep on the output coordinates (dX has x's shape) and g [N]
    a per-column fp32 scale (1 unless HAS_COL_SCALE). The main loop is a
    standard grouped-order tiled GEMM with an fp32 accumulator; the rank-R term
    is added by ``_common.add_rank_term`` (fp32 scaling * L, split hi/lo for
    16-bit E, an IEEE dot for fp32 E), before the tile is (with STORE_PRE)
    stored as Z, scaled by g, given the bias and stored as OUT.
    """
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_m = rm < M
    mask_n = rn < N
    acc = gemm_tile(p_ptr, q_ptr, rm, rn, mask_m, mask_n, K, stride_pm, stride_pk, stride_qk, stride_qn,
                    IEEE, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
    acc = add_rank_term(
        acc, l_ptr, e_ptr, rm, rn, mask_m, mask_n, R, stride_lm, stride_lr, stride_er, stride_en,
        scaling, seed, keep_levels, inv_keep, N, pid_n * BLOCK_N,
        HAS_DROPOUT, IEEE, p_ptr.dtype.element_ty, BLOCK_R, R_CHUNK, BLOCK_M, BLOCK_N,
    )  # fmt: skip
    out_offs = rm[:, None] * stride_om + rn[None, :] * stride_on
    if STORE_PRE:
        # NOTE: Z (DoRA's dm needs it in backward) is rounded from the same fp32
        # tile that Y is computed from; Y is not recomputed from the rounded Z.
        tl.store(pre_ptr + out_offs, acc.to(pre_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
    if HAS_COL_SCALE:
        acc = acc * tl.load(colscale_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    acc = add_bias(acc, bias_ptr, rn, mask_n, HAS_BIAS)
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _lora_dy_kernel(
    dy_ptr,  # [M, N] upstream gradient (any strides)
    b_ptr,  # [N, R] lora_B
    s_ptr,  # [M, R] S saved by the forward
    ds_ptr,  # [M, R] fp32 output dS (when NEED_DS)
    db_ptr,  # [N, R] output dB, lora_B's dtype (when NEED_DB)
    dbias_ptr,  # [N] output dbias, dY's dtype (when NEED_DBIAS)
    ws_ds_ptr,  # [cdiv(N, BLOCK_N), M, WS_R] fp32 workspace: dS partial per column block
    ws_db_ptr,  # [SPLIT_M, N, WS_R] fp32 workspace: dB partial per row split
    ws_dbias_ptr,  # [SPLIT_M, N] fp32 workspace: dbias partial per row split
    cnt_m_ptr,  # [cdiv(M, BLOCK_M), r_blocks] int32, zeroed: column blocks done per row block
    cnt_n_ptr,  # [cdiv(N, BLOCK_N), r_blocks] int32, zeroed: row splits done per column block
    M,
    N,
    R,
    stride_dym,
    stride_dyn,
    stride_bn,
    stride_br,
    stride_sm,
    stride_sr,
    scaling,
    SPLIT_M,  # programs along M; program (., n, s) takes row blocks s, s + SPLIT_M, ...
    NEED_DS: tl.constexpr,
    NEED_DB: tl.constexpr,
    NEED_DBIAS: tl.constexpr,
    IEEE: tl.constexpr,  # any fp32 operand (dY, B or S): fp32 IEEE dots
    BLOCK_R: tl.constexpr,  # rank columns per program (a grid axis walks the rank)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One read of dY for the three rank-r gradients:

      dS    = scaling * dY B     [M, R]  (reduced over N)
      dB    = scaling * dY^T S   [N, R]  (reduced over M)
      dbias = sum_m dY           [N]     (reduced over M)

    Grid (r_blocks, cdiv(N, BLOCK_N), SPLIT_M): program (j, n, s) owns rank
    columns [j * BLOCK_R, (j + 1) * BLOCK_R) of column block n and holds its dB
    (and, for j = 0, dbias) accumulators in registers over the row blocks
    s, s + SPLIT_M, ...; it writes each row block's dS partial to ws_ds. The
    rank axis is the fastest-varying one, so the programs sharing a dY tile
    run together and read it once from HBM. Deterministic cross-program
    reduction: after writing a partial, a program bumps the block's int32
    counter (acq_rel, after a CTA barrier); the program that sees the last
    arrival sums all the partials of that block in index order and stores the
    result. With a single column block (or split) the partial is the result
    and is stored directly.
    """
    pid_r = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    r_blocks = tl.num_programs(0)
    ws_r = r_blocks * BLOCK_R
    n_blocks = tl.cdiv(N, BLOCK_N)
    m_blocks = tl.cdiv(M, BLOCK_M)
    scaling = tl.cast(scaling, tl.float32)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_n = rn < N
    mask_r = rr < R
    mask_bias = mask_n & ((tl.zeros((BLOCK_N,), dtype=tl.int32) + pid_r) == 0)  # dbias: the rank-0 programs' job
    if NEED_DS:
        b = tl.load(b_ptr + rn[:, None] * stride_bn + rr[None, :] * stride_br, mask=mask_n[:, None] & mask_r[None, :], other=0.0)
    db_acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for mb in range(pid_s, m_blocks, SPLIT_M):
        rm = (mb * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask_m = rm < M
        dy = tl.load(dy_ptr + rm[:, None] * stride_dym + rn[None, :] * stride_dyn, mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        if NEED_DB:
            s = tl.load(s_ptr + rm[:, None] * stride_sm + rr[None, :] * stride_sr, mask=mask_m[:, None] & mask_r[None, :], other=0.0)
            db_acc = dot_acc(tl.trans(dy), s, db_acc, IEEE)
        if NEED_DBIAS:
            dbias_acc += tl.sum(dy.to(tl.float32), axis=0)
        if NEED_DS:
            part = dot_acc(dy, b, tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32), IEEE)
            mask_mr = mask_m[:, None] & mask_r[None, :]
            out_off = rm[:, None] * R + rr[None, :]
            if n_blocks == 1:
                tl.store(ds_ptr + out_off, part * scaling, mask=mask_mr)
            else:
                ws_off = rm[:, None] * ws_r + rr[None, :]
                block_stride = tl.cast(M, tl.int64) * ws_r
                tl.store(ws_ds_ptr + pid_n * block_stride + ws_off, part, mask=mask_mr)
                # NOTE: the barrier orders every thread's partial store before
                # the (single-thread, acq_rel, gpu-scope) arrival; the reader
                # bypasses L1 (.cg) for the other programs' partials.
                tl.debug_barrier()
                arrived = tl.atomic_add(cnt_m_ptr + mb * r_blocks + pid_r, 1, sem="acq_rel")
                if arrived == n_blocks - 1:
                    total = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
                    for j in range(0, n_blocks):
                        total += tl.load(ws_ds_ptr + j * block_stride + ws_off, mask=mask_mr, other=0.0, cache_modifier=".cg")
                    tl.store(ds_ptr + out_off, total * scaling, mask=mask_mr)

    if NEED_DB or NEED_DBIAS:
        mask_nr = mask_n[:, None] & mask_r[None, :]
        if SPLIT_M == 1:
            if NEED_DB:
                tl.store(db_ptr + rn[:, None] * R + rr[None, :], (db_acc * scaling).to(db_ptr.dtype.element_ty), mask=mask_nr)
            if NEED_DBIAS:
                tl.store(dbias_ptr + rn, dbias_acc.to(dbias_ptr.dtype.element_ty), mask=mask_bias)
        else:
            split_stride = tl.cast(N, tl.int64) * ws_r
            ws_off = rn[:, None] * ws_r + rr[None, :]
            if NEED_DB:
                tl.store(ws_db_ptr + pid_s * split_stride + ws_off, db_acc, mask=mask_nr)
            if NEED_DBIAS:
                tl.store(ws_dbias_ptr + pid_s * tl.cast(N, tl.int64) + rn, dbias_acc, mask=mask_bias)
            tl.debug_barrier()
            arrived = tl.atomic_add(cnt_n_ptr + pid_n * r_blocks + pid_r, 1, sem="acq_rel")
            if arrived == SPLIT_M - 1:
                db_tot = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
                dbias_tot = tl.zeros((BLOCK_N,), dtype=tl.float32)
                for j in range(0, SPLIT_M):
                    if NEED_DB:
                        db_tot += tl.load(ws_db_ptr + j * split_stride + ws_off, mask=mask_nr, other=0.0, cache_modifier=".cg")
                    if NEED_DBIAS:
                        dbias_ptrs = ws_dbias_ptr + j * tl.cast(N, tl.int64) + rn
                        dbias_tot += tl.load(dbias_ptrs, mask=mask_bias, other=0.0, cache_modifier=".cg")
                if NEED_DB:
                    tl.store(db_ptr + rn[:, None] * R + rr[None, :], (db_tot * scaling).to(db_ptr.dtype.element_ty), mask=mask_nr)
                if NEED_DBIAS:
                    tl.store(dbias_ptr + rn, dbias_tot.to(dbias_ptr.dtype.element_ty), mask=mask_bias)


@triton.jit
def _lora_down_grad_kernel(
    ds_ptr,  # [M, R] dS (fp32 from the dY pass, or any float dtype)
    x_ptr,  # [M, K] input saved by the forward (any strides)
    da_ptr,  # [R, K] output dA (lora_A's dtype)
    ws_ptr,  # [SPLIT_M, WS_R, K] fp32 workspace: dA partial per row split
    cnt_ptr,  # [cdiv(K, BLOCK_K), r_blocks] int32, zeroed: row splits done per column block
    M,
    K,
    R,
    stride_dsm,
    stride_dsr,
    stride_xm,
    stride_xk,
    seed,
    keep_levels,
    inv_keep,
    SPLIT_M,
    HAS_DROPOUT: tl.constexpr,
    IEEE: tl.constexpr,  # fp32 x or an fp32 dA: an fp32 IEEE dot
    BLOCK_R: tl.constexpr,  # rank rows per program (a grid axis walks the rank)
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """dA = dS^T D(X): dA[j, k] = sum_m dS[m, j] D(X)[m, k] -> [R, K].

    Grid (r_blocks, cdiv(K, BLOCK_K), SPLIT_M); program (j, k, s) accumulates
    row blocks s, s + SPLIT_M, ... into a [BLOCK_R, BLOCK_K] fp32 tile of rank
    rows [j * BLOCK_R, (j + 1) * BLOCK_R); the splits are summed in index order
    by the last to arrive (as in ``_lora_dy_kernel``), then scaled by 1/keep.
    The dropout mask is regenerated from ``seed``.
    """
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_s = tl.program_id(2)
    r_blocks = tl.num_programs(0)
    ws_r = r_blocks * BLOCK_R
    m_blocks = tl.cdiv(M, BLOCK_M)
    rk = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_k = rk < K
    mask_r = rr < R
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for mb in range(pid_s, m_blocks, SPLIT_M):
        rm = (mb * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask_m = rm < M
        ds_t = tl.load(ds_ptr + rr[:, None] * stride_dsr + rm[None, :] * stride_dsm, mask=mask_r[:, None] & mask_m[None, :], other=0.0)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if HAS_DROPOUT:
            keep = keep_mask(seed, rm, pid_k * BLOCK_K, K, keep_levels, BLOCK_M, BLOCK_K)
            x = tl.where(keep, x, tl.zeros_like(x))
        acc = dot_f32_lhs(ds_t.to(tl.float32), x, acc, IEEE)
    mask_rk = mask_r[:, None] & mask_k[None, :]
    out_off = rr[:, None] * K + rk[None, :]
    if SPLIT_M == 1:
        if HAS_DROPOUT:
            acc = acc * tl.cast(inv_keep, tl.float32)
        tl.store(da_ptr + out_off, acc.to(da_ptr.dtype.element_ty), mask=mask_rk)
    else:
        split_stride = tl.cast(K, tl.int64) * ws_r
        ws_off = rr[:, None] * K + rk[None, :]
        tl.store(ws_ptr + pid_s * split_stride + ws_off, acc, mask=mask_rk)
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + pid_k * r_blocks + pid_r, 1, sem="acq_rel")
        if arrived == SPLIT_M - 1:
            total = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
            for j in range(0, SPLIT_M):
                total += tl.load(ws_ptr + j * split_stride + ws_off, mask=mask_rk, other=0.0, cache_modifier=".cg")
            if HAS_DROPOUT:
                total = total * tl.cast(inv_keep, tl.float32)
            tl.store(da_ptr + out_off, total.to(da_ptr.dtype.element_ty), mask=mask_rk)


# ----------------------------------------------------------------------------
# autotune filters
# ----------------------------------------------------------------------------


def _prune_gemm(cs, nargs, **kw):
    p = nargs["p_ptr"]
    allowed = configs.gemm_configs(
        configs.device_arch(p.device), p.dtype, has_dropout=kw["HAS_DROPOUT"], block_r=kw["BLOCK_R"],
        store_pre=kw.get("STORE_PRE", False), lora_f32=kw.get("F32_ADAPTERS", False),
    )  # fmt: skip
    return configs.prune(cs, allowed, {"BLOCK_M": nargs["M"], "BLOCK_N": nargs["N"]})


def _prune_shrink(cs, nargs, **kw):
    x = nargs["x_ptr"]
    allowed = configs.shrink_configs(
        configs.device_arch(x.device), x.dtype, has_dropout=kw["HAS_DROPOUT"], block_r=kw["BLOCK_R"],
        lora_f32=kw.get("IEEE", False),
    )  # fmt: skip
    return configs.prune(cs, allowed, {"BLOCK_M": nargs["M"], "BLOCK_K": nargs["K"]})


# ----------------------------------------------------------------------------
# launchers: the building blocks (also used by the QLoRA kernels)
# ----------------------------------------------------------------------------


def lora_shrink(x: Tensor, lora_A: Tensor, dropout_p: float = 0.0, seed: int = 0) -> Tensor:
    """S = dropout(x) A^T: x [M, K], lora_A [r, K] -> S [M, r] in lora_A's dtype
    (x's, or fp32 for fp32 adapters; fp32 accumulation, an fp32 IEEE dot when
    either is fp32; the mask regenerated from ``seed``). 1 launch (0 if M == 0)."""
    check_dtype(x, "x")
    check_adapter_dtype(lora_A, "lora_A", x.dtype)
    m, k = x.shape
    r = lora_A.shape[0]
    expect(lora_A, (r, k), "lora_A", "[r, K]")
    s = torch.empty((m, r), dtype=lora_A.dtype, device=x.device)
    if m == 0:
        return s
    has_dropout, keep_levels, inv_keep = dropout_args(dropout_p)
    launch(
        _lora_shrink_kernel,
        lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),),
        x.device,
        x, lora_A, s, m, k, r,
        x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), s.stride(0), s.stride(1),
        int(seed), keep_levels, inv_keep, m_bucket(m),
        HAS_DROPOUT=has_dropout, IEEE=torch.float32 in (x.dtype, lora_A.dtype), BLOCK_R=padded_rank(r),
    )  # fmt: skip
    return s


def _gemm(
    p, q_t, l, e_t, bias, scaling, dropout_p, seed, out_shape_n, q_strides, e_strides, col_scale=None, store_pre=False
) -> tuple[Tensor, Tensor | None]:
    """(OUT, Z): OUT [M, n] = g * Z + bias, Z = P Q + D(scaling * L E) (returned
    only with ``store_pre``, else None); g = ``col_scale`` [n] fp32 or 1; Q and E
    given by their strides. The LoRA term is an fp32 IEEE dot when E (the
    adapter) or P is fp32."""
    m, k = p.shape
    r = l.shape[1]
    n = out_shape_n
    expect(l, (m, r), "the LoRA activation (s or ds)", "[M, r]")
    out = torch.empty((m, n), dtype=p.dtype, device=p.device)
    pre = torch.empty((m, n), dtype=p.dtype, device=p.device) if store_pre else None
    if m == 0 or n == 0:
        return out, pre
    has_dropout, keep_levels, inv_keep = dropout_args(dropout_p)
    f32_adapters = p.dtype != torch.float32 and e_t.dtype == torch.float32
    launch(
        _lora_gemm_kernel,
        lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),),
        p.device,
        p, q_t, l, e_t, bias if bias is not None else out, out,
        col_scale if col_scale is not None else out, pre if pre is not None else out,  # dummies: never read/written
        m, n, k, r,
        p.stride(0), p.stride(1), q_strides[0], q_strides[1], l.stride(0), l.stride(1),
        e_strides[0], e_strides[1], out.stride(0), out.stride(1),
        float(scaling), int(seed), keep_levels, inv_keep, m_bucket(m),
        HAS_BIAS=bias is not None, HAS_DROPOUT=has_dropout, IEEE=p.dtype == torch.float32, BLOCK_R=padded_rank(r),
        HAS_COL_SCALE=col_scale is not None, STORE_PRE=store_pre,
        F32_ADAPTERS=f32_adapters, R_CHUNK=configs.rank_chunk(padded_rank(r), p.dtype, f32_adapters),
    )  # fmt: skip
    return out, pre


def lora_expand_gemm(x: Tensor, weight: Tensor, s: Tensor, lora_B: Tensor, scaling: float, bias: Tensor | None = None) -> Tensor:
    """Y = x W^T + scaling * S B^T + bias in one GEMM (the LoRA term and bias
    added in the tile before its single write): x [M, K], weight [N, K],
    s [M, r], lora_B [N, r] (x's dtype, or both fp32), bias [N] -> Y [M, N] in
    x's dtype. 1 launch."""
    check_dtype(x, "x")
    check_adapter_dtype(lora_B, "lora_B", x.dtype)
    n, r = lora_B.shape
    expect(weight, (n, x.shape[1]), "weight", "[N, K]")
    expect(s, (x.shape[0], r), "s", "[M, r]")
    if bias is not None:
        expect(bias, (n,), "bias", "[N]")
    return _gemm(
        x, weight, s, lora_B, bias, scaling, 0.0, 0, weight.shape[0],
        (weight.stride(1), weight.stride(0)), (lora_B.stride(1), lora_B.stride(0)),
    )[0]  # fmt: skip


def lora_dx_gemm(dy: Tensor, weight: Tensor, ds: Tensor, lora_A: Tensor, dropout_p: float = 0.0, seed: int = 0) -> Tensor:
    """dX = dY W + D(dS A) in one GEMM: dy [M, N], weight [N, K], ds [M, r]
    (already scaled, any float dtype), lora_A [r, K] (dy's dtype or fp32) ->
    dX [M, K] in dy's dtype; D = the forward's dropout mask (regenerated from
    ``seed``) / keep. 1 launch (0 if M == 0 or K == 0)."""
    check_dtype(dy, "dy")
    check_adapter_dtype(lora_A, "lora_A", dy.dtype)
    r, k = lora_A.shape
    expect(weight, (dy.shape[1], k), "weight", "[N, K]")
    expect(ds, (dy.shape[0], r), "ds", "[M, r]")
    return _gemm(
        dy, weight, ds, lora_A, None, 1.0, dropout_p, seed, weight.shape[1],
        (weight.stride(0), weight.stride(1)), (lora_A.stride(0), lora_A.stride(1)),
    )[0]  # fmt: skip


def dy_pass_workspace_bytes(m: int, n: int, r: int, dtype: torch.dtype, arch: int = 90, programs: int = 264) -> int:
    """Bytes of fp32 workspace :func:`lora_dy_pass` allocates for dS and dB
    (everything requested) at dY [m, n], rank r: ``cdiv(n, BLOCK_N) * m * WS_R``
    partials of dS plus ``SPLIT_M * n * WS_R`` of dB, 4 bytes each (``programs``:
    how many fill the device; 264 = 2 per SM of an H100/H200)."""
    cfg = configs.pick(configs.dy_pass_configs(arch, dtype, block_r=padded_rank(r)), {"BLOCK_M": m, "BLOCK_N": n})
    bm, bn, br = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_R"]
    ws_r = triton.cdiv(r, br) * br
    m_blocks, n_blocks = triton.cdiv(m, bm), triton.cdiv(n, bn)
    split = max(1, min(m_blocks, triton.cdiv(programs, n_blocks * triton.cdiv(r, br))))
    return 4 * ws_r * ((n_blocks * m if n_blocks > 1 else 0) + (split * n if split > 1 else 0))


def lora_dy_pass(
    dy: Tensor,
    lora_B: Tensor,
    s: Tensor,
    scaling: float,
    need_ds: bool = True,
    need_db: bool = True,
    need_dbias: bool = False,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """One pass over dY: ``(dS, dB, dbias)``, each None unless requested.

    dy [M, N], lora_B [N, r], s [M, r] (both dy's dtype, or both fp32) ->
      dS = scaling * dY B [M, r] in **fp32** (not saved; kept exact for dX / dA),
      dB = scaling * dY^T S [N, r] in lora_B's dtype, dbias = sum_m dY [N] in dy's dtype.
    Empty sums are zeros (N == 0: dS = 0; M == 0: dB = 0, dbias = 0).
    1 launch (0 if M == 0 or N == 0; plus a zero-fill of its arrival counters);
    deterministic.
    """
    check_dtype(dy, "dy")
    check_adapter_dtype(lora_B, "lora_B", dy.dtype)
    check_adapter_dtype(s, "s", dy.dtype)
    m, n = dy.shape
    r = lora_B.shape[1]
    expect(lora_B, (n, r), "lora_B", "[N, r]")
    expect(s, (m, r), "s", "[M, r]")
    dev = dy.device
    if m == 0 or n == 0:
        # NOTE: the sums are empty: zeros, not torch.empty's leftovers.
        ds = torch.zeros((m, r), dtype=torch.float32, device=dev) if need_ds else None
        db = torch.zeros((n, r), dtype=lora_B.dtype, device=dev) if need_db else None
        dbias = torch.zeros((n,), dtype=dy.dtype, device=dev) if need_dbias else None
        return ds, db, dbias
    ds = torch.empty((m, r), dtype=torch.float32, device=dev) if need_ds else None
    db = torch.empty((n, r), dtype=lora_B.dtype, device=dev) if need_db else None
    dbias = torch.empty((n,), dtype=dy.dtype, device=dev) if need_dbias else None
    if not (need_ds or need_db or need_dbias):
        return ds, db, dbias
    ieee = torch.float32 in (dy.dtype, lora_B.dtype, s.dtype)
    cfg = configs.pick(
        configs.dy_pass_configs(configs.device_arch(dev), dy.dtype, block_r=padded_rank(r), lora_f32=ieee),
        {"BLOCK_M": m, "BLOCK_N": n},
    )
    bm, bn, br = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_R"]
    m_blocks, n_blocks, r_blocks = triton.cdiv(m, bm), triton.cdiv(n, bn), triton.cdiv(r, br)
    ws_r = r_blocks * br
    split = max(1, min(m_blocks, triton.cdiv(target_programs(dev), n_blocks * r_blocks)))
    counters = torch.zeros(((m_blocks + n_blocks) * r_blocks,), dtype=torch.int32, device=dev)
    f32 = torch.float32
    ws_ds = torch.empty((n_blocks, m, ws_r) if need_ds and n_blocks > 1 else (1,), dtype=f32, device=dev)
    ws_db = torch.empty((split, n, ws_r) if need_db and split > 1 else (1,), dtype=f32, device=dev)
    ws_dbias = torch.empty((split, n) if need_dbias and split > 1 else (1,), dtype=f32, device=dev)
    dummy = counters  # never dereferenced when its flag is off
    launch(
        _lora_dy_kernel,
        (r_blocks, n_blocks, split),
        dev,
        dy, lora_B, s,
        ds if ds is not None else dummy, db if db is not None else dummy, dbias if dbias is not None else dummy,
        ws_ds, ws_db, ws_dbias, counters[: m_blocks * r_blocks], counters[m_blocks * r_blocks :],
        m, n, r,
        dy.stride(0), dy.stride(1), lora_B.stride(0), lora_B.stride(1), s.stride(0), s.stride(1),
        float(scaling), split,
        NEED_DS=need_ds, NEED_DB=need_db, NEED_DBIAS=need_dbias, IEEE=ieee, BLOCK_R=br,
        BLOCK_M=bm, BLOCK_N=bn, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return ds, db, dbias


def lora_down_grad(ds: Tensor, x: Tensor, dropout_p: float = 0.0, seed: int = 0, dtype: torch.dtype | None = None) -> Tensor:
    """dA = dS^T dropout(x): ds [M, r] (any float dtype), x [M, K] -> dA [r, K]
    in ``dtype`` (default x's; fp32 for fp32 adapters, then an fp32 IEEE dot),
    the mask regenerated from ``seed``. 1 launch (0 if M == 0 or K == 0: zeros);
    deterministic."""
    check_dtype(x, "x")
    dtype = x.dtype if dtype is None else dtype
    if dtype not in (x.dtype, torch.float32):
        raise TypeError(f"dtype (of dA) must be {x.dtype} (x's dtype) or torch.float32, got {dtype}")
    m, k = x.shape
    r = ds.shape[1]
    expect(ds, (m, r), "ds", "[M, r]")
    dev = x.device
    if m == 0 or k == 0:
        return torch.zeros((r, k), dtype=dtype, device=dev)
    da = torch.empty((r, k), dtype=dtype, device=dev)
    has_dropout, keep_levels, inv_keep = dropout_args(dropout_p)
    ieee = torch.float32 in (x.dtype, dtype)
    cfg = configs.pick(
        configs.down_grad_configs(
            configs.device_arch(dev), x.dtype, has_dropout=has_dropout, block_r=padded_rank(r), lora_f32=ieee
        ),
        {"BLOCK_M": m, "BLOCK_K": k},
    )
    bm, bk, br = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_K"], cfg.kwargs["BLOCK_R"]
    m_blocks, k_blocks, r_blocks = triton.cdiv(m, bm), triton.cdiv(k, bk), triton.cdiv(r, br)
    split = max(1, min(m_blocks, triton.cdiv(target_programs(dev), k_blocks * r_blocks)))
    counters = torch.zeros((k_blocks * r_blocks,), dtype=torch.int32, device=dev)
    ws = torch.empty((split, r_blocks * br, k) if split > 1 else (1,), dtype=torch.float32, device=dev)
    launch(
        _lora_down_grad_kernel,
        (r_blocks, k_blocks, split),
        dev,
        ds, x, da, ws, counters,
        m, k, r,
        ds.stride(0), ds.stride(1), x.stride(0), x.stride(1),
        int(seed), keep_levels, inv_keep, split,
        HAS_DROPOUT=has_dropout, IEEE=ieee, BLOCK_R=br,
        BLOCK_M=bm, BLOCK_K=bk, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return da


def dropout_keep_mask(seed: int, shape: tuple[int, int], p: float, device: torch.device) -> tuple[Tensor, float]:
    """The kernels' dropout keep-mask for ``seed`` (bool, ``shape`` = x's [M, K])
    and the keep probability, from the same jit helper the kernels use. 1 launch."""
    _, keep = reference.dropout_keep_threshold(p)
    _, keep_levels, _ = dropout_args(p)
    m, k = shape
    out = torch.empty((m, k), dtype=torch.int8, device=device)
    if m and k:
        bm, bk = 32, 32
        launch(_dropout_mask_kernel, (triton.cdiv(m, bm), triton.cdiv(k, bk)), torch.device(device),
               out, m, k, int(seed), keep_levels, BLOCK_M=bm, BLOCK_K=bk)  # fmt: skip
    return out.bool(), keep


# ----------------------------------------------------------------------------
# the layer: the same pair as fastlora.reference
# ----------------------------------------------------------------------------


def lora_forward(
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    bias: Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """``y = x W^T + scaling * (dropout(x) A^T) B^T + bias``; returns ``(y, s)``.

    As ``fastlora.reference.lora_forward`` (y in x's dtype, s in the adapters'
    dtype: fp32 adapters on 16-bit x give an fp32 LoRA branch and fp32 s),
    except that the dropout mask comes from Triton's Philox keyed by ``seed``
    (see :func:`dropout_keep_mask`).
    2 launches: shrink, then the GEMM with the LoRA term in its epilogue.
    """
    _check_adapters(x, lora_A, lora_B)
    s = lora_shrink(x, lora_A, dropout_p, seed)
    y = lora_expand_gemm(x, weight, s, lora_B, scaling, bias)
    return y, s


def dora_forward(
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    col_scale: Tensor,
    bias: Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """DoRA's forward ``y = g * z + bias``, ``z = x W^T + scaling * (dropout(x) A^T) B^T``;
    returns ``(y, z, s)``.

    x [M, K], weight [N, K], lora_A [r, K], lora_B [N, r] (x's dtype, or both
    fp32), col_scale g [N] (DoRA's m / ||W + scaling B A||, cast to fp32 here),
    bias [N] -> y, z [M, N] in x's dtype, s [M, r] in the adapters' dtype. As
    ``fastlora.reference.dora_forward`` (dropout mask from Triton's Philox).
    2 launches: shrink, then the GEMM whose epilogue adds the LoRA term, stores
    z, scales by g and adds the bias (y is computed from the fp32 tile, not
    from the rounded z).
    """
    check_dtype(x, "x")
    _check_adapters(x, lora_A, lora_B)
    n = lora_B.shape[0]
    expect(weight, (n, x.shape[1]), "weight", "[N, K]")
    expect(col_scale, (n,), "col_scale", "[N]")
    if bias is not None:
        expect(bias, (n,), "bias", "[N]")
    s = lora_shrink(x, lora_A, dropout_p, seed)
    y, z = _gemm(
        x, weight, s, lora_B, bias, scaling, 0.0, 0, n,
        (weight.stride(1), weight.stride(0)), (lora_B.stride(1), lora_B.stride(0)),
        col_scale=col_scale.to(torch.float32).contiguous(), store_pre=True,
    )  # fmt: skip
    return y, z, s


def lora_backward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    s: Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    seed: int = 0,
    needs: tuple[bool, bool, bool, bool, bool] = (True, False, True, True, False),
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Gradients ``(dx, dweight, dA, dB, dbias)`` of :func:`lora_forward`.

    With D = dropout (mask m / keep) and dS = scaling * dY B (fp32):
      dB = scaling * dY^T S;  dbias = sum_m dY     (dY pass, 1 launch with dS)
      dx = dY W + D(dS A)                          (1 GEMM launch)
      dA = dS^T D(x)                               (1 launch)
      dW = dY^T x                                  (torch.mm, only if requested)
    dx, dW, dbias in dy's dtype; dA, dB in the adapters' dtype (fp32 adapters:
    fp32, as ``fastlora.reference.lora_backward``). Empty sums give zeros.
    ``needs`` = (dx, dweight, dA, dB, dbias); unrequested ones are None and cost nothing.
    """
    _check_adapters(x, lora_A, lora_B)
    need_x, need_w, need_a, need_b, need_bias = needs
    need_ds = need_x or need_a
    ds, db, dbias = lora_dy_pass(dy, lora_B, s, scaling, need_ds, need_b, need_bias)
    dx = lora_dx_gemm(dy, weight, ds, lora_A, dropout_p, seed) if need_x else None
    da = lora_down_grad(ds, x, dropout_p, seed, lora_A.dtype) if need_a else None
    # NOTE: dW is a plain [N, K] GEMM (cuBLAS), needed only for a trainable base weight.
    dw = torch.mm(dy.t(), x) if need_w else None
    return dx, dw, da, db, dbias


def _check_adapters(x: Tensor, lora_A: Tensor, lora_B: Tensor) -> None:
    """lora_A and lora_B both in x's dtype, or both fp32 (the reference's contract)."""
    if lora_A.dtype != lora_B.dtype or lora_A.dtype not in (x.dtype, torch.float32):
        raise TypeError(
            f"lora_A/lora_B have dtypes {lora_A.dtype}/{lora_B.dtype}; expected both {x.dtype} (x's dtype) "
            "or both torch.float32"
        )
