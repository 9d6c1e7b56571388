"""Tests of bnlab.core.norms: every registered norm on vectors and maps, and each layer's numbers.

Numbers are checked in float64, so tolerances are tight. The generic tests are parametrized over the
registry: a norm added to NORMS gets them too.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnlab.core.norms import NORMS, create_norm
from bnlab.schema.config import NormConfig

C = 8  # channels
SHAPES = [(12, C), (12, C, 3, 3)]  # feature vectors (N, C) and feature maps (N, C, H, W)
# train-mode normalization over the batch (sync_batch: in one process, where it is plain batch norm)
BN_FAMILY = ["batch", "batch_manual", "batch_renorm", "ghost_batch", "sync_batch"]
# Small-test settings: groups divide C, virtual batches split the N=12 batch in 3, renorm clips from step 0.
SMALL = dict(groups=2, virtual_batch_size=4, renorm_warmup=0, r_max_steps=0, d_max_steps=0)
BUILT_IN = sorted(set(NORMS) - {"custom"})  # norm=custom is the user's layer: tests/test_custom.py


def make(name: str, channels: int = C, **cfg) -> nn.Module:
    """The norm `name` in float64, from a NormConfig with `cfg` overriding the defaults."""
    return create_norm(channels, NormConfig(name=name, **cfg)).double()


def f64(*values: float) -> Tensor:
    return torch.tensor(values, dtype=torch.float64)


def data(*shape: int, seed: int = 0, mean: float = 1.5, std: float = 2.0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * std + mean


def channel_stats(y: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance over every dim but C."""
    dims = [0, *range(2, y.dim())]
    return y.mean(dims), y.var(dims, unbiased=False)


def torch_bn(shape: tuple[int, ...], **kw) -> nn.Module:
    return (nn.BatchNorm1d if len(shape) == 2 else nn.BatchNorm2d)(C, **kw).double()


def randomize_affine(*norms: nn.Module, seed: int = 1) -> None:
    """Give every norm the same non-trivial gamma and beta."""
    g = torch.Generator().manual_seed(seed)
    weight, bias = (
        torch.rand(C, generator=g, dtype=torch.float64) + 0.5,
        torch.randn(C, generator=g, dtype=torch.float64),
    )
    with torch.no_grad():
        for norm in norms:
            norm.weight.copy_(weight)
            norm.bias.copy_(bias)


def step(norm: nn.Module, x: Tensor, w: Tensor) -> tuple[Tensor, list[Tensor]]:
    """One training forward/backward with loss sum(y * w); the output and the grads of x, weight, bias."""
    x = x.clone().requires_grad_()  # a fresh leaf: grads of one call only
    norm.zero_grad()
    y = norm(x)
    (y * w).sum().backward()
    return y.detach(), [x.grad, norm.weight.grad, norm.bias.grad]


def assert_close_all(a: list[Tensor], b: list[Tensor]) -> None:
    for u, v in zip(a, b, strict=True):
        torch.testing.assert_close(u, v)


# --- every registered norm -------------------------------------------------------------------


def test_registry():
    assert set(NORMS) == {
        "none",
        "batch",
        "layer",
        "group",
        "instance",
        "batch_renorm",
        "ghost_batch",
        "rms",
        "batch_manual",
        "noisy_batch",
        "sync_batch",
        "custom",
    }
    assert isinstance(create_norm(C, NormConfig(name="none")), nn.Identity)


@pytest.mark.parametrize("name", BUILT_IN)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training", [True, False])
def test_shape_preserved_and_finite(name, shape, training):
    norm = make(name, **SMALL).train(training)
    y = norm(data(*shape))
    assert y.shape == shape and y.dtype == torch.float64 and torch.isfinite(y).all()


