"""Every check of a hyperparameter or an operand, in one place.

Errors name the argument, what was received and what was expected. The layer
constructors, the configs, the adapter loader and the fused ops all call these
functions, so one value is judged the same way everywhere (a rank that a
config accepts is a rank the layer accepts, ...).
"""

from __future__ import annotations

import math
import re

import torch
from torch import Tensor

_INF = math.inf
# The tensor types dense_operands_ok reads without isinstance (a subclass goes to the full check).
_PLAIN = frozenset((Tensor, torch.nn.Parameter))
_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")
# "pissa", "pissa_niter_<N>" (any integer N >= 0) and "olora" initialise A and B
# from the base weight and replace it by the residual (see
# LoRALinear.reset_lora_parameters); "default" and "gaussian" start at B = 0.
INITS = ("default", "gaussian", "pissa", "pissa_niter_<N>", "olora")


def is_int(value) -> bool:
    """An int that is not a bool (``True`` is an int in Python, never a rank)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """An int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_rank(r, what: str = "r (the LoRA rank)") -> int:
    """``r`` if it is an integer >= 1, else a ValueError naming ``what``."""
    if not is_int(r) or r < 1:
        raise ValueError(f"{what} must be an integer >= 1, got {r!r}")
    return r


def check_finite(value, what: str) -> float:
    """``value`` as a float if it is a finite number (not a bool), else a ValueError."""
    if not is_number(value) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def check_dropout(p, what: str = "dropout") -> float:
    """``p`` as a float if it is a probability in [0, 1), else a ValueError."""
    if not is_number(p) or not 0.0 <= p < 1.0:
        raise ValueError(f"{what} must be a probability in [0, 1), got {p!r}")
    return float(p)


def check_bool(value, what: str) -> bool:
    """``value`` if it is exactly True or False (a string such as ``"false"`` is refused)."""
    if not isinstance(value, bool):
        raise TypeError(f"{what} must be True or False, got {value!r}")
    return value


def check_lora_hyperparameters(r, alpha, dropout, *, rank_name: str = "r (the LoRA rank)") -> None:
    """r an integer >= 1, alpha a finite number, dropout in [0, 1): else a ValueError naming it."""
    check_rank(r, rank_name)
    check_finite(alpha, "alpha")
    check_dropout(dropout)


def check_init(init, what: str = "init") -> str:
    """``init`` if it names one of :data:`INITS` (``pissa_niter_<N>`` for any N), else a ValueError."""
    if init in ("default", "gaussian", "pissa", "olora") or (isinstance(init, str) and _PISSA_NITER.fullmatch(init)):
        return init
    raise ValueError(f"{what} must be one of {INITS}, got {init!r}")


def pissa_niter(init: str) -> int | None:
    """N for ``init="pissa_niter_<N>"``, else None."""
    match = _PISSA_NITER.fullmatch(init)
    return int(match.group(1)) if match else None


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    """PEFT's scale: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


# -- operands of the fused ops -----------------------------------------------------


def check_same_device(x: Tensor, **tensors: Tensor | None) -> None:
    """Every named tensor on x's device."""
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; all tensors must share a device")


def check_base_dtype(x: Tensor, name: str, t: Tensor | None) -> None:
    """The base weight and bias share x's dtype (autocast is the way to mix them)."""
    if t is not None and t.dtype != x.dtype:
        raise TypeError(
            f"{name} has dtype {t.dtype} but x has dtype {x.dtype}; x, weight and bias must share a dtype "
            "(or run under torch.autocast, which casts them as nn.Linear does)"
        )


def check_dense_weight(x: Tensor, weight) -> tuple[int, int]:
    """A 2-D base weight [N, K] on x's device in x's dtype; returns its shape."""
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"weight must be a 2-D tensor [out_features, in_features], got {shape}")
    if isinstance(x, Tensor):
        check_same_device(x, weight=weight)
        check_base_dtype(x, "weight", weight)
    return tuple(weight.shape)


