"""Counts of the bad-input probe (tests/_bad_inputs.py), by verdict:
tried / clear / correct / silent / crash / hang / lost.

    python bench/bad_inputs.py
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from _bad_inputs import run_probe  # noqa: E402


def main() -> None:
    verdicts = run_probe()
    order = ("clear", "correct", "silent", "crash", "hang", "lost")
    counts = {k: len(verdicts.get(k, [])) for k in order}
    print("| tried | " + " | ".join(order) + " |")
    print("|---" * (len(order) + 1) + "|")
    print(f"| {sum(counts.values())} | " + " | ".join(str(counts[k]) for k in order) + " |")
    for k in order[2:]:
        for name, detail in verdicts.get(k, []):
            print(f"{k}: {name}: {detail}")


if __name__ == "__main__":
    main()
