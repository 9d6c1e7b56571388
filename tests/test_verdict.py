"""The verdict's statistics on simulated sweeps with a known answer: run folders of the documented contract
(summary.json per run), steps to the threshold drawn from log-normals, read back as `bnlab summarize` reads
them; and one comparison's numbers, the same on every surface."""

from __future__ import annotations

import csv
import io
import json
import re

import numpy as np
import pytest
from rich.console import Console
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata as hparams_metadata

from bnlab.record.files import write_json
from bnlab.results.analysis import load_sweep
from bnlab.results.dashboard import BOUNDS, GROUPS, MEDIANS, write_dashboard
from bnlab.results.report import write_report
from bnlab.results.summarize import fmt_ratio, summarize
from bnlab.results.verdict import Times, compare, median_steps

BUDGET = 3000
SEEDS = 5


def write_run(root, norm: str, seed: int, steps: float | None, lr: float = 0.1) -> None:
    """A completed run of the contract that reached test accuracy 0.9 at `steps` (None: never, in BUDGET)."""
    folder = root / f"norm={norm},optim.lr={lr},seed={seed}"
    folder.mkdir(parents=True)
    write_json(
        folder / "summary.json",
        {
            "schema_version": 2,
            "status": "completed",
            "steps": BUDGET,
            "final": {"test_acc": 0.95 if steps else 0.85},
            "threshold_metric": "test_acc",
            "iterations_to_threshold": [{"threshold": 0.9, "iterations": None if steps is None else int(steps)}],
            "config": {"norm": {"name": norm}, "optim": {"lr": lr}, "trainer": {"max_steps": BUDGET}, "seed": seed},
        },
    )


def simulated_verdict(root, rng, ratio: float, sigma: float = 0.3):
    """One sweep: none's steps ~ logN(log 1500, sigma), batch's the same divided by `ratio`; its verdict."""
    for seed in range(SEEDS):
        write_run(root, "none", seed, min(BUDGET, round(np.exp(rng.normal(np.log(1500), sigma)) / 10) * 10))
        write_run(root, "batch", seed, round(np.exp(rng.normal(np.log(1500 / ratio), sigma)) / 10) * 10)
    (verdict,) = load_sweep(root).verdicts
    return verdict


@pytest.mark.parametrize("ratio", [1, 3])
def test_the_interval_covers_the_true_speed_up_of_simulated_sweeps(ratio, tmp_path):
    rng = np.random.default_rng(ratio)
    verdicts = [simulated_verdict(tmp_path / str(i), rng, ratio) for i in range(200)]
    assert all(v.bound == "exact" and v.seeds_arm == SEEDS for v in verdicts)
    covered = np.mean([v.ci_low <= ratio <= v.ci_high for v in verdicts])
    assert covered >= 0.9
    if ratio == 3:  # a real speed-up is told apart from none
        assert np.mean([not v.ci_low <= 1 <= v.ci_high for v in verdicts]) >= 0.9


def test_censored_baseline_seeds_make_the_speed_up_a_lower_bound_never_a_run_at_the_budget(tmp_path):
    for seed, (none, batch) in enumerate(
        [(1200, 400), (1500, 500), (1800, 450), (2100, 600), (None, 550), (None, 500)]
    ):
        write_run(tmp_path, "none", seed, none)  # a third of no BN's seeds never reach 0.9 in 3000 steps
        write_run(tmp_path, "batch", seed, batch)
    sweep = summarize(tmp_path, Console(file=io.StringIO()))
    (v,) = sweep.verdicts
    assert (v.bound, v.ci_high, v.faster_seeds) == ("lower", None, 6)
    assert v.speedup == pytest.approx(1800 / 500) and v.ci_low <= v.speedup
    none = next(
        g for g in json.loads((tmp_path / "sweep.json").read_text())["groups"] if g["keys"]["norm.name"] == "none"
    )
    assert (none["thresholds"][0]["median_steps"], none["thresholds"][0]["reached"]) == (1800, 4)
    md = (tmp_path / "summary.md").read_text()
    assert ">=3.60x" in md and all(m.group(1) == ">" for m in re.finditer(r"(.)3000\b", md))  # 3000 only as a bound


def test_seconds_and_flops_to_a_threshold_are_medians_like_the_steps(tmp_path):
    runs = {"batch": [(100, 1.0), (200, 2.5), (300, 3.0)], "none": [(600, 6.0), (None, None), (900, 8.0)]}
    for norm, seeds in runs.items():
        for seed, (steps, seconds) in enumerate(seeds):
            write_run(tmp_path, norm, seed, steps)
            path = tmp_path / f"norm={norm},optim.lr=0.1,seed={seed}" / "summary.json"
            d = json.loads(path.read_text())
            d["iterations_to_threshold"][0]["seconds"] = seconds
            write_json(path, {**d, "schema_version": 4, "flops_per_step": 2e6, "steps_per_s": 100.0})
    summarize(tmp_path, Console(file=io.StringIO()))
    groups = {g["keys"]["norm.name"]: g for g in json.loads((tmp_path / "sweep.json").read_text())["groups"]}
    batch, none = groups["batch"]["thresholds"][0], groups["none"]["thresholds"][0]
    assert (batch["median_steps"], batch["median_seconds"], batch["median_flops"]) == (200, 2.5, 200 * 2e6)
    assert groups["batch"]["flops_per_step"] == 2e6
    # none's seed 1 never got there: censored at 3000 steps, 30 s at its 100 steps/s; the median is seed 2's
    assert (none["median_steps"], none["median_seconds"], none["median_flops"]) == (900, 8.0, 900 * 2e6)
    assert "| norm=batch | 0.1 | 0.002 | 100.0 | 200 steps, 2.5 s, 0.4 GFLOP |" in write_report(tmp_path).read_text()


