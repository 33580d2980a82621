"""Many adapters in one batch: ``fastlora.lora_linear_multi`` on both backends.

Oracles: the per-row formula in float64 autograd
(``fastlora.reference.lora_multi_float64``: every row gathers its own A, B
and scale; no sorting, no segments), each adapter trained alone on its rows
with ``fastlora.lora_linear``, the single-adapter op's dropout mask, and PEFT's
mixed-batch inference (``peft_model(x, adapter_names=[...])``).

Tolerance (``_oracles.tolerance_2x``): 2x PyTorch's own error on the same
computation in the same dtype (the per-adapter formula written out in torch
ops, :func:`_by_hand`) against float64, plus 4 ulps of the output's magnitude.

Tiers: unmarked tests run the reference path; ``interpreter`` tests the Triton
kernels under TRITON_INTERPRET=1 (small shapes: ~40 ms per program
instance); ``tests/test_aot.py`` compiles every kernel variant (the multi_*
ones) for sm_80 / sm_90 and fails on register spills.
"""

from __future__ import annotations

import pytest
import torch

import fastlora
from fastlora import reference
from fastlora.functional import new_dropout_seed

from _oracles import assert_close_to, tolerance_2x

DTYPES = [torch.float32, torch.float16]
ALL_NEEDS = (True, True, True, True, True)


# ---------------------------------------------------------------------------
# inputs and oracles
# ---------------------------------------------------------------------------


def make_multi(m, k, n_out, r, n, dtype=torch.float32, lead=(), bias=True, seed=0, empty=(), base=True):
    """x [*lead, m, k], weight, stacked adapters with non-zero B, scaling [n] and
    ragged, unsorted ids: adapters in ``empty`` get no rows, -1 rows when ``base``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, m, k, generator=g).to(dtype)
    weight = (torch.randn(n_out, k, generator=g) / k**0.5).to(dtype)
    lora_A = (torch.randn(n, r, k, generator=g) / k**0.5).to(dtype)
    lora_B = (torch.randn(n, n_out, r, generator=g) / r**0.5).to(dtype)
    scaling = torch.rand(n, generator=g) * 2 + 0.25
    b = torch.randn(n_out, generator=g).to(dtype) if bias else None
    choices = [a for a in range(n) if a not in empty] + ([-1] if base else [])
    weights = torch.rand(len(choices), generator=g) + 0.2  # ragged segment sizes
    pick = torch.multinomial(weights, m * torch.Size(lead).numel(), replacement=True, generator=g)
    ids = torch.tensor(choices)[pick].reshape(*lead, m)
    return x, weight, lora_A, lora_B, scaling, ids, b


def float64_all(x, weight, lora_A, lora_B, scaling, ids, bias, dy, mask=None, keep=1.0):
    """y and (dx, dA, dB, dbias) of the per-row formula in float64 autograd (2-D x)."""
    leaves = [t.detach().double().requires_grad_(True) for t in (x, lora_A, lora_B)]
    b64 = bias.detach().double().requires_grad_(True) if bias is not None else None
    y = reference.lora_multi_float64(leaves[0], weight, leaves[1], leaves[2], scaling, ids, b64, mask, keep)
    y.backward(dy.double())
    return y.detach(), [t.grad for t in leaves] + [b64.grad if b64 is not None else None]


def _by_hand(x, weight, lora_A, lora_B, scaling, ids, bias, dy, mask=None, keep=1.0):
    """The same math in x's dtype with plain torch ops, adapter by adapter (2-D x):
    PyTorch's own error, the yardstick of the tolerance."""
    ids = ids.reshape(-1)
    xd = x if mask is None else x * mask.to(x.dtype) / keep
    y = x @ weight.t() + (bias if bias is not None else 0)
    dx = dy @ weight
    da, db = torch.zeros_like(lora_A), torch.zeros_like(lora_B)
    for a in range(lora_A.shape[0]):
        rows = (ids == a).nonzero().flatten()
        if rows.numel() == 0:
            continue
        sc = float(scaling[a])
        s = xd[rows] @ lora_A[a].t()
        y[rows] = y[rows] + sc * (s @ lora_B[a].t())
        ds = sc * (dy[rows] @ lora_B[a])
        db[a] = sc * (dy[rows].t() @ s)
        da[a] = ds.t() @ xd[rows]
        lora_dx = ds @ lora_A[a]
        dx[rows] = dx[rows] + (lora_dx if mask is None else lora_dx * mask[rows].to(x.dtype) / keep)
    return y, [dx, da, db, dy.sum(0) if bias is not None else None]


