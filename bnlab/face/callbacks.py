"""Hydra callbacks of `bnlab train` (conf/train.yaml, hydra.callbacks): `Preflight` checks every job
before Hydra writes anything, `SweepTable` prints the table at the end of a sweep."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, read_write

from bnlab.core.datafiles import DataError
from bnlab.core.validate import check_memory, check_targets
from bnlab.face.hydra_private import BASIC_SWEEPER, ComposeOnce, expand_sweep, sweeper_params
from bnlab.face.overrides import DEFAULTS, EXCLUDE_KEYS, FUSING_LAUNCHER, refuse
from bnlab.record import provenance
from bnlab.record.console import make_console, shell_path
from bnlab.record.summary import FILE, Status, existing
from bnlab.results.dashboard import write_dashboard
from bnlab.results.summarize import summarize
from bnlab.run.engine import resolve_device
from bnlab.run.job import FAILED, job_config
from bnlab.schema.config import BOOKKEEPING_KEYS, ConfigError, flatten, fuse_mode

log = logging.getLogger("bnlab")


class Preflight(Callback):
    """Before the first job starts and before Hydra creates a run folder: each job's config must pass
    `validate` on this machine, and its own norm, model or data set (norm.target, ...) must import, build
    and run on a probe batch; a preset that sweeps must be run with -m; and a job that resumes into
    a folder that already has a config must keep that config (bookkeeping keys aside). A refusal
    exits 2 and leaves every folder as it was."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_job(config, set())
            _check_not_a_sweep(config)
            # last: reading the default folder claims it (the claim_folder resolver makes it)
            _check_output_folder(Path(config.hydra.run.dir), "hydra.run.dir")
            _warn_of_coarse_counts([config])
            if config.trainer.resume:
                _check_resume(Path(config.hydra.run.dir), config)
        except (ConfigError, DataError) as e:
            refuse(e)
        except Exception as e:  # Hydra would turn it into a warning and run unchecked
            refuse(f"the checks before the run could not be made: {type(e).__name__}: {e}")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.sweeper.get("_target_") != BASIC_SWEEPER:
            try:
                _check_output_folder(Path(config.hydra.sweep.dir), "hydra.sweep.dir")
            except ConfigError as e:
                refuse(e)
            return  # another sweeper draws its jobs as it goes: each is validated when it starts
        if fuse_mode(config.trainer) == "true" and config.hydra.launcher.get("_target_") != FUSING_LAUNCHER:
            log.warning("trainer.fuse=true fuses runs only with hydra/launcher=bnlab (the default): these run alone")
        loader = GlobalHydra.instance().config_loader()
        ComposeOnce(loader, config)
        overrides = expand_sweep([*sweeper_params(config), *config.hydra.overrides.task], loader)  # the command wins
        name_runs_by_what_varies(config, overrides)
        jobs = [loader.load_sweep_config(config, job) for job in overrides]
        try:
            errors, tried = [], set()
            for job in jobs:
                try:
                    check_job(job, tried)
                except (ConfigError, DataError) as e:
                    errors.append((" ".join(job.hydra.overrides.task), e))
            if errors:
                where, first = errors[0]
                more = f" ({len(errors) - 1} more of the {len(jobs)} jobs are refused too)" if len(errors) > 1 else ""
                raise ConfigError(f"the sweep is refused before any run starts: the job `{where}`: {first}{more}")
            _check_output_folder(Path(config.hydra.sweep.dir), "hydra.sweep.dir")  # last: reading it claims it
            _warn_of_coarse_counts(jobs)
            if config.trainer.resume:
                for job in jobs:
                    _check_resume(Path(config.hydra.sweep.dir) / str(job.hydra.sweep.subdir), job)
        except (ConfigError, DataError) as e:
            refuse(e)
        except Exception as e:  # Hydra would turn it into a warning and run the sweep unchecked
            refuse(f"the checks before the sweep could not be made: {type(e).__name__}: {e}")


def _check_output_folder(folder: Path, option: str) -> None:
    """Refuse a run or sweep folder that cannot be made, before Hydra tries (and fails with a traceback): a
    name longer than the file system takes, or no folder can be made where it would go. Nothing is left
    behind: the nearest existing folder above it is tried with a temporary folder, removed at once."""
    folder = folder.absolute()
    above = next(p for p in folder.parents if os.path.lexists(p))  # lexists: False, not an error, for a long name
    limit = os.pathconf(above, "PC_NAME_MAX") if above.is_dir() else 255
    problem = ""
    if not above.is_dir():
        problem = f"{above} is a file, not a folder"
    elif long := [p for p in folder.relative_to(above).parts if len(p.encode()) > limit]:
        problem = f"the name {long[0][:40]}... is longer than the {limit} bytes a name may have here"
    elif not folder.is_dir():
        try:
            os.rmdir(tempfile.mkdtemp(dir=above))
        except OSError as e:
            problem = f"no folder can be made in {above}: {e.strerror}"
    if problem:
        raise ConfigError(f"{option}={folder} cannot be used: {problem}. Give a folder you can write to ({option}=).")


