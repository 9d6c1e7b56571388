"""Where a second torch thread starts to pay off on this CPU: steps/s of bnlab's training step at 1 and at
2 threads for models from the MNIST MLP to a ResNet, with each step's FLOPs (bnlab.run.engine.step_flops), on a
quiet machine and beside one busy process. bnlab/run/threads.py's MIN_FLOPS_PER_THREAD comes from this table:
a run gets its second thread only where the step has the work to gain from it on a quiet machine and to
lose little beside a busy process.

Each measurement is the median of ROUNDS interleaved rounds (1 and 2 threads alternate, so a busy moment
of the machine hits both alike), of STEP_SECONDS of steps after a warm-up. Not a test: the numbers depend
on the machine; docs/performance.md has them with the machine and the date.

    python scripts/bench_threads.py            # quiet and beside one `yes > /dev/null`
    python scripts/bench_threads.py --quiet    # quiet only
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as bnlab sets it before torch loads

import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from bnlab.run.engine import Single, prepare, step_flops
from bnlab.schema.config import TrainConfig

BASE = ["data=synthetic", "data.num_train=4096", "data.num_test=256", "trainer.device=cpu", "trainer.threads=1"]
CASES = {  # name -> overrides
    "MLP 100x3, batch 60 (the main job)": [],
    "MLP 100x3, batch 256": ["data.batch_size=256"],
    "MLP 1000x3, batch 60": ["model.widths=[1000,1000,1000]"],
    "MLP 1000x3, batch 256": ["model.widths=[1000,1000,1000]", "data.batch_size=256"],
    "MLP 2000x3, batch 512": ["model.widths=[2000,2000,2000]", "data.batch_size=512"],
    "CNN 16-32-64, batch 16": ["model=cnn", "data.batch_size=16"],
    "CNN 16-32-64, batch 64": ["model=cnn", "data.batch_size=64"],
    "CNN 16-32-64, batch 256": ["model=cnn", "data.batch_size=256"],
    "ResNet-20 8-16-32, batch 64": ["model=resnet", "model.blocks=3", "model.widths=[8,16,32]", "data.batch_size=64"],
    "ResNet 32-64-128, batch 128": ["model=resnet", "model.widths=[32,64,128]", "data.batch_size=128"],
}
ROUNDS = 3
STEP_SECONDS = 1.5


def config(overrides: list[str]) -> TrainConfig:
    with initialize_config_module("bnlab.conf", version_base="1.3"):
        return OmegaConf.to_object(compose("train", overrides=[*BASE, *overrides]))


def steps_per_s(engine: Single, threads: int) -> float:
    """Steps per second of the engine's step at `threads` threads, timed over about STEP_SECONDS."""
    torch.set_num_threads(threads)
    for step in range(1, 4):  # warm-up: allocator, kernels (steps count from 1)
        engine.step(step)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < STEP_SECONDS:
        n += 1
        engine.step(n)
    return n / (time.perf_counter() - start)


def measure(label: str) -> list[tuple[str, float, float, float]]:
    rows = []
    for name, overrides in CASES.items():
        cfg = config(overrides)
        _, data = prepare(cfg)
        engine = Single(cfg, data, torch.device("cpu"), None, None)
        speeds: dict[int, list[float]] = {1: [], 2: []}
        for _ in range(ROUNDS):
            for threads in (1, 2):
                speeds[threads].append(steps_per_s(engine, threads))
        one, two = statistics.median(speeds[1]), statistics.median(speeds[2])
        rows.append((name, step_flops(cfg), one, two))
        print(f"{label:>6} | {name:<36} | {step_flops(cfg) / 1e9:8.3f} | {one:9.1f} | {two:9.1f} | {two / one:5.2f}")
    return rows


def main() -> None:
    print(f"load average {os.getloadavg()}, {len(os.sched_getaffinity(0))} cores, torch {torch.__version__}")
    print(f"{'':>6} | {'model, batch':<36} | GFLOP/step | 1 thread | 2 threads | 2 / 1 (steps/s, medians)")
    measure("quiet")
    if "--quiet" not in sys.argv:
        hog = subprocess.Popen(["yes"], stdout=subprocess.DEVNULL)
        try:
            measure("busy")
        finally:
            hog.kill()
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
