"""The adapter registry: which adapter layer wraps which base module, per adapter kind.

An *adapter kind* (LoRA, VeRA, AdaLoRA) is its config type plus, for each base
module type it can adapt, one *builder* ``(module, name, config, shared) ->
adapter layer``. Model surgery (:func:`apply_adapter`, behind ``apply_lora``,
``apply_vera`` and ``apply_adalora``), target selection (PEFT's
``target_modules`` / ``exclude_modules`` / ``modules_to_save`` rules), merging
(:func:`merge_adapters`), :func:`count_parameters` and the adapter files go
through these tables, so a new layer kind is one :func:`register_layer` call
and a new adapter kind one :func:`register_adapter_kind` call (the way
torchao's ``quantize_`` dispatches on its config type).

Base module types are given as classes, or as ``"module.QualName"`` strings
for classes of optional packages (bitsandbytes, transformers), matched along
the module's MRO without importing the package.

The adapter-layer protocol (what the registry's users call):

* class attribute ``is_adapter_layer = True`` (never wrapped again);
* ``merged`` (bool), ``merge()``, ``unmerge()``;
* ``to_base()``: a new plain module of the base type with the update merged in
  (the layer is unchanged);
* ``peft_tensors()``: ``{key relative to the module name: live tensor}``, the
  layer's entries of a PEFT adapter file (``lora_A.weight``, ...); the adapter
  loader checks a file's tensors against these keys and shapes before it
  copies anything into them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from contextlib import contextmanager
from functools import lru_cache
from dataclasses import dataclass, field

from torch import nn

from ._patterns import compile_module_pattern, fullmatch_module_name, match_pattern_key

Builder = Callable[[nn.Module, str, object, object], nn.Module]


@dataclass
class AdapterKind:
    """One adapter kind: its config type, its builders and its layer classes."""

    name: str
    config_type: type
    label: str = ""  # how messages spell it: "LoRA", "VeRA", "AdaLoRA"
    prepare: Callable | None = None  # (model, config, {name: base module}, shared) -> shared state
    one_per_model: bool = False
    builders: list[tuple[type | str, Builder]] = field(default_factory=list)
    layer_types: tuple[type, ...] = ()
    # Base types target_modules=None leaves alone (adapted only when named), and base
    # types "all-linear" selects besides nn.Linear (transformers' Conv1D, as PEFT).
    explicit_only: list[type | str] = field(default_factory=list)
    linear_types: list[type | str] = field(default_factory=list)

    def builder_for(self, module: nn.Module) -> Builder | None:
        """The builder registered for the most derived class of ``module`` (None if none)."""
        for cls in type(module).__mro__:
            qualified = f"{cls.__module__}.{cls.__qualname__}"
            for base, builder in self.builders:
                if base is cls or base == qualified:
                    return builder
        return None

    def is_explicit_only(self, module: nn.Module) -> bool:
        return is_instance(module, self.explicit_only)

    def is_linear(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear) or is_instance(module, self.linear_types)

    def base_type_names(self) -> list[str]:
        return [b if isinstance(b, str) else f"{b.__module__}.{b.__qualname__}" for b, _ in self.builders]


def is_instance(module: nn.Module, bases) -> bool:
    """isinstance against classes or ``"module.QualName"`` strings (matched along the MRO)."""
    for cls in type(module).__mro__:
        qualified = f"{cls.__module__}.{cls.__qualname__}"
        if any(b is cls or b == qualified for b in bases):
            return True
    return False


_KINDS: dict[type, AdapterKind] = {}


def register_adapter_kind(
    name: str, config_type: type, *, label: str | None = None, prepare: Callable | None = None, one_per_model: bool = False
) -> AdapterKind:
    """Register an adapter kind for ``config_type`` (``prepare`` builds state shared
    by its layers, e.g. VeRA's projections; ``one_per_model`` refuses a second
    application). Returns the kind, to which :func:`register_layer` adds builders."""
    kind = AdapterKind(name, config_type, label=label or name, prepare=prepare, one_per_model=one_per_model)
    _KINDS[config_type] = kind
    return kind


def register_layer(
    config_type: type, base: type | str, builder: Builder, *layer_types: type, by_default: bool = True, linear: bool = False
) -> None:
    """Let the adapter kind of ``config_type`` adapt modules of type ``base`` with
    ``builder(module, name, config, shared)``, which returns the adapter layer;
    ``layer_types`` are the adapter layer classes it can return. ``by_default=False``:
    ``target_modules=None`` leaves such modules alone (embeddings, convolutions: only
    adapted when named); ``linear=True``: ``"all-linear"`` selects them (Conv1D)."""
    kind = kind_for(config_type)
    kind.builders.append((base, builder))
    if not by_default:
        kind.explicit_only.append(base)
    if linear:
        kind.linear_types.append(base)
    kind.layer_types = tuple(dict.fromkeys(kind.layer_types + layer_types))


def kind_for(config) -> AdapterKind:
    """The adapter kind of a config (instance or type)."""
    config_type = config if isinstance(config, type) else type(config)
    for cls in config_type.__mro__:
        if cls in _KINDS:
            return _KINDS[cls]
    known = sorted(k.config_type.__name__ for k in _KINDS.values())
    raise TypeError(f"config must be one of fastlora's adapter configs {known}, got {config_type.__name__}")


def kinds() -> list[AdapterKind]:
    """Every registered adapter kind."""
    return list(_KINDS.values())


def unwrapped(model: nn.Module) -> nn.Module:
    """The model a fastlora wrapper holds (a class with ``fastlora_wrapper = True``
    keeps it as ``.model``: :class:`fastlora.adapters.MultiAdapterModel`), else
    ``model``: adapter files name modules as the wrapped model does."""
    return model.model if getattr(type(model), "fastlora_wrapper", False) else model


def is_adapter_layer(module: nn.Module) -> bool:
    """True for fastlora's adapter layers (they set ``is_adapter_layer``)."""
    return bool(getattr(module, "is_adapter_layer", False))


