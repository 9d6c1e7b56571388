"""`hydra/launcher=bnlab`, the default launcher of `bnlab train -m`: Hydra's basic launcher (jobs one
after another in this process), except that jobs with trainer.fuse=true or auto that differ only in
keys marked MEMBER in bnlab/schema/config.py (seed, lr, init, ...) train together as one fused model
(bnlab/run/fused/engine.py), and that with hydra.launcher.n_jobs > 1 it trains that many groups at once in worker
processes. Each member still gets its own run directory, .hydra/ configs, train.log, TensorBoard
run and summary.json, as if it had run alone. Hydra loads launchers only from the hydra_plugins
package: bnlab/hydra_plugin is installed there and hands `launch` to `launch_jobs` here."""

from __future__ import annotations

import functools
import json
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import cloudpickle
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, configure_log, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

from bnlab.face.app import console, report, show_job, train_job
from bnlab.face.hydra_private import hydra_state, restore_hydra_state
from bnlab.run.engine import thread_count
from bnlab.run.fused.engine import can_fuse, shared_config
from bnlab.run.job import job_config, run_jobs
from bnlab.run.threads import CORES_ENV, cores_per_job, usable_cores
from bnlab.schema.config import TrainConfig, fuse_mode

log = logging.getLogger(__name__)
WATCH_S = 1.0  # how often a worker looks for its launcher


def fuse_key(cfg: TrainConfig) -> str | None:
    """Jobs with one key may be fused (bnlab.run.fused.engine.shared_config); None: the job trains alone (it asks to,
    or runs over several processes)."""
    if fuse_mode(cfg.trainer) == "false" or cfg.trainer.devices > 1:
        return None
    return json.dumps(shared_config(cfg), sort_keys=True)


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
    """How many groups train at once: hydra.launcher.n_jobs (-1: one per core), or for auto as many as the
    cores hold with the fewest threads any group would train with alone (bnlab.run.engine.thread_count: 1 for
    the small models, so a 2-core machine trains two of them side by side; a larger group then trains on its
    share, since runs side by side gain more than threads do); never more than there are groups."""
    cores = usable_cores()
    if n_jobs == "auto":
        fewest = cores
        for group in groups:  # each count builds the group's model once: stop at 1, which no group goes below
            fewest = min(fewest, thread_count(group, cores))
            if fewest == 1:
                break
        n_jobs = cores // fewest
    elif n_jobs < 0:
        n_jobs = cores
    return max(1, min(int(n_jobs), len(groups)))


