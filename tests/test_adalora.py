"""AdaLoRA (fastlora.adalora) against PEFT's AdaLoRA on the same weights.

Tolerances for fp32 comparisons follow CONTRIBUTING.md (Tolerances): PEFT's AdaLoRA is run in fp32
and in float64 on identical weights; ``tol = 2 x (PEFT's own fp32 error)``, that
error floored at 4 fp32 ulps of the largest value (so a tensor PEFT happens to
get almost exact does not demand bit-equality of a differently-associated sum).
The rank allocator is checked for bit-equality (same inputs, same operations).
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from _oracles import assert_close_to, tolerance_2x
from torch import nn

from fastlora.adalora import (
    AdaLoRAConfig,
    AdaLoRALinear,
    RankAllocator,
    adalora_layers,
    apply_adalora,
    merge_adalora,
    orthogonal_regularization,
)
from fastlora.model import count_parameters

peft = pytest.importorskip("peft", reason="PEFT parity tests need peft (pip install 'fastlora[test]')")

EPS32 = torch.finfo(torch.float32).eps
TARGETS = ["q", "v", "o"]


class Toy(nn.Module):
    """Targeted layers of three different (one ragged) shapes plus an untargeted head.

    With ``target`` it returns an object with ``.loss`` (MSE), which is what makes
    PEFT's ``AdaLoraModel.forward`` add its orthogonal regularizer."""

    def __init__(self, bias=True):
        super().__init__()
        self.q = nn.Linear(24, 40, bias=bias)
        self.v = nn.Linear(40, 17, bias=bias)
        self.o = nn.Linear(17, 32, bias=False)
        self.head = nn.Linear(32, 5)

    def forward(self, x, target=None):
        out = self.head(self.o(torch.tanh(self.v(torch.tanh(self.q(x))))))
        if target is None:
            return out
        return SimpleNamespace(loss=((out - target) ** 2).mean(), logits=out)


def peft_layer(peft_model, name):
    return peft_model.base_model.model.get_submodule(name)


