"""DoRA / QDoRA (fastlora.dora) against PEFT's DoRA, float64 math and the
materialized row norm; adapter files both ways with PEFT."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fastlora
from fastlora import LoRAConfig, apply_lora, count_parameters, load_adapter, lora_linear, save_adapter
from fastlora import dora as dora_mod
from fastlora.dora import DoRALinear, QDoRALinear, dora_linear, dora_row_norm, weight_sq_norm
from fastlora.model import lora_layers
from fastlora.peft_io import AdapterFormatError
from fastlora.quant import dequantize_4bit, quantize_4bit

from _oracles import assert_close_to

peft = pytest.importorskip("peft", reason="PEFT parity tests need peft (pip install 'fastlora[test]')")
safetensors_torch = pytest.importorskip("safetensors.torch")


def dora_layer(k=48, n=40, r=8, alpha=16.0, bias=True, rslora=False, dropout=0.0, dtype=torch.float32, seed=0):
    """A DoRALinear whose B and magnitude are perturbed away from init (every path live)."""
    torch.manual_seed(seed)
    base = nn.Linear(k, n, bias=bias, dtype=dtype)
    layer = DoRALinear.from_linear(base, r=r, alpha=alpha, use_rslora=rslora, dropout=dropout)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.5)
        layer.lora_magnitude.mul_(torch.rand(n, dtype=dtype) + 0.5)
    return base, layer


def peft_dora_twin(layer, dropout: float = 0.0) -> nn.Module:
    """PEFT's DoRA layer (``peft.tuners.lora.Linear`` with use_dora) on exactly ``layer``'s weights."""
    base = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, dtype=layer.weight.dtype)
    with torch.no_grad():
        base.weight.copy_(layer.weight)
        if layer.bias is not None:
            base.bias.copy_(layer.bias)
    config = peft.LoraConfig(
        r=layer.r, lora_alpha=layer.alpha, lora_dropout=dropout, use_rslora=layer.use_rslora, use_dora=True,
        target_modules=["0"],
    )  # fmt: skip
    twin = peft.get_peft_model(nn.Sequential(base), config).base_model.model[0]
    with torch.no_grad():
        twin.lora_A["default"].weight.copy_(layer.lora_A)
        twin.lora_B["default"].weight.copy_(layer.lora_B)
        twin.lora_magnitude_vector["default"].weight.copy_(layer.lora_magnitude)
    return twin


def dora_float64(x, weight, lora_A, lora_B, magnitude, scaling, bias):
    """The DoRA formula in float64 autograd, the row norm materialized and detached.
    Returns (y, [dx, dA, dB, dm, dbias] leaves)."""
    leaves = [t.detach().double().requires_grad_(True) for t in (x, lora_A, lora_B, magnitude)]
    b64 = bias.detach().double().requires_grad_(True) if bias is not None else None
    x64, a64, bb64, m64 = leaves
    w64 = weight.detach().double()
    norm = (w64 + scaling * bb64 @ a64).norm(dim=1).detach()
    y = (m64 / norm) * (x64 @ w64.t() + scaling * (x64 @ a64.t()) @ bb64.t())
    if b64 is not None:
        y = y + b64
    return y, leaves + [b64]


def grads_of(*tensors):
    return [t.grad if t is not None else None for t in tensors]


# -- forward and backward ------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("r", [1, 8])
@pytest.mark.parametrize("mode", ["eval-with-dropout", "train-without-dropout"])
def test_matches_peft_and_float64_outputs_and_gradients(bias, rslora, r, mode):
    dropout = 0.1 if mode == "eval-with-dropout" else 0.0
    _, layer = dora_layer(r=r, bias=bias, rslora=rslora, dropout=dropout)
    twin = peft_dora_twin(layer, dropout=dropout)
    assert layer.scaling == pytest.approx(twin.scaling["default"])
    if mode.startswith("eval"):
        layer.eval()
        twin.eval()  # dropout is inactive in eval mode: outputs must agree
    else:
        layer.train()
        twin.train()
    if bias:  # unfreeze the bias on both sides so its gradient is checked too
        layer.bias.requires_grad_(True)
        twin.base_layer.bias.requires_grad_(True)
    x = torch.randn(3, 11, 48)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = layer(xa), twin(xb)
    dy = torch.randn_like(ya)
    ya.backward(dy)
    yb.backward(dy)
    ours = [xa.grad, *grads_of(layer.lora_A, layer.lora_B, layer.lora_magnitude, layer.bias if bias else None)]
    theirs = [
        xb.grad,
        *grads_of(
            twin.lora_A["default"].weight, twin.lora_B["default"].weight,
            twin.lora_magnitude_vector["default"].weight, twin.base_layer.bias if bias else None,
        ),
    ]  # fmt: skip
    # fp32 sums over K=48 (+ r) terms of magnitude <= ~10, different op order (PEFT:
    # base + (g-1)*base + g*lora; ours: g*(base+lora)): 3e-5 is ~60 ulp of the output.
    assert_close_to(ya, yb, 3e-5, "output vs PEFT")
    y64, leaves = dora_float64(x, layer.weight, layer.lora_A, layer.lora_B, layer.lora_magnitude, layer.scaling, layer.bias)
    y64.backward(dy.double())
    assert_close_to(ya, y64, 3e-5, "output vs float64")  # same reason: fp32 rounding only
    # Gradients are sums over up to M=33 rows (dA, dB, dm, dbias) or N=40 columns (dx) of
    # such products: 2e-4 is ~2x the worst fp32 accumulation error seen, far below |grad| ~ 10.
    names = ["dx", "dA", "dB", "dmagnitude", "dbias"]
    for name, a, b, c in zip(names, ours, theirs, [t.grad if t is not None else None for t in leaves]):
        if a is None:
            assert b is None and c is None, name
            continue
        assert_close_to(a, b, 2e-4, f"{name} vs PEFT")
        assert_close_to(a, c, 2e-4, f"{name} vs float64")


def test_float64_layer_is_exact_to_float64_rounding():
    _, layer = dora_layer(dtype=torch.float64, r=4)
    layer.bias.requires_grad_(True)
    x = torch.randn(5, 48, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    y64, leaves = dora_float64(x, layer.weight, layer.lora_A, layer.lora_B, layer.lora_magnitude, layer.scaling, layer.bias)
    y64.backward(dy)
    # float64 end to end; only the op order and the norm identity differ: 1e-12 ~ 5000 ulp of |y| ~ 1.
    assert_close_to(y, y64, 1e-12, "fp64 output")
    for name, a, b in zip(["dx", "dA", "dB", "dm", "dbias"], [x.grad, *grads_of(layer.lora_A, layer.lora_B, layer.lora_magnitude, layer.bias)], [t.grad for t in leaves]):
        assert_close_to(a, b, 1e-11, name)  # same reason, grads are sums of ~50 such terms


def test_fresh_layer_computes_its_base_and_magnitude_is_peft_init():
    torch.manual_seed(0)
    base = nn.Linear(32, 16)
    layer = DoRALinear.from_linear(base, r=4, alpha=8)
    # B = 0: m = ||W||_row exactly (the same fp32 reduction PEFT uses at init).
    twin = peft.get_peft_model(
        nn.Sequential(nn.Linear(32, 16)), peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["0"])
    ).base_model.model[0]
    with torch.no_grad():
        twin.base_layer.weight.copy_(base.weight)
        twin.lora_magnitude_vector["default"].update_layer(
            base_layer=twin.base_layer, lora_A=twin.lora_A["default"].weight, lora_B=twin.lora_B["default"].weight,
            scaling=twin.scaling["default"],
        )  # fmt: skip
    assert_close_to(layer.lora_magnitude, twin.lora_magnitude_vector["default"].weight, 1e-6, "magnitude init")  # fp32 norm, 1 ulp-ish
    x = torch.randn(5, 32)
    # m / ||W|| is 1 up to one rounding of the division: the output is the base's within a few ulp.
    assert_close_to(layer(x), base(x), 2e-6, "fresh layer vs base")
    built = DoRALinear(32, 16, r=4)  # the constructor path initialises m too (B = 0: ||W||)
    assert torch.equal(built.lora_magnitude, built.weight.norm(dim=1))
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B", "lora_magnitude"}
    assert count_parameters(layer) == (4 * 32 + 16 * 4 + 16, 4 * 32 + 16 * 4 + 16 + 16 * 32 + 16)


def test_dropout_in_training_scales_the_fused_lora_output():
    """Our documented semantics with dropout (PEFT's differs, see fastlora.dora):
    y = m / ||W + sBA|| * lora_linear(x, W, A, B, s, dropout) + bias, same seed -> same mask."""
    _, layer = dora_layer(dropout=0.3)
    x = torch.randn(7, 48)
    torch.manual_seed(123)
    y = layer(x)
    torch.manual_seed(123)
    y_pre = lora_linear(x, layer.weight, layer.lora_A, layer.lora_B, layer.scaling, dropout=0.3, training=True)
    w = layer.weight.double() + layer.scaling * layer.lora_B.double() @ layer.lora_A.double()
    g = layer.lora_magnitude.double() / w.norm(dim=1)
    # fp32 product of two fp32 values plus a bias: a few ulp of |y| ~ 5.
    assert_close_to(y, g * y_pre.double() + layer.bias.double(), 1e-5, "dropout semantics")
    y.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in (layer.lora_A, layer.lora_B, layer.lora_magnitude))


def test_fp32_adapters_on_a_bf16_base():
    base = nn.Linear(32, 16, dtype=torch.bfloat16)
    layer = DoRALinear.from_linear(base, r=4)
    layer.lora_A.data = layer.lora_A.data.float()
    layer.lora_B.data = torch.randn(16, 4)
    layer.lora_magnitude.data = layer.lora_magnitude.data.float()
    y = layer(torch.randn(3, 32, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in (layer.lora_A, layer.lora_B, layer.lora_magnitude))


# -- the fused op (DoRALinearFunction) vs the composed form ---------------------------


def composed_dora(x, layer, dropout_training=True):
    """DoRA as plain autograd ops around the LoRA op (the path before the fused op;
    still QDoRA's and autocast's): lora_linear, then y_pre * (m / norm) + bias."""
    y_pre = lora_linear(x, layer.weight, layer.lora_A, layer.lora_B, layer.scaling, None,
                        dropout=layer.dropout, training=dropout_training)  # fmt: skip
    norm = layer.weight_norm()
    scale = (layer.lora_magnitude.to(norm.dtype) / norm).to(y_pre.dtype)
    return y_pre * scale if layer.bias is None else torch.addcmul(layer.bias.to(y_pre.dtype), y_pre, scale)


def mixed_or(dtype_name):
    """(layer dtype, adapters' dtype) of a dtype case: 'mixed' = a bf16 base with fp32 adapters."""
    return {"fp32": (torch.float32, torch.float32), "bf16": (torch.bfloat16, torch.bfloat16),
            "mixed": (torch.bfloat16, torch.float32)}[dtype_name]  # fmt: skip


def dora_case(dtype_name, bias=True, dropout=0.0):
    dtype, adapter_dtype = mixed_or(dtype_name)
    _, layer = dora_layer(bias=bias, dropout=dropout, dtype=dtype)
    if adapter_dtype != dtype:
        for name in ("lora_A", "lora_B", "lora_magnitude"):
            getattr(layer, name).data = getattr(layer, name).data.to(adapter_dtype)
    if bias:
        layer.bias.requires_grad_(True)
    return layer.train()


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16", "mixed"])
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["p0", "p0.3"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_fused_reference_path_equals_the_composed_path(dtype_name, dropout, bias):
    layer = dora_case(dtype_name, bias, dropout)
    dtype = layer.weight.dtype
    x = torch.randn(3, 11, 48).to(dtype)
    dy = torch.randn(3, 11, 40).to(dtype)
    params = [layer.lora_A, layer.lora_B, layer.lora_magnitude] + ([layer.bias] if bias else [])
    runs = []
    for fn in (layer, lambda xx: composed_dora(xx, layer)):
        xx = x.clone().requires_grad_(True)
        for p in params:
            p.grad = None
        torch.manual_seed(5)  # the same dropout seed drawn by both
        y = fn(xx)
        y.backward(dy)
        runs.append([y.detach(), xx.grad] + [p.grad for p in params])
    (y_f, *g_f), (y_c, *g_c) = runs
    # Same ops on the same values (reference.dora_forward = lora_forward, then addcmul
    # with g rounded to y's dtype, as the composed form): identical outputs.
    assert_close_to(y_f, y_c, 0.0, "fused vs composed output")
    # dZ = dY * g is the composed form's dY_pre exactly, so dx, dA, dB, dbias are the
    # same ops too: identical.
    for name, a, b in zip(["dx", "dA", "dB"], g_f, g_c):
        assert_close_to(a, b, 0.0, f"{name} fused vs composed")
    if bias:
        assert_close_to(g_f[4], g_c[4], 0.0, "dbias fused vs composed")
    # dm: the fused sum runs in fp32 and is divided once; the composed one (autograd's
    # sum of dY * Y_pre) is rounded to y's dtype first: at most one rounding of that
    # dtype (2x for slack) relative to max|dm|.
    eps = torch.finfo(dtype).eps
    assert_close_to(g_f[2], g_c[2], 2 * eps * g_c[2].abs().max().item(), "dm fused vs composed")


@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["p0", "p0.3"])
def test_fused_reference_path_vs_float64(dropout):
    """Through DoRALinearFunction (reference backend), with the reference's own
    dropout mask in the float64 oracle."""
    layer = dora_case("fp32", True, dropout)
    x = torch.randn(33, 48, requires_grad=True)
    torch.manual_seed(9)
    seed = fastlora.functional.new_dropout_seed()  # what the layer draws next
    torch.manual_seed(9)
    y = layer(x)
    assert type(y.grad_fn).__name__ == "DoRALinearFunctionBackward", type(y.grad_fn).__name__
    dy = torch.randn_like(y)
    y.backward(dy)
    if dropout:
        mask, keep = fastlora.reference.dropout_keep_mask(seed, (33, 48), dropout, x.device)
    else:
        mask, keep = torch.ones(33, 48, dtype=torch.bool), 1.0
    leaves = [t.detach().double().requires_grad_(True) for t in (x, layer.lora_A, layer.lora_B, layer.lora_magnitude, layer.bias)]
    x64, a64, b64, m64, bias64 = leaves
    w64 = layer.weight.double()
    norm = (w64 + layer.scaling * b64 @ a64).norm(dim=1).detach()
    y64 = (m64 / norm) * (x64 @ w64.t() + layer.scaling * ((x64 * mask / keep) @ a64.t()) @ b64.t()) + bias64
    y64.backward(dy.double())
    assert_close_to(y, y64, 3e-5, "fused output vs float64")  # as test_matches_peft...: fp32 rounding only
    ours = [x.grad, layer.lora_A.grad, layer.lora_B.grad, layer.lora_magnitude.grad, layer.bias.grad]
    for name, a, b in zip(["dx", "dA", "dB", "dm", "dbias"], ours, [t.grad for t in leaves]):
        assert_close_to(a, b, 2e-4, f"{name} vs float64")  # as test_matches_peft...: fp32 sums over M=33 / N=40


def _nbytes(t):
    return t.numel() * t.element_size()


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16", "mixed"])
@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["p0", "p0.1"])
@pytest.mark.parametrize("lead", [(37,), (3, 13)], ids=["2d", "3d"])
def test_saved_bytes_are_x_s_z_and_the_norm(dtype_name, dropout, lead):
    """What DoRA keeps for backward, counted per distinct storage with saved-tensor
    hooks (parameters excluded): x itself, S [M, r] (adapters' dtype on the reference
    path), z [M, N] (x's dtype) and the norm [N] (fp32), nothing else."""
    layer = dora_case(dtype_name, True, dropout)
    dtype = layer.weight.dtype
    x = torch.randn(*lead, 48).to(dtype).requires_grad_(True)
    m, n = x.numel() // 48, 40
    params = {t.untyped_storage().data_ptr() for t in list(layer.parameters()) + list(layer.buffers())}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in saved:
            saved[ptr] = (t.untyped_storage().nbytes(), tuple(t.shape), t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    s_bytes = m * layer.r * layer.lora_A.element_size()
    expected = _nbytes(x) + s_bytes + m * n * x.element_size() + n * 4
    assert sum(b for b, _, _ in saved.values()) == expected, f"saved {list(saved.values())}, expected {expected} B"
    assert x.untyped_storage().data_ptr() in saved, "x's own storage (not a copy) must be what is saved"
    assert {(shape, dt) for _, shape, dt in saved.values()} >= {((m, n), dtype), ((n,), torch.float32)}
    y.float().sum().backward()  # the recorded graph is still usable


@pytest.mark.parametrize("ranks", [(8, 4)], ids=["two-scalings"])
def test_compiled_fused_dora_gradients_match_eager(ranks):
    """Under torch.compile the fused op runs as the custom op fastlora::dora_fwd (and
    fastlora::lora_bwd): the same values and gradients as eager. The second layer has
    another scaling, so the recompiled graph gets it as a symbolic float."""
    torch._dynamo.reset()
    for r in ranks:
        _, layer = dora_layer(r=r, alpha=16.0)
        layer.bias.requires_grad_(True)
        x = torch.randn(5, 48)
        dy = torch.randn(5, 40)
        params = [layer.lora_A, layer.lora_B, layer.lora_magnitude, layer.bias]
        runs = []
        for module in (layer, torch.compile(layer, fullgraph=True)):
            xx = x.clone().requires_grad_(True)
            for p in params:
                p.grad = None
            y = module(xx)
            y.backward(dy)
            runs.append([y.detach(), xx.grad] + [p.grad for p in params])
        for name, a, b in zip(["y", "dx", "dA", "dB", "dm", "dbias"], *runs):
            assert_close_to(a, b, 1e-5, f"compiled {name} (r={r})")  # inductor may reorder fp32 elementwise ops: a few ulp
    torch._dynamo.reset()  # no compiled DoRA graphs left for later tests


# -- the row norm without B @ A ------------------------------------------------------


@pytest.mark.parametrize("shape", [(40, 48, 8), (33, 17, 1), (64, 128, 16)], ids=["40x48r8", "33x17r1", "64x128r16"])
def test_norm_identity_vs_materialized_norm(shape):
    n, k, r = shape
    g = torch.Generator().manual_seed(1)
    w = torch.randn(n, k, generator=g, dtype=torch.float64) / k**0.5
    a = torch.randn(r, k, generator=g, dtype=torch.float64) / k**0.5
    b = torch.randn(n, r, generator=g, dtype=torch.float64)
    s = 1.7
    want = (w + s * b @ a).norm(dim=1)
    got = dora_row_norm(w, a, b, s)
    assert got.dtype == torch.float64
    # Exact identity; the terms are O(1) and the norms O(1): 1e-13 is a few hundred fp64 ulp.
    assert_close_to(got, want, 1e-13, "fp64 norm identity")
    got32 = dora_row_norm(w.float(), a.float(), b.float(), s)
    # fp32 inputs and accumulation: relative error ~ K * eps32 (1.2e-7) on O(1) norms.
    assert_close_to(got32, want, k * 2.4e-7, "fp32 norm identity")
    assert_close_to(dora_row_norm(w, a, b, s, weight_sq_norm(w, torch.float64)), want, 1e-13, "with a cached ||W||^2")


def test_chunked_dequantization_is_bit_identical(monkeypatch):
    """QDoRA's row chunks: odd K (chunks start mid-byte) and blocks that cross rows."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(37, 33, generator=g)
    qw = quantize_4bit(w, "nf4", blocksize=64, double_quant=True)
    monkeypatch.setattr(dora_mod, "_CHUNK_ELEMENTS", 100)  # 3 rows per chunk: 13 chunks
    full = dequantize_4bit(qw, torch.float32)
    chunks = torch.cat([rows for _, _, rows in dora_mod._row_chunks(qw, torch.float32)])
    assert torch.equal(chunks, full)
    # Same rows, same fp32 reduction order per row as the dense path: identical.
    assert torch.equal(weight_sq_norm(qw), weight_sq_norm(full))
    a, b = torch.randn(4, 33, generator=g), torch.randn(37, 4, generator=g)
    want = (full.double() + 0.5 * b.double() @ a.double()).norm(dim=1)
    assert_close_to(dora_row_norm(qw, a, b, 0.5), want, 33 * 2.4e-7 * want.max().item(), "4-bit norm")  # fp32, as above


class _AllocationLog(TorchDispatchMode):
    """Records (numel, data_ptr) of every tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.outputs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.outputs.append((func, t.numel(), t.untyped_storage().data_ptr()))
        return out


def test_no_n_by_k_temporary_or_saved_tensor_per_step():
    """No op of a DoRA step (forward, backward) returns a fresh tensor of N*K elements,
    and nothing of N*K elements but the frozen weight itself is saved for backward.
    (The weight is saved by reference; views of it share its storage.)"""
    n, k, m, r = 24, 40, 7, 4  # N*K = 960 differs from every other size in the step
    _, layer = dora_layer(k=k, n=n, r=r)
    x = torch.randn(m, k, requires_grad=True)
    layer(x)  # the first call caches ||W||^2 (from the weight itself: fp32, no copy either)
    weight_ptr = layer.weight.untyped_storage().data_ptr()
    saved = []

    def pack(t):
        saved.append((t.numel(), t.untyped_storage().data_ptr()))
        return t

    log = _AllocationLog()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), log:
        y = layer(x)
        y.backward(torch.randn_like(y))
    fresh = [(str(f), numel) for f, numel, ptr in log.outputs if numel == n * k and ptr != weight_ptr]
    assert not fresh, f"[N, K] temporaries allocated in a DoRA step: {fresh}"
    assert all(ptr == weight_ptr for numel, ptr in saved if numel == n * k), saved
    # What is saved, honestly: x [M, K], the weight (by reference), A, B, S [M, r], the
    # [M, N] pre-scale output (for dm) and the [N] scale; nothing larger than x.
    sizes = {numel for numel, ptr in saved if ptr != weight_ptr}
    assert m * n in sizes and max(sizes) == m * k, sorted(sizes)


# -- merge / unmerge / to_linear -----------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_merge_unmerge_to_linear_agree_with_peft(dtype):
    base, layer = dora_layer(dtype=dtype)
    twin = peft_dora_twin(layer)
    w0 = layer.weight.detach().clone()
    x = torch.randn(6, 48, dtype=dtype)
    y_unmerged = layer(x).detach()
    plain = layer.to_linear()
    assert type(plain) is nn.Linear and torch.equal(layer.weight, w0)
    layer.merge()
    twin.merge()
    assert layer.merged and base.weight is layer.weight
    eps = torch.finfo(dtype).eps
    scale = layer.weight.abs().max().item()
    # Both compute m / ||W + sBA|| * (W + sBA); ours in fp32 (fp64) rounded once: a few ulp.
    assert_close_to(layer.weight, twin.base_layer.weight, 4 * eps * scale, "merged weight vs PEFT")
    assert_close_to(plain.weight, layer.weight, 0.0, "to_linear is the merged weight")
    y_merged = layer(x).detach()
    # Same math, different rounding order: a few ulp of the output magnitude times K.
    assert_close_to(y_merged, y_unmerged, 48 * eps * y_unmerged.abs().max().item(), "merged vs unmerged")
    assert_close_to(plain(x), y_merged, 0.0, "to_linear output")
    layer.unmerge()
    twin.unmerge()
    assert not layer.merged
    # W' / g - sBA: two roundings of O(1) values: 4 ulp.
    assert_close_to(layer.weight, w0, 4 * eps * scale, "unmerged weight")
    assert_close_to(layer.weight, twin.base_layer.weight, 4 * eps * scale, "unmerged vs PEFT")


def test_merge_lora_on_a_model():
    model = apply_lora(nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8)), r=4, use_dora=True)
    assert all(type(m) is DoRALinear for m in lora_layers(model).values())
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0, 0.3)
            layer.lora_magnitude.mul_(1.2)
    x = torch.randn(4, 16)
    y = model(x).detach()
    fastlora.merge_lora(model)
    assert not lora_layers(model)
    assert_close_to(model(x), y, 2e-6, "merge_lora")  # fp32 rounding order only


