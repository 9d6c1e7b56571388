"""Sweep analysis, read from the summary contract alone: the runs below a folder, grouped once by their
config minus the seed, and per group what the tables and figures show.

Per group: run counts by status; for each threshold the steps, seconds and FLOPs its runs needed (the
Kaplan-Meier median over seeds with its 95 % interval, seeds that never got there censored) and the
speed-up over the group's no-normalization twin (the same config with norm=none), paired by seed; the
final test accuracy (mean and std) and steps/s. Across groups: each series along the lr at its best lr
and the verdict (each norm against no normalization, each at its best lr), the steps to every level of
the threshold metric for those groups, the learning rate that still trains, and which keys a batch-size
sweep set with the batch size.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import statistics
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from bnlab.record.summary import FILE, Status, Summary, SummaryError, is_run_summary
from bnlab.record.tuning import FILE as TUNING_FILE
from bnlab.record.tuning import SEARCH
from bnlab.results.verdict import Comparison, MedianSteps, Times, compare, median_steps
from bnlab.schema import tags
from bnlab.schema.config import BOOKKEEPING_KEYS, NO_NORM, flatten
from bnlab.schema.metrics import GAPS, METRICS, higher_is_better, reaches

Curve = tuple[np.ndarray, np.ndarray]  # (steps, values), sorted by step
logging.getLogger("tensorboard").setLevel(logging.WARNING)  # its event reader logs every file it finishes


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

    @property
    def events_cut_at(self) -> int | None:
        """The last step its TensorBoard events hold, where that is before the run's last step (a file cut off by a
        full disk or a kill: its curves end there); None where they are whole, or the run has no events."""
        curve = self.curve(tags.TEST_ACC) or self.curve(tags.TEST_LOSS)
        last = int(curve[0][-1]) if curve is not None and len(curve[0]) else None
        return last if last is not None and self.summary.status.done and last < self.summary.steps else None

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


def band(curves: list[Curve]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(steps, median, min, max) over the curves, at each step that at least half of them logged.

    A run that stopped early (diverged) leaves the median where fewer than half the runs go on, and
    a step only one run logged (its last evaluation before it diverged) makes no point of its own.
    """
    steps = np.unique(np.concatenate([c[0] for c in curves]))
    table = np.full((len(curves), len(steps)), np.nan)
    present = np.zeros(table.shape, dtype=bool)
    for i, (s, v) in enumerate(curves):
        table[i, np.searchsorted(steps, s)] = np.where(np.isfinite(v), v, np.nan)
        present[i, np.searchsorted(steps, s)] = True
    keep = 2 * present.sum(0) >= len(curves)
    table = table[:, keep]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a step where every value is NaN stays NaN
        return steps[keep], np.nanmedian(table, 0), np.nanmin(table, 0), np.nanmax(table, 0)


def load_runs(root: Path, unreadable: list[str] | None = None) -> list[RunResult]:
    """Every run below `root`: each summary.json that is a run's (a sweep's table of an earlier bnlab is not; a
    tuning sweep's search runs are not its own); one that cannot be read is left out, its one-line reason added to
    `unreadable`."""
    runs = []
    search = (
        Path(root) / SEARCH if (Path(root) / TUNING_FILE).is_file() else None
    )  # a tuning sweep's: not its verdict's
    for path in sorted(Path(root).rglob(FILE)):
        if search and path.is_relative_to(search):
            continue
        try:
            runs.append(RunResult(path.parent, Summary.load(path)))
        except SummaryError as e:
            if not _sweep_table(path) and unreadable is not None:
                unreadable.append(str(e))
    return runs


def _sweep_table(path: Path) -> bool:
    """Whether `path` is the sweep table an earlier bnlab wrote at a sweep's root (a readable non-run summary)."""
    with contextlib.suppress(OSError, ValueError):
        return not is_run_summary(json.loads(path.read_text()))
    return False


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
    """One group's runs at one threshold (bnlab.results.verdict)."""

    median: MedianSteps  # steps to it over the seeds, those that never reached it censored
    speedup: Comparison | None  # over the norm=none twin, the same config at the same lr; None: no twin
    seconds: MedianSteps | None = None  # seconds to it, the same way; None: not recorded (summaries before v4)
    flops_per_step: float | None = None  # the group's (None: not recorded, or its runs differ)

    @property
    def flops(self) -> tuple[float, float | None, float | None] | None:
        """FLOPs to it: the median steps and their interval times the FLOPs of a step."""
        f, m = self.flops_per_step, self.median
        if f is None:
            return None
        return m.steps * f, m.ci_low and m.ci_low * f, m.ci_high and m.ci_high * f

    @property
    def never(self) -> int:
        """Seeds that never reached it."""
        return self.median.seeds - self.median.reached


