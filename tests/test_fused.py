"""Fused runs: N runs trained as one stacked model end where their N separate runs end.

Both sides go through bnlab.run.train: `train` for each separate run, `train_runs` for the fused group (the
`Fused` engine), and the comparison reads what a user reads: summary.json, the TensorBoard scalars of
every step (trainer.log_every=1) and the checkpoint's parameters and running statistics. Most cases run
in float64 (trainer.precision=fp64), where fused and separate runs agree to rounding, so any difference
in the maths shows; some run in float32, as bnlab trains by default, with float32 tolerances.
"""

from __future__ import annotations

import copy
import json
import math
import re
import signal
import time
from pathlib import Path

import pytest
import torch
from helpers import DONE, TINY, bnlab, compose_config, scalars, start

from bnlab.core.data import load_data
from bnlab.core.models import build_model
from bnlab.core.norms import NORMS
from bnlab.face.fusing import fusing_line, plan
from bnlab.run.checkpoint import CHECKPOINT, PREVIOUS
from bnlab.run.engine import Single
from bnlab.run.fused.engine import Fused, activation_bytes, build_fused, can_fuse
from bnlab.run.fused.stacking import FusedModel, Memberwise
from bnlab.run.train import train, train_runs
from bnlab.schema.config import MEMBER_KEYS, ConfigError, TrainConfig

# built-in norms with a stacked form (norm=custom fuses when its target declares it: tested on its own below)
FUSABLE_NORMS = sorted(name for name, norm in NORMS.items() if norm.fuse is not None and name != "custom")
MEAN_ONLY = ["norm=custom", "norm.target=my_norm.MeanOnlyBatchNorm"]  # examples/my_norm: per_channel = True

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
    "trainer.threads=1",
    f"trainer.max_steps={STEPS}",
    "trainer.eval_every=5",
    "trainer.log_every=1",
    "trainer.checkpoint_every=0",
    "threshold.values=[0.3,0.5,0.9]",
    "norm.groups=2",
    "norm.virtual_batch_size=8",  # ghost_batch: 4 virtual batches of 8
    "norm.renorm_warmup=4",  # batch_renorm: r and d clipped and ramping within the 20 steps
    "norm.r_max_steps=16",
    "norm.d_max_steps=10",
]
# (seed, lr, weight decay) of the three members
MEMBERS = [(0, 0.1, 0.0), (1, 0.05, 1e-3), (2, 0.2, 1e-2)]
FP64 = {"rtol": 1e-9, "atol": 1e-11}
FP32 = {"rtol": 1e-4, "atol": 1e-5}


def member_configs(*overrides: str, members=MEMBERS, precision: str = "fp64") -> list[TrainConfig]:
    keys = {o.split("=")[0] for o in overrides}
    base = compose_config(
        [*(o for o in TASK if o.split("=")[0] not in keys), f"trainer.precision={precision}", *overrides]
    )
    cfgs = []
    for seed, lr, wd in members:
        cfg = copy.deepcopy(base)
        cfg.seed, cfg.optim.lr, cfg.optim.weight_decay = seed, lr, wd
        cfgs.append(cfg)
    return cfgs


def model_state(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / CHECKPOINT, weights_only=False)["model"]


def train_interrupted_and_resumed(cfgs: list[TrainConfig], dirs: list[Path], monkeypatch, at: int = 12) -> list:
    """Train cfgs as a fused group that Ctrl-C stops before step `at` (checkpoints every 5 steps), then
    resume it to the end; the resumed summaries."""
    step = Fused.step

    def interrupted(self, i):
        if i == at:
            raise KeyboardInterrupt
        return step(self, i)

    cfgs = copy.deepcopy(cfgs)
    for cfg in cfgs:
        cfg.trainer.checkpoint_every = 5
    with monkeypatch.context() as patch:
        patch.setattr(Fused, "step", interrupted)
        with pytest.raises(KeyboardInterrupt):
            train_runs(copy.deepcopy(cfgs), dirs)
    assert [json.loads((d / "summary.json").read_text())["status"] for d in dirs] == ["interrupted"] * len(dirs)
    for cfg in cfgs:
        cfg.trainer.resume = True
    return train_runs(cfgs, dirs)


