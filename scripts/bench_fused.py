"""Fused runs vs the same runs one after another, both through bnlab's trainer: N seeds of the default
MNIST MLP (784-100-100-100-10, BN, batch 60, SGD) and of the default CNN (32-64 channels, BN), each run
with its own run directory, TensorBoard events and summary.json either way. Prints the wall time of
each side and the speed-up (target: >= 2x on CPU, >= 8x on a GPU), and the activation memory of one
training step (what autograd keeps for backward, parameters left out), one run against the fused group of N, whose
ratio must stay <= N. Not a test: the timings depend on the machine and on what else runs on it.

    python scripts/bench_fused.py                 # 8 seeds; 500 MLP steps, 50 CNN steps each
    python scripts/bench_fused.py 4 200 20        # 4 seeds; 200 MLP steps, 20 CNN steps each
    python scripts/bench_fused.py 8 2000 500 cuda # on the GPU

MNIST is read from the data root (~/.cache/bnlab/data or $BNLAB_DATA) when its files are there
(`bnlab data fetch mnist`); otherwise synthetic 28x28 images stand in (the timing does not depend on
the pixels).
"""

import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from bnlab.core.data import load_data
from bnlab.core.datafiles import file_report
from bnlab.run.engine import Single
from bnlab.run.fused.engine import Fused, activation_bytes
from bnlab.run.train import train, train_runs
from bnlab.schema.config import TrainConfig

MODELS = {"mlp (784-100-100-100-10, BN)": ["model=mlp"], "cnn (32-64, BN)": ["model=cnn"]}
DEFAULT_STEPS = [500, 50]  # per model above: the CNN is about 25x slower per step on CPU
DEVICE = torch.device(sys.argv[4] if len(sys.argv) > 4 else "cpu")


def configs(seeds: int, overrides: list[str], steps: int, data: list[str]) -> list[TrainConfig]:
    common = [
        *overrides,
        *data,
        f"trainer.max_steps={steps}",
        f"trainer.eval_every={steps}",
        "trainer.checkpoint_every=0",
        f"trainer.device={DEVICE.type}",
        f"trainer.threads={torch.get_num_threads()}",  # OMP_NUM_THREADS, or the cores
    ]
    with initialize_config_module("bnlab.conf", version_base="1.3"):
        return [OmegaConf.to_object(compose("train", overrides=[*common, f"seed={s}"])) for s in range(seeds)]


def main() -> None:
    seeds = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    steps = [int(a) for a in sys.argv[2:4]] + DEFAULT_STEPS[len(sys.argv[2:4]) :]
    mnist = all(
        status == "verified"
        for _, status in file_report("mnist", Path(configs(1, [], 1, [])[0].data.root).expanduser())
    )
    data = (
        ["data.download=false"]
        if mnist
        else ["data=synthetic", "data.num_train=60000", "data.num_test=10000", "data.image_size=28"]
    )
    where = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(
        f"{seeds} seeds, batch 60, SGD; data: {'MNIST' if mnist else 'synthetic 28x28'}; torch {torch.__version__}, "
        f"{DEVICE.type}: {where}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    for (name, overrides), n_steps in zip(MODELS.items(), steps):
        cfgs = configs(seeds, overrides, n_steps, data)
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            for cfg in cfgs:
                train(cfg, Path(tmp) / f"alone{cfg.seed}")
            t_seq = time.perf_counter() - start
            start = time.perf_counter()
            train_runs(cfgs, [Path(tmp) / f"fused{cfg.seed}" for cfg in cfgs])
            t_fused = time.perf_counter() - start
        dataset = load_data(cfgs[0].data, DEVICE)
        one, group = (
            activation_bytes(Single(cfgs[0], dataset, DEVICE, None, None)),
            activation_bytes(Fused(cfgs, dataset, DEVICE)),
        )
        print(
            f"{name}, {n_steps} steps: {seeds} runs one by one {t_seq:6.1f} s | fused {t_fused:6.1f} s | "
            f"speed-up {t_seq / t_fused:.2f}x | activation memory per step: one run {one / 2**20:.2f} MiB, "
            f"fused {group / 2**20:.2f} MiB = {group / one:.2f}x one run (limit {seeds}x)"
        )


if __name__ == "__main__":
    main()
