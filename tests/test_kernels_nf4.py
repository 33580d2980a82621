"""Tier 2 and 3 for kernels/nf4.py: the 4-bit dequant kernel and the QLoRA
dequant-in-GEMM kernels under the Triton interpreter (fp32 / fp16, CPU)
against the reference path and float64, and every kernel variant compiled
ahead of time for sm_80 / sm_90 without register spills.

Run alone for the AOT table: ``python tests/test_kernels_nf4.py`` (JSON lines).
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

from _aot import ARCHS, REPO, check_compiled, compile_in_subprocess, compile_variant, launch_signature



# ---------------------------------------------------------------------------
# interpreter tier
# ---------------------------------------------------------------------------

EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10}  # 2 ulps: the final rounding, with margin


def _inputs(m, k, n, r, dtype, quant_type="nf4", blocksize=64, double_quant=True, bias=True, seed=0):
    from fastlora.quant import quantize_4bit

    g = torch.Generator().manual_seed(seed)
    qw = quantize_4bit(torch.randn(n, k, generator=g) / k**0.5, quant_type, blocksize, double_quant)
    x = torch.randn(m, k, generator=g).to(dtype)
    lora_A = (torch.randn(r, k, generator=g) / k**0.5).to(dtype)
    lora_B = (torch.randn(n, r, generator=g) / r**0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return x, qw, lora_A, lora_B, b


def _check(got, ref, oracle, dtype, what):
    """The DESIGN rule: the kernel's error against float64 is at most 2x the
    reference path's own error in the same dtype (plus a few ulps of the
    output's scale, for outputs where the reference happens to be exact)."""
    from _oracles import assert_close_to

    # NOTE: NaN compares false: a NaN or inf where float64 is finite (and in range) fails here.
    bad = (~torch.isfinite(got) & (oracle.abs() <= torch.finfo(got.dtype).max)).nonzero()
    assert bad.numel() == 0, f"{what}: non-finite where float64 is finite and in range at {bad[:5].tolist()} ({len(bad)} elements)"
    ref_err = (ref.double() - oracle).abs().max().item()
    tol = 2 * ref_err + 4 * EPS[dtype] * oracle.abs().max().item()
    assert_close_to(got, oracle, tol, what)


@pytest.mark.interpreter
@pytest.mark.parametrize(
    "shape,quant_type,blocksize,double_quant",
    [
        ((5, 7), "nf4", 32, True),  # odd numel: the last byte is half used
        ((33, 70), "fp4", 64, False),  # blocks cross rows, ragged last block
        ((40, 100), "nf4", 128, True),
        ((3, 1500), "fp4", 4096, True),  # one ragged block larger than the launch block
    ],
)
def test_dequant_kernel_is_bit_exact(shape, quant_type, blocksize, double_quant):
    from fastlora.kernels import nf4
    from fastlora.quant import dequantize_4bit, quantize_4bit

    w = torch.randn(shape, generator=torch.Generator().manual_seed(blocksize))
    qw = quantize_4bit(w, quant_type, blocksize, double_quant)
    for dtype in (torch.float32, torch.float16):
        nf4.reset_launch_count()
        got = nf4.dequantize_4bit(qw, dtype)
        assert nf4.launch_count() == 1  # de-nesting included
        # fp products rounded exactly as the reference (no FMA in the interpreter
        # either): bit-identical.
        assert torch.equal(got, dequantize_4bit(qw, dtype))


