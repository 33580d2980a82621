"""PiSSA and OLoRA initialisations against PEFT's (``init_lora_weights="pissa"`` /
``"pissa_niter_<N>"`` / ``"olora"``) on the same base weights, and against the
original layer's output."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fastlora import LoRAConfig, LoRALinear, apply_lora
from fastlora.modules import check_init

from _oracles import assert_close_to

peft = pytest.importorskip("peft", reason="PEFT parity tests need peft (pip install 'fastlora[test]')")

WEIGHT_INITS = ["pissa", "olora"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (in, out, r, alpha): a power-of-two shape and a ragged one with out > in.
SHAPES = [(64, 32, 8, 16.0), (33, 70, 5, 5.0)]


def base_linear(k, n, dtype, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias, dtype=dtype)


def peft_layer(base: nn.Linear, r, alpha, init, rslora=False):
    """PEFT's LoRA layer around ``base`` (PEFT modifies ``base.weight`` in place too)."""
    config = peft.LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, init_lora_weights=init, target_modules=["0"])
    return peft.get_peft_model(nn.Sequential(base), config).base_model.model[0]


def exact_output(linear: nn.Linear, x):
    """The original layer's output in float64."""
    y = x.double() @ linear.weight.double().T
    return y + linear.bias.double() if linear.bias is not None else y


def assert_keeps_output(layer, original, x, what):
    """The initialised layer computes the original layer up to rounding: its error
    against the float64 output is at most c x the original layer's own error."""
    exact = exact_output(original, x)
    own = (original(x).double() - exact).abs().max().item()
    # fp32: one pass over ~K fp32 products, like the base layer -> 2x its error
    # (CONTRIBUTING.md, Tolerances). fp16/bf16: the residual, A and B are each rounded to
    # the low precision and the LoRA branch adds two rounded products, where the
    # base layer rounds once: measured up to 3.2x, so 4x.
    factor = 2.0 if x.dtype in (torch.float32, torch.float64) else 4.0
    assert_close_to(layer(x), exact, factor * own, what)


