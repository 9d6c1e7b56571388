"""How one layer becomes the layer of N fused members (bnlab/fused.py trains N runs as one model).

The stacked layout: activations are (B, N*C, ...), member n owning channels n*C to (n+1)*C - 1, and
every stacked parameter or buffer is the members' tensors concatenated along dim 0. A per-channel
layer (a norm over each channel's values, a grouped convolution) then stacks by multiplying its
channel and group counts by N, so no statistic or weight crosses members.
"""

from __future__ import annotations

import copy

from torch import nn


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
