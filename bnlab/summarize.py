"""Sweep tables: the runs below a folder grouped by their config minus the seed, with the spread over seeds.

Per group: run counts by status, iterations to each threshold (median and min-max over the runs
that reached it, and how many never did), final test accuracy (mean and std), steps/s, and the
speed-up over the group's no-normalization twin (the same config with norm=none), paired by seed.
Printed at the end of every `bnlab train -m` sweep (the `SweepTable` Hydra callback) and by
`bnlab summarize`, and written to summary.csv, summary.md and summary.json in the folder.
"""

from __future__ import annotations

import csv
import io
import statistics
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from bnlab.config import BOOKKEEPING_KEYS, flatten
from bnlab.files import read_json, write_json, write_text

STATUSES = ("completed", "diverged", "failed", "interrupted")
Row = dict[str, Any]


def load_run_dirs(root: Path) -> list[tuple[Path, dict[str, Any]]]:
    """(run directory, summary) for every run below `root`: each summary.json with a status and a
    config (a sweep's own summary.json, a table, is not a run)."""
    found = ((p.parent, read_json(p)) for p in sorted(root.rglob("summary.json")))
    return [(d, s) for d, s in found if isinstance(s, dict) and "status" in s and "config" in s]


def load_runs(root: Path) -> list[dict[str, Any]]:
    """The summary of every run below `root`."""
    return [s for _, s in load_run_dirs(root)]


def _short(key: str) -> str:
    """'norm.name' -> 'norm' (the group's option), other keys as they are."""
    return key.removesuffix(".name")


def _spread(values: list[float], digits: int = 0) -> tuple[float, float, float] | None:
    """(median, min, max), or None for no values."""
    if not values:
        return None
    return round(statistics.median(values), digits or None), min(values), max(values)


def _speedups(runs: list[dict[str, Any]], twin: list[dict[str, Any]], key: str) -> tuple[list[float], bool]:
    """Per seed: twin iterations / this group's iterations to threshold `key`.

    A twin run that never reached the threshold counts with its step budget (trainer.max_steps), so
    the ratio is a lower bound, flagged by the second return value. Seeds where this group never
    reached it are left out.
    """
    twin_by_seed = {s["config"]["seed"]: s for s in twin}
    ratios, lower_bound = [], False
    for s in runs:
        t = twin_by_seed.get(s["config"]["seed"])
        ours = s["iterations_to_threshold"].get(key)
        if t is None or not ours:
            continue
        theirs = t["iterations_to_threshold"].get(key)
        lower_bound |= theirs is None
        ratios.append((theirs or t["config"]["trainer"]["max_steps"]) / ours)
    return ratios, lower_bound


