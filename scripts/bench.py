"""Single-run speed, measured several ways in one process for the same model, batch and number of steps:

  (a) bnlab's trainer as it runs by default (every step's loss and accuracy kept on the device and read,
      checked and logged to TensorBoard every trainer.log_every = 10 steps, a checkpoint every 500),
      periodic evaluation off (its cost on its own line) and the fixed costs taken out (a run of 2N steps
      less one of N); (a1) the same with trainer.log_every=1, a read and a TensorBoard point per step,
  (b) a plain PyTorch loop as the tutorials write it: torchvision dataset with ToTensor, DataLoader(shuffle=True),
  (c) a minimal loop as a careful user writes it: tensors on the device, a device permutation per epoch,
      batches gathered with index_select (as the trainer does; x[idx] costs more),
      zero_grad(set_to_none=True), no read from the device (the floor of PyTorch's per-step overhead),
  (d) on a GPU only, the same step captured once as a CUDA graph and replayed (no per-op launch cost).

Prints steps/s (the median of 5 interleaved rounds, so that a busy moment of the machine hits all of them
alike) and the ratios (a)/(b) (target >= 5 on CPU), (a)/(c) (target >= 0.95) and (a)/(d), for the
default MNIST MLP (BN, batch 60) and for the CNN on 32x32 colour inputs, and the load average before
and after. Not a test: the numbers depend on the machine.

    python scripts/bench.py                 # 1,000 MLP steps, 100 CNN steps per measurement
    python scripts/bench.py 3000            # more steps
    python scripts/bench.py 3000 cuda       # on the GPU: model and tensors there, (b) copies each batch to it
    python scripts/bench.py 2000 cpu MLP    # only the cases whose name starts with MLP
"""

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets, transforms

from bnlab.core.data import load_data
from bnlab.core.models import build_model
from bnlab.run.engine import evaluate
from bnlab.run.train import train
from bnlab.schema.config import TrainConfig

CASES = {  # name -> (overrides of the default config: MNIST MLP 784-100-100-100-10, BN, batch 60; steps / MLP steps)
    "MLP on MNIST": ([], 1.0),
    "CNN on 32x32x3": (
        [
            "model=cnn",
            "data=synthetic",
            "data.channels=3",
            "data.image_size=32",
            "data.num_train=10000",
            "data.batch_size=60",
        ],
        0.1,
    ),
}
ROUNDS = 5


DEVICE = torch.device(sys.argv[2] if len(sys.argv) > 2 else "cpu")


def config(overrides: list[str], steps: int, eval_every: int | None = None) -> TrainConfig:
    with initialize_config_module("bnlab.conf", version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                *overrides,
                f"trainer.max_steps={steps}",
                f"trainer.eval_every={eval_every or steps + 1}",
                f"trainer.device={DEVICE.type}",
                f"trainer.threads={torch.get_num_threads()}",  # as many as the loops below use (OMP_NUM_THREADS)
            ],
        )
    return OmegaConf.to_object(cfg)


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


class PilImages(Dataset):
    """Images held as uint8 arrays and turned into PIL images one at a time, as torchvision's CIFAR10 does."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform) -> None:
        self.images = (x * 255).round().byte().permute(0, 2, 3, 1).squeeze(-1).numpy()
        self.labels, self.transform = y.tolist(), transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(np.ascontiguousarray(self.images[i]))), self.labels[i]


def step(model, optimizer, x, y) -> torch.Tensor:
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


def tutorial_loop(cfg: TrainConfig, dataset: Dataset, steps: int) -> float:
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, tuple(dataset[0][0].shape), 10).to(DEVICE)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr)
    loader = DataLoader(dataset, batch_size=cfg.data.batch_size, shuffle=True)
    done, start = 0, time.perf_counter()
    while done < steps:
        for x, y in loader:
            step(model, optimizer, x.to(DEVICE), y.to(DEVICE))
            done += 1
            if done == steps:
                break
    synchronize()
    return steps / (time.perf_counter() - start)


def tensor_loop(cfg: TrainConfig, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, tuple(x.shape[1:]), 10).to(DEVICE)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr)
    b, per_epoch = cfg.data.batch_size, len(x) // cfg.data.batch_size
    start = time.perf_counter()
    for i in range(steps):
        if i % per_epoch == 0:
            perm = torch.randperm(len(x), device=DEVICE)
        idx = perm[(i % per_epoch) * b : (i % per_epoch + 1) * b]
        step(model, optimizer, x.index_select(0, idx), y.index_select(0, idx))
    synchronize()
    return steps / (time.perf_counter() - start)


def graphed_loop(cfg: TrainConfig, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    """(c)'s step captured as one CUDA graph (forward, backward, optimizer step) and replayed per step, the
    batch gathered into the graph's static inputs by index: PyTorch's "whole network capture"."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, tuple(x.shape[1:]), 10).to(DEVICE)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr)
    b, per_epoch = cfg.data.batch_size, len(x) // cfg.data.batch_size
    static_idx = torch.arange(b, device=DEVICE)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph, as capture requires
        for _ in range(3):
            step(model, optimizer, x.index_select(0, static_idx), y.index_select(0, static_idx))
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        loss = F.cross_entropy(model(x.index_select(0, static_idx)), y.index_select(0, static_idx))
        loss.backward()
        optimizer.step()
    synchronize()
    start = time.perf_counter()
    for i in range(steps):
        if i % per_epoch == 0:
            perm = torch.randperm(len(x), device=DEVICE)
        static_idx.copy_(perm[(i % per_epoch) * b : (i % per_epoch + 1) * b])
        graph.replay()
    synchronize()
    return steps / (time.perf_counter() - start)


