"""fastlora.quant against bitsandbytes (>= 0.50, CPU) as the oracle: the same
packed bytes, the same absmax (plain, and the uint8 codes + nested absmax +
offset of double quantization), the same dequantized values, for NF4 and FP4,
every blocksize 32..4096, sizes that are not a multiple of the blocksize, odd
sizes, fp32/fp16/bf16 inputs; state dicts in both directions; exact storage
bytes; clear errors on corrupt or mismatched quant state."""

from __future__ import annotations

import io
import itertools
import json
from fractions import Fraction

import pytest
import torch
from torch import nn

from fastlora.quant import (
    BLOCKSIZES,
    QuantizedWeight,
    dequantize_4bit,
    dynamic_map,
    quant_map,
    quantize_4bit,
)

bnb = pytest.importorskip("bitsandbytes")
F = bnb.functional

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (7, 129): odd numel (a half-filled last byte), ragged last block for every blocksize;
# (64, 96): blocks cross rows, numel a multiple of 32..2048 but not 4096;
# (33, 2047): several blocks of 4096, ragged.
SHAPES = ((7, 129), (64, 96), (33, 2047))


def _weight(shape, dtype, blocksize, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.rand(shape[0], 1, generator=g) * 3
    flat = w.view(-1)
    flat[::7] = 0.0  # exact zeros (FP4 has two zero codes)
    if flat.numel() > 2 * blocksize:
        flat[blocksize : 2 * blocksize] = 0.0  # a whole block of zeros: absmax 0
    return w.to(dtype)


def _bnb_dequantize(q, state):
    """bitsandbytes' dequantized weight.

    bitsandbytes 0.50.2 on CPU runs a native kernel for even row lengths and
    blocksize < 2048, else its portable PyTorch implementation of the format.
    NOTE: the native kernel reads the wrong absmax when a block crosses a row
    boundary (its error is then ~2x the quantization error), so there the
    portable implementation is the oracle; it is called directly (not through
    its torch.compile wrapper, whose compiles would dominate this file's runtime).
    """
    native = state.shape[-1] % 2 == 0 and state.blocksize < 2048
    if native and (state.shape[-1] % state.blocksize == 0 or q.numel() * 2 <= state.blocksize):
        return F.dequantize_4bit(q, state)
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    compute = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)
    absmax = state.absmax
    if state.nested:
        absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return compute(q.view(-1), absmax, state.code, state.blocksize, state.shape, state.dtype)


def _bits(t):
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def test_code_tables_are_bitsandbytes():
    for qt in ("nf4", "fp4"):
        assert torch.equal(_bits(quant_map(qt)), _bits(F.get_4bit_type(qt, device="cpu")))
    assert torch.equal(_bits(dynamic_map()), _bits(F.create_dynamic_map(signed=True)))


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_bit_exact_with_bitsandbytes(quant_type, blocksize, double_quant):
    for (i, shape), dtype in itertools.product(enumerate(SHAPES), DTYPES):
        w = _weight(shape, dtype, blocksize, seed=blocksize + i)
        q, state = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type)
        qw = quantize_4bit(w, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)
        what = f"{quant_type} bs={blocksize} {shape} {dtype}"
        assert torch.equal(qw.packed, q), f"packed bytes differ: {what}"
        assert qw.absmax.dtype == state.absmax.dtype and torch.equal(qw.absmax, state.absmax), f"absmax: {what}"
        assert torch.equal(_bits(qw.quant_map), _bits(state.code)), what
        assert qw.double_quant == double_quant
        if double_quant:
            assert torch.equal(_bits(qw.nested_absmax), _bits(state.state2.absmax)), f"nested absmax: {what}"
            assert torch.equal(_bits(qw.offset.reshape(1)), _bits(state.offset.reshape(1))), f"offset: {what}"
            assert torch.equal(_bits(qw.nested_quant_map), _bits(state.state2.code)), what
            assert qw.nested_blocksize == state.state2.blocksize
        ours = dequantize_4bit(qw)
        assert ours.dtype == dtype and tuple(ours.shape) == shape
        assert torch.equal(_bits(ours), _bits(_bnb_dequantize(q, state))), f"dequantized values differ: {what}"


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize(
    "w",
    [
        torch.full((8, 8), 0.75),  # one block: absmax - offset == 0 for double quant (0 / 0)
        torch.zeros(5, 9),  # all zeros; the short tail block's absmax is clamped to 1e-38
        torch.tensor([[-2.0, 2.0, 0.0]]),  # ties in sign, odd numel
        torch.linspace(-1, 1, 4096).reshape(64, 64),  # exact code midpoints are hit
    ],
    ids=["constant", "zeros", "tiny", "ramp"],
)
def test_edge_cases_bit_exact(quant_type, w):
    for double_quant in (False, True):
        q, state = F.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type=quant_type)
        qw = quantize_4bit(w, quant_type=quant_type, blocksize=64, double_quant=double_quant)
        assert torch.equal(qw.packed, q) and torch.equal(qw.absmax, state.absmax)
        if double_quant:
            assert torch.equal(qw.nested_absmax, state.state2.absmax) and torch.equal(qw.offset, state.offset)
        assert torch.equal(_bits(dequantize_4bit(qw)), _bits(_bnb_dequantize(q, state)))


