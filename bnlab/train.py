"""The training loop: a run (or a fused group of runs), its TensorBoard curves and its summary.json.

The whole dataset sits on the device as tensors; each step indexes it with a slice of a random
permutation. The training loss and accuracy stay on the device until they are read, every
`trainer.log_every` steps (one host synchronisation); test evaluation runs every `trainer.eval_every`
steps in eval mode (running statistics) and feeds the iterations-to-threshold record. One loop, `_fit`,
drives an engine: `Single` trains one model, `bnlab.fused.Fused` N runs stacked into one model; every
run keeps its own `Run` record, TensorBoard writer and directory either way.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import resource
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from bnlab.config import ConfigError, TrainConfig, TrainerConfig, flatten, validate
from bnlab.data import Dataset, load_data
from bnlab.diagnostics import DiagnosticLog, precise_bn
from bnlab.files import read_json, write_json, write_torch
from bnlab.metrics import Thresholds
from bnlab.models import Unit, build_model
from bnlab.optim import build_optimizer

log = logging.getLogger(__name__)

EVAL_CHUNK = 500  # examples per forward pass during evaluation (a CNN's activations then stay in the CPU cache)
CHECKPOINT = "checkpoint.pt"  # in the run directory: model, optimizer, RNG and the run's record so far


def resolve_device(name: str) -> torch.device:
    """trainer.device: auto picks cuda, then mps, then cpu; a named device must exist here."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if name == "auto":
        return torch.device(next(d for d, ok in available.items() if ok))
    if not available[name]:
        here = ", ".join(["auto", *(d for d, ok in available.items() if ok)])
        raise ConfigError(f"trainer.device={name!r} is not available on this machine; accepted values here: {here}.")
    return torch.device(name)


def batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Index tensors of `batch_size` examples; every epoch a new random permutation, the remainder dropped."""
    while True:
        perm = torch.randperm(n, generator=generator, device=generator.device)
        for start in range(0, n - batch_size + 1, batch_size):
            yield perm[start : start + batch_size]


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = EVAL_CHUNK, train_mode: bool = False
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over (x, y), `chunk` examples at a time, in eval mode (running
    statistics) or, with `train_mode`, in train mode (each chunk's own batch statistics, which also
    moves the running statistics); the model's mode is restored after."""
    was_training = model.training
    model.train(train_mode)
    loss_sum = torch.zeros((), device=x.device, dtype=x.dtype)
    correct = torch.zeros((), device=x.device)
    for start in range(0, len(x), chunk):
        logits = model(x[start : start + chunk])
        target = y[start : start + chunk]
        loss_sum += F.cross_entropy(logits, target, reduction="sum")
        correct += (logits.argmax(1) == target).sum()
    model.train(was_training)
    return loss_sum.item() / len(x), correct.item() / len(x)


