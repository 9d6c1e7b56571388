"""The command line of `bnlab train`, checked before Hydra sees it: every override must parse, name a
known key or config group option ("Did you mean 'batch'?", which Hydra's own message does not offer)
and carry a value of the key's type; a launcher must be usable on this machine. Each refusal is a
ConfigError of one paragraph with a hint. A group's options are its YAML files in every config folder
the command composes from: bnlab's conf/ and the user's (`--config-dir DIR`, `hydra.searchpath=[file://DIR]`).
Also how bnlab writes a value into an override (quoting)."""

from __future__ import annotations

import copy
import os
import re
import shutil
import sys
from dataclasses import asdict
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Glob, IntervalSweep, Override
from hydra.errors import OverrideParseException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from rich.console import Console

from bnlab.run.job import REFUSED
from bnlab.schema.config import ConfigError, TrainConfig, check_choice, flatten
from hydra_plugins.bnlab_launcher import BnlabLauncher, n_jobs_error

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

_CONF = files("bnlab.conf")


def _conf(*path: str) -> dict[str, Any]:
    """A YAML file of conf/ as written, its interpolations unresolved."""
    return yaml.safe_load(_CONF.joinpath(*path).read_text())


def _unique_folder(entry: str) -> Path:
    """The folder conf/train.yaml's hydra.run.dir or hydra.sweep.dir claims its time-stamped folders in:
    ${bnlab.unique:outputs/runs/${now:...}}/... -> outputs/runs."""
    return Path(_conf("train.yaml")["hydra"][entry]["dir"].split(":", 1)[1].split("/${now:")[0])


# the config groups: one folder each under conf/, but hydra/ (Hydra's own: the launcher, the job logging)
GROUPS = tuple(sorted(p.name for p in _CONF.iterdir() if p.is_dir() and p.name != "hydra" and p.name[0] not in "_."))
RUNS, SWEEPS = _unique_folder("run"), _unique_folder("sweep")  # below the working directory
CONFIG_DIR_FLAGS = ("--config-dir", "-cd")
# Hydra's own flags that take a value (the next argument), which is no override
VALUED_FLAGS = {"--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--cfg", "-c", "--package", "-p"}
PRINT_ONLY_FLAGS = {"--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--shell-completion", "-sc"}
INFO_TOPICS = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}  # --info [TOPIC]
SLURM_LAUNCHERS = {"slurm", "submitit_slurm"}
RESUME = "trainer.resume=true"  # the override that continues a run from its folder
EXCLUDE_KEYS = "hydra.job.config.override_dirname.exclude_keys"  # keys left out of a run folder's name
FUSING_LAUNCHER = f"{BnlabLauncher.__module__}.{BnlabLauncher.__name__}"  # bnlab's own launcher
SCHEMA = OmegaConf.structured(TrainConfig)
DEFAULTS = asdict(TrainConfig())


def group_options(group: str, folders: list[Traversable] | None = None) -> list[str]:
    """The options of a config group: the YAML files in its folder of bnlab's conf/ and of `folders`."""
    options = set()
    for folder in [_CONF, *(folders or [])]:
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


def refuse(error: Exception | str) -> NoReturn:
    """Bad input or usage: one paragraph on stderr and exit 2 (README "When things go wrong"); an error's
    traceback instead with HYDRA_FULL_ERROR=1."""
    if isinstance(error, Exception) and os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise error
    Console(stderr=True, soft_wrap=True).print(f"[red]error:[/] {error}", highlight=False)
    sys.exit(REFUSED)


def quote(value: str) -> str:
    """`value` as one quoted override value, so that '=', ',' and spaces in it (run folders have them)
    are read as part of it: hydra.run.dir='outputs/runs/.../norm=batch,optim.lr=0.1'."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def override_args(args: list[str]) -> list[str]:
    """The overrides among the command-line arguments: not the flags (-m, --cfg job, ...) nor their values."""
    out, skip = [], False
    for i, a in enumerate(args):
        if skip:
            skip = False
        elif a.startswith("-"):
            skip = a in VALUED_FLAGS or (a in ("--info", "-i") and i + 1 < len(args) and args[i + 1] in INFO_TOPICS)
        else:
            out.append(a)
    return out


def parse(args: list[str]) -> list[Override]:
    """The overrides among `args`, parsed; a line Hydra's grammar cannot read is refused with a hint."""
    parser = OverridesParser.create()
    parsed = []
    for a in override_args(args):
        try:
            parsed += parser.parse_overrides([a])
        except OverrideParseException as e:
            raise ConfigError(_grammar_error(a, e.message.splitlines()[0])) from e
    return parsed


