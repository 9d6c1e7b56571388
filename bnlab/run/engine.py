"""What one training step needs: the device and the data on it, the model in its precision and memory
format, the batch order, the step itself and the test evaluation.

An engine trains one or more runs that share every step: `Single` one model; `bnlab.run.fused.engine.Fused` N
runs stacked into one model; `bnlab.run.distributed.Replica` one model on each process of a distributed
run. They hand back per-member device tensors that nobody has read yet, so the loop in bnlab/run/train.py
decides when to synchronise with the device. An engine's `Processes` is the processes it trains on: one
(`LOCAL`) or several (bnlab.run.distributed), each taking its share of every batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from bnlab.core.data import TASKS, Dataset, Task, load_data, shape
from bnlab.core.models import Unit, build_model
from bnlab.core.optim import build_optimizer, schedule_lr
from bnlab.run.diagnostics import DiagnosticLog
from bnlab.run.threads import auto_threads
from bnlab.run.world import world
from bnlab.schema.config import ConfigError, TrainConfig, TrainerConfig

log = logging.getLogger(__name__)

# What the layer outputs of one evaluation pass may take: the MLP's whole MNIST test set, about 500 examples of
# the CNN (whose activations then stay in the CPU's caches, faster than larger passes there).
EVAL_BYTES = 128 * 2**20


# ---------------------------------------------------------------- the device and the data


def resolve_device(name: str, devices: int = 1, rank: int = 0) -> torch.device:
    """trainer.device: auto picks cuda, then mps, then cpu; a named device must exist here. A run over
    several processes (trainer.devices) trains on CPUs or on one GPU per process, rank r on cuda:r (under
    torchrun or srun: the process's rank on its node)."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if name == "auto":
        name = next(d for d, ok in available.items() if ok)
    if not available[name]:
        here = ", ".join(["auto", *(d for d, ok in available.items() if ok)])
        raise ConfigError(f"trainer.device={name!r} is not available on this machine; accepted values here: {here}.")
    if devices == 1 or name == "cpu":
        return torch.device(name)
    if name != "cuda":
        raise ConfigError(
            f"trainer.device={name!r} is not accepted with trainer.devices={devices}; accepted values: cpu, cuda."
        )
    if (launched := world()) is not None:  # torchrun's or srun's processes: the GPU of the process's rank on its node
        if torch.cuda.device_count() <= launched.local_rank:
            raise ConfigError(
                f"{launched.name} has local rank {launched.local_rank}, but this node has "
                f"{torch.cuda.device_count()} GPUs: start at most one process per GPU on each node."
            )
        return torch.device("cuda", launched.local_rank)
    if torch.cuda.device_count() < devices:
        raise ConfigError(
            f"trainer.devices={devices} is not accepted with trainer.device=cuda; accepted values here: 1 to "
            f"{torch.cuda.device_count()}, the GPUs this machine has (one process per GPU)."
        )
    return torch.device("cuda", rank)


_FLOPS: dict[str, float] = {}  # step_flops by model, norm and data: counted once per process


def step_flops(cfg: TrainConfig) -> float:
    """FLOPs of one training step of cfg's model at its batch size (each process's share in a distributed
    run), forward and backward, as torch.utils.flop_counter counts them: matrix products, convolutions and
    attention, not the elementwise work of norms and activations. Counted on two examples (batch norm needs
    more than one) of a copy built on the CPU in train mode; inf where the model cannot be built. The
    counter imports torch's compiler (1.5 s), once per process."""
    key = repr((cfg.model, cfg.norm, cfg.data, cfg.trainer.devices))
    if key not in _FLOPS:
        from torch.utils.flop_counter import FlopCounterMode

        try:
            in_shape, classes = shape(cfg.data)
            with torch.random.fork_rng(devices=[]):  # building draws weights: keep the RNG as it was
                model = build_model(cfg, in_shape, classes).train()
            with FlopCounterMode(display=False) as counter:
                model(torch.zeros(2, *in_shape)).float().sum().backward()
            _FLOPS[key] = counter.get_total_flops() / 2 * cfg.data.batch_size / cfg.trainer.devices
        except Exception:
            _FLOPS[key] = math.inf
    return _FLOPS[key]


def thread_count(cfgs: list[TrainConfig], cores: int) -> int:
    """The torch threads of each process of these runs (one run, or a fused group of them): trainer.threads
    as set, or for auto (bnlab.run.threads) from the work of a step of all of them on the cores they may use."""
    t = cfgs[0].trainer
    if t.threads != "auto":
        return int(t.threads)
    here = 1 if world() else t.devices  # processes of the run that share `cores` (another launcher's: not)
    return auto_threads(step_flops(cfgs[0]) * len(cfgs), max(1, cores // here))


def prepare(cfg: TrainConfig, rank: int = 0) -> tuple[torch.device, Dataset]:
    """The process set up as trainer.* asks (trainer.threads resolved to a count: `thread_count`;
    deterministic kernels), the device (of process `rank` in a distributed run), and the whole dataset on it
    in the precision and memory format the run trains in (`shared_data`)."""
    t = cfg.trainer
    if t.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    torch.set_num_threads(t.threads)
    device = resolve_device(t.device, t.devices, rank)
    data = shared_data(cfg, device)
    if cfg.data.batch_size > len(data.train_y):
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} is not accepted; accepted values: at most the "
            f"{len(data.train_y)} training examples of data={cfg.data.name}."
        )
    return device, data


_DATASETS: OrderedDict[tuple, Dataset] = OrderedDict()  # this process's datasets as runs train on them, newest last
KEEP_DATASETS = 2  # how many of them a process keeps for its next jobs (MNIST in float32: 0.2 GB)


def shared_data(cfg: TrainConfig, device: torch.device) -> Dataset:
    """The dataset as the run trains on it (on `device`, in trainer.precision's dtype and trainer.channels_last's
    memory format), loaded once per process: every later job of a sweep that asks for the same data gets the
    same tensors, in a Dataset object of its own. They are inference tensors: torch raises an error at any
    in-place change to them, and a job that ends with an error has its process `forget_shared_data`, so no
    job sees what another one did to them."""
    data_keys = {k: v for k, v in asdict(cfg.data).items() if k not in ("batch_size", "download")}
    key = (json.dumps(data_keys, sort_keys=True), str(device), cfg.trainer.precision, cfg.trainer.channels_last)
    if key in _DATASETS:
        _DATASETS.move_to_end(key)
    else:
        with torch.inference_mode():
            data = load_data(cfg.data, device)
            for name in ("train_x", "test_x"):
                x = getattr(data, name)
                x = x.double() if cfg.trainer.precision == "fp64" else x
                setattr(data, name, x.contiguous(memory_format=torch.channels_last) if cfg.trainer.channels_last else x)
        _DATASETS[key] = data
        while len(_DATASETS) > KEEP_DATASETS:
            _DATASETS.popitem(last=False)
    return dataclasses.replace(_DATASETS[key])


def forget_shared_data() -> None:
    """Drop the datasets this process keeps: the next job loads its own again."""
    _DATASETS.clear()


def batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Index tensors of `batch_size` examples; every epoch a new random permutation, the remainder dropped."""
    while True:
        perm = torch.randperm(n, generator=generator, device=generator.device)
        for start in range(0, n - batch_size + 1, batch_size):
            yield perm[start : start + batch_size]


def skip(order: Iterator[Tensor], steps: int) -> None:
    """Advance a batch order past the batches of `steps` steps (a resumed run goes on where it stopped)."""
    for _ in range(steps):
        next(order)


# ---------------------------------------------------------------- numerics


def autocast(t: TrainerConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """trainer.precision=bf16: matmuls and convolutions in bfloat16 (otherwise a context that costs nothing)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if t.precision == "bf16" else contextlib.nullcontext()


def _float32_inputs(module: nn.Module, args: tuple) -> tuple:
    return tuple(a.float() for a in args)


def prepare_model(model: nn.Module, t: TrainerConfig, device: torch.device) -> nn.Module:
    """The model on `device` in the dtype, memory format and form that trainer.precision, .channels_last
    and .compile ask for; with bf16 every norm layer gets float32 inputs, so its statistics stay float32."""
    model = model.to(device=device, dtype=torch.float64 if t.precision == "fp64" else torch.float32)
    if t.precision == "bf16":
        for unit in (m for m in model.modules() if isinstance(m, Unit)):
            unit.norm.register_forward_pre_hook(_float32_inputs)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if t.compile:
        model.compile()
    return model


def member_scores(task: Task, outputs: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Each member's mean loss (N,) and count of correct predictions (N,; 0 where the task has no accuracy)
    from outputs (N, B, K) and targets (N, B, ...); a fused loss is the sum of the losses."""
    n, b, k = outputs.shape
    flat_out, flat_y = outputs.reshape(n * b, k), y.reshape(n * b, *y.shape[2:])
    losses = task.loss(flat_out, flat_y).view(n, b).mean(1)
    if task.correct is None:
        return losses, torch.zeros(n, dtype=torch.long, device=outputs.device)
    return losses, task.correct(flat_out, flat_y).view(n, b).sum(1)


def run_scores(task: Task, outputs: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """member_scores of one run's outputs (B, K), as scalars, in as few ops as give the same numbers: each op
    and its autograd node cost a few microseconds, a tenth of an MLP's step on a CPU."""
    right = task.correct(outputs, y).sum() if task.correct else torch.zeros((), dtype=torch.long, device=y.device)
    return task.mean_loss(outputs, y), right


def forward_backward(
    scores: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]], x: Tensor, y: Tensor, passes: int, dim: int = 0
) -> tuple[Tensor, Tensor]:
    """One step's forward and backward: `scores(x, y)` gives the loss (a run's, or each member's) and the count
    of correct predictions, and the gradient of the (summed) loss is accumulated. trainer.accumulate splits
    the examples along `dim` into `passes` equal micro-batches, each loss weighted by its share of the
    examples, so the gradients add up to the whole batch's; a norm still sees one micro-batch at a time
    (batch statistics over fewer examples; LayerNorm's output is the same). Returns the step's loss and
    counts, detached."""
    if passes == 1:  # one pass: no weighting op (each op costs a few microseconds of a small model's step)
        loss, correct = scores(x, y)
        (loss.sum() if loss.dim() else loss).backward()
        return loss.detach(), correct
    total, right = 0.0, 0
    for xs, ys in zip(x.chunk(passes, dim), y.chunk(passes, dim)):
        loss, correct = scores(xs, ys)
        share = xs.shape[dim] / x.shape[dim]
        ((loss.sum() if loss.dim() else loss) * share).backward()
        total, right = total + loss.detach() * share, right + correct
    return total, right


