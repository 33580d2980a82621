"""Triton kernels of the multi-adapter LoRA linear layer and their launchers.

``y[m] = x[m] W^T + bias + scaling[a] * D(x)[m] A[a]^T B[a]^T``, ``a = ids[m]``
(-1 = the base alone), D = dropout with the Philox mask of
``fastlora.kernels.lora`` (keyed by the row of x, so a row's mask does not
depend on its adapter or on the sort). Shapes (2-D; ``fastlora.multi``
flattens leading dims): x [M, K], weight [N, K], lora_A [n, r, K],
lora_B [n, N, r], scaling [n] fp32, ids [M], bias [N], s [M, r] (rows in x's
order, zero on base rows).

Two row layouts:

* **sorted** (any M; the backward always): rows are visited in adapter order
  through ``perm`` (a stable argsort of the ids, computed with torch ops: no
  sync, no host loop). Tiles of BLOCK_M sorted rows are *not* aligned to
  adapter segments, so the frozen GEMM does no padded work; a tile's LoRA term
  loops over the (contiguous, usually one or two) adapters present in it, one
  masked rank-r dot each. The per-adapter reductions (dA, dB) walk each
  adapter's segment; split partials are summed in index order by the last
  program to arrive (an int32 arrival counter, as in ``kernels/lora.py``), so
  gradients are deterministic and there are no fp32 atomics.
* **decode** (forward with M <= :data:`DECODE_MAX_M`): no sort at all. The
  shrink is one program per row (a GEMV against that row's A); the GEMM runs
  one BLOCK_M = 16 tile over all rows and adds each row's LoRA term in its
  epilogue from that row's own B (elementwise, fp32): no row is padded to a
  tile of its own.

A 4-bit base weight (``qlora_multi_forward`` / ``_backward``, QLoRA) takes one
of two strategies: ``dequant_in_gemm`` runs the same GEMMs as
``_multi_qgemm_kernel``, whose main loop is ``nf4.qgemm_tile`` (each tile of W
dequantized in registers) and whose epilogue is the dense kernel's
(``_multi_epilogue``); ``dequant_once`` dequantizes W into a transient dense
weight first (``nf4.dequantize_4bit``: one more launch each way).

Launches: forward 2 (shrink + GEMM), backward 3 (the dY pass for dS, dB and
dbias; the dX GEMM; dA), plus a few torch ops (argsort, searchsorted, counter
zero-fill) that are not kernels of this module. Counted by
``fastlora.kernels.lora.launch_count()`` (one counter for every kernel module).

The launch configurations are ``kernels/configs.py``'s ``multi_*_configs``; the
jit helpers (dropout mask, dots, the grouped tile order, the dense GEMM main
loop, the rank-r epilogue dots, bias, the split reduction) and the launch
plumbing are ``kernels/_common.py``'s, shared with ``kernels/lora.py``.

Importing this module touches no GPU driver; with ``TRITON_INTERPRET=1`` (set
before import) it runs on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..quant import QuantizedWeight
from . import configs, lora, nf4
from ._common import add_bias, arrive_and_sum, check_dtype, dot_acc, dot_f32_lhs, dropout_args, expect, gemm_tile
from ._common import grouped_tile, keep_mask, launch, m_bucket, padded_rank, rank_dots, target_programs

DECODE_MAX_M = 16  # forward batches up to this many rows take the decode path


def _prune_gemm(cs, nargs, **kw):
    """The autotuner's filter: the configs of the device's arch, dtype and flags that fit the shape."""
    p = nargs["p_ptr"]
    allowed = configs.multi_gemm_configs(configs.device_arch(p.device), p.dtype, has_dropout=kw["HAS_DROPOUT"],
                                         block_r=kw["BLOCK_R"], decode=kw["DECODE"])  # fmt: skip
    return configs.prune(cs, allowed, {"BLOCK_M": nargs["M"], "BLOCK_N": nargs["N"]})


# ----------------------------------------------------------------------------
# jit helpers
# ----------------------------------------------------------------------------


@triton.jit
def _adapter_range(ids, valid):
    """(lo, hi): the smallest and largest adapter (>= 0) among the valid rows of a
    tile; lo > hi when the tile has none. On sorted rows every adapter in
    [lo, hi] with rows in the tile is contiguous there."""
    lo = tl.min(tl.where(valid & (ids >= 0), ids, 1 << 30), axis=0)
    hi = tl.max(tl.where(valid, ids, -1), axis=0)
    return lo, hi


@triton.jit
def _multi_epilogue(
    acc,  # [BLOCK_M, BLOCK_N] fp32: the main loop's P Q tile
    p,  # [BLOCK_M] int32 positions of the tile: sorted positions, or rows with DECODE
    rows,  # [BLOCK_M] int64 rows of x (the output's rows)
    rn,  # [BLOCK_N] int64 output columns
    mask_m,
    mask_n,
    pid_m,
    pid_n,
    l_ptr,  # [M, R] LoRA left (S, or dS sorted when L_SORTED)
    e_ptr,  # [n, R, N] LoRA right per adapter, via strides
    bias_ptr,  # [N] (HAS_BIAS)
    out_ptr,  # [M, N] written once, rows in x's order
    ids_ptr,  # [M] int32 adapter per sorted position (per row with DECODE)
    scale_ptr,  # [n] fp32 (ROW_SCALE)
    M,
    N,
    R,
    stride_lm,
    stride_lr,
    stride_ea,
    stride_er,
    stride_en,
    stride_om,
    stride_on,
    seed,
    keep_levels,
    inv_keep,
    HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    ROW_SCALE: tl.constexpr,
    L_SORTED: tl.constexpr,
    DECODE: tl.constexpr,
    IEEE: tl.constexpr,
    DTYPE: tl.constexpr,  # the activations' dtype (the tensor-core dots')
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    R_CHUNK: tl.constexpr,
):
    """OUT[rows] = acc + D(c[a] * L[row] E[a]) + bias, the tile's only store (the
    epilogue of the dense and the 4-bit multi GEMMs; see :func:`_multi_gemm_kernel`)."""
    if DECODE:
        # NOTE: rows in order; row i's LoRA term from its own E[a] (fp32 products),
        # added to row i only: BLOCK_M small GEMVs instead of BLOCK_M masked dots.
        rr = tl.arange(0, BLOCK_R)
        mask_r = rr < R
        for i in tl.static_range(BLOCK_M):
            row = pid_m * BLOCK_M + i
            a = tl.load(ids_ptr + row, mask=row < M, other=-1)
            if a >= 0:
                l_row = tl.load(l_ptr + row.to(tl.int64) * stride_lm + rr * stride_lr, mask=mask_r, other=0.0).to(tl.float32)
                if ROW_SCALE:
                    l_row = l_row * tl.load(scale_ptr + a)
                e = tl.load(e_ptr + a.to(tl.int64) * stride_ea + rr[:, None] * stride_er + rn[None, :] * stride_en,
                            mask=mask_r[:, None] & mask_n[None, :], other=0.0)  # fmt: skip
                term = tl.sum(l_row[:, None] * e.to(tl.float32), axis=0)
                acc += tl.where((p == row)[:, None], term[None, :], 0.0)
    else:
        ids = tl.load(ids_ptr + p, mask=mask_m, other=-1)
        lo, hi = _adapter_range(ids, mask_m)
        l_rows = p.to(tl.int64) if L_SORTED else rows
        if HAS_DROPOUT:
            # NOTE: the mask applies to the LoRA term only: its own [BM, BN] registers.
            term = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        else:
            term = acc
        for a in range(lo, hi + 1):
            # NOTE: L loaded with the adapter's rows as the mask (each row read once;
            # no masked copy of an [BM, R] tile kept live beside the accumulator).
            scale = tl.load(scale_ptr + a) if ROW_SCALE else 1.0
            if HAS_DROPOUT:
                scale = scale * tl.cast(inv_keep, tl.float32)
            term = rank_dots(term, l_ptr, e_ptr + a * stride_ea, l_rows, rn, mask_m & (ids == a), mask_n, R,
                             stride_lm, stride_lr, stride_er, stride_en, scale,
                             IEEE, DTYPE, BLOCK_R, R_CHUNK)  # fmt: skip
        if HAS_DROPOUT:
            keep = keep_mask(seed, rows, pid_n * BLOCK_N, N, keep_levels, BLOCK_M, BLOCK_N)
            acc += tl.where(keep, term, 0.0)
        else:
            acc = term
    acc = add_bias(acc, bias_ptr, rn, mask_n, HAS_BIAS)
    out_ptrs = out_ptr + rows[:, None] * stride_om + rn[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# ----------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------


@triton.jit(do_not_specialize=["seed"])
def _multi_shrink_kernel(
    x_ptr,  # [M, K] input (any strides), rows read through perm
    a_ptr,  # [n, R, K] lora_A
    s_ptr,  # [M, R] output S, rows in x's order, x's dtype
    perm_ptr,  # [M] int32: sorted position -> row of x
    sids_ptr,  # [M] int32: the adapter of each sorted position (-1 = base)
    M,
    K,
    R,
    stride_xm,
    stride_xk,
    stride_an,
    stride_ar,
    stride_ak,
    stride_sm,
    stride_sr,
    seed,
    keep_levels,
    inv_keep,
    HAS_DROPOUT: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """S[perm[p]] = D(X)[perm[p]] A[sids[p]]^T for the BLOCK_M sorted positions p of a program.

    For each adapter present in the tile, a K loop over the tile with only that
    adapter's rows loaded (others masked to zero; base rows get nothing: S = 0
    there). fp32 accumulator, scaled by 1/keep at the end.
    """
    pid = tl.program_id(0)
    p = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = p < M
    rows = tl.load(perm_ptr + p, mask=mask_m, other=0).to(tl.int64)
    ids = tl.load(sids_ptr + p, mask=mask_m, other=-1)
    lo, hi = _adapter_range(ids, mask_m)
    rk = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    mask_r = rr < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    # NOTE: adapters outside, K inside, and x loaded with the adapter's rows as
    # the mask: each row of x is still read once, and no masked copy of the x
    # tile is live next to it (that copy spilled on sm_80 / sm_90).
    for a in range(lo, hi + 1):
        sel = mask_m & (ids == a)
        for k0 in range(0, K, BLOCK_K):
            mask_k = (k0 + rk) < K
            x = tl.load(x_ptr + rows[:, None] * stride_xm + (k0 + rk)[None, :] * stride_xk,
                        mask=sel[:, None] & mask_k[None, :], other=0.0)  # fmt: skip
            if HAS_DROPOUT:
                keep = keep_mask(seed, rows, k0, K, keep_levels, BLOCK_M, BLOCK_K)
                x = tl.where(keep, x, tl.zeros_like(x))
            a_t = tl.load(a_ptr + a * stride_an + rr[None, :] * stride_ar + (k0 + rk)[:, None] * stride_ak,
                          mask=mask_k[:, None] & mask_r[None, :], other=0.0)  # fmt: skip
            acc = dot_acc(x, a_t, acc, IEEE)
    if HAS_DROPOUT:
        acc = acc * tl.cast(inv_keep, tl.float32)
    s_ptrs = s_ptr + rows[:, None] * stride_sm + rr[None, :] * stride_sr
    tl.store(s_ptrs, acc.to(s_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_r[None, :])


@triton.jit(do_not_specialize=["seed"])
def _decode_shrink_kernel(
    x_ptr,  # [M, K] input (any strides)
    a_ptr,  # [n, R, K] lora_A
    s_ptr,  # [M, R] output S, x's dtype
    ids_ptr,  # [M] int32 adapter ids (-1 = base), x's row order
    M,
    K,
    R,
    stride_xm,
    stride_xk,
    stride_an,
    stride_ar,
    stride_ak,
    stride_sm,
    stride_sr,
    seed,
    keep_levels,
    inv_keep,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """S[m] = D(X)[m] A[ids[m]]^T, one program per row m (a GEMV, fp32 products
    and sums; no tensor-core tile, so nothing is padded to BLOCK_M rows)."""
    m = tl.program_id(0)
    row = (m + tl.arange(0, 1)).to(tl.int64)  # [1]: the mask helper takes a row vector
    a = tl.load(ids_ptr + m)
    rk = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    mask_r = rr < R
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    if a >= 0:
        for k0 in range(0, K, BLOCK_K):
            mask_k = (k0 + rk) < K
            x = tl.load(x_ptr + row[:, None] * stride_xm + (k0 + rk)[None, :] * stride_xk, mask=mask_k[None, :], other=0.0)
            x = x.to(tl.float32)
            if HAS_DROPOUT:
                keep = keep_mask(seed, row, k0, K, keep_levels, 1, BLOCK_K)
                x = tl.where(keep, x, 0.0)
            a_t = tl.load(a_ptr + a.to(tl.int64) * stride_an + rr[:, None] * stride_ar + (k0 + rk)[None, :] * stride_ak,
                          mask=mask_r[:, None] & mask_k[None, :], other=0.0)  # fmt: skip
            acc += tl.sum(a_t.to(tl.float32) * x, axis=1)
        if HAS_DROPOUT:
            acc = acc * tl.cast(inv_keep, tl.float32)
    tl.store(s_ptr + m.to(tl.int64) * stride_sm + rr * stride_sr, acc.to(s_ptr.dtype.element_ty), mask=mask_r)


@triton.autotune(
    configs=configs.all_multi_gemm_configs(),
    key=["M_BUCKET", "N", "K", "BLOCK_R", "HAS_BIAS", "HAS_DROPOUT", "DECODE", "ROW_SCALE", "L_SORTED"],
    prune_configs_by={"early_config_prune": lambda cs, nargs, **kw: _prune_gemm(cs, nargs, **kw)},
)
@triton.jit(do_not_specialize=["M_BUCKET", "seed"])
def _multi_gemm_kernel(
    p_ptr,  # [M, K] left operand: X (forward) or dY (dX), rows read through perm (sorted) or in order (DECODE)
    q_ptr,  # [K, N] right operand: W^T (forward) or W (dX), via strides
    l_ptr,  # [M, R] LoRA left: S (forward; x's row order) or dS (dX; fp32, sorted positions when L_SORTED)
    e_ptr,  # [n, R, N] LoRA right per adapter: B[a]^T (forward) or A[a] (dX), via strides
    bias_ptr,  # [N] (HAS_BIAS)
    out_ptr,  # [M, N] output Y or dX, rows in x's order, written once
    perm_ptr,  # [M] int32 sorted position -> row (unused with DECODE)
    ids_ptr,  # [M] int32: adapter per sorted position, or per row with DECODE (-1 = base)
    scale_ptr,  # [n] fp32 per-adapter scale (ROW_SCALE)
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
    stride_ea,
    stride_er,
    stride_en,
    stride_om,
    stride_on,
    seed,  # dropout seed; the mask is over the [M, N] output (= x's shape for dX)
    keep_levels,
    inv_keep,
    M_BUCKET,  # next_pow2(M): autotune key only
    HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    ROW_SCALE: tl.constexpr,
    L_SORTED: tl.constexpr,
    DECODE: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    R_CHUNK: tl.constexpr,  # rank columns per epilogue step (configs.multi_rank_chunk)
):
    """OUT[row] = P[row] Q + D(c[a] * L[row] E[a]) + bias with a = the row's adapter.

    Forward: Y = X W^T + scaling[a] * S B[a]^T + bias (L = S, E = B^T, c = scaling, no D)
    dX:      dX = dY W + D(dS A[a])                  (L = dS sorted, E = A, c = 1)
    The main loop is ``_common.gemm_tile`` (``kernels/lora.py``'s) in grouped
    tile order over sorted rows (gathered loads, scattered stores: rows stay
    contiguous in K and N). Epilogue, sorted: per adapter present in the tile,
    its rows of L (a masked load) times E[a] (``_common.rank_dots``, the rank in
    steps of R_CHUNK), then one dropout mask over the summed term. DECODE (rows in order, one tile): each row's term from its own E[a],
    fp32 products, added to that row of the tile.
    """
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    p = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = p < M
    if DECODE:
        rows = p.to(tl.int64)
    else:
        rows = tl.load(perm_ptr + p, mask=mask_m, other=0).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_n = rn < N
    acc = gemm_tile(p_ptr, q_ptr, rows, rn, mask_m, mask_n, K, stride_pm, stride_pk, stride_qk, stride_qn,
                    IEEE, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
    _multi_epilogue(acc, p, rows, rn, mask_m, mask_n, pid_m, pid_n, l_ptr, e_ptr, bias_ptr, out_ptr, ids_ptr, scale_ptr,
                    M, N, R, stride_lm, stride_lr, stride_ea, stride_er, stride_en, stride_om, stride_on,
                    seed, keep_levels, inv_keep, HAS_BIAS, HAS_DROPOUT, ROW_SCALE, L_SORTED, DECODE, IEEE,
                    p_ptr.dtype.element_ty, BLOCK_R, BLOCK_M, BLOCK_N, R_CHUNK)  # fmt: skip


@triton.jit(do_not_specialize=["seed"])
def _multi_qgemm_kernel(
    p_ptr,  # [M, RED] left operand: X (forward) or dY (dX), rows read through perm (sorted) or in order (DECODE)
    packed_ptr,  # W [N_w, K_w] packed 4-bit codes (nf4.py's layout)
    quant_map_ptr,  # [16] fp32
    absmax_ptr,  # [nblocks] fp32 or uint8 codes (NESTED)
    nested_absmax_ptr,  # fp32 (NESTED only)
    nested_map_ptr,  # [256] fp32 (NESTED only)
    offset_ptr,  # [] fp32 (NESTED only)
    l_ptr,  # [M, R] LoRA left: S (forward; x's row order) or dS (dX; fp32, sorted positions when L_SORTED)
    e_ptr,  # [n, R, N] LoRA right per adapter: B[a]^T (forward) or A[a] (dX), via strides
    bias_ptr,  # [N] (HAS_BIAS)
    out_ptr,  # [M, N] output Y or dX, rows in x's order, written once
    perm_ptr,  # [M] int32 sorted position -> row (unused with DECODE)
    ids_ptr,  # [M] int32: adapter per sorted position, or per row with DECODE (-1 = base)
    scale_ptr,  # [n] fp32 per-adapter scale (ROW_SCALE)
    M,
    N,  # output columns (N forward, K for dX)
    K,  # the reduction length (K forward, N for dX)
    R,
    K_w,  # in_features of W: the row length of its flattened layout
    stride_pm,
    stride_pk,
    stride_lm,
    stride_lr,
    stride_ea,
    stride_er,
    stride_en,
    stride_om,
    stride_on,
    seed,
    keep_levels,
    inv_keep,
    W_ROWS_ARE_OUT: tl.constexpr,  # True: the output columns index W's rows (forward, Y = X deq(W)^T)
    BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    ROW_SCALE: tl.constexpr,
    L_SORTED: tl.constexpr,
    DECODE: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    R_CHUNK: tl.constexpr,
):
    """:func:`_multi_gemm_kernel` on a 4-bit base weight (QLoRA's ``dequant_in_gemm``):

    Forward: Y = X deq(W)^T + scaling[a] * S B[a]^T + bias   (W_ROWS_ARE_OUT)
    dX:      dX = dY deq(W) + D(dS A[a])
    The main loop is ``nf4.qgemm_tile`` (``_qlora_gemm_kernel``'s: each
    [BLOCK_K, BLOCK_N] tile of W dequantized in registers from its packed codes
    and absmax, rounded to P's dtype) over the same rows as the dense kernel
    (gathered through perm, or in order with DECODE); the per-adapter epilogue
    is the dense kernel's (:func:`_multi_epilogue`). No [N, K] weight exists.
    """
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    p = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = p < M
    if DECODE:
        rows = p.to(tl.int64)
    else:
        rows = tl.load(perm_ptr + p, mask=mask_m, other=0).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_n = rn < N
    acc = nf4.qgemm_tile(
        p_ptr, packed_ptr, quant_map_ptr, absmax_ptr, nested_absmax_ptr, nested_map_ptr, offset_ptr,
        rows, rn, mask_m, mask_n, K, K_w, stride_pm, stride_pk,
        W_ROWS_ARE_OUT, BLOCKSIZE, NESTED, NESTED_BLOCKSIZE, IEEE, BLOCK_M, BLOCK_N, BLOCK_K,
    )  # fmt: skip
    _multi_epilogue(acc, p, rows, rn, mask_m, mask_n, pid_m, pid_n, l_ptr, e_ptr, bias_ptr, out_ptr, ids_ptr, scale_ptr,
                    M, N, R, stride_lm, stride_lr, stride_ea, stride_er, stride_en, stride_om, stride_on,
                    seed, keep_levels, inv_keep, HAS_BIAS, HAS_DROPOUT, ROW_SCALE, L_SORTED, DECODE, IEEE,
                    p_ptr.dtype.element_ty, BLOCK_R, BLOCK_M, BLOCK_N, R_CHUNK)  # fmt: skip


@triton.jit
def _multi_dy_kernel(
    dy_ptr,  # [M, N] upstream gradient (any strides), rows read through perm
    b_ptr,  # [n, N, R] lora_B
    s_ptr,  # [M, R] S saved by the forward (x's row order)
    scale_ptr,  # [n] fp32 per-adapter scale
    perm_ptr,  # [M] int32 sorted position -> row
    seg_ptr,  # [n + 2] int32: segment j (0 = base, a + 1 = adapter a) is sorted [seg[j], seg[j + 1])
    ds_ptr,  # [M, R] fp32 output dS at sorted positions (NEED_DS)
    db_ptr,  # [n, N, R] output dB, lora_B's dtype (NEED_DB)
    dbias_ptr,  # [N] output dbias, dY's dtype (NEED_DBIAS)
    ws_ds_ptr,  # [cdiv(N, BLOCK_N), M, BLOCK_R] fp32: dS partial per column block
    ws_db_ptr,  # [n * SPLIT_M, N, BLOCK_R] fp32: dB partial per (adapter, split)
    ws_dbias_ptr,  # [(n + 1) * SPLIT_M, N] fp32: dbias partial per (segment, split)
    cnt_m_ptr,  # [cdiv(M, BLOCK_M) + n + 1] int32, zeroed: column blocks done per row block
    cnt_db_ptr,  # [n * cdiv(N, BLOCK_N)] int32, zeroed: splits done per (adapter, column block)
    cnt_dbias_ptr,  # [cdiv(N, BLOCK_N)] int32, zeroed: (segment, split) programs done per column block
    M,
    N,
    R,
    stride_dym,
    stride_dyn,
    stride_ba,
    stride_bn,
    stride_br,
    stride_sm,
    stride_sr,
    SPLIT_M,  # programs per segment; program (., j, s) takes the segment's row blocks s, s + SPLIT_M, ...
    NEED_DS: tl.constexpr,
    NEED_DB: tl.constexpr,
    NEED_DBIAS: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One read of dY, segment by segment, for the three rank-r gradients:

      dS[p]  = scaling[a] * dY[row] B[a]            [M, R]     (reduced over N)
      dB[a]  = scaling[a] * sum_{rows of a} dY^T S  [n, N, R]  (reduced over the segment)
      dbias  = sum_m dY                             [N]        (reduced over all rows)

    Grid (cdiv(N, BLOCK_N), n + 1, SPLIT_M): program (c, j, s) owns column block
    c of segment j (j = 0: the base rows, only for dbias) and walks the
    segment's row blocks s, s + SPLIT_M, ... (blocks aligned to the segment's
    start, so each holds one adapter). Cross-program sums are deterministic:
    partials go to fp32 workspaces and the last program to arrive at a
    block's int32 counter adds them in index order (``kernels/lora.py``'s
    pattern). Row block mb of segment j uses counter (seg[j] + mb * BLOCK_M)
    // BLOCK_M + j, distinct for every (j, mb) with rows.
    """
    pid_n = tl.program_id(0)
    j = tl.program_id(1)
    pid_s = tl.program_id(2)
    n_adapters = tl.num_programs(1) - 1
    n_blocks = tl.cdiv(N, BLOCK_N)
    a = j - 1
    a_safe = tl.maximum(a, 0).to(tl.int64)
    st = tl.load(seg_ptr + j)
    en = tl.load(seg_ptr + j + 1)
    seg_blocks = tl.cdiv(en - st, BLOCK_M)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rr = tl.arange(0, BLOCK_R)
    mask_n = rn < N
    mask_r = rr < R
    scaling = tl.load(scale_ptr + a_safe)
    if not NEED_DBIAS:
        seg_blocks = tl.where(a >= 0, seg_blocks, 0)  # the base rows only matter for dbias
    db_acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if NEED_DS:
        b = tl.load(b_ptr + a_safe * stride_ba + rn[:, None] * stride_bn + rr[None, :] * stride_br,
                    mask=mask_n[:, None] & mask_r[None, :], other=0.0)  # fmt: skip
    for mb in range(pid_s, seg_blocks, SPLIT_M):
        p = st + mb * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = p < en
        rows = tl.load(perm_ptr + p, mask=mask_m, other=0).to(tl.int64)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + rn[None, :] * stride_dyn,
                     mask=mask_m[:, None] & mask_n[None, :], other=0.0)  # fmt: skip
        if NEED_DBIAS:
            dbias_acc += tl.sum(dy.to(tl.float32), axis=0)
        if a >= 0:
            if NEED_DB:
                s = tl.load(s_ptr + rows[:, None] * stride_sm + rr[None, :] * stride_sr,
                            mask=mask_m[:, None] & mask_r[None, :], other=0.0)  # fmt: skip
                db_acc = dot_acc(tl.trans(dy), s, db_acc, IEEE)
            if NEED_DS:
                part = dot_acc(dy, b, tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32), IEEE)
                mask_mr = mask_m[:, None] & mask_r[None, :]
                out_off = p.to(tl.int64)[:, None] * R + rr[None, :]
                if n_blocks == 1:
                    tl.store(ds_ptr + out_off, part * scaling, mask=mask_mr)
                else:
                    ws_off = p.to(tl.int64)[:, None] * BLOCK_R + rr[None, :]
                    block_stride = tl.cast(M, tl.int64) * BLOCK_R
                    last, total = arrive_and_sum(ws_ds_ptr, block_stride, ws_off, mask_mr, part, pid_n, n_blocks,
                                                 cnt_m_ptr + (st + mb * BLOCK_M) // BLOCK_M + j)  # fmt: skip
                    if last:
                        tl.store(ds_ptr + out_off, total * scaling, mask=mask_mr)

    mask_nr = mask_n[:, None] & mask_r[None, :]
    db_off = a_safe * N * R + rn[:, None] * R + rr[None, :]
    if NEED_DB:
        if a >= 0:
            if SPLIT_M == 1:
                tl.store(db_ptr + db_off, (db_acc * scaling).to(db_ptr.dtype.element_ty), mask=mask_nr)
            else:
                split_stride = tl.cast(N, tl.int64) * BLOCK_R
                ws_off = rn[:, None] * BLOCK_R + rr[None, :]
                ws_base = ws_db_ptr + a_safe * SPLIT_M * split_stride
                last, db_tot = arrive_and_sum(ws_base, split_stride, ws_off, mask_nr, db_acc, pid_s, SPLIT_M,
                                              cnt_db_ptr + a_safe * n_blocks + pid_n)  # fmt: skip
                if last:
                    tl.store(db_ptr + db_off, (db_tot * scaling).to(db_ptr.dtype.element_ty), mask=mask_nr)
    if NEED_DBIAS:
        parts = (n_adapters + 1) * SPLIT_M
        ws_row = tl.cast(N, tl.int64)
        last, dbias_tot = arrive_and_sum(ws_dbias_ptr, ws_row, rn, mask_n, dbias_acc, j * SPLIT_M + pid_s, parts,
                                         cnt_dbias_ptr + pid_n)  # fmt: skip
        if last:
            tl.store(dbias_ptr + rn, dbias_tot.to(dbias_ptr.dtype.element_ty), mask=mask_n)


@triton.jit(do_not_specialize=["seed"])
def _multi_down_grad_kernel(
    ds_ptr,  # [M, R] fp32 dS at sorted positions
    x_ptr,  # [M, K] input saved by the forward (any strides), rows read through perm
    da_ptr,  # [n, R, K] output dA, x's dtype
    perm_ptr,  # [M] int32 sorted position -> row
    seg_ptr,  # [n + 2] int32 segment bounds (see _multi_dy_kernel)
    ws_ptr,  # [n * SPLIT_M, BLOCK_R, K] fp32: dA partial per (adapter, split)
    cnt_ptr,  # [n * cdiv(K, BLOCK_K)] int32, zeroed: splits done per (adapter, column block)
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
    IEEE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """dA[a] = sum over adapter a's rows of dS^T D(X) -> [n, R, K].

    Grid (cdiv(K, BLOCK_K), n, SPLIT_M): program (c, a, s) walks row blocks s,
    s + SPLIT_M, ... of adapter a's segment into a [BLOCK_R, BLOCK_K] fp32
    tile; splits summed in index order by the last to arrive; scaled by 1/keep.
    An adapter without rows gets zeros.
    """
    pid_k = tl.program_id(0)
    a = tl.program_id(1)
    pid_s = tl.program_id(2)
    k_blocks = tl.cdiv(K, BLOCK_K)
    st = tl.load(seg_ptr + a + 1)
    en = tl.load(seg_ptr + a + 2)
    seg_blocks = tl.cdiv(en - st, BLOCK_M)
    rk = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    rr = tl.arange(0, BLOCK_R)
    mask_k = rk < K
    mask_r = rr < R
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for mb in range(pid_s, seg_blocks, SPLIT_M):
        p = st + mb * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = p < en
        rows = tl.load(perm_ptr + p, mask=mask_m, other=0).to(tl.int64)
        ds_t = tl.load(ds_ptr + rr[:, None] * stride_dsr + p.to(tl.int64)[None, :] * stride_dsm,
                       mask=mask_r[:, None] & mask_m[None, :], other=0.0)  # fmt: skip
        x = tl.load(x_ptr + rows[:, None] * stride_xm + rk[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if HAS_DROPOUT:
            keep = keep_mask(seed, rows, pid_k * BLOCK_K, K, keep_levels, BLOCK_M, BLOCK_K)
            x = tl.where(keep, x, tl.zeros_like(x))
        acc = dot_f32_lhs(ds_t.to(tl.float32), x, acc, IEEE)
    mask_rk = mask_r[:, None] & mask_k[None, :]
    out_off = a.to(tl.int64) * R * K + rr[:, None] * K + rk[None, :]
    if SPLIT_M == 1:
        if HAS_DROPOUT:
            acc = acc * tl.cast(inv_keep, tl.float32)
        tl.store(da_ptr + out_off, acc.to(da_ptr.dtype.element_ty), mask=mask_rk)
    else:
        split_stride = tl.cast(K, tl.int64) * BLOCK_R
        ws_off = rr[:, None] * K + rk[None, :]
        ws_base = ws_ptr + a.to(tl.int64) * SPLIT_M * split_stride
        last, total = arrive_and_sum(ws_base, split_stride, ws_off, mask_rk, acc, pid_s, SPLIT_M, cnt_ptr + a * k_blocks + pid_k)
        if last:
            if HAS_DROPOUT:
                total = total * tl.cast(inv_keep, tl.float32)
            tl.store(da_ptr + out_off, total.to(da_ptr.dtype.element_ty), mask=mask_rk)


# ----------------------------------------------------------------------------
# launch plumbing
# ----------------------------------------------------------------------------

def split_rows(device: torch.device, row_blocks: int, other_programs: int) -> int:
    """SPLIT_M of the per-segment reductions: enough programs per segment to fill
    the device next to ``other_programs`` (columns x segments), at most one per
    row block. (Tests patch this to force the split reductions on tiny shapes.)"""
    return max(1, min(row_blocks, triton.cdiv(target_programs(device), max(other_programs, 1))))


class SortedRows:
    """The rows of a call in adapter order, from torch ops (no host sync):

    ``perm`` [M] int32 (sorted position -> row of x; a stable argsort, so each
    adapter's rows keep x's order), ``ids`` [M] int32 (the adapter at each
    sorted position), ``seg`` [n + 2] int32 (segment j = 0 the base rows,
    j = a + 1 adapter a's, is sorted positions [seg[j], seg[j + 1])).
    """

    def __init__(self, adapter_ids: Tensor, n_adapters: int) -> None:
        ids = adapter_ids.reshape(-1).to(torch.int64)
        order = torch.argsort(ids, stable=True)
        sorted_ids = ids.index_select(0, order)
        probes = torch.arange(-1, n_adapters + 1, dtype=torch.int64, device=ids.device)
        self.m = ids.numel()
        self.n = n_adapters
        self.perm = order.to(torch.int32)
        self.ids = sorted_ids.to(torch.int32)
        self.seg = torch.searchsorted(sorted_ids, probes).to(torch.int32)

    def check(self) -> None:
        """Raise a ValueError naming adapter_ids if an id is outside [-1, n) (one host read)."""
        first, last = self.seg[0].item(), self.seg[-1].item()
        if first != 0 or last != self.m:
            lo, hi = int(self.ids[0]), int(self.ids[-1])
            raise ValueError(
                f"adapter_ids must be in [-1, {self.n}) (-1 = the base alone; {self.n} = lora_A.shape[0] adapters), "
                f"got values from {lo} to {hi}"
            )


def _check_ids_decode(ids: Tensor, n_adapters: int) -> None:
    if ids.numel():
        lo, hi = torch.aminmax(ids)
        lo, hi = int(lo), int(hi)
        if lo < -1 or hi >= n_adapters:
            raise ValueError(
                f"adapter_ids must be in [-1, {n_adapters}) (-1 = the base alone; {n_adapters} = lora_A.shape[0] "
                f"adapters), got values from {lo} to {hi}"
            )


# ----------------------------------------------------------------------------
# launchers: the building blocks
# ----------------------------------------------------------------------------


def multi_shrink(x: Tensor, lora_A: Tensor, rows: SortedRows | None, ids: Tensor, dropout_p: float = 0.0,
                 seed: int = 0) -> Tensor:  # fmt: skip
    """S[m] = dropout(x)[m] A[ids[m]]^T (zero on base rows): x [M, K], lora_A [n, r, K]
    -> S [M, r] in x's dtype, rows in x's order. ``rows`` (sorted) or None (decode:
    one program per row, ``ids`` [M] int32 in x's order). 1 launch (0 if M == 0)."""
    check_dtype(x, "x")
    m, k = x.shape
    n, r = lora_A.shape[0], lora_A.shape[1]
    expect(lora_A, (n, r, k), "lora_A", "[n, r, K]")
    s = torch.empty((m, r), dtype=x.dtype, device=x.device)
    if m == 0:
        return s
    has_dropout, keep_levels, inv_keep = dropout_args(dropout_p)
    block_r = padded_rank(r)
    arch = configs.device_arch(x.device)
    common = (m, k, r, x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), lora_A.stride(2),
              s.stride(0), s.stride(1), int(seed), keep_levels, inv_keep)  # fmt: skip
    if rows is None:
        cfg = configs.pick(configs.multi_decode_shrink_configs(arch, x.dtype, has_dropout=has_dropout, block_r=block_r), {"BLOCK_K": k})
        launch(_decode_shrink_kernel, (m,), x.device, x, lora_A, s, ids, *common,
                HAS_DROPOUT=has_dropout, BLOCK_R=block_r, BLOCK_K=cfg.kwargs["BLOCK_K"],
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)  # fmt: skip
        return s
    cfg = configs.pick(configs.multi_shrink_configs(arch, x.dtype, has_dropout=has_dropout, block_r=block_r), {"BLOCK_M": m, "BLOCK_K": k})
    bm, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_K"]
    launch(_multi_shrink_kernel, (triton.cdiv(m, bm),), x.device, x, lora_A, s, rows.perm, rows.ids, *common,
            HAS_DROPOUT=has_dropout, IEEE=x.dtype == torch.float32, BLOCK_R=block_r, BLOCK_M=bm, BLOCK_K=bk,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)  # fmt: skip
    return s


def _gemm(p, base, l, l_sorted, e, e_strides, bias, out_n, rows, ids, scaling, dropout_p, seed, decode, forward):
    """OUT [M, out_n] = P Q + D(c[a] * L E[a]) + bias (see ``_multi_gemm_kernel``): Q is
    the dense weight's W^T (``forward``) or W, or the same of a 4-bit ``QuantizedWeight``
    (then ``_multi_qgemm_kernel``, W dequantized in its tiles); E given by its strides
    (adapter, r, n)."""
    m, k = p.shape
    r = l.shape[1]
    out = torch.empty((m, out_n), dtype=p.dtype, device=p.device)
    if m == 0 or out_n == 0:
        return out
    has_dropout, keep_levels, inv_keep = dropout_args(dropout_p)
    perm = rows.perm if rows is not None else ids
    row_ids = rows.ids if rows is not None else ids
    arch = configs.device_arch(p.device)
    block_r = padded_rank(r)
    common = (l, e, bias if bias is not None else out, out, perm, row_ids, scaling if scaling is not None else out)
    flags = dict(HAS_BIAS=bias is not None, HAS_DROPOUT=has_dropout, ROW_SCALE=scaling is not None, L_SORTED=l_sorted,
                 DECODE=decode, IEEE=p.dtype == torch.float32, BLOCK_R=block_r,
                 R_CHUNK=configs.multi_rank_chunk(arch, block_r, p.dtype))  # fmt: skip
    strides = (l.stride(0), l.stride(1), e_strides[0], e_strides[1], e_strides[2], out.stride(0), out.stride(1),
               int(seed), keep_levels, inv_keep)  # fmt: skip
    if isinstance(base, QuantizedWeight):
        cfg = configs.pick(configs.multi_qgemm_configs(arch, p.dtype, has_dropout=has_dropout, block_r=block_r, decode=decode),
                           {"BLOCK_M": m, "BLOCK_N": out_n})  # fmt: skip
        grid = (triton.cdiv(m, cfg.kwargs["BLOCK_M"]) * triton.cdiv(out_n, cfg.kwargs["BLOCK_N"]),)
        launch(
            _multi_qgemm_kernel, grid, p.device,
            p, *nf4.state_args(base), *common, m, out_n, k, r, base.shape[1], p.stride(0), p.stride(1), *strides,
            W_ROWS_ARE_OUT=forward, **nf4.state_meta(base), **flags, **cfg.kwargs,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
        return out
    q_strides = (base.stride(1), base.stride(0)) if forward else (base.stride(0), base.stride(1))
    launch(
        _multi_gemm_kernel,
        lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(out_n, meta["BLOCK_N"]),),
        p.device,
        p, base, *common, m, out_n, k, r, p.stride(0), p.stride(1), q_strides[0], q_strides[1], *strides, m_bucket(m),
        **flags,
    )  # fmt: skip
    return out


def multi_expand_gemm(x: Tensor, weight: Tensor | QuantizedWeight, s: Tensor, lora_B: Tensor, scaling: Tensor,
                      rows: SortedRows | None, ids: Tensor, bias: Tensor | None = None) -> Tensor:  # fmt: skip
    """Y[m] = x[m] W^T + scaling[a] * S[m] B[a]^T + bias (a = the row's adapter) in one
    GEMM: x [M, K], weight [N, K] (dense, or a 4-bit ``QuantizedWeight`` dequantized in
    the GEMM's tiles), s [M, r] (x's row order), lora_B [n, N, r], scaling [n] fp32 ->
    Y [M, N] in x's dtype. ``rows`` sorted, or None (decode: ``ids`` [M] int32 in x's
    order, one BLOCK_M = 16 tile of rows). 1 launch."""
    check_dtype(x, "x")
    n, n_out, r = lora_B.shape
    _expect_base(weight, (n_out, x.shape[1]), x.device)
    expect(s, (x.shape[0], r), "s", "[M, r]")
    return _gemm(
        x, weight, s, False, lora_B, (lora_B.stride(0), lora_B.stride(2), lora_B.stride(1)), bias, n_out, rows, ids,
        scaling.to(torch.float32).contiguous(), 0.0, 0, rows is None, True,
    )  # fmt: skip


def multi_dx_gemm(dy: Tensor, weight: Tensor | QuantizedWeight, ds_sorted: Tensor, lora_A: Tensor, rows: SortedRows,
                  dropout_p: float = 0.0, seed: int = 0) -> Tensor:  # fmt: skip
    """dX[m] = dY[m] W + D(dS[m] A[a]) in one GEMM: dy [M, N], weight [N, K] (dense or
    4-bit, as :func:`multi_expand_gemm`), ds_sorted [M, r] fp32 (already scaled, at
    sorted positions), lora_A [n, r, K] -> dX [M, K] in dy's dtype, D = the forward's
    mask / keep. 1 launch."""
    check_dtype(dy, "dy")
    n, r, k = lora_A.shape
    _expect_base(weight, (dy.shape[1], k), dy.device)
    return _gemm(
        dy, weight, ds_sorted, True, lora_A, (lora_A.stride(0), lora_A.stride(1), lora_A.stride(2)), None, k, rows,
        None, None, dropout_p, seed, False, False,
    )  # fmt: skip


def _expect_base(weight, shape: tuple[int, int], device: torch.device) -> None:
    if isinstance(weight, QuantizedWeight):
        if weight.device != device:
            raise ValueError(f"qweight is on {weight.device} but the activations are on {device}")
        if tuple(weight.shape) != tuple(shape):
            raise ValueError(f"qweight must have shape [N, K] = {list(shape)}, got {list(weight.shape)}")
    else:
        expect(weight, shape, "weight", "[N, K]")


def multi_dy_pass(dy: Tensor, lora_B: Tensor, s: Tensor, scaling: Tensor, rows: SortedRows, need_ds: bool = True,
                  need_db: bool = True, need_dbias: bool = False):  # fmt: skip
    """One pass over dY, segment by segment: ``(dS, dB, dbias)``, each None unless requested.

    dy [M, N], lora_B [n, N, r], s [M, r] (x's row order), scaling [n] ->
      dS [M, r] fp32 at **sorted positions** (scaling[a] dY[m] B[a]; garbage on base rows,
      which nothing reads), dB [n, N, r] in lora_B's dtype (zeros for adapters without
      rows), dbias [N] in dy's dtype. 1 launch (plus a zero-fill of its counters).
    """
    check_dtype(dy, "dy")
    m, n_out = dy.shape
    n, _, r = lora_B.shape
    expect(lora_B, (n, n_out, r), "lora_B", "[n, N, r]")
    expect(s, (m, r), "s", "[M, r]")
    dev = dy.device
    ds = torch.empty((m, r), dtype=torch.float32, device=dev) if need_ds else None
    db = torch.empty((n, n_out, r), dtype=lora_B.dtype, device=dev) if need_db else None
    dbias = torch.empty((n_out,), dtype=dy.dtype, device=dev) if need_dbias else None
    if not (need_ds or need_db or need_dbias):
        return ds, db, dbias
    if m == 0 or n_out == 0:
        return ds, (db.zero_() if db is not None else None), (dbias.zero_() if dbias is not None else None)
    block_r = padded_rank(r)
    cfg = configs.pick(configs.multi_dy_pass_configs(configs.device_arch(dev), dy.dtype, block_r=block_r), {"BLOCK_M": m, "BLOCK_N": n_out})
    bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
    n_blocks = triton.cdiv(n_out, bn)
    split = split_rows(dev, triton.cdiv(m, bm), n_blocks * (n + 1))
    m_counters = triton.cdiv(m, bm) + n + 1
    counters = torch.zeros((m_counters + n * n_blocks + n_blocks,), dtype=torch.int32, device=dev)
    f32 = torch.float32
    ws_ds = torch.empty((n_blocks, m, block_r) if need_ds and n_blocks > 1 else (1,), dtype=f32, device=dev)
    ws_db = torch.empty((n * split, n_out, block_r) if need_db and split > 1 else (1,), dtype=f32, device=dev)
    ws_dbias = torch.empty(((n + 1) * split, n_out) if need_dbias else (1,), dtype=f32, device=dev)
    dummy = counters
    launch(
        _multi_dy_kernel,
        (n_blocks, n + 1, split),
        dev,
        dy, lora_B, s, scaling.to(f32).contiguous(), rows.perm, rows.seg,
        ds if ds is not None else dummy, db if db is not None else dummy, dbias if dbias is not None else dummy,
        ws_ds, ws_db, ws_dbias,
        counters[:m_counters], counters[m_counters : m_counters + n * n_blocks], counters[m_counters + n * n_blocks :],
        m, n_out, r,
        dy.stride(0), dy.stride(1), lora_B.stride(0), lora_B.stride(1), lora_B.stride(2), s.stride(0), s.stride(1),
        split,
        NEED_DS=need_ds, NEED_DB=need_db, NEED_DBIAS=need_dbias, IEEE=dy.dtype == torch.float32, BLOCK_R=block_r,
        BLOCK_M=bm, BLOCK_N=bn, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return ds, db, dbias


def multi_down_grad(ds_sorted: Tensor, x: Tensor, n_adapters: int, rows: SortedRows, dropout_p: float = 0.0,
                    seed: int = 0) -> Tensor:  # fmt: skip
    """dA[a] = sum over adapter a's rows of dS^T dropout(x): ds_sorted [M, r] (sorted
    positions), x [M, K] -> dA [n, r, K] in x's dtype (zeros for adapters without
    rows). 1 launch; deterministic."""
    check_dtype(x, "x")
    m, k = x.shape
    r = ds_sorted.shape[1]
    expect(ds_sorted, (m, r), "ds", "[M, r]")
    dev = x.device
    da = torch.empty((n_adapters, r, k), dtype=x.dtype, device=dev)
    if m == 0 or k == 0:
        return da.zero_()
    has_dropout, keep_levels, inv_keep = dropout_args(dropout_p)
    block_r = padded_rank(r)
    cfg = configs.pick(configs.multi_down_grad_configs(configs.device_arch(dev), x.dtype, has_dropout=has_dropout, block_r=block_r),
               {"BLOCK_M": m, "BLOCK_K": k})  # fmt: skip
    bm, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_K"]
    k_blocks = triton.cdiv(k, bk)
    split = split_rows(dev, triton.cdiv(m, bm), k_blocks * n_adapters)
    counters = torch.zeros((n_adapters * k_blocks,), dtype=torch.int32, device=dev)
    ws = torch.empty((n_adapters * split, block_r, k) if split > 1 else (1,), dtype=torch.float32, device=dev)
    launch(
        _multi_down_grad_kernel,
        (k_blocks, n_adapters, split),
        dev,
        ds_sorted, x, da, rows.perm, rows.seg, ws, counters,
        m, k, r,
        ds_sorted.stride(0), ds_sorted.stride(1), x.stride(0), x.stride(1),
        int(seed), keep_levels, inv_keep, split,
        HAS_DROPOUT=has_dropout, IEEE=x.dtype == torch.float32, BLOCK_R=block_r,
        BLOCK_M=bm, BLOCK_K=bk, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return da


# ----------------------------------------------------------------------------
# the layer: the same pair as fastlora.reference
# ----------------------------------------------------------------------------


def lora_multi_forward(
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: Tensor,
    adapter_ids: Tensor,
    bias: Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """``y[m] = x[m] W^T + bias + scaling[a] * dropout(x)[m] A[a]^T B[a]^T``; returns ``(y, s)``.

    As ``fastlora.reference.lora_multi_forward`` (s [M, r] in x's row order, zero on
    base rows), the dropout mask from Triton's Philox (``kernels.lora``'s).
    2 launches: shrink, then the GEMM with the LoRA terms in its epilogue.
    M <= DECODE_MAX_M: the decode path (no sort). Ids outside [-1, n) raise a
    ValueError (one host read of the id range: a device sync on CUDA).
    """
    return _forward_on(x, weight, lora_A, lora_B, scaling, adapter_ids, bias, dropout_p, seed)


def _forward_on(x, base, lora_A, lora_B, scaling, adapter_ids, bias, dropout_p, seed):
    """:func:`lora_multi_forward` on a dense or a 4-bit ``base`` (dequantized in the GEMM)."""
    m = x.shape[0]
    n = lora_A.shape[0]
    if m <= DECODE_MAX_M:
        ids = adapter_ids.reshape(-1).to(torch.int32)
        _check_ids_decode(ids, n)
        rows = None
    else:
        rows = SortedRows(adapter_ids, n)
        rows.check()
        ids = rows.ids
    s = multi_shrink(x, lora_A, rows, ids, dropout_p, seed)
    y = multi_expand_gemm(x, base, s, lora_B, scaling, rows, ids, bias)
    return y, s


def lora_multi_backward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: Tensor,
    adapter_ids: Tensor,
    s: Tensor,
    dropout_p: float = 0.0,
    seed: int = 0,
    needs: tuple[bool, bool, bool, bool, bool] = (True, False, True, True, False),
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Gradients ``(dx, dweight, dA, dB, dbias)`` of :func:`lora_multi_forward`
    (formulas in ``fastlora.reference.lora_multi_backward``).

    The rows are sorted again (torch ops, no sync); then the dY pass (dS at sorted
    positions, dB, dbias: 1 launch), the dX GEMM (1), dA (1); dW = dY^T x by
    ``torch.mm`` only when requested. Deterministic; nothing saved is written to.
    """
    need_x, need_w, need_a, need_b, need_bias = needs
    n = lora_A.shape[0]
    rows = SortedRows(adapter_ids, n) if (need_x or need_a or need_b or need_bias) else None
    need_ds = need_x or need_a
    ds, db, dbias = (None, None, None)
    if rows is not None:
        ds, db, dbias = multi_dy_pass(dy, lora_B, s, scaling, rows, need_ds, need_b, need_bias)
    dx = multi_dx_gemm(dy, weight, ds, lora_A, rows, dropout_p, seed) if need_x else None
    da = multi_down_grad(ds, x, n, rows, dropout_p, seed) if need_a else None
    dw = torch.mm(dy.t(), x) if need_w else None
    return dx, dw, da, db, dbias


QLORA_STRATEGIES = ("dequant_in_gemm", "dequant_once")  # fastlora.strategies' "qlora_multi" names


def _check_qweight(qweight, device: torch.device) -> None:
    if not isinstance(qweight, QuantizedWeight):
        raise TypeError(f"qweight must be a fastlora.quant.QuantizedWeight, got {type(qweight).__name__}")
    if qweight.device != device:
        raise ValueError(f"qweight is on {qweight.device} but the activations are on {device}")


def _check_strategy(strategy: str) -> None:
    if strategy not in QLORA_STRATEGIES:
        raise ValueError(f"strategy must be one of {QLORA_STRATEGIES}, got {strategy!r}")


def qlora_multi_forward(
    x: Tensor,
    qweight: QuantizedWeight,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: Tensor,
    adapter_ids: Tensor,
    bias: Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int = 0,
    strategy: str = "dequant_in_gemm",
) -> tuple[Tensor, Tensor]:
    """:func:`lora_multi_forward` on a 4-bit base; ``strategy``:

    * ``dequant_in_gemm``: the shrink, then ``_multi_qgemm_kernel`` reading the packed
      4-bit weight in its main loop (no [N, K] tensor). 2 launches.
    * ``dequant_once``: one dequant launch (``nf4.dequantize_4bit``) into a transient
      [N, K] weight in x's dtype, freed on return, then the dense path. 3 launches.
    """
    _check_strategy(strategy)
    _check_qweight(qweight, x.device)
    base = nf4.dequantize_4bit(qweight, x.dtype) if strategy == "dequant_once" else qweight
    return _forward_on(x, base, lora_A, lora_B, scaling, adapter_ids, bias, dropout_p, seed)


def qlora_multi_backward(
    dy: Tensor,
    x: Tensor,
    qweight: QuantizedWeight,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: Tensor,
    adapter_ids: Tensor,
    s: Tensor,
    dropout_p: float = 0.0,
    seed: int = 0,
    needs: tuple[bool, bool, bool, bool, bool] = (True, False, True, True, False),
    strategy: str = "dequant_in_gemm",
) -> tuple[Tensor | None, None, Tensor | None, Tensor | None, Tensor | None]:
    """Gradients ``(dx, None, dA, dB, dbias)`` of :func:`qlora_multi_forward` (the
    4-bit weight is frozen: its slot is always None), then :func:`lora_multi_backward`'s
    3 launches; the dX GEMM reads the 4-bit weight (``dequant_in_gemm``) or a
    dequantized copy made for it (``dequant_once``: 1 more launch, only when dx is needed)."""
    _check_strategy(strategy)
    need_x, need_w, need_a, need_b, need_bias = needs
    if need_w:
        raise ValueError("qlora_multi_backward: the 4-bit base weight is frozen; it has no gradient")
    base = qweight
    if need_x:
        _check_qweight(qweight, dy.device)
        if strategy == "dequant_once":
            base = nf4.dequantize_4bit(qweight, dy.dtype)
    dx, _, da, db, dbias = lora_multi_backward(
        dy, x, base, lora_A, lora_B, scaling, adapter_ids, s, dropout_p, seed, (need_x, False, need_a, need_b, need_bias)
    )  # fmt: skip
    return dx, None, da, db, dbias


def dropout_keep_mask(seed: int, shape: tuple[int, int], p: float, device: torch.device) -> tuple[Tensor, float]:
    """The mask these kernels use: ``fastlora.kernels.lora.dropout_keep_mask`` (the same Philox stream)."""
    return lora.dropout_keep_mask(seed, shape, p, device)
