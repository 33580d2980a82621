"""from_peft: a PeftModel's LoRA layers on fastlora's fused ops, against PEFT itself.

Parity: the same PeftModel twice (a deep copy before from_peft), fp32, outputs
and every trainable gradient within 2x PEFT's own fp32 error against PEFT in
float64 (the project's rule, ``_oracles.tolerance_2x``), and the calls counted
as fused. Fallbacks: PEFT's own forward, so results are identical (bit for bit)
and the reason is counted.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

import fastlora
import fastlora.peft_model as peft_model

from _oracles import assert_close_to, tolerance_2x

peft = pytest.importorskip("peft", reason="needs peft (pip install 'fastlora[test]')")

TARGETS = ["0", "2"]


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 12))


def conv1d_mlp():
    """GPT-2's layer kind: transformers Conv1D (weight [in, out]), PEFT's fan_in_fan_out."""
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    torch.manual_seed(0)
    return nn.Sequential(pytorch_utils.Conv1D(24, 16), nn.ReLU(), pytorch_utils.Conv1D(12, 24))


def randomize(model, seed=1):
    """Non-trivial values for every adapter tensor, so every gradient path is live."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("lora_B", "lora_E", "lora_diag")):
                p.normal_(0, 0.3)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn_like(p))
    return model


def peft_mlp(config=None, base=mlp, **kwargs):
    config = config or peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes (fan_in_fan_out on Conv1D, ...)
        return peft.get_peft_model(base(), config)


def add_adapter(model, name, **kwargs):
    kwargs = {"r": 2, "lora_alpha": 3, "target_modules": TARGETS, **kwargs}
    model.add_adapter(name, peft.LoraConfig(**kwargs))


def grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def forward_backward(model, x, seed=7):
    out = model(x)
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out.dtype)
    out.backward(dy)
    return out.detach(), grads(model)


def fused_twin(ref):
    """A deep copy of ``ref`` on fastlora's ops (counts reset)."""
    ours = copy.deepcopy(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error", peft_model.PeftFallbackWarning)
        fastlora.from_peft(ours)
    peft_model.reset_fallback_counts(ours)
    return ours


def assert_parity(ref, ours, x, what="", dtype=torch.float32):
    """ours against PEFT in float64 within 2x PEFT's own error (its computation in ``dtype``,
    x's dtype); outputs and every trainable gradient."""
    ref64 = copy.deepcopy(ref).double()
    out32, g32 = forward_backward(ref, x)
    out64, g64 = forward_backward(ref64, x.double())
    outF, gF = forward_backward(ours, x)
    assert outF.dtype == out32.dtype
    assert_close_to(outF, out64, tolerance_2x(out32, out64, dtype), f"{what} output")
    assert g32.keys() == gF.keys() and g32
    for name in g32:
        if g32[name] is None:
            assert gF[name] is None, name
            continue
        assert gF[name] is not None, f"{what} {name}: no gradient"
        assert gF[name].dtype == g32[name].dtype, name
        assert_close_to(gF[name], g64[name], tolerance_2x(g32[name], g64[name], dtype), f"{what} {name} grad")


def assert_all_fused(model, n_calls):
    assert peft_model.fallback_counts(model) == {"fused": n_calls}


def setup_two(model):
    add_adapter(model, "b")
    model.base_model.set_adapter(["default", "b"])


def setup_two_bias(model):
    add_adapter(model, "b", lora_bias=True)
    model.base_model.set_adapter(["default", "b"])


def setup_partial(model):
    # "c" exists in layer 0 only: layer 2 runs the adapters it has (PEFT skips absent ones)
    add_adapter(model, "b")
    add_adapter(model, "c", target_modules=["0"], r=3, lora_alpha=6)
    model.base_model.set_adapter(["default", "b", "c"])


def setup_switch(model):
    add_adapter(model, "b", use_rslora=True)
    model.set_adapter("b")


def setup_tensor_scaling(model):
    from peft.utils.hotswap import _convert_scalings_to_tensor

    _convert_scalings_to_tensor(model)
    assert isinstance(model.base_model.model[0].scaling["default"], torch.Tensor)


def setup_rescaled(model):
    for layer in (model.base_model.model[0], model.base_model.model[2]):
        layer.scale_layer(0.5)


CASES = {
    "lora": dict(),
    "rslora-dropout-eval": dict(use_rslora=True, lora_dropout=0.2, mode="eval"),
    "dora": dict(use_dora=True),
    "dora-dropout-eval": dict(use_dora=True, lora_dropout=0.2, mode="eval"),
    "lora_bias": dict(lora_bias=True),
    "mica": dict(init_lora_weights="mica"),
    "two-adapters": dict(setup=setup_two),
    "two-adapters-lora_bias": dict(lora_bias=True, setup=setup_two_bias),
    "adapter-absent-from-a-layer": dict(setup=setup_partial),
    "set_adapter-switch": dict(setup=setup_switch),
    "tensor-scaling (compiled hot-swap)": dict(setup=setup_tensor_scaling),
    "scale_layer": dict(setup=setup_rescaled),
    "conv1d": dict(base=conv1d_mlp),
    "conv1d-dora": dict(base=conv1d_mlp, use_dora=True),
    "conv1d-two-adapters-eval": dict(base=conv1d_mlp, lora_dropout=0.1, setup=setup_two, mode="eval"),
}


def build(case):
    kwargs = dict(CASES[case])
    setup, mode, base = kwargs.pop("setup", None), kwargs.pop("mode", "train"), kwargs.pop("base", mlp)
    model = peft_mlp(base=base, **kwargs)
    if setup is not None:
        setup(model)
    randomize(model)
    return model.train(mode == "train")


@pytest.mark.parametrize("case", list(CASES))
def test_outputs_and_gradients_match_peft(case):
    ref = build(case)
    ours = fused_twin(ref)
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(2))
    assert_parity(ref, ours, x, case)
    assert_all_fused(ours, 2)


