"""4-bit (NF4 / FP4) blockwise quantization, byte-compatible with bitsandbytes.

The format (bitsandbytes >= 0.50, the oracle of ``tests/test_quant.py``):

* The weight [out, in] is **flattened**; consecutive runs of ``blocksize``
  elements form a block (a block may cross a row; the last one may be short).
* Each block stores ``absmax`` (fp32, the largest ``|w|``); every element is
  scaled into [-1, 1] and replaced by the index of the nearest entry of a
  16-entry code table (``quant_map``: NF4 or FP4).
* Two 4-bit codes per byte, the first element in the high nibble; the packed
  tensor is uint8 of shape ``[(n + 1) // 2, 1]``.
* Dequantize: ``w = (dtype)(quant_map[q] * absmax[i // blocksize])`` in fp32.
* Double quantization ("nested"): ``offset = absmax.mean()``;
  ``absmax - offset`` is quantized again, blockwise (256), to uint8 codes of
  the signed 8-bit dynamic map (``nested_quant_map``) with a per-block fp32
  ``nested_absmax``; restored as ``nested_quant_map[c] * nested_absmax[j // 256] + offset``.

Validation: the constructor checks the structure (types, shapes, dtypes,
devices; cheap, no tensor is read). :meth:`QuantizedWeight.from_state_dict`
and :meth:`QuantizedWeight.from_bnb` also check the values (finite absmax and
offset, the code tables) and name the state-dict key (or bitsandbytes
attribute) at fault; they return a fully validated object or raise
:class:`QuantStateError` (a ValueError) before anything is returned.

Everything here is pure PyTorch; bitsandbytes is imported lazily, and only by
:meth:`QuantizedWeight.from_bnb` when it is handed a bitsandbytes object.
"""

from __future__ import annotations

import json
import math
import operator
from dataclasses import dataclass, replace
from functools import lru_cache

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NESTED_BLOCKSIZE = 256

_NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
# FP4 (1 sign, 2 exponent, 1 mantissa bit; exponent bias 2), in code order,
# divided by its largest magnitude. Code 8 ("-0") is stored as +0.0, as
# bitsandbytes stores it.
_FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
# NOTE: the codes of FP4 in ascending order of value. The two zeros (codes 0
# and 8) tie; bitsandbytes ranks code 0 first, so a scaled value in
# [-max/384, 0] maps to code 0 and one in (0, max/384] to code 8. Kept for
# byte-exactness.
_FP4_ORDER = (11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3)

_JSON_KEY = "quant_state.bitsandbytes__"
# bitsandbytes' quantize_blockwise accepts these blocksizes (the nested level of double quantization).
NESTED_BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)
_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class QuantStateError(ValueError):
    """An invalid 4-bit quant state. The message names the field (or the
    state-dict key / bitsandbytes attribute), what it received and what was expected."""


class QuantStateTypeError(QuantStateError, TypeError):
    """A quant-state field of the wrong type or dtype (also a TypeError, as the constructor always raised)."""


class QuantStateKeyError(QuantStateError, KeyError):
    """A state dict without a key the quant state needs (also a KeyError, as ``from_state_dict`` always raised)."""

    __str__ = BaseException.__str__  # KeyError would quote the message


def quant_map(quant_type: str, device: torch.device | str | None = None) -> Tensor:
    """The 16-entry fp32 code table of ``quant_type`` (``"nf4"`` or ``"fp4"``), index = code."""
    _check_quant_type(quant_type)
    if quant_type == "nf4":
        return torch.tensor(_NF4, dtype=torch.float32, device=device)
    raw = torch.tensor(_FP4_RAW, dtype=torch.float32, device=device)
    return raw / 12.0


