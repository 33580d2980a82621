#!/usr/bin/env python
"""QLoRA benchmark report: 4-bit dequantization and the QLoRA layer, fastlora vs bitsandbytes (+ PEFT).

    python bench/report_qlora.py --out bench/results [--device cpu|cuda] [--quick] [--threads N]

Two sections (issue 3, "Benchmarks"):

1. **Dequantize** a 4-bit weight (nf4 / fp4, double quantization on / off,
   blocksize 64) to the weight dtype (CPU: fp32, fp16 and bf16; CUDA: bf16):
   fastlora's ``dequantize_4bit`` (the reference twin on CPU, the Triton
   kernel on CUDA; on CUDA the reference is timed too) vs
   ``bitsandbytes.functional.dequantize_4bit``, and a device copy
   ``dst.copy_(src)`` of the same number of output bytes measured in the same
   run. fastlora/bnb is the ratio of the medians; "per round" is the median
   (p20-p80) of the ratios of the two calls of each interleaved round, which
   load from other processes disturbs less. GB/s counts bytes read + written:
   packed codes + absmax (+ nested absmax and offset) + the output (code
   tables excluded: 64 B / 1 KiB). The copy moves 2x the output bytes; "of
   copy" = dequant GB/s / copy GB/s. On CPU also the **gather floor**: one
   ``torch.index_select`` of the n/2 packed bytes (int32 indices prebuilt)
   from fastlora's 256-entry byte -> fp32-pair table into a preallocated
   output, the one pass a pure-PyTorch dequantizer cannot avoid, timed in the
   same rounds; and a summary of fastlora/bnb per output dtype.
2. **QLoRA layer** forward, backward and forward+backward at the same shape:
   fastlora ``QLoRALinear`` (nf4, double quant, blocksize 64) vs fastlora
   ``LoRALinear`` on the full-precision weight (same dtype) vs PEFT LoRA on a
   bitsandbytes ``Linear4bit`` (the QLoRA stack users run today), identical
   weights and adapters, alpha = 2r, dropout 0. Also the base weight's bytes
   (exact), the bytes saved for backward (exact), and on CUDA peak memory and
   kernel launches.

Timings: median with 20th/80th percentiles; implementations interleaved
round by round. CPU: ``time.perf_counter``; CUDA: events, the layer as in
``bench/report.py``, the dequant/copy calls with a 256 MiB L2 flush before
each (untimed, and it hides the launch overhead, as ``triton.testing.do_bench``
does). Writes ``qlora_<device>.csv`` and ``qlora_<device>.md`` into ``--out``,
stamped as ``bench/report.py`` stamps (device, versions, date, command, load).
bitsandbytes is optional: without it those columns read "n/a" with a note.

The builders here are shared with ``bench/test_bench_qlora.py``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import math
import os
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import torch  # noqa: E402
from torch import nn  # noqa: E402

import fastlora  # noqa: E402
from fastlora._backend import resolve_backend  # noqa: E402
from fastlora.qlora import QLoRALinear  # noqa: E402
from fastlora.quant import QuantizedWeight, _byte_table, quantize_4bit  # noqa: E402
from fastlora.quant import dequantize_4bit as reference_dequantize_4bit  # noqa: E402
from report import (  # noqa: E402
    PHASES,
    SHORT,
    Clock,
    Shape,
    build_layers,
    clear_grads,
    device_name,
    frozen_tensors,
    loadavg,
    make_inputs,
    measure,
    peak_memory_mib,
    profiler_kernels,
    quantiles,
    versions,
    write_csv,
)
from saved_bytes import saved_activation_bytes  # noqa: E402

QUANT_TYPES = ("nf4", "fp4")
DOUBLE_QUANT = (True, False)
BLOCKSIZE = 64
LAYER_IMPLS = ("qlora", "lora", "bnb_peft")
LAYER_NAMES = {"qlora": "fastlora QLoRA", "lora": "fastlora LoRA", "bnb_peft": "bnb+PEFT"}
FLUSH_BYTES = 256 * 2**20  # larger than any GPU's L2 (H100 50 MiB, H200 60 MiB)
NOTE_BNB_ABSENT = "bitsandbytes is not importable here: its columns are n/a"


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class DequantCase:
    """One dequantized weight: [N, K] in ``dtype``, blocksize 64."""

    N: int
    K: int
    quant_type: str
    double_quant: bool
    dtype: torch.dtype

    @property
    def label(self) -> str:
        return f"{self.N}x{self.K} {self.quant_type} dq={'on' if self.double_quant else 'off'} {SHORT[self.dtype]}"

    @property
    def id(self) -> str:
        return f"{self.N}x{self.K}-{self.quant_type}-dq{int(self.double_quant)}-{SHORT[self.dtype]}"


def dequant_dtypes(device: str) -> tuple[torch.dtype, ...]:
    """Output dtypes of the dequant section: bf16 on CUDA; fp32, fp16, bf16 on CPU."""
    return (torch.bfloat16,) if device == "cuda" else (torch.float32, torch.float16, torch.bfloat16)


def default_dequant_cases(device: str, quick: bool) -> list[DequantCase]:
    """4096x4096 on CUDA, 2048x2048 on CPU (quick: 1024^2 / 512^2); nf4/fp4 x double quant on/off x
    :func:`dequant_dtypes` (the weight is quantized from, and dequantized to, that dtype)."""
    n = (1024 if quick else 4096) if device == "cuda" else (512 if quick else 2048)
    return [DequantCase(n, n, qt, dq, dtype) for qt in QUANT_TYPES for dq in DOUBLE_QUANT
            for dtype in dequant_dtypes(device)]


def default_layer_shapes(device: str, quick: bool) -> list[Shape]:
    """CUDA: M=4096/8192, K=N=4096, r=16, bf16; CPU: M=1024, K=N=1024, r=16, fp32 (quick: the first / a small one)."""
    if device == "cuda":
        shapes = [Shape(4096, 4096, 4096, 16, torch.bfloat16), Shape(8192, 4096, 4096, 16, torch.bfloat16)]
        return shapes[:1] if quick else shapes
    return [Shape(256, 512, 512, 16, torch.float32)] if quick else [Shape(1024, 1024, 1024, 16, torch.float32)]


def bnb_status() -> tuple[bool, str]:
    """(bitsandbytes importable, why not)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return False, "not installed"
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - e.g. no native library for this device
        return False, f"import failed: {type(exc).__name__}: {str(exc)[:120]}"
    return True, ""


