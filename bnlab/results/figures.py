"""The report's figures, each a function of the analysed sweep (bnlab.results.analysis) that returns its `Section`
(title, caption, the matplotlib figure, markdown after it) or None when no run logged what it needs;
`FIGURES` names each figure's PNG file once. And the claims ledger's figure of one claim (`claim`).

Every figure draws a group with the same look (`Looks`): its norm's colour (norm=none dark grey), its
learning rate's line style (bars: its hatch), and a marker for whatever else varies; every legend
entry names one group. Medians over seeds, with min-max bands or error bars.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter

from bnlab.record.summary import Summary
from bnlab.record.tuning import COMPLETE, PRUNED, Tuning
from bnlab.results import analysis
from bnlab.results.analysis import (
    Curve,
    Edge,
    RunGroup,
    RunResult,
    Sweep,
    band,
    batch_size_keys,
    easiest_threshold,
    group_runs,
    largest_lr_that_trains,
    lr_series,
    over_training,
    training_edges,
)
from bnlab.results.claims import Verdict
from bnlab.results.summarize import fmt_iters, fmt_mean_std, fmt_ratio, fmt_spread
from bnlab.results.verdict import LOWER, UPPER
from bnlab.schema import tags
from bnlab.schema.claims import FAILS, HOLDS, MIXED
from bnlab.schema.config import LANDSCAPE_STEPS, NO_NORM
from bnlab.schema.metrics import METRICS, higher_is_better

DPI = 120
BAND_ALPHA = 0.2
STEPS = "iterations (optimizer steps)"
NONE_COLOUR = "0.25"  # norm=none, the baseline
DASHES = ["-", "--", ":", "-."]  # per learning rate, ascending
HATCHES = ["", "//", "..", "xx", "\\\\"]  # per learning rate, on bars
MARKERS = ["o", "s", "^", "D", "v", "P", "X"]  # per value of what else varies
MAX_ICS_LAYERS = 4  # layers shown in the ICS figure, spread evenly from the second to the last
LANDSCAPE_BANDS = (  # (title, y label, tag of the smallest value over the step sizes, tag of the largest)
    ("loss landscape", "$L(\\theta - \\eta g)$", tags.landscape("loss_min"), tags.landscape("loss_max")),
    (
        "gradient predictiveness",
        "$\\|\\nabla L(\\theta - \\eta g) - g\\|_2$",
        tags.landscape("grad_change_min"),
        tags.landscape("grad_change_max"),
    ),
)
BETA = ("effective $\\beta$-smoothness", "max $\\|\\nabla L(\\theta - \\eta g) - g\\|_2 \\,/\\, \\|\\eta g\\|_2$")
PAPER_STEPS = {1: ("BN-Baseline", 13.3), 5: ("BN-x5", 2.1), 30: ("BN-x30", 2.7)}  # Ioffe & Szegedy, millions of
INCEPTION_STEPS = 31.0  # steps to 72.2 % (Inception's best): docs/literature.md, section 3
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


# ---------------------------------------------------------------- one look per group, in every figure


@dataclass(frozen=True)
class Look:
    colour: Any  # by norm
    dash: str  # by learning rate
    hatch: str  # by learning rate, on bars
    marker: str  # by what else varies (and, for bars that have no marker, the colour's shade)

    def line(self, **kwargs: Any) -> dict[str, Any]:
        return {"color": self.colour, "ls": self.dash, "marker": self.marker, **kwargs}


class Looks:
    """The look of every group of a sweep: colour by norm, dash and hatch by lr, marker and shade (the norm's
    colour, lighter for each further value) by the other keys, so that bars too tell those apart."""

    def __init__(self, sweep: Sweep) -> None:
        norms = sorted({g.norm for g in sweep.groups} - {NO_NORM})
        tab = colormaps["tab10"].colors
        self.colours = {NO_NORM: NONE_COLOUR, **{n: tab[i % len(tab)] for i, n in enumerate(norms)}}
        self.lrs = sorted({g.lr for g in sweep.groups})
        self.rest_keys = [k for k in sweep.varying if k not in ("norm.name", "optim.lr")]
        self.rests = sorted({self.rest(g) for g in sweep.groups}, key=str)

    def rest(self, group: RunGroup) -> tuple:
        return tuple(group.keys.get(k) for k in self.rest_keys)

    def of(self, group: RunGroup, vary_lr: bool = True) -> Look:
        """`group`'s look; with vary_lr=False (a figure whose x axis is the lr) one style for every lr."""
        i = self.lrs.index(group.lr) if vary_lr else 0
        rest = self.rest(group)  # a series along an axis (batch size, say) lacks that key: the first marker
        k = self.rests.index(rest) if rest in self.rests else 0
        lighter = 0.6 * k / (len(self.rests) - 1) if len(self.rests) > 1 else 0.0  # towards white
        colour = tuple(c + (1 - c) * lighter for c in to_rgb(self.colours[group.norm]))
        return Look(colour, DASHES[i % len(DASHES)], HATCHES[i % len(HATCHES)], MARKERS[k % len(MARKERS)])


def norm_colours(sweep: Sweep) -> dict[str, Any]:
    """Norm -> its colour in every figure of the sweep."""
    return Looks(sweep).colours


# ---------------------------------------------------------------- plotting helpers


def _figure(
    nrows: int = 1, ncols: int = 1, width: float = 9.0, height: float = 4.8, **kwargs: Any
) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(width, height), layout="constrained", dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, **kwargs)
    return fig, axes


def _legend(fig: Figure, handles: list[Any], labels: list[str], below: bool = False) -> None:
    """One legend for the whole figure, outside the axes (never over the data): on the right, or `below` them."""
    if not handles:
        return
    if below:
        fig.legend(handles, labels, loc="outside lower center", ncols=len(handles), fontsize=8, frameon=False)
    else:
        fig.legend(handles, labels, loc="outside right upper", fontsize=8, frameon=False)


def _group_legend(groups: list[RunGroup], looks: Looks, bars: bool = False, vary_lr: bool = True) -> tuple[list, list]:
    """A legend entry per group (each label once), drawn in the group's look."""
    handles, labels = [], []
    for g in groups:
        look = looks.of(g, vary_lr)
        if bars:
            handles.append(Patch(facecolor=look.colour, hatch=look.hatch, edgecolor="white"))
        else:
            handles.append(Line2D([], [], **look.line(lw=1.6, ms=5)))
        labels.append(g.label if vary_lr else g.without("optim.lr"))
    return handles, labels


def _wrap(label: str) -> str:
    return label.replace(", ", "\n")


def _finite(values: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(values), values, np.nan)


