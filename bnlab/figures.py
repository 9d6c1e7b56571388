"""The report's figures, each a function of the analysed sweep (bnlab.analysis) that returns its `Section`
(title, caption, the matplotlib figure, text) or None when no run logged what it needs; `FIGURES` names
each figure's PNG file once. Medians over seeds with min-max bands or error bars; each group keeps its
colour in every figure."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from bnlab.analysis import (
    Curve,
    RunResult,
    Sweep,
    batch_size_keys,
    easiest_threshold,
    group_runs,
    largest_lr_that_trains,
    lr_series,
)
from bnlab.metrics import METRICS, higher_is_better
from bnlab.summary import Status, Summary

DPI = 120
BAND_ALPHA = 0.2
STEPS = "iterations (optimizer steps)"
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


@dataclass
class Section:
    """A figure of the report with its markdown."""

    title: str
    caption: str
    figure: Figure
    text: str = ""  # markdown after the figure


def palette(labels: list[str]) -> dict[str, Any]:
    """One distinct colour per label, in order."""
    if len(labels) <= 10:
        colours = colormaps["tab10"].colors
    elif len(labels) <= 20:
        colours = colormaps["tab20"].colors
    else:
        colours = colormaps["viridis"](np.linspace(0, 0.95, len(labels)))
    return {label: colours[i] for i, label in enumerate(labels)}


def colours(sweep: Sweep) -> dict[str, Any]:
    """Group label -> its colour, the same in every figure of the sweep."""
    return palette([g.label for g in sweep.groups])


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


def _plot_groups(
    ax: Axes, sweep: Sweep, tag: str, window: Callable[[RunResult], int] = lambda run: 0
) -> tuple[bool, bool]:
    """Per group, the median curve of `tag` over its seeds with a min-max band.

    Returns (whether any run logged the tag, whether some run was drawn on its own)."""
    drawn = apart = False
    for group, runs in sweep.counted.items():
        curves = [c for r in runs if (c := r.curve(tag, window(r))) is not None and len(c[0])]
        if curves:
            apart |= _plot_band(ax, curves, colours(sweep)[group], group)
            drawn = True
    return drawn, apart


def _log_scale_if_wide(ax: Axes) -> None:
    """Log y when the plotted values are positive and span more than two decades."""
    values = np.concatenate([line.get_ydata() for line in ax.get_lines()] or [np.array([])]).astype(float)
    values = values[np.isfinite(values)]
    if len(values) and values.min() > 0 and values.max() / values.min() > 100:
        ax.set_yscale("log")


def _iterations(summary: Summary, t: float) -> int:
    """Iterations to threshold t, or the step budget (trainer.max_steps) for a run that never reached it."""
    reached = summary.iterations_to_threshold.get(t)
    return reached if reached is not None else summary.max_steps


def _threshold_text(sweep: Sweep, t: float) -> str:
    return f"{sweep.metric} {'≥' if higher_is_better(sweep.metric) else '≤'} {t:g}"


# ---------------------------------------------------------------- the figures


def _zoom(sweep: Sweep, curves: list[Curve]) -> tuple[float, float] | None:
    """y limits around the thresholds (accuracies: a little below the lowest to the top; losses: 0 to twice
    the highest), or None when they would show nearly all of the curves' range anyway."""
    values = sweep.thresholds
    plotted = np.concatenate([_finite(v) for _, v in curves]) if curves else np.array([])
    if not values or not np.isfinite(plotted).any():
        return None
    low, high = float(np.nanmin(plotted)), float(np.nanmax(plotted))
    if higher_is_better(sweep.metric):
        limits = (min(values) - max(0.05, max(values) - min(values)), max(high, max(values)) + 0.01)
    else:
        limits = (0.0, 2 * max(values))
    shown = min(limits[1], high) - max(limits[0], low)
    return limits if shown < 0.6 * (high - low) else None


