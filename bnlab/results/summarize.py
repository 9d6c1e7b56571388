"""Sweep tables: the groups of bnlab.results.analysis as a rich table on the console, summary.md, summary.csv
and the sweep's sweep.json; printed at the end of every `bnlab train -m` sweep and by `bnlab
summarize`. Also the short table at the end of a single run."""

from __future__ import annotations

import csv
import io
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.cells import cell_len
from rich.console import Console
from rich.table import Table

from bnlab.record.files import write_json, write_text
from bnlab.record.summary import SWEEP_FILE, SWEEP_SCHEMA_VERSION, Status, Summary
from bnlab.results.analysis import (
    RunGroup,
    Sweep,
    ThresholdStats,
    Verdict,
    group_runs,
    load_sweep,
    pairs,
    varying_keys,
)
from bnlab.results.verdict import LOWER, UPPER, Comparison
from bnlab.schema.metrics import METRICS, higher_is_better

COUNTED = (Status.COMPLETED, Status.STALLED, Status.DIVERGED, Status.FAILED)  # the ok/stall/div/fail column
STATUS_COLUMN = "ok/stall/div/fail"
RUNS, STEPS_PER_S, SPEEDUPS = "runs", "steps/s", "the same-lr speed-ups"
LEFT_OUT_TO_FIT = (STEPS_PER_S, SPEEDUPS, RUNS)  # what a narrow console's table leaves out, in this order
FINAL_NAMES = {  # final metrics -> their column
    "test_acc": "final test acc",
    "test_loss": "final test loss",  # the column of a regression, which has no accuracy
    "test_acc_train_mode": "test acc, train mode",
    "test_acc_precise_bn": "test acc, precise BN",
    "test_acc_shifted": "test acc, shifted",
    "test_acc_adabn": "test acc, AdaBN",
}
# shown when some run recorded them (trainer.precise_bn, trainer.shift)
FINALS = ("test_acc_train_mode", "test_acc_precise_bn", "test_acc_shifted", "test_acc_adabn")


def fmt_threshold(t: float) -> str:
    return f"{t:g}"


def fmt_spread(spread: tuple[float, float, float], number: str = "{:g}", unit: str = "") -> str:
    """A median and its range over seeds: '900 (800-1000)', or '3.20x (2.90-3.50)' with number '{:.2f}' and
    unit 'x'; the median alone where the range is one value."""
    med, lo, hi = spread
    text = number.format(med) + unit
    return text if lo == hi else f"{text} ({number.format(lo)}-{number.format(hi)})"


def _steps(x: float | None, seen: float) -> str:
    return f">{seen:g}" if x is None else f"{x:g}"


def fmt_iters(stats: ThresholdStats | None) -> str:
    """The median steps with its 95 % interval, '900 [700, 1100]' ('>3000' where it lies beyond the last step
    seen), and ', 1 never' when some seeds never reached the threshold; '>3000' alone where fewer than half did."""
    if stats is None:
        return "-"
    m = stats.median
    if not m.exact:
        return f">{m.seen:g} ({m.reached}/{m.seeds} reached)" if m.reached else "never"
    text = f"{m.steps:g}" if m.seeds < 2 else f"{m.steps:g} [{_steps(m.ci_low, m.seen)}, {_steps(m.ci_high, m.seen)}]"
    return f"{text}, {stats.never} never" if stats.never else text


def fmt_ratio(c: Comparison | Verdict) -> str:
    """A speed-up and its 95 % interval: '3.20x [2.90, 3.50]', '>=3.00x [>=2.50]' for a lower bound (the
    baseline's steps censored), '<=0.50x [<=0.80]' for an upper bound."""
    sign = {LOWER: ">=", UPPER: "<="}.get(c.bound, "")
    end = c.ci_low if c.bound == LOWER else c.ci_high if c.bound == UPPER else None
    if c.ci_low is None and c.ci_high is None:
        return f"{sign}{c.speedup:.2f}x"
    interval = f"{sign}{end:.2f}" if sign else f"{c.ci_low:.2f}, {c.ci_high:.2f}"
    return f"{sign}{c.speedup:.2f}x [{interval}]"


