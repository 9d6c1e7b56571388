"""The `bnlab` command as a user runs it: a subprocess in a scratch folder."""

import json
import subprocess
import sys

import pytest
import test_summarize
from helpers import DONE, TINY, bnlab

from bnlab.face.cli import dashboard_url
from bnlab.record.files import write_json
from bnlab.record.summary import FILE
from bnlab.results.dashboard import QUERY

pytestmark = pytest.mark.slow


def test_train_help_lists_the_config_groups(tmp_path):
    out = bnlab("train", "--help", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for group in (
        "model: cnn, custom, dln, mlp, resnet, vit",
        "norm: batch, batch_manual, batch_renorm, custom, ghost_batch, group, instance, layer, noisy_batch, none, rms",
        "baseline: bn, fixup, gn_ws, none, skipinit",
        "optim: adam, adamw, sgd",
    ):
        assert group in out.stdout


def test_train_cfg_job_prints_the_composed_config(tmp_path):
    out = bnlab("train", "--cfg", "job", "norm=group", "optim.lr=0.5", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "name: group" in out.stdout and "lr: 0.5" in out.stdout
    assert not (tmp_path / "outputs").exists()


def test_single_run_writes_under_outputs_runs_named_by_its_overrides(tmp_path):
    out = bnlab("train", *TINY, "norm=layer", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    (summary,) = (tmp_path / "outputs" / "runs").glob("*/*/summary.json")
    assert "norm=layer" in summary.parent.name
    assert json.loads(summary.read_text())["status"] in DONE
    assert (summary.parent / "train.log").read_text().count("step 2:") == 1
    assert (summary.parent / ".hydra" / "config.yaml").exists()
    assert "iterations to reach it" in out.stdout


def test_sweep_ends_with_a_table_of_its_runs(tmp_path):
    out = bnlab("train", "-m", *TINY, "norm=none,batch", "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    runs = sorted(p.parent.name for p in (tmp_path / "sweep").glob("*/summary.json"))
    assert len(runs) == 2 and all(",norm=" in r or r.startswith("norm=") for r in runs)
    assert all(r in out.stdout.replace("\n", "") or r[:20] in out.stdout for r in runs)
    assert "final test acc" in out.stdout

    report = bnlab("report", "sweep", cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    assert "metric_curves.png" in (tmp_path / "sweep" / "report.md").read_text()


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.lr=-1", "optim.lr"),
        ("norm.placement=middle", "norm.placement"),
        ("model.activation=relu6", "model.activation"),
        ("trainer.max_steps=0", "trainer.max_steps"),
        ("threshold.values=[1.5]", "threshold.values"),
    ],
)
def test_a_bad_value_exits_non_zero_with_a_message_naming_the_key(tmp_path, override, key):
    out = bnlab("train", *TINY, override, cwd=tmp_path)
    assert out.returncode == 2
    text = out.stdout + out.stderr
    assert key in text and "accepted" in text and "Traceback" not in text
    assert not (tmp_path / "outputs").exists()  # refused before Hydra made a run folder


def test_a_sweep_with_a_bad_value_is_refused_before_any_run_starts(tmp_path):
    out = bnlab("train", "-m", *TINY, "optim.lr=0.01,-1", cwd=tmp_path)
    assert out.returncode == 2
    assert "the sweep is refused before any run starts" in out.stderr and "optim.lr=-1" in out.stderr
    assert not (tmp_path / "outputs").exists()


def test_a_sweep_with_one_run_that_fails_late_runs_the_rest_and_counts_the_failure(tmp_path):
    # a batch larger than the data set is found only once the data is loaded: that run fails, the others train
    out = bnlab("train", "-m", *TINY, "data.batch_size=16,100", "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert out.returncode == 1
    statuses = sorted(json.loads(p.read_text())["status"] for p in (tmp_path / "sweep").glob("*/summary.json"))
    assert statuses[0] == "failed" and statuses[1] in DONE
    assert "1 failed run left out" in " ".join(out.stdout.split())
    shown = bnlab("summarize", "sweep", "--failed", cwd=tmp_path)
    assert shown.returncode == 0 and "0/0/0/1" in shown.stdout  # ok/stall/div/fail of the failed group


def test_data_list_reports_missing_files(tmp_path):
    out = bnlab("data", "list", "--root", str(tmp_path), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "missing" in out.stdout and "train-images-idx3-ubyte" in out.stdout


def test_run_names_stay_within_file_system_limits():
    from bnlab.schema.config import run_name

    assert run_name("") == "default"
    assert run_name("norm=batch,optim.lr=0.1") == "norm=batch,optim.lr=0.1"
    long_a, long_b = "x" * 300 + "a", "x" * 300 + "b"
    assert len(run_name(long_a)) == 200 and run_name(long_a) != run_name(long_b)


def test_commands_that_train_nothing_import_no_torch(tmp_path):
    # torch takes seconds to import: the commands that only read, list or explain start without it
    run = tmp_path / "sweep" / "norm=batch"
    run.mkdir(parents=True)
    write_json(run / FILE, test_summarize.run("batch", 0.01, 0, {"0.9": 300}))
    (tmp_path / "sweep" / "multirun.yaml").write_text("{}\n")
    for args in (
        ["--help"],
        ["--version"],
        ["train", "--help"],
        ["data", "list", "--root", str(tmp_path)],
        ["summarize", "sweep"],
        ["report", "sweep"],
    ):
        out = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "bnlab", *args], cwd=tmp_path, capture_output=True, text=True
        )
        assert out.returncode == 0, (args, out.stderr[-2000:])
        imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import")}
        assert "torch" not in imported, args
    dashboard = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import bnlab.results.dashboard"], capture_output=True, text=True
    )  # what `bnlab tb` runs before it hands over to TensorBoard
    assert dashboard.returncode == 0 and "| torch\n" not in dashboard.stderr


@pytest.mark.parametrize(
    "args, url",
    [
        ([], "http://localhost:6006/"),
        (["--port", "6007"], "http://localhost:6007/"),
        (["--host=0.0.0.0", "--port=7000"], "http://0.0.0.0:7000/"),
    ],
)
def test_bnlab_tb_prints_where_tensorboard_serves(args, url):
    assert dashboard_url(args) == url
    assert "smoothing=0" in QUERY and "runColorGroup=regex" in QUERY  # TensorBoard's own URL parameters
