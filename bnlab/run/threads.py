"""How many CPU threads a run trains with (trainer.threads=auto): the cores this process may use, shared
among the runs that train at once, and one thread for models too small to gain from more.

On a machine where anything else runs, torch's intra-op threads that wait for a busy core make a small
model's steps many times slower, and on a quiet machine one thread is faster for it too.
scripts/bench_threads.py measures where a second thread starts to pay off; docs/performance.md has the
numbers behind MIN_FLOPS_PER_THREAD.
No torch here: the launcher decides how many runs train at once before anything imports it.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from bnlab.run.world import local_processes

# FLOPs of one training step (forward and backward, bnlab.run.engine.step_flops) that each thread must have before
# the next one is used. scripts/bench_threads.py on a 2-core Xeon (2026-12-05): a second thread slows the MNIST
# MLP (0.02 GFLOP a step) to 0.55x on a quiet machine; from about 0.5 GFLOP it gains 1.2-1.7x there, but beside
# one busy process it costs 7-50 % up to 30 GFLOP. At 2 GFLOP a thread, the steps that get two (4 GFLOP and up)
# gain 1.5-1.7x quiet and lose at most 19 % beside busy work; every preset's model stays at one.
MIN_FLOPS_PER_THREAD = 2e9
CORES_ENV = "BNLAB_CORES"  # set by bnlab's launcher for each worker process: the cores that worker may use
SLURM_CPUS_ENV = "SLURM_CPUS_PER_TASK"  # set in a SLURM job that asked for --cpus-per-task


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (a container's or a scheduler's limit), at most
    the CPUs SLURM gave its task (SLURM_CPUS_PER_TASK: a job without task affinity still sees every core of
    the node), shared with the other processes torchrun started here, and fewer when bnlab's launcher gave
    this worker a share of them (BNLAB_CORES)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    limits = [os.environ.get(CORES_ENV, ""), os.environ.get(SLURM_CPUS_ENV, "")]
    cores = min([cores, *(int(n) for n in limits if n.isdigit())]) // local_processes()
    return max(1, cores)


def cores_per_job(parallel: int | None) -> int:
    """Each job's share of the usable cores when `parallel` jobs run at once (-1: one job per core)."""
    cores = usable_cores()
    jobs = cores if parallel is not None and parallel < 0 else parallel or 1
    return max(1, cores // jobs)


def auto_threads(flops_per_step: float, cores: int) -> int:
    """trainer.threads=auto: a thread per MIN_FLOPS_PER_THREAD of the step's work, at least 1 and at most
    `cores` (all of them where the work is unknown: inf)."""
    return int(max(1, min(cores, flops_per_step // MIN_FLOPS_PER_THREAD)))


def jobs_at_once(n_jobs: int | str, jobs: int, auto: Callable[[], int]) -> int:
    """How many jobs (or fused groups) a sweep runs at once: hydra.launcher.n_jobs (-1: one per usable core; auto:
    `auto()`), never more than there are jobs."""
    if n_jobs == "auto":
        n_jobs = auto()
    elif n_jobs < 0:
        n_jobs = usable_cores()
    return max(1, min(int(n_jobs), jobs))
