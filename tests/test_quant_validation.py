"""Validation of 4-bit quant state: quantize_4bit refuses non-finite weights;
QuantizedWeight (constructor: structure; from_state_dict / from_bnb /
validate(values=True): structure and values) refuses tampered state with a
ValueError (QuantStateError) naming the field or state-dict key, what it
received and what was expected. Every check runs before anything is returned."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fastlora.quant import (
    QuantizedWeight,
    QuantStateError,
    dequantize_4bit,
    dynamic_map,
    quant_map,
    quantize_4bit,
)

BLOB = "weight.quant_state.bitsandbytes__nf4"


def _weight(shape=(16, 40), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


def _fields(qw, **changes):
    base = dict(
        packed=qw.packed, absmax=qw.absmax, quant_map=qw.quant_map, quant_type=qw.quant_type,
        blocksize=qw.blocksize, shape=qw.shape, dtype=qw.dtype, nested_absmax=qw.nested_absmax,
        nested_quant_map=qw.nested_quant_map, offset=qw.offset, nested_blocksize=qw.nested_blocksize,
    )  # fmt: skip
    base.update(changes)
    return base


def _sd(double_quant=True, quant_type="nf4", shape=(16, 40)):
    return quantize_4bit(_weight(shape), quant_type=quant_type, double_quant=double_quant).state_dict("weight")


def _with_meta(sd, key=BLOB, **changes):
    meta = json.loads(bytes(sd[key].tolist()))
    meta.update(changes)
    # allow_nan: JSON itself may carry NaN / Infinity (Python's json reads them)
    return dict(sd, **{key: torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)})


def _edit(t, index, value):
    t = t.clone()
    t.view(-1)[index] = value
    return t


# -- quantize_4bit: non-finite weights --------------------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("double_quant", [True, False], ids=["nested", "plain"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantize_refuses_non_finite_weight(bad, double_quant, dtype):
    w = _weight((12, 40), dtype=dtype)
    w[3, 7] = bad
    w[5, 0] = bad
    w[11, 39] = math.nan
    with pytest.raises(ValueError, match=r"^w has 3 non-finite value\(s\) \(NaN or Inf\) of 480 \(shape \(12, 40\)\), "
                       r"the first at index \(3, 7\) \(flat 127: (nan|inf|-inf)\)"):
        quantize_4bit(w, double_quant=double_quant)


def test_quantize_refuses_non_finite_weight_of_any_rank():
    w = torch.zeros(2, 3, 70)
    w[1, 2, 69] = math.inf
    with pytest.raises(ValueError, match=r"w has 1 non-finite .* index \(1, 2, 69\) \(flat 419: inf\)"):
        quantize_4bit(w, blocksize=32)


# -- the constructor: structure (cheap, reads no tensor data) -----------------------


def test_constructor_checks_structure_without_reading_data():
    # Meta tensors have no data: construction (run on every QLoRA call) must not read any.
    qw = quantize_4bit(_weight()).to("meta")
    assert qw.device.type == "meta"
    qw.validate(values=True)  # nothing to read on meta: structure only


@pytest.mark.parametrize(
    "shape,pattern",
    [
        ((16, 40.5), r"shape must be a sequence of positive integers, got \[16, 40.5\]"),
        ((True, 640), r"shape must be a sequence of positive integers, got \[True, 640\]"),
        ("16x40", r"shape must be a sequence of positive integers"),
    ],
    ids=["float", "bool", "string"],
)
def test_constructor_refuses_non_integer_shape(shape, pattern):
    qw = quantize_4bit(_weight())
    with pytest.raises(QuantStateError, match=pattern):
        QuantizedWeight(**_fields(qw, shape=shape))


def test_constructor_refuses_missing_tensor_with_a_named_error():
    qw = quantize_4bit(_weight(), double_quant=False)
    with pytest.raises(QuantStateError, match="absmax must be a torch.Tensor, got NoneType") as info:
        QuantizedWeight(**_fields(qw, absmax=None))
    assert isinstance(info.value, TypeError)  # the constructor's type errors stay TypeErrors too


def test_constructor_refuses_tensors_on_two_devices():
    qw = quantize_4bit(_weight())
    with pytest.raises(QuantStateError, match=r"nested_absmax is on meta but packed is on cpu"):
        QuantizedWeight(**_fields(qw, nested_absmax=qw.nested_absmax.to("meta")))


def test_constructor_refuses_a_nested_blocksize_bitsandbytes_cannot_write():
    qw = quantize_4bit(_weight())  # 10 blocks: one nested block for any nested blocksize >= 10
    with pytest.raises(QuantStateError, match=r"nested_blocksize must be one of \(64, .*4096\).* got 100"):
        QuantizedWeight(**_fields(qw, nested_blocksize=100))
    with pytest.raises(QuantStateError, match=r"nested_blocksize must be one of .* got 256.0"):
        QuantizedWeight(**_fields(qw, nested_blocksize=256.0))


def test_constructor_refuses_a_matrix_offset():
    qw = quantize_4bit(_weight())
    with pytest.raises(QuantStateError, match=r"offset must be one fp32 value \(shape \(\) or \[1\]\), got shape \(1, 1\)"):
        QuantizedWeight(**_fields(qw, offset=qw.offset.reshape(1, 1)))


def test_nested_absmax_must_match_nested_blocksize():
    qw = quantize_4bit(_weight((64, 300)))  # 300 blocks -> 2 nested blocks of 256
    with pytest.raises(QuantStateError, match=r"nested_absmax has shape \(2,\).*300 absmax blocks with "
                       r"nested_blocksize 128 need fp32 of shape \[3\]"):
        QuantizedWeight(**_fields(qw, nested_blocksize=128))


# -- values: validate(values=True), from_state_dict, from_bnb ------------------------


def test_valid_states_pass_every_check():
    for dq in (True, False):
        for qt in ("nf4", "fp4"):
            qw = quantize_4bit(_weight((33, 2047)), quant_type=qt, double_quant=dq)
            qw.validate(values=True)
            back = QuantizedWeight.from_state_dict(qw.state_dict("layer.weight"), "layer.weight")
            assert torch.equal(dequantize_4bit(back), dequantize_4bit(qw))
    zeros = quantize_4bit(torch.zeros(5, 9))  # absmax 0 (tail clamped to 1e-38): valid
    zeros.validate(values=True)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0], ids=["nan", "inf", "negative"])
def test_state_dict_absmax_must_be_finite_and_nonnegative(bad):
    sd = _sd(double_quant=False)  # 640 elements: 10 fp32 absmax
    sd["weight.absmax"] = _edit(sd["weight.absmax"], 4, bad)
    sd["weight.absmax"][7] = bad
    kind = "negative" if bad == -1.0 else r"non-finite value\(s\) \(NaN or Inf\)"
    want = "all >= 0" if bad == -1.0 else "all finite"
    with pytest.raises(QuantStateError, match=rf"^weight.absmax has 2 {kind} .*of 10, the first at index 4 "
                       rf"\({bad}\); expected the largest \|w\| of each block, {want}"):
        QuantizedWeight.from_state_dict(sd)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -0.5], ids=["nan", "inf", "negative"])
def test_state_dict_nested_absmax_must_be_finite_and_nonnegative(bad):
    sd = _sd(shape=(64, 600))  # 600 blocks -> 3 nested blocks
    sd["weight.nested_absmax"] = _edit(sd["weight.nested_absmax"], 1, bad)
    with pytest.raises(QuantStateError, match=r"^weight.nested_absmax has 1 .* of 3, the first at index 1"):
        QuantizedWeight.from_state_dict(sd)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_state_dict_offset_must_be_finite(value):
    sd = _with_meta(_sd(), nested_offset=value)
    with pytest.raises(QuantStateError, match=rf"{BLOB}\['nested_offset'\] is {value}; expected a finite number"):
        QuantizedWeight.from_state_dict(sd)


def test_state_dict_offset_must_be_a_number():
    with pytest.raises(QuantStateError, match=rf"{BLOB}\['nested_offset'\] must be a number, got '0.5'"):
        QuantizedWeight.from_state_dict(_with_meta(_sd(), nested_offset="0.5"))


def test_state_dict_restored_absmax_must_be_finite():
    # Each part finite, their sum overflows fp32: every value of the weight would be inf.
    sd = _with_meta(_sd(), nested_offset=3e38)
    sd["weight.nested_absmax"] = torch.full_like(sd["weight.nested_absmax"], 3e38)
    with pytest.raises(QuantStateError, match=r"the absmax restored from weight.absmax, weight.nested_absmax and "
                       rf"{BLOB}\['nested_offset'\] has \d+ non-finite"):
        QuantizedWeight.from_state_dict(sd)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_state_dict_quant_map_must_be_the_named_table(quant_type):
    sd = _sd(quant_type=quant_type)
    sd["weight.quant_map"] = _edit(sd["weight.quant_map"], 5, 0.3)
    with pytest.raises(QuantStateError, match=rf"^weight.quant_map is not the {quant_type} code table: 1 of 16 "
                       r"entries differ, the first at code 5 \(got 0.3.*, expected .*\); expected \[.*\]"):
        QuantizedWeight.from_state_dict(sd)
    # The other type's table under this type's name.
    other = "fp4" if quant_type == "nf4" else "nf4"
    sd["weight.quant_map"] = quant_map(other)
    with pytest.raises(QuantStateError, match=rf"weight.quant_map is not the {quant_type} code table"):
        QuantizedWeight.from_state_dict(sd)


def test_state_dict_nested_quant_map_must_be_the_dynamic_map():
    sd = _sd()
    scaled = sd["weight.nested_quant_map"] * 1.001
    with pytest.raises(QuantStateError, match=r"^weight.nested_quant_map is not bitsandbytes' signed 8-bit dynamic "
                       r"map .*: 255 of 256 entries differ by more than 9.5e-07 relative, the first at code 0"):
        QuantizedWeight.from_state_dict(dict(sd, **{"weight.nested_quant_map": scaled}))
    with pytest.raises(QuantStateError, match=r"weight.nested_quant_map has 1 non-finite value\(s\), the first at "
                       r"index 17"):
        QuantizedWeight.from_state_dict(dict(sd, **{"weight.nested_quant_map": _edit(dynamic_map(), 17, math.nan)}))
    # A last-bit difference (another torch's linspace rounding) is accepted.
    ulp = torch.nextafter(dynamic_map(), torch.tensor(2.0))
    ulp[dynamic_map() == 0] = 0.0
    ulp[dynamic_map() == 1] = 1.0
    QuantizedWeight.from_state_dict(dict(sd, **{"weight.nested_quant_map": ulp}))


def test_state_dict_dtype_and_shape_fields_are_checked():
    sd = _sd()
    with pytest.raises(QuantStateError, match=rf"{BLOB}\['dtype'\] is an unknown dtype 'float64'; expected one of"):
        QuantizedWeight.from_state_dict(_with_meta(sd, dtype="float64"))
    with pytest.raises(QuantStateError, match=rf"{BLOB}\['shape'\] must be a sequence of positive integers, got "
                       r"\[16, 40.0\]"):
        QuantizedWeight.from_state_dict(_with_meta(sd, shape=[16, 40.0]))
    with pytest.raises(QuantStateError, match=rf"{BLOB}\['shape'\] must be a non-empty list of positive sizes"):
        QuantizedWeight.from_state_dict(_with_meta(sd, shape=[0, 40]))
    with pytest.raises(QuantStateError, match=rf"{BLOB}\['nested_blocksize'\] must be one of .* got '256'"):
        QuantizedWeight.from_state_dict(_with_meta(sd, nested_blocksize="256"))
    with pytest.raises(QuantStateError, match=rf"{BLOB}\['blocksize'\] must be a power of two .* got 48"):
        QuantizedWeight.from_state_dict(_with_meta(sd, blocksize=48))


def test_state_dict_tensor_dtypes_and_layouts_are_checked():
    sd = _sd(double_quant=False)
    with pytest.raises(QuantStateError, match=r"weight.absmax must be fp32 without double quantization, got "
                       r"dtype torch.float16"):
        QuantizedWeight.from_state_dict(dict(sd, **{"weight.absmax": sd["weight.absmax"].half()}))
    with pytest.raises(QuantStateError, match=r"^weight has shape \(160, 2\); expected the packed codes as \[k, 1\]"):
        QuantizedWeight.from_state_dict(dict(sd, weight=sd["weight"].reshape(160, 2)))
    with pytest.raises(QuantStateError, match=r"weight.quant_map must be fp32 of shape \[16\], got \(15,\)"):
        QuantizedWeight.from_state_dict(dict(sd, **{"weight.quant_map": sd["weight.quant_map"][:15]}))
    blob = sd["weight.quant_state.bitsandbytes__nf4"]
    with pytest.raises(QuantStateError, match=r"must be a 1-D uint8 tensor \(the JSON bytes\), got torch.int64"):
        QuantizedWeight.from_state_dict(dict(sd, **{"weight.quant_state.bitsandbytes__nf4": blob.long()}))
    nested = _sd()
    with pytest.raises(QuantStateError, match=r"weight.nested_absmax has shape \(2,\) \(torch.float32\) but 10 "
                       r"absmax blocks with nested_blocksize 256 need fp32 of shape \[1\]"):
        QuantizedWeight.from_state_dict(dict(nested, **{"weight.nested_absmax": torch.ones(2)}))


def test_state_dict_failures_are_value_errors():
    sd = _sd()
    # A missing key is a ValueError (and still a KeyError, as it always was).
    with pytest.raises(ValueError, match="state dict lacks weight.nested_absmax") as info:
        QuantizedWeight.from_state_dict({k: v for k, v in sd.items() if k != "weight.nested_absmax"})
    assert isinstance(info.value, KeyError) and str(info.value).startswith("state dict lacks")
    with pytest.raises(ValueError, match=r"weight.absmax must be uint8 codes when double-quantized"):
        QuantizedWeight.from_state_dict(dict(sd, **{"weight.absmax": sd["weight.absmax"].float()}))


def test_qlora_loader_refuses_tampered_state_before_writing_the_weight():
    from torch import nn

    from fastlora.qlora import QLoRALinear

    torch.manual_seed(0)
    layer = QLoRALinear.from_linear(nn.Linear(40, 16), r=4)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    sd = dict(before)
    sd["weight.nested_absmax"] = _edit(sd["weight.nested_absmax"], 0, math.nan)
    with pytest.raises(RuntimeError, match=r"weight.nested_absmax has 1 non-finite value"):
        layer.load_state_dict(sd)
    for key, value in layer.state_dict().items():
        if key.startswith("weight"):
            assert torch.equal(value, before[key]), key


# -- from_bnb ------------------------------------------------------------------------


def _bnb_layer(double_quant):
    bnb = pytest.importorskip("bitsandbytes")
    from torch import nn

    torch.manual_seed(0)
    linear = nn.Linear(128, 32)
    layer = bnb.nn.Linear4bit(128, 32, compute_dtype=torch.float32, compress_statistics=double_quant, quant_type="nf4")
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu")


def test_from_bnb_checks_values_and_names_the_attribute():
    plain = _bnb_layer(double_quant=False)
    qs = plain.weight.quant_state
    qs.absmax[3] = math.nan
    with pytest.raises(QuantStateError, match=r"^quant_state.absmax has 1 non-finite value\(s\) .* first at index 3"):
        QuantizedWeight.from_bnb(plain)
    nested = _bnb_layer(double_quant=True)
    qs = nested.weight.quant_state
    qs.offset.fill_(math.inf)
    with pytest.raises(QuantStateError, match=r"^quant_state.offset is inf; expected a finite fp32 value"):
        QuantizedWeight.from_bnb(nested)
    nested = _bnb_layer(double_quant=True)
    nested.weight.quant_state.code[0] = 0.5
    with pytest.raises(QuantStateError, match=r"^quant_state.code is not the nf4 code table"):
        QuantizedWeight.from_bnb(nested.weight)
    nested.weight.quant_state.code.copy_(quant_map("nf4"))
    nested.weight.quant_state.state2.absmax[0] = -1.0
    with pytest.raises(QuantStateError, match=r"^quant_state.state2.absmax has 1 negative value"):
        QuantizedWeight.from_bnb(nested)
