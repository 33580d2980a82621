"""Section 9: the rank comparison: parameter counts of ranks 1 ... 64 and the
accuracy each reaches with a short training run from the same base."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch

from .. import count_parameters
from .output import epochs_text, pct
from .settings import ADAPTER_SEED_OFFSET, DELTA_RANK, LORA_LR, LORA_RANK, RANKS
from .training import accuracy
from .variants import adapt

if TYPE_CHECKING:
    from .walkthrough import Walkthrough


def rank_comparison(w: Walkthrough) -> None:
    """Section 9: one row per rank in RANKS, alpha / r held at the run's scaling."""
    args, out = w.args, w.out
    out.section(9, "Rank comparison")
    vera = args.variant == "vera"
    variant = args.variant if w.variant.own_rank_table else "lora"
    # NOTE: VeRA has no alpha; its LoRA comparison keeps the default LoRA's alpha / r.
    scaling = args.alpha / (LORA_RANK if vera else args.rank)
    lr = LORA_LR if vera and not args.lr_given else args.lr
    if variant != args.variant:
        out(f"  This table compares plain LoRA ranks (it is LoRA-only for --variant {args.variant}),")
        out(f"  trained with Adam at learning rate {lr:g}.")
    rows, info = [], []
    with w.progress(len(RANKS) * args.rank_epochs, "  rank comparison") as progress:
        for r in RANKS:
            candidate = copy.deepcopy(w.base)
            torch.manual_seed(w.seed + ADAPTER_SEED_OFFSET)
            adapt(candidate, variant, r, r * scaling)
            n = count_parameters(candidate)[0]
            acc = None
            if args.rank_epochs > 0:
                w.fine_tune(candidate, epochs=args.rank_epochs, lr=lr, on_epoch=lambda stats: progress.update())
                acc = accuracy(candidate, w.b_val)
            savings = 1 - n / w.base_params
            info.append(
                {
                    "rank": r,
                    "trainable": n,
                    "compression": w.base_params / n,
                    "memory_savings_pct": 100 * savings,
                    "val_accuracy": acc,
                }
            )
            shown = "-" if acc is None else pct(acc)
            rows.append([str(r), f"{n:,}", f"{w.base_params / n:.1f}x", f"{100 * savings:.2f} %", shown])
    epochs = epochs_text(args.rank_epochs)
    out(f"  Each rank starts from the same base and trains for {epochs}; alpha = {scaling:g} x r,")
    out(f"  so alpha / r stays {scaling:g}. Memory savings = 1 - trainable / base parameters (the")
    out("  gradients and the optimiser state shrink in the same proportion).")
    out()
    headers = ["rank", "trainable params", "compression", "memory savings", f"val acc ({epochs})"]
    out.table(headers, rows, "rrrrr")
    out()
    out(f"  Task B's change has rank {DELTA_RANK} per layer ({DELTA_RANK + 1} in fc3); "
        "a smaller rank cannot express it.")
    measured = [row for row in info if row["val_accuracy"] is not None]
    if measured:
        best = max(row["val_accuracy"] for row in measured)
        # NOTE: compared as printed (0.1 % steps), so float rounding cannot decide a tie.
        enough = next(row for row in measured if round(1000 * row["val_accuracy"]) >= round(1000 * best) - 10)
        out(
            f"  Measured here: rank {enough['rank']} ({enough['trainable']:,} parameters) is the smallest within "
            f"one point of the best ({pct(best)})."
        )
    w.result["rank_comparison"] = {
        "variant": variant,
        "epochs": args.rank_epochs,
        "alpha_over_r": scaling,
        "rows": info,
    }
