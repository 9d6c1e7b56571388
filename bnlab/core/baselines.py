"""The pieces of a fair no-normalization baseline that models are built with: learnable scalars on residual
branches (SkipInit, Fixup; bnlab.core.models places them and does Fixup's init) and scaled weight
standardization (Brock et al.). Adaptive gradient clipping is an optimizer option (bnlab/core/optim.py).

Each piece works in the stacked layout of fused runs (bnlab.run.fused.stacking) as it is: a scalar becomes one
number per member, a standardized layer standardizes each member's output units on their own.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

WS_EPS = 1e-4  # var(W_i) * fan_in is taken as at least this (as the NFNets code does), so a zero row stays zero


class Scalar(nn.Module):
    """One learnable number multiplied into (`multiply`) or added to a feature tensor: SkipInit's alpha,
    Fixup's multipliers and scalar biases. Stacked for N fused members (bnlab.run.fused.stacking.widen) it holds N
    numbers, member n's applied to its channels n*C to (n+1)*C - 1."""

    def __init__(self, init: float, multiply: bool) -> None:
        super().__init__()
        self.value = nn.Parameter(torch.full((1,), float(init)))
        self.multiply = multiply

    def forward(self, x: Tensor) -> Tensor:
        v = self.value
        if v.numel() > 1:  # N members: each number over its member's channels
            v = v.repeat_interleave(x.shape[1] // v.numel()).view(1, -1, *[1] * (x.dim() - 2))
        return x * v if self.multiply else x + v


def gamma(activation: Callable[[Tensor], Tensor]) -> float:
    """Brock et al.'s nonlinearity gain: 1 / std(g(z)) for z ~ N(0, 1), so that g's output has unit variance
    again (ReLU: sqrt(2 / (1 - 1/pi)) = 1.7129). The Gaussian integrals by the trapezoid rule on [-12, 12]
    (ReLU's kink sits on a node: exact to about 1e-8)."""
    z = torch.linspace(-12.0, 12.0, 240_001, dtype=torch.float64)
    density = torch.exp(-0.5 * z**2) / math.sqrt(2 * math.pi)
    g = activation(z)
    mean = torch.trapezoid(g * density, z)
    return float(torch.trapezoid((g - mean) ** 2 * density, z) ** -0.5)


def standardize(weight: Tensor, gain: Tensor, gamma: float) -> Tensor:
    """Scaled weight standardization (Brock, De & Smith 2021, arXiv 2101.08692, eq. 5; used in NFNets,
    arXiv 2102.06171): per output unit i (row i along dim 0, fan_in = N values each),
    W_hat_i = gain_i * gamma * (W_i - mean(W_i)) / (std(W_i) * sqrt(N)), std the biased one, so each row
    of W_hat has mean 0 and standard deviation gain_i * gamma / sqrt(N)."""
    dims = list(range(1, weight.dim()))
    fan_in = weight[0].numel()
    mean = weight.mean(dims, keepdim=True)
    var = weight.var(dims, unbiased=False, keepdim=True)
    scale = torch.rsqrt((var * fan_in).clamp_min(WS_EPS)) * (gamma * gain).view(-1, *[1] * len(dims))
    return (weight - mean) * scale


class WSLinear(nn.Linear):
    """A Linear layer whose weight is used scaled-standardized (`standardize`), with a learnable gain per
    output unit (starting at 1); `weight` itself stays the raw parameter that the optimizer updates."""

    def __init__(self, linear: nn.Linear, gamma: float) -> None:
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        self.weight, self.bias = linear.weight, linear.bias  # the layer's own parameters, as initialised
        self.gain = nn.Parameter(torch.ones(linear.out_features))
        self.gamma = gamma

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, standardize(self.weight, self.gain, self.gamma), self.bias)


class WSConv2d(nn.Conv2d):
    """A Conv2d layer whose kernel is used scaled-standardized per output channel (`standardize`, fan_in =
    in_channels / groups * kh * kw), with a learnable gain per output channel (starting at 1). Stacked for N
    members (groups and channels times N) each output channel is still standardized on its own."""

    def __init__(self, conv: nn.Conv2d, gamma: float) -> None:
        c = conv
        super().__init__(
            c.in_channels,
            c.out_channels,
            c.kernel_size,
            c.stride,
            c.padding,
            c.dilation,
            c.groups,
            c.bias is not None,
            device="meta",  # no init drawn: the parameters are conv's
        )
        self.weight, self.bias = c.weight, c.bias
        self.gain = nn.Parameter(torch.ones(c.out_channels))
        self.gamma = gamma

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, standardize(self.weight, self.gain, self.gamma), self.bias)


def standardize_weights(model: nn.Module, gamma: float) -> None:
    """model.weight_standardization=true: every Linear and Conv2d of the model but the last one (the
    classifier, as in NFNets) replaced by its scaled-standardized form, in place, weights kept."""
    layers = [m for m in model.modules() if type(m) in (nn.Linear, nn.Conv2d)]
    standardized = {id(m): (WSLinear if isinstance(m, nn.Linear) else WSConv2d)(m, gamma) for m in layers[:-1]}
    for parent in model.modules():
        for name, child in parent.named_children():
            if id(child) in standardized:
                setattr(parent, name, standardized[id(child)])
