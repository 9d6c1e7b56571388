"""Result files written atomically: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def write_text(path: Path, text: str) -> None:
    _tmp(path).write_text(text)
    os.replace(_tmp(path), path)


def write_torch(path: Path, obj: Any) -> None:
    """torch.save, atomically (checkpoints)."""
    torch.save(obj, _tmp(path))
    os.replace(_tmp(path), path)


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())