# -- QDoRA ---------------------------------------------------------------------------


def qdora_layer(bias=True, quant_type="nf4", seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(48, 40, bias=bias)
    layer = QDoRALinear.from_linear(base, r=8, alpha=16, quant_type=quant_type)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.5)
        layer.lora_magnitude.mul_(torch.rand(40) + 0.5)
    return base, layer


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_qdora_matches_float64_formula_on_the_dequantized_weight(bias, quant_type):
    _, layer = qdora_layer(bias=bias, quant_type=quant_type)
    if bias:
        layer.bias.requires_grad_(True)
    w = layer.dequantized_weight(torch.float32)
    x = torch.randn(9, 48, requires_grad=True)
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    y64, leaves = dora_float64(x, w, layer.lora_A, layer.lora_B, layer.lora_magnitude, layer.scaling, layer.bias)
    y64.backward(dy.double())
    assert_close_to(y, y64, 3e-5, "QDoRA output")  # fp32 rounding (as the dense test)
    ours = [x.grad, *grads_of(layer.lora_A, layer.lora_B, layer.lora_magnitude, layer.bias if bias else None)]
    for name, a, b in zip(["dx", "dA", "dB", "dm", "dbias"], ours, [t.grad if t is not None else None for t in leaves]):
        if a is not None:
            assert_close_to(a, b, 2e-4, name)  # as the dense test


