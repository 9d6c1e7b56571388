"""Figures and a markdown report of the runs below a folder (`bnlab report DIR`): `write_report(root)`
reads every run's summary.json and TensorBoard events below `root`, groups the runs as the sweep
table does (config minus the seed, labels from `bnlab.summarize`) and writes into `root` report.md
(the sweep table, each figure with a caption, the largest learning rate that still trains) and one
PNG per figure whose data some run logged: the threshold metric over training, iterations to each
threshold, learning-rate sensitivity, activation percentiles, internal covariate shift, loss-landscape
smoothness, and test accuracy in train mode, eval mode and after precise BN. Medians over seeds with
min-max bands or error bars; each group keeps its colour in every figure.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from bnlab import summarize
from bnlab.config import flatten
from bnlab.files import write_text

REPORT = "report.md"
DPI = 120
BAND_ALPHA = 0.2
RESULTS = ("completed", "diverged")  # the runs whose curves and results count (as in the sweep table)
STEPS = "iterations (optimizer steps)"
TAGS = {"test_acc": "test/acc", "test_loss": "test/loss", "train_acc": "train/acc", "train_loss": "train/loss"}
METRIC_LABELS = {
    "test_acc": "test accuracy",
    "train_acc": "training accuracy",
    "test_loss": "test loss (cross-entropy, nats)",
    "train_loss": "training loss (cross-entropy, nats)",
}
ACT_TAG = re.compile(r"^act/(-?\d+)/unit0/p(15|50|85)$")
ICS_TAG = re.compile(r"^ics/layer(\d+)/l2$")
LANDSCAPE = (
    ("landscape/loss_variation", "loss variation", "range of $L(\\theta - \\eta g)$ (nats)"),
    ("landscape/grad_predictiveness", "gradient predictiveness", "range of $\\|\\nabla L(\\theta - \\eta g) - g\\|_2$"),
    (
        "landscape/beta_smoothness",
        "effective $\\beta$-smoothness",
        "max $\\|\\nabla L(\\theta - \\eta g) - g\\|_2 \\,/\\, \\|\\eta g\\|_2$",
    ),
)
ACC_MODES = (
    ("test_acc_train_mode", "train mode\n(batch statistics)"),
    ("test_acc", "eval mode\n(running averages, EMA)"),
    ("test_acc_precise_bn", "eval mode after\nprecise BN"),
)

Curve = tuple[np.ndarray, np.ndarray]  # (steps, values), sorted by step


# ---------------------------------------------------------------- loading and grouping


def budget(summary: dict[str, Any]) -> int:
    """The run's step budget, trainer.max_steps (the steps it took if the config lacks it)."""
    return summary["config"].get("trainer", {}).get("max_steps") or summary.get("steps") or 0


@dataclass(eq=False)
class Run:
    dir: Path
    summary: dict[str, Any]
    group: str = ""  # its row of the sweep table

    @property
    def seed(self) -> Any:
        return self.summary["config"].get("seed")

    @property
    def max_steps(self) -> int:
        return budget(self.summary)

    @cached_property
    def scalars(self) -> dict[str, Curve]:
        """Every scalar of the run's TensorBoard events, by tag (the last value where a step repeats)."""
        if not any(self.dir.glob("events.out.tfevents.*")):
            return {}
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

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


@dataclass(eq=False)
class Sweep:
    root: Path
    runs: list[Run]  # every run below root, whatever its status
    metric: str  # the threshold metric
    rows: list[summarize.Row]  # the sweep table
    colours: dict[str, Any]  # group -> colour, the same in every figure

    @cached_property
    def varying(self) -> list[str]:
        return summarize.varying_keys(flatten(r.summary["config"]) for r in self.runs)

    @cached_property
    def thresholds(self) -> list[str]:
        return summarize.thresholds_of(self.rows)

    @cached_property
    def groups(self) -> dict[str, list[Run]]:
        """Group -> its completed and diverged runs, in the table's order (groups without any left out)."""
        out = {
            row["group"]: [r for r in self.runs if r.group == row["group"] and r.summary["status"] in RESULTS]
            for row in self.rows
        }
        return {g: runs for g, runs in out.items() if runs}

    @property
    def higher_is_better(self) -> bool:
        return self.metric.endswith("_acc")


def load_sweep(root: Path) -> Sweep:
    """Every run below `root` (a summary.json with a status and a config; sweep tables are not runs), grouped."""
    runs = [Run(run_dir, summary) for run_dir, summary in summarize.load_run_dirs(root)]
    summaries = [r.summary for r in runs]
    varying = summarize.varying_keys(flatten(s["config"]) for s in summaries)
    for run, label in zip(runs, group_labels(summaries, varying)):
        run.group = label
    rows = summarize.group_rows(summaries, varying) if runs else []
    metric = runs[0].summary.get("threshold_metric", "test_acc") if runs else "test_acc"
    return Sweep(root, runs, metric, rows, palette([row["group"] for row in rows]))


