"""hydra/sweeper=tune (hydra_plugins/bnlab_sweeper): fair by construction, after AlgoPerf's external tuning rule.
Each arm (every combination of the categorical choices on the command line: norm=none,batch,layer) is searched
with the same number of trials over the intervals given (optim.lr=tag(log,interval(0.001,10)); a norm.* key only
for the arms whose norm takes it), each trial a setting trained on hydra.sweeper.seeds seeds and scored by
bnlab.results.tuning.objective. Optuna holds the studies (one per arm, in a journal file in the sweep folder, so
that `bnlab resume` goes on where the search stopped) and prunes the poor trials (successive halving or
Hyperband) at rungs where their runs pause (trainer.pause_at) and from where the promising ones go on. Then each
arm's best setting trains on hydra.sweeper.final_seeds seeds the search never used: the sweep's own runs, on
which its table and verdict are computed; the search's runs stay below search/ (bnlab/record/tuning.py)."""

from __future__ import annotations

import fcntl
import itertools
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep, Override, ValueType
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext
from omegaconf import DictConfig, OmegaConf
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from bnlab.core.norms import NORMS
from bnlab.face.callbacks import check_job, name_runs_by_what_varies
from bnlab.face.overrides import quote, refuse
from bnlab.record.console import make_console, shell_path
from bnlab.record.summary import FILE, Status, existing
from bnlab.record.tuning import COMPLETE, FAILED, PRUNED, RUNNING, SEARCH, Arm, Trial, Tuning
from bnlab.results.tuning import objective
from bnlab.run.job import job_config
from bnlab.schema.config import ConfigError, check_choice
from bnlab.schema.metrics import higher_is_better

log = logging.getLogger("bnlab")
console = make_console()
SAMPLERS = ("qmc", "tpe", "random")  # qmc: scrambled Halton points, AlgoPerf's quasi-random search
PRUNERS = ("halving", "hyperband", "none")
JOURNAL, LOCK = "tuning.journal", "tuning.lock"
SIGNIFICANT = 4  # digits of a searched value: run folders stay readable, and the rounding is far below any effect
ARM_SWEEPS = (ValueType.SIMPLE_CHOICE_SWEEP, ValueType.CHOICE_SWEEP, ValueType.RANGE_SWEEP)


def rounded(value: float) -> float:
    return float(f"{value:.{SIGNIFICANT}g}")


def setting(keys: list[str], params: dict[str, Any]) -> list[str]:
    """A trial's overrides: its value of each of `keys`, a float to SIGNIFICANT digits (tpe's and random's draws)."""
    return [f"{k}={rounded(v) if isinstance(v, float) else v!r}" for k, v in ((k, params[k]) for k in keys)]


@dataclass(frozen=True)
class Space:
    """One searched key: an interval, on a log scale with tag(log, ...), of integers with int(interval(...))."""

    key: str
    low: float
    high: float
    log: bool
    integer: bool

    def distribution(self) -> Any:
        kind = optuna.distributions.IntDistribution if self.integer else optuna.distributions.FloatDistribution
        return kind(self.low, self.high, log=self.log)

    def at(self, u: float) -> float | int:
        """The point a fraction `u` of the way through the interval (on its scale), to SIGNIFICANT digits."""
        if self.log:
            value = math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low)))
        else:
            value = self.low + u * (self.high - self.low)
        return min(max(round(value), int(self.low)), int(self.high)) if self.integer else rounded(value)

    def applies_to(self, norm: str) -> bool:
        """A norm.* key applies to the arms whose norm takes it (bnlab.core.norms.NORMS' keys); any other to all."""
        section, _, name = self.key.partition(".")
        return section != "norm" or name in NORMS[norm].keys


def quasi_random(spaces: list[Space], n: int, seed: int) -> list[dict[str, float | int]]:
    """`n` settings of the searched keys: scrambled Halton points (scipy.stats.qmc), seeded, AlgoPerf's
    quasi-random search: spread more evenly than random draws, and no setting depends on another's result."""
    from scipy.stats import qmc

    points = qmc.Halton(d=max(1, len(spaces)), scramble=True, seed=seed).random(n)
    return [{sp.key: sp.at(x) for sp, x in zip(spaces, u)} for u in points]


