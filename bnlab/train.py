"""The training loop: one run of one config, its TensorBoard curves and its summary.json.

The whole dataset sits on the device as tensors; each step indexes it with a slice of a random
permutation. Test evaluation runs every `trainer.eval_every` steps in eval mode (running statistics)
and feeds the iterations-to-threshold record.
"""

from __future__ import annotations

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

from bnlab.config import ConfigError, TrainConfig, flatten, validate
from bnlab.data import Dataset, load_data
from bnlab.diagnostics import DiagnosticLog, precise_bn
from bnlab.files import read_json, write_json, write_torch
from bnlab.metrics import Thresholds
from bnlab.models import build_model
from bnlab.optim import build_optimizer

log = logging.getLogger(__name__)

EVAL_CHUNK = 10_000  # examples per forward pass during evaluation
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
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = EVAL_CHUNK, train_mode: bool = False) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over (x, y), `chunk` examples at a time, in eval mode (running
    statistics) or, with `train_mode`, in train mode (each chunk's own batch statistics, which also
    moves the running statistics); the model's mode is restored after."""
    was_training = model.training
    model.train(train_mode)
    loss_sum = torch.zeros((), device=x.device)
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
    """The mutable record of one run: what the loop has done so far, turned into summary.json at the end."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.status = "running"
        self.steps = 0  # optimizer updates done
        self.error: str | None = None
        self.device = ""
        self.final: dict[str, float] = {}  # metrics of the last evaluation
        self.thresholds = Thresholds(cfg.threshold.metric, cfg.threshold.values)
        self.start = time.perf_counter()
        self.earlier_wall_time = 0.0  # seconds spent before a resume
        self.loop_time = 0.0  # seconds spent in the training loop, evaluations included

    def summary(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "steps": self.steps,
            "error": self.error,
            "wall_time_s": round(self.earlier_wall_time + time.perf_counter() - self.start, 3),
            "steps_per_s": round(self.steps / self.loop_time, 2) if self.loop_time else None,
            "device": self.device,
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


def train(cfg: TrainConfig, run_dir: Path, console: Console | None = None) -> dict[str, Any]:
    """Train one model as `cfg` says; write TensorBoard events and summary.json into `run_dir`.

    With trainer.resume=true a completed run is skipped and a run with a checkpoint continues from
    it; otherwise the run starts over. Whatever happens (divergence, an error, Ctrl-C) summary.json
    is written and the events flushed; errors are raised again after that.
    """
    summary_path, checkpoint_path = run_dir / "summary.json", run_dir / CHECKPOINT
    previous = read_json(summary_path) if cfg.trainer.resume and summary_path.exists() else None
    if previous and previous["status"] == "completed":
        log.info("%s: already completed, skipped (trainer.resume=true)", run_dir)
        return previous
    checkpoint = torch.load(checkpoint_path, weights_only=False) if cfg.trainer.resume and checkpoint_path.exists() else None
    if checkpoint and not checkpoint["finished"]:
        log.info("%s: resuming from the checkpoint at step %d", run_dir, checkpoint["step"])
    else:  # nothing to continue (no checkpoint, or the run had ended): start over
        checkpoint = None
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in [*run_dir.glob("events.out.tfevents.*"), checkpoint_path]:  # a run that starts over owns its dir
            stale.unlink(missing_ok=True)
    run = Run(cfg)
    # On a resume, TensorBoard hides what the killed run logged after its checkpoint.
    writer = SummaryWriter(str(run_dir), purge_step=checkpoint["step"] + 1 if checkpoint else None)
    try:
        _fit(cfg, run, writer, console or Console(), checkpoint_path, checkpoint)
    except KeyboardInterrupt:
        run.status = "interrupted"
        raise
    except BaseException as e:
        run.status, run.error = "failed", f"{type(e).__name__}: {e}"
        raise
    finally:
        summary = run.summary()
        if run.status != "interrupted":  # an interrupted run logs them when it is resumed and ends
            _log_hparams(writer, summary)
        writer.close()
        write_json(summary_path, summary)
    return summary


def _fit(cfg: TrainConfig, run: Run, writer: SummaryWriter, console: Console, checkpoint_path: Path, checkpoint: dict | None) -> None:
    validate(cfg)
    t = cfg.trainer
    if t.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    if t.threads:
        torch.set_num_threads(t.threads)
    torch.manual_seed(cfg.seed)
    device = resolve_device(t.device)
    run.device = str(device)
    data = load_data(cfg.data, device)
    if cfg.data.batch_size > len(data.train_y):
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} is not accepted; accepted values: at most the "
            f"{len(data.train_y)} training examples of data={cfg.data.name}."
        )
    model = build_model(cfg, data.in_shape, data.num_classes).to(device)
    optimizer = build_optimizer(model.parameters(), cfg.optim)
    order = batches(len(data.train_y), cfg.data.batch_size, torch.Generator(device=device).manual_seed(cfg.seed))
    log.info("%s: %s, %d parameters, %d training examples", cfg.model.name, device, sum(p.numel() for p in model.parameters()), len(data.train_y))
    diagnostics = DiagnosticLog(cfg.diag, model, writer, data.test_x[: cfg.diag.probe], optimizer)

    window = {"train_loss": 0.0, "train_acc": 0.0, "steps": 0}  # sums over the steps since the last evaluation
    last_eval, high_loss_steps = -1, 0  # last evaluated step; consecutive steps with the loss above trainer.stop_loss
    if checkpoint:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        torch.set_rng_state(checkpoint["rng"])
        for _ in range(checkpoint["step"]):  # the batch order goes on where it stopped
            next(order)
        run.steps, run.final, run.loop_time, run.earlier_wall_time = (checkpoint["run"][k] for k in ("steps", "final", "loop_time", "wall_time"))
        run.thresholds.reached = checkpoint["run"]["reached"]
        window, last_eval, high_loss_steps = checkpoint["window"], checkpoint["last_eval"], checkpoint["high_loss_steps"]

    def save_checkpoint(finished: bool = False) -> None:
        run_state = {"steps": run.steps, "final": run.final, "reached": run.thresholds.reached,
                     "loop_time": run.loop_time + time.perf_counter() - loop_start,
                     "wall_time": run.earlier_wall_time + time.perf_counter() - run.start}
        write_torch(checkpoint_path, {
            "step": run.steps, "finished": finished, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
            "run": run_state, "window": window, "last_eval": last_eval, "high_loss_steps": high_loss_steps,
        })

    def evaluate_and_log(step: int) -> None:
        nonlocal last_eval
        test_loss, test_acc = evaluate(model, data.test_x, data.test_y)
        metrics = {"test_loss": test_loss, "test_acc": test_acc}
        if window["steps"]:
            metrics.update(train_loss=window["train_loss"] / window["steps"], train_acc=window["train_acc"] / window["steps"])
            window.update(train_loss=0.0, train_acc=0.0, steps=0)
        writer.add_scalar("test/loss", test_loss, step)
        writer.add_scalar("test/acc", test_acc, step)
        writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], step)
        run.final, last_eval = metrics, step
        log.debug("step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if run.thresholds.metric in metrics:
            for v in run.thresholds.update(step, metrics[run.thresholds.metric]):
                log.info("step %d: %s reached %g", step, run.thresholds.metric, v)
        progress.update(task, test_acc=test_acc)

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}  acc {task.fields[acc]:.3f}  test acc {task.fields[test_acc]:.3f}"),
        TimeRemainingColumn(),
        console=console,
    )
    task = progress.add_task("train", total=t.max_steps, completed=run.steps, loss=math.nan, acc=math.nan, test_acc=math.nan)
    loop_start = time.perf_counter()
    with StopOnSignal() as stop, progress:
        if last_eval < 0:
            evaluate_and_log(0)
        for step in range(run.steps + 1, t.max_steps + 1):
            if stop.requested:
                run.status = "interrupted"
                log.warning("step %d: %s received; the run stops here (resume it with trainer.resume=true)", step, stop.requested)
                break
            idx = next(order)
            x, y = data.train_x[idx], data.train_y[idx]
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            loss_value = loss.item()
            high_loss_steps = high_loss_steps + 1 if t.stop_loss and loss_value > t.stop_loss else 0
            if not math.isfinite(loss_value) or (t.stop_loss and high_loss_steps >= t.stop_patience):
                run.status = "diverged"
                log.warning("step %d: the loss is %s; the run diverged", step, loss_value)
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if diagnostics.due(step):
                diagnostics.before_step(step, x, y)
            optimizer.step()
            if diagnostics.due(step):
                diagnostics.after_step(step, x, y)
            acc = (logits.argmax(1) == y).float().mean().item()
            run.steps = step
            writer.add_scalar("train/loss", loss_value, step)
            writer.add_scalar("train/acc", acc, step)
            window["train_loss"] += loss_value
            window["train_acc"] += acc
            window["steps"] += 1
            progress.update(task, advance=1, loss=loss_value, acc=acc)
            if step % t.eval_every == 0:
                evaluate_and_log(step)
            if t.checkpoint_every and step % t.checkpoint_every == 0:
                save_checkpoint()
        if last_eval != run.steps and run.status != "interrupted":
            evaluate_and_log(run.steps)
        if t.precise_bn and run.status != "interrupted":
            run.final.update(eval_modes(model, data, cfg))
            log.info("test accuracy in train mode %(test_acc_train_mode).4f, after precise BN %(test_acc_precise_bn).4f", run.final)
        save_checkpoint(finished=run.status != "interrupted")
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
    metrics = {f"iters_to/{metric}={k}": math.nan if v is None else float(v) for k, v in summary["iterations_to_threshold"].items()}
    metrics["final/test_acc"] = summary["final"].get("test_acc", math.nan)
    for s in hparams(flatten(summary["config"]), metrics):
        writer.file_writer.add_summary(s)
    for k, v in metrics.items():
        writer.add_scalar(k, v, summary["steps"])


def results_table(name: str, summary: dict[str, Any]) -> Table:
    """The short table printed at the end of a run."""
    table = Table(title=f"{name}: {summary['status']} after {summary['steps']} steps ({summary['steps_per_s']} steps/s)")
    table.add_column(f"{summary['threshold_metric']} threshold")
    table.add_column("iterations to reach it", justify="right")
    for k, v in summary["iterations_to_threshold"].items():
        table.add_row(k, "never" if v is None else str(v))
    for k, v in summary["final"].items():
        table.add_row(f"final {k}", f"{v:.4f}")
    return table
