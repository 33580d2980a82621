"""The LoRA op: :func:`lora_linear` and its autograd Function.

The op is one :class:`fastlora._fused.FusedOp`: its forward and backward come
from the backend module (``fastlora.reference`` or ``fastlora.kernels.lora``,
which share the ``lora_forward`` / ``lora_backward`` signatures), so the
autograd, compile, autocast and dispatch logic exists once for every fused op.
"""

from __future__ import annotations

from torch import Tensor

from . import reference as _reference
from ._fused import FusedOp, backend_module, new_dropout_seed, with_leading_dims
from .validation import check_dense_operands, dense_operands_ok


def _forward(backend, seed, x, weight, lora_A, lora_B, bias, scaling, dropout_p):
    # NOTE: the reference module named directly: backend_module's frame and tuple-keyed
    # lookup cost ~0.1 us a call (bench/host_overhead.py)
    module = _reference if backend == "reference" else backend_module(backend)
    return module.lora_forward(x, weight, lora_A, lora_B, scaling, bias, dropout_p, seed)


def _backward(backend, seed, needs, dy, saved, new, consts):
    x, weight, lora_A, lora_B = saved
    (s,) = new
    scaling, dropout_p = consts
    module = _reference if backend == "reference" else backend_module(backend)
    return module.lora_backward(dy, x, weight, lora_A, lora_B, s, scaling, dropout_p, seed, needs)


def _fake_forward(x, weight, lora_A, lora_B, bias, scaling, dropout_p):
    return x.new_empty(x.shape[0], weight.shape[0]), lora_A.new_empty(x.shape[0], lora_A.shape[0])


def _fake_backward(needs, dy, saved, new, consts):
    x, weight, lora_A, lora_B = saved
    like = (x, weight, lora_A, lora_B)
    grads = [t.new_empty(t.shape) if n else None for t, n in zip(like, needs)]
    return grads + [dy.new_empty(dy.shape[1]) if needs[4] else None]


def _validate(x, inputs, consts) -> None:
    check_dense_operands(
        x, inputs["weight"], inputs["lora_A"], inputs["lora_B"], inputs["bias"], consts["scaling"], consts["dropout_p"]
    )


LORA = FusedOp(
    "lora",
    function_name="LoRALinearFunction",
    inputs=[("x", "Tensor"), ("weight", "Tensor"), ("lora_A", "Tensor"), ("lora_B", "Tensor"), ("bias", "Tensor?")],
    saved=("x", "weight", "lora_A", "lora_B"),
    n_new=1,
    forward=_forward,
    backward=_backward,
    fake_forward=_fake_forward,
    fake_backward=_fake_backward,
    validate=_validate,
    accept=dense_operands_ok,
    autocast=("x", "weight", "lora_A", "lora_B", "bias"),
    doc="""``y = x W^T + scaling * dropout(x) A^T B^T + bias`` on 2-D x [M, K].

    Saved for backward: x (the caller's tensor), S = dropout(x) A^T [M, r] and the
    integer dropout seed; the frozen weight and the adapters are parameters, not
    activations. Gradients (D = the dropout, linear and self-adjoint):
      dS = scaling * dY B;  dB = scaling * dY^T S;  dA = dS^T D(x);
      dx = dY W + D(dS A);  dW = dY^T x (only if weight requires grad);  dbias = sum dY.
    """,
)
LoRALinearFunction = LORA.function


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
    return LORA.call(x, weight, lora_A, lora_B, bias, scaling=scaling, dropout=dropout, training=training)


__all__ = ["LORA", "LoRALinearFunction", "lora_linear", "new_dropout_seed", "with_leading_dims"]
