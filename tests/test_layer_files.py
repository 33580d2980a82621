"""Adapter files for the non-Linear layer kinds, both ways with PEFT 0.21:
fastlora's save_adapter -> peft.PeftModel.from_pretrained, and PEFT's
save_pretrained -> fastlora's load_adapter, with identical outputs.
save_adapter / load_adapter are generic over each layer's ``peft_tensors()``
(keys such as ``lora_embedding_A`` and conv-shaped ``lora_A.weight``;
``fan_in_fan_out`` for Conv1D)."""

from __future__ import annotations


import pytest
import torch
from torch import nn

import fastlora
from fastlora import load_adapter, save_adapter
from fastlora.registry import adapter_layers

from _layer_twins import adapter_file_state, randomize_adapters
from _oracles import assert_close_to

peft = pytest.importorskip("peft", reason="PEFT parity tests need peft (pip install 'fastlora[test]')")
transformers = pytest.importorskip("transformers")


# fp32 forward through a few small layers, same math in a different op order.
TOL = 1e-4


def gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config).eval()


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(20, 3)
        self.conv1 = nn.Conv1d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(6 * 5 + 4 * 5 * 3, 4)

    def forward(self, ids):
        e = self.embed(ids)  # [B, 5, 3]
        a = self.conv1(e.transpose(1, 2)).flatten(1)  # channels = the 3 embedding dims, length 5
        b = self.conv2(e.unsqueeze(1)).flatten(1)  # one 5 x 3 "image"
        return self.head(torch.cat([a, b], 1))


def token_ids(vocab):
    return lambda: torch.randint(0, vocab, (2, 7 if vocab == 64 else 5), generator=torch.Generator().manual_seed(1))


CASES = {
    "gpt2-conv1d": (gpt2, ["c_attn", "c_proj"], token_ids(64)),
    "gpt2-wte": (gpt2, ["wte"], token_ids(64)),
    "conv-embedding": (ConvNet, ["embed", "conv1", "conv2", "head"], token_ids(20)),
}


def output(model, x):
    y = model(x)
    return y.logits if hasattr(y, "logits") else y


@pytest.mark.parametrize("case", list(CASES))
def test_saved_adapter_loads_in_peft_with_the_same_outputs(tmp_path, case):
    make, targets, inputs = CASES[case]
    ours = fastlora.apply_lora(make(), r=4, alpha=8, target_modules=targets)
    randomize_adapters(ours, std=0.1)
    ours.eval()
    save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(make(), str(tmp_path))
    theirs.eval()
    x = inputs()
    assert_close_to(output(theirs, x), output(ours, x), TOL, "PEFT-loaded output")
    state = peft.get_peft_model_state_dict(theirs)
    mine = adapter_file_state(ours)
    assert set(state) == set(mine)
    assert all(torch.equal(state[k], mine[k]) for k in mine)


@pytest.mark.parametrize("case", list(CASES))
def test_peft_written_adapter_loads_into_a_plain_model(tmp_path, case):
    make, targets, inputs = CASES[case]
    theirs = peft.get_peft_model(make(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    theirs.save_pretrained(str(tmp_path))
    theirs.eval()
    ours = load_adapter(make(), tmp_path)
    ours.eval()
    x = inputs()
    assert_close_to(output(ours, x), output(theirs, x), TOL, "loaded output")
    layer_type = peft.tuners.lora.LoraLayer
    wrapped = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if isinstance(m, layer_type)}
    assert set(adapter_layers(ours)) == wrapped
    adapters = {id(t) for layer in adapter_layers(ours).values() for t in layer.peft_tensors().values()}
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n for n, p in ours.named_parameters() if id(p) in adapters
    }


def test_round_trip_into_an_adapted_model(tmp_path):
    make, targets, inputs = CASES["conv-embedding"]
    ours = fastlora.apply_lora(make(), r=4, alpha=8, target_modules=targets)
    randomize_adapters(ours, seed=3)
    save_adapter(ours, tmp_path)
    other = fastlora.apply_lora(make(), r=4, alpha=8, target_modules=targets)
    load_adapter(other, tmp_path)
    assert adapter_file_state(other).keys() == adapter_file_state(ours).keys()
    assert all(torch.equal(adapter_file_state(other)[k], v) for k, v in adapter_file_state(ours).items())
