"""A sweep's TensorBoard dashboard, written at its root at the end of a sweep and by `bnlab tb`:

- the HParams experiment config (bnlab.record.hparams): columns for the keys that vary, the seed and the
  status, the metrics with their names (the iterations' descriptions carry the verdict at that threshold);
- a run per group under groups/ (named like the runs, so a run filter's regex finds both) holding its
  median over seeds with a band: the test curves (band: min-max over seeds) and, for the verdict's groups
  (each norm at its best lr, no normalization at its own), the steps to every level of the threshold metric
  and the speed-up over no normalization at each level (bands: 95 % intervals; at the thresholds the
  verdict's numbers). TensorBoard's x axis is a step: for these the level times LEVEL_SCALE;
- a custom-scalars layout with one chart for each: every group's line and band side by side.
Time Series shows the medians under sweep/ first, their bands under sweep_bounds/ after the runs' curves.
`bnlab tb` opens TensorBoard at `QUERY`: no smoothing, runs coloured by their norm.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from urllib.parse import quote

from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary as SummaryProto
from tensorboard.compat.proto.tensor_pb2 import TensorProto
from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import metadata as custom_scalars
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from bnlab.record.hparams import STATUS, columns, experiment, metric_names, value_at
from bnlab.record.tuning import Tuning
from bnlab.results.analysis import LevelCurve, RunGroup, Sweep, band, level_curves, load_sweep
from bnlab.results.summarize import fmt_ratio
from bnlab.schema import tags
from bnlab.schema.config import NO_NORM, run_name
from bnlab.schema.metrics import METRICS

SUFFIX = ".bnlab_dashboard"  # the root's own event files, rewritten each time
GROUPS = "groups"  # a run per group: its medians over seeds
LEGACY = "compare"  # where bnlab before version 4 of sweep.json wrote the groups: removed
MEDIANS, BOUNDS = "sweep/", "sweep_bounds/"  # Time Series sorts the medians first, their bounds last
CURVES = {tags.TEST_ACC: "test accuracy", tags.TEST_LOSS: "test loss"}
LEVEL_SCALE = 1000  # a level's x in TensorBoard: 0.97 -> 970
# TensorBoard's own URL parameters: no smoothing, a colour per norm (the runs' names are their overrides)
QUERY = "?smoothing=0&runColorGroup=" + quote("regex:norm=(\\w+)", safe="") + "#timeseries"


class Events:
    """An event file of TensorBoard's own writer (torch's SummaryWriter would import torch for this)."""

    def __init__(self, folder: Path, suffix: str = "") -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.writer = EventFileWriter(str(folder), filename_suffix=suffix)

    def add(self, summary: SummaryProto, step: int = 0) -> None:
        self.writer.add_event(Event(wall_time=time.time(), step=step, summary=summary))

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.add(SummaryProto(value=[SummaryProto.Value(tag=tag, simple_value=value)]), step)

    def close(self) -> None:
        self.writer.close()


def layout_summary(layout: dict[str, dict[str, list[str]]]) -> SummaryProto:
    """The Custom Scalars layout: category -> chart title -> [value, lower, upper] tags of a margin chart."""
    categories = [
        layout_pb2.Category(
            title=category,
            chart=[
                layout_pb2.Chart(
                    title=title,
                    margin=layout_pb2.MarginChartContent(
                        series=[layout_pb2.MarginChartContent.Series(value=value, lower=lower, upper=upper)]
                    ),
                )
                for title, (value, lower, upper) in charts.items()
            ],
        )
        for category, charts in layout.items()
    ]
    tensor = TensorProto(
        dtype="DT_STRING",
        string_val=[layout_pb2.Layout(category=categories).SerializeToString()],
        tensor_shape=TensorShapeProto(),
    )
    value = SummaryProto.Value(
        tag=custom_scalars.CONFIG_SUMMARY_TAG, metadata=custom_scalars.create_summary_metadata(), tensor=tensor
    )
    return SummaryProto(value=[value])


def write_dashboard(root: Path) -> Sweep | None:
    """Write the dashboard of the runs below `root` (failed runs left out) into it; None if there are none."""
    sweep = load_sweep(root)
    if not sweep.runs:
        return None
    for old in root.glob(f"events.out.tfevents.*{SUFFIX}"):
        old.unlink()
    for folder in (GROUPS, LEGACY):
        shutil.rmtree(root / folder, ignore_errors=True)
    writers: dict[str, Events] = {}

    def writer(group: RunGroup) -> Events:
        if group.label not in writers:
            writers[group.label] = Events(root / GROUPS / run_name(group.label.replace(", ", ",")))
        return writers[group.label]

    layout: dict[str, list[str]] = {}  # chart title -> its value, lower and upper tags
    for tag, name in CURVES.items():
        chart = f"{name} over training: median over seeds, band min-max"
        for group in (g for g in sweep.groups if g.results):
            curves = [c for r in group.results if (c := r.curve(tag)) is not None and len(c[0])]
            if curves:
                write_band(writer(group), name, zip(*band(curves)))
                layout[chart] = series(name)
    for curve in level_curves(sweep):
        write_levels(writer(curve.group), curve, sweep, layout)
    for w in writers.values():
        w.close()
    events = Events(root, SUFFIX)
    tuning = Tuning.load(root)  # a tuning sweep: its searched keys too, which its search runs below search/ vary
    searched = [k for arm in tuning.arms for k in arm.keys if k not in sweep.varying] if tuning else []
    keys = columns([*sweep.varying, *dict.fromkeys(searched)])
    values = {key: [value_at(r.summary.config, key) for r in sweep.runs] for key in keys}
    values[STATUS] = [r.summary.status.value for r in sweep.runs]
    notes: dict[float, str] = {}
    for v in sweep.verdicts:
        arms = f"{sweep.name(v.arm)} vs {sweep.name(v.baseline)}"
        verdict = f"{arms}, each at its best lr ({v.arm_lr:g} vs {v.baseline_lr:g}): {fmt_ratio(v)}"
        notes[v.threshold] = "; ".join(filter(None, [notes.get(v.threshold), verdict]))
    events.add(experiment(keys, values, metric_names(sweep.metric, sweep.thresholds, notes)))
    if layout:
        events.add(layout_summary({"the sweep: medians over seeds with their bands": layout}))
    events.close()
    return sweep


def series(name: str) -> list[str]:
    """A quantity's median tag and its bounds' tags."""
    return [MEDIANS + name, f"{BOUNDS}{name} low", f"{BOUNDS}{name} high"]


def write_band(events: Events, name: str, points) -> None:
    """(x, median, low, high) points of one quantity."""
    median, low, high = series(name)
    for x, value, lower, upper in points:
        for tag, v in ((median, value), (low, lower), (high, upper)):
            events.scalar(tag, v, int(x))


def write_levels(events: Events, curve: LevelCurve, sweep: Sweep, layout: dict[str, list[str]]) -> None:
    """The steps to each level and the speed-up at each (where known), x = the level times LEVEL_SCALE."""
    label = METRICS[sweep.metric].label.split(" (")[0]
    steps, speedup = f"steps to each {label} level", f"speed-up over {NO_NORM} at each {label} level"
    x = [round(level * LEVEL_SCALE) for level in curve.levels]
    known = [(x, m.steps, *m.band) for x, m in zip(x, curve.medians) if m.exact]
    write_band(events, steps, known)
    ratios = [(x, r.speedup, *r.band) for x, r in zip(x, curve.speedups) if r is not None]
    write_band(events, speedup, ratios)
    scale = f"(x: the level x {LEVEL_SCALE}; band: 95 % interval)"
    if known:
        layout[f"{steps} {scale}"] = series(steps)
    if ratios:
        layout[f"{speedup}, each at its best lr {scale}"] = series(speedup)
