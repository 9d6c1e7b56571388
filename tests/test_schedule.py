"""optim.schedule: the lr of each step equals the schedule's formula, in ordinary and in fused runs, the
update really takes it, and an interrupted run resumed from its checkpoint continues it exactly."""

from __future__ import annotations

import copy
import math
import time

import pytest
import torch
from helpers import TINY, assert_equal_runs, compose_config, scalars

from bnlab.core.data import load_data
from bnlab.core.optim import lr_factor
from bnlab.run.engine import Single
from bnlab.run.fused.engine import Fused
from bnlab.run.train import train, train_runs
from bnlab.schema.config import OptimConfig

STEPS = 40
SCHEDULED = [
    *TINY,
    f"trainer.max_steps={STEPS}",
    "trainer.eval_every=5",
    "trainer.log_every=1",
    "trainer.checkpoint_every=10",
    "trainer.precision=fp64",
    "model.widths=[16,12]",
    "optim.lr=0.2",
]
SCHEDULES = {  # name -> overrides
    "none": ["optim.schedule=none"],
    "warmup": ["optim.schedule=none", "optim.warmup_steps=8"],
    "step": ["optim.schedule=step", "optim.decay_every=7", "optim.decay_factor=0.5", "optim.warmup_steps=3"],
    "cosine": ["optim.schedule=cosine", "optim.warmup_steps=10"],
}


@pytest.mark.parametrize(
    "cfg, max_steps, expected",
    [
        (OptimConfig(), 100, {1: 1.0, 50: 1.0, 100: 1.0}),
        (OptimConfig(warmup_steps=4), 100, {1: 0.25, 2: 0.5, 4: 1.0, 5: 1.0, 100: 1.0}),
        # step: the first decay_every steps after the warm-up at the full lr, then x decay_factor every decay_every
        (OptimConfig(schedule="step", decay_every=10, decay_factor=0.1), 100, {1: 1, 10: 1, 11: 0.1, 21: 0.01}),
        (
            OptimConfig(schedule="step", decay_every=10, decay_factor=0.5, warmup_steps=5),
            100,
            {5: 1, 6: 1, 15: 1, 16: 0.5, 26: 0.25},
        ),
        # cosine over the 80 steps after a 20-step warm-up: half-way down at s = 40, i.e. step 61
        (
            OptimConfig(schedule="cosine", warmup_steps=20),
            100,
            {10: 0.5, 20: 1, 21: 1, 61: 0.5, 100: (1 + math.cos(math.pi * 79 / 80)) / 2},
        ),
        (OptimConfig(schedule="cosine"), 4, {1: 1, 2: (1 + math.cos(math.pi / 4)) / 2, 3: 0.5}),
    ],
)
def test_lr_factor_at_chosen_steps(cfg, max_steps, expected):
    assert {step: lr_factor(cfg, step, max_steps) for step in expected} == pytest.approx(expected, rel=1e-12)


def formula(cfg: OptimConfig, step: int) -> float:
    """The lr of `step` written out from the schedule's definition (docs/guide.md, the schedule), not via lr_factor."""
    w, lr = cfg.warmup_steps, cfg.lr
    if step <= w:
        return lr * step / w
    s = step - w - 1
    if cfg.schedule == "step":
        return lr * cfg.decay_factor ** math.floor(s / cfg.decay_every)
    if cfg.schedule == "cosine":
        return lr * 0.5 * (1 + math.cos(math.pi * s / (STEPS - w)))
    return lr


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_each_step_of_a_run_takes_the_lr_of_the_formula(name):
    """SGD without momentum moves each weight by exactly -lr * grad: the lr a step took, read off the update."""
    cfg = compose_config([*SCHEDULED, *SCHEDULES[name], "norm=none"])
    data = load_data(cfg.data, torch.device("cpu"))
    data.train_x, data.test_x = data.train_x.double(), data.test_x.double()
    engine = Single(cfg, data, torch.device("cpu"), writer=None, checkpoint=None)
    weight = engine.model[1].layer.weight
    for step in range(1, STEPS + 1):
        before = weight.detach().clone()
        engine.step(step)
        lr = formula(cfg.optim, step)
        assert weight.grad.abs().max() > 0
        torch.testing.assert_close(before - weight.detach(), lr * weight.grad, rtol=1e-9, atol=1e-15)
        assert engine.lrs() == [pytest.approx(lr, rel=1e-12)]


@pytest.mark.parametrize("name", ["step", "cosine"])
def test_train_lr_in_tensorboard_follows_the_formula_and_fused_members_scale_their_own_lr(name, tmp_path):
    base = compose_config([*SCHEDULED, *SCHEDULES[name]])
    cfgs = []
    for seed, lr in ((0, 0.2), (1, 0.05)):
        cfg = copy.deepcopy(base)
        cfg.seed, cfg.optim.lr = seed, lr
        cfgs.append(cfg)
    fused = train_runs(copy.deepcopy(cfgs), [tmp_path / "fused0", tmp_path / "fused1"])
    assert [s.fused_members for s in fused] == [2, 2]
    for n, cfg in enumerate(cfgs):
        alone = train(copy.deepcopy(cfg), tmp_path / f"alone{n}")
        for run in (tmp_path / f"fused{n}", tmp_path / f"alone{n}"):
            lrs = scalars(run)["train/lr"]
            assert [step for step, _ in lrs] == list(range(0, STEPS + 1, 5))
            expected = [cfg.optim.lr] + [formula(cfg.optim, step) for step in range(5, STEPS + 1, 5)]
            assert [v for _, v in lrs] == pytest.approx(expected, rel=1e-6)  # TensorBoard keeps float32
        assert fused[n].final == pytest.approx(alone.final, rel=1e-9)  # the fused member took its run's lrs


@pytest.mark.slow
@pytest.mark.parametrize("fused", [False, True], ids=["single", "fused"])
@pytest.mark.parametrize("name", ["step", "cosine"])
def test_an_interrupted_run_resumes_on_the_schedule_exactly(name, fused, tmp_path, monkeypatch):
    """Stopped at step 23 (its last checkpoint at step 20), resumed, it equals the unbroken run step for step."""
    cfg = compose_config([*SCHEDULED, *SCHEDULES[name], "optim.momentum=0.9"])
    cfgs = [cfg] if not fused else [cfg, copy.deepcopy(cfg)]
    if fused:
        cfgs[1].seed, cfgs[1].optim.lr = 1, 0.05
    names = [f"{n}" for n in range(len(cfgs))]
    train_runs(copy.deepcopy(cfgs), [tmp_path / "unbroken" / n for n in names])
    engine = Fused if fused else Single
    step = engine.step

    def interrupted_at_23(self, i):
        if i == 23:
            raise KeyboardInterrupt
        return step(self, i)

    monkeypatch.setattr(engine, "step", interrupted_at_23)
    with pytest.raises(KeyboardInterrupt):
        train_runs(copy.deepcopy(cfgs), [tmp_path / "run" / n for n in names])
    monkeypatch.setattr(engine, "step", step)
    # TensorBoard reads a folder's events files in name order, and a name starts with the second it was made
    # in: the resumed run's file must come second, so that its purge of the steps after the checkpoint holds
    time.sleep(1.1)
    for c in cfgs:
        c.trainer.resume = True
    train_runs(cfgs, [tmp_path / "run" / n for n in names])
    for n in names:
        assert_equal_runs(tmp_path / "run" / n, tmp_path / "unbroken" / n)
