"""The keys the claims ledger's presets need (bnlab/claims/): dropout, a norm on the raw inputs, weight decay
without the norm layers, gradient accumulation over micro-batches, and shifted test images with AdaBN."""

from __future__ import annotations

import copy

import pytest
import torch
from test_fused import SMALL, assert_fused_equals_separate, member_configs

from bnlab.core.data import load_data, shifted
from bnlab.core.models import build_model
from bnlab.core.norms import create_norm, norm_parameters
from bnlab.core.optim import build_optimizer
from bnlab.core.validate import validate
from bnlab.run.fused.engine import can_fuse
from bnlab.run.train import train
from bnlab.schema.config import ConfigError


def test_dropout_zeroes_hidden_units_in_training_only(tiny_config):
    model = build_model(tiny_config("model.dropout=0.5", "model.widths=[64]"), (1, 8, 8), 2)
    x = torch.randn(16, 1, 8, 8)
    hidden = model[1](model[0](x))  # the hidden unit's output, which the dropout thins
    assert (hidden == 0).float().mean() > 0.3  # about half, beside ReLU's own zeros
    model.eval()
    assert torch.equal(model(x), model(x))


def test_input_norm_normalizes_the_raw_features_before_the_first_layer(tiny_config):
    cfg = tiny_config("model.input_norm=true", "norm=batch")
    model = build_model(cfg, (1, 8, 8), 2)
    assert type(model[1]) is type(create_norm(64, cfg.norm)) and model[1].num_features == 64
    assert len(model) == len(build_model(tiny_config(), (1, 8, 8), 2)) + 1


@pytest.mark.parametrize("norm", ["batch", "layer", "group"])
def test_decay_norm_false_takes_the_norm_layers_parameters_out_of_weight_decay(tiny_config, norm):
    cfg = tiny_config(f"norm={norm}", "norm.groups=2", "optim.weight_decay=0.1", "optim.decay_norm=false")
    model = build_model(cfg, (1, 8, 8), 2)
    groups = build_optimizer(model, cfg.optim).param_groups
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in norm_parameters(model)}
    assert len(groups[1]["params"]) == 2 * len(cfg.model.widths)  # gamma and beta of each hidden unit
    cfg.optim.decay_norm = True
    assert len(build_optimizer(model, cfg.optim).param_groups) == 1


def _final_weights(cfg, run_dir):
    train(cfg, run_dir)
    return torch.load(run_dir / "checkpoint.pt", weights_only=False)["model"]


@pytest.mark.parametrize(("norm", "equal"), [("layer", True), ("none", True), ("batch", False)])
def test_accumulated_micro_batches_are_one_batch_except_for_batch_statistics(tiny_config, tmp_path, norm, equal):
    """k micro-batches of b/k with summed gradients: the batch of b, up to float64 rounding, for norms that see
    one example at a time; not for BN, which normalizes each micro-batch by its own statistics."""
    base = ("trainer.max_steps=6", "trainer.precision=fp64", f"norm={norm}", "optim.lr=0.1")
    whole = _final_weights(tiny_config(*base), tmp_path / "whole")
    micro = _final_weights(tiny_config(*base, "trainer.accumulate=4"), tmp_path / "micro")
    same = all(torch.allclose(whole[k], micro[k], rtol=1e-9, atol=1e-12) for k in whole)
    assert same is equal


def test_accumulated_fused_members_follow_their_separate_runs_through_a_resume(tmp_path, monkeypatch):
    cfgs = member_configs("model=mlp", SMALL["mlp"], "norm=batch", "trainer.accumulate=4")
    assert_fused_equals_separate(cfgs, tmp_path, monkeypatch)


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_norm_parameters_out_of_weight_decay_fuse_exactly(model, tmp_path):
    cfgs = member_configs(f"model={model}", SMALL[model], "norm=batch", "optim.momentum=0.9", "optim.decay_norm=false")
    assert_fused_equals_separate(cfgs, tmp_path)


@pytest.mark.parametrize("override", ["model.dropout=0.1", "model.input_norm=true"])
def test_dropout_and_input_norm_train_alone(override):
    cfgs = member_configs("model=mlp", override)
    assert f"{override.split('=')[0]}" in can_fuse(cfgs)


def test_noise_has_the_training_images_std_and_is_the_same_for_every_run():
    train_x = torch.rand(2000, 1, 8, 8)
    noisy = shifted(train_x, train_x, "noise")
    assert (noisy - train_x).std().item() == pytest.approx(train_x.std().item(), rel=0.02)
    assert torch.equal(noisy, shifted(train_x, train_x, "noise")) and not torch.equal(
        noisy, shifted(train_x, train_x, "noise", 1)
    )
    assert shifted(train_x, train_x, "none") is train_x


def test_adabn_recovers_a_batch_norm_model_on_noisy_images_and_leaves_no_norm_as_it_was(tiny_config, tmp_path):
    steps = ("trainer.max_steps=60", "data.num_train=512", "data.num_test=256", "optim.lr=0.1")
    shift = ("trainer.shift=noise", "trainer.precise_bn=20")
    bn = train(tiny_config(*steps, *shift, "norm=batch"), tmp_path / "bn").final
    assert bn["test_acc_shifted"] < bn["test_acc"] and bn["test_acc_adabn"] != bn["test_acc_shifted"]
    plain = train(tiny_config(*steps, *shift, "norm=none"), tmp_path / "none").final
    assert plain["test_acc_adabn"] == plain["test_acc_shifted"]  # no statistics to re-estimate


def test_a_fused_member_reports_its_shifted_and_adabn_accuracies_as_its_separate_run(tmp_path):
    cfgs = member_configs("model=mlp", SMALL["mlp"], "norm=batch", "trainer.precise_bn=4", "trainer.shift=noise")
    fused = assert_fused_equals_separate(cfgs, tmp_path)
    assert all({"test_acc_shifted", "test_acc_adabn"} <= set(s.final) for s in fused)


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["model.dropout=1.0"], "model.dropout=1.0 is not accepted; accepted values: a fraction in [0, 1)"),
        (["model=cnn", "model.input_norm=true"], "model.input_norm=True is not accepted; accepted values: false"),
        (["trainer.accumulate=3"], "trainer.accumulate=3 is not accepted; accepted values: a divisor of the 16"),
        (["trainer.accumulate=16"], "micro-batches of at least 2 with norm=batch"),
        (["trainer.shift=blur"], "trainer.shift='blur' is not accepted; accepted values: none, noise"),
    ],
)
def test_bad_values_of_the_new_keys_are_refused_by_name(tiny_config, overrides, says):
    with pytest.raises(ConfigError) as refused:
        validate(tiny_config(*overrides))
    assert says in str(refused.value)


def test_accumulate_leaves_the_batch_order_and_so_a_resume_exact(tiny_config, tmp_path):
    cfg = tiny_config("trainer.max_steps=8", "trainer.accumulate=2", "trainer.checkpoint_every=4")
    unbroken = train(copy.deepcopy(cfg), tmp_path / "unbroken")
    paused = copy.deepcopy(cfg)
    paused.trainer.pause_at = 4
    train(paused, tmp_path / "resumed")
    cfg.trainer.resume = True
    resumed = train(cfg, tmp_path / "resumed")
    assert resumed.final == unbroken.final
    assert load_data(cfg.data, torch.device("cpu")).train_x.shape[0] == 64