def assert_fused_equals_separate(cfgs: list[TrainConfig], tmp_path: Path, monkeypatch=None) -> list[dict]:
    """Train cfgs fused (with `monkeypatch`: interrupted and resumed) and one by one; every member's record
    equals its separate run's. Returns the fused summaries."""
    tol = FP64 if cfgs[0].trainer.precision == "fp64" else FP32
    fused_dirs = [tmp_path / f"fused{n}" for n in range(len(cfgs))]
    if monkeypatch:
        fused = train_interrupted_and_resumed(cfgs, fused_dirs, monkeypatch)
    else:
        fused = train_runs(copy.deepcopy(cfgs), fused_dirs)
    for n, cfg in enumerate(cfgs):
        alone_dir = tmp_path / f"alone{n}"
        alone = train(copy.deepcopy(cfg), alone_dir)
        assert (fused[n].status, fused[n].steps) == (alone.status, alone.steps)
        assert fused[n].fused_members == len(cfgs) and alone.fused_members == 1
        assert fused[n].final.keys() == alone.final.keys()
        for key, value in alone.final.items():
            assert fused[n].final[key] == pytest.approx(value, rel=tol["rtol"], abs=tol["atol"], nan_ok=True), key
        if tol is FP64:
            assert fused[n].iterations_to_threshold == alone.iterations_to_threshold
        a, b = scalars(fused_dirs[n]), scalars(alone_dir)
        assert a.keys() == b.keys()
        # TensorBoard keeps float32: two float64 numbers a rounding apart may land on neighbouring float32 values
        logged = {"rtol": max(tol["rtol"], 2**-22), "atol": tol["atol"]}
        for tag in b:  # train/loss and train/acc at every step, test metrics, lr, hparams metrics
            assert [s for s, _ in a[tag]] == [s for s, _ in b[tag]], tag
            torch.testing.assert_close(
                torch.tensor([v for _, v in a[tag]]),
                torch.tensor([v for _, v in b[tag]]),
                **logged,
                equal_nan=True,
                msg=tag,
            )
        plain = model_state(alone_dir)
        state = model_state(fused_dirs[n])
        assert state.keys() == plain.keys()
        for key, value in plain.items():  # parameters and running statistics
            torch.testing.assert_close(state[key], value, **tol, equal_nan=True, msg=f"member {n}: {key}")
    # the members really are different runs
    assert scalars(fused_dirs[0])["train/loss"] != scalars(fused_dirs[1])["train/loss"]
    return fused


@pytest.mark.parametrize("norm", sorted(FUSABLE_NORMS))
@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_fused_members_follow_their_separate_runs(model, norm, tmp_path):
    assert_fused_equals_separate(member_configs(f"model={model}", SMALL[model], f"norm={norm}"), tmp_path)


@pytest.mark.parametrize("norm", ["batch", "layer", "none"])
@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_fused_members_follow_their_separate_runs_in_float32(model, norm, tmp_path):
    # lr 4x smaller than MEMBERS': at lr 0.2 the CNN amplifies float32 rounding to 1e-3 in 20 steps
    members = [(seed, lr / 4, wd) for seed, lr, wd in MEMBERS]
    cfgs = member_configs(f"model={model}", SMALL[model], f"norm={norm}", precision="fp32", members=members)
    assert_fused_equals_separate(cfgs, tmp_path)


@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_a_fused_resnet_follows_its_separate_runs(norm, tmp_path):
    assert_fused_equals_separate(member_configs("model=resnet", SMALL["resnet"], f"norm={norm}"), tmp_path)


