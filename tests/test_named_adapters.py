"""Named adapters (fastlora.adapters) against PEFT 0.21's multi-adapter model on
the same weights: several adapters per layer, set_adapter (one and several),
delete, disable, add_weighted_adapter ("cat", "linear"), mixed batches with
"__base__", training one adapter with the others frozen, merging, QLoRA
layers; plus dropout independence, one fused call, state dicts and deepcopy.

Tolerances follow the project's rule: fastlora against PEFT in float64 within
2x PEFT's own float32 error (``tolerance_2x``)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import fastlora
import fastlora.modules as fl_modules
from fastlora import LoRAConfig, LoRALinear, apply_lora, merge_lora
from fastlora.adapters import (
    active_adapters,
    add_adapter,
    add_weighted_adapter,
    adapter_names,
    delete_adapter,
    disable_adapter,
    mixed_batch,
    named_adapter_layers,
    set_adapter,
)
from fastlora.quant import dequantize_4bit

from _oracles import assert_close_to, tolerance_2x

peft = pytest.importorskip("peft", reason="PEFT parity tests need peft (pip install 'fastlora[test]')")
from peft.tuners.lora import LoraLayer  # noqa: E402

PREFIX = "base_model.model."


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(24, 40)
        self.fc2 = nn.Linear(40, 16)
        self.head = nn.Linear(16, 8)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


# (name, fastlora config, PEFT config): ranks, alphas, rsLoRA and targets differ;
# "b" targets head, which no earlier adapter has (a new layer holding only "b").
ADAPTERS = [
    ("default", dict(r=4, alpha=8.0, target_modules=["fc1", "fc2"]), dict(r=4, lora_alpha=8, target_modules=["fc1", "fc2"])),
    (
        "b",
        dict(r=6, alpha=3.0, use_rslora=True, target_modules=["fc1", "head"]),
        dict(r=6, lora_alpha=3, use_rslora=True, target_modules=["fc1", "head"]),
    ),
    ("c", dict(r=4, alpha=5.0, target_modules=["fc2"]), dict(r=4, lora_alpha=5, target_modules=["fc2"])),
]


def base_net() -> Net:
    torch.manual_seed(0)
    return Net()


def build(n_adapters: int = 3, dropout: float = 0.0):
    """(fastlora model, PEFT model) with the first n adapters and the same weights."""
    ours = base_net()
    theirs = base_net()
    for i, (name, cfg, pcfg) in enumerate(ADAPTERS[:n_adapters]):
        if i == 0:
            apply_lora(ours, LoRAConfig(dropout=dropout, **cfg))
            theirs = peft.get_peft_model(theirs, peft.LoraConfig(lora_dropout=dropout, **pcfg))
        else:
            add_adapter(ours, name, LoRAConfig(dropout=dropout, **cfg))
            theirs.add_adapter(name, peft.LoraConfig(lora_dropout=dropout, **pcfg))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for (_, _, A, B) in ours_slots(ours).values():
            A.copy_(torch.randn(A.shape, generator=g) / A.shape[1] ** 0.5)
            B.copy_(torch.randn(B.shape, generator=g) / B.shape[1] ** 0.5)
    copy_into_peft(ours, theirs)
    return ours, theirs


def ours_slots(model) -> dict:
    """{(layer, adapter): (layer, adapter, lora_A, lora_B)}"""
    out = {}
    for lname, layer in named_adapter_layers(model).items():
        for a in layer.adapter_names():
            slot = layer.adapter(a)
            out[(lname, a)] = (lname, a, slot.lora_A, slot.lora_B)
    return out


def peft_slots(model) -> dict:
    out = {}
    for lname, m in model.named_modules():
        if isinstance(m, LoraLayer):
            for a in m.lora_A:
                key = lname[len(PREFIX) :] if lname.startswith(PREFIX) else lname
                out[(key, a)] = (lname, a, m.lora_A[a].weight, m.lora_B[a].weight)
    return out


def copy_into_peft(ours, theirs) -> None:
    mine, peft_ = ours_slots(ours), peft_slots(theirs)
    assert set(mine) == set(peft_), "fastlora and PEFT hold different (layer, adapter) pairs"
    with torch.no_grad():
        for key, (_, _, A, B) in mine.items():
            peft_[key][2].copy_(A)
            peft_[key][3].copy_(B)


def params_of(slots: dict) -> dict:
    out = {}
    for key, (_, _, A, B) in slots.items():
        out[key + ("A",)] = A
        out[key + ("B",)] = B
    return out


def run(model, slots_fn, x, dy, **kwargs):
    """Output, dx and the gradients of every adapter parameter that requires grad."""
    x = x.clone().requires_grad_(True)
    params = params_of(slots_fn(model))
    for p in params.values():
        p.grad = None
    y = model(x, **kwargs)
    y.backward(dy)
    grads = {k: p.grad for k, p in params.items() if p.requires_grad}
    return y.detach(), x.grad, grads


def assert_matches_peft(ours, theirs, x, what, **peft_kwargs):
    """fastlora's output, dx and adapter gradients against PEFT's in float64,
    within 2x PEFT's own float32 error; the same parameters require grad."""
    dy = torch.randn(*x.shape[:-1], 8, generator=torch.Generator().manual_seed(7))
    y, dx, g = run(ours, ours_slots, x, dy)
    y32, dx32, g32 = run(theirs, peft_slots, x, dy, **peft_kwargs)
    theirs64 = copy.deepcopy(theirs).double()
    y64, dx64, g64 = run(theirs64, peft_slots, x.double(), dy.double(), **peft_kwargs)
    assert set(g) == set(g32) == set(g64), f"{what}: trainable adapters differ: {sorted(g)} vs PEFT {sorted(g32)}"
    assert_close_to(y, y64, tolerance_2x(y32, y64, torch.float32), f"{what}: y")
    assert_close_to(dx, dx64, tolerance_2x(dx32, dx64, torch.float32), f"{what}: dx")
    for key in g:
        assert (g[key] is None) == (g64[key] is None), f"{what}: grad of {key}"
        if g[key] is not None:
            assert_close_to(g[key], g64[key], tolerance_2x(g32[key], g64[key], torch.float32), f"{what}: grad {key}")