@dataclass
class RunGroup:
    """The runs that share their config but the seed."""

    label: str  # "norm=batch, optim.lr=0.1", or "all runs"
    keys: dict[str, Any]  # the varying keys' values
    runs: list[RunResult]  # whatever their status
    thresholds: dict[float, ThresholdStats] = field(default_factory=dict)
    twin: RunGroup | None = None  # the same config with norm=none, if the sweep has it

    @property
    def results(self) -> list[RunResult]:
        """The runs whose numbers count (completed or diverged)."""
        return [r for r in self.runs if r.summary.status.counts]

    def count(self, status: Status) -> int:
        return sum(r.summary.status == status for r in self.runs)

    @property
    def norm(self) -> str:
        return self.runs[0].summary.norm

    @property
    def lr(self) -> float:
        return self.runs[0].summary.lr

    def without(self, *keys: str) -> str:
        """Its label with `keys` left out: the series it belongs to when a key varies along an axis."""
        return ", ".join(f"{_short(k)}={v}" for k, v in self.keys.items() if k not in keys) or "all runs"

    def final(self, metric: str) -> list[float]:
        """`metric`'s final value over the runs that count (where it was recorded and finite); a derived one
        (metrics.GAPS) from its two metrics of each run."""
        if metric in GAPS:
            a, b = GAPS[metric]
            return [f[a] - f[b] for r in self.results if a in (f := r.summary.final) and b in f]
        return [v for r in self.results if (v := r.summary.final.get(metric)) is not None]

    def mean_std(self, metric: str) -> tuple[float | None, float | None]:
        """(mean, std) over the seeds of `metric`'s final value (None where there is none, or one value)."""
        values = self.final(metric)
        mean = round(statistics.fmean(values), 4) if values else None
        return mean, round(statistics.stdev(values), 4) if len(values) > 1 else None

    @property
    def final_test_acc(self) -> tuple[float | None, float | None]:
        return self.mean_std("test_acc")

    @property
    def budget(self) -> int:
        """The step budget of its runs (the largest, should they differ)."""
        return max(r.summary.max_steps for r in self.runs)

    @property
    def flops_per_step(self) -> float | None:
        """Its runs' FLOPs per training step, where they recorded one and the same."""
        flops = {r.summary.flops_per_step for r in self.runs}
        return flops.pop() if len(flops) == 1 else None

    @property
    def steps_per_s(self) -> tuple[float, float, float] | None:
        """The runs' own training-loop speeds as median, min and max: one slow seed shows as the min."""
        return _spread([s for r in self.results if (s := r.summary.steps_per_s)], 1)


def times_to(runs: list[RunResult], threshold: float) -> Times:
    """Each run's steps to `threshold`; where it never reached it, censored where it was last seen: a completed
    run at its last step, a diverged one at its step budget (it would not have reached it later)."""
    steps, reached = [], []
    for r in runs:
        at = r.summary.iterations_to_threshold.get(threshold)
        last = r.summary.steps if r.summary.status.done else r.summary.max_steps
        steps.append(last if at is None else at)
        reached.append(at is not None)
    return Times.of([r.summary.seed for r in runs], steps, reached)


def seconds_to(runs: list[RunResult], threshold: float) -> Times | None:
    """`times_to` in seconds of the training loop: where a run never reached it, censored at the seconds its
    censoring step takes at the run's own steps/s; None where a run did not record them (before version 4)."""
    seconds, reached = [], []
    for r in runs:
        s = r.summary
        at = s.seconds_to_threshold.get(threshold)
        if (s.iterations_to_threshold.get(threshold) is not None and at is None) or not s.steps_per_s:
            return None
        seconds.append(at if at is not None else (s.steps if s.status.done else s.max_steps) / s.steps_per_s)
        reached.append(at is not None)
    return Times.of([r.summary.seed for r in runs], seconds, reached)


def _sort_key(group: RunGroup) -> list[tuple[str, Any]]:
    return [(type(v).__name__, v) for v in group.keys.values()]  # numbers in numeric order


