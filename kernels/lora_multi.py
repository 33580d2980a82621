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

Launches: forward 2 (shrink + GEMM), backward 3 (the dY pass for dS, dB and
dbias; the dX GEMM; dA), plus a few torch ops (argsort, searchsorted, counter
zero-fill) that are not kernels of this module. Counted by
``fastlora.kernels.lora.launch_count()`` (one counter for every kernel module).

NOTE: the launch configurations live in this file (the ``*_configs``
functions below) while ``kernels/configs.py`` is being refactored; they move
there afterwards. The jit helpers (dropout mask, dots) and the launch counter
come from ``kernels/lora.py``.

Importing this module touches no GPU driver; with ``TRITON_INTERPRET=1`` (set
before import) it runs on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._backend import interpreting
from . import lora
from ._common import dot_acc as _mma
from ._common import dot_f32_lhs as _mma_f32_lhs
from ._common import dropout_args as _dropout_args
from ._common import keep_mask as _keep_mask
from ._common import launch as _launch
from ._common import padded_rank as _block_r

DECODE_MAX_M = 16  # forward batches up to this many rows take the decode path

# ----------------------------------------------------------------------------
# launch configurations (functions of arch, dtype and flags; one under the interpreter)
# ----------------------------------------------------------------------------

ARCHS = (80, 90)


def _cfg(num_warps: int, num_stages: int, **tiles: int) -> triton.Config:
    return triton.Config(dict(tiles), num_warps=num_warps, num_stages=num_stages)


def _family(arch: int) -> int:
    """Hopper-class (sm_90, sm_100) or Ampere-class tiles (sm_80-89, sm_120), as kernels/configs.py."""
    return 90 if 90 <= arch < 120 else 80


def gemm_configs(
    arch: int, dtype: torch.dtype, *, has_dropout: bool = False, block_r: int = 16, decode: bool = False
) -> list[triton.Config]:
    """Configs of ``_multi_gemm_kernel`` (forward Y and dX), each compiled without
    spills for sm_80 and sm_90 by ``tests/test_multi.py``.

    Sorted path: ``kernels/configs.gemm_configs``'s tiles minus those that spill
    with the per-adapter epilogue loop: 128x256 always (STACK 96-176 bytes), and
    at ranks above 16 or with dropout on sm_80 everything above 64x64
    (128x128 w8: STACK 16-360; 64x128 w8 in dX: 104). Decode: one BLOCK_M = 16 tile of rows;
    BLOCK_N 128 spills on sm_90 (the per-row epilogue's [BLOCK_R, BLOCK_N] fp32
    slice of B), and narrow columns give a memory-bound GEMV more programs.
    """
    if interpreting():
        if decode:
            return [_cfg(4, 1, BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=1)]
        return [_cfg(4, 1, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4)]
    if decode:
        if dtype == torch.float32:
            return [_cfg(4, 2, BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, GROUP_M=1)]
        bk = 128 if _family(arch) == 90 else 64
        return [_cfg(4, 4, BLOCK_M=16, BLOCK_N=64, BLOCK_K=bk, GROUP_M=1), _cfg(4, 4, BLOCK_M=16, BLOCK_N=32, BLOCK_K=bk, GROUP_M=1)]
    if dtype == torch.float32:
        # fp32 runs IEEE dots on FMA units (a correctness path): one small tile.
        if block_r <= 16:
            return [_cfg(4, 2, BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, GROUP_M=8)]
        return [_cfg(4, 2, BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, GROUP_M=8)]
    if block_r > 64:
        return [_cfg(4, 4, BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, GROUP_M=8)]
    if _family(arch) == 90:
        if block_r <= 16:
            return [_cfg(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8), _cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8)]
        # NOTE: above rank 16 the 128x128 tile spills on sm_90 (STACK 16-48, REG 255, Triton 3.9)
        return [_cfg(8, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8)]
    # NOTE: with dropout, sm_80's 128x128 w8 dX tile spills (STACK 16, REG 255, Triton 3.9) since the
    # shared fp32-operand helper of kernels/_common.py; 64-row tiles do not.
    if block_r <= 16 and not has_dropout:
        return [_cfg(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8), _cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8)]
    return [_cfg(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8)]


