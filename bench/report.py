#!/usr/bin/env python
"""Benchmark report: fastlora's LoRA linear vs PEFT's LoRA vs a frozen nn.Linear.

    python bench/report.py --out bench/results [--device cpu|cuda] [--quick]

For each shape and dropout (0 and 0.1) it measures forward, backward and
forward+backward (median with 20th/80th percentiles over ``--reps`` repeats
after ``--warmup`` rounds; the three implementations are interleaved round by
round so that background load hits them alike), the bytes autograd saves for
backward (exact, via saved-tensor hooks), kernel launches per layer on the
Triton backend (fastlora's own counter and, on CUDA, the profiler's count of
CUDA kernels), peak memory on CUDA and TFLOP/s. It writes
``lora_<device>.csv`` and ``lora_<device>.md`` into ``--out``, stamped with the
device, versions, date and command.

On CPU fastlora runs its reference path (PyTorch ops); on CUDA the Triton
kernels (backend "auto"). PEFT is measured through its own ``lora.Linear``
layer (built by ``get_peft_model`` with adapters in the base dtype, so the
comparison is dtype for dtype) with the same weights as fastlora's layer.

The layer builders here are shared with ``bench/test_bench_lora.py``.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import gc
import importlib.util
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import torch  # noqa: E402
from torch import nn  # noqa: E402

import fastlora  # noqa: E402
from fastlora._backend import resolve_backend  # noqa: E402
from saved_bytes import saved_activation_bytes  # noqa: E402

IMPLS = ("fastlora", "peft", "linear")
PHASES = ("fwd", "bwd", "both")
DROPOUTS = (0.0, 0.1)
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class Shape:
    """One benchmarked layer: x [M, K] -> y [M, N], LoRA rank r."""

    M: int
    K: int
    N: int
    r: int
    dtype: torch.dtype

    @property
    def label(self) -> str:
        return f"M={self.M} K={self.K} N={self.N} r={self.r} {SHORT.get(self.dtype, str(self.dtype))}"

    @property
    def id(self) -> str:
        return f"{self.M}x{self.K}x{self.N}-r{self.r}-{SHORT.get(self.dtype, str(self.dtype))}"

    def flops(self, impl: str, phase: str) -> int:
        """Useful FLOPs of one call (2 per multiply-add).

        LoRA fwd: X W^T (2MNK) + shrink (2MrK) + expand (2MNr).
        LoRA bwd: dX = dY W (2MNK) + dS = dY B (2MNr) + dB = dY^T S (2MNr)
                  + dS A (2MrK) + dA = dS^T X (2MrK).
        Frozen nn.Linear: fwd 2MNK, bwd (dX only) 2MNK.
        """
        M, K, N, r = self.M, self.K, self.N, self.r
        if impl == "linear":
            fwd = bwd = 2 * M * N * K
        else:
            fwd = 2 * M * N * K + 2 * M * r * K + 2 * M * N * r
            bwd = 2 * M * N * K + 4 * M * N * r + 4 * M * r * K
        return {"fwd": fwd, "bwd": bwd, "both": fwd + bwd}[phase]


def parse_shape(text: str, dtype: torch.dtype) -> Shape:
    """``"2048x1024x1024x16"`` (M x K x N x r) -> Shape."""
    M, K, N, r = (int(v) for v in text.lower().split("x"))
    return Shape(M, K, N, r, dtype)


def default_shapes(device: str, quick: bool) -> list[Shape]:
    if device == "cuda":
        shapes = [Shape(4096, 4096, 4096, 16, torch.bfloat16), Shape(8192, 4096, 4096, 16, torch.bfloat16)]
        return shapes[:1] if quick else shapes
    shapes = [Shape(2048, 1024, 1024, 16, torch.float32), Shape(512, 512, 512, 16, torch.float32)]
    return shapes[1:] if quick else shapes


def default_reps(shape: Shape, device: str, quick: bool) -> int:
    """Repeats per measurement: 50 on CUDA; on CPU about 2e11 FLOP's worth of
    fwd+bwd, clamped to [15, 60] (small shapes are cheap, and noisier)."""
    if quick:
        return 5
    if device == "cuda":
        return 50
    return max(15, min(60, int(2e11 / shape.flops("fastlora", "both"))))


def have_peft() -> bool:
    return importlib.util.find_spec("peft") is not None


# --------------------------------------------------------------------------- layers


def build_layers(shape: Shape, dropout: float, device: str, seed: int = 0, bias: bool = True,
                 with_peft: bool = True) -> dict[str, nn.Module]:
    """fastlora ``LoRALinear``, PEFT ``lora.Linear`` (when peft is installed) and a
    frozen ``nn.Linear``, all with identical weights, in training mode.

    lora_B is random (not PEFT's zero init) so that the LoRA branch is real math.
    alpha = 2r (scaling 2).
    """
    g = torch.Generator().manual_seed(seed)
    K, N, r, dtype = shape.K, shape.N, shape.r, shape.dtype
    w = torch.randn(N, K, generator=g) / math.sqrt(K)
    b = torch.randn(N, generator=g) * 0.1 if bias else None
    a_init = torch.randn(r, K, generator=g) / math.sqrt(K)
    b_init = torch.randn(N, r, generator=g) * 0.1

    def frozen_linear() -> nn.Linear:
        lin = nn.Linear(K, N, bias=bias, device=device, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if bias:
                lin.bias.copy_(b)
        return lin.requires_grad_(False).train()

    layers: dict[str, nn.Module] = {}
    fl = fastlora.LoRALinear.from_linear(frozen_linear(), r=r, alpha=2.0 * r, dropout=dropout)
    with torch.no_grad():
        fl.lora_A.copy_(a_init)
        fl.lora_B.copy_(b_init)
    layers["fastlora"] = fl.train()
    if with_peft and have_peft():
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=["0"], bias="none")
        # NOTE: autocast_adapter_dtype=False keeps the adapters in the base dtype
        # (PEFT's default upcasts bf16/fp16 adapters to fp32 and then casts x to
        # fp32 on every call, which is slower and saves an fp32 copy of x).
        wrapped = get_peft_model(nn.Sequential(frozen_linear()), cfg, autocast_adapter_dtype=False)
        peft_layer = wrapped.base_model.model[0]
        with torch.no_grad():
            peft_layer.lora_A["default"].weight.copy_(a_init)
            peft_layer.lora_B["default"].weight.copy_(b_init)
        assert abs(peft_layer.scaling["default"] - fl.scaling) < 1e-12
        layers["peft"] = peft_layer.train()
    layers["linear"] = frozen_linear()
    return layers


def make_inputs(shape: Shape, device: str, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape.M, shape.K, generator=g).to(device=device, dtype=shape.dtype).requires_grad_(True)
    dy = torch.randn(shape.M, shape.N, generator=g).to(device=device, dtype=shape.dtype)
    return x, dy


def clear_grads(module: nn.Module, x: torch.Tensor) -> None:
    x.grad = None
    for p in module.parameters():
        p.grad = None


def frozen_tensors(module: nn.Module) -> list[torch.Tensor]:
    """Parameters and buffers: what saved-bytes counting leaves out."""
    return list(module.parameters()) + list(module.buffers())


# --------------------------------------------------------------------------- timing


class Clock:
    """Wall time of a region: perf_counter on CPU, CUDA events on CUDA."""

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"

    def start(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def stop(self, started) -> float:
        """Seconds since ``started``."""
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            ev.synchronize()
            return started.elapsed_time(ev) / 1e3
        return time.perf_counter() - started


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_phase(module: nn.Module, x: torch.Tensor, dy: torch.Tensor, phase: str, clock: Clock, device: str) -> float:
    """Seconds for one forward ("fwd", graph built as in training), one backward
    ("bwd"; its forward runs untimed) or both ("both")."""
    clear_grads(module, x)
    if phase == "bwd":
        y = module(x)
        sync(device)
        t0 = clock.start()
        y.backward(dy)
        return clock.stop(t0)
    sync(device)
    t0 = clock.start()
    y = module(x)
    if phase == "both":
        y.backward(dy)
    elapsed = clock.stop(t0)
    del y
    return elapsed


def measure(layers: dict[str, nn.Module], impls: list[str], x, dy, device: str, reps: int, warmup: int,
            phases=PHASES) -> dict[tuple[str, str], list[float]]:
    """Samples (seconds) per (impl, phase), the implementations interleaved round by round."""
    clock = Clock(device)
    samples: dict[tuple[str, str], list[float]] = {(i, p): [] for i in impls for p in phases}
    for rnd in range(warmup + reps):
        for impl in impls:
            for phase in phases:
                t = time_phase(layers[impl], x, dy, phase, clock, device)
                if rnd >= warmup:
                    samples[(impl, phase)].append(t)
    for impl in impls:
        clear_grads(layers[impl], x)
    return samples


def quantiles(values: list[float]) -> tuple[float, float, float]:
    """(p20, median, p80) with linear interpolation."""
    if not values:
        return (math.nan, math.nan, math.nan)
    if len(values) == 1:
        return (values[0],) * 3
    q = statistics.quantiles(values, n=10, method="inclusive")  # deciles q[0]=p10 ... q[8]=p90
    return (q[1], statistics.median(values), q[7])


# --------------------------------------------------------------------------- counts


def kernel_module():
    """``fastlora.kernels.lora`` when it imports and exposes ``launch_count``, else None."""
    try:
        from fastlora.kernels import lora as klora  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - absent, half-written or no triton: no counts
        return None
    if not (hasattr(klora, "launch_count") and hasattr(klora, "reset_launch_count")):
        return None
    return klora


def count_launches(module: nn.Module, x, dy) -> tuple[int, int] | None:
    """(forward, backward) Triton launches of one call, from the kernels' own counter."""
    klora = kernel_module()
    if klora is None:
        return None
    clear_grads(module, x)
    klora.reset_launch_count()
    y = module(x)
    fwd = klora.launch_count()
    klora.reset_launch_count()
    y.backward(dy)
    bwd = klora.launch_count()
    clear_grads(module, x)
    return fwd, bwd


def profiler_kernels(module: nn.Module, x, dy) -> tuple[int, int, list[str], list[str]]:
    """(forward, backward) CUDA kernels seen by torch.profiler, and their names."""
    from torch.profiler import ProfilerActivity, profile

    def kernels(prof) -> list[str]:
        # NOTE: memcpy/memset activities are CUDA events too, but not kernel launches.
        return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                and not e.name.startswith(("Memcpy", "Memset"))]

    clear_grads(module, x)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as pf:
        y = module(x)
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as pb:
        y.backward(dy)
        torch.cuda.synchronize()
    clear_grads(module, x)
    f, b = kernels(pf), kernels(pb)
    return len(f), len(b), f, b


