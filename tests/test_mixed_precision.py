"""Mixed precision as users run it, against PEFT under the same settings:
fp32 parameters under bf16/fp16 autocast, and a bf16 base with fp32 adapters.
Both are measured against float64 math; fastlora's error must stay within 2x
PEFT's (DESIGN.md's rule) and its dtypes must be PEFT's."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastlora import LoRALinear

from _oracles import peft_twin, tolerance_2x

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
