"""Sweep tables on scripted run summaries: grouping over seeds, spreads, never-reached runs, speed-ups."""

import csv
import io
import json
import math
from pathlib import Path

import pytest
from helpers import script
from hydra import compose, initialize_config_module

from bnlab.record.console import make_console
from bnlab.record.files import write_json
from bnlab.record.summary import FILE, SCHEMA_VERSION, Status, Summary
from bnlab.results.analysis import RunGroup, RunResult, group_runs, load_runs
from bnlab.results.summarize import compare, summarize
from bnlab.schema.config import BOOKKEEPING_KEYS


def run(
    norm: str, lr: float, seed: int, reached: dict, status: str = "completed", acc: float = 0.9, steps: int = 3000
) -> dict:
    return {
        "status": status,
        "steps": steps,
        "steps_per_s": 100.0,
        "final": {} if status == "failed" else {"test_acc": acc},
        "threshold_metric": "test_acc",
        "iterations_to_threshold": reached,
        "config": {
            "norm": {"name": norm, "placement": "before_act"},
            "optim": {"lr": lr},
            "trainer": {"max_steps": 3000},
            "seed": seed,
        },
    }


RUNS = [
    run("batch", 0.01, 0, {"0.9": 300, "0.95": 900}, acc=0.97),
    run("batch", 0.01, 1, {"0.9": 400, "0.95": 1100}, acc=0.96),
    run("batch", 0.01, 2, {"0.9": 200, "0.95": None}, acc=0.95),
    run("none", 0.01, 0, {"0.9": 1200, "0.95": None}, acc=0.90),
    run("none", 0.01, 1, {"0.9": 800, "0.95": None}, acc=0.91),
    run("none", 0.01, 2, {"0.9": 1000, "0.95": None}, acc=0.89),
    run("batch", 0.1, 0, {"0.9": 100, "0.95": 300}),
    run("none", 0.1, 0, {}, status="failed"),
]


def results(runs: list[dict]) -> list[RunResult]:
    """The runs as the analysis loads them (these dicts are schema-1 summaries: no schema_version)."""
    return [RunResult(Path(f"job{i}"), Summary.from_json(r)) for i, r in enumerate(runs)]


def by_group(runs: list[dict]) -> dict[str, RunGroup]:
    return {g.label: g for g in group_runs(results(runs))}


def test_runs_are_grouped_by_config_minus_seed():
    groups = by_group(RUNS)
    assert set(groups) == {
        "norm=batch, optim.lr=0.01",
        "norm=none, optim.lr=0.01",
        "norm=batch, optim.lr=0.1",
        "norm=none, optim.lr=0.1",
    }
    bn = groups["norm=batch, optim.lr=0.01"]
    assert len(bn.runs) == 3 and bn.keys == {"norm.name": "batch", "optim.lr": 0.01}


def test_bookkeeping_keys_name_no_group_and_no_run_directory():
    runs = [json.loads(json.dumps(r)) for r in RUNS]
    for i, r in enumerate(runs):  # resumed runs with other thread counts, some fused
        r["config"]["trainer"].update(threads=1 + i % 2, resume=i % 3 == 0, fuse=i % 2 == 0)
    assert set(by_group(runs)) == set(by_group(RUNS))
    with initialize_config_module("bnlab.conf", version_base="1.3"):
        cfg = compose("train", overrides=["trainer.threads=2", "norm=layer"], return_hydra_config=True)
    assert set(cfg.hydra.job.config.override_dirname.exclude_keys) == set(BOOKKEEPING_KEYS)


def test_iterations_are_the_kaplan_meier_median_and_never_reached_runs_are_censored():
    bn = by_group(RUNS)["norm=batch, optim.lr=0.01"]
    m = bn.thresholds[0.9].median  # 200, 300, 400: the median and 3 of 3 reached
    assert (m.steps, m.exact, m.reached, m.seeds, bn.thresholds[0.9].never) == (300, True, 3, 3, 0)
    assert m.ci_low == 200  # with 3 seeds the interval reaches past the last step seen on the other side
    m = bn.thresholds[0.95].median  # 900, 1100 and seed 2 censored at its last step, 3000
    assert (m.steps, m.exact, m.reached, m.seen, bn.thresholds[0.95].never) == (1100, True, 2, 3000, 1)
    assert RUNS[2]["iterations_to_threshold"]["0.95"] is None  # never counted as reaching it at 3000
    mean, std = bn.final_test_acc
    assert mean == pytest.approx(0.96) and std == pytest.approx(0.01)