def examples_per_pass(model: nn.Module, x: Tensor, members: int = 1) -> int:
    """How many of x's examples one evaluation pass of `model` (of `members` fused members) takes: as many as
    keep the outputs of all its layers within EVAL_BYTES, or on a GPU within a quarter of its free memory."""
    probe = x[:2]  # two examples: a norm over one value per group (group norm of width 1) refuses a single one
    sizes = [probe.numel() * x.element_size()]
    layers = [m for m in model.modules() if next(m.children(), None) is None]
    hooks = [m.register_forward_hook(lambda m, i, out: sizes.append(out.numel() * out.element_size())) for m in layers]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()
            model(probe if members == 1 else probe.unsqueeze(0))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    budget = torch.cuda.mem_get_info(x.device)[0] // 4 if x.device.type == "cuda" else EVAL_BYTES
    return max(1, budget * len(probe) // sum(sizes))


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    task: Task = TASKS["classification"],
    members: int = 1,
    chunk: int | None = None,
    train_mode: bool = False,
) -> Tensor:
    """Per member, the mean loss and the accuracy (0 where the task has none) over (x, y) as a (members, 2)
    tensor on the device, unread: `chunk` examples per member at a time (None: `examples_per_pass`), every
    member in each pass, in eval mode (running statistics) or, with `train_mode`, in train mode (each chunk's
    own batch statistics, which also moves the running statistics); the mode is restored after.

    An ordinary model (members = 1) takes the examples (B, ...); a fused model of N members takes them
    once for all members, (1, B, ...), and returns (N, B, outputs)."""
    size = chunk or examples_per_pass(model, x, members)
    was_training = model.training
    model.train(train_mode)
    sums = torch.zeros(members, 2, device=x.device, dtype=torch.float64)  # loss, correct
    for start in range(0, len(x), size):
        xc, yc = x[start : start + size], y[start : start + size]
        outputs = model(xc if members == 1 else xc.unsqueeze(0)).view(members, len(yc), -1)
        losses, right = member_scores(task, outputs, yc.expand(members, *yc.shape))
        sums[:, 0] += losses * len(yc)
        sums[:, 1] += right
    model.train(was_training)
    return sums / len(x)


