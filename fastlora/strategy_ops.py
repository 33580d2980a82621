"""The stored dropout bits, and the strategies' formulations in plain PyTorch.

Stored bits (``dropout="stored_bits"``)
---------------------------------------
The keep-mask of x [M, K], 1 bit per element, row-major with each row padded
to whole bytes: ``bits`` uint8 [M, ceil(K / 8)], bit j of byte (m, b) is
keep(m, 8 b + j). Exactly ``M * ceil(K / 8)`` bytes (``M * K / 8`` when K is a
multiple of 8, as every real layer's is).

Where they live: the forward allocates S [M, r] and the bits as ONE storage,
S first, the bits right behind it, and returns S, a view of the head
(:func:`new_s_with_bits`). The op's saved set stays (x, S), its custom-op
schema and fake implementations are unchanged, and saved-tensor accounting
(which counts storages) sees S's storage grow by exactly the mask bytes.
Backward finds the bits with :func:`stored_bits`. Where they are not there (a
saved-tensor hook that copied S to the CPU, a forward that ran another
strategy) backward regenerates the mask from the seed, which is the same
mask: the bits are packed from exactly the mask that the "regenerate"
strategy draws. Either backward works after either forward, with identical
results.

The reference path (:class:`ReferenceStoredBits`) is ``fastlora.reference``'s
formulation with the mask drawn once: the forward packs it (one int64
multiply per 8 elements), the backward unpacks it (one table lookup per 8)
instead of drawing 16 random bits per element again.

Nothing here imports Triton.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor

from . import reference
from .quant import dequantize_4bit


def bits_per_row(k: int) -> int:
    """Bytes per row of a stored mask over K columns."""
    return (k + 7) // 8


def stored_mask_bytes(m: int, k: int) -> int:
    """Bytes of the stored keep-mask of x [M, K] (what "stored_bits" adds to the saved bytes)."""
    return m * bits_per_row(k)


def new_s_with_bits(m: int, r: int, k: int, dtype: torch.dtype, device) -> tuple[Tensor, Tensor]:
    """``(s, bits)``: S [M, r] in ``dtype`` and the mask bytes [M, ceil(K / 8)],
    one allocation with S at its head (contiguous, storage offset 0)."""
    s_bytes = m * r * torch.empty((), dtype=dtype).element_size()
    buf = torch.empty(s_bytes + stored_mask_bytes(m, k), dtype=torch.uint8, device=device)
    s = buf[:s_bytes].view(dtype).view(m, r)
    bits = buf[s_bytes:].view(m, bits_per_row(k))
    return s, bits


def stored_bits(s: Tensor, k: int) -> Tensor | None:
    """The mask bytes stored behind S (see :func:`new_s_with_bits`) for x with K
    columns, or None when S's storage does not hold them."""
    m, _ = s.shape
    nbytes = stored_mask_bytes(m, k)
    s_bytes = s.numel() * s.element_size()
    storage = s.untyped_storage()
    if not (s.is_contiguous() and s.storage_offset() == 0 and storage.nbytes() == s_bytes + nbytes):
        return None
    bits = torch.empty(0, dtype=torch.uint8, device=s.device)
    return bits.set_(storage, s_bytes, (m, bits_per_row(k)), (bits_per_row(k), 1))


# NOTE: packing, little-endian: the 8 mask bytes (0 / 1) of a group, read as one
# int64 w, times this constant put byte i's bit at position 56 + i (every
# partial product lands on its own bit position, so nothing carries into the
# top byte; the product wraps mod 2**64, which torch's int64 multiply does).
# One multiply and one shift per 8 elements: ~0.3 ms for 2M elements on one
# core against ~12 ms to draw them again.
_SPREAD = 0x0102040810204080
_UNPACK_TABLES: dict[torch.device, Tensor] = {}


