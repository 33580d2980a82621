"""QLoRA: a LoRA adapter on a frozen 4-bit (NF4 / FP4) base weight.

``y = x deq(W)^T + scaling * dropout(x) A^T B^T + bias`` with W stored in
bitsandbytes' 4-bit format (:mod:`fastlora.quant`).

* :func:`qlora_linear` - the op: one :class:`fastlora._fused.FusedOp` whose
  forward/backward are ``qlora_forward`` / ``qlora_backward`` of the backend
  (``fastlora.reference``: W dequantized to a temporary, never saved;
  ``fastlora.kernels.nf4``: W dequantized inside the GEMM tiles).
* :class:`QLoRALinear` - the module: only the 4-bit weight (as buffers, in
  bitsandbytes' state-dict layout), ``lora_A``, ``lora_B`` and the bias.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from collections.abc import Sequence

from ._fused import FusedOp, autocast_dtype, backend_module
from .modules import NamedAdapters
from .multi import qlora_linear_multi
from .quant import QuantizedWeight, dequantize_4bit, quantize_4bit
from .reference import qlora_backward, qlora_forward
from .validation import check_init, check_lora_hyperparameters, check_lora_operands, check_same_device, lora_scaling

# -- the op --------------------------------------------------------------------

# A QuantizedWeight is not an op argument type: it travels as its tensors (op
# inputs without gradients) plus its metadata (op constants).
_QW_TENSORS = ("packed", "absmax", "quant_map", "nested_absmax", "nested_quant_map", "offset")
_QW_META = ("quant_type", "blocksize", "shape", "dtype", "nested_blocksize")


def _qw_tensors(qw: QuantizedWeight) -> tuple:
    return tuple(getattr(qw, f) for f in _QW_TENSORS)


def _qw_meta(qw: QuantizedWeight) -> tuple:
    return (qw.quant_type, qw.blocksize, list(qw.shape), qw.dtype, qw.nested_blocksize)


def _qw_from(tensors, meta) -> QuantizedWeight:
    fields = dict(zip(_QW_TENSORS, tensors))
    quant_type, blocksize, shape, dtype, nested_blocksize = meta
    return QuantizedWeight(
        quant_type=quant_type, blocksize=blocksize, shape=tuple(shape), dtype=dtype, nested_blocksize=nested_blocksize,
        **fields,
    )  # fmt: skip


def _forward(backend, seed, x, lora_A, lora_B, bias, *rest):
    tensors, (scaling, dropout_p, *meta) = rest[: len(_QW_TENSORS)], rest[len(_QW_TENSORS) :]
    qw = _qw_from(tensors, meta)
    return backend_module(backend, "nf4").qlora_forward(x, qw, lora_A, lora_B, scaling, bias, dropout_p, seed)


def _backward(backend, seed, needs, dy, saved, new, consts):
    x, lora_A, lora_B, *tensors = saved
    (s,) = new
    scaling, dropout_p, *meta = consts
    qw = _qw_from(tensors, meta)
    need = (needs[0], False, needs[1], needs[2], needs[3])
    dx, _, da, db, dbias = backend_module(backend, "nf4").qlora_backward(
        dy, x, qw, lora_A, lora_B, s, scaling, dropout_p, seed, need
    )
    return (dx, da, db, dbias) + (None,) * len(_QW_TENSORS)


def _fake_forward(x, lora_A, lora_B, bias, *rest):
    shape = rest[len(_QW_TENSORS) + 4]
    return x.new_empty(x.shape[0], shape[0]), lora_A.new_empty(x.shape[0], lora_A.shape[0])


def _fake_backward(needs, dy, saved, new, consts):
    x, lora_A, lora_B = saved[:3]
    grads = [t.new_empty(t.shape) if n else None for t, n in zip((x, lora_A, lora_B), needs)]
    return grads + [dy.new_empty(dy.shape[1]) if needs[3] else None] + [None] * len(_QW_TENSORS)


def _validate(x, inputs, consts) -> None:
    shape = tuple(consts["shape"])
    check_lora_operands(
        x, "qweight", shape, inputs["lora_A"], inputs["lora_B"], inputs["bias"], consts["scaling"], consts["dropout_p"]
    )
    check_same_device(x, qweight=inputs["packed"])


QLORA = FusedOp(
    "qlora",
    function_name="QLoRALinearFunction",
    inputs=[
        ("x", "Tensor"), ("lora_A", "Tensor"), ("lora_B", "Tensor"), ("bias", "Tensor?"),
        ("packed", "Tensor"), ("absmax", "Tensor"), ("quant_map", "Tensor"), ("nested_absmax", "Tensor?"),
        ("nested_quant_map", "Tensor?"), ("offset", "Tensor?"),
    ],
    consts=[("quant_type", "str"), ("blocksize", "int"), ("shape", "int[]"), ("dtype", "ScalarType"), ("nested_blocksize", "int")],
    saved=("x", "lora_A", "lora_B"),
    held=_QW_TENSORS,
    n_new=1,
    forward=_forward,
    backward=_backward,
    fake_forward=_fake_forward,
    fake_backward=_fake_backward,
    validate=_validate,
    autocast=("x", "lora_A", "lora_B", "bias"),
    doc="""``y = x deq(W)^T + scaling * dropout(x) A^T B^T + bias`` on 2-D x [M, K].

    Saved for backward: x (the caller's tensor), S = dropout(x) A^T [M, r], the
    adapters and the 4-bit weight's tensors (by reference: the module's buffers,
    never a dequantized weight) and the integer seed. Gradients (D = the
    dropout, linear and self-adjoint; W frozen):
      dS = scaling * dY B;  dB = scaling * dY^T S;  dA = dS^T D(x);
      dx = dY deq(W) + D(dS A);  dbias = sum_m dY.
    """,
)  # fmt: skip
QLoRALinearFunction = QLORA.function


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
    if not isinstance(qweight, QuantizedWeight):
        raise TypeError(f"qweight must be a fastlora.quant.QuantizedWeight, got {type(qweight).__name__}")
    if len(qweight.shape) != 2:
        raise ValueError(f"qweight must hold a 2-D [out_features, in_features] weight, got shape {qweight.shape}")
    return QLORA(
        x, lora_A, lora_B, bias, *_qw_tensors(qweight),
        scaling=scaling, dropout=dropout, training=training, consts=_qw_meta(qweight),
    )  # fmt: skip


def is_bnb_4bit(module: nn.Module) -> bool:
    """True for a bitsandbytes ``Linear4bit`` (checked by name: bitsandbytes is optional)."""
    return type(module).__name__ == "Linear4bit" and type(module).__module__.startswith("bitsandbytes")


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


class QLoRALinear(NamedAdapters, nn.Module):
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

    Several named adapters as :class:`fastlora.LoRALinear` has them
    (:class:`fastlora.modules.NamedAdapters`): the attributes above are the
    ``"default"`` adapter's, the others live in ``lora_adapters`` (state-dict keys
    ``lora_adapters.<name>.lora_A`` / ``.lora_B``).
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
        self._init_named_adapters()
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
    def forward(self, x: Tensor, *, adapter_names: Sequence[str] | None = None) -> Tensor:
        """``x deq(W)^T + bias`` plus the active adapters' updates; ``adapter_names``:
        PEFT's mixed batch, one adapter name per row of x's first dimension."""
        if adapter_names is None and self._single_default():
            lora_A, lora_B, scaling = self.lora_A, self.lora_B, self.scaling
            if self.merged:  # the update is in the 4-bit weight (merge_and_quantize)
                lora_A, lora_B, scaling = lora_A.detach(), lora_B.detach(), 0.0
            return self._fused(x, lora_A, lora_B, scaling, self.dropout)
        return self._named_forward(x, adapter_names)

    # -- what NamedAdapters needs --------------------------------------------------
    def _fused(self, x: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, dropout: float) -> Tensor:
        bias = self.bias
        if autocast_dtype(x) is not None:
            return qlora_linear(x, self.qweight, lora_A, lora_B, scaling, bias, dropout=dropout, training=self.training)
        dtype = self.compute_dtype or x.dtype
        cast = lambda t: t if t is None or t.dtype == dtype else t.to(dtype)  # noqa: E731
        y = qlora_linear(
            cast(x), self.qweight, cast(lora_A), cast(lora_B), scaling, cast(bias),
            dropout=dropout, training=self.training,
        )  # fmt: skip
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def _fused_multi(
        self, x: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: Tensor, adapter_ids: Tensor, dropout: float
    ) -> Tensor:
        # The mixed batch in one call of the multi-adapter op on the 4-bit base, with the
        # dtype rule of _fused (the compute dtype, or autocast's).
        bias, training = self.bias, self.training
        if autocast_dtype(x) is not None:
            return qlora_linear_multi(x, self.qweight, lora_A, lora_B, scaling, adapter_ids, bias, dropout=dropout, training=training)
        dtype = self.compute_dtype or x.dtype
        cast = lambda t: t if t is None or t.dtype == dtype else t.to(dtype)  # noqa: E731
        y = qlora_linear_multi(
            cast(x), self.qweight, cast(lora_A), cast(lora_B), scaling, adapter_ids, cast(bias),
            dropout=dropout, training=training,
        )  # fmt: skip
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def _base_forward(self, x: Tensor) -> Tensor:
        # NOTE: the 4-bit base alone is the fused op with a zero rank-1 update (scaling 0):
        # no dequantized [N, K] temporary outside the op, the same rounding as a layer
        # whose adapters are zero.
        dtype = x.dtype if autocast_dtype(x) is not None else (self.compute_dtype or x.dtype)
        zero_A = x.new_zeros(1, self.in_features, dtype=dtype)
        zero_B = x.new_zeros(self.out_features, 1, dtype=dtype)
        return self._fused(x, zero_A, zero_B, 0.0, 0.0)

    def _acc_dtype(self) -> torch.dtype:
        names = self.adapter_names()
        return torch.float64 if names and self.adapter(names[0]).lora_A.dtype == torch.float64 else torch.float32

    def _adapter_device(self) -> torch.device:
        return self.weight.device

    def _adapter_dtype(self) -> torch.dtype:
        return self.weight_dtype

    def _unmerge_for_disable(self) -> None:
        self.unmerge()  # raises: a re-quantized merge cannot be undone exactly

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

    def to_base(self) -> nn.Linear:
        """The registry's name for :meth:`to_linear` (every adapter layer has one)."""
        return self.to_linear()

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
        names = self._present(self.active_adapters)
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
        self.merged_adapters = names
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
        # NOTE: the quant state is checked before anything of this layer is written (the
        # adapters and the bias included): a rejected state leaves the layer as it was.
        base = prefix + "weight"
        ours = {k[len(prefix) :]: v for k, v in state_dict.items() if k == base or k.startswith(base + ".")}
        merged_key = prefix + "merged"
        problem = None
        qw = None
        if "weight" in ours:
            try:
                qw = QuantizedWeight.from_state_dict(ours, "weight")
            except (KeyError, ValueError, TypeError) as exc:
                problem = f"{base}: the 4-bit quant state is invalid: {exc}"
        if qw is not None:
            expected = (self.out_features, self.in_features)
            mine = (self.quant_type, self.blocksize, self.double_quant)
            theirs = (qw.quant_type, qw.blocksize, qw.double_quant)
            if qw.shape != expected:
                problem = f"{base}: the state dict holds a weight of shape {qw.shape}, this layer expects {expected}"
            elif mine != theirs:
                problem = (
                    f"{base}: the state dict holds (quant_type, blocksize, double_quant)={theirs}, this layer was "
                    f"built with {mine}; build the layer with the same settings (or QLoRALinear(QuantizedWeight.from_state_dict(...)))"
                )
        if problem is not None:
            error_msgs.append(problem)
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        unexpected_keys[:] = [k for k in unexpected_keys if k not in {prefix + k for k in ours} and k != merged_key]
        if qw is None:
            missing_keys.append(base)
            return
        known = set(qw.state_dict("weight"))
        unexpected_keys.extend(prefix + k for k in ours if k not in known)  # a strict load reports stray weight.* keys
        # NOTE: the validated state's tensors replace the buffers all at once (on this layer's
        # device; a meta layer gets real tensors, as load_state_dict(assign=True) asks): never a
        # half-written state, and a different nested blocksize (other buffer sizes) loads too.
        device = self.weight.device if not self.weight.is_meta else qw.packed.device
        for name, field in _STATE_BUFFERS:
            src = getattr(qw, field)
            self._buffers[name] = None if src is None else src.detach().to(device, copy=True)
        self.weight_dtype = qw.dtype
        self.nested_blocksize = qw.nested_blocksize
        self.merged = bool(state_dict.get(merged_key, torch.tensor(False)).item())

    # -- reporting ---------------------------------------------------------------
    def quantized_parameter_count(self) -> int:
        """The parameters the 4-bit weight represents (``out * in``), for
        :func:`fastlora.count_parameters` (the weight is stored in buffers)."""
        return self.out_features * self.in_features

    def weight_nbytes(self) -> int:
        """Bytes of the base weight's storage: packed codes + absmax (+ nested
        absmax and offset); code tables excluded (shared constants)."""
        return self.qweight.nbytes(include_tables=False)

    def extra_repr(self) -> str:
        default = (
            f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}, dropout={self.dropout:g}, "
            if self.lora_A is not None
            else ""
        )
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            + default
            + f"quant_type={self.quant_type}, blocksize={self.blocksize}, double_quant={self.double_quant}"
            + (f", compute_dtype={self.compute_dtype}" if self.compute_dtype is not None else "")
            + (", rslora=True" if self.use_rslora else "")
            + self._adapters_repr()
            + (", merged=True" if self.merged else "")
        )


__all__ = [
    "QLORA",
    "QLoRALinear",
    "QLoRALinearFunction",
    "is_bnb_4bit",
    "qlora_backward",
    "qlora_forward",
    "qlora_linear",
]