def adapter_layers(model: nn.Module, kind: str | None = None) -> dict[str, nn.Module]:
    """The model's adapter layers by module name (those of one kind if ``kind``
    names it: ``"lora"``, ``"vera"``, ``"adalora"``)."""
    if kind is None:
        return {n: m for n, m in model.named_modules() if is_adapter_layer(m)}
    types = next((k.layer_types for k in _KINDS.values() if k.name == kind), None)
    if types is None:
        raise ValueError(f"kind must be one of {sorted(k.name for k in _KINDS.values())}, got {kind!r}")
    return {n: m for n, m in model.named_modules() if isinstance(m, types)}


# -- PEFT's target selection ------------------------------------------------------


def matches_suffix(name: str, key: str) -> bool:
    """PEFT's list form: ``key`` is the module's name or a dotted suffix of it."""
    return name == key or name.endswith("." + key)


def selected(name: str, spec, *, default: bool) -> bool:
    """PEFT's name matching: ``spec`` is a regex string (full match) or a list of
    module-name suffixes; None gives ``default``."""
    if spec is None:
        return default
    if isinstance(spec, str):
        return fullmatch_module_name(_compiled(spec, "target_modules/exclude_modules"), name)
    return any(matches_suffix(name, key) for key in spec)


@lru_cache(maxsize=256)
def _compiled(pattern: str, what: str) -> re.Pattern:
    # NOTE: bounded cost: patterns whose backtracking can blow up are refused (fastlora._patterns)
    return compile_module_pattern(pattern, what=what)


def pattern_value(name: str, pattern: dict, default):
    """PEFT's rank_pattern/alpha_pattern lookup: the first key that matches the
    end of the module name (as a regex) wins."""
    for key, value in pattern.items():
        if match_pattern_key(_compiled(key, "rank_pattern/alpha_pattern key"), name):
            return value
    return default


def normalize_target_modules(target_modules):
    """PEFT's accepted forms: None, a regex string (or ``"all-linear"``), or an
    iterable of module-name suffixes (returned as a list)."""
    if target_modules is None or isinstance(target_modules, str):
        return target_modules
    try:
        items = list(target_modules)
    except TypeError:
        raise TypeError(f"target_modules must be a string or a list of strings, got {target_modules!r}") from None
    if not all(isinstance(t, str) for t in items):
        raise TypeError(f"target_modules must be a string or a list of strings, got {target_modules!r}")
    return items


