"""One helper that defines a fused op: :class:`FusedOp`.

Every fused op of fastlora (LoRA, QLoRA, DoRA, and what comes next) is the same
machine around a different pair of functions:

* a ``forward(backend, seed, *inputs, *consts)`` returning ``(y, *new_saved)``
  and a ``backward(backend, seed, needs, dy, saved, new_saved, consts)``
  returning one gradient (or None) per input; each looks up its backend's
  module (``fastlora.reference`` or ``fastlora.kernels.*``, which share
  signatures) with :func:`backend_module`;
* two ``torch.library`` custom ops ``fastlora::<name>_fwd`` / ``<name>_bwd``
  with shape-only fake implementations, so ``torch.compile`` traces *around*
  the op (the kernels and the reference math run opaque, exactly as in eager);
* an ``autograd.Function`` (named as the public class, e.g.
  ``LoRALinearFunction``) that calls the backend directly in eager mode and
  the custom ops under compile. In eager the dropout seed is a Python int, so
  nothing but the declared tensors is saved; under compile it is a 1-element
  int64 tensor drawn in the graph (a Python int would need ``.item()``, a
  graph break);
* the call path of the public functions (:meth:`FusedOp.__call__`):
  autocast (every operand cast as ``nn.Linear`` does, then the op with
  autocast off), validation, x flattened to [M, K], the dropout probability
  in effect and its seed, the backend for x's device, the result back in x's
  leading dims.

``FusedOp`` never imports a kernel module: the op's own functions do, on first
use. Nothing here is specific to LoRA except the names ``lora_A`` / ``lora_B``
(the adapters, cast for the kernels) and the two leading constants every op
takes, ``scaling`` and ``dropout_p``.
"""

from __future__ import annotations

import importlib
import math
import operator
from collections.abc import Callable, Sequence
from types import ModuleType

import torch
from torch import Tensor

from ._backend import backend_for
from .strategies import ops_for, strategy_backend

# Family of kernels -> the Triton module that implements it (the reference module
# implements every family).
_KERNEL_MODULES = {"lora": "fastlora.kernels.lora", "nf4": "fastlora.kernels.nf4"}
# (backend, family) -> module, filled on first use: a dict lookup per call rather than
# importlib's (the modules never change once imported).
_modules: dict[tuple[str, str], ModuleType] = {}


def backend_module(backend: str, family: str = "lora") -> ModuleType:
    """The module with a backend's forward/backward functions: ``fastlora.reference``
    for ``"reference"``, ``fastlora.kernels.<family>`` for ``"triton"`` (imported on
    first use only, so importing fastlora never imports Triton). A strategy spec
    (``"triton:lora=cublas,..."``, see ``fastlora.strategies``) gives the object
    implementing those strategies, with the same functions."""
    module = _modules.get((backend, family))
    if module is not None:
        return module
    if ":" in backend:
        return ops_for(backend)  # ops_for keeps its own cache (a spec may hold measured choices)
    if backend == "triton":
        module = importlib.import_module(_KERNEL_MODULES[family])
    else:
        module = importlib.import_module("fastlora.reference")
    _modules[(backend, family)] = module
    return module


def new_dropout_seed() -> int:
    """A fresh dropout seed from PyTorch's default CPU generator (so
    ``torch.manual_seed`` makes dropout reproducible; no device sync)."""
    return int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())


def dropout_seed(p: float):
    """The seed argument of the autograd Functions: a Python int in eager (0 when
    there is no dropout), a 1-element int64 tensor drawn in the graph under
    torch.compile (None when there is no dropout)."""
    if torch.compiler.is_compiling():
        return torch.randint(0, 2**62, (1,), dtype=torch.int64) if p > 0.0 else None
    return new_dropout_seed() if p > 0.0 else 0


def with_leading_dims(y: Tensor, x: Tensor) -> Tensor:
    """y [M, N] back to x's leading dims [..., N].

    NOTE: _unsafe_view (what torch.matmul uses) rather than view: the result is
    not a view, so in-place ops on it and FSDP2's pre-backward hook work, as with
    nn.Linear."""
    return y if x.dim() == 2 else torch.ops.aten._unsafe_view(y, (*x.shape[:-1], y.shape[-1]))


