"""Count the bytes autograd keeps alive for backward ("saved activations").

Used by the benchmark report and by ``tests/test_memory.py``. The count is
exact and deterministic (no timing, no allocator statistics): every tensor that
autograd packs for backward while ``fn`` runs goes through a
``torch.autograd.graph.saved_tensors_hooks`` pack hook, which records the
tensor's storage. Each distinct storage is counted once, at its full size
(a view keeps its whole storage alive), and storages of the tensors passed in
``exclude`` (parameters, buffers: memory the model holds anyway) are left out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = ["SavedTensorsRecord", "record_saved_tensors", "saved_activation_bytes"]


def _storage_key(t: Tensor) -> tuple[str, int]:
    # NOTE: keyed on (device, data pointer of the storage), not id(): autograd may
    # hand the hook a fresh Python view of a tensor it already saved.
    st = t.untyped_storage()
    return (str(t.device), st.data_ptr())


class SavedTensorsRecord:
    """What was saved while ``fn`` ran: one entry per distinct storage.

    ``entries`` maps storage key -> (nbytes, shape, dtype) of the first tensor
    seen on that storage; ``excluded`` counts storages skipped via ``exclude``.
    """

    def __init__(self) -> None:
        self.entries: dict[tuple[str, int], tuple[int, tuple[int, ...], torch.dtype]] = {}
        self.excluded: int = 0
        self.result: Any = None

    @property
    def nbytes(self) -> int:
        return sum(n for n, _, _ in self.entries.values())

    def describe(self) -> str:
        parts = [f"{tuple(shape)}:{str(dtype).removeprefix('torch.')}={n}B" for n, shape, dtype in self.entries.values()]
        return ", ".join(parts) if parts else "(nothing)"


def record_saved_tensors(fn: Callable[[], Any], exclude: Iterable[Tensor] = ()) -> SavedTensorsRecord:
    """Run ``fn()`` under a pack hook and return a :class:`SavedTensorsRecord`.

    The hook passes tensors through unchanged, so ``fn``'s result (kept in
    ``record.result``) can still be backpropagated.
    """
    skip = {_storage_key(t) for t in exclude if isinstance(t, Tensor)}
    rec = SavedTensorsRecord()

    def pack(t: Tensor) -> Tensor:
        key = _storage_key(t)
        if key in skip:
            rec.excluded += 1
        elif key not in rec.entries:
            rec.entries[key] = (t.untyped_storage().nbytes(), tuple(t.shape), t.dtype)
        return t

    def unpack(t: Tensor) -> Tensor:
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        rec.result = fn()
    return rec


def saved_activation_bytes(fn: Callable[[], Any], exclude: Iterable[Tensor] = ()) -> int:
    """Bytes of distinct storages autograd saves for backward while ``fn()`` runs,
    excluding the storages of ``exclude`` (e.g. ``module.parameters()``)."""
    return record_saved_tensors(fn, exclude).nbytes