@pytest.mark.parametrize("name", BUILT_IN)
@pytest.mark.parametrize("shape", SHAPES)
def test_gradients_finite_and_nonzero(name, shape):
    norm = make(name, **SMALL)
    x = data(*shape).requires_grad_()
    (
        norm(x) * data(*shape, seed=1, mean=0.0, std=1.0)
    ).sum().backward()  # random weights: a plain sum has zero grad under BN
    for grad in [x.grad, *(p.grad for p in norm.parameters())]:
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("name", BUILT_IN)
@pytest.mark.parametrize("shape", SHAPES)
def test_state_dict_round_trip(name, shape):
    trained = make(name, **SMALL)
    for seed in range(3):  # move the running statistics and step counters off their initial values
        trained(data(*shape, seed=seed))
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p))
    state = trained.state_dict()
    restored = make(name, **SMALL)
    restored.load_state_dict(state)
    assert state.keys() == restored.state_dict().keys()
    for key, value in restored.state_dict().items():
        assert torch.equal(value, state[key]), key
    x = data(*shape, seed=9)
    assert torch.equal(restored.eval()(x), trained.eval()(x))


@pytest.mark.parametrize("name", BUILT_IN)
def test_affine_false_has_no_parameters(name):
    assert list(make(name, affine=False).parameters()) == []


@pytest.mark.parametrize("name", sorted(set(BUILT_IN) - {"none"}))
def test_affine_true_has_per_channel_scale(name):
    assert make(name, **SMALL).weight.shape == (C,)


@pytest.mark.parametrize("name", sorted(set(BUILT_IN) - {"none"}))
def test_eps_honoured(name):
    x = data(12, C, std=0.3)  # variance comparable to the large eps
    assert not torch.allclose(make(name, **SMALL, eps=1e-5)(x), make(name, **SMALL, eps=0.5)(x))


# --- batch-norm family: statistics over the batch --------------------------------------------


@pytest.mark.parametrize("name", BN_FAMILY)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("eps", [1e-5, 0.5])
def test_bn_family_standardizes_each_channel(name, shape, eps):
    # Whole-batch normalization: renorm in its warm-up, one virtual batch for ghost.
    norm = make(name, eps=eps, virtual_batch_size=shape[0])
    x = data(*shape)
    _, var_x = channel_stats(x)
    mean, var = channel_stats(norm(x).detach())
    torch.testing.assert_close(mean, torch.zeros(C, dtype=torch.float64))
    torch.testing.assert_close(var, var_x / (var_x + eps))  # = 1 up to eps


@pytest.mark.parametrize("name", BN_FAMILY)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("momentum", [0.1, 0.5])
def test_bn_family_running_stats_follow_momentum(name, shape, momentum):
    eps = 1e-3
    norm = make(name, eps=eps, momentum=momentum, virtual_batch_size=shape[0])
    x = data(*shape)
    norm(x)
    dims = [0, *range(2, x.dim())]
    mean, var_unbiased = x.mean(dims), x.var(dims, unbiased=True)
    torch.testing.assert_close(norm.running_mean, momentum * mean)
    if name == "batch_renorm":  # running std starts at 1
        torch.testing.assert_close(norm.running_std, (1 - momentum) + momentum * torch.sqrt(var_unbiased + eps))
    else:  # running var starts at 1
        torch.testing.assert_close(norm.running_var, (1 - momentum) + momentum * var_unbiased)
    assert int(norm.num_batches_tracked) == 1
    norm.eval()(x)
    assert int(norm.num_batches_tracked) == 1  # eval leaves the statistics alone


@pytest.mark.parametrize("name", BN_FAMILY)
def test_bn_family_eval_uses_running_stats(name):
    norm = make(name, momentum=1.0, virtual_batch_size=12)  # momentum 1: running stats = the last batch's
    norm(data(12, C))
    x = data(12, C, seed=1)
    y_eval = norm.eval()(x)
    torch.testing.assert_close(norm(x[:1]), y_eval[:1])  # one example alone: no dependence on the batch
    assert not torch.allclose(y_eval, norm.train()(x))  # train mode: this batch's statistics