def test_steps_per_s_is_each_runs_own_as_median_and_range(tmp_path):
    runs = [json.loads(json.dumps(r)) for r in RUNS[:3]]
    for r, speed in zip(runs, (23.8, 861.5, 442.7)):  # one seed starved by another process
        r["steps_per_s"] = speed
    (bn,) = group_runs(results(runs))
    assert bn.steps_per_s == (442.7, 23.8, 861.5)
    for i, r in enumerate(runs):
        (tmp_path / f"job{i}").mkdir()
        write_json(tmp_path / f"job{i}" / FILE, r)
    summarize(tmp_path, make_console())
    assert "| 442.7 (23.8-861.5) |" in (tmp_path / "summary.md").read_text()
    row = next(csv.DictReader(io.StringIO((tmp_path / "summary.csv").read_text())))
    assert (row["steps_per_s_median"], row["steps_per_s_min"], row["steps_per_s_max"]) == ("442.7", "23.8", "861.5")


def test_speed_up_over_the_no_norm_twin_is_the_ratio_of_medians_with_a_paired_interval():
    bn = by_group(RUNS)["norm=batch, optim.lr=0.01"]
    c = bn.thresholds[0.9].speedup  # medians: none 1000 (800, 1000, 1200), batch 300 (200, 300, 400)
    assert (c.speedup, c.bound, c.faster_seeds, c.seeds_arm) == pytest.approx((1000 / 300, "exact", 3, 3))
    assert 800 / 400 <= c.ci_low <= c.speedup <= c.ci_high <= 1200 / 200
    # no BN never reached 0.95 in its 3000 steps: its steps are known only from below, so is the speed-up
    c = bn.thresholds[0.95].speedup
    assert (c.speedup, c.bound, c.ci_high) == (pytest.approx(3000 / 1100), "lower", None)
    assert by_group(RUNS)["norm=none, optim.lr=0.01"].thresholds[0.9].speedup is None


def test_failed_runs_are_counted_not_dropped():
    failed = by_group(RUNS)["norm=none, optim.lr=0.1"]
    assert (len(failed.runs), failed.count(Status.COMPLETED), failed.count(Status.FAILED)) == (1, 0, 1)
    assert failed.final_test_acc == (None, None)
    bn = by_group(RUNS)["norm=batch, optim.lr=0.1"]
    assert bn.thresholds[0.9].speedup is None  # its twin failed: no speed-up to report


def write_sweep(root, runs):
    for i, s in enumerate(runs):
        (root / f"job{i}").mkdir(parents=True)
        write_json(root / f"job{i}" / "summary.json", s)


def test_summarize_writes_csv_md_and_json_with_one_row_per_group(tmp_path):
    write_sweep(tmp_path, RUNS)
    summarize(tmp_path, make_console(), include_failed=True)  # the failed run too
    rows = list(csv.DictReader(io.StringIO((tmp_path / "summary.csv").read_text())))
    assert len(rows) == 4 and {(r["norm.name"], r["optim.lr"]) for r in rows} == {
        ("batch", "0.01"),
        ("none", "0.01"),
        ("batch", "0.1"),
        ("none", "0.1"),
    }
    md = (tmp_path / "summary.md").read_text()
    row = "| norm=batch, optim.lr=0.01 | 3 | 3/0/0/0 | 300 [200, >400]; vs none 3.33x [2.00, 5.00] | "
    assert row + "1100 [900, >3000], 1 never; vs none >=2.73x [>=1.00] |" in md  # the twin never got there: a bound
    csv_bn = next(r for r in rows if r["group"] == "norm=batch, optim.lr=0.01")
    assert float(csv_bn["speedup_0.95_ratio"]) == pytest.approx(3000 / 1100) and csv_bn["speedup_0.95_bound"] == "lower"
    assert (csv_bn["iters_to_0.95_median"], csv_bn["iters_to_0.95_reached"]) == ("1100.0", "2")
    assert len(json.loads((tmp_path / "sweep.json").read_text())["groups"]) == 4
    assert len(load_runs(tmp_path)) == 8
    (tmp_path / "summary.json").write_text((tmp_path / "sweep.json").read_text())  # where an earlier bnlab wrote it
    assert len(load_runs(tmp_path)) == 8  # a sweep's table is not a run
    sweep = summarize(tmp_path, make_console())  # by default the failed run is left out, and counted
    assert len(sweep.groups) == 3 and sweep.failed == 1 and len(sweep.left_out) == 1
    assert json.loads((tmp_path / "sweep.json").read_text())["failed_left_out"] == 1


def test_two_sweeps_side_by_side(tmp_path, capsys):
    write_sweep(tmp_path / "a", RUNS[:6])
    write_sweep(tmp_path / "b", [dict(s, config={**s["config"], "optim": {"lr": 0.01}}) for s in RUNS[:6]])
    rows = compare([tmp_path / "a", tmp_path / "b"], make_console())
    assert [(g.label, sweep[-1]) for sweep, g in rows] == [
        ("norm=batch", "a"),
        ("norm=batch", "b"),
        ("norm=none", "a"),
        ("norm=none", "b"),
    ]