def test_dequantize_to_another_dtype_rounds_once():
    w = _weight((32, 96), torch.float32, 64, seed=3)
    qw = quantize_4bit(w)
    full = dequantize_4bit(qw, torch.float64)
    # The product is computed (and rounded) in fp32, then cast once: fp64 adds nothing.
    assert torch.equal(dequantize_4bit(qw, torch.float32).double(), full)
    for dtype in (torch.float16, torch.bfloat16):
        assert torch.equal(dequantize_4bit(qw, dtype), dequantize_4bit(qw, torch.float32).to(dtype))


def _float64_dequantize(qw):
    """Independent oracle: code[nibble] * absmax[block] in float64 (exact), rounded to fp32 once."""
    packed = qw.packed.reshape(-1).long()
    codes = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)[: qw.numel]
    absmax = qw.absmax_fp32().double()
    blocks = torch.arange(qw.numel) // qw.blocksize
    return (qw.quant_map.double()[codes] * absmax[blocks]).float().reshape(qw.shape)


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_chunked_dequantize_bit_exact(monkeypatch, quant_type, double_quant):
    """The CPU path works chunk by chunk (fastlora.quant._CPU_CHUNK elements);
    with tiny chunks every boundary case shows up in small weights: chunks of
    one block and of several, a ragged last block, an odd last element, the
    fp32 output written in place and the other dtypes through the fp32 buffer."""
    import fastlora.quant as quant

    for (i, shape), dtype, blocksize in itertools.product(enumerate(SHAPES), DTYPES, (32, 256)):
        # 128: one chunk per block or a few blocks; 8192 for the large shape: ~8 chunks, not ~500.
        monkeypatch.setattr(quant, "_CPU_CHUNK", 128 if shape[0] * shape[1] < 10_000 else 8192)
        w = _weight(shape, dtype, blocksize, seed=100 + i)
        q, state = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type)
        qw = quantize_4bit(w, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)
        what = f"{quant_type} bs={blocksize} {shape} {dtype}"
        ours = dequantize_4bit(qw)
        assert torch.equal(_bits(ours), _bits(_bnb_dequantize(q, state))), f"dequantized values differ: {what}"
        fp32 = dequantize_4bit(qw, torch.float32)
        assert torch.equal(_bits(fp32), _bits(_float64_dequantize(qw))), f"fp32 differs from the oracle: {what}"
        assert torch.equal(dequantize_4bit(qw, torch.float64), fp32.double()), what


