"""The metrics a run records, which way each one improves, and iterations-to-threshold: the first
evaluated step at which a metric reached each threshold."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from bnlab.schema import tags


@dataclass(frozen=True)
class Metric:
    label: str  # for axes and tables
    higher_is_better: bool  # accuracies: True; losses: False
    tag: str | None = None  # its curve in TensorBoard, if it has one
    accuracy: bool = False  # an accuracy, which a regression task does not measure


METRICS: dict[str, Metric] = {
    "test_acc": Metric("test accuracy", True, tags.TEST_ACC, accuracy=True),
    "train_acc": Metric("training accuracy", True, tags.TRAIN_ACC, accuracy=True),
    "test_loss": Metric("test loss (cross-entropy in nats; regression: MSE)", False, tags.TEST_LOSS),
    "train_loss": Metric("training loss (cross-entropy in nats; regression: MSE)", False, tags.TRAIN_LOSS),
    "test_acc_train_mode": Metric("test accuracy in train mode (batch statistics)", True, accuracy=True),
    "test_acc_precise_bn": Metric("test accuracy after precise BN", True, accuracy=True),
    "test_acc_shifted": Metric("test accuracy on shifted images (trainer.shift)", True, accuracy=True),
    "test_acc_adabn": Metric("test accuracy on shifted images after AdaBN", True, accuracy=True),
    # derived from two others per run (bnlab.results.analysis.RunGroup.final), not recorded by the run itself
    "acc_gap": Metric("training minus test accuracy (the generalization gap)", False, accuracy=True),
}
GAPS = {"acc_gap": ("train_acc", "test_acc")}  # a derived metric -> the two final metrics it is the difference of
THRESHOLD_METRICS = tuple(name for name, m in METRICS.items() if m.tag)  # those measured during training


def measured(metrics: Iterable[str], accuracy: bool) -> list[str]:
    """Those of `metrics` that a task measures: all with accuracy (classification), else the losses."""
    return [m for m in metrics if accuracy or not METRICS[m].accuracy]


def higher_is_better(metric: str) -> bool:
    """Whether larger values of `metric` are better (accuracies) or smaller ones (losses)."""
    return METRICS[metric].higher_is_better


def reaches(metric: str, value: float, threshold: float) -> bool:
    """Whether `value` of `metric` has reached `threshold`: >= for accuracies, <= for losses."""
    return value >= threshold if higher_is_better(metric) else value <= threshold


class Thresholds:
    """Tracks, for one metric, the first evaluated step at which it reached each value (None: not yet), and
    the training loop's seconds at that evaluation."""

    def __init__(self, metric: str, values: Iterable[float]) -> None:
        self.metric = metric
        self.reached: dict[float, int | None] = {float(v): None for v in values}
        self.seconds: dict[float, float | None] = dict.fromkeys(self.reached)

    def update(self, step: int, value: float, seconds: float | None = None) -> list[float]:
        """Record the metric's value after `step` iterations, `seconds` into training; return the thresholds
        first reached now."""
        new = [v for v, at in self.reached.items() if at is None and reaches(self.metric, value, v)]
        for v in new:
            self.reached[v], self.seconds[v] = step, None if seconds is None else round(seconds, 3)
        return new
