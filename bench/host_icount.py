"""Instructions per LoRA layer call at tiny shapes (M=16, K=N=64, r=8, fp32, CPU,
one thread), counted by valgrind's callgrind: a count the machine's load does not
disturb, for comparing host-side changes that wall time on a shared machine
cannot separate.

    bash bench/host_icount.sh [CALLS] [CANDIDATE ...]

runs this script under callgrind twice per candidate, with 0 and with CALLS
calls after the same warm-up, and prints (instructions with CALLS - with 0) /
CALLS. Candidates (the layers of ``bench/host_overhead.py`` and
``bench/host_floor.py``): ``eval`` / ``train`` (fastlora's LoRALinear, no_grad
forward / forward + backward), ``peft_eval`` / ``peft_train`` (PEFT's LoRA
layer), ``bare_eval`` (the reference forward's three aten ops in a bare module),
``bare_train`` (a bare autograd.Function with the reference's GEMMs). Python's
garbage collector is off while counting (its collections add tens of thousands
of instructions of run-to-run noise).

    python bench/host_icount.py CANDIDATE CALLS      # what host_icount.sh runs
"""

from __future__ import annotations

import gc
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fastlora  # noqa: E402
from host_floor import BareFunction, BareOps  # noqa: E402
from host_overhead import peft_layer  # noqa: E402

WARMUP = 300


def candidates() -> dict:
    torch.set_num_threads(1)
    fastlora.set_backend("reference")
    torch.manual_seed(0)
    ours = fastlora.LoRALinear(64, 64, r=8, alpha=16.0)
    theirs, bare_ops, bare_fn = peft_layer(ours), BareOps(ours), BareFunction(ours)
    x = torch.randn(16, 64)
    xg = x.clone().requires_grad_(True)

    def eval_call(layer):
        layer.eval()

        def f():
            with torch.no_grad():
                layer(x)
        return f

    def train_call(layer):
        layer.train()
        return lambda: layer(xg).sum().backward()

    return {
        "eval": lambda: eval_call(ours), "train": lambda: train_call(ours),
        "peft_eval": lambda: eval_call(theirs), "peft_train": lambda: train_call(theirs),
        "bare_eval": lambda: eval_call(bare_ops), "bare_train": lambda: train_call(bare_fn),
    }  # fmt: skip


def main() -> None:
    name, calls = sys.argv[1], int(sys.argv[2])
    table = candidates()
    if name not in table:
        raise SystemExit(f"host_icount.py: unknown candidate {name!r}; one of {sorted(table)}")
    f = table[name]()
    for _ in range(WARMUP):
        f()
    gc.collect()
    gc.disable()
    for _ in range(calls):
        f()


if __name__ == "__main__":
    main()
