"""One job of `bnlab train`, below the Hydra face that starts it: its config, its training (alone, or with
the other members of a fused group) and what its outcome means: the failure policy and the exit code.
bnlab/face/app.py (one job) and bnlab/face/launcher.py (fused groups) both run jobs through here."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from bnlab.core.datafiles import DataError
from bnlab.record.files import OutputError
from bnlab.record.summary import Status, Summary
from bnlab.run.world import world
from bnlab.schema.config import ConfigError, TrainConfig

# Exit codes of `bnlab train` (README "When things go wrong")
OK, FAILED, REFUSED, INTERRUPTED = 0, 1, 2, 130


# Composed configs already converted, by identity: a sweep's preflight and its launcher load the same object.
_converted: dict[int, tuple[DictConfig, TrainConfig]] = {}


def job_config(dcfg: DictConfig) -> TrainConfig:
    """The job's TrainConfig from its composed config (the hydra node, if any, left out), validated; once per
    composed config."""
    from bnlab.core.validate import validate  # the registries, and torch: not for the commands that only read

    known = _converted.get(id(dcfg))
    if known is not None and known[0] is dcfg:
        return known[1]
    # Key by key, leaving the hydra node out (a copy of the whole config would cost several times more).
    values = {f.name: dcfg[f.name] for f in fields(TrainConfig)}
    cfg = TrainConfig(**{k: OmegaConf.to_object(v) if isinstance(v, DictConfig) else v for k, v in values.items()})
    if (launched := world()) is not None:  # the run trains on the processes torchrun or srun started
        if cfg.trainer.devices not in (1, launched.size):
            raise ConfigError(
                f"trainer.devices={cfg.trainer.devices} is not accepted under {launched.by}, which started "
                f"{launched.size} processes for this run; accepted values: 1 (the default) or {launched.size}."
            )
        cfg.trainer.devices = launched.size
    validate(cfg)
    _converted[id(dcfg)] = (dcfg, cfg)
    return cfg


@dataclass
class Outcome:
    """How a job ended: its summary, or the error that stopped it; neither when another process owns
    its run folder and trains it."""

    summary: Summary | None
    error: BaseException | None = None

    @property
    def refused(self) -> bool:
        """Stopped by bad input (a config value, a data file) or a folder it cannot write to, which bnlab
        explains in one paragraph."""
        return isinstance(self.error, (ConfigError, DataError, OutputError))

    @property
    def left_to_another_process(self) -> bool:
        return self.summary is None and self.error is None

    @property
    def interrupted(self) -> bool:
        return isinstance(self.error, KeyboardInterrupt) or (
            self.summary is not None and self.summary.status == Status.INTERRUPTED
        )

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return INTERRUPTED
        if self.error is None:
            return OK  # completed or diverged: a diverged run is a result
        return REFUSED if self.refused else FAILED


def run_jobs(cfgs: list[TrainConfig], run_dirs: list[Path], console: Console, cores: int) -> list[Outcome]:
    """Train these jobs, one alone or several as one fused group, on `cores` cores, and return each one's
    outcome; an error or Ctrl-C ends every job of the group (their summary.json files say so)."""
    from bnlab.run.train import train_runs  # torch: imported by the commands that train, once their checks passed

    try:
        return [Outcome(s) for s in train_runs(cfgs, run_dirs, console, cores)]
    except SystemExit as e:  # the user's code (a custom norm's forward, say) called sys.exit(): a failure, not an exit
        error = RuntimeError(f"the run's code called sys.exit({e.code!r})")
        return [Outcome(None, error.with_traceback(e.__traceback__)) for _ in cfgs]
    except (Exception, KeyboardInterrupt) as e:
        return [Outcome(None, e) for _ in cfgs]
