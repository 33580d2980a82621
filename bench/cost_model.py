#!/usr/bin/env python
"""Cost model of fastlora's strategies: bytes and FLOPs per launch, predicted time per GPU.

    python bench/cost_model.py --out bench/results            # the model -> cost_model.md
    python bench/cost_model.py --out bench/results --cpu-measure   # + the CPU stored-bits measurement
    python bench/cost_model.py --measure --device cuda --out OUT   # time every strategy, the model beside

For each strategy of ``fastlora.strategies()`` at a given shape this lists the
launches a forward and a backward make (the launch counts tested in
``tests/test_strategies.py``), each launch's useful FLOPs, DRAM bytes and
integer work, and predicts a time on named GPUs:

    t(launch) = max(tensor FLOPs / peak, DRAM bytes / bandwidth, Philox ops / int rate) / u
                + LAUNCH_US,     u = min(1, programs / SMs)

DRAM bytes of a tiled GEMM [M, K] x [K, N] with BM x BN tiles: every operand
panel is read once per tile row / column, divided by an L2 reuse factor
(``L2_REUSE`` = the kernels' GROUP_M = 8, never below one read), plus the
output once (twice with cuBLAS beta=1: read and written). The dropout mask
regenerated from Philox4x32-10 costs ``PHILOX_OPS`` 32-bit integer ops per
element on the CUDA cores; the stored mask costs M * ceil(K / 8) bytes written
once and read per pass that uses it. These are first-order estimates, meant to
be read beside measurements (``--measure``, which bench/gpu_check.sh runs).
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import math
import os
import shlex
import statistics
import sys
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

# ----------------------------------------------------------------------------
# the GPUs
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class GPU:
    name: str
    bf16_flops: float  # dense tensor-core BF16 FLOP/s (no sparsity)
    fp32_flops: float  # non-tensor FP32 FLOP/s (an FMA counts 2): CUDA-core lanes x 2 x clock
    bandwidth: float  # HBM bytes/s
    sms: int
    source: str

    @property
    def int_ops(self) -> float:
        """32-bit integer ops/s: one per CUDA-core lane per clock (FP32 FLOP/s / 2)."""
        return self.fp32_flops / 2


# Vendor figures (dense, no sparsity):
#   H100 SXM5: NVIDIA H100 Tensor Core GPU datasheet: BF16 Tensor Core 1,979 TFLOPS
#     with sparsity (989 dense), FP32 67 TFLOPS, HBM3 3.35 TB/s; 132 SMs.
#   H200 SXM: NVIDIA H200 Tensor Core GPU datasheet: BF16 1,979 TFLOPS with
#     sparsity (989 dense), FP32 67 TFLOPS, HBM3e 4.8 TB/s; 132 SMs (GH100).
#   A100 SXM4 80GB: NVIDIA A100 Tensor Core GPU datasheet: BF16 312 TFLOPS dense
#     (624 with sparsity), FP32 19.5 TFLOPS, HBM2e 2,039 GB/s; 108 SMs.
#   "H200 measured": this project's lent H200 (docs/FACTS.md): ~790 TFLOP/s bf16
#     matmul, ~4.3 TB/s device-to-device copy; the vendor FP32 figure.
GPUS = {
    "H100 SXM": GPU("H100 SXM", 989e12, 67e12, 3.35e12, 132, "NVIDIA H100 datasheet"),
    "H200": GPU("H200", 989e12, 67e12, 4.8e12, 132, "NVIDIA H200 datasheet"),
    "A100": GPU("A100", 312e12, 19.5e12, 2.039e12, 108, "NVIDIA A100 datasheet (SXM4 80GB)"),
    "H200 measured": GPU("H200 measured", 790e12, 67e12, 4.3e12, 132, "docs/FACTS.md: measured on the lent H200"),
}

LAUNCH_US = 3.0  # assumed per-launch floor (launch latency, ramp and tail), microseconds
L2_REUSE = 8  # grouped rasterisation: GROUP_M row tiles share the column panels in L2
PHILOX_OPS = 25  # Philox4x32-10: 10 rounds x ~10 int ops per 4 outputs (2 mul-hi/lo pairs, xors, key adds)
ARCH_TILES = {
    # (BM, BN) candidates per kernel family in the launchers' order of preference, bf16, as
    # kernels/configs.py (LoRA GEMMs) and the QLoRA GEMM configs choose them; the cuBLAS tile is an
    # assumption (its heuristics pick per shape).
    90: {"gemm": [(128, 256), (128, 128), (64, 128)], "gemm_dropout": [(128, 128), (64, 128)],
         "qgemm": [(128, 128), (64, 128), (64, 64)], "qgemm_dropout": [(64, 128), (64, 64)], "cublas": [(128, 256)]},
    80: {"gemm": [(128, 256), (128, 128), (64, 128)], "gemm_dropout": [(128, 128), (64, 128)],
         "qgemm": [(128, 128), (64, 128), (64, 64)], "qgemm_dropout": [(64, 128), (64, 64)], "cublas": [(128, 256)]},
}  # fmt: skip
GPU_ARCH = {"H100 SXM": 90, "H200": 90, "H200 measured": 90, "A100": 80}

# ----------------------------------------------------------------------------
# shapes and launches
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """x [M, K] -> y [M, N], rank r, element bytes (bf16: 2)."""

    M: int
    K: int
    N: int
    r: int
    elem: int = 2
    name: str = ""

    @property
    def label(self) -> str:
        return (f"{self.name}: " if self.name else "") + f"M={self.M} K={self.K} N={self.N} r={self.r}"


@dataclass
class Launch:
    name: str
    flops: float = 0.0  # tensor-core FLOPs (2 per multiply-add), padded rows included where the MMA computes them
    bytes: float = 0.0  # DRAM bytes
    int_ops: float = 0.0  # CUDA-core integer ops (Philox)
    programs: int = 1 << 30  # parallel programs (default: fills the device)
    kind: str = "triton"  # "triton" or "cublas"
    notes: list[str] = field(default_factory=list)

    def time(self, gpu: GPU) -> float:
        u = min(1.0, self.programs / gpu.sms)
        core = max(self.flops / gpu.bf16_flops, self.bytes / gpu.bandwidth, self.int_ops / gpu.int_ops)
        return core / u + LAUNCH_US * 1e-6


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _rpad(r: int) -> int:
    return max(16, 1 << max(r - 1, 0).bit_length())


def _mask_bytes(m: int, k: int) -> int:
    return m * _cdiv(k, 8)


def _pick(cands: list[tuple[int, int]], m: int, n: int) -> tuple[int, int]:
    """The launchers' choice: the first tile with BLOCK <= max(16, next_pow2(dim)) on both
    dims, else the smallest one."""
    fit = lambda b, d: b <= max(16, 1 << max(d - 1, 0).bit_length())  # noqa: E731
    for bm, bn in cands:
        if fit(bm, m) and fit(bn, n):
            return bm, bn
    return min(cands, key=lambda t: t[0] * t[1])


def gemm_bytes(m: int, n: int, k: int, a_bytes: float, b_bytes: float, out_bytes: float, tile: tuple[int, int]) -> float:
    """DRAM bytes of a tiled GEMM: A (a_bytes) read once per column-tile group, B per row-tile group, the output once."""
    bm, bn = tile
    a_reads = max(1.0, _cdiv(n, bn) / L2_REUSE)
    b_reads = max(1.0, _cdiv(m, bm) / L2_REUSE)
    return a_bytes * a_reads + b_bytes * b_reads + out_bytes


def _w4_bytes(n: int, k: int) -> float:
    """A 4-bit weight with double quantization (blocksize 64): packed codes + uint8 absmax codes (+ nested)."""
    return n * k / 2 + n * k / 64 + n * k / 64 / 256 * 4


def _shrink(s: Shape, dropout: str) -> Launch:
    m, k, r, e = s.M, s.K, s.r, s.elem
    lc = Launch("shrink", flops=2 * m * k * _rpad(r), bytes=m * k * e + r * k * e + m * r * e, programs=_cdiv(m, 64))
    if dropout != "none":
        lc.int_ops = PHILOX_OPS * m * k  # the mask is drawn in forward by either strategy
    if dropout == "stored_bits":
        lc.bytes += _mask_bytes(m, k)
        lc.notes.append("writes the mask bits")
    return lc


def _dy_pass(s: Shape) -> Launch:
    m, n, r, e = s.M, s.N, s.r, s.elem
    rp = _rpad(r)
    n_blocks = _cdiv(n, 256)
    ws = 2 * (n_blocks * m * rp * 4 if n_blocks > 1 else 0)
    # reads dY, B, S; writes dS (fp32), dB, dbias; dS partials per column block
    nbytes = m * n * e + n * r * e + m * r * e + m * r * 4 + n * r * e + n * e + ws
    return Launch("dy_pass (dS, dB, dbias)", flops=4 * m * n * rp, bytes=nbytes)


def _down_grad(s: Shape, dropout: str) -> Launch:
    m, k, r, e = s.M, s.K, s.r, s.elem
    split = max(1, min(_cdiv(m, 64), _cdiv(264, _cdiv(k, 128))))  # as the launcher: ~2 programs per SM
    ws = 2 * split * _rpad(r) * k * 4 if split > 1 else 0  # fp32 partials written and read back
    lc = Launch("dA", flops=2 * m * k * _rpad(r), bytes=m * r * 4 + m * k * e + r * k * e + ws)
    if dropout == "regenerate":
        lc.int_ops = PHILOX_OPS * m * k
    elif dropout == "stored_bits":
        lc.bytes += _mask_bytes(m, k)
    return lc


def _rank_expand(m: int, n: int, r: int, e: int, l_elem: int, dropout: str, name: str, bias: bool) -> Launch:
    nbytes = m * r * l_elem + r * n * e + (n * e if bias else 0) + m * n * e
    lc = Launch(name, flops=2 * m * n * _rpad(r), bytes=nbytes, programs=_cdiv(m, 64) * _cdiv(n, 128))
    if dropout == "regenerate":
        lc.int_ops = PHILOX_OPS * m * n
    elif dropout == "stored_bits":
        lc.bytes += _mask_bytes(m, n)
    return lc


def _cublas(m: int, n: int, k: int, e: int, cands, name: str) -> Launch:
    """out [M, N] += A [M, K] B [K, N] with beta=1: the output read and written (cuBLAS
    assumed to fill the device, with GEMV/split-K kernels for few rows)."""
    nbytes = gemm_bytes(m, n, k, m * k * e, k * n * e, 2 * m * n * e, cands[0])
    return Launch(name, flops=2 * m * n * k, bytes=nbytes, kind="cublas")


def _fused_gemm(
    m: int, n: int, k: int, r: int, e: int, cands, name: str, l_elem: int, dropout: str, bias: bool, w_bytes=None
) -> Launch:
    """OUT [M, N] = P [M, K] Q [K, N] + D(scaling L E) (+ bias), one write."""
    bm, bn = _pick(cands, m, n)
    w = k * n * e if w_bytes is None else w_bytes
    nbytes = gemm_bytes(m, n, k, m * k * e, w, m * n * e, (bm, bn)) + m * r * l_elem + r * n * e + (n * e if bias else 0)
    flops = 2 * _cdiv(m, bm) * bm * n * k + 2 * m * n * _rpad(r)  # the MMA computes the padded rows too
    lc = Launch(name, flops=flops, bytes=nbytes, programs=_cdiv(m, bm) * _cdiv(n, bn))
    if dropout != "none":  # the fused dX GEMMs regenerate in their epilogue, whichever dropout strategy
        lc.int_ops = PHILOX_OPS * m * n
    return lc


def _dequant(s: Shape) -> Launch:
    n, k, e = s.N, s.K, s.elem
    return Launch("dequant 4-bit -> W", bytes=_w4_bytes(n, k) + n * k * e, programs=_cdiv(n * k, 1024))


def _qgemv(m: int, n_out: int, red: int, r: int, e: int, l_elem: int, dropout: str, name: str, bias: bool) -> Launch:
    """split-K GEMV: each packed byte read once per 16 rows; fp32 partials written and read back."""
    m_blocks, o_blocks = _cdiv(m, 16), _cdiv(n_out, 64)
    split = max(1, min(_cdiv(red, 64), _cdiv(264, o_blocks * m_blocks)))
    ws = 2 * split * m * n_out * 4 if split > 1 else 0
    lc = Launch(name, flops=2 * 16 * m_blocks * n_out * red + 2 * m * n_out * _rpad(r),
                bytes=_w4_bytes(n_out, red) * m_blocks + m * red * e + ws + m * r * l_elem + r * n_out * e
                + (n_out * e if bias else 0) + m * n_out * e,
                programs=o_blocks * split * m_blocks)  # fmt: skip
    if dropout == "regenerate":
        lc.int_ops = PHILOX_OPS * m * n_out
    elif dropout == "stored_bits":
        lc.bytes += _mask_bytes(m, n_out)
    return lc


def launches(op: str, strategy: str, dropout: str, shape: Shape, phase: str, arch: int = 90) -> list[Launch]:
    """The launches of one forward ("fwd") or backward ("bwd": dX, dA, dB, dbias).

    op "lora": strategy "fused" | "cublas"; op "qlora": "dequant_in_gemm" |
    "dequant_once+fused" | "dequant_once+cublas" | "small_m" (also plain
    "dequant_once" = "+fused"); dropout "none" | "regenerate" | "stored_bits".
    """
    s, tiles = shape, ARCH_TILES[arch]
    m, k, n, r, e = s.M, s.K, s.N, s.r, s.elem
    drop = dropout != "none"
    lora_path = strategy
    if op == "qlora":
        if strategy.startswith("dequant_once"):
            lora_path = strategy.partition("+")[2] or "fused"
        elif strategy in ("dequant_in_gemm", "small_m"):
            lora_path = strategy
        else:
            raise ValueError(f"unknown qlora strategy {strategy!r}")
    elif strategy not in ("fused", "cublas"):
        raise ValueError(f"unknown lora strategy {strategy!r}")
    out: list[Launch] = []
    if phase == "fwd":
        out.append(_shrink(s, dropout))
        if op == "qlora" and strategy.startswith("dequant_once"):
            out.append(_dequant(s))
        if lora_path == "fused":
            out.append(_fused_gemm(m, n, k, r, e, tiles["gemm"], "gemm+lora", e, "none", True))
        elif lora_path == "cublas":
            out.append(_rank_expand(m, n, r, e, e, "none", "rank_expand", True))
            out.append(_cublas(m, n, k, e, tiles["cublas"], "cublas addmm beta=1"))
        elif lora_path == "dequant_in_gemm":
            w4 = _w4_bytes(n, k)
            out.append(_fused_gemm(m, n, k, r, e, tiles["qgemm"], "dequant-in-gemm+lora", e, "none", True, w_bytes=w4))
        else:
            out.append(_qgemv(m, n, k, r, e, e, "none", "qgemv+lora", True))
        return out
    if phase != "bwd":
        raise ValueError(f"phase must be 'fwd' or 'bwd', got {phase!r}")
    out.append(_dy_pass(s))
    if op == "qlora" and strategy.startswith("dequant_once"):
        out.append(_dequant(s))
    if lora_path == "fused":
        out.append(_fused_gemm(m, k, n, r, e, tiles["gemm_dropout" if drop else "gemm"], "dX gemm+lora", 4, dropout, False))
    elif lora_path == "cublas":
        out.append(_rank_expand(m, k, r, e, 4, dropout, "rank_expand D(dS A)", False))
        out.append(_cublas(m, k, n, e, tiles["cublas"], "cublas addmm beta=1 (dX)"))
    elif lora_path == "dequant_in_gemm":
        out.append(_fused_gemm(m, k, n, r, e, tiles["qgemm_dropout" if drop else "qgemm"], "dX dequant-in-gemm+lora", 4,
                               dropout, False, w_bytes=_w4_bytes(n, k)))  # fmt: skip
    else:
        out.append(_qgemv(m, k, n, r, e, 4, dropout, "dX qgemv+lora", False))
    out.append(_down_grad(s, dropout))
    return out


def predict(op: str, strategy: str, dropout: str, shape: Shape, phase: str, gpu: GPU | str) -> float:
    """Predicted seconds of one phase ("fwd", "bwd" or "both") on ``gpu``."""
    g = GPUS[gpu] if isinstance(gpu, str) else gpu
    phases = ("fwd", "bwd") if phase == "both" else (phase,)
    arch = GPU_ARCH.get(g.name, 90)
    return sum(lc.time(g) for p in phases for lc in launches(op, strategy, dropout, shape, p, arch))


def match_gpu(device_name: str) -> GPU | None:
    """The modelled GPU for a CUDA device name (``torch.cuda.get_device_name()``), or None."""
    name = device_name.upper()
    for key, tag in (("H200", "H200"), ("H100", "H100 SXM"), ("A100", "A100")):
        if key in name:
            return GPUS[tag]
    return None


# ----------------------------------------------------------------------------
# cases and tables
# ----------------------------------------------------------------------------

LORA_STRATS = [("fused", "none"), ("cublas", "none"), ("fused", "regenerate"), ("fused", "stored_bits"),
               ("cublas", "regenerate"), ("cublas", "stored_bits")]  # fmt: skip
QLORA_TRAIN = [("dequant_in_gemm", "none"), ("dequant_once+fused", "none"), ("dequant_once+cublas", "none"),
               ("dequant_in_gemm", "stored_bits"), ("dequant_once+cublas", "stored_bits")]  # fmt: skip
QLORA_DECODE = [("dequant_in_gemm", "none"), ("dequant_once+fused", "none"), ("dequant_once+cublas", "none"), ("small_m", "none")]

# Llama-3-8B (hidden 4096, intermediate 14336, 32 query heads, 8 KV heads of 128): the projections as [in -> out].
LLAMA8B = [("q_proj", 4096, 4096), ("k_proj", 4096, 1024), ("v_proj", 4096, 1024), ("o_proj", 4096, 4096),
           ("gate_proj", 4096, 14336), ("up_proj", 4096, 14336), ("down_proj", 14336, 4096)]  # fmt: skip


def default_cases() -> list[tuple[str, Shape, list[tuple[str, str]], tuple[str, ...]]]:
    """(op, shape, strategies, phases) of the committed table."""
    cases = [("lora", Shape(8192, 4096, 4096, 16, name="square"), LORA_STRATS, ("fwd", "bwd", "both"))]
    for name, k, n in LLAMA8B:
        cases.append(("lora", Shape(8192, k, n, 16, name=f"Llama-8B {name}"), LORA_STRATS, ("both",)))
    cases.append(("qlora", Shape(8192, 4096, 4096, 16, name="square"), QLORA_TRAIN, ("both",)))
    for m in (1, 16):
        for name, k, n in LLAMA8B:
            cases.append(("qlora", Shape(m, k, n, 16, name=f"decode Llama-8B {name}"), QLORA_DECODE, ("fwd",)))
    return cases


def _fmt_us(t: float) -> str:
    us = t * 1e6
    return f"{us:.0f}" if us >= 100 else f"{us:.1f}"


def table(shapes: list[Shape], gpus: list[str], phases=("both",), op: str = "lora", strats=None) -> str:
    """A markdown table: one row per (shape, strategy, phase), predicted microseconds per GPU (best in bold)."""
    strats = strats or (LORA_STRATS if op == "lora" else QLORA_DECODE)
    head = ["op", "shape", "strategy", "dropout", "phase", "launches", "GFLOP", "MB", *[f"{g} µs" for g in gpus]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in shapes:
        for phase in phases:
            preds = {(st, d): [predict(op, st, d, s, phase, g) for g in gpus] for st, d in strats}
            for (st, d), p in preds.items():
                same_drop = [q for (st2, d2), q in preds.items() if (d2 == "none") == (d == "none")]
                cells = []
                for i, t in enumerate(p):
                    mark = "**" if t <= min(q[i] for q in same_drop) * (1 + 1e-9) and len(same_drop) > 1 else ""
                    cells.append(f"{mark}{_fmt_us(t)}{mark}")
                ps = ("fwd", "bwd") if phase == "both" else (phase,)
                ls = [lc for pp in ps for lc in launches(op, st, d, s, pp)]
                n_tri = sum(lc.kind == "triton" for lc in ls)
                n_cub = sum(lc.kind == "cublas" for lc in ls)
                count = f"{n_tri}" + (f" + {n_cub} cuBLAS" if n_cub else "")
                lines.append("| " + " | ".join([op, s.label, st, d, phase, count, f"{sum(lc.flops for lc in ls) / 1e9:.1f}",
                                                f"{sum(lc.bytes for lc in ls) / 1e6:.1f}", *cells]) + " |")  # fmt: skip
    return "\n".join(lines)


def breakdown(op: str, strategy: str, dropout: str, shape: Shape, gpu: str) -> str:
    """Per-launch table of one strategy on one GPU."""
    g = GPUS[gpu]
    lines = [f"| phase | launch | kind | GFLOP | MB | Philox Gop | programs | {gpu} µs |", "|---|---|---|---|---|---|---|---|"]
    for phase in ("fwd", "bwd"):
        for lc in launches(op, strategy, dropout, shape, phase, GPU_ARCH[gpu]):
            progs = "full" if lc.programs >= 1 << 30 else str(lc.programs)
            lines.append(f"| {phase} | {lc.name} | {lc.kind} | {lc.flops / 1e9:.2f} | {lc.bytes / 1e6:.1f} | "
                         f"{lc.int_ops / 1e9:.2f} | {progs} | {_fmt_us(lc.time(g))} |")  # fmt: skip
    return "\n".join(lines)


def model_markdown(gpus: list[str]) -> str:
    lines = ["# fastlora strategies: cost model", ""]
    lines += [
        "Predicted times from `bench/cost_model.py` (no measurement): bf16, r = 16, per layer.",
        "Model: t = max(tensor FLOPs / peak, DRAM bytes / bandwidth, Philox int ops / int rate) / u"
        f" + {LAUNCH_US:g} µs per launch,",
        f"u = min(1, programs / SMs); GEMM operands re-read per tile row/column / {L2_REUSE} (L2 reuse);",
        f"Philox4x32-10 at {PHILOX_OPS} int ops per element on the CUDA cores (FP32 FLOP/s / 2). Bold: the fastest",
        "strategy on that GPU among those with the same dropout (off / on). Launch counts: Triton launches (+ cuBLAS",
        "GEMMs). The model gives Triton's and cuBLAS's GEMMs the same fraction of peak; which gets closer on a given GPU",
        "is what the measured choice decides, so read `fused` vs `cublas` here as the cost of the extra [M, N] passes,",
        "not as a verdict. `stored_bits` trades M*K/8 saved bytes for the Philox work of the memory-bound dA pass.",
        "",
        "GPUs (dense, no sparsity): " + "; ".join(
            f"{g}: {GPUS[g].bf16_flops / 1e12:.0f} TFLOP/s bf16, {GPUS[g].bandwidth / 1e12:.2f} TB/s, "
            f"{GPUS[g].sms} SMs ({GPUS[g].source})" for g in gpus),
        "",
    ]  # fmt: skip
    for op, title, strats, shapes, phases in _sections():
        lines += [f"## {title}", "", table(shapes, gpus, phases, op=op, strats=strats), ""]
    sq = Shape(8192, 4096, 4096, 16, name="square")
    lines += ["## Per launch: LoRA M=8192 K=N=4096, dropout on, H200", ""]
    for st in ("fused", "cublas"):
        for d in ("regenerate", "stored_bits"):
            lines += [f"lora={st}, dropout={d}", "", breakdown("lora", st, d, sq, "H200"), ""]
    lines += ["## Per launch: QLoRA decode M=1, K=N=4096, H200", ""]
    for st in ("dequant_in_gemm", "small_m"):
        fwd_only = breakdown("qlora", st, "none", Shape(1, 4096, 4096, 16), "H200").split("| bwd")[0].rstrip()
        lines += [f"qlora={st}", "", fwd_only, ""]
    return "\n".join(lines)


def _sections():
    llama = [Shape(8192, k, n, 16, name=name) for name, k, n in LLAMA8B]
    return [
        ("lora", "LoRA, M=8192, K=N=4096 (forward, backward, both)", LORA_STRATS, [Shape(8192, 4096, 4096, 16)],
         ("fwd", "bwd", "both")),
        ("lora", "LoRA, Llama-8B projections, M=8192 (forward+backward)", LORA_STRATS, llama, ("both",)),
        ("qlora", "QLoRA training, M=8192, K=N=4096 (forward+backward)", QLORA_TRAIN, [Shape(8192, 4096, 4096, 16)], ("both",)),
        ("qlora", "QLoRA decode, M=1, Llama-8B projections (forward)", QLORA_DECODE,
         [Shape(1, k, n, 16, name=name) for name, k, n in LLAMA8B], ("fwd",)),
        ("qlora", "QLoRA decode, M=16, Llama-8B projections (forward)", QLORA_DECODE,
         [Shape(16, k, n, 16, name=name) for name, k, n in LLAMA8B], ("fwd",)),
    ]  # fmt: skip


# ----------------------------------------------------------------------------
# measuring (the hook bench/gpu_check.sh runs): every strategy timed, the model beside
# ----------------------------------------------------------------------------


def _strategy_names(op: str, strategy: str, dropout: str) -> dict[str, str]:
    names = {"dropout": "regenerate" if dropout == "none" else dropout}
    if op == "lora":
        names["lora"] = strategy
    else:
        q, _, lora_s = strategy.partition("+")
        names["qlora"] = q
        names["lora"] = lora_s or "fused"
    return names


def measure_cases(device: str, quick: bool):
    """(op, shape, strategies, phases) timed by --measure."""
    if device == "cpu":
        # The reference path: only the dropout strategies differ there.
        shapes = [Shape(2048, 1024, 1024, 16, elem=4)] if not quick else [Shape(512, 512, 512, 16, elem=4)]
        strats = [("fused", "regenerate"), ("fused", "stored_bits"), ("fused", "none")]
        return [("lora", s, strats, ("fwd", "bwd", "both")) for s in shapes]
    train = ("fwd", "bwd", "both")
    lora = [Shape(8192, 4096, 4096, 16)] + ([] if quick else [Shape(8192, 4096, 14336, 16, name="up_proj")])
    out = [("lora", s, LORA_STRATS, train) for s in lora]
    out.append(("qlora", Shape(8192, 4096, 4096, 16), QLORA_TRAIN, train))
    for m in (1, 16):
        out.append(("qlora", Shape(m, 4096, 4096, 16, name="decode"), QLORA_DECODE, ("fwd",)))
    return out


def measure_thread_time(layers, impls, x, dy, reps: int, warmup: int, phases) -> dict[tuple[str, str], list[float]]:
    """bench/report.py's ``measure`` (the implementations interleaved round by round, the
    same phases) timed by this thread's CPU time instead of the wall clock.

    NOTE: on a shared CPU machine the wall clock counts the time other processes hold the
    core; with one torch thread the forward and CPU autograd's backward run on the calling
    thread, so its CPU time is the work itself (cache effects of the neighbours remain)."""
    import time

    from report import clear_grads

    samples: dict[tuple[str, str], list[float]] = {(i, p): [] for i in impls for p in phases}
    for rnd in range(warmup + reps):
        for impl in impls:
            module = layers[impl]
            for phase in phases:
                clear_grads(module, x)
                if phase == "bwd":
                    y = module(x)
                    t0 = time.thread_time()
                    y.backward(dy)
                else:
                    t0 = time.thread_time()
                    y = module(x)
                    if phase == "both":
                        y.backward(dy)
                elapsed = time.thread_time() - t0
                del y
                if rnd >= warmup:
                    samples[(impl, phase)].append(elapsed)
    for impl in impls:
        clear_grads(layers[impl], x)
    return samples


def run_measure(device: str, out_dir: str, quick: bool, budget_s: float, reps: int | None = None, clock: str = "wall") -> int:
    """Time every strategy (each forced in turn; frozen nn.Linear beside), per phase, with
    bench/report.py's interleaved rounds; write strategies_<device>.md / .csv into ``out_dir``.
    ``clock``: "wall" (CUDA events on CUDA), or "thread" (CPU only: this thread's CPU time)."""
    import time

    import torch

    import fastlora
    from fastlora.quant import quantize_4bit
    from report import device_name, measure, quantiles, versions

    if device == "cuda" and not torch.cuda.is_available():
        print("cost_model.py --measure: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    fastlora.set_backend("reference" if device == "cpu" else "auto")
    gpu = match_gpu(device_name(device)) if device == "cuda" else None
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    reps = reps or (5 if quick else (20 if device == "cuda" else 15))
    deadline = time.perf_counter() + budget_s
    rows: list[dict] = []
    for op, shape, strats, phases in measure_cases(device, quick):
        if time.perf_counter() > deadline:
            print(f"[cost_model] out of budget: skipping {op} {shape.label}", flush=True)
            continue
        train = "bwd" in phases
        g = torch.Generator().manual_seed(0)
        w = torch.randn(shape.N, shape.K, generator=g) / shape.K**0.5
        qw = quantize_4bit(w.to(device)) if op == "qlora" else None
        w = w.to(device=device, dtype=dtype)
        x = torch.randn(shape.M, shape.K, generator=g).to(device=device, dtype=dtype).requires_grad_(train)
        a = torch.nn.Parameter((torch.randn(shape.r, shape.K, generator=g) / shape.K**0.5).to(device=device, dtype=dtype))
        b = torch.nn.Parameter((torch.randn(shape.N, shape.r, generator=g) * 0.1).to(device=device, dtype=dtype))
        a.requires_grad_(train)
        b.requires_grad_(train)
        bias = torch.zeros(shape.N, device=device, dtype=dtype)
        dy = torch.randn(shape.M, shape.N, generator=g).to(device=device, dtype=dtype)
        linear = torch.nn.Linear(shape.K, shape.N, device=device, dtype=dtype).requires_grad_(False)
        with torch.no_grad():
            linear.weight.copy_(w)
        layers: dict[str, torch.nn.Module] = {}
        which: dict[str, tuple[str, str]] = {}
        for st, d in strats:
            name = f"{'reference' if device == 'cpu' else st}/{d}"
            layers[name] = _forced_layer(op, _strategy_names(op, st, d), 0.1 if d != "none" else 0.0, w, qw, a, b, bias)
            which[name] = (st, d)
        layers["nn.Linear (frozen)"] = linear
        try:
            # two warm-up rounds (compile, autotune), then the implementations interleaved round by round
            if clock == "thread":
                samples = measure_thread_time(layers, list(layers), x, dy, reps, 2, phases)
            else:
                samples = measure(layers, list(layers), x, dy, device, reps, 2, phases)
        finally:
            for axis in fastlora.strategies():
                fastlora.set_strategy(axis, None)
        for phase in phases:
            base = statistics.median(samples[("nn.Linear (frozen)", phase)])
            base_min = min(samples[("nn.Linear (frozen)", phase)])
            for name in layers:
                p20, med, p80 = quantiles(samples[(name, phase)])
                fastest = min(samples[(name, phase)])
                st, d = which.get(name, ("", ""))
                pred = predict(op, st, d, shape, phase, gpu) if (gpu is not None and st) else math.nan
                rows.append({"op": op, "shape": shape.label, "phase": phase, "impl": name, "median_ms": med * 1e3,
                             "p20_ms": p20 * 1e3, "p80_ms": p80 * 1e3, "vs_linear": med / base,
                             "min_ms": fastest * 1e3, "vs_linear_min": fastest / base_min,
                             "model_ms": pred * 1e3, "model_gpu": gpu.name if gpu else ""})  # fmt: skip
                print(f"[cost_model] {op} {shape.label} {phase} {name}: {med * 1e3:.3f} ms (x{med / base:.3f} nn.Linear)"
                      + (f", model {pred * 1e3:.3f} ms on {gpu.name}" if pred == pred else ""), flush=True)  # fmt: skip
    os.makedirs(out_dir, exist_ok=True)
    stamp = {"device": device_name(device), **{f"{k}_version": v for k, v in versions().items()},
             "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
             "command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "reps": reps,
             "clock": "thread CPU time (time.thread_time)" if clock == "thread" else "wall (CUDA events on CUDA)",
             "model": gpu.name if gpu else "none (no modelled GPU for this device)"}  # fmt: skip
    if device == "cpu":
        from report import loadavg

        stamp["load_avg_1m_end"] = loadavg()
    md = measured_markdown(rows, stamp, device)
    with open(os.path.join(out_dir, f"strategies_{device}.md"), "w") as fh:
        fh.write(md)
    with open(os.path.join(out_dir, f"strategies_{device}.csv"), "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["op"])
        writer.writeheader()
        writer.writerows(rows)
    print(md)
    return 0


_FORCED_CLASS: list = []


def _forced_layer(op, names, dropout, w, qw, a, b, bias):
    """An nn.Module running one strategy combination, forced on each call (its backward
    follows the forward's choice). Built on first use: torch is imported by --measure only."""
    if not _FORCED_CLASS:
        import torch

        import fastlora

        class Forced(torch.nn.Module):
            def __init__(self, op, names, dropout, w, qw, a, b, bias):
                super().__init__()
                self.op, self.names, self.dropout, self.w, self.qw, self.bias = op, names, dropout, w, qw, bias
                self.a, self.b = a, b  # the shared adapters (nn.Parameters: report.clear_grads clears them)

            def forward(self, x):
                for axis, name in self.names.items():
                    fastlora.set_strategy(axis, name)
                if self.op == "lora":
                    return fastlora.lora_linear(x, self.w, self.a, self.b, 2.0, self.bias, dropout=self.dropout)
                return fastlora.qlora_linear(x, self.qw, self.a, self.b, 2.0, self.bias, dropout=self.dropout)

        _FORCED_CLASS.append(Forced)
    return _FORCED_CLASS[0](op, names, dropout, w, qw, a, b, bias)


def measured_markdown(rows: list[dict], stamp: dict, device: str) -> str:
    lines = [f"# fastlora strategies measured ({device}), the cost model beside", ""]
    lines += [f"- {k}: {v}" for k, v in stamp.items()]
    lines += ["", "Times in ms: median (p20-p80) of the forward, the backward (its forward untimed) or both, the",
              "implementations interleaved round by round (bench/report.py's timing); 'x nn.Linear' is the ratio to a",
              "frozen nn.Linear of the same shape (backward: dX only). 'min' is each implementation's fastest round,",
              "the least disturbed by other processes on a shared machine (see 'clock' above). On CPU fastlora runs its",
              "reference path,",
              "where only the dropout strategy changes the computation.", ""]
    lines += ["| op | shape | phase | strategy/dropout | measured ms | x nn.Linear | min ms | x nn.Linear (min) | model ms |",
              "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        model = f"{row['model_ms']:.3f}" if row["model_ms"] == row["model_ms"] else "-"
        lines.append(f"| {row['op']} | {row['shape']} | {row['phase']} | {row['impl']} | {row['median_ms']:.3f} "
                     f"({row['p20_ms']:.3f}-{row['p80_ms']:.3f}) | {row['vs_linear']:.3f} | {row['min_ms']:.3f} | "
                     f"{row['vs_linear_min']:.3f} | {model} |")  # fmt: skip
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------


def _clock(args, device: str) -> str:
    if device != "cpu":
        if args.clock == "thread":
            raise SystemExit("cost_model.py: --clock thread is for CPU timing only")
        return "wall"
    return args.clock or ("thread" if args.threads == 1 else "wall")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="output folder")
    ap.add_argument("--gpus", default=",".join(GPUS), help=f"comma list of {list(GPUS)}")
    ap.add_argument("--measure", action="store_true", help="time every strategy on --device, the model beside")
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None, help="with --measure (default: cuda when available)")
    ap.add_argument("--quick", action="store_true", help="with --measure: fewer shapes and repeats")
    ap.add_argument("--budget", type=float, default=240.0, help="with --measure: seconds before remaining cases are skipped")
    ap.add_argument("--reps", type=int, default=None, help="timed rounds (default: 20 on CUDA, 15 on CPU, 5 quick)")
    ap.add_argument("--clock", choices=("wall", "thread"), default=None,
                    help="CPU only: 'thread' times this thread's CPU time (default with --threads 1), else wall")
    ap.add_argument("--cpu-measure", action="store_true", help="append the CPU measurement (reference path) to cost_model.md")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.measure:
        import torch

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        return run_measure(device, args.out, args.quick, args.budget, args.reps, _clock(args, device))
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
    unknown = [g for g in gpus if g not in GPUS]
    if unknown:
        ap.error(f"unknown GPU(s) {unknown}; known: {list(GPUS)}")
    md = model_markdown(gpus)
    stamp = f"\nGenerated by `python {' '.join(shlex.quote(a) for a in sys.argv)}`.\n"
    if args.cpu_measure:
        tmp = os.path.join(args.out, ".cost_model_cpu")
        run_measure("cpu", tmp, quick=False, budget_s=args.budget, reps=args.reps, clock=_clock(args, "cpu"))
        with open(os.path.join(tmp, "strategies_cpu.md")) as fh:
            title = "## Measured on CPU: the reference path, dropout strategies"
            measured = fh.read().replace("# fastlora strategies measured (cpu), the cost model beside", title)
        for name in os.listdir(tmp):
            os.remove(os.path.join(tmp, name))
        os.rmdir(tmp)
        md += "\n" + measured
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "cost_model.md"), "w") as fh:
        fh.write(md + stamp)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
