#!/usr/bin/env python
"""Benchmark report: many adapters in one batch (``fastlora.lora_linear_multi``).

    python bench/report_multi.py --threads 1 --out bench/results [--quick] [--reps N]
    python bench/report_multi.py --device cuda --out OUT      # bf16, the Triton kernels, Llama-sized layers

A mixed batch: B samples of T tokens, each sample on one of ``--adapters``
LoRA adapters (drawn at random: ragged, unsorted rows), one linear layer
x [B*T, K] -> [B*T, N], rank r. Implementations, all with the same weights:

* ``multi``: ``fastlora.lora_linear_multi`` (one call for the whole batch);
* ``single``: ``fastlora.lora_linear`` with one adapter on the same rows (the
  cost a mixed batch is measured against: target multi/single <= 1.15 on CPU);
* ``sequential``: the adapters one after the other, ``fastlora.lora_linear``
  on each adapter's rows, the outputs put back in row order;
* ``peft``: PEFT's mixed-batch inference, ``lora.Linear(x, adapter_names=[...])``
  (its loop over the adapters present; inference only, so forward only);
* ``linear``: the frozen ``nn.Linear`` alone (context).

Phases: ``fwd`` = inference (``torch.no_grad``, eval: no dropout), ``fwd+bwd``
= one training step's forward and backward (x, lora_A, lora_B require grad).
Median with 20th/80th percentiles over ``--reps`` rounds after ``--warmup``;
the implementations are interleaved round by round so background load hits
them alike. On CPU fastlora runs its reference path in fp32; on CUDA its
default backend (the Triton kernels) in bf16, each timed call bracketed by
``torch.cuda.synchronize()``, and the table adds tokens per second (rows / the
median time). Writes
``multi_<device>.csv`` and ``multi_<device>.md`` into ``--out``, stamped with
device, versions, date, load average and the command.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import torch  # noqa: E402
from torch import nn  # noqa: E402

import fastlora  # noqa: E402
from report import device_name, have_peft, loadavg, quantiles, versions  # noqa: E402
from saved_bytes import saved_activation_bytes  # noqa: E402

IMPLS = ("multi", "single", "sequential", "peft", "linear")
PHASES = ("fwd", "both")
PHASE_NAMES = {"fwd": "fwd (inference)", "both": "fwd+bwd (training)"}


@dataclass(frozen=True)
class Case:
    """B samples of T tokens -> M = B*T rows of [K] -> [N], rank r, n adapters."""

    B: int
    T: int
    K: int
    N: int
    r: int
    n: int

    @property
    def M(self) -> int:
        return self.B * self.T

    @property
    def label(self) -> str:
        return f"M={self.M} ({self.B}x{self.T}) K={self.K} N={self.N} r={self.r} n={self.n}"


def default_cases(quick: bool, adapters: int, device: str = "cpu") -> list[Case]:
    if device == "cuda":  # a Llama-8B q_proj-sized layer: decode, prefill and a training batch
        cases = [Case(64, 32, 4096, 4096, 16, adapters), Case(16, 1, 4096, 4096, 16, adapters),
                 Case(64, 1, 4096, 4096, 16, adapters), Case(8, 512, 4096, 4096, 16, adapters)]  # fmt: skip
        return cases[:2] if quick else cases
    cases = [Case(64, 32, 1024, 1024, 16, adapters), Case(16, 32, 512, 512, 16, adapters),
             Case(2, 32, 1024, 1024, 16, adapters), Case(16, 1, 1024, 1024, 16, adapters),
             Case(8, 1, 1024, 1024, 16, adapters)]  # fmt: skip
    return cases[1:2] if quick else cases


def default_reps(case: Case, quick: bool, device: str = "cpu") -> int:
    if device == "cuda":
        return 10 if quick else 50
    if quick:
        return 5
    work = case.M * case.K * case.N
    return max(20, min(200, int(6e10 / work)))


class Setup:
    """Weights, the mixed batch and every implementation as ``fn(phase) -> y``."""

    def __init__(self, case: Case, seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        g = torch.Generator().manual_seed(seed)
        self.device = torch.device(device)
        K, N, r, n = case.K, case.N, case.r, case.n
        self.case = case
        self.weight = torch.randn(N, K, generator=g) / math.sqrt(K)
        self.bias = torch.randn(N, generator=g) * 0.1
        self.lora_A = (torch.randn(n, r, K, generator=g) / math.sqrt(K)).requires_grad_(True)
        self.lora_B = (torch.randn(n, N, r, generator=g) * 0.1).requires_grad_(True)
        self.scaling = torch.full((n,), 2.0)  # alpha = 2r
        self.A0 = self.lora_A[0].detach().clone().requires_grad_(True)
        self.B0 = self.lora_B[0].detach().clone().requires_grad_(True)
        sample_ids = torch.randint(0, n, (case.B,), generator=g)
        self.ids = sample_ids[:, None].expand(case.B, case.T).contiguous()  # [B, T]
        self.names = [f"a{int(i)}" for i in sample_ids]
        self.x = torch.randn(case.B, case.T, K, generator=g).requires_grad_(True)
        self.dy = torch.randn(case.B, case.T, N, generator=g)
        flat = self.ids.reshape(-1)
        self.rows = [(a, (flat == a).nonzero().flatten()) for a in range(n)]
        self.rows = [(a, rows) for a, rows in self.rows if rows.numel()]
        order = torch.cat([rows for _, rows in self.rows])
        self.inverse = torch.empty_like(order)
        self.inverse[order] = torch.arange(order.numel())
        self.linear = nn.Linear(K, N).requires_grad_(False)
        with torch.no_grad():
            self.linear.weight.copy_(self.weight)
            self.linear.bias.copy_(self.bias)
        self.peft = self._peft() if have_peft() else None
        if self.device.type != "cpu" or dtype != torch.float32:  # made on CPU (the same values), then moved
            self._move(self.device, dtype)

    def _move(self, device: torch.device, dtype: torch.dtype) -> None:
        def leaf(t):
            return t.detach().to(device, dtype).requires_grad_(t.requires_grad)

        self.weight, self.bias, self.x, self.dy = (t.to(device, dtype) for t in (self.weight, self.bias, self.x, self.dy))
        self.x.requires_grad_(True)
        self.lora_A, self.lora_B, self.A0, self.B0 = (leaf(t) for t in (self.lora_A, self.lora_B, self.A0, self.B0))
        self.scaling, self.ids, self.inverse = (t.to(device) for t in (self.scaling, self.ids, self.inverse))
        self.rows = [(a, rows.to(device)) for a, rows in self.rows]
        self.linear = self.linear.to(device, dtype)
        if self.peft is not None:
            self.peft = self.peft.to(device, dtype)

    def _peft(self):
        from peft import LoraConfig, get_peft_model

        case = self.case
        base = nn.Sequential(nn.Linear(case.K, case.N))
        with torch.no_grad():
            base[0].weight.copy_(self.weight)
            base[0].bias.copy_(self.bias)
        cfg = LoraConfig(r=case.r, lora_alpha=2 * case.r, target_modules=["0"])
        pm = get_peft_model(base, cfg, adapter_name="a0")
        for a in range(1, case.n):
            pm.add_adapter(f"a{a}", LoraConfig(r=case.r, lora_alpha=2 * case.r, target_modules=["0"]))
        layer = pm.base_model.model[0]
        with torch.no_grad():
            for a in range(case.n):
                layer.lora_A[f"a{a}"].weight.copy_(self.lora_A[a])
                layer.lora_B[f"a{a}"].weight.copy_(self.lora_B[a])
        pm.eval()
        return layer

    # -- the implementations: (x, training) -> y --------------------------------
    def multi(self, x, training):
        return fastlora.lora_linear_multi(x, self.weight, self.lora_A, self.lora_B, self.scaling, self.ids, self.bias,
                                          training=training)  # fmt: skip

    def single(self, x, training):
        return fastlora.lora_linear(x, self.weight, self.A0, self.B0, 2.0, self.bias)

    def sequential(self, x, training):
        x2 = x.reshape(-1, self.case.K)
        outs = [fastlora.lora_linear(x2.index_select(0, rows), self.weight, self.lora_A[a], self.lora_B[a],
                                     float(self.scaling[a]), self.bias) for a, rows in self.rows]  # fmt: skip
        return torch.cat(outs).index_select(0, self.inverse).reshape(*x.shape[:-1], self.case.N)

    def peft_call(self, x, training):
        return self.peft(x, adapter_names=self.names)

    def linear_call(self, x, training):
        return self.linear(x)

    def fn(self, impl):
        return {"multi": self.multi, "single": self.single, "sequential": self.sequential, "peft": self.peft_call,
                "linear": self.linear_call}[impl]  # fmt: skip

    def params(self):
        return [self.x, self.lora_A, self.lora_B, self.A0, self.B0]


def run_phase(setup: Setup, impl: str, phase: str) -> tuple[float, float]:
    """(wall seconds, this thread's CPU seconds): the thread time is what other
    processes on a shared machine disturb least (with --threads 1). On CUDA the
    call is bracketed by synchronizations, so the wall time is the GPU's."""
    fn = setup.fn(impl)
    for p in setup.params():
        p.grad = None
    cuda = setup.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.thread_time()
    if phase == "fwd":
        with torch.no_grad():
            fn(setup.x, False)
    else:
        fn(setup.x, True).backward(setup.dy)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0, time.thread_time() - c0


def impl_phases(setup: Setup) -> list[tuple[str, str]]:
    out = []
    for impl in IMPLS:
        if impl == "peft" and setup.peft is None:
            continue
        for phase in PHASES:
            if impl == "peft" and phase == "both":
                continue  # PEFT's adapter_names is inference only
            out.append((impl, phase))
    return out


def bytes_floor(case: Case, used: int) -> float:
    """The least memory traffic of the mixed batch over one adapter's, forward: both read
    x [M, K], the base weight [N, K] and write y [M, N]; the mixed batch reads ``used``
    adapters' A [r, K] and B [N, r] instead of one. The FLOPs are the same, so where the
    op is memory-bound (decode-sized M) this ratio is the floor of multi / single."""
    common = case.M * (case.K + case.N) + case.N * case.K
    adapter = case.r * (case.K + case.N)
    return (common + used * adapter) / (common + adapter)


def run_case(case: Case, reps: int, warmup: int, device: str = "cpu", dtype: torch.dtype = torch.float32) -> list[dict]:
    setup = Setup(case, device=device, dtype=dtype)
    floor = bytes_floor(case, int(setup.ids.unique().numel()))
    pairs = impl_phases(setup)
    # Correctness beside the timings: every implementation's output vs multi's (fp32).
    with torch.no_grad():
        y_multi = setup.multi(setup.x, False)
        diffs = {impl: float((setup.fn(impl)(setup.x, False) - y_multi).abs().max()) for impl in ("sequential", "peft")
                 if impl != "peft" or setup.peft is not None}  # fmt: skip
    saved = {impl: saved_activation_bytes(lambda f=setup.fn(impl): f(setup.x, True),
                                          exclude=[setup.weight, setup.bias, setup.lora_A, setup.lora_B, setup.A0,
                                                   setup.B0, setup.scaling])  # fmt: skip
             for impl in ("multi", "single", "sequential")}
    samples: dict[tuple[str, str], list[float]] = {p: [] for p in pairs}
    cpu: dict[tuple[str, str], list[float]] = {p: [] for p in pairs}
    for rnd in range(warmup + reps):
        for impl, phase in pairs:
            t, c = run_phase(setup, impl, phase)
            if rnd >= warmup:
                samples[(impl, phase)].append(t)
                cpu[(impl, phase)].append(c)
    rows = []
    med = {k: quantiles(v)[1] for k, v in samples.items()}
    cpu_med = {k: quantiles(v)[1] for k, v in cpu.items()}
    for (impl, phase), vals in samples.items():
        p20, m, p80 = quantiles(vals)
        c = cpu_med[(impl, phase)]
        row = dict(case=case.label, M=case.M, B=case.B, T=case.T, K=case.K, N=case.N, r=case.r, n_adapters=case.n,
                   impl=impl, phase=phase, dtype=str(dtype).replace("torch.", ""), median_ms=m * 1e3,
                   tokens_per_s=case.M / m, p20_ms=p20 * 1e3, p80_ms=p80 * 1e3, reps=reps,
                   ratio_vs_single=m / med[("single", phase)], ratio_multi_vs_this=med[("multi", phase)] / m,
                   thread_ms=c * 1e3, thread_ratio_vs_single=c / cpu_med[("single", phase)],
                   saved_bytes=saved.get(impl, "") if phase == "both" else "", bytes_floor=floor,
                   max_abs_diff_vs_multi=diffs.get(impl, "") if phase == "fwd" else "")  # fmt: skip
        rows.append(row)
    return rows


def write_csv(path: str, rows: list[dict], stamp: dict) -> None:
    keys = list(stamp) + [k for k in rows[0] if k not in stamp]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        for row in rows:
            w.writerow({**stamp, **{k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}})


def write_markdown(path: str, rows: list[dict], stamp: dict) -> None:
    lines = ["# fastlora multi-adapter benchmark (lora_linear_multi)", ""]
    lines += [f"- {k}: {v}" for k, v in stamp.items()]
    lines += ["", "Times in ms: median (p20-p80) over the repeats. `vs single` = this / one adapter on the same rows;",
              "`multi speedup` = this / multi (> 1: multi is faster). `thread ms`: median of this thread's CPU",
              "time (time.thread_time), which other processes disturb much less than wall time.", ""]  # fmt: skip
    lines += ["| case | phase | impl | ms | tokens/s | vs single | multi speedup | thread ms | thread vs single | "
              "saved for bwd (MiB) | max abs diff vs multi |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        saved = f"{row['saved_bytes'] / 2**20:.2f}" if row["saved_bytes"] != "" else ""
        diff = f"{row['max_abs_diff_vs_multi']:.1e}" if row["max_abs_diff_vs_multi"] != "" else ""
        lines.append(f"| {row['case']} | {PHASE_NAMES[row['phase']]} | {row['impl']} | {row['median_ms']:.3g} "
                     f"({row['p20_ms']:.3g}-{row['p80_ms']:.3g}) | {row['tokens_per_s']:.3g} | {row['ratio_vs_single']:.3f} | "
                     f"{row['ratio_multi_vs_this']:.2f} | {row['thread_ms']:.3g} | {row['thread_ratio_vs_single']:.3f} | "
                     f"{saved} | {diff} |")  # fmt: skip
    lines += ["", "## Target (issue: many adapters in one batch; reported, not asserted)", "",
              "| case | phase | multi / single (wall) | multi / single (thread CPU) | bytes floor | <= 1.15 (thread) |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        if row["impl"] == "multi":
            r, c = row["ratio_vs_single"], row["thread_ratio_vs_single"]
            lines.append(f"| {row['case']} | {PHASE_NAMES[row['phase']]} | {r:.3f} | {c:.3f} | {row['bytes_floor']:.3f} | "
                         f"{'yes' if c <= 1.15 else 'NO'} |")  # fmt: skip
    lines += ["", "## Notes", "",
              "- multi: fastlora.lora_linear_multi, reference path on CPU (base GEMM once; the LoRA rows as runs in x's "
              "order, grouped by adapter or padded per adapter, chosen by fastlora.reference.multi_path).",
              "- single: fastlora.lora_linear with adapter 0 on every row (the same base GEMM and LoRA FLOPs).",
              "- sequential: fastlora.lora_linear on each adapter's rows (index_select), outputs concatenated and "
              "put back in row order (autograd through the gathers).",
              "- peft: peft.tuners.lora.Linear(x, adapter_names=[...]) (PEFT's _mixed_batch_forward), eval mode, "
              "inference only.",
              "- saved for bwd: distinct storages autograd packs (saved_tensors_hooks), parameters excluded; multi "
              "saves x, the ids and S [M, r].",
              "- bytes floor: the mixed batch's least memory traffic over one adapter's (x, the base weight, y, and "
              "the adapters the batch uses instead of one; the FLOPs are equal): where the op is memory-bound, "
              "as at decode sizes, multi / single cannot go below it.",
              "- CPU timings on a shared 2-core machine: other processes add noise; rounds are interleaved, and "
              "the load average is stamped above."]  # fmt: skip
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--quick", action="store_true", help="one small case, few repeats")
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--cases", default=None, help="comma list of BxTxKxNxr (overrides the defaults)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("report_multi.py: --device cuda, but torch sees no CUDA device")
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    backend = "reference" if dev == "cpu" else fastlora.get_backend()
    fastlora.set_backend(backend)
    if args.cases:
        cases = [Case(*(int(v) for v in c.split("x")), args.adapters) for c in args.cases.split(",")]
    else:
        cases = default_cases(args.quick, args.adapters, dev)
    os.makedirs(args.out, exist_ok=True)
    stamp = {"device": device_name(dev), **{f"{k}_version": v for k, v in versions().items()},
             "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
             "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__)] + sys.argv[1:]),
             "threads": torch.get_num_threads(), "backend": backend, "warmup": args.warmup,
             "load_avg_1m_start": loadavg()}  # fmt: skip
    rows: list[dict] = []
    t0 = time.perf_counter()
    for case in cases:
        reps = args.reps or default_reps(case, args.quick, dev)
        print(f"{case.label}: {reps} reps", flush=True)
        rows += run_case(case, reps, args.warmup, dev, dtype)
        stamp["elapsed_s"] = f"{time.perf_counter() - t0:.1f}"
        stamp["load_avg_1m_end"] = loadavg()
        write_csv(os.path.join(args.out, f"multi_{dev}.csv"), rows, stamp)
        write_markdown(os.path.join(args.out, f"multi_{dev}.md"), rows, stamp)
    print(f"wrote {args.out}/multi_{dev}.csv and {args.out}/multi_{dev}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