def fmt_speedup(group: RunGroup, t: float) -> str:
    """The speed-up over the norm=none twin at the same lr, with its interval (bnlab.results.verdict.compare)."""
    stats = group.thresholds.get(t)
    return "" if stats is None or stats.speedup is None else "vs none " + fmt_ratio(stats.speedup)


def fmt_verdict(v: Verdict, sweep: Sweep) -> str:
    """The sweep's answer for one norm, in one line: at the hardest threshold it has a verdict for; a best lr at
    either end of the grid tried is named, since a better one may lie beyond it."""
    arm, base = sweep.name(v.arm).removeprefix("norm="), sweep.name(v.baseline).removeprefix("norm=")
    sooner = v.speedup >= 1 or v.bound == LOWER
    ratio = fmt_ratio(v) if sooner else fmt_ratio(_inverse(v))
    faster = "" if v.faster_seeds is None else f", faster in {v.faster_seeds}/{v.seeds_arm} seeds"
    edges = [
        f"{name} {lr:g} ({edge})"
        for name, lr, label in ((arm, v.arm_lr, v.arm), (base, v.baseline_lr, v.baseline))
        if (edge := sweep.edge(label, lr))
    ]
    return (
        f"{arm} vs {base}, each at its best lr ({v.arm_lr:g} vs {v.baseline_lr:g}): {fmt_level(v.metric, v.threshold)}"
        f" in {ratio} {'fewer' if sooner else 'more'} steps{faster}"
        + (f"; best lr at the edge of the grid tried: {', '.join(edges)}" if edges else "")
    )


def fmt_level(metric: str, t: float) -> str:
    """A threshold in words: '97 % test accuracy', 'test loss 0.3'."""
    label = METRICS[metric].label.split(" (")[0]
    return f"{100 * t:g} % {label}" if METRICS[metric].accuracy else f"{label} {t:g}"


def _inverse(v: Verdict) -> Comparison:
    """The arm's steps over the baseline's: how many times more steps a slower arm needs."""
    flip = {LOWER: UPPER, UPPER: LOWER}.get(v.bound, v.bound)
    inv = [None if x is None else 1 / x for x in (v.ci_high, v.ci_low)]
    return Comparison(1 / v.speedup, inv[0], inv[1], flip, v.faster_seeds, v.seeds_arm, v.seeds_baseline)


def verdict_lines(sweep: Sweep) -> list[str]:
    """One line per norm: its verdict at the hardest threshold that has one."""
    last: dict[str, Verdict] = {}
    for v in sweep.verdicts:  # thresholds ascending: accuracies get harder, losses easier
        if v.arm not in last or higher_is_better(v.metric):
            last[v.arm] = v
    return [fmt_verdict(v, sweep) for v in last.values()]


def fmt_speed(speeds: tuple[float, float, float] | None) -> str:
    """Steps/s over a group's runs: '586.7', or '442.7 (23.8-861.5)' where its runs differ."""
    return "-" if speeds is None else fmt_spread(speeds, "{:.1f}")


def fmt_mean_std(mean: float | None, std: float | None) -> str:
    return "-" if mean is None else f"{mean:.4f}" + ("" if std is None else f"±{std:.4f}")


def fmt_status(group: RunGroup) -> str:
    interrupted, paused = group.count(Status.INTERRUPTED), group.count(Status.PAUSED)
    return (
        "/".join(str(group.count(s)) for s in COUNTED)
        + (f" +{interrupted} int." if interrupted else "")
        + (f" +{paused} paused" if paused else "")
    )


def finals(groups: list[RunGroup]) -> list[str]:
    """The final metrics shown: test accuracy (where no run has one, a regression's: test loss), and those that
    some run recorded beside it (train mode, precise BN)."""
    regression = any(g.final("test_loss") for g in groups) and not any(g.final("test_acc") for g in groups)
    return ["test_loss" if regression else "test_acc", *(m for m in FINALS if any(g.final(m) for g in groups))]


