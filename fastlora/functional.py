"""Autograd-enabled LoRA ops: :func:`lora_linear` and its ``autograd.Function``.

The Function dispatches each call to the Triton kernels (``fastlora.kernels``)
or to the reference path (``fastlora.reference``); both expose the same
``lora_forward`` / ``lora_backward`` pair, so the autograd logic lives here once.
"""

from __future__ import annotations

import math
from types import ModuleType

import torch
from torch import Tensor

from . import reference
from ._backend import resolve_backend


def _ops(backend: str) -> ModuleType:
    if backend == "triton":
        from .kernels import lora as triton_lora  # imported on first use only

        return triton_lora
    return reference


# torch.compile: the two halves of the op are registered as custom ops with fake
# (shape-only) implementations, so the compiler traces *around* them (the Triton
# launchers and the reference math run opaque, exactly as in eager). Eager calls
# skip the dispatcher and call the backend directly. Under compile the dropout
# seed is a 1-element int64 tensor drawn in the graph (a Python int would need
# ``.item()``, a graph break); in eager it is a Python int, so nothing but x and
# S is saved for backward.

def _seed_of(seed: int, seed_t: Tensor | None) -> int:
    return int(seed_t.item()) if seed_t is not None else seed


@torch.library.custom_op("fastlora::lora_fwd", mutates_args=())
def _lora_fwd_op(
    x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, bias: Tensor | None,
    scaling: float, dropout_p: float, seed_t: Tensor | None, backend: str,
) -> tuple[Tensor, Tensor]:
    y, s = _ops(backend).lora_forward(x, weight, lora_A, lora_B, scaling, bias, dropout_p, _seed_of(0, seed_t))
    return y, s


@_lora_fwd_op.register_fake
def _(x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed_t, backend):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_A.shape[0])


@torch.library.custom_op("fastlora::lora_bwd", mutates_args=())
def _lora_bwd_op(
    dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, s: Tensor,
    scaling: float, dropout_p: float, seed_t: Tensor | None, backend: str, needs: list[bool],
) -> list[Tensor]:
    grads = _ops(backend).lora_backward(dy, x, weight, lora_A, lora_B, s, scaling, dropout_p, _seed_of(0, seed_t), tuple(needs))
    # Custom ops cannot return None: an unrequested gradient is an empty tensor.
    return [g if g is not None else dy.new_empty(0) for g in grads]


@_lora_bwd_op.register_fake
def _(dy, x, weight, lora_A, lora_B, s, scaling, dropout_p, seed_t, backend, needs):
    shapes = [x.shape, weight.shape, lora_A.shape, lora_B.shape, (dy.shape[1],)]
    return [dy.new_empty(shape if need else (0,)) for shape, need in zip(shapes, needs)]


class LoRALinearFunction(torch.autograd.Function):
    """``y = x W^T + scaling * dropout(x) A^T B^T + bias`` on 2-D x [M, K].

    Saved for backward: x (the caller's tensor), S = dropout(x) A^T [M, r] and the
    integer dropout seed; the frozen weight and the adapters are parameters, not
    activations. Gradients (D = the dropout, linear and self-adjoint):
      dS = scaling * dY B;  dB = scaling * dY^T S;  dA = dS^T D(x);
      dx = dY W + D(dS A);  dW = dY^T x (only if weight requires grad);  dbias = sum dY.
    """

    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed, backend):  # type: ignore[override]
        if isinstance(seed, Tensor) or torch.compiler.is_compiling():
            seed_t = seed if isinstance(seed, Tensor) else None
            y, s = _lora_fwd_op(x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed_t, backend)
            ctx.save_for_backward(x, weight, lora_A, lora_B, s, seed_t)
            ctx.compiled = True
        else:
            y, s = _ops(backend).lora_forward(x, weight, lora_A, lora_B, scaling, bias, dropout_p, seed)
            ctx.save_for_backward(x, weight, lora_A, lora_B, s)
            ctx.compiled = False
        ctx.scaling = scaling
        ctx.dropout_p = dropout_p
        ctx.seed = seed
        ctx.backend = backend
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, weight, lora_A, lora_B, s, *seed_t = ctx.saved_tensors
        need = ctx.needs_input_grad
        needs = (need[0], need[1], need[2], need[3], ctx.has_bias and need[4])
        if ctx.compiled:  # see _lora_fwd_op
            grads = _lora_bwd_op(dy, x, weight, lora_A, lora_B, s, ctx.scaling, ctx.dropout_p, seed_t[0], ctx.backend, list(needs))
            dx, dw, da, db, dbias = (g if n else None for g, n in zip(grads, needs))
            return dx, dw, da, db, dbias, None, None, None, None
        dx, dw, da, db, dbias = _ops(ctx.backend).lora_backward(
            dy,
            x,
            weight,
            lora_A,
            lora_B,
            s,
            ctx.scaling,
            ctx.dropout_p,
            ctx.seed,
            needs,
        )
        return dx, dw, da, db, dbias, None, None, None, None


