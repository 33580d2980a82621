"""VeRA and AdaLoRA adapters in PEFT 0.21's file format, both ways: our
save_adapter -> peft.PeftModel.from_pretrained, and PEFT's save_pretrained ->
our load_adapter, with the same outputs (PEFT is the oracle)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import fastlora
from fastlora.peft_io import AdapterFormatError

from _oracles import assert_close_to

peft = pytest.importorskip("peft", reason="needs peft (pip install -e '.[test]')")
TOL = 1e-5  # the same fp32 ops in a different order: a few ulps of outputs ~1


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))


def _randomize(model, names):
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(k in n for k in names):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("save_projection", [True, False])
def test_vera_files_both_ways(tmp_path, save_projection):
    ours = fastlora.apply_vera(net(), r=4, target_modules=["0", "2"], projection_prng_key=3, save_projection=save_projection)
    _randomize(ours, ["vera_lambda"])
    fastlora.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(net(), str(tmp_path / "ours")).eval()
    x = torch.randn(5, 12)
    with torch.no_grad():
        assert_close_to(theirs(x), ours.eval()(x), TOL, "PEFT loading our VeRA file")
    config = peft.VeraConfig(r=4, target_modules=["0", "2"], projection_prng_key=5, save_projection=save_projection)
    pm = peft.get_peft_model(net(), config)
    _randomize(pm, ["vera_lambda"])
    pm.save_pretrained(str(tmp_path / "theirs"))
    loaded = fastlora.load_adapter(net(), tmp_path / "theirs").eval()
    with torch.no_grad():
        assert_close_to(loaded(x), pm.eval()(x), TOL, "our load of PEFT's VeRA file")
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == {
        f"{i}.vera_lambda_{w}" for i in (0, 2) for w in "bd"
    }


def test_adalora_files_both_ways(tmp_path):
    config = fastlora.AdaLoRAConfig(init_r=6, target_r=2, total_step=20, alpha=8.0, target_modules=["0", "2", "4"])
    ours = fastlora.apply_adalora(net(), config)
    _randomize(ours, ["lora_"])
    fastlora.save_adapter(ours, tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (saved["peft_type"], saved["init_r"], saved["target_r"], saved["total_step"]) == ("ADALORA", 6, 2, 20)
    theirs = peft.PeftModel.from_pretrained(net(), str(tmp_path / "ours")).eval()
    x = torch.randn(5, 12)
    with torch.no_grad():
        assert_close_to(theirs(x), ours.eval()(x), TOL, "PEFT loading our AdaLoRA file")
    pm = peft.get_peft_model(net(), peft.AdaLoraConfig(init_r=6, target_r=2, total_step=20, target_modules=["0", "2"]))
    _randomize(pm, ["lora_"])
    pm.save_pretrained(str(tmp_path / "theirs"))
    loaded = fastlora.load_adapter(net(), tmp_path / "theirs").eval()
    with torch.no_grad():
        assert_close_to(loaded(x), pm.eval()(x), TOL, "our load of PEFT's AdaLoRA file")


def test_one_kind_per_file_and_pruned_adalora_checkpoints_are_refused(tmp_path):
    model = fastlora.apply_vera(net(), r=4, target_modules=["0"])
    fastlora.apply_lora(model, r=2, target_modules=["2"])
    with pytest.raises(ValueError, match=r"has \['lora', 'vera'\] adapter layers; a PEFT adapter file holds one kind"):
        fastlora.save_adapter(model, tmp_path / "mixed")
    ours = fastlora.apply_adalora(net(), init_r=4, target_r=2, total_step=10, target_modules=["0"])
    fastlora.save_adapter(ours, tmp_path / "ada")
    cfg_file = tmp_path / "ada" / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["rank_pattern"] = {"base_model.model.0.lora_E": [True, False, True, True]}
    cfg_file.write_text(json.dumps(cfg))
    target = net()
    with pytest.raises(AdapterFormatError, match="pruned AdaLoRA checkpoint"):
        fastlora.load_adapter(target, tmp_path / "ada")
    assert all(type(m) in (nn.Sequential, nn.Linear, nn.ReLU) for m in target.modules())