def x_input(rows=5, seed=3):
    return torch.randn(rows, 7, 24, generator=torch.Generator().manual_seed(seed))


# -- structure ------------------------------------------------------------------------


def test_adapters_sit_where_peft_puts_them_and_state_dict_keys():
    ours, theirs = build()
    assert set(ours_slots(ours)) == set(peft_slots(theirs))
    assert adapter_names(ours) == ["default", "b", "c"]
    assert active_adapters(ours) == ["default"] == theirs.active_adapters
    keys = set(ours.state_dict())
    # the default adapter keeps its keys; the others are lora_adapters.<name>.lora_A/B
    assert {"fc1.lora_A", "fc1.lora_B", "fc2.lora_A", "fc2.lora_B"} <= keys
    assert {"fc1.lora_adapters.b.lora_A", "fc1.lora_adapters.b.lora_B", "head.lora_adapters.b.lora_A"} <= keys
    assert {"fc2.lora_adapters.c.lora_A", "fc2.lora_adapters.c.lora_B"} <= keys
    assert "head.lora_A" not in keys  # head holds only "b"
    assert ours.fc1.peft_tensors()["lora_A.weight"] is ours.fc1.lora_A
    assert ours.fc1.peft_tensors("b")["lora_B.weight"] is ours.fc1.lora_adapters["b"].lora_B
    # a state dict loads into a model built the same way
    twin, _ = build()
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(1.0)
    twin.load_state_dict(ours.state_dict())
    for k, v in ours.state_dict().items():
        assert torch.equal(twin.state_dict()[k], v), k


def test_only_the_active_adapters_train_as_in_peft():
    ours, theirs = build()
    trainable = lambda slots: {k for k, p in params_of(slots).items() if p.requires_grad}  # noqa: E731
    assert trainable(ours_slots(ours)) == trainable(peft_slots(theirs))
    assert all(k[1] == "default" for k in trainable(ours_slots(ours)))
    assert not any(p.requires_grad for n, p in ours.named_parameters() if "lora" not in n)