def check_all(got_y, got_grads, x, weight, lora_A, lora_B, scaling, ids, bias, dy, mask=None, keep=1.0, what=""):
    """Output and gradients within 2x PyTorch's own error of float64 (all 2-D)."""
    dtype = x.dtype
    y64, g64 = float64_all(x, weight, lora_A, lora_B, scaling, ids, bias, dy, mask, keep)
    y_t, g_t = _by_hand(x, weight, lora_A, lora_B, scaling, ids, bias, dy, mask, keep)
    assert got_y.dtype == dtype and got_y.shape == y64.shape
    assert_close_to(got_y, y64, tolerance_2x(y_t, y64, dtype), f"y {what}")
    for name, got, own, oracle in zip(("dx", "dA", "dB", "dbias"), got_grads, g_t, g64):
        if oracle is None:
            continue
        assert got.shape == oracle.shape, f"{name}: shape {tuple(got.shape)} != {tuple(oracle.shape)}"
        assert_close_to(got, oracle, tolerance_2x(own, oracle, dtype), f"{name} {what}")


def run_multi(x, weight, lora_A, lora_B, scaling, ids, bias, dy, dropout=0.0, seed=1234):
    """lora_linear_multi forward + backward; returns (y, [dx, dA, dB, dbias], the dropout seed used)."""
    leaves = [t.clone().requires_grad_(True) for t in (x, lora_A, lora_B)]
    bias_l = bias.clone().requires_grad_(True) if bias is not None else None
    torch.manual_seed(seed)
    drawn = new_dropout_seed()  # what the op draws next
    torch.manual_seed(seed)
    y = fastlora.lora_linear_multi(leaves[0], weight, leaves[1], leaves[2], scaling, ids, bias_l, dropout=dropout)
    y.backward(dy)
    grads = [t.grad for t in leaves] + [bias_l.grad if bias_l is not None else None]
    return y.detach(), grads, drawn


# (M, K, N, r, n adapters, adapters without rows): ragged, one row, wide ranks, rank 1.
CASES = [
    (37, 48, 40, 8, 4, (2,)),
    (64, 32, 32, 16, 3, ()),
    (29, 24, 20, 1, 5, (0, 3)),
    (1, 16, 12, 4, 2, (1,)),
    (45, 40, 24, 64, 3, (1,)),
]


# ---------------------------------------------------------------------------
# the reference path
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("dropout", [0.0, 0.25], ids=["p0", "p0.25"])
@pytest.mark.parametrize("m,k,n_out,r,n,empty", CASES)
def test_reference_against_float64(m, k, n_out, r, n, empty, dropout, dtype):
    x, w, a, b, sc, ids, bias = make_multi(m, k, n_out, r, n, dtype, empty=empty)
    dy = torch.randn(m, n_out, generator=torch.Generator().manual_seed(5)).to(dtype)
    originals = [t.clone() for t in (x, w, a, b, sc, ids, bias)]
    y, grads, seed = run_multi(x, w, a, b, sc, ids, bias, dy, dropout)
    mask, keep = reference.dropout_keep_mask(seed, (m, k), dropout, x.device) if dropout else (None, 1.0)
    check_all(y, grads, x, w, a, b, sc, ids, bias, dy, mask, keep, what=f"(reference {dtype})")
    for e in empty:  # exactly zero, not merely small
        assert torch.equal(grads[1][e], torch.zeros_like(a[e])) and torch.equal(grads[2][e], torch.zeros_like(b[e]))
    for before, after in zip(originals, (x, w, a, b, sc, ids, bias)):
        assert torch.equal(before, after), "an input was modified"


def test_leading_dims_and_zero_rows():
    x, w, a, b, sc, ids, bias = make_multi(7, 24, 16, 4, 3, lead=(2, 3))
    y = fastlora.lora_linear_multi(x, w, a, b, sc, ids, bias)
    assert y.shape == (2, 3, 7, 16)
    flat = fastlora.lora_linear_multi(x.reshape(-1, 24), w, a, b, sc, ids.reshape(-1), bias)
    assert torch.equal(y.reshape(-1, 16), flat)
    # zero rows: shapes only, zero adapter gradients
    x0 = torch.randn(3, 0, 24, requires_grad=True)
    a0, b0 = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    y0 = fastlora.lora_linear_multi(x0, w, a0, b0, sc, torch.zeros(3, 0, dtype=torch.long), bias)
    y0.sum().backward()
    assert y0.shape == (3, 0, 16) and x0.grad.shape == x0.shape
    assert torch.equal(a0.grad, torch.zeros_like(a)) and torch.equal(b0.grad, torch.zeros_like(b))


