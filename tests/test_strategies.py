"""Strategies: several implementations per fused op, chosen by measurement.

Tiers, as everywhere (DESIGN.md):

* the API, the spec strings, the chooser (an injected timer: no real timing
  in tests), the cache file, and the stored-bits format: plain Python / torch;
* the reference path's ``dropout=stored_bits``: bit-identical to
  ``regenerate`` (the same mask, drawn once), saved bytes exact;
* every Triton strategy under the interpreter against float64 (the 2x rule:
  twice PyTorch's own error for the same computation in the same dtype, with
  the same mask, plus 4 ulp), exact launch counts (Triton and cuBLAS/torch
  GEMMs) and saved bytes, no writes into inputs, deterministic backward;
* torch.compile(fullgraph=True) with a forced and a measured strategy;
* the new kernels compile ahead of time for sm_80 / sm_90 without spills.

Run alone, this file is the AOT compile script (``main()``, JSON lines).
"""

from __future__ import annotations

import json
import math
import sys
import warnings

import pytest
import torch

import fastlora
from fastlora import reference
from fastlora.quant import dequantize_4bit, quantize_4bit
from fastlora.strategies import (
    candidate_names,
    choose,
    device_id,
    forget_measurements,
    parse_spec,
    parse_strategy_env,
    shape_key,
    strategy_backend,
    use_timer,
)
from fastlora.strategy_ops import new_s_with_bits, pack_bits, stored_bits, stored_mask_bytes, unpack_bits

from _aot import ARCHS, REPO, check_compiled, compile_in_subprocess, compile_variant, launch_signature, jit_function
from _oracles import assert_close_to, tolerance_2x

sys.path.insert(0, str(REPO / "bench"))
from saved_bytes import record_saved_tensors  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _clean_strategy_state(monkeypatch, tmp_path):
    """No forced strategy, no env, a private cache file, no earlier measurement."""
    monkeypatch.delenv("FASTLORA_STRATEGY", raising=False)
    monkeypatch.delenv("FASTLORA_STRATEGY_MEASURE", raising=False)
    monkeypatch.setenv("FASTLORA_STRATEGY_CACHE", str(tmp_path / "cache" / "strategies.json"))
    for op in fastlora.strategies():
        fastlora.set_strategy(op, None)
    forget_measurements()
    yield
    for op in fastlora.strategies():
        fastlora.set_strategy(op, None)
    forget_measurements()


class FakeTimer:
    """Deterministic times per candidate (seconds); records the calls; runs the
    candidate when ``run`` is set (so a broken candidate shows up)."""

    def __init__(self, times: dict[str, float], run: bool = False, fail: tuple[str, ...] = ()) -> None:
        self.times, self.run, self.fail, self.calls = times, run, fail, []

    def __call__(self, name, run, device):
        self.calls.append(name)
        if name in self.fail:
            raise RuntimeError(f"{name} does not work here")
        if self.run:
            run()
        return self.times[name]


# ---------------------------------------------------------------------------
# the API and the spec strings
# ---------------------------------------------------------------------------


def test_strategies_lists_every_name_default_first():
    names = fastlora.strategies()
    assert names == {
        "lora": ["fused", "cublas"],
        "qlora": ["dequant_in_gemm", "dequant_once", "small_m"],
        "dropout": ["regenerate", "stored_bits"],
        "qlora_multi": ["dequant_in_gemm", "dequant_once"],
    }
    names["lora"].append("x")  # a copy: the caller cannot change the table
    assert fastlora.strategies()["lora"] == ["fused", "cublas"]


def test_set_strategy_validates_and_clears():
    with pytest.raises(ValueError, match="op must be one of"):
        fastlora.set_strategy("conv", "fused")
    with pytest.raises(ValueError, match="strategies of 'lora'"):
        fastlora.set_strategy("lora", "small_m")
    with pytest.raises(ValueError, match="op must be one of"):
        fastlora.set_strategy("conv", None)
    fastlora.set_strategy("lora", "cublas")
    assert fastlora.strategies.__module__ == "fastlora.strategies"
    from fastlora.strategies import forced_strategies

    assert forced_strategies() == {"lora": "cublas"}
    fastlora.set_strategy("lora", None)
    assert forced_strategies() == {}


def test_env_var_is_parsed_and_set_strategy_wins(monkeypatch):
    from fastlora.strategies import forced_strategies

    assert parse_strategy_env(" lora:cublas , dropout=stored_bits,qlora:auto ") == {
        "lora": "cublas", "dropout": "stored_bits",
    }  # fmt: skip
    monkeypatch.setenv("FASTLORA_STRATEGY", "lora:cublas,qlora:small_m")
    assert forced_strategies() == {"lora": "cublas", "qlora": "small_m"}
    fastlora.set_strategy("lora", "fused")
    assert forced_strategies() == {"lora": "fused", "qlora": "small_m"}
    monkeypatch.setenv("FASTLORA_STRATEGY", "lora:turbo")
    with pytest.raises(ValueError, match="FASTLORA_STRATEGY"):
        forced_strategies()


def _args(m=4, k=16, n=8, r=2, grad=True):
    x = torch.randn(m, k, requires_grad=grad)
    return [x, torch.randn(n, k), torch.randn(r, k), torch.randn(n, r), None]