def group_runs(runs: list[RunResult], keys: list[str] | None = None) -> list[RunGroup]:
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
        groups.append(RunGroup(label, dict(zip(keys, values)), members))
    thresholds = sorted({t for r in runs for t in r.summary.iterations_to_threshold})
    by_norm = set_with_norm(runs, keys)
    for g in groups:
        g.twin = _twin(g, groups, by_norm)
        if not g.results:
            continue
        for t in thresholds:
            ours = times_to(g.results, t)
            twin = compare(ours, times_to(g.twin.results, t)) if g.twin and g.twin.results else None
            seconds = seconds_to(g.results, t)
            seconds_median = median_steps(seconds) if seconds else None
            g.thresholds[t] = ThresholdStats(median_steps(ours), twin, seconds_median, g.flops_per_step)
    return sorted(groups, key=_sort_key)


def set_with_norm(runs: list[RunResult], keys: list[str]) -> set[str]:
    """Of `keys`, those that go with the norm: the norm's own (norm.*) and those the sweep set with it (a
    preset's per-norm weight decay, say: runs that share the norm share their value)."""
    return {k for k in keys if k.startswith("norm.") or follows(runs, k, "norm.name")}


def _twin(group: RunGroup, groups: list[RunGroup], by_norm: set[str]) -> RunGroup | None:
    """The group with the same config but norm=none (not the group itself), if any; the keys that go with the
    norm (`by_norm`) may differ."""
    want = {k: v for k, v in group.keys.items() if k not in by_norm}
    for other in groups:
        same = all(other.keys[k] == v for k, v in want.items())
        if other is not group and other.norm == NO_NORM and same:
            return other
    return None


@dataclass(eq=False)
class Sweep:
    """The runs below a folder and their groups."""

    root: Path
    runs: list[RunResult]  # every run shown, whatever its status
    groups: list[RunGroup]
    left_out: list[RunResult] = field(default_factory=list)  # failed runs, unless asked for
    unreadable: list[str] = field(default_factory=list)  # summary.json files that cannot be read: why, each

    @property
    def failed(self) -> int:
        """Failed runs, shown or left out."""
        return sum(r.summary.status == Status.FAILED for r in [*self.runs, *self.left_out])

    @property
    def left_out_note(self) -> str:
        """One line on the runs left out of the tables and figures (failed, or unreadable), or ''."""
        notes = []
        if n := len(self.left_out):
            notes.append(f"{n} failed run{'s' if n > 1 else ''} left out (--failed shows them; summary.json says why)")
        notes += [f"left out: {reason}" for reason in self.unreadable]
        return "; ".join(notes)

    @cached_property
    def varying(self) -> list[str]:
        return varying_keys(r.flat_config for r in self.runs)

    @cached_property
    def verdicts(self) -> list[Verdict]:
        return verdicts(self)

    @cached_property
    def series(self) -> dict[str, list[RunGroup]]:
        """The groups (with runs that count) by their label without the lr, lr ascending: a series along the lr."""
        out: dict[str, list[RunGroup]] = {}
        for g in sorted((g for g in self.groups if g.results), key=lambda g: g.lr):
            out.setdefault(g.without("optim.lr"), []).append(g)
        return out

    def name(self, series: str) -> str:
        """A series' label as the verdict names it: without the keys set with the norm (a tuning sweep's chosen
        momentum, a preset's per-norm weight decay), which its norm already says."""
        groups = self.series.get(series)
        if not groups:
            return series
        by_norm = set_with_norm(self.runs, self.varying) - {"norm.name"}
        return groups[0].without("optim.lr", *by_norm)

    def edge(self, series: str, lr: float) -> str:
        """'largest' or 'smallest' where `lr` is at that end of the lrs `series` tried (a better lr may lie beyond
        it), else ''."""
        lrs = [g.lr for g in self.series.get(series, [])]
        if len(lrs) > 1 and lr in (lrs[0], lrs[-1]):
            return "largest" if lr == lrs[-1] else "smallest"
        return ""

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

    @cached_property
    def final_metric(self) -> str:
        """What ranks the runs at their end: test accuracy, or where no run has one (a regression) the test loss."""
        has_acc = any(r.summary.final.get("test_acc") is not None for r in self.runs)
        return "test_acc" if has_acc or not self.runs else "test_loss"


