"""Record a sweep as a section of docs/results.md: its numbers go to docs/results/SECTION.json (each group
of the sweep table, thresholds as numbers, every final metric with its spread over seeds; ICS and landscape
diagnostics in one number per group; Ioffe & Szegedy's speed-up where the sweep has it; a tuning sweep's search) and its
provenance (the sweep folder's provenance.json: command, bnlab commit, torch, machine, device, threads,
wall time) into the section's provenance block of docs/results.md, between the markers
<!-- provenance:SECTION --> and <!-- /provenance -->. `scripts/reproduce.py SECTION` re-runs it.

    python scripts/record_result.py lr_sensitivity outputs/sweeps/2026-11-22_10-00-00
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

from bnlab.record.tuning import Tuning
from bnlab.results.analysis import RunGroup, Sweep, baseline_speedup, load_sweep, over_training
from bnlab.results.summarize import record

DOCS = Path(__file__).resolve().parents[1] / "docs"


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


def provenance_text(section: str, p: dict) -> str:
    """The provenance block of a section, one paragraph."""
    commit = (p.get("bnlab_commit") or "not a git checkout")[:12]
    runs = ", ".join(f"{n} {status}" for status, n in p.get("runs", {}).items())
    minutes = p["wall_time_s"] / 60
    kernels = f"{p['cpu_kernels']} CPU kernels, " if "cpu_kernels" in p else ""
    return (
        f"> Produced by `{p['command']}` with bnlab {p['bnlab_version']} (commit {commit}), torch {p['torch']}, "
        f"Python {p['python']}, on {p['machine']} ({p['device']}, {p['torch_threads']} torch threads per run, "
        f"{kernels}{p['launcher']}): {runs} in {minutes:.1f} min, {p['started'][:10]}. Its numbers: "
        f"[results/{section}.json](results/{section}.json); run it again with "
        f"`python scripts/reproduce.py {section}` (`--scale 0.25` for a quick look)."
    )


def diagnostics(sweep: Sweep) -> dict:
    """Per group, every ICS and landscape scalar the runs logged in one number (analysis.over_training)."""
    tags = sorted({t for r in sweep.runs for t in r.scalars if t.startswith(("ics/", "landscape/"))})
    return {
        g.label: {t: dict(zip(("mean", "std", "min", "max"), v)) for t in tags if (v := over_training(g, t))}
        for g in sweep.groups
        if g.results
    }


def speedup(sweep: Sweep) -> dict | None:
    """Ioffe & Szegedy's comparison (bnlab.results.analysis.baseline_speedup), where the sweep has one."""
    result = baseline_speedup(sweep)
    if result is None:
        return None
    keys = ("norm", "multiple", "lr", "steps", "never", "speedup", "peak")
    rows = [{k: getattr(row, k) for k in keys} for row in [result.baseline, *result.rows]]
    return {"target": result.target, "rows": rows}


def main(section: str, sweep_dir: Path) -> int:
    provenance = json.loads((sweep_dir / "provenance.json").read_text())
    sweep = load_sweep(sweep_dir)
    result = {
        "section": section,
        "provenance": provenance,
        "threshold_metric": sweep.metric,
        "groups": [{**record(g), "spreads": spreads(g)} for g in sweep.groups],
    }
    if diag := diagnostics(sweep):
        result["diagnostics"] = diag
    if ioffe := speedup(sweep):
        result["speedup"] = ioffe
    if tuning := Tuning.load(sweep_dir):  # a tuning sweep: its search, beside its final runs' groups
        result["tuning"] = asdict(tuning)
    (DOCS / "results").mkdir(exist_ok=True)
    (DOCS / "results" / f"{section}.json").write_text(json.dumps(result, indent=1) + "\n")
    doc = (DOCS / "results.md").read_text()
    block = f"<!-- provenance:{section} -->\n{provenance_text(section, provenance)}\n<!-- /provenance -->"
    pattern = re.compile(rf"<!-- provenance:{re.escape(section)} -->.*?<!-- /provenance -->", re.S)
    if not pattern.search(doc):
        print(f"docs/results.md has no block for {section}; put this in its section:\n\n{block}")
        return 1
    (DOCS / "results.md").write_text(pattern.sub(lambda _: block, doc))
    print(f"recorded {section}: {len(sweep.groups)} groups, provenance in docs/results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], Path(sys.argv[2])))