@pytest.mark.parametrize("model", ["mlp", "cnn", "resnet"])
def test_a_custom_norm_that_declares_per_channel_fuses_exactly(model, tmp_path):
    fused = assert_fused_equals_separate(member_configs(f"model={model}", SMALL[model], *MEAN_ONLY), tmp_path)
    assert all(s.fused_members == 3 for s in fused)


def test_a_custom_norm_that_does_not_declare_per_channel_runs_alone():
    cfgs = member_configs("model=mlp", SMALL["mlp"], "norm=custom", "norm.target=custom_targets.ChannelScale")
    assert "custom when its target declares per_channel = True" in can_fuse(cfgs)
    assert can_fuse(member_configs("model=mlp", SMALL["mlp"], *MEAN_ONLY)) is None
    custom_model = ["model=custom", "model.target=custom_targets.tiny_net"]
    assert "model=custom has no stacked form" in can_fuse(member_configs(*custom_model))


@pytest.mark.parametrize(
    "baseline",
    [
        ["model.residual_init=skipinit", "norm=none"],
        ["model.residual_init=fixup", "norm=none", "model.bias=false"],
        ["model.weight_standardization=true", "norm=group"],
        ["model.residual_init=fixup", "norm=none", "optim.agc=0.02", "optim.momentum=0.9"],
        ["model.weight_standardization=true", "norm=none", "optim=adam", "optim.agc=0.05"],
    ],
    ids=["skipinit", "fixup", "gn_ws", "fixup_agc", "ws_agc_adam"],
)
def test_the_fair_baselines_fuse_exactly(baseline, tmp_path):
    members = [(seed, lr / 10, wd) for seed, lr, wd in MEMBERS] if "optim=adam" in baseline else MEMBERS
    cfgs = member_configs("model=resnet", SMALL["resnet"], *baseline, members=members)
    assert_fused_equals_separate(cfgs, tmp_path)


def test_weight_standardization_and_agc_fuse_exactly_in_the_mlp(tmp_path):
    cfgs = member_configs("model=mlp", SMALL["mlp"], "model.weight_standardization=true", "norm=none", "optim.agc=0.02")
    assert_fused_equals_separate(cfgs, tmp_path)


@pytest.mark.parametrize("optim", [["optim=sgd", "optim.momentum=0.9"], ["optim=adam"]], ids=["sgd_momentum", "adam"])
@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_per_member_lr_and_weight_decay_with_momentum_and_adam(model, optim, tmp_path):
    members = [(seed, lr / 10, wd) for seed, lr, wd in MEMBERS] if optim == ["optim=adam"] else MEMBERS
    assert_fused_equals_separate(member_configs(f"model={model}", SMALL[model], *optim, members=members), tmp_path)


@pytest.mark.parametrize("placement", ["before_act", "after_act"])
def test_placement_bias_and_sigmoid(placement, tmp_path):
    cfgs = member_configs(
        "model=cnn", SMALL["cnn"], f"norm.placement={placement}", "model.bias=true", "model.activation=sigmoid"
    )
    assert_fused_equals_separate(cfgs, tmp_path)


SHARED_SEEDS = [(0, 0.1, 0.0), (0, 0.2, 1e-3), (1, 0.1, 0.0), (1, 0.05, 1e-2)]


@pytest.mark.parametrize(
    "overrides",
    [
        ["model=mlp", SMALL["mlp"]],
        ["model=cnn", SMALL["cnn"]],
        ["model=mlp", SMALL["mlp"], "model.weight_standardization=true"],
    ],
    ids=["mlp", "cnn", "mlp_ws"],
)
@pytest.mark.parametrize("order", [[0, 1, 2, 3], [0, 2, 1, 3]], ids=["by_seed", "mixed"])
def test_members_of_one_seed_share_their_batches_and_still_follow_their_separate_runs(overrides, order, tmp_path):
    cfgs = member_configs(*overrides, members=[SHARED_SEEDS[i] for i in order])
    data = load_data(cfgs[0].data, torch.device("cpu"))
    # by seed: 2 batches a step, one per seed, each fed to the model once; otherwise one per member
    assert Fused(cfgs, data, torch.device("cpu")).inputs == (2 if order == [0, 1, 2, 3] else 4)
    assert_fused_equals_separate(cfgs, tmp_path)


