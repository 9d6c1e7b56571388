"""Sweeps as a user runs them: launchers, resume, and TensorBoard over a sweep's runs."""

import json
import os
import socket
import subprocess
import time
import urllib.request

import pytest
from helpers import CLI, TINY, bnlab, scalars

from bnlab.job import threads_per_job

pytestmark = pytest.mark.slow


def statuses(sweep) -> dict[str, str]:
    return {p.parent.name: json.loads(p.read_text())["status"] for p in sweep.glob("*/summary.json")}


def test_resume_runs_only_what_is_missing(tmp_path):
    args = ["train", "-m", *TINY, "norm=none,batch", "hydra.sweep.dir=sweep"]
    assert bnlab(*args, cwd=tmp_path).returncode == 0
    sweep = tmp_path / "sweep"
    done, broken = sorted(sweep.glob("*/summary.json"))
    broken.write_text(json.dumps({**json.loads(broken.read_text()), "status": "interrupted"}))
    before = done.stat().st_mtime_ns

    out = bnlab(*args, "trainer.resume=true", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert statuses(sweep) == {done.parent.name: "completed", broken.parent.name: "completed"}
    assert done.stat().st_mtime_ns == before  # skipped, not run again
    assert "already completed, skipped" in out.stdout.replace("\n", " ")
    for tag, points in scalars(broken.parent).items():  # resumed from its checkpoint: no step logged twice
        assert len({step for step, _ in points}) == len(points), tag


@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_parallel_launchers_run_every_job_and_end_with_the_table(tmp_path, launcher):
    extra = ["hydra.launcher.n_jobs=2"] if launcher == "joblib" else ["hydra.launcher.timeout_min=5"]
    out = bnlab(
        "train",
        "-m",
        *TINY,
        "norm=none,batch",
        f"hydra/launcher={launcher}",
        *extra,
        "hydra.sweep.dir=sweep",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert sorted(statuses(tmp_path / "sweep").values()) == ["completed", "completed"]
    assert (tmp_path / "sweep" / "summary.csv").exists()
    assert "ok/div/fail" in out.stdout


def test_threads_are_shared_out_among_parallel_jobs():
    cores = os.cpu_count()
    assert threads_per_job(None) == cores  # basic launcher: one job at a time
    assert threads_per_job(-1) == 1  # joblib's default: one job per core
    assert threads_per_job(2) == max(1, cores // 2)
    assert threads_per_job(4 * cores) == 1


def test_the_slurm_launcher_config_composes(tmp_path):
    out = bnlab(
        "train",
        "hydra/launcher=slurm",
        "hydra.launcher.partition=gpu",
        "--cfg",
        "hydra",
        "--package",
        "hydra.launcher",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert (
        "SlurmLauncher" in out.stdout
        and "partition: gpu" in out.stdout
        and "gpus_per_node: ${trainer.devices}" in out.stdout
    )  # 1 by default


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, body: bytes | None = None):
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"} if body else {})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def test_tensorboard_serves_the_runs_their_scalars_and_hparams(tmp_path):
    assert (
        bnlab("train", "-m", *TINY, "norm=none,batch", "seed=0,1", "hydra.sweep.dir=sweep", cwd=tmp_path).returncode
        == 0
    )
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [*CLI, "tb", "sweep", "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                runs = get_json(f"{base}/data/runs")
                if len(runs) == 4:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "TensorBoard did not list the 4 runs within 90 s"
            time.sleep(1)
        assert all("norm=" in r and "seed=" in r for r in runs)
        tags = get_json(f"{base}/data/plugin/scalars/tags")
        for run in runs:
            assert {"train/loss", "train/acc", "test/loss", "test/acc", "iters_to/test_acc=0.9"} <= set(tags[run])
        experiment = get_json(f"{base}/data/plugin/hparams/experiment", json.dumps({"experimentName": ""}).encode())
        hparams = {h["name"] for h in experiment["hparamInfos"]}
        assert {"norm.name", "norm.placement", "optim.lr", "data.batch_size", "seed"} <= hparams
        metrics = {m["name"]["tag"] for m in experiment["metricInfos"]}
        assert {
            "iters_to/test_acc=0.9",
            "iters_to/test_acc=0.95",
            "iters_to/test_acc=0.97",
            "final/test_acc",
        } <= metrics
    finally:
        server.terminate()
        server.wait(timeout=30)
