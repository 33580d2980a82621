"""Tier 2: the LoRA Triton kernels under the Triton interpreter (CPU), against
independent oracles: float64 math (``fastlora.reference.lora_linear_float64``
and float64 autograd) and a numpy Philox4x32-10 written from the Random123
specification for the dropout mask.

Tolerance rule (DESIGN.md): for every output, the kernel's max error against
float64 must be at most 2x PyTorch's own error on the same computation in the
same dtype (``fastlora.reference``'s path, measured here on the same inputs)
plus one ulp of the output's magnitude (the final rounding to the dtype, which
torch may happen to get exactly right on tiny shapes).

The interpreter runs ~40 ms per program instance: shapes are small (one
config with 32-wide tiles under the interpreter), yet span several tiles so
the masked edges and the split reductions of the dY pass and dA run.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fastlora
from fastlora import reference
from fastlora.functional import new_dropout_seed
from fastlora.kernels import lora as K

from _oracles import assert_close_to, float64_grads, make_inputs

pytestmark = pytest.mark.interpreter

DTYPES = [torch.float32, torch.float16]
ALL_NEEDS = (True, True, True, True, True)

# (M, K, N, r, bias): a power-of-two shape, ragged ones, one row, zero rows, a wide rank.
CASES = [
    (32, 64, 32, 16, True),
    (37, 96, 80, 8, False),
    (37, 96, 80, 1, True),
    (1, 32, 48, 8, True),
    (0, 32, 16, 8, True),
    (33, 30, 17, 40, True),  # rank padded to 64; K, N not multiples of 4
]


def _ulp(dtype: torch.dtype, ref: torch.Tensor) -> float:
    """One unit in the last place of the largest |value| of ``ref`` in ``dtype``."""
    mag = ref.abs().max().item() if ref.numel() else 0.0
    return torch.finfo(dtype).eps * max(mag, 1e-30)


def _check(actual, torch_same_dtype, oracle64, dtype, what):
    """|kernel - f64| <= 2 * |torch(dtype) - f64|_max + 1 ulp (see the module docstring)."""
    assert actual.shape == oracle64.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(oracle64.shape)}"
    assert actual.dtype == torch_same_dtype.dtype, f"{what}: dtype {actual.dtype} != {torch_same_dtype.dtype}"
    if oracle64.numel() == 0:
        return
    # NOTE: NaN compares false: a NaN or inf where float64 is finite (and in the
    # dtype's range) must fail here, not slip through the |diff| <= tol check below.
    bad = (~torch.isfinite(actual) & (oracle64.abs() <= torch.finfo(actual.dtype).max)).nonzero()
    assert bad.numel() == 0, f"{what}: non-finite where float64 is finite and in range at {bad[:5].tolist()} ({len(bad)} elements)"
    torch_err = (torch_same_dtype.double() - oracle64).abs().max().item()
    tol = 2 * torch_err + _ulp(dtype, oracle64)
    assert_close_to(actual, oracle64, tol, what)


def _scaled_inputs(m, k, n, r, dtype, bias, seed=0):
    x, w, a, b, bias_t = make_inputs(m, k, n, r, dtype=dtype, bias=bias, seed=seed)
    return x, w, a, b, bias_t


# ---------------------------------------------------------------------------
# the dropout mask: an independent Philox4x32-10 oracle
# ---------------------------------------------------------------------------

_M32 = np.uint64(0xFFFFFFFF)


def _philox4x32_10(ctr_lo, ctr_hi, key_lo, key_hi):
    """Philox4x32-10 (Salmon et al., SC'11; Random123) on uint64 arrays holding
    32-bit words; counter (lo, hi, 0, 0), key (lo, hi). Returns 4 word arrays."""
    c0, c1 = ctr_lo.astype(np.uint64), ctr_hi.astype(np.uint64)
    c2 = np.zeros_like(c0)
    c3 = np.zeros_like(c0)
    k0, k1 = np.uint64(key_lo), np.uint64(key_hi)
    for _ in range(10):
        p0 = np.uint64(0xD2511F53) * c0
        p1 = np.uint64(0xCD9E8D57) * c2
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & _M32, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & _M32
        k0 = (k0 + np.uint64(0x9E3779B9)) & _M32
        k1 = (k1 + np.uint64(0xBB67AE85)) & _M32
    return c0, c1, c2, c3


def _oracle_mask(seed: int, m: int, k: int, p: float) -> torch.Tensor:
    """Element (i, j) keeps when the top 16 bits of word j % 4 of Philox(counter
    i * ceil(k / 4) + j // 4, key seed) are < round((1 - p) * 2**16)."""
    threshold, _ = reference.dropout_keep_threshold(p)
    keep_levels = threshold + 32768
    groups = (k + 3) // 4
    rows = np.arange(m, dtype=np.uint64)[:, None]
    cols = np.arange(k, dtype=np.uint64)[None, :]
    ctr = rows * np.uint64(groups) + cols // np.uint64(4)
    words = _philox4x32_10(ctr & _M32, ctr >> np.uint64(32), seed & 0xFFFFFFFF, seed >> 32)
    word = np.choose((cols % np.uint64(4)).astype(np.int64) + np.zeros_like(ctr, dtype=np.int64), words)
    return torch.from_numpy((word >> np.uint64(16)) < np.uint64(keep_levels))


def test_philox_oracle_known_answer():
    # Random123's published known-answer vector for philox4x32_10, counter 0, key 0.
    zero = np.zeros(1, dtype=np.uint64)
    got = [int(w[0]) for w in _philox4x32_10(zero, zero, 0, 0)]
    assert got == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


@pytest.mark.parametrize("seed", [0, 7, 2**62 - 12345])
def test_dropout_mask_is_philox(seed):
    m, k, p = 37, 70, 0.3
    mask, keep = K.dropout_keep_mask(seed, (m, k), p, torch.device("cpu"))
    assert mask.dtype == torch.bool and mask.shape == (m, k)
    assert keep == reference.dropout_keep_threshold(p)[1]
    oracle = _oracle_mask(seed, m, k, p)
    bad = (mask != oracle).nonzero()
    assert bad.numel() == 0, f"mask differs from Philox at {bad[:5].tolist()} ({len(bad)} elements)"


def test_dropout_mask_statistics():
    m, k, p = 64, 128, 0.25
    mask, keep = K.dropout_keep_mask(3, (m, k), p, torch.device("cpu"))
    n = m * k
    # Binomial(n, keep): 5 standard deviations.
    assert abs(mask.sum().item() - n * keep) <= 5 * math.sqrt(n * keep * (1 - keep))
    other, _ = K.dropout_keep_mask(4, (m, k), p, torch.device("cpu"))
    assert not torch.equal(mask, other), "different seeds must give different masks"


# ---------------------------------------------------------------------------
# the building blocks, one launch each
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,r", [(37, 96, 8), (32, 64, 16), (1, 32, 1)])
def test_lora_shrink(m, k, r, dtype):
    x, _, a, _, _ = _scaled_inputs(m, k, 8, r, dtype, False)
    K.reset_launch_count()
    s = K.lora_shrink(x, a)
    assert K.launch_count() == 1
    oracle = x.double() @ a.double().t()
    _check(s, x @ a.t(), oracle, dtype, "S")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "m,n,r",
    [
        (37, 80, 8),  # 2 row blocks x 3 column blocks: both split reductions
        (1, 48, 1),  # one row block, 2 column blocks: dS reduced, dB direct
        (70, 16, 16),  # 3 row blocks, 1 column block: dS direct, dB reduced
        (32, 32, 8),  # one tile: everything direct
    ],
)
def test_lora_dy_pass(m, n, r, dtype):
    g = torch.Generator().manual_seed(1)
    dy = torch.randn(m, n, generator=g).to(dtype)
    b = torch.randn(n, r, generator=g).to(dtype)
    s = torch.randn(m, r, generator=g).to(dtype)
    scaling = 0.75
    K.reset_launch_count()
    ds, db, dbias = K.lora_dy_pass(dy, b, s, scaling, True, True, True)
    assert K.launch_count() == 1
    assert ds.dtype == torch.float32  # documented: dS is kept in fp32
    d64, b64, s64 = dy.double(), b.double(), s.double()
    # dS in fp32 is compared with torch's fp32 error on the same product.
    _check(ds, scaling * (dy.float() @ b.float()), scaling * d64 @ b64, torch.float32, "dS")
    _check(db, torch.addmm(b.new_empty(n, r), dy.t(), s, beta=0, alpha=scaling), scaling * d64.t() @ s64, dtype, "dB")
    _check(dbias, dy.sum(0), d64.sum(0), dtype, "dbias")
    # Each output alone gives the same bits (flags only drop work).
    ds_only, none_b, none_bias = K.lora_dy_pass(dy, b, s, scaling, True, False, False)
    assert none_b is None and none_bias is None and torch.equal(ds_only, ds)
    none_s, db_only, dbias_only = K.lora_dy_pass(dy, b, s, scaling, False, True, True)
    assert none_s is None and torch.equal(db_only, db) and torch.equal(dbias_only, dbias)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,r", [(37, 96, 8), (1, 32, 16), (70, 40, 1)])
def test_lora_down_grad(m, k, r, dtype):
    g = torch.Generator().manual_seed(2)
    ds = torch.randn(m, r, generator=g)  # fp32, as the dY pass gives it
    x = torch.randn(m, k, generator=g).to(dtype)
    K.reset_launch_count()
    da = K.lora_down_grad(ds, x)
    assert K.launch_count() == 1
    oracle = ds.double().t() @ x.double()
    _check(da, ds.to(dtype).t() @ x, oracle, dtype, "dA")


@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_expand_and_dx_gemm(dtype):
    m, k, n, r = 37, 96, 80, 8
    x, w, a, b, bias = _scaled_inputs(m, k, n, r, dtype, True)
    s = x @ a.t()
    y = K.lora_expand_gemm(x, w, s, b, 0.5, bias)
    y64 = x.double() @ w.double().t() + 0.5 * s.double() @ b.double().t() + bias.double()
    y_torch = torch.addmm(bias, x, w.t()).addmm_(s, b.t(), alpha=0.5)
    _check(y, y_torch, y64, dtype, "Y")
    g = torch.Generator().manual_seed(3)
    dy = torch.randn(m, n, generator=g).to(dtype)
    ds = torch.randn(m, r, generator=g)
    dx = K.lora_dx_gemm(dy, w, ds, a)
    dx64 = dy.double() @ w.double() + ds.double() @ a.double()
    _check(dx, (dy @ w).addmm_(ds.to(dtype), a), dx64, dtype, "dX")


# ---------------------------------------------------------------------------
# lora_forward / lora_backward against the reference and float64
# ---------------------------------------------------------------------------


def _float64_all(x, w, a, b, scaling, bias, dy, keep_mask=None, keep=1.0):
    y64, (dx64, da64, db64, dbias64) = float64_grads(x, w, a, b, scaling, bias, dy, keep_mask, keep)
    dw64 = dy.double().t() @ x.double()
    return y64, (dx64, dw64, da64, db64, dbias64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n,r,bias", CASES)
def test_forward_backward_match_reference(m, k, n, r, bias, dtype):
    x, w, a, b, bias_t = _scaled_inputs(m, k, n, r, dtype, bias)
    scaling = 2.0
    dy = torch.randn(m, n, generator=torch.Generator().manual_seed(5)).to(dtype)
    needs = (True, True, True, True, bias)
    originals = [t.clone() for t in (x, w, a, b, dy)]

    K.reset_launch_count()
    y, s = K.lora_forward(x, w, a, b, scaling, bias_t)
    assert K.launch_count() == (2 if m else 0)
    assert s.dtype == dtype and s.shape == (m, r)
    K.reset_launch_count()
    grads = K.lora_backward(dy, x, w, a, b, s, scaling, 0.0, 0, needs)
    assert K.launch_count() == (3 if m else 0)  # dW is torch.mm, not a Triton launch

    s_before = s.clone()
    y_ref, s_ref = reference.lora_forward(x, w, a, b, scaling, bias_t)
    grads_ref = reference.lora_backward(dy, x, w, a, b, s_ref, scaling, 0.0, 0, needs)
    y64, grads64 = _float64_all(x, w, a, b, scaling, bias_t, dy)

    _check(y, y_ref, y64, dtype, "y")
    _check(s, s_ref, x.double() @ a.double().t(), dtype, "s")
    for name, got, want, oracle in zip(("dx", "dW", "dA", "dB", "dbias"), grads, grads_ref, grads64):
        if want is None:
            assert got is None, f"{name} was not requested"
            continue
        _check(got, want, oracle, dtype, name)
    for before, after in zip(originals + [s_before], (x, w, a, b, dy, s)):
        assert torch.equal(before, after), "an input or saved tensor was modified"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n,r,bias", [(37, 96, 80, 8, True), (32, 64, 32, 16, False)])
def test_dropout_forward_backward(m, k, n, r, bias, dtype):
    p, seed, scaling = 0.3, 1234567, 1.5
    x, w, a, b, bias_t = _scaled_inputs(m, k, n, r, dtype, bias)
    dy = torch.randn(m, n, generator=torch.Generator().manual_seed(6)).to(dtype)
    mask, keep = K.dropout_keep_mask(seed, (m, k), p, x.device)
    needs = (True, False, True, True, bias)

    y, s = K.lora_forward(x, w, a, b, scaling, bias_t, p, seed)
    grads = K.lora_backward(dy, x, w, a, b, s, scaling, p, seed, needs)

    # torch's own computation with the kernels' mask, in dtype (the error yardstick).
    xd = x * mask / keep
    s_t = xd @ a.t()
    y_t = (x @ w.t() if bias_t is None else torch.addmm(bias_t, x, w.t())).addmm_(s_t, b.t(), alpha=scaling)
    ds_t = scaling * (dy @ b)
    torch_grads = (dy @ w + (ds_t @ a) * mask / keep, None, ds_t.t() @ xd, scaling * (dy.t() @ s_t), dy.sum(0) if bias else None)

    y64, grads64 = _float64_all(x, w, a, b, scaling, bias_t, dy, mask, keep)
    _check(y, y_t, y64, dtype, "y (dropout)")
    _check(s, s_t, (x.double() * mask / keep) @ a.double().t(), dtype, "s (dropout)")
    for name, got, want, oracle in zip(("dx", "dW", "dA", "dB", "dbias"), grads, torch_grads, grads64):
        if want is None:
            assert got is None
            continue
        _check(got, want, oracle, dtype, f"{name} (dropout)")


def test_strided_inputs():
    """x and dY as non-contiguous views are read through their strides."""
    m, k, n, r = 37, 96, 80, 8
    x, w, a, b, bias = _scaled_inputs(m, k, n, r, torch.float32, True)
    x_t = x.t().contiguous().t()  # column-major [m, k]
    dy_big = torch.randn(m, 2 * n, generator=torch.Generator().manual_seed(7))
    dy = dy_big[:, ::2]
    y, s = K.lora_forward(x_t, w, a, b, 0.5, bias)
    grads = K.lora_backward(dy, x_t, w, a, b, s, 0.5, 0.0, 0, ALL_NEEDS)
    y_c, s_c = K.lora_forward(x, w, a, b, 0.5, bias)
    grads_c = K.lora_backward(dy.contiguous(), x, w, a, b, s_c, 0.5, 0.0, 0, ALL_NEEDS)
    y64, grads64 = _float64_all(x, w, a, b, 0.5, bias, dy)
    y_ref, s_ref = reference.lora_forward(x, w, a, b, 0.5, bias)
    _check(y, y_ref, y64, torch.float32, "y (strided)")
    grads_ref = reference.lora_backward(dy, x, w, a, b, s_ref, 0.5, 0.0, 0, ALL_NEEDS)
    assert torch.equal(y, y_c) and torch.equal(s, s_c), "strides must not change the kernels' result"
    for name, got, contiguous, want, oracle in zip(("dx", "dW", "dA", "dB", "dbias"), grads, grads_c, grads_ref, grads64):
        _check(got, want, oracle, torch.float32, f"{name} (strided)")
        if name != "dW":  # dW is torch.mm, whose kernel choice may depend on the layout
            assert torch.equal(got, contiguous), f"{name}: strides must not change the kernels' result"
    # dY with zero strides, as autograd hands over the gradient of y.sum().
    dy0 = torch.randn(1, n, generator=torch.Generator().manual_seed(9)).expand(m, n)
    grads0 = K.lora_backward(dy0, x, w, a, b, s_c, 0.5, 0.0, 0, ALL_NEEDS)
    grads0_ref = reference.lora_backward(dy0.contiguous(), x, w, a, b, s_ref, 0.5, 0.0, 0, ALL_NEEDS)
    _, grads0_64 = _float64_all(x, w, a, b, 0.5, bias, dy0.contiguous())
    for name, got, want, oracle in zip(("dx", "dW", "dA", "dB", "dbias"), grads0, grads0_ref, grads0_64):
        _check(got, want, oracle, torch.float32, f"{name} (expanded dY)")


def test_backward_needs_subsets():
    m, k, n, r = 37, 96, 80, 8
    x, w, a, b, bias = _scaled_inputs(m, k, n, r, torch.float32, True)
    dy = torch.randn(m, n, generator=torch.Generator().manual_seed(8))
    y, s = K.lora_forward(x, w, a, b, 0.5, bias)
    full = K.lora_backward(dy, x, w, a, b, s, 0.5, 0.0, 0, ALL_NEEDS)
    cases = [
        ((False, False, True, True, False), 2),  # frozen input: dY pass + dA
        ((True, False, False, False, False), 2),  # frozen adapters: dY pass (dS) + dX
        ((False, True, False, False, False), 0),  # only dW: torch.mm
        ((False, False, False, True, True), 1),  # dB and dbias: the dY pass alone
    ]
    for needs, launches in cases:
        K.reset_launch_count()
        got = K.lora_backward(dy, x, w, a, b, s, 0.5, 0.0, 0, needs)
        assert K.launch_count() == launches, (needs, K.launch_count())
        for want_it, g, f in zip(needs, got, full):
            assert (g is None) == (not want_it)
            if want_it:
                assert torch.equal(g, f), "a subset of gradients must give the same bits"


# ---------------------------------------------------------------------------
# the autograd path: fastlora.lora_linear with the Triton backend
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_lora_linear_autograd_3d(dtype, dropout):
    lead, m, k, n, r = (2,), 19, 48, 40, 8  # x [2, 19, 48] -> M = 38 rows
    x, w, a, b, bias = make_inputs(m, k, n, r, dtype=dtype, bias=True, lead=lead, seed=11)
    leaves = [t.clone().requires_grad_(True) for t in (x, a, b, bias)]
    xg, ag, bg, biasg = leaves
    originals = [t.detach().clone() for t in (x, w, a, b, bias)]
    scaling = 0.5
    torch.manual_seed(99)
    seed = new_dropout_seed()  # what lora_linear will draw next
    torch.manual_seed(99)
    K.reset_launch_count()
    y = fastlora.lora_linear(xg, w, ag, bg, scaling, biasg, dropout=dropout, training=True)
    assert K.launch_count() == 2
    assert y.shape == (*lead, m, n) and y.dtype == dtype
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(12)).to(dtype)
    K.reset_launch_count()
    y.backward(dy, retain_graph=True)
    assert K.launch_count() == 3
    first = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    y.backward(dy)
    second = [t.grad for t in leaves]
    for name, g1, g2 in zip(("dx", "dA", "dB", "dbias"), first, second):
        assert torch.equal(g1, g2), f"{name}: retain_graph double backward is not bit-identical"
    for before, t in zip(originals, (x, w, a, b, bias)):
        assert torch.equal(before, t), "an input was modified"

    x2, dy2 = x.reshape(-1, k), dy.reshape(-1, n)
    if dropout:
        mask, keep = K.dropout_keep_mask(seed, (x2.shape[0], k), dropout, x.device)
    else:
        mask, keep = None, 1.0
    y64, (dx64, _, da64, db64, dbias64) = _float64_all(x2, w, a, b, scaling, bias, dy2, mask, keep)
    # torch's error yardstick: the reference path in dtype with the same mask.
    xd = x2 if mask is None else x2 * mask / keep
    s_t = xd @ a.t()
    y_t = torch.addmm(bias, x2, w.t()).addmm_(s_t, b.t(), alpha=scaling)
    ds_t = scaling * (dy2 @ b)
    dx_t = dy2 @ w + (ds_t @ a if mask is None else (ds_t @ a) * mask / keep)
    _check(y.detach().reshape(-1, n), y_t, y64, dtype, "y")
    _check(first[0].reshape(-1, k), dx_t, dx64, dtype, "dx")
    _check(first[1], ds_t.t() @ xd, da64, dtype, "dA")
    _check(first[2], scaling * (dy2.t() @ s_t), db64, dtype, "dB")
    _check(first[3], dy2.sum(0), dbias64, dtype, "dbias")


def test_lora_linear_zero_rows():
    x, w, a, b, bias = make_inputs(0, 32, 16, 8, bias=True, lead=(3,))
    xg = x.requires_grad_(True)
    ag, bg = a.requires_grad_(True), b.requires_grad_(True)
    K.reset_launch_count()
    y = fastlora.lora_linear(xg, w, ag, bg, 1.0, bias)
    y.sum().backward()
    assert K.launch_count() == 0
    assert y.shape == (3, 0, 16)
    assert torch.equal(ag.grad, torch.zeros_like(a)) and torch.equal(bg.grad, torch.zeros_like(b))
    assert xg.grad.shape == x.shape


# ---------------------------------------------------------------------------
# the config functions (their GPU lists, outside the interpreter's one config)
# ---------------------------------------------------------------------------


def test_config_functions_and_filter(monkeypatch):
    from fastlora.kernels import configs as C

    monkeypatch.setattr(C, "interpreting", lambda: False)
    pow2 = lambda v: v >= 16 and v & (v - 1) == 0  # noqa: E731 - tl.dot needs >= 16; tl.arange powers of two
    for arch in (80, 86, 89, 90, 100):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for block_r in (16, 64, 256):
                lists = [C.dy_pass_configs(arch, dtype, block_r=block_r)]
                for dropout in (False, True):
                    lists += [
                        C.gemm_configs(arch, dtype, has_dropout=dropout, block_r=block_r),
                        C.shrink_configs(arch, dtype, has_dropout=dropout, block_r=block_r),
                        C.down_grad_configs(arch, dtype, has_dropout=dropout, block_r=block_r),
                    ]
                for cands in lists:
                    assert cands, (arch, dtype, block_r)
                    for c in cands:
                        assert all(pow2(v) for k, v in c.kwargs.items() if k.startswith("BLOCK")), c
    # Dropout drops the 128x256 GEMM tile (a second [BM, BN] fp32 tensor would spill).
    assert all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 128 * 128 for c in C.gemm_configs(90, torch.bfloat16, has_dropout=True))
    # The filter keeps the arch's configs that fit the shape, never nothing.
    union = C.all_gemm_configs()
    hopper = C.gemm_configs(90, torch.bfloat16)
    ampere = C.gemm_configs(80, torch.bfloat16)
    assert C.prune(union, hopper, {"BLOCK_M": 8192, "BLOCK_N": 4096}) == hopper
    assert C.prune(union, ampere, {"BLOCK_M": 8192, "BLOCK_N": 4096}) == ampere
    small = C.prune(union, hopper, {"BLOCK_M": 8, "BLOCK_N": 8})
    assert len(small) == 1 and small[0] in hopper
    assert C.pick(C.dy_pass_configs(90, torch.bfloat16), {"BLOCK_M": 4096, "BLOCK_N": 4096}).kwargs["BLOCK_N"] == 256
    assert C.pick(C.dy_pass_configs(90, torch.bfloat16), {"BLOCK_M": 16, "BLOCK_N": 100}).kwargs["BLOCK_N"] == 128


