"""Backend selection: Triton kernels or the pure PyTorch reference path.

The choice is made per call, never at import time. What a call on the current
thread requests (:func:`get_backend`) is, first match wins:

1. the innermost ``with use_backend(name):`` active on *this thread* (a
   thread-local override: other threads never see it);
2. the process-wide default set by ``set_backend(name)`` (every thread sees it);
3. the ``FASTLORA_BACKEND`` environment variable;
4. ``"auto"``.

What the names mean (:func:`resolve_backend`):

* ``"triton"`` -> Triton kernels on whatever device the tensors are on (CPU
  tensors need ``TRITON_INTERPRET=1``).
* ``"reference"`` -> the reference path.
* ``"auto"``: CUDA tensors with Triton installed -> kernels;
  ``TRITON_INTERPRET=1`` with Triton installed -> kernels; otherwise reference.

NOTE: the backend is resolved when an op's forward runs, on the thread that
calls it, and handed to its backward; code that resolves a backend inside a
backward would see the process default on CUDA (autograd runs CUDA backwards
on its own device threads), so it must not.

Importing fastlora never imports Triton; :func:`has_triton` only looks for it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import threading

import torch

BACKENDS = ("auto", "triton", "reference")

# The process-wide default (None: not set, FASTLORA_BACKEND or "auto" apply).
# Written under _default_lock; read without it (a str/None load is atomic).
_default: str | None = None
_default_lock = threading.Lock()


class _ThreadState(threading.local):
    """Per-thread override state.

    NOTE: the fields are set in ``__init__`` (run once per thread on first
    access), not as class attributes: torch.compile guards on instance
    attributes of a threading.local, so a compiled graph is re-traced when the
    calling thread's override differs from the one it was traced under, but it
    would silently reuse the graph for a class-level default.
    """

    def __init__(self) -> None:
        self.override: str | None = None
        self.stack: list[tuple[object, str | None]] = []  # (use_backend instance, value it replaced)


_thread = _ThreadState()

_triton_found: bool | None = None


def has_triton() -> bool:
    """True when the ``triton`` package can be imported (it is not imported here)."""
    global _triton_found
    if _triton_found is None:  # a plain cache: torch.compile traces this function
        _triton_found = importlib.util.find_spec("triton") is not None
    return _triton_found


def interpreting() -> bool:
    """True when Triton kernels run under the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _check_name(name: object, caller: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"{caller}: name must be one of {BACKENDS}, got {name!r}")
    if name == "triton" and not has_triton():
        raise RuntimeError(
            f"{caller}('triton'): Triton is not installed; install it with "
            "`pip install 'fastlora[triton]'` (Linux) or use 'reference'"
        )
    return name


def set_backend(name: str) -> None:
    """Set the process-wide default backend: ``"auto"``, ``"triton"`` or ``"reference"``.

    Every thread sees it, except where a :func:`use_backend` block is active on
    that thread (the override wins there). To pick a backend for one thread
    only (a server handling requests, a test, a data-loading thread), use
    ``with fastlora.use_backend(name):`` instead: changing the process default
    while other threads are running changes what *their* next calls do.

    ``set_backend("auto")`` clears a previous choice, after which the
    ``FASTLORA_BACKEND`` environment variable (if set) applies again.
    Raises ValueError for an unknown name, RuntimeError for ``"triton"``
    without Triton installed.
    """
    _check_name(name, "set_backend")
    global _default
    with _default_lock:
        _default = None if name == "auto" else name


class use_backend(contextlib.ContextDecorator):  # noqa: N801 - used like a function: `with use_backend(...)`
    """Use backend ``name`` on the calling thread only, for the duration of a ``with`` block.

    ``with fastlora.use_backend("reference"): ...`` wins over :func:`set_backend`'s
    process default and over ``FASTLORA_BACKEND`` for calls made by this thread
    inside the block; other threads are unaffected. ``"auto"`` is an override
    too: it means "auto" here even when the process default is another name.

    * Restores the previous choice on exit, also when the block raises.
    * Nests, and one instance can be entered again while active (re-entrant),
      on any number of threads at once.
    * Works as a decorator: ``@use_backend("reference")`` runs each call of the
      function inside the block (for a generator function, only its creation).

    Raises ValueError for an unknown name, RuntimeError for ``"triton"``
    without Triton installed (both when the object is created).
    """

    def __init__(self, name: str) -> None:
        self.name = _check_name(name, "use_backend")

    def __enter__(self) -> str:
        state = _thread
        state.stack.append((self, state.override))
        state.override = self.name
        return self.name

    def __exit__(self, *exc_info: object) -> None:
        state = _thread
        stack = state.stack
        for index in range(len(stack) - 1, -1, -1):
            if stack[index][0] is self:
                break
        else:
            raise RuntimeError(
                f"use_backend({self.name!r}) exited on a thread where it is not active (a generator or "
                "coroutine holding the block was resumed on another thread?)"
            )
        _, previous = stack.pop(index)
        if index == len(stack):  # the innermost block: the usual case
            state.override = previous
        else:
            # NOTE: exited out of order (a suspended generator holding the block
            # was closed): the block entered after this one now restores what
            # this one replaced, so nothing of this block survives its exit.
            owner, _ = stack[index]
            stack[index] = (owner, previous)

    def __repr__(self) -> str:
        return f"use_backend({self.name!r})"


def get_backend() -> str:
    """The backend requested now on this thread: a :func:`use_backend` override,
    else the :func:`set_backend` process default, else ``FASTLORA_BACKEND``, else ``"auto"``."""
    override = _thread.override
    if override is not None:
        return override
    default = _default
    if default is not None:
        return default
    env = os.environ.get("FASTLORA_BACKEND", "auto").strip().lower() or "auto"
    if env not in BACKENDS:
        raise ValueError(f"FASTLORA_BACKEND must be one of {BACKENDS}, got {env!r}")
    return env


def resolve_backend(device: torch.device) -> str:
    """The backend that a call made now on this thread, on tensors living on
    ``device``, will use: ``"triton"`` or ``"reference"``."""
    return _resolve(get_backend(), device)


def backend_for(x: torch.Tensor) -> str:
    """``resolve_backend(x.device)``, what the fused ops call on every call.

    NOTE: get_backend inlined, and x's device read only when the answer depends on
    it (``"reference"`` requested does not): a frame and a device object fewer, ~0.2 us
    of the per-call host time that ``bench/host_overhead.py`` measures."""
    requested = _thread.override
    if requested is None:
        requested = _default
        if requested is None:
            requested = get_backend()
    if requested == "reference":
        return "reference"
    return _resolve(requested, x.device)


def _resolve(requested: str, device: torch.device) -> str:
    if requested == "reference":
        return "reference"
    if requested == "triton":
        if not has_triton():
            raise RuntimeError("backend 'triton' was requested but Triton is not installed")
        if device.type != "cuda" and not interpreting():
            raise RuntimeError(
                f"backend 'triton' on a {device.type} tensor needs TRITON_INTERPRET=1 "
                "(set before fastlora.kernels is imported) or a CUDA tensor"
            )
        return "triton"
    if has_triton() and (device.type == "cuda" or interpreting()):
        return "triton"
    return "reference"
