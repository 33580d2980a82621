"""What users do next with a layer: copy it, pickle it, move it to meta and back,
load state into it, edit its weight, give it zero features. Every adapter
layer type either does what the plain torch module does or says why not."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import fastlora
from fastlora.quant import quantize_4bit

from _oracles import assert_close_to


def _layers():
    torch.manual_seed(0)
    linear = lambda: nn.Linear(16, 8)  # noqa: E731
    out = {
        "LoRALinear": fastlora.LoRALinear.from_linear(linear(), r=4),
        "DoRALinear": fastlora.DoRALinear.from_linear(linear(), r=4),
        "QLoRALinear": fastlora.QLoRALinear.from_linear(nn.Linear(64, 8), r=4),
        "QDoRALinear": fastlora.QDoRALinear.from_linear(nn.Linear(64, 8), r=4),
        "VeRALinear": fastlora.VeRALinear.from_linear(linear(), r=4),
        "AdaLoRALinear": fastlora.AdaLoRALinear.from_linear(linear(), init_r=4),
    }
    out["LoRAEmbedding"] = fastlora.LoRAEmbedding.from_embedding(nn.Embedding(10, 8), r=4)
    out["LoRAConv2d"] = fastlora.LoRAConv2d.from_conv(nn.Conv2d(3, 8, 3), r=4)
    return out


def _input(name):
    g = torch.Generator().manual_seed(1)
    if name == "LoRAEmbedding":
        return torch.randint(0, 10, (5,), generator=g)
    if name == "LoRAConv2d":
        return torch.randn(2, 3, 6, 6, generator=g)
    return torch.randn(5, 64 if name.startswith("Q") else 16, generator=g)


def _perturb(layer):
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p), alpha=0.3)


LAYERS = list(_layers())


@pytest.mark.parametrize("name", LAYERS)
def test_a_deep_copy_runs_its_own_weights(name):
    layer = _layers()[name].eval()
    _perturb(layer)
    x = _input(name)
    want = layer(x)
    twin = copy.deepcopy(layer)
    assert_close_to(twin(x), want, 0.0, "copy before any change")  # the same weights, the same ops
    _perturb(twin)
    assert_close_to(layer(x), want, 0.0, "the original after the copy was trained")
    assert not torch.equal(twin(x), want)


@pytest.mark.parametrize("name", LAYERS)
def test_torch_save_round_trips(name):
    layer = _layers()[name].eval()
    _perturb(layer)
    x = _input(name)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    back = torch.load(buffer, weights_only=False)  # the test's own object: pickling must work
    assert_close_to(back(x), layer(x), 0.0, "reloaded layer")


@pytest.mark.parametrize("name", [n for n in LAYERS if n not in ("QLoRALinear", "QDoRALinear")])
def test_meta_forward_propagates_shapes_as_torch_does(name):
    layer = _layers()[name]
    x = _input(name)
    want = layer(x).shape
    meta = layer.to("meta")
    y = meta(x.to("meta") if x.is_floating_point() else x.to("meta"))
    assert y.is_meta and y.shape == want


def test_zero_in_features_gives_the_bias_as_nn_linear_does():
    torch.manual_seed(0)
    base = nn.Linear(0, 4)
    with torch.no_grad():
        base.bias.normal_()
    layer = fastlora.LoRALinear.from_linear(base, r=2)
    x = torch.randn(3, 0, requires_grad=True)
    assert_close_to(layer(x), base(x), 0.0, "y")
    layer(x).sum().backward()
    assert x.grad.shape == (3, 0)


def test_qlora_state_loads_into_a_meta_layer_with_assign():
    torch.manual_seed(0)
    source = fastlora.QLoRALinear.from_linear(nn.Linear(64, 8), r=2)
    _perturb(source)
    target = fastlora.QLoRALinear.from_linear(nn.Linear(64, 8), r=2).to("meta")
    target.load_state_dict(source.state_dict(), assign=True)
    assert not any(t.is_meta for t in list(target.parameters()) + list(target.buffers()))
    x = torch.randn(3, 64)
    assert_close_to(target(x), source(x), 0.0, "meta layer after load_state_dict(assign=True)")


def test_qlora_strict_load_reports_stray_weight_keys():
    q = fastlora.QLoRALinear.from_linear(nn.Linear(64, 8), r=2)
    state = dict(q.state_dict())
    state["weight.bogus"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "weight.bogus"'):
        q.load_state_dict(state, strict=True)


def test_qlora_load_of_another_nested_blocksize_is_all_or_nothing():
    """The quant state of a weight double-quantized with another nested blocksize
    (different buffer sizes) loads whole; a state that fails validation leaves
    every buffer as it was (never half-written)."""
    torch.manual_seed(0)
    w = torch.randn(16, 4096)  # 1024 blocks of 64: 4 nested absmax values
    layer = fastlora.QLoRALinear(quantize_4bit(w), r=2)
    before = {n: b.clone() for n, b in layer.named_buffers()}
    other = fastlora.QLoRALinear(quantize_4bit(w * 2), r=2)
    state = dict(other.state_dict())
    bad = dict(state)
    bad["weight.nested_absmax"] = bad["weight.nested_absmax"][:1]  # does not cover the blocks
    with pytest.raises(RuntimeError, match="quant state is invalid"):
        layer.load_state_dict(bad)
    assert all(torch.equal(b, before[n]) for n, b in layer.named_buffers())
    layer.load_state_dict(state)
    x = torch.randn(3, 4096)
    assert_close_to(layer(x), other(x), 0.0, "after loading the other state")


def test_dora_sees_edits_made_through_weight_data():
    torch.manual_seed(0)
    layer = fastlora.DoRALinear.from_linear(nn.Linear(8, 4), r=2)
    _perturb(layer)
    x = torch.randn(3, 8)
    layer(x)  # any cached state from the old weight
    layer.weight.data.mul_(2.0)  # no version bump on `weight`
    want = fastlora.dora_linear(x, layer.weight, layer.lora_A, layer.lora_B, layer.lora_magnitude, layer.scaling, layer.bias)
    assert_close_to(layer(x), want, 0.0, "after editing weight.data")


def test_a_rejected_qlora_state_leaves_the_adapters_and_bias_unchanged():
    torch.manual_seed(0)
    layer = fastlora.QLoRALinear.from_linear(nn.Linear(64, 8), r=2)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    other = fastlora.QLoRALinear.from_linear(nn.Linear(64, 8), r=2)
    _perturb(other)
    state = dict(other.state_dict())
    state["weight.absmax"] = state["weight.absmax"][:-1]  # tampered: does not cover the blocks
    with pytest.raises(RuntimeError, match="quant state is invalid"):
        layer.load_state_dict(state)
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())
