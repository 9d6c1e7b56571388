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
rank 0 then stops the others.

Started by another launcher instead (torchrun, or `srun -n N`, on one node or several: bnlab.run.world), every
process runs `bnlab train` with the same arguments. Rank 0 goes through Hydra as a single run does and joins the
others when it trains (`joined`); the others skip Hydra and wait for it (`follow`), then run the same loop on
the config it sends them. Where rank 0 ends before it trains (a refused config, a completed run), it tells
them with what exit code (`leading`).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from bnlab.core.data import Dataset
from bnlab.core.norms import with_torch_sync_batch_norm
from bnlab.run.engine import Processes, Single, resolve_device
from bnlab.run.world import World
from bnlab.schema.config import TrainConfig

log = logging.getLogger(__name__)

BACKENDS = {"cpu": "gloo", "cuda": "nccl"}
HOST = "127.0.0.1"  # the processes bnlab starts itself are all on this node
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

    def __init__(self, rank: int, size: int, device: torch.device, mixed: bool = False) -> None:
        """`mixed`: the group was made with gloo for CPU tensors and nccl for CUDA ones (`_join`)."""
        self.rank, self.size, self.device = rank, size, device
        side = device.type == "cuda" and not mixed
        self.control = dist.new_group(backend="gloo") if side else dist.group.WORLD

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
    written to rank 0's pipe and ends the process with exit code 1 (`_exit`)."""
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
        _exit(code)


def _exit(code: int) -> NoReturn:
    """End a process of a run (not rank 0) as multiprocessing ends its own: without the interpreter's teardown,
    in which the threads of gloo's process group can abort."""
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
        error = _explain(e, lambda: _fates(workers), f"trainer.devices={size}", timeout_s)
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


