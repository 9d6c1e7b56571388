"""A tuning trial's objective, from the summaries of its runs (its setting on each search seed): lower is better.

The verdict's own measure: the Kaplan-Meier median steps to the target threshold over the seeds
(bnlab.results.verdict), a seed that has not reached it censored at the last step it trained. Three tiers, each
above the one before whatever the steps:
0. the median reached it: the median steps, plus under half an evaluation interval for the median final test
   accuracy (the tie-break between settings that reach it at the same evaluation);
1. fewer than half the seeds reached it: above every trial of tier 0, in the order of the final test accuracy;
2. a seed diverged, stalled or failed: last, in the same order.
Every trial is measured at the step it trained to (a rung of the pruner, where its runs paused, or the last), so
trials are compared at the same step; a diverged run stopped before it."""

from __future__ import annotations

import statistics

from bnlab.record.summary import Status, Summary
from bnlab.results.verdict import Times, median_steps

BAD = (Status.DIVERGED, Status.STALLED, Status.FAILED)


def shortfall(summary: Summary) -> float:
    """How far the run's final test accuracy is from 1 (a regression's: its test loss squashed into [0, 1));
    1 where it has none."""
    acc = summary.final.get("test_acc")
    if acc is not None:
        return min(max(1.0 - acc, 0.0), 1.0)
    loss = summary.final.get("test_loss")
    return 1.0 if loss is None else loss / (1.0 + loss)


def objective(runs: list[Summary], threshold: float, seen: int) -> float:
    """The trial's value (this module's docstring): its runs' steps to `threshold` of their threshold metric, the
    runs trained to step `seen`."""
    every = runs[0].config["trainer"]["eval_every"]
    reached = [s.iterations_to_threshold.get(threshold) for s in runs]
    times = Times.of(
        [s.seed for s in runs],
        [s.steps if at is None else at for s, at in zip(runs, reached)],
        [at is not None for at in reached],
    )
    tie = statistics.median(shortfall(s) for s in runs)
    if any(s.status in BAD for s in runs):
        return 2.0 * (seen + every) + seen * tie
    median = median_steps(times)
    if median.exact:
        return median.steps + 0.5 * every * tie
    return seen + every + seen * tie
