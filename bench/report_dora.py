#!/usr/bin/env python
"""Benchmark report: fastlora's DoRA linear vs fastlora's LoRA linear vs PEFT's DoRA.

    python bench/report_dora.py --out bench/results [--device cpu|cuda] [--quick] [--threads N]

For each shape and dropout (0 and 0.1) it measures forward, backward and
forward+backward of one layer (median with 20th/80th percentiles over
``--reps`` repeats after ``--warmup`` rounds, the implementations interleaved
round by round, as ``bench/report.py`` does), the ratios of the medians, the
bytes autograd saves for backward (exact, via saved-tensor hooks), peak memory
on CUDA and TFLOP/s. It writes ``dora_<device>.csv`` and ``dora_<device>.md``
into ``--out``, stamped with the device, versions, date and command.

The three layers share identical weights: W, bias, lora_A and a random lora_B
from ``bench/report.py``'s builder (alpha = 2r), and one magnitude vector m,
PEFT's init ``||W + s B A||_row`` scaled per row by a random factor in
[0.5, 1.5) (so the magnitude path is live):

* ``dora``: :class:`fastlora.DoRALinear` (row norms from ``||W||^2``,
  ``A W^T`` and ``A A^T``, no ``B @ A``);
* ``lora``: :class:`fastlora.LoRALinear`, the same adapter without m (what DoRA
  costs on top of LoRA);
* ``peft_dora``: PEFT's ``lora.Linear`` with ``LoraConfig(use_dora=True)``,
  adapters in the base dtype (``autocast_adapter_dtype=False``), called directly.

On CPU fastlora runs its reference path (PyTorch ops); on CUDA the Triton
kernels (backend "auto"). Timing, quantile, stamping and CSV helpers are
``bench/report.py``'s.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import shlex
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import torch  # noqa: E402
from torch import nn  # noqa: E402

import fastlora  # noqa: E402
from fastlora._backend import resolve_backend  # noqa: E402
from report import (  # noqa: E402
    DROPOUTS,
    PHASES,
    Shape,
    build_layers,
    device_name,
    frozen_tensors,
    have_peft,
    loadavg,
    make_inputs,
    measure,
    parse_shape,
    peak_memory_mib,
    quantiles,
    versions,
    write_csv,
)
from saved_bytes import saved_activation_bytes  # noqa: E402

IMPLS = ("dora", "lora", "peft_dora")
NAMES = {"dora": "fastlora DoRA", "lora": "fastlora LoRA", "peft_dora": "PEFT DoRA"}


def default_shapes(device: str, quick: bool) -> list[Shape]:
    """One shape per device: CPU M=2048, K=N=1024, r=16 fp32 (quick: 512^3);
    CUDA M=4096, K=N=4096, r=16 bf16."""
    if device == "cuda":
        return [Shape(4096, 4096, 4096, 16, torch.bfloat16)]
    return [Shape(512, 512, 512, 16, torch.float32)] if quick else [Shape(2048, 1024, 1024, 16, torch.float32)]


def default_reps(shape: Shape, device: str, quick: bool) -> int:
    """Repeats per measurement: 5 quick, 50 on CUDA, on CPU about 2e11 FLOP's worth of
    fwd+bwd clamped to [15, 60]."""
    if quick:
        return 5
    if device == "cuda":
        return 50
    return max(15, min(60, int(2e11 / dora_flops(shape, "dora", "both"))))


def dora_flops(shape: Shape, impl: str, phase: str) -> int:
    """Useful FLOPs of one call (2 per multiply-add).

    LoRA: as :meth:`report.Shape.flops`. DoRA adds, forward, the row norms' ``A W^T``
    (2rNK; ``A A^T`` and the O(rN) terms are negligible) and, backward, dm
    (2MN). PEFT's DoRA does more (``B @ A`` and a norm over [N, K]); the same
    useful count is used for both DoRA implementations.
    """
    lora = shape.flops("fastlora", phase)
    if impl == "lora":
        return lora
    M, K, N, r = shape.M, shape.K, shape.N, shape.r
    extra = {"fwd": 2 * r * N * K, "bwd": 2 * M * N, "both": 2 * r * N * K + 2 * M * N}[phase]
    return lora + extra


# --------------------------------------------------------------------------- layers


def build_dora_layers(shape: Shape, dropout: float, device: str, seed: int = 0, bias: bool = True,
                      with_peft: bool = True) -> dict[str, nn.Module]:
    """fastlora ``DoRALinear``, fastlora ``LoRALinear`` and (when peft is installed)
    PEFT's DoRA ``lora.Linear``, identical weights, training mode (see the module
    docstring for the weights and the magnitude)."""
    base = build_layers(shape, dropout, device, seed=seed, bias=bias, with_peft=False)
    lora, linear = base["fastlora"], base["linear"]

    def frozen_linear() -> nn.Linear:
        lin = nn.Linear(shape.K, shape.N, bias=bias, device=device, dtype=shape.dtype)
        with torch.no_grad():
            lin.weight.copy_(linear.weight)
            if bias:
                lin.bias.copy_(linear.bias)
        return lin.requires_grad_(False).train()

    dora = fastlora.DoRALinear.from_linear(frozen_linear(), r=shape.r, alpha=2.0 * shape.r, dropout=dropout)
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        dora.lora_A.copy_(lora.lora_A)
        dora.lora_B.copy_(lora.lora_B)
        dora.reset_magnitude()  # ||W + s B A||_row, PEFT's init for these weights
        factor = torch.rand(shape.N, generator=g) + 0.5
        dora.lora_magnitude.mul_(factor.to(device=device, dtype=dora.lora_magnitude.dtype))
    layers: dict[str, nn.Module] = {"dora": dora.train(), "lora": lora.train()}
    if with_peft and have_peft():
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=shape.r, lora_alpha=2 * shape.r, lora_dropout=dropout, target_modules=["0"], bias="none",
                         use_dora=True)
        # NOTE: autocast_adapter_dtype=False keeps the adapters (and m) in the base
        # dtype, as report.py does for PEFT's LoRA: dtype for dtype.
        wrapped = get_peft_model(nn.Sequential(frozen_linear()), cfg, autocast_adapter_dtype=False)
        twin = wrapped.base_model.model[0]
        with torch.no_grad():
            twin.lora_A["default"].weight.copy_(dora.lora_A)
            twin.lora_B["default"].weight.copy_(dora.lora_B)
            magnitude = twin.lora_magnitude_vector["default"].weight
            magnitude.copy_(dora.lora_magnitude.to(magnitude.dtype))
        assert abs(twin.scaling["default"] - dora.scaling) < 1e-12
        layers["peft_dora"] = twin.train()
    return layers


# --------------------------------------------------------------------------- measurement


def run_case(shape: Shape, dropout: float, device: str, reps: int, warmup: int) -> dict:
    """All measurements of one (shape, dropout) row."""
    layers = build_dora_layers(shape, dropout, device)
    impls = [i for i in IMPLS if i in layers]
    x, dy = make_inputs(shape, device)
    row: dict = {"shape": shape.label, "M": shape.M, "K": shape.K, "N": shape.N, "r": shape.r,
                 "dtype": shape.label.split()[-1], "dropout": dropout, "backend": resolve_backend(x.device)}

    # Correctness sanity (dropout 0 only: masks, and PEFT's dropout formula, differ).
    if "peft_dora" in layers and dropout == 0.0:
        with torch.no_grad():
            a, b = layers["dora"](x), layers["peft_dora"](x)
            row["max_abs_diff_vs_peft"] = float((a.float() - b.float()).abs().max())
            row["max_abs_output"] = float(b.float().abs().max())

    # Saved-for-backward bytes (exact, deterministic).
    for impl in impls:
        mod = layers[impl]
        row[f"{impl}_saved_bytes"] = saved_activation_bytes(lambda m=mod: m(x), exclude=frozen_tensors(mod))
    row["saved_floor_bytes_X_plus_S"] = x.numel() * x.element_size() + shape.M * shape.r * x.element_size()
    row["saved_ratio_dora_lora"] = row["dora_saved_bytes"] / row["lora_saved_bytes"]
    if "peft_dora" in layers:
        row["saved_ratio_dora_peft"] = row["dora_saved_bytes"] / row["peft_dora_saved_bytes"]

    # Timings.
    row["reps"], row["warmup"] = reps, warmup
    samples = measure(layers, impls, x, dy, device, reps, warmup)
    for (impl, phase), vals in samples.items():
        p20, med, p80 = quantiles(vals)
        row[f"{impl}_{phase}_ms"] = med * 1e3
        row[f"{impl}_{phase}_p20_ms"] = p20 * 1e3
        row[f"{impl}_{phase}_p80_ms"] = p80 * 1e3
        row[f"{impl}_{phase}_tflops"] = dora_flops(shape, impl, phase) / med / 1e12 if med > 0 else math.nan
    for phase in PHASES:
        ours = row[f"dora_{phase}_ms"]
        row[f"ratio_dora_lora_{phase}"] = ours / row[f"lora_{phase}_ms"]
        if "peft_dora" in layers:
            row[f"ratio_dora_peft_{phase}"] = ours / row[f"peft_dora_{phase}_ms"]

    if device == "cuda":
        for impl in impls:
            row[f"{impl}_peak_mib"] = peak_memory_mib(layers[impl], x, dy)
    return row


# --------------------------------------------------------------------------- report


def _ms(row: dict, impl: str, phase: str) -> str:
    key = f"{impl}_{phase}_ms"
    if key not in row:
        return "n/a"
    return f"{row[key]:.3g} ({row[f'{impl}_{phase}_p20_ms']:.3g}-{row[f'{impl}_{phase}_p80_ms']:.3g})"


def _ratio(row: dict, key: str) -> str:
    return f"{row[key]:.3f}" if key in row else "n/a"


def _mib(n) -> str:
    return f"{n / 2**20:.2f}" if isinstance(n, (int, float)) else "n/a"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def targets(row: dict, device: str) -> list[tuple[str, str, bool]]:
    """(target, measured, met) for one row; reported, not asserted."""
    out = []
    if "ratio_dora_peft_both" in row:
        r = row["ratio_dora_peft_both"]
        out.append(("fwd+bwd time fastlora DoRA / PEFT DoRA <= 1.0", f"{r:.3f}", r <= 1.0))
    if "saved_ratio_dora_peft" in row:
        r = row["saved_ratio_dora_peft"]
        out.append(("saved bytes fastlora DoRA / PEFT DoRA <= 1.0", f"{r:.3f}", r <= 1.0))
    if device == "cuda":
        r = row["ratio_dora_lora_both"]
        out.append(("fwd+bwd time fastlora DoRA / fastlora LoRA <= 1.2", f"{r:.3f}", r <= 1.2))
    return out


def write_markdown(path: str, rows: list[dict], stamp: dict, device: str, notes: list[str]) -> None:
    lines = [f"# fastlora DoRA linear benchmark ({device})", ""]
    lines += [f"- {k}: {v}" for k, v in stamp.items()]
    lines += ["", "Times in ms: median (p20-p80). Ratios are of medians (< 1 means fastlora DoRA is faster / smaller).",
              ""]
    lines += ["## Summary: forward+backward", ""]
    head = ["shape", "dropout", "fastlora DoRA", "fastlora LoRA", "PEFT DoRA", "DoRA/LoRA", "DoRA/PEFT DoRA",
            "saved MiB DoRA/LoRA/PEFT DoRA", "saved DoRA/PEFT DoRA", "TFLOP/s DoRA/LoRA/PEFT DoRA"]
    if device == "cuda":
        head.append("peak MiB DoRA/LoRA/PEFT DoRA")
    body = []
    for row in rows:
        tf = "/".join(f"{row[f'{i}_both_tflops']:.3g}" if f"{i}_both_tflops" in row else "n/a" for i in IMPLS)
        cells = [row["shape"], f"{row['dropout']:g}", _ms(row, "dora", "both"), _ms(row, "lora", "both"),
                 _ms(row, "peft_dora", "both"), _ratio(row, "ratio_dora_lora_both"),
                 _ratio(row, "ratio_dora_peft_both"),
                 "/".join(_mib(row.get(f"{i}_saved_bytes")) for i in IMPLS), _ratio(row, "saved_ratio_dora_peft"), tf]
        if device == "cuda":
            cells.append("/".join(f"{row.get(f'{i}_peak_mib', math.nan):.1f}" for i in IMPLS))
        body.append(cells)
    lines += _table(head, body)
    lines += ["", "## Per phase", ""]
    head = ["shape", "dropout", "phase", "fastlora DoRA ms", "fastlora LoRA ms", "PEFT DoRA ms", "DoRA/LoRA",
            "DoRA/PEFT DoRA", "TFLOP/s DoRA", "reps"]
    body = []
    for row in rows:
        for phase in PHASES:
            body.append([row["shape"], f"{row['dropout']:g}", {"both": "fwd+bwd"}.get(phase, phase),
                         _ms(row, "dora", phase), _ms(row, "lora", phase), _ms(row, "peft_dora", phase),
                         _ratio(row, f"ratio_dora_lora_{phase}"), _ratio(row, f"ratio_dora_peft_{phase}"),
                         f"{row[f'dora_{phase}_tflops']:.3g}", str(row.get("reps", ""))])
    lines += _table(head, body)
    lines += ["", "## Saved for backward (bytes, exact)", ""]
    head = ["shape", "dropout", "fastlora DoRA", "fastlora LoRA", "X + S (LoRA floor)", "PEFT DoRA",
            "DoRA/LoRA", "DoRA/PEFT DoRA", "max |y_DoRA - y_PEFT DoRA| (of max |y|)"]
    body = []
    for row in rows:
        diff = row.get("max_abs_diff_vs_peft")
        body.append([row["shape"], f"{row['dropout']:g}", str(row.get("dora_saved_bytes")),
                     str(row.get("lora_saved_bytes")), str(row["saved_floor_bytes_X_plus_S"]),
                     str(row.get("peft_dora_saved_bytes", "n/a")), _ratio(row, "saved_ratio_dora_lora"),
                     _ratio(row, "saved_ratio_dora_peft"),
                     f"{diff:.2e} (of {row['max_abs_output']:.3g})" if diff is not None else "-"])
    lines += _table(head, body)
    lines += ["", "## Targets (issue 6; reported, not asserted)", ""]
    body = [[row["shape"], f"{row['dropout']:g}", name, value, "yes" if ok else "NO"]
            for row in rows for name, value, ok in targets(row, device)]
    lines += _table(["shape", "dropout", "target", "measured", "met"], body)
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="output folder (created)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    ap.add_argument("--quick", action="store_true", help="a small shape (CPU), few repeats")
    ap.add_argument("--shapes", default=None, help="comma list of MxKxNxr (overrides the defaults)")
    ap.add_argument("--dropouts", default=",".join(str(p) for p in DROPOUTS))
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args(argv)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("report_dora.py: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    notes: list[str] = []
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        notes.append("TRITON_INTERPRET is set in this process: fastlora runs the Triton interpreter, not a fast path")
    # CPU: the reference path (what users get on CPU); CUDA: dispatch as users get it.
    fastlora.set_backend("reference" if device == "cpu" else "auto")
    if args.shapes:
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        shapes = [parse_shape(s, dtype) for s in args.shapes.split(",")]
    else:
        shapes = default_shapes(device, args.quick)
    warmup = args.warmup or (2 if args.quick else (10 if device == "cuda" else 3))
    dropouts = [float(p) for p in args.dropouts.split(",")]

    if not have_peft():
        notes.append("peft is not installed: PEFT DoRA columns are n/a")
    notes.append("PEFT DoRA: peft.tuners.lora.Linear with LoraConfig(use_dora=True) from get_peft_model(..., "
                 "autocast_adapter_dtype=False), called directly (no PeftModel wrapper); identical W, bias, A, B, m; "
                 "alpha = 2r")
    notes.append("fastlora DoRA: row norms ||W + sBA|| from the cached ||W||^2, A W^T and A A^T (no B @ A, no [N, K] "
                 "temporary); the m / norm scale is applied after the fused LoRA op, so autograd also saves the "
                 "[M, N] pre-scale output for dm (see fastlora/dora.py)")
    notes.append("dropout > 0: fastlora drops the LoRA branch's input only; PEFT 0.21's DoRA runs a second base GEMM "
                 "on the dropped-out input (same expectation, different noise), so its timings include that GEMM")
    notes.append("saved bytes: distinct storages packed by autograd (saved_tensors_hooks), parameters and buffers "
                 "excluded; X + S is fastlora LoRA's floor")
    notes.append("TFLOP/s: useful FLOPs (LoRA's, plus 2rNK for A W^T and 2MN for dm on the DoRA columns) / median")
    if device == "cpu":
        notes.append("CPU: fastlora runs its reference path (PyTorch ops); the Triton kernels need CUDA")

    stamp = {"device": device_name(device), **{f"{k}_version": v for k, v in versions().items()},
             "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
             "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__)] + sys.argv[1:]),
             "reps": args.reps or "per shape (column reps)", "warmup": warmup, "load_avg_1m_start": loadavg()}
    rows: list[dict] = []
    os.makedirs(args.out, exist_ok=True)
    csv_path = os.path.join(args.out, f"dora_{device}.csv")
    md_path = os.path.join(args.out, f"dora_{device}.md")
    failed = 0
    t_start = time.perf_counter()
    for shape in shapes:
        for p in dropouts:
            t0 = time.perf_counter()
            try:
                reps = args.reps or default_reps(shape, device, args.quick)
                row = run_case(shape, p, device, reps, warmup)
            except Exception as exc:  # noqa: BLE001 - report the rest, name the failure
                failed += 1
                msg = f"{shape.label} dropout={p:g} FAILED: {type(exc).__name__}: {str(exc)[:300]}"
                notes.append(msg)
                print(msg, file=sys.stderr, flush=True)
                import traceback

                traceback.print_exc()
            else:
                rows.append(row)
                print(f"{shape.label} dropout={p:g}: fwd+bwd ms DoRA {_ms(row, 'dora', 'both')} "
                      f"LoRA {_ms(row, 'lora', 'both')} PEFT DoRA {_ms(row, 'peft_dora', 'both')}; "
                      f"DoRA/PEFT {_ratio(row, 'ratio_dora_peft_both')} saved DoRA/PEFT "
                      f"{_ratio(row, 'saved_ratio_dora_peft')} [{time.perf_counter() - t0:.1f}s]", flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()
            # Written after every case, so a run cut short still leaves its results.
            stamp["elapsed_s"] = f"{time.perf_counter() - t_start:.1f}"
            stamp["load_avg_1m_end"] = loadavg()
            write_csv(csv_path, rows, stamp)
            write_markdown(md_path, rows, stamp, device, notes)
    print(f"wrote {csv_path} and {md_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
