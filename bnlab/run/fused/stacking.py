"""How the layers of N fused members become one layer, and their models one model (bnlab/run/fused/engine.py
trains it).

The stacked layout: activations are (B, N*C, ...), member n owning channels n*C to (n+1)*C - 1, and
every stacked parameter or buffer is the members' tensors concatenated along dim 0. A per-channel
layer (a norm over each channel's values, a grouped convolution) then stacks by multiplying its
channel and group counts by N, so no statistic or weight crosses members: a Linear becomes a batched
matmul, a Conv2d a grouped conv, a norm the counts its registry entry declares (`Norm.fuse`) multiplied.
Layers whose settings differ between the members (a norm's eps, say) stack as `Memberwise`: one call per
member on its channels. `FusedModel` swaps each layer of the members' ordinary models for its stacked
counterpart; `member_state_dict` splits the stacked tensors back.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from bnlab.core import models
from bnlab.core.baselines import Scalar, WSConv2d, WSLinear, standardize
from bnlab.core.models import ACTIVATIONS, Embedding
from bnlab.core.norms import NORMS, CustomNorm, per_channel

MODELS_MODULE = models.__name__


def widen(m: nn.Module, n: int, *names: str, counts: tuple[str, ...] = ()) -> nn.Module:
    """A copy of m for n members: each parameter and non-scalar buffer n times as long along dim 0 (its
    values are loaded afterwards, see bnlab.run.fused.engine.FusedModel), and each attribute named in `counts`
    multiplied by n (`names`, or `counts`). A scalar buffer (a step counter) is shared by the members."""
    new = copy.deepcopy(m)
    for name, p in m.named_parameters(recurse=False):
        setattr(new, name, nn.Parameter(p.new_empty(n * p.shape[0], *p.shape[1:]), p.requires_grad))
    for name, b in m.named_buffers(recurse=False):
        if b.dim() > 0:
            setattr(new, name, b.new_empty(n * b.shape[0], *b.shape[1:]))
    for attr in (*names, *counts):
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


# ---------------------------------------------------------------- stacked layers, and a stacked model


class _BatchedLinear(torch.autograd.Function):
    """y[n] = x[:, n] W[n]^T + b[n] for x (B, N, in), W (N, out, in) and b (N, out) or None; y (N, B, out).

    torch.baddbmm computes the same, but its autograd hands back either the weight's gradient
    transposed (a copy of the largest tensor every step) or the input's gradient column-major
    (elementwise backward kernels downstream run several times slower on it). This backward is
    F.linear's, batched: each gradient comes out in the layout of its tensor. x is taken and saved as
    the (B, N, in) view of the layer's input, whose storage the previous activation keeps anyway, so
    the saved activations of N members take N times one run's memory, not more.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        xs, wt = x.transpose(0, 1), weight.transpose(1, 2)  # (N, B, in), (N, in, out): views
        return torch.bmm(xs, wt) if bias is None else torch.baddbmm(bias.unsqueeze(1), xs, wt)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        grad_x = torch.bmm(grad, weight).transpose(0, 1) if ctx.needs_input_grad[0] else None  # (B, N, in)
        grad_w = torch.bmm(grad.transpose(1, 2), x.transpose(0, 1)) if ctx.needs_input_grad[1] else None  # (N, out, in)
        grad_b = grad.sum(1) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