# -- the forward with one and several active adapters -------------------------------------


@pytest.mark.parametrize(
    "active", [["default"], "b", ["default", "b"], ["b", "c", "default"]], ids=["default", "b", "two", "three"]
)
def test_set_adapter_matches_peft(active):
    ours, theirs = build()
    set_adapter(ours, active)
    theirs.base_model.set_adapter(active)  # PeftModel.set_adapter takes one name; its tuner several
    assert active_adapters(ours) == theirs.base_model.active_adapters
    assert_matches_peft(ours, theirs, x_input(), f"active={active}")


def test_two_adapters_without_dropout_make_one_fused_call(monkeypatch):
    ours, _ = build(2)
    set_adapter(ours, ["default", "b"])
    calls = []
    real = fl_modules.lora_linear
    monkeypatch.setattr(fl_modules, "lora_linear", lambda *a, **k: calls.append(a[2].shape[0]) or real(*a, **k))
    ours(x_input()).sum().backward()
    # fc1 holds both (r 4 + 6 concatenated), fc2 default only, head "b" only
    assert calls == [10, 4, 6]


def test_two_active_adapters_save_x_s_and_the_concatenated_adapters_only():
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    from saved_bytes import record_saved_tensors

    ours, _ = build(2)
    set_adapter(ours, ["default", "b"])
    layer = ours.fc1  # K=24, N=40, r = 4 + 6
    x = torch.randn(37, 24, requires_grad=True)
    rec = record_saved_tensors(lambda: layer(x), exclude=list(layer.parameters()) + list(layer.buffers()))
    # X, S [M, 10] and the concatenated A [10, K] / B [N, 10] (adapter-sized, never [M, N] or [N, K])
    assert rec.nbytes == 4 * (37 * 24 + 37 * 10 + 10 * 24 + 40 * 10), rec.describe()


def test_dropout_masks_are_independent_per_adapter_as_in_peft(monkeypatch):
    torch.manual_seed(0)
    linear = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        linear.weight.zero_()
    layer = LoRALinear.from_linear(linear, r=1, alpha=1.0, dropout=0.5)
    layer.add_adapter("b", r=1, alpha=1.0, dropout=0.5)
    layer.add_adapter("c", r=1, alpha=1.0, dropout=0.0)
    with torch.no_grad():
        for name in ("default", "b", "c"):
            layer.adapter(name).lora_A.fill_(1.0)
            layer.adapter(name).lora_B.fill_(1.0)
    layer.set_adapter(["default", "b"])
    layer.train()
    y = layer(torch.ones(512, 1)).flatten()
    # each adapter adds 0 or 1 / (1 - p) = 2: a shared mask could only give 0 or 4
    assert set(y.tolist()) == {0.0, 2.0, 4.0}
    # adapters without dropout share the fused call; each one with dropout adds its own term
    calls = []
    real = fl_modules.lora_linear
    monkeypatch.setattr(fl_modules, "lora_linear", lambda *a, **k: calls.append((a[2].shape[0], k["dropout"])) or real(*a, **k))
    layer.set_adapter(["default", "b", "c"])
    y = layer(torch.ones(512, 1)).flatten()
    assert calls == [(1, 0.0)] and set(y.tolist()) == {1.0, 3.0, 5.0}
    calls.clear()
    layer.eval()
    assert torch.equal(layer(torch.ones(4, 1)).flatten(), torch.full((4,), 3.0)) and calls == [(3, 0.0)]


