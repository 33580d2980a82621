"""Several named LoRA adapters per model, as PEFT's multi-adapter ``PeftModel``.

The functions take the model (any ``nn.Module`` holding fastlora's LoRA layers,
or one such layer) and are named as PeftModel's methods:

* :func:`add_adapter` ``(model, adapter_name, config)`` - a new adapter on the
  modules ``config`` targets (existing LoRA layers get a second adapter; plain
  linear layers become LoRA layers holding only the new one). Not activated.
* :func:`set_adapter` ``(model, names)`` - the active adapter(s): their updates
  are summed in the forward; their parameters train, every other adapter's
  are frozen (PEFT's ``set_adapter``).
* :func:`active_adapters` / :func:`adapter_names` - the active / all adapters.
* :func:`delete_adapter` ``(model, adapter_name)``.
* :func:`disable_adapter` ``(model)`` - a context manager: the base model alone inside.
* :func:`add_weighted_adapter` ``(model, adapters, weights, adapter_name,
  combination_type)`` - PEFT's ``"cat"`` and ``"linear"`` combinations.
* :func:`mixed_batch` ``(model, adapter_names)`` - a context manager for PEFT's
  ``model(x, adapter_names=[...])``: one adapter per row of the batch
  (``"__base__"``: the base model alone); in inference as PEFT, and in training
  (fastlora's extension): each row trains its own adapter.
* :class:`MultiAdapterModel` ``(model)`` - a wrapper whose forward takes
  ``adapter_names=[...]`` or ``adapter_ids=`` literally;
  :func:`trainable_adapters` ``(model, names)`` - those adapters trainable, their
  parameters returned for one optimizer.

``model(x, adapter_names=...)`` itself cannot work for a plain ``nn.Module``: its
forward does not take (or pass on) that argument. PEFT's PeftModel accepts it
and injects it into every LoRA layer with forward pre-hooks;
:func:`mixed_batch` installs the same hooks for the duration of a block::

    with fastlora.adapters.mixed_batch(model, ["a", "__base__", "b"]):
        y = model(x)  # x's first dimension has 3 rows

or, as a call, ``MultiAdapterModel(model)(x, adapter_names=["a", "__base__", "b"])``.
A single layer also takes it directly: ``layer(x, adapter_names=[...])``.

Storage (per layer, :class:`fastlora.modules.NamedAdapters`): the ``"default"``
adapter keeps the layer's own ``lora_A`` / ``lora_B`` (state-dict keys
``<layer>.lora_A``, ``<layer>.lora_B``, unchanged), every other adapter is
``<layer>.lora_adapters.<name>.lora_A`` / ``.lora_B``.

Supported layers: :class:`fastlora.LoRALinear` and :class:`fastlora.QLoRALinear`.
A model holding any other adapter layer (DoRA, VeRA, AdaLoRA, LoRA on
embeddings / convolutions / transformers' Conv1D) is refused by name.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .model import LoRAConfig
from .modules import BASE_ONLY, DEFAULT_ADAPTER, LoRAAdapter, NamedAdapters, check_adapter_name
from .peft_fields import default_target_modules
from .qlora import is_bnb_4bit
from .registry import (
    adapter_layers,
    freeze_base,
    is_adapter_layer,
    kind_for,
    kinds,
    restoring_requires_grad,
    set_submodule,
    target_names,
)

COMBINATION_TYPES = ("cat", "linear")
# PEFT's other combination types, refused by name (not implemented here yet)
_PEFT_ONLY_COMBINATIONS = (
    "svd", "ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd", "dare_linear_svd", "magnitude_prune",
    "magnitude_prune_svd",
)  # fmt: skip


# -- the model's named-adapter layers ------------------------------------------------


def _kind_label(layer: nn.Module) -> str:
    if "lora_magnitude" in layer._parameters:
        return "DoRA"
    for kind in kinds():
        if isinstance(layer, kind.layer_types):
            return kind.label
    return "adapter"


def _supported(layer: nn.Module) -> bool:
    return isinstance(layer, NamedAdapters) and "lora_magnitude" not in layer._parameters


def named_adapter_layers(model: nn.Module, what: str = "named adapters") -> dict[str, NamedAdapters]:
    """The model's LoRA linear layers by module name (``""`` for a bare layer).

    Raises NotImplementedError naming every other adapter layer of the model and
    its kind: named adapters are implemented for LoRALinear and QLoRALinear only."""
    layers = adapter_layers(model)
    refused = [(name or "<model>", f"{type(m).__name__} ({_kind_label(m)})") for name, m in layers.items() if not _supported(m)]
    if refused:
        raise NotImplementedError(
            f"{what}: fastlora's named adapters support LoRALinear and QLoRALinear layers only (for now); the model "
            f"also holds {refused[:8]}" + (f" and {len(refused) - 8} more" if len(refused) > 8 else "")
        )
    return layers


def adapter_names(model: nn.Module) -> list[str]:
    """Every adapter name on the model's layers (``"default"`` first if present, then
    in order of appearance)."""
    names: dict[str, None] = {}
    for layer in named_adapter_layers(model, "adapter_names").values():
        names.update(dict.fromkeys(layer.adapter_names()))
    return list(names)


def active_adapters(model: nn.Module) -> list[str]:
    """The active adapter names (PEFT's ``active_adapters``): those whose updates the
    forward sums. ``["default"]`` until :func:`set_adapter` changes it."""
    layers = named_adapter_layers(model, "active_adapters")
    if not layers:
        raise ValueError("active_adapters: the model has no LoRA layers (fastlora.apply_lora or add_adapter first)")
    return list(next(iter(layers.values())).active_adapters)


def _check_exists(model_names: list[str], names: Sequence[str], what: str) -> None:
    missing = [n for n in names if n not in model_names]
    if missing:
        raise ValueError(f"{what}: no adapter named {missing} on the model; its adapters are {model_names}")


def _names_arg(value, what: str) -> list[str]:
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"{what} must be an adapter name or a list of adapter names, got {value!r}")
    return list(names)


# -- adding, activating, deleting ------------------------------------------------------


def _resolve_config(model: nn.Module, config) -> LoRAConfig:
    if not isinstance(config, LoRAConfig):
        if isinstance(config, dict) or hasattr(config, "peft_type"):
            config = LoRAConfig.from_peft(config)
        else:
            raise TypeError(f"add_adapter: config must be a fastlora.LoRAConfig or a peft.LoraConfig, got {type(config).__name__}")
    if config.target_modules is None and not is_adapter_layer(model):
        config = dataclasses.replace(config, target_modules=default_target_modules(model))
    if config.use_dora:
        raise NotImplementedError("add_adapter: use_dora=True; named adapters support plain LoRA (DoRA: apply_lora only, for now)")
    if config.modules_to_save:
        raise NotImplementedError(
            "add_adapter: modules_to_save (PEFT keeps a copy of each such module per adapter) is not supported for named "
            "adapters; give it to apply_lora for the default adapter"
        )
    return config


def _upcast(adapter: LoRAAdapter, config: LoRAConfig) -> LoRAAdapter:
    # PEFT's autocast_adapter_dtype: 16-bit adapters become float32 (exact)
    if config.autocast_adapter_dtype:
        for p in (adapter.lora_A, adapter.lora_B):
            if p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()
    return adapter


def add_adapter(model: nn.Module, adapter_name: str, config) -> nn.Module:
    """Add the adapter ``adapter_name`` to the modules ``config`` selects (PEFT's
    ``PeftModel.add_adapter``); returns ``model``, changed in place.

    ``config``: a :class:`fastlora.LoRAConfig` or a ``peft.LoraConfig``; its
    ``target_modules`` / ``exclude_modules`` / ``rank_pattern`` / ``alpha_pattern``
    select and size the adapter per module, as for :func:`fastlora.apply_lora`.
    A selected module that already is a LoRA layer gets one more adapter; a plain
    ``nn.Linear`` (or bitsandbytes ``Linear4bit``) becomes a LoRA layer that holds
    only this adapter (quantized to 4 bits with ``config.quantize``). The new
    adapter starts with B = 0 and is **not** activated (PEFT's rule; call
    :func:`set_adapter`); afterwards the active adapters' parameters require grad
    and every other adapter's, the new one's included, are frozen (PEFT re-applies
    ``set_adapter`` the same way). Everything is built before the model changes.
    Not supported: ``use_dora``, ``modules_to_save``, and PiSSA / OLoRA inits on
    a module that already has adapters (they rewrite the shared base weight).
    """
    check_adapter_name(adapter_name)
    layers = named_adapter_layers(model, "add_adapter")
    config = _resolve_config(model, config)
    existing = adapter_names(model) if layers else []
    if adapter_name in existing:
        raise ValueError(f"add_adapter: the model already has an adapter named {adapter_name!r} (its adapters: {existing})")
    active = active_adapters(model) if layers else [DEFAULT_ADAPTER]
    kind = kind_for(LoRAConfig)
    if is_adapter_layer(model):
        names = [""]
    else:
        names = target_names(model, kind, config.target_modules, exclude_modules=config.exclude_modules, include_adapters=True)
        if not names:
            raise ValueError(f"add_adapter: target_modules={config.target_modules!r} matched no module LoRA can adapt")
    # plan: every adapter and layer built, unattached
    extra: dict[str, LoRAAdapter] = {}
    fresh: dict[str, nn.Module] = {}
    with restoring_requires_grad(model):
        for name in names:
            module = model.get_submodule(name) if name else model
            kwargs = config.layer_kwargs(name)
            if is_adapter_layer(module):
                if kwargs["init"] not in ("default", "gaussian"):
                    raise NotImplementedError(
                        f"add_adapter: init={kwargs['init']!r} rewrites the base weight of {name or '<model>'!r}, which its "
                        "other adapters share; named adapters on an existing LoRA layer support 'default' and 'gaussian'"
                    )
                extra[name] = _upcast(
                    LoRAAdapter(
                        module.in_features, module.out_features, **kwargs,
                        device=module._adapter_device(), dtype=module._adapter_dtype(),
                    ),
                    config,
                )  # fmt: skip
            elif isinstance(module, nn.Linear) or is_bnb_4bit(module):
                layer = kind.builder_for(module)(module, name, config, None)
                layer.rename_default(adapter_name)
                layer.set_adapter(active)
                fresh[name] = layer
            else:
                raise NotImplementedError(
                    f"add_adapter: module {name!r} is a {type(module).__name__}; named adapters support nn.Linear and "
                    "bitsandbytes Linear4bit modules (LoRALinear / QLoRALinear) only, for now"
                )
    # apply
    if not layers:
        freeze_base(model)
    for name, adapter in extra.items():
        (model.get_submodule(name) if name else model).insert_adapter(adapter_name, adapter)
    for name, layer in fresh.items():
        set_submodule(model, name, layer)
    for layer in named_adapter_layers(model, "add_adapter").values():
        layer.set_adapter(active)
    return model


def set_adapter(model: nn.Module, adapter_name: str | Sequence[str], *, inference_mode: bool = False) -> None:
    """Make ``adapter_name`` (a name or a list of names) the active adapter(s): the
    forward sums their updates (a layer skips names it does not hold). As PEFT's
    ``set_adapter``: their parameters require grad (unless ``inference_mode``)
    and every other adapter's are frozen; a merged layer is unmerged first, with
    a warning (a QLoRALinear merged into its 4-bit weight cannot be, and raises)."""
    names = _names_arg(adapter_name, "set_adapter: adapter_name")
    layers = named_adapter_layers(model, "set_adapter")
    _check_exists(adapter_names(model), names, "set_adapter")
    for name, layer in layers.items():
        if layer.merged:
            warnings.warn(f"set_adapter: layer {name or '<model>'!r} is merged; unmerging it first", stacklevel=2)
            layer.unmerge()
    for layer in layers.values():
        layer.set_adapter(names, inference_mode=inference_mode)


def set_requires_grad(model: nn.Module, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
    """Turn gradients of the named adapters' parameters on or off (PEFT's ``set_requires_grad``);
    the active set is unchanged."""
    names = _names_arg(adapter_names, "set_requires_grad: adapter_names")
    layers = named_adapter_layers(model, "set_requires_grad")
    _check_exists(_all_names(layers), names, "set_requires_grad")
    for layer in layers.values():
        for name in layer._present(names):
            slot = layer.adapter(name)
            slot.lora_A.requires_grad_(requires_grad)
            slot.lora_B.requires_grad_(requires_grad)


def _all_names(layers: dict[str, NamedAdapters]) -> list[str]:
    names: dict[str, None] = {}
    for layer in layers.values():
        names.update(dict.fromkeys(layer.adapter_names()))
    return list(names)


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Delete the adapter ``adapter_name`` from every layer (PEFT's ``delete_adapter``).

    A merged adapter is refused (unmerge first). If it was active, the other
    active adapters stay active; if none is left, the first remaining adapter
    name (sorted, as PEFT picks it) becomes active, with a warning, and the
    active adapters' parameters require grad (PEFT's ``set_adapter``). A layer
    left without adapters computes its base layer (PEFT keeps such layers too;
    :func:`fastlora.merge_lora` turns it back into a plain layer)."""
    layers = named_adapter_layers(model, "delete_adapter")
    _check_exists(_all_names(layers), [adapter_name], "delete_adapter")
    merged = [n or "<model>" for n, m in layers.items() if m.merged and adapter_name in m.merged_adapters]
    if merged:
        raise ValueError(f"delete_adapter: adapter {adapter_name!r} is merged in layers {merged}; unmerge them first")
    active = active_adapters(model)
    for layer in layers.values():
        if layer.has_adapter(adapter_name):
            layer.delete_adapter(adapter_name)
    if adapter_name not in active:
        for layer in layers.values():
            layer.active_adapters = [n for n in layer.active_adapters if n != adapter_name]
        return
    new_active = [n for n in active if n != adapter_name]
    if not new_active:
        remaining = sorted(_all_names(layers))
        if remaining:
            warnings.warn(
                f"delete_adapter: adapter {adapter_name!r} was active and is now deleted; setting the active adapter to "
                f"{remaining[0]!r}",
                stacklevel=2,
            )
            new_active = [remaining[0]]
    for layer in layers.values():
        layer.set_adapter(new_active)


