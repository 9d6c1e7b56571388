"""`bnlab claims`: the claims ledger on the console. Every claim (bnlab/claims/) with bnlab's verdict on its
recorded run and the numbers that decide it; `bnlab claims NAME` one claim in detail; `bnlab claims check NAME`
the claim's recorded command re-run with its step budget scaled (--scale), decided anew on the fresh sweep;
--json for scripts. The records are docs/results/SECTION.json of a bnlab checkout (--results DIR to name them).
"""

from __future__ import annotations

import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bnlab.face.overrides import quote, refuse
from bnlab.record.console import shell_path
from bnlab.results.claims import (
    RecordError,
    Verdict,
    as_json,
    figures,
    fmt_estimate,
    fmt_keys,
    fmt_tolerance,
    judge,
    judge_recorded,
    tally,
)
from bnlab.schema.claims import FAILS, HOLDS, Claim, load_claims
from bnlab.schema.config import ConfigError

COLOURS = {HOLDS: "green", FAILS: "red"}  # mixed: yellow
CHECKS = Path("outputs") / "claims"  # where `bnlab claims check` puts its sweeps
SET_ANEW = ("hydra.sweep.dir=", "hydra.run.dir=", "trainer.resume=")  # a recorded command's own, not the check's


def results_folder(given: Path | None) -> Path:
    """The recorded results: --results, else docs/results below the working directory or beside the package."""
    candidates = [given] if given else [Path("docs/results"), Path(__file__).resolve().parents[2] / "docs" / "results"]
    for folder in candidates:
        if folder.is_dir():
            return folder
    refuse(
        f"bnlab claims reads the recorded results in {candidates[0]}, which is not a folder: run it in a bnlab "
        "checkout (the folder with docs/results/) or name the folder with --results DIR."
    )


def _claims(names: list[str]) -> list[Claim]:
    try:
        claims = load_claims()
    except ConfigError as e:
        refuse(e)
    unknown = [n for n in names if n not in claims]
    if unknown:
        refuse(f"no claim named {', '.join(unknown)} in the ledger; its claims: {', '.join(claims)}.")
    return [claims[n] for n in names] if names else list(claims.values())


def _verdicts(claims: list[Claim], results: Path) -> list[Verdict]:
    try:
        return [judge_recorded(c, results) for c in claims]
    except RecordError as e:
        refuse(e)


def _verdict(v: str) -> str:
    return f"[{COLOURS.get(v, 'yellow')}]{v}[/]"


def _numbers(v: Verdict) -> str:
    """One line per comparison: its metric and estimate with its interval."""
    return "\n".join(f"{e.comparison.metric}: {fmt_estimate(e)}" for e in v.estimates)


def ledger_table(verdicts: list[Verdict]) -> Table:
    table = Table(title="the claims ledger (docs/claims.md)", show_lines=True, title_justify="left")
    table.add_column("claim", ratio=3, overflow="fold")
    table.add_column("verdict", no_wrap=True)
    table.add_column("deciding numbers, 95 % interval", ratio=2, overflow="fold")
    for v in verdicts:
        c = v.claim
        text = f"[bold]{c.name}[/]: {c.claim}\n[dim]{c.source}\n$ {c.run}[/]"
        table.add_row(text, _verdict(v.verdict), _numbers(v))
    return table


def detail(console: Console, v: Verdict, results: Path) -> None:
    """One claim: what it says, where it comes from, each comparison with both groups' numbers, the verdict."""
    c = v.claim
    console.print(f"[bold]{c.name}[/]: {c.claim}", highlight=False)
    console.print(f"source: {c.source}", highlight=False)
    console.print(f"tested by: {c.run} (recorded {v.recorded}: {shell_path(results / f'{c.record}.json')})")
    for e in v.estimates:
        x = e.comparison
        console.print(f"- {x.why or x.metric}", highlight=False)
        console.print(
            f"  {x.metric} of {fmt_keys(x.arm)}: {e.arm:.6g}; "
            f"{x.reference_metric or x.metric} of {fmt_keys(x.reference)}: {e.reference:.6g}",
            highlight=False,
        )
        console.print(f"  {fmt_estimate(e)}; expected {x.expect} (tolerance {fmt_tolerance(x)}): {_verdict(e.verdict)}")
    console.print(f"verdict: {_verdict(v.verdict)}")
    if c.note:
        console.print(f"note: {c.note}", highlight=False)
    for figure in figures(c, results.parent):
        console.print(f"figure: {shell_path(figure)}")
    console.print(f"check it small: bnlab claims check {c.name} --scale 0.25")