def name_runs_by_what_varies(config: DictConfig, jobs: list[list[str]]) -> None:
    """Run folders (and TensorBoard run names) of a sweep are named by the overrides that vary within it:
    those that every job shares are added to Hydra's exclude_keys, through the hydra overrides that every
    job's config is composed with (the sweep's multirun.yaml keeps them all)."""
    parser = OverridesParser.create()
    keys = {}  # key -> the set of "key=value" lines it takes
    for job in jobs:
        for o in parser.parse_overrides(job):
            keys.setdefault(o.key_or_group, set()).add(o.input_line)
    constant = sorted(k for k, lines in keys.items() if len(lines) == 1)
    already = any(o.startswith(f"{EXCLUDE_KEYS}=") for o in config.hydra.overrides.hydra)
    if already or len(constant) == len(keys):
        return  # named by the user, or nothing varies: the names keep every override
    with read_write(config.hydra.overrides):
        config.hydra.overrides.hydra.append(f"{EXCLUDE_KEYS}=[{','.join([*BOOKKEEPING_KEYS, *constant])}]")


def check_job(config: DictConfig, tried: set[str]) -> None:
    """Refuse a job whose config does not validate here, or whose own norm, model or data set (each
    distinct one tried once: a custom data set is loaded to try it) cannot be used."""
    cfg = job_config(config)  # validated
    device = resolve_device(cfg.trainer.device)
    key = repr((asdict(cfg.model), asdict(cfg.norm), asdict(cfg.data)))
    if key not in tried:
        tried.add(key)
        check_targets(cfg)
    check_memory(cfg, device)  # after the user's code was tried: the estimate builds the model


def _warn_of_coarse_counts(jobs: list[DictConfig]) -> None:
    """Once per step budget that trainer.eval_every does not divide: iterations-to-threshold lose resolution."""
    for max_steps, every in sorted({(j.trainer.max_steps, j.trainer.eval_every) for j in jobs}):
        if max_steps % every:
            below = max_steps < every
            log.warning(
                "trainer.max_steps=%d is %s trainer.eval_every=%d: the test set is evaluated at %s %d only, so "
                "iterations-to-threshold have that resolution; choose trainer.eval_every to divide trainer.max_steps",
                max_steps,
                "below" if below else "not a multiple of",
                every,
                "steps 0 and" if below else f"every {every} steps and at step",
                max_steps,
            )


def _check_not_a_sweep(config: DictConfig) -> None:
    """A preset whose hydra.sweeper.params sweep keys the command line does not fix is a sweep: refuse
    to run it as a single run, giving the -m command."""
    given = {o.lstrip("+~").split("=")[0] for o in config.hydra.overrides.task}
    swept = [k for k in config.hydra.sweeper.get("params") or {} if k.lstrip("+~") not in given]
    if swept:
        args = " ".join(config.hydra.overrides.task)
        preset = config.hydra.runtime.choices.get("experiment")
        raise ConfigError(
            f"+experiment={preset} is a sweep over {', '.join(swept)}, so it runs with -m: `bnlab train -m {args}`"
            f" (or fix {', '.join(swept)} on the command line to run one of its runs alone)."
        )


def _started_with(run_dir: Path) -> dict | None:
    """The config `run_dir` was started with: its .hydra/config.yaml, or where Hydra left that empty or cut off
    (it writes it in place: a full disk or a kill does that) the config its summary.json records; None where it
    has neither (a new folder, or nothing left to check against: said)."""
    saved = run_dir / ".hydra" / "config.yaml"
    if not saved.exists():
        return None
    try:
        config = OmegaConf.to_container(OmegaConf.load(saved), resolve=True)
        if isinstance(config, dict) and config:
            return config
    except Exception as e:  # a YAML cut off mid-write
        log.debug("%s: %s", saved, e)
    summary = existing(run_dir / FILE)
    log.warning(
        "%s is empty or cut off: %s; this run writes it anew",
        saved,
        "checked against the config in its summary.json" if summary else "there is no config to check against",
    )
    return summary.config if summary else None


