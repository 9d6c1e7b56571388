"""Tests of bnlab.run.diagnostics against numbers worked out in the test itself.

The reference numbers come from `reference_loss`, the tiny network written out in plain tensor ops
(no nn modules, no functional_call), differentiated with torch.autograd.grad; all in float64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnlab.core.data import TASKS
from bnlab.core.models import Unit, build_model
from bnlab.core.norms import create_norm
from bnlab.run.diagnostics import (
    activation_percentiles,
    activations,
    deltas,
    drift,
    grad_norms,
    internal_covariate_shift,
    landscape,
    precise_bn,
    running_stats,
    snapshot,
    units,
)
from bnlab.schema.config import ModelConfig, NormConfig, TrainConfig

EPS = 1e-5  # the norms' default eps


def f64(rows) -> Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# The tiny network: 2 inputs -> Unit(2 tanh units) -> Unit(2 tanh units) -> 2 classes, fixed weights.
WEIGHTS = {
    "0.layer.weight": f64([[0.5, -1.0], [1.5, 0.3]]),
    "0.layer.bias": f64([0.1, -0.2]),
    "0.norm.weight": f64([1.5, 0.8]),
    "0.norm.bias": f64([0.2, -0.1]),
    "1.layer.weight": f64([[-0.7, 0.4], [0.9, 1.1]]),
    "1.layer.bias": f64([0.05, 0.3]),
    "1.norm.weight": f64([0.7, 1.3]),
    "1.norm.bias": f64([-0.3, 0.4]),
    "2.weight": f64([[1.2, -0.6], [-0.8, 0.5]]),
    "2.bias": f64([0.0, 0.1]),
}
X = f64([[1.0, 2.0], [-1.0, 0.5], [0.3, -1.2], [2.0, 0.0]])
Y = torch.tensor([0, 1, 1, 0])
Y_REGRESSION = f64([[0.5, -1.0], [2.0, 0.3], [-0.7, 0.0], [1.1, 1.4]])  # 2 targets per example
TARGETS = {"classification": Y, "regression": Y_REGRESSION}


def tiny(norm: str, **cfg) -> nn.Sequential:
    """The tiny network with `norm` (NormConfig overrides in cfg) and the weights of WEIGHTS."""

    def hidden() -> Unit:
        return Unit(nn.Linear(2, 2), create_norm(2, NormConfig(name=norm, **cfg)), nn.Tanh(), norm_before_act=True)

    model = nn.Sequential(hidden(), hidden(), nn.Linear(2, 2)).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(WEIGHTS[name])
    return model


def batch_norm(h: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
    """Train-mode batch norm of h (N, C): batch mean and biased variance."""
    return (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + EPS) * gamma + beta


def reference_loss(p: dict[str, Tensor], norm: str, task: str = "classification") -> Tensor:
    """The tiny network's mean cross-entropy on (X, Y), or mean squared error on (X, Y_REGRESSION), written out."""
    h = X
    for i in (0, 1):
        h = h @ p[f"{i}.layer.weight"].T + p[f"{i}.layer.bias"]
        if norm == "batch":
            h = batch_norm(h, p[f"{i}.norm.weight"], p[f"{i}.norm.bias"])
        h = torch.tanh(h)
    logits = h @ p["2.weight"].T + p["2.bias"]
    if task == "regression":
        return ((logits - Y_REGRESSION) ** 2).sum() / Y_REGRESSION.numel()
    return (torch.logsumexp(logits, 1) - logits[torch.arange(len(Y)), Y]).mean()


