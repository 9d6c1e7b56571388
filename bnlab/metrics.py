"""Iterations-to-threshold: the first step at which a metric reaches each threshold."""

from __future__ import annotations

from collections.abc import Iterable


def threshold_key(value: float) -> str:
    """The name of a threshold in summary.json and TensorBoard: 0.9 -> '0.9'."""
    return f"{value:g}"


class Thresholds:
    """Tracks, for one metric, the first evaluated step at which it reached each value.

    Accuracies reach a value when they are >= it, losses when they are <= it. A threshold that is
    never reached stays None.
    """

    def __init__(self, metric: str, values: Iterable[float]) -> None:
        self.metric = metric
        self.higher_is_better = metric.endswith("_acc")
        self.reached: dict[float, int | None] = {float(v): None for v in values}

    def update(self, step: int, value: float) -> list[float]:
        """Record the metric's value after `step` iterations; return the thresholds first reached now."""
        new = [
            v for v, at in self.reached.items() if at is None and (value >= v if self.higher_is_better else value <= v)
        ]
        for v in new:
            self.reached[v] = step
        return new

    def as_dict(self) -> dict[str, int | None]:
        return {threshold_key(v): at for v, at in self.reached.items()}
