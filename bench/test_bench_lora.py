"""pytest-benchmark suite: one LoRA linear layer, fastlora vs PEFT vs a frozen nn.Linear.

Forward (building the graph, as in training), backward (its forward runs in
the untimed setup) and forward+backward, dropout 0 and 0.1, identical weights
(layers built by ``bench/report.py``). Each benchmark also records in
``extra_info``: p20/p80 (ms), TFLOP/s of the median, bytes saved for backward
and, for fastlora on the Triton backend, kernel launches per call.
Nothing here asserts a timing.

    make bench                      # or: python -m pytest bench -q
    python -m pytest bench -q --bench-quick --benchmark-json=out.json
"""

from __future__ import annotations

import statistics

import pytest
import torch

pytest.importorskip("pytest_benchmark", reason="pytest-benchmark is not installed (pip install 'fastlora[bench]')")

from report import (  # noqa: E402 - bench/ is on sys.path (bench/conftest.py)
    DROPOUTS,
    PHASES,
    build_layers,
    clear_grads,
    count_launches,
    frozen_tensors,
    have_peft,
    make_inputs,
    sync,
)
from saved_bytes import saved_activation_bytes  # noqa: E402

from fastlora._backend import resolve_backend  # noqa: E402

CASES = [("fastlora", p) for p in DROPOUTS] + [("peft", p) for p in DROPOUTS] + [("linear", 0.0)]
_LAYERS: dict = {}


def _layers(shape, dropout, device):
    """Layers and inputs of one (shape, dropout), built once per session."""
    key = (shape, dropout, device)
    if key not in _LAYERS:
        _LAYERS.clear()  # keep one set alive at a time (GPU memory)
        _LAYERS[key] = (build_layers(shape, dropout, device), *make_inputs(shape, device))
    return _LAYERS[key]


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("impl,dropout", CASES, ids=[f"{i}-p{p:g}" for i, p in CASES])
def test_lora_layer(benchmark, bench_shape, bench_device, bench_rounds, impl, dropout, phase):
    if impl == "peft" and not have_peft():
        pytest.skip("peft is not installed: the PEFT baseline is skipped (pip install 'fastlora[bench]')")
    layers, x, dy = _layers(bench_shape, dropout, bench_device)
    mod = layers[impl]
    rounds, warmup = bench_rounds
    benchmark.group = f"{bench_shape.id} p={dropout:g} {phase}"
    benchmark.extra_info.update(
        {"impl": impl, "phase": phase, "dropout": dropout, "shape": bench_shape.label, "device": bench_device,
         "backend": resolve_backend(x.device) if impl == "fastlora" else "torch"}
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

    data = getattr(getattr(getattr(benchmark, "stats", None), "stats", None), "data", None)
    if data:
        times = sorted(data)
        q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else [times[0]] * 9
        med = statistics.median(times)
        benchmark.extra_info.update(
            {"median_ms": med * 1e3, "p20_ms": q[1] * 1e3, "p80_ms": q[7] * 1e3,
             "tflops": bench_shape.flops(impl, phase) / med / 1e12}
        )
    if phase == "fwd":
        benchmark.extra_info["saved_bytes"] = saved_activation_bytes(lambda: mod(x), exclude=frozen_tensors(mod))
        if impl == "fastlora" and resolve_backend(x.device) == "triton":
            counts = count_launches(mod, x, dy)
            if counts:
                benchmark.extra_info["launches_fwd"], benchmark.extra_info["launches_bwd"] = counts
    clear_grads(mod, x)
    if bench_device == "cuda":
        torch.cuda.synchronize()