def test_a_diverging_member_stops_alone_and_leaves_the_others_alone(tmp_path):
    cfgs = member_configs("model=mlp", SMALL["mlp"], "norm=batch")
    cfgs[1].optim.lr = math.inf  # its weights turn inf and NaN in the first update
    fused = assert_fused_equals_separate(cfgs, tmp_path)
    assert [s.status for s in fused] == ["completed", "diverged", "completed"]
    assert [s.steps for s in fused] == [STEPS, 1, STEPS]


@pytest.mark.parametrize("norm", ["none", "batch"])
def test_fused_regression_members_follow_their_separate_runs(norm, tmp_path):
    cfgs = member_configs("data=linear_regression", "model=dln", "model.widths=[6,6,6]", "data.dim=6", f"norm={norm}")
    fused = assert_fused_equals_separate(cfgs, tmp_path)
    assert all(set(s.final) == {"train_loss", "test_loss"} for s in fused)


def test_a_precise_bn_member_is_tested_as_its_separate_run(tmp_path):
    cfgs = member_configs("model=mlp", SMALL["mlp"], "norm=batch", "trainer.precise_bn=4")
    fused = assert_fused_equals_separate(cfgs, tmp_path)
    assert all("test_acc_precise_bn" in s.final for s in fused)


def test_an_interrupted_fused_group_resumes_to_the_unbroken_group(tmp_path, monkeypatch):
    cfgs = member_configs("model=cnn", SMALL["cnn"], "norm=batch", "optim.momentum=0.9", "trainer.checkpoint_every=5")
    unbroken = train_runs(copy.deepcopy(cfgs), [tmp_path / f"unbroken{n}" for n in range(3)])
    step = Fused.step

    def interrupted_at_12(self, i):
        if i == 12:
            raise KeyboardInterrupt
        return step(self, i)

    monkeypatch.setattr(Fused, "step", interrupted_at_12)
    dirs = [tmp_path / f"run{n}" for n in range(3)]
    with pytest.raises(KeyboardInterrupt):
        train_runs(copy.deepcopy(cfgs), dirs)
    assert [json.loads((d / "summary.json").read_text())["status"] for d in dirs] == ["interrupted"] * 3
    monkeypatch.setattr(Fused, "step", step)
    for cfg in cfgs:
        cfg.trainer.resume = True
    resumed = train_runs(cfgs, dirs)
    for n in range(3):
        assert resumed[n].final == unbroken[n].final
        a, b = scalars(dirs[n]), scalars(tmp_path / f"unbroken{n}")
        assert a.keys() == b.keys()
        for tag in b:  # every step once, every value exact (NaN: a threshold never reached)
            assert [s for s, _ in a[tag]] == [s for s, _ in b[tag]], tag
            torch.testing.assert_close(
                torch.tensor([v for _, v in a[tag]]),
                torch.tensor([v for _, v in b[tag]]),
                rtol=0,
                atol=0,
                equal_nan=True,
            )


@pytest.mark.parametrize("model", ["mlp", "cnn", "resnet"])
def test_member_state_dict_loads_into_an_ordinary_model(model):
    cfgs = member_configs(f"model={model}", SMALL[model])
    data = load_data(cfgs[0].data, torch.device("cpu"))
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


