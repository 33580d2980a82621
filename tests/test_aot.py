"""Tier 3: every variant of every LoRA kernel compiles ahead of time for sm_80
and sm_90 (on CPU, no driver) and uses no stack (a non-zero STACK is a
register spill or a local array).

One subprocess (without TRITON_INTERPRET, which would turn the kernels into
interpreter functions) compiles, with 2 worker processes, the kernels for
arch x dtype (fp32/fp16/bf16) x constexpr flags (bias, dropout, needs, DoRA's
column scale + pre-scale store) x rank bucket (16, 64, 128, 256) x adapters
(the activations' dtype, or fp32 on 16-bit activations) x the configs
``fastlora.kernels.configs`` returns for them, then reads
REG / STACK with the ``cuobjdump`` shipped in the triton wheel and the dynamic
shared memory from the compiled metadata (checked against the arch's limit).
The multi-adapter kernels (``kernels/lora_multi.py``) are swept too, with the
4-bit multi GEMM (``_multi_qgemm_kernel``, the qlora_multi strategy
``dequant_in_gemm``; double quantization on and off).
The default sweep (315 variants) is described in :func:`_variants`;
``FASTLORA_AOT_FULL=1`` compiles the whole cross product.
Kernels' fp64 scalar arguments (what inductor passes) are compiled too.

Variants mirror real launches: pointers 16-byte aligned, unit inner strides
specialised to 1 (contiguous operands), row strides / N / K multiples of 16.
The rank-r strides are left unhinted (r = 8 is not a multiple of 16).

Run alone for the table: ``python tests/test_aot.py`` (prints JSON lines).
"""

from __future__ import annotations

import json
import os
import sys

import pytest

from _aot import ARCHS, REPO, check_compiled, compile_in_subprocess, compile_variant, jit_function

pytestmark = pytest.mark.aot

# Largest dynamic shared memory per block: A100 (sm_80) 163 KiB, H100/H200 (sm_90) 227 KiB.
BLOCK_RS = (16, 64)  # the rank buckets r <= 16 and 32 < r <= 64 (BLOCK_R = rank padded to a power of two)
WIDE_RS = (128, 256)  # ranks whose configs differ from rank 64's only in the shrink (the others step in 64s)


# ---------------------------------------------------------------------------
# the variant list (runs in the subprocess)
# ---------------------------------------------------------------------------


# The flag combinations of each kernel; the first one is the superset (the
# most code, the most registers) that every config is compiled with.
FLAGS = {
    "gemm_fwd": [dict(HAS_BIAS=True, HAS_DROPOUT=False), dict(HAS_BIAS=False, HAS_DROPOUT=False)],
    "gemm_dx": [dict(HAS_BIAS=False, HAS_DROPOUT=True), dict(HAS_BIAS=False, HAS_DROPOUT=False)],
    # DoRA's forward: the same GEMM scaling its tile per column and storing it before the scale too.
    "gemm_dora": [dict(HAS_BIAS=True, HAS_DROPOUT=False, HAS_COL_SCALE=True, STORE_PRE=True)],
    "shrink": [dict(HAS_DROPOUT=True), dict(HAS_DROPOUT=False)],
    "dy_pass": [
        dict(NEED_DS=True, NEED_DB=True, NEED_DBIAS=True),
        dict(NEED_DS=True, NEED_DB=False, NEED_DBIAS=False),
        dict(NEED_DS=False, NEED_DB=True, NEED_DBIAS=True),
    ],
    "down_grad": [dict(HAS_DROPOUT=True), dict(HAS_DROPOUT=False)],
}