def pack_bits(mask: Tensor, out: Tensor) -> Tensor:
    """Pack a bool mask [M, K] into ``out`` uint8 [M, ceil(K / 8)] (bit j of
    byte b = mask[:, 8 b + j]); returns ``out``."""
    m, k = mask.shape
    kb = bits_per_row(k)
    if m == 0 or kb == 0:
        return out
    u8 = mask.contiguous().view(torch.uint8)
    if k != 8 * kb or u8.storage_offset() % 8:
        padded = torch.zeros((m, 8 * kb), dtype=torch.uint8, device=mask.device)
        padded[:, :k] = u8
        u8 = padded
    if sys.byteorder == "little":
        out.copy_(torch.bitwise_right_shift(u8.view(torch.int64) * _SPREAD, 56))  # int64 -> uint8 keeps the low byte
    else:  # pragma: no cover - no big-endian machine here
        weights = torch.tensor([1 << j for j in range(8)], dtype=torch.int16, device=mask.device)
        out.copy_((u8.view(m, kb, 8).to(torch.int16) * weights).sum(-1))
    return out


def _unpack_table(device: torch.device) -> Tensor:
    """[256] int64 whose bytes (in memory order) are the 8 bits of the index, bit 0 first."""
    table = _UNPACK_TABLES.get(device)
    if table is None:
        codes = torch.arange(256, device=device)
        table = ((codes[:, None] >> torch.arange(8, device=device)) & 1).to(torch.uint8).view(torch.int64).view(256)
        _UNPACK_TABLES[device] = table
    return table


def unpack_bits(bits: Tensor, k: int) -> Tensor:
    """The mask [M, K] as uint8 0 / 1 from its packed bytes [M, ceil(K / 8)]
    (one table lookup per byte; a uint8 0/1 converts to a float mask ~10x
    faster than a bool does)."""
    m, kb = bits.shape
    words = torch.index_select(_unpack_table(bits.device), 0, bits.reshape(-1).to(torch.int32))
    return words.view(torch.uint8).view(m, 8 * kb)[:, :k]


# ----------------------------------------------------------------------------
# the reference path with stored bits: fastlora.reference's pair, the mask drawn once
# ----------------------------------------------------------------------------


