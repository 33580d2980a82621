"""PEFT adapter files: :func:`save_adapter`, :func:`load_adapter`.

The format is PEFT's (0.21): a folder with ``adapter_config.json`` and
``adapter_model.safetensors`` whose keys are ``base_model.model.<module
path>.<entry>``, the entries being each layer's ``peft_tensors()`` (the
adapter-layer protocol of :mod:`fastlora.registry`: ``lora_A.weight`` [r, in],
``lora_B.weight`` [out, r], DoRA's ``lora_magnitude_vector`` [out], ...);
``modules_to_save`` modules are stored as ``base_model.model.<module
path>.<param name>``.

Saving serializes everything first and then replaces the files atomically
(:func:`fastlora._files.write_files_atomically`): a failure at any step leaves
the previous adapter byte-identical. Loading reads regular files of bounded
size with JSON and safetensors only (nothing is ever unpickled), then parses,
validates and plans every change (new layers are built unattached) before the
model is touched: a bad file leaves the model as it was and raises
:class:`AdapterFormatError` naming the file and the field or key.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from ._files import check_regular_file, read_regular_file, write_files_atomically
from ._patterns import compile_module_pattern
from .dora import DoRALinear, QDoRALinear
from .model import LoRAConfig, lora_layers
from .modules import DEFAULT_ADAPTER, LoRAAdapter, LoRALinear
from .qlora import QLoRALinear
from .registry import (
    adapter_layers,
    freeze_base,
    is_adapter_layer,
    kind_for,
    matches_suffix,
    pattern_value,
    restoring_requires_grad,
    saved_module_matcher,
    selected,
    set_submodule,
    target_names,
    unwrapped,
)
from .peft_fields import (
    ADALORA_HANDLED,
    PEFT_ADALORA_DEFAULTS,
    PEFT_LORA_DEFAULTS,
    PEFT_VERA_DEFAULTS,
    VERA_HANDLED,
    unsupported_fields,
)
from .validation import check_init, is_int, is_number, lora_scaling, pissa_niter

PEFT_TYPES = ("LORA", "VERA", "ADALORA")
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
MAX_CONFIG_BYTES = 16 << 20  # an adapter_config.json is a few KiB; refuse anything absurd
MAX_WEIGHTS_BYTES = 64 << 30

MAGNITUDE = "lora_magnitude_vector"  # PEFT's DoRA magnitude key (a bare tensor, no ``.weight``)
# init_lora_weights values that only decide the adapters' first values (overwritten by the file's)
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


def _is_dora(layer) -> bool:
    return isinstance(layer, (DoRALinear, QDoRALinear))


class AdapterFormatError(ValueError):
    """An adapter folder that cannot be loaded exactly (corrupt, mismatched or unsupported)."""


def _most_common(values):
    return Counter(values).most_common(1)[0][0]


def _module_key(names: list[str], candidates: list[str]) -> list[str] | str:
    """The simplest PEFT ``target_modules`` that selects exactly ``names`` among
    ``candidates``: leaf names if they suffice, else an anchored regex."""
    wanted = set(names)
    leaves = sorted({n.split(".")[-1] for n in names})
    if {n for n in candidates if selected(n, leaves, default=False)} == wanted:
        return leaves
    return "^(" + "|".join(re.escape(n) for n in sorted(names)) + ")$"


def _optional_str(value, what: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"save_adapter: {what} must be a string or None, got {type(value).__name__} {value!r}")


def _adaptable_names(model: nn.Module) -> list[str]:
    kind = kind_for(LoRAConfig)
    return [n for n, m in model.named_modules() if n and (kind.builder_for(m) is not None or is_adapter_layer(m))]


def _slot(layer, adapter_name: str):
    """What holds adapter ``adapter_name``'s r / alpha / dropout / use_rslora: the
    layer's named-adapter slot (LoRALinear, QLoRALinear), else the layer itself."""
    return layer.adapter(adapter_name) if hasattr(layer, "has_adapter") else layer


def _layer_tensors(layer, adapter_name: str) -> dict:
    return layer.peft_tensors(adapter_name) if hasattr(layer, "has_adapter") else layer.peft_tensors()