def dynamic_map(device: torch.device | str | None = None) -> Tensor:
    """The signed 8-bit dynamic map of bitsandbytes (256 sorted fp32 values), the
    code table of double quantization.

    For exponent e = 0..6 it holds the 2**e midpoints of ``linspace(0.1, 1, 2**e + 1)``
    scaled by ``10**(e - 6)``, with both signs, plus 0 and 1.
    """
    values: list[float] = []
    for e in range(7):
        edges = torch.linspace(0.1, 1.0, 2**e + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scale = 10.0 ** (e - 6)
        values += (scale * mids).tolist() + (-scale * mids).tolist()
    values += [0.0, 1.0]
    values.sort()
    return torch.tensor(values, dtype=torch.float32, device=device)


def _check_quant_type(quant_type) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


def _check_blocksize(blocksize, name: str = "blocksize") -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in BLOCKSIZES:
        raise ValueError(f"{name} must be a power of two in [32, 4096] (one of {BLOCKSIZES}), got {blocksize!r}")


def _nblocks(n: int, blocksize: int) -> int:
    return -(-n // blocksize)


def _normalize_shape(shape, name: str) -> tuple[int, ...]:
    """``shape`` as a tuple of ints; bools, floats and other non-integers are refused."""
    try:
        dims = tuple(shape)
    except TypeError:
        raise QuantStateError(f"{name} must be a sequence of positive integers, got {shape!r}") from None
    out = []
    for s in dims:
        try:
            if isinstance(s, bool):
                raise TypeError
            out.append(operator.index(s))
        except TypeError:
            raise QuantStateError(f"{name} must be a sequence of positive integers, got {list(dims)!r}") from None
    return tuple(out)


def _first_bad(bad: Tensor) -> tuple[int, int]:
    """(number of True entries, flat index of the first one) of a bool tensor."""
    flat = bad.reshape(-1)
    return int(flat.sum()), int(flat.nonzero()[0, 0])


def _check_finite(t: Tensor, name: str, what: str, nonnegative: bool = False) -> None:
    """Raise if ``t`` has a NaN / Inf (or, with ``nonnegative``, a negative) entry: name, count, first index."""
    bad = ~torch.isfinite(t)
    if bad.any():
        count, first = _first_bad(bad)
        raise QuantStateError(
            f"{name} has {count} non-finite value(s) (NaN or Inf) of {t.numel()}, the first at index {first} "
            f"({t.reshape(-1)[first].item()}); expected {what}, all finite"
        )
    if nonnegative:
        bad = t < 0
        if bad.any():
            count, first = _first_bad(bad)
            raise QuantStateError(
                f"{name} has {count} negative value(s) of {t.numel()}, the first at index {first} "
                f"({t.reshape(-1)[first].item()}); expected {what}, all >= 0"
            )


def _check_state(f: dict, names: dict[str, str] | None = None, values: bool = False) -> None:
    """Check the fields of a :class:`QuantizedWeight` (a dict by field name) against
    each other and bitsandbytes' format; raise :class:`QuantStateError` naming
    ``names[field]`` (the field name by default: a state-dict key, a bitsandbytes
    attribute), what it received and what was expected.

    Structure (always; reads no tensor data): quant_type, blocksize, shape, dtype;
    every tensor's type, dtype, shape and device against shape and blocksize, the
    nested absmax against nested_blocksize. With ``values`` (reads the tensors, a
    device sync on GPU): absmax finite and >= 0 (the nested absmax, the offset and
    the restored absmax when double-quantized), quant_map equal to the table of
    quant_type, nested_quant_map equal to bitsandbytes' signed dynamic map."""
    names = names or {}
    nm = lambda key: names.get(key, key)  # noqa: E731
    if f["quant_type"] not in QUANT_TYPES:
        raise QuantStateError(f"{nm('quant_type')} must be one of {QUANT_TYPES}, got {f['quant_type']!r}")
    blocksize = f["blocksize"]
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in BLOCKSIZES:
        raise QuantStateError(
            f"{nm('blocksize')} must be a power of two in [32, 4096] (one of {BLOCKSIZES}), got {blocksize!r}"
        )
    shape = f["shape"]
    if len(shape) < 1 or any(s < 1 for s in shape):
        raise QuantStateError(f"{nm('shape')} must be a non-empty tuple of positive sizes, got {shape}")
    if f["dtype"] not in DTYPES:
        raise QuantStateTypeError(f"{nm('dtype')} must be one of {DTYPES}, got {f['dtype']}")

    nested_fields = ("nested_absmax", "nested_quant_map", "offset")
    required = ("packed", "absmax", "quant_map")
    present = [k for k in nested_fields if f[k] is not None]
    if present and len(present) != 3:
        missing = [nm(k) for k in nested_fields if f[k] is None]
        raise QuantStateError(
            f"double quantization needs nested_absmax, nested_quant_map and offset together; got "
            f"{[nm(k) for k in present]} without {missing}"
        )
    nested = bool(present)
    for key in required + (nested_fields if nested else ()):
        if not isinstance(f[key], Tensor):
            raise QuantStateTypeError(f"{nm(key)} must be a torch.Tensor, got {type(f[key]).__name__}")
    device = f["packed"].device
    for key in required + (nested_fields if nested else ()):
        if f[key].device != device:
            raise QuantStateError(
                f"{nm(key)} is on {f[key].device} but {nm('packed')} is on {device}; expected every tensor on one device"
            )

    n = math.prod(shape)
    packed = f["packed"]
    if packed.dtype != torch.uint8:
        raise QuantStateTypeError(f"{nm('packed')} must be uint8, got dtype {packed.dtype}")
    if packed.numel() != (n + 1) // 2:
        raise QuantStateError(
            f"{nm('packed')} has {packed.numel()} bytes (shape {tuple(packed.shape)}) but shape {shape} "
            f"({n} elements) needs {(n + 1) // 2} bytes (expected shape [{(n + 1) // 2}, 1])"
        )
    nb = _nblocks(n, blocksize)
    absmax = f["absmax"]
    if absmax.dim() != 1 or absmax.numel() != nb:
        raise QuantStateError(
            f"{nm('absmax')} has shape {tuple(absmax.shape)} but shape {shape} with blocksize {blocksize} "
            f"has {nb} blocks (expected {nm('absmax')} of shape [{nb}])"
        )
    qmap = f["quant_map"]
    if tuple(qmap.shape) != (16,) or qmap.dtype != torch.float32:
        raise QuantStateError(
            f"{nm('quant_map')} must be fp32 of shape [16], got {tuple(qmap.shape)} {qmap.dtype}"
        )
    if nested:
        if absmax.dtype != torch.uint8:
            raise QuantStateTypeError(
                f"{nm('absmax')} must be uint8 codes when double-quantized, got dtype {absmax.dtype}"
            )
        nbs = f["nested_blocksize"]
        if isinstance(nbs, bool) or not isinstance(nbs, int) or nbs not in NESTED_BLOCKSIZES:
            raise QuantStateError(
                f"{nm('nested_blocksize')} must be one of {NESTED_BLOCKSIZES} (bitsandbytes' blockwise "
                f"quantization; it writes 256), got {nbs!r}"
            )
        nnb = _nblocks(nb, nbs)
        nested_absmax = f["nested_absmax"]
        if nested_absmax.dim() != 1 or nested_absmax.numel() != nnb or nested_absmax.dtype != torch.float32:
            raise QuantStateError(
                f"{nm('nested_absmax')} has shape {tuple(nested_absmax.shape)} ({nested_absmax.dtype}) but "
                f"{nb} absmax blocks with nested_blocksize {nbs} need fp32 of shape [{nnb}]"
            )
        nested_map = f["nested_quant_map"]
        if tuple(nested_map.shape) != (256,) or nested_map.dtype != torch.float32:
            raise QuantStateError(
                f"{nm('nested_quant_map')} must be fp32 of shape [256], got "
                f"{tuple(nested_map.shape)} {nested_map.dtype}"
            )
        offset = f["offset"]
        if offset.numel() != 1 or offset.dim() > 1 or offset.dtype != torch.float32:
            raise QuantStateError(
                f"{nm('offset')} must be one fp32 value (shape () or [1]), got shape {tuple(offset.shape)} {offset.dtype}"
            )
    elif absmax.dtype != torch.float32:
        raise QuantStateTypeError(
            f"{nm('absmax')} must be fp32 without double quantization, got dtype {absmax.dtype}"
        )

    if not values or device.type == "meta":
        return
    expected_map = quant_map(f["quant_type"])
    got_map = qmap.detach().cpu()
    if not torch.equal(got_map, expected_map):
        bad = got_map != expected_map
        i = int(bad.nonzero()[0, 0])
        raise QuantStateError(
            f"{nm('quant_map')} is not the {f['quant_type']} code table: {int(bad.sum())} of 16 entries differ, the "
            f"first at code {i} (got {got_map[i].item()!r}, expected {expected_map[i].item()!r}); expected "
            f"{expected_map.tolist()}"
        )
    if not nested:
        _check_finite(absmax, nm("absmax"), "the largest |w| of each block", nonnegative=True)
        return
    _check_dynamic_map(f["nested_quant_map"], nm("nested_quant_map"))
    _check_finite(f["nested_absmax"], nm("nested_absmax"), "the largest |absmax - offset| of each nested block",
                  nonnegative=True)
    offset_value = f["offset"].reshape(()).item()
    if not math.isfinite(offset_value):
        raise QuantStateError(f"{nm('offset')} is {offset_value}; expected a finite fp32 value (the mean absmax)")
    restored = _restore_absmax(absmax, f["nested_absmax"], f["nested_quant_map"], f["offset"], nbs)
    _check_finite(restored, f"the absmax restored from {nm('absmax')}, {nm('nested_absmax')} and {nm('offset')}",
                  "finite per-block absmax")


# NOTE: the dynamic map is built from fp32 linspace midpoints; other torch or
# bitsandbytes versions may round an entry differently in the last bits, so a
# stored map is accepted within 2**-20 relative (about 8 ulp) of ours, and its
# 0 exactly. Dequantization then uses the stored table, as bitsandbytes does.
_DYNAMIC_MAP_RTOL = 2.0**-20


def _check_dynamic_map(table: Tensor, name: str) -> None:
    got = table.detach().cpu()
    expected = dynamic_map()
    if not bool(torch.isfinite(got).all()):
        count, first = _first_bad(~torch.isfinite(got))
        raise QuantStateError(
            f"{name} has {count} non-finite value(s), the first at index {first}; expected bitsandbytes' signed "
            "8-bit dynamic map (create_dynamic_map(signed=True)): 256 sorted values in [-1, 1]"
        )
    err = (got - expected).abs()
    bad = err > _DYNAMIC_MAP_RTOL * expected.abs()
    if bad.any():
        count, first = _first_bad(bad)
        raise QuantStateError(
            f"{name} is not bitsandbytes' signed 8-bit dynamic map (create_dynamic_map(signed=True)): {count} of 256 "
            f"entries differ by more than {_DYNAMIC_MAP_RTOL:.1e} relative, the first at code {first} (got "
            f"{got[first].item()!r}, expected {expected[first].item()!r})"
        )


@dataclass(frozen=True)
class QuantizedWeight:
    """A 4-bit weight in bitsandbytes' layout (see the module docstring).

    packed:            uint8 [(n + 1) // 2, 1], two codes per byte, first in the high nibble.
    absmax:            fp32 [nblocks], or uint8 [nblocks] codes when double-quantized.
    quant_map:         fp32 [16], the 4-bit code table.
    nested_absmax:     fp32 [ceil(nblocks / nested_blocksize)] (double quant only).
    nested_quant_map:  fp32 [256], the dynamic map (double quant only).
    offset:            fp32 0-d tensor, the mean subtracted before double quant.
    quant_type, blocksize, shape (the weight's [out, in]), dtype (the weight's
    original dtype, the default of :func:`dequantize_4bit`), nested_blocksize.

    The constructor checks the structure (no tensor data is read; it runs on
    every QLoRA call); ``validate(values=True)`` also checks the values.
    Errors are :class:`QuantStateError` (a ValueError; the dtype ones also a TypeError).
    """

    packed: Tensor
    absmax: Tensor
    quant_map: Tensor
    quant_type: str
    blocksize: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    nested_absmax: Tensor | None = None
    nested_quant_map: Tensor | None = None
    offset: Tensor | None = None
    nested_blocksize: int = NESTED_BLOCKSIZE

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", _normalize_shape(self.shape, "shape"))
        self.validate()

    # -- properties ----------------------------------------------------------
    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nblocks(self) -> int:
        return _nblocks(self.numel, self.blocksize)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def tensors(self) -> dict[str, Tensor]:
        """The tensors of the quant state by bitsandbytes' names (without the ``weight.`` prefix)."""
        out = {"absmax": self.absmax, "quant_map": self.quant_map}
        if self.double_quant:
            out["nested_absmax"] = self.nested_absmax
            out["nested_quant_map"] = self.nested_quant_map
        return out

    def nbytes(self, include_tables: bool = True) -> int:
        """Bytes of storage: packed codes + absmax (+ nested absmax and the
        4-byte offset), plus the code tables (64 B, + 1024 B nested) if asked."""
        total = self.packed.numel() * self.packed.element_size() + self.absmax.numel() * self.absmax.element_size()
        if self.double_quant:
            total += self.nested_absmax.numel() * 4 + 4
        if include_tables:
            total += self.quant_map.numel() * 4
            if self.double_quant:
                total += self.nested_quant_map.numel() * 4
        return total

    # -- validation ----------------------------------------------------------
    def _fields(self) -> dict:
        return {k: getattr(self, k) for k in (
            "packed", "absmax", "quant_map", "quant_type", "blocksize", "shape", "dtype",
            "nested_absmax", "nested_quant_map", "offset", "nested_blocksize",
        )}  # fmt: skip

    def validate(self, values: bool = False) -> None:
        """Raise :class:`QuantStateError` naming the field if the state is inconsistent.

        Always checks the structure (types, dtypes, shapes, devices against
        ``shape`` and ``blocksize``). ``values=True`` also reads the tensors (a
        device sync on GPU): absmax finite and >= 0 (double quant: nested
        absmax, offset and the restored absmax), ``quant_map`` equal to the
        ``quant_type`` table, ``nested_quant_map`` bitsandbytes' dynamic map."""
        _check_state(self._fields(), values=values)

    # -- conversions ---------------------------------------------------------
    def to(self, device: torch.device | str) -> "QuantizedWeight":
        """The same quant state on ``device``."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(
            self,
            packed=move(self.packed),
            absmax=move(self.absmax),
            quant_map=move(self.quant_map),
            nested_absmax=move(self.nested_absmax),
            nested_quant_map=move(self.nested_quant_map),
            offset=move(self.offset),
        )

    def absmax_fp32(self) -> Tensor:
        """The per-block absmax in fp32, de-nested if double-quantized."""
        return _dequantize_absmax(self)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        return dequantize_4bit(self, dtype)

    def metadata(self) -> dict:
        """The non-tensor part of bitsandbytes' quant state (its JSON blob), same keys and order."""
        meta = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": str(self.dtype).removeprefix("torch."),
            "shape": list(self.shape),
        }
        if self.double_quant:
            meta.update(
                nested_blocksize=self.nested_blocksize,
                nested_dtype="float32",
                nested_offset=float(self.offset.item()),
            )
        return meta

    def state_dict(self, prefix: str = "weight") -> dict[str, Tensor]:
        """bitsandbytes' ``Linear4bit`` state-dict entries for a weight named ``prefix``:
        ``weight``, ``weight.absmax``, ``weight.quant_map``, (``weight.nested_absmax``,
        ``weight.nested_quant_map``,) ``weight.quant_state.bitsandbytes__<quant_type>``."""
        out = {prefix: self.packed}
        for key, t in self.tensors().items():
            out[f"{prefix}.{key}"] = t
        blob = json.dumps(self.metadata()).encode("utf-8")
        out[f"{prefix}.{_JSON_KEY}{self.quant_type}"] = torch.tensor(list(blob), dtype=torch.uint8, device=self.device)
        return out

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, Tensor], prefix: str = "weight") -> "QuantizedWeight":
        """Read the entries written by bitsandbytes (or :meth:`state_dict`) for the weight named ``prefix``.

        Every check (structure and values: see :meth:`validate`) runs before
        anything is returned; a failure is a :class:`QuantStateError` (a
        ValueError; a missing key also a KeyError) naming the state-dict key,
        what it holds and what was expected."""
        fields, names = _parse_state_dict(state_dict, prefix)
        _check_state(fields, names, values=True)
        return cls(**fields)

    @classmethod
    def from_bnb(cls, obj) -> "QuantizedWeight":
        """From a bitsandbytes ``Linear4bit`` (its weight) or ``Params4bit`` (quantized).

        The tensors are shared, not copied. The quant state is checked as
        :meth:`from_state_dict` checks it (errors name the bitsandbytes
        attribute) before anything is returned or written back."""
        import bitsandbytes as bnb  # optional dependency, imported only here

        param = obj.weight if isinstance(obj, bnb.nn.Linear4bit) else obj
        if not isinstance(param, bnb.nn.Params4bit):
            raise TypeError(f"expected a bitsandbytes Linear4bit or Params4bit, got {type(obj).__name__}")
        qs = getattr(param, "quant_state", None)
        if qs is None or not getattr(param, "bnb_quantized", True):
            raise ValueError(
                "the bitsandbytes weight is not quantized yet (no quant_state); move it to a device "
                "(e.g. .to('cpu') or .cuda()) so bitsandbytes quantizes it first"
            )
        data = param.data
        repacked = getattr(qs, "packing_format_for_cpu", False)
        if repacked:
            # NOTE: bitsandbytes' CPU inference path (eval, no grad, AVX512-BF16)
            # repacks the weight in place into a private layout with bf16 absmax.
            # Undo it with bitsandbytes' own inverse, exactly as its Linear4bit
            # does before saving a state dict or moving to a GPU; the absmax then
            # carries that bf16 rounding, which bitsandbytes itself introduced.
            # Written back to the module only once the result is validated.
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            data, qs = _convert_weight_packed_for_cpu_inverse(data, qs)
        fields, names = _parse_bnb(data, qs)
        _check_state(fields, names, values=True)
        if repacked:
            param.data, param.quant_state = data, qs
            if isinstance(obj, bnb.nn.Linear4bit):
                obj.quant_state = qs
        return cls(**fields)


