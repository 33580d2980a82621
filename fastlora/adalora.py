"""AdaLoRA (Adaptive Budget Allocation, Zhang et al. 2023,
https://openreview.net/forum?id=lq62uWRJjiY) on fastlora's fused LoRA op.

Each adapted layer holds an SVD-form update ``P Lambda Q``: ``lora_A`` [r, in]
(Q, the right singular vectors), ``lora_E`` [r, 1] (Lambda, the singular
values) and ``lora_B`` [out, r] (P, the left singular vectors), r = ``init_r``:

  ``y = x W^T + (D(x) (E * A)^T B^T) * scaling / (ranknum + 1e-5) + bias``

with D the dropout (training only), ``scaling = alpha`` (``init_r`` when
``alpha <= 0``) and ``ranknum = init_r``. This is a LoRA layer with
``lora_A = E * A`` (E broadcast over rows) and scale ``scaling / (ranknum + 1e-5)``,
so the forward and backward run on :func:`fastlora.lora_linear` (the Triton
kernels on GPU); autograd through the small product gives
``d A = E * d(E A)`` and ``d E = rowsum(d(E A) * A)``.

A :class:`RankAllocator` prunes triplets during training: after each
``loss.backward()`` (and ``optimizer.step()``), ``allocator.update_and_allocate(model, step)``
updates the importance of every adapter entry (an EMA of the sensitivity
``|p * grad|`` times an EMA of its uncertainty), and on PEFT's cubic budget
schedule zeroes the ``lora_E`` entries of the least important triplets so
that at most ``budget`` triplets stay (from ``init_r * n_layers`` after
``tinit`` warm-up steps down to ``target_r * n_layers`` at step
``total_step - tfinal``; the last ``tfinal`` steps keep that final pattern).
:func:`orthogonal_regularization` is the penalty PEFT adds to the loss to keep
``A`` and ``B`` near-orthonormal.

Semantics and names follow PEFT's ``peft.tuners.adalora`` (``AdaLoraConfig``,
``SVDLinear``, ``RankAllocator``, ``AdaLoraModel.update_and_allocate`` and its
``forward``'s regularizer) step for step. NOTE: PEFT's ``ranknum`` is fixed at
``init_r`` (it never follows the pruning: ``resize_modules_by_rank_pattern`` is
only used when loading), so the scale is ``alpha / (init_r + 1e-5)``, not
``alpha / r_active``; fastlora does the same so outputs equal PEFT's.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import lora_linear
from .modules import MergeableLinear
from .registry import adapter_layers, apply_adapter, merge_adapters, normalize_target_modules, register_adapter_kind, register_layer
from .validation import check_dropout, check_finite, check_rank, is_int

RANKNUM_EPS = 1e-5  # PEFT adds this to ranknum before dividing


def _check_layer_args(init_r, alpha, dropout) -> None:
    check_rank(init_r, "init_r (the initial AdaLoRA rank)")
    check_finite(alpha, "alpha")
    check_dropout(dropout)


class AdaLoRALinear(MergeableLinear):
    """``nn.Linear`` with a frozen base weight and an AdaLoRA update (see the module docstring).

    ``y = x W^T + (D(x) (lora_E * lora_A)^T lora_B^T) * scaling / (ranknum + 1e-5) + bias``.
    Trainable: ``lora_A`` [r, in], ``lora_E`` [r, 1], ``lora_B`` [out, r]
    (float32, or float64 on a float64 base, as PEFT keeps them). ``weight`` and
    ``bias`` are frozen. Pruned triplets are those whose ``lora_E`` entry the
    :class:`RankAllocator` zeroes; the shapes never change. A subclass of
    ``nn.Linear``, like :class:`fastlora.LoRALinear`.
    """

    is_adapter_layer = True  # apply_lora / apply_adalora never wrap it again

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        init_r: int = 12,
        alpha: float = 8.0,
        dropout: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        _check_layer_args(init_r, alpha, dropout)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self._setup_adalora(init_r, alpha, dropout)

    def _setup_adalora(self, init_r: int, alpha: float, dropout: float) -> None:
        _check_layer_args(init_r, alpha, dropout)
        self.r = init_r
        self.alpha = float(alpha)
        self.dropout = float(dropout)
        # PEFT: scaling = lora_alpha if lora_alpha > 0 else float(r); ranknum = float(r), never updated
        self.scaling = self.alpha if self.alpha > 0 else float(init_r)
        self.ranknum = float(init_r)
        # NOTE: PEFT keeps ranknum as a 1-element tensor in the adapters' dtype and divides by
        # ``ranknum + 1e-5`` computed in that dtype; the denominators are precomputed per dtype
        # here so the forward does no tensor work for them (and no graph break under compile).
        self._denominator = {
            dt: float(torch.tensor(self.ranknum, dtype=dt) + RANKNUM_EPS)
            for dt in (torch.float32, torch.float64, torch.bfloat16, torch.float16)
        }
        self.merged = False
        factory = {"device": self.weight.device, "dtype": torch.float64 if self.weight.dtype == torch.float64 else torch.float32}
        self.lora_A = nn.Parameter(torch.empty(init_r, self.in_features, **factory))
        self.lora_E = nn.Parameter(torch.empty(init_r, 1, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, init_r, **factory))
        self.reset_adalora_parameters()

    @torch.no_grad()
    def reset_adalora_parameters(self) -> None:
        """PEFT's init: ``lora_E = 0``, ``lora_A`` and ``lora_B`` normal with std 0.02.

        NOTE: the default generator is advanced exactly as PEFT's ``update_layer``
        advances it (``randn`` for A, E, B and ranknum, then ``normal_`` for A and
        B, on CPU in the default dtype), so ``torch.manual_seed(s)`` before
        :func:`apply_adalora` gives the numbers ``get_peft_model`` gives for an
        fp32 model after the same seed.
        """
        a = torch.randn(self.r, self.in_features)
        torch.randn(self.r, 1)
        b = torch.randn(self.out_features, self.r)
        torch.randn(1)
        nn.init.normal_(a, mean=0.0, std=0.02)
        nn.init.normal_(b, mean=0.0, std=0.02)
        self.lora_A.copy_(a)
        self.lora_B.copy_(b)
        self.lora_E.zero_()

    def reset_parameters(self) -> None:  # called by nn.Linear.__init__
        super().reset_parameters()
        if hasattr(self, "lora_A"):
            self.reset_adalora_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, init_r: int = 12, alpha: float = 8.0, dropout: float = 0.0) -> AdaLoRALinear:
        """Wrap ``linear``: its weight and bias are shared (not copied) and frozen."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        if getattr(linear, "is_adapter_layer", False):
            raise TypeError(f"linear is already an adapter layer ({type(linear).__name__})")
        _check_layer_args(init_r, alpha, dropout)
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.weight.requires_grad_(False)
        self.bias = linear.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self._setup_adalora(init_r, alpha, dropout)
        self.train(linear.training)
        return self

    def effective_scaling(self) -> float:
        """``scaling / (ranknum + 1e-5)``, the denominator rounded in the adapters' dtype as PEFT does."""
        denom = self._denominator.get(self.lora_A.dtype)
        if denom is None:
            denom = float(torch.tensor(self.ranknum, dtype=self.lora_A.dtype) + RANKNUM_EPS)
        return self.scaling / denom

    @property
    def active_rank(self) -> int:
        """The number of triplets whose singular value ``lora_E`` is non-zero."""
        return int(torch.count_nonzero(self.lora_E.detach()).item())

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        # NOTE: E folds into A (PEFT's ``lora_A * lora_E``, the same product), an [r, in] temporary
        lora_A = self.lora_A * self.lora_E
        return lora_linear(
            x, self.weight, lora_A, self.lora_B, self.effective_scaling(), self.bias,
            dropout=self.dropout, training=self.training,
        )

    def peft_tensors(self) -> dict[str, Tensor]:
        """This layer's entries of a PEFT AdaLoRA adapter file (no ``.weight`` suffix)."""
        return {"lora_A": self.lora_A, "lora_B": self.lora_B, "lora_E": self.lora_E}

    @torch.no_grad()
    def delta_weight(self) -> Tensor:
        """``(lora_B @ (lora_A * lora_E)) * scaling / (ranknum + 1e-5)`` [out, in], as
        PEFT's ``get_delta_weight`` computes it (in the adapters' dtype)."""
        denom = torch.tensor(self.ranknum, dtype=self.lora_A.dtype, device=self.lora_A.device) + RANKNUM_EPS
        return (self.lora_B @ (self.lora_A * self.lora_E)) * self.scaling / denom

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"init_r={self.r}, alpha={self.alpha:g}, dropout={self.dropout:g}"
            + (", merged=True" if self.merged else "")
        )


