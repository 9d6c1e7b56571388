"""The claims ledger's verdicts: each claim (bnlab.schema.claims) decided on recorded numbers, the JSON that
scripts/record_result.py writes to docs/results/SECTION.json (or a fresh sweep's, bnlab.results.recorded).

Each comparison gives an estimate and its 95 % interval from the two groups' numbers:
- a final metric or a diagnostic: the difference of the means over seeds, with Welch's interval (unequal
  variances; Student's t from scipy.stats);
- steps to a threshold: the reference's median steps over the arm's, the interval from the two medians'
  Kaplan-Meier intervals where the record has them (sweep.json schema 3 on), else from the seeds' range;
  a median that was never reached is a bound (the step budget), so the ratio is a bound too;
- steps per second: the arm's median over the reference's, the interval from the seeds' range.
The decision rule is bnlab.schema.claims's, applied to the difference, or to the ratio's logarithm.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bnlab.schema.claims import FAILS, HOLDS, MIXED, Claim, Comparison, group_keys

CONFIDENCE = 0.95


class RecordError(ValueError):
    """A claim that its record cannot decide: a missing file, group or number; the message says which."""


@dataclass(frozen=True)
class Estimate:
    comparison: Comparison
    arm: float  # the arm's number (a mean, a median) and the reference's
    reference: float
    value: float  # their difference (arm - reference) or ratio (steps: reference / arm; speed: arm / reference)
    low: float  # its 95 % interval (ratios: 0 or inf where a bound is open)
    high: float
    bound: str  # "" | ">=" | "<=": the value is a bound, where a median was never reached
    interval: str  # how the interval was made: "Welch", "Kaplan-Meier", "seeds' range", "one seed"
    verdict: str


@dataclass(frozen=True)
class Verdict:
    claim: Claim
    verdict: str
    estimates: list[Estimate]
    recorded: str  # the date of the record, or the folder of the sweep it was decided on


def _same(a: Any, b: str) -> bool:
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return str(a).lower() == b.lower()


def find_group(record: dict, keys: dict[str, Any]) -> dict:
    """The one group of the record whose keys include `keys`."""
    wanted = group_keys(keys)
    found = [g for g in record["groups"] if all(k in g["keys"] and _same(g["keys"][k], v) for k, v in wanted.items())]
    if len(found) != 1:
        which = ", ".join(f"{k}={v}" for k, v in wanted.items())
        groups = "; ".join(g["group"] for g in record["groups"])
        raise RecordError(
            f"{len(found)} groups of {record.get('section', 'the sweep')} match {which} (its groups: {groups})"
        )
    return found[0]


def _counted(group: dict) -> int:
    """The runs whose numbers count: those that ended (completed, stalled, diverged), not failed or interrupted."""
    statuses = group["statuses"]
    return sum(statuses.get(s, 0) for s in ("completed", "stalled", "diverged"))


def welch(m1: float, s1: float | None, n1: int, m2: float, s2: float | None, n2: int) -> tuple[float, float, str]:
    """The 95 % interval of the difference of two means from their stds and counts (Welch); the difference itself
    where either side has one seed."""
    from scipy import stats

    d = m1 - m2
    if s1 is None or s2 is None or n1 < 2 or n2 < 2:
        return d, d, "one seed"
    v1, v2 = s1**2 / n1, s2**2 / n2
    if v1 + v2 == 0:
        return d, d, "Welch"
    df = (v1 + v2) ** 2 / (v1**2 / (n1 - 1) + v2**2 / (n2 - 1))
    half = stats.t.ppf((1 + CONFIDENCE) / 2, df) * math.sqrt(v1 + v2)
    return d - half, d + half, "Welch"


def _stats(record: dict, group: dict, metric: str) -> dict:
    kind, name = metric.split(".", 1)
    where = group["final"] if kind == "final" else record.get("diagnostics", {}).get(group["group"], {})
    if name not in where:
        raise RecordError(f"{group['group']} has no {metric} in {record.get('section', 'the sweep')}")
    return where[name]


def _median_steps(group: dict, threshold: float) -> tuple[float, float, float, bool]:
    """(median, low, high, reached) of the steps to `threshold`: from the Kaplan-Meier median and its interval,
    or (older records) the median and range over the seeds; not reached: the step budget, a lower bound."""
    (t,) = [t for t in group["thresholds"] if math.isclose(t["threshold"], threshold)] or [None]
    if t is None:
        raise RecordError(f"{group['group']} has no threshold {threshold:g}")
    if "median_steps" in t:
        if not t["median_exact"]:
            return t["median_steps"], t["median_steps"], math.inf, False
        return t["median_steps"], t["median_ci_low"] or t["median_steps"], t["median_ci_high"] or math.inf, True
    runs, spread = group["runs"], t["iterations"]
    if spread is None or 2 * t["never"] > runs:
        return group["max_steps"], group["max_steps"], math.inf, False
    return spread["median"], spread["min"], math.inf if t["never"] else spread["max"], True


def estimate(c: Comparison, record: dict) -> Estimate:
    """One comparison's estimate, interval and verdict on a record."""
    arm, ref = find_group(record, c.arm), find_group(record, c.reference)
    if c.kind in ("final", "diag"):
        a, r = _stats(record, arm, c.metric), _stats(record, ref, c.reference_metric or c.metric)
        low, high, how = welch(a["mean"], a["std"], _counted(arm), r["mean"], r["std"], _counted(ref))
        value, bound, am, rm = a["mean"] - r["mean"], "", a["mean"], r["mean"]
    elif c.kind == "steps":
        threshold = float(c.metric.split(".", 1)[1])
        (am, a_low, a_high, a_reached), (rm, r_low, r_high, r_reached) = (
            _median_steps(g, threshold) for g in (arm, ref)
        )
        if not (a_reached or r_reached):
            raise RecordError(f"neither {arm['group']} nor {ref['group']} reached {threshold:g}: no speed-up")
        value, low, high = rm / am, r_low / a_high, r_high / a_low if a_low else math.inf
        bound = ">=" if not r_reached else "<=" if not a_reached else ""
        how = "Kaplan-Meier" if "median_steps" in arm["thresholds"][0] else "seeds' range"
    else:  # speed
        a, r = arm["steps_per_s"], ref["steps_per_s"]
        am, rm = a["median"], r["median"]
        value, low, high, bound, how = am / rm, a["min"] / r["max"], a["max"] / r["min"], "", "seeds' range"
    return Estimate(c, am, rm, value, low, high, bound, how, decide(c, value, low, high))