def test_building_blocks_name_bad_shapes():
    x = torch.randn(4, 32)
    with pytest.raises(ValueError, match=r"lora_A must have shape \[r, K\] = \[8, 32\], got \[8, 16\]"):
        K.lora_shrink(x, torch.randn(8, 16))
    with pytest.raises(ValueError, match=r"s must have shape \[M, r\]"):
        K.lora_dy_pass(torch.randn(4, 16), torch.randn(16, 8), torch.randn(5, 8), 1.0)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        K.lora_shrink(x.double(), torch.randn(8, 32).double())


# ---------------------------------------------------------------------------
# DoRA: the column scale and the pre-scale store in the GEMM's epilogue
# ---------------------------------------------------------------------------


def _col_scale(n, seed=13):
    """A DoRA-like g = m / norm [N], fp32, around 1."""
    return torch.rand(n, generator=torch.Generator().manual_seed(seed)) + 0.5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["p0", "p0.3"])
@pytest.mark.parametrize("m,k,n,r,bias", [(37, 96, 80, 8, True), (32, 64, 32, 16, False), (0, 32, 16, 8, True)])
def test_dora_forward_kernel(m, k, n, r, bias, dropout, dtype):
    x, w, a, b, bias_t = _scaled_inputs(m, k, n, r, dtype, bias)
    g = _col_scale(n)
    scaling, seed = 1.5, 4242
    originals = [t.clone() for t in (x, w, a, b, g)]
    K.reset_launch_count()
    y, z, s = K.dora_forward(x, w, a, b, scaling, g, bias_t, dropout, seed)
    assert K.launch_count() == (2 if m else 0)  # shrink + the GEMM, as lora_forward
    assert y.dtype == z.dtype == s.dtype == dtype and y.shape == z.shape == (m, n) and s.shape == (m, r)
    for before, after in zip(originals, (x, w, a, b, g)):
        assert torch.equal(before, after), "an input was modified"
    if dropout:
        mask, keep = K.dropout_keep_mask(seed, (m, k), dropout, x.device)
    else:
        mask, keep = torch.ones(m, k, dtype=torch.bool), 1.0
    # torch's own computation in dtype with the kernels' mask (the yardstick)...
    s_t = (x * mask / keep) @ a.t()
    z_t = (x @ w.t()).addmm_(s_t, b.t(), alpha=scaling)
    y_t = z_t * g.to(dtype) if bias_t is None else torch.addcmul(bias_t, z_t, g.to(dtype))
    # ...and float64 (the oracle); g is the kernel's fp32 input, exact in float64.
    s64 = (x.double() * mask / keep) @ a.double().t()
    z64 = x.double() @ w.double().t() + scaling * s64 @ b.double().t()
    y64 = z64 * g.double() + (bias_t.double() if bias_t is not None else 0.0)
    _check(s, s_t, s64, dtype, "s (dora)")
    _check(z, z_t, z64, dtype, "z (dora)")
    _check(y, y_t, y64, dtype, "y (dora)")
    if not dropout:  # the reference twin (its own mask otherwise): the same yardstick
        y_ref, z_ref, _ = reference.dora_forward(x, w, a, b, scaling, g, bias_t)
        _check(y, y_ref, y64, dtype, "y (dora) vs the reference twin's error")
        _check(z, z_ref, z64, dtype, "z (dora) vs the reference twin's error")
    # Without the DoRA flags the same GEMM is lora_forward's: z equals its output bit for bit.
    y_lora, _ = K.lora_forward(x, w, a, b, scaling, None, dropout, seed)
    assert torch.equal(z, y_lora), "z must be the plain LoRA GEMM's tile (before scale and bias)"


