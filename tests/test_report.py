"""The report on fake sweeps: summary.json files and TensorBoard events written here, no training."""

from __future__ import annotations

import io
import math
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import to_hex
from matplotlib.image import imread
from matplotlib.lines import Line2D
from rich.console import Console
from torch.utils.tensorboard import SummaryWriter

from bnlab.record.files import OutputError, write_json
from bnlab.record.summary import Status, Summary
from bnlab.results.analysis import (
    RunGroup,
    RunResult,
    baseline_speedup,
    largest_lr_that_trains,
    level_curves,
    load_sweep,
    over_training,
    training_edges,
)
from bnlab.results.figures import FIGURES, norm_colours
from bnlab.results.report import write_report
from bnlab.results.summarize import summarize
from bnlab.schema.config import TrainConfig

THRESHOLDS = [0.9, 0.95, 0.97]


def curve(norm: str, lr: float, seed: int, step: int) -> float:
    """A made-up test accuracy: BN rises faster and higher; a larger lr is faster."""
    tau = (150 if norm == "batch" else 250) * math.sqrt(0.1 / lr)
    top = 0.985 if norm == "batch" else 0.965
    wiggle = 0.004 * math.sin(step / 90 + seed)
    return min(1.0, top - (top - 0.1) * math.exp(-step / tau) + wiggle)


def fake_run(
    root: Path,
    norm: str,
    seed: int,
    lr: float = 0.1,
    *,
    max_steps: int = 1000,
    eval_every: int = 100,
    diverge_at: int | None = None,
    status: str | None = None,
    final_acc: float | None = None,
    diag: bool = False,
    precise: bool = False,
    events: bool = True,
    train_every: int = 1,
    batch_size: int = 60,
) -> dict:
    """One run folder as bnlab.run.train writes it: summary.json and (unless events=False) TensorBoard events."""
    cfg = asdict(TrainConfig())
    cfg["norm"]["name"], cfg["optim"]["lr"], cfg["seed"] = norm, lr, seed
    cfg["trainer"].update(max_steps=max_steps, eval_every=eval_every)
    cfg["data"]["batch_size"] = batch_size
    cfg["threshold"]["values"] = THRESHOLDS
    run_dir = root / f"data.batch_size={batch_size},norm={norm},optim.lr={lr},seed={seed}"
    run_dir.mkdir(parents=True)
    last = diverge_at - 1 if diverge_at else max_steps
    evals = [*range(0, last + 1, eval_every), *([last] if last % eval_every else [])]
    accs = {s: curve(norm, lr, seed, s) for s in evals}
    if diverge_at:
        accs[last] = 0.098
    reached = {str(v): next((s for s in evals if accs[s] >= v), None) for v in THRESHOLDS}
    if events:
        w = SummaryWriter(str(run_dir))
        for s in range(1, last + 1, train_every):
            acc = curve(norm, lr, seed, s)
            w.add_scalar("train/loss", -math.log(max(acc, 0.05)) + 0.05 * math.sin(s), s)
            w.add_scalar("train/acc", acc, s)
        for s in evals:
            w.add_scalar("test/loss", -math.log(accs[s]), s)
            w.add_scalar("test/acc", accs[s], s)
            w.add_scalar("train/lr", lr, s)
        if diag:
            bn = norm == "batch"
            rng = np.random.default_rng(seed)
            for s in range(50, last + 1, 50):
                for layer in (-1, 0):
                    centre = 0.0 if bn else 0.3 + layer + s / 300  # no BN: the distribution drifts
                    spread = 1.0 if bn else 0.6 + s / 400
                    a = rng.normal(centre, spread, (200, 10))
                    for prefix, values in ((f"act/{layer}", a), (f"act/{layer}/unit0", a[:, 0])):
                        for q, v in zip((15, 50, 85), np.percentile(values, (15, 50, 85))):
                            w.add_scalar(f"{prefix}/p{q}", v, s)
                    if s % 500 == 0:  # present, as bnlab writes them (fewer here: they are slow to read back)
                        w.add_histogram(f"act/{layer}", a, s)
                for i in range(3):
                    w.add_scalar(
                        f"ics/layer{i}/l2",
                        0.0 if i == 0 else (1.5 if bn else 1.0) * (1 + lr) * (1 + 0.2 * rng.random()) / (1 + s / 300),
                        s,
                    )
                    w.add_scalar(f"ics/layer{i}/cos", 1.0 if i == 0 else (0.8 if bn else 0.9) + 0.05 * rng.random(), s)
                    w.add_scalar(f"grad_norm/layer{i}", rng.random(), s)
                scale = (0.2 if bn else 1.0) * (1 + lr)
                w.add_scalar("landscape/loss_variation", scale * (0.5 + rng.random()) / (1 + s / 200), s)
                w.add_scalar("landscape/grad_predictiveness", scale * (2 + rng.random()), s)
                w.add_scalar("landscape/beta_smoothness", scale * (10 + 5 * rng.random()), s)
                loss = -math.log(curve(norm, lr, seed, s))
                w.add_scalar("landscape/loss_min", loss, s)
                w.add_scalar("landscape/loss_max", loss + scale * (0.5 + rng.random()), s)
                w.add_scalar("landscape/grad_change_min", scale * rng.random(), s)
                w.add_scalar("landscape/grad_change_max", scale * (2 + rng.random()), s)
                if bn:
                    w.add_scalar("stat_drift/1.norm.running_mean", rng.random(), s)
        w.add_scalar("final/test_acc", accs[last], last)
        for v, step in reached.items():
            w.add_scalar(f"iters_to/test_acc={v}", math.nan if step is None else step, last)
        w.close()
    final = {
        "train_loss": 0.1,
        "train_acc": accs[last],
        "test_loss": -math.log(accs[last]),
        "test_acc": final_acc or accs[last],
    }
    if precise:
        final["test_acc_precise_bn"] = final["test_acc"] + (0.005 if norm == "batch" else 0.0)
        final["test_acc_train_mode"] = final["test_acc"] - (0.04 if norm == "batch" else 0.0)
    summary = {
        "status": status or ("diverged" if diverge_at else "completed"),
        "steps": last,
        "error": None,
        "wall_time_s": 1.0,
        "steps_per_s": 500.0,
        "device": "cpu",
        "final": final,
        "threshold_metric": "test_acc",
        "iterations_to_threshold": reached,
        "config": cfg,
    }
    write_json(run_dir / "summary.json", summary)
    return summary


