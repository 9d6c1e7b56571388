"""hydra/launcher=slurm (bnlab/face/slurm.py) against tests/fake_slurm.py, SLURM's commands played on this
machine: a sweep's job array, a cancelled job with and without accounting, a time limit, sbatch's refusal,
and `bnlab resume DIR hydra.launcher.timeout_min=...` submitting only the runs that did not complete, with
numbers equal to an unbroken sweep."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import CLI, TINY

FAKE = Path(__file__).with_name("fake_slurm.py")
SLURM = ["hydra/launcher=slurm", "hydra.launcher.partition=debug", "hydra.launcher.cpus_per_task=1"]
SLURM += ["hydra.launcher.mem_gb=1", "hydra.launcher.poll_s=0.3"]
RUN = [o for o in TINY if not o.startswith("hydra.launcher.")]  # the launcher's keys are SLURM's
# runs long enough to be cancelled or cut off halfway: about 16 s of training each
LONG = [
    *RUN,
    "data.num_train=512",
    "data.batch_size=64",
    "trainer.max_steps=12000",
    "trainer.eval_every=2000",
    "trainer.checkpoint_every=500",
]


@pytest.fixture
def cluster(tmp_path) -> dict[str, str]:
    """The environment of a shell on a "login node": SLURM's commands are tests/fake_slurm.py's."""
    shims = tmp_path / "slurm-bin"
    shims.mkdir()
    for command in ("sbatch", "squeue", "scancel", "sacct", "srun", "scontrol"):
        shim = shims / command
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE}" {command} "$@"\n')
        shim.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))}
    return env | {"PATH": f"{shims}:{env['PATH']}", "FAKE_SLURM_DIR": str(tmp_path / "slurm-state")}


def bnlab(*args: str, cwd: Path, env: dict[str, str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300, **kwargs)


def sweep_dir(cwd: Path) -> Path:
    (found,) = [p.parent for p in cwd.rglob("multirun.yaml")]
    return found


def summaries(folder: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in folder.glob("*/summary.json")}


def provenance(folder: Path) -> dict:
    return json.loads((folder / "provenance.json").read_text())


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory) -> dict[str, dict]:
    """The sweep run here without a break, by bnlab's own launcher."""
    cwd = tmp_path_factory.mktemp("unbroken")
    alone = "trainer.fuse=false"  # each run on its own, as each SLURM job trains it
    done = subprocess.run([*CLI, "train", "-m", *LONG, "seed=0,1", alone], cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return summaries(sweep_dir(cwd))


def submit(cwd: Path, env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [*CLI, "train", "-m", *SLURM, *LONG, "seed=0,1", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_checkpoint(cwd: Path, run: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while not list(cwd.rglob(f"{run}/checkpoint.pt")):
        assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else "slow"
        time.sleep(0.05)


def equal_numbers(a: dict[str, dict], b: dict[str, dict]) -> None:
    assert a.keys() == b.keys()
    for run in a:
        assert a[run]["status"] == b[run]["status"] == "completed"
        assert a[run]["final"] == pytest.approx(b[run]["final"], rel=1e-9, abs=1e-9), run
        steps = [[t["iterations"] for t in r[run]["iterations_to_threshold"]] for r in (a, b)]
        assert steps[0] == steps[1], run


def wait_for_task(state: Path, task: str, proc: subprocess.Popen) -> str:
    deadline = time.monotonic() + 60
    while not (found := [p.stem for p in state.glob(f"*_{task}.pgid")]):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.01)
    return found[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    "accounting, when",
    [(True, "while it trains"), (False, "while it trains"), (False, "before its run began")],
    ids=["accounting", "no accounting", "before its run began"],
)
def test_a_cancelled_job_ends_the_sweep_with_its_table_and_resume_completes_it(
    tmp_path, cluster, unbroken, accounting, when
):
    env = cluster | {"FAKE_SLURM_ACCOUNTING": "1" if accounting else "0"}
    state = Path(env["FAKE_SLURM_DIR"])
    proc = submit(tmp_path, env)
    task = wait_for_task(state, "1", proc)  # seed=1's job has started; its Python has yet to import torch
    if when == "while it trains":
        wait_for_checkpoint(tmp_path, "seed=1", proc)
    subprocess.run(["scancel", task], env=env, check=True)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 1, err[-3000:]
    assert "Traceback" not in out + err and "UncompletedJobError" not in out + err
    folder = sweep_dir(tmp_path)
    runs = summaries(folder)
    assert "1 run did not finish" in " ".join(out.split()) and f"bnlab resume {folder.relative_to(tmp_path)}" in out
    if when == "while it trains":  # SIGTERM stopped it after a step; it wrote its summary and its job its result
        assert runs["seed=0"]["status"] == "completed" and runs["seed=1"]["status"] == "interrupted"
        assert provenance(folder)["runs"] == {"completed": 1, "interrupted": 1} and "ended" in provenance(folder)
        sweep = json.loads((folder / "sweep.json").read_text())
        assert sum(g["runs"] for g in sweep["groups"]) == 2  # written once, by the command, with both runs
    else:  # killed before its run had a folder: the job left no result, which the command says
        why = "CANCELLED by 0" if accounting else "no longer queued (this cluster keeps no accounting to say why)"
        said = " ".join((out + err).split())
        assert f"job {task} (" in said and f"seed=1) ended without a result: {why}" in said
        assert list(runs) == ["seed=0"] and provenance(folder)["runs"] == {"completed": 1}

    resumed = bnlab("resume", str(folder), "hydra.launcher.timeout_min=30", cwd=tmp_path, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "1 of the 2 runs completed before: not submitted again" in resumed.stdout + resumed.stderr
    assert len(list(state.glob("*.pgid"))) == 3  # two jobs, then one
    equal_numbers(summaries(folder), unbroken)
    record = provenance(folder)
    assert record["command"].startswith("bnlab train -m hydra/launcher=slurm")
    assert record["resumes"][0]["command"] == f"bnlab resume {folder} hydra.launcher.timeout_min=30"
    assert record["runs"] == {"completed": 2} and "ended" in record["resumes"][0]


@pytest.mark.slow
def test_at_its_time_limit_a_run_stops_cleanly_and_resumes_with_a_longer_limit(tmp_path, cluster, unbroken):
    # a "minute" of 24 s: SLURM's warning (USR2) comes "30 s" (12 s) before the limit, while the runs train
    env = cluster | {"FAKE_SLURM_MINUTE_S": "24"}
    proc = submit(tmp_path, env, "hydra.launcher.timeout_min=1", "hydra.launcher.signal_delay_s=30")
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 1, err[-3000:]
    folder = sweep_dir(tmp_path)
    runs = summaries(folder)
    assert {r["status"] for r in runs.values()} == {"interrupted"}, out + err
    for name, run in runs.items():  # stopped after a step, with a checkpoint at that step
        state = subprocess.run(
            [sys.executable, "-c", f"import torch; print(torch.load('{folder / name / 'checkpoint.pt'}')['step'])"],
            capture_output=True,
            text=True,
        )
        assert int(state.stdout) == run["steps"] > 0
    assert "did not finish" in out and "hydra.launcher.timeout_min=MINUTES" in " ".join(out.split())
    resumed = bnlab("resume", str(folder), "hydra.launcher.timeout_min=30", cwd=tmp_path, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    equal_numbers(summaries(folder), unbroken)


def test_sbatch_refusing_the_jobs_is_a_refusal_with_its_message_and_no_folder(tmp_path, cluster):
    gpu = "hydra.launcher.gpus_per_node=1"  # on the fake cluster's CPU partition
    done = bnlab("train", "-m", *SLURM, *RUN, "seed=0,1", gpu, cwd=tmp_path, env=cluster)
    assert done.returncode == 2, done.stderr[-3000:]
    message = " ".join(done.stderr.split())
    assert "sbatch refused the sweep's jobs: sbatch: error: Batch job submission failed" in message
    assert "gpus_per_node=1" in message and "Traceback" not in message
    assert not list(tmp_path.rglob("multirun.yaml"))


def test_resume_accepts_only_the_launchers_settings(tmp_path):
    (tmp_path / "multirun.yaml").write_text("{}")
    done = subprocess.run([*CLI, "resume", str(tmp_path), "optim.lr=0.5"], capture_output=True, text=True)
    assert done.returncode == 2
    assert "does not accept 'optim.lr=0.5'" in done.stderr and "hydra.launcher.timeout_min" in done.stderr


@pytest.mark.slow
def test_with_max_num_timeout_a_job_at_its_time_limit_is_requeued_and_its_run_resumes(tmp_path, cluster, unbroken):
    env = cluster | {"FAKE_SLURM_MINUTE_S": "24"}  # about 12 s of training per attempt: two requeues or more
    limit = ["hydra.launcher.timeout_min=1", "hydra.launcher.signal_delay_s=30", "hydra.launcher.max_num_timeout=5"]
    proc = submit(tmp_path, env, *limit)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    folder = sweep_dir(tmp_path)
    equal_numbers(summaries(folder), unbroken)
    logs = "".join(p.read_text() for p in folder.glob("*/train.log"))
    assert logs.count("resuming from the checkpoint at step") >= 2  # requeued twice or more, each resumed


@pytest.mark.slow
def test_jobs_that_can_never_start_are_named_and_cancelling_them_ends_the_sweep(tmp_path, cluster):
    proc = submit(tmp_path, cluster, "hydra.launcher.cpus_per_task=4")  # the node has 2
    state = Path(cluster["FAKE_SLURM_DIR"])
    deadline = time.monotonic() + 60
    while len(pending := sorted(p.stem for p in state.glob("*.pending"))) < 2:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    time.sleep(2)  # a few polls
    subprocess.run(["scancel", *pending], env=cluster, check=True)
    out, err = proc.communicate(timeout=120)
    said = " ".join((out + err).split())
    assert proc.returncode == 1
    assert said.count("waits with reason PartitionConfig: the partition cannot give what the job asks") == 1
    assert "2 runs did not finish" in said
