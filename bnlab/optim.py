"""Optimizers by name: the `optim` config group's registry. Each entry builds the ordinary optimizer and,
for fused runs, its stacked form: every optim.* value per member (lr, weight decay, momentum, betas,
eps, schedule, clipping), applied along dim 0 of every stacked parameter (bnlab.stacking's layout), each
member's update exactly its separate run's. Either form can clip its gradients adaptively before each
step (optim.agc, Brock et al. 2021). Also the learning-rate schedule (optim.schedule, optim.warmup_steps):
the lr of each step is a function of the step alone, so a resumed run continues it exactly."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from bnlab.schema import OptimConfig


class _StackedOptimizer(torch.optim.Optimizer):
    """Base of the stacked optimizers: each param group holds every setting as a list of one value per
    member (lr, weight decay, momentum, ...), applied along dim 0 of every parameter, whose i-th of N
    equal parts is member i's; `scale` holds each member's schedule factor of its lr (schedule_lr)."""

    def __init__(self, params: Iterable[Tensor], members: int, **settings: Sequence) -> None:
        for name, values in settings.items():
            if len(values) != members:
                raise ValueError(f"need {members} values of {name}, one per member, got {len(values)}")
        self.members = members
        self._constants: dict[tuple, tuple[tuple, Tensor]] = {}
        super().__init__(params, {"scale": [1.0] * members, **{name: list(v) for name, v in settings.items()}})

    def _view(self, t: Tensor) -> Tensor:
        """t (N*d, ...) as (N, d, ...): a view, so in-place updates reach t."""
        return t.unflatten(0, (self.members, -1))

    def _per_member(self, name: str, values: Sequence[float], p: Tensor) -> Tensor:
        """values (N,) shaped to broadcast against self._view(p); made again only when the values change
        (a step that makes one copies from the host, which on a GPU waits for the queued work)."""
        key, values = (name, p.dtype, p.device, p.dim()), tuple(float(v) for v in values)
        if key not in self._constants or self._constants[key][0] != values:
            tensor = torch.tensor(values, dtype=p.dtype, device=p.device).view(-1, *[1] * p.dim())
            self._constants[key] = (values, tensor)
        return self._constants[key][1]

    def _lr(self, group: dict, p: Tensor, sign: float = 1.0) -> tuple[Tensor, float]:
        """This step's lr of each member, times `sign`, as (per-member tensor, factor): the members' lrs and
        their common schedule factor, so a schedule shared by the group copies nothing per step; where
        the members' schedules differ, their scheduled lrs (made anew as they change) and 1."""
        scales = group["scale"]
        if len(set(scales)) == 1:
            return self._per_member(f"{sign}lr", [sign * lr for lr in group["lr"]], p), scales[0]
        return self._per_member(f"{sign}lr*scale", [sign * lr for lr in _lrs(group)], p), 1.0

    def _value(self, name: str, values: Sequence[float], p: Tensor) -> float | Tensor:
        """The members' common value as a number (a group whose members share it computes as their runs
        do), or else their values per member."""
        return float(values[0]) if len(set(values)) == 1 else self._per_member(name, values, p)

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
                    g = torch.addcmul(g, self._per_member("weight_decay", group["weight_decay"], p), w)  # g + wd * w
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


def _lrs(group: dict) -> list[float]:
    """Each member's lr of this step: optim.lr times its schedule factor."""
    return [lr * scale for lr, scale in zip(group["lr"], group["scale"])]


class StackedSGD(_StackedOptimizer):
    """torch.optim.SGD (heavy-ball momentum, no dampening, no Nesterov; weight decay added to the
    gradient) with each member's lr, momentum and weight decay."""

    def _update(self, p: Tensor, w: Tensor, g: Tensor, group: dict) -> None:
        if any(group["momentum"]):  # a member without momentum: 0 * buffer + g = g, its plain SGD step
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = g.clone()
            else:
                state["momentum_buffer"].mul_(self._value("momentum", group["momentum"], p)).add_(g)
            g = state["momentum_buffer"]
        lr, factor = self._lr(group, p, sign=-1.0)
        w.addcmul_(lr, g, value=factor)  # w - lr * g, in place