@contextmanager
def disable_adapter(model: nn.Module) -> Iterator[None]:
    """A context manager in which the model computes its base layers alone (PEFT's
    ``PeftModel.disable_adapter``). Merged LoRALinear layers are unmerged on entry,
    as PEFT's forward does (a QLoRALinear merged into its 4-bit weight raises);
    every adapter parameter is frozen inside, and on exit each one's
    ``requires_grad`` is restored as it was (PEFT instead re-applies
    ``set_adapter``: the active adapters trainable)."""
    layers = named_adapter_layers(model, "disable_adapter")
    flags = [
        (p, p.requires_grad)
        for layer in layers.values()
        for name in layer.adapter_names()
        for p in (layer.adapter(name).lora_A, layer.adapter(name).lora_B)
    ]
    was = [(layer, layer.disable_adapters) for layer in layers.values()]
    for layer in layers.values():
        if layer.merged:
            layer.unmerge()
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for layer in layers.values():
            layer.disable_adapters = True
        yield
    finally:
        for layer, value in was:
            layer.disable_adapters = value
        for p, value in flags:
            p.requires_grad_(value)


# -- combining adapters --------------------------------------------------------------


def add_weighted_adapter(
    model: nn.Module,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "cat",
) -> None:
    """Add ``adapter_name`` combining ``adapters`` with ``weights`` (PEFT's
    ``add_weighted_adapter`` for ``"cat"`` and ``"linear"``).

    On every layer holding at least one of ``adapters`` (PEFT: the union of their
    targets), with ``s_i`` adapter i's scaling on that layer:

    * ``"cat"`` (exact): ``A = cat_i(w_i * s_i * A_i)`` on dim 0, ``B = cat_i(B_i)``
      on dim 1; rank ``R = sum_i r_i`` (r_i: adapter i's largest rank on the model,
      blocks of smaller layers zero-padded, as PEFT sizes it);
    * ``"linear"`` (an approximation: it keeps the cross terms ``B_i A_j``):
      ``A = sum_i sign(w_i s_i) sqrt(|w_i s_i|) A_i``, ``B = sum_i sqrt(|w_i s_i|) B_i``
      (the weights rounded to float32 first, as PEFT's tensor of weights); needs
      equal ranks; ``R = r``. One adapter alone always combines as ``"linear"``.

    The new adapter has ``r = alpha = R`` (PEFT's config), hence scaling 1, or
    ``sqrt(R)`` when ``adapters[0]`` uses rsLoRA (PEFT's config keeps
    ``use_rslora`` and so the same factor), and ``adapters[0]``'s dropout. Its
    parameters are frozen (PEFT's ``_freeze_adapter``) and it is not activated.
    ``"cat"`` adapters are float32 on a 16-bit base (PEFT's autocast), else in
    the base dtype; ``"linear"`` ones take the first adapter's dtype.
    PEFT's other combination types (``"svd"``, PEFT's default, ``"ties"``,
    ``"dare_*"``, ``"magnitude_prune*"``) are not implemented here (a
    NotImplementedError); an ``adapter_name`` that exists is a ValueError (PEFT
    silently returns).
    """
    check_adapter_name(adapter_name)
    layers = named_adapter_layers(model, "add_weighted_adapter")
    names = _all_names(layers)
    adapters = _names_arg(adapters, "add_weighted_adapter: adapters")
    if not adapters:
        raise ValueError("add_weighted_adapter: adapters is empty")
    _check_exists(names, adapters, "add_weighted_adapter")
    if adapter_name in names:
        raise ValueError(f"add_weighted_adapter: the model already has an adapter named {adapter_name!r}")
    weights = list(weights)
    if len(weights) != len(adapters) or not all(
        isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights
    ):
        raise ValueError(
            f"add_weighted_adapter: weights must be {len(adapters)} finite numbers (one per adapter), got {weights!r}"
        )
    if combination_type in _PEFT_ONLY_COMBINATIONS:
        raise NotImplementedError(
            f"add_weighted_adapter: combination_type={combination_type!r} is PEFT's but not implemented in fastlora; "
            f"use one of {COMBINATION_TYPES} ('cat' is exact)"
        )
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"add_weighted_adapter: combination_type must be one of {COMBINATION_TYPES}, got {combination_type!r}")
    if len(adapters) == 1:
        combination_type = "linear"
    ranks = {a: max(m.adapter(a).r for m in layers.values() if m.has_adapter(a)) for a in adapters}
    if combination_type == "linear":
        if len(set(ranks.values())) != 1:
            raise ValueError(f"add_weighted_adapter: combination_type='linear' needs equal ranks, got {ranks}")
        new_rank = ranks[adapters[0]]
    else:
        new_rank = sum(ranks[a] for a in adapters)
    first = next(m.adapter(adapters[0]) for m in layers.values() if m.has_adapter(adapters[0]))
    dropout, use_rslora = first.dropout, first.use_rslora
    built = {}
    for lname, layer in layers.items():
        present = [(a, w) for a, w in zip(adapters, weights) if layer.has_adapter(a)]
        if not present:
            continue
        if combination_type == "cat":
            lora_A, lora_B = _cat(layer, present)
            dtype = layer._adapter_dtype()
            dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        else:
            bad = {a: layer.adapter(a).r for a, _ in present if layer.adapter(a).r != new_rank}
            if bad:
                raise ValueError(
                    f"add_weighted_adapter: combination_type='linear' needs rank {new_rank} everywhere; layer "
                    f"{lname or '<model>'!r} has ranks {bad}"
                )
            lora_A, lora_B = _linear(layer, present)
            dtype = lora_A.dtype
        adapter = LoRAAdapter(
            layer.in_features, layer.out_features, r=new_rank, alpha=new_rank, dropout=dropout, use_rslora=use_rslora,
            device=layer._adapter_device(), dtype=dtype,
        )  # fmt: skip
        with torch.no_grad():
            adapter.lora_A.zero_()
            adapter.lora_B.zero_()
            adapter.lora_A[: lora_A.shape[0]] = lora_A
            adapter.lora_B[:, : lora_B.shape[1]] = lora_B
        adapter.requires_grad_(False)
        built[lname] = adapter
    for lname, adapter in built.items():
        layers[lname].insert_adapter(adapter_name, adapter)


