"""The walkthrough: its nine sections in order, and the state they share.

Each section is a function of the :class:`Walkthrough` in a module of its own
kind (``tasks``: 1-3, ``adapters``: 4-5, ``evaluation``: 6-8, ``ranks``: 9). It
prints its part, records its figures in ``walkthrough.result`` (the object
``--json`` prints) and sets the attributes later sections read.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from . import multi
from .adapters import apply_adapters, train_adapters
from .data import MLP, Split
from .evaluation import compare_accuracy, loss_curve, merging
from .output import Printer, Progress
from .ranks import rank_comparison
from .settings import FINETUNE_SEED_OFFSET, TRAIN_SAMPLES
from .tasks import base_network, configuration, task_b
from .training import EpochStats, fit
from .variants import VARIANTS, adalora_config

SECTIONS: tuple[Callable[[Walkthrough], None], ...] = (
    configuration,  # 1
    base_network,  # 2
    task_b,  # 3
    apply_adapters,  # 4
    train_adapters,  # 5
    loss_curve,  # 6
    compare_accuracy,  # 7
    merging,  # 8
    rank_comparison,  # 9
)


class Walkthrough:
    """One run of the demo for parsed ``args`` on ``device`` with ``backend``."""

    # Set by the sections, in order (the section that sets each is named).
    gen: torch.Generator  # 2: the data generator, continued by 3
    base: MLP  # 2: the pretrained base network (frozen)
    base_params: int  # 2
    acc_a: float  # 2: the base's accuracy on task A
    a_test: Split  # 2: task A's held-out samples
    b_train: Split  # 3
    b_val: Split  # 3
    base_acc_b: float  # 3: the base's validation accuracy on task B
    model: nn.Module  # 4: a copy of the base with the adapters
    lora_params: int  # 4: the adapters' trainable parameters
    init_diff: float  # 4: the adapted model's largest output change before training
    initial_train_loss: float  # 5
    initial_val_loss: float  # 5
    initial_val_acc: float  # 5
    history: list[EpochStats]  # 5

    def __init__(self, args: argparse.Namespace, device: torch.device, backend: str) -> None:
        self.args = args
        self.device = device
        self.backend = backend
        self.seed = args.seed
        self.out = Printer(quiet=args.json)
        self.show_progress = not (args.json or args.no_progress) and sys.stdout.isatty()
        self.variant = VARIANTS[args.variant]
        self.label = self.variant.label
        self.steps_per_epoch = math.ceil(TRAIN_SAMPLES / args.batch_size)
        self.adalora_config = (
            adalora_config(args.rank, args.alpha, args.epochs * self.steps_per_epoch)
            if args.variant == "adalora"
            else None
        )
        self.result: dict = {}

    def run(self) -> int:
        start = time.perf_counter()
        self.out(f"fastlora demo: {self.label} fine-tuning, step by step")
        sections = SECTIONS[:2] + multi.SECTIONS if self.variant.name == "multi" else SECTIONS
        for section in sections:
            section(self)
        self.result["wall_time_s"] = time.perf_counter() - start
        self.out()
        self.out(f"Done in {self.result['wall_time_s']:.1f} s.")
        if self.args.json:
            print(json.dumps(self.result, indent=2))
        return 0

    def progress(self, total: int, desc: str) -> Progress:
        """A progress bar over ``total`` epochs (shown on a terminal unless --json / --no-progress)."""
        return Progress(total, desc, self.show_progress and total > 0)

    def fine_tune(self, model: nn.Module, *, epochs: int, lr: float, val: Split | None = None, **kwargs) -> list[
        EpochStats
    ]:
        """:func:`~.training.fit` on task B's training samples with the run's batch size
        and shuffling seed, so that LoRA, full fine-tuning and every rank of the
        comparison see the same batches. ``kwargs`` go to ``fit``."""
        return fit(
            model,
            self.b_train,
            val,
            epochs=epochs,
            lr=lr,
            batch_size=self.args.batch_size,
            seed=self.seed + FINETUNE_SEED_OFFSET,
            **kwargs,
        )
