"""The rich console that bnlab prints its progress and tables on."""

from __future__ import annotations

import sys

from rich.console import Console


def make_console() -> Console:
    """The terminal's width, or 160 columns where output goes to a file or a CI log (rich would use 80)."""
    return Console() if sys.stdout.isatty() else Console(width=160)
