"""bnlab.fused: N runs trained as one stacked model follow their N separate runs step for step.

The separate runs are train.py's loop in brief: torch.manual_seed(seed), build_model, the optimizer
of bnlab.optim and the batches of bnlab.train.batches seeded with the run's seed. Most cases run in
float64, where fused and separate runs agree to rounding (about 1e-15), so any difference in the
maths shows; one case runs in float32, as bnlab trains, with float32 tolerances.
"""

from __future__ import annotations

import copy
import math
from functools import cache

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_config

from bnlab.config import TrainConfig
from bnlab.data import Dataset, load_data
from bnlab.fused import FUSABLE_NORMS, FusedModel, build_fused, can_fuse, evaluate_fused, train_fused
from bnlab.models import build_model
from bnlab.norms import NORMS
from bnlab.optim import build_optimizer
from bnlab.train import batches, evaluate

STEPS = 20
SMALL = {"mlp": "model.widths=[16,12]", "cnn": "model.widths=[4,8]", "resnet": "model.widths=[4,8]"}
TASK = [
    "data=synthetic",
    "data.num_train=256",
    "data.num_test=64",
    "data.image_size=8",
    "data.channels=2",
    "data.batch_size=32",
    "trainer.device=cpu",
    "norm.groups=2",
    "norm.virtual_batch_size=8",  # ghost_batch: 4 virtual batches of 8
    "norm.renorm_warmup=4",  # batch_renorm: r and d clipped and ramping within the 20 steps
    "norm.r_max_steps=16",
    "norm.d_max_steps=10",
]
# (seed, lr, weight decay) of the three members
MEMBERS = [(0, 0.1, 0.0), (1, 0.05, 1e-3), (2, 0.2, 1e-2)]


def member_configs(*overrides: str, members=MEMBERS) -> list[TrainConfig]:
    base = compose_config([*TASK, *overrides])
    cfgs = []
    for seed, lr, wd in members:
        cfg = copy.deepcopy(base)
        cfg.seed, cfg.optim.lr, cfg.optim.weight_decay = seed, lr, wd
        cfgs.append(cfg)
    return cfgs


@cache
def task(dtype: torch.dtype) -> Dataset:
    data = load_data(compose_config(TASK).data, torch.device("cpu"))
    data.train_x, data.test_x = data.train_x.to(dtype), data.test_x.to(dtype)
    return data


