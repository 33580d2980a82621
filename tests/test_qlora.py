"""QLoRALinear / qlora_linear on the reference path: against PEFT LoRA on the
bitsandbytes-dequantized weight, exact memory accounting, nothing of the
weight's size saved for backward, state-dict round trips, merging."""

from __future__ import annotations

import io
import math
from fractions import Fraction

import pytest
import torch
from torch import nn

import fastlora
from fastlora.qlora import QLoRALinear, qlora_backward, qlora_forward, qlora_linear
from fastlora.quant import QuantizedWeight, dequantize_4bit, quantize_4bit

from _oracles import assert_close_to

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")


def _bnb_layer(linear, quant_type="nf4", double_quant=True):
    layer = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=torch.float32,
        compress_statistics=double_quant,
        quant_type=quant_type,
    )
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu")


def _peft_on_dequantized(l4, q: QLoRALinear, use_rslora=False):
    """PEFT LoRA on an nn.Linear holding bitsandbytes' dequantized weight, with q's adapters."""
    base = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None)
    with torch.no_grad():
        base.weight.copy_(bnb.functional.dequantize_4bit(l4.weight.data, l4.weight.quant_state))
        if q.bias is not None:
            base.bias.copy_(q.bias)
    config = peft.LoraConfig(r=q.r, lora_alpha=q.alpha, use_rslora=use_rslora, target_modules=["0"])
    twin = peft.get_peft_model(nn.Sequential(base), config).base_model.model[0]
    with torch.no_grad():
        twin.lora_A["default"].weight.copy_(q.lora_A)
        twin.lora_B["default"].weight.copy_(q.lora_B)
    return twin


def _run(module, x, dy, params):
    x = x.clone().requires_grad_(True)
    for p in params:
        p.grad = None
    y = module(x)
    y.backward(dy)
    return y.detach(), [x.grad] + [p.grad.clone() for p in params]


@pytest.mark.parametrize("quant_type,double_quant,use_rslora", [("nf4", True, False), ("fp4", False, True)])
def test_matches_peft_on_the_bitsandbytes_dequantized_weight(quant_type, double_quant, use_rslora):
    torch.manual_seed(0)
    linear = nn.Linear(128, 96)
    l4 = _bnb_layer(linear, quant_type, double_quant)
    q = QLoRALinear.from_bnb(l4, r=8, alpha=16.0, use_rslora=use_rslora)
    with torch.no_grad():
        q.lora_B.normal_(std=0.1)
    twin = _peft_on_dequantized(l4, q, use_rslora)
    q.bias.requires_grad_(True)
    twin.base_layer.bias.requires_grad_(True)
    x, dy = torch.randn(3, 11, 128), torch.randn(3, 11, 96)
    y, grads = _run(q, x, dy, [q.lora_A, q.lora_B, q.bias])
    y_ref, grads_ref = _run(
        twin, x, dy, [twin.lora_A["default"].weight, twin.lora_B["default"].weight, twin.base_layer.bias]
    )
    # fp32 on both sides; the same products summed in another order (addmm vs
    # F.linear + separate adapter) -> a few ulps of the output's scale (~10).
    for got, want, what in zip([y] + grads, [y_ref] + grads_ref, ["y", "dx", "dA", "dB", "dbias"]):
        assert_close_to(got, want, 2e-5 * max(1.0, want.abs().max().item()), what)


def test_from_linear_quantizes_like_bitsandbytes():
    torch.manual_seed(1)
    # in_features a multiple of the blocksize: bitsandbytes' native CPU dequant
    # mis-reads blocks that cross rows (see tests/test_quant.py).
    linear = nn.Linear(128, 40, bias=False)
    for quant_type, blocksize, double_quant in [("nf4", 64, True), ("fp4", 128, False), ("nf4", 32, False)]:
        q = QLoRALinear.from_linear(linear, r=4, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)
        packed, state = bnb.functional.quantize_4bit(
            linear.weight.detach(), blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type
        )
        assert torch.equal(q.weight, packed) and torch.equal(q.weight_absmax, state.absmax)
        assert torch.equal(q.dequantized_weight(), bnb.functional.dequantize_4bit(packed, state))


def test_fresh_layer_computes_its_4bit_base():
    torch.manual_seed(2)
    linear = nn.Linear(64, 32)
    q = QLoRALinear.from_linear(linear)  # lora_B = 0
    x = torch.randn(5, 64)
    # Same fp32 ops as F.linear on the dequantized weight, plus an exact zero.
    assert_close_to(q(x), nn.functional.linear(x, q.dequantized_weight(), linear.bias), 1e-6, "fresh layer")