def _dora_layer_k(dtype, bias=True, dropout=0.0, k=48, n=40, r=8):
    torch.manual_seed(0)
    layer = fastlora.DoRALinear(k, n, bias=bias, r=r, alpha=16.0, dropout=dropout, dtype=dtype).train()
    with torch.no_grad():
        layer.lora_B.normal_(0.0, 0.3)
        layer.lora_magnitude.mul_(torch.rand(n).to(dtype) + 0.5)
    if bias:
        layer.bias.requires_grad_(True)
    return layer


def _dora_by_hand(x, w, a, b, mag, norm, scaling, bias, dy, mask, keep):
    """DoRA forward and (x, A, B, m, bias) gradients by the formulas, in x's dtype
    (g rounded to it; dm summed in fp32): PyTorch's own error yardstick."""
    dt = x.dtype
    g = (mag.float() / norm).to(dt)
    xd = x * mask / keep
    s = xd @ a.t()
    z = (x @ w.t()).addmm_(s, b.t(), alpha=scaling)
    y = torch.addcmul(bias, z, g)
    dz = dy * g
    ds = scaling * (dz @ b)
    dx = dz @ w + (ds @ a) * mask / keep
    return y, [dx, ds.t() @ xd, scaling * (dz.t() @ s), ((dy * z).sum(0, dtype=torch.float32) / norm).to(dt), dy.sum(0)]