def test_all_rows_on_the_base():
    x, w, a, b, sc, _, bias = make_multi(9, 16, 12, 4, 2)
    ids = torch.full((9,), -1)
    xg, ag, bg = (t.clone().requires_grad_(True) for t in (x, a, b))
    y = fastlora.lora_linear_multi(xg, w, ag, bg, sc, ids, bias)
    assert torch.equal(y.detach(), torch.addmm(bias, x, w.t()))
    y.backward(torch.ones_like(y))
    assert torch.equal(ag.grad, torch.zeros_like(a)) and torch.equal(bg.grad, torch.zeros_like(b))
    assert torch.equal(xg.grad, torch.ones(9, 12) @ w)


def _alone(x, w, a, b, sc, ids, bias, dy, single=None):
    """Each adapter trained alone on its rows (``single(x, w, A, B, scaling, bias)``, by
    default fastlora.lora_linear): {a: (dx rows, dA, dB)}."""
    single = single or fastlora.lora_linear
    out = {}
    for i in range(a.shape[0]):
        rows = (ids.reshape(-1) == i).nonzero().flatten()
        if rows.numel() == 0:
            continue
        xr, ai, bi = (t.clone().requires_grad_(True) for t in (x[rows], a[i], b[i]))
        y = single(xr, w, ai, bi, float(sc[i]), bias)
        y.backward(dy[rows])
        out[i] = (rows, xr.grad, ai.grad, bi.grad)
    return out


def _check_alone(grads, x, w, a, b, sc, ids, bias, dy, single=None):
    """Per adapter: multi's dA[a], dB[a] and dx rows are as close to float64 as training
    the adapter alone is (2x its error + 4 ulps); adapters without rows get exact zeros."""
    _, g64 = float64_all(x, w, a, b, sc, ids, bias, dy)
    alone = _alone(x, w, a, b, sc, ids, bias, dy, single)
    for i in range(a.shape[0]):
        if i not in alone:
            assert torch.equal(grads[1][i], torch.zeros_like(a[i])) and torch.equal(grads[2][i], torch.zeros_like(b[i]))
            continue
        rows, dx_i, da_i, db_i = alone[i]
        assert_close_to(grads[1][i], g64[1][i], tolerance_2x(da_i, g64[1][i], x.dtype), f"dA[{i}] vs alone")
        assert_close_to(grads[2][i], g64[2][i], tolerance_2x(db_i, g64[2][i], x.dtype), f"dB[{i}] vs alone")
        assert_close_to(grads[0][rows], g64[0][rows], tolerance_2x(dx_i, g64[0][rows], x.dtype), f"dx rows of {i}")


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
def test_gradients_equal_training_each_adapter_alone(dtype):
    x, w, a, b, sc, ids, bias = make_multi(41, 32, 24, 8, 4, dtype, empty=(3,))
    dy = torch.randn(41, 24, generator=torch.Generator().manual_seed(3)).to(dtype)
    _, grads, _ = run_multi(x, w, a, b, sc, ids, bias, dy)
    _check_alone(grads, x, w, a, b, sc, ids, bias, dy)


def test_dropout_mask_is_the_single_adapter_ops():
    """With one adapter on every row, the same seed gives lora_linear's mask: in float64
    the two ops agree to rounding; a different mask would be off by O(1)."""
    x, w, a, b, _, _, bias = make_multi(33, 40, 24, 8, 1, torch.float64)
    sc = torch.tensor([1.5])
    ids = torch.zeros(33, dtype=torch.long)
    torch.manual_seed(7)
    y_multi = fastlora.lora_linear_multi(x, w, a, b, sc, ids, bias, dropout=0.3)
    torch.manual_seed(7)
    y_single = fastlora.lora_linear(x, w, a[0], b[0], 1.5, bias, dropout=0.3)
    torch.manual_seed(8)
    y_other = fastlora.lora_linear(x, w, a[0], b[0], 1.5, bias, dropout=0.3)
    assert_close_to(y_multi, y_single, 1e-12, "multi vs lora_linear, same seed")
    assert (y_multi - y_other).abs().max() > 1e-3  # the mask matters at these sizes
    # training=False: no dropout at all
    y_eval = fastlora.lora_linear_multi(x, w, a, b, sc, ids, bias, dropout=0.3, training=False)
    assert_close_to(y_eval, fastlora.lora_linear(x, w, a[0], b[0], 1.5, bias), 1e-12, "eval: no dropout")


