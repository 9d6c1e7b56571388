"""Result files and run folders: files written atomically (a reader sees the old file or the new one,
never half of one), JSON as the standard has it (a non-finite number is written as null), a write
that fails (a full disk, a folder gone) raised as an `OutputError` that says what stays valid, and a
lock that makes one process at a time the owner of a run folder."""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

UMASK = os.umask(0o022)  # read once (setting it is the only way), restored at once
os.umask(UMASK)


class OutputError(OSError):
    """A result file that could not be written (no space left, a folder that went away or turned
    read-only); the message names the file and the reason."""


def write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file of its own beside `path` (two writers never share one), flush it to
    the disk, then rename it into place: the old file stays whole until the new one is."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~UMASK)  # mkstemp's 0600 would hide a result from the user's group
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            with contextlib.suppress(OSError):  # a read-only folder refuses this too: the first error is the one
                os.unlink(tmp)
        raise OutputError(e.errno, f"cannot write {path}: {e.strerror or e}") from e


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())


def finite(obj: Any) -> Any:
    """obj with every non-finite float (NaN, inf) replaced by None, in nested dicts, lists and tuples."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(finite(obj), indent=2, allow_nan=False) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


@contextlib.contextmanager
def owned(folder: Path) -> Iterator[bool]:
    """Try to own `folder` (made if missing) for the block: True if this process now holds its lock,
    False if another process does. The lock is the kernel's (flock on the folder itself), so a killed
    process leaves nothing stuck behind."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing the last descriptor releases the lock
