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

import itertools
from typing import NamedTuple

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
    # NOTE: random_(min, None) on int64 draws raw 64-bit words (every value equally
    # likely; randint over [-2^63, 2^63 - 1) reduces each draw modulo its range):
    # 1.7 vs 2.0-2.5 ms for 2M elements on CPU, 1 thread.
    bits = torch.empty(words, dtype=torch.int64, device=device).random_(-(2**63), None, generator=gen)
    bits = bits.view(torch.int16)[:numel]
    # NOTE: the comparison writes uint8 0 / 1, read back as bool (the same bytes):
    # on CPU ~2x cheaper than a bool output (0.45 vs 1.0 ms for 2M elements, 1
    # thread; bench/report_dropout_cpu.py, "the mask's pieces").
    keep_bytes = torch.empty(numel, dtype=torch.uint8, device=device)
    torch.lt(bits, threshold, out=keep_bytes)
    return keep_bytes.view(torch.bool).view(shape), keep


def mask_float(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A bool keep-mask as 0 / 1 in ``dtype``, converted from its bytes read as uint8
    (the same values; on CPU ~3x cheaper than bool -> float: 0.5 vs 1.6 ms for 2M
    elements, 1 thread, `bench/report_dropout.py`'s "the mask's pieces")."""
    return mask.view(torch.uint8).to(dtype)


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
        xd = mask_float(mask, xl.dtype).mul_(xl)
        s = torch.addmm(xl.new_empty(x.shape[0], lora_A.shape[0]), xd, lora_A.t(), beta=0, alpha=1.0 / keep)
    else:
        s = F.linear(xl, lora_A)
    # NOTE: F.linear is addmm(bias, x, W^T) (mm without a bias), the same GEMM with the
    # same result; one call of it costs less host time than a Python-level W.t() (a view,
    # ~0.9 us) and then addmm (bench/host_overhead.py measures the whole call).
    # NOTE: lora_B.mT (a property) rather than lora_B.t() (a method): the same view of a 2-D
    # tensor with no argument parsing, ~1,600 instructions (~0.25 us) fewer (callgrind,
    # bench/host_overhead.py's layer); likewise in lora_backward.
    y = F.linear(x, weight, bias)
    if mixed:
        y = torch.addmm(y.to(lora_A.dtype), s, lora_B.mT, alpha=scaling).to(x.dtype)
    else:
        y.addmm_(s, lora_B.mT, alpha=scaling)
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
        db = torch.addmm(lora_B, dyl.mT, s, beta=0, alpha=scaling)
    if dropout_p > 0.0 and (need_x or need_a):
        mask, keep = dropout_keep_mask(seed, (x.shape[0], x.shape[1]), dropout_p, x.device)
        m = mask_float(mask, lora_A.dtype)  # one float copy, used by dx and then turned into dropout(x) for dA
        if need_x:
            dx = torch.mm(dy, weight)
            lora_dx = torch.mm(ds, lora_A)
            if mixed:
                dx.add_(lora_dx.mul_(m), alpha=1.0 / keep)
            else:
                dx.addcmul_(lora_dx, m, value=1.0 / keep)
        if need_a:
            xd = m.mul_(x.to(lora_A.dtype) if mixed else x)
            da = torch.addmm(dyl.new_empty(lora_A.shape), ds.mT, xd, beta=0, alpha=1.0 / keep)
    else:
        if need_a:
            da = torch.mm(ds.mT, x.to(lora_A.dtype) if mixed else x)
        if need_x:
            dx = torch.mm(dy, weight)
            if mixed:
                dx.add_(torch.mm(ds, lora_A))
            else:
                dx.addmm_(ds, lora_A)
    if need_w:
        dw = torch.mm(dy.mT, x)
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
    each adapter). One host read of the ids (a device sync on CUDA), grouped in
    Python (see :func:`_multi_plan`). Raises a ValueError naming ``adapter_ids`` when an
    id is outside [-1, n_adapters).
    """
    plan = _multi_plan(adapter_ids, n_adapters, 1, 1, 1, path="grouped")
    return plan.order, plan.counts


class MultiPlan(NamedTuple):
    """How :func:`lora_multi_forward` / :func:`lora_multi_backward` walk the adapters.

    path: ``"runs"``, ``"padded"`` or ``"grouped"`` (see :func:`multi_path`).
    counts: ``n_adapters + 1`` ints: base rows, then each adapter's rows.
    runs: the maximal runs of one adapter in x's row order, ``(adapter, start, stop)``
      (base rows excluded).
    order: [M] int64 on the ids' device, the rows grouped by adapter (a stable sort of
      the ids: base rows first, then adapter 0's, ...); None on the runs path.
    slot: [LoRA rows] int64, each LoRA row's place in the padded layout (adapter a's
      j-th row -> a * width + j), in ``order``'s order; padded path only, else None.
    width: the rows per adapter of the padded layout (the largest count).
    sizes, chunks: x's rows cut into maximal runs of one id (base runs included):
      each run's length and its id (-1 = base), for ``Tensor.split``.
    """

    path: str
    counts: list[int]
    runs: list[tuple[int, int, int]]
    order: Tensor | None
    slot: Tensor | None
    width: int
    sizes: list[int]
    chunks: list[int]


# NOTE: the cost rule's units, fitted on the CPU this was written on (AMD EPYC, 2
# cores, torch 2.13 + MKL, 1 thread, thread CPU time, medians of interleaved rounds;
# /tmp scripts timing each path forced, forward only, against lora_forward):
# one small torch call right after the base GEMM costs ~12 us (one unit); the grouped
# path's fixed calls (gathers, scatter, S copy) ~40 units, the padded path's ~80
# (its ~10 distinct ops each run cold after the GEMM); a unit copies ~25_000 elements
# or does ~250_000 multiply-adds of a small bmm. Measured (thread ms, 8 adapters, r=16,
# K=N=1024 unless noted; runs / padded / grouped vs one adapter): M=16 decode 1.50 /
# 1.70 / 1.75; M=8 decode 1.42 / 1.87 / 1.72; M=64 one row per sample (60 runs) 1.55
# / 1.47 / 1.38; M=64 two samples on one adapter 1.05 / - / 1.24; M=512 (16 samples
# x 32, K=N=512) 1.14 / 1.50 / 1.30; M=64 decode over 64 adapters 1.71 / 1.96 / 1.91.
# So on this CPU the rule picks runs or grouped; padded wins only with many rows per
# call on few, fully used adapters and is kept (forced with ``path``) for other devices.
_OP_ELEMS_COPIED = 25_000
_OP_MACS = 250_000
_GROUPED_FIXED = 40.0
_PADDED_FIXED = 80.0


def multi_path(n_adapters: int, counts: list[int], n_runs: int, k: int, n_out: int, r: int) -> str:
    """The cost rule that picks how the LoRA rows are walked (no timing at runtime).

    Costs in units of one small torch call (see the NOTE above for the constants):
      runs:    2 * n_runs                       two GEMMs per maximal run of one adapter
                                                in x's order, on slices of x, S and y: no copies
      grouped: 40 + 3 * used + ml * (K + 2N) / 25_000
                                                the LoRA rows gathered in adapter order, two
                                                GEMMs + an index_add_ per adapter with rows
      padded:  80 + n * c * r * (K + N) / 250_000 + n * r * (K + N) / 25_000
                                                BGMV: every adapter's rows padded to c = the
                                                largest count, two torch.bmm over all n adapters
                                                (reading every adapter's A and B, used or not)
    where ml = the LoRA rows, used = adapters with rows. The cheapest wins (ties: runs,
    then grouped); ``padded`` also needs n * c <= 4 * ml + n (its temporaries [n * c,
    max(K, N)] stay within ~4x the gathered rows).
    """
    ml = sum(counts[1:])
    if ml == 0:
        return "runs"
    used = sum(1 for c in counts[1:] if c)
    width = max(counts[1:])
    costs = {
        "runs": 2.0 * n_runs,
        "grouped": _GROUPED_FIXED + 3.0 * used + ml * (k + 2 * n_out) / _OP_ELEMS_COPIED,
    }
    if n_adapters * width <= 4 * ml + n_adapters:
        costs["padded"] = (
            _PADDED_FIXED + n_adapters * width * r * (k + n_out) / _OP_MACS + n_adapters * r * (k + n_out) / _OP_ELEMS_COPIED
        )
    return min(costs, key=costs.__getitem__)


def _multi_plan(
    adapter_ids: Tensor, n_adapters: int, k: int, n_out: int, r: int, path: str | None = None
) -> MultiPlan:
    """Read the ids once (``tolist``: one host read, a device sync on CUDA), find the
    runs and counts in Python, check the id range and pick the path (:func:`multi_path`,
    or ``path`` when given).

    NOTE: host Python, not torch ops: on CPU (1 thread, right after the base GEMM) each
    distinct small torch op cost 15-75 us of thread time (cold code after the GEMM;
    a sort + searchsorted + run count took ~0.5 ms at M=64), while the list walk costs
    ~0.1 us per row (itertools.groupby in C).
    """
    ids = adapter_ids.reshape(-1).tolist()
    m = len(ids)
    counts = [0] * (n_adapters + 1)
    runs: list[tuple[int, int, int]] = []
    sizes: list[int] = []
    chunks: list[int] = []
    lo = 0
    for a, group in itertools.groupby(ids):
        hi = lo + len(list(group))
        sizes.append(hi - lo)
        chunks.append(a)
        if not -1 <= a < n_adapters:
            raise ValueError(
                f"adapter_ids must be in [-1, {n_adapters}) (-1 = the base alone; {n_adapters} = lora_A.shape[0] "
                f"adapters), got values from {min(ids)} to {max(ids)}"
            )
        counts[a + 1] += hi - lo
        if a >= 0:
            runs.append((a, lo, hi))
        lo = hi
    if path is None:
        path = multi_path(n_adapters, counts, len(runs), k, n_out, r)
    elif path not in ("runs", "padded", "grouped"):
        raise ValueError(f"path must be 'runs', 'padded', 'grouped' or None (the cost rule), got {path!r}")
    width = max(counts[1:], default=0)
    order = slot = None
    if path != "runs":
        rows_of: list[list[int]] = [[] for _ in range(n_adapters + 1)]  # base rows, then each adapter's
        lo = 0
        for a, group in itertools.groupby(ids):
            hi = lo + len(list(group))
            rows_of[a + 1].extend(range(lo, hi))
            lo = hi
        flat = list(itertools.chain.from_iterable(rows_of))
        if path == "padded":
            flat += [a * width + j for a, c in enumerate(counts[1:]) for j in range(c)]
        both = torch.tensor(flat, dtype=torch.int64, device=adapter_ids.device)
        order = both[:m]
        slot = both[m:] if path == "padded" else None
    return MultiPlan(path, counts, runs, order, slot, width, sizes, chunks)


def _segment_slices(counts: list[int]):
    """(adapter, slice of the adapter rows in sorted order) for every adapter with rows."""
    lo = 0
    for a, c in enumerate(counts[1:]):
        if c:
            yield a, slice(lo, lo + c)
        lo += c


def _scaled(t: Tensor, scaling: Tensor) -> Tensor:
    """t [n, c, r] times each adapter's scale; half precision: the product in float32
    and one rounding (as a GEMM's float ``alpha``), so the scale is not rounded first."""
    if t.element_size() < 4:
        return (t.float() * scaling.view(-1, 1, 1)).to(t.dtype)
    return t.mul_(scaling.view(-1, 1, 1).to(t.dtype))


def _pad(t: Tensor, slot: Tensor, n_adapters: int, width: int) -> Tensor:
    """[n_adapters, width, t.shape[1]]: the rows of ``t`` at ``slot``, zeros elsewhere."""
    out = t.new_zeros((n_adapters * width, t.shape[1]))
    return out.index_copy_(0, slot, t).view(n_adapters, width, t.shape[1])


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
    *,
    path: str | None = None,
) -> tuple[Tensor, Tensor]:
    """``y[m] = x[m] W^T + bias + scaling[a] * dropout(x)[m] A[a]^T B[a]^T``; returns ``(y, s)``.

    x [M, K], weight [N, K], lora_A [n, r, K], lora_B [n, N, r], scaling [n],
    adapter_ids [M] (-1 = base only), bias [N] -> y [M, N], s [M, r] =
    dropout(x)[m] A[a]^T in x's row order (zero on base rows), in the adapters'
    dtype. The base GEMM runs once over all rows in x's order; the LoRA rows take
    one of three paths (:func:`multi_path` picks by a cost rule; ``path`` forces one):

    * ``runs``: each maximal run of rows on one adapter (in x's order) takes the
      single-adapter op's two GEMMs on its slice of x, s and y: no copies. The
      usual training batch (one adapter per sample) has few, long runs.
    * ``grouped``: the LoRA rows gathered once in adapter order
      (:func:`adapter_segments`), two GEMMs per adapter, the expand added into y's
      rows (``index_add_``). Many short runs, many rows per adapter.
    * ``padded`` (BGMV): each adapter's rows padded to the longest segment,
      ``torch.bmm`` for the shrink and the expand of all adapters at once. Few
      rows per adapter (decoding): a fixed number of torch calls.

    Temporaries: the runs path only the single-adapter op's (dropout(x) [M, K]
    with dropout; the fp32 copy of y when mixed); grouped: the gathered rows and
    one segment's [rows, N] expand; padded: [n * c, K] and [n * c, N] with n * c
    <= 4 * (LoRA rows) + n. Nothing else [M, N] besides y.
    """
    m, k = x.shape
    n_adapters, r = lora_A.shape[0], lora_A.shape[1]
    plan = _multi_plan(adapter_ids, n_adapters, k, weight.shape[0], r, path)
    y = torch.addmm(bias, x, weight.t()) if bias is not None else torch.mm(x, weight.t())
    s = torch.zeros((m, r), dtype=lora_A.dtype, device=x.device)
    if plan.counts[0] == m:
        return y, s
    mixed = lora_A.dtype != x.dtype  # the LoRA branch in the adapters' dtype, as lora_forward
    branch = lora_A.dtype
    acc = y.to(branch) if mixed else y  # mixed: one rounding of base + LoRA, as lora_forward
    alpha, mask = 1.0, None
    if dropout_p > 0.0:
        mask, keep = dropout_keep_mask(seed, (m, k), dropout_p, x.device)
        alpha = 1.0 / keep  # folded into the shrink
    if plan.path == "runs":
        xl = x.to(branch) if mixed else x
        xd = mask_float(mask, branch).mul_(xl) if mask is not None else xl
        scales = scaling.tolist()
        # NOTE: the run slices and adapter views come from one split / unbind each (one
        # dispatch for all of them; a slice per run cost as much as its GEMM on CPU).
        a_t, b_t = lora_A.transpose(1, 2).unbind(0), lora_B.transpose(1, 2).unbind(0)
        sizes = plan.sizes
        for a, xr, sr, yr in zip(plan.chunks, xd.split(sizes), s.split(sizes), acc.split(sizes)):
            if a >= 0:
                torch.addmm(sr, xr, a_t[a], beta=0, alpha=alpha, out=sr)
                yr.addmm_(sr, b_t[a], alpha=scales[a])
        return (acc.to(x.dtype) if mixed else acc), s
    rows = plan.order[plan.counts[0] :]  # the LoRA rows, grouped by adapter
    xs = x.index_select(0, rows)
    if mixed:
        xs = xs.to(branch)
    if mask is not None:
        xs.mul_(mask.index_select(0, rows))  # dropout(x) rows; 1/keep folded into the shrink
    if plan.path == "padded":
        slot = plan.slot
        sp = torch.baddbmm(
            xs.new_empty(()), _pad(xs, slot, n_adapters, plan.width), lora_A.transpose(1, 2), beta=0, alpha=alpha
        )  # [n, c, r]
        s.index_copy_(0, rows, sp.view(-1, r).index_select(0, slot))
        # NOTE: the scales multiply S (n * c * r values) in float32, one rounding to the branch dtype.
        sp = _scaled(sp, scaling)
        ep = torch.bmm(sp, lora_B.transpose(1, 2))  # [n, c, N]
        acc.index_add_(0, rows, ep.view(-1, ep.shape[2]).index_select(0, slot))
        return (acc.to(x.dtype) if mixed else acc), s
    ss = torch.empty((rows.numel(), r), dtype=branch, device=x.device)
    scales = scaling.tolist()
    for a, seg in _segment_slices(plan.counts):
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
    *,
    path: str | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Gradients ``(dx, dweight, dA, dB, dbias)`` of :func:`lora_multi_forward`.

    Per row m of adapter a (D = dropout, m / keep; dS = scaling[a] * dY B[a]):
      dB[a] = scaling[a] * sum_{m in a} dY[m]^T S[m]     [n, N, r]
      dA[a] = sum_{m in a} dS[m]^T D(x)[m]              [n, r, K]
      dx[m] = dY[m] W + D(dS[m] A[a])   (base rows: dY[m] W)
      dW = dY^T x ; dbias = sum_m dY
    An adapter without rows gets zeros. ``needs`` selects which of the five are
    computed (others None). The path comes from the ids again (the forward's cost
    rule, one sort; ``path`` forces one); nothing saved is written to.
    """
    need_x, need_w, need_a, need_b, need_bias = needs
    m, k = x.shape
    n_adapters, r = lora_A.shape[0], lora_A.shape[1]
    dx = torch.mm(dy, weight) if need_x else None
    da = db = None
    if need_x or need_a or need_b:
        plan = _multi_plan(adapter_ids, n_adapters, k, dy.shape[1], r, path)
        if plan.counts[0] == m:  # no LoRA row: zero adapter gradients
            da = torch.zeros_like(lora_A) if need_a else None
            db = torch.zeros_like(lora_B) if need_b else None
        else:
            step = {"runs": _multi_backward_runs, "padded": _multi_backward_padded, "grouped": _multi_backward_grouped}
            da, db = step[plan.path](plan, dx, dy, x, lora_A, lora_B, scaling, s, dropout_p, seed, needs)
    dw = torch.mm(dy.t(), x) if need_w else None
    dbias = dy.sum(0) if need_bias else None
    return dx, dw, da, db, dbias


def _multi_backward_runs(plan, dx, dy, x, lora_A, lora_B, scaling, s, dropout_p, seed, needs):
    """The runs path: per run of one adapter, the single-adapter backward on slices
    (dA, dB accumulate over an adapter's runs in x's order)."""
    need_x, _, need_a, need_b, _ = needs
    m, k = x.shape
    branch, mixed = lora_A.dtype, lora_A.dtype != x.dtype
    dyl = dy.to(branch) if mixed else dy
    scales = scaling.tolist()
    keep, mf = 1.0, None
    if dropout_p > 0.0 and (need_x or need_a):
        mask, keep = dropout_keep_mask(seed, (m, k), dropout_p, x.device)
        mf = mask_float(mask, branch)
    xd = None
    if need_a:
        xd = x.to(branch) if mixed else x
        xd = xd.mul(mf) if mf is not None else xd  # dropout(x) (1/keep in the GEMM's alpha)
    ds = torch.empty((m, lora_A.shape[1]), dtype=branch, device=x.device) if (need_x or need_a) else None
    da = torch.empty_like(lora_A) if need_a else None
    db = torch.empty_like(lora_B) if need_b else None
    seen: set[int] = set()
    sizes = plan.sizes
    per_row = [t.split(sizes) if t is not None else itertools.repeat(None) for t in (dyl, s, xd, ds, dx)]
    a_views, b_views = lora_A.unbind(0), lora_B.unbind(0)
    da_views = da.unbind(0) if da is not None else None
    db_views = db.unbind(0) if db is not None else None
    mf_rows = mf.split(sizes) if mf is not None else itertools.repeat(None)
    for a, dyr, sr, xr, dsr, dxr, mr in zip(plan.chunks, *per_row, mf_rows):
        if a < 0:
            continue
        beta = 1 if a in seen else 0  # dA, dB accumulate over the adapter's runs
        seen.add(a)
        if dsr is not None:
            torch.addmm(dsr, dyr, b_views[a], beta=0, alpha=scales[a], out=dsr)
        if need_b:
            torch.addmm(db_views[a], dyr.t(), sr, beta=beta, alpha=scales[a], out=db_views[a])
        if need_a:
            torch.addmm(da_views[a], dsr.t(), xr, beta=beta, alpha=1.0 / keep, out=da_views[a])
        if need_x:
            if mr is None and not mixed:
                dxr.addmm_(dsr, a_views[a])
            else:
                # NOTE: mixed: the fp32 LoRA term added into dY W with one rounding, as lora_backward.
                lora_dx = torch.mm(dsr, a_views[a])
                if mr is not None:
                    lora_dx.mul_(mr)
                dxr.add_(lora_dx, alpha=1.0 / keep)
    for a in range(lora_A.shape[0]):
        if a not in seen:  # an adapter without rows: zero gradients
            for g in (da, db):
                if g is not None:
                    g[a].zero_()
    return da, db


def _multi_backward_padded(plan, dx, dy, x, lora_A, lora_B, scaling, s, dropout_p, seed, needs):
    """The padded (BGMV) path: dY, S and dropout(x) rows padded per adapter, one bmm per
    gradient; padding rows are zeros, so idle adapters get exact zeros."""
    need_x, _, need_a, need_b, _ = needs
    m, k = x.shape
    n_adapters, width = lora_A.shape[0], plan.width
    branch, mixed = lora_A.dtype, lora_A.dtype != x.dtype
    rows, slot = plan.order[plan.counts[0] :], plan.slot
    dys = dy.index_select(0, rows)
    dyp = _pad(dys.to(branch) if mixed else dys, slot, n_adapters, width)  # [n, c, N]
    keep, ms = 1.0, None
    if dropout_p > 0.0 and (need_x or need_a):
        mask, keep = dropout_keep_mask(seed, (m, k), dropout_p, x.device)
        ms = mask_float(mask.index_select(0, rows), branch)
    db = da = None
    if need_b:
        sp = _pad(s.index_select(0, rows), slot, n_adapters, width)
        sp = _scaled(sp, scaling)
        db = torch.bmm(dyp.transpose(1, 2), sp)  # [n, N, r]
    if need_x or need_a:
        dsp = torch.bmm(dyp, lora_B)  # [n, c, r]
        dsp = _scaled(dsp, scaling)
        if need_a:
            xs = x.index_select(0, rows)
            xs = xs.to(branch) if mixed else xs
            if ms is not None:
                xs.mul_(ms)  # dropout(x) rows (1/keep in the GEMM's alpha)
            da = torch.baddbmm(
                dsp.new_empty(()), dsp.transpose(1, 2), _pad(xs, slot, n_adapters, width), beta=0, alpha=1.0 / keep
            )  # [n, r, K]
        if need_x:
            lora_dx = torch.bmm(dsp, lora_A).view(-1, k).index_select(0, slot)  # [LoRA rows, K]
            if ms is not None:
                lora_dx.mul_(ms)
            _add_rows(dx, rows, lora_dx, 1.0 / keep, mixed)
    return da, db


def _add_rows(dx: Tensor, rows: Tensor, lora_dx: Tensor, alpha: float, mixed: bool) -> None:
    """dx[rows] += alpha * lora_dx; mixed: one rounding of dY W + the fp32 LoRA term, as lora_backward."""
    if mixed:
        full = torch.zeros(dx.shape, dtype=lora_dx.dtype, device=dx.device).index_copy_(0, rows, lora_dx)
        dx.add_(full, alpha=alpha)
    else:
        dx.index_add_(0, rows, lora_dx, alpha=alpha)


def _multi_backward_grouped(plan, dx, dy, x, lora_A, lora_B, scaling, s, dropout_p, seed, needs):
    """The grouped path: the LoRA rows gathered in adapter order, GEMMs per adapter."""
    need_x, _, need_a, need_b, _ = needs
    m, k = x.shape
    r = lora_A.shape[1]
    branch, mixed = lora_A.dtype, lora_A.dtype != x.dtype
    da = torch.empty_like(lora_A) if need_a else None
    db = torch.empty_like(lora_B) if need_b else None
    for a, c in enumerate(plan.counts[1:]):
        if c == 0:  # an adapter without rows: zero gradients (the others are written whole below)
            for g in (da, db):
                if g is not None:
                    g[a].zero_()
    rows = plan.order[plan.counts[0] :]
    ml = rows.numel()
    dys = dy.index_select(0, rows)
    if mixed:
        dys = dys.to(branch)
    scales = scaling.tolist()
    keep, ms = 1.0, None
    if dropout_p > 0.0 and (need_x or need_a):
        mask, keep = dropout_keep_mask(seed, (m, k), dropout_p, x.device)
        ms = mask_float(mask.index_select(0, rows), branch)
    ss = s.index_select(0, rows) if need_b else None
    dss = torch.empty((ml, r), dtype=branch, device=dy.device) if (need_x or need_a) else None
    xs = None
    if need_a:
        xs = x.index_select(0, rows)
        xs = xs.to(branch) if mixed else xs
        if ms is not None:
            xs.mul_(ms)  # dropout(x) rows (1/keep in the GEMM's alpha)
    lora_dx = torch.empty((ml, k), dtype=branch, device=dy.device) if need_x else None
    for a, seg in _segment_slices(plan.counts):
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
        _add_rows(dx, rows, lora_dx, 1.0 / keep, mixed)
    return da, db


def qlora_multi_forward(
    x: Tensor,
    qweight: QuantizedWeight,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: Tensor,
    adapter_ids: Tensor,
    bias: Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """:func:`lora_multi_forward` on a 4-bit base: deq(W) is a temporary in x's
    dtype (as :func:`qlora_forward`), freed on return; returns ``(y, s)``."""
    weight = dequantize_4bit(qweight, x.dtype)
    return lora_multi_forward(x, weight, lora_A, lora_B, scaling, adapter_ids, bias, dropout_p, seed)


def qlora_multi_backward(
    dy: Tensor,
    x: Tensor,
    qweight: QuantizedWeight,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: Tensor,
    adapter_ids: Tensor,
    s: Tensor,
    dropout_p: float = 0.0,
    seed: int = 0,
    needs: tuple[bool, bool, bool, bool, bool] = (True, False, True, True, False),
) -> tuple[Tensor | None, None, Tensor | None, Tensor | None, Tensor | None]:
    """Gradients ``(dx, None, dA, dB, dbias)`` of :func:`qlora_multi_forward`: the
    4-bit weight is frozen (its slot is always None); deq(W) is rebuilt only when
    dx is needed, freed on return."""
    need_x, need_w, need_a, need_b, need_bias = needs
    if need_w:
        raise ValueError("qlora_multi_backward: the 4-bit base weight is frozen; it has no gradient")
    weight = dequantize_4bit(qweight, dy.dtype) if need_x else None
    dx, _, da, db, dbias = lora_multi_backward(
        dy, x, weight, lora_A, lora_B, scaling, adapter_ids, s, dropout_p, seed, (need_x, False, need_a, need_b, need_bias)
    )
    return dx, None, da, db, dbias


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