def decide(c: Comparison, value: float, low: float, high: float) -> str:
    """holds, does not hold or mixed (bnlab.schema.claims): on the difference, or on the ratio's logarithm."""
    tol = c.tolerance
    if c.ratio:
        value, low, high, tol = (math.log(x) if x > 0 else -math.inf for x in (value, low, high, tol))
    if c.expect == "higher":
        return HOLDS if low > 0 and value >= tol else FAILS if high < tol else MIXED
    if c.expect == "lower":
        return HOLDS if high < 0 and value <= -tol else FAILS if low > -tol else MIXED
    return HOLDS if -tol <= low and high <= tol else FAILS if low > tol or high < -tol else MIXED


def judge(claim: Claim, record: dict, recorded: str) -> Verdict:
    """A claim decided on a record: holds if every comparison holds, does not hold if none does, else mixed."""
    estimates = [estimate(c, record) for c in claim.compare]
    verdicts = {e.verdict for e in estimates}
    verdict = HOLDS if verdicts == {HOLDS} else FAILS if HOLDS not in verdicts and MIXED not in verdicts else MIXED
    return Verdict(claim, verdict, estimates, recorded)


def judge_recorded(claim: Claim, results: Path) -> Verdict:
    """A claim decided on its recorded section, results/SECTION.json."""
    path = results / f"{claim.record}.json"
    if not path.exists():
        raise RecordError(f"{claim.name}: its record {path} does not exist (record it with scripts/record_result.py)")
    record = json.loads(path.read_text())
    return judge(claim, record, record["provenance"]["started"][:10])


# ---------------------------------------------------------------- how the numbers read


def tally(verdicts: list[Verdict]) -> str:
    """'28 claims: 13 hold, 6 do not hold, 9 mixed'."""
    counts = {k: sum(v.verdict == k for v in verdicts) for k in (HOLDS, FAILS, MIXED)}
    return f"{len(verdicts)} claims: {counts[HOLDS]} hold, {counts[FAILS]} do not hold, {counts[MIXED]} mixed"


def fmt_keys(keys: dict[str, Any]) -> str:
    """A comparison's group as its keys read: 'norm.name=batch, optim.lr=0.1'."""
    return ", ".join(f"{k}={v}" for k, v in group_keys(keys).items())


def fmt_tolerance(c: Comparison) -> str:
    return f"{c.tolerance:g}x" if c.ratio else f"{c.tolerance:g}"


def fmt_number(x: float, ratio: bool) -> str:
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if ratio:
        return f"{x:.2f}x"
    return f"{x:+.4f}" if abs(x) < 10 else f"{x:+.1f}"


def fmt_estimate(e: Estimate) -> str:
    """'+0.0012 [-0.0008, +0.0031]' or '>=2.50x [1.80x, inf]', with how the interval was made."""
    ratio = e.comparison.ratio
    value = f"{e.bound}{fmt_number(e.value, ratio)}"
    if e.interval == "one seed":
        return f"{value} (one seed)"
    return f"{value} [{fmt_number(e.low, ratio)}, {fmt_number(e.high, ratio)}] ({e.interval})"