def adalora_pair(bias=True, init_r=6, target_r=2, alpha=8.0, seed=0, dtype=torch.float32, **schedule):
    """(ours, peft_model) on identical base weights, with identical random lora_A / lora_E / lora_B
    (a non-zero E, which PEFT inits to 0, so every gradient path is live)."""
    schedule = {"total_step": 12, **schedule}
    torch.manual_seed(seed)
    base = Toy(bias=bias).to(dtype)
    ours = apply_adalora(copy.deepcopy(base), init_r=init_r, target_r=target_r, alpha=alpha, target_modules=TARGETS,
                         **schedule)
    cfg = peft.AdaLoraConfig(init_r=init_r, target_r=target_r, lora_alpha=alpha, target_modules=TARGETS, **schedule)
    theirs = peft.get_peft_model(copy.deepcopy(base), cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, layer in adalora_layers(ours).items():
            twin = peft_layer(theirs, name)
            for p in ("lora_A", "lora_E", "lora_B"):
                mine = getattr(layer, p)
                mine.copy_(torch.randn(mine.shape, generator=g) / mine.shape[-1] ** 0.5)
                getattr(twin, p)["default"].copy_(mine)
    return ours, theirs


def run(model, x, dy, names, bias):
    """Output and gradients (x, each layer's lora_A / lora_E / lora_B, each targeted bias)."""
    x = x.clone().requires_grad_(True)
    y = model(x)
    y.backward(dy)
    grads = {"y": y.detach(), "dx": x.grad}
    for name in names:
        layer = model.get_submodule(name)
        for p in ("lora_A", "lora_E", "lora_B"):
            t = getattr(layer, p)
            grads[f"{name}.{p}"] = (t["default"] if isinstance(t, nn.ParameterDict) else t).grad
        base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
        if bias and base.bias is not None:
            grads[f"{name}.bias"] = base.bias.grad
    return grads


def tolerance(peft32: torch.Tensor, peft64: torch.Tensor, ulps: int = 4) -> float:
    # 2x PEFT's own fp32 error vs float64 + 2 * `ulps` fp32 ulps of the largest value (CONTRIBUTING.md, Tolerances)
    # (the floor keeps a lucky near-exact PEFT result from demanding more of us than of PEFT)
    return tolerance_2x(peft32, peft64, torch.float32, floor_ulps=2 * ulps)


def enable_bias_grads(model):
    for name in TARGETS:
        layer = model.get_submodule(name)
        base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
        if base.bias is not None:
            base.bias.requires_grad_(True)


# --- (1) outputs and gradients ----------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("init_r,alpha", [(6, 8.0), (16, 32.0), (1, 0.0)])
def test_matches_peft_outputs_and_gradients(bias, init_r, alpha):
    ours, theirs = adalora_pair(bias=bias, init_r=init_r, target_r=min(init_r, 2), alpha=alpha)
    ours.eval(), theirs.eval()
    enable_bias_grads(ours), enable_bias_grads(theirs.base_model.model)
    theirs64 = copy.deepcopy(theirs).double()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 7, 24, generator=g)
    dy = torch.randn(2, 7, 5, generator=g)
    got = run(ours, x, dy, TARGETS, bias)
    want = run(theirs.base_model.model, x, dy, TARGETS, bias)
    want64 = run(theirs64.base_model.model, x.double(), dy.double(), TARGETS, bias)
    assert got.keys() == want.keys()
    for what in got:
        assert got[what] is not None, what
        # dE is a chained reduction (over the M rows, then the K inputs: rowsum(dS^T x * A)) that PEFT
        # associates differently (it reduces x (A*E)^T's gradient): a few ulps more room for its floor
        tol = tolerance(want[what], want64[what], ulps=16 if what.endswith("lora_E") else 4)
        assert_close_to(got[what], want64[what], tol, f"{what} vs PEFT float64")
        assert_close_to(got[what], want[what], 1.5 * tol, f"{what} vs PEFT fp32")  # ours (<= tol) + PEFT's (<= tol / 2)


def test_float64_matches_peft_to_rounding():
    ours, theirs = adalora_pair(init_r=8)
    ours, theirs = ours.double().eval(), theirs.double().eval()
    x = torch.randn(9, 24, dtype=torch.float64)
    dy = torch.randn(9, 5, dtype=torch.float64)
    got = run(ours, x, dy, TARGETS, False)
    want = run(theirs.base_model.model, x, dy, TARGETS, False)
    for what in got:
        # float64 end to end (ranknum + 1e-5 in float64 on both sides): only the association of the sums differs
        assert_close_to(got[what], want[what], 1e-12 * max(1.0, want[what].abs().max().item()), what)


def test_fresh_model_equals_its_base_and_inits_as_peft():
    base = Toy()
    torch.manual_seed(7)
    ours = apply_adalora(copy.deepcopy(base), init_r=6, target_r=2, total_step=10, target_modules=TARGETS)
    torch.manual_seed(7)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.AdaLoraConfig(init_r=6, target_r=2, total_step=10,
                                                                           target_modules=TARGETS))
    x = torch.randn(4, 24)
    assert_close_to(ours(x), base(x), 0.0, "fresh AdaLoRA model")  # E = 0: the branch adds exact zeros
    for name, layer in adalora_layers(ours).items():
        twin = peft_layer(theirs, name)
        # the default generator is advanced as PEFT advances it: the same seed gives the same numbers
        for p in ("lora_A", "lora_E", "lora_B"):
            assert torch.equal(getattr(layer, p), getattr(twin, p)["default"]), f"{name}.{p}"
        assert torch.equal(layer.lora_E, torch.zeros(6, 1))
        assert 0.015 < layer.lora_A.std().item() < 0.025  # normal, std 0.02 (PEFT's init)
        assert not layer.weight.requires_grad and layer.ranknum == twin.ranknum["default"].item() == 6.0
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {f"{t}.lora_{s}" for t in TARGETS for s in "AEB"}


