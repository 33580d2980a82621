"""AdaLoRA's rank budget during training (section 5 with ``--variant adalora``).

:class:`RankBudget` owns the :class:`fastlora.AdaLoRARankAllocator`: it gives the
training loop its loss term and its after-step hook, logs the budget and the
active ranks after every epoch, and prints the budget table and the final rank
pattern.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import AdaLoRAConfig, AdaLoRARankAllocator
from .data import layers
from .output import Printer
from .settings import LAYERS


class RankBudget:
    """The allocator for ``model`` under ``config`` and the budget it has set so far."""

    def __init__(self, model: nn.Module, config: AdaLoRAConfig, steps_per_epoch: int) -> None:
        self.model, self.config, self.steps_per_epoch = model, config, steps_per_epoch
        self.allocator = AdaLoRARankAllocator(model, config)
        self.initial = config.init_r * len(LAYERS)  # triplets over all layers
        self.target = config.target_r * len(LAYERS)
        self.final_step = config.total_step - config.tfinal
        self.budget = self.initial
        self.log: list[dict] = []

    def regularizer(self) -> Tensor:
        """The orthogonality penalty, added to each step's loss."""
        return self.allocator.orthogonal_regularization(self.model)

    def after_step(self, step: int) -> None:
        """After each ``optimizer.step()``: update the importance scores and prune."""
        self.budget = self.allocator.update_and_allocate(self.model, step)

    def explain(self, out: Printer) -> None:
        c = self.config
        out("  AdaLoRA: each step's loss is cross-entropy + allocator.orthogonal_regularization(model)")
        out(f"  (orth_reg_weight {c.orth_reg_weight:g}); after each optimizer.step() the allocator's")
        out("  update_and_allocate(model, step) updates the importance scores and prunes triplets to")
        out(
            f"  the step's budget: {self.initial} up to step {c.tinit}, then a cubic decrease to "
            f"{self.target} at step {self.final_step},"
        )
        out(f"  then that final rank pattern for the last {c.tfinal} steps. 'active ranks' = the non-zero")
        out("  E entries per layer (fc1 / fc2 / fc3) after the epoch, with their sum.")

    def record(self, epoch: int, logged: bool) -> str:
        """Log the state after ``epoch``; returns the training table's cell, ``"8/9/7 (24)"``."""
        ranks = {n: layer.active_rank for n, layer in layers(self.model).items()}
        self.log.append(
            {
                "epoch": epoch,
                "step": epoch * self.steps_per_epoch - 1,
                "budget": self.budget,
                "active_ranks": ranks,
                "total_active": sum(ranks.values()),
                "logged": logged,
            }
        )
        return "/".join(str(ranks[n]) for n in LAYERS) + f" ({sum(ranks.values())})"

    def report(self, out: Printer) -> dict:
        """Print the budget over training and the final rank pattern; returns their figures."""
        c, allocator = self.config, self.allocator
        reached = allocator.rank_pattern is not None and self.log[-1]["step"] >= self.final_step
        pattern = {n: [bool(v) for v in allocator.rank_pattern[n]] for n in LAYERS} if reached else None
        active = {n: layer.active_rank for n, layer in layers(self.model).items()}
        total = sum(active.values())
        with torch.no_grad():
            penalty = self.regularizer().item()
        out()
        out("  Rank budget (triplets kept after the epoch's last step)")
        rows = [
            [str(e["epoch"]), str(e["step"]), str(e["budget"])]
            + [str(e["active_ranks"][n]) for n in LAYERS]
            + [str(e["total_active"])]
            for e in self.log
            if e["logged"]
        ]
        out.table(["epoch", "step", "budget"] + list(LAYERS) + ["total"], rows, "rrrrrrr", indent="    ")
        out()
        if reached:
            out(f"  Final rank pattern (from step {self.final_step}; # kept, . pruned, triplets 0..{c.init_r - 1}):")
            for n in LAYERS:
                marks = "".join("#" if keep else "." for keep in pattern[n])
                out(f"    {n}  {marks}  {active[n]:>2} of {c.init_r}")
            out(
                f"    total {total} = target_r {c.target_r} x {len(LAYERS)} layers "
                f"(LoRA r={c.target_r}'s budget), spread by importance"
                if total == self.target
                else f"    total {total} (target {self.target})"
            )
        else:
            out(f"  The final rank pattern (step {self.final_step}) was not reached.")
        out(f"  Orthogonality penalty at the end: {penalty:.4g}")
        return {
            "budget": self.log,
            "final_pattern_reached": reached,
            "final_step": self.final_step,
            "final_rank_pattern": pattern,
            "final_active_ranks": active,
            "final_total_active": total,
            "final_orth_penalty": penalty,
        }
