"""Ctrl-C while bnlab imports the libraries that take seconds (torch, Hydra): noted, and raised as
KeyboardInterrupt once the imports are done. A KeyboardInterrupt raised inside a library's import can be
swallowed by that library's own `except`, and the run then went on training."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def after_imports() -> Iterator[None]:
    """The block runs with Ctrl-C only noted; a Ctrl-C pressed meanwhile is raised when it ends."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread handles signals
        yield
        return
    pressed: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pressed:
        raise KeyboardInterrupt