def test_saved_for_backward_is_x_ids_and_s():
    """Exactly x (the caller's storage), the caller's ids and S [M, r]; nothing [M, N]."""
    x, w, a, b, sc, ids, bias = make_multi(37, 48, 40, 8, 4, lead=(1,))
    x.requires_grad_(True)
    a, b = a.requires_grad_(True), b.requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    for dropout in (0.0, 0.2):
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = fastlora.lora_linear_multi(x, w, a, b, sc, ids, bias, dropout=dropout)
        params = {p.untyped_storage().data_ptr() for p in (w, a, b, sc)}
        acts = {t.untyped_storage().data_ptr(): t for t in saved if t.untyped_storage().data_ptr() not in params}
        assert x.untyped_storage().data_ptr() in acts, "x's own storage must be saved, not a copy"
        assert ids.untyped_storage().data_ptr() in acts, "the caller's ids must be saved, not a copy"
        others = [t for p, t in acts.items() if p not in (x.untyped_storage().data_ptr(), ids.untyped_storage().data_ptr())]
        assert [tuple(t.shape) for t in others] == [(37, 8)], f"expected only S [M, r] besides x and ids: {others}"
        nbytes = sum(t.untyped_storage().nbytes() for t in acts.values())
        assert nbytes == x.numel() * 4 + ids.numel() * 8 + 37 * 8 * 4
        y.sum().backward()


def test_backward_twice_is_bit_identical_and_writes_nothing_saved():
    x, w, a, b, sc, ids, bias = make_multi(37, 48, 40, 8, 4)
    xg, ag, bg, biasg = (t.clone().requires_grad_(True) for t in (x, a, b, bias))
    w = w.clone().requires_grad_(True)
    y = fastlora.lora_linear_multi(xg, w, ag, bg, sc, ids, biasg, dropout=0.2)
    dy = torch.randn_like(y)
    versions = [t._version for t in (xg, w, ag, bg, sc, ids)]
    grads = []
    for _ in range(2):
        for t in (xg, w, ag, bg, biasg):
            t.grad = None
        y.backward(dy, retain_graph=True)
        grads.append([t.grad.clone() for t in (xg, w, ag, bg, biasg)])
    for name, g1, g2 in zip(("dx", "dW", "dA", "dB", "dbias"), *grads):
        assert torch.equal(g1, g2), f"{name} differs between two backwards"
    assert [t._version for t in (xg, w, ag, bg, sc, ids)] == versions
    assert_close_to(grads[0][1], dy.t() @ x, 1e-4, "dW = dY^T x")


def test_fp32_adapters_on_an_fp16_base():
    """PEFT's mixed precision: the LoRA branch and the adapter gradients in fp32, y in fp16."""
    x, w, a, b, sc, ids, bias = make_multi(37, 48, 40, 8, 4, torch.float16)
    a32, b32 = a.float(), b.float()
    dy = torch.randn(37, 40, generator=torch.Generator().manual_seed(2)).half()
    y, grads, _ = run_multi(x, w, a32, b32, sc, ids, bias, dy)
    assert y.dtype == torch.float16 and grads[1].dtype == grads[2].dtype == torch.float32
    y64, g64 = float64_all(x, w, a32, b32, sc, ids, bias, dy)
    # fp16 x, W, bias are exact in float64; one fp16 rounding of y and of dY W (+ the fp32
    # branch) bound the error: 2 fp16 ulps of the largest magnitude.
    for name, got, oracle in zip(("y", "dx", "dA", "dB"), [y, *grads[:3]], [y64, *g64[:3]]):
        assert_close_to(got, oracle, 2 * 2**-10 * oracle.abs().max().item(), f"{name} (mixed)")


