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
from .modules import LoRALinear
from .qlora import QLoRALinear
from .registry import (
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
)
from .peft_fields import PEFT_LORA_DEFAULTS, unsupported_fields
from .validation import check_init, is_int, is_number, lora_scaling, pissa_niter

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


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    modules_to_save: list[str] | None = None,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> None:
    """Write ``model``'s LoRA adapters to the folder ``path`` in PEFT's format,
    loadable by ``peft.PeftModel.from_pretrained`` on the same base model.

    ``modules_to_save``: names of (non-LoRA) modules whose full weights are
    stored too, as PEFT does for its ``modules_to_save``; by default the ones
    given to :func:`fastlora.apply_lora` (or read by :func:`load_adapter`).
    Everything is serialized before the first byte is written, and the two
    files replace the previous ones atomically: on any error the folder keeps
    its previous adapter byte for byte.
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("save_adapter: the model has no LoRA layers (apply_lora first)")
    merged = [n for n, m in layers.items() if m.merged]
    if merged:
        raise ValueError(f"save_adapter: layers {merged} are merged; unmerge() them first so the adapters are separate")
    dora = {_is_dora(m) for m in layers.values()}
    if len(dora) > 1:
        mixed = sorted(n for n, m in layers.items() if _is_dora(m))
        raise ValueError(f"save_adapter: PEFT's format has one use_dora per adapter, but only {mixed} are DoRA layers")
    for attr in ("dropout", "use_rslora"):
        values = {getattr(m, attr) for m in layers.values()}
        if len(values) > 1:
            raise ValueError(f"save_adapter: PEFT's format has one {attr} per adapter, but the layers use {sorted(values)}")
    if modules_to_save is None:
        modules_to_save = getattr(model, "fastlora_modules_to_save", None)
    elif isinstance(modules_to_save, str) or not all(isinstance(k, str) for k in modules_to_save):
        raise TypeError(f"save_adapter: modules_to_save must be a list of module names, got {modules_to_save!r}")
    base_model_name_or_path = _optional_str(base_model_name_or_path, "base_model_name_or_path")
    task_type = _optional_str(task_type, "task_type")
    r = _most_common(m.r for m in layers.values())
    alpha = _most_common(m.alpha for m in layers.values())
    first = next(iter(layers.values()))
    config = dict(PEFT_LORA_DEFAULTS)
    config.update(
        r=r,
        lora_alpha=int(alpha) if float(alpha).is_integer() else alpha,
        lora_dropout=first.dropout,
        use_rslora=first.use_rslora,
        use_dora=_is_dora(first),
        fan_in_fan_out=any(getattr(m, "fan_in_fan_out", False) for m in layers.values()),
        target_modules=_module_key(list(layers), _adaptable_names(model)),
        rank_pattern={re.escape(n): m.r for n, m in layers.items() if m.r != r},
        alpha_pattern={re.escape(n): m.alpha for n, m in layers.items() if m.alpha != alpha},
        modules_to_save=list(modules_to_save) if modules_to_save else None,
        base_model_name_or_path=base_model_name_or_path,
        task_type=task_type,
        auto_mapping={"base_model_class": type(model).__name__, "parent_library": type(model).__module__},
    )
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        for key, t in layer.peft_tensors().items():
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


def read_adapter_config(path: str | os.PathLike) -> dict:
    """Read and validate ``adapter_config.json``: every field PEFT writes is known,
    every value fastlora uses is checked (type, range, finiteness) here, before
    anything else happens; errors name the offending field."""
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
    if config.get("peft_type", "LORA") != "LORA":
        raise _fail(file, f"peft_type is {config.get('peft_type')!r}; fastlora loads 'LORA' adapters")
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


@dataclass
class LoadPlan:
    """Every change :func:`load_adapter` will make, all of it validated."""

    config: dict
    layers: list[_LayerPlan] = field(default_factory=list)
    params: list[tuple[nn.Parameter, torch.Tensor]] = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)


def _layer_config(config: dict, r: int, alpha: float) -> LoRAConfig:
    return LoRAConfig(
        r=r, alpha=alpha, dropout=float(config.get("lora_dropout", 0.0)), use_rslora=bool(config.get("use_rslora", False)),
        use_dora=bool(config.get("use_dora", False)),
    )  # fmt: skip


def _plan_layer(model: nn.Module, name: str, config: dict, r: int, alpha: float, init: str, file) -> tuple[nn.Module, bool]:
    """The layer an adapter's tensors for ``name`` go into: the existing one when
    its rank and kind fit (its old adapter is replaced), else a new unattached one."""
    module = model.get_submodule(name)
    use_dora = bool(config.get("use_dora", False))
    layer_config = _layer_config(config, r, alpha)
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
            return module, False
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
            return layer, True
        if isinstance(module, LoRALinear):  # a dense LoRA / DoRA layer of another rank or kind
            cls = DoRALinear if use_dora else LoRALinear
            layer = cls.from_linear(module, r=r, alpha=alpha, dropout=layer_config.dropout, use_rslora=layer_config.use_rslora)
            return layer, True
        raise _fail(file, f"{name} is a {type(module).__name__} of rank {module.r}; the adapter has rank {r}")
    builder = kind_for(LoRAConfig).builder_for(module)
    if init != "default" and not isinstance(module, nn.Linear):
        raise _fail(file, f"{name}: init_lora_weights={init!r} is supported on nn.Linear bases only")
    return builder(module, name, layer_config, None), True


def plan_adapter_load(model: nn.Module, path: str | os.PathLike, config: dict, tensors: dict[str, torch.Tensor]) -> LoadPlan:
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
        layer, new = _plan_layer(model, name, config, r, alpha, init, path)
        entry = _LayerPlan(name, layer, new, {}, float(alpha), init)
        plan.layers.append(entry)
        for key, t in layer.peft_tensors().items():
            expected[f"{PREFIX}{name}.{key}"] = (entry, key, t)
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


def apply_load_plan(model: nn.Module, plan: LoadPlan) -> nn.Module:
    """Make the changes of a validated :class:`LoadPlan` (cannot fail on the file's account)."""
    config = plan.config
    dropout, rslora = float(config.get("lora_dropout", 0.0)), bool(config.get("use_rslora", False))
    freeze_base(model)
    for entry in plan.layers:
        layer = entry.layer
        if entry.new:
            set_submodule(model, entry.name, layer)
        else:
            layer.alpha, layer.dropout, layer.use_rslora = entry.alpha, dropout, rslora
            layer.scaling = lora_scaling(layer.r, entry.alpha, rslora)
        with torch.no_grad():
            if entry.init != "default":
                layer.reset_lora_parameters(entry.init)  # PEFT's residual of the base, as the adapter was trained on
            live = layer.peft_tensors()
            for key, tensor in entry.tensors.items():
                live[key].copy_(tensor)
        for t in layer.peft_tensors().values():
            t.requires_grad_(True)
    with torch.no_grad():
        for param, tensor in plan.params:
            param.copy_(tensor)
    for param, _ in plan.params:
        param.requires_grad_(True)
    if plan.modules_to_save:
        model.fastlora_modules_to_save = list(plan.modules_to_save)
    return model


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
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
    """
    config = read_adapter_config(path)
    tensors = _read_tensors(path)
    with restoring_requires_grad(model):
        plan = plan_adapter_load(model, path, config, tensors)
    return apply_load_plan(model, plan)


__all__ = ["AdapterFormatError", "LoadPlan", "apply_load_plan", "load_adapter", "plan_adapter_load", "read_adapter_config", "save_adapter"]
