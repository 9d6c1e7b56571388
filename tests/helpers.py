"""What the tests share: the tiny task, configs composed as `bnlab train` composes them, the `bnlab`
command run as a user runs it, and a run's TensorBoard scalars."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bnlab.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "my_norm"  # the example package of README "Your own norm" (my_norm.py, conf/)
# PYTHONPATH for a `bnlab` subprocess that imports the example norm and tests/custom_targets.py
TARGETS_ENV = {"PYTHONPATH": f"{EXAMPLE}:{ROOT / 'tests'}"}

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
CLI = [sys.executable, "-c", "from bnlab.cli import main; main()"]  # the `bnlab` command of this interpreter


def compose_config(overrides: list[str]) -> TrainConfig:
    with initialize_config_module("bnlab.conf", version_base="1.3"):
        return OmegaConf.to_object(compose("train", overrides=overrides))


def bnlab(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`bnlab ARGS` in the folder `cwd`, as a subprocess; its output is captured."""
    env = {"COLUMNS": "200", "PATH": "", **(env or {})}
    return subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a run's TensorBoard events: tag -> [(step, value), ...]."""
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
