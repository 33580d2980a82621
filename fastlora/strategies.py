"""Several implementations ("strategies") per fused op, chosen by measurement.

Every strategy computes the same op with the same contract (saved tensors x
and S, deterministic, nothing written into inputs); they differ in which
launches do the work, and which is fastest depends on the GPU, the dtype and
the shapes, so fastlora measures them on the user's device:

=========  ===================================================================
op         strategies (the first is the default)
=========  ===================================================================
lora       ``fused``: Triton GEMMs with the LoRA term in their epilogues;
           ``cublas``: the frozen-weight GEMMs as cuBLAS ``addmm`` with beta=1
           into a buffer holding the rank-r term, Triton kernels around them
qlora      ``dequant_in_gemm``: 4-bit W dequantized in the GEMM tiles;
           ``dequant_once``: one dequant launch per call, then the ``lora`` path;
           ``small_m``: a split-K GEMV reading each 4-bit weight once (M <= 16)
dropout    ``regenerate``: the Philox mask re-drawn in backward;
           ``stored_bits``: the mask stored in forward, 1 bit per element
qlora_     ``dequant_in_gemm``: the multi-adapter GEMMs read the 4-bit W in
multi      their main loop; ``dequant_once``: one dequant launch per call into
           a transient [N, K] weight, then the dense multi-adapter kernels
           (``qlora_linear_multi``; timed like the others, keyed by its shape)
=========  ===================================================================

Choosing (what a call of ``lora_linear`` / ``qlora_linear`` uses, per op):

1. ``set_strategy(op, name)`` (process-wide; ``set_strategy(op, None)`` clears it);
2. the ``FASTLORA_STRATEGY`` environment variable, ``op:name,...``
   (e.g. ``FASTLORA_STRATEGY=lora:cublas,dropout:stored_bits``);
3. measured: on CUDA with the Triton backend, the first call for a (device,
   dtype, shape bucket, flags) key times every candidate (forward, plus
   backward when the call records a graph; CUDA events, a few repetitions
   within a time bound) and keeps the fastest, in process and in a small JSON
   file (``FASTLORA_STRATEGY_CACHE``: its path, or ``0`` to keep choices in
   memory only; default ``$XDG_CACHE_HOME/fastlora/strategies.json``) keyed by
   the device name and the torch / triton / fastlora / CUDA versions;
   ``FASTLORA_STRATEGY_MEASURE=0`` turns measuring off;
4. otherwise (no GPU, the interpreter, measuring off): the defaults, which are
   fastlora's behaviour before strategies existed.

:func:`strategy_report` lists what was chosen, why, and the measured times.

How it reaches the op: ``FusedOp``'s call path turns the backend name into a
*spec string* (:func:`strategy_backend`; e.g. ``"triton:lora=cublas,auto"``),
a constant argument of the op's custom ops, so ``torch.compile`` neither
breaks the graph nor retraces; ``backend_module(spec)`` returns
:func:`ops_for`'s object with the backend-module interface. With ``auto`` in
the spec the candidates are timed *inside* the op, at run time, on the real
tensors: outside any traced graph. On the reference backend only
``dropout=stored_bits`` has its own torch formulation; other names are
accepted and ignored there.

NOTE: ``fastlora.strategies`` (the package attribute) is the function
:func:`strategies`; reach this module with ``from fastlora.strategies import ...``.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from ._files import read_regular_file, write_files_atomically

OPS: dict[str, tuple[str, ...]] = {
    "lora": ("fused", "cublas"),
    "qlora": ("dequant_in_gemm", "dequant_once", "small_m"),
    "dropout": ("regenerate", "stored_bits"),
    "qlora_multi": ("dequant_in_gemm", "dequant_once"),
}
DEFAULTS = {op: names[0] for op, names in OPS.items()}
SMALL_M = 16  # the largest M the chooser offers qlora=small_m for
# The strategy axes each fused op has (the op's FusedOp name -> axes).
_OP_AXES = {"lora": ("lora", "dropout"), "qlora": ("qlora", "lora", "dropout"), "qlora_multi": ("qlora_multi",)}

ENV_STRATEGY = "FASTLORA_STRATEGY"
ENV_CACHE = "FASTLORA_STRATEGY_CACHE"
ENV_MEASURE = "FASTLORA_STRATEGY_MEASURE"
_OFF = ("0", "off", "false", "no", "none", "")

# Timing: REPS timed runs after one warm-up (which compiles and autotunes), each
# candidate stopping early once BUDGET_S is spent.
REPS = 5
BUDGET_S = 0.25
_CACHE_FORMAT = "fastlora-strategies-1"
_CACHE_MAX_BYTES = 1 << 20
_CACHE_MAX_KEYS = 2048  # per device entry: the file stays small

# ----------------------------------------------------------------------------
# forcing
# ----------------------------------------------------------------------------

# set_strategy's choices. NOTE: replaced, never mutated (copy-on-write under _lock): a
# reader on another thread iterates a dict that cannot change under it, and
# torch.compile's guard on this global sees a new object when a choice changes.
_forced: dict[str, str] = {}
_lock = threading.RLock()


def strategies() -> dict[str, list[str]]:
    """The strategy names per op: ``{"lora": [...], "qlora": [...], "dropout": [...],
    "qlora_multi": [...]}`` (the default first)."""
    return {op: list(names) for op, names in OPS.items()}


def _check(op: object, name: object, where: str) -> None:
    if op not in OPS:
        raise ValueError(f"{where}: op must be one of {tuple(OPS)}, got {op!r}")
    if name not in OPS[op]:  # type: ignore[index]
        raise ValueError(f"{where}: the strategies of {op!r} are {OPS[op]}, got {name!r}")  # type: ignore[index]


def set_strategy(op: str, name: str | None) -> None:
    """Force strategy ``name`` for ``op`` ("lora", "qlora", "dropout" or "qlora_multi") in this
    process, or clear the choice with None (``FASTLORA_STRATEGY`` and measuring
    apply again). Raises ValueError for an unknown op or name."""
    global _forced
    if name is None:
        if op not in OPS:
            raise ValueError(f"set_strategy: op must be one of {tuple(OPS)}, got {op!r}")
        with _lock:
            _forced = {k: v for k, v in _forced.items() if k != op}
        return
    _check(op, name, "set_strategy")
    with _lock:
        _forced = {**_forced, op: name}


def parse_strategy_env(text: str) -> dict[str, str]:
    """``"lora:cublas, dropout:stored_bits"`` -> ``{"lora": "cublas", "dropout": "stored_bits"}``
    (``op=name`` is accepted too; ``op:auto`` leaves the op unforced)."""
    out: dict[str, str] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        sep = ":" if ":" in item else "="
        op, _, name = item.partition(sep)
        op, name = op.strip().lower(), name.strip().lower()
        if name == "auto" and op in OPS:
            continue
        _check(op, name, f"{ENV_STRATEGY}={text!r}")
        out[op] = name
    return out


def forced_strategies() -> dict[str, str]:
    """The strategies forced now: ``FASTLORA_STRATEGY``, overridden per op by :func:`set_strategy`."""
    return dict(_forced_now())


def _forced_from(env: str, forced: dict[str, str]) -> dict[str, str]:
    out = parse_strategy_env(env) if env.strip() else {}
    out.update(forced)
    return out


# (FASTLORA_STRATEGY's text, the _forced dict, what they give): the environment is read
# on every call, parsed only when it or set_strategy's choices changed (_forced is
# replaced on every change, and the memo's reference keeps the old one from being reused).
_forced_memo: tuple[str, dict[str, str], dict[str, str]] = ("", _forced, {})


def _forced_now() -> dict[str, str]:
    """:func:`forced_strategies`, not to be mutated (shared between calls)."""
    global _forced_memo
    env = os.environ.get(ENV_STRATEGY, "")
    forced = _forced
    if torch.compiler.is_compiling():
        return _forced_from(env, forced)  # traced code: plain, no global written
    memo = _forced_memo
    if memo[1] is forced and memo[0] == env:
        return memo[2]
    out = _forced_from(env, forced)
    _forced_memo = (env, forced, out)
    return out


# ----------------------------------------------------------------------------
# the spec string: what FusedOp passes as the op's backend
# ----------------------------------------------------------------------------

_timer_override: list = []  # [timer] while use_timer is active


def _may_measure(device: torch.device) -> bool:
    if _timer_override:
        return True
    return device.type == "cuda" and os.environ.get(ENV_MEASURE, "1").strip().lower() not in _OFF


def strategy_backend(op: str, backend: str, inputs, dropout_p: float) -> str:
    """The backend argument of op ``op``'s call: ``backend`` itself when no
    strategy applies (the op has none, none is forced and nothing is measured),
    else a spec ``"<backend>:<axis>=<name>,...[,auto][,infer]"``.

    Called by ``FusedOp`` on every call, also while ``torch.compile`` traces (plain
    Python on constants: no graph break). ``inputs`` are the op's inputs, x first.
    """
    axes = _OP_AXES.get(op)
    if axes is None or (backend == "reference" and dropout_p <= 0.0):
        # NOTE: no strategy can apply (the reference's only one is a dropout's), so the
        # environment is not read: os.environ.get of an unset name raises and catches a
        # KeyError, 1.4 us a call on this project's CPUs (`python -m timeit -s "import os"
        # "os.environ.get('FASTLORA_STRATEGY', '')"`). A malformed FASTLORA_STRATEGY is
        # refused by the first call it could change.
        return backend
    forced = _forced_now()
    relevant = []
    for a in axes:
        if a == "dropout" and dropout_p <= 0.0:
            continue  # no mask to store or regenerate
        if op == "qlora" and a == "lora" and forced.get("qlora") in ("dequant_in_gemm", "small_m"):
            continue  # these QLoRA strategies have no dense-weight GEMM to choose
        relevant.append(a)
    parts = [f"{a}={forced[a]}" for a in relevant if a in forced]
    if backend == "reference":
        # NOTE: the only torch formulation of its own; the other names are
        # accepted and ignored (the reference has one formulation of each).
        parts = [p for p in parts if p == "dropout=stored_bits"]
        return f"{backend}:{parts[0]}" if parts else backend
    x = inputs[0]
    if len(parts) < len(relevant) and _may_measure(x.device):
        train = False
        if torch.is_grad_enabled():
            for t in inputs:
                train = train or (isinstance(t, Tensor) and t.requires_grad)
        parts.append("auto" if train else "auto,infer")
    return f"{backend}:{','.join(parts)}" if parts else backend


def parse_spec(spec: str) -> tuple[str, dict[str, str], bool, bool]:
    """``"triton:lora=cublas,auto,infer"`` -> ``("triton", {"lora": "cublas"}, auto, train)``."""
    base, _, rest = spec.partition(":")
    forced: dict[str, str] = {}
    auto, train = False, True
    for item in filter(None, rest.split(",")):
        if item == "auto":
            auto = True
        elif item == "infer":
            train = False
        else:
            axis, _, name = item.partition("=")
            _check(axis, name, f"strategy spec {spec!r}")
            forced[axis] = name
    return base, forced, auto, train


_ops_cache: dict[str, object] = {}


def ops_for(spec: str):
    """The object implementing a spec with the backend-module interface
    (``lora_forward``, ``lora_backward``, ``dora_forward``, ``qlora_forward``,
    ``qlora_backward``); what ``fastlora._fused.backend_module`` returns for it."""
    ops = _ops_cache.get(spec)
    if ops is None:
        base, forced, auto, train = parse_spec(spec)
        ops = _AutoOps(base, forced, train) if auto else concrete_ops(base, forced)
        _ops_cache[spec] = ops
    return ops


def concrete_ops(base: str, names: dict[str, str]):
    """The implementation of one fixed combination (unnamed axes at their defaults)."""
    if base == "reference":
        if names.get("dropout") == "stored_bits":
            from .strategy_ops import ReferenceStoredBits

            return ReferenceStoredBits
        return importlib.import_module("fastlora.reference")
    if base != "triton":
        raise ValueError(f"unknown backend {base!r} in a strategy spec")
    key = f"triton:{names.get('lora', 'fused')},{names.get('qlora', 'dequant_in_gemm')},{names.get('dropout', 'regenerate')}"
    ops = _ops_cache.get(key)
    if ops is None:
        kernels = importlib.import_module("fastlora.kernels.strategies")
        ops = kernels.TritonStrategy(**{axis: names[axis] for axis in OPS if axis in names})
        _ops_cache[key] = ops
    return ops


# ----------------------------------------------------------------------------
# candidates and keys
# ----------------------------------------------------------------------------


def candidate_names(op: str, forced: dict[str, str], dropout_p: float, train: bool, m: int) -> list[str]:
    """The combinations to choose among, each as ``"axis=name,..."`` (the
    default first): forced axes fixed, ``dropout`` only with dropout in
    training, ``qlora=small_m`` only for M <= 16 (unless forced)."""
    if op == "qlora_multi":  # one axis: the base weight's dequantization
        names = [forced[op]] if op in forced else list(OPS[op])
        return [f"{op}={name}" for name in names]
    if dropout_p > 0.0 and train:
        drops = [forced.get("dropout")] if "dropout" in forced else list(OPS["dropout"])
    else:
        drops = [None]
    loras = [forced["lora"]] if "lora" in forced else list(OPS["lora"])
    if op == "lora":
        heads = [f"lora={name}" for name in loras]
    else:
        if "qlora" in forced:
            qloras = [forced["qlora"]]
        else:
            qloras = [q for q in OPS["qlora"] if q != "small_m" or m <= SMALL_M]
        heads = []
        for q in qloras:
            heads += [f"qlora={q},lora={name}" for name in loras] if q == "dequant_once" else [f"qlora={q}"]
    return [h if d is None else f"{h},dropout={d}" for h in heads for d in drops]


def names_of(candidate: str) -> dict[str, str]:
    return dict(item.split("=") for item in candidate.split(","))


def _bucket(m: int) -> int:
    """Rows bucket: the next power of two (0 stays 0)."""
    return 0 if m <= 0 else 1 << (m - 1).bit_length()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def shape_key(op: str, x: Tensor, n: int, r: int, dropout_p: float, train: bool, quant: str = "") -> str:
    """The cache key of a call: op, dtype, shape bucket (M to a power of two,
    K and N exact, r padded to a power of two >= 16) and flags."""
    rank = max(16, 1 << max(r - 1, 0).bit_length())
    flags = ("dropout" if dropout_p > 0.0 else "nodropout") + ("" if train else ",infer") + quant
    return f"{op}|{_dtype_name(x.dtype)}|M{_bucket(x.shape[0])}|K{x.shape[1]}|N{n}|r{rank}|{flags}"


def _quant_flags(qw) -> str:
    return f",{qw.quant_type}{qw.blocksize}{'dq' if qw.double_quant else ''}"


# ----------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------

Timer = Callable[[str, Callable[[], object], torch.device], "float | None"]


def cuda_event_timer(name: str, run: Callable[[], object], device: torch.device) -> float | None:
    """Median seconds of ``run()`` on ``device`` by CUDA events: one warm-up run
    (Triton compiles and autotunes there), then up to :data:`REPS` timed runs,
    stopping once :data:`BUDGET_S` is spent. None off CUDA."""
    if device.type != "cuda":
        return None
    with torch.cuda.device(device):
        run()
        torch.cuda.synchronize()
        deadline = time.perf_counter() + BUDGET_S
        times = []
        for _ in range(REPS):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
            if time.perf_counter() > deadline:
                break
    return statistics.median(times)


@contextlib.contextmanager
def use_timer(timer: Timer) -> Iterator[None]:
    """Measure with ``timer(candidate, run, device) -> seconds | None`` instead of
    CUDA events, on every device type (tests inject a deterministic one; it may
    call ``run()`` or not). Not thread-safe: for tests and benchmarks."""
    _timer_override.append(timer)
    try:
        yield
    finally:
        _timer_override.remove(timer)


def _timer() -> Timer:
    return _timer_override[-1] if _timer_override else cuda_event_timer


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


# ----------------------------------------------------------------------------
# the cache: in process, and a JSON file per user
# ----------------------------------------------------------------------------

# device id -> key -> candidate -> seconds (math.inf for a candidate that failed)
_times: dict[str, dict[str, dict[str, float]]] = {}
_loaded: set[str] = set()  # device ids whose file entry was read
_report: dict[tuple[str, str, tuple[str, ...]], dict] = {}
_decided: dict[tuple, str] = {}  # (device type, index, key, candidates) -> the choice made
_warned: set[str] = set()


def cache_path() -> str | None:
    """The JSON cache file, or None when ``FASTLORA_STRATEGY_CACHE`` turns it off."""
    value = os.environ.get(ENV_CACHE)
    if value is not None:
        return None if value.strip().lower() in _OFF else os.path.expanduser(value)
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "fastlora", "strategies.json")


def _version(module: str) -> str:
    mod = sys.modules.get(module)
    if mod is not None and hasattr(mod, "__version__"):
        return str(mod.__version__)
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001 - absent: say so
        return "none"


_device_ids: dict[tuple[str, int | None], str] = {}


def device_id(device: torch.device) -> str:
    """What a measurement is valid for: the device's name and the versions of
    torch, triton, fastlora and CUDA."""
    slot = (device.type, device.index)
    if slot not in _device_ids:
        _device_ids[slot] = _describe_device(device)
    return _device_ids[slot]


def _describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        name = f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"
    else:
        name = device.type
    fastlora_version = getattr(sys.modules.get("fastlora"), "__version__", "?")
    return (
        f"{name} | torch {torch.__version__} | triton {_version('triton')} | fastlora {fastlora_version} "
        f"| cuda {torch.version.cuda}"
    )


def _read_file(path: str) -> dict:
    """The cache file's devices entry ({} when absent or unreadable; a damaged
    file is reported once and then overwritten by the next save)."""
    try:
        data = json.loads(read_regular_file(path, max_bytes=_CACHE_MAX_BYTES, what="strategy cache"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        if path not in _warned:
            _warned.add(path)
            warnings.warn(f"fastlora: ignoring the strategy cache {path!r} ({exc})", stacklevel=3)
        return {}
    if not isinstance(data, dict) or data.get("format") != _CACHE_FORMAT or not isinstance(data.get("devices"), dict):
        return {}
    return data["devices"]


def _valid_entry(entry: object) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    if isinstance(entry, dict):
        for key, times in entry.items():
            if isinstance(key, str) and isinstance(times, dict):
                ok = {c: float(t) for c, t in times.items() if isinstance(c, str) and isinstance(t, (int, float))}
                if ok:
                    out[key] = {c: (math.inf if t < 0 else t / 1e3) for c, t in ok.items()}
    return out


def _known(dev: str) -> dict[str, dict[str, float]]:
    """The process cache of a device, filled from the file on first use."""
    if dev not in _loaded:
        _loaded.add(dev)
        path = cache_path()
        if path is not None:
            from_file = _valid_entry(_read_file(path).get(dev))
            mine = _times.setdefault(dev, {})
            for key, times in from_file.items():
                merged = dict(times)
                merged.update(mine.get(key, {}))
                mine[key] = merged
    return _times.setdefault(dev, {})


def _save(dev: str) -> None:
    """Merge this device's measurements into the cache file, atomically."""
    path = cache_path()
    if path is None:
        return
    devices = _read_file(path)
    entry = devices.get(dev) if isinstance(devices.get(dev), dict) else {}
    for key, times in _times.get(dev, {}).items():
        if key in entry or len(entry) < _CACHE_MAX_KEYS:
            # milliseconds, 4 significant digits; -1 marks a candidate that failed
            entry[key] = {c: (-1 if math.isinf(t) else float(f"{t * 1e3:.4g}")) for c, t in sorted(times.items())}
    devices[dev] = entry
    data = json.dumps({"format": _CACHE_FORMAT, "devices": devices}, indent=1, sort_keys=True).encode()
    folder, name = os.path.split(os.path.abspath(path))
    try:
        write_files_atomically(folder, {name: data})
    except (OSError, ValueError) as exc:
        if path not in _warned:
            _warned.add(path)
            warnings.warn(f"fastlora: could not write the strategy cache {path!r} ({exc})", stacklevel=3)