def _lora_file(model: nn.Module, layers: dict, adapter_name: str = DEFAULT_ADAPTER) -> tuple[dict, dict]:
    """PEFT's LoRA config and tensors for ``model``'s LoRA layers (adapter ``adapter_name``)."""
    slots = {n: _slot(m, adapter_name) for n, m in layers.items()}
    dora = {_is_dora(m) for m in layers.values()}
    if len(dora) > 1:
        mixed = sorted(n for n, m in layers.items() if _is_dora(m))
        raise ValueError(f"save_adapter: PEFT's format has one use_dora per adapter, but only {mixed} are DoRA layers")
    for attr in ("dropout", "use_rslora"):
        values = {getattr(m, attr) for m in slots.values()}
        if len(values) > 1:
            raise ValueError(f"save_adapter: PEFT's format has one {attr} per adapter, but the layers use {sorted(values)}")
    r = _most_common(m.r for m in slots.values())
    alpha = _most_common(m.alpha for m in slots.values())
    first = next(iter(slots.values()))
    config = dict(PEFT_LORA_DEFAULTS)
    config.update(
        r=r,
        lora_alpha=int(alpha) if float(alpha).is_integer() else alpha,
        lora_dropout=first.dropout,
        use_rslora=first.use_rslora,
        use_dora=_is_dora(next(iter(layers.values()))),
        fan_in_fan_out=any(getattr(m, "fan_in_fan_out", False) for m in layers.values()),
        target_modules=_module_key(list(layers), _adaptable_names(model)),
        rank_pattern={re.escape(n): m.r for n, m in slots.items() if m.r != r},
        alpha_pattern={re.escape(n): m.alpha for n, m in slots.items() if m.alpha != alpha},
    )
    return config, {}


def _vera_file(model: nn.Module, layers: dict) -> tuple[dict, dict]:
    """PEFT's VeRA config and the shared projections (``base_model.vera_A`` / ``vera_B``)."""
    first = next(iter(layers.values()))
    projections = {id(m.vera_projection) for m in layers.values()}
    if len(projections) > 1 or len({m.r for m in layers.values()}) > 1 or len({m.dropout for m in layers.values()}) > 1:
        raise ValueError("save_adapter: PEFT's VeRA format has one shared projection, one r and one dropout per adapter")
    proj = first.vera_projection
    persistent = "vera_A" not in proj._non_persistent_buffers_set
    kept = getattr(model, "fastlora_adapter_configs", {}).get("vera")
    config = dict(PEFT_VERA_DEFAULTS)
    config.update(
        r=first.r, vera_dropout=first.dropout, d_initial=first.d_initial, save_projection=persistent,
        projection_prng_key=kept.projection_prng_key if kept is not None else 0,
        target_modules=_module_key(list(layers), _adaptable_names(model)),
    )  # fmt: skip
    extra = {"base_model.vera_A": proj.vera_A, "base_model.vera_B": proj.vera_B} if persistent else {}
    return config, extra