@torch.no_grad()
def _cat(layer: NamedAdapters, present) -> tuple[torch.Tensor, torch.Tensor]:
    # NOTE: PEFT's operation order, (A * w) * s, in A's dtype
    parts_A = [layer.adapter(a).lora_A.data * w * layer.adapter(a).scaling for a, w in present]
    parts_B = [layer.adapter(a).lora_B.data for a, _ in present]
    return torch.cat(parts_A, 0), torch.cat(parts_B, 1)


@torch.no_grad()
def _linear(layer: NamedAdapters, present) -> tuple[torch.Tensor, torch.Tensor]:
    weights_A, weights_B = [], []
    for a, w in present:
        ws = w * layer.adapter(a).scaling
        sign = 1 if ws >= 0 else -1  # the sign goes on A only (on both it would cancel)
        weights_A.append(math.sqrt(abs(ws)) * sign)
        weights_B.append(math.sqrt(abs(ws)))
    As = torch.stack([layer.adapter(a).lora_A.data for a, _ in present])
    Bs = torch.stack([layer.adapter(a).lora_B.data for a, _ in present])
    dtype = As.dtype
    # NOTE: torch.tensor of Python floats is float32 (the default dtype), as PEFT's weights tensor
    wA = torch.tensor(weights_A, device=As.device).view(-1, 1, 1)
    wB = torch.tensor(weights_B, device=Bs.device).view(-1, 1, 1)
    return (As * wA).sum(0).to(dtype), (Bs * wB).sum(0).to(dtype)