# --- batch_manual against torch's BatchNorm ----------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("eps", [1e-5, 1e-2])
@pytest.mark.parametrize("momentum", [0.1, 0.7])
def test_batch_manual_matches_torch(shape, eps, momentum):
    manual, ref = make("batch_manual", eps=eps, momentum=momentum), torch_bn(shape, eps=eps, momentum=momentum)
    randomize_affine(manual, ref)
    w = data(*shape, seed=100, mean=0.0, std=1.0)
    for seed in range(4):
        x = data(*shape, seed=seed, mean=seed - 1.0, std=0.5 + seed)
        y, grads = step(manual, x, w)
        y_ref, grads_ref = step(ref, x, w)
        torch.testing.assert_close(y, y_ref)
        assert_close_all(grads, grads_ref)
        torch.testing.assert_close(manual.running_mean, ref.running_mean)
        torch.testing.assert_close(manual.running_var, ref.running_var)
        assert torch.equal(manual.num_batches_tracked, ref.num_batches_tracked)
    x = data(*shape, seed=50)
    torch.testing.assert_close(manual.eval()(x), ref.eval()(x))


def test_batch_manual_refuses_one_value_per_channel():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        make("batch_manual")(data(1, C))


# --- batch_renorm ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("eps", [1e-5, 1e-2])
def test_batch_renorm_is_batch_norm_in_warmup(shape, eps):
    # momentum 1: running std = sqrt(last unbiased var + eps) = torch's sqrt(running_var + eps) exactly,
    # so eval outputs agree too (with momentum < 1 an average of stds is not the std of an average).
    renorm, ref = make("batch_renorm", eps=eps, momentum=1.0, renorm_warmup=100), torch_bn(shape, eps=eps, momentum=1.0)
    randomize_affine(renorm, ref)
    w = data(*shape, seed=100, mean=0.0, std=1.0)
    for seed in range(3):
        x = data(*shape, seed=seed, mean=2.0 * seed, std=1.0 + seed)
        assert renorm.limits() == (1.0, 0.0)
        y, grads = step(renorm, x, w)
        y_ref, grads_ref = step(ref, x, w)
        torch.testing.assert_close(y, y_ref)
        assert_close_all(grads, grads_ref)
        torch.testing.assert_close(renorm.running_mean, ref.running_mean)
        torch.testing.assert_close(renorm.running_std, torch.sqrt(ref.running_var + eps))
    x = data(*shape, seed=50)
    torch.testing.assert_close(renorm.eval()(x), ref.eval()(x))


def test_batch_renorm_differs_from_batch_norm_after_warmup():
    renorm, ref = make("batch_renorm", renorm_warmup=2, r_max_steps=2, d_max_steps=2), torch_bn(SHAPES[0])
    for seed in range(2):  # warm-up: running stats start at mean 0, std 1 and drift towards the data's
        x = data(12, C, seed=seed, mean=3.0, std=4.0)
        torch.testing.assert_close(renorm(x), ref(x))
    assert renorm.limits() == (3.0, 5.0)
    x = data(12, C, seed=2, mean=3.0, std=4.0)  # far from the running mean and std
    assert not torch.allclose(renorm(x), ref(x))