def _adalora_file(model: nn.Module, layers: dict) -> tuple[dict, dict]:
    """PEFT's AdaLoRA config: the schedule of the config the layers were made with,
    the full (unpruned) tensors, so no rank_pattern (pruned triplets have E = 0)."""
    first = next(iter(layers.values()))
    kept = getattr(model, "fastlora_adapter_configs", {}).get("adalora")
    config = dict(PEFT_ADALORA_DEFAULTS)
    config.update(
        init_r=first.r, lora_alpha=int(first.alpha) if float(first.alpha).is_integer() else first.alpha,
        lora_dropout=first.dropout, target_modules=_module_key(list(layers), _adaptable_names(model)),
    )  # fmt: skip
    if kept is not None:
        config.update({k: getattr(kept, k) for k in ("target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step")})
    return config, {}


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    modules_to_save: list[str] | None = None,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    adapter_name: str = DEFAULT_ADAPTER,
) -> None:
    """Write ``model``'s adapters (LoRA / DoRA, VeRA or AdaLoRA: one kind per
    file, as PEFT has one ``peft_type``) to the folder ``path`` in PEFT's format,
    loadable by ``peft.PeftModel.from_pretrained`` on the same base model.

    ``modules_to_save``: names of (non-adapter) modules whose full weights are
    stored too, as PEFT does for its ``modules_to_save``; by default the ones
    given to :func:`fastlora.apply_lora` (or read by :func:`load_adapter`).
    ``adapter_name``: which named adapter of the LoRA layers to write (PEFT's
    file holds one; :mod:`fastlora.adapters`), ``"default"`` by default.
    Everything is serialized before the first byte is written, and the two
    files replace the previous ones atomically: on any error the folder keeps
    its previous adapter byte for byte.
    """
    model = unwrapped(model)
    by_kind = {k: adapter_layers(model, k) for k in ("lora", "vera", "adalora")}
    by_kind["lora"] = {
        n: m for n, m in by_kind["lora"].items()
        if (m.has_adapter(adapter_name) if hasattr(m, "has_adapter") else adapter_name == DEFAULT_ADAPTER)
    }  # fmt: skip
    if adapter_name != DEFAULT_ADAPTER and not by_kind["lora"]:
        raise ValueError(f"save_adapter: no LoRA layer of the model has an adapter named {adapter_name!r}")
    present = [k for k, v in by_kind.items() if v]
    if not present:
        raise ValueError("save_adapter: the model has no adapter layers (apply_lora first)")
    if len(present) > 1:
        raise ValueError(f"save_adapter: the model has {present} adapter layers; a PEFT adapter file holds one kind")
    kind = present[0]
    layers = by_kind[kind]
    merged = [n for n, m in layers.items() if m.merged]
    if merged:
        raise ValueError(f"save_adapter: layers {merged} are merged; unmerge() them first so the adapters are separate")
    if modules_to_save is None:
        modules_to_save = getattr(model, "fastlora_modules_to_save", None)
    elif isinstance(modules_to_save, str) or not all(isinstance(k, str) for k in modules_to_save):
        raise TypeError(f"save_adapter: modules_to_save must be a list of module names, got {modules_to_save!r}")
    base_model_name_or_path = _optional_str(base_model_name_or_path, "base_model_name_or_path")
    task_type = _optional_str(task_type, "task_type")
    if kind == "lora":
        config, extra = _lora_file(model, layers, adapter_name)
    else:
        config, extra = {"vera": _vera_file, "adalora": _adalora_file}[kind](model, layers)
    config.update(
        modules_to_save=list(modules_to_save) if modules_to_save else None,
        base_model_name_or_path=base_model_name_or_path,
        task_type=task_type,
        auto_mapping={"base_model_class": type(model).__name__, "parent_library": type(model).__module__},
    )
    tensors: dict[str, torch.Tensor] = {k: t.detach().contiguous() for k, t in extra.items()}
    for name, layer in layers.items():
        for key, t in _layer_tensors(layer, adapter_name).items():
            tensors[f"{PREFIX}{name}.{key}"] = t.detach().contiguous()
    for key in modules_to_save or []:
        hits = [n for n, _ in model.named_modules() if n and matches_suffix(n, key)]
        if not hits:
            raise ValueError(f"save_adapter: modules_to_save entry {key!r} matches no module of the model")
        for name in hits:
            for pname, param in model.get_submodule(name).named_parameters():
                tensors[f"{PREFIX}{name}.{pname}"] = param.detach().contiguous()
    from safetensors.torch import save

    # Serialize everything before the first write (a bad value fails here, with the folder untouched).
    files = {
        WEIGHTS_NAME: save({k: t.cpu() for k, t in tensors.items()}, metadata={"format": "pt"}),
        CONFIG_NAME: json.dumps(config, indent=2, sort_keys=True).encode(),
    }
    write_files_atomically(os.fspath(path), files)


# -- loading: parse, validate, plan, apply -----------------------------------------


def _fail(file, message: str) -> AdapterFormatError:
    return AdapterFormatError(f"{file}: {message}")


def _check_names(config: dict, key: str, file, *, regex_ok: bool) -> None:
    value = config.get(key)
    if value is None:
        return
    if isinstance(value, str):
        if not regex_ok:
            raise _fail(file, f"{key} must be a list of module names, got the string {value!r}")
        if value != "all-linear":
            try:
                compile_module_pattern(value, what=key)
            except ValueError as exc:
                raise _fail(file, str(exc)) from None
        return
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(file, f"{key} must be a string or a list of strings, got {value!r}")


