"""Launch configurations of the LoRA kernels, as functions of (arch, dtype, flags).

Each ``*_configs(arch, dtype, ...)`` returns the candidate ``triton.Config`` list
for one kernel on one GPU architecture (``arch`` = 10 * major + minor: 80 for
Ampere A100, 90 for Hopper H100/H200). Tiles were chosen to fit the shared
memory of the arch (H100 227 KiB per block; the Ampere tiles stay under
the 99 KiB of sm_86/sm_89/sm_120, so they serve those too) and to compile
without register spills: ``tests/test_aot.py`` compiles every config returned
here for sm_80 and sm_90 (bf16 and fp32 at ranks 16 and 64 by default; the
whole dtype x flags x rank cross product with ``FASTLORA_AOT_FULL=1``) and
fails on any spill, so this file is the single place to change a tile.

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


def gemm_configs(
    arch: int, dtype: torch.dtype, *, has_dropout: bool = False, block_r: int = 16, store_pre: bool = False
) -> list[triton.Config]:
    """Configs of ``_lora_gemm_kernel`` (BLOCK_M x BLOCK_N output tile, BLOCK_K
    reduction step, GROUP_M rows of tiles per L2 group).

    NOTE: with dropout the LoRA term of dX is a second [BLOCK_M, BLOCK_N] fp32
    tensor live next to the accumulator (the mask applies to it alone), so the
    dropout variant drops the 128x256 tiles, which spill. Ranks above 16 widen
    the epilogue's [BLOCK_M, BLOCK_R] operand: 128x256 spills on sm_80 at r=64,
    so does 128x128 with 4 warps on both archs (hence 8 warps there).
    ``store_pre`` (DoRA's forward: the tile is also stored, rounded, before its
    column scale) drops the 128x256 tiles too: their second store spills
    (STACK 8-16 bytes on sm_80 and sm_90, REG 254-255).
    """
    if interpreting():
        return [_cfg(4, 1, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4)]
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
    if has_dropout or store_pre or (block_r > 16 and _family(arch) == 80) or block_r > 64:
        cands = [c for c in cands if not big(c)]
    if block_r > 64 or (has_dropout and block_r > 16 and _family(arch) == 80):
        cands = cands[-1:]  # 128x128 with dropout spills on sm_80 at r=64
    return cands


def shrink_configs(arch: int, dtype: torch.dtype, *, has_dropout: bool = False, block_r: int = 16) -> list[triton.Config]:
    """Configs of ``_lora_shrink_kernel``: BLOCK_M rows of X per program, BLOCK_K
    columns per step; the [BLOCK_M, BLOCK_R] accumulator stays in registers."""
    if interpreting():
        return [_cfg(4, 1, BLOCK_M=32, BLOCK_K=32)]
    if dtype == torch.float32:  # FMA dots; 4 warps spill at rank 64
        cands = [_cfg(4 if block_r <= 16 else 8, 2, BLOCK_M=32, BLOCK_K=64)]
    elif _family(arch) == 90:
        cands = [_cfg(4, 4, BLOCK_M=64, BLOCK_K=128), _cfg(4, 4, BLOCK_M=32, BLOCK_K=128)]
    else:
        cands = [_cfg(4, 4, BLOCK_M=64, BLOCK_K=64), _cfg(4, 4, BLOCK_M=32, BLOCK_K=128)]
    if block_r > 64:
        cands = [_cfg(4, 2, BLOCK_M=32, BLOCK_K=32)]
    return cands


def dy_pass_configs(arch: int, dtype: torch.dtype, *, block_r: int = 16) -> list[triton.Config]:
    """Configs of ``_lora_dy_kernel`` in order of preference (the launcher takes
    the first that :func:`pick` keeps). A program owns BLOCK_N columns of dY and
    walks a strided set of BLOCK_M row blocks. NOTE: the partial dS written per
    column block costs 4*r bytes per row against 2*BLOCK_N bytes of dY read,
    hence wide BLOCK_N; at r=64 the dB accumulator [BLOCK_N, 64] forces 8 warps
    and BLOCK_N=128 (64x256 and 4 warps spill)."""
    if interpreting():
        return [_cfg(4, 1, BLOCK_M=32, BLOCK_N=32)]
    if dtype == torch.float32:  # FMA dots; 4 warps spill at rank 64
        cands = [_cfg(4 if block_r <= 16 else 8, 2, BLOCK_M=32, BLOCK_N=64)]
    elif block_r <= 16:
        cands = [_cfg(8, 3, BLOCK_M=64, BLOCK_N=256), _cfg(4, 3, BLOCK_M=64, BLOCK_N=128)]
    else:
        cands = [_cfg(8, 3, BLOCK_M=64, BLOCK_N=128), _cfg(4, 3, BLOCK_M=32, BLOCK_N=64)]
    if block_r > 64:
        cands = [_cfg(4, 2, BLOCK_M=32, BLOCK_N=32)]
    return cands


def down_grad_configs(arch: int, dtype: torch.dtype, *, has_dropout: bool = False, block_r: int = 16) -> list[triton.Config]:
    """Configs of ``_lora_down_grad_kernel`` (dA = dS^T D(X)) in order of
    preference: a program owns BLOCK_K columns of X and walks BLOCK_M row blocks."""
    if interpreting():
        return [_cfg(4, 1, BLOCK_M=32, BLOCK_K=32)]
    if dtype == torch.float32:  # FMA dots; 4 warps spill at rank 64
        cands = [_cfg(4 if block_r <= 16 else 8, 2, BLOCK_M=32, BLOCK_K=64)]
    elif _family(arch) == 90:
        cands = [_cfg(4, 4, BLOCK_M=64, BLOCK_K=128), _cfg(4, 4, BLOCK_M=64, BLOCK_K=64)]
    else:
        cands = [_cfg(4, 4, BLOCK_M=64, BLOCK_K=64), _cfg(4, 4, BLOCK_M=32, BLOCK_K=64)]
    if block_r > 64:
        cands = [_cfg(4, 2, BLOCK_M=32, BLOCK_K=32)]
    return cands


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
    return _union(gemm_configs, has_dropout=(False, True), block_r=(16, 64, 128), store_pre=(False, True))


def all_shrink_configs() -> list[triton.Config]:
    return _union(shrink_configs, has_dropout=(False, True), block_r=(16, 64, 128))


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