def _parse_state_dict(state_dict: dict, prefix: str) -> tuple[dict, dict[str, str]]:
    """The fields of a QuantizedWeight from a bitsandbytes state dict, and the key
    naming each field; raises QuantStateError on what cannot be read at all."""
    if prefix not in state_dict:
        raise QuantStateKeyError(f"state dict has no packed weight {prefix!r}; keys: {sorted(state_dict)}")
    blobs = [k for k in state_dict if k.startswith(f"{prefix}.{_JSON_KEY}")]
    if len(blobs) != 1:
        raise QuantStateError(
            f"expected exactly one '{prefix}.{_JSON_KEY}nf4' or '...fp4' entry in the state dict, found {blobs}"
        )
    blob_key = blobs[0]
    key_type = blob_key[len(f"{prefix}.{_JSON_KEY}") :]
    blob = state_dict[blob_key]
    if not isinstance(blob, Tensor) or blob.dtype != torch.uint8 or blob.dim() != 1:
        got = f"{blob.dtype} {tuple(blob.shape)}" if isinstance(blob, Tensor) else type(blob).__name__
        raise QuantStateError(f"{blob_key} must be a 1-D uint8 tensor (the JSON bytes), got {got}")
    try:
        meta = json.loads(bytes(blob.cpu().tolist()).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise QuantStateError(f"{blob_key} is not a JSON quant state: {exc}") from exc
    if not isinstance(meta, dict):
        raise QuantStateError(f"{blob_key} is not a JSON quant state: expected an object, got {type(meta).__name__}")
    field = lambda name: f"{blob_key}[{name!r}]"  # noqa: E731
    for name in ("quant_type", "blocksize", "dtype", "shape"):
        if name not in meta:
            raise QuantStateError(f"{blob_key} lacks the field {name!r}; got {sorted(meta)}")
    if meta["quant_type"] != key_type:
        raise QuantStateError(f"{blob_key} says quant_type={meta['quant_type']!r}, its key says {key_type!r}")
    dtype = _DTYPE_NAMES.get(meta["dtype"]) if isinstance(meta["dtype"], str) else None
    if dtype is None:
        raise QuantStateError(
            f"{field('dtype')} is an unknown dtype {meta['dtype']!r}; expected one of {sorted(_DTYPE_NAMES)}"
        )
    shape = meta["shape"]
    if not isinstance(shape, list):
        raise QuantStateError(f"{field('shape')} must be a list of positive integers, got {shape!r}")
    shape = _normalize_shape(shape, field("shape"))

    names = {"packed": prefix, "quant_type": field("quant_type"), "blocksize": field("blocksize"),
             "shape": field("shape"), "dtype": field("dtype"), "nested_blocksize": field("nested_blocksize"),
             "offset": field("nested_offset")}  # fmt: skip
    tensors = {}
    for key in ("absmax", "quant_map", "nested_absmax", "nested_quant_map"):
        names[key] = f"{prefix}.{key}"
        tensors[key] = state_dict.get(f"{prefix}.{key}")
    for key in ("absmax", "quant_map"):
        if tensors[key] is None:
            raise QuantStateKeyError(f"state dict lacks {prefix}.{key}")
    nested = "nested_offset" in meta or any(tensors[k] is not None for k in ("nested_absmax", "nested_quant_map"))
    offset = None
    if nested:
        for key in ("nested_absmax", "nested_quant_map"):
            if tensors[key] is None:
                raise QuantStateKeyError(f"state dict lacks {prefix}.{key} (the quant state is double-quantized)")
        if "nested_offset" not in meta:
            raise QuantStateError(f"{blob_key} lacks nested_offset (the quant state is double-quantized)")
        if meta.get("nested_dtype", "float32") != "float32":
            raise QuantStateError(f"{field('nested_dtype')} must be 'float32', got {meta['nested_dtype']!r}")
        value = meta["nested_offset"]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise QuantStateError(f"{field('nested_offset')} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise QuantStateError(f"{field('nested_offset')} is {value}; expected a finite number (the mean absmax)")
        device = tensors["absmax"].device if isinstance(tensors["absmax"], Tensor) else None
        offset = torch.tensor(float(value), dtype=torch.float32, device=device)
    if not shape or any(s < 1 for s in shape):
        raise QuantStateError(f"{field('shape')} must be a non-empty list of positive sizes, got {list(shape)}")
    packed = state_dict[prefix]
    if not isinstance(packed, Tensor):
        raise QuantStateTypeError(f"{prefix} must be a torch.Tensor (the packed codes), got {type(packed).__name__}")
    if packed.dim() not in (1, 2) or (packed.dim() == 2 and packed.shape[1] != 1):
        raise QuantStateError(
            f"{prefix} has shape {tuple(packed.shape)}; expected the packed codes as [k, 1] (or flat [k]) "
            f"holding (n + 1) // 2 = {(math.prod(shape) + 1) // 2} bytes for shape {shape}"
        )
    fields = {
        "packed": _as_uint8(packed),
        "absmax": tensors["absmax"],
        "quant_map": tensors["quant_map"],
        "quant_type": meta["quant_type"],
        "blocksize": meta["blocksize"],
        "shape": shape,
        "dtype": dtype,
        "nested_absmax": tensors["nested_absmax"] if nested else None,
        "nested_quant_map": tensors["nested_quant_map"] if nested else None,
        "offset": offset,
        "nested_blocksize": meta.get("nested_blocksize", NESTED_BLOCKSIZE),
    }
    return fields, names


def _parse_bnb(data: Tensor, qs) -> tuple[dict, dict[str, str]]:
    """The fields of a QuantizedWeight from a bitsandbytes Params4bit's data and
    QuantState, and the attribute naming each field."""
    nested = getattr(qs, "state2", None) is not None
    names = {"packed": "Params4bit.data", "absmax": "quant_state.absmax", "quant_map": "quant_state.code",
             "quant_type": "quant_state.quant_type", "blocksize": "quant_state.blocksize",
             "shape": "quant_state.shape", "dtype": "quant_state.dtype", "nested_absmax": "quant_state.state2.absmax",
             "nested_quant_map": "quant_state.state2.code", "offset": "quant_state.offset",
             "nested_blocksize": "quant_state.state2.blocksize"}  # fmt: skip
    if not isinstance(data, Tensor):
        raise QuantStateTypeError(f"Params4bit.data must be a torch.Tensor, got {type(data).__name__}")
    offset = qs.offset if nested else None
    if nested and isinstance(offset, Tensor):
        if offset.numel() != 1:
            raise QuantStateError(f"quant_state.offset must be one value, got shape {tuple(offset.shape)}")
        offset = offset.reshape(()).float()
    fields = {
        "packed": _as_uint8(data),
        "absmax": qs.absmax,
        "quant_map": qs.code,
        "quant_type": qs.quant_type,
        "blocksize": qs.blocksize,
        "shape": _normalize_shape(qs.shape, names["shape"]),
        "dtype": qs.dtype,
        "nested_absmax": qs.state2.absmax if nested else None,
        "nested_quant_map": qs.state2.code if nested else None,
        "offset": offset,
        "nested_blocksize": qs.state2.blocksize if nested else NESTED_BLOCKSIZE,
    }
    return fields, names


def _as_uint8(t: Tensor) -> Tensor:
    """bitsandbytes may store the packed codes in another dtype (``quant_storage``): view as bytes."""
    if t.dtype != torch.uint8:
        t = t.contiguous().view(-1).view(torch.uint8)
    return t.reshape(-1, 1)


# -- quantize ------------------------------------------------------------------
def _scale_blocks(flat: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """Per-block absmax and the values scaled into [-1, 1], as bitsandbytes computes them.

    NOTE: bitsandbytes multiplies full blocks by the fp32 reciprocal of their
    absmax but *divides* the trailing short block by its absmax, which it also
    clamps to >= 1e-38 (full blocks keep an absmax of 0). The two roundings
    differ in the last bit now and then, so both are kept for byte-exactness.
    """
    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    blocks = flat[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp(-1.0, 1.0).reshape(-1)
    if rem:
        tail_absmax = flat[full:].abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_absmax.reshape(1)])
        scaled = torch.cat([scaled, (flat[full:] / tail_absmax).clamp(-1.0, 1.0)])
    return absmax, scaled


def _nearest_4bit(scaled: Tensor, quant_type: str) -> Tensor:
    """Code of the nearest table entry; ties (exactly on a midpoint) go to the lower value."""
    table = quant_map(quant_type, scaled.device)
    order = torch.tensor(_FP4_ORDER if quant_type == "fp4" else range(16), device=scaled.device)
    ascending = table[order]
    midpoints = (ascending[:-1] + ascending[1:]) / 2
    return order[torch.bucketize(scaled, midpoints)].to(torch.uint8)


@lru_cache(maxsize=8)
def _dynamic_lut(device: str) -> Tensor:
    """For each of 65536 evenly spaced points ``j / 65535 * 2 - 1`` of [-1, 1], the
    index of the nearest :func:`dynamic_map` entry (ties to the lower one)."""
    points = torch.arange(65536, dtype=torch.float64) / 65535 * 2 - 1
    table = dynamic_map().double()
    upper = torch.searchsorted(table, points).clamp(1, 255)
    lower = upper - 1
    up = (table[upper] - points).abs() < (points - table[lower]).abs()
    return torch.where(up, upper, lower).to(torch.uint8).to(device)


def _quantize_dynamic(values: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """bitsandbytes' 8-bit blockwise quantization (its CPU kernel) of fp32 ``values``
    with the signed dynamic map; returns ``(codes uint8, absmax fp32)``.

    NOTE: this is how bitsandbytes >= 0.50 quantizes on CPU, and the nested
    absmax codes must match it byte for byte: per block, u = clamp(v * (1 /
    absmax), -1, 1) in fp32, then a 65536-entry table indexed by
    ``trunc((u + 1) * 0.5 * 65535 + 0.5)`` gives the code (:func:`_dynamic_lut`).
    That is the nearest code up to the table's 2**-15 resolution, not always
    the nearest. A block of zeros gets code 0.
    """
    n = values.numel()
    pad = _nblocks(n, blocksize) * blocksize - n
    blocks = torch.nn.functional.pad(values, (0, pad)).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax).unsqueeze(1)).clamp(-1.0, 1.0).reshape(-1)[:n]
    zero = torch.isnan(scaled)
    index = (((scaled + 1.0) * 0.5) * 65535.0 + 0.5).masked_fill(zero, 0.0).to(torch.int64)
    codes = _dynamic_lut(str(values.device))[index].masked_fill(zero, 0)
    return codes, absmax


def _check_finite_weight(w: Tensor) -> None:
    """Refuse a weight with NaN / Inf: its block's absmax would be non-finite and,
    with double quantization, the mean offset too, so every value of the
    quantized weight would be (bitsandbytes quantizes it silently)."""
    finite = torch.isfinite(w.detach())
    if not bool(finite.all()):
        bad = ~finite
        count = int(bad.sum())
        first = tuple(int(i) for i in bad.nonzero()[0])
        flat = int(bad.reshape(-1).nonzero()[0, 0])
        raise ValueError(
            f"w has {count} non-finite value(s) (NaN or Inf) of {w.numel()} (shape {tuple(w.shape)}), the first at "
            f"index {first} (flat {flat}: {w.detach().reshape(-1)[flat].item()}); quantize_4bit needs a finite "
            "weight (one NaN/Inf makes its block, and with double quantization every block, non-finite)"
        )


def quantize_4bit(
    w: Tensor, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True
) -> QuantizedWeight:
    """Quantize ``w`` (any shape, fp32/fp16/bf16) to 4 bits, byte-identical to
    ``bitsandbytes.functional.quantize_4bit(w, blocksize=blocksize,
    compress_statistics=double_quant, quant_type=quant_type)``.

    ``w`` must be finite: a NaN or Inf raises a ValueError with their number and
    the first index (bitsandbytes would return a state that dequantizes to NaN)."""
    if not isinstance(w, Tensor):
        raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in DTYPES:
        raise TypeError(f"w must be fp32, fp16 or bf16, got dtype {w.dtype}")
    if w.numel() == 0:
        raise ValueError(f"w must not be empty, got shape {tuple(w.shape)}")
    _check_quant_type(quant_type)
    _check_blocksize(blocksize)
    _check_finite_weight(w)
    flat = w.detach().reshape(-1).float()
    absmax, scaled = _scale_blocks(flat, blocksize)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))  # the odd last nibble encodes 0.0
    q = _nearest_4bit(scaled, quant_type)
    packed = ((q[0::2] << 4) | q[1::2]).unsqueeze(1)
    kwargs = {}
    if double_quant:
        nested_map = dynamic_map(w.device)
        offset = absmax.mean()
        codes, nested_absmax = _quantize_dynamic(absmax - offset, NESTED_BLOCKSIZE)
        absmax = codes
        kwargs = dict(nested_absmax=nested_absmax, nested_quant_map=nested_map, offset=offset)
    return QuantizedWeight(
        packed=packed,
        absmax=absmax,
        quant_map=quant_map(quant_type, w.device),
        quant_type=quant_type,
        blocksize=blocksize,
        shape=tuple(w.shape),
        dtype=w.dtype,
        **kwargs,
    )


