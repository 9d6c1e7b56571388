"""A stand-in for SLURM's commands on a machine without SLURM, enough for submitit's job arrays: `sbatch` runs
each task of the array here at once (its batch script with SLURM's variables, and the script's `srun` as the
job step), `squeue -h -r -u USER -o %i` lists the tasks still running, `scancel ID` ends one as SLURM does
(SIGTERM to its processes, SIGKILL after KILL_WAIT_S), `#SBATCH --time` and `--signal=USR2@S` are kept with
a minute of MINUTE_S seconds (USR2 to the job step S "seconds" before the limit, then SIGTERM and SIGKILL at
it), `scontrol requeue ID` starts the task again when it ends (SLURM_RESTART_COUNT one more), and `sacct`
answers with the tasks' states where FAKE_SLURM_ACCOUNTING=1, else fails as on a cluster
without accounting. `sbatch` refuses a script with --gpus-per-node above 0, as a CPU partition does, and
queues one with more than NODE_CPUS CPUs per task never to start it.

tests/test_slurm.py puts a folder of shims (`sbatch` -> `python fake_slurm.py sbatch ...`) first on PATH;
the state is kept in FAKE_SLURM_DIR: per task, `ID.pgid` (its batch script), `ID.step` (its job step's pid)
and `ID.state`."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

STATE = Path(os.environ.get("FAKE_SLURM_DIR", "/tmp/fake_slurm"))
MINUTE_S = float(os.environ.get("FAKE_SLURM_MINUTE_S", "60"))
KILL_WAIT_S = 3.0
NODE_CPUS = 2  # a job asking for more CPUs per task waits forever (reason PartitionConfig), as on a real node
GPU_REFUSAL = "sbatch: error: Batch job submission failed: Requested node configuration is not available"


def sbatch(script: str) -> None:
    text = Path(script).read_text()
    opts = dict(re.findall(r"^#SBATCH --([\w-]+)=(.*)$", text, re.M))
    if int(opts.get("gpus-per-node", "0")) > 0:
        print(GPU_REFUSAL, file=sys.stderr)
        sys.exit(1)
    STATE.mkdir(parents=True, exist_ok=True)
    counter = STATE / "next_id"
    job = int(counter.read_text()) if counter.exists() else 100
    counter.write_text(str(job + 1000))
    tasks = [""]  # a single job (no --array) is a task of its own
    if "array" in opts:
        first, last = re.match(r"(\d+)-(\d+)", opts["array"]).groups()
        tasks = [str(t) for t in range(int(first), int(last) + 1)]
    for task in tasks:
        if int(opts.get("cpus-per-task", "1")) > NODE_CPUS:  # SLURM queues it, never to start
            (STATE / f"{job}_{task}.pending").write_text("PartitionConfig")
            continue
        subprocess.Popen(
            [sys.executable, __file__, "_task", script, str(job), task],
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    print(f"Submitted batch job {job}")


def _task(script: str, job: str, task: str) -> None:
    """One task of the array: its batch script, watched for its time limit."""
    text = Path(script).read_text()
    opts = dict(re.findall(r"^#SBATCH --([\w-]+)=(.*)$", text, re.M))
    name = f"{job}_{task}" if task else job
    fill = {"%A": job, "%a": task, "%j": str(int(job) + int(task) + 1) if task else job, "%t": "0"}

    def path(pattern: str) -> str:
        for k, v in fill.items():
            pattern = pattern.replace(k, v)
        Path(pattern).parent.mkdir(parents=True, exist_ok=True)
        return pattern

    array = {"SLURM_ARRAY_JOB_ID": job, "SLURM_ARRAY_TASK_ID": task} if task else {}
    env = dict(
        os.environ,
        **array,
        SLURM_JOB_ID=fill["%j"],
        SLURM_JOB_NODELIST="localhost",
        SLURM_NODELIST="localhost",
        SLURM_JOB_NUM_NODES="1",
        SLURM_NTASKS="1",
        SLURM_PROCID="0",
        SLURM_LOCALID="0",
        SLURM_NODEID="0",
        SLURM_CPUS_PER_TASK=opts.get("cpus-per-task", "1"),
        FAKE_SLURM_TASK=name,
    )
    requeued = STATE / f"{name}.requeue"
    for restarts in range(100):
        env["SLURM_RESTART_COUNT"] = str(restarts)
        with open(path(opts["output"]), "a") as out, open(path(opts["error"]), "a") as err:
            batch = subprocess.Popen(["bash", script], env=env, stdout=out, stderr=err, start_new_session=True)
        (STATE / f"{name}.pgid").write_text(str(batch.pid))
        _watch(name, batch, opts)
        if not requeued.exists():
            break
        requeued.unlink()  # `scontrol requeue`: the job starts again, with its restart count
        (STATE / f"{name}.state").unlink(missing_ok=True)
    state = STATE / f"{name}.state"
    if not state.exists():
        state.write_text("COMPLETED" if batch.returncode == 0 else "FAILED")


def _watch(name: str, batch: subprocess.Popen, opts: dict[str, str]) -> None:
    """Wait for the batch script to end: its job step warned (USR2) and the job ended at its time limit."""
    limit = float(opts["time"]) * MINUTE_S if "time" in opts else float("inf")
    warn = re.match(r"USR2@(\d+)", opts.get("signal", ""))
    warn_at = limit - float(warn.group(1)) * MINUTE_S / 60 if warn else float("inf")
    start, warned = time.monotonic(), False
    while batch.poll() is None:
        elapsed = time.monotonic() - start
        if not warned and elapsed >= warn_at and (STATE / f"{name}.step").exists():
            os.kill(int((STATE / f"{name}.step").read_text()), signal.SIGUSR2)
            warned = True
        if elapsed >= limit:
            _end(name, batch.pid, "TIMEOUT")
        time.sleep(0.1)


def srun(args: list[str]) -> None:
    """The job step: the command, its output where --output and --error say, its pid kept for signals."""
    files = {}
    while args[0].startswith("--"):
        flag = args.pop(0)
        if flag in ("--output", "--error"):
            files[flag] = args.pop(0)
    task = os.environ["FAKE_SLURM_TASK"]
    job, _, index = task.partition("_")
    fill = {"%A": job, "%a": index, "%t": "0", "%j": os.environ["SLURM_JOB_ID"]}
    for flag, pattern in files.items():
        for k, v in fill.items():
            pattern = pattern.replace(k, v)
        fd = os.open(pattern, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(fd, 1 if flag == "--output" else 2)
    (STATE / f"{task}.step").write_text(str(os.getpid()))
    os.execvp(args[0], args)


def _end(name: str, pgid: int, state: str) -> None:
    """SIGTERM to the task's processes, SIGKILL after KILL_WAIT_S, its state recorded."""
    (STATE / f"{name}.state").write_text(state)
    try:
        os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + KILL_WAIT_S
        while time.monotonic() < deadline:
            os.killpg(pgid, 0)
            time.sleep(0.1)
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def queue() -> list[str]:
    """squeue -o "%i %r": the tasks running or requeued (their state is set again when they end), and those
    pending with their reason."""
    states = {p.stem: STATE / f"{p.stem}.state" for p in STATE.glob("*.pgid")}
    running = [name for name, state in states.items() if not state.exists() or state.read_text() == "REQUEUED"]
    return [f"{name} None" for name in running] + [f"{p.stem} {p.read_text()}" for p in STATE.glob("*.pending")]


def main() -> None:
    command, args = sys.argv[1], sys.argv[2:]
    if command == "sbatch":
        sbatch(args[-1])
    elif command == "_task":
        _task(*args)
    elif command == "srun":
        srun(args)
    elif command == "squeue":
        print("\n".join(queue()))
    elif command == "scancel":
        for name in args:
            if (pending := STATE / f"{name}.pending").exists():
                pending.unlink()
                (STATE / f"{name}.state").write_text("CANCELLED by 0")
            else:
                _end(name, int((STATE / f"{name}.pgid").read_text()), "CANCELLED by 0")
    elif command == "scontrol" and args[0] == "requeue":  # submitit's requeue of a job at its time limit
        (STATE / f"{args[1]}.requeue").write_text("")
        _end(args[1], int((STATE / f"{args[1]}.pgid").read_text()), "REQUEUED")
    elif command == "sacct":
        if os.environ.get("FAKE_SLURM_ACCOUNTING") != "1":
            print("sacct: error: Slurm accounting storage is disabled", file=sys.stderr)
            sys.exit(1)
        name = args[args.index("-j") + 1]
        state = STATE / f"{name}.state"
        print(state.read_text() if state.exists() else "RUNNING")


if __name__ == "__main__":
    main()
