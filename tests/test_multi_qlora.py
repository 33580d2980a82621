"""Many adapters in one batch on a 4-bit base: ``fastlora.qlora_linear_multi``
(and ``lora_linear_multi`` given a ``QuantizedWeight``) on both backends.

Oracles: the 4-bit weight is made by bitsandbytes (``Linear4bit``, NF4 / FP4,
with and without double quantization) and dequantized by bitsandbytes itself
(``bnb.functional.dequantize_4bit``), rounded to x's dtype as the op documents;
on that dense weight, the per-row float64 formula of ``tests/test_multi.py``
(``reference.lora_multi_float64``: every row its own A, B, scale) and each
adapter trained alone on its rows with ``fastlora.qlora_linear``.

Tolerance: ``tests/test_multi.py``'s (2x PyTorch's own error on the same math in
x's dtype against float64, plus 4 ulps of the output's magnitude).
Tiers: unmarked tests run the reference path; ``interpreter`` tests the Triton
path under each ``qlora_multi`` strategy (forced with ``fastlora.set_strategy``):
``dequant_in_gemm`` (the multi GEMMs read the 4-bit weight in their main loop)
and ``dequant_once`` (the nf4 dequant kernel, then the dense multi kernels).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastlora
from fastlora.functional import new_dropout_seed
from fastlora.multi import qlora_linear_multi
from fastlora.quant import QuantizedWeight

from _oracles import assert_close_to
from test_multi import _check_alone, _compiled_step, check_all, make_multi

bnb = pytest.importorskip("bitsandbytes")

QUANTS = [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)]
QUANT_IDS = ["nf4-dq", "nf4", "fp4-dq", "fp4"]


def make_qmulti(m, k, n_out, r, n, dtype=torch.float32, quant=("nf4", True), lead=(), seed=0, empty=()):
    """make_multi's operands with the weight quantized by bitsandbytes: (x, qweight,
    the bitsandbytes-dequantized weight in x's dtype, A, B, scaling, ids, bias).
    K must be a multiple of 64 (bitsandbytes' CPU dequant mis-reads blocks that
    cross rows otherwise, see tests/test_quant.py)."""
    x, w, a, b, sc, ids, bias = make_multi(m, k, n_out, r, n, torch.float32, lead=lead, seed=seed, empty=empty)
    quant_type, double_quant = quant
    linear = nn.Linear(k, n_out, bias=False)
    with torch.no_grad():
        linear.weight.copy_(w)
    l4 = bnb.nn.Linear4bit(k, n_out, bias=False, compute_dtype=torch.float32, compress_statistics=double_quant,
                           quant_type=quant_type)  # fmt: skip
    l4.load_state_dict(linear.state_dict())
    l4 = l4.to("cpu")
    qw = QuantizedWeight.from_bnb(l4)
    w_deq = bnb.functional.dequantize_4bit(l4.weight.data, l4.weight.quant_state).to(dtype)
    return x.to(dtype), qw, w_deq, a.to(dtype), b.to(dtype), sc, ids, bias.to(dtype)


def run_qmulti(x, qw, a, b, sc, ids, bias, dy, dropout=0.0, seed=1234):
    """qlora_linear_multi forward + backward; returns (y, [dx, dA, dB, dbias], the dropout seed drawn)."""
    leaves = [t.clone().requires_grad_(True) for t in (x, a, b, bias)]
    torch.manual_seed(seed)
    drawn = new_dropout_seed()  # what the op draws next
    torch.manual_seed(seed)
    y = qlora_linear_multi(leaves[0], qw, leaves[1], leaves[2], sc, ids, leaves[3], dropout=dropout)
    y.backward(dy)
    return y.detach(), [t.grad for t in leaves], drawn


def _qlora_alone(qw):
    """The single-adapter QLoRA op on ``qw`` (each adapter trained alone on its rows)."""
    return lambda x, _w, a, b, scaling, bias: fastlora.qlora_linear(x, qw, a, b, scaling, bias)


def _check_against_float64(y, grads, drawn, x, w_deq, a, b, sc, ids, bias, dy, dropout, mask_fn, what):
    m, k = x.numel() // x.shape[-1], x.shape[-1]
    mask, keep = mask_fn(drawn, (m, k), dropout, x.device) if dropout else (None, 1.0)
    n_out = w_deq.shape[0]
    grads = [grads[0].reshape(m, k), *grads[1:]]
    check_all(y.reshape(m, n_out), grads, x.reshape(m, k), w_deq, a, b, sc, ids, bias, dy.reshape(m, n_out), mask, keep,
              what=what)  # fmt: skip


# ---------------------------------------------------------------------------
# the reference path
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("quant", QUANTS, ids=QUANT_IDS)
@pytest.mark.parametrize("dtype,dropout", [(torch.float32, 0.0), (torch.float16, 0.25)], ids=["fp32", "fp16-p0.25"])
def test_reference_against_float64(quant, dtype, dropout):
    """Ids with -1 rows and an adapter without rows (2): y, dx, dA, dB, dbias."""
    x, qw, w_deq, a, b, sc, ids, bias = make_qmulti(37, 128, 40, 8, 4, dtype, quant, empty=(2,))
    dy = torch.randn(37, 40, generator=torch.Generator().manual_seed(5)).to(dtype)
    assert (ids == -1).any()
    y, grads, drawn = run_qmulti(x, qw, a, b, sc, ids, bias, dy, dropout)
    _check_against_float64(y, grads, drawn, x, w_deq, a, b, sc, ids, bias, dy, dropout,
                           fastlora.reference.dropout_keep_mask, f"(reference {quant} {dtype})")  # fmt: skip
    assert torch.equal(grads[1][2], torch.zeros_like(a[2])) and torch.equal(grads[2][2], torch.zeros_like(b[2]))


@pytest.mark.parametrize("quant", [QUANTS[0], QUANTS[3]], ids=[QUANT_IDS[0], QUANT_IDS[3]])
def test_gradients_equal_training_each_adapter_alone(quant):
    x, qw, w_deq, a, b, sc, ids, bias = make_qmulti(41, 64, 24, 8, 4, torch.float32, quant, empty=(3,), seed=8)
    dy = torch.randn(41, 24, generator=torch.Generator().manual_seed(3))
    _, grads, _ = run_qmulti(x, qw, a, b, sc, ids, bias, dy)
    _check_alone(grads, x, w_deq, a, b, sc, ids, bias, dy, _qlora_alone(qw))


def test_adapter_gradients_without_dx():
    """x frozen (the first layer of a model; backward needs no dequantized weight):
    dA and dB alone, equal to the float64 formula's."""
    x, qw, w_deq, a, b, sc, ids, bias = make_qmulti(23, 64, 24, 4, 3, empty=(1,), seed=4)
    a64, b64 = a.double().requires_grad_(True), b.double().requires_grad_(True)
    y64 = fastlora.reference.lora_multi_float64(x, w_deq, a64, b64, sc, ids, bias)
    dy = torch.randn(y64.shape, generator=torch.Generator().manual_seed(2))
    y64.backward(dy.double())
    a, b = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    qlora_linear_multi(x, qw, a, b, sc, ids, bias).backward(dy)
    # fp32 sums over <= 23 rows of O(1) products: 64 ulps of the gradient's scale bounds the reassociation
    eps = torch.finfo(torch.float32).eps
    for what, got, want in (("dA", a.grad, a64.grad), ("dB", b.grad, b64.grad)):
        assert_close_to(got, want, 64 * eps * want.abs().max().item(), what)


