"""How one layer becomes the layer of N fused members (bnlab/fused.py trains N runs as one model).

The stacked layout: activations are (B, N*C, ...), member n owning channels n*C to (n+1)*C - 1, and
every stacked parameter or buffer is the members' tensors concatenated along dim 0. A per-channel
layer (a norm over each channel's values, a grouped convolution) then stacks by multiplying its
channel and group counts by N, so no statistic or weight crosses members. Layers whose settings differ
between the members (a norm's eps, say) stack as `Memberwise`: one call per member on its channels.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn


def widen(m: nn.Module, n: int, *counts: str) -> nn.Module:
    """A copy of m for n members: each parameter and non-scalar buffer n times as long along dim 0 (its
    values are loaded afterwards, see bnlab.fused.FusedModel), and each attribute named in `counts`
    multiplied by n. A scalar buffer (a step counter) is shared by the members."""
    new = copy.deepcopy(m)
    for name, p in m.named_parameters(recurse=False):
        setattr(new, name, nn.Parameter(p.new_empty(n * p.shape[0], *p.shape[1:]), p.requires_grad))
    for name, b in m.named_buffers(recurse=False):
        if b.dim() > 0:
            setattr(new, name, b.new_empty(n * b.shape[0], *b.shape[1:]))
    for attr in counts:
        setattr(new, attr, getattr(m, attr) * n)
    return new


def unchanged(m: nn.Module, n: int) -> nn.Module:
    """Layers without state that act on each channel alone (activations, pooling) stack as they are."""
    return copy.deepcopy(m)


def settings(m: nn.Module) -> dict[str, Any]:
    """A layer's own settings (eps, momentum, channel counts, ...): its attributes but its parameters,
    buffers, children and mode."""
    return {k: v for k, v in vars(m).items() if not k.startswith("_") and k != "training"}


def member_part(t: Tensor, members: int, n: int) -> Tensor:
    """Member n's part of a stacked tensor (a view); a scalar (num_batches_tracked) is shared by all members."""
    return t if t.dim() == 0 else t.unflatten(0, (members, -1))[n]


class Memberwise(nn.Module):
    """The layers of N members whose settings differ (each member's norm.eps, norm.momentum, ...): the
    stacked parameters and buffers laid out as `widen` lays them out, and each member's channels run
    through its own layer with its part of them, so that each computes exactly what its separate run
    computes. Slower than one stacked layer (a call per member); used only where the settings differ."""

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = len(layers)
        self.layers = tuple(layers)  # a tuple, not submodules: the state is the stacked tensors below
        for name, p in layers[0].named_parameters(recurse=False):
            self.register_parameter(name, nn.Parameter(p.new_empty(self.members * p.shape[0], *p.shape[1:])))
        for name, b in layers[0].named_buffers(recurse=False):
            self.register_buffer(name, b.new_empty(self.members * b.shape[0], *b.shape[1:]) if b.dim() else b.clone())

    def forward(self, x: Tensor) -> Tensor:
        out = []
        for n, (layer, part) in enumerate(zip(self.layers, x.chunk(self.members, 1))):
            layer.training = self.training
            for name, p in self._parameters.items():
                layer._parameters[name] = member_part(p, self.members, n)
            for name, b in self._buffers.items():
                # A shared step counter: every member but the last (which moves the stacked one) counts on a copy.
                shared = b.dim() == 0 and n < self.members - 1
                layer._buffers[name] = b.clone() if shared else member_part(b, self.members, n)
            out.append(layer(part))
        return torch.cat(out, 1)