def test_qdora_magnitude_init_merge_and_apply_lora():
    torch.manual_seed(0)
    base = nn.Linear(48, 40)
    fresh = QDoRALinear.from_linear(base, r=4)
    w = fresh.dequantized_weight(torch.float32)
    assert_close_to(fresh.lora_magnitude, w.norm(dim=1), 2e-6, "QDoRA magnitude init")  # fp32 norm, ~2 ulp of ~3
    _, layer = qdora_layer()
    x = torch.randn(5, 48)
    plain = layer.to_linear()
    assert type(plain) is nn.Linear
    assert_close_to(plain(x), layer(x), 1e-5, "QDoRA to_linear")  # fp32 rounding order only
    # merge_and_quantize re-quantizes the DoRA target; the merged forward must not scale again.
    layer.merge_and_quantize()
    want = torch.nn.functional.linear(x, layer.dequantized_weight(torch.float32), layer.bias)
    assert_close_to(layer(x), want, 0.0, "merged QDoRA forward is the plain 4-bit layer")
    assert_close_to(layer.to_linear()(x), want, 1e-5, "QDoRA to_linear once merged")  # fp32 op order
    model = apply_lora(nn.Sequential(nn.Linear(16, 12)), r=2, use_dora=True, quantize="nf4")
    assert type(model[0]) is QDoRALinear and "dora=True" in repr(model[0])


