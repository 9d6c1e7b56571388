"""One run over several processes (trainer.devices = N): torch DistributedDataParallel on processes that
bnlab starts itself, inside the Hydra job, so that sweeps, joblib and SLURM launch such a run as any other.

The job's own process is rank 0: it keeps the run's record and alone writes (run folder, TensorBoard,
checkpoint, summary.json). `processes` starts ranks 1 to N-1, each in a new Python interpreter, that run
the same loop (bnlab.run.train) on a `Replica` of the model, on the gloo backend on CPU or nccl on CUDA
(one GPU per process). Every process draws the single-process batch order and takes its share of each
batch (rank r: examples r*B/N to (r+1)*B/N - 1 of a batch of B), DDP averages the gradients, and after
every step the running statistics are broadcast from rank 0 or averaged (trainer.sync_buffers) and the
training losses and accuracies summed over the processes. `ProcessGroup` holds the collectives the loop
needs: shares, sums, averages and the agreement to stop.

A process that dies, fails or stops answering ends the run with a `DistributedError` that names it: a
collective with a process that died fails at once, one that hangs fails after trainer.timeout_s, and
rank 0 then stops the others. One node only.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import pickle
import re
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, BinaryIO

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from bnlab.core.data import Dataset
from bnlab.core.norms import with_torch_sync_batch_norm
from bnlab.run.engine import Processes, Single, resolve_device
from bnlab.schema.config import TrainConfig

log = logging.getLogger(__name__)

BACKENDS = {"cpu": "gloo", "cuda": "nccl"}
HOST = "127.0.0.1"  # every process on this node: multi-node runs are out of scope
# DDP's switch for syncing buffers before every forward pass: forward_sync_buffers in recent torch, where the
# older name broadcast_buffers is deprecated
BUFFER_SYNC_OPTION = next(
    o
    for o in ("forward_sync_buffers", "broadcast_buffers")
    if o in inspect.signature(DistributedDataParallel).parameters
)
GRACE_S = 5.0  # seconds rank 0 gives a failing process to exit, so that the error can name it
JOINED = "bnlab/joined"  # store key prefix: rank r has reached rank 0's store


class DistributedError(RuntimeError):
    """The processes of a distributed run lost each other: one died, failed or stopped answering."""


class ProcessGroup(Processes):
    """The processes of a distributed run, with torch.distributed collectives over them. The stop flag
    goes over gloo (on CUDA a second, CPU group), so that agreeing on it never waits for a GPU."""

    def __init__(self, rank: int, size: int, device: torch.device) -> None:
        self.rank, self.size, self.device = rank, size, device
        self.control = dist.new_group(backend="gloo") if device.type == "cuda" else dist.group.WORLD

    def share(self, batch: Tensor) -> Tensor:
        return batch.tensor_split(self.size)[self.rank]

    def sum(self, t: Tensor) -> Tensor:
        dist.all_reduce(t)
        return t

    def average(self, tensors: list[Tensor]) -> None:
        self._flat(tensors, lambda flat: dist.all_reduce(flat.div_(self.size)))

    def broadcast(self, tensors: list[Tensor]) -> None:
        """Each tensor replaced by rank 0's."""
        self._flat(tensors, lambda flat: dist.broadcast(flat, src=0))

    def agree(self, requested: str | None) -> str | None:
        flag = torch.tensor([requested is not None], dtype=torch.int32)
        dist.all_reduce(flag, group=self.control)
        return requested or ("a stop on another process" if flag.item() else None)

    @staticmethod
    def _flat(tensors: list[Tensor], collective: Callable[[Tensor], Any]) -> None:
        """One collective over the tensors laid end to end (one dtype), the results copied back."""
        if not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        collective(flat)
        for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
            t.copy_(part.view_as(t))