# The multi-adapter kernels (kernels/lora_multi.py; their adapters are always in
# the activations' dtype), same convention: the first combination is the superset.
_MULTI_Q = dict(BLOCKSIZE=64, NESTED=True, NESTED_BLOCKSIZE=256)  # bitsandbytes' default 4-bit layout
MULTI_FLAGS = {
    "multi_gemm_fwd": [dict(HAS_BIAS=True, HAS_DROPOUT=False, ROW_SCALE=True, L_SORTED=False, DECODE=False)],
    "multi_gemm_decode": [dict(HAS_BIAS=True, HAS_DROPOUT=False, ROW_SCALE=True, L_SORTED=False, DECODE=True)],
    "multi_gemm_dx": [
        dict(HAS_BIAS=False, HAS_DROPOUT=True, ROW_SCALE=False, L_SORTED=True, DECODE=False),
        dict(HAS_BIAS=False, HAS_DROPOUT=False, ROW_SCALE=False, L_SORTED=True, DECODE=False),
    ],
    "multi_shrink": [dict(HAS_DROPOUT=True), dict(HAS_DROPOUT=False)],
    "multi_decode_shrink": [dict(HAS_DROPOUT=True)],
    "multi_dy_pass": [dict(NEED_DS=True, NEED_DB=True, NEED_DBIAS=True), dict(NEED_DS=True, NEED_DB=False, NEED_DBIAS=False)],
    "multi_down_grad": [dict(HAS_DROPOUT=True), dict(HAS_DROPOUT=False)],
    # The same GEMMs on a 4-bit base, W dequantized in the main loop (the qlora_multi strategy
    # dequant_in_gemm): double quantization is the superset, the plain fp32 absmax the subset.
    "multi_qgemm_fwd": [dict(_MULTI_Q, HAS_BIAS=True, HAS_DROPOUT=False, ROW_SCALE=True, L_SORTED=False, DECODE=False,
                             W_ROWS_ARE_OUT=True),
                        dict(_MULTI_Q, HAS_BIAS=True, HAS_DROPOUT=False, ROW_SCALE=True, L_SORTED=False, DECODE=False,
                             W_ROWS_ARE_OUT=True, NESTED=False)],
    "multi_qgemm_decode": [dict(_MULTI_Q, HAS_BIAS=True, HAS_DROPOUT=False, ROW_SCALE=True, L_SORTED=False, DECODE=True,
                                W_ROWS_ARE_OUT=True)],
    "multi_qgemm_dx": [
        dict(_MULTI_Q, HAS_BIAS=False, HAS_DROPOUT=True, ROW_SCALE=False, L_SORTED=True, DECODE=False, W_ROWS_ARE_OUT=False),
        dict(_MULTI_Q, HAS_BIAS=False, HAS_DROPOUT=False, ROW_SCALE=False, L_SORTED=True, DECODE=False, W_ROWS_ARE_OUT=False),
    ],
}  # fmt: skip


def _multi_configs_for(kernel, arch, dtype, flags, block_r):
    from fastlora.kernels import configs as C

    if kernel.startswith("multi_qgemm"):
        return C.multi_qgemm_configs(arch, dtype, has_dropout=flags["HAS_DROPOUT"], block_r=block_r, decode=flags["DECODE"])
    if kernel.startswith("multi_gemm"):
        return C.multi_gemm_configs(arch, dtype, has_dropout=flags["HAS_DROPOUT"], block_r=block_r, decode=flags["DECODE"])
    if kernel == "multi_shrink":
        return C.multi_shrink_configs(arch, dtype, has_dropout=flags["HAS_DROPOUT"], block_r=block_r)
    if kernel == "multi_decode_shrink":
        return C.multi_decode_shrink_configs(arch, dtype, has_dropout=flags["HAS_DROPOUT"], block_r=block_r)
    if kernel == "multi_dy_pass":
        return C.multi_dy_pass_configs(arch, dtype, block_r=block_r)
    return C.multi_down_grad_configs(arch, dtype, has_dropout=flags["HAS_DROPOUT"], block_r=block_r)


def _configs_for(kernel, arch, dtype, flags, block_r, lora_f32=False):
    from fastlora.kernels import configs as C

    if kernel.startswith("gemm"):
        return C.gemm_configs(
            arch, dtype, has_dropout=flags["HAS_DROPOUT"], block_r=block_r, store_pre=flags.get("STORE_PRE", False),
            lora_f32=lora_f32,
        )  # fmt: skip
    if kernel == "shrink":
        return C.shrink_configs(arch, dtype, has_dropout=flags["HAS_DROPOUT"], block_r=block_r, lora_f32=lora_f32)
    if kernel == "dy_pass":
        return C.dy_pass_configs(arch, dtype, block_r=block_r, lora_f32=lora_f32)
    return C.down_grad_configs(arch, dtype, has_dropout=flags["HAS_DROPOUT"], block_r=block_r, lora_f32=lora_f32)


