"""Model surgery: apply_lora / merge_lora / count_parameters, with PEFT's
module selection and a short training run as oracles."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastlora
from fastlora import LoRAConfig, LoRALinear, apply_lora, count_parameters, merge_lora
from fastlora.model import lora_layers

from _oracles import assert_close_to

peft = pytest.importorskip("peft", reason="PEFT parity tests need peft (pip install 'fastlora[test]')")


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(16, 16)
        self.v_proj = nn.Linear(16, 16, bias=False)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.norm = nn.LayerNorm(16)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])
        self.lm_head = nn.Linear(16, 50, bias=False)

    def forward(self, x):
        for block in self.layers:
            x = block.norm(x + block.q_proj(x) + block.v_proj(x) + block.mlp(x))
        return self.lm_head(x)


def test_seed_sample_parameter_counts():
    model = apply_lora(mlp(), r=8, alpha=8.0)
    per_layer = [m.lora_A.numel() + m.lora_B.numel() for m in lora_layers(model).values()]
    assert per_layer == [8 * (128 + 256), 8 * (256 + 256), 8 * (256 + 10)] == [3072, 4096, 2128]
    trainable, total = count_parameters(model)
    base = 128 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10
    assert (trainable, total) == (9296, base + 9296) and base == 101386
    merged = merge_lora(model)
    assert not lora_layers(merged) and count_parameters(merged)[1] == 101386


def peft_selection(model, **config) -> set[str]:
    wrapped = peft.get_peft_model(model, peft.LoraConfig(**config))
    prefix = "base_model.model."
    return {n[len(prefix):] for n, m in wrapped.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


@pytest.mark.parametrize(
    "target_modules",
    [["q_proj", "v_proj"], ["mlp.0"], r".*\.(q_proj|mlp\.2)", ["layers.1.q_proj"]],
    ids=["suffixes", "dotted-suffix", "regex", "full-name"],
)
def test_target_modules_select_what_peft_selects(target_modules):
    ours = set(lora_layers(apply_lora(Tiny(), target_modules=target_modules)))
    assert ours == peft_selection(Tiny(), target_modules=target_modules)


def test_all_linear_skips_the_output_layer_as_peft_does():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    ours = set(lora_layers(apply_lora(transformers.LlamaForCausalLM(config), target_modules="all-linear")))
    torch.manual_seed(0)
    theirs = peft_selection(transformers.LlamaForCausalLM(config), target_modules="all-linear")
    assert ours == theirs and "lm_head" not in ours and len(ours) == 14


def test_rank_and_alpha_patterns_follow_peft():
    patterns = dict(rank_pattern={"q_proj": 4, r"layers\.1\.mlp\.0": 2}, alpha_pattern={"v_proj": 32})
    model = apply_lora(Tiny(), LoRAConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj", "mlp.0"], **patterns))
    wrapped = peft.get_peft_model(
        Tiny(), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "mlp.0"], **patterns)
    )
    for name, layer in lora_layers(model).items():
        theirs = wrapped.base_model.model.get_submodule(name)
        assert layer.r == theirs.r["default"], name
        assert layer.scaling == pytest.approx(theirs.scaling["default"]), name


def test_freezing_and_modules_to_save():
    model = apply_lora(Tiny(), target_modules=["q_proj"], modules_to_save=["lm_head"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        "layers.0.q_proj.lora_A", "layers.0.q_proj.lora_B", "layers.1.q_proj.lora_A", "layers.1.q_proj.lora_B",
        "lm_head.weight",
    }


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"matched no module that LoRA can adapt; the model's adaptable modules are \['0', '2', '4'\]"):
        apply_lora(mlp(), target_modules=["q_proj"])
    with pytest.raises(TypeError, match="unknown LoRAConfig fields: \\['rank'\\]"):
        apply_lora(mlp(), rank=4)
    with pytest.raises(ValueError, match="not a valid regular expression"):
        apply_lora(mlp(), target_modules="(unclosed")
    with pytest.raises(ValueError, match="modules_to_save entry 'head'"):
        apply_lora(mlp(), modules_to_save=["head"])
    with pytest.raises(TypeError, match="use_dora must be True or False"):
        LoRAConfig(use_dora="yes")


def test_short_training_run_matches_peft_loss_curve():
    """Tier 5: identical weights and data, Adam for 8 steps: the loss curves agree."""
    torch.manual_seed(1)
    ours = apply_lora(mlp(), r=4, alpha=8.0)
    theirs = peft.get_peft_model(mlp(), peft.LoraConfig(r=4, lora_alpha=8.0, target_modules=["0", "2", "4"]))
    with torch.no_grad():
        for name, layer in lora_layers(ours).items():
            twin = theirs.base_model.model.get_submodule(name)
            layer.lora_A.copy_(twin.lora_A["default"].weight)
            layer.lora_B.copy_(twin.lora_B["default"].weight)
    x, labels = torch.randn(64, 128), torch.randint(0, 10, (64,))
    curves = []
    for model in (ours, theirs):
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for _ in range(8):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), labels)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves.append(torch.tensor(losses))
    assert curves[0][-1] < 0.9 * curves[0][0]  # it actually trains
    # fp32 rounding differences compound through 8 Adam steps: 1e-4 relative.
    assert_close_to(curves[0], curves[1], 1e-4 * curves[1].abs().max().item(), "loss curve")


def test_merge_lora_keeps_outputs():
    model = apply_lora(mlp(), r=8)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0, 0.1)
    x = torch.randn(16, 128)
    y = model(x)
    merged = merge_lora(model)
    assert all(type(m) is nn.Linear for m in merged if isinstance(m, nn.Linear))
    # fp32, merged weights rounded once: a few ulp through three layers.
    assert_close_to(merged(x), y, 1e-5 * y.abs().max().item(), "merged model")
    assert isinstance(fastlora.merge_lora(LoRALinear(4, 4, r=2)), nn.Linear)