def test_dropout_matches_lora_linear_on_the_dequantized_weight():
    torch.manual_seed(3)
    qw = quantize_4bit(torch.randn(24, 40))
    w = dequantize_4bit(qw)
    a, b, bias = torch.randn(4, 40), torch.randn(24, 4), torch.randn(24)
    x = torch.randn(6, 40, requires_grad=True)
    torch.manual_seed(7)
    y = qlora_linear(x, qw, a, b, 0.5, bias, dropout=0.3)
    torch.manual_seed(7)  # the same dropout seed is drawn
    y_ref = fastlora.lora_linear(x, w, a, b, 0.5, bias, dropout=0.3)
    # The same reference ops on the same dequantized weight: identical.
    assert torch.equal(y, y_ref)
    assert not torch.equal(y, qlora_linear(x, qw, a, b, 0.5, bias, dropout=0.3, training=False))


# -- memory --------------------------------------------------------------------


def test_base_weight_storage_is_exact_and_nothing_full_size_is_kept():
    n_out, n_in, r = 192, 320, 8
    n = n_out * n_in  # 61440 = 960 blocks of 64
    q = QLoRALinear.from_linear(nn.Linear(n_in, n_out), r=r)
    nblocks = n // 64
    expected = Fraction(1, 2) + Fraction(1, 64) + Fraction(4 * math.ceil(nblocks / 256) + 4, n)
    assert Fraction(q.weight_nbytes(), n) == expected
    # Buffers hold exactly that (+ the two code tables), parameters are the adapters and bias.
    buffer_bytes = sum(b.numel() * b.element_size() for b in q.buffers())
    assert buffer_bytes == q.weight_nbytes() + 4 * (16 + 256)
    assert {name for name, _ in q.named_parameters()} == {"lora_A", "lora_B", "bias"}
    for name, t in list(q.state_dict().items()) + list(q.named_buffers()):
        assert not (t.is_floating_point() and t.numel() >= n), f"{name} is a full-size float tensor"
    plain = QLoRALinear.from_linear(nn.Linear(n_in, n_out), double_quant=False, blocksize=128)
    assert Fraction(plain.weight_nbytes(), n) == Fraction(1, 2) + Fraction(4, 128)
    # the 4-bit weight counts as the out * in parameters it represents (PEFT counts a Params4bit so)
    assert fastlora.count_parameters(q) == (r * (n_in + n_out), r * (n_in + n_out) + n_out + n)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_nothing_of_the_weights_size_is_saved_for_backward(dropout):
    torch.manual_seed(4)
    n_out, n_in = 48, 80
    q = QLoRALinear.from_linear(nn.Linear(n_in, n_out), r=4, dropout=dropout)
    x = torch.randn(6, n_in, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = q(x)
    float_saved = [t for t in saved if t.is_floating_point()]
    assert not [t for t in float_saved if t.numel() >= n_out * n_in], [tuple(t.shape) for t in float_saved]
    shapes = sorted(tuple(t.shape) for t in float_saved)
    # x, S = dropout(x) A^T, and the adapters (parameters, not activations).
    assert shapes == sorted([(6, n_in), (6, 4), (4, n_in), (n_out, 4)])
    # x itself (a view of the caller's tensor), not a copy.
    assert any(t.shape == x.shape and t.data_ptr() == x.data_ptr() for t in saved)
    y.sum().backward()


def test_backward_twice_is_identical_and_leaves_inputs_alone():
    torch.manual_seed(5)
    q = QLoRALinear.from_linear(nn.Linear(40, 24), r=4, dropout=0.3)
    with torch.no_grad():
        q.lora_B.normal_()
    x = torch.randn(7, 40, requires_grad=True)
    x_before = x.detach().clone()
    y = q(x)
    dy = torch.randn_like(y)
    y.backward(dy, retain_graph=True)
    first = [x.grad.clone(), q.lora_A.grad.clone(), q.lora_B.grad.clone()]
    x.grad = q.lora_A.grad = q.lora_B.grad = None
    y.backward(dy)
    assert all(torch.equal(a, b) for a, b in zip(first, [x.grad, q.lora_A.grad, q.lora_B.grad]))
    assert torch.equal(x.detach(), x_before)


# -- dtypes --------------------------------------------------------------------


def test_dtype_casts_leave_the_quant_state_alone():
    torch.manual_seed(6)
    q = QLoRALinear.from_linear(nn.Linear(64, 32), r=4)
    state = {k: v.clone() for k, v in q.state_dict().items() if k.startswith("weight")}
    q.to(torch.bfloat16)
    assert q.lora_A.dtype == torch.bfloat16 and q.bias.dtype == torch.bfloat16
    for k, v in q.state_dict().items():
        if k.startswith("weight"):
            assert v.dtype == state[k].dtype and torch.equal(v, state[k]), k
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    assert q(x).dtype == torch.bfloat16


def test_compute_dtype_and_autocast():
    torch.manual_seed(7)
    linear = nn.Linear(64, 32)
    q = QLoRALinear.from_linear(linear, r=4, compute_dtype=torch.bfloat16)
    x = torch.randn(3, 64)
    y = q(x)
    assert y.dtype == torch.float32  # cast back to x's dtype, as bitsandbytes' Linear4bit does
    ref = nn.functional.linear(x.bfloat16(), q.dequantized_weight(torch.bfloat16), linear.bias.bfloat16()).float()
    # The same bf16 computation (the LoRA term is exactly 0): equal up to bf16 summation order.
    assert_close_to(y, ref, 2 ** -6 * ref.abs().max().item(), "compute_dtype=bf16")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert QLoRALinear.from_linear(linear)(x).dtype == torch.bfloat16


# -- state dict ----------------------------------------------------------------


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
def test_state_dict_round_trips_exactly(quant_type, double_quant):
    torch.manual_seed(8)
    q = QLoRALinear.from_linear(nn.Linear(72, 40), r=4, quant_type=quant_type, double_quant=double_quant)
    with torch.no_grad():
        q.lora_B.normal_()
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    sd = torch.load(io.BytesIO(buf.getvalue()))
    other = QLoRALinear.from_linear(nn.Linear(72, 40), r=4, quant_type=quant_type, double_quant=double_quant)
    assert other.load_state_dict(sd, strict=True) == nn.modules.module._IncompatibleKeys([], [])
    again = other.state_dict()
    assert list(again) == list(sd)
    for k in sd:
        assert again[k].dtype == sd[k].dtype and torch.equal(again[k], sd[k]), k
    x = torch.randn(5, 72)
    assert torch.equal(other(x), q(x))


def test_state_dict_base_part_loads_into_bitsandbytes():
    torch.manual_seed(9)
    q = QLoRALinear.from_linear(nn.Linear(128, 64), r=4)
    sd = q.state_dict()
    l4 = bnb.nn.Linear4bit(128, 64, bias=True, compute_dtype=torch.float32)
    stats = {k[len("weight.") :]: v for k, v in sd.items() if k.startswith("weight.")}
    l4.weight = bnb.nn.Params4bit.from_prequantized(data=sd["weight"], quantized_stats=stats, device="cpu")
    with torch.no_grad():
        l4.bias.copy_(sd["bias"])
    x = torch.randn(4, 128)
    # Fresh adapter (B = 0): the same fp32 linear on the same dequantized weight.
    assert_close_to(l4(x), q(x), 1e-6, "bitsandbytes forward on our state dict")


def test_load_state_dict_validates_the_quant_state():
    torch.manual_seed(10)
    sd = QLoRALinear.from_linear(nn.Linear(72, 40), r=4).state_dict()
    with pytest.raises(RuntimeError, match=r"weight of shape \(40, 72\), this layer expects \(40, 64\)"):
        QLoRALinear.from_linear(nn.Linear(64, 40), r=4).load_state_dict(
            {k: v for k, v in sd.items() if not k.startswith(("lora", "bias"))}, strict=False
        )
    with pytest.raises(RuntimeError, match=r"\(quant_type, blocksize, double_quant\)=\('nf4', 64, True\).*\('fp4', 64, True\)"):
        QLoRALinear.from_linear(nn.Linear(72, 40), r=4, quant_type="fp4").load_state_dict(sd)
    bad = dict(sd, **{"weight.absmax": sd["weight.absmax"][:3]})
    with pytest.raises(RuntimeError, match=r"absmax has shape \(3,\)"):
        QLoRALinear.from_linear(nn.Linear(72, 40), r=4).load_state_dict(bad)
    missing = {k: v for k, v in sd.items() if k != "weight"}
    with pytest.raises(RuntimeError, match="Missing key.*weight"):
        QLoRALinear.from_linear(nn.Linear(72, 40), r=4).load_state_dict(missing)


# -- merging -------------------------------------------------------------------


def test_to_linear_merges_onto_the_dequantized_weight_in_fp32():
    torch.manual_seed(11)
    linear = nn.Linear(64, 48)
    q = QLoRALinear.from_linear(linear, r=4, alpha=8.0)
    with torch.no_grad():
        q.lora_B.normal_()
    merged = q.to_linear()
    assert type(merged) is nn.Linear and merged.weight.dtype == torch.float32
    expected = q.dequantized_weight(torch.float64) + 2.0 * q.lora_B.double() @ q.lora_A.double()
    # One fp32 rounding of the sum (the fp32 B @ A is exact to ~1e-7 relative).
    assert_close_to(merged.weight, expected, 4e-7 * expected.abs().max().item(), "merged weight")
    x = torch.randn(5, 64)
    # The merged layer and the adapter compute the same function (fp32 rounding order).
    assert_close_to(merged(x), q(x), 1e-5 * q(x).abs().max().item(), "merged forward")
    assert torch.equal(q.merge().weight, merged.weight)
    assert not q.merged  # the layer is unchanged


def test_merge_and_quantize_reports_its_error_and_unmerge_refuses():
    torch.manual_seed(12)
    q = QLoRALinear.from_linear(nn.Linear(64, 48), r=4)
    with torch.no_grad():
        q.lora_B.normal_(std=0.05)
    target = q.merged_weight()
    report = q.merge_and_quantize()
    got = q.dequantized_weight(torch.float32)
    assert report["max_abs"] == pytest.approx((got - target).abs().max().item())
    assert report["rel_frobenius"] == pytest.approx(((got - target).norm() / target.norm()).item())
    assert 0 < report["rel_frobenius"] < 0.2  # 4-bit rounding error (~10% for NF4 on Gaussian weights)
    assert q.merged and q.merge_error == report
    x = torch.randn(3, 64)
    assert_close_to(q(x), nn.functional.linear(x, got, q.bias), 1e-5, "forward after merge_and_quantize")
    with pytest.raises(RuntimeError, match="unmerge is not supported.*re-quantizes"):
        q.unmerge()
    with pytest.raises(RuntimeError, match="already merged"):
        q.merge_and_quantize()


# -- errors and repr -------------------------------------------------------------


def test_argument_errors_are_clear():
    qw = quantize_4bit(torch.randn(24, 40))
    a, b = torch.randn(4, 40), torch.randn(24, 4)
    with pytest.raises(ValueError, match=r"x has shape \(3, 41\).*expected x of shape \[\.\.\., 40\]"):
        qlora_linear(torch.randn(3, 41), qw, a, b, 1.0)
    with pytest.raises(ValueError, match=r"lora_B must have shape \[24, 4\]"):
        qlora_linear(torch.randn(3, 40), qw, a, b.t(), 1.0)
    with pytest.raises(TypeError, match="lora_A/lora_B have dtypes torch.float16/torch.float32"):
        qlora_linear(torch.randn(3, 40), qw, a.half(), b, 1.0)
    with pytest.raises(TypeError, match="qweight must be a fastlora.quant.QuantizedWeight, got Tensor"):
        qlora_linear(torch.randn(3, 40), torch.randn(24, 40), a, b, 1.0)
    with pytest.raises(ValueError, match="frozen"):
        qlora_backward(torch.randn(3, 24), torch.randn(3, 40), qw, a, b, torch.randn(3, 4), 1.0, needs=(True,) * 5)
    with pytest.raises(ValueError, match="r \\(the LoRA rank\\) must be an integer >= 1, got 0"):
        QLoRALinear.from_linear(nn.Linear(40, 24), r=0)


def test_reference_ops_return_the_lora_pair():
    torch.manual_seed(13)
    qw = quantize_4bit(torch.randn(24, 40), quant_type="fp4", blocksize=32)
    x, a, b = torch.randn(5, 40), torch.randn(4, 40), torch.randn(24, 4)
    y, s = qlora_forward(x, qw, a, b, 0.5)
    w = dequantize_4bit(qw)
    assert torch.equal(y, fastlora.reference.lora_forward(x, w, a, b, 0.5)[0])
    dy = torch.randn(5, 24)
    got = qlora_backward(dy, x, qw, a, b, s, 0.5, needs=(True, False, True, True, False))
    want = fastlora.reference.lora_backward(dy, x, w, a, b, s, 0.5, needs=(True, False, True, True, False))
    assert got[1] is None and all(torch.equal(g, h) for g, h in zip(got[::2] + got[3:4], want[::2] + want[3:4]) if g is not None)


def test_extra_repr_and_qweight_view():
    q = QLoRALinear.from_linear(nn.Linear(40, 24), r=4, quant_type="fp4", blocksize=128, double_quant=False)
    text = repr(q)
    assert "quant_type=fp4" in text and "blocksize=128" in text and "double_quant=False" in text and "r=4" in text
    assert isinstance(q.qweight, QuantizedWeight) and q.qweight.packed.data_ptr() == q.weight.data_ptr()
