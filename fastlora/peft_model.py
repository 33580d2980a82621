"""Run a ``peft.PeftModel``'s LoRA layers on fastlora's fused ops: :func:`from_peft`.

The PeftModel stays a PeftModel. Each LoRA layer of a kind fastlora can run
(PEFT's ``lora.Linear`` on an ``nn.Linear``, a transformers ``Conv1D`` or a
bitsandbytes ``Linear4bit``; PEFT's bitsandbytes ``lora.Linear4bit``; AdaLoRA's
``SVDLinear``) has its class swapped, in place, for a fastlora subclass of its
PEFT class (``FusedLoraLinear``, ``FusedLoraLinear4bit``, ``FusedSVDLinear``)
whose ``forward`` decides **at every call** whether the layer's current state
and input are something fastlora computes exactly as PEFT does:

* yes: the fused op (:func:`fastlora.lora_linear`, :func:`fastlora.qlora_linear`
  on a 4-bit base, :func:`fastlora.dora_linear` for DoRA) runs once with the
  base weight and the active adapters (all of them concatenated along r when
  no dropout is in effect; see :func:`_split_terms`); ``adapter_names=`` mixed
  batches run it once per group of rows (:func:`_run_mixed`);
* no: PEFT's own ``forward`` runs, and the reason is counted
  (:func:`fallback_counts`) and warned about once per reason.

Everything the forward reads lives on the layer (``self``): an adapter added,
deleted, switched, made DoRA, rescaled or merged later is seen by the next
call (a layer PEFT creates later, for an adapter on new target modules, needs
another :func:`from_peft`). Nothing but plain attributes is stored on a module
(counters and caches, left out of pickles and deep copies), so
``copy.deepcopy``, ``torch.save`` / ``torch.load`` and ``save_pretrained`` /
``merge_and_unload`` work as with PEFT, and a copy runs its own weights. Under
``torch.compile`` the same checks are traced (dynamo guards on the state they
read) and the layers compile to fastlora's custom ops. peft is imported only
when :func:`from_peft` (or an unpickle of a fused layer) needs it.
"""

from __future__ import annotations

import collections
import importlib
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dora import dora_linear, weight_sq_norm
from .functional import lora_linear
from .qlora import is_bnb_4bit, qlora_linear
from .quant import QuantizedWeight

FUSED = "fused"
"""The :func:`fallback_counts` key of calls that ran on fastlora's fused ops."""

# Fallback reasons after which PEFT runs its base layer alone (nothing to fuse,
# nothing slower than PEFT): counted, never warned about at call time.
BASE_ONLY = (
    "adapters disabled (base layer only)",
    "merged adapters (base layer only)",
    "no active adapter in this layer (base layer only)",
)


class PeftFallbackWarning(UserWarning):
    """LoRA layers (or calls) of a PeftModel that run PEFT's forward instead of fastlora's fused ops."""


# -- the fastlora subclasses of PEFT's layer classes ------------------------------------

# The fastlora class name -> (module, name) of the PEFT layer class it extends, and its kind.
_KINDS = {
    "FusedLoraLinear": ("peft.tuners.lora.layer", "Linear", "lora"),
    "FusedLoraLinear4bit": ("peft.tuners.lora.bnb", "Linear4bit", "lora4bit"),
    "FusedSVDLinear": ("peft.tuners.adalora.layer", "SVDLinear", "adalora"),
}
_CACHE_KEYS = ("_fastlora_cache", "_fastlora_calls")  # runtime state: not pickled, not deep-copied


class _FusedForward:
    """The forward shared by the fastlora subclasses of PEFT's layer classes
    (first in their MRO; ``super()`` is the PEFT class)."""

    def forward(self, x, *args, **kwargs):
        plan = _call_plan(self, x, args, kwargs)
        if type(plan) is str:
            _count(self, plan)
            return super().forward(x, *args, **kwargs)
        _count(self, FUSED)
        return _run_mixed(self, x, plan) if type(plan) is _MixedPlan else _run(self, x, plan)

    def __getstate__(self):
        state = dict(super().__getstate__())
        for key in _CACHE_KEYS:
            state.pop(key, None)
        return state