@dataclass
class Plan:
    """What the command line asks the tuning sweeper for."""

    fixed: list[str]  # every job's overrides
    arms: list[list[str]]  # each arm's overrides
    spaces: list[Space]


def plan(arguments: list[str]) -> Plan:
    """The arms, the searched intervals and the fixed overrides; a search space that cannot be searched is refused
    (ConfigError), naming the key."""
    fixed, axes, spaces = [], [], []
    for o in OverridesParser.create().parse_overrides(arguments):
        key = o.key_or_group
        if key == "seed":
            raise ConfigError(
                "seed is chosen by the tuning sweeper: seeds 0 to hydra.sweeper.seeds - 1 for the search, the next "
                "hydra.sweeper.final_seeds for the final runs; remove seed= from the command line."
            )
        if o.value_type in ARM_SWEEPS:
            axes.append([f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()])
        elif o.value_type == ValueType.INTERVAL_SWEEP:
            spaces.append(_space(o))
        elif o.is_sweep_override():
            raise ConfigError(f"{o.input_line}: the tuning sweeper takes choices (the arms) and intervals only.")
        else:
            fixed.append(o.input_line)
    if not any(line.split("=")[0].lstrip("+~") == "trainer.fuse" for line in fixed):
        fixed.append("trainer.fuse=auto")  # a trial's seeds, and an arm's trials at a rung, train fused
    return Plan(fixed, [list(arm) for arm in itertools.product(*axes)], spaces)


def _space(o: Override) -> Space:
    sweep: IntervalSweep = o.value()
    low, high, key = sweep.start, sweep.end, o.key_or_group
    log_scale = "log" in sweep.tags
    if not low < high:
        raise ConfigError(f"{o.input_line} is not accepted: an interval's start must be below its end.")
    if log_scale and low <= 0:
        raise ConfigError(
            f"{o.input_line} is not accepted: a log interval takes positive ends only (it searches log({key}))."
        )
    return Space(key, low, high, log_scale, isinstance(low, int) and isinstance(high, int))


@dataclass
class TrialRun:
    """A trial as the search trains it: the arm, Optuna's trial, its setting's overrides and its run folders."""

    arm: int
    trial: Any  # optuna.trial.Trial
    overrides: list[str]
    subdirs: list[str]
    rung: int = 0  # the next rung it trains to


