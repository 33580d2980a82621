"""The base network and the two synthetic tasks.

Task A is labelled by a random teacher network; the base MLP is pretrained on
it. Task B is labelled by the pretrained MLP itself with a low-rank change added
to every weight matrix, so the best weights for B are the base weights plus a
low-rank update: what LoRA can express.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .settings import DELTA_RANK, DELTA_SCALE, HIDDEN, IN_FEATURES, KEEP_FRACTION, LAYERS, OUT_FEATURES, TEACHER_HIDDEN


class MLP(nn.Module):
    """The base network: ``fc1`` 128 -> 256, ReLU, ``fc2`` 256 -> 256, ReLU, ``fc3`` 256 -> 10."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(IN_FEATURES, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, HIDDEN)
        self.fc3 = nn.Linear(HIDDEN, OUT_FEATURES)

    def features(self, x: Tensor) -> Tensor:
        """The input of ``fc3``: [batch, 256]."""
        return F.relu(self.fc2(F.relu(self.fc1(x))))

    def forward(self, x: Tensor) -> Tensor:
        """x [batch, 128] -> logits [batch, 10]."""
        return self.fc3(self.features(x))


def layers(model: nn.Module) -> dict[str, nn.Module]:
    """``model``'s three layers by name (whatever they have become: adapters, merged)."""
    return {name: getattr(model, name) for name in LAYERS}


@dataclass
class Split:
    """Inputs [n, 128] and integer labels [n]."""

    x: Tensor
    y: Tensor

    def to(self, device: torch.device) -> Split:
        return Split(self.x.to(device), self.y.to(device))

    def split(self, n: int, device: torch.device) -> tuple[Split, Split]:
        """The first ``n`` samples and the rest, both moved to ``device``."""
        return Split(self.x[:n], self.y[:n]).to(device), Split(self.x[n:], self.y[n:]).to(device)


def teacher_a(gen: torch.Generator) -> nn.Module:
    """A random teacher 128 -> 32 -> 10 (He-normal weights), its output bias set so
    every class has mean logit 0 over N(0, I) inputs (otherwise a few classes win
    most inputs)."""
    teacher = nn.Sequential(nn.Linear(IN_FEATURES, TEACHER_HIDDEN), nn.ReLU(), nn.Linear(TEACHER_HIDDEN, OUT_FEATURES))
    with torch.no_grad():
        for layer in (teacher[0], teacher[2]):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * math.sqrt(2.0 / layer.in_features))
            layer.bias.zero_()
        teacher[2].bias.sub_(teacher(torch.randn(8192, IN_FEATURES, generator=gen)).mean(0))
    return teacher


@torch.no_grad()
def label(teacher: nn.Module, n: int, gen: torch.Generator) -> Split:
    """``n`` inputs labelled by ``teacher``'s argmax: the KEEP_FRACTION most
    confident of ``n / KEEP_FRACTION`` draws, in random order."""
    pool = torch.randn(math.ceil(n / KEEP_FRACTION), IN_FEATURES, generator=gen)
    logits = teacher(pool)
    top2 = logits.topk(2, dim=1).values
    keep = (top2[:, 0] - top2[:, 1]).argsort(descending=True)[:n]
    keep = keep[torch.randperm(n, generator=gen)]
    return Split(pool[keep], logits[keep].argmax(1))


@torch.no_grad()
def low_rank_change(base: MLP, gen: torch.Generator) -> tuple[MLP, dict[str, Tensor]]:
    """Task B's teacher: ``base`` with ``W += U V^T`` (rank DELTA_RANK) in every
    layer, plus a rank-1 term in fc3 that keeps each class's mean logit where it
    was (so B is not dominated by a few classes). Returns it and the changes."""
    base = copy.deepcopy(base).cpu()
    teacher = copy.deepcopy(base)
    deltas = {}
    for name, layer in layers(teacher).items():
        weight = layer.weight
        u = torch.randn(weight.shape[0], DELTA_RANK, generator=gen)
        v = torch.randn(DELTA_RANK, weight.shape[1], generator=gen)
        delta = u @ v
        delta *= DELTA_SCALE * weight.norm() / delta.norm()
        weight += delta
        deltas[name] = delta
    probe = torch.randn(8192, IN_FEATURES, generator=gen)
    mean_features = teacher.features(probe).mean(0)
    shift = base(probe).mean(0) - teacher(probe).mean(0)
    recentre = torch.outer(shift, mean_features) / mean_features.dot(mean_features)
    teacher.fc3.weight += recentre
    deltas["fc3"] = deltas["fc3"] + recentre
    return teacher, deltas