def shrink_configs(arch: int, dtype: torch.dtype, *, has_dropout: bool = False, block_r: int = 16) -> list[triton.Config]:
    """Configs of ``_multi_shrink_kernel`` (sorted rows): BLOCK_M rows, BLOCK_K columns
    per step. Spill-checked: 4 warps spill at rank 64 in 16-bit (STACK 64-696) and
    with dropout at 64x128 on sm_90; fp32 at rank 64 needs 8 warps on sm_80 and
    a 32x32 tile on sm_90 (8 warps there got REG 128 and spilled)."""
    if interpreting():
        return [_cfg(4, 1, BLOCK_M=32, BLOCK_K=32)]
    if block_r > 64:
        return [_cfg(8, 2, BLOCK_M=32, BLOCK_K=32)]
    if dtype == torch.float32:
        if block_r <= 16:
            return [_cfg(4, 2, BLOCK_M=32, BLOCK_K=64)]
        return [_cfg(8, 1, BLOCK_M=32, BLOCK_K=64)] if _family(arch) == 80 else [_cfg(4, 2, BLOCK_M=32, BLOCK_K=32)]
    if block_r <= 16:
        if _family(arch) == 90:
            return [_cfg(8, 4, BLOCK_M=64, BLOCK_K=128), _cfg(4, 4, BLOCK_M=32, BLOCK_K=128)]
        return [_cfg(4, 4, BLOCK_M=64, BLOCK_K=64), _cfg(4, 4, BLOCK_M=32, BLOCK_K=128)]
    if _family(arch) == 90:
        return [_cfg(8, 4, BLOCK_M=64, BLOCK_K=64), _cfg(8, 4, BLOCK_M=32, BLOCK_K=128)]
    return [_cfg(8, 4, BLOCK_M=64, BLOCK_K=64)]


def decode_shrink_configs(arch: int, dtype: torch.dtype, *, has_dropout: bool = False, block_r: int = 16) -> list[triton.Config]:
    """Configs of ``_decode_shrink_kernel``: one row per program, a [BLOCK_R, BLOCK_K]
    slice of that row's A per step (fp32 products, no tensor cores)."""
    if interpreting():
        return [_cfg(4, 1, BLOCK_K=32)]
    return [_cfg(4, 2, BLOCK_K=128 if block_r <= 16 else 64)]


def dy_pass_configs(arch: int, dtype: torch.dtype, *, block_r: int = 16) -> list[triton.Config]:
    """Configs of ``_multi_dy_kernel`` in order of preference (as kernels/configs.dy_pass_configs)."""
    if interpreting():
        return [_cfg(4, 1, BLOCK_M=32, BLOCK_N=32)]
    if dtype == torch.float32:
        return [_cfg(4 if block_r <= 16 else 8, 2, BLOCK_M=32, BLOCK_N=64)]
    if block_r > 64:
        return [_cfg(4, 2, BLOCK_M=32, BLOCK_N=32)]
    if block_r <= 16:
        return [_cfg(8, 3, BLOCK_M=64, BLOCK_N=256), _cfg(4, 3, BLOCK_M=64, BLOCK_N=128)]
    return [_cfg(8, 3, BLOCK_M=64, BLOCK_N=128), _cfg(4, 3, BLOCK_M=32, BLOCK_N=64)]


def down_grad_configs(arch: int, dtype: torch.dtype, *, has_dropout: bool = False, block_r: int = 16) -> list[triton.Config]:
    """Configs of ``_multi_down_grad_kernel`` (dA per adapter) in order of preference."""
    if interpreting():
        return [_cfg(4, 1, BLOCK_M=32, BLOCK_K=32)]
    if dtype == torch.float32:
        return [_cfg(4 if block_r <= 16 else 8, 2, BLOCK_M=32, BLOCK_K=64)]
    if block_r > 64:
        return [_cfg(4, 2, BLOCK_M=32, BLOCK_K=32)]
    if _family(arch) == 90:
        return [_cfg(4, 4, BLOCK_M=64, BLOCK_K=128), _cfg(4, 4, BLOCK_M=64, BLOCK_K=64)]
    return [_cfg(4, 4, BLOCK_M=64, BLOCK_K=64), _cfg(4, 4, BLOCK_M=32, BLOCK_K=64)]


