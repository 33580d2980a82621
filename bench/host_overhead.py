"""Host overhead per LoRA layer call at tiny shapes, side by side with PEFT and a
frozen nn.Linear measured in the same run.

At K = N = 64, r = 8, M = 16 the arithmetic is a few microseconds, so what is
timed is the Python/dispatch work around it: the time a GPU would wait for the
host on every small-batch step (224 LoRA layers of a Llama-8B at 250 us each
is 56 ms per step before any kernel runs). Targets (issue "kernel correctness
and host overhead"): eval forward <= 0.5x PEFT's time, training forward +
backward <= 0.7x.

Each configuration is timed in interleaved rounds (fastlora, PEFT, nn.Linear,
fastlora, ...) so that a noisy machine slows all three alike; the table gives
the median wall time over rounds and the p20-p80 range, and the ratio of the
medians of this thread's CPU time (``time.thread_time``), which other processes
on a shared machine disturb much less than the wall clock.
``bench/host_floor.py`` shows what the same aten ops cost with nothing around them.

    python bench/host_overhead.py --out bench/results --threads 1
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import time

import torch
from torch import nn

import fastlora


def peft_layer(layer: fastlora.LoRALinear) -> nn.Module:
    """PEFT's LoRA layer holding the same base weight, bias and adapters as ``layer``."""
    import peft

    base = nn.Linear(layer.in_features, layer.out_features)
    with torch.no_grad():
        base.weight.copy_(layer.weight)
        base.bias.copy_(layer.bias)
    model = peft.get_peft_model(nn.Sequential(base), peft.LoraConfig(r=layer.r, lora_alpha=layer.alpha, target_modules=["0"]))
    theirs = model.base_model.model[0]
    with torch.no_grad():
        theirs.lora_A["default"].weight.copy_(layer.lora_A)
        theirs.lora_B["default"].weight.copy_(layer.lora_B)
    return theirs


def _time(fn, calls: int) -> tuple[float, float]:
    """(wall, thread CPU) microseconds per call."""
    start, cpu = time.perf_counter(), time.thread_time()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6, (time.thread_time() - cpu) / calls * 1e6


def interleaved(impls: dict[str, nn.Module], x: torch.Tensor, rounds: int, calls: int) -> list[dict]:
    """Each layer of ``impls`` called on x in eval (no_grad forward) and in training
    (forward + backward, x requiring grad), ``calls`` calls per sample, the layers
    interleaved over ``rounds`` rounds; one row per (mode, impl) with the wall-time
    median, p20, p80 and the thread-CPU median, in microseconds per call."""
    xg = x.clone().requires_grad_(True)

    def eval_call(layer):
        def f():
            with torch.no_grad():
                layer(x)
        return f

    def train_call(layer):
        def f():
            layer(xg).sum().backward()
        return f

    rows = []
    for mode, make in (("eval forward", eval_call), ("train forward+backward", train_call)):
        for layer in impls.values():
            layer.train(mode.startswith("train"))
        fns = {name: make(layer) for name, layer in impls.items()}
        for fn in fns.values():  # warm-up
            _time(fn, calls)
        samples: dict[str, list[float]] = {name: [] for name in fns}
        cpu: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                wall_us, cpu_us = _time(fn, calls)
                samples[name].append(wall_us)
                cpu[name].append(cpu_us)
        for name, values in samples.items():
            qs = statistics.quantiles(values, n=10)
            rows.append(
                dict(
                    mode=mode, impl=name, median_us=statistics.median(values), p20_us=qs[1], p80_us=qs[7],
                    cpu_median_us=statistics.median(cpu[name]),
                )
            )  # fmt: skip
    return rows


def measure(rounds: int, calls: int, m: int = 16, k: int = 64, n: int = 64, r: int = 8) -> list[dict]:
    torch.manual_seed(0)
    ours = fastlora.LoRALinear(k, n, r=r, alpha=16.0)
    impls = {"fastlora": ours, "peft": peft_layer(ours), "nn.Linear": nn.Linear(k, n)}
    return interleaved(impls, torch.randn(m, k), rounds, calls)


def table(rows: list[dict]) -> str:
    lines = [
        "| mode | fastlora us | PEFT us | nn.Linear us | fastlora / PEFT | fastlora / PEFT (thread CPU) | target |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, target in (("eval forward", "<= 0.5"), ("train forward+backward", "<= 0.7")):
        by = {r["impl"]: r for r in rows if r["mode"] == mode}
        cell = lambda i: f"{by[i]['median_us']:.1f} ({by[i]['p20_us']:.0f}-{by[i]['p80_us']:.0f})"  # noqa: E731
        ratio = by["fastlora"]["median_us"] / by["peft"]["median_us"]
        cpu_ratio = by["fastlora"]["cpu_median_us"] / by["peft"]["cpu_median_us"]
        lines.append(
            f"| {mode} | {cell('fastlora')} | {cell('peft')} | {cell('nn.Linear')} | {ratio:.2f} | {cpu_ratio:.2f} | {target} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="folder for host_overhead_cpu.md / .csv")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fastlora.set_backend("reference")
    rows = measure(args.rounds, args.calls)
    text = table(rows)
    import peft

    stamp = (
        f"{datetime.date.today().isoformat()}, {platform.processor() or platform.machine()}, {args.threads} thread(s), "
        f"torch {torch.__version__}, peft {peft.__version__}, fastlora {fastlora.__version__}; M=16, K=N=64, r=8, fp32, "
        f"reference backend; median over {args.rounds} interleaved rounds of {args.calls} calls (p20-p80)"
    )
    print(text)
    print(stamp)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "host_overhead_cpu.md"), "w") as f:
            f.write(f"# Host overhead per LoRA layer call\n\n`python bench/host_overhead.py --out {args.out} --threads {args.threads}`\n\n{text}\n\n{stamp}\n")
        with open(os.path.join(args.out, "host_overhead_cpu.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]) + ["stamp"])
            writer.writeheader()
            for row in rows:
                writer.writerow({**row, "stamp": stamp})


if __name__ == "__main__":
    main()
