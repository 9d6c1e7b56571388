"""The results suite in small: every preset of conf/experiment at a reduced, fixed size, run twice as a user
runs it (`bnlab train -m +experiment=NAME ...`, a process per preset and way): the plain way (every run alone,
one after another: trainer.fuse=false, each run with every core's thread) and with bnlab's best settings
(trainer.fuse=auto: the runs that differ only in keys each member may set train as fused groups;
hydra.launcher.n_jobs=<cores>: that many groups at once, a thread each; conv models channels_last on a CPU).

The reduced size: a D-th of each preset's trainer.max_steps (at least 1: ${bnlab.part:N,D}, so a budget that
scales with the batch size still does), every interval (trainer.eval_every, diag.every) as the preset sets
it, so that evaluations and diagnostics take the share of the time they take at full size, and the first K
of the seeds it sweeps (all by default). Each preset runs both ways back to back, in alternating order, so
that a busy moment of the machine hits both alike. Prints per preset the runs, both wall times, their ratio
and what fusing did, then the suite's totals and ratio (target >= 3), with the load average at each step.
Not a test: the timings depend on the machine.

    python scripts/bench_suite.py                            # a tenth of the steps, every seed
    python scripts/bench_suite.py --divide 20 --seeds 1      # a twentieth of the steps, the first seed
    python scripts/bench_suite.py --only lr_sensitivity,init_lr_grid
    python scripts/bench_suite.py --skip fair_baselines
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_module
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from bnlab.face.overrides import group_options

CONV_MODELS = ("cnn", "resnet")


def reduced(preset: str, divide: int, seeds: int) -> tuple[list[str], int, bool]:
    """The preset's overrides at the reduced size, its number of runs, and whether it trains a conv model."""
    with initialize_config_module("bnlab.conf", version_base="1.3"):
        cfg = compose("train", overrides=[f"+experiment={preset}"], return_hydra_config=True)
    raw = OmegaConf.to_container(cfg, resolve=False)
    overrides = [f"trainer.max_steps='${{bnlab.part:{raw['trainer']['max_steps']},{divide}}}'"]
    params = [f"{k}={v}" for k, v in (cfg.hydra.sweeper.get("params") or {}).items()]
    runs = 1
    for o in OverridesParser.create().parse_overrides(params):
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
        if o.key_or_group == "seed" and seeds:
            values = values[:seeds]
            overrides.append(f"seed={','.join(values)}")
        runs *= len(values)
    return overrides, runs, cfg.model.name in CONV_MODELS


def run(preset: str, overrides: list[str], cwd: Path) -> tuple[float, str]:
    """Wall time of the preset's sweep, and its trainer.fuse=auto line (if any)."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "bnlab", "train", "-m", f"+experiment={preset}", *overrides],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    wall = time.perf_counter() - start
    if done.returncode not in (0, 1):  # 1: a run failed, which the sweep's table counts
        sys.exit(f"{preset}: exit code {done.returncode}\n{done.stderr[-3000:]}")
    fused = next((line for line in done.stdout.splitlines() if line.startswith("trainer.fuse=auto")), "")
    return wall, fused.removeprefix("trainer.fuse=auto: ")


def load() -> str:
    return f"{os.getloadavg()[0]:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--divide", type=int, default=10, help="run a D-th of every step count (default 10)")
    parser.add_argument("--seeds", type=int, default=0, help="the first K seeds of a preset's seed sweep (0: all)")
    parser.add_argument("--only", default="", help="comma-separated presets (default: all)")
    parser.add_argument("--skip", default="", help="comma-separated presets to leave out")
    parser.add_argument("--device", default="cpu", help="trainer.device (default cpu)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="best way's hydra.launcher.n_jobs (the cores)")
    args = parser.parse_args()
    presets = args.only.split(",") if args.only else group_options("experiment")
    presets = [p for p in presets if p not in args.skip.split(",")]
    print(
        f"{len(presets)} presets at 1/{args.divide} of their steps, {args.seeds or 'all'} seed(s), "
        f"trainer.device={args.device}, best with {args.jobs} jobs at once; "
        f"load average {load()} on {os.cpu_count()} cores"
    )
    rows, totals = [], [0.0, 0.0]
    with tempfile.TemporaryDirectory() as tmp:
        for i, preset in enumerate(presets):
            common, runs, conv = reduced(preset, args.divide, args.seeds)
            common.append(f"trainer.device={args.device}")
            best = [
                "trainer.fuse=auto",
                f"hydra.launcher.n_jobs={args.jobs}",
                *(["trainer.channels_last=true"] if conv and args.device == "cpu" else []),
            ]
            ways = {"plain": [*common, "trainer.fuse=false"], "best": [*common, *best]}
            times, fused, loads = {}, "", [load()]
            for way in sorted(ways, reverse=i % 2 == 1):  # alternate which way goes first
                dir_ = f"hydra.sweep.dir={tmp}/{preset}-{way}"
                times[way], line = run(preset, [*ways[way], dir_], Path(tmp))
                fused = fused or line
                loads.append(load())
            totals[0], totals[1] = totals[0] + times["plain"], totals[1] + times["best"]
            ratio = times["plain"] / times["best"]
            rows.append((preset, runs, times["plain"], times["best"], ratio, " ".join(best), fused, "/".join(loads)))
            print(
                f"{preset:15s} {runs:4d} runs  plain {times['plain']:7.1f} s  best {times['best']:7.1f} s  "
                f"ratio {ratio:5.2f}  (load {'/'.join(loads)}; {fused or 'nothing fused'})",
                flush=True,
            )
    print(
        f"\nsuite: plain {totals[0]:.1f} s, best {totals[1]:.1f} s, ratio {totals[0] / totals[1]:.2f} (target >= 3); "
        f"load average {load()}"
    )
    print("\n| preset | runs | plain s | best s | ratio | best settings | fused | load |")
    print("|---|---|---|---|---|---|---|---|")
    for preset, runs, plain, best, ratio, settings, fused, loads in rows:
        print(f"| {preset} | {runs} | {plain:.1f} | {best:.1f} | {ratio:.2f} | {settings} | {fused or '-'} | {loads} |")


if __name__ == "__main__":
    main()