def interpreter_launches(shape: Shape, dropout: float, timeout: float = 240.0) -> tuple[tuple[int, int] | None, str]:
    """Launch counts on the Triton backend measured on CPU under the interpreter
    (a subprocess, since TRITON_INTERPRET must be set before kernels import),
    at a small shape with the same rank. Returns (counts or None, note)."""
    small = Shape(64, 64, 48, shape.r, torch.float32)
    env = dict(os.environ, TRITON_INTERPRET="1", FASTLORA_BACKEND="triton")
    cmd = [sys.executable, os.path.abspath(__file__), "--_launches", f"{small.M}x{small.K}x{small.N}x{small.r}",
           "--_dropout", str(dropout)]
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, "interpreter run timed out"
    for line in out.stdout.splitlines():
        if line.startswith("LAUNCHES "):
            data = json.loads(line[len("LAUNCHES "):])
            if data.get("counts") is None:
                return None, data.get("note", "no counter")
            return tuple(data["counts"]), f"interpreter, {small.label}"
    tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["no output"]
    return None, f"interpreter run failed: {tail[0][:120]}"


def _launches_child(shape_text: str, dropout: float) -> int:
    """Child of :func:`interpreter_launches`: print the counts as one JSON line."""
    shape = parse_shape(shape_text, torch.float32)
    if kernel_module() is None:
        print("LAUNCHES " + json.dumps({"counts": None, "note": "fastlora.kernels.lora has no launch_count()"}))
        return 0
    fastlora.set_backend("triton")
    layers = build_layers(shape, dropout, "cpu", with_peft=False)
    x, dy = make_inputs(shape, "cpu")
    counts = count_launches(layers["fastlora"], x, dy)
    print("LAUNCHES " + json.dumps({"counts": list(counts) if counts else None}))
    return 0


