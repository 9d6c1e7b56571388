"""A sweep's numbers as docs/results/SECTION.json keeps them (scripts/record_result.py writes them there;
`bnlab claims check` decides a claim on a fresh sweep's): each group of the sweep table with thresholds as
numbers and every final metric with its spread over seeds, the diagnostics in one number per run and
group (ICS, landscape, the gradient norms' ratios between layers), Ioffe & Szegedy's speed-up where the
sweep has it, and a tuning sweep's search."""

from __future__ import annotations

import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bnlab.record.tuning import Tuning
from bnlab.results.analysis import RunGroup, Sweep, baseline_speedup, grad_norm_ratios, over_training
from bnlab.results.summarize import record

STATS = ("mean", "std", "min", "max")


def spreads(group: RunGroup) -> list[dict]:
    """Per threshold the steps of the seeds that reached it (median, min, max) and how many never did: what
    scripts/reproduce.py holds a re-run to."""
    out = []
    for t in group.thresholds:
        reached = [r.summary.iterations_to_threshold.get(t) for r in group.results]
        steps = sorted(s for s in reached if s is not None)
        spread = {"median": statistics.median(steps), "min": steps[0], "max": steps[-1]} if steps else None
        out.append({"threshold": t, "iterations": spread, "never": reached.count(None)})
    return out


def diagnostics(sweep: Sweep) -> dict:
    """Per group, every ICS and landscape scalar the runs logged in one number (analysis.over_training), and the
    gradient norms' ratios between layers (analysis.grad_norm_ratios)."""
    tags = sorted({t for r in sweep.runs for t in r.scalars if t.startswith(("ics/", "landscape/"))})
    out = {}
    for g in sweep.groups:
        if g.results:
            numbers = {t: v for t in tags if (v := over_training(g, t))} | grad_norm_ratios(g)
            out[g.label] = {t: dict(zip(STATS, v)) for t, v in numbers.items()}
    return out


def speedup(sweep: Sweep) -> dict | None:
    """Ioffe & Szegedy's comparison (bnlab.results.analysis.baseline_speedup), where the sweep has one."""
    result = baseline_speedup(sweep)
    if result is None:
        return None
    keys = ("norm", "multiple", "lr", "steps", "never", "speedup", "peak")
    rows = [{k: getattr(row, k) for k in keys} for row in [result.baseline, *result.rows]]
    return {"target": result.target, "rows": rows}


def numbers(sweep: Sweep, sweep_dir: Path) -> dict[str, Any]:
    """The sweep's numbers, without its section name and provenance."""
    out: dict[str, Any] = {
        "threshold_metric": sweep.metric,
        "groups": [{**record(g), "spreads": spreads(g)} for g in sweep.groups],
    }
    if diag := diagnostics(sweep):
        out["diagnostics"] = diag
    if ioffe := speedup(sweep):
        out["speedup"] = ioffe
    if tuning := Tuning.load(sweep_dir):  # a tuning sweep: its search, beside its final runs' groups
        out["tuning"] = asdict(tuning)
    return out