def image_ok(path: Path) -> bool:
    """A real PNG of a reasonable size with something drawn on it."""
    pixels = imread(path)
    return pixels.ndim == 3 and pixels.shape[0] >= 300 and pixels.shape[1] >= 500 and float(np.ptp(pixels)) > 0


def embedded(report: str) -> set[str]:
    return {name for name in FIGURES if f"]({name})" in report}


@pytest.fixture(scope="module")
def basic(tmp_path_factory) -> Path:
    """2 groups x 3 seeds, only the curves every run logs; a stale figure and the sweep's own table files."""
    root = tmp_path_factory.mktemp("basic")
    for norm in ("none", "batch"):
        for seed in range(3):
            fake_run(root, norm, seed, train_every=5)
    summarize(root, Console(file=io.StringIO()))  # the sweep's own table files at the top
    (root / "ics.png").write_bytes(b"stale")  # left by an earlier report of other runs
    return root


@pytest.fixture(scope="module")
def lr_sweep(tmp_path_factory) -> Path:
    """norm x lr x 3 seeds: norm=none diverges once at lr 1; norm=batch trains at every lr."""
    root = tmp_path_factory.mktemp("lr")
    for norm in ("none", "batch"):
        for lr in (0.01, 0.1, 1.0):
            for seed in range(3):
                diverge = norm == "none" and lr == 1.0 and seed == 1
                fake_run(root, norm, seed, lr, diverge_at=250 if diverge else None, train_every=10)
    return root


def test_basic_sweep_gets_curves_bars_and_the_table_only(basic):
    report = write_report(basic)
    assert report == basic / "report.md"
    text = report.read_text()
    assert embedded(text) == {"metric_curves.png", "iterations_to_threshold.png", "steps_to_level.png"}
    for name in ("metric_curves.png", "iterations_to_threshold.png", "steps_to_level.png"):
        assert image_ok(basic / name)
    for name in set(FIGURES) - embedded(text):
        assert not (basic / name).exists(), name  # skipped figures leave no file, stale ones are removed
    assert "| group | runs | ok/stall/div/fail | iters to test_acc 0.9 |" in text
    assert "| norm=batch | 3 | 3/0/0/0 |" in text and "| norm=none | 3 | 3/0/0/0 |" in text
    assert "Largest learning rate" not in text