@dataclass
class AdaLoRAConfig:
    """What :func:`apply_adalora` and :class:`RankAllocator` do; fields follow PEFT's
    ``AdaLoraConfig`` (``alpha`` / ``dropout`` are PEFT's ``lora_alpha`` / ``lora_dropout``).

    init_r: every layer's initial rank (triplets). target_r: the average rank
    per layer at the end of the budgeting phase (``0 <= target_r <= init_r``).
    total_step: the number of training steps (required). tinit: warm-up steps
    without pruning. tfinal: final steps on the fixed, final rank pattern.
    deltaT: mask every ``deltaT`` steps during the budgeting phase.
    beta1 / beta2: EMA factors of the sensitivity / its uncertainty, in (0, 1).
    orth_reg_weight: the weight of :func:`orthogonal_regularization`.
    alpha: ``scaling`` (the update is ``scaling / (init_r + 1e-5)`` times ``B E A``;
    PEFT's default 8; ``alpha <= 0`` means ``scaling = init_r``, as in PEFT).
    target_modules / exclude_modules / modules_to_save: as for
    :class:`fastlora.LoRAConfig` (PEFT's spellings).
    """

    init_r: int = 12
    target_r: int = 8
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        _check_layer_args(self.init_r, self.alpha, self.dropout)
        if self.total_step is None:
            raise ValueError(
                "AdaLoRAConfig.total_step is required: the budget schedule needs the number of training steps "
                "(e.g. AdaLoRAConfig(total_step=len(dataloader) * epochs))"
            )
        for name in ("total_step", "target_r", "tinit", "tfinal", "deltaT"):
            v = getattr(self, name)
            if not is_int(v):
                raise TypeError(f"AdaLoRAConfig.{name} must be an integer, got {v!r}")
        if self.total_step < 1:
            raise ValueError(f"AdaLoRAConfig.total_step must be >= 1, got {self.total_step}")
        if not 0 <= self.target_r <= self.init_r:
            raise ValueError(
                f"AdaLoRAConfig.target_r must be in [0, init_r]: got target_r={self.target_r}, init_r={self.init_r} "
                "(the budget only shrinks, from init_r to target_r triplets per layer)"
            )
        if self.tinit < 0 or self.tfinal < 0:
            raise ValueError(f"AdaLoRAConfig.tinit and tfinal must be >= 0, got tinit={self.tinit}, tfinal={self.tfinal}")
        if self.tinit + self.tfinal >= self.total_step:
            raise ValueError(
                f"AdaLoRAConfig: tinit + tfinal must be < total_step to leave a budgeting phase: got tinit={self.tinit}, "
                f"tfinal={self.tfinal}, total_step={self.total_step} (decrease tinit/tfinal or increase total_step)"
            )
        if self.deltaT < 1:
            raise ValueError(f"AdaLoRAConfig.deltaT must be >= 1, got {self.deltaT}")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < v < 1.0:
                raise ValueError(f"AdaLoRAConfig.{name} must be in (0, 1), got {v!r}")
        w = self.orth_reg_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"AdaLoRAConfig.orth_reg_weight must be a finite number >= 0, got {w!r}")
        self.target_modules = normalize_target_modules(self.target_modules)