def load_sweep(root: Path, keys: list[str] | None = None, include_failed: bool = False) -> Sweep:
    """Every run below `root`, grouped by `keys` (default: the keys that vary); failed runs (refused late,
    or stopped by an error) are left out unless `include_failed`, and counted either way."""
    unreadable: list[str] = []
    runs = load_runs(root, unreadable)
    failed = [] if include_failed else [r for r in runs if r.summary.status == Status.FAILED]
    shown = [r for r in runs if r not in failed]
    return Sweep(Path(root), shown, group_runs(shown, keys), failed, unreadable)


# ---------------------------------------------------------------- a diagnostic over training, in one number per group


def over_training(group: RunGroup, tag: str) -> tuple[float, float | None, float, float] | None:
    """`tag` (a diagnostic's TensorBoard scalar) in one number per run, its median over the steps logged, and
    those over the group's seeds: (mean, std, min, max); None where no run logged it."""
    return _over_seeds(
        [float(np.nanmedian(c[1])) for r in group.results if (c := r.curve(tag)) is not None and len(c[1])]
    )


def _over_seeds(values: list[float]) -> tuple[float, float | None, float, float] | None:
    """(mean, std, min, max) of one number per seed; None where there is none."""
    if not values:
        return None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, min(values), max(values)


def grad_norm_ratios(group: RunGroup) -> dict[str, tuple[float, float | None, float, float]]:
    """From each run's per-layer weight-gradient norms (diag.grad_norms) at each logged step: the first hidden
    layer's over the last's (`first_over_last`; above 1: gradients grow towards the input) and the largest over
    the smallest (`range`), each at the first logged step (`@start`, the initialization) and as its median over
    training; in one number per run, over the seeds (mean, std, min, max). Empty without grad_norms."""
    per_run: dict[str, list[float]] = {}
    for r in group.results:
        layers = sorted(
            (t for t in r.scalars if t.startswith(f"{tags.GRAD_NORM}/layer")),
            key=lambda t: int(t.rsplit("layer", 1)[1]),
        )
        if len(layers) < 2:
            continue
        norms = np.array([r.scalars[t][1] for t in layers])  # (layers, steps), logged at the same steps
        for name, ratio in (("first_over_last", norms[0] / norms[-1]), ("range", norms.max(0) / norms.min(0))):
            per_run.setdefault(f"{tags.GRAD_NORM}/{name}@start", []).append(float(ratio[0]))
            per_run.setdefault(f"{tags.GRAD_NORM}/{name}", []).append(float(np.nanmedian(ratio)))
    return {k: _over_seeds(v) for k, v in per_run.items()}


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
    return {label: edge.lr for label, edge in training_edges(runs).items()}


@dataclass
class Edge:
    """Where a series stops training as the lr grows, and by how much the deciding runs cleared the cut."""

    lr: float | None  # the largest lr that trains (None: none does)
    margin: float | None  # there, how far its worst seed's final metric sits on the right side of the cut
    above: float | None  # the next lr tried, which does not train
    why: str  # what happened there: seeds that diverged or ended below the cut, and by how much


def _margin(runs: list[Summary], metric: str, cut: float) -> float:
    """How far the worst seed's final metric is on the good side of the cut (negative: the wrong side)."""
    values = [s.final.get(metric) for s in runs if s.final.get(metric) is not None]
    sign = 1 if higher_is_better(metric) else -1
    return min(sign * (v - cut) for v in values) if values else float("-inf")


def training_edges(runs: list[RunResult]) -> dict[str, Edge]:
    """Per series (as largest_lr_that_trains groups them): the largest lr that trains, with its margin and
    what the next lr up did, so a reader sees whether the conclusion sits on the cut."""
    if not runs:
        return {}
    metric = runs[0].summary.threshold_metric
    cut = easiest_threshold(metric, sorted({t for r in runs for t in r.summary.iterations_to_threshold}))
    edges = {}
    for label, by_lr in lr_series(runs).items():
        ok = [lr for lr, group in by_lr.items() if trains(group, metric, cut)]
        lr = max(ok, default=None)
        above = min((x for x in by_lr if lr is None or x > lr), default=None)
        margin = _margin(by_lr[lr], metric, cut) if lr is not None and cut is not None else None
        why = ""
        if above is not None and cut is not None:
            seeds = by_lr[above]
            stopped = sum(s.status != Status.COMPLETED for s in seeds)
            below = [
                s for s in seeds if s.status == Status.COMPLETED and not reaches(metric, s.final.get(metric) or 0, cut)
            ]
            parts = [f"{stopped} of {len(seeds)} seeds diverged or failed"] if stopped else []
            if below:
                worst = -_margin(below, metric, cut)
                parts.append(f"{len(below)} of {len(seeds)} ended below the cut (the worst by {worst:.4f})")
            why = "; ".join(parts)
        edges[label] = Edge(lr, margin, above, why)
    return edges


