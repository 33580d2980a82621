"""Mixed batches through the multi-adapter op, and per-row training.

A layer's mixed batch (``layer(x, adapter_names=[...])``) runs one
``lora_linear_multi`` call on LoRALinear (the adapters stacked and zero-padded to
the largest rank) and the per-adapter loop where the op cannot express the batch.
Oracles: the float64 formula row by row (``y[m] = x[m] W^T + b + s_a x[m] A_a^T
B_a^T``, float64 autograd for the gradients), and training each adapter alone on
its own rows through the single-adapter op (a different op and different GEMM
shapes). PEFT parity of the same forward is in tests/test_named_adapters.py.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn

import fastlora
import fastlora.modules as fl_modules
from fastlora import LoRAConfig, LoRALinear, apply_lora
from fastlora.adapters import (
    MultiAdapterModel,
    add_adapter,
    mixed_batch,
    named_adapter_layers,
    set_adapter,
    trainable_adapters,
)

from _oracles import assert_close_to

# (name, r, alpha, use_rslora): different ranks (padding) and rsLoRA (its own scaling)
SPECS = [("default", 4, 8.0, False), ("b", 6, 3.0, True), ("c", 2, 5.0, False)]


def layer_with_adapters(dtype=torch.float32, dropouts=(0.0, 0.0, 0.0), seed=0) -> LoRALinear:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layer = LoRALinear(24, 16, r=SPECS[0][1], alpha=SPECS[0][2], dropout=dropouts[0], dtype=dtype)
    for (name, r, alpha, rs), p in zip(SPECS[1:], dropouts[1:]):
        layer.add_adapter(name, r=r, alpha=alpha, use_rslora=rs, dropout=p)
    with torch.no_grad():
        layer.bias.copy_(torch.randn(16, generator=g))
        for name in layer.adapter_names():
            s = layer.adapter(name)
            s.lora_A.copy_(torch.randn(s.lora_A.shape, generator=g) / 5)
            s.lora_B.copy_(torch.randn(s.lora_B.shape, generator=g) / 2)
    layer.set_adapter(layer.adapter_names())  # every adapter trainable
    return layer


def float64_rows(layer: LoRALinear, x, names, dy):
    """Output, dx and each adapter's (dA, dB) of the per-row formula in float64 autograd."""
    x64 = x.detach().double().requires_grad_(True)
    params = {}
    for n in layer.adapter_names():
        s = layer.adapter(n)
        params[n] = (s.lora_A.detach().double().requires_grad_(True), s.lora_B.detach().double().requires_grad_(True))
    w, b = layer.weight.double(), layer.bias.double()
    rows = []
    for m, name in enumerate(names):
        y = x64[m] @ w.t() + b
        if name in params:
            A, B = params[name]
            y = y + layer.adapter(name).scaling * (x64[m] @ A.t()) @ B.t()
        rows.append(y)
    y = torch.stack(rows)
    y.backward(dy.double())
    return y.detach(), x64.grad, {n: (A.grad, B.grad) for n, (A, B) in params.items()}


def run_layer(layer, x, names, dy):
    x = x.clone().requires_grad_(True)
    for n in layer.adapter_names():
        s = layer.adapter(n)
        s.lora_A.grad = s.lora_B.grad = None
    y = layer(x, adapter_names=names)
    y.backward(dy)
    return y.detach(), x.grad, {n: (layer.adapter(n).lora_A.grad, layer.adapter(n).lora_B.grad) for n in layer.adapter_names()}