def adalora_layers(model: nn.Module) -> dict[str, AdaLoRALinear]:
    """The model's :class:`AdaLoRALinear` layers by module name (model order)."""
    return adapter_layers(model, "adalora")


def _build_linear(linear: nn.Linear, name: str, config: AdaLoRAConfig, shared) -> AdaLoRALinear:
    return AdaLoRALinear.from_linear(linear, init_r=config.init_r, alpha=config.alpha, dropout=config.dropout)


register_adapter_kind("adalora", AdaLoRAConfig, label="AdaLoRA", one_per_model=True)
register_layer(AdaLoRAConfig, nn.Linear, _build_linear, AdaLoRALinear)


def apply_adalora(model: nn.Module, config: AdaLoRAConfig | None = None, **overrides) -> nn.Module:
    """Replace the targeted nn.Linear modules of ``model`` by :class:`AdaLoRALinear`
    in place; freeze every parameter that is not an adapter's (except
    ``modules_to_save``); return ``model``.

    ``overrides`` replace fields of ``config``: ``apply_adalora(model, init_r=12,
    target_r=4, total_step=1000)``. Train with a :class:`RankAllocator` built on the
    same config, and add :func:`orthogonal_regularization` to the loss.
    """
    if config is None:
        if "total_step" not in overrides:
            raise ValueError("apply_adalora needs total_step (the number of training steps): pass a config or total_step=...")
        config = AdaLoRAConfig(**_known(overrides))
    elif not isinstance(config, AdaLoRAConfig):
        raise TypeError(f"config must be a fastlora.adalora.AdaLoRAConfig, got {type(config).__name__}")
    elif overrides:
        config = dataclasses.replace(config, **_known(overrides))
    return apply_adapter(model, config, what="apply_adalora")