@pytest.mark.interpreter
def test_triton_kernels_match_peft():
    ours, theirs = adalora_pair(init_r=8)
    ours.eval(), theirs.eval()
    theirs64 = copy.deepcopy(theirs).double()
    x = torch.randn(5, 24)
    dy = torch.randn(5, 5)
    got = run(ours, x, dy, TARGETS, False)
    want = run(theirs.base_model.model, x, dy, TARGETS, False)
    want64 = run(theirs64.base_model.model, x.double(), dy.double(), TARGETS, False)
    for what in got:
        # the kernels' fp32 tiles associate differently; 2x PEFT's error as above (dE: the chained-reduction floor)
        tol = tolerance(want[what], want64[what], ulps=16 if what.endswith("lora_E") else 4)
        assert_close_to(got[what], want64[what], tol, what)


@pytest.mark.parametrize("seed", [0, 1])
def test_bf16_base_with_fp32_adapters_matches_peft(seed):
    # PEFT keeps AdaLoRA's adapters (and ranknum) in fp32 on a bf16 base and computes the branch in fp32
    ours, theirs = adalora_pair(init_r=6, seed=seed, dtype=torch.bfloat16)
    ours.eval(), theirs.eval()
    assert ours.q.lora_A.dtype == peft_layer(theirs, "q").lora_A["default"].dtype == torch.float32
    assert ours.q.weight.dtype == torch.bfloat16
    theirs64 = copy.deepcopy(theirs).double()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 24, generator=g).to(torch.bfloat16)
    dy = torch.randn(6, 5, generator=g).to(torch.bfloat16)
    got = run(ours, x, dy, TARGETS, False)
    want = run(theirs.base_model.model, x, dy, TARGETS, False)
    want64 = run(theirs64.base_model.model, x.double(), dy.double(), TARGETS, False)
    for what in got:
        assert got[what].dtype == want[what].dtype, what
        # 2x PEFT's own bf16 error vs float64 + 4 bf16 ulps of the largest value (PEFT may be exact by luck)
        tol = tolerance_2x(want[what], want64[what], torch.bfloat16, floor_ulps=4)
        assert_close_to(got[what], want64[what], tol, f"{what} (bf16 base) vs PEFT float64")


# --- (2) the orthogonal regularizer ------------------------------------------------------------------


@pytest.mark.parametrize("orth_reg_weight", [0.5, 0.1])
def test_orthogonal_regularizer_matches_peft(orth_reg_weight):
    ours, theirs = adalora_pair(init_r=6, orth_reg_weight=orth_reg_weight)
    # AdaLoraModel.forward adds orth_reg_weight * regularizer to outputs.loss (PeftModel.forward bypasses it);
    # the target is the model's own output, so the task loss is exactly 0 and the loss *is* PEFT's term
    x = torch.randn(3, 24)
    target = theirs.base_model.model(x).detach()
    peft_reg = theirs.base_model(x, target=target).loss
    allocator = RankAllocator(ours, AdaLoRAConfig(init_r=6, target_r=2, total_step=12, orth_reg_weight=orth_reg_weight))
    reg = allocator.orthogonal_regularization(ours)
    assert reg.dim() == 0 and reg.requires_grad
    # the same operations in the same order (A then B per layer, layers in model order), both fp32: bit-equal
    assert_close_to(reg, peft_reg, 0.0, "orth regularizer")
    assert_close_to(orthogonal_regularization(ours, orth_reg_weight), reg, 0.0, "module-level function")
    # and its gradients
    reg.backward()
    peft_reg.backward()
    for name, layer in adalora_layers(ours).items():
        twin = peft_layer(theirs, name)
        for p in ("lora_A", "lora_B"):
            want = getattr(twin, p)["default"].grad
            # the task loss is exactly 0 with zero gradient; fp32 rounding of the norms' gradients
            assert_close_to(getattr(layer, p).grad, want, 8 * EPS32 * want.abs().max().item(), f"{name}.{p}")