class Replica(Single):
    """The engine of a distributed run on each of its processes: `Single`'s steps, on this process's share of
    each batch (its group's `share`), through the model wrapped in DDP, which averages the gradients; after
    each step the running statistics are made equal on every process (trainer.sync_buffers: rank 0's, as
    DDP's broadcast_buffers does before each forward pass, or their average) and the training loss (the
    mean over the processes' mean losses: the batch's mean) and correct count are reduced. Evaluation is
    shared among the processes (bnlab.run.engine.evaluate_shared)."""

    def __init__(
        self,
        cfg: TrainConfig,
        data: Dataset,
        device: torch.device,
        writer,
        checkpoint: dict | None,
        group: ProcessGroup,
    ) -> None:
        super().__init__(cfg, data, device, writer, checkpoint)
        self.group = group
        if device.type == "cuda":  # torch's SyncBatchNorm, same parameters: the optimizer keeps them
            self.model = with_torch_sync_batch_norm(self.model)
        device_ids = [device.index] if device.type == "cuda" else None
        no_buffer_sync = {BUFFER_SYNC_OPTION: False}  # the buffers are this engine's to sync, after each step
        self.net = DistributedDataParallel(self.model, device_ids=device_ids, **no_buffer_sync)
        self.buffers = [b for b in self.model.buffers() if b.is_floating_point()]  # running statistics
        self.sync_buffers = group.average if cfg.trainer.sync_buffers == "average" else group.broadcast

    def finish_step(self, loss: Tensor, correct: Tensor) -> tuple[Tensor, Tensor]:
        self.sync_buffers(self.buffers)
        totals = self.group.sum(torch.stack([loss, correct.to(loss.dtype)]))
        return (totals[:1] / self.group.size).float(), totals[1:]


# ---------------------------------------------------------------- the processes


def _connect(rank: int, size: int, store: dist.Store, device_name: str, timeout_s: float) -> ProcessGroup:
    """Join the process group as `rank` (every collective then times out after timeout_s)."""
    device = resolve_device(device_name, size, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=timeout_s)
    dist.init_process_group(BACKENDS[device.type], store=store, rank=rank, world_size=size, timeout=timeout)
    return ProcessGroup(rank, size, device)


def _start(rank: int, size: int, port: int, device_name: str, timeout_s: float, work, args: tuple) -> _Worker:
    """Rank `rank` in a fresh Python process: its arguments pickled to its stdin, its error (if any) written
    to a pipe of its own. A new interpreter, not multiprocessing: nothing of this process (threads, CUDA,
    Hydra, a joblib worker's start method, the __main__ module) is carried over."""
    read, write = os.pipe()
    command = [sys.executable, "-c", "from bnlab.run.distributed import _worker_main; _worker_main()"]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, pass_fds=(write,))
    os.close(write)
    with process.stdin:
        pickle.dump(sys.path, process.stdin)  # first: `work` is then found where this process found it
        pickle.dump((rank, size, port, device_name, timeout_s, write, work, args), process.stdin)
    return _Worker(rank, process, os.fdopen(read, "rb"))


