"""LoRA model surgery: :class:`LoRAConfig`, :func:`apply_lora`, :func:`merge_lora`,
:func:`count_parameters`, and the LoRA kind's registrations.

``target_modules`` is spelled as in PEFT: a list of module-name suffixes
(``["q_proj", "v_proj"]`` matches ``model.layers.0.self_attn.q_proj``), a
regular expression string matched against the full module name, or
``"all-linear"`` (every nn.Linear except the output layer). ``None`` targets
every module LoRA can adapt. The selection, the surgery and the merge are
:mod:`fastlora.registry`'s; this module registers which layer LoRA puts on
which base module (``nn.Linear`` -> :class:`LoRALinear`, or
:class:`QLoRALinear` with ``quantize``, the DoRA subclasses with
``use_dora``; a bitsandbytes ``Linear4bit`` -> :class:`QLoRALinear`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from .dora import DoRALinear, QDoRALinear
from .modules import LoRALinear
from .peft_fields import ALIASES, PEFT_LORA_DEFAULTS, default_target_modules, init_from_peft, unsupported_fields
from .qlora import QLoRALinear
from .registry import (
    adapter_layers,
    is_adapter_layer,
    apply_adapter,
    count_parameters,
    merge_adapters,
    normalize_target_modules,
    pattern_value,
    register_adapter_kind,
    register_layer,
)
from .validation import check_bool, check_finite, check_init, check_lora_hyperparameters, check_rank

QUANT_TYPES = ("nf4", "fp4")


@dataclass
class LoRAConfig:
    """What :func:`apply_lora` does; field names follow PEFT's ``LoraConfig``.

    r, alpha, dropout, use_rslora, init: as for :class:`LoRALinear`.
    target_modules: see the module docstring.
    modules_to_save: names (suffixes) of modules left trainable in full (never
    given an adapter).
    exclude_modules: names (suffixes, or one regex) never given an adapter.
    rank_pattern / alpha_pattern: ``{name regex: value}`` overrides per module
    (PEFT's semantics: the key matches the end of the module name).
    quantize: ``"nf4"`` or ``"fp4"`` quantizes every targeted layer's base weight to
    4 bits (bitsandbytes' format, blocksize ``quant_blocksize``, double
    quantization ``quant_double``) and makes it a :class:`QLoRALinear`. Layers that
    already are bitsandbytes ``Linear4bit`` always become QLoRALinear.
    use_dora: DoRA (:class:`fastlora.dora.DoRALinear`; :class:`fastlora.dora.QDoRALinear`
    on 4-bit bases): a trainable magnitude vector per layer on top of the adapter.
    autocast_adapter_dtype: PEFT's default (True): on a bf16 / fp16 base the
    adapters are float32 (an fp32 master copy; the LoRA branch runs in fp32, as
    PEFT's does); False keeps them in the base weight's dtype.
    """

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: list[str] | str | None = None
    use_rslora: bool = False
    use_dora: bool = False
    quantize: str | None = None
    quant_blocksize: int = 64
    quant_double: bool = True
    init: str = "default"
    modules_to_save: list[str] | None = None
    exclude_modules: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    autocast_adapter_dtype: bool = True

    def __post_init__(self) -> None:
        check_lora_hyperparameters(self.r, self.alpha, self.dropout)
        check_init(self.init, "LoRAConfig.init")
        check_bool(self.use_dora, "LoRAConfig.use_dora")
        check_bool(self.use_rslora, "LoRAConfig.use_rslora")
        check_bool(self.autocast_adapter_dtype, "LoRAConfig.autocast_adapter_dtype")
        if self.quantize not in (None, *QUANT_TYPES):
            raise ValueError(f"LoRAConfig.quantize must be None, 'nf4' or 'fp4', got {self.quantize!r}")
        self.target_modules = normalize_target_modules(self.target_modules)
        for what in ("rank_pattern", "alpha_pattern"):
            if not isinstance(getattr(self, what), dict):
                raise TypeError(f"LoRAConfig.{what} must be a dict {{module regex: value}}, got {getattr(self, what)!r}")
        for key, value in self.rank_pattern.items():
            check_rank(value, f"LoRAConfig.rank_pattern[{key!r}]")
        for key, value in self.alpha_pattern.items():
            check_finite(value, f"LoRAConfig.alpha_pattern[{key!r}]")

    @classmethod
    def from_peft(cls, peft_config) -> "LoRAConfig":
        """The LoRAConfig of a ``peft.LoraConfig`` (or its ``to_dict()``): PEFT's field
        names mapped to fastlora's (``lora_alpha`` -> ``alpha``, ``lora_dropout`` ->
        ``dropout``, ``init_lora_weights`` -> ``init``, ...). A setting fastlora does
        not implement (``bias="all"``, ``layers_to_transform``, ``lora_bias``, ...)
        is a ValueError naming it, never silently dropped."""
        fields = peft_config.to_dict() if hasattr(peft_config, "to_dict") else peft_config
        if not isinstance(fields, dict):
            raise TypeError(f"LoRAConfig.from_peft: expected a peft.LoraConfig or a dict, got {type(peft_config).__name__}")
        peft_type = str(getattr(fields.get("peft_type"), "value", fields.get("peft_type", "LORA")))
        if peft_type != "LORA":
            raise ValueError(f"LoRAConfig.from_peft: peft_type is {peft_type!r}; a LoRAConfig describes a LORA adapter")
        unknown = sorted(set(fields) - set(PEFT_LORA_DEFAULTS))
        if unknown:
            raise ValueError(f"LoRAConfig.from_peft: unknown PEFT fields {unknown}; fastlora cannot tell what they change")
        unsupported = unsupported_fields(fields)
        if unsupported:
            shown = {k: fields[k] for k in unsupported}
            raise ValueError(f"LoRAConfig.from_peft: settings fastlora does not implement: {shown}")
        target = fields.get("target_modules")
        return cls(
            r=fields.get("r", 8),
            alpha=fields.get("lora_alpha", 8),
            dropout=fields.get("lora_dropout", 0.0),
            target_modules=sorted(target) if isinstance(target, (set, frozenset)) else target,
            use_rslora=fields.get("use_rslora", False),
            use_dora=fields.get("use_dora", False),
            init=init_from_peft(fields.get("init_lora_weights", True)),
            modules_to_save=list(fields["modules_to_save"]) if fields.get("modules_to_save") else None,
            exclude_modules=fields.get("exclude_modules"),
            rank_pattern=dict(fields.get("rank_pattern") or {}),
            alpha_pattern=dict(fields.get("alpha_pattern") or {}),
        )

    def layer_kwargs(self, name: str) -> dict:
        """The layer arguments for the module ``name`` (rank and alpha patterns applied)."""
        return dict(
            r=pattern_value(name, self.rank_pattern, self.r),
            alpha=pattern_value(name, self.alpha_pattern, self.alpha),
            dropout=self.dropout,
            use_rslora=self.use_rslora,
            init=self.init,
        )


def upcast_adapters(layer: nn.Module, config: LoRAConfig) -> nn.Module:
    """PEFT's ``autocast_adapter_dtype``: 16-bit adapter tensors (``peft_tensors()``)
    become float32, in place (the values are exact in fp32); returns the layer."""
    if config.autocast_adapter_dtype:
        for t in layer.peft_tensors().values():
            if t.dtype in (torch.float16, torch.bfloat16):
                t.data = t.data.float()
    return layer


def _build_linear(linear: nn.Linear, name: str, config: LoRAConfig, shared) -> nn.Module:
    kwargs = config.layer_kwargs(name)
    if config.quantize is not None:
        cls = QDoRALinear if config.use_dora else QLoRALinear
        layer = cls.from_linear(
            linear, quant_type=config.quantize, blocksize=config.quant_blocksize, double_quant=config.quant_double, **kwargs
        )
    else:
        layer = (DoRALinear if config.use_dora else LoRALinear).from_linear(linear, **kwargs)
    return upcast_adapters(layer, config)


def _build_bnb_4bit(linear4bit: nn.Module, name: str, config: LoRAConfig, shared) -> nn.Module:
    """A model loaded in 4 bits by bitsandbytes: the quant state is shared, not copied."""
    layer = (QDoRALinear if config.use_dora else QLoRALinear).from_bnb(linear4bit, **config.layer_kwargs(name))
    return upcast_adapters(layer, config)


register_adapter_kind("lora", LoRAConfig, label="LoRA")
register_layer(LoRAConfig, nn.Linear, _build_linear, LoRALinear, QLoRALinear)
register_layer(LoRAConfig, "bitsandbytes.nn.modules.Linear4bit", _build_bnb_4bit, QLoRALinear)


def apply_lora(model: nn.Module, config: LoRAConfig | None = None, **overrides) -> nn.Module:
    """Replace the targeted modules of ``model`` by LoRA layers in place
    (:class:`LoRALinear` on an nn.Linear, :class:`QLoRALinear` with ``quantize`` or
    on a bitsandbytes ``Linear4bit``, the DoRA subclasses with ``use_dora``),
    freeze every parameter that is not an adapter's (adapters from an earlier
    call stay as they are), unfreeze ``modules_to_save``, and return ``model``.

    ``config`` may be a ``peft.LoraConfig`` (see :meth:`LoRAConfig.from_peft`);
    ``overrides`` replace fields of ``config``, in fastlora's or PEFT's spelling:
    ``apply_lora(model, r=16, alpha=32)`` or ``apply_lora(model, r=16, lora_alpha=32)``.
    ``target_modules=None`` means what it means in PEFT: for a transformers model
    its architecture's default (e.g. ``q_proj`` and ``v_proj`` for Llama; an error
    for a type without one), for any other module every linear layer.
    """
    if config is None:
        config = LoRAConfig()
    elif not isinstance(config, LoRAConfig):
        if isinstance(config, dict) or hasattr(config, "peft_type"):
            config = LoRAConfig.from_peft(config)
        else:
            raise TypeError(f"apply_lora: config must be a fastlora.LoRAConfig or a peft.LoraConfig, got {type(config).__name__}")
    if overrides:
        overrides = dict(overrides)
        for peft_name, ours in ALIASES.items():
            if peft_name in overrides:
                if ours in overrides:
                    raise TypeError(f"apply_lora got both {peft_name} and {ours} (the same field in PEFT's and fastlora's spelling)")
                value = overrides.pop(peft_name)
                overrides[ours] = init_from_peft(value) if peft_name == "init_lora_weights" else value
        unknown = set(overrides) - {f.name for f in dataclasses.fields(LoRAConfig)}
        if unknown:
            raise TypeError(f"apply_lora got unknown LoRAConfig fields: {sorted(unknown)}")
        config = dataclasses.replace(config, **overrides)
    if config.target_modules is None and isinstance(model, nn.Module):
        config = dataclasses.replace(config, target_modules=default_target_modules(model))
    return apply_adapter(model, config, what="apply_lora")


def lora_layers(model: nn.Module) -> dict[str, LoRALinear | QLoRALinear]:
    """The model's LoRA layers (LoRALinear and QLoRALinear, DoRA included) by module name."""
    return adapter_layers(model, "lora")


