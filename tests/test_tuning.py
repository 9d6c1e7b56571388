"""hydra/sweeper=tune (bnlab/face/tuning.py): the search space read from the command line and refused where it
cannot be searched, the objective on simulated runs with a known order, the same number of trials for every
arm, final runs on seeds the search never used, pruning, the record and its figure, and a resume after SIGINT or
SIGKILL that runs no finished trial again."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import CLI, TINY, bnlab
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata as hparams_metadata

from bnlab.face.tuning import Space, Tuner, plan, quasi_random
from bnlab.record.summary import FILE, Status, Summary
from bnlab.record.tuning import COMPLETE, PRUNED, SEARCH, Tuning
from bnlab.results.analysis import load_runs
from bnlab.results.tuning import objective
from bnlab.schema.config import ConfigError

LR = "optim.lr=tag(log,interval(0.001,1))"


def test_the_choices_are_the_arms_and_the_intervals_the_search():
    p = plan(["norm=none,batch", "model.activation=relu,tanh", LR, "norm.groups=int(interval(1,8))", "data=synthetic"])
    assert p.arms == [
        ["norm=none", "model.activation=relu"],
        ["norm=none", "model.activation=tanh"],
        ["norm=batch", "model.activation=relu"],
        ["norm=batch", "model.activation=tanh"],
    ]
    assert p.spaces == [Space("optim.lr", 0.001, 1.0, True, False), Space("norm.groups", 1, 8, False, True)]
    assert p.fixed == ["data=synthetic", "trainer.fuse=auto"]  # a trial's seeds train fused unless told otherwise
    assert "trainer.fuse=false" in plan(["trainer.fuse=false", LR]).fixed


@pytest.mark.parametrize(
    "override, says",
    [
        ("optim.lr=interval(10,1)", "an interval's start must be below its end"),
        ("optim.lr=tag(log,interval(0,1))", "a log interval takes positive ends only"),
        ("seed=0,1", "seed is chosen by the tuning sweeper"),
        ("norm=glob(b*)", "takes choices (the arms) and intervals only"),
    ],
)
def test_a_search_space_that_cannot_be_searched_is_refused_naming_the_key(override, says):
    with pytest.raises(ConfigError, match=re.escape(says)) as e:
        plan(["norm=none,batch", override])
    assert override.split("=")[0] in str(e.value)


def test_a_norm_key_applies_only_to_the_arms_whose_norm_takes_it():
    momentum = Space("norm.momentum", 0.01, 0.5, True, False)
    assert momentum.applies_to("batch") and not momentum.applies_to("none") and not momentum.applies_to("layer")
    assert Space("optim.lr", 0.001, 1.0, True, False).applies_to("none")  # any other key: every arm


def test_the_quasi_random_points_are_reproducible_within_the_intervals_and_spread_on_a_log_scale():
    spaces = [Space("optim.lr", 0.001, 10.0, True, False), Space("norm.groups", 1, 8, False, True)]
    points = quasi_random(spaces, 64, seed=0)
    assert points == quasi_random(spaces, 64, seed=0) and points != quasi_random(spaces, 64, seed=1)
    lrs = [p["optim.lr"] for p in points]
    assert all(0.001 <= lr <= 10 for lr in lrs) and all(isinstance(p["norm.groups"], int) for p in points)
    # a quarter of the log range in each quarter, as for evenly spread points (Halton: within 2 of 16)
    quarters = [sum(1 for lr in lrs if 10 ** (-3 + q) <= lr < 10 ** (-2 + q)) for q in range(4)]
    assert all(abs(n - 16) <= 2 for n in quarters)


def test_ctrl_c_is_answered_even_where_the_parent_ignored_it():
    code = "import signal; from bnlab.face.interrupts import stop_on_signals; stop_on_signals(); " + (
        "print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"
    )
    ignored = lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)  # noqa: E731  a script's background job
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, preexec_fn=ignored).stdout
    assert out.strip() == "True"


def test_a_second_process_on_the_same_tuning_sweep_is_refused(tmp_path):
    first, second = object.__new__(Tuner), object.__new__(Tuner)
    first.root = second.root = tmp_path
    with first.locked():
        script = "\n".join(
            [
                "from pathlib import Path",
                "from bnlab.face.tuning import Tuner",
                "t = object.__new__(Tuner)",
                f"t.root = Path({str(tmp_path)!r})",
                "with t.locked(): pass",
            ]
        )
        other = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert other.returncode == 2 and "another bnlab process is running the tuning sweep" in other.stderr
    with second.locked():  # free again once the first is done
        pass


def _summary(seed: int, reached_at: int | None, acc: float, status: Status = Status.COMPLETED, steps: int = 1000):
    return Summary(
        config={"trainer": {"eval_every": 100, "max_steps": 1000}, "seed": seed},
        status=status,
        steps=steps,
        threshold_metric="test_acc",
        iterations_to_threshold={0.97: reached_at},
        final={"test_acc": acc},
    )


def test_the_objective_ranks_reached_then_unreached_by_accuracy_then_diverged_last():
    fast = [_summary(s, 300, 0.98) for s in range(3)]
    fast_less_accurate = [_summary(s, 300, 0.975) for s in range(3)]
    slow = [_summary(s, 700, 0.99) for s in range(3)]
    one_of_three = [_summary(0, 200, 0.98), _summary(1, None, 0.96), _summary(2, None, 0.96)]
    unreached_accurate = [_summary(s, None, 0.965) for s in range(3)]
    unreached = [_summary(s, None, 0.90) for s in range(3)]
    diverged = [_summary(0, 100, 0.98), _summary(1, 100, 0.98), _summary(2, None, 0.1, Status.DIVERGED, steps=20)]
    ranked = [fast, fast_less_accurate, slow, unreached_accurate, one_of_three, unreached, diverged]
    values = [objective(runs, 0.97, 1000) for runs in ranked]
    assert values == sorted(values)
    assert 300 < values[0] < 350  # the Kaplan-Meier median steps, the tie-break below half an evaluation interval
    two_of_three = [_summary(0, 200, 0.98), _summary(1, 400, 0.98), _summary(2, None, 0.96)]
    assert 400 < objective(two_of_three, 0.97, 1000) < 450  # a censored seed counts above the median


SWEEP = [
    "train",
    "-m",
    "hydra/sweeper=tune",
    *TINY,
    "data.num_train=128",
    "trainer.max_steps=27",
    "trainer.eval_every=3",
    "norm=none,batch",
    "optim.lr=tag(log,interval(0.01,1))",
    "norm.momentum=tag(log,interval(0.01,0.5))",
    "hydra.sweeper.trials=6",
    "hydra.sweeper.seeds=2",
    "hydra.sweeper.final_seeds=2",
    "hydra.sweep.dir=s",
]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("tuned")
    proc = bnlab(*SWEEP, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    (cwd / "out.txt").write_text(proc.stdout)
    return cwd / "s"


@pytest.mark.slow
def test_every_arm_gets_the_same_trials_and_the_final_runs_seeds_the_search_never_used(tuned):
    record = Tuning.load(tuned)
    assert [a.label for a in record.arms] == ["norm=none", "norm=batch"]
    for arm in record.arms:
        trials = record.trials_of(arm.label)
        assert len(trials) == 6 and {t.state for t in trials} <= {COMPLETE, PRUNED}
        assert set(trials[0].params) == ({"optim.lr", "norm.momentum"} if arm.label == "norm=batch" else {"optim.lr"})
        assert record.chosen(arm).state == COMPLETE
        assert record.chosen(arm).value == min(t.value for t in trials if t.state == COMPLETE)
    search = [Summary.load(p) for p in (tuned / SEARCH).rglob(FILE)]
    final = [r.summary for r in load_runs(tuned)]  # the sweep's own runs: the search's are not among them
    assert {s.seed for s in search} == {0, 1} and sorted(s.seed for s in final) == [2, 2, 3, 3]
    for arm in record.arms:  # each arm's final runs train its chosen setting
        chosen = record.chosen(arm).params
        runs = [s for s in final if s.config["norm"]["name"] == arm.label.split("=")[1]]
        assert len(runs) == 2 and all(s.config["optim"]["lr"] == pytest.approx(chosen["optim.lr"]) for s in runs)
    assert len(search) == 2 * 6 * 2  # every trial's seeds, pruned or not


@pytest.mark.slow
def test_pruning_stops_poor_trials_at_the_rungs_and_the_search_trains_fewer_steps(tuned):
    record = Tuning.load(tuned)
    assert record.rung_steps == [3, 9]  # 27 / 3^2, then times 3, while a whole factor below the end
    pruned = [t for t in record.results if t.state == PRUNED]
    assert pruned and all(set(t.rungs) <= {3, 9} for t in pruned)
    search = [Summary.load(p) for p in (tuned / SEARCH).rglob(FILE)]
    for s in search:
        assert s.status in (Status.PAUSED, Status.COMPLETED, Status.STALLED) and s.steps in (3, 9, 27)
    assert record.steps_trained == sum(s.steps for s in search) < record.steps_unpruned == 2 * 6 * 2 * 27


@pytest.mark.slow
def test_the_sweep_ends_with_the_verdict_on_the_final_runs_and_the_report_draws_the_search(tuned):
    out = (tuned.parent / "out.txt").read_text()
    assert "tuning: chosen norm=none: optim.lr=" in out and "unseen by the search" in out
    assert "batch vs none, each at its best lr" in out
    sweep = json.loads((tuned / "sweep.json").read_text())
    assert sum(g["runs"] for g in sweep["groups"]) == 4
    report = subprocess.run([*CLI, "report", str(tuned)], capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    text = (tuned / "report.md").read_text()
    assert "## The tuning search" in text and (tuned / "tuning.png").stat().st_size > 10_000
    assert "fewer than its 648 without pruning" in text
    dashboard = EventAccumulator(str(tuned))  # HParams: the searched keys are columns, which the search runs vary
    dashboard.Reload()
    experiment = dashboard.SummaryMetadata(hparams_metadata.EXPERIMENT_TAG).plugin_data.content
    assert b"optim.lr" in experiment and b"norm.momentum" in experiment


@pytest.mark.slow
@pytest.mark.parametrize(
    "options",
    [
        ["sampler=tpe", "pruner=hyperband", "batch=3", "sampler_seed=1"],
        ["sampler=random", "pruner=none", "target=0.5", "reduction_factor=2"],
    ],
    ids=["tpe_hyperband_batches", "random_unpruned_target"],
)
def test_every_sampler_and_pruner_gives_each_arm_its_trials(tmp_path, options):
    proc = bnlab(*SWEEP, *(f"hydra.sweeper.{o}" for o in options), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    record = Tuning.load(tmp_path / "s")
    settings = dict(o.split("=") for o in options)
    assert record.sampler == settings["sampler"] and record.pruner == settings["pruner"]
    assert all(len(record.trials_of(arm.label)) == 6 for arm in record.arms)
    lrs = [t.params["optim.lr"] for t in record.results]
    assert all(0.01 <= lr <= 1 for lr in lrs)
    assert all(lr != float(f"{lr:.4g}") for lr in lrs)  # drawn by Optuna's sampler, not the enqueued Halton points
    if settings["pruner"] == "none":
        assert record.rung_steps == [] and {t.state for t in record.results} == {COMPLETE}
        assert record.threshold == 0.5 and record.steps_trained == record.steps_unpruned
    else:  # batches of 3: each arm's trials asked 3 at a time
        assert record.rung_steps == [3, 9] and {t.state for t in record.results} <= {COMPLETE, PRUNED}
        out = proc.stdout
        assert "tuning: 6 trials x 2 seeds to step 3" in out  # 3 per arm in the first batch


@pytest.mark.slow
@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.lr=interval(10,1)", "optim.lr"),
        ("optim.lr=tag(log,interval(0,1))", "optim.lr"),
        ("norm.momentum=tag(log,interval(0.01,0.5))", "norm.momentum"),  # taken by neither none nor layer
        ("optim.lrr=tag(log,interval(0.01,1))", "optim.lrr"),
    ],
)
def test_a_bad_search_space_is_refused_before_any_run_with_exit_2(tmp_path, override, key):
    args = [a for a in SWEEP if not a.startswith(("norm", "optim.lr"))]
    proc = bnlab(*args, "norm=none,layer", "optim.lr=tag(log,interval(0.01,1))", override, cwd=tmp_path)
    assert proc.returncode == 2 and key in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "s" / SEARCH).exists()


def _trials(root: Path) -> dict[tuple[str, int], tuple[str, dict]]:
    record = Tuning.load(root)
    return {(t.arm, t.number): (t.state, t.rungs) for t in record.results} if record else {}


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_an_interrupted_tuning_sweep_resumes_without_running_a_finished_trial_again(tmp_path, sig):
    # a model that trains for seconds after the first rung (at step 90: then to 270 and 900), so the signal lands
    # midway however fast the machine
    longer = ["trainer.max_steps=900", "trainer.eval_every=30", "data.image_size=28", "model.widths=[256,256]"]
    sweep = [a for a in SWEEP if a.split("=")[0] not in {o.split("=")[0] for o in longer}] + longer
    log = (tmp_path / "out.txt").open("w")
    # started as a script's background job is: with SIGINT ignored, which bnlab answers all the same
    ignored = lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)  # noqa: E731
    proc = subprocess.Popen([*CLI, *sweep], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, preexec_fn=ignored)
    root = tmp_path / "s"
    deadline = time.time() + 120
    while not any(state != "running" for state, _ in _trials(root).values()) and time.time() < deadline:
        time.sleep(0.2)  # until a trial has finished (pruned at the first rung, or complete)
    proc.send_signal(sig)
    assert proc.wait(timeout=60) == (130 if sig == signal.SIGINT else -signal.SIGKILL)
    if sig == signal.SIGINT:
        assert "with `bnlab resume s`" in (tmp_path / "out.txt").read_text()  # between launches, or in a run
    before = _trials(root)
    finished = {k: v for k, v in before.items() if v[0] != "running"}
    assert finished and len(finished) < 12  # stopped midway
    stamps = {
        p: p.stat().st_mtime_ns for (arm, n) in finished for p in (root / SEARCH / arm / f"trial={n:03d}").rglob(FILE)
    }
    resumed = bnlab("resume", "s", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    after = _trials(root)
    assert len(after) == 12 and all(after[k] == v for k, v in finished.items())  # kept as they were
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # their runs did not train again
    assert "batch vs none, each at its best lr" in resumed.stdout
    assert sum(g["runs"] for g in json.loads((root / "sweep.json").read_text())["groups"]) == 4