def metric_curves(sweep: Sweep) -> Section | None:
    """1. The threshold metric over training, per group: median over seeds, min-max band, thresholds dotted;
    a second panel zooms on the thresholds."""
    tag = METRICS[sweep.metric].tag
    if tag is None:
        return None

    def window(run: RunResult) -> int:
        """Training curves are averaged over each evaluation interval (so they read like the test curves)."""
        return run.summary.config.get("trainer", {}).get("eval_every", 1) if tag.startswith("train/") else 0

    zoom = _zoom(
        sweep, [c for runs in sweep.counted.values() for r in runs if (c := r.curve(tag, window(r))) is not None]
    )
    fig, axes = _figure(1, 2 if zoom else 1, width=14.0 if zoom else 9.0, height=5.0)
    diverged = [
        (r, c)
        for runs in sweep.counted.values()
        for r in runs
        if r.summary.status == Status.DIVERGED and (c := r.curve(tag, window(r))) is not None and len(c[0])
    ]
    for ax in axes[0]:
        drawn, apart = _plot_groups(ax, sweep, tag, window)
        if not drawn:
            return None
        for run, (steps, values) in diverged:
            ax.plot(steps[-1], values[-1], "x", color=colours(sweep)[run.group], ms=9, mew=2)
        for k in sweep.thresholds:
            ax.axhline(k, color="0.35", ls=":", lw=1.2)
        ax.set(xlabel=STEPS, ylabel=METRICS[sweep.metric].label)
        ax.grid(alpha=0.3)
    name = METRICS[sweep.metric].label.split(" (")[0]
    axes[0, 0].set_title(f"{name} vs iterations\n(median over seeds, band: min-max)")
    if zoom:
        axes[0, 1].set_ylim(*zoom)
        axes[0, 1].set_title("the same, zoomed on the thresholds")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    extras = [
        (
            bool(sweep.thresholds),
            Line2D([], [], color="0.35", ls=":", lw=1.2),
            f"thresholds: {', '.join(f'{t:g}' for t in sweep.thresholds)}",
        ),
        (apart, Line2D([], [], color="0.3", lw=0.8, alpha=0.7), "one run, where it leaves\nthe median (stopped early)"),
        (bool(diverged), Line2D([], [], color="0.2", marker="x", ms=9, mew=2, ls="none"), "a run diverged here"),
    ]
    _legend(
        fig, handles + [h for shown, h, _ in extras if shown], labels + [label for shown, _, label in extras if shown]
    )
    return Section(
        f"{sweep.metric} over training",
        f"{sweep.metric} vs iterations per group: median over seeds, shaded min-max (at the steps at least half "
        "the seeds "
        "reached); dotted: the thresholds; x: where a run diverged"
        + ("; right: zoomed on the thresholds" if zoom else "")
        + ("; training figures are means over the steps between evaluations." if tag.startswith("train/") else "."),
        fig,
    )


def iterations_to_threshold(sweep: Sweep) -> Section | None:
    """2. Iterations to each threshold per group: median bars, min-max error bars, never-reached runs hatched
    at the budget."""
    groups = [g for g in sweep.groups if g.results]
    if not sweep.thresholds or not groups:
        return None
    fig, ((ax,),) = _figure(width=max(9.0, 2.0 + 0.45 * len(groups) * len(sweep.thresholds)))
    width = 0.8 / len(groups)
    top = 0
    for j, group in enumerate(groups):
        colour, runs = colours(sweep)[group.label], group.results
        steps = max(r.summary.max_steps for r in runs)
        for i, t in enumerate(sweep.thresholds):
            x = i - 0.4 + width * (j + 0.5)
            stats = group.thresholds[t]
            never = stats.never
            if never:
                ax.bar(x, steps, width, facecolor="none", edgecolor=colour, hatch="///", lw=1)
                ax.text(x, steps, f"{never}/{len(runs)}\nnever", ha="center", va="bottom", fontsize=7)
                top = max(top, steps)
            if stats.iterations is not None:
                median, lo, hi = stats.iterations
                ax.bar(x, median, width, color=colour, label=group.label)
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
    handles = [Patch(color=colours(sweep)[g.label]) for g in groups]
    labels = [g.label for g in groups]
    if any(g.thresholds[t].never for g in groups for t in sweep.thresholds):
        handles.append(Patch(facecolor="none", edgecolor="0.3", hatch="///"))
        labels.append("never reached: drawn at the\nstep budget (trainer.max_steps)")
    _legend(fig, handles, labels)
    return Section(
        "Iterations to each threshold",
        "Iterations to each threshold per group: bar = median over the seeds that reached it, error bar = min-max; "
        "hatched bar at the step budget with 'k/n never' = seeds that never reached it.",
        fig,
    )