class ReferenceStoredBits:
    """``fastlora.reference``'s forward/backward with the dropout mask stored as
    bits in forward and read back in backward (same mask, same results).
    Without dropout every function is the reference's own."""

    @staticmethod
    def lora_forward(x, weight, lora_A, lora_B, scaling, bias=None, dropout_p=0.0, seed=0):
        """``(y, s)`` as ``reference.lora_forward``; S carries the packed mask."""
        if dropout_p <= 0.0:
            return reference.lora_forward(x, weight, lora_A, lora_B, scaling, bias, dropout_p, seed)
        m, k = x.shape
        mixed = lora_A.dtype != x.dtype
        xl = x.to(lora_A.dtype) if mixed else x
        mask, keep = reference.dropout_keep_mask(seed, (m, k), dropout_p, x.device)
        s, bits = new_s_with_bits(m, lora_A.shape[0], k, xl.dtype, x.device)
        pack_bits(mask, bits)
        # NOTE: from here on reference.lora_forward's dropout branch, step for step
        # (same ops, same order: bit-identical results).
        xd = reference.mask_float(mask, xl.dtype).mul_(xl)
        s.addmm_(xd, lora_A.t(), beta=0, alpha=1.0 / keep)
        y = torch.addmm(bias, x, weight.t()) if bias is not None else torch.mm(x, weight.t())
        if mixed:
            y = torch.addmm(y.to(lora_A.dtype), s, lora_B.t(), alpha=scaling).to(x.dtype)
        else:
            y.addmm_(s, lora_B.t(), alpha=scaling)
        return y, s

    @staticmethod
    def lora_backward(dy, x, weight, lora_A, lora_B, s, scaling, dropout_p=0.0, seed=0, needs=(True, False, True, True, False)):
        """``(dx, dweight, dA, dB, dbias)`` as ``reference.lora_backward``, the mask
        unpacked from S's storage (regenerated from the seed if S lost it)."""
        need_x, need_w, need_a, need_b, need_bias = needs
        bits = stored_bits(s, x.shape[1]) if dropout_p > 0.0 else None
        if bits is None or not (need_x or need_a):
            return reference.lora_backward(dy, x, weight, lora_A, lora_B, s, scaling, dropout_p, seed, needs)
        _, keep = reference.dropout_keep_threshold(dropout_p)
        mixed = lora_A.dtype != x.dtype
        dyl = dy.to(lora_A.dtype) if mixed else dy
        # NOTE: reference.lora_backward's dropout branch, step for step, with the
        # float mask converted from the unpacked bytes instead of a fresh draw.
        ds = torch.addmm(dyl.new_empty(dy.shape[0], lora_B.shape[1]), dyl, lora_B, beta=0, alpha=scaling)
        db = torch.addmm(dyl.new_empty(lora_B.shape), dyl.t(), s, beta=0, alpha=scaling) if need_b else None
        mf = unpack_bits(bits, x.shape[1]).to(lora_A.dtype)
        dx = da = None
        if need_x:
            dx = torch.mm(dy, weight)
            lora_dx = torch.mm(ds, lora_A)
            if mixed:
                dx.add_(lora_dx.mul_(mf), alpha=1.0 / keep)
            else:
                dx.addcmul_(lora_dx, mf, value=1.0 / keep)
        if need_a:
            xd = mf.mul_(x.to(lora_A.dtype) if mixed else x)
            da = torch.addmm(dyl.new_empty(lora_A.shape), ds.t(), xd, beta=0, alpha=1.0 / keep)
        dw = torch.mm(dy.t(), x) if need_w else None
        dbias = dy.sum(0) if need_bias else None
        return dx, dw, da, db, dbias

    @staticmethod
    def dora_forward(x, weight, lora_A, lora_B, scaling, col_scale, bias=None, dropout_p=0.0, seed=0):
        """``(y, z, s)`` as ``reference.dora_forward``, S carrying the mask."""
        z, s = ReferenceStoredBits.lora_forward(x, weight, lora_A, lora_B, scaling, None, dropout_p, seed)
        g = col_scale.to(z.dtype)
        y = torch.mul(z, g) if bias is None else torch.addcmul(bias.to(z.dtype), z, g)
        return y, z, s

    @staticmethod
    def qlora_forward(x, qweight, lora_A, lora_B, scaling, bias=None, dropout_p=0.0, seed=0):
        """``(y, s)`` as ``reference.qlora_forward`` (deq(W) a temporary, freed on return)."""
        weight = dequantize_4bit(qweight, x.dtype)
        return ReferenceStoredBits.lora_forward(x, weight, lora_A, lora_B, scaling, bias, dropout_p, seed)

    @staticmethod
    def qlora_backward(dy, x, qweight, lora_A, lora_B, s, scaling, dropout_p=0.0, seed=0, needs=(True, False, True, True, False)):
        """``(dx, None, dA, dB, dbias)`` as ``reference.qlora_backward``."""
        need_x, need_w, need_a, need_b, need_bias = needs
        if need_w:
            raise ValueError("qlora_backward: the 4-bit base weight is frozen; it has no gradient")
        weight = dequantize_4bit(qweight, dy.dtype) if need_x else None
        dx, _, da, db, dbias = ReferenceStoredBits.lora_backward(
            dy, x, weight, lora_A, lora_B, s, scaling, dropout_p, seed, (need_x, False, need_a, need_b, need_bias)
        )
        return dx, None, da, db, dbias


__all__ = [
    "ReferenceStoredBits", "bits_per_row", "new_s_with_bits", "pack_bits", "stored_bits", "stored_mask_bytes",
    "unpack_bits",
]  # fmt: skip