def test_kaplan_meier_median_and_its_interval_on_a_known_case():
    # 10 seeds at 100, 200, ..., 1000: the median is the 5th (the lower median), the interval brackets it
    m = median_steps(Times.of(list(range(10)), [100.0 * (i + 1) for i in range(10)], [True] * 10))
    assert (m.steps, m.exact, m.reached) == (500, True, 10) and m.ci_low < 500 < m.ci_high
    # 6 of 10 censored: the median is only known to lie beyond the last step seen
    m = median_steps(Times.of(list(range(10)), [100.0, 200, 300, 400] + [1000.0] * 6, [True] * 4 + [False] * 6))
    assert (m.steps, m.exact, m.reached, m.ci_high) == (1000, False, 4, None)


def test_an_arm_with_censored_seeds_is_an_upper_bound_and_unpaired_arms_have_no_seed_count():
    arm = Times.of([0, 1, 2], [500.0, 600, 3000], [True, True, False])
    base = Times.of([3, 4, 5], [1000.0, 1100, 1200], [True] * 3)
    c = compare(arm, base)
    assert (c.bound, c.ci_low, c.faster_seeds) == ("upper", None, None) and c.speedup == pytest.approx(1100 / 600)
    assert compare(Times.of([0], [3000.0], [False]), Times.of([0], [3000.0], [False])) is None  # nothing known


def test_one_comparison_reads_the_same_on_every_surface(tmp_path):
    rng = np.random.default_rng(7)
    for i, lr in enumerate((0.1, 1.0)):  # two lrs: the verdict compares each at its best
        for seed in range(SEEDS):
            for norm, scale in (("none", 1.0), ("batch", 3.0)):
                steps = round(np.exp(rng.normal(np.log(1500 / scale * (1 + i)), 0.2)) / 10) * 10
                write_run(tmp_path, norm, seed, steps, lr)
    out = io.StringIO()
    summarize(tmp_path, Console(file=out, width=200))
    v = json.loads((tmp_path / "sweep.json").read_text())["verdicts"][0]
    assert (v["arm"], v["baseline"], v["arm_lr"], v["baseline_lr"]) == ("norm=batch", "norm=none", 0.1, 0.1)
    sweep = load_sweep(tmp_path)
    text = fmt_ratio(sweep.verdicts[0])
    assert text == f"{v['speedup']:.2f}x [{v['ci_low']:.2f}, {v['ci_high']:.2f}]"
    assert text in out.getvalue().splitlines()[-1]  # the console's verdict line, last
    assert f"vs none {text}" in out.getvalue()  # the same-lr comparison of the same two groups: the same number
    assert f"vs none {text}" in (tmp_path / "summary.md").read_text() and text in write_report(tmp_path).read_text()
    row = next(
        r
        for r in csv.DictReader(io.StringIO((tmp_path / "summary.csv").read_text()))
        if r["group"].startswith("norm=batch, optim.lr=0.1")
    )
    assert [float(row[f"speedup_0.9_{k}"]) for k in ("ratio", "ci_low", "ci_high")] == [
        v["speedup"],
        v["ci_low"],
        v["ci_high"],
    ]
    write_dashboard(tmp_path)  # TensorBoard: the speed-up chart at the level 0.9, and the HParams column's text
    events = EventAccumulator(str(tmp_path / GROUPS / "norm=batch,optim.lr=0.1"))
    events.Reload()
    chart = {tag.removeprefix(MEDIANS).removeprefix(BOUNDS): events.Scalars(tag) for tag in events.Tags()["scalars"]}
    name = "speed-up over none at each test accuracy level"
    at = {k: e.value for k in (name, f"{name} low", f"{name} high") for e in chart[k] if e.step == 900}
    assert list(at.values()) == pytest.approx([v["speedup"], v["ci_low"], v["ci_high"]], rel=1e-6)  # float32
    hparams = EventAccumulator(str(tmp_path))
    hparams.Reload()
    (experiment,) = (hparams.SummaryMetadata(hparams_metadata.EXPERIMENT_TAG).plugin_data.content,)
    assert f"norm=batch vs norm=none, each at its best lr (0.1 vs 0.1): {text}".encode() in experiment


def test_an_arm_there_before_its_first_step_has_no_speed_up():
    at_once = Times.of([0, 1], [0, 0], [True, True])  # reached at the evaluation before any step
    assert compare(at_once, Times.of([0, 1], [100, 200], [True, True])) is None
