"""The training loop every section uses: :func:`fit` and :func:`evaluate`."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import Split


@dataclass
class EpochStats:
    epoch: int
    train_loss: float
    val_loss: float
    grad_norm: float
    epoch_time_s: float


@torch.no_grad()
def evaluate(model: nn.Module, split: Split) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on ``split``, in eval mode."""
    was_training = model.training
    model.eval()
    logits = model(split.x)
    model.train(was_training)
    correct = int((logits.argmax(1) == split.y).sum().item())
    return F.cross_entropy(logits, split.y).item(), correct / len(split.y)


def accuracy(model: nn.Module, split: Split) -> float:
    """``model``'s accuracy on ``split``, in eval mode."""
    return evaluate(model, split)[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fit(
    model: nn.Module,
    train: Split,
    val: Split | None,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    on_epoch: Callable[[EpochStats], None] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    regularizer: Callable[[], Tensor] | None = None,
    after_step: Callable[[int], None] | None = None,
) -> list[EpochStats]:
    """Adam on the trainable parameters (or ``optimizer``, built on them by the
    caller), shuffled mini-batches, ``epochs`` passes.

    ``regularizer()`` is added to each step's loss (AdaLoRA's orthogonality
    penalty); ``after_step(step)`` runs after each ``optimizer.step()``, before the
    next ``zero_grad``, with the 0-based global step (AdaLoRA's
    ``update_and_allocate``, where PEFT's docs call it).

    After every epoch the losses are measured on the whole training and
    validation sets (eval mode); ``grad_norm`` is the epoch's mean over steps of
    the L2 norm of all trainable gradients; ``epoch_time_s`` times the training
    steps only."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer if optimizer is not None else torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    device = train.x.device
    history = []
    step = 0
    for epoch in range(1, epochs + 1):
        model.train()
        _sync(device)
        start = time.perf_counter()
        norms = []
        for idx in torch.randperm(len(train.y), generator=gen).to(device).split(batch_size):
            loss = F.cross_entropy(model(train.x[idx]), train.y[idx])
            if regularizer is not None:
                loss = loss + regularizer()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
            opt.step()
            if after_step is not None:
                after_step(step)
            step += 1
        _sync(device)
        seconds = time.perf_counter() - start
        train_loss = evaluate(model, train)[0]
        val_loss = evaluate(model, val)[0] if val is not None else float("nan")
        stats = EpochStats(epoch, train_loss, val_loss, torch.stack(norms).mean().item(), seconds)
        history.append(stats)
        if on_epoch is not None:
            on_epoch(stats)
    return history
