"""Shared fixtures: configs composed from conf/ exactly as `bnlab train` composes them."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from bnlab.config import TrainConfig

torch.set_num_threads(1)

# A tiny synthetic task: enough for every model to take a few steps in well under a second.
TINY = [
    "data=synthetic",
    "data.num_train=64",
    "data.num_test=32",
    "data.image_size=8",
    "data.batch_size=16",
    "trainer.device=cpu",
    "trainer.threads=1",  # tests run beside other work: one thread cannot be starved by a busy second core
    "trainer.max_steps=3",
    "trainer.eval_every=2",
]


def compose_config(overrides: list[str]) -> TrainConfig:
    with initialize_config_module("bnlab.conf", version_base="1.3"):
        return OmegaConf.to_object(compose("train", overrides=overrides))


@pytest.fixture
def tiny_config() -> Callable[..., TrainConfig]:
    """tiny_config('norm=layer', ...) -> the TrainConfig of the tiny synthetic task with those overrides."""
    return lambda *overrides: compose_config([*TINY, *overrides])