# -- adapter files -------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 32))
        self.q_proj = nn.Linear(32, 32, bias=False)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        return self.head(torch.relu(self.q_proj(self.encoder(x))))


def base_net() -> Net:
    torch.manual_seed(0)
    return Net()


def randomize(layers):
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in layers:
            layer.lora_B.normal_(0, 0.3)
            layer.lora_magnitude.mul_(torch.rand_like(layer.lora_magnitude) + 0.5)


# fp32 forward through three small layers, same math in a different op order.
TOL = 2e-5


@pytest.mark.parametrize("rslora", [False, True])
def test_saved_dora_adapter_loads_in_peft_with_the_same_outputs(tmp_path, rslora):
    model = apply_lora(base_net(), r=4, alpha=8.0, use_rslora=rslora, use_dora=True, target_modules=["q_proj", "encoder.2"])
    randomize(lora_layers(model).values())
    save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True
    keys = set(safetensors_torch.load_file(str(tmp_path / "adapter_model.safetensors")))
    assert "base_model.model.q_proj.lora_magnitude_vector" in keys  # PEFT's key: no ".weight"
    assert "base_model.model.encoder.2.lora_magnitude_vector" in keys and len(keys) == 6
    theirs = peft.PeftModel.from_pretrained(base_net(), str(tmp_path)).eval()
    model.eval()
    x = torch.randn(6, 24)
    assert_close_to(model(x), theirs(x), TOL, "fastlora-saved DoRA adapter in PEFT")


