"""LoRAConv1D: LoRA on transformers' Conv1D (weight [in, out]) against PEFT's
fan_in_fan_out Linear, on the fused LoRA op with the weight's transposed view."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastlora
from fastlora import LoRAConv1D, QLoRALinear
from fastlora.layers import conv1d as conv1d_module

from _layer_twins import assert_matches_peft, count_matches_peft, peft_twin, randomize_adapters
from _oracles import assert_close_to

peft = pytest.importorskip("peft", reason="PEFT parity tests need peft (pip install 'fastlora[test]')")
pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402


def base_net(nx=24, nf=40, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    net = nn.Sequential(Conv1D(nf, nx)).to(dtype)
    with torch.no_grad():
        net[0].bias.normal_()
    return net


def adapted(net, **kwargs):
    kwargs.setdefault("r", 4)
    kwargs.setdefault("alpha", 8.0)
    model = fastlora.apply_lora(copy.deepcopy(net), target_modules=["0"], **kwargs)
    randomize_adapters(model)
    return model


def test_wraps_shares_and_freezes_the_base():
    net = base_net()
    conv = net[0]
    layer = LoRAConv1D.from_conv1d(conv, r=4, alpha=8)
    assert layer.weight is conv.weight and layer.bias is conv.bias
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert (layer.in_features, layer.out_features, layer.nx, layer.nf) == (24, 40, 24, 40)
    assert layer.lora_A.shape == (4, 24) and layer.lora_B.shape == (40, 4)
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}
    assert {k: tuple(v.shape) for k, v in layer.peft_tensors().items()} == {"lora_A.weight": (4, 24), "lora_B.weight": (40, 4)}
    assert layer.peft_tensors()["lora_A.weight"] is layer.lora_A
    # A fresh layer (B = 0, PEFT's init) computes its base exactly.
    x = torch.randn(3, 5, 24)
    assert_close_to(layer(x), conv(x), 0.0, "fresh layer")
    assert layer.scaling == 2.0 and "nf=40, nx=24" in repr(layer)


def test_forward_uses_a_transposed_view_not_a_copy(monkeypatch):
    layer = adapted(base_net())[0]
    seen = []
    real = conv1d_module.lora_linear

    def spy(x, weight, *args, **kwargs):
        seen.append(weight)
        return real(x, weight, *args, **kwargs)

    monkeypatch.setattr(conv1d_module, "lora_linear", spy)
    layer(torch.randn(2, 24))
    (w,) = seen
    assert w.shape == (40, 24) and not w.is_contiguous()
    assert w.data_ptr() == layer.weight.data_ptr() and w.stride() == (1, 40)


@pytest.mark.parametrize("r, rslora, lead", [(1, False, ()), (4, True, (2,)), (16, False, (3, 2))])
def test_matches_peft_outputs_and_gradients(r, rslora, lead):
    net = base_net(nx=24, nf=40)
    ours = adapted(net, r=r, alpha=8.0, use_rslora=rslora)
    x = torch.randn(*lead, 7, 24)
    compared = assert_matches_peft(net, ours, x, r=r, lora_alpha=8, use_rslora=rslora, target_modules=["0"])
    assert compared == ["y", "x", "0.lora_A", "0.lora_B"]


@pytest.mark.interpreter
def test_triton_backend_takes_the_strided_weight():
    """Under the interpreter (conftest forces the Triton backend): small ragged shapes,
    the strided weight view read in place, every gradient within the 2x rule."""
    net = base_net(nx=20, nf=36)
    ours = adapted(net, r=4)
    x = torch.randn(5, 20)
    assert fastlora.get_backend() == "triton"
    assert_matches_peft(net, ours, x, r=4, lora_alpha=8, target_modules=["0"])


def test_dropout_is_on_the_lora_branch_in_training_only():
    net = base_net()
    ours = adapted(net, dropout=0.5)
    layer = ours[0]
    x = torch.randn(64, 24)
    layer.eval()
    y_eval = layer(x)
    layer.train()
    torch.manual_seed(3)
    y_train = layer(x)
    base = net[0](x)
    assert not torch.allclose(y_train, y_eval)
    # The base path is untouched: (y - base) is the LoRA branch, zero where dropout removed every input.
    delta_eval = (y_eval - base).detach()
    assert delta_eval.abs().max() > 0.1
    # E[dropout(x)] = x: averaged over many seeds the branch converges to eval's.
    torch.manual_seed(4)
    mean = torch.stack([layer(x).detach() - base.detach() for _ in range(200)]).mean(0)
    assert (mean - delta_eval).abs().max() < 0.25 * delta_eval.abs().max()


def test_merge_unmerge_and_to_base_agree_with_peft():
    net = base_net()
    ours = adapted(net)
    layer = ours[0]
    twin = peft_twin(net, ours, r=4, lora_alpha=8, target_modules=["0"])
    x = torch.randn(6, 24)
    y = layer(x).detach()
    w0 = layer.weight.detach().clone()
    plain = layer.to_base()
    assert type(plain) is Conv1D and plain.weight is not layer.weight and torch.equal(layer.weight, w0)
    assert not plain.weight.requires_grad and not plain.bias.requires_grad
    assert plain.weight.shape == (24, 40) and (plain.nf, plain.nx) == (40, 24)
    twin.base_model.model[0].merge()
    peft_merged = twin.base_model.model[0].base_layer.weight.detach()
    eps, scale = torch.finfo(torch.float32).eps, peft_merged.abs().max().item()
    # Both add (s B A)^T to the [in, out] weight and round once: within 1 ulp each.
    assert_close_to(plain.weight, peft_merged, 2 * eps * scale, "to_base weight vs PEFT's merge")
    layer.merge()
    assert layer.merged
    assert_close_to(layer.weight, peft_merged, 2 * eps * scale, "merged weight vs PEFT's merge")
    tol = 8 * eps * y.abs().max().item()  # same sum, another rounding order
    assert_close_to(layer(x), y, tol, "merged output")
    assert_close_to(plain(x), y, tol, "to_base output")
    merged_scale = layer.weight.abs().max().item()
    layer.unmerge()
    assert not layer.merged
    # W + d - d: two roundings at the merged weight's magnitude, <= 1 ulp of it.
    assert_close_to(layer.weight, w0, eps * merged_scale, "unmerged weight")


def test_merge_lora_returns_a_conv1d_and_count_parameters_matches_peft():
    net = base_net()
    ours = adapted(net)
    twin = peft_twin(net, ours, r=4, lora_alpha=8, target_modules=["0"])
    count_matches_peft(ours, twin)
    x = torch.randn(4, 24)
    y = ours(x).detach()
    fastlora.merge_lora(ours)
    assert type(ours[0]) is Conv1D
    assert_close_to(ours(x), y, 8 * torch.finfo(torch.float32).eps * y.abs().max().item(), "merged model")


def test_pissa_matches_peft_and_rewrites_the_shared_weight():
    net = base_net(nx=16, nf=24)
    ours = fastlora.apply_lora(copy.deepcopy(net), r=4, alpha=8, target_modules=["0"], init="pissa")
    twin = peft.get_peft_model(
        copy.deepcopy(net), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights="pissa")
    )
    layer, theirs = ours[0], twin.base_model.model[0]
    # Same float32 factorisation of W^T and residual as PEFT: bit-identical.
    assert torch.equal(layer.lora_A, theirs.lora_A["default"].weight)
    assert torch.equal(layer.lora_B, theirs.lora_B["default"].weight)
    assert torch.equal(layer.weight, theirs.base_layer.weight)
    x = torch.randn(3, 16)
    assert_close_to(layer(x), net[0](x), 1e-5, "factorised layer vs the original")  # residual + B A, fp32


def test_olora_factorises_the_transposed_weight():
    """PEFT 0.21's OLoRA ignores fan_in_fan_out (it factorises the [in, out] weight,
    giving lora_B [in, r]: its forward then fails for in != out). Ours is OLoRA of
    the layer's [out, in] map: exactly LoRALinear's on the equivalent nn.Linear."""
    net = base_net(nx=16, nf=24)
    ours = fastlora.apply_lora(copy.deepcopy(net), r=4, alpha=8, target_modules=["0"], init="olora")
    linear = nn.Linear(16, 24)
    with torch.no_grad():
        linear.weight.copy_(net[0].weight.t())
        linear.bias.copy_(net[0].bias)
    expected = fastlora.LoRALinear.from_linear(linear, r=4, alpha=8, init="olora")
    layer = ours[0]
    assert torch.equal(layer.lora_A, expected.lora_A) and torch.equal(layer.lora_B, expected.lora_B)
    assert torch.equal(layer.weight, expected.weight.t())
    x = torch.randn(3, 16)
    assert_close_to(layer(x), net[0](x), 1e-5, "factorised layer vs the original")


def test_quantize_builds_a_qlora_layer_on_the_transposed_weight():
    net = base_net(nx=64, nf=32)
    ours = fastlora.apply_lora(copy.deepcopy(net), r=4, target_modules=["0"], quantize="nf4")
    layer = ours[0]
    assert isinstance(layer, QLoRALinear) and (layer.in_features, layer.out_features) == (64, 32)
    linear = nn.Linear(64, 32)
    with torch.no_grad():
        linear.weight.copy_(net[0].weight.t())
        linear.bias.copy_(net[0].bias)
    expected = QLoRALinear.from_linear(linear, r=4)
    # The 4-bit codes of W^T, exactly as for the equivalent nn.Linear.
    assert torch.equal(layer.weight, expected.weight) and torch.equal(layer.weight_absmax, expected.weight_absmax)
    assert layer.bias is ours[0].bias and not layer.bias.requires_grad
    with torch.no_grad():
        layer.lora_B.normal_()
        expected.lora_A.copy_(layer.lora_A)
        expected.lora_B.copy_(layer.lora_B)
    x = torch.randn(5, 64)
    assert torch.equal(layer(x), expected(x))


def test_refusals_name_the_module():
    net = base_net()
    with pytest.raises(NotImplementedError, match=r"use_dora=True.*'0' is a Conv1D"):
        fastlora.apply_lora(copy.deepcopy(net), target_modules=["0"], use_dora=True)

    class Scaled(Conv1D):
        def forward(self, x):
            return 2 * super().forward(x)

    with pytest.raises(TypeError, match=r"Scaled overrides transformers.pytorch_utils.Conv1D.forward"):
        fastlora.apply_lora(nn.Sequential(Scaled(4, 3)), target_modules=["0"])
    with pytest.raises(TypeError, match="conv1d must be a transformers Conv1D"):
        LoRAConv1D.from_conv1d(nn.Linear(3, 4))
