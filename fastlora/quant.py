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

Everything here is pure PyTorch; bitsandbytes is imported lazily, and only by
:meth:`QuantizedWeight.from_bnb` when it is handed a bitsandbytes object.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from functools import lru_cache

import torch
from torch import Tensor

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
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
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
    def validate(self) -> None:
        """Raise a ValueError / TypeError naming the field if the state is inconsistent."""
        _check_quant_type(self.quant_type)
        _check_blocksize(self.blocksize)
        if len(self.shape) < 1 or any(s < 1 for s in self.shape):
            raise ValueError(f"shape must be a non-empty tuple of positive sizes, got {self.shape}")
        if self.dtype not in DTYPES:
            raise TypeError(f"dtype must be one of {DTYPES}, got {self.dtype}")
        n = self.numel
        if self.packed.dtype != torch.uint8:
            raise TypeError(f"packed must be uint8, got dtype {self.packed.dtype}")
        if self.packed.numel() != (n + 1) // 2:
            raise ValueError(
                f"packed has {self.packed.numel()} bytes (shape {tuple(self.packed.shape)}) but shape {self.shape} "
                f"({n} elements) needs {(n + 1) // 2} bytes (expected shape [{(n + 1) // 2}, 1])"
            )
        nb = _nblocks(n, self.blocksize)
        if self.absmax.dim() != 1 or self.absmax.numel() != nb:
            raise ValueError(
                f"absmax has shape {tuple(self.absmax.shape)} but shape {self.shape} with blocksize {self.blocksize} "
                f"has {nb} blocks (expected absmax of shape [{nb}])"
            )
        if tuple(self.quant_map.shape) != (16,) or self.quant_map.dtype != torch.float32:
            raise ValueError(
                f"quant_map must be fp32 of shape [16], got {tuple(self.quant_map.shape)} {self.quant_map.dtype}"
            )
        nested = (self.nested_absmax, self.nested_quant_map, self.offset)
        if any(t is not None for t in nested) and any(t is None for t in nested):
            raise ValueError("double quantization needs nested_absmax, nested_quant_map and offset together")
        if self.double_quant:
            if self.absmax.dtype != torch.uint8:
                raise TypeError(f"absmax must be uint8 codes when double-quantized, got dtype {self.absmax.dtype}")
            if isinstance(self.nested_blocksize, bool) or not isinstance(self.nested_blocksize, int) or self.nested_blocksize < 1:
                raise ValueError(f"nested_blocksize must be a positive integer, got {self.nested_blocksize!r}")
            nnb = _nblocks(nb, self.nested_blocksize)
            if self.nested_absmax.dim() != 1 or self.nested_absmax.numel() != nnb or self.nested_absmax.dtype != torch.float32:
                raise ValueError(
                    f"nested_absmax has shape {tuple(self.nested_absmax.shape)} ({self.nested_absmax.dtype}) but "
                    f"{nb} absmax blocks with nested_blocksize {self.nested_blocksize} need fp32 of shape [{nnb}]"
                )
            if tuple(self.nested_quant_map.shape) != (256,) or self.nested_quant_map.dtype != torch.float32:
                raise ValueError(
                    "nested_quant_map must be fp32 of shape [256], got "
                    f"{tuple(self.nested_quant_map.shape)} {self.nested_quant_map.dtype}"
                )
            if self.offset.numel() != 1 or self.offset.dtype != torch.float32:
                raise ValueError(f"offset must be one fp32 value, got shape {tuple(self.offset.shape)} {self.offset.dtype}")
        elif self.absmax.dtype != torch.float32:
            raise TypeError(f"absmax must be fp32 without double quantization, got dtype {self.absmax.dtype}")

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
        """Read the entries written by bitsandbytes (or :meth:`state_dict`) for the weight named ``prefix``."""
        if prefix not in state_dict:
            raise KeyError(f"state dict has no packed weight {prefix!r}; keys: {sorted(state_dict)}")
        blobs = [k for k in state_dict if k.startswith(f"{prefix}.{_JSON_KEY}")]
        if len(blobs) != 1:
            raise ValueError(
                f"expected exactly one '{prefix}.{_JSON_KEY}nf4' or '...fp4' entry in the state dict, found {blobs}"
            )
        key_type = blobs[0][len(f"{prefix}.{_JSON_KEY}") :]
        try:
            meta = json.loads(bytes(state_dict[blobs[0]].cpu().tolist()).decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"{blobs[0]} is not a JSON quant state: {exc}") from exc
        for field in ("quant_type", "blocksize", "dtype", "shape"):
            if field not in meta:
                raise ValueError(f"{blobs[0]} lacks the field {field!r}; got {sorted(meta)}")
        if meta["quant_type"] != key_type:
            raise ValueError(f"{blobs[0]} says quant_type={meta['quant_type']!r}, its key says {key_type!r}")
        tensors = {}
        for key in ("absmax", "quant_map", "nested_absmax", "nested_quant_map"):
            tensors[key] = state_dict.get(f"{prefix}.{key}")
        for key in ("absmax", "quant_map"):
            if tensors[key] is None:
                raise KeyError(f"state dict lacks {prefix}.{key}")
        nested = "nested_offset" in meta or any(tensors[k] is not None for k in ("nested_absmax", "nested_quant_map"))
        offset = None
        if nested:
            for key in ("nested_absmax", "nested_quant_map"):
                if tensors[key] is None:
                    raise KeyError(f"state dict lacks {prefix}.{key} (the quant state is double-quantized)")
            if "nested_offset" not in meta:
                raise ValueError(f"{blobs[0]} lacks nested_offset (the quant state is double-quantized)")
            if meta.get("nested_dtype", "float32") != "float32":
                raise ValueError(f"nested_dtype must be 'float32', got {meta['nested_dtype']!r}")
            offset = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32, device=tensors["absmax"].device)
        dtype = getattr(torch, str(meta["dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"{blobs[0]} has an unknown dtype {meta['dtype']!r}")
        return cls(
            packed=_as_uint8(state_dict[prefix]),
            absmax=tensors["absmax"],
            quant_map=tensors["quant_map"],
            quant_type=meta["quant_type"],
            blocksize=meta["blocksize"],
            shape=tuple(meta["shape"]),
            dtype=dtype,
            nested_absmax=tensors["nested_absmax"] if nested else None,
            nested_quant_map=tensors["nested_quant_map"] if nested else None,
            offset=offset,
            nested_blocksize=int(meta.get("nested_blocksize", NESTED_BLOCKSIZE)),
        )

    @classmethod
    def from_bnb(cls, obj) -> "QuantizedWeight":
        """From a bitsandbytes ``Linear4bit`` (its weight) or ``Params4bit`` (quantized)."""
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
        if getattr(qs, "packing_format_for_cpu", False):
            # NOTE: bitsandbytes' CPU inference path (eval, no grad, AVX512-BF16)
            # repacks the weight in place into a private layout with bf16 absmax.
            # Undo it with bitsandbytes' own inverse, exactly as its Linear4bit
            # does before saving a state dict or moving to a GPU; the absmax then
            # carries that bf16 rounding, which bitsandbytes itself introduced.
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            param.data, param.quant_state = _convert_weight_packed_for_cpu_inverse(param.data, qs)
            qs = param.quant_state
            if isinstance(obj, bnb.nn.Linear4bit):
                obj.quant_state = qs
        nested = qs.state2 is not None
        return cls(
            packed=_as_uint8(param.data),
            absmax=qs.absmax,
            quant_map=qs.code,
            quant_type=qs.quant_type,
            blocksize=qs.blocksize,
            shape=tuple(qs.shape),
            dtype=qs.dtype,
            nested_absmax=qs.state2.absmax if nested else None,
            nested_quant_map=qs.state2.code if nested else None,
            offset=qs.offset.reshape(()).float() if nested else None,
            nested_blocksize=qs.state2.blocksize if nested else NESTED_BLOCKSIZE,
        )


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


def quantize_4bit(
    w: Tensor, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True
) -> QuantizedWeight:
    """Quantize ``w`` (any shape, fp32/fp16/bf16) to 4 bits, byte-identical to
    ``bitsandbytes.functional.quantize_4bit(w, blocksize=blocksize,
    compress_statistics=double_quant, quant_type=quant_type)``."""
    if not isinstance(w, Tensor):
        raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in DTYPES:
        raise TypeError(f"w must be fp32, fp16 or bf16, got dtype {w.dtype}")
    if w.numel() == 0:
        raise ValueError(f"w must not be empty, got shape {tuple(w.shape)}")
    _check_quant_type(quant_type)
    _check_blocksize(blocksize)
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
def _dequantize_absmax(qw: QuantizedWeight) -> Tensor:
    if not qw.double_quant:
        return qw.absmax
    nb = qw.absmax.numel()
    scale = qw.nested_absmax.repeat_interleave(qw.nested_blocksize)[:nb]
    # Two roundings (product, then sum) as bitsandbytes does: no fused multiply-add.
    return qw.nested_quant_map[qw.absmax.long()] * scale + qw.offset


def unpack_codes(packed: Tensor, n: int) -> Tensor:
    """The ``n`` 4-bit codes (int64) of a packed uint8 tensor, high nibble first."""
    flat = packed.reshape(-1)
    codes = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)
    return codes[:n].long()


def dequantize_4bit(qw: QuantizedWeight, dtype: torch.dtype | None = None) -> Tensor:
    """The weight of ``qw`` (shape ``qw.shape``) in ``dtype`` (default ``qw.dtype``):
    ``quant_map[q] * absmax[i // blocksize]`` in fp32, rounded once to ``dtype``.
    Identical to ``bitsandbytes.functional.dequantize_4bit``."""
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"qw must be a QuantizedWeight, got {type(qw).__name__}")
    dtype = qw.dtype if dtype is None else dtype
    if dtype not in DTYPES + (torch.float64,):
        raise TypeError(f"dtype must be a floating dtype (fp32, fp16, bf16, fp64), got {dtype}")
    n = qw.numel
    # NOTE: a 256-entry table maps each packed byte to its two values (high
    # nibble first); index_select over the bytes is ~10x faster on CPU than
    # unpacking codes and gathering one value per element.
    byte = torch.arange(256, device=qw.device)
    pairs = torch.stack([qw.quant_map[byte >> 4], qw.quant_map[byte & 0xF]], dim=1)  # [256, 2]
    values = torch.index_select(pairs, 0, qw.packed.reshape(-1).int()).view(-1)[:n]
    absmax = _dequantize_absmax(qw)
    rem = n % qw.blocksize
    full = n - rem
    out = torch.empty(n, dtype=torch.float32, device=qw.device)
    blocks = full // qw.blocksize
    torch.mul(values[:full].view(blocks, qw.blocksize), absmax[:blocks].unsqueeze(1), out=out[:full].view(blocks, qw.blocksize))
    if rem:
        torch.mul(values[full:], absmax[-1], out=out[full:])
    out = out.view(qw.shape)
    return out if dtype == torch.float32 else out.to(dtype)
