"""Result files: written atomically (a reader sees the old file or the new one, never half of one), and
JSON as the standard has it (a non-finite number is written as null)."""

from __future__ import annotations

import json
import math
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
