"""Normalization layers, chosen by name from one registry (`NORMS`, used through `create_norm`).

One `Norm` entry per name carries everything bnlab knows about that norm: its constructor (channel
count first, then the norm.* keys it takes), whether it normalizes over the batch, whether it keeps
running statistics, and which of its attributes count channels (`fuse`, all that fused runs need). Every
layer works on feature vectors (N, C) from an MLP and on feature maps (N, C, H, W) from a conv net, in
train and eval mode. This module
owns the layers themselves: torch's batch norm, a from-scratch batch norm to read, Batch
Renormalization with its r_max/d_max schedule, Ghost batch norm, Santurkar et al.'s noisy batch
norm, synchronized batch norm (statistics over the batch of every process of a distributed run),
layer, group, instance and RMS norm, `none` (no layer at all), and `custom`: the user's own layer,
built from norm.target and norm.kwargs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnlab.core.targets import locate
from bnlab.schema.config import NO_NORM

if TYPE_CHECKING:
    from bnlab.schema.config import NormConfig


def _per_channel(v: Tensor, x: Tensor) -> Tensor:
    """View a per-channel vector (C,) so that it broadcasts against x of shape (N, C) or (N, C, H, W)."""
    return v.view(1, -1, *[1] * (x.dim() - 2))


def _batch_moments(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel mean, biased variance and unbiased variance of x over every dim but C (dim 1)."""
    dims = [0, *range(2, x.dim())]
    count = x.numel() // x.shape[1]  # values per channel: N, or N * H * W
    if count < 2:
        raise ValueError(f"batch statistics need more than 1 value per channel, got input of shape {tuple(x.shape)}")
    mean = x.mean(dims)
    var = (x - _per_channel(mean, x)).square().mean(dims)  # biased: divides by count
    return mean, var, var * count / (count - 1)


class _ChannelAffine(nn.Module):
    """Holds the learned per-channel scale `weight` (gamma, starts at 1) and shift `bias` (beta, starts at 0)."""

    def __init__(self, channels: int, affine: bool, shift: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels)) if affine else None
        self.bias = nn.Parameter(torch.zeros(channels)) if affine and shift else None

    def _scale_shift(self, x_hat: Tensor) -> Tensor:
        if self.weight is not None:
            x_hat = x_hat * _per_channel(self.weight, x_hat)
        if self.bias is not None:
            x_hat = x_hat + _per_channel(self.bias, x_hat)
        return x_hat


@torch.no_grad()
def _update_running(norm: nn.Module, mean: Tensor, var_unbiased: Tensor) -> None:
    """One step of the moving averages: run = (1 - momentum) * run + momentum * batch."""
    norm.running_mean.lerp_(mean, norm.momentum)
    norm.running_var.lerp_(var_unbiased, norm.momentum)
    norm.num_batches_tracked += 1


