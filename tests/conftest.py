"""Shared fixtures (the helpers themselves live in tests/helpers.py)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import EXAMPLE, LONG, TINY, TRAIN, compose_config

from bnlab.schema.config import TrainConfig

torch.set_num_threads(1)
sys.path.insert(0, str(EXAMPLE))  # the example norm, importable as my_norm (README "Your own norm")


@pytest.fixture
def tiny_config() -> Callable[..., TrainConfig]:
    """tiny_config('norm=layer', ...) -> the TrainConfig of the tiny synthetic task with those overrides."""
    return lambda *overrides: compose_config([*TINY, *overrides])


@pytest.fixture(scope="session")
def unbroken(tmp_path_factory) -> Path:
    """The LONG run trained start to end without a break, to compare interrupted and resumed runs with."""
    cwd = tmp_path_factory.mktemp("unbroken")
    assert subprocess.run([*TRAIN, *LONG, "hydra.run.dir=run"], cwd=cwd, capture_output=True).returncode == 0
    return cwd / "run"