def _fused_class(peft_cls: type) -> type | None:
    """The fastlora subclass of ``peft_cls`` (built once), or None for a class fastlora does not run."""
    if issubclass(peft_cls, _FusedForward):
        return peft_cls
    for name, (module, cls_name, _) in _KINDS.items():
        if peft_cls.__module__ == module and peft_cls.__name__ == cls_name:
            return _build(name)
    return None


def _build(name: str) -> type:
    cls = globals().get(name)
    if cls is None:
        module, cls_name, kind = _KINDS[name]
        peft_cls = getattr(importlib.import_module(module), cls_name)
        # NOTE: the PEFT class's own metaclass (ABCMeta) builds the subclass; module and
        # qualname make it importable by name, so pickle finds it (through __getattr__).
        cls = type(peft_cls)(
            name,
            (_FusedForward, peft_cls),
            {
                "__module__": __name__,
                "__qualname__": name,
                "_fastlora_kind": kind,
                "__doc__": f"PEFT's ``{module}.{cls_name}`` running on fastlora's fused ops (see fastlora.peft_model).",
            },
        )
        globals()[name] = cls
    return cls


def __getattr__(name: str):
    # Unpickling a fused layer in a fresh process looks its class up by name.
    if name in _KINDS:
        return _build(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- counting ---------------------------------------------------------------------------

_COUNTS: collections.Counter = collections.Counter()
_WARNED: set = set()


def _count(layer, what: str) -> None:
    if torch.compiler.is_compiling():  # NOTE: no Python side effects inside a compiled graph
        return
    _COUNTS[what] += 1
    calls = layer.__dict__.get("_fastlora_calls")
    if calls is None:
        calls = layer.__dict__["_fastlora_calls"] = collections.Counter()
    calls[what] += 1
    if what != FUSED and what not in BASE_ONLY and what not in _WARNED:
        _WARNED.add(what)
        warnings.warn(
            f"fastlora: a LoRA layer ({type(layer).__name__}) ran PEFT's forward instead of the fused op: {what}. "
            "fastlora.peft_model.fallback_counts() counts such calls.",
            PeftFallbackWarning,
            stacklevel=3,
        )


def fallback_counts(model: nn.Module | None = None) -> dict[str, int]:
    """How many LoRA layer calls ran fused and how many ran PEFT's forward, per reason.

    ``{"fused": n, "<reason>": m, ...}``: over every call since the process
    started (or :func:`reset_fallback_counts`) when ``model`` is None, else
    summed over the layers of ``model`` (one count per layer call; a deep copy
    or an unpickled model starts from zero). Reasons in :data:`BASE_ONLY` are
    calls where PEFT runs the base layer alone (adapters disabled or merged).
    Calls inside a ``torch.compile``d graph are not counted.
    """
    if model is None:
        total = collections.Counter(_COUNTS)
    else:
        total = collections.Counter()
        for module in model.modules():
            total.update(module.__dict__.get("_fastlora_calls", {}))
    return {FUSED: total.pop(FUSED, 0), **dict(sorted(total.items()))}


def reset_fallback_counts(model: nn.Module | None = None) -> None:
    """Zero the counts of :func:`fallback_counts` (the global ones, or those of ``model``'s layers)."""
    if model is None:
        _COUNTS.clear()
        return
    for module in model.modules():
        module.__dict__.pop("_fastlora_calls", None)


# -- what a call needs ------------------------------------------------------------------


class _Term(NamedTuple):
    """One active adapter's update: ``scaling * (D(x) A^T B^T + lora_bias)``; DoRA when ``magnitude`` is set."""

    lora_A: Tensor  # [r, K] (AdaLoRA: E * A / (ranknum + 1e-5))
    lora_B: Tensor  # [N, r]
    scaling: float | Tensor  # a Python float, or a 0-d tensor (compiled hot-swap)
    dropout: float  # the probability in effect (0 in eval)
    lora_bias: Tensor | None  # [N] (PEFT's lora_bias=True: lora_B's bias)
    magnitude: Tensor | None  # [N] (DoRA's lora_magnitude_vector)


class _Plan(NamedTuple):
    weight: Tensor | None  # [N, K] dense base weight (a transposed view for Conv1D); None on a 4-bit base
    bias: Tensor | None
    terms: list


# NOTE: this runs at every call of every layer, so it reads submodules and
# parameters from ``_modules`` / ``_parameters`` (nn.Module.__getattr__ costs
# about a microsecond per lookup) and PEFT's state from its public properties.
# The global hook registries are dicts torch mutates in place, never rebinds.
_GLOBAL_HOOK_DICTS = tuple(
    getattr(torch.nn.modules.module, name)
    for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
        "_global_backward_pre_hooks", "_global_forward_hooks_always_called",
    )
    if hasattr(torch.nn.modules.module, name)
)  # fmt: skip


