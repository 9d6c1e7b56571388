"""Fused training: N runs that differ only in seed, learning rate and weight decay (`can_fuse`) trained as
one stacked model, each member following its separate run to float rounding. `FusedModel` walks an
ordinary model and swaps each layer for its stacked counterpart (`STACKERS`) on activations laid out
(B, N*C, ...), member n owning channels n*C to (n+1)*C - 1: a Linear becomes a batched matmul, a Conv2d a
grouped conv, and a norm the same norm over N*C channels (with N times the groups), so no statistic
crosses members. Every stacked tensor is the members' tensors concatenated along dim 0, which
`member_state_dict` splits back. `StackedSGD`/`StackedAdam` take one lr and weight decay per member, the
loss is the sum of the members' mean losses, and `Fused` is the engine that bnlab.train's loop drives for
a fused group (bnlab.launcher forms the groups of a sweep)."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnlab.config import BOOKKEEPING_KEYS, ConfigError, OptimConfig, TrainConfig, flatten
from bnlab.data import Dataset
from bnlab.models import CNN, MLP, BasicBlock, ResNet, Unit, build_model
from bnlab.norms import BatchNorm, BatchRenorm, GhostBatchNorm, InstanceNorm, ManualBatchNorm, RMSNorm
from bnlab.train import EVAL_CHUNK, Single, autocast, batches, prepare_model

log = logging.getLogger(__name__)

# Config keys that may differ between members: what the stacked optimizer takes per member (and
# config.BOOKKEEPING_KEYS, which leave a run's trajectory alone).
PER_MEMBER_KEYS = ("seed", "optim.lr", "optim.weight_decay")
# Every bnlab norm is a per-channel or per-(example, group) op without randomness, so it stacks by channel
# count. A norm added later is refused until someone adds it here and its stacked counterpart to STACKERS.
FUSABLE_NORMS = ("none", "batch", "batch_manual", "batch_renorm", "ghost_batch", "layer", "group", "instance", "rms")
FUSABLE_MODELS = ("mlp", "cnn", "resnet")


def shared_config(cfg: TrainConfig) -> dict[str, str]:
    """The flattened config that the members of a fused group must share: all but the per-member and
    bookkeeping keys, values as strings."""
    return {
        k: str(v) for k, v in flatten(asdict(cfg)).items() if k not in PER_MEMBER_KEYS and k not in BOOKKEEPING_KEYS
    }


def can_fuse(cfgs: Sequence[TrainConfig]) -> str | None:
    """None if these runs can train as one fused model, else a short reason why not."""
    if not cfgs:
        return "no configs"
    flat = [shared_config(c) for c in cfgs]
    for key, value in flat[0].items():
        others = {f.get(key) for f in flat[1:]} - {value}
        if others:
            return f"{key} differs ({value} vs {', '.join(sorted(others))}); only {', '.join(PER_MEMBER_KEYS)} may"
    cfg = cfgs[0]
    if cfg.diag.switched_on():
        return "the diagnostics (diag.*) run on ordinary models only"
    if cfg.model.name not in FUSABLE_MODELS:
        return f"model={cfg.model.name} has no stacked form (fusable: {', '.join(FUSABLE_MODELS)})"
    if cfg.norm.name not in FUSABLE_NORMS:
        return f"norm={cfg.norm.name} has no stacked form (fusable: {', '.join(FUSABLE_NORMS)})"
    if cfg.optim.name not in STACKED_OPTIMIZERS:
        return f"optim={cfg.optim.name} has no stacked form (fusable: {', '.join(STACKED_OPTIMIZERS)})"
    return None


# ---------------------------------------------------------------- stacked layers


def _widen(m: nn.Module, n: int, *counts: str) -> nn.Module:
    """A copy of m for n members: each parameter and non-scalar buffer n times as long along dim 0 (its
    values are loaded by FusedModel), and each attribute named in `counts` multiplied by n."""
    new = copy.deepcopy(m)
    for name, p in m.named_parameters(recurse=False):
        setattr(new, name, nn.Parameter(p.new_empty(n * p.shape[0], *p.shape[1:]), p.requires_grad))
    for name, b in m.named_buffers(recurse=False):
        if b.dim() > 0:
            setattr(new, name, b.new_empty(n * b.shape[0], *b.shape[1:]))
    for attr in counts:
        setattr(new, attr, getattr(m, attr) * n)
    return new


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
    """N Linear layers as one batched matmul, (B, N*in) -> (B, N*out); weight (N*out, in) and bias
    (N*out,) are the members' weights and biases one after another."""

    def __init__(self, linear: nn.Linear, members: int) -> None:
        super().__init__()
        self.members, self.in_features, self.out_features = members, linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.new_empty(members * self.out_features, self.in_features))
        bias = None if linear.bias is None else nn.Parameter(linear.bias.new_empty(members * self.out_features))
        self.register_parameter("bias", bias)

    def forward(self, x: Tensor) -> Tensor:
        n, b = self.members, x.shape[0]
        w = self.weight.view(n, self.out_features, self.in_features)
        bias = None if self.bias is None else self.bias.view(n, self.out_features)
        y = _BatchedLinear.apply(x.reshape(b, n, self.in_features), w, bias)  # (N, B, out)
        return y.transpose(0, 1).reshape(b, n * self.out_features)  # row-major again, as norms and activations like it


