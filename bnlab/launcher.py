"""`hydra/launcher=bnlab`, the default launcher of `bnlab train -m`: Hydra's basic launcher (jobs one
after another in this process), except that jobs with trainer.fuse=true or auto that differ only in
keys marked MEMBER in bnlab/config.py (seed, lr, init, ...) train together as one fused model
(bnlab/fused.py). Each member still gets its own run directory, .hydra/ configs, train.log, TensorBoard
run and summary.json, as if it had run alone. Hydra loads launchers only from the hydra_plugins
package: bnlab/hydra_plugin is installed there and hands `launch` to `launch_jobs` here."""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, configure_log, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from omegaconf import DictConfig, open_dict

from bnlab.app import console, report, show_job
from bnlab.config import TrainConfig, fuse_mode
from bnlab.fused import can_fuse, shared_config
from bnlab.job import job_config, run_jobs

log = logging.getLogger(__name__)


def fuse_key(cfg: TrainConfig) -> str | None:
    """Jobs with one key may be fused (bnlab.fused.shared_config); None: the job trains alone (it asks to,
    or runs over several processes)."""
    if fuse_mode(cfg.trainer) == "false" or cfg.trainer.devices > 1:
        return None
    return json.dumps(shared_config(cfg), sort_keys=True)


def plan(cfgs: Sequence[TrainConfig]) -> tuple[list[list[int]], dict[str, int]]:
    """The jobs (indices) grouped for training, in sweep order by each group's first job: each fusable
    group of two or more jobs together (ordered by seed), every other job alone; and for the jobs that asked
    to be fused but train alone, why (reason -> jobs)."""
    groups: dict[Any, list[int]] = {}

    def seed(i: int) -> int:
        return cfgs[i].seed

    for i, cfg in enumerate(cfgs):
        groups.setdefault(fuse_key(cfg) or ("alone", i), []).append(i)
    planned, alone = [], {}
    for members in groups.values():
        reason = can_fuse([cfgs[i] for i in members]) if len(members) > 1 else None
        if reason and any(fuse_mode(cfgs[i].trainer) == "true" for i in members):
            log.warning("trainer.fuse=true: %d jobs run one by one, not fused: %s", len(members), reason)
        if len(members) == 1 and fuse_mode(cfgs[members[0]].trainer) != "false":
            reason = "trainer.devices > 1" if cfgs[members[0]].trainer.devices > 1 else "no job to fuse with"
        if reason:
            alone[reason] = alone.get(reason, 0) + len(members)
        # a fused group by seed: members of one seed draw the same batches, which bnlab.fused then draws once
        planned.extend([[i] for i in members] if reason or len(members) == 1 else [sorted(members, key=seed)])
    return sorted(planned, key=min), alone


def fusing_line(groups: list[list[int]], alone: dict[str, int]) -> str:
    """trainer.fuse=auto's line: how many jobs train fused, in which groups, and why the others train alone."""
    fused = [len(g) for g in groups if len(g) > 1]
    sizes = ", ".join(f"{n}x{size}" for size, n in sorted(Counter(fused).items(), reverse=True))
    plural = "" if len(fused) == 1 else "s"
    text = f"trainer.fuse=auto: {sum(fused)} runs train as {len(fused)} fused group{plural} ({sizes or 'none'})"
    if alone:
        text += f"; {sum(alone.values())} alone (" + "; ".join(f"{n}: {why}" for why, n in alone.items()) + ")"
    return text


def launch_jobs(
    launcher: Launcher, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
) -> Sequence[JobReturn]:
    """What the basic launcher does for these jobs, with the fusable groups trained as one model each."""
    setup_globals()
    configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)
    Path(str(launcher.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
    log.info("Launching %d jobs locally", len(job_overrides))
    configs = []
    for idx, overrides in enumerate(job_overrides, initial_job_idx):
        sweep_config = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(overrides))
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = sweep_config.hydra.job.num = idx
        configs.append(sweep_config)
    cfgs = [job_config(c) for c in configs]  # one job at a time: each gets every core
    groups, alone = plan(cfgs)
    if any(fuse_mode(c.trainer) == "auto" for c in cfgs):
        console.print(fusing_line(groups, alone), soft_wrap=True, highlight=False)
    returns: list[JobReturn] = []
    for group in groups:
        if len(group) == 1:
            tasks = {group[0]: launcher.task_function}
        else:  # train the group, then hand each member's outcome to the job that reports it
            dirs = [job_dir(configs[i]) for i in group]
            log.info("training %d runs as one fused model: %s", len(group), ", ".join(d.name for d in dirs))
            outcomes = run_jobs([cfgs[i] for i in group], dirs, console)
            tasks = {i: _reporter(outcome) for i, outcome in zip(group, outcomes)}
        for i, task in tasks.items():
            ret = run_job(
                hydra_context=launcher.hydra_context,
                task_function=task,
                config=configs[i],
                job_dir_key="hydra.sweep.dir",
                job_subdir_key="hydra.sweep.subdir",
            )
            returns.append(ret)
            configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)
    return returns


def _reporter(outcome):
    """The task of a fused group's member job: show it and report the outcome its group already had."""

    def task(dcfg: DictConfig) -> None:
        show_job(dcfg)
        report(outcome)

    return task


def job_dir(config: DictConfig) -> Path:
    """The run directory Hydra's run_job gives this job (hydra.sweep.dir / hydra.sweep.subdir)."""
    HydraConfig.instance().set_config(config)
    return Path(os.path.abspath(os.path.join(str(config.hydra.sweep.dir), str(config.hydra.sweep.subdir))))