class Doubled(nn.Module):
    def forward(self, w):
        return 2 * w


def test_parametrized_base_weight_runs_fused():
    from torch.nn.utils import parametrize

    ref = randomize(peft_mlp())
    parametrize.register_parametrization(ref.base_model.model[0].base_layer, "weight", Doubled())
    ours = fused_twin(ref)
    assert_parity(ref, ours, torch.randn(4, 16))
    assert_all_fused(ours, 2)


def adalora_model():
    config = peft.AdaLoraConfig(init_r=6, target_r=4, total_step=10, lora_alpha=8, target_modules=TARGETS)
    return randomize(peft_mlp(config))


def test_adalora_svd_layers_match_peft():
    ref = adalora_model()
    ours = fused_twin(ref)
    assert type(ours.base_model.model[0]).__name__ == "FusedSVDLinear"
    assert_parity(ref, ours, torch.randn(4, 16))
    assert_all_fused(ours, 2)


def train_curve(model, x, target, steps=4):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = (model(x) - target).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses)


@pytest.mark.parametrize("case", ["dora", "lora_bias", "two-adapters", "conv1d", "adalora"])
def test_short_training_matches_peft(case):
    ref = adalora_model() if case == "adalora" else build(case)
    ref64 = copy.deepcopy(ref).double()
    ours = fused_twin(ref)
    g = torch.Generator().manual_seed(3)
    x, target = torch.randn(8, 16, generator=g), torch.randn(8, 12, generator=g)
    curve64 = train_curve(ref64, x.double(), target.double())
    curve32 = train_curve(ref, x, target)
    curve = train_curve(ours, x, target)
    assert curve[-1] < curve[0]
    assert_close_to(curve, curve64, tolerance_2x(curve32, curve64, torch.float32), f"{case} loss curve")
    assert peft_model.fallback_counts(ours)["fused"] == 4 * 2


# -- fallbacks: PEFT's forward, exactly -------------------------------------------------