def _has_hooks(module: nn.Module) -> bool:
    """Module hooks, or a forward replaced on the instance (accelerate's hooks do that)."""
    d = module.__dict__
    return bool(
        d["_forward_hooks"] or d["_forward_pre_hooks"] or d["_backward_hooks"] or d["_backward_pre_hooks"]
        or "forward" in d
    )  # fmt: skip


def _is_linear(module: nn.Module) -> bool:
    """An nn.Linear, or a subclass that keeps its forward (``F.linear(x, self.weight, self.bias)``),
    e.g. a parametrized one or MultiheadAttention's out_proj."""
    cls = type(module)
    return cls is nn.Linear or (isinstance(module, nn.Linear) and cls.forward is nn.Linear.forward)


def _base_tensors(base: nn.Module) -> tuple:
    """The dense base layer's (weight, bias) as its forward reads them."""
    if type(base) is nn.Linear:
        params = base._parameters
        return params["weight"], params["bias"]
    return base.weight, base.bias  # NOTE: a parametrization computes its weight here


def _is_conv1d(module: nn.Module) -> bool:
    """A transformers ``Conv1D`` (GPT-2's linear layer: weight [in, out], ``y = x W + b``)."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__ == "transformers.pytorch_utils"


def _cache(layer) -> dict:
    cache = layer.__dict__.get("_fastlora_cache")
    if cache is None:
        cache = layer.__dict__["_fastlora_cache"] = {}
    return cache


def _scaling(value) -> float | Tensor | str:
    """The adapter's scale: a Python float, a 0-d tensor, or why it is neither.

    PEFT's ``prepare_model_for_compiled_hotswap`` makes scalings 0-d tensors
    (filled in place on a swap, so a compiled graph is not rebuilt); they are
    folded into lora_B at call time (:func:`_fold_scaling`): no device sync, no
    graph break, and the next swap is seen."""
    if type(value) is float or type(value) is int:
        return float(value)
    if isinstance(value, Tensor):
        if value.numel() != 1 or not value.is_floating_point():
            return f"tensor scaling of shape {tuple(value.shape)} and dtype {value.dtype}"
        return value.reshape(())
    if isinstance(value, float):  # a float subclass (numpy.float64)
        return float(value)
    return f"scaling of type {type(value).__name__}"


def _dropout_p(drop: nn.Module) -> float | str:
    cls = type(drop)
    if cls is nn.Identity:
        return 0.0
    if cls is nn.Dropout and not drop.inplace:
        return float(drop.p) if drop.training else 0.0
    return f"dropout module {cls.__name__}"


def _base_problem(layer, base: nn.Module) -> str | None:
    """Why the base layer's forward is not ``x W^T + b`` on the tensors we read."""
    kind = type(layer)._fastlora_kind
    if is_bnb_4bit(base):
        if kind == "adalora":
            return f"base layer type {type(base).__name__}"
        if getattr(base.weight, "quant_state", None) is None:
            return "bitsandbytes weight not quantized yet"
    elif kind == "lora4bit" or not (_is_linear(base) or _is_conv1d(base)):
        return f"base layer type {type(base).__name__}"
    else:
        weight = _base_tensors(base)[0]
        if type(weight) is not nn.Parameter and type(weight) is not Tensor:
            return f"base weight of type {type(weight).__name__}"  # a tensor subclass: F.linear dispatches on it
        if weight.dim() != 2:
            return f"base weight of shape {tuple(weight.shape)}"
    if "base_layer" in base._modules:
        return "nested adapter layers"
    if "forward" in base.__dict__:
        return "base layer forward replaced (e.g. accelerate hooks)"
    if _has_hooks(base):
        return "hooks on the base layer"
    if any(_GLOBAL_HOOK_DICTS):
        return "global module hooks"
    return None