def check_lora_operands(
    x, base_name: str, base_shape: tuple[int, int], lora_A, lora_B, bias, scaling, dropout
) -> None:
    """Validate everything but the base weight itself (every fused op calls it):
    x floating with last dim K; lora_A [r, K] with r >= 1; lora_B [N, r]; bias
    [N]; one device; adapters in x's dtype or float32; bias in x's dtype;
    scaling a finite number; dropout in [0, 1)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype={x.dtype}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension [..., in_features], got a 0-d tensor")
    n, k = base_shape
    if x.shape[-1] != k:
        raise ValueError(
            f"x's last dimension must equal {base_name}'s in_features: x has shape {tuple(x.shape)}, "
            f"{base_name} has shape {tuple(base_shape)} (expected x of shape [..., {k}])"
        )
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if lora_A.dim() != 2 or lora_A.shape[1] != k:
        raise ValueError(f"lora_A must have shape [r, {k}] (r, in_features), got {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    if r < 1:
        raise ValueError(f"LoRA rank r must be >= 1, got lora_A of shape {tuple(lora_A.shape)}")
    if lora_B.dim() != 2 or tuple(lora_B.shape) != (n, r):
        raise ValueError(f"lora_B must have shape [{n}, {r}] (out_features, r), got {tuple(lora_B.shape)}")
    if bias is not None and (not isinstance(bias, Tensor) or bias.dim() != 1 or bias.shape[0] != n):
        got = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
        raise ValueError(f"bias must have shape [{n}] (out_features), got {got}")
    # NOTE: under torch.compile a layer recompiled for a second scaling receives it
    # as a symbolic float that math.isfinite cannot trace; eager calls check it.
    if not torch.compiler.is_compiling() and (not is_number(scaling) or not math.isfinite(scaling)):
        raise TypeError(f"scaling must be a finite Python number, got {scaling!r}")
    check_dropout(dropout)
    check_same_device(x, lora_A=lora_A, lora_B=lora_B, bias=bias)
    check_base_dtype(x, "bias", bias)
    if lora_B.dtype != lora_A.dtype or lora_A.dtype not in (x.dtype, torch.float32):
        raise TypeError(
            f"lora_A/lora_B have dtypes {lora_A.dtype}/{lora_B.dtype}; expected both {x.dtype} (x's dtype) "
            "or both torch.float32 (mixed precision: the LoRA branch in fp32)"
        )


def dense_operands_ok(x, weight, lora_A, lora_B, bias, scaling, dropout) -> bool:
    """True when :func:`check_dense_operands` would certainly accept these operands,
    in the common case only: plain tensors and parameters (no subclasses), one dtype
    for every tensor, ``scaling`` and ``dropout`` Python floats. False means "not
    shown valid here", never "invalid": the caller then runs
    :func:`check_dense_operands`, which raises with a clear message or accepts the
    less common valid cases (fp32 adapters on a bf16 base, an int scaling, a
    symbolic scaling under torch.compile, a tensor subclass).

    NOTE: the fused ops' per-call host time (``bench/host_overhead.py``): this is
    one function of attribute reads and comparisons, where the full check builds
    messages' ingredients and calls a helper per argument. Its cheap forms, in
    instructions per read (callgrind, M=16 K=N=64 fp32 CPU tensors):
    ``type(t) in _PLAIN`` ~150 where ``isinstance(param, Tensor)`` is ~770 (a
    subclass walks the MRO); ``t.dtype is dtype`` (dtypes are singletons);
    ``t.is_cpu`` ~460 where ``t.device == device`` builds a device object and
    compares, ~1,600. Every condition here implies the full check's
    (tests/test_validation.py checks that each operand the full check refuses is
    refused here too)."""
    if type(scaling) is not float or type(dropout) is not float or not (0.0 <= dropout < 1.0 and -_INF < scaling < _INF):
        return False
    plain = _PLAIN
    if type(x) not in plain or type(weight) not in plain or type(lora_A) not in plain or type(lora_B) not in plain:
        return False
    dtype = x.dtype
    if not (dtype.is_floating_point and weight.dtype is dtype and lora_A.dtype is dtype and lora_B.dtype is dtype):
        return False
    shape = weight.shape
    a_shape = lora_A.shape
    if len(shape) != 2 or x.dim() < 1 or len(a_shape) != 2 or a_shape[0] < 1:
        return False
    n, k = shape
    if x.shape[-1] != k or a_shape[1] != k or lora_B.shape != (n, a_shape[0]):
        return False
    if bias is not None and not (type(bias) in plain and bias.shape == (n,) and bias.dtype is dtype):
        return False
    if x.is_cpu:  # the common case on CPU: no device object built
        return weight.is_cpu and lora_A.is_cpu and lora_B.is_cpu and (bias is None or bias.is_cpu)
    device = x.device
    return (
        weight.device == device and lora_A.device == device and lora_B.device == device
        and (bias is None or bias.device == device)
    )  # fmt: skip


def check_dense_operands(x, weight, lora_A, lora_B, bias, scaling, dropout) -> None:
    """The operands of a LoRA op on a dense base weight [N, K] (see :func:`check_lora_operands`)."""
    shape = check_dense_weight(None, weight)
    check_lora_operands(x, "weight", shape, lora_A, lora_B, bias, scaling, dropout)
    check_dense_weight(x, weight)


def check_vector(t, n: int, name: str, what: str = "out_features") -> None:
    """A 1-D tensor of length n."""
    if not isinstance(t, Tensor) or t.dim() != 1 or t.shape[0] != n:
        got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name} must have shape [{n}] ({what}), got {got}")


__all__ = [
    "INITS",
    "check_base_dtype",
    "check_bool",
    "check_dense_operands",
    "check_dense_weight",
    "check_dropout",
    "check_finite",
    "check_init",
    "check_lora_hyperparameters",
    "check_lora_operands",
    "check_rank",
    "check_same_device",
    "check_vector",
    "dense_operands_ok",
    "is_int",
    "is_number",
    "lora_scaling",
    "pissa_niter",
]
