"""Targets for norm=custom, model=custom and data=custom in the tests: ones that work and ones that bnlab
must refuse (each refusal names the target and what went wrong)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ChannelScale(nn.Module):
    """A per-channel learnable scale that does not declare `per_channel`: bnlab must not fuse it."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight.view(1, -1, *[1] * (x.dim() - 2))


def not_a_module(channels: int) -> float:
    return float(channels)


class FailsOnMaps(nn.Module):
    """Works on feature vectors only: the probe of a conv net's norm must refuse it."""

    def __init__(self, channels: int) -> None:
        super().__init__()

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2:
            raise ValueError("FailsOnMaps takes (N, C) only")
        return x


class WrongShape(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1)[:, :1]


def tiny_net(in_shape: tuple[int, int, int], num_classes: int, hidden: int = 16) -> nn.Module:
    """model=custom: a one-hidden-layer net, hidden units from model.kwargs."""
    c, h, w = in_shape
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def not_a_model(in_shape: tuple[int, int, int], num_classes: int) -> str:
    return "a model"


def wrong_logits(in_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(in_shape[0] * in_shape[1] * in_shape[2], num_classes + 1))


def blobs(n_train: int = 128, n_test: int = 64, classes: int = 3) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """data=custom: Gaussian blobs as 1x4x4 images, one blob per class, labels 0..classes-1."""
    g = torch.Generator().manual_seed(0)
    centres = 2 * torch.randn(classes, 1, 4, 4, generator=g)

    def sample(n: int) -> tuple[Tensor, Tensor]:
        y = torch.arange(n) % classes
        return centres[y] + torch.randn(n, 1, 4, 4, generator=g), y

    return *sample(n_train), *sample(n_test)


def flat_blobs() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Examples as (N, D) vectors instead of (N, C, H, W): bnlab must refuse them."""
    train_x, train_y, test_x, test_y = blobs()
    return train_x.flatten(1), train_y, test_x.flatten(1), test_y