def _union(fn, **flags_grid) -> list[triton.Config]:
    out: list[triton.Config] = []
    combos = [{}]
    for name, values in flags_grid.items():
        combos = [dict(c, **{name: v}) for c in combos for v in values]
    for arch in ARCHS:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for flags in combos:
                for c in fn(arch, dtype, **flags):
                    if c not in out:
                        out.append(c)
    return out


def device_arch(device: torch.device) -> int:
    """10 * major + minor of a CUDA device (at launch time, never at import)."""
    if device.type != "cuda":
        return 90
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _fits(c: triton.Config, dims: dict[str, int]) -> bool:
    return all(c.kwargs[b] <= max(16, triton.next_power_of_2(max(d, 1))) for b, d in dims.items() if b in c.kwargs)


def pick(candidates: list[triton.Config], dims: dict[str, int]) -> triton.Config:
    """The first candidate whose tiles are not far larger than the problem (``dims``)."""
    for c in candidates:
        if _fits(c, dims):
            return c
    return candidates[-1]


def _prune_gemm(cs, nargs, **kw):
    p = nargs["p_ptr"]
    allowed = set(gemm_configs(device_arch(p.device), p.dtype, has_dropout=kw["HAS_DROPOUT"], block_r=kw["BLOCK_R"],
                               decode=kw["DECODE"]))  # fmt: skip
    kept = [c for c in cs if c in allowed and _fits(c, {"BLOCK_M": nargs["M"], "BLOCK_N": nargs["N"]})]
    return kept or [c for c in cs if c in allowed][-1:]


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
                keep = _keep_mask(seed, rows, k0, K, keep_levels, BLOCK_M, BLOCK_K)
                x = tl.where(keep, x, tl.zeros_like(x))
            a_t = tl.load(a_ptr + a * stride_an + rr[None, :] * stride_ar + (k0 + rk)[:, None] * stride_ak,
                          mask=mask_k[:, None] & mask_r[None, :], other=0.0)  # fmt: skip
            acc = _mma(x, a_t, acc, IEEE)
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
                keep = _keep_mask(seed, row, k0, K, keep_levels, 1, BLOCK_K)
                x = tl.where(keep, x, 0.0)
            a_t = tl.load(a_ptr + a.to(tl.int64) * stride_an + rr[:, None] * stride_ar + (k0 + rk)[None, :] * stride_ak,
                          mask=mask_r[:, None] & mask_k[None, :], other=0.0)  # fmt: skip
            acc += tl.sum(a_t.to(tl.float32) * x, axis=1)
        if HAS_DROPOUT:
            acc = acc * tl.cast(inv_keep, tl.float32)
    tl.store(s_ptr + m.to(tl.int64) * stride_sm + rr * stride_sr, acc.to(s_ptr.dtype.element_ty), mask=mask_r)


