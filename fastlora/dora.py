"""DoRA (weight-decomposed low-rank adaptation) on fastlora's fused LoRA ops.

``y = (m / ||W0 + s B A||_row) * (x W0^T + s D(x) A^T B^T) + bias``

with a trainable magnitude vector m [N] (PEFT's ``lora_magnitude_vector``), the
row norm treated as a constant in backward (detached, as in PEFT and section
4.3 of the DoRA paper), and D the LoRA dropout.

The row norms never materialise ``B @ A`` or any other [N, K] temporary. With
``P = A W0^T`` [r, N] and ``G = A A^T`` [r, r] (both per step, under no_grad, in
float32):

  ``||W0_n + s B_n A||^2 = ||W0_n||^2 + 2 s B_n . P[:, n] + s^2 B_n G B_n^T``

where ``||W0_n||^2`` is one pass over a dense W0 per call (never stale, even
after an edit through ``weight.data``); on a 4-bit base (QDoRA) the same
quantities come from the dequantized weight, dequantized in bounded row chunks
(never a full [N, K]), and ``||W0_n||^2`` is cached per quant state.

Dense DoRA (:func:`dora_linear`, :class:`DoRALinear`) runs as one autograd
op, :class:`DoRALinearFunction`: its forward is the backend's ``dora_forward``
(on the Triton backend the LoRA GEMM itself scales its fp32 tile by
g = m / norm [N] in the epilogue, before the bias, and also stores the
pre-scale tile Z: 2 launches, the same as LoRA), its backward plain torch ops
around the backend's LoRA backward. What it saves for backward: x (the
caller's tensor), S = D(x) A^T [M, r], Z [M, N] (x's dtype; needed for dm)
and the norm [N] (fp32; float64 for float64 inputs), besides the parameters.
It is used in eager mode and under torch.compile (its forward is the custom op
``fastlora::dora_fwd``, its backward reuses ``fastlora::lora_bwd``); under
``torch.autocast`` and for QDoRA (:class:`QDoRALinear`) the layer is the
composed form: the fused LoRA op (:func:`fastlora.lora_linear` /
:func:`fastlora.qlora_linear`) scaled per output column by ``m / norm`` plus
the bias as plain autograd ops, which saves the same Z (as autograd's copy of
the pre-scale output) and the [N] scale.

Dropout (training only, ``dropout > 0``): fastlora applies the dropout to the
LoRA branch's input only, inside the scaled term above. PEFT 0.21 instead
computes ``W0 x + (g - 1) W0 D(x) + g s B A D(x)`` (a second base GEMM on the
dropped-out input). Both have the same expectation and agree exactly without
dropout and in eval mode; with dropout in training the noise differs.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._backend import resolve_backend
from ._fused import FusedOp, autocast_dtype, backend_module
from .functional import lora_linear
from .modules import LoRALinear
from .qlora import QLoRALinear, qlora_linear
from .quant import QuantizedWeight, unpack_codes
from .validation import check_dense_operands, check_dense_weight, check_same_device, check_vector

# Rows of the base weight dequantized (or upcast) at a time for the norms:
# about this many elements per chunk (4 MiB of fp32).
_CHUNK_ELEMENTS = 1 << 20


def _acc_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _row_chunks(weight: Tensor | QuantizedWeight, dtype: torch.dtype):
    """Yield ``(n0, n1, rows)``: rows n0..n1 of the (dequantized) weight in ``dtype``,
    a bounded chunk (no full [N, K] copy unless the weight already is one in ``dtype``)."""
    n, k = weight.shape
    if isinstance(weight, Tensor) and weight.dtype == dtype:
        yield 0, n, weight  # a view: nothing allocated
        return
    step = max(1, _CHUNK_ELEMENTS // max(k, 1))
    absmax = weight.absmax_fp32() if isinstance(weight, QuantizedWeight) else None
    for n0 in range(0, n, step):
        n1 = min(n, n0 + step)
        if absmax is None:
            yield n0, n1, weight[n0:n1].to(dtype)
        else:
            yield n0, n1, _dequantize_rows(weight, absmax, n0, n1).to(dtype)


def _dequantize_rows(qw: QuantizedWeight, absmax: Tensor, n0: int, n1: int) -> Tensor:
    """Rows n0..n1 of deq(W) in float32, bit-identical to ``dequantize_4bit`` (the
    same single fp32 product ``code[q] * absmax[i // blocksize]``)."""
    k = qw.shape[1]
    a, b = n0 * k, n1 * k  # flat element range
    packed = qw.packed.reshape(-1)[a // 2 : (b + 1) // 2]
    codes = unpack_codes(packed, 2 * packed.numel())[a % 2 : a % 2 + (b - a)]
    index = torch.arange(a, b, device=packed.device) // qw.blocksize
    return (qw.quant_map[codes] * absmax[index]).view(n1 - n0, k)


def weight_sq_norm(weight: Tensor | QuantizedWeight, dtype: torch.dtype = torch.float32) -> Tensor:
    """``||W_n||^2`` per row [N] in ``dtype`` (W dequantized for a 4-bit weight), no grad."""
    out = torch.empty(weight.shape[0], dtype=dtype, device=weight.device)
    with torch.no_grad():
        for n0, n1, rows in _row_chunks(weight, dtype):
            torch.linalg.vector_norm(rows, dim=1, out=out[n0:n1])
        out.square_()
    return out


def dora_row_norm(
    weight: Tensor | QuantizedWeight,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    weight_sq: Tensor | None = None,
) -> Tensor:
    """``||W + scaling * B @ A||`` per row [N], float32 (float64 for float64 inputs),
    detached, without forming ``B @ A`` or any [N, K] temporary.

    weight: [N, K] (or a 4-bit :class:`QuantizedWeight`); lora_A [r, K]; lora_B [N, r];
    weight_sq: ``||W_n||^2`` [N] if already known (:func:`weight_sq_norm`).
    Uses ``||W_n||^2 + 2 s B_n . (A W^T)[:, n] + s^2 B_n (A A^T) B_n^T``; the last
    two terms are O(r N K) and O(r^2 K + r^2 N) flops.
    """
    acc = _acc_dtype(lora_A, lora_B) if isinstance(weight, QuantizedWeight) else _acc_dtype(weight, lora_A, lora_B)
    device_type = lora_A.device.type
    no_autocast = torch.autocast(device_type, enabled=False) if device_type != "meta" else contextlib.nullcontext()
    with torch.no_grad(), no_autocast:
        a = lora_A.detach().to(acc)
        b = lora_B.detach().to(acc)
        if weight_sq is None:
            weight_sq = weight_sq_norm(weight, acc)
        if isinstance(weight, QuantizedWeight) and acc == torch.float32 and resolve_backend(a.device) == "triton":
            # QDoRA on the kernels: A deq(W)^T [r, N] is the dequant-in-GEMM with A as
            # its left operand and no LoRA term (1 launch, W never materialized).
            from .kernels import nf4

            aw = nf4.qlora_expand_gemm(a, weight, a.new_zeros(a.shape[0], 1), a.new_zeros(weight.shape[0], 1), 0.0)
        else:
            aw = torch.empty(a.shape[0], weight.shape[0], dtype=acc, device=a.device)  # A W^T [r, N]
            for n0, n1, rows in _row_chunks(weight, acc):
                torch.mm(a, rows.t(), out=aw[:, n0:n1])
        gram = a @ a.t()  # A A^T [r, r]
        cross = (b * aw.t()).sum(dim=1)  # B_n . (A W_n^T)
        quad = ((b @ gram) * b).sum(dim=1)  # B_n A A^T B_n^T
        sq = weight_sq.to(acc) + (2.0 * scaling) * cross + (scaling * scaling) * quad
        # NOTE: the sum can round below zero only when the row norm is at the level
        # of the rounding error of the terms (W_n + s B_n A ~ 0); clamp as sqrt needs.
        return sq.clamp_min_(0.0).sqrt_()


def _weight_key(weight: Tensor | QuantizedWeight) -> tuple | None:
    """Identity of the base weight's current values (None: cannot tell, do not cache)."""
    parts = [weight.packed, weight.absmax] if isinstance(weight, QuantizedWeight) else [weight]
    try:
        return tuple((t.data_ptr(), t._version, tuple(t.shape), t.dtype, t.device) for t in parts)
    except RuntimeError:  # inference-mode tensors have no version counter
        return None


def _scale_columns(y_pre: Tensor, magnitude: Tensor, norm: Tensor, bias: Tensor | None) -> Tensor:
    """``y_pre * (magnitude / norm) + bias`` over the last dim; the scale is formed in
    float32 (float64) and rounded once to y's dtype; autograd saves y_pre for dm."""
    scale = (magnitude.to(norm.dtype) / norm).to(y_pre.dtype)
    if bias is None:
        return y_pre * scale
    return torch.addcmul(bias.to(y_pre.dtype), y_pre, scale)


# -- the op --------------------------------------------------------------------


def _forward(backend, seed, x, weight, lora_A, lora_B, magnitude, bias, norm, scaling, dropout_p):
    g = magnitude.detach().to(norm.dtype) / norm  # [N], fp32 (float64)
    return backend_module(backend).dora_forward(x, weight, lora_A, lora_B, scaling, g, bias, dropout_p, seed)


def _differentiable_forward(seed, x, weight, lora_A, lora_B, magnitude, bias, norm, scaling, dropout_p):
    g = magnitude.to(norm.dtype) / norm  # differentiable in m (the norm is a constant, as in forward)
    return backend_module("reference").dora_forward(x, weight, lora_A, lora_B, scaling, g, bias, dropout_p, seed)[0]


def _backward(backend, seed, needs, dy, saved, new, consts):
    x, weight, lora_A, lora_B, magnitude, norm = saved
    z, s = new
    scaling, dropout_p = consts
    lora_needs = (needs[0], needs[1], needs[2], needs[3], False)
    dx = dw = da = db = dm = dbias = None
    if any(lora_needs):
        g = magnitude.detach().to(norm.dtype) / norm  # the forward's g, recomputed (same op, same bits)
        dz = dy * g.to(dy.dtype)
        dx, dw, da, db, _ = backend_module(backend).lora_backward(
            dz, x, weight, lora_A, lora_B, s, scaling, dropout_p, seed, lora_needs
        )
    if needs[4]:
        dm = (dy * z).sum(0, dtype=norm.dtype).div_(norm).to(magnitude.dtype)
    if needs[5]:
        dbias = dy.sum(0)
    return dx, dw, da, db, dm, dbias, None


def _fake_forward(x, weight, lora_A, lora_B, magnitude, bias, norm, scaling, dropout_p):
    m, n = x.shape[0], weight.shape[0]
    return x.new_empty(m, n), x.new_empty(m, n), lora_A.new_empty(m, lora_A.shape[0])


def _fake_backward(needs, dy, saved, new, consts):
    x, weight, lora_A, lora_B, magnitude, _ = saved
    grads = [t.new_empty(t.shape) if n else None for t, n in zip((x, weight, lora_A, lora_B, magnitude), needs)]
    return grads + [dy.new_empty(dy.shape[1]) if needs[5] else None, None]


def _validate(x, inputs, consts) -> None:
    check_dense_operands(
        x, inputs["weight"], inputs["lora_A"], inputs["lora_B"], inputs["bias"], consts["scaling"], consts["dropout_p"]
    )
    check_same_device(x, magnitude=inputs["magnitude"])


DORA = FusedOp(
    "dora",
    function_name="DoRALinearFunction",
    inputs=[
        ("x", "Tensor"), ("weight", "Tensor"), ("lora_A", "Tensor"), ("lora_B", "Tensor"), ("magnitude", "Tensor"),
        ("bias", "Tensor?"), ("norm", "Tensor"),
    ],
    saved=("x", "weight", "lora_A", "lora_B", "magnitude", "norm"),
    n_new=2,
    forward=_forward,
    backward=_backward,
    fake_forward=_fake_forward,
    fake_backward=_fake_backward,
    validate=_validate,
    autocast=(),  # dora_linear runs the composed form under autocast
    differentiable_forward=_differentiable_forward,
    doc="""``y = g * z + bias`` on 2-D x [M, K], with ``z = x W^T + scaling * D(x) A^T B^T``
    and ``g = m / norm`` [N], the row norm ``||W + scaling B A||`` given (detached).

    Saved for backward: x (the caller's tensor), S = D(x) A^T [M, r], z [M, N] in
    x's dtype, the norm [N] (fp32, or float64), the integer dropout seed, and the
    parameters (weight, A, B, m: by reference). Gradients (the norm a constant):
      dZ = g * dY (a temporary);  dx, dW, dA, dB = the LoRA op's gradients at dZ
        (``lora_backward``: dS = scaling dZ B, dB = scaling dZ^T S, dA = dS^T D(x),
        dx = dZ W + D(dS A), dW = dZ^T x);
      dbias = sum_m dY;  dm = sum_m dY * z / norm (dy/dm_n = z_n / norm_n; summed in fp32).
    """,
)  # fmt: skip
DoRALinearFunction = DORA.function


def dora_linear(
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    scaling: float,
    bias: Tensor | None = None,
    *,
    dropout: float = 0.0,
    training: bool = True,
    weight_sq: Tensor | None = None,
) -> Tensor:
    """DoRA linear layer: ``(m / ||W + s B A||_row) * (x W^T + s D(x) A^T B^T) + bias``.

    Args:
      x: [..., K]; weight: [N, K] (frozen); lora_A: [r, K]; lora_B: [N, r];
        magnitude: [N] (m); bias: [N] or None. Dtypes as for :func:`fastlora.lora_linear`.
      scaling: the LoRA scale; dropout: on the LoRA branch's input, only when ``training``.
      weight_sq: ``||W_n||^2`` [N] (float32, or float64 for float64 inputs) if cached
        by the caller (else computed).
    The row norm is detached (PEFT's DoRA). Returns [..., N] in x's dtype
    (the autocast dtype under ``torch.autocast``).

    Outside autocast this is :data:`DORA` (the column scale in the GEMM's
    epilogue on the Triton backend; saves x, S, Z and the norm); under
    ``torch.autocast`` the composed form (see the module docstring).
    """
    check_dense_weight(None, weight)  # 2-D; its dtype and device are checked with x's below
    check_vector(magnitude, weight.shape[0], "magnitude")
    if autocast_dtype(x) is not None:
        y_pre = lora_linear(x, weight, lora_A, lora_B, scaling, None, dropout=dropout, training=training)
        norm = dora_row_norm(weight, lora_A, lora_B, scaling, weight_sq)
        return _scale_columns(y_pre, magnitude, norm, bias)
    check_dense_operands(x, weight, lora_A, lora_B, bias, scaling, dropout)
    norm = dora_row_norm(weight, lora_A, lora_B, float(scaling), weight_sq)  # the adapters as given (fp32 if mixed)
    return DORA(x, weight, lora_A, lora_B, magnitude, bias, norm, scaling=scaling, dropout=dropout, training=training)


class _DoRAMixin:
    """What DoRALinear and QDoRALinear share: the magnitude, the cached ||W0||^2."""

    def _base_weight(self) -> Tensor | QuantizedWeight:
        raise NotImplementedError

    def _weight_sq(self) -> Tensor:
        """||W0_n||^2 [N] in float32 (float64 for float64).

        A dense W0 is read again every call: one pass over [N, K], 1/M of the
        forward GEMM's work, and never stale (an edit through ``weight.data``
        bumps no version counter, so a cache could not see it). A 4-bit W0 costs
        a dequantization, so it is cached per quant state (refreshed when the
        buffers are replaced or their storage or version counter changes)."""
        weight = self._base_weight()
        dense = [weight] if isinstance(weight, Tensor) else []
        acc = _acc_dtype(*dense, self.lora_A, self.lora_B)  # as dora_row_norm picks it
        if dense or torch.compiler.is_compiling():  # NOTE: data_ptr cannot be traced; recompute
            return weight_sq_norm(weight, acc)
        key = (_weight_key(weight), acc)
        if key[0] is None:
            return weight_sq_norm(weight, acc)
        cache = self.__dict__.get("_dora_weight_sq")
        if cache is None or cache[0] != key:
            cache = (key, weight_sq_norm(weight, acc))
            self.__dict__["_dora_weight_sq"] = cache
        return cache[1]

    def weight_norm(self) -> Tensor:
        """``||W0 + scaling * B @ A||`` per row [N] (float32, detached): DoRA's denominator."""
        return dora_row_norm(self._base_weight(), self.lora_A, self.lora_B, self.scaling, self._weight_sq())

    def peft_tensors(self, adapter_name: str = "default") -> dict[str, Tensor]:
        """The LoRA entries plus PEFT's ``lora_magnitude_vector`` [out] (no ``.weight``);
        a DoRA layer holds one adapter, ``"default"``."""
        if adapter_name != "default":
            raise KeyError(f"{type(self).__name__} holds one adapter, 'default'; got adapter_name={adapter_name!r}")
        return {**super().peft_tensors(), "lora_magnitude_vector": self.lora_magnitude}

    @torch.no_grad()
    def reset_magnitude(self) -> None:
        """PEFT's init: ``m = ||W0 + scaling * B @ A||_row`` (so the layer starts as
        its LoRA layer; with B = 0, as its base layer), in the adapters' dtype."""
        norm = self.weight_norm().to(self.lora_A.dtype)
        mag = self._parameters.get("lora_magnitude")
        if mag is None or mag.shape != norm.shape:
            self.lora_magnitude = nn.Parameter(norm)
        else:
            mag.data = norm


class DoRALinear(_DoRAMixin, LoRALinear):
    """:class:`LoRALinear` with DoRA's trainable magnitude ``lora_magnitude`` [out].

    ``y = (m / ||W + s B A||_row) * (x W^T + s D(x) A^T B^T) + bias``, the norm
    detached (PEFT's DoRA); see the module docstring for the computation and
    what is saved for backward. ``m`` starts as ``||W + s B A||_row`` (PEFT's
    init), so a fresh layer computes its LoRA layer (with B = 0: its base).
    Adapter files store ``m`` under PEFT's key ``lora_magnitude_vector``.
    Merge (PEFT's): ``W' = m / ||W + s B A|| * (W + s B A)``; the bias is not scaled.
    """

    def _setup_lora(self, *args, **kwargs) -> None:
        super()._setup_lora(*args, **kwargs)
        self.reset_magnitude()

    def reset_lora_parameters(self, *args, **kwargs) -> None:
        super().reset_lora_parameters(*args, **kwargs)
        if "lora_magnitude" in self._parameters:
            self.reset_magnitude()

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> DoRALinear:
        """Wrap ``linear`` (weight and bias shared, frozen) with a DoRA adapter; the
        keyword arguments are :meth:`LoRALinear.from_linear`'s (r, alpha, dropout,
        use_rslora, init)."""
        return super().from_linear(linear, **kwargs)

    def _base_weight(self) -> Tensor:
        return self.weight

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        return dora_linear(
            x, self.weight, self.lora_A, self.lora_B, self.lora_magnitude, self.scaling, self.bias,
            dropout=self.dropout, training=self.training, weight_sq=self._weight_sq(),
        )  # fmt: skip

    @torch.no_grad()
    def _merge_target(self) -> tuple[Tensor, Tensor]:
        delta = self.delta_weight()
        combined = self.weight.to(delta.dtype) + delta
        norm = torch.linalg.vector_norm(combined, dim=1)
        return combined.mul_((self.lora_magnitude.to(delta.dtype) / norm).unsqueeze(1)), norm

    @torch.no_grad()
    def merged_weight(self) -> Tensor:
        """``m / ||W + s B A|| * (W + s B A)`` [out, in] in float32 (float64 for
        float64 weights); a new tensor (a one-off [N, K], not a per-step one).
        Once merged: the (merged) weight itself, upcast."""
        if self.merged:
            return self.weight.to(self.delta_weight().dtype)
        return self._merge_target()[0]

    @torch.no_grad()
    def merge(self) -> None:
        """PEFT's DoRA merge: ``W <- m / ||W + s B A|| * (W + s B A)`` (in float32,
        rounded once); the norm is kept for :meth:`unmerge`."""
        if self.merged:
            return
        merged, norm = self._merge_target()
        self._merge_norm = norm
        self.weight.copy_(merged.to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """PEFT's DoRA unmerge: ``W <- W' * ||W + s B A|| / m - s B A`` with the norm
        kept at merge time."""
        if not self.merged:
            return
        delta = self.delta_weight()
        factor = self.lora_magnitude.to(delta.dtype) / self._merge_norm
        self.weight.copy_((self.weight.to(delta.dtype) / factor.unsqueeze(1) - delta).to(self.weight.dtype))
        self.merged = False
        del self._merge_norm

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the DoRA update merged in (new tensors)."""
        out = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device=self.weight.device, dtype=self.weight.dtype
        )
        out.weight.copy_(self.weight if self.merged else self.merged_weight().to(self.weight.dtype))
        if self.bias is not None:
            out.bias.copy_(self.bias)
            out.bias.requires_grad_(self.bias.requires_grad)
        out.weight.requires_grad_(self.weight.requires_grad)
        out.train(self.training)
        return out

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora=True"


LoRALinear.register_variant("dora", DoRALinear)


class QDoRALinear(_DoRAMixin, QLoRALinear):
    """QDoRA: :class:`QLoRALinear` (a frozen 4-bit base) with DoRA's magnitude
    ``lora_magnitude`` [out]: ``y = (m / ||deq(W) + s B A||_row) * (x deq(W)^T +
    s D(x) A^T B^T) + bias``. ``||deq(W)_n||^2`` (cached) and ``A deq(W)^T`` come
    from the 4-bit weight dequantized in bounded row chunks (never a full [N, K]
    in this module; the reference QLoRA op itself dequantizes a temporary, the
    Triton one in registers). ``merge`` / ``to_linear`` return a full-precision
    ``nn.Linear`` with ``m / ||deq(W) + s B A|| * (deq(W) + s B A)``.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reset_magnitude()

    def reset_lora_parameters(self, *args, **kwargs) -> None:
        super().reset_lora_parameters(*args, **kwargs)
        if "lora_magnitude" in self._parameters:
            self.reset_magnitude()

    def _base_weight(self) -> QuantizedWeight:
        return self.qweight

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:  # the DoRA update is in the 4-bit weight (merge_and_quantize)
            return super().forward(x)
        lora_A, lora_B, bias = self.lora_A, self.lora_B, self.bias
        autocast = autocast_dtype(x) is not None
        dtype = x.dtype if autocast else (self.compute_dtype or x.dtype)
        cast = (lambda t: t) if autocast else (lambda t: t if t is None or t.dtype == dtype else t.to(dtype))  # noqa: E731
        y_pre = qlora_linear(
            cast(x), self.qweight, cast(lora_A), cast(lora_B), self.scaling, None,
            dropout=self.dropout, training=self.training,
        )  # fmt: skip
        y = _scale_columns(y_pre, self.lora_magnitude, self.weight_norm(), bias)
        return y if autocast or y.dtype == x.dtype else y.to(x.dtype)

    @torch.no_grad()
    def merged_weight(self) -> Tensor:
        """``m / ||deq(W) + s B A|| * (deq(W) + s B A)`` in float32 (float64 for float64
        adapters); a new tensor. Once merged (merge_and_quantize): deq(W)."""
        if self.merged:
            return super().merged_weight()
        combined = super().merged_weight()
        norm = torch.linalg.vector_norm(combined, dim=1)
        return combined.mul_((self.lora_magnitude.to(combined.dtype) / norm).unsqueeze(1))

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora=True"


__all__ = ["DORA", "DoRALinear", "DoRALinearFunction", "QDoRALinear", "dora_linear", "dora_row_norm", "weight_sq_norm"]
