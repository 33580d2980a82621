"""What the walkthrough prints: sections, tables, a progress bar, loss curves."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

from torch import nn

RULE = "=" * 72


class Printer:
    """Prints the walkthrough, or nothing (``--json``)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def __call__(self, text: str = "") -> None:
        if not self.quiet:
            print(text)

    def section(self, number: int, title: str) -> None:
        self()
        self(RULE)
        self(f"{number}. {title}")
        self(RULE)

    def table(self, headers: list[str], rows: list[list[str]], align: str, indent: str = "  ") -> None:
        for line in format_table(headers, rows, align):
            self(indent + line)

    def fields(self, rows: Sequence[tuple[str, str]], width: int, indent: str = "  ") -> None:
        """``name  value`` lines, the names padded to ``width``."""
        for name, value in rows:
            self(f"{indent}{name:<{width}} {value}")


def format_table(headers: list[str], rows: list[list[str]], align: str) -> list[str]:
    """Lines of an aligned table; ``align`` has one ``l`` or ``r`` per column."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]

    def line(cells) -> str:
        return " | ".join(
            str(c).ljust(w) if a == "l" else str(c).rjust(w) for c, w, a in zip(cells, widths, align)
        ).rstrip()

    return [line(headers), "-+-".join("-" * w for w in widths)] + [line(r) for r in rows]


class Progress:
    """An epoch progress bar: tqdm when installed, else a plain one; only when
    stdout is a terminal (and not at all when disabled). A context manager: the
    bar is cleared on leaving the ``with`` block."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self.total, self.desc, self.count = total, desc, 0
        self.bar = None
        self.plain = False
        if not enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            self.plain = True
            self._draw()
            return
        self.bar = tqdm(total=total, desc=desc, unit="epoch", leave=False, file=sys.stdout, dynamic_ncols=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _draw(self) -> None:
        width = 30
        done = width * self.count // max(self.total, 1)
        sys.stdout.write(f"\r{self.desc} [{'#' * done}{'.' * (width - done)}] {self.count}/{self.total}")
        sys.stdout.flush()

    def _clear(self) -> None:
        sys.stdout.write("\r" + " " * (len(self.desc) + 50) + "\r")

    def update(self, postfix: str = "") -> None:
        self.count += 1
        if self.bar is not None:
            self.bar.set_postfix_str(postfix, refresh=False)
            self.bar.update(1)
        elif self.plain:
            self._draw()

    def write(self, line: str) -> None:
        """Print ``line`` above the bar."""
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        elif self.plain:
            self._clear()
            print(line)
            self._draw()
        else:
            print(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.plain:
            self._clear()
            sys.stdout.flush()


def ascii_curve(
    curves: dict[str, tuple[str, list[float]]], width: int = 60, height: int = 12, log: bool = True
) -> list[str]:
    """Lines of a terminal plot of one or more curves over epochs 0..N.

    ``curves`` maps a legend name to (marker, values); values[i] is epoch i.
    Columns sample the epochs evenly; a cell hit by two curves shows ``#``.
    ``log``: a logarithmic y axis (losses span orders of magnitude); values
    must then be positive."""
    scale = (lambda v: math.log10(max(v, 1e-12))) if log else (lambda v: v)
    n = max(len(values) for _, values in curves.values())
    width = max(2, min(width, n))
    lo = min(min(v) for _, v in curves.values())
    hi = max(max(v) for _, v in curves.values())
    top, bottom = scale(hi), scale(lo)
    span = (top - bottom) or 1.0
    grid = [[" "] * width for _ in range(height)]
    for marker, values in curves.values():
        for col in range(width):
            value = values[round(col * (len(values) - 1) / (width - 1))]
            row = round((top - scale(value)) / span * (height - 1))
            grid[row][col] = marker if grid[row][col] in (" ", marker) else "#"
    middle = (height - 1) // 2
    mid_value = top - span * middle / (height - 1)
    labels = {0: hi, middle: 10**mid_value if log else mid_value, height - 1: lo}
    texts = {i: f"{v:.4g}" for i, v in labels.items()}
    label_w = max(len(t) for t in texts.values())
    lines = [f"{texts.get(i, '').rjust(label_w)} |{''.join(row)}".rstrip() for i, row in enumerate(grid)]
    lines.append(" " * label_w + " +" + "-" * width)
    last = str(n - 1)
    lines.append(" " * (label_w + 2) + "0" + "epoch".center(width - 1 - len(last)) + last)
    legend = "   ".join(f"{m} {name}" for name, (m, _) in curves.items())
    lines.append(" " * (label_w + 2) + legend + "   # both" + ("   (log scale)" if log else ""))
    return lines


def write_plot(path: str, epochs: list[int], train: list[float], val: list[float], title: str) -> str | None:
    """Save train / validation loss curves to ``path`` with matplotlib; returns an
    error message instead when matplotlib is missing or saving fails."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return (
            f"--plot {path}: matplotlib is not installed, so no plot was written "
            "(install it with `pip install matplotlib`, or `pip install '.[demo]'` in a fastlora checkout)"
        )
    fig = Figure(figsize=(7, 4.2), layout="tight")
    ax = fig.add_subplot()
    ax.plot(epochs, train, label="train loss")
    ax.plot(epochs, val, label="validation loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("cross-entropy (log scale)")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    try:
        fig.savefig(path, dpi=120)
    except (OSError, ValueError) as exc:
        return f"--plot {path}: could not write the plot: {exc}"
    return None


def epochs_text(n: int) -> str:
    """``"1 epoch"``, ``"3 epochs"``."""
    return f"{n} epoch{'' if n == 1 else 's'}"


def pct(x: float) -> str:
    """A fraction as a percentage with one decimal: ``"90.8 %"``."""
    return f"{100 * x:.1f} %"


def shape(layer: nn.Module) -> str:
    """A linear layer's ``"in -> out"``."""
    return f"{layer.in_features} -> {layer.out_features}"
