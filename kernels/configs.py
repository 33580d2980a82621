"""Launch configurations of the LoRA and QLoRA kernels, as functions of (arch, dtype, flags).

Each ``*_configs(arch, dtype, ...)`` returns the candidate ``triton.Config`` list
for one kernel on one GPU architecture (``arch`` = 10 * major + minor: 80 for
Ampere A100, 90 for Hopper H100/H200). Tiles were chosen to fit the shared
memory of the arch (H100 227 KiB per block; the Ampere tiles stay under
the 99 KiB of sm_86/sm_89/sm_120, so they serve those too) and to compile
without register spills: ``tests/test_aot.py`` (and ``tests/test_kernels_nf4.py``
for the QLoRA GEMM) compiles every config returned here for sm_80 and sm_90
(bf16 and fp32 at ranks 16, 64, 128 and 256, fp32 adapters on 16-bit
activations, by default; the whole dtype x flags x rank cross product with
``FASTLORA_AOT_FULL=1``) and fails on any spill, so this file is the single
place to change a tile. Spill numbers quoted in NOTEs are triton 3.9.0's
unless a version is named.

``lora_f32`` everywhere means fp32 adapters on 16-bit activations (an fp32
LoRA branch): the rank-r kernels then run fp32 IEEE (FMA) dots, the GEMMs'
epilogue splits both fp32 factors (see ``_common.dot_f32_f32``).

* The two GEMMs (forward ``Y = X W^T + ...`` and ``dX = dY W + ...``) and the
  shrink ``S = X A^T`` are autotuned: ``@triton.autotune`` gets the union of
  all configs (:func:`all_gemm_configs`, ...) and :func:`prune` keeps, per call,
  the ones of the device's arch, dtype and flags that suit the shape.
* The dY pass and the dA kernel are memory bound and size a workspace from
  their tile, so their launcher takes the first config :func:`pick` returns.

Under the Triton interpreter every function returns ONE small config
(autotuning more than one config fails there, and every program instance
costs ~40 ms): tests stay fast and exercise the masked edges.
"""

from __future__ import annotations

import torch
import triton

from .._backend import interpreting

ARCHS = (80, 90)  # the targets configs are written (and AOT-checked) for
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _cfg(num_warps: int, num_stages: int, **tiles: int) -> triton.Config:
    return triton.Config(dict(tiles), num_warps=num_warps, num_stages=num_stages)


def _family(arch: int) -> int:
    """Map any arch to the one whose tiles it uses: Hopper (sm_90, sm_100) or
    Ampere (sm_80-89, and sm_120, whose 99 KiB of shared memory and no wgmma
    make it an Ampere for tiling purposes)."""
    return 90 if 90 <= arch < 120 else 80


def rank_chunk(block_r: int, dtype: torch.dtype = torch.bfloat16, f32_adapters: bool = False) -> int:
    """Rank columns per step of the GEMMs' LoRA epilogue (``R_CHUNK``) for
    activations of ``dtype``: the whole padded rank up to 64, then steps of 32
    for 16-bit activations (ranks 128 and 256; steps of 64 spill on sm_80) and
    of 64 for fp32 (FMA dots; steps of 32 spill on sm_90 in DoRA's GEMM at rank
    256, STACK 8), so a GEMM tile's registers stop growing with the rank (32
    under the interpreter, so the tests step). ``f32_adapters`` (fp32 adapters
    on 16-bit activations: both factors split hi/lo, three dots): steps of 16."""
    if interpreting():
        return min(block_r, 32)
    if dtype == torch.float32:
        return min(block_r, 64)
    if f32_adapters:
        return 16
    return 32 if block_r > 64 else block_r


