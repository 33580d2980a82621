"""pytest-benchmark suite: fastlora's CPU dropout strategies (reference path).

One forward+backward of a LoRA layer with dropout 0.1 per call: fastlora
``LoRALinear`` with the mask regenerated in backward (``regenerate``) or
stored as bits (``stored_bits``), the same layer without dropout, PEFT LoRA
with dropout 0.1 and the frozen ``nn.Linear``. Layers and timing pieces come
from ``bench/report_dropout.py`` (M=2048 K=1024 N=1024 r=16 fp32;
``--bench-quick``: 512 x 512 x 512). CPU only, like the report. Nothing here
asserts a timing.

    python -m pytest bench/test_bench_dropout.py -q --bench-quick
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("pytest_benchmark", reason="pytest-benchmark is not installed (pip install 'fastlora[bench]')")

from report import make_inputs, parse_shape  # noqa: E402 - bench/ is on sys.path
from report_dropout import IMPLS, LABELS, build, one_call  # noqa: E402

from fastlora.strategies import forced_strategies, set_strategy  # noqa: E402

_CACHE: dict = {}


@pytest.mark.parametrize("impl", IMPLS)
def test_dropout_step(benchmark, pytestconfig, bench_device, bench_rounds, impl):
    if bench_device != "cpu":
        pytest.skip("the dropout report is CPU-only (on CUDA the chooser times the strategies)")
    quick = bool(pytestconfig.getoption("--bench-quick"))
    shape = parse_shape("512x512x512x16" if quick else "2048x1024x1024x16", torch.float32)
    if shape not in _CACHE:
        _CACHE.clear()
        _CACHE[shape] = (build(shape, 0.1), make_inputs(shape, "cpu"))
    layers, (x, dy) = _CACHE[shape]
    if impl not in layers:
        pytest.skip(f"{LABELS[impl]} is unavailable here (peft not installed)")
    module, strategy = layers[impl]
    rounds, warmup = bench_rounds
    benchmark.group = f"dropout {shape.id}"
    benchmark.extra_info.update({"impl": LABELS[impl], "shape": shape.label, "dropout_strategy": strategy})
    before = forced_strategies().get("dropout")
    try:
        benchmark.pedantic(lambda: one_call(module, strategy, x, dy, "both"), rounds=rounds, warmup_rounds=warmup,
                           iterations=1)
    finally:
        set_strategy("dropout", before)