# ---------------------------------------------------------------- each norm at its best learning rate


@dataclass
class AtBestLr:
    """A series of groups that differ only in their learning rate (one norm, say), at the lr where its final
    test accuracy is best: Ioffe & Szegedy's baseline rule (the verdict's is `pick_best_lr`)."""

    label: str  # the groups' label without the lr
    groups: list[RunGroup]  # one per lr tried, lr ascending
    by_acc: RunGroup  # the lr whose final test accuracy is highest (a regression: test loss lowest; median over seeds)

    @property
    def norm(self) -> str:
        return self.groups[0].norm


def best_lrs(sweep: Sweep) -> list[AtBestLr]:
    """Per series of groups that differ only in optim.lr, its best lr by final test accuracy; [] when the lr
    does not vary."""
    if "optim.lr" not in sweep.varying:
        return []
    metric, sign = sweep.final_metric, 1 if higher_is_better(sweep.final_metric) else -1
    out = []
    for label, groups in sweep.series.items():
        accs = {id(g): sign * statistics.median(g.final(metric)) if g.final(metric) else -math.inf for g in groups}
        out.append(AtBestLr(label, groups, max(groups, key=lambda g: accs[id(g)])))
    return out


# ---------------------------------------------------------------- the verdict: each norm at its best lr vs none at its


@dataclass(frozen=True)
class Verdict:
    """One norm against no normalization, each at its own best lr, at one threshold (sweep.json's `verdicts`)."""

    arm: str  # the arm's group label without the lr, "norm=batch"
    baseline: str  # "norm=none"
    metric: str
    threshold: float
    arm_lr: float
    baseline_lr: float
    speedup: float  # the baseline's median steps to the threshold / the arm's (bnlab.results.verdict.compare)
    ci_low: float | None  # 95 %; None: unbounded on that side (a lower bound has no upper end)
    ci_high: float | None
    bound: str  # exact, lower or upper
    seeds_arm: int
    seeds_baseline: int
    faster_seeds: int | None  # seeds in which the arm got there sooner (paired by seed; else None)


def pick_best_lr(groups: list[RunGroup], thresholds: list[float], metric: str) -> RunGroup:
    """A series' best lr, by one rule: the fewest median steps to the highest threshold that at least half the
    seeds reach at some lr; where none is reached so, or on a tie, the best median final `metric`."""
    sign = 1 if higher_is_better(metric) else -1

    def final(g: RunGroup) -> float:
        values = g.final(metric)
        return sign * statistics.median(values) if values else -math.inf

    counted = [g for g in groups if g.results]
    for t in sorted(thresholds, key=lambda t: sign * t, reverse=True):  # the hardest first
        exact = [g for g in counted if g.thresholds[t].median.exact]
        if exact:
            return min(exact, key=lambda g: (g.thresholds[t].median.steps, -final(g)))
    return max(counted, key=final)


def best_of_series(sweep: Sweep) -> dict[str, RunGroup]:
    """Each series of groups that differ only in the lr (its label: theirs without the lr) -> its group at its
    best lr (`pick_best_lr`); the one group of a series where the lr does not vary."""
    return {label: pick_best_lr(groups, sweep.thresholds, sweep.final_metric) for label, groups in sweep.series.items()}


def pairs(sweep: Sweep) -> list[tuple[str, RunGroup, str, RunGroup]]:
    """(arm label, arm, baseline label, baseline): each norm's series at its best lr and the norm=none series of
    the same other settings at its own."""
    best = best_of_series(sweep)
    by_norm = set_with_norm(sweep.runs, sweep.varying)
    out = []
    for label, arm in best.items():
        setting = {k: v for k, v in arm.keys.items() if k not in by_norm and k != "optim.lr"}
        baseline = next(
            (
                (other, b)
                for other, b in best.items()
                if b.norm == NO_NORM and {k: v for k, v in b.keys.items() if k in setting} == setting
            ),
            None,
        )
        if arm.norm != NO_NORM and baseline is not None:
            out.append((label, arm, *baseline))
    return out


