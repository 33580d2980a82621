"""nn.Linear drop-ins with LoRA adapters: :class:`LoRALinear`, and the named
adapters that it and :class:`fastlora.QLoRALinear` share (:class:`NamedAdapters`).

Named adapters (PEFT's multi-adapter layers): the first adapter is
``"default"`` and lives in the layer's own attributes (``lora_A``, ``lora_B``,
``r``, ``alpha``, ``scaling``, ``dropout``, ``use_rslora``: state-dict keys
``lora_A`` / ``lora_B``, as before); every other adapter is a
:class:`LoRAAdapter` in the ``nn.ModuleDict`` ``lora_adapters`` (state-dict keys
``lora_adapters.<name>.lora_A`` [r, in] and ``lora_adapters.<name>.lora_B``
[out, r]). The model-level API is :mod:`fastlora.adapters`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import LORA, lora_linear
from .multi import lora_linear_multi
from .validation import INITS, check_init, check_lora_hyperparameters, lora_scaling, pissa_niter

_LORA_CALL = LORA.call  # LORA(...) with one attribute read and a slot dispatch fewer (see FusedOp.call)

DEFAULT_ADAPTER = "default"  # the adapter in the layer's own attributes (PEFT's first adapter name)
BASE_ONLY = "__base__"  # PEFT's adapter_names entry for rows that get the base layer alone
_DEFAULT_ONLY = [DEFAULT_ADAPTER]


def check_adapter_name(name, what: str = "adapter_name") -> str:
    """A usable adapter name: a non-empty string without ``"."`` (an nn.ModuleDict
    key, as PEFT's), never ``"__base__"`` (PEFT's marker for the base layer)."""
    if not isinstance(name, str) or not name or "." in name or name == BASE_ONLY:
        raise ValueError(
            f"{what} must be a non-empty string without '.' and other than {BASE_ONLY!r} (PEFT's marker for the base "
            f"layer), got {name!r}"
        )
    return name


def _lora_parameters(layer: nn.Module) -> tuple:
    """``(weight, lora_A, lora_B, bias)`` of a LoRA layer (each a Parameter or None).

    NOTE: ``layer.weight`` reaches ``nn.Module.__getattr__`` only after the normal
    lookup has failed and formatted an AttributeError: 0.55 us against 0.04 us for the
    dict read, four times per LoRA call (`python -m timeit -s "import fastlora; l =
    fastlora.LoRALinear(64, 64)" "l.weight"`, then "l._parameters['weight']"). A name
    moved out of ``_parameters`` (``torch.nn.utils.parametrize`` does) is read the normal way."""
    params = layer._parameters
    try:
        return params["weight"], params["lora_A"], params["lora_B"], params["bias"]
    except KeyError:
        return layer.weight, layer.lora_A, layer.lora_B, layer.bias


def _warn_merged_training(layer: nn.Module) -> None:
    """Once per layer: training a merged layer gives its adapters no gradient."""
    if not layer.__dict__.get("_warned_merged_training", False):
        layer.__dict__["_warned_merged_training"] = True
        warnings.warn(
            f"{type(layer).__name__} is merged (the update is in its weight): in training its adapters receive no "
            "gradient. Call unmerge() (or fastlora.unmerge_lora(model)) before training, or eval() for inference.",
            UserWarning,
            stacklevel=3,
        )


class LoRAAdapter(nn.Module):
    """One named LoRA adapter of a layer (every adapter but ``"default"``).

    ``lora_A`` [r, in], ``lora_B`` [out, r] and the hyperparameters ``r``,
    ``alpha``, ``dropout``, ``use_rslora``, ``scaling`` (``alpha / r``, or
    ``alpha / sqrt(r)``), the same names the layer uses for its default adapter.
    Initialised as PEFT does (``"default"``: A kaiming-uniform a=sqrt(5);
    ``"gaussian"``: A ~ N(0, 1/r); B = 0 in both).
    """

    def __init__(
        self, in_features: int, out_features: int, *, r: int = 8, alpha: float = 8.0, dropout: float = 0.0,
        use_rslora: bool = False, init: str = "default", device=None, dtype=None,
    ) -> None:  # fmt: skip
        super().__init__()
        check_lora_hyperparameters(r, alpha, dropout)
        if check_init(init) not in ("default", "gaussian"):
            raise NotImplementedError(
                f"LoRAAdapter(init={init!r}): PiSSA / OLoRA rewrite the base weight, which the layer's other adapters "
                "share; a named adapter supports init='default' and init='gaussian'"
            )
        self._set_hyperparameters(r, alpha, dropout, use_rslora)
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, device=device, dtype=dtype))
        self.reset_parameters(init)

    def _set_hyperparameters(self, r: int, alpha: float, dropout: float, use_rslora: bool) -> None:
        self.r = r
        self.alpha = float(alpha)
        self.dropout = float(dropout)
        self.use_rslora = bool(use_rslora)
        self.scaling = lora_scaling(r, alpha, use_rslora)

    @classmethod
    def from_parameters(
        cls, lora_A: nn.Parameter, lora_B: nn.Parameter, *, alpha: float, dropout: float, use_rslora: bool
    ) -> "LoRAAdapter":
        """An adapter around existing parameters (shared, not copied: an optimizer
        holding them keeps working)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._set_hyperparameters(lora_A.shape[0], alpha, dropout, use_rslora)
        self.lora_A = lora_A
        self.lora_B = lora_B
        return self

    @torch.no_grad()
    def reset_parameters(self, init: str = "default") -> None:
        if init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def extra_repr(self) -> str:
        return (
            f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}, dropout={self.dropout:g}"
            + (", rslora=True" if self.use_rslora else "")
        )