@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,))
def test_dequantize_over_several_default_chunks(dtype):
    import fastlora.quant as quant

    # 257 x 4097 = 1052929 elements: two full default chunks (2**19), then a short
    # one with a ragged last block (one element) and an odd last element.
    shape = (257, 4097)
    assert 2 * quant._CPU_CHUNK < shape[0] * shape[1] < 3 * quant._CPU_CHUNK
    w = _weight(shape, torch.float32 if dtype == torch.float64 else dtype, 64, seed=7)
    qw = quantize_4bit(w, quant_type="nf4", blocksize=64, double_quant=True)
    out = dequantize_4bit(qw, dtype)
    assert out.dtype == dtype and out.shape == shape and out.is_contiguous()
    # A fresh tensor of exactly the weight's size (no view into a larger buffer).
    assert out.untyped_storage().nbytes() == out.numel() * out.element_size()
    assert torch.equal(out, _float64_dequantize(qw).to(dtype))
    if dtype != torch.float64:
        q, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        assert torch.equal(_bits(out), _bits(_bnb_dequantize(q, state)))


def test_cached_byte_table_follows_the_quant_map():
    """The byte -> pair table is cached per quant_map tensor: an in-place change
    of that tensor (version counter), another tensor, and an inference tensor
    (no version counter, so never cached) each dequantize to the float64 oracle
    of the code table they hold."""
    w = _weight((16, 64), torch.float32, 64, seed=11)
    qw = quantize_4bit(w, quant_type="nf4", blocksize=64, double_quant=False)
    assert torch.equal(dequantize_4bit(qw), _float64_dequantize(qw))
    qw.quant_map.mul_(0.5)  # exact (a power of two); the cached table is stale now
    assert torch.equal(dequantize_4bit(qw), _float64_dequantize(qw))
    other = QuantizedWeight(packed=qw.packed, absmax=qw.absmax, quant_map=quant_map("nf4"), quant_type="nf4",
                            blocksize=64, shape=qw.shape, dtype=qw.dtype)
    assert torch.equal(dequantize_4bit(other), _float64_dequantize(other))
    with torch.inference_mode():
        qi = quantize_4bit(w, quant_type="fp4", blocksize=64, double_quant=False)
        first = dequantize_4bit(qi)
        qi.quant_map.mul_(0.5)
        second = dequantize_4bit(qi)
    assert torch.equal(first, _float64_dequantize(qi) * 2) and torch.equal(second, _float64_dequantize(qi))


# -- bitsandbytes modules and state dicts ----------------------------------------


def _bnb_linear4bit(linear, quant_type, double_quant):
    layer = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=torch.float32,
        compress_statistics=double_quant,
        quant_type=quant_type,
    )
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu")  # quantizes


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False), ("nf4", False)])
def test_from_bnb_linear4bit_and_its_state_dict(quant_type, double_quant):
    torch.manual_seed(0)
    linear = nn.Linear(128, 96)
    l4 = _bnb_linear4bit(linear, quant_type, double_quant)
    from_module = QuantizedWeight.from_bnb(l4)
    from_param = QuantizedWeight.from_bnb(l4.weight)
    sd = l4.state_dict()
    from_sd = QuantizedWeight.from_state_dict(sd, "weight")
    ours = quantize_4bit(linear.weight.detach(), quant_type=quant_type, double_quant=double_quant)
    expected = F.dequantize_4bit(l4.weight.data, l4.weight.quant_state)
    for qw in (from_module, from_param, from_sd, ours):
        assert torch.equal(dequantize_4bit(qw), expected)
    # Our state dict is bitsandbytes', byte for byte (JSON blob included).
    written = ours.state_dict("weight")
    assert set(written) == set(sd) - {"bias"}
    for key, value in written.items():
        assert value.dtype == sd[key].dtype and torch.equal(value, sd[key]), key


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", True), ("nf4", False)])
def test_our_state_dict_loads_into_bitsandbytes(quant_type, double_quant):
    torch.manual_seed(1)
    w = torch.randn(64, 192)
    qw = quantize_4bit(w, quant_type=quant_type, blocksize=64, double_quant=double_quant)
    buf = io.BytesIO()
    torch.save(qw.state_dict("weight"), buf)  # through a file, as a checkpoint would go
    sd = torch.load(io.BytesIO(buf.getvalue()))
    stats = {k[len("weight.") :]: v for k, v in sd.items() if k.startswith("weight.")}
    param = bnb.nn.Params4bit.from_prequantized(data=sd["weight"], quantized_stats=stats, device="cpu")
    layer = bnb.nn.Linear4bit(192, 64, bias=False, compute_dtype=torch.float32)
    layer.weight = param
    assert torch.equal(F.dequantize_4bit(param.data, param.quant_state), dequantize_4bit(qw))
    x = torch.randn(5, 192)
    # bitsandbytes' forward on CPU: dequantize, then the same fp32 matmul.
    assert torch.equal(layer(x), x @ dequantize_4bit(qw).t())