def _grads(fn, x, lora_A, lora_B, bias, dy):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, lora_A, lora_B)]
    b = bias.detach().clone().requires_grad_(True) if bias is not None else None
    y = fn(leaves[0], leaves[1], leaves[2], b)
    y.backward(dy)
    return [y.detach()] + [t.grad for t in leaves] + ([b.grad] if b is not None else [])


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize(
    "m,k,n,r,quant_type,double_quant,bias",
    [
        (37, 70, 45, 5, "nf4", True, True),  # ragged everything, rank padded 5 -> 16
        (32, 64, 32, 16, "fp4", False, False),  # power-of-two tiles, no bias
    ],
)
def test_qlora_linear_forward_and_backward(m, k, n, r, quant_type, double_quant, bias, dtype):
    import fastlora
    from fastlora.kernels import nf4
    from fastlora.qlora import qlora_linear
    from fastlora.quant import dequantize_4bit

    x, qw, lora_A, lora_B, b = _inputs(m, k, n, r, dtype, quant_type, 64, double_quant, bias)
    dy = torch.randn(m, n, generator=torch.Generator().manual_seed(1)).to(dtype)
    scaling = 0.75

    nf4.reset_launch_count()
    got = _grads(lambda *t: qlora_linear(t[0], qw, t[1], t[2], scaling, t[3]), x, lora_A, lora_B, b, dy)
    # One counter for all kernels: forward = shrink + dequant-in-GEMM, backward =
    # dY pass + dequant-in-GEMM dX + dA: the LoRA budget of 2 + 3 launches.
    assert nf4.launch_count() == 5
    fastlora.set_backend("reference")
    ref = _grads(lambda *t: qlora_linear(t[0], qw, t[1], t[2], scaling, t[3]), x, lora_A, lora_B, b, dy)
    fastlora.set_backend("triton")
    # float64 oracle on the same dequantized weight (rounded to dtype, as both paths do).
    w64 = dequantize_4bit(qw, dtype).double()
    oracle = _grads(
        lambda xx, aa, bb, bi: xx @ w64.t() + scaling * (xx @ aa.t()) @ bb.t() + (bi if bi is not None else 0),
        x.double(), lora_A.double(), lora_B.double(), b.double() if b is not None else None, dy.double(),
    )  # fmt: skip
    for g, rf, o, what in zip(got, ref, oracle, ["y", "dx", "dA", "dB", "dbias"]):
        assert g.dtype == dtype
        _check(g, rf, o, dtype, what)


