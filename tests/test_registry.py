"""The adapter registry: model surgery, target selection, merging and counting go
through one table of (config type, base module type) -> builder."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fastlora
from fastlora import registry
from fastlora.model import LoRAConfig


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_a_second_apply_keeps_the_first_adapters_trainable():
    model = fastlora.apply_lora(mlp(), r=2, target_modules=["0"])
    first = trainable(model)
    assert first == {"0.lora_A", "0.lora_B"}
    fastlora.apply_lora(model, r=4, target_modules=["2"])
    assert trainable(model) == first | {"2.lora_A", "2.lora_B"}
    assert model[2].r == 4 and model[0].r == 2


def test_an_unsupported_target_is_an_error_not_a_silent_skip():
    model = nn.ModuleDict({"norm": nn.LayerNorm(12), "proj": nn.Linear(12, 12)})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"cannot adapt: \[\('norm', 'LayerNorm'\)\].*torch.nn.modules.linear.Linear"):
        fastlora.apply_lora(model, target_modules=["norm", "proj"])
    assert type(model["proj"]) is nn.Linear  # nothing changed
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())
    # None selects only what LoRA can adapt (no error for the norm)
    fastlora.apply_lora(model)
    assert isinstance(model["proj"], fastlora.LoRALinear) and type(model["norm"]) is nn.LayerNorm


def test_none_adapts_linear_layers_only_and_named_embeddings_and_convs_too():
    def net():
        return nn.ModuleDict({"embed": nn.Embedding(10, 12), "conv": nn.Conv1d(12, 12, 1), "proj": nn.Linear(12, 12)})

    model = fastlora.apply_lora(net())
    assert set(registry.adapter_layers(model)) == {"proj"}
    model = fastlora.apply_lora(net(), target_modules=["embed", "conv", "proj"])
    assert set(registry.adapter_layers(model)) == {"embed", "conv", "proj"}


def test_a_peft_model_is_pointed_to_from_peft():
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(mlp(), peft.LoraConfig(r=2, target_modules=["0"]))
    with pytest.raises(TypeError, match=r"from_peft"):
        fastlora.apply_lora(pm)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("use_rslora", "false", "use_rslora must be True or False"),
        ("use_dora", 1, "use_dora must be True or False"),
        ("rank_pattern", {"0": 0}, r"rank_pattern\['0'\] must be an integer >= 1"),
        ("rank_pattern", {"0": True}, r"rank_pattern\['0'\] must be an integer >= 1"),
        ("alpha_pattern", {"0": math.nan}, r"alpha_pattern\['0'\] must be a finite number"),
        ("alpha_pattern", {"0": "16"}, r"alpha_pattern\['0'\] must be a finite number"),
        ("rank_pattern", [("0", 4)], "rank_pattern must be a dict"),
    ],
)
def test_config_values_are_checked_before_the_model_changes(field, value, match):
    model = mlp()
    with pytest.raises((ValueError, TypeError), match=match):
        fastlora.apply_lora(model, **{field: value})
    assert all(type(m) in (nn.Linear, nn.ReLU, nn.Sequential) for m in model.modules())


def test_merge_lora_merges_every_adapter_kind():
    model = fastlora.apply_vera(mlp(), r=4, target_modules=["0"])
    fastlora.apply_lora(model, r=2, target_modules=["2"])
    with torch.no_grad():
        model[0].vera_lambda_b.normal_()
        model[2].lora_B.normal_()
    x = torch.randn(5, 12)
    want = model(x)
    fastlora.merge_lora(model)
    assert all(type(model[i]) is nn.Linear for i in (0, 2, 4))
    torch.testing.assert_close(model(x), want, rtol=0, atol=1e-5)  # fp32 merge: one rounding per weight


class ScaledLinear(nn.Module):
    """A base module type fastlora does not know: y = scale * (x W^T + b)."""

    def __init__(self, k, n):
        super().__init__()
        self.inner = nn.Linear(k, n)
        self.scale = 2.0

    def forward(self, x):
        return self.scale * self.inner(x)


@pytest.fixture
def registered_scaled():
    """Register ScaledLinear for LoRA for one test, then restore the table."""
    kind = registry.kind_for(LoRAConfig)
    saved = (list(kind.builders), kind.layer_types)

    def build(module, name, config, shared):
        with torch.no_grad():
            linear = nn.Linear(module.inner.in_features, module.inner.out_features)
            linear.weight.copy_(module.inner.weight * module.scale)
            linear.bias.copy_(module.inner.bias * module.scale)
        return fastlora.LoRALinear.from_linear(linear, **config.layer_kwargs(name))

    registry.register_layer(LoRAConfig, ScaledLinear, build)
    yield
    kind.builders[:], kind.layer_types = saved


def test_a_new_layer_kind_is_one_registration(registered_scaled):
    torch.manual_seed(0)
    model = nn.Sequential(ScaledLinear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x = torch.randn(4, 6)
    want = model(x)
    fastlora.apply_lora(model, r=2, target_modules=["0"])
    assert isinstance(model[0], fastlora.LoRALinear)
    torch.testing.assert_close(model(x), want)  # B = 0: the base computes (exactly 2x, a power of two)
    assert fastlora.count_parameters(model)[0] == 2 * (6 + 5)


def test_a_catastrophic_target_regex_is_refused_before_matching():
    with pytest.raises(ValueError, match=r"is refused"):
        fastlora.apply_lora(mlp(), target_modules=r"(\d+)+x")


def test_merge_in_place_and_unmerge_at_model_level_match_peft():
    peft = pytest.importorskip("peft")
    model = fastlora.apply_lora(mlp(), r=2)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in registry.adapter_layers(model).values():
            layer.lora_B.normal_(generator=g)
    theirs = peft.get_peft_model(mlp(), peft.LoraConfig(r=2, lora_alpha=8, target_modules=["0", "2", "4"]))
    with torch.no_grad():
        for name, layer in registry.adapter_layers(model).items():
            twin = theirs.base_model.model.get_submodule(name)
            twin.lora_A["default"].weight.copy_(layer.lora_A)
            twin.lora_B["default"].weight.copy_(layer.lora_B)
    x = torch.randn(4, 12)
    before = model(x)
    fastlora.merge_lora(model, unload=False)
    theirs.merge_adapter()
    assert all(m.merged for m in registry.adapter_layers(model).values())
    for name, layer in registry.adapter_layers(model).items():
        # both merge in fp32 from the same factors: one rounding apart at most
        torch.testing.assert_close(layer.weight, theirs.base_model.model.get_submodule(name).base_layer.weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-5)
    fastlora.unmerge_lora(model)
    assert not any(m.merged for m in registry.adapter_layers(model).values())
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-5)  # unmerge: exact up to fp32 rounding


def test_merge_in_place_refuses_4bit_layers_before_changing_anything():
    model = fastlora.apply_lora(mlp(), r=2, quantize="nf4", target_modules=["0"])
    fastlora.apply_lora(model, r=2, target_modules=["2"])
    with pytest.raises(ValueError, match=r"merge_lora\(unload=False\): \['0'\] hold 4-bit weights"):
        fastlora.merge_lora(model, unload=False)
    assert not model[2].merged