def _read_config_json(path) -> tuple[str, dict]:
    file = os.path.join(path, CONFIG_NAME)
    try:
        raw = read_regular_file(file, max_bytes=MAX_CONFIG_BYTES, what="adapter config", error=AdapterFormatError)
    except FileNotFoundError:
        raise _fail(file, "not found (expected a PEFT adapter folder)") from None
    try:
        config = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _fail(file, f"not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise _fail(file, f"expected a JSON object, got {type(config).__name__}")
    if config.get("peft_type", "LORA") not in PEFT_TYPES:
        raise _fail(file, f"peft_type is {config.get('peft_type')!r}; fastlora loads {sorted(PEFT_TYPES)} adapters")
    return file, config


def read_adapter_config(path: str | os.PathLike) -> dict:
    """Read and validate a LoRA adapter's ``adapter_config.json``: every field PEFT
    writes is known, every value fastlora uses is checked (type, range,
    finiteness) here, before anything else happens; errors name the offending field."""
    file, config = _read_config_json(path)
    if config.get("peft_type", "LORA") != "LORA":
        raise _fail(file, f"peft_type is {config.get('peft_type')!r}; expected 'LORA' here (load_adapter reads every kind)")
    return _check_lora_config(file, config)


def _check_lora_config(file, config: dict) -> dict:
    unknown = sorted(set(config) - set(PEFT_LORA_DEFAULTS))
    if unknown:
        raise _fail(file, f"unknown config fields {unknown}; fastlora cannot tell what they change")
    unsupported = unsupported_fields(config)
    if unsupported:
        shown = {k: config[k] for k in unsupported}
        raise _fail(file, f"unsupported settings {shown}; fastlora supports plain LoRA, rsLoRA and DoRA adapters")
    r = config.get("r", 8)
    if not is_int(r) or r < 1:
        raise _fail(file, f"r must be an integer >= 1, got {r!r}")
    alpha = config.get("lora_alpha", 8)
    if not is_number(alpha) or not math.isfinite(alpha):
        raise _fail(file, f"lora_alpha must be a finite number, got {alpha!r}")
    for key in ("use_dora", "use_rslora", "fan_in_fan_out", "inference_mode"):
        if key in config and not isinstance(config[key], bool):
            raise _fail(file, f"{key} must be true or false, got {config[key]!r}")
    dropout = config.get("lora_dropout", 0.0)
    if not is_number(dropout) or not 0.0 <= dropout < 1.0:
        raise _fail(file, f"lora_dropout must be in [0, 1), got {dropout!r}")
    init = config.get("init_lora_weights", True)
    if init not in _PLAIN_INITS and not (isinstance(init, str) and init in ("pissa", "olora") or pissa_niter(str(init)) is not None):
        raise _fail(
            file,
            f"init_lora_weights={init!r} is not supported: fastlora loads adapters initialised with {_PLAIN_INITS} "
            "(the base is unchanged) and with 'pissa', 'pissa_niter_<N>' or 'olora' (the base is turned into the "
            "same residual PEFT computes)",
        )
    for key, check, expected in (
        ("rank_pattern", lambda v: is_int(v) and v >= 1, "an integer >= 1"),
        ("alpha_pattern", lambda v: is_number(v) and math.isfinite(v), "a finite number"),
    ):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict):
            raise _fail(file, f"{key} must be an object, got {config[key]!r}")
        for name, value in pattern.items():
            if not check(value):
                raise _fail(file, f"{key}[{name!r}] must be {expected}, got {value!r}")
            try:
                compile_module_pattern(name, what=f"{key} key")
            except (ValueError, TypeError) as exc:
                raise _fail(file, str(exc)) from None
    _check_names(config, "target_modules", file, regex_ok=True)
    _check_names(config, "exclude_modules", file, regex_ok=True)
    _check_names(config, "modules_to_save", file, regex_ok=False)
    for key in ("base_model_name_or_path", "revision", "task_type", "peft_version"):
        if config.get(key) is not None and not isinstance(config[key], str):
            raise _fail(file, f"{key} must be a string or null, got {config[key]!r}")
    return config


def _read_tensors(path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = os.path.join(path, WEIGHTS_NAME)
    try:
        check_regular_file(file, max_bytes=MAX_WEIGHTS_BYTES, what="adapter weights", error=AdapterFormatError)
    except FileNotFoundError:
        raise _fail(file, "not found (fastlora reads safetensors adapters only, never pickles)") from None
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise _fail(file, f"corrupt or truncated safetensors file ({exc})") from None


@dataclass
class _LayerPlan:
    name: str
    layer: nn.Module  # the layer the tensors go into (the model's own, or a new unattached one)
    new: bool
    tensors: dict[str, torch.Tensor]
    alpha: float
    init: str
    adapter: LoRAAdapter | None = None  # a named adapter built unattached, inserted into ``layer`` on apply
    adapter_name: str = DEFAULT_ADAPTER


@dataclass
class LoadPlan:
    """Every change :func:`load_adapter` will make, all of it validated."""

    config: dict
    layers: list[_LayerPlan] = field(default_factory=list)
    params: list[tuple[nn.Parameter, torch.Tensor]] = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)
    adapter_config: object = None  # the fastlora config the file describes (VeRA / AdaLoRA)