@pytest.mark.interpreter
def test_dropout_mask_is_the_lora_kernels_mask():
    """With the same seed the QLoRA kernels and the LoRA kernels (on the
    dequantized weight) draw the same Philox mask in forward and backward."""
    import fastlora
    from fastlora.qlora import qlora_linear
    from fastlora.quant import dequantize_4bit

    x, qw, lora_A, lora_B, b = _inputs(20, 40, 24, 4, torch.float32)
    w = dequantize_4bit(qw)
    dy = torch.randn(20, 24, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(5)
    got = _grads(lambda *t: qlora_linear(t[0], qw, t[1], t[2], 0.5, t[3], dropout=0.4), x, lora_A, lora_B, b, dy)
    torch.manual_seed(5)
    want = _grads(lambda *t: fastlora.lora_linear(t[0], w, t[1], t[2], 0.5, t[3], dropout=0.4), x, lora_A, lora_B, b, dy)
    torch.manual_seed(5)
    no_drop = _grads(lambda *t: qlora_linear(t[0], qw, t[1], t[2], 0.5, t[3]), x, lora_A, lora_B, b, dy)
    from _oracles import assert_close_to

    # Same tiles, same fp32 operands (W dequantized exactly), same masks: equal up
    # to the order of the fp32 sums (a few ulps of the output's scale).
    for g, h, what in zip(got, want, ["y", "dx", "dA", "dB", "dbias"]):
        assert_close_to(g, h, 1e-5 * max(1.0, h.abs().max().item()), what)
    assert not torch.allclose(got[1], no_drop[1])  # the mask really dropped something in dX


@pytest.mark.interpreter
def test_qlora_module_on_the_triton_backend():
    import fastlora
    from torch import nn

    from fastlora.qlora import QLoRALinear

    torch.manual_seed(6)
    q = QLoRALinear.from_linear(nn.Linear(48, 40), r=4)
    with torch.no_grad():
        q.lora_B.normal_()
    x = torch.randn(2, 9, 48)
    y = q(x)
    fastlora.set_backend("reference")
    y_ref = q(x)
    fastlora.set_backend("triton")
    from _oracles import assert_close_to

    # fp32 IEEE dots vs torch's fp32 GEMM: summation order only.
    assert_close_to(y, y_ref, 1e-5 * y_ref.abs().max().item(), "QLoRALinear on Triton")


def _nonfinite_pattern_equal(got, want, what):
    for name, fn in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        bad = (fn(got) != fn(want)).nonzero()
        assert bad.numel() == 0, f"{what}: {name} pattern differs at {bad[:5].tolist()} ({len(bad)} elements)"


@pytest.mark.interpreter
def test_qlora_lora_term_beyond_fp16_range():
    """fp16, scaling * S > 65504 while y is finite: the dequant-in-GEMM's epilogue
    (shared with the LoRA GEMM) gives y within the 2x rule of float64 (it gave
    NaN: the hi/lo split of scaling * S overflowed fp16); an inf in x gives the
    reference's inf / NaN pattern."""
    from fastlora import reference
    from fastlora.kernels import nf4
    from fastlora.quant import dequantize_4bit

    m, k, n, r = 37, 64, 40, 8
    x, qw, _, _, bias = _inputs(m, k, n, r, torch.float16, seed=3)
    g = torch.Generator().manual_seed(4)
    lora_A = (100.0 * torch.randn(r, k, generator=g)).half()
    lora_B = (1e-3 * torch.randn(n, r, generator=g)).half()
    scaling = 200.0
    w = dequantize_4bit(qw, torch.float16)
    y, s = nf4.qlora_forward(x, qw, lora_A, lora_B, scaling, bias)
    assert (scaling * s.double()).abs().max() > 65504
    y_ref, _ = reference.lora_forward(x, w, lora_A, lora_B, scaling, bias)
    s64 = x.double() @ lora_A.double().t()
    y64 = x.double() @ w.double().t() + scaling * s64 @ lora_B.double().t() + bias.double()
    assert y64.abs().max() < 65504
    _check(y, y_ref, y64, torch.float16, "y (scaling * S beyond fp16)")

    x2, qw2, a2, b2, bias2 = _inputs(m, k, n, 1, torch.float16, seed=5)
    x2[4, 7] = float("inf")
    x2[30, 0] = float("-inf")
    y2, _ = nf4.qlora_forward(x2, qw2, a2, b2, 0.5, bias2)
    y2_ref, _ = reference.lora_forward(x2, dequantize_4bit(qw2, torch.float16), a2, b2, 0.5, bias2)
    assert torch.isinf(y2_ref).any()
    _nonfinite_pattern_equal(y2, y2_ref, "y (inf in x)")


@pytest.mark.interpreter
@pytest.mark.parametrize("dropout", [0.0, 0.25], ids=["p0", "p0.25"])
def test_qlora_fp32_adapters_on_fp16_activations(dropout):
    """qlora_forward / qlora_backward with fp32 lora_A / lora_B on fp16 x: s, dA,
    dB in fp32 (an fp32 LoRA branch, as reference.py's mixed path), y, dx, dbias
    in fp16, each within the 2x rule of float64 on the dequantized weight."""
    from fastlora.kernels import lora as K
    from fastlora.kernels import nf4
    from fastlora.quant import dequantize_4bit

    m, k, n, r = 37, 70, 45, 5
    x, qw, _, _, bias = _inputs(m, k, n, r, torch.float16, seed=6)
    g = torch.Generator().manual_seed(7)
    lora_A = torch.randn(r, k, generator=g) / k**0.5
    lora_B = torch.randn(n, r, generator=g) / r**0.5
    dy = torch.randn(m, n, generator=g).half()
    scaling, seed = 0.75, 31
    nf4.reset_launch_count()
    y, s = nf4.qlora_forward(x, qw, lora_A, lora_B, scaling, bias, dropout, seed)
    dx, _, da, db, dbias = nf4.qlora_backward(dy, x, qw, lora_A, lora_B, s, scaling, dropout, seed,
                                             (True, False, True, True, True))  # fmt: skip
    assert nf4.launch_count() == 5
    assert (y.dtype, s.dtype, dx.dtype, da.dtype, db.dtype, dbias.dtype) == (
        torch.float16, torch.float32, torch.float16, torch.float32, torch.float32, torch.float16)
    w = dequantize_4bit(qw, torch.float16)
    if dropout:
        mask, keep = K.dropout_keep_mask(seed, (m, k), dropout, x.device)
    else:
        mask, keep = torch.ones(m, k, dtype=torch.bool), 1.0
    # reference.py's mixed path with the kernels' mask (fp32 branch): the yardstick.
    xd = x.float() * mask / keep
    s_t = xd @ lora_A.t()
    y_t = torch.addmm(torch.addmm(bias, x, w.t()).float(), s_t, lora_B.t(), alpha=scaling).half()
    ds_t = scaling * (dy.float() @ lora_B)
    torch_out = [y_t, s_t, (dy @ w).add_((ds_t @ lora_A) * mask / keep), ds_t.t() @ xd, scaling * (dy.float().t() @ s_t), dy.sum(0)]
    xd64 = x.double() * mask / keep
    s64 = xd64 @ lora_A.double().t()
    ds64 = scaling * dy.double() @ lora_B.double()
    oracle = [
        x.double() @ w.double().t() + scaling * s64 @ lora_B.double().t() + bias.double(),
        s64,
        dy.double() @ w.double() + (ds64 @ lora_A.double()) * mask / keep,
        ds64.t() @ xd64,
        scaling * dy.double().t() @ s64,
        dy.double().sum(0),
    ]
    for got, want, o, what in zip([y, s, dx, da, db, dbias], torch_out, oracle, ["y", "s", "dx", "dA", "dB", "dbias"]):
        _check(got, want, o, got.dtype, f"{what} (fp32 adapters)")


# ---------------------------------------------------------------------------
# AOT tier: compile every variant for sm_80 / sm_90 (runs in a subprocess)
# ---------------------------------------------------------------------------


def _variants():
    """Each config ``configs.qlora_gemm_configs`` returns for each arch, dtype and
    flag set: forward (bias) and dX (with and without dropout), double-quantized
    (the superset of the code); plus the variants whose code differs in a flag
    only: no bias, plain fp32 absmax (fp16), wider ranks (bf16: 64, 128, 256,
    the epilogue stepping through ranks above 64), fp32 adapters on bf16
    activations (the rank-r term from split fp32 operands)."""
    import torch

    from fastlora.kernels import configs

    names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    out = []

    def gemm(kind, arch, dtype, c, block_r=16, bias=False, dropout=False, nested=True, adapters=None):
        tiles = dict(c.kwargs)
        tiles.update(
            W_ROWS_ARE_OUT=kind == "fwd", BLOCKSIZE=64, NESTED=nested, NESTED_BLOCKSIZE=256,
            HAS_BIAS=bias, HAS_DROPOUT=dropout, IEEE=dtype == torch.float32, BLOCK_R=block_r,
            F32_ADAPTERS=adapters == "fp32", R_CHUNK=configs.rank_chunk(block_r, dtype, adapters == "fp32"),
        )  # fmt: skip
        k = c.kwargs
        tag = f"{k['BLOCK_M']}x{k['BLOCK_N']}x{k['BLOCK_K']} R={block_r} bias={bias} dropout={dropout} nested={nested}"
        tag += " fp32-adapters" if adapters == "fp32" else ""
        out.append(dict(kernel=kind, arch=arch, dtype=names[dtype], tiles=tiles, num_warps=c.num_warps,
                        num_stages=c.num_stages, tag=tag, adapters=adapters or names[dtype]))  # fmt: skip

    cfg = configs.dequant_config()
    for arch in ARCHS:
        for dtype in names:
            for nested in (False, True):
                tiles = dict(BLOCK=cfg.kwargs["BLOCK"], BLOCKSIZE=64, NESTED=nested, NESTED_BLOCKSIZE=256)
                out.append(dict(kernel="dequant", arch=arch, dtype=names[dtype], tiles=tiles, num_warps=cfg.num_warps,
                                num_stages=1, tag=f"nested={nested}"))  # fmt: skip
            for c in configs.qlora_gemm_configs(arch, dtype):
                gemm("fwd", arch, dtype, c, bias=True)
                gemm("dx", arch, dtype, c)
            for c in configs.qlora_gemm_configs(arch, dtype, has_dropout=True):
                gemm("dx", arch, dtype, c, dropout=True)
        first = configs.qlora_gemm_configs(arch, torch.float16)[0]
        gemm("fwd", arch, torch.float16, first, bias=False)
        gemm("fwd", arch, torch.float16, first, bias=True, nested=False)
        gemm("dx", arch, torch.float16, first, nested=False)
        for block_r in (64, 128, 256):
            for c in configs.qlora_gemm_configs(arch, torch.bfloat16, has_dropout=True, block_r=block_r):
                gemm("fwd", arch, torch.bfloat16, c, block_r=block_r, bias=True)
                gemm("dx", arch, torch.bfloat16, c, block_r=block_r, dropout=True)
        for block_r in (16, 64):
            for c in configs.qlora_gemm_configs(arch, torch.bfloat16, block_r=block_r, lora_f32=True):
                gemm("fwd", arch, torch.bfloat16, c, block_r=block_r, bias=True, adapters="fp32")
            for c in configs.qlora_gemm_configs(arch, torch.bfloat16, has_dropout=True, block_r=block_r, lora_f32=True):
                gemm("dx", arch, torch.bfloat16, c, block_r=block_r, dropout=True, adapters="fp32")
    return out


def _compile_one(v):
    from fastlora.kernels import nf4

    x = v["dtype"]
    nested = v["tiles"]["NESTED"]
    if v["kernel"] == "dequant":
        fn = nf4._dequant_4bit_kernel
        ptrs = dict(packed_ptr="u8", quant_map_ptr="fp32", absmax_ptr="u8" if nested else "fp32", nested_absmax_ptr="fp32",
                    nested_map_ptr="fp32", offset_ptr="fp32", out_ptr=x)  # fmt: skip
        unit, div16 = (), ("packed_ptr", "out_ptr")
        options = dict(num_warps=v["num_warps"], num_stages=1, enable_fp_fusion=False)
    else:
        fn = nf4._qlora_gemm_kernel
        fwd = v["kernel"] == "fwd"
        a = v["adapters"]  # the adapters' dtype: x's, or fp32
        ptrs = dict(p_ptr=x, packed_ptr="u8", quant_map_ptr="fp32", absmax_ptr="u8" if nested else "fp32",
                    nested_absmax_ptr="fp32", nested_map_ptr="fp32", offset_ptr="fp32", l_ptr=a if fwd else "fp32",
                    e_ptr=a, bias_ptr=x, out_ptr=x)  # fmt: skip
        # Contiguous operands: unit inner strides; row strides and sizes multiples of 16.
        unit = ("stride_pk", "stride_lr", "stride_on") + (("stride_er",) if fwd else ("stride_en",))
        div16 = ("p_ptr", "packed_ptr", "out_ptr", "stride_pm", "stride_om", "OUT", "RED", "K_w")
        options = dict(num_warps=v["num_warps"], num_stages=v["num_stages"])
    constexprs = dict(v["tiles"])
    constexprs.update({name: 1 for name in unit})
    signature = launch_signature(fn, constexprs, ptrs)
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in fn.arg_names if n in div16}
    return compile_variant(v, fn, signature, constexprs, attrs, options)


def main() -> None:
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    variants = _variants()
    done = 0
    try:
        with ProcessPoolExecutor(max_workers=2) as pool:
            for result in pool.map(_compile_one, variants, chunksize=1):
                print(json.dumps(result), flush=True)
                done += 1
    except BrokenProcessPool:
        # A worker died (e.g. killed for memory on a busy machine): finish in this process.
        for v in variants[done:]:
            print(json.dumps(_compile_one(v)), flush=True)


def _describe(r) -> str:
    return f"{r['kernel']:7s} sm_{r['arch']} {r['dtype']} {r['tag']} w{r['num_warps']} s{r['num_stages']}"


@pytest.mark.aot
def test_every_nf4_kernel_variant_compiles_without_spills():
    pytest.importorskip("triton")
    results = compile_in_subprocess(__file__)
    check_compiled(results, {"dequant", "fwd", "dx"}, _describe, "fix configs.qlora_gemm_configs")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
