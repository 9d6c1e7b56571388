"""The `bnlab` command: `train` (the Hydra app of bnlab/face/app.py), `resume`, `data fetch|list`,
`summarize`, `report`, `claims` and `tb`. Bad usage exits 2 with one paragraph (README, "When things go wrong")."""

from __future__ import annotations

import argparse
import os
import sys
from importlib.metadata import version
from pathlib import Path

from omegaconf import OmegaConf
from rich.table import Table

from bnlab.core.datafiles import FILES, DataError, fetch, file_report
from bnlab.face.interrupts import after_imports
from bnlab.face.overrides import (
    EXCLUDE_KEYS,
    PRINT_ONLY_FLAGS,
    RESUME,
    RUNS,
    SWEEPS,
    check_overrides,
    override_args,
    parse,
    quote,
    refuse,
    untrusted,
)
from bnlab.record import provenance
from bnlab.record.console import make_console, shell_path
from bnlab.record.summary import FILE, existing
from bnlab.run.job import OK, REFUSED
from bnlab.run.world import World, world
from bnlab.schema.config import BOOKKEEPING_KEYS, ConfigError, DataConfig
from hydra_plugins.bnlab_sweeper import TuneSweeperConf

LAUNCHER_KEYS = "hydra.launcher."  # what `bnlab resume` may change

# Each command imports what it needs when it runs: torch (seconds) only where a model trains.
console = make_console()


def train(args: list[str]) -> None:
    """`bnlab train ARGS`: the overrides checked, a resume without a folder pointed at its folder, then Hydra."""
    try:
        check_overrides(args)
        args = find_resumed_folder(args)
    except ConfigError as e:
        refuse(e)
    sys.argv = [f"{Path(sys.argv[0]).name} train", *args]
    print_only = PRINT_ONLY_FLAGS.intersection(args)  # --help, --cfg, ... print and exit: no torch for them
    if (launched := world()) and not print_only:  # one run on the processes torchrun or srun started
        joined_run(launched, args)
        return
    if not print_only:
        with after_imports():
            import bnlab.run.train  # noqa: F401  torch, once, now that the overrides passed their check
    from bnlab.face.app import train_app

    train_app()


def joined_run(launched: World, args: list[str]) -> None:
    """`bnlab train ARGS` on each of torchrun's or srun's processes: rank 0 is a single run (Hydra, its folder,
    its record) that the others join when it trains; they never start Hydra (bnlab.run.distributed)."""
    if "-m" in args or "--multirun" in args:
        if launched.rank:
            sys.exit(REFUSED)  # rank 0 says why
        refuse(
            f"`bnlab train -m` is not accepted on the {launched.size} processes that {launched.by} started: they "
            f"train one run together. Start a sweep once, not under {launched.by}; its runs can each train on "
            f"several processes with trainer.devices=N (one node), or run this command without -m."
        )
    with after_imports():
        from bnlab.run import distributed
    if launched.rank:
        distributed.follow(launched)  # exits
    from bnlab.face.app import train_app

    with distributed.leading(launched):
        train_app()


def _task_overrides(overrides: list[str]) -> list[str]:
    """Overrides that name what a run trains: not hydra.* ones, not bookkeeping keys, sorted."""
    keys = [o.split("=")[0].lstrip("+~") for o in overrides]
    return sorted(o for o, k in zip(overrides, keys) if k not in BOOKKEEPING_KEYS and not k.startswith("hydra"))


def find_resumed_folder(args: list[str]) -> list[str]:
    """With trainer.resume=true and no run or sweep folder named, the newest folder below outputs/ that was
    started with these overrides, added as hydra.run.dir (or hydra.sweep.dir); the arguments as they
    are when there is none, so the run starts from the beginning."""
    overrides = override_args(args)
    resume = any(o.key_or_group == "trainer.resume" and o.value() is True for o in parse(args))
    named = any(o.split("=")[0] in ("hydra.run.dir", "hydra.sweep.dir") for o in overrides)
    if not resume or named:
        return args
    multirun = "-m" in args or "--multirun" in args
    mine = _task_overrides(overrides)
    if multirun:
        found = (p.parent for p in sorted(SWEEPS.glob("*/multirun.yaml"), reverse=True) if _started_with(p, mine))
    else:
        found = (
            p.parents[1] for p in sorted(RUNS.glob("*/*/.hydra/overrides.yaml"), reverse=True) if _started_with(p, mine)
        )
    folder = next(found, None)
    if folder is None:
        console.print(
            f"trainer.resume=true: no earlier {'sweep' if multirun else 'run'} with these overrides below "
            f"{SWEEPS if multirun else RUNS}; starting from the beginning",
            soft_wrap=True,
        )
        return args
    console.print(f"trainer.resume=true: continuing {shell_path(folder)}", soft_wrap=True)
    return [*args, f"hydra.{'sweep' if multirun else 'run'}.dir={quote(str(folder))}"]


