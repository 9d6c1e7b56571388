"""One job of `bnlab train`, below the Hydra face that starts it: its config (with the thread rule
applied), its training (alone, or with the other members of a fused group) and what its outcome means:
the failure policy and the exit code. bnlab/app.py (one job) and bnlab/launcher.py (fused groups)
both run jobs through here."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from bnlab.datafiles import DataError
from bnlab.files import OutputError
from bnlab.schema import ConfigError, TrainConfig
from bnlab.summary import Status, Summary

# Exit codes of `bnlab train` (README "When things go wrong")
OK, FAILED, REFUSED, INTERRUPTED = 0, 1, 2, 130


def threads_per_job(n_jobs: int | None) -> int:
    """The cores shared out among a sweep's parallel jobs (joblib's n_jobs; -1 means one job per core)."""
    cores = os.cpu_count() or 1
    jobs = cores if n_jobs is not None and n_jobs < 0 else n_jobs or 1
    return max(1, cores // jobs)


def job_config(dcfg: DictConfig, parallel_jobs: int | None = None) -> TrainConfig:
    """The job's TrainConfig from its composed config (the hydra node, if any, left out), with
    trainer.threads=0 resolved to its share of the cores when `parallel_jobs` jobs run at once (and
    each of its trainer.devices processes to its share of that)."""
    # Key by key, leaving the hydra node out (a copy of the whole config would cost several times more).
    values = {f.name: dcfg[f.name] for f in fields(TrainConfig)}
    cfg = TrainConfig(**{k: OmegaConf.to_object(v) if isinstance(v, DictConfig) else v for k, v in values.items()})
    cfg.trainer.threads = cfg.trainer.threads or max(1, threads_per_job(parallel_jobs) // max(1, cfg.trainer.devices))
    return cfg


@dataclass
class Outcome:
    """How a job ended: its summary, or the error that stopped it; neither when another process owns
    its run folder and trains it."""

    summary: Summary | None
    error: BaseException | None = None

    @property
    def refused(self) -> bool:
        """Stopped by bad input (a config value, a data file) or a folder it cannot write to, which bnlab
        explains in one paragraph."""
        return isinstance(self.error, (ConfigError, DataError, OutputError))

    @property
    def left_to_another_process(self) -> bool:
        return self.summary is None and self.error is None

    @property
    def interrupted(self) -> bool:
        return isinstance(self.error, KeyboardInterrupt) or (
            self.summary is not None and self.summary.status == Status.INTERRUPTED
        )

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return INTERRUPTED
        if self.error is None:
            return OK  # completed or diverged: a diverged run is a result
        return REFUSED if self.refused else FAILED


def run_jobs(cfgs: list[TrainConfig], run_dirs: list[Path], console: Console) -> list[Outcome]:
    """Train these jobs, one alone or several as one fused group, and return each one's outcome; an
    error or Ctrl-C ends every job of the group (their summary.json files say so)."""
    from bnlab.train import train_runs  # torch: imported by the commands that train, once their checks passed

    try:
        return [Outcome(s) for s in train_runs(cfgs, run_dirs, console)]
    except (Exception, KeyboardInterrupt) as e:
        return [Outcome(None, e) for _ in cfgs]