def count_calls(monkeypatch, name):
    calls = []
    original = getattr(fl_modules, name)
    monkeypatch.setattr(fl_modules, name, lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


NAMES = ["b", "__base__", "default", "b", "c", "nope", "default", "c"]  # "nope": a name the layer lacks -> base


def test_mixed_batch_is_one_multi_op_call_matching_the_float64_rows(monkeypatch):
    """Output, dx and every adapter's gradient (exactly the sum over its rows) against
    float64; x with a sequence dimension (the ids expand over it)."""
    layer = layer_with_adapters().train()
    multi = count_calls(monkeypatch, "lora_linear_multi")
    single = count_calls(monkeypatch, "lora_linear")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(len(NAMES), 3, 24, generator=g)
    dy = torch.randn(len(NAMES), 3, 16, generator=g)
    y, dx, grads = run_layer(layer, x, NAMES, dy)
    assert (len(multi), len(single)) == (1, 0)
    y64, dx64, g64 = float64_rows(layer, x, NAMES, dy)
    # fp32 sums of <= 24 + 6 products of O(1) terms, outputs O(5): a few ulps of the largest value
    # (the float64 oracle's rounding is negligible); 16 ulps bounds the reassociation of the GEMMs
    eps = torch.finfo(torch.float32).eps
    assert_close_to(y, y64, 16 * eps * y64.abs().max().item(), "y")
    assert_close_to(dx, dx64, 16 * eps * dx64.abs().max().item(), "dx")
    for n, (dA, dB) in grads.items():
        for what, got, want in (("dA", dA, g64[n][0]), ("dB", dB, g64[n][1])):
            # sums over <= 2 rows x 3 positions x 16 outputs: the same ulp budget at the gradient's scale
            assert_close_to(got, want, 16 * eps * want.abs().max().item() + 1e-30, f"{n} {what}")


def test_one_adapter_without_base_rows_is_the_single_adapter_call(monkeypatch):
    layer = layer_with_adapters()
    multi = count_calls(monkeypatch, "lora_linear_multi")
    x = torch.randn(3, 24)
    y = layer(x, adapter_names=["b"] * 3)
    assert len(multi) == 0
    layer.set_adapter("b")
    assert torch.equal(y, layer(x))  # the very same call


def test_no_adapter_rows_is_the_base_layer():
    layer = layer_with_adapters()
    x = torch.randn(3, 24)
    assert torch.equal(layer(x, adapter_names=["__base__", "nope", "__base__"]), nn.functional.linear(x, layer.weight, layer.bias))


def test_frozen_adapters_and_adapters_without_rows_get_no_gradient():
    layer = layer_with_adapters().train()
    layer.adapter("c").lora_A.requires_grad_(False)
    layer.adapter("c").lora_B.requires_grad_(False)
    x = torch.randn(4, 24)
    _, _, grads = run_layer(layer, x, ["c", "b", "c", "__base__"], torch.randn(4, 16))
    assert grads["c"] == (None, None)
    assert grads["default"] == (None, None)  # not in the batch: not in the graph (as in PEFT's loop)
    assert torch.count_nonzero(grads["b"][0]) > 0


def test_different_dropouts_in_training_keep_the_loop_each_row_its_own_adapters_dropout(monkeypatch):
    layer = layer_with_adapters(dropouts=(0.0, 0.5, 0.0)).train()
    multi = count_calls(monkeypatch, "lora_linear_multi")
    single = count_calls(monkeypatch, "lora_linear")
    x = torch.randn(4, 24)
    layer(x, adapter_names=["b", "default", "b", "c"])
    assert (len(multi), len(single)) == (0, 3)  # one call per adapter, each with its own p
    # eval: dropout is off, the op expresses the batch
    y = layer.eval()(x, adapter_names=["b", "default", "b", "c"])
    assert len(multi) == 1
    y64, _, _ = float64_rows(layer, x, ["b", "default", "b", "c"], torch.zeros(4, 16))
    assert_close_to(y, y64, 16 * torch.finfo(torch.float32).eps * y64.abs().max().item(), "eval y")


def test_equal_dropouts_in_training_use_the_op_with_that_probability(monkeypatch):
    layer = layer_with_adapters(dropouts=(0.25, 0.25, 0.25)).train()
    seen = []
    original = fl_modules.lora_linear_multi
    monkeypatch.setattr(fl_modules, "lora_linear_multi", lambda *a, **k: seen.append(k["dropout"]) or original(*a, **k))
    layer(torch.randn(4, 24), adapter_names=["b", "default", "b", "c"])
    assert seen == [0.25]


def test_adapters_of_different_dtypes_keep_the_loop(monkeypatch):
    """A bf16 adapter and an fp32 one on a bf16 base: each keeps the single-adapter
    call's dtype rule (its LoRA branch in its own dtype), so the batch is looped."""
    torch.manual_seed(0)
    layer = LoRALinear(24, 16, r=4, dtype=torch.bfloat16)
    layer.add_adapter("b", r=2, dtype=torch.float32)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_adapters["b"].lora_B.normal_()
    multi = count_calls(monkeypatch, "lora_linear_multi")
    x = torch.randn(2, 24).to(torch.bfloat16)
    y = layer(x, adapter_names=["b", "default"])
    assert len(multi) == 0
    layer.set_adapter("b")
    assert torch.equal(y[:1], layer(x[:1]))
    layer.set_adapter("default")
    assert torch.equal(y[1:], layer(x[1:]))


def test_float64_adapters_with_a_scale_inexact_in_float32_keep_the_loop(monkeypatch):
    layer = layer_with_adapters(dtype=torch.float64)  # "b": rsLoRA 3 / sqrt(6), not a float32
    multi = count_calls(monkeypatch, "lora_linear_multi")
    x = torch.randn(len(NAMES), 24, dtype=torch.float64)
    y = layer(x, adapter_names=NAMES)
    assert len(multi) == 0
    y64, _, _ = float64_rows(layer, x, NAMES, torch.zeros(len(NAMES), 16))
    assert_close_to(y, y64, 1e-13, "float64 y")  # float64 sums of ~30 O(1) terms
    layer.adapter("b").scaling = 0.5  # exact in float32: the op
    layer(x, adapter_names=NAMES)
    assert len(multi) == 1


def test_qlora_mixed_batch_is_one_multi_op_call_on_the_4bit_base(monkeypatch):
    """QLoRALinear's mixed batch: one ``qlora_linear_multi`` call, output and each
    adapter's gradients equal to the float64 per-row formula on the dequantized weight
    (the dequantization itself is checked against bitsandbytes in tests/test_quant.py)."""
    import fastlora.qlora as fl_qlora

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32))
    apply_lora(model, r=4, alpha=8.0, quantize="nf4")
    add_adapter(model, "b", LoRAConfig(r=2, alpha=2.0, target_modules=["0"]))
    layer = model[0]
    with torch.no_grad():
        for name in layer.adapter_names():
            layer.adapter(name).lora_B.normal_(0, 0.5)
    layer.set_adapter(layer.adapter_names())
    calls = []
    original = fl_qlora.qlora_linear_multi
    monkeypatch.setattr(fl_qlora, "qlora_linear_multi", lambda *a, **k: calls.append(1) or original(*a, **k))
    names = ["b", "default", "__base__", "b", "default"]
    x = torch.randn(len(names), 64)
    dy = torch.randn(len(names), 32)
    y = layer(x, adapter_names=names)
    y.backward(dy)
    assert len(calls) == 1
    w = fastlora.quant.dequantize_4bit(layer.qweight, torch.float64)
    x64 = x.double()
    params = {n: (layer.adapter(n).lora_A.detach().double().requires_grad_(True),
                  layer.adapter(n).lora_B.detach().double().requires_grad_(True)) for n in layer.adapter_names()}  # fmt: skip
    rows = []
    for m, name in enumerate(names):
        row = x64[m] @ w.t() + layer.bias.double()
        if name in params:
            A, B = params[name]
            row = row + layer.adapter(name).scaling * (x64[m] @ A.t()) @ B.t()
        rows.append(row)
    y64 = torch.stack(rows)
    y64.backward(dy.double())
    # fp32 sums of 64 products, |y| = O(10): 64 ulps of the largest value bounds the reassociation
    eps = torch.finfo(torch.float32).eps
    assert_close_to(y, y64, 64 * eps * y64.abs().max().item(), "y")
    for n, (A, B) in params.items():
        for what, got, want in (("dA", layer.adapter(n).lora_A.grad, A.grad), ("dB", layer.adapter(n).lora_B.grad, B.grad)):
            assert_close_to(got, want, 64 * eps * want.abs().max().item(), f"{n} {what}")


