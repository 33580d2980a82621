"""LoRA+ (arXiv:2402.12354): a larger learning rate for ``lora_B`` than for ``lora_A``.

:func:`loraplus_param_groups` builds the optimizer parameter groups exactly as
PEFT's ``peft.optimizers.create_loraplus_optimizer`` does; only the optimizer
changes, the model is untouched. :func:`create_loraplus_optimizer` wraps them
in an optimizer.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

# PEFT's default learning rate for the adapters of LoRA embedding layers.
DEFAULT_EMBEDDING_LR = 1e-6

_EIGHT_BIT_OPTIMIZERS = ("Adam8bit", "AdamW8bit", "PagedAdam8bit", "PagedAdamW8bit")


def _no_decay_names(model: nn.Module) -> set[str]:
    """Names of parameters that never get weight decay (Hugging Face Trainer's
    rule, which PEFT uses): those inside an ``nn.LayerNorm`` and any whose name
    contains ``"bias"``."""
    skip = set()
    for module_name, module in model.named_modules():
        # NOTE: as in transformers' get_parameter_names, only submodules count (a
        # bare LayerNorm passed as the model keeps decay).
        if module_name and isinstance(module, nn.LayerNorm):
            skip.update(f"{module_name}.{n}" for n, _ in module.named_parameters())
    return skip | {n for n, _ in model.named_parameters() if "bias" in n}


def _check_lr(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def loraplus_param_groups(
    model: nn.Module,
    lr: float,
    ratio: float = 16.0,
    *,
    weight_decay: float = 0.0,
    embedding_lr: float | None = None,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups for LoRA+, as PEFT's ``create_loraplus_optimizer``.

    Every trainable parameter of ``model`` goes to one of four groups, in this order
    (PEFT's layout, so group indices line up with a PEFT LoRA+ optimizer):

    0. ``lr``, ``weight_decay``: ``lora_A`` and every other parameter with >= 2
       dimensions whose name does not contain ``"lora_B"`` (e.g. a full
       ``modules_to_save`` weight).
    1. ``embedding_lr`` (default ``1e-6`` as in PEFT), ``weight_decay``: adapters
       of LoRA embedding layers; fastlora has none, so this group is empty.
    2. ``lr * ratio``, ``weight_decay``: parameters whose name contains
       ``"lora_B"``, and 1-D parameters, that get weight decay.
    3. ``lr * ratio``, weight decay 0: the same kind of parameters inside an
       ``nn.LayerNorm`` or with ``"bias"`` in their name.

    Each group is ``{"params": [tensors], "param_names": [names], "lr": ...,
    "weight_decay": ...}`` and can be passed to any ``torch.optim`` optimizer.

    Args:
        model: a model with LoRA layers (e.g. after :func:`fastlora.apply_lora`).
        lr: the learning rate of ``lora_A`` (PEFT's ``lr``).
        ratio: ``lr(lora_B) / lr(lora_A)`` (PEFT's ``loraplus_lr_ratio``; the
            paper recommends 16 or more).
        weight_decay: PEFT's ``loraplus_weight_decay``.
        embedding_lr: PEFT's ``loraplus_lr_embedding``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    lr = _check_lr("lr", lr)
    ratio = _check_lr("ratio", ratio)
    weight_decay = _check_lr("weight_decay", weight_decay)
    embedding_lr = _check_lr("embedding_lr", DEFAULT_EMBEDDING_LR if embedding_lr is None else embedding_lr)
    no_decay = _no_decay_names(model)
    group_a, embedding, group_b, group_b_no_decay = {}, {}, {}, {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if "lora_B" in name or param.ndim == 1:
            (group_b_no_decay if name in no_decay else group_b)[name] = param
        else:
            group_a[name] = param
    if not (group_a or group_b or group_b_no_decay):
        raise ValueError("model has no trainable parameter: apply LoRA first (fastlora.apply_lora)")

    def group(params: dict[str, torch.Tensor], group_lr: float, decay: float) -> dict[str, Any]:
        return {"params": list(params.values()), "param_names": list(params), "lr": group_lr, "weight_decay": decay}

    return [
        group(group_a, lr, weight_decay),
        group(embedding, embedding_lr, weight_decay),
        group(group_b, lr * ratio, weight_decay),
        group(group_b_no_decay, lr * ratio, 0.0),
    ]


def create_loraplus_optimizer(
    model: nn.Module,
    optimizer_cls: type[torch.optim.Optimizer],
    lr: float,
    ratio: float = 16.0,
    *,
    weight_decay: float = 0.0,
    embedding_lr: float | None = None,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """``optimizer_cls(loraplus_param_groups(model, lr, ratio, ...), lr=lr, **kwargs)``.

    The LoRA+ optimizer of PEFT's ``create_loraplus_optimizer(model, optimizer_cls,
    lr=lr, loraplus_lr_ratio=ratio, loraplus_weight_decay=weight_decay,
    loraplus_lr_embedding=embedding_lr, **kwargs)``; ``kwargs`` (betas, eps, ...) go
    to the optimizer. As in PEFT, bitsandbytes' 8-bit Adam variants are told to
    keep ``nn.Embedding`` weights in 32-bit state.

    Example::

        opt = fastlora.create_loraplus_optimizer(model, torch.optim.AdamW, lr=2e-4, ratio=16)
    """
    if "loraplus_lr_ratio" in kwargs or "loraplus_weight_decay" in kwargs or "loraplus_lr_embedding" in kwargs:
        raise TypeError(
            "create_loraplus_optimizer takes ratio=, weight_decay= and embedding_lr= "
            "(PEFT's loraplus_lr_ratio, loraplus_weight_decay, loraplus_lr_embedding)"
        )
    groups = loraplus_param_groups(model, lr, ratio, weight_decay=weight_decay, embedding_lr=embedding_lr)
    optimizer = optimizer_cls(groups, lr=lr, **kwargs)
    if optimizer_cls.__name__ in _EIGHT_BIT_OPTIMIZERS:
        import bitsandbytes

        manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                manager.register_module_override(module, "weight", {"optim_bits": 32})
    return optimizer
