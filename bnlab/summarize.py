"""Tables over many runs: read every summary.json below a folder and print one row per run.

Printed at the end of every `bnlab train -m` sweep (the `SweepTable` Hydra callback) and by
`bnlab summarize DIR`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from bnlab.files import read_json


def load_runs(root: Path) -> list[tuple[str, dict[str, Any]]]:
    """(run name, summary) for every summary.json below `root`; the name is the run's path under it."""
    return [(str(p.parent.relative_to(root)), read_json(p)) for p in sorted(root.rglob("summary.json"))]


def runs_table(title: str, runs: list[tuple[str, dict[str, Any]]]) -> Table:
    metrics = "/".join(sorted({s["threshold_metric"] for _, s in runs}))
    table = Table(title=f"{title}\niterations to reach each {metrics} threshold")
    table.add_column("run", overflow="fold")
    table.add_column("status", no_wrap=True)
    keys = sorted({k for _, s in runs for k in s["iterations_to_threshold"]}, key=float)
    for k in keys:
        table.add_column(k, justify="right")
    table.add_column("final test acc", justify="right")
    table.add_column("steps/s", justify="right")
    for name, s in runs:
        reached = s["iterations_to_threshold"]
        cells = ["-" if k not in reached else "never" if reached[k] is None else str(reached[k]) for k in keys]
        acc = s["final"].get("test_acc")
        table.add_row(name, s["status"], *cells, "-" if acc is None else f"{acc:.4f}", str(s["steps_per_s"] or "-"))
    return table


def summarize(root: Path, console: Console) -> list[tuple[str, dict[str, Any]]]:
    runs = load_runs(root)
    if runs:
        console.print(runs_table(str(root), runs))
    else:
        console.print(f"no summary.json below {root}")
    return runs


class SweepTable(Callback):
    """At the end of a multirun: the table of the sweep's runs; exit 1 if any run failed."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        runs = summarize(Path(config.hydra.sweep.dir), Console())
        if any(s["status"] == "failed" for _, s in runs):
            sys.exit(1)
