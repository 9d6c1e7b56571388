"""Optimizers by name: the `optim` config group's registry, each entry torch's class and the optim.* keys it
takes (fused runs use its stacked form, bnlab.run.fused.optim). Either form can clip its gradients adaptively
before each step (optim.agc, Brock et al. 2021; per member for fused runs). Also the learning-rate schedule
(optim.schedule, optim.warmup_steps): the lr of each step is a function of the step alone, so a resumed run
continues it exactly."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from bnlab.core.norms import norm_parameters

if TYPE_CHECKING:
    from bnlab.schema.config import OptimConfig


@dataclass(frozen=True)
class Optimizer:
    """One optimizer: torch's class and the optim.* keys it takes, by the same names (lists become tuples)."""

    cls: type[torch.optim.Optimizer]
    keys: tuple[str, ...]

    def settings(self, cfg: OptimConfig) -> dict[str, Any]:
        values = {k: getattr(cfg, k) for k in self.keys}
        return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


# Fused runs use each class's stacked form (bnlab.run.fused.optim), which takes every key per member.
OPTIMIZERS: dict[str, Optimizer] = {
    "sgd": Optimizer(torch.optim.SGD, ("lr", "momentum", "weight_decay")),
    "adam": Optimizer(torch.optim.Adam, ("lr", "betas", "eps", "weight_decay")),
    "adamw": Optimizer(torch.optim.AdamW, ("lr", "betas", "eps", "weight_decay")),  # weight decay decoupled
}


AGC_EPS = 1e-3  # Brock et al.: a unit's weight norm counts as at least this, so zero-initialised weights can move


def unitwise_norm(t: Tensor, members: int = 1) -> Tensor:
    """Brock et al.'s unit-wise L2 norm, shaped to broadcast against t: per output unit (row along dim 0) of a
    weight matrix or conv kernel; over the whole of a vector or scalar (a bias, a gain), taken per member
    for the N members' vectors of a fused run (bnlab.run.fused.stacking's layout)."""
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


def clip_before_steps(optimizer: torch.optim.Optimizer, model: nn.Module, clipping: Sequence[float]) -> None:
    """optim.agc > 0 (of any member): clip every parameter's gradient but the final layer's before each step,
    as Brock et al. do (clipping the classifier hurt them)."""
    if any(clipping):
        head = {id(p) for p in final_layer(model).parameters()}
        params = [p for p in model.parameters() if id(p) not in head]
        optimizer.register_step_pre_hook(lambda *_: clip_gradients(params, clipping))


def param_groups(model: nn.Module, cfg: OptimConfig, no_decay: Any = 0.0) -> list[dict[str, Any]]:
    """The model's parameters as the optimizer takes them: one group, or with optim.decay_norm=false the norm
    layers' parameters in a second group whose weight decay is `no_decay` (a fused run's: 0 per member)."""
    norms = {id(p) for p in norm_parameters(model)}
    if cfg.decay_norm or not norms:
        return [{"params": list(model.parameters())}]
    decayed, undecayed = [], []
    for p in model.parameters():
        (undecayed if id(p) in norms else decayed).append(p)
    return [{"params": decayed}, {"params": undecayed, "weight_decay": no_decay}]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer of the model's parameters that cfg names, clipping adaptively with optim.agc > 0."""
    entry = OPTIMIZERS[cfg.name]
    optimizer = entry.cls(param_groups(model, cfg), **entry.settings(cfg))
    clip_before_steps(optimizer, model, [cfg.agc])
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


def schedule_lr(optimizer: torch.optim.Optimizer, cfg: OptimConfig, step: int, max_steps: int) -> None:
    """Set the lr of optimizer step `step`: optim.lr times lr_factor."""
    for group in optimizer.param_groups:
        group["lr"] = cfg.lr * lr_factor(cfg, step, max_steps)
