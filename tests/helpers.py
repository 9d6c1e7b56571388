"""What the tests share: the tiny task, configs composed as `bnlab train` composes them, the `bnlab`
command run as a user runs it, and a run's TensorBoard scalars."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import bnlab.face.hydra_setup  # noqa: F401  what conf/ needs to compose
from bnlab.schema.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "my_norm"  # the example package of README "Your own norm" (my_norm.py, conf/)
# PYTHONPATH for a `bnlab` subprocess that imports the example norm and tests/custom_targets.py
TARGETS_ENV = {"PYTHONPATH": f"{EXAMPLE}:{ROOT / 'tests'}"}

# A tiny synthetic task: enough for every model to take a few steps in well under a second.
DONE = ("completed", "stalled")  # ran to its last step: a few steps on noise end at chance (stalled)
TINY = [
    "data=synthetic",
    "data.num_train=64",
    "data.num_test=32",
    "data.image_size=8",
    "data.batch_size=16",
    "trainer.device=cpu",
    "trainer.threads=1",  # tests run beside other work: one thread cannot be starved by a busy second core
    "hydra.launcher.n_jobs=1",  # a sweep's groups in its own process: a worker each would import torch again
    "trainer.max_steps=3",
    "trainer.eval_every=2",
]
CLI = [sys.executable, "-m", "bnlab"]  # the `bnlab` command of this interpreter
TRAIN = [*CLI, "train"]
# What the tool prints, as the README quotes it (tests/test_flows.py asserts each one, test_readme finds it there).
MESSAGES = {
    "interrupt": "continue it with `bnlab resume",
    "changed": "a run resumes with the config it started with",
    "comma": "remove the space after the comma",
    "type": "is not accepted; accepted values: a number",
    "preset": "so it runs with -m: `bnlab train -m +experiment=init_lr_grid",
    "slurm": "which is not on this machine's PATH",
    "disk": "What it wrote before stays as it was",
    "nothing": "nothing to resume",
}
# A run long enough (about 1,000 steps of a 256-256 MLP) to be stopped halfway through.
LONG = [
    *TINY,
    "data.num_train=512",
    "data.image_size=28",
    "data.batch_size=64",
    "model.widths=[256,256]",
    "trainer.max_steps=1000",
    "trainer.eval_every=50",
    "trainer.checkpoint_every=50",
]


def script(name: str):
    """scripts/NAME.py imported as a module (the scripts are no package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compose_config(overrides: list[str]) -> TrainConfig:
    with initialize_config_module("bnlab.conf", version_base="1.3"):
        return OmegaConf.to_object(compose("train", overrides=overrides))


def bnlab(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`bnlab ARGS` in the folder `cwd`, as a subprocess; its output is captured."""
    env = {"COLUMNS": "200", "PATH": "", **(env or {})}
    return subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a run's TensorBoard events: tag -> [(step, value), ...], its event files read in the order
    they were written (by their names' time and counter, as numbers: a run resumed in the same process and
    second has a counter 10 that TensorBoard's name order puts before 9, and its points then come out of order)."""

    def written(f: Path) -> tuple[int, int]:
        parts = f.name.split(".")
        return int(parts[3]), int(parts[-1])

    out: dict[str, list[tuple[int, float]]] = {}
    for f in sorted(run_dir.glob("events.out.tfevents.*"), key=written):
        acc = EventAccumulator(str(f))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            new = [(e.step, e.value) for e in acc.Scalars(tag)]
            # a resumed run writes again from its checkpoint: as TensorBoard does, the older points from there go
            out[tag] = [p for p in out.get(tag, []) if p[0] < new[0][0]] + new
    return out


def start(*args: str, cwd: Path, output: bool = False) -> subprocess.Popen:
    """`bnlab train ARGS` started in the background; with `output`, its stdout and stderr are kept (text)."""
    pipe = subprocess.PIPE if output else subprocess.DEVNULL
    return subprocess.Popen([*TRAIN, *args], cwd=cwd, stdout=pipe, stderr=pipe, text=True)


def wait_for(path: Path, timeout: float = 120) -> None:
    """Wait until `path` exists (a first checkpoint, say), then a little longer."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.01)
    time.sleep(0.2)  # let the run go on past its first checkpoint


def comparable(summary: dict) -> dict:
    """A summary without what differs between a resumed and an unbroken run: timings, memory, the resume switch."""
    s = {k: v for k, v in summary.items() if k not in ("wall_time_s", "steps_per_s", "peak_memory_mb")}
    s["iterations_to_threshold"] = [{**r, "seconds": None} for r in s["iterations_to_threshold"]]
    s["config"] = {**s["config"], "trainer": {k: v for k, v in s["config"]["trainer"].items() if k != "resume"}}
    return s


def assert_equal_runs(resumed: Path, unbroken: Path) -> None:
    """Every TensorBoard scalar (each step once) and the summary of a resumed run equal the unbroken run's."""
    a, b = scalars(resumed), scalars(unbroken)
    assert a.keys() == b.keys()
    for tag in b:
        steps = [step for step, _ in a[tag]]
        assert len(steps) == len(set(steps)), f"{tag}: duplicated steps"
        assert a[tag] == b[tag], tag
    assert comparable(json.loads((resumed / "summary.json").read_text())) == comparable(
        json.loads((unbroken / "summary.json").read_text())
    )