def group_labels(summaries: list[dict[str, Any]], keys: list[str]) -> list[str]:
    """Each run's group label when the runs are grouped by `keys`, exactly as summarize.group_rows names it."""
    rows = summarize.group_rows(summaries, keys) if summaries else []
    label = {tuple(row[k] for k in keys): row["group"] for row in rows}
    return [label[tuple(flatten(s["config"]).get(k) for k in keys)] for s in summaries]


def palette(labels: list[str]) -> dict[str, Any]:
    """One distinct colour per label, in order."""
    if len(labels) <= 10:
        colours = colormaps["tab10"].colors
    elif len(labels) <= 20:
        colours = colormaps["tab20"].colors
    else:
        colours = colormaps["viridis"](np.linspace(0, 0.95, len(labels)))
    return {label: colours[i] for i, label in enumerate(labels)}


# ---------------------------------------------------------------- the learning rate that still trains


def _final(summary: dict[str, Any], metric: str) -> float | None:
    value = summary.get("final", {}).get(metric)
    return None if value is None or not np.isfinite(value) else value


def easiest_threshold(metric: str, thresholds: list[str]) -> float | None:
    """The lowest accuracy threshold, or the highest loss threshold."""
    values = [float(k) for k in thresholds]
    return (min(values) if metric.endswith("_acc") else max(values)) if values else None


def trains(runs: list[dict[str, Any]], metric: str, threshold: float | None) -> bool:
    """All seeds completed (none diverged, failed or interrupted) and each ends at the threshold or better."""

    def good(s: dict[str, Any]) -> bool:
        value = _final(s, metric)
        if threshold is None:
            return True
        return value is not None and (value >= threshold if metric.endswith("_acc") else value <= threshold)

    return bool(runs) and all(s["status"] == "completed" and good(s) for s in runs)


def follows(summaries: list[dict[str, Any]], key: str, driver: str) -> bool:
    """Whether `key` is set by `driver`: runs that share the driver's value share the key's (a preset's lr
    and step budget scaled with the batch size, say)."""
    seen: dict[str, str] = {}
    for s in summaries:
        flat = flatten(s["config"])
        if seen.setdefault(repr(flat.get(driver)), repr(flat.get(key))) != repr(flat.get(key)):
            return False
    return True


def lr_series(summaries: list[dict[str, Any]]) -> dict[str, dict[float, list[dict[str, Any]]]]:
    """Group (config minus seed and optim.lr) -> lr -> its runs, lrs ascending."""
    keys = [k for k in summarize.varying_keys(flatten(s["config"]) for s in summaries) if k != "optim.lr"]
    series: dict[str, dict[float, list[dict[str, Any]]]] = {}
    for s, label in zip(summaries, group_labels(summaries, keys)):
        series.setdefault(label, {}).setdefault(float(s["config"]["optim"]["lr"]), []).append(s)
    return {label: dict(sorted(by_lr.items())) for label, by_lr in sorted(series.items())}


def largest_lr_that_trains(summaries: list[dict[str, Any]]) -> dict[str, float | None]:
    """Per group of runs that differ only in seed and optim.lr (e.g. per norm): the largest lr that trains.

    An lr trains when all its seeds completed (none diverged, failed or interrupted) and each one's
    final threshold metric reached the easiest threshold (the lowest accuracy threshold, e.g. final
    test accuracy >= 0.9; for a loss metric the highest loss threshold). None: no lr tried trains.
    """
    if not summaries:
        return {}
    metric = summaries[0].get("threshold_metric", "test_acc")
    threshold = easiest_threshold(
        metric, sorted({k for s in summaries for k in s["iterations_to_threshold"]}, key=float)
    )
    return {
        label: max((lr for lr, runs in by_lr.items() if trains(runs, metric, threshold)), default=None)
        for label, by_lr in lr_series(summaries).items()
    }


# ---------------------------------------------------------------- plotting helpers


def _figure(
    nrows: int = 1, ncols: int = 1, width: float = 9.0, height: float = 4.8, **kwargs: Any
) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(width, height), layout="constrained", dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, **kwargs)
    return fig, axes


def _legend(
    fig: Figure, handles: list[Any] | None = None, labels: list[str] | None = None, below: bool = False
) -> None:
    """One legend for the whole figure, outside the axes (never over the data): on the right, or `below` them."""
    if handles is None:
        handles, labels = [], []
        for ax in fig.axes:
            for h, label in zip(*ax.get_legend_handles_labels()):
                if label not in labels:
                    handles.append(h)
                    labels.append(label)
    if handles:
        if below:
            fig.legend(handles, labels, loc="outside lower center", ncols=len(handles), fontsize=8, frameon=False)
        else:
            fig.legend(handles, labels, loc="outside right upper", fontsize=8, frameon=False)


