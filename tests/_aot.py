"""Shared part of the ahead-of-time compile tier (tests/test_aot.py,
tests/test_kernels_nf4.py, tests/test_strategies.py): run a compile script in a
subprocess without TRITON_INTERPRET (the interpreter replaces @triton.jit
functions, which triton.compile cannot take), compile one variant and read its
resource usage there (:func:`compile_variant`), then check the JSON lines."""

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


def compile_variant(v: dict, fn, signature: dict, constexprs: dict, attrs: dict, options: dict) -> dict:
    """Compile the @triton.jit ``fn`` (autotune wrappers unwrapped) for ``v["arch"]``;
    returns ``v`` with REG / STACK (``cuobjdump`` of the triton wheel) and the
    dynamic SHARED memory, or with ``error`` (reported, then failed by the test)."""
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget

    while not isinstance(fn, triton.runtime.JITFunction):  # unwrap @triton.autotune
        fn = fn.fn
    try:
        src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        kernel = triton.compile(src, target=GPUTarget("cuda", v["arch"], 32), options=options)
    except Exception as exc:  # noqa: BLE001 - reported, then failed by the test
        return dict(v, error=f"{type(exc).__name__}: {str(exc)[-2000:]}")
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
    line = next(ln for ln in usage.splitlines() if "REG:" in ln)
    fields = dict(tok.split(":", 1) for tok in line.split() if ":" in tok)
    return dict(v, reg=int(fields["REG"]), stack=int(fields["STACK"]), shared=int(kernel.metadata.shared))


def launch_signature(fn, constexprs: dict, ptrs: dict) -> dict:
    """The compile signature of a launch: constexprs, pointers (``ptrs``: argument ->
    element type), fp32 for the float scalars ``scaling`` / ``inv_keep``, i64 for the
    dropout seed, i32 for every other integer argument."""
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ptrs:
            signature[name] = "*" + ptrs[name]
        elif name in ("scaling", "inv_keep"):
            signature[name] = "fp32"
        elif name == "seed":
            signature[name] = "i64"
        else:
            signature[name] = "i32"
    return signature


def jit_function(fn):
    """The @triton.jit function under any @triton.autotune wrappers (its arg_names)."""
    import triton

    while not isinstance(fn, triton.runtime.JITFunction):
        fn = fn.fn
    return fn


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