def _layer_config(config: dict, r: int, alpha: float) -> LoRAConfig:
    return LoRAConfig(
        r=r, alpha=alpha, dropout=float(config.get("lora_dropout", 0.0)), use_rslora=bool(config.get("use_rslora", False)),
        use_dora=bool(config.get("use_dora", False)),
    )  # fmt: skip


def _plan_layer(
    model: nn.Module, name: str, config: dict, r: int, alpha: float, init: str, file, adapter_name: str = DEFAULT_ADAPTER
) -> tuple[nn.Module, bool, LoRAAdapter | None]:
    """The layer an adapter's tensors for ``name`` go into: the existing one when
    its rank and kind fit (its old adapter is replaced), else a new unattached
    one. On a layer with named adapters (LoRALinear / QLoRALinear) the adapter is
    built unattached and replaces (or joins) that layer's adapter of the same
    name on apply: its other adapters are kept."""
    module = model.get_submodule(name)
    use_dora = bool(config.get("use_dora", False))
    layer_config = _layer_config(config, r, alpha)
    named = hasattr(module, "has_adapter") and not _is_dora(module) and not use_dora
    if named and not module.merged and (adapter_name != DEFAULT_ADAPTER or len(module.adapter_names()) > 1 or module.r != r):
        if init != "default":
            raise _fail(file, f"{name}: an init_lora_weights={init!r} adapter rewrites the base weight; load it into the base model")
        adapter = LoRAAdapter(
            module.in_features, module.out_features, r=r, alpha=alpha, dropout=layer_config.dropout,
            use_rslora=layer_config.use_rslora, device=module._adapter_device(), dtype=module._adapter_dtype(),
        )  # fmt: skip
        return module, False, adapter
    if adapter_name != DEFAULT_ADAPTER and is_adapter_layer(module):
        raise _fail(
            file,
            f"{name}: a {type(module).__name__} holds one adapter; adapter_name={adapter_name!r} needs a LoRALinear or "
            "QLoRALinear (named adapters) and a non-DoRA adapter file",
        )
    if is_adapter_layer(module):
        if module.merged:
            raise _fail(file, f"the model's layer {name!r} is merged; unmerge() it before loading")
        if module.r == r and _is_dora(module) == use_dora:
            if init != "default":
                raise _fail(
                    file,
                    f"{name}: an init_lora_weights={init!r} adapter rewrites the base weight into a residual; load it "
                    "into the base model (not into a model that already has LoRA layers)",
                )
            return module, False, None
        if isinstance(module, QLoRALinear):
            if module.r != r:
                raise _fail(
                    file,
                    f"{name} is a QLoRALinear of rank {module.r}; the adapter has rank {r} (rebuild the layer with "
                    "that rank, or load into the unquantized model)",
                )
            cls = QDoRALinear if use_dora else QLoRALinear
            layer = cls(
                module.qweight, module.bias, r=r, alpha=alpha, dropout=layer_config.dropout,
                use_rslora=layer_config.use_rslora, compute_dtype=module.compute_dtype, lora_dtype=module.lora_A.dtype,
            )  # fmt: skip
            layer.train(module.training)
            return layer, True, None
        if isinstance(module, LoRALinear):  # a dense LoRA / DoRA layer of another rank or kind
            cls = DoRALinear if use_dora else LoRALinear
            layer = cls.from_linear(module, r=r, alpha=alpha, dropout=layer_config.dropout, use_rslora=layer_config.use_rslora)
            return layer, True, None
        raise _fail(file, f"{name} is a {type(module).__name__} of rank {module.r}; the adapter has rank {r}")
    builder = kind_for(LoRAConfig).builder_for(module)
    if init != "default" and not isinstance(module, nn.Linear):
        raise _fail(file, f"{name}: init_lora_weights={init!r} is supported on nn.Linear bases only")
    if adapter_name != DEFAULT_ADAPTER and (use_dora or not isinstance(module, nn.Linear)):
        raise _fail(file, f"{name}: adapter_name={adapter_name!r} needs a non-DoRA LoRA adapter on an nn.Linear base")
    return builder(module, name, layer_config, None), True, None