def _known(overrides: dict) -> dict:
    unknown = set(overrides) - {f.name for f in dataclasses.fields(AdaLoRAConfig)}
    if unknown:
        raise TypeError(f"apply_adalora got unknown AdaLoRAConfig fields: {sorted(unknown)}")
    return overrides


def merge_adalora(model: nn.Module) -> nn.Module:
    """Replace every :class:`AdaLoRALinear` by a plain ``nn.Linear`` with the update
    merged in (in place); returns ``model`` (a bare AdaLoRALinear becomes an nn.Linear)."""
    return merge_adapters(model, "adalora")


def orthogonal_regularization(model: nn.Module, orth_reg_weight: float = 1.0) -> Tensor:
    """PEFT's orthogonality penalty, ``orth_reg_weight * mean_M ||C_M - I||_F`` over the
    ``2 * n_layers`` matrices M (every ``lora_A`` with ``C = A A^T`` [r, r], every
    ``lora_B`` with ``C = B^T B`` [r, r]), summed in model order (A then B per layer).

    With ``orth_reg_weight = config.orth_reg_weight`` (what
    :meth:`RankAllocator.orthogonal_regularization` passes) this is exactly the term
    PEFT's ``AdaLoraModel.forward`` adds to ``outputs.loss``. A 0-d tensor in the
    adapters' dtype, differentiable.
    """
    layers = adalora_layers(model) if not isinstance(model, AdaLoRALinear) else {"": model}
    if not layers:
        raise ValueError("model has no AdaLoRA layers (apply_adalora first)")
    total = 0
    count = 0
    for layer in layers.values():
        for cov in (layer.lora_A @ layer.lora_A.T, layer.lora_B.T @ layer.lora_B):
            eye = torch.eye(*cov.shape, dtype=cov.dtype, device=cov.device)
            total = total + torch.linalg.matrix_norm(cov - eye, ord="fro")
            count += 1
    return orth_reg_weight * (total / count)