def test_peft_dora_adapter_loads_in_fastlora_with_the_same_outputs(tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "head"])
    theirs = peft.get_peft_model(base_net(), config)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
            elif "lora_magnitude_vector" in name:
                p.mul_(torch.rand_like(p) + 0.5)
    theirs.save_pretrained(str(tmp_path))
    ours = load_adapter(base_net(), tmp_path)
    layers = lora_layers(ours)
    assert set(layers) == {"q_proj", "head"} and all(type(m) is DoRALinear for m in layers.values())
    assert all(m.lora_magnitude.requires_grad for m in layers.values())
    theirs.eval()
    ours.eval()
    x = torch.randn(6, 24)
    assert_close_to(ours(x), theirs(x), TOL, "PEFT DoRA adapter in fastlora")
    # Round trip: fastlora saves what it loaded, byte-for-byte the same tensors.
    save_adapter(ours, tmp_path / "again")
    a = safetensors_torch.load_file(str(tmp_path / "adapter_model.safetensors"))
    b = safetensors_torch.load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dora_adapter_into_existing_lora_and_qlora_layers(tmp_path):
    model = apply_lora(base_net(), r=4, use_dora=True)
    randomize(lora_layers(model).values())
    save_adapter(model, tmp_path)
    plain = apply_lora(base_net(), r=4)  # LoRA layers of the same rank become DoRA layers
    load_adapter(plain, tmp_path)
    assert all(type(m) is DoRALinear for m in lora_layers(plain).values())
    x = torch.randn(3, 24)
    assert_close_to(plain(x), model(x), 0.0, "same weights, same op")
    quant = apply_lora(base_net(), r=4, quantize="nf4")
    load_adapter(quant, tmp_path)
    assert all(type(m) is QDoRALinear for m in lora_layers(quant).values())
    for name, layer in lora_layers(model).items():
        assert torch.equal(quant.get_submodule(name).lora_magnitude, layer.lora_magnitude)


