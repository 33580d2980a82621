"""VeRA (fastlora.vera) against PEFT's VeRA on the same weights and projection key.

Tolerances for fp32 comparisons follow CONTRIBUTING.md (Tolerances): PEFT's VeRA is run in fp32 and
in float64 on identical weights; ``tol = 2 x (PEFT's own fp32 error)``, that
error floored at 4 fp32 ulps of the largest value (so a tensor PEFT happens to
get almost exact does not demand bit-equality of a differently-associated sum).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fastlora.model import count_parameters
from fastlora.vera import VeRAConfig, VeRALinear, VeRAProjection, apply_vera, merge_vera, vera_layers

from _oracles import assert_close_to, tolerance_2x

peft = pytest.importorskip("peft", reason="PEFT parity tests need peft (pip install 'fastlora[test]')")

EPS32 = torch.finfo(torch.float32).eps
TARGETS = ["q", "v", "o"]


class Toy(nn.Module):
    """Targeted layers of three different (one ragged) shapes plus an untargeted head."""

    def __init__(self, bias=True):
        super().__init__()
        self.q = nn.Linear(24, 40, bias=bias)
        self.v = nn.Linear(40, 17, bias=bias)
        self.o = nn.Linear(17, 32, bias=False)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        return self.head(self.o(torch.tanh(self.v(torch.tanh(self.q(x))))))


def vera_pair(bias=True, r=8, key=0, dropout=0.0, d_initial=0.1, seed=0, dtype=torch.float32):
    """(ours, peft_model) on identical base weights, with identical random non-zero lambdas."""
    torch.manual_seed(seed)
    base = Toy(bias=bias).to(dtype)
    ours = apply_vera(copy.deepcopy(base), r=r, target_modules=TARGETS, projection_prng_key=key, dropout=dropout,
                      d_initial=d_initial)
    cfg = peft.VeraConfig(r=r, target_modules=TARGETS, projection_prng_key=key, vera_dropout=dropout, d_initial=d_initial)
    theirs = peft.get_peft_model(copy.deepcopy(base), cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, layer in vera_layers(ours).items():
            # non-zero lambda_b (PEFT inits it to 0) so every gradient path is live
            layer.vera_lambda_d.copy_(torch.randn(layer.r, generator=g))
            layer.vera_lambda_b.copy_(torch.randn(layer.out_features, generator=g))
            twin = peft_layer(theirs, name)
            twin.vera_lambda_d["default"].copy_(layer.vera_lambda_d)
            twin.vera_lambda_b["default"].copy_(layer.vera_lambda_b)
    return ours, theirs


def peft_layer(peft_model, name):
    return peft_model.base_model.model.get_submodule(name)


def run(model, x, dy, names, bias):
    """Output and gradients (x, each layer's lambda_d / lambda_b, each targeted bias)."""
    x = x.clone().requires_grad_(True)
    y = model(x)
    y.backward(dy)
    grads = {"y": y.detach(), "dx": x.grad}
    for name in names:
        layer = model.get_submodule(name)
        d, b = layer.vera_lambda_d, layer.vera_lambda_b
        if isinstance(d, nn.ParameterDict):
            d, b = d["default"], b["default"]
        grads[f"{name}.lambda_d"] = d.grad
        grads[f"{name}.lambda_b"] = b.grad
        base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
        if bias and base.bias is not None:
            grads[f"{name}.bias"] = base.bias.grad
    return grads


def tolerance(peft32: torch.Tensor, peft64: torch.Tensor) -> float:
    # 2x PEFT's own fp32 error vs float64 + 8 fp32 ulps of the largest value (CONTRIBUTING.md, Tolerances)
    # (PEFT's own error on this 3-layer chain is 2-10 such ulps; the floor keeps a lucky small one from
    # demanding more of us than of PEFT)
    return tolerance_2x(peft32, peft64, torch.float32, floor_ulps=8)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("r,key", [(8, 0), (3, 1234), (64, 7)])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_matches_peft_outputs_and_gradients(bias, r, key, dropout):
    ours, theirs = vera_pair(bias=bias, r=r, key=key, dropout=dropout)
    ours.eval(), theirs.eval()  # eval: dropout is off in both (PEFT's nn.Dropout, fastlora's seeded mask)
    for model in (ours, theirs):
        for name in TARGETS:
            base = model.get_submodule(name) if model is ours else peft_layer(theirs, name).get_base_layer()
            if base.bias is not None:
                base.bias.requires_grad_(True)  # so the bias gradient is checked too
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
        tol = tolerance(want[what], want64[what])
        assert_close_to(got[what], want64[what], tol, f"{what} vs PEFT float64")
        assert_close_to(got[what], want[what], 1.5 * tol, f"{what} vs PEFT fp32")  # ours (<= tol) + PEFT's (<= tol / 2)


def test_float64_matches_peft_to_rounding():
    ours, theirs = vera_pair(r=16, key=5)
    ours, theirs = ours.double().eval(), theirs.double().eval()
    x = torch.randn(9, 24, dtype=torch.float64)
    dy = torch.randn(9, 5, dtype=torch.float64)
    got = run(ours, x, dy, TARGETS, False)
    want = run(theirs.base_model.model, x, dy, TARGETS, False)
    for what in got:
        # float64 end to end: only the association of the sums differs
        assert_close_to(got[what], want[what], 1e-12 * max(1.0, want[what].abs().max().item()), what)


@pytest.mark.parametrize("key", [0, 1, 2**40 + 3])
@pytest.mark.parametrize("r", [1, 8, 256])
def test_projection_is_bit_identical_to_peft(key, r):
    base = Toy()
    ours = apply_vera(copy.deepcopy(base), r=r, target_modules=TARGETS, projection_prng_key=key)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.VeraConfig(r=r, target_modules=TARGETS, projection_prng_key=key))
    proj = ours.q.vera_projection
    # sized to the largest targeted layer: max in = 40 (v), max out = 40 (q)
    assert tuple(proj.vera_A.shape) == (r, 40) and tuple(proj.vera_B.shape) == (40, r)
    assert torch.equal(proj.vera_A, theirs.base_model.vera_A["default"])
    assert torch.equal(proj.vera_B, theirs.base_model.vera_B["default"])
    assert torch.equal(VeRAProjection.generate(r, 40, 40, key).vera_A, proj.vera_A)


