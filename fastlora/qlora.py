"""QLoRA: a LoRA adapter on a frozen 4-bit (NF4 / FP4) base weight.

``y = x deq(W)^T + scaling * dropout(x) A^T B^T + bias`` with W stored in
bitsandbytes' 4-bit format (:mod:`fastlora.quant`).

* :func:`qlora_forward` / :func:`qlora_backward` - the reference ops (the CPU
  path and the oracle of ``fastlora.kernels.nf4``): they dequantize W to a
  temporary in the compute dtype, use it, and drop it; it is never saved for
  backward (backward dequantizes again).
* :class:`QLoRALinearFunction` and :func:`qlora_linear` - autograd, dispatched
  per call to the Triton kernels (W dequantized inside the GEMM tiles) or to
  the reference ops, as :func:`fastlora.functional.lora_linear` does.
* :class:`QLoRALinear` - the module: only the 4-bit weight (as buffers, in
  bitsandbytes' state-dict layout), ``lora_A``, ``lora_B`` and the bias.
"""

from __future__ import annotations

import math
from types import ModuleType

import torch
from torch import Tensor, nn

from . import reference
from .functional import check_lora_operands, prepare_call, with_leading_dims
from .modules import check_init, check_lora_hyperparameters, lora_scaling
from .quant import QuantizedWeight, dequantize_4bit, quantize_4bit

# -- the reference ops ---------------------------------------------------------


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
    """``y = x deq(W)^T + scaling * (dropout(x) A^T) B^T + bias``; returns ``(y, s)``.

    x [M, K], qweight [N, K], lora_A [r, K], lora_B [N, r], bias [N] -> y [M, N],
    s = dropout(x) A^T [M, r]. deq(W) is a temporary in x's dtype, freed on return.
    """
    weight = dequantize_4bit(qweight, x.dtype)
    return reference.lora_forward(x, weight, lora_A, lora_B, scaling, bias, dropout_p, seed)


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
    """Gradients ``(dx, None, dA, dB, dbias)`` of :func:`qlora_forward`; the
    4-bit weight is frozen (its slot is always None). With dS = scaling * dY B:
    dB = scaling * dY^T S; dA = dS^T D(x); dx = dY deq(W) + D(dS A); dbias = sum_m dY.
    deq(W) is rebuilt here (only when dx is needed) and freed on return."""
    need_x, need_w, need_a, need_b, need_bias = needs
    if need_w:
        raise ValueError("qlora_backward: the 4-bit base weight is frozen; it has no gradient")
    weight = dequantize_4bit(qweight, dy.dtype) if need_x else None
    dx, _, da, db, dbias = reference.lora_backward(
        dy, x, weight, lora_A, lora_B, s, scaling, dropout_p, seed, (need_x, False, need_a, need_b, need_bias)
    )
    return dx, None, da, db, dbias


# -- autograd ------------------------------------------------------------------


def _ops(backend: str) -> ModuleType:
    if backend == "triton":
        from .kernels import nf4  # imported on first use only

        return nf4
    import sys

    return sys.modules[__name__]


# torch.compile: as for LoRA (fastlora.functional), the two halves run as
# torch.library custom ops with shape-only fake implementations, so the compiler
# never traces into the dequantization or the kernels. A QuantizedWeight is not
# an op argument type, so it travels as its tensors plus its metadata.
def _qw_args(qw: QuantizedWeight) -> tuple:
    return (
        qw.packed, qw.absmax, qw.quant_map, qw.nested_absmax, qw.nested_quant_map, qw.offset,
        qw.quant_type, qw.blocksize, list(qw.shape), qw.dtype, qw.nested_blocksize,
    )


def _qw_from_args(packed, absmax, quant_map, nested_absmax, nested_quant_map, offset, quant_type, blocksize, shape, dtype, nested_blocksize):
    return QuantizedWeight(
        packed=packed, absmax=absmax, quant_map=quant_map, quant_type=quant_type, blocksize=blocksize,
        shape=tuple(shape), dtype=dtype, nested_absmax=nested_absmax, nested_quant_map=nested_quant_map,
        offset=offset, nested_blocksize=nested_blocksize,
    )