# -- bad configurations ----------------------------------------------------------------


def test_bad_configurations_are_clear_errors(tmp_path):
    with pytest.raises(TypeError, match="use_dora must be True or False"):
        LoRAConfig(use_dora="yes")
    _, layer = dora_layer()
    with pytest.raises(ValueError, match=r"magnitude must have shape \[40\] \(out_features\), got \(39,\)"):
        dora_linear(torch.randn(2, 48), layer.weight, layer.lora_A, layer.lora_B, torch.ones(39), 1.0)
    model = apply_lora(base_net(), r=4, use_dora=True, target_modules=["q_proj"])
    apply_lora(model, r=4, target_modules=["head"])
    with pytest.raises(ValueError, match="one use_dora per adapter"):
        save_adapter(model, tmp_path / "mixed")


def saved_dora(tmp_path):
    model = apply_lora(base_net(), r=4, use_dora=True)
    save_adapter(model, tmp_path)
    return tmp_path / "adapter_config.json", tmp_path / "adapter_model.safetensors"


@pytest.mark.parametrize(
    "how, message",
    [
        ("missing magnitude", r"missing keys \['base_model.model.q_proj.lora_magnitude_vector'\]"),
        ("wrong magnitude shape", r"q_proj.lora_magnitude_vector has shape \(31,\); the layer q_proj \(DoRALinear, r=4\) needs \(32,\)"),
        ("magnitude without use_dora", "lora_magnitude_vector entries need use_dora=true"),
        ("use_dora not a bool", "use_dora must be true or false"),
        ("nan magnitude", "contains NaN or infinite values"),
    ],
)
def test_bad_dora_adapter_files(tmp_path, how, message):
    cfg_file, weights_file = saved_dora(tmp_path)
    cfg = json.loads(cfg_file.read_text())
    tensors = safetensors_torch.load_file(str(weights_file))
    key = "base_model.model.q_proj.lora_magnitude_vector"
    if how == "missing magnitude":
        del tensors[key]
    elif how == "wrong magnitude shape":
        tensors[key] = torch.ones(31)
    elif how == "magnitude without use_dora":
        cfg["use_dora"] = False
    elif how == "use_dora not a bool":
        cfg["use_dora"] = "yes"
    elif how == "nan magnitude":
        tensors[key] = torch.full((32,), float("nan"))
    cfg_file.write_text(json.dumps(cfg))
    safetensors_torch.save_file(tensors, str(weights_file))
    target = base_net()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(AdapterFormatError, match=message):
        load_adapter(target, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())  # untouched


