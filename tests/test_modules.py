"""LoRALinear against its base layer, PEFT's LoRA layer and float64 math."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastlora import LoRALinear

from _oracles import assert_close_to, peft_twin

peft = pytest.importorskip("peft", reason="PEFT parity tests need peft (pip install 'fastlora[test]')")


def lora_layer(k=48, n=40, r=8, alpha=16.0, bias=True, rslora=False, dropout=0.0, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(k, n, bias=bias, dtype=dtype)
    layer = LoRALinear.from_linear(base, r=r, alpha=alpha, use_rslora=rslora, dropout=dropout)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.5)  # non-zero so the LoRA branch matters
    return base, layer


def test_from_linear_shares_and_freezes_the_base():
    base, layer = lora_layer()
    assert layer.weight is base.weight and layer.bias is base.bias
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B"}
    assert layer.lora_A.shape == (8, 48) and layer.lora_B.shape == (40, 8)
    assert isinstance(layer, nn.Linear)
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A", "lora_B"}


def test_fresh_layer_equals_its_base_exactly():
    base = nn.Linear(32, 16)
    layer = LoRALinear.from_linear(base, r=4)
    x = torch.randn(5, 32)
    assert torch.equal(layer.lora_B, torch.zeros(16, 4))
    assert_close_to(layer(x), base(x), 0.0, "fresh layer")


def test_constructor_matches_nn_linear_init_and_peft_default_init():
    layer = LoRALinear(256, 64, r=16, alpha=32)
    assert layer.scaling == 2.0 and not layer.weight.requires_grad
    # kaiming_uniform(a=sqrt(5)) draws from U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    bound = 1 / math.sqrt(256)
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.9 * bound
    g = LoRALinear(256, 64, r=16, init="gaussian")
    # PEFT's "gaussian" init: std = 1/r; 4096 samples -> std within ~5 %.
    assert abs(g.lora_A.std().item() - 1 / 16) < 0.1 / 16


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("r", [1, 8, 16, 64])
def test_matches_peft_outputs_and_gradients(bias, rslora, r):
    _, layer = lora_layer(r=r, bias=bias, rslora=rslora, dropout=0.1)
    twin = peft_twin(layer, dropout=0.1)
    assert layer.scaling == pytest.approx(twin.scaling["default"])
    layer.eval()
    twin.eval()  # dropout is inactive in eval mode: outputs must agree
    x = torch.randn(3, 11, 48, dtype=torch.float64).float()
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = layer(xa), twin(xb)
    # Both are fp32 sums over K=48 (+ r) terms of magnitude <= ~5: 2e-5 is ~40 ulp.
    assert_close_to(ya, yb, 2e-5, "output")
    dy = torch.randn_like(ya)
    ya.backward(dy)
    yb.backward(dy)
    assert_close_to(xa.grad, xb.grad, 2e-5, "dx")
    assert_close_to(layer.lora_A.grad, twin.lora_A["default"].weight.grad, 1e-4, "dA")
    assert_close_to(layer.lora_B.grad, twin.lora_B["default"].weight.grad, 1e-4, "dB")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_merge_unmerge_round_trip_and_agree_with_peft(dtype):
    base, layer = lora_layer(dtype=dtype)
    twin = peft_twin(layer)
    w0 = layer.weight.detach().clone()
    x = torch.randn(6, 48, dtype=dtype)
    y_unmerged = layer(x).detach()
    layer.merge()
    assert layer.merged and base.weight is layer.weight
    twin.merge()
    eps = torch.finfo(dtype).eps
    # Both add s*B@A to W; ours in fp32 (fp64 for fp64) and rounded once, so the
    # weights agree to within 1 ulp of the weight's magnitude per rounding.
    scale = layer.weight.abs().max().item()
    assert_close_to(layer.weight, twin.base_layer.weight, 2 * eps * scale, "merged weight vs PEFT")
    with torch.no_grad():
        layer.lora_A.fill_(float("nan"))  # merged forward must not touch the adapters
    y_merged = layer(x).detach()
    assert torch.isfinite(y_merged).all()
    # Same math, different rounding order: a few ulp of the output magnitude.
    tol = 8 * eps * y_unmerged.abs().max().item() * (1 if dtype != torch.bfloat16 else 4)
    assert_close_to(y_merged, y_unmerged, tol, "merged vs unmerged output")
    layer.lora_A.data.copy_(twin.lora_A["default"].weight)
    layer.unmerge()
    assert not layer.merged
    # Round trip: W + d - d, each step rounded once to the weight dtype -> <= 1 ulp.
    assert_close_to(layer.weight, w0, eps * scale, "unmerged weight")


def test_to_linear_is_a_merged_copy():
    _, layer = lora_layer()
    w0 = layer.weight.detach().clone()
    plain = layer.to_linear()
    assert type(plain) is nn.Linear and plain.weight is not layer.weight
    assert torch.equal(layer.weight, w0) and not layer.merged
    x = torch.randn(4, 48)
    assert_close_to(plain(x), layer(x), 1e-5, "to_linear output")  # fp32 rounding order only


def test_fp32_adapters_on_a_bf16_base():
    base = nn.Linear(32, 16, dtype=torch.bfloat16)
    layer = LoRALinear.from_linear(base, r=4)
    layer.lora_A.data = layer.lora_A.data.float()
    layer.lora_B.data = torch.randn(16, 4)
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad.dtype == torch.float32


def test_extra_repr_and_bad_arguments():
    _, layer = lora_layer(r=4, alpha=8, dropout=0.05)
    text = repr(layer)
    for part in ("in_features=48", "out_features=40", "r=4", "alpha=8", "scaling=2", "dropout=0.05"):
        assert part in text
    with pytest.raises(ValueError, match="r \\(the LoRA rank\\) must be an integer >= 1, got 0"):
        LoRALinear(4, 4, r=0)
    with pytest.raises(ValueError, match="init must be one of"):
        LoRALinear(4, 4, r=2, init="pissa-typo")
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        LoRALinear.from_linear(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="dropout must be a probability"):
        LoRALinear(4, 4, dropout=1.5)


def test_from_linear_with_use_dora_builds_a_dora_layer_equal_to_its_base():
    from fastlora import DoRALinear

    base = nn.Linear(24, 12)
    layer = LoRALinear.from_linear(base, r=4, use_dora=True)
    assert type(layer) is DoRALinear and layer.weight is base.weight
    x = torch.randn(5, 24)
    # B = 0 and m = ||W||_row at init: g = 1 up to the norm's rounding (fp32 ulp scale).
    assert_close_to(layer(x), base(x), 1e-5, "fresh DoRA layer")


def test_constructor_with_use_dora_builds_a_dora_layer():
    from fastlora import DoRALinear

    layer = LoRALinear(24, 12, r=4, use_dora=True)
    assert type(layer) is DoRALinear and layer.lora_magnitude.shape == (12,)
    x = torch.randn(3, 24)
    # Fresh: B = 0 and m = ||W||_row, so g = 1 up to the norm's fp32 rounding.
    assert_close_to(layer(x), F.linear(x, layer.weight, layer.bias), 1e-5, "fresh DoRA layer")
    assert type(LoRALinear(24, 12, r=4)) is LoRALinear


def test_a_parametrized_weight_is_read_through_its_parametrization():
    """LoRALinear.forward reads its parameters from ``_parameters`` (host time); a weight
    that ``torch.nn.utils.parametrize`` moved out of it must still be the one used."""
    from torch.nn.utils import parametrize

    from fastlora.reference import lora_linear_float64

    class Doubled(nn.Module):
        def forward(self, w):
            return 2 * w

    torch.manual_seed(0)
    layer = LoRALinear(8, 6, r=2, alpha=4.0)
    nn.init.normal_(layer.lora_B)
    parametrize.register_parametrization(layer, "weight", Doubled())
    x = torch.randn(3, 8)
    want = lora_linear_float64(x, layer.weight, layer.lora_A, layer.lora_B, layer.scaling, layer.bias)
    # the float64 oracle: rounding of three fp32 GEMMs at K=8, far below 1e-5 of values ~1
    assert not torch.allclose(layer.parametrizations.weight.original, layer.weight)  # 2 W, not W
    assert_close_to(layer(x), want, 1e-5, "parametrized weight")


def test_a_2d_input_adds_one_autograd_node():
    """x [M, K] goes to the op as it is (no view of it recorded): the op's node
    leads straight to x's AccumulateGrad. With leading dims the output is a view of the op's."""
    layer = LoRALinear(8, 6, r=2)
    x = torch.randn(3, 8, requires_grad=True)
    node = layer(x).grad_fn
    assert type(node).__name__ == "LoRALinearFunctionBackward"
    assert type(node.next_functions[0][0]).__name__ == "AccumulateGrad"
    node3 = layer(x.detach().reshape(1, 3, 8).requires_grad_(True)).grad_fn
    assert type(node3.next_functions[0][0]).__name__ == "LoRALinearFunctionBackward"
