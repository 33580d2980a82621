"""What fastlora keeps alive for backward, and that backward leaves it untouched.

Saved-for-backward bytes are counted exactly with saved-tensor hooks
(``bench/saved_bytes.py``, shared with the benchmark report): every distinct
storage autograd packs during the forward, parameters excluded. The design
says the LoRA linear saves X (the caller's tensor, not a copy) and
S = dropout(X) A^T [M, r], nothing else, with or without dropout. PEFT's
figures are printed beside ours (run with ``-s`` to see them); its ratio with
dropout is asserted because it is an exact count, not a timing.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

import fastlora

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
from saved_bytes import record_saved_tensors  # noqa: E402

K, N = 96, 80  # ragged sizes (not powers of two)


def _layer(dtype, dropout, bias, r=8):
    torch.manual_seed(0)
    layer = fastlora.LoRALinear(K, N, bias=bias, r=r, alpha=16.0, dropout=dropout, dtype=dtype).train()
    with torch.no_grad():
        layer.lora_B.normal_(0.0, 0.1)  # a non-zero update, so every gradient is real
    return layer


def _input(lead, dtype):
    torch.manual_seed(1)
    return torch.randn(*lead, K, dtype=dtype).requires_grad_(True)


def _frozen(module):
    return list(module.parameters()) + list(module.buffers())


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["p0", "p0.1"])
@pytest.mark.parametrize("lead", [(37,), (3, 13)], ids=["2d", "3d"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_saved_bytes_are_exactly_x_plus_s(dtype, dropout, lead, bias):
    layer = _layer(dtype, dropout, bias)
    x = _input(lead, dtype)
    m = x.numel() // K
    rec = record_saved_tensors(lambda: layer(x), exclude=_frozen(layer))
    s_bytes = m * layer.r * x.element_size()  # S = dropout(X) A^T, [M, r] in x's dtype
    assert rec.nbytes == _nbytes(x) + s_bytes, (
        f"saved {rec.nbytes} B, expected X ({_nbytes(x)} B) + S ({s_bytes} B); saved: {rec.describe()}"
    )
    # X itself (its storage), not a copy of it, is what is kept.
    x_key = (str(x.device), x.untyped_storage().data_ptr())
    assert x_key in rec.entries, f"x's own storage is not among the saved tensors: {rec.describe()}"
    rec.result.sum().backward()  # the recorded graph is still usable


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["p0", "p0.1"])
def test_backward_never_writes_saved_tensors(dtype, dropout):
    layer = _layer(dtype, dropout, bias=True)
    x = _input((3, 13), dtype)
    x_before, x_version = x.detach().clone(), x._version
    packed: list[tuple[torch.Tensor, int, torch.Tensor]] = []

    def pack(t):
        packed.append((t, t._version, t.detach().clone()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy, retain_graph=True)
    y.backward(dy)
    assert x._version == x_version, "backward bumped x's version counter (an in-place write)"
    assert torch.equal(x.detach(), x_before), "backward changed x's values"
    assert packed, "nothing was saved for backward"
    for t, version, snapshot in packed:
        assert t._version == version, f"saved tensor {tuple(t.shape)} was written in place (version counter moved)"
        assert torch.equal(t.detach(), snapshot), f"saved tensor {tuple(t.shape)} changed during backward"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["p0", "p0.1"])
def test_retain_graph_double_backward_is_bit_identical(dtype, dropout):
    layer = _layer(dtype, dropout, bias=True)
    x = _input((37,), dtype)
    y = layer(x)
    dy = torch.randn_like(y)
    grads = []
    for _ in range(2):
        x.grad = layer.lora_A.grad = layer.lora_B.grad = None
        y.backward(dy, retain_graph=True)
        grads.append((x.grad.clone(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone()))
    for name, first, second in zip(("dx", "dA", "dB"), *grads):
        assert torch.equal(first, second), f"{name} differs between two backwards of one graph"


# ---------------------------------------------------------------- PEFT beside us


def _peft_layer(fl_layer, dropout, autocast_adapter_dtype):
    peft = pytest.importorskip("peft")
    base = torch.nn.Linear(K, N, dtype=fl_layer.weight.dtype)
    with torch.no_grad():
        base.weight.copy_(fl_layer.weight)
        base.bias.copy_(fl_layer.bias)
    cfg = peft.LoraConfig(r=fl_layer.r, lora_alpha=fl_layer.alpha, lora_dropout=dropout, target_modules=["0"])
    model = peft.get_peft_model(torch.nn.Sequential(base), cfg, autocast_adapter_dtype=autocast_adapter_dtype)
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(fl_layer.lora_A)
        layer.lora_B["default"].weight.copy_(fl_layer.lora_B)
    return layer.train()


@pytest.mark.parametrize(
    "dtype,autocast_adapter_dtype",
    [(torch.float32, True), (torch.bfloat16, False), (torch.bfloat16, True)],
    ids=["fp32", "bf16-bf16adapters", "bf16-peftdefault-fp32adapters"],
)
def test_saved_bytes_beside_peft(dtype, autocast_adapter_dtype):
    """PEFT (0.21, CPU) saves, per LoRA linear layer:
    without dropout: x for lora_A's weight gradient and S = lora_A(x) -> X + S,
    the same as fastlora (the frozen base layer saves no activation: its input
    is only needed for the weight's gradient);
    with dropout: the dropout's noise tensor (on CPU torch's dropout multiplies
    by a saved noise tensor of x's size and dtype), dropout(x) (a copy of x,
    saved by lora_A) and S -> 2X + S, so fastlora's X + S is just above 0.5x.
    With PEFT's default ``autocast_adapter_dtype=True`` a bf16 model gets fp32
    adapters and x is cast to fp32 before the LoRA branch, so those tensors are
    fp32."""
    lead = (64,)
    m, r = lead[0], 8
    rows = []
    for dropout in (0.0, 0.1):
        ours_layer = _layer(dtype, dropout, bias=True, r=r)
        peft_layer = _peft_layer(ours_layer, dropout, autocast_adapter_dtype)
        x = _input(lead, dtype)
        ours = record_saved_tensors(lambda: ours_layer(x), exclude=_frozen(ours_layer))
        theirs = record_saved_tensors(lambda: peft_layer(x), exclude=_frozen(peft_layer))
        rows.append((dropout, ours, theirs))
        print(
            f"\n[{dtype} adapters={'fp32' if autocast_adapter_dtype and dtype != torch.float32 else 'base dtype'} "
            f"dropout={dropout}] saved bytes: fastlora {ours.nbytes} ({ours.describe()}); "
            f"PEFT {theirs.nbytes} ({theirs.describe()}); ratio {ours.nbytes / theirs.nbytes:.4f}"
        )
        # PEFT's breakdown, as described above (the lora branch runs in the adapters' dtype).
        lora_dtype = peft_layer.lora_A["default"].weight.dtype
        item = torch.empty((), dtype=lora_dtype).element_size()
        x_lora, s_lora = m * K * item, m * r * item  # x (or its fp32 cast) and S in that dtype
        expected = x_lora + s_lora if dropout == 0.0 else 2 * x_lora + s_lora
        assert theirs.nbytes == expected, (
            f"PEFT saved {theirs.nbytes} B, FACTS-based expectation {expected} B: {theirs.describe()}"
        )
    (_, ours0, peft0), (_, ours1, peft1) = rows
    if dtype == torch.float32 or not autocast_adapter_dtype:
        assert ours0.nbytes == peft0.nbytes, "without dropout fastlora should save exactly what PEFT saves (X + S)"
    assert ours1.nbytes / peft1.nbytes <= 0.55, (
        f"with dropout fastlora saves {ours1.nbytes} B vs PEFT's {peft1.nbytes} B "
        f"(ratio {ours1.nbytes / peft1.nbytes:.4f} > 0.55)"
    )


# ---------------------------------------------------------------- the Triton kernels


def _kernels_or_skip():
    try:
        from fastlora.kernels import lora as klora  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - not written yet, or no triton
        pytest.skip(f"fastlora.kernels.lora is not importable here: {type(exc).__name__}: {exc}")
    if not hasattr(klora, "lora_forward"):
        pytest.skip("fastlora.kernels.lora has no lora_forward yet")


@pytest.mark.interpreter
@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["p0", "p0.1"])
def test_saved_bytes_kernels(dropout):
    """The Triton path keeps the same X + S [M, r] (no padded or fp32 S in fp32 runs)."""
    _kernels_or_skip()
    layer = _layer(torch.float32, dropout, bias=True)
    x = _input((2, 9), torch.float32)
    rec = record_saved_tensors(lambda: layer(x), exclude=_frozen(layer))
    s_bytes = 18 * layer.r * 4
    assert rec.nbytes == _nbytes(x) + s_bytes, f"saved {rec.describe()}, expected X + S = {_nbytes(x) + s_bytes} B"
    x_before, version = x.detach().clone(), x._version
    rec.result.sum().backward()
    assert x._version == version and torch.equal(x.detach(), x_before)
