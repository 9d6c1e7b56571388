"""Hydra callbacks of `bnlab train` (conf/train.yaml, hydra.callbacks)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from bnlab.console import make_console
from bnlab.job import FAILED
from bnlab.summarize import summarize
from bnlab.summary import Status


class SweepTable(Callback):
    """At the end of a multirun: the sweep's table and summary files; exit 1 if any run failed."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        groups = summarize(Path(config.hydra.sweep.dir), make_console())
        if any(g.count(Status.FAILED) for g in groups):
            sys.exit(FAILED)