def test_batch_renorm_clipping_matches_hand_computation():
    eps, momentum, r_max, d_max = 1e-3, 0.2, 1.5, 0.5
    renorm = make(
        "batch_renorm",
        channels=3,
        eps=eps,
        momentum=momentum,
        r_max=r_max,
        d_max=d_max,
        renorm_warmup=0,
        r_max_steps=0,
        d_max_steps=0,
    )
    gamma, beta, mu, sigma = f64(2.0, 0.5, 1.0), f64(0.1, -0.2, 0.3), f64(0.0, 1.0, 2.0), f64(1.0, 3.0, 2.0)
    with torch.no_grad():
        for tensor, value in [
            (renorm.weight, gamma),
            (renorm.bias, beta),
            (renorm.running_mean, mu),
            (renorm.running_std, sigma),
        ]:
            tensor.copy_(value)
    # Batch std and mean per channel: 0: r ~ 3, d ~ 5, both clipped high; 1: r ~ 0.33, d ~ -1, both
    # clipped low; 2: r ~ 1.1, d ~ 0.2, inside the clips.
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = x / x.std(0, unbiased=False) * f64(3.0, 1.0, 2.2) + f64(5.0, -2.0, 2.4)
    y = renorm(x)

    mu_b, sigma_b = x.mean(0), torch.sqrt(x.var(0, unbiased=False) + eps)
    r_raw, d_raw = sigma_b / sigma, (mu_b - mu) / sigma
    r, d = r_raw.clamp(1 / r_max, r_max), d_raw.clamp(-d_max, d_max)
    assert r_raw[0] > r_max and d_raw[0] > d_max and r_raw[1] < 1 / r_max and d_raw[1] < -d_max
    assert r[2] == r_raw[2] and d[2] == d_raw[2]
    torch.testing.assert_close(y, gamma * ((x - mu_b) / sigma_b * r + d) + beta)
    # Unclipped, the train output is the eval output with the old running stats.
    torch.testing.assert_close(y[:, 2], gamma[2] * (x[:, 2] - mu[2]) / sigma[2] + beta[2])
    torch.testing.assert_close(renorm.running_mean, (1 - momentum) * mu + momentum * mu_b)
    torch.testing.assert_close(renorm.running_std, (1 - momentum) * sigma + momentum * torch.sqrt(x.var(0) + eps))


def test_batch_renorm_r_and_d_carry_no_gradient():
    # Clipped high, r and d are constants: y = gamma * ((x - mu_B) / sigma_B * r_max + d_max) + beta,
    # so the input gradient is r_max times batch norm's.
    renorm = make("batch_renorm", r_max=2.0, d_max=1.0, renorm_warmup=0, r_max_steps=0, d_max_steps=0)
    ref = torch_bn(SHAPES[0])
    x, w = data(12, C, mean=10.0, std=5.0), data(12, C, seed=1, mean=0.0, std=1.0)
    _, (gx, *_) = step(renorm, x, w)
    _, (gx_ref, *_) = step(ref, x, w)
    torch.testing.assert_close(gx, 2.0 * gx_ref)


@pytest.mark.parametrize(
    "steps, expected",
    [
        (0, (1.0, 0.0)),
        (9, (1.0, 0.0)),
        (10, (1.0, 0.0)),
        (15, (1.5, 2.5)),
        (20, (2.0, 5.0)),
        (30, (3.0, 5.0)),
        (1000, (3.0, 5.0)),
    ],
)
def test_batch_renorm_schedule(steps, expected):
    # warm-up 10 steps, then r_max 1 -> 3 by step 30 and d_max 0 -> 5 by step 20
    renorm = make("batch_renorm", r_max=3.0, d_max=5.0, renorm_warmup=10, r_max_steps=30, d_max_steps=20)
    renorm.num_batches_tracked.fill_(steps)
    assert renorm.limits() == pytest.approx(expected)


def test_batch_renorm_schedule_from_config_and_counter():
    renorm = make("batch_renorm", r_max=2.0, d_max=4.0, renorm_warmup=1, r_max_steps=3, d_max_steps=2)
    seen = []
    for seed in range(4):
        seen.append(renorm.limits())
        renorm(data(12, C, seed=seed))
    renorm.eval()(data(12, C))  # eval does not advance the schedule
    assert seen == [(1.0, 0.0), (1.0, 0.0), (1.5, 4.0), (2.0, 4.0)]
    assert int(renorm.num_batches_tracked) == 4


# --- ghost_batch -------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("virtual_batch_size", [12, 13, 100])
def test_ghost_batch_is_batch_when_virtual_batch_is_whole_batch(shape, virtual_batch_size):
    ghost, batch = make("ghost_batch", virtual_batch_size=virtual_batch_size, momentum=0.3), make("batch", momentum=0.3)
    randomize_affine(ghost, batch)
    w = data(*shape, seed=100, mean=0.0, std=1.0)
    for seed in range(3):
        x = data(*shape, seed=seed)
        y, grads = step(ghost, x, w)
        y_ref, grads_ref = step(batch, x, w)
        assert torch.equal(y, y_ref) and all(map(torch.equal, grads, grads_ref))
    for key, value in batch.state_dict().items():
        assert torch.equal(ghost.state_dict()[key], value), key
    x = data(*shape, seed=50)
    assert torch.equal(ghost.eval()(x), batch.eval()(x))


