"""Tier 4: the compiled Triton kernels on a CUDA device, at real shapes, in
bf16/fp16/fp32, against float64 math (tolerance: 2x PyTorch's own error for
the same computation in the same dtype on the same device).

Skipped without CUDA (CI and the dev machines have none); ``bench/gpu_check.sh``
runs this file with ``TRITON_INTERPRET=0`` on a lent GPU machine.
"""

from __future__ import annotations

import pytest
import torch

import fastlora
from fastlora.functional import new_dropout_seed

from _oracles import float64_grads, tolerance_2x

pytestmark = pytest.mark.gpu

SHAPES = [(2048, 4096, 4096), (1000, 1536, 2304), (1, 4096, 4096), (0, 512, 512)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def inputs(m, k, n, r, dtype, bias=True, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, device="cuda", generator=g).to(dtype)
    w = (torch.randn(n, k, device="cuda", generator=g) / k**0.5).to(dtype)
    a = (torch.randn(r, k, device="cuda", generator=g) / k**0.5).to(dtype)
    b = (torch.randn(n, r, device="cuda", generator=g) / r**0.5).to(dtype)
    bias_t = torch.randn(n, device="cuda", generator=g).to(dtype) if bias else None
    dy = torch.randn(m, n, device="cuda", generator=g).to(dtype)
    return x, w, a, b, bias_t, dy


def grads_of(fn, x, a, b, bias, dy):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, a, b)]
    bb = bias.detach().clone().requires_grad_(True) if bias is not None else None
    y = fn(leaves[0], leaves[1], leaves[2], bb)
    y.backward(dy)
    return [y.detach(), *(t.grad for t in leaves), bb.grad if bb is not None else None]


def torch_own(x, w, a, b, scaling, bias):
    y = x @ w.t() + ((x @ a.t()) @ b.t()) * scaling
    return y + bias if bias is not None else y


def check(ours, naive, oracle, dtype):
    for name, o, t, want in zip(["y", "dx", "dA", "dB", "dbias"], ours, naive, oracle):
        if want is None or want.numel() == 0:
            continue
        tol = tolerance_2x(t, want, dtype)  # 2x torch's own error + 4 ulp: torch may be exact by luck
        err = (o.double() - want).abs().max().item()
        assert err <= tol, f"{name}: error {err:.3g} > {tol:.3g} (2x torch's own + 4 ulp)"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("r", [8, 16, 64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_lora_kernels_vs_float64(shape, r, dtype):
    m, k, n = shape
    x, w, a, b, bias, dy = inputs(m, k, n, r, dtype)
    scaling = 2.0
    ours = grads_of(lambda x_, a_, b_, c_: fastlora.lora_linear(x_, w, a_, b_, scaling, c_), x, a, b, bias, dy)
    naive = grads_of(lambda x_, a_, b_, c_: torch_own(x_, w, a_, b_, scaling, c_), x, a, b, bias, dy)
    y64, g64 = float64_grads(x, w, a, b, scaling, bias, dy)
    check(ours, naive, [y64, *g64], dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dropout_kernels_use_one_mask(dtype):
    from fastlora.kernels import lora as kl

    m, k, n, r, p = 1024, 2048, 1024, 16, 0.1
    x, w, a, b, bias, dy = inputs(m, k, n, r, dtype)
    torch.manual_seed(11)
    ours = grads_of(lambda x_, a_, b_, c_: fastlora.lora_linear(x_, w, a_, b_, 2.0, c_, dropout=p), x, a, b, bias, dy)
    torch.manual_seed(11)
    mask, keep = kl.dropout_keep_mask(new_dropout_seed(), (m, k), p, x.device)
    assert abs(mask.float().mean().item() - keep) < 0.01
    y64, g64 = float64_grads(x, w, a, b, 2.0, bias, dy, keep_mask=mask, keep=keep)

    def naive_fn(x_, a_, b_, c_):  # torch's own dropout-LoRA in this dtype, with the kernels' mask
        return x_ @ w.t() + ((x_ * (mask / keep).to(dtype)) @ a_.t()) @ b_.t() * 2.0 + c_

    naive = grads_of(naive_fn, x, a, b, bias, dy)
    check(ours, naive, [y64, *g64], dtype)


def test_launches_per_layer_and_no_mutation(monkeypatch):
    from fastlora.kernels import lora as kl

    # the default strategy's launches (a first call would otherwise also time the candidates)
    monkeypatch.setenv("FASTLORA_STRATEGY_MEASURE", "0")

    x, w, a, b, bias, dy = inputs(4096, 4096, 4096, 16, torch.bfloat16)
    x.requires_grad_(True)
    a.requires_grad_(True)
    b.requires_grad_(True)
    before = x.detach().clone()
    kl.reset_launch_count()
    y = fastlora.lora_linear(x, w, a, b, 2.0, bias, dropout=0.1)
    assert kl.launch_count() == 2
    kl.reset_launch_count()
    y.backward(dy, retain_graph=True)
    assert kl.launch_count() == 3
    first = [x.grad.clone(), a.grad.clone(), b.grad.clone()]
    x.grad = a.grad = b.grad = None
    y.backward(dy)
    assert all(torch.equal(f, s) for f, s in zip(first, [x.grad, a.grad, b.grad]))  # deterministic
    assert torch.equal(x.detach(), before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_qlora_kernels_vs_dequantized_float64(dtype, quant_type):
    from fastlora.qlora import qlora_linear
    from fastlora.quant import dequantize_4bit, quantize_4bit

    m, k, n, r = 2048, 4096, 4096, 16
    x, w, a, b, bias, dy = inputs(m, k, n, r, dtype)
    qw = quantize_4bit(w, quant_type=quant_type, blocksize=64, double_quant=True)
    w_deq = dequantize_4bit(qw, dtype)  # the oracle's weight: exactly what the kernels see
    ours = grads_of(lambda x_, a_, b_, c_: qlora_linear(x_, qw, a_, b_, 2.0, c_), x, a, b, bias, dy)
    naive = grads_of(lambda x_, a_, b_, c_: torch_own(x_, w_deq, a_, b_, 2.0, c_), x, a, b, bias, dy)
    y64, g64 = float64_grads(x, w_deq, a, b, 2.0, bias, dy)
    check(ours, naive, [y64, *g64], dtype)


def test_modules_and_compile_on_gpu():
    torch.manual_seed(0)
    # No elementwise op between the layers: inductor would fuse it differently from eager.
    model = torch.nn.Sequential(torch.nn.Linear(1024, 2048), torch.nn.Linear(2048, 1024))
    model = fastlora.apply_lora(model.cuda().bfloat16(), r=16, alpha=32.0)
    x = torch.randn(512, 1024, device="cuda", dtype=torch.bfloat16)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True)(x)
    assert torch.equal(eager, compiled)  # the kernels are opaque custom ops: the same code runs
