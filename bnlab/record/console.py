"""The rich console that bnlab prints its progress and tables on, and paths as a shell takes them."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from rich.console import Console


def make_console() -> Console:
    """The terminal's width, or 160 columns where output goes to a file or a CI log (rich would use 80)."""
    return Console() if sys.stdout.isatty() else Console(width=160)


def shell_path(path: str | Path) -> str:
    """A path as a command line takes it (quoted where the shell needs it), relative to the working
    directory where it lies below it: run folders hold '=', ',' and brackets."""
    relative = os.path.relpath(path)
    return shlex.quote(relative if not relative.startswith("..") else str(path))
