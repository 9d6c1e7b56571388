"""`hydra/launcher=slurm` (conf/hydra/launcher/slurm.yaml, hydra_plugins/bnlab_slurm_launcher): hydra-submitit-
launcher's SLURM launcher with what a sweep needs on a cluster where jobs are cancelled, preempted and cut off by
their time limit.

Submitting (`launch_jobs`, in the command that owns the sweep): an `sbatch` that refuses the jobs is a one-paragraph
refusal (its message quoted, exit 2, no sweep folder left); with trainer.resume=true the runs that completed are
not submitted again; the jobs are watched through squeue and their result files (sacct, where the cluster keeps
accounting, only says how a vanished job ended), so that a cancelled job or one that vanished ends the wait
instead of a traceback or a wait forever. The runs' table, the end in provenance.json and the `bnlab resume` line
then come from the sweep's callbacks (bnlab/face/callbacks.py), once.

In each job (`run_job`): SLURM's warning before the time limit (USR2, hydra.launcher.signal_delay_s before it)
stops the run after its step with a fresh checkpoint, as SIGTERM (scancel) does, and the run's summary says
`interrupted`; with hydra.launcher.max_num_timeout > 0 the job is then requeued and the run resumes from that
checkpoint. A job never writes the sweep's files.
"""

from __future__ import annotations

import contextlib
import copy
import getpass
import io
import logging
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import OmegaConf

from bnlab.face.hydra_private import hydra_state
from bnlab.face.overrides import RESUME, refuse
from bnlab.record.summary import FILE, existing

log = logging.getLogger("bnlab")

GRACE_POLLS = 3  # a job that left the queue has this many more polls to show its result file (a shared file system)
# squeue's reasons for a pending job that waiting does not cure (SLURM's "Resource Limits" and "Job Reason Codes")
NEVER_STARTS = {
    "PartitionConfig": "the partition cannot give what the job asks (CPUs, memory or GPUs per node)",
    "PartitionNodeLimit": "the job asks for more nodes than the partition allows",
    "PartitionTimeLimit": "the job's time limit exceeds the partition's (hydra.launcher.timeout_min)",
    "BadConstraints": "no node satisfies the job's constraints",
}


def in_submitted_job() -> bool:
    """This process is a job that submitit started (on SLURM, or hydra/launcher=submitit_local): it trains its
    run and leaves the sweep's table and exit status to the command that submitted it."""
    return bool(os.environ.get("SUBMITIT_EXECUTOR"))


def run_job(launcher: Any, run: Any, sweep_overrides: list[str], *args: Any) -> JobReturn:
    """The job, on the cluster (`run`: hydra-submitit-launcher's job with these arguments): the run (resumed
    when SLURM requeued the job), stopped cleanly at the time limit's warning, and the job requeued after it
    where hydra.launcher.max_num_timeout allows."""
    if int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0 and RESUME not in sweep_overrides:
        sweep_overrides = [*sweep_overrides, RESUME]  # requeued: go on from the checkpoint
    warned: list[int] = []
    submitit_handler = signal.getsignal(signal.SIGUSR2)

    def time_limit_warning(signum: int, frame: Any) -> None:
        warned.append(signum)
        log.warning("SIGUSR2: the job's time limit is near; the run stops after this step")
        os.kill(os.getpid(), signal.SIGTERM)  # the training loop's clean stop: after the step, checkpointed

    signal.signal(signal.SIGUSR2, time_limit_warning)
    # before and after training, where submitit would let SIGTERM pass (its SIGKILL follows): the job stops now
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    submitted = copy.deepcopy(launcher.config)  # running the job leaves it read-only, which a requeue pickles
    done = run(sweep_overrides, *args)
    launcher.config = submitted
    if warned and launcher.params.get("max_num_timeout", 0) > 0 and callable(submitit_handler):
        import submitit

        with contextlib.suppress(submitit.core.utils.UncompletedJobError):  # no requeue left: the run stays so
            submitit_handler(signal.SIGUSR2, None)  # checkpoint this call, requeue the job and exit
    return done


def launch_jobs(launcher: Any, job_overrides: Any, initial_job_idx: int) -> list[JobReturn]:
    """Submit the jobs as one job array, wait for each to end, and hand Hydra each one's return (those that
    ended without one: an empty return; the sweep's table then shows how their runs stand)."""
    sweep_dir = Path(str(launcher.config.hydra.sweep.dir))
    todo = list(range(len(job_overrides)))
    if launcher.config.trainer.resume:  # the runs that completed stay as they are
        todo = [i for i in todo if not _completed(launcher, sweep_dir, job_overrides[i])]
        done, total = len(job_overrides) - len(todo), len(job_overrides)
        if done:
            log.info("%d of the %d runs completed before: not submitted again", done, total)
    returns = [JobReturn(overrides=list(o), status=JobStatus.COMPLETED) for o in job_overrides]
    if not todo:
        return returns
    sweep_dir.mkdir(parents=True, exist_ok=True)
    names = [" ".join(filter_overrides(job_overrides[i])) for i in todo]
    params = []
    for i, name in zip(todo, names):
        idx = initial_job_idx + i
        log.info("\t#%d : %s", idx, name)
        params.append((list(job_overrides[i]), "hydra.sweep.dir", idx, f"job_id_for_{idx}", hydra_state()))
    jobs = _submit(launcher, params, sweep_dir)
    log.info(
        "submitted %d jobs (SLURM job %s) to partition %s; waiting for them (squeue every %g s)",
        len(jobs),
        jobs[0].job_id.split("_")[0],
        launcher.params.get("partition") or "(the default)",
        launcher.poll_s,
    )
    for i, ret in zip(todo, wait_for(jobs, names, launcher.poll_s)):
        returns[i] = ret or returns[i]
    return returns