def merge_lora(model: nn.Module, *, unload: bool = True) -> nn.Module:
    """Merge every adapter layer's update (LoRA, and VeRA / AdaLoRA / the other
    kinds too) into its base weight; returns ``model``.

    ``unload=True`` (PEFT's ``merge_and_unload``): each adapter layer is replaced
    by a plain module of its base type with the update merged in (a bare
    adapter layer returns its merged module). ``unload=False`` (PEFT's
    ``merge_adapter``): the layers stay, merged in place (their forward skips the
    adapters), and :func:`unmerge_lora` subtracts the updates again. 4-bit layers
    cannot merge in place without re-quantizing: with ``unload=False`` they are a
    ValueError naming them, raised before any layer changes."""
    if unload:
        return merge_adapters(model)
    layers = {"": model} if is_adapter_layer(model) else adapter_layers(model)
    quantized = sorted(n for n, m in layers.items() if isinstance(m, QLoRALinear))
    if quantized:
        raise ValueError(
            f"merge_lora(unload=False): {quantized} hold 4-bit weights, which cannot take the update in place "
            "without re-quantizing; use merge_lora(model) (full-precision layers) or layer.merge_and_quantize()"
        )
    for layer in layers.values():
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_lora` ``(unload=False)``: subtract each merged layer's update
    from its base weight (exact up to the weight dtype's rounding); returns ``model``."""
    layers = {"": model} if is_adapter_layer(model) else adapter_layers(model)
    for layer in layers.values():
        if layer.merged:
            layer.unmerge()
    return model


__all__ = ["LoRAConfig", "QUANT_TYPES", "upcast_adapters", "apply_lora", "count_parameters", "lora_layers", "merge_lora", "unmerge_lora"]