# Every key marked MEMBER in bnlab/schema/config.py: the setting it acts in and the values of the three members.
MEMBER_CASES = {
    "seed": ([], [3, 4, 5]),
    "optim.lr": ([], [0.1, 0.02, 0.3]),
    "optim.weight_decay": ([], [0.0, 1e-3, 3e-2]),
    "optim.momentum": ([], [0.0, 0.5, 0.9]),
    "optim.betas": (["optim=adam", "optim.lr=0.01"], [[0.9, 0.999], [0.8, 0.99], [0.5, 0.9]]),
    "optim.eps": (["optim=adam", "optim.lr=0.01"], [1e-8, 1e-3, 0.1]),
    "optim.agc": ([], [0.0, 0.01, 0.1]),
    "optim.schedule": (["optim.decay_every=5", "optim.decay_factor=0.5"], ["none", "step", "cosine"]),
    "optim.warmup_steps": ([], [0, 3, 10]),
    "optim.decay_every": (["optim.schedule=step"], [3, 7, 1000]),
    "optim.decay_factor": (["optim.schedule=step", "optim.decay_every=5"], [0.1, 0.5, 1.0]),
    "model.init": (["model.init_std=0.3"], ["default", "normal", "glorot"]),
    "model.init_std": (["model.init=normal"], [0.05, 0.3, 1.0]),
    "norm.eps": ([], [1e-5, 1e-2, 0.5]),
    "norm.momentum": ([], [0.1, 0.01, 0.6]),
    "norm.groups": (["norm=group"], [1, 2, 4]),
    "norm.virtual_batch_size": (["norm=ghost_batch"], [4, 8, 16]),
    "norm.r_max": (["norm=batch_renorm"], [1.1, 1.5, 3.0]),
    "norm.d_max": (["norm=batch_renorm"], [0.1, 0.5, 5.0]),
    "norm.renorm_warmup": (["norm=batch_renorm"], [0, 4, 8]),
    "norm.r_max_steps": (["norm=batch_renorm"], [4, 12, 30]),
    "norm.d_max_steps": (["norm=batch_renorm"], [4, 12, 30]),
    "trainer.stop_loss": (["trainer.stop_patience=15"], [0.0, 0.5, 1.0]),  # 0.5 and 1.0 stop them at step 15
    "trainer.stop_patience": (["trainer.stop_loss=1.0"], [16, 30, 100]),  # 16 stops the first after the resume
    "trainer.precise_bn": ([], [0, 2, 5]),
    "trainer.shift": (["trainer.precise_bn=2"], ["none", "noise", "noise"]),
    "threshold.metric": ([], ["test_acc", "train_acc", "train_loss"]),
    "threshold.values": ([], [[0.3], [0.2, 0.9], [0.1, 0.4, 0.6]]),
}
# The norm constants in every norm that takes them, on feature vectors (mlp) and maps (cnn).
NORM_CASES = [
    (model, key, norm)
    for key in ("norm.eps", "norm.momentum")
    for norm in FUSABLE_NORMS
    if key.split(".")[1] in NORMS[norm].keys
    for model in ("mlp", "cnn")
]


def members_differing_in(key: str, *overrides: str) -> list[TrainConfig]:
    """The three members of MEMBERS, each with its own value of `key` (MEMBER_CASES) as well."""
    setting, values = MEMBER_CASES[key]
    cfgs = member_configs(*setting, *overrides)
    for cfg, value in zip(cfgs, values):
        section, _, name = key.rpartition(".")
        setattr(getattr(cfg, section) if section else cfg, name, value)
    assert can_fuse(cfgs) is None
    return cfgs


def test_every_key_that_members_may_differ_in_has_its_case():
    assert set(MEMBER_CASES) == set(MEMBER_KEYS)


@pytest.mark.parametrize("key", sorted(MEMBER_CASES))
def test_members_that_differ_in_a_key_follow_their_separate_runs_through_a_resume(key, tmp_path, monkeypatch):
    cfgs = members_differing_in(key, "model=mlp", SMALL["mlp"])
    fused = assert_fused_equals_separate(cfgs, tmp_path, monkeypatch)
    if key.startswith("trainer.stop"):
        assert "diverged" in [s.status for s in fused] and "completed" in [s.status for s in fused]