def test_projection_storage_is_shared_not_copied():
    model = apply_vera(Toy(), r=8, target_modules=TARGETS)
    layers = list(vera_layers(model).values())
    assert len(layers) == 3
    for m in (model, model.double(), copy.deepcopy(model)):
        layers = list(vera_layers(m).values())
        assert all(layer.vera_projection is layers[0].vera_projection for layer in layers)
        ptrs = {layer._sliced()[0].untyped_storage().data_ptr() for layer in layers}
        assert len(ptrs) == 1
    assert model.q.vera_projection.vera_A.dtype == torch.float64


def test_fresh_model_equals_its_base_and_inits_as_peft():
    base = Toy()
    model = apply_vera(copy.deepcopy(base), r=8, target_modules=TARGETS, d_initial=0.05)
    x = torch.randn(4, 24)
    assert_close_to(model(x), base(x), 0.0, "fresh VeRA model")  # lambda_b = 0: the branch adds exact zeros
    for layer in vera_layers(model).values():
        assert torch.equal(layer.vera_lambda_d, torch.full((8,), 0.05))
        assert torch.equal(layer.vera_lambda_b, torch.zeros(layer.out_features))
        assert layer.weight is not None and not layer.weight.requires_grad
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{t}.vera_lambda_{s}" for t in TARGETS for s in "db"}


@pytest.mark.parametrize("r", [4, 256])
def test_parameter_counts_equal_peft(r):
    ours, theirs = vera_pair(r=r)
    trainable, total = count_parameters(ours)
    assert (trainable, total) == theirs.get_nb_trainable_parameters()
    assert trainable == sum(r + n for n in (40, 17, 32))


def test_merge_unmerge_and_to_linear_match_peft():
    ours, theirs = vera_pair(r=16, key=3)
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
    originals = {n: ours.get_submodule(n).weight.clone() for n in TARGETS}
    for name in TARGETS:
        layer = ours.get_submodule(name)
        layer.unmerge()
        peft_layer(theirs, name).unmerge()
        assert torch.equal(layer.weight, peft_layer(theirs, name).get_base_layer().weight), name
        assert not layer.merged
        # unmerge is exact up to one fp32 rounding of W + delta
        assert_close_to(layer.weight, originals[name] - layer.delta_weight(), 2 * EPS32 * originals[name].abs().max().item(), name)
    merged = merge_vera(copy.deepcopy(ours))
    assert not vera_layers(merged) and type(merged.q) is nn.Linear
    assert_close_to(merged(x).detach(), before, tol, "merge_vera forward")