class StackedInstanceNorm(nn.GroupNorm):
    """InstanceNorm of N members: GroupNorm(N*C, N*C) on feature maps; on feature vectors, where
    InstanceNorm is layer norm, one group per member."""

    def __init__(self, norm: InstanceNorm, members: int) -> None:
        channels = members * norm.num_channels
        super().__init__(channels, channels, eps=norm.eps, affine=norm.affine)
        self.members = members

    def forward(self, x: Tensor) -> Tensor:
        groups = self.num_groups if x.dim() > 2 else self.members
        return F.group_norm(x, groups, self.weight, self.bias, self.eps)


class StackedRMSNorm(RMSNorm):
    """RMSNorm of N members: each example's mean square taken over its member's C (or C, H, W) values."""

    def __init__(self, norm: RMSNorm, members: int) -> None:
        affine = norm.weight is not None
        super().__init__(members * norm.weight.shape[0] if affine else 0, eps=norm.eps, affine=affine)
        self.members = members

    def forward(self, x: Tensor) -> Tensor:
        per_member = x.reshape(x.shape[0], self.members, -1)
        mean_square = per_member.square().mean(-1, keepdim=True)
        return self._scale_shift((per_member * torch.rsqrt(mean_square + self.eps)).view_as(x))


def _copy(m: nn.Module, n: int) -> nn.Module:
    """Layers without state that act on each channel alone (activations, pooling, flatten) stack as they are."""
    if isinstance(m, nn.Flatten) and (m.start_dim, m.end_dim) != (1, -1):
        raise TypeError(f"only Flatten(1, -1) stacks, not Flatten({m.start_dim}, {m.end_dim})")
    return copy.deepcopy(m)


STATELESS = (nn.Identity, nn.ReLU, nn.Sigmoid, nn.Tanh, nn.GELU, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Flatten)

# Layer type (exact, not subclasses) -> its stacked counterpart, built from one member's layer and N.
STACKERS: dict[type, Callable[[nn.Module, int], nn.Module]] = {
    nn.Linear: StackedLinear,
    nn.Conv2d: lambda m, n: _widen(m, n, "in_channels", "out_channels", "groups"),
    BatchNorm: lambda m, n: _widen(m, n, "num_features"),
    GhostBatchNorm: lambda m, n: _widen(m, n, "num_features"),  # chunks split the batch dim, the same for all members
    ManualBatchNorm: _widen,
    BatchRenorm: _widen,  # its r_max/d_max schedule counts steps, which the members share
    nn.GroupNorm: lambda m, n: _widen(m, n, "num_groups", "num_channels"),  # layer norm is GroupNorm(1, C)
    InstanceNorm: StackedInstanceNorm,
    RMSNorm: StackedRMSNorm,
    **{t: _copy for t in STATELESS},
}
# Modules without parameters of their own whose forward only calls children and adds their outputs.
CONTAINERS = (nn.Sequential, MLP, CNN, ResNet, Unit, BasicBlock)