def cells(group: RunGroup, thresholds: list[float], metrics: list[str], sep: str, left_out: tuple = ()) -> list[str]:
    """A group's table cells after its label: runs, statuses, per threshold iterations and speed-up (joined
    by `sep`), each final metric (mean±std, its spread on a line of its own where `sep` breaks lines), steps/s;
    but the columns or lines named in `left_out`."""
    iters = [
        sep.join(
            filter(None, (fmt_iters(group.thresholds.get(t)), "" if SPEEDUPS in left_out else fmt_speedup(group, t)))
        )
        for t in thresholds
    ]
    accs = [fmt_mean_std(*group.mean_std(m)) for m in metrics]
    if sep == "\n":
        accs = [a.replace("±", "\n±") for a in accs]
    runs = [] if RUNS in left_out else [str(len(group.runs))]
    speed = [] if STEPS_PER_S in left_out else [fmt_speed(group.steps_per_s)]
    return [*runs, fmt_status(group), *iters, *accs, *speed]


def _thresholds(groups: list[RunGroup]) -> list[float]:
    return sorted({t for g in groups for t in g.thresholds})


def rich_table(
    title: str, groups: list[RunGroup], metric: str, sweeps: list[str] | None = None, left_out: tuple = ()
) -> Table:
    """The console table; with `sweeps`, a first column names each group's sweep; without the columns or
    lines named in `left_out` (LEFT_OUT_TO_FIT)."""
    below = "" if SPEEDUPS in left_out else ";\nbelow: speed-up over the norm=none twin at the same lr [95 % interval]"
    table = Table(title=f"{title}\niterations to each {metric} threshold, median [95 % interval] over seeds{below}")
    if sweeps:
        table.add_column("sweep", overflow="fold")
    longest = max((len(line) for g in groups for line in g.label.split(", ")), default=5)
    table.add_column("group", overflow="fold", min_width=min(longest, 32))
    if RUNS not in left_out:
        table.add_column(RUNS, justify="right")
    table.add_column(STATUS_COLUMN.replace("/div", "/\ndiv") if left_out else STATUS_COLUMN, justify="right")
    thresholds = _thresholds(groups)
    for t in thresholds:
        table.add_column(fmt_threshold(t), justify="right")
    metrics = finals(groups)
    for m in metrics:
        table.add_column(FINAL_NAMES[m], justify="right")
    if STEPS_PER_S not in left_out:
        table.add_column(STEPS_PER_S, justify="right")
    for i, g in enumerate(groups):
        label = g.label.replace(", ", "\n")
        table.add_row(*([sweeps[i]] if sweeps else []), label, *cells(g, thresholds, metrics, "\n", left_out))
    return table


def _fits(table: Table, width: int) -> bool:
    """Whether the table renders within `width` columns, no line cropped."""
    trial = Console(width=width, file=io.StringIO())
    trial.print(table, crop=False)
    return max(map(cell_len, trial.file.getvalue().splitlines()), default=0) <= width


def fitted_table(console: Console, *args: Any, **kwargs: Any) -> Table:
    """rich_table, leaving out the columns and lines of LEFT_OUT_TO_FIT in that order until it fits the
    console's width uncropped; its caption says what was left out and where it is."""
    for n in range(len(LEFT_OUT_TO_FIT) + 1):
        table = rich_table(*args, **kwargs, left_out=LEFT_OUT_TO_FIT[:n])
        if _fits(table, console.width):
            break
    else:  # rich shares the width out unevenly: each column at most its longest word, every cell wrapped
        for column in table.columns:
            words = (w for cell in [column.header, *column.cells] for w in str(cell).split())
            column.max_width = max(map(cell_len, words), default=1)
    if n:
        left_out = ", ".join(LEFT_OUT_TO_FIT[:n])
        table.caption = f"left out to fit {console.width} columns: {left_out} (summary.md has them)"
    return table


