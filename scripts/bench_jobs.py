"""Per-job overhead of a sweep: what a job costs besides its training and evaluation steps (Hydra composing
its config, its run folder and .hydra/ files, its log, data, model and optimizer, TensorBoard writer,
checkpoint, summary.json, its console line, the sweep table's share).

Runs `bnlab train -m seed='range(N)'` (the default MNIST MLP, trainer.fuse=false, a few steps each) as a
user does, once with N = SMALL and once with N = LARGE jobs, each in a process of its own; the extra
jobs' wall time, less their time in the training loop (summary.json: steps / steps_per_s, the step-0
and final evaluations included), divided by their number, is the overhead per job (target < 0.25 s).
Prints every round and the median of the rounds. Not a test: the timings depend on the machine.

    python scripts/bench_jobs.py                # 2 and 22 jobs of 5 steps, 3 rounds
    python scripts/bench_jobs.py 2 42 5 5       # 2 and 42 jobs of 5 steps, 5 rounds
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

from bnlab.core.datafiles import file_report

SYNTHETIC = ["data=synthetic", "data.num_train=60000", "data.num_test=10000", "data.image_size=28"]


def sweep(jobs: int, steps: int, data: list[str], cwd: Path) -> tuple[float, float]:
    """Wall time of the sweep's process, and its runs' summed time in the training loop."""
    args = [
        *data,
        f"seed=range({jobs})",
        f"trainer.max_steps={steps}",
        f"trainer.eval_every={steps}",
        "trainer.fuse=false",
        "trainer.threads=1",  # steady loop times beside other work (the loop's time is taken out anyway)
        f"hydra.sweep.dir=sweep{jobs}",
    ]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "bnlab", "train", "-m", *args], cwd=cwd, capture_output=True)
    wall = time.perf_counter() - start
    if done.returncode:
        sys.exit(done.stderr.decode())
    summaries = [json.loads(p.read_text()) for p in (cwd / f"sweep{jobs}").glob("*/summary.json")]
    assert len(summaries) == jobs, f"{len(summaries)} of {jobs} runs wrote a summary"
    return wall, sum(s["steps"] / s["steps_per_s"] for s in summaries)


def main(small: int, large: int, steps: int, rounds: int) -> None:
    root = Path(os.environ.get("BNLAB_DATA", "~/.cache/bnlab/data")).expanduser()
    mnist = all(status == "verified" for _, status in file_report("mnist", root))
    data = ["data.download=false"] if mnist else SYNTHETIC
    print(
        f"{small} and {large} jobs of {steps} steps, data {'MNIST' if mnist else 'synthetic 28x28'}; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    overheads = []
    for r in range(rounds):
        with tempfile.TemporaryDirectory() as tmp:
            (wall_s, loop_s), (wall_l, loop_l) = (sweep(n, steps, data, Path(tmp)) for n in (small, large))
        extra = large - small
        per_job, loop = (wall_l - wall_s) / extra, (loop_l - loop_s) / extra
        overheads.append(per_job - loop)
        print(
            f"round {r + 1}: {small} jobs {wall_s:.1f} s, {large} jobs {wall_l:.1f} s: {per_job:.3f} s per extra job, "
            f"{loop:.3f} s of it in the training loop: overhead {per_job - loop:.3f} s per job "
            f"(load {os.getloadavg()[0]:.1f})"
        )
    print(f"overhead per job, median of {rounds} rounds: {statistics.median(overheads):.3f} s (target < 0.25 s)")


if __name__ == "__main__":
    main(*[int(a) for a in sys.argv[1:5]] + [2, 22, 5, 3][len(sys.argv[1:5]) :])