def peak_memory_mb(device: str) -> dict[str, float]:
    """Peak resident memory of this process (host) and, on a CUDA device, peak allocated GPU memory, in MiB."""
    peak = {"host": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}  # ru_maxrss: KiB on Linux
    if device.startswith("cuda"):
        peak["gpu"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return peak


class Run:
    """One run's record: its directory, TensorBoard writer, threshold crossings, the training metrics since
    the last evaluation and since the last TensorBoard point, and what becomes summary.json at the end."""

    def __init__(self, cfg: TrainConfig, run_dir: Path) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        self.label = ""  # prefix of its log lines: empty alone, its directory's name in a fused group
        self.status = "running"
        self.steps = 0  # optimizer updates recorded
        self.error: str | None = None
        self.device = ""
        self.fused_members = 1  # runs trained together as one stacked model (bnlab/fused.py)
        self.final: dict[str, float] = {}  # metrics of the last evaluation
        self.thresholds = Thresholds(cfg.threshold.metric, cfg.threshold.values)
        self.start = time.perf_counter()
        self.earlier_wall_time = 0.0  # seconds spent before a resume
        self.loop_time = 0.0  # seconds spent in the training loop, evaluations included
        self.window = {"train_loss": 0.0, "train_acc": 0.0, "steps": 0}  # sums over the steps since the last evaluation
        self.pending = {
            "train_loss": 0.0,
            "train_acc": 0.0,
            "steps": 0,
        }  # sums over the steps since the last TensorBoard point
        self.last_eval = -1  # the last evaluated step
        self.high_loss_steps = 0  # consecutive steps with the loss above trainer.stop_loss
        self.writer: SummaryWriter | None = None

    RESUMED = ("window", "pending", "last_eval", "high_loss_steps")  # attributes a checkpoint carries as they are

    def state(self, loop_seconds: float) -> dict[str, Any]:
        """What a checkpoint keeps of this record, `loop_seconds` into the current loop."""
        return {
            "step": self.steps,
            "run": {
                "steps": self.steps,
                "final": self.final,
                "reached": self.thresholds.reached,
                "loop_time": self.loop_time + loop_seconds,
                "wall_time": self.earlier_wall_time + time.perf_counter() - self.start,
            },
            **{k: copy.deepcopy(getattr(self, k)) for k in self.RESUMED},
        }

    def restore(self, checkpoint: dict[str, Any]) -> None:
        self.steps, self.final, self.loop_time, self.earlier_wall_time = (
            checkpoint["run"][k] for k in ("steps", "final", "loop_time", "wall_time")
        )
        self.thresholds.reached = checkpoint["run"]["reached"]
        for k in self.RESUMED:
            setattr(self, k, checkpoint[k])

    def record_steps(self, first: int, losses: list[float], accs: list[float], write: bool) -> bool:
        """Record the training loss and accuracy of steps first, first + 1, ...; True when the run stops at
        one of them (a non-finite loss, or trainer.stop_loss exceeded for trainer.stop_patience steps),
        whose step and those after it are not recorded. `write` (and a stop) puts the mean since the last
        TensorBoard point into TensorBoard at the last recorded step."""
        t, stopped = self.cfg.trainer, False
        for step, loss, acc in zip(range(first, first + len(losses)), losses, accs):
            self.high_loss_steps = self.high_loss_steps + 1 if t.stop_loss and loss > t.stop_loss else 0
            if not math.isfinite(loss) or (t.stop_loss and self.high_loss_steps >= t.stop_patience):
                self.status, stopped = "diverged", True
                log.warning("%sstep %d: the loss is %s; the run diverged", self.label, step, loss)
                break
            self.steps = step
            for sums in (self.window, self.pending):
                sums["train_loss"] += loss
                sums["train_acc"] += acc
                sums["steps"] += 1
        if (write or stopped) and self.pending["steps"]:
            self.writer.add_scalar("train/loss", self.pending["train_loss"] / self.pending["steps"], self.steps)
            self.writer.add_scalar("train/acc", self.pending["train_acc"] / self.pending["steps"], self.steps)
            self.pending = {"train_loss": 0.0, "train_acc": 0.0, "steps": 0}
        return stopped

    def record_eval(self, step: int, test_loss: float, test_acc: float, lr: float) -> None:
        """A test evaluation at `step`, with the training metrics averaged since the previous one."""
        metrics = {"test_loss": test_loss, "test_acc": test_acc}
        if self.window["steps"]:
            metrics.update(
                train_loss=self.window["train_loss"] / self.window["steps"],
                train_acc=self.window["train_acc"] / self.window["steps"],
            )
            self.window = {"train_loss": 0.0, "train_acc": 0.0, "steps": 0}
        self.writer.add_scalar("test/loss", test_loss, step)
        self.writer.add_scalar("test/acc", test_acc, step)
        self.writer.add_scalar("train/lr", lr, step)
        self.final, self.last_eval = metrics, step
        log.debug("%sstep %d: %s", self.label, step, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if self.thresholds.metric in metrics:
            for v in self.thresholds.update(step, metrics[self.thresholds.metric]):
                log.info("%sstep %d: %s reached %g", self.label, step, self.thresholds.metric, v)

    def summary(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "steps": self.steps,
            "error": self.error,
            "wall_time_s": round(self.earlier_wall_time + time.perf_counter() - self.start, 3),
            "steps_per_s": round(self.steps / self.loop_time, 2) if self.loop_time else None,
            "device": self.device,
            "fused_members": self.fused_members,
            "peak_memory_mb": peak_memory_mb(self.device),
            "final": self.final,
            "threshold_metric": self.thresholds.metric,
            "iterations_to_threshold": self.thresholds.as_dict(),
            "config": asdict(self.cfg),
        }


class StopOnSignal:
    """Ctrl-C or SIGTERM asks the loop to stop after the current step (a second one stops at once)."""

    def __enter__(self) -> StopOnSignal:
        self.requested: str | None = None
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------- numerics shared by every engine


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


def prepare_data(data: Dataset, t: TrainerConfig) -> Dataset:
    """The images in float64 for trainer.precision=fp64 and NHWC for trainer.channels_last."""
    for name in ("train_x", "test_x"):
        x = getattr(data, name)
        x = x.double() if t.precision == "fp64" else x
        setattr(data, name, x.contiguous(memory_format=torch.channels_last) if t.channels_last else x)
    return data


class Single:
    """The engine of an ordinary run: one model, its optimizer and its batch order. `step` trains one
    step and hands back the loss and the count of correct predictions as device tensors (1,), unread;
    the loop reads them every trainer.log_every steps. `bnlab.fused.Fused` is the same interface for N stacked runs."""

    members = 1

    def __init__(
        self, cfg: TrainConfig, data: Dataset, device: torch.device, writer: SummaryWriter, checkpoint: dict | None
    ) -> None:
        self.cfg, self.data, self.device = cfg, data, device
        torch.manual_seed(cfg.seed)
        self.model = prepare_model(build_model(cfg, data.in_shape, data.num_classes), cfg.trainer, device)
        self.optimizer = build_optimizer(self.model.parameters(), cfg.optim)
        self.order = batches(
            len(data.train_y), cfg.data.batch_size, torch.Generator(device=device).manual_seed(cfg.seed)
        )
        self.diagnostics = DiagnosticLog(cfg.diag, self.model, writer, data.test_x[: cfg.diag.probe], self.optimizer)
        log.info(
            "%s: %s, %d parameters, %d training examples",
            cfg.model.name,
            device,
            sum(p.numel() for p in self.model.parameters()),
            len(data.train_y),
        )
        if checkpoint:
            self.model.load_state_dict(checkpoint["model"])
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            for _ in range(checkpoint["step"]):  # the batch order goes on where it stopped
                next(self.order)

    def step(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = next(self.order)
        x, y = self.data.train_x[idx], self.data.train_y[idx]
        with autocast(self.cfg.trainer, self.device):
            logits = self.model(x)
            loss = F.cross_entropy(logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        due = self.diagnostics.due(step)
        if due:
            self.diagnostics.before_step(step, x, y)
        self.optimizer.step()
        if due:
            self.diagnostics.after_step(step, x, y)
        return loss.detach().float().view(1), (logits.argmax(1) == y).sum().view(1)

    def evaluate(self) -> list[tuple[float, float]]:
        with autocast(self.cfg.trainer, self.device):
            return [evaluate(self.model, self.data.test_x, self.data.test_y)]

    def lrs(self) -> list[float]:
        return [self.optimizer.param_groups[0]["lr"]]

    def member_state(self, n: int) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def member_model(self, n: int) -> nn.Module:
        return self.model


# ---------------------------------------------------------------- runs


def train(cfg: TrainConfig, run_dir: Path, console: Console | None = None) -> dict[str, Any]:
    """Train one model as `cfg` says; write TensorBoard events and summary.json into `run_dir`."""
    return train_runs([cfg], [run_dir], console)[0]


def train_runs(cfgs: list[TrainConfig], run_dirs: list[Path], console: Console | None = None) -> list[dict[str, Any]]:
    """Train these runs, one alone or several as one fused model (`bnlab.fused.can_fuse` must accept
    them); each writes its TensorBoard events, checkpoint and summary.json into its own directory.

    With trainer.resume=true a completed run is skipped and runs with checkpoints at one step continue
    from them (in a fused group: all of them, or else all start over); otherwise a run starts over.
    Whatever happens (divergence, an error, Ctrl-C) each summary.json is written and the events
    flushed; errors are raised again after that.
    """
    summaries: dict[int, dict[str, Any]] = {}
    todo: list[int] = []
    for i, (cfg, run_dir) in enumerate(zip(cfgs, run_dirs)):
        summary_path = run_dir / "summary.json"
        previous = read_json(summary_path) if cfg.trainer.resume and summary_path.exists() else None
        if previous and previous["status"] == "completed":
            log.info("%s: already completed, skipped (trainer.resume=true)", run_dir)
            summaries[i] = previous
        else:
            todo.append(i)
    if todo:
        results = _train_together([cfgs[i] for i in todo], [run_dirs[i] for i in todo], console or Console())
        summaries.update(zip(todo, results))
    return [summaries[i] for i in range(len(cfgs))]


def _load_checkpoints(cfgs: list[TrainConfig], run_dirs: list[Path]) -> list[dict] | None:
    """The runs' unfinished checkpoints when trainer.resume=true and every run has one at the same step."""
    paths = [d / CHECKPOINT for d in run_dirs]
    if not cfgs[0].trainer.resume or not all(p.exists() for p in paths):
        return None
    checkpoints = [torch.load(p, weights_only=False) for p in paths]
    if any(c["finished"] for c in checkpoints) or len({c["step"] for c in checkpoints}) > 1:
        return None
    return checkpoints


def _train_together(cfgs: list[TrainConfig], run_dirs: list[Path], console: Console) -> list[dict[str, Any]]:
    checkpoints = _load_checkpoints(cfgs, run_dirs)
    if checkpoints:
        log.info("%s: resuming from the checkpoint at step %d", ", ".join(map(str, run_dirs)), checkpoints[0]["step"])
    runs = [Run(cfg, run_dir) for cfg, run_dir in zip(cfgs, run_dirs)]
    for i, run in enumerate(runs):
        run.fused_members = len(runs)
        run.label = f"{run.run_dir.name}: " if len(runs) > 1 else ""
        if checkpoints:
            run.restore(checkpoints[i])
        else:  # nothing to continue: start over; a run that starts over owns its dir
            run.run_dir.mkdir(parents=True, exist_ok=True)
            for stale in [*run.run_dir.glob("events.out.tfevents.*"), run.run_dir / CHECKPOINT]:
                stale.unlink(missing_ok=True)
        # On a resume, TensorBoard hides what the killed run logged after its checkpoint.
        run.writer = SummaryWriter(str(run.run_dir), purge_step=run.steps + 1 if checkpoints else None)
    try:
        _fit(runs, console, checkpoints)
    except KeyboardInterrupt:
        for run in runs:
            run.status = "interrupted" if run.status == "running" else run.status
        raise
    except BaseException as e:
        for run in (r for r in runs if r.status == "running"):  # a member that had diverged keeps its status
            run.status, run.error = "failed", f"{type(e).__name__}: {e}"
        raise
    finally:
        summaries = []
        for run in runs:
            summary = run.summary()
            if run.status != "interrupted":  # an interrupted run logs them when it is resumed and ends
                _log_hparams(run.writer, summary)
            run.writer.close()
            write_json(run.run_dir / "summary.json", summary)
            summaries.append(summary)
    return summaries


def _fit(runs: list[Run], console: Console, checkpoints: list[dict] | None) -> None:
    for run in runs:
        validate(run.cfg)
    cfg, t = runs[0].cfg, runs[0].cfg.trainer
    if t.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    if t.threads:
        torch.set_num_threads(t.threads)
    device = resolve_device(t.device)
    for run in runs:
        run.device = str(device)
    data = load_data(cfg.data, device)
    if cfg.data.batch_size > len(data.train_y):
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} is not accepted; accepted values: at most the "
            f"{len(data.train_y)} training examples of data={cfg.data.name}."
        )
    data = prepare_data(data, t)
    if len(runs) == 1:
        engine = Single(cfg, data, device, runs[0].writer, checkpoints[0] if checkpoints else None)
    else:
        from bnlab.fused import Fused  # bnlab.fused builds on this module

        engine = Fused([r.cfg for r in runs], data, device, checkpoints)
    if checkpoints:
        torch.set_rng_state(checkpoints[0]["rng"])

    def evaluate_and_log(members: list[int], step: int) -> None:
        results, lrs = engine.evaluate(), engine.lrs()
        for n in members:
            runs[n].record_eval(step, *results[n], lrs[n])
        progress.update(task, test_acc=results[members[0]][1])

    def save_checkpoint(n: int, finished: bool = False) -> None:
        state = {
            **runs[n].state(time.perf_counter() - loop_start),
            **engine.member_state(n),
            "rng": torch.get_rng_state(),
            "finished": finished,
        }
        write_torch(runs[n].run_dir / CHECKPOINT, state)

    def finish(members: list[int]) -> None:
        """The end of these runs: a last evaluation if their last step has none, eval modes, the final checkpoint."""
        unevaluated = [n for n in members if runs[n].last_eval != runs[n].steps and runs[n].status != "interrupted"]
        for step in sorted({runs[n].steps for n in unevaluated}):
            evaluate_and_log([n for n in unevaluated if runs[n].steps == step], step)
        for n in members:
            run = runs[n]
            if t.precise_bn and run.status != "interrupted":
                run.final.update(eval_modes(engine.member_model(n), data, run.cfg))
                log.info(
                    "%stest accuracy in train mode %.4f, after precise BN %.4f",
                    run.label,
                    run.final["test_acc_train_mode"],
                    run.final["test_acc_precise_bn"],
                )
            save_checkpoint(n, finished=run.status != "interrupted")

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}  acc {task.fields[acc]:.3f}  test acc {task.fields[test_acc]:.3f}"),
        TimeRemainingColumn(),
        console=console,
    )
    description = "train" if len(runs) == 1 else f"train {len(runs)} fused"
    task = progress.add_task(
        description, total=t.max_steps, completed=runs[0].steps, loss=math.nan, acc=math.nan, test_acc=math.nan
    )
    active = list(range(len(runs)))  # runs still training
    unread: list[
        tuple[torch.Tensor, torch.Tensor]
    ] = []  # (losses, correct counts) of the steps not yet read from the device

    def read(step: int, write: bool) -> None:
        """Read the unread steps up to `step` and record them; runs that stop there leave `active`."""
        losses = torch.stack([loss for loss, _ in unread]).tolist()  # (steps, members): the one host synchronisation
        accs = (torch.stack([correct for _, correct in unread]) / cfg.data.batch_size).tolist()
        first = step - len(unread) + 1
        unread.clear()
        stopped = [
            n
            for n in active
            if runs[n].record_steps(first, [row[n] for row in losses], [row[n] for row in accs], write)
        ]
        progress.update(task, completed=step, loss=losses[-1][active[0]], acc=accs[-1][active[0]])
        if stopped:
            active[:] = [n for n in active if n not in stopped]
            finish(stopped)

    loop_start = time.perf_counter()
    with StopOnSignal() as stop, progress:
        if runs[0].last_eval < 0:
            evaluate_and_log(active, 0)
        for step in range(runs[0].steps + 1, t.max_steps + 1):
            if stop.requested:
                if unread:
                    read(step - 1, write=False)
                log.warning(
                    "step %d: %s received; the run stops here (resume it with trainer.resume=true)",
                    step,
                    stop.requested,
                )
                for n in active:
                    runs[n].status = "interrupted"
                break
            unread.append(engine.step(step))
            due_eval = step % t.eval_every == 0
            due_checkpoint = t.checkpoint_every and step % t.checkpoint_every == 0
            if step % t.log_every and not due_eval and not due_checkpoint and step < t.max_steps:
                continue
            read(step, write=step % t.log_every == 0 or step == t.max_steps)
            if not active:
                break
            if due_eval:
                evaluate_and_log(active, step)
            if due_checkpoint:
                for n in active:
                    save_checkpoint(n)
        finish(active)
    for run in runs:
        run.loop_time += time.perf_counter() - loop_start
        if run.status == "running":
            run.status = "completed"