def plan_adapter_load(
    model: nn.Module, path: str | os.PathLike, config: dict, tensors: dict[str, torch.Tensor], adapter_name: str = DEFAULT_ADAPTER
) -> LoadPlan:
    """Check the adapter's tensors against the layers they go into and build the
    new layers (unattached). Raises :class:`AdapterFormatError`; changes nothing."""
    r_default, alpha_default = config.get("r", 8), config.get("lora_alpha", 8)
    init = config.get("init_lora_weights", True)
    init = init if isinstance(init, str) and (init in ("pissa", "olora") or pissa_niter(init) is not None) else "default"
    check_init(init)
    try:
        targets = target_names(
            model,
            kind_for(LoRAConfig),
            config.get("target_modules"),
            exclude_modules=config.get("exclude_modules"),
            modules_to_save=config.get("modules_to_save"),
            include_adapters=True,
        )
    except ValueError as exc:
        raise _fail(path, str(exc)) from None
    plan = LoadPlan(config, modules_to_save=list(config.get("modules_to_save") or []))
    expected: dict[str, tuple[_LayerPlan, str, torch.Tensor]] = {}
    for name in targets:
        r = pattern_value(name, config.get("rank_pattern") or {}, r_default)
        alpha = pattern_value(name, config.get("alpha_pattern") or {}, alpha_default)
        layer, new, adapter = _plan_layer(model, name, config, r, alpha, init, path, adapter_name)
        entry = _LayerPlan(name, layer, new, {}, float(alpha), init, adapter, adapter_name)
        plan.layers.append(entry)
        live = {"lora_A.weight": adapter.lora_A, "lora_B.weight": adapter.lora_B} if adapter is not None else layer.peft_tensors()
        for key, t in live.items():
            expected[f"{PREFIX}{name}.{key}"] = (entry, key, t)
    return _assign_tensors(model, path, plan, expected, tensors)


def _assign_tensors(model: nn.Module, path, plan: LoadPlan, expected: dict, tensors: dict[str, torch.Tensor]) -> LoadPlan:
    """Give each file tensor its place: an entry of a planned layer (shape, dtype
    and finiteness checked) or a ``modules_to_save`` parameter; anything else,
    or a planned entry without a tensor, is an AdapterFormatError."""
    config = plan.config
    is_saved = saved_module_matcher(plan.modules_to_save)
    unexpected = []
    for key, tensor in tensors.items():
        if key in expected:
            entry, sub, like = expected[key]
            if tuple(tensor.shape) != tuple(like.shape):
                raise _fail(
                    path,
                    f"{key} has shape {tuple(tensor.shape)}; the layer {entry.name} ({type(entry.layer).__name__}, "
                    f"r={entry.layer.r}) needs {tuple(like.shape)}",
                )
            if not tensor.is_floating_point():
                raise _fail(path, f"{key} has dtype {tensor.dtype}; expected a floating-point dtype")
            if not torch.isfinite(tensor).all():
                raise _fail(path, f"{key} contains NaN or infinite values")
            entry.tensors[sub] = tensor
        elif key.startswith(PREFIX) and plan.modules_to_save and is_saved(key[len(PREFIX) :].rpartition(".")[0]):
            module_name, _, pname = key[len(PREFIX) :].rpartition(".")
            try:
                param = model.get_submodule(module_name).get_parameter(pname)
            except AttributeError:
                raise _fail(path, f"modules_to_save tensor {key!r} names no parameter of the model") from None
            if param.shape != tensor.shape or not tensor.is_floating_point() or not torch.isfinite(tensor).all():
                raise _fail(
                    path,
                    f"modules_to_save tensor {key!r} has shape {tuple(tensor.shape)} dtype {tensor.dtype}; the model's "
                    f"parameter is {tuple(param.shape)} {param.dtype} (and must be finite)",
                )
            plan.params.append((param, tensor))
        else:
            unexpected.append(key)
    missing = sorted(k for k, (entry, sub, _) in expected.items() if sub not in entry.tensors)
    if unexpected or missing:
        parts = []
        if unexpected:
            parts.append(f"unexpected keys {sorted(unexpected)[:8]}")
            if not config.get("use_dora") and any(MAGNITUDE in k for k in unexpected):
                parts.append(f"({MAGNITUDE} entries need use_dora=true in the config)")
        if missing:
            parts.append(f"missing keys {missing[:8]}")
        raise _fail(path, "the adapter's tensors do not match the layers its config selects in this model: " + ", ".join(parts))
    return plan