def _submit(launcher: Any, job_params: list[tuple], sweep_dir: Path) -> list:
    """The jobs submitted as one array, as hydra-submitit-launcher submits them; a refusal by sbatch exits 2
    and removes the sweep folder where it holds no run yet."""
    import submitit

    params = launcher.params
    executor = submitit.AutoExecutor(
        cluster="slurm", folder=params["submitit_folder"], slurm_max_num_timeout=params["max_num_timeout"]
    )
    shared = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(
        **{
            k if k in shared else f"slurm_{k}": v
            for k, v in params.items()
            if k not in ("submitit_folder", "max_num_timeout")
        }
    )
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # submitit prints sbatch's message too
            return executor.map_array(launcher, *zip(*job_params))
    except (submitit.core.utils.FailedJobError, OSError) as e:
        if not any((d / ".hydra").is_dir() for d in sweep_dir.iterdir()):
            shutil.rmtree(sweep_dir, ignore_errors=True)
        message = " ".join(str(e).split()) or type(e).__name__
        refuse(
            f"sbatch refused the sweep's jobs: {message}. Check the hydra.launcher.* settings it was given "
            f"(partition={params.get('partition')}, gpus_per_node={params.get('gpus_per_node')}, "
            f"cpus_per_task={params.get('cpus_per_task')}, mem_gb={params.get('mem_gb')}, "
            f"timeout_min={params.get('timeout_min')}) against `sinfo` and your cluster's limits."
        )


def _completed(launcher: Any, sweep_dir: Path, overrides: list[str]) -> bool:
    """The job's run (in the folder its config names) completed before."""
    config = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(overrides))
    return bool((s := existing(sweep_dir / str(config.hydra.sweep.subdir) / FILE)) and s.status.done)


def wait_for(jobs: list, names: list[str], poll_s: float) -> list[JobReturn | None]:
    """Each job's return once it has ended: read from its result file, or None where it ended without one
    (cancelled, killed at its time limit, its node lost), said once per job."""
    returns: dict[int, JobReturn | None] = {}
    gone_since: dict[int, float] = {}
    queue_warned, said = False, set()
    while len(returns) < len(jobs):
        queued = _queued()
        if queued is None and not queue_warned:
            log.warning("squeue does not answer; the jobs' result files are still watched")
            queue_warned = True
        for n, job in enumerate(jobs):
            if n in returns:
                continue
            reason = (queued or {}).get(job.job_id, "")
            if reason in NEVER_STARTS and reason not in said:
                said.add(reason)
                log.warning(
                    "job %s waits with reason %s: %s; it will not start as asked. scancel the sweep's jobs (this "
                    "command then ends with the resume line) and resume with other hydra.launcher.* settings",
                    job.job_id,
                    reason,
                    NEVER_STARTS[reason],
                )
            if job.paths.result_pickle.exists():
                returns[n] = _result(job, names[n])
            elif queued is not None and job.job_id not in queued:
                gone_since.setdefault(n, time.monotonic())
                if time.monotonic() - gone_since[n] >= GRACE_POLLS * poll_s:
                    log.warning("job %s (%s) ended without a result: %s", job.job_id, names[n], _how_it_ended(job))
                    returns[n] = None
        if len(returns) < len(jobs):
            time.sleep(poll_s)
    return [returns[n] for n in range(len(jobs))]


def _queued() -> dict[str, str] | None:
    """This user's jobs in the queue (array tasks one by one: 123_4), each with the reason it waits for
    (Resources, Priority, PartitionConfig, ...; None where it runs), or None if squeue fails."""
    try:
        out = subprocess.run(
            ["squeue", "-h", "-r", "-u", getpass.getuser(), "-o", "%i %r"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return {job: reason for job, _, reason in (line.partition(" ") for line in out.stdout.splitlines() if line)}


def _how_it_ended(job: Any) -> str:
    """The job's state from sacct (CANCELLED, TIMEOUT, NODE_FAIL, ...) where the cluster keeps accounting."""
    try:
        out = subprocess.run(
            ["sacct", "-n", "-X", "-P", "-j", job.job_id, "-o", "State"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError):
        out = None
    state = out.stdout.split("\n")[0].strip() if out and out.returncode == 0 else ""
    return state or "no longer queued (this cluster keeps no accounting to say why)"


def _result(job: Any, name: str) -> JobReturn | None:
    """The job's return from its result file; an error in the job (outside its run, which records its own) is
    said in one line with where its log is."""
    try:
        return job.results()[0]
    except Exception as e:
        last = next((line for line in reversed(str(e).splitlines()) if line.strip()), type(e).__name__)
        log.error("job %s (%s) failed: %s; its log: %s", job.job_id, name, last.strip(), job.paths.stderr)
        return None
