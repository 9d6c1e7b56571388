"""Where a result came from: `provenance.json` in every sweep (and single run) folder names the command,
the bnlab version and commit, the Python and torch versions, the machine, the device, the torch
thread count and the CPU's vector instructions that produced its numbers, and when and for how long it
ran. docs/results.md copies it into each section (scripts/record_result.py)."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import time
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any

from bnlab.record.files import read_json, write_json

FILE = "provenance.json"
invoked: list[str] | None = None  # the command as the user typed it, where it was not `bnlab train` (bnlab resume)


def commit() -> str | None:
    """The git commit of the bnlab source that runs (with '-dirty' for uncommitted changes), or None where
    it is not a git checkout (an installed wheel)."""
    source = Path(__file__).resolve().parents[1]  # the bnlab package folder

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(source), *args], capture_output=True, text=True, timeout=10)
        return done.stdout.strip() if done.returncode == 0 else ""

    try:
        head = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", "."))
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("-dirty" if dirty else "")) if head else None


def cpu_name() -> str:
    """The CPU's model name, with its family and model numbers (a VM may call every generation "AMD EPYC")."""
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().splitlines() if ":" in line)
    except OSError:
        return platform.processor() or platform.machine()
    info = {k.strip(): v.strip() for k, v in info.items()}
    name = info.get("model name", platform.machine())
    return f"{name} (family {info['cpu family']}, model {info['model']})" if "cpu family" in info else name


def cpu_kernels() -> str:
    """The vector instructions torch's CPU kernels use here (AVX2, AVX512, ...): float results depend on them
    in their last bits, as on the thread count. ATEN_CPU_CAPABILITY and MKL_ENABLE_INSTRUCTIONS lower them."""
    import torch  # here and below only where a record is written: reading one needs no torch

    return torch.backends.cpu.get_cpu_capability()


def device_name(device: str) -> str:
    """The device a run trains on, with the GPU's name (trainer.device=auto resolved as the trainer does)."""
    import torch

    if device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(0)})"
    if device in ("auto", "mps") and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def start(folder: Path, args: list[str], device: str, launcher: str, resumed: bool = False) -> None:
    """Write the folder's provenance.json as a run or sweep starts: `args`, those of `bnlab train`. A resume
    (`resumed`) of a folder that has one keeps it, the command that started the folder first, and appends what
    this invocation is to its `resumes`."""
    import torch

    command = " ".join(map(shlex.quote, invoked)) if invoked else " ".join(["bnlab", "train", *map(shlex.quote, args)])
    this = {
        "command": command,
        "bnlab_commit": commit(),
        "launcher": launcher,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "start_time": time.time(),
    }
    earlier = read_json(folder / FILE) if resumed and (folder / FILE).exists() else None
    if earlier and "command" in earlier:
        earlier.setdefault("resumes", []).append(this)
        write_json(folder / FILE, earlier)
        return
    machine = {
        "bnlab_version": version("bnlab"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}",
        "device": device_name(device),
        "cpu_kernels": cpu_kernels(),
    }
    write_json(folder / FILE, {**this, **machine})


def end(folder: Path, statuses: dict[str, int], threads: list[int]) -> dict[str, Any]:
    """Add to the folder's provenance.json when it ended, its wall time, its runs' statuses and the torch
    threads they trained with (one count, or each count that some run had); for a resume, when the resume
    ended and its wall time, and the statuses as they stand after it."""
    record = read_json(folder / FILE)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    invocation = record["resumes"][-1] if record.get("resumes") else record
    if "start_time" in invocation:
        invocation.update(ended=now, wall_time_s=round(time.time() - invocation.pop("start_time"), 1))
    record.update(runs=statuses, torch_threads=threads[0] if len(threads) == 1 else threads)  # per run, as resolved
    write_json(folder / FILE, record)
    return record
