"""PEFT's configs and defaults: apply_lora takes a peft.LoraConfig and PEFT's
field names, and ``target_modules=None`` / ``"all-linear"`` select what PEFT
selects (PEFT's own get_peft_model is the oracle)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastlora
from fastlora.model import LoRAConfig, lora_layers

transformers = pytest.importorskip("transformers", reason="needs transformers (pip install -e '.[test]')")
peft = pytest.importorskip("peft", reason="needs peft (pip install -e '.[test]')")


def tiny_llama():
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attn_implementation="eager",
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def peft_selection(model, config):
    pm = peft.get_peft_model(model, config)
    return {n.removeprefix("base_model.model.") for n, m in pm.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(target_modules="all-linear"), dict(target_modules=["q_proj", "down_proj"], r=4, lora_alpha=32)],
    ids=["None", "all-linear", "list"],
)
def test_a_peft_config_selects_and_scales_as_peft_does(kwargs):
    config = peft.LoraConfig(**kwargs)
    want = peft_selection(tiny_llama(), config)
    ours = fastlora.apply_lora(tiny_llama(), config)
    layers = lora_layers(ours)
    assert set(layers) == want
    assert all(m.r == config.r and m.scaling == config.lora_alpha / config.r for m in layers.values())
    if not kwargs:  # PEFT's Llama default
        assert {n.split(".")[-1] for n in layers} == {"q_proj", "v_proj"}


def test_peft_field_names_are_accepted_as_overrides():
    model = fastlora.apply_lora(
        tiny_llama(), target_modules=["q_proj"], r=4, lora_alpha=16, lora_dropout=0.1, init_lora_weights="gaussian"
    )
    layer = next(iter(lora_layers(model).values()))
    assert (layer.r, layer.alpha, layer.dropout) == (4, 16.0, 0.1)
    with pytest.raises(TypeError, match="both lora_alpha and alpha"):
        fastlora.apply_lora(tiny_llama(), lora_alpha=16, alpha=8)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(bias="all"), r"settings fastlora does not implement: \{'bias': 'all'\}"),
        (dict(layers_to_transform=[0]), "layers_to_transform"),
        (dict(init_lora_weights=False), "init_lora_weights=False is not supported"),
    ],
)
def test_peft_settings_fastlora_does_not_implement_are_refused(kwargs, match):
    model = tiny_llama()
    with pytest.raises(ValueError, match=match):
        fastlora.apply_lora(model, peft.LoraConfig(target_modules=["q_proj"], **kwargs))
    assert not lora_layers(model)


def test_target_none_on_an_unknown_architecture_is_an_error_as_in_peft():
    model = tiny_llama()
    model.config.model_type = "not_a_model"
    with pytest.raises(ValueError, match="no default target modules for model_type 'not_a_model'"):
        fastlora.apply_lora(model)
    # a plain torch module has no architecture: every linear layer, fastlora's documented rule
    plain = fastlora.apply_lora(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))
    assert set(lora_layers(plain)) == {"0", "1"}


def test_from_peft_config_round_trips_the_fields():
    config = peft.LoraConfig(
        r=6, lora_alpha=12, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], use_rslora=True,
        rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 3}, modules_to_save=["lm_head"],
    )
    ours = LoRAConfig.from_peft(config)
    assert (ours.r, ours.alpha, ours.dropout, ours.use_rslora) == (6, 12, 0.05, True)
    assert sorted(ours.target_modules) == ["q_proj", "v_proj"]
    assert ours.rank_pattern == {"q_proj": 2} and ours.alpha_pattern == {"v_proj": 3}
    assert ours.modules_to_save == ["lm_head"]
