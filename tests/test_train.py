import io
import json
import math

import pytest
import torch
from helpers import scalars
from rich.console import Console
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import bnlab.run.train
from bnlab.core.data import load_data
from bnlab.core.models import build_model
from bnlab.core.norms import BatchNorm
from bnlab.record.summary import SCHEMA_VERSION, Summary
from bnlab.run.engine import autocast, batches, prepare_model, step_flops
from bnlab.run.train import train
from bnlab.schema.config import ConfigError


def test_summary_json_and_tensorboard_scalars(tiny_config, tmp_path):
    cfg = tiny_config(
        "trainer.max_steps=10", "trainer.eval_every=4", "trainer.log_every=3", "threshold.values=[0.05,0.99]"
    )
    summary = train(cfg, tmp_path / "run")
    tmp_path = tmp_path / "run"

    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["schema_version"] == SCHEMA_VERSION and Summary.from_json(on_disk) == summary
    assert summary.status.done  # to its last step: completed, or stalled where 10 steps on noise end at chance
    assert summary.steps == 10
    assert summary.steps_per_s > 0 and summary.wall_time_s > 0
    assert summary.peak_memory_mb["host"] > 50  # MiB: at least the interpreter and torch
    assert summary.config["norm"]["name"] == "batch"
    assert set(summary.final) == {"train_loss", "train_acc", "test_loss", "test_acc"}
    assert summary.threshold_metric == "test_acc"
    assert summary.iterations_to_threshold == {0.05: 0, 0.99: None}
    # the seconds of the loop at the evaluation that reached it (step 0: before any step), and the work of a step
    assert 0 <= summary.seconds_to_threshold[0.05] < summary.wall_time_s and summary.seconds_to_threshold[0.99] is None
    assert summary.flops_per_step == step_flops(cfg) > 0

    s = scalars(tmp_path)
    assert [step for step, _ in s["train/loss"]] == [3, 6, 9, 10]  # every trainer.log_every steps and the last
    assert [step for step, _ in s["train/acc"]] == [3, 6, 9, 10]
    cfg.trainer.log_every = 1
    train(cfg, tmp_path.parent / "every_step")
    every = scalars(tmp_path.parent / "every_step")
    assert [step for step, _ in every["train/loss"]] == list(range(1, 11))
    for tag in ("train/loss", "train/acc"):  # each point: the mean of the steps since the previous one
        values = [v for _, v in every[tag]]
        means = [sum(values[a:b]) / (b - a) for a, b in ((0, 3), (3, 6), (6, 9), (9, 10))]
        assert [v for _, v in s[tag]] == pytest.approx(means, rel=1e-6)
    assert [step for step, _ in s["test/acc"]] == [0, 4, 8, 10]
    assert [step for step, _ in s["test/loss"]] == [0, 4, 8, 10]
    assert s["test/acc"][-1][1] == pytest.approx(summary.final["test_acc"])
    # HParams' iterations: a line from the step a threshold was first reached to the last, at that step's height
    assert s["when_reached/test_acc_0.05"] == [(0, 0.0), (10, 0.0)]
    assert "when_reached/test_acc_0.99" not in s  # never reached: censored, so no value (never the budget, 10)
    assert sorted({tag.split("/")[0] for tag in s}) == ["test", "train", "when_reached"]  # the curves sort first


@pytest.mark.parametrize("norm", ["none", "batch"])
def test_a_regression_run_records_losses_only_and_its_test_loss_is_the_mse(tiny_config, tmp_path, norm):
    cfg = tiny_config(
        "data=linear_regression",
        "model=dln",
        "data.num_train=64",
        "data.num_test=32",
        "data.batch_size=64",
        f"norm={norm}",
        "optim.lr=0.01",
        "trainer.max_steps=40",
        "trainer.eval_every=10",
        "threshold.values=[100,1e-6]",
    )
    summary = train(cfg, tmp_path)
    assert summary.status == "completed" and summary.threshold_metric == "test_loss"
    assert set(summary.final) == {"train_loss", "test_loss"}
    assert summary.iterations_to_threshold == {100.0: 0, 1e-6: None}
    s = scalars(tmp_path)
    assert not any(tag.endswith("acc") for tag in s)
    losses = [v for _, v in s["test/loss"]]
    assert [step for step, _ in s["test/loss"]] == [0, 10, 20, 30, 40] and losses[-1] < losses[0]
    # the final test loss is the mean squared error of the trained model on the test set, by hand
    data = load_data(cfg.data, torch.device("cpu"))
    model = build_model(cfg, data.in_shape, data.num_classes)
    model.load_state_dict(torch.load(tmp_path / "checkpoint.pt", weights_only=False)["model"])
    with torch.no_grad():
        mse = ((model.eval()(data.test_x) - data.test_y) ** 2).mean().item()
    assert summary.final["test_loss"] == pytest.approx(mse, rel=1e-5)