# -- dequantize ----------------------------------------------------------------
def _restore_absmax(codes: Tensor, nested_absmax: Tensor, nested_map: Tensor, offset: Tensor, nested_blocksize: int) -> Tensor:
    """``nested_map[codes[i]] * nested_absmax[i // nested_blocksize] + offset`` in fp32 [nblocks]."""
    nb = codes.numel()
    out = torch.index_select(nested_map, 0, codes.reshape(-1).to(torch.int32))
    full = nb - nb % nested_blocksize
    # Two roundings (product, then sum) as bitsandbytes does: no fused multiply-add.
    if full:
        out[:full].view(-1, nested_blocksize).mul_(nested_absmax[: full // nested_blocksize].unsqueeze(1))
    if full < nb:
        out[full:].mul_(nested_absmax[-1])
    return out.add_(offset.reshape(()))


def _dequantize_absmax(qw: QuantizedWeight) -> Tensor:
    if not qw.double_quant:
        return qw.absmax
    return _restore_absmax(qw.absmax, qw.nested_absmax, qw.nested_quant_map, qw.offset, qw.nested_blocksize)


def unpack_codes(packed: Tensor, n: int) -> Tensor:
    """The ``n`` 4-bit codes (int64) of a packed uint8 tensor, high nibble first."""
    flat = packed.reshape(-1)
    codes = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)
    return codes[:n].long()


@lru_cache(maxsize=8)
def _nibble_index(device: torch.device) -> Tensor:
    """int64 [256, 2]: the two codes of each byte value, high nibble first."""
    byte = torch.arange(256, device=device)
    return torch.stack([byte >> 4, byte & 0xF], dim=1)


def _byte_table(quant_map: Tensor) -> Tensor:
    """int64 [256]: entry b holds the fp32 pair ``(quant_map[b >> 4], quant_map[b & 15])``
    (high nibble first), so gathering it by packed byte writes two values at once.

    Cached per quant_map tensor (weakly: it goes with the tensor) and rebuilt when
    that tensor is modified in place (its version counter moves); building it
    costs ~15 us of op overhead, a tenth of a small layer's dequantization."""
    if quant_map.is_inference():  # no version counter to tell an in-place change: not cached
        return quant_map[_nibble_index(quant_map.device)].view(torch.int64).view(256)
    version = quant_map._version
    hit = _BYTE_TABLES.get(quant_map)
    if hit is not None and hit[0] == version:
        return hit[1]
    pairs = quant_map.detach()[_nibble_index(quant_map.device)]  # [256, 2] fp32
    table = pairs.view(torch.int64).view(256)
    _BYTE_TABLES[quant_map] = (version, table)
    return table


_BYTE_TABLES = WeakIdKeyDictionary()


# NOTE: on CPU the weight is dequantized in chunks of this many elements (2 MiB
# of fp32): the gathered values are scaled (and, for another dtype, converted)
# while they are still in cache, so memory sees the packed bytes once and the
# output once. Smaller chunks pay per-op overhead (4-5 ops of ~10 us per
# chunk); 256K, 512K and 1M elements measured within noise of each other (min
# of 80 calls, 2-core Zen 4: 1 MiB L2, 32 MiB L3), 64K and unchunked slower.
_CPU_CHUNK = 1 << 19


def dequantize_4bit(qw: QuantizedWeight, dtype: torch.dtype | None = None) -> Tensor:
    """The weight of ``qw`` (shape ``qw.shape``) in ``dtype`` (default ``qw.dtype``):
    ``quant_map[q] * absmax[i // blocksize]`` in fp32, rounded once to ``dtype``.
    Identical to ``bitsandbytes.functional.dequantize_4bit``.

    How: a 256-entry table maps each packed byte to its two fp32 values (one
    gather per byte, 8 bytes written), each block is multiplied in place by its
    absmax, and the fp32 result is converted once to ``dtype``; on CPU chunk by
    chunk, so the fp32 values never leave the cache unless they are the output.

    Speed on CPU (1 thread, 2048 x 2048, thread CPU time on the shared 2-core
    machine of ``bench/results/qlora_cpu.md``, from ``python
    bench/report_qlora.py --device cpu --threads 1``): 2.6-3.2x bitsandbytes
    0.50.2's native loop with fp32 output, 4.0-5.1x with fp16 / bf16. The byte
    gather (``torch.index_select``, a scalar loop) is the floor: alone it costs
    1.5-2x bitsandbytes' whole fp32 call there (the table's gather-floor
    column); every other gather PyTorch has (take, gather, indexing, embedding,
    embedding_bag, a 65536-entry table, grid_sample) is slower
    (``python bench/dequant_cpu_ideas.py``)."""
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"qw must be a QuantizedWeight, got {type(qw).__name__}")
    dtype = qw.dtype if dtype is None else dtype
    if dtype not in DTYPES + (torch.float64,):
        raise TypeError(f"dtype must be a floating dtype (fp32, fp16, bf16, fp64), got {dtype}")
    n, bs, device = qw.numel, qw.blocksize, qw.device
    table = _byte_table(qw.quant_map)
    absmax = _dequantize_absmax(qw)
    packed = qw.packed.reshape(-1)
    out = torch.empty(n, dtype=dtype, device=device)
    # Chunks hold whole blocks (an even number of elements: blocksize >= 32).
    chunk = max(bs, _CPU_CHUNK // bs * bs) if device.type == "cpu" else n
    buf = None if dtype == torch.float32 else torch.empty(min(chunk, n), dtype=torch.float32, device=device)
    # The int32 byte indices of one chunk (index_select takes no uint8 index), one buffer for all chunks.
    index = torch.empty(min(chunk, n) // 2, dtype=torch.int32, device=device)
    for e0 in range(0, n, chunk):
        e1 = min(n, e0 + chunk)
        vals = out[e0:e1] if buf is None else buf[: e1 - e0]
        pairs = (e1 - e0) // 2
        b0 = e0 // 2
        idx = index[:pairs]
        idx.copy_(packed[b0 : b0 + pairs])
        torch.index_select(table, 0, idx, out=vals[: 2 * pairs].view(torch.int64))
        if (e1 - e0) % 2:  # the last element of an odd-sized weight: the high nibble of the last byte
            vals[-1:] = qw.quant_map[(packed[b0 + pairs :] >> 4).long()]
        blk0, full = e0 // bs, (e1 - e0) // bs
        vals[: full * bs].view(full, bs).mul_(absmax[blk0 : blk0 + full].unsqueeze(1))
        if full * bs < e1 - e0:  # the short last block
            vals[full * bs :].mul_(absmax[blk0 + full])
        if buf is not None:
            out[e0:e1].copy_(vals)  # fp32 -> dtype, rounded once
    return out.view(qw.shape)
