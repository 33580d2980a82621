"""The adapters the demo can apply (``--variant``): one :class:`Variant` record
each, and :func:`adapt` / :func:`merge` / :func:`make_optimizer`, which build,
merge and train them through fastlora's public API only."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

import fastlora

from .. import (
    AdaLoRAConfig, LoRAConfig, VeRAConfig, apply_adalora, apply_lora, apply_vera, create_loraplus_optimizer,
    merge_adalora, merge_lora, merge_vera,
)
from .data import layers
from .settings import (
    ADALORA_INIT_FACTOR, ADALORA_TFINAL, ADALORA_TINIT, LORA_LR, LORA_RANK, LORAPLUS_RATIO, MULTI_EPOCHS, MULTI_TASKS, NF4,
    VERA_LR, VERA_RANK,
)

# Names of the trainable adapter parameters (every variant's).
ADAPTER_PARAMS = ("lora_A", "lora_B", "lora_magnitude", "vera_lambda_d", "vera_lambda_b", "lora_E")


@dataclass(frozen=True)
class Variant:
    """What the walkthrough needs to know about one ``--variant``."""

    name: str  # the --variant value
    label: str  # in titles and tables: "LoRA", "QDoRA", ...
    summary: str  # the configuration section's one-line description, after the name
    merge_call: str  # section 8: what merges the adapters ...
    merged_weight: str  # ... and the weight each merged layer holds
    # LoRAConfig keywords beyond r and alpha (None: the adapters come from elsewhere).
    lora_config: dict | None = None
    nf4: bool = False  # base weights stored in NF4
    dora: bool = False  # a trainable magnitude vector per layer
    rewrites_base: bool = False  # the base weight becomes the residual W - s B A
    own_rank_table: bool = False  # section 9 compares this variant's ranks (else plain LoRA's)
    default_rank: int = LORA_RANK
    default_lr: float = LORA_LR
    default_epochs: int = 100
    notes: tuple[str, ...] = field(default=())  # extra lines under section 4's apply call

    @property
    def description(self) -> str:
        return f"{self.name} ({self.summary})" if self.summary else self.name

    @property
    def config_keywords(self) -> str:
        """The LoRAConfig keywords as section 4 prints them: ``", use_dora=True"``."""
        return "".join(f", {key}={value!r}" for key, value in (self.lora_config or {}).items())

    @property
    def merge_formula(self) -> str:
        kind = "an fp32" if self.nf4 else "a plain"
        return f"{self.merge_call}: each layer becomes {kind} nn.Linear with {self.merged_weight}"


_LORA_MERGE = ("merge_lora(model)", "W + (alpha / r) B A")
_DORA_NOTES = (
    "DoRA: y = m * (W + s B A) x / ||W + s B A||_row + bias, with a trainable magnitude m [out]",
    "per layer, initialised to the row norms (so the adapted model starts as the base).",
)
_RESIDUAL = ("merge_lora(model)", "W_residual + (alpha / r) B A")

VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("lora", "LoRA", "", *_LORA_MERGE, lora_config={}, own_rank_table=True),
        Variant(
            "qlora", "QLoRA", "NF4 base weights", "QLoRALinear.to_linear()", "deq(W) + (alpha / r) B A",
            nf4=True, own_rank_table=True,
        ),
        Variant(
            "dora", "DoRA", "LoRAConfig(use_dora=True): LoRA + a magnitude vector per layer",
            "merge_lora(model)", "m * V / ||V||_row, V = W + s B A",
            lora_config={"use_dora": True}, dora=True, own_rank_table=True, notes=_DORA_NOTES,
        ),
        Variant(
            "qdora", "QDoRA", "DoRA on NF4 base weights", "merge_lora(model)", "m * V / ||V||_row, V = deq(W) + s B A",
            lora_config={"use_dora": True, "quantize": NF4["quant_type"]}, nf4=True, dora=True, own_rank_table=True,
            notes=_DORA_NOTES,
        ),
        Variant(
            "vera", "VeRA", "apply_vera: shared frozen random projections, trainable vectors",
            "merge_vera(model)", "W + (lambda_b B_s)(lambda_d A_s)", default_rank=VERA_RANK, default_lr=VERA_LR,
        ),
        Variant(
            "loraplus", "LoRA+", "plain LoRA, LoRA+ optimizer", *_LORA_MERGE, lora_config={},
            notes=("LoRA+ changes the optimizer only (section 5): the adapters are plain LoRA.",),
        ),
        Variant(
            "pissa", "PiSSA", "LoRAConfig(init='pissa'): adapters from the top singular directions", *_RESIDUAL,
            lora_config={"init": "pissa"}, rewrites_base=True,
        ),
        Variant(
            "olora", "OLoRA", "LoRAConfig(init='olora'): adapters from a QR factorisation", *_RESIDUAL,
            lora_config={"init": "olora"}, rewrites_base=True,
        ),
        Variant(
            "multi", "Multi-adapter LoRA",
            f"{MULTI_TASKS} tasks' adapters trained together in mixed batches (MultiAdapterModel)", *_LORA_MERGE,
            lora_config={}, default_epochs=MULTI_EPOCHS,
        ),
        Variant(
            "adalora", "AdaLoRA", "apply_adalora: SVD-form adapters, ranks pruned during training",
            "merge_adalora(model)", "W + (alpha / init_r) B (E * A)",
        ),
    )
}


def qlora_class() -> type[nn.Module] | None:
    """``fastlora.QLoRALinear``, or None when this build lacks it."""
    return getattr(fastlora, "QLoRALinear", None)


# --------------------------------------------------------------------------- AdaLoRA


def adalora_init_r(target_r: int) -> int:
    """AdaLoRA's initial rank per layer for a target (average, final) rank: 1.5x, rounded up."""
    return math.ceil(ADALORA_INIT_FACTOR * target_r)


