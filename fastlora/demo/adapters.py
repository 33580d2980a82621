"""Sections 4-5: applying the adapters to a copy of the base network, training them."""

from __future__ import annotations

import copy
from dataclasses import asdict
from typing import TYPE_CHECKING

import torch
from torch import nn

from .. import count_parameters
from .budget import RankBudget
from .data import layers
from .output import epochs_text, format_table, pct, shape
from .settings import ADAPTER_SEED_OFFSET, LAYERS, NF4
from .training import EpochStats, evaluate
from .variants import ADAPTER_PARAMS, adalora_scaling, adapt, make_optimizer, trainable, weight_nbytes

if TYPE_CHECKING:
    from .walkthrough import Walkthrough


def _describe_layer(w: Walkthrough, layer: nn.Module) -> tuple[str, dict]:
    """A layer's adapter as section 4's table shows it, and its shapes for the JSON."""
    name = w.variant.name
    if name == "vera":
        d, b = layer.vera_lambda_d.numel(), layer.vera_lambda_b.numel()
        return f"lambda_d {d} + lambda_b {b}", {"lambda_d": d, "lambda_b": b}
    if name == "adalora":
        r = layer.r
        info = {"init_r": r}
        info.update((key, getattr(layer, key).numel()) for key in ("lora_A", "lora_E", "lora_B"))
        return f"A {r}x{layer.in_features} + E {r} + B {layer.out_features}x{r}", info
    r = w.args.rank
    text = f"A {r}x{layer.in_features} + B {layer.out_features}x{r}"
    info = {"lora_A": layer.lora_A.numel(), "lora_B": layer.lora_B.numel()}
    if w.variant.dora:
        text += f" + m {layer.lora_magnitude.numel()}"
        info["magnitude"] = layer.lora_magnitude.numel()
    return text, info


def _show_apply_call(w: Walkthrough, model: nn.Module) -> None:
    """The call that built the adapters, and what it made."""
    args, out, name = w.args, w.out, w.variant.name
    every_linear = "  # target_modules=None: every nn.Linear"
    if name == "qlora":
        nf4 = ", ".join(f"{key}={value!r}" for key, value in NF4.items())
        out(f"  QLoRALinear.from_linear(layer, r={args.rank}, alpha={args.alpha:g}, {nf4})")
    elif name == "vera":
        projection = model.fc1.vera_projection
        out(f"  apply_vera(model, VeRAConfig(r={args.rank})){every_linear}")
        out(
            f"  One frozen random projection pair shared by all layers: vera_A {tuple(projection.vera_A.shape)}, "
            f"vera_B {tuple(projection.vera_B.shape)}"
        )
        out("  (buffers, not parameters), sliced per layer. Each layer trains lambda_d [r] (init 0.1) and")
        out("  lambda_b [out] (init 0): W + diag(lambda_b) B_s diag(lambda_d) A_s.")
    elif name == "adalora":
        c = w.adalora_config
        out(
            f"  apply_adalora(model, AdaLoRAConfig(init_r={c.init_r}, target_r={c.target_r}, tinit={c.tinit}, "
            f"tfinal={c.tfinal},"
        )
        out(f"      deltaT={c.deltaT}, total_step={c.total_step}, alpha={c.alpha:g})){every_linear}")
        out("  allocator = RankAllocator(model, config)  # fastlora.AdaLoRARankAllocator")
        out("  Each layer holds an SVD-form update P Lambda Q: B [out, r] (P), E [r] (Lambda, init 0) and")
        out(f"  A [r, in] (Q), r = init_r = {c.init_r}; y = W x + (alpha / init_r) B (E * A) x. The allocator")
        out("  zeroes the E entries of the least important triplets during training (section 5).")
    else:
        keywords = w.variant.config_keywords
        out(f"  apply_lora(model, LoRAConfig(r={args.rank}, alpha={args.alpha:g}{keywords})){every_linear}")
        for line in w.variant.notes:
            out("  " + line)


