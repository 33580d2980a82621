"""Backend selection: Triton kernels or the pure PyTorch reference path.

The choice is made per call, never at import time:

* ``set_backend("triton")`` / ``FASTLORA_BACKEND=triton`` -> Triton kernels on
  whatever device the tensors are on (CPU tensors need ``TRITON_INTERPRET=1``).
* ``set_backend("reference")`` / ``FASTLORA_BACKEND=reference`` -> reference path.
* ``"auto"`` (default): CUDA tensors with Triton installed -> kernels;
  ``TRITON_INTERPRET=1`` with Triton installed -> kernels; otherwise reference.

Importing fastlora never imports Triton; :func:`has_triton` only looks for it.
"""

from __future__ import annotations

import importlib.util
import os
import torch

BACKENDS = ("auto", "triton", "reference")

_forced: str | None = None


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


def set_backend(name: str) -> None:
    """Force a backend for every later call: ``"auto"``, ``"triton"`` or ``"reference"``.

    ``set_backend("auto")`` also clears a previous choice, after which the
    ``FASTLORA_BACKEND`` environment variable (if set) applies again.
    """
    if name not in BACKENDS:
        raise ValueError(f"set_backend: name must be one of {BACKENDS}, got {name!r}")
    if name == "triton" and not has_triton():
        raise RuntimeError(
            "set_backend('triton'): Triton is not installed; install it with "
            "`pip install 'fastlora[triton]'` (Linux) or use 'reference'"
        )
    global _forced
    _forced = None if name == "auto" else name


def get_backend() -> str:
    """The backend requested now: a forced one, ``FASTLORA_BACKEND``, else ``"auto"``."""
    if _forced is not None:
        return _forced
    env = os.environ.get("FASTLORA_BACKEND", "auto").strip().lower() or "auto"
    if env not in BACKENDS:
        raise ValueError(f"FASTLORA_BACKEND must be one of {BACKENDS}, got {env!r}")
    return env


def resolve_backend(device: torch.device) -> str:
    """The backend that a call on tensors living on ``device`` will use."""
    requested = get_backend()
    if requested == "reference":
        return "reference"
    if requested == "triton":
        if not has_triton():
            raise RuntimeError("FASTLORA_BACKEND=triton but Triton is not installed")
        if device.type != "cuda" and not interpreting():
            raise RuntimeError(
                f"backend 'triton' on a {device.type} tensor needs TRITON_INTERPRET=1 "
                "(set before fastlora.kernels is imported) or a CUDA tensor"
            )
        return "triton"
    if has_triton() and (device.type == "cuda" or interpreting()):
        return "triton"
    return "reference"