def _check_other_config(file, config: dict, defaults: dict, handled: set) -> dict:
    """Known fields and no unsupported setting, for a VeRA / AdaLoRA config (values
    are checked by the fastlora config built from it)."""
    unknown = sorted(set(config) - set(defaults))
    if unknown:
        raise _fail(file, f"unknown config fields {unknown}; fastlora cannot tell what they change")
    unsupported = unsupported_fields(config, defaults, handled)
    if unsupported:
        raise _fail(file, f"unsupported settings { {k: config[k] for k in unsupported} }")
    _check_names(config, "target_modules", file, regex_ok=True)
    _check_names(config, "modules_to_save", file, regex_ok=False)
    return config


def _plan_other_load(model: nn.Module, path, peft_type: str, config: dict, tensors: dict) -> LoadPlan:
    """A VeRA or AdaLoRA adapter file: new layers of that kind on the base model's
    modules (validated and built unattached, as for LoRA)."""
    tensors = dict(tensors)
    shared = None
    try:
        if peft_type == "VERA":
            from .vera import VeRAConfig, VeRAProjection

            ours = VeRAConfig(
                r=config.get("r", 256), target_modules=config.get("target_modules"),
                projection_prng_key=config.get("projection_prng_key", 0), d_initial=config.get("d_initial", 0.1),
                dropout=config.get("vera_dropout", 0.0), save_projection=config.get("save_projection", True),
                modules_to_save=config.get("modules_to_save"),
            )  # fmt: skip
            a, b = tensors.pop("base_model.vera_A", None), tensors.pop("base_model.vera_B", None)
            if (a is None) != (b is None) or (a is None and ours.save_projection):
                raise ValueError("save_projection is true but base_model.vera_A / base_model.vera_B are not both in the file")
            if a is not None:
                if not (a.is_floating_point() and b.is_floating_point() and torch.isfinite(a).all() and torch.isfinite(b).all()):
                    raise ValueError("base_model.vera_A / vera_B must be finite floating-point tensors")
                shared = VeRAProjection(a, b)
        else:
            from .adalora import AdaLoRAConfig

            if config.get("rank_pattern"):
                raise ValueError(
                    "rank_pattern is set: a pruned AdaLoRA checkpoint (tensors resized to the final rank pattern) "
                    "is not supported yet; load the checkpoint saved before the final budget, or merge it with PEFT"
                )
            if config.get("total_step") is None:
                raise ValueError("total_step is required in an AdaLoRA config (PEFT refuses None too)")
            ours = AdaLoRAConfig(
                init_r=config.get("init_r", 12), target_r=config.get("target_r", 8), tinit=config.get("tinit", 0),
                tfinal=config.get("tfinal", 0), deltaT=config.get("deltaT", 1), beta1=config.get("beta1", 0.85),
                beta2=config.get("beta2", 0.85), orth_reg_weight=config.get("orth_reg_weight", 0.5),
                total_step=config["total_step"], alpha=config.get("lora_alpha", 8), dropout=config.get("lora_dropout", 0.0),
                target_modules=config.get("target_modules"), exclude_modules=config.get("exclude_modules"),
                modules_to_save=config.get("modules_to_save"),
            )  # fmt: skip
        kind = kind_for(ours)
        if adapter_layers(model, kind.name):
            raise ValueError(f"the model already has {kind.label} layers; load a {kind.label} adapter into the base model")
        targets = target_names(
            model, kind, ours.target_modules, exclude_modules=ours.exclude_modules, modules_to_save=ours.modules_to_save
        )
        if not targets:
            raise ValueError(f"target_modules={ours.target_modules!r} selects no module of this model")
        bases = {name: model.get_submodule(name) for name in targets}
        if kind.prepare is not None:
            shared = kind.prepare(model, ours, bases, shared)
        layers = {name: kind.builder_for(base)(base, name, ours, shared) for name, base in bases.items()}
    except (TypeError, ValueError) as exc:
        raise _fail(path, str(exc)) from None
    plan = LoadPlan(config, modules_to_save=list(ours.modules_to_save or []), adapter_config=ours)
    expected: dict = {}
    for name, layer in layers.items():
        entry = _LayerPlan(name, layer, True, {}, 0.0, "default")
        plan.layers.append(entry)
        for key, t in layer.peft_tensors().items():
            expected[f"{PREFIX}{name}.{key}"] = (entry, key, t)
    return _assign_tensors(model, path, plan, expected, tensors)


