"""LoRA on transformers' ``Conv1D`` (GPT-2 style): :class:`LoRAConv1D`.

A ``Conv1D(nf, nx)`` is a linear layer whose weight is stored transposed,
``weight`` [in = nx, out = nf], with ``y = x @ weight + bias``. PEFT adapts it
with its Linear layer and ``fan_in_fan_out=True``: ``lora_A`` [r, in],
``lora_B`` [out, r], ``y = x W + scaling * dropout(x) A^T B^T + bias`` and the
merge adds ``(scaling * B @ A)^T`` to the [in, out] weight. :class:`LoRAConv1D`
runs the fused LoRA op (:func:`fastlora.lora_linear`) on ``weight.t()``, a
strided view: no transposed copy of the weight is ever made.

transformers is never imported: the base type is registered by its qualified
name and the Conv1D class is taken from the wrapped module.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..functional import lora_linear
from ..model import LoRAConfig
from ..modules import LoRALinear
from ..qlora import QLoRALinear
from ..registry import register_layer
from ._common import AdapterLayer, check_builder_config, check_plain_forward, kaiming_a, new_parameter
from ..validation import check_init

CONV1D = "transformers.pytorch_utils.Conv1D"


def is_conv1d(module: nn.Module) -> bool:
    """True for a transformers ``Conv1D`` or a subclass (checked by name)."""
    return any(f"{c.__module__}.{c.__qualname__}" == CONV1D for c in type(module).__mro__)


def linear_view(conv1d: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` computing the same map as ``conv1d``: its weight is a
    Parameter on the transposed *view* of the Conv1D's weight (same storage,
    no copy) and its bias is the Conv1D's bias Parameter itself."""
    if not is_conv1d(conv1d):
        raise TypeError(f"conv1d must be a transformers Conv1D, got {type(conv1d).__name__}")
    return _transposed_linear(conv1d.weight, conv1d.bias, conv1d.training)


def _transposed_linear(weight: Tensor, bias: Tensor | None, training: bool) -> nn.Linear:
    nx, nf = weight.shape
    linear = nn.Linear(nx, nf, bias=False, device="meta")
    linear.weight = nn.Parameter(weight.detach().t(), requires_grad=weight.requires_grad)
    linear.bias = bias
    linear.train(training)
    return linear


