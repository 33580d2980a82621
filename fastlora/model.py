"""Model surgery: :class:`LoRAConfig`, :func:`apply_lora`, :func:`merge_lora`,
:func:`count_parameters`.

``target_modules`` is spelled as in PEFT: a list of module-name suffixes
(``["q_proj", "v_proj"]`` matches ``model.layers.0.self_attn.q_proj``), a
regular expression string matched against the full module name, or
``"all-linear"`` (every nn.Linear except the output layer). ``None`` targets
every nn.Linear.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from torch import nn

from .dora import DoRALinear, QDoRALinear
from .modules import LoRALinear, check_init, check_lora_hyperparameters
from .qlora import QLoRALinear

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

    def __post_init__(self) -> None:
        check_lora_hyperparameters(self.r, self.alpha, self.dropout)
        check_init(self.init, "LoRAConfig.init")
        if not isinstance(self.use_dora, bool):
            raise TypeError(f"LoRAConfig.use_dora must be True or False, got {self.use_dora!r}")
        if self.quantize not in (None, *QUANT_TYPES):
            raise ValueError(f"LoRAConfig.quantize must be None, 'nf4' or 'fp4', got {self.quantize!r}")
        self.target_modules = normalize_target_modules(self.target_modules)


def normalize_target_modules(target_modules):
    """PEFT's accepted forms: None, a regex string (or ``"all-linear"``), or an
    iterable of module-name suffixes (returned as a list)."""
    if target_modules is None or isinstance(target_modules, str):
        return target_modules
    if not all(isinstance(t, str) for t in target_modules):
        raise TypeError(f"target_modules must be a string or a list of strings, got {target_modules!r}")
    return list(target_modules)


def _matches_suffix(name: str, key: str) -> bool:
    return name == key or name.endswith("." + key)


def _pattern_value(name: str, pattern: dict, default):
    """PEFT's rank_pattern/alpha_pattern lookup: the first key that matches the
    end of the module name (as a regex) wins."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _output_layer_names(model: nn.Module) -> set[str]:
    names = set()
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            out = get_out()
        except (NotImplementedError, AttributeError):
            out = None
        if out is not None:
            names.update(n for n, m in model.named_modules() if m is out)
    names.update(n for n, _ in model.named_modules() if n.split(".")[-1] == "lm_head")
    return names


def _selected(name: str, spec, *, default: bool) -> bool:
    """PEFT's name matching: ``spec`` is a regex string (full match) or a list of
    module-name suffixes."""
    if spec is None:
        return default
    if isinstance(spec, str):
        try:
            return re.fullmatch(spec, name) is not None
        except re.error as exc:
            raise ValueError(f"target_modules/exclude_modules {spec!r} is not a valid regular expression: {exc}") from exc
    return any(_matches_suffix(name, key) for key in spec)


def _is_plain_linear(module: nn.Module) -> bool:
    """An nn.Linear that is not already one of fastlora's adapter layers (LoRA,
    DoRA, VeRA: those set the class attribute ``is_adapter_layer``)."""
    return isinstance(module, nn.Linear) and not getattr(module, "is_adapter_layer", False)


def target_linear_names(
    model: nn.Module, target_modules, *, exclude_modules=None, modules_to_save=None, include_lora: bool = False
) -> list[str]:
    """Names of the nn.Linear modules that ``target_modules`` selects (PEFT's rules),
    minus ``exclude_modules`` and ``modules_to_save``. Existing LoRA layers are
    skipped unless ``include_lora``."""
    linears = [
        n for n, m in model.named_modules()
        if n and (_is_plain_linear(m) or (include_lora and isinstance(m, (LoRALinear, QLoRALinear))))
    ]
    if target_modules == "all-linear":
        skip = _output_layer_names(model)
        chosen = [n for n in linears if n not in skip]
    else:
        chosen = [n for n in linears if _selected(n, target_modules, default=True)]
    saved = [re.compile(rf"(^|.*\.){key}($|\..*)") for key in modules_to_save or []]
    return [
        n for n in chosen
        if not _selected(n, exclude_modules, default=False) and not any(p.match(n) for p in saved)
    ]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def apply_lora(model: nn.Module, config: LoRAConfig | None = None, **overrides) -> nn.Module:
    """Replace the targeted nn.Linear modules of ``model`` by :class:`LoRALinear`
    (:class:`QLoRALinear` with ``quantize``; the DoRA subclasses with ``use_dora``)
    in place, freeze every parameter that is not a LoRA adapter (except
    ``modules_to_save``), and return ``model``.

    ``overrides`` replace fields of ``config``: ``apply_lora(model, r=16, alpha=32)``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.Linear):
        raise TypeError("apply_lora works on a model containing nn.Linear modules; wrap a bare layer with LoRALinear.from_linear")
    config = config if config is not None else LoRAConfig()
    if overrides:
        unknown = set(overrides) - {f.name for f in dataclasses.fields(LoRAConfig)}
        if unknown:
            raise TypeError(f"apply_lora got unknown LoRAConfig fields: {sorted(unknown)}")
        config = dataclasses.replace(config, **overrides)
    names = target_linear_names(
        model, config.target_modules, exclude_modules=config.exclude_modules, modules_to_save=config.modules_to_save
    )
    if not names:
        available = [n for n, m in model.named_modules() if _is_plain_linear(m)]
        raise ValueError(
            f"target_modules={config.target_modules!r} matched no nn.Linear module; the model's nn.Linear modules are {available}"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        linear = model.get_submodule(name)
        kwargs = dict(
            r=_pattern_value(name, config.rank_pattern, config.r),
            alpha=_pattern_value(name, config.alpha_pattern, config.alpha),
            dropout=config.dropout,
            use_rslora=config.use_rslora,
            init=config.init,
        )
        dense_cls, quant_cls = (DoRALinear, QDoRALinear) if config.use_dora else (LoRALinear, QLoRALinear)
        if _is_bnb_4bit(linear):  # a model loaded in 4 bits by bitsandbytes
            layer = quant_cls.from_bnb(linear, **kwargs)
        elif config.quantize is not None:
            layer = quant_cls.from_linear(
                linear, quant_type=config.quantize, blocksize=config.quant_blocksize, double_quant=config.quant_double,
                **kwargs,
            )
        else:
            layer = dense_cls.from_linear(linear, **kwargs)
        _set_submodule(model, name, layer)
    for key in config.modules_to_save or []:
        hits = [m for n, m in model.named_modules() if n and _matches_suffix(n, key)]
        if not hits:
            raise ValueError(f"modules_to_save entry {key!r} matches no module of the model")
        for m in hits:
            for p in m.parameters():
                p.requires_grad_(True)
    return model


def _is_bnb_4bit(module: nn.Module) -> bool:
    return type(module).__name__ == "Linear4bit" and type(module).__module__.startswith("bitsandbytes")


def lora_layers(model: nn.Module) -> dict[str, LoRALinear | QLoRALinear]:
    """The model's LoRA layers (LoRALinear and QLoRALinear) by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (LoRALinear, QLoRALinear))}


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every :class:`LoRALinear` by a plain ``nn.Linear`` with the update
    merged in (in place); returns ``model`` (a bare LoRALinear becomes an nn.Linear)."""
    if isinstance(model, (LoRALinear, QLoRALinear)):
        return model.to_linear()
    for name, layer in lora_layers(model).items():
        _set_submodule(model, name, layer.to_linear())
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts; shared parameters count once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total
