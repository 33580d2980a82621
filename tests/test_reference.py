"""Tier 1: the reference path (fastlora.lora_linear on CPU) against float64
math, PyTorch's own low-precision error, gradcheck and PEFT."""

from __future__ import annotations

import math

import pytest
import torch

import fastlora
from fastlora import reference
from fastlora.functional import new_dropout_seed

from _oracles import assert_close_to, float64_grads, make_inputs, tolerance_2x

SHAPES = [(64, 64, 64), (37, 96, 80), (1, 32, 48), (0, 32, 16)]
RANKS = [1, 8, 16, 64]


def naive_in_dtype(x, weight, lora_A, lora_B, scaling, bias, dy):
    """The formula as a user would write it in plain torch, in x's dtype: its
    error against float64 is "PyTorch's own error" for this computation."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, lora_A, lora_B)]
    b = bias.detach().clone().requires_grad_(True) if bias is not None else None
    y = leaves[0] @ weight.t() + ((leaves[0] @ leaves[1].t()) @ leaves[2].t()) * scaling
    if b is not None:
        y = y + b
    y.backward(dy)
    return y.detach(), [t.grad for t in leaves] + [b.grad if b is not None else None]


def tolerance(naive, oracle, dtype):
    """2x PyTorch's own error for this computation in this dtype, floored at 4 ulp."""
    return tolerance_2x(naive, oracle, dtype)


