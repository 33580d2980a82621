"""A probe of bad and unusual inputs, as a careful user and a hostile file would
try them. Each case runs one call and is judged:

* ``clear``: an exception of the expected type whose message names the
  offending argument, field or key (the case's ``names``);
* ``correct``: a result that its oracle accepts;
* ``silent``: a result its oracle rejects (silently wrong);
* ``crash``: any other exception (unhelpful: wrong type or not naming it);
* ``hang``: no answer within the time limit;
* ``lost``: the user's model, adapter folder or tensors changed although the
  call failed (data lost).

``tests/test_bad_inputs.py`` asserts every case is clear or correct (and none
lost); ``python bench/bad_inputs.py`` prints the counts.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import signal
import tempfile
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

import fastlora
from fastlora.peft_io import AdapterFormatError
from fastlora.quant import QuantizedWeight, quantize_4bit

ERRORS = (ValueError, TypeError, AdapterFormatError)


@dataclass
class Case:
    name: str
    run: Callable[[], object]  # returns the result, or raises
    names: str | None = None  # what a clear error must mention (None: the call must succeed)
    oracle: Callable[[object], bool] | None = None  # for calls that must succeed
    snapshot: Callable[[], object] | None = None  # state that a failure must leave untouched


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def _same_state(a, b):
    return a[1] == b[1] and a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])


def _operand_cases() -> list[Case]:
    x, w, a, b = torch.randn(4, 8), torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2)
    call = lambda **kw: lambda: fastlora.lora_linear(**{**dict(x=x, weight=w, lora_A=a, lora_B=b, scaling=1.0), **kw})  # noqa: E731
    f64 = lambda: (x.double() @ w.double().t() + (x.double() @ a.double().t()) @ b.double().t())  # noqa: E731
    close = lambda y: torch.allclose(y.double(), f64(), atol=1e-5)  # noqa: E731  fp32 vs float64: a few ulps
    return [
        Case("x wrong last dim", call(x=torch.randn(4, 7)), "x's last dimension"),
        Case("x integer", call(x=torch.ones(4, 8, dtype=torch.int64)), "floating-point"),
        Case("x 0-d", call(x=torch.tensor(1.0)), "at least one dimension"),
        Case("x not a tensor", call(x=[[1.0] * 8]), "x must be a torch.Tensor"),
        Case("weight 1-D", call(weight=torch.randn(8)), "weight must be a 2-D"),
        Case("weight fp16", call(weight=w.half()), "weight has dtype"),
        Case("lora_A wrong K", call(lora_A=torch.randn(2, 7)), "lora_A must have shape"),
        Case("lora_A rank 0", call(lora_A=torch.randn(0, 8), lora_B=torch.randn(6, 0)), "rank r must be >= 1"),
        Case("lora_B wrong r", call(lora_B=torch.randn(6, 3)), "lora_B must have shape"),
        Case("adapters bf16 on fp32", call(lora_A=a.bfloat16(), lora_B=b.bfloat16()), "lora_A/lora_B have dtypes"),
        Case("bias wrong length", call(bias=torch.randn(5)), "bias must have shape"),
        Case("bias a list", call(bias=[0.0] * 6), "bias must have shape"),
        Case("scaling nan", call(scaling=math.nan), "scaling must be a finite"),
        Case("scaling tensor", call(scaling=torch.tensor(1.0)), "scaling must be a finite"),
        Case("dropout 1.0", call(dropout=1.0), "dropout must be a probability"),
        Case("dropout negative", call(dropout=-0.1), "dropout must be a probability"),
        Case("dropout string", call(dropout="0.1"), "dropout must be a probability"),
        Case("zero rows", call(x=torch.randn(0, 8)), oracle=lambda y: y.shape == (0, 6)),
        Case("3-D x", call(x=x.view(2, 2, 8)), oracle=lambda y: y.shape == (2, 2, 6) and close(y.view(4, 6))),
        Case("transposed x", call(x=x.t().contiguous().t()), oracle=close),
        Case("nan in x propagates", call(x=torch.full((4, 8), math.nan)), oracle=lambda y: torch.isnan(y).all()),
    ]


def _layer_cases() -> list[Case]:
    return [
        Case("LoRALinear r=0", lambda: fastlora.LoRALinear(8, 4, r=0), "r (the LoRA rank)"),
        Case("LoRALinear r=True", lambda: fastlora.LoRALinear(8, 4, r=True), "r (the LoRA rank)"),
        Case("LoRALinear alpha inf", lambda: fastlora.LoRALinear(8, 4, alpha=math.inf), "alpha must be a finite"),
        Case("LoRALinear init typo", lambda: fastlora.LoRALinear(8, 4, init="pisa"), "init must be one of"),
        Case("from_linear of a conv", lambda: fastlora.LoRALinear.from_linear(nn.Conv1d(2, 2, 1)), "linear must be an nn.Linear"),
        Case("QLoRA blocksize 7", lambda: fastlora.QLoRALinear.from_linear(nn.Linear(64, 8), blocksize=7), "blocksize"),
        Case("QLoRA pissa", lambda: fastlora.QLoRALinear.from_linear(nn.Linear(64, 8), init="pissa"), "4-bit"),
        Case("quantize nan weight", lambda: quantize_4bit(torch.full((8, 64), math.nan)), "non-finite"),
        Case("quantize int weight", lambda: quantize_4bit(torch.ones(8, 64, dtype=torch.int32)), "w must be fp32"),
        Case("VeRA r=0", lambda: fastlora.VeRALinear(8, 4, r=0), "r (the VeRA rank)"),
        Case("AdaLoRA init_r=-1", lambda: fastlora.AdaLoRALinear(8, 4, init_r=-1), "init_r"),
        Case("set_backend typo", lambda: fastlora.set_backend("trition"), "trition"),
        Case("use_backend typo", lambda: fastlora.use_backend("gpu").__enter__(), "gpu"),
    ]


def _tampered_state_cases() -> list[Case]:
    qw = quantize_4bit(torch.randn(16, 256))
    state = qw.state_dict("weight")

    def tampered(key, value):
        return lambda: QuantizedWeight.from_state_dict({**state, key: value}, "weight")

    return [
        Case("absmax wrong length", tampered("weight.absmax", state["weight.absmax"][:-1]), "absmax"),
        Case("quant_map not nf4", tampered("weight.quant_map", torch.linspace(-1, 1, 16)), "quant_map"),
        Case("nested_absmax inf", tampered("weight.nested_absmax", state["weight.nested_absmax"] * math.inf), "nested_absmax"),
        Case("packed truncated", tampered("weight", state["weight"][:10]), "weight"),
    ]


def _surgery_cases() -> list[Case]:
    cases = []

    def surgery(name, names, **kw):
        model = _net()
        cases.append(Case(name, lambda: fastlora.apply_lora(model, **kw), names, snapshot=lambda: _state(model)))

    surgery("target matches nothing", "matched no module", target_modules=["nope"])
    surgery("target a ReLU", "cannot adapt", target_modules=["1"])
    surgery("unknown field", "unknown LoRAConfig fields", rank=4)
    surgery("use_rslora string", "use_rslora must be True or False", use_rslora="false")
    surgery("rank_pattern zero", "rank_pattern", rank_pattern={"0": 0})
    surgery("alpha_pattern nan", "alpha_pattern", alpha_pattern={"0": math.nan})
    surgery("catastrophic regex", "is refused", target_modules=r"(\d+)+x")
    surgery("modules_to_save missing", "modules_to_save entry", modules_to_save=["head"])
    surgery("quantize typo", "quantize must be", quantize="nf5")
    surgery("pissa r too large", "r <= min", r=32, init="pissa")
    model = _net()
    cases.append(Case("apply twice on the same targets", lambda: fastlora.apply_lora(fastlora.apply_lora(model)), "already adapter layers"))
    lin = nn.Linear(4, 4)
    cases.append(Case("apply_lora on a bare Linear", lambda: fastlora.apply_lora(lin), "not on a bare"))
    two = fastlora.apply_lora(_net(), r=2, target_modules=["0"])

    def second_apply_keeps_first():
        fastlora.apply_lora(two, r=2, target_modules=["2"])
        return two

    cases.append(Case("second apply keeps first trainable", second_apply_keeps_first,
                      oracle=lambda m: m[0].lora_A.requires_grad and m[2].lora_A.requires_grad))  # fmt: skip
    return cases


def _file_cases(folder: str) -> list[Case]:
    """Corruptions of a valid adapter folder: the load must refuse them with the
    model unchanged; a failed save must leave the previous folder byte-identical."""
    from safetensors.torch import load_file, save_file

    source = fastlora.apply_lora(_net(), r=2, alpha=4.0)
    with torch.no_grad():
        for layer in fastlora.model.lora_layers(source).values():
            layer.lora_B.normal_()
    good = os.path.join(folder, "good")
    fastlora.save_adapter(source, good)
    cases = []

    def corrupted(name, names, config_edit=None, tensor_edit=None, raw=None):
        path = os.path.join(folder, name.replace(" ", "_"))
        os.makedirs(path, exist_ok=True)
        config = json.load(open(os.path.join(good, "adapter_config.json")))
        tensors = load_file(os.path.join(good, "adapter_model.safetensors"))
        if config_edit:
            config_edit(config)
        if tensor_edit:
            tensor_edit(tensors)
        with open(os.path.join(path, "adapter_config.json"), "w") as f:
            f.write(raw if raw is not None else json.dumps(config))
        save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
        target = fastlora.apply_lora(_net(), r=2)
        cases.append(Case(f"file: {name}", lambda: fastlora.load_adapter(target, path), names, snapshot=lambda: _state(target)))

    key = "base_model.model.0.lora_A.weight"
    corrupted("not json", "not valid JSON", raw="{")
    corrupted("json list", "expected a JSON object", raw="[]")
    corrupted("unknown field", "unknown config fields", config_edit=lambda c: c.update(shiny=1))
    corrupted("r string", "r must be an integer", config_edit=lambda c: c.update(r="2"))
    corrupted("alpha nan", "lora_alpha must be a finite", config_edit=lambda c: c.update(lora_alpha=math.nan))
    corrupted("rslora string", "use_rslora must be true or false", config_edit=lambda c: c.update(use_rslora="false"))
    corrupted("rank_pattern bool", "rank_pattern", config_edit=lambda c: c.update(rank_pattern={"0": True}))
    corrupted("alpha_pattern string", "alpha_pattern", config_edit=lambda c: c.update(alpha_pattern={"0": "4"}))
    corrupted("dropout 2", "lora_dropout", config_edit=lambda c: c.update(lora_dropout=2))
    corrupted("target regex catastrophic", "is refused", config_edit=lambda c: c.update(target_modules="(a|aa)*b"))
    corrupted("bias all", "unsupported settings", config_edit=lambda c: c.update(bias="all"))
    corrupted("loftq init", "init_lora_weights", config_edit=lambda c: c.update(init_lora_weights="loftq"))
    corrupted("missing tensor", "missing keys", tensor_edit=lambda t: t.pop(key))
    corrupted("wrong shape", "has shape", tensor_edit=lambda t: t.update({key: torch.zeros(3, 8)}))
    corrupted("int tensor", "floating-point", tensor_edit=lambda t: t.update({key: torch.zeros(2, 8, dtype=torch.int32)}))
    corrupted("nan tensor", "NaN or infinite", tensor_edit=lambda t: t.update({key: torch.full((2, 8), math.nan)}))
    corrupted("stray key", "unexpected keys", tensor_edit=lambda t: t.update({"base_model.model.0.weight": torch.zeros(16, 8)}))
    corrupted("magnitude without dora", "use_dora", tensor_edit=lambda t: t.update({"base_model.model.0.lora_magnitude_vector": torch.ones(16)}))
    fifo = os.path.join(folder, "fifo")
    os.makedirs(fifo, exist_ok=True)
    if hasattr(os, "mkfifo"):
        os.mkfifo(os.path.join(fifo, "adapter_config.json"))
        target = _net()
        cases.append(Case("file: config is a FIFO", lambda: fastlora.load_adapter(target, fifo), "FIFO", snapshot=lambda: _state(target)))
    dev = os.path.join(folder, "device")
    os.makedirs(dev, exist_ok=True)
    with open(os.path.join(dev, "adapter_config.json"), "w") as f:
        json.dump(json.load(open(os.path.join(good, "adapter_config.json"))), f)
    os.symlink("/dev/zero", os.path.join(dev, "adapter_model.safetensors"))
    target2 = _net()
    cases.append(Case("file: weights are /dev/zero", lambda: fastlora.load_adapter(target2, dev), "character device", snapshot=lambda: _state(target2)))

    def folder_bytes():
        return {n: open(os.path.join(good, n), "rb").read() for n in sorted(os.listdir(good))}

    other = fastlora.apply_lora(_net(), r=4)
    cases.append(Case("save: bad base_model_name_or_path", lambda: fastlora.save_adapter(other, good, base_model_name_or_path=object()),
                      "base_model_name_or_path", snapshot=folder_bytes))  # fmt: skip
    cases.append(Case("save: modules_to_save missing", lambda: fastlora.save_adapter(other, good, modules_to_save=["head"]),
                      "modules_to_save entry", snapshot=folder_bytes))  # fmt: skip
    merged = fastlora.apply_lora(_net(), r=2)
    merged[0].merge()
    cases.append(Case("save: merged layer", lambda: fastlora.save_adapter(merged, good), "merged", snapshot=folder_bytes))
    return cases


@contextlib.contextmanager
def _time_limit(seconds: int):
    def boom(signum, frame):
        raise TimeoutError(f"no answer in {seconds} s")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def all_cases(folder: str) -> list[Case]:
    return _operand_cases() + _layer_cases() + _tampered_state_cases() + _surgery_cases() + _file_cases(folder)


def judge(case: Case, seconds: int = 20) -> tuple[str, str]:
    """``(verdict, detail)`` for one case (see the module docstring)."""
    before = case.snapshot() if case.snapshot else None
    try:
        with _time_limit(seconds):
            result = case.run()
    except TimeoutError as exc:
        return "hang", str(exc)
    except Exception as exc:  # noqa: BLE001 - classifying every outcome is the point
        after = case.snapshot() if case.snapshot else None
        if before is not None and not (_same_state(before, after) if isinstance(before, tuple) else before == after):
            return "lost", f"{type(exc).__name__}: {exc}"
        if case.names is not None and isinstance(exc, ERRORS + (RuntimeError,)) and case.names in str(exc):
            return "clear", f"{type(exc).__name__}: {exc}"
        return "crash", f"{type(exc).__name__}: {exc}"
    if case.names is not None:
        return "silent", f"returned {type(result).__name__} where an error naming {case.names!r} was expected"
    ok = case.oracle(result) if case.oracle else True
    return ("correct", "") if ok else ("silent", "the oracle rejected the result")


def run_probe() -> dict[str, list[tuple[str, str]]]:
    fastlora.set_backend("reference")
    with tempfile.TemporaryDirectory() as folder:
        verdicts: dict[str, list[tuple[str, str]]] = {}
        for case in all_cases(folder):
            verdict, detail = judge(case)
            verdicts.setdefault(verdict, []).append((case.name, detail))
    return verdicts


__all__ = ["Case", "all_cases", "judge", "run_probe"]
