"""Hydra callbacks of `bnlab train` (conf/train.yaml, hydra.callbacks)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from rich.console import Console
from rich.text import Text

from bnlab.config import ConfigError, TrainConfig, check_targets
from bnlab.console import make_console
from bnlab.data import DataError
from bnlab.job import FAILED, REFUSED, job_config
from bnlab.summarize import summarize
from bnlab.summary import Status


def refuse_unusable_targets(cfgs: Iterable[TrainConfig]) -> None:
    """Exit 2 with bnlab's one-paragraph message when a custom norm, model or data set of these jobs cannot be
    used (bnlab.config.check_targets), before any run folder is written; each distinct one is tried once."""
    tried = set()
    for cfg in cfgs:
        key = repr((asdict(cfg.model), asdict(cfg.norm), asdict(cfg.data)))
        if key in tried:
            continue
        tried.add(key)
        try:
            check_targets(cfg)
        except (ConfigError, DataError) as e:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            Console(stderr=True).print(Text.assemble(("error: ", "red"), str(e)))
            sys.exit(REFUSED)


class CheckTargets(Callback):
    """A single run's custom norm, model or data set tried before Hydra makes its folder (a sweep's: by
    bnlab.launcher, before any of its jobs runs)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        refuse_unusable_targets([job_config(config)])


class SweepTable(Callback):
    """At the end of a multirun: the sweep's table and summary files; exit 1 if any run failed."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        groups = summarize(Path(config.hydra.sweep.dir), make_console())
        if any(g.count(Status.FAILED) for g in groups):
            sys.exit(FAILED)