def _dora_float64(x, w, a, b, mag, scaling, bias, dy, mask, keep):
    """The DoRA formula in float64 autograd (row norm materialized, detached)."""
    leaves = [t.detach().double().requires_grad_(True) for t in (x, a, b, mag, bias)]
    x64, a64, b64, m64, bias64 = leaves
    w64 = w.detach().double()
    norm = (w64 + scaling * b64 @ a64).norm(dim=1).detach()
    z = x64 @ w64.t() + scaling * ((x64 * mask / keep) @ a64.t()) @ b64.t()
    y = (m64 / norm) * z + bias64
    y.backward(dy.double())
    return y.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dropout", [0.0, 0.2], ids=["p0", "p0.2"])
def test_dora_linear_on_the_kernels(dtype, dropout):
    """DoRALinear forward + backward on the Triton backend (3-D input) vs float64 autograd;
    2 launches forward (as LoRA), 3 backward (the LoRA backward at dZ = g * dY)."""
    layer = _dora_layer_k(dtype, dropout=dropout)
    lead, m, k, n = (2,), 19, 48, 40
    x = torch.randn(*lead, m, k, generator=torch.Generator().manual_seed(21)).to(dtype).requires_grad_(True)
    torch.manual_seed(77)
    seed = new_dropout_seed()  # what the layer will draw next
    torch.manual_seed(77)
    K.reset_launch_count()
    y = layer(x)
    assert K.launch_count() == 2
    assert y.shape == (*lead, m, n) and y.dtype == dtype
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(22)).to(dtype)
    K.reset_launch_count()
    y.backward(dy, retain_graph=True)
    assert K.launch_count() == 3
    params = (layer.lora_A, layer.lora_B, layer.lora_magnitude, layer.bias)
    first = [x.grad.clone()] + [p.grad.clone() for p in params]
    for t in (x, *params):
        t.grad = None
    y.backward(dy)
    for name, g1, t in zip(("dx", "dA", "dB", "dm", "dbias"), first, (x, *params)):
        assert torch.equal(g1, t.grad), f"{name}: retain_graph double backward is not bit-identical"

    x2, dy2 = x.detach().reshape(-1, k), dy.reshape(-1, n)
    if dropout:
        mask, keep = K.dropout_keep_mask(seed, (x2.shape[0], k), dropout, x.device)
    else:
        mask, keep = torch.ones(x2.shape[0], k, dtype=torch.bool), 1.0
    with torch.no_grad():
        norm = layer.weight_norm()  # fp32, the layer's own (identity-based) norm
        y_t, grads_t = _dora_by_hand(x2, layer.weight, layer.lora_A, layer.lora_B, layer.lora_magnitude, norm,
                                     layer.scaling, layer.bias, dy2, mask, keep)  # fmt: skip
    y64, grads64 = _dora_float64(x2, layer.weight, layer.lora_A, layer.lora_B, layer.lora_magnitude, layer.scaling,
                                 layer.bias, dy2, mask, keep)  # fmt: skip
    _check(y.detach().reshape(-1, n), y_t, y64, dtype, "y (DoRA layer)")
    for name, got, want, oracle in zip(("dx", "dA", "dB", "dm", "dbias"), first, grads_t, grads64):
        got = got.reshape(oracle.shape)
        _check(got, want, oracle, dtype, f"{name} (DoRA layer)")