def test_the_steps_to_every_level_meet_the_verdict_at_the_thresholds(lr_sweep):
    sweep = load_sweep(lr_sweep)
    curves = {c.label: c for c in level_curves(sweep)}
    assert set(curves) == {"norm=batch", "norm=none"}
    arm, base = curves["norm=batch"], curves["norm=none"]
    assert arm.levels == base.levels and set(THRESHOLDS) <= set(arm.levels) and len(arm.levels) > 10
    assert all(s is None for s in base.speedups)  # the baseline is what the others are measured against
    for v in sweep.verdicts:  # at a threshold, the very comparison of the verdict
        r = arm.speedups[arm.levels.index(v.threshold)]
        assert (r.speedup, r.ci_low, r.ci_high, r.bound) == (v.speedup, v.ci_low, v.ci_high, v.bound)
    exact = [m.steps for m in arm.medians if m.exact]
    assert exact == sorted(exact)  # a harder level takes no fewer steps
    # between thresholds, from the curves: the first evaluation at which every level is reached
    level = next(x for x in arm.levels if x not in THRESHOLDS and arm.medians[arm.levels.index(x)].exact)
    firsts = sorted(next(s for s, a in zip(*r.curve("test/acc")) if a >= level) for r in arm.group.results)
    assert arm.medians[arm.levels.index(level)].steps == firsts[1]  # the median of three seeds


def test_lr_sweep_finds_the_largest_lr_that_trains(lr_sweep):
    text = write_report(lr_sweep).read_text()
    assert {"lr_sensitivity.png", "metric_curves.png", "iterations_to_threshold.png"} <= embedded(text)
    assert image_ok(lr_sweep / "lr_sensitivity.png")
    assert "| norm=none, optim.lr=1.0 | 3 | 2/0/1/0 |" in text
    assert "- norm=batch: **≥ 1** (the largest lr tried trains: a lower bound;" in text  # the top of the grid
    # lr 1 had a diverged seed; the margin: how far the deciding runs sit from the cut
    assert "- norm=none: **0.1** (its worst seed ends 0.0452 clear of the cut; at 1: 1 of 3 seeds diverged" in text
    assert "final test_acc ≥ 0.9" in text


def test_a_batch_size_sweep_plots_accuracy_against_the_batch_size_not_the_lr_it_scaled(tmp_path):
    for norm in ("batch", "group"):
        for b in (2, 8, 32):
            for seed in range(2):
                fake_run(tmp_path, norm, seed, 0.05 * b / 32, batch_size=b, events=False)
    text = write_report(tmp_path).read_text()
    assert "batch_size.png" in embedded(text) and "lr_sensitivity.png" not in embedded(text)
    assert image_ok(tmp_path / "batch_size.png")
    assert "The sweep set optim.lr with the batch size." in text


def test_largest_lr_that_trains_needs_every_seed_completed_and_above_the_lowest_threshold(tmp_path):
    runs = [
        RunResult(tmp_path, Summary.from_json(fake_run(tmp_path, "batch", seed, lr, max_steps=3000, events=False)))
        for lr in (0.01, 0.1, 1.0)
        for seed in range(2)
    ]
    assert largest_lr_that_trains(runs) == {"all runs": 1.0}
    runs[-1].summary.status = Status.FAILED  # lr 1, seed 1
    assert largest_lr_that_trains(runs) == {"all runs": 0.1}
    runs[3].summary.final["test_acc"] = 0.85  # lr 0.1, seed 1: completed but below 0.9
    assert largest_lr_that_trains(runs) == {"all runs": 0.01}
    for r in runs[:2]:
        r.summary.status = Status.DIVERGED
    assert largest_lr_that_trains(runs) == {"all runs": None}
    assert largest_lr_that_trains([]) == {}


def test_diagnostics_give_activation_ics_and_landscape_figures(tmp_path):
    for norm in ("none", "batch"):
        for seed in range(3):
            fake_run(tmp_path, norm, seed, diag=True, train_every=20)
    text = write_report(tmp_path).read_text()
    expected = {
        "metric_curves.png",
        "iterations_to_threshold.png",
        "steps_to_level.png",
        "activation_percentiles.png",
        "ics.png",
        "landscape.png",
    }
    assert embedded(text) == expected
    for name in expected:
        assert image_ok(tmp_path / name), name
    # one number per group and measure under each figure; BN's landscape is the smoother in the made-up runs
    assert "| group | layer 1 ‖G - G'‖ | layer 1 cos | layer 2 ‖G - G'‖ | layer 2 cos |" in text
    smoothness = text[text.index("## Loss-landscape smoothness") :]
    beta = {g: float(v) for g, v in re.findall(r"^\| (norm=\w+) \| [^|]+\| [^|]+\| ([\d.]+)±", smoothness, re.M)}
    assert beta.keys() == {"norm=batch", "norm=none"} and beta["norm=batch"] < beta["norm=none"]