def eval_modes(model: nn.Module, data: Dataset, cfg: TrainConfig) -> dict[str, float]:
    """Test accuracy of a trained model in train mode (batch statistics of test batches of data.batch_size:
    the forgotten model.eval()) and in eval mode after precise BN over trainer.precise_bn batches; on a
    copy, so the model keeps its own running statistics."""
    probe = copy.deepcopy(model)
    _, train_mode = evaluate(probe, data.test_x, data.test_y, chunk=cfg.data.batch_size, train_mode=True)
    generator = torch.Generator(device=data.train_x.device).manual_seed(cfg.seed)
    precise_bn(probe, data.train_x, cfg.data.batch_size, cfg.trainer.precise_bn, generator)
    _, precise = evaluate(probe, data.test_x, data.test_y)
    return {"test_acc_train_mode": train_mode, "test_acc_precise_bn": precise}


def _log_hparams(writer: SummaryWriter, summary: dict[str, Any]) -> None:
    """The run's config as hparams and its iterations-to-threshold as hparams metrics (never reached: NaN)."""
    metric = summary["threshold_metric"]
    metrics = {
        f"iters_to/{metric}={k}": math.nan if v is None else float(v)
        for k, v in summary["iterations_to_threshold"].items()
    }
    metrics["final/test_acc"] = summary["final"].get("test_acc", math.nan)
    for s in hparams(flatten(summary["config"]), metrics):
        writer.file_writer.add_summary(s)
    for k, v in metrics.items():
        writer.add_scalar(k, v, summary["steps"])


def results_table(name: str, summary: dict[str, Any]) -> Table:
    """The short table printed at the end of a run."""
    table = Table(
        title=f"{name}: {summary['status']} after {summary['steps']} steps ({summary['steps_per_s']} steps/s)"
    )
    table.add_column(f"{summary['threshold_metric']} threshold")
    table.add_column("iterations to reach it", justify="right")
    for k, v in summary["iterations_to_threshold"].items():
        table.add_row(k, "never" if v is None else str(v))
    for k, v in summary["final"].items():
        table.add_row(f"final {k}", f"{v:.4f}")
    return table