def test_state_dict_round_trip_and_metadata():
    qw = quantize_4bit(torch.randn(10, 33, dtype=torch.bfloat16), quant_type="fp4", blocksize=32)
    sd = qw.state_dict("layer.weight")
    meta = json.loads(bytes(sd["layer.weight.quant_state.bitsandbytes__fp4"].tolist()))
    assert meta["quant_type"] == "fp4" and meta["blocksize"] == 32 and meta["dtype"] == "bfloat16"
    assert meta["shape"] == [10, 33] and meta["nested_blocksize"] == 256
    back = QuantizedWeight.from_state_dict(sd, "layer.weight")
    assert back.dtype == torch.bfloat16 and back.shape == (10, 33)
    assert torch.equal(dequantize_4bit(back), dequantize_4bit(qw))


# -- storage ---------------------------------------------------------------------


@pytest.mark.parametrize("blocksize", [64, 128, 4096])
def test_storage_bytes_per_parameter_are_exact(blocksize):
    n_out, n_in = 256, 1024
    n = n_out * n_in
    nblocks = n // blocksize
    w = torch.randn(n_out, n_in)
    plain = quantize_4bit(w, blocksize=blocksize, double_quant=False)
    # 4 bits per weight + one fp32 absmax per block.
    assert Fraction(plain.nbytes(include_tables=False), n) == Fraction(1, 2) + Fraction(4, blocksize)
    nested = quantize_4bit(w, blocksize=blocksize, double_quant=True)
    # 4 bits + one uint8 absmax code per block + fp32 nested absmax per 256 blocks + the fp32 offset.
    nested_extra = 4 * -(-nblocks // 256) + 4
    assert Fraction(nested.nbytes(include_tables=False), n) == Fraction(1, 2) + Fraction(1, blocksize) + Fraction(
        nested_extra, n
    )
    # The code tables (16 + 256 fp32) are the only other storage.
    assert nested.nbytes() == nested.nbytes(include_tables=False) + 4 * (16 + 256)
    assert plain.nbytes() == plain.nbytes(include_tables=False) + 4 * 16


# -- errors ----------------------------------------------------------------------


def _fields(qw, **changes):
    base = dict(
        packed=qw.packed,
        absmax=qw.absmax,
        quant_map=qw.quant_map,
        quant_type=qw.quant_type,
        blocksize=qw.blocksize,
        shape=qw.shape,
        dtype=qw.dtype,
        nested_absmax=qw.nested_absmax,
        nested_quant_map=qw.nested_quant_map,
        offset=qw.offset,
    )
    base.update(changes)
    return base


def test_corrupt_quant_state_is_rejected_clearly():
    qw = quantize_4bit(torch.randn(16, 40), blocksize=64)  # 640 elements -> 10 blocks
    with pytest.raises(ValueError, match=r"absmax has shape \(9,\).*10 blocks.*expected absmax of shape \[10\]"):
        QuantizedWeight(**_fields(qw, absmax=qw.absmax[:9]))
    with pytest.raises(ValueError, match=r"quant_type must be one of \('nf4', 'fp4'\), got 'int4'"):
        QuantizedWeight(**_fields(qw, quant_type="int4"))
    with pytest.raises(ValueError, match=r"packed has 320 bytes .* shape \(16, 41\) \(656 elements\) needs 328 bytes"):
        QuantizedWeight(**_fields(qw, shape=(16, 41)))
    with pytest.raises(ValueError, match=r"blocksize must be a power of two in \[32, 4096\].*got 100"):
        QuantizedWeight(**_fields(qw, blocksize=100))
    with pytest.raises(ValueError, match="nested_absmax, nested_quant_map and offset together"):
        QuantizedWeight(**_fields(qw, offset=None))
    with pytest.raises(TypeError, match="absmax must be uint8 codes when double-quantized"):
        QuantizedWeight(**_fields(qw, absmax=qw.absmax.float()))
    with pytest.raises(TypeError, match="packed must be uint8"):
        QuantizedWeight(**_fields(qw, packed=qw.packed.float()))


def test_bad_arguments_to_quantize_are_rejected_clearly():
    w = torch.randn(8, 8)
    with pytest.raises(ValueError, match=r"blocksize must be a power of two in \[32, 4096\].*got 48"):
        quantize_4bit(w, blocksize=48)
    with pytest.raises(ValueError, match=r"got 16"):
        quantize_4bit(w, blocksize=16)
    with pytest.raises(ValueError, match=r"quant_type must be one of \('nf4', 'fp4'\), got 'nf8'"):
        quantize_4bit(w, quant_type="nf8")
    with pytest.raises(TypeError, match="fp32, fp16 or bf16, got dtype torch.int32"):
        quantize_4bit(w.int())
    with pytest.raises(ValueError, match="must not be empty"):
        quantize_4bit(torch.empty(0, 4))


def test_corrupt_state_dict_is_rejected_clearly():
    sd = quantize_4bit(torch.randn(16, 40)).state_dict("weight")
    bad = dict(sd, **{"weight.absmax": sd["weight.absmax"][:-1]})
    with pytest.raises(ValueError, match="absmax has shape"):
        QuantizedWeight.from_state_dict(bad)
    blob = json.loads(bytes(sd["weight.quant_state.bitsandbytes__nf4"].tolist()))
    for field, value, pattern in [
        ("quant_type", "fp4", "says quant_type='fp4', its key says 'nf4'"),
        ("shape", [16, 44], r"weight has 320 bytes \(shape \(320, 1\)\) but shape \(16, 44\) \(704 elements\) needs 352 bytes"),
        ("dtype", "float8", "unknown dtype 'float8'"),
    ]:
        meta = dict(blob, **{field: value})
        tensor = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
        with pytest.raises(ValueError, match=pattern):
            QuantizedWeight.from_state_dict(dict(sd, **{"weight.quant_state.bitsandbytes__nf4": tensor}))
    no_nested = {k: v for k, v in sd.items() if k != "weight.nested_absmax"}
    with pytest.raises(KeyError, match="lacks weight.nested_absmax"):
        QuantizedWeight.from_state_dict(no_nested)
    with pytest.raises(ValueError, match="expected exactly one"):
        QuantizedWeight.from_state_dict({k: v for k, v in sd.items() if "quant_state" not in k})
    garbage = dict(sd, **{"weight.quant_state.bitsandbytes__nf4": torch.tensor([1, 2, 3], dtype=torch.uint8)})
    with pytest.raises(ValueError, match="not a JSON quant state"):
        QuantizedWeight.from_state_dict(garbage)
    with pytest.raises(TypeError, match="expected a bitsandbytes Linear4bit or Params4bit, got Linear"):
        QuantizedWeight.from_bnb(nn.Linear(2, 2))