def apply_adapters(w: Walkthrough) -> None:
    """Section 4: the adapters on a copy of the base, their parameter counts and sizes."""
    args, out, label, variant = w.args, w.out, w.label, w.variant
    out.section(4, f"Applying {label} adapters")
    model = w.model = copy.deepcopy(w.base)
    weight_bytes = sum(layer.weight.numel() * layer.weight.element_size() for layer in layers(model).values())
    torch.manual_seed(w.seed + ADAPTER_SEED_OFFSET)
    adapt(model, args.variant, args.rank, args.alpha, adalora=w.adalora_config)
    rows, infos = [], []
    for name, layer in layers(model).items():
        n = trainable(layer)
        adapter, shapes = _describe_layer(w, layer)
        infos.append(
            {"name": name, "in_features": layer.in_features, "out_features": layer.out_features, "trainable": n}
            | shapes
        )
        rows.append([name, type(layer).__name__, shape(layer), adapter, f"{n:,}"])
    trainable_params, total = count_parameters(model)
    w.lora_params = sum(info["trainable"] for info in infos)
    only_adapters = all(n.rsplit(".", 1)[-1] in ADAPTER_PARAMS for n, p in model.named_parameters() if p.requires_grad)
    base_frozen = only_adapters and trainable_params == w.lora_params
    reduction = 1 - w.lora_params / w.base_params
    compression = w.base_params / w.lora_params
    _show_apply_call(w, model)
    out()
    out.table(
        ["layer", "module", "shape", "adapter", "trainable"],
        rows + [["total", "", "", "", f"{w.lora_params:,}"]],
        "lllrr",
    )
    out()
    out(f"  Total {label} parameters:  {w.lora_params:,}  (base network: {w.base_params:,})")
    if variant.dora:
        magnitudes = sum(info["magnitude"] for info in infos)
        out(
            f"  of which magnitudes m:   {magnitudes:,}  (one per output feature; "
            f"LoRA's A and B: {w.lora_params - magnitudes:,})"
        )
    out(f"  Parameter reduction:     {pct(reduction)}")
    out(f"  Compression ratio:       {compression:.1f}x  (base parameters / {label} parameters)")
    out(
        f"  Base frozen:             {'yes' if base_frozen else 'NO'}  "
        f"(count_parameters: {trainable_params:,} trainable of {total:,})"
    )
    # NOTE: the adapted model's output before training against the base
    # network's: 0 for LoRA / VeRA (B = 0, lambda_b = 0), rounding for DoRA and
    # for PiSSA / OLoRA (whose base weights are now the residual), NF4 error for QLoRA.
    model.eval()
    with torch.no_grad():
        w.init_diff = (model(w.b_val.x) - w.base(w.b_val.x)).abs().max().item()
    model.train()
    if variant.rewrites_base:
        how = "top-r singular directions (SVD)" if variant.name == "pissa" else "first r columns of a QR factorisation"
        out()
        out(f"  {label} initialises A and B from each base weight's {how} and replaces")
        out("  the base weight by the residual W - (alpha / r) B A: the base weights are no longer the")
        out("  pretrained ones, but the adapted model starts out computing the base network:")
        out(f"  largest |adapted - base| output before training: {w.init_diff:.2e} (rounding)")
    w.result["lora"] = {
        "variant": args.variant,
        "layers": infos,
        "trainable": w.lora_params,
        "count_parameters": {"trainable": trainable_params, "total": total},
        "reduction_pct": 100 * reduction,
        "compression": compression,
        "base_frozen": base_frozen,
        "initial_output_max_abs_diff_vs_base": w.init_diff,
        "base_replaced_by_residual": variant.rewrites_base,
    }
    if w.adalora_config is not None:
        c = w.adalora_config
        w.result["adalora"] = {
            "init_r": c.init_r,
            "target_r": c.target_r,
            "tinit": c.tinit,
            "tfinal": c.tfinal,
            "deltaT": c.deltaT,
            "total_step": c.total_step,
            "steps_per_epoch": w.steps_per_epoch,
            "beta1": c.beta1,
            "beta2": c.beta2,
            "orth_reg_weight": c.orth_reg_weight,
            "alpha": c.alpha,
            "scaling": adalora_scaling(c),
            "initial_budget": c.init_r * len(LAYERS),
            "target_budget": c.target_r * len(LAYERS),
        }
    if variant.name == "vera":
        w.result["vera"] = {
            "r": args.rank,
            "vera_A_shape": list(model.fc1.vera_projection.vera_A.shape),
            "vera_B_shape": list(model.fc1.vera_projection.vera_B.shape),
            "d_initial": model.fc1.d_initial,
        }
    if variant.nf4:
        quantized_bytes = sum(weight_nbytes(layer) for layer in layers(model).values())
        out(
            f"  Base weight storage:     {weight_bytes:,} bytes fp32 -> {quantized_bytes:,} bytes NF4 "
            f"({weight_bytes / quantized_bytes:.1f}x smaller)"
        )
        w.result["qlora"] = {
            **NF4,
            "base_weight_bytes_before": weight_bytes,
            "base_weight_bytes_after": quantized_bytes,
        }