@pytest.mark.parametrize("shape", SHAPES)
def test_ghost_batch_normalizes_each_virtual_batch(shape):
    momentum = 0.5
    ghost, batch = make("ghost_batch", virtual_batch_size=4, momentum=momentum), make("batch")
    x = data(*shape)
    x = x + torch.arange(12, dtype=torch.float64).view(12, *[1] * (x.dim() - 1))  # chunks with different means
    y = ghost(x).detach()
    assert not torch.allclose(y, batch(x))
    means, vars_unbiased = [], []
    for chunk_x, chunk_y in zip(x.tensor_split(3), y.tensor_split(3), strict=True):
        mean, var = channel_stats(chunk_y)
        torch.testing.assert_close(mean, torch.zeros(C, dtype=torch.float64))
        torch.testing.assert_close(var, torch.ones(C, dtype=torch.float64), atol=1e-4, rtol=0)  # up to eps
        dims = [0, *range(2, x.dim())]
        means.append(chunk_x.mean(dims))
        vars_unbiased.append(chunk_x.var(dims, unbiased=True))
    # One running-statistics step per batch, towards the chunk averages.
    torch.testing.assert_close(ghost.running_mean, momentum * torch.stack(means).mean(0))
    torch.testing.assert_close(ghost.running_var, (1 - momentum) + momentum * torch.stack(vars_unbiased).mean(0))
    assert int(ghost.num_batches_tracked) == 1


@pytest.mark.parametrize("batch_size", [3, 5, 7])
def test_ghost_batch_never_makes_a_single_example_chunk(batch_size):
    # round(N / 2) chunks would leave one example alone for N = 3, 7; torch's BN refuses such a chunk.
    y = make("ghost_batch", virtual_batch_size=2)(data(batch_size, C))
    assert torch.isfinite(y).all()


# --- noisy_batch -------------------------------------------------------------------------------


def noisy_scale_and_shift(norm: nn.Module, shape: tuple[int, ...], seed: int) -> tuple[Tensor, Tensor]:
    """The scale s and shift m one training step of noisy_batch applies to each value of its BN output a
    (y = s * a + m): two inputs through the same noise draws (same RNG seed) give two equations per value."""
    ys, bns = [], []
    for x in (data(*shape, seed=2 * seed), data(*shape, seed=2 * seed + 1)):
        torch.manual_seed(seed)
        ys.append(norm(x).detach())
        bns.append(F.batch_norm(x, None, None, norm.weight, norm.bias, training=True, eps=norm.eps).detach())
    s = (ys[0] - ys[1]) / (bns[0] - bns[1])
    return s, ys[0] - s * bns[0]


@pytest.mark.parametrize("shape", [(2000, C), (2000, C, 2, 2)])
def test_noisy_batch_noise_moments(shape):
    norm = make("noisy_batch")
    randomize_affine(norm)  # the noise comes after gamma and beta
    mus, sigmas = [], []  # per step and unit: the centre of the shifts and the mean of the scales
    for seed in range(50):
        s, m = noisy_scale_and_shift(norm, shape, seed)
        if len(shape) == 4:  # one (s, m) per example and channel, shared by the H x W positions
            torch.testing.assert_close(s, s[:, :, :1, :1].expand_as(s))
            torch.testing.assert_close(m, m[:, :, :1, :1].expand_as(m))
            s, m = s[:, :, 0, 0], m[:, :, 0, 0]
        lo, hi = m.min(0).values, m.max(0).values
        assert ((hi - lo) <= 0.2 + 1e-9).all() and ((hi - lo) > 0.19).all()  # m_ij ~ U(mu_j - 0.1, mu_j + 0.1)
        torch.testing.assert_close(
            s.std(0), torch.full((C,), 0.1, dtype=torch.float64), atol=0.01, rtol=0
        )  # s_ij ~ N(sigma_j, 0.1)
        mus.append((hi + lo) / 2)
        sigmas.append(s.mean(0))
    mu, sigma = torch.cat(mus), torch.cat(sigmas)  # 400 draws each
    assert (
        mu.min() >= -0.5 - 1e-3 and mu.max() <= 0.5 + 1e-3 and mu.min() < -0.45 and mu.max() > 0.45
    )  # mu_j ~ U(-0.5, 0.5)
    assert (mu.mean().item(), mu.std().item()) == pytest.approx((0.0, 12**-0.5), abs=0.03)
    assert (
        sigma.min() >= 1 - 0.01 and sigma.max() <= 1.25 + 0.01 and sigma.min() < 1.02 and sigma.max() > 1.23
    )  # sigma_j ~ U(1, 1.25)
    assert (sigma.mean().item(), sigma.std().item()) == pytest.approx((1.125, 0.25 * 12**-0.5), abs=0.01)