def verdicts(sweep: Sweep) -> list[Verdict]:
    """Each norm's series at its best lr against the norm=none series of the same other settings at its own
    best lr (`pairs`), at every threshold where either median is known."""
    out = []
    for label, arm, base_label, base in pairs(sweep):
        for t in sweep.thresholds:
            c = compare(times_to(arm.results, t), times_to(base.results, t))
            if c is not None:
                out.append(Verdict(label, base_label, sweep.metric, t, arm.lr, base.lr, **asdict(c)))
    return out


# ---------------------------------------------------------------- steps to every level, not only the thresholds

MAX_LEVELS = 40  # levels of the threshold metric in the steps-to-level curves, at most
NICE_STEPS = (1, 2, 5)  # a level grid's spacing: one of these times a power of ten


@dataclass
class LevelCurve:
    """Steps to each level of the threshold metric for one group (a norm at its best lr), and its speed-up
    over the baseline at its own best lr at each level (None for the baseline itself, or where unknown)."""

    label: str  # the series: the group's label without the lr
    group: RunGroup
    levels: list[float]
    medians: list[MedianSteps]
    speedups: list[Comparison | None]


def times_to_level(runs: list[RunResult], metric: str, level: float, thresholds: list[float]) -> Times:
    """Each run's steps to `level`: from its summary where the level is one of its thresholds (the very numbers
    of the tables), otherwise from its curve in TensorBoard, censored as `times_to` censors."""
    if level in thresholds:
        return times_to(runs, level)
    steps, reached = [], []
    tag = METRICS[metric].tag
    for r in runs:
        curve = r.curve(tag) if tag else None
        hits = curve[0][[reaches(metric, v, level) for v in curve[1]]] if curve is not None else []
        steps.append(int(hits[0]) if len(hits) else (r.summary.steps if r.summary.status.done else r.summary.max_steps))
        reached.append(len(hits) > 0)
    return Times.of([r.summary.seed for r in runs], steps, reached)


def level_grid(metric: str, start: float, best: float, thresholds: list[float]) -> list[float]:
    """Levels from `start` (where training starts, say) to `best`, on a grid of a round spacing, MAX_LEVELS at
    most, with the thresholds among them."""
    low, high = sorted((start, best))
    if high <= low:
        return [t for t in thresholds if low <= t <= high]
    magnitude = 10 ** math.floor(math.log10((high - low) / MAX_LEVELS))
    spacing = next(
        n * magnitude
        for p in (1, 10)
        for n in (p * k for k in NICE_STEPS)
        if (high - low) / (n * magnitude) <= MAX_LEVELS
    )
    grid = np.arange(math.ceil(low / spacing), math.floor(high / spacing) + 1) * spacing
    levels = {round(float(x), 6) for x in grid} | {t for t in thresholds if low <= t <= high}
    return sorted(levels, reverse=not higher_is_better(metric))  # from the easiest level to the hardest


def level_curves(sweep: Sweep) -> list[LevelCurve]:
    """The verdict's groups (each norm at its best lr, and the baseline at its own) over levels of the threshold
    metric, from the median of their first evaluations after step 0 to the best median final value among them
    (the thresholds alone where the runs have no curves)."""
    found = pairs(sweep)
    if not found:
        return []
    metric, tag = sweep.metric, METRICS[sweep.metric].tag
    baselines = {base_label: base for _, _, base_label, base in found}
    groups = {**baselines, **{label: arm for label, arm, _, _ in found}}
    firsts = [
        c[1][c[0] > 0][0]
        for g in groups.values()
        for r in g.results
        if (c := r.curve(tag)) is not None and (c[0] > 0).any()
    ]
    finals = [statistics.median(v) for g in groups.values() if (v := g.final(metric))]
    if firsts and finals:
        best = max(finals) if higher_is_better(metric) else min(finals)
        levels = level_grid(metric, float(np.median(firsts)), best, sweep.thresholds)
    else:  # no curves (runs without TensorBoard events): the thresholds alone
        levels = sorted(sweep.thresholds, reverse=not higher_is_better(metric))
    times = {
        label: [times_to_level(g.results, metric, level, sweep.thresholds) for level in levels]
        for label, g in groups.items()
    }
    against = {label: base_label for label, _, base_label, _ in found}
    out = []
    for label, g in groups.items():
        base = times[against[label]] if label in against else None
        speedups = [compare(t, b) for t, b in zip(times[label], base)] if base else [None] * len(levels)
        out.append(LevelCurve(label, g, levels, [median_steps(t) for t in times[label]], speedups))
    return out