# -- per-row training: MultiAdapterModel, trainable_adapters, mixed_batch in training ---------

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(24, 40)
        self.fc2 = nn.Linear(40, 16)
        self.head = nn.Linear(16, 8)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


TRAINED = ["default", "b", "c"]
ROWS = ["b", "default", "c", "__base__", "b", "d", "c", "default"]  # "d": a frozen adapter that has rows


def multi_adapter_net(dtype=torch.float64) -> nn.Module:
    """Four adapters of different ranks / targets / rsLoRA (b and c miss some layers:
    those layers compute their base for b's / c's rows); every lora_B non-zero. The
    scales (2, 0.5, 2.5, 1) are exact in float32, so float64 runs take the multi op."""
    torch.manual_seed(0)
    model = apply_lora(Net().to(dtype), LoRAConfig(r=4, alpha=8.0, target_modules=["fc1", "fc2"]))
    add_adapter(model, "b", LoRAConfig(r=6, alpha=3.0, target_modules=["fc1", "head"]))
    add_adapter(model, "c", LoRAConfig(r=4, alpha=5.0, use_rslora=True, target_modules=["fc2"]))
    add_adapter(model, "d", LoRAConfig(r=2, alpha=2.0, target_modules=["fc1", "fc2", "head"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) / 4)
    return model


def lora_state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def data(dtype=torch.float64):
    g = torch.Generator().manual_seed(2)
    return torch.randn(len(ROWS), 3, 24, generator=g, dtype=dtype), torch.randn(len(ROWS), 3, 8, generator=g, dtype=dtype)


OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=0.01),
    "adam": lambda params: torch.optim.Adam(params, lr=0.01),
}


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_training_adapters_on_a_mixed_batch_equals_training_each_alone_on_its_rows(opt, monkeypatch):
    """The loss is a sum over rows, so each adapter's gradient is the sum over its own
    rows and SGD / Adam (per-parameter state) step each adapter as if alone."""
    multi = count_calls(monkeypatch, "lora_linear_multi")
    x, t = data()
    steps = 3
    mixed = multi_adapter_net()
    before = lora_state(mixed)
    wrapped = MultiAdapterModel(mixed).train()
    optimizer = OPTIMIZERS[opt](trainable_adapters(mixed, TRAINED))
    for _ in range(steps):
        optimizer.zero_grad()
        ((wrapped(x, adapter_names=ROWS) - t) ** 2).sum().backward()
        optimizer.step()
    assert len(multi) == 3 * steps  # every layer, every step: one multi-adapter call
    # the oracle: each adapter alone (the single-adapter op) on its own rows, same optimizer
    alone = multi_adapter_net()
    for name in TRAINED:
        set_adapter(alone, name)
        optimizer = OPTIMIZERS[opt](trainable_adapters(alone, [name]))
        rows = [i for i, n in enumerate(ROWS) if n == name]
        for _ in range(steps):
            optimizer.zero_grad()
            ((alone(x[rows]) - t[rows]) ** 2).sum().backward()
            optimizer.step()
    got, want = lora_state(mixed), lora_state(alone)
    assert set(got) == set(want)
    for n in got:
        if "lora_adapters.d." in n:
            assert torch.equal(got[n], before[n]), f"frozen adapter d changed: {n}"
        else:
            assert not torch.equal(got[n], before[n]), f"{n} did not train"
        # float64: the two runs differ only in summation order (one multi-adapter op vs the
        # single-adapter op on row subsets), ~1e-16 relative per step; 1e-12 leaves room for
        # 3 steps of Adam's division by sqrt(v) on parameters of size O(1)
        assert_close_to(got[n], want[n], 1e-12, n)
    assert not any(layer._forward_pre_hooks for layer in named_adapter_layers(mixed).values())  # hooks removed


