"""The processes that another launcher started for one run: torchrun (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT, set by torch's launcher on every node) or a SLURM job step of
several tasks (`srun -n N`: SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID and the first node of
SLURM_STEP_NODELIST as the address of rank 0). bnlab.run.distributed joins them; no torch here, since the
command reads this before anything imports torch."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

# The port rank 0 listens on under srun when MASTER_PORT is not set: one per job (SLURM_JOB_ID), so that two
# jobs sharing a node do not meet, in a range that Linux does not hand out as ephemeral ports.
SRUN_PORTS = (15000, 10000)  # first port, how many


@dataclass(frozen=True)
class World:
    """This process's place among the processes that train one run together."""

    rank: int
    size: int
    local_rank: int  # on this node: the GPU it trains on
    addr: str  # rank 0's host, where the processes meet
    port: int
    by: str  # "torchrun" or "srun": what started them, for messages

    @property
    def name(self) -> str:
        return f"{self.by} (rank {self.rank} of {self.size})"


def world(env: os._Environ | dict[str, str] = os.environ) -> World | None:
    """The World this process belongs to, or None where no launcher started several processes for the run
    (a plain command, a single-task SLURM job such as a submitit job, torchrun with one process)."""
    if int(env.get("WORLD_SIZE", "1")) > 1 and "RANK" in env:
        return World(
            rank=int(env["RANK"]),
            size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", "0")),
            addr=env.get("MASTER_ADDR", "127.0.0.1"),
            port=int(env.get("MASTER_PORT", "29500")),
            by="torchrun",
        )
    # SLURM_STEP_NUM_TASKS is set by srun for its step only: the batch script itself, which SLURM also runs
    # with SLURM_NTASKS=N and SLURM_PROCID=0, is one process.
    tasks = int(env.get("SLURM_STEP_NUM_TASKS", "1"))
    if tasks > 1 and "SLURM_PROCID" in env:
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
        first, span = SRUN_PORTS
        return World(
            rank=int(env["SLURM_PROCID"]),
            size=tasks,
            local_rank=int(env.get("SLURM_LOCALID", "0")),
            addr=env.get("MASTER_ADDR") or first_node(nodes) or "127.0.0.1",
            port=int(env.get("MASTER_PORT") or first + int(env.get("SLURM_JOB_ID", "0")) % span),
            by="srun",
        )
    return None


def first_node(nodelist: str) -> str:
    """The first host of a SLURM host list ("gpu[03-05,9],cpu1" -> "gpu03"), as `scontrol show hostnames`
    would list it first."""
    head = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?([^,]*)", nodelist)
    if head is None:
        return ""
    prefix, ranges, suffix = head.groups()
    if not ranges:
        return prefix + suffix
    return prefix + re.split(r"[-,]", ranges)[0] + suffix


def local_processes(env: os._Environ | dict[str, str] = os.environ) -> int:
    """How many of the run's processes torchrun started on this node, sharing its cores (srun gives each task
    its own: SLURM_CPUS_PER_TASK)."""
    return int(env.get("LOCAL_WORLD_SIZE", "1")) if "RANK" in env else 1
