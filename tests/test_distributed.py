"""One run over several processes (bnlab/run/distributed.py, trainer.devices): two gloo processes on CPU in
float64 against single-process runs with the same global batch and batch order, the synchronized
norm against batch norm over the whole batch, the running statistics under both trainer.sync_buffers,
and what a dead, hung or signalled process does to the run."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers import CLI, DONE, TINY, assert_equal_runs, compose_config, scalars
from hydra import compose, initialize_config_module

from bnlab.core.data import load_data
from bnlab.core.models import build_model
from bnlab.core.norms import BatchNorm, GhostBatchNorm, SyncBatchNorm, with_torch_sync_batch_norm
from bnlab.run.checkpoint import CHECKPOINT
from bnlab.run.diagnostics import precise_bn
from bnlab.run.distributed import DistributedError, processes
from bnlab.run.engine import Processes, batches, resolve_device, thread_count
from bnlab.run.train import train
from bnlab.schema.config import ConfigError

# float64, every step logged, momentum in the optimizer state, precise BN at the end
EXACT = [
    "trainer.precision=fp64",
    "trainer.max_steps=12",
    "trainer.eval_every=4",
    "trainer.log_every=1",
    "trainer.precise_bn=3",
    "optim.momentum=0.9",
    "optim.lr=0.1",
]
TOL = 1e-9


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The final model state (parameters and buffers) from a run's checkpoint."""
    return torch.load(run_dir / CHECKPOINT, weights_only=False)["model"]


def final(run_dir: Path) -> dict[str, float]:
    return json.loads((run_dir / "summary.json").read_text())["final"]


def assert_close_scalars(a: Path, b: Path, tags: set[str] | None = None) -> None:
    """The runs logged the same steps of every scalar (or of `tags`), with values equal to TOL."""
    sa, sb = scalars(a), scalars(b)
    assert sa.keys() == sb.keys()
    for tag in tags or sb:
        assert [s for s, _ in sa[tag]] == [s for s, _ in sb[tag]], tag
        assert [v for _, v in sa[tag]] == pytest.approx([v for _, v in sb[tag]], rel=TOL, abs=TOL, nan_ok=True), tag