def sessions(run_dir) -> tuple:
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    end = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_end_info"]).session_end_info
    return content, start, end


def test_a_run_writes_its_session_with_its_config_and_status_but_no_experiment(tiny_config, tmp_path):
    from tensorboard.plugins.hparams import api_pb2

    summary = train(tiny_config("optim.lr=0.05"), tmp_path)
    content, start, end = sessions(tmp_path)
    assert "_hparams_/experiment" not in content  # the sweep's root holds the one experiment config
    assert start.hparams["optim.lr"].number_value == 0.05 and start.hparams["norm.name"].string_value == "batch"
    assert start.hparams["status"].string_value == summary.status.value
    assert end.status == (api_pb2.STATUS_SUCCESS if summary.status == "completed" else api_pb2.STATUS_FAILURE)


def test_a_diverged_run_is_not_a_successful_session(tiny_config, tmp_path):
    from tensorboard.plugins.hparams import api_pb2

    assert train(tiny_config("norm=none", "optim.lr=1e12", "trainer.max_steps=50"), tmp_path).status == "diverged"
    _, start, end = sessions(tmp_path)
    assert start.hparams["status"].string_value == "diverged" and end.status == api_pb2.STATUS_FAILURE
    assert all(math.isfinite(v) for tag, points in scalars(tmp_path).items() for _, v in points)


def test_a_learnable_task_crosses_its_thresholds_in_order(tiny_config, tmp_path):
    cfg = tiny_config(
        "data.num_train=512",
        "data.num_test=256",
        "trainer.max_steps=300",
        "trainer.eval_every=10",
        "optim.lr=0.1",
        "threshold.values=[0.3,0.5]",
    )
    reached = train(cfg, tmp_path).iterations_to_threshold
    assert reached[0.3] is not None and reached[0.5] is not None
    assert 0 < reached[0.3] <= reached[0.5] <= 300
    assert reached[0.3] % 10 == 0 and reached[0.5] % 10 == 0


def test_a_non_finite_loss_ends_the_run_as_diverged(tiny_config, tmp_path):
    summary = train(tiny_config("norm=none", "optim.lr=1e12", "trainer.max_steps=50"), tmp_path)
    assert summary.status == "diverged"
    assert summary.steps < 50
    assert (tmp_path / "summary.json").exists()


def test_same_seed_gives_identical_metrics(tiny_config, tmp_path):
    a = train(tiny_config("seed=3"), tmp_path / "a")
    b = train(tiny_config("seed=3"), tmp_path / "b")
    c = train(tiny_config("seed=4"), tmp_path / "c")
    assert a.final == b.final
    assert a.final != c.final