class StackedAdam(_StackedOptimizer):
    """torch.optim.Adam (no AMSGrad; weight decay as L2 added to the gradient) with each member's lr,
    betas, eps and weight decay."""

    def _update(self, p: Tensor, w: Tensor, g: Tensor, group: dict) -> None:
        beta1 = self._value("beta1", [b[0] for b in group["betas"]], p)
        beta2 = self._value("beta2", [b[1] for b in group["betas"]], p)
        state = self.state[p]
        if not state:
            state.update(step=0, exp_avg=torch.zeros_like(w), exp_avg_sq=torch.zeros_like(w))
        state["step"] += 1
        t, exp_avg, exp_avg_sq = state["step"], state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(g, 1 - beta1)
        if torch.is_tensor(beta2):
            exp_avg_sq.mul_(beta2).addcmul_(g * (1 - beta2), g)
        else:
            exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        lr, factor = self._lr(group, p)
        step_size = lr * (factor / (1 - beta1**t))
        denom = (exp_avg_sq.sqrt() / (1 - beta2**t) ** 0.5).add_(self._value("eps", group["eps"], p))
        w.addcdiv_(step_size * exp_avg, denom, value=-1.0)  # w - step_size * exp_avg / denom


@dataclass(frozen=True)
class Optimizer:
    build: Callable[[Iterable[Tensor], OptimConfig], torch.optim.Optimizer]
    # N members' optimizer from their configs, each member with its own optim.* values; None: it cannot be fused
    stacked: Callable[[Iterable[Tensor], Sequence[OptimConfig]], torch.optim.Optimizer] | None = None


def _settings(cfgs: Sequence[OptimConfig], *keys: str) -> dict[str, list]:
    """keys -> the members' values (lists, such as betas, as tuples)."""
    return {k: [tuple(v) if isinstance(v, list) else v for v in (getattr(c, k) for c in cfgs)] for k in keys}


OPTIMIZERS: dict[str, Optimizer] = {
    "sgd": Optimizer(
        lambda params, cfg: torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay),
        lambda params, cfgs: StackedSGD(params, len(cfgs), **_settings(cfgs, "lr", "momentum", "weight_decay")),
    ),
    "adam": Optimizer(
        lambda params, cfg: torch.optim.Adam(
            params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay
        ),
        lambda params, cfgs: StackedAdam(params, len(cfgs), **_settings(cfgs, "lr", "betas", "eps", "weight_decay")),
    ),
}


AGC_EPS = 1e-3  # Brock et al.: a unit's weight norm counts as at least this, so zero-initialised weights can move


