"""fastlora inside a Hugging Face model: a tiny Llama built from a config
(random weights, no download), against PEFT on identical weights."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import fastlora
import fastlora.peft_model
from fastlora.model import lora_layers

from _oracles import assert_close_to, tolerance_2x

transformers = pytest.importorskip("transformers", reason="needs transformers (pip install 'fastlora[test]')")
peft = pytest.importorskip("peft", reason="needs peft (pip install 'fastlora[test]')")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama():
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attn_implementation="eager",
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def peft_llama(dropout=0.0, **extra):
    model = peft.get_peft_model(
        tiny_llama(), peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=TARGETS, **extra)
    )
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def batch():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 97, (2, 12), generator=g)
    return ids, ids.clone()


# Logits of a 2-layer fp32 model: both sides compute the same sums in a different
# order; differences stay at a few hundred ulp of O(1) values -> 1e-4 absolute.
TOL = 1e-4


def test_llama_with_fastlora_matches_peft_logits_loss_gradients_and_training():
    theirs = peft_llama()
    ours = fastlora.apply_lora(tiny_llama(), r=8, alpha=16.0, target_modules=TARGETS)
    layers = lora_layers(ours)
    assert len(layers) == 14
    with torch.no_grad():
        for name, layer in layers.items():
            twin = theirs.base_model.model.get_submodule(name)
            layer.lora_A.copy_(twin.lora_A["default"].weight)
            layer.lora_B.copy_(twin.lora_B["default"].weight)
    ids, labels = batch()
    out_ours, out_theirs = ours(input_ids=ids, labels=labels), theirs(input_ids=ids, labels=labels)
    assert_close_to(out_ours.logits, out_theirs.logits, TOL, "logits")
    assert abs(out_ours.loss.item() - out_theirs.loss.item()) < TOL
    out_ours.loss.backward()
    out_theirs.loss.backward()
    for name, layer in layers.items():
        twin = theirs.base_model.model.get_submodule(name)
        for ours_p, theirs_p in ((layer.lora_A, twin.lora_A["default"].weight), (layer.lora_B, twin.lora_B["default"].weight)):
            scale = max(theirs_p.grad.abs().max().item(), 1e-3)
            assert_close_to(ours_p.grad, theirs_p.grad, 1e-4 * scale, f"{name} grad")  # relative fp32 reordering
    curves = []
    for model in (ours, theirs):
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        losses = []
        for _ in range(4):
            opt.zero_grad()
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves.append(torch.tensor(losses))
    assert curves[0][-1] < curves[0][0]
    assert_close_to(curves[0], curves[1], 1e-4, "loss curve")  # same reordering bound over 4 steps


def test_from_peft_accelerates_in_place_and_keeps_the_peft_model_working(tmp_path):
    model = peft_llama(dropout=0.05).eval()  # eval: dropout off, so outputs are comparable
    ids, labels = batch()
    with torch.no_grad():
        before = model(input_ids=ids).logits
        tokens_before = model.generate(input_ids=ids[:1, :4], max_new_tokens=5, do_sample=False)
    report = fastlora.from_peft(model)
    assert len(report["accelerated"]) == 14 and report["skipped"] == []
    assert isinstance(model, peft.PeftModel)
    fastlora.reset_fallback_counts(model)
    with torch.no_grad():
        after = model(input_ids=ids).logits
        tokens_after = model.generate(input_ids=ids[:1, :4], max_new_tokens=5, do_sample=False)
    counts = fastlora.fallback_counts(model)
    assert counts.get("fused", 0) >= 14 and set(counts) == {"fused"}  # every LoRA layer call ran fastlora's op
    assert_close_to(after, before, TOL, "logits after from_peft")
    assert torch.equal(tokens_after, tokens_before)
    model.train()
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)
    model.eval()
    model.save_pretrained(str(tmp_path))
    reloaded = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    with torch.no_grad():
        assert_close_to(reloaded(input_ids=ids).logits, after, TOL, "save_pretrained round trip")
        merged = model.merge_and_unload()
        assert_close_to(merged(input_ids=ids).logits, after, TOL, "merge_and_unload")


def grads_of(model):
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def assert_matches_peft_float64(ref, ours, ids, labels, what):
    """ours (fp32) against PEFT in float64 within 2x PEFT's own fp32 error: logits and every trainable gradient."""
    ref64 = copy.deepcopy(ref).double()
    results = []
    for model in (ref, ref64, ours):
        out = model(input_ids=ids, labels=labels)
        out.loss.backward()
        results.append((out.logits.detach(), grads_of(model)))
    (l32, g32), (l64, g64), (lF, gF) = results
    assert_close_to(lF, l64, tolerance_2x(l32, l64, torch.float32), f"{what} logits")
    assert g32.keys() == gF.keys() and len(g32) > 0
    for name in g32:
        assert_close_to(gF[name], g64[name], tolerance_2x(g32[name], g64[name], torch.float32), f"{what} {name}")


def test_from_peft_runs_dora_llama_layers_fused_and_matches_peft():
    ref = peft_llama(use_dora=True).train()
    ours = copy.deepcopy(ref)
    report = fastlora.from_peft(ours)
    assert len(report["accelerated"]) == 14 and report["skipped"] == []
    fastlora.peft_model.reset_fallback_counts(ours)
    ids, labels = batch()
    assert_matches_peft_float64(ref, ours, ids, labels, "DoRA llama")
    assert fastlora.peft_model.fallback_counts(ours) == {"fused": 14}


def test_from_peft_reports_warns_and_counts_layers_left_on_peft():
    model = peft_llama(dropout=0.1, use_dora=True).train()  # PEFT applies DoRA's dropout its own way
    with pytest.warns(fastlora.peft_model.PeftFallbackWarning, match="14 x DoRA with dropout in training"):
        report = fastlora.from_peft(model)
    assert report["accelerated"] == [] and len(report["skipped"]) == 14
    assert all(reason == "DoRA with dropout in training" for _, reason in report["skipped"])
    fastlora.peft_model.reset_fallback_counts(model)
    ids, labels = batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model(input_ids=ids)
        model.eval()  # dropout off: the same layers run fused
        model(input_ids=ids)
    assert fastlora.peft_model.fallback_counts(model) == {"fused": 14, "DoRA with dropout in training": 14}


def tiny_gpt2():
    config = transformers.GPT2Config(
        vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4, attn_implementation="eager",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_from_peft_runs_gpt2_conv1d_layers_fused_and_matches_peft(use_dora):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: "fan_in_fan_out is set to True" for Conv1D
        ref = peft.get_peft_model(
            tiny_gpt2(),
            peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], use_dora=use_dora),
        )
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    ref.train()
    ours = copy.deepcopy(ref)
    report = fastlora.from_peft(ours)
    assert len(report["accelerated"]) == 8 and report["skipped"] == []  # 2 x (c_attn, attn c_proj, c_fc, mlp c_proj)
    fastlora.peft_model.reset_fallback_counts(ours)
    ids, labels = batch()
    assert_matches_peft_float64(ref, ours, ids, labels, "GPT-2")
    assert fastlora.peft_model.fallback_counts(ours) == {"fused": 8}
    ours.eval()
    ref.eval()
    with torch.no_grad():
        prompt = ids[:1, :4]
        want = ref.generate(input_ids=prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(ours.generate(input_ids=prompt, max_new_tokens=5, do_sample=False, pad_token_id=0), want)