@pytest.mark.parametrize("k,n,r,alpha", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("init", WEIGHT_INITS)
def test_matches_peft_adapters_and_residual(init, dtype, k, n, r, alpha):
    base = base_linear(k, n, dtype)
    original = copy.deepcopy(base)
    twin = peft_layer(copy.deepcopy(base), r, alpha, init)
    layer = LoRALinear.from_linear(base, r=r, alpha=alpha, init=init)
    assert layer.lora_A.shape == (r, k) and layer.lora_B.shape == (n, r) and layer.lora_A.dtype == dtype
    # Same torch ops (linalg.svd / linalg.qr in float32, then the same products in
    # the same order) on the same input, rounded once to the same dtype: PEFT
    # keeps fp16/bf16 adapters in float32 (autocast_adapter_dtype) but holds
    # values first rounded to the base dtype, so everything agrees bit for bit.
    assert_close_to(layer.lora_A, twin.lora_A["default"].weight, 0.0, "lora_A vs PEFT")
    assert_close_to(layer.lora_B, twin.lora_B["default"].weight, 0.0, "lora_B vs PEFT")
    assert_close_to(layer.weight, twin.base_layer.weight, 0.0, "residual weight vs PEFT")
    assert layer.weight.dtype == dtype and layer.weight is base.weight  # residual written into the shared weight
    assert not torch.equal(base.weight, original.weight)
    assert layer.bias is base.bias and torch.equal(base.bias, original.bias)  # bias untouched
    x = torch.randn(64, k).to(dtype)
    assert_keeps_output(layer, original, x, f"{init} output vs original layer")
    if dtype == torch.float32:
        # Same weights, both fp32; ours fuses the LoRA branch differently: ~10 ulp of |y| <= ~10.
        assert_close_to(layer(x), twin(x), 1e-5, "output vs PEFT")
    else:  # PEFT computes the LoRA branch in fp32 here, we in the base dtype; both keep the output
        assert_keeps_output(twin, original, x, f"PEFT {init} output vs original layer")


@pytest.mark.parametrize("init", WEIGHT_INITS)
def test_rslora_and_no_bias_match_peft(init):
    base = base_linear(40, 24, torch.float32, bias=False)
    twin = peft_layer(copy.deepcopy(base), 4, 12.0, init, rslora=True)
    layer = LoRALinear.from_linear(base, r=4, alpha=12.0, use_rslora=True, init=init)
    assert layer.scaling == pytest.approx(twin.scaling["default"])
    assert_close_to(layer.lora_A, twin.lora_A["default"].weight, 0.0, "lora_A vs PEFT")  # same ops, see above
    assert_close_to(layer.lora_B, twin.lora_B["default"].weight, 0.0, "lora_B vs PEFT")
    assert_close_to(layer.weight, twin.base_layer.weight, 0.0, "residual vs PEFT")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_pissa_niter_matches_peft_with_the_same_random_draws(dtype, monkeypatch):
    # torch.svd_lowrank draws a random test matrix from the global RNG; PEFT draws
    # other numbers before it (nn.Linear init of the adapters), so reseed right
    # before each call to give both the same draw.
    svd_lowrank = torch.svd_lowrank

    def seeded(*args, **kwargs):
        torch.manual_seed(1234)
        return svd_lowrank(*args, **kwargs)

    monkeypatch.setattr(torch, "svd_lowrank", seeded)
    monkeypatch.setattr(peft.tuners.lora.layer, "svd_lowrank", seeded)
    base = base_linear(64, 48, dtype)
    original = copy.deepcopy(base)
    twin = peft_layer(copy.deepcopy(base), 8, 16.0, "pissa_niter_4")
    layer = LoRALinear.from_linear(base, r=8, alpha=16.0, init="pissa_niter_4")
    # Same draw and same ops: bit for bit (see test_matches_peft_adapters_and_residual).
    assert_close_to(layer.lora_A, twin.lora_A["default"].weight, 0.0, "lora_A vs PEFT")
    assert_close_to(layer.lora_B, twin.lora_B["default"].weight, 0.0, "lora_B vs PEFT")
    assert_close_to(layer.weight, twin.base_layer.weight, 0.0, "residual vs PEFT")
    assert_keeps_output(layer, original, torch.randn(32, 64).to(dtype), "pissa_niter_4 output")


def test_float64_keeps_output_and_factorisations_hold():
    # PEFT rejects float64 bases; we factorise in float64 there.
    base = base_linear(48, 40, torch.float64)
    w = base.weight.detach().clone()
    layer = LoRALinear.from_linear(copy.deepcopy(base), r=8, alpha=16.0, init="pissa")
    s = torch.linalg.svdvals(w)
    # PiSSA: s*B@A is the best rank-r approximation, so the residual carries the
    # remaining singular values; float64 SVD of a 40x48 matrix: ~1e-15 relative.
    assert_close_to(torch.linalg.svdvals(layer.weight)[: 40 - 8], s[8:], 1e-12, "residual singular values")
    assert_close_to(layer.delta_weight() + layer.weight, w, 1e-12, "W = residual + s*B@A")
    x = torch.randn(16, 48, dtype=torch.float64)
    # float64 throughout: rounding ~1e-16 of |y| <= ~10.
    assert_close_to(layer(x), exact_output(base, x), 1e-12, "pissa float64 output")
    olora = LoRALinear.from_linear(copy.deepcopy(base), r=8, alpha=16.0, init="olora")
    # OLoRA: B = Q[:, :r] has orthonormal columns, A = R[:r] is upper triangular.
    assert_close_to(olora.lora_B.T @ olora.lora_B, torch.eye(8, dtype=torch.float64), 1e-12, "Q^T Q")
    assert torch.equal(olora.lora_A[:, :8], olora.lora_A[:, :8].triu())
    assert_close_to(olora(x), exact_output(base, x), 1e-12, "olora float64 output")


@pytest.mark.parametrize("init", WEIGHT_INITS)
def test_apply_lora_matches_peft_model(init):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 24), nn.GELU(), nn.Linear(24, 8))
    original = copy.deepcopy(model)
    ref = peft.get_peft_model(
        copy.deepcopy(model),
        peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=init, target_modules=["0", "2"], rank_pattern={"2": 6}),
    )
    apply_lora(model, LoRAConfig(r=4, alpha=8, init=init, target_modules=["0", "2"], rank_pattern={"2": 6}))
    for i in ("0", "2"):
        ours, theirs = model.get_submodule(i), ref.base_model.model.get_submodule(i)
        assert_close_to(ours.lora_A, theirs.lora_A["default"].weight, 0.0, f"{i}.lora_A")  # same ops, see above
        assert_close_to(ours.lora_B, theirs.lora_B["default"].weight, 0.0, f"{i}.lora_B")
        assert_close_to(ours.weight, theirs.base_layer.weight, 0.0, f"{i}.weight")
    assert torch.equal(model[4].weight, original[4].weight)  # untargeted layer untouched
    x = torch.randn(16, 32)
    # fp32, three layers of |y| <= ~5: fused vs unfused rounding, ~10 ulp.
    assert_close_to(model(x), ref(x), 1e-5, "model output vs PEFT")
    assert_close_to(model(x), original(x), 1e-5, "model output vs original model")


