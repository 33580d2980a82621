"""``--variant multi``: several tasks' adapters trained at once in mixed batches.

Sections 1-2 are the walkthrough's (configuration, the base pretrained on task
A); then:

3. tasks B1 ... Bn (MULTI_TASKS), each labelled by the pretrained network plus
   its own low-rank change (drawn as task B is);
4. one named LoRA adapter per task on one frozen copy of the base
   (:func:`fastlora.adapters.add_adapter`);
5. training them together: every step takes one batch of each task, and the
   concatenated batch runs through :class:`fastlora.adapters.MultiAdapterModel`
   with ``adapter_ids`` (each row through its task's adapter; the loss is the sum
   of the tasks' mean losses, so each adapter's gradient is its own task's), one
   Adam on every adapter (:func:`fastlora.adapters.trainable_adapters`); against
   training them one after the other on a copy (:func:`fastlora.adapters.set_adapter`,
   an Adam per adapter) with the same batches, steps and seed: wall and CPU time
   of each, the largest parameter difference;
6. validation accuracy per task: the base, the mixed run, the sequential run;
7. mixed-batch inference: every task's validation rows (and some base-only rows)
   shuffled into one batch, against each task's adapter alone.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .. import LoRAConfig
from ..adapters import MultiAdapterModel, add_adapter, set_adapter, trainable_adapters
from .data import label, layers, low_rank_change
from .output import epochs_text, pct
from .settings import ADAPTER_SEED_OFFSET, FINETUNE_SEED_OFFSET, MULTI_TASKS, TRAIN_SAMPLES, VAL_SAMPLES
from .training import evaluate

if TYPE_CHECKING:
    from .walkthrough import Walkthrough


def task_names() -> list[str]:
    return [f"B{t + 1}" for t in range(MULTI_TASKS)]


def tasks(w: Walkthrough) -> None:
    """Section 3: the tasks, each a low-rank change of the pretrained network."""
    out = w.out
    names = task_names()
    out.section(3, f"Tasks {names[0]}-{names[-1]}: {MULTI_TASKS} related tasks, each a low-rank change away")
    w.tasks = {}
    rows, info = [], {}
    for name in names:
        teacher, _ = low_rank_change(w.base, w.gen)
        train, val = label(teacher, TRAIN_SAMPLES + VAL_SAMPLES, w.gen).split(TRAIN_SAMPLES, w.device)
        base_acc = evaluate(w.base, val)[1]
        w.tasks[name] = (train, val)
        rows.append([name, f"{TRAIN_SAMPLES:,}", f"{VAL_SAMPLES:,}", pct(base_acc)])
        info[name] = {"train_samples": TRAIN_SAMPLES, "val_samples": VAL_SAMPLES, "base_val_accuracy": base_acc}
    out("  Each task's labels come from the pretrained network with its own low-rank change of")
    out("  every weight matrix (drawn as the single-task walkthrough draws task B): one adapter")
    out("  per task can learn it, and the tasks share the frozen base.")
    out()
    out.table(["task", "train", "validation", "base accuracy"], rows, "lrrr")
    w.result["tasks"] = info


def apply_adapters(w: Walkthrough) -> None:
    """Section 4: one named adapter per task on one frozen copy of the base."""
    args, out = w.args, w.out
    names = task_names()
    out.section(4, "One adapter per task on one frozen base")
    model = copy.deepcopy(w.base)
    torch.manual_seed(w.seed + ADAPTER_SEED_OFFSET)
    for name in names:
        add_adapter(model, name, LoRAConfig(r=args.rank, alpha=args.alpha))
    w.model = model
    per_adapter = sum(layer.adapter(names[0]).lora_A.numel() + layer.adapter(names[0]).lora_B.numel()
                      for layer in layers(model).values())  # fmt: skip
    out(f"  for name in {names}:")
    out(f"      add_adapter(model, name, LoRAConfig(r={args.rank}, alpha={args.alpha:g}))  # every nn.Linear")
    out()
    out(f"  Each adapter: {per_adapter:,} parameters; all {MULTI_TASKS}: {MULTI_TASKS * per_adapter:,} "
        f"(base network: {w.base_params:,}, frozen).")  # fmt: skip
    w.result["lora"] = {"adapters": names, "trainable_per_adapter": per_adapter, "rank": args.rank, "alpha": args.alpha}


def _batches(train, batch_size: int, seed: int) -> Callable[[], list[torch.Tensor]]:
    """A function giving each epoch's batches of one task's row indices (its own shuffling generator)."""
    gen = torch.Generator().manual_seed(seed)
    return lambda: list(torch.randperm(len(train.y), generator=gen).to(train.x.device).split(batch_size))


def train_together(w: Walkthrough) -> None:
    """Section 5: every adapter in mixed batches, against one after the other."""
    args, out = w.args, w.out
    names = task_names()
    out.section(5, "Training the adapters together (mixed batches) and one after the other")
    mixed, sequential = w.model, copy.deepcopy(w.model)
    seeds = {name: w.seed + FINETUNE_SEED_OFFSET + t for t, name in enumerate(names)}
    steps = args.epochs * w.steps_per_epoch

    # together: one batch of every task per step, each row through its task's adapter
    wrapped = MultiAdapterModel(mixed, names).train()
    optimizer = torch.optim.Adam(trainable_adapters(mixed, names), lr=args.lr)
    draws = {name: _batches(w.tasks[name][0], args.batch_size, seeds[name]) for name in names}
    wall, cpu = time.perf_counter(), time.thread_time()
    for _ in range(args.epochs):
        for batch in zip(*(draws[name]() for name in names)):
            parts = [(w.tasks[name][0], idx) for name, idx in zip(names, batch)]
            x = torch.cat([train.x[idx] for train, idx in parts])
            ids = torch.cat([torch.full((len(idx),), t, dtype=torch.int64) for t, (_, idx) in enumerate(parts)])
            logits = wrapped(x, adapter_ids=ids)
            loss, start = 0.0, 0
            for train, idx in parts:  # the sum of the tasks' mean losses: each adapter gets its task's gradient
                loss = loss + F.cross_entropy(logits[start : start + len(idx)], train.y[idx])
                start += len(idx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    together = (time.perf_counter() - wall, time.thread_time() - cpu)

    # one after the other: each adapter alone on its task, the same batches
    wall, cpu = time.perf_counter(), time.thread_time()
    for name in names:
        set_adapter(sequential, name)
        sequential.train()
        train = w.tasks[name][0]
        optimizer = torch.optim.Adam(trainable_adapters(sequential, [name]), lr=args.lr)
        draw = _batches(train, args.batch_size, seeds[name])
        for _ in range(args.epochs):
            for idx in draw():
                loss = F.cross_entropy(sequential(train.x[idx]), train.y[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    one_by_one = (time.perf_counter() - wall, time.thread_time() - cpu)
    w.sequential = sequential

    diff = max(
        (p - q).abs().max().item()
        for (n, p), (_, q) in zip(mixed.named_parameters(), sequential.named_parameters())
        if "lora_" in n
    )
    out(f"  {epochs_text(args.epochs)} x {w.steps_per_epoch} steps; Adam lr {args.lr:g}; batch {args.batch_size} per task.")
    out(f"  Together:   wrapped = MultiAdapterModel(model, {names})")
    out(f"              Adam(trainable_adapters(model, names)); each step one batch of every task,")
    out(f"              wrapped(x, adapter_ids=ids): {MULTI_TASKS * args.batch_size} rows, each through its task's adapter")
    out("  One by one: set_adapter(model, name) and an Adam per adapter, the same batches")
    out()
    out.table(
        ["run", "steps", "wall time", "CPU time"],
        [
            ["together (mixed batches)", f"{steps:,}", f"{together[0]:.2f} s", f"{together[1]:.2f} s"],
            ["one after the other", f"{MULTI_TASKS * steps:,}", f"{one_by_one[0]:.2f} s", f"{one_by_one[1]:.2f} s"],
        ],
        "lrrr",
    )
    out()
    out(f"  Largest difference between the two runs' adapter parameters: {diff:.1e}")
    out("  (each adapter gets its own task's gradient in both runs; 0 means bit for bit the same, any")
    out("  other value is float32 rounding of a different summation order)")
    w.result["multi_training"] = {
        "epochs": args.epochs,
        "steps_together": steps,
        "steps_one_by_one": MULTI_TASKS * steps,
        "together_wall_s": together[0],
        "together_cpu_s": together[1],
        "one_by_one_wall_s": one_by_one[0],
        "one_by_one_cpu_s": one_by_one[1],
        "max_param_diff": diff,
    }


def accuracy_per_task(w: Walkthrough) -> None:
    """Section 6: each task's validation accuracy: base, together, one by one."""
    out = w.out
    out.section(6, "Validation accuracy per task")
    wrapped = MultiAdapterModel(w.model, task_names())
    rows, info = [], {}
    for t, name in enumerate(task_names()):
        val = w.tasks[name][1]
        ids = torch.full((len(val.y),), t, dtype=torch.int64)
        with torch.no_grad():
            together = (wrapped.eval()(val.x, adapter_ids=ids).argmax(1) == val.y).float().mean().item()
        set_adapter(w.sequential, name)
        one_by_one = evaluate(w.sequential, val)[1]
        base = w.result["tasks"][name]["base_val_accuracy"]
        rows.append([name, pct(base), pct(together), pct(one_by_one)])
        info[name] = {"base": base, "together": together, "one_by_one": one_by_one}
    out.table(["task", "base", "together", "one after the other"], rows, "lrrr")
    w.result["accuracy"] = info