class LoRAConv1D(AdapterLayer):
    """A transformers ``Conv1D`` (weight [in, out]) with a frozen base and a LoRA update.

    ``y = x W + scaling * dropout(x) A^T B^T + bias`` with ``weight`` W [in, out]
    and ``bias`` [out] shared with the wrapped Conv1D and frozen, ``lora_A``
    [r, in] and ``lora_B`` [out, r] trainable (PEFT's shapes and init:
    A kaiming-uniform a=sqrt(5), B = 0, so a fresh layer computes its base).
    ``in_features``/``out_features`` (and Conv1D's ``nx``/``nf``) give the sizes.
    The forward is the fused LoRA op on ``weight.t()`` (a view, no copy), with
    its dropout (on the LoRA branch's input, in training only).
    """

    fan_in_fan_out = True  # PEFT's name for the [in, out] layout

    def __init__(
        self,
        conv1d: nn.Module,
        *,
        r: int = 8,
        alpha: float = 8.0,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "default",
    ) -> None:
        if not is_conv1d(conv1d):
            raise TypeError(f"conv1d must be a transformers Conv1D, got {type(conv1d).__name__}")
        check_plain_forward(conv1d, CONV1D, "LoRAConv1D")
        check_init(init)
        super().__init__()
        self._setup_hyperparameters(r, alpha, dropout, use_rslora)
        self._base_type = type(conv1d)
        self.weight = conv1d.weight
        self.weight.requires_grad_(False)
        self.bias = conv1d.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.in_features, self.out_features = self.weight.shape
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **factory))
        self.reset_lora_parameters(init)
        self.train(conv1d.training)

    @property
    def nx(self) -> int:
        return self.in_features

    @property
    def nf(self) -> int:
        return self.out_features

    @classmethod
    def from_conv1d(cls, conv1d: nn.Module, **kwargs) -> "LoRAConv1D":
        """Wrap ``conv1d`` (weight and bias shared, not copied, and frozen); the
        keyword arguments are ``r``, ``alpha``, ``dropout``, ``use_rslora``, ``init``
        (as for :meth:`fastlora.LoRALinear.from_linear`; ``"pissa"`` / ``"olora"``
        rewrite the shared weight in place with the residual, as PEFT does)."""
        return cls(conv1d, **kwargs)

    @torch.no_grad()
    def reset_lora_parameters(self, init: str = "default") -> None:
        """PEFT's initialisations (see :meth:`fastlora.LoRALinear.reset_lora_parameters`).

        PiSSA / OLoRA factorise ``W^T`` [out, in], set A and B from it and write the
        residual back into the shared [in, out] weight (through a transposed view)."""
        if init == "default":
            kaiming_a(self.lora_A)
            nn.init.zeros_(self.lora_B)
        elif init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / self.r)
            nn.init.zeros_(self.lora_B)
        else:
            # NOTE: LoRALinear's factorisation, run on a linear view of this weight
            # (shared storage): its residual lands in our [in, out] weight.
            helper = LoRALinear.from_linear(
                _transposed_linear(self.weight, self.bias, self.training),
                r=self.r, alpha=self.alpha, use_rslora=self.use_rslora, init=init,
            )  # fmt: skip
            self.lora_A.copy_(helper.lora_A)
            self.lora_B.copy_(helper.lora_B)

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return torch.nn.functional.linear(x, self.weight.t(), self.bias)
        # NOTE: weight.t() is a view ([out, in] strides over the [in, out] storage);
        # both backends read it through its strides, nothing is transposed per call.
        return lora_linear(
            x, self.weight.t(), self.lora_A, self.lora_B, self.scaling, self.bias,
            dropout=self.dropout, training=self.training,
        )  # fmt: skip

    def peft_tensors(self) -> dict[str, Tensor]:
        """``lora_A.weight`` [r, in] and ``lora_B.weight`` [out, r] (PEFT's Linear keys;
        fan_in_fan_out changes only the base weight's layout); live parameters."""
        return {"lora_A.weight": self.lora_A, "lora_B.weight": self.lora_B}

    @torch.no_grad()
    def delta_weight(self) -> Tensor:
        """``(scaling * B @ A)^T`` [in, out] (the Conv1D layout), float32 (float64 for float64 weights)."""
        acc = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        return ((self.lora_B.to(acc) @ self.lora_A.to(acc)) * self.scaling).t()

    def _new_base(self, weight: Tensor) -> nn.Module:
        # NOTE: built on the meta device (no init cost), then given real tensors.
        with torch.device("meta"):
            out = self._base_type(self.out_features, self.in_features)
        out.weight = new_parameter(weight, self.weight)
        out.bias = new_parameter(self.bias.detach().clone(), self.bias) if self.bias is not None else None
        return out

    def extra_repr(self) -> str:
        return f"nf={self.nf}, nx={self.nx}, " + self._hyper_repr()


def _build_conv1d(conv1d: nn.Module, name: str, config: LoRAConfig, shared) -> nn.Module:
    """LoRAConv1D; with ``quantize`` a QLoRALinear on the transposed weight (same map,
    the weight quantized in nn.Linear's [out, in] layout, as bitsandbytes stores it)."""
    check_builder_config(config, name, conv1d, "LoRAConv1D", quantize_ok=True)
    kwargs = config.layer_kwargs(name)
    if config.quantize is not None:
        check_plain_forward(conv1d, CONV1D, "QLoRALinear")
        return QLoRALinear.from_linear(
            linear_view(conv1d), quant_type=config.quantize, blocksize=config.quant_blocksize,
            double_quant=config.quant_double, **kwargs,
        )  # fmt: skip
    return LoRAConv1D.from_conv1d(conv1d, **kwargs)


register_layer(LoRAConfig, CONV1D, _build_conv1d, LoRAConv1D, QLoRALinear, linear=True)

__all__ = ["CONV1D", "LoRAConv1D", "is_conv1d", "linear_view"]