def gemm_configs(
    arch: int,
    dtype: torch.dtype,
    *,
    has_dropout: bool = False,
    block_r: int = 16,
    store_pre: bool = False,
    lora_f32: bool = False,
) -> list[triton.Config]:
    """Configs of ``_lora_gemm_kernel`` (BLOCK_M x BLOCK_N output tile, BLOCK_K
    reduction step, GROUP_M rows of tiles per L2 group).

    NOTE: with dropout the LoRA term of dX is a second [BLOCK_M, BLOCK_N] fp32
    tensor live next to the accumulator (the mask applies to it alone), so the
    dropout variant drops the 128x256 tiles, which spill. Ranks above 16 widen
    the epilogue's [BLOCK_M, R_CHUNK] operand (R_CHUNK: the padded rank up to
    64, unrolled steps of 32 above, see :func:`rank_chunk`): 128x256 spills on
    sm_80 at r=64, so does 128x128 with 4 warps on both archs (hence 8 warps
    there); ranks 128 and 256 have their own list (NOTE below).
    ``store_pre`` (DoRA's forward: the tile is also stored, rounded, before its
    column scale) drops the 128x256 tiles too: their second store spills
    (STACK 8-16 bytes on sm_80 and sm_90, REG 254-255). ``lora_f32`` (fp32
    adapters on 16-bit activations: the LoRA term is three tensor-core dots of
    hi/lo-split fp32 operands in steps of 16 ranks) has one tile (NOTE below).
    """
    if interpreting():
        return [_cfg(4, 1, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4)]
    bk = 64 if _family(arch) == 90 else 32
    if lora_f32 and dtype != torch.float32:
        # NOTE: fp32 adapters on 16-bit activations: the epilogue splits both
        # factors (three dots per step of 16 ranks). 128x128 spills (STACK 40-6400
        # on sm_80 and sm_90), 64x64 with 4 warps too at rank 256; 64x128 with 8
        # warps holds at every rank, bf16 and fp16 (REG 119-222).
        return [_cfg(8, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=bk, GROUP_M=8)]
    if block_r > 64 and dtype != torch.float32:
        # NOTE: ranks 128 and 256 step through the epilogue 32 ranks at a time
        # (rank_chunk): 128x128 with 8 warps holds on sm_90 (REG 226-254); on
        # sm_80 it spills (STACK 336-656), so does 64x128 with 4 warps; 64x128
        # with 8 warps does not (REG 124-138).
        if _family(arch) == 90:
            return [
                _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
                _cfg(8, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
            ]
        return [_cfg(8, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8)]
    if dtype == torch.float32:
        # fp32 with input_precision="ieee" runs on FMA units (a correctness
        # path, not a speed one): one small tile (BLOCK_K=32 spills on sm_80,
        # and so does 64x64 once the rank passes 16).
        if block_r <= 16:
            return [_cfg(4, 2, BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, GROUP_M=8)]
        return [_cfg(4, 2, BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, GROUP_M=8)]
    elif _family(arch) == 90:
        cands = [
            _cfg(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8),
            _cfg(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
            _cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
        ]
    else:
        cands = [
            _cfg(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=32, GROUP_M=8),
            _cfg(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
            _cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
        ]
    big = lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > 128 * 128  # noqa: E731
    if has_dropout or store_pre or (block_r > 16 and _family(arch) == 80):
        cands = [c for c in cands if not big(c)]
    if has_dropout and block_r > 16 and _family(arch) == 80:
        cands = cands[-1:]  # 128x128 with dropout spills on sm_80 at r=64
    return cands


def shrink_configs(
    arch: int, dtype: torch.dtype, *, has_dropout: bool = False, block_r: int = 16, lora_f32: bool = False
) -> list[triton.Config]:
    """Configs of ``_lora_shrink_kernel``: BLOCK_M rows of X per program, BLOCK_K
    columns per step; the [BLOCK_M, BLOCK_R] accumulator stays in registers
    (X is read once, whatever the rank). ``lora_f32``: fp32 lora_A on 16-bit X,
    an fp32 FMA dot (as fp32)."""
    if interpreting():
        return [_cfg(4, 1, BLOCK_M=32, BLOCK_K=32)]
    if dtype == torch.float32 or lora_f32:  # FMA dots; 4 warps spill at rank 64
        if block_r > 64:  # 32x16 with 8 warps spills on sm_90 at rank 128 (STACK 16)
            return [_cfg(4, 2, BLOCK_M=16, BLOCK_K=32)]
        return [_cfg(4 if block_r <= 16 else 8, 2, BLOCK_M=32, BLOCK_K=64)]
    if block_r > 64:  # 64x64 spills on sm_80 at rank 128 with dropout (STACK 16)
        return [_cfg(8, 3, BLOCK_M=32, BLOCK_K=64)]
    if _family(arch) == 90:
        return [_cfg(4, 4, BLOCK_M=64, BLOCK_K=128), _cfg(4, 4, BLOCK_M=32, BLOCK_K=128)]
    return [_cfg(4, 4, BLOCK_M=64, BLOCK_K=64), _cfg(4, 4, BLOCK_M=32, BLOCK_K=128)]


def dy_pass_configs(arch: int, dtype: torch.dtype, *, block_r: int = 16, lora_f32: bool = False) -> list[triton.Config]:
    """Configs of ``_lora_dy_kernel`` in order of preference (the launcher takes
    the first that :func:`pick` keeps). A program owns BLOCK_N columns of dY and
    BLOCK_R rank columns (a grid axis walks ranks above BLOCK_R) and walks a
    strided set of BLOCK_M row blocks. NOTE: the partial dS written per column
    block costs 4*r bytes per row against 2*BLOCK_N bytes of dY read (the
    workspace is cdiv(N, BLOCK_N) * M * r * 4 bytes), hence wide BLOCK_N; at
    r=64 the dB accumulator [BLOCK_N, 64] forces 8 warps and BLOCK_N=128 (64x256
    and 4 warps spill). Ranks 128 and 256 keep BLOCK_N=128 with rank blocks of 64."""
    if interpreting():
        return [_cfg(4, 1, BLOCK_M=32, BLOCK_N=32, BLOCK_R=min(block_r, 32))]
    br = min(block_r, 64)
    if dtype == torch.float32 or lora_f32:  # FMA dots; 4 warps spill at rank 64
        return [_cfg(4 if br <= 16 else 8, 2, BLOCK_M=32, BLOCK_N=64, BLOCK_R=br)]
    if block_r <= 16:
        return [_cfg(8, 3, BLOCK_M=64, BLOCK_N=256, BLOCK_R=16), _cfg(4, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_R=16)]
    if block_r > 64:
        # NOTE: the dS workspace is what grows with the rank, so ranks 128 and 256
        # take 256 columns per program, in rank blocks small enough to stay
        # spill-free (64 rank columns spill at 256 columns: sm_80 STACK 32-192,
        # sm_90 16 when only dS is needed; 32 do not). BLOCK_M=32, not 64: 64x256
        # reaches REG 255 on sm_80 and spills with triton 3.4 (32x256: REG
        # 106-231 with 3.6-3.9). The rank blocks of one dY tile are neighbours on
        # the fastest grid axis, so they read it together (once from HBM, then L2).
        return [_cfg(8, 3, BLOCK_M=32, BLOCK_N=256, BLOCK_R=32), _cfg(8, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_R=64)]
    return [_cfg(8, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_R=br), _cfg(4, 3, BLOCK_M=32, BLOCK_N=64, BLOCK_R=br)]


def down_grad_configs(
    arch: int, dtype: torch.dtype, *, has_dropout: bool = False, block_r: int = 16, lora_f32: bool = False
) -> list[triton.Config]:
    """Configs of ``_lora_down_grad_kernel`` (dA = dS^T D(X)) in order of
    preference: a program owns BLOCK_K columns of X and BLOCK_R rank rows of dA
    (a grid axis walks ranks above BLOCK_R) and walks BLOCK_M row blocks.
    ``lora_f32`` (an fp32 dA from 16-bit X) is an FMA dot, as fp32."""
    if interpreting():
        return [_cfg(4, 1, BLOCK_M=32, BLOCK_K=32, BLOCK_R=min(block_r, 32))]
    br = min(block_r, 64)
    if dtype == torch.float32 or lora_f32:  # FMA dots; 4 warps spill at rank 64
        return [_cfg(4 if br <= 16 else 8, 2, BLOCK_M=32, BLOCK_K=64, BLOCK_R=br)]
    if _family(arch) == 90:
        return [_cfg(4, 4, BLOCK_M=64, BLOCK_K=128, BLOCK_R=br), _cfg(4, 4, BLOCK_M=64, BLOCK_K=64, BLOCK_R=br)]
    return [_cfg(4, 4, BLOCK_M=64, BLOCK_K=64, BLOCK_R=br), _cfg(4, 4, BLOCK_M=32, BLOCK_K=64, BLOCK_R=br)]


def dequant_config() -> triton.Config:
    """Launch parameters of ``nf4._dequant_4bit_kernel``: BLOCK elements per program."""
    if interpreting():
        return _cfg(4, 1, BLOCK=256)
    return _cfg(4, 1, BLOCK=1024)


def qlora_gemm_configs(
    arch: int, dtype: torch.dtype, *, has_dropout: bool = False, block_r: int = 16, lora_f32: bool = False
) -> list[triton.Config]:
    """Candidate tiles of ``nf4._qlora_gemm_kernel``, in order of preference.

    NOTE: the dequantized [BLOCK_K, BLOCK_N] tile costs registers for its codes,
    absmax and values next to the accumulator, so the tiles are a notch smaller
    than the 16-bit LoRA GEMM's; tests/test_kernels_nf4.py AOT-compiles each for
    sm_80 and sm_90 and fails on a spill. The LoRA epilogue steps through ranks
    above 64 in chunks of 64 (:func:`rank_chunk`), so ranks 128 and 256 use
    rank 64's tiles.
    """
    if interpreting():
        return [_cfg(4, 1, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4)]
    block_r = min(block_r, 64)
    if dtype == torch.float32:
        # fp32 with input_precision="ieee" runs on FMA units: small tiles (64x64
        # with 4 warps spills on sm_80 / sm_90). NOTE: BLOCK_K=16, not 32: the
        # dX variant with 64x64x32 spills on sm_90 with triton 3.8.0 (STACK 8,
        # REG 255; not with 3.9.0); 64x64x16 takes 128 registers on both.
        cands = [
            _cfg(8, 2, BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, GROUP_M=8),
            _cfg(4, 2, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=8),
        ]
    else:
        cands = [
            _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
            _cfg(8, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
            _cfg(8, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8),
        ]
    # NOTE: dropout keeps a second [BLOCK_M, BLOCK_N] fp32 tile (the masked
    # LoRA term) live, and a wide rank widens the epilogue's operands: the
    # largest tile goes (it reaches 255 registers with dropout at rank 64).
    if has_dropout or block_r > 16 or lora_f32:
        cands = cands[1:]
    return cands


# -- the multi-adapter kernels (kernels/lora_multi.py) ---------------------------------
# NOTE: each list is AOT-compiled without spills for sm_80 and sm_90 by
# tests/test_aot.py (the multi_* kernels there).


def multi_rank_chunk(arch: int, block_r: int, dtype: torch.dtype) -> int:
    """``R_CHUNK`` of ``lora_multi._multi_gemm_kernel``'s epilogue: :func:`rank_chunk`,
    except for 16-bit activations on Ampere-class archs: steps of at most 32 ranks.
    NOTE: at rank 64 on sm_80 the whole padded rank in one step spills in fp16
    (64x64 w4, triton 3.9: forward STACK 8, dX with dropout STACK 72, REG
    254-255) while steps of 32 take REG 141-172; on sm_90 it is the other way
    round (64x128 w8 dX, steps of 32: STACK 16-136; whole rank: no spill)."""
    if dtype == torch.float32 or _family(arch) == 90:
        return rank_chunk(block_r, dtype)
    return min(block_r, 32)


def multi_gemm_configs(
    arch: int, dtype: torch.dtype, *, has_dropout: bool = False, block_r: int = 16, decode: bool = False
) -> list[triton.Config]:
    """Configs of ``lora_multi._multi_gemm_kernel`` (forward Y and dX).

    Sorted path: :func:`gemm_configs`'s tiles minus those that spill with the
    per-adapter epilogue loop: 128x256 always (STACK 96-176 bytes), and at
    ranks above 16 or with dropout on sm_80 everything above 64x64 (128x128 w8:
    STACK 16-360; 64x128 w8 in dX: 104). Decode: one BLOCK_M = 16 tile of rows;
    BLOCK_N 128 spills on sm_90 (the per-row epilogue's [BLOCK_R, BLOCK_N] fp32
    slice of B), and narrow columns give a memory-bound GEMV more programs.
    """
    if interpreting():
        if decode:
            return [_cfg(4, 1, BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=1)]
        return [_cfg(4, 1, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4)]
    if decode:
        if dtype == torch.float32:
            return [_cfg(4, 2, BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, GROUP_M=1)]
        bk = 128 if _family(arch) == 90 else 64
        return [_cfg(4, 4, BLOCK_M=16, BLOCK_N=64, BLOCK_K=bk, GROUP_M=1), _cfg(4, 4, BLOCK_M=16, BLOCK_N=32, BLOCK_K=bk, GROUP_M=1)]
    if dtype == torch.float32:
        # fp32 runs IEEE dots on FMA units (a correctness path): one small tile.
        if block_r <= 16:
            return [_cfg(4, 2, BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, GROUP_M=8)]
        return [_cfg(4, 2, BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, GROUP_M=8)]
    if block_r > 64:
        return [_cfg(4, 4, BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, GROUP_M=8)]
    if _family(arch) == 90:
        if block_r <= 16:
            # NOTE: 64x128 with 4 warps spills in dX with dropout (STACK 8, REG 255, triton 3.9).
            return [_cfg(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8), _cfg(8, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8)]
        # NOTE: above rank 16 the 128x128 tile spills on sm_90 (STACK 16-48, REG 255, Triton 3.9)
        return [_cfg(8, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8)]
    # NOTE: with dropout, sm_80's 128x128 w8 dX tile spills (STACK 16, REG 255, Triton 3.9); 64-row tiles do not.
    if block_r <= 16 and not has_dropout:
        return [_cfg(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8), _cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8)]
    return [_cfg(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8)]


def multi_qgemm_configs(
    arch: int, dtype: torch.dtype, *, has_dropout: bool = False, block_r: int = 16, decode: bool = False
) -> list[triton.Config]:
    """Configs of ``lora_multi._multi_qgemm_kernel`` (the multi GEMM on a 4-bit base,
    W dequantized in its main loop), in order of preference (the launcher takes the
    first that fits: not autotuned, as :func:`qlora_gemm_configs`).

    The main loop is :func:`qlora_gemm_configs`' kernel's, the epilogue
    :func:`multi_gemm_configs`'s. NOTE (triton 3.9, tests/test_aot.py): the
    dequantized tile's gathers are pipelined through shared memory, so stages
    cost more than in the dense GEMM (16x64x64 with 4 stages: 158 KiB, over
    sm_86's 99 KiB), hence 2 stages for decode and for 64x128. 64x128 spills on
    sm_80 (bf16 forward, 3 stages STACK 16; 2 stages without double
    quantization STACK 8): Ampere-class archs take 64x64. fp32 above rank 16:
    32x32 spills in the forward (STACK 16-32, REG 255, 4 or 8 warps), 64x64 on
    sm_80 (STACK 168-3768); 32x64 with 8 warps holds (REG 151-186). Decode at
    rank 128 (the per-row epilogue's [BLOCK_R, BLOCK_N] fp32 slice of B):
    BLOCK_N 64 spills (STACK 32-80), 32 holds.
    """
    if interpreting():
        if decode:
            return [_cfg(4, 1, BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=1)]
        return [_cfg(4, 1, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4)]
    if decode:
        if dtype == torch.float32:
            if block_r > 64:
                return [_cfg(4, 2, BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=1)]
            return [_cfg(4, 2, BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, GROUP_M=1)]
        narrow = _cfg(8, 2, BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=1)
        return [narrow] if block_r > 64 else [_cfg(4, 2, BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=1), narrow]
    if dtype == torch.float32:
        if block_r <= 16:
            return [_cfg(8, 2, BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, GROUP_M=8)]
        return [_cfg(8, 2, BLOCK_M=32, BLOCK_N=64, BLOCK_K=16, GROUP_M=8)]
    if block_r > 64:
        return [_cfg(4, 2, BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, GROUP_M=8)]
    square = _cfg(8, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8)
    if block_r <= 16 and not has_dropout and _family(arch) == 90:
        return [_cfg(8, 2, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8), square]
    return [square]


def multi_shrink_configs(arch: int, dtype: torch.dtype, *, has_dropout: bool = False, block_r: int = 16) -> list[triton.Config]:
    """Configs of ``lora_multi._multi_shrink_kernel`` (sorted rows): BLOCK_M rows,
    BLOCK_K columns per step. 4 warps spill at rank 64 in 16-bit (STACK 64-696)
    and with dropout at 64x128 on sm_90; fp32 at rank 64 needs 8 warps on sm_80
    and a 32x32 tile on sm_90 (8 warps there got REG 128 and spilled)."""
    if interpreting():
        return [_cfg(4, 1, BLOCK_M=32, BLOCK_K=32)]
    if block_r > 64:
        return [_cfg(8, 2, BLOCK_M=32, BLOCK_K=32)]
    if dtype == torch.float32:
        if block_r <= 16:
            return [_cfg(4, 2, BLOCK_M=32, BLOCK_K=64)]
        return [_cfg(8, 1, BLOCK_M=32, BLOCK_K=64)] if _family(arch) == 80 else [_cfg(4, 2, BLOCK_M=32, BLOCK_K=32)]
    if block_r <= 16:
        if _family(arch) == 90:
            return [_cfg(8, 4, BLOCK_M=64, BLOCK_K=128), _cfg(4, 4, BLOCK_M=32, BLOCK_K=128)]
        return [_cfg(4, 4, BLOCK_M=64, BLOCK_K=64), _cfg(4, 4, BLOCK_M=32, BLOCK_K=128)]
    if _family(arch) == 90:
        return [_cfg(8, 4, BLOCK_M=64, BLOCK_K=64), _cfg(8, 4, BLOCK_M=32, BLOCK_K=128)]
    return [_cfg(8, 4, BLOCK_M=64, BLOCK_K=64)]


def multi_decode_shrink_configs(
    arch: int, dtype: torch.dtype, *, has_dropout: bool = False, block_r: int = 16
) -> list[triton.Config]:
    """Configs of ``lora_multi._decode_shrink_kernel``: one row per program, a
    [BLOCK_R, BLOCK_K] slice of that row's A per step (fp32 products)."""
    if interpreting():
        return [_cfg(4, 1, BLOCK_K=32)]
    return [_cfg(4, 2, BLOCK_K=128 if block_r <= 16 else 64)]


def multi_dy_pass_configs(arch: int, dtype: torch.dtype, *, block_r: int = 16) -> list[triton.Config]:
    """Configs of ``lora_multi._multi_dy_kernel`` in order of preference (as
    :func:`dy_pass_configs`, the whole padded rank per program)."""
    if interpreting():
        return [_cfg(4, 1, BLOCK_M=32, BLOCK_N=32)]
    if dtype == torch.float32:
        return [_cfg(4 if block_r <= 16 else 8, 2, BLOCK_M=32, BLOCK_N=64)]
    if block_r > 64:
        return [_cfg(4, 2, BLOCK_M=32, BLOCK_N=32)]
    if block_r <= 16:
        return [_cfg(8, 3, BLOCK_M=64, BLOCK_N=256), _cfg(4, 3, BLOCK_M=64, BLOCK_N=128)]
    return [_cfg(8, 3, BLOCK_M=64, BLOCK_N=128), _cfg(4, 3, BLOCK_M=32, BLOCK_N=64)]


def multi_down_grad_configs(
    arch: int, dtype: torch.dtype, *, has_dropout: bool = False, block_r: int = 16
) -> list[triton.Config]:
    """Configs of ``lora_multi._multi_down_grad_kernel`` (dA per adapter) in order of preference."""
    if interpreting():
        return [_cfg(4, 1, BLOCK_M=32, BLOCK_K=32)]
    if dtype == torch.float32:
        return [_cfg(4 if block_r <= 16 else 8, 2, BLOCK_M=32, BLOCK_K=64)]
    if block_r > 64:
        return [_cfg(4, 2, BLOCK_M=32, BLOCK_K=32)]
    if _family(arch) == 90:
        return [_cfg(4, 4, BLOCK_M=64, BLOCK_K=128), _cfg(4, 4, BLOCK_M=64, BLOCK_K=64)]
    return [_cfg(4, 4, BLOCK_M=64, BLOCK_K=64), _cfg(4, 4, BLOCK_M=32, BLOCK_K=64)]


def _union(fn, **flags_grid) -> list[triton.Config]:
    out: list[triton.Config] = []
    combos = [{}]
    for name, values in flags_grid.items():
        combos = [dict(c, **{name: v}) for c in combos for v in values]
    for arch in ARCHS:
        for dtype in DTYPES:
            for flags in combos:
                for c in fn(arch, dtype, **flags):
                    if c not in out:
                        out.append(c)
    return out


def all_gemm_configs() -> list[triton.Config]:
    """Every config any (arch, dtype, flags) may use: what ``@triton.autotune`` holds."""
    return _union(
        gemm_configs, has_dropout=(False, True), block_r=(16, 64, 128, 256), store_pre=(False, True), lora_f32=(False, True)
    )


def all_shrink_configs() -> list[triton.Config]:
    return _union(shrink_configs, has_dropout=(False, True), block_r=(16, 64, 128, 256), lora_f32=(False, True))


def all_multi_gemm_configs() -> list[triton.Config]:
    return _union(multi_gemm_configs, has_dropout=(False, True), block_r=(16, 64, 128), decode=(False, True))


def device_arch(device: torch.device) -> int:
    """10 * major + minor of a CUDA device (called at launch time, never at import)."""
    if device.type != "cuda":
        return 90  # the interpreter: any arch (one config anyway)
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _shape_fits(c: triton.Config, dims: dict[str, int]) -> bool:
    """Drop tiles far larger than the problem: BLOCK_X <= max(16, next_pow2(dim))."""
    return all(c.kwargs[b] <= max(16, triton.next_power_of_2(max(d, 1))) for b, d in dims.items() if b in c.kwargs)


def prune(configs: list[triton.Config], allowed: list[triton.Config], dims: dict[str, int]) -> list[triton.Config]:
    """The filter of the autotuned kernels: configs in ``allowed`` (the arch's,
    dtype's and flags' list) that fit ``dims`` (tile name -> problem size);
    never empty (falls back to the smallest allowed tile)."""
    allowed_set = set(allowed)
    kept = [c for c in configs if c in allowed_set and _shape_fits(c, dims)]
    if kept:
        return kept
    return [min(allowed, key=lambda c: c.kwargs.get("BLOCK_M", 0) * c.kwargs.get("BLOCK_N", c.kwargs.get("BLOCK_K", 1)))]


def pick(candidates: list[triton.Config], dims: dict[str, int]) -> triton.Config:
    """The first candidate that fits ``dims`` (the non-autotuned kernels)."""
    for c in candidates:
        if _shape_fits(c, dims):
            return c
    return candidates[-1]
