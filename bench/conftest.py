"""pytest-benchmark setup for ``bench/``.

    python -m pytest bench -q [--bench-device cpu|cuda] [--bench-quick] [--bench-threads N]

The device defaults to CUDA when one is available. On CPU fastlora runs its
reference path (backend "reference"), on CUDA the Triton kernels (backend
"auto"). Shapes come from ``bench/report.py`` (the same as the report's).
Nothing here sets ``TRITON_INTERPRET``: benchmarks measure real code paths.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import fastlora  # noqa: E402
import report  # noqa: E402


def pytest_addoption(parser):
    group = parser.getgroup("fastlora-bench")
    group.addoption("--bench-device", choices=("cpu", "cuda"), default=None,
                    help="device to benchmark on (default: cuda when available, else cpu)")
    group.addoption("--bench-quick", action="store_true", help="one small shape, few rounds")
    group.addoption("--bench-threads", type=int, default=None, help="torch CPU threads (default: torch's)")


def _device(config) -> str:
    dev = config.getoption("--bench-device") or os.environ.get("FASTLORA_BENCH_DEVICE")
    return dev or ("cuda" if torch.cuda.is_available() else "cpu")


def pytest_configure(config):
    # peft/transformers import torch.jit.script_method (deprecated); not ours.
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
    threads = config.getoption("--bench-threads", default=None)
    if threads:
        torch.set_num_threads(threads)


def pytest_generate_tests(metafunc):
    if "bench_shape" in metafunc.fixturenames:
        shapes = report.default_shapes(_device(metafunc.config), metafunc.config.getoption("--bench-quick"))
        metafunc.parametrize("bench_shape", shapes, ids=[s.id for s in shapes])


@pytest.fixture(scope="session")
def bench_device(pytestconfig) -> str:
    dev = _device(pytestconfig)
    if dev == "cuda" and not torch.cuda.is_available():
        pytest.skip("--bench-device cuda but no CUDA device is available")
    return dev


@pytest.fixture(scope="session")
def bench_rounds(pytestconfig, bench_device) -> tuple[int, int]:
    """(rounds, warmup_rounds) for benchmark.pedantic."""
    if pytestconfig.getoption("--bench-quick"):
        return 5, 1
    return (50, 10) if bench_device == "cuda" else (10, 2)


@pytest.fixture(autouse=True)
def _bench_backend(bench_device):
    fastlora.set_backend("reference" if bench_device == "cpu" else "auto")
    yield
    fastlora.set_backend("auto")
