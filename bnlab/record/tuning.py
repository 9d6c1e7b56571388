"""tuning.json: the record of a tuning sweep (hydra/sweeper=tune, bnlab/face/tuning.py) at its root. Each arm's
trials (the setting searched, its objective at each rung, how it ended), the setting chosen and the seeds of the
search and of the final runs. The search's runs live below search/; the final runs (each arm's chosen setting on
fresh seeds) are the sweep's own runs, which its table, verdict and report read."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bnlab.record.files import read_json, write_json

FILE = "tuning.json"
SEARCH = "search"  # the folder below a tuning sweep's root with the search's runs
SCHEMA_VERSION = 1
COMPLETE, PRUNED, RUNNING, FAILED = "complete", "pruned", "running", "failed"  # a trial's state


@dataclass
class Trial:
    arm: str  # the arm's label, e.g. norm=batch
    number: int  # within its arm, from 0
    params: dict[str, float | int]  # the searched keys' values
    state: str  # COMPLETE, PRUNED, RUNNING or FAILED
    value: float | None  # the objective (bnlab.results.tuning.objective): at the last step trained
    rungs: dict[int, float] = field(default_factory=dict)  # step -> the objective there (the pruner's view)
    runs: list[str] = field(default_factory=list)  # its runs (one per search seed), relative to the sweep's root


@dataclass
class Arm:
    label: str
    overrides: list[str]  # what sets the arm, e.g. ["norm=batch"]
    keys: list[str]  # the searched keys that apply to it
    chosen: int | None = None  # the trial whose setting the final runs use
    final_runs: list[str] = field(default_factory=list)


@dataclass
class Tuning:
    metric: str  # the objective: median steps to `threshold` of `metric`, censored; final test accuracy breaks ties
    threshold: float
    max_steps: int
    trials: int  # per arm
    seeds: list[int]  # each trial's, in the search
    final_seeds: list[int]  # the chosen settings', never used by the search
    sampler: str
    pruner: str
    rung_steps: list[int]  # where the pruner looks at a trial, before max_steps
    arms: list[Arm]
    results: list[Trial]
    steps_trained: int = 0  # by the search's runs, all together
    schema_version: int = SCHEMA_VERSION

    @property
    def steps_unpruned(self) -> int:
        """What the search's runs would have trained without pruning: every trial to max_steps."""
        return len(self.results) * len(self.seeds) * self.max_steps

    def trials_of(self, arm: str) -> list[Trial]:
        return [t for t in self.results if t.arm == arm]

    def chosen(self, arm: Arm) -> Trial | None:
        return next((t for t in self.trials_of(arm.label) if t.number == arm.chosen), None)

    def save(self, root: Path) -> None:
        write_json(root / FILE, asdict(self))

    @classmethod
    def load(cls, root: Path) -> Tuning | None:
        """The record at `root`; None where it is not a tuning sweep's."""
        if not (root / FILE).is_file():
            return None
        d: dict[str, Any] = read_json(root / FILE)
        arms = [Arm(**a) for a in d.pop("arms")]
        results = [Trial(**{**t, "rungs": {int(k): v for k, v in t["rungs"].items()}}) for t in d.pop("results")]
        return cls(**d, arms=arms, results=results)