def test_lora_linear_multi_takes_a_quantized_weight():
    """The same op either way; the leading dims come back; no gradient slot for the 4-bit weight."""
    x, qw, _, a, b, sc, ids, bias = make_qmulti(6, 64, 24, 4, 3, lead=(2,))
    y1 = fastlora.lora_linear_multi(x, qw, a, b, sc, ids, bias)
    y2 = qlora_linear_multi(x, qw, a, b, sc, ids, bias)
    assert y1.shape == (2, 6, 24) and torch.equal(y1, y2)
    assert not qw.packed.requires_grad


def test_saved_for_backward_holds_no_dense_weight():
    """Saved: x, the ids and S [M, r] (the 4-bit tensors are held by reference, never
    packed by the hooks); nothing [N, K]: backward dequantizes again."""
    x, qw, _, a, b, sc, ids, bias = make_qmulti(37, 64, 40, 8, 4)
    x.requires_grad_(True)
    a.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = qlora_linear_multi(x, qw, a, b, sc, ids, bias, dropout=0.2)
    shapes = sorted(tuple(t.shape) for t in saved)
    assert shapes == sorted([(37, 64), (4, 8, 64), (4, 40, 8), (4,), (37,), (37, 8)]), shapes
    y.sum().backward()
    assert x.grad.shape == x.shape and a.grad.shape == a.shape