def test_dropout_applies_to_the_branch_in_training_only():
    ours, _ = vera_pair(dropout=0.5)
    x = torch.randn(8, 24)
    ours.eval()
    eval_out = ours(x).detach()
    ours.train()
    torch.manual_seed(11)
    train1 = ours(x).detach()
    torch.manual_seed(11)
    train2 = ours(x).detach()
    assert torch.equal(train1, train2)  # the mask comes from torch's seeded generator
    assert (train1 - eval_out).abs().max() > 1e-3
    ours.train()
    for layer in vera_layers(ours).values():
        layer.vera_lambda_b.data.zero_()
    ours.eval()
    base_out = ours(x).detach()
    ours.train()
    # lambda_b = 0 zeroes the branch, so dropout cannot reach the base path
    assert_close_to(ours(x).detach(), base_out, 0.0, "dropout with lambda_b = 0")


def test_single_layer_constructor_and_repr():
    layer = VeRALinear(24, 40, r=8, projection_prng_key=2, dropout=0.1)
    assert isinstance(layer, nn.Linear) and layer.vera_projection.r == 8
    assert torch.equal(layer.vera_projection.vera_A, VeRAProjection.generate(8, 24, 40, 2).vera_A)
    assert "r=8" in repr(layer) and "d_initial=0.1" in repr(layer) and "dropout=0.1" in repr(layer)
    layer.merge()
    assert "merged=True" in repr(layer)
    y = layer(torch.randn(3, 24))
    assert y.shape == (3, 40)


def test_save_projection_false_leaves_projection_out_of_state_dict():
    model = apply_vera(Toy(), r=4, target_modules=TARGETS, save_projection=False)
    keys = set(model.state_dict())
    assert not any("vera_projection" in k for k in keys) and "q.vera_lambda_d" in keys
    kept = apply_vera(Toy(), r=4, target_modules=TARGETS)
    assert "q.vera_projection.vera_A" in kept.state_dict()


@pytest.mark.parametrize("save_projection", [True, False])
def test_state_dict_round_trip(save_projection):
    ours = apply_vera(Toy(), r=8, target_modules=TARGETS, projection_prng_key=4, save_projection=save_projection).eval()
    with torch.no_grad():
        for layer in vera_layers(ours).values():
            layer.vera_lambda_b.normal_()
    fresh = apply_vera(Toy(), r=8, target_modules=TARGETS, projection_prng_key=4, save_projection=save_projection).eval()
    fresh.load_state_dict(ours.state_dict())  # without the projection: regenerated from the same key
    x = torch.randn(3, 24)
    assert_close_to(fresh(x), ours(x), 0.0, "reloaded model")


def test_projection_from_loaded_matrices():
    ours, theirs = vera_pair(r=8, key=9)
    proj = VeRAProjection(theirs.base_model.vera_A["default"].clone(), theirs.base_model.vera_B["default"].clone())
    again = apply_vera(Toy(), r=8, target_modules=TARGETS, projection=proj)
    assert again.q.vera_projection is proj
    assert torch.equal(proj.vera_A, ours.q.vera_projection.vera_A)


# --- bad configurations: clear errors ----------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [{"r": 0}, {"r": -2}, {"r": 2.0}, {"d_initial": float("nan")}, {"dropout": 1.0}])
def test_bad_config_values_are_errors(kwargs):
    with pytest.raises(ValueError, match="r \\(the VeRA rank\\)|d_initial|dropout"):
        VeRAConfig(**kwargs)
    with pytest.raises(ValueError):
        VeRALinear(8, 8, **kwargs)


def test_layer_larger_than_projection_is_an_error():
    proj = VeRAProjection.generate(4, 16, 8)
    with pytest.raises(ValueError, match=r"too small.*in_features=32"):
        VeRALinear.from_linear(nn.Linear(32, 8), proj)
    with pytest.raises(ValueError, match=r"too small.*out_features=9"):
        VeRALinear.from_linear(nn.Linear(16, 9), proj)
    with pytest.raises(ValueError, match=r"too small.*r=5"):
        VeRALinear.from_linear(nn.Linear(16, 8), proj, r=5)
    small = VeRALinear.from_linear(nn.Linear(16, 8), proj, r=3)  # a smaller rank slices vera_A[:3], vera_B[:, :3]
    assert small(torch.randn(2, 16)).shape == (2, 8) and small.vera_lambda_d.shape == (3,)
    assert VeRALinear(12, 5, projection=proj).r == 4  # r defaults to the projection's rank


