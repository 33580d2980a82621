"""pytest-benchmark suite: one DoRA linear layer, fastlora DoRA vs fastlora LoRA vs PEFT's DoRA.

Forward (building the graph, as in training), backward (its forward runs in
the untimed setup) and forward+backward, dropout 0 and 0.1, identical weights
(layers built by ``bench/report_dora.py``; its one shape per device, the quick
one with ``--bench-quick``). Each benchmark also records in ``extra_info``:
p20/p80 (ms), TFLOP/s of the median and the bytes saved for backward.
Nothing here asserts a timing.

    python -m pytest bench/test_bench_dora.py -q --bench-quick
"""

from __future__ import annotations

import statistics

import pytest
import torch

pytest.importorskip("pytest_benchmark", reason="pytest-benchmark is not installed (pip install 'fastlora[bench]')")

from report import DROPOUTS, PHASES, clear_grads, frozen_tensors, have_peft, make_inputs, sync  # noqa: E402
from report_dora import IMPLS, build_dora_layers, default_shapes, dora_flops  # noqa: E402
from saved_bytes import saved_activation_bytes  # noqa: E402

from fastlora._backend import resolve_backend  # noqa: E402

_LAYERS: dict = {}


def _layers(shape, dropout, device):
    """Layers and inputs of one (shape, dropout), one set alive at a time (GPU memory)."""
    key = (shape, dropout, device)
    if key not in _LAYERS:
        _LAYERS.clear()
        _LAYERS[key] = (build_dora_layers(shape, dropout, device), *make_inputs(shape, device))
    return _LAYERS[key]


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dropout", DROPOUTS, ids=lambda p: f"p{p:g}")
def test_dora_layer(benchmark, pytestconfig, bench_device, bench_rounds, dropout, impl, phase):
    if impl == "peft_dora" and not have_peft():
        pytest.skip("peft is not installed: the PEFT DoRA baseline is skipped (pip install 'fastlora[bench]')")
    shape = default_shapes(bench_device, bool(pytestconfig.getoption("--bench-quick")))[0]
    layers, x, dy = _layers(shape, dropout, bench_device)
    mod = layers[impl]
    rounds, warmup = bench_rounds
    benchmark.group = f"dora {shape.id} p={dropout:g} {phase}"
    benchmark.extra_info.update(
        {"impl": impl, "phase": phase, "dropout": dropout, "shape": shape.label, "device": bench_device,
         "backend": resolve_backend(x.device) if impl != "peft_dora" else "torch"}
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
             "tflops": dora_flops(shape, impl, phase) / med / 1e12}
        )
    if phase == "fwd":
        benchmark.extra_info["saved_bytes"] = saved_activation_bytes(lambda: mod(x), exclude=frozen_tensors(mod))
    clear_grads(mod, x)
    if bench_device == "cuda":
        torch.cuda.synchronize()


def test_dora_layers_agree(bench_device, pytestconfig):
    """The three layers compute what they should on the shared weights: fastlora's and
    PEFT's DoRA the same output; fastlora's LoRA a different one (m is not the init)."""
    shape = default_shapes(bench_device, bool(pytestconfig.getoption("--bench-quick")))[0]
    layers, x, _ = _layers(shape, 0.0, bench_device)
    with torch.no_grad():
        y = {impl: layers[impl](x).float() for impl in layers}
    scale = y["dora"].abs().max().item()
    if "peft_dora" in y:
        tol = 64 * torch.finfo(shape.dtype).eps * scale
        assert (y["dora"] - y["peft_dora"]).abs().max().item() <= tol
    assert (y["dora"] - y["lora"]).abs().max().item() > 1e-3 * scale