def rows_forward(x: Tensor, adapter_ids: Tensor, n_adapters: int, run, base) -> Tensor:
    """A mixed batch, one adapter per row of x's first dimension: ``y[m] =
    run(x[m], a)`` for ``a = adapter_ids[m] >= 0``, ``base(x[m])`` for ``-1``.

    One call per adapter that has rows (PEFT loops the same way): what
    :meth:`NamedAdapters._mixed_batch_forward` runs where the multi-adapter op
    ``fastlora.lora_linear_multi`` (the same ids, ``-1`` = base only) cannot
    express the batch.
    """
    out = None
    for a in range(-1, n_adapters):
        rows = (adapter_ids == a).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        y = base(x[rows]) if a < 0 else run(x[rows], a)
        if out is None:
            out = y.new_empty(*x.shape[:-1], y.shape[-1])
        out.index_copy_(0, rows, y)
    return base(x) if out is None else out


def stack_adapters(slots, device=None) -> tuple[Tensor, Tensor, Tensor]:
    """``(lora_A [n, r, K], lora_B [n, N, r], scaling [n] float32)`` of n adapters
    (objects with ``lora_A`` [r_i, K], ``lora_B`` [N, r_i], ``scaling``), each
    zero-padded to the largest rank r: the operands of ``lora_linear_multi``.

    Exact: a padded row of A gives a zero column of ``S = x A^T``, which meets a
    zero column of B. Built with ``F.pad`` and ``torch.stack`` of the parameters
    themselves, so autograd gives each adapter its own block of the gradient (the
    padding's gradient is dropped). The scales are rounded once to float32 (what
    the op takes)."""
    r = max(s.lora_A.shape[0] for s in slots)
    lora_A = torch.stack([F.pad(s.lora_A, (0, 0, 0, r - s.lora_A.shape[0])) for s in slots])
    lora_B = torch.stack([F.pad(s.lora_B, (0, r - s.lora_B.shape[1])) for s in slots])
    scaling = torch.tensor([float(s.scaling) for s in slots], dtype=torch.float32, device=device)
    return lora_A, lora_B, scaling


