"""Sections 1-3: the configuration, the base network pretrained on task A, task B."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from .. import count_parameters, get_backend
from .data import MLP, label, layers, low_rank_change, teacher_a
from .output import epochs_text, pct, shape
from .settings import (
    DELTA_RANK, HIDDEN, IN_FEATURES, KEEP_FRACTION, LORA_LR, LORAPLUS_RATIO, MULTI_TASKS, NF4, OUT_FEATURES, PRETRAIN_BATCH,
    PRETRAIN_LR, PRETRAIN_SAMPLES, PRETRAIN_SEED_OFFSET, PRETRAIN_TEST_SAMPLES, TRAIN_SAMPLES, VAL_SAMPLES, VERA_RANK,
)
from .training import accuracy, evaluate, fit
from .variants import adalora_scaling, optimizer_name

if TYPE_CHECKING:
    from .walkthrough import Walkthrough


def configuration(w: Walkthrough) -> None:
    """Section 1: every setting of the run, as a table (and the JSON's ``config``)."""
    args, out, variant = w.args, w.out, w.variant
    name = variant.name
    vera, adalora = name == "vera", name == "adalora"
    threads = f"  ({args.threads} CPU thread{'s' if args.threads > 1 else ''})" if w.device.type == "cpu" else ""
    w.result["config"] = {
        "input_size": IN_FEATURES,
        "hidden_size": HIDDEN,
        "output_size": OUT_FEATURES,
        "rank": args.rank,
        "alpha": args.alpha,
        "scaling": adalora_scaling(w.adalora_config) if adalora else args.alpha / args.rank,
        "learning_rate": args.lr,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "seed": w.seed,
        "device": str(w.device),
        "threads": args.threads,
        "backend_requested": get_backend(),
        "backend": w.backend,
        "variant": name,
        "optimizer": optimizer_name(name),
        "loraplus_ratio": LORAPLUS_RATIO if name == "loraplus" else None,
        "use_dora": variant.dora,
        "init": name if variant.rewrites_base or vera or adalora else "default",
        "quantize": NF4["quant_type"] if variant.nf4 else None,
        "rank_default_note": (
            f"VeRA rank {VERA_RANK} by default (PEFT's default; VeRA's rank may exceed the layer sizes)"
            if vera
            else None
        ),
        "torch": torch.__version__,
    }
    out.section(1, "Configuration")
    rows = [("input / hidden / output size", f"{IN_FEATURES} / {HIDDEN} / {OUT_FEATURES}")]
    if vera:
        default = "  (PEFT's default; VeRA's rank may exceed the layer sizes)" if args.rank == VERA_RANK else ""
        rows += [
            ("VeRA rank r", f"{args.rank}{default}"),
            ("VeRA alpha", "not used (VeRA has no scaling; lambda_d starts at 0.1, lambda_b at 0)"),
        ]
    elif adalora:
        c = w.adalora_config
        rows += [
            ("AdaLoRA init_r -> target_r", f"{c.init_r} -> {c.target_r} per layer  "
             f"(budget {3 * c.init_r} -> {3 * c.target_r} triplets, LoRA r={c.target_r}'s)"),
            ("AdaLoRA alpha", f"{args.alpha:.1f}  (scaling alpha / init_r = {adalora_scaling(c):.4g}, as PEFT)"),
            ("AdaLoRA schedule", f"total_step {c.total_step}, tinit {c.tinit}, tfinal {c.tfinal}, deltaT {c.deltaT}"),
            ("AdaLoRA importance / penalty", f"beta1 {c.beta1:g}, beta2 {c.beta2:g}, "
             f"orth_reg_weight {c.orth_reg_weight:g}"),
        ]
    else:
        rows += [
            (f"{w.label} rank r", str(args.rank)),
            (f"{w.label} alpha", f"{args.alpha:.1f}  (scaling alpha / r = {args.alpha / args.rank:g})"),
        ]
    if name == "loraplus":
        rows += [
            ("learning rate", f"{args.lr:g} (lora_A; lora_B: {args.lr * LORAPLUS_RATIO:g})"),
            ("optimizer", f"LoRA+: create_loraplus_optimizer(model, Adam, lr, ratio={LORAPLUS_RATIO:g})"),
            ("", "(instead of Adam on the list of adapter parameters)"),
        ]
    elif vera and not args.lr_given:
        rows.append(("learning rate (Adam)", f"{args.lr:g}  (the demo's VeRA default; LoRA's is {LORA_LR:g})"))
    else:
        rows.append(("learning rate (Adam)", f"{args.lr:g}"))
    rows += [
        ("epochs x batch size", f"{args.epochs} x {args.batch_size}"),
        ("seed", str(w.seed)),
        ("device", str(w.device) + threads),
        ("backend", f"{w.backend}  (requested: {get_backend()})"),
        ("variant", variant.description),
    ]
    if name == "multi":
        rows.append(("tasks", f"{MULTI_TASKS}, one adapter each, on one frozen base (sections 3-7)"))
        w.result["config"]["tasks"] = MULTI_TASKS
    out.fields(rows, width=30)


def base_network(w: Walkthrough) -> None:
    """Section 2: task A, the base MLP and its pretraining."""
    args, out = w.args, w.out
    out.section(2, "Base network, pretrained on task A")
    w.gen = torch.Generator().manual_seed(w.seed)
    task_a = label(teacher_a(w.gen), PRETRAIN_SAMPLES + PRETRAIN_TEST_SAMPLES, w.gen)
    a_train, w.a_test = task_a.split(PRETRAIN_SAMPLES, w.device)
    torch.manual_seed(w.seed + PRETRAIN_SEED_OFFSET)
    base = w.base = MLP().to(w.device)
    w.base_params = count_parameters(base)[1]
    layer_params = {n: count_parameters(layer)[1] for n, layer in layers(base).items()}
    out("  Task A: 10 classes, labelled by a random teacher network 128 -> 32 -> 10 (argmax).")
    out(f"  Inputs are N(0, I) draws; the {KEEP_FRACTION:.0%} the teacher is surest about are kept, so that")
    out("  labels are not coin flips on a decision boundary (task B is drawn the same way).")
    out()
    rows = [[n, shape(layer), f"{layer_params[n]:,}"] for n, layer in layers(base).items()]
    out.table(["layer", "shape", "parameters"], rows + [["total", "", f"{w.base_params:,}"]], "llr")
    start = time.perf_counter()
    fit(
        base,
        a_train,
        None,
        epochs=args.pretrain_epochs,
        lr=PRETRAIN_LR,
        batch_size=PRETRAIN_BATCH,
        seed=w.seed + PRETRAIN_SEED_OFFSET,
    )
    seconds = time.perf_counter() - start
    w.acc_a = accuracy(base, w.a_test)
    base.requires_grad_(False)
    out()
    out(
        f"  Pretraining: {PRETRAIN_SAMPLES:,} samples, {epochs_text(args.pretrain_epochs)}, "
        f"Adam lr {PRETRAIN_LR:g} ({seconds:.1f} s)"
    )
    out(f"  Accuracy on task A (held-out {PRETRAIN_TEST_SAMPLES:,} samples): {pct(w.acc_a)}")
    w.result["base"] = {
        "parameters": w.base_params,
        "layers": layer_params,
        "pretrain_samples": PRETRAIN_SAMPLES,
        "pretrain_epochs": args.pretrain_epochs,
        "pretrain_time_s": seconds,
        "task_a_accuracy": w.acc_a,
    }


def task_b(w: Walkthrough) -> None:
    """Section 3: task B, labelled by the base network plus a low-rank change."""
    out = w.out
    out.section(3, "Task B: a related task, a low-rank change away")
    teacher_b, deltas = low_rank_change(w.base, w.gen)
    w.b_train, w.b_val = label(teacher_b, TRAIN_SAMPLES + VAL_SAMPLES, w.gen).split(TRAIN_SAMPLES, w.device)
    base_loss, w.base_acc_b = evaluate(w.base, w.b_val)
    rows, info = [], {}
    for name, layer in layers(w.base).items():
        weight = layer.weight.detach().cpu()
        rank = int(torch.linalg.matrix_rank(deltas[name]).item())
        relative = (deltas[name].norm() / weight.norm()).item()
        rows.append([name, f"{weight.shape[0]} x {weight.shape[1]}", str(rank), f"{relative:.2f}"])
        info[name] = {"rank": rank, "relative_norm": relative}
    out("  Task B's labels come from the pretrained network itself with every weight matrix")
    out(f"  changed by a rank-{DELTA_RANK} update, W + U V^T (fc3 gets one more rank-1 term that keeps")
    out("  the classes balanced). The best weights for B are therefore the base weights plus")
    out("  a low-rank update: exactly the kind of change LoRA learns.")
    out()
    out.table(["layer", "weight", "rank of change", "||change|| / ||W||"], rows, "llrr")
    out()
    out(f"  Training samples:   {TRAIN_SAMPLES:,}")
    out(f"  Validation samples: {VAL_SAMPLES:,}")
    out(f"  Base network on task B, before adaptation: validation accuracy {pct(w.base_acc_b)}, loss {base_loss:.4f}")
    w.result["task_b"] = {
        "train_samples": TRAIN_SAMPLES,
        "val_samples": VAL_SAMPLES,
        "delta": info,
        "base_val_accuracy": w.base_acc_b,
        "base_train_accuracy": accuracy(w.base, w.b_train),
        "base_val_loss": base_loss,
    }
