"""Re-run a section of docs/results.md and set its numbers beside the recorded ones: the section's command
(from docs/results/SECTION.json, written by scripts/record_result.py), in full or with its step budget
scaled by F for a quick look, into outputs/reproduce/SECTION-<time>, then a table per group of the final
test accuracy and the iterations to each threshold, recorded and now, with `!` on every number now
outside the recorded spread over seeds (min-max; a single seed's number is its own spread).

    python scripts/reproduce.py main
    python scripts/reproduce.py lr_sensitivity --scale 0.25
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bnlab.analysis import Group, load_sweep
from bnlab.overrides import quote
from bnlab.summarize import record

DOCS = Path(__file__).resolve().parents[1] / "docs"
SET_ANEW = ("hydra.sweep.dir=", "hydra.run.dir=", "trainer.resume=")  # this invocation's own


def scaled(args: list[str], groups: list[dict], scale: float) -> list[str]:
    """The arguments with the step budget, evaluation interval and diagnostics interval scaled (where every
    group had one budget; otherwise as they are, with a note)."""
    if scale == 1:
        return args
    budgets = {(g["max_steps"], g["eval_every"]) for g in groups}
    if len(budgets) > 1:
        print(f"the groups' step budgets differ ({sorted(budgets)}): --scale is ignored", file=sys.stderr)
        return args
    ((steps, every),) = budgets
    new_steps, new_every = max(1, round(steps * scale)), max(1, round(every * scale))
    return [*args, f"trainer.max_steps={new_steps}", f"trainer.eval_every={new_every}", f"diag.every={new_every}"]


def cell(stats: dict | None, never: int = 0) -> str:
    """'0.9712 [0.9690-0.9730]' (a mean or median and the min-max over seeds), ', 1 never' where seeds
    never reached a threshold, 'never' where none did."""
    if stats is None:
        return "never" if never else "-"
    low, high = stats["min"], stats["max"]
    text = f"{stats.get('mean', stats.get('median')):.4g}" + ("" if low == high else f" [{low:.4g}-{high:.4g}]")
    return text + (f", {never} never" if never else "")


def outside(now: dict | None, then: dict | None) -> bool:
    """A number now outside the recorded spread; reached now but never then, or the other way round."""
    if now is None or then is None:
        return (now is None) != (then is None)
    middle = now.get("mean", now.get("median"))
    return not then["min"] - 1e-12 <= middle <= then["max"] + 1e-12


def compare(recorded: dict, now: list[Group], console: Console) -> int:
    """Print recorded and reproduced numbers side by side; return how many are outside the spread."""
    mine = {g.label: record(g) for g in now}
    table = Table(title=f"{recorded['section']}: recorded vs now (! = outside the recorded spread over seeds)")
    for column in ("group", "number", "recorded", "now", ""):
        table.add_column(column, overflow="fold")
    flagged = 0
    for then in recorded["groups"]:
        current = mine.get(then["group"])
        if current is None:
            table.add_row(then["group"], "", "", "missing", "!")
            flagged += 1
            continue
        acc_then, acc_now = then["final"].get("test_acc"), current["final"].get("test_acc")
        rows = [("final test acc", acc_then, acc_now, 0, 0)]
        for t_then, t_now in zip(then["thresholds"], current["thresholds"]):
            name = f"iters to {recorded['threshold_metric']} {t_then['threshold']:g}"
            rows.append((name, t_then["iterations"], t_now["iterations"], t_then["never"], t_now["never"]))
        for i, (name, a, b, never_a, never_b) in enumerate(rows):
            flag = outside(b, a)
            flagged += flag
            table.add_row(
                then["group"] if i == 0 else "", name, cell(a, never_a), cell(b, never_b), "!" if flag else ""
            )
    console.print(table)
    return flagged


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("section", help="a section of docs/results.md (a file docs/results/SECTION.json)")
    parser.add_argument("--scale", type=float, default=1.0, help="step budget factor (0.25: a quarter)")
    args = parser.parse_args()
    recorded = json.loads((DOCS / "results" / f"{args.section}.json").read_text())
    command = shlex.split(recorded["provenance"]["command"])[2:]  # after `bnlab train`
    run_args = scaled([a for a in command if not a.startswith(SET_ANEW)], recorded["groups"], args.scale)
    out = Path("outputs") / "reproduce" / f"{args.section}-{time.strftime('%Y-%m-%d_%H-%M-%S')}"
    print("running: bnlab train " + " ".join(map(shlex.quote, run_args)))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "bnlab", "train", *run_args, f"hydra.sweep.dir={quote(str(out))}"])
    print(f"{out}: exit code {done.returncode} after {(time.perf_counter() - start) / 60:.1f} min")
    flagged = compare(recorded, load_sweep(out).groups, Console(width=200))
    scale = "" if args.scale == 1 else f" (step budget x{args.scale:g}: expect numbers that depend on it to move)"
    print(f"{flagged} numbers outside the recorded spread{scale}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