def _variants(full: bool):
    """The variants to compile.

    Default (~60-90 s on 2 cores): for bf16 and fp32, every config of every
    kernel with its superset flags at rank 16 and at rank 64 (bf16: only the
    GEMMs and the dY pass, whose registers grow with the rank; fp32's FMA dots
    all do), plus the configs
    that only a subset flag combination allows (dX without dropout); each
    other flag combination (bf16), and fp16 (same code as bf16) for the
    GEMMs, on the first config. ``FASTLORA_AOT_FULL=1``:
    the whole cross product (dtype x flags x rank bucket x config, ~4x longer).
    """
    import torch
    import triton

    names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    out, seen = [], set()

    def add(kernel, arch, dtype, block_r, flags, cfg, **extra):
        v = dict(kernel=kernel, arch=arch, dtype=names[dtype], block_r=block_r, flags=flags, tiles=dict(cfg.kwargs),
                 num_warps=cfg.num_warps, num_stages=cfg.num_stages, **extra)  # fmt: skip
        if extra.get("adapters") == v["dtype"]:
            del v["adapters"]
        key = json.dumps(v, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(v)

    for arch in ARCHS:
        for kernel, combos in FLAGS.items():
            for dtype in names:
                for block_r in BLOCK_RS:
                    for i, flags in enumerate(combos):
                        cfgs = _configs_for(kernel, arch, dtype, flags, block_r)
                        if not full:
                            wide = kernel.startswith("gemm") or kernel == "dy_pass"  # rank-heavy registers
                            every = dtype == torch.float32 or (dtype == torch.bfloat16 and (block_r == 16 or wide))
                            if not every and not (i == 0 and block_r == 16 and (dtype != torch.float16 or wide)):
                                continue
                            if i > 0 and dtype == torch.float32:
                                continue  # fp32's subsets: the bf16 ones cover the flags
                            if every and i > 0:  # only what the superset's list lacks
                                sup = _configs_for(kernel, arch, dtype, combos[0], block_r)
                                cfgs = [c for c in cfgs if c not in sup] or ([cfgs[0]] if block_r == 16 else [])
                            elif not every:
                                cfgs = cfgs[:1]
                        for cfg in cfgs:
                            add(kernel, arch, dtype, block_r, flags, cfg)
        # Wide ranks (128, 256): every config of every kernel at its superset
        # flags (bf16; fp32 at 256), the other flag combinations on their first
        # config (bf16 at 128; every one with FASTLORA_AOT_FULL=1).
        for kernel, combos in FLAGS.items():
            for block_r in WIDE_RS:
                for dtype in (torch.bfloat16, torch.float32):
                    if dtype == torch.float32 and block_r == 128 and not full:
                        continue
                    for i, flags in enumerate(combos):
                        cfgs = _configs_for(kernel, arch, dtype, flags, block_r)
                        if i > 0 and not full:
                            if dtype == torch.float32 or block_r != 128:
                                continue
                            cfgs = cfgs[:1]
                        for cfg in cfgs:
                            add(kernel, arch, dtype, block_r, flags, cfg)
        # fp32 adapters on 16-bit activations (an fp32 LoRA branch: IEEE dots in the
        # rank-r kernels, split-operand tensor-core dots in the GEMMs' epilogue):
        # every config at the superset flags, bf16 at ranks 16 and 256 and fp16 (its
        # epilogue also scales) at rank 64; every rank, dtype and flag set with
        # FASTLORA_AOT_FULL=1.
        for kernel, combos in FLAGS.items():
            for dtype in (torch.bfloat16, torch.float16):
                for block_r in BLOCK_RS + WIDE_RS:
                    if not full and (block_r, dtype) not in ((16, torch.bfloat16), (256, torch.bfloat16), (64, torch.float16)):
                        continue
                    for flags in combos if full else combos[:1]:
                        for cfg in _configs_for(kernel, arch, dtype, flags, block_r, lora_f32=True):
                            add(kernel, arch, dtype, block_r, flags, cfg, adapters="fp32")
        mask_cfg = triton.Config({"BLOCK_M": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)
        add("mask", arch, torch.float32, 16, {}, mask_cfg)
        # The multi-adapter kernels: every config at the superset flags for bf16 and fp32
        # at rank 64 (their registers grow with the rank), the first config at rank 16
        # and for fp16 at rank 64, the other flag combinations on the first config in
        # bf16 at rank 16 (every one, and rank 128, with FASTLORA_AOT_FULL=1). NOTE:
        # sized for the suite's time on a 2-core machine with a cold Triton cache (each
        # variant compiles in ~1 s there); the full sweep is run when configs change.
        for kernel, combos in MULTI_FLAGS.items():
            for dtype in names:
                for block_r in BLOCK_RS + ((128,) if full else ()):
                    for i, flags in enumerate(combos):
                        cfgs = _multi_configs_for(kernel, arch, dtype, flags, block_r)
                        if not full:
                            if i > 0 and (dtype != torch.bfloat16 or block_r != 16):
                                continue
                            if dtype == torch.float16 and block_r != 64:
                                continue
                            if i > 0 or dtype == torch.float16 or block_r != 64:
                                cfgs = cfgs[:1]
                        for cfg in cfgs:
                            add(kernel, arch, dtype, block_r, flags, cfg)
    # Inductor passes Python floats as fp64: the kernels must cast them (sm_90, first config).
    for kernel, combos in FLAGS.items():
        cfg = _configs_for(kernel, 90, torch.bfloat16, combos[0], 16)[0]
        add(kernel, 90, torch.bfloat16, 16, combos[0], cfg, fp64_scalars=True)
    return out


_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # names -> torch attribute names


# Per kernel: (jit function attr, pointer arg -> dtype ("x" = the variant's dtype),
# unit-stride args, args hinted divisible by 16). Every other non-constexpr arg is i32,
# except floats and the i64 seed below.
_FLOATS = {"scaling", "inv_keep"}
_I64 = {"seed"}
_SPECS = {
    "gemm_fwd": (
        "_lora_gemm_kernel",
        dict(p_ptr="x", q_ptr="x", l_ptr="a", e_ptr="a", bias_ptr="x", out_ptr="x", colscale_ptr="fp32", pre_ptr="x"),
        ("stride_pk", "stride_qk", "stride_lr", "stride_er", "stride_on"),
        ("stride_pm", "stride_qn", "stride_om", "N", "K"),
    ),
    "gemm_dora": (
        "_lora_gemm_kernel",
        dict(p_ptr="x", q_ptr="x", l_ptr="a", e_ptr="a", bias_ptr="x", out_ptr="x", colscale_ptr="fp32", pre_ptr="x"),
        ("stride_pk", "stride_qk", "stride_lr", "stride_er", "stride_on"),
        ("stride_pm", "stride_qn", "stride_om", "N", "K"),
    ),
    "gemm_dx": (
        "_lora_gemm_kernel",
        dict(p_ptr="x", q_ptr="x", l_ptr="fp32", e_ptr="a", bias_ptr="x", out_ptr="x", colscale_ptr="fp32", pre_ptr="x"),
        ("stride_pk", "stride_qn", "stride_lr", "stride_en", "stride_on"),
        ("stride_pm", "stride_qk", "stride_er", "stride_om", "N", "K"),
    ),
    "shrink": (
        "_lora_shrink_kernel",
        dict(x_ptr="x", a_ptr="a", s_ptr="a"),
        ("stride_xk", "stride_ak", "stride_sr"),
        ("stride_xm", "stride_ar", "K"),
    ),
    "dy_pass": (
        "_lora_dy_kernel",
        dict(dy_ptr="x", b_ptr="a", s_ptr="a", ds_ptr="fp32", db_ptr="a", dbias_ptr="x", ws_ds_ptr="fp32",
             ws_db_ptr="fp32", ws_dbias_ptr="fp32", cnt_m_ptr="i32", cnt_n_ptr="i32"),  # fmt: skip
        ("stride_dyn", "stride_br", "stride_sr"),
        ("stride_dym", "N"),
    ),
    "down_grad": (
        "_lora_down_grad_kernel",
        dict(ds_ptr="fp32", x_ptr="x", da_ptr="a", ws_ptr="fp32", cnt_ptr="i32"),
        ("stride_dsr", "stride_xk"),
        ("stride_xm", "K"),
    ),
    "mask": ("_dropout_mask_kernel", dict(out_ptr="i8"), (), ("K",)),
}
_MULTI_GEMM_PTRS = dict(p_ptr="x", q_ptr="x", l_ptr="x", e_ptr="x", bias_ptr="x", out_ptr="x", perm_ptr="i32", ids_ptr="i32",
                        scale_ptr="fp32")  # fmt: skip
_MULTI_FWD = (
    "_multi_gemm_kernel",
    _MULTI_GEMM_PTRS,
    ("stride_pk", "stride_qk", "stride_lr", "stride_er", "stride_on"),
    ("stride_pm", "stride_qn", "stride_om", "N", "K"),
)
# absmax_ptr: uint8 codes when double-quantized ("absmax" here), else fp32 (see _compile_one).
_MULTI_QGEMM_PTRS = dict(p_ptr="x", packed_ptr="u8", quant_map_ptr="fp32", absmax_ptr="absmax", nested_absmax_ptr="fp32",
                         nested_map_ptr="fp32", offset_ptr="fp32", l_ptr="x", e_ptr="x", bias_ptr="x", out_ptr="x",
                         perm_ptr="i32", ids_ptr="i32", scale_ptr="fp32")  # fmt: skip
_MULTI_QFWD = (
    "_multi_qgemm_kernel",
    _MULTI_QGEMM_PTRS,
    ("stride_pk", "stride_lr", "stride_er", "stride_on"),
    ("stride_pm", "stride_om", "N", "K", "K_w"),
)
_SPECS.update({
    "multi_gemm_fwd": _MULTI_FWD,
    "multi_gemm_decode": _MULTI_FWD,
    "multi_gemm_dx": ("_multi_gemm_kernel", dict(_MULTI_GEMM_PTRS, l_ptr="fp32"),
                      ("stride_pk", "stride_qn", "stride_lr", "stride_en", "stride_on"),
                      ("stride_pm", "stride_qk", "stride_er", "stride_om", "N", "K")),
    "multi_qgemm_fwd": _MULTI_QFWD,
    "multi_qgemm_decode": _MULTI_QFWD,
    "multi_qgemm_dx": ("_multi_qgemm_kernel", dict(_MULTI_QGEMM_PTRS, l_ptr="fp32"),
                       ("stride_pk", "stride_lr", "stride_en", "stride_on"),
                       ("stride_pm", "stride_om", "N", "K", "K_w")),
    "multi_shrink": ("_multi_shrink_kernel", dict(x_ptr="x", a_ptr="x", s_ptr="x", perm_ptr="i32", sids_ptr="i32"),
                     ("stride_xk", "stride_ak", "stride_sr"), ("stride_xm", "K")),
    "multi_decode_shrink": ("_decode_shrink_kernel", dict(x_ptr="x", a_ptr="x", s_ptr="x", ids_ptr="i32"),
                            ("stride_xk", "stride_ak", "stride_sr"), ("stride_xm", "K")),
    "multi_dy_pass": ("_multi_dy_kernel",
                      dict(dy_ptr="x", b_ptr="x", s_ptr="x", scale_ptr="fp32", perm_ptr="i32", seg_ptr="i32",
                           ds_ptr="fp32", db_ptr="x", dbias_ptr="x", ws_ds_ptr="fp32", ws_db_ptr="fp32",
                           ws_dbias_ptr="fp32", cnt_m_ptr="i32", cnt_db_ptr="i32", cnt_dbias_ptr="i32"),
                      ("stride_dyn", "stride_br", "stride_sr"), ("stride_dym", "N")),
    "multi_down_grad": ("_multi_down_grad_kernel",
                        dict(ds_ptr="fp32", x_ptr="x", da_ptr="x", perm_ptr="i32", seg_ptr="i32", ws_ptr="fp32",
                             cnt_ptr="i32"),
                        ("stride_dsr", "stride_xk"), ("stride_xm", "K")),
})  # fmt: skip


def _compile_one(v):
    """Compile one variant; returns v with REG/STACK/SHARED or an error."""
    import torch

    from fastlora.kernels import lora, lora_multi

    attr, ptrs, unit, div16 = _SPECS[v["kernel"]]
    fn = jit_function(getattr(lora_multi if v["kernel"].startswith("multi_") else lora, attr))
    from fastlora.kernels import configs as C

    adapters = v.get("adapters", v["dtype"])  # fp32 adapters on 16-bit activations: the LoRA branch in fp32
    constexprs = dict(v["flags"], **v["tiles"])
    if v["kernel"] != "mask":
        # The GEMMs' IEEE is their main loop's; the rank-r kernels' covers every dot.
        main_ieee = v["dtype"] == "fp32"
        constexprs.update(IEEE=main_ieee or (attr != "_lora_gemm_kernel" and adapters == "fp32"))
        constexprs.setdefault("BLOCK_R", v["block_r"])  # dY pass / dA: the rank block of the config
    if attr in ("_multi_gemm_kernel", "_multi_qgemm_kernel"):
        constexprs.update(R_CHUNK=C.multi_rank_chunk(v["arch"], v["block_r"], getattr(torch, _DTYPES[v["dtype"]])))
    if attr == "_decode_shrink_kernel":
        constexprs.pop("IEEE")
    if attr == "_lora_gemm_kernel":  # the DoRA flags default to off (plain LoRA GEMMs)
        constexprs.setdefault("HAS_COL_SCALE", False)
        constexprs.setdefault("STORE_PRE", False)
        f32_adapters = not main_ieee and adapters == "fp32"
        constexprs.update(F32_ADAPTERS=f32_adapters, R_CHUNK=C.rank_chunk(v["block_r"], getattr(torch, _DTYPES[v["dtype"]]), f32_adapters))
    constexprs.update({name: 1 for name in unit})
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ptrs:
            absmax = "u8" if v["flags"].get("NESTED") else "fp32"
            signature[name] = "*" + {"x": v["dtype"], "a": adapters, "absmax": absmax}.get(ptrs[name], ptrs[name])
        elif name in _FLOATS:
            signature[name] = "fp64" if v.get("fp64_scalars") else "fp32"
        elif name in _I64:
            signature[name] = "i64"
        else:
            signature[name] = "i32"
    hinted = [n for n in fn.arg_names if n in ptrs or n in div16]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in hinted}
    options = dict(num_warps=v["num_warps"], num_stages=v["num_stages"])
    return compile_variant(v, fn, signature, constexprs, attrs, options)


def main() -> None:
    from concurrent.futures import ProcessPoolExecutor

    variants = _variants(os.environ.get("FASTLORA_AOT_FULL", "0") not in ("", "0"))
    with ProcessPoolExecutor(max_workers=2) as pool:
        for result in pool.map(_compile_one, variants, chunksize=1):
            print(json.dumps(result), flush=True)


# ---------------------------------------------------------------------------
# the test
# ---------------------------------------------------------------------------


def _describe(r) -> str:
    tiles = " ".join(f"{k}={v}" for k, v in r["tiles"].items())
    flags = ",".join(f"{k}={int(v)}" for k, v in r["flags"].items() if v and k not in _MULTI_Q)
    flags += "" if r["flags"].get("NESTED", True) else ",NESTED=0"
    f64 = " fp64-scalars" if r.get("fp64_scalars") else ""
    f64 += " fp32-adapters" if r.get("adapters") == "fp32" else ""
    launch = f"w{r['num_warps']} s{r['num_stages']}{f64}"
    return f"{r['kernel']:19s} sm_{r['arch']} {r['dtype']} R={r['block_r']:<3d} {flags:34s} {tiles} {launch}"


def test_every_kernel_variant_compiles_without_spills():
    pytest.importorskip("triton")
    results = compile_in_subprocess(__file__)
    check_compiled(results, set(_SPECS), _describe, "fix the config in kernels/configs.py")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
