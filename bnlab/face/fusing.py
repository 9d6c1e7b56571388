"""How hydra/launcher=bnlab (bnlab/face/launcher.py) runs the jobs of `bnlab train`: jobs with trainer.fuse=true
or auto that differ only in keys marked MEMBER in bnlab/schema/config.py (seed, lr, init, ...) train together as
one fused model (bnlab/run/fused/engine.py), each member still with its own run directory, .hydra/ configs,
train.log, TensorBoard run and summary.json, as if it had run alone; and how many groups train at once."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from bnlab.face.app import console, report, show_job, train_job
from bnlab.run.engine import thread_count
from bnlab.run.fused.engine import can_fuse, shared_config
from bnlab.run.job import job_config, run_jobs
from bnlab.run.threads import jobs_at_once, usable_cores
from bnlab.schema.config import TrainConfig, fuse_mode

log = logging.getLogger(__name__)


def fuse_key(cfg: TrainConfig) -> str | None:
    """Jobs with one key may be fused (bnlab.run.fused.engine.shared_config, and one step to pause at: a fused group
    trains with its first member's trainer keys); None: the job trains alone (it asks to, or runs over several
    processes)."""
    if fuse_mode(cfg.trainer) == "false" or cfg.trainer.devices > 1:
        return None
    return json.dumps({**shared_config(cfg), "trainer.pause_at": cfg.trainer.pause_at}, sort_keys=True)


def plan(cfgs: Sequence[TrainConfig]) -> tuple[list[list[int]], dict[str, int]]:
    """The jobs (indices) grouped for training, in sweep order by each group's earliest job: each fusable
    group of two or more jobs together (ordered by seed), every other job alone; and for the jobs that asked
    to be fused but train alone, why (reason -> jobs)."""
    groups: dict[Any, list[int]] = {}
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
        if reason or len(members) == 1:
            planned.extend([i] for i in members)
        else:  # by seed: members of one seed draw the same batches, which bnlab.run.fused.engine then draws once
            planned.append(sorted(members, key=lambda i: cfgs[i].seed))
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


def at_once(n_jobs: int | str, groups: list[list[TrainConfig]]) -> int:
    """How many groups train at once: hydra.launcher.n_jobs (bnlab.run.threads.jobs_at_once), where auto is as many
    as the cores hold with the fewest threads any group would train with alone (bnlab.run.engine.thread_count: 1
    for the small models, so a 2-core machine trains two of them side by side; a larger group then trains on its
    share, since runs side by side gain more than threads do)."""

    def fit() -> int:
        cores = fewest = usable_cores()
        for group in groups:  # each count builds the group's model once: stop at 1, which no group goes below
            fewest = min(fewest, thread_count(group, cores))
            if fewest == 1:
                break
        return cores // fewest

    return jobs_at_once(n_jobs, len(groups), fit)


def plan_jobs(configs: list[DictConfig], n_jobs: int | str) -> tuple[list[list[int]], list[TrainConfig], int]:
    """The jobs' groups (plan), their TrainConfigs and how many groups train at once (at_once); trainer.fuse=auto's
    line printed."""
    cfgs = [job_config(c) for c in configs]
    groups, alone = plan(cfgs)
    if any(fuse_mode(c.trainer) == "auto" for c in cfgs):
        console.print(fusing_line(groups, alone), soft_wrap=True, highlight=False)
    return groups, cfgs, at_once(n_jobs, [[cfgs[i] for i in g] for g in groups])


def group_tasks(configs: list[DictConfig], cfgs: list[TrainConfig]) -> list[Callable[[DictConfig], None]]:
    """The task of each job of a group: a lone job's is Hydra's task function with the TrainConfig it has; a fused
    group trains now, and each member's task shows its job and reports the outcome the group had."""
    if len(configs) == 1:
        return [functools.partial(train_job, cfg=cfgs[0])]
    dirs = [job_dir(c) for c in configs]
    with _console_as_a_job_s(configs[0]):
        log.info("training %d runs as one fused model: %s", len(dirs), ", ".join(d.name for d in dirs))
        outcomes = run_jobs(cfgs, dirs, console, usable_cores())
    return [_reporter(outcome) for outcome in outcomes]


@contextlib.contextmanager
def _console_as_a_job_s(config: DictConfig) -> Iterator[None]:
    """A fused group trains before Hydra sets up its members' job logging, under Hydra's own logging (every INFO
    line on the console): the console shows what a sweep's job shows there, warnings only unless hydra.verbose."""
    handlers = [h for h in logging.getLogger().handlers if type(h) is logging.StreamHandler]
    levels = [h.level for h in handlers]
    for h in handlers:
        h.setLevel(h.level if config.hydra.verbose else max(h.level, logging.WARNING))
    try:
        yield
    finally:
        for h, level in zip(handlers, levels):
            h.setLevel(level)


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