def test_precise_bn_keys_give_the_mode_chart_and_runs_without_events_still_report(tmp_path):
    for norm in ("none", "batch"):
        for seed in range(3):
            fake_run(tmp_path, norm, seed, precise=True, events=False)
    text = write_report(tmp_path).read_text()
    assert embedded(text) == {"iterations_to_threshold.png", "precise_bn.png"}  # no events: no curves
    assert image_ok(tmp_path / "precise_bn.png")


def test_never_reached_runs_are_shown_and_failed_runs_counted(tmp_path):
    fake_run(tmp_path, "none", 0, lr=0.001)  # too slow to reach any threshold in 1000 steps
    fake_run(tmp_path, "batch", 0, lr=0.001)
    fake_run(tmp_path, "batch", 1, lr=0.001, status="failed", events=False)
    text = write_report(tmp_path).read_text()
    assert "| norm=none | 1 | 1/0/0/0 | never |" in text
    assert "| norm=batch | 1 | 1/0/0/0 |" in text and "1 failed run left out" in text  # failed: left out, counted
    text = write_report(tmp_path, include_failed=True).read_text()
    assert "| norm=batch | 2 | 1/0/0/1 |" in text
    assert image_ok(tmp_path / "iterations_to_threshold.png")


def test_a_folder_without_runs_gets_a_short_report(tmp_path):
    text = write_report(tmp_path).read_text()
    assert "No runs" in text
    assert not list(tmp_path.glob("*.png"))
    with pytest.raises(OutputError):
        write_report(tmp_path / "missing")


def legend_colours(section) -> dict[str, set]:
    """Norm -> the colours its legend entries have in a figure (lines: their colour; bars: their face)."""
    seen: dict[str, set] = {}
    for legend in section.figure.legends:
        for text, handle in zip(legend.texts, legend.legend_handles):
            if match := re.search(r"norm=(\w+)", text.get_text()):
                colour = handle.get_color() if isinstance(handle, Line2D) else handle.get_facecolor()
                seen.setdefault(match.group(1), set()).add(to_hex(colour))
    return seen


def test_each_norm_has_one_colour_in_every_figure_and_the_best_lr_comes_first(lr_sweep):
    sweep = load_sweep(lr_sweep)
    expected = {norm: to_hex(colour) for norm, colour in norm_colours(sweep).items()}
    checked = 0
    for name, make in FIGURES.items():
        if (section := make(sweep)) is not None:
            for norm, colours in legend_colours(section).items():
                assert colours == {expected[norm]}, (name, norm)
                checked += 1
    assert checked >= 6  # metric curves, bars and lr sensitivity, both norms
    text = write_report(lr_sweep).read_text()
    assert text.index("## Each norm at its best learning rate") < text.index("## Sweep table")
    assert "| norm=batch | 1* | " in text  # best by accuracy: the largest lr tried, marked as the grid's edge
    assert "| speed-up to 0.9 over none |" in text and "## Notation" in text
    assert image_ok(lr_sweep / "best_lr.png")


def test_the_training_edge_states_its_margin_on_both_sides(tmp_path):
    runs = [
        RunResult(tmp_path, Summary.from_json(fake_run(tmp_path, "none", seed, lr, max_steps=3000, events=False)))
        for lr in (0.1, 1.0)
        for seed in range(3)
    ]
    runs[3].summary.final["test_acc"] = 0.893  # lr 1, seed 0: just below the 0.9 cut
    (edge,) = training_edges(runs).values()
    worst = min(r.summary.final["test_acc"] for r in runs[:3])
    assert (edge.lr, edge.above) == (0.1, 1.0) and edge.margin == pytest.approx(worst - 0.9)
    assert edge.why == "1 of 3 ended below the cut (the worst by 0.0070)"


def test_bars_of_groups_that_differ_in_another_key_are_shades_of_their_norms_colour(tmp_path):
    for batch_size in (32, 64):
        for seed in range(2):
            fake_run(tmp_path, "batch", seed, batch_size=batch_size, precise=True, events=False)
    sweep = load_sweep(tmp_path)
    section = FIGURES["precise_bn.png"](sweep)
    faces = [to_hex(h.get_facecolor()) for legend in section.figure.legends for h in legend.legend_handles]
    assert len(faces) == 2 and len(set(faces)) == 2
    assert faces[0] == to_hex(norm_colours(sweep)["batch"])  # the first in the norm's own colour, then lighter


