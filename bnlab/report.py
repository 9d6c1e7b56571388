"""`bnlab report DIR`: report.md and the figures (bnlab.figures) of the runs below a folder, written
into it: the sweep table, then each figure whose data some run logged, with its caption and text."""

from __future__ import annotations

from pathlib import Path

from bnlab.analysis import at_best_lr, load_sweep
from bnlab.figures import DPI, FIGURES
from bnlab.files import write_text
from bnlab.summarize import markdown
from bnlab.summary import Status

REPORT = "report.md"


def write_report(root: Path) -> Path:
    """Read every run below `root`, write the figures that have data and report.md into `root`; return
    report.md's path. Figures of an earlier report that have no data now are removed, so report.md and
    the folder agree."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    sweep = load_sweep(root)
    path = root / REPORT
    if not sweep.runs:
        write_text(path, f"# bnlab report: {root}\n\nNo runs (summary.json files) below {root}.\n")
        return path
    statuses = [r.summary.status for r in sweep.runs]
    counts = ", ".join(f"{n} {s.value}" for s in Status if (n := statuses.count(s)))
    parts = [
        f"# bnlab report: {root}\n",
        f"{len(sweep.runs)} runs ({counts}) in {len(sweep.groups)} groups (config minus the seed); threshold "
        f"metric: {sweep.metric}. Curves and bars: median over seeds, band or error bars min-max, unless a "
        "caption says otherwise.\n",
        "## Sweep table\n",
        f"Iterations to reach each {sweep.metric} threshold, median (min-max) over seeds, with the speed-up over "
        "the norm=none twin; final test accuracy mean±std.\n",
        markdown(sweep.groups, sweep.metric),
    ]
    if best := at_best_lr(sweep):
        parts += [
            "## At the best learning rate\n",
            "Each group of runs that differ only in optim.lr at its best lr: the one whose runs all completed with "
            "the highest mean final test accuracy (columns as in the sweep table).\n",
            markdown(best, sweep.metric),
        ]
    for name, make in FIGURES.items():
        section = make(sweep)
        if section is None:
            (root / name).unlink(missing_ok=True)
            continue
        section.figure.savefig(root / name, dpi=DPI)
        parts += [f"## {section.title}\n", f"![{section.title}]({name})\n", f"*{section.caption}*\n"]
        if section.text:
            parts.append(section.text)
    write_text(path, "\n".join(parts))
    return path