def _variant_kind(variant) -> str | None:
    """None for plain LoRA (no variant, or MiCA: a plain LoRA forward), "dora", else the reason."""
    if variant is None:
        return None
    cls = type(variant)
    if cls.__module__ == "peft.tuners.lora.variants":
        if cls.__name__ == "MiCALinearVariant":
            return None
        if cls.__name__ == "DoraLinearVariant":
            return "dora"
    return f"LoRA variant {cls.__name__}"


def _lora_term(layer, adapter: str, base) -> _Term | str:
    """peft.tuners.lora: ``lora_B(lora_A(dropout(x))) * scaling`` (or a variant)."""
    kind = _variant_kind(layer.lora_variant.get(adapter))
    if kind is not None and kind != "dora":
        return kind
    modules = layer._modules
    mod_A, mod_B = modules["lora_A"]._modules[adapter], modules["lora_B"]._modules[adapter]
    drop = modules["lora_dropout"]._modules[adapter]
    if type(mod_A) is not nn.Linear or type(mod_B) is not nn.Linear or mod_A._parameters["bias"] is not None:
        return f"adapter modules {type(mod_A).__name__}/{type(mod_B).__name__}"
    if _has_hooks(mod_A) or _has_hooks(mod_B) or _has_hooks(drop):
        return "hooks on adapter modules"
    p = _dropout_p(drop)
    if type(p) is str:
        return p
    s = _scaling(layer.scaling[adapter])
    if type(s) is str:
        return s
    lora_bias = mod_B._parameters["bias"]
    magnitude = None
    if kind == "dora":
        mag = modules["lora_magnitude_vector"]._modules.get(adapter)
        if mag is None or type(mag).__name__ != "DoraLinearLayer" or _has_hooks(mag):
            return "DoRA magnitude module"
        if lora_bias is not None:
            return "DoRA with lora_bias"
        if is_bnb_4bit(base):
            return "DoRA on a 4-bit base"
        if mag.fan_in_fan_out != _is_conv1d(base):
            return "DoRA with fan_in_fan_out on an nn.Linear base"
        if type(drop) is nn.Dropout and drop.p > 0 and (layer.training or drop.training):
            # PEFT 0.21 then runs the base GEMM on the dropped-out input too (see fastlora.dora)
            return "DoRA with dropout in training"
        magnitude = mag._parameters["weight"]
    return _Term(mod_A._parameters["weight"], mod_B._parameters["weight"], s, p, lora_bias, magnitude)


def _adalora_term(layer, adapter: str) -> _Term | str:
    """peft.tuners.adalora: ``(dropout(x) @ (A * E).T @ B.T) * scaling / (ranknum + 1e-5)``."""
    modules = layer._modules
    lora_A, lora_E = modules["lora_A"]._parameters[adapter], modules["lora_E"]._parameters[adapter]
    lora_B, ranknum = modules["lora_B"]._parameters[adapter], modules["ranknum"]._parameters[adapter]
    drop = modules["lora_dropout"]._modules[adapter]
    if lora_A.shape[0] == 0:
        return "AdaLoRA rank 0"
    if lora_E.shape != (lora_A.shape[0], 1) or ranknum.numel() != 1:
        return "AdaLoRA tensors of unexpected shapes"
    if _has_hooks(drop):
        return "hooks on adapter modules"
    p = _dropout_p(drop)
    if type(p) is str:
        return p
    s = _scaling(layer.scaling[adapter])
    if type(s) is str:
        return s
    # NOTE: E and PEFT's denominator (ranknum + 1e-5, formed in ranknum's dtype) fold into
    # A: an [r, K] temporary, tensor ops only (no device sync, nothing to guard under compile)
    return _Term(lora_A * lora_E / (ranknum + 1e-5), lora_B, s, p, None, None)


