"""Every preset in conf/experiment runs end to end as a sweep, reduced to a few steps on synthetic data."""

import json

import pytest
from helpers import DONE, TINY, bnlab, scalars

from bnlab.face.overrides import group_options

pytestmark = pytest.mark.slow

# Per preset: overrides that shrink its sweep (command-line values win over the preset's sweep params).
REDUCED = {
    "ioffe_mnist": [],
    "init_lr_grid": ["model.init_std=5", "model.activation=sigmoid"],
    "lr_sensitivity": ["optim.lr=0.01,10", "norm=none,batch,group"],
    "batch_size": ["data.batch_size=2,16"],
    "placement": [],
    "noisy_bn": [],
    "eval_pitfall": ["trainer.precise_bn=3"],
    "sync_bn": ["data.batch_size=8"],
    "fair_baselines": ["optim.lr=0.05,0.1", "model.widths=[4,8,8]", "model.blocks=1"],
    # the deep linear network's regression task (setup=dln), full-batch on 64 points
    "santurkar_ics": ["data=linear_regression", "data.batch_size=64"],
    "santurkar_landscape": ["data=linear_regression", "data.batch_size=64"],
    "ioffe_speedup": ["optim.lr=0.01,0.05"],
    # 2 trials of none and batch, a seed each, and a final seed: the tuning sweeper chooses the seeds itself
    "tune_mnist": ["norm=none,batch", "hydra.sweeper.trials=2", "hydra.sweeper.seeds=1", "hydra.sweeper.final_seeds=1"],
}
# the claims ledger's presets (bnlab/claims/)
REDUCED |= {
    "regularization": ["data.batch_size=8,16"],
    "bias": [],
    "affine": [],
    "input_norm": [],
    "dropout": [],
    "weight_decay": [],
    "adabn": ["trainer.precise_bn=3"],
    "norm_cost": [],
    "accumulate": [],
    "small_batch": ["data.batch_size=4,16"],
    "grad_flow": ["model.widths=[8,8,8],[8,8,8,8,8]"],
    # the ViT on the 8 x 8 synthetic images: 4 patches of 4 x 4, 8 channels in 2 heads
    "transformer_norms": ["model.patch=4", "model.widths=[8]", "model.heads=2", "model.depth=1", "optim.lr=0.003"],
    "transformer_depth": ["model.patch=4", "model.widths=[8]", "model.heads=2", "model.depth=1,2"],
}
SEEDED_BY_THE_SWEEPER = {"tune_mnist"}


def test_every_preset_has_a_reduced_form_here():
    assert sorted(REDUCED) == group_options("experiment")


@pytest.mark.parametrize("name", sorted(REDUCED))
def test_preset_runs_end_to_end(tmp_path, name):
    reduced = REDUCED[name]
    keys = {o.split("=")[0] for o in reduced}
    tiny = [o for o in TINY if o.split("=")[0] not in keys]
    out = bnlab(
        "train",
        "-m",
        f"+experiment={name}",
        *tiny,
        *([] if name in SEEDED_BY_THE_SWEEPER else ["seed=0"]),
        "trainer.max_steps=4",
        "trainer.eval_every=2",
        "diag.every=2",
        *reduced,
        "hydra.sweep.dir=sweep",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summaries = {p.parent: json.loads(p.read_text()) for p in (tmp_path / "sweep").glob("*/summary.json")}
    assert summaries and all(s["status"] in (*DONE, "diverged") for s in summaries.values())
    assert (tmp_path / "sweep" / "summary.csv").exists()
    if name in ("ioffe_mnist", "noisy_bn"):
        assert all("act/-1/unit0/p50" in scalars(run) for run in summaries)
    if name == "eval_pitfall":
        assert all(
            "test_acc_precise_bn" in s["final"] and "test_acc_train_mode" in s["final"] for s in summaries.values()
        )
    if name == "sync_bn":  # the same training where the BN batches are the same (fp32: to float rounding)
        loss = {(s["config"]["norm"]["name"], s["devices"]): s["final"]["train_loss"] for s in summaries.values()}
        assert len(loss) == 6
        assert loss["sync_batch", 2] == pytest.approx(loss["batch", 1], rel=1e-5)
        assert loss["batch", 2] == pytest.approx(loss["ghost_batch", 1], rel=1e-5)
        assert loss["batch", 2] != pytest.approx(loss["sync_batch", 2], rel=1e-3)
    if name == "fair_baselines":
        models = {(s["config"]["norm"]["name"], s["config"]["model"]["residual_init"]) for s in summaries.values()}
        assert models == {
            ("batch", "default"),
            ("none", "default"),
            ("none", "skipinit"),
            ("none", "fixup"),
            ("group", "default"),
        }
        assert sum(s["config"]["model"]["weight_standardization"] for s in summaries.values()) == 2  # gn_ws, 2 lrs
        assert bnlab("report", "sweep", cwd=tmp_path).returncode == 0
        assert "## Each norm at its best learning rate" in (tmp_path / "sweep" / "report.md").read_text()
    if name == "adabn":
        assert all({"test_acc_shifted", "test_acc_adabn"} <= set(s["final"]) for s in summaries.values())
    if name == "accumulate":
        assert {s["config"]["trainer"]["accumulate"] for s in summaries.values()} == {1, 4}
    if name.startswith("transformer"):
        assert {s["config"]["model"]["norm_position"] for s in summaries.values()} == {"pre", "post"}
        assert all(s["config"]["model"]["name"] == "vit" and s["fused_members"] == 1 for s in summaries.values())
    if name == "grad_flow":
        assert all("grad_norm/layer2" in scalars(run) for run in summaries)
    if name == "batch_size":
        assert {s["config"]["optim"]["lr"] for s in summaries.values()} == {0.05 * 2 / 32, 0.05 * 16 / 32}
    if name.startswith("santurkar"):  # the DLN at the setup's two lrs, losses only
        assert {s["config"]["optim"]["lr"] for s in summaries.values()} == {0.003, 0.01}
        assert all(set(s["final"]) == {"train_loss", "test_loss"} for s in summaries.values())
        assert all(s["config"]["model"]["activation"] == "identity" for s in summaries.values())
        tag = "ics/layer23/cos" if name == "santurkar_ics" else "landscape/loss_max"
        assert all(tag in scalars(run) for run in summaries)
    if name == "ioffe_speedup":  # BN's lr decays 6x faster and its weight decay is 5x smaller
        changes = {(s["config"]["norm"]["name"], s["config"]["optim"]["decay_every"]) for s in summaries.values()}
        assert changes == {("none", 1000), ("batch", 167)}
        assert {(s["config"]["norm"]["name"], s["config"]["optim"]["weight_decay"]) for s in summaries.values()} == {
            ("none", 0.0005),
            ("batch", 0.0001),
        }


@pytest.mark.parametrize("name", ["santurkar_ics", "santurkar_landscape"])
def test_setup_mnist_mlp_switches_a_santurkar_preset_to_the_mlp_at_its_lrs(tmp_path, name):
    out = bnlab(
        "train", "-m", f"+experiment={name}", "setup=mnist_mlp", *TINY, "seed=0", "trainer.max_steps=4",
        "trainer.eval_every=2", "diag.every=2", "hydra.sweep.dir=sweep", cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    summaries = [json.loads(p.read_text()) for p in (tmp_path / "sweep").glob("*/summary.json")]
    assert {(s["config"]["optim"]["lr"], s["config"]["model"]["activation"]) for s in summaries} == {
        (0.1, "relu"),
        (0.3, "relu"),
    }
    assert all(s["config"]["diag"]["landscape_steps"] == [0.5, 4.0] for s in summaries)