def test_autocast_casts_as_nn_linear_does():
    x, w, a, b, sc, ids, bias = make_multi(21, 32, 24, 8, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fastlora.lora_linear_multi(x, w, a, b, sc, ids, bias)
    bf = torch.bfloat16
    want = fastlora.lora_linear_multi(x.to(bf), w.to(bf), a.to(bf), b.to(bf), sc, ids, bias.to(bf))
    assert y.dtype == bf and torch.equal(y, want)


def test_weight_gradient_when_it_requires_grad():
    x, w, a, b, sc, ids, bias = make_multi(19, 16, 12, 4, 2)
    wg = w.clone().requires_grad_(True)
    y = fastlora.lora_linear_multi(x, wg, a, b, sc, ids, bias)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert_close_to(wg.grad, dy.double().t() @ x.double(), 1e-5, "dW")


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (dict(lora_A=torch.randn(3, 4, 10)), ValueError, r"lora_A must have shape \[n_adapters, r, 16\]"),
        (dict(lora_A=torch.randn(4, 16)), ValueError, r"lora_A must have shape \[n_adapters, r, 16\]"),
        (dict(lora_B=torch.randn(3, 12, 5)), ValueError, r"lora_B must have shape \[3, 12, 4\]"),
        (dict(scaling=torch.ones(2)), ValueError, r"scaling must be a float32 tensor of shape \[3\]"),
        (dict(scaling=torch.ones(3, dtype=torch.float64)), ValueError, r"scaling must be a float32 tensor"),
        (dict(scaling=1.0), TypeError, r"scaling must be a torch.Tensor"),
        (dict(scaling=torch.ones(3, requires_grad=True)), ValueError, r"scaling requires grad"),
        (dict(adapter_ids=torch.zeros(5, 2, dtype=torch.long)), ValueError, r"adapter_ids must have shape \[2, 5\]"),
        (dict(adapter_ids=torch.zeros(2, 5)), TypeError, r"adapter_ids must be an integer tensor"),
        (dict(adapter_ids=torch.full((2, 5), 3)), ValueError, r"adapter_ids must be in \[-1, 3\).*from 3 to 3"),
        (dict(adapter_ids=torch.full((2, 5), -2)), ValueError, r"adapter_ids must be in \[-1, 3\).*from -2 to -2"),
        (dict(weight=torch.randn(12, 10)), ValueError, r"x's last dimension must equal weight's in_features"),
        (dict(bias=torch.randn(13)), ValueError, r"bias must have shape \[12\]"),
        (dict(lora_A=torch.randn(3, 4, 16).double(), lora_B=torch.randn(3, 12, 4).double()), TypeError, r"lora_A/lora_B"),
        (dict(dropout=1.0), ValueError, r"dropout must be a probability"),
    ],
)
def test_errors_name_the_argument(change, exc, match):
    args = dict(x=torch.randn(2, 5, 16), weight=torch.randn(12, 16), lora_A=torch.randn(3, 4, 16),
                lora_B=torch.randn(3, 12, 4), scaling=torch.ones(3), adapter_ids=torch.zeros(2, 5, dtype=torch.long),
                bias=torch.randn(12), dropout=0.0)  # fmt: skip
    args.update(change)
    dropout = args.pop("dropout")
    with pytest.raises(exc, match=match):
        fastlora.lora_linear_multi(*args.values(), dropout=dropout)


# ---------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------


def _compiled_step(fn, x, w, a, b, sc, ids, bias, dy, dropout=0.0):
    xg, ag, bg = (t.clone().requires_grad_(True) for t in (x, a, b))
    y = fn(xg, w, ag, bg, sc, ids, bias, dropout)
    y.backward(dy)
    return y.detach(), [xg.grad, ag.grad, bg.grad]


def _multi_fn(x, w, a, b, sc, ids, bias, dropout):
    return fastlora.lora_linear_multi(x, w, a, b, sc, ids, bias, dropout=dropout)


def test_compiled_fullgraph_equals_eager():
    x, w, a, b, sc, ids, bias = make_multi(7, 24, 16, 4, 3, lead=(3,))
    dy = torch.randn(3, 7, 16)
    torch._dynamo.reset()
    compiled = torch.compile(_multi_fn, fullgraph=True)
    y_c, g_c = _compiled_step(compiled, x, w, a, b, sc, ids, bias, dy)
    y_e, g_e = _compiled_step(_multi_fn, x, w, a, b, sc, ids, bias, dy)
    # The op is opaque to the compiler: the very same reference math runs.
    assert_close_to(y_c, y_e, 0.0, "compiled output")
    for name, gc, ge in zip(("dx", "dA", "dB"), g_c, g_e):
        assert_close_to(gc, ge, 0.0, f"compiled {name}")


def test_compiled_dropout_uses_one_mask_for_forward_and_backward():
    """Per adapter a with L_a = the LoRA part of its rows of y (float64):
    <dA[a], A[a]> = <dS, S_bwd> and <dY_a, L_a> = <dS, S_fwd>; they agree only if
    forward and backward drew the same mask (the seed is drawn inside the graph)."""
    x, w, a, b, sc, ids, bias = make_multi(40, 24, 16, 4, 3, torch.float64, empty=())
    dy = torch.randn(40, 16, dtype=torch.float64)
    torch._dynamo.reset()
    compiled = torch.compile(_multi_fn, fullgraph=True)
    y, (dx, da, db) = _compiled_step(compiled, x, w, a, b, sc, ids, bias, dy, dropout=0.4)
    lora = y - torch.addmm(bias, x, w.t())
    for i in range(3):
        rows = ids == i
        inner = (dy[rows] * lora[rows]).sum()
        assert abs(inner) > 1e-3
        assert abs((da[i] * a[i]).sum() - inner) < 1e-9 * abs(inner), f"adapter {i}: masks differ"
    # and the mask dropped something: without dropout <dA, A> changes
    _, (_, da0, _) = _compiled_step(_multi_fn, x, w, a, b, sc, ids, bias, dy)
    assert abs((da0[0] * a[0]).sum() - (da[0] * a[0]).sum()) > 1e-6