class Processes:
    """The processes that train one run together: this one alone (`LOCAL`), or those of a distributed run
    (bnlab.run.distributed.ProcessGroup, whose methods are collectives). Rank 0 is the one that writes."""

    rank, size = 0, 1

    def share(self, batch: Tensor) -> Tensor:
        """This process's part of a batch (dim 0): rank r of N takes the r-th of N equal slices."""
        return batch

    def sum(self, t: Tensor) -> Tensor:
        """t summed over the processes, in place."""
        return t

    def average(self, tensors: list[Tensor]) -> None:
        """Each tensor replaced by its mean over the processes."""

    def agree(self, requested: str | None) -> str | None:
        """The stop asked for on any process (Ctrl-C, SIGTERM): every process stops at the same step."""
        return requested


LOCAL = Processes()


def evaluate_shared(
    group: Processes,
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    task: Task = TASKS["classification"],
    chunk: int | None = None,
    train_mode: bool = False,
) -> Tensor:
    """`evaluate` of an ordinary model over (x, y) by the processes of `group`, as a (1, 2) tensor: each
    takes its share of every chunk, as of a training batch, and the sums are reduced, so every process gets
    the whole set's loss and accuracy. In train mode a final chunk with fewer examples than processes is
    left out (some process would have none, and a synchronized norm needs every process in every pass)."""
    if group.size == 1:
        return evaluate(model, x, y, task, chunk=chunk, train_mode=train_mode)
    chunk = chunk or examples_per_pass(model, x)
    chunks = torch.arange(len(x), device=x.device).split(chunk)
    if train_mode and len(chunks[-1]) < group.size:
        chunks = chunks[:-1]
    idx = torch.cat([group.share(c) for c in chunks])
    mean = evaluate(model, x[idx], y[idx], task, chunk=-(-chunk // group.size), train_mode=train_mode)[0]
    count = torch.tensor([len(idx)], dtype=torch.float64, device=x.device)
    totals = group.sum(torch.cat([mean * len(idx), count]))
    return (totals[:2] / totals[2]).view(1, 2)


# ---------------------------------------------------------------- engines


class Engine(Protocol):
    """What the training loop drives: `members` runs that take every step together."""

    members: int
    model: nn.Module
    group: Processes  # the processes it trains on

    def step(self, step: int) -> tuple[Tensor, Tensor]:
        """Train one step; each member's loss and count of correct predictions (N,), on the device, unread."""

    def evaluate(self) -> Tensor:
        """Each member's test loss and test accuracy (members, 2), on the device, unread."""

    def lrs(self) -> list[float]:
        """Each member's learning rate in the last step (optim.schedule applied)."""

    def member_state(self, n: int) -> dict[str, Any]:
        """Member n's model and optimizer state, as its checkpoint keeps them."""

    def member_model(self, n: int) -> nn.Module:
        """Member n as an ordinary model."""


class Single:
    """The engine of an ordinary run: one model, its optimizer, its batch order and its diagnostics."""

    members, group = 1, LOCAL

    def __init__(self, cfg: TrainConfig, data: Dataset, device: torch.device, writer, checkpoint: dict | None) -> None:
        self.cfg, self.data, self.device = cfg, data, device
        torch.manual_seed(cfg.seed)
        self.model = prepare_model(build_model(cfg, data.in_shape, data.num_classes), cfg.trainer, device)
        self.net = self.model  # what a step calls (a Replica's: the model wrapped in DDP)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
        self.order = batches(len(data.train_y), cfg.data.batch_size, generator)
        probe = data.test_x[: cfg.diag.probe]
        self.diagnostics = DiagnosticLog(cfg.diag, self.model, writer, probe, lambda: self.lrs()[0], data.task)
        parameters = sum(p.numel() for p in self.model.parameters())
        log.info("%s: %s, %d parameters, %d training examples", cfg.model.name, device, parameters, len(data.train_y))
        if checkpoint:
            self.model.load_state_dict(checkpoint["model"])
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            skip(self.order, checkpoint["step"])

    def step(self, step: int) -> tuple[Tensor, Tensor]:
        idx = self.group.share(next(self.order))
        x, y = self.data.train_x.index_select(0, idx), self.data.train_y.index_select(0, idx)  # faster than x[idx]
        self.optimizer.zero_grad(set_to_none=True)
        loss, correct = forward_backward(self.scores, x, y, self.cfg.trainer.accumulate)
        schedule_lr(self.optimizer, self.cfg.optim, step, self.cfg.trainer.max_steps)
        due = self.diagnostics.due(step)
        if due:  # at the step's weights and gradients, before the update
            self.diagnostics.before_step(step, x, y)
        self.optimizer.step()
        if due:
            self.diagnostics.after_step(step, x, y)
        return self.finish_step(loss, correct)

    def scores(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        with autocast(self.cfg.trainer, self.device):
            return run_scores(self.data.task, self.net(x), y)

    def finish_step(self, loss: Tensor, correct: Tensor) -> tuple[Tensor, Tensor]:
        """After the update: the step's loss and count of correct predictions as the loop reads them (a
        Replica's summed over the processes, once their running statistics are made equal)."""
        return loss.float().view(1), correct.view(1)

    def evaluate(self) -> Tensor:
        with autocast(self.cfg.trainer, self.device):
            return evaluate_shared(self.group, self.model, self.data.test_x, self.data.test_y, self.data.task)

    def lrs(self) -> list[float]:
        return [self.optimizer.param_groups[0]["lr"]]

    def member_state(self, n: int) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def member_model(self, n: int) -> nn.Module:
        return self.model