def variant_configs():
    from peft.tuners.lora.config import BdLoraConfig, KasaConfig, MontecloraConfig, VeloraConfig

    return {
        "kasa": (dict(kasa_config=KasaConfig()), "KasaLinearVariant"),
        "velora": (dict(velora_config=VeloraConfig(num_groups=4)), "VeloraLinearVariant"),
        "monteclora": (dict(monteclora_config=MontecloraConfig()), "MontecloraLinearVariant"),
        "bdlora": (
            dict(use_bdlora=BdLoraConfig(target_modules_bd_a=["0"], target_modules_bd_b=["2"], nblocks=2)),
            "BdLoraLinearVariant",
        ),
    }


def from_peft_quietly(model):
    """from_peft, returning its report and the fallback warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = fastlora.from_peft(model)
    return report, [str(w.message) for w in caught if w.category.__name__ == "PeftFallbackWarning"]


def assert_same_as_peft(ref, ours, x, seed=11):
    """Bit-identical outputs and gradients (both run PEFT's code, same random numbers)."""
    torch.manual_seed(seed)
    out_ref, g_ref = forward_backward(ref, x)
    torch.manual_seed(seed)
    out, g = forward_backward(ours, x)
    assert torch.equal(out, out_ref)
    assert g.keys() == g_ref.keys()
    for name in g:
        assert (g[name] is None) == (g_ref[name] is None), name
        assert g[name] is None or torch.equal(g[name], g_ref[name]), name


@pytest.mark.parametrize("variant", ["kasa", "velora", "monteclora", "bdlora"])
def test_lora_variants_fastlora_does_not_run_stay_on_peft(variant):
    kwargs, cls_name = variant_configs()[variant]
    ref = randomize(peft_mlp(**kwargs))
    ours = copy.deepcopy(ref)
    report, warned = from_peft_quietly(ours)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_same_as_peft(ref, ours, torch.randn(6, 16))
    assert report["accelerated"] == [] and [r for _, r in report["skipped"]] == [f"LoRA variant {cls_name}"] * 2
    assert len(warned) == 1 and f"2 x LoRA variant {cls_name}" in warned[0]
    assert peft_model.fallback_counts(ours) == {"fused": 0, f"LoRA variant {cls_name}": 2}


def test_dora_with_dropout_in_training_stays_on_peft():
    ref = randomize(peft_mlp(use_dora=True, lora_dropout=0.2)).train()
    ours = copy.deepcopy(ref)
    _, warned = from_peft_quietly(ours)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_same_as_peft(ref, ours, torch.randn(6, 16))
    assert len(warned) == 1 and "2 x DoRA with dropout in training" in warned[0]
    assert peft_model.fallback_counts(ours) == {"fused": 0, "DoRA with dropout in training": 2}
    ours.eval()
    ref.eval()
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert_close_to(ours(x), ref(x), 1e-5, "DoRA in eval")
    assert peft_model.fallback_counts(ours)["fused"] == 2  # eval: dropout off, fused


def test_adapter_deleted_and_re_added_with_dora_is_rechecked():
    ref, ours = randomize(peft_mlp()), fused_twin(randomize(peft_mlp()))
    for model in (ref, ours):  # the same steps, the same random numbers
        model.base_model.delete_adapter("default")
        torch.manual_seed(4)
        model.add_adapter("default", peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True))
        model.set_adapter("default")
        randomize(model, seed=5)
    assert_parity(ref, ours, torch.randn(5, 16))
    assert_all_fused(ours, 2)


def test_active_adapter_missing_from_some_layers():
    ref = randomize(peft_mlp())
    add_adapter(ref, "only0", target_modules=["0"])
    ref.set_adapter("only0")
    randomize(ref, seed=4)
    ours = copy.deepcopy(ref)
    report = fastlora.from_peft(ours, warn=False)
    assert report["accelerated"] == ["base_model.model.0"]
    assert report["skipped"] == [("base_model.model.2", "no active adapter in this layer (base layer only)")]
    peft_model.reset_fallback_counts(ours)
    assert_parity(ref, ours, torch.randn(5, 16))
    assert peft_model.fallback_counts(ours) == {"fused": 1, "no active adapter in this layer (base layer only)": 1}


