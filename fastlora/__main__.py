"""The ``fastlora`` command (also ``python -m fastlora``): ``fastlora <command> [options]``.

Each command is one entry of :data:`COMMANDS`: its one-line summary for
``--help`` and the ``module:function`` that runs it. The function is imported
only when its command runs; it takes the command's arguments and ``prog`` (the
name its usage lines show) and returns the exit status.
"""

from __future__ import annotations

import importlib
import sys

from . import __version__

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": (
        "LoRA fine-tuning walkthrough on a small MLP: adapters, training, merge, rank comparison",
        "fastlora.demo:main",
    ),
}

DESCRIPTION = "Fused Triton kernels for LoRA and QLoRA fine-tuning, with a pure PyTorch reference path."


def usage(prog: str) -> str:
    return f"usage: {prog} <command> [options]\n       {prog} --help | --version\n"


def help_text(prog: str) -> str:
    """``--help``: usage, the commands with one line each, the options."""
    width = max(len(name) for name in COMMANDS) + 2
    commands = "".join(f"  {name:<{width}}{summary}\n" for name, (summary, _) in COMMANDS.items())
    return (
        f"{usage(prog)}\n{DESCRIPTION}\n\n"
        f"commands:\n{commands}\n"
        "options:\n"
        "  -h, --help     show this message and exit\n"
        "  -V, --version  print fastlora's version and exit\n\n"
        f"'{prog} <command> --help' lists a command's options.\n"
    )


def _error(prog: str, message: str) -> int:
    sys.stderr.write(f"{usage(prog)}{prog}: error: {message}\n")
    return 2


def main(argv: list[str] | None = None, *, prog: str = "fastlora") -> int:
    """Dispatch ``argv`` (default ``sys.argv[1:]``) to a command; returns the exit
    status: 0 for ``--help`` / ``--version``, 2 for a missing or unknown command or
    option, else the command's own."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        return _error(prog, f"a command is required ({', '.join(COMMANDS)}); see '{prog} --help'")
    first, rest = argv[0], argv[1:]
    if first in ("-h", "--help"):
        sys.stdout.write(help_text(prog))
        return 0
    if first in ("-V", "--version"):
        print(f"fastlora {__version__}")
        return 0
    if first.startswith("-"):
        return _error(prog, f"unknown option {first!r}; see '{prog} --help'")
    if first not in COMMANDS:
        return _error(prog, f"unknown command {first!r} (commands: {', '.join(COMMANDS)}); see '{prog} --help'")
    module, function = COMMANDS[first][1].split(":")
    command = getattr(importlib.import_module(module), function)
    return command(rest, prog=f"{prog} {first}")


if __name__ == "__main__":
    sys.exit(main(prog="python -m fastlora"))