class BatchNorm(_BatchNorm):
    """torch's batch norm (F.batch_norm) for feature vectors (N, C) and feature maps (N, C, H, W) alike."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in (2, 4):
            raise ValueError(f"expected input of shape (N, C) or (N, C, H, W), got {tuple(input.shape)}")


class ManualBatchNorm(_ChannelAffine):
    """Batch norm from scratch in plain tensor ops, to be read; autograd does the backward pass.

    Train mode: normalize with the batch mean and biased batch variance over every dim but C, then
    fold those into the running statistics (the variance unbiased, as torch does). Eval mode:
    normalize with the running statistics. Matches torch's BatchNorm1d/2d to float rounding.
    """

    def __init__(self, channels: int, *, eps: float, momentum: float, affine: bool) -> None:
        super().__init__(channels, affine)
        self.eps = eps  # added to the variance before the square root
        self.momentum = momentum  # weight of the current batch in the running statistics
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            mean, var, var_unbiased = _batch_moments(x)
            _update_running(self, mean, var_unbiased)
        else:
            mean, var = self.running_mean, self.running_var
        x_hat = (x - _per_channel(mean, x)) / torch.sqrt(_per_channel(var, x) + self.eps)
        return self._scale_shift(x_hat)


class BatchRenorm(_ChannelAffine):
    """Batch Renormalization (Ioffe 2017): batch norm corrected towards the running statistics.

    Train mode, with sigma_B = sqrt(var_B + eps) from the biased batch variance var_B:
    y = gamma * ((x - mu_B) / sigma_B * r + d) + beta, where r = clip(sigma_B / sigma, 1/r_max, r_max)
    and d = clip((mu_B - mu) / sigma, -d_max, d_max) carry no gradient. Eval mode: y = gamma * (x - mu) / sigma + beta.
    The running mean mu starts at 0 and the running std sigma at 1; both are moving averages with
    `momentum`, sigma of sqrt(unbiased batch variance + eps), so that it estimates the population std
    as torch's running_var does the variance. r_max and d_max follow a schedule in training steps,
    counted by `num_batches_tracked` (see `limits`).
    """

    def __init__(
        self,
        channels: int,
        *,
        eps: float,
        momentum: float,
        affine: bool,
        r_max: float,
        d_max: float,
        renorm_warmup: int,
        r_max_steps: int,
        d_max_steps: int,
    ) -> None:
        super().__init__(channels, affine)
        self.eps = eps  # added to the variance before the square root
        self.momentum = momentum  # weight of the current batch in the running statistics
        self.r_max, self.d_max = r_max, d_max  # final clips of r and d
        self.warmup = renorm_warmup  # steps of plain batch norm (r_max = 1, d_max = 0)
        self.r_max_steps, self.d_max_steps = r_max_steps, d_max_steps  # steps at which the final clips are reached
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_std", torch.ones(channels))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def _ramp(self, end: int) -> float:
        """0 until the warm-up ends, then rising linearly to 1 at step `end` (at once if end <= warmup)."""
        step = int(self.num_batches_tracked)
        if step < self.warmup:
            return 0.0
        if end <= self.warmup:
            return 1.0
        return min(1.0, (step - self.warmup) / (end - self.warmup))

    def limits(self) -> tuple[float, float]:
        """(r_max, d_max) for the next training step: (1, 0) in the warm-up, then linear ramps to the final clips."""
        return 1.0 + (self.r_max - 1.0) * self._ramp(self.r_max_steps), self.d_max * self._ramp(self.d_max_steps)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return self._scale_shift((x - _per_channel(self.running_mean, x)) / _per_channel(self.running_std, x))
        mean, var, var_unbiased = _batch_moments(x)
        std = torch.sqrt(var + self.eps)
        r_max, d_max = self.limits()
        with torch.no_grad():
            r = (std / self.running_std).clamp(1.0 / r_max, r_max)
            d = ((mean - self.running_mean) / self.running_std).clamp(-d_max, d_max)
            self.running_mean.lerp_(mean, self.momentum)
            self.running_std.lerp_(torch.sqrt(var_unbiased + self.eps), self.momentum)
            self.num_batches_tracked += 1
        x_hat = (x - _per_channel(mean, x)) / _per_channel(std, x) * _per_channel(r, x) + _per_channel(d, x)
        return self._scale_shift(x_hat)


class GhostBatchNorm(BatchNorm):
    """Ghost batch norm (Hoffer et al. 2017): in training, each virtual sub-batch is normalized on its own.

    A batch of N examples is split into k = round(N / virtual_batch_size) nearly equal chunks (at
    least 1, at most N // 2 so that no chunk holds a single example). The running statistics take
    one step per training batch, towards the mean over chunks of the chunk means and of the unbiased
    chunk variances: the within-virtual-batch statistics each example was normalized with. Eval mode,
    and training with k = 1, is exactly torch's batch norm.
    """

    def __init__(self, channels: int, *, eps: float, momentum: float, affine: bool, virtual_batch_size: int) -> None:
        super().__init__(channels, eps=eps, momentum=momentum, affine=affine)
        self.virtual_batch_size = virtual_batch_size  # examples per virtual batch

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[0]
        k = max(1, min(round(n / self.virtual_batch_size), n // 2))
        if not self.training or k == 1:
            return super().forward(x)
        self._check_input_dim(x)
        chunks = x.tensor_split(k)
        with torch.no_grad():
            means, _, vars_unbiased = zip(*map(_batch_moments, chunks))
        _update_running(self, torch.stack(means).mean(0), torch.stack(vars_unbiased).mean(0))
        return torch.cat(
            [F.batch_norm(c, None, None, self.weight, self.bias, training=True, eps=self.eps) for c in chunks]
        )


class NoisyBatchNorm(BatchNorm):
    """Noisy batch norm (Santurkar et al. 2018): torch's batch norm, then, in training only, random noise.

    Each training step draws per unit (channel) j a mean shift mu_j ~ U(-0.5, 0.5) and a mean scale
    sigma_j ~ U(1, 1.25), and per example i a scale s_ij ~ N(sigma_j, 0.1) (0.1 the standard deviation)
    and a shift m_ij ~ U(mu_j - 0.1, mu_j + 0.1); the batch-norm output a_ij becomes s_ij * a_ij + m_ij.
    On feature maps one (s_ij, m_ij) per example and channel is shared by all H x W positions. The
    noise carries no gradient and leaves the running statistics alone; eval mode is plain batch norm.
    """

    def forward(self, x: Tensor) -> Tensor:
        a = super().forward(x)
        if not self.training:
            return a
        n, c = a.shape[:2]
        mu = torch.rand(c, dtype=a.dtype, device=a.device) - 0.5
        sigma = 1.0 + 0.25 * torch.rand(c, dtype=a.dtype, device=a.device)
        s = sigma + 0.1 * torch.randn(n, c, dtype=a.dtype, device=a.device)
        m = mu + 0.2 * torch.rand(n, c, dtype=a.dtype, device=a.device) - 0.1
        per_example_channel = (n, c, *[1] * (a.dim() - 2))  # broadcast over H, W
        return s.view(per_example_channel) * a + m.view(per_example_channel)


class _SyncBatchNormFunction(torch.autograd.Function):
    """Batch norm over the union of every process's batch, for CPU tensors (gloo), where torch's
    SyncBatchNorm refuses to run. Forward: the per-channel sums and counts, then the sums of squared
    deviations from the global mean, are all-reduced (two passes: no cancellation), giving the global
    mean and biased variance. Backward, with g = dL/dy * gamma and x_hat the normalized input:
    dL/dx = invstd * (g - mean(g) - x_hat * mean(g * x_hat)), both means over the global batch, so
    sum(g) and sum(g * x_hat) are all-reduced too (as torch's SyncBatchNorm does: each process backprops
    its own loss, and DDP's gradient averaging makes that the gradient of the mean loss). Returns the
    output and, for the running statistics, the global mean and unbiased variance (no gradient)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, group) -> tuple:
        dims = [0, *range(2, x.dim())]
        sums = torch.cat([x.sum(dims), x.new_tensor([x.numel() // x.shape[1]])])
        dist.all_reduce(sums, group=group)
        count = sums[-1]
        mean = sums[:-1] / count
        centered = x - _per_channel(mean, x)
        squares = centered.square().sum(dims)
        dist.all_reduce(squares, group=group)
        var = squares / count
        invstd = torch.rsqrt(var + eps)
        x_hat = centered * _per_channel(invstd, x)
        ctx.save_for_backward(x_hat, weight, invstd, count)
        ctx.group, ctx.has_bias = group, bias is not None
        y = x_hat if weight is None else x_hat * _per_channel(weight, x)
        y = y if bias is None else y + _per_channel(bias, x)
        var_unbiased = squares / (count - 1).clamp(min=1)
        ctx.mark_non_differentiable(mean, var_unbiased)
        return y, mean, var_unbiased

    @staticmethod
    def backward(ctx, grad_y: Tensor, _mean: Tensor, _var: Tensor) -> tuple:
        x_hat, weight, invstd, count = ctx.saved_tensors
        dims = [0, *range(2, grad_y.dim())]
        g = grad_y if weight is None else grad_y * _per_channel(weight, grad_y)
        sums = torch.cat([g.sum(dims), (g * x_hat).sum(dims)])
        dist.all_reduce(sums, group=ctx.group)
        mean_g, mean_g_x_hat = (sums / count).chunk(2)
        grad_x = (g - _per_channel(mean_g, g) - x_hat * _per_channel(mean_g_x_hat, g)) * _per_channel(invstd, g)
        grad_weight = (grad_y * x_hat).sum(dims) if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = grad_y.sum(dims) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias, None, None


class SyncBatchNorm(BatchNorm):
    """Synchronized batch norm: in training, the batch statistics are those of the whole batch of a
    distributed run (trainer.devices > 1), all-reduced across its processes, so every process
    normalizes as one process would over the global batch, and the running statistics, equal on every
    process, follow the global batch. Without a process group of two or more processes, and in eval
    mode, it is plain batch norm. On CPU it runs `_SyncBatchNormFunction` (torch's SyncBatchNorm, and
    DDP with it, refuse CPU tensors); on CUDA a distributed run swaps it for torch's (`torch_form`).
    """

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
            return super().forward(x)
        self._check_input_dim(x)
        y, mean, var_unbiased = _SyncBatchNormFunction.apply(x, self.weight, self.bias, self.eps, dist.group.WORLD)
        _update_running(self, mean, var_unbiased)
        return y

    def torch_form(self) -> nn.SyncBatchNorm:
        """torch.nn.SyncBatchNorm holding this layer's parameters and buffers (the same tensors)."""
        torch_sync = nn.SyncBatchNorm(self.num_features, eps=self.eps, momentum=self.momentum, affine=self.affine)
        torch_sync.weight, torch_sync.bias = self.weight, self.bias
        for name, buffer in self.named_buffers(recurse=False):
            setattr(torch_sync, name, buffer)
        return torch_sync.train(self.training)


def with_torch_sync_batch_norm(model: nn.Module) -> nn.Module:
    """The model with each SyncBatchNorm swapped for its torch form, in place: what a CUDA run hands to DDP."""
    for name, child in model.named_children():
        if isinstance(child, SyncBatchNorm):
            setattr(model, name, child.torch_form())
        else:
            with_torch_sync_batch_norm(child)
    return model


class InstanceNorm(nn.GroupNorm):
    """Instance norm: each (example, channel) of a feature map normalized over H, W (GroupNorm(C, C)).

    A feature vector (N, C) has no spatial positions, so there the whole vector is the instance and it
    is normalized over its C features, which is layer norm.
    """

    def __init__(self, channels: int, *, eps: float, affine: bool) -> None:
        super().__init__(channels, channels, eps=eps, affine=affine)
        self.members = 1  # N fused members' layers as one: each member's feature vector is its own instance

    def forward(self, x: Tensor) -> Tensor:
        groups = self.num_groups if x.dim() > 2 else self.members
        return F.group_norm(x, groups, self.weight, self.bias, self.eps)


class RMSNorm(_ChannelAffine):
    """RMS norm: y = x / sqrt(mean(x^2) + eps) * gamma, the mean over each example's C (or C, H, W) values."""

    def __init__(self, channels: int, *, eps: float, affine: bool) -> None:
        super().__init__(channels, affine, shift=False)
        self.eps = eps  # added to the mean square before the square root
        self.members = 1  # N fused members' layers as one: each example's mean square over its member's values

    def forward(self, x: Tensor) -> Tensor:
        per_member = x.reshape(x.shape[0], self.members, -1)
        mean_square = per_member.square().mean(-1, keepdim=True)
        return self._scale_shift((per_member * torch.rsqrt(mean_square + self.eps)).view_as(x))


class GroupNorm(nn.GroupNorm):
    """Group normalization (Wu & He 2018): each example over groups of channels (and H x W)."""

    def __init__(self, channels: int, *, groups: int, eps: float, affine: bool) -> None:
        super().__init__(groups, channels, eps=eps, affine=affine)


class LayerNorm(nn.GroupNorm):
    """Layer normalization: each example over all its features (C, or C x H x W), i.e. GroupNorm(1, C)."""

    def __init__(self, channels: int, *, eps: float, affine: bool) -> None:
        super().__init__(1, channels, eps=eps, affine=affine)


class CustomNorm(nn.Module):
    """norm=custom: the user's layer `target(channels, **kwargs)` (norm.target, norm.kwargs), held as `layer`.

    It can be fused when its target (a class, or a function) declares `per_channel = True`: the layer
    built for C channels treats each channel on its own (its output at channel c depends on channel c of
    its input alone, over any of the batch and spatial positions: batch statistics are fine, statistics
    across channels are not), and each of its parameters and buffers is per channel along dim 0 (shape
    (C,) or (C, ...)) or a scalar that every member shares (a step counter). The layer of N fused
    members is then the target built for N*C channels (bnlab.run.fused.stacking's layout).
    """

    def __init__(self, channels: int, *, target: str, kwargs: dict[str, Any] | None) -> None:
        super().__init__()
        self.channels, self.target, self.kwargs = channels, target, dict(kwargs or {})
        self.layer = locate(target)(channels, **self.kwargs)
        if not isinstance(self.layer, nn.Module):
            raise TypeError(f"it returned a {type(self.layer).__name__}, not an nn.Module")

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


def per_channel(target: str) -> bool:
    """Whether a custom norm's target declares `per_channel = True` (see CustomNorm)."""
    return getattr(locate(target), "per_channel", False) is True


@dataclass(frozen=True)
class Norm:
    """One normalization: how to build it and what it does."""

    layer: Callable[..., nn.Module]  # the constructor: channel count first, then `keys` as keyword arguments
    keys: tuple[str, ...] = ()  # the norm.* config keys it takes, by the same names
    batch_stats: bool = False  # normalizes over the batch: needs 2+ examples, train and eval mode differ
    running_stats: bool = False  # keeps running estimates for eval mode (what precise BN re-estimates)
    # normalizes each example over its features in groups (norm.groups, else 1): an MLP's feature vectors need
    # 2 or more features in every group, or there is nothing to normalize over
    example_groups: bool = False
    # a transformer's tokens (bnlab.core.models.TokenNorm) reach it as rows (B*T, C), each token normalized over
    # its channels (layer, group, rms); otherwise as a feature map (B, C, 1, T): batch statistics per channel
    # over the batch and the tokens, instance norm's over each example's tokens
    token_rows: bool = False
    # Its batch statistics span every process of a distributed run (trainer.devices > 1); a batch_stats
    # norm without it normalizes over each process's share of the batch.
    synced: bool = False
    # Its layer's attributes that count channels (or members): N fused members' layers stack as one layer with
    # these multiplied by N and every parameter and buffer N times as long (bnlab.run.fused.stacking); None: it
    # cannot be fused (noisy_batch, whose random draws would differ from its separate runs').
    fuse: tuple[str, ...] | None = None

    def build(self, channels: int, cfg: NormConfig) -> nn.Module:
        return self.layer(channels, **{k: getattr(cfg, k) for k in self.keys})


_BN = ("eps", "momentum", "affine")
_GROUPS = ("num_groups", "num_channels")
_RENORM = (*_BN, "r_max", "d_max", "renorm_warmup", "r_max_steps", "d_max_steps")
NORMS: dict[str, Norm] = {
    NO_NORM: Norm(nn.Identity, fuse=()),
    "batch": Norm(BatchNorm, _BN, batch_stats=True, running_stats=True, fuse=("num_features",)),
    "layer": Norm(LayerNorm, ("eps", "affine"), example_groups=True, token_rows=True, fuse=_GROUPS),
    "group": Norm(GroupNorm, ("groups", "eps", "affine"), example_groups=True, token_rows=True, fuse=_GROUPS),
    "instance": Norm(InstanceNorm, ("eps", "affine"), example_groups=True, fuse=(*_GROUPS, "members")),
    "batch_renorm": Norm(BatchRenorm, _RENORM, batch_stats=True, running_stats=True, fuse=()),
    # its chunks split the batch dim, the same for every member
    "ghost_batch": Norm(
        GhostBatchNorm, (*_BN, "virtual_batch_size"), batch_stats=True, running_stats=True, fuse=("num_features",)
    ),
    "rms": Norm(RMSNorm, ("eps", "affine"), token_rows=True, fuse=("members",)),
    "batch_manual": Norm(ManualBatchNorm, _BN, batch_stats=True, running_stats=True, fuse=()),
    "noisy_batch": Norm(NoisyBatchNorm, _BN, batch_stats=True, running_stats=True),
    "sync_batch": Norm(SyncBatchNorm, _BN, batch_stats=True, running_stats=True, synced=True, fuse=("num_features",)),
    # its traits are its target's, unknown to bnlab: batch 1 is allowed, and it fuses if the target declares
    # per_channel = True (its layer is then built again for N*C channels, see CustomNorm)
    "custom": Norm(CustomNorm, ("target", "kwargs"), fuse=("channels",)),
}


NORM_MARK = "_bnlab_norm"  # set on every layer create_norm makes; copies (and a fused model's stacks) keep it


def create_norm(channels: int, cfg: NormConfig) -> nn.Module:
    """The normalization layer `cfg.name` for `channels` channels (nn.Identity for `none`)."""
    layer = NORMS[cfg.name].build(channels, cfg)
    setattr(layer, NORM_MARK, True)
    return layer


def norm_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of the model's norm layers (gamma, beta, ...), in the model's order."""
    return [p for m in model.modules() if getattr(m, NORM_MARK, False) for p in m.parameters()]


def fusable(cfg: NormConfig) -> bool:
    """Whether the norm cfg names has a stacked form for fused runs (norm=custom: if its target declares it)."""
    return NORMS[cfg.name].fuse is not None and (cfg.name != "custom" or per_channel(cfg.target))