HOOKS = {
    "forward hook": lambda m: m.register_forward_hook(lambda mod, args, out: out * 2),
    "forward pre-hook": lambda m: m.register_forward_pre_hook(lambda mod, args: (args[0] + 1,)),
    "global forward hook": lambda m: torch.nn.modules.module.register_module_forward_hook(
        lambda mod, args, out: out * 2 if isinstance(mod, nn.Linear) and mod.out_features == 24 else out
    ),
}


@pytest.mark.parametrize("hook", list(HOOKS))
@pytest.mark.parametrize("when", ["before from_peft", "after from_peft"])
def test_hooks_on_the_base_layer_are_run(hook, when):
    ref = randomize(peft_mlp())
    ours = copy.deepcopy(ref)
    handles = []
    if when == "after from_peft":
        fastlora.from_peft(ours, warn=False)
    for model in (ref, ours):
        handles.append(HOOKS[hook](model.base_model.model[0].base_layer))
        if hook.startswith("global"):
            break  # one global hook serves both models
    reason = "global module hooks" if hook.startswith("global") else "hooks on the base layer"
    try:
        warned = from_peft_quietly(ours)[1] if when == "before from_peft" else [reason]
        peft_model.reset_fallback_counts(ours)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert_same_as_peft(ref, ours, torch.randn(5, 16))
        counts = peft_model.fallback_counts(ours)
    finally:
        for h in handles:
            h.remove()
    assert len(warned) == 1 and reason in warned[0]
    assert counts[reason] >= 1 and sum(counts.values()) == 2
    with torch.no_grad():
        ours(torch.randn(2, 16))
    assert peft_model.fallback_counts(ours)["fused"] == counts["fused"] + 2  # hooks gone: fused again


def test_accelerate_cpu_offload_runs():
    accelerate = pytest.importorskip("accelerate")
    ref = randomize(peft_mlp()).eval()
    x = torch.randn(4, 16)
    with torch.no_grad():
        want = ref(x)
    ours = copy.deepcopy(ref)
    accelerate.cpu_offload(ours.base_model.model, execution_device=torch.device("cpu"))
    report, _ = from_peft_quietly(ours)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(ours(x), want)
    assert {reason for _, reason in report["skipped"]} == {"base layer forward replaced (e.g. accelerate hooks)"}


def test_disabled_input_dtype_casting_is_honoured():
    from peft.helpers import disable_input_dtype_casting

    def model():
        torch.manual_seed(0)
        base = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 12)).to(torch.bfloat16)
        return randomize(peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)))

    ref, ours = model(), model()
    assert ref.base_model.model[0].lora_A["default"].weight.dtype == torch.float32  # PEFT's autocast_adapter_dtype
    fastlora.from_peft(ours)
    x = torch.randn(3, 16).to(torch.bfloat16)
    with disable_input_dtype_casting(ref), pytest.raises(RuntimeError) as peft_error:
        ref(x)
    with disable_input_dtype_casting(ours), pytest.raises(RuntimeError) as our_error:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", peft_model.PeftFallbackWarning)
            ours(x)
    assert str(our_error.value) == str(peft_error.value)  # PEFT's own behaviour, not a silent cast
    assert peft_model.fallback_counts(ours) == {"fused": 0, "input dtype casting disabled": 1}


@pytest.mark.parametrize("case", ["lora", "dora", "two-adapters-lora_bias"])
def test_fp32_adapters_on_a_bf16_base_match_peft(case):
    """PEFT's default mixed precision (autocast_adapter_dtype): the LoRA branch and the
    adapter gradients in fp32 on a bf16 base; 2x PEFT's own bf16 error."""
    ref = build(case)
    for layer in (ref.base_model.model[0], ref.base_model.model[2]):
        layer.base_layer.to(torch.bfloat16)
    ours = fused_twin(ref)
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    assert_parity(ref, ours, x, case, dtype=torch.bfloat16)
    assert_all_fused(ours, 2)