def check_lora_operands(
    x, base_name: str, base_shape: tuple[int, int], lora_A, lora_B, bias, scaling, dropout
) -> None:
    """Validate everything but the base weight itself (shared by lora_linear and
    qlora_linear): x floating with last dim K; lora_A [r, K] with r >= 1; lora_B
    [N, r]; bias [N]; one device; adapters in x's dtype or float32; bias in x's
    dtype; scaling a finite number; dropout in [0, 1). Errors name the argument,
    what was received and what was expected."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype={x.dtype}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension [..., in_features], got a 0-d tensor")
    n, k = base_shape
    if x.shape[-1] != k:
        raise ValueError(
            f"x's last dimension must equal {base_name}'s in_features: x has shape {tuple(x.shape)}, "
            f"{base_name} has shape {tuple(base_shape)} (expected x of shape [..., {k}])"
        )
    if lora_A.dim() != 2 or lora_A.shape[1] != k:
        raise ValueError(f"lora_A must have shape [r, {k}] (r, in_features), got {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    if r < 1:
        raise ValueError(f"LoRA rank r must be >= 1, got lora_A of shape {tuple(lora_A.shape)}")
    if lora_B.dim() != 2 or tuple(lora_B.shape) != (n, r):
        raise ValueError(f"lora_B must have shape [{n}, {r}] (out_features, r), got {tuple(lora_B.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != n):
        raise ValueError(f"bias must have shape [{n}] (out_features), got {tuple(bias.shape)}")
    # NOTE: under torch.compile a layer recompiled for a second scaling receives it
    # as a symbolic float that math.isfinite cannot trace; eager calls check it.
    if not torch.compiler.is_compiling() and (
        isinstance(scaling, Tensor) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling)
    ):
        raise TypeError(f"scaling must be a finite Python number, got {scaling!r}")
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
    named = [("lora_A", lora_A), ("lora_B", lora_B)] + ([("bias", bias)] if bias is not None else [])
    for name, t in named:
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; all tensors must share a device")
    if bias is not None and bias.dtype != x.dtype:
        raise TypeError(
            f"bias has dtype {bias.dtype} but x has dtype {x.dtype}; x, weight and bias must share a dtype "
            "(or run under torch.autocast, which casts them as nn.Linear does)"
        )
    if lora_B.dtype != lora_A.dtype or lora_A.dtype not in (x.dtype, torch.float32):
        raise TypeError(
            f"lora_A/lora_B have dtypes {lora_A.dtype}/{lora_B.dtype}; expected both {x.dtype} (x's dtype) "
            "or both torch.float32 (mixed precision: the LoRA branch in fp32)"
        )


def _check_args(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, bias: Tensor | None, scaling, dropout) -> None:
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"weight must be a 2-D tensor [out_features, in_features], got {shape}")
    check_lora_operands(x, "weight", tuple(weight.shape), lora_A, lora_B, bias, scaling, dropout)
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}; all tensors must share a device")
    if weight.dtype != x.dtype:
        raise TypeError(
            f"weight has dtype {weight.dtype} but x has dtype {x.dtype}; x, weight and bias must share a dtype "
            "(or run under torch.autocast, which casts them as nn.Linear does)"
        )


def dropout_seed(p: float):
    """The seed argument of the autograd Functions: a Python int in eager (0 when
    there is no dropout), a 1-element int64 tensor drawn in the graph under
    torch.compile (None when there is no dropout)."""
    if torch.compiler.is_compiling():
        return torch.randint(0, 2**62, (1,), dtype=torch.int64) if p > 0.0 else None
    return new_dropout_seed() if p > 0.0 else 0


def new_dropout_seed() -> int:
    """A fresh dropout seed from PyTorch's default CPU generator (so
    ``torch.manual_seed`` makes dropout reproducible; no device sync)."""
    return int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())


def lora_linear(
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    bias: Tensor | None = None,
    *,
    dropout: float = 0.0,
    training: bool = True,
) -> Tensor:
    """LoRA linear layer: ``x W^T + scaling * (dropout(x) A^T) B^T + bias``.

    Args:
      x: [..., K] (any leading dims, zero rows allowed, any strides).
      weight: [N, K], the frozen base weight. If it requires grad, dW is computed.
      lora_A: [r, K]; lora_B: [N, r]; bias: [N] or None. x, weight and bias share a
        dtype; the adapters share it too, or are float32 (PEFT's mixed precision:
        the LoRA branch and the adapter gradients in fp32).
      scaling: the LoRA scale (``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA).
      dropout: probability on the LoRA branch's input, applied only when
        ``training`` (PEFT's semantics).
    Returns: [..., N] in x's dtype. Under ``torch.autocast`` every tensor is cast
    to the autocast dtype first, exactly as ``nn.Linear`` does.
    """
    device_type = x.device.type if isinstance(x, Tensor) else "cpu"
    if isinstance(x, Tensor) and x.is_floating_point() and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, weight, lora_A, lora_B = (t.to(dtype) for t in (x, weight, lora_A, lora_B))
        bias = bias.to(dtype) if bias is not None else None
        with torch.autocast(device_type, enabled=False):
            return lora_linear(x, weight, lora_A, lora_B, scaling, bias, dropout=dropout, training=training)
    _check_args(x, weight, lora_A, lora_B, bias, scaling, dropout)
    x2d, lora_A, lora_B, scaling, p, seed, backend = prepare_call(x, lora_A, lora_B, scaling, dropout, training)
    y = LoRALinearFunction.apply(x2d, weight, lora_A, lora_B, bias, scaling, p, seed, backend)
    return with_leading_dims(y, x)


def prepare_call(x: Tensor, lora_A: Tensor, lora_B: Tensor, scaling, dropout: float, training: bool):
    """What every fused op's autograd Function takes, after validation:
    ``(x2d, lora_A, lora_B, scaling, p, seed, backend)``: x flattened to [M, K],
    the dropout probability in effect and its seed, and the backend for x's
    device (on which fp32 adapters are cast to x's dtype for the kernels)."""
    p = float(dropout) if training else 0.0
    backend = resolve_backend(x.device)
    if backend == "triton" and lora_A.dtype != x.dtype:
        # NOTE: the kernels read the adapters in the activation dtype (fp32
        # accumulation throughout); fp32 adapters are cast, autograd-tracked.
        lora_A, lora_B = lora_A.to(x.dtype), lora_B.to(x.dtype)
    return x.reshape(-1, x.shape[-1]), lora_A, lora_B, float(scaling), p, dropout_seed(p), backend


def with_leading_dims(y: Tensor, x: Tensor) -> Tensor:
    """y [M, N] back to x's leading dims [..., N].

    NOTE: _unsafe_view (what torch.matmul uses) rather than view: the result is
    not a view, so in-place ops on it and FSDP2's pre-backward hook work, as with
    nn.Linear."""
    return y if x.dim() == 2 else torch.ops.aten._unsafe_view(y, (*x.shape[:-1], y.shape[-1]))