def _check_compiled_equals_eager(what):
    """The custom op under torch.compile(fullgraph=True) runs the very same math: bit-identical."""
    x, qw, _, a, b, sc, ids, bias = make_qmulti(7, 64, 16, 4, 3, lead=(3,), quant=("fp4", True), seed=5)
    dy = torch.randn(3, 7, 16)

    def fn(x, w, a, b, sc, ids, bias, dropout):
        return qlora_linear_multi(x, qw, a, b, sc, ids, bias, dropout=dropout)

    torch._dynamo.reset()
    y_c, g_c = _compiled_step(torch.compile(fn, fullgraph=True), x, None, a, b, sc, ids, bias, dy)
    y_e, g_e = _compiled_step(fn, x, None, a, b, sc, ids, bias, dy)
    assert_close_to(y_c, y_e, 0.0, f"compiled output ({what})")
    for name, gc, ge in zip(("dx", "dA", "dB"), g_c, g_e):
        assert_close_to(gc, ge, 0.0, f"compiled {name} ({what})")


def test_compiled_fullgraph_equals_eager():
    _check_compiled_equals_eager("reference")


def _bad(change):
    x, qw, _, a, b, sc, ids, bias = make_qmulti(5, 64, 24, 4, 3)
    args = dict(x=x, qweight=qw, lora_A=a, lora_B=b, scaling=sc, adapter_ids=ids, bias=bias)
    args.update(change(args))
    return args


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (lambda a: {"qweight": a["qweight"].dequantize()}, TypeError, r"qweight must be a fastlora.quant.QuantizedWeight"),
        (lambda a: {"x": torch.randn(5, 32)}, ValueError, r"x's last dimension must equal qweight's in_features.*\(24, 64\)"),
        (lambda a: {"lora_A": torch.randn(3, 4, 32)}, ValueError, r"lora_A must have shape \[n_adapters, r, 64\]"),
        (lambda a: {"lora_B": torch.randn(3, 20, 4)}, ValueError, r"lora_B must have shape \[3, 24, 4\]"),
        (lambda a: {"scaling": torch.ones(3, dtype=torch.float64)}, ValueError, r"scaling must be a float32 tensor"),
        (lambda a: {"adapter_ids": torch.zeros(4, dtype=torch.long)}, ValueError, r"adapter_ids must have shape \[5\]"),
        (lambda a: {"bias": torch.zeros(23)}, ValueError, r"bias must have shape \[24\]"),
    ],
    ids=["dense-weight", "x-vs-qweight", "lora_A", "lora_B", "scaling", "ids-shape", "bias"],
)
def test_errors_name_the_argument(change, exc, match):
    args = _bad(change)
    with pytest.raises(exc, match=match):
        qlora_linear_multi(**args)


def test_ids_out_of_range_are_rejected():
    x, qw, _, a, b, sc, ids, bias = make_qmulti(9, 64, 24, 4, 3)
    ids = ids.clone()
    ids[4] = 3
    with pytest.raises(ValueError, match=r"adapter_ids must be in \[-1, 3\)"):
        qlora_linear_multi(x, qw, a, b, sc, ids, bias)


# ---------------------------------------------------------------------------
# the Triton path under the interpreter
# ---------------------------------------------------------------------------


@pytest.fixture
def km(monkeypatch):
    """fastlora.kernels.lora_multi with the split reductions forced to 2 programs per segment."""
    mod = pytest.importorskip("fastlora.kernels.lora_multi")
    monkeypatch.setattr(mod, "split_rows", lambda device, row_blocks, other: min(2, row_blocks))
    return mod


