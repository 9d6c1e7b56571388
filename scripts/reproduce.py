"""Re-run a section of docs/results.md and set its numbers beside the recorded ones: the section's command
(from docs/results/SECTION.json, written by scripts/record_result.py), in full or with its step budget
scaled by F for a quick look, into outputs/reproduce/SECTION-<time>, then a table per group of the final
test accuracy and the iterations to each threshold, recorded and now, with `!` on every number now
outside the recorded spread over seeds (min-max; a single seed's number is its own spread).

Float results depend in their last bits on the torch thread count and on the CPU's vector instructions, so
the re-run takes the recorded thread count (trainer.threads, unless the command sets it) and, where the
record names them and this CPU has more (an AVX512 CPU re-running an AVX2 record), lowers torch's and
MKL's kernels to the recorded ones (ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS; `--cpu-kernels` to
choose, e.g. for a record made before they were recorded).

    python scripts/reproduce.py main
    python scripts/reproduce.py lr_sensitivity --scale 0.25
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bnlab.face.overrides import quote
from bnlab.record.provenance import cpu_kernels
from bnlab.results.analysis import RunGroup, load_sweep
from bnlab.results.recorded import spreads
from bnlab.results.summarize import record

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


def compare(recorded: dict, now: list[RunGroup], console: Console) -> int:
    """Print recorded and reproduced numbers side by side; return how many are outside the spread."""
    mine = {g.label: {**record(g), "spreads": spreads(g)} for g in now}
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
        # records made before sweep.json's schema 3 kept these spreads in their thresholds
        for t_then, t_now in zip(then.get("spreads", then["thresholds"]), current["spreads"]):
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


def same_numerics(args: list[str], provenance: dict, kernels: str | None) -> tuple[list[str], dict[str, str]]:
    """The arguments with the recorded thread count, and the environment with the CPU kernels to use
    (`kernels`, else the recorded ones where this CPU can lower its own to them)."""
    threads = provenance.get("torch_threads")  # one count for every run, or a list where runs differed
    if isinstance(threads, int) and not any(a.startswith("trainer.threads=") for a in args):
        args = [*args, f"trainer.threads={threads}"]
    env = dict(os.environ)
    kernels = kernels or provenance.get("cpu_kernels")
    here = cpu_kernels()
    if kernels and kernels.upper() != here:
        if kernels.upper() in ("AVX2", "AVX512") and here == "AVX512":
            env.update(ATEN_CPU_CAPABILITY=kernels.lower(), MKL_ENABLE_INSTRUCTIONS=kernels.upper())
            print(f"CPU kernels lowered from {here} to {kernels.upper()}")
        else:
            print(f"the record's CPU kernels ({kernels}) differ from this CPU's ({here}): the last digits may move")
    return args, env


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("section", help="a section of docs/results.md (a file docs/results/SECTION.json)")
    parser.add_argument("--scale", type=float, default=1.0, help="step budget factor (0.25: a quarter)")
    parser.add_argument("--cpu-kernels", help="AVX2 or AVX512 (default: the record's, where it names them)")
    args = parser.parse_args()
    recorded = json.loads((DOCS / "results" / f"{args.section}.json").read_text())
    command = shlex.split(recorded["provenance"]["command"])[2:]  # after `bnlab train`
    run_args = scaled([a for a in command if not a.startswith(SET_ANEW)], recorded["groups"], args.scale)
    run_args, env = same_numerics(run_args, recorded["provenance"], args.cpu_kernels)
    out = Path("outputs") / "reproduce" / f"{args.section}-{time.strftime('%Y-%m-%d_%H-%M-%S')}"
    print("running: bnlab train " + " ".join(map(shlex.quote, run_args)))
    start = time.perf_counter()
    train = [sys.executable, "-m", "bnlab", "train", *run_args, f"hydra.sweep.dir={quote(str(out))}"]
    done = subprocess.run(train, env=env)
    print(f"{out}: exit code {done.returncode} after {(time.perf_counter() - start) / 60:.1f} min")
    flagged = compare(recorded, load_sweep(out).groups, Console(width=200))
    scale = "" if args.scale == 1 else f" (step budget x{args.scale:g}: expect numbers that depend on it to move)"
    print(f"{flagged} numbers outside the recorded spread{scale}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
