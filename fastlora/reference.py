"""The specification of fastlora's ops in plain PyTorch, and the CPU path.

Everything here is the readable twin of a Triton kernel in ``fastlora.kernels``:
the kernels are tested against these functions, and these functions are tested
against float64 math and PEFT. They are also what runs on CPU (and on CUDA
without Triton), so they are written to be fast as well as clear:

* the forward writes the [M, N] output once (``addmm`` into it) and keeps no
  other [M, N] temporary;
* the dropout mask is never stored: it is regenerated from an integer seed in
  backward (:func:`dropout_keep_mask`);
* what backward needs is X (the caller's tensor, not a copy) and
  ``S = dropout(X) A^T`` of shape [M, r].

Shapes (2-D; the autograd layer flattens leading dims):
  x [M, K], weight [N, K], lora_A [r, K], lora_B [N, r], bias [N], s [M, r].
Dtypes: x, weight, bias share one; the adapters share x's or are float32 (then
the LoRA branch, S and the adapter gradients are float32, as in PEFT).
  ``y = x W^T + scaling * dropout(x) A^T B^T + bias``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .quant import QuantizedWeight, dequantize_4bit

# NOTE: dropout draws 16 random bits per element. Drawing them as int64 words
# and reinterpreting is ~5x cheaper on CPU than ``bernoulli_`` (which is what
# makes a regenerated mask affordable). The keep probability is therefore
# rounded to a multiple of 2**-16 (|error| <= 7.7e-6) and the kept values are
# scaled by 1 / (that rounded probability), so dropout stays exactly unbiased.
_DROPOUT_BITS = 16
_DROPOUT_LEVELS = 1 << _DROPOUT_BITS


def dropout_keep_threshold(p: float) -> tuple[int, float]:
    """Return ``(threshold, keep)``: an element is kept when its signed 16-bit
    random value is ``< threshold``; ``keep`` is the exact keep probability."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"dropout probability must be in (0, 1), got {p}")
    kept_levels = round((1.0 - p) * _DROPOUT_LEVELS)
    kept_levels = min(max(kept_levels, 1), _DROPOUT_LEVELS - 1)
    return kept_levels - _DROPOUT_LEVELS // 2, kept_levels / _DROPOUT_LEVELS


def dropout_keep_mask(seed: int, shape: tuple[int, int], p: float, device: torch.device) -> tuple[Tensor, float]:
    """The dropout keep-mask for ``seed`` (bool, ``shape``) and the keep probability.

    Deterministic in ``(seed, shape, p, device type)``: forward and backward call
    it with the same arguments and get the same mask.
    """
    threshold, keep = dropout_keep_threshold(p)
    numel = shape[0] * shape[1]
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    words = (numel + 3) // 4  # four 16-bit draws per int64 word
    bits = torch.randint(
        -(2**63), 2**63 - 1, (words,), dtype=torch.int64, device=device, generator=gen
    ).view(torch.int16)[:numel]
    return (bits < threshold).view(shape), keep