def test_adapter_ids_are_indices_into_names_and_match_adapter_names():
    model = multi_adapter_net().eval()
    wrapped = MultiAdapterModel(model, ["c", "b", "d", "default"])
    x, _ = data()
    ids = torch.tensor([1, 3, 0, -1, 1, 2, 0, 3])
    assert wrapped.names_of(ids) == ROWS
    with torch.no_grad():
        y_ids = wrapped(x, adapter_ids=ids)
        y_names = wrapped(x, adapter_names=ROWS)
        with mixed_batch(model, ROWS):
            y_ctx = model(x)
        y_plain = wrapped(x)  # neither: the active adapters ("default")
    assert torch.equal(y_ids, y_names) and torch.equal(y_names, y_ctx)
    assert torch.equal(y_plain, model(x))


def test_bad_names_ids_and_shapes_are_clear_errors():
    model = multi_adapter_net()
    wrapped = MultiAdapterModel(model, ["b", "c"])
    x, _ = data()
    with pytest.raises(ValueError, match=r"no adapter named \['nope'\]"):
        MultiAdapterModel(model, ["b", "nope"])
    with pytest.raises(ValueError, match="distinct"):
        MultiAdapterModel(model, ["b", "b"])
    with pytest.raises(ValueError, match="no LoRA layers"):
        MultiAdapterModel(Net())
    with pytest.raises(ValueError, match=r"no adapter named \['zz'\]"):
        wrapped(x, adapter_names=["zz"] * len(ROWS))
    with pytest.raises(ValueError, match=r"one name per row of x's first dimension \(8\), got 3 names"):
        wrapped(x, adapter_names=["b", "c", "b"])
    with pytest.raises(TypeError, match="one adapter name per row, got the string 'b'"):
        wrapped(x, adapter_names="b")
    with pytest.raises(ValueError, match="not both"):
        wrapped(x, adapter_names=ROWS, adapter_ids=torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"must be in \[-1, 2\) .* got \[2, 5\]"):
        wrapped(x, adapter_ids=torch.tensor([0, 1, 2, 5, 0, 0, 0, 0]))
    with pytest.raises(TypeError, match="integer tensor, got dtype=torch.float32"):
        wrapped(x, adapter_ids=torch.zeros(8))
    with pytest.raises(ValueError, match=r"shape \[batch\].*got \[2, 4\]"):
        wrapped(x, adapter_ids=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="list of ints"):
        wrapped(x, adapter_ids=[0, 1.0])
    with pytest.raises(ValueError, match="batch dimension"):
        model.fc1(torch.randn(24, dtype=torch.float64), adapter_names=["b"])