def adalora_config(target_r: int, alpha: float, total_step: int) -> AdaLoRAConfig:
    """The demo's AdaLoRA config: ``init_r`` = :func:`adalora_init_r`, ``tinit`` / ``tfinal``
    = ADALORA_TINIT / ADALORA_TFINAL of ``total_step`` (``tfinal`` at least one step, so the
    final rank pattern is always reached), mask every step; PEFT's other defaults."""
    if total_step < 2:
        raise ValueError(f"AdaLoRA needs at least 2 training steps (a warm-up and a final step), got {total_step}")
    tfinal = max(1, round(ADALORA_TFINAL * total_step))
    tinit = min(round(ADALORA_TINIT * total_step), total_step - tfinal - 1)
    return AdaLoRAConfig(
        init_r=adalora_init_r(target_r), target_r=target_r, tinit=tinit, tfinal=tfinal, deltaT=1,
        total_step=total_step, alpha=alpha,
    )


def adalora_scaling(config: AdaLoRAConfig) -> float:
    """AdaLoRA's ``scaling / (init_r + 1e-5)`` (``scaling = alpha``, or ``init_r`` when ``alpha <= 0``)."""
    return (config.alpha if config.alpha > 0 else config.init_r) / (config.init_r + 1e-5)


# --------------------------------------------------------------------------- build, train, merge


def adapt(model: nn.Module, variant: str, r: int, alpha: float, *, adalora: AdaLoRAConfig | None = None) -> nn.Module:
    """Give ``model``'s three layers an adapter of rank ``r`` in place; the base is
    frozen. ``variant``: a key of :data:`VARIANTS` ("qlora" / "qdora" also store the
    base weights in NF4; "vera" ignores ``alpha``; "loraplus" is plain LoRA, only
    its optimizer differs; "adalora" applies ``adalora``, whose ``target_r`` is ``r``)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {tuple(VARIANTS)}, got {variant!r}")
    lora_config = VARIANTS[variant].lora_config
    if lora_config is not None:
        if "quantize" in lora_config:
            lora_config = {**lora_config, "quant_blocksize": NF4["blocksize"], "quant_double": NF4["double_quant"]}
        return apply_lora(model, LoRAConfig(r=r, alpha=alpha, **lora_config))
    if variant == "adalora":
        if adalora is None or adalora.target_r != r or adalora.alpha != alpha:
            raise ValueError("variant 'adalora' needs adalora=adalora_config(r, alpha, total_step)")
        return apply_adalora(model, adalora)
    if variant == "vera":
        return apply_vera(model, VeRAConfig(r=r))
    # qlora: QLoRALinear layers built one by one.
    qlora_linear = qlora_class()
    for name, layer in layers(model).items():
        setattr(model, name, qlora_linear.from_linear(layer, r=r, alpha=alpha, **NF4))
    for name, p in model.named_parameters():
        p.requires_grad_(name.rsplit(".", 1)[-1] in ("lora_A", "lora_B"))
    return model


def merge(model: nn.Module) -> nn.Module:
    """``merge_vera``, ``merge_adalora`` and ``merge_lora``; a QLoRA layer that is not a
    LoRALinear is merged with its own ``to_linear`` (dequantized base weight plus the update)."""
    merge_vera(model)
    merge_adalora(model)
    merge_lora(model)
    for name, layer in layers(model).items():
        if type(layer) is not nn.Linear:
            if not hasattr(layer, "to_linear"):
                raise RuntimeError(f"{type(layer).__name__} has no to_linear(); cannot merge layer {name}")
            setattr(model, name, layer.to_linear())
    return model


def optimizer_name(variant: str) -> str:
    """The optimizer as the JSON's configuration names it."""
    if variant == "loraplus":
        return (
            f"LoRA+: create_loraplus_optimizer(model, torch.optim.Adam, lr, ratio={LORAPLUS_RATIO:g}) "
            f"(lora_B at lr x {LORAPLUS_RATIO:g}; instead of Adam on one parameter list)"
        )
    return "Adam"


def make_optimizer(variant: str, model: nn.Module, lr: float) -> torch.optim.Optimizer | None:
    """The variant's optimizer for ``model`` (None: :func:`~.training.fit`'s plain Adam)."""
    if variant == "loraplus":
        return create_loraplus_optimizer(model, torch.optim.Adam, lr=lr, ratio=LORAPLUS_RATIO)
    return None


def trainable(module: nn.Module) -> int:
    """The number of trainable parameters in ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def weight_nbytes(layer: nn.Module) -> int:
    """Bytes of a QLoRA layer's 4-bit base weight (codes and scales)."""
    if hasattr(layer, "weight_nbytes"):
        return int(layer.weight_nbytes())
    return sum(b.numel() * b.element_size() for b in layer.buffers())
