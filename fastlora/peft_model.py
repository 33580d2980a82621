"""Run a ``peft.PeftModel``'s LoRA layers on fastlora's fused ops: :func:`from_peft`.

The PeftModel stays a PeftModel; each LoRA layer that fastlora can run exactly
gets a forward that calls the fused op, and falls back to PEFT's own forward
on the spot whenever the layer's state stops fitting. peft is imported only
when :func:`from_peft` is called.
"""

from __future__ import annotations

import torch
from torch import nn

from .functional import lora_linear
from .qlora import is_bnb_4bit, qlora_linear
from .quant import QuantizedWeight


def _peft_4bit_class():
    try:
        import peft.tuners.lora.bnb as peft_bnb

        return getattr(peft_bnb, "Linear4bit", None)
    except ImportError:  # bitsandbytes absent
        return None


def _peft_layer_problem(layer) -> str | None:
    """Why fastlora cannot run this PEFT LoRA layer (None when it can)."""
    import peft.tuners.lora as peft_lora

    # PEFT wraps a bitsandbytes Linear4bit in its bnb.Linear4bit layer where
    # bitsandbytes reports a GPU backend, else (CPU) in its plain Linear.
    if type(layer) not in (peft_lora.Linear, _peft_4bit_class()):
        return f"layer type {type(layer).__name__} (fastlora runs peft.tuners.lora.Linear and its bitsandbytes Linear4bit)"
    base = layer.get_base_layer()
    if type(base) is not nn.Linear and not is_bnb_4bit(base):
        return f"base layer type {type(base).__name__}"
    active = list(layer.active_adapters)
    if len(active) != 1:
        return f"{len(active)} active adapters {active} (fastlora fuses exactly one)"
    name = active[0]
    if layer.use_dora.get(name, False):
        return "DoRA adapter"
    if getattr(layer, "lora_bias", {}).get(name, False):
        return "lora_bias=True"
    if getattr(layer, "fan_in_fan_out", False):
        return "fan_in_fan_out=True"
    if getattr(layer, "cast_input_dtype_enabled", True) is False:
        return "cast_input_dtype disabled"
    if not isinstance(layer.lora_dropout[name], (nn.Dropout, nn.Identity)):
        return f"dropout module {type(layer.lora_dropout[name]).__name__}"
    return None


def _fused_forward(layer, adapter: str, original):
    """A forward for one PEFT LoRA layer that runs fastlora's fused op (the QLoRA
    op on a bitsandbytes 4-bit base), falling back to PEFT's own forward whenever
    the layer's state no longer fits."""
    cache: dict = {}

    def quantized(base):
        # The bitsandbytes tensors are shared, not copied; rebuilt if the weight is replaced.
        if cache.get("param") is not base.weight:
            cache.update(param=base.weight, qweight=QuantizedWeight.from_bnb(base))
        return cache["qweight"]

    def forward(x, *args, **kwargs):
        if args or kwargs or layer.disable_adapters or layer.merged or list(layer.active_adapters) != [adapter]:
            return original(x, *args, **kwargs)
        base = layer.get_base_layer()
        lora_A, lora_B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        drop = layer.lora_dropout[adapter]
        p = drop.p if isinstance(drop, nn.Dropout) else 0.0
        if is_bnb_4bit(base):
            # bitsandbytes computes in its compute_dtype and returns x's dtype; so do we.
            dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else (
                getattr(base, "compute_dtype", None) or x.dtype
            )
            cast = lambda t: t if t is None or t.dtype == dtype else t.to(dtype)  # noqa: E731
            y = qlora_linear(
                cast(x), quantized(base), cast(lora_A), cast(lora_B), layer.scaling[adapter], cast(base.bias),
                dropout=p, training=layer.training,
            )
            return y if y.dtype == x.dtype else y.to(x.dtype)
        if lora_A.dtype not in (base.weight.dtype, torch.float32):  # fp32 adapters on bf16 run mixed
            lora_A, lora_B = lora_A.to(base.weight.dtype), lora_B.to(base.weight.dtype)
        return lora_linear(
            x, base.weight, lora_A, lora_B, layer.scaling[adapter], base.bias, dropout=p, training=layer.training
        )

    return forward


def from_peft(peft_model: nn.Module) -> dict[str, list]:
    """Run the LoRA layers of a ``peft.PeftModel`` on fastlora's fused op, in place.

    The PeftModel stays a PeftModel: parameters, ``save_pretrained``,
    ``merge_and_unload``, ``generate`` and adapter switching work as before (a
    layer whose state stops fitting, e.g. merged or with another adapter
    active, falls back to PEFT's own forward on the spot). Layers fastlora
    cannot run (DoRA, several active adapters, non-Linear bases, ...) are left
    on PEFT's path and listed with the reason. Layers on a bitsandbytes 4-bit
    base (``Linear4bit``, nf4/fp4) run fastlora's QLoRA op on bitsandbytes' own
    packed weight (shared, not copied).

    Returns ``{"accelerated": [module names], "skipped": [(name, reason)]}``.
    """
    try:
        import peft.tuners.lora as peft_lora
    except ImportError as exc:  # pragma: no cover - only without peft
        raise ImportError("from_peft needs peft installed") from exc
    report: dict[str, list] = {"accelerated": [], "skipped": []}
    for name, module in peft_model.named_modules():
        if not isinstance(module, peft_lora.LoraLayer):
            continue
        problem = _peft_layer_problem(module)
        if problem is not None:
            report["skipped"].append((name, problem))
            continue
        if getattr(module, "_fastlora_original_forward", None) is None:
            module._fastlora_original_forward = module.forward
        module.forward = _fused_forward(module, list(module.active_adapters)[0], module._fastlora_original_forward)
        report["accelerated"].append(name)
    return report


__all__ = ["from_peft"]
