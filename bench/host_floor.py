"""The floor under a LoRA layer call's host time at tiny shapes: what the same
aten ops cost with nothing of fastlora around them, side by side with
fastlora's LoRALinear, PEFT's LoRA layer and a plain nn.Linear.

Candidates (M=16, K=N=64, r=8, fp32, CPU, one thread; interleaved in rounds):

* ``bare ops``: an nn.Module whose forward is the reference forward's aten ops
  and nothing else (``linear(x, W, b)``, ``linear(x, A)``, ``addmm``): no
  validation, no dispatch. In training it is recorded by autograd op by op.
* ``bare Function``: the same forward inside a minimal ``torch.autograd.Function``
  whose backward runs the reference backward's GEMMs (dS = s dY B, dB = s dY^T S,
  dA = dS^T x, dx = dY W + dS A), with no checks: the cheapest a custom
  Function with fastlora's saved tensors (x and S) can be here.
* ``fastlora``, ``peft``, ``nn.Linear``: as in ``bench/host_overhead.py``.

Each candidate is timed by wall clock (``time.perf_counter``) and by this
thread's CPU time (``time.thread_time``), which other processes on a shared
machine disturb much less. The table gives medians over rounds.

    python bench/host_floor.py --threads 1
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

import fastlora

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from host_overhead import interleaved, peft_layer  # noqa: E402


class BareOps(nn.Module):
    def __init__(self, layer: fastlora.LoRALinear) -> None:
        super().__init__()
        self.weight, self.bias, self.lora_A, self.lora_B, self.scaling = (
            layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling,
        )  # fmt: skip

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        return y.addmm(F.linear(x, self.lora_A), self.lora_B.t(), alpha=self.scaling)


class _Bare(torch.autograd.Function):
    """fastlora.reference's lora_forward / lora_backward (no dropout, fp32) op for op."""

    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, bias, scaling):
        s = F.linear(x, lora_A)
        y = F.linear(x, weight, bias)
        y.addmm_(s, lora_B.t(), alpha=scaling)
        ctx.save_for_backward(x, weight, lora_A, lora_B, s)
        ctx.scaling = scaling
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, s = ctx.saved_tensors
        need_x, _, need_a, need_b, _, _ = ctx.needs_input_grad
        ds = torch.addmm(s, dy, lora_B, beta=0, alpha=ctx.scaling)
        db = torch.addmm(lora_B, dy.t(), s, beta=0, alpha=ctx.scaling) if need_b else None
        da = torch.mm(ds.t(), x) if need_a else None
        dx = torch.mm(dy, weight).addmm_(ds, lora_A) if need_x else None
        return dx, None, da, db, None, None


class BareFunction(BareOps):
    def forward(self, x):
        return _Bare.apply(x, self.weight, self.lora_A, self.lora_B, self.bias, self.scaling)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fastlora.set_backend("reference")
    torch.manual_seed(0)
    ours = fastlora.LoRALinear(64, 64, r=8, alpha=16.0)
    with torch.no_grad():
        ours.lora_B.normal_()
    impls = {
        "bare ops": BareOps(ours),
        "bare Function": BareFunction(ours),
        "fastlora": ours,
        "peft": peft_layer(ours),
        "nn.Linear": nn.Linear(64, 64),
    }
    x = torch.randn(16, 64)
    with torch.no_grad():
        want = ours(x)
        for name in ("bare ops", "bare Function", "peft"):
            torch.testing.assert_close(impls[name](x), want)  # the same layer, computed four ways
    rows = interleaved(impls, x, args.rounds, args.calls)
    print("| mode | impl | wall us | thread CPU us | / PEFT (CPU) |\n|---|---|---|---|---|")
    for row in rows:
        peft_cpu = next(r["cpu_median_us"] for r in rows if r["mode"] == row["mode"] and r["impl"] == "peft")
        c = row["cpu_median_us"]
        print(f"| {row['mode']} | {row['impl']} | {row['median_us']:.1f} | {c:.1f} | {c / peft_cpu:.2f} |")
    print(
        f"torch {torch.__version__}, {args.threads} thread(s); M=16, K=N=64, r=8, fp32, reference backend; "
        f"median over {args.rounds} interleaved rounds of {args.calls} calls"
    )


if __name__ == "__main__":
    main()