@pytest.mark.parametrize(("model", "key", "norm"), NORM_CASES)
def test_norm_constants_per_member_in_every_norm(model, key, norm, tmp_path):
    cfgs = members_differing_in(key, f"model={model}", SMALL[model], f"norm={norm}")
    assert_fused_equals_separate(cfgs, tmp_path)


def test_members_whose_norm_settings_differ_run_their_norms_member_by_member():
    cfgs = members_differing_in("norm.eps", "model=mlp", SMALL["mlp"])
    data = load_data(cfgs[0].data, torch.device("cpu"))
    norms = [m for m in build_fused(cfgs, data.in_shape, data.num_classes).modules() if isinstance(m, Memberwise)]
    assert len(norms) == 2 and [layer.eps for layer in norms[0].layers] == [1e-5, 1e-2, 0.5]
    same = member_configs("model=mlp", SMALL["mlp"])
    assert not any(isinstance(m, Memberwise) for m in build_fused(same, data.in_shape, data.num_classes).modules())


def test_can_fuse_accepts_runs_that_differ_in_member_and_bookkeeping_keys():
    cfgs = members_differing_in("norm.momentum", "model=cnn", SMALL["cnn"])
    cfgs[1].trainer.threads, cfgs[2].trainer.resume = 1, True  # bookkeeping, no effect on the trajectory
    cfgs[1].model.init, cfgs[2].optim.momentum = "normal", 0.9
    assert can_fuse(cfgs) is None
    assert can_fuse(cfgs[:1]) is None


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("data.batch_size=16", "data.batch_size"),
        ("norm=layer", "norm.name"),
        ("optim=adam", "optim.name"),
        ("norm.affine=false", "norm.affine"),
        ("norm.placement=after_act", "norm.placement"),
        ("model.bias=true", "model.bias"),
        ("model.widths=[16,16]", "model.widths"),
        ("model.activation=tanh", "model.activation"),
        ("trainer.max_steps=10", "trainer.max_steps"),
        ("model.residual_init=skipinit", "model.residual_init"),
        ("model.weight_standardization=true", "model.weight_standardization"),
    ],
)
def test_can_fuse_refuses_runs_that_differ_elsewhere(override, key):
    cfgs = [*member_configs("model=mlp", SMALL["mlp"])[:2], member_configs("model=mlp", SMALL["mlp"], override)[2]]
    reason = can_fuse(cfgs)
    assert reason is not None and key in reason
    with pytest.raises(ConfigError, match="cannot be fused"):
        Fused(cfgs, load_data(cfgs[0].data, torch.device("cpu")), torch.device("cpu"))


def test_can_fuse_refuses_norms_without_a_stacked_form():
    assert "noisy_batch" not in FUSABLE_NORMS and set(FUSABLE_NORMS) < set(NORMS)
    cfgs = member_configs("model=mlp", SMALL["mlp"])
    for cfg in cfgs:
        cfg.norm.name = "noisy_batch"  # e.g. a norm drawing random numbers: not (yet) known to stack
    assert "norm=noisy_batch" in can_fuse(cfgs)
    assert can_fuse([]) == "no configs"


@pytest.mark.parametrize("switch", ["percentiles", "ics", "landscape", "grad_norms", "stat_drift"])
def test_each_member_logs_the_diagnostics_of_its_separate_run(switch, tmp_path, monkeypatch):
    cfgs = member_configs("model=mlp", SMALL["mlp"], f"diag.{switch}=true", "diag.every=5", "diag.probe=32")
    assert can_fuse(cfgs) is None
    # stat_drift compares with the statistics at the last diagnostic, which a checkpoint does not keep: a
    # resumed run (fused or not) compares its first with those it started with, so no resume there
    assert_fused_equals_separate(cfgs, tmp_path, monkeypatch if switch != "stat_drift" else None)
    logged = {tag.split("/")[0] for tag in scalars(tmp_path / "fused1")}
    assert {"percentiles": "act", "grad_norms": "grad_norm"}.get(switch, switch) in logged