def run_fastlora(x, weight, lora_A, lora_B, scaling, bias, dy, **kw):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, lora_A, lora_B)]
    b = bias.detach().clone().requires_grad_(True) if bias is not None else None
    y = fastlora.lora_linear(leaves[0], weight, leaves[1], leaves[2], scaling, b, **kw)
    y.backward(dy)
    return y.detach(), [t.grad for t in leaves] + [b.grad if b is not None else None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_matches_float64_within_2x_torch_error(shape, r, dtype, bias):
    m, k, n = shape
    x, weight, lora_A, lora_B, b = make_inputs(m, k, n, r, dtype, bias)
    scaling = 16.0 / r
    dy = torch.randn(m, n, generator=torch.Generator().manual_seed(1)).to(dtype)
    y64, g64 = float64_grads(x, weight, lora_A, lora_B, scaling, b, dy)
    y_naive, g_naive = naive_in_dtype(x, weight, lora_A, lora_B, scaling, b, dy)
    y, g = run_fastlora(x, weight, lora_A, lora_B, scaling, b, dy)
    assert y.dtype == dtype and y.shape == (m, n)
    assert_close_to(y, y64, tolerance(y_naive, y64, dtype), "output")
    for name, got, naive, want in zip(["dx", "dA", "dB", "dbias"], g, g_naive, g64):
        if want is None:
            assert got is None
            continue
        assert got.dtype == dtype
        assert_close_to(got, want, tolerance(naive, want, dtype), name)


def test_three_d_input_and_rslora_scale():
    x, weight, lora_A, lora_B, b = make_inputs(5, 24, 40, 4, lead=(3,))
    scaling = 8.0 / math.sqrt(4)  # rsLoRA's alpha / sqrt(r)
    dy = torch.randn(3, 5, 40, dtype=torch.float32)
    y64, g64 = float64_grads(x, weight, lora_A, lora_B, scaling, b, dy)
    y, g = run_fastlora(x, weight, lora_A, lora_B, scaling, b, dy)
    assert y.shape == (3, 5, 40)
    # fp32 against float64 with K=24 terms: a few ulp of magnitude ~10 -> 1e-5.
    assert_close_to(y, y64, 1e-5, "output")
    for name, got, want in zip(["dx", "dA", "dB", "dbias"], g, g64):
        assert_close_to(got, want, 1e-5 * max(1.0, want.abs().max().item()), name)


def test_gradcheck_float64_with_bias_dropout_and_weight_grad():
    x, weight, lora_A, lora_B, b = make_inputs(7, 12, 9, 3, torch.float64)
    for t in (x, weight, lora_A, lora_B, b):
        t.requires_grad_(True)

    def f(x, weight, lora_A, lora_B, b):
        torch.manual_seed(1234)  # the same dropout seed on every evaluation
        return fastlora.lora_linear(x, weight, lora_A, lora_B, 0.7, b, dropout=0.25)

    assert torch.autograd.gradcheck(f, (x, weight, lora_A, lora_B, b))
    assert torch.autograd.gradcheck(lambda *a: fastlora.lora_linear(*a[:4], 0.7, a[4]), (x, weight, lora_A, lora_B, b))


def test_dropout_forward_and_backward_use_the_same_regenerated_mask():
    m, k, n, r, p = 33, 40, 24, 8, 0.3
    x, weight, lora_A, lora_B, b = make_inputs(m, k, n, r)
    dy = torch.randn(m, n)
    torch.manual_seed(7)
    y, g = run_fastlora(x, weight, lora_A, lora_B, 2.0, b, dy, dropout=p)
    torch.manual_seed(7)
    mask, keep = reference.dropout_keep_mask(new_dropout_seed(), (m, k), p, x.device)
    y64, g64 = float64_grads(x, weight, lora_A, lora_B, 2.0, b, dy, keep_mask=mask, keep=keep)
    # fp32 vs float64 over K=40 terms of magnitude ~1: 1e-5 is ~100 ulp of headroom.
    assert_close_to(y, y64, 1e-5, "output")
    for name, got, want in zip(["dx", "dA", "dB", "dbias"], g, g64):
        assert_close_to(got, want, 1e-5 * max(1.0, want.abs().max().item()), name)


def test_dropout_is_off_in_eval_and_mask_statistics():
    x, weight, lora_A, lora_B, b = make_inputs(16, 32, 8, 4)
    y_eval = fastlora.lora_linear(x, weight, lora_A, lora_B, 1.0, b, dropout=0.5, training=False)
    y_plain = fastlora.lora_linear(x, weight, lora_A, lora_B, 1.0, b)
    assert torch.equal(y_eval, y_plain)
    p = 0.1
    mask, keep = reference.dropout_keep_mask(12345, (512, 512), p, torch.device("cpu"))
    assert abs(keep - (1 - p)) <= 2**-17  # keep probability rounded to 2^-16
    n = mask.numel()
    sigma = math.sqrt(keep * (1 - keep) / n)
    assert abs(mask.float().mean().item() - keep) < 6 * sigma  # a 6-sigma band
    other, _ = reference.dropout_keep_mask(12346, (512, 512), p, torch.device("cpu"))
    assert not torch.equal(mask, other)


def test_backward_does_not_mutate_saved_tensors_and_double_backward_is_identical():
    x, weight, lora_A, lora_B, b = make_inputs(20, 16, 12, 4)
    x.requires_grad_(True)
    lora_A.requires_grad_(True)
    lora_B.requires_grad_(True)
    x_before, version = x.detach().clone(), x._version
    torch.manual_seed(3)
    y = fastlora.lora_linear(x, weight, lora_A, lora_B, 1.5, b, dropout=0.2)
    dy = torch.randn_like(y)
    first = torch.autograd.grad(y, (x, lora_A, lora_B), dy, retain_graph=True)
    second = torch.autograd.grad(y, (x, lora_A, lora_B), dy)
    for a, c in zip(first, second):
        assert torch.equal(a, c)
    assert torch.equal(x.detach(), x_before) and x._version == version


def test_non_contiguous_inputs():
    x, weight, lora_A, lora_B, b = make_inputs(24, 30, 10, 4)
    x_nc = torch.randn(30, 48)[:, ::2].t()  # [24, 30] with strides (1, 96)
    w_nc = weight.t().contiguous().t()
    a_nc = lora_A.t().contiguous().t()
    assert not x_nc.is_contiguous() and not w_nc.is_contiguous()
    y = fastlora.lora_linear(x_nc, w_nc, a_nc, lora_B, 2.0, b)
    y64 = reference.lora_linear_float64(x_nc, weight, lora_A, lora_B, 2.0, b)
    assert_close_to(y, y64, 1e-5, "output")  # fp32 vs float64, K=30: ~100 ulp headroom


def test_weight_gradient_when_base_weight_requires_grad():
    x, weight, lora_A, lora_B, b = make_inputs(9, 14, 6, 2)
    weight.requires_grad_(True)
    y = fastlora.lora_linear(x, weight, lora_A, lora_B, 1.0, b)
    y.sum().backward()
    want = torch.ones(9, 6, dtype=torch.float64).t() @ x.double()
    assert_close_to(weight.grad, want, 1e-5, "dW")


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
def test_autocast_behaves_like_nn_linear(autocast_dtype):
    x, weight, lora_A, lora_B, b = make_inputs(12, 32, 16, 4)
    lora_A.requires_grad_(True)
    linear = torch.nn.Linear(32, 16)
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(b)
    with torch.autocast("cpu", dtype=autocast_dtype):
        y = fastlora.lora_linear(x, weight, lora_A, torch.zeros_like(lora_B), 1.0, b)
        y_linear = linear(x)
    assert y.dtype == y_linear.dtype == autocast_dtype
    # B = 0, so the LoRA term is exactly zero: both compute x W^T + b from the same casts.
    assert_close_to(y, y_linear, 0.0, "autocast output")
    y.float().sum().backward()
    assert lora_A.grad.dtype == torch.float32  # the cast is autograd-tracked


BAD_CASES = {
    "mismatched K": (dict(x=torch.randn(4, 7)), "x's last dimension"),
    "lora_A shape": (dict(lora_A=torch.randn(2, 9)), "lora_A must have shape"),
    "lora_B shape": (dict(lora_B=torch.randn(6, 3)), "lora_B must have shape [6, 2]"),
    "r < 1": (dict(lora_A=torch.randn(0, 8), lora_B=torch.randn(6, 0)), "rank r must be >= 1"),
    "integer x": (dict(x=torch.ones(4, 8, dtype=torch.int64)), "floating-point"),
    "dtype mismatch": (dict(lora_B=torch.randn(6, 2, dtype=torch.float64)), "lora_A/lora_B have dtypes torch.float32/torch.float64"),
    "weight dtype": (dict(weight=torch.randn(6, 8, dtype=torch.float16)), "weight has dtype torch.float16 but x has"),
    "bias shape": (dict(bias=torch.randn(5)), "bias must have shape [6]"),
    "weight 1-D": (dict(weight=torch.randn(8)), "weight must be a 2-D tensor"),
    "dropout 1.0": (dict(dropout=1.0), "dropout must be a probability"),
    "tensor scaling": (dict(scaling=torch.tensor(1.0)), "scaling must be a finite Python number"),
}


@pytest.mark.parametrize("case", list(BAD_CASES), ids=list(BAD_CASES))
def test_bad_input_gives_a_clear_error(case):
    args = dict(x=torch.randn(4, 8), weight=torch.randn(6, 8), lora_A=torch.randn(2, 8), lora_B=torch.randn(6, 2))
    args.update(scaling=1.0, bias=None)
    change, message = BAD_CASES[case]
    args.update(change)
    dropout = args.pop("dropout", 0.0)
    with pytest.raises((ValueError, TypeError), match=message.replace("[", r"\[").replace("]", r"\]")):
        fastlora.lora_linear(
            args["x"], args["weight"], args["lora_A"], args["lora_B"], args["scaling"], args["bias"], dropout=dropout
        )
