"""`bnlab report DIR`: report.md and the figures (bnlab.results.figures) of the runs below a folder, written
into it: the sweep table, then each figure whose data some run logged, with its caption and text."""

from __future__ import annotations

import io
from pathlib import Path

from matplotlib.figure import Figure

from bnlab.record.files import write_bytes, write_text
from bnlab.record.summary import Status
from bnlab.results.analysis import load_sweep
from bnlab.results.figures import DPI, FIGURES, Section
from bnlab.results.summarize import compute_markdown, markdown, verdict_markdown

REPORT = "report.md"
HEADLINES = ("best_lr.png", "tuning.png")  # figures before the sweep table
COMPUTE = """## Steps, seconds and FLOPs

The verdict's groups by what reaching each threshold took, median over seeds: optimizer steps, seconds of the
training loop (evaluations included; a fused run's seconds are those of the stack it trained in) and FLOPs
(torch.utils.flop_counter's count of one training step's matrix products and convolutions, times the steps;
the elementwise work of a norm is not in it, so its cost per step shows in the seconds). '>': beyond the
last step seen, fewer than half the seeds got there.
"""
NOTATION = """## Notation

- Every figure and table is over seeds: iterations as the median with its 95 % interval, curves as the
  median with a min-max band; accuracies in tables are mean±std.
- A group is a config minus its seed. In every figure its colour is its norm (norm=none dark grey), its line
  style (on bars, its hatch) its learning rate, and its marker what else varies.
- Iterations to a threshold: the first evaluated step at which the metric reached it. A seed that never
  did is censored at the last step it was seen at, never counted as reaching it there; the median is the
  Kaplan-Meier median (`>N`: beyond the last step seen, N; `k never`: k seeds did not reach it).
- Speed-up: the norm=none twin's median iterations over this group's, with a 95 % bootstrap interval
  (paired by seed); `>=` a lower bound (some no-norm seeds never got there), `<=` an upper bound. The
  verdict compares each norm at its best lr with no normalization at its own, by the same rule.
- ok/stall/div/fail: runs completed, stalled (completed no better than chance), diverged and failed.
"""


def write_report(root: Path, include_failed: bool = False, out: Path | None = None) -> Path:
    """Read every run below `root` (failed runs only with `include_failed`), write the figures that have
    data and report.md into `out` (default: `root`); return report.md's path. Figures of an earlier report
    that have no data now are removed, so report.md and the folder agree."""
    root = Path(root)
    sweep = load_sweep(root, include_failed=include_failed)
    folder = Path(out or root)
    if out is not None:
        folder.mkdir(parents=True, exist_ok=True)
    path = folder / REPORT
    if not sweep.runs:
        note = f" ({sweep.left_out_note})" if sweep.left_out_note else ""
        write_text(path, f"# bnlab report: {root}\n\nNo runs to show below {root}{note}.\n")
        return path
    statuses = [r.summary.status for r in sweep.runs]
    counts = ", ".join(f"{n} {s.value}" for s in Status if (n := statuses.count(s)))
    parts = [
        f"# bnlab report: {root}\n",
        f"{len(sweep.runs)} runs ({counts}) in {len(sweep.groups)} groups (config minus the seed); threshold "
        f"metric: {sweep.metric}." + (f" {sweep.left_out_note}." if sweep.left_out_note else "") + "\n",
        *[
            f"TensorBoard events of {r.dir.relative_to(root)} end at step {at}, before its last step {r.summary.steps}"
            " (cut off?): its curves stop there.\n"
            for r in sweep.runs
            if (at := r.events_cut_at) is not None
        ],
        *(["## The verdict\n", verdict_markdown(sweep)] if sweep.verdicts else []),
        *([COMPUTE, table] if (table := compute_markdown(sweep)) else []),
        NOTATION,
    ]
    sections = {name: make(sweep) for name, make in FIGURES.items()}
    for name in HEADLINES:
        parts += _section(folder, name, sections.pop(name))
    parts += [
        "## Sweep table: every group at its own settings\n",
        f"Iterations to reach each {sweep.metric} threshold, median [95 % interval] over seeds, with the speed-up "
        "over the norm=none twin at the same settings [95 % interval]; final metrics mean±std.\n",
        markdown(sweep.groups, sweep.metric),
    ]
    for name, section in sections.items():
        parts += _section(folder, name, section)
    write_text(path, "\n".join(parts))
    return path


def png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=DPI, format="png")
    return buffer.getvalue()


def _section(folder: Path, name: str, section: Section | None) -> list[str]:
    """A figure's markdown, its PNG written beside report.md (or an earlier one removed: no data now)."""
    if section is None:
        (folder / name).unlink(missing_ok=True)
        return []
    write_bytes(folder / name, png(section.figure))
    return [
        f"## {section.title}\n",
        f"![{section.title}]({name})\n",
        f"*{section.caption}*\n",
        *filter(None, [section.text]),
    ]