def test_dora_linear_fp32_adapters_on_an_fp16_base():
    """Mixed precision on the kernels: the fp32 adapters are cast to x's dtype (as
    lora_linear does), the gradients come back in fp32, the norm from the fp32 adapters."""
    layer = _dora_layer_k(torch.float16)
    for name in ("lora_A", "lora_B", "lora_magnitude"):
        getattr(layer, name).data = getattr(layer, name).data.float()
    x = torch.randn(21, 48, generator=torch.Generator().manual_seed(31)).half().requires_grad_(True)
    K.reset_launch_count()
    y = layer(x)
    assert K.launch_count() == 2 and y.dtype == torch.float16
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(32)).half()
    y.backward(dy)
    params = (layer.lora_A, layer.lora_B, layer.lora_magnitude, layer.bias)
    assert all(p.grad.dtype == torch.float32 for p in params[:3])
    ones = torch.ones(21, 48, dtype=torch.bool)
    y64, grads64 = _dora_float64(x.detach(), layer.weight, *params[:3], layer.scaling, layer.bias, dy, ones, 1.0)
    # x, W, bias are fp16 values (exact in float64); the kernels round A, B (cast), z and y
    # to fp16 and accumulate in fp32: 4 fp16 roundings (2^-11 each) of max|.| bound it.
    gots = [y.detach(), x.grad, *[p.grad for p in params[:3]]]
    for name, got, oracle in zip(("y", "dx", "dA", "dB", "dm"), gots, [y64, *grads64]):
        assert_close_to(got, oracle, 4 * 2**-11 * oracle.abs().max().item(), f"{name} (mixed, kernels)")


