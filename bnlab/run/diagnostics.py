"""Diagnostics of what a norm does to training: internal covariate shift and loss-landscape smoothness
(Santurkar et al. 2018), activation percentiles (Ioffe & Szegedy 2015, Fig. 1), gradient norms,
running-statistics drift, and precise BN (re-estimating running statistics after training).

Every function leaves the model as it found it: parameters, .grad, buffers (running statistics, step
counters) and each module's train/eval mode. The "layers" are the model's `Unit`s in forward order;
layer i's weight W_i is `units(model)[i].layer.weight`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from bnlab.core.data import TASKS, Task
from bnlab.core.models import Unit
from bnlab.schema import tags
from bnlab.schema.config import LANDSCAPE_STEPS, ConfigError

if TYPE_CHECKING:
    from bnlab.run.engine import Processes

RUNNING_STATS = ("running_mean", "running_var", "running_std")  # the buffers a norm estimates the population with
NOISE_SEED = 0  # every forward pass of one diagnostic draws the same noise (noisy_batch), so noise is no signal
CLASSIFICATION = TASKS["classification"]


def units(model: nn.Module) -> list[Unit]:
    """The model's layer-norm-activation units in forward order (ResNet blocks: `first`, then `second`)."""
    return [m for m in model.modules() if isinstance(m, Unit)]


@contextmanager
def _mode(model: nn.Module, training: bool) -> Iterator[None]:
    """Every module in train (or eval) mode for the block; afterwards each gets its own mode back."""
    modes = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield
    finally:
        for m, was_training in modes:
            m.training = was_training


def _loss_and_grads(
    model: nn.Module, params: dict[str, Tensor], x: Tensor, y: Tensor, wrt: list[str], task: Task
) -> tuple[float, tuple[Tensor, ...]]:
    """Train-mode (batch statistics) mean loss of `task` on (x, y) with the parameters `params`, and its
    gradient w.r.t. each of params[wrt]. Running statistics are updated on copies and thrown away; the
    global RNG is seeded with NOISE_SEED for the pass and restored after it."""
    leaves = {k: v.detach().requires_grad_(k in wrt) for k, v in params.items()}
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    with _mode(model, training=True), torch.random.fork_rng():
        torch.manual_seed(NOISE_SEED)
        loss = task.loss(functional_call(model, {**leaves, **buffers}, (x,)), y).mean()
    return loss.item(), torch.autograd.grad(loss, [leaves[k] for k in wrt], materialize_grads=True)


def _flat(tensors: tuple[Tensor, ...]) -> Tensor:
    return torch.cat([t.flatten() for t in tensors])


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    """Copies of every parameter by name: take one just before `optimizer.step()`."""
    return {k: p.detach().clone() for k, p in model.named_parameters()}


def deltas(model: nn.Module, before: dict[str, Tensor]) -> dict[str, Tensor]:
    """The update of the step since `before` = snapshot(model): param_after - param_before per name."""
    return {k: p.detach() - before[k] for k, p in model.named_parameters()}


