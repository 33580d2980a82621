"""pytest-benchmark suite: QLoRA, fastlora vs bitsandbytes (+ PEFT).

* ``test_dequant``: dequantize one 4-bit weight (nf4 / fp4, double quant on /
  off, blocksize 64; output fp32 / fp16 / bf16 on CPU, bf16 on CUDA, as the
  report): fastlora (reference on CPU, Triton kernel on CUDA) vs
  ``bitsandbytes.functional.dequantize_4bit`` vs a device copy of the output's
  bytes. ``extra_info``: p20/p80 (ms), GB/s (quant state read + output
  written; the copy: 2x the output).
* ``test_qlora_layer``: forward (building the graph), backward (its forward
  runs in the untimed setup) and forward+backward of fastlora ``QLoRALinear``
  vs fastlora ``LoRALinear`` (full-precision weight) vs PEFT LoRA on a
  bitsandbytes ``Linear4bit``; identical weights. ``extra_info``: p20/p80,
  TFLOP/s, base-weight bytes and bytes saved for backward (exact).

Shapes and builders come from ``bench/report_qlora.py``: one dequant size and
one layer shape per device (the first of the report's; ``--bench-quick``: the
report's quick ones). Nothing here asserts a timing.

    python -m pytest bench/test_bench_qlora.py -q --bench-quick
"""

from __future__ import annotations

import statistics

import pytest
import torch

pytest.importorskip("pytest_benchmark", reason="pytest-benchmark is not installed (pip install 'fastlora[bench]')")

from report import PHASES, clear_grads, frozen_tensors, make_inputs, sync  # noqa: E402 - bench/ is on sys.path
from report_qlora import (  # noqa: E402
    DOUBLE_QUANT,
    LAYER_IMPLS,
    QUANT_TYPES,
    DequantCase,
    base_weight_bytes,
    build_dequant,
    build_qlora_layers,
    default_dequant_cases,
    default_layer_shapes,
    dequant_dtypes,
    have_bnb,
    have_peft,
)
from saved_bytes import saved_activation_bytes  # noqa: E402

from fastlora._backend import resolve_backend  # noqa: E402

_CACHE: dict = {}


def _cached(key, build):
    """One built object alive at a time (GPU memory), rebuilt when the key changes."""
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = build()
    return _CACHE[key]


def _quick(pytestconfig) -> bool:
    return bool(pytestconfig.getoption("--bench-quick"))


def _record_quantiles(benchmark) -> float | None:
    """p20/p80/median (ms) into extra_info; returns the median in seconds."""
    data = getattr(getattr(getattr(benchmark, "stats", None), "stats", None), "data", None)
    if not data:
        return None
    times = sorted(data)
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else [times[0]] * 9
    med = statistics.median(times)
    benchmark.extra_info.update({"median_ms": med * 1e3, "p20_ms": q[1] * 1e3, "p80_ms": q[7] * 1e3})
    return med


@pytest.mark.parametrize("impl", ["fastlora", "bnb", "copy"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("double_quant", DOUBLE_QUANT, ids=lambda dq: f"dq{int(dq)}")
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_dequant(benchmark, pytestconfig, bench_device, bench_rounds, quant_type, double_quant, dtype, impl):
    if impl == "bnb" and not have_bnb():
        pytest.skip("bitsandbytes is not importable: the bitsandbytes baseline is skipped")
    if dtype not in dequant_dtypes(bench_device):
        pytest.skip(f"the report dequantizes to {dequant_dtypes(bench_device)} on {bench_device}")
    size = default_dequant_cases(bench_device, _quick(pytestconfig))[0]
    case = DequantCase(size.N, size.K, quant_type, double_quant, dtype)
    fns, info = _cached(("dequant", case, bench_device), lambda: build_dequant(case, bench_device))
    if impl not in fns:
        pytest.skip(f"{impl} dequantize is unavailable here: {'; '.join(info['notes']) or 'see report_qlora.py'}")
    fn = fns[impl]
    rounds, warmup = bench_rounds
    benchmark.group = f"dequant {case.id}"
    benchmark.extra_info.update({"impl": impl, "case": case.label, "device": bench_device,
                                 "fastlora_impl": info["fastlora_impl"], "bytes_moved": info["bytes_moved"]})

    def target():
        fn()
        sync(bench_device)

    benchmark.pedantic(target, rounds=rounds, warmup_rounds=warmup, iterations=1)
    med = _record_quantiles(benchmark)
    if med:
        moved = 2 * info["bytes_written"] if impl == "copy" else info["bytes_moved"]
        benchmark.extra_info["gbps"] = moved / med / 1e9


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("impl", LAYER_IMPLS)
def test_qlora_layer(benchmark, pytestconfig, bench_device, bench_rounds, impl, phase):
    if impl == "bnb_peft" and not (have_bnb() and have_peft()):
        pytest.skip("bitsandbytes or peft is not importable: the bitsandbytes + PEFT baseline is skipped")
    shape = default_layer_shapes(bench_device, _quick(pytestconfig))[0]
    layers, x, dy = _cached(("layer", shape, bench_device),
                            lambda: (build_qlora_layers(shape, bench_device), *make_inputs(shape, bench_device)))
    mod = layers[impl]
    rounds, warmup = bench_rounds
    benchmark.group = f"qlora layer {shape.id} {phase}"
    benchmark.extra_info.update(
        {"impl": impl, "phase": phase, "shape": shape.label, "device": bench_device,
         "backend": resolve_backend(x.device) if impl != "bnb_peft" else "bitsandbytes"}
    )

    if phase == "bwd":
        def setup():
            clear_grads(mod, x)
            y = mod(x)
            sync(bench_device)
            return (y,), {}

        def target(y):
            y.backward(dy)
            sync(bench_device)
    else:
        def setup():
            clear_grads(mod, x)
            sync(bench_device)

        def target():
            y = mod(x)
            if phase == "both":
                y.backward(dy)
            sync(bench_device)

    benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=warmup, iterations=1)
    med = _record_quantiles(benchmark)
    if med:
        benchmark.extra_info["tflops"] = shape.flops("fastlora", phase) / med / 1e12
    if phase == "fwd":
        benchmark.extra_info["weight_bytes"] = base_weight_bytes(impl, mod)
        benchmark.extra_info["saved_bytes"] = saved_activation_bytes(lambda: mod(x), exclude=frozen_tensors(mod))
    clear_grads(mod, x)
    if bench_device == "cuda":
        torch.cuda.synchronize()