def test_a_refused_config_still_leaves_a_failed_summary(tiny_config, tmp_path):
    with pytest.raises(ConfigError, match="optim.lr"):
        train(tiny_config("optim.lr=-1"), tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and "optim.lr" in summary["error"]


def test_batches_cover_each_epoch_once_and_drop_the_remainder():
    it = batches(10, 3, torch.Generator().manual_seed(0))
    epoch = torch.cat([next(it) for _ in range(3)])
    assert len(epoch) == 9 and len(set(epoch.tolist())) == 9
    assert len(torch.cat([next(it) for _ in range(3)]).unique()) == 9


@pytest.mark.parametrize("model", ["mlp", "resnet"])
def test_switched_on_diagnostics_are_logged_every_k_steps(tiny_config, tmp_path, model):
    widths = "model.widths=[8,8]"
    cfg = tiny_config(
        f"model={model}",
        widths,
        "trainer.max_steps=6",
        "diag.every=3",
        "diag.layers=[0,-1]",
        "diag.percentiles=true",
        "diag.ics=true",
        "diag.landscape=true",
        "diag.grad_norms=true",
        "diag.stat_drift=true",
    )
    train(cfg, tmp_path)
    s = scalars(tmp_path)
    depth = 2 if model == "mlp" else 5
    expected = {
        "act/0/p50",
        "act/-1/p15",
        "act/-1/unit0/p85",
        "landscape/loss_variation",
        "landscape/grad_predictiveness",
        "landscape/beta_smoothness",
        *(f"ics/layer{i}/cos" for i in range(depth)),
        *(f"grad_norm/layer{i}" for i in range(depth)),
    }
    assert expected <= set(s)
    assert any(tag.startswith("stat_drift/") for tag in s)
    assert [step for step, _ in s["ics/layer1/l2"]] == [1, 3, 6]  # the initial weights' step, then every 3
    assert s["ics/layer0/cos"] == [(1, 1.0), (3, 1.0), (6, 1.0)]  # nothing comes before the first layer
    p15, p50, p85 = (s[f"act/-1/{p}"][0][1] for p in ("p15", "p50", "p85"))
    assert p15 <= p50 <= p85


def test_diagnostics_are_off_by_default(tiny_config, tmp_path):
    train(tiny_config(), tmp_path)
    assert not any(
        tag.split("/")[0] in ("act", "ics", "landscape", "grad_norm", "stat_drift") for tag in scalars(tmp_path)
    )


def test_precise_bn_reports_the_three_ways_to_evaluate(tiny_config, tmp_path):
    final = train(tiny_config("trainer.max_steps=20", "trainer.precise_bn=4", "norm.momentum=0.001"), tmp_path).final
    assert {"test_acc", "test_acc_train_mode", "test_acc_precise_bn"} <= set(final)
    assert all(0 <= final[k] <= 1 for k in ("test_acc_train_mode", "test_acc_precise_bn"))


def test_bf16_runs_the_layers_in_bfloat16_and_the_norms_in_float32(tiny_config):
    cfg = tiny_config("model=cnn", "model.widths=[4,8]", "trainer.precision=bf16")
    model = prepare_model(build_model(cfg, (1, 8, 8), 10), cfg.trainer, torch.device("cpu"))
    dtypes = {}
    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear, BatchNorm)):
            m.register_forward_hook(lambda m, args, out, name=name: dtypes.update({name: (args[0].dtype, out.dtype)}))
    with autocast(cfg.trainer, torch.device("cpu")):
        model(torch.rand(16, 1, 8, 8))
    norms = {k: v for k, v in dtypes.items() if k.endswith(".norm")}
    assert len(norms) == 2 and set(norms.values()) == {(torch.float32, torch.float32)}
    assert {out for k, (_, out) in dtypes.items() if k not in norms} == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the weights stay float32


def test_a_bf16_run_trains_close_to_the_float32_run(tiny_config, tmp_path):
    overrides = ["model=cnn", "model.widths=[8,16]", "trainer.max_steps=30", "optim.lr=0.1"]
    fp32 = train(tiny_config(*overrides), tmp_path / "fp32")
    bf16 = train(tiny_config(*overrides, "trainer.precision=bf16"), tmp_path / "bf16")
    assert bf16.status == "completed"
    assert bf16.final["train_loss"] == pytest.approx(fp32.final["train_loss"], rel=0.05)


@pytest.mark.parametrize("option", ["trainer.channels_last=true", "trainer.compile=true"])
def test_channels_last_and_compile_train_as_the_default_does(tiny_config, tmp_path, option):
    overrides = ["model=cnn", "model.widths=[4,8]", "trainer.max_steps=5", "trainer.log_every=1"]
    default = train(tiny_config(*overrides), tmp_path / "default")
    other = train(tiny_config(*overrides, option), tmp_path / "other")
    assert other.final == pytest.approx(default.final, rel=1e-4)
    assert [v for _, v in scalars(tmp_path / "other")["train/loss"]] == pytest.approx(
        [v for _, v in scalars(tmp_path / "default")["train/loss"]], rel=1e-4
    )


def test_a_run_without_a_terminal_prints_a_progress_line_every_few_seconds(tiny_config, tmp_path, monkeypatch):
    # a log file (or a parallel sweep's worker, whose process group is not the terminal's) gets no bar
    monkeypatch.setattr(bnlab.run.train, "PROGRESS_EVERY_S", 0.0)  # a line at every update: reads and evaluations
    log = Console(file=io.StringIO(), width=200)
    train(tiny_config("trainer.max_steps=40", "trainer.eval_every=10", "trainer.log_every=10"), tmp_path / "r", log)
    lines = [line for line in log.file.getvalue().splitlines() if line.startswith("r: step ")]
    steps = [int(line.split()[2]) for line in lines]
    assert steps == sorted(steps) and {10, 20, 30, 40} <= set(steps) and all(" of 40, " in line for line in lines)
    assert all(float(line.split(", ")[1].split()[0]) > 0 for line, step in zip(lines, steps) if step)  # steps/s