def reference_grads(p: dict[str, Tensor], norm: str, task: str = "classification") -> tuple[float, dict[str, Tensor]]:
    """The reference loss at p and its gradient w.r.t. every tensor of p."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in p.items()}
    loss = reference_loss(leaves, norm, task)
    return loss.item(), dict(
        zip(leaves, torch.autograd.grad(loss, list(leaves.values()), allow_unused=True, materialize_grads=True))
    )


def used_weights(norm: str) -> dict[str, Tensor]:
    """WEIGHTS without the norm parameters where there is no norm."""
    return {k: v for k, v in WEIGHTS.items() if norm != "none" or ".norm." not in k}


# --- internal covariate shift ---------------------------------------------------------------


OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.5),
    "adam": lambda params: torch.optim.Adam(params, lr=0.1),
}


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("norm", ["none", "batch"])
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_ics_matches_hand_computation(norm, optimizer, task):
    model = tiny(norm)
    opt = OPTIMIZERS[optimizer](model.parameters())
    TASKS[task].loss(model(X), TARGETS[task]).mean().backward()
    before = snapshot(model)
    opt.step()
    update = deltas(model, before)
    theta = used_weights(norm)
    _, grads = reference_grads(theta, norm, task)
    if optimizer == "sgd":
        for k, g in grads.items():
            torch.testing.assert_close(update[k], -0.5 * g)

    # Layer 1: G at theta, G' with unit 0's parameters (weight, bias, gamma, beta) moved by their update.
    g = grads["1.layer.weight"]
    _, shifted = reference_grads({k: v + update[k] if k.startswith("0.") else v for k, v in theta.items()}, norm, task)
    g_shifted = shifted["1.layer.weight"]
    norm_diff = (g - g_shifted).norm().item()
    cos = ((g * g_shifted).sum() / (g.norm() * g_shifted.norm())).item()
    assert norm_diff > 1e-3  # a real shift, not a vacuous test

    (zero, one), (d, c) = internal_covariate_shift(model, X, TARGETS[task], update, TASKS[task])
    assert (zero, one) == (0.0, 1.0)  # layer 0: nothing before it moves, G' = G
    assert d == pytest.approx(norm_diff, rel=1e-9) and c == pytest.approx(cos, rel=1e-9)


def test_units_are_in_forward_order_and_resnet_shortcuts_count_as_earlier_layers():
    model = build_model(TrainConfig(model=ModelConfig(name="resnet", widths=[4, 8, 8])), (1, 8, 8), 3)
    assert units(model) == [
        model[0],
        *(u for block in (model[1], model[2], model[3]) for u in (block.first, block.second)),
    ]
    # Only the shortcut of block 2 (model[2]) moves: it feeds block 3's units, not its own block's.
    x, y = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 0, 1, 2])
    update = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    update["2.shortcut.0.weight"] = torch.full_like(update["2.shortcut.0.weight"], 0.3)
    with torch.no_grad():
        model[2].shortcut[0].weight.add_(update["2.shortcut.0.weight"])
    shifts = [d for d, _ in internal_covariate_shift(model, x, y, update)]
    assert shifts[:5] == [0.0] * 5 and min(shifts[5:]) > 0


# --- loss landscape ------------------------------------------------------------------------------


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("norm", ["none", "batch"])
@pytest.mark.parametrize("lr, num, steps", [(0.3, 8, (0.5, 4.0)), (1.0, 3, (0.5, 4.0)), (0.2, 5, (0.01, 30.0))])
def test_landscape_matches_hand_computation(norm, lr, num, steps, task):
    theta = used_weights(norm)
    _, g = reference_grads(theta, norm, task)
    g_flat, losses, changes, betas = torch.cat([v.flatten() for v in g.values()]), [], [], []
    low, high = steps
    for k in range(num):
        eta = low * lr + k * (high - low) * lr / (num - 1)
        loss, moved = reference_grads({n: v - eta * g[n] for n, v in theta.items()}, norm, task)
        change = (torch.cat([v.flatten() for v in moved.values()]) - g_flat).norm().item()
        losses.append(loss)
        changes.append(change)
        betas.append(change / (eta * g_flat.norm().item()))

    result = landscape(tiny(norm), X, TARGETS[task], lr, num=num, steps=steps, task=TASKS[task])
    assert result == pytest.approx(
        {
            "loss_variation": max(losses) - min(losses),
            "grad_predictiveness": max(changes) - min(changes),
            "beta_smoothness": max(betas),
            "loss_min": min(losses),
            "loss_max": max(losses),
            "grad_change_min": min(changes),
            "grad_change_max": max(changes),
        },
        rel=1e-9,
    )
    assert result["loss_variation"] > 1e-3


# --- every function leaves the model as it found it ---------------------------------------------


def state(model: nn.Module) -> list:
    """Everything a diagnostic must not change: parameters, grads, buffers, modes and the global RNG."""
    return [
        {k: p.detach().clone() for k, p in model.named_parameters()},
        {k: p.grad.clone() for k, p in model.named_parameters()},
        {k: b.clone() for k, b in model.named_buffers()},
        [m.training for m in model.modules()],
        torch.get_rng_state(),
    ]


def assert_same_state(a: list, b: list) -> None:
    for part_a, part_b in zip(a[:3], b[:3], strict=True):
        assert part_a.keys() == part_b.keys()
        for k, v in part_a.items():
            assert torch.equal(v, part_b[k]), k
    assert a[3] == b[3] and torch.equal(a[4], b[4])


@pytest.mark.parametrize("model_name", ["mlp", "cnn", "resnet"])
@pytest.mark.parametrize("norm", ["batch", "batch_renorm", "noisy_batch"])
def test_diagnostics_leave_the_model_untouched(model_name, norm):
    torch.manual_seed(0)
    cfg = TrainConfig(
        model=ModelConfig(name=model_name, widths=[4, 8]),
        norm=NormConfig(name=norm, renorm_warmup=0, r_max_steps=0, d_max_steps=0),
    )
    model = build_model(cfg, (1, 8, 8), 3)
    x, y = torch.randn(8, 1, 8, 8) + 1.0, torch.randint(0, 3, (8,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):  # moves running statistics and step counters off their initial values, leaves grads
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        before = snapshot(model)
        opt.step()
    update = deltas(model, before)
    units(model)[0].eval()  # mixed modes must come back as they were
    start = state(model)

    shifts = internal_covariate_shift(model, x, y, update)
    smoothness = landscape(model, x, y, lr=0.1, num=3)
    percentiles = activation_percentiles(model, x, [0, -1])
    raw = activations(model, x, [-1])
    norms = grad_norms(model)
    stats = running_stats(model)

    assert_same_state(start, state(model))
    assert len(shifts) == len(units(model)) and shifts[0] == (0.0, 1.0)
    assert all(torch.isfinite(torch.tensor(s)).all() for s in shifts)
    assert all(v >= 0 for v in smoothness.values())
    assert set(percentiles) == {0, -1} and raw[-1].shape[:2] == (8, 8)
    assert len(norms) == len(units(model)) and stats


# --- activations and their percentiles ---------------------------------------------------------


def percentile_model(conv: bool) -> nn.Sequential:
    """Unit(W = I, no norm, ReLU) -> Unit(W = 2I, batch norm with running mean (100, 0), running var 4 - eps, ReLU)."""

    def layer(scale: float) -> nn.Module:
        m = nn.Conv2d(2, 2, 1, bias=False) if conv else nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            m.weight.copy_(scale * torch.eye(2).view(m.weight.shape))
        return m

    bn = create_norm(2, NormConfig(name="batch"))
    bn.running_mean.copy_(torch.tensor([100.0, 0.0]))
    bn.running_var.fill_(4.0 - EPS)
    return nn.Sequential(
        Unit(layer(1.0), nn.Identity(), nn.ReLU(), True), Unit(layer(2.0), bn, nn.ReLU(), True)
    ).double()


@pytest.mark.parametrize("conv", [False, True])
def test_activation_percentiles_of_known_inputs(conv):
    # Unit 0 takes 0..100, unit 1 takes 101..201: layer 0's act input is x itself, layer 1's (2x - mean) / 2 in
    # eval mode.
    x = torch.stack([torch.arange(101.0), torch.arange(101.0, 202.0)], 1).double()
    if conv:  # one feature map of 101 x 1 pixels: percentiles over positions
        x = x.T.reshape(1, 2, 101, 1)
    model = percentile_model(conv).train()
    result = activation_percentiles(model, x, [0, -1])
    assert result[0]["unit0"] == pytest.approx([15.0, 50.0, 85.0])
    assert result[0]["all"] == pytest.approx([30.15, 100.5, 170.85])  # 0..201 at ranks 0.15, 0.5, 0.85 x 201
    assert result[-1]["unit0"] == pytest.approx([-35.0, 0.0, 35.0])  # x - 50
    assert result[-1]["all"] == pytest.approx([-19.85, 75.5, 170.85])  # -50..50 and 101..201
    torch.testing.assert_close(
        activations(model, x, [1])[1],
        x - torch.tensor([50.0, 0.0], dtype=torch.float64).view(1, 2, *[1] * (x.dim() - 2)),
    )
    assert model.training


# --- gradient norms and running statistics ------------------------------------------------------


@pytest.mark.parametrize("norm", ["none", "batch"])
def test_grad_norms_match_hand_gradients(norm):
    model = tiny(norm)
    assert grad_norms(model) == {}  # no backward yet
    F.cross_entropy(model(X), Y).backward()
    _, grads = reference_grads(used_weights(norm), norm)
    assert grad_norms(model) == pytest.approx(
        {f"layer{i}": grads[f"{i}.layer.weight"].norm().item() for i in (0, 1)}, rel=1e-12
    )


def test_grad_norms_of_set_gradients():
    model = tiny("none")
    model[0].layer.weight.grad = f64([[3.0, 0.0], [0.0, 4.0]])
    model[1].layer.weight.grad = f64([[1.0, 1.0], [1.0, 1.0]])
    assert grad_norms(model) == {"layer0": 5.0, "layer1": 2.0}


@pytest.mark.parametrize(
    "norm, statistic", [("batch", "running_var"), ("batch_manual", "running_var"), ("batch_renorm", "running_std")]
)
def test_running_stats_and_drift_of_a_known_change(norm, statistic):
    model = tiny(norm)
    before = running_stats(model)
    assert set(before) == {f"{i}.norm.{s}" for i in (0, 1) for s in ("running_mean", statistic)}
    with torch.no_grad():
        model[0].norm.running_mean += f64([3.0, 4.0])
        getattr(model[1].norm, statistic).mul_(3.0)  # from ones: change (2, 2)
    assert drift(before, running_stats(model)) == pytest.approx(
        {
            "0.norm.running_mean": 5.0,
            f"0.norm.{statistic}": 0.0,
            "1.norm.running_mean": 0.0,
            f"1.norm.{statistic}": 8**0.5,
        }
    )
    assert torch.equal(before["0.norm.running_mean"], torch.zeros(2, dtype=torch.float64))  # a copy, not the buffer


# --- precise BN ------------------------------------------------------------------------------------


def per_batch_stats(h: Tensor, chunks: int = 1) -> tuple[Tensor, Tensor]:
    """The mean and unbiased variance of h (N, C), averaged over `chunks` equal slices (Ghost BN)."""
    parts = h.tensor_split(chunks)
    return torch.stack([p.mean(0) for p in parts]).mean(0), torch.stack([p.var(0, unbiased=True) for p in parts]).mean(
        0
    )


@pytest.mark.parametrize("norm", ["batch", "batch_manual", "ghost_batch", "batch_renorm", "noisy_batch"])
def test_precise_bn_sets_the_average_of_per_batch_statistics(norm):
    x = torch.randn(12, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2.0 + 3.0
    model = tiny(norm, virtual_batch_size=2, renorm_warmup=0, r_max_steps=0, d_max_steps=0)
    for unit in units(model):  # corrupted statistics and a step counter that must stay as it is
        unit.norm.running_mean.fill_(-7.0)
        unit.norm.num_batches_tracked.fill_(3)
    model.eval()
    params = snapshot(model)

    precise_bn(model, x, batch_size=4, num_batches=3, generator=torch.Generator().manual_seed(0))

    # The three batches are one permutation of the 12 examples; layer 0's norm sees x W0^T + b0.
    batches = torch.randperm(12, generator=torch.Generator().manual_seed(0)).view(3, 4)
    h = [x[idx] @ WEIGHTS["0.layer.weight"].T + WEIGHTS["0.layer.bias"] for idx in batches]
    means, variances = zip(*(per_batch_stats(hb, chunks=2 if norm == "ghost_batch" else 1) for hb in h))
    norm0 = model[0].norm
    torch.testing.assert_close(norm0.running_mean, torch.stack(means).mean(0))
    if norm == "batch_renorm":  # the average of per-batch stds
        torch.testing.assert_close(norm0.running_std, torch.stack([torch.sqrt(v + EPS) for v in variances]).mean(0))
    else:
        torch.testing.assert_close(norm0.running_var, torch.stack(variances).mean(0))
    assert [int(u.norm.num_batches_tracked) for u in units(model)] == [3, 3]
    assert norm0.momentum == 0.1 and not model.training
    assert all(torch.equal(p, params[k]) for k, p in model.named_parameters())


def test_precise_bn_second_layer_by_hand():
    x = torch.randn(12, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    model = tiny("batch")
    precise_bn(model, x, batch_size=6, num_batches=2, generator=torch.Generator().manual_seed(5))
    batches = torch.randperm(12, generator=torch.Generator().manual_seed(5)).view(2, 6)
    stats = []
    for idx in batches:  # layer 1's norm sees the train-mode output of unit 0, times W1, plus b1
        a0 = torch.tanh(
            batch_norm(
                x[idx] @ WEIGHTS["0.layer.weight"].T + WEIGHTS["0.layer.bias"],
                WEIGHTS["0.norm.weight"],
                WEIGHTS["0.norm.bias"],
            )
        )
        stats.append(per_batch_stats(a0 @ WEIGHTS["1.layer.weight"].T + WEIGHTS["1.layer.bias"]))
    torch.testing.assert_close(model[1].norm.running_mean, torch.stack([m for m, _ in stats]).mean(0))
    torch.testing.assert_close(model[1].norm.running_var, torch.stack([v for _, v in stats]).mean(0))


def test_precise_bn_repairs_stale_statistics():
    torch.manual_seed(0)
    x = torch.randn(512, 1, 2, 2) * 2.0 + 5.0  # far from the initial running mean 0
    y = (x.flatten(1).sum(1) > 20.0).long()
    model = build_model(TrainConfig(model=ModelConfig(widths=[16, 16])), (1, 2, 2), 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    for step in range(150):
        idx = torch.arange(step * 64, step * 64 + 64) % 512
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()

    def eval_accuracy() -> float:
        with torch.no_grad():
            return (model.eval()(x).argmax(1) == y).float().mean().item()

    trained = eval_accuracy()
    for unit in units(model):
        unit.norm.reset_running_stats()  # stale: mean 0, var 1
    stale = eval_accuracy()
    precise_bn(model, x, batch_size=64, num_batches=16, generator=torch.Generator().manual_seed(0))
    repaired = eval_accuracy()
    assert trained > 0.9 and stale < 0.75 and repaired > 0.9
