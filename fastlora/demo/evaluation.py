"""Sections 6-8: the loss curve, accuracy against the base and full fine-tuning, the merge."""

from __future__ import annotations

import copy
import sys
from typing import TYPE_CHECKING

import torch

from .. import count_parameters
from .data import layers
from .output import ascii_curve, epochs_text, pct, shape, write_plot
from .training import accuracy
from .variants import adapt, merge

if TYPE_CHECKING:
    from .walkthrough import Walkthrough


def loss_curve(w: Walkthrough) -> None:
    """Section 6: the training and validation losses as an ASCII plot (and ``--plot``)."""
    args, out = w.args, w.out
    out.section(6, "Loss curve")
    train = [w.initial_train_loss] + [h.train_loss for h in w.history]
    val = [w.initial_val_loss] + [h.val_loss for h in w.history]
    for line in ascii_curve({"train": ("*", train), "validation": ("o", val)}):
        out("  " + line)
    w.result["plot"] = None
    out()
    if not args.plot:
        out("  (--plot FILE.png writes these curves with matplotlib)")
        return
    message = write_plot(args.plot, list(range(len(train))), train, val, f"{w.label} r={args.rank} on task B")
    if message is None:
        out(f"  Wrote {args.plot}")
        w.result["plot"] = args.plot
    elif args.json:
        print(f"fastlora demo: {message}", file=sys.stderr)
    else:
        out(f"  {message}")


def compare_accuracy(w: Walkthrough) -> None:
    """Section 7: accuracy on task B (and what is left of task A) of the base network,
    the adapted one and a full fine-tuning run with the same budget of epochs."""
    args, out, label, variant = w.args, w.out, w.label, w.variant
    out.section(7, "Validation accuracy on task B")
    lora_acc = accuracy(w.model, w.b_val)
    lora_acc_a = accuracy(w.model, w.a_test)
    full = copy.deepcopy(w.base).requires_grad_(True)
    full_params = count_parameters(full)[0]
    with w.progress(args.epochs, "  full fine-tuning") as progress:
        history = w.fine_tune(
            full, epochs=args.epochs, lr=args.lr, val=w.b_val, on_epoch=lambda stats: progress.update()
        )
    full_acc, full_acc_a = accuracy(full, w.b_val), accuracy(full, w.a_test)
    full_time = sum(h.epoch_time_s for h in history)
    out("  Full fine-tuning: a copy of the base network with every parameter trainable, the")
    out(f"  same epochs, optimiser, learning rate and batches ({full_time:.1f} s of training).")
    out()
    rows = [["base network (no adaptation)", "0", pct(w.base_acc_b), pct(w.acc_a)]]
    nf4_acc_a = None
    if variant.nf4:
        nf4_acc_a = accuracy(adapt(copy.deepcopy(w.base), "qlora", 1, 1.0), w.a_test)
        rows.append(["NF4 base (no adaptation)", "0", pct(w.initial_val_acc), pct(nf4_acc_a)])
    rank = f"{w.adalora_config.init_r}->{args.rank}" if w.adalora_config is not None else str(args.rank)
    epochs = epochs_text(args.epochs)
    rows.append([f"{label} r={rank}, {epochs}", f"{w.lora_params:,}", pct(lora_acc), pct(lora_acc_a)])
    rows.append([f"full fine-tuning, {epochs}", f"{full_params:,}", pct(full_acc), pct(full_acc_a)])
    out.table(["model", "trainable params", "task B val accuracy", "task A accuracy"], rows, "lrrr")
    out()
    out(
        f"  {label} reaches {pct(lora_acc)} on task B training {w.lora_params / full_params:.1%} of the "
        "parameters full fine-tuning trains."
    )
    if variant.rewrites_base:
        out(f"  The residual weights under the adapter are untouched: residual + the initial {label} adapter")
        out("  gives back the task A network, whereas full fine-tuning has overwritten it.")
    else:
        out("  The base weights under the adapter are untouched: removing the adapter gives back")
        out(f"  the {'NF4 ' if variant.nf4 else ''}task A network, whereas full fine-tuning has overwritten it.")
    if w.adalora_config is not None:
        w.result["adalora"]["val_accuracy"] = lora_acc
    w.result["accuracy"] = {
        "base_val_accuracy": w.base_acc_b,
        "adapted_before_training_val_accuracy": w.initial_val_acc,
        "lora_val_accuracy": lora_acc,
        "lora_trainable": w.lora_params,
        "full_finetune_val_accuracy": full_acc,
        "full_finetune_trainable": full_params,
        "full_finetune_time_s": full_time,
        "full_finetune_final_val_loss": history[-1].val_loss,
        "task_a_accuracy": {
            "base": w.acc_a,
            "nf4_base": nf4_acc_a,
            "lora": lora_acc_a,
            "full_finetune": full_acc_a,
        },
    }


def merging(w: Walkthrough) -> None:
    """Section 8: merge the adapters into plain layers and measure what changes."""
    out, model = w.out, w.model
    out.section(8, f"Merging the {w.label} adapters")
    model.eval()
    with torch.no_grad():
        before = model(w.b_val.x)
        merge(model)
        after = model(w.b_val.x)
    max_diff = (after - before).abs().max().item()
    max_out = before.abs().max().item()
    params = count_parameters(model)[1]
    acc = accuracy(model, w.b_val)
    out("  " + w.variant.merge_formula)
    out()
    rows = [[n, type(layer).__name__, shape(layer)] for n, layer in layers(model).items()]
    out.table(["layer", "after merge", "shape"], rows, "lll")
    out()
    rounding = torch.finfo(before.dtype).eps * max_out
    same = "same" if params == w.base_params else "DIFFERENT"
    out(f"  Largest |merged - unmerged| output on the validation set: {max_diff:.2e}")
    out(f"  (outputs reach {max_out:.1f}; one float32 rounding step at that size is {rounding:.1e})")
    out(f"  Parameters after merging: {params:,} (base network: {w.base_params:,}, {same})")
    out(f"  Validation accuracy after merging: {pct(acc)}, with no adapter left to run at inference")
    if w.adalora_config is not None:
        w.result["adalora"]["merge_max_abs_diff"] = max_diff
    w.result["merge"] = {
        "max_abs_diff": max_diff,
        "max_abs_output": max_out,
        "parameters": params,
        "same_as_base": params == w.base_params,
        "val_accuracy": acc,
    }
