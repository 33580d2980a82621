"""LoRA on ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``: :class:`LoRAConv1d`,
:class:`LoRAConv2d`, :class:`LoRAConv3d`.

PEFT's layout (0.21, ``peft.tuners.lora.Conv1d/2d/3d``): ``lora_A`` is a
convolution ``in_channels -> r`` with the base kernel's size, stride and
padding; ``lora_B`` a 1x1 convolution ``r -> out_channels`` with the base's
``groups``; dropout on the input of the LoRA branch (``nn.Dropout``, the whole
input tensor, training only):

    ``y = conv(x, W0, bias) + scaling * conv_1x1(conv(dropout(x), A), B)``

``lora_A.weight`` [r, in_channels, *kernel_size], ``lora_B.weight``
[out_channels, r // groups, 1, ...]; init as PEFT's (A kaiming-uniform
a=sqrt(5), B = 0; ``"gaussian"``: A ~ N(0, 1/r)). The merge adds
``scaling * B @ A`` (over r) to the [out, in, *k] kernel.

Differences from PEFT, each deliberate:

* ``dilation``: A uses the base's dilation. PEFT's A ignores it, so its forward
  fails with a shape mismatch on dilated convolutions (and its merge assumes the
  dilated form); here both agree.
* ``padding_mode`` other than ``"zeros"`` is refused: PEFT pads A's input with
  zeros while the base reflects / replicates / wraps, so PEFT's merged layer
  computes something else than its unmerged one; rather than pick one of the
  two, fastlora does not adapt such a layer.
* ``groups > 1`` (PEFT's support: r divisible by groups, A ungrouped, B grouped):
  the forward is PEFT's; :meth:`merge` refuses in place (as PEFT does: the update
  is not block-diagonal, so it does not fit a grouped kernel), and
  :meth:`to_base` returns an exact ungrouped (``groups=1``) convolution whose
  kernel is the block-diagonal expansion of the base kernel plus the update.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..model import LoRAConfig
from ..registry import register_layer
from ._common import (
    AdapterLayer,
    accumulation_dtype,
    check_builder_config,
    check_plain_forward,
    check_simple_init,
    kaiming_a,
    new_parameter,
)

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class LoRAConvNd(AdapterLayer):
    """A convolution with a frozen, shared base kernel and a trainable LoRA update
    (see the module docstring). Attributes as the base's (``in_channels``,
    ``out_channels``, ``kernel_size``, ``stride``, ``padding``, ``dilation``,
    ``groups``, ``padding_mode``, shared frozen ``weight`` and ``bias``) plus
    ``r``, ``alpha``, ``scaling``, ``dropout``, ``use_rslora``, ``lora_A``,
    ``lora_B``; ``in_features`` / ``out_features`` are the channel counts."""

    base_type: type[nn.Module]
    ndim: int

    def __init__(
        self,
        conv: nn.Module,
        *,
        r: int = 8,
        alpha: float = 8.0,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "default",
    ) -> None:
        name = type(self).__name__
        if not isinstance(conv, self.base_type):
            raise TypeError(f"conv must be an nn.{self.base_type.__name__}, got {type(conv).__name__}")
        check_plain_forward(conv, self.base_type, name)
        check_simple_init(init, name)
        if conv.padding_mode != "zeros":
            raise NotImplementedError(
                f"{name}: padding_mode={conv.padding_mode!r} is not supported (only 'zeros'): PEFT pads the adapter's "
                "input with zeros while the base pads differently, so PEFT's merged and unmerged layers disagree; "
                "leave this module out of target_modules"
            )
        if r % conv.groups != 0:
            raise ValueError(
                f"{name}: r={r} must be divisible by the convolution's groups={conv.groups} (the adapter's 1x1 B "
                "convolution is grouped as the base is, as in PEFT); choose another r for this module (rank_pattern)"
            )
        super().__init__()
        self._setup_hyperparameters(r, alpha, dropout, use_rslora)
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"):
            setattr(self, attr, getattr(conv, attr))
        self.weight = conv.weight
        self.weight.requires_grad_(False)
        self.bias = conv.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_channels, *self.kernel_size, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_channels, r // self.groups, *(1,) * self.ndim, **factory))
        self.reset_lora_parameters(init)
        self.train(conv.training)

    @classmethod
    def from_conv(cls, conv: nn.Module, **kwargs) -> "LoRAConvNd":
        """Wrap ``conv`` (weight and bias shared, not copied, and frozen); the keyword
        arguments are ``r``, ``alpha``, ``dropout``, ``use_rslora``, ``init``
        (``"default"`` or ``"gaussian"``)."""
        return cls(conv, **kwargs)

    @property
    def in_features(self) -> int:
        return self.in_channels

    @property
    def out_features(self) -> int:
        return self.out_channels

    @torch.no_grad()
    def reset_lora_parameters(self, init: str = "default") -> None:
        """PEFT's inits: ``"default"`` A kaiming-uniform (a=sqrt(5), fan_in = in * prod(kernel)),
        ``"gaussian"`` A ~ N(0, std=1/r); B = 0 in both."""
        if check_simple_init(init, type(self).__name__) == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / self.r)
        else:
            kaiming_a(self.lora_A)
        nn.init.zeros_(self.lora_B)

    def _conv(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return _CONV_FN[self.ndim](x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: Tensor) -> Tensor:
        y = self._conv(x, self.weight, self.bias)
        if self.merged:
            return y
        # NOTE: PEFT's order: x cast to the adapters' dtype, dropout, A, B, then
        # "* scaling", the sum in the promoted dtype and a cast back to the base's.
        xl = x if x.dtype == self.lora_A.dtype else x.to(self.lora_A.dtype)
        if self.training and self.dropout > 0.0:
            xl = F.dropout(xl, self.dropout, training=True)
        h = _CONV_FN[self.ndim](xl, self.lora_A, None, self.stride, self.padding, self.dilation, 1)
        u = _CONV_FN[self.ndim](h, self.lora_B, None, 1, 0, 1, self.groups)
        return (y + u * self.scaling).to(y.dtype)

    def peft_tensors(self) -> dict[str, Tensor]:
        """PEFT's keys: ``lora_A.weight`` [r, in, *k], ``lora_B.weight`` [out, r // groups, 1...]; live parameters."""
        return {"lora_A.weight": self.lora_A, "lora_B.weight": self.lora_B}

    @torch.no_grad()
    def delta_weight(self) -> Tensor:
        """``scaling * sum_r B[o, r] A[r, i, ...]`` [out, in, *k] as one ungrouped kernel,
        float32 (float64 for float64 weights). With ``groups > 1`` output channel o
        uses the r // groups rows of A of its group."""
        acc = accumulation_dtype(self.weight)
        a = self.lora_A.to(acc).flatten(1)  # [r, in * prod(k)]
        b = self.lora_B.to(acc).flatten(1)  # [out, r // groups]
        g, out = self.groups, self.out_channels
        # [g, out/g, r/g] @ [g, r/g, in*k] -> [g, out/g, in*k]
        delta = torch.bmm(b.view(g, out // g, -1), a.view(g, self.r // g, -1)).reshape(out, *self.lora_A.shape[1:])
        return delta * self.scaling

    def _check_mergeable(self) -> None:
        if self.groups > 1:
            raise NotImplementedError(
                f"{type(self).__name__}.merge: the update of a grouped convolution (groups={self.groups}) is not "
                "block-diagonal, so it cannot be added into the grouped kernel in place (PEFT refuses too); "
                "to_base() returns an exact ungrouped convolution instead"
            )

    @torch.no_grad()
    def merged_weight(self) -> Tensor:
        """The merged kernel [out, in / groups, *k] (``groups == 1``), or for ``groups > 1``
        the ungrouped [out, in, *k] kernel: the base kernel's block-diagonal
        expansion plus the update; float32 (float64 for float64 weights)."""
        if self.groups == 1:
            return super().merged_weight()
        acc = accumulation_dtype(self.weight)
        g, in_g, out_g = self.groups, self.in_channels // self.groups, self.out_channels // self.groups
        full = self.weight.new_zeros(self.out_channels, self.in_channels, *self.kernel_size, dtype=acc)
        for i in range(g):
            full[i * out_g : (i + 1) * out_g, i * in_g : (i + 1) * in_g] = self.weight[i * out_g : (i + 1) * out_g]
        return full + self.delta_weight()

    def _new_base(self, weight: Tensor) -> nn.Module:
        with torch.device("meta"):
            out = self.base_type(
                self.in_channels, self.out_channels, self.kernel_size, stride=self.stride, padding=self.padding,
                dilation=self.dilation, groups=1 if weight.shape[1] == self.in_channels else self.groups,
                bias=self.bias is not None, padding_mode=self.padding_mode,
            )  # fmt: skip
        out.weight = new_parameter(weight, self.weight)
        if self.bias is not None:
            out.bias = new_parameter(self.bias.detach().clone(), self.bias)
        return out

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0,) * self.ndim:
            s += f", padding={self.padding}"
        if self.dilation != (1,) * self.ndim:
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        return s + ", " + self._hyper_repr()


class LoRAConv1d(LoRAConvNd):
    """LoRA on an ``nn.Conv1d`` (see :class:`LoRAConvNd`); ``from_conv`` wraps one."""

    base_type = nn.Conv1d
    ndim = 1


class LoRAConv2d(LoRAConvNd):
    """LoRA on an ``nn.Conv2d`` (see :class:`LoRAConvNd`); ``from_conv`` wraps one."""

    base_type = nn.Conv2d
    ndim = 2


class LoRAConv3d(LoRAConvNd):
    """LoRA on an ``nn.Conv3d`` (see :class:`LoRAConvNd`); ``from_conv`` wraps one."""

    base_type = nn.Conv3d
    ndim = 3


def _builder(cls: type[LoRAConvNd]):
    def build(conv: nn.Module, name: str, config: LoRAConfig, shared) -> LoRAConvNd:
        check_builder_config(config, name, conv, cls.__name__)
        return cls.from_conv(conv, **config.layer_kwargs(name))

    build.__name__ = f"_build_{cls.base_type.__name__.lower()}"
    return build


for _cls in (LoRAConv1d, LoRAConv2d, LoRAConv3d):
    register_layer(LoRAConfig, _cls.base_type, _builder(_cls), _cls, by_default=False)
del _cls

__all__ = ["LoRAConv1d", "LoRAConv2d", "LoRAConv3d", "LoRAConvNd"]
