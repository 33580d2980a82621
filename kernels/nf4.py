"""Triton kernels for 4-bit (NF4 / FP4) weights: dequantization and the QLoRA GEMMs.

The weight format is bitsandbytes' (see ``fastlora.quant``): W [N, K] flattened,
element i has the 4-bit code in byte i // 2 (high nibble when i is even) and
the scale ``absmax[i // blocksize]``; with double quantization that scale is
itself ``nested_quant_map[absmax_code] * nested_absmax[j // 256] + offset``.
Every kernel here reads that state directly and de-nests the absmax in
registers: a weight is never expanded to [N, K] in memory, except by
:func:`dequantize_4bit`, whose purpose it is.

* :func:`dequantize_4bit` - one launch per weight (the de-nesting is in it).
* :func:`qlora_expand_gemm` - Y = X deq(W)^T + scaling * S B^T + bias.
* :func:`qlora_dx_gemm` - dX = dY deq(W) + D(dS A), D = the forward's dropout.
* :func:`qlora_forward` / :func:`qlora_backward` - the layer, with the same
  signatures as ``fastlora.qlora``'s reference pair; the rank-r parts (S, dS,
  dB, dbias, dA) are ``fastlora.kernels.lora``'s building blocks.

Order as in STYLE.md: jit helpers, kernels, launchers, the layer pair.
Importing this module touches no GPU driver.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..quant import QuantizedWeight
from . import configs, lora
from ._common import add_bias, add_rank_term, check_adapter_dtype, check_dtype, dot_acc, dropout_args, grouped_tile, launch
from ._common import launch_count as _launch_count
from ._common import padded_rank
from ._common import reset_launch_count as _reset_launch_count

# ----------------------------------------------------------------------------
# jit helpers
# ----------------------------------------------------------------------------


@triton.jit
def _block_absmax(
    blk,  # int64 tensor: block indices
    mask,
    absmax_ptr,  # [nblocks] fp32, or uint8 codes when NESTED
    nested_absmax_ptr,  # [cdiv(nblocks, NESTED_BLOCKSIZE)] fp32 (NESTED only)
    nested_map_ptr,  # [256] fp32 (NESTED only)
    offset_ptr,  # [] fp32 (NESTED only)
    NESTED: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
):
    """absmax of each block in ``blk``, de-nested when double-quantized:
    ``nested_map[code] * nested_absmax[blk // NESTED_BLOCKSIZE] + offset``."""
    if NESTED:
        code = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        value = tl.load(nested_map_ptr + code, mask=mask, other=0.0)
        scale = tl.load(nested_absmax_ptr + blk // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        absmax = value * scale + tl.load(offset_ptr)
    else:
        absmax = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
    return absmax


@triton.jit
def _dequant_gather(
    flat,  # int64 tensor: flat indices into W [N, K]
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
    """fp32 values of W at ``flat`` (any tile shape): quant_map[code] * absmax."""
    byte = tl.load(packed_ptr + flat // 2, mask=mask, other=0).to(tl.int32)
    # Even elements sit in the high nibble.
    shift = (1 - (flat % 2).to(tl.int32)) * 4
    code = (byte >> shift) & 0xF
    value = tl.load(quant_map_ptr + code, mask=mask, other=0.0)
    absmax = _block_absmax(
        flat // BLOCKSIZE, mask, absmax_ptr, nested_absmax_ptr, nested_map_ptr, offset_ptr, NESTED, NESTED_BLOCKSIZE
    )
    return value * absmax


@triton.jit
def qgemm_tile(
    p_ptr,  # [M, RED] left operand (any strides)
    packed_ptr,  # W [N_w, K_w] packed 4-bit codes
    quant_map_ptr,  # [16] fp32
    absmax_ptr,  # [nblocks] fp32 or uint8 codes (NESTED)
    nested_absmax_ptr,  # fp32 (NESTED only)
    nested_map_ptr,  # [256] fp32 (NESTED only)
    offset_ptr,  # [] fp32 (NESTED only)
    rows,  # [BLOCK_M] int64 rows of P the tile reads (a range, or gathered through a permutation)
    rn,  # [BLOCK_N] int64 output columns
    mask_m,
    mask_n,
    RED,  # the reduction length: K (forward) or N (dX)
    K_w,  # in_features of W: the row length of its flattened layout
    stride_pm,
    stride_pk,
    W_ROWS_ARE_OUT: tl.constexpr,  # True: the output columns index W's rows (Y = X W^T)
    BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
    IEEE: tl.constexpr,  # fp32 P: IEEE dots (never TF32)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The main loop of the 4-bit GEMMs: P[rows] deq(W)^(T)[:, rn] as a
    [BLOCK_M, BLOCK_N] fp32 tile. Each step dequantizes a [BLOCK_K, BLOCK_N]
    tile of W in registers (:func:`_dequant_gather`: packed codes, absmax
    de-nested in place), rounds it to P's dtype and feeds it to ``tl.dot``.
    Shared by :func:`_qlora_gemm_kernel` and ``lora_multi``'s 4-bit GEMM."""
    rk = tl.arange(0, BLOCK_K).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, RED, BLOCK_K):
        kk = k0 + rk
        mask_k = kk < RED
        p = tl.load(p_ptr + rows[:, None] * stride_pm + kk[None, :] * stride_pk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        # W element (reduction index kk, output index rn) in the flattened [N_w, K_w] weight.
        if W_ROWS_ARE_OUT:
            flat = rn[None, :] * K_w + kk[:, None]
        else:
            flat = kk[:, None] * K_w + rn[None, :]
        w = _dequant_gather(
            flat, mask_k[:, None] & mask_n[None, :], packed_ptr, quant_map_ptr, absmax_ptr,
            nested_absmax_ptr, nested_map_ptr, offset_ptr, BLOCKSIZE, NESTED, NESTED_BLOCKSIZE,
        )  # fmt: skip
        # NOTE: rounded to P's dtype, exactly the values the reference's
        # dequantized temporary holds; fp32 dots stay IEEE (never TF32).
        w = w.to(p_ptr.dtype.element_ty)
        acc = dot_acc(p, w, acc, IEEE)
    return acc


# ----------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------


@triton.jit
def _dequant_4bit_kernel(
    packed_ptr,  # [(n + 1) // 2] uint8, two codes per byte, first in the high nibble
    quant_map_ptr,  # [16] fp32 code table
    absmax_ptr,  # [nblocks] fp32, or uint8 codes when NESTED
    nested_absmax_ptr,  # [cdiv(nblocks, NESTED_BLOCKSIZE)] fp32 (NESTED only)
    nested_map_ptr,  # [256] fp32 (NESTED only)
    offset_ptr,  # [] fp32 (NESTED only)
    out_ptr,  # [n] output, any float dtype
    n,
    BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
    BLOCK: tl.constexpr,  # elements per program (even)
):
    """out[i] = (dtype)(quant_map[code(i)] * absmax(i // BLOCKSIZE)), one program
    per BLOCK elements; the absmax is de-nested here, in the same launch.

    Each program reads BLOCK // 2 bytes once and splits them into the
    interleaved high / low nibbles. Launched with fp fusion off, so the
    de-nesting ``value * scale + offset`` rounds twice, as bitsandbytes does:
    the output is bit-identical to ``fastlora.quant.dequantize_4bit``.
    """
    pid = tl.program_id(0)
    rb = (pid * (BLOCK // 2) + tl.arange(0, BLOCK // 2)).to(tl.int64)
    byte = tl.load(packed_ptr + rb, mask=rb < (n + 1) // 2, other=0).to(tl.int32)
    codes = tl.reshape(tl.join(byte >> 4, byte & 0xF), [BLOCK])
    flat = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = flat < n
    value = tl.load(quant_map_ptr + codes, mask=mask, other=0.0)
    absmax = _block_absmax(
        flat // BLOCKSIZE, mask, absmax_ptr, nested_absmax_ptr, nested_map_ptr, offset_ptr, NESTED, NESTED_BLOCKSIZE
    )
    tl.store(out_ptr + flat, (value * absmax).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _qlora_gemm_kernel(
    p_ptr,  # [M, RED] left operand: X (forward) or dY (dX)
    packed_ptr,  # W [N_w, K_w] packed 4-bit codes
    quant_map_ptr,  # [16] fp32
    absmax_ptr,  # [nblocks] fp32 or uint8 codes (NESTED)
    nested_absmax_ptr,  # fp32 (NESTED only)
    nested_map_ptr,  # [256] fp32 (NESTED only)
    offset_ptr,  # [] fp32 (NESTED only)
    l_ptr,  # [M, R] rank-r left factor: S (forward) or dS (dX, fp32)
    e_ptr,  # [R, OUT] rank-r right factor (strided view): B^T (forward) or A (dX)
    bias_ptr,  # [OUT] (HAS_BIAS only)
    out_ptr,  # [M, OUT] output, p's dtype
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
    scaling,  # multiplies the rank-r term (cast to fp32 here)
    seed,  # dropout seed (dX only); the mask is over [M, OUT] = x's shape
    keep_levels,
    inv_keep,
    W_ROWS_ARE_OUT: tl.constexpr,  # True: OUT indexes W's rows (forward, Y = X W^T)
    BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    F32_ADAPTERS: tl.constexpr = False,  # fp32 adapters on 16-bit activations (configs; the dots see E's dtype)
    R_CHUNK: tl.constexpr = 16,  # rank columns per epilogue step
):
    """OUT = P deq(W)^(T) + D(scaling * L E) + bias, one [BLOCK_M, BLOCK_N] tile per program.

    Forward: Y = X deq(W)^T + scaling * S B^T + bias   (P = X [M, K], W_ROWS_ARE_OUT)
    dX:      dX = dY deq(W) + D(dS A)                   (P = dY [M, N], scaling = 1)
    The [BLOCK_K, BLOCK_N] tile of W is dequantized in registers from its
    packed codes and absmax (de-nested in place) and fed to tl.dot in P's
    dtype; the rank-r term (rank padded to BLOCK_R with zeros) is added in the
    epilogue, before the only store of the tile. D = keep-mask / keep on the
    output coordinates, the same Philox mask as the LoRA kernels.
    """
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, OUT, BLOCK_M, BLOCK_N, GROUP_M)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_m = rm < M
    mask_n = rn < OUT
    acc = qgemm_tile(
        p_ptr, packed_ptr, quant_map_ptr, absmax_ptr, nested_absmax_ptr, nested_map_ptr, offset_ptr,
        rm, rn, mask_m, mask_n, RED, K_w, stride_pm, stride_pk,
        W_ROWS_ARE_OUT, BLOCKSIZE, NESTED, NESTED_BLOCKSIZE, IEEE, BLOCK_M, BLOCK_N, BLOCK_K,
    )  # fmt: skip

    acc = add_rank_term(
        acc, l_ptr, e_ptr, rm, rn, mask_m, mask_n, R, stride_lm, stride_lr, stride_er, stride_en,
        scaling, seed, keep_levels, inv_keep, OUT, pid_n * BLOCK_N,
        HAS_DROPOUT, IEEE, p_ptr.dtype.element_ty, BLOCK_R, R_CHUNK, BLOCK_M, BLOCK_N,
    )  # fmt: skip
    acc = add_bias(acc, bias_ptr, rn, mask_n, HAS_BIAS)
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# ----------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------

def launch_count() -> int:
    """Triton kernel launches since the last reset, this module's and the LoRA
    kernels' together (one counter: ``fastlora.kernels.lora.launch_count``)."""
    return _launch_count()


def reset_launch_count() -> None:
    _reset_launch_count()


def state_args(qw: QuantizedWeight) -> tuple:
    """(packed, quant_map, absmax, nested_absmax, nested_map, offset) pointers; the
    nested ones are dummies (never read) without double quantization."""
    dummy = qw.absmax
    if qw.double_quant:
        return (qw.packed, qw.quant_map, qw.absmax, qw.nested_absmax, qw.nested_quant_map, qw.offset.reshape(()))
    return (qw.packed, qw.quant_map, qw.absmax, dummy, dummy, dummy)


def state_meta(qw: QuantizedWeight) -> dict:
    """The constexprs of a 4-bit weight's layout (BLOCKSIZE, NESTED, NESTED_BLOCKSIZE)."""
    return dict(BLOCKSIZE=qw.blocksize, NESTED=qw.double_quant, NESTED_BLOCKSIZE=qw.nested_blocksize)


_state_args = state_args  # the name kernels/strategies.py imports


def _check_weight(qw: QuantizedWeight, device: torch.device) -> None:
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"qweight must be a fastlora.quant.QuantizedWeight, got {type(qw).__name__}")
    if qw.device != device:
        raise ValueError(f"qweight is on {qw.device} but the activations are on {device}")


def dequantize_4bit(qw: QuantizedWeight, dtype: torch.dtype | None = None) -> Tensor:
    """The weight of ``qw`` [out, in] in ``dtype`` (default ``qw.dtype``), bit-identical
    to ``fastlora.quant.dequantize_4bit``. 1 launch, double quantization included."""
    dtype = qw.dtype if dtype is None else dtype
    n = qw.numel
    out = torch.empty(qw.shape, dtype=dtype, device=qw.device)
    if n == 0:
        return out
    cfg = configs.dequant_config()
    launch(
        _dequant_4bit_kernel,
        (triton.cdiv(n, cfg.kwargs["BLOCK"]),),
        qw.device,
        *state_args(qw), out, n,
        **state_meta(qw), BLOCK=cfg.kwargs["BLOCK"], num_warps=cfg.num_warps,
        # NOTE: no fused multiply-add, so the de-nested absmax rounds as bitsandbytes'.
        enable_fp_fusion=False,
    )  # fmt: skip
    return out


def _qgemm(p, qw, l, e, bias, scaling, dropout_p, seed, w_rows_are_out) -> Tensor:
    """OUT [M, e.shape[1]] = p deq(W)^(T) + D(scaling * l e) + bias; ``e`` is a [r, OUT]
    (strided) view, in p's dtype or fp32 (then the rank-r term is an fp32 IEEE dot)."""
    check_dtype(p, "x" if w_rows_are_out else "dy")
    check_adapter_dtype(e, "lora_B" if w_rows_are_out else "lora_A", p.dtype)
    m, red = p.shape
    r, out_n = e.shape
    if tuple(l.shape) != (m, r):
        raise ValueError(f"the LoRA activation (s or ds) must have shape [M, r] = {[m, r]}, got {list(l.shape)}")
    out = torch.empty((m, out_n), dtype=p.dtype, device=p.device)
    if m == 0 or out_n == 0:
        return out
    has_dropout, keep_levels, inv_keep = dropout_args(dropout_p)
    block_r = padded_rank(r)
    f32_adapters = p.dtype != torch.float32 and e.dtype == torch.float32
    cfg = configs.pick(
        configs.qlora_gemm_configs(
            configs.device_arch(p.device), p.dtype, has_dropout=has_dropout, block_r=block_r, lora_f32=f32_adapters
        ),
        {"BLOCK_M": m, "BLOCK_N": out_n},
    )
    grid = (triton.cdiv(m, cfg.kwargs["BLOCK_M"]) * triton.cdiv(out_n, cfg.kwargs["BLOCK_N"]),)
    launch(
        _qlora_gemm_kernel,
        grid,
        p.device,
        p, *state_args(qw), l, e, bias if bias is not None else out, out,
        m, out_n, red, r, qw.shape[1],
        p.stride(0), p.stride(1), l.stride(0), l.stride(1), e.stride(0), e.stride(1), out.stride(0), out.stride(1),
        float(scaling), int(seed), keep_levels, inv_keep,
        W_ROWS_ARE_OUT=w_rows_are_out, **state_meta(qw), HAS_BIAS=bias is not None, HAS_DROPOUT=has_dropout,
        IEEE=p.dtype == torch.float32, BLOCK_R=block_r, **cfg.kwargs,
        F32_ADAPTERS=f32_adapters, R_CHUNK=configs.rank_chunk(block_r, p.dtype, f32_adapters),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out


def qlora_expand_gemm(
    x: Tensor, qweight: QuantizedWeight, s: Tensor, lora_B: Tensor, scaling: float, bias: Tensor | None = None
) -> Tensor:
    """Y = x deq(W)^T + scaling * S B^T + bias in one GEMM, W dequantized in the
    tiles: x [M, K], qweight [N, K], s [M, r], lora_B [N, r], bias [N] -> [M, N]. 1 launch."""
    _check_weight(qweight, x.device)
    return _qgemm(x, qweight, s, lora_B.t(), bias, scaling, 0.0, 0, True)


def qlora_dx_gemm(
    dy: Tensor, qweight: QuantizedWeight, ds: Tensor, lora_A: Tensor, dropout_p: float = 0.0, seed: int = 0
) -> Tensor:
    """dX = dY deq(W) + D(dS A) in one GEMM: dy [M, N], qweight [N, K], ds [M, r]
    (already scaled, fp32), lora_A [r, K] -> [M, K] in dy's dtype. 1 launch."""
    _check_weight(qweight, dy.device)
    return _qgemm(dy, qweight, ds, lora_A, None, 1.0, dropout_p, seed, False)


# ----------------------------------------------------------------------------
# the layer: the same pair as fastlora.qlora's reference
# ----------------------------------------------------------------------------


def qlora_forward(
    x: Tensor,
    qweight: QuantizedWeight,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    bias: Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """``y = x deq(W)^T + scaling * (dropout(x) A^T) B^T + bias``; returns ``(y, s)``:
    y in x's dtype, s in the adapters' dtype (x's, or fp32 for fp32 adapters,
    as ``fastlora.kernels.lora.lora_forward``).
    2 launches: the LoRA shrink, then the dequant-in-GEMM."""
    s = lora.lora_shrink(x, lora_A, dropout_p, seed)
    y = qlora_expand_gemm(x, qweight, s, lora_B, scaling, bias)
    return y, s


def qlora_backward(
    dy: Tensor,
    x: Tensor,
    qweight: QuantizedWeight,
    lora_A: Tensor,
    lora_B: Tensor,
    s: Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    seed: int = 0,
    needs: tuple[bool, bool, bool, bool, bool] = (True, False, True, True, False),
) -> tuple[Tensor | None, None, Tensor | None, Tensor | None, Tensor | None]:
    """Gradients ``(dx, None, dA, dB, dbias)`` of :func:`qlora_forward` (the 4-bit
    weight is frozen: its slot is always None).

      dS = scaling * dY B; dB = scaling * dY^T S; dbias = sum_m dY   (dY pass)
      dx = dY deq(W) + D(dS A)                                       (dequant-in-GEMM)
      dA = dS^T D(x)                                                 (down grad)
    dx, dbias in dy's dtype; dA, dB in the adapters' dtype (fp32 adapters: fp32).
    """
    need_x, need_w, need_a, need_b, need_bias = needs
    if need_w:
        raise ValueError("qlora_backward: the 4-bit base weight is frozen; it has no gradient")
    ds, db, dbias = lora.lora_dy_pass(dy, lora_B, s, scaling, need_x or need_a, need_b, need_bias)
    dx = qlora_dx_gemm(dy, qweight, ds, lora_A, dropout_p, seed) if need_x else None
    da = lora.lora_down_grad(ds, x, dropout_p, seed, lora_A.dtype) if need_a else None
    return dx, None, da, db, dbias