def stack_module(m: nn.Module, n: int) -> nn.Module:
    """The stacked counterpart of m for n members (parameters and buffers not yet filled in)."""
    kind = type(m)
    if kind in STACKERS:
        return STACKERS[kind](m, n)
    if kind in CONTAINERS and not m._parameters and not m._buffers:
        new = copy.copy(m)
        new._parameters, new._buffers = {}, {}
        new._modules = {name: stack_module(child, n) for name, child in m.named_children()}
        return new
    raise TypeError(f"{kind.__name__} has no stacked counterpart (see bnlab.fused.STACKERS)")


def _member(v: Tensor, members: int, n: int) -> Tensor:
    """Member n's part of a stacked tensor; a scalar (num_batches_tracked) is shared by all members."""
    return v if v.dim() == 0 else v.unflatten(0, (members, -1))[n]


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
        self.net = stack_module(models[0], self.members)
        self.load_member_state_dicts(states)
        # Feature maps channels-last: CPU grouped convs (their backward most of all) and max-pooling run
        # markedly faster on them than on contiguous ones.
        self.channels_last = any(isinstance(m, nn.Conv2d) for m in self.net.modules())
        self.train(models[0].training)

    def forward(self, x: Tensor) -> Tensor:
        """Inputs (N, B, *example shape) -> logits (N, B, classes), member n applied to x[n]."""
        n, b = x.shape[:2]
        if n != self.members:
            raise ValueError(f"expected inputs for {self.members} members, got shape {tuple(x.shape)}")
        stacked = x.transpose(0, 1).reshape(b, n * x.shape[2], *x.shape[3:])  # (B, N*C, ...)
        if self.channels_last and stacked.dim() == 4:
            stacked = stacked.contiguous(memory_format=torch.channels_last)
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
        return {k: _member(v, self.members, n).clone() for k, v in self.net.state_dict().items()}


def build_fused(cfgs: Sequence[TrainConfig], in_shape: tuple[int, int, int], num_classes: int) -> FusedModel:
    """Each member built exactly as train.py builds its model (torch.manual_seed(seed), build_model), stacked."""
    models = []
    for cfg in cfgs:
        torch.manual_seed(cfg.seed)
        models.append(build_model(cfg, in_shape, num_classes))
    return FusedModel(models)


# ---------------------------------------------------------------- optimizers


class _StackedOptimizer(torch.optim.Optimizer):
    """Base of the stacked optimizers: each param group holds one lr and one weight decay per member
    (lists), applied along dim 0 of every parameter, whose i-th of N equal parts is member i's."""

    def __init__(
        self, params: Iterable[Tensor], members: int, lr: Sequence[float], weight_decay: Sequence[float], **defaults
    ) -> None:
        lr, weight_decay = [float(v) for v in lr], [float(v) for v in weight_decay]
        if len(lr) != members or len(weight_decay) != members:
            raise ValueError(f"need {members} learning rates and weight decays, got {len(lr)} and {len(weight_decay)}")
        self.members = members
        self._constants: dict[tuple, Tensor] = {}
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, **defaults))

    def _view(self, t: Tensor) -> Tensor:
        """t (N*d, ...) as (N, d, ...): a view, so in-place updates reach t."""
        return t.unflatten(0, (self.members, -1))

    def _per_member(self, values: Sequence[float], p: Tensor) -> Tensor:
        """values (N,) shaped to broadcast against self._view(p); made once per set of values, so that a
        step copies nothing from the host (on a GPU such a copy would wait for the queued work)."""
        key = (tuple(values), p.dtype, p.device, p.dim())
        if key not in self._constants:
            self._constants[key] = torch.tensor(values, dtype=p.dtype, device=p.device).view(-1, *[1] * p.dim())
        return self._constants[key]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                w, g = self._view(p), self._view(p.grad)
                if any(group["weight_decay"]):
                    g = torch.addcmul(g, self._per_member(group["weight_decay"], p), w)  # g + wd * w
                self._update(p, w, g, group)
        return loss

    def _update(self, p: Tensor, w: Tensor, g: Tensor, group: dict) -> None:
        """Update w, the (N, d, ...) view of parameter p, in place from its gradient g (weight decay added)."""
        raise NotImplementedError

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def member_state(self, n: int) -> dict[int, dict[str, Any]]:
        """Member n's part of the state, per parameter index: its slice of each (N, ...) tensor (copies);
        numbers (Adam's step count) are shared."""
        return {
            i: {k: v[n].clone() if torch.is_tensor(v) else v for k, v in self.state[p].items()}
            for i, p in enumerate(self._params())
            if p in self.state
        }

    def load_member_states(self, states: Sequence[dict[int, dict[str, Any]]]) -> None:
        """The state again from every member's `member_state`, in member order."""
        for i, p in enumerate(self._params()):
            if i in states[0]:
                self.state[p] = {
                    k: torch.stack([s[i][k] for s in states]).to(p.device) if torch.is_tensor(v) else v
                    for k, v in states[0][i].items()
                }