def _plan(layer, x) -> _Plan | str:
    """What one call of ``layer`` on ``x`` runs (x None: the layer's state alone), or
    why it must run PEFT's forward."""
    if layer.disable_adapters:
        return BASE_ONLY[0]
    if layer.merged:
        return BASE_ONLY[1]
    base = layer._modules["base_layer"]
    problem = _base_problem(layer, base)
    if problem is not None:
        return problem
    lora_A = layer._modules["lora_A"]
    present = lora_A._parameters if type(layer)._fastlora_kind == "adalora" else lora_A._modules
    active = [a for a in layer.active_adapters if a in present]
    if not active:
        return BASE_ONLY[2]
    weight, bias, out_features, in_features = _plan_base(base)
    adalora = type(layer)._fastlora_kind == "adalora"
    terms = []
    for adapter in active:
        term = _adalora_term(layer, adapter) if adalora else _lora_term(layer, adapter, base)
        if type(term) is str:
            return term
        problem = _shape_problem(term, out_features, in_features)
        if problem is not None:
            return problem
        terms.append(term)
    dtype = terms[0].lora_A.dtype
    if len(terms) > 1:
        if any(t.magnitude is not None for t in terms):
            # PEFT's DoRA rescales everything added before it (the earlier adapters' terms too)
            return "DoRA with several active adapters"
        if any(t.lora_A.dtype != dtype or t.lora_B.dtype != dtype for t in terms):
            return "adapters of different dtypes"
    elif terms[0].lora_B.dtype != dtype:
        return "adapters of different dtypes"
    plan = _Plan(weight, bias, terms)
    if x is not None:
        problem = _input_problem(layer, x, base, dtype) or _device_problem(x, plan)
        if problem is not None:
            return problem
    return plan


def _plan_base(base) -> tuple:
    """``(weight [N, K] or None on a 4-bit base, bias, N, K)``; Conv1D's weight [K, N] as a transposed view."""
    if is_bnb_4bit(base):
        out_features, in_features = base.weight.quant_state.shape
        return None, base.bias, out_features, in_features
    weight, bias = _base_tensors(base)
    if _is_conv1d(base):
        weight = weight.t()
    return (weight, bias, *weight.shape)


def _shape_problem(term: _Term, out_features: int, in_features: int) -> str | None:
    for t in (term.lora_A, term.lora_B):
        if type(t) is not nn.Parameter and type(t) is not Tensor:
            return f"adapter weight of type {type(t).__name__}"
    a, b = term.lora_A.shape, term.lora_B.shape
    if len(a) != 2 or a[1] != in_features or len(b) != 2 or b[0] != out_features or b[1] != a[0]:
        return "adapter shapes do not fit the base layer"
    return None


def _input_problem(layer, x, base, adapter_dtype: torch.dtype, check_casting: bool = True) -> str | None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        return "input is not a floating-point tensor"
    if torch.is_autocast_enabled(x.device.type):
        return None  # every operand is cast to the autocast dtype, as PEFT's layers get them
    if is_bnb_4bit(base):
        base_dtype = getattr(base, "compute_dtype", None) or x.dtype
    else:
        base_dtype = _base_tensors(base)[0].dtype
        if x.dtype != base_dtype:
            return f"input dtype {x.dtype} on a {base_dtype} base weight"
    if adapter_dtype is not base_dtype and adapter_dtype is not torch.float32:
        return f"{adapter_dtype} adapters on a {base_dtype} base"
    if check_casting and adapter_dtype is not x.dtype and not layer.cast_input_dtype_enabled:
        return "input dtype casting disabled"
    return None


def _device_problem(x: Tensor, plan: _Plan) -> str | None:
    device = x.device
    for t in (plan.weight, plan.bias):
        if t is not None and t.device != device:
            return f"a tensor on {t.device}, the input on {device}"
    for term in plan.terms:
        for t in (term.lora_A, term.lora_B, term.magnitude, term.lora_bias):
            if t is not None and t.device != device:
                return f"a tensor on {t.device}, the input on {device}"
    return None


def _call_plan(layer, x, args, kwargs) -> _Plan | _MixedPlan | str:
    """The plan of one call ``layer(x, *args, **kwargs)``, or why PEFT's forward runs it."""
    adapter_names = None
    if kwargs:
        adapter_names = kwargs.get("adapter_names")
        if kwargs.get("alora_offsets") is not None:
            return "alora_offsets (aLoRA)"
        if any(k != "adapter_names" and k != "alora_offsets" for k in kwargs):
            return "extra forward arguments"
    if args:
        return "extra forward arguments"
    if adapter_names is not None:
        return _mixed_plan(layer, x, adapter_names)
    return _plan(layer, x)


class _MixedPlan(NamedTuple):
    """``adapter_names=`` (PEFT's mixed batch): row groups of x and the term each runs (None: the base alone)."""

    weight: Tensor | None
    bias: Tensor | None
    groups: list  # [(row indices, _Term | None)]