def lr_sensitivity(sweep: Sweep) -> Section | None:
    """3. Final test accuracy and iterations to threshold vs learning rate, per group minus the lr."""
    if "optim.lr" not in sweep.varying or batch_size_keys(sweep):
        return None
    series = lr_series(sweep.runs)
    best = largest_lr_that_trains(sweep.runs)
    tints = palette(list(series))
    threshold = easiest_threshold(sweep.metric, sweep.thresholds)
    styles = ["-", "--", ":", "-."]
    fig, ((ax_acc, ax_it),) = _figure(1, 2, width=13.0, height=5.0)
    max_steps = max((r.summary.max_steps for r in sweep.runs), default=0)
    any_diverged = any_open = False
    for j, (label, by_lr) in enumerate(series.items()):
        colour = tints[label]
        lrs = np.array(list(by_lr))
        accs = [
            [a for s in runs if s.status.counts and (a := s.final.get("test_acc")) is not None]
            for runs in by_lr.values()
        ]
        have = [i for i, a in enumerate(accs) if a]
        ax_acc.plot(lrs[have], [np.median(accs[i]) for i in have], "o-", color=colour, lw=1.6, label=label)
        ax_acc.fill_between(
            lrs[have], [min(accs[i]) for i in have], [max(accs[i]) for i in have], color=colour, alpha=BAND_ALPHA, lw=0
        )
        for lr, runs in by_lr.items():
            for s in runs:
                if s.status == Status.DIVERGED:
                    any_diverged = True
                    ax_acc.plot(lr, s.final.get("test_acc") or 0.0, "x", color=colour, ms=10, mew=2.2)
        if best.get(label) is not None and accs[i := list(by_lr).index(best[label])]:
            ax_acc.plot(best[label], np.median(accs[i]), "o", ms=15, mfc="none", mec=colour, mew=2)
        jitter = 1.06 ** (j - (len(series) - 1) / 2)  # keeps the series' error bars apart
        for style, k in zip(styles * 3, sweep.thresholds):
            its = [[_iterations(s, k) for s in runs if s.status.counts] for runs in by_lr.values()]
            nevers = [
                any(s.status.counts and s.iterations_to_threshold.get(k) is None for s in runs)
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
    handles = [Line2D([], [], color=tints[label], marker="o", lw=1.6) for label in series]
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
    higher = higher_is_better(sweep.metric)
    criterion = (
        " (no threshold was set)"
        if threshold is None
        else (
            f" and each ended with final {sweep.metric} {'≥' if higher else '≤'} {threshold:g} "
            f"(the {'lowest' if higher else 'highest'} threshold)"
        )
    )
    lines = [
        "Largest learning rate that still trains, per group: all its seeds completed "
        f"(none diverged, failed or interrupted){criterion}.",
        "",
        *(
            f"- {label}: "
            + (f"**{lr:g}**" if lr is not None else "none")
            + f" (tried: {', '.join(f'{x:g}' for x in series[label])})"
            for label, lr in best.items()
        ),
    ]
    return Section(
        "Learning-rate sensitivity",
        "Left: final test accuracy vs learning rate (median over seeds, shaded min-max; x: diverged runs; ring: the "
        "largest lr that trains). Right: iterations to each threshold vs learning rate (open markers: some seeds "
        "never reached it and count at the step budget).",
        fig,
        "\n".join(lines) + "\n",
    )


def batch_size_sensitivity(sweep: Sweep) -> Section | None:
    """4. Final test accuracy vs batch size, per group minus the batch size and what the sweep scaled with it."""
    driven = batch_size_keys(sweep)
    if not driven:
        return None
    keys = [k for k in sweep.varying if k not in driven]
    series: dict[str, dict[int, list[float]]] = {}
    for group in group_runs([RunResult(r.dir, r.summary) for r in sweep.runs], keys):
        for r in group.results:
            if (acc := r.summary.final.get("test_acc")) is not None:
                series.setdefault(group.label, {}).setdefault(r.summary.batch_size, []).append(acc)
    tints = palette(sorted(series))
    fig, ((ax,),) = _figure(1, 1, width=8.0, height=5.0)
    for label, by_size in sorted(series.items()):
        sizes = sorted(by_size)
        ax.plot(sizes, [np.median(by_size[b]) for b in sizes], "o-", color=tints[label], lw=1.6, label=label)
        ax.fill_between(
            sizes,
            [min(by_size[b]) for b in sizes],
            [max(by_size[b]) for b in sizes],
            color=tints[label],
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
        "Batch-size sensitivity",
        f"Final test accuracy vs batch size per group (median over seeds, shaded min-max).{scaled}",
        fig,
    )


def activation_percentiles(sweep: Sweep) -> Section | None:
    """4. The 15/50/85th percentiles of one tracked unit's nonlinearity input over training (Ioffe & Szegedy
    Fig. 1b,c)."""
    tags = {tag for runs in sweep.counted.values() for r in runs for tag in r.scalars}
    layers = sorted({int(m.group(1)) for tag in tags if (m := ACT_TAG.match(tag))}, key=lambda i: (i < 0, i))
    if not layers:
        return None
    groups = list(sweep.counted)
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
            ax, colour = axes[row, col], colours(sweep)[group]
            name = f"act/{layer}/unit0/p"
            runs = sorted(
                (r for r in sweep.counted[group] if all(f"{name}{q}" in r.scalars for q in (15, 50, 85))),
                key=lambda r: str(r.summary.seed),
            )
            if runs:
                run = runs[0]
                (steps, p15), (_, p50), (_, p85) = (run.curve(f"{name}{q}") for q in (15, 50, 85))
                ax.fill_between(steps, p15, p85, color=colour, alpha=BAND_ALPHA, lw=0)
                ax.plot(steps, p50, color=colour, lw=1.8)
                ax.plot(steps, p15, color=colour, lw=0.9, ls="--")
                ax.plot(steps, p85, color=colour, lw=0.9, ls="--")
                ax.set_title(
                    f"{_wrap(group)}\n(seed {run.summary.seed})" if row == 0 else f"seed {run.summary.seed}", fontsize=9
                )
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
        "percentiles of one unit's input to its nonlinearity over training\n"
        "(on a probe batch of test examples, eval mode)"
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
        "Activation percentiles",
        "15th, 50th and 85th percentiles of unit 0's input to its nonlinearity over training, one panel per group and "
        "tracked layer (the group's lowest seed), shared axes (Ioffe & Szegedy 2015, Fig. 1b,c).",
        fig,
    )


