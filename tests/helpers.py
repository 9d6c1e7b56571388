"""What the tests share: the tiny task, configs composed as `bnlab train` composes them, the `bnlab`
command run as a user runs it, a run's TensorBoard scalars, and the comparison of a resumed run with
an unbroken one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bnlab.config import TrainConfig

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


def comparable(summary: dict) -> dict:
    """A summary without what differs between a resumed and an unbroken run: timings, memory, the resume switch."""
    s = {k: v for k, v in summary.items() if k not in ("wall_time_s", "steps_per_s", "peak_memory_mb")}
    s["config"] = {**s["config"], "trainer": {k: v for k, v in s["config"]["trainer"].items() if k != "resume"}}
    return s


def assert_equal_runs(resumed: Path, unbroken: Path) -> None:
    """A run resumed from its checkpoint logged and summarized exactly what the unbroken run did."""
    a, b = scalars(resumed), scalars(unbroken)
    assert a.keys() == b.keys()
    for tag in b:
        steps = [step for step, _ in a[tag]]
        assert len(steps) == len(set(steps)), f"{tag}: duplicated steps"
        assert a[tag] == b[tag], tag
    assert comparable(json.loads((resumed / "summary.json").read_text())) == comparable(
        json.loads((unbroken / "summary.json").read_text())
    )