def test_tensor_scaling_changed_in_place_is_seen():
    ref = randomize(peft_mlp())
    setup_tensor_scaling(ref)
    ours = fused_twin(ref)
    x = torch.randn(4, 16)
    for model in (ref, ours):
        for layer in (model.base_model.model[0], model.base_model.model[2]):
            layer.scaling["default"].fill_(0.25)  # what PEFT's hot-swap does
    with torch.no_grad():
        assert_close_to(ours(x), ref(x), 1e-5, "after the in-place swap")
    assert_all_fused(ours, 2)


def test_compiled_model_runs_fused_and_sees_a_hot_swapped_scaling():
    ref = randomize(peft_mlp(use_dora=True))
    setup_tensor_scaling(ref)
    ours = fused_twin(ref)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    compiled = torch.compile(ours, backend=backend, fullgraph=True)
    x = torch.randn(4, 16)
    with torch.no_grad():
        assert_close_to(compiled(x), ref(x), 1e-5, "compiled")
        for model in (ref, ours):
            for layer in (model.base_model.model[0], model.base_model.model[2]):
                layer.scaling["default"].fill_(0.75)  # PEFT's hot-swap: in place, no recompile wanted
        assert_close_to(compiled(x), ref(x), 1e-5, "compiled, after the in-place swap")
    # one graph (the swap recompiled nothing), both layers on fastlora's DoRA op
    assert len(graphs) == 1 and graphs[0].count("target=torch.ops.fastlora.dora_fwd") == 2


# -- state changes, copies, pickles -----------------------------------------------------


def test_disable_adapter_set_adapter_and_merge_keep_accelerating():
    ref = randomize(peft_mlp())
    add_adapter(ref, "b")
    randomize(ref, seed=3)
    ours = fused_twin(ref)
    x = torch.randn(4, 16)
    with torch.no_grad():
        with ours.disable_adapter(), ref.disable_adapter():
            assert torch.equal(ours(x), ref(x))
        assert_close_to(ours(x), ref(x), 1e-5, "after disable_adapter")
        for model in (ours, ref):
            model.set_adapter("b")
        assert_close_to(ours(x), ref(x), 1e-5, "after set_adapter")
        ours.merge_adapter()
        ref.merge_adapter()
        assert_close_to(ours(x), ref(x), 1e-5, "merged")
        ours.unmerge_adapter()
        ref.unmerge_adapter()
        assert_close_to(ours(x), ref(x), 1e-5, "unmerged")
    assert peft_model.fallback_counts(ours) == {
        "fused": 6,
        "adapters disabled (base layer only)": 2,
        "merged adapters (base layer only)": 2,
    }


def mixed_batch_model(**b_kwargs):
    ref = randomize(peft_mlp(lora_dropout=0.1))
    add_adapter(ref, "b", **b_kwargs)
    add_adapter(ref, "only0", target_modules=["0"])  # absent from layer 2: base alone there
    randomize(ref, seed=3)
    return ref.eval()


@pytest.mark.parametrize("lora_bias", [False, True], ids=["plain", "lora_bias"])
def test_adapter_names_mixed_batches_run_fused(lora_bias):
    ref = mixed_batch_model(lora_bias=lora_bias)
    ours = fused_twin(ref)
    x = torch.randn(5, 3, 16)
    names = ["b", "default", "__base__", "b", "only0"]
    with torch.no_grad():
        assert_close_to(ours(x, adapter_names=names), ref(x, adapter_names=names), 1e-5, "mixed batch")
        assert_close_to(ours(x, adapter_names=["b"] * 5), ref(x, adapter_names=["b"] * 5), 1e-5, "one group")
    assert_all_fused(ours, 4)