def _curves_grid(sweep: Sweep, panels: list[list[tuple[str, str, str]]], title: str) -> Figure | None:
    """Rows x columns of panels (tag, title, y label), each with every group's median curve and band; None if
    nothing logged."""
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
    tags = {tag for runs in sweep.counted.values() for r in runs for tag in r.scalars}
    layers = sorted({int(m.group(1)) for tag in tags if (m := ICS_TAG.match(tag))})
    # layer 0 has no layer before it, so its G' = G: (0, 1) always; a layer that shows nothing is left out
    layers = [
        i
        for i in layers
        if any(
            np.any(r.scalars[f"ics/layer{i}/l2"][1] != 0)
            for runs in sweep.counted.values()
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
        "Internal covariate shift",
        "Internal covariate shift per layer over training (Santurkar et al. 2018): top, ||G - G'||_2; bottom, "
        "cos(G, G') (G: the layer's weight gradient; G': the same after the earlier layers' update); median over "
        "seeds, shaded min-max. "
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
        "Loss-landscape smoothness",
        "Loss variation, gradient predictiveness and effective beta-smoothness along the gradient over training "
        "(Santurkar et al. 2018; smaller is smoother); median over seeds, shaded min-max.",
        fig,
    )


def train_eval_precise_bn(sweep: Sweep) -> Section | None:
    """6. Test accuracy in train mode, in eval mode (running averages) and after precise BN, per group."""
    if not any(
        k in r.summary.final
        for runs in sweep.counted.values()
        for r in runs
        for k in ("test_acc_train_mode", "test_acc_precise_bn")
    ):
        return None
    groups = list(sweep.counted)
    fig, ((ax,),) = _figure(width=max(9.0, 2.5 + 0.5 * len(groups) * len(ACC_MODES)))
    width = 0.8 / len(groups)
    for j, group in enumerate(groups):
        for i, (key, _) in enumerate(ACC_MODES):
            x = i - 0.4 + width * (j + 0.5)
            values = [v for r in sweep.counted[group] if (v := r.summary.final.get(key)) is not None]
            if not values:
                ax.text(x, 0.01, "n/a", ha="center", va="bottom", fontsize=7, rotation=90, color="0.4")
                continue
            mean = float(np.mean(values))
            ax.bar(x, mean, width, color=colours(sweep)[group])
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
        title="test accuracy by where the norm layers take their statistics from\n"
        "(mean over seeds, error bars: min-max)",
    )
    ax.grid(axis="y", alpha=0.3)
    _legend(fig, [Patch(color=colours(sweep)[g]) for g in groups], groups)
    return Section(
        "Train mode, eval mode and precise BN",
        "Final test accuracy in train mode (batch statistics: the forgotten model.eval()), in eval mode with the "
        "running "
        "averages (EMA) and in eval mode after precise BN; mean over seeds, error bars min-max; n/a: not measured.",
        fig,
    )


FIGURES: dict[str, Callable[[Sweep], Section | None]] = {  # PNG file name -> the figure, in report order
    "metric_curves.png": metric_curves,
    "iterations_to_threshold.png": iterations_to_threshold,
    "lr_sensitivity.png": lr_sensitivity,
    "batch_size.png": batch_size_sensitivity,
    "activation_percentiles.png": activation_percentiles,
    "ics.png": internal_covariate_shift,
    "landscape.png": landscape,
    "precise_bn.png": train_eval_precise_bn,
}
