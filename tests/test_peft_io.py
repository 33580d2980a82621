"""PEFT adapter files, both ways, with PEFT itself as the oracle."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from torch import nn

from fastlora import LoRALinear, apply_lora, load_adapter, save_adapter
from fastlora.model import lora_layers
from fastlora.peft_io import AdapterFormatError

from _oracles import assert_close_to

peft = pytest.importorskip("peft", reason="adapter-format tests need peft (pip install 'fastlora[test]')")
safetensors_torch = pytest.importorskip("safetensors.torch")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 32))
        self.q_proj = nn.Linear(32, 32, bias=False)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        return self.head(torch.relu(self.q_proj(self.encoder(x))))


def base_net() -> Net:
    torch.manual_seed(0)
    return Net()


def randomize_lora(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0, 0.3)


# fp32 forward through three small layers, same math in a different op order: 1e-5.
TOL = 1e-5


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(r=4, alpha=8.0),
        dict(r=8, alpha=16.0, use_rslora=True, dropout=0.1, target_modules=["q_proj", "encoder.2"]),
        dict(r=4, alpha=8.0, rank_pattern={"q_proj": 2}, alpha_pattern={"head": 3.0}),
    ],
    ids=["plain", "rslora-suffixes", "patterns"],
)
def test_saved_adapter_loads_in_peft_with_the_same_outputs(tmp_path, kwargs):
    model = apply_lora(base_net(), **kwargs)
    randomize_lora(model)
    model.eval()
    save_adapter(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    theirs = peft.PeftModel.from_pretrained(base_net(), str(tmp_path))
    theirs.eval()
    x = torch.randn(7, 24)
    assert_close_to(model(x), theirs(x), TOL, "PEFT-loaded output")
    wrapped = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert wrapped == set(lora_layers(model))


@pytest.mark.parametrize(
    "config",
    [
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "0"]),
        dict(r=8, lora_alpha=4, use_rslora=True, target_modules=r"encoder\.[02]"),
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "2", "0"], rank_pattern={"q_proj": 2}, alpha_pattern={"encoder.0": 1}),
        dict(r=2, lora_alpha=2, target_modules=["q_proj"], modules_to_save=["head"]),
    ],
    ids=["suffixes", "rslora-regex", "patterns", "modules_to_save"],
)
def test_peft_written_adapter_loads_into_a_plain_model(tmp_path, config):
    theirs = peft.get_peft_model(base_net(), peft.LoraConfig(init_lora_weights="gaussian", **config))
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.normal_(0, 0.3)
    theirs.save_pretrained(str(tmp_path))
    theirs.eval()
    ours = load_adapter(base_net(), tmp_path)
    ours.eval()
    x = torch.randn(5, 24)
    assert_close_to(ours(x), theirs(x), TOL, "loaded output")
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    expected = {f"{n}.{w}" for n in lora_layers(ours) for w in ("lora_A", "lora_B")}
    if config.get("modules_to_save"):
        expected |= {"head.weight", "head.bias"}
    assert trainable == expected


def test_round_trip_into_an_existing_lora_model(tmp_path):
    model = apply_lora(base_net(), r=4)
    randomize_lora(model)
    save_adapter(model, tmp_path)
    other = apply_lora(base_net(), r=4)
    load_adapter(other, tmp_path)
    for name, layer in lora_layers(model).items():
        twin = other.get_submodule(name)
        assert torch.equal(layer.lora_A, twin.lora_A) and torch.equal(layer.lora_B, twin.lora_B)


def corrupt(tmp_path, how):
    model = apply_lora(base_net(), r=4)
    randomize_lora(model)
    save_adapter(model, tmp_path)
    cfg_file, weights_file = tmp_path / "adapter_config.json", tmp_path / "adapter_model.safetensors"
    cfg = json.loads(cfg_file.read_text())
    tensors = safetensors_torch.load_file(str(weights_file))
    key = "base_model.model.q_proj.lora_A.weight"
    if how == "truncated":
        weights_file.write_bytes(weights_file.read_bytes()[:100])
    elif how == "not json":
        cfg_file.write_text("{not json")
    elif how == "unknown field":
        cfg["shiny_new_option"] = 3
    elif how == "dora":  # a DoRA config whose file lacks the magnitude vectors
        cfg["use_dora"] = True
    elif how == "rslora as a string":  # "false" is truthy: it must not be read as True
        cfg["use_rslora"] = "false"
    elif how == "zero rank pattern":
        cfg["rank_pattern"] = {"q_proj": 0}
    elif how == "nan alpha pattern":
        cfg["alpha_pattern"] = {"q_proj": float("nan")}
    elif how == "pattern type":
        cfg["rank_pattern"] = {"q_proj": True}
    elif how == "catastrophic regex":  # backtracks for minutes per module name in PEFT; refused here
        cfg["target_modules"] = "(q|qq)*_proj"
    elif how == "loftq init":  # LoftQ rewrites the base from a quantization PEFT does not store
        cfg["init_lora_weights"] = "loftq"

    elif how == "missing key":
        del tensors[key]
    elif how == "wrong shape":
        tensors[key] = torch.zeros(3, 32)
    elif how == "int dtype":
        tensors[key] = torch.zeros(4, 32, dtype=torch.int32)
    elif how == "stray key":
        tensors["base_model.model.q_proj.something"] = torch.zeros(1)
    elif how == "pickle only":
        weights_file.unlink()
        (tmp_path / "adapter_model.bin").write_bytes(b"not loaded")
    if how in ("unknown field", "dora", "rslora as a string", "zero rank pattern", "nan alpha pattern", "pattern type",
               "loftq init", "catastrophic regex"):
        cfg_file.write_text(json.dumps(cfg))
    if how in ("missing key", "wrong shape", "int dtype", "stray key"):
        safetensors_torch.save_file(tensors, str(weights_file))


BAD = {
    "truncated": "corrupt or truncated safetensors",
    "not json": "not valid JSON",
    "unknown field": r"unknown config fields \['shiny_new_option'\]",
    "dora": r"missing keys \['base_model.model.encoder.0.lora_magnitude_vector'",
    "rslora as a string": "use_rslora must be true or false, got 'false'",
    "zero rank pattern": r"rank_pattern\['q_proj'\] must be an integer >= 1, got 0",
    "nan alpha pattern": r"alpha_pattern\['q_proj'\] must be a finite number, got nan",
    "pattern type": r"rank_pattern\['q_proj'\] must be an integer >= 1, got True",
    "loftq init": "init_lora_weights='loftq' is not supported",
    "catastrophic regex": r"target_modules '\(q\|qq\)\*_proj' is refused",
    "missing key": r"missing keys \['base_model.model.q_proj.lora_A.weight'\]",
    "wrong shape": r"lora_A.weight has shape \(3, 32\); the layer q_proj \(LoRALinear, r=4\) needs \(4, 32\)",
    "int dtype": "has dtype torch.int32; expected a floating-point dtype",
    "stray key": "unexpected keys",
    "pickle only": "safetensors adapters only, never pickles",
}


@pytest.mark.parametrize("how", list(BAD))
def test_bad_adapter_files_are_clear_errors_and_leave_the_model_unchanged(tmp_path, how):
    corrupt(tmp_path, how)
    target = apply_lora(base_net(), r=2, target_modules=["head"])
    before = copy.deepcopy(target.state_dict())
    types = [type(m) for m in target.modules()]
    with pytest.raises(AdapterFormatError, match=BAD[how]):
        load_adapter(target, tmp_path)
    after = target.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert types == [type(m) for m in target.modules()]
    assert isinstance(target.head, LoRALinear) and target.head.r == 2


def test_a_base_weight_key_never_overwrites_a_frozen_base_weight(tmp_path):
    """With modules_to_save in the config, only parameters of those modules may be
    stored in full; a key for another base weight is an error, not an overwrite."""
    theirs = peft.get_peft_model(base_net(), peft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["head"]))
    theirs.save_pretrained(str(tmp_path))
    weights_file = tmp_path / "adapter_model.safetensors"
    tensors = safetensors_torch.load_file(str(weights_file))
    tensors["base_model.model.encoder.0.weight"] = torch.zeros(32, 24)
    safetensors_torch.save_file(tensors, str(weights_file))
    target = base_net()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(AdapterFormatError, match=r"unexpected keys \['base_model.model.encoder.0.weight'\]"):
        load_adapter(target, tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
    assert all(p.requires_grad for p in target.parameters())


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_adapter_files_rebuild_the_trained_model_as_peft_does(tmp_path, init):
    """Such an adapter was trained on the residual base W - s B0 A0; PEFT rebuilds it on
    load by running the same init on the base before loading A and B. So do we."""
    theirs = peft.get_peft_model(base_net(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "0"], init_lora_weights=init))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p), alpha=0.1)  # "trained" adapters
    theirs.save_pretrained(str(tmp_path))
    reloaded = peft.PeftModel.from_pretrained(base_net(), str(tmp_path)).eval()
    ours = load_adapter(base_net(), tmp_path).eval()
    x = torch.randn(6, 24)
    with torch.no_grad():
        want, got = reloaded(x), ours(x)
        assert (want - base_net()(x)).abs().max() > 0.1  # the adapter matters
    assert_close_to(got, want, TOL, f"{init} adapter reloaded")


def _folder_bytes(path):
    return {name: (path / name).read_bytes() for name in sorted(os.listdir(path))}


@pytest.mark.parametrize("fault", ["bad base_model_name_or_path", "second rename fails", "disk full on config"])
def test_a_failed_save_leaves_the_previous_adapter_byte_identical(tmp_path, monkeypatch, fault):
    first = apply_lora(base_net(), r=4)
    randomize_lora(first)
    save_adapter(first, tmp_path)
    before = _folder_bytes(tmp_path)
    second = apply_lora(base_net(), r=2, alpha=32.0)  # other scaling: a mixed folder would load silently wrong
    randomize_lora(second)
    if fault == "bad base_model_name_or_path":
        with pytest.raises(TypeError, match="base_model_name_or_path must be a string"):
            save_adapter(second, tmp_path, base_model_name_or_path=object())
    else:
        real_replace, real_write = os.replace, os.write
        calls = []

        def failing_replace(src, dst, *a, **k):
            calls.append(dst)
            if len(calls) == 2:
                raise OSError(28, "No space left on device")
            return real_replace(src, dst, *a, **k)

        def failing_write(fd, data):
            if b'"peft_type"' in bytes(data):
                raise OSError(28, "No space left on device")
            return real_write(fd, data)

        if fault == "second rename fails":
            monkeypatch.setattr(os, "replace", failing_replace)
        else:
            monkeypatch.setattr(os, "write", failing_write)
        with pytest.raises(OSError, match="No space left"):
            save_adapter(second, tmp_path)
        monkeypatch.undo()
    assert _folder_bytes(tmp_path) == before
    reloaded = load_adapter(base_net(), tmp_path)
    for name, layer in lora_layers(first).items():
        assert torch.equal(reloaded.get_submodule(name).lora_B, layer.lora_B)


def test_save_adapter_remembers_modules_to_save(tmp_path):
    model = apply_lora(base_net(), r=4, target_modules=["q_proj"], modules_to_save=["head"])
    randomize_lora(model)
    with torch.no_grad():
        model.head.weight.normal_()
    save_adapter(model, tmp_path)  # no modules_to_save argument: the trained head must not be lost
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["head"]
    theirs = peft.PeftModel.from_pretrained(base_net(), str(tmp_path)).eval()
    x = torch.randn(3, 24)
    with torch.no_grad():
        assert_close_to(theirs(x), model.eval()(x), TOL, "PEFT-loaded output with the saved head")


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fastlora.peft_fields import PEFT_LORA_DEFAULTS  # noqa: E402

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 40) | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=5,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(sorted(PEFT_LORA_DEFAULTS)), value=_JSON)
def test_any_single_config_value_loads_or_is_refused_with_the_model_untouched(tmp_path_factory, field, value):
    """Property: replacing one field of a valid adapter_config.json by any JSON value
    either loads, or raises AdapterFormatError with the model bit-identical and its
    module types unchanged; never another exception, never a half-applied load."""
    folder = tmp_path_factory.mktemp("adapter")
    model = apply_lora(base_net(), r=4)
    save_adapter(model, folder)
    cfg_file = folder / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg[field] = value
    cfg_file.write_text(json.dumps(cfg))
    target = apply_lora(base_net(), r=2, target_modules=["head"])
    before = {k: v.clone() for k, v in target.state_dict().items()}
    types = [type(m) for m in target.modules()]
    flags = [p.requires_grad for p in target.parameters()]
    try:
        load_adapter(target, folder)
    except AdapterFormatError:
        after = target.state_dict()
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
        assert types == [type(m) for m in target.modules()]
        assert flags == [p.requires_grad for p in target.parameters()]
