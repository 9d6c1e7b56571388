"""The stacked optimizers of fused runs: every optim.* value per member (lr, weight decay, momentum, betas, eps,
schedule, clipping), applied along dim 0 of every stacked parameter (bnlab.run.fused.stacking's layout), each
member's update exactly its separate run's. `STACKED` maps each torch optimizer of bnlab.core.optim's registry to
its stacked form; an optimizer without one cannot be fused."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from bnlab.core.optim import OPTIMIZERS, clip_before_steps, lr_factor, param_groups

if TYPE_CHECKING:
    from bnlab.schema.config import OptimConfig


class _StackedOptimizer(torch.optim.Optimizer):
    """Base of the stacked optimizers: each param group holds every setting as a list of one value per
    member (lr, weight decay, momentum, ...), applied along dim 0 of every parameter, whose i-th of N
    equal parts is member i's; `scale` holds each member's schedule factor of its lr (`schedule`)."""

    decoupled = False  # weight decay added to the gradient (L2); AdamW's decays the weights themselves

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
                    wd = self._per_member("weight_decay", group["weight_decay"], p)
                    if self.decoupled:  # AdamW: w * (1 - lr * wd), then the update
                        lr, factor = self._lr(group, p)
                        w.mul_(1 - lr * factor * wd)
                    else:
                        g = torch.addcmul(g, wd, w)  # g + wd * w
                self._update(p, w, g, group)
        return loss

    def _update(self, p: Tensor, w: Tensor, g: Tensor, group: dict) -> None:
        """Update w, the (N, d, ...) view of parameter p, in place from its gradient g (weight decay added)."""
        raise NotImplementedError

    def schedule(self, cfgs: Sequence[OptimConfig], step: int, max_steps: int) -> None:
        """Set the lr of optimizer step `step`: each member's optim.lr times its own lr_factor."""
        for group in self.param_groups:
            group["scale"] = [lr_factor(cfg, step, max_steps) for cfg in cfgs]

    def lrs(self) -> list[float]:
        """Each member's lr of the last step (before the first: optim.lr)."""
        return _lrs(self.param_groups[0])

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


class StackedAdamW(StackedAdam):
    """torch.optim.AdamW: Adam with decoupled weight decay (each weight times 1 - lr * weight decay before the
    update), with each member's lr, betas, eps and weight decay."""

    decoupled = True


STACKED: dict[type[torch.optim.Optimizer], type[_StackedOptimizer]] = {
    torch.optim.SGD: StackedSGD,
    torch.optim.Adam: StackedAdam,
    torch.optim.AdamW: StackedAdamW,
}


def build_stacked_optimizer(model: nn.Module, cfgs: Sequence[OptimConfig]) -> _StackedOptimizer:
    """The stacked counterpart of bnlab.core.optim.build_optimizer for a fused model of len(cfgs) members,
    member n taking cfgs[n]'s values (lr, momentum, ..., optim.agc)."""
    entry = OPTIMIZERS[cfgs[0].name]
    per_member = [entry.settings(c) for c in cfgs]
    groups = param_groups(model, cfgs[0], no_decay=[0.0] * len(cfgs))  # optim.decay_norm is shared by the members
    optimizer = STACKED[entry.cls](groups, len(cfgs), **{k: [s[k] for s in per_member] for k in entry.keys})
    clip_before_steps(optimizer, model, [c.agc for c in cfgs])
    return optimizer
