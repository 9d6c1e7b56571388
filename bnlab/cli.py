"""The `bnlab` command: `train` (the Hydra app of bnlab/app.py), `data fetch|list`, `summarize`, `report`
and `tb`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from hydra.core.plugins import Plugins
from hydra_plugins.bnlab_launcher import BnlabLauncher
from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

from bnlab.app import console, train_app
from bnlab.config import ConfigError, DataConfig
from bnlab.data import DATASETS, DataError, fetch, file_report
from bnlab.overrides import check_overrides
from bnlab.report import write_report
from bnlab.summarize import compare, summarize

# Hydra finds plugins by walking the hydra_plugins package, which misses those of an editable install
# (pip install -e); registering it here finds it either way. Not in the plugin's module: Hydra's walk runs that.
Plugins.instance().register(BnlabLauncher)


def data_root(arg: str | None) -> Path:
    return Path(arg or OmegaConf.structured(DataConfig).root).expanduser()


def data_list(root: Path) -> None:
    table = Table(title=f"datasets under {root}")
    for col in ("dataset", "file", "status"):
        table.add_column(col, overflow="fold")
    for name in DATASETS:
        for path, status in file_report(name, root):
            table.add_row(name, str(path.relative_to(root)), status)
    console.print(table)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        try:
            check_overrides(argv[1:])
        except ConfigError as e:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            Console(stderr=True).print(f"[red]error:[/] {e}")
            sys.exit(2)
        sys.argv = [f"{Path(sys.argv[0]).name} train", *argv[1:]]
        train_app()
        return
    parser = argparse.ArgumentParser(prog="bnlab", description="Batch normalization vs no normalization experiments.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("train", help="train one model, or a sweep with -m (a Hydra app: bnlab train --help)")
    data = sub.add_parser("data", help="fetch and check the datasets").add_subparsers(dest="action", required=True)
    fetch_p = data.add_parser("fetch", help="download or copy a dataset into the data root and verify it")
    fetch_p.add_argument("name", choices=[n for n, spec in DATASETS.items() if spec.md5])
    list_p = data.add_parser("list", help="show which dataset files are present and verified")
    for p in (fetch_p, list_p):
        p.add_argument("--root", help="data root (default: $BNLAB_DATA or ~/.cache/bnlab/data)")
    summ = sub.add_parser("summarize", help="the table of the runs below a sweep folder; two folders: side by side")
    summ.add_argument("dirs", nargs="+", type=Path)
    report = sub.add_parser("report", help="figures (PNG) and report.md for a sweep or folder of runs, written into it")
    report.add_argument("dir", type=Path)
    tb = sub.add_parser("tb", help="open TensorBoard on a folder of runs (tensorboard --logdir DIR ...)")
    tb.add_argument("dir", type=Path)
    tb.add_argument("tensorboard_args", nargs=argparse.REMAINDER, help="passed on to tensorboard, e.g. --port 6007")
    args = parser.parse_args(argv)

    if args.command == "data" and args.action == "fetch":
        try:
            fetch(args.name, data_root(args.root), log=console.print)
        except DataError as e:
            console.print(f"[red]error:[/] {e}")
            sys.exit(2)
    elif args.command == "data":
        data_list(data_root(args.root))
    elif args.command == "summarize" and len(args.dirs) == 1:
        summarize(args.dirs[0], console)
    elif args.command == "summarize":
        compare(args.dirs, console)
    elif args.command == "report":
        console.print(f"report: {write_report(args.dir)}")
    elif args.command == "tb":
        os.execv(
            sys.executable,
            [sys.executable, "-m", "tensorboard.main", "--logdir", str(args.dir), *args.tensorboard_args],
        )
