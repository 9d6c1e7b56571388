"""`bnlab train` as a Hydra app: the task function that every job runs, and how a job's outcome is
shown and turned into an exit status (bnlab.run.job holds the policy; this module prints and exits)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from rich.logging import RichHandler
from rich.syntax import Syntax

import bnlab.face.hydra_setup  # noqa: F401  the structured config and the resolvers, before Hydra composes
from bnlab.face.overrides import FUSING_LAUNCHER, untrusted
from bnlab.face.slurm import in_submitted_job
from bnlab.record.console import make_console, shell_path
from bnlab.record.summary import Summary
from bnlab.record.tuning import SEARCH
from bnlab.results.summarize import run_table, summarize
from bnlab.run.job import Outcome, job_config, run_jobs
from bnlab.run.threads import cores_per_job
from bnlab.schema.config import TrainConfig

log = logging.getLogger("bnlab")
console = make_console()


def train_job(dcfg: DictConfig, cfg: TrainConfig | None = None) -> None:
    """One job of `bnlab train`: a run, or one run of a sweep; `cfg`: its TrainConfig where the launcher has
    it already (the job's own config is a copy that Hydra makes for the task)."""
    hc = HydraConfig.get()
    show_job(dcfg)
    # Another launcher's n_jobs (joblib's) share the cores; bnlab's own gives each worker its share (BNLAB_CORES).
    own = hc.launcher.get("_target_") == FUSING_LAUNCHER
    parallel = hc.launcher.get("n_jobs") if hc.mode == RunMode.MULTIRUN and not own else 1
    cfg = cfg or job_config(dcfg)
    (outcome,) = run_jobs([cfg], [Path(hc.runtime.output_dir)], console, cores_per_job(parallel))
    report(outcome)


def verbose() -> bool:
    """hydra.verbose (or `bnlab train -v`) asks for every job's whole config and every log line."""
    return bool(HydraConfig.get().verbose)


def console_log_handler() -> logging.Handler:
    """The console handler of conf/hydra/job_logging/rich.yaml: every INFO line in a single run; in a sweep
    warnings and errors only (each run prints its one line), unless verbose."""
    quiet = HydraConfig.get().mode == RunMode.MULTIRUN and not verbose()
    return RichHandler(console=console, show_path=False, level=logging.WARNING if quiet else logging.INFO)


def show_job(dcfg: DictConfig) -> None:
    """Before a job trains: its whole config when verbose (it is always in the run folder's .hydra/), and for
    a single run the folder it writes to."""
    hc = HydraConfig.get()
    if verbose():
        console.print(Syntax(OmegaConf.to_yaml(dcfg), "yaml", background_color="default"))
    if hc.mode == RunMode.RUN:
        console.print(f"run: {os.path.relpath(hc.runtime.output_dir)}", soft_wrap=True, highlight=False)


def one_line(summary: Summary) -> str:
    """A run of a sweep in one line: its name (what varies), how it ended, its final test accuracy and the
    iterations it needed to each threshold."""
    hc = HydraConfig.get()
    acc = summary.final.get("test_acc")
    reached = ", ".join(
        f"{t:g} {'never' if at is None else f'at {at}'}" for t, at in summary.iterations_to_threshold.items()
    )
    return (
        f"run {hc.job.num + 1}: {Path(hc.runtime.output_dir).name}: {summary.status.value} after {summary.steps} steps"
        f"{'' if acc is None else f', test acc {acc:.4f}'}; {summary.threshold_metric} {reached}"
    )


def report(outcome: Outcome) -> None:
    """Show how the job ended and exit with its code where it must: a refused or failed single run
    (2 or 1), any interruption (130; a sweep starts no further run and shows its table first). A failed
    run of a sweep is logged and the sweep goes on (its table counts it, and the sweep exits 1). A job that
    submitit started (SLURM) only says how its run ended: the command that submitted it owns the sweep."""
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    run_dir = hc.runtime.output_dir
    if outcome.left_to_another_process:
        log.info("skipped: another process is training %s", run_dir)
        return
    if outcome.interrupted:
        submitted = in_submitted_job()  # its sweep's table and exit status are the submitting command's
        if multirun and not submitted:
            summarize(Path(hc.sweep.dir), console)
        steps = f" at step {outcome.summary.steps}" if outcome.summary else ""
        trust = " --trust" if untrusted([*hc.overrides.task, *hc.overrides.hydra]) else ""  # the user's own code
        again = (
            f"the sweep with `bnlab resume {shell_path(hc.sweep.dir)}{trust}`"
            if multirun
            else f"it with `bnlab resume {shell_path(run_dir)}{trust}`"
        )
        console.print(
            f"interrupted{steps}: summary.json, the TensorBoard events and the last checkpoint are in "
            f"{os.path.relpath(run_dir)}; continue {again}",
            soft_wrap=True,
        )
        if not submitted:
            sys.exit(outcome.exit_code)
        return
    if outcome.error is not None:
        if os.environ.get("HYDRA_FULL_ERROR") == "1" or not (outcome.refused or multirun):
            raise outcome.error
        log.error("%s", outcome.error, exc_info=not outcome.refused)
        if not multirun:
            sys.exit(outcome.exit_code)
        return
    if multirun and Path(str(hc.sweep.subdir)).parts[0] == SEARCH:
        log.info("%s", one_line(outcome.summary))  # a tuning sweep's search: the sweeper prints each rung's line
    elif multirun:
        console.print(one_line(outcome.summary), soft_wrap=True, highlight=False)
    else:
        console.print(run_table(Path(run_dir).name, outcome.summary))


def train_app() -> None:
    """`bnlab train`: Hydra's main on train_job (a module-level function, so that parallel launchers pickle it by
    its module and name). Decorated when called, not on import: hydra.main sets Hydra's version base for the whole
    process, which would change how another app that runs with bnlab's launcher treats its working directory."""
    hydra.main(version_base="1.3", config_path="pkg://bnlab.conf", config_name="train")(train_job)()