# --- (3) the budget schedule and the masks ------------------------------------------------------------

SCHEDULE = {"total_step": 12, "tinit": 2, "tfinal": 3, "deltaT": 1}


def peft_pattern(theirs) -> dict[str, list[bool]]:
    pattern = theirs.peft_config["default"].rank_pattern
    return {k.removesuffix(".lora_E.default"): v for k, v in pattern.items()} if pattern else None


@pytest.mark.parametrize("deltaT", [1, 2])
def test_allocator_is_bit_identical_to_peft_on_the_same_gradients(deltaT):
    """PEFT trains; at every step its parameters and gradients are copied into ours before
    both allocators run: budgets, rank patterns and masked E must be identical."""
    schedule = {**SCHEDULE, "deltaT": deltaT}
    ours, theirs = adalora_pair(init_r=6, target_r=2, **schedule)
    config = AdaLoRAConfig(init_r=6, target_r=2, **schedule)
    allocator = RankAllocator(ours, config)
    assert (allocator.init_bgt, allocator.target_bgt) == (18, 6)
    opt = torch.optim.Adam([p for p in theirs.parameters() if p.requires_grad], lr=0.05)
    g = torch.Generator().manual_seed(11)
    budgets = []
    for step in range(config.total_step):
        x, t = torch.randn(8, 24, generator=g), torch.randn(8, 5, generator=g)
        theirs.base_model(x, target=t).loss.backward()
        opt.step()
        with torch.no_grad():
            for name, layer in adalora_layers(ours).items():
                for p in ("lora_A", "lora_E", "lora_B"):
                    src = getattr(peft_layer(theirs, name), p)["default"]
                    getattr(layer, p).copy_(src)
                    getattr(layer, p).grad = src.grad.clone()
        want_budget = theirs.base_model.rankallocator.budget_schedule(step)[0]
        theirs.base_model.update_and_allocate(step)
        budgets.append(allocator.update_and_allocate(ours, step))
        assert budgets[-1] == want_budget, step
        assert allocator.rank_pattern == peft_pattern(theirs), step
        for name, layer in adalora_layers(ours).items():
            assert torch.equal(layer.lora_E, peft_layer(theirs, name).lora_E["default"]), (step, name)
        opt.zero_grad()
    assert budgets[: schedule["tinit"] + 1] == [18] * (schedule["tinit"] + 1)  # warm-up
    assert budgets == sorted(budgets, reverse=True) and budgets[-1] == 6


def test_training_shrinks_the_budget_to_target_like_peft():
    """Both train with their own forward / backward / Adam (float64, so rounding cannot flip a ranking):
    the budget per step and the rank pattern per step are PEFT's, and the kept triplets end at
    target_r * n_layers from step total_step - tfinal on."""
    ours, theirs = adalora_pair(init_r=6, target_r=2, **SCHEDULE)
    ours, theirs = ours.double(), theirs.double()
    config = AdaLoRAConfig(init_r=6, target_r=2, **SCHEDULE)
    allocator = RankAllocator(ours, config)
    opt_ours = torch.optim.Adam([p for p in ours.parameters() if p.requires_grad], lr=0.05)
    opt_theirs = torch.optim.Adam([p for p in theirs.parameters() if p.requires_grad], lr=0.05)
    g = torch.Generator().manual_seed(5)
    end = config.total_step - config.tfinal
    kept = []
    for step in range(config.total_step):
        x, t = torch.randn(8, 24, generator=g).double(), torch.randn(8, 5, generator=g).double()
        loss = ours(x, target=t).loss + allocator.orthogonal_regularization(ours)
        loss.backward()
        theirs.base_model(x, target=t).loss.backward()  # AdaLoraModel.forward adds its regularizer itself
        opt_ours.step(), opt_theirs.step()
        budget = allocator.update_and_allocate(ours, step)
        theirs.base_model.update_and_allocate(step)
        assert budget == theirs.base_model.rankallocator.budget_schedule(step)[0], step
        assert allocator.rank_pattern == peft_pattern(theirs), step
        n_kept = sum(layer.active_rank for layer in adalora_layers(ours).values())
        kept.append(n_kept)
        if step > config.tinit:
            assert n_kept <= budget, step  # masked every step (deltaT = 1): at most the budget survives
        opt_ours.zero_grad(), opt_theirs.zero_grad()
    assert kept[end:] == [config.target_r * 3] * (config.total_step - end)
    assert kept[0] == 18 and kept == sorted(kept, reverse=True)
    assert sum(map(sum, allocator.rank_pattern.values())) == config.target_r * 3
    for name, layer in adalora_layers(ours).items():
        twin = peft_layer(theirs, name)
        for p in ("lora_A", "lora_E", "lora_B"):
            want = getattr(twin, p)["default"]
            # 12 Adam steps in float64 from identical weights: observed <= 1e-15; 1e-12 leaves room for Adam's
            # normalisation amplifying re-association differences in tiny gradients
            assert_close_to(getattr(layer, p), want, 1e-12, f"{name}.{p}")


