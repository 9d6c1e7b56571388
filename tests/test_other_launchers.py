"""One run on the processes another launcher started (bnlab/run/world.py, bnlab.run.distributed.joined and
follow): torchrun on one "node" and on two (a rendezvous on 127.0.0.1), and srun's environment as SLURM sets
it for each task of `srun -n 2`, in float64 against one process with the global batch; and what a refused
config, a sweep and a dying process do there."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import CLI, TINY
from test_sweeps import free_port

from bnlab.run.checkpoint import CHECKPOINT
from bnlab.run.threads import usable_cores
from bnlab.run.world import World, first_node, world

# float64, momentum in the optimizer state: a run on 2 processes equals one process to 1e-9
EXACT = [
    *TINY,
    "trainer.precision=fp64",
    "trainer.max_steps=12",
    "trainer.eval_every=4",
    "optim.momentum=0.9",
    "optim.lr=0.1",
]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
TOL = 1e-9


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def srun_env(rank: int, tasks: int = 2, port: int | None = None) -> dict[str, str]:
    """What SLURM sets for task `rank` of `srun -n TASKS` on one node (and MASTER_PORT, which a test sets so
    that two tests never share a port)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="localhost",
        SLURM_STEP_NODELIST="localhost",
        SLURM_NTASKS=str(tasks),
        SLURM_STEP_NUM_TASKS=str(tasks),
        SLURM_PROCID=str(rank),
        SLURM_LOCALID=str(rank),
        SLURM_CPUS_PER_TASK="1",
    )
    if port:
        env["MASTER_PORT"] = str(port)
    return env