def test_adapter_training_starts_from_the_principal_part():
    base = base_linear(32, 32, torch.float32)
    layer = LoRALinear.from_linear(base, r=4, alpha=4.0, init="pissa")
    layer(torch.randn(8, 32)).square().sum().backward()
    assert layer.lora_A.grad.abs().sum() > 0 and layer.lora_B.grad.abs().sum() > 0
    assert layer.weight.grad is None


def test_init_names_and_bad_arguments():
    for name in ("default", "gaussian", "pissa", "olora", "pissa_niter_0", "pissa_niter_16"):
        assert check_init(name) == name
        LoRAConfig(init=name)
    for name in ("pissa_niter_<N>", "pissa_niter_", "pissa_niter_x", "PISSA", "loftq"):
        with pytest.raises(ValueError, match="init must be one of"):
            check_init(name)
        with pytest.raises(ValueError, match="init must be one of"):
            LoRAConfig(init=name)
    with pytest.raises(NotImplementedError, match="only 'default' and 'gaussian' are supported on a 4-bit base"):
        apply_lora(nn.Sequential(nn.Linear(8, 8)), init="pissa", quantize="nf4")
    with pytest.raises(ValueError, match=r"needs r <= min\(in_features, out_features\) = 6, got r=8"):
        LoRALinear.from_linear(nn.Linear(6, 20), r=8, init="olora")
    with pytest.raises(ValueError, match="alpha must be > 0, got -2"):
        LoRALinear.from_linear(nn.Linear(16, 16), r=4, alpha=-2.0, init="pissa")
    layer = LoRALinear.from_linear(nn.Linear(16, 16), r=4)
    layer.merge()
    with pytest.raises(RuntimeError, match="unmerge the layer first"):
        layer.reset_lora_parameters("pissa")
    with pytest.raises(ValueError, match="init must be one of"):
        layer.reset_lora_parameters("svd")


def test_constructor_accepts_weight_inits():
    torch.manual_seed(0)
    layer = LoRALinear(24, 16, r=4, alpha=8.0, init="olora")
    assert torch.count_nonzero(layer.lora_B) > 0
    # delta + residual restores a weight of nn.Linear's init range: fp32 rounding only.
    w = layer.weight + layer.delta_weight()
    assert w.abs().max() <= 1 / 24**0.5 + 1e-6