def unitwise_norm(t: Tensor, members: int = 1) -> Tensor:
    """Brock et al.'s unit-wise L2 norm, shaped to broadcast against t: per output unit (row along dim 0) of a
    weight matrix or conv kernel; over the whole of a vector or scalar (a bias, a gain), taken per member
    for the N members' vectors of a fused run (bnlab.stacking's layout)."""
    if t.dim() > 1:
        return t.flatten(1).norm(dim=1).view(-1, *[1] * (t.dim() - 1))
    return t.reshape(members, -1).norm(dim=1).repeat_interleave(t.numel() // members).view_as(t)


def _per_unit(values: Sequence[float], t: Tensor) -> Tensor:
    """N members' values, one for each unit of t (its N equal parts along dim 0), shaped as unitwise_norm(t)."""
    units = t.shape[0] if t.dim() > 1 else t.numel()
    per_unit = torch.tensor(values, dtype=t.dtype, device=t.device).repeat_interleave(units // len(values))
    return per_unit.view(-1, *[1] * (t.dim() - 1)) if t.dim() > 1 else per_unit.view_as(t)


@torch.no_grad()
def clip_gradients(params: Iterable[Tensor], clipping: float | Sequence[float], members: int = 1) -> None:
    """Adaptive gradient clipping (Brock, De, Smith & Simonyan 2021, arXiv 2102.06171, eq. 3), in place:
    per unit i (`unitwise_norm`) of each parameter W with gradient G,
    G_i <- clipping * max(||W_i||, 1e-3) / ||G_i|| * G_i  where ||G_i|| / max(||W_i||, 1e-3) > clipping,
    and G_i unchanged otherwise. `clipping`: one lambda, or one per member of a fused run (0: unclipped)."""
    if not isinstance(clipping, (int, float)):
        members = len(clipping)
        if len(set(clipping)) == 1:
            clipping = clipping[0]
    for p in params:
        if p.grad is None:
            continue
        limit = clipping if isinstance(clipping, (int, float)) else _per_unit([c or math.inf for c in clipping], p)
        max_norm = unitwise_norm(p, members).clamp_min(AGC_EPS) * limit
        grad_norm = unitwise_norm(p.grad, members)
        p.grad.mul_(torch.where(grad_norm > max_norm, max_norm / grad_norm.clamp_min(1e-6), 1.0))


def final_layer(model: nn.Module) -> nn.Module:
    """The model's last layer with a weight matrix or kernel, in module order: the classifier of bnlab's
    models (and of a fused model's)."""
    return [m for m in model.modules() if isinstance(getattr(m, "weight", None), Tensor) and m.weight.dim() > 1][-1]


def _clip_before_steps(optimizer: torch.optim.Optimizer, model: nn.Module, clipping: Sequence[float]) -> None:
    """optim.agc > 0 (of any member): clip every parameter's gradient but the final layer's before each step,
    as Brock et al. do (clipping the classifier hurt them)."""
    if any(clipping):
        head = {id(p) for p in final_layer(model).parameters()}
        params = [p for p in model.parameters() if id(p) not in head]
        optimizer.register_step_pre_hook(lambda *_: clip_gradients(params, clipping))


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer of the model's parameters that cfg names, clipping adaptively with optim.agc > 0."""
    optimizer = OPTIMIZERS[cfg.name].build(model.parameters(), cfg)
    _clip_before_steps(optimizer, model, [cfg.agc])
    return optimizer


def build_stacked_optimizer(model: nn.Module, cfgs: Sequence[OptimConfig]) -> torch.optim.Optimizer:
    """The stacked counterpart of build_optimizer for a fused model of len(cfgs) members, member n taking
    cfgs[n]'s values (lr, momentum, ..., optim.agc)."""
    optimizer = OPTIMIZERS[cfgs[0].name].stacked(model.parameters(), cfgs)
    _clip_before_steps(optimizer, model, [c.agc for c in cfgs])
    return optimizer


# ---------------------------------------------------------------- the learning-rate schedule

SCHEDULES = ("none", "step", "cosine")


def lr_factor(cfg: OptimConfig, step: int, max_steps: int) -> float:
    """The multiple of optim.lr that optimizer step `step` (1, 2, ..., max_steps) takes.

    Warm-up: steps 1 to w = optim.warmup_steps take step / w (linear, reaching 1 at step w). After it,
    with s = step - w - 1 the steps since the warm-up (0 for the first) and T = max_steps - w:
    none: 1; step: decay_factor ** (s // decay_every) (torch's StepLR, stepped every step); cosine:
    (1 + cos(pi * s / T)) / 2 (torch's CosineAnnealingLR with T_max = T, from 1 down to nearly 0).
    """
    w = cfg.warmup_steps
    if step <= w:
        return step / w
    s = step - w - 1
    if cfg.schedule == "step":
        return cfg.decay_factor ** (s // cfg.decay_every)
    if cfg.schedule == "cosine":
        return (1 + math.cos(math.pi * s / max(1, max_steps - w))) / 2
    return 1.0


def schedule_lr(optimizer: torch.optim.Optimizer, cfgs: Sequence[OptimConfig], step: int, max_steps: int) -> None:
    """Set the lr of optimizer step `step`: optim.lr times lr_factor, each member's by its own schedule
    (cfgs: one per member of a stacked optimizer, else one)."""
    factors = [lr_factor(cfg, step, max_steps) for cfg in cfgs]
    for group in optimizer.param_groups:
        if isinstance(optimizer, _StackedOptimizer):
            group["scale"] = factors
        else:
            group["lr"] = cfgs[0].lr * factors[0]


def current_lrs(optimizer: torch.optim.Optimizer) -> list[float]:
    """The lr of the last step (before the first: optim.lr), one per member of a stacked optimizer."""
    group = optimizer.param_groups[0]
    if isinstance(optimizer, _StackedOptimizer):
        return _lrs(group)
    return [group["lr"]]
