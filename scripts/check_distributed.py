"""A run over 2 processes against one process, on CPU (gloo) or on 2 GPUs (nccl): prints the largest
differences of every logged scalar, the final metrics and the final weights, in float64.

  (1) trainer.devices=2 norm=sync_batch  vs  trainer.devices=1 norm=batch             (expected: all ~1e-12)
  (2) trainer.devices=2 norm=batch trainer.sync_buffers=average
                                         vs  norm=ghost_batch norm.virtual_batch_size=B/2   (expected: all ~1e-12)
  (3) as (2) with trainer.sync_buffers=broadcast: parameters and training scalars ~1e-12, running statistics
      and eval-mode test metrics differ (rank 0's statistics vs the mean over the virtual batches)

tests/test_distributed.py holds (1) to (3) to 1e-9 on CPU; this script is how to see the same on GPUs:

    python scripts/check_distributed.py          # CPU, 2 gloo processes
    python scripts/check_distributed.py cuda     # 2 GPUs, nccl: torch.nn.SyncBatchNorm for (1)
"""

import json
import sys
import tempfile
from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bnlab.run.checkpoint import CHECKPOINT
from bnlab.run.train import train

DEVICE = sys.argv[1] if len(sys.argv) > 1 else "cpu"
COMMON = [
    "data=synthetic",
    "data.batch_size=32",
    "model=cnn",
    "model.widths=[8,16]",
    f"trainer.device={DEVICE}",
    "trainer.precision=fp64",
    "trainer.max_steps=50",
    "trainer.eval_every=10",
    "trainer.log_every=1",
    "trainer.precise_bn=5",
    "optim.lr=0.1",
    "optim.momentum=0.9",
]
PAIRS = {
    "(1) sync_batch on 2 vs batch on 1": (["norm=sync_batch", "trainer.devices=2"], ["norm=batch"]),
    "(2) batch on 2, average vs ghost_batch on 1": (
        ["norm=batch", "trainer.devices=2", "trainer.sync_buffers=average"],
        ["norm=ghost_batch", "norm.virtual_batch_size=16"],
    ),
    "(3) batch on 2, broadcast vs ghost_batch on 1": (
        ["norm=batch", "trainer.devices=2", "trainer.sync_buffers=broadcast"],
        ["norm=ghost_batch", "norm.virtual_batch_size=16"],
    ),
}


def run(overrides: list[str], run_dir: Path) -> Path:
    with initialize_config_module("bnlab.conf", version_base="1.3"):
        cfg = OmegaConf.to_object(compose("train", overrides=[*COMMON, *overrides]))
    assert train(cfg, run_dir).status == "completed"
    return run_dir


def largest(a: dict, b: dict) -> float:
    return max((abs(a[k] - b[k]) for k in a if a[k] is not None), default=0.0)


def differences(a: Path, b: Path) -> dict[str, float]:
    out = {}
    acc_a, acc_b = EventAccumulator(str(a)), EventAccumulator(str(b))
    acc_a.Reload()
    acc_b.Reload()
    for tag in ("train/loss", "train/acc", "test/loss", "test/acc"):
        out[tag] = max(abs(x.value - y.value) for x, y in zip(acc_a.Scalars(tag), acc_b.Scalars(tag)))
    fa, fb = (json.loads((d / "summary.json").read_text())["final"] for d in (a, b))
    out["summary final"] = largest(fa, fb)
    wa, wb = (torch.load(d / CHECKPOINT, weights_only=False)["model"] for d in (a, b))
    running = [k for k in wa if "running" in k]
    out["parameters"] = max((wa[k] - wb[k]).abs().max().item() for k in wa if k not in running and wa[k].dim())
    out["running statistics"] = max((wa[k] - wb[k]).abs().max().item() for k in running)
    return out


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        for name, (two, one) in PAIRS.items():
            diffs = differences(run(two, Path(tmp) / name / "two"), run(one, Path(tmp) / name / "one"))
            print(f"{name} ({DEVICE}): largest absolute differences")
            for what, d in diffs.items():
                print(f"    {what:20s} {d:.2e}")