def _check_resume(run_dir: Path, config: DictConfig) -> None:
    """Refuse to resume `run_dir` with a config other than the one it was started with."""
    started = _started_with(run_dir)
    if started is None:
        return
    old = flatten(started)
    task = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])  # resolved without the hydra node
    new, defaults = flatten(OmegaConf.to_container(task, resolve=True)), flatten(DEFAULTS)
    changed = [
        k
        for k in sorted(old.keys() | new.keys())
        if k not in BOOKKEEPING_KEYS and old.get(k, defaults.get(k)) != new.get(k)
    ]
    if changed:
        shown = ", ".join(f"{k} was {old.get(k)!r}, now {new.get(k)!r}" for k in changed[:4])
        raise ConfigError(
            f"trainer.resume=true would continue {run_dir} with another config ({shown}"
            f"{f', and {len(changed) - 4} more keys' if len(changed) > 4 else ''}); a run resumes with the config "
            f"it started with, only {', '.join(BOOKKEEPING_KEYS)} may change. Continue it as it was with "
            f"`bnlab resume {shell_path(run_dir)}`, or train the new config as a new run (without trainer.resume)."
        )


class Provenance(Callback):
    """provenance.json in the sweep folder (or a single run's folder): what produced its numbers."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._start(Path(config.hydra.run.dir), config, "a single run")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        parallel = config.hydra.launcher.get("n_jobs")
        launcher = str(config.hydra.launcher.get("_target_", "")).rsplit(".", 1)[-1]
        self._start(Path(config.hydra.sweep.dir), config, launcher + (f", n_jobs={parallel}" if parallel else ""))

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._end(Path(config.hydra.run.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._end(Path(config.hydra.sweep.dir))

    @staticmethod
    def _start(folder: Path, config: DictConfig, launcher: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        provenance.start(folder, sys.argv[1:], config.trainer.device, launcher, resumed=config.trainer.resume)

    @staticmethod
    def _end(folder: Path) -> None:
        if (folder / provenance.FILE).exists():
            # a run's summaries (not an earlier bnlab's sweep table at the root); unreadable ones are named and skipped
            runs = [s for p in folder.rglob(FILE) if p.parent != folder and (s := existing(p))]
            statuses = [r.status.value for r in runs]
            threads = {t for r in runs if (t := r.config.get("trainer", {}).get("threads")) is not None}
            provenance.end(folder, {s: statuses.count(s) for s in sorted(set(statuses))}, sorted(threads, key=str))


class SweepTable(Callback):
    """At the end of a multirun: the sweep's table, summary files and TensorBoard dashboard; exit 1 if any
    run failed or did not finish (its job ended first: then with the `bnlab resume` line)."""

    expected: int | None = None  # the jobs of a sweep that the basic sweeper expands: each should leave a run

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.sweeper.get("_target_") == BASIC_SWEEPER:
            loader = GlobalHydra.instance().config_loader()
            self.expected = len(expand_sweep([*sweeper_params(config), *config.hydra.overrides.task], loader))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        root = Path(config.hydra.sweep.dir)
        console = make_console()
        sweep = summarize(root, console)
        write_dashboard(root)
        started = [d for d in sorted(root.iterdir()) if (d / ".hydra").is_dir()]
        # a run whose summary.json could not be written (a full disk) is not in the table: never a success
        lost = [d.name for d in started if not (d / FILE).exists()]
        if lost:
            runs = f"{len(lost)} run{'s' if len(lost) > 1 else ''}"
            console.print(f"{runs} left no summary.json (not in the table): {', '.join(lost)}", soft_wrap=True)
        # runs whose jobs ended before them (cancelled, a time limit), or before they began: the sweep goes on
        stopped = [r for r in (sweep.runs if sweep else []) if r.summary.status in (Status.INTERRUPTED, Status.RUNNING)]
        never = max(0, (self.expected or 0) - len(started))
        if stopped or lost or never:
            n = len(stopped) + len(lost) + never
            timed = "timeout_min" in config.hydra.launcher  # a launcher with time limits (SLURM)
            limit = " (a longer time limit: add hydra.launcher.timeout_min=MINUTES)" if timed else ""
            console.print(
                f"{n} run{'s' if n > 1 else ''} did not finish (a job cancelled, preempted or at its time limit): "
                f"continue the sweep with `bnlab resume {shell_path(root)}`{limit}; it trains only the runs that "
                "have not completed",
                soft_wrap=True,
            )
        if stopped or lost or never or (sweep is not None and (sweep.failed or sweep.unreadable)):
            sys.exit(FAILED)