def forget_measurements() -> None:
    """Clear the in-process measurements and report (the cache file stays; the
    next choice per key reads it again)."""
    with _lock:
        _times.clear()
        _loaded.clear()
        _report.clear()
        _decided.clear()
        _device_ids.clear()


# ----------------------------------------------------------------------------
# choosing
# ----------------------------------------------------------------------------


def choose(
    op: str, key: str, device: torch.device, candidates: list[str], run_for: Callable[[str], Callable[[], object]] | None
) -> str:
    """The candidate to run for ``key``: the fastest measured one. Candidates
    not measured yet are timed now when ``run_for`` is given (the forward of a
    call) and measuring is possible; with nothing measured, the first (the
    default). Every decision is recorded for :func:`strategy_report`."""
    memo = (device.type, device.index, key, tuple(candidates))
    chosen = _decided.get(memo)
    if chosen is not None:  # every call of a layer asks: answered without the lock
        return chosen
    if len(candidates) == 1:
        with _lock:
            _record(op, device_id(device), key, candidates, {}, candidates[0], "forced")
            _decided[memo] = candidates[0]
        return candidates[0]
    with _lock:
        dev = device_id(device)
        known = _known(dev)
        times = known.setdefault(key, {})
        missing = [c for c in candidates if c not in times]
        source = "cache"
        if missing and run_for is not None and _may_measure(device) and not _capturing(device):
            timer = _timer()
            measured = {}
            for name in missing:
                try:
                    t = timer(name, run_for(name), device)
                except Exception as exc:  # noqa: BLE001 - a failing candidate must not fail the call
                    warnings.warn(f"fastlora: strategy {name!r} failed while being timed for {key}: {exc!r}", stacklevel=4)
                    t = math.inf
                if t is not None:
                    measured[name] = float(t)
            if measured:
                times.update(measured)
                source = "measured"
                _save(dev)
        timed = [c for c in candidates if c in times and not math.isinf(times[c])]
        if timed:
            chosen = min(timed, key=lambda c: times[c])
        else:
            chosen, source = candidates[0], "default"
        _record(op, dev, key, candidates, {c: times[c] for c in candidates if c in times}, chosen, source)
        if source != "default":
            # NOTE: a default (nothing measurable now: a CUDA graph being captured,
            # a backward before any forward) is decided again on the next call.
            _decided[memo] = chosen
        return chosen


