"""Hydra's private API, the only module of bnlab that uses it: what Hydra 1.3 offers no public way to do.
tests/test_hydra_private.py fails loudly, naming the piece, when a Hydra upgrade moves or changes one.

- `ComposeOnce` replaces the config loader's `load_sweep_config` on the loader object of one sweep, so that
  each job is composed once, not three times (the preflight, the sweeper, the launcher), and most jobs are
  copied rather than composed. The public API that would replace it: a sweeper or launcher hook that hands
  on the job configs it composed (Hydra's Launcher.launch receives override lists only).
- `expand_sweep` is Hydra's basic sweeper's own expansion of override lists into jobs
  (BasicSweeper.split_arguments), reused so that the preflight checks exactly the jobs that will run.
  Public replacement: a sweeper method that lists its jobs before launching them.
- `hydra_state` and `restore_hydra_state` carry Hydra's global state (hydra.core.singleton, which
  hydra_plugins' joblib launcher uses the same way) into bnlab's worker processes.
- `BASIC_SWEEPER`: the basic sweeper's _target_, private module path and all.
"""

from __future__ import annotations

import copy
from typing import Any

from hydra._internal.config_loader_impl import get_overrides_dirname
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType
from hydra.core.singleton import Singleton
from hydra.core.utils import setup_globals
from omegaconf import DictConfig, OmegaConf

BASIC_SWEEPER = f"{BasicSweeper.__module__}.{BasicSweeper.__name__}"


def expand_sweep(overrides: list[str], loader: Any = None) -> list[list[str]]:
    """Every job's overrides from a command line's (and a preset's hydra.sweeper.params put first): the
    cartesian product of the swept values, as Hydra's basic sweeper makes it; a key named twice takes its
    last value. `loader`: the config loader, for overrides that glob a config group's options."""
    parsed = OverridesParser.create(config_loader=loader).parse_overrides(overrides)
    (jobs,) = BasicSweeper.split_arguments(parsed, None)
    return jobs


def sweeper_params(config: Any) -> list[str]:
    """A preset's hydra.sweeper.params as overrides ("key=values"), which go before the command line's."""
    return [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]


def hydra_state() -> dict[str, Any]:
    """Hydra's global state (its config store, plugins and OmegaConf's resolvers), for a worker process."""
    return Singleton.get_state()


def restore_hydra_state(state: dict[str, Any]) -> None:
    """In a worker process: Hydra's state as `hydra_state` took it in the parent."""
    setup_globals()
    Singleton.set_state(state)


class ComposeOnce:
    """Every job's config is loaded three times (here, by Hydra's sweeper to check it, by the launcher to run
    it), and Hydra composes it anew each time (a tenth of a second or more a job): `loader.load_sweep_config`
    made to compose each job of this sweep (`config`) once and hand the same config to the later loads (the
    launcher's, which sets the job's number, is the last). An object, not a closure, so that the loader still
    pickles (bnlab's launcher hands Hydra's state to its worker processes).

    Most jobs of a sweep differ from another job only in plain values (optim.lr=0.3, seed=2): such a job is
    not composed but copied from the first job composed with the same config groups and the same value keys,
    with its values set as Hydra sets them (`OmegaConf.update(..., merge=True)`) and its override lists and
    folder name made anew (a tenth of the time; tests/test_sweeps.py holds it equal to Hydra's own)."""

    def __init__(self, loader: Any, config: DictConfig) -> None:
        self.compose = type(loader).load_sweep_config.__get__(loader)
        self.config = config
        self.repository = loader.repository
        self.composed: dict[tuple[str, ...], DictConfig] = {}
        self.templates: dict[tuple, DictConfig] = {}  # (the other overrides, the value keys) -> a composed job
        loader.load_sweep_config = self

    def __call__(self, master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        if master_config is not self.config:
            return self.compose(master_config, sweep_overrides)
        key = tuple(sweep_overrides)
        if key not in self.composed:
            self.composed[key] = self.compose_job(list(sweep_overrides))
        OmegaConf.copy_cache(master_config, self.composed[key])  # as Hydra does: what was resolved since (the folder)
        return self.composed[key]

    def compose_job(self, sweep_overrides: list[str]) -> DictConfig:
        parsed = OverridesParser.create().parse_overrides(sweep_overrides)
        values = [o for o in parsed if self.is_plain_value(o)]
        template_key = (
            tuple(o.input_line for o in parsed if o not in values),
            tuple(o.key_or_group for o in values),
        )
        if template_key not in self.templates:
            composed = self.compose(self.config, sweep_overrides)
            # a copy that stays as composed: the job's own config is made read-only when it runs
            self.templates[template_key] = copy.deepcopy(composed)
            return composed
        cfg = copy.deepcopy(self.templates[template_key])
        for o in values:
            OmegaConf.update(cfg, o.key_or_group, o.value(), merge=True)
        app = [o for o in parsed if not o.is_hydra_override()]
        cfg.hydra.overrides.task = [o.input_line for o in app]
        names = cfg.hydra.job.config.override_dirname
        cfg.hydra.job.override_dirname = get_overrides_dirname(
            overrides=app, exclude_keys=names.exclude_keys, item_sep=names.item_sep, kv_sep=names.kv_sep
        )
        return cfg

    def is_plain_value(self, o: Override) -> bool:
        """`key=value` of a scalar at a key that is no config group nor Hydra's: a job's only difference from
        another that the copy takes over exactly."""
        return (
            o.type == OverrideType.CHANGE
            and o.package is None
            and not o.is_hydra_override()
            and isinstance(o.value(), (str, int, float, bool, type(None)))
            and not self.repository.group_exists(o.key_or_group)
        )