def _started_with(path: Path, overrides: list[str]) -> bool:
    saved = OmegaConf.load(path)
    task = saved.hydra.overrides.task if path.name == "multirun.yaml" else saved
    return _task_overrides(list(task)) == overrides


def resume(folder: Path, trust: bool = False, launcher: list[str] | None = None) -> None:
    """`bnlab resume DIR [hydra.launcher.KEY=VALUE ...]`: continue a run folder, or every run of a sweep folder
    that has not completed, in place, with the overrides it was started with (those that name code to run only
    with `trust`) and the launcher's settings changed as given (a SLURM job's time limit, its partition)."""
    launcher = launcher or []
    if wrong := [o for o in launcher if not o.startswith(LAUNCHER_KEYS)]:
        refuse(
            f"bnlab resume {shell_path(folder)} does not accept {wrong[0]!r}: a run resumes with the config it was "
            f"started with; accepted values: the launcher's settings, {LAUNCHER_KEYS}KEY=VALUE (for example "
            f"{LAUNCHER_KEYS}timeout_min=240 or {LAUNCHER_KEYS}partition=NAME)."
        )
    provenance.invoked = ["bnlab", "resume", str(folder), *launcher]
    if (folder / "multirun.yaml").is_file():
        from bnlab.face.hydra_private import expand_sweep, sweeper_params

        saved = OmegaConf.load(folder / "multirun.yaml")
        task = [o for o in saved.hydra.overrides.task if not o.startswith("trainer.resume=")]
        made = ("hydra.sweep.dir", "hydra.mode", EXCLUDE_KEYS, *(o.split("=")[0] for o in launcher))  # set anew
        keep = [o for o in saved.hydra.overrides.hydra if o.split("=")[0] not in made]
        params = sweeper_params(saved)
        check_trust(folder, [*params, *task, *keep], trust)
        if saved.hydra.sweeper.get("_target_") == TuneSweeperConf._target_:  # its studies know what is left
            console.print(f"resuming the tuning sweep {shell_path(folder)}: its finished trials are kept")
            train(["-m", *task, *keep, *launcher, RESUME, f"hydra.sweep.dir={quote(str(folder))}"])
            return
        jobs = expand_sweep([*params, *task])
        done = sum(s.status.done for p in folder.glob(f"*/{FILE}") if (s := existing(p)))
        if done >= len(jobs):
            console.print(f"nothing to resume: all {len(jobs)} runs of {shell_path(folder)} completed")
            sys.exit(OK)
        console.print(f"resuming {shell_path(folder)}: {len(jobs) - done} of its {len(jobs)} runs have not completed")
        train(["-m", *task, *keep, *launcher, RESUME, f"hydra.sweep.dir={quote(str(folder))}"])
    elif (folder / ".hydra" / "overrides.yaml").is_file():
        if (summary := existing(folder / FILE)) and summary.status.done:
            console.print(f"nothing to resume: {shell_path(folder)} completed its {summary.steps} steps")
            sys.exit(OK)
        task = [o for o in OmegaConf.load(folder / ".hydra" / "overrides.yaml") if not o.startswith("trainer.resume=")]
        check_trust(folder, task, trust)
        train([*task, *launcher, RESUME, f"hydra.run.dir={quote(str(folder))}"])
    else:
        refuse(
            f"{folder} is neither a run folder (it would hold .hydra/overrides.yaml) nor a sweep folder "
            "(multirun.yaml) of `bnlab train`; give the folder that the interrupted run or sweep printed."
        )


def check_trust(folder: Path, overrides: list[str], trust: bool) -> None:
    """Refuse to replay overrides that run code unless the user trusts the folder."""
    if (named := untrusted(overrides)) and not trust:
        refuse(
            f"{folder} was started with overrides that name code to run: {', '.join(named)}. bnlab resume "
            f"replays a folder's overrides, so a folder made by someone else could run anything. If you made "
            f"it, resume it with `bnlab resume {shell_path(folder)} --trust`."
        )


def existing_folder(arg: str) -> Path:
    """An argument that must name an existing folder (argparse refuses it otherwise, exit 2)."""
    if not Path(arg).is_dir():
        raise argparse.ArgumentTypeError(f"{arg} is not a folder")
    return Path(arg)


def data_root(arg: str | None) -> Path:
    return Path(arg or OmegaConf.structured(DataConfig).root).expanduser()


def data_list(root: Path) -> None:
    table = Table(title=f"datasets under {root}")
    for col in ("dataset", "file", "status"):
        table.add_column(col, overflow="fold")
    for name in FILES:
        for path, status in file_report(name, root):
            table.add_row(name, str(path.relative_to(root)), status)
    console.print(table)