def _record(op: str, dev: str, key: str, candidates: list[str], times: dict[str, float], chosen: str, source: str) -> None:
    slot = (dev, key, tuple(candidates))
    old = _report.get(slot)
    if old is not None and old["chosen"] == chosen and old["times_ms"].keys() == times.keys():
        return  # the same decision again (every call of a layer asks)
    if old is not None and old["source"] == "measured" and source == "cache":
        source = "measured"
    _report[slot] = {
        "op": op,
        "device": dev,
        "key": key,
        "chosen": chosen,
        "source": source,
        "times_ms": {c: (math.inf if math.isinf(t) else t * 1e3) for c, t in times.items()},
    }


class StrategyReport(list):
    """A list of decisions (dicts: op, device, key, chosen, source, times_ms);
    ``str()`` is a table. ``source``: "measured" (timed in this process),
    "cache" (times from the cache file or an earlier call), "forced" (one
    candidate left by set_strategy / FASTLORA_STRATEGY), "default" (no
    measurement possible: the first candidate)."""

    def __str__(self) -> str:
        if not self:
            forced = forced_strategies()
            return (
                "fastlora strategies: no choice made yet; defaults "
                + ", ".join(f"{op}={forced.get(op, name)}" for op, name in DEFAULTS.items())
            )
        lines = ["| op | key | chosen | source | times (ms) |", "|---|---|---|---|---|"]
        for rec in self:
            times = ", ".join(f"{c}: {t:.4g}" for c, t in sorted(rec["times_ms"].items(), key=lambda kv: kv[1]))
            lines.append(f"| {rec['op']} | {rec['key']} | {rec['chosen']} | {rec['source']} | {times or '-'} |")
        devices = sorted({rec["device"] for rec in self})
        return "\n".join(["devices: " + "; ".join(devices), *lines])


