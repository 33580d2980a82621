"""Shared part of the ahead-of-time compile tier (tests/test_aot.py,
tests/test_kernels_nf4.py): run a compile script in a subprocess without
TRITON_INTERPRET (the interpreter replaces @triton.jit functions, which
triton.compile cannot take), then check its JSON lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
ARCHS = (80, 90)
SMEM_LIMIT = {80: 166912, 90: 232448}  # largest dynamic shared memory per block (A100, H100/H200)


def compile_in_subprocess(script: str) -> list[dict]:
    """Run ``script`` (a test file whose ``main()`` prints one JSON object per
    compiled variant) without the interpreter; return the parsed results."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(Path(script).resolve())], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, f"AOT subprocess failed:\n{proc.stderr[-4000:]}"
    return [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]


def check_compiled(results: list[dict], kernels: set[str], describe: Callable[[dict], str], spill_hint: str) -> None:
    """Every expected kernel compiled for every arch, without errors, register
    spills (non-zero STACK) or shared memory over the arch's limit."""
    assert {r["kernel"] for r in results} == kernels, f"missing kernels: {kernels - {r['kernel'] for r in results}}"
    assert {r["arch"] for r in results} == set(ARCHS)
    print(f"\n{len(results)} variants compiled:")
    for r in results:
        if "error" not in r:
            print(f"  {describe(r)}  REG={r['reg']} STACK={r['stack']} SHARED={r['shared']}")
    errors = [f"{describe(r)}: {r['error']}" for r in results if "error" in r]
    assert not errors, "compile errors:\n" + "\n".join(errors)
    spills = [f"{describe(r)}: STACK={r['stack']} REG={r['reg']}" for r in results if r["stack"] != 0]
    assert not spills, f"register spills ({spill_hint}):\n" + "\n".join(spills)
    too_big = [f"{describe(r)}: SHARED={r['shared']}" for r in results if r["shared"] > SMEM_LIMIT[r["arch"]]]
    assert not too_big, "shared memory over the arch's limit:\n" + "\n".join(too_big)