def autocast_dtype(x) -> torch.dtype | None:
    """The dtype ``torch.autocast`` would give a linear layer's floating input x, or None."""
    # NOTE: autocast has no meta device (torch raises for it); meta tensors propagate shapes only
    if isinstance(x, Tensor) and x.is_floating_point() and x.device.type != "meta" and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return None


# Whether autocast is on for any device type: one C call, where autocast_dtype needs
# x's device type (0.43 us: `python -m timeit -s "import torch; x = torch.randn(2)"
# "x.device.type"`) and a per-device query. Traced code
# (torch.compile) takes autocast_dtype itself; torch < 2.4 lacks the C function.
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)
# torch.compiler.is_compiling itself (torch.compile recognises the function, not its
# name): two attribute reads fewer a call.
_is_compiling = torch.compiler.is_compiling


def _seed_of(seed_t: Tensor | None) -> int:
    return int(seed_t.item()) if seed_t is not None else 0


def _picker(index: tuple[int, ...]) -> Callable[[tuple], tuple]:
    """``f(seq) -> tuple(seq[i] for i in index)``, as one C-level call."""
    if not index:
        return lambda seq: ()
    if len(index) == 1:
        i = index[0]
        return lambda seq: (seq[i],)
    return operator.itemgetter(*index)


def _schema(args: Sequence[tuple[str, str]], returns: str) -> str:
    return "(" + ", ".join(f"{kind} {name}" for name, kind in args) + ") -> " + returns