# -- mixed batches -------------------------------------------------------------------


def _refuse_gradient_checkpointing(model: nn.Module) -> None:
    # NOTE: gradient checkpointing re-runs each block's forward during backward, after
    # this block has exited: the layers would recompute with the active adapters
    # instead of each row's, and the gradients would be silently wrong.
    for name, module in model.named_modules():
        if getattr(module, "gradient_checkpointing", False) is True:
            where = f"module {name!r}" if name else "the model"
            raise ValueError(
                f"mixed_batch: {where} has gradient checkpointing enabled; training on a mixed batch needs each "
                "layer's forward to see the row's adapter names, which a recompute during backward would not. "
                "Disable it for mixed-batch training (model.gradient_checkpointing_disable() on a transformers "
                "model) or train one adapter per batch"
            )


@contextmanager
def mixed_batch(model: nn.Module, adapter_names: Sequence[str]) -> Iterator[None]:
    """Within the block, every LoRA layer's forward gets ``adapter_names`` (PEFT's
    ``model(x, adapter_names=...)``): row m of the layer input's first dimension
    uses adapter ``adapter_names[m]`` alone, ``"__base__"`` the base layer alone
    (a layer that lacks a name computes its base for those rows, as PEFT's).

    In eval mode this is PEFT's mixed-batch inference. In training mode (fastlora's
    extension; PEFT refuses it) each row trains its own adapter: an adapter's
    gradient is exactly the sum over its rows, an adapter without rows gets none,
    and frozen adapters stay frozen (:func:`trainable_adapters` makes the batch's
    adapters trainable). The names apply to forwards run on the thread that
    entered the block (another thread's forward of the same model is untouched,
    so threads may run their own mixed batches at once). Names must exist on the
    model; merged layers are refused by the layers (unmerge first).
    :class:`MultiAdapterModel` wraps this as ``model(x, adapter_names=...)``."""
    names = _names_arg(adapter_names, "mixed_batch: adapter_names")
    layers = named_adapter_layers(model, "mixed_batch")
    _check_exists(_all_names(layers), [n for n in dict.fromkeys(names) if n != BASE_ONLY], "mixed_batch")
    if model.training and torch.is_grad_enabled():
        _refuse_gradient_checkpointing(model)
    owner = threading.get_ident()

    def inject(module, args, kwargs):
        if threading.get_ident() != owner:
            return None
        return args, {**kwargs, "adapter_names": names}

    handles = [layer.register_forward_pre_hook(inject, with_kwargs=True) for layer in layers.values()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def trainable_adapters(model: nn.Module, adapter_names: str | Sequence[str]) -> list[nn.Parameter]:
    """Make the named adapters' parameters trainable on every layer that holds them
    (:func:`set_requires_grad` with True; the active set and the other adapters'
    flags are unchanged) and return them, layer by layer in the model's order and
    ``lora_A`` before ``lora_B``: one list for one optimizer that trains several
    adapters at once in mixed batches (:func:`mixed_batch`, :class:`MultiAdapterModel`)."""
    names = _names_arg(adapter_names, "trainable_adapters: adapter_names")
    set_requires_grad(model, names, True)
    params = []
    for layer in named_adapter_layers(model, "trainable_adapters").values():
        for name in layer._present(names):
            slot = layer.adapter(name)
            params += [slot.lora_A, slot.lora_B]
    return params


class MultiAdapterModel(nn.Module):
    """``model(x, adapter_names=[...])`` for any model holding fastlora's LoRA layers
    (PEFT's ``PeftModel`` call, in training too): the wrapper's forward takes

    * ``adapter_names``: a list with one adapter name per row of the batch
      (``"__base__"``: the base model alone), or
    * ``adapter_ids``: an integer tensor [batch] (or a list of ints) indexing
      ``self.names`` (``-1``: the base model alone),

    runs ``model(*args, **kwargs)`` inside :func:`mixed_batch` and returns what it
    returns. With neither, it is ``model(*args, **kwargs)`` (the active adapters).

    ``names`` (default: every adapter of the model, ``"default"`` first) fixes what
    the ids mean. The wrapped model is ``self.model`` (its state-dict keys gain the
    prefix ``model.``; :func:`fastlora.save_adapter` / :func:`fastlora.load_adapter`
    given the wrapper use the wrapped model's names, so the files are the same). Training: each row trains
    its own adapter (see :func:`mixed_batch`); ``trainable_adapters(wrapper.model,
    wrapper.names)`` gives one optimizer every adapter.
    """

    # fastlora.save_adapter / load_adapter given the wrapper read and write the wrapped
    # model's module names (the files stay PEFT's, loadable without the wrapper).
    fastlora_wrapper = True

    def __init__(self, model: nn.Module, names: Sequence[str] | None = None) -> None:
        super().__init__()
        layers = named_adapter_layers(model, "MultiAdapterModel")
        if not layers:
            raise ValueError("MultiAdapterModel: the model has no LoRA layers (fastlora.apply_lora or add_adapter first)")
        existing = _all_names(layers)
        names = existing if names is None else _names_arg(names, "MultiAdapterModel: names")
        if not names or len(set(names)) != len(names):
            raise ValueError(f"MultiAdapterModel: names must be distinct adapter names, at least one, got {names!r}")
        _check_exists(existing, names, "MultiAdapterModel")
        self.model = model
        self.names = list(names)

    def forward(self, *args, adapter_names: Sequence[str] | None = None, adapter_ids=None, **kwargs):
        if adapter_names is not None and adapter_ids is not None:
            raise ValueError("MultiAdapterModel: pass adapter_names or adapter_ids, not both")
        if adapter_ids is not None:
            adapter_names = self.names_of(adapter_ids)
        if adapter_names is None:
            return self.model(*args, **kwargs)
        if isinstance(adapter_names, str):
            raise TypeError(
                f"MultiAdapterModel: adapter_names must be a list with one adapter name per row, got the string {adapter_names!r}"
            )
        with mixed_batch(self.model, list(adapter_names)):
            return self.model(*args, **kwargs)

    def names_of(self, adapter_ids) -> list[str]:
        """The adapter name of each row for ``adapter_ids`` (integer tensor [batch] or
        list of ints into ``self.names``; ``-1`` gives ``"__base__"``). Reads the ids
        on the host (a device sync for a CUDA tensor)."""
        n = len(self.names)
        if isinstance(adapter_ids, torch.Tensor):
            if adapter_ids.dtype.is_floating_point or adapter_ids.dtype.is_complex or adapter_ids.dtype == torch.bool:
                raise TypeError(f"adapter_ids must be an integer tensor, got dtype={adapter_ids.dtype}")
            if adapter_ids.dim() != 1:
                raise ValueError(f"adapter_ids must have shape [batch] (one id per row), got {list(adapter_ids.shape)}")
            ids = adapter_ids.tolist()
        elif isinstance(adapter_ids, (list, tuple)) and all(
            isinstance(i, int) and not isinstance(i, bool) for i in adapter_ids
        ):
            ids = list(adapter_ids)
        else:
            raise TypeError(f"adapter_ids must be an integer tensor [batch] or a list of ints, got {adapter_ids!r}")
        bad = sorted({i for i in ids if not -1 <= i < n})
        if bad:
            raise ValueError(
                f"adapter_ids must be in [-1, {n}) (indices into names {self.names}; -1 = the base model alone), "
                f"got {bad[:8]}"
            )
        return [BASE_ONLY if i < 0 else self.names[i] for i in ids]

    def extra_repr(self) -> str:
        return f"names={self.names}"


__all__ = [
    "COMBINATION_TYPES",
    "MultiAdapterModel",
    "active_adapters",
    "add_adapter",
    "add_weighted_adapter",
    "adapter_names",
    "delete_adapter",
    "disable_adapter",
    "mixed_batch",
    "named_adapter_layers",
    "set_adapter",
    "set_requires_grad",
    "trainable_adapters",
]