def _mixed_plan(layer, x, adapter_names) -> _MixedPlan | str:
    """PEFT's ``_mixed_batch_forward``: row i of x runs adapter ``adapter_names[i]``
    ("__base__", or an adapter this layer lacks: the base layer alone)."""
    if layer.disable_adapters:
        return BASE_ONLY[0]  # PEFT ignores adapter_names then
    if type(layer)._fastlora_kind == "adalora":
        return "adapter_names (mixed batch) on AdaLoRA"
    if layer.merged:
        return "adapter_names with merged adapters"  # PEFT raises its error
    if not isinstance(x, Tensor) or x.dim() < 2 or len(adapter_names) != x.shape[0]:
        return "adapter_names of the wrong length"  # PEFT raises its error
    base = layer._modules["base_layer"]
    problem = _base_problem(layer, base)
    if problem is not None:
        return problem
    rows: dict = {}
    for i, name in enumerate(adapter_names):
        rows.setdefault(name, []).append(i)
    present = layer._modules["lora_A"]._modules
    weight, bias, out_features, in_features = _plan_base(base)
    groups = []
    for name, idx in rows.items():
        term = None
        if name != "__base__" and name in present:
            term = _lora_term(layer, name, base)
            if type(term) is str:
                return term
            if term.magnitude is not None:
                return "adapter_names with DoRA"  # PEFT raises its error
            if term.lora_A.dtype != term.lora_B.dtype:
                return "adapters of different dtypes"
            problem = (
                _shape_problem(term, out_features, in_features)
                # NOTE: PEFT's mixed batch casts the rows to the adapters' dtype even with casting disabled
                or _input_problem(layer, x, base, term.lora_A.dtype, check_casting=False)
                or _device_problem(x, _Plan(weight, bias, [term]))
            )
            if problem is not None:
                return problem
        groups.append((idx, term))
    return _MixedPlan(weight, bias, groups)


# -- running it -------------------------------------------------------------------------


def _weight_sq(layer, weight: Tensor, dtype: torch.dtype) -> Tensor:
    """||W_n||^2 [N] for DoRA, cached on the layer while the base weight is unchanged."""
    if torch.compiler.is_compiling():
        return weight_sq_norm(weight, dtype)
    try:
        key = (weight.data_ptr(), weight._version, tuple(weight.shape), weight.dtype, weight.device, dtype)
    except RuntimeError:  # inference tensors have no version counter
        return weight_sq_norm(weight, dtype)
    cache = _cache(layer)
    hit = cache.get("weight_sq")
    if hit is None or hit[0] != key:
        hit = cache["weight_sq"] = (key, weight_sq_norm(weight, dtype))
    return hit[1]


def _quantized(layer, base) -> QuantizedWeight:
    """bitsandbytes' 4-bit weight as a QuantizedWeight (its tensors shared, not copied),
    rebuilt when bitsandbytes replaces the weight or its quant state."""
    param = base.weight
    cache = _cache(layer)
    hit = cache.get("qweight")
    if hit is None or hit[0] is not param or hit[1] is not param.quant_state or hit[2] != param.data.data_ptr():
        qweight = QuantizedWeight.from_bnb(base)  # may undo bitsandbytes' CPU repack (new data, new quant state)
        hit = cache["qweight"] = (param, param.quant_state, param.data.data_ptr(), qweight)
    return hit[3]


def _split_terms(terms: list) -> tuple[_Term, list, list]:
    """``(fused, biases, extra)``: the term the fused op runs, the terms whose
    ``scaling * lora_bias`` is added after it, and the terms added after it whole.

    Adapters without dropout in effect become one: ``sum_i s_i D(x) A_i^T B_i^T =
    D(x) [A_1; ...; A_n]^T [s_1 B_1, ..., s_n B_n]^T`` (the same math; the fused op
    runs once at rank sum r_i). Adapters with dropout keep PEFT's independent
    masks: the first runs in the fused op, the others as PEFT computes them.
    """
    if len(terms) == 1:
        fused, extra = _fold_scaling(terms[0]), []
    elif all(t.dropout == 0.0 for t in terms):
        lora_A = torch.cat([t.lora_A for t in terms], dim=0)
        lora_B = torch.cat([t.lora_B * t.scaling for t in terms], dim=1)
        biases = [t for t in terms if t.lora_bias is not None]
        return _Term(lora_A, lora_B, 1.0, 0.0, None, None), biases, []
    else:
        fused, extra = _fold_scaling(terms[0]), terms[1:]
    return fused, [fused] if fused.lora_bias is not None else [], extra