def peak_memory_mib(module: nn.Module, x, dy) -> float:
    """Peak CUDA memory above the starting point during one forward+backward, MiB."""
    clear_grads(module, x)
    gc.collect()
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    y = module(x)
    y.backward(dy)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - start
    del y
    clear_grads(module, x)
    return peak / 2**20


# --------------------------------------------------------------------------- report


def versions() -> dict[str, str]:
    def ver(name: str) -> str:
        if importlib.util.find_spec(name) is None:
            return "absent"
        try:
            return __import__(name).__version__
        except Exception as exc:  # noqa: BLE001
            return f"error: {type(exc).__name__}"

    return {"torch": torch.__version__, "triton": ver("triton"), "peft": ver("peft"), "fastlora": fastlora.__version__,
            "python": platform.python_version()}


def _loadavg() -> str:
    """1-minute load average (CPU timings on a shared machine need this context)."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "n/a"


loadavg = _loadavg  # public name, for bench/report_qlora.py


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu} ({os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()})"


def run_case(shape: Shape, dropout: float, device: str, args, launches_cache: dict) -> dict:
    """All measurements of one (shape, dropout) row."""
    layers = build_layers(shape, dropout, device)
    impls = [i for i in IMPLS if i in layers]
    x, dy = make_inputs(shape, device)
    row: dict = {"shape": shape.label, "M": shape.M, "K": shape.K, "N": shape.N, "r": shape.r,
                 "dtype": SHORT.get(shape.dtype, str(shape.dtype)), "dropout": dropout,
                 "backend": resolve_backend(x.device)}

    # Correctness sanity (dropout 0 only: masks differ between implementations).
    if "peft" in layers and dropout == 0.0:
        with torch.no_grad():
            a, b = layers["fastlora"](x), layers["peft"](x)
            row["max_abs_diff_vs_peft"] = float((a.float() - b.float()).abs().max())

    # Saved-for-backward bytes (exact, deterministic).
    for impl in impls:
        mod = layers[impl]
        row[f"{impl}_saved_bytes"] = saved_activation_bytes(lambda m=mod: m(x), exclude=frozen_tensors(mod))
    if "peft" in layers:
        row["saved_ratio_fastlora_peft"] = row["fastlora_saved_bytes"] / row["peft_saved_bytes"]
    row["saved_floor_bytes_X_plus_S"] = x.numel() * x.element_size() + shape.M * shape.r * x.element_size()

    # Timings.
    reps = args.reps or default_reps(shape, device, args.quick)
    row["reps"], row["warmup"] = reps, args.warmup
    samples = measure(layers, impls, x, dy, device, reps, args.warmup)
    for (impl, phase), vals in samples.items():
        p20, med, p80 = quantiles(vals)
        row[f"{impl}_{phase}_ms"] = med * 1e3
        row[f"{impl}_{phase}_p20_ms"] = p20 * 1e3
        row[f"{impl}_{phase}_p80_ms"] = p80 * 1e3
        row[f"{impl}_{phase}_tflops"] = shape.flops(impl, phase) / med / 1e12 if med > 0 else math.nan
    for phase in PHASES:
        fl = row[f"fastlora_{phase}_ms"]
        if "peft" in layers:
            row[f"ratio_fastlora_peft_{phase}"] = fl / row[f"peft_{phase}_ms"]
        row[f"ratio_fastlora_linear_{phase}"] = fl / row[f"linear_{phase}_ms"]

    # Kernel launches per layer on the Triton backend.
    if row["backend"] == "triton":
        try:
            counts = count_launches(layers["fastlora"], x, dy)
            row["launches_source"] = "fastlora counter" if counts else "no launch_count() in fastlora.kernels.lora"
        except Exception as exc:  # noqa: BLE001
            counts, row["launches_source"] = None, f"counter failed: {type(exc).__name__}: {str(exc)[:100]}"
    elif args.launches:
        key = (shape.r, dropout)
        if key not in launches_cache:
            launches_cache[key] = interpreter_launches(shape, dropout)
        counts, note = launches_cache[key]
        row["launches_source"] = note
    else:
        counts = None
        row["launches_source"] = "not measured (--no-launches)"
    row["fastlora_launches_fwd"], row["fastlora_launches_bwd"] = counts if counts else ("", "")

    if device == "cuda":
        for impl in impls:
            try:
                kf, kb, names_f, names_b = profiler_kernels(layers[impl], x, dy)
            except Exception as exc:  # noqa: BLE001 - e.g. CUPTI unavailable: keep the row
                row[f"{impl}_cuda_kernels_fwd"] = row[f"{impl}_cuda_kernels_bwd"] = f"error: {type(exc).__name__}"
            else:
                row[f"{impl}_cuda_kernels_fwd"], row[f"{impl}_cuda_kernels_bwd"] = kf, kb
                if impl == "fastlora":
                    row["fastlora_cuda_kernel_names"] = " | ".join(names_f) + " || " + " | ".join(names_b)
            row[f"{impl}_peak_mib"] = peak_memory_mib(layers[impl], x, dy)
    return row


def _ms(row: dict, impl: str, phase: str) -> str:
    key = f"{impl}_{phase}_ms"
    if key not in row:
        return "n/a"
    return f"{row[key]:.3g} ({row[f'{impl}_{phase}_p20_ms']:.3g}-{row[f'{impl}_{phase}_p80_ms']:.3g})"


def _ratio(row: dict, key: str) -> str:
    return f"{row[key]:.3f}" if key in row else "n/a"


def _mib(n) -> str:
    return f"{n / 2**20:.2f}" if isinstance(n, (int, float)) else "n/a"


def targets(row: dict, device: str) -> list[tuple[str, str, bool]]:
    """(target, measured, met) for one row."""
    out = []
    if "saved_ratio_fastlora_peft" in row:
        if row["dropout"] > 0:
            r = row["saved_ratio_fastlora_peft"]
            out.append(("saved bytes fastlora/PEFT <= 0.55", f"{r:.3f}", r <= 0.55))
        else:
            out.append(("saved bytes == X + S (the floor)", str(row["fastlora_saved_bytes"]),
                        row["fastlora_saved_bytes"] == row["saved_floor_bytes_X_plus_S"]))
    if device == "cpu" and "ratio_fastlora_peft_both" in row:
        r = row["ratio_fastlora_peft_both"]
        out.append(("fwd+bwd time fastlora/PEFT <= 1.0", f"{r:.3f}", r <= 1.0))
    if device == "cuda":
        r = row["ratio_fastlora_linear_both"]
        out.append(("fwd+bwd time fastlora/nn.Linear <= 1.05", f"{r:.3f}", r <= 1.05))
        if "ratio_fastlora_peft_both" in row:
            r = row["ratio_fastlora_peft_both"]
            out.append(("fwd+bwd >= 1.3x faster than PEFT (ratio <= 0.769)", f"{r:.3f}", r <= 1 / 1.3))
    if row.get("fastlora_launches_fwd", "") != "":
        f, b = row["fastlora_launches_fwd"], row["fastlora_launches_bwd"]
        out.append(("launches fwd <= 2, bwd <= 3", f"{f}/{b}", f <= 2 and b <= 3))
    return out


def write_markdown(path: str, rows: list[dict], stamp: dict, device: str, notes: list[str]) -> None:
    lines = [f"# fastlora LoRA linear benchmark ({device})", ""]
    lines += [f"- {k}: {v}" for k, v in stamp.items()]
    lines += ["", "Times in ms: median (p20-p80). Ratios are of medians (< 1 means fastlora is faster / smaller).", ""]
    lines += ["## Summary: forward+backward", ""]
    head = ["shape", "dropout", "fastlora", "PEFT", "nn.Linear", "fl/PEFT", "fl/Linear",
            "saved MiB fl", "saved MiB PEFT", "saved fl/PEFT", "launches fwd/bwd", "TFLOP/s fl/PEFT/Linear"]
    if device == "cuda":
        head += ["peak MiB fl/PEFT/Linear", "CUDA kernels fwd/bwd fl | PEFT"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        launches = (f"{row['fastlora_launches_fwd']}/{row['fastlora_launches_bwd']}"
                    if row["fastlora_launches_fwd"] != "" else "n/a")
        tf = "/".join(f"{row[f'{i}_both_tflops']:.3g}" if f"{i}_both_tflops" in row else "n/a" for i in IMPLS)
        cells = [row["shape"], f"{row['dropout']:g}", _ms(row, "fastlora", "both"), _ms(row, "peft", "both"),
                 _ms(row, "linear", "both"), _ratio(row, "ratio_fastlora_peft_both"),
                 _ratio(row, "ratio_fastlora_linear_both"), _mib(row.get("fastlora_saved_bytes")),
                 _mib(row.get("peft_saved_bytes")), _ratio(row, "saved_ratio_fastlora_peft"), launches, tf]
        if device == "cuda":
            cells.append("/".join(f"{row.get(f'{i}_peak_mib', math.nan):.1f}" for i in IMPLS))
            cells.append(f"{row.get('fastlora_cuda_kernels_fwd', '?')}/{row.get('fastlora_cuda_kernels_bwd', '?')} | "
                         f"{row.get('peft_cuda_kernels_fwd', '?')}/{row.get('peft_cuda_kernels_bwd', '?')}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Per phase", ""]
    head = ["shape", "dropout", "phase", "fastlora ms", "PEFT ms", "nn.Linear ms", "fl/PEFT", "fl/Linear",
            "TFLOP/s fl", "reps"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        for phase in PHASES:
            cells = [row["shape"], f"{row['dropout']:g}", {"both": "fwd+bwd"}.get(phase, phase),
                     _ms(row, "fastlora", phase), _ms(row, "peft", phase), _ms(row, "linear", phase),
                     _ratio(row, f"ratio_fastlora_peft_{phase}"), _ratio(row, f"ratio_fastlora_linear_{phase}"),
                     f"{row[f'fastlora_{phase}_tflops']:.3g}", str(row.get("reps", ""))]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Saved for backward (bytes, exact)", ""]
    head = ["shape", "dropout", "fastlora", "X + S (floor)", "PEFT", "fastlora/PEFT", "nn.Linear", "max |y_fl - y_PEFT|"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        diff = row.get("max_abs_diff_vs_peft")
        cells = [row["shape"], f"{row['dropout']:g}", str(row.get("fastlora_saved_bytes")),
                 str(row["saved_floor_bytes_X_plus_S"]), str(row.get("peft_saved_bytes", "n/a")),
                 _ratio(row, "saved_ratio_fastlora_peft"), str(row.get("linear_saved_bytes")),
                 f"{diff:.2e}" if diff is not None else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Targets (CONTRIBUTING.md, Performance targets; reported, not asserted)", ""]
    lines += ["| shape | dropout | target | measured | met |", "|---|---|---|---|---|"]
    for row in rows:
        for name, value, ok in targets(row, device):
            lines.append(f"| {row['shape']} | {row['dropout']:g} | {name} | {value} | {'yes' if ok else 'NO'} |")
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def write_csv(path: str, rows: list[dict], stamp: dict) -> None:
    keys: list[str] = list(stamp)
    for row in rows:
        keys += [k for k in row if k not in keys]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        for row in rows:
            w.writerow({**stamp, **{k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}})


def profile_cpu(shape: Shape, dropout: float, device: str, reps: int) -> None:
    """Print the top ops of fastlora's and PEFT's forward+backward (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    layers = build_layers(shape, dropout, device)
    x, dy = make_inputs(shape, device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    for impl in [i for i in ("fastlora", "peft") if i in layers]:
        mod = layers[impl]
        for _ in range(2):
            time_phase(mod, x, dy, "both", Clock(device), device)
        with profile(activities=acts) as prof:
            for _ in range(reps):
                time_phase(mod, x, dy, "both", Clock(device), device)
        print(f"\n=== {impl}  {shape.label}  dropout={dropout}  ({reps} fwd+bwd) ===")
        sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=14))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="output folder (created)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    ap.add_argument("--quick", action="store_true", help="one small shape, few repeats")
    ap.add_argument("--shapes", default=None, help="comma list of MxKxNxr (overrides the defaults)")
    ap.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default: fp32 on CPU, bf16 on CUDA)")
    ap.add_argument("--dropouts", default=",".join(str(p) for p in DROPOUTS))
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--backend", choices=("auto", "reference", "triton"), default=None,
                    help="fastlora backend (default: reference on CPU, auto on CUDA)")
    ap.add_argument("--no-launches", dest="launches", action="store_false",
                    help="on CPU, skip the Triton-interpreter launch count")
    ap.add_argument("--profile", action="store_true", help="print torch.profiler op tables instead of a report")
    ap.add_argument("--_launches", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_dropout", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._launches:
        return _launches_child(args._launches, args._dropout)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("report.py: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    notes: list[str] = []
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        notes.append("TRITON_INTERPRET is set in this process: fastlora runs the Triton interpreter, not a fast path")
    # CPU: the reference path (what users get on CPU); CUDA: dispatch as users get it.
    fastlora.set_backend(args.backend or ("reference" if device == "cpu" else "auto"))
    dtype = DTYPES[args.dtype] if args.dtype else None
    if args.shapes:
        shapes = [parse_shape(s, dtype or (torch.bfloat16 if device == "cuda" else torch.float32))
                  for s in args.shapes.split(",")]
    else:
        shapes = default_shapes(device, args.quick)
        if dtype is not None:
            shapes = [Shape(s.M, s.K, s.N, s.r, dtype) for s in shapes]
    warmup = args.warmup or (2 if args.quick else (10 if device == "cuda" else 3))
    args.warmup = warmup
    dropouts = [float(p) for p in args.dropouts.split(",")]

    if args.profile:
        for shape in shapes:
            for p in dropouts:
                profile_cpu(shape, p, device, reps=min(args.reps or 5, 5))
        return 0

    if not have_peft():
        notes.append("peft is not installed: PEFT columns are n/a")
    notes.append("PEFT: peft.tuners.lora.Linear from get_peft_model(..., autocast_adapter_dtype=False), "
                 "called directly (no PeftModel wrapper); identical weights; alpha = 2r")
    notes.append("nn.Linear: frozen weight and bias, x requires grad (backward = dX only); same row for both dropouts")
    notes.append("saved bytes: distinct storages packed by autograd (saved_tensors_hooks), parameters excluded")

    stamp = {"device": device_name(device), **{f"{k}_version": v for k, v in versions().items()},
             "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
             "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__)] + sys.argv[1:]),
             "reps": args.reps or "per shape (column reps)", "warmup": warmup, "load_avg_1m_start": _loadavg()}
    rows: list[dict] = []
    launches_cache: dict = {}
    t_start = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    csv_path = os.path.join(args.out, f"lora_{device}.csv")
    md_path = os.path.join(args.out, f"lora_{device}.md")
    failed = 0
    for shape in shapes:
        for p in dropouts:
            t0 = time.perf_counter()
            try:
                row = run_case(shape, p, device, args, launches_cache)
            except Exception as exc:  # noqa: BLE001 - report the rest, name the failure
                failed += 1
                msg = f"{shape.label} dropout={p:g} FAILED: {type(exc).__name__}: {str(exc)[:300]}"
                notes.append(msg)
                print(msg, file=sys.stderr, flush=True)
                import traceback

                traceback.print_exc()
            else:
                rows.append(row)
                print(f"{shape.label} dropout={p:g}: fwd+bwd ms fastlora {_ms(row, 'fastlora', 'both')} "
                      f"PEFT {_ms(row, 'peft', 'both')} Linear {_ms(row, 'linear', 'both')}; "
                      f"saved fl/PEFT {_ratio(row, 'saved_ratio_fastlora_peft')} [{time.perf_counter() - t0:.1f}s]",
                      flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()
            # Written after every case, so a run cut short still leaves its results.
            stamp["elapsed_s"] = f"{time.perf_counter() - t_start:.1f}"
            stamp["load_avg_1m_end"] = _loadavg()
            sources = sorted({r["launches_source"] for r in rows if r.get("launches_source")})
            launch_note = [f"kernel launches per layer (fwd/bwd) measured by: {'; '.join(sources)}"] if sources else []
            write_csv(csv_path, rows, stamp)
            write_markdown(md_path, rows, stamp, device, notes + launch_note)
    print(f"wrote {csv_path} and {md_path}")
    if failed:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
