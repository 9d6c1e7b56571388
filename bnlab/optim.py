"""Optimizers by name: the `optim` config group's registry. Each entry builds the ordinary optimizer and,
for fused runs, its stacked form: every optim.* value per member (lr, weight decay, momentum, betas,
eps), applied along dim 0 of every stacked parameter (bnlab.stacking's layout), each member's update
exactly its separate run's."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from bnlab.config import OptimConfig


class _StackedOptimizer(torch.optim.Optimizer):
    """Base of the stacked optimizers: each param group holds every setting as a list of one value per
    member (lr, weight decay, momentum, ...), applied along dim 0 of every parameter, whose i-th of N
    equal parts is member i's."""

    def __init__(self, params: Iterable[Tensor], members: int, **settings: Sequence) -> None:
        for name, values in settings.items():
            if len(values) != members:
                raise ValueError(f"need {members} values of {name}, one per member, got {len(values)}")
        self.members = members
        self._constants: dict[tuple, tuple[tuple, Tensor]] = {}
        super().__init__(params, {name: list(values) for name, values in settings.items()})

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
        w.addcmul_(self._per_member("-lr", [-lr for lr in group["lr"]], p), g)  # w - lr * g, in place


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
        step_size = self._per_member("lr", group["lr"], p) / (1 - beta1**t)
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


def build_optimizer(params: Iterable[Tensor], cfg: OptimConfig) -> torch.optim.Optimizer:
    return OPTIMIZERS[cfg.name].build(params, cfg)


def build_stacked_optimizer(params: Iterable[Tensor], cfgs: Sequence[OptimConfig]) -> torch.optim.Optimizer:
    """The stacked counterpart of build_optimizer, member n taking cfgs[n]'s values."""
    return OPTIMIZERS[cfgs[0].name].stacked(params, cfgs)
