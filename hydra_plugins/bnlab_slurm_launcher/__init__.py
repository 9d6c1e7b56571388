"""bnlab's SLURM launcher as Hydra sees it: `hydra/launcher=slurm` (conf/hydra/launcher/slurm.yaml builds on
the schema here). Hydra takes launchers only from the hydra_plugins namespace package (see bnlab_launcher); the
work is in bnlab/face/slurm.py. No `from __future__ import annotations`, as in bnlab_launcher."""

from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn
from hydra_plugins.hydra_submitit_launcher import submitit_launcher
from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf


@dataclass
class BnlabSlurmConf(SlurmQueueConf):
    """submitit_slurm's keys, and how often the submitting command looks at its jobs."""

    _target_: str = "hydra_plugins.bnlab_slurm_launcher.SlurmLauncher"
    poll_s: float = 10.0  # seconds between two looks at squeue and the jobs' result files


ConfigStore.instance().store(group="hydra/launcher", name="bnlab_slurm_schema", node=BnlabSlurmConf, provider="bnlab")


class SlurmLauncher(submitit_launcher.SlurmLauncher):
    """hydra-submitit-launcher's SlurmLauncher, with bnlab's submission and waiting (`launch`, in the command)
    and job (`__call__`, on the cluster)."""

    def __init__(self, poll_s: float = 10.0, **params: Any) -> None:
        super().__init__(**params)
        self.poll_s = poll_s

    def __call__(self, *args: Any) -> JobReturn:
        from bnlab.face.slurm import run_job

        return run_job(self, super().__call__, *args)

    def launch(self, job_overrides: Any, initial_job_idx: int) -> list[JobReturn]:
        from bnlab.face.slurm import launch_jobs

        return launch_jobs(self, job_overrides, initial_job_idx)
