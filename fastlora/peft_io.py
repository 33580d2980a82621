"""PEFT adapter files: :func:`save_adapter`, :func:`load_adapter`.

The format is PEFT's (0.21): a folder with ``adapter_config.json`` and
``adapter_model.safetensors`` whose keys are
``base_model.model.<module path>.lora_A.weight`` [r, in] and
``...lora_B.weight`` [out, r] (and for DoRA adapters, ``use_dora: true``,
``...lora_magnitude_vector`` [out], no ``.weight`` suffix); ``modules_to_save`` modules are stored as
``base_model.model.<module path>.<param name>``. Files are read with JSON and
safetensors only (nothing is ever unpickled). A load validates everything
before it changes the model, so a bad file leaves the model as it was.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter

import torch
from torch import nn

from .dora import DoRALinear, QDoRALinear
from .model import LoRAConfig, lora_layers
from .modules import LoRALinear
from .qlora import QLoRALinear, is_bnb_4bit
from .registry import kind_for, pattern_value, selected, set_submodule, target_names

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."

# Every field PEFT 0.21.2 writes for a LoRA adapter, with its default. On load,
# a field outside this table is an error (we cannot know what it means); a
# field inside it whose value differs from the default must be one we handle.
PEFT_LORA_DEFAULTS: dict = {
    "alora_invocation_tokens": None,
    "alpha_pattern": {},
    "arrow_config": None,
    "auto_mapping": None,
    "base_model_name_or_path": None,
    "bias": "none",
    "corda_config": None,
    "ensure_weight_tying": False,
    "eva_config": None,
    "exclude_modules": None,
    "fan_in_fan_out": False,
    "inference_mode": True,
    "init_lora_weights": True,
    "kasa_config": None,
    "layer_replication": None,
    "layers_pattern": None,
    "layers_to_transform": None,
    "loftq_config": {},
    "lora_alpha": 8,
    "lora_bias": False,
    "lora_dropout": 0.0,
    "lora_ga_config": None,
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "modules_to_save": None,
    "monteclora_config": None,
    "peft_type": "LORA",
    "peft_version": "0.21.2",
    "qalora_group_size": 16,
    "r": 8,
    "rank_pattern": {},
    "revision": None,
    "target_modules": None,
    "target_parameters": None,
    "task_type": None,
    "trainable_token_indices": None,
    "use_bdlora": None,
    "use_dora": False,
    "use_qalora": False,
    "use_rslora": False,
    "velora_config": None,
}
# Fields whose value we read (any value is fine as long as it is well-formed).
_HANDLED = {
    "alpha_pattern", "auto_mapping", "base_model_name_or_path", "exclude_modules", "inference_mode",
    "init_lora_weights", "lora_alpha", "lora_dropout", "modules_to_save", "peft_type", "peft_version", "r",
    "rank_pattern", "revision", "target_modules", "task_type", "use_rslora", "megatron_core", "qalora_group_size",
    "loftq_config", "use_dora",
}
MAGNITUDE = "lora_magnitude_vector"  # PEFT's DoRA magnitude key (a bare tensor, no ``.weight``)


def _is_dora(layer) -> bool:
    return isinstance(layer, (DoRALinear, QDoRALinear))


class AdapterFormatError(ValueError):
    """An adapter folder that cannot be loaded exactly (corrupt, mismatched or unsupported)."""


def _most_common(values):
    return Counter(values).most_common(1)[0][0]


def _module_key(names: list[str], all_linear: list[str]) -> list[str] | str:
    """The simplest PEFT ``target_modules`` that selects exactly ``names`` among
    ``all_linear``: leaf names if they suffice, else an anchored regex."""
    wanted = set(names)
    leaves = sorted({n.split(".")[-1] for n in names})
    if {n for n in all_linear if selected(n, leaves, default=False)} == wanted:
        return leaves
    return "^(" + "|".join(re.escape(n) for n in sorted(names)) + ")$"


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
    stored too, as PEFT does for its ``modules_to_save``.
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
    r = _most_common(m.r for m in layers.values())
    alpha = _most_common(m.alpha for m in layers.values())
    names = list(layers)
    all_linear = [n for n, m in model.named_modules() if n and isinstance(m, nn.Linear)]
    first = next(iter(layers.values()))
    config = dict(PEFT_LORA_DEFAULTS)
    config.update(
        r=r,
        lora_alpha=int(alpha) if float(alpha).is_integer() else alpha,
        lora_dropout=first.dropout,
        use_rslora=first.use_rslora,
        use_dora=_is_dora(first),
        target_modules=_module_key(names, all_linear),
        rank_pattern={re.escape(n): m.r for n, m in layers.items() if m.r != r},
        alpha_pattern={re.escape(n): m.alpha for n, m in layers.items() if m.alpha != alpha},
        modules_to_save=list(modules_to_save) if modules_to_save else None,
        base_model_name_or_path=base_model_name_or_path,
        task_type=task_type,
        auto_mapping={"base_model_class": type(model).__name__, "parent_library": type(model).__module__},
    )
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A.detach().contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B.detach().contiguous()
        if _is_dora(layer):
            tensors[f"{PREFIX}{name}.{MAGNITUDE}"] = layer.lora_magnitude.detach().contiguous()
    for key in modules_to_save or []:
        hits = [n for n, _ in model.named_modules() if n and (n == key or n.endswith("." + key))]
        if not hits:
            raise ValueError(f"save_adapter: modules_to_save entry {key!r} matches no module of the model")
        for name in hits:
            for pname, param in model.get_submodule(name).named_parameters():
                tensors[f"{PREFIX}{name}.{pname}"] = param.detach().contiguous()
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def read_adapter_config(path: str | os.PathLike) -> dict:
    """Read and validate ``adapter_config.json``; errors name the offending fields."""
    file = os.path.join(path, CONFIG_NAME)
    try:
        with open(file) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise AdapterFormatError(f"{file}: not found (expected a PEFT adapter folder)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFormatError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{file}: expected a JSON object, got {type(config).__name__}")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterFormatError(f"{file}: peft_type is {config.get('peft_type')!r}; fastlora loads 'LORA' adapters")
    unknown = sorted(set(config) - set(PEFT_LORA_DEFAULTS))
    if unknown:
        raise AdapterFormatError(f"{file}: unknown config fields {unknown}; fastlora cannot tell what they change")
    unsupported = sorted(
        k for k, v in config.items()
        if k not in _HANDLED and v != PEFT_LORA_DEFAULTS[k] and not (v in (None, [], {}) and not PEFT_LORA_DEFAULTS[k])
    )
    if unsupported:
        shown = {k: config[k] for k in unsupported}
        raise AdapterFormatError(f"{file}: unsupported settings {shown}; fastlora supports plain LoRA, rsLoRA and DoRA adapters")
    r = config.get("r", 8)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise AdapterFormatError(f"{file}: r must be an integer >= 1, got {r!r}")
    alpha = config.get("lora_alpha", 8)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise AdapterFormatError(f"{file}: lora_alpha must be a number, got {alpha!r}")
    if not isinstance(config.get("use_dora", False), bool):
        raise AdapterFormatError(f"{file}: use_dora must be true or false, got {config['use_dora']!r}")
    dropout = config.get("lora_dropout", 0.0)
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise AdapterFormatError(f"{file}: lora_dropout must be in [0, 1), got {dropout!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise AdapterFormatError(f"{file}: {key} must be an object, got {config[key]!r}")
    return config


def _read_tensors(path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = os.path.join(path, WEIGHTS_NAME)
    if not os.path.exists(file):
        raise AdapterFormatError(f"{file}: not found (fastlora reads safetensors adapters only, never pickles)")
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterFormatError(f"{file}: corrupt or truncated safetensors file ({exc})") from None


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a PEFT LoRA adapter folder into ``model`` (in place; returns it).

    Targeted nn.Linear modules become :class:`LoRALinear` (:class:`DoRALinear` for a
    ``use_dora`` adapter; existing LoRA layers are reused when their rank and kind
    match, and a 4-bit QLoRA layer becomes a QDoRA one or back as the adapter says). Everything is checked before anything
    changes: unknown/unsupported config fields, missing or unexpected keys, wrong
    shapes and non-floating tensors are :class:`AdapterFormatError` naming them.
    Base weights are frozen; the loaded adapters are trainable.
    """
    config = read_adapter_config(path)
    tensors = _read_tensors(path)
    r_default, alpha_default = config.get("r", 8), config.get("lora_alpha", 8)
    use_dora = bool(config.get("use_dora", False))
    wanted = {"lora_A", "lora_B", MAGNITUDE} if use_dora else {"lora_A", "lora_B"}
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
        raise AdapterFormatError(f"{path}: {exc}") from None
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    saved_params: dict[str, torch.Tensor] = {}
    bad_keys = []
    for key, tensor in tensors.items():
        match = re.fullmatch(rf"{re.escape(PREFIX)}(.+)\.(lora_A|lora_B)\.weight", key)
        match = match or (use_dora and re.fullmatch(rf"{re.escape(PREFIX)}(.+)\.({MAGNITUDE})", key))
        if match:
            by_module.setdefault(match.group(1), {})[match.group(2)] = tensor
        elif key.startswith(PREFIX) and config.get("modules_to_save"):
            saved_params[key[len(PREFIX):]] = tensor
        else:
            bad_keys.append(key)
    if bad_keys:
        expected = f"{PREFIX}<module>.lora_A.weight / lora_B.weight" + (f" / {MAGNITUDE}" if use_dora else "")
        raise AdapterFormatError(
            f"{path}: unexpected keys {sorted(bad_keys)[:8]} (expected {expected}"
            + ("" if use_dora else f"; {MAGNITUDE} needs use_dora=true in the config") + ")"
        )
    missing = sorted(set(targets) - set(by_module))
    extra = sorted(set(by_module) - set(targets))
    if missing or extra:
        raise AdapterFormatError(
            f"{path}: the adapter's tensors do not match the modules its target_modules select in this model: "
            f"selected without tensors {missing[:8]}, tensors for unselected modules {extra[:8]}"
        )
    plan = []
    for name in targets:
        pair = by_module[name]
        if set(pair) != wanted:
            need = f"lora_A, lora_B and {MAGNITUDE} (use_dora=true)" if use_dora else "both lora_A and lora_B"
            raise AdapterFormatError(f"{path}: module {name!r} has {sorted(pair)}; {need} are required")
        module = model.get_submodule(name)
        if isinstance(module, (LoRALinear, QLoRALinear)) and module.merged:
            raise AdapterFormatError(f"{path}: the model's layer {name!r} is merged; unmerge() it before loading")
        a, b = pair["lora_A"], pair["lora_B"]
        r = pattern_value(name, config.get("rank_pattern") or {}, r_default)
        alpha = pattern_value(name, config.get("alpha_pattern") or {}, alpha_default)
        if isinstance(module, QLoRALinear) and module.r != r:
            raise AdapterFormatError(
                f"{path}: {name} is a QLoRALinear of rank {module.r}; the adapter has rank {r} (rebuild the layer "
                "with that rank, or load into the unquantized model)"
            )
        want_a, want_b = (r, module.in_features), (module.out_features, r)
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            raise AdapterFormatError(
                f"{path}: {name}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit the layer "
                f"(expected {want_a} / {want_b} for r={r}, in={module.in_features}, out={module.out_features})"
            )
        mag = pair.get(MAGNITUDE)
        if mag is not None and tuple(mag.shape) != (module.out_features,):
            raise AdapterFormatError(
                f"{path}: {name}.{MAGNITUDE} has shape {tuple(mag.shape)}; expected ({module.out_features},) (out_features)"
            )
        for which, t in (("lora_A", a), ("lora_B", b)) + (((MAGNITUDE, mag),) if mag is not None else ()):
            if not t.is_floating_point():
                raise AdapterFormatError(f"{path}: {name}.{which} has dtype {t.dtype}; expected a floating-point dtype")
            if not torch.isfinite(t).all():
                raise AdapterFormatError(f"{path}: {name}.{which} contains NaN or infinite values")
        plan.append((name, module, a, b, mag, r, alpha))
    param_plan = []
    for key, tensor in saved_params.items():
        module_name, _, pname = key.rpartition(".")
        try:
            param = model.get_submodule(module_name).get_parameter(pname)
        except AttributeError:
            raise AdapterFormatError(f"{path}: modules_to_save tensor {key!r} names no parameter of the model") from None
        if param.shape != tensor.shape or not tensor.is_floating_point():
            raise AdapterFormatError(
                f"{path}: modules_to_save tensor {key!r} has shape {tuple(tensor.shape)} dtype {tensor.dtype}; "
                f"the model's parameter is {tuple(param.shape)} {param.dtype}"
            )
        param_plan.append((param, tensor))
    # Everything checked: now change the model.
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module, a, b, mag, r, alpha in plan:
        dropout, rslora = float(config.get("lora_dropout", 0.0)), bool(config.get("use_rslora", False))
        if isinstance(module, (LoRALinear, QLoRALinear)) and module.r == r and _is_dora(module) == use_dora:
            layer = module
            layer.alpha, layer.dropout, layer.use_rslora = float(alpha), dropout, rslora
            layer.scaling = (alpha / math.sqrt(r)) if rslora else alpha / r
        elif isinstance(module, QLoRALinear):  # same rank (checked above), DoRA or not as the adapter says
            cls = QDoRALinear if use_dora else QLoRALinear
            layer = cls(
                module.qweight, module.bias, r=r, alpha=alpha, dropout=dropout, use_rslora=rslora,
                compute_dtype=module.compute_dtype, lora_dtype=module.lora_A.dtype,
            )  # fmt: skip
            layer.train(module.training)
            set_submodule(model, name, layer)
        else:  # a plain nn.Linear, or a LoRA layer of another rank or kind (its old adapter is dropped)
            cls = DoRALinear if use_dora else LoRALinear
            layer = cls.from_linear(module, r=r, alpha=alpha, dropout=dropout, use_rslora=rslora)
            set_submodule(model, name, layer)
        with torch.no_grad():
            layer.lora_A.copy_(a)
            layer.lora_B.copy_(b)
            if mag is not None:
                layer.lora_magnitude.copy_(mag)
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
        if mag is not None:
            layer.lora_magnitude.requires_grad_(True)
    with torch.no_grad():
        for param, tensor in param_plan:
            param.copy_(tensor)
            param.requires_grad_(True)
    return model
