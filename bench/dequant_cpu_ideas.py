#!/usr/bin/env python
"""The pure-PyTorch ways to dequantize 4-bit on CPU, timed beside bitsandbytes (issue 9).

    python bench/dequant_cpu_ideas.py --threads 1 --out bench/results

One 2048 x 2048 NF4 weight (blocksize 64, double quantization). Timed in the
same interleaved rounds, thread CPU time (``time.thread_time``) per call,
median (p20-p80):

* the whole dequantization: bitsandbytes (fp32, fp16 out) and fastlora's
  ``dequantize_4bit`` (fp32, fp16 out);
* every gather PyTorch offers, each producing the same fp32 values (unscaled)
  from prebuilt indices into a preallocated output where the op allows:
  the 256-entry byte -> fp32-pair table (n/2 gathers) by ``index_select``,
  ``take``, ``gather``, advanced indexing, ``F.embedding`` and
  ``F.embedding_bag``; a 65536-entry uint16 -> 4 x fp32 table (n/4 gathers of
  16 bytes, 1 MiB table) by ``index_select``; the 16-entry per-nibble table (n
  gathers); ``F.grid_sample`` (nearest) as a vectorized gather;
* the other passes of fastlora's path: uint8 -> int32 indices, the in-place
  absmax scaling, fp32 -> fp16 in cache (chunks of 2**19), restoring the
  double-quantized absmax.

Writes ``dequant_cpu_ideas.md`` into ``--out``. Nothing is asserted; the
point is which pass a pure-PyTorch dequantizer cannot avoid and what it costs
next to bitsandbytes' whole call.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import shlex
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import torch  # noqa: E402
import torch.nn.functional as Fn  # noqa: E402

from fastlora.quant import _byte_table, _dequantize_absmax, dequantize_4bit, quantize_4bit  # noqa: E402
from report import device_name, loadavg, quantiles, versions  # noqa: E402


def candidates(n_rows: int, n_cols: int) -> tuple[dict, dict]:
    """(name -> (group, zero-argument callable)), facts."""
    import bitsandbytes.functional as bnbF

    w = torch.randn(n_rows, n_cols, generator=torch.Generator().manual_seed(0))
    n = w.numel()
    qw = quantize_4bit(w, "nf4", 64, True)
    packed, state = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(packed.reshape(-1), qw.packed.reshape(-1))
    byte = qw.packed.reshape(-1)
    idx32 = byte.to(torch.int32)
    idx64 = byte.to(torch.int64)
    table = _byte_table(qw.quant_map)  # int64 [256]: two fp32 each
    table2d = table.view(torch.float32).view(256, 2)
    out_pairs = torch.empty(n // 2, dtype=torch.int64)
    # uint16 (two bytes, little-endian) -> four fp32; a 65536 x 16-byte table.
    quads = table.view(torch.float32).view(256, 2)
    t16 = torch.cat([quads.repeat(256, 1), quads.repeat_interleave(256, 0)], dim=1).contiguous()
    t16 = t16.view(torch.complex128).view(65536)
    idx16 = byte.view(torch.int16).to(torch.int32) & 0xFFFF
    out_quads = torch.empty(n // 4, dtype=torch.complex128)
    nib = torch.stack([byte >> 4, byte & 15], 1).reshape(-1).to(torch.int32)
    qmap = qw.quant_map.view(torch.int32)
    out_nib = torch.empty(n, dtype=torch.int32)
    offsets = torch.arange(n // 2 + 1, dtype=torch.int32)
    grid_rows = 256
    grid = ((nib[: grid_rows * (n // grid_rows)].float() * 2 + 1) / 16 - 1).view(1, grid_rows, -1, 1)
    grid = torch.cat([grid, torch.zeros_like(grid)], dim=3)
    image = qw.quant_map.view(1, 1, 1, 16)
    absmax = _dequantize_absmax(qw)
    vals = torch.empty(n)
    half = torch.empty(n, dtype=torch.float16)
    chunk = min(n, 1 << 19)
    buf = torch.empty(chunk)

    def to_half():
        for e0 in range(0, n, chunk):
            half[e0 : e0 + chunk].copy_(buf)

    def bnb(dtype):
        state.dtype = dtype
        return bnbF.dequantize_4bit(packed, state)

    # The gathers agree with each other (checked once, here).
    ref = torch.index_select(table, 0, idx32).view(torch.float32)
    assert torch.equal(torch.index_select(t16, 0, idx16).view(torch.float32), ref)
    assert torch.equal(torch.index_select(qmap, 0, nib).view(torch.float32), ref)
    fns = {
        "bitsandbytes dequantize_4bit, fp32 out": ("whole", lambda: bnb(torch.float32)),
        "bitsandbytes dequantize_4bit, fp16 out": ("whole", lambda: bnb(torch.float16)),
        "fastlora dequantize_4bit, fp32 out": ("whole", lambda: dequantize_4bit(qw, torch.float32)),
        "fastlora dequantize_4bit, fp16 out": ("whole", lambda: dequantize_4bit(qw, torch.float16)),
        "index_select, byte -> pair (int64), n/2": (
            "gather", lambda: torch.index_select(table, 0, idx32, out=out_pairs)),
        "take, byte -> pair, n/2 (int64 index)": ("gather", lambda: torch.take(table, idx64)),
        "gather, byte -> pair, n/2 (int64 index)": ("gather", lambda: torch.gather(table, 0, idx64)),
        "advanced indexing table[idx], n/2": ("gather", lambda: table[idx64]),
        "F.embedding [256, 2] fp32, n/2": ("gather", lambda: Fn.embedding(idx32, table2d)),
        "F.embedding_bag (sum, 1 per bag), n/2": ("gather", lambda: Fn.embedding_bag(
            idx32, table2d, offsets, mode="sum", include_last_offset=True)),
        "index_select, uint16 -> 4 fp32 (complex128, 1 MiB table), n/4": (
            "gather", lambda: torch.index_select(t16, 0, idx16, out=out_quads)),
        "index_select, nibble -> fp32 (int32), n": ("gather", lambda: torch.index_select(qmap, 0, nib, out=out_nib)),
        "F.grid_sample nearest, n": ("gather", lambda: Fn.grid_sample(image, grid, mode="nearest",
                                                                        align_corners=False)),
        "uint8 -> int32 indices, n/2": ("pass", lambda: idx32.copy_(byte)),
        "absmax scaling in place, [blocks, 64] fp32": ("pass", lambda: vals.view(-1, 64).mul_(absmax.unsqueeze(1))),
        "fp32 -> fp16 from a 2 MiB buffer, n": ("pass", to_half),
        "restore the double-quantized absmax": ("pass", lambda: _dequantize_absmax(qw)),
    }
    return fns, {"weight": f"{n_rows}x{n_cols} nf4, blocksize 64, double quant", "n": n}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--quick", action="store_true", help="512 x 512, 5 repeats")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)  # bitsandbytes' OpenMP is torch's (one libgomp per process)
    shape = (512, 512) if args.quick else (2048, 2048)
    reps = 5 if args.quick else args.reps
    fns, facts = candidates(*shape)
    stamp = {"device": device_name("cpu"), **{f"{k}_version": v for k, v in versions().items()},
             "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
             "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__)] + sys.argv[1:]),
             "reps": reps, "load_avg_1m_start": loadavg()}
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for rnd in range(reps + 3):
        for name, (_, fn) in fns.items():
            c0 = time.thread_time()
            fn()
            if rnd >= 3:
                samples[name].append(time.thread_time() - c0)
    stamp["load_avg_1m_end"] = loadavg()
    bnb32 = quantiles(samples["bitsandbytes dequantize_4bit, fp32 out"])[1]
    bnb16 = quantiles(samples["bitsandbytes dequantize_4bit, fp16 out"])[1]
    lines = ["# 4-bit dequantization on CPU: pure-PyTorch pieces vs bitsandbytes", ""]
    lines += [f"- {k}: {v}" for k, v in stamp.items()] + [f"- weight: {facts['weight']} (n = {facts['n']})", ""]
    lines += ["Thread CPU ms per call (time.thread_time), median (p20-p80), all rows interleaved in the same rounds. "
              "/ bnb fp32 and / bnb fp16: the row's median over bitsandbytes' whole call with that output dtype.", "",
              "| what | kind | CPU ms | / bnb fp32 | / bnb fp16 |", "|---|---|---|---|---|"]
    for name, (group, _) in fns.items():
        p20, med, p80 = quantiles(samples[name])
        lines.append(f"| {name} | {group} | {med * 1e3:.3g} ({p20 * 1e3:.3g}-{p80 * 1e3:.3g}) | {med / bnb32:.2f} | "
                     f"{med / bnb16:.2f} |")
    lines += ["", "kind: whole = a complete dequantization; gather = one gather pass alone (prebuilt indices, no "
              "scaling or conversion); pass = another pass of fastlora's path.", ""]
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "dequant_cpu_ideas.md")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines[-len(fns) - 4 :]))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
