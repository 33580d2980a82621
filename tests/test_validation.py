"""fastlora.validation: the cheap pre-check of the LoRA op's operands agrees with the full check.

``dense_operands_ok`` lets the fused op skip ``check_dense_operands`` on every
call (host time, bench/host_overhead.py); it must never accept what the full
check refuses. Each case below changes one operand of a valid call.
"""

from __future__ import annotations

import math

import pytest
import torch

from fastlora.validation import check_dense_operands, dense_operands_ok


class _Subclass(torch.Tensor):
    """A tensor subclass: valid operands, read by the full check only (the pre-check takes
    plain tensors and parameters)."""


def _valid():
    return dict(
        x=torch.randn(2, 3, 8), weight=torch.randn(6, 8), lora_A=torch.randn(4, 8), lora_B=torch.randn(6, 4),
        bias=torch.randn(6), scaling=0.5, dropout=0.1,
    )  # fmt: skip


def _args(ops):
    return ops["x"], ops["weight"], ops["lora_A"], ops["lora_B"], ops["bias"], ops["scaling"], ops["dropout"]


META = torch.device("meta")
BAD = {
    "x int": dict(x=torch.ones(2, 8, dtype=torch.int64)),
    "x 0-d": dict(x=torch.tensor(1.0)),
    "x not a tensor": dict(x=[[1.0] * 8]),
    "x wrong K": dict(x=torch.randn(2, 7)),
    "x float64": dict(x=torch.randn(2, 8, dtype=torch.float64)),
    "x on meta": dict(x=torch.randn(2, 8, device=META)),
    "weight 1-D": dict(weight=torch.randn(8)),
    "weight not a tensor": dict(weight=None),
    "weight float16": dict(weight=torch.randn(6, 8, dtype=torch.float16)),
    "weight on meta": dict(weight=torch.randn(6, 8, device=META)),
    "lora_A wrong K": dict(lora_A=torch.randn(4, 7)),
    "lora_A rank 0": dict(lora_A=torch.randn(0, 8), lora_B=torch.randn(6, 0)),
    "lora_A 3-D": dict(lora_A=torch.randn(1, 4, 8)),
    "lora_A float64": dict(lora_A=torch.randn(4, 8, dtype=torch.float64), lora_B=torch.randn(6, 4, dtype=torch.float64)),
    "lora_A not a tensor": dict(lora_A=1.0),
    "lora_B wrong r": dict(lora_B=torch.randn(6, 3)),
    "lora_B wrong N": dict(lora_B=torch.randn(5, 4)),
    "lora_B float16": dict(lora_B=torch.randn(6, 4, dtype=torch.float16)),
    "lora_B on meta": dict(lora_B=torch.randn(6, 4, device=META)),
    "bias wrong N": dict(bias=torch.randn(5)),
    "bias 2-D": dict(bias=torch.randn(1, 6)),
    "bias float16": dict(bias=torch.randn(6, dtype=torch.float16)),
    "bias on meta": dict(bias=torch.randn(6, device=META)),
    "bias not a tensor": dict(bias=[0.0] * 6),
    "bias on CPU, the rest on meta": dict(  # the pre-check's non-CPU device branch
        x=torch.randn(2, 8, device=META), weight=torch.randn(6, 8, device=META), lora_A=torch.randn(4, 8, device=META),
        lora_B=torch.randn(6, 4, device=META),
    ),  # fmt: skip
    "scaling nan": dict(scaling=math.nan),
    "scaling inf": dict(scaling=-math.inf),
    "scaling bool": dict(scaling=True),
    "scaling str": dict(scaling="0.5"),
    "dropout 1": dict(dropout=1.0),
    "dropout negative": dict(dropout=-0.1),
    "dropout nan": dict(dropout=math.nan),
    "dropout bool": dict(dropout=False),
}


@pytest.mark.parametrize("name", list(BAD))
def test_what_the_full_check_refuses_the_pre_check_never_accepts(name):
    ops = {**_valid(), **BAD[name]}
    assert not dense_operands_ok(*_args(ops))
    with pytest.raises((TypeError, ValueError)):
        check_dense_operands(*_args(ops))


def test_the_common_case_passes_both_and_the_uncommon_valid_ones_defer_to_the_full_check():
    ops = _valid()
    assert dense_operands_ok(*_args(ops))
    check_dense_operands(*_args(ops))
    assert dense_operands_ok(*_args({**ops, "bias": None}))
    params = {k: torch.nn.Parameter(ops[k]) for k in ("weight", "lora_A", "lora_B", "bias")}
    assert dense_operands_ok(*_args({**ops, **params}))  # a layer's parameters: the common case
    uncommon = {  # valid, but not the pre-check's common case: the full check decides
        "fp32 adapters on bf16": dict(
            x=torch.randn(2, 8, dtype=torch.bfloat16), weight=torch.randn(6, 8, dtype=torch.bfloat16),
            bias=torch.randn(6, dtype=torch.bfloat16),
        ),  # fmt: skip
        "int scaling": dict(scaling=2),
        "int dropout": dict(dropout=0),
        "a tensor subclass": dict(x=torch.randn(2, 8).as_subclass(_Subclass)),
    }
    for change in uncommon.values():
        variant = {**ops, **change}
        assert not dense_operands_ok(*_args(variant))
        check_dense_operands(*_args(variant))