def srun(*args: str, cwd: Path, tasks: int = 2) -> list[subprocess.Popen]:
    """`bnlab train ARGS` as each task of `srun -n TASKS` runs it."""
    port = free_port()
    return [
        subprocess.Popen(
            [*CLI, "train", *args],
            cwd=cwd,
            env=srun_env(r, tasks, port),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for r in range(tasks)
    ]


def torchrun(*args: str, cwd: Path, nodes: int = 1) -> list[subprocess.Popen]:
    """`torchrun ... -m bnlab train ARGS`: 2 processes on one node, or one on each of two "nodes" that meet
    at a rendezvous on 127.0.0.1."""
    if nodes == 1:
        how = [["--nnodes=1", "--nproc_per_node=2", f"--master_port={free_port()}"]]
    else:
        endpoint = f"127.0.0.1:{free_port()}"
        common = ["--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}"]
        how = [[*common, "--rdzv-id=bnlab-test"] for _ in range(nodes)]
    return [
        subprocess.Popen(
            [*TORCHRUN, *h, "-m", "bnlab", "train", *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for h in how
    ]


def finish(procs: list[subprocess.Popen], timeout: float = 180) -> list[tuple[int, str]]:
    return [(p.wait(timeout), p.communicate()[1].decode()) for p in procs]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict:
    """The run on one process, with batch norm over its global batch."""
    cwd = tmp_path_factory.mktemp("one")
    done = subprocess.run([*CLI, "train", *EXACT, "norm=batch", "hydra.run.dir=run"], cwd=cwd, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    return summary(cwd / "run")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["torchrun, 2 processes", "torchrun, 2 nodes", "srun -n 2"])
def test_two_processes_of_another_launcher_equal_one_process_with_the_global_batch(tmp_path, one_process, how):
    args = [*EXACT, "norm=sync_batch", "hydra.run.dir=run"]
    if how == "srun -n 2":
        procs = srun(*args, cwd=tmp_path)
    else:
        procs = torchrun(*args, cwd=tmp_path, nodes=2 if "nodes" in how else 1)
    for code, err in finish(procs):
        assert code == 0, err[-3000:]
    two = summary(tmp_path / "run")
    assert two["devices"] == 2 and two["status"] == one_process["status"]
    assert two["final"] == pytest.approx(one_process["final"], rel=TOL, abs=TOL)
    assert two["final"]["test_loss"] == pytest.approx(one_process["final"]["test_loss"], rel=TOL, abs=TOL)
    assert two["config"]["trainer"]["threads"] == 1
    assert len(list(tmp_path.glob("*/summary.json"))) == 1  # rank 0 alone made a folder and wrote
    assert "the processes joined (rank 1: pid" in (tmp_path / "run" / "train.log").read_text()


@pytest.mark.slow
def test_a_refused_config_ends_every_process_with_exit_code_2_and_one_message(tmp_path):
    start = time.monotonic()
    (code0, err0), (code1, err1) = finish(srun(*TINY, "data.batch_size=15", "trainer.devices=2", cwd=tmp_path))
    assert (code0, code1) == (2, 2) and time.monotonic() - start < 60  # rank 1 does not wait out a timeout
    assert "data.batch_size=15 is not accepted" in err0 and err1 == ""


@pytest.mark.slow
def test_trainer_devices_must_be_the_processes_started(tmp_path):
    (code0, err0), (code1, _) = finish(srun(*TINY, "trainer.devices=4", cwd=tmp_path))
    assert (code0, code1) == (2, 2)
    assert "trainer.devices=4 is not accepted under srun, which started 2 processes" in " ".join(err0.split())


@pytest.mark.slow
def test_a_sweep_is_refused_on_another_launchers_processes(tmp_path):
    (code0, err0), (code1, err1) = finish(srun("-m", *TINY, "seed=0,1", cwd=tmp_path))
    assert (code0, code1) == (2, 2) and "`bnlab train -m` is not accepted" in err0 and err1 == ""
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_a_dying_process_fails_the_run_naming_it_and_rank_0_writes_its_summary(tmp_path):
    long = [*TINY, "data.num_train=512", "data.batch_size=64", "trainer.max_steps=100000", "trainer.eval_every=50"]
    procs = srun(*long, "norm=sync_batch", "hydra.run.dir=run", "trainer.checkpoint_every=50", cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not (tmp_path / "run" / CHECKPOINT).exists():  # it has trained
        assert time.monotonic() < deadline and procs[0].poll() is None
        time.sleep(0.05)
    pid = int(re.search(r"rank 1: pid (\d+)", (tmp_path / "run" / "train.log").read_text()).group(1))
    os.kill(pid, signal.SIGKILL)
    (code0, _), _ = finish(procs)
    assert code0 == 1
    s = summary(tmp_path / "run")
    assert s["status"] == "failed" and s["steps"] > 0
    assert s["error"].startswith(f"DistributedError: srun with 2 processes: rank 1 (pid {pid}) ended; the run stopped")


# ---------------------------------------------------------------- the environment


def test_torchrun_and_srun_are_recognized_by_their_environment():
    torchrun_env = dict(RANK="1", WORLD_SIZE="4", LOCAL_RANK="1", MASTER_ADDR="n1", MASTER_PORT="29500")
    assert world(torchrun_env) == World(1, 4, 1, "n1", 29500, "torchrun")
    step = srun_env(3, tasks=4) | {"SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_LOCALID": "1"}
    step.pop("MASTER_PORT", None)
    assert world(step) == World(3, 4, 1, "gpu07", 15000 + 4242, "srun")
    batch_script = {k: v for k, v in step.items() if k != "SLURM_STEP_NUM_TASKS"}  # sbatch -n 4 runs it once
    assert world(batch_script) is None
    assert world({"RANK": "0", "WORLD_SIZE": "1"}) is None  # torchrun with one process
    assert world(srun_env(0, tasks=1)) is None  # a submitit job: one task


@pytest.mark.parametrize(
    "nodelist, first",
    [("n1", "n1"), ("gpu[03-05,9],cpu1", "gpu03"), ("a[7],b", "a7"), ("rack1-[2-4]-x", "rack1-2-x"), ("x,y", "x")],
)
def test_the_first_node_of_a_slurm_host_list(nodelist, first):
    assert first_node(nodelist) == first


def test_the_cores_are_those_slurm_gave_the_task_shared_among_torchruns_processes(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    for key in ("BNLAB_CORES", "SLURM_CPUS_PER_TASK", "RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert usable_cores() == 8
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    assert usable_cores() == 3
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert usable_cores() == 2
