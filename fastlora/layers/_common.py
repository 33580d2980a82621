"""What the adapter layers of :mod:`fastlora.layers` share: the hyperparameter
setup, merge / unmerge / to_base around a ``delta_weight()`` in the base
weight's own layout, and the checks every builder makes before wrapping a module."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..validation import check_init, check_lora_hyperparameters, lora_scaling


def accumulation_dtype(weight: Tensor) -> torch.dtype:
    """The dtype a merge is computed in: float64 for a float64 weight, else float32."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def base_forward_of(module: nn.Module, base: type | str) -> object:
    """The ``forward`` that ``base`` (a class, or a ``"module.QualName"`` string)
    defines, found along ``module``'s MRO (None if ``base`` is not in it)."""
    for cls in type(module).__mro__:
        if cls is base or f"{cls.__module__}.{cls.__qualname__}" == base:
            return cls.__dict__.get("forward")
    return None


def check_plain_forward(module: nn.Module, base: type | str, layer: str) -> None:
    """Refuse a subclass of ``base`` that overrides ``forward`` (a scaled
    embedding, a weight-standardised conv, ...): the adapter layer computes
    ``base``'s forward, so wrapping it would silently change what it computes."""
    if type(module).forward is not base_forward_of(module, base):
        name = base if isinstance(base, str) else f"{base.__module__}.{base.__qualname__}"
        raise TypeError(
            f"{layer}: {type(module).__module__}.{type(module).__qualname__} overrides {name}.forward; "
            f"{layer} computes {name}'s own forward, so it cannot wrap this subclass exactly "
            "(leave the module out of target_modules, or list it in exclude_modules)"
        )


def check_builder_config(config, name: str, module: nn.Module, layer: str, *, quantize_ok: bool = False) -> None:
    """The LoRAConfig options the non-linear layer kinds do not support, refused
    with the module's name rather than silently ignored."""
    kind = type(module).__name__
    if getattr(config, "use_dora", False):
        raise NotImplementedError(
            f"apply_lora(use_dora=True): {name!r} is a {kind}; fastlora's DoRA adapts nn.Linear (and 4-bit) layers "
            f"only. Apply DoRA to the linear layers and plain LoRA ({layer}) to this one in a second apply_lora call"
        )
    if getattr(config, "quantize", None) is not None and not quantize_ok:
        raise NotImplementedError(
            f"apply_lora(quantize={config.quantize!r}): {name!r} is a {kind}; 4-bit quantization applies to linear "
            "layers (nn.Linear, transformers Conv1D) only. Target this module in a second apply_lora call without "
            "quantize"
        )


def check_simple_init(init: str, layer: str) -> str:
    """``"default"`` or ``"gaussian"``; PiSSA / OLoRA factorise a 2-D weight and are refused."""
    if check_init(init) not in ("default", "gaussian"):
        raise NotImplementedError(
            f"{layer}(init={init!r}): PiSSA / OLoRA factorise a linear layer's [out, in] weight; {layer} supports "
            "init='default' and init='gaussian' (as PEFT does for this layer kind)"
        )
    return init


class AdapterLayer(nn.Module):
    """Base of the adapter layers here: the protocol of :mod:`fastlora.registry`.

    A subclass sets ``weight`` (the shared, frozen base weight, in the base
    module's own layout), defines :meth:`delta_weight` (the update in that
    layout, computed in float32 / float64) and :meth:`_new_base` (a plain base
    module around a given weight tensor); merge, unmerge and to_base follow.
    """

    is_adapter_layer = True  # apply_lora / apply_vera never wrap it again
    merged: bool

    def _setup_hyperparameters(self, r: int, alpha: float, dropout: float, use_rslora: bool) -> None:
        check_lora_hyperparameters(r, alpha, dropout)
        self.r = r
        self.alpha = float(alpha)
        self.dropout = float(dropout)
        self.use_rslora = bool(use_rslora)
        self.scaling = lora_scaling(r, alpha, use_rslora)
        self.merged = False

    def delta_weight(self) -> Tensor:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def _new_base(self, weight: Tensor) -> nn.Module:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def _check_mergeable(self) -> None:
        """Raise if the update cannot be added into the base weight in place."""

    @torch.no_grad()
    def merged_weight(self) -> Tensor:
        """The base weight plus the update, in float32 (float64 for float64 weights); a new tensor."""
        acc = accumulation_dtype(self.weight)
        weight = self.weight.detach().to(acc)
        return weight.clone() if self.merged else weight + self.delta_weight()

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update into the (shared) base weight, rounded once to its dtype;
        later forwards skip the adapter branch."""
        if self.merged:
            return
        self._check_mergeable()
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
    def to_base(self) -> nn.Module:
        """A new plain module of the base type with the update merged in (new
        tensors, rounded once to the weight's dtype); this layer is unchanged."""
        out = self._new_base(self.merged_weight().to(self.weight.dtype))
        out.train(self.training)
        return out

    def _hyper_repr(self) -> str:
        return (
            f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}, dropout={self.dropout:g}"
            + (", rslora=True" if self.use_rslora else "")
            + (", merged=True" if self.merged else "")
        )


def new_parameter(t: Tensor, like: Tensor | None) -> nn.Parameter:
    """``t`` (a new tensor) as a Parameter whose requires_grad follows ``like``'s."""
    return nn.Parameter(t, requires_grad=bool(like is not None and like.requires_grad))


def kaiming_a(t: Tensor) -> None:
    """PEFT's default init of ``lora_A``: kaiming-uniform with a = sqrt(5) (as nn.Linear / nn.Conv)."""
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))


__all__ = [
    "AdapterLayer",
    "accumulation_dtype",
    "base_forward_of",
    "check_builder_config",
    "check_plain_forward",
    "check_simple_init",
    "kaiming_a",
    "new_parameter",
]