def test_summary_json_round_trips_through_the_dataclass_as_standard_json(tmp_path):
    summary = Summary.from_json(RUNS[0])
    summary.final["test_loss"] = math.nan  # a diverged run's last loss
    summary.save(tmp_path / "summary.json")
    text = (tmp_path / "summary.json").read_text()
    assert "NaN" not in text and json.loads(text)["final"]["test_loss"] is None
    on_disk = json.loads(text)
    assert on_disk["schema_version"] == SCHEMA_VERSION
    assert on_disk["iterations_to_threshold"] == [  # RUNS are version 3: no seconds
        {"threshold": 0.9, "iterations": 300, "seconds": None},
        {"threshold": 0.95, "iterations": 900, "seconds": None},
    ]
    loaded = Summary.load(tmp_path / "summary.json")
    assert loaded == Summary.from_json(on_disk)
    assert loaded.iterations_to_threshold == {0.9: 300, 0.95: 900} and loaded.final["test_loss"] is None
    assert loaded.status is Status.COMPLETED and (loaded.seed, loaded.lr, loaded.max_steps) == (0, 0.01, 3000)


def test_old_summaries_without_schema_version_are_read(tmp_path):
    old = {**RUNS[0], "final": {"test_acc": 0.97, "test_loss": math.nan}}  # schema 1 wrote NaN
    (tmp_path / "job0").mkdir()
    (tmp_path / "job0" / "summary.json").write_text(json.dumps(old))  # json.dumps writes NaN as NaN
    (run_result,) = load_runs(tmp_path)
    assert run_result.summary.schema_version == 1
    assert run_result.summary.iterations_to_threshold == {0.9: 300, 0.95: 900}
    assert run_result.summary.final == {"test_acc": 0.97, "test_loss": None}


def test_the_ci_check_of_the_main_job_reads_the_newest_sweep(tmp_path):
    check = script("check_main_job")
    write_sweep(
        tmp_path / "2026-01-01_00-00-00", [run("batch", 0.01, 0, {"0.95": 900}), run("none", 0.01, 0, {"0.95": None})]
    )
    assert check.main(tmp_path) == 0
    write_sweep(
        tmp_path / "2026-01-02_00-00-00", [run("batch", 0.01, 0, {"0.95": None}), run("none", 0.01, 0, {"0.95": 900})]
    )
    assert check.main(tmp_path) == 1


def test_the_table_shows_every_final_metric_the_runs_recorded(tmp_path):
    runs = [json.loads(json.dumps(r)) for r in RUNS[:3]]
    for i, r in enumerate(runs):
        r["final"].update(test_acc_train_mode=0.90 + i / 100, test_acc_precise_bn=0.97)
    write_sweep(tmp_path, runs)
    summarize(tmp_path, make_console())
    md = (tmp_path / "summary.md").read_text()
    assert "| final test acc | test acc, train mode | test acc, precise BN |" in md
    assert "| 0.9600±0.0100 | 0.9100±0.0100 | 0.9700±0.0000 |" in md


def test_a_regression_table_shows_the_final_test_loss_and_its_speed_ups(tmp_path):
    runs = []
    for norm, losses, reached in (("none", (2.0, 2.1), 3000), ("batch", (0.8, 0.7), 1000)):
        for seed, loss in enumerate(losses):
            r = run(norm, 0.01, seed, {"2.5": reached})
            r.update(threshold_metric="test_loss", final={"test_loss": loss, "train_loss": loss})
            # a per-norm setting the sweep set with the norm (ioffe_speedup's weight decay) leaves the twin a twin
            r["config"]["optim"]["weight_decay"] = 0.0005 if norm == "none" else 0.0001
            runs.append(r)
    write_sweep(tmp_path, runs)
    summarize(tmp_path, make_console())
    md = (tmp_path / "summary.md").read_text()
    assert "| iters to test_loss 2.5 | final test loss | steps/s |" in md and "final test acc" not in md
    batch = "| norm=batch, optim.weight_decay=0.0001 | 2 | 2/0/0/0 | 1000 [1000, >1000]; vs none 3.00x [3.00, 3.00] |"
    assert batch + " 0.7500±0.0707 |" in md
    assert md.count("vs none 3.00x") == 1 and "in 3.00x [3.00, 3.00] fewer steps" in md  # the verdict: the same ratio


def test_threshold_defaults_belong_to_the_data_set():
    from helpers import compose_config

    assert compose_config(["data=mnist"]).threshold.values == [0.90, 0.95, 0.97]
    assert compose_config(["data=fashion_mnist"]).threshold.values == [0.80, 0.85, 0.88]
    assert compose_config(["data=cifar10"]).threshold.values == [0.50, 0.60, 0.70]
    regression = compose_config(["data=linear_regression"]).threshold
    assert (regression.metric, regression.values) == ("test_loss", [5.0, 2.5, 1.0])
    assert compose_config(["data=fashion_mnist", "threshold.values=[0.5]"]).threshold.values == [0.5]
