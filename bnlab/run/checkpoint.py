"""A run's checkpoint: plain data and tensors only, loaded with torch.load(weights_only=True) (a folder someone
else made cannot run code through a pickle), with a checksum of everything in it (a corrupt file is refused
by name, not trained on), and the checkpoint before it kept beside it to fall back to."""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
from pathlib import Path
from typing import Any

import torch

from bnlab.record.files import OutputError, write_bytes
from bnlab.schema.config import ConfigError

CHECKPOINT = "checkpoint.pt"  # in the run directory: model, optimizer, RNG and the run's record so far
PREVIOUS = "checkpoint.previous.pt"  # the one before it
CHECKSUM = "sha256"  # the key of the checksum in the file

log = logging.getLogger(__name__)


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used (truncated, corrupt, not bnlab's) and no earlier one that can: refused
    like bad input, by name."""


def checksum(state: Any) -> str:
    """sha256 over every value in `state` (nested dicts, lists and tuples in their order; a tensor by its
    dtype, shape and bytes)."""
    digest = hashlib.sha256()

    def add(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            for k, v in x.items():
                digest.update(repr(k).encode())
                add(v)
        elif isinstance(x, (list, tuple)):
            digest.update(f"{type(x).__name__}{len(x)}".encode())
            for v in x:
                add(v)
        else:
            digest.update(repr(x).encode())

    add(state)
    return digest.hexdigest()


def save(run_dir: Path, state: dict[str, Any]) -> None:
    """Write the checkpoint (serialised in memory first: a failing disk shows as an OutputError, not torch's
    own), the current one kept as the previous."""
    buffer = io.BytesIO()
    torch.save({**state, CHECKSUM: checksum(state)}, buffer)
    path, previous = run_dir / CHECKPOINT, run_dir / PREVIOUS
    if path.exists():  # kept under the other name as it is (a second link, no copy); a failed write leaves both
        try:
            previous.unlink(missing_ok=True)
            os.link(path, previous)
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise OutputError(e.errno, f"cannot keep {path} as {previous}: {e.strerror or e}") from e
            write_bytes(previous, path.read_bytes())  # a file system without hard links: a copy
    write_bytes(path, buffer.getvalue())


def _read(path: Path) -> dict[str, Any]:
    state = torch.load(path, weights_only=True)
    if not isinstance(state, dict) or CHECKSUM not in state:
        raise ValueError("it holds no checksum: not a checkpoint of this bnlab")
    stored = state.pop(CHECKSUM)
    if checksum(state) != stored:
        raise ValueError("its checksum does not match its contents: it is corrupt")
    return state


def exists(run_dir: Path) -> bool:
    return (run_dir / CHECKPOINT).exists() or (run_dir / PREVIOUS).exists()


def load(run_dir: Path) -> dict[str, Any] | None:
    """The run's newest checkpoint that is whole, or None where it has none; a corrupt one is skipped with a
    warning for the one before it, and where none can be used, CheckpointError names them."""
    tried = []
    for path in (run_dir / CHECKPOINT, run_dir / PREVIOUS):
        if not path.exists():
            continue
        try:
            state = _read(path)
        except Exception as e:
            tried.append(f"{path}: {type(e).__name__}: {e}")
            log.warning("%s cannot be used (%s: %s)", path, type(e).__name__, e)
            continue
        if tried:
            log.warning("%s: resuming from the checkpoint before it, at step %d", run_dir, state["step"])
        return state
    if tried:
        raise CheckpointError(
            f"no checkpoint of {run_dir} can be used: {'; '.join(tried)}. Start the run over with "
            "trainer.resume=false (or delete the checkpoint files)."
        )
    return None