def launch_jobs(
    launcher: Launcher, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
) -> Sequence[JobReturn]:
    """What the basic launcher does for these jobs, with the fusable groups trained as one model each; with
    hydra.launcher.n_jobs > 1, that many groups (a fused group or a lone job) at once, each in a worker
    process with its share of the cores (as hydra/launcher=joblib shares them), the largest groups first."""
    setup_globals()
    configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)
    Path(str(launcher.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
    configs = []
    for idx, overrides in enumerate(job_overrides, initial_job_idx):
        sweep_config = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(overrides))
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = sweep_config.hydra.job.num = idx
        configs.append(sweep_config)
    cfgs = [job_config(c) for c in configs]
    groups, alone = plan(cfgs)
    if any(fuse_mode(c.trainer) == "auto" for c in cfgs):
        console.print(fusing_line(groups, alone), soft_wrap=True, highlight=False)
    n_jobs = at_once(launcher.n_jobs, [[cfgs[i] for i in g] for g in groups])
    log.info("Launching %d jobs locally, %d groups at once", len(job_overrides), n_jobs)
    work = [([configs[i] for i in g], [cfgs[i] for i in g]) for g in groups]
    if n_jobs == 1:
        returns = [run_group(launcher.hydra_context, launcher.task_function, *w) for w in work]
    else:
        # members x steps: the longest first, so that none starts last; the returns in sweep order
        order = sorted(range(len(groups)), key=lambda g: -len(groups[g]) * cfgs[groups[g][0]].trainer.max_steps)
        state = hydra_state()
        calls = [(launcher.hydra_context, launcher.task_function, *work[g], state) for g in order]
        done = in_workers(n_jobs, cores_per_job(n_jobs), calls)
        returns = [r for _, r in sorted(zip(order, done))]
    return [ret for group in returns for ret in group]


def in_workers(n_jobs: int, cores: int, calls: list[tuple]) -> list[list[JobReturn]]:
    """run_group(*call) for each call, in n_jobs worker processes of `cores` cores each; the returns in the
    calls' order.

    The workers have a process group of their own, so that Ctrl-C in a terminal reaches this process only,
    which passes it (and SIGTERM) on to each worker once: their runs stop after the step they are in and
    write their summaries. After a signal or the first error no group starts (one is handed to a worker only
    when another ends), those running finish or stop, and the error is raised again here."""
    context = multiprocessing.get_context("spawn")  # no forked copy of this process's torch threads and locks
    signalled = []

    def forward(signum: int, frame: Any) -> None:
        signalled.append(signum)
        for child in context.active_children():
            os.kill(child.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    results: dict[int, bytes] = {}
    error: BaseException | None = None
    try:
        with ProcessPoolExecutor(n_jobs, mp_context=context, initializer=_worker_start, initargs=(cores,)) as pool:
            todo = iter(enumerate(calls))
            running = {}
            while True:
                while len(running) < n_jobs and not signalled and error is None:
                    i, call = next(todo, (None, None))
                    if call is None:
                        break
                    running[pool.submit(_pickled_run_group, cloudpickle.dumps(call))] = i
                if not running:
                    break
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    i = running.pop(future)
                    if future.exception() is not None:
                        error = error or future.exception()
                    else:
                        results[i] = future.result()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if error is not None:
        raise error
    if signalled:
        raise KeyboardInterrupt
    return [cloudpickle.loads(results[i]) for i in range(len(calls))]


def _worker_start(cores: int) -> None:
    """A worker's own process group (Ctrl-C in a terminal reaches the launcher only), its share of the cores,
    which trainer.threads=auto and a lone job's share read (bnlab.run.threads.usable_cores), and a watch on
    the launcher."""
    os.setpgrp()
    os.environ[CORES_ENV] = str(cores)
    threading.Thread(target=_watch_launcher, args=(os.getppid(),), daemon=True).start()


_training = threading.Event()  # set while a worker runs a group


def _watch_launcher(launcher: int) -> None:
    """A worker whose launcher died (killed, so it could pass nothing on) stops its runs as SIGTERM would (after
    their step, each writing its summary) and exits, instead of waiting for work forever."""
    while os.getppid() == launcher:
        time.sleep(WATCH_S)
    os.kill(os.getpid(), signal.SIGTERM)  # a worker between groups ends here (SIGTERM's default)
    while _training.is_set():
        time.sleep(WATCH_S / 5)
    os._exit(1)


def _pickled_run_group(call: bytes) -> bytes:
    """run_group in a worker. Hydra's state holds closures (OmegaConf's resolvers), which only cloudpickle
    pickles, as hydra/launcher=joblib's loky does."""
    _training.set()
    try:
        return cloudpickle.dumps(run_group(*cloudpickle.loads(call)))
    finally:
        _training.clear()


def run_group(
    hydra_context: HydraContext,
    task_function: TaskFunction,
    configs: list[DictConfig],
    cfgs: list[TrainConfig],
    singleton_state: dict | None = None,
) -> list[JobReturn]:
    """Run one job alone, or train a fused group and hand each member's outcome to the job that reports it;
    in this process or, given Hydra's state (`singleton_state`), in a worker."""
    if singleton_state is not None:
        restore_hydra_state(singleton_state)
    logging_cfg = configs[0].hydra.hydra_logging, configs[0].hydra.verbose
    if len(configs) == 1:
        tasks = [functools.partial(train_job, cfg=cfgs[0])]  # Hydra's task function, with the config it has
    else:
        dirs = [job_dir(c) for c in configs]
        log.info("training %d runs as one fused model: %s", len(dirs), ", ".join(d.name for d in dirs))
        tasks = [_reporter(outcome) for outcome in run_jobs(cfgs, dirs, console, usable_cores())]
    returns = []
    for config, task in zip(configs, tasks):
        returns.append(
            run_job(
                hydra_context=hydra_context,
                task_function=task,
                config=config,
                job_dir_key="hydra.sweep.dir",
                job_subdir_key="hydra.sweep.subdir",
            )
        )
        configure_log(*logging_cfg)
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