# ---------------------------------------------------------------------------
# fp16 range: the LoRA term is scaled in fp32, never split to 16 bits after scaling
# ---------------------------------------------------------------------------


def _big_lora_term_inputs(m, k, n, r, dtype, seed=40):
    """S = x A^T of a few hundred, scaling 200: scaling * S passes fp16's 65504
    while lora_B ~ 1e-3 keeps y in range (|y| ~ 10^2-10^3)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
    a = (100.0 * torch.randn(r, k, generator=g)).to(dtype)
    b = (1e-3 * torch.randn(n, r, generator=g)).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    return x, w, a, b, bias, 200.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_term_beyond_fp16_range(dtype):
    """scaling * S > 65504 with y finite: the kernels give y (and every gradient)
    within the 2x rule of float64, as the reference (PEFT's math) does. Before the
    fix the fp16 hi/lo split of scaling * S overflowed to inf and gave NaN."""
    m, k, n, r = 37, 64, 40, 8
    x, w, a, b, bias, scaling = _big_lora_term_inputs(m, k, n, r, dtype)
    dy = torch.randn(m, n, generator=torch.Generator().manual_seed(41)).to(dtype)
    y, s = K.lora_forward(x, w, a, b, scaling, bias)
    assert (scaling * s.double()).abs().max() > 65504  # the case at hand
    y_ref, s_ref = reference.lora_forward(x, w, a, b, scaling, bias)
    y64, grads64 = _float64_all(x, w, a, b, scaling, bias, dy)
    assert torch.isfinite(y64).all() and y64.abs().max() < 65504
    _check(y, y_ref, y64, dtype, "y (scaling * S beyond fp16)")
    grads = K.lora_backward(dy, x, w, a, b, s, scaling, 0.0, 0, ALL_NEEDS)
    grads_ref = reference.lora_backward(dy, x, w, a, b, s_ref, scaling, 0.0, 0, ALL_NEEDS)
    for name, got, want, oracle in zip(("dx", "dW", "dA", "dB", "dbias"), grads, grads_ref, grads64):
        _check(got, want, oracle, dtype, f"{name} (scaling * S beyond fp16)")
    # DoRA shares the epilogue: z = the LoRA GEMM's tile, y = g * z + bias.
    g = _col_scale(n)
    y_d, z_d, _ = K.dora_forward(x, w, a, b, scaling, g, bias)
    y_dref, z_dref, _ = reference.dora_forward(x, w, a, b, scaling, g, bias)
    z64 = y64 - bias.double()
    _check(z_d, z_dref, z64, dtype, "z (dora, scaling * S beyond fp16)")
    _check(y_d, y_dref, z64 * g.double() + bias.double(), dtype, "y (dora, scaling * S beyond fp16)")


def test_dx_lora_term_beyond_fp16_range():
    """dS = scaling * dY B beyond fp16's range (a loss scaler's dY) while dX is
    finite: dX within the 2x rule of float64 (the reference's own fp16 dS is inf
    there, so its error is measured in fp32: the kernels keep dS in fp32)."""
    m, k, n, r = 33, 48, 40, 4
    g = torch.Generator().manual_seed(42)
    x = torch.randn(m, k, generator=g).half()
    w = (torch.randn(n, k, generator=g) / k**0.5).half()
    a = (1e-3 * torch.randn(r, k, generator=g)).half()
    b = torch.randn(n, r, generator=g).half()
    dy = (3000.0 * torch.randn(m, n, generator=g)).half()
    scaling = 16.0
    s = x @ a.t()
    dx, _, da, db, _ = K.lora_backward(dy, x, w, a, b, s, scaling, 0.0, 0, (True, False, True, True, False))
    ds64 = scaling * dy.double() @ b.double()
    assert ds64.abs().max() > 65504
    dx64 = dy.double() @ w.double() + ds64 @ a.double()
    assert dx64.abs().max() < 65504
    dx_t = (dy.float() @ w.float() + (scaling * (dy.float() @ b.float())) @ a.float()).half()  # torch, fp32 dS
    _check(dx, dx_t, dx64, torch.float16, "dX (dS beyond fp16)")


def _same_nonfinite(got, want, what):
    """NaN where ``want`` is NaN, +inf / -inf where it is +inf / -inf."""
    for name, fn in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        g, w = fn(got), fn(want)
        bad = (g != w).nonzero()
        assert bad.numel() == 0, f"{what}: {name} pattern differs at {bad[:5].tolist()} ({len(bad)} elements)"


@pytest.mark.parametrize(
    "dtype,adapters", [(torch.float32, None), (torch.float16, None), (torch.float16, torch.float32)],
    ids=["fp32", "fp16", "fp16-fp32-adapters"],
)
def test_inf_propagates_as_in_the_reference(dtype, adapters):
    """An inf in x (forward) or dY (backward) gives inf / NaN exactly where the
    reference (nn.Linear's math) does, finite values elsewhere within the 2x rule.
    Before the fix the split of an inf S gave inf - inf = NaN for whole rows."""
    m, k, n, r = 37, 48, 40, 1
    x, w, a, b, bias = make_inputs(m, k, n, r, dtype=dtype, bias=True, seed=43)
    a, b = a.to(adapters or dtype), b.to(adapters or dtype)
    x[3, 5] = float("inf")
    x[20, 0] = float("-inf")
    scaling = 0.5
    y, s = K.lora_forward(x, w, a, b, scaling, bias)
    y_ref, s_ref = reference.lora_forward(x, w, a, b, scaling, bias)
    assert not torch.isfinite(y_ref).all() and torch.isinf(y_ref).any()
    _same_nonfinite(s, s_ref, "s")
    _same_nonfinite(y, y_ref, "y")
    fin = torch.isfinite(y_ref).all(dim=1)
    y64, _ = _float64_all(x[fin], w, a, b, scaling, bias, torch.zeros(int(fin.sum()), n, dtype=dtype))
    _check(y[fin], y_ref[fin], y64, dtype, "y (finite rows)")
    g = _col_scale(n)
    y_d, z_d, _ = K.dora_forward(x, w, a, b, scaling, g, bias)
    y_dref, z_dref, _ = reference.dora_forward(x, w, a, b, scaling, g, bias)
    _same_nonfinite(z_d, z_dref, "z (dora)")
    _same_nonfinite(y_d, y_dref, "y (dora)")

    x2, w2, a2, b2, _ = make_inputs(m, k, n, r, dtype=dtype, bias=False, seed=44)
    a2, b2 = a2.to(adapters or dtype), b2.to(adapters or dtype)
    dy = torch.randn(m, n, generator=torch.Generator().manual_seed(45)).to(dtype)
    dy[7, 9] = float("inf")
    s2 = x2.to(a2.dtype) @ a2.t()
    grads = K.lora_backward(dy, x2, w2, a2, b2, s2, scaling, 0.0, 0, ALL_NEEDS)
    grads_ref = reference.lora_backward(dy, x2, w2, a2, b2, s2, scaling, 0.0, 0, ALL_NEEDS)
    for name, got, want in zip(("dx", "dW", "dA", "dB", "dbias"), grads, grads_ref):
        assert not torch.isfinite(want).all(), name
        _same_nonfinite(got, want, name)


# ---------------------------------------------------------------------------
# fp32 adapters on 16-bit activations: an fp32 LoRA branch (reference.py's contract)
# ---------------------------------------------------------------------------


def _mixed_inputs(m, k, n, r, dtype, bias=True, seed=50):
    x, w, a, b, bias_t = make_inputs(m, k, n, r, dtype=torch.float32, bias=bias, seed=seed)
    # NOTE: adapters with full fp32 mantissas (not fp16 values): what the kernels
    # would lose by rounding them shows.
    return x.to(dtype), w.to(dtype), a, b, (bias_t.to(dtype) if bias else None)


@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["p0", "p0.3"])
@pytest.mark.parametrize("m,k,n,r", [(37, 96, 80, 8), (33, 40, 24, 40)])
def test_fp32_adapters_on_fp16_activations(m, k, n, r, dropout):
    """lora_forward / lora_backward with fp32 lora_A / lora_B on fp16 x, W, bias:
    s, dA, dB in fp32 and y, dx, dbias in fp16, each within the 2x rule of
    float64 against reference.py's mixed path (its fp32 branch) as the yardstick.
    Before: S was rounded to fp16 and dA to fp16 (~1000x the reference's error)."""
    dtype = torch.float16
    x, w, a, b, bias = _mixed_inputs(m, k, n, r, dtype)
    dy = torch.randn(m, n, generator=torch.Generator().manual_seed(51)).to(dtype)
    scaling, seed = 1.5, 777
    needs = (True, False, True, True, True)
    K.reset_launch_count()
    y, s = K.lora_forward(x, w, a, b, scaling, bias, dropout, seed)
    grads = K.lora_backward(dy, x, w, a, b, s, scaling, dropout, seed, needs)
    assert K.launch_count() == 5
    assert y.dtype == dtype and s.dtype == torch.float32
    assert [g.dtype if g is not None else None for g in grads] == [dtype, None, torch.float32, torch.float32, dtype]
    if dropout:
        mask, keep = K.dropout_keep_mask(seed, (m, k), dropout, x.device)
    else:
        mask, keep = torch.ones(m, k, dtype=torch.bool), 1.0
    # reference.py's mixed path with the kernels' mask: the fp32 branch (the yardstick).
    xd = x.float() * mask / keep
    s_t = xd @ a.t()
    y_t = torch.addmm(torch.addmm(bias, x, w.t()).float(), s_t, b.t(), alpha=scaling).to(dtype)
    ds_t = scaling * (dy.float() @ b)
    dx_t = (dy @ w).add_((ds_t @ a) * mask / keep)
    torch_grads = (dx_t, None, ds_t.t() @ xd, scaling * (dy.float().t() @ s_t), dy.sum(0))
    if not dropout:  # reference.py itself gives the same yardstick
        y_ref, s_ref = reference.lora_forward(x, w, a, b, scaling, bias)
        assert torch.equal(y_ref, y_t) and torch.equal(s_ref, s_t)
    y64, grads64 = _float64_all(x, w, a, b, scaling, bias, dy, mask if dropout else None, keep)
    _check(y, y_t, y64, dtype, "y (fp32 adapters)")
    _check(s, s_t, xd.double() @ a.double().t(), torch.float32, "s (fp32 adapters)")
    for name, got, want, oracle in zip(("dx", "dW", "dA", "dB", "dbias"), grads, torch_grads, grads64):
        if want is None:
            continue
        _check(got, want, oracle, torch.float32 if want.dtype == torch.float32 else dtype, f"{name} (fp32 adapters)")


def test_dora_forward_fp32_adapters():
    """dora_forward with fp32 adapters on fp16 x: z, y as reference.dora_forward
    (fp32 branch, fp16 outputs), s in fp32."""
    m, k, n, r = 37, 64, 40, 8
    x, w, a, b, bias = _mixed_inputs(m, k, n, r, torch.float16, seed=52)
    g = _col_scale(n)
    y, z, s = K.dora_forward(x, w, a, b, 0.75, g, bias)
    y_ref, z_ref, s_ref = reference.dora_forward(x, w, a, b, 0.75, g, bias)
    assert s.dtype == torch.float32 and y.dtype == z.dtype == torch.float16
    s64 = x.double() @ a.double().t()
    z64 = x.double() @ w.double().t() + 0.75 * s64 @ b.double().t()
    _check(s, s_ref, s64, torch.float32, "s (dora, fp32 adapters)")
    _check(z, z_ref, z64, torch.float16, "z (dora, fp32 adapters)")
    _check(y, y_ref, z64 * g.double() + bias.double(), torch.float16, "y (dora, fp32 adapters)")


def test_building_blocks_reject_other_adapter_dtypes():
    x = torch.randn(4, 32).half()
    with pytest.raises(TypeError, match=r"lora_A must be torch.float16 .* or torch.float32, got torch.float64"):
        K.lora_shrink(x, torch.randn(8, 32).double())
    with pytest.raises(TypeError, match="expected both torch.float16"):
        K.lora_forward(x, torch.randn(16, 32).half(), torch.randn(8, 32), torch.randn(16, 8).half(), 1.0)


# ---------------------------------------------------------------------------
# wide ranks: 128 and 256 (rank blocks in the dY pass and dA, rank steps in the GEMM epilogue)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("r,dropout", [(128, 0.0), (256, 0.2), (100, 0.0)])
def test_wide_ranks(r, dropout, dtype):
    m, k, n = 37, 40, 36
    x, w, a, b, bias = _scaled_inputs(m, k, n, r, dtype, True)
    dy = torch.randn(m, n, generator=torch.Generator().manual_seed(60)).to(dtype)
    scaling, seed = 0.5, 99
    K.reset_launch_count()
    y, s = K.lora_forward(x, w, a, b, scaling, bias, dropout, seed)
    grads = K.lora_backward(dy, x, w, a, b, s, scaling, dropout, seed, ALL_NEEDS)
    assert K.launch_count() == 5
    if dropout:
        mask, keep = K.dropout_keep_mask(seed, (m, k), dropout, x.device)
    else:
        mask, keep = torch.ones(m, k, dtype=torch.bool), 1.0
    xd = x * mask / keep
    s_t = xd @ a.t()
    y_t = torch.addmm(bias, x, w.t()).addmm_(s_t, b.t(), alpha=scaling)
    ds_t = scaling * (dy @ b)
    torch_grads = (dy @ w + (ds_t @ a) * mask / keep, dy.t() @ x, ds_t.t() @ xd, scaling * (dy.t() @ s_t), dy.sum(0))
    y64, grads64 = _float64_all(x, w, a, b, scaling, bias, dy, mask if dropout else None, keep)
    _check(y, y_t, y64, dtype, f"y (r={r})")
    _check(s, s_t, xd.double() @ a.double().t(), dtype, f"s (r={r})")
    for name, got, want, oracle in zip(("dx", "dW", "dA", "dB", "dbias"), grads, torch_grads, grads64):
        _check(got, want, oracle, dtype, f"{name} (r={r})")


def test_dy_pass_workspace_at_wide_ranks(monkeypatch):
    """The dY pass's fp32 workspace (dS partials per column block + dB partials per
    row split) at M = N = 4096 in bf16 (264 programs: an H100/H200) stays within
    1.5x (r <= 64), 2x (r = 128) and 3x (r = 256) dY's own bytes on sm_90 and
    sm_80; it was 8.2x at r = 128 and 16.4x at r = 256 with the 32-column blocks
    ranks above 64 used to get (measured: 1.28x / 1.56x / 2.63x on sm_90)."""
    from fastlora.kernels import configs as C

    monkeypatch.setattr(C, "interpreting", lambda: False)
    m = n = 4096
    dy_bytes = 2 * m * n
    for arch in (80, 90):
        for r, bound in ((16, 1.5), (64, 1.5), (128, 2.0), (256, 3.0)):
            ws = K.dy_pass_workspace_bytes(m, n, r, torch.bfloat16, arch=arch, programs=264)
            assert ws <= bound * dy_bytes, (arch, r, ws / dy_bytes)


# ---------------------------------------------------------------------------
# empty dimensions: empty sums are zeros
# ---------------------------------------------------------------------------


def _poison_allocator(*shapes):
    """Allocate and free NaN-filled tensors, so a torch.empty of the same size
    that should have been zeroed shows it (CPU malloc reuses the blocks)."""
    for shape in shapes:
        t = torch.full(shape, float("nan"))
        del t


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "m,k,n",
    [(21, 40, 0), (0, 40, 24), (21, 0, 24)],
    ids=["N=0", "M=0", "K=0"],
)
def test_empty_dimensions(m, k, n, dtype):
    """N = 0 (out_features 0): dS = dY B is an empty sum, so dX = 0 and dA = 0
    (they were torch.empty's leftovers); M = 0: dA = dB = dbias = 0; K = 0:
    y = bias, dB = dY^T S = 0, dbias = sum dY. Checked exactly."""
    r, scaling = 8, 0.5
    x, w, a, b, bias = _scaled_inputs(m, k, n, r, dtype, True)
    dy = torch.randn(m, n, generator=torch.Generator().manual_seed(70)).to(dtype)
    y, s = K.lora_forward(x, w, a, b, scaling, bias)
    assert y.shape == (m, n) and s.shape == (m, r)
    y_ref, s_ref = reference.lora_forward(x, w, a, b, scaling, bias)
    _check(s, s_ref, x.double() @ a.double().t(), dtype, "S")
    if k == 0:
        assert torch.equal(y, bias.expand(m, n))
    _poison_allocator((m, r), (r, k), (m, k))
    dx, dw, da, db, dbias = K.lora_backward(dy, x, w, a, b, s, scaling, 0.0, 0, ALL_NEEDS)
    for name, got, shape in (("dx", dx, (m, k)), ("dA", da, (r, k)), ("dB", db, (n, r))):
        assert got.shape == shape, name
        assert torch.equal(got, torch.zeros(shape, dtype=dtype)), f"{name}: not zeros"
    assert torch.equal(dw, dy.t() @ x)
    _check(dbias, dy.sum(0), dy.double().sum(0), dtype, "dbias")