@torch.library.custom_op("fastlora::qlora_fwd", mutates_args=())
def _qlora_fwd_op(
    x: Tensor, lora_A: Tensor, lora_B: Tensor, bias: Tensor | None,
    packed: Tensor, absmax: Tensor, quant_map: Tensor, nested_absmax: Tensor | None,
    nested_quant_map: Tensor | None, offset: Tensor | None, quant_type: str, blocksize: int,
    shape: list[int], dtype: torch.dtype, nested_blocksize: int,
    scaling: float, dropout_p: float, seed_t: Tensor | None, backend: str,
) -> tuple[Tensor, Tensor]:
    qw = _qw_from_args(packed, absmax, quant_map, nested_absmax, nested_quant_map, offset, quant_type, blocksize, shape, dtype, nested_blocksize)
    seed = int(seed_t.item()) if seed_t is not None else 0
    y, s = _ops(backend).qlora_forward(x, qw, lora_A, lora_B, scaling, bias, dropout_p, seed)
    return y, s


@_qlora_fwd_op.register_fake
def _(x, lora_A, lora_B, bias, packed, absmax, quant_map, nested_absmax, nested_quant_map, offset,
      quant_type, blocksize, shape, dtype, nested_blocksize, scaling, dropout_p, seed_t, backend):
    return x.new_empty(x.shape[0], shape[0]), x.new_empty(x.shape[0], lora_A.shape[0])


@torch.library.custom_op("fastlora::qlora_bwd", mutates_args=())
def _qlora_bwd_op(
    dy: Tensor, x: Tensor, lora_A: Tensor, lora_B: Tensor, s: Tensor,
    packed: Tensor, absmax: Tensor, quant_map: Tensor, nested_absmax: Tensor | None,
    nested_quant_map: Tensor | None, offset: Tensor | None, quant_type: str, blocksize: int,
    shape: list[int], dtype: torch.dtype, nested_blocksize: int,
    scaling: float, dropout_p: float, seed_t: Tensor | None, backend: str, needs: list[bool],
) -> list[Tensor]:
    qw = _qw_from_args(packed, absmax, quant_map, nested_absmax, nested_quant_map, offset, quant_type, blocksize, shape, dtype, nested_blocksize)
    seed = int(seed_t.item()) if seed_t is not None else 0
    grads = _ops(backend).qlora_backward(dy, x, qw, lora_A, lora_B, s, scaling, dropout_p, seed, tuple(needs))
    return [g if g is not None else dy.new_empty(0) for g in grads]  # custom ops return no None


@_qlora_bwd_op.register_fake
def _(dy, x, lora_A, lora_B, s, packed, absmax, quant_map, nested_absmax, nested_quant_map, offset,
      quant_type, blocksize, shape, dtype, nested_blocksize, scaling, dropout_p, seed_t, backend, needs):
    shapes = [x.shape, tuple(shape), lora_A.shape, lora_B.shape, (dy.shape[1],)]
    return [dy.new_empty(sh if need else (0,)) for sh, need in zip(shapes, needs)]


class QLoRALinearFunction(torch.autograd.Function):
    """``y = x deq(W)^T + scaling * dropout(x) A^T B^T + bias`` on 2-D x [M, K].

    Saved for backward: x (the caller's tensor), S = dropout(x) A^T [M, r],
    lora_A, lora_B and the integer seed; the 4-bit weight is held by reference
    (the module's buffers), never dequantized into a saved tensor. Gradients
    (D = the dropout, linear and self-adjoint; W frozen):
      dS = scaling * dY B;  dB = scaling * dY^T S;  dA = dS^T D(x);
      dx = dY deq(W) + D(dS A);  dbias = sum_m dY.
    Under torch.compile (or with a tensor seed) both halves run as the custom ops above.
    """

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, bias, qweight, scaling, dropout_p, seed, backend):  # type: ignore[override]
        ctx.compiled = isinstance(seed, Tensor) or torch.compiler.is_compiling()
        if ctx.compiled:
            seed_t = seed if isinstance(seed, Tensor) else None
            y, s = _qlora_fwd_op(x, lora_A, lora_B, bias, *_qw_args(qweight), scaling, dropout_p, seed_t, backend)
            ctx.save_for_backward(x, lora_A, lora_B, s, seed_t)
        else:
            y, s = _ops(backend).qlora_forward(x, qweight, lora_A, lora_B, scaling, bias, dropout_p, seed)
            ctx.save_for_backward(x, lora_A, lora_B, s)
        ctx.qweight = qweight
        ctx.scaling = scaling
        ctx.dropout_p = dropout_p
        ctx.seed = seed
        ctx.backend = backend
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, lora_A, lora_B, s, *seed_t = ctx.saved_tensors
        need = ctx.needs_input_grad
        needs = (need[0], False, need[1], need[2], ctx.has_bias and need[3])
        if ctx.compiled:
            grads = _qlora_bwd_op(
                dy, x, lora_A, lora_B, s, *_qw_args(ctx.qweight), ctx.scaling, ctx.dropout_p, seed_t[0], ctx.backend,
                list(needs),
            )
            dx, _, da, db, dbias = (g if n else None for g, n in zip(grads, needs))
        else:
            dx, _, da, db, dbias = _ops(ctx.backend).qlora_backward(
                dy, x, ctx.qweight, lora_A, lora_B, s, ctx.scaling, ctx.dropout_p, ctx.seed, needs
            )
        return dx, da, db, dbias, None, None, None, None, None