def test_the_launcher_fuses_only_the_jobs_that_ask_and_can():
    fuse = member_configs("model=mlp", SMALL["mlp"], "trainer.fuse=true")
    other_batch = member_configs("model=mlp", SMALL["mlp"], "trainer.fuse=true", "data.batch_size=16")[:2]
    noisy = member_configs("model=mlp", SMALL["mlp"], "trainer.fuse=true", "norm=noisy_batch")[:2]
    alone = member_configs("model=mlp", SMALL["mlp"])[:2]
    cfgs = [fuse[0], alone[0], other_batch[0], fuse[1], noisy[0], other_batch[1], noisy[1], alone[1], fuse[2]]
    groups, alone_why = plan(cfgs)
    assert groups == [[0, 3, 8], [1], [2, 5], [4], [6], [7]]
    fuse[0].seed, fuse[2].seed = 5, 0  # a fused group is ordered by seed: members of one seed draw one batch
    assert plan(cfgs)[0][0] == [8, 3, 0]
    ((why, jobs),) = alone_why.items()
    assert why.startswith("norm=noisy_batch has no stacked form") and jobs == 2


def test_fuse_auto_fuses_where_it_can_and_says_which_in_one_line():
    auto = member_configs("model=mlp", SMALL["mlp"], "trainer.fuse=auto")
    diag = member_configs("model=mlp", SMALL["mlp"], "trainer.fuse=auto", "diag.grad_norms=true")[:2]
    lone = member_configs("model=mlp", SMALL["mlp"], "trainer.fuse=auto", "data.batch_size=16")[:1]
    two = member_configs("model=mlp", SMALL["mlp"], "trainer.fuse=auto", "trainer.devices=2")[:2]
    groups, alone = plan([*auto, *diag, *lone, *two])
    assert groups == [[0, 1, 2], [3, 4], [5], [6], [7]]
    assert fusing_line(groups, alone) == (
        "trainer.fuse=auto: 5 runs train as 2 fused groups (1x3, 1x2); 3 alone (1: no job to fuse with; "
        "2: trainer.devices > 1)"
    )


