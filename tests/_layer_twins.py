"""PEFT twins for the layer kinds of fastlora.layers: the same weights in a model
built by ``peft.get_peft_model``, in float32 and float64, and a check that
fastlora's outputs and gradients lie within the 2x rule of PEFT's own fp32
error against its fp64 result."""

from __future__ import annotations

import copy

import torch
from torch import nn

import fastlora
from fastlora.registry import adapter_layers

from _oracles import assert_close_to, tolerance_2x

PREFIX = "base_model.model."


def peft_key(name: str, key: str) -> str:
    """A peft_tensors() key of module ``name`` as PEFT's parameter name (adapter "default")."""
    stem, dot, leaf = key.rpartition(".")
    inner = f"{stem}.default.{leaf}" if dot else f"{key}.default"
    return f"{PREFIX}{name}.{inner}"


def adapter_file_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """fastlora's adapters under PEFT's adapter-file keys (what save_pretrained writes)."""
    return {
        f"{PREFIX}{name}.{key}": t.detach().clone()
        for name, layer in adapter_layers(model).items()
        for key, t in layer.peft_tensors().items()
    }


def randomize_adapters(model: nn.Module, seed: int = 0, std: float = 0.3) -> None:
    """Non-zero adapters (so every gradient path is live); deterministic."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            for t in layer.peft_tensors().values():
                t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float64) * std)


def peft_twin(base: nn.Module, ours: nn.Module, dtype=torch.float32, **config) -> nn.Module:
    """``peft.get_peft_model(copy of base, LoraConfig(**config))`` in ``dtype`` with
    ``ours``'s adapters loaded through PEFT's own adapter-file loader (so the
    keys of ``peft_tensors()`` are checked to be PEFT's)."""
    import peft

    model = copy.deepcopy(base).to(dtype)
    twin = peft.get_peft_model(model, peft.LoraConfig(**config))
    state = {k: v.to(dtype) for k, v in adapter_file_state(ours).items()}
    result = peft.set_peft_model_state_dict(twin, state)
    assert not result.unexpected_keys, result.unexpected_keys
    missing = [k for k in result.missing_keys if "lora_" in k]
    assert not missing, missing
    return twin


def run(model: nn.Module, x: torch.Tensor, dy_seed: int = 5, out=lambda y: y):
    """Output and gradients: {"y", "x" (if x is floating), <parameter name>: grad}."""
    model.zero_grad(set_to_none=True)
    if x.is_floating_point():
        x = x.detach().clone().requires_grad_(True)
    y = out(model(x))
    g = torch.Generator().manual_seed(dy_seed)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
    y.backward(dy)
    result = {"y": y.detach()}
    if x.is_floating_point():
        result["x"] = x.grad
    for name, p in model.named_parameters():
        if p.grad is not None:
            result[name] = p.grad.to_dense() if p.grad.is_sparse else p.grad
    return result


def assert_matches_peft(base: nn.Module, ours: nn.Module, x: torch.Tensor, out=lambda y: y, **config) -> dict:
    """ours (float32) against PEFT's float64 twin, every quantity within 2x PEFT's own
    float32 error (its fp32 twin) plus a few ulp: output, dx, and each adapter's
    gradients. Returns the names compared."""
    twin32 = peft_twin(base, ours, torch.float32, **config)
    twin64 = peft_twin(base, ours, torch.float64, **config)
    for m in (ours, twin32, twin64):
        m.train(ours.training)
    mine = run(ours, x, out=out)
    theirs32 = run(twin32, x, out=out)
    theirs64 = run(twin64, x.double() if x.is_floating_point() else x, out=out)
    compared = ["y"] + (["x"] if "x" in mine else [])
    for name, layer in adapter_layers(ours).items():
        for key, t in layer.peft_tensors().items():
            param = next(n for n, p in ours.named_parameters() if p is t)
            assert param in mine, f"no gradient for {param}"
            compared.append(param)
            theirs32[param] = theirs32[peft_key(name, key)]
            theirs64[param] = theirs64[peft_key(name, key)]
    for what in compared:
        tol = tolerance_2x(theirs32[what], theirs64[what], torch.float32)
        assert_close_to(mine[what], theirs64[what], tol, what)
    return compared


def count_matches_peft(ours: nn.Module, twin: nn.Module) -> None:
    assert fastlora.count_parameters(ours) == twin.get_nb_trainable_parameters()


__all__ = [
    "adapter_file_state",
    "assert_matches_peft",
    "count_matches_peft",
    "peft_key",
    "peft_twin",
    "randomize_adapters",
    "run",
]