def test_training_one_adapter_with_the_others_frozen_matches_peft():
    ours, theirs = build()
    set_adapter(ours, "b")
    theirs.set_adapter("b")
    theirs64 = copy.deepcopy(theirs).double()
    x, target = x_input(), torch.randn(5, 7, 8, generator=torch.Generator().manual_seed(9))
    frozen = {k: p.detach().clone() for k, p in params_of(ours_slots(ours)).items() if k[1] != "b"}
    results = []
    for model, slots_fn, dtype in ((ours, ours_slots, torch.float32), (theirs, peft_slots, torch.float32), (theirs64, peft_slots, torch.float64)):
        params = [p for p in model.parameters() if p.requires_grad]
        assert {k for k, p in params_of(slots_fn(model)).items() if p.requires_grad} == {
            k for k in params_of(slots_fn(model)) if k[1] == "b"
        }
        assert len(params) == 4  # A and B of "b" on fc1 and head, nothing else
        opt = torch.optim.SGD(params, lr=0.5)
        losses = []
        for _ in range(4):
            opt.zero_grad()
            loss = ((model(x.to(dtype)) - target.to(dtype)) ** 2).mean()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        results.append((torch.stack(losses), params_of(slots_fn(model))))
    (l_ours, p_ours), (l32, p32), (l64, p64) = results
    assert_close_to(l_ours, l64, tolerance_2x(l32, l64, torch.float32), "losses")
    for key, p in p_ours.items():
        assert_close_to(p.detach(), p64[key].detach(), tolerance_2x(p32[key].detach(), p64[key].detach(), torch.float32), f"{key}")
    for key, before in frozen.items():
        assert torch.equal(p_ours[key].detach(), before), f"{key} changed although frozen"
    assert not torch.equal(p_ours[("fc1", "b", "B")].detach(), p32[("fc1", "default", "B")].detach())


# -- delete, disable, merge ---------------------------------------------------------------


def test_delete_adapter_matches_peft():
    ours, theirs = build()
    set_adapter(ours, ["default", "b"])
    theirs.base_model.set_adapter(["default", "b"])
    delete_adapter(ours, "b")
    theirs.delete_adapter("b")
    assert active_adapters(ours) == theirs.base_model.active_adapters == ["default"]
    assert adapter_names(ours) == ["default", "c"]
    assert "head.lora_adapters.b.lora_A" not in ours.state_dict()
    assert_matches_peft(ours, theirs, x_input(), "after deleting b")
    # deleting the only active adapter activates the first remaining name, sorted (PEFT's rule)
    with pytest.warns(UserWarning, match="'c'"):
        delete_adapter(ours, "default")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.delete_adapter("default")
    # PEFT's layer that still has adapters activates "c"; its model-level list comes
    # from its first LoRA layer (fc1, now empty: []); fastlora keeps one list, ["c"]
    assert active_adapters(ours) == theirs.base_model.model.fc2.active_adapters == ["c"]
    assert theirs.base_model.active_adapters == []
    assert "fc1.lora_A" not in ours.state_dict() and ours.fc1.adapter_names() == []
    # (PeftModel's own forward now fails: its active_adapter is still the deleted "default")
    assert_matches_peft(ours, theirs.base_model.model, x_input(), "after deleting default")
    with pytest.raises(ValueError, match="no adapter named"):
        delete_adapter(ours, "b")


def test_disable_adapter_gives_the_base_model_and_restores_the_flags():
    ours, theirs = build()
    set_adapter(ours, ["default", "c"])
    theirs.base_model.set_adapter(["default", "c"])
    flags = {k: p.requires_grad for k, p in params_of(ours_slots(ours)).items()}
    x = x_input()
    base = base_net()
    with disable_adapter(ours), theirs.disable_adapter():
        y = ours(x)
        assert torch.equal(y, base(x))  # the same F.linear calls as the base model
        assert_close_to(y, theirs(x), 0.0, "disabled output vs PEFT's")
        assert not any(p.requires_grad for p in params_of(ours_slots(ours)).values())
    assert flags == {k: p.requires_grad for k, p in params_of(ours_slots(ours)).items()}
    assert_matches_peft(ours, theirs, x, "after disable_adapter")


