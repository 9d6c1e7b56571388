"""Sweep analysis, read from the summary contract alone: the runs below a folder, grouped once by their
config minus the seed, and per group what the tables and figures show.

Per group: run counts by status; for each threshold the iterations its runs needed (median and min-max
over the seeds that reached it, and how many never did) and the speed-up over the group's
no-normalization twin (the same config with norm=none), paired by seed; the final test accuracy (mean
and std) and steps/s. Across groups: the learning rate that still trains, each group at its best
learning rate, and which keys a batch-size sweep set with the batch size.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from bnlab.config import BOOKKEEPING_KEYS, flatten
from bnlab.metrics import higher_is_better, reaches
from bnlab.summary import FILE, Status, Summary, is_run_summary

Curve = tuple[np.ndarray, np.ndarray]  # (steps, values), sorted by step


@dataclass(eq=False)
class RunResult:
    """One run folder: its summary, its group's label and, read when first asked for, its TensorBoard curves."""

    dir: Path
    summary: Summary
    group: str = ""

    @cached_property
    def flat_config(self) -> dict[str, Any]:
        return flatten(self.summary.config)

    @cached_property
    def scalars(self) -> dict[str, Curve]:
        """Every scalar of the run's TensorBoard events, by tag (the last value where a step repeats)."""
        if not any(self.dir.glob("events.out.tfevents.*")):
            return {}
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # slow to import

        events = EventAccumulator(str(self.dir), size_guidance={"scalars": 0, "histograms": 1})
        events.Reload()
        out = {}
        for tag in events.Tags()["scalars"]:
            by_step = {e.step: e.value for e in events.Scalars(tag)}
            steps = np.array(sorted(by_step))
            out[tag] = (steps, np.array([by_step[s] for s in steps], dtype=float))
        return out

    def curve(self, tag: str, window: int = 0) -> Curve | None:
        """The tag's curve; with `window`, the mean over each window of steps ending at a multiple of it."""
        if tag not in self.scalars:
            return None
        steps, values = self.scalars[tag]
        if window:
            ends = -(-steps // window) * window
            steps, index = np.unique(ends, return_inverse=True)
            values = np.bincount(index, values) / np.bincount(index)
        return steps, values


def load_runs(root: Path) -> list[RunResult]:
    """Every run below `root`: each summary.json that is a run's (a sweep's table is not)."""
    runs = []
    for path in sorted(Path(root).rglob(FILE)):
        d = json.loads(path.read_text())
        if is_run_summary(d):
            runs.append(RunResult(path.parent, Summary.from_json(d)))
    return runs


def varying_keys(flat_configs: Iterable[dict[str, Any]]) -> list[str]:
    """The config keys (seed and bookkeeping aside) whose values differ between runs: what names a group."""
    flat_configs = list(flat_configs)
    keys = sorted({k for f in flat_configs for k in f} - {"seed", *BOOKKEEPING_KEYS})
    return [k for k in keys if len({repr(f.get(k)) for f in flat_configs}) > 1]


def _short(key: str) -> str:
    """'norm.name' -> 'norm' (the group's option), other keys as they are."""
    return key.removesuffix(".name")


def _spread(values: list[float], digits: int | None = None) -> tuple[float, float, float] | None:
    """(median, min, max), or None for no values."""
    if not values:
        return None
    return round(statistics.median(values), digits), min(values), max(values)


@dataclass
class ThresholdStats:
    """One group's runs at one threshold."""

    iterations: tuple[float, float, float] | None  # (median, min, max) over the runs that reached it
    never: int  # runs that never reached it
    speedup: tuple[float, float, float] | None  # over the norm=none twin, paired by seed: (median, min, max)
    speedup_lower_bound: bool  # some twin never reached it: its step budget stood in


@dataclass
class Group:
    """The runs that share their config but the seed."""

    label: str  # "norm=batch, optim.lr=0.1", or "all runs"
    keys: dict[str, Any]  # the varying keys' values
    runs: list[RunResult]  # whatever their status
    thresholds: dict[float, ThresholdStats] = field(default_factory=dict)

    @property
    def results(self) -> list[RunResult]:
        """The runs whose numbers count (completed or diverged)."""
        return [r for r in self.runs if r.summary.status.counts]

    def count(self, status: Status) -> int:
        return sum(r.summary.status == status for r in self.runs)

    @property
    def norm(self) -> str:
        return self.runs[0].summary.norm

    def final(self, metric: str) -> list[float]:
        """`metric`'s final value over the runs that count (where it was recorded and finite)."""
        return [v for r in self.results if (v := r.summary.final.get(metric)) is not None]

    @property
    def final_test_acc(self) -> tuple[float | None, float | None]:
        """(mean, std) of the final test accuracy."""
        accs = self.final("test_acc")
        mean = round(statistics.fmean(accs), 4) if accs else None
        return mean, round(statistics.stdev(accs), 4) if len(accs) > 1 else None

    @property
    def steps_per_s(self) -> float | None:
        speeds = [s for r in self.results if (s := r.summary.steps_per_s)]
        return round(statistics.fmean(speeds), 1) if speeds else None


def _speedups(runs: list[RunResult], twin: list[RunResult], threshold: float) -> tuple[list[float], bool]:
    """Per seed: twin iterations / this group's iterations to `threshold`.

    A twin run that never reached the threshold counts with its step budget (trainer.max_steps), so
    the ratio is a lower bound, flagged by the second return value. Seeds where this group never
    reached it are left out.
    """
    twin_by_seed = {r.summary.seed: r.summary for r in twin}
    ratios, lower_bound = [], False
    for r in runs:
        t = twin_by_seed.get(r.summary.seed)
        ours = r.summary.iterations_to_threshold.get(threshold)
        if t is None or not ours:
            continue
        theirs = t.iterations_to_threshold.get(threshold)
        lower_bound |= theirs is None
        ratios.append((theirs or t.max_steps) / ours)
    return ratios, lower_bound


def _sort_key(group: Group) -> list[tuple[str, Any]]:
    return [(type(v).__name__, v) for v in group.keys.values()]  # numbers in numeric order


def group_runs(runs: list[RunResult], keys: list[str] | None = None) -> list[Group]:
    """The runs grouped by the values of `keys` (default: the keys that vary between them), each group
    with its statistics; every run's `group` is set to its group's label."""
    if keys is None:
        keys = varying_keys(r.flat_config for r in runs)
    by_values: dict[tuple, list[RunResult]] = {}
    for r in runs:
        by_values.setdefault(tuple(r.flat_config.get(k) for k in keys), []).append(r)
    groups = []
    for values, members in by_values.items():
        label = ", ".join(f"{_short(k)}={v}" for k, v in zip(keys, values)) or "all runs"
        for r in members:
            r.group = label
        groups.append(Group(label, dict(zip(keys, values)), members))
    thresholds = sorted({t for r in runs for t in r.summary.iterations_to_threshold})
    for g in groups:
        twin = _twin(g, groups)
        for t in thresholds:
            reached = [r.summary.iterations_to_threshold.get(t) for r in g.results]
            ratios, lower = _speedups(g.results, twin, t)
            spread = _spread([v for v in reached if v is not None])
            g.thresholds[t] = ThresholdStats(spread, sum(v is None for v in reached), _spread(ratios, 2), lower)
    return sorted(groups, key=_sort_key)


def _twin(group: Group, groups: list[Group]) -> list[RunResult]:
    """The runs that count of the group with the same config but norm=none (not the group itself)."""
    want = {k: v for k, v in group.keys.items() if not k.startswith("norm.")}
    for other in groups:
        same = all(other.keys[k] == v for k, v in want.items())
        if other is not group and other.norm == "none" and same:
            return other.results
    return []


@dataclass(eq=False)
class Sweep:
    """The runs below a folder and their groups."""

    root: Path
    runs: list[RunResult]  # every run, whatever its status
    groups: list[Group]

    @cached_property
    def varying(self) -> list[str]:
        return varying_keys(r.flat_config for r in self.runs)

    @cached_property
    def counted(self) -> dict[str, list[RunResult]]:
        """Group label -> its runs that count (completed or diverged), in table order; groups without any left out."""
        return {g.label: g.results for g in self.groups if g.results}

    @property
    def metric(self) -> str:
        """The threshold metric."""
        return self.runs[0].summary.threshold_metric if self.runs else "test_acc"

    @property
    def thresholds(self) -> list[float]:
        return sorted({t for g in self.groups for t in g.thresholds})


def load_sweep(root: Path, keys: list[str] | None = None) -> Sweep:
    """Every run below `root`, grouped by `keys` (default: the keys that vary)."""
    runs = load_runs(root)
    return Sweep(Path(root), runs, group_runs(runs, keys))


# ---------------------------------------------------------------- the learning rate that still trains


def easiest_threshold(metric: str, thresholds: list[float]) -> float | None:
    """The lowest accuracy threshold, or the highest loss threshold."""
    if not thresholds:
        return None
    return min(thresholds) if higher_is_better(metric) else max(thresholds)


def trains(runs: list[Summary], metric: str, threshold: float | None) -> bool:
    """All seeds completed (none diverged, failed or interrupted) and each ends at the threshold or better."""

    def good(s: Summary) -> bool:
        value = s.final.get(metric)
        return threshold is None or (value is not None and reaches(metric, value, threshold))

    return bool(runs) and all(s.status == Status.COMPLETED and good(s) for s in runs)


def follows(runs: list[RunResult], key: str, driver: str) -> bool:
    """Whether `key` is set by `driver`: runs that share the driver's value share the key's (a preset's lr
    and step budget scaled with the batch size, say)."""
    seen: dict[str, str] = {}
    for r in runs:
        value, by = repr(r.flat_config.get(key)), repr(r.flat_config.get(driver))
        if seen.setdefault(by, value) != value:
            return False
    return True


def batch_size_keys(sweep: Sweep) -> list[str]:
    """The keys a batch-size sweep sets with the batch size (itself first), or [] if the batch size does not vary."""
    if "data.batch_size" not in sweep.varying:
        return []
    driven = [k for k in sweep.varying if k != "data.batch_size" and follows(sweep.runs, k, "data.batch_size")]
    return ["data.batch_size", *driven]


def lr_series(runs: list[RunResult]) -> dict[str, dict[float, list[Summary]]]:
    """Group (config minus seed and optim.lr) -> lr -> its runs' summaries, lrs ascending, groups by label."""
    keys = [k for k in varying_keys(r.flat_config for r in runs) if k != "optim.lr"]
    series: dict[str, dict[float, list[Summary]]] = {}
    for g in group_runs([RunResult(r.dir, r.summary) for r in runs], keys):
        for r in g.runs:
            series.setdefault(g.label, {}).setdefault(r.summary.lr, []).append(r.summary)
    return {label: dict(sorted(by_lr.items())) for label, by_lr in sorted(series.items())}


def largest_lr_that_trains(runs: list[RunResult]) -> dict[str, float | None]:
    """Per group of runs that differ only in seed and optim.lr (e.g. per norm): the largest lr that trains.

    An lr trains when all its seeds completed (none diverged, failed or interrupted) and each one's
    final threshold metric reached the easiest threshold (the lowest accuracy threshold, e.g. final
    test accuracy >= 0.9; for a loss metric the highest loss threshold). None: no lr tried trains.
    """
    if not runs:
        return {}
    metric = runs[0].summary.threshold_metric
    threshold = easiest_threshold(metric, sorted({t for r in runs for t in r.summary.iterations_to_threshold}))
    return {
        label: max((lr for lr, group in by_lr.items() if trains(group, metric, threshold)), default=None)
        for label, by_lr in lr_series(runs).items()
    }


def at_best_lr(sweep: Sweep) -> list[Group]:
    """Per family of groups that differ only in optim.lr (e.g. per norm): the group at its best lr, the one
    whose runs all completed (none diverged, failed or interrupted) with the highest mean final test
    accuracy; a family where no lr qualifies is left out. [] unless optim.lr varies."""
    if "optim.lr" not in sweep.varying:
        return []
    families: dict[tuple, list[Group]] = {}
    for g in sweep.groups:
        rest = tuple((k, v) for k, v in g.keys.items() if k != "optim.lr")
        families.setdefault(rest, []).append(g)
    best = []
    for groups in families.values():
        done = [g for g in groups if g.runs and all(r.summary.status == Status.COMPLETED for r in g.runs)]
        if done:
            best.append(max(done, key=lambda g: g.final_test_acc[0] or 0.0))
    return best