class StackedLinear(nn.Module):
    """N Linear layers as one batched matmul, (B, N*in) -> (B, N*out) (or a transformer's tokens (B, T, N*in),
    the members' channels last); weight (N*out, in) and bias
    (N*out,) are the members' weights and biases one after another. As the model's first layer it may take
    K < N inputs (B, K*in), input k shared by the N/K members k*N/K, ... (`inputs`, set by FusedModel): K
    matmuls of N/K members' weights each, not N over K inputs copied N/K times."""

    def __init__(self, linear: nn.Linear, members: int) -> None:
        super().__init__()
        self.members, self.in_features, self.out_features = members, linear.in_features, linear.out_features
        self.inputs = members
        self.weight = nn.Parameter(linear.weight.new_empty(members * self.out_features, self.in_features))
        bias = None if linear.bias is None else nn.Parameter(linear.bias.new_empty(members * self.out_features))
        self.register_parameter("bias", bias)

    def _weight(self) -> Tensor:
        return self.weight

    def forward(self, x: Tensor) -> Tensor:
        k, lead, out = self.inputs, x.shape[:-1], self.members * self.out_features  # lead: (B,) or (B, T) tokens
        w = self._weight().view(k, out // k, self.in_features)  # input k's members' weights, one after another
        bias = None if self.bias is None else self.bias.view(k, out // k)
        y = _BatchedLinear.apply(x.reshape(-1, k, self.in_features), w, bias)  # (K, B, N/K*out)
        return y.transpose(0, 1).reshape(*lead, out)  # row-major again, as norms and activations like it


class StackedWSLinear(StackedLinear):
    """N scaled-standardized Linear layers (bnlab.core.baselines.WSLinear): each member's rows standardized on their
    own, with their gains (N*out,), then batched."""

    def __init__(self, linear: WSLinear, members: int) -> None:
        super().__init__(linear, members)
        self.gain = nn.Parameter(linear.gain.new_empty(members * self.out_features))
        self.gamma = linear.gamma

    def _weight(self) -> Tensor:
        return standardize(self.weight, self.gain, self.gamma)


def _flatten(m: nn.Flatten, n: int) -> nn.Flatten:
    """(B, N*C, H, W) -> (B, N*C*H*W) keeps each member's values together only when all dims but B flatten."""
    if (m.start_dim, m.end_dim) != (1, -1):
        raise TypeError(f"only Flatten(1, -1) stacks, not Flatten({m.start_dim}, {m.end_dim})")
    return unchanged(m, n)


def _custom_norm(m: CustomNorm, n: int) -> CustomNorm:
    """norm=custom keeps its state in its target's layer, which only the target can build for N*C channels."""
    if not per_channel(m.target):
        raise TypeError(f"{m.target} does not declare per_channel = True, so it cannot be fused")
    return CustomNorm(n * m.channels, target=m.target, kwargs=m.kwargs)


# Layers without state that act on each channel (or value) alone, and stack as they are: the models'
# activations and pooling.
STATELESS = (*{type(make()) for make in ACTIVATIONS.values()}, nn.MaxPool2d, nn.AdaptiveAvgPool2d)

# Layer type (exact, not subclasses) -> its stacked counterpart, built from one member's layer and N: the
# norms' as their registry entries declare (`Norm.fuse`).
STACKERS: dict[type, Callable[[nn.Module, int], nn.Module]] = {
    nn.Linear: StackedLinear,
    nn.Conv2d: lambda m, n: widen(m, n, "in_channels", "out_channels", "groups"),
    Embedding: widen,  # the ViT's class token and position embedding, per channel along dim 0
    WSLinear: StackedWSLinear,
    WSConv2d: lambda m, n: widen(m, n, "in_channels", "out_channels", "groups"),
    Scalar: widen,
    nn.Flatten: _flatten,
    **{t: unchanged for t in STATELESS},
    **{norm.layer: partial(widen, counts=norm.fuse) for norm in NORMS.values() if norm.fuse is not None},
    CustomNorm: _custom_norm,
}


def is_container(m: nn.Module) -> bool:
    """bnlab's own model classes and nn.Sequential: no parameters of their own, a forward that only calls
    the children and adds their outputs (every model's fused runs are checked against its separate runs)."""
    return (
        (isinstance(m, nn.Sequential) or type(m).__module__ == MODELS_MODULE) and not m._parameters and not m._buffers
    )


def stack_module(layers: Sequence[nn.Module]) -> nn.Module:
    """The stacked counterpart of the members' layers, one per member, all of one kind (parameters and
    buffers not yet filled in): the layer's stacked form, or `Memberwise` where their settings differ."""
    m, n = layers[0], len(layers)
    kind = type(m)
    if kind in STACKERS:
        return Memberwise(layers) if any(settings(x) != settings(m) for x in layers[1:]) else STACKERS[kind](m, n)
    if is_container(m):
        new = copy.copy(m)
        new._parameters, new._buffers = {}, {}
        new._modules = {name: stack_module([x._modules[name] for x in layers]) for name in m._modules}
        return new
    raise TypeError(f"{kind.__name__} has no stacked counterpart (see bnlab.run.fused.stacking.STACKERS)")


def entry_layer(net: nn.Module) -> StackedLinear | None:
    """The stacked model's first layer with parameters if it is a StackedLinear with only stateless layers
    before it (an MLP), which can take inputs that several members share; otherwise None. A convolution
    does not: over a shared input of one channel a CPU convolution leaves the channels-last layout and
    every later layer runs about twice as slow, so each member gets its copy of the input there."""
    for m in net.modules():  # the built-in models register their layers in the order they run
        if next(m.children(), None) is not None or isinstance(m, (nn.Flatten, *STATELESS)):
            continue
        return m if isinstance(m, StackedLinear) else None
    return None


class FusedModel(nn.Module):
    """N ordinary bnlab models of one architecture as one stacked model; member n starts as models[n]."""

    def __init__(self, models: Sequence[nn.Module]) -> None:
        super().__init__()
        if not models:
            raise ValueError("FusedModel needs at least one model")
        states = [m.state_dict() for m in models]
        layout = [(k, v.shape, v.dtype) for k, v in states[0].items()]
        for i, state in enumerate(states[1:], 1):
            if [(k, v.shape, v.dtype) for k, v in state.items()] != layout:
                raise ValueError(f"model {i} differs from model 0 in its parameters or buffers")
        self.members = len(models)
        self.net = stack_module(models)
        self.load_member_state_dicts(states)
        # Feature maps channels-last: CPU grouped convs (their backward most of all) and max-pooling run
        # markedly faster on them than on contiguous ones.
        self.channels_last = any(isinstance(m, nn.Conv2d) for m in self.net.modules())
        self.entry = entry_layer(self.net)
        self.train(models[0].training)

    def forward(self, x: Tensor) -> Tensor:
        """Inputs (K, B, *example shape) -> logits (N, B, classes) for K dividing N: member n applied to
        x[n // (N/K)], so K = N gives each member its own examples and K = 1 gives all the same ones (an
        evaluation; members drawing the same batches). The entry layer takes the K inputs as they are."""
        k, b = x.shape[:2]
        n = self.members
        if k == 0 or n % k:
            raise ValueError(f"expected inputs for {n} members or a divisor of {n}, got shape {tuple(x.shape)}")
        if k < n and self.entry is None:  # each member its own copy of its input (a conv model)
            x = x.unsqueeze(1).expand(k, n // k, *x.shape[1:]).reshape(n, *x.shape[1:])
            k = n
        stacked = x.transpose(0, 1).reshape(b, k * x.shape[2], *x.shape[3:])  # (B, K*C, ...)
        if self.channels_last and stacked.dim() == 4:
            stacked = stacked.contiguous(memory_format=torch.channels_last)
        if self.entry is not None:
            self.entry.inputs = k
        return self.net(stacked).view(b, n, -1).transpose(0, 1)

    def load_member_state_dicts(self, states: Sequence[dict[str, Tensor]]) -> None:
        """Load every member from its ordinary model's state_dict, in member order (values are copied
        into the stacked tensors, which keep their dtype and device)."""
        stacked = {}
        for k in states[0]:
            parts = [s[k] for s in states]
            if parts[0].dim() == 0 and any(not torch.equal(p, parts[0]) for p in parts):
                raise ValueError(f"{k} is shared by the stacked members but differs between the models")
            stacked[k] = parts[0] if parts[0].dim() == 0 else torch.cat(parts)
        self.net.load_state_dict(stacked)

    def member_state_dict(self, n: int) -> dict[str, Tensor]:
        """Member n's parameters and buffers as the ordinary model's state_dict (copies)."""
        return {k: member_part(v, self.members, n).clone() for k, v in self.net.state_dict().items()}
