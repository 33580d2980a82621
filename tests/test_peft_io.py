"""PEFT adapter files, both ways, with PEFT itself as the oracle."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from torch import nn

from fastlora import LoRALinear, apply_lora, load_adapter, save_adapter
from fastlora.model import lora_layers
from fastlora.peft_io import AdapterFormatError

from _oracles import assert_close_to

peft = pytest.importorskip("peft", reason="adapter-format tests need peft (pip install 'fastlora[test]')")
safetensors_torch = pytest.importorskip("safetensors.torch")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 32))
        self.q_proj = nn.Linear(32, 32, bias=False)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        return self.head(torch.relu(self.q_proj(self.encoder(x))))


def base_net() -> Net:
    torch.manual_seed(0)
    return Net()


def randomize_lora(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0, 0.3)


# fp32 forward through three small layers, same math in a different op order: 1e-5.
TOL = 1e-5


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(r=4, alpha=8.0),
        dict(r=8, alpha=16.0, use_rslora=True, dropout=0.1, target_modules=["q_proj", "encoder.2"]),
        dict(r=4, alpha=8.0, rank_pattern={"q_proj": 2}, alpha_pattern={"head": 3.0}),
    ],
    ids=["plain", "rslora-suffixes", "patterns"],
)
def test_saved_adapter_loads_in_peft_with_the_same_outputs(tmp_path, kwargs):
    model = apply_lora(base_net(), **kwargs)
    randomize_lora(model)
    model.eval()
    save_adapter(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    theirs = peft.PeftModel.from_pretrained(base_net(), str(tmp_path))
    theirs.eval()
    x = torch.randn(7, 24)
    assert_close_to(model(x), theirs(x), TOL, "PEFT-loaded output")
    wrapped = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert wrapped == set(lora_layers(model))


@pytest.mark.parametrize(
    "config",
    [
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "0"]),
        dict(r=8, lora_alpha=4, use_rslora=True, target_modules=r"encoder\.[02]"),
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "2", "0"], rank_pattern={"q_proj": 2}, alpha_pattern={"encoder.0": 1}),
        dict(r=2, lora_alpha=2, target_modules=["q_proj"], modules_to_save=["head"]),
    ],
    ids=["suffixes", "rslora-regex", "patterns", "modules_to_save"],
)
def test_peft_written_adapter_loads_into_a_plain_model(tmp_path, config):
    theirs = peft.get_peft_model(base_net(), peft.LoraConfig(init_lora_weights="gaussian", **config))
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.normal_(0, 0.3)
    theirs.save_pretrained(str(tmp_path))
    theirs.eval()
    ours = load_adapter(base_net(), tmp_path)
    ours.eval()
    x = torch.randn(5, 24)
    assert_close_to(ours(x), theirs(x), TOL, "loaded output")
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    expected = {f"{n}.{w}" for n in lora_layers(ours) for w in ("lora_A", "lora_B")}
    if config.get("modules_to_save"):
        expected |= {"head.weight", "head.bias"}
    assert trainable == expected


def test_round_trip_into_an_existing_lora_model(tmp_path):
    model = apply_lora(base_net(), r=4)
    randomize_lora(model)
    save_adapter(model, tmp_path)
    other = apply_lora(base_net(), r=4)
    load_adapter(other, tmp_path)
    for name, layer in lora_layers(model).items():
        twin = other.get_submodule(name)
        assert torch.equal(layer.lora_A, twin.lora_A) and torch.equal(layer.lora_B, twin.lora_B)


def corrupt(tmp_path, how):
    model = apply_lora(base_net(), r=4)
    randomize_lora(model)
    save_adapter(model, tmp_path)
    cfg_file, weights_file = tmp_path / "adapter_config.json", tmp_path / "adapter_model.safetensors"
    cfg = json.loads(cfg_file.read_text())
    tensors = safetensors_torch.load_file(str(weights_file))
    key = "base_model.model.q_proj.lora_A.weight"
    if how == "truncated":
        weights_file.write_bytes(weights_file.read_bytes()[:100])
    elif how == "not json":
        cfg_file.write_text("{not json")
    elif how == "unknown field":
        cfg["shiny_new_option"] = 3
    elif how == "dora":  # a DoRA config whose file lacks the magnitude vectors
        cfg["use_dora"] = True
    elif how == "fan_in_fan_out":
        cfg["fan_in_fan_out"] = True
    elif how == "missing key":
        del tensors[key]
    elif how == "wrong shape":
        tensors[key] = torch.zeros(3, 32)
    elif how == "int dtype":
        tensors[key] = torch.zeros(4, 32, dtype=torch.int32)
    elif how == "stray key":
        tensors["base_model.model.q_proj.something"] = torch.zeros(1)
    elif how == "pickle only":
        weights_file.unlink()
        (tmp_path / "adapter_model.bin").write_bytes(b"not loaded")
    if how in ("unknown field", "dora", "fan_in_fan_out"):
        cfg_file.write_text(json.dumps(cfg))
    if how in ("missing key", "wrong shape", "int dtype", "stray key"):
        safetensors_torch.save_file(tensors, str(weights_file))


BAD = {
    "truncated": "corrupt or truncated safetensors",
    "not json": "not valid JSON",
    "unknown field": r"unknown config fields \['shiny_new_option'\]",
    "dora": r"lora_A, lora_B and lora_magnitude_vector \(use_dora=true\) are required",
    "fan_in_fan_out": "unsupported settings {'fan_in_fan_out': True}",
    "missing key": "both lora_A and lora_B are required",
    "wrong shape": r"lora_A \(3, 32\) / lora_B \(32, 4\) do not fit the layer \(expected \(4, 32\)",
    "int dtype": "has dtype torch.int32; expected a floating-point dtype",
    "stray key": "unexpected keys",
    "pickle only": "safetensors adapters only, never pickles",
}


@pytest.mark.parametrize("how", list(BAD))
def test_bad_adapter_files_are_clear_errors_and_leave_the_model_unchanged(tmp_path, how):
    corrupt(tmp_path, how)
    target = apply_lora(base_net(), r=2, target_modules=["head"])
    before = copy.deepcopy(target.state_dict())
    types = [type(m) for m in target.modules()]
    with pytest.raises(AdapterFormatError, match=BAD[how]):
        load_adapter(target, tmp_path)
    after = target.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert types == [type(m) for m in target.modules()]
    assert isinstance(target.head, LoRALinear) and target.head.r == 2