def _check_args(x, qweight, lora_A, lora_B, bias, scaling, dropout) -> None:
    if not isinstance(qweight, QuantizedWeight):
        raise TypeError(f"qweight must be a fastlora.quant.QuantizedWeight, got {type(qweight).__name__}")
    if len(qweight.shape) != 2:
        raise ValueError(f"qweight must hold a 2-D [out_features, in_features] weight, got shape {qweight.shape}")
    check_lora_operands(x, "qweight", qweight.shape, lora_A, lora_B, bias, scaling, dropout)
    if qweight.device != x.device:
        raise ValueError(f"qweight is on {qweight.device} but x is on {x.device}; all tensors must share a device")


def qlora_linear(
    x: Tensor,
    qweight: QuantizedWeight,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    bias: Tensor | None = None,
    *,
    dropout: float = 0.0,
    training: bool = True,
) -> Tensor:
    """QLoRA linear layer: ``x deq(W)^T + scaling * (dropout(x) A^T) B^T + bias``.

    Args:
      x: [..., K] (any leading dims, any strides); the weight is dequantized to x's dtype.
      qweight: the frozen 4-bit weight [N, K] (:class:`fastlora.quant.QuantizedWeight`).
      lora_A: [r, K]; lora_B: [N, r]; bias: [N] or None; the bias in x's dtype, the
        adapters in x's dtype or float32 (the LoRA branch then runs in fp32).
      scaling: ``alpha / r`` (or ``alpha / sqrt(r)``); dropout: on the LoRA
        branch's input, only when ``training``.
    Returns [..., N] in x's dtype (under ``torch.autocast``: the autocast dtype,
    every tensor cast first, as nn.Linear does).
    """
    device_type = x.device.type if isinstance(x, Tensor) else "cpu"
    if isinstance(x, Tensor) and x.is_floating_point() and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, lora_A, lora_B = (t.to(dtype) for t in (x, lora_A, lora_B))
        bias = bias.to(dtype) if bias is not None else None
        with torch.autocast(device_type, enabled=False):
            return qlora_linear(x, qweight, lora_A, lora_B, scaling, bias, dropout=dropout, training=training)
    _check_args(x, qweight, lora_A, lora_B, bias, scaling, dropout)
    x2d, lora_A, lora_B, scaling, p, seed, backend = prepare_call(x, lora_A, lora_B, scaling, dropout, training)
    y = QLoRALinearFunction.apply(x2d, lora_A, lora_B, bias, qweight, scaling, p, seed, backend)
    return with_leading_dims(y, x)


# -- the module ----------------------------------------------------------------

# Quant-state tensors kept as buffers: (buffer name, QuantizedWeight field).
_STATE_BUFFERS = (
    ("weight", "packed"),
    ("weight_absmax", "absmax"),
    ("weight_quant_map", "quant_map"),
    ("weight_nested_absmax", "nested_absmax"),
    ("weight_nested_quant_map", "nested_quant_map"),
    ("weight_offset", "offset"),
)