def _grammar_error(arg: str, reason: str) -> str:
    if "=" not in arg:
        hint = (
            f"'{arg}' is not an override (key=value): if it belongs to the argument before it, remove the space "
            "between them (a sweep is written optim.lr=0.01,0.1, without spaces)"
        )
    elif arg.rstrip().endswith(","):
        hint = "a sweep is written without spaces, optim.lr=0.01,0.1: remove the space after the comma"
    else:
        key, _, value = arg.partition("=")
        hint = (
            f"a value that holds '=', ',' or spaces must be quoted, as in \"{key}={quote(value)}\" "
            "(and `bnlab resume DIR` continues a run folder without any quoting)"
        )
    return f"cannot read the override {arg!r} ({reason}); {hint}."


def check_overrides(args: list[str]) -> None:
    """Refuse (ConfigError) an override that does not parse, names an unknown key or group option, or
    gives a key a value of the wrong type; and a SLURM launcher where SLURM is not installed."""
    keys = [*GROUPS, *flatten(DEFAULTS)]
    overrides = parse(args)
    folders = user_folders(args, overrides)
    for o in overrides:
        key = o.key_or_group
        if key.split(".")[0].split("/")[0] == "hydra":
            _check_launcher(o, multirun="-m" in args or "--multirun" in args)
            continue
        if o.is_delete() or (o.is_add() and key not in GROUPS) or ".kwargs." in key:
            continue  # Hydra refuses what these get wrong; norm.kwargs.eps: the user's own keyword arguments
        section = key.rpartition(".")[0]
        check_choice(key, key, [k for k in keys if k.rpartition(".")[0] == section] or keys, what="keys")
        if key in GROUPS:
            if not isinstance(o.value(), Glob):
                for value in _values(o):
                    check_choice(key if not o.is_add() else f"+{key}", str(value), group_options(key, folders))
        else:
            for value in _values(o):
                _check_type(key, value)


def _values(o: Override) -> list[Any]:
    """The values an override gives its key: a sweep's, or an interval's ends (the tuning sweeper searches it)."""
    if isinstance(o.value(), IntervalSweep):
        return [o.value().start, o.value().end]
    return list(o.sweep_iterator()) if o.is_sweep_override() else [o.value()]


def _check_type(key: str, value: Any) -> None:
    """Refuse a value the key's type does not take (Hydra's own message would be a validation trace)."""
    try:
        OmegaConf.update(copy.deepcopy(SCHEMA), key, value, merge=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{key}={value!r} is not accepted; accepted values: {_kind(key)}.") from e


def _kind(key: str) -> str:
    default: Any = DEFAULTS
    for part in key.split("."):
        default = default[part]
    if isinstance(default, bool):
        return "true or false"
    if isinstance(default, int):
        return "an integer"
    if isinstance(default, float):
        return "a number"
    if isinstance(default, list):
        example = ",".join(map(str, default or [0.9, 0.95]))
        return f"a list in brackets, e.g. {key}=[{example}]"
    return "a string"


def _check_launcher(o: Override, multirun: bool) -> None:
    value = o.value()
    if o.key_or_group == "hydra.launcher.n_jobs" and n_jobs_error(value):
        raise ConfigError(n_jobs_error(value))
    if (
        o.key_or_group == "hydra/launcher"
        and multirun
        and str(o.value()) in SLURM_LAUNCHERS
        and not shutil.which("sbatch")
    ):
        raise ConfigError(
            f"hydra/launcher={o.value()} submits each job to a SLURM cluster with sbatch, which is not on this "
            "machine's PATH: run the sweep from the cluster's login node, or choose a launcher that runs here "
            "(the default, hydra/launcher=joblib or hydra/launcher=submitit_local)."
        )


# Overrides that name code to run: Hydra callbacks, any _target_, bnlab's custom norm, model and data (called
# with their kwargs). A folder's saved overrides are replayed by resume only with --trust.
RUNS_CODE = re.compile(r"^[+~]*(hydra\.callbacks|.*\b_target_\b|(norm|model|data)\.(target|kwargs))")


def untrusted(overrides: list[str]) -> list[str]:
    """Those of a folder's saved overrides that would run code named in the folder."""
    return [o for o in overrides if RUNS_CODE.match(o)]