def scaled(args: list[str], groups: list[dict], scale: float) -> tuple[list[str], str]:
    """The arguments with the step budget, evaluation interval and diagnostics interval scaled (where every
    group had one budget), and a note where they could not be."""
    if scale == 1:
        return args, ""
    budgets = {(g["max_steps"], g["eval_every"]) for g in groups}
    if len(budgets) > 1:
        return args, f"the groups' step budgets differ ({sorted(budgets)}): --scale is ignored"
    ((steps, every),) = budgets
    new_steps, new_every = max(1, round(steps * scale)), max(1, round(every * scale))
    return [*args, f"trainer.max_steps={new_steps}", f"trainer.eval_every={new_every}", f"diag.every={new_every}"], ""


def check(console: Console, claim: Claim, results: Path, scale: float, as_json_out: bool) -> int:
    """Re-run the claim's recorded command at `scale`, decide it on the fresh sweep, and say whether the
    recorded verdict still holds: exit 0 if it does, 1 if the verdict changed."""
    from bnlab.results.analysis import load_sweep
    from bnlab.results.recorded import numbers

    recorded = _verdicts([claim], results)[0]
    record = json.loads((results / f"{claim.record}.json").read_text())
    command = shlex.split(record["provenance"]["command"])[2:]  # after `bnlab train`
    args, note = scaled([a for a in command if not a.startswith(SET_ANEW)], record["groups"], scale)
    if note:
        console.print(note)
    out = CHECKS / f"{claim.name}-{time.strftime('%Y-%m-%d_%H-%M-%S')}"
    console.print(f"checking {claim.name}: bnlab train {' '.join(map(shlex.quote, args))}", highlight=False)
    start = time.perf_counter()
    train = [sys.executable, "-m", "bnlab", "train", *args, f"hydra.sweep.dir={quote(str(out))}"]
    done = subprocess.run(train, stdout=subprocess.DEVNULL if as_json_out else None)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        refuse(f"the check's sweep {shell_path(out)} ended with exit code {done.returncode}; its runs are there")
    try:
        now = judge(claim, numbers(load_sweep(out), out), shell_path(out))
    except RecordError as e:
        refuse(e)
    same = now.verdict == recorded.verdict
    if as_json_out:
        print(json.dumps({**as_json(now), "recorded_verdict": recorded.verdict, "scale": scale, "seconds": seconds}))
    else:
        console.print(f"\n{claim.name} at scale {scale:g} ({seconds:.0f} s, {shell_path(out)}):")
        for e in now.estimates:
            console.print(f"  {e.comparison.metric}: {fmt_estimate(e)}: {_verdict(e.verdict)}", highlight=False)
        word = "still" if same else "no longer"
        console.print(f"verdict now: {_verdict(now.verdict)}; recorded: {_verdict(recorded.verdict)} ({word} the same)")
    return 0 if same else 1


def claims(console: Console, words: list[str], results: Path | None, scale: float, as_json_out: bool) -> int:
    """`bnlab claims [NAME ...] | check NAME`; the exit code."""
    results = results_folder(results)
    if words[:1] == ["check"]:
        if len(words) != 2:
            refuse("bnlab claims check takes one claim's name, e.g. `bnlab claims check bias_redundant --scale 0.25`.")
        if not (0 < scale <= 1) or math.isnan(scale):
            refuse(f"--scale={scale} is not accepted; accepted values: a factor in (0, 1] of the recorded step budget.")
        return check(console, _claims(words[1:])[0], results, scale, as_json_out)
    verdicts = _verdicts(_claims(words), results)
    if as_json_out:
        print(json.dumps([as_json(v) for v in verdicts], indent=1))
    elif len(words) == 1:
        detail(console, verdicts[0], results)
    else:
        console.print(ledger_table(verdicts))
        console.print(tally(verdicts))
    return 0
