"""Bad input, faults and interrupted runs lose nothing: refusals, kills, signals, resume, atomic files."""

import json
import os
import signal
import subprocess
import time

import pytest
import torch
from helpers import LONG, TINY, TRAIN, assert_equal_runs, bnlab, scalars, start, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bnlab.core.norms import NORMS
from bnlab.record.files import write_json
from bnlab.run.train import train
from bnlab.schema.config import ConfigError


@pytest.mark.slow
def test_a_killed_run_resumes_to_exactly_the_unbroken_run(tmp_path, unbroken):
    proc = start(*LONG, "hydra.run.dir=run", cwd=tmp_path)
    wait_for(tmp_path / "run" / "checkpoint.pt")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["step"] < 1000
    assert not (tmp_path / "run" / "summary.json").exists()

    out = bnlab("train", *LONG, "hydra.run.dir=run", "trainer.resume=true", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert_equal_runs(tmp_path / "run", unbroken)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_signal_stops_at_the_next_step_with_the_summary_written_and_the_run_resumable(tmp_path, unbroken, sig):
    proc = start(*LONG, "hydra.run.dir=run", cwd=tmp_path)
    wait_for(tmp_path / "run" / "checkpoint.pt")
    proc.send_signal(sig)
    assert proc.wait(timeout=60) == 130
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and 0 < summary["steps"] < 1000
    # flushed up to the last point (every trainer.log_every = 10 steps); the steps after it wait in the checkpoint
    assert scalars(tmp_path / "run")["train/loss"][-1][0] == summary["steps"] // 10 * 10
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["step"] == summary["steps"]

    assert bnlab("train", *LONG, "hydra.run.dir=run", "trainer.resume=true", cwd=tmp_path).returncode == 0
    assert_equal_runs(tmp_path / "run", unbroken)


@pytest.mark.slow
def test_sigterm_in_a_sweep_starts_no_further_run_and_keeps_the_sweep_table(tmp_path):
    proc = start("-m", *LONG, "seed=0,1,2", "hydra.sweep.dir=sweep", cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "sweep").glob("*/checkpoint.pt")):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 130
    runs = [p for p in (tmp_path / "sweep").iterdir() if p.is_dir() and not p.name.startswith(".")]
    # the runs that had started (one per core at most: n_jobs=auto) stop where they were; seed 2 never starts
    assert 1 <= len(runs) <= 2 and not any("seed=2" in r.name for r in runs)
    trained = [r for r in runs if (r / "summary.json").exists()]  # a worker may be stopped before its run trains
    assert trained and {json.loads((r / "summary.json").read_text())["status"] for r in trained} == {"interrupted"}
    assert "interrupted" in (tmp_path / "sweep" / "summary.csv").read_text().splitlines()[0]


def test_a_loss_that_stays_above_the_bound_ends_the_run_early(tiny_config, tmp_path):
    summary = train(tiny_config("trainer.max_steps=50", "trainer.stop_loss=0.001", "trainer.stop_patience=5"), tmp_path)
    assert summary.status == "diverged"
    assert summary.steps == 4  # the 5th step above the bound is not taken
    assert (tmp_path / "summary.json").exists()