def internal_covariate_shift(
    model: nn.Module, x: Tensor, y: Tensor, deltas: dict[str, Tensor], task: Task = CLASSIFICATION
) -> list[tuple[float, float]]:
    """Per layer i, (||G - G'||_2, cos(G, G')) for the step t that just happened (Santurkar et al.).

    Call it right after `optimizer.step()`: the model holds theta_t + deltas, so the weights of step t
    are theta_t = param - deltas[name]. G is the gradient of the loss on (x, y) w.r.t. W_i at theta_t;
    G' the same gradient on the same batch with only the parameters before layer i updated (those that
    come before W_i in `model.named_parameters()`: the earlier units' weights, biases and norm
    gamma/beta, and in a ResNet the shortcuts of earlier blocks), W_i and all later ones at theta_t.
    Layer 0 has no parameters before it, so G' = G: (0.0, 1.0). Train-mode forward passes.
    """
    params = dict(model.named_parameters())
    after = {k: p.detach() for k, p in params.items()}
    before = {k: p - deltas[k] for k, p in after.items()}
    names = list(params)
    name_of = {id(p): k for k, p in params.items()}
    weights = [name_of[id(u.layer.weight)] for u in units(model)]
    _, grads = _loss_and_grads(model, before, x, y, weights, task)  # G of every layer in one pass
    shifts = []
    for weight, g in zip(weights, grads):
        preceding = names[: names.index(weight)]
        if not preceding:
            shifts.append((0.0, 1.0))
            continue
        moved = {**before, **{k: after[k] for k in preceding}}
        _, (g_shifted,) = _loss_and_grads(model, moved, x, y, [weight], task)
        shifts.append(
            ((g - g_shifted).norm().item(), F.cosine_similarity(g.flatten(), g_shifted.flatten(), dim=0).item())
        )
    return shifts


def landscape(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    lr: float,
    num: int = 8,
    steps: tuple[float, float] = LANDSCAPE_STEPS,
    task: Task = CLASSIFICATION,
) -> dict[str, float]:
    """Loss-landscape smoothness along the gradient g of all parameters on (x, y) (Santurkar et al.).

    For `num` step sizes eta linearly spaced over [steps[0], steps[1]] x lr (the paper: [0.5, 4] for VGG,
    [1/100, 30] for its deep linear network), at theta - eta * g: loss_variation = max - min of the loss;
    grad_predictiveness = max - min of ||grad - g||_2; beta_smoothness = max of ||grad - g||_2 / ||eta * g||_2.
    The ends of both ranges come with them (loss_min, loss_max, grad_change_min, grad_change_max), for
    the paper's bands. Train-mode forward passes.
    """
    theta = {k: p.detach() for k, p in model.named_parameters()}
    names = list(theta)
    _, g = _loss_and_grads(model, theta, x, y, names, task)
    g_flat = _flat(g)
    etas = torch.linspace(steps[0] * lr, steps[1] * lr, num, dtype=torch.float64)
    losses, changes = [], []
    for eta in etas.tolist():
        moved = {k: theta[k] - eta * gk for k, gk in zip(names, g)}
        loss, grads = _loss_and_grads(model, moved, x, y, names, task)
        losses.append(loss)
        changes.append((_flat(grads) - g_flat).norm().item())
    change = torch.tensor(changes, dtype=torch.float64)  # ||grad L(theta - eta * g) - g||_2 per eta
    return {
        "loss_variation": max(losses) - min(losses),
        "grad_predictiveness": (change.max() - change.min()).item(),
        "beta_smoothness": (change / (etas * g_flat.norm().item())).max().item(),
        "loss_min": min(losses),
        "loss_max": max(losses),
        "grad_change_min": change.min().item(),
        "grad_change_max": change.max().item(),
    }