def _wrap(label: str) -> str:
    return label.replace(", ", "\n")


def _finite(values: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(values), values, np.nan)


def band(curves: list[Curve]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(steps, median, min, max) over the curves, at each step that at least half of them logged.

    A run that stopped early (diverged) leaves the median where fewer than half the runs go on, and
    a step only one run logged (its last evaluation before it diverged) makes no point of its own.
    """
    steps = np.unique(np.concatenate([c[0] for c in curves]))
    table = np.full((len(curves), len(steps)), np.nan)
    present = np.zeros(table.shape, dtype=bool)
    for i, (s, v) in enumerate(curves):
        table[i, np.searchsorted(steps, s)] = _finite(v)
        present[i, np.searchsorted(steps, s)] = True
    keep = 2 * present.sum(0) >= len(curves)
    table = table[:, keep]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a step where every value is NaN stays NaN
        return steps[keep], np.nanmedian(table, 0), np.nanmin(table, 0), np.nanmax(table, 0)


def _plot_band(ax: Axes, curves: list[Curve], colour: Any, label: str | None = None) -> bool:
    """The median line and the min-max band; a run with steps outside the band is also drawn on its own,
    thin (True if any was)."""
    steps, median, lo, hi = band(curves)
    ax.plot(steps, median, color=colour, lw=1.6, label=label)
    if len(curves) > 1:
        ax.fill_between(steps, lo, hi, color=colour, alpha=BAND_ALPHA, lw=0)
    apart = [(s, v) for s, v in curves if not np.isin(s, steps).all()]
    for s, v in apart:
        ax.plot(s, _finite(v), color=colour, lw=0.8, alpha=0.7)
    return bool(apart)


def _plot_groups(ax: Axes, sweep: Sweep, tag: str, window: Callable[[Run], int] = lambda run: 0) -> tuple[bool, bool]:
    """Per group, the median curve of `tag` over its seeds with a min-max band.

    Returns (whether any run logged the tag, whether some run was drawn on its own)."""
    drawn = apart = False
    for group, runs in sweep.groups.items():
        curves = [c for r in runs if (c := r.curve(tag, window(r))) is not None and len(c[0])]
        if curves:
            apart |= _plot_band(ax, curves, sweep.colours[group], group)
            drawn = True
    return drawn, apart


def _log_scale_if_wide(ax: Axes) -> None:
    """Log y when the plotted values are positive and span more than two decades."""
    values = np.concatenate([line.get_ydata() for line in ax.get_lines()] or [np.array([])]).astype(float)
    values = values[np.isfinite(values)]
    if len(values) and values.min() > 0 and values.max() / values.min() > 100:
        ax.set_yscale("log")


def _iterations(summary: dict[str, Any], k: str) -> int:
    """Iterations to threshold k, or the step budget (trainer.max_steps) for a run that never reached it."""
    reached = summary["iterations_to_threshold"].get(k)
    return reached if reached is not None else budget(summary)


def _threshold_text(sweep: Sweep, k: str) -> str:
    return f"{sweep.metric} {'≥' if sweep.higher_is_better else '≤'} {k}"


# ---------------------------------------------------------------- the figures


@dataclass
class Section:
    name: str  # PNG file name in the report folder
    title: str
    caption: str
    figure: Figure
    text: str = ""  # markdown after the figure


def _zoom(sweep: Sweep, curves: list[Curve]) -> tuple[float, float] | None:
    """y limits around the thresholds (accuracies: a little below the lowest to the top; losses: 0 to twice
    the highest), or None when they would show nearly all of the curves' range anyway."""
    values = [float(k) for k in sweep.thresholds]
    plotted = np.concatenate([_finite(v) for _, v in curves]) if curves else np.array([])
    if not values or not np.isfinite(plotted).any():
        return None
    low, high = float(np.nanmin(plotted)), float(np.nanmax(plotted))
    if sweep.higher_is_better:
        limits = (min(values) - max(0.05, max(values) - min(values)), max(high, max(values)) + 0.01)
    else:
        limits = (0.0, 2 * max(values))
    shown = min(limits[1], high) - max(limits[0], low)
    return limits if shown < 0.6 * (high - low) else None


def metric_curves(sweep: Sweep) -> Section | None:
    """1. The threshold metric over training, per group: median over seeds, min-max band, thresholds dotted;
    a second panel zooms on the thresholds."""
    tag = TAGS.get(sweep.metric)
    if tag is None:
        return None
    window = lambda run: (
        run.summary["config"].get("trainer", {}).get("eval_every", 1) if tag.startswith("train/") else 0
    )  # noqa: E731
    zoom = _zoom(
        sweep, [c for runs in sweep.groups.values() for r in runs if (c := r.curve(tag, window(r))) is not None]
    )
    fig, axes = _figure(1, 2 if zoom else 1, width=14.0 if zoom else 9.0, height=5.0)
    diverged = [
        (r, c)
        for runs in sweep.groups.values()
        for r in runs
        if r.summary["status"] == "diverged" and (c := r.curve(tag, window(r))) is not None and len(c[0])
    ]
    for ax in axes[0]:
        drawn, apart = _plot_groups(ax, sweep, tag, window)
        if not drawn:
            return None
        for run, (steps, values) in diverged:
            ax.plot(steps[-1], values[-1], "x", color=sweep.colours[run.group], ms=9, mew=2)
        for k in sweep.thresholds:
            ax.axhline(float(k), color="0.35", ls=":", lw=1.2)
        ax.set(xlabel=STEPS, ylabel=METRIC_LABELS[sweep.metric])
        ax.grid(alpha=0.3)
    name = METRIC_LABELS[sweep.metric].split(" (")[0]
    axes[0, 0].set_title(f"{name} vs iterations\n(median over seeds, band: min-max)")
    if zoom:
        axes[0, 1].set_ylim(*zoom)
        axes[0, 1].set_title("the same, zoomed on the thresholds")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    extras = [
        (
            bool(sweep.thresholds),
            Line2D([], [], color="0.35", ls=":", lw=1.2),
            f"thresholds: {', '.join(sweep.thresholds)}",
        ),
        (apart, Line2D([], [], color="0.3", lw=0.8, alpha=0.7), "one run, where it leaves\nthe median (stopped early)"),
        (bool(diverged), Line2D([], [], color="0.2", marker="x", ms=9, mew=2, ls="none"), "a run diverged here"),
    ]
    _legend(
        fig, handles + [h for shown, h, _ in extras if shown], labels + [label for shown, _, label in extras if shown]
    )
    return Section(
        "metric_curves.png",
        f"{sweep.metric} over training",
        f"{sweep.metric} vs iterations per group: median over seeds, shaded min-max (at the steps at least half the seeds "
        "reached); dotted: the thresholds; x: where a run diverged"
        + ("; right: zoomed on the thresholds" if zoom else "")
        + ("; training figures are means over the steps between evaluations." if tag.startswith("train/") else "."),
        fig,
    )


def iterations_to_threshold(sweep: Sweep) -> Section | None:
    """2. Iterations to each threshold per group: median bars, min-max error bars, never-reached runs hatched at the budget."""
    rows = [row for row in sweep.rows if row["group"] in sweep.groups]
    if not sweep.thresholds or not rows:
        return None
    fig, ((ax,),) = _figure(width=max(9.0, 2.0 + 0.45 * len(rows) * len(sweep.thresholds)))
    width = 0.8 / len(rows)
    top = 0
    for j, row in enumerate(rows):
        colour, runs = sweep.colours[row["group"]], sweep.groups[row["group"]]
        steps = max(r.max_steps for r in runs)
        for i, k in enumerate(sweep.thresholds):
            x = i - 0.4 + width * (j + 0.5)
            median, lo, hi, never = (row[f"iters_{k}_{s}"] for s in ("median", "min", "max", "never"))
            if never:
                ax.bar(x, steps, width, facecolor="none", edgecolor=colour, hatch="///", lw=1)
                ax.text(x, steps, f"{never}/{len(runs)}\nnever", ha="center", va="bottom", fontsize=7)
                top = max(top, steps)
            if median is not None:
                ax.bar(x, median, width, color=colour, label=row["group"])
                ax.errorbar(x, median, yerr=[[median - lo], [hi - median]], fmt="none", ecolor="black", capsize=3, lw=1)
                top = max(top, hi)
    ax.set_ylim(0, top * 1.18 or 1)
    ax.set_xlim(-0.5, len(sweep.thresholds) - 0.5)
    ax.set_xticks(range(len(sweep.thresholds)), [_threshold_text(sweep, k) for k in sweep.thresholds])
    ax.set(
        xlabel="threshold",
        ylabel=f"{STEPS}\nto reach the threshold",
        title="iterations to each threshold\n(median over seeds, error bars: min-max)",
    )
    ax.grid(axis="y", alpha=0.3)
    handles = [Patch(color=sweep.colours[row["group"]]) for row in rows]
    labels = [row["group"] for row in rows]
    if any(row[f"iters_{k}_never"] for row in rows for k in sweep.thresholds):
        handles.append(Patch(facecolor="none", edgecolor="0.3", hatch="///"))
        labels.append("never reached: drawn at the\nstep budget (trainer.max_steps)")
    _legend(fig, handles, labels)
    return Section(
        "iterations_to_threshold.png",
        "Iterations to each threshold",
        "Iterations to each threshold per group: bar = median over the seeds that reached it, error bar = min-max; "
        "hatched bar at the step budget with 'k/n never' = seeds that never reached it.",
        fig,
    )


def lr_sensitivity(sweep: Sweep) -> Section | None:
    """3. Final test accuracy and iterations to threshold vs learning rate, per group minus the lr."""
    if "optim.lr" not in sweep.varying or _batch_size_sweep(sweep):
        return None
    summaries = [r.summary for r in sweep.runs]
    series = lr_series(summaries)
    best = largest_lr_that_trains(summaries)
    colours = palette(list(series))
    threshold = easiest_threshold(sweep.metric, sweep.thresholds)
    styles = ["-", "--", ":", "-."]
    fig, ((ax_acc, ax_it),) = _figure(1, 2, width=13.0, height=5.0)
    max_steps = max((r.max_steps for r in sweep.runs), default=0)
    any_diverged = any_open = False
    for j, (label, by_lr) in enumerate(series.items()):
        colour = colours[label]
        lrs = np.array(list(by_lr))
        accs = [
            [a for s in runs if s["status"] in RESULTS and (a := _final(s, "test_acc")) is not None]
            for runs in by_lr.values()
        ]
        have = [i for i, a in enumerate(accs) if a]
        ax_acc.plot(lrs[have], [np.median(accs[i]) for i in have], "o-", color=colour, lw=1.6, label=label)
        ax_acc.fill_between(
            lrs[have], [min(accs[i]) for i in have], [max(accs[i]) for i in have], color=colour, alpha=BAND_ALPHA, lw=0
        )
        for lr, runs in by_lr.items():
            for s in runs:
                if s["status"] == "diverged":
                    any_diverged = True
                    ax_acc.plot(lr, _final(s, "test_acc") or 0.0, "x", color=colour, ms=10, mew=2.2)
        if best.get(label) is not None and accs[i := list(by_lr).index(best[label])]:
            ax_acc.plot(best[label], np.median(accs[i]), "o", ms=15, mfc="none", mec=colour, mew=2)
        jitter = 1.06 ** (j - (len(series) - 1) / 2)  # keeps the series' error bars apart
        for style, k in zip(styles * 3, sweep.thresholds):
            its = [[_iterations(s, k) for s in runs if s["status"] in RESULTS] for runs in by_lr.values()]
            nevers = [
                any(s["status"] in RESULTS and s["iterations_to_threshold"].get(k) is None for s in runs)
                for runs in by_lr.values()
            ]
            have = [i for i, v in enumerate(its) if v]
            if not have:
                continue
            x = lrs[have] * jitter
            median = np.array([np.median(its[i]) for i in have])
            err = [median - [min(its[i]) for i in have], [max(its[i]) for i in have] - median]
            ax_it.errorbar(x, median, yerr=err, color=colour, ls=style, lw=1.4, capsize=3)
            closed = [n for n, i in enumerate(have) if not nevers[i]]
            opened = [n for n, i in enumerate(have) if nevers[i]]
            any_open |= bool(opened)
            ax_it.plot(x[closed], median[closed], "o", color=colour, ms=6)
            ax_it.plot(x[opened], median[opened], "o", mfc="white", mec=colour, mew=1.6, ms=7)
    if threshold is not None and sweep.metric == "test_acc":
        ax_acc.axhline(threshold, color="0.35", ls=":", lw=1.2)
    if max_steps:
        ax_it.axhline(max_steps, color="0.35", ls="--", lw=1)
    all_lrs = sorted({lr for by_lr in series.values() for lr in by_lr})
    for ax in (ax_acc, ax_it):
        ax.set_xscale("log")
        ax.set_xticks(all_lrs, [f"{lr:g}" for lr in all_lrs])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.set_xlabel("learning rate (optim.lr, log scale)")
    _log_scale_if_wide(ax_it)
    ax_acc.set(
        ylabel="final test accuracy", title="final test accuracy vs learning rate\n(median over seeds, band: min-max)"
    )
    ax_it.set(
        ylabel=f"{STEPS} to reach the threshold",
        title="iterations to each threshold vs learning rate\n(median over seeds, error bars: min-max)",
    )
    handles = [Line2D([], [], color=colours[label], marker="o", lw=1.6) for label in series]
    labels = list(series)
    handles += [Line2D([], [], color="0.3", ls=style) for style, _ in zip(styles * 3, sweep.thresholds)]
    labels += [_threshold_text(sweep, k) for k in sweep.thresholds]
    extras = [
        (True, Line2D([], [], color="0.3", marker="o", ms=13, mfc="none", mew=2, ls="none"), "largest lr that trains"),
        (
            any_diverged,
            Line2D([], [], color="0.3", marker="x", ms=9, mew=2.2, ls="none"),
            "diverged run (its final test acc)",
        ),
        (
            any_open,
            Line2D([], [], color="0.3", marker="o", mfc="white", ls="none"),
            "some seeds never reached it\n(counted at the step budget)",
        ),
        (
            threshold is not None and sweep.metric == "test_acc",
            Line2D([], [], color="0.35", ls=":"),
            f"lowest threshold ({threshold:g})" if threshold is not None else "",
        ),
        (bool(max_steps), Line2D([], [], color="0.35", ls="--", lw=1), "step budget"),
    ]
    for shown, handle, label in extras:
        if shown:
            handles.append(handle)
            labels.append(label)
    _legend(fig, handles, labels)
    criterion = (
        " (no threshold was set)"
        if threshold is None
        else (
            f" and each ended with final {sweep.metric} {'≥' if sweep.higher_is_better else '≤'} {threshold:g} "
            f"(the {'lowest' if sweep.higher_is_better else 'highest'} threshold)"
        )
    )
    lines = [
        f"Largest learning rate that still trains, per group: all its seeds completed (none diverged, failed or interrupted){criterion}.",
        "",
        *(
            f"- {label}: "
            + (f"**{lr:g}**" if lr is not None else "none")
            + f" (tried: {', '.join(f'{x:g}' for x in series[label])})"
            for label, lr in best.items()
        ),
    ]
    return Section(
        "lr_sensitivity.png",
        "Learning-rate sensitivity",
        "Left: final test accuracy vs learning rate (median over seeds, shaded min-max; x: diverged runs; ring: the largest lr that trains). "
        "Right: iterations to each threshold vs learning rate (open markers: some seeds never reached it and count at the step budget).",
        fig,
        "\n".join(lines) + "\n",
    )


def _batch_size_sweep(sweep: Sweep) -> list[str]:
    """The keys a batch-size sweep sets with the batch size (itself first), or [] if the batch size does not vary."""
    if "data.batch_size" not in sweep.varying:
        return []
    summaries = [r.summary for r in sweep.runs]
    return [
        "data.batch_size",
        *(k for k in sweep.varying if k != "data.batch_size" and follows(summaries, k, "data.batch_size")),
    ]


def batch_size_sensitivity(sweep: Sweep) -> Section | None:
    """4. Final test accuracy vs batch size, per group minus the batch size and what the sweep scaled with it."""
    driven = _batch_size_sweep(sweep)
    if not driven:
        return None
    summaries = [r.summary for r in sweep.runs if r.summary["status"] in RESULTS]
    keys = [k for k in sweep.varying if k not in driven]
    series: dict[str, dict[int, list[float]]] = {}
    for s, label in zip(summaries, group_labels(summaries, keys)):
        if (acc := _final(s, "test_acc")) is not None:
            series.setdefault(label, {}).setdefault(int(s["config"]["data"]["batch_size"]), []).append(acc)
    colours = palette(sorted(series))
    fig, ((ax,),) = _figure(1, 1, width=8.0, height=5.0)
    for label, by_size in sorted(series.items()):
        sizes = sorted(by_size)
        ax.plot(sizes, [np.median(by_size[b]) for b in sizes], "o-", color=colours[label], lw=1.6, label=label)
        ax.fill_between(
            sizes,
            [min(by_size[b]) for b in sizes],
            [max(by_size[b]) for b in sizes],
            color=colours[label],
            alpha=BAND_ALPHA,
            lw=0,
        )
    all_sizes = sorted({b for by_size in series.values() for b in by_size})
    ax.set_xscale("log", base=2)
    ax.set_xticks(all_sizes, [str(b) for b in all_sizes])
    ax.minorticks_off()
    ax.grid(alpha=0.3)
    ax.set(
        xlabel="batch size (data.batch_size, log scale)",
        ylabel="final test accuracy",
        title="final test accuracy vs batch size\n(median over seeds, band: min-max)",
    )
    _legend(fig)
    scaled = f" The sweep set {', '.join(driven[1:])} with the batch size." if driven[1:] else ""
    return Section(
        "batch_size.png",
        "Batch-size sensitivity",
        f"Final test accuracy vs batch size per group (median over seeds, shaded min-max).{scaled}",
        fig,
    )


def activation_percentiles(sweep: Sweep) -> Section | None:
    """4. The 15/50/85th percentiles of one tracked unit's nonlinearity input over training (Ioffe & Szegedy Fig. 1b,c)."""
    tags = {tag for runs in sweep.groups.values() for r in runs for tag in r.scalars}
    layers = sorted({int(m.group(1)) for tag in tags if (m := ACT_TAG.match(tag))}, key=lambda i: (i < 0, i))
    if not layers:
        return None
    groups = list(sweep.groups)
    fig, axes = _figure(
        len(layers),
        len(groups),
        width=max(6.5, 1.5 + 3.2 * len(groups)),
        height=1.2 + 2.8 * len(layers),
        sharex=True,
        sharey=True,
    )
    for row, layer in enumerate(layers):
        for col, group in enumerate(groups):
            ax, colour = axes[row, col], sweep.colours[group]
            name = f"act/{layer}/unit0/p"
            runs = sorted(
                (r for r in sweep.groups[group] if all(f"{name}{q}" in r.scalars for q in (15, 50, 85))),
                key=lambda r: str(r.seed),
            )
            if runs:
                run = runs[0]
                (steps, p15), (_, p50), (_, p85) = (run.curve(f"{name}{q}") for q in (15, 50, 85))
                ax.fill_between(steps, p15, p85, color=colour, alpha=BAND_ALPHA, lw=0)
                ax.plot(steps, p50, color=colour, lw=1.8)
                ax.plot(steps, p15, color=colour, lw=0.9, ls="--")
                ax.plot(steps, p85, color=colour, lw=0.9, ls="--")
                ax.set_title(f"{_wrap(group)}\n(seed {run.seed})" if row == 0 else f"seed {run.seed}", fontsize=9)
            else:
                ax.text(0.5, 0.5, "not logged", transform=ax.transAxes, ha="center", color="0.4")
                ax.set_title(_wrap(group) if row == 0 else "", fontsize=9)
            ax.grid(alpha=0.3)
            if col == 0:
                ax.set_ylabel(
                    f"layer {layer}{' (last hidden)' if layer == -1 else ''}:\ninput to the nonlinearity, unit 0"
                )
            if row == len(layers) - 1:
                ax.set_xlabel(STEPS)
    fig.suptitle(
        "percentiles of one unit's input to its nonlinearity over training\n(on a probe batch of test examples, eval mode)"
    )
    _legend(
        fig,
        [
            Line2D([], [], color="0.2", lw=1.8),
            Line2D([], [], color="0.2", lw=0.9, ls="--"),
            Patch(color="0.2", alpha=BAND_ALPHA),
        ],
        ["50th percentile", "15th and 85th percentiles", "15-85th percentile range"],
        below=True,
    )
    return Section(
        "activation_percentiles.png",
        "Activation percentiles",
        "15th, 50th and 85th percentiles of unit 0's input to its nonlinearity over training, one panel per group and "
        "tracked layer (the group's lowest seed), shared axes (Ioffe & Szegedy 2015, Fig. 1b,c).",
        fig,
    )


def _curves_grid(sweep: Sweep, panels: list[list[tuple[str, str, str]]], title: str) -> Figure | None:
    """Rows x columns of panels (tag, title, y label), each with every group's median curve and band; None if nothing logged."""
    nrows, ncols = len(panels), max(len(row) for row in panels)
    fig, axes = _figure(nrows, ncols, width=2.0 + 3.6 * ncols, height=0.8 + 3.0 * nrows, sharex=True)
    drawn = False
    for i, row in enumerate(panels):
        for j in range(ncols):
            ax = axes[i, j]
            if j >= len(row):
                ax.set_visible(False)
                continue
            tag, panel_title, ylabel = row[j]
            drawn |= _plot_groups(ax, sweep, tag)[0]
            _log_scale_if_wide(ax)
            ax.set_title(panel_title, fontsize=10)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if i == nrows - 1:
                ax.set_xlabel(STEPS)
    if not drawn:
        return None
    fig.suptitle(title)
    _legend(fig)
    return fig


def internal_covariate_shift(sweep: Sweep) -> Section | None:
    """5a. ICS per layer, ||G - G'||_2 and cos(G, G') over training (Santurkar et al. 2018)."""
    tags = {tag for runs in sweep.groups.values() for r in runs for tag in r.scalars}
    layers = sorted({int(m.group(1)) for tag in tags if (m := ICS_TAG.match(tag))})
    # layer 0 has no layer before it, so its G' = G: (0, 1) always; a layer that shows nothing is left out
    layers = [
        i
        for i in layers
        if any(
            np.any(r.scalars[f"ics/layer{i}/l2"][1] != 0)
            for runs in sweep.groups.values()
            for r in runs
            if f"ics/layer{i}/l2" in r.scalars
        )
    ]
    if not layers:
        return None
    panels = [
        [(f"ics/layer{i}/l2", f"layer {i}", "ICS $\\|G - G'\\|_2$") for i in layers],
        [(f"ics/layer{i}/cos", f"layer {i}", "ICS $\\cos(G, G')$") for i in layers],
    ]
    fig = _curves_grid(sweep, panels, "internal covariate shift per layer\n(median over seeds, band: min-max)")
    if fig is None:
        return None
    return Section(
        "ics.png",
        "Internal covariate shift",
        "Internal covariate shift per layer over training (Santurkar et al. 2018): top, ||G - G'||_2; bottom, cos(G, G') "
        "(G: the layer's weight gradient; G': the same after the earlier layers' update); median over seeds, shaded min-max. "
        "Layers whose shift is always 0 (layer 0) are left out.",
        fig,
    )


def landscape(sweep: Sweep) -> Section | None:
    """5b. Loss-landscape smoothness along the gradient over training (Santurkar et al. 2018)."""
    fig = _curves_grid(
        sweep,
        [list(LANDSCAPE)],
        "loss landscape along the gradient, step sizes 0.5-4 x lr\n(median over seeds, band: min-max)",
    )
    if fig is None:
        return None
    return Section(
        "landscape.png",
        "Loss-landscape smoothness",
        "Loss variation, gradient predictiveness and effective beta-smoothness along the gradient over training "
        "(Santurkar et al. 2018; smaller is smoother); median over seeds, shaded min-max.",
        fig,
    )


def train_eval_precise_bn(sweep: Sweep) -> Section | None:
    """6. Test accuracy in train mode, in eval mode (running averages) and after precise BN, per group."""
    if not any(
        k in r.summary.get("final", {})
        for runs in sweep.groups.values()
        for r in runs
        for k in ("test_acc_train_mode", "test_acc_precise_bn")
    ):
        return None
    groups = list(sweep.groups)
    fig, ((ax,),) = _figure(width=max(9.0, 2.5 + 0.5 * len(groups) * len(ACC_MODES)))
    width = 0.8 / len(groups)
    for j, group in enumerate(groups):
        for i, (key, _) in enumerate(ACC_MODES):
            x = i - 0.4 + width * (j + 0.5)
            values = [v for r in sweep.groups[group] if (v := _final(r.summary, key)) is not None]
            if not values:
                ax.text(x, 0.01, "n/a", ha="center", va="bottom", fontsize=7, rotation=90, color="0.4")
                continue
            mean = float(np.mean(values))
            ax.bar(x, mean, width, color=sweep.colours[group])
            ax.errorbar(
                x, mean, yerr=[[mean - min(values)], [max(values) - mean]], fmt="none", ecolor="black", capsize=3, lw=1
            )
            ax.text(
                x,
                max(values) + 0.01,
                f"{mean:.3f}",
                ha="center",
                va="bottom",
                fontsize=7,
                rotation=90 if len(groups) > 3 else 0,
            )
    ax.set_ylim(0, 1.12)
    ax.set_xlim(-0.5, len(ACC_MODES) - 0.5)
    ax.set_xticks(range(len(ACC_MODES)), [label for _, label in ACC_MODES])
    ax.set(
        ylabel="test accuracy",
        title="test accuracy by where the norm layers take their statistics from\n(mean over seeds, error bars: min-max)",
    )
    ax.grid(axis="y", alpha=0.3)
    _legend(fig, [Patch(color=sweep.colours[g]) for g in groups], groups)
    return Section(
        "precise_bn.png",
        "Train mode, eval mode and precise BN",
        "Final test accuracy in train mode (batch statistics: the forgotten model.eval()), in eval mode with the running "
        "averages (EMA) and in eval mode after precise BN; mean over seeds, error bars min-max; n/a: not measured.",
        fig,
    )


FIGURES: tuple[Callable[[Sweep], Section | None], ...] = (
    metric_curves,
    iterations_to_threshold,
    lr_sensitivity,
    batch_size_sensitivity,
    activation_percentiles,
    internal_covariate_shift,
    landscape,
    train_eval_precise_bn,
)
FIGURE_FILES = (
    "metric_curves.png",
    "iterations_to_threshold.png",
    "lr_sensitivity.png",
    "batch_size.png",
    "activation_percentiles.png",
    "ics.png",
    "landscape.png",
    "precise_bn.png",
)


# ---------------------------------------------------------------- the report


def write_report(root: Path) -> Path:
    """Read every run below `root`, write the figures that have data and report.md into `root`; return report.md's path.

    Figures of an earlier report that have no data now are removed, so report.md and the folder agree.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    sweep = load_sweep(root)
    path = root / REPORT
    if not sweep.runs:
        write_text(path, f"# bnlab report: {root}\n\nNo runs (summary.json files) below {root}.\n")
        return path
    counts = ", ".join(
        f"{n} {status}"
        for status in summarize.STATUSES
        if (n := sum(r.summary["status"] == status for r in sweep.runs))
    )
    parts = [
        f"# bnlab report: {root}\n",
        f"{len(sweep.runs)} runs ({counts}) in {len(sweep.rows)} groups (config minus the seed); threshold metric: {sweep.metric}. "
        "Curves and bars: median over seeds, band or error bars min-max, unless a caption says otherwise.\n",
        "## Sweep table\n",
        f"Iterations to reach each {sweep.metric} threshold, median (min-max) over seeds, with the speed-up over the "
        "norm=none twin; final test accuracy mean±std.\n",
        summarize.markdown(sweep.rows, sweep.metric),
    ]
    written = set()
    for make in FIGURES:
        section = make(sweep)
        if section is None:
            continue
        section.figure.savefig(root / section.name, dpi=DPI)
        written.add(section.name)
        parts += [f"## {section.title}\n", f"![{section.title}]({section.name})\n", f"*{section.caption}*\n"]
        if section.text:
            parts.append(section.text)
    for name in set(FIGURE_FILES) - written:
        (root / name).unlink(missing_ok=True)
    write_text(path, "\n".join(parts))
    return path
