"""``fastlora demo``: a LoRA fine-tuning walkthrough on a small MLP.

The walkthrough, in nine printed sections:

1. configuration;
2. a base network 128 -> 256 -> 256 -> 10 (101,386 parameters) pretrained on
   task A, whose labels come from a random teacher network;
3. task B, whose labels come from the pretrained network with a rank-2 change
   added to each weight matrix (rank 3 in the last), so the best weights for B
   are the base weights plus a low-rank update: what LoRA can express;
4. ``apply_lora`` on the three layers, with per-layer parameter counts;
5. training the adapters (Adam, mini-batches), a table every tenth epoch and
   a summary;
6. an ASCII loss curve (and ``--plot FILE.png`` with matplotlib);
7. validation accuracy: base model, LoRA, full fine-tuning;
8. ``merge_lora`` and the largest output difference it causes;
9. a rank comparison (1 ... 64): parameter counts and the accuracy each rank
   reaches with a short training run.

``--variant`` picks the adapter: ``lora`` (the default), ``qlora`` (the frozen
base weights in NF4, :class:`fastlora.QLoRALinear`, with their size),
``dora`` / ``qdora`` (``LoRAConfig(use_dora=True)``: a trainable magnitude
vector per layer; ``qdora`` on NF4 weights), ``vera`` (:func:`fastlora.apply_vera`:
shared frozen random projections, two trainable vectors per layer; rank 256 by
default), ``loraplus`` (plain LoRA trained with
:func:`fastlora.create_loraplus_optimizer`, ``lora_B`` at 16x the learning rate),
``pissa`` / ``olora`` (``LoRAConfig(init=...)``: the adapters start from the
base weight's top singular directions / QR factors and the base weight is
replaced by the residual, so the adapted model starts as the base network up
to rounding) and ``adalora`` (:func:`fastlora.apply_adalora`: SVD-form adapters
``P Lambda Q`` that start at ``init_r = 1.5 x --rank`` triplets per layer, 12
by default, and that a :class:`fastlora.AdaLoRARankAllocator` prunes during
training down to ``--rank`` per layer on average; the orthogonality penalty is
added to the loss); ``multi`` (:mod:`~.multi`: three tasks' adapters on one frozen
base, trained together in mixed batches and one after the other; sections 3-7
are its own). The rank comparison uses the variant itself for lora, qlora,
dora and qdora, and plain LoRA for the others (it says so). ``--json``
prints one JSON object with every figure and nothing else. Everything is
seeded, so a run on CPU is reproducible for a given ``--seed`` (timings aside).
On CPU the demo runs torch on one thread (``--threads``): the matrices are
tiny, and more threads only add synchronisation.

The package, one module per part (the demo uses fastlora's public API only):

=================  ==========================================================
``__init__``       the command line: :func:`main`, :func:`build_parser`
``settings``       the fixed numbers: sizes, tasks, training defaults
``data``           the base MLP, task A's teacher, task B's low-rank change
``training``       :func:`~.training.fit` and :func:`~.training.evaluate`
``variants``       one record per ``--variant``; build, merge, optimizer
``budget``         AdaLoRA's rank budget during training
``output``         printing: sections, tables, progress bar, loss curves
``walkthrough``    :class:`~.walkthrough.Walkthrough`: the sections in order
``tasks``          sections 1-3: configuration, task A and the base, task B
``adapters``       sections 4-5: applying and training the adapters
``evaluation``     sections 6-8: loss curve, accuracy, merge
``ranks``          section 9: rank comparison
``multi``          ``--variant multi``'s sections 3-7
=================  ==========================================================
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys

import torch

from .. import use_backend

# NOTE: the backend names and resolve_backend (the backend that a call on a given
# device will take) are not part of fastlora's public API yet; the demo reads them
# from fastlora._backend here and nowhere else.
from .._backend import BACKENDS, resolve_backend
from . import variants
from .settings import (
    ADALORA_INIT_FACTOR, BATCH_SIZE, HIDDEN, IN_FEATURES, LORA_LR, LORA_RANK, MULTI_EPOCHS, OUT_FEATURES, TRAIN_SAMPLES,
    VERA_LR, VERA_RANK,
)
from .variants import VARIANTS
from .walkthrough import Walkthrough

__all__ = ["build_parser", "main"]

PROG = "python -m fastlora demo"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The demo's options (``prog`` names the command in usage lines)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="LoRA fine-tuning walkthrough: pretrain a small MLP on task A, adapt it to task B with LoRA.",
    )
    parser.add_argument(
        "--rank",
        type=int,
        default=None,
        help=f"adapter rank r (default {LORA_RANK}; {VERA_RANK} for --variant vera; for --variant adalora the "
        f"target rank, starting from {ADALORA_INIT_FACTOR:g}x as many)",
    )
    parser.add_argument(
        "--alpha", type=float, default=8.0, help="LoRA alpha; scaling = alpha / r (default 8.0; unused by VeRA)"
    )
    parser.add_argument(
        "--epochs", type=int, default=None,
        help=f"LoRA and full fine-tuning epochs (default 100; {MULTI_EPOCHS} for --variant multi)",
    )  # fmt: skip
    parser.add_argument(
        "--lr",
        type=float,
        default=None,
        help=f"Adam learning rate for fine-tuning (default {LORA_LR:g}; {VERA_LR:g} for --variant vera)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for data, initialisation and shuffling (default 0)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--backend", choices=BACKENDS, default=None, help="fastlora backend (default: the current one, normally auto)"
    )
    parser.add_argument(
        "--variant",
        choices=tuple(VARIANTS),
        default="lora",
        help="adapter: lora; qlora (NF4 base); dora / qdora (magnitude vectors); vera (shared random "
        "projections); loraplus (LoRA+ optimizer); pissa / olora (SVD / QR init, residual base); adalora "
        "(adaptive rank budget); multi (several tasks' adapters trained together in mixed batches)",
    )
    parser.add_argument("--plot", metavar="FILE.png", default=None, help="write loss curves with matplotlib")
    parser.add_argument("--json", action="store_true", help="print one JSON object with every figure, nothing else")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--rank-epochs",
        type=int,
        default=30,
        help="epochs of each run in the rank comparison (default 30; 0 skips them)",
    )
    parser.add_argument("--pretrain-epochs", type=int, default=6, help="epochs of pretraining on task A (default 6)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch during the demo (default 1: the matrices are tiny)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=BATCH_SIZE, help=f"fine-tuning batch size (default {BATCH_SIZE})"
    )
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fill in the variant's defaults and reject what the walkthrough cannot run
    (``parser.error``: a usage message and exit status 2)."""
    variant = VARIANTS[args.variant]
    if args.rank is None:
        args.rank = variant.default_rank
    if args.epochs is None:
        args.epochs = variant.default_epochs
    args.lr_given = args.lr is not None
    if args.lr is None:
        args.lr = variant.default_lr
    for name, low in (
        ("rank", 1),
        ("epochs", 1),
        ("rank_epochs", 0),
        ("pretrain_epochs", 0),
        ("batch_size", 1),
        ("threads", 1),
    ):
        if getattr(args, name) < low:
            parser.error(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        parser.error(f"--lr must be a positive number, got {args.lr}")
    if not math.isfinite(args.alpha):
        parser.error(f"--alpha must be a finite number, got {args.alpha}")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    smallest = min(IN_FEATURES, HIDDEN, OUT_FEATURES)
    if variant.rewrites_base and args.rank > smallest:
        parser.error(
            f"--variant {args.variant} factorises each base weight: --rank must be <= {smallest} "
            f"(the smallest layer, fc3, is {HIDDEN} -> {OUT_FEATURES}), got {args.rank}"
        )
    steps_per_epoch = math.ceil(TRAIN_SAMPLES / args.batch_size)
    if args.variant == "adalora" and args.epochs * steps_per_epoch < 2:
        parser.error(
            "--variant adalora needs at least 2 training steps (epochs x ceil(1000 / batch size)) for its "
            f"rank schedule, got {args.epochs} x {steps_per_epoch}"
        )


def main(argv: list[str] | None = None, *, prog: str = PROG) -> int:
    """Run the walkthrough with command-line ``argv``; returns the process exit status
    (bad options exit through argparse with status 2)."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    _check_args(parser, args)

    def fail(message: str) -> int:
        print(f"fastlora demo: {message}", file=sys.stderr)
        return 2

    if VARIANTS[args.variant].nf4 and variants.qlora_class() is None:
        return fail("QLoRA is not available in this build (fastlora.QLoRALinear is missing); use --variant lora")
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:
        return fail(f"--device {args.device}: {exc}")
    # NOTE: use_backend is this thread's override: the caller's process-wide choice is untouched
    try:
        override = use_backend(args.backend) if args.backend is not None else contextlib.nullcontext()
        with override:
            backend = resolve_backend(device)
    except (RuntimeError, ValueError) as exc:
        return fail(str(exc))
    with override:
        # NOTE: the matrices here are at most 256 x 256 with 50-row batches; extra
        # threads only add synchronisation, which is slow on a busy machine.
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(args.threads)
        try:
            return Walkthrough(args, device, backend).run()
        finally:
            torch.set_num_threads(previous_threads)