def mixed_inference(w: Walkthrough) -> None:
    """Section 7: one shuffled batch of every task's validation rows plus base rows."""
    out = w.out
    names = task_names()
    out.section(7, "Mixed-batch inference")
    vals = [w.tasks[name][1] for name in names]
    n_base = VAL_SAMPLES // 4
    x = torch.cat([v.x for v in vals] + [vals[0].x[:n_base]])
    ids = torch.cat([torch.full((len(v.y),), t, dtype=torch.int64) for t, v in enumerate(vals)] +
                    [torch.full((n_base,), -1, dtype=torch.int64)])  # fmt: skip
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(w.seed))
    x, ids = x[order], ids[order]
    wrapped = MultiAdapterModel(w.model, names).eval()
    with torch.no_grad():
        logits = wrapped(x, adapter_ids=ids)
        alone = {"same": torch.empty_like(logits), "sequential": torch.empty_like(logits)}
        for model, key in ((w.model, "same"), (w.sequential, "sequential")):
            for t, name in enumerate(names):
                set_adapter(model, name)
                rows = (ids == t).nonzero().squeeze(1)
                alone[key][rows] = model.eval()(x[rows])
            rows = (ids == -1).nonzero().squeeze(1)
            alone[key][rows] = w.base(x[rows])
    same = (logits - alone["same"]).abs().max().item()
    sequential = (logits - alone["sequential"]).abs().max().item()
    agree = (logits.argmax(1) == alone["sequential"].argmax(1)).float().mean().item()
    out(f"  {len(ids)} rows: every task's {VAL_SAMPLES} validation rows and {n_base} rows for the base alone")
    out("  (id -1), shuffled; one call per layer: wrapped(x, adapter_ids=ids).")
    out("  Largest |logit difference| against each row run by its own adapter alone:")
    out(f"    the same adapters (set_adapter, row subsets):   {same:.1e}")
    out(f"    the one-after-the-other run's adapters:         {sequential:.1e}")
    out(f"  Predicted classes equal to the one-after-the-other run's: {pct(agree)}")
    w.result["mixed_inference"] = {
        "rows": len(ids),
        "base_rows": n_base,
        "max_logit_diff_vs_same_adapters": same,
        "max_logit_diff_vs_one_by_one": sequential,
        "argmax_agreement_vs_one_by_one": agree,
    }


SECTIONS = (tasks, apply_adapters, train_together, accuracy_per_task, mixed_inference)
