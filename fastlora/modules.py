"""nn.Linear drop-ins with a LoRA adapter: :class:`LoRALinear`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import lora_linear

INITS = ("default", "gaussian")


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    """PEFT's scale: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _check_rank(r, alpha, dropout) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r (the LoRA rank) must be an integer >= 1, got {r!r}")
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha!r}")
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")


class LoRALinear(nn.Linear):
    """``nn.Linear`` with a frozen base weight and a trainable low-rank update.

    ``y = x W^T + scaling * dropout(x) A^T B^T + bias`` with ``lora_A`` [r, in]
    and ``lora_B`` [out, r]; ``scaling = alpha / r`` (``alpha / sqrt(r)`` with
    ``use_rslora``). A subclass of ``nn.Linear``, so code that checks for one
    keeps working; ``weight`` and ``bias`` are frozen, only ``lora_A`` and
    ``lora_B`` require grad. Initialised as PEFT does (A kaiming-uniform with
    a=sqrt(5), B zeros), so a fresh layer computes exactly its base layer.

    Adapters may be float32 on a bf16/fp16 base (PEFT's mixed precision): the
    LoRA branch and the adapter gradients are then computed in float32.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        r: int = 8,
        alpha: float = 8.0,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "default",
        device=None,
        dtype=None,
    ) -> None:
        _check_rank(r, alpha, dropout)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self._setup_lora(r, alpha, dropout, use_rslora, init)

    def _setup_lora(self, r: int, alpha: float, dropout: float, use_rslora: bool, init: str) -> None:
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.r = r
        self.alpha = float(alpha)
        self.dropout = float(dropout)
        self.use_rslora = bool(use_rslora)
        self.scaling = lora_scaling(r, alpha, use_rslora)
        self.merged = False
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **factory))
        self.reset_lora_parameters(init)

    @torch.no_grad()
    def reset_lora_parameters(self, init: str = "default") -> None:
        """PEFT's initialisations: ``"default"`` (A kaiming-uniform a=sqrt(5)),
        ``"gaussian"`` (A ~ N(0, std=1/r)); B = 0 in both, so the update starts at 0."""
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
    ) -> "LoRALinear":
        """Wrap ``linear``: its weight and bias are shared (not copied) and frozen."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        _check_rank(r, alpha, dropout)
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.weight.requires_grad_(False)
        self.bias = linear.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self._setup_lora(r, alpha, dropout, use_rslora, init)
        self.train(linear.training)
        return self

    def reset_parameters(self) -> None:  # called by nn.Linear.__init__
        super().reset_parameters()
        if hasattr(self, "lora_A"):
            self.reset_lora_parameters()

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        return lora_linear(
            x, self.weight, self.lora_A, self.lora_B, self.scaling, self.bias, dropout=self.dropout, training=self.training
        )

    @torch.no_grad()
    def delta_weight(self) -> Tensor:
        """``scaling * B @ A`` [out, in], computed in float32 (float64 for float64 weights)."""
        acc = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        return (self.lora_B.to(acc) @ self.lora_A.to(acc)) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Add ``scaling * B @ A`` into the base weight (in float32, then rounded
        once to the weight's dtype); later forwards skip the LoRA branch.

        The base weight is shared with the nn.Linear this layer was made from, so
        that module sees the merged weight too (as with PEFT)."""
        if self.merged:
            return
        delta = self.delta_weight()
        self.weight.copy_((self.weight.to(delta.dtype) + delta).to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update again (exact up to the weight dtype's rounding)."""
        if not self.merged:
            return
        delta = self.delta_weight()
        self.weight.copy_((self.weight.to(delta.dtype) - delta).to(self.weight.dtype))
        self.merged = False

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the update merged in (new tensors; this layer is unchanged)."""
        out = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device=self.weight.device, dtype=self.weight.dtype
        )
        weight = self.weight.detach()
        if not self.merged:
            delta = self.delta_weight()
            weight = (weight.to(delta.dtype) + delta).to(self.weight.dtype)
        out.weight.copy_(weight)
        if self.bias is not None:
            out.bias.copy_(self.bias)
            out.bias.requires_grad_(self.bias.requires_grad)
        out.weight.requires_grad_(self.weight.requires_grad)
        out.train(self.training)
        return out

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}, dropout={self.dropout:g}"
            + (", rslora=True" if self.use_rslora else "")
            + (", merged=True" if self.merged else "")
        )