def dashboard_url(tensorboard_args: list[str]) -> str:
    """Where TensorBoard serves with these arguments: --host and --port as given, else its defaults."""
    given = dict(zip(tensorboard_args, tensorboard_args[1:]))
    given.update(a.split("=", 1) for a in tensorboard_args if a.startswith("--") and "=" in a)
    return f"http://{given.get('--host', 'localhost')}:{given.get('--port', '6006')}/"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bnlab", description="Batch normalization vs no normalization experiments.")
    p.add_argument("--version", action="version", version=f"bnlab {version('bnlab')}")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("train", help="train one model, or a sweep with -m (a Hydra app: bnlab train --help)")
    res = sub.add_parser("resume", help="continue an interrupted run, or the unfinished runs of a sweep, in place")
    res.add_argument("dir", type=existing_folder, help="the run folder or sweep folder")
    res.add_argument("--trust", action="store_true", help="replay its overrides that name code (a folder you made)")
    res.add_argument(
        "launcher", nargs="*", metavar="hydra.launcher.KEY=VALUE", help="the launcher's settings changed (time limit)"
    )
    data = sub.add_parser("data", help="fetch and check the datasets").add_subparsers(dest="action", required=True)
    fetch_p = data.add_parser("fetch", help="download or copy a dataset into the data root and verify it")
    fetch_p.add_argument("name", choices=list(FILES))
    list_p = data.add_parser("list", help="show which dataset files are present and verified")
    for q in (fetch_p, list_p):
        q.add_argument("--root", help="data root (default: $BNLAB_DATA or ~/.cache/bnlab/data)")
    summ = sub.add_parser("summarize", help="the table of the runs below a sweep folder; two folders: side by side")
    summ.add_argument("dirs", nargs="+", type=existing_folder)
    report = sub.add_parser("report", help="figures (PNG) and report.md for a sweep or folder of runs, written into it")
    report.add_argument("dir", type=existing_folder)
    for q in (summ, report):
        q.add_argument("--failed", action="store_true", help="show failed runs too (left out by default)")
        q.add_argument("--out", type=Path, help="write the files into this folder (default: the sweep's own)")
    claims = sub.add_parser("claims", help="the claims ledger: each claim about BN, bnlab's verdict and its numbers")
    claims.add_argument(
        "words", nargs="*", metavar="NAME | check NAME", help="one claim in detail; check: re-run it small, decide anew"
    )
    claims.add_argument("--json", action="store_true", help="print JSON (for scripts)")
    claims.add_argument("--scale", type=float, default=0.25, help="check: the recorded step budget's factor")
    claims.add_argument("--results", type=Path, help="the recorded results (default: docs/results of the checkout)")
    tb = sub.add_parser("tb", help="open TensorBoard on a folder of runs (tensorboard --logdir DIR ...)")
    tb.add_argument("dir", type=existing_folder)
    tb.add_argument("tensorboard_args", nargs=argparse.REMAINDER, help="passed on to tensorboard, e.g. --port 6007")
    return p


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:  # -v: every job's whole config and every log line (Hydra's own hydra.verbose)
        train([a if a not in ("-v", "--verbose") else "hydra.verbose=bnlab" for a in argv[1:]])
        return
    args = parser().parse_args(argv)
    if args.command == "resume":
        resume(args.dir, args.trust, args.launcher)
    elif args.command == "data" and args.action == "fetch":
        try:
            fetch(args.name, data_root(args.root), log=console.print)
        except DataError as e:
            refuse(e)
    elif args.command == "data":
        data_list(data_root(args.root))
    elif args.command == "summarize" and len(args.dirs) == 1:
        from bnlab.results.summarize import summarize

        if summarize(args.dirs[0], console, include_failed=args.failed, out=args.out) is None:
            refuse(f"{args.dirs[0]} holds no run (no summary.json of a run below it)")
    elif args.command == "summarize":
        from bnlab.results.summarize import compare

        compare(args.dirs, console, include_failed=args.failed)
    elif args.command == "report":
        from bnlab.results.report import write_report

        try:
            console.print(f"report: {write_report(args.dir, include_failed=args.failed, out=args.out)}")
        except OSError as e:  # a read-only sweep, say
            refuse(f"{e}: the report cannot be written there; give another folder with --out DIR")
    elif args.command == "claims":
        from bnlab.face.claims import claims

        sys.exit(claims(console, args.words, args.results, args.scale, args.json))
    elif args.command == "tb":
        from bnlab.results.dashboard import QUERY, write_dashboard

        write_dashboard(args.dir)
        console.print(f"open {dashboard_url(args.tensorboard_args)}{QUERY} (no smoothing, runs coloured by norm)")
        os.execv(
            sys.executable,
            [sys.executable, "-m", "tensorboard.main", "--logdir", str(args.dir), *args.tensorboard_args],
        )