def have_bnb() -> bool:
    return bnb_status()[0]


def bnb_version() -> str:
    ok, why = bnb_status()
    if not ok:
        return f"absent ({why})" if why != "not installed" else "absent"
    import bitsandbytes

    return bitsandbytes.__version__


def have_peft() -> bool:
    return importlib.util.find_spec("peft") is not None


# --------------------------------------------------------------------------- dequant


def random_weight(N: int, K: int, dtype: torch.dtype, device: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, K, generator=g) / math.sqrt(K)).to(device=device, dtype=dtype)


def fastlora_dequantizer(device: str) -> tuple[Callable[[QuantizedWeight], torch.Tensor], str]:
    """(dequantize function, its name): the Triton kernel on CUDA, the reference twin on CPU."""
    if device == "cuda":
        from fastlora.kernels import nf4  # Triton; imported only on CUDA

        return nf4.dequantize_4bit, "triton kernel (fastlora.kernels.nf4.dequantize_4bit)"
    return reference_dequantize_4bit, "reference (fastlora.quant.dequantize_4bit)"


def dequant_bytes(qw: QuantizedWeight, out_dtype: torch.dtype) -> int:
    """Bytes a dequantization moves: the quant state read (packed + absmax + nested
    absmax + offset; code tables excluded) plus the output written."""
    return qw.nbytes(include_tables=False) + qw.numel * torch.empty((), dtype=out_dtype).element_size()