class NamedAdapters:
    """Several named LoRA adapters on one linear layer, as PEFT's LoRA layers hold them.

    The default adapter is the layer's own ``lora_A`` / ``lora_B`` / ``r`` /
    ``alpha`` / ``scaling`` / ``dropout`` / ``use_rslora`` (all None once the
    default adapter is deleted, or when the layer was built for another name);
    the others are :class:`LoRAAdapter` modules in ``self.lora_adapters``.

    ``active_adapters``: the adapters the forward uses (their updates summed, as
    PEFT's; names this layer lacks are skipped); ``disable_adapters``: the base
    layer alone; ``merged_adapters``: what :meth:`merge` added into the weight.

    A layer class provides ``_fused(x, lora_A, lora_B, scaling, dropout)`` (one
    fused call: base + one LoRA term), ``_base_forward(x)``, ``_acc_dtype()``
    and ``_unmerge_for_disable()``; optionally ``_fused_multi`` (a mixed batch in
    one call, see :meth:`_mixed_batch_forward`).
    """

    lora_A: nn.Parameter | None
    lora_B: nn.Parameter | None

    def _init_named_adapters(self) -> None:
        self.lora_adapters = nn.ModuleDict()
        self.active_adapters = [DEFAULT_ADAPTER]
        self.disable_adapters = False
        self.merged_adapters: list[str] = []

    def __setstate__(self, state: dict) -> None:
        # NOTE: a layer pickled whole before named adapters existed has none of their state
        super().__setstate__(state)
        if "active_adapters" not in self.__dict__:
            self._init_named_adapters()

    # -- what the layer holds ------------------------------------------------------
    def adapter_names(self) -> list[str]:
        """This layer's adapters: ``"default"`` (if present) first, then the others in insertion order."""
        names = [DEFAULT_ADAPTER] if self.lora_A is not None else []
        return names + list(self.lora_adapters.keys())

    def has_adapter(self, name: str) -> bool:
        return (self.lora_A is not None) if name == DEFAULT_ADAPTER else name in self.lora_adapters

    def adapter(self, name: str):
        """The object holding adapter ``name``'s ``lora_A``, ``lora_B``, ``r``, ``alpha``,
        ``scaling``, ``dropout``, ``use_rslora``: the layer itself for ``"default"``,
        its :class:`LoRAAdapter` otherwise."""
        if not self.has_adapter(name):
            raise KeyError(f"{type(self).__name__} has no adapter {name!r}; its adapters are {self.adapter_names()}")
        return self if name == DEFAULT_ADAPTER else self.lora_adapters[name]

    def _present(self, names: Sequence[str]) -> list[str]:
        return [n for n in names if self.has_adapter(n)]

    def _refuse_variant(self, what: str) -> None:
        # NOTE: DoRA subclasses (fastlora.dora) add a magnitude whose norm belongs to one
        # adapter; several named adapters on them are not defined here yet.
        if "lora_magnitude" in self._parameters:
            raise NotImplementedError(f"{what}: {type(self).__name__} is a DoRA layer; named adapters support plain LoRA layers only")

    # -- changing the adapters -----------------------------------------------------
    def add_adapter(
        self, name: str, *, r: int = 8, alpha: float = 8.0, dropout: float = 0.0, use_rslora: bool = False,
        init: str = "default", dtype: torch.dtype | None = None,
    ) -> None:  # fmt: skip
        """Add adapter ``name`` [r, in] / [out, r] on the base weight's device, in
        ``dtype`` (default: the base weight's, as PEFT creates it). PEFT's init:
        B = 0, so a fresh adapter changes no output. It is not made active and keeps
        requires_grad=True until :meth:`set_adapter` decides (the model-level
        :func:`fastlora.adapters.add_adapter` freezes it, as PEFT does)."""
        self._refuse_variant("add_adapter")
        check_adapter_name(name, "name")
        if self.has_adapter(name):
            raise ValueError(f"{type(self).__name__} already has an adapter {name!r}")
        adapter = LoRAAdapter(
            self.in_features, self.out_features, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, init=init,
            device=self._adapter_device(), dtype=dtype or self._adapter_dtype(),
        )  # fmt: skip
        self.insert_adapter(name, adapter)

    def insert_adapter(self, name: str, adapter: LoRAAdapter) -> None:
        """Attach a built :class:`LoRAAdapter` as ``name`` (``"default"`` goes into the
        layer's own attributes, sharing the adapter's parameters); the shapes are checked."""
        self._refuse_variant("insert_adapter")
        check_adapter_name(name, "name")
        if self.has_adapter(name):
            raise ValueError(f"{type(self).__name__} already has an adapter {name!r}")
        expected = ((adapter.r, self.in_features), (self.out_features, adapter.r))
        got = (tuple(adapter.lora_A.shape), tuple(adapter.lora_B.shape))
        if got != expected:
            raise ValueError(f"adapter {name!r}: lora_A/lora_B have shapes {got}, this layer needs {expected}")
        if name == DEFAULT_ADAPTER:
            self.lora_A, self.lora_B = adapter.lora_A, adapter.lora_B
            self.r, self.alpha, self.dropout = adapter.r, adapter.alpha, adapter.dropout
            self.use_rslora, self.scaling = adapter.use_rslora, adapter.scaling
        else:
            self.lora_adapters[name] = adapter

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` (and from the active set). A merged adapter is
        refused: unmerge first (PEFT refuses too)."""
        self.adapter(name)
        if self.merged and name in self.merged_adapters:
            raise ValueError(f"delete_adapter: adapter {name!r} is merged into the weight; unmerge() first")
        if name == DEFAULT_ADAPTER:
            self.lora_A = None
            self.lora_B = None
            self.r = self.alpha = self.dropout = self.use_rslora = self.scaling = None
        else:
            del self.lora_adapters[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def rename_default(self, name: str) -> None:
        """Move the default adapter to ``name`` (its parameters are moved, not copied):
        a layer built for another adapter name keeps it in ``lora_adapters``."""
        if name == DEFAULT_ADAPTER:
            return
        self._refuse_variant("rename_default")
        adapter = LoRAAdapter.from_parameters(
            self.adapter(DEFAULT_ADAPTER).lora_A, self.lora_B, alpha=self.alpha, dropout=self.dropout, use_rslora=self.use_rslora
        )
        check_adapter_name(name, "name")
        if self.has_adapter(name):
            raise ValueError(f"{type(self).__name__} already has an adapter {name!r}")
        self.delete_adapter(DEFAULT_ADAPTER)
        self.lora_adapters[name] = adapter
        self.active_adapters = [name if n == DEFAULT_ADAPTER else n for n in self.active_adapters]

    def set_adapter(self, names: str | Sequence[str], *, inference_mode: bool = False) -> None:
        """Make ``names`` the active adapters (PEFT's layer ``set_adapter``): their
        parameters require grad (unless ``inference_mode``), every other adapter's
        are frozen. Names this layer lacks are kept in the active set and skipped."""
        names = [names] if isinstance(names, str) else list(names)
        for name in self.adapter_names():
            slot = self.adapter(name)
            for p in (slot.lora_A, slot.lora_B):
                p.requires_grad_(name in names and not inference_mode)
        self.active_adapters = names

    def peft_tensors(self, adapter_name: str = DEFAULT_ADAPTER) -> dict[str, Tensor]:
        """Adapter ``adapter_name``'s entries of a PEFT adapter file, keyed relative
        to the module name (``lora_A.weight`` [r, in], ``lora_B.weight`` [out, r]);
        the live parameters, not copies."""
        slot = self.adapter(adapter_name)
        return {"lora_A.weight": slot.lora_A, "lora_B.weight": slot.lora_B}

    # -- the forward ---------------------------------------------------------------
    def _single_default(self) -> bool:
        """True when the forward is the one fused call on the default adapter (the common case)."""
        return self.active_adapters == [DEFAULT_ADAPTER] and self.lora_A is not None and not self.disable_adapters

    def _named_forward(self, x: Tensor, adapter_names: Sequence[str] | None) -> Tensor:
        if self.disable_adapters:
            if self.merged:
                self._unmerge_for_disable()  # PEFT unmerges on a disabled forward too
            return self._base_forward(x)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, adapter_names)
        if self.merged:
            return self._base_forward(x)
        return self._adapters_forward(x, self._present(self.active_adapters))

    def _adapters_forward(self, x: Tensor, names: Sequence[str]) -> Tensor:
        """``base(x) + sum_i scaling_i * dropout_i(x) A_i^T B_i^T`` (PEFT's sum over the
        active adapters, each with its own dropout).

        Without dropout (or in eval) every adapter joins one fused call: A
        concatenated along r, B likewise with each block multiplied by
        ``scaling_i / scaling_0`` (exact: the same sum of rank-1 terms). In training,
        PEFT draws an independent mask per adapter, so an adapter with dropout
        cannot share the fused call's one mask: the adapters without dropout share
        the fused call, and each one with dropout adds its own term the way PEFT
        computes it (its dropped input is then saved for backward, as in PEFT).
        Saved for backward by the fused call: X, S [M, sum r] and the concatenated
        A [sum r, K] and B [N, sum r] (adapter-sized; a single adapter's are its
        parameters, nothing new).
        """
        if not names:
            return self._base_forward(x)
        slots = [self.adapter(n) for n in names]
        if len(slots) == 1:
            s = slots[0]
            return self._fused(x, s.lora_A, s.lora_B, s.scaling, s.dropout)
        if self.training:
            shared = [s for s in slots if s.dropout == 0.0]
            groups = ([shared] if shared else []) + [[s] for s in slots if s.dropout > 0.0]
        else:
            groups = [slots]
        first, rest = groups[0], groups[1:]
        y = self._fused(x, *_concat_adapters(first))
        for (s,) in rest:
            h = x.to(s.lora_A.dtype)
            term = F.linear(F.linear(F.dropout(h, s.dropout, True), s.lora_A), s.lora_B) * s.scaling
            y = y + term.to(y.dtype)
        return y

    def _mixed_batch_forward(self, x: Tensor, adapter_names: Sequence[str]) -> Tensor:
        """PEFT's mixed batch: row ``m`` of x's first dimension gets adapter
        ``adapter_names[m]`` alone (``"__base__"``, or a name this layer lacks: the
        base layer alone), whatever the active set. Works in training too (each
        adapter's gradient is the sum over its own rows; frozen adapters stay frozen).

        A layer class that defines ``_fused_multi`` (LoRALinear, QLoRALinear) runs the
        batch in one call of the multi-adapter op (``fastlora.lora_linear_multi``,
        ``fastlora.qlora_linear_multi``): the adapters the batch uses are stacked, each
        zero-padded to the largest rank (exact: the padded rows of A and columns of B
        add 0), with ``torch.stack`` / ``F.pad`` of the parameters so that gradients
        reach each adapter's own ``lora_A`` / ``lora_B``; the scales are a float32
        tensor (each adapter's own, rsLoRA included). A batch of one adapter without
        base rows is the layer's single-adapter call. The batch runs as one call per
        adapter (:func:`rows_forward`, as PEFT loops) instead where the op cannot
        express it: a layer without ``_fused_multi``; adapters of different dtypes
        (each keeps the dtype rule of the single-adapter call); float64 adapters whose
        scale is not exact in float32 (the op's scales are float32; the single-adapter
        call keeps the exact scale, e.g. rsLoRA's ``alpha / sqrt(r)``); and in
        training, adapters of different dropout probabilities (the op draws one
        probability for every row;
        the loop gives each row exactly its own adapter's dropout)."""
        if x.dim() < 2:
            raise ValueError(
                f"adapter_names needs x with a batch dimension [batch, ..., in_features], got x of shape {tuple(x.shape)}"
            )
        if isinstance(adapter_names, str) or len(adapter_names) != x.shape[0]:
            got = repr(adapter_names) if isinstance(adapter_names, str) else f"{len(adapter_names)} names"
            raise ValueError(
                f"adapter_names must be a list with one name per row of x's first dimension ({x.shape[0]}), got {got}"
            )
        if self.merged:
            raise ValueError("adapter_names cannot be used while adapters are merged into the weight; unmerge() first")
        names, adapter_ids = self.gather_adapter_ids(adapter_names, x.device)
        slots = [self.adapter(n) for n in names]
        if not slots:
            return self._base_forward(x)
        if len(slots) == 1 and all(n == names[0] for n in adapter_names):
            s = slots[0]
            return self._fused(x, s.lora_A, s.lora_B, s.scaling, s.dropout)
        if self._multi_expresses(slots):
            lora_A, lora_B, scaling = stack_adapters(slots, x.device)
            ids = adapter_ids.view(-1, *([1] * (x.dim() - 2))).expand(x.shape[:-1])
            return self._fused_multi(x, lora_A, lora_B, scaling, ids, slots[0].dropout if self.training else 0.0)
        return rows_forward(
            x, adapter_ids, len(slots), lambda xs, a: self._fused(xs, slots[a].lora_A, slots[a].lora_B, slots[a].scaling,
                                                                  slots[a].dropout),
            self._base_forward,
        )  # fmt: skip

    # A layer class whose base the multi-adapter op takes defines
    # ``_fused_multi(x, lora_A [n, r, K], lora_B [n, N, r], scaling [n] float32,
    # adapter_ids (x's leading shape), dropout) -> y``: base + each row's adapter, one call.
    _fused_multi = None

    def _multi_expresses(self, slots) -> bool:
        """True when one ``_fused_multi`` call computes this mixed batch exactly as the
        per-adapter loop defines it (see :meth:`_mixed_batch_forward`)."""
        if self._fused_multi is None:
            return False
        dtypes = {s.lora_A.dtype for s in slots} | {s.lora_B.dtype for s in slots}
        if len(dtypes) != 1:
            return False
        if dtypes == {torch.float64} and any(float(torch.tensor(s.scaling, dtype=torch.float32)) != s.scaling for s in slots):
            return False  # the op's float32 scales would round a float64 layer's scale
        return not self.training or len({s.dropout for s in slots}) == 1

    def gather_adapter_ids(self, adapter_names: Sequence[str], device=None) -> tuple[list[str], Tensor]:
        """``(names, adapter_ids)``: the distinct adapters of ``adapter_names`` this
        layer has (first-appearance order) and, per row, the index into ``names``
        (``-1`` for ``"__base__"`` and for names this layer lacks): the operands
        ``lora_linear_multi`` takes once the adapters are stacked."""
        names = [n for n in dict.fromkeys(adapter_names) if n != BASE_ONLY and self.has_adapter(n)]
        index = {n: i for i, n in enumerate(names)}
        ids = torch.tensor([index.get(n, -1) for n in adapter_names], dtype=torch.int64, device=device)
        return names, ids

    # -- merging ---------------------------------------------------------------------
    @torch.no_grad()
    def delta_weight(self, adapter_names: Sequence[str] | None = None) -> Tensor:
        """``sum_i scaling_i * B_i @ A_i`` [out, in] over ``adapter_names`` (default: the
        merged adapters while merged, else the active ones), in float32 (float64 for
        float64); zeros when none applies."""
        if adapter_names is None:
            adapter_names = self.merged_adapters if self.merged and self.merged_adapters else self.active_adapters
        acc = self._acc_dtype()
        delta = None
        for name in self._present(adapter_names):
            s = self.adapter(name)
            term = (s.lora_B.to(acc) @ s.lora_A.to(acc)) * s.scaling
            delta = term if delta is None else delta + term
        if delta is None:
            delta = torch.zeros(self.out_features, self.in_features, dtype=acc, device=self._adapter_device())
        return delta

    def _adapters_repr(self) -> str:
        extra = list(self.lora_adapters.keys())
        text = f", adapters={self.adapter_names()}" if extra or self.lora_A is None else ""
        if self.active_adapters != [DEFAULT_ADAPTER]:
            text += f", active={self.active_adapters}"
        return text + (", disabled=True" if self.disable_adapters else "")


def _concat_adapters(slots) -> tuple[Tensor, Tensor, float, float]:
    """One ``(lora_A, lora_B, scaling, dropout)`` computing ``sum_i scaling_i * (x A_i^T) B_i^T``:
    A concatenated on dim 0, B on dim 1 with block i scaled by ``scaling_i / scaling``."""
    if len(slots) == 1:
        s = slots[0]
        return s.lora_A, s.lora_B, s.scaling, s.dropout
    ref = next((s.scaling for s in slots if s.scaling != 0), 0.0)
    lora_A = torch.cat([s.lora_A for s in slots], 0)
    lora_B = torch.cat([s.lora_B if s.scaling == ref else s.lora_B * (s.scaling / ref if ref else 0.0) for s in slots], 1)
    # NOTE: a group of several adapters has no dropout in effect (training: all p = 0;
    # eval: dropout is off), so the fused call gets p = 0.
    return lora_A, lora_B, ref, 0.0

class MergeableLinear(nn.Linear):
    """Merge / unmerge / to_linear for an ``nn.Linear`` whose adapter update is
    ``self.delta_weight()`` [out, in] (LoRA, VeRA, AdaLoRA layers): the update is
    added in its own precision (float32 for 16-bit weights) and rounded once to
    the weight's dtype. The base weight is shared with the nn.Linear the layer was
    made from, so that module sees a merged weight too (as with PEFT)."""

    merged: bool

    def delta_weight(self) -> Tensor:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def to_base(self) -> nn.Module:
        """The registry's name for :meth:`to_linear` (every adapter layer has one)."""
        return self.to_linear()

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update into the base weight (rounded once to the weight's dtype);
        later forwards skip the adapter branch."""
        if self.merged:
            return
        delta = self.delta_weight()
        self.weight.copy_((self.weight.to(delta.dtype) + delta).to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update again (exact up to the weight dtype's rounding)."""
        if not self.merged:
            return
        delta = self.delta_weight()
        self.weight.copy_((self.weight.to(delta.dtype) - delta).to(self.weight.dtype))
        self.merged = False

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the update merged in (new tensors; this layer is unchanged)."""
        out = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device=self.weight.device, dtype=self.weight.dtype
        )
        weight = self.weight.detach()
        if not self.merged:
            delta = self.delta_weight()
            weight = (weight.to(delta.dtype) + delta).to(self.weight.dtype)
        out.weight.copy_(weight)
        if self.bias is not None:
            out.bias.copy_(self.bias)
            out.bias.requires_grad_(self.bias.requires_grad)
        out.weight.requires_grad_(self.weight.requires_grad)
        out.train(self.training)
        return out


class LoRALinear(NamedAdapters, MergeableLinear):
    """``nn.Linear`` with a frozen base weight and a trainable low-rank update.

    ``y = x W^T + scaling * dropout(x) A^T B^T + bias`` with ``lora_A`` [r, in]
    and ``lora_B`` [out, r]; ``scaling = alpha / r`` (``alpha / sqrt(r)`` with
    ``use_rslora``). A subclass of ``nn.Linear``, so code that checks for one
    keeps working; ``weight`` and ``bias`` are frozen, only ``lora_A`` and
    ``lora_B`` require grad. Initialised as PEFT does (A kaiming-uniform with
    a=sqrt(5), B zeros), so a fresh layer computes exactly its base layer.

    Adapters may be float32 on a bf16/fp16 base (PEFT's mixed precision): the
    LoRA branch and the adapter gradients are then computed in float32.

    Several named adapters (:class:`NamedAdapters`, :mod:`fastlora.adapters`): the
    attributes above are the ``"default"`` adapter's; others live in
    ``lora_adapters``. With only the default adapter active the forward is the
    same single fused call as ever; ``forward(x, adapter_names=[...])`` is PEFT's
    mixed batch (one adapter per row of x's first dimension, ``"__base__"`` for
    the base layer alone).
    """

    is_adapter_layer = True  # apply_lora / apply_vera never wrap it again

    # Variants that live in their own modules register here (``"dora"``:
    # fastlora.dora.DoRALinear), so that PEFT's spelling ``LoRALinear(...,
    # use_dora=True)`` builds the subclass without this module importing it.
    variants: dict[str, type] = {}

    @classmethod
    def register_variant(cls, name: str, subclass: type) -> None:
        """Make ``use_<name>=True`` build ``subclass`` (a subclass of this class)."""
        if not issubclass(subclass, cls):
            raise TypeError(f"register_variant: {subclass.__name__} is not a subclass of {cls.__name__}")
        cls.variants[name] = subclass

    @classmethod
    def _variant(cls, name: str) -> type:
        sub = cls.variants.get(name)
        if sub is None:
            raise RuntimeError(f"the {name!r} variant of LoRALinear is not registered (import fastlora first)")
        return cls if issubclass(cls, sub) else sub

    def __new__(cls, *args, use_dora: bool = False, **kwargs):
        # NOTE: __init__ then runs on the subclass.
        return super().__new__(cls._variant("dora") if use_dora else cls)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        r: int = 8,
        alpha: float = 8.0,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "default",
        use_dora: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        check_lora_hyperparameters(r, alpha, dropout)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self._setup_lora(r, alpha, dropout, use_rslora, init)

    def _setup_lora(self, r: int, alpha: float, dropout: float, use_rslora: bool, init: str) -> None:
        check_init(init)
        self.r = r
        self.alpha = float(alpha)
        self.dropout = float(dropout)
        self.use_rslora = bool(use_rslora)
        self.scaling = lora_scaling(r, alpha, use_rslora)
        self.merged = False
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **factory))
        self._init_named_adapters()
        self.reset_lora_parameters(init)

    @torch.no_grad()
    def reset_lora_parameters(self, init: str = "default") -> None:
        """Initialise ``lora_A`` [r, in] and ``lora_B`` [out, r] as PEFT does.

        ``"default"``: A kaiming-uniform (a=sqrt(5)), B = 0. ``"gaussian"``:
        A ~ N(0, std=1/r), B = 0. Both start with a zero update.

        ``"pissa"`` (PiSSA, arXiv:2404.02948): ``W = U S V^T`` (exact SVD; with
        ``"pissa_niter_<N>"`` the randomized ``torch.svd_lowrank`` with N subspace
        iterations, which draws from the global RNG), ``S_r = S[:r] / scaling``,
        ``A = diag(sqrt(S_r)) V_r^T``, ``B = U_r diag(sqrt(S_r))``.
        ``"olora"`` (OLoRA, arXiv:2406.01775): ``W = Q R`` (reduced QR),
        ``A = R[:r]``, ``B = Q[:, :r]`` (not divided by ``scaling``).

        For these two the base weight is then replaced **in place** by the residual
        ``W - scaling * B @ A``, so the layer's output is unchanged up to rounding.
        The weight is shared with the ``nn.Linear`` the layer was made from, which
        therefore holds the residual afterwards (PEFT does the same). As in PEFT
        the factorisation and the residual are computed in float32 (float64 for a
        float64 weight, which PEFT rejects) from the current weight, and A, B and
        the residual are rounded once to their dtypes; requires ``r <= min(in, out)``.
        """
        if init in ("default", "gaussian"):
            if init == "gaussian":
                nn.init.normal_(self.lora_A, std=1.0 / self.r)
            else:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)
        else:
            self._init_from_base_weight(check_init(init))

    def _init_from_base_weight(self, init: str) -> None:
        """PiSSA / OLoRA (see :meth:`reset_lora_parameters`); runs under no_grad."""
        weight = self.weight
        if self.merged:
            raise RuntimeError(f"init={init!r} factorises the base weight: unmerge the layer first")
        if weight.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise TypeError(f"init={init!r} needs a float16/bfloat16/float32/float64 base weight, got {weight.dtype}")
        if self.r > min(self.in_features, self.out_features):
            raise ValueError(
                f"init={init!r} needs r <= min(in_features, out_features) = "
                f"{min(self.in_features, self.out_features)}, got r={self.r}"
            )
        scaling = self.scaling
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        w = weight.detach().to(acc)
        r = self.r
        if init == "olora":
            q, rr = torch.linalg.qr(w)  # w [out, in] = q [out, k] @ rr [k, in], k = min(out, in)
            lora_A, lora_B = rr[:r].contiguous(), q[:, :r].contiguous()
        else:
            if scaling <= 0:
                raise ValueError(f"init={init!r} takes sqrt(S / scaling): alpha must be > 0, got {self.alpha:g}")
            niter = pissa_niter(init)
            if niter is None:
                u, s, vh = torch.linalg.svd(w, full_matrices=False)  # w = u diag(s) vh, s descending
                u_r, s_r, vh_r = u[:, :r], s[:r], vh[:r]
            else:
                u_r, s_r, v_r = torch.svd_lowrank(w, r, niter=niter)
                vh_r = v_r.t()
            s_r = s_r / scaling
            lora_A = torch.diag(torch.sqrt(s_r)) @ vh_r  # [r, in]
            lora_B = u_r @ torch.diag(torch.sqrt(s_r))  # [out, r]
        # NOTE: same operation order as PEFT ((scaling * B) @ A, from the unrounded
        # factors) so that the residual matches PEFT's bit for bit.
        residual = w - scaling * lora_B @ lora_A
        self.lora_A.copy_(lora_A)
        self.lora_B.copy_(lora_B)
        weight.copy_(residual)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        r: int = 8,
        alpha: float = 8.0,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "default",
        use_dora: bool = False,
    ) -> "LoRALinear":
        """Wrap ``linear``: its weight and bias are shared (not copied) and frozen.

        With ``init="pissa"``, ``"pissa_niter_<N>"`` or ``"olora"`` the shared weight
        is overwritten in place by the residual ``W - scaling * B @ A`` (see
        :meth:`reset_lora_parameters`), so ``linear`` alone no longer computes the
        original layer; the returned layer does (up to rounding). ``use_dora=True``
        returns a :class:`fastlora.dora.DoRALinear` (PEFT's ``use_dora``)."""
        if use_dora and cls._variant("dora") is not cls:
            return cls._variant("dora").from_linear(linear, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, init=init)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        check_lora_hyperparameters(r, alpha, dropout)
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.weight.requires_grad_(False)
        self.bias = linear.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self._setup_lora(r, alpha, dropout, use_rslora, init)
        self.train(linear.training)
        return self

    def reset_parameters(self) -> None:  # called by nn.Linear.__init__
        super().reset_parameters()
        if getattr(self, "lora_A", None) is not None:
            self.reset_lora_parameters()

    def forward(self, x: Tensor, *, adapter_names: Sequence[str] | None = None) -> Tensor:
        """``x W^T + bias`` plus the active adapters' updates (see the class docstring);
        ``adapter_names``: PEFT's mixed batch, one adapter name per row of x's first
        dimension."""
        # NOTE: the common case (only "default" active) is checked inline, before any other work
        if adapter_names is None and self.active_adapters == _DEFAULT_ONLY and not self.disable_adapters:
            # NOTE: _lora_parameters inlined (a frame and a tuple fewer a call)
            params = self._parameters
            try:
                weight, lora_A, lora_B, bias = params["weight"], params["lora_A"], params["lora_B"], params["bias"]
            except KeyError:
                weight, lora_A, lora_B, bias = _lora_parameters(self)
            if lora_A is not None:
                if self.merged:
                    if self.training and lora_A.requires_grad and torch.is_grad_enabled():
                        _warn_merged_training(self)
                    return F.linear(x, weight, bias)
                return _LORA_CALL(
                    x, weight, lora_A, lora_B, bias, scaling=self.scaling, dropout=self.dropout, training=self.training
                )
        return self._named_forward(x, adapter_names)

    # -- what NamedAdapters needs --------------------------------------------------
    def _fused(self, x: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, dropout: float) -> Tensor:
        return lora_linear(x, self.weight, lora_A, lora_B, scaling, self.bias, dropout=dropout, training=self.training)

    def _fused_multi(
        self, x: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: Tensor, adapter_ids: Tensor, dropout: float
    ) -> Tensor:
        return lora_linear_multi(
            x, self.weight, lora_A, lora_B, scaling, adapter_ids, self.bias, dropout=dropout, training=self.training
        )

    def _base_forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def _acc_dtype(self) -> torch.dtype:
        return torch.float64 if self.weight.dtype == torch.float64 else torch.float32

    def _adapter_device(self) -> torch.device:
        return self.weight.device

    def _adapter_dtype(self) -> torch.dtype:
        return self.weight.dtype

    def _unmerge_for_disable(self) -> None:
        self.unmerge()

    # -- merging -------------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        """Add the active adapters' update (``delta_weight()``) into the base weight
        (rounded once to the weight's dtype); later forwards skip the adapter branch.
        :meth:`unmerge` subtracts exactly the adapters merged here."""
        if self.merged:
            return
        self.merged_adapters = self._present(self.active_adapters)
        super().merge()

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the merged adapters' update again (exact up to the weight dtype's rounding)."""
        if not self.merged:
            return
        super().unmerge()
        self.merged_adapters = []

    def extra_repr(self) -> str:
        default = (
            f", r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}, dropout={self.dropout:g}"
            + (", rslora=True" if self.use_rslora else "")
            if self.lora_A is not None
            else ""
        )
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
            + default
            + self._adapters_repr()
            + (", merged=True" if self.merged else "")
        )