def trainer(overrides: list[str], steps: int) -> float:
    """Steps/s of bnlab's trainer over `steps` steps with what it does every so many steps (reads, TensorBoard
    points, checkpoints), its fixed costs (the evaluations at step 0 and at the end, the last checkpoint)
    taken out: the loop time of a run of 2 * steps steps less that of a run of `steps`."""
    loop_s = []
    for n in (steps, 2 * steps):
        with tempfile.TemporaryDirectory() as tmp:
            summary = train(config(overrides, n, eval_every=2 * steps + 1), Path(tmp))
        loop_s.append(summary.steps / summary.steps_per_s)
    return steps / (loop_s[1] - loop_s[0])


def main(steps: int) -> None:
    where = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else f"{torch.get_num_threads()} torch threads"
    print(
        f"{DEVICE.type}: {where}, torch {torch.__version__}, median of {ROUNDS} rounds; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    only = sys.argv[3] if len(sys.argv) > 3 else ""
    for name, (overrides, scale) in ((n, c) for n, c in CASES.items() if n.startswith(only)):
        steps_here = max(10, int(steps * scale))
        cfg = config(overrides, steps_here)
        data = load_data(cfg.data, DEVICE)
        if cfg.data.name == "mnist":
            tutorial_data = datasets.MNIST(
                Path(cfg.data.root).expanduser(), train=True, transform=transforms.ToTensor()
            )
        else:
            tutorial_data = PilImages(data.train_x.cpu(), data.train_y.cpu(), transforms.ToTensor())
        model = build_model(cfg, data.in_shape, data.num_classes).to(DEVICE)
        evaluate(model, data.test_x, data.test_y).tolist()  # warm-up
        start = time.perf_counter()
        evaluate(model, data.test_x, data.test_y).tolist()
        eval_s = time.perf_counter() - start
        rounds = []
        for _ in range(ROUNDS):
            rounds.append(
                (
                    trainer(overrides, steps_here),
                    trainer([*overrides, "trainer.log_every=1"], steps_here),
                    tutorial_loop(cfg, tutorial_data, steps_here),
                    tensor_loop(cfg, data.train_x, data.train_y, steps_here),
                    graphed_loop(cfg, data.train_x, data.train_y, steps_here) if DEVICE.type == "cuda" else None,
                )
            )
        a, a1, b, c = (statistics.median(r[i] for r in rounds) for i in range(4))
        print(f"\n{name}, batch {cfg.data.batch_size}, norm={cfg.norm.name}, {steps_here} steps")
        print(f"  (a) bnlab trainer          {a:8.1f} steps/s")
        print(f"  (a1) ... log_every=1       {a1:8.1f} steps/s")
        print(f"  (b) tutorial DataLoader    {b:8.1f} steps/s   (a)/(b) = {a / b:5.2f}  (target >= 5)")
        print(f"  (c) minimal tensor loop    {c:8.1f} steps/s   (a)/(c) = {a / c:5.2f}  (target >= 0.95)")
        if DEVICE.type == "cuda":
            d = statistics.median(r[4] for r in rounds)
            print(f"  (d) CUDA-graph minimal     {d:8.1f} steps/s   (a)/(d) = {a / d:5.2f}")
        print(
            f"  evaluation: {eval_s * 1000:.0f} ms for {len(data.test_y)} test examples; every 100 steps it would add "
            f"{100 * eval_s * a / 100:.1f} % to (a)'s time"
        )
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000)