def markdown(groups: list[RunGroup], metric: str) -> str:
    thresholds, metrics = _thresholds(groups), finals(groups)
    head = ["group", "runs", STATUS_COLUMN, *(f"iters to {metric} {t:g}" for t in thresholds)]
    head += [*(FINAL_NAMES[m] for m in metrics), "steps/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        lines.append("| " + " | ".join([g.label, *cells(g, thresholds, metrics, "; ")]) + " |")
    return "\n".join(lines) + "\n"


def record(group: RunGroup) -> dict[str, Any]:
    """A group as one JSON record (the sweep's sweep.json), thresholds as numbers."""
    return {
        "group": group.label,
        "keys": group.keys,
        "runs": len(group.runs),
        "statuses": {s.value: group.count(s) for s in Status if s != Status.RUNNING},
        "thresholds": [
            {
                "threshold": t,
                "median_steps": stats.median.steps,
                "median_ci_low": stats.median.ci_low,
                "median_ci_high": stats.median.ci_high,
                "median_exact": stats.median.exact,
                "reached": stats.median.reached,
                "seeds": stats.median.seeds,
                "speedup": stats.speedup and asdict(stats.speedup),
                **compute(stats),
            }
            for t, stats in group.thresholds.items()
        ],
        "final": {
            m: {**dict(zip(("mean", "std"), group.mean_std(m))), "min": min(v), "max": max(v)}
            for m in METRICS
            if (v := group.final(m))
        },
        "max_steps": group.budget,
        "eval_every": group.runs[0].summary.config.get("trainer", {}).get("eval_every"),
        "steps_per_s": group.steps_per_s and dict(zip(("median", "min", "max"), group.steps_per_s)),
        "flops_per_step": group.flops_per_step,
    }


def compute(stats: ThresholdStats) -> dict[str, Any]:
    """The seconds and FLOPs to a threshold, median and 95 % interval (None: not recorded)."""
    seconds = stats.seconds
    out = dict(
        zip(
            ("median_seconds", "median_seconds_ci_low", "median_seconds_ci_high"),
            (seconds.steps, seconds.ci_low, seconds.ci_high) if seconds else (None,) * 3,
        )
    )
    out.update(zip(("median_flops", "median_flops_ci_low", "median_flops_ci_high"), stats.flops or (None,) * 3))
    return out


def to_csv(groups: list[RunGroup]) -> str:
    """One row per group, every figure in its own column (`iters_to_0.9_median`, `speedup_0.9_min`, ...)."""
    rows = []
    for g in groups:
        row: dict[str, Any] = {"group": g.label, **g.keys, "runs": len(g.runs)}
        row.update({s.value: g.count(s) for s in Status if s != Status.RUNNING})
        for t, stats in g.thresholds.items():
            m, c = stats.median, stats.speedup
            values = (m.steps, m.ci_low, m.ci_high, m.exact, m.reached, m.seeds)
            row.update(
                zip(
                    (f"iters_to_{t:g}_{s}" for s in ("median", "ci_low", "ci_high", "exact", "reached", "seeds")),
                    values,
                )
            )
            row.update({k.replace("median", f"to_{t:g}"): v for k, v in compute(stats).items()})
            c_values = (c.speedup, c.ci_low, c.ci_high, c.bound) if c else (None,) * 4
            row.update(zip((f"speedup_{t:g}_{s}" for s in ("ratio", "ci_low", "ci_high", "bound")), c_values))
        for m in finals(groups):
            row[f"final_{m}_mean"], row[f"final_{m}_std"] = g.mean_std(m)
        row.update(zip((f"steps_per_s_{s}" for s in ("median", "min", "max")), g.steps_per_s or (None,) * 3))
        row["flops_per_step"] = g.flops_per_step
        rows.append(row)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def summarize(root: Path, console: Console, include_failed: bool = False, out: Path | None = None) -> Sweep | None:
    """Print the table of the runs below `root` and write summary.csv, summary.md and sweep.json into `out`
    (default: `root`; where that cannot be written, as a read-only sweep, the table is printed only and
    the reason said); None if there are no runs to show."""
    sweep = load_sweep(root, include_failed=include_failed)
    if not sweep.runs:
        console.print(f"no runs to show below {root}" + (f"; {sweep.left_out_note}" if sweep.left_out_note else ""))
        return None if not sweep.left_out else sweep
    metric = sweep.metric
    console.print(fitted_table(console, str(root), sweep.groups, metric))
    if sweep.left_out_note:
        console.print(sweep.left_out_note, soft_wrap=True, highlight=False)
    for line in verdict_lines(sweep):
        console.print(line, soft_wrap=True, highlight=False)
    folder = out or root
    intro = f"# {root}\n\n{verdict_markdown(sweep)}Iterations to reach each {metric} threshold.\n\n"
    table = {
        "schema_version": SWEEP_SCHEMA_VERSION,
        "threshold_metric": metric,
        "groups": [record(g) for g in sweep.groups],
        "verdicts": [asdict(v) for v in sweep.verdicts],
        "failed_left_out": len(sweep.left_out),
        "unreadable": sweep.unreadable,
    }
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_text(folder / "summary.csv", to_csv(sweep.groups))
        write_text(folder / "summary.md", intro + markdown(sweep.groups, metric))
        write_json(folder / SWEEP_FILE, table)
    except OSError as e:  # a read-only sweep, or a full disk: the table above is still the answer
        console.print(f"{e}: the table is printed only (--out DIR writes its files elsewhere)", soft_wrap=True)
    return sweep


def fmt_compute(stats: ThresholdStats) -> str:
    """Median steps, seconds and FLOPs to a threshold: '1200 steps, 9.4 s, 31.7 GFLOP' ('>' where censored)."""
    m, seconds, flops = stats.median, stats.seconds, stats.flops
    more = "" if m.exact else ">"
    parts = [f"{more}{m.steps:g} steps"]
    if seconds is not None:
        parts.append(f"{'' if seconds.exact else '>'}{seconds.steps:.1f} s")
    if flops is not None:
        parts.append(f"{more}{flops[0] / 1e9:.3g} GFLOP")
    return ", ".join(parts)


def compute_markdown(sweep: Sweep) -> str:
    """The verdict's groups (each norm at its best lr, no normalization at its own) by median steps, seconds of
    the training loop and FLOPs to each threshold: a norm that needs fewer steps but costs more per step shows
    as such. '' without a verdict."""
    groups: dict[str, RunGroup] = {}
    for label, arm, base_label, base in pairs(sweep):
        groups.setdefault(base_label, base)
        groups[label] = arm
    if not groups:
        return ""
    head = ["group", "lr", "GFLOP/step", "steps/s", *(fmt_level(sweep.metric, t) for t in sweep.thresholds)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, g in groups.items():
        flops = "-" if g.flops_per_step is None else f"{g.flops_per_step / 1e9:.3g}"
        cells = [label, f"{g.lr:g}", flops, fmt_speed(g.steps_per_s)]
        cells += [fmt_compute(g.thresholds[t]) if t in g.thresholds else "-" for t in sweep.thresholds]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def verdict_markdown(sweep: Sweep) -> str:
    """The verdict lines as a markdown list, first in summary.md and report.md."""
    lines = verdict_lines(sweep)
    return "".join(f"- {line}\n" for line in lines) + "\n" if lines else ""


def compare(roots: list[Path], console: Console, include_failed: bool = False) -> list[tuple[str, RunGroup]]:
    """Several sweeps side by side: the same groups (named by the keys that vary over all of them) next to each
    other; failed runs only with `include_failed`."""
    runs = {root: load_sweep(root, include_failed=include_failed).runs for root in roots}
    keys = varying_keys(r.flat_config for rs in runs.values() for r in rs)
    rows = [(str(root), g) for root, rs in runs.items() for g in group_runs(rs, keys)]
    rows.sort(key=lambda row: [(type(v).__name__, v) for v in row[1].keys.values()])
    metric = next((r.summary.threshold_metric for rs in runs.values() for r in rs), "test_acc")
    title = " vs ".join(map(str, roots))
    console.print(fitted_table(console, title, [g for _, g in rows], metric, sweeps=[s for s, _ in rows]))
    return rows


def run_table(name: str, summary: Summary) -> Table:
    """The short table printed at the end of a run."""
    table = Table(title=f"{name}: {summary.status.value} after {summary.steps} steps ({summary.steps_per_s} steps/s)")
    table.add_column(f"{summary.threshold_metric} threshold")
    table.add_column("iterations to reach it", justify="right")
    for t, v in summary.iterations_to_threshold.items():
        table.add_row(fmt_threshold(t), "never" if v is None else str(v))
    for k, v in summary.final.items():
        table.add_row(f"final {k}", "-" if v is None else f"{v:.4f}")
    return table