class Tuner:
    """The tuning sweep of one `bnlab train -m hydra/sweeper=tune ...` (or its resume)."""

    def __init__(self, sweeper: Any, config: DictConfig, launcher: Launcher, hydra_context: HydraContext) -> None:
        self.s, self.config, self.launcher, self.hydra_context = sweeper, config, launcher, hydra_context
        self.root = Path(str(config.hydra.sweep.dir))
        self.job_idx = 0

    # -- the checks, before any run
    def check(self, arguments: list[str]) -> tuple[Plan, list[str], list[list[str]]]:
        s = self.s
        for name, value in (("trials", s.trials), ("seeds", s.seeds), ("final_seeds", s.final_seeds)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"hydra.sweeper.{name}={value!r} is not accepted; accepted values: an integer >= 1.")
        check_choice("hydra.sweeper.sampler", s.sampler, SAMPLERS)
        check_choice("hydra.sweeper.pruner", s.pruner, PRUNERS)
        if not isinstance(s.reduction_factor, int) or s.reduction_factor < 2:
            raise ConfigError(
                f"hydra.sweeper.reduction_factor={s.reduction_factor!r} is not accepted; accepted values: an "
                "integer >= 2 (the pruner keeps about 1 in reduction_factor trials at each rung)."
            )
        p = plan(arguments)
        labels = [",".join(arm) or "all" for arm in p.arms]
        norms = [self.compose([*p.fixed, *arm]).norm.name for arm in p.arms]
        for space in p.spaces:
            if not any(space.applies_to(n) for n in norms):
                raise ConfigError(
                    f"{space.key} is searched, but none of the arms' norms ({', '.join(sorted(set(norms)))}) takes it; "
                    f"it applies to norm={', '.join(n for n in NORMS if space.applies_to(n))}."
                )
        keys = [[sp.key for sp in p.spaces if sp.applies_to(n)] for n in norms]
        tried: set[str] = set()
        for arm, arm_keys in zip(p.arms, keys):  # each arm at both ends of every interval it searches
            for end in ("low", "high"):
                values = [f"{sp.key}={getattr(sp, end)!r}" for sp in p.spaces if sp.key in arm_keys]
                job = self.load([*p.fixed, *arm, *values, "seed=0"])
                try:
                    check_job(job, tried)
                except ConfigError as e:
                    raise ConfigError(
                        f"the arm {','.join(arm)} at the {end} ends of its intervals is refused: {e}"
                    ) from e
        return p, labels, keys

    def compose(self, overrides: list[str]) -> Any:
        return job_config(self.load(overrides))

    def load(self, overrides: list[str]) -> DictConfig:
        return self.hydra_context.config_loader.load_sweep_config(self.config, overrides)

    # -- the sweep
    def sweep(self, arguments: list[str]) -> None:
        try:
            p, labels, keys = self.check(arguments)
        except ConfigError as e:
            refuse(e)
        self.root.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, self.root / "multirun.yaml")
        first = self.compose([*p.fixed, *p.arms[0], "seed=0"])
        metric, values = first.threshold.metric, first.threshold.values
        hardest = max(values) if higher_is_better(metric) else min(values)
        self.target = metric, hardest if self.s.target is None else float(self.s.target)
        self.max_steps, every = first.trainer.max_steps, first.trainer.eval_every
        self.rung_steps = self.rungs(self.max_steps, every)
        seeds = list(range(self.s.seeds))
        self.final_seeds = final_seeds = list(range(self.s.seeds, self.s.seeds + self.s.final_seeds))
        self.plan, self.labels, self.keys, self.seeds = p, labels, keys, seeds
        self.arms = [Arm(label, arm, k) for label, arm, k in zip(labels, p.arms, keys)]
        # final runs are named by what varies between them: the arm's keys, the searched ones and the seed
        examples = [
            [*p.fixed, *arm, *(f"{k}={v}" for k in ks), f"seed={s}"]
            for arm, ks in zip(p.arms, keys)
            for v in (0, 1)
            for s in final_seeds[:2]
        ]
        name_runs_by_what_varies(self.config, examples)
        with self.locked():
            self.studies = [self.study(label, arm_keys) for label, arm_keys in zip(labels, keys)]
            try:
                self.search()
                self.final(final_seeds)
            except KeyboardInterrupt:
                console.print(f"interrupted: continue the tuning sweep with `bnlab resume {shell_path(self.root)}`")
                raise

    @contextmanager
    def locked(self) -> Iterator[None]:
        """This process alone writes the sweep's studies: another one (a second resume) is refused."""
        with open(self.root / LOCK, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                refuse(f"another bnlab process is running the tuning sweep in {self.root}; wait for it to end.")
            yield

    def rungs(self, max_steps: int, every: int) -> list[int]:
        """The steps where the pruner looks at each trial: min_steps (default: max_steps / reduction_factor^2, down
        to a multiple of the evaluation interval) times powers of reduction_factor, up to max_steps /
        reduction_factor."""
        if self.s.pruner == "none":
            return []
        eta = self.s.reduction_factor
        first = self.s.min_steps or max(every, max_steps // eta**2 // every * every)
        steps = []
        while first * eta ** (len(steps) + 1) <= max_steps:  # a rung a whole factor below the end, at least
            steps.append(first * eta ** len(steps))
        return steps

    def study(self, label: str, keys: list[str]) -> Any:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = JournalStorage(JournalFileBackend(str(self.root / JOURNAL)))
        seed = self.s.sampler_seed
        sampler = (
            optuna.samplers.TPESampler(seed=seed) if self.s.sampler == "tpe" else optuna.samplers.RandomSampler(seed)
        )
        study = optuna.create_study(
            study_name=label,
            storage=storage,
            sampler=sampler,
            pruner=self.pruner(),
            direction="minimize",
            load_if_exists=True,
        )
        if self.s.sampler == "qmc" and not study.trials:  # every arm the same points of the keys it shares
            for params in quasi_random([sp for sp in self.plan.spaces if sp.key in keys], self.s.trials, seed):
                study.enqueue_trial(params)
        return study

    def pruner(self) -> Any:
        eta, first = self.s.reduction_factor, self.rung_steps[0] if self.rung_steps else 1
        if self.s.pruner == "halving":
            return optuna.pruners.SuccessiveHalvingPruner(min_resource=first, reduction_factor=eta)
        if self.s.pruner == "hyperband":
            return optuna.pruners.HyperbandPruner(min_resource=first, max_resource=self.max_steps, reduction_factor=eta)
        return optuna.pruners.NopPruner()

    def search(self) -> None:
        """Every arm's trials, a batch at a time (each arm's next hydra.sweeper.batch trials, all of them by
        default), rung by rung; trials left running by an interrupted sweep first, from the rung they reached."""
        batch = self.continuing()
        while True:
            for i, study in enumerate(self.studies):
                asked = [t for t in study.trials if t.state != optuna.trial.TrialState.WAITING]
                room = self.s.trials - len(asked)
                mine = sum(1 for t in batch if t.arm == i)
                for _ in range(max(0, min(room, (self.s.batch or self.s.trials) - mine))):
                    batch.append(self.trial_run(i, study.ask(self.distributions(i))))
            if not batch:
                return
            self.train(batch)
            batch = []

    def distributions(self, arm: int) -> dict[str, Any]:
        return {sp.key: sp.distribution() for sp in self.plan.spaces if sp.key in self.keys[arm]}

    def trial_run(self, arm: int, trial: Any) -> TrialRun:
        values = setting(self.keys[arm], trial.params)
        base = f"{SEARCH}/{self.labels[arm]}/trial={trial.number:03d}"
        subdirs = [f"{base}/seed={s}" for s in self.seeds]
        return TrialRun(arm, trial, [*self.plan.fixed, *self.plan.arms[arm], *values], subdirs)

    def continuing(self) -> list[TrialRun]:
        """The trials an interrupted sweep left running, each at the next rung it has to train to; one that had
        reported a rung before it was stopped is first judged there."""
        out = []
        for i, study in enumerate(self.studies):
            for frozen in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
                run = self.trial_run(i, optuna.trial.Trial(study, frozen._trial_id))
                run.rung = len(frozen.intermediate_values)
                if run.rung and run.trial.should_prune():
                    study.tell(run.trial, state=optuna.trial.TrialState.PRUNED)
                    continue
                out.append(run)
        if out:
            console.print(f"tuning: {len(out)} trials left running by the interrupted sweep go on", highlight=False)
        return out

    def train(self, batch: list[TrialRun]) -> None:
        """The batch's trials rung by rung: the runs of those that go on train (their seeds fused, and the trials
        of one arm with them where they differ only in member keys such as the lr) to the rung's step, pause,
        and report their objective; the pruner then stops the poor ones, in trial order (as if each had
        arrived there in turn). At max_steps a trial is complete."""
        for k, step in enumerate([*self.rung_steps, self.max_steps]):
            here = [t for t in batch if t.rung == k]
            if not here:
                continue
            start = time.perf_counter()
            pause = [f"trainer.pause_at={step if step < self.max_steps else 0}"]
            jobs = [
                [*t.overrides, f"seed={seed}", *pause, "trainer.resume=true", f"hydra.sweep.subdir={quote(sub)}"]
                for t in here
                for seed, sub in zip(self.seeds, t.subdirs)
                if self.to_train(sub)
            ]
            self.launch(jobs)
            values = {id(t): self.value(t.subdirs, step) for t in here}
            pruned = 0
            for t in sorted(here, key=lambda t: (t.trial.number, t.arm)):
                study, value = self.studies[t.arm], values[id(t)]
                if step == self.max_steps:
                    study.tell(t.trial, value)
                    continue
                t.trial.report(value, step)
                if t.trial.should_prune():
                    study.tell(t.trial, state=optuna.trial.TrialState.PRUNED)
                    pruned += 1
                else:
                    t.rung = k + 1
            console.print(
                f"tuning: {len(here)} trials x {len(self.seeds)} seeds to step {step} in "
                f"{time.perf_counter() - start:.0f} s" + (f"; {pruned} pruned" if step < self.max_steps else ""),
                highlight=False,
            )
            self.record()

    def to_train(self, subdir: str) -> bool:
        """Whether a trial's run trains on to the next rung: not one that has ended (diverged at a rung, say), which
        would make the runs fused with it start over."""
        summary = existing(self.root / subdir / FILE)
        return summary is None or summary.status.unfinished or summary.status == Status.RUNNING

    def value(self, subdirs: list[str], step: int) -> float:
        runs = [s for sub in subdirs if (s := existing(self.root / sub / FILE))]
        if len(runs) < len(subdirs) or any(s.status.unfinished for s in runs if s.steps < step):
            return math.inf  # a run left no summary, or did not get there: the trial ranks last
        return objective(runs, self.target[1], step)

    def launch(self, jobs: list[list[str]]) -> list[Any]:
        returns = self.launcher.launch(jobs, initial_job_idx=self.job_idx)
        self.job_idx += len(jobs)
        return list(returns)

    def final(self, seeds: list[int]) -> None:
        """Each arm's best trial's setting on `seeds`: the sweep's own runs."""
        jobs, chosen = [], []
        for i, (arm, study) in enumerate(zip(self.arms, self.studies)):
            best = study.best_trial
            arm.chosen = best.number
            values = setting(self.keys[i], best.params)
            chosen.append(f"{arm.label}: {', '.join(values) or 'nothing searched'} (trial {best.number})")
            jobs += [[*self.plan.fixed, *self.plan.arms[i], *values, f"seed={s}", "trainer.resume=true"] for s in seeds]
        console.print("tuning: chosen " + "; ".join(chosen), soft_wrap=True, highlight=False)
        console.print(
            f"tuning: each arm's chosen setting on seeds {seeds[0]}-{seeds[-1]}, unseen by the search", highlight=False
        )
        returns = self.launch(jobs)
        folders = [Path(str(r.hydra_cfg.hydra.runtime.output_dir)).name for r in returns]
        for i, arm in enumerate(self.arms):
            arm.final_runs = folders[i * len(seeds) : (i + 1) * len(seeds)]
        self.record()

    def record(self) -> None:
        """tuning.json, after every rung: the studies as they stand."""
        states = {
            optuna.trial.TrialState.COMPLETE: COMPLETE,
            optuna.trial.TrialState.PRUNED: PRUNED,
            optuna.trial.TrialState.RUNNING: RUNNING,
            optuna.trial.TrialState.FAIL: FAILED,
        }
        results = []
        for i, study in enumerate(self.studies):
            for t in study.get_trials(deepcopy=False):
                if t.state not in states:
                    continue  # still queued
                runs = self.trial_run(i, t).subdirs
                value = (
                    t.value
                    if t.value is not None
                    else (t.intermediate_values.get(t.last_step) if t.last_step is not None else None)
                )
                results.append(
                    Trial(
                        self.labels[i],
                        t.number,
                        dict(t.params),
                        states[t.state],
                        value,
                        dict(t.intermediate_values),
                        runs,
                    )
                )
        steps = sum(s.steps for p in (self.root / SEARCH).rglob(FILE) if (s := existing(p)))
        Tuning(
            self.target[0],
            self.target[1],
            self.max_steps,
            self.s.trials,
            self.seeds,
            self.final_seeds,
            self.s.sampler,
            self.s.pruner,
            self.rung_steps,
            self.arms,
            results,
            steps,
        ).save(self.root)