@pytest.mark.slow
def test_a_fused_sweep_writes_every_run_as_an_unfused_sweep_does(tmp_path):
    sweep = ["-m", *TINY, "trainer.max_steps=6", "trainer.log_every=1", "seed=0,1", "optim.lr=0.05,0.1"]
    out = bnlab("train", *sweep, "trainer.fuse=true", "hydra.sweep.dir=fused", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert bnlab("train", *sweep, "hydra.sweep.dir=alone", cwd=tmp_path).returncode == 0
    runs = {d: sorted(p.parent.name for p in (tmp_path / d).glob("*/summary.json")) for d in ("fused", "alone")}
    names = runs["alone"]
    assert len(names) == 4 and runs["fused"] == names  # trainer.fuse stays out of the names
    for name in names:
        fused, alone = tmp_path / "fused" / name, tmp_path / "alone" / name
        files = sorted(p.name for p in fused.iterdir() if not p.name.startswith("events") and p.name != PREVIOUS)
        assert files == [
            ".hydra",
            CHECKPOINT,
            "summary.json",
            "train.log",
        ]
        assert (fused / ".hydra" / "config.yaml").read_text() == (alone / ".hydra" / "config.yaml").read_text().replace(
            "fuse: false", "fuse: true"
        )
        a, b = json.loads((fused / "summary.json").read_text()), json.loads((alone / "summary.json").read_text())
        assert a["status"] == b["status"] in DONE and (a["fused_members"], b["fused_members"]) == (4, 1)
        assert a["iterations_to_threshold"] == b["iterations_to_threshold"]
        assert a["final"] == pytest.approx(b["final"], rel=1e-5)
        assert scalars(fused).keys() == scalars(alone).keys()
    assert (tmp_path / "fused" / "summary.csv").read_text().count("\n") == (
        tmp_path / "alone" / "summary.csv"
    ).read_text().count("\n")


@pytest.mark.slow
def test_n_jobs_trains_groups_and_lone_jobs_at_once_to_the_same_runs(tmp_path):
    sweep = [
        "-m",
        *TINY,
        "trainer.max_steps=6",
        "trainer.threads=1",
        "trainer.fuse=auto",
        "seed=0,1",
        "norm=batch,noisy_batch,layer",
    ]
    outs = {
        n: bnlab("train", *sweep, f"hydra.launcher.n_jobs={n}", f"hydra.sweep.dir=jobs{n}", cwd=tmp_path)
        for n in (1, 2)
    }
    assert all(out.returncode == 0 for out in outs.values()), outs[2].stderr
    # batch and layer: a fused group each; noisy_batch has no stacked form: two lone jobs
    assert "4 runs train as 2 fused groups (2x2); 2 alone" in outs[2].stdout
    assert len(re.findall(r"(completed|stalled) after 6 steps", outs[2].stdout)) == 6
    for name in sorted(p.parent.name for p in (tmp_path / "jobs1").glob("*/summary.json")):
        a, b = (json.loads((tmp_path / d / name / "summary.json").read_text()) for d in ("jobs2", "jobs1"))
        assert a["status"] in DONE and a["fused_members"] == (1 if "noisy" in name else 2), name
        assert a["final"] == b["final"], name
        if "noisy" in name:  # a lone job's log, written in its worker
            assert "training from the start" in (tmp_path / "jobs2" / name / "train.log").read_text()
    summary = json.loads((tmp_path / "jobs2" / "sweep.json").read_text())
    assert sum(g["runs"] for g in summary["groups"]) == 6
    assert json.loads((tmp_path / "jobs2" / "provenance.json").read_text())["launcher"] == "BnlabLauncher, n_jobs=2"


@pytest.mark.slow
def test_ctrl_c_stops_every_worker_of_an_n_jobs_sweep_and_starts_no_more_groups(tmp_path):
    sweep = [*TINY, "trainer.max_steps=100000", "trainer.fuse=auto", "seed=0,1", "norm=batch,noisy_batch"]
    proc = start("-m", *sweep, "hydra.launcher.n_jobs=2", "hydra.sweep.dir=s", cwd=tmp_path, output=True)
    deadline = time.monotonic() + 120  # both workers training: the fused group and the first lone job
    while len(list((tmp_path / "s").glob(f"*/{CHECKPOINT}"))) < 3:
        assert time.monotonic() < deadline, "the workers did not start"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # to the launcher alone: it passes the signal on to its workers
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    statuses = {p.parent.name: json.loads(p.read_text())["status"] for p in (tmp_path / "s").glob("*/summary.json")}
    assert statuses == dict.fromkeys(
        ["norm=batch,seed=0", "norm=batch,seed=1", "norm=noisy_batch,seed=0"], "interrupted"
    )
    assert "continue the sweep with `bnlab resume" in out


@pytest.mark.parametrize("model", ["mlp", "cnn", "resnet"])
def test_a_fused_step_keeps_n_times_one_runs_activations_at_most(model):
    cfgs = member_configs(f"model={model}", SMALL[model], precision="fp32")
    data, cpu = load_data(cfgs[0].data, torch.device("cpu")), torch.device("cpu")
    one = activation_bytes(Single(cfgs[0], data, cpu, None, None))
    assert 0 < activation_bytes(Fused(cfgs, data, cpu)) <= len(cfgs) * one