STRATEGIES = fastlora.strategies()["qlora_multi"]
# Launches (forward, backward with dx, dA, dB, dbias): the shrink + the GEMM, then the dY pass,
# dX GEMM and dA; dequant_once adds one dequant launch each way.
LAUNCHES = {"dequant_in_gemm": (2, 3), "dequant_once": (3, 4)}


@pytest.fixture(params=STRATEGIES)
def strategy(request, monkeypatch):
    """Each qlora_multi strategy, forced for the test (and cleared after it)."""
    monkeypatch.delenv("FASTLORA_STRATEGY", raising=False)
    fastlora.set_strategy("qlora_multi", request.param)
    yield request.param
    fastlora.set_strategy("qlora_multi", None)


def _count_launches(fn):
    from fastlora.kernels import lora as klora

    klora.reset_launch_count()
    out = fn()
    return out, klora.launch_count()


@pytest.mark.interpreter
@pytest.mark.parametrize(
    "lead,m,quant,dtype,dropout",
    [
        pytest.param((), 13, QUANTS[0], torch.float32, 0.2, id="decode-nf4-dq-fp32-p0.2"),
        pytest.param((2,), 19, QUANTS[3], torch.float16, 0.0, id="sorted-fp4-fp16"),
        pytest.param((), 37, QUANTS[2], torch.float32, 0.0, id="sorted-fp4-dq-fp32"),
        pytest.param((), 23, QUANTS[1], torch.float16, 0.2, id="sorted-nf4-fp16-p0.2"),
    ],
)
def test_kernels_against_float64(km, strategy, lead, m, quant, dtype, dropout):
    """Exact launches per strategy (:data:`LAUNCHES`); -1 rows and an adapter without
    rows (1); nothing [N, K] saved for backward."""
    x, qw, w_deq, a, b, sc, ids, bias = make_qmulti(m, 64, 40, 8, 3, dtype, quant, lead=lead, empty=(1,), seed=3)
    dy = torch.randn(*lead, m, 40, generator=torch.Generator().manual_seed(4)).to(dtype)
    leaves = [t.clone().requires_grad_(True) for t in (x, a, b, bias)]
    torch.manual_seed(9)
    drawn = new_dropout_seed()
    torch.manual_seed(9)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y, fwd = _count_launches(lambda: qlora_linear_multi(leaves[0], qw, leaves[1], leaves[2], sc, ids, leaves[3], dropout=dropout))
    assert not [t.shape for t in saved if tuple(t.shape[-2:]) in ((40, 64), (64, 40))], "a dense weight was saved"
    _, bwd = _count_launches(lambda: y.backward(dy))
    assert (fwd, bwd) == LAUNCHES[strategy]
    grads = [t.grad for t in leaves]
    _check_against_float64(y.detach(), grads, drawn, x, w_deq, a, b, sc, ids, bias, dy, dropout, km.dropout_keep_mask,
                           f"(kernels {strategy} {quant} {dtype})")  # fmt: skip
    assert torch.equal(grads[1][1], torch.zeros_like(a[1])) and torch.equal(grads[2][1], torch.zeros_like(b[1]))


@pytest.mark.interpreter
def test_kernels_gradients_equal_training_each_adapter_alone(km, strategy):
    x, qw, w_deq, a, b, sc, ids, bias = make_qmulti(41, 64, 24, 8, 4, torch.float32, QUANTS[0], empty=(3,), seed=8)
    dy = torch.randn(41, 24, generator=torch.Generator().manual_seed(3))
    _, grads, _ = run_qmulti(x, qw, a, b, sc, ids, bias, dy)
    _check_alone(grads, x, w_deq, a, b, sc, ids, bias, dy, _qlora_alone(qw))