def _fold_scaling(term: _Term) -> _Term:
    """A tensor scaling folded into lora_B (and lora_bias): the fused ops take a Python float."""
    s = term.scaling
    if not isinstance(s, Tensor):
        return term
    bias = None if term.lora_bias is None else term.lora_bias * s
    return term._replace(lora_B=term.lora_B * s, scaling=1.0, lora_bias=bias)


def _run(layer, x: Tensor, plan: _Plan) -> Tensor:
    """PEFT's ``base_layer(x) + sum over active adapters of their terms``, the base GEMM
    and (at least) one adapter in one fused op."""
    base = layer.base_layer
    fused, biases, extra = _split_terms(plan.terms)
    training = fused.dropout > 0.0
    if plan.weight is None:  # a bitsandbytes 4-bit base
        # bitsandbytes computes in its compute_dtype and returns x's dtype; so do we.
        autocast = torch.is_autocast_enabled(x.device.type)
        dtype = torch.get_autocast_dtype(x.device.type) if autocast else (getattr(base, "compute_dtype", None) or x.dtype)

        def cast(t):
            return t if t is None or t.dtype == dtype else t.to(dtype)

        lora_A, lora_B = fused.lora_A, fused.lora_B
        if lora_A.dtype != torch.float32:  # fp32 adapters run the LoRA branch in fp32, as in PEFT
            lora_A, lora_B = cast(lora_A), cast(lora_B)
        y = qlora_linear(
            cast(x), _quantized(layer, base), lora_A, lora_B, fused.scaling, cast(plan.bias),
            dropout=fused.dropout, training=training,
        )  # fmt: skip
        y = y if y.dtype == x.dtype else y.to(x.dtype)
    elif fused.magnitude is not None:
        acc = torch.float64 if torch.float64 in (plan.weight.dtype, fused.lora_A.dtype) else torch.float32
        y = dora_linear(
            x, plan.weight, fused.lora_A, fused.lora_B, fused.magnitude, fused.scaling, plan.bias,
            dropout=fused.dropout, training=training, weight_sq=_weight_sq(layer, plan.weight, acc),
        )  # fmt: skip
    else:
        y = lora_linear(
            x, plan.weight, fused.lora_A, fused.lora_B, fused.scaling, plan.bias, dropout=fused.dropout, training=training
        )
    out_dtype = y.dtype
    for term in biases:
        y = y + term.lora_bias * term.scaling
    if extra:
        xl = x
        adapter_dtype = extra[0].lora_A.dtype
        if getattr(layer, "cast_input_dtype_enabled", True) and xl.dtype != adapter_dtype:
            xl = xl.to(adapter_dtype)
        for term in extra:  # PEFT's own computation, each adapter with its own dropout mask
            h = F.dropout(xl, term.dropout, training=True) if term.dropout > 0.0 else xl
            y = y + F.linear(F.linear(h, term.lora_A), term.lora_B, term.lora_bias) * term.scaling
    return y if y.dtype == out_dtype else y.to(out_dtype)


def _run_mixed(layer, x: Tensor, plan: _MixedPlan) -> Tensor:
    """PEFT's mixed batch: each group of rows through the fused op with its adapter
    (the base layer alone for "__base__"), written into one output."""
    out = None
    for idx, term in plan.groups:
        if len(plan.groups) == 1:
            index, rows = None, x
        else:
            index = torch.tensor(idx, device=x.device)
            rows = x.index_select(0, index)
        if term is None:
            y = layer._modules["base_layer"](rows)
        else:
            y = _run(layer, rows, _Plan(plan.weight, plan.bias, [term]))
        if index is None:
            return y
        if out is None:
            out = y.new_empty((x.shape[0], *y.shape[1:]))
        out.index_copy_(0, index, y if y.dtype == out.dtype else y.to(out.dtype))
    return out


# -- the entry point --------------------------------------------------------------------


