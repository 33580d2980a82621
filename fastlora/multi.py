"""Many adapters in one batch: :func:`lora_linear_multi` and its autograd Function.

Each row of x picks its own LoRA adapter by id (-1 = the base layer alone):
``y[m] = x[m] W^T + bias + scaling[a] * dropout(x)[m] A[a]^T B[a]^T`` with
``a = adapter_ids[m]``. For serving several fine-tunes of one base model in a
single batch, and for training several adapters at once (each adapter's
gradient is exactly the sum over its own rows).

The op is one :class:`fastlora._fused.FusedOp` (as ``fastlora.functional``'s
LoRA op): torch.compile, autocast, leading dims and the dropout seed come from
there. Its forward and backward come from ``fastlora.reference``
(``lora_multi_forward`` / ``lora_multi_backward``) or from
``fastlora.kernels.lora_multi`` (the same signatures).

NOTE: the fused-op helper's first constant is a float ``scaling``; here the
scales are the per-adapter tensor input ``adapter_scaling`` [n] and that
constant is always 1.0 (ignored).
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch
from torch import Tensor

from ._fused import FusedOp
from .quant import QuantizedWeight
from .validation import check_base_dtype, check_dense_weight, check_dropout, check_same_device

_KERNELS = "fastlora.kernels.lora_multi"


def _module(backend: str) -> ModuleType:
    """``fastlora.reference`` or the Triton module (imported on first use only)."""
    return importlib.import_module(_KERNELS if backend == "triton" else "fastlora.reference")


def _forward(backend, seed, x, weight, lora_A, lora_B, adapter_scaling, adapter_ids, bias, scaling, dropout_p):
    return _module(backend).lora_multi_forward(x, weight, lora_A, lora_B, adapter_scaling, adapter_ids, bias, dropout_p, seed)


def _backward(backend, seed, needs, dy, saved, new, consts):
    x, weight, lora_A, lora_B, adapter_scaling, adapter_ids = saved
    (s,) = new
    _, dropout_p = consts
    need_x, need_w, need_a, need_b, _, _, need_bias = needs
    dx, dw, da, db, dbias = _module(backend).lora_multi_backward(
        dy, x, weight, lora_A, lora_B, adapter_scaling, adapter_ids, s, dropout_p, seed,
        (need_x, need_w, need_a, need_b, need_bias),
    )  # fmt: skip
    return [dx, dw, da, db, None, None, dbias]


def _multi_differentiable(seed, x, weight, lora_A, lora_B, adapter_scaling, adapter_ids, bias, dropout_p):
    """The op's forward in differentiable torch ops (``backward(create_graph=True)``):
    the base GEMM, then each adapter's rows (the same dropout mask, from the same
    seed, as the forward drew) added with ``index_add``; the LoRA branch in the
    adapters' dtype, as the op's. One small graph per adapter with rows: this runs
    only for second-order gradients."""
    from .reference import dropout_keep_mask

    branch = lora_A.dtype
    h = x.to(branch)
    if dropout_p > 0.0:
        mask, keep = dropout_keep_mask(seed, tuple(x.shape), dropout_p, x.device)
        h = h * mask.to(branch) / keep
    ids = adapter_ids.reshape(-1).to(torch.int64)
    lora = h.new_zeros(x.shape[0], lora_B.shape[1])
    scales = adapter_scaling.tolist()
    for a in sorted(set(ids.tolist()) - {-1}):
        rows = (ids == a).nonzero().squeeze(1)
        term = torch.mm(torch.mm(h.index_select(0, rows), lora_A[a].t()), lora_B[a].t()) * scales[a]
        lora = lora.index_add(0, rows, term)
    y = torch.nn.functional.linear(x, weight, bias)
    return y + lora.to(y.dtype)


def _differentiable_forward(seed, x, weight, lora_A, lora_B, adapter_scaling, adapter_ids, bias, scaling, dropout_p):
    return _multi_differentiable(seed, x, weight, lora_A, lora_B, adapter_scaling, adapter_ids, bias, dropout_p)


def _fake_forward(x, weight, lora_A, lora_B, adapter_scaling, adapter_ids, bias, scaling, dropout_p):
    return x.new_empty(x.shape[0], weight.shape[0]), lora_A.new_empty(x.shape[0], lora_A.shape[1])


def _fake_backward(needs, dy, saved, new, consts):
    x, weight, lora_A, lora_B = saved[:4]
    grads = [t.new_empty(t.shape) if n else None for t, n in zip((x, weight, lora_A, lora_B), needs)]
    return grads + [None, None, dy.new_empty(dy.shape[1]) if needs[6] else None]


_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _shape(t) -> object:
    return tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__


def check_multi_operands(x, weight, lora_A, lora_B, scaling, adapter_ids, bias, dropout) -> None:
    """The operands of :func:`lora_linear_multi` (errors name the argument, what came and
    what was expected). The id values are checked where they are read (one sort per
    call, see ``fastlora.reference.adapter_segments``), not here."""
    _check_x(x)
    n_out, k = check_dense_weight(None, weight)
    _check_multi_rest(x, "weight", (n_out, k), lora_A, lora_B, scaling, adapter_ids, bias, dropout)
    check_same_device(x, weight=weight)
    check_base_dtype(x, "weight", weight)


def _check_x(x) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype={x.dtype}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension [..., in_features], got a 0-d tensor")


def _check_multi_rest(x, base_name, base_shape, lora_A, lora_B, scaling, adapter_ids, bias, dropout) -> None:
    """Everything but the base weight itself, against its [N, K] ``base_shape``."""
    n_out, k = base_shape
    if x.shape[-1] != k:
        raise ValueError(
            f"x's last dimension must equal {base_name}'s in_features: x has shape {tuple(x.shape)}, {base_name} has "
            f"shape {tuple(base_shape)} (expected x of shape [..., {k}])"
        )
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B), ("scaling", scaling), ("adapter_ids", adapter_ids)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if lora_A.dim() != 3 or lora_A.shape[2] != k or lora_A.shape[0] < 1 or lora_A.shape[1] < 1:
        raise ValueError(
            f"lora_A must have shape [n_adapters, r, {k}] (n_adapters >= 1, r >= 1, in_features), got {_shape(lora_A)}"
        )
    n, r = lora_A.shape[0], lora_A.shape[1]
    if tuple(lora_B.shape) != (n, n_out, r):
        raise ValueError(f"lora_B must have shape [{n}, {n_out}, {r}] (n_adapters, out_features, r), got {_shape(lora_B)}")
    if tuple(scaling.shape) != (n,) or scaling.dtype != torch.float32:
        raise ValueError(
            f"scaling must be a float32 tensor of shape [{n}] (one scale per adapter), got shape {_shape(scaling)} "
            f"dtype {scaling.dtype}"
        )
    if scaling.requires_grad:
        raise ValueError("scaling requires grad, but lora_linear_multi gives no gradient for it; pass scaling.detach()")
    if adapter_ids.dtype not in _INT_DTYPES:
        raise TypeError(f"adapter_ids must be an integer tensor (int64, int32, ...), got dtype={adapter_ids.dtype}")
    if tuple(adapter_ids.shape) != tuple(x.shape[:-1]):
        raise ValueError(
            f"adapter_ids must have shape {list(x.shape[:-1])} (x's leading dims: one id per row), "
            f"got {list(adapter_ids.shape)}"
        )
    if bias is not None and (not isinstance(bias, Tensor) or bias.dim() != 1 or bias.shape[0] != n_out):
        raise ValueError(f"bias must have shape [{n_out}] (out_features), got {_shape(bias)}")
    check_dropout(dropout)
    check_same_device(x, lora_A=lora_A, lora_B=lora_B, scaling=scaling, adapter_ids=adapter_ids, bias=bias)
    check_base_dtype(x, "bias", bias)
    if lora_B.dtype != lora_A.dtype or lora_A.dtype not in (x.dtype, torch.float32):
        raise TypeError(
            f"lora_A/lora_B have dtypes {lora_A.dtype}/{lora_B.dtype}; expected both {x.dtype} (x's dtype) "
            "or both torch.float32 (mixed precision: the LoRA branch in fp32)"
        )


def _validate(x, inputs, consts) -> None:
    check_multi_operands(
        x, inputs["weight"], inputs["lora_A"], inputs["lora_B"], inputs["adapter_scaling"], inputs["adapter_ids"],
        inputs["bias"], consts["dropout_p"],
    )  # fmt: skip


MULTI = FusedOp(
    "lora_multi",
    function_name="LoRAMultiLinearFunction",
    inputs=[
        ("x", "Tensor"), ("weight", "Tensor"), ("lora_A", "Tensor"), ("lora_B", "Tensor"),
        ("adapter_scaling", "Tensor"), ("adapter_ids", "Tensor"), ("bias", "Tensor?"),
    ],  # fmt: skip
    saved=("x", "weight", "lora_A", "lora_B", "adapter_scaling", "adapter_ids"),
    n_new=1,
    forward=_forward,
    backward=_backward,
    fake_forward=_fake_forward,
    fake_backward=_fake_backward,
    validate=_validate,
    differentiable_forward=_differentiable_forward,
    autocast=("x", "weight", "lora_A", "lora_B", "bias"),
    cast_adapters_for_kernels=True,  # kernels/lora_multi.py reads the adapters in x's dtype
    doc="""``y[m] = x[m] W^T + bias + scaling[a] * dropout(x)[m] A[a]^T B[a]^T``, a = ids[m], on 2-D x.

    Saved for backward: x (the caller's tensor), the caller's adapter_ids,
    S [M, r] (dropout(x)[m] A[a]^T, zero on base rows) and the integer dropout
    seed; weight, lora_A, lora_B and scaling are parameters/buffers. Nothing
    [M, N]. Gradients (D = the dropout, linear and self-adjoint; per row m of
    adapter a, dS[m] = scaling[a] dY[m] B[a]):
      dB[a] = scaling[a] sum_{m in a} dY[m]^T S[m];  dA[a] = sum_{m in a} dS[m]^T D(x)[m];
      dx[m] = dY[m] W + D(dS[m] A[a]);  dW = dY^T x;  dbias = sum dY.
    scaling and adapter_ids get no gradient.
    """,
)
LoRAMultiLinearFunction = MULTI.function


def lora_linear_multi(
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: Tensor,
    adapter_ids: Tensor,
    bias: Tensor | None = None,
    *,
    dropout: float = 0.0,
    training: bool = True,
) -> Tensor:
    """Several LoRA adapters in one batch, one per row:
    ``y[m] = x[m] W^T + bias + scaling[a] * (dropout(x)[m] A[a]^T) B[a]^T`` with
    ``a = adapter_ids[m]``; ``a = -1`` gives the base layer alone.

    Args:
      x: [..., K] (any leading dims, zero rows allowed).
      weight: [N, K], the frozen base weight (dW is computed if it requires grad), or a
        4-bit :class:`fastlora.quant.QuantizedWeight` (then this is :func:`qlora_linear_multi`).
      lora_A: [n, r, K] and lora_B: [n, N, r], the n adapters stacked; an adapter
        of smaller rank is zero-padded to r by the caller. In x's dtype, or
        float32 (the LoRA branch and the adapter gradients in fp32, as PEFT).
      scaling: [n] float32 tensor, each adapter's scale (alpha / r, or alpha /
        sqrt(r) for rsLoRA, with its own r); no gradient.
      adapter_ids: integer tensor of x's leading shape, values in [-1, n).
      bias: [N] or None.
      dropout: probability on the LoRA branch's input, only when ``training``;
        the mask is the one :func:`fastlora.lora_linear` draws for the same seed.
    Returns: [..., N] in x's dtype. Gradients: x, lora_A and lora_B (adapter a gets
    exactly the sum over its rows; an adapter without rows gets zeros), weight and
    bias when they require grad. Under ``torch.autocast`` x, weight, the adapters
    and bias are cast as ``nn.Linear`` casts them.
    """
    if isinstance(weight, QuantizedWeight):
        return qlora_linear_multi(x, weight, lora_A, lora_B, scaling, adapter_ids, bias, dropout=dropout, training=training)
    return MULTI(
        x, weight, lora_A, lora_B, scaling, adapter_ids, bias, scaling=1.0, dropout=dropout, training=training
    )


# -- a 4-bit base weight -----------------------------------------------------------
# As fastlora.qlora: the QuantizedWeight travels as its tensors (inputs without
# gradients, held by reference for backward) plus its metadata (constants).
# NOTE: fastlora.qlora is imported at call time only (it imports fastlora.modules,
# which may import this module).
_QW_INPUTS = [
    ("packed", "Tensor"), ("absmax", "Tensor"), ("quant_map", "Tensor"), ("nested_absmax", "Tensor?"),
    ("nested_quant_map", "Tensor?"), ("offset", "Tensor?"),
]  # fmt: skip
_N_QW = len(_QW_INPUTS)


def _q_strategy(backend, x, qw, lora_A, dropout_p, run_for=None) -> tuple[ModuleType, dict]:
    """The module of ``backend`` (a backend name or a strategy spec, see
    ``fastlora.strategies``) and the keyword arguments naming its ``qlora_multi``
    strategy: the forced one, the measured choice (``auto``: timed on the first
    forward of a shape key, through ``run_for``), or the default; the reference
    has one formulation (no keyword)."""
    from .strategies import DEFAULTS, candidate_names, choose, names_of, parse_spec, shape_key

    base, forced, auto, train = parse_spec(backend) if ":" in backend else (backend, {}, False, True)
    if base != "triton":
        return _module(base), {}
    name = forced.get("qlora_multi")
    if name is None and auto and x.shape[0] > 0:
        quant = f",{qw.quant_type}{qw.blocksize}{'dq' if qw.double_quant else ''}"
        key = shape_key("qlora_multi", x, qw.shape[0], lora_A.shape[1], dropout_p, train, quant)
        cands = candidate_names("qlora_multi", forced, dropout_p, train, x.shape[0])
        name = names_of(choose("qlora_multi", key, x.device, cands, run_for))["qlora_multi"]
    return _module(base), {"strategy": name or DEFAULTS["qlora_multi"]}


def _q_forward(backend, seed, x, lora_A, lora_B, adapter_scaling, adapter_ids, bias, *rest):
    from .qlora import _qw_from

    tensors, (_, dropout_p, *meta) = rest[:_N_QW], rest[_N_QW:]
    qw = _qw_from(tensors, meta)
    args = (x, qw, lora_A, lora_B, adapter_scaling, adapter_ids, bias, dropout_p, seed)

    def run_for(candidate):  # the measured choice times forward (+ backward with dY = y when training)
        from .strategies import names_of, parse_spec

        module, strategy = _module("triton"), names_of(candidate)["qlora_multi"]
        train = parse_spec(backend)[3]

        def run():
            y, s = module.qlora_multi_forward(*args, strategy=strategy)
            if train:
                module.qlora_multi_backward(y, x, qw, lora_A, lora_B, adapter_scaling, adapter_ids, s, dropout_p, seed,
                                            (True, False, True, True, bias is not None), strategy=strategy)  # fmt: skip

        return run

    module, kw = _q_strategy(backend, x, qw, lora_A, dropout_p, run_for)
    return module.qlora_multi_forward(*args, **kw)


def _q_backward(backend, seed, needs, dy, saved, new, consts):
    from .qlora import _qw_from

    x, lora_A, lora_B, adapter_scaling, adapter_ids, *tensors = saved
    (s,) = new
    _, dropout_p, *meta = consts
    need_x, need_a, need_b, _, _, need_bias = needs[:6]
    qw = _qw_from(tensors, meta)
    module, kw = _q_strategy(backend, x, qw, lora_A, dropout_p)
    dx, _, da, db, dbias = module.qlora_multi_backward(
        dy, x, qw, lora_A, lora_B, adapter_scaling, adapter_ids, s, dropout_p, seed,
        (need_x, False, need_a, need_b, need_bias), **kw,
    )  # fmt: skip
    return [dx, da, db, None, None, dbias] + [None] * _N_QW


def _q_differentiable_forward(seed, x, lora_A, lora_B, adapter_scaling, adapter_ids, bias, *rest):
    from .qlora import _qw_from
    from .quant import dequantize_4bit

    tensors, (_, dropout_p, *meta) = rest[:_N_QW], rest[_N_QW:]
    weight = dequantize_4bit(_qw_from(tensors, meta), x.dtype)  # frozen: a constant of the graph
    return _multi_differentiable(seed, x, weight, lora_A, lora_B, adapter_scaling, adapter_ids, bias, dropout_p)


def _q_fake_forward(x, lora_A, lora_B, adapter_scaling, adapter_ids, bias, *rest):
    shape = rest[_N_QW + 4]
    return x.new_empty(x.shape[0], shape[0]), lora_A.new_empty(x.shape[0], lora_A.shape[1])


def _q_fake_backward(needs, dy, saved, new, consts):
    x, lora_A, lora_B = saved[:3]
    grads = [t.new_empty(t.shape) if n else None for t, n in zip((x, lora_A, lora_B), needs)]
    return grads + [None, None, dy.new_empty(dy.shape[1]) if needs[5] else None] + [None] * _N_QW


def _q_validate(x, inputs, consts) -> None:
    _check_x(x)
    _check_multi_rest(
        x, "qweight", tuple(consts["shape"]), inputs["lora_A"], inputs["lora_B"], inputs["adapter_scaling"],
        inputs["adapter_ids"], inputs["bias"], consts["dropout_p"],
    )  # fmt: skip
    check_same_device(x, qweight=inputs["packed"])


QLORA_MULTI = FusedOp(
    "qlora_multi",
    function_name="QLoRAMultiLinearFunction",
    inputs=[
        ("x", "Tensor"), ("lora_A", "Tensor"), ("lora_B", "Tensor"), ("adapter_scaling", "Tensor"),
        ("adapter_ids", "Tensor"), ("bias", "Tensor?"), *_QW_INPUTS,
    ],
    consts=[("quant_type", "str"), ("blocksize", "int"), ("shape", "int[]"), ("dtype", "ScalarType"), ("nested_blocksize", "int")],
    saved=("x", "lora_A", "lora_B", "adapter_scaling", "adapter_ids"),
    held=tuple(name for name, _ in _QW_INPUTS),
    n_new=1,
    forward=_q_forward,
    backward=_q_backward,
    fake_forward=_q_fake_forward,
    fake_backward=_q_fake_backward,
    validate=_q_validate,
    differentiable_forward=_q_differentiable_forward,
    autocast=("x", "lora_A", "lora_B", "bias"),
    cast_adapters_for_kernels=True,  # kernels/lora_multi.py reads the adapters in x's dtype
    doc="""``y[m] = x[m] deq(W)^T + bias + scaling[a] * dropout(x)[m] A[a]^T B[a]^T``, a = ids[m], on 2-D x.

    Saved for backward: x (the caller's tensor), the caller's adapter_ids, S [M, r]
    and the integer dropout seed; the adapters, scaling and the 4-bit weight's
    tensors by reference (never a dequantized weight: backward dequantizes
    again). Gradients as :data:`MULTI`'s, with W frozen (no weight gradient):
      dB[a] = scaling[a] sum_{m in a} dY[m]^T S[m];  dA[a] = sum_{m in a} dS[m]^T D(x)[m];
      dx[m] = dY[m] deq(W) + D(dS[m] A[a]);  dbias = sum dY.
    """,
)  # fmt: skip
QLoRAMultiLinearFunction = QLORA_MULTI.function


def qlora_linear_multi(
    x: Tensor,
    qweight: QuantizedWeight,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: Tensor,
    adapter_ids: Tensor,
    bias: Tensor | None = None,
    *,
    dropout: float = 0.0,
    training: bool = True,
) -> Tensor:
    """:func:`lora_linear_multi` on a frozen 4-bit base weight (QLoRA, several adapters in one batch):
    ``y[m] = x[m] deq(W)^T + bias + scaling[a] * (dropout(x)[m] A[a]^T) B[a]^T``, ``a = adapter_ids[m]``.

    Args as :func:`lora_linear_multi`, with ``qweight`` the [N, K] 4-bit weight
    (:class:`fastlora.quant.QuantizedWeight`, NF4 / FP4, double quantization or
    not), dequantized to x's dtype. Gradients: x, lora_A, lora_B and bias (when
    it requires grad); none for the 4-bit weight.

    How: the reference backend dequantizes W to a temporary in x's dtype and runs
    ``reference.lora_multi_forward`` / ``_backward``. The Triton backend has two
    strategies (op ``"qlora_multi"`` of ``fastlora.strategies``):
    ``dequant_in_gemm`` (the default) runs the multi-adapter GEMMs (forward Y,
    backward dX) with the 4-bit weight read in their main loop, each tile of W
    dequantized in registers as in :func:`fastlora.qlora_linear`'s GEMM: 2
    launches forward, 3 backward, no [N, K] tensor; ``dequant_once`` dequantizes
    W in one launch into a transient [N, K] weight in x's dtype, then runs the
    dense multi-adapter kernels (one more launch each way, backward only when dx
    is needed). Force one with ``fastlora.set_strategy("qlora_multi", name)`` or
    ``FASTLORA_STRATEGY=qlora_multi:<name>``; otherwise on CUDA the first call per
    shape key times both and keeps the faster (see ``fastlora.strategies``).
    Either way nothing [N, K] is saved for backward.
    """
    if not isinstance(qweight, QuantizedWeight):
        raise TypeError(f"qweight must be a fastlora.quant.QuantizedWeight, got {type(qweight).__name__}")
    if len(qweight.shape) != 2:
        raise ValueError(f"qweight must hold a 2-D [out_features, in_features] weight, got shape {qweight.shape}")
    from .qlora import _qw_meta, _qw_tensors

    return QLORA_MULTI(
        x, lora_A, lora_B, scaling, adapter_ids, bias, *_qw_tensors(qweight),
        scaling=1.0, dropout=dropout, training=training, consts=_qw_meta(qweight),
    )  # fmt: skip


__all__ = [
    "MULTI", "QLORA_MULTI", "LoRAMultiLinearFunction", "QLoRAMultiLinearFunction", "check_multi_operands",
    "lora_linear_multi", "qlora_linear_multi",
]  # fmt: skip
