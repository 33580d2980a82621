#!/usr/bin/env python
"""CPU dropout report: fastlora's reference path with dropout, regenerate vs stored_bits, vs PEFT and nn.Linear.

    python bench/report_dropout.py --device cpu --threads 1 --out bench/results [--quick]

One LoRA layer (default M=2048, K=1024, N=1024, r=16, fp32, dropout 0.1,
alpha = 2r, bias); forward (building the graph), backward (its forward runs
untimed) and forward+backward, x requiring grad as in training; timed for,
interleaved round by round:

* ``regenerate``: fastlora ``LoRALinear``, the dropout mask drawn in forward
  and drawn again from the seed in backward (``set_strategy("dropout", "regenerate")``);
* ``stored_bits``: the same layer, the mask packed to 1 bit per element in
  forward and unpacked in backward (``set_strategy("dropout", "stored_bits")``);
* ``no dropout``: the same layer with dropout 0 (what dropout costs on top);
* ``PEFT``: ``peft`` LoRA (dropout 0.1) on the same frozen ``nn.Linear``;
* ``nn.Linear``: the frozen layer alone (backward: dX only), the target's baseline.

Each call is timed by wall clock and by the CPU time of the calling thread
(``time.thread_time``; with one torch thread all the work runs on it), which
time other processes hold the core leaves out. Ratios are of medians. Also
listed: what the strategy chooser picks on CPU when nothing is forced, the
costs of the mask's pieces (draw, bool -> float, pack, unpack), and the bytes
each dropout strategy saves for backward (exact). Writes
``dropout_cpu.md`` / ``dropout_cpu.csv`` into ``--out``. Nothing here asserts
a timing.

CPU only: there the reference path runs, and the dropout strategy is a
setting (the chooser never measures on CPU). On CUDA the strategies are timed
by the chooser itself (``fastlora.strategy_report()``) and modelled in
``bench/cost_model.py``; ``--device cuda`` is refused with that pointer.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import shlex
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import torch  # noqa: E402

import fastlora  # noqa: E402
from fastlora import reference  # noqa: E402
from fastlora.strategies import forced_strategies, set_strategy, strategy_backend  # noqa: E402
from fastlora.strategy_ops import new_s_with_bits, pack_bits, unpack_bits  # noqa: E402
from report import (  # noqa: E402
    Shape,
    build_layers,
    clear_grads,
    device_name,
    frozen_tensors,
    loadavg,
    make_inputs,
    parse_shape,
    quantiles,
    versions,
    write_csv,
)
from saved_bytes import saved_activation_bytes  # noqa: E402

IMPLS = ("regenerate", "stored_bits", "no_dropout", "peft", "linear")
LABELS = {"regenerate": "fastlora regenerate", "stored_bits": "fastlora stored_bits", "no_dropout": "fastlora p=0",
          "peft": "PEFT", "linear": "nn.Linear"}
TARGET = 1.15  # issue 9: CPU reference fwd+bwd with dropout <= 1.15x a frozen nn.Linear


def build(shape: Shape, p: float) -> dict[str, tuple[torch.nn.Module, str | None]]:
    """impl -> (module, forced dropout strategy or None)."""
    with_p = build_layers(shape, p, "cpu")
    without = build_layers(shape, 0.0, "cpu", with_peft=False)
    out = {"regenerate": (with_p["fastlora"], "regenerate"), "stored_bits": (with_p["fastlora"], "stored_bits"),
           "no_dropout": (without["fastlora"], None), "linear": (with_p["linear"], None)}
    if "peft" in with_p:
        out["peft"] = (with_p["peft"], None)
    return out


PHASES = ("fwd", "bwd", "both")


def one_call(module: torch.nn.Module, strategy: str | None, x: torch.Tensor, dy: torch.Tensor,
             phase: str) -> tuple[float, float]:
    """(wall s, thread CPU s) of one forward ("fwd"), backward ("bwd"; its forward
    untimed) or forward+backward ("both") with the dropout ``strategy`` forced."""
    set_strategy("dropout", strategy)
    clear_grads(module, x)
    y = module(x) if phase == "bwd" else None
    c0 = time.thread_time()
    t0 = time.perf_counter()
    if y is None:
        y = module(x)
    if phase != "fwd":
        y.backward(dy)
    wall = time.perf_counter() - t0
    cpu = time.thread_time() - c0
    del y
    return wall, cpu


def piece_costs(shape: Shape, p: float, reps: int) -> dict[str, float]:
    """Median thread-CPU ms of the dropout mask's pieces at x's shape [M, K]."""
    m, k = shape.M, shape.K
    x = torch.randn(m, k, dtype=shape.dtype)
    mask, _ = reference.dropout_keep_mask(0, (m, k), p, x.device)
    s, bits = new_s_with_bits(m, shape.r, k, shape.dtype, x.device)
    pack_bits(mask, bits)
    fns = {
        "draw the mask (dropout_keep_mask)": lambda: reference.dropout_keep_mask(0, (m, k), p, x.device),
        "bool mask -> float (mask.to(dtype))": lambda: mask.to(shape.dtype),
        "the same bytes as uint8 -> float": lambda: mask.view(torch.uint8).to(shape.dtype),
        "pack to bits (stored_bits, forward)": lambda: pack_bits(mask, bits),
        "unpack + to float (stored_bits, backward)": lambda: unpack_bits(bits, k).to(shape.dtype),
        "dropout(x): float mask * x": lambda: mask.view(torch.uint8).to(shape.dtype).mul_(x),
    }
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps + 2):
        for name, fn in fns.items():
            c0 = time.thread_time()
            fn()
            samples[name].append(time.thread_time() - c0)
    return {name: quantiles(v[2:])[1] * 1e3 for name, v in samples.items()}


def saved_bytes(module: torch.nn.Module, strategy: str | None, x: torch.Tensor) -> int:
    set_strategy("dropout", strategy)
    return saved_activation_bytes(lambda: module(x), exclude=frozen_tensors(module))


def run(shape: Shape, p: float, reps: int, warmup: int) -> tuple[dict, dict[str, float]]:
    """One row: per impl and phase, wall and thread-CPU medians (p20-p80) in ms
    (keys ``<impl>[_<phase>]_<wall|cpu>_ms``, no phase suffix for fwd+bwd) and
    the ratios to nn.Linear; saved bytes; the CPU default spec."""
    layers = build(shape, p)
    x, dy = make_inputs(shape, "cpu")
    impls = [i for i in IMPLS if i in layers]
    wall: dict[tuple[str, str], list[float]] = {(i, ph): [] for i in impls for ph in PHASES}
    cpu: dict[tuple[str, str], list[float]] = {(i, ph): [] for i in impls for ph in PHASES}
    forced_before = forced_strategies().get("dropout")
    try:
        for rnd in range(warmup + reps):
            for impl in impls:
                for phase in PHASES:
                    w, c = one_call(*layers[impl], x, dy, phase)
                    if rnd >= warmup:
                        wall[(impl, phase)].append(w)
                        cpu[(impl, phase)].append(c)
        row: dict = {"shape": shape.label, "dropout": p, "reps": reps}
        for impl in impls:
            for phase in PHASES:
                key = impl if phase == "both" else f"{impl}_{phase}"
                for kind, samples in (("wall", wall), ("cpu", cpu)):
                    p20, med, p80 = quantiles(samples[(impl, phase)])
                    row[f"{key}_{kind}_ms"], row[f"{key}_{kind}_p20_ms"], row[f"{key}_{kind}_p80_ms"] = (
                        med * 1e3, p20 * 1e3, p80 * 1e3)
        for impl in impls:
            for phase in PHASES:
                key = impl if phase == "both" else f"{impl}_{phase}"
                base = "linear" if phase == "both" else f"linear_{phase}"
                for kind in ("wall", "cpu"):
                    row[f"{key}_over_linear_{kind}"] = row[f"{key}_{kind}_ms"] / row[f"{base}_{kind}_ms"]
        for impl in ("regenerate", "stored_bits"):
            row[f"{impl}_saved_bytes"] = saved_bytes(*layers[impl], x)
        # What the chooser picks on CPU with nothing forced (the reference backend never measures).
        set_strategy("dropout", None)
        fl = layers["regenerate"][0]
        row["cpu_default_spec"] = strategy_backend("lora", "reference", (x, fl.weight, fl.lora_A, fl.lora_B), p)
    finally:
        set_strategy("dropout", forced_before)
    return row, piece_costs(shape, p, reps)


def _q(row: dict, key: str) -> str:
    return f"{row[f'{key}_ms']:.3g} ({row[f'{key}_p20_ms']:.3g}-{row[f'{key}_p80_ms']:.3g})"


def write_markdown(path: str, rows: list[dict], pieces: list[dict[str, float]], stamp: dict, notes: list[str]) -> None:
    lines = ["# fastlora CPU dropout: regenerate vs stored_bits (reference path)", ""]
    lines += [f"- {k}: {v}" for k, v in stamp.items()]
    lines += ["", "Forward+backward per call, ms: median (p20-p80). CPU = thread CPU time (time.thread_time) of the "
              "calling thread; / Linear = ratio of medians to the frozen nn.Linear of the same run "
              f"(target: <= {TARGET} with dropout).", ""]
    head = ["shape", "dropout", "impl", "wall ms", "CPU ms", "/ Linear (wall)", "/ Linear (CPU)", "met (CPU)"]
    body = []
    for row in rows:
        for impl in IMPLS:
            if f"{impl}_wall_ms" not in row:
                continue
            ratio_cpu = row[f"{impl}_over_linear_cpu"]
            met = ("yes" if ratio_cpu <= TARGET else "NO") if impl in ("regenerate", "stored_bits") else ""
            body.append([row["shape"], "0" if impl in ("no_dropout", "linear") else f"{row['dropout']:g}",
                         LABELS[impl], _q(row, f"{impl}_wall"), _q(row, f"{impl}_cpu"),
                         f"{row[f'{impl}_over_linear_wall']:.3f}", f"{ratio_cpu:.3f}", met])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(c) + " |" for c in body]
    lines += ["", "## Per phase (thread CPU ms, median (p20-p80); / Linear: that phase of nn.Linear)", ""]
    head = ["shape", "impl", "fwd CPU ms", "fwd / Linear", "bwd CPU ms", "bwd / Linear"]
    body = []
    for row in rows:
        for impl in IMPLS:
            if f"{impl}_fwd_cpu_ms" in row:
                body.append([row["shape"], LABELS[impl], _q(row, f"{impl}_fwd_cpu"),
                             f"{row[f'{impl}_fwd_over_linear_cpu']:.3f}", _q(row, f"{impl}_bwd_cpu"),
                             f"{row[f'{impl}_bwd_over_linear_cpu']:.3f}"])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(c) + " |" for c in body]
    lines += ["", "## Bytes saved for backward (exact) and the CPU default", "",
              "| shape | regenerate B | stored_bits B | chooser's spec on CPU (nothing forced) |", "|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['shape']} | {row['regenerate_saved_bytes']} | {row['stored_bits_saved_bytes']} | "
                     f"`{row['cpu_default_spec']}` |")
    lines += ["", "## The mask's pieces (thread CPU ms, median, x's shape)", "",
              "| shape | piece | ms |", "|---|---|---|"]
    for row, costs in zip(rows, pieces):
        lines += [f"| {row['shape']} | {name} | {ms:.3g} |" for name, ms in costs.items()]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--device", default="cpu", help="cpu (the only one: see the module docstring)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--shapes", default="2048x1024x1024x16", help="comma list of MxKxNxr (fp32)")
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="512x512x512x16, 3 repeats")
    args = ap.parse_args(argv)
    if args.device != "cpu":
        print(f"report_dropout.py: --device must be cpu, got {args.device!r}; on CUDA the dropout strategies are "
              "timed by fastlora's chooser (fastlora.strategy_report()) and modelled in bench/cost_model.py",
              file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    fastlora.set_backend("reference")
    shapes = ["512x512x512x16"] if args.quick else args.shapes.split(",")
    reps = 3 if args.quick else args.reps
    stamp = {"device": device_name("cpu"), **{f"{k}_version": v for k, v in versions().items()},
             "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
             "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__)] + sys.argv[1:]),
             "reps": reps, "warmup": args.warmup, "load_avg_1m_start": loadavg()}
    notes = ["the two fastlora rows are one LoRALinear; only the forced dropout strategy differs between its calls",
             "nn.Linear: frozen weight and bias, x requires grad (backward = dX only)",
             "regenerate draws the mask twice per step (forward and backward); stored_bits once, plus a pack in "
             "forward and an unpack in backward, and saves M*ceil(K/8) bytes more for backward"]
    rows, pieces = [], []
    t0 = time.perf_counter()
    for text in shapes:
        shape = parse_shape(text, torch.float32)
        row, costs = run(shape, args.dropout, reps, args.warmup)
        rows.append(row)
        pieces.append(costs)
        print(f"{shape.label} p={args.dropout:g}: " + ", ".join(
            f"{LABELS[i]} {row[f'{i}_cpu_ms']:.3g} ms ({row[f'{i}_over_linear_cpu']:.3f}x)"
            for i in IMPLS if f"{i}_cpu_ms" in row) + " [CPU time]", flush=True)
    stamp["elapsed_s"] = f"{time.perf_counter() - t0:.1f}"
    stamp["load_avg_1m_end"] = loadavg()
    os.makedirs(args.out, exist_ok=True)
    write_csv(os.path.join(args.out, "dropout_cpu.csv"), rows, stamp)
    write_markdown(os.path.join(args.out, "dropout_cpu.md"), rows, pieces, stamp, notes)
    print(f"wrote {os.path.join(args.out, 'dropout_cpu.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