def test_after_mixed_training_deepcopy_state_dict_and_save_adapter_still_work(tmp_path):
    model = multi_adapter_net()
    wrapped = MultiAdapterModel(model).train()
    optimizer = torch.optim.SGD(trainable_adapters(model, TRAINED), lr=0.1)
    x, t = data()
    ((wrapped(x, adapter_names=ROWS) - t) ** 2).sum().backward()
    optimizer.step()
    wrapped.eval()
    with torch.no_grad():
        want = wrapped(x, adapter_names=ROWS)
        twin = copy.deepcopy(wrapped)
        assert torch.equal(twin(x, adapter_names=ROWS), want)
        assert set(wrapped.state_dict()) == {"model." + k for k in model.state_dict()}
        fresh = multi_adapter_net()
        fresh.load_state_dict(model.state_dict())
        assert torch.equal(MultiAdapterModel(fresh)(x, adapter_names=ROWS), want)
        fastlora.save_adapter(model, tmp_path / "b", adapter_name="b")
    # the saved adapter "b" alone reproduces the rows of b, on the same base weights
    torch.manual_seed(0)
    base = Net().double()
    loaded = fastlora.load_adapter(base, tmp_path / "b", adapter_name="b")
    set_adapter(loaded, "b")
    rows = [i for i, n in enumerate(ROWS) if n == "b"]
    with torch.no_grad():
        # float64 throughout: the same math through the single-adapter op on a row subset
        assert_close_to(loaded.eval()(x[rows]), want[rows], 1e-12, "saved adapter b")


def test_threads_run_their_own_mixed_batches_on_one_model():
    """The names a mixed_batch block injects apply to its own thread's forwards only."""
    model = multi_adapter_net().eval()
    wrapped = MultiAdapterModel(model)
    x, _ = data()
    plans = [ROWS, list(reversed(ROWS)), ["c"] * len(ROWS)]
    with torch.no_grad():
        want = [wrapped(x, adapter_names=p) for p in plans]
    barrier = threading.Barrier(len(plans))
    errors = []

    def work(i):
        try:
            barrier.wait()
            for _ in range(30):
                with torch.no_grad():
                    if not torch.equal(wrapped(x, adapter_names=plans[i]), want[i]):
                        errors.append(i)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(plans))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []


def test_training_mixed_batch_refuses_gradient_checkpointing():
    """A recompute during backward runs after the block has exited (the rows' names
    gone): refused in training, as transformers' models flag it; eval is fine."""
    model = multi_adapter_net(torch.float32)
    model.fc2.gradient_checkpointing = True  # what transformers' gradient_checkpointing_enable() sets
    model.train()
    with pytest.raises(ValueError, match="'fc2' has gradient checkpointing enabled"):
        with mixed_batch(model, ROWS):
            pass
    model.eval()
    with mixed_batch(model, ROWS):
        model(torch.randn(len(ROWS), 24))


def test_adapter_files_of_the_wrapper_are_the_wrapped_models(tmp_path):
    """save_adapter / load_adapter given a MultiAdapterModel use the wrapped model's
    module names: the same bytes as saving the model itself, loadable without it."""
    model = multi_adapter_net()
    wrapped = MultiAdapterModel(model)
    fastlora.save_adapter(wrapped, tmp_path / "via_wrapper", adapter_name="b")
    fastlora.save_adapter(model, tmp_path / "direct", adapter_name="b")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "via_wrapper" / name).read_bytes() == (tmp_path / "direct" / name).read_bytes()
    torch.manual_seed(0)
    other = MultiAdapterModel(apply_lora(Net().double(), r=2, target_modules=["fc1"]))
    assert fastlora.load_adapter(other, tmp_path / "direct", adapter_name="b") is other
    for name, layer in named_adapter_layers(model).items():
        if layer.has_adapter("b"):
            got = named_adapter_layers(other.model)[name].adapter("b")
            assert torch.equal(got.lora_A, layer.adapter("b").lora_A) and torch.equal(got.lora_B, layer.adapter("b").lora_B)
