"""``python -m fastlora demo [options]`` runs the LoRA walkthrough."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m fastlora demo [--help | options]")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "demo":
        from .demo import main as demo_main

        return demo_main(rest)
    print(f"unknown command {command!r}; expected 'demo'", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
