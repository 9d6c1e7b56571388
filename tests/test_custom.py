"""Your own norm, model and data (norm=custom, model=custom, data=custom) and config folders: the example
package examples/my_norm trains wherever a built-in norm does, a target that cannot be used is refused
before any run folder exists, and a user's config folder joins bnlab's in --help and the override check."""

from __future__ import annotations

import json
import re

import pytest
import torch
from helpers import DONE, EXAMPLE, ROOT, TARGETS_ENV, TINY, bnlab, compose_config, scalars
from my_norm import MeanOnlyBatchNorm

from bnlab.core.datafiles import DataError
from bnlab.core.validate import check_targets
from bnlab.face.overrides import check_overrides
from bnlab.run.train import train
from bnlab.schema.config import PLACEMENTS, ConfigError

MEAN_ONLY = ["norm=custom", "norm.target=my_norm.MeanOnlyBatchNorm"]
SMALL = {"mlp": "model.widths=[16,16]", "cnn": "model.widths=[8,16]", "resnet": "model.widths=[8,16]"}
CONF = str(EXAMPLE / "conf")


def test_mean_only_batch_norm_centres_each_channel_on_the_batch_and_in_eval_on_its_running_mean():
    norm = MeanOnlyBatchNorm(3, momentum=0.5).double()
    with torch.no_grad():
        norm.bias.copy_(torch.tensor([1.0, -2.0, 0.5]))
    x = torch.randn(10, 3, 4, 4, dtype=torch.float64) * 3 + 7
    y = norm(x)
    torch.testing.assert_close(y.mean((0, 2, 3)), norm.bias.detach())
    torch.testing.assert_close(y - y.mean((0, 2, 3), keepdim=True), x - x.mean((0, 2, 3), keepdim=True))  # no scaling
    torch.testing.assert_close(norm.running_mean, 0.5 * x.mean((0, 2, 3)))
    torch.testing.assert_close(norm.eval()(x), x - norm.running_mean.view(1, 3, 1, 1) + norm.bias.view(1, 3, 1, 1))


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("model", sorted(SMALL))
def test_the_example_norm_trains_in_every_model_and_placement(tiny_config, tmp_path, model, placement):
    cfg = tiny_config(f"model={model}", SMALL[model], *MEAN_ONLY, f"norm.placement={placement}", "optim.lr=0.1")
    summary = train(cfg, tmp_path)
    assert summary.status.done and summary.steps == 3
    assert summary.config["norm"]["target"] == "my_norm.MeanOnlyBatchNorm"
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["model"]
    means = [k for k in state if k.endswith("norm.layer.running_mean")]
    assert means and all(state[k].abs().sum() > 0 for k in means)  # the running means moved: the layers ran


def test_a_user_norm_yaml_from_the_search_path_composes_with_its_kwargs():
    cfg = compose_config([*TINY, f"hydra.searchpath=[file://{CONF}]", "norm=mean_only", "norm.kwargs.momentum=0.3"])
    assert (cfg.norm.name, cfg.norm.target, cfg.norm.kwargs) == (
        "custom",
        "my_norm.MeanOnlyBatchNorm",
        {"momentum": 0.3},
    )


def test_diagnostics_run_with_the_example_norm(tiny_config, tmp_path):
    cfg = tiny_config(*MEAN_ONLY, "diag.ics=true", "diag.percentiles=true", "diag.stat_drift=true", "diag.every=1")
    assert train(cfg, tmp_path).status.done
    tags = scalars(tmp_path)
    assert all(f"ics/layer{i}/l2" in tags for i in range(2))  # the tiny MLP's two hidden layers
    assert "act/-1/p50" in tags and any(t.startswith("stat_drift/") and "running_mean" in t for t in tags)


def test_precise_bn_re_estimates_the_example_norm(tiny_config, tmp_path):
    summary = train(tiny_config(*MEAN_ONLY, "trainer.precise_bn=2"), tmp_path)
    assert 0 <= summary.final["test_acc_precise_bn"] <= 1


def test_a_custom_model_and_custom_data_train(tiny_config, tmp_path):
    cfg = tiny_config(
        "model=custom",
        "model.target=custom_targets.tiny_net",
        "model.kwargs={hidden:8}",
        "data=custom",
        "data.target=custom_targets.blobs",
        "data.kwargs={classes:4}",
        "optim.lr=0.1",
        "trainer.max_steps=30",
        "trainer.eval_every=10",
    )
    summary = train(cfg, tmp_path)
    assert summary.status == "completed"
    assert summary.final["test_acc"] > 0.5  # four well-separated blobs: far above the 0.25 of chance
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["model"]["1.weight"].shape == (8, 16)