@pytest.mark.parametrize("shape", SHAPES)
def test_noisy_batch_running_stats_and_eval_are_batch_norm(shape):
    noisy, batch = make("noisy_batch"), make("batch")
    randomize_affine(noisy, batch)
    for seed in range(3):
        x = data(*shape, seed=seed)
        assert not torch.allclose(noisy(x), batch(x))  # training: noise
    for key, value in batch.state_dict().items():
        assert torch.equal(noisy.state_dict()[key], value), key
    x = data(*shape, seed=50)
    assert torch.equal(noisy.eval()(x), batch.eval()(x))


# --- per-example norms: layer, instance, group, rms -----------------------------------------


def test_layer_norm_statistics():
    x = data(12, C, 3, 3)
    y = make("layer", affine=False)(x).detach()
    torch.testing.assert_close(y.mean((1, 2, 3)), torch.zeros(12, dtype=torch.float64))
    torch.testing.assert_close(y.var((1, 2, 3), unbiased=False), torch.ones(12, dtype=torch.float64), atol=1e-4, rtol=0)
    v, layer = data(12, C), make("layer")
    randomize_affine(layer)
    reference = nn.LayerNorm(C).double()
    reference.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer(v), reference(v))


def test_instance_norm_statistics():
    x = data(12, C, 3, 3)
    y = make("instance", affine=False)(x).detach()
    torch.testing.assert_close(y.mean((2, 3)), torch.zeros(12, C, dtype=torch.float64))
    torch.testing.assert_close(y.var((2, 3), unbiased=False), torch.ones(12, C, dtype=torch.float64), atol=1e-4, rtol=0)
    v = data(12, C)  # a vector is one instance: layer norm
    torch.testing.assert_close(make("instance")(v), make("layer")(v))


def test_group_norm_on_vectors_normalizes_feature_groups():
    y = make("group", groups=2, affine=False)(data(12, C)).detach().view(12, 2, C // 2)
    torch.testing.assert_close(y.mean(2), torch.zeros(12, 2, dtype=torch.float64))
    torch.testing.assert_close(y.var(2, unbiased=False), torch.ones(12, 2, dtype=torch.float64), atol=1e-4, rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("eps", [1e-5, 0.5])
def test_rms_norm(shape, eps):
    rms, gamma = make("rms", eps=eps), torch.linspace(0.5, 2.0, C, dtype=torch.float64)
    with torch.no_grad():
        rms.weight.copy_(gamma)
    x = data(*shape)
    dims = tuple(range(1, x.dim()))
    mean_square = x.square().mean(dims, keepdim=True)
    y = rms(x).detach()
    torch.testing.assert_close(y, x / torch.sqrt(mean_square + eps) * gamma.view(1, C, *[1] * (x.dim() - 2)))
    y_plain = make("rms", eps=eps, affine=False)(x).detach()  # per-example mean square 1, up to eps
    torch.testing.assert_close(y_plain.square().mean(dims, keepdim=True), mean_square / (mean_square + eps))
    assert [name for name, _ in rms.named_parameters()] == ["weight"]  # scale only, no shift