class RankAllocator:
    """PEFT's budget schedule and importance-driven pruning for a model's AdaLoRA layers.

    Call :meth:`update_and_allocate` once per training step, after
    ``loss.backward()`` (and ``optimizer.step()``) and before ``zero_grad()``,
    with the 0-based step index; it does what PEFT's
    ``AdaLoraModel.update_and_allocate`` does:

    - steps ``< total_step - tfinal``: update the importance EMAs of every
      ``lora_A`` / ``lora_E`` / ``lora_B`` entry; then, if the schedule says so
      (after ``tinit``, every ``deltaT`` steps), keep the ``budget`` most important
      triplets and zero the other ``lora_E`` entries;
    - step ``== total_step - tfinal``: mask to ``target_r * n_layers`` (the final
      ``rank_pattern``) and drop the importance state;
    - later steps: re-zero the ``lora_E`` entries outside the final pattern (the
      optimizer may have moved them).

    Importance (per entry): ``I = |p * grad|``; ``Ibar = beta1 Ibar + (1 - beta1) I``;
    ``U = beta2 U + (1 - beta2) |I - Ibar|``; ``s = Ibar * U``. A triplet's score is
    ``s(E_i) + mean_j s(A_ij) + mean_k s(B_ki)``; every triplet whose score is
    ``<=`` the ``(init_budget - budget)``-th smallest is pruned.
    Budget at step t (``b0 = init_r * n_layers``, ``bT = target_r * n_layers``):
    ``b0`` for ``t <= tinit``, ``bT`` for ``t > total_step - tfinal``, else
    ``int((b0 - bT) * (1 - (t - tinit) / (total_step - tfinal - tinit))**3 + bT)``.
    """

    def __init__(self, model: nn.Module, config: AdaLoRAConfig) -> None:
        if not isinstance(config, AdaLoRAConfig):
            raise TypeError(f"config must be a fastlora.adalora.AdaLoRAConfig, got {type(config).__name__}")
        layers = adalora_layers(model)
        if not layers:
            raise ValueError("model has no AdaLoRA layers (apply_adalora first)")
        self.config = config
        self.names = list(layers)
        self.init_bgt = sum(layer.r for layer in layers.values())
        self.target_bgt = config.target_r * len(layers)
        self.rank_pattern: dict[str, list[bool]] | None = None
        self.reset_ipt()

    def reset_ipt(self) -> None:
        """Forget the importance state (PEFT does this at the final mask)."""
        self.ipt: dict[tuple[str, str], Tensor] = {}
        self.exp_avg_ipt: dict[tuple[str, str], Tensor] = {}
        self.exp_avg_unc: dict[tuple[str, str], Tensor] = {}

    def _layers(self, model: nn.Module) -> dict[str, AdaLoRALinear]:
        layers = adalora_layers(model)
        if list(layers) != self.names:
            raise ValueError(
                f"the model's AdaLoRA layers {list(layers)} are not the ones this RankAllocator was built for {self.names}"
            )
        return layers

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """``(budget, mask now?)`` for ``step`` (PEFT's cubic schedule, see the class docstring)."""
        c = self.config
        if step <= c.tinit:
            return self.init_bgt, False
        if step > c.total_step - c.tfinal:
            return self.target_bgt, True
        mul_coeff = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        budget = int((self.init_bgt - self.target_bgt) * (mul_coeff**3) + self.target_bgt)
        return budget, step % c.deltaT == 0

    @torch.no_grad()
    def update_ipt(self, model: nn.Module) -> None:
        """Update the sensitivity and uncertainty EMAs from the current gradients."""
        b1, b2 = self.config.beta1, self.config.beta2
        for name, layer in self._layers(model).items():
            for pname in ("lora_A", "lora_E", "lora_B"):
                p = getattr(layer, pname)
                if p.grad is None:
                    raise RuntimeError(
                        f"{name}.{pname} has no gradient: call update_and_allocate after loss.backward() "
                        "and before optimizer.zero_grad()"
                    )
                key = (name, pname)
                if key not in self.ipt:
                    self.exp_avg_ipt[key] = torch.zeros_like(p)
                    self.exp_avg_unc[key] = torch.zeros_like(p)
                ipt = (p * p.grad).abs()
                self.ipt[key] = ipt
                self.exp_avg_ipt[key] = b1 * self.exp_avg_ipt[key] + (1 - b1) * ipt
                self.exp_avg_unc[key] = b2 * self.exp_avg_unc[key] + (1 - b2) * (ipt - self.exp_avg_ipt[key]).abs()

    def triplet_scores(self) -> dict[str, Tensor]:
        """Each layer's triplet importance [r]: ``s(E) + mean s(A) over in + mean s(B) over out``."""
        if not self.exp_avg_ipt:
            raise RuntimeError("no importance scores yet: update_ipt (update_and_allocate) has not run")
        scores = {}
        for name in self.names:
            s = {p: self.exp_avg_ipt[(name, p)] * self.exp_avg_unc[(name, p)] for p in ("lora_A", "lora_E", "lora_B")}
            vec = s["lora_A"].mean(dim=1) + s["lora_B"].mean(dim=0)
            scores[name] = s["lora_E"].view(-1) + vec
        return scores

    @torch.no_grad()
    def mask_to_budget(self, model: nn.Module, budget: int) -> dict[str, list[bool]]:
        """Zero the ``lora_E`` entries of all but the ``budget`` most important triplets
        (ties at the threshold are all pruned, as in PEFT); return the rank pattern
        ``{layer name: [kept?] * r}``."""
        layers = self._layers(model)
        scores = self.triplet_scores()
        k = self.init_bgt - budget
        # NOTE: PEFT calls kthvalue with k = 0 (and fails) when the budget equals the initial
        # one (target_r == init_r); here nothing is pruned then.
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k=k)[0].item() if k > 0 else -math.inf
        pattern = {}
        for name, layer in layers.items():
            prune = (scores[name] <= threshold).view(-1, 1)
            layer.lora_E.masked_fill_(prune, 0.0)
            pattern[name] = (~prune).view(-1).tolist()
        return pattern

    @torch.no_grad()
    def mask_using_rank_pattern(self, model: nn.Module, rank_pattern: dict[str, list[bool]]) -> None:
        """Zero the ``lora_E`` entries outside ``rank_pattern``."""
        for name, layer in self._layers(model).items():
            keep = torch.tensor(rank_pattern[name], dtype=torch.bool, device=layer.lora_E.device).view(-1, 1)
            layer.lora_E.masked_fill_(~keep, 0.0)

    def update_and_allocate(self, model: nn.Module, global_step: int) -> int:
        """One step of the schedule (see the class docstring); returns this step's budget.
        ``self.rank_pattern`` holds the latest pattern (``{layer name: [kept?] * r}``)."""
        if not is_int(global_step) or global_step < 0:
            raise ValueError(f"global_step must be an integer >= 0, got {global_step!r}")
        c = self.config
        end = c.total_step - c.tfinal
        if global_step < end:
            self.update_ipt(model)
            budget, mask_now = self.budget_schedule(global_step)
            if mask_now:
                self.rank_pattern = self.mask_to_budget(model, budget)
            return budget
        if global_step == end:
            budget, _ = self.budget_schedule(global_step)
            self.rank_pattern = self.mask_to_budget(model, budget)
            self.reset_ipt()
            return budget
        if self.rank_pattern is None:
            raise RuntimeError(
                f"step {global_step} is past total_step - tfinal = {end} but no final rank pattern was made: "
                f"call update_and_allocate at step {end}"
            )
        self.mask_using_rank_pattern(model, self.rank_pattern)
        return self.target_bgt

    def orthogonal_regularization(self, model: nn.Module) -> Tensor:
        """:func:`orthogonal_regularization` weighted by ``config.orth_reg_weight``: the term
        PEFT adds to the loss."""
        return orthogonal_regularization(model, self.config.orth_reg_weight)
