"""Command-line overrides of `bnlab train`, checked before Hydra composes anything: an unknown config
group option or key is refused with the closest match ("Did you mean 'batch'?"), which Hydra's own
message does not offer. A group's options are its YAML files in every config folder the command
composes from: bnlab's conf/ and the user's (`--config-dir DIR`, `hydra.searchpath=[file://DIR]`)."""

from __future__ import annotations

from dataclasses import asdict
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Glob, Override
from omegaconf import OmegaConf

from bnlab.config import TrainConfig, check_choice, flatten

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

GROUPS = ("model", "norm", "data", "optim", "experiment", "baseline")  # the config groups: one folder each under conf/
CONFIG_DIR_FLAGS = ("--config-dir", "-cd")


def group_options(group: str, folders: list[Traversable] | None = None) -> list[str]:
    """The options of a config group: the YAML files in its folder of bnlab's conf/ and of `folders`."""
    options = set()
    for folder in [files("bnlab.conf"), *(folders or [])]:
        if folder.joinpath(group).is_dir():
            options |= {
                p.name.removesuffix(".yaml") for p in folder.joinpath(group).iterdir() if p.name.endswith(".yaml")
            }
    return sorted(options)


def _folder(entry: str) -> Traversable | None:
    """A search path entry as a folder: file://DIR (relative to the working directory) or pkg://module."""
    scheme, _, where = entry.partition("://")
    if scheme == "file":
        return Path(where)
    if scheme == "pkg":
        try:
            return files(where)
        except ModuleNotFoundError:
            return None
    return None


def user_folders(args: list[str], overrides: list[Override]) -> list[Traversable]:
    """The user's config folders of `bnlab train ARGS`: --config-dir (-cd) and hydra.searchpath entries."""
    folders: list[Traversable] = []
    for i, arg in enumerate(args):
        flag, eq, value = arg.partition("=")
        if flag in CONFIG_DIR_FLAGS:
            folders.append(Path(value if eq else args[i + 1] if i + 1 < len(args) else ""))
    for o in overrides:
        if o.key_or_group == "hydra.searchpath" and isinstance(o.value(), list):
            folders += [f for f in map(_folder, map(str, o.value())) if f is not None]
    return folders


def help_groups() -> str:
    """The config groups and their options for `bnlab train --help` (${bnlab.help_groups:} in conf/train.yaml):
    bnlab's and the user's, from every folder of the search path, since Hydra's own list misses those of
    hydra.searchpath given on the command line."""
    builtin = ("hydra", "main", "schema")  # Hydra's own configs, bnlab's conf/ and the structured configs
    sources = [s for s in HydraConfig.get().runtime.config_sources if s.provider not in builtin]
    folders = [f for f in (_folder(f"{s.schema}://{s.path}") for s in sources) if f is not None]
    return "\n".join(f"{group}: {', '.join(group_options(group, folders))}" for group in sorted(GROUPS))


OmegaConf.register_new_resolver("bnlab.help_groups", help_groups, replace=True)


def check_overrides(args: list[str]) -> None:
    """Refuse an override naming an unknown group option or key (ConfigError). Appends (+key), deletions
    (~key), hydra.* keys, the keys of a dict (norm.kwargs.eps) and what does not parse are left to Hydra."""
    try:
        overrides = OverridesParser.create().parse_overrides([a for a in args if "=" in a and not a.startswith("-")])
    except Exception:
        return
    folders = user_folders(args, overrides)
    keys = [*GROUPS, *flatten(asdict(TrainConfig()))]
    for o in overrides:
        key = o.key_or_group
        if o.is_add() or o.is_force_add() or o.is_delete() or key.split(".")[0].split("/")[0] == "hydra":
            continue
        if ".kwargs." in key:  # norm.kwargs.eps: the keys of the user's own keyword arguments
            continue
        section = key.rpartition(".")[0]
        check_choice(key, key, [k for k in keys if k.rpartition(".")[0] == section] or keys, what="keys")
        if key in GROUPS and not isinstance(o.value(), Glob):
            for value in o.sweep_string_iterator() if o.is_sweep_override() else [str(o.value())]:
                check_choice(key, value, group_options(key, folders))
