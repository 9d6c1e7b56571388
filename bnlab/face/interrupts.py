"""Ctrl-C (or SIGTERM) while bnlab imports the libraries that take seconds (torch, Hydra): noted, and raised
as KeyboardInterrupt once the imports are done. A KeyboardInterrupt raised inside a library's import can be
swallowed by that library's own `except`, and the run then went on training. `stop_on_signals` makes SIGTERM
a Ctrl-C for the whole command (the training loop handles both its own way while it runs)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

STOPPING = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def after_imports() -> Iterator[None]:
    """The block runs with Ctrl-C only noted; a Ctrl-C pressed meanwhile is raised when it ends."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread handles signals
        yield
        return
    pressed: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: pressed.append(signum)) for sig in STOPPING}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if pressed:
        raise KeyboardInterrupt


def stop_on_signals() -> None:
    """SIGTERM raises KeyboardInterrupt, as Ctrl-C does: a command stopped at any moment exits 130 with one line
    (the default, death by the signal, gave exit 143 and no word). Ctrl-C too where the parent ignored it (a
    script's background job inherits SIGINT ignored): the training loop takes both signals whatever came before,
    so every phase of a sweep, between its runs as well, answers alike."""
    for sig in STOPPING:
        signal.signal(sig, signal.default_int_handler)