def separate_run(cfg: TrainConfig, data: Dataset, steps: int = STEPS):
    """train.py's loop without its logging: per-step losses and accuracies, the trained model."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, data.in_shape, data.num_classes).to(data.train_x.dtype)
    optimizer = build_optimizer(model.parameters(), cfg.optim)
    order = batches(len(data.train_y), cfg.data.batch_size, torch.Generator().manual_seed(cfg.seed))
    losses, accs = [], []
    for _ in range(steps):
        idx = next(order)
        logits = model(data.train_x[idx])
        loss = F.cross_entropy(logits, data.train_y[idx])
        if not math.isfinite(loss.item()):
            break  # diverged: train.py stops before the update
        losses.append(loss.item())
        accs.append((logits.argmax(1) == data.train_y[idx]).float().mean().item())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return losses, accs, model


def assert_fused_equals_separate(cfgs: list[TrainConfig], dtype: torch.dtype = torch.float64) -> None:
    tol = {"rtol": 1e-9, "atol": 1e-11} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    data = task(dtype)
    fused = train_fused(cfgs, data, STEPS)
    assert fused.diverged_at == [None] * len(cfgs)
    fused.model.eval()
    fused_logits = fused.model(data.test_x.expand(len(cfgs), *data.test_x.shape))
    fused_eval = evaluate_fused(fused.model, data.test_x, data.test_y)
    for n, cfg in enumerate(cfgs):
        losses, accs, model = separate_run(cfg, data)
        torch.testing.assert_close(fused.losses[:, n], torch.tensor(losses, dtype=torch.float64), **tol)
        if dtype == torch.float64:
            assert fused.accs[:, n].tolist() == accs
        plain = model.state_dict()
        assert fused.state_dicts[n].keys() == plain.keys()
        for key, value in plain.items():  # parameters and running statistics
            torch.testing.assert_close(fused.state_dicts[n][key], value, **tol, msg=f"member {n}: {key}")
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(fused_logits[n], model(data.test_x), **tol)
        loss, acc = evaluate(model, data.test_x, data.test_y)
        assert fused_eval[n][0] == pytest.approx(loss, rel=1e-6)  # train.evaluate sums in float32
        assert fused_eval[n][1] == pytest.approx(acc)
    # the members really are different runs
    assert not torch.equal(fused.losses[:, 0], fused.losses[:, 1])


@pytest.mark.parametrize("norm", sorted(FUSABLE_NORMS))
@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_fused_members_follow_their_separate_runs(model, norm):
    assert_fused_equals_separate(member_configs(f"model={model}", SMALL[model], f"norm={norm}"))


@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_a_fused_resnet_follows_its_separate_runs(norm):
    assert_fused_equals_separate(member_configs("model=resnet", SMALL["resnet"], f"norm={norm}"))


@pytest.mark.parametrize(
    "optim", [["optim=sgd", "optim.momentum=0.9"], ["optim=adam"]], ids=["sgd_momentum", "adam"]
)
@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_per_member_lr_and_weight_decay_with_momentum_and_adam(model, optim):
    members = [(seed, lr / 10, wd) for seed, lr, wd in MEMBERS] if optim == ["optim=adam"] else MEMBERS
    assert_fused_equals_separate(member_configs(f"model={model}", SMALL[model], *optim, members=members))


@pytest.mark.parametrize("placement", ["before_act", "after_act"])
def test_placement_bias_and_sigmoid_in_float32(placement):
    cfgs = member_configs("model=cnn", SMALL["cnn"], f"norm.placement={placement}", "model.bias=true", "model.activation=sigmoid")
    assert_fused_equals_separate(cfgs, torch.float32)
    assert_fused_equals_separate(member_configs("model=mlp", SMALL["mlp"], f"norm.placement={placement}"), torch.float32)


def test_a_diverging_member_stops_alone_and_leaves_the_others_alone():
    cfgs = member_configs("model=mlp", SMALL["mlp"], "norm=batch")
    cfgs[1].optim.lr = math.inf  # its weights turn inf and NaN in the first update
    data = task(torch.float32)
    fused = train_fused(cfgs, data, STEPS)
    assert fused.diverged_at == [None, 2, None]
    for n, cfg in enumerate(cfgs):
        losses, _, model = separate_run(cfg, data)
        torch.testing.assert_close(fused.losses[: len(losses), n], torch.tensor(losses, dtype=torch.float64), rtol=1e-4, atol=1e-5)
        assert fused.losses[len(losses) :, n].isnan().all()
        for key, value in model.state_dict().items():  # the diverged member: as it was when it stopped
            torch.testing.assert_close(fused.state_dicts[n][key], value, rtol=1e-4, atol=1e-5, equal_nan=True)
    assert len(separate_run(cfgs[1], data)[0]) == 1


@pytest.mark.parametrize("model", ["mlp", "cnn", "resnet"])
def test_member_state_dict_loads_into_an_ordinary_model(model):
    cfgs = member_configs(f"model={model}", SMALL[model])
    data = task(torch.float32)
    fused = build_fused(cfgs, data.in_shape, data.num_classes)
    fused.eval()
    logits = fused(data.test_x.expand(len(cfgs), *data.test_x.shape))
    for n, cfg in enumerate(cfgs):
        torch.manual_seed(cfg.seed)
        original = build_model(cfg, data.in_shape, data.num_classes)
        state = fused.member_state_dict(n)
        assert all(torch.equal(state[k], v) for k, v in original.state_dict().items())  # stacked and handed back
        plain = build_model(cfgs[(n + 1) % len(cfgs)], data.in_shape, data.num_classes)
        plain.load_state_dict(state)  # strict: same keys, same shapes
        plain.eval()
        with torch.no_grad():
            torch.testing.assert_close(plain(data.test_x), logits[n])


def test_fused_model_refuses_models_of_different_shapes():
    cfg = member_configs("model=mlp", SMALL["mlp"])[0]
    wide = member_configs("model=mlp", "model.widths=[16,16]")[0]
    with pytest.raises(ValueError, match="differs from model 0"):
        FusedModel([build_model(cfg, (2, 8, 8), 10), build_model(wide, (2, 8, 8), 10)])


def test_can_fuse_accepts_runs_that_differ_in_seed_lr_and_weight_decay():
    cfgs = member_configs("model=cnn", SMALL["cnn"])
    cfgs[1].trainer.threads, cfgs[2].trainer.resume = 1, True  # bookkeeping, no effect on the trajectory
    assert can_fuse(cfgs) is None
    assert can_fuse(cfgs[:1]) is None


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("data.batch_size=16", "data.batch_size"),
        ("norm=layer", "norm.name"),
        ("optim=adam", "optim.name"),
        ("optim.momentum=0.9", "optim.momentum"),
        ("model.widths=[16,16]", "model.widths"),
        ("model.activation=tanh", "model.activation"),
        ("trainer.max_steps=10", "trainer.max_steps"),
    ],
)
def test_can_fuse_refuses_runs_that_differ_elsewhere(override, key):
    cfgs = [*member_configs("model=mlp", SMALL["mlp"])[:2], member_configs("model=mlp", SMALL["mlp"], override)[2]]
    reason = can_fuse(cfgs)
    assert reason is not None and key in reason
    with pytest.raises(ValueError, match="cannot be fused"):
        train_fused(cfgs, task(torch.float32), 1)


def test_can_fuse_refuses_norms_without_a_stacked_form():
    assert set(FUSABLE_NORMS) <= set(NORMS)
    cfgs = member_configs("model=mlp", SMALL["mlp"])
    for cfg in cfgs:
        cfg.norm.name = "noisy_batch"  # e.g. a norm drawing random numbers: not (yet) known to stack
    assert "norm=noisy_batch" in can_fuse(cfgs)
    assert can_fuse([]) == "no configs"