def test_adapter_names_errors_are_peft_s():
    ref = mixed_batch_model()
    ours = fused_twin(ref)
    x = torch.randn(3, 16)
    for model in (ref, ours):
        with pytest.raises(ValueError, match="Length of `adapter_names` should be the same"):
            model(x, adapter_names=["b"])
    dora = fused_twin(randomize(peft_mlp(use_dora=True)).eval())
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when DoRA is enabled"):
        dora(x, adapter_names=["default"] * 3)
    counts = peft_model.fallback_counts(ours) | peft_model.fallback_counts(dora)
    assert counts == {"fused": 0, "adapter_names of the wrong length": 1, "adapter_names with DoRA": 1}


def test_deep_copy_runs_its_own_weights():
    ours = fused_twin(randomize(peft_mlp()))
    twin = copy.deepcopy(ours)
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if "lora_B" in name:
                p.mul_(-3)
    ref = copy.deepcopy(twin)
    for layer in (ref.base_model.model[0], ref.base_model.model[2]):
        layer.__class__ = peft.tuners.lora.Linear
    x = torch.randn(4, 16)
    with torch.no_grad():
        assert_close_to(twin(x), ref(x), 1e-5, "the copy's own weights")
        assert (twin(x) - ours(x)).abs().max() > 0.1
    assert peft_model.fallback_counts(twin)["fused"] == 4


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_pickle_round_trip(use_dora):
    ref = randomize(peft_mlp(use_dora=use_dora))
    ours = fused_twin(ref)
    x = torch.randn(4, 16)
    with torch.no_grad():
        want = ours(x)
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded.base_model.model[0]) is type(ours.base_model.model[0])
    with torch.no_grad():
        assert torch.equal(loaded(x), want)
    assert peft_model.fallback_counts(loaded) == {"fused": 2}


@pytest.mark.slow  # a fresh interpreter importing torch, peft and transformers: ~15 s
def test_pickled_fused_class_resolves_by_name_in_a_fresh_process(tmp_path):
    import subprocess
    import sys

    ours = fused_twin(randomize(peft_mlp()))
    path = tmp_path / "model.pt"
    torch.save(ours, path)
    code = (
        "import torch, fastlora; "
        f"m = torch.load({str(path)!r}, weights_only=False); "
        "print(type(m.base_model.model[0]).__name__, m(torch.zeros(1, 16)).shape[-1])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert out.stdout.split() == ["FusedLoraLinear", "12"]


def test_from_peft_twice_is_harmless():
    ours = fused_twin(randomize(peft_mlp()))
    report = fastlora.from_peft(ours)
    assert report == {"accelerated": ["base_model.model.0", "base_model.model.2"], "skipped": []}
    assert isinstance(ours.base_model.model[0], peft.tuners.lora.Linear)


# -- visibility -------------------------------------------------------------------------


def test_from_peft_warns_with_counts_by_reason():
    model = randomize(peft_mlp())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastlora.from_peft(copy.deepcopy(model))  # everything accelerated: silent
    model.base_model.model[2].lora_dropout["default"] = nn.AlphaDropout(0.1)
    with pytest.warns(peft_model.PeftFallbackWarning, match=r"1 of 2 adapter layers .* 1 x dropout module AlphaDropout"):
        fastlora.from_peft(model)
    with pytest.warns(peft_model.PeftFallbackWarning, match="no PEFT adapter layers"):
        fastlora.from_peft(nn.Sequential(nn.Linear(2, 2)))


def test_layer_kinds_without_a_fused_op_are_reported():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 16)
            self.lin = nn.Linear(16, 4)

        def forward(self, ids):
            return self.lin(self.emb(ids))

    model = peft.get_peft_model(Net(), peft.LoraConfig(r=2, target_modules=["emb", "lin"]))
    with pytest.warns(peft_model.PeftFallbackWarning, match=r"1 x layer type lora\.Embedding"):
        report = fastlora.from_peft(model)
    assert report["accelerated"] == ["base_model.model.lin"]
    assert type(model.base_model.model.emb) is peft.tuners.lora.Embedding  # left alone