# ---------------------------------------------------------------- the speed-up at multiples of the baseline's lr

IOFFE_MULTIPLES = (1, 5, 30)  # BN-Baseline, BN-x5, BN-x30: BN at the baseline's lr times these


@dataclass
class SpeedupRow:
    """A norm at a multiple of the baseline's lr: the steps it needed to reach the baseline's best accuracy."""

    norm: str
    multiple: float  # of the baseline's lr
    lr: float
    group: RunGroup | None  # None: that lr is not in the sweep's grid
    steps: tuple[float, float, float] | None = None  # (median, min, max) over the seeds that reached the target
    never: int = 0  # seeds that never did
    speedup: tuple[float, float, float] | None = None  # the baseline's steps over these, paired by seed
    peak: tuple[float | None, float | None] = (None, None)  # best test accuracy over training: mean, std


@dataclass
class BaselineSpeedup:
    """Ioffe & Szegedy's comparison (their Table 2, Figure 2): no normalization at its best lr (the baseline)
    against each norm at that lr times 1, 5 and 30, by the steps each needs to reach the baseline's best
    test accuracy."""

    target: float  # the baseline's best test accuracy: the lowest of its seeds' peaks (every seed reaches it)
    baseline: SpeedupRow
    rows: list[SpeedupRow]  # per norm and multiple


def first_reaching(run: RunResult, target: float) -> int | None:
    """The first evaluated step at which the run's test accuracy reached `target` (None: never)."""
    curve = run.curve(tags.TEST_ACC)
    if curve is None:
        return None
    hits = curve[0][curve[1] >= target]
    return int(hits[0]) if len(hits) else None


def _peak(run: RunResult) -> float | None:
    curve = run.curve(tags.TEST_ACC)
    return float(np.nanmax(curve[1])) if curve is not None and len(curve[1]) else None


def _row(norm: str, multiple: float, lr: float, group: RunGroup | None, target: float, base: dict) -> SpeedupRow:
    """The row of `group` (None: not in the grid); `base`: the baseline's steps by seed."""
    if group is None:
        return SpeedupRow(norm, multiple, lr, None)
    steps = {r.summary.seed: first_reaching(r, target) for r in group.results}
    reached = [s for s in steps.values() if s is not None]
    ratios = [base[seed] / s for seed, s in steps.items() if s and base.get(seed)]
    peaks = [p for r in group.results if (p := _peak(r)) is not None]
    peak = (
        round(statistics.fmean(peaks), 4) if peaks else None,
        round(statistics.stdev(peaks), 4) if len(peaks) > 1 else None,
    )
    return SpeedupRow(norm, multiple, lr, group, _spread(reached), len(steps) - len(reached), _spread(ratios, 2), peak)


def baseline_speedup(sweep: Sweep, multiples: tuple[float, ...] = IOFFE_MULTIPLES) -> BaselineSpeedup | None:
    """The comparison for a sweep over the lr with norm=none and some other norm whose grid holds the
    baseline's best lr (by final test accuracy) times 5 or 30; None otherwise, or without test/acc curves."""
    best = best_lrs(sweep)
    baseline = next((b for b in best if b.norm == NO_NORM), None)
    if baseline is None:
        return None
    lr = baseline.by_acc.lr
    others = [b for b in best if b.norm != NO_NORM]

    def at(b: AtBestLr, m: float) -> RunGroup | None:
        return next((g for g in b.groups if math.isclose(g.lr, m * lr, rel_tol=1e-6)), None)

    if not any(at(b, m) for b in others for m in multiples if m > 1):
        return None
    peaks = [p for r in baseline.by_acc.results if (p := _peak(r)) is not None]
    if not peaks:
        return None
    target = min(peaks)
    base = {r.summary.seed: first_reaching(r, target) for r in baseline.by_acc.results}
    rows = [_row(b.norm, m, m * lr, at(b, m), target, base) for b in others for m in multiples]
    return BaselineSpeedup(target, _row(NO_NORM, 1, lr, baseline.by_acc, target, base), rows)
