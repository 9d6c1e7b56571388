"""A sweep's TensorBoard dashboard, written at its root at the end of a sweep and by `bnlab tb`:

- the HParams experiment config (bnlab.record.hparams): columns for the keys that vary plus a fixed short
  set and the status, the metrics with their names, so the HParams tab opens on the comparison;
- a custom-scalars layout whose charts put the groups of the sweep table side by side: per metric,
  the groups that differ only in their norm (one chart per learning rate and other setting), and
  those that differ only in their learning rate (one chart per norm). Each group is drawn as its
  median over seeds with a min-max band, from a TensorBoard run of its own under compare/.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary as SummaryProto
from tensorboard.compat.proto.tensor_pb2 import TensorProto
from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import metadata as custom_scalars
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from bnlab.record.hparams import STATUS, columns, experiment, metric_names, value_at
from bnlab.results.analysis import Sweep, band, load_sweep
from bnlab.schema import tags
from bnlab.schema.config import run_name

SUFFIX = ".bnlab_dashboard"  # the root's own event files, rewritten each time
COMPARE = "compare"  # the groups' median runs
CURVES = {
    tags.TEST_ACC: "test accuracy",
    tags.TEST_LOSS: "test loss",
    tags.TRAIN_ACC: "train accuracy",
    tags.TRAIN_LOSS: "train loss",
}
COMPARED = {"norm.name": "norm", "optim.lr": "lr"}  # a key that varies -> charts that compare its values


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
    shutil.rmtree(root / COMPARE, ignore_errors=True)
    keys = columns(sweep.varying)
    values = {key: [value_at(r.summary.config, key) for r in sweep.runs] for key in keys}
    values[STATUS] = [r.summary.status.value for r in sweep.runs]
    layout: dict[str, dict[str, list[str]]] = {}
    writers: dict[str, Events] = {}
    for key, word in COMPARED.items():
        if key not in sweep.varying:
            continue
        for group in (g for g in sweep.groups if g.results):
            context = group.without(key)
            if group.label not in writers:
                writers[group.label] = Events(root / COMPARE / run_name(group.label.replace(", ", ",")))
            for tag, name in CURVES.items():
                curves = [c for r in group.results if (c := r.curve(tag)) is not None and len(c[0])]
                if not curves:
                    continue
                prefix = f"vs {word}/{context}/{name}"  # "vs ..." sorts after the curves, test/ and train/
                for step, median, low, high in zip(*band(curves)):
                    for suffix, value in (("", median), (" min", low), (" max", high)):
                        writers[group.label].scalar(prefix + suffix, value, int(step))
                chart = f"{name}, {word} compared"
                layout.setdefault(f"{word} compared: {context}", {})[chart] = [prefix, f"{prefix} min", f"{prefix} max"]
    for writer in writers.values():
        writer.close()
    events = Events(root, SUFFIX)
    events.add(experiment(keys, values, metric_names(sweep.metric, sweep.thresholds)))
    if layout:
        events.add(layout_summary(layout))
    events.close()
    return sweep
