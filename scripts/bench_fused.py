"""Steps per second of 8 seeds trained as one fused model vs the same 8 runs one after another, in one
process: the default MNIST MLP (784-100-100-100-10, BN, batch 60, SGD) and the default CNN. Not a
test: the numbers depend on the machine and on what else runs on it.

    python scripts/bench_fused.py                 # 8 seeds; 500 MLP steps, 50 CNN steps each
    python scripts/bench_fused.py 4 200 20        # 4 seeds; 200 MLP steps, 20 CNN steps each

MNIST is loaded from the data root (~/.cache/bnlab/data or $BNLAB_DATA) when its files are there;
otherwise random tensors of MNIST's shape stand in (the timing does not depend on the pixels).
"""

import os
import resource
import sys
import time

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from bnlab.data import DataError, Dataset, load_data
from bnlab.fused import train_fused
from bnlab.models import build_model
from bnlab.optim import build_optimizer
from bnlab.train import batches

MODELS = {"mlp (784-100-100-100-10, BN)": ["model=mlp"], "cnn (32-64, BN)": ["model=cnn"]}
DEFAULT_STEPS = {"mlp (784-100-100-100-10, BN)": 500, "cnn (32-64, BN)": 50}  # the CNN is about 50x slower


def configs(seeds: int, overrides: list[str]):
    with initialize_config_module("bnlab.conf", version_base="1.3"):
        return [OmegaConf.to_object(compose("train", overrides=[*overrides, f"seed={s}", "data.download=false"])) for s in range(seeds)]


def mnist(cfg) -> tuple[Dataset, str]:
    try:
        return load_data(cfg.data, torch.device("cpu")), "MNIST"
    except DataError:
        g = torch.Generator().manual_seed(0)
        x = lambda n: torch.rand(n, 1, 28, 28, generator=g)  # noqa: E731
        y = lambda n: torch.randint(0, 10, (n,), generator=g)  # noqa: E731
        return Dataset(x(60000), y(60000), x(10000), y(10000), 10), "random tensors shaped like MNIST"


def sequential(cfgs, data: Dataset, steps: int) -> float:
    """Seconds for the runs one after another, each the loop of train.py without its logging."""
    start = time.perf_counter()
    for cfg in cfgs:
        torch.manual_seed(cfg.seed)
        model = build_model(cfg, data.in_shape, data.num_classes)
        optimizer = build_optimizer(model.parameters(), cfg.optim)
        order = batches(len(data.train_y), cfg.data.batch_size, torch.Generator().manual_seed(cfg.seed))
        for _ in range(steps):
            idx = next(order)
            x, y = data.train_x[idx], data.train_y[idx]
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            loss.item()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            (logits.argmax(1) == y).float().mean().item()
    return time.perf_counter() - start


def fused(cfgs, data: Dataset, steps: int) -> float:
    start = time.perf_counter()
    train_fused(cfgs, data, steps)
    return time.perf_counter() - start


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    seeds = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    step_counts = [int(a) for a in sys.argv[2:4]] + list(DEFAULT_STEPS.values())[len(sys.argv[2:4]) :]
    data, source = mnist(configs(1, [])[0])
    print(f"{seeds} seeds, batch 60, SGD; data: {source}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (other processes slow both sides, unevenly)")
    print(f"peak RSS after loading the data: {peak_rss_mib():.0f} MiB")
    for (name, overrides), steps in zip(MODELS.items(), step_counts):
        cfgs = configs(seeds, overrides)
        t_seq = sequential(cfgs, data, steps)
        rss_seq = peak_rss_mib()
        t_fused = fused(cfgs, data, steps)
        total = seeds * steps  # member steps
        print(
            f"{name}, {steps} steps: sequential {total / t_seq:8.1f} member-steps/s ({t_seq:6.1f} s) | "
            f"fused {total / t_fused:8.1f} member-steps/s ({t_fused:6.1f} s, {steps / t_fused:6.1f} fused steps/s) | "
            f"speed-up {t_seq / t_fused:.2f}x | peak RSS {rss_seq:.0f} -> {peak_rss_mib():.0f} MiB"
        )


if __name__ == "__main__":
    main()
