"""The bad-input probe (tests/_bad_inputs.py): every case is a clear error
naming what is wrong, or a correct result; nothing silent, no unhelpful crash,
no hang, nothing lost."""

from __future__ import annotations

from _bad_inputs import run_probe


def test_every_bad_input_is_a_clear_error_or_a_correct_result():
    verdicts = run_probe()
    bad = {k: v for k, v in verdicts.items() if k not in ("clear", "correct")}
    assert not bad, "\n".join(f"{k}: {name}: {detail}" for k, items in bad.items() for name, detail in items)
    assert sum(len(v) for v in verdicts.values()) >= 70