def train_adapters(w: Walkthrough) -> None:
    """Section 5: train the adapters on task B, a table row every tenth epoch, a summary."""
    args, out, label, model, variant = w.args, w.out, w.label, w.model, w.variant
    out.section(5, f"Training the {label} adapters on task B")
    # The frozen weights as training starts: the base's (the residual's for PiSSA / OLoRA).
    frozen = {} if variant.nf4 else {n: layer.weight.detach().clone() for n, layer in layers(model).items()}
    w.initial_train_loss = evaluate(model, w.b_train)[0]
    w.initial_val_loss, w.initial_val_acc = evaluate(model, w.b_val)
    every = max(1, args.epochs // 10)
    rows_every = "every epoch" if every == 1 else f"every {every} epochs"
    optimizer = "LoRA+ Adam" if variant.name == "loraplus" else "Adam"
    out(
        f"  {epochs_text(args.epochs)} of {w.steps_per_epoch} {optimizer} steps (batch {args.batch_size}); "
        f"a row {rows_every}."
    )
    out("  Losses are measured on the whole training / validation set after each epoch; the")
    out("  gradient norm is the epoch's mean over its steps; the time covers the training steps.")
    budget = None if w.adalora_config is None else RankBudget(model, w.adalora_config, w.steps_per_epoch)
    if budget is not None:
        budget.explain(out)
    out()
    headers = ["epoch", "train loss", "val loss", f"{label} grad norm", "epoch time"]
    template = ["00000", "0.0000", "0.0000", "0.000000", "0000.0 ms"]
    if budget is not None:
        headers.append("active ranks")
        template.append("00/00/00 (000)")
    lines = format_table(headers, [template], "r" * len(headers))
    widths = [len(cell) for cell in lines[0].split(" | ")]
    out("  " + lines[0])
    out("  " + lines[1])

    with w.progress(args.epochs, f"  {label} training") as progress:

        def report(stats: EpochStats) -> None:
            progress.update(f"loss {stats.train_loss:.4f}")
            logged = stats.epoch == 1 or stats.epoch % every == 0 or stats.epoch == args.epochs
            cells = [
                str(stats.epoch),
                f"{stats.train_loss:.4f}",
                f"{stats.val_loss:.4f}",
                f"{stats.grad_norm:.6f}",
                f"{1000 * stats.epoch_time_s:.1f} ms",
            ]
            if budget is not None:
                cells.append(budget.record(stats.epoch, logged))
            if not out.quiet and logged:
                progress.write("  " + " | ".join(cell.rjust(width) for cell, width in zip(cells, widths)))

        history = w.history = w.fine_tune(
            model,
            epochs=args.epochs,
            lr=args.lr,
            val=w.b_val,
            on_epoch=report,
            optimizer=make_optimizer(variant.name, model, args.lr),
            regularizer=None if budget is None else budget.regularizer,
            after_step=None if budget is None else budget.after_step,
        )
    total_time = sum(h.epoch_time_s for h in history)
    final = history[-1].train_loss
    best = min(history, key=lambda h: h.val_loss)
    reduction = 1 - final / w.initial_train_loss
    unchanged = None if variant.nf4 else all(torch.equal(layer.weight, frozen[n]) for n, layer in layers(model).items())
    out()
    out("  Summary")
    summary = [
        ("initial loss (before training)", f"{w.initial_train_loss:.4f}"),
        ("final loss", f"{final:.4f}"),
        ("loss reduction", f"{100 * reduction:.2f} %"),
        ("best validation loss", f"{best.val_loss:.4f}  (epoch {best.epoch})"),
        ("total training time", f"{total_time:.2f} s"),
        ("average epoch time", f"{1000 * total_time / len(history):.1f} ms"),
    ]
    if unchanged is not None:
        what = "residual base weights unchanged" if variant.rewrites_base else "base weights unchanged"
        summary.append((what, "yes" if unchanged else "NO"))
    if variant.rewrites_base:
        summary.append(("initial output vs base network", f"max |diff| {w.init_diff:.2e}"))
    out.fields(summary, width=32, indent="    ")
    if budget is not None:
        w.result["adalora"].update(budget.report(out))
    w.result["training"] = {
        "history": [asdict(h) for h in history],
        "initial_train_loss": w.initial_train_loss,
        "initial_val_loss": w.initial_val_loss,
        "final_train_loss": final,
        "final_val_loss": history[-1].val_loss,
        "loss_reduction_pct": 100 * reduction,
        "best_val_loss": best.val_loss,
        "best_epoch": best.epoch,
        "total_time_s": total_time,
        "avg_epoch_time_s": total_time / len(history),
        "base_weights_unchanged": unchanged,
    }