def from_peft(peft_model: nn.Module, *, warn: bool = True) -> dict[str, list]:
    """Run the LoRA layers of a ``peft.PeftModel`` on fastlora's fused ops, in place.

    Every LoRA layer of a kind fastlora runs (PEFT's ``lora.Linear`` on an
    ``nn.Linear``, a transformers ``Conv1D`` or a bitsandbytes ``Linear4bit``;
    PEFT's bitsandbytes ``lora.Linear4bit``; AdaLoRA's ``SVDLinear``) becomes an
    instance of a fastlora subclass of its class whose forward checks, at every
    call, that everything in effect is something fastlora computes as PEFT does:
    plain LoRA, rsLoRA, ``lora_bias``, DoRA (without dropout in training), MiCA,
    AdaLoRA, several active adapters (summed), ``adapter_names=`` mixed batches,
    tensor scalings (PEFT's compiled hot-swap), fp32 adapters on a half-precision
    base, dropout (fastlora's own masks: the same distribution, not PEFT's
    random numbers). Anything else (other LoRA variants such as KaSA, VeLoRA,
    MonteCLoRA, BD-LoRA, aLoRA, Arrow; hooks on the base layer or global hooks;
    DoRA with dropout in training, DoRA on a 4-bit base or with other active
    adapters; ...) runs PEFT's own forward, counted per reason
    (:func:`fallback_counts`) and warned about once per reason
    (:class:`PeftFallbackWarning`). Adapter switching, ``disable_adapter()``,
    adding and deleting adapters, merging, ``save_pretrained``, deep copies and
    pickling keep working; layers on a bitsandbytes 4-bit base run
    :func:`fastlora.qlora_linear` on bitsandbytes' own packed weight (shared).
    Layers of other kinds (LoRA on Embedding / Conv layers, other PEFT tuners)
    are left alone and reported.

    Returns ``{"accelerated": [module names], "skipped": [(name, reason)]}`` for the
    model's state now (a skipped layer of a kind fastlora runs is re-checked at
    every call, so it runs fused once its state fits). With ``warn`` (default),
    one :class:`PeftFallbackWarning` summarises the skipped layers by reason when
    any layer is skipped or none is accelerated. Calling it again is harmless
    (and picks up layers PEFT created since).
    """
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError as exc:  # pragma: no cover - only without peft
        raise ImportError("from_peft needs peft installed") from exc
    report: dict[str, list] = {"accelerated": [], "skipped": []}
    for name, module in peft_model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        cls = _fused_class(type(module))
        if cls is None:
            kind = f"{type(module).__module__.removeprefix('peft.tuners.').split('.')[0]}.{type(module).__name__}"
            report["skipped"].append((name, f"layer type {kind} (no fused op for it in fastlora yet)"))
            continue
        if "_fastlora_original_forward" in module.__dict__:  # patched by an earlier fastlora (a closure)
            module.__dict__.pop("forward", None)
            del module.__dict__["_fastlora_original_forward"]
        if "forward" in module.__dict__:
            report["skipped"].append((name, "forward replaced on the layer instance (e.g. accelerate hooks)"))
            continue
        module.__class__ = cls
        reason = _plan(module, None)
        if isinstance(reason, str):
            report["skipped"].append((name, reason))
        else:
            report["accelerated"].append(name)
    if warn and (report["skipped"] or not report["accelerated"]):
        _warn_summary(report)
    return report


def _warn_summary(report: dict) -> None:
    n_acc, skipped = len(report["accelerated"]), report["skipped"]
    if not n_acc and not skipped:
        message = "fastlora.from_peft: the model has no PEFT adapter layers; nothing was accelerated"
    else:
        by_reason = collections.Counter(reason for _, reason in skipped)
        summary = "; ".join(f"{n} x {reason}" for reason, n in by_reason.most_common())
        message = (
            f"fastlora.from_peft: {n_acc} of {n_acc + len(skipped)} adapter layers run on fastlora's fused ops; "
            f"{len(skipped)} run PEFT's forward: {summary} (layers of a kind fastlora runs are re-checked at every call)"
        )
    warnings.warn(message, PeftFallbackWarning, stacklevel=3)


__all__ = ["BASE_ONLY", "FUSED", "PeftFallbackWarning", "fallback_counts", "from_peft", "reset_fallback_counts"]
