"""What a norm costs: forward and backward of each built-in norm layer alone (bnlab.core.norms, as
bnlab.core.norms.create_norm builds it) on (batch, channels) activations, in microseconds per call and as a
ratio to LayerNorm's, at the MNIST MLP's size (60 x 100) and a transformer-like one (4096 x 512); and a whole
training step (forward, backward, AdamW) of the MNIST ViT (model=vit, depth 6, batch 60) with each norm. The
claims ledger's rms_faster and bn_cost claims are decided on the MLP's steps/s (the norm_cost preset); this
script shows the layer alone and the transformer beside them.

Each time is the median of ROUNDS interleaved rounds (the norms alternate within a round, so a busy moment
of the machine hits all alike), each the mean of at least 10 calls after a warm-up, on one torch thread. Not a test:
the numbers depend on the machine; docs/results.md has them with the machine, its load and the date.

    python scripts/bench_norms.py
"""

from __future__ import annotations

import statistics
import time

import torch

from bnlab.core.norms import create_norm
from bnlab.schema.config import NormConfig

NORMS = ("batch", "layer", "rms", "group")
SHAPES = ((60, 100), (4096, 512))  # (examples, channels)
ROUNDS = 15
VALUES_PER_ROUND = 2_000_000  # activations a norm processes per round: CALLS = this / the activations' size, >= 10


def per_call(layer: torch.nn.Module, x: torch.Tensor) -> float:
    """Seconds per forward and backward of `layer` on x."""
    calls = max(10, VALUES_PER_ROUND // x.numel())
    start = time.perf_counter()
    for _ in range(calls):
        layer(x).sum().backward()
    return (time.perf_counter() - start) / calls


def vit_steps() -> None:
    """Milliseconds per training step of the MNIST ViT with each norm, interleaved rounds of 10 steps."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    import bnlab.face.hydra_setup  # noqa: F401  what conf/ needs to compose
    from bnlab.core.models import build_model
    from bnlab.core.optim import build_optimizer

    x, y = torch.randn(60, 1, 28, 28), torch.randint(0, 10, (60,))
    steps = {}
    for name in ("layer", "rms", "batch"):
        with initialize_config_module("bnlab.conf", version_base="1.3"):
            cfg = OmegaConf.to_object(compose("train", overrides=["model=vit", "optim=adamw", f"norm={name}"]))
        model = build_model(cfg, (1, 28, 28), 10)
        steps[name] = (model, build_optimizer(model, cfg.optim))

    def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_ in range(ROUNDS + 1):
        for name, (model, optimizer) in steps.items():
            start = time.perf_counter()
            for _ in range(10):
                step(model, optimizer)
            if round_:  # the first round warms up
                times[name].append((time.perf_counter() - start) / 10)
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(f"MNIST ViT (depth 6, width 64, batch 60), a training step with AdamW, median of {ROUNDS} rounds:")
    for name, t in medians.items():
        print(f"  {name:6s} {t * 1e3:9.2f} ms   {t / medians['layer']:.3f}x LayerNorm's time")


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    for examples, channels in SHAPES:
        x = torch.randn(examples, channels, requires_grad=True)
        layers = {name: create_norm(channels, NormConfig(name=name)) for name in NORMS}
        for layer in layers.values():
            per_call(layer, x)  # warm-up
        times: dict[str, list[float]] = {name: [] for name in NORMS}
        for _ in range(ROUNDS):
            for name, layer in layers.items():
                times[name].append(per_call(layer, x))
        medians = {name: statistics.median(t) for name, t in times.items()}
        print(f"{examples} x {channels}, forward + backward, median of {ROUNDS} rounds:")
        for name, t in medians.items():
            print(f"  {name:6s} {t * 1e6:9.1f} us   {t / medians['layer']:.3f}x LayerNorm's time")
    vit_steps()


if __name__ == "__main__":
    main()