def _plot_band(ax: Axes, curves: list[Curve], look: Look) -> bool:
    """The median line (markers every tenth point) and the min-max band; a run with steps outside the band is
    also drawn on its own, thin (True if any was)."""
    steps, median, lo, hi = band(curves)
    ax.plot(steps, median, **look.line(lw=1.6, ms=4, markevery=max(1, len(steps) // 10)))
    if len(curves) > 1:
        ax.fill_between(steps, lo, hi, color=look.colour, alpha=BAND_ALPHA, lw=0)
    apart = [(s, v) for s, v in curves if not np.isin(s, steps).all()]
    for s, v in apart:
        ax.plot(s, _finite(v), color=look.colour, ls=look.dash, lw=0.8, alpha=0.7)
    return bool(apart)


def _plot_groups(
    ax: Axes, sweep: Sweep, looks: Looks, tag: str, window: Callable[[RunResult], int] = lambda run: 0
) -> tuple[list[RunGroup], bool]:
    """Per group, the median curve of `tag` over its seeds with a min-max band: (the groups drawn, whether
    some run was drawn on its own)."""
    drawn, apart = [], False
    for g in (g for g in sweep.groups if g.results):
        curves = [c for r in g.results if (c := r.curve(tag, window(r))) is not None and len(c[0])]
        if curves:
            apart |= _plot_band(ax, curves, looks.of(g))
            drawn.append(g)
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


def _lr_axis(ax: Axes, lrs: list[float]) -> None:
    ax.set_xscale("log")
    ax.set_xticks(lrs, [f"{lr:g}" for lr in lrs])
    ax.minorticks_off()
    ax.grid(alpha=0.3)
    ax.set_xlabel("learning rate (optim.lr, log scale)")


# ---------------------------------------------------------------- the figures


def best_lr(sweep: Sweep) -> Section | None:
    """0. The headline: each norm at its own best learning rate (the verdict's rule,
    bnlab.results.analysis.pick_best_lr), the fair comparison when the lr varies."""
    if "optim.lr" not in sweep.varying:
        return None
    best = analysis.best_of_series(sweep)
    looks = Looks(sweep)
    ts = sweep.thresholds
    metric, name = sweep.final_metric, METRICS[sweep.final_metric].label.split(" (")[0]
    fig, axes = _figure(1, 1 + len(ts), width=4.0 + 3.2 * (1 + len(ts)), height=5.0)

    def lr_text(label: str, g: RunGroup) -> str:
        return f"lr {g.lr:g}{'*' if sweep.edge(label, g.lr) else ''}"

    for i, (label, g) in enumerate(best.items()):
        look = looks.of(g)
        if accs := g.final(metric):
            med = statistics.median(accs)
            axes[0, 0].bar(i, med, 0.7, color=look.colour, hatch=look.hatch, edgecolor="white")
            axes[0, 0].errorbar(
                i, med, yerr=[[med - min(accs)], [max(accs) - med]], fmt="none", ecolor="black", capsize=3
            )
            axes[0, 0].text(
                i, max(accs) + 0.005, f"{med:.3f}\n{lr_text(label, g)}", ha="center", va="bottom", fontsize=7
            )
        for j, t in enumerate(ts, 1):
            ax, m = axes[0, j], g.thresholds[t].median
            if not m.exact:  # censored: an arrow beyond the last step seen, never a bar there
                ax.annotate("", (i, m.seen * 1.12), (i, m.seen), arrowprops={"arrowstyle": "->", "color": look.colour})
                ax.text(i, m.seen * 1.12, f"{m.reached}/{m.seeds}", ha="center", va="bottom", fontsize=7)
                ax.update_datalim([(i, m.seen * 1.25)])  # the axis holds the arrow and its label
                ax.autoscale_view()
                continue
            med, (lo, hi) = m.steps, m.band
            ax.bar(i, med, 0.7, color=look.colour, hatch=look.hatch, edgecolor="white")
            ax.errorbar(i, med, yerr=[[med - lo], [hi - med]], fmt="none", ecolor="black", capsize=3)
            ax.text(i, hi, f"{med:g}\n{lr_text(label, g)}", ha="center", va="bottom", fontsize=7)
    accs_seen = [a for g in best.values() for a in g.final(metric)] or [0.0]
    low = max(0.0, min(accs_seen) - 0.05) if higher_is_better(metric) else 0.0
    axes[0, 0].set_ylim(low, max(accs_seen) + 0.3 * (max(accs_seen) - low))  # room for the labels above the bars
    axes[0, 0].set(ylabel=f"final {name}", title=f"final {name}\nat each one's best lr")
    for j, t in enumerate(ts, 1):
        axes[0, j].set(ylabel=f"{STEPS}", title=f"iterations to {_threshold_text(sweep, t)}\nat each one's best lr")
        axes[0, j].set_ylim(0, axes[0, j].get_ylim()[1] * 1.15)
    for ax in axes[0]:
        ax.set_xticks(range(len(best)), [_wrap(label) for label in best], fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(
        "each norm at its own best learning rate (median over seeds; error bars: min-max of the accuracy, "
        "the 95 % interval of the iterations)"
    )
    return Section(
        "Each norm at its best learning rate",
        f"Each norm (and setting) at its best lr, the one the verdict compares: the fewest median iterations to the "
        f"hardest threshold that half its seeds reach at some lr (ties and no such threshold: the best final "
        f"{name}). Left: its final {name}; right: its iterations to each threshold. The lr is written above each "
        "bar; * marks an lr at the edge of the grid tried, so the best may lie beyond it; an arrow from the last "
        "step seen where fewer than half the seeds got there (k/n: seeds that did). Median over seeds; error bars: "
        "the accuracy's min-max, the iterations' 95 % interval.",
        fig,
        best_lr_table(sweep, best),
    )


def best_lr_table(sweep: Sweep, best: dict[str, RunGroup]) -> str:
    """The best-lr comparison as a markdown table, with the verdict: the speed-up over norm=none at its own best lr."""
    ts, metric = sweep.thresholds, sweep.final_metric
    short = metric.replace("_", " ")  # test acc, test loss
    head = ["group", "best lr", f"final {short}", *(f"iters to {t:g}" for t in ts)]
    head += [f"speed-up to {t:g} over none" for t in ts]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, g in best.items():
        row = [label, f"{g.lr:g}{'*' if sweep.edge(label, g.lr) else ''}", fmt_mean_std(*g.mean_std(metric))]
        row += [fmt_iters(g.thresholds.get(t)) for t in ts]
        for t in ts:
            v = next((v for v in sweep.verdicts if v.arm == label and v.threshold == t), None)
            row.append("-" if v is None else f"{fmt_ratio(v)} (vs {v.baseline_lr:g})")
        lines.append("| " + " | ".join(row) + " |")
    return (
        "Each norm at its own best learning rate: the fair comparison (at one shared lr the table below favours "
        "whichever norm that lr suits). * marks an lr at the edge of the grid tried.\n\n" + "\n".join(lines) + "\n"
    )


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
        return run.summary.config.get("trainer", {}).get("eval_every", 1) if tag.startswith(tags.TRAINING) else 0

    looks = Looks(sweep)
    curves = [c for g in sweep.groups for r in g.results if (c := r.curve(tag, window(r))) is not None]
    zoom = _zoom(sweep, curves)
    fig, axes = _figure(1, 2 if zoom else 1, width=14.0 if zoom else 9.0, height=5.0)
    diverged = [
        (g, c)
        for g in sweep.groups
        for r in g.results
        if r.summary.status.failed_to_train and (c := r.curve(tag, window(r))) is not None and len(c[0])
    ]
    for ax in axes[0]:
        drawn, apart = _plot_groups(ax, sweep, looks, tag, window)
        if not drawn:
            return None
        for g, (steps, values) in diverged:
            ax.plot(steps[-1], values[-1], "x", color=looks.of(g).colour, ms=9, mew=2)
        for t in sweep.thresholds:
            ax.axhline(t, color="0.35", ls=":", lw=1.0)
        ax.set(xlabel=STEPS, ylabel=METRICS[sweep.metric].label)
        ax.grid(alpha=0.3)
    name = METRICS[sweep.metric].label.split(" (")[0]
    axes[0, 0].set_title(f"{name} vs iterations\n(median over seeds, band: min-max)")
    if zoom:
        axes[0, 1].set_ylim(*zoom)
        axes[0, 1].set_title("the same, zoomed on the thresholds")
    handles, labels = _group_legend(drawn, looks)
    extras = [
        (bool(sweep.thresholds), Line2D([], [], color="0.35", ls=":", lw=1.0), "the thresholds"),
        (apart, Line2D([], [], color="0.3", lw=0.8, alpha=0.7), "one run, where it leaves\nthe median (stopped early)"),
        (
            bool(diverged),
            Line2D([], [], color="0.2", marker="x", ms=9, mew=2, ls="none"),
            "a run diverged or\nstalled here",
        ),
    ]
    _legend(fig, handles + [h for shown, h, _ in extras if shown], labels + [lab for shown, _, lab in extras if shown])
    return Section(
        f"{sweep.metric} over training",
        f"{sweep.metric} vs iterations per group: median over seeds, shaded min-max (at the steps at least half "
        "the seeds reached); dotted: the thresholds; x: where a run diverged"
        + ("; right: zoomed on the thresholds" if zoom else "")
        + (
            "; training figures are means over the steps between evaluations." if tag.startswith(tags.TRAINING) else "."
        ),
        fig,
    )


def iterations_to_threshold(sweep: Sweep) -> Section | None:
    """2. Iterations to each threshold per group: median bars with their 95 % interval, a censored median as an
    arrow beyond the last step seen."""
    groups = [g for g in sweep.groups if g.results]
    if not sweep.thresholds or not groups:
        return None
    looks = Looks(sweep)
    fig, ((ax,),) = _figure(width=max(9.0, 2.0 + 0.45 * len(groups) * len(sweep.thresholds)))
    width = 0.8 / len(groups)
    top = 0
    for j, group in enumerate(groups):
        look = looks.of(group)
        for i, t in enumerate(sweep.thresholds):
            x = i - 0.4 + width * (j + 0.5)
            m = group.thresholds[t].median
            if m.exact:  # the Kaplan-Meier median and its 95 % interval (its open end: up to the last step seen)
                lo, hi = m.band
                ax.bar(x, m.steps, width, color=look.colour, hatch=look.hatch, edgecolor="white")
                ax.errorbar(x, m.steps, yerr=[[m.steps - lo], [hi - m.steps]], fmt="none", ecolor="black", capsize=3)
                top = max(top, hi)
            else:  # censored: known only to lie beyond the last step seen, drawn as an arrow from there
                ax.annotate("", (x, m.seen * 1.12), (x, m.seen), arrowprops={"arrowstyle": "->", "color": look.colour})
                ax.text(x, m.seen * 1.12, f"{m.reached}/{m.seeds}", ha="center", va="bottom", fontsize=7)
                top = max(top, m.seen * 1.25)
            if m.exact and group.thresholds[t].never:
                ax.text(x, hi, f"{group.thresholds[t].never} never", ha="center", va="bottom", fontsize=7)
    ax.set_ylim(0, top * 1.18 or 1)
    ax.set_xlim(-0.5, len(sweep.thresholds) - 0.5)
    ax.set_xticks(range(len(sweep.thresholds)), [_threshold_text(sweep, t) for t in sweep.thresholds])
    ax.set(
        xlabel="threshold",
        ylabel=f"{STEPS}\nto reach the threshold",
        title="iterations to each threshold\n(median over seeds, error bars: its 95 % interval)",
    )
    ax.grid(axis="y", alpha=0.3)
    handles, labels = _group_legend(groups, looks, bars=True)
    _legend(fig, handles, labels)
    return Section(
        "Iterations to each threshold",
        "Iterations to each threshold per group: bar = the median over the seeds (Kaplan-Meier, seeds that never "
        "reached it counted as censored at the last step they were seen at), error bar = its 95 % interval; where "
        "fewer than half the seeds reached it, an arrow from the last step seen (k/n: seeds that reached it): the "
        "median lies beyond it.",
        fig,
    )


def steps_to_level(sweep: Sweep) -> Section | None:
    """2b. Beyond the thresholds: the median steps to every level of the threshold metric for each norm at its
    best lr, with its 95 % interval, and the speed-up over no normalization at each level."""
    curves = analysis.level_curves(sweep)
    if not curves or len(curves[0].levels) <= len(sweep.thresholds):  # no curves: the thresholds' figure has it all
        return None
    looks = Looks(sweep)
    fig, ((steps_ax,), (ratio_ax,)) = _figure(2, 1, height=7.0, sharex=True)
    for c in curves:
        look = looks.of(c.group, vary_lr=False)
        label = f"{c.label} (lr {c.group.lr:g})"
        x = np.array(c.levels)
        exact = np.array([m.exact for m in c.medians])
        median = np.array([m.steps if m.exact else np.nan for m in c.medians])
        low, high = np.array([m.band if m.exact else (np.nan, np.nan) for m in c.medians]).T
        steps_ax.plot(x, median, color=look.colour, lw=1.6, label=label)
        steps_ax.fill_between(x, low, high, color=look.colour, alpha=BAND_ALPHA, lw=0)
        if (~exact).any():  # censored: beyond the last step seen
            seen = np.array([m.seen for m in c.medians])
            steps_ax.plot(x[~exact], seen[~exact], ls="none", marker="^", color=look.colour, ms=6)
        ratios = [(level, r) for level, r in zip(c.levels, c.speedups) if r is not None]
        if ratios:
            rx = np.array([level for level, _ in ratios])
            ry = np.array([r.speedup for _, r in ratios])
            lo, hi = np.array([r.band for _, r in ratios]).T
            bound = np.array([r.bound for _, r in ratios])
            ratio_ax.plot(rx, ry, color=look.colour, lw=1.6, label=f"{c.label} vs {NO_NORM}")
            ratio_ax.fill_between(rx, lo, hi, color=look.colour, alpha=BAND_ALPHA, lw=0)
            for kind, marker in ((LOWER, "^"), (UPPER, "v")):
                ratio_ax.plot(rx[bound == kind], ry[bound == kind], ls="none", marker=marker, color=look.colour, ms=6)
    for ax in (steps_ax, ratio_ax):
        for t in sweep.thresholds:
            ax.axvline(t, color="0.6", ls=":", lw=1)
        ax.grid(alpha=0.3)
    steps_ax.set_ylim(bottom=0)
    steps_ax.set(ylabel=f"{STEPS}\nto reach the level", title=f"steps to each {METRICS[sweep.metric].label} level")
    ratio_ax.axhline(1, color="black", lw=0.8)
    ratio_ax.set_ylim(bottom=0)
    ratio_ax.set(
        xlabel=f"{METRICS[sweep.metric].label} level (dotted: the thresholds)",
        ylabel=f"speed-up over {NO_NORM}\n(its steps / the norm's)",
    )
    if not higher_is_better(sweep.metric):
        ratio_ax.invert_xaxis()  # a loss: harder levels to the right
    handles, labels = steps_ax.get_legend_handles_labels()
    _legend(fig, handles, labels, below=True)
    return Section(
        "Steps to every level, and the speed-up at each",
        f"Top: median steps over the seeds (Kaplan-Meier) for each norm at its best lr to first reach each "
        f"{METRICS[sweep.metric].label} level, band = its 95 % interval (open ends up to the last step seen); "
        "a triangle where fewer than half the seeds reached the level (the median lies beyond it). Bottom: the "
        f"speed-up over {NO_NORM} at its best lr at each level, band = its 95 % bootstrap interval; ▲ a lower "
        "bound (the baseline's median is censored), ▼ an upper bound. At the thresholds these are the verdict's "
        "numbers.",
        fig,
    )


def lr_sensitivity(sweep: Sweep) -> Section | None:
    """3. Final test accuracy and iterations to each threshold vs learning rate, per group minus the lr."""
    if "optim.lr" not in sweep.varying or batch_size_keys(sweep):
        return None
    looks = Looks(sweep)
    series = lr_series(sweep.runs)
    first = {g.without("optim.lr"): g for g in reversed(sweep.groups)}  # a group of each series, for its look
    best = largest_lr_that_trains(sweep.runs)  # its margins: in the text, from training_edges
    threshold = easiest_threshold(sweep.metric, sweep.thresholds)
    ts = sweep.thresholds
    final, name = sweep.final_metric, METRICS[sweep.final_metric].label.split(" (")[0]
    fig, axes = _figure(1, 1 + len(ts), width=3.0 + 4.0 * (1 + len(ts)), height=5.0)
    ax_acc = axes[0, 0]
    any_diverged = any_open = False
    for j, (label, by_lr) in enumerate(series.items()):
        look = looks.of(first[label], vary_lr=False)
        any_diverged |= _final_vs_lr(ax_acc, by_lr, final, best.get(label), look)
        jitter = 1.06 ** (j - (len(series) - 1) / 2)  # keeps the series' error bars apart
        any_open |= _iterations_vs_lr(axes[0, 1:], ts, by_lr, look, jitter)
    if threshold is not None and sweep.metric == final:
        ax_acc.axhline(threshold, color="0.35", ls=":", lw=1.0)
    all_lrs = sorted({lr for by_lr in series.values() for lr in by_lr})
    budget = max((r.summary.max_steps for r in sweep.runs), default=0)
    for ax, t in zip(axes[0, 1:], ts):
        ax.axhline(budget, color="0.35", ls=":", lw=1.0)
        _lr_axis(ax, all_lrs)
        _log_scale_if_wide(ax)
        ax.set(
            ylabel=f"{STEPS}", title=f"iterations to {_threshold_text(sweep, t)}\n(median over seeds, bars: min-max)"
        )
    _lr_axis(ax_acc, all_lrs)
    _log_scale_if_wide(ax_acc)
    ax_acc.set(ylabel=f"final {name}", title=f"final {name} vs learning rate\n(median over seeds, band: min-max)")
    handles = [Line2D([], [], **looks.of(first[label], vary_lr=False).line(lw=1.6)) for label in series]
    higher = higher_is_better(sweep.metric)
    easiest = "lowest" if higher else "highest"
    extras = [
        (True, Line2D([], [], color="0.3", marker="o", ms=13, mfc="none", mew=2, ls="none"), "largest lr that trains"),
        (
            any_diverged,
            Line2D([], [], color="0.3", marker="x", ms=9, mew=2.2, ls="none"),
            f"a diverged run\n(its final {name})",
        ),
        (
            any_open,
            Line2D([], [], color="0.3", marker="o", mfc="white", ls="none"),
            "some seeds never reached it\n(counted at the step budget)",
        ),
        (True, Line2D([], [], color="0.35", ls=":", lw=1.0), f"left: the {easiest} threshold;\nright: the step budget"),
    ]
    _legend(fig, handles + [h for shown, h, _ in extras if shown], list(series) + [lab for s, _, lab in extras if s])
    return Section(
        "Learning-rate sensitivity",
        f"Left: final {name} vs learning rate (median over seeds, shaded min-max; x: diverged runs; ring: the "
        "largest lr that trains). Then, one panel per threshold: the iterations to reach it vs learning rate (open "
        "markers: some seeds never reached it and count at the step budget). Colour: norm.",
        fig,
        _largest_lr_text(sweep, series, threshold),
    )


def _final_vs_lr(ax: Axes, by_lr: dict[float, list[Summary]], final: str, best: float | None, look: Look) -> bool:
    """One series' final metric vs lr: median and min-max band over seeds, an x per diverged run, a ring at the
    largest lr that trains; whether any run diverged."""
    lrs = np.array(list(by_lr))
    accs = [[a for s in runs if s.status.counts and (a := s.final.get(final)) is not None] for runs in by_lr.values()]
    have = [i for i, a in enumerate(accs) if a]
    ax.plot(lrs[have], [np.median(accs[i]) for i in have], **look.line(lw=1.6))
    lows, highs = [min(accs[i]) for i in have], [max(accs[i]) for i in have]
    ax.fill_between(lrs[have], lows, highs, color=look.colour, alpha=BAND_ALPHA, lw=0)
    diverged = False
    for lr, runs in by_lr.items():
        for s in (s for s in runs if s.status.failed_to_train):
            diverged = True
            if (value := s.final.get(final)) is not None or final == "test_acc":
                ax.plot(lr, value or 0.0, "x", color=look.colour, ms=10, mew=2.2)
    if best is not None and accs[i := list(by_lr).index(best)]:
        ax.plot(best, np.median(accs[i]), "o", ms=15, mfc="none", mec=look.colour, mew=2)
    return diverged


def _iterations_vs_lr(
    axes: Sequence[Axes], ts: list[float], by_lr: dict[float, list[Summary]], look: Look, jitter: float
) -> bool:
    """One series' iterations to each threshold vs lr, a panel per threshold: median and min-max bars over
    seeds, open markers where some seeds never reached it; whether any did not."""
    lrs, any_open = np.array(list(by_lr)), False
    for ax, t in zip(axes, ts):
        its = [[_iterations(s, t) for s in runs if s.status.counts] for runs in by_lr.values()]
        nevers = [
            any(s.status.counts and s.iterations_to_threshold.get(t) is None for s in runs) for runs in by_lr.values()
        ]
        have = [i for i, v in enumerate(its) if v]
        if not have:
            continue
        x = lrs[have] * jitter
        median = np.array([np.median(its[i]) for i in have])
        err = [median - [min(its[i]) for i in have], [max(its[i]) for i in have] - median]
        ax.errorbar(x, median, yerr=err, color=look.colour, ls=look.dash, lw=1.4, capsize=3)
        opened = [n for n, i in enumerate(have) if nevers[i]]
        closed = [n for n, i in enumerate(have) if not nevers[i]]
        any_open |= bool(opened)
        ax.plot(x[closed], median[closed], look.marker, color=look.colour, ms=6)
        ax.plot(x[opened], median[opened], look.marker, mfc="white", mec=look.colour, mew=1.6, ms=7)
    return any_open


def _largest_lr_text(sweep: Sweep, series: dict[str, dict[float, list[Summary]]], threshold: float | None) -> str:
    """The largest lr that still trains per series, with the criterion it meets."""
    higher = higher_is_better(sweep.metric)
    criterion = (
        " (no threshold was set)"
        if threshold is None
        else f" and each ended with final {sweep.metric} {'≥' if higher else '≤'} {threshold:g} "
        f"(the {'lowest' if higher else 'highest'} threshold)"
    )
    lines = [
        "Largest learning rate that still trains, per group: all its seeds completed "
        f"(none diverged, failed or interrupted){criterion}.",
        "",
        *(
            f"- {label}: {_largest(edge, list(series[label]))} (tried: {', '.join(f'{x:g}' for x in series[label])})"
            for label, edge in training_edges(sweep.runs).items()
        ),
    ]
    return "\n".join(lines) + "\n"


def _largest(edge: Edge, tried: list[float]) -> str:
    """The largest lr that trains with its margin, as a bound where the grid ends: '**≥ 10** (the largest lr
    tried ...)'; and what the next lr up did."""
    if edge.lr is None:
        return f"none (not even the smallest lr tried, {min(tried):g}: the edge lies below it; there {edge.why})"
    margin = "" if edge.margin is None else f"; its worst seed ends {edge.margin:.4f} clear of the cut"
    if edge.lr == max(tried):
        return f"**≥ {edge.lr:g}** (the largest lr tried trains: a lower bound{margin})"
    return f"**{edge.lr:g}** ({margin[2:]}; at {edge.above:g}: {edge.why})"


def batch_size_sensitivity(sweep: Sweep) -> Section | None:
    """4. Final test accuracy vs batch size, per group minus the batch size and what the sweep scaled with it."""
    driven = batch_size_keys(sweep)
    if not driven:
        return None
    looks = Looks(sweep)
    keys = [k for k in sweep.varying if k not in driven]
    fig, ((ax,),) = _figure(1, 1, width=8.0, height=5.0)
    handles, labels = [], []
    for group in group_runs([RunResult(r.dir, r.summary) for r in sweep.runs], keys):
        by_size: dict[int, list[float]] = {}
        for r in group.results:
            if (acc := r.summary.final.get("test_acc")) is not None:
                by_size.setdefault(r.summary.batch_size, []).append(acc)
        if not by_size:
            continue
        look = looks.of(group, vary_lr="optim.lr" not in driven)
        sizes = sorted(by_size)
        ax.plot(sizes, [np.median(by_size[b]) for b in sizes], **look.line(lw=1.6))
        ax.fill_between(
            sizes,
            [min(by_size[b]) for b in sizes],
            [max(by_size[b]) for b in sizes],
            color=look.colour,
            alpha=BAND_ALPHA,
            lw=0,
        )
        handles.append(Line2D([], [], **look.line(lw=1.6)))
        labels.append(group.label)
    all_sizes = sorted({r.summary.batch_size for r in sweep.runs})
    ax.set_xscale("log", base=2)
    ax.set_xticks(all_sizes, [str(b) for b in all_sizes])
    ax.minorticks_off()
    ax.grid(alpha=0.3)
    ax.set(
        xlabel="batch size (data.batch_size, log scale)",
        ylabel="final test accuracy",
        title="final test accuracy vs batch size\n(median over seeds, band: min-max)",
    )
    _legend(fig, handles, labels)
    scaled = f" The sweep set {', '.join(driven[1:])} with the batch size." if driven[1:] else ""
    return Section(
        "Batch-size sensitivity",
        f"Final test accuracy vs batch size per group (median over seeds, shaded min-max).{scaled}",
        fig,
    )


def _unit0_percentiles(ax: Axes, group: RunGroup, layer: int, colour: Any, title: bool) -> None:
    """One panel: the group's lowest seed's percentiles of unit 0's nonlinearity input at `layer` over training."""
    name = tags.activation(layer, unit0=True) + "/p"
    runs = sorted(
        (r for r in group.results if all(f"{name}{q}" in r.scalars for q in tags.PERCENTILES)),
        key=lambda r: str(r.summary.seed),
    )
    if not runs:
        ax.text(0.5, 0.5, "not logged", transform=ax.transAxes, ha="center", color="0.4")
        ax.set_title(_wrap(group.label) if title else "", fontsize=9)
        return
    run = runs[0]
    (steps, p15), (_, p50), (_, p85) = (run.curve(f"{name}{q}") for q in tags.PERCENTILES)
    ax.fill_between(steps, p15, p85, color=colour, alpha=BAND_ALPHA, lw=0)
    ax.plot(steps, p50, color=colour, lw=1.8)
    ax.plot(steps, p15, color=colour, lw=0.9, ls="--")
    ax.plot(steps, p85, color=colour, lw=0.9, ls="--")
    seed = run.summary.seed
    ax.set_title(f"{_wrap(group.label)}\n(seed {seed})" if title else f"seed {seed}", fontsize=9)


def activation_percentiles(sweep: Sweep) -> Section | None:
    """5. The 15/50/85th percentiles of one tracked unit's nonlinearity input over training (Ioffe & Szegedy
    Fig. 1b,c)."""
    groups = [g for g in sweep.groups if g.results]
    logged = {tag for g in groups for r in g.results for tag in r.scalars}
    layers = sorted({int(m.group(1)) for tag in logged if (m := tags.UNIT0.match(tag))}, key=lambda i: (i < 0, i))
    if not layers:
        return None
    looks = Looks(sweep)
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
            ax = axes[row, col]
            _unit0_percentiles(ax, group, layer, looks.of(group).colour, title=row == 0)
            ax.grid(alpha=0.3)
            if col == 0:
                hidden = " (last hidden)" if layer == -1 else ""
                ax.set_ylabel(f"layer {layer}{hidden}:\ninput to the nonlinearity, unit 0")
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
        "tracked layer (the group's lowest seed), shared axes, colour by norm (Ioffe & Szegedy 2015, Fig. 1b,c).",
        fig,
    )


def _curves_grid(sweep: Sweep, panels: list[list[tuple[str, str, str]]], title: str) -> Figure | None:
    """Rows x columns of panels (tag, title, y label), each with every group's median curve and band; None if
    nothing logged."""
    looks = Looks(sweep)
    nrows, ncols = len(panels), max(len(row) for row in panels)
    fig, axes = _figure(nrows, ncols, width=2.0 + 3.6 * ncols, height=0.8 + 3.0 * nrows, sharex=True)
    drawn: dict[str, RunGroup] = {}
    for i, row in enumerate(panels):
        for j in range(ncols):
            ax = axes[i, j]
            if j >= len(row):
                ax.set_visible(False)
                continue
            tag, panel_title, ylabel = row[j]
            drawn.update((g.label, g) for g in _plot_groups(ax, sweep, looks, tag)[0])
            _log_scale_if_wide(ax)
            ax.set_title(panel_title, fontsize=10)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if i == nrows - 1:
                ax.set_xlabel(STEPS)
    if not drawn:
        return None
    fig.suptitle(title)
    _legend(fig, *_group_legend(list(drawn.values()), looks))
    return fig


def internal_covariate_shift(sweep: Sweep) -> Section | None:
    """6a. ICS per layer, ||G - G'||_2 and cos(G, G') over training (Santurkar et al. 2018)."""
    runs = [r for g in sweep.groups for r in g.results]
    logged = {tag for r in runs for tag in r.scalars}
    layers = sorted({int(m.group(1)) for tag in logged if (m := tags.ICS_L2.match(tag))})
    # layer 0 has no layer before it, so its G' = G: (0, 1) always; a layer that shows nothing is left out
    layers = [
        i for i in layers if any(np.any(r.scalars.get(tags.ics(i, "l2"), (0, np.zeros(1)))[1] != 0) for r in runs)
    ]
    if not layers:
        return None
    shown = sorted({layers[round(i)] for i in np.linspace(0, len(layers) - 1, min(len(layers), MAX_ICS_LAYERS))})
    panels = [
        [(tags.ics(i, "l2"), f"layer {i}", "ICS $\\|G - G'\\|_2$") for i in shown],
        [(tags.ics(i, "cos"), f"layer {i}", "ICS $\\cos(G, G')$") for i in shown],
    ]
    fig = _curves_grid(sweep, panels, "internal covariate shift per layer\n(median over seeds, band: min-max)")
    if fig is None:
        return None
    spread = "" if shown == layers else f" Of the {len(layers)} layers with a shift, {len(shown)} spread evenly."
    columns = [(tags.ics(i, m), f"layer {i} {name}") for i in shown for m, name in (("l2", "‖G - G'‖"), ("cos", "cos"))]
    return Section(
        "Internal covariate shift",
        "Internal covariate shift per layer over training (Santurkar et al. 2018): top, ||G - G'||_2; bottom, "
        "cos(G, G') (G: the layer's weight gradient; G': the same after the earlier layers' update); median over "
        "seeds, shaded min-max. Layers whose shift is always 0 (layer 0) are left out." + spread,
        fig,
        _over_training_table(sweep, columns),
    )


def landscape(sweep: Sweep) -> Section | None:
    """6b. Loss-landscape smoothness along the gradient over training, in Santurkar et al.'s style (their
    Fig. 4): per lr, the loss and the gradient change over the step sizes tried as a band per norm, and the
    effective beta-smoothness."""
    groups = [g for g in sweep.groups if g.results and any(tags.landscape("loss_min") in r.scalars for r in g.results)]
    if not groups:
        return None
    looks = Looks(sweep)
    lrs = sorted({g.lr for g in groups})
    fig, axes = _figure(len(lrs), 3, width=13.0, height=0.8 + 3.2 * len(lrs), sharex=True)
    for row, lr in enumerate(lrs):
        for g in (g for g in groups if g.lr == lr):
            look = looks.of(g)
            for col, (_, _, low_tag, high_tag) in enumerate(LANDSCAPE_BANDS):
                steps, low, _, _ = band([c for r in g.results if (c := r.curve(low_tag)) is not None])
                _, high, _, _ = band([c for r in g.results if (c := r.curve(high_tag)) is not None])
                axes[row, col].fill_between(steps, low, high, color=look.colour, alpha=0.35, lw=0)
                for edge in (low, high):
                    axes[row, col].plot(steps, edge, color=look.colour, ls=look.dash, lw=0.8)
            _plot_band(axes[row, 2], [c for r in g.results if (c := r.curve(tags.landscape("beta_smoothness")))], look)
        for col, (title, ylabel) in enumerate([(t, y) for t, y, _, _ in LANDSCAPE_BANDS] + [BETA]):
            ax = axes[row, col]
            _log_scale_if_wide(ax)
            ax.set_title(f"{title}, lr {lr:g}", fontsize=10)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if row == len(lrs) - 1:
                ax.set_xlabel(STEPS)
    low_x, high_x = groups[0].runs[0].summary.config.get("diag", {}).get("landscape_steps", LANDSCAPE_STEPS)
    fig.suptitle(
        f"along the gradient g, step sizes eta = {low_x:g} to {high_x:g} x lr\n"
        "(bands: the range over the step sizes; right: median and min-max over seeds)"
    )
    _legend(fig, *_group_legend(groups, looks))
    return Section(
        "Loss-landscape smoothness",
        f"Santurkar et al.'s Fig. 4 for this sweep, one row per lr: at each diag.every-th step, the loss at theta - "
        f"eta g (left) and the change of the gradient ||grad L(theta - eta g) - g|| (middle) for step sizes eta from "
        f"{low_x:g} to {high_x:g} times the lr, drawn as a band from the smallest to the largest value (median over "
        "seeds of each end): a narrow band is a smooth landscape (its width is the loss variation and the gradient "
        "predictiveness); right: the effective beta-smoothness, max ||grad L(theta - eta g) - g|| / ||eta g|| "
        "(median over seeds, shaded min-max). Smaller is smoother.",
        fig,
        _over_training_table(
            sweep,
            [
                (tags.landscape("loss_variation"), "loss variation"),
                (tags.landscape("grad_predictiveness"), "gradient predictiveness"),
                (tags.landscape("beta_smoothness"), "effective β-smoothness"),
            ],
        ),
    )


def _over_training_table(sweep: Sweep, columns: list[tuple[str, str]]) -> str:
    """Per group, each (tag, name) of `columns` in one number: per run its median over training, then the mean ±
    std (min-max) over the seeds."""
    lines = ["| group | " + " | ".join(name for _, name in columns) + " |", "|---|" + "---|" * len(columns)]
    for g in (g for g in sweep.groups if g.results):
        cells = []
        for tag, _ in columns:
            value = over_training(g, tag)
            cells.append(
                "-" if value is None else f"{value[0]:.4g}±{value[1] or 0:.2g} ({value[2]:.4g}-{value[3]:.4g})"
            )
        lines.append(f"| {g.label} | " + " | ".join(cells) + " |")
    return (
        "Each number: per run, the median over the steps logged; then the mean ± std (min-max) over the seeds.\n\n"
        + "\n".join(lines)
        + "\n"
    )


def baseline_speedup(sweep: Sweep) -> Section | None:
    """8. Ioffe & Szegedy's speed-up (their Table 2, Figure 2): no normalization at its best lr against each
    norm at that lr times 1, 5 and 30, by the steps each needs to reach the baseline's best test accuracy."""
    result = analysis.baseline_speedup(sweep)
    if result is None:
        return None
    looks = Looks(sweep)
    rows = [result.baseline, *(r for r in result.rows if r.group is not None)]
    fig, ((ax,),) = _figure(width=10.0, height=5.2)
    handles, labels = [], []
    tops = []
    for row in rows:
        look = looks.of(row.group)
        curves = [c for r in row.group.results if (c := r.curve(tags.TEST_ACC)) is not None and len(c[0])]
        _plot_band(ax, curves, look)
        tops += [float(np.nanmax(v)) for _, v in curves]
        if row.steps is not None:
            ax.plot(row.steps[0], result.target, "o", mfc="white", mec=look.colour, mew=2, ms=8)
        handles.append(Line2D([], [], **look.line(lw=1.6)))
        labels.append(_speedup_label(row))
    ax.axhline(result.target, color="0.35", ls=":", lw=1.0)
    ax.set_ylim(max(0.0, result.target - 0.1), max(tops) + 0.01)
    ax.set(xlabel=STEPS, ylabel="test accuracy", title="test accuracy vs iterations (median over seeds, band: min-max)")
    ax.grid(alpha=0.3)
    handles += [Line2D([], [], color="0.35", ls=":"), Line2D([], [], color="0.3", marker="o", mfc="white", ls="none")]
    labels += [f"the baseline's best accuracy, {result.target:.4f}", "where it is reached\n(median over seeds)"]
    _legend(fig, handles, labels)
    return Section(
        "Speed-up at multiples of the baseline's learning rate",
        "Ioffe & Szegedy's comparison (their Table 2 and Figure 2): no normalization at its best lr (by final test "
        "accuracy) against each norm at that lr times 1, 5 and 30, each curve the median over seeds with a min-max "
        "band; dotted: the baseline's best accuracy (the lowest of its seeds' peaks, so every baseline seed reaches "
        "it); rings: the median step at which each reaches it.",
        fig,
        speedup_table(result),
    )


def _speedup_label(row: analysis.SpeedupRow) -> str:
    if row.norm == NO_NORM:
        return f"none at its best lr, {row.lr:g} (the baseline)"
    return f"{row.norm}, lr {row.lr:g} ({row.multiple:g} x the baseline's)"


def speedup_table(result: analysis.BaselineSpeedup) -> str:
    """The comparison as a markdown table, beside Ioffe & Szegedy's Inception numbers."""
    head = "| run | lr | steps to the target (median, min-max) | speed-up over the baseline (paired by seed) "
    head += "| best test acc | paper (millions of steps to 72.2 %) | paper speed-up |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for row in [result.baseline, *result.rows]:
        name = f"{NO_NORM} (baseline)" if row.norm == NO_NORM else f"{row.norm} x{row.multiple:g}"
        paper, steps = ("Inception", INCEPTION_STEPS) if row.norm == NO_NORM else PAPER_STEPS.get(row.multiple, ("", 0))
        paper_cells = [f"{paper} {steps:g}", f"{INCEPTION_STEPS / steps:.1f}x"] if steps else ["", ""]
        if row.group is None:
            lines.append(f"| {name} | {row.lr:g} | not in the grid | | | {' | '.join(paper_cells)} |")
            continue
        reached = "never" if row.steps is None else fmt_spread(row.steps)
        if row.never and row.steps is not None:
            reached += f", {row.never} never"
        ratio = "1x" if row.norm == NO_NORM else "-" if row.speedup is None else fmt_spread(row.speedup, "{:.2f}", "x")
        lines.append(
            f"| {name} | {row.lr:g} | {reached} | {ratio} | {fmt_mean_std(*row.peak)} | {' | '.join(paper_cells)} |"
        )
    return (
        f"Target: the baseline's best test accuracy, {result.target:.4f} (the lowest of its seeds' peaks). The "
        "paper's target was Inception's best, 72.2 %, and its BN runs also had the other changes it lists (faster lr "
        "decay, less L2, no dropout).\n\n" + "\n".join(lines) + "\n"
    )


def train_eval_precise_bn(sweep: Sweep) -> Section | None:
    """7. Test accuracy in train mode, in eval mode (running averages) and after precise BN, per group."""
    groups = [g for g in sweep.groups if g.final("test_acc_train_mode") or g.final("test_acc_precise_bn")]
    if not groups:
        return None
    looks = Looks(sweep)
    fig, ((ax,),) = _figure(width=max(9.0, 2.5 + 0.5 * len(groups) * len(ACC_MODES)))
    width = 0.8 / len(groups)
    for j, group in enumerate(groups):
        look = looks.of(group)
        for i, (key, _) in enumerate(ACC_MODES):
            x = i - 0.4 + width * (j + 0.5)
            values = group.final(key)
            if not values:
                ax.text(x, 0.01, "n/a", ha="center", va="bottom", fontsize=7, rotation=90, color="0.4")
                continue
            mean = float(np.mean(values))
            ax.bar(x, mean, width, color=look.colour, hatch=look.hatch, edgecolor="white")
            ax.errorbar(
                x, mean, yerr=[[mean - min(values)], [max(values) - mean]], fmt="none", ecolor="black", capsize=3, lw=1
            )
            rotation = 90 if len(groups) > 3 else 0
            ax.text(x, max(values) + 0.01, f"{mean:.3f}", ha="center", va="bottom", fontsize=7, rotation=rotation)
    ax.set_ylim(0, 1.12)
    ax.set_xlim(-0.5, len(ACC_MODES) - 0.5)
    ax.set_xticks(range(len(ACC_MODES)), [label for _, label in ACC_MODES])
    ax.set(
        ylabel="test accuracy",
        title="test accuracy by where the norm layers take their statistics from\n"
        "(mean over seeds, error bars: min-max)",
    )
    ax.grid(axis="y", alpha=0.3)
    _legend(fig, *_group_legend(groups, looks, bars=True))
    return Section(
        "Train mode, eval mode and precise BN",
        "Final test accuracy in train mode (batch statistics: the forgotten model.eval()), in eval mode with the "
        "running averages (EMA) and in eval mode after precise BN; mean over seeds, error bars min-max; n/a: not "
        "measured.",
        fig,
    )


def _last_step(trial: Any, max_steps: int) -> int:
    """The step a tuning trial got to: max_steps when complete, else its last rung."""
    return max_steps if trial.state == COMPLETE else max(trial.rungs, default=0)


def _value_at(trial: Any, step: int, max_steps: int) -> float | None:
    """A tuning trial's objective at `step` (a rung, or the end), None where it did not get there."""
    return trial.value if step == max_steps and trial.state == COMPLETE else trial.rungs.get(step)


def _shade(i: int, n: int) -> float:
    """How much lighter the i-th of n rungs is drawn: the last (the end) not at all."""
    return 0.7 * (n - 1 - i) / max(1, n - 1)


def _lighter(colour: Any, amount: float) -> tuple:
    return tuple(c + (1 - c) * amount for c in to_rgb(colour))


def _searched(trial: Any, key: str) -> float:
    """A trial's value of a searched key; its number for `trial` (an arm that searched nothing)."""
    return trial.number if key == "trial" else trial.params[key]


def tuning_search(sweep: Sweep) -> Section | None:
    """A tuning sweep's search (bnlab/record/tuning.py): each arm's trials, objective against each searched key."""
    record = Tuning.load(sweep.root)
    if record is None or not record.results:
        return None
    keys = sorted({k for arm in record.arms for k in arm.keys}) or ["trial"]
    colours = Looks(sweep).colours if sweep.groups else {}
    steps = [*record.rung_steps, record.max_steps]
    fig, axes = _figure(
        len(record.arms), len(keys), width=3.6 * len(keys) + 1.6, height=2.6 * len(record.arms), sharey=True
    )
    for row, arm in zip(axes, record.arms):
        norm = next((o.split("=", 1)[1] for o in arm.overrides if o.split("=")[0] == "norm"), NO_NORM)
        trials, chosen = record.trials_of(arm.label), record.chosen(arm)
        for ax, key in zip(row, keys):
            ax.set_title(f"{arm.label}: {key}", fontsize=9)
            if key not in arm.keys and key != "trial":
                ax.text(0.5, 0.5, "not searched for this arm", ha="center", va="center", transform=ax.transAxes)
                ax.set_xticks([])
                continue
            for i, step in enumerate(steps):  # a trial at each step it reached: lighter for the earlier rungs
                colour = _lighter(colours.get(norm, NONE_COLOUR), _shade(i, len(steps)))
                for stopped in (False, True):  # a cross where the pruner stopped it
                    at = [
                        (_searched(t, key), v)
                        for t in trials
                        if (v := _value_at(t, step, record.max_steps)) is not None
                        and stopped == (t.state == PRUNED and step == _last_step(t, record.max_steps))
                    ]
                    ax.scatter(
                        [x for x, _ in at], [v for _, v in at], color=colour, marker="x" if stopped else "o", s=18
                    )
            if chosen is not None and chosen.value is not None:
                ax.scatter(_searched(chosen, key), chosen.value, s=140, facecolors="none", edgecolors="black", zorder=4)
            xs = [_searched(t, key) for t in trials]
            if key != "trial" and min(xs) > 0 and max(xs) > 20 * min(xs):
                ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(key, fontsize=8)
        row[0].set_ylabel(f"objective\n(steps to {record.metric} {record.threshold:g})", fontsize=8)
    handles = [
        Line2D(
            [], [], ls="", marker="o", color=_lighter("0.3", 0.7 * (len(steps) - 1 - i) / max(1, len(steps) - 1)), ms=5
        )
        for i in range(len(steps))
    ]
    labels = [f"at step {s}" for s in steps]
    handles += [
        Line2D([], [], ls="", marker="x", color="0.3", ms=5),
        Line2D([], [], ls="", marker="o", mfc="none", mec="black", ms=11),
    ]
    _legend(fig, handles, [*labels, "pruned there", "chosen"], below=True)
    saved = 1 - record.steps_trained / record.steps_unpruned if record.steps_unpruned else 0.0
    caption = (
        f"Each arm's {record.trials} trials ({record.sampler} search, {len(record.seeds)} seeds each, pruner "
        f"{record.pruner} at steps {', '.join(map(str, record.rung_steps)) or 'none'}): the objective, the median "
        f"steps to {record.metric} {record.threshold:g} over the seeds (above {record.max_steps}: fewer than half "
        "got there, ranked by final accuracy; a diverged or stalled seed ranks the trial last), against each "
        "searched key, at each rung a trial reached (lighter: earlier; trials compare at the same step only), a "
        "cross where the pruner stopped it. The circled setting trained on the final seeds."
    )
    rows = []
    for arm in record.arms:
        states = [t.state for t in record.trials_of(arm.label)]
        chosen = record.chosen(arm)
        setting = ", ".join(f"{k}={v:.4g}" for k, v in chosen.params.items()) if chosen else "-"
        value = "-" if chosen is None or chosen.value is None else f"{chosen.value:.0f}"
        rows.append(f"| {arm.label} | {states.count(COMPLETE)} | {states.count(PRUNED)} | {setting} | {value} |")
    text = (
        "| arm | complete | pruned | chosen | its objective |\n|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
        f"The search trained {record.steps_trained:,} steps over all its runs, {saved:.0%} fewer than its "
        f"{record.steps_unpruned:,} without pruning. The verdict above compares the final runs only (seeds "
        f"{', '.join(map(str, record.final_seeds))}, unseen by the search); the search's runs are below search/.\n"
    )
    return Section("The tuning search", caption, fig, text)


FIGURES: dict[str, Callable[[Sweep], Section | None]] = {  # PNG file name -> the figure, in report order
    "best_lr.png": best_lr,
    "tuning.png": tuning_search,
    "metric_curves.png": metric_curves,
    "iterations_to_threshold.png": iterations_to_threshold,
    "steps_to_level.png": steps_to_level,
    "lr_sensitivity.png": lr_sensitivity,
    "batch_size.png": batch_size_sensitivity,
    "activation_percentiles.png": activation_percentiles,
    "ics.png": internal_covariate_shift,
    "landscape.png": landscape,
    "precise_bn.png": train_eval_precise_bn,
    "speedup.png": baseline_speedup,
}


# ---------------------------------------------------------------- the claims ledger


VERDICT_COLOURS = {HOLDS: "tab:green", FAILS: "tab:red", MIXED: "tab:orange"}


def claim(v: Verdict) -> Figure:
    """One claim of the ledger: each comparison's estimate with its 95 % interval (an arrow where it is open),
    the line of no effect, and shaded where the claim's prediction counts (beyond its tolerance, or within it
    for `equal`); ratios on a log scale. Colour: the comparison's verdict."""
    rows = v.estimates
    fig, axes = _figure(len(rows), 1, width=8.0, height=1.0 + 1.1 * len(rows))
    for ax, e in zip(axes[:, 0], rows):
        c, colour = e.comparison, VERDICT_COLOURS[e.verdict]
        none, tol = (1.0, c.tolerance) if c.ratio else (0.0, c.tolerance)
        finite = [x for x in (e.low, e.high, e.value, none) if math.isfinite(x) and (x > 0 or not c.ratio)]
        lo, hi = min(finite), max(finite)
        if c.ratio:
            ax.set_xscale("log")
            lo, hi = min(lo, 1 / tol, none) / 1.5, max(hi, tol, none) * 1.5
            for axis in (ax.xaxis.set_major_formatter, ax.xaxis.set_minor_formatter):
                axis(FuncFormatter(lambda x, _: f"{x:.3g}x"))
        else:
            pad = max(hi - lo, 2 * tol, 1e-6) * 0.3
            lo, hi = min(lo, -tol) - pad, max(hi, tol) + pad
        band = {
            "higher": (tol, hi),
            "lower": ((1 / tol if c.ratio else -tol), lo),
            "equal": ((1 / tol if c.ratio else -tol), tol),
        }[c.expect]
        ax.axvspan(*sorted(band), color="tab:green", alpha=0.12, lw=0)
        ax.axvline(none, color="0.3", lw=1)
        left, right = max(e.low, lo), min(e.high, hi)
        ax.plot([left, right], [0, 0], color=colour, lw=3, solid_capstyle="butt")
        for end, open_end in ((left, e.low < lo), (right, e.high > hi)):
            ax.plot([end], [0], marker=("<" if end == left else ">") if open_end else "|", ms=10, color=colour)
        ax.plot([e.value], [0], "o", color=colour, ms=8)
        ax.set_xlim(lo, hi)
        ax.set_yticks([])
        ax.set_ylim(-1, 1)
        unit = {"steps": "speed-up: the reference's steps over the arm's", "speed": "ratio, arm over reference"}.get(
            c.kind, "difference, arm minus reference"
        )
        ax.set_title(f"{c.why or c.metric}: {e.verdict}", fontsize=9, loc="left", color=colour)
        ax.set_xlabel(f"{c.metric} ({unit}; 95 % interval: {e.interval})", fontsize=8)
    fig.suptitle(f"{v.claim.name}: {v.verdict} (shaded: what the claim predicts)", fontsize=10)
    return fig