def group_rows(runs: list[dict[str, Any]], varying: list[str] | None = None) -> list[Row]:
    """One row per group of runs that share their config but the seed; `varying` names the label keys."""
    flat = [flatten(s["config"]) for s in runs]
    if varying is None:
        varying = varying_keys(flat)
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for s, f in zip(runs, flat):
        groups.setdefault(tuple(f.get(k) for k in varying), []).append(s)

    def results(members: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [s for s in members if s["status"] in ("completed", "diverged")]

    def twin_of(label: tuple) -> list[dict[str, Any]]:
        """The runs with the same config but norm=none (not this group itself)."""
        want = {k: v for k, v in zip(varying, label) if not k.startswith("norm.")}
        for other, members in groups.items():
            o = dict(zip(varying, other))
            is_none = members[0]["config"]["norm"]["name"] == "none"
            if other != label and is_none and all(o[k] == v for k, v in want.items()):
                return results(members)
        return []

    thresholds = sorted({k for s in runs for k in s["iterations_to_threshold"]}, key=float)
    rows = []
    for label, members in groups.items():
        done, twin = results(members), twin_of(label)
        row: Row = {
            "group": ", ".join(f"{_short(k)}={v}" for k, v in zip(varying, label)) or "all runs",
            **dict(zip(varying, label)),
            "runs": len(members),
            **{status: sum(s["status"] == status for s in members) for status in STATUSES},
        }
        for k in thresholds:
            reached = [s["iterations_to_threshold"].get(k) for s in done]
            spread = _spread([v for v in reached if v is not None])
            row.update(dict(zip((f"iters_{k}_median", f"iters_{k}_min", f"iters_{k}_max"), spread or (None,) * 3)))
            row[f"iters_{k}_never"] = sum(v is None for v in reached)
            ratios, lower = _speedups(done, twin, k)
            spread = _spread(ratios, digits=2)
            row.update(
                dict(zip((f"speedup_{k}_median", f"speedup_{k}_min", f"speedup_{k}_max"), spread or (None,) * 3))
            )
            row[f"speedup_{k}_lower_bound"] = lower
        accs = [s["final"]["test_acc"] for s in done if "test_acc" in s["final"]]
        row["final_test_acc_mean"] = round(statistics.fmean(accs), 4) if accs else None
        row["final_test_acc_std"] = round(statistics.stdev(accs), 4) if len(accs) > 1 else None
        speeds = [s["steps_per_s"] for s in done if s["steps_per_s"]]
        row["steps_per_s_mean"] = round(statistics.fmean(speeds), 1) if speeds else None
        rows.append(row)
    return sorted(rows, key=lambda r: [(type(r[k]).__name__, r[k]) for k in varying])  # numbers in numeric order


def varying_keys(flat_configs: Iterable[dict[str, Any]]) -> list[str]:
    """The config keys (seed and bookkeeping aside) whose values differ between runs: what names a group."""
    flat_configs = list(flat_configs)
    keys = sorted({k for f in flat_configs for k in f} - {"seed", *BOOKKEEPING_KEYS})
    return [k for k in keys if len({repr(f.get(k)) for f in flat_configs}) > 1]


def thresholds_of(rows: list[Row]) -> list[str]:
    return sorted({k.split("_")[1] for r in rows for k in r if k.startswith("iters_")}, key=float)


def fmt_iters(row: Row, k: str) -> str:
    """'900 (800-1000)', with ', 1 never' when some runs never reached the threshold; 'never' if none did."""
    med, lo, hi, never = (row[f"iters_{k}_{s}"] for s in ("median", "min", "max", "never"))
    if med is None:
        return "never" if never else "-"
    text = f"{med:g}" if lo == hi else f"{med:g} ({lo}-{hi})"
    return f"{text}, {never} never" if never else text


def fmt_speedup(row: Row, k: str) -> str:
    """'3.20x (2.90-3.50)' over the no-norm twin, prefixed '>=' when the twin never reached the threshold."""
    med, lo, hi = (row[f"speedup_{k}_{s}"] for s in ("median", "min", "max"))
    if med is None:
        return ""
    prefix = ">=" if row[f"speedup_{k}_lower_bound"] else ""
    return f"{prefix}{med:.2f}x" + ("" if lo == hi else f" ({lo:.2f}-{hi:.2f})")


def fmt_acc(row: Row) -> str:
    mean, std = row["final_test_acc_mean"], row["final_test_acc_std"]
    return "-" if mean is None else f"{mean:.4f}" + ("" if std is None else f"±{std:.4f}")


def fmt_status(row: Row) -> str:
    return "/".join(str(row[s]) for s in STATUSES[:3]) + (f" +{row['interrupted']} int." if row["interrupted"] else "")


def cells(row: Row, thresholds: list[str], sep: str) -> list[str]:
    """A row's table cells after the group: runs, statuses, per threshold iterations and speed-up (joined
    by `sep`), final test accuracy, steps/s."""
    iters = [sep.join(filter(None, (fmt_iters(row, k), fmt_speedup(row, k)))) for k in thresholds]
    return [str(row["runs"]), fmt_status(row), *iters, fmt_acc(row), str(row["steps_per_s_mean"] or "-")]


def rich_table(title: str, rows: list[Row], metric: str, sweep_column: bool = False) -> Table:
    table = Table(
        title=f"{title}\niterations to each {metric} threshold, median (min-max) over seeds;\nbelow: speed-up over the norm=none twin"
    )
    if sweep_column:
        table.add_column("sweep", overflow="fold")
    longest = max((len(line) for r in rows for line in r["group"].split(", ")), default=5)
    table.add_column("group", overflow="fold", min_width=min(longest, 32))
    table.add_column("runs", justify="right")
    table.add_column("ok/div/fail", justify="right", no_wrap=True)
    for k in thresholds_of(rows):
        table.add_column(k, justify="right")
    table.add_column("final test acc", justify="right")
    table.add_column("steps/s", justify="right")
    for r in rows:
        table.add_row(
            *([r["sweep"]] if sweep_column else []),
            r["group"].replace(", ", "\n"),
            *cells(r, thresholds_of(rows), "\n"),
        )
    return table


def markdown(rows: list[Row], metric: str) -> str:
    ks = thresholds_of(rows)
    head = ["group", "runs", "ok/div/fail", *(f"iters to {metric} {k}" for k in ks), "final test acc", "steps/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([r["group"], *cells(r, ks, " ")]) + " |")
    return "\n".join(lines) + "\n"


def to_csv(rows: list[Row]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def summarize(root: Path, console: Console) -> list[Row]:
    """Print the table of the runs below `root` and write summary.csv, summary.md and summary.json there."""
    runs = load_runs(root)
    if not runs:
        console.print(f"no summary.json below {root}")
        return []
    rows = group_rows(runs)
    metric = runs[0]["threshold_metric"]
    console.print(rich_table(str(root), rows, metric))
    write_text(root / "summary.csv", to_csv(rows))
    write_text(
        root / "summary.md", f"# {root}\n\nIterations to reach each {metric} threshold.\n\n" + markdown(rows, metric)
    )
    write_json(root / "summary.json", {"threshold_metric": metric, "groups": rows})
    return rows


def compare(roots: list[Path], console: Console) -> list[Row]:
    """Several sweeps side by side: the same groups (named by the keys that vary over all of them) next to each other."""
    runs = {root: load_runs(root) for root in roots}
    varying = varying_keys(flatten(s["config"]) for rs in runs.values() for s in rs)
    rows = [{"sweep": str(root), **row} for root, rs in runs.items() for row in group_rows(rs, varying)]
    rows.sort(key=lambda r: [(type(r[k]).__name__, r[k]) for k in varying])
    metric = next((s["threshold_metric"] for rs in runs.values() for s in rs), "test_acc")
    console.print(rich_table(" vs ".join(map(str, roots)), rows, metric, sweep_column=True))
    return rows


def table_console() -> Console:
    """The terminal's width, or 160 columns where output goes to a file or a CI log (rich would use 80)."""
    return Console() if sys.stdout.isatty() else Console(width=160)


class SweepTable(Callback):
    """At the end of a multirun: the sweep's table and summary files; exit 1 if any run failed."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        rows = summarize(Path(config.hydra.sweep.dir), table_console())
        if any(r["failed"] for r in rows):
            sys.exit(1)