@triton.autotune(
    configs=_union(gemm_configs, has_dropout=(False, True), block_r=(16, 64, 128), decode=(False, True)),
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
):
    """OUT[row] = P[row] Q + D(c[a] * L[row] E[a]) + bias with a = the row's adapter.

    Forward: Y = X W^T + scaling[a] * S B[a]^T + bias (L = S, E = B^T, c = scaling, no D)
    dX:      dX = dY W + D(dS A[a])                  (L = dS sorted, E = A, c = 1)
    The main loop is the grouped-order tiled GEMM of ``kernels/lora.py`` over
    sorted rows (gathered loads, scattered stores: rows stay contiguous in K
    and N). Epilogue, sorted: per adapter present in the tile, its rows of L
    (a masked load) times E[a], one rank-R dot. DECODE (rows in order, one tile): each row's term from its own E[a],
    fp32 products, added to that row of the tile.
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_in_group = GROUP_M * num_pid_n
    group_id = pid // num_in_group
    first_m = group_id * GROUP_M
    group_size = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % num_in_group) % group_size)
    pid_n = (pid % num_in_group) // group_size

    p = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = p < M
    if DECODE:
        rows = p.to(tl.int64)
    else:
        rows = tl.load(perm_ptr + p, mask=mask_m, other=0).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    mask_n = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    p_ptrs = p_ptr + rows[:, None] * stride_pm + rk[None, :] * stride_pk
    q_ptrs = q_ptr + rk[:, None] * stride_qk + rn[None, :] * stride_qn
    for k0 in range(0, K, BLOCK_K):
        mask_k = (k0 + rk) < K
        a_tile = tl.load(p_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b_tile = tl.load(q_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = _mma(a_tile, b_tile, acc, IEEE)
        p_ptrs += BLOCK_K * stride_pk
        q_ptrs += BLOCK_K * stride_qk

    rr = tl.arange(0, BLOCK_R)
    mask_r = rr < R
    if DECODE:
        # NOTE: rows in order; row i's LoRA term from its own E[a] (fp32 products),
        # added to row i only: BLOCK_M small GEMVs instead of BLOCK_M masked dots.
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
            lora = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for a in range(lo, hi + 1):
            # NOTE: L loaded with the adapter's rows as the mask (each row read once;
            # no masked copy of an [BM, R] tile kept live beside the accumulator).
            sel = mask_m & (ids == a)
            l_a = tl.load(l_ptr + l_rows[:, None] * stride_lm + rr[None, :] * stride_lr,
                          mask=sel[:, None] & mask_r[None, :], other=0.0).to(tl.float32)  # fmt: skip
            if ROW_SCALE:
                l_a = l_a * tl.load(scale_ptr + a)
            e = tl.load(e_ptr + a * stride_ea + rr[:, None] * stride_er + rn[None, :] * stride_en,
                        mask=mask_r[:, None] & mask_n[None, :], other=0.0)  # fmt: skip
            if HAS_DROPOUT:
                lora = _mma_f32_lhs(l_a * tl.cast(inv_keep, tl.float32), e, lora, IEEE)
            else:
                acc = _mma_f32_lhs(l_a, e, acc, IEEE)
        if HAS_DROPOUT:
            keep = _keep_mask(seed, rows, pid_n * BLOCK_N, N, keep_levels, BLOCK_M, BLOCK_N)
            acc += tl.where(keep, lora, 0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rows[:, None] * stride_om + rn[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


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
                db_acc = _mma(tl.trans(dy), s, db_acc, IEEE)
            if NEED_DS:
                part = _mma(dy, b, tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32), IEEE)
                mask_mr = mask_m[:, None] & mask_r[None, :]
                out_off = p.to(tl.int64)[:, None] * R + rr[None, :]
                if n_blocks == 1:
                    tl.store(ds_ptr + out_off, part * scaling, mask=mask_mr)
                else:
                    ws_off = p.to(tl.int64)[:, None] * BLOCK_R + rr[None, :]
                    block_stride = tl.cast(M, tl.int64) * BLOCK_R
                    tl.store(ws_ds_ptr + pid_n * block_stride + ws_off, part, mask=mask_mr)
                    # NOTE: barrier, then a gpu-scope acq_rel arrival; the last one
                    # reads the others' partials past L1 (.cg). As kernels/lora.py.
                    tl.debug_barrier()
                    arrived = tl.atomic_add(cnt_m_ptr + (st + mb * BLOCK_M) // BLOCK_M + j, 1, sem="acq_rel")
                    if arrived == n_blocks - 1:
                        total = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
                        for c in range(0, n_blocks):
                            total += tl.load(ws_ds_ptr + c * block_stride + ws_off, mask=mask_mr, other=0.0,
                                             cache_modifier=".cg")  # fmt: skip
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
                tl.store(ws_base + pid_s * split_stride + ws_off, db_acc, mask=mask_nr)
                tl.debug_barrier()
                arrived = tl.atomic_add(cnt_db_ptr + a_safe * n_blocks + pid_n, 1, sem="acq_rel")
                if arrived == SPLIT_M - 1:
                    db_tot = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
                    for t in range(0, SPLIT_M):
                        db_tot += tl.load(ws_base + t * split_stride + ws_off, mask=mask_nr, other=0.0,
                                          cache_modifier=".cg")  # fmt: skip
                    tl.store(db_ptr + db_off, (db_tot * scaling).to(db_ptr.dtype.element_ty), mask=mask_nr)
    if NEED_DBIAS:
        parts = (n_adapters + 1) * SPLIT_M
        ws_row = tl.cast(N, tl.int64)
        tl.store(ws_dbias_ptr + (j * SPLIT_M + pid_s) * ws_row + rn, dbias_acc, mask=mask_n)
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_dbias_ptr + pid_n, 1, sem="acq_rel")
        if arrived == parts - 1:
            dbias_tot = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for t in range(0, parts):
                dbias_tot += tl.load(ws_dbias_ptr + t * ws_row + rn, mask=mask_n, other=0.0, cache_modifier=".cg")
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
            keep = _keep_mask(seed, rows, pid_k * BLOCK_K, K, keep_levels, BLOCK_M, BLOCK_K)
            x = tl.where(keep, x, tl.zeros_like(x))
        acc = _mma_f32_lhs(ds_t.to(tl.float32), x, acc, IEEE)
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
        tl.store(ws_base + pid_s * split_stride + ws_off, acc, mask=mask_rk)
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + a * k_blocks + pid_k, 1, sem="acq_rel")
        if arrived == SPLIT_M - 1:
            total = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
            for t in range(0, SPLIT_M):
                total += tl.load(ws_base + t * split_stride + ws_off, mask=mask_rk, other=0.0, cache_modifier=".cg")
            if HAS_DROPOUT:
                total = total * tl.cast(inv_keep, tl.float32)
            tl.store(da_ptr + out_off, total.to(da_ptr.dtype.element_ty), mask=mask_rk)


# ----------------------------------------------------------------------------
# launch plumbing
# ----------------------------------------------------------------------------

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_SM_COUNT: dict[int, int] = {}


def _check_dtype(t: Tensor, name: str) -> None:
    if t.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"{name}: the Triton kernels take float32, float16 or bfloat16, got {t.dtype}")


def _m_bucket(m: int) -> int:
    return min(triton.next_power_of_2(max(m, 1)), 1 << 16)


def target_programs(device: torch.device) -> int:
    """Programs that fill the device: 2 per SM (4 under the interpreter)."""
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return 2 * _SM_COUNT[idx]


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


def _expect(t: Tensor, shape: tuple[int, ...], name: str, what: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {what} = {list(shape)}, got {list(t.shape)}")


# ----------------------------------------------------------------------------
# launchers: the building blocks
# ----------------------------------------------------------------------------


def multi_shrink(x: Tensor, lora_A: Tensor, rows: SortedRows | None, ids: Tensor, dropout_p: float = 0.0,
                 seed: int = 0) -> Tensor:  # fmt: skip
    """S[m] = dropout(x)[m] A[ids[m]]^T (zero on base rows): x [M, K], lora_A [n, r, K]
    -> S [M, r] in x's dtype, rows in x's order. ``rows`` (sorted) or None (decode:
    one program per row, ``ids`` [M] int32 in x's order). 1 launch (0 if M == 0)."""
    _check_dtype(x, "x")
    m, k = x.shape
    n, r = lora_A.shape[0], lora_A.shape[1]
    _expect(lora_A, (n, r, k), "lora_A", "[n, r, K]")
    s = torch.empty((m, r), dtype=x.dtype, device=x.device)
    if m == 0:
        return s
    has_dropout, keep_levels, inv_keep = _dropout_args(dropout_p)
    block_r = _block_r(r)
    arch = device_arch(x.device)
    common = (m, k, r, x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), lora_A.stride(2),
              s.stride(0), s.stride(1), int(seed), keep_levels, inv_keep)  # fmt: skip
    if rows is None:
        cfg = pick(decode_shrink_configs(arch, x.dtype, has_dropout=has_dropout, block_r=block_r), {"BLOCK_K": k})
        _launch(_decode_shrink_kernel, (m,), x.device, x, lora_A, s, ids, *common,
                HAS_DROPOUT=has_dropout, BLOCK_R=block_r, BLOCK_K=cfg.kwargs["BLOCK_K"],
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)  # fmt: skip
        return s
    cfg = pick(shrink_configs(arch, x.dtype, has_dropout=has_dropout, block_r=block_r), {"BLOCK_M": m, "BLOCK_K": k})
    bm, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_K"]
    _launch(_multi_shrink_kernel, (triton.cdiv(m, bm),), x.device, x, lora_A, s, rows.perm, rows.ids, *common,
            HAS_DROPOUT=has_dropout, IEEE=x.dtype == torch.float32, BLOCK_R=block_r, BLOCK_M=bm, BLOCK_K=bk,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)  # fmt: skip
    return s