def test_merge_lora_merges_the_active_adapters_as_merge_and_unload():
    ours, theirs = build()
    set_adapter(ours, ["default", "b"])
    theirs.base_model.set_adapter(["default", "b"])
    x = x_input()
    y32 = theirs.merge_and_unload()(x)
    theirs64 = build()[1]
    theirs64.base_model.set_adapter(["default", "b"])
    y64 = theirs64.double().merge_and_unload()(x.double())
    merged = merge_lora(ours)
    assert not named_adapter_layers(merged)
    assert_close_to(merged(x).detach(), y64, tolerance_2x(y32.detach(), y64, torch.float32), "merged")


def test_layer_merge_and_unmerge_use_the_adapters_merged():
    ours, _ = build()
    ours = ours.double()
    set_adapter(ours, ["default", "b"])
    x = x_input().double()
    y = ours(x)
    weight = ours.fc1.weight.detach().clone()
    ours.fc1.merge()
    assert ours.fc1.merged_adapters == ["default", "b"]
    # float64: the merge rounds W + delta once (~1e-16 relative)
    assert_close_to(ours(x), y, 1e-12, "merged fc1")
    with pytest.warns(UserWarning, match="merged"):
        set_adapter(ours, "c")  # PEFT: unmerges first, with a warning
    assert not ours.fc1.merged and ours.fc1.merged_adapters == []
    assert_close_to(ours.fc1.weight, weight, 1e-14, "unmerged weight")


# -- add_weighted_adapter -------------------------------------------------------------------


@pytest.mark.parametrize(
    "combination_type,adapters,weights",
    [("cat", ["default", "b"], [0.7, -1.3]), ("cat", ["b", "default", "c"], [1.0, 0.5, 2.0]), ("linear", ["default", "c"], [0.6, -0.4])],
    ids=["cat", "cat-rslora-first", "linear"],
)
def test_add_weighted_adapter_matches_peft(combination_type, adapters, weights):
    ours, theirs = build()
    add_weighted_adapter(ours, adapters, weights, "mix", combination_type=combination_type)
    theirs.add_weighted_adapter(adapters, weights, "mix", combination_type=combination_type)
    mine, peft_ = ours_slots(ours), peft_slots(theirs)
    assert {k for k in mine if k[1] == "mix"} == {k for k in peft_ if k[1] == "mix"}
    for key in (k for k in mine if k[1] == "mix"):
        layer = named_adapter_layers(ours)[key[0]]
        peft_layer = theirs.get_submodule(PREFIX + key[0])
        assert layer.adapter("mix").scaling == peft_layer.scaling["mix"]
        for ours_t, peft_t in zip(mine[key][2:], peft_[key][2:]):
            assert ours_t.dtype == peft_t.dtype and not ours_t.requires_grad and not peft_t.requires_grad
            assert torch.equal(ours_t, peft_t), f"{key}: combined adapter differs from PEFT's"
    set_adapter(ours, "mix")
    theirs.set_adapter("mix")
    assert_matches_peft(ours, theirs, x_input(), f"{combination_type} {adapters}")


def test_add_weighted_adapter_cat_is_the_weighted_sum():
    ours, _ = build()
    x = x_input()
    set_adapter(ours, "default")
    y_default = ours.fc1(x) - ours.fc1._base_forward(x)
    set_adapter(ours, "b")
    y_b = ours.fc1(x) - ours.fc1._base_forward(x)
    add_weighted_adapter(ours, ["default", "b"], [0.25, 2.0], "mix", combination_type="cat")
    set_adapter(ours, "mix")
    y_mix = ours.fc1(x) - ours.fc1._base_forward(x)
    # fp32, terms ~1: the combined adapter sums the same products in another order
    assert_close_to(y_mix, 0.25 * y_default + 2.0 * y_b, 1e-5, "cat = weighted sum")


def test_add_weighted_adapter_refusals():
    ours, _ = build()
    with pytest.raises(NotImplementedError, match="svd"):
        add_weighted_adapter(ours, ["default", "b"], [1.0, 1.0], "mix", combination_type="svd")
    with pytest.raises(ValueError, match="equal ranks"):
        add_weighted_adapter(ours, ["default", "b"], [1.0, 1.0], "mix", combination_type="linear")
    with pytest.raises(ValueError, match="already has"):
        add_weighted_adapter(ours, ["default", "b"], [1.0, 1.0], "c")
    with pytest.raises(ValueError, match="one per adapter"):
        add_weighted_adapter(ours, ["default", "b"], [1.0], "mix")
    with pytest.raises(ValueError, match="no adapter named"):
        add_weighted_adapter(ours, ["default", "zz"], [1.0, 1.0], "mix")