# ---------------------------------------------------------------------------
# PEFT's mixed-batch inference on the same weights
# ---------------------------------------------------------------------------


def test_equals_peft_mixed_batch_inference():
    peft = pytest.importorskip("peft")
    from torch import nn

    k, n_out = 48, 40
    specs = {"a0": dict(r=8, lora_alpha=16), "a1": dict(r=4, lora_alpha=6, use_rslora=True), "a2": dict(r=2, lora_alpha=5)}
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(k, n_out))
    names = list(specs)
    pm = peft.get_peft_model(base, peft.LoraConfig(target_modules=["0"], **specs[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        pm.add_adapter(name, peft.LoraConfig(target_modules=["0"], **specs[name]))
    layer = pm.base_model.model[0]
    r_max = max(s["r"] for s in specs.values())
    lora_A, lora_B = torch.zeros(3, r_max, k), torch.zeros(3, n_out, r_max)  # smaller ranks zero-padded
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for i, name in enumerate(names):
            r = specs[name]["r"]
            layer.lora_A[name].weight.copy_(torch.randn(r, k, generator=g) / k**0.5)
            layer.lora_B[name].weight.copy_(torch.randn(n_out, r, generator=g))
            lora_A[i, :r] = layer.lora_A[name].weight
            lora_B[i, :, :r] = layer.lora_B[name].weight
    scaling = torch.tensor([layer.scaling[name] for name in names], dtype=torch.float32)
    pm.eval()
    batch = ["a1", "__base__", "a0", "a1", "a2", "__base__", "a1"]
    x = torch.randn(len(batch), 5, k, generator=g)
    with torch.no_grad():
        y_peft = pm(x, adapter_names=batch)
    ids = torch.tensor([names.index(n) if n in names else -1 for n in batch])[:, None].expand(-1, 5)
    lin = layer.base_layer
    y = fastlora.lora_linear_multi(x, lin.weight.detach(), lora_A, lora_B, scaling, ids, lin.bias.detach(), training=False)
    y64 = reference.lora_multi_float64(x.reshape(-1, k), lin.weight, lora_A, lora_B, scaling, ids, lin.bias)
    tol = tolerance_2x(y_peft.reshape(-1, n_out), y64, torch.float32)
    assert_close_to(y.reshape(-1, n_out), y64, tol, "fastlora vs float64 (yardstick: PEFT's error)")
    assert_close_to(y, y_peft, tol, "fastlora vs PEFT mixed batch")


# ---------------------------------------------------------------------------
# the Triton kernels under the interpreter
# ---------------------------------------------------------------------------


@pytest.fixture
def km(monkeypatch):
    """fastlora.kernels.lora_multi with the split reductions forced to 2 programs per
    segment (so tiny shapes run the cross-program sums too)."""
    mod = pytest.importorskip("fastlora.kernels.lora_multi")
    monkeypatch.setattr(mod, "split_rows", lambda device, row_blocks, other: min(2, row_blocks))
    return mod


def _launches():
    from fastlora.kernels import lora as klora

    return klora


# (lead, M per lead, K, N, r, n, empty): the decode path (M <= 16) and the sorted path
# (several row tiles, several column blocks, split reductions); r = 1 and r = 40 (BLOCK_R 64).
KERNEL_CASES = [
    pytest.param((), 13, 40, 36, 8, 4, (1,), id="decode-13"),
    pytest.param((2,), 23, 48, 40, 8, 4, (2,), id="sorted-2x23"),
    pytest.param((), 37, 24, 20, 1, 3, (), id="sorted-r1"),
    pytest.param((), 20, 24, 36, 40, 3, (0,), id="sorted-r40"),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("dropout", [0.0, 0.2], ids=["p0", "p0.2"])
@pytest.mark.parametrize("lead,m,k,n_out,r,n,empty", KERNEL_CASES)
def test_kernels_against_float64(km, lead, m, k, n_out, r, n, empty, dropout, dtype):
    x, w, a, b, sc, ids, bias = make_multi(m, k, n_out, r, n, dtype, lead=lead, empty=empty, seed=3)
    dy = torch.randn(*lead, m, n_out, generator=torch.Generator().manual_seed(4)).to(dtype)
    originals = [t.clone() for t in (x, w, a, b, sc, ids, bias)]
    klora = _launches()
    klora.reset_launch_count()
    leaves = [t.clone().requires_grad_(True) for t in (x, a, b, bias)]
    torch.manual_seed(9)
    seed = new_dropout_seed()
    torch.manual_seed(9)
    y = fastlora.lora_linear_multi(leaves[0], w, leaves[1], leaves[2], sc, ids, leaves[3], dropout=dropout)
    assert klora.launch_count() == 2
    klora.reset_launch_count()
    y.backward(dy, retain_graph=True)
    assert klora.launch_count() == 3
    first = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    y.backward(dy)
    for name, g1, t in zip(("dx", "dA", "dB", "dbias"), first, leaves):
        assert torch.equal(g1, t.grad), f"{name}: backward twice is not bit-identical"
    for before, after in zip(originals, (x, w, a, b, sc, ids, bias)):
        assert torch.equal(before, after), "an input was modified"
    mm = x.numel() // k
    mask, keep = km.dropout_keep_mask(seed, (mm, k), dropout, x.device) if dropout else (None, 1.0)
    grads = [first[0].reshape(mm, k), *first[1:]]
    check_all(y.detach().reshape(mm, n_out), grads, x.reshape(mm, k), w, a, b, sc, ids, bias, dy.reshape(mm, n_out),
              mask, keep, what=f"(kernels {dtype})")  # fmt: skip
    for e in empty:
        assert torch.equal(first[1][e], torch.zeros_like(a[e])) and torch.equal(first[2][e], torch.zeros_like(b[e]))


@pytest.mark.interpreter
def test_kernels_decode_and_sorted_paths_agree(km, monkeypatch):
    """The same 12 rows (every adapter, base rows, unsorted) through both forward paths."""
    x, w, a, b, sc, ids, bias = make_multi(12, 40, 36, 8, 5, seed=6)
    y_dec, s_dec = km.lora_multi_forward(x, w, a, b, sc, ids, bias, 0.3, 77)
    monkeypatch.setattr(km, "DECODE_MAX_M", 0)
    y_srt, s_srt = km.lora_multi_forward(x, w, a, b, sc, ids, bias, 0.3, 77)
    mask, keep = km.dropout_keep_mask(77, (12, 40), 0.3, x.device)
    y64 = reference.lora_multi_float64(x, w, a, b, sc, ids, bias, mask, keep)
    y_t, _ = _by_hand(x, w, a, b, sc, ids, bias, torch.zeros(12, 36), mask, keep)
    tol = tolerance_2x(y_t, y64, torch.float32)
    assert_close_to(y_dec, y64, tol, "decode path")
    assert_close_to(y_srt, y64, tol, "sorted path")
    assert_close_to(s_dec, s_srt, 1e-5, "S (decode vs sorted)")
    assert torch.equal(s_dec[ids < 0], torch.zeros_like(s_dec[ids < 0])), "S must be zero on base rows"


@pytest.mark.interpreter
def test_kernels_gradients_equal_training_each_adapter_alone(km):
    x, w, a, b, sc, ids, bias = make_multi(41, 32, 24, 8, 4, empty=(3,), seed=8)
    dy = torch.randn(41, 24, generator=torch.Generator().manual_seed(3))
    _, grads, _ = run_multi(x, w, a, b, sc, ids, bias, dy)
    _check_alone(grads, x, w, a, b, sc, ids, bias, dy)


@pytest.mark.interpreter
def test_kernels_dropout_mask_is_the_single_adapter_ops(km):
    """One adapter on every row and the same seed: the Triton LoRA op's mask (fp32: the
    two differ by rounding only; another mask would be off by O(1))."""
    x, w, a, b, _, _, bias = make_multi(33, 40, 24, 8, 1, seed=2)
    ids = torch.zeros(33, dtype=torch.long)
    torch.manual_seed(7)
    y_multi = fastlora.lora_linear_multi(x, w, a, b, torch.tensor([1.5]), ids, bias, dropout=0.3)
    torch.manual_seed(7)
    y_single = fastlora.lora_linear(x, w, a[0], b[0], 1.5, bias, dropout=0.3)
    assert_close_to(y_multi, y_single, 1e-5, "multi vs lora_linear (kernels), same seed")


@pytest.mark.interpreter
@pytest.mark.parametrize("m", [5, 40], ids=["decode", "sorted"])
def test_kernels_reject_ids_out_of_range(km, m):
    x, w, a, b, sc, ids, bias = make_multi(m, 16, 12, 4, 2)
    ids = ids.clone()
    ids[m // 2] = 2
    with pytest.raises(ValueError, match=r"adapter_ids must be in \[-1, 2\).*to 2"):
        fastlora.lora_linear_multi(x, w, a, b, sc, ids, bias)


@pytest.mark.interpreter
def test_kernels_compiled_fullgraph_equals_eager(km):
    """The custom op under torch.compile runs the very same kernels: bit-identical."""
    x, w, a, b, sc, ids, bias = make_multi(7, 24, 16, 4, 3, lead=(3,), seed=5)
    dy = torch.randn(3, 7, 16)
    torch._dynamo.reset()
    compiled = torch.compile(_multi_fn, fullgraph=True)
    y_c, g_c = _compiled_step(compiled, x, w, a, b, sc, ids, bias, dy)
    y_e, g_e = _compiled_step(_multi_fn, x, w, a, b, sc, ids, bias, dy)
    assert_close_to(y_c, y_e, 0.0, "compiled output (kernels)")
    for name, gc, ge in zip(("dx", "dA", "dB"), g_c, g_e):
        assert_close_to(gc, ge, 0.0, f"compiled {name} (kernels)")


@pytest.mark.interpreter
def test_kernels_zero_rows(km):
    """No rows: no launches, [..., 0, N] out, zero adapter gradients."""
    _, w, a, b, sc, _, bias = make_multi(4, 24, 16, 4, 3)
    x = torch.randn(3, 0, 24, requires_grad=True)
    ag, bg = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    klora = _launches()
    klora.reset_launch_count()
    y = fastlora.lora_linear_multi(x, w, ag, bg, sc, torch.zeros(3, 0, dtype=torch.long), bias)
    y.sum().backward()
    assert klora.launch_count() == 0
    assert y.shape == (3, 0, 16) and x.grad.shape == x.shape
    assert torch.equal(ag.grad, torch.zeros_like(a)) and torch.equal(bg.grad, torch.zeros_like(b))


@pytest.mark.interpreter
def test_kernels_fp32_adapters_on_an_fp16_base(km):
    x, w, a, b, sc, ids, bias = make_multi(21, 32, 24, 8, 3, torch.float16, seed=4)
    dy = torch.randn(21, 24, generator=torch.Generator().manual_seed(2)).half()
    y, grads, _ = run_multi(x, w, a.float(), b.float(), sc, ids, bias, dy)
    assert y.dtype == torch.float16 and grads[1].dtype == grads[2].dtype == torch.float32
    y64, g64 = float64_all(x, w, a.float(), b.float(), sc, ids, bias, dy)
    # the kernels read the adapters cast to fp16 and round y, dx, S: 4 fp16 roundings bound it.
    for name, got, oracle in zip(("y", "dx", "dA", "dB"), [y, *grads[:3]], [y64, *g64[:3]]):
        assert_close_to(got, oracle, 4 * 2**-11 * oracle.abs().max().item(), f"{name} (mixed, kernels)")


def test_config_functions(monkeypatch):
    """The GPU config lists (outside the interpreter's one config): never empty, powers
    of two >= 16 (tl.dot), decode tiles of 16 rows."""
    km = pytest.importorskip("fastlora.kernels.configs")
    monkeypatch.setattr(km, "interpreting", lambda: False)
    pow2 = lambda v: v >= 16 and v & (v - 1) == 0  # noqa: E731
    for arch in (80, 86, 90, 100):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for block_r in (16, 64, 128):
                lists = [km.multi_dy_pass_configs(arch, dtype, block_r=block_r)]
                for dropout in (False, True):
                    lists += [
                        km.multi_gemm_configs(arch, dtype, has_dropout=dropout, block_r=block_r),
                        km.multi_shrink_configs(arch, dtype, has_dropout=dropout, block_r=block_r),
                        km.multi_decode_shrink_configs(arch, dtype, has_dropout=dropout, block_r=block_r),
                        km.multi_down_grad_configs(arch, dtype, has_dropout=dropout, block_r=block_r),
                    ]
                decode = km.multi_gemm_configs(arch, dtype, block_r=block_r, decode=True)
                assert all(c.kwargs["BLOCK_M"] == 16 for c in decode)
                for cands in lists + [decode]:
                    assert cands
                    for c in cands:
                        assert all(pow2(v) for name, v in c.kwargs.items() if name.startswith("BLOCK")), c