def test_budget_schedule_matches_peft_everywhere():
    cfg = {"init_r": 12, "target_r": 4, "total_step": 100, "tinit": 10, "tfinal": 20, "deltaT": 3}
    ours, theirs = adalora_pair(**cfg)
    allocator = RankAllocator(ours, AdaLoRAConfig(**cfg))
    for step in range(105):
        assert allocator.budget_schedule(step) == theirs.base_model.rankallocator.budget_schedule(step), step


def test_allocator_errors():
    ours, _ = adalora_pair()
    allocator = RankAllocator(ours, AdaLoRAConfig(init_r=6, target_r=2, **SCHEDULE))
    with pytest.raises(RuntimeError, match="no gradient.*after loss.backward"):
        allocator.update_and_allocate(ours, 0)
    with pytest.raises(RuntimeError, match="no final rank pattern"):
        allocator.update_and_allocate(ours, 11)
    with pytest.raises(ValueError, match="no AdaLoRA layers"):
        RankAllocator(Toy(), AdaLoRAConfig(total_step=10))
    with pytest.raises(ValueError, match="not the ones this RankAllocator"):
        allocator.update_and_allocate(apply_adalora(Toy(), total_step=12, target_modules=["q"]), 0)


def test_target_r_equal_to_init_r_prunes_nothing():
    # PEFT's kthvalue(k=0) fails here; fastlora keeps every triplet
    ours, _ = adalora_pair(init_r=4, target_r=4)
    allocator = RankAllocator(ours, AdaLoRAConfig(init_r=4, target_r=4, total_step=12))
    for step in range(12):
        ours(torch.randn(4, 24), target=torch.randn(4, 5)).loss.backward()
        assert allocator.update_and_allocate(ours, step) == 12
        ours.zero_grad()
    assert all(all(v) for v in allocator.rank_pattern.values())


# --- (4) parameter counts -------------------------------------------------------------------------------


@pytest.mark.parametrize("init_r", [1, 12])
def test_parameter_counts_equal_peft(init_r):
    ours, theirs = adalora_pair(init_r=init_r, target_r=1)
    trainable, total = count_parameters(ours)
    peft_trainable, peft_total = theirs.get_nb_trainable_parameters()
    assert trainable == peft_trainable == sum(init_r * (k + 1 + n) for k, n in ((24, 40), (40, 17), (17, 32)))
    # PEFT keeps ranknum as a frozen 1-element Parameter per layer; fastlora as a Python number
    assert total == peft_total - len(TARGETS)


# --- merge -------------------------------------------------------------------------------------------------