# -- mixed batches --------------------------------------------------------------------------


def test_mixed_batch_matches_peft_adapter_names():
    ours, theirs = build()
    ours.eval()
    theirs.eval()
    names = ["b", "__base__", "default", "b", "c", "default"]
    x = x_input(rows=len(names))
    with torch.no_grad():
        y32 = theirs(x, adapter_names=names)
        y64 = copy.deepcopy(theirs).double()(x.double(), adapter_names=names)
        with mixed_batch(ours, names):
            y = ours(x)
    assert_close_to(y, y64, tolerance_2x(y32, y64, torch.float32), "mixed batch")
    # row by row, each is the model with that adapter alone
    for i, name in enumerate(names):
        if name == "__base__":
            with disable_adapter(ours):
                want = ours(x[i : i + 1])
        else:
            set_adapter(ours, name)
            want = ours(x[i : i + 1])
        # fp32, outputs ~1: the same op on one row may round differently (BLAS blocking): a few ulps
        assert_close_to(y[i : i + 1], want, 1e-6, f"row {i} ({name})")
    # hooks are gone after the block
    set_adapter(ours, "default")
    assert torch.equal(ours(x), ours.head(torch.tanh(ours.fc2(torch.tanh(ours.fc1(x))))))


def test_mixed_batch_errors_follow_peft():
    # NOTE: PEFT refuses adapter_names in training mode; fastlora allows it (per-row
    # training, tests/test_mixed_training.py)
    ours, _ = build()
    ours.eval()
    with pytest.raises(ValueError, match="no adapter named"):
        with mixed_batch(ours, ["b", "nope"]):
            pass
    with pytest.raises(ValueError, match="one name per row"):
        with mixed_batch(ours, ["b", "c"]):
            ours(x_input(rows=3))
    ours.fc1.merge()
    with pytest.raises(ValueError, match="merged"):
        ours.fc1(x_input(rows=1), adapter_names=["b"])


def test_gather_adapter_ids_gives_the_multi_op_operands():
    ours, _ = build()
    names, ids = ours.head.gather_adapter_ids(["default", "b", "__base__", "b", "c"])
    assert names == ["b"] and ids.tolist() == [-1, 0, -1, 0, -1]  # head lacks default and c


# -- QLoRA ----------------------------------------------------------------------------------