def strategy_report() -> StrategyReport:
    """What each (device, op, shape key) chose so far in this process, why, and
    the measured times per candidate (ms)."""
    with _lock:
        return StrategyReport(dict(rec, times_ms=dict(rec["times_ms"])) for rec in _report.values())


# ----------------------------------------------------------------------------
# the measured choice, inside the op
# ----------------------------------------------------------------------------


_NEEDS = (True, False, True, True, False)  # the reference's default: dx, dA, dB


class _AutoOps:
    """The backend-module interface for a spec with ``auto``: each call picks its
    combination with :func:`choose` (timing the candidates on the forward of the
    first call for a key), then runs that combination's function. Backward looks
    up the same key (it never times); every combination accepts every other's
    saved tensors, so even a different pick would be correct."""

    def __init__(self, base: str, forced: dict[str, str], train: bool) -> None:
        self.base, self.forced, self.train = base, dict(forced), train

    def _ops(self, candidate: str):
        return concrete_ops(self.base, names_of(candidate))

    def _pick(self, op, key, device, m, dropout_p, run_for=None) -> str:
        cands = candidate_names(op, self.forced, dropout_p, self.train, m)
        if m == 0:
            return cands[0]  # nothing to compute: nothing to time
        return choose(op, key, device, cands, run_for)

    def lora_forward(self, x, weight, lora_A, lora_B, scaling, bias=None, dropout_p=0.0, seed=0):
        key = shape_key("lora", x, weight.shape[0], lora_A.shape[0], dropout_p, self.train)

        def run_for(candidate):
            ops = self._ops(candidate)

            def run():
                y, s = ops.lora_forward(x, weight, lora_A, lora_B, scaling, bias, dropout_p, seed)
                if self.train:  # dY = y: a real-valued upstream gradient without touching any RNG
                    needs = (True, False, True, True, bias is not None)
                    ops.lora_backward(y, x, weight, lora_A, lora_B, s, scaling, dropout_p, seed, needs)

            return run

        name = self._pick("lora", key, x.device, x.shape[0], dropout_p, run_for)
        return self._ops(name).lora_forward(x, weight, lora_A, lora_B, scaling, bias, dropout_p, seed)

    def lora_backward(self, dy, x, weight, lora_A, lora_B, s, scaling, dropout_p=0.0, seed=0, needs=_NEEDS):
        key = shape_key("lora", x, weight.shape[0], lora_A.shape[0], dropout_p, self.train)
        name = self._pick("lora", key, x.device, x.shape[0], dropout_p)
        return self._ops(name).lora_backward(dy, x, weight, lora_A, lora_B, s, scaling, dropout_p, seed, needs)

    def dora_forward(self, x, weight, lora_A, lora_B, scaling, col_scale, bias=None, dropout_p=0.0, seed=0):
        return concrete_ops(self.base, {}).dora_forward(x, weight, lora_A, lora_B, scaling, col_scale, bias, dropout_p, seed)

    def qlora_forward(self, x, qweight, lora_A, lora_B, scaling, bias=None, dropout_p=0.0, seed=0):
        key = shape_key("qlora", x, qweight.shape[0], lora_A.shape[0], dropout_p, self.train, _quant_flags(qweight))

        def run_for(candidate):
            ops = self._ops(candidate)

            def run():
                y, s = ops.qlora_forward(x, qweight, lora_A, lora_B, scaling, bias, dropout_p, seed)
                if self.train:
                    needs = (True, False, True, True, bias is not None)
                    ops.qlora_backward(y, x, qweight, lora_A, lora_B, s, scaling, dropout_p, seed, needs)

            return run

        name = self._pick("qlora", key, x.device, x.shape[0], dropout_p, run_for)
        return self._ops(name).qlora_forward(x, qweight, lora_A, lora_B, scaling, bias, dropout_p, seed)

    def qlora_backward(self, dy, x, qweight, lora_A, lora_B, s, scaling, dropout_p=0.0, seed=0, needs=_NEEDS):
        key = shape_key("qlora", x, qweight.shape[0], lora_A.shape[0], dropout_p, self.train, _quant_flags(qweight))
        name = self._pick("qlora", key, x.device, x.shape[0], dropout_p)
        return self._ops(name).qlora_backward(dy, x, qweight, lora_A, lora_B, s, scaling, dropout_p, seed, needs)


__all__ = [
    "DEFAULTS", "OPS", "StrategyReport", "cache_path", "candidate_names", "choose", "concrete_ops",
    "cuda_event_timer", "device_id", "forced_strategies", "forget_measurements", "ops_for", "parse_spec",
    "parse_strategy_env", "set_strategy", "shape_key", "strategies", "strategy_backend", "strategy_report",
    "use_timer",
]  # fmt: skip
