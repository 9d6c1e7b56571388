"""`bnlab` and `python -m bnlab`: the command of bnlab/face/cli.py, with Ctrl-C and SIGTERM answered by one line
and exit code 130 at any moment, the start-up's imports included."""

from __future__ import annotations

import sys

from bnlab.face.interrupts import after_imports, stop_on_signals


def main() -> None:
    stop_on_signals()
    try:
        with after_imports():
            from bnlab.face.cli import main as run
        run()
    except KeyboardInterrupt:
        print("bnlab: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
