"""`bnlab` and `python -m bnlab`: the command of bnlab/cli.py, with Ctrl-C answered by one line and exit
code 130 at any moment, the start-up's imports included."""

from __future__ import annotations

import signal
import sys


def main() -> None:
    # The imports take seconds and Ctrl-C may come during them. A KeyboardInterrupt raised inside a library's
    # import can be swallowed by its own `except` (the run then went on training), so during the imports
    # Ctrl-C is only noted, and acted on once they are done.
    pressed: list[int] = []
    default = signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
    try:
        from bnlab.cli import main as run
    finally:
        signal.signal(signal.SIGINT, default)
    try:
        if pressed:
            raise KeyboardInterrupt
        run()
    except KeyboardInterrupt:
        print("bnlab: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