def test_spec_strings():
    args = _args()
    # Nothing forced, nothing measurable (CPU, no injected timer): the backend, unchanged.
    assert strategy_backend("lora", "triton", args, 0.1) == "triton"
    assert strategy_backend("lora", "reference", args, 0.1) == "reference"
    assert strategy_backend("dora", "triton", args, 0.1) == "triton"  # no strategies for DoRA
    fastlora.set_strategy("lora", "cublas")
    fastlora.set_strategy("dropout", "stored_bits")
    assert strategy_backend("lora", "triton", args, 0.1) == "triton:lora=cublas,dropout=stored_bits"
    assert strategy_backend("lora", "triton", args, 0.0) == "triton:lora=cublas"  # no mask without dropout
    # The reference has its own formulation only for stored bits; cublas is accepted and ignored.
    assert strategy_backend("lora", "reference", args, 0.1) == "reference:dropout=stored_bits"
    assert strategy_backend("lora", "reference", args, 0.0) == "reference"
    fastlora.set_strategy("qlora", "small_m")
    assert strategy_backend("qlora", "triton", args, 0.0) == "triton:qlora=small_m"  # no dense GEMM to choose
    fastlora.set_strategy("lora", None)
    with use_timer(FakeTimer({})):  # measurable now: the unforced axes are "auto"
        assert strategy_backend("lora", "triton", args, 0.1) == "triton:dropout=stored_bits,auto"
        assert strategy_backend("lora", "triton", _args(grad=False), 0.1) == "triton:dropout=stored_bits,auto,infer"
        with torch.no_grad():
            assert strategy_backend("lora", "triton", args, 0.1).endswith("auto,infer")
        assert strategy_backend("lora", "reference", args, 0.1) == "reference:dropout=stored_bits"  # never measured
    # The multi-adapter QLoRA op has one axis (its dropout has no strategy; the reference ignores it).
    assert strategy_backend("qlora_multi", "triton", args, 0.1) == "triton"
    fastlora.set_strategy("qlora_multi", "dequant_once")
    assert strategy_backend("qlora_multi", "triton", args, 0.1) == "triton:qlora_multi=dequant_once"
    assert strategy_backend("qlora_multi", "reference", args, 0.1) == "reference"
    fastlora.set_strategy("qlora_multi", None)
    with use_timer(FakeTimer({})):
        assert strategy_backend("qlora_multi", "triton", args, 0.0) == "triton:auto"
    assert parse_spec("triton:lora=cublas,dropout=stored_bits,auto,infer") == (
        "triton", {"lora": "cublas", "dropout": "stored_bits"}, True, False,
    )  # fmt: skip
    with pytest.raises(ValueError):
        parse_spec("triton:lora=warp")


def test_env_var_forces_a_strategy_end_to_end(monkeypatch):
    layer = _layer(torch.float32, 0.1)
    x = torch.randn(37, K_REF, requires_grad=True)
    frozen = list(layer.parameters())
    monkeypatch.setenv("FASTLORA_STRATEGY", "dropout:stored_bits")
    rec = record_saved_tensors(lambda: layer(x), exclude=frozen)
    assert rec.nbytes == 37 * K_REF * 4 + 37 * 8 * 4 + 37 * K_REF // 8
    monkeypatch.setenv("FASTLORA_STRATEGY", "dropout:regenerate")
    assert record_saved_tensors(lambda: layer(x), exclude=frozen).nbytes == 37 * K_REF * 4 + 37 * 8 * 4


def test_env_var_changes_and_malformed_values_reach_the_next_call(monkeypatch):
    """forced strategies are memoised per (FASTLORA_STRATEGY text, set_strategy state):
    a change of either is seen by the very next call; a malformed value is refused by
    every call a strategy applies to (on the reference backend: calls with dropout)."""
    from fastlora.strategies import strategy_backend

    x = torch.randn(4, 8)
    assert strategy_backend("lora", "reference", [x], 0.1) == "reference"
    monkeypatch.setenv("FASTLORA_STRATEGY", "dropout:stored_bits")
    assert strategy_backend("lora", "reference", [x], 0.1) == "reference:dropout=stored_bits"
    fastlora.set_strategy("dropout", "regenerate")
    assert strategy_backend("lora", "reference", [x], 0.1) == "reference"
    fastlora.set_strategy("dropout", None)
    monkeypatch.setenv("FASTLORA_STRATEGY", "dropout:turbo")
    layer = _layer(torch.float32, 0.1)
    with pytest.raises(ValueError, match="FASTLORA_STRATEGY"):
        layer(x.new_empty(4, K_REF).normal_())
    assert strategy_backend("lora", "reference", [x], 0.0) == "reference"  # no strategy applies: not read


def test_the_cuda_timer_measures_nothing_off_cuda():
    from fastlora.strategies import cuda_event_timer

    ran = []
    assert cuda_event_timer("lora=fused", lambda: ran.append(1), CPU) is None
    assert ran == []


def test_measuring_can_be_turned_off(monkeypatch):
    from fastlora.strategies import _may_measure

    assert not _may_measure(CPU)  # no GPU: defaults
    assert _may_measure(torch.device("cuda", 0))
    monkeypatch.setenv("FASTLORA_STRATEGY_MEASURE", "0")
    assert not _may_measure(torch.device("cuda", 0))


def test_candidates():
    assert candidate_names("lora", {}, 0.0, True, 8) == ["lora=fused", "lora=cublas"]
    assert candidate_names("lora", {}, 0.1, True, 8) == [
        "lora=fused,dropout=regenerate", "lora=fused,dropout=stored_bits",
        "lora=cublas,dropout=regenerate", "lora=cublas,dropout=stored_bits",
    ]  # fmt: skip
    assert candidate_names("lora", {}, 0.1, False, 8) == ["lora=fused", "lora=cublas"]  # no backward: no mask kept
    assert candidate_names("lora", {"dropout": "stored_bits"}, 0.1, True, 8) == [
        "lora=fused,dropout=stored_bits", "lora=cublas,dropout=stored_bits",
    ]  # fmt: skip
    assert candidate_names("qlora", {}, 0.0, False, 16) == [
        "qlora=dequant_in_gemm", "qlora=dequant_once,lora=fused", "qlora=dequant_once,lora=cublas", "qlora=small_m",
    ]  # fmt: skip
    assert "qlora=small_m" not in candidate_names("qlora", {}, 0.0, False, 17)  # M > 16: not offered
    assert candidate_names("qlora", {"qlora": "small_m"}, 0.0, False, 4096) == ["qlora=small_m"]  # forced: allowed


def test_shape_keys_bucket_rows_and_pad_rank():
    x = torch.empty(4000, 64)
    assert shape_key("lora", x, 32, 8, 0.1, True) == "lora|float32|M4096|K64|N32|r16|dropout"
    assert shape_key("lora", torch.empty(0, 8), 4, 40, 0.0, False) == "lora|float32|M0|K8|N4|r64|nodropout,infer"
    assert shape_key("lora", torch.empty(16, 8), 4, 16, 0.0, True) != shape_key("lora", torch.empty(17, 8), 4, 16, 0.0, True)


# ---------------------------------------------------------------------------
# the chooser, with an injected timer
# ---------------------------------------------------------------------------