class FusedOp:
    """A fused op: custom ops for compile, an autograd Function, and its call path.

    Args:
      name: the op's name; the custom ops are ``fastlora::<name>_fwd`` / ``_bwd``.
      function_name: the autograd Function's class name (shown in ``grad_fn``).
      inputs: ``(name, schema type)`` of the autograd inputs, x first, in call
        order (``"Tensor"`` or ``"Tensor?"``); a gradient slot each.
      consts: ``(name, schema type)`` of the non-tensor arguments after
        ``scaling: float`` and ``dropout_p: float`` (which every op takes first).
      saved: names of the inputs saved for backward (``save_for_backward``: by
        reference, parameters and the caller's x are not copied).
      held: names of inputs backward needs that are frozen buffers (a 4-bit
        weight's tensors): kept on the context by reference, never packed by
        saved-tensor hooks (which would copy or offload them every step).
        Backward receives them after the saved ones.
      n_new: how many tensors the forward returns after y (saved for backward).
      forward: ``(backend, seed, *inputs, *consts) -> (y, *new)``.
      backward: ``(backend, seed, needs, dy, saved, new, consts) -> grads``, one
        per input (None where ``needs`` is False).
      fake_forward: ``(*inputs, *consts) -> (y, *new)`` with the right shapes
        and dtypes (no data).
      fake_backward: ``(needs, dy, saved, new, consts) -> grads`` likewise; an
        unneeded gradient may be None.
      validate: ``(x, inputs: dict, consts: dict) -> None``: raises on bad operands
        (called after the autocast casts, before anything runs).
      accept: optional ``(*inputs, *consts) -> bool``, True only for operands
        ``validate`` would accept, in the common case, cheaply; ``validate`` then
        does not run. False is not an error: ``validate`` runs and decides.
      autocast: names of the inputs cast to the autocast dtype with x.
      differentiable_forward: ``(seed, *inputs, *consts) -> y`` in differentiable
        torch ops (the bias input None), for ``create_graph=True`` backward; by
        default the reference backend's ``forward``.
      cast_adapters_for_kernels: cast fp32 adapters to the activation dtype on the
        Triton backend (for kernels that read them in that dtype).
    """

    def __init__(
        self,
        name: str,
        *,
        function_name: str,
        inputs: Sequence[tuple[str, str]],
        consts: Sequence[tuple[str, str]] = (),
        saved: Sequence[str],
        held: Sequence[str] = (),
        n_new: int,
        forward: Callable,
        backward: Callable,
        fake_forward: Callable,
        fake_backward: Callable,
        validate: Callable,
        accept: Callable | None = None,
        autocast: Sequence[str],
        differentiable_forward: Callable | None = None,
        cast_adapters_for_kernels: bool = False,
        doc: str = "",
    ) -> None:
        self.name = name
        self.inputs = tuple(inputs)
        self.input_names = tuple(n for n, _ in self.inputs)
        self.consts = (("scaling", "float"), ("dropout_p", "float"), *consts)
        self.const_names = tuple(n for n, _ in self.consts)
        self.saved_index = tuple(self.input_names.index(n) for n in saved)
        self.held_index = tuple(self.input_names.index(n) for n in held)
        self.n_new = n_new
        self.forward = forward
        self.backward = backward
        self.validate = validate
        self.accept = accept
        self.differentiable_forward = differentiable_forward or (lambda seed, *args: forward("reference", seed, *args)[0])
        self.autocast_index = tuple(self.input_names.index(n) for n in autocast)
        self.adapter_index = tuple(self.input_names.index(n) for n in ("lora_A", "lora_B"))
        self.cast_adapters_for_kernels = cast_adapters_for_kernels
        self._register_custom_ops(fake_forward, fake_backward)
        self.function = self._make_function(function_name, doc)
        # NOTE: ``op.call(...)`` is ``op(...)`` for the per-call hot paths (LoRALinear.forward,
        # lora_linear): calling the instance goes through type slot dispatch, which packs the
        # keyword arguments into a dict; the bound method is called with them as they are,
        # ~2,500 instructions (~0.4 us) fewer a call (callgrind, bench/host_overhead.py's layer).
        self.call = self.__call__

    # -- torch.compile: the custom ops -------------------------------------------------
    def _register_custom_ops(self, fake_forward: Callable, fake_backward: Callable) -> None:
        n_in, n_c, n_new = len(self.inputs), len(self.consts), self.n_new
        tail = [("seed_t", "Tensor?"), ("backend", "str")]
        saved_args = [self.inputs[i] for i in self.saved_index + self.held_index]
        new_args = [(f"new{i}", "Tensor") for i in range(n_new)]
        n_saved = len(saved_args)

        def fwd_impl(*args):
            inputs, consts, (seed_t, backend) = args[:n_in], args[n_in : n_in + n_c], args[n_in + n_c :]
            return list(self.forward(backend, _seed_of(seed_t), *inputs, *consts))

        def fwd_fake(*args):
            return list(fake_forward(*args[: n_in + n_c]))

        def split_bwd(args):
            dy = args[0]
            saved = args[1 : 1 + n_saved]
            new = args[1 + n_saved : 1 + n_saved + n_new]
            consts = args[1 + n_saved + n_new : 1 + n_saved + n_new + n_c]
            seed_t, backend, needs = args[1 + n_saved + n_new + n_c :]
            return dy, saved, new, consts, seed_t, backend, tuple(needs)

        def none_to_empty(grads, dy):
            # Custom ops cannot return None: an unrequested gradient is an empty tensor.
            return [g if g is not None else dy.new_empty(0) for g in grads]

        def bwd_impl(*args):
            dy, saved, new, consts, seed_t, backend, needs = split_bwd(args)
            return none_to_empty(self.backward(backend, _seed_of(seed_t), needs, dy, saved, new, consts), dy)

        def bwd_fake(*args):
            dy, saved, new, consts, _, _, needs = split_bwd(args)
            return none_to_empty(fake_backward(needs, dy, saved, new, consts), dy)

        fwd_schema = _schema([*self.inputs, *self.consts, *tail], "Tensor[]")
        bwd_schema = _schema(
            [("dy", "Tensor"), *saved_args, *new_args, *self.consts, *tail, ("needs", "bool[]")], "Tensor[]"
        )
        self.fwd_op = torch.library.custom_op(f"fastlora::{self.name}_fwd", fwd_impl, mutates_args=(), schema=fwd_schema)
        self.fwd_op.register_fake(fwd_fake)
        self.bwd_op = torch.library.custom_op(f"fastlora::{self.name}_bwd", bwd_impl, mutates_args=(), schema=bwd_schema)
        self.bwd_op.register_fake(bwd_fake)

    # -- autograd ----------------------------------------------------------------------
    def _make_function(self, function_name: str, doc: str) -> type:
        op = self
        n_in, n_c = len(self.inputs), len(self.consts)

        n_saved, n_new = len(self.saved_index), self.n_new
        saved_of = _picker(self.saved_index)
        held_of = _picker(self.held_index)
        no_grads = (None,) * (n_c + 2)  # the constants, the seed and the backend
        held = bool(self.held_index)  # whether ctx.held is read back (only ops with frozen buffers)

        def forward(ctx, *args):
            inputs, consts, (seed, backend) = args[:n_in], args[n_in : n_in + n_c], args[n_in + n_c :]
            ctx.compiled = compiled = isinstance(seed, Tensor) or _is_compiling()
            if compiled:
                # (generator expressions: dynamo cannot trace an operator.itemgetter)
                seed_t = seed if isinstance(seed, Tensor) else None
                outs = op.fwd_op(*inputs, *consts, seed_t, backend)
                ctx.save_for_backward(*(inputs[i] for i in op.saved_index), *outs[1:], seed_t)
                ctx.held = tuple(inputs[i] for i in op.held_index)
            else:
                outs = op.forward(backend, seed, *inputs, *consts)
                ctx.save_for_backward(*saved_of(inputs), *outs[1:])
                ctx.held = held_of(inputs)
            ctx.consts = consts
            ctx.seed = seed
            ctx.backend = backend
            return outs[0]

        def backward(ctx, dy):
            tensors = ctx.saved_tensors
            saved, new = (tensors[:n_saved] + ctx.held if held else tensors[:n_saved]), tensors[n_saved : n_saved + n_new]
            needs = ctx.needs_input_grad[:n_in]
            if torch.is_grad_enabled():  # backward(create_graph=True): gradients that are differentiable
                grads = op.differentiable_backward(ctx, dy, saved, needs)
            elif ctx.compiled:
                seed_t = tensors[n_saved + n_new]
                grads = op.bwd_op(dy, *saved, *new, *ctx.consts, seed_t, ctx.backend, list(needs))
                grads = [g if n else None for g, n in zip(grads, needs)]
            else:
                grads = op.backward(ctx.backend, ctx.seed, needs, dy, saved, new, ctx.consts)
            return (*grads, *no_grads)

        return type(
            function_name,
            (torch.autograd.Function,),
            {"forward": staticmethod(forward), "backward": staticmethod(backward), "__doc__": doc, "__module__": __name__},
        )

    def differentiable_backward(self, ctx, dy: Tensor, saved: tuple, needs: tuple) -> list:
        """The gradients as a graph (``create_graph=True``: gradient penalties,
        Hessian-vector products): the op's forward is recomputed with the
        reference's differentiable torch ops from the saved inputs (the same
        dropout mask, from the same seed) and differentiated with autograd, so
        second-order gradients are exact on every backend. The bias is not
        saved: its gradient is ``sum_m dY``, differentiable in dY."""
        seed = ctx.seed if not ctx.compiled else _seed_of(ctx.saved_tensors[-1])
        args: list = [None] * len(self.inputs)
        for i, t in zip(self.saved_index + self.held_index, saved):
            args[i] = t
        y = self.differentiable_forward(seed, *args, *ctx.consts)
        wanted = [i for i, n in enumerate(needs) if n and args[i] is not None]
        found = torch.autograd.grad(y, [args[i] for i in wanted], dy, create_graph=True, allow_unused=True)
        grads: list = [None] * len(self.inputs)
        for i, g in zip(wanted, found):
            grads[i] = g if g is not None else torch.zeros_like(args[i])
        for i, n in enumerate(needs):
            if n and args[i] is None:
                if self.input_names[i] != "bias":  # pragma: no cover - every op saves what it differentiates
                    raise RuntimeError(f"{self.name}: no differentiable gradient for {self.input_names[i]}")
                grads[i] = dy.sum(0)
        return grads

    # -- the call path -----------------------------------------------------------------
    def __call__(self, *inputs, scaling, dropout: float = 0.0, training: bool = True, consts: tuple = ()) -> Tensor:
        """Run the op on ``inputs`` (x [..., K] first, in declared order): autocast,
        validate, flatten, dispatch, and back to x's leading dims.

        NOTE: this runs on every call of every LoRA layer, so it is one straight line
        of cheap steps (``bench/host_overhead.py`` measures it against PEFT); every
        step is still taken on every call: no operand check, backend choice or
        strategy choice is cached across calls. The steps a common call does not
        need are skipped by a test on what it has at hand (a 2-D x is not reshaped
        back, the reference without dropout asks for no strategy); each Python call
        and attribute read saved is ~0.1 us here (callgrind: ~500 instructions a
        frame, ~450 a tensor property read)."""
        x = inputs[0]
        compiling = _is_compiling()
        if (compiling or _any_autocast()) and autocast_dtype(x) is not None:
            return self._autocast_call(inputs, scaling, dropout, training, consts)
        accept = self.accept
        if accept is None or not accept(*inputs, scaling, dropout, *consts):
            self.validate(x, dict(zip(self.input_names, inputs)), dict(zip(self.const_names, (scaling, dropout, *consts))))
        p = float(dropout) if training else 0.0
        seed = dropout_seed(p) if p > 0.0 or compiling else 0
        backend = backend_for(x)
        args = inputs
        flat = x.dim() != 2
        if flat:
            # NOTE: not reshape(-1, K): with K = 0 (in_features=0, as nn.Linear allows) -1 is ambiguous
            args = (x.reshape(math.prod(x.shape[:-1]), x.shape[-1]), *inputs[1:])
        if backend == "triton" and self.cast_adapters_for_kernels:
            i_a, i_b = self.adapter_index
            if args[i_a].dtype != x.dtype:
                # NOTE: this op's kernels read the adapters in the activation dtype (fp32
                # accumulation); fp32 adapters are cast, autograd-tracked. The LoRA, QLoRA and
                # DoRA kernels take fp32 adapters as they are (the LoRA branch in fp32).
                args = list(args)
                args[i_a], args[i_b] = args[i_a].to(x.dtype), args[i_b].to(x.dtype)
        if p > 0.0 or backend != "reference":
            # The strategies of this call (forced, or "auto": measured inside the op), as a
            # constant string. NOTE: the reference without dropout has none (strategy_backend
            # returns the backend unchanged there without reading anything), so it is not asked.
            backend = strategy_backend(self.name, backend, args, p)
        if not compiling and not torch.is_grad_enabled():
            # NOTE: inference (no_grad / inference_mode): no graph to record, so the backend runs
            # directly; autograd.Function.apply would cost more host time than the op itself
            # at small sizes, and saves nothing here anyway.
            y = self.forward(backend, seed, *args, float(scaling), p, *consts)[0]
        else:
            y = self.function.apply(*args, float(scaling), p, *consts, seed, backend)
        # NOTE: with_leading_dims inlined (one frame and one x.dim() fewer)
        return torch.ops.aten._unsafe_view(y, (*x.shape[:-1], y.shape[-1])) if flat else y

    def _autocast_call(self, inputs: tuple, scaling, dropout, training: bool, consts: tuple) -> Tensor:
        """Under ``torch.autocast``: every operand named in ``autocast`` cast to the
        autocast dtype (as ``nn.Linear``'s are), then the op with autocast off."""
        x = inputs[0]
        dtype = autocast_dtype(x)
        inputs = list(inputs)
        for i in self.autocast_index:
            if inputs[i] is not None:
                inputs[i] = inputs[i].to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            return self(*inputs, scaling=scaling, dropout=dropout, training=training, consts=consts)


__all__ = ["FusedOp", "autocast_dtype", "backend_module", "dropout_seed", "new_dropout_seed", "with_leading_dims"]
