"""torch.compile(fullgraph=True) over LoRALinear: same results as eager, and
dropout's forward and backward masks agree inside a compiled graph."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastlora import LoRALinear

from _oracles import assert_close_to


def layer_and_input(bias=True, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    layer = LoRALinear.from_linear(nn.Linear(40, 24, bias=bias), r=4, alpha=8.0, dropout=dropout)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer, torch.randn(3, 7, 40)


def run(module, layer, x, dy):
    x = x.clone().requires_grad_(True)
    layer.lora_A.grad = layer.lora_B.grad = None
    if layer.bias is not None:
        layer.bias.requires_grad_(True)
        layer.bias.grad = None
    y = module(x)
    y.backward(dy)
    grads = [x.grad, layer.lora_A.grad, layer.lora_B.grad] + ([layer.bias.grad] if layer.bias is not None else [])
    return y.detach(), grads


@pytest.mark.parametrize("bias", [True, False])
def test_compiled_fullgraph_equals_eager(bias):
    layer, x = layer_and_input(bias)
    dy = torch.randn(3, 7, 24)
    y_eager, g_eager = run(layer, layer, x, dy)
    compiled = torch.compile(layer, fullgraph=True)
    y_comp, g_comp = run(compiled, layer, x, dy)
    # The op is opaque to the compiler, so the very same kernels run: bit-identical.
    assert_close_to(y_comp, y_eager, 0.0, "compiled output")
    for a, b in zip(g_comp, g_eager):
        assert_close_to(a, b, 0.0, "compiled gradient")


def test_compiled_dropout_uses_one_mask_for_forward_and_backward():
    """With a fixed mask D, S = D(x) A^T and dS = s * dY B give two identities that
    fail for mismatched masks: <dA, A> = <dS, S> and <dx - dY W, x> = <dS, S>.
    S is recovered from the output through B's pseudo-inverse (B has full rank)."""
    layer, x = layer_and_input(bias=False, dropout=0.4)
    layer.double()
    x = x.double()
    dy = torch.randn(3, 7, 24, dtype=torch.float64)
    compiled = torch.compile(layer, fullgraph=True)
    y, (dx, da, db) = run(compiled, layer, x, dy)
    w, a, b, s = layer.weight, layer.lora_A.detach(), layer.lora_B.detach(), layer.scaling
    x2, y2, dy2 = x.reshape(-1, 40), y.reshape(-1, 24), dy.reshape(-1, 24)
    S = torch.linalg.lstsq(b, ((y2 - x2 @ w.t()) / s).t()).solution.t()  # [M, r]
    dS = s * dy2 @ b
    inner = (dS * S).sum()
    assert abs(inner) > 1e-3  # non-trivial
    # float64 throughout: identities hold to ~1e-12 relative; 1e-9 leaves headroom.
    assert abs((da * a).sum() - inner) < 1e-9 * inner.abs()
    assert abs(((dx.reshape(-1, 40) - dy2 @ w) * x2).sum() - inner) < 1e-9 * inner.abs()
    # And the mask really dropped something: without dropout the identity changes.
    S_full = x2 @ a.t()
    assert abs((dS * S_full).sum() - inner) > 1e-6 * inner.abs()


def test_compiled_qlora_fullgraph_equals_eager_with_and_without_dropout():
    from fastlora import QLoRALinear

    torch.manual_seed(0)
    layer = QLoRALinear.from_linear(nn.Linear(128, 48), r=4, alpha=8.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x, dy = torch.randn(2, 5, 128), torch.randn(2, 5, 48)
    y_eager, g_eager = run(layer, layer, x, dy)
    compiled = torch.compile(layer, fullgraph=True)
    y_comp, g_comp = run(compiled, layer, x, dy)
    assert_close_to(y_comp, y_eager, 0.0, "compiled QLoRA output")  # same opaque op: bit-identical
    for a, b in zip(g_comp, g_eager):
        assert_close_to(a, b, 0.0, "compiled QLoRA gradient")
    layer.dropout = 0.3
    y_drop, g_drop = run(torch.compile(layer, fullgraph=True), layer, x, dy)
    assert y_drop.shape == (2, 5, 48) and all(torch.isfinite(g).all() for g in g_drop)


@pytest.mark.interpreter
def test_compiled_triton_backend_under_the_interpreter():
    layer, x = layer_and_input(bias=True)
    dy = torch.randn(3, 7, 24)
    y_eager, g_eager = run(layer, layer, x, dy)
    y_comp, g_comp = run(torch.compile(layer, fullgraph=True), layer, x, dy)
    assert_close_to(y_comp, y_eager, 0.0, "compiled Triton output")
    for a, b in zip(g_comp, g_eager):
        assert_close_to(a, b, 0.0, "compiled Triton gradient")


def test_one_compiled_model_with_layers_of_different_scalings():
    """A recompile for a second scaling makes it a symbolic float: the op must still trace."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 8))
    for i, alpha in enumerate((8.0, 16.0, 32.0)):
        model[i] = LoRALinear.from_linear(model[i], r=4, alpha=alpha)
        with torch.no_grad():
            model[i].lora_B.normal_()
    x = torch.randn(5, 16)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True)(x)
    assert_close_to(compiled, eager, 0.0, "compiled, three scalings")  # same opaque ops