CANDS = ["lora=fused", "lora=cublas"]


def _runner(log):
    return lambda name: (lambda: log.append(name))


def test_chooser_times_each_candidate_once_and_keeps_the_fastest():
    timer, ran = FakeTimer({"lora=fused": 2e-3, "lora=cublas": 1e-3}, run=True), []
    with use_timer(timer):
        assert choose("lora", "k1", CPU, CANDS, _runner(ran)) == "lora=cublas"
        assert choose("lora", "k1", CPU, CANDS, _runner(ran)) == "lora=cublas"
        assert choose("lora", "k1", CPU, CANDS, None) == "lora=cublas"  # backward: the same answer
    assert timer.calls == CANDS and ran == CANDS  # once each, on the first call only
    (rec,) = fastlora.strategy_report()
    assert rec["chosen"] == "lora=cublas" and rec["source"] == "measured" and rec["key"] == "k1"
    assert rec["times_ms"] == pytest.approx({"lora=fused": 2.0, "lora=cublas": 1.0})
    text = str(fastlora.strategy_report())
    assert "lora=cublas" in text and "measured" in text and "k1" in text


def test_chooser_without_measurement_uses_the_default_and_measures_later():
    assert choose("lora", "k2", CPU, CANDS, _runner([])) == "lora=fused"  # CPU, no timer: nothing measured
    (rec,) = fastlora.strategy_report()
    assert rec["source"] == "default" and rec["times_ms"] == {}
    assert "no choice made yet" in str(type(fastlora.strategy_report())())
    with use_timer(FakeTimer({"lora=fused": 2e-3, "lora=cublas": 1e-3})):  # measurable now: not stuck on the default
        assert choose("lora", "k2", CPU, CANDS, _runner([])) == "lora=cublas"


def test_a_failing_candidate_is_never_chosen():
    timer = FakeTimer({"lora=fused": 5e-3, "lora=cublas": 1e-3}, fail=("lora=cublas",))
    with use_timer(timer), pytest.warns(UserWarning, match="failed while being timed"):
        assert choose("lora", "k3", CPU, CANDS, _runner([])) == "lora=fused"
    assert fastlora.strategy_report()[0]["times_ms"]["lora=cublas"] == math.inf


def test_cache_file_round_trip(tmp_path, monkeypatch):
    path = tmp_path / "c" / "s.json"
    monkeypatch.setenv("FASTLORA_STRATEGY_CACHE", str(path))
    written = []
    module = sys.modules["fastlora.strategies"]  # the module (the package attribute is the function)
    real_write = module.write_files_atomically
    def spy(folder, files):
        written.append(folder)
        return real_write(folder, files)

    monkeypatch.setattr(module, "write_files_atomically", spy)
    with use_timer(FakeTimer({"lora=fused": 3e-3, "lora=cublas": 1.5e-3})):
        assert choose("lora", "k4", CPU, CANDS, _runner([])) == "lora=cublas"
    assert written == [str(path.parent)]  # through the atomic writer, into the file's folder
    data = json.loads(path.read_text())
    assert data["format"] == "fastlora-strategies-1"
    (dev,) = data["devices"]
    assert dev == device_id(CPU) and "torch " in dev and "fastlora " in dev and "triton " in dev
    assert data["devices"][dev]["k4"] == {"lora=cublas": 1.5, "lora=fused": 3.0}  # ms
    # A new process (simulated): the file answers, nothing is timed again.
    forget_measurements()
    timer = FakeTimer({"lora=fused": 1e-3, "lora=cublas": 9e-3})
    with use_timer(timer):
        assert choose("lora", "k4", CPU, CANDS, _runner([])) == "lora=cublas"
    assert timer.calls == []
    assert fastlora.strategy_report()[0]["source"] == "cache"
    # A candidate the file lacks is timed and merged in.
    three = CANDS + ["lora=other"]
    with use_timer(FakeTimer({"lora=other": 1e-4})):
        assert choose("lora", "k4", CPU, three, _runner([])) == "lora=other"
    assert json.loads(path.read_text())["devices"][dev]["k4"] == {"lora=cublas": 1.5, "lora=fused": 3.0, "lora=other": 0.1}


