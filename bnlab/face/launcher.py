"""`hydra/launcher=bnlab`, the default launcher of `bnlab train -m`, also for any other Hydra app
(hydra_plugins/bnlab_launcher holds what Hydra sees): Hydra's basic launcher (jobs one after another in this
process, in sweep order), except that `bnlab train`'s jobs that may train as one fused model do
(bnlab/face/fusing.py), and that with hydra.launcher.n_jobs > 1 it runs that many jobs or fused groups at once in
worker processes. Another app's jobs run as Hydra's basic launcher runs them (n_jobs=auto: one at a time, since
this launcher cannot know the threads they use); bnlab's config keys are read only for bnlab's jobs."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import cloudpickle
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

from bnlab.face.app import train_job
from bnlab.face.hydra_private import hydra_state, restore_hydra_state
from bnlab.run.threads import CORES_ENV, cores_per_job, jobs_at_once
from bnlab.schema.config import TrainConfig

log = logging.getLogger(__name__)
WATCH_S = 1.0  # how often a worker looks for its launcher


def launch_jobs(
    launcher: Launcher, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
) -> Sequence[JobReturn]:
    """What the basic launcher does for these jobs, with bnlab's fusable groups trained as one model each; with
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
    if launcher.task_function is train_job:
        from bnlab.face.fusing import plan_jobs  # torch: only for bnlab's own jobs

        groups, cfgs, n_jobs = plan_jobs(configs, launcher.n_jobs)
        work = [([configs[i] for i in g], [cfgs[i] for i in g]) for g in groups]
        cost = [len(g) * cfgs[g[0]].trainer.max_steps for g in groups]  # members x steps
    else:
        n_jobs = jobs_at_once(launcher.n_jobs, len(configs), auto=lambda: 1)
        work, cost = [([c], None) for c in configs], [1] * len(configs)
    log.info("Launching %d jobs locally, %d at once", len(job_overrides), n_jobs)
    if launcher.task_function is not train_job:  # bnlab's jobs print their own lines
        for idx, overrides in enumerate(job_overrides, initial_job_idx):
            log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
    if n_jobs == 1:
        returns = [run_group(launcher.hydra_context, launcher.task_function, *w) for w in work]
    else:
        order = sorted(range(len(work)), key=lambda g: -cost[g])  # the longest first, so that none starts last
        state = hydra_state()
        calls = [(launcher.hydra_context, launcher.task_function, *work[g], state) for g in order]
        done = in_workers(n_jobs, cores_per_job(n_jobs), calls)
        returns = [r for _, r in sorted(zip(order, done))]  # in sweep order
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
    if signalled and (error is None or isinstance(error, BrokenProcessPool)):
        raise KeyboardInterrupt  # a worker that the signal reached before its training could take it broke the pool
    if error is not None:
        raise error
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
    cfgs: list[TrainConfig] | None,
    singleton_state: dict | None = None,
) -> list[JobReturn]:
    """Run one job alone (`cfgs`: bnlab's TrainConfig, None for another app's job), or train a fused group and hand
    each member's outcome to the job that reports it; in this process or, given Hydra's state (`singleton_state`),
    in a worker."""
    if singleton_state is not None:
        restore_hydra_state(singleton_state)
    logging_cfg = configs[0].hydra.hydra_logging, configs[0].hydra.verbose
    if cfgs is None:
        tasks = [task_function]
    else:
        from bnlab.face.fusing import group_tasks

        tasks = group_tasks(configs, cfgs)
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
