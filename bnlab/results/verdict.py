"""Time to a threshold as censored data, and one arm's speed-up over another with its 95 % interval: the
statistics that every table, figure and dashboard of a sweep reads, from scipy.stats.

A seed that never reached a threshold is right-censored at the last step it was seen at (a completed
run: its last evaluation; a diverged or stalled one: its step budget, since it will not reach it later),
never counted as reaching it there. Per arm (the seeds of one config) and threshold:
- `median_steps`: the Kaplan-Meier median steps to the threshold (scipy.stats.ecdf on censored data) with
  its 95 % interval (where the interval of the estimated fraction that has reached it crosses one half);
  a lower bound where fewer than half the seeds reached it.
- `compare`: the speed-up of an arm over a baseline, the ratio of their median steps (baseline / arm),
  with a 95 % percentile bootstrap interval (scipy.stats.bootstrap; the seeds resampled within each
  arm, paired by seed where both ran the same seeds). Censored baseline seeds make the speed-up a lower
  bound, censored arm seeds an upper bound; with both medians censored there is no speed-up.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 4999
RESAMPLING_SEED = 0  # the bootstrap's own seed: a sweep's interval is the same each time it is read
EXACT, LOWER, UPPER = "exact", "lower", "upper"  # a speed-up's bound: the ratio itself, or a bound on it


@dataclass(frozen=True)
class Times:
    """When each seed of one arm first reached a threshold: `steps` in `seeds`' order; where `reached` is
    False the seed never did and `steps` is where it was last seen (right-censored)."""

    seeds: tuple
    steps: np.ndarray
    reached: np.ndarray

    @classmethod
    def of(cls, seeds: list, steps: list[float], reached: list[bool]) -> Times:
        order = sorted(range(len(seeds)), key=lambda i: str(seeds[i]))
        return cls(
            tuple(seeds[i] for i in order),
            np.array([steps[i] for i in order], float),
            np.array([reached[i] for i in order], bool),
        )


@dataclass(frozen=True)
class MedianSteps:
    steps: float  # the Kaplan-Meier median; where not `exact`, a lower bound (the last step seen)
    ci_low: float | None  # the 95 % interval; None: not bounded within the steps the seeds were seen at
    ci_high: float | None
    exact: bool  # at least half the seeds reached the threshold
    reached: int
    seeds: int
    seen: float  # the last step any seed was seen at: beyond it nothing is known

    @property
    def band(self) -> tuple[float, float]:
        """Its 95 % interval as drawn: an open end at the median itself below, at the last step seen above."""
        return (self.steps if self.ci_low is None else self.ci_low, self.seen if self.ci_high is None else self.ci_high)


def median_steps(times: Times) -> MedianSteps:
    """The Kaplan-Meier median steps to the threshold, with its 95 % interval."""
    from scipy import stats  # 1.4 s to import: only where a sweep's numbers are read, not in every run

    reached, n, seen = int(times.reached.sum()), len(times.steps), float(times.steps.max())
    if reached == 0:
        return MedianSteps(seen, None, None, False, 0, n, seen)
    data = stats.CensoredData(uncensored=times.steps[times.reached], right=times.steps[~times.reached])
    cdf = stats.ecdf(data).cdf
    with warnings.catch_warnings():  # at the last observation the interval is undefined (nan): not crossed
        warnings.simplefilter("ignore", RuntimeWarning)
        band = cdf.confidence_interval(CONFIDENCE)

    def first(probabilities: np.ndarray, undefined: float = 0.0) -> float | None:
        crossed = np.nonzero(np.nan_to_num(probabilities, nan=undefined) >= 0.5)[0]
        return float(cdf.quantiles[crossed[0]]) if len(crossed) else None

    median = first(cdf.probabilities)
    exact = median is not None
    # Where the band is undefined (at the last observation) it spans everything: 0 to 1.
    low, high = first(band.high.probabilities, undefined=1.0), first(band.low.probabilities)
    return MedianSteps(median if exact else seen, low, high, exact, reached, n, seen)


@dataclass(frozen=True)
class Comparison:
    """An arm's speed-up over a baseline at one threshold."""

    speedup: float  # baseline's median steps / arm's; a bound where `bound` says so
    ci_low: float | None  # the 95 % interval; a lower bound has no upper end, an upper bound no lower end
    ci_high: float | None
    bound: str  # EXACT, LOWER (the baseline's median is censored) or UPPER (the arm's is)
    faster_seeds: int | None  # seeds in which the arm reached the threshold sooner (paired by seed; else None)
    seeds_arm: int
    seeds_baseline: int

    @property
    def band(self) -> tuple[float, float]:
        """Its 95 % interval as drawn: an open end (a bound's) at the speed-up itself."""
        return (
            self.speedup if self.ci_low is None else self.ci_low,
            self.speedup if self.ci_high is None else self.ci_high,
        )


def _median(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """The lower median (the Kaplan-Meier median of uncensored steps), a censored seed counting at the step it
    was last seen: a lower bound of the median where half the seeds or more are censored."""
    return np.quantile(x, 0.5, axis=axis, method="inverted_cdf")


def _bound(arm: MedianSteps, baseline: MedianSteps) -> str:
    """What the ratio of the medians is. A censored baseline seed's steps are known only from below, so its
    median and the resampled ones that include it are too: the speed-up is then a lower bound (an upper one
    for the arm's censored seeds); with censored seeds on both sides, the side whose median is censored."""
    if not baseline.exact or (baseline.reached < baseline.seeds and arm.reached == arm.seeds):
        return LOWER
    if not arm.exact or (arm.reached < arm.seeds and baseline.reached == baseline.seeds):
        return UPPER
    return EXACT


def compare(arm: Times, baseline: Times) -> Comparison | None:
    """The arm's speed-up over the baseline with its 95 % bootstrap interval; None where neither arm's median
    is known (both censored), the arm's is 0 (reached at the evaluation before the first step) or an arm has
    no seed."""
    a, b = median_steps(arm), median_steps(baseline)
    if (not a.exact and not b.exact) or a.steps == 0:  # reached before any step: no ratio to take
        return None
    bound = _bound(a, b)
    paired = arm.seeds == baseline.seeds
    low = high = None
    if min(len(arm.steps), len(baseline.steps)) > 1:
        from scipy import stats

        with warnings.catch_warnings():  # identical resamples: a degenerate, zero-width interval
            warnings.simplefilter("ignore")
            result = stats.bootstrap(
                (baseline.steps, arm.steps),
                lambda base, fast, axis=-1: _median(base, axis) / _median(fast, axis),
                paired=paired,
                vectorized=True,
                n_resamples=RESAMPLES,
                confidence_level=CONFIDENCE,
                method="percentile",
                random_state=np.random.default_rng(RESAMPLING_SEED),
            )
        low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
        low, high = (low if bound != UPPER else None), (high if bound != LOWER else None)
    faster = None
    if paired:
        sooner = arm.reached & (~baseline.reached | (arm.steps < baseline.steps))
        faster = int(sooner.sum())
    return Comparison(b.steps / a.steps, low, high, bound, faster, len(arm.steps), len(baseline.steps))