def test_apply_with_too_small_projection_fails_before_changing_the_model():
    model = Toy()
    with pytest.raises(ValueError, match=r"smaller than the largest targeted layer"):
        apply_vera(model, r=4, target_modules=TARGETS, projection=VeRAProjection.generate(4, 24, 40))
    assert not vera_layers(model) and all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match=r"rank 4 .* config.r=8"):
        apply_vera(model, r=8, target_modules=TARGETS, projection=VeRAProjection.generate(4, 40, 40))


def test_mismatched_projection_sizes_are_errors():
    with pytest.raises(ValueError, match=r"must share r.*\(4, 16\).*\(8, 3\)"):
        VeRAProjection(torch.randn(4, 16), torch.randn(8, 3))
    with pytest.raises(ValueError, match="2-D"):
        VeRAProjection(torch.randn(4), torch.randn(8, 4))
    with pytest.raises(ValueError, match="dtype"):
        VeRAProjection(torch.randn(4, 16), torch.randn(8, 4, dtype=torch.float64))
    layer = VeRALinear(16, 8, r=4)
    with pytest.raises(ValueError, match=r"x's last dimension must equal weight's in_features"):
        layer(torch.randn(3, 15))


def test_apply_errors():
    with pytest.raises(ValueError, match="matched no module"):
        apply_vera(Toy(), target_modules=["nope"])
    with pytest.raises(TypeError, match="unknown VeRAConfig fields"):
        apply_vera(Toy(), vera_dropout=0.1)
    model = apply_vera(Toy(), r=4, target_modules=TARGETS)
    with pytest.raises(ValueError, match="already has VeRA layers"):
        apply_vera(model, r=4)
    with pytest.raises(TypeError, match="not on a bare"):
        apply_vera(nn.Linear(4, 4))


def test_target_module_forms():
    assert set(vera_layers(apply_vera(Toy(), r=4))) == {"q", "v", "o", "head"}  # None: every nn.Linear
    assert set(vera_layers(apply_vera(Toy(), r=4, target_modules=r"(q|v)"))) == {"q", "v"}  # regex: full match
    assert set(vera_layers(apply_vera(Toy(), r=4, target_modules=TARGETS, exclude_modules=["o"]))) == {"q", "v"}
    kept = apply_vera(Toy(), r=4, target_modules=["q"], modules_to_save=["head"])
    assert kept.head.weight.requires_grad and not kept.v.weight.requires_grad


@pytest.mark.interpreter
def test_triton_kernels_match_peft():
    ours, theirs = vera_pair(r=16, key=1)
    ours.eval(), theirs.eval()
    theirs64 = copy.deepcopy(theirs).double()
    x = torch.randn(5, 24)
    dy = torch.randn(5, 5)
    got = run(ours, x, dy, TARGETS, False)
    want = run(theirs.base_model.model, x, dy, TARGETS, False)
    want64 = run(theirs64.base_model.model, x.double(), dy.double(), TARGETS, False)
    for what in got:
        # the kernels' fp32 tiles associate differently; 2x PEFT's error as above, floor 4 ulps
        assert_close_to(got[what], want64[what], tolerance(want[what], want64[what]), what)


@pytest.mark.parametrize("seed", [0, 1])
def test_bf16_base_with_fp32_lambdas_matches_peft(seed):
    # PEFT keeps the lambdas and the projection in fp32 on a bf16 base and computes the branch in fp32
    ours, theirs = vera_pair(r=8, seed=seed, dtype=torch.bfloat16)
    ours.eval(), theirs.eval()
    assert ours.q.vera_lambda_d.dtype == torch.float32 and ours.q.weight.dtype == torch.bfloat16
    assert ours.q.vera_projection.vera_A.dtype == theirs.base_model.vera_A["default"].dtype == torch.float32
    assert peft_layer(theirs, "q").vera_lambda_d["default"].dtype == torch.float32
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
