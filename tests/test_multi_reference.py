"""The three paths of the multi-adapter reference op and the cost rule that picks one.

``fastlora.reference.lora_multi_forward`` / ``lora_multi_backward`` walk the LoRA
rows as runs in x's order, as padded per-adapter blocks (bmm) or grouped by adapter
(``path`` forces one). Each path is checked against the float64 per-row oracle of
tests/test_multi.py (tolerance: ``_oracles.tolerance_2x``, 2x PyTorch's own error
on the same math in the same dtype, as there); the rule is checked on counts where
the answer follows from its formula.
"""

from __future__ import annotations

import pytest
import torch

from fastlora import reference
from fastlora.reference import multi_path

from _oracles import assert_close_to
from test_multi import check_all, float64_all, make_multi

PATHS = ["runs", "padded", "grouped"]


def _step(path, x, w, a, b, sc, ids, bias, dy, dropout=0.0, seed=5):
    y, s = reference.lora_multi_forward(x, w, a, b, sc, ids, bias, dropout, seed, path=path)
    dx, _, da, db, dbias = reference.lora_multi_backward(
        dy, x, w, a, b, sc, ids, s, dropout, seed, (True, False, True, True, True), path=path
    )
    return y, s, [dx, da, db, dbias]


def _per_sample_ids(m, n, run, seed=0):
    """Runs of ``run`` rows on one adapter (or the base), as a training batch of samples."""
    g = torch.Generator().manual_seed(seed)
    per = torch.randint(-1, n, ((m + run - 1) // run,), generator=g)
    return per.repeat_interleave(run)[:m]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["p0", "p0.3"])
@pytest.mark.parametrize("layout", ["ragged", "samples"])
def test_every_path_against_float64(path, dtype, dropout, layout):
    """Ragged unsorted ids with -1 rows and an adapter without rows, or runs of 5 rows."""
    x, w, a, b, sc, ids, bias = make_multi(37, 24, 20, 4, 5, dtype, empty=(3,))
    if layout == "samples":
        ids = _per_sample_ids(37, 5, 5)
    dy = torch.randn(37, 20, generator=torch.Generator().manual_seed(1)).to(dtype)
    mask, keep = reference.dropout_keep_mask(5, (37, 24), dropout, x.device) if dropout else (None, 1.0)
    y, s, grads = _step(path, x, w, a, b, sc, ids, bias, dy, dropout)
    check_all(y, grads, x, w, a, b, sc, ids, bias, dy, mask, keep, f"path={path}")
    base = ids.reshape(-1) < 0
    assert torch.equal(s[base], torch.zeros_like(s[base])), "S must be zero on base rows"
    for idle in set(range(5)) - set(ids.tolist()):
        assert not grads[1][idle].any() and not grads[2][idle].any(), f"adapter {idle} without rows: zero grads"


@pytest.mark.parametrize("path", PATHS)
def test_every_path_with_fp32_adapters_on_fp16(path):
    x, w, a, b, sc, ids, bias = make_multi(29, 16, 12, 4, 3, torch.float16)
    a, b = a.float(), b.float()
    dy = torch.randn(29, 12, generator=torch.Generator().manual_seed(3)).half()
    y, s, grads = _step(path, x, w, a, b, sc, ids, bias, dy, 0.2)
    mask, keep = reference.dropout_keep_mask(5, (29, 16), 0.2, x.device)
    y64, g64 = float64_all(x, w, a, b, sc, ids, bias, dy, mask, keep)
    assert y.dtype == torch.float16 and s.dtype == grads[1].dtype == grads[2].dtype == torch.float32
    # one fp16 rounding of y and of dY W (+ the fp32 branch): 2 fp16 ulps of the largest magnitude
    for name, got, oracle in zip(("y", "dx", "dA", "dB"), [y, *grads[:3]], [y64, *g64[:3]]):
        assert_close_to(got, oracle, 2 * 2**-10 * oracle.abs().max().item(), f"{name} path={path}")


@pytest.mark.parametrize("path", PATHS)
def test_every_path_on_all_base_and_zero_rows(path):
    x, w, a, b, sc, _, bias = make_multi(6, 8, 4, 2, 2)
    for ids in (torch.full((6,), -1), torch.zeros(0, dtype=torch.int64)):
        xm = x[: ids.numel()]
        y, s, (dx, da, db, _) = _step(path, xm, w, a, b, sc, ids, bias, torch.ones(ids.numel(), 4))
        assert torch.equal(y, torch.addmm(bias, xm, w.t())) and not s.any()
        assert not da.any() and not db.any()


def test_the_plan_runs_and_counts():
    ids = torch.tensor([2, 2, -1, 0, 0, 2, -1, -1, 1])
    plan = reference._multi_plan(ids, 4, 8, 8, 2, path="padded")
    assert plan.counts == [3, 2, 1, 3, 0]
    assert plan.runs == [(2, 0, 2), (0, 3, 5), (2, 5, 6), (1, 8, 9)]
    assert plan.sizes == [2, 1, 2, 1, 2, 1] and plan.chunks == [2, -1, 0, 2, -1, 1]
    assert plan.order.tolist() == [2, 6, 7, 3, 4, 8, 0, 1, 5]  # base, adapter 0, 1, 2: stable
    assert plan.width == 3 and plan.slot.tolist() == [0, 1, 3, 6, 7, 8]


@pytest.mark.parametrize("bad", [4, -2])
def test_ids_out_of_range_name_the_argument(bad):
    ids = torch.tensor([0, bad, 1])
    with pytest.raises(ValueError, match=r"adapter_ids must be in \[-1, 4\).*got values from"):
        reference._multi_plan(ids, 4, 8, 8, 2)


def test_unknown_path_is_an_error():
    with pytest.raises(ValueError, match="path must be 'runs', 'padded', 'grouped' or None.*'bgmv'"):
        reference._multi_plan(torch.tensor([0]), 1, 8, 8, 2, path="bgmv")


def test_the_cost_rule():
    """Worked from the formulas in multi_path's docstring (units: one small torch call)."""
    k = n_out = 1024
    # one run per adapter (a sorted batch): runs = 2 * 8 = 16 < grouped = 40 + 24 + copies
    assert multi_path(8, [0] + [32] * 8, 8, k, n_out, 16) == "runs"
    # one row per run, 64 runs over 8 adapters: runs = 128; grouped = 40 + 24 + 64 * 3072 / 25_000 = 71.9
    assert multi_path(8, [0] + [8] * 8, 64, k, n_out, 16) == "grouped"
    # the boundary: 50 rows of one adapter, K + 2N = 2500: grouped = 40 + 3 + 50 * 2500 / 25_000 = 48
    # = runs with 24 runs: a tie goes to runs, one run more goes to grouped.
    assert multi_path(1, [0, 50], 24, 500, 1000, 1) == "runs"
    assert multi_path(1, [0, 50], 25, 500, 1000, 1) == "grouped"
    # many rows per call over few, fully used adapters with small K, N: padded
    # (runs = 2 * 400; grouped = 40 + 6 + 400 * 96 / 25_000 ~ 47.5; padded = 80 + ... ~ 80.1): grouped still
    assert multi_path(2, [0, 200, 200], 400, 32, 32, 4) == "grouped"
    # padded needs its layout within 4x the rows: 1 + 99 rows on 100 adapters -> width 99 is refused
    assert multi_path(100, [0, 99] + [0] * 98 + [1], 2, 64, 64, 4) != "padded"
    # nothing on the adapters: runs (the base GEMM alone)
    assert multi_path(3, [7, 0, 0, 0], 0, k, n_out, 16) == "runs"