def test_qlora_layers_with_two_adapters_match_peft_on_the_dequantized_weight():
    torch.manual_seed(0)
    ours = nn.Sequential(nn.Linear(128, 64))
    apply_lora(ours, r=8, alpha=16.0, quantize="nf4")
    add_adapter(ours, "b", LoRAConfig(r=4, alpha=2.0, target_modules=["0"]))
    layer = ours[0]
    assert isinstance(layer, fastlora.QLoRALinear) and layer.adapter_names() == ["default", "b"]
    base = nn.Linear(128, 64)
    with torch.no_grad():
        base.weight.copy_(dequantize_4bit(layer.qweight, torch.float32))
        base.bias.copy_(layer.bias)
    theirs = peft.get_peft_model(nn.Sequential(base), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["0"]))
    theirs.add_adapter("b", peft.LoraConfig(r=4, lora_alpha=2, target_modules=["0"]))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for (_, _, A, B) in ours_slots(ours).values():
            A.copy_(torch.randn(A.shape, generator=g) / 8)
            B.copy_(torch.randn(B.shape, generator=g) / 4)
    copy_into_peft(ours, theirs)
    set_adapter(ours, ["default", "b"])
    theirs.base_model.set_adapter(["default", "b"])
    x = torch.randn(3, 5, 128, generator=g)
    dy = torch.randn(3, 5, 64, generator=g)
    y, dx, grads = run(ours, ours_slots, x, dy)
    y32, dx32, g32 = run(theirs, peft_slots, x, dy)
    theirs64 = copy.deepcopy(theirs).double()
    y64, dx64, g64 = run(theirs64, peft_slots, x.double(), dy.double())
    assert set(grads) == set(g32) and len(grads) == 4
    assert_close_to(y, y64, tolerance_2x(y32, y64, torch.float32), "qlora y")
    assert_close_to(dx, dx64, tolerance_2x(dx32, dx64, torch.float32), "qlora dx")
    for key in grads:
        assert_close_to(grads[key], g64[key], tolerance_2x(g32[key], g64[key], torch.float32), f"qlora {key}")
    ours.eval()
    theirs.eval()
    names = ["b", "__base__", "default"]
    with torch.no_grad(), mixed_batch(ours, names):
        ym = ours(x)
    ym32 = theirs(x, adapter_names=names).detach()
    ym64 = theirs64.eval()(x.double(), adapter_names=names).detach()
    assert_close_to(ym, ym64, tolerance_2x(ym32, ym64, torch.float32), "qlora mixed batch")
    # to_linear merges the active adapters onto the dequantized weight, as PEFT's merge_and_unload
    merged = layer.to_linear(torch.float32)
    theirs.base_model.set_adapter(["default", "b"])
    theirs64.base_model.set_adapter(["default", "b"])
    ymerged32 = copy.deepcopy(theirs).merge_and_unload()(x).detach()
    ymerged64 = theirs64.merge_and_unload()(x.double()).detach()
    tol = tolerance_2x(ymerged32, ymerged64, torch.float32)
    assert_close_to(merged(x).detach(), ymerged64, tol, "qlora to_linear")


# -- deepcopy, errors ------------------------------------------------------------------------


def test_deepcopy_of_a_model_with_several_adapters_runs_its_own_weights():
    ours, _ = build()
    set_adapter(ours, ["default", "b", "c"])
    x = x_input()
    y0 = ours(x).detach()
    clone = copy.deepcopy(ours)
    assert active_adapters(clone) == ["default", "b", "c"]
    ids = {id(p) for p in ours.parameters()}
    assert not any(id(p) in ids for p in clone.parameters())
    with torch.no_grad():
        ours.fc1.lora_adapters["b"].lora_B.add_(1.0)
        ours.fc2.lora_adapters["c"].lora_A.add_(1.0)
    assert torch.equal(clone(x), y0)
    assert not torch.allclose(ours(x), y0)
    set_adapter(clone, "c")
    assert active_adapters(ours) == ["default", "b", "c"]


def test_unsupported_layers_are_refused_by_name():
    dora = apply_lora(base_net(), target_modules=["fc1"], use_dora=True)
    with pytest.raises(NotImplementedError, match=r"fc1.*DoRA"):
        add_adapter(dora, "b", LoRAConfig(target_modules=["fc2"]))
    with pytest.raises(NotImplementedError, match=r"fc1.*DoRA"):
        set_adapter(dora, "default")
    vera = fastlora.apply_vera(base_net(), fastlora.VeRAConfig(r=4, target_modules=["fc1"]))
    with pytest.raises(NotImplementedError, match=r"fc1.*VeRA"):
        disable_adapter(vera).__enter__()
    emb = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8))
    apply_lora(emb, target_modules=["0", "1"])
    with pytest.raises(NotImplementedError, match=r"LoRAEmbedding"):
        active_adapters(emb)
    plain = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8))
    with pytest.raises(NotImplementedError, match=r"'0' is a Embedding"):
        add_adapter(plain, "b", LoRAConfig(target_modules=["0"]))
    with pytest.raises(NotImplementedError, match="DoRA"):
        add_adapter(base_net(), "b", LoRAConfig(use_dora=True))