def apply_load_plan(model: nn.Module, plan: LoadPlan) -> nn.Module:
    """Make the changes of a validated :class:`LoadPlan` (cannot fail on the file's account)."""
    config = plan.config
    dropout, rslora = float(config.get("lora_dropout", 0.0)), bool(config.get("use_rslora", False))
    freeze_base(model)
    for entry in plan.layers:
        layer = entry.layer
        if entry.adapter is not None:  # a named adapter into a layer that keeps its others
            with torch.no_grad():
                entry.adapter.lora_A.copy_(entry.tensors["lora_A.weight"])
                entry.adapter.lora_B.copy_(entry.tensors["lora_B.weight"])
            active = list(layer.active_adapters)
            if layer.has_adapter(entry.adapter_name):
                layer.delete_adapter(entry.adapter_name)
            layer.insert_adapter(entry.adapter_name, entry.adapter)
            # NOTE: as PEFT's load_adapter (is_trainable=False): a loaded non-default adapter is
            # frozen and not made active; "default" keeps its place in the active set.
            layer.set_adapter(active)
            continue
        if entry.new:
            set_submodule(model, entry.name, layer)
            if entry.adapter_name != DEFAULT_ADAPTER:
                layer.rename_default(entry.adapter_name)
        else:
            layer.alpha, layer.dropout, layer.use_rslora = entry.alpha, dropout, rslora
            layer.scaling = lora_scaling(layer.r, entry.alpha, rslora)
        with torch.no_grad():
            if entry.init != "default":
                layer.reset_lora_parameters(entry.init)  # PEFT's residual of the base, as the adapter was trained on
            live = _layer_tensors(layer, entry.adapter_name)
            for key, tensor in entry.tensors.items():
                live[key].copy_(tensor)
        for t in _layer_tensors(layer, entry.adapter_name).values():
            t.requires_grad_(True)
    with torch.no_grad():
        for param, tensor in plan.params:
            param.copy_(tensor)
    for param, _ in plan.params:
        param.requires_grad_(True)
    if plan.modules_to_save:
        model.fastlora_modules_to_save = list(plan.modules_to_save)
    if plan.adapter_config is not None:
        kind = kind_for(plan.adapter_config)
        model.fastlora_adapter_configs = {**getattr(model, "fastlora_adapter_configs", {}), kind.name: plan.adapter_config}
    return model


def load_adapter(model: nn.Module, path: str | os.PathLike, *, adapter_name: str = DEFAULT_ADAPTER) -> nn.Module:
    """Load a PEFT LoRA adapter folder into ``model`` (in place; returns it).

    Targeted modules become LoRA layers of the adapter's kind (:class:`LoRALinear`,
    :class:`DoRALinear` for a ``use_dora`` adapter, the registered layer of any
    other base type); existing LoRA layers are reused when their rank and kind
    match, and a 4-bit QLoRA layer becomes a QDoRA one or back as the adapter
    says. Adapters initialised with PiSSA / OLoRA (``init_lora_weights``) turn
    the base weight into the same residual PEFT computes before the adapter's
    tensors are loaded. Everything is checked before anything changes (unknown
    or unsupported config fields, bad values, missing or unexpected keys, wrong
    shapes, non-floating or non-finite tensors): :class:`AdapterFormatError`
    naming them, and the model is unchanged. Base weights are frozen; the
    loaded adapters (and ``modules_to_save``) are trainable.

    ``adapter_name``: load the file as that named adapter of the LoRA layers
    (:mod:`fastlora.adapters`); a layer's other adapters are kept, and a loaded
    non-default adapter is frozen and inactive until ``set_adapter`` (PEFT's
    ``load_adapter`` with ``is_trainable=False``).
    """
    file, raw = _read_config_json(path)
    peft_type = raw.get("peft_type", "LORA")
    if peft_type == "LORA":
        config = _check_lora_config(file, raw)
    else:
        defaults, handled = {"VERA": (PEFT_VERA_DEFAULTS, VERA_HANDLED), "ADALORA": (PEFT_ADALORA_DEFAULTS, ADALORA_HANDLED)}[peft_type]
        config = _check_other_config(file, raw, defaults, handled)
    tensors = _read_tensors(path)
    target = unwrapped(model)
    with restoring_requires_grad(target):
        if peft_type == "LORA":
            plan = plan_adapter_load(target, path, config, tensors, adapter_name)
        elif adapter_name != DEFAULT_ADAPTER:
            raise _fail(path, f"adapter_name={adapter_name!r}: named adapters are LoRA adapters; this file is {peft_type}")
        else:
            plan = _plan_other_load(target, path, peft_type, config, tensors)
    apply_load_plan(target, plan)
    return model

__all__ = ["AdapterFormatError", "LoadPlan", "apply_load_plan", "load_adapter", "plan_adapter_load", "read_adapter_config", "save_adapter"]