def test_other_tuners_are_reported():
    model = peft.get_peft_model(mlp(), peft.LoHaConfig(r=2, target_modules=TARGETS))
    with pytest.warns(peft_model.PeftFallbackWarning, match=r"0 of 2 .* 2 x layer type loha\.Linear"):
        report = fastlora.from_peft(model)
    assert report["accelerated"] == []


def test_fallback_counts_global_and_per_model():
    peft_model.reset_fallback_counts()
    a, b = fused_twin(randomize(peft_mlp())), fused_twin(randomize(peft_mlp()))
    x = torch.randn(2, 16)
    with torch.no_grad():
        a(x)
        b(x)
        with b.disable_adapter():
            b(x)
    assert peft_model.fallback_counts(a) == {"fused": 2}
    assert peft_model.fallback_counts(b) == {"fused": 2, "adapters disabled (base layer only)": 2}
    assert peft_model.fallback_counts() == {"fused": 4, "adapters disabled (base layer only)": 2}
    peft_model.reset_fallback_counts(b)
    assert peft_model.fallback_counts(b) == {"fused": 0}
    peft_model.reset_fallback_counts()
    assert peft_model.fallback_counts() == {"fused": 0}


@pytest.mark.interpreter
@pytest.mark.parametrize("case", ["lora", "conv1d", "two-adapters-lora_bias", "dora"])
def test_triton_kernels_under_the_interpreter_match_peft(case):
    """The same parity through the Triton kernels (interpreter on CPU): Conv1D's
    transposed weight and the concatenated adapters reach the kernels as strided views."""
    ref = build(case)
    ours = fused_twin(ref)
    assert_parity(ref, ours, torch.randn(6, 16, generator=torch.Generator().manual_seed(2)), case)
    assert_all_fused(ours, 2)


@pytest.mark.parametrize("case", ["lora", "dora", "two-adapters-lora_bias", "conv1d"])
def test_under_autocast_matches_peft(case):
    ref = build(case)
    ours = fused_twin(ref)
    ref64 = copy.deepcopy(ref).double()
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(2))
    out64, g64 = forward_backward(ref64, x.double())
    results = []
    for model in (ref, ours):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(forward_backward(model, x))
    (out_ref, g_ref), (out, g) = results
    assert out.dtype == out_ref.dtype == torch.bfloat16
    assert_close_to(out, out64, tolerance_2x(out_ref, out64, torch.bfloat16), f"{case} output")
    for name in g_ref:
        assert_close_to(g[name], g64[name], tolerance_2x(g_ref[name], g64[name], torch.bfloat16), f"{case} {name}")
    assert_all_fused(ours, 2)


@pytest.mark.parametrize("n_adapters", [1, 2])
def test_dropout_in_training_runs_fused_with_peft_s_expectation(n_adapters):
    """With dropout in training the masks are fastlora's (Philox), not PEFT's random
    numbers: reproducible under torch.manual_seed, and unbiased (mean over masks = eval)."""

    def one_layer():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 12))

    ref = peft.get_peft_model(one_layer(), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["0"]))
    if n_adapters == 2:
        ref.add_adapter("b", peft.LoraConfig(r=2, lora_alpha=3, lora_dropout=0.5, target_modules=["0"]))
        ref.base_model.set_adapter(["default", "b"])
    ours = fused_twin(randomize(ref))
    x = torch.randn(4, 16)
    with torch.no_grad():
        want = ours.eval()(x)
        ours.train()
        torch.manual_seed(5)
        first = ours(x)
        torch.manual_seed(5)
        assert torch.equal(ours(x), first)  # reproducible
        samples = torch.stack([ours(x) for _ in range(2000)])
    mean, std = samples.mean(0), samples.std(0)
    assert (samples[0] - want).abs().max() > 1e-3  # dropout is on
    # the mean of 2000 draws within 5 standard errors of the expectation (fixed seeds: deterministic)
    assert ((mean - want).abs() <= 5 * std / 2000**0.5 + 1e-6).all()
    assert peft_model.fallback_counts(ours)["fused"] == 2003