# -- the Triton kernels under the interpreter ---------------------------------------


@pytest.mark.interpreter
def test_dora_on_the_triton_backend_matches_the_reference():
    _, layer = dora_layer(k=40, n=36, r=4)
    x = torch.randn(20, 40)
    outs = []
    for backend in ("triton", "reference"):
        fastlora.set_backend(backend)
        layer.zero_grad()
        xx = x.clone().requires_grad_(True)
        y = layer(xx)
        y.backward(torch.ones_like(y))
        outs.append([y.detach(), xx.grad, layer.lora_A.grad, layer.lora_B.grad, layer.lora_magnitude.grad])
    for name, a, b in zip(["y", "dx", "dA", "dB", "dm"], *outs):
        assert_close_to(a, b, 1e-4, name)  # fp32 kernels vs fp32 reference: tile-order rounding over K=40 / M=20


# -- interplay: inits, autocast, torch.compile ----------------------------------------


@pytest.mark.skipif("olora" not in fastlora.modules.INITS, reason="needs the PiSSA/OLoRA inits")
@pytest.mark.parametrize("init", ["olora", "pissa"])
def test_magnitude_follows_weight_based_inits(init):
    """With PiSSA/OLoRA the base weight becomes the residual W - sBA; PEFT's m is then
    ||residual + sBA|| = ||W|| (up to rounding), so the fresh layer still computes its base."""
    torch.manual_seed(0)
    base = nn.Linear(32, 24)
    w0, x = base.weight.detach().clone(), torch.randn(5, 32)
    y0 = base(x).detach()
    layer = DoRALinear.from_linear(base, r=4, alpha=8, init=init)
    # residual + s B A reassembles W in fp32: ~1 ulp per element of |W| <= 0.18, norms ~ 1.
    assert_close_to(layer.lora_magnitude, w0.norm(dim=1), 1e-6, "magnitude after init")
    assert_close_to(layer(x), y0, 1e-5, "fresh layer vs base")  # fp32 rounding of the reassembly


