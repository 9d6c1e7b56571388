"""The summary contract: what a run writes to summary.json (`Summary`, schema version 4) and how every
reader loads it, older files included. docs/summary.md documents each field and its unit.

Thresholds are numbers throughout: in memory a mapping threshold -> iterations, in the file a list of
{"threshold": 0.9, "iterations": 300, "seconds": 1.9} records. Every number is standard JSON: a non-finite value (a
diverged run's loss) is written as null, and the run's status says why.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any

from bnlab.record.files import write_json

# 1: no schema_version, iterations_to_threshold as {"0.9": 300}, NaN where a value was not finite; 2: no status
# stalled (such a run said completed); 3: no seconds to a threshold, no flops_per_step; 4: no status paused
SCHEMA_VERSION = 5
FILE = "summary.json"  # in every run folder
SWEEP_FILE = "sweep.json"  # at a sweep's root: its table and verdicts (bnlab.results.summarize), not a run's
# sweep.json: per group and threshold the median steps with its interval, 4: and seconds and FLOPs; the verdicts
SWEEP_SCHEMA_VERSION = 4


log = logging.getLogger(__name__)


class SummaryError(ValueError):
    """A summary.json that cannot be read (truncated, corrupt, not a run's); the message names the file."""


class Status(str, Enum):
    """Where a run stands. Its numbers count in tables and figures when it completed, stalled or diverged."""

    RUNNING = "running"  # only while it trains: a file that says so belongs to a run that was killed
    COMPLETED = "completed"
    # completed, but ended no better than chance: a final test accuracy within CHANCE_MARGIN of 1 / classes
    # (a regression: a final test loss not below its first); a result that failed to train, like a divergence
    STALLED = "stalled"
    DIVERGED = "diverged"  # the loss turned non-finite (or stayed above trainer.stop_loss): a result, not an error
    FAILED = "failed"  # an error stopped it (summary.error says which)
    INTERRUPTED = "interrupted"  # Ctrl-C or SIGTERM: its checkpoint lets it resume
    PAUSED = "paused"  # stopped at trainer.pause_at as asked: its checkpoint lets it go on (trainer.resume=true)

    @property
    def counts(self) -> bool:
        return self in (Status.COMPLETED, Status.STALLED, Status.DIVERGED)

    @property
    def unfinished(self) -> bool:
        """Stopped before its last step with a checkpoint to go on from: interrupted or paused."""
        return self in (Status.INTERRUPTED, Status.PAUSED)

    @property
    def done(self) -> bool:
        """Trained to its last step (completed or stalled): a resume leaves it as it is."""
        return self in (Status.COMPLETED, Status.STALLED)

    @property
    def failed_to_train(self) -> bool:
        """Diverged or stalled: figures and the dashboard mark such runs alike."""
        return self in (Status.DIVERGED, Status.STALLED)


CHANCE_MARGIN = 0.02  # a completed run whose final test accuracy is within this of 1 / classes has stalled


@dataclass
class Summary:
    """One run's summary.json."""

    status: Status
    config: dict[str, Any]  # the whole resolved config, as .hydra/config.yaml has it
    threshold_metric: str  # the metric of iterations_to_threshold
    steps: int = 0  # optimizer steps taken
    iterations_to_threshold: dict[float, int | None] = field(default_factory=dict)  # None: never reached
    # seconds into the training loop (evaluations included) at the evaluation that reached it; None: never, or
    # not recorded (schema < 4)
    seconds_to_threshold: dict[float, float | None] = field(default_factory=dict)
    final: dict[str, float | None] = field(default_factory=dict)  # metrics of the last evaluation
    error: str | None = None  # why it failed
    wall_time_s: float | None = None  # seconds from start to end, earlier attempts before a resume included
    steps_per_s: float | None = None  # training-loop speed, evaluations included
    device: str = ""
    fused_members: int = 1  # runs trained together as one stacked model
    flops_per_step: float | None = None  # forward and backward at the batch size (bnlab.run.engine.step_flops)
    devices: int = 1  # processes the run trained on, each with its share of every batch (trainer.devices)
    peak_memory_mb: dict[str, float] = field(default_factory=dict)  # "host": resident memory; "gpu": allocated
    schema_version: int = SCHEMA_VERSION

    # ---------------------------------------------------------------- what the analysis reads of the config

    @property
    def seed(self) -> int:
        return self.config.get("seed", 0)

    @property
    def max_steps(self) -> int:
        """The step budget (trainer.max_steps), or the steps taken if the config lacks it."""
        return self.config.get("trainer", {}).get("max_steps") or self.steps

    @property
    def lr(self) -> float:
        return float(self.config["optim"]["lr"])

    @property
    def batch_size(self) -> int:
        return int(self.config["data"]["batch_size"])

    @property
    def norm(self) -> str:
        return self.config["norm"]["name"]

    # ---------------------------------------------------------------- the file

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["schema_version"] = SCHEMA_VERSION  # written in the current form, whatever form it was read from
        out["status"] = self.status.value
        out["iterations_to_threshold"] = [
            {"threshold": t, "iterations": i, "seconds": self.seconds_to_threshold.get(t)}
            for t, i in self.iterations_to_threshold.items()
        ]
        del out["seconds_to_threshold"]
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Summary:
        """A summary from its JSON form, schema version 1 to 4 (unknown keys are ignored)."""
        known = {f.name for f in fields(cls)}
        s = cls(**{k: v for k, v in d.items() if k in known})
        s.status = Status(s.status)
        reached = d.get("iterations_to_threshold") or []
        if isinstance(reached, dict):  # schema 1: {"0.9": 300}
            s.iterations_to_threshold = {float(k): v for k, v in reached.items()}
        else:
            s.iterations_to_threshold = {float(r["threshold"]): r["iterations"] for r in reached}
            s.seconds_to_threshold = {float(r["threshold"]): r.get("seconds") for r in reached}
        s.final = {k: _number(v) for k, v in s.final.items()}
        s.schema_version = d.get("schema_version", 1)
        return s

    def save(self, path: Path) -> None:
        write_json(path, self.to_json())

    @classmethod
    def load(cls, path: Path) -> Summary:
        """The run's summary; SummaryError naming the file where it cannot be read or is not a run's."""
        try:
            d = json.loads(Path(path).read_text())
            if not is_run_summary(d):
                raise ValueError("not a run's summary (no status and config)")
            return cls.from_json(d)
        except (OSError, ValueError, TypeError, KeyError) as e:  # unreadable, not JSON, or fields of the wrong kind
            raise SummaryError(f"{path} cannot be read: {type(e).__name__}: {e}") from e


def _number(v: Any) -> float | None:
    """A final metric as a finite float, or None (schema 1 files may hold NaN)."""
    return float(v) if v is not None and math.isfinite(v) else None


def existing(path: Path) -> Summary | None:
    """The run summary at `path`; None where there is none, or where it cannot be read (a warning names it: a
    resume goes on from the run's checkpoint, and a new summary replaces it)."""
    try:
        return Summary.load(path) if Path(path).is_file() else None
    except SummaryError as e:
        log.warning("%s: left aside", e)
        return None


def is_run_summary(d: Any) -> bool:
    """Whether a parsed summary.json is a run's (a sweep summarized by an earlier bnlab kept its table there too)."""
    return isinstance(d, dict) and "status" in d and "config" in d