def _explain(error: BaseException, fates: Callable[[], list[str]], who: str, timeout_s: float) -> BaseException:
    """The error to raise for `error` on rank 0: a DistributedError naming the process that died or failed
    (`fates()`: how each that ended badly ended), or saying that they stopped answering; otherwise (rank 0's
    own error, Ctrl-C) the error itself. `who`: the run's processes, as the message starts."""
    if isinstance(error, DistributedError) or not isinstance(error, RuntimeError):  # collectives raise RuntimeErrors
        return error
    timed_out = "timed out" in str(error).lower()
    deadline = time.monotonic() + (0 if timed_out else GRACE_S)  # a process that hangs does not exit by itself
    while not (ended := fates()) and time.monotonic() < deadline:
        time.sleep(0.05)
    # gloo's message: "[path/to/source.cc:545] Read error [127.0.0.1]:38599: Connection reset by peer. This is ..."
    message = re.sub(r"^\[[^\]]*\]\s*", "", str(error).splitlines()[0] if str(error) else "")
    first_sentence = re.split(r"(?<=\.) ", message)[0][:300]
    detail = f"{type(error).__name__}: {first_sentence}"
    if ended:
        return DistributedError(f"{who}: {'; '.join(ended)}; the run stopped ({detail})")
    if timed_out:
        return DistributedError(
            f"{who}: a process stopped answering for trainer.timeout_s={timeout_s:g} s; the run stopped ({detail})"
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


# ---------------------------------------------------------------- processes another launcher started

JOIN_TIMEOUT_S = 300.0  # how long ranks > 0 wait for rank 0 to reach training (its checks, loading its data)
_told: list[bool] = []  # rank 0 has sent the others their work or their exit code


def _join(world: World, timeout_s: float) -> bool:
    """Join the process group of torchrun's or srun's processes; True where it has gloo for CPU tensors and
    nccl for CUDA ones (a machine with GPUs: the stop flag and the objects below then go over gloo)."""
    mixed = torch.cuda.is_available()
    backend = "cpu:gloo,cuda:nccl" if mixed else "gloo"
    timeout = timedelta(seconds=timeout_s)
    if world.by == "torchrun":  # torchrun's agent keeps the store at MASTER_ADDR:MASTER_PORT
        dist.init_process_group(backend, init_method="env://", timeout=timeout)
    else:  # srun starts no store: rank 0 keeps it
        store = dist.TCPStore(world.addr, world.port, world.size, is_master=world.rank == 0, timeout=timeout)
        dist.init_process_group(backend, store=store, rank=world.rank, world_size=world.size, timeout=timeout)
    return mixed


def _tell(message: tuple) -> None:
    """Rank 0 sends the others `message`: ("train", trainer.device, work, args) or ("exit", code, None, ())."""
    dist.broadcast_object_list([message], src=0)
    _told.append(True)


@contextlib.contextmanager
def joined(
    world: World, device_name: str, timeout_s: float, work: Callable[..., None], *args
) -> Iterator[ProcessGroup]:
    """Rank 0 of torchrun's or srun's processes: join them, send each `work(group, *args)` to run, and run
    the block as rank 0's part. An error in a collective is raised as a DistributedError that names the
    processes on this node that ended (those on other nodes: their launcher names them)."""
    mixed = _join(world, timeout_s)
    who = f"{world.by} with {world.size} processes"
    peers: list = [None] * world.size
    try:
        _tell(("train", device_name, work, args))
        dist.all_gather_object(peers, (socket.gethostname(), os.getpid()))
        shown = ", ".join(f"rank {r}: pid {pid} on {host}" for r, (host, pid) in enumerate(peers) if r)
        log.info("%s: the processes joined (%s)", who, shown)
        device = resolve_device(device_name, world.size, world.rank)
        yield ProcessGroup(world.rank, world.size, device, mixed)
    except BaseException as e:
        error = _explain(e, lambda: _ended_peers(peers), who, timeout_s)
        if error is e:
            raise
        raise error from e
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _ended_peers(peers: list) -> list[str]:
    """The processes of this node (hostname, pid per rank) that are no longer there."""
    here = socket.gethostname()
    return [f"rank {r} (pid {p[1]}) ended" for r, p in enumerate(peers) if r and p and p[0] == here and _gone(p[1])]


def _gone(pid: int) -> bool:
    """The process has exited (a zombie that its launcher has yet to reap counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:  # no /proc (macOS): it is there
        return False


@contextlib.contextmanager
def leading(world: World) -> Iterator[None]:
    """Around rank 0's whole command: where it ends without having sent the others their work (its config
    refused, its run already completed, an error before training), they are told its exit code, and end too."""
    code = 1
    try:
        yield
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        raise
    except KeyboardInterrupt:
        code = 130
        raise
    finally:
        if not _told:
            with contextlib.suppress(Exception):
                _join(world, JOIN_TIMEOUT_S)
                _tell(("exit", code, None, ()))
                dist.destroy_process_group()


def follow(world: World) -> None:
    """Ranks > 0 of torchrun's or srun's processes: join rank 0, run the work it sends (or end with its exit
    code) and exit (`_exit`). Rank 0 logs and writes for the run; a failure here is one line on stderr, exit
    code 1."""
    logging.getLogger().addHandler(logging.NullHandler())
    warnings.simplefilter("ignore")
    code = 0
    try:
        mixed = _join(world, JOIN_TIMEOUT_S)
        message: list = [None]
        dist.broadcast_object_list(message, src=0)
        what, value, work, args = message[0]
        if what == "exit":
            code = value
        else:
            dist.all_gather_object([None] * world.size, (socket.gethostname(), os.getpid()))
            device = resolve_device(value, world.size, world.rank)
            work(ProcessGroup(world.rank, world.size, device, mixed), *args)
    except KeyboardInterrupt:
        code = 130
    except BaseException as e:
        print(f"bnlab: {world.name} failed: {type(e).__name__}: {e}", file=sys.stderr)
        code = 1
    finally:
        _exit(code)