@torch.no_grad()
def activations(model: nn.Module, x: Tensor, layers: list[int]) -> dict[int, Tensor]:
    """The input to each chosen layer's nonlinearity (`unit.act`) on x in eval mode, keyed by the index
    as given (negative counts from the end: -1 is the last hidden layer); shape (N, C) or (N, C, H, W)."""
    chosen = units(model)
    captured: dict[int, Tensor] = {}

    def keep(i: int) -> Callable[[nn.Module, tuple[Tensor, ...]], None]:
        def hook(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            captured[i] = inputs[0].detach()

        return hook

    hooks = [chosen[i].act.register_forward_pre_hook(keep(i)) for i in layers]
    try:
        with _mode(model, training=False):
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def _percentiles(values: Tensor, q: tuple[float, ...]) -> list[float]:
    """numpy's linear-interpolation percentiles (no size limit, unlike torch.quantile)."""
    return np.percentile(values.double().cpu().numpy(), q).tolist()


def activation_percentiles(
    model: nn.Module, x: Tensor, layers: list[int], q: tuple[float, ...] = (15, 50, 85)
) -> dict[int, dict[str, list[float]]]:
    """Percentiles `q` (in %) of each chosen layer's nonlinearity input on the probe batch x, eval mode:
    "all" over every unit (and position), "unit0" over unit (channel) 0 alone (Ioffe & Szegedy Fig. 1b,c)."""
    return {
        i: {"all": _percentiles(a, q), "unit0": _percentiles(a[:, 0], q)}
        for i, a in activations(model, x, layers).items()
    }


def grad_norms(model: nn.Module) -> dict[str, float]:
    """L2 norm of each layer weight's .grad ("layer0", "layer1", ...); layers without a .grad are left out."""
    return {
        f"layer{i}": u.layer.weight.grad.norm().item()
        for i, u in enumerate(units(model))
        if u.layer.weight.grad is not None
    }


def running_stats(model: nn.Module) -> dict[str, Tensor]:
    """Copies of every norm layer's running statistics, keyed by buffer name ("1.norm.running_mean", ...)."""
    return {k: b.detach().clone() for k, b in model.named_buffers() if k.rsplit(".", 1)[-1] in RUNNING_STATS}


def drift(before: dict[str, Tensor], after: dict[str, Tensor]) -> dict[str, float]:
    """L2 norm of the change of each running statistic between two `running_stats` snapshots."""
    return {k: (after[k] - v).norm().item() for k, v in before.items()}


def _batch_indices(
    n: int, batch_size: int, num_batches: int, generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """(num_batches, batch_size) example indices: consecutive slices of randperm(n), a fresh permutation per
    pass over the data."""
    passes = -(-num_batches * batch_size // n)
    perm = torch.cat([torch.randperm(n, generator=generator, device=device) for _ in range(passes)])
    return perm[: num_batches * batch_size].view(num_batches, batch_size)


@torch.no_grad()
def precise_bn(
    model: nn.Module,
    x_train: Tensor,
    batch_size: int,
    num_batches: int = 200,
    generator: torch.Generator | None = None,
    group: Processes | None = None,
) -> None:
    """Precise BN (fvcore, pycls): set every norm layer's running statistics to the plain average, over
    `num_batches` training batches of `batch_size`, of the per-batch statistics the layer itself stores.

    Each batch runs in train mode with the layer's momentum set to 1 and its buffers reset to their
    values at the call, so every batch sees the same running statistics and step counter (Batch
    Renorm's r, d and schedule depend on them) and the layer stores exactly that batch's statistics:
    the mean and the unbiased variance (torch's convention for running_var; Ghost BN: the averages over
    its virtual batches), for Batch Renorm the std sqrt(unbiased variance + eps), so its running_std
    becomes the average of per-batch stds. Afterwards momentum, step counters and modes are as before
    and parameters untouched; layers without running statistics are left alone. The batches come from
    `generator` (None: torch's global RNG), on its device. In a distributed run (`group`, bnlab.run.engine)
    each process takes its share of every batch, as in training, and the averages are all-reduced: the
    statistics are then the average over the processes' shares (over whole batches for a synchronized norm).
    """
    norms = [m for m in model.modules() if getattr(m, "running_mean", None) is not None]
    saved = [{k: b.clone() for k, b in m.named_buffers(recurse=False)} for m in norms]
    momenta = [m.momentum for m in norms]
    sums = [{k: torch.zeros_like(b) for k, b in m.named_buffers(recurse=False) if k in RUNNING_STATS} for m in norms]

    def reset() -> None:
        for m, buffers in zip(norms, saved):
            for k, b in buffers.items():
                getattr(m, k).copy_(b)

    device = generator.device if generator is not None else x_train.device
    try:
        with _mode(model, training=True):
            for m in norms:
                m.momentum = 1.0  # running statistic = this batch's
            for idx in _batch_indices(len(x_train), batch_size, num_batches, generator, device):
                reset()
                model(x_train[(group.share(idx) if group else idx).to(x_train.device)])
                for m, total in zip(norms, sums):
                    for k, s in total.items():
                        s += getattr(m, k)
    finally:
        reset()
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
    if group:
        group.average([s for total in sums for s in total.values()])
    for m, total in zip(norms, sums):
        for k, s in total.items():
            getattr(m, k).copy_(s / num_batches)


class DiagnosticLog:
    """Runs the diagnostics that `cfg` (DiagConfig) switches on at step 1 and every `cfg.every` steps and logs them to
    TensorBoard: `act/L/p15|p50|p85` (all units of layer L) and `act/L/unit0/...` with histograms `act/L`,
    `ics/layer{i}/l2|cos`, `landscape/<metric>`, `grad_norm/layer{i}` and `stat_drift/<buffer>`.

    The trainer calls `before_step` after backward and `after_step` after the optimizer step, on the
    steps where `due` says so. `model` is the run's model; a fused group's engine (bnlab.run.fused.engine) gives each
    member's log a copy of that member's model at each call (with its gradients where `needs_gradients`).
    `lr` tells the run's learning rate now.
    """

    def __init__(self, cfg, model: nn.Module, writer, probe: Tensor, lr: Callable[[], float], task: Task) -> None:
        self.cfg, self.model, self.writer, self.probe, self.lr, self.task = cfg, model, writer, probe, lr, task
        depth = len(units(model))
        if cfg.percentiles and any(not -depth <= i < depth for i in cfg.layers):
            raise ConfigError(
                f"diag.layers={list(cfg.layers)} is not accepted; accepted values: indices of the model's "
                f"{depth} hidden layers, -{depth} to {depth - 1}."
            )
        self.on = bool(cfg.switched_on())
        self.needs_gradients = cfg.landscape or cfg.grad_norms or cfg.ics  # before_step has work to do
        self.stats = running_stats(model) if cfg.stat_drift else {}
        self.before: dict[str, Tensor] = {}

    def due(self, step: int) -> bool:
        """At the first step (the gradients of the initial weights) and every diag.every steps."""
        return self.on and (step % self.cfg.every == 0 or step == 1)

    def _log(self, prefix: str, values: dict, step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def before_step(self, step: int, x: Tensor, y: Tensor) -> None:
        """At the step's weights, with its gradients: landscape along them, gradient norms, a snapshot for ICS."""
        if self.cfg.landscape:
            c = self.cfg
            steps = tuple(c.landscape_steps)
            self._log(
                tags.LANDSCAPE, landscape(self.model, x, y, self.lr(), c.landscape_points, steps, self.task), step
            )
        if self.cfg.grad_norms:
            self._log(tags.GRAD_NORM, grad_norms(self.model), step)
        if self.cfg.ics:
            self.before = snapshot(self.model)

    def after_step(self, step: int, x: Tensor, y: Tensor) -> None:
        """After the update: ICS of this step, activation percentiles on the probe, running-statistics drift."""
        if self.cfg.ics:
            shift = internal_covariate_shift(self.model, x, y, deltas(self.model, self.before), self.task)
            for i, (l2, cos) in enumerate(shift):
                self._log(tags.ics(i), {"l2": l2, "cos": cos}, step)
        if self.cfg.percentiles:
            names = [f"p{q}" for q in tags.PERCENTILES]
            for layer, a in activations(self.model, self.probe, list(self.cfg.layers)).items():
                self._log(tags.activation(layer), dict(zip(names, _percentiles(a, tags.PERCENTILES))), step)
                unit0 = _percentiles(a[:, 0], tags.PERCENTILES)
                self._log(tags.activation(layer, unit0=True), dict(zip(names, unit0)), step)
                self.writer.add_histogram(tags.activation(layer), a, step)
        if self.cfg.stat_drift:
            now = running_stats(self.model)
            self._log(tags.STAT_DRIFT, drift(self.stats, now), step)
            self.stats = now