def _gemm(p, q, q_strides, l, l_sorted, e, e_strides, bias, out_n, rows, ids, scaling, dropout_p, seed, decode):
    """OUT [M, out_n] = P Q + D(c[a] * L E[a]) + bias (see ``_multi_gemm_kernel``); Q and E
    given by their strides (k, n) and (adapter, r, n)."""
    m, k = p.shape
    r = l.shape[1]
    out = torch.empty((m, out_n), dtype=p.dtype, device=p.device)
    if m == 0 or out_n == 0:
        return out
    has_dropout, keep_levels, inv_keep = _dropout_args(dropout_p)
    perm = rows.perm if rows is not None else ids
    row_ids = rows.ids if rows is not None else ids
    _launch(
        _multi_gemm_kernel,
        lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(out_n, meta["BLOCK_N"]),),
        p.device,
        p, q, l, e, bias if bias is not None else out, out,
        perm, row_ids, scaling if scaling is not None else out,
        m, out_n, k, r,
        p.stride(0), p.stride(1), q_strides[0], q_strides[1], l.stride(0), l.stride(1),
        e_strides[0], e_strides[1], e_strides[2], out.stride(0), out.stride(1),
        int(seed), keep_levels, inv_keep, _m_bucket(m),
        HAS_BIAS=bias is not None, HAS_DROPOUT=has_dropout, ROW_SCALE=scaling is not None, L_SORTED=l_sorted,
        DECODE=decode, IEEE=p.dtype == torch.float32, BLOCK_R=_block_r(r),
    )  # fmt: skip
    return out