def test_an_ioffe_sweep_compares_norms_at_1_5_and_30_times_the_baselines_best_lr(tmp_path):
    for lr in (0.01, 0.05, 0.1, 0.3):
        for seed in range(3):
            fake_run(tmp_path, "none", seed, lr, final_acc=0.97 if lr == 0.01 else 0.95)  # best: 0.01
            fake_run(tmp_path, "batch", seed, lr)
    sweep = load_sweep(tmp_path)
    result = baseline_speedup(sweep)
    assert result.baseline.lr == 0.01 and [(r.norm, r.lr) for r in result.rows] == [
        ("batch", 0.01),
        ("batch", 0.05),
        ("batch", pytest.approx(0.3)),
    ]
    peaks = [max(curve("none", 0.01, seed, s) for s in range(0, 1001, 100)) for seed in range(3)]
    assert result.target == pytest.approx(min(peaks))
    for row in [result.baseline, *result.rows]:  # the first evaluation at or above the target, seed by seed
        steps = [
            next(s for s in range(0, 1001, 100) if curve(row.norm, row.lr, seed, s) >= min(peaks)) for seed in range(3)
        ]
        assert row.steps == (np.median(steps), min(steps), max(steps)) and row.never == 0
    base = [next(s for s in range(0, 1001, 100) if curve("none", 0.01, seed, s) >= min(peaks)) for seed in range(3)]
    x5 = [next(s for s in range(0, 1001, 100) if curve("batch", 0.05, seed, s) >= min(peaks)) for seed in range(3)]
    ratios = [b / x for b, x in zip(base, x5)]
    assert result.rows[1].speedup == (round(float(np.median(ratios)), 2), min(ratios), max(ratios))
    assert result.rows[1].speedup[0] > 1  # BN at 5x the lr gets there sooner
    text = write_report(tmp_path).read_text()
    assert "speedup.png" in embedded(text) and image_ok(tmp_path / "speedup.png")
    assert "| batch x5 | 0.05 |" in text and "BN-x5 2.1 | 14.8x |" in text and "| batch x30 | 0.3 |" in text


def test_no_speedup_section_without_5_or_30_times_the_baselines_lr(lr_sweep):
    assert baseline_speedup(load_sweep(lr_sweep)) is None


def test_a_regression_lr_sweep_ranks_by_the_final_test_loss(tmp_path):
    for norm in ("none", "batch"):
        for lr in (0.003, 0.01):
            for seed in range(2):
                summary = fake_run(tmp_path, norm, seed, lr)
                loss = (2.0 if norm == "none" else 0.8) + (lr - 0.003) * (10 if norm == "none" else -10) + seed / 100
                run_dir = tmp_path / f"data.batch_size=60,norm={norm},optim.lr={lr},seed={seed}"
                reached = [{"threshold": 2.5, "iterations": 500 if norm == "batch" else 1500}]
                summary.update(final={"test_loss": loss, "train_loss": loss}, threshold_metric="test_loss")
                write_json(run_dir / "summary.json", {**summary, "iterations_to_threshold": reached})
    sweep = load_sweep(tmp_path)
    assert sweep.final_metric == "test_loss"
    text = write_report(tmp_path).read_text()
    assert {"best_lr.png", "lr_sensitivity.png"} <= embedded(text)
    assert "| group | best lr | final test loss |" in text
    # the lowest loss is the best: no BN at 0.003 (2.005), BN at 0.01 (0.735)
    assert "| norm=none | 0.003* | 2.0050±0.0071 |" in text and "| norm=batch | 0.01* | 0.7350±0.0071 |" in text
    assert "final test_loss ≤ 2.5 (the highest threshold)" in text


def test_a_diagnostic_over_training_is_each_runs_median_then_mean_std_min_max_over_seeds(tmp_path):
    runs = []
    for seed, values in enumerate(([1.0, 2.0, 90.0], [2.0, 3.0, 4.0], [5.0, 6.0, 7.0])):  # medians 2, 3, 6
        summary = Summary(status=Status.COMPLETED, config={"seed": seed}, threshold_metric="test_acc")
        run = RunResult(tmp_path / str(seed), summary)
        run.__dict__["scalars"] = {"ics/layer1/l2": (np.array([100, 200, 300]), np.array(values))}
        runs.append(run)
    group = RunGroup("all runs", {}, runs)
    assert over_training(group, "ics/layer1/l2") == pytest.approx((11 / 3, np.std([2, 3, 6], ddof=1), 2.0, 6.0))
    assert over_training(group, "ics/layer2/l2") is None


@pytest.mark.slow
@pytest.mark.parametrize("command", ["summarize", "report"])
def test_reading_a_sweep_imports_no_torch(command, lr_sweep):
    """`bnlab summarize` and `bnlab report` read the record alone: torch's import would be most of their time."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "bnlab", command, str(lr_sweep)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "bnlab.results.analysis" in imported and "matplotlib" in imported or command == "summarize"
    assert not {m for m in imported if m.split(".")[0] == "torch"}