class QLoRALinear(nn.Module):
    """A linear layer with a frozen 4-bit base weight and a trainable LoRA update.

    ``y = x deq(W)^T + scaling * dropout(x) A^T B^T + bias``, ``lora_A`` [r, in],
    ``lora_B`` [out, r], ``scaling = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA),
    initialised as PEFT does (B = 0: a fresh layer computes its 4-bit base).

    Storage: the 4-bit weight only, as buffers (no full-precision copy): the
    packed codes (``weight``, uint8 [(n + 1) // 2, 1], as bitsandbytes'),
    the absmax and code tables (``weight_absmax``, ...). ``state_dict()`` uses
    bitsandbytes' ``Linear4bit`` keys (``weight``, ``weight.absmax``,
    ``weight.quant_map``, ``weight.nested_absmax``, ``weight.nested_quant_map``,
    ``weight.quant_state.bitsandbytes__nf4``) plus ``lora_A``, ``lora_B``,
    ``bias``; ``load_state_dict`` validates the quant state against the layer.
    ``module.to(dtype)`` / ``.half()`` cast the adapters and bias but never
    the quant state.

    Compute dtype: ``compute_dtype`` if given (x is cast to it and the output
    back to x's dtype, as bitsandbytes' Linear4bit does), else x's dtype.
    """

    is_adapter_layer = True  # apply_lora / apply_vera never wrap it again

    def __init__(
        self,
        qweight: QuantizedWeight,
        bias: Tensor | None = None,
        *,
        r: int = 8,
        alpha: float = 8.0,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "default",
        compute_dtype: torch.dtype | None = None,
        lora_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(qweight, QuantizedWeight):
            raise TypeError(f"qweight must be a fastlora.quant.QuantizedWeight, got {type(qweight).__name__}")
        if len(qweight.shape) != 2:
            raise ValueError(f"qweight must hold a 2-D [out_features, in_features] weight, got shape {qweight.shape}")
        check_lora_hyperparameters(r, alpha, dropout)
        if check_init(init) not in ("default", "gaussian"):
            raise NotImplementedError(
                f"QLoRALinear(init={init!r}): PiSSA/OLoRA factorise and rewrite the base weight, which a 4-bit "
                "layer cannot do exactly; only 'default' and 'gaussian' are supported on a 4-bit base"
            )
        if compute_dtype is not None and compute_dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise ValueError(f"compute_dtype must be a floating dtype or None, got {compute_dtype!r}")
        self.out_features, self.in_features = qweight.shape
        self.compute_dtype = compute_dtype
        self._set_quant_state(qweight)
        if bias is not None:
            if tuple(bias.shape) != (self.out_features,):
                raise ValueError(f"bias must have shape [{self.out_features}], got {tuple(bias.shape)}")
            bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias.detach().clone())
            bias.requires_grad_(False)
        self.bias = bias
        self.r = r
        self.alpha = float(alpha)
        self.dropout = float(dropout)
        self.use_rslora = bool(use_rslora)
        self.scaling = lora_scaling(r, alpha, use_rslora)
        self.merged = False
        factory = {"device": qweight.device, "dtype": lora_dtype or qweight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **factory))
        self.reset_lora_parameters(init)

    # -- the quant state -------------------------------------------------------
    def _set_quant_state(self, qw: QuantizedWeight) -> None:
        self.quant_type = qw.quant_type
        self.blocksize = qw.blocksize
        self.double_quant = qw.double_quant
        self.nested_blocksize = qw.nested_blocksize
        self.weight_dtype = qw.dtype  # the dtype the weight had before quantization
        for name, field in _STATE_BUFFERS:
            self.register_buffer(name, getattr(qw, field), persistent=False)

    @property
    def qweight(self) -> QuantizedWeight:
        """The 4-bit weight as a :class:`QuantizedWeight` (views of the buffers, no copy)."""
        return QuantizedWeight(
            packed=self.weight,
            absmax=self.weight_absmax,
            quant_map=self.weight_quant_map,
            quant_type=self.quant_type,
            blocksize=self.blocksize,
            shape=(self.out_features, self.in_features),
            dtype=self.weight_dtype,
            nested_absmax=self.weight_nested_absmax,
            nested_quant_map=self.weight_nested_quant_map,
            offset=self.weight_offset,
            nested_blocksize=self.nested_blocksize,
        )

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """deq(W) [out, in] in ``dtype`` (default: the weight's original dtype); a new tensor."""
        return dequantize_4bit(self.qweight, dtype)

    def _apply(self, fn, recurse=True):
        # NOTE: .half() / .to(dtype) must not cast the quant state (fp32 absmax
        # and code tables): those buffers only follow device moves.
        state = {name: getattr(self, name) for name, _ in _STATE_BUFFERS}
        super()._apply(fn, recurse)
        for name, old in state.items():
            new = getattr(self, name)
            if old is not None and new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(device=new.device)
        return self

    # -- construction ----------------------------------------------------------
    @torch.no_grad()
    def reset_lora_parameters(self, init: str = "default") -> None:
        """PEFT's initialisations: ``"default"`` (A kaiming-uniform a=sqrt(5)),
        ``"gaussian"`` (A ~ N(0, std=1/r)); B = 0 in both."""
        if init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        r: int = 8,
        alpha: float = 8.0,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "default",
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
    ) -> "QLoRALinear":
        """Quantize ``linear``'s weight to 4 bits (bit-identical to bitsandbytes) and
        add an adapter; the bias is shared (not copied) and frozen. The adapters
        take the weight's dtype and device. ``linear`` itself is unchanged."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        check_lora_hyperparameters(r, alpha, dropout)
        qw = quantize_4bit(linear.weight.detach(), quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)
        self = cls(
            qw, linear.bias, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, init=init, compute_dtype=compute_dtype
        )
        self.train(linear.training)
        return self

    @classmethod
    def from_bnb(
        cls,
        linear4bit: nn.Module,
        *,
        r: int = 8,
        alpha: float = 8.0,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "default",
        compute_dtype: torch.dtype | None = None,
    ) -> "QLoRALinear":
        """Wrap a (quantized) bitsandbytes ``Linear4bit``: its quant state is shared
        (not copied), its bias shared and frozen. ``compute_dtype`` defaults to
        the Linear4bit's own, if it has one."""
        qw = QuantizedWeight.from_bnb(linear4bit)
        if compute_dtype is None:
            compute_dtype = getattr(linear4bit, "compute_dtype", None)
        self = cls(
            qw, linear4bit.bias, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, init=init, compute_dtype=compute_dtype
        )
        self.train(linear4bit.training)
        return self

    # -- forward ---------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        lora_A, lora_B, scaling = self.lora_A, self.lora_B, self.scaling
        if self.merged:  # the update is in the 4-bit weight (merge_and_quantize)
            lora_A, lora_B, scaling = lora_A.detach(), lora_B.detach(), 0.0
        bias = self.bias
        if isinstance(x, Tensor) and torch.is_autocast_enabled(x.device.type):
            return qlora_linear(x, self.qweight, lora_A, lora_B, scaling, bias, dropout=self.dropout, training=self.training)
        dtype = self.compute_dtype or x.dtype
        cast = lambda t: t if t is None or t.dtype == dtype else t.to(dtype)  # noqa: E731
        y = qlora_linear(
            cast(x), self.qweight, cast(lora_A), cast(lora_B), scaling, cast(bias),
            dropout=self.dropout, training=self.training,
        )  # fmt: skip
        return y if y.dtype == x.dtype else y.to(x.dtype)

    # -- merging ---------------------------------------------------------------
    @torch.no_grad()
    def delta_weight(self) -> Tensor:
        """``scaling * B @ A`` [out, in] in float32 (float64 for float64 adapters)."""
        acc = torch.float64 if self.lora_A.dtype == torch.float64 else torch.float32
        return (self.lora_B.to(acc) @ self.lora_A.to(acc)) * self.scaling

    @torch.no_grad()
    def merged_weight(self) -> Tensor:
        """deq(W) + scaling * B @ A, in float32 (float64 for float64 adapters); a new tensor."""
        delta = self.delta_weight()
        weight = self.dequantized_weight(delta.dtype)
        return weight if self.merged else weight + delta

    @torch.no_grad()
    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A full-precision ``nn.Linear`` with the update merged onto the dequantized
        weight (in fp32, rounded once to ``dtype``, default the weight's original
        dtype). This layer is unchanged."""
        dtype = dtype or self.weight_dtype
        device = self.weight.device
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=device, dtype=dtype)
        out.weight.copy_(self.merged_weight().to(dtype))
        out.weight.requires_grad_(False)
        if self.bias is not None:
            out.bias.copy_(self.bias)
            out.bias.requires_grad_(False)
        out.train(self.training)
        return out

    def merge(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """Same as :meth:`to_linear`: merging into a 4-bit weight in place would
        re-quantize (lossy), so the merge returns a full-precision layer. Use
        :meth:`merge_and_quantize` to re-quantize explicitly."""
        return self.to_linear(dtype)

    @torch.no_grad()
    def merge_and_quantize(self) -> dict[str, float]:
        """Merge in place by re-quantizing deq(W) + scaling * B @ A with this layer's
        quant type, blocksize and double quantization; later forwards skip the
        adapter. Lossy: returns (and keeps in ``self.merge_error``) the error of the
        re-quantized weight against the exact fp32 merge: ``max_abs``,
        ``rel_frobenius`` (||deq(W') - W_merged|| / ||W_merged||) and, for
        comparison, ``base_rel_frobenius`` (the same for the original 4-bit weight
        against its own merge target, i.e. the adapter's share that is kept)."""
        if self.merged:
            raise RuntimeError("merge_and_quantize: the adapter is already merged into the 4-bit weight")
        target = self.merged_weight().float()
        qw = quantize_4bit(
            target.to(self.weight_dtype), quant_type=self.quant_type, blocksize=self.blocksize, double_quant=self.double_quant
        )
        got = dequantize_4bit(qw, torch.float32)
        norm = target.norm().clamp_min(torch.finfo(torch.float32).tiny)
        before = self.dequantized_weight(torch.float32)
        report = {
            "max_abs": float((got - target).abs().max()),
            "rel_frobenius": float((got - target).norm() / norm),
            "base_rel_frobenius": float((before - target).norm() / norm),
        }
        self._set_quant_state(qw)
        self.merged = True
        self.merge_error = report
        return report

    def unmerge(self) -> None:
        """Not offered: the merged weight was re-quantized to 4 bits, which rounds it
        to the nearest codes; subtracting the update afterwards cannot restore the
        original codes, so an unmerge could not be exact."""
        raise RuntimeError(
            "QLoRALinear.unmerge is not supported: merging into a 4-bit weight re-quantizes it "
            "(merge_and_quantize), which is lossy, so subtracting the update cannot restore the original "
            "4-bit weight exactly. Keep the unmerged layer (merge() / to_linear() return a new full-precision "
            "nn.Linear and leave this layer unchanged)."
        )

    # -- state dict --------------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for key, t in self.qweight.state_dict(prefix + "weight").items():
            destination[key] = t if keep_vars else t.detach()
        if self.merged:
            destination[prefix + "merged"] = torch.tensor(True)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        base = prefix + "weight"
        ours = {k[len(prefix) :]: v for k, v in state_dict.items() if k == base or k.startswith(base + ".")}
        consumed = {prefix + k for k in ours}
        merged_key = prefix + "merged"
        unexpected_keys[:] = [k for k in unexpected_keys if k not in consumed and k != merged_key]
        if "weight" not in ours:
            missing_keys.append(base)
            return
        try:
            qw = QuantizedWeight.from_state_dict(ours, "weight")
        except (KeyError, ValueError, TypeError) as exc:
            error_msgs.append(f"{base}: the 4-bit quant state is invalid: {exc}")
            return
        expected = (self.out_features, self.in_features)
        if qw.shape != expected:
            error_msgs.append(f"{base}: the state dict holds a weight of shape {qw.shape}, this layer expects {expected}")
            return
        mine = (self.quant_type, self.blocksize, self.double_quant)
        theirs = (qw.quant_type, qw.blocksize, qw.double_quant)
        if mine != theirs:
            error_msgs.append(
                f"{base}: the state dict holds (quant_type, blocksize, double_quant)={theirs}, this layer was "
                f"built with {mine}; build the layer with the same settings (or QLoRALinear(QuantizedWeight.from_state_dict(...)))"
            )
            return
        with torch.no_grad():
            for name, field in _STATE_BUFFERS:
                src = getattr(qw, field)
                if src is not None:
                    getattr(self, name).copy_(src.reshape(getattr(self, name).shape))
        self.weight_dtype = qw.dtype
        self.nested_blocksize = qw.nested_blocksize
        self.merged = bool(state_dict.get(merged_key, torch.tensor(False)).item())

    # -- reporting ---------------------------------------------------------------
    def weight_nbytes(self) -> int:
        """Bytes of the base weight's storage: packed codes + absmax (+ nested
        absmax and offset); code tables excluded (shared constants)."""
        return self.qweight.nbytes(include_tables=False)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}, dropout={self.dropout:g}, "
            f"quant_type={self.quant_type}, blocksize={self.blocksize}, double_quant={self.double_quant}"
            + (f", compute_dtype={self.compute_dtype}" if self.compute_dtype is not None else "")
            + (", rslora=True" if self.use_rslora else "")
            + (", merged=True" if self.merged else "")
        )


__all__ = [
    "QLoRALinear",
    "QLoRALinearFunction",
    "qlora_backward",
    "qlora_forward",
    "qlora_linear",
]