def as_json(v: Verdict) -> dict[str, Any]:
    """A verdict for `bnlab claims --json`."""
    c = v.claim
    return {
        "name": c.name,
        "claim": c.claim,
        "source": c.source,
        "verdict": v.verdict,
        "recorded": v.recorded,
        "preset": c.preset,
        "command": c.run,
        "comparisons": [
            {
                "metric": e.comparison.metric,
                "reference_metric": e.comparison.reference_metric or e.comparison.metric,
                "arm": group_keys(e.comparison.arm),
                "reference": group_keys(e.comparison.reference),
                "expect": e.comparison.expect,
                "tolerance": e.comparison.tolerance,
                "arm_value": e.arm,
                "reference_value": e.reference,
                "estimate": e.value,
                "ci_low": None if math.isinf(e.low) else e.low,
                "ci_high": None if math.isinf(e.high) else e.high,
                "bound": e.bound,
                "interval": e.interval,
                "verdict": e.verdict,
            }
            for e in v.estimates
        ],
        "note": c.note,
    }


def figures(claim: Claim, docs: Path) -> list[Path]:
    """The claim's own figure (docs/figures/claims/NAME.png, scripts/claims_doc.py draws it) and those of its
    recorded section (docs/figures/SECTION*.png), where they exist."""
    own = docs / "figures" / "claims" / f"{claim.name}.png"
    return [own] * own.exists() + sorted((docs / "figures").glob(f"{claim.record}*.png"))


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(verdicts: list[Verdict], results: Path) -> str:
    """docs/claims.md: the summary table, then each claim with its comparisons, note, figures and command."""
    docs = results.parent
    lines = [
        "# The claims ledger",
        "",
        "<!-- generated by scripts/claims_doc.py from bnlab/claims/*.yaml and docs/results/*.json: edit those -->",
        "",
        "Every claim about batch normalization that bnlab tests, as the literature states it, with bnlab's",
        "verdict on its recorded run. `bnlab claims` prints this table, `bnlab claims NAME` one claim, and",
        "`bnlab claims check NAME --scale 0.25` re-runs a claim small and decides it anew.",
        "",
        "How a verdict is reached: each claim names the groups of its preset's sweep that it compares and what",
        "it predicts for them (higher, lower or equal), with a tolerance set before the run: the smallest effect",
        "that counts (half a point of accuracy for `equal`, unless the claim says otherwise). A comparison",
        "**holds** when its 95 % interval lies on the predicted side and its estimate is at least the tolerance",
        "from no effect (for `equal`: the whole interval within the tolerance); it **does not hold** when the",
        "interval rules the predicted effect out; otherwise it is **mixed**: these seeds cannot tell. A claim",
        "holds when all its comparisons hold, does not hold when every one of them does not, and is mixed otherwise.",
        "Intervals: Welch's for a difference of means over seeds (final metrics, diagnostics); for speed-ups,",
        "the Kaplan-Meier medians' intervals where the record has them, else the range over seeds; `>=` marks",
        "a lower bound, where the slower group never reached the threshold within its step budget.",
        "",
        f"{tally(verdicts)}.",
        "",
        "| claim | verdict | deciding numbers (95 % interval) | reproduce |",
        "|---|---|---|---|",
    ]
    for v in verdicts:
        c = v.claim
        numbers = "<br>".join(f"{e.comparison.metric}: {fmt_estimate(e)}" for e in v.estimates)
        lines.append(
            f"| [{c.name}](#{c.name}): {_cell(c.claim)} | **{v.verdict}** | {_cell(numbers)} | `{_cell(c.run)}` |"
        )
    for v in verdicts:
        c = v.claim
        lines += [
            "",
            f"## {c.name}",
            "",
            f"> {c.claim}",
            "",
            f"Source: {c.source}.",
            "",
            f"Tested by `{c.run}`; recorded {v.recorded} in [results/{c.record}.json](results/{c.record}.json). "
            f"Verdict: **{v.verdict}**.",
            "",
        ]
        for e in v.estimates:
            x = e.comparison
            lines.append(
                f"- {x.why or x.metric}: `{x.metric}` of {fmt_keys(x.arm)} is {e.arm:.4g}, "
                f"`{x.reference_metric or x.metric}` of {fmt_keys(x.reference)} is {e.reference:.4g}: "
                f"{fmt_estimate(e)}; expected {x.expect} (tolerance {fmt_tolerance(x)}): **{e.verdict}**."
            )
        if c.note:
            lines += ["", c.note]
        lines += [f"\n![{f.stem}]({f.relative_to(docs)})" for f in figures(c, docs)]
    return "\n".join(lines) + "\n"
