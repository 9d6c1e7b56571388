"""Command-line overrides of `bnlab train`, checked before Hydra composes anything: an unknown config
group option or key is refused with the closest match ("Did you mean 'batch'?"), which Hydra's own
message does not offer."""

from __future__ import annotations

from dataclasses import asdict
from importlib.resources import files

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Glob

from bnlab.config import TrainConfig, check_choice, flatten

GROUPS = ("model", "norm", "data", "optim", "experiment")  # the config groups: one folder each under conf/


def group_options(group: str) -> list[str]:
    """The options of a config group: the YAML files in its folder of conf/."""
    folder = files("bnlab.conf") / group
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def check_overrides(args: list[str]) -> None:
    """Refuse an override naming an unknown group option or key (ConfigError). Appends (+key), deletions
    (~key), hydra.* keys and what does not parse are left to Hydra."""
    try:
        overrides = OverridesParser.create().parse_overrides([a for a in args if "=" in a and not a.startswith("-")])
    except Exception:
        return
    keys = [*GROUPS, *flatten(asdict(TrainConfig()))]
    for o in overrides:
        key = o.key_or_group
        if o.is_add() or o.is_force_add() or o.is_delete() or key.split(".")[0].split("/")[0] == "hydra":
            continue
        section = key.rpartition(".")[0]
        check_choice(key, key, [k for k in keys if k.rpartition(".")[0] == section] or keys, what="keys")
        if key in GROUPS and not isinstance(o.value(), Glob):
            for value in o.sweep_string_iterator() if o.is_sweep_override() else [str(o.value())]:
                check_choice(key, value, group_options(key))
