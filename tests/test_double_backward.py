"""Second-order gradients (``backward(create_graph=True)``: gradient penalties,
Hessian-vector products) are exact, not silently wrong.

The oracle is float64 autograd: ``gradgradcheck`` (finite differences of the
gradient) for the LoRA op, and the textbook formula in float64 torch ops for
QLoRA (on the dequantized weight) and DoRA (whose row norm is a constant by design, so finite differences,
which see the norm move, are not its oracle).
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradgradcheck

import fastlora
from fastlora.quant import dequantize_4bit, quantize_4bit

from _oracles import assert_close_to, make_inputs


def _f64(*ts):
    return [t.double().requires_grad_(True) if t is not None else None for t in ts]


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
def test_lora_second_order_gradients_match_finite_differences(dropout, bias):
    x, w, a, b, bb = make_inputs(5, 6, 4, 3, bias=bias)
    x, a, b, bb = _f64(x, a, b, bb)
    w = w.double()

    def f(x, a, b, *bias):
        torch.manual_seed(5)  # the same dropout mask at every evaluation
        return fastlora.lora_linear(x, w, a, b, 0.7, bias[0] if bias else None, dropout=dropout)

    assert gradgradcheck(f, (x, a, b, *([bb] if bias else [])))


def _penalty_grads(fn, leaves):
    y = fn(*leaves)
    grads = torch.autograd.grad(y.square().sum(), leaves, create_graph=True)
    penalty = sum(g.square().sum() for g in grads)
    return torch.autograd.grad(penalty, leaves)


def test_dora_gradient_penalty_matches_the_torch_formula():
    x, w, a, b, bb = make_inputs(5, 6, 4, 3)
    w = w.double()
    m = torch.rand(4, dtype=torch.float64) + 0.5
    leaves = _f64(x, a, b, m, bb)

    def ours(x, a, b, m, bias):
        return fastlora.dora_linear(x, w, a, b, m, 0.7, bias)

    def textbook(x, a, b, m, bias):
        norm = torch.linalg.vector_norm(w + 0.7 * b @ a, dim=1).detach()  # PEFT's DoRA: the norm a constant
        return (m / norm) * (x @ w.t() + 0.7 * (x @ a.t()) @ b.t()) + bias

    for got, want, name in zip(_penalty_grads(ours, leaves), _penalty_grads(textbook, leaves), "x A B m bias".split()):
        # float64 both ways, different association: 1e-10 is ~1e5 ulps of values ~1, far below any real error
        assert_close_to(got, want, 1e-10, f"d penalty / d {name}")


def test_qlora_gradient_penalty_matches_the_torch_formula():
    x, w, a, b, bb = make_inputs(4, 64, 6, 2)
    qw = quantize_4bit(w, blocksize=64)  # dequantized to x's float64 in the op
    w64 = dequantize_4bit(qw, torch.float64)
    leaves = _f64(x, a, b)
    got = _penalty_grads(lambda x, a, b: fastlora.qlora_linear(x, qw, a, b, 0.5), leaves)
    want = _penalty_grads(lambda x, a, b: x @ w64.t() + 0.5 * (x @ a.t()) @ b.t(), leaves)
    for g, wv, name in zip(got, want, "x A B".split()):
        assert_close_to(g, wv, 1e-10, f"d penalty / d {name}")  # float64 both ways (see the DoRA test)


@pytest.mark.interpreter
def test_triton_backend_second_order_gradients_match_float64():
    x, w, a, b, bb = make_inputs(5, 16, 12, 4)
    leaves = [t.clone().requires_grad_(True) for t in (x, a, b, bb)]
    got = _penalty_grads(lambda x, a, b, bias: fastlora.lora_linear(x, w, a, b, 0.7, bias), leaves)
    leaves64 = _f64(x, a, b, bb)
    w64 = w.double()
    want = _penalty_grads(lambda x, a, b, bias: x @ w64.t() + 0.7 * (x @ a.t()) @ b.t() + bias, leaves64)
    for g, wv, name in zip(got, want, "x A B bias".split()):
        # fp32 through two chained backward passes: 1e-4 relative to the largest value (~1e3 fp32 ulps)
        assert_close_to(g, wv, 1e-4 * wv.abs().max().item(), f"d penalty / d {name}")


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_multi_adapter_second_order_gradients_match_finite_differences(dropout):
    """lora_linear_multi: ids with a base row (-1) and an adapter without rows."""
    g = torch.Generator().manual_seed(3)
    x, a, b, bb = _f64(torch.randn(6, 5, generator=g), torch.randn(3, 2, 5, generator=g),
                       torch.randn(3, 4, 2, generator=g), torch.randn(4, generator=g))  # fmt: skip
    w = torch.randn(4, 5, generator=g, dtype=torch.float64)
    scaling = torch.tensor([0.5, 2.0, 1.5])
    ids = torch.tensor([1, -1, 0, 1, 0, 1])  # adapter 2 has no rows

    def f(x, a, b, bias):
        torch.manual_seed(5)  # the same dropout mask at every evaluation
        return fastlora.lora_linear_multi(x, w, a, b, scaling, ids, bias, dropout=dropout)

    assert gradgradcheck(f, (x, a, b, bb))


def test_qlora_multi_gradient_penalty_matches_the_torch_formula():
    x, w, a, b, bb = make_inputs(4, 64, 6, 2)
    qw = quantize_4bit(w, blocksize=64)
    w64 = dequantize_4bit(qw, torch.float64)
    ids = torch.tensor([1, -1, 0, 1])
    scaling = torch.tensor([0.5, 2.0])
    x, a, b = _f64(x, a, b)
    a2, b2 = torch.stack([a, a.flip(0)]), torch.stack([b, 2 * b])  # two adapters of the same leaves
    got = _penalty_grads(lambda x, a2, b2: fastlora.qlora_linear_multi(x, qw, a2, b2, scaling, ids), [x, a2, b2])

    def textbook(x, a2, b2):
        rows = [x[m] @ w64.t() + (scaling[i].item() * (x[m] @ a2[i].t()) @ b2[i].t() if i >= 0 else 0)
                for m, i in enumerate(ids.tolist())]  # fmt: skip
        return torch.stack(rows)

    want = _penalty_grads(textbook, [x, a2, b2])
    for g, wv, name in zip(got, want, "x A B".split()):
        # float64 both ways, different association; values reach ~1e6 here: 1e-12 relative is ~1e4 ulps
        assert_close_to(g, wv, 1e-12 * wv.abs().max().item(), f"d penalty / d {name}")
