"""Record a sweep as a section of docs/results.md: its numbers go to docs/results/SECTION.json
(bnlab.results.recorded: each group of the sweep table, its diagnostics, speed-up and search) and its
provenance (the sweep folder's provenance.json: command, bnlab commit, torch, machine, device, threads,
wall time) into the section's provenance block of docs/results.md, between the markers
<!-- provenance:SECTION --> and <!-- /provenance -->. `scripts/reproduce.py SECTION` re-runs it.

    python scripts/record_result.py lr_sensitivity outputs/sweeps/2026-11-22_10-00-00
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from bnlab.results.analysis import load_sweep
from bnlab.results.recorded import numbers

DOCS = Path(__file__).resolve().parents[1] / "docs"


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


def main(section: str, sweep_dir: Path) -> int:
    provenance = json.loads((sweep_dir / "provenance.json").read_text())
    sweep = load_sweep(sweep_dir)
    result = {"section": section, "provenance": provenance, **numbers(sweep, sweep_dir)}
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
