"""One run over several processes (trainer.devices = N): torch DistributedDataParallel on processes that
bnlab starts itself, inside the Hydra job, so that sweeps, joblib and SLURM launch such a run as any other.

The job's own process is rank 0: it keeps the run's record and alone writes (run folder, TensorBoard,
checkpoint, summary.json). `processes` starts ranks 1 to N-1 as fresh Python processes (spawn) that run
the same loop (bnlab.train) on a `Replica` of the model, on the gloo backend on CPU or nccl on CUDA
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
import multiprocessing as mp
import re
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from bnlab.config import TrainConfig
from bnlab.data import Dataset
from bnlab.engine import Group, Single, autocast, evaluate_shared, resolve_device
from bnlab.norms import with_torch_sync_batch_norm

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


class DistributedError(RuntimeError):
    """The processes of a distributed run lost each other: one died, failed or stopped answering."""


class ProcessGroup(Group):
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
    """The engine of a distributed run on each of its processes: the run's model wrapped in DDP, each step
    on this process's share of the run's batch, the training loss (the mean over the processes' mean
    losses: the batch's mean) and correct count reduced, the running statistics made equal on every
    process after each step (trainer.sync_buffers: rank 0's, as DDP's broadcast_buffers does before each
    forward pass, or their average) and the evaluation shared among the processes."""

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

    def step(self, step: int) -> tuple[Tensor, Tensor]:
        idx = self.group.share(next(self.order))
        x, y = self.data.train_x[idx], self.data.train_y[idx]
        with autocast(self.cfg.trainer, self.device):
            logits = self.net(x)
            loss = F.cross_entropy(logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.sync_buffers(self.buffers)
        totals = self.group.sum(torch.stack([loss.detach(), (logits.argmax(1) == y).sum().to(loss.dtype)]))
        return (totals[:1] / self.group.size).float(), totals[1:]

    def evaluate(self) -> list[tuple[float, float]]:
        with autocast(self.cfg.trainer, self.device):
            return [evaluate_shared(self.group, self.model, self.data.test_x, self.data.test_y)]


# ---------------------------------------------------------------- the processes


def _connect(rank: int, size: int, store: dist.Store, device_name: str, timeout_s: float) -> ProcessGroup:
    """Join the process group as `rank` (every collective then times out after timeout_s)."""
    device = resolve_device(device_name, size, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=timeout_s)
    dist.init_process_group(BACKENDS[device.type], store=store, rank=rank, world_size=size, timeout=timeout)
    return ProcessGroup(rank, size, device)


def _worker(
    rank: int, size: int, port: int, device_name: str, timeout_s: float, errors: Connection, work, args: tuple
) -> None:
    """The body of rank `rank` > 0: join the group, run `work(group, *args)`; a failure is sent to rank 0."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches every process of the terminal: rank 0 stops them
    logging.getLogger().addHandler(logging.NullHandler())  # rank 0 logs and warns for the run
    warnings.simplefilter("ignore")
    try:
        store = dist.TCPStore(HOST, port, size, is_master=False, timeout=timedelta(seconds=timeout_s))
        work(_connect(rank, size, store, device_name, timeout_s), *args)
    except BaseException as e:
        with contextlib.suppress(OSError):
            errors.send(f"{type(e).__name__}: {e}")
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@dataclass
class _Worker:
    rank: int
    process: mp.process.BaseProcess
    errors: Connection  # what the process sends if it fails

    def fate(self) -> str | None:
        """How it ended, if it ended badly: killed by a signal, failed (its error), or a non-zero exit code."""
        code = self.process.exitcode
        if code is None or code == 0:
            return None
        who = f"rank {self.rank} (pid {self.process.pid})"
        if code < 0:
            return f"{who} was killed by {signal.Signals(-code).name}"
        with contextlib.suppress(EOFError, OSError):
            if self.errors.poll():
                return f"{who} failed: {self.errors.recv()}"
        return f"{who} exited with code {code}"


@contextlib.contextmanager
def processes(
    size: int, device_name: str, timeout_s: float, work: Callable[..., None], *args
) -> Iterator[ProcessGroup]:
    """Start ranks 1 to size-1, each running `work(group, *args)` in a fresh process, and join them as
    rank 0; the block runs rank 0's part. On leaving, the processes are joined (after a clean end) or
    killed (after an error), and an error that a failing process caused is raised as a DistributedError
    naming it."""
    store = dist.TCPStore(HOST, 0, size, is_master=True, timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
    context = mp.get_context("spawn")  # a fresh interpreter: no forked threads, CUDA or Hydra state
    workers = []
    for rank in range(1, size):
        receive, send = context.Pipe(duplex=False)
        args_ = (rank, size, store.port, device_name, timeout_s, send, work, args)
        process = context.Process(target=_worker, args=args_, name=f"bnlab-rank-{rank}")
        process.start()
        send.close()
        workers.append(_Worker(rank, process, receive))
    pids = ", ".join(f"rank {w.rank}: pid {w.process.pid}" for w in workers)
    log.info("trainer.devices=%d: %s processes started (%s)", size, BACKENDS.get(device_name, device_name), pids)
    try:
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


def _explain(error: BaseException, workers: list[_Worker], size: int, timeout_s: float) -> BaseException:
    """The error to raise for `error` on rank 0: a DistributedError naming the process that died or failed,
    or saying that they stopped answering; otherwise (rank 0's own error, Ctrl-C) the error itself."""
    if not isinstance(error, RuntimeError):  # collectives fail with RuntimeErrors
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
            w.process.join(timeout_s)
        if w.process.is_alive():
            w.process.kill()
        w.process.join()
