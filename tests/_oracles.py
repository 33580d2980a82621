"""Shared oracles for the tests: float64 math and PEFT on the same weights."""

from __future__ import annotations

import torch
from torch import nn

from fastlora import LoRALinear
from fastlora.reference import lora_linear_float64


def make_inputs(m, k, n, r, dtype=torch.float32, bias=True, lead=(), seed=0):
    """x [*lead, m, k] and layer tensors with a non-zero lora_B (so every gradient path is live)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, m, k, generator=g).to(dtype)
    weight = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
    lora_A = (torch.randn(r, k, generator=g) / k**0.5).to(dtype)
    lora_B = (torch.randn(n, r, generator=g) / r**0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return x, weight, lora_A, lora_B, b


def float64_grads(x, weight, lora_A, lora_B, scaling, bias, dy, keep_mask=None, keep=1.0):
    """Output and gradients (x, A, B, bias) of the textbook formula in float64 autograd."""
    leaves = [t.detach().double().requires_grad_(True) for t in (x, lora_A, lora_B)]
    b64 = bias.detach().double().requires_grad_(True) if bias is not None else None
    y = lora_linear_float64(leaves[0], weight, leaves[1], leaves[2], scaling, b64, keep_mask, keep)
    y.backward(dy.double())
    grads = [t.grad for t in leaves] + [b64.grad if b64 is not None else None]
    return y.detach(), grads


def tolerance_2x(own, oracle64, dtype, floor_ulps: float = 4) -> float:
    """The project's tolerance rule, written once: 2x the error of ``own`` (PyTorch's
    or PEFT's result for the same computation in the same dtype) against the
    float64 ``oracle64``, plus ``floor_ulps`` units in the last place of ``dtype``
    at the oracle's largest magnitude (so a reference that is exact by luck
    cannot make the tolerance zero)."""
    if oracle64.numel() == 0:
        return 0.0
    err = (own.double() - oracle64.double()).abs().max().item()
    return 2 * err + floor_ulps * torch.finfo(dtype).eps * oracle64.abs().max().item()


def assert_close_to(actual, oracle, tol, what):
    """|actual - oracle| <= tol elementwise, printing the worst elements on failure."""
    diff = (actual.double() - oracle.double()).abs()
    # NOTE: NaN compares false against any tolerance: a non-finite value where the oracle is finite
    # and within the actual dtype's range fails (an fp16 inf where the true value exceeds 65504 is right)
    limit = torch.finfo(actual.dtype).max if actual.is_floating_point() else float("inf")
    bad = ~torch.isfinite(actual.double()) & torch.isfinite(oracle.double()) & (oracle.double().abs() <= limit)
    if bad.any():
        raise AssertionError(f"{what}: {int(bad.sum())} non-finite values where the oracle is finite")
    if diff.numel() and diff.max() > tol:
        flat = diff.flatten()
        worst = flat.topk(min(5, flat.numel())).indices
        rows = ", ".join(
            f"[{i}] got {actual.flatten()[i].item():.6g} want {oracle.flatten()[i].item():.6g}" for i in worst.tolist()
        )
        raise AssertionError(f"{what}: max |diff| {diff.max().item():.3g} > tol {tol:.3g}; worst: {rows}")


def peft_twin(layer: LoRALinear, dropout: float = 0.0) -> nn.Module:
    """A PEFT LoRA layer (``peft.tuners.lora.Linear`` built by ``get_peft_model``)
    with exactly ``layer``'s weights; requires peft."""
    import peft

    base = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, dtype=layer.weight.dtype)
    with torch.no_grad():
        base.weight.copy_(layer.weight)
        if layer.bias is not None:
            base.bias.copy_(layer.bias)
    config = peft.LoraConfig(
        r=layer.r, lora_alpha=layer.alpha, lora_dropout=dropout, use_rslora=layer.use_rslora, target_modules=["0"]
    )
    twin = peft.get_peft_model(nn.Sequential(base), config).base_model.model[0]
    with torch.no_grad():
        twin.lora_A["default"].weight.copy_(layer.lora_A)
        twin.lora_B["default"].weight.copy_(layer.lora_B)
    return twin