class StackedSGD(_StackedOptimizer):
    """torch.optim.SGD (heavy-ball momentum, no dampening, no Nesterov; weight decay added to the
    gradient) with one learning rate and weight decay per member."""

    def __init__(
        self,
        params: Iterable[Tensor],
        members: int,
        lr: Sequence[float],
        momentum: float = 0.0,
        weight_decay: Sequence[float] | None = None,
    ) -> None:
        super().__init__(params, members, lr, weight_decay or [0.0] * members, momentum=momentum)

    def _update(self, p: Tensor, w: Tensor, g: Tensor, group: dict) -> None:
        if group["momentum"]:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = g.clone()
            else:
                state["momentum_buffer"].mul_(group["momentum"]).add_(g)
            g = state["momentum_buffer"]
        w.addcmul_(self._per_member([-lr for lr in group["lr"]], p), g)  # w - lr * g, in place


class StackedAdam(_StackedOptimizer):
    """torch.optim.Adam (no AMSGrad; weight decay as L2 added to the gradient) with one learning rate
    and weight decay per member."""

    def __init__(
        self,
        params: Iterable[Tensor],
        members: int,
        lr: Sequence[float],
        weight_decay: Sequence[float] | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        super().__init__(params, members, lr, weight_decay or [0.0] * members, betas=betas, eps=eps)

    def _update(self, p: Tensor, w: Tensor, g: Tensor, group: dict) -> None:
        (beta1, beta2), state = group["betas"], self.state[p]
        if not state:
            state.update(step=0, exp_avg=torch.zeros_like(w), exp_avg_sq=torch.zeros_like(w))
        state["step"] += 1
        t, exp_avg, exp_avg_sq = state["step"], state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(g, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        step_size = self._per_member(group["lr"], p) / (1 - beta1**t)
        denom = (exp_avg_sq.sqrt() / (1 - beta2**t) ** 0.5).add_(group["eps"])
        w.addcdiv_(step_size * exp_avg, denom, value=-1.0)  # w - step_size * exp_avg / denom


STACKED_OPTIMIZERS: dict[str, Callable[[Iterable[Tensor], Sequence[OptimConfig]], torch.optim.Optimizer]] = {
    "sgd": lambda params, cfgs: StackedSGD(
        params, len(cfgs), [c.lr for c in cfgs], momentum=cfgs[0].momentum, weight_decay=[c.weight_decay for c in cfgs]
    ),
    "adam": lambda params, cfgs: StackedAdam(
        params, len(cfgs), [c.lr for c in cfgs], weight_decay=[c.weight_decay for c in cfgs]
    ),
}


def build_fused_optimizer(params: Iterable[Tensor], cfgs: Sequence[OptimConfig]) -> torch.optim.Optimizer:
    """The stacked counterpart of bnlab.optim.build_optimizer, member n taking cfgs[n].lr and .weight_decay."""
    return STACKED_OPTIMIZERS[cfgs[0].name](params, cfgs)


# ---------------------------------------------------------------- training and evaluation


def member_losses(logits: Tensor, y: Tensor) -> Tensor:
    """Each member's mean cross-entropy (N,) from logits (N, B, K) and targets (N, B); the fused loss is their sum."""
    n, b, k = logits.shape
    return F.cross_entropy(logits.reshape(n * b, k), y.reshape(n * b), reduction="none").view(n, b).mean(1)


@torch.no_grad()
def evaluate_fused(model: FusedModel, x: Tensor, y: Tensor) -> list[tuple[float, float]]:
    """Each member's (mean cross-entropy, accuracy) over the shared (x, y) in eval mode, as train.evaluate."""
    n, chunk = model.members, max(1, EVAL_CHUNK // model.members)
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros(n, device=x.device, dtype=x.dtype)
    correct = torch.zeros(n, device=x.device)
    for start in range(0, len(x), chunk):
        xc, yc = x[start : start + chunk], y[start : start + chunk]
        logits = model(xc.expand(n, *xc.shape))
        loss_sum += member_losses(logits, yc.expand(n, -1)) * len(yc)
        correct += (logits.argmax(-1) == yc).sum(1)
    model.train(was_training)
    return [(loss / len(x), acc / len(x)) for loss, acc in zip(loss_sum.tolist(), correct.tolist())]


class Fused:
    """The engine of a fused group, bnlab.train's loop driving it as it drives `bnlab.train.Single`: the
    runs as one FusedModel with a stacked optimizer, member n drawing its batches as its separate run
    would. `step` hands back each member's loss and count of correct predictions (N,), unread. A member
    whose loss turns non-finite goes on in the stack (its values are its own, so it disturbs no other)
    while its Run records no more steps."""

    def __init__(
        self,
        cfgs: Sequence[TrainConfig],
        data: Dataset,
        device: torch.device,
        checkpoints: Sequence[dict] | None = None,
    ) -> None:
        reason = can_fuse(cfgs)
        if reason:
            raise ConfigError(f"these runs cannot be fused: {reason}")
        self.cfgs, self.data, self.device, self.members = list(cfgs), data, device, len(cfgs)
        self.model = prepare_model(build_fused(cfgs, data.in_shape, data.num_classes), cfgs[0].trainer, device)
        if checkpoints:
            self.model.load_member_state_dicts([c["model"] for c in checkpoints])
        self.optimizer = build_fused_optimizer(self.model.parameters(), [c.optim for c in cfgs])
        self.orders = [
            batches(len(data.train_y), c.data.batch_size, torch.Generator(device=device).manual_seed(c.seed))
            for c in cfgs
        ]
        log.info(
            "%d %s runs fused: %s, %d parameters, %d training examples",
            self.members,
            cfgs[0].model.name,
            device,
            sum(p.numel() for p in self.model.parameters()),
            len(data.train_y),
        )
        if checkpoints:
            self.optimizer.load_member_states([c["optimizer"] for c in checkpoints])
            for order in self.orders:  # the batch orders go on where they stopped
                for _ in range(checkpoints[0]["step"]):
                    next(order)

    def step(self, step: int) -> tuple[Tensor, Tensor]:
        n = self.members
        idx = torch.stack([next(o) for o in self.orders], 1).flatten()  # (B*N,), example-major: the stacked layout
        x = self.data.train_x.index_select(0, idx).unflatten(0, (-1, n)).transpose(0, 1)  # (N, B, ...), a view
        y = self.data.train_y.index_select(0, idx).view(-1, n).t()
        with autocast(self.cfgs[0].trainer, self.device):
            logits = self.model(x)
            losses = member_losses(logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()
        self.optimizer.step()
        return losses.detach().float(), (logits.argmax(-1) == y).sum(1)

    def evaluate(self) -> list[tuple[float, float]]:
        with autocast(self.cfgs[0].trainer, self.device):
            return evaluate_fused(self.model, self.data.test_x, self.data.test_y)

    def lrs(self) -> list[float]:
        return list(self.optimizer.param_groups[0]["lr"])

    def member_state(self, n: int) -> dict[str, Any]:
        """Member n's checkpoint: its model as the ordinary model's state_dict, its part of the optimizer."""
        return {"model": self.model.member_state_dict(n), "optimizer": self.optimizer.member_state(n)}

    def member_model(self, n: int) -> nn.Module:
        """Member n as an ordinary model (a copy)."""
        dtype = next(self.model.parameters()).dtype
        model = build_model(self.cfgs[n], self.data.in_shape, self.data.num_classes).to(device=self.device, dtype=dtype)
        model.load_state_dict(self.model.member_state_dict(n))
        return model


def activation_bytes(engine: Fused | Single) -> int:
    """Bytes of the activations autograd keeps for backward during one training step of `engine` (a fused
    group or, for comparison, one run): the storages of the tensors it saves, each counted once, the
    parameters' own left out. scripts/bench_fused.py prints it; a test holds N members to N runs' worth."""
    params = {p.untyped_storage().data_ptr() for p in engine.model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        engine.step(1)
    return sum(storages.values())
