"""The claims ledger (bnlab/claims/, bnlab.results.claims, `bnlab claims`): every claim's preset composes and its
recorded run decides it; the statistics and the decision rule on simulated numbers with known answers;
`bnlab claims` and its check; docs/claims.md is what scripts/claims_doc.py writes now."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, TINY, bnlab, script
from hydra import compose, initialize_config_module
from rich.console import Console
from scipy import stats

from bnlab.face.claims import check
from bnlab.results.claims import RecordError, estimate, judge, judge_recorded, welch
from bnlab.schema.claims import FAILS, HOLDS, MIXED, VERDICTS, Claim, Comparison, load_claims
from bnlab.schema.config import ConfigError

CLAIMS = load_claims()
RESULTS = ROOT / "docs" / "results"


def test_the_ledger_has_at_least_24_claims_each_with_a_source_and_comparisons():
    assert len(CLAIMS) >= 24
    assert all(c.claim and c.source and c.compare for c in CLAIMS.values())


@pytest.mark.parametrize("name", sorted(CLAIMS))
def test_each_claims_preset_composes_and_its_record_decides_it(name):
    claim = CLAIMS[name]
    with initialize_config_module("bnlab.conf", version_base="1.3"):
        cfg = compose("train", overrides=[f"+experiment={claim.preset}"], return_hydra_config=True)
    assert cfg.hydra.sweeper.params, f"{claim.preset} sweeps nothing"
    verdict = judge_recorded(claim, RESULTS)  # every group, metric and threshold it names is in the record
    assert verdict.verdict in VERDICTS and len(verdict.estimates) == len(claim.compare)
    assert all(e.low <= e.value <= e.high for e in verdict.estimates)


def test_docs_claims_md_is_current():
    ledger = script("claims_doc").ledger()
    assert (ROOT / "docs" / "claims.md").read_text() == ledger, "stale: run `python scripts/claims_doc.py`"


@pytest.mark.parametrize("sizes", [(3, 3), (5, 8), (20, 4)])
def test_welchs_interval_from_means_and_stds_is_scipys_from_the_samples(sizes):
    rng = np.random.default_rng(sum(sizes))
    a, b = rng.normal(0.97, 0.003, sizes[0]), rng.normal(0.965, 0.006, sizes[1])
    low, high, how = welch(a.mean(), a.std(ddof=1), len(a), b.mean(), b.std(ddof=1), len(b))
    expected = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert (low, high, how) == (pytest.approx(expected.low, rel=1e-9), pytest.approx(expected.high, rel=1e-9), "Welch")


def test_welchs_interval_covers_the_true_difference_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    covered = 0
    for _ in range(2000):
        a, b = rng.normal(1.0, 1.0, 3), rng.normal(0.0, 2.0, 5)
        low, high, _ = welch(a.mean(), a.std(ddof=1), 3, b.mean(), b.std(ddof=1), 5)
        covered += low <= 1.0 <= high
    assert 0.93 < covered / 2000 < 0.97


def comparison(expect: str, tolerance: float, metric: str = "final.test_acc") -> Comparison:
    return Comparison(metric, {"norm": "batch"}, {"norm": "none"}, expect, tolerance)


@pytest.mark.parametrize(
    ("expect", "tolerance", "value", "low", "high", "verdict"),
    [
        ("higher", 0.01, 0.05, 0.02, 0.08, HOLDS),
        ("higher", 0.01, 0.005, 0.001, 0.009, FAILS),  # surely positive, surely smaller than what counts
        ("higher", 0.01, 0.05, -0.01, 0.11, MIXED),
        ("higher", 0.0, -0.02, -0.03, -0.01, FAILS),
        ("lower", 0.01, -0.05, -0.08, -0.02, HOLDS),
        ("lower", 0.01, 0.02, 0.01, 0.03, FAILS),
        ("equal", 0.01, 0.001, -0.004, 0.006, HOLDS),
        ("equal", 0.01, 0.03, 0.02, 0.04, FAILS),
        ("equal", 0.01, 0.005, -0.004, 0.014, MIXED),
    ],
)
def test_the_decision_rule_on_differences(expect, tolerance, value, low, high, verdict):
    from bnlab.results.claims import decide

    assert decide(comparison(expect, tolerance), value, low, high) == verdict


@pytest.mark.parametrize(
    ("expect", "tolerance", "value", "low", "high", "verdict"),
    [
        ("higher", 2.0, 3.0, 2.5, math.inf, HOLDS),  # a lower bound's open end
        ("higher", 14.0, 2.7, 2.6, 4.0, FAILS),
        ("equal", 1.25, 1.1, 0.9, 1.2, HOLDS),
        ("equal", 1.25, 1.5, 1.3, 1.7, FAILS),
        ("lower", 1.05, 0.8, 0.7, 0.9, HOLDS),
    ],
)
def test_the_decision_rule_on_ratios(expect, tolerance, value, low, high, verdict):
    from bnlab.results.claims import decide

    assert decide(comparison(expect, tolerance, "speed"), value, low, high) == verdict


def group(norm: str, thresholds: list[dict], steps_per_s=None, runs: int = 3, **final) -> dict:
    return {
        "group": f"norm={norm}",
        "keys": {"norm.name": norm, "optim.lr": 0.1},
        "runs": runs,
        "statuses": {"completed": runs, "diverged": 0, "failed": 0, "interrupted": 0},
        "thresholds": thresholds,
        "final": {k: {"mean": m, "std": s, "min": m - s, "max": m + s} for k, (m, s) in final.items()},
        "max_steps": 3000,
        "eval_every": 100,
        "steps_per_s": steps_per_s,
    }


def test_a_speed_up_from_kaplan_meier_medians_and_from_an_older_records_ranges():
    km = lambda m, lo, hi, exact=True: {  # noqa: E731
        "threshold": 0.95, "median_steps": m, "median_ci_low": lo, "median_ci_high": hi, "median_exact": exact,
    }  # fmt: skip
    record = {"groups": [group("batch", [km(400, 300, 500)]), group("none", [km(1200, 1000, 1400)])]}
    e = estimate(Comparison("steps.0.95", {"norm": "batch"}, {"norm": "none"}, "higher", 2.0), record)
    assert (e.value, e.low, e.high, e.bound, e.interval) == (3.0, 2.0, pytest.approx(1400 / 300), "", "Kaplan-Meier")
    assert e.verdict == HOLDS  # surely faster (the interval is above 1), and by the 2x that counts
    record["groups"][1]["thresholds"] = [km(3000, 3000, None, exact=False)]  # no BN never got there
    e = estimate(Comparison("steps.0.95", {"norm": "batch"}, {"norm": "none"}, "higher", 2.0), record)
    assert (e.value, e.bound, e.high, e.verdict) == (7.5, ">=", math.inf, HOLDS)
    old = lambda spread, never: {"threshold": 0.95, "iterations": spread, "never": never}  # noqa: E731
    record = {
        "groups": [
            group("batch", [old({"median": 500, "min": 400, "max": 600}, 0)]),
            group("none", [old({"median": 1500, "min": 1400, "max": 1700}, 1)]),  # one seed never did: open above
        ]
    }
    e = estimate(Comparison("steps.0.95", {"norm": "batch"}, {"norm": "none"}, "higher", 2.0), record)
    assert (e.value, e.low, e.high, e.interval) == (3.0, 1400 / 600, math.inf, "seeds' range")


def test_steps_per_second_and_a_metric_against_another_of_the_same_group():
    record = {
        "groups": [
            group("rms", [], {"median": 550, "min": 540, "max": 560}, test_acc_adabn=(0.95, 0.002)),
            group("layer", [], {"median": 500, "min": 490, "max": 510}, test_acc_shifted=(0.90, 0.004)),
        ]
    }
    e = estimate(Comparison("speed", {"norm": "rms"}, {"norm": "layer"}, "higher", 1.05), record)
    assert (e.value, e.low, e.high, e.verdict) == (1.1, 540 / 510, 560 / 490, HOLDS)
    c = Comparison("final.test_acc_adabn", {"norm": "rms"}, {"norm": "layer"}, "higher", 0.01, "final.test_acc_shifted")
    assert estimate(c, record).value == pytest.approx(0.05)


def test_a_claim_is_mixed_unless_every_comparison_agrees():
    record = {"groups": [group("batch", [], test_acc=(0.97, 0.001)), group("none", [], test_acc=(0.90, 0.001))]}
    claim = Claim("c", "s", "p", [comparison("higher", 0.01), comparison("lower", 0.01)], name="c")
    assert judge(claim, record, "now").verdict == MIXED
    assert judge(Claim("c", "s", "p", [comparison("higher", 0.01)] * 2), record, "now").verdict == HOLDS
    assert judge(Claim("c", "s", "p", [comparison("lower", 0.01)] * 2), record, "now").verdict == FAILS


def test_a_group_that_the_record_lacks_is_named_with_the_groups_it_has():
    record = {"section": "s", "groups": [group("batch", [], test_acc=(0.97, 0.001))]}
    with pytest.raises(RecordError, match=r"0 groups of s match norm.name=none \(its groups: norm=batch\)"):
        estimate(comparison("higher", 0.01), record)


def test_a_malformed_claim_file_is_refused_by_name(tmp_path):
    (tmp_path / "bad.yaml").write_text("claim: x\nsource: y\npreset: z\ncompare:\n  - metric: final.test_acc\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_claims(tmp_path)
    (tmp_path / "bad.yaml").write_text(
        "claim: x\nsource: y\npreset: z\ncompare:\n  - {metric: loss.x, arm: {}, reference: {}, expect: up, "
        "tolerance: 0}\n"
    )
    with pytest.raises(ConfigError, match="bad: compare.metric"):
        load_claims(tmp_path)


@pytest.mark.slow
def test_bnlab_claims_lists_every_claim_shows_one_and_prints_json(tmp_path):
    out = bnlab("claims", "--results", str(RESULTS), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert all(name in out.stdout for name in CLAIMS)
    assert f"{len(CLAIMS)} claims: " in out.stdout
    one = bnlab("claims", "bias_redundant", "--results", str(RESULTS), cwd=tmp_path)
    assert "verdict:" in one.stdout and "figure:" in one.stdout and "bnlab claims check bias_redundant" in one.stdout
    listed = json.loads(bnlab("claims", "--json", "--results", str(RESULTS), cwd=tmp_path).stdout)
    assert {c["name"] for c in listed} == set(CLAIMS) and all(c["verdict"] in VERDICTS for c in listed)
    unknown = bnlab("claims", "bias", "--results", str(RESULTS), cwd=tmp_path)
    assert unknown.returncode == 2 and "no claim named bias in the ledger" in unknown.stderr
    nowhere = bnlab("claims", cwd=tmp_path)  # no docs/results here, and --results not given
    assert nowhere.returncode in (0, 2)  # 0 where the package sits in a checkout (an editable install)


@pytest.mark.slow
def test_claims_check_reruns_the_recorded_command_small_and_decides_anew(tmp_path, monkeypatch, capsys):
    """A record of a tiny synthetic sweep and a claim on it: the check re-runs the sweep at a quarter of its
    steps into outputs/claims/ and decides the claim on the fresh runs."""
    monkeypatch.chdir(tmp_path)
    command = ["bnlab", "train", "-m", "norm=none,batch", "seed=0,1", "optim.lr=0.5", *TINY]
    steps = {"trainer.max_steps": 40, "trainer.eval_every": 4}
    command = [*(o for o in command if o.split("=")[0] not in steps), *(f"{k}={v}" for k, v in steps.items())]
    record = {
        "provenance": {"command": " ".join(command), "started": "2026-12-05"},
        "groups": [
            group("batch", [], test_acc=(0.9, 0.01)) | {"max_steps": 40, "eval_every": 4},
            group("none", [], test_acc=(0.5, 0.01)) | {"max_steps": 40, "eval_every": 4},
        ],
    }
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "tiny.json").write_text(json.dumps(record))
    claim = Claim("BN is better here", "a test", "tiny", [comparison("higher", 0.0)], name="tiny")
    code = check(Console(width=120), claim, tmp_path / "results", 0.25, as_json_out=True)
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["recorded_verdict"] == HOLDS and result["scale"] == 0.25
    assert code == (0 if result["verdict"] == HOLDS else 1)
    (sweep,) = Path("outputs/claims").iterdir()
    summaries = [json.loads(p.read_text()) for p in sweep.glob("*/summary.json")]
    assert len(summaries) == 4 and {s["steps"] for s in summaries} == {10}  # 40 steps scaled by 0.25