def assert_close_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], keys=None) -> None:
    assert a.keys() == b.keys()
    for k in keys or b:
        torch.testing.assert_close(a[k], b[k], rtol=TOL, atol=TOL, msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_sync_batch_norm_on_two_processes_equals_batch_norm_on_one(tiny_config, tmp_path, model):
    two = train(tiny_config(*EXACT, f"model={model}", "norm=sync_batch", "trainer.devices=2"), tmp_path / "two")
    one = train(tiny_config(*EXACT, f"model={model}", "norm=batch"), tmp_path / "one")
    assert two.status == one.status and one.status in DONE and two.devices == 2 and one.devices == 1
    assert len(list((tmp_path / "two").glob("events.out.tfevents.*"))) == 1  # rank 0's alone
    assert_close_scalars(tmp_path / "two", tmp_path / "one")
    assert final(tmp_path / "two") == pytest.approx(final(tmp_path / "one"), rel=TOL, abs=TOL)
    assert_close_tensors(weights(tmp_path / "two"), weights(tmp_path / "one"))


RUNNING = re.compile(r"running_(mean|var)$")


@pytest.mark.slow
@pytest.mark.parametrize("sync_buffers", ["broadcast", "average"])
def test_per_process_batch_norm_equals_ghost_batch_norm_but_for_the_running_statistics(
    tiny_config, tmp_path, sync_buffers
):
    """norm=batch on 2 processes normalizes each half of every batch on its own, as ghost BN with virtual
    batches of half the batch does: training losses, accuracies and parameters are equal. The running
    statistics are equal only when averaged over the processes; broadcast keeps rank 0's, an average over
    its halves alone, and the eval-mode test metrics, which use them, differ. Train-mode evaluation and
    precise BN use batch statistics only: equal either way."""
    cfg = tiny_config(*EXACT, "norm=batch", "trainer.devices=2", f"trainer.sync_buffers={sync_buffers}")
    train(cfg, tmp_path / "two")
    train(tiny_config(*EXACT, "norm=ghost_batch", "norm.virtual_batch_size=8"), tmp_path / "ghost")
    two, ghost = weights(tmp_path / "two"), weights(tmp_path / "ghost")
    running = {k for k in ghost if RUNNING.search(k)}
    assert running
    assert_close_tensors(two, ghost, keys=set(ghost) - running)
    assert_close_scalars(tmp_path / "two", tmp_path / "ghost", tags={"train/loss", "train/acc", "train/lr"})
    same = ("train_loss", "train_acc", "test_acc_train_mode", "test_acc_precise_bn")
    f_two, f_ghost = final(tmp_path / "two"), final(tmp_path / "ghost")
    assert [f_two[k] for k in same] == pytest.approx([f_ghost[k] for k in same], rel=TOL, abs=TOL)
    if sync_buffers == "average":
        assert_close_tensors(two, ghost)
        assert_close_scalars(tmp_path / "two", tmp_path / "ghost")
    else:
        assert all(not torch.allclose(two[k], ghost[k], rtol=1e-3, atol=0) for k in running)
        assert not math.isclose(f_two["test_loss"], f_ghost["test_loss"], rel_tol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("sync_buffers", ["broadcast", "average"])
def test_the_running_statistics_are_rank_0s_or_the_average_of_the_processes(tiny_config, tmp_path, sync_buffers):
    """With momentum 1 the running statistics after one step are the batch statistics of that step: of
    rank 0's half of the first batch (broadcast), or the mean of both halves' (average)."""
    cfg = tiny_config(
        "trainer.precision=fp64",
        "trainer.max_steps=1",
        "norm.momentum=1.0",
        "trainer.devices=2",
        f"trainer.sync_buffers={sync_buffers}",
    )
    train(cfg, tmp_path)
    data = load_data(cfg.data, torch.device("cpu"))
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, data.in_shape, data.num_classes).double()  # the weights before the step
    idx = next(batches(len(data.train_y), cfg.data.batch_size, torch.Generator().manual_seed(cfg.seed)))
    h = model[1].layer(model[0](data.train_x[idx].double()))  # the first norm's input: (16, 100)
    halves = h[:8], h[8:]
    means, variances = [x.mean(0) for x in halves], [x.var(0) for x in halves]  # var: unbiased, as BN keeps it
    expected = (means[0], variances[0]) if sync_buffers == "broadcast" else (sum(means) / 2, sum(variances) / 2)
    state = weights(tmp_path)
    torch.testing.assert_close(state["1.norm.running_mean"], expected[0].detach(), rtol=TOL, atol=TOL)
    torch.testing.assert_close(state["1.norm.running_var"], expected[1].detach(), rtol=TOL, atol=TOL)


# ---------------------------------------------------------------- the synchronized norm alone

SIZES = (5, 7)  # rank 0 and rank 1 hold different numbers of examples


def _sync_bn_matches_batch_norm(group: Processes, shape: tuple[int, ...]) -> None:
    """On every process: SyncBatchNorm on this process's rows equals BatchNorm on all rows, in its output,
    the input's gradient, the running statistics and (summed over the processes) the gradients of gamma
    and beta; the loss is sum(y * w), each process's part of it computed where its rows are."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(sum(SIZES), *shape, generator=g, dtype=torch.float64) * 2 + 1.5
    w = torch.randn(x.shape, generator=g, dtype=torch.float64)
    gamma, beta = torch.rand(shape[0], generator=g, dtype=torch.float64) + 0.5, torch.randn(shape[0], generator=g)
    rows = slice(sum(SIZES[: group.rank]), sum(SIZES[: group.rank + 1]))
    outputs = []
    for layer, part in ((SyncBatchNorm, rows), (BatchNorm, slice(None))):
        norm = layer(shape[0], eps=1e-5, momentum=0.3, affine=True).double()
        with torch.no_grad():
            norm.weight.copy_(gamma)
            norm.bias.copy_(beta)
        xs = x[part].clone().requires_grad_()
        y = norm(xs)
        (y * w[part]).sum().backward()
        grads = torch.cat([norm.weight.grad, norm.bias.grad])
        if layer is SyncBatchNorm:
            group.sum(grads)
        outputs.append((y.detach(), xs.grad, grads, norm))
    (y, x_grad, grads, sync), (y_ref, x_grad_ref, grads_ref, ref) = outputs
    for a, b in ((y, y_ref[rows]), (x_grad, x_grad_ref[rows]), (grads, grads_ref)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sync.running_mean, ref.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sync.running_var, ref.running_var, rtol=1e-12, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(6,), (6, 3, 3)], ids=["vectors", "maps"])
def test_cpu_sync_batch_norm_equals_batch_norm_over_all_processes_rows(shape):
    with processes(2, "cpu", 60, _sync_bn_matches_batch_norm, shape) as group:
        _sync_bn_matches_batch_norm(group, shape)


def _precise_bn_matches_ghost_batch_norm(group: Processes) -> None:
    """Precise BN of per-process BN, each process with its half of every batch and the statistics averaged,
    equals precise BN of ghost BN with virtual batches of half the batch in one process."""
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    models = []
    for norm in (BatchNorm(4), GhostBatchNorm(4, eps=1e-5, momentum=0.1, affine=True, virtual_batch_size=8)):
        torch.manual_seed(0)
        models.append(torch.nn.Sequential(torch.nn.Linear(6, 4), norm).double())
    for model, g in zip(models, (group, None)):
        precise_bn(model, x, batch_size=16, num_batches=5, generator=torch.Generator().manual_seed(1), group=g)
    (_, two), (_, one) = models
    torch.testing.assert_close(two.running_mean, one.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(two.running_var, one.running_var, rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_precise_bn_averages_the_statistics_of_the_processes():
    with processes(2, "cpu", 60, _precise_bn_matches_ghost_batch_norm) as group:
        _precise_bn_matches_ghost_batch_norm(group)


def test_on_cuda_the_sync_norm_becomes_torchs_with_the_same_tensors():
    """What a CUDA run hands to DDP (checked here on CPU, one process: torch's layer is then plain BN)."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), SyncBatchNorm(6, eps=1e-3, momentum=0.2, affine=True))
    x = torch.randn(10, 4)
    before = {k: v for k, v in model.state_dict().items()}
    params = list(model.parameters())
    expected = model(x)
    model[1].running_mean.zero_()  # undo the step's update, so that both forward passes see the same buffers
    model[1].running_var.fill_(1)
    model[1].num_batches_tracked.zero_()
    converted = with_torch_sync_batch_norm(model)
    assert type(converted[1]) is torch.nn.SyncBatchNorm and list(converted.parameters()) == params
    assert converted.state_dict().keys() == before.keys()
    assert (converted[1].eps, converted[1].momentum) == (1e-3, 0.2)
    torch.testing.assert_close(converted(x), expected, rtol=0, atol=0)


def _fails_on_rank_1(group: Processes) -> None:
    if group.rank == 1:
        raise ValueError("rank 1 cannot go on")
    group.sum(torch.ones(1))


@pytest.mark.slow
def test_an_error_in_another_process_is_raised_by_rank_0_naming_it():
    with pytest.raises(DistributedError, match=r"rank 1 \(pid \d+\) failed: ValueError: rank 1 cannot go on"):
        with processes(2, "cpu", 60, _fails_on_rank_1) as group:
            _fails_on_rank_1(group)


def test_sync_batch_norm_alone_is_batch_norm():
    x = torch.randn(12, 6, dtype=torch.float64)
    sync, plain = SyncBatchNorm(6, eps=1e-5, momentum=0.1, affine=True).double(), BatchNorm(6).double()
    torch.testing.assert_close(sync(x), plain(x), rtol=0, atol=0)
    torch.testing.assert_close(sync.running_var, plain.running_var, rtol=0, atol=0)


# ---------------------------------------------------------------- failures and signals

# A 2-process run long enough (a few hundred steps) to be stopped halfway through.
LONG = [
    *TINY,
    "data.num_train=512",
    "data.image_size=28",
    "data.batch_size=64",
    "model.widths=[256,256]",
    "trainer.max_steps=400",
    "trainer.eval_every=50",
    "trainer.checkpoint_every=50",
    "trainer.devices=2",
]


def start(*args: str, cwd: Path) -> subprocess.Popen:
    """`bnlab train ARGS` in a session of its own (a terminal's Ctrl-C reaches every process of it)."""
    out = subprocess.DEVNULL
    return subprocess.Popen([*CLI, "train", *args], cwd=cwd, stdout=out, stderr=out, start_new_session=True)


def worker_pid(run_dir: Path, timeout: float = 120) -> int:
    """The pid of rank 1, as rank 0 logs it, once the run has written its first checkpoint."""
    deadline = time.monotonic() + timeout
    while not (run_dir / CHECKPOINT).exists():
        assert time.monotonic() < deadline, "no checkpoint"
        time.sleep(0.01)
    return int(re.search(r"rank 1: pid (\d+)", (run_dir / "train.log").read_text()).group(1))


def gone(pid: int) -> bool:
    """The process has exited and been reaped (a zombie counts as gone too)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except FileNotFoundError:
        return True


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("unbroken")
    out = subprocess.run([*CLI, "train", *LONG, "hydra.run.dir=run"], cwd=cwd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return cwd / "run"


@pytest.mark.slow
@pytest.mark.parametrize("how", ["killed", "stopped"])
def test_a_dead_or_hung_process_fails_the_run_with_an_error_naming_it(tmp_path, how):
    """SIGKILL: rank 0's next collective fails at once. SIGSTOP: it fails after trainer.timeout_s. Either
    way the run ends as failed (exit code 1) and no process is left behind."""
    proc = start(*LONG, "hydra.run.dir=run", "trainer.timeout_s=5", cwd=tmp_path)
    pid = worker_pid(tmp_path / "run")
    signal_, expected = signal.SIGKILL, f"rank 1 (pid {pid}) was killed by SIGKILL"
    if how == "stopped":
        signal_, expected = signal.SIGSTOP, "a process stopped answering for trainer.timeout_s=5 s"
    os.kill(pid, signal_)
    assert proc.wait(timeout=120) == 1
    s = summary(tmp_path / "run")
    assert s["status"] == "failed" and 0 < s["steps"] < 400
    assert s["error"].startswith("DistributedError: trainer.devices=2: ") and expected in s["error"]
    assert gone(pid)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGTERM to rank 0", "Ctrl-C to every process", "SIGTERM to rank 1"])
def test_a_signal_stops_every_process_leaves_the_run_interrupted_and_resumable(tmp_path, unbroken, how):
    proc = start(*LONG, "hydra.run.dir=run", cwd=tmp_path)
    pid = worker_pid(tmp_path / "run")
    if how == "SIGTERM to rank 0":
        proc.send_signal(signal.SIGTERM)
    elif how == "SIGTERM to rank 1":
        os.kill(pid, signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    assert gone(pid)
    s = summary(tmp_path / "run")
    assert s["status"] == "interrupted" and 0 < s["steps"] < 400
    assert torch.load(tmp_path / "run" / CHECKPOINT, weights_only=False)["step"] == s["steps"]

    resumed = subprocess.run(
        [*CLI, "train", *LONG, "hydra.run.dir=run", "trainer.resume=true"], cwd=tmp_path, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_equal_runs(tmp_path / "run", unbroken)


# ---------------------------------------------------------------- configuration


def test_each_process_gets_its_share_of_the_cores():
    cfg = compose_config(["model=resnet", "model.widths=[64,128,256]", "data.batch_size=128", "trainer.devices=2"])
    assert thread_count([cfg], cores=8) == 4  # a ResNet's step has the work for every core each process gets
    cfg.trainer.threads = 3
    assert thread_count([cfg], cores=8) == 3  # a count is a count


def test_several_processes_train_on_cpus_or_one_gpu_each(monkeypatch):
    assert resolve_device("cpu", 2, 1) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto", 2, 1) == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match=r"trainer.devices=4 is not accepted .* 1 to 2, the GPUs"):
        resolve_device("cuda", 4, 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    with pytest.raises(ConfigError, match="trainer.device='mps' is not accepted with trainer.devices=2"):
        resolve_device("mps", 2, 0)


@pytest.mark.parametrize("device, gpus", [("cuda", 4), ("auto", 0), ("cpu", 0)])
def test_the_slurm_launcher_asks_for_a_gpu_per_process_on_one_node_where_the_runs_use_cuda(device, gpus):
    overrides = ["hydra/launcher=slurm", "trainer.devices=4", f"trainer.device={device}"]
    with initialize_config_module("bnlab.conf", version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert (launcher.gpus_per_node, launcher.nodes, launcher.tasks_per_node) == (gpus, 1, 1)
