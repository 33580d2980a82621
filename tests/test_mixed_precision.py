"""Mixed precision as users run it, against PEFT under the same settings:
fp32 parameters under bf16/fp16 autocast, and a bf16 base with fp32 adapters.
Both are measured against float64 math; fastlora's error must stay within 2x
PEFT's (CONTRIBUTING.md, Tolerances) and its dtypes must be PEFT's."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastlora
from fastlora import LoRALinear

from _oracles import assert_close_to, peft_twin, tolerance_2x

pytest.importorskip("peft", reason="needs peft (pip install 'fastlora[test]')")

SETTINGS = {
    "fp32 params, bf16 autocast": (torch.float32, torch.bfloat16, False),
    "fp32 params, fp16 autocast": (torch.float32, torch.float16, False),
    "bf16 base, fp32 adapters": (torch.bfloat16, None, True),
    "bf16 base, fp32 adapters, bf16 autocast": (torch.bfloat16, torch.bfloat16, True),
}


def layers(base_dtype, fp32_adapters):
    torch.manual_seed(0)
    layer = LoRALinear.from_linear(nn.Linear(256, 128).to(base_dtype), r=16, alpha=32.0)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.2)
    if fp32_adapters:
        layer.lora_A.data, layer.lora_B.data = layer.lora_A.data.float(), layer.lora_B.data.float()
    twin = peft_twin(layer)
    if fp32_adapters:
        twin.lora_A["default"].float()
        twin.lora_B["default"].float()
    return layer, twin


def run(module, lora_A, lora_B, x, dy, autocast_dtype):
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        y = module(x)
    y.backward(dy.to(y.dtype))
    return [y, x.grad, lora_A.grad, lora_B.grad]


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_mixed_precision_matches_peft(setting):
    base_dtype, autocast_dtype, fp32_adapters = SETTINGS[setting]
    layer, twin = layers(base_dtype, fp32_adapters)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 256, generator=g).to(base_dtype)
    dy = torch.randn(64, 128, generator=g)
    # float64 oracle on the very same (already rounded) weights and inputs
    w, b = layer.weight.double(), layer.bias.double()
    a64 = layer.lora_A.detach().double().requires_grad_(True)
    b64 = layer.lora_B.detach().double().requires_grad_(True)
    x64 = x.double().requires_grad_(True)
    y64 = x64 @ w.t() + b + layer.scaling * (x64 @ a64.t()) @ b64.t()
    y64.backward(dy.double())
    oracle = [y64, x64.grad, a64.grad, b64.grad]
    ours = run(layer, layer.lora_A, layer.lora_B, x, dy, autocast_dtype)
    theirs = run(twin, twin.lora_A["default"].weight, twin.lora_B["default"].weight, x, dy, autocast_dtype)
    for name, o, t, want in zip(["output", "dx", "dA", "dB"], ours, theirs, oracle):
        assert o.dtype == t.dtype, f"{name}: dtype {o.dtype} vs PEFT's {t.dtype}"
        err_ours = (o.double() - want).abs().max().item()
        tol = tolerance_2x(t, want, o.dtype, floor_ulps=1)  # one ulp: PEFT can be exact by luck
        assert err_ours <= tol, f"{name}: error {err_ours:.3g} > {tol:.3g} (2x PEFT's own + 1 ulp)"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_apply_lora_keeps_fp32_adapters_on_a_16bit_model_as_peft_does(dtype):
    """PEFT's autocast_adapter_dtype=True (its default): fp32 adapters on a 16-bit base,
    so training keeps an fp32 master copy and the LoRA branch cannot overflow where
    PEFT's does not. Outputs and adapter gradients are PEFT's on the same weights."""
    import peft

    def net():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).to(dtype)

    ours = fastlora.apply_lora(net(), r=4, alpha=8.0)
    theirs = peft.get_peft_model(net(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for i in (0, 2):
            ours[i].lora_B.normal_(0, 0.5, generator=g)
            theirs.base_model.model[i].lora_A["default"].weight.copy_(ours[i].lora_A)
            theirs.base_model.model[i].lora_B["default"].weight.copy_(ours[i].lora_B)
    assert {p.dtype for n, p in ours.named_parameters() if p.requires_grad} == {torch.float32}
    x = torch.randn(5, 16, generator=g).to(dtype)
    y, y_peft = ours(x), theirs(x)
    assert y.dtype == y_peft.dtype == dtype
    y.float().square().sum().backward()
    y_peft.float().square().sum().backward()
    # the same ops in the same dtypes: equal up to a rounding of the 16-bit output on each side,
    # i.e. a few ulps of the largest value (4 ulps of dtype: about 1.6e-2 of it in bf16, 2e-3 in fp16)
    eps = torch.finfo(dtype).eps

    def assert_close(a, b, what):
        assert_close_to(a, b, 4 * eps * b.abs().max().item(), what)

    assert_close(y.float(), y_peft.float(), "output")
    for i in (0, 2):
        for which in ("lora_A", "lora_B"):
            theirs_grad = getattr(theirs.base_model.model[i], which)["default"].weight.grad
            assert_close(getattr(ours[i], which).grad, theirs_grad, f"{i}.{which}.grad")
    kept = fastlora.apply_lora(net(), r=4, autocast_adapter_dtype=False)
    assert {p.dtype for n, p in kept.named_parameters() if p.requires_grad} == {dtype}


@pytest.mark.interpreter
def test_kernels_keep_the_lora_branch_in_fp32_for_fp32_adapters():
    """fp32 adapters on fp16 activations reach the kernels as they are (no cast to
    fp16): the adapter gradients are fp32 and as exact as the reference path's."""
    from _oracles import float64_grads, make_inputs

    x, w, a, b, bias = make_inputs(24, 40, 36, 8)
    xh, wh, bh = x.half(), w.half(), bias.half()
    a32, b32 = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    y = fastlora.lora_linear(xh, wh, a32, b32, 0.5, bh)
    dy = torch.randn(24, 36, generator=torch.Generator().manual_seed(3)).half()
    y.backward(dy)
    assert a32.grad.dtype == b32.grad.dtype == torch.float32
    _, want = float64_grads(xh, wh, a32, b32, 0.5, bh, dy)
    for got, oracle, name in ((a32.grad, want[1], "dA"), (b32.grad, want[2], "dB")):
        rel = ((got.double() - oracle).abs().max() / oracle.abs().max()).item()
        # fp32 branch on fp16-rounded inputs: ~1e-6 relative (the issue measured 4e-4 with the old cast)
        assert rel < 1e-5, f"{name}: relative error {rel:.2e}"