def build_dequant(case: DequantCase, device: str, with_bnb: bool = True) -> tuple[dict[str, Callable[[], object]], dict]:
    """Zero-argument callables to time (``fastlora``, on CUDA also ``reference``,
    ``bnb`` when importable, and ``copy`` of the output's bytes) and facts about
    them: bytes moved, implementation names, exactness checks."""
    w = random_weight(case.N, case.K, case.dtype, device)
    qw = quantize_4bit(w, quant_type=case.quant_type, blocksize=BLOCKSIZE, double_quant=case.double_quant)
    info: dict = {"bytes_read": qw.nbytes(include_tables=False), "bytes_moved": dequant_bytes(qw, case.dtype),
                  "notes": []}
    info["bytes_written"] = info["bytes_moved"] - info["bytes_read"]
    fns: dict[str, Callable[[], object]] = {}
    try:
        fl, info["fastlora_impl"] = fastlora_dequantizer(device)
    except Exception as exc:  # noqa: BLE001 - e.g. no Triton: keep the reference
        fl, info["fastlora_impl"] = reference_dequantize_4bit, "reference (Triton kernel unavailable)"
        info["notes"].append(f"fastlora Triton dequant unavailable: {type(exc).__name__}: {str(exc)[:120]}")
    fns["fastlora"] = lambda: fl(qw, case.dtype)
    ref = reference_dequantize_4bit(qw, case.dtype)
    if fl is not reference_dequantize_4bit:
        fns["reference"] = lambda: reference_dequantize_4bit(qw, case.dtype)
        info["fastlora_equals_reference"] = bool(torch.equal(fns["fastlora"](), ref))
    if with_bnb and have_bnb():
        import bitsandbytes.functional as bnbF

        try:
            packed, state = bnbF.quantize_4bit(w, blocksize=BLOCKSIZE, compress_statistics=case.double_quant,
                                               quant_type=case.quant_type)
            out = bnbF.dequantize_4bit(packed, state)
        except Exception as exc:  # noqa: BLE001 - bnb without a backend for this device
            info["notes"].append(f"bitsandbytes dequantize_4bit failed on {device}: {type(exc).__name__}: {str(exc)[:120]}")
        else:
            fns["bnb"] = lambda: bnbF.dequantize_4bit(packed, state)
            info["packed_equals_bnb"] = bool(torch.equal(packed.view(torch.uint8).reshape(-1), qw.packed.reshape(-1)))
            info["output_equals_bnb"] = bool(torch.equal(out, ref))
    src = torch.randn(qw.numel, device=device).to(case.dtype)
    dst = torch.empty_like(src)
    fns["copy"] = lambda: dst.copy_(src)
    if device == "cpu":
        # The floor of a pure-PyTorch CPU dequantizer: the byte -> fp32-pair gather
        # alone (no index conversion, no scaling, no conversion, no allocation).
        table = _byte_table(qw.quant_map)
        index = qw.packed.reshape(-1)[: qw.numel // 2].to(torch.int32)
        pairs = torch.empty(index.numel(), dtype=torch.int64)
        fns["gather"] = lambda: torch.index_select(table, 0, index, out=pairs)
    return fns, info


def time_calls(fns: dict[str, Callable[[], object]], device: str, reps: int, warmup: int,
               cpu_samples: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each function, interleaved round by round.

    On CPU, ``cpu_samples`` (if given) also receives each call's CPU time of the
    calling thread (``time.thread_time``): with one thread everything (PyTorch
    ops and bitsandbytes' native loop) runs in that thread, so this excludes the
    time other processes hold the core, which dominates wall time on a loaded
    machine.

    On CUDA each call is bracketed by events with a 256 MiB L2 flush before it
    (untimed; it also keeps the GPU busy while the call is launched, so launch
    overhead is not timed) and one synchronize at the end."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    if device == "cuda":
        flush = torch.empty(FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        torch.cuda.synchronize()
        events: dict[str, list] = {k: [] for k in fns}
        for _ in range(reps):
            for name, fn in fns.items():
                flush.zero_()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                events[name].append((start, end))
        torch.cuda.synchronize()
        for name, evs in events.items():
            samples[name] = [s.elapsed_time(e) / 1e3 for s, e in evs]
        return samples
    clock = Clock(device)
    if cpu_samples is not None:
        cpu_samples.update({k: [] for k in fns})
    for rnd in range(warmup + reps):
        for name, fn in fns.items():
            c0 = time.thread_time()
            t0 = clock.start()
            out = fn()
            t = clock.stop(t0)
            c = time.thread_time() - c0
            del out
            if rnd >= warmup:
                samples[name].append(t)
                if cpu_samples is not None:
                    cpu_samples[name].append(c)
    return samples


def put_quantiles(row: dict, prefix: str, values: list[float]) -> float:
    """row[prefix_ms], row[prefix_p20_ms], row[prefix_p80_ms]; returns the median (s)."""
    p20, med, p80 = quantiles(values)
    row[f"{prefix}_ms"], row[f"{prefix}_p20_ms"], row[f"{prefix}_p80_ms"] = med * 1e3, p20 * 1e3, p80 * 1e3
    return med


def run_dequant(case: DequantCase, device: str, reps: int, warmup: int, with_bnb: bool) -> tuple[dict, list[str]]:
    fns, info = build_dequant(case, device, with_bnb)
    row: dict = {"section": "dequant", "case": case.label, "N": case.N, "K": case.K, "quant_type": case.quant_type,
                 "double_quant": case.double_quant, "blocksize": BLOCKSIZE, "dtype": SHORT[case.dtype],
                 "bytes_read": info["bytes_read"], "bytes_written": info["bytes_written"],
                 "bytes_moved": info["bytes_moved"], "fastlora_impl": info["fastlora_impl"], "reps": reps}
    for key in ("fastlora_equals_reference", "packed_equals_bnb", "output_equals_bnb"):
        if key in info:
            row[key] = info[key]
    cpu_samples: dict[str, list[float]] | None = {} if device == "cpu" else None
    samples = time_calls(fns, device, reps, warmup, cpu_samples)
    copy_med = put_quantiles(row, "copy", samples.pop("copy"))
    gather = samples.pop("gather", None)
    if gather is not None:
        put_quantiles(row, "gather", gather)
        if cpu_samples and "gather" in cpu_samples:
            put_quantiles(row, "gather_cpu", cpu_samples["gather"])
    row["copy_gbps"] = 2 * info["bytes_written"] / copy_med / 1e9
    for impl, vals in samples.items():
        med = put_quantiles(row, impl, vals)
        row[f"{impl}_gbps"] = info["bytes_moved"] / med / 1e9
        row[f"{impl}_of_copy"] = row[f"{impl}_gbps"] / row["copy_gbps"]
    if "bnb_ms" in row:
        row["ratio_fastlora_bnb"] = row["fastlora_ms"] / row["bnb_ms"]
        # Paired: round i timed fastlora then bnb back to back, so a burst of load hits both.
        paired = [f / b for f, b in zip(samples["fastlora"], samples["bnb"])]
        p20, med, p80 = quantiles(paired)
        row["ratio_per_round"], row["ratio_per_round_p20"], row["ratio_per_round_p80"] = med, p20, p80
    if cpu_samples:
        for impl in ("fastlora", "bnb"):
            if impl in cpu_samples:
                put_quantiles(row, f"{impl}_cpu", cpu_samples[impl])
        if "bnb_cpu_ms" in row:
            row["ratio_fastlora_bnb_cpu"] = row["fastlora_cpu_ms"] / row["bnb_cpu_ms"]
            if "gather_cpu_ms" in row:
                row["ratio_gather_bnb_cpu"] = row["gather_cpu_ms"] / row["bnb_cpu_ms"]
    return row, info["notes"]


# --------------------------------------------------------------------------- layers


def bnb_peft_layer(linear: nn.Linear, r: int, lora_A: torch.Tensor, lora_B: torch.Tensor, device: str) -> nn.Module:
    """PEFT LoRA (``peft.tuners.lora.bnb.Linear4bit``, what get_peft_model builds
    for a model loaded in 4 bits) on a bitsandbytes ``Linear4bit`` holding
    ``linear``'s weight quantized to nf4 with double quantization (blocksize 64,
    quant state in the weight's dtype), adapters copied and cast to that dtype."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    dtype = linear.weight.dtype
    l4 = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                           compute_dtype=dtype, compress_statistics=True, quant_type="nf4")
    l4.weight = bnb.nn.Params4bit(linear.weight.detach().cpu().clone(), requires_grad=False, blocksize=BLOCKSIZE,
                                  compress_statistics=True, quant_type="nf4", module=l4)
    if linear.bias is not None:
        l4.bias = nn.Parameter(linear.bias.detach().cpu().clone(), requires_grad=False)
    l4 = l4.to(device)  # bitsandbytes quantizes here
    seq = nn.Sequential(l4)
    # NOTE: PEFT picks its bitsandbytes LoRA layer only for a model flagged as
    # loaded in 4 bits (transformers sets this flag).
    seq.is_loaded_in_4bit = True
    cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=["0"], bias="none")
    layer = get_peft_model(seq, cfg, autocast_adapter_dtype=False).base_model.model[0]
    with torch.no_grad():
        for mod, src in ((layer.lora_A["default"], lora_A), (layer.lora_B["default"], lora_B)):
            mod.to(dtype)
            mod.weight.copy_(src)
    return layer.train()


def build_qlora_layers(shape: Shape, device: str, seed: int = 0, with_bnb: bool = True) -> dict[str, nn.Module]:
    """``qlora`` (fastlora QLoRALinear, nf4 + double quant), ``lora`` (fastlora
    LoRALinear on the full-precision weight) and, with bitsandbytes and peft,
    ``bnb_peft``: identical weights (``bench/report.py``'s ``build_layers``),
    identical adapters (lora_B random), alpha = 2r, dropout 0, training mode."""
    base = build_layers(shape, 0.0, device, seed=seed, with_peft=False)
    lora, linear = base["fastlora"], base["linear"]
    qlora = QLoRALinear.from_linear(linear, r=shape.r, alpha=2.0 * shape.r, quant_type="nf4", blocksize=BLOCKSIZE,
                                    double_quant=True)
    with torch.no_grad():
        qlora.lora_A.copy_(lora.lora_A)
        qlora.lora_B.copy_(lora.lora_B)
    layers: dict[str, nn.Module] = {"qlora": qlora.train(), "lora": lora}
    if with_bnb and have_bnb() and have_peft():
        layers["bnb_peft"] = bnb_peft_layer(linear, shape.r, lora.lora_A.detach(), lora.lora_B.detach(), device)
    return layers


def base_weight_bytes(impl: str, module: nn.Module) -> int:
    """Bytes of the frozen base weight's storage (code tables excluded)."""
    if impl == "qlora":
        return module.weight_nbytes()
    if impl == "lora":
        return module.weight.numel() * module.weight.element_size()
    weight = module.get_base_layer().weight  # bitsandbytes Params4bit
    qs = weight.quant_state
    total = weight.data.numel() * weight.data.element_size() + qs.absmax.numel() * qs.absmax.element_size()
    if qs.state2 is not None:
        total += qs.state2.absmax.numel() * qs.state2.absmax.element_size() + qs.offset.numel() * 4
    return total


def kernel_modules() -> list:
    """fastlora's Triton modules with a launch counter (lora's rank-r kernels and nf4's)."""
    mods = []
    for name in ("lora", "nf4"):
        try:
            mod = __import__(f"fastlora.kernels.{name}", fromlist=[name])
        except Exception:  # noqa: BLE001 - no Triton: no counts
            return []
        mods.append(mod)
    return mods


def count_launches(module: nn.Module, x, dy) -> tuple[int, int] | None:
    """(forward, backward) Triton launches of one call (kernels.nf4 counts through
    kernels.lora's counter, so only one counter is read)."""
    mods = kernel_modules()[:1]
    if not mods:
        return None
    clear_grads(module, x)
    for m in mods:
        m.reset_launch_count()
    y = module(x)
    fwd = sum(m.launch_count() for m in mods)
    for m in mods:
        m.reset_launch_count()
    y.backward(dy)
    bwd = sum(m.launch_count() for m in mods)
    clear_grads(module, x)
    return fwd, bwd


def default_layer_reps(device: str, quick: bool) -> int:
    return 5 if quick else (50 if device == "cuda" else 60)


def run_layer(shape: Shape, device: str, reps: int, warmup: int, with_bnb: bool) -> dict:
    layers = build_qlora_layers(shape, device, with_bnb=with_bnb)
    impls = [i for i in LAYER_IMPLS if i in layers]
    x, dy = make_inputs(shape, device)
    row: dict = {"section": "layer", "shape": shape.label, "M": shape.M, "K": shape.K, "N": shape.N, "r": shape.r,
                 "dtype": SHORT[shape.dtype], "quant": f"nf4 blocksize {BLOCKSIZE} double quant",
                 "backend": resolve_backend(x.device), "reps": reps, "warmup": warmup}
    with torch.no_grad():
        ys = {impl: layers[impl](x).float() for impl in impls}
    row["max_abs_diff_qlora_vs_lora"] = float((ys["qlora"] - ys["lora"]).abs().max())
    if "bnb_peft" in ys:
        row["max_abs_diff_qlora_vs_bnb_peft"] = float((ys["qlora"] - ys["bnb_peft"]).abs().max())
    del ys
    params = shape.K * shape.N
    for impl in impls:
        mod = layers[impl]
        row[f"{impl}_weight_bytes"] = base_weight_bytes(impl, mod)
        row[f"{impl}_weight_bytes_per_param"] = row[f"{impl}_weight_bytes"] / params
        row[f"{impl}_saved_bytes"] = saved_activation_bytes(lambda m=mod: m(x), exclude=frozen_tensors(mod))
    samples = measure(layers, impls, x, dy, device, reps, warmup)
    for (impl, phase), vals in samples.items():
        med = put_quantiles(row, f"{impl}_{phase}", vals)
        row[f"{impl}_{phase}_tflops"] = shape.flops("fastlora", phase) / med / 1e12 if med > 0 else math.nan
    for phase in PHASES:
        for other in ("lora", "bnb_peft"):
            if f"{other}_{phase}_ms" in row:
                row[f"ratio_qlora_{other}_{phase}"] = row[f"qlora_{phase}_ms"] / row[f"{other}_{phase}_ms"]
    if row["backend"] == "triton":
        counts = count_launches(layers["qlora"], x, dy)
        if counts:
            row["qlora_launches_fwd"], row["qlora_launches_bwd"] = counts
    if device == "cuda":
        for impl in impls:
            try:
                kf, kb, _, _ = profiler_kernels(layers[impl], x, dy)
                row[f"{impl}_cuda_kernels_fwd"], row[f"{impl}_cuda_kernels_bwd"] = kf, kb
            except Exception as exc:  # noqa: BLE001 - e.g. CUPTI unavailable
                row[f"{impl}_cuda_kernels_fwd"] = f"error: {type(exc).__name__}"
            row[f"{impl}_peak_mib"] = peak_memory_mib(layers[impl], x, dy)
    return row


# --------------------------------------------------------------------------- report


def _q(row: dict, prefix: str, digits: int = 3) -> str:
    """``median (p20-p80)`` of row[prefix_ms...], or n/a."""
    if f"{prefix}_ms" not in row:
        return "n/a"
    f = f".{digits}g"
    return f"{row[f'{prefix}_ms']:{f}} ({row[f'{prefix}_p20_ms']:{f}}-{row[f'{prefix}_p80_ms']:{f}})"


def _num(row: dict, key: str, fmt: str = ".3f") -> str:
    v = row.get(key)
    if v is None or v == "":
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    return f"{v:{fmt}}" if isinstance(v, (int, float)) else str(v)


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def dtype_summary(deq_rows: list[dict]) -> list[str]:
    """Markdown lines: fastlora/bnb per output dtype, the median (min-max) over
    the dequant cases of that dtype; wall time, CPU time, and the gather floor."""
    if not any("ratio_fastlora_bnb" in r for r in deq_rows):
        return []
    cols = [("ratio_fastlora_bnb", "fastlora/bnb (wall)"), ("ratio_fastlora_bnb_cpu", "fastlora/bnb (CPU time)"),
            ("ratio_gather_bnb_cpu", "gather floor/bnb (CPU time)")]
    cols = [(k, h) for k, h in cols if any(k in r for r in deq_rows)]
    body = []
    for dtype in dict.fromkeys(r["dtype"] for r in deq_rows):
        rows = [r for r in deq_rows if r["dtype"] == dtype]
        cells = [dtype, str(len(rows))]
        for key, _ in cols:
            vals = sorted(r[key] for r in rows if key in r)
            cells.append(f"{quantiles(vals)[1]:.2f} ({vals[0]:.2f}-{vals[-1]:.2f})" if vals else "n/a")
        body.append(cells)
    return ["", "### fastlora / bitsandbytes per output dtype", "",
            "Median (min-max) over the cases above of each dtype (< 1: fastlora faster).", ""] + \
        _table(["dtype", "cases"] + [h for _, h in cols], body)


def write_markdown(path: str, deq_rows: list[dict], layer_rows: list[dict], stamp: dict, device: str,
                   notes: list[str]) -> None:
    lines = [f"# fastlora QLoRA benchmark ({device})", ""]
    lines += [f"- {k}: {v}" for k, v in stamp.items()]
    lines += ["", "Times in ms: median (p20-p80). Ratios are of medians (< 1: the first is faster).", ""]
    if deq_rows:
        extra = [i for i in ("reference",) if any(f"{i}_ms" in r for r in deq_rows)]
        lines += ["## Dequantize 4-bit -> weight dtype (blocksize 64)", "",
                  f"fastlora = {deq_rows[0]['fastlora_impl']}; bnb = bitsandbytes.functional.dequantize_4bit. "
                  "GB/s = (packed + absmax [+ nested absmax + offset] read + output written) / median time; "
                  "copy GB/s = 2 x output bytes / median time of dst.copy_(src); 'of copy' = GB/s / copy GB/s. "
                  "fastlora/bnb = ratio of the medians (< 1: fastlora faster); per round = median (p20-p80) of "
                  "fastlora/bnb within each interleaved round. CPU ms (CPU only): CPU time of the calling "
                  "thread per call (time.thread_time), which leaves out the time other processes hold the core.",
                  ""]
        head = ["weight", "fastlora ms", "bnb ms", "fastlora/bnb", "fastlora/bnb per round"]
        cpu_time = any("fastlora_cpu_ms" in r for r in deq_rows)
        if cpu_time:
            head += ["fastlora CPU ms", "bnb CPU ms", "fastlora/bnb CPU"]
        floor = any("gather_cpu_ms" in r for r in deq_rows)
        if floor:
            head += ["gather floor CPU ms", "gather/bnb CPU"]
        for i in extra:
            head += [f"{i} ms", f"{i} GB/s"]
        head += ["MiB moved", "fastlora GB/s", "bnb GB/s", "copy ms", "copy GB/s", "fl of copy", "bnb of copy",
                 "== bnb (bytes, values)"]
        body = []
        for r in deq_rows:
            per_round = (f"{r['ratio_per_round']:.2f} ({r['ratio_per_round_p20']:.2f}-{r['ratio_per_round_p80']:.2f})"
                         if "ratio_per_round" in r else "n/a")
            cells = [r["case"], _q(r, "fastlora"), _q(r, "bnb"), _num(r, "ratio_fastlora_bnb", ".2f"), per_round]
            if cpu_time:
                cells += [_q(r, "fastlora_cpu"), _q(r, "bnb_cpu"), _num(r, "ratio_fastlora_bnb_cpu", ".2f")]
            if floor:
                cells += [_q(r, "gather_cpu"), _num(r, "ratio_gather_bnb_cpu", ".2f")]
            for i in extra:
                cells += [_q(r, i), _num(r, f"{i}_gbps", ".3g")]
            exact = (f"{_num(r, 'packed_equals_bnb')}, {_num(r, 'output_equals_bnb')}"
                     if "output_equals_bnb" in r else "n/a")
            cells += [f"{r['bytes_moved'] / 2**20:.2f}", _num(r, "fastlora_gbps", ".3g"), _num(r, "bnb_gbps", ".3g"),
                      _q(r, "copy"), _num(r, "copy_gbps", ".3g"), _num(r, "fastlora_of_copy"), _num(r, "bnb_of_copy"),
                      exact]
            body.append(cells)
        lines += _table(head, body)
        lines += dtype_summary(deq_rows)
        if any("fastlora_equals_reference" in r for r in deq_rows):
            lines += ["", "Triton kernel output == reference twin (bitwise): "
                      + ", ".join(f"{r['case']}: {_num(r, 'fastlora_equals_reference')}" for r in deq_rows)]
        lines.append("")
    if layer_rows:
        lines += ["## QLoRA layer: forward+backward", "",
                  "QLoRA = fastlora QLoRALinear (nf4, blocksize 64, double quant); LoRA = fastlora LoRALinear on the "
                  "full-precision weight (same dtype); bnb+PEFT = PEFT LoRA on a bitsandbytes Linear4bit (same "
                  "quantization). Same x, dY, weights and adapters; dropout 0.", ""]
        head = ["shape", "QLoRA", "LoRA", "bnb+PEFT", "QLoRA/LoRA", "QLoRA/bnb+PEFT", "TFLOP/s QLoRA/LoRA/bnb+PEFT"]
        body = []
        for r in layer_rows:
            tf = "/".join(_num(r, f"{i}_both_tflops", ".3g") for i in LAYER_IMPLS)
            body.append([r["shape"], _q(r, "qlora_both"), _q(r, "lora_both"), _q(r, "bnb_peft_both"),
                         _num(r, "ratio_qlora_lora_both"), _num(r, "ratio_qlora_bnb_peft_both"), tf])
        lines += _table(head, body)
        lines += ["", "## QLoRA layer: per phase", ""]
        head = ["shape", "phase", "QLoRA ms", "LoRA ms", "bnb+PEFT ms", "QLoRA/LoRA", "QLoRA/bnb+PEFT", "reps"]
        body = []
        for r in layer_rows:
            for phase in PHASES:
                body.append([r["shape"], {"both": "fwd+bwd"}.get(phase, phase), _q(r, f"qlora_{phase}"),
                             _q(r, f"lora_{phase}"), _q(r, f"bnb_peft_{phase}"), _num(r, f"ratio_qlora_lora_{phase}"),
                             _num(r, f"ratio_qlora_bnb_peft_{phase}"), str(r["reps"])])
        lines += _table(head, body)
        lines += ["", "## QLoRA layer: memory (bytes, exact) and checks", ""]
        head = ["shape", "base weight B QLoRA / LoRA / bnb+PEFT", "B/param QLoRA / LoRA / bnb+PEFT",
                "saved for bwd B QLoRA / LoRA / bnb+PEFT", "max abs(y_QLoRA - y_bnb+PEFT)", "max abs(y_QLoRA - y_LoRA)"]
        if device == "cuda":
            head += ["peak MiB QLoRA / LoRA / bnb+PEFT", "launches fwd/bwd QLoRA", "CUDA kernels fwd/bwd QLoRA | LoRA"]
        body = []
        for r in layer_rows:
            cells = [r["shape"], " / ".join(_num(r, f"{i}_weight_bytes", "d") for i in LAYER_IMPLS),
                     " / ".join(_num(r, f"{i}_weight_bytes_per_param", ".4f") for i in LAYER_IMPLS),
                     " / ".join(_num(r, f"{i}_saved_bytes", "d") for i in LAYER_IMPLS),
                     _num(r, "max_abs_diff_qlora_vs_bnb_peft", ".2e"), _num(r, "max_abs_diff_qlora_vs_lora", ".2e")]
            if device == "cuda":
                cells.append(" / ".join(_num(r, f"{i}_peak_mib", ".1f") for i in LAYER_IMPLS))
                cells.append(f"{r.get('qlora_launches_fwd', 'n/a')}/{r.get('qlora_launches_bwd', 'n/a')}")
                cells.append(f"{r.get('qlora_cuda_kernels_fwd', '?')}/{r.get('qlora_cuda_kernels_bwd', '?')} | "
                             f"{r.get('lora_cuda_kernels_fwd', '?')}/{r.get('lora_cuda_kernels_bwd', '?')}")
            body.append(cells)
        lines += _table(head, body)
        lines.append("")
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes]
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="output folder (created)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    ap.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    ap.add_argument("--sections", default="dequant,layer", help="comma list of: dequant, layer")
    ap.add_argument("--reps", type=int, default=None, help="repeats per measurement (default: per section)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--no-bnb", dest="bnb", action="store_false", help="leave bitsandbytes out")
    args = ap.parse_args(argv)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("report_qlora.py: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
        # NOTE: bitsandbytes' CPU library runs its own OpenMP runtime, which reads
        # OMP_NUM_THREADS when it loads (it ignores torch.set_num_threads); set it
        # before bitsandbytes is first imported, so both sides get --threads.
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    # CPU: the reference path (what users get on CPU); CUDA: dispatch as users get it.
    fastlora.set_backend("reference" if device == "cpu" else "auto")
    notes: list[str] = []
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        notes.append("TRITON_INTERPRET is set in this process: fastlora runs the Triton interpreter, not a fast path")
    ok, why = bnb_status()
    with_bnb = args.bnb and ok
    if not args.bnb:
        notes.append("--no-bnb: bitsandbytes columns are n/a")
    elif not ok:
        notes.append(f"{NOTE_BNB_ABSENT} ({why})")
    if with_bnb and device == "cpu" and args.threads:
        notes.append(f"--threads {args.threads}: torch.set_num_threads and OMP_NUM_THREADS (bitsandbytes' OpenMP) "
                     "both set, so fastlora and bitsandbytes use the same number of threads")
    if with_bnb and device == "cpu" and importlib.util.find_spec("kernels") is None:
        notes.append("bitsandbytes on CPU: the optional kernels-community CPU GEMM needs the `kernels` package, "
                     "absent here; bitsandbytes uses its built-in CPU ops")
    if with_bnb and not have_peft():
        notes.append("peft is not installed: the bnb+PEFT layer columns are n/a")
    if device == "cpu":
        notes.append("CPU: fastlora runs its reference path (PyTorch ops; dequantizes W to a temporary in forward "
                     "and again in backward); the Triton kernels need CUDA. Every dequant call allocates its output "
                     "(page faults included); the copy writes into a preallocated tensor")
        notes.append("CPU dequant: fastlora gathers two fp32 values per packed byte from a 256-entry table "
                     "(torch.index_select: a scalar loop, ~0.6-0.8 ns per byte), scales each block in place and "
                     "converts once, in chunks of 2**19 elements; bitsandbytes 0.50.2 runs a native C++ loop "
                     "(libbitsandbytes_cpu.so, dequantizeBlockwise4bitCpu, AVX-512 here) over the output. The "
                     "'gather floor' column is that one gather pass alone: no pure-PyTorch dequantizer goes below it")
        notes.append("bitsandbytes' CPU kernels are OpenMP-parallel (GOMP_parallel) and link libgomp.so.1, which "
                     "resolves to the libgomp torch already loaded (one OpenMP runtime per process), so "
                     "torch.set_num_threads bounds them too: at 1 thread its thread CPU time equals its wall time")
        notes.append(f"the machine is shared ({os.cpu_count()} logical CPUs, see the load averages above): other "
                     "processes add noise; the per-round ratio pairs the two calls of each round")
    else:
        notes.append("CUDA: fastlora runs the Triton kernels (dequant-in-GEMM for the layer); each dequant/copy "
                     f"call is preceded by an untimed {FLUSH_BYTES // 2**20} MiB L2 flush")
    notes.append("base weight bytes: packed codes + absmax (+ nested absmax + 4-byte offset), code tables excluded; "
                 "LoRA: the full-precision weight")
    notes.append("saved for bwd: distinct storages packed by autograd (saved_tensors_hooks), parameters and "
                 "buffers excluded; bitsandbytes keeps its 4-bit weight on ctx (not counted, it is a parameter)")
    notes.append("bnb+PEFT: peft.tuners.lora.bnb.Linear4bit from get_peft_model on a model flagged "
                 "is_loaded_in_4bit, adapters cast to the layer dtype, called directly (no PeftModel wrapper)")
    notes.append("TFLOP/s: LoRA FLOPs (2MNK + 2MrK + 2MNr forward, 2MNK + 4MNr + 4MrK backward) / median; "
                 "dequantization work not counted")

    warmup = args.warmup or (1 if args.quick else (10 if device == "cuda" else 3))
    stamp = {"device": device_name(device), **{f"{k}_version": v for k, v in versions().items()},
             "bitsandbytes_version": bnb_version(),
             "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
             "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__)] + sys.argv[1:]),
             "warmup": warmup, "load_avg_1m_start": loadavg()}
    os.makedirs(args.out, exist_ok=True)
    csv_path = os.path.join(args.out, f"qlora_{device}.csv")
    md_path = os.path.join(args.out, f"qlora_{device}.md")
    deq_rows: list[dict] = []
    layer_rows: list[dict] = []
    failed = 0
    t_start = time.perf_counter()

    def save() -> None:
        # Written after every case, so a run cut short still leaves its results.
        stamp["elapsed_s"] = f"{time.perf_counter() - t_start:.1f}"
        stamp["load_avg_1m_end"] = loadavg()
        write_csv(csv_path, deq_rows + layer_rows, stamp)
        write_markdown(md_path, deq_rows, layer_rows, stamp, device, notes)

    jobs: list[tuple[str, object]] = []
    if "dequant" in sections:
        jobs += [("dequant", c) for c in default_dequant_cases(device, args.quick)]
    if "layer" in sections:
        jobs += [("layer", s) for s in default_layer_shapes(device, args.quick)]
    for kind, case in jobs:
        t0 = time.perf_counter()
        try:
            if kind == "dequant":
                reps = args.reps or (5 if args.quick else (100 if device == "cuda" else 60))
                row, case_notes = run_dequant(case, device, reps, warmup, with_bnb)
                notes += [n for n in case_notes if n not in notes]
                deq_rows.append(row)
                print(f"dequant {case.label}: fastlora {_q(row, 'fastlora')} ms {_num(row, 'fastlora_gbps', '.3g')} GB/s "
                      f"({_num(row, 'fastlora_of_copy')} of copy); bnb {_q(row, 'bnb')} ms; fastlora/bnb "
                      f"{_num(row, 'ratio_fastlora_bnb', '.2f')} (CPU time {_num(row, 'ratio_fastlora_bnb_cpu', '.2f')}) "
                      f"[{time.perf_counter() - t0:.1f}s]", flush=True)
            else:
                reps = args.reps or default_layer_reps(device, args.quick)
                row = run_layer(case, device, reps, warmup, with_bnb)
                layer_rows.append(row)
                print(f"layer {case.label}: fwd+bwd ms QLoRA {_q(row, 'qlora_both')} LoRA {_q(row, 'lora_both')} "
                      f"bnb+PEFT {_q(row, 'bnb_peft_both')}; QLoRA/LoRA {_num(row, 'ratio_qlora_lora_both')} "
                      f"[{time.perf_counter() - t0:.1f}s]", flush=True)
        except Exception as exc:  # noqa: BLE001 - report the rest, name the failure
            failed += 1
            msg = f"{kind} {case.label} FAILED: {type(exc).__name__}: {str(exc)[:300]}"
            notes.append(msg)
            print(msg, file=sys.stderr, flush=True)
            import traceback

            traceback.print_exc()
        if device == "cuda":
            torch.cuda.empty_cache()
        save()
    print(f"wrote {csv_path} and {md_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
