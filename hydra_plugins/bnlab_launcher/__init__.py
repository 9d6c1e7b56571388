"""bnlab's launcher as Hydra sees it: `hydra/launcher=bnlab` in any Hydra app where bnlab is installed. Hydra
finds launchers by walking the hydra_plugins namespace package (no __init__.py, listed in pyproject.toml so that
an editable install adds this folder to it too) and takes their configs from its ConfigStore; the work is in
bnlab/face/launcher.py. No `from __future__ import annotations`: Hydra executes this module before it is in
sys.modules, where dataclasses cannot resolve string annotations."""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


@dataclass
class BnlabLauncherConf:
    """hydra/launcher=bnlab: Hydra's basic launcher (jobs one after another), except that `bnlab train` jobs
    with trainer.fuse=true or auto that differ only in keys marked MEMBER in bnlab/schema/config.py (seed,
    optim.lr, model.init_std, norm.momentum, ...) train as one fused model, and that n_jobs of these groups (or
    lone jobs) run at once.
        bnlab train -m seed=0,1,2,3 optim.lr=0.01,0.1 trainer.fuse=auto
        bnlab train -m +experiment=lr_sensitivity hydra.launcher.n_jobs=1   # one group at a time, on every core
    """

    _target_: str = "hydra_plugins.bnlab_launcher.BnlabLauncher"
    # jobs (fused groups or lone jobs) at once, each in a worker process with its share of the cores: auto (for
    # bnlab train as many as the cores hold with the threads each group trains with, trainer.threads=auto: one
    # per core for the small models; for any other app one at a time) | N | -1 (one per core)
    n_jobs: Any = "auto"


ConfigStore.instance().store(group="hydra/launcher", name="bnlab", node=BnlabLauncherConf, provider="bnlab")


def n_jobs_error(n_jobs: Any) -> str | None:
    """Why hydra.launcher.n_jobs=`n_jobs` is refused, in one sentence; None when it is accepted."""
    if n_jobs == "auto" or (isinstance(n_jobs, int) and not isinstance(n_jobs, bool) and n_jobs != 0):
        return None
    return (
        f"hydra.launcher.n_jobs={n_jobs!r} is not accepted; accepted values: auto (as many runs at once as the "
        "cores hold), a number of runs at once >= 1, or -1 (one per core)."
    )


class BnlabLauncher(Launcher):
    """`hydra/launcher=bnlab` (BnlabLauncherConf)."""

    def __init__(self, n_jobs: int | str = "auto") -> None:
        if n_jobs_error(n_jobs):
            raise ValueError(n_jobs_error(n_jobs))
        self.n_jobs = n_jobs
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from bnlab.face.launcher import launch_jobs  # torch: Hydra imports every plugin at start-up, --help included

        return launch_jobs(self, job_overrides, initial_job_idx)