def test_result_files_are_replaced_atomically(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    write_json(path, {"status": "completed"})

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        write_json(path, {"status": "running"})
    assert json.loads(path.read_text()) == {"status": "completed"}


BAD_INPUTS = [
    (["norm=batchnrm"], "norm", "Did you mean 'batch'"),
    (["model=mpl"], "model", "Did you mean 'mlp'"),
    (["data=mnst"], "data", "Did you mean 'mnist'"),
    (["optim=sgdd"], "optim", "Did you mean 'sgd'"),
    (["-m", "norm=none,layr"], "norm", "Did you mean 'layer'"),
    (["norm.epsilon=0.1"], "norm.epsilon", "Did you mean 'norm.eps'"),
    (["seeds=1"], "seeds", "Did you mean 'seed'"),
    (["optim.lr=0"], "optim.lr", "a number > 0"),
    (["optim.lr=-0.1"], "optim.lr", "a number > 0"),
    (["data.batch_size=1"], "data.batch_size", "with norm=batch"),
    (["norm=group", "norm.groups=3", "model.widths=[16,16]"], "norm.groups", "a divisor"),
    (["threshold.values=[1.5]"], "threshold.values", "accuracies in [0, 1]"),
    (["threshold.values=[0.5,-0.1]"], "threshold.values", "accuracies in [0, 1]"),
    (["threshold.metric=test_accuracy"], "threshold.metric", "Did you mean 'test_acc'"),
    (["trainer.max_steps=0"], "trainer.max_steps", "an integer > 0"),
    (["trainer.eval_every=0"], "trainer.eval_every", "an integer > 0"),
    (["trainer.device=tpu"], "trainer.device", "auto, cpu, cuda, mps"),
    (["norm.placement=middle"], "norm.placement", "before_act, after_act"),
    (["model.activation=relu6"], "model.activation", "Did you mean 'relu'"),
    (["model.init=xavier"], "model.init", "default, normal"),
    (["model.bias=maybe"], "model.bias", "auto, true, false"),
    (["norm.momentum=1.5"], "norm.momentum", "[0, 1]"),
    (["model.widths=[]"], "model.widths", "non-empty"),
    (["trainer.threads=-1"], "trainer.threads", "auto (bnlab decides from the model's size) or an integer >= 1"),
    (["trainer.log_every=0"], "trainer.log_every", "an integer > 0"),
    (["trainer.precision=fp16"], "trainer.precision", "fp32, bf16, fp64"),
    (["diag.percentiles=true", "diag.layers=[7]"], "diag.layers", "-3 to 2"),
    (["data.batch_size=100000"], "data.batch_size", "at most the 64 training examples"),
    (["trainer.devices=0"], "trainer.devices", "an integer >= 1"),
    (["trainer.devices=2", "data.batch_size=15"], "data.batch_size", "a multiple of trainer.devices=2"),
    (["trainer.devices=4", "data.batch_size=4"], "data.batch_size", ">= 8 with norm=batch and trainer.devices=4"),
    (["trainer.sync_buffers=mean"], "trainer.sync_buffers", "broadcast, average"),
    (["trainer.timeout_s=0"], "trainer.timeout_s", "> 0"),
    (["trainer.devices=2", "trainer.fuse=true"], "trainer.fuse", "fused runs need trainer.devices=1"),
    (["trainer.devices=2", "diag.ics=true"], "diag.ics", "single-process runs only"),
    (["data=linear_regression", "model=cnn"], "model", "mlp (data=linear_regression gives vectors"),
    (["data=linear_regression", "threshold.metric=test_acc"], "threshold.metric", "test_loss, train_loss"),
    (["data=linear_regression", "trainer.precise_bn=5"], "trainer.precise_bn", "0 with data=linear_regression"),
    (["diag.landscape_steps=[4,0.5]"], "diag.landscape_steps", "0 < low <= high"),
    (["optim.schedule=linear"], "optim.schedule", "none, step, cosine"),
    (["optim.decay_factor=2"], "optim.decay_factor", "a number in (0, 1]"),
    (["optim.warmup_steps=-1"], "optim.warmup_steps", "an integer >= 0"),
]
if not torch.cuda.is_available():
    BAD_INPUTS.append((["trainer.device=cuda"], "trainer.device", "not available on this machine"))


@pytest.mark.slow
@pytest.mark.parametrize("args, key, accepted", BAD_INPUTS, ids=[" ".join(a) for a, _, _ in BAD_INPUTS])
def test_bad_input_exits_non_zero_with_one_paragraph_naming_the_key(tmp_path, args, key, accepted):
    tiny = [a for a in TINY if a.split("=")[0] not in {b.split("=")[0] for b in args}]
    out = bnlab("train", *tiny, *args, cwd=tmp_path)
    text = " ".join((out.stdout + out.stderr).split())
    assert out.returncode == 2, text
    assert key in text and accepted in text
    assert "Traceback" not in text


@pytest.mark.slow
@pytest.mark.parametrize("problem", ["corrupt", "unwritable"])
def test_bad_data_files_or_root_exit_non_zero_naming_the_key(tmp_path, problem):
    root = tmp_path / "data"
    if problem == "corrupt":
        (root / "MNIST" / "raw").mkdir(parents=True)
        for name in (
            "train-images-idx3-ubyte",
            "train-labels-idx1-ubyte",
            "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte",
        ):
            (root / "MNIST" / "raw" / name).write_bytes(b"\x00\x00\x08\x01" + b"\x00" * 12)
    else:
        root.write_text("a file, not a folder")
    out = bnlab(
        "train",
        "data=mnist",
        f"data.root={root / 'sub' if problem == 'unwritable' else root}",
        "trainer.max_steps=1",
        cwd=tmp_path,
    )
    text = " ".join((out.stdout + out.stderr).split())
    assert out.returncode == 2 and "data.root" in text and "Traceback" not in text
    assert ("fails its checksum" if problem == "corrupt" else "cannot be written") in text


@pytest.mark.slow
def test_the_full_traceback_is_there_on_request(tmp_path):
    out = subprocess.run(
        [*TRAIN, *TINY, "optim.lr=-1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "HYDRA_FULL_ERROR": "1"},
    )
    assert out.returncode != 0 and "Traceback" in out.stderr and "ConfigError" in out.stderr


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    model=st.sampled_from(["mlp", "cnn", "resnet"]),
    norm=st.sampled_from(sorted(NORMS)),
    placement=st.sampled_from(["before_act", "after_act"]),
    activation=st.sampled_from(["relu", "sigmoid", "tanh", "gelu"]),
    widths=st.lists(st.integers(1, 12), min_size=1, max_size=3),
    groups=st.integers(1, 4),
    batch_size=st.integers(1, 12),
    lr=st.floats(-1, 10),
    momentum=st.floats(0, 1),
    init=st.sampled_from(["default", "normal"]),
    bias=st.sampled_from(["auto", "true", "false"]),
    optim=st.sampled_from(["sgd", "adam"]),
)
def test_random_configs_train_or_are_refused_never_crash(
    tiny_config,
    tmp_path,
    model,
    norm,
    placement,
    activation,
    widths,
    groups,
    batch_size,
    lr,
    momentum,
    init,
    bias,
    optim,
):
    cfg = tiny_config(
        f"model={model}",
        f"norm={norm}",
        f"norm.placement={placement}",
        f"model.activation={activation}",
        f"model.widths=[{','.join(map(str, widths))}]",
        f"norm.groups={groups}",
        f"data.batch_size={batch_size}",
        f"optim={optim}",
        f"optim.lr={lr}",
        f"norm.momentum={momentum}",
        f"model.init={init}",
        f"model.bias={bias}",
    )
    try:
        summary = train(cfg, tmp_path)
    except ConfigError as e:
        assert "accepted" in str(e) and "\n" not in str(e)
        return
    assert summary.status in ("completed", "stalled", "diverged")