def test_merge_unmerge_and_to_linear_match_peft():
    ours, theirs = adalora_pair(init_r=8)
    ours.eval(), theirs.eval()
    x = torch.randn(6, 24)
    before = ours(x).detach()
    for name in TARGETS:
        ours.get_submodule(name).merge()
        peft_layer(theirs, name).merge()
        # same products in the same order, both fp32: the merged weights are bit-identical
        assert torch.equal(ours.get_submodule(name).weight, peft_layer(theirs, name).get_base_layer().weight), name
    after = ours(x).detach()
    tol = 64 * EPS32 * before.abs().max().item()  # merged vs unmerged: fp32 re-association over K <= 40 terms
    assert_close_to(after, before, tol, "merged forward")
    assert_close_to(theirs(x).detach(), after, 0.0, "PEFT merged forward")
    for name in TARGETS:
        layer = ours.get_submodule(name)
        layer.unmerge()
        peft_layer(theirs, name).unmerge()
        assert torch.equal(layer.weight, peft_layer(theirs, name).get_base_layer().weight), name
    merged = merge_adalora(copy.deepcopy(ours))
    assert not adalora_layers(merged) and type(merged.q) is nn.Linear
    assert_close_to(merged(x).detach(), before, tol, "merge_adalora forward")


def test_single_layer_and_dropout():
    layer = AdaLoRALinear(24, 40, init_r=4, alpha=16, dropout=0.5)
    assert isinstance(layer, nn.Linear) and layer.lora_A.shape == (4, 24) and layer.lora_E.shape == (4, 1)
    assert "init_r=4" in repr(layer) and "alpha=16" in repr(layer)
    with torch.no_grad():
        layer.lora_E.fill_(1.0)
    x = torch.randn(8, 24)
    layer.eval()
    eval_out = layer(x).detach()
    layer.train()
    torch.manual_seed(1)
    t1 = layer(x).detach()
    torch.manual_seed(1)
    assert torch.equal(t1, layer(x).detach()) and (t1 - eval_out).abs().max() > 1e-4


# --- (5) bad configurations ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"init_r": 4, "target_r": 8, "total_step": 10}, r"target_r must be in \[0, init_r\].*target_r=8, init_r=4"),
        ({"target_r": -1, "total_step": 10}, r"target_r must be in \[0, init_r\]"),
        ({"tinit": 5, "tfinal": 5, "total_step": 10}, r"tinit \+ tfinal must be < total_step.*tinit=5, tfinal=5"),
        ({"tinit": 10, "total_step": 10}, r"tinit \+ tfinal must be < total_step"),
        ({}, r"total_step is required"),
        ({"total_step": 0}, r"total_step must be >= 1"),
        ({"init_r": 0, "total_step": 10}, r"init_r"),
        ({"deltaT": 0, "total_step": 10}, r"deltaT"),
        ({"beta1": 1.0, "total_step": 10}, r"beta1 must be in \(0, 1\)"),
        ({"orth_reg_weight": -0.1, "total_step": 10}, r"orth_reg_weight"),
        ({"dropout": 1.0, "total_step": 10}, r"dropout"),
    ],
)
def test_bad_configs_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaLoRAConfig(**kwargs)


def test_apply_errors():
    with pytest.raises(ValueError, match="needs total_step"):
        apply_adalora(Toy(), init_r=4)
    with pytest.raises(TypeError, match="total_step must be an integer"):
        AdaLoRAConfig(total_step=10.0)
    with pytest.raises(ValueError, match="matched no module"):
        apply_adalora(Toy(), total_step=10, target_modules=["nope"])
    with pytest.raises(TypeError, match="unknown AdaLoRAConfig fields"):
        apply_adalora(Toy(), total_step=10, lora_alpha=16)
    model = apply_adalora(Toy(), total_step=10, target_modules=TARGETS)
    with pytest.raises(ValueError, match="already has AdaLoRA layers"):
        apply_adalora(model, total_step=10)
    with pytest.raises(TypeError, match="not on a bare"):
        apply_adalora(nn.Linear(4, 4), total_step=10)
    with pytest.raises(ValueError, match=r"target_r must be in \[0, init_r\]"):
        apply_adalora(Toy(), AdaLoRAConfig(total_step=10), target_r=20)
