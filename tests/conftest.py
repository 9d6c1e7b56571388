"""Shared fixtures (the helpers themselves live in tests/helpers.py)."""

from __future__ import annotations

import sys
from collections.abc import Callable

import pytest
import torch
from helpers import EXAMPLE, TINY, compose_config

from bnlab.config import TrainConfig

torch.set_num_threads(1)
sys.path.insert(0, str(EXAMPLE))  # the example norm, importable as my_norm (README "Your own norm")


@pytest.fixture
def tiny_config() -> Callable[..., TrainConfig]:
    """tiny_config('norm=layer', ...) -> the TrainConfig of the tiny synthetic task with those overrides."""
    return lambda *overrides: compose_config([*TINY, *overrides])
