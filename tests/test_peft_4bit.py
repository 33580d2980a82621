"""4-bit bases in the PEFT world: from_peft on a PeftModel over bitsandbytes
Linear4bit layers, apply_lora on a bitsandbytes-quantized model and with
``quantize="nf4"``, and adapter files saved from a QLoRA model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastlora
from fastlora import QLoRALinear
from fastlora.model import lora_layers
from fastlora.quant import dequantize_4bit

from _oracles import assert_close_to

bnb = pytest.importorskip("bitsandbytes", reason="needs bitsandbytes >= 0.50 (pip install 'fastlora[test]')")
peft = pytest.importorskip("peft", reason="needs peft (pip install 'fastlora[test]')")

# in_features are multiples of the blocksize (64): bitsandbytes 0.50.2's native
# CPU 4-bit matmul misreads absmax when a block crosses a row at other sizes.
SIZES = [(128, 192), (192, 64)]


def float_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(*SIZES[0]), nn.ReLU(), nn.Linear(*SIZES[1]))


def bnb_model(quant_type="nf4"):
    model = float_model()
    for i in (0, 2):
        lin = model[i]
        l4 = bnb.nn.Linear4bit(lin.in_features, lin.out_features, compute_dtype=torch.float32, quant_type=quant_type)
        l4.load_state_dict(lin.state_dict())
        model[i] = l4.to("cpu")
    return model


def peft_on_4bit():
    model = peft.get_peft_model(bnb_model(), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["0", "2"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return model.eval()


# fp32 through two 4-bit layers; both sides dequantize to the same values and
# sum in a different order: 1e-5 relative to outputs of magnitude ~1.
TOL = 1e-5


def test_from_peft_runs_4bit_layers_on_the_qlora_op():
    model = peft_on_4bit()
    x = torch.randn(9, 128)
    # An input that requires grad keeps bitsandbytes off its CPU inference repack
    # (bf16 absmax), so PEFT's output here is on the exact 4-bit weights.
    before = model(x.clone().requires_grad_(True)).detach()
    report = fastlora.from_peft(model)
    assert len(report["accelerated"]) == 2 and report["skipped"] == []
    calls = []
    import fastlora.qlora as qlora

    real = qlora.QLoRALinearFunction.apply
    qlora.QLoRALinearFunction.apply = lambda *a: calls.append(1) or real(*a)
    try:
        xg = x.clone().requires_grad_(True)
        after = model(xg)
        after.sum().backward()
    finally:
        qlora.QLoRALinearFunction.apply = real
    assert len(calls) == 2
    assert_close_to(after.detach(), before, TOL * before.abs().max().item(), "4-bit from_peft output")
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_" in n}
    assert len(grads) == 4 and all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_from_peft_after_bitsandbytes_cpu_repacked_its_weights():
    model = peft_on_4bit()
    x = torch.randn(4, 128)
    with torch.no_grad():
        repacked = model(x)  # eval + no grad: bitsandbytes repacks for its CPU kernel
    fastlora.from_peft(model)
    with torch.no_grad():
        after = model(x)
    # bitsandbytes' repack rounds absmax to bf16 (8 bits of mantissa): outputs of
    # magnitude ~1 agree to ~1e-2 relative; our op runs on bitsandbytes' inverse.
    assert_close_to(after, repacked, 1e-2 * repacked.abs().max().item(), "after repack")


def test_apply_lora_on_a_bitsandbytes_model_shares_its_weights():
    model = bnb_model("fp4")
    packed = [model[i].weight.data for i in (0, 2)]
    fastlora.apply_lora(model, r=4)
    assert all(isinstance(model[i], QLoRALinear) for i in (0, 2))
    assert model[0].quant_type == "fp4"
    assert all(model[i].weight.data_ptr() == p.data_ptr() for i, p in zip((0, 2), packed))  # shared, no copy
    reference = bnb_model("fp4")
    x = torch.randn(5, 128)
    with torch.no_grad():
        assert_close_to(model(x), reference(x), TOL, "fresh adapters on bitsandbytes' weights")


def test_quantize_nf4_config_and_adapters_load_in_peft_on_a_4bit_base(tmp_path):
    model = fastlora.apply_lora(float_model(), r=8, alpha=16.0, quantize="nf4")
    layers = lora_layers(model)
    assert all(isinstance(m, QLoRALinear) and m.quant_type == "nf4" and m.double_quant for m in layers.values())
    trainable, total = fastlora.count_parameters(model)
    assert trainable == 8 * (128 + 192) + 8 * (192 + 64)
    # the biases, and the 4-bit weights counted as the parameters they represent (PEFT's rule)
    assert total == trainable + 192 + 64 + 128 * 192 + 192 * 64
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.normal_(0, 0.1)
    fastlora.save_adapter(model, tmp_path)
    # PEFT on a float model holding exactly the dequantized 4-bit weights
    twin_base = float_model()
    with torch.no_grad():
        for i in (0, 2):
            twin_base[i].weight.copy_(dequantize_4bit(model[i].qweight, torch.float32))
    theirs = peft.PeftModel.from_pretrained(twin_base, str(tmp_path)).eval()
    model.eval()
    x = torch.randn(6, 128)
    with torch.no_grad():
        assert_close_to(model(x), theirs(x), TOL * 10, "QLoRA adapter in PEFT")


def test_count_parameters_counts_4bit_weights_as_peft_does():
    """PEFT's get_nb_trainable_parameters is the oracle: a bitsandbytes Params4bit
    counts as the parameters it represents, and so does a fastlora 4-bit layer."""
    peft_model = peft.get_peft_model(bnb_model(), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["0", "2"]))
    want = peft_model.get_nb_trainable_parameters()
    assert fastlora.count_parameters(peft_model) == want
    ours = fastlora.apply_lora(bnb_model(), r=8, alpha=16.0, target_modules=["0", "2"])
    assert fastlora.count_parameters(ours) == want
    quantized = fastlora.apply_lora(float_model(), r=8, alpha=16.0, quantize="nf4")
    assert fastlora.count_parameters(quantized) == want


def test_from_peft_4bit_several_adapters_and_lora_bias_match_peft():
    import copy

    import fastlora.peft_model as peft_model

    ref = peft_on_4bit()
    ref.add_adapter("b", peft.LoraConfig(r=4, lora_alpha=4, target_modules=["0", "2"], lora_bias=True))
    torch.manual_seed(2)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_B" in n and ".b." in n:
                p.normal_(0, 0.1)
    ref.base_model.set_adapter(["default", "b"])
    ref.train()
    ours = copy.deepcopy(ref)
    report = fastlora.from_peft(ours)
    assert len(report["accelerated"]) == 2 and report["skipped"] == []
    x = torch.randn(9, 128)
    outs, grads = [], []
    for model in (ref, ours):
        xg = x.clone().requires_grad_(True)  # keeps bitsandbytes off its CPU inference repack
        y = model(xg)
        y.square().sum().backward()
        outs.append(y.detach())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert_close_to(outs[1], outs[0], TOL * outs[0].abs().max().item(), "two adapters on 4-bit")
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 10  # 2 layers x (A, B) x 2 adapters + 2 lora_B biases
    for n in grads[0]:
        assert_close_to(grads[1][n], grads[0][n], TOL * grads[0][n].abs().max().item(), n)
    assert peft_model.fallback_counts(ours) == {"fused": 2}


def test_from_peft_4bit_dora_stays_on_peft():
    import fastlora.peft_model as peft_model

    model = peft.get_peft_model(bnb_model(), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["0", "2"], use_dora=True))
    with pytest.warns(peft_model.PeftFallbackWarning, match="2 x DoRA on a 4-bit base"):
        report = fastlora.from_peft(model)
    assert report["accelerated"] == []