def test_argument_errors_are_clear():
    ours, _ = build(2)
    with pytest.raises(ValueError, match="already has an adapter named 'b'"):
        add_adapter(ours, "b", LoRAConfig(target_modules=["fc2"]))
    for bad in ("", "a.b", "__base__", 3):
        with pytest.raises(ValueError, match="non-empty string"):
            add_adapter(ours, bad, LoRAConfig(target_modules=["fc2"]))
    with pytest.raises(ValueError, match=r"no adapter named \['zz'\]"):
        set_adapter(ours, ["default", "zz"])
    with pytest.raises(TypeError, match="adapter name"):
        set_adapter(ours, 3)
    with pytest.raises(NotImplementedError, match="rewrites the base weight"):
        add_adapter(ours, "p", LoRAConfig(target_modules=["fc1"], init="pissa"))
    assert adapter_names(ours) == ["default", "b"]  # nothing was added by the failures


def test_add_adapter_on_a_plain_model_and_a_bare_layer():
    model = base_net()
    add_adapter(model, "x", LoRAConfig(r=2, target_modules=["fc1"]))
    assert adapter_names(model) == ["x"] and active_adapters(model) == ["default"]
    x = x_input()
    assert torch.equal(model(x), base_net()(x))  # "x" is not active: the base model
    assert not any(p.requires_grad for p in model.parameters())
    set_adapter(model, "x")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "fc1.lora_adapters.x.lora_A",
        "fc1.lora_adapters.x.lora_B",
    }
    layer = LoRALinear(8, 8, r=2)
    add_adapter(layer, "y", LoRAConfig(r=3))
    assert layer.adapter_names() == ["default", "y"] and layer.adapter("y").r == 3


def test_bf16_base_gets_fp32_adapters_as_peft_autocasts():
    model = base_net().to(torch.bfloat16)
    apply_lora(model, target_modules=["fc1"])
    add_adapter(model, "b", LoRAConfig(target_modules=["fc1", "fc2"]))
    assert model.fc1.lora_adapters["b"].lora_A.dtype == torch.float32
    assert model.fc2.lora_adapters["b"].lora_B.dtype == torch.float32
    set_adapter(model, ["default", "b"])
    assert model(x_input().to(torch.bfloat16)).dtype == torch.bfloat16


def test_named_adapters_save_and_load_in_peft_format(tmp_path):
    """save_adapter(adapter_name=...) writes one named adapter as PEFT does;
    load_adapter(adapter_name=...) adds it to layers that keep their others;
    PEFT's load_adapter of the same file gives the same outputs."""
    import fastlora
    from fastlora import adapters

    peft = pytest.importorskip("peft")
    def base():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))

    model = fastlora.apply_lora(base(), r=2, alpha=4.0)
    adapters.add_adapter(model, "other", fastlora.LoRAConfig(r=3, alpha=6.0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    fastlora.save_adapter(model, tmp_path / "other", adapter_name="other")
    fastlora.save_adapter(model, tmp_path / "default")
    with pytest.raises(ValueError, match="no LoRA layer of the model has an adapter named 'nope'"):
        fastlora.save_adapter(model, tmp_path / "nope", adapter_name="nope")
    x = torch.randn(5, 12)
    adapters.set_adapter(model, "other")
    want_other = model.eval()(x)
    adapters.set_adapter(model, "default")
    want_default = model(x)
    # ours: a model with the default adapter gets "other" from the file, keeping default
    ours = fastlora.load_adapter(base(), tmp_path / "default")
    fastlora.load_adapter(ours, tmp_path / "other", adapter_name="other")
    ours.eval()
    torch.testing.assert_close(ours(x), want_default, rtol=0, atol=1e-6)  # loaded "other" is inactive
    assert not any(p.requires_grad for n, p in ours.named_parameters() if "lora_adapters.other" in n)
    adapters.set_adapter(ours, "other")
    torch.testing.assert_close(ours(x), want_other, rtol=0, atol=1e-6)  # the same weights and ops
    # PEFT loading the same two files
    theirs = peft.PeftModel.from_pretrained(base(), str(tmp_path / "default"))
    theirs.load_adapter(str(tmp_path / "other"), adapter_name="other")
    theirs.set_adapter("other")
    torch.testing.assert_close(theirs.eval()(x), want_other, rtol=0, atol=1e-5)  # PEFT's op order: fp32 rounding