def lora_forward(
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    bias: Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """``y = x W^T + scaling * (dropout(x) A^T) B^T + bias``; returns ``(y, s)``.

    x [M, K], weight [N, K], lora_A [r, K], lora_B [N, r], bias [N] -> y [M, N],
    s = dropout(x) A^T [M, r] (what backward needs, besides x).
    """
    # The LoRA branch runs in the adapters' dtype: float32 adapters on a bf16/fp16
    # base give PEFT's mixed precision (branch in fp32, one rounding of the sum).
    mixed = lora_A.dtype != x.dtype
    xl = x.to(lora_A.dtype) if mixed else x
    if dropout_p > 0.0:
        mask, keep = dropout_keep_mask(seed, (x.shape[0], x.shape[1]), dropout_p, x.device)
        # One float copy of the mask becomes dropout(x) in place (a temporary of
        # the forward, never saved); 1/keep is folded into the GEMM's alpha.
        xd = mask.to(xl.dtype).mul_(xl)
        s = torch.addmm(xl.new_empty(x.shape[0], lora_A.shape[0]), xd, lora_A.t(), beta=0, alpha=1.0 / keep)
    else:
        s = F.linear(xl, lora_A)
    # NOTE: F.linear is addmm(bias, x, W^T) (mm without a bias), the same GEMM with the
    # same result; one call of it costs less host time than a Python-level W.t() (a view,
    # ~0.9 us) and then addmm (bench/host_overhead.py measures the whole call).
    y = F.linear(x, weight, bias)
    if mixed:
        y = torch.addmm(y.to(lora_A.dtype), s, lora_B.t(), alpha=scaling).to(x.dtype)
    else:
        y.addmm_(s, lora_B.t(), alpha=scaling)
    return y, s


def dora_forward(
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    col_scale: Tensor,
    bias: Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """DoRA's forward ``y = g * z + bias`` with ``z = x W^T + scaling * (dropout(x) A^T) B^T``;
    returns ``(y, z, s)``.

    x [M, K], weight [N, K], lora_A [r, K], lora_B [N, r], col_scale g [N]
    (DoRA's m / ||W + s B A||, float32 or float64), bias [N] -> y, z [M, N] in
    x's dtype, s [M, r] as :func:`lora_forward`. z is what DoRA's backward needs
    for dm. g is rounded to z's dtype and y is one new tensor (``addcmul``):
    the same values as scaling :func:`lora_forward`'s output afterwards.
    """
    z, s = lora_forward(x, weight, lora_A, lora_B, scaling, None, dropout_p, seed)
    g = col_scale.to(z.dtype)
    y = torch.mul(z, g) if bias is None else torch.addcmul(bias.to(z.dtype), z, g)
    return y, z, s


def lora_backward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    s: Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    seed: int = 0,
    needs: tuple[bool, bool, bool, bool, bool] = (True, False, True, True, False),
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Gradients ``(dx, dweight, dA, dB, dbias)`` of :func:`lora_forward`.

    With D = dropout (a fixed mask m scaled by 1/keep) and dS = scaling * dY B [M, r]:
      dB = scaling * dY^T S                  [N, r]
      dA = dS^T D(x)                         [r, K]
      dx = dY W + D(dS A)  (D is linear and self-adjoint: m * (dS A) / keep)
      dW = dY^T x ; dbias = sum_m dY
    ``needs`` selects which of the five are computed (others are None).
    Nothing saved is written to.
    """
    need_x, need_w, need_a, need_b, need_bias = needs
    dx = dw = da = db = dbias = None
    ds = None
    mixed = lora_A.dtype != x.dtype  # the LoRA branch in the adapters' dtype
    dyl = dy.to(lora_A.dtype) if mixed else dy
    # NOTE: with beta=0 addmm ignores its first argument (its values are neither read
    # nor propagated, NaN included), so a tensor of the result's shape and dtype stands
    # in for it: s [M, r] for dS, lora_B for dB. Neither is written (out of place); this
    # saves a new_empty call each (host time, bench/host_overhead.py).
    if need_x or need_a:
        ds = torch.addmm(s, dyl, lora_B, beta=0, alpha=scaling)
    if need_b:
        db = torch.addmm(lora_B, dyl.t(), s, beta=0, alpha=scaling)
    if dropout_p > 0.0 and (need_x or need_a):
        mask, keep = dropout_keep_mask(seed, (x.shape[0], x.shape[1]), dropout_p, x.device)
        m = mask.to(lora_A.dtype)  # one float copy, used by dx and then turned into dropout(x) for dA
        if need_x:
            dx = torch.mm(dy, weight)
            lora_dx = torch.mm(ds, lora_A)
            if mixed:
                dx.add_(lora_dx.mul_(m), alpha=1.0 / keep)
            else:
                dx.addcmul_(lora_dx, m, value=1.0 / keep)
        if need_a:
            xd = m.mul_(x.to(lora_A.dtype) if mixed else x)
            da = torch.addmm(dyl.new_empty(lora_A.shape), ds.t(), xd, beta=0, alpha=1.0 / keep)
    else:
        if need_a:
            da = torch.mm(ds.t(), x.to(lora_A.dtype) if mixed else x)
        if need_x:
            dx = torch.mm(dy, weight)
            if mixed:
                dx.add_(torch.mm(ds, lora_A))
            else:
                dx.addmm_(ds, lora_A)
    if need_w:
        dw = torch.mm(dy.t(), x)
    if need_bias:
        dbias = dy.sum(0)
    return dx, dw, da, db, dbias


def qlora_forward(
    x: Tensor,
    qweight: QuantizedWeight,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    bias: Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """QLoRA: ``y = x deq(W)^T + scaling * (dropout(x) A^T) B^T + bias``; returns ``(y, s)``.

    x [M, K], qweight [N, K] (4-bit), lora_A [r, K], lora_B [N, r], bias [N] -> y
    [M, N], s [M, r]. deq(W) is a temporary in x's dtype, freed on return (the
    twin of ``fastlora.kernels.nf4.qlora_forward``, which dequantizes in the tiles).
    """
    weight = dequantize_4bit(qweight, x.dtype)
    return lora_forward(x, weight, lora_A, lora_B, scaling, bias, dropout_p, seed)


def qlora_backward(
    dy: Tensor,
    x: Tensor,
    qweight: QuantizedWeight,
    lora_A: Tensor,
    lora_B: Tensor,
    s: Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    seed: int = 0,
    needs: tuple[bool, bool, bool, bool, bool] = (True, False, True, True, False),
) -> tuple[Tensor | None, None, Tensor | None, Tensor | None, Tensor | None]:
    """Gradients ``(dx, None, dA, dB, dbias)`` of :func:`qlora_forward`; the 4-bit
    weight is frozen (its slot is always None). As :func:`lora_backward` with
    deq(W) rebuilt here (only when dx is needed) and freed on return."""
    need_x, need_w, need_a, need_b, need_bias = needs
    if need_w:
        raise ValueError("qlora_backward: the 4-bit base weight is frozen; it has no gradient")
    weight = dequantize_4bit(qweight, dy.dtype) if need_x else None
    dx, _, da, db, dbias = lora_backward(
        dy, x, weight, lora_A, lora_B, s, scaling, dropout_p, seed, (need_x, False, need_a, need_b, need_bias)
    )
    return dx, None, da, db, dbias


def lora_linear_float64(
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    bias: Tensor | None = None,
    keep_mask: Tensor | None = None,
    keep: float = 1.0,
) -> Tensor:
    """The textbook formula in float64 autograd, the oracle of the tests.

    ``keep_mask`` [.., K] (bool) and ``keep`` describe a fixed dropout.
    """
    x64 = x.double()
    xd = x64 if keep_mask is None else x64 * keep_mask.double() / keep
    y = x64 @ weight.double().t() + scaling * (xd @ lora_A.double().t()) @ lora_B.double().t()
    if bias is not None:
        y = y + bias.double()
    return y


# ----------------------------------------------------------------------------
# many adapters in one batch: the twins of fastlora.kernels.lora_multi
# ----------------------------------------------------------------------------
#
# Shapes (2-D; fastlora.multi flattens leading dims): x [M, K], weight [N, K],
# lora_A [n, r, K], lora_B [n, N, r] (smaller ranks zero-padded by the caller),
# scaling [n] float32, adapter_ids [M] integer (any shape with M elements;
# -1 = the base alone), bias [N], s [M, r] in x's row order (zero on base rows).
#   y[m] = x[m] W^T + bias + scaling[a] * dropout(x)[m] A[a]^T B[a]^T,  a = adapter_ids[m]
# The dropout mask is the single-adapter op's for the same seed (one [M, K]
# mask over x, rows in x's order), so a row's mask does not depend on which
# adapter it uses or how the batch is sorted.


def adapter_segments(adapter_ids: Tensor, n_adapters: int) -> tuple[Tensor, list[int]]:
    """The rows grouped by adapter: ``(order, counts)``.

    ``order`` [M] int64 is a stable argsort of the ids: the base rows (-1)
    first, then adapter 0's rows, adapter 1's, ... each in x's order;
    ``counts`` is ``n_adapters + 1`` Python ints (base rows, then the rows of
    each adapter). One sort and one host read of ``n_adapters + 2`` bounds
    (a device sync on CUDA). Raises a ValueError naming ``adapter_ids`` when an
    id is outside [-1, n_adapters).
    """
    ids = adapter_ids.reshape(-1).to(torch.int64)
    sorted_ids, order = torch.sort(ids, stable=True)
    # bounds[j] = first sorted position with id >= j - 1: segment j (j = 0 the base)
    # is [bounds[j], bounds[j + 1]); every id is in range iff bounds[0] == 0 and
    # bounds[-1] == M.
    probes = torch.arange(-1, n_adapters + 1, dtype=torch.int64, device=ids.device)
    bounds = torch.searchsorted(sorted_ids, probes).tolist()
    if bounds[0] != 0 or bounds[-1] != ids.numel():
        lo, hi = int(sorted_ids[0]), int(sorted_ids[-1])
        raise ValueError(
            f"adapter_ids must be in [-1, {n_adapters}) (-1 = the base alone; {n_adapters} = lora_A.shape[0] "
            f"adapters), got values from {lo} to {hi}"
        )
    return order, [b - a for a, b in zip(bounds[:-1], bounds[1:])]


def _segment_slices(counts: list[int]):
    """(adapter, slice of the adapter rows in sorted order) for every adapter with rows."""
    lo = 0
    for a, c in enumerate(counts[1:]):
        if c:
            yield a, slice(lo, lo + c)
        lo += c


def lora_multi_forward(
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: Tensor,
    adapter_ids: Tensor,
    bias: Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """``y[m] = x[m] W^T + bias + scaling[a] * dropout(x)[m] A[a]^T B[a]^T``; returns ``(y, s)``.

    x [M, K], weight [N, K], lora_A [n, r, K], lora_B [n, N, r], scaling [n],
    adapter_ids [M] (-1 = base only), bias [N] -> y [M, N], s [M, r] =
    dropout(x)[m] A[a]^T in x's row order (zero on base rows), in the adapters'
    dtype. The base GEMM runs once over all rows in x's order; the LoRA rows are
    gathered once in adapter order (:func:`adapter_segments`) and each adapter's
    contiguous segment takes two small GEMMs (shrink, expand), whose result is
    added into its rows of y (``index_add_``). Temporaries: the gathered LoRA
    rows of x and one segment's [rows, N] expand; nothing [M, N] besides y.

    NOTE: a loop over the adapters, not ``torch.bmm`` over segments padded to the
    longest: on CPU (1 thread, 8 ragged adapters, r=16) the LoRA part took 0.94 ms
    vs 1.75 ms (M=512, K=N=512) and 5.5 vs 13.5 ms (M=2048, K=N=1024), best of
    repeats; padding wastes work and memory on ragged batches.
    """
    m, k = x.shape
    n_adapters, r = lora_A.shape[0], lora_A.shape[1]
    order, counts = adapter_segments(adapter_ids, n_adapters)
    y = torch.addmm(bias, x, weight.t()) if bias is not None else torch.mm(x, weight.t())
    s = torch.zeros((m, r), dtype=lora_A.dtype, device=x.device)
    if counts[0] == m:
        return y, s
    mixed = lora_A.dtype != x.dtype  # the LoRA branch in the adapters' dtype, as lora_forward
    rows = order[counts[0] :]  # the LoRA rows, grouped by adapter
    xs = x.index_select(0, rows)
    if mixed:
        xs = xs.to(lora_A.dtype)
    alpha = 1.0
    if dropout_p > 0.0:
        mask, keep = dropout_keep_mask(seed, (m, k), dropout_p, x.device)
        xs.mul_(mask.index_select(0, rows))  # dropout(x) rows; 1/keep folded into the shrink
        alpha = 1.0 / keep
    ss = torch.empty((rows.numel(), r), dtype=lora_A.dtype, device=x.device)
    acc = y.to(lora_A.dtype) if mixed else y  # mixed: one rounding of base + LoRA, as lora_forward
    scales = scaling.tolist()
    for a, seg in _segment_slices(counts):
        torch.addmm(ss[seg], xs[seg], lora_A[a].t(), beta=0, alpha=alpha, out=ss[seg])
        acc.index_add_(0, rows[seg], torch.mm(ss[seg], lora_B[a].t()), alpha=scales[a])
    s.index_copy_(0, rows, ss)
    return (acc.to(x.dtype) if mixed else acc), s


def lora_multi_backward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: Tensor,
    adapter_ids: Tensor,
    s: Tensor,
    dropout_p: float = 0.0,
    seed: int = 0,
    needs: tuple[bool, bool, bool, bool, bool] = (True, False, True, True, False),
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Gradients ``(dx, dweight, dA, dB, dbias)`` of :func:`lora_multi_forward`.

    Per row m of adapter a (D = dropout, m / keep; dS = scaling[a] * dY B[a]):
      dB[a] = scaling[a] * sum_{m in a} dY[m]^T S[m]     [n, N, r]
      dA[a] = sum_{m in a} dS[m]^T D(x)[m]              [n, r, K]
      dx[m] = dY[m] W + D(dS[m] A[a])   (base rows: dY[m] W)
      dW = dY^T x ; dbias = sum_m dY
    An adapter without rows gets zeros. ``needs`` selects which of the five are
    computed (others None). The segments come from the ids again (one sort);
    nothing saved is written to.
    """
    need_x, need_w, need_a, need_b, need_bias = needs
    m, k = x.shape
    n_adapters, r = lora_A.shape[0], lora_A.shape[1]
    mixed = lora_A.dtype != x.dtype
    dx = torch.mm(dy, weight) if need_x else None
    da = torch.empty_like(lora_A) if need_a else None
    db = torch.empty_like(lora_B) if need_b else None
    if need_x or need_a or need_b:
        order, counts = adapter_segments(adapter_ids, n_adapters)
        for a, c in enumerate(counts[1:]):
            if c == 0:  # an adapter without rows: zero gradients (the others are written whole below)
                for g in (da, db):
                    if g is not None:
                        g[a].zero_()
        rows = order[counts[0] :]
        if rows.numel():
            ml, branch = rows.numel(), lora_A.dtype
            dys = dy.index_select(0, rows)
            if mixed:
                dys = dys.to(branch)
            scales = scaling.tolist()
            keep, ms = 1.0, None
            if dropout_p > 0.0 and (need_x or need_a):
                mask, keep = dropout_keep_mask(seed, (m, k), dropout_p, x.device)
                ms = mask.index_select(0, rows).to(branch)
            ss = s.index_select(0, rows) if need_b else None
            dss = torch.empty((ml, r), dtype=branch, device=dy.device) if (need_x or need_a) else None
            if need_a:
                xs = x.index_select(0, rows)
                xs = xs.to(branch) if mixed else xs
                if ms is not None:
                    xs.mul_(ms)  # dropout(x) rows (1/keep in the GEMM's alpha)
            lora_dx = torch.empty((ml, k), dtype=branch, device=dy.device) if need_x else None
            for a, seg in _segment_slices(counts):
                if dss is not None:
                    torch.addmm(dss[seg], dys[seg], lora_B[a], beta=0, alpha=scales[a], out=dss[seg])
                if need_b:
                    torch.addmm(db[a], dys[seg].t(), ss[seg], beta=0, alpha=scales[a], out=db[a])
                if need_a:
                    torch.addmm(da[a], dss[seg].t(), xs[seg], beta=0, alpha=1.0 / keep, out=da[a])
                if need_x:
                    torch.mm(dss[seg], lora_A[a], out=lora_dx[seg])
            if need_x:
                if ms is not None:
                    lora_dx.mul_(ms)
                if mixed:
                    # NOTE: one rounding of dY W + the fp32 LoRA term, as lora_backward.
                    full = torch.zeros((m, k), dtype=branch, device=dy.device).index_copy_(0, rows, lora_dx)
                    dx.add_(full, alpha=1.0 / keep)
                else:
                    dx.index_add_(0, rows, lora_dx, alpha=1.0 / keep)
    dw = torch.mm(dy.t(), x) if need_w else None
    dbias = dy.sum(0) if need_bias else None
    return dx, dw, da, db, dbias


def lora_multi_float64(
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: Tensor,
    adapter_ids: Tensor,
    bias: Tensor | None = None,
    keep_mask: Tensor | None = None,
    keep: float = 1.0,
) -> Tensor:
    """The per-row formula in float64 autograd, the oracle of the tests: every row
    gathers its own A, B and scale (no sorting, no segments).

    x [M, K], adapter_ids [M]; ``keep_mask`` [M, K] (bool) and ``keep`` describe a
    fixed dropout. Base rows (-1) get x W^T + bias.
    """
    ids = adapter_ids.reshape(-1).to(torch.int64)
    on = (ids >= 0).to(torch.float64)[:, None]
    a = ids.clamp(min=0)
    x64 = x.double()
    xd = x64 if keep_mask is None else x64 * keep_mask.double() / keep
    s = torch.einsum("mk,mrk->mr", xd, lora_A.double()[a])
    lora = torch.einsum("mr,mnr->mn", s, lora_B.double()[a])
    y = x64 @ weight.double().t() + on * scaling.double()[a][:, None] * lora
    if bias is not None:
        y = y + bias.double()
    return y
