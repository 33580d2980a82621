"""Triton kernels of the LoRA linear layer and their launchers.

``y = x W^T + scaling * D(x) A^T B^T + bias``, D = dropout with a Philox mask
regenerated from an integer seed (never stored). Shapes (2-D; the autograd
layer flattens leading dims): x [M, K], weight [N, K], lora_A [r, K],
lora_B [N, r], bias [N], s = D(x) A^T [M, r].

Launches per layer (each goes through :func:`_launch`, counted exactly by
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

The file follows STYLE.md: jit helpers and kernels first, then launchers, then
the ``lora_forward`` / ``lora_backward`` pair that ``fastlora.functional`` calls
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

# ----------------------------------------------------------------------------
# jit helpers
# ----------------------------------------------------------------------------


@triton.jit
def _keep_mask(seed, rows, col0, n_cols, keep_levels, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
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
def _mma(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b; fp32 operands in IEEE precision (never TF32), so fp32
    matches torch's fp32 matmul; 16-bit operands accumulate in fp32."""
    if IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _mma_f32_lhs(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b for an fp32 ``a`` (a LoRA intermediate such as dS) and ``b``
    in the input dtype. For 16-bit inputs ``a`` is split into hi + lo in b's
    dtype (two tensor-core dots), keeping ~16 (bf16) / ~22 (fp16) bits of ``a``
    instead of rounding it to 8 / 11 bits first."""
    if IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        hi = a.to(b.dtype)
        lo = (a - hi.to(tl.float32)).to(b.dtype)
        acc = tl.dot(hi, b, acc)
        acc = tl.dot(lo, b, acc)
    return acc


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
    keep = _keep_mask(seed, rm, pid_k * BLOCK_K, K, keep_levels, BLOCK_M, BLOCK_K)
    ptrs = out_ptr + rm[:, None] * K + rk[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(rm[:, None] < M) & (rk[None, :] < K))


@triton.autotune(
    configs=configs.all_shrink_configs(),
    key=["M_BUCKET", "K", "BLOCK_R", "HAS_DROPOUT"],
    prune_configs_by={"early_config_prune": lambda cs, nargs, **kw: _prune_shrink(cs, nargs, **kw)},
)
@triton.jit(do_not_specialize=["M_BUCKET", "seed"])
def _lora_shrink_kernel(
    x_ptr,  # [M, K] input (any strides)
    a_ptr,  # [R, K] lora_A
    s_ptr,  # [M, R] output S, x's dtype
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
    IEEE: tl.constexpr,  # fp32 inputs: IEEE dot
    BLOCK_R: tl.constexpr,  # rank padded to a power of two >= 16
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """S = D(X) A^T: S[m, j] = sum_k D(X)[m, k] A[j, k] -> [M, R].

    D(X) = mask * X / keep. One program per BLOCK_M rows, looping over K;
    fp32 accumulator [BLOCK_M, BLOCK_R] (ranks r < BLOCK_R are zero-padded by
    the masks), scaled by 1/keep once at the end, stored in x's dtype.
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
            keep = _keep_mask(seed, rm, k0, K, keep_levels, BLOCK_M, BLOCK_K)
            x = tl.where(keep, x, tl.zeros_like(x))
        a = tl.load(a_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        acc = _mma(x, a, acc, IEEE)
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak
    if HAS_DROPOUT:
        acc = acc * tl.cast(inv_keep, tl.float32)
    s_ptrs = s_ptr + rm[:, None] * stride_sm + rr[None, :] * stride_sr
    tl.store(s_ptrs, acc.to(s_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_r[None, :])


@triton.autotune(
    configs=configs.all_gemm_configs(),
    key=["M_BUCKET", "N", "K", "BLOCK_R", "HAS_BIAS", "HAS_DROPOUT", "HAS_COL_SCALE", "STORE_PRE"],
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
    IEEE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    HAS_COL_SCALE: tl.constexpr = False,
    STORE_PRE: tl.constexpr = False,
):
    """OUT = g * (P Q + D(scaling * L E)) + bias, one [BLOCK_M, BLOCK_N] tile per program.

    Forward: Y = X W^T + scaling * S B^T + bias   (P=X, Q=W^T, L=S, E=B^T, no D)
    dX:      dX = dY W + D(dS A)                   (P=dY, Q=W, L=dS, E=A, scaling=1)
    DoRA:    Z = X W^T + scaling * S B^T, Y = g * Z + bias  (HAS_COL_SCALE, STORE_PRE)
    with D = mask / keep on the output coordinates (dX has x's shape) and g [N]
    a per-column fp32 scale (1 unless HAS_COL_SCALE). The main loop is a
    standard grouped-order tiled GEMM with an fp32 accumulator; the rank-R term
    is one (two for 16-bit: hi/lo of the fp32 L) extra dot in the epilogue,
    added before the tile is (with STORE_PRE) stored as Z, scaled by g, given
    the bias and stored as OUT.
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped ordering: GROUP_M row-tiles share the Q column panels in L2.
    num_in_group = GROUP_M * num_pid_n
    group_id = pid // num_in_group
    first_m = group_id * GROUP_M
    group_size = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % num_in_group) % group_size)
    pid_n = (pid % num_in_group) // group_size

    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    mask_m = rm < M
    mask_n = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # NOTE: M and N offsets are int64 (M*K, M*N, N*K may exceed 2**31); K
    # offsets stay within a tile and the base pointers advance by BLOCK_K.
    p_ptrs = p_ptr + rm[:, None] * stride_pm + rk[None, :] * stride_pk
    q_ptrs = q_ptr + rk[:, None] * stride_qk + rn[None, :] * stride_qn
    for k0 in range(0, K, BLOCK_K):
        mask_k = (k0 + rk) < K
        p = tl.load(p_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        q = tl.load(q_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = _mma(p, q, acc, IEEE)
        p_ptrs += BLOCK_K * stride_pk
        q_ptrs += BLOCK_K * stride_qk

    # Epilogue: the LoRA term, rank padded to BLOCK_R with zeros.
    rr = tl.arange(0, BLOCK_R)
    mask_r = rr < R
    lora_l = tl.load(l_ptr + rm[:, None] * stride_lm + rr[None, :] * stride_lr, mask=mask_m[:, None] & mask_r[None, :], other=0.0)
    lora_e = tl.load(e_ptr + rr[:, None] * stride_er + rn[None, :] * stride_en, mask=mask_r[:, None] & mask_n[None, :], other=0.0)
    lora_l = lora_l.to(tl.float32) * tl.cast(scaling, tl.float32)
    if HAS_DROPOUT:
        # NOTE: the mask applies to the LoRA term only, so it gets its own
        # [BLOCK_M, BLOCK_N] registers (configs.gemm_configs drops big tiles).
        lora = _mma_f32_lhs(lora_l * tl.cast(inv_keep, tl.float32), lora_e, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), IEEE)
        keep = _keep_mask(seed, rm, pid_n * BLOCK_N, N, keep_levels, BLOCK_M, BLOCK_N)
        acc += tl.where(keep, lora, 0.0)
    else:
        acc = _mma_f32_lhs(lora_l, lora_e, acc, IEEE)
    out_offs = rm[:, None] * stride_om + rn[None, :] * stride_on
    if STORE_PRE:
        # NOTE: Z (DoRA's dm needs it in backward) is rounded from the same fp32
        # tile that Y is computed from; Y is not recomputed from the rounded Z.
        tl.store(pre_ptr + out_offs, acc.to(pre_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
    if HAS_COL_SCALE:
        acc = acc * tl.load(colscale_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _lora_dy_kernel(
    dy_ptr,  # [M, N] upstream gradient (any strides)
    b_ptr,  # [N, R] lora_B
    s_ptr,  # [M, R] S saved by the forward
    ds_ptr,  # [M, R] fp32 output dS (when NEED_DS)
    db_ptr,  # [N, R] output dB, lora_B's dtype (when NEED_DB)
    dbias_ptr,  # [N] output dbias, dY's dtype (when NEED_DBIAS)
    ws_ds_ptr,  # [cdiv(N, BLOCK_N), M, BLOCK_R] fp32 workspace: dS partial per column block
    ws_db_ptr,  # [SPLIT_M, N, BLOCK_R] fp32 workspace: dB partial per row split
    ws_dbias_ptr,  # [SPLIT_M, N] fp32 workspace: dbias partial per row split
    cnt_m_ptr,  # [cdiv(M, BLOCK_M)] int32, zeroed: column blocks done per row block
    cnt_n_ptr,  # [cdiv(N, BLOCK_N)] int32, zeroed: row splits done per column block
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
    SPLIT_M,  # programs along M; program (n, s) takes row blocks s, s + SPLIT_M, ...
    NEED_DS: tl.constexpr,
    NEED_DB: tl.constexpr,
    NEED_DBIAS: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One read of dY for the three rank-r gradients:

      dS    = scaling * dY B     [M, R]  (reduced over N)
      dB    = scaling * dY^T S   [N, R]  (reduced over M)
      dbias = sum_m dY           [N]     (reduced over M)

    Grid (cdiv(N, BLOCK_N), SPLIT_M). A program holds its column block's dB and
    dbias accumulators in registers over its row blocks, and writes each row
    block's dS partial to ws_ds. Deterministic cross-program reduction: after
    writing a partial, a program bumps the block's int32 counter (acq_rel,
    after a CTA barrier); the program that sees the last arrival sums all the
    partials of that block in index order and stores the result. With a
    single column block (or split) the partial is the result and is stored
    directly.
    """
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_blocks = tl.cdiv(N, BLOCK_N)
    m_blocks = tl.cdiv(M, BLOCK_M)
    scaling = tl.cast(scaling, tl.float32)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rr = tl.arange(0, BLOCK_R)
    mask_n = rn < N
    mask_r = rr < R
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
            db_acc = _mma(tl.trans(dy), s, db_acc, IEEE)
        if NEED_DBIAS:
            dbias_acc += tl.sum(dy.to(tl.float32), axis=0)
        if NEED_DS:
            part = _mma(dy, b, tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32), IEEE)
            mask_mr = mask_m[:, None] & mask_r[None, :]
            out_off = rm[:, None] * R + rr[None, :]
            if n_blocks == 1:
                tl.store(ds_ptr + out_off, part * scaling, mask=mask_mr)
            else:
                ws_off = rm[:, None] * BLOCK_R + rr[None, :]
                block_stride = tl.cast(M, tl.int64) * BLOCK_R
                tl.store(ws_ds_ptr + pid_n * block_stride + ws_off, part, mask=mask_mr)
                # NOTE: the barrier orders every thread's partial store before
                # the (single-thread, acq_rel, gpu-scope) arrival; the reader
                # bypasses L1 (.cg) for the other programs' partials.
                tl.debug_barrier()
                arrived = tl.atomic_add(cnt_m_ptr + mb, 1, sem="acq_rel")
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
                tl.store(dbias_ptr + rn, dbias_acc.to(dbias_ptr.dtype.element_ty), mask=mask_n)
        else:
            split_stride = tl.cast(N, tl.int64) * BLOCK_R
            ws_off = rn[:, None] * BLOCK_R + rr[None, :]
            if NEED_DB:
                tl.store(ws_db_ptr + pid_s * split_stride + ws_off, db_acc, mask=mask_nr)
            if NEED_DBIAS:
                tl.store(ws_dbias_ptr + pid_s * tl.cast(N, tl.int64) + rn, dbias_acc, mask=mask_n)
            tl.debug_barrier()
            arrived = tl.atomic_add(cnt_n_ptr + pid_n, 1, sem="acq_rel")
            if arrived == SPLIT_M - 1:
                db_tot = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
                dbias_tot = tl.zeros((BLOCK_N,), dtype=tl.float32)
                for j in range(0, SPLIT_M):
                    if NEED_DB:
                        db_tot += tl.load(ws_db_ptr + j * split_stride + ws_off, mask=mask_nr, other=0.0, cache_modifier=".cg")
                    if NEED_DBIAS:
                        dbias_ptrs = ws_dbias_ptr + j * tl.cast(N, tl.int64) + rn
                        dbias_tot += tl.load(dbias_ptrs, mask=mask_n, other=0.0, cache_modifier=".cg")
                if NEED_DB:
                    tl.store(db_ptr + rn[:, None] * R + rr[None, :], (db_tot * scaling).to(db_ptr.dtype.element_ty), mask=mask_nr)
                if NEED_DBIAS:
                    tl.store(dbias_ptr + rn, dbias_tot.to(dbias_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _lora_down_grad_kernel(
    ds_ptr,  # [M, R] dS (fp32 from the dY pass, or any float dtype)
    x_ptr,  # [M, K] input saved by the forward (any strides)
    da_ptr,  # [R, K] output dA, x's dtype
    ws_ptr,  # [SPLIT_M, BLOCK_R, K] fp32 workspace: dA partial per row split
    cnt_ptr,  # [cdiv(K, BLOCK_K)] int32, zeroed: row splits done per column block
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
    """dA = dS^T D(X): dA[j, k] = sum_m dS[m, j] D(X)[m, k] -> [R, K].

    Grid (cdiv(K, BLOCK_K), SPLIT_M); program (k, s) accumulates row blocks
    s, s + SPLIT_M, ... into a [BLOCK_R, BLOCK_K] fp32 tile; the splits are
    summed in index order by the last to arrive (as in ``_lora_dy_kernel``),
    then scaled by 1/keep. The dropout mask is regenerated from ``seed``.
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
        ds_t = tl.load(ds_ptr + rr[:, None] * stride_dsr + rm[None, :] * stride_dsm, mask=mask_r[:, None] & mask_m[None, :], other=0.0)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if HAS_DROPOUT:
            keep = _keep_mask(seed, rm, pid_k * BLOCK_K, K, keep_levels, BLOCK_M, BLOCK_K)
            x = tl.where(keep, x, tl.zeros_like(x))
        acc = _mma_f32_lhs(ds_t.to(tl.float32), x, acc, IEEE)
    mask_rk = mask_r[:, None] & mask_k[None, :]
    out_off = rr[:, None] * K + rk[None, :]
    if SPLIT_M == 1:
        if HAS_DROPOUT:
            acc = acc * tl.cast(inv_keep, tl.float32)
        tl.store(da_ptr + out_off, acc.to(da_ptr.dtype.element_ty), mask=mask_rk)
    else:
        split_stride = tl.cast(K, tl.int64) * BLOCK_R
        ws_off = rr[:, None] * K + rk[None, :]
        tl.store(ws_ptr + pid_s * split_stride + ws_off, acc, mask=mask_rk)
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + pid_k, 1, sem="acq_rel")
        if arrived == SPLIT_M - 1:
            total = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
            for j in range(0, SPLIT_M):
                total += tl.load(ws_ptr + j * split_stride + ws_off, mask=mask_rk, other=0.0, cache_modifier=".cg")
            if HAS_DROPOUT:
                total = total * tl.cast(inv_keep, tl.float32)
            tl.store(da_ptr + out_off, total.to(da_ptr.dtype.element_ty), mask=mask_rk)


# ----------------------------------------------------------------------------
# launch plumbing
# ----------------------------------------------------------------------------

_launches = 0


def launch_count() -> int:
    """Triton kernel launches made by this module since the last reset."""
    return _launches


def reset_launch_count() -> None:
    global _launches
    _launches = 0


def _launch(kernel, grid: tuple | object, device: torch.device, *args, **kwargs) -> None:
    """Launch ``kernel[grid](*args, **kwargs)`` on ``device``, counting it."""
    global _launches
    _launches += 1
    if device.type == "cuda":
        with torch.cuda.device(device):
            kernel[grid](*args, **kwargs)
    else:
        kernel[grid](*args, **kwargs)


_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_dtype(t: Tensor, name: str) -> None:
    if t.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"{name}: the Triton kernels take float32, float16 or bfloat16, got {t.dtype}")


def _expect(t: Tensor, shape: tuple[int, ...], name: str, what: str) -> None:
    """Raise a ValueError naming ``name``, its shape and the expected ``what``."""
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {what} = {list(shape)}, got {list(t.shape)}")


def _block_r(r: int) -> int:
    """The rank padded to a power of two >= 16 (the GPU's minimum tl.dot size)."""
    return max(16, triton.next_power_of_2(r))


def _m_bucket(m: int) -> int:
    return min(triton.next_power_of_2(max(m, 1)), 1 << 16)


def _dropout_args(dropout_p: float) -> tuple[bool, int, float]:
    """(has_dropout, keep_levels, 1/keep), with reference.py's keep probability."""
    if dropout_p <= 0.0:
        return False, 0, 1.0
    threshold, keep = reference.dropout_keep_threshold(dropout_p)
    return True, threshold + 32768, 1.0 / keep


_SM_COUNT: dict[int, int] = {}


def _target_programs(device: torch.device) -> int:
    """How many programs fill the device: 2 per SM (4 under the interpreter,
    so tests exercise the split reductions on tiny shapes)."""
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return 2 * _SM_COUNT[idx]


def _prune_gemm(cs, nargs, **kw):
    p = nargs["p_ptr"]
    allowed = configs.gemm_configs(
        configs.device_arch(p.device), p.dtype, has_dropout=kw["HAS_DROPOUT"], block_r=kw["BLOCK_R"],
        store_pre=kw.get("STORE_PRE", False),
    )  # fmt: skip
    return configs.prune(cs, allowed, {"BLOCK_M": nargs["M"], "BLOCK_N": nargs["N"]})


def _prune_shrink(cs, nargs, **kw):
    x = nargs["x_ptr"]
    allowed = configs.shrink_configs(
        configs.device_arch(x.device), x.dtype, has_dropout=kw["HAS_DROPOUT"], block_r=kw["BLOCK_R"]
    )
    return configs.prune(cs, allowed, {"BLOCK_M": nargs["M"], "BLOCK_K": nargs["K"]})


# ----------------------------------------------------------------------------
# shared with other kernel modules (the QLoRA kernels in nf4.py): the same
# mask, dots and launch counter, under public names
# ----------------------------------------------------------------------------

keep_mask_tile = _keep_mask  # @triton.jit: the dropout mask of a tile, as every kernel here builds it
dot_acc = _mma  # @triton.jit: acc + a @ b (IEEE for fp32)
dot_f32_lhs = _mma_f32_lhs  # @triton.jit: acc + a @ b for an fp32 ``a`` (hi/lo split for 16-bit b)
launch_kernel = _launch  # launch and count: launch_kernel(kernel, grid, device, *args, **kwargs)
padded_rank = _block_r  # BLOCK_R for a rank r
dropout_args = _dropout_args  # p -> (has_dropout, keep_levels, 1/keep) for keep_mask_tile


# ----------------------------------------------------------------------------
# launchers: the building blocks (also used by the QLoRA kernels)
# ----------------------------------------------------------------------------


def lora_shrink(x: Tensor, lora_A: Tensor, dropout_p: float = 0.0, seed: int = 0) -> Tensor:
    """S = dropout(x) A^T: x [M, K], lora_A [r, K] -> S [M, r] in x's dtype
    (fp32 accumulation; the mask regenerated from ``seed``). 1 launch (0 if M == 0)."""
    _check_dtype(x, "x")
    m, k = x.shape
    r = lora_A.shape[0]
    _expect(lora_A, (r, k), "lora_A", "[r, K]")
    s = torch.empty((m, r), dtype=x.dtype, device=x.device)
    if m == 0:
        return s
    has_dropout, keep_levels, inv_keep = _dropout_args(dropout_p)
    _launch(
        _lora_shrink_kernel,
        lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),),
        x.device,
        x, lora_A, s, m, k, r,
        x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), s.stride(0), s.stride(1),
        int(seed), keep_levels, inv_keep, _m_bucket(m),
        HAS_DROPOUT=has_dropout, IEEE=x.dtype == torch.float32, BLOCK_R=_block_r(r),
    )  # fmt: skip
    return s


def _gemm(
    p, q_t, l, e_t, bias, scaling, dropout_p, seed, out_shape_n, q_strides, e_strides, col_scale=None, store_pre=False
) -> tuple[Tensor, Tensor | None]:
    """(OUT, Z): OUT [M, n] = g * Z + bias, Z = P Q + D(scaling * L E) (returned
    only with ``store_pre``, else None); g = ``col_scale`` [n] fp32 or 1; Q and E
    given by their strides."""
    m, k = p.shape
    r = l.shape[1]
    n = out_shape_n
    _expect(l, (m, r), "the LoRA activation (s or ds)", "[M, r]")
    out = torch.empty((m, n), dtype=p.dtype, device=p.device)
    pre = torch.empty((m, n), dtype=p.dtype, device=p.device) if store_pre else None
    if m == 0 or n == 0:
        return out, pre
    has_dropout, keep_levels, inv_keep = _dropout_args(dropout_p)
    _launch(
        _lora_gemm_kernel,
        lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),),
        p.device,
        p, q_t, l, e_t, bias if bias is not None else out, out,
        col_scale if col_scale is not None else out, pre if pre is not None else out,  # dummies: never read/written
        m, n, k, r,
        p.stride(0), p.stride(1), q_strides[0], q_strides[1], l.stride(0), l.stride(1),
        e_strides[0], e_strides[1], out.stride(0), out.stride(1),
        float(scaling), int(seed), keep_levels, inv_keep, _m_bucket(m),
        HAS_BIAS=bias is not None, HAS_DROPOUT=has_dropout, IEEE=p.dtype == torch.float32, BLOCK_R=_block_r(r),
        HAS_COL_SCALE=col_scale is not None, STORE_PRE=store_pre,
    )  # fmt: skip
    return out, pre


def lora_expand_gemm(x: Tensor, weight: Tensor, s: Tensor, lora_B: Tensor, scaling: float, bias: Tensor | None = None) -> Tensor:
    """Y = x W^T + scaling * S B^T + bias in one GEMM (the LoRA term and bias
    added in the tile before its single write): x [M, K], weight [N, K],
    s [M, r], lora_B [N, r], bias [N] -> Y [M, N] in x's dtype. 1 launch."""
    _check_dtype(x, "x")
    n, r = lora_B.shape
    _expect(weight, (n, x.shape[1]), "weight", "[N, K]")
    _expect(s, (x.shape[0], r), "s", "[M, r]")
    if bias is not None:
        _expect(bias, (n,), "bias", "[N]")
    return _gemm(
        x, weight, s, lora_B, bias, scaling, 0.0, 0, weight.shape[0],
        (weight.stride(1), weight.stride(0)), (lora_B.stride(1), lora_B.stride(0)),
    )[0]  # fmt: skip


def lora_dx_gemm(dy: Tensor, weight: Tensor, ds: Tensor, lora_A: Tensor, dropout_p: float = 0.0, seed: int = 0) -> Tensor:
    """dX = dY W + D(dS A) in one GEMM: dy [M, N], weight [N, K], ds [M, r]
    (already scaled, any float dtype), lora_A [r, K] -> dX [M, K] in dy's dtype;
    D = the forward's dropout mask (regenerated from ``seed``) / keep. 1 launch."""
    _check_dtype(dy, "dy")
    r, k = lora_A.shape
    _expect(weight, (dy.shape[1], k), "weight", "[N, K]")
    _expect(ds, (dy.shape[0], r), "ds", "[M, r]")
    return _gemm(
        dy, weight, ds, lora_A, None, 1.0, dropout_p, seed, weight.shape[1],
        (weight.stride(0), weight.stride(1)), (lora_A.stride(0), lora_A.stride(1)),
    )[0]  # fmt: skip


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

    dy [M, N], lora_B [N, r], s [M, r] ->
      dS = scaling * dY B [M, r] in **fp32** (not saved; kept exact for dX / dA),
      dB = scaling * dY^T S [N, r] in lora_B's dtype, dbias = sum_m dY [N] in dy's dtype.
    1 launch (plus a zero-fill of its arrival counters); deterministic.
    """
    _check_dtype(dy, "dy")
    m, n = dy.shape
    r = lora_B.shape[1]
    _expect(lora_B, (n, r), "lora_B", "[N, r]")
    _expect(s, (m, r), "s", "[M, r]")
    dev = dy.device
    ds = torch.empty((m, r), dtype=torch.float32, device=dev) if need_ds else None
    db = torch.empty((n, r), dtype=lora_B.dtype, device=dev) if need_db else None
    dbias = torch.empty((n,), dtype=dy.dtype, device=dev) if need_dbias else None
    if not (need_ds or need_db or need_dbias):
        return ds, db, dbias
    if m == 0 or n == 0:
        return ds, (db.zero_() if db is not None else None), (dbias.zero_() if dbias is not None else None)
    block_r = _block_r(r)
    cfg = configs.pick(
        configs.dy_pass_configs(configs.device_arch(dev), dy.dtype, block_r=block_r), {"BLOCK_M": m, "BLOCK_N": n}
    )
    bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
    m_blocks, n_blocks = triton.cdiv(m, bm), triton.cdiv(n, bn)
    split = max(1, min(m_blocks, triton.cdiv(_target_programs(dev), n_blocks)))
    counters = torch.zeros((m_blocks + n_blocks,), dtype=torch.int32, device=dev)
    f32 = torch.float32
    ws_ds = torch.empty((n_blocks, m, block_r) if need_ds and n_blocks > 1 else (1,), dtype=f32, device=dev)
    ws_db = torch.empty((split, n, block_r) if need_db and split > 1 else (1,), dtype=f32, device=dev)
    ws_dbias = torch.empty((split, n) if need_dbias and split > 1 else (1,), dtype=f32, device=dev)
    dummy = counters  # never dereferenced when its flag is off
    _launch(
        _lora_dy_kernel,
        (n_blocks, split),
        dev,
        dy, lora_B, s,
        ds if ds is not None else dummy, db if db is not None else dummy, dbias if dbias is not None else dummy,
        ws_ds, ws_db, ws_dbias, counters[:m_blocks], counters[m_blocks:],
        m, n, r,
        dy.stride(0), dy.stride(1), lora_B.stride(0), lora_B.stride(1), s.stride(0), s.stride(1),
        float(scaling), split,
        NEED_DS=need_ds, NEED_DB=need_db, NEED_DBIAS=need_dbias, IEEE=dy.dtype == torch.float32, BLOCK_R=block_r,
        BLOCK_M=bm, BLOCK_N=bn, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return ds, db, dbias


def lora_down_grad(ds: Tensor, x: Tensor, dropout_p: float = 0.0, seed: int = 0) -> Tensor:
    """dA = dS^T dropout(x): ds [M, r] (any float dtype), x [M, K] -> dA [r, K]
    in x's dtype, the mask regenerated from ``seed``. 1 launch; deterministic."""
    _check_dtype(x, "x")
    m, k = x.shape
    r = ds.shape[1]
    _expect(ds, (m, r), "ds", "[M, r]")
    dev = x.device
    da = torch.empty((r, k), dtype=x.dtype, device=dev)
    if m == 0 or k == 0:
        return da.zero_()
    has_dropout, keep_levels, inv_keep = _dropout_args(dropout_p)
    block_r = _block_r(r)
    cfg = configs.pick(
        configs.down_grad_configs(configs.device_arch(dev), x.dtype, has_dropout=has_dropout, block_r=block_r),
        {"BLOCK_M": m, "BLOCK_K": k},
    )
    bm, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_K"]
    m_blocks, k_blocks = triton.cdiv(m, bm), triton.cdiv(k, bk)
    split = max(1, min(m_blocks, triton.cdiv(_target_programs(dev), k_blocks)))
    counters = torch.zeros((k_blocks,), dtype=torch.int32, device=dev)
    ws = torch.empty((split, block_r, k) if split > 1 else (1,), dtype=torch.float32, device=dev)
    _launch(
        _lora_down_grad_kernel,
        (k_blocks, split),
        dev,
        ds, x, da, ws, counters,
        m, k, r,
        ds.stride(0), ds.stride(1), x.stride(0), x.stride(1),
        int(seed), keep_levels, inv_keep, split,
        HAS_DROPOUT=has_dropout, IEEE=x.dtype == torch.float32, BLOCK_R=block_r,
        BLOCK_M=bm, BLOCK_K=bk, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return da


def dropout_keep_mask(seed: int, shape: tuple[int, int], p: float, device: torch.device) -> tuple[Tensor, float]:
    """The kernels' dropout keep-mask for ``seed`` (bool, ``shape`` = x's [M, K])
    and the keep probability, from the same jit helper the kernels use. 1 launch."""
    _, keep = reference.dropout_keep_threshold(p)
    _, keep_levels, _ = _dropout_args(p)
    m, k = shape
    out = torch.empty((m, k), dtype=torch.int8, device=device)
    if m and k:
        bm, bk = 32, 32
        _launch(_dropout_mask_kernel, (triton.cdiv(m, bm), triton.cdiv(k, bk)), torch.device(device),
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

    As ``fastlora.reference.lora_forward``, except that the dropout mask comes
    from Triton's Philox keyed by ``seed`` (see :func:`dropout_keep_mask`).
    2 launches: shrink, then the GEMM with the LoRA term in its epilogue.
    """
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

    x [M, K], weight [N, K], lora_A [r, K], lora_B [N, r], col_scale g [N]
    (DoRA's m / ||W + s B A||, cast to fp32 here), bias [N] -> y, z [M, N] in x's
    dtype, s [M, r]. As ``fastlora.reference.dora_forward`` (dropout mask from
    Triton's Philox). 2 launches: shrink, then the GEMM whose epilogue adds the
    LoRA term, stores z, scales by g and adds the bias (y is computed from the
    fp32 tile, not from the rounded z).
    """
    _check_dtype(x, "x")
    n = lora_B.shape[0]
    _expect(weight, (n, x.shape[1]), "weight", "[N, K]")
    _expect(col_scale, (n,), "col_scale", "[N]")
    if bias is not None:
        _expect(bias, (n,), "bias", "[N]")
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

    With D = dropout (mask m / keep) and dS = scaling * dY B:
      dB = scaling * dY^T S;  dbias = sum_m dY     (dY pass, 1 launch with dS)
      dx = dY W + D(dS A)                          (1 GEMM launch)
      dA = dS^T D(x)                               (1 launch)
      dW = dY^T x                                  (torch.mm, only if requested)
    ``needs`` = (dx, dweight, dA, dB, dbias); unrequested ones are None and cost nothing.
    """
    need_x, need_w, need_a, need_b, need_bias = needs
    need_ds = need_x or need_a
    ds, db, dbias = lora_dy_pass(dy, lora_B, s, scaling, need_ds, need_b, need_bias)
    dx = lora_dx_gemm(dy, weight, ds, lora_A, dropout_p, seed) if need_x else None
    da = lora_down_grad(ds, x, dropout_p, seed) if need_a else None
    # NOTE: dW is a plain [N, K] GEMM (cuBLAS), needed only for a trainable base weight.
    dw = torch.mm(dy.t(), x) if need_w else None
    return dx, dw, da, db, dbias