def output_layer_names(model: nn.Module) -> set[str]:
    """The model's output layer(s) (``get_output_embeddings()``, any ``lm_head``),
    which PEFT's ``"all-linear"`` leaves out."""
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


def saved_module_matcher(modules_to_save) -> Callable[[str], bool]:
    """True for a module named by ``modules_to_save`` (PEFT: the key is a dotted
    component sequence of the name) or inside one."""
    saved = [re.compile(rf"(^|.*\.){re.escape(key)}($|\..*)") for key in modules_to_save or []]
    return lambda name: any(p.match(name) for p in saved)


def target_names(
    model: nn.Module, kind: AdapterKind, target_modules, *, exclude_modules=None, modules_to_save=None,
    include_adapters: bool = False,
) -> list[str]:
    """Names of the modules ``target_modules`` selects for ``kind`` (PEFT's rules),
    minus ``exclude_modules`` and ``modules_to_save``.

    ``None`` selects every module the kind can adapt but those registered with
    ``by_default=False`` (embeddings, convolutions); ``"all-linear"`` every
    ``nn.Linear`` (and type registered with ``linear=True``) but the output layer. A module that an explicit list or regex
    selects but that the kind cannot adapt is an error naming it and its type
    (PEFT raises too), never a silent skip. Existing adapter layers of this kind
    are included only with ``include_adapters`` (a loader reusing them).
    """
    is_saved = saved_module_matcher(modules_to_save)
    chosen, unsupported = [], []
    all_linear = target_modules == "all-linear"
    skip = output_layer_names(model) if all_linear else set()
    for name, module in model.named_modules():
        if not name or name in skip or is_saved(name) or selected(name, exclude_modules, default=False):
            continue
        if is_adapter_layer(module):
            if include_adapters and isinstance(module, kind.layer_types) and (
                all_linear or selected(name, target_modules, default=True)
            ):
                chosen.append(name)
            continue
        if _inside_adapter_layer(model, name):
            continue
        if all_linear:
            if kind.is_linear(module) and kind.builder_for(module) is not None:
                chosen.append(name)
            continue
        if target_modules is None and kind.is_explicit_only(module):
            continue
        if target_modules is not None and not selected(name, target_modules, default=False):
            continue
        if kind.builder_for(module) is not None:
            chosen.append(name)
        elif target_modules is not None:
            unsupported.append((name, type(module).__name__))
    if unsupported:
        raise ValueError(
            f"target_modules={target_modules!r} selects modules that fastlora's {kind.label} cannot adapt: "
            f"{unsupported[:8]}; supported base module types: {kind.base_type_names()} (narrow target_modules, "
            "or list the module in exclude_modules)"
        )
    return chosen


def _inside_adapter_layer(model: nn.Module, name: str) -> bool:
    parts = name.split(".")
    module = model
    for part in parts[:-1]:
        module = getattr(module, part)
        if is_adapter_layer(module):
            return True
    return False


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule ``name`` of ``model`` by ``module``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


# -- surgery ----------------------------------------------------------------------


@contextmanager
def restoring_requires_grad(model: nn.Module):
    """Restore every parameter's ``requires_grad`` if the block raises: building an
    adapter layer freezes the base weight it shares, before the layer is attached."""
    state = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    except BaseException:
        for p, flag in state:
            p.requires_grad_(flag)
        raise



def freeze_base(model: nn.Module) -> None:
    """Freeze every parameter outside fastlora's adapter layers (whose base weights
    are frozen by construction and whose adapters stay as they are)."""

    def visit(module: nn.Module) -> None:
        for p in module.parameters(recurse=False):
            p.requires_grad_(False)
        for child in module.children():
            if not is_adapter_layer(child):
                visit(child)

    if not is_adapter_layer(model):
        visit(model)


