"""LoRAConv1d / LoRAConv2d / LoRAConv3d against PEFT's lora.Conv1d/2d/3d."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastlora
from fastlora import LoRAConv1d, LoRAConv2d, LoRAConv3d

from _layer_twins import assert_matches_peft, count_matches_peft, peft_twin, randomize_adapters, run
from _oracles import assert_close_to, tolerance_2x

peft = pytest.importorskip("peft", reason="PEFT parity tests need peft (pip install 'fastlora[test]')")

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
LAYER = {1: LoRAConv1d, 2: LoRAConv2d, 3: LoRAConv3d}
SPATIAL = {1: (11,), 2: (7, 6), 3: (5, 4, 3)}


def base_net(nd=2, cin=6, cout=8, k=3, seed=0, **kwargs):
    torch.manual_seed(seed)
    return nn.Sequential(CONV[nd](cin, cout, k, **kwargs))


def adapted(net, **kwargs):
    kwargs.setdefault("r", 4)
    kwargs.setdefault("alpha", 8.0)
    model = fastlora.apply_lora(copy.deepcopy(net), target_modules=["0"], **kwargs)
    randomize_adapters(model)
    return model


def inputs(nd=2, cin=6, batch=2, seed=1):
    return torch.randn(batch, cin, *SPATIAL[nd], generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_wraps_shares_freezes_and_initialises_as_peft(nd):
    conv = CONV[nd](6, 8, 3, padding=1)
    layer = LAYER[nd].from_conv(conv, r=4, alpha=8)
    assert layer.weight is conv.weight and layer.bias is conv.bias
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_A.shape == (4, 6, *(3,) * nd) and layer.lora_B.shape == (8, 4, *(1,) * nd)
    assert (layer.in_features, layer.out_features) == (6, 8)
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}
    assert {k: tuple(v.shape) for k, v in layer.peft_tensors().items()} == {
        "lora_A.weight": (4, 6, *(3,) * nd), "lora_B.weight": (8, 4, *(1,) * nd)
    }  # fmt: skip
    assert torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))
    bound = (6 * 3**nd) ** -0.5  # kaiming_uniform(a=sqrt(5)) over fan_in = in * prod(kernel)
    assert bound * 0.8 < layer.lora_A.abs().max() <= bound
    x = inputs(nd)
    assert_close_to(layer(x), conv(x), 0.0, "fresh layer")
    gauss = LAYER[nd].from_conv(CONV[nd](64, 8, 3), r=16, init="gaussian")
    assert abs(gauss.lora_A.std().item() - 1 / 16) < 0.1 / 16


CASES = [
    (1, dict(k=3)),
    (1, dict(k=5, stride=2, padding=2, bias=False)),
    (2, dict(k=3, padding=1)),
    (2, dict(k=(3, 2), stride=(2, 1), padding="valid")),
    (2, dict(k=1)),
    (2, dict(k=3, padding="same")),
    (3, dict(k=2, stride=1, padding=1)),
    (2, dict(cout=8, k=3, groups=2)),
]


@pytest.mark.parametrize("nd, options", CASES, ids=[f"{nd}d-{'-'.join(map(str, o.values()))}" for nd, o in CASES])
@pytest.mark.parametrize("rslora", [False, True])
def test_matches_peft_outputs_and_gradients(nd, options, rslora):
    options = dict(options)
    net = base_net(nd, **options)
    ours = adapted(net, use_rslora=rslora)
    compared = assert_matches_peft(net, ours, inputs(nd), r=4, lora_alpha=8, use_rslora=rslora, target_modules=["0"])
    assert compared == ["y", "x", "0.lora_A", "0.lora_B"]


def test_dropout_is_peft_s_nn_dropout_on_the_input():
    """Same torch RNG stream as PEFT's nn.Dropout (called once, on the input, after
    the base convolution): identical masks, so training-mode outputs agree too."""
    net = base_net(2, padding=1)
    ours = adapted(net, dropout=0.3)
    twin = peft_twin(net, ours, r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["0"])
    ours.train()
    twin.train()
    x = inputs(2)
    torch.manual_seed(7)
    mine = run(ours, x)
    torch.manual_seed(7)
    theirs = run(twin, x)
    for what, key in (("y", "y"), ("x", "x"), ("0.lora_A", "base_model.model.0.lora_A.default.weight")):
        assert_close_to(mine[what], theirs[key], 1e-5, what)  # the same fp32 ops in the same order
    ours.eval()
    y_eval = ours(x)
    assert not torch.allclose(mine["y"], y_eval)


def test_dilation_uses_the_base_dilation_in_a():
    """PEFT 0.21 builds A without the base's dilation, so its forward fails on a
    dilated convolution; here A takes it, and the merged kernel computes the same."""
    net = base_net(1, k=3, dilation=2, padding=2)
    ours = adapted(net)
    x = inputs(1)
    twin = peft_twin(net, ours, r=4, lora_alpha=8, target_modules=["0"])
    with pytest.raises(RuntimeError):
        twin(x)
    layer = ours[0]
    y = layer(x)
    x64 = x.double()
    a, b = layer.lora_A.double(), layer.lora_B.double()
    h = F.conv1d(x64, a, None, 1, 2, 2)
    y64 = F.conv1d(x64, layer.weight.double(), layer.bias.double(), 1, 2, 2) + layer.scaling * F.conv1d(h, b)
    assert_close_to(y, y64, 1e-5, "dilated output vs float64")  # fp32 sums of <= 20 terms of size ~3
    assert_close_to(layer.to_base()(x), y64, 1e-5, "dilated to_base vs float64")


@pytest.mark.parametrize("nd, options", [(1, dict(k=3)), (2, dict(k=3, padding=1)), (2, dict(k=1)), (3, dict(k=2))])
def test_merge_unmerge_and_to_base_agree_with_peft(nd, options):
    net = base_net(nd, **options)
    ours = adapted(net)
    layer = ours[0]
    twin = peft_twin(net, ours, r=4, lora_alpha=8, target_modules=["0"])
    twin64 = peft_twin(net, ours, torch.float64, r=4, lora_alpha=8, target_modules=["0"])
    x = inputs(nd)
    y = layer(x).detach()
    w0 = layer.weight.detach().clone()
    plain = layer.to_base()
    assert type(plain) is CONV[nd] and plain.weight is not layer.weight and torch.equal(layer.weight, w0)
    assert (plain.kernel_size, plain.stride, plain.padding) == (layer.kernel_size, layer.stride, layer.padding)
    for t in (twin, twin64):
        t.base_model.model[0].merge()
    peft32 = twin.base_model.model[0].base_layer.weight.detach()
    peft64 = twin64.base_model.model[0].base_layer.weight.detach()
    tol = tolerance_2x(peft32, peft64, torch.float32)
    assert_close_to(plain.weight, peft64, tol, "to_base kernel vs PEFT's merge")
    layer.merge()
    assert layer.merged
    assert_close_to(layer.weight, peft64, tol, "merged kernel vs PEFT's merge")
    eps = torch.finfo(torch.float32).eps
    out_tol = 16 * eps * y.abs().max().item()  # same sums in another order
    assert_close_to(layer(x), y, out_tol, "merged output")
    assert_close_to(plain(x), y, out_tol, "to_base output")
    scale = layer.weight.abs().max().item()
    layer.unmerge()
    assert not layer.merged
    assert_close_to(layer.weight, w0, eps * scale, "unmerged kernel")  # W + d - d, <= 1 ulp of the merged kernel


def test_grouped_conv_refuses_merge_and_to_base_is_an_exact_ungrouped_conv():
    net = base_net(2, cin=6, cout=9, k=3, groups=3, padding=1)
    ours = adapted(net, r=6)
    layer = ours[0]
    assert layer.lora_B.shape == (9, 2, 1, 1)
    with pytest.raises(NotImplementedError, match="groups=3.*not block-diagonal"):
        layer.merge()
    assert not layer.merged
    x = inputs(2, cin=6)
    plain = layer.to_base()
    assert type(plain) is nn.Conv2d and plain.groups == 1 and plain.weight.shape == (9, 6, 3, 3)
    y = layer(x)
    assert_close_to(plain(x), y, 16 * torch.finfo(torch.float32).eps * y.abs().max().item(), "ungrouped to_base")
    with pytest.raises(ValueError, match=r"r=4 must be divisible by the convolution's groups=3"):
        fastlora.apply_lora(copy.deepcopy(net), r=4, target_modules=["0"])


def test_merge_lora_and_count_parameters_on_a_small_cnn():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 9, 5)
    )
    targets = ["0", "2", "5"]
    ours = fastlora.apply_lora(copy.deepcopy(net), r=4, alpha=8, target_modules=targets)
    randomize_adapters(ours)
    assert [type(ours[i]).__name__ for i in (0, 2, 5)] == ["LoRAConv2d", "LoRAConv2d", "LoRALinear"]
    twin = peft_twin(net, ours, r=4, lora_alpha=8, target_modules=targets)
    count_matches_peft(ours, twin)
    x = torch.randn(2, 3, 8, 8)
    assert_matches_peft(net, ours, x, r=4, lora_alpha=8, target_modules=targets)
    y = ours(x).detach()
    fastlora.merge_lora(ours)
    assert [type(m) for m in ours] == [type(m) for m in net]
    assert_close_to(ours(x), y, 1e-4, "merged CNN")  # fp32, 3 layers, outputs ~10: ~1e-6 relative


def test_refusals_name_the_module():
    net = base_net(2, padding=1, padding_mode="reflect")
    with pytest.raises(NotImplementedError, match="padding_mode='reflect' is not supported"):
        fastlora.apply_lora(copy.deepcopy(net), target_modules=["0"])
    net = base_net(2)
    with pytest.raises(NotImplementedError, match=r"quantize='nf4'.*'0' is a Conv2d"):
        fastlora.apply_lora(copy.deepcopy(net), target_modules=["0"], quantize="nf4")
    with pytest.raises(NotImplementedError, match=r"use_dora=True.*'0' is a Conv2d"):
        fastlora.apply_lora(copy.deepcopy(net), target_modules=["0"], use_dora=True)
    with pytest.raises(NotImplementedError, match=r"LoRAConv2d\(init='olora'\)"):
        fastlora.apply_lora(copy.deepcopy(net), target_modules=["0"], init="olora")
    with pytest.raises(TypeError, match="conv must be an nn.Conv1d"):
        LoRAConv1d.from_conv(nn.Conv2d(2, 2, 1))
    assert issubclass(LoRAConv3d, fastlora.layers.LoRAConvNd) and LAYER[2] is LoRAConv2d
