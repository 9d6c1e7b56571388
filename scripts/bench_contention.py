"""How bnlab's default run keeps its speed when the machine is not its own: the default `bnlab train` MLP run
(MNIST, 3,000 steps, evaluation off) alone, two such runs started together, and one beside a busy process
(`yes > /dev/null`), each with trainer.threads=auto (the default) and with the reference settings
trainer.threads=1 and trainer.threads=2 (the default before auto) with OpenMP's idle threads passive (bnlab's
default) or spinning (OMP_WAIT_POLICY=ACTIVE, torch's default). Then the README's main job, `bnlab train -m
norm=none,batch`, quiet and beside a busy process, by its wall time.

Every figure is the median of ROUNDS interleaved rounds (every setting once per round, so a busy moment of
the machine hits them alike); speeds are the runs' own steps/s (summary.json), ratios against the same
setting alone in the same run of this script. Not a test: the numbers depend on the machine;
docs/performance.md has them with the machine, the load and the date.

    python scripts/bench_contention.py              # the runs and the main job
    python scripts/bench_contention.py --runs       # the runs only
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BNLAB = [sys.executable, "-m", "bnlab", "train"]
RUN = ["trainer.max_steps=3000", "trainer.eval_every=100000", "trainer.checkpoint_every=0"]
SETTINGS = {  # name -> (overrides, environment)
    "auto": ([], {}),
    "threads=1": (["trainer.threads=1"], {}),
    "threads=2": (["trainer.threads=2"], {}),
    "threads=2, spinning": (["trainer.threads=2"], {"OMP_WAIT_POLICY": "ACTIVE"}),
}
ROUNDS = 3
SLOW_STEPS = 500  # a 2-thread run beside busy work may run at 10 steps/s: fewer steps keep the script short


def start(folder: Path, overrides: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [*BNLAB, *overrides, f"hydra.run.dir={folder}"],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def speeds(root: Path, overrides: list[str], env: dict[str, str], together: int) -> list[float]:
    """steps/s of `together` runs started at once."""
    folders = [Path(tempfile.mkdtemp(dir=root)) / "run" for _ in range(together)]
    for p in [start(f, overrides, env) for f in folders]:
        p.wait()
    return [json.loads((f / "summary.json").read_text())["steps_per_s"] for f in folders]


def busy() -> subprocess.Popen:
    return subprocess.Popen(["yes"], stdout=subprocess.DEVNULL)


def runs(root: Path) -> None:
    alone, pair, beside = {s: [] for s in SETTINGS}, {s: [] for s in SETTINGS}, {s: [] for s in SETTINGS}
    for r in range(ROUNDS):
        for name, (overrides, env) in SETTINGS.items():
            overrides = [*RUN, *overrides]
            slow = [f"trainer.max_steps={SLOW_STEPS}"] if "2" in name else []
            alone[name] += speeds(root, overrides, env, 1)
            pair[name] += speeds(root, [*overrides, *slow], env, 2)
            hog = busy()
            try:
                beside[name] += speeds(root, [*overrides, *slow], env, 1)
            finally:
                hog.kill()
        print(f"round {r + 1} of {ROUNDS} done, load average {os.getloadavg()[0]:.2f}", flush=True)
    reference = statistics.median(alone["threads=1"])
    print(f"\n{'setting':<20} | alone steps/s | vs threads=1 alone | two together: each | beside a busy process")
    for name in SETTINGS:
        a = statistics.median(alone[name])
        p = statistics.median(pair[name]) / a
        b = statistics.median(beside[name]) / a
        print(f"{name:<20} | {a:13.1f} | {a / reference:18.2f} | {p:17.2f}x | {b:20.2f}x")


def main_job(root: Path) -> None:
    quiet, loaded = [], []
    for r in range(ROUNDS):
        for times in (quiet, loaded):
            hog = busy() if times is loaded else None
            start_time = time.perf_counter()
            done = subprocess.run(
                [*BNLAB, "-m", "norm=none,batch", f"hydra.sweep.dir={tempfile.mkdtemp(dir=root)}/sweep"],
                capture_output=True,
            )
            times.append(time.perf_counter() - start_time)
            if hog:
                hog.kill()
            assert done.returncode == 0, done.stderr.decode()[-2000:]
        print(f"main job round {r + 1}: quiet {quiet[-1]:.1f} s, beside a busy process {loaded[-1]:.1f} s", flush=True)
    q, b = statistics.median(quiet), statistics.median(loaded)
    print(
        f"\nmain job (bnlab train -m norm=none,batch): quiet {q:.1f} s, beside a busy process {b:.1f} s: {b / q:.2f}x"
    )


def main() -> None:
    print(f"load average {os.getloadavg()}, {len(os.sched_getaffinity(0))} cores")
    with tempfile.TemporaryDirectory() as tmp:
        runs(Path(tmp))
        if "--runs" not in sys.argv:
            main_job(Path(tmp))
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