def _worker_main() -> None:
    """The body of a rank > 0, as `_start` runs it: join the group and run `work(group, *args)`; a failure is
    written to rank 0's pipe and ends the process with exit code 1. The process ends as multiprocessing ends
    its own, without the interpreter's teardown, in which the threads of gloo's process group can abort."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches every process of the terminal: rank 0 stops them
    logging.getLogger().addHandler(logging.NullHandler())  # rank 0 logs and warns for the run
    warnings.simplefilter("ignore")
    sys.path[:] = pickle.load(sys.stdin.buffer)
    rank, size, port, device_name, timeout_s, errors, work, args = pickle.load(sys.stdin.buffer)
    code = 0
    try:
        store = dist.TCPStore(HOST, port, size, is_master=False, timeout=timedelta(seconds=timeout_s))
        store.set(f"{JOINED}/{rank}", "")
        work(_connect(rank, size, store, device_name, timeout_s), *args)
    except BaseException as e:
        with contextlib.suppress(OSError), os.fdopen(errors, "w") as pipe:
            pipe.write(f"{type(e).__name__}: {e}")
        code = 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


@dataclass
class _Worker:
    rank: int
    process: subprocess.Popen
    errors: BinaryIO  # what the process wrote before it failed
    error: str | None = None

    def fate(self) -> str | None:
        """How it ended, if it ended badly: killed by a signal, failed (its error), or a non-zero exit code."""
        code = self.process.poll()
        if code is None or code == 0:
            return None
        who = f"rank {self.rank} (pid {self.process.pid})"
        if code < 0:
            return f"{who} was killed by {signal.Signals(-code).name}"
        if self.error is None:
            self.error = self.errors.read().decode(errors="replace")  # its only writer has exited: no wait
        return f"{who} failed: {self.error}" if self.error else f"{who} exited with code {code}"


@contextlib.contextmanager
def processes(
    size: int, device_name: str, timeout_s: float, work: Callable[..., None], *args
) -> Iterator[ProcessGroup]:
    """Start ranks 1 to size-1, each running `work(group, *args)` in a fresh process, and join them as
    rank 0; the block runs rank 0's part. On leaving, the processes are waited for (after a clean end) or
    killed (after an error), and an error that a failing process caused is raised as a DistributedError
    naming it."""
    store = dist.TCPStore(HOST, 0, size, is_master=True, timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
    workers = [_start(rank, size, store.port, device_name, timeout_s, work, args) for rank in range(1, size)]
    pids = ", ".join(f"rank {w.rank}: pid {w.process.pid}" for w in workers)
    log.info("trainer.devices=%d: processes started (%s)", size, pids)
    try:
        _wait_for_joining(store, workers, size, timeout_s)
        yield _connect(0, size, store, device_name, timeout_s)
    except BaseException as e:
        error = _explain(e, workers, size, timeout_s)
        _end(workers, kill=True)
        if error is e:
            raise
        raise error from e
    else:
        _end(workers, kill=False, timeout_s=timeout_s)
        if fates := _fates(workers):
            raise DistributedError(f"trainer.devices={size}: {'; '.join(fates)}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        for w in workers:
            w.errors.close()


def _wait_for_joining(store: dist.Store, workers: list[_Worker], size: int, timeout_s: float) -> None:
    """Wait until every process has reached the store (rank 0 joining the group before them would wait out
    trainer.timeout_s for one that died starting up)."""
    deadline = time.monotonic() + timeout_s
    while not store.check([f"{JOINED}/{w.rank}" for w in workers]):
        if fates := _fates(workers):
            raise DistributedError(f"trainer.devices={size}: {'; '.join(fates)} before the run started")
        if time.monotonic() > deadline:
            raise DistributedError(f"trainer.devices={size}: the processes did not start within {timeout_s:g} s")
        time.sleep(0.05)


def _explain(error: BaseException, workers: list[_Worker], size: int, timeout_s: float) -> BaseException:
    """The error to raise for `error` on rank 0: a DistributedError naming the process that died or failed,
    or saying that they stopped answering; otherwise (rank 0's own error, Ctrl-C) the error itself."""
    if isinstance(error, DistributedError) or not isinstance(error, RuntimeError):  # collectives raise RuntimeErrors
        return error
    timed_out = "timed out" in str(error).lower()
    deadline = time.monotonic() + (0 if timed_out else GRACE_S)  # a process that hangs does not exit by itself
    while not (fates := _fates(workers)) and time.monotonic() < deadline:
        time.sleep(0.05)
    # gloo's message: "[path/to/source.cc:545] Read error [127.0.0.1]:38599: Connection reset by peer. This is ..."
    message = re.sub(r"^\[[^\]]*\]\s*", "", str(error).splitlines()[0] if str(error) else "")
    first_sentence = re.split(r"(?<=\.) ", message)[0][:300]
    detail = f"{type(error).__name__}: {first_sentence}"
    if fates:
        return DistributedError(f"trainer.devices={size}: {'; '.join(fates)}; the run stopped ({detail})")
    if timed_out:
        return DistributedError(
            f"trainer.devices={size}: a process stopped answering for trainer.timeout_s={timeout_s:g} s; "
            f"the run stopped ({detail})"
        )
    return error


def _fates(workers: list[_Worker]) -> list[str]:
    return [fate for w in workers if (fate := w.fate())]


def _end(workers: list[_Worker], kill: bool, timeout_s: float = 0.0) -> None:
    """Wait for the processes to exit (those still there after timeout_s are killed), or kill them."""
    for w in workers:
        if not kill:
            with contextlib.suppress(subprocess.TimeoutExpired):
                w.process.wait(timeout_s)
        if w.process.poll() is None:
            w.process.kill()
        w.process.wait()
