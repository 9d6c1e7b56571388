"""Sweeps as a user runs them: launchers, resume, and TensorBoard over a sweep's runs."""

import json
import math
import os
import re
import socket
import subprocess
import time
import urllib.request

import pytest
from helpers import CLI, DONE, TINY, bnlab, comparable, scalars
from omegaconf import OmegaConf

from bnlab.face.callbacks import ComposeOnce
from bnlab.record.hparams import columns
from bnlab.run.threads import CORES_ENV, cores_per_job, usable_cores

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
    assert set(statuses(sweep)) == {done.parent.name, broken.parent.name} and set(statuses(sweep).values()) <= set(DONE)
    assert done.stat().st_mtime_ns == before  # skipped, not run again
    assert "already completed, skipped" in (done.parent / "train.log").read_text()
    for tag, points in scalars(broken.parent).items():  # resumed from its checkpoint: no step logged twice
        assert len({step for step, _ in points}) == len(points), tag


@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_parallel_launchers_run_every_job_and_end_with_the_table(tmp_path, launcher):
    extra = ["hydra.launcher.n_jobs=2"] if launcher == "joblib" else ["hydra.launcher.timeout_min=5"]
    out = bnlab(
        "train",
        "-m",
        *(o for o in TINY if not o.startswith("hydra.launcher.")),  # bnlab's launcher's key
        "norm=none,batch",
        f"hydra/launcher={launcher}",
        *extra,
        "hydra.sweep.dir=sweep",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert len(statuses(tmp_path / "sweep")) == 2 and set(statuses(tmp_path / "sweep").values()) <= set(DONE)
    assert (tmp_path / "sweep" / "summary.csv").exists()
    assert "ok/stall/div/fail" in out.stdout


def test_cores_are_shared_out_among_parallel_jobs(monkeypatch):
    cores = usable_cores()
    assert cores == len(os.sched_getaffinity(0))  # the CPUs this process may run on, not the machine's
    assert cores_per_job(None) == cores  # basic launcher: one job at a time
    assert cores_per_job(-1) == 1  # joblib's default: one job per core
    assert cores_per_job(2) == max(1, cores // 2)
    assert cores_per_job(4 * cores) == 1
    monkeypatch.setenv(CORES_ENV, "1")  # a worker of bnlab's launcher, given one core
    assert usable_cores() == 1 and cores_per_job(None) == 1


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
        and "gpus_per_node: ${bnlab.gpus:${trainer.device},${trainer.devices}}" in out.stdout
    )  # no GPU unless trainer.device=cuda


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, body: bytes | None = None):
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"} if body else {})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def test_tensorboard_opens_on_the_comparison_with_finite_metrics_and_honest_statuses(tmp_path):
    sweep = ["-m", *TINY, "norm=none,batch", "optim.lr=0.05,1e12", "seed=0", "hydra.sweep.dir=sweep"]
    assert bnlab("train", *sweep, cwd=tmp_path).returncode == 0
    statuses = {p.parent.name: json.loads(p.read_text())["status"] for p in (tmp_path / "sweep").glob("*/summary.json")}
    assert sorted(statuses.values()).count("diverged") >= 1 and all(n.startswith("norm=") for n in statuses)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [*CLI, "tb", "sweep", "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                runs = get_json(f"{base}/data/runs")
                if set(statuses) <= set(runs):
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "TensorBoard did not list the runs within 90 s"
            time.sleep(1)
        tags = get_json(f"{base}/data/plugin/scalars/tags")
        for run in statuses:  # run names: what varies in the sweep, not the constant overrides
            assert {"train/loss", "test/acc"} <= set(tags[run])
        experiment = get_json(f"{base}/data/plugin/hparams/experiment", json.dumps({"experimentName": ""}).encode())
        hparams = [h["name"] for h in experiment["hparamInfos"]]
        assert columns(["norm.name", "optim.lr"]) == ["norm.name", "optim.lr", "seed", "status"]
        assert sorted(hparams) == ["norm.name", "optim.lr", "seed", "status"]  # TensorBoard puts the differing first
        differs = {h["name"] for h in experiment["hparamInfos"] if h.get("differs")}
        assert differs == {"norm.name", "optim.lr", "status"}  # TensorBoard shows these first (five at most)
        metrics = [m["name"]["tag"] for m in experiment["metricInfos"]]
        request = {
            "experimentName": "",
            "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
            "colParams": [{"hparam": h} for h in hparams] + [{"metric": {"tag": t}} for t in metrics],
            "startIndex": 0,
            "sliceSize": 100,
        }
        groups = get_json(f"{base}/data/plugin/hparams/session_groups", json.dumps(request).encode())["sessionGroups"]
        sessions = {s["name"]: s for g in groups for s in g["sessions"]}
        assert set(sessions) == set(statuses)
        for name, session in sessions.items():
            values = [m["value"] for m in session["metricValues"]]
            # final acc (and loss where finite), the iterations of each threshold reached; no NaN: every view draws
            # them, and no budget stands in for a threshold never reached
            assert len(values) >= 1 and all(math.isfinite(v) for v in values), name
            assert session["status"] == ("STATUS_SUCCESS" if statuses[name] == "completed" else "STATUS_FAILURE"), name
        assert {"groups/norm=batch,optim.lr=0.05", "groups/norm=none,optim.lr=0.05"} <= set(runs)
        (category,) = get_json(f"{base}/data/plugin/custom_scalars/layout")["category"]
        charts = {c["title"] for c in category["chart"]}
        assert "test accuracy over training: median over seeds, band min-max" in charts
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_sweep_prints_one_line_per_run_and_its_table(tmp_path):
    out = bnlab("train", "-m", *TINY, "trainer.max_steps=4", "norm=none,batch", "seed=range(10)", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    before_table = out.stdout.split("outputs/sweeps/")[0].strip().splitlines()
    runs = [line for line in before_table if line.startswith("run ")]
    assert len(runs) == 20 and len(before_table) <= 21  # and Hydra's "Launching 20 jobs"
    assert re.search(r"run 1: norm=none,seed=0: (completed|stalled) after 4 steps", runs[0])  # named by what varies


def test_each_job_of_a_sweep_is_composed_once():
    class Loader:
        repository = None  # every override below is a plain value of a key that is no group

        def __init__(self) -> None:
            self.composed = 0

        def load_sweep_config(self, master_config, sweep_overrides):
            self.composed += 1
            return OmegaConf.create({"job": list(sweep_overrides)})

    loader, master = Loader(), OmegaConf.create({"a": 1})
    composer = ComposeOnce(loader, master)
    composer.is_plain_value = lambda o: False  # compose every job (the copies: the test below)
    first = loader.load_sweep_config(master, ["seed=1"])
    assert loader.load_sweep_config(master, ["seed=1"]) is first and loader.composed == 1
    assert loader.load_sweep_config(master, ["seed=2"]).job == ["seed=2"] and loader.composed == 2
    loader.load_sweep_config(OmegaConf.create({}), ["seed=1"])  # another sweep's
    assert loader.composed == 3


@pytest.mark.parametrize(
    "sweep, composed",
    [
        (["+experiment=lr_sensitivity"], 7),  # 385 jobs: a composition per norm, the lrs and seeds copied
        (["+experiment=fair_baselines"], 5),  # +baseline appends a config group: one per baseline
        (
            [
                "norm=none,batch",
                "norm.momentum=0.1,0.2",
                "threshold.values=[0.5],[0.6]",  # a list: composed, not copied
                "model.activation=relu,sigmoid",
                "data.batch_size=8,16",
                "+trainer.spare=1,2",  # an append: composed
                "seed=0,1",
            ],
            8,  # 2 norms x 2 threshold lists x 2 appends
        ),
    ],
    ids=["lr_sensitivity", "fair_baselines", "values_lists_appends"],
)
def test_a_job_copied_from_another_equals_hydras_own_composition(sweep, composed):
    from hydra import compose, initialize_config_module
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    preset = [o for o in sweep if o.startswith("+experiment=")]
    with initialize_config_module("bnlab.conf", version_base="1.3"):
        master = compose("train", overrides=preset, return_hydra_config=True)
        params = [f"{k}={v}" for k, v in (master.hydra.sweeper.get("params") or {}).items()]
        (jobs,) = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides([*sweep, *params]), None)
        loader = GlobalHydra.instance().config_loader()
        composer = ComposeOnce(loader, master)
        copies = [loader.load_sweep_config(master, job) for job in jobs]
        assert len(composer.templates) == composed
        for job, copied in list(zip(jobs, copies))[:: max(1, len(jobs) // 12)]:
            hydras = composer.compose(master, job)
            assert OmegaConf.to_container(copied) == OmegaConf.to_container(hydras), job
            assert OmegaConf.is_struct(copied) and not OmegaConf.is_readonly(copied.hydra)
        HydraConfig.instance().set_config(copies[0])  # as when the first job runs: its hydra node read-only
        later = [o if not o.startswith("seed=") else "seed=99" for o in jobs[0]]
        copied, hydras = loader.load_sweep_config(master, later), composer.compose(master, later)
        assert OmegaConf.to_container(copied) == OmegaConf.to_container(hydras)
        assert not OmegaConf.is_readonly(copied.hydra)


def test_a_run_trains_the_same_alone_and_beside_another_in_a_parallel_sweep(tmp_path):
    # the defaults: trainer.threads=auto (1 for this MLP) and n_jobs=auto (both runs at once on 2 cores)
    tiny = [o for o in TINY if not o.startswith("trainer.threads=")] + ["trainer.max_steps=40", "trainer.eval_every=10"]
    sweep = bnlab("train", "-m", *tiny, "norm=none,batch", "hydra.launcher.n_jobs=2", "hydra.sweep.dir=s", cwd=tmp_path)
    assert sweep.returncode == 0, sweep.stderr[-2000:]
    alone = bnlab("train", *tiny, "norm=batch", "hydra.run.dir=alone", cwd=tmp_path)
    assert alone.returncode == 0, alone.stderr[-2000:]
    beside = tmp_path / "s" / "norm=batch"
    assert scalars(beside) == scalars(tmp_path / "alone")  # every curve point, bit for bit
    a, b = (json.loads((d / "summary.json").read_text()) for d in (beside, tmp_path / "alone"))
    assert comparable(a) == comparable(b) and a["config"]["trainer"]["threads"] == 1
    assert json.loads((tmp_path / "s" / "provenance.json").read_text())["torch_threads"] == 1
