"""Shared fixtures (the helpers themselves live in tests/helpers.py)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from helpers import TINY, compose_config

from bnlab.config import TrainConfig

torch.set_num_threads(1)


@pytest.fixture
def tiny_config() -> Callable[..., TrainConfig]:
    """tiny_config('norm=layer', ...) -> the TrainConfig of the tiny synthetic task with those overrides."""
    return lambda *overrides: compose_config([*TINY, *overrides])