def test_autocast_bf16():
    _, layer = dora_layer()
    x = torch.randn(4, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    # x, W, A, B rounded to bf16 (2^-9 relative each), then the output and the scale
    # rounded to bf16: ~4 roundings of 2^-8 relative to max|y| (seen: ~1.1 of them).
    want = layer(x)
    assert_close_to(y, want, 4 * 2**-8 * want.abs().max().item(), "autocast output")


def test_torch_compile_fullgraph_matches_eager():
    _, layer = dora_layer(k=32, n=16, r=4)
    x = torch.randn(5, 32)
    compiled = torch.compile(layer, fullgraph=True)
    y = compiled(x)
    assert_close_to(y, layer(x), 1e-5, "compiled")  # inductor reorders fp32 ops: a few ulp
    y.sum().backward()
    assert torch.isfinite(layer.lora_magnitude.grad).all()


def test_qdora_matches_peft_dora_on_a_bitsandbytes_4bit_base():
    bnb = pytest.importorskip("bitsandbytes", reason="needs bitsandbytes >= 0.50 (pip install 'fastlora[test]')")

    def bnb_model():
        torch.manual_seed(0)
        lin = nn.Linear(128, 64)  # in_features a multiple of the blocksize (see test_peft_4bit)
        l4 = bnb.nn.Linear4bit(128, 64, compute_dtype=torch.float32, quant_type="nf4")
        l4.load_state_dict(lin.state_dict())
        return nn.Sequential(l4.to("cpu"))

    theirs = peft.get_peft_model(bnb_model(), peft.LoraConfig(r=8, lora_alpha=16, use_dora=True, target_modules=["0"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
            elif "lora_magnitude_vector" in name:
                p.mul_(torch.rand_like(p) + 0.5)
    ours = apply_lora(bnb_model(), r=8, alpha=16, use_dora=True)
    layer = ours[0]
    assert type(layer) is QDoRALinear
    src = theirs.base_model.model[0]
    with torch.no_grad():
        layer.lora_A.copy_(src.lora_A["default"].weight)
        layer.lora_B.copy_(src.lora_B["default"].weight)
        layer.lora_magnitude.copy_(src.lora_magnitude_vector["default"].weight)
    theirs.eval()
    ours.eval()
    x = torch.randn(9, 128)
    # An input that requires grad keeps bitsandbytes off its CPU inference repack
    # (bf16 absmax), so PEFT's output is on the exact 4-bit weights.
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = ours(xa), theirs(xb)
    dy = torch.randn_like(ya)
    ya.backward(dy)
    yb.backward(dy)
    # Both on identical dequantized values, fp32, K=128: ~1e-5 relative to |y| ~ 1.
    assert_close_to(ya, yb, 2e-5, "QDoRA vs PEFT DoRA on Linear4bit")
    assert_close_to(xa.grad, xb.grad, 2e-5, "dx")
    for name, a, b in [
        ("dA", layer.lora_A.grad, src.lora_A["default"].weight.grad),
        ("dB", layer.lora_B.grad, src.lora_B["default"].weight.grad),
        ("dm", layer.lora_magnitude.grad, src.lora_magnitude_vector["default"].weight.grad),
    ]:
        assert_close_to(a, b, 1e-4, name)  # sums over M=9 rows of fp32 products, |grad| ~ 1-10


@pytest.mark.interpreter
def test_qdora_row_norm_on_the_dequant_in_gemm_kernel():
    """On the Triton backend A deq(W)^T comes from the dequant-in-GEMM kernel; the
    norms must equal the chunked-dequantization path (float64 oracle of both)."""
    from fastlora.dora import dora_row_norm
    from fastlora.quant import dequantize_4bit, quantize_4bit

    torch.manual_seed(3)
    qw = quantize_4bit(torch.randn(40, 96), quant_type="nf4", blocksize=64, double_quant=True)
    a, b = torch.randn(4, 96) / 10, torch.randn(40, 4) / 2
    got = dora_row_norm(qw, a, b, 2.0)  # backend forced to triton by conftest
    w = dequantize_4bit(qw, torch.float64)
    want = torch.linalg.vector_norm(w + 2.0 * b.double() @ a.double(), dim=1)
    # fp32 GEMM over K=96 then the identity's sums: ~1e-6 relative on norms of ~10.
    assert_close_to(got, want, 1e-5 * want.abs().max().item(), "QDoRA row norms (kernel)")