def apply_adapter(model: nn.Module, config, *, shared=None, what: str = "apply_lora") -> nn.Module:
    """Replace the modules of ``model`` that ``config`` targets by the adapter layers
    of its kind, in place; freeze every parameter that is not an adapter's
    (earlier adapters keep their state), unfreeze ``modules_to_save``; return
    ``model``. Everything is checked and every new layer built before the model
    changes, so a failure leaves it as it was (except for initialisations that
    rewrite a base weight, such as PiSSA, on the layers built before the failure)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what}: model must be an nn.Module, got {type(model).__name__}")
    if any(type(m).__module__.startswith("peft.") for m in model.modules()):
        raise TypeError(
            f"{what}: model is a peft.PeftModel (its layers already hold PEFT adapters); run them on fastlora's "
            "fused ops with fastlora.from_peft(model), or call this on the base model before PEFT wraps it"
        )
    kind = kind_for(config)
    if kind.builder_for(model) is not None or is_adapter_layer(model):
        raise TypeError(
            f"{what} works on a model containing layers to adapt, not on a bare {type(model).__name__}; "
            "wrap a single layer with its adapter class's from_linear"
        )
    if kind.one_per_model and adapter_layers(model, kind.name):
        raise ValueError(f"{what}: the model already has {kind.label} layers; fastlora keeps one {kind.label} adapter per model")
    names = target_names(
        model, kind, config.target_modules, exclude_modules=config.exclude_modules, modules_to_save=config.modules_to_save
    )
    if not names:
        available = [n for n, m in model.named_modules() if n and kind.builder_for(m) is not None and not is_adapter_layer(m)]
        raise ValueError(
            f"{what}: target_modules={config.target_modules!r} matched no module that {kind.label} can adapt; the "
            f"model's adaptable modules are {available[:20]}"
            + (" (the others are already adapter layers)" if adapter_layers(model) else "")
        )
    saved_hits = {}
    for key in config.modules_to_save or []:
        hits = [m for n, m in model.named_modules() if n and matches_suffix(n, key)]
        if not hits:
            raise ValueError(f"{what}: modules_to_save entry {key!r} matches no module of the model")
        saved_hits[key] = hits
    bases = {name: model.get_submodule(name) for name in names}
    with restoring_requires_grad(model):
        if kind.prepare is not None:
            shared = kind.prepare(model, config, bases, shared)
        layers = {name: kind.builder_for(base)(base, name, config, shared) for name, base in bases.items()}
    freeze_base(model)
    for name, layer in layers.items():
        set_submodule(model, name, layer)
    for hits in saved_hits.values():
        for m in hits:
            for p in m.parameters():
                p.requires_grad_(True)
    # NOTE: remembered for save_adapter, as PEFT keeps its config beside the model
    model.fastlora_adapter_configs = {**getattr(model, "fastlora_adapter_configs", {}), kind.name: config}
    if config.modules_to_save:
        previous = list(getattr(model, "fastlora_modules_to_save", None) or [])
        model.fastlora_modules_to_save = previous + [k for k in config.modules_to_save if k not in previous]
    return model


def merge_adapters(model: nn.Module, kind: str | None = None) -> nn.Module:
    """Replace every adapter layer (of ``kind``, if given) by its base module type
    with the update merged in (``layer.to_base()``), in place; returns ``model``
    (a bare adapter layer returns its merged module)."""
    if is_adapter_layer(model):
        return model.to_base()
    for name, layer in adapter_layers(model, kind).items():
        set_submodule(model, name, layer.to_base())
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts; shared parameters count once.

    4-bit weights count as the parameters they represent: a fastlora 4-bit layer
    contributes ``out_features * in_features`` (its weight is stored in buffers);
    a bitsandbytes ``Params4bit`` (two values per stored byte) twice its numel
    times its storage's byte size, as PEFT counts it.
    """
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        if type(p).__name__ == "Params4bit":
            n *= 2 * p.element_size()
        total += n
        if p.requires_grad:
            trainable += n
    for module in model.modules():
        count = getattr(module, "quantized_parameter_count", None)
        if callable(count):
            total += count()
    return trainable, total


__all__ = [
    "unwrapped",
    "AdapterKind",
    "adapter_layers",
    "apply_adapter",
    "count_parameters",
    "freeze_base",
    "is_adapter_layer",
    "kind_for",
    "kinds",
    "matches_suffix",
    "merge_adapters",
    "normalize_target_modules",
    "output_layer_names",
    "pattern_value",
    "register_adapter_kind",
    "register_layer",
    "restoring_requires_grad",
    "saved_module_matcher",
    "selected",
    "set_submodule",
    "target_names",
]