# (overrides, words the refusal must contain): each target cannot be used for its own reason
REFUSED = {
    "norm not importable": (
        ["norm=custom", "norm.target=no_such_pkg.Norm"],
        ["norm.target='no_such_pkg.Norm'", "importing it", "no_such_pkg"],
    ),
    "norm attribute missing": (["norm=custom", "norm.target=custom_targets.Nope"], ["has no attribute 'Nope'"]),
    "norm not a module": (
        ["norm=custom", "norm.target=custom_targets.not_a_module"],
        ["returned a float, not an nn.Module"],
    ),
    "norm fails on maps": (
        ["model=cnn", "model.widths=[8,16]", "norm=custom", "norm.target=custom_targets.FailsOnMaps"],
        ["a probe batch (4, 8, 5, 5)", "FailsOnMaps takes (N, C) only"],
    ),
    "norm changes the shape": (
        ["norm=custom", "norm.target=custom_targets.WrongShape"],
        ["returned (4, 1), not shape (4, 100)"],
    ),
    "model not importable": (["model=custom", "model.target=nope.net"], ["model.target='nope.net'", "importing it"]),
    "model not a module": (
        ["model=custom", "model.target=custom_targets.not_a_model"],
        ["model.target=", "returned a str, not an nn.Module"],
    ),
    "model with wrong logits": (["model=custom", "model.target=custom_targets.wrong_logits"], ["not shape (4, 10)"]),
    "data in the wrong form": (
        ["data=custom", "data.target=custom_targets.flat_blobs"],
        ["data.target=", "examples of shapes (128, 16)"],
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_an_unusable_target_is_refused_with_a_message_naming_it_and_the_error(case):
    overrides, words = REFUSED[case]
    with pytest.raises((ConfigError, DataError)) as e:
        check_targets(compose_config([*TINY, *overrides]))
    assert all(w in str(e.value) for w in words), str(e.value)
    assert "takes the import path" in str(e.value)


def test_usable_targets_pass_the_check():
    check_targets(compose_config([*TINY, *MEAN_ONLY, "model=resnet", "model.widths=[8,16]"]))
    check_targets(
        compose_config(
            [
                *TINY,
                "model=custom",
                "model.target=custom_targets.tiny_net",
                "data=custom",
                "data.target=custom_targets.blobs",
            ]
        )
    )


def test_the_override_check_knows_a_users_config_folders():
    for where in (["--config-dir", CONF], [f"--config-dir={CONF}"], [f"hydra.searchpath=[file://{CONF}]"]):
        check_overrides([*where, "norm=mean_only", "norm.kwargs.momentum=0.5", "norm.kwargs={momentum:0.5}"])
        with pytest.raises(ConfigError, match="Did you mean 'mean_only'"):
            check_overrides([*where, "norm=mean_onl"])
    with pytest.raises(ConfigError, match="accepted values: batch"):
        check_overrides(["norm=mean_only"])  # without the folder bnlab knows no such norm


@pytest.mark.slow
@pytest.mark.parametrize("where", [["--config-dir", CONF], [f"hydra.searchpath=[file://{CONF}]"]])
def test_help_lists_a_users_options_beside_the_built_in_ones(tmp_path, where):
    out = bnlab("train", "--help", *where, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    norms = re.search(r"^norm: (.*)$", out.stdout, re.M).group(1).split(", ")
    assert "mean_only" in norms and "batch" in norms and "custom" in norms
    assert "mean_only" in re.search(r"^experiment: (.*)$", out.stdout, re.M).group(1)


@pytest.mark.slow
@pytest.mark.parametrize(
    "case", ["norm not importable", "norm fails on maps", "model not a module", "data in the wrong form"]
)
@pytest.mark.parametrize("multirun", [False, True])
def test_a_refused_target_exits_2_and_leaves_no_run_folder(tmp_path, case, multirun):
    overrides, words = REFUSED[case]
    sweep = ["-m", "seed=0,1", "hydra.sweep.dir=sweep"] if multirun else []
    out = bnlab("train", *sweep, *TINY, *overrides, cwd=tmp_path, env=TARGETS_ENV)
    assert out.returncode == 2, out.stderr[-2000:]
    message = " ".join(out.stderr.split())
    assert all(w in message for w in words) and "Traceback" not in out.stderr
    assert not (tmp_path / "outputs").exists()
    assert not list(tmp_path.glob("sweep/*/"))  # a sweep leaves only Hydra's multirun.yaml


@pytest.mark.slow
def test_the_example_norm_in_a_sweep_with_its_table_and_report(tmp_path):
    out = bnlab(
        "train", "-m", "--config-dir", CONF, *TINY, "norm=none,batch,mean_only", "seed=0,1", "optim.lr=0.05,0.2",
        "hydra.sweep.dir=sweep", cwd=tmp_path, env=TARGETS_ENV,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    groups = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["groups"]
    mean_only = [g for g in groups if "norm.target=my_norm.MeanOnlyBatchNorm" in g["group"]]
    assert len(mean_only) == 2 and all(g["runs"] == 2 for g in mean_only)
    assert "MeanOnlyBatchNorm" in out.stdout
    report = bnlab("report", "sweep", cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    text = (tmp_path / "sweep" / "report.md").read_text()
    assert "MeanOnlyBatchNorm" in text and "## Each norm at its best learning rate" in text
    assert (tmp_path / "sweep" / "metric_curves.png").exists() and (tmp_path / "sweep" / "lr_sensitivity.png").exists()


@pytest.mark.slow
def test_the_readme_runs_the_example_in_two_commands(tmp_path):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Your own norm", 1)[1].split("\n## ", 1)[0]
    commands = re.search(r"```bash\n(.*?)```", section, re.S).group(1).strip().splitlines()
    assert len(commands) == 2 and commands[0].startswith("export PYTHONPATH=") and commands[1].startswith("bnlab train")
    env = {"PYTHONPATH": commands[0].split("=", 1)[1].split()[0].replace("$PWD", str(ROOT))}
    args = commands[1].split("#")[0].split()[2:]
    out = bnlab(
        "train", *args, *TINY, "seed=0", "optim.lr=0.1", "hydra.sweep.dir=" + str(tmp_path / "sweep"), cwd=ROOT, env=env
    )
    assert out.returncode == 0, out.stderr[-3000:]
    runs = [json.loads(p.read_text()) for p in (tmp_path / "sweep").glob("*/summary.json")]
    assert sorted(r["config"]["norm"]["name"] for r in runs) == ["batch", "custom", "none"]
    assert all(r["status"] in DONE and r["fused_members"] == 1 for r in runs)