def multi_expand_gemm(x: Tensor, weight: Tensor, s: Tensor, lora_B: Tensor, scaling: Tensor,
                      rows: SortedRows | None, ids: Tensor, bias: Tensor | None = None) -> Tensor:  # fmt: skip
    """Y[m] = x[m] W^T + scaling[a] * S[m] B[a]^T + bias (a = the row's adapter) in one
    GEMM: x [M, K], weight [N, K], s [M, r] (x's row order), lora_B [n, N, r],
    scaling [n] fp32 -> Y [M, N] in x's dtype. ``rows`` sorted, or None (decode:
    ``ids`` [M] int32 in x's order, one BLOCK_M = 16 tile of rows). 1 launch."""
    _check_dtype(x, "x")
    n, n_out, r = lora_B.shape
    _expect(weight, (n_out, x.shape[1]), "weight", "[N, K]")
    _expect(s, (x.shape[0], r), "s", "[M, r]")
    return _gemm(
        x, weight, (weight.stride(1), weight.stride(0)), s, False, lora_B,
        (lora_B.stride(0), lora_B.stride(2), lora_B.stride(1)), bias, n_out, rows, ids,
        scaling.to(torch.float32).contiguous(), 0.0, 0, rows is None,
    )  # fmt: skip


def multi_dx_gemm(dy: Tensor, weight: Tensor, ds_sorted: Tensor, lora_A: Tensor, rows: SortedRows,
                  dropout_p: float = 0.0, seed: int = 0) -> Tensor:  # fmt: skip
    """dX[m] = dY[m] W + D(dS[m] A[a]) in one GEMM: dy [M, N], weight [N, K],
    ds_sorted [M, r] fp32 (already scaled, at sorted positions), lora_A [n, r, K] ->
    dX [M, K] in dy's dtype, D = the forward's mask / keep. 1 launch."""
    _check_dtype(dy, "dy")
    n, r, k = lora_A.shape
    _expect(weight, (dy.shape[1], k), "weight", "[N, K]")
    return _gemm(
        dy, weight, (weight.stride(0), weight.stride(1)), ds_sorted, True, lora_A,
        (lora_A.stride(0), lora_A.stride(1), lora_A.stride(2)), None, k, rows, None, None, dropout_p, seed, False,
    )  # fmt: skip