@pytest.mark.interpreter
def test_kernels_adapter_gradients_without_dx(km, strategy):
    """x frozen: the backward has no dX GEMM, so no dequant launch under either
    strategy (2 launches: the dY pass and dA); dA and dB as the float64 formula's
    (64 ulps: fp32 sums over <= 23 rows of O(1) products)."""
    x, qw, w_deq, a, b, sc, ids, bias = make_qmulti(23, 64, 24, 4, 3, empty=(1,), seed=4)
    a64, b64 = a.double().requires_grad_(True), b.double().requires_grad_(True)
    y64 = fastlora.reference.lora_multi_float64(x, w_deq, a64, b64, sc, ids, bias)
    dy = torch.randn(y64.shape, generator=torch.Generator().manual_seed(2))
    y64.backward(dy.double())
    a, b = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    y = qlora_linear_multi(x, qw, a, b, sc, ids, bias)
    _, bwd = _count_launches(lambda: y.backward(dy))
    assert bwd == 2
    eps = torch.finfo(torch.float32).eps
    for what, got, want in (("dA", a.grad, a64.grad), ("dB", b.grad, b64.grad)):
        assert_close_to(got, want, 64 * eps * want.abs().max().item(), what)


@pytest.mark.interpreter
def test_strategy_from_the_environment(km, monkeypatch):
    """FASTLORA_STRATEGY=qlora_multi:dequant_once gives the dequant launch; set_strategy
    overrides the environment; nothing forced on CPU (no measuring) is the default."""
    x, qw, _, a, b, sc, ids, bias = make_qmulti(5, 64, 24, 4, 3, seed=2)
    fastlora.set_strategy("qlora_multi", None)
    monkeypatch.delenv("FASTLORA_STRATEGY", raising=False)
    run = lambda: qlora_linear_multi(x, qw, a, b, sc, ids, bias)  # noqa: E731
    assert fastlora.strategies()["qlora_multi"][0] == "dequant_in_gemm"
    assert _count_launches(run)[1] == 2
    monkeypatch.setenv("FASTLORA_STRATEGY", "qlora_multi:dequant_once")
    assert _count_launches(run)[1] == 3
    fastlora.set_strategy("qlora_multi", "dequant_in_gemm")
    try:
        assert _count_launches(run)[1] == 2
    finally:
        fastlora.set_strategy("qlora_multi", None)


@pytest.mark.interpreter
def test_measured_choice_runs_the_fastest(km, monkeypatch, tmp_path):
    """``auto`` (what a CUDA call gets): each candidate timed once for the shape key
    (a fake timer here), the faster one run and recorded in the report."""
    from fastlora.strategies import forget_measurements, strategy_report, use_timer

    monkeypatch.delenv("FASTLORA_STRATEGY", raising=False)
    monkeypatch.setenv("FASTLORA_STRATEGY_CACHE", "0")
    forget_measurements()
    x, qw, _, a, b, sc, ids, bias = make_qmulti(5, 64, 24, 4, 3, seed=2)
    timed = []

    def timer(name, run, device):
        timed.append(name)
        return {"qlora_multi=dequant_in_gemm": 2.0, "qlora_multi=dequant_once": 1.0}[name]

    try:
        with use_timer(timer):
            _, fwd = _count_launches(lambda: qlora_linear_multi(x, qw, a, b, sc, ids, bias))
            _, again = _count_launches(lambda: qlora_linear_multi(x, qw, a, b, sc, ids, bias))
        assert fwd == again == 3  # dequant_once, timed faster
        assert timed == ["qlora_multi=dequant_in_gemm", "qlora_multi=dequant_once"]  # once per key
        (rec,) = [r for r in strategy_report() if r["op"] == "qlora_multi"]
        assert rec["chosen"] == "qlora_multi=dequant_once" and rec["source"] == "measured"
    finally:
        forget_measurements()


def test_unknown_strategy_names_are_refused():
    with pytest.raises(ValueError, match=r"the strategies of 'qlora_multi' are \('dequant_in_gemm', 'dequant_once'\), got 'small_m'"):
        fastlora.set_strategy("qlora_multi", "small_m")
    km = pytest.importorskip("fastlora.kernels.lora_multi")
    x, qw, _, a, b, sc, ids, bias = make_qmulti(5, 64, 24, 4, 3)
    with pytest.raises(ValueError, match=r"strategy must be one of \('dequant_in_gemm', 'dequant_once'\), got 'cublas'"):
        km.qlora_multi_forward(x, qw, a, b, sc, ids, bias, strategy="cublas")


@pytest.mark.interpreter
def test_kernels_compiled_fullgraph_equals_eager(km, strategy):
    _check_compiled_equals_eager("kernels")
