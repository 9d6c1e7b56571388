"""The example of README "Your own norm": mean-only batch normalization (Salimans & Kingma 2016, "Weight
Normalization", arXiv 1602.07868, Sec. 3), as a user writes it, outside bnlab.

Per channel, y = x - mu_B + beta: training subtracts the mean mu_B of the batch (over the examples, and the
positions of a feature map) and keeps a running mean for eval mode, which subtracts that instead; beta is
learned. Unlike batch norm it does not divide by the batch's standard deviation, so it asks whether
centring alone buys batch norm's speed-up.

bnlab builds it as MeanOnlyBatchNorm(channels, **norm.kwargs) (norm=custom
norm.target=my_norm.MeanOnlyBatchNorm, or conf/norm/mean_only.yaml here). It follows torch's
conventions for running statistics (running_mean, momentum), so precise BN re-estimates it too.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class MeanOnlyBatchNorm(nn.Module):
    # Each channel on its own (statistics over the batch and positions only) and every parameter and buffer
    # per channel: bnlab may fuse runs with it, as N*C channels (README "Your own norm").
    per_channel = True

    def __init__(self, channels: int, momentum: float = 0.1) -> None:
        super().__init__()
        self.momentum = momentum  # weight of the current batch in the running mean
        self.bias = nn.Parameter(torch.zeros(channels))  # beta
        self.register_buffer("running_mean", torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        per_channel = (1, -1, *[1] * (x.dim() - 2))  # broadcast over (N, C) or (N, C, H, W)
        if self.training:
            mean = x.mean([0, *range(2, x.dim())])
            with torch.no_grad():
                self.running_mean.lerp_(mean, self.momentum)
        else:
            mean = self.running_mean
        return x - mean.view(per_channel) + self.bias.view(per_channel)