def test_cache_file_opt_out_and_damaged_file(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTLORA_STRATEGY_CACHE", "0")
    with use_timer(FakeTimer({"lora=fused": 1e-3, "lora=cublas": 2e-3})):
        assert choose("lora", "k5", CPU, CANDS, _runner([])) == "lora=fused"
    assert not any(tmp_path.rglob("*.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    monkeypatch.setenv("FASTLORA_STRATEGY_CACHE", str(bad))
    forget_measurements()
    with use_timer(FakeTimer({"lora=fused": 2e-3, "lora=cublas": 1e-3})), pytest.warns(UserWarning, match="ignoring"):
        assert choose("lora", "k6", CPU, CANDS, _runner([])) == "lora=cublas"
    assert json.loads(bad.read_text())["devices"]  # replaced by a valid file


# ---------------------------------------------------------------------------
# the stored-bits format
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("m,k", [(37, 96), (5, 13), (3, 1), (0, 8), (4, 0), (2, 64)])
def test_pack_unpack_round_trip_against_the_layout(m, k):
    mask = torch.rand(m, k, generator=torch.Generator().manual_seed(m * 100 + k)) < 0.6
    bits = torch.full((m, (k + 7) // 8), 255, dtype=torch.uint8)
    pack_bits(mask, bits)
    # The layout, element by element: bit j of byte (i, b) is mask[i, 8 b + j]; padding bits are 0.
    for i in range(m):
        for b in range((k + 7) // 8):
            want = sum(1 << j for j in range(8) if 8 * b + j < k and mask[i, 8 * b + j])
            assert bits[i, b].item() == want
    assert torch.equal(unpack_bits(bits, k).bool(), mask)
    assert unpack_bits(bits, k).dtype == torch.uint8


def test_bits_live_behind_s_and_only_there():
    s, bits = new_s_with_bits(5, 3, 13, torch.float16, CPU)
    assert s.shape == (5, 3) and s.dtype == torch.float16 and bits.shape == (5, 2)
    assert s.untyped_storage().nbytes() == 5 * 3 * 2 + stored_mask_bytes(5, 13) == 30 + 10
    bits.copy_(torch.arange(10, dtype=torch.uint8).view(5, 2))
    found = stored_bits(s, 13)
    assert found is not None and torch.equal(found, bits)
    assert stored_bits(s.clone(), 13) is None  # a copy of S carries no mask
    assert stored_bits(s, 24) is None  # not this K's size
    plain = torch.empty(5, 3, dtype=torch.float16)
    assert stored_bits(plain, 13) is None


# ---------------------------------------------------------------------------
# the reference path: dropout=stored_bits
# ---------------------------------------------------------------------------

K_REF, N_REF = 96, 80


def _layer(dtype, dropout, bias=True, r=8, k=K_REF, n=N_REF, lora_dtype=None):
    torch.manual_seed(0)
    layer = fastlora.LoRALinear(k, n, bias=bias, r=r, alpha=16.0, dropout=dropout, dtype=dtype).train()
    if lora_dtype is not None:
        layer.lora_A.data = layer.lora_A.data.to(lora_dtype)
        layer.lora_B.data = layer.lora_B.data.to(lora_dtype)
    with torch.no_grad():
        layer.lora_B.normal_(0.0, 0.1)
    return layer


def _step(layer, x, dy, seed=5):
    torch.manual_seed(seed)  # the dropout seed of the call
    for p in layer.parameters():
        p.grad = None
    xx = x.detach().clone().requires_grad_(True)
    y = layer(xx)
    y.backward(dy)
    return [y.detach(), xx.grad, layer.lora_A.grad, layer.lora_B.grad, layer.bias.grad if layer.bias is not None else None]


def _same(want, got) -> bool:
    return all((a is None and b is None) or (a is not None and b is not None and torch.equal(a, b)) for a, b in zip(want, got))


class _CountDraws:
    def __init__(self, monkeypatch):
        self.n = 0
        real = reference.dropout_keep_mask

        def counted(*a, **kw):
            self.n += 1
            return real(*a, **kw)

        monkeypatch.setattr(reference, "dropout_keep_mask", counted)


@pytest.mark.parametrize(
    "dtype,lora_dtype,lead,bias",
    [(torch.float32, None, (37,), True), (torch.bfloat16, None, (3, 13), False), (torch.bfloat16, torch.float32, (37,), True)],
    ids=["fp32", "bf16-3d-nobias", "bf16-fp32adapters"],
)
def test_reference_stored_bits_is_bit_identical_and_draws_once(monkeypatch, dtype, lora_dtype, lead, bias):
    layer = _layer(dtype, 0.3, bias=bias, lora_dtype=lora_dtype)
    layer.bias is not None and layer.bias.requires_grad_(True)
    x = torch.randn(*lead, K_REF).to(dtype)
    dy = torch.randn(*lead, N_REF).to(dtype)
    draws = _CountDraws(monkeypatch)
    regen = _step(layer, x, dy)
    assert draws.n == 2  # forward and backward each draw the mask
    fastlora.set_strategy("dropout", "stored_bits")
    draws.n = 0
    stored = _step(layer, x, dy)
    assert draws.n == 1  # drawn once: backward reads the bits
    for name, a, b in zip(["y", "dx", "dA", "dB", "dbias"], regen, stored):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b), f"{name} differs between regenerate and stored_bits"


def test_reference_stored_bits_against_float64():
    """float64 end to end: the stored-bits path equals the textbook formula with the same mask."""
    layer = _layer(torch.float64, 0.25)
    layer.bias.requires_grad_(True)
    x, dy = torch.randn(20, K_REF, dtype=torch.float64), torch.randn(20, N_REF, dtype=torch.float64)
    fastlora.set_strategy("dropout", "stored_bits")
    got = _step(layer, x, dy, seed=9)
    torch.manual_seed(9)
    seed = fastlora.functional.new_dropout_seed()
    mask, keep = reference.dropout_keep_mask(seed, (20, K_REF), 0.25, CPU)
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, layer.lora_A, layer.lora_B, layer.bias)]
    y = reference.lora_linear_float64(leaves[0], layer.weight, leaves[1], leaves[2], layer.scaling, leaves[3], mask, keep)
    y.backward(dy)
    for name, a, b in zip(["y", "dx", "dA", "dB", "dbias"], got, [y.detach()] + [t.grad for t in leaves]):
        assert_close_to(a, b, 1e-12 * max(1.0, b.abs().max().item()), f"float64 {name}")  # float64 rounding only


@pytest.mark.parametrize("k", [96, 13])
def test_reference_stored_bits_saves_exactly_one_bit_per_element(k):
    """Saved: X + S + M * ceil(K / 8) bytes (the mask, in S's storage), nothing else."""
    layer = _layer(torch.float32, 0.1, k=k)
    x = torch.randn(37, k, requires_grad=True)
    frozen = list(layer.parameters()) + list(layer.buffers())
    base = record_saved_tensors(lambda: layer(x), exclude=frozen)
    fastlora.set_strategy("dropout", "stored_bits")
    rec = record_saved_tensors(lambda: layer(x), exclude=frozen)
    x_bytes, s_bytes = 37 * k * 4, 37 * 8 * 4
    assert base.nbytes == x_bytes + s_bytes
    assert rec.nbytes == x_bytes + s_bytes + 37 * ((k + 7) // 8), rec.describe()
    rec.result.sum().backward()


def test_qlora_reference_stored_bits_saves_the_mask_and_matches():
    torch.manual_seed(0)
    q = fastlora.QLoRALinear.from_linear(torch.nn.Linear(64, 40), r=4, dropout=0.2).train()
    with torch.no_grad():
        q.lora_B.normal_()
    x = torch.randn(2, 9, 64, requires_grad=True)
    frozen = list(q.parameters()) + list(q.buffers())
    torch.manual_seed(1)
    rec0 = record_saved_tensors(lambda: q(x), exclude=frozen)
    fastlora.set_strategy("dropout", "stored_bits")
    torch.manual_seed(1)
    rec1 = record_saved_tensors(lambda: q(x), exclude=frozen)
    assert rec1.nbytes == rec0.nbytes + 18 * 8
    assert torch.equal(rec0.result, rec1.result)
    g0 = torch.autograd.grad(rec0.result.sum(), (x, q.lora_A, q.lora_B))
    g1 = torch.autograd.grad(rec1.result.sum(), (x, q.lora_A, q.lora_B))
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))


def test_stored_bits_backward_regenerates_when_s_was_copied(monkeypatch):
    """A saved-tensor hook that copies S (offloading) loses the bits behind it:
    backward then draws the mask again, the same mask, the same gradients."""
    layer = _layer(torch.float32, 0.3)
    x, dy = torch.randn(37, K_REF), torch.randn(37, N_REF)
    want = _step(layer, x, dy)
    fastlora.set_strategy("dropout", "stored_bits")
    draws = _CountDraws(monkeypatch)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
        got = _step(layer, x, dy)
    assert draws.n == 2
    assert _same(want, got)


def test_reference_accepts_and_ignores_the_kernel_strategies():
    layer = _layer(torch.float32, 0.2)
    x, dy = torch.randn(11, K_REF), torch.randn(11, N_REF)
    want = _step(layer, x, dy)
    fastlora.set_strategy("lora", "cublas")
    fastlora.set_strategy("qlora", "small_m")
    got = _step(layer, x, dy)
    assert _same(want, got)


def test_compile_fullgraph_with_stored_bits(monkeypatch):
    """Under torch.compile(fullgraph=True) the spec is a constant of the custom
    op: the mask is drawn once (forward) and backward uses the stored bits. With
    a fixed mask D, S = D(x) A^T and dS = s dY B give <dA, A> = <dS, S> and
    <dx - dY W, x> = <dS, S>: a different mask in backward breaks both."""
    layer = _layer(torch.float64, 0.4, bias=False)
    fastlora.set_strategy("dropout", "stored_bits")
    x, dy = torch.randn(3, 7, K_REF, dtype=torch.float64), torch.randn(3, 7, N_REF, dtype=torch.float64)
    compiled = torch.compile(layer, fullgraph=True)
    draws = _CountDraws(monkeypatch)
    xx = x.clone().requires_grad_(True)
    y = compiled(xx)
    y.backward(dy)
    assert draws.n == 1
    w, a, b, s = layer.weight, layer.lora_A.detach(), layer.lora_B.detach(), layer.scaling
    x2, y2, dy2 = x.reshape(-1, K_REF), y.detach().reshape(-1, N_REF), dy.reshape(-1, N_REF)
    S = torch.linalg.lstsq(b, ((y2 - x2 @ w.t()) / s).t()).solution.t()  # [M, r]; B has full rank
    inner = (s * dy2 @ b * S).sum()
    assert abs(inner) > 1e-3
    # float64 throughout: the identities hold to ~1e-12 relative; 1e-9 leaves headroom.
    assert abs((layer.lora_A.grad * a).sum() - inner) < 1e-9 * abs(inner)
    assert abs(((xx.grad.reshape(-1, K_REF) - dy2 @ w) * x2).sum() - inner) < 1e-9 * abs(inner)


# ---------------------------------------------------------------------------
# the Triton strategies under the interpreter
# ---------------------------------------------------------------------------

LORA_CASES = [
    # (M, K, N, r, bias, dropout): ragged with dropout (rank padded 8 -> 16), power of two without
    (37, 96, 80, 8, True, 0.3),
    (32, 64, 32, 16, False, 0.0),
]


def _kernels():
    from fastlora.kernels import lora as kl
    from fastlora.kernels import strategies as ks

    return kl, ks


def _make(m, k, n, r, dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
    a = (torch.randn(r, k, generator=g) / k**0.5).to(dtype)
    b = (torch.randn(n, r, generator=g) / r**0.5).to(dtype)
    bias_t = torch.randn(n, generator=g).to(dtype) if bias else None
    dy = torch.randn(m, n, generator=g).to(dtype)
    return x, w, a, b, bias_t, dy


def _naive(x, w, a, b, scaling, bias, mask, keep):
    """The formula in plain differentiable torch ops (any dtype), the given mask."""
    xd = x if mask is None else x * (mask.to(x.dtype) / keep)
    y = x @ w.t() + ((xd @ a.t()) @ b.t()) * scaling
    return y + bias if bias is not None else y


def _grads(fn, x, a, b, bias, dy):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, a, b)]
    bb = bias.detach().clone().requires_grad_(True) if bias is not None else None
    y = fn(leaves[0], leaves[1], leaves[2], bb)
    y.backward(dy)
    return [y.detach(), *(t.grad for t in leaves), bb.grad if bb is not None else None]


def _check_2x(ours, torch_same_dtype, oracle64, dtype, what):
    for name, o, t, want in zip(["y", "dx", "dA", "dB", "dbias"], ours, torch_same_dtype, oracle64):
        if want is None or want.numel() == 0:
            continue
        tol = tolerance_2x(t, want, dtype)  # 2x torch's own error + 4 ulp: torch may be exact by luck
        assert_close_to(o, want, tol, f"{what} {name}")


def _run_layer(fn, x, a, b, bias, dy, seed, frozen=()):
    """Forward (counted), backward twice (counted once, checked bit-identical), saved
    bytes (parameters and the ``frozen`` tensors excluded)."""
    kl, ks = _kernels()
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, a, b)]
    bb = bias.detach().clone().requires_grad_(True) if bias is not None else None
    inputs = [t for t in [*leaves, bb, *frozen] if t is not None]
    before = [(t.detach().clone(), t._version) for t in inputs]
    kl.reset_launch_count()
    ks.reset_torch_gemm_count()
    torch.manual_seed(seed)
    rec = record_saved_tensors(lambda: fn(leaves[0], leaves[1], leaves[2], bb), exclude=[leaves[1], leaves[2], bb, *frozen])
    fwd = (kl.launch_count(), ks.torch_gemm_count())
    y = rec.result
    kl.reset_launch_count()
    ks.reset_torch_gemm_count()
    y.backward(dy, retain_graph=True)
    bwd = (kl.launch_count(), ks.torch_gemm_count())
    first = [t.grad.clone() for t in leaves] + ([bb.grad.clone()] if bb is not None else [])
    for t in [*leaves, bb]:
        if t is not None:
            t.grad = None
    y.backward(dy)
    second = [t.grad for t in leaves] + ([bb.grad] if bb is not None else [])
    assert all(torch.equal(p, q) for p, q in zip(first, second)), "backward is not deterministic"
    for t, (value, version) in zip(inputs, before):
        assert t._version == version and torch.equal(t.detach(), value), f"input {tuple(t.shape)} was written"
    return [y.detach(), *first, *([None] if bb is None else [])], fwd, bwd, rec.nbytes


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", LORA_CASES, ids=lambda c: "x".join(map(str, c[:4])) + f"-p{c[5]}")
@pytest.mark.parametrize("lora_s", ["fused", "cublas"])
def test_lora_strategies_against_float64(lora_s, case, dtype):
    kl, _ = _kernels()
    m, k, n, r, bias, p = case
    x, w, a, b, bias_t, dy = _make(m, k, n, r, dtype, bias)
    scaling = 2.0
    drops = ["regenerate", "stored_bits"] if p > 0 else ["regenerate"]
    fastlora.set_strategy("lora", lora_s)
    for drop in drops:
        fastlora.set_strategy("dropout", drop)
        fn = lambda x_, a_, b_, bias_: fastlora.lora_linear(x_, w, a_, b_, scaling, bias_, dropout=p)  # noqa: E731
        ours, fwd, bwd, saved = _run_layer(fn, x, a, b, bias_t, dy, seed=11, frozen=[w])
        torch.manual_seed(11)
        seed = fastlora.functional.new_dropout_seed()
        mask, keep = kl.dropout_keep_mask(seed, (m, k), p, CPU) if p > 0 else (None, 1.0)
        oracle = _grads(lambda *t: _naive(*t[:1], w.double(), *t[1:3], scaling, t[3], mask, keep), *(
            v.double() if v is not None else None for v in (x, a, b, bias_t)), dy.double())  # fmt: skip
        own = _grads(lambda *t: _naive(*t[:1], w, *t[1:3], scaling, t[3], mask, keep), x, a, b, bias_t, dy)
        _check_2x(ours, own, oracle, dtype, f"lora={lora_s} dropout={drop}")
        gemms = 1 if lora_s == "cublas" else 0
        assert fwd == (2, gemms) and bwd == (3, gemms), f"launches {fwd} / {bwd}"
        mask_bytes = m * ((k + 7) // 8) if drop == "stored_bits" else 0
        assert saved == (m * k + m * r) * x.element_size() + mask_bytes


QLORA_CASES = [
    # (strategy, lora strategy, M, dropout, dtype): small M in fp16, ragged M with dropout in fp32
    ("dequant_in_gemm", "fused", 3, 0.0, torch.float16),
    ("dequant_once", "fused", 3, 0.0, torch.float16),
    ("dequant_once", "cublas", 37, 0.3, torch.float32),
    ("small_m", "fused", 3, 0.0, torch.float16),
    ("small_m", "fused", 12, 0.3, torch.float32),
    ("small_m", "fused", 37, 0.3, torch.float32),  # forced above 16 rows: three row blocks, still exact math
    ("dequant_in_gemm", "fused", 37, 0.3, torch.float32),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("case", QLORA_CASES, ids=lambda c: f"{c[0]}-{c[1]}-M{c[2]}-p{c[3]}-{str(c[4])[6:]}")
def test_qlora_strategies_against_float64(case):
    kl, _ = _kernels()
    qs, lora_s, m, p, dtype = case
    k, n, r = 70, 45, 5
    g = torch.Generator().manual_seed(3)
    qw = quantize_4bit(torch.randn(n, k, generator=g), "nf4", 64, True)
    w = dequantize_4bit(qw, dtype)  # exactly the values the kernels use
    x, _, a, b, bias_t, dy = _make(m, k, n, r, dtype, True, seed=4)
    fastlora.set_strategy("qlora", qs)
    fastlora.set_strategy("lora", lora_s)
    drops = ["regenerate", "stored_bits"] if p > 0 else ["regenerate"]
    for drop in drops:
        fastlora.set_strategy("dropout", drop)
        fn = lambda x_, a_, b_, bias_: fastlora.qlora_linear(x_, qw, a_, b_, 2.0, bias_, dropout=p)  # noqa: E731
        ours, fwd, bwd, saved = _run_layer(fn, x, a, b, bias_t, dy, seed=12)
        torch.manual_seed(12)
        seed = fastlora.functional.new_dropout_seed()
        mask, keep = kl.dropout_keep_mask(seed, (m, k), p, CPU) if p > 0 else (None, 1.0)
        oracle = _grads(lambda *t: _naive(*t[:1], w.double(), *t[1:3], 2.0, t[3], mask, keep), *(
            v.double() for v in (x, a, b, bias_t)), dy.double())  # fmt: skip
        own = _grads(lambda *t: _naive(*t[:1], w, *t[1:3], 2.0, t[3], mask, keep), x, a, b, bias_t, dy)
        _check_2x(ours, own, oracle, dtype, f"qlora={qs} lora={lora_s} dropout={drop}")
        once = qs == "dequant_once"
        gemms = 1 if once and lora_s == "cublas" else 0
        assert fwd == (2 + once, gemms) and bwd == (3 + once, gemms), f"launches {fwd} / {bwd}"
        mask_bytes = m * ((k + 7) // 8) if drop == "stored_bits" else 0
        assert saved == (m * k + m * r) * x.element_size() + mask_bytes


@pytest.mark.interpreter
def test_mixed_precision_adapters_take_the_default_kernels(monkeypatch):
    """fp32 adapters on 16-bit activations: every strategy hands the call to the
    default kernels' pair (forward and backward alike)."""
    from fastlora.kernels import nf4

    kl, ks = _kernels()
    called = []
    monkeypatch.setattr(kl, "lora_forward", lambda *a: called.append("lora fwd") or ("y", "s"))
    monkeypatch.setattr(kl, "lora_backward", lambda *a: called.append("lora bwd") or (None,) * 5)
    monkeypatch.setattr(nf4, "qlora_forward", lambda *a: called.append("qlora fwd") or ("y", "s"))
    monkeypatch.setattr(nf4, "qlora_backward", lambda *a: called.append("qlora bwd") or (None,) * 5)
    st = ks.TritonStrategy(lora="cublas", qlora="small_m", dropout="stored_bits")
    x, a = torch.zeros(2, 8, dtype=torch.float16), torch.zeros(1, 8)
    assert st.lora_forward(x, None, a, None, 1.0) == ("y", "s")
    st.lora_backward(None, x, None, a, None, None, 1.0)
    assert st.qlora_forward(x, None, a, None, 1.0) == ("y", "s")
    st.qlora_backward(None, x, None, a, None, None, 1.0)
    assert called == ["lora fwd", "lora bwd", "qlora fwd", "qlora bwd"]


@pytest.mark.interpreter
def test_fp32_adapters_on_fp16_through_forced_strategies():
    """PEFT's mixed precision through the op: whatever is forced, the call runs the
    default kernels (bit-identical to them), its gradients in the adapters' dtype."""
    x, w, a, b, bias_t, dy = _make(37, 64, 48, 8, torch.float16, True)
    a, b = a.float(), b.float()

    def run():
        leaves = [t.clone().requires_grad_(True) for t in (x, a, b)]
        torch.manual_seed(3)
        y = fastlora.lora_linear(leaves[0], w, leaves[1], leaves[2], 2.0, bias_t, dropout=0.2)
        y.backward(dy)
        return [y.detach()] + [t.grad for t in leaves]

    want = run()
    fastlora.set_strategy("lora", "cublas")
    fastlora.set_strategy("dropout", "stored_bits")
    got = run()
    assert [t.dtype for t in got] == [torch.float16, torch.float16, torch.float32, torch.float32]
    assert _same(want, got)


@pytest.mark.interpreter
def test_stored_bits_are_the_philox_mask():
    kl, ks = _kernels()
    x, _, a, _, _, _ = _make(37, 70, 8, 8, torch.float32, False)
    for seed in (0, 2**62 - 12345):
        s = ks.lora_shrink_store_bits(x, a, 0.3, seed)
        bits = stored_bits(s, 70)
        assert bits is not None
        mask, _ = kl.dropout_keep_mask(seed, (37, 70), 0.3, CPU)
        assert torch.equal(unpack_bits(bits, 70).bool(), mask)
        assert torch.equal(s, kl.lora_shrink(x, a, 0.3, seed))  # the same S, bit for bit


@pytest.mark.interpreter
@pytest.mark.parametrize("double_quant", [True, False])
def test_small_m_dequantizes_bit_exactly(double_quant):
    """One-hot rows pick single weights: Y = I deq(W)^T and dX = I deq(W) must be
    exactly the dequantized values (fp32 accumulation of one product)."""
    _, ks = _kernels()
    n, k = 45, 30
    qw = quantize_4bit(torch.randn(n, k, generator=torch.Generator().manual_seed(8)), "fp4", 64, double_quant)
    for dtype in (torch.float32, torch.float16):
        w = dequantize_4bit(qw, dtype)
        zero_l, eye_k, eye_n = torch.zeros(k, 1, dtype=dtype), torch.eye(k, dtype=dtype), torch.eye(n, dtype=dtype)
        y = ks.qlora_gemv(eye_k, qw, zero_l, torch.zeros(1, n, dtype=dtype), 1.0, w_rows_are_out=True)
        assert torch.equal(y, w.t())
        dx = ks.qlora_gemv(eye_n, qw, torch.zeros(n, 1), torch.zeros(1, k, dtype=dtype), 1.0, w_rows_are_out=False)
        assert torch.equal(dx, w)


@pytest.mark.interpreter
def test_measured_choice_inside_the_op():
    """With a timer (here injected) the first call times every candidate on its
    forward (running each), keeps the fastest, and the backward uses it too."""
    _, ks = _kernels()
    x, w, a, b, bias_t, dy = _make(20, 32, 32, 4, torch.float32, True)
    for t in (x, a, b):
        t.requires_grad_(True)
    times = {
        "lora=fused,dropout=regenerate": 4e-3, "lora=fused,dropout=stored_bits": 3e-3,
        "lora=cublas,dropout=regenerate": 2e-3, "lora=cublas,dropout=stored_bits": 1e-3,
    }  # fmt: skip
    timer = FakeTimer(times, run=True)
    with use_timer(timer):
        ks.reset_torch_gemm_count()
        y = fastlora.lora_linear(x, w, a, b, 2.0, bias_t, dropout=0.2)
        assert timer.calls == list(times)
        ks.reset_torch_gemm_count()
        y2 = fastlora.lora_linear(x, w, a, b, 2.0, bias_t, dropout=0.2)
        assert ks.torch_gemm_count() == 1  # the chosen cublas forward, nothing timed again
        y2.backward(dy)
        assert ks.torch_gemm_count() == 2  # and its backward (dX = [D(dS A)] + dY W)
        assert len(timer.calls) == 4
    (rec,) = fastlora.strategy_report()
    assert rec["chosen"] == "lora=cublas,dropout=stored_bits" and rec["source"] == "measured"
    assert rec["key"] == "lora|float32|M32|K32|N32|r16|dropout"
    del y


@pytest.mark.interpreter
def test_compile_fullgraph_with_a_measured_choice():
    """Under torch.compile the spec string is a constant ("triton:auto"): no graph
    break, and the candidates are timed when the compiled graph runs the op."""
    _, ks = _kernels()
    x, w, a, b, bias_t, dy = _make(20, 32, 32, 4, torch.float32, True)
    timer = FakeTimer({"lora=fused": 2e-3, "lora=cublas": 1e-3})

    def fn(x_, a_, b_):
        return fastlora.lora_linear(x_, w, a_, b_, 2.0, bias_t)

    leaves = [t.clone().requires_grad_(True) for t in (x, a, b)]
    with use_timer(timer):
        compiled = torch.compile(fn, fullgraph=True)
        y = compiled(*leaves)
        assert timer.calls == ["lora=fused", "lora=cublas"]
        ks.reset_torch_gemm_count()
        y.backward(dy)
        assert ks.torch_gemm_count() == 1  # the chosen cublas backward
    eager = [t.clone().requires_grad_(True) for t in (x, a, b)]
    fastlora.set_strategy("lora", "cublas")
    y_e = fn(*eager)
    y_e.backward(dy)
    assert torch.equal(y, y_e)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(leaves, eager))


# ---------------------------------------------------------------------------
# the cost model (bench/cost_model.py): exact counts where they are exact
# ---------------------------------------------------------------------------


def test_cost_model_counts():
    import cost_model as cm

    shape = cm.Shape(M=8192, K=4096, N=4096, r=16)
    fused = cm.launches("lora", "fused", "regenerate", shape, "fwd")
    assert [launch.name for launch in fused] == ["shrink", "gemm+lora"]
    assert fused[1].flops == 2 * 8192 * 4096 * 4096 + 2 * 8192 * 4096 * 16
    bits_fwd = cm.launches("lora", "fused", "stored_bits", shape, "fwd")
    assert bits_fwd[0].bytes - fused[0].bytes == 8192 * 4096 // 8  # the mask written once
    cublas = cm.launches("lora", "cublas", "regenerate", shape, "fwd")
    assert [launch.name for launch in cublas] == ["shrink", "rank_expand", "cublas addmm beta=1"]
    gemv = cm.launches("qlora", "small_m", "regenerate", cm.Shape(M=1, K=4096, N=4096, r=16), "fwd")
    assert gemv[1].bytes >= 4096 * 4096 // 2  # every 4-bit weight read once
    table = cm.table([shape], ["H200"], phases=("fwd",))
    assert "| lora" in table and "H200" in table


# ---------------------------------------------------------------------------
# AOT: every new kernel compiles for sm_80 / sm_90 without spills (subprocess)
# ---------------------------------------------------------------------------

_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _variants() -> list[dict]:
    """Per arch, dtype (fp32, bf16; fp16 takes bf16's configs) and rank bucket
    (16, 64): the config the launcher picks, for every mask mode and flag set a
    launch can have (~100 variants: ~1.5 min on 2 cores, seconds with a warm
    Triton cache)."""
    from fastlora.kernels import strategies as ks

    out = []
    for arch in ARCHS:
        for dtype in (torch.float32, torch.bfloat16):
            for block_r in (16, 64):
                base = dict(arch=arch, dtype=_NAMES[dtype], block_r=block_r)
                out.append(dict(base, kernel="shrink_bits", cfg=ks.shrink_bits_config(dtype, block_r), flags={}))
                # forward: scaling * S B^T + bias (S in x's dtype); dX: D(dS A), dS fp32, each mask mode
                for flags in [dict(MASK=0, HAS_BIAS=True, l="x")] + [dict(MASK=m, HAS_BIAS=False, l="fp32") for m in (0, 1, 2)]:
                    out.append(dict(base, kernel="rank_expand", cfg=ks.rank_expand_config(dtype, block_r), flags=flags))
                out.append(dict(base, kernel="down_grad_bits", cfg=ks.down_grad_bits_config(dtype, block_r), flags={}))
                for fwd in (True, False):
                    for mask in ((0,) if fwd else (1, 2)):
                        for nested in (True, False):
                            flags = dict(W_ROWS_ARE_OUT=fwd, MASK=mask, HAS_BIAS=fwd, NESTED=nested)
                            out.append(dict(base, kernel="qgemv", cfg=ks.qgemv_config(dtype, block_r), flags=flags))
    return out


def _compile_one(v: dict) -> dict:
    from fastlora.kernels import strategies as ks

    x = v["dtype"]
    flags = dict(v["flags"])
    l_dtype = flags.pop("l", "x")
    cfg = dict(v["cfg"])
    options = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
    constexprs = dict(cfg, IEEE=x == "fp32", BLOCK_R=v["block_r"], **flags)
    if v["kernel"] == "shrink_bits":
        fn, ptrs = ks._shrink_bits_kernel, dict(x_ptr=x, a_ptr=x, s_ptr=x, bits_ptr="u8")
        unit = ("stride_xk", "stride_ak", "stride_sr")
    elif v["kernel"] == "rank_expand":
        fn = ks._rank_expand_kernel
        ptrs = dict(l_ptr=x if l_dtype == "x" else "fp32", e_ptr=x, bias_ptr=x, out_ptr=x, bits_ptr="u8")
        unit = ("stride_lr", "stride_on") + (("stride_er",) if l_dtype == "x" else ("stride_en",))
    elif v["kernel"] == "down_grad_bits":
        fn = ks._down_grad_bits_kernel
        ptrs = dict(ds_ptr="fp32", x_ptr=x, bits_ptr="u8", da_ptr=x, ws_ptr="fp32", cnt_ptr="i32")
        unit = ("stride_dsr", "stride_xk")
    else:
        fn = ks._qgemv_kernel
        fwd = flags["W_ROWS_ARE_OUT"]
        ptrs = dict(p_ptr=x, packed_ptr="u8", quant_map_ptr="fp32", absmax_ptr="u8" if flags["NESTED"] else "fp32",
                    nested_absmax_ptr="fp32", nested_map_ptr="fp32", offset_ptr="fp32", l_ptr=x if fwd else "fp32",
                    e_ptr=x, bias_ptr=x, out_ptr=x, bits_ptr="u8", ws_ptr="fp32", cnt_ptr="i32")  # fmt: skip
        constexprs.update(BLOCKSIZE=64, NESTED_BLOCKSIZE=256)
        unit = ("stride_pk", "stride_lr", "stride_on") + (("stride_er",) if fwd else ("stride_en",))
        options["enable_fp_fusion"] = False
    fn = jit_function(fn)
    constexprs.update({name: 1 for name in unit})
    signature = launch_signature(fn, constexprs, ptrs)
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in fn.arg_names if n in ptrs}
    return compile_variant(v, fn, signature, constexprs, attrs, options)


def main() -> None:
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=2) as pool:
        for result in pool.map(_compile_one, _variants(), chunksize=1):
            print(json.dumps(result), flush=True)


def _describe(r: dict) -> str:
    flags = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in r["flags"].items())
    cfg = " ".join(f"{k}={v}" for k, v in r["cfg"].items())
    return f"{r['kernel']:14s} sm_{r['arch']} {r['dtype']} R={r['block_r']:<3d} {flags:40s} {cfg}"


@pytest.mark.aot
def test_every_strategy_kernel_compiles_without_spills():
    pytest.importorskip("triton")
    results = compile_in_subprocess(__file__)
    kernels = {"shrink_bits", "rank_expand", "down_grad_bits", "qgemv"}
    check_compiled(results, kernels, _describe, "fix the config in kernels/strategies.py")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    warnings.simplefilter("ignore")
    main()
