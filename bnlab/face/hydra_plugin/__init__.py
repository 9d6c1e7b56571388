"""bnlab's launcher as Hydra sees it. Hydra loads launchers only from the hydra_plugins package, so this
folder is installed as hydra_plugins.bnlab_launcher (pyproject.toml); the work is in bnlab/face/launcher.py."""

from __future__ import annotations

from collections.abc import Sequence

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class BnlabLauncher(Launcher):
    """`hydra/launcher=bnlab`: the basic launcher, fusing the jobs that ask for it, n_jobs groups at once
    (bnlab.face.launcher)."""

    def __init__(self, n_jobs: int | str = "auto") -> None:
        self.n_jobs = n_jobs  # hydra.launcher.n_jobs: groups at once (auto: as the cores allow; -1: one per core)
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from bnlab.face.launcher import launch_jobs  # torch: Hydra imports every plugin at start-up, --help included

        return launch_jobs(self, job_overrides, initial_job_idx)