def multi_dy_pass(dy: Tensor, lora_B: Tensor, s: Tensor, scaling: Tensor, rows: SortedRows, need_ds: bool = True,
                  need_db: bool = True, need_dbias: bool = False):  # fmt: skip
    """One pass over dY, segment by segment: ``(dS, dB, dbias)``, each None unless requested.

    dy [M, N], lora_B [n, N, r], s [M, r] (x's row order), scaling [n] ->
      dS [M, r] fp32 at **sorted positions** (scaling[a] dY[m] B[a]; garbage on base rows,
      which nothing reads), dB [n, N, r] in lora_B's dtype (zeros for adapters without
      rows), dbias [N] in dy's dtype. 1 launch (plus a zero-fill of its counters).
    """
    _check_dtype(dy, "dy")
    m, n_out = dy.shape
    n, _, r = lora_B.shape
    _expect(lora_B, (n, n_out, r), "lora_B", "[n, N, r]")
    _expect(s, (m, r), "s", "[M, r]")
    dev = dy.device
    ds = torch.empty((m, r), dtype=torch.float32, device=dev) if need_ds else None
    db = torch.empty((n, n_out, r), dtype=lora_B.dtype, device=dev) if need_db else None
    dbias = torch.empty((n_out,), dtype=dy.dtype, device=dev) if need_dbias else None
    if not (need_ds or need_db or need_dbias):
        return ds, db, dbias
    if m == 0 or n_out == 0:
        return ds, (db.zero_() if db is not None else None), (dbias.zero_() if dbias is not None else None)
    block_r = _block_r(r)
    cfg = pick(dy_pass_configs(device_arch(dev), dy.dtype, block_r=block_r), {"BLOCK_M": m, "BLOCK_N": n_out})
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
    _launch(
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
    _check_dtype(x, "x")
    m, k = x.shape
    r = ds_sorted.shape[1]
    _expect(ds_sorted, (m, r), "ds", "[M, r]")
    dev = x.device
    da = torch.empty((n_adapters, r, k), dtype=x.dtype, device=dev)
    if m == 0 or k == 0:
        return da.zero_()
    has_dropout, keep_levels, inv_keep = _dropout_args(dropout_p)
    block_r = _block_r(r)
    cfg = pick(down_grad_configs(device_arch(dev), x.dtype, has_dropout=has_dropout, block_r=block_r),
               {"BLOCK_M": m, "BLOCK_K": k})  # fmt: skip
    bm, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_K"]
    k_blocks = triton.cdiv(k, bk)
    split = split_rows(dev, triton.cdiv(m, bm), k_blocks * n_adapters)
    counters = torch.zeros((n_adapters * k_blocks,), dtype=torch.int32, device=dev)
    ws = torch.empty((n_adapters * split, block_r, k) if split > 1 else (1,), dtype=torch.float32, device=dev)
    _launch(
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
    y = multi_expand_gemm(x, weight, s, lora_B, scaling, rows, ids, bias)
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


def dropout_keep_mask(seed: int, shape: tuple[int, int], p: float, device: torch.device) -> tuple[Tensor, float]:
    """The mask these kernels use: ``fastlora.kernels.lora.dropout_keep_mask`` (the same Philox stream)."""
    return lora.dropout_keep_mask(seed, shape, p, device)
