"""A run (or a fused group of runs) from start to summary.json: its record, its TensorBoard curves, its
checkpoints and the training loop.

`train_runs` sets the runs up (skipping completed ones, resuming from checkpoints), `_fit` builds the
engine (bnlab.run.engine: `Single` for one run, `bnlab.run.fused.engine.Fused` for N stacked runs,
`bnlab.run.distributed.Replica` on each process of a run over trainer.devices processes) and `Loop.run`
drives it, top to bottom: a step, and every few steps one read of the training metrics from the
device, an evaluation, a checkpoint. Every run keeps its own `Run` record, TensorBoard writer and
folder either way, and whatever ends the loop (the last step, a divergence, an error, Ctrl-C) each
summary.json is written and the events flushed. In a distributed run this process is rank 0 and the
only one that writes; the others run `_replica`.
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
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from tensorboard.compat.proto.summary_pb2 import Summary as TensorBoardSummary
from torch import Tensor, nn
from torch.utils.tensorboard import SummaryWriter

from bnlab.core.data import Dataset, has_accuracy, shape, shifted
from bnlab.core.validate import validate
from bnlab.record.console import make_console, shell_path
from bnlab.record.files import OutputError, owned
from bnlab.record.hparams import iterations, session
from bnlab.record.summary import CHANCE_MARGIN, FILE, Status, Summary, existing
from bnlab.run import checkpoint
from bnlab.run.diagnostics import precise_bn
from bnlab.run.distributed import Replica, joined, processes
from bnlab.run.engine import (
    LOCAL,
    Engine,
    Processes,
    Single,
    evaluate_shared,
    forget_shared_data,
    prepare,
    step_flops,
    thread_count,
)
from bnlab.run.fused.engine import Fused
from bnlab.run.threads import usable_cores
from bnlab.run.world import world
from bnlab.schema import tags
from bnlab.schema.config import NO_SHIFT, TrainConfig, flatten
from bnlab.schema.metrics import METRICS, Thresholds, measured

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 10  # seconds between two progress lines where no progress bar can be drawn


def peak_memory_mb(device: str) -> dict[str, float]:
    """Peak resident memory of this process (host) and, on a CUDA device, peak allocated GPU memory, in MiB."""
    peak = {"host": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}  # ru_maxrss: KiB on Linux
    if device.startswith("cuda"):
        peak["gpu"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return peak


@dataclass
class Sums:
    """Sums of the training loss and accuracy over some steps."""

    loss: float = 0.0
    acc: float = 0.0
    steps: int = 0

    def add(self, loss: float, acc: float) -> None:
        self.loss, self.acc, self.steps = self.loss + loss, self.acc + acc, self.steps + 1

    def means(self) -> tuple[float, float]:
        return self.loss / self.steps, self.acc / self.steps


class Run:
    """One run's record: its directory, TensorBoard writer, threshold crossings, the training metrics since
    the last evaluation and since the last TensorBoard point, and what becomes summary.json at the end."""

    RESUMED = (
        "window",
        "pending",
        "last_eval",
        "high_loss_steps",
        "first_test_loss",
    )  # attributes a checkpoint carries as they are
    SUMS = ("window", "pending")  # those of them that are Sums, carried as dicts

    def __init__(self, cfg: TrainConfig, run_dir: Path, members: int = 1) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        self.label = f"{run_dir.name}: " if members > 1 else ""  # prefix of its log lines in a fused group
        self.fused_members = members  # runs trained together as one stacked model (bnlab/run/fused/engine.py)
        self.status = Status.RUNNING
        self.steps = 0  # optimizer updates recorded
        self.error: str | None = None
        self.device = ""
        self.flops_per_step: float | None = None  # of one training step (bnlab.run.engine.step_flops)
        self.final: dict[str, float] = {}  # metrics of the last evaluation
        self.first_test_loss: float | None = None  # at the first evaluation, before any step
        self.thresholds = Thresholds(cfg.threshold.metric, cfg.threshold.values)
        self.accuracy = has_accuracy(cfg.data.name)  # regression: losses only
        self.start = time.perf_counter()
        self.earlier_wall_time = 0.0  # seconds spent before a resume
        self.loop_time = 0.0  # seconds spent in the training loop, evaluations included
        self.window = Sums()  # over the steps since the last evaluation
        self.pending = Sums()  # over the steps since the last TensorBoard point
        self.last_eval = -1  # the last evaluated step
        self.last_checkpoint = 0  # the step of the last checkpoint written (0: none)
        self.high_loss_steps = 0  # consecutive steps with the loss above trainer.stop_loss
        self.writer: SummaryWriter | None = None
        self.points: list[tuple[int, float, dict[str, float]]] = []  # TensorBoard points not yet handed to the writer

    def state(self, loop_seconds: float) -> dict[str, Any]:
        """What a checkpoint keeps of this record, `loop_seconds` into the current loop."""
        wall_time = self.earlier_wall_time + time.perf_counter() - self.start
        run = {"steps": self.steps, "final": self.final, "reached": self.thresholds.reached}
        run["seconds_reached"] = self.thresholds.seconds
        run.update(status=self.status.value, device=self.device, flops_per_step=self.flops_per_step)
        run.update(loop_time=self.loop_time + loop_seconds, wall_time=wall_time)
        resumed = {k: copy.deepcopy(getattr(self, k)) for k in self.RESUMED}
        resumed.update({k: asdict(resumed[k]) for k in self.SUMS})  # plain data: loaded with weights_only=True
        return {"step": self.steps, "run": run, **resumed}

    def restore(self, checkpoint: dict[str, Any]) -> None:
        run = checkpoint["run"]
        self.steps, self.final, self.loop_time, self.earlier_wall_time = (
            run[k] for k in ("steps", "final", "loop_time", "wall_time")
        )
        self.thresholds.reached = run["reached"]
        # a checkpoint of an earlier bnlab has no seconds: unknown
        self.thresholds.seconds = run.get("seconds_reached", dict.fromkeys(run["reached"]))
        self.last_checkpoint = checkpoint["step"]
        for k in self.RESUMED:
            setattr(self, k, Sums(**checkpoint[k]) if k in self.SUMS else checkpoint[k])

    def record_steps(self, first: int, losses: list[float], accs: list[float], write: bool) -> bool:
        """Record the training loss and accuracy of steps first, first + 1, ...; True when the run stops at
        one of them (a non-finite loss, or trainer.stop_loss exceeded for trainer.stop_patience steps),
        whose step and those after it are not recorded. `write` (and a stop) puts the mean since the last
        TensorBoard point into TensorBoard at the last recorded step."""
        t, stopped = self.cfg.trainer, False
        for step, loss, acc in zip(range(first, first + len(losses)), losses, accs):
            self.high_loss_steps = self.high_loss_steps + 1 if t.stop_loss and loss > t.stop_loss else 0
            if not math.isfinite(loss) or (t.stop_loss and self.high_loss_steps >= t.stop_patience):
                self.status, stopped = Status.DIVERGED, True
                log.info("%sstep %d: the loss is %s; the run diverged", self.label, step, loss)
                break
            self.steps = step
            self.window.add(loss, acc)
            self.pending.add(loss, acc)
        if (write or stopped) and self.pending.steps:
            loss, acc = self.pending.means()
            points = {tags.TRAIN_LOSS: loss, tags.TRAIN_ACC: acc} if self.accuracy else {tags.TRAIN_LOSS: loss}
            self.points.append((self.steps, time.time(), points))
            self.pending = Sums()
        return stopped

    def write_points(self) -> None:
        """Hand the TensorBoard points recorded since the last call to the writer, one event per step: at every
        evaluation, checkpoint and the end, not at every point, since each hand-over wakes the writer's
        thread, and the training loop waits for the interpreter while it runs (5 % of an MLP's steps)."""
        try:
            for step, walltime, values in self.points:
                scalars = [TensorBoardSummary.Value(tag=k, simple_value=v) for k, v in values.items()]
                self.writer.file_writer.add_summary(TensorBoardSummary(value=scalars), step, walltime)
        except OSError as e:  # the writer's thread failed to write (a full disk): raised at the next hand-over
            raise OutputError(
                e.errno, f"cannot write the TensorBoard events in {self.run_dir}: {e.strerror or e}"
            ) from e
        self.points.clear()

    def record_eval(self, step: int, test_loss: float, test_acc: float, lr: float, seconds: float) -> None:
        """A test evaluation at `step`, `seconds` into the training loop (earlier attempts' loops included), with
        the training metrics averaged since the previous one (accuracies only where the task has them)."""
        metrics = {"test_loss": test_loss, "test_acc": test_acc}
        if self.window.steps:
            metrics["train_loss"], metrics["train_acc"] = self.window.means()
            self.window = Sums()
        metrics = {k: metrics[k] for k in measured(metrics, self.accuracy)}
        values = {tags.TEST_LOSS: test_loss, tags.TEST_ACC: metrics.get("test_acc"), tags.LR: lr}
        # a diverged model's NaN loss would break TensorBoard's charts
        finite = {k: v for k, v in values.items() if v is not None and math.isfinite(v)}
        self.points.append((step, time.time(), finite))
        self.write_points()
        self.final, self.last_eval = metrics, step
        if self.first_test_loss is None:
            self.first_test_loss = test_loss
        log.debug("%sstep %d: %s", self.label, step, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if self.thresholds.metric in metrics:
            for v in self.thresholds.update(step, metrics[self.thresholds.metric], seconds):
                log.info("%sstep %d: %s reached %g", self.label, step, self.thresholds.metric, v)

    def end_status(self, classes: int) -> Status:
        """COMPLETED, or STALLED where the run ended no better than chance: a final test accuracy within
        CHANCE_MARGIN of 1 / classes, or for a regression a final test loss not below its first."""
        acc, loss = self.final.get("test_acc"), self.final.get("test_loss")
        if self.accuracy:
            chance = acc is not None and acc <= 1 / classes + CHANCE_MARGIN
        else:
            chance = loss is not None and self.first_test_loss is not None and loss >= self.first_test_loss
        return Status.STALLED if chance else Status.COMPLETED

    def summary(self) -> Summary:
        return Summary(
            status=self.status,
            config=asdict(self.cfg),
            steps=self.steps,
            threshold_metric=self.thresholds.metric,
            iterations_to_threshold=dict(self.thresholds.reached),
            seconds_to_threshold=dict(self.thresholds.seconds),
            final=dict(self.final),
            error=self.error,
            wall_time_s=round(self.earlier_wall_time + time.perf_counter() - self.start, 3),
            steps_per_s=round(self.steps / self.loop_time, 2) if self.loop_time else None,
            device=self.device,
            fused_members=self.fused_members,
            flops_per_step=self.flops_per_step,
            devices=self.cfg.trainer.devices,
            peak_memory_mb=peak_memory_mb(self.device),
        )


class _Unwritten:
    """The TensorBoard writer of the processes of a distributed run other than rank 0: only rank 0 writes."""

    def add_scalar(self, *args: Any, **kwargs: Any) -> None:
        pass

    def add_summary(self, *args: Any, **kwargs: Any) -> None:
        pass

    @property
    def file_writer(self) -> _Unwritten:
        return self


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


# ---------------------------------------------------------------- runs


def train(cfg: TrainConfig, run_dir: Path, console: Console | None = None) -> Summary:
    """Train one model as `cfg` says; write TensorBoard events and summary.json into `run_dir`."""
    return train_runs([cfg], [run_dir], console)[0]


def train_runs(
    cfgs: list[TrainConfig], run_dirs: list[Path], console: Console | None = None, cores: int | None = None
) -> list[Summary | None]:
    """Train these runs, one alone or several as one fused model (`bnlab.run.fused.engine.can_fuse` must accept
    them), on `cores` cores (default: all this process may use); each writes its TensorBoard events,
    checkpoint and summary.json into its own directory. trainer.threads=auto becomes the thread count they
    train with (bnlab.run.engine.thread_count), which their summaries record.

    Each run folder is owned by one process at a time: a run whose folder another process owns is
    left to it (None in the result). With trainer.resume=true a completed run is skipped and runs with
    checkpoints at one step continue from them (in a fused group: all of them, or else all start
    over); otherwise a run starts over. Whatever happens (divergence, an error, Ctrl-C) each
    summary.json is written and the events flushed; errors are raised again after that.
    """
    summaries: dict[int, Summary | None] = {}
    with contextlib.ExitStack() as stack:
        for i, (cfg, run_dir) in enumerate(zip(cfgs, run_dirs)):
            path = run_dir / FILE
            if not stack.enter_context(owned(run_dir)):
                log.warning("%s: another process is training this run; it is left to that process", run_dir)
                summaries[i] = None
            elif cfg.trainer.resume and (done := existing(path)) and done.status.done:
                log.info("%s: already completed, skipped (trainer.resume=true)", run_dir)
                summaries[i] = done
            elif cfg.trainer.resume and (recovered := _finished_summary(cfg, run_dir)):
                summaries[i] = recovered
        todo = [i for i in range(len(cfgs)) if i not in summaries]
        if todo:
            console = console or make_console()
            results = _train_together([cfgs[i] for i in todo], [run_dirs[i] for i in todo], console, cores)
            summaries.update(zip(todo, results))
    return [summaries[i] for i in range(len(cfgs))]


def _finished_summary(cfg: TrainConfig, run_dir: Path) -> Summary | None:
    """A run that finished but whose summary.json did not land (killed while writing it): its summary from its
    final checkpoint, written now, without training again; None where the run has no such checkpoint."""
    if (own := existing(run_dir / FILE)) and own.status != Status.RUNNING:
        return None  # its own record says how it ended (interrupted, failed): resumed or started over as usual
    state = checkpoint.load(run_dir) if checkpoint.exists(run_dir) else None
    if not state or not state["finished"]:
        return None
    run = Run(cfg, run_dir)
    run.restore(state)
    run.status = Status(state["run"]["status"])
    if run.status == Status.RUNNING:  # it trained to its last step: completed, or stalled
        run.status = run.end_status(shape(cfg.data)[1])
    run.device, run.flops_per_step = state["run"]["device"], state["run"]["flops_per_step"]
    summary = run.summary()
    summary.wall_time_s = round(run.earlier_wall_time, 3)
    summary.save(run_dir / FILE)
    log.info("%s: finished, but its summary.json was missing: written from its final checkpoint", run_dir)
    return summary


def _load_checkpoints(cfgs: list[TrainConfig], run_dirs: list[Path]) -> list[dict] | None:
    """The runs' unfinished checkpoints when trainer.resume=true and every run has one at the same step."""
    if not cfgs[0].trainer.resume or not all(checkpoint.exists(d) for d in run_dirs):
        return None
    checkpoints = [checkpoint.load(d) for d in run_dirs]
    if any(c["finished"] for c in checkpoints) or len({c["step"] for c in checkpoints}) > 1:
        return None
    return checkpoints


def _open_runs(cfgs: list[TrainConfig], run_dirs: list[Path], checkpoints: list[dict] | None) -> list[Run]:
    """A Run per config with its TensorBoard writer: restored from its checkpoint, or starting over in a
    folder cleared of an earlier attempt's events and checkpoint."""
    runs = [Run(cfg, run_dir, len(cfgs)) for cfg, run_dir in zip(cfgs, run_dirs)]
    for i, run in enumerate(runs):
        if checkpoints:
            run.restore(checkpoints[i])
        else:
            run.run_dir.mkdir(parents=True, exist_ok=True)
            for stale in [*run.run_dir.glob("events.out.tfevents.*"), *run.run_dir.glob("checkpoint*.pt")]:
                stale.unlink(missing_ok=True)
        # On a resume, TensorBoard hides what the killed run logged after its checkpoint.
        run.writer = SummaryWriter(str(run.run_dir), purge_step=run.steps + 1 if checkpoints else None)
    return runs


def _train_together(
    cfgs: list[TrainConfig], run_dirs: list[Path], console: Console, cores: int | None
) -> list[Summary]:
    checkpoints = _load_checkpoints(cfgs, run_dirs)
    folders = ", ".join(map(str, run_dirs))
    if checkpoints:
        log.info("%s: resuming from the checkpoint at step %d", folders, checkpoints[0]["step"])
    else:
        log.info("%s: training from the start", folders)
    runs = _open_runs(cfgs, run_dirs, checkpoints)
    try:
        _fit(runs, console, checkpoints, cores or usable_cores())
    except OutputError as e:
        for run in (r for r in runs if r.status == Status.RUNNING):
            run.status, run.error = Status.FAILED, f"{type(e).__name__}: {e}"
        raise OutputError(e.errno, _output_error_message(e, runs)) from e
    except KeyboardInterrupt:
        for run in runs:
            run.status = Status.INTERRUPTED if run.status == Status.RUNNING else run.status
        raise
    except BaseException as e:
        for run in (r for r in runs if r.status == Status.RUNNING):  # a member that had diverged keeps its status
            run.status, run.error = Status.FAILED, f"{type(e).__name__}: {e}"
        raise
    finally:
        summaries = [run.summary() for run in runs]
        unsaved = [e for run, summary in zip(runs, summaries) if (e := _save(run, summary))]
        for run, summary in zip(runs, summaries):
            _close_events(run, summary)
    if unsaved:  # trained, but its record is not on the disk: never a success (an error in flight comes first)
        raise OutputError(unsaved[0].errno, _output_error_message(unsaved[0], runs))
    return summaries


def _save(run: Run, summary: Summary) -> OutputError | None:
    """Write the run's summary.json, before its TensorBoard events (a failing event writer cannot keep the
    record from the disk); the error if it could not be written (the old file stays)."""
    try:
        summary.save(run.run_dir / FILE)
    except OutputError as e:
        log.error("%s", e)
        return e
    return None


def _close_events(run: Run, summary: Summary) -> None:
    """The run's last TensorBoard points and its HParams session, then the writer closed; a failure (a full
    disk) is logged, since the summary is what counts and was written first."""
    try:
        run.write_points()
        if not run.status.unfinished:  # an interrupted or paused run logs them when it is resumed and ends
            _log_hparams(run.writer, summary)
        run.writer.close()
    except Exception as e:
        log.error("%s: its last TensorBoard events were not written: %s: %s", run.run_dir, type(e).__name__, e)


def _output_error_message(e: OutputError, runs: list[Run]) -> str:
    """What a user needs after a write failed: which file and why, what stays valid, how to go on."""
    run = runs[0]
    saved = f"its last checkpoint (step {run.last_checkpoint})" if run.last_checkpoint else "no checkpoint yet"
    return (
        f"{e.strerror} The run stopped at step {run.steps}. What it wrote before stays as it was: {saved}, "
        f"its TensorBoard events and any earlier summary.json. Free some space or make the folder writable, "
        f"then continue it with `bnlab resume {shell_path(run.run_dir)}`."
    )


def _fit(runs: list[Run], console: Console, checkpoints: list[dict] | None, cores: int) -> None:
    """Validate, decide the thread count, set up the device and data, and train: in this process, or with
    trainer.devices > 1 as rank 0 of a distributed run whose other processes bnlab.run.distributed starts, or
    torchrun or srun started (each runs `_replica`)."""
    for run in runs:
        validate(run.cfg)
    threads = thread_count([run.cfg for run in runs], cores)
    for run in runs:  # what the runs train with, and their summaries record
        run.cfg.trainer.threads = threads
    cfg, t = runs[0].cfg, runs[0].cfg.trainer
    device, data = prepare(cfg)
    for run in runs:
        run.device = str(device)
        run.flops_per_step = flops if math.isfinite(flops := step_flops(run.cfg)) else None
    try:
        if t.devices == 1:
            _drive(runs, data, device, checkpoints, LOCAL, console)
            return
        args = (_replica, cfg, runs[0].run_dir, bool(checkpoints))
        launched = world()  # torchrun's or srun's processes, else bnlab starts its own
        with (
            joined(launched, t.device, t.timeout_s, *args)
            if launched
            else processes(t.devices, t.device, t.timeout_s, *args) as group
        ):
            _drive(runs, data, device, checkpoints, group, console)
    except BaseException:
        forget_shared_data()  # the error may be torch refusing an in-place change to the shared data, made anyway
        raise


def _replica(group: Processes, cfg: TrainConfig, run_dir: Path, resumed: bool) -> None:
    """Rank group.rank > 0 of a distributed run, in a process of its own: rank 0's loop on its share of
    every batch, from rank 0's checkpoint when it resumes, writing nothing."""
    state = checkpoint.load(run_dir) if resumed else None  # the one rank 0 took: the newest whole one
    run = Run(cfg, run_dir)
    run.writer = _Unwritten()
    if state:
        run.restore(state)
    device, data = prepare(cfg, group.rank)
    _drive([run], data, device, [state] if state else None, group)


def _drive(
    runs: list[Run],
    data: Dataset,
    device: torch.device,
    checkpoints: list[dict] | None,
    group: Processes,
    console: Console | None = None,
) -> None:
    """Build the engine and run the loop, with a progress bar on `console` if there is one."""
    cfg = runs[0].cfg
    checkpoint = checkpoints[0] if checkpoints else None
    if group.size > 1:
        engine: Engine = Replica(cfg, data, device, runs[0].writer, checkpoint, group)
    elif len(runs) == 1:
        engine = Single(cfg, data, device, runs[0].writer, checkpoint)
    else:
        engine = Fused([r.cfg for r in runs], data, device, checkpoints, [r.writer for r in runs])
    if checkpoints:
        torch.set_rng_state(checkpoints[0]["rng"])
    progress, show = _progress(console, runs)
    with StopOnSignal() as stop, progress:
        Loop(runs, engine, data, show).run(stop)


def _progress(console: Console | None, runs: list[Run]) -> tuple[contextlib.AbstractContextManager, Callable]:
    """How the loop shows its progress on `console`, and the function it calls with it: a progress bar in a
    terminal this process has to itself (the foreground job); else, in a log or in a parallel sweep's worker
    (whose process group is not the terminal's), a line every PROGRESS_EVERY_S seconds. No console: nothing."""
    if console is None:
        return contextlib.nullcontext(), lambda **fields: None
    fields = {"completed": runs[0].steps, "loss": math.nan, "acc": math.nan, "test_acc": math.nan}
    budget = runs[0].cfg.trainer.max_steps
    if not _in_foreground(console):
        name = runs[0].run_dir.name + (f" and {len(runs) - 1} fused" if len(runs) > 1 else "")
        first, start, last = runs[0].steps, time.perf_counter(), [time.perf_counter()]

        def line(**update: float) -> None:
            fields.update(update)
            now = time.perf_counter()
            if now - last[0] >= PROGRESS_EVERY_S:
                last[0], done = now, fields["completed"] - first
                console.print(
                    f"{name}: step {fields['completed']} of {budget}, {done / (now - start):.0f} steps/s, "
                    f"loss {fields['loss']:.3f}, test acc {fields['test_acc']:.4f}",
                    soft_wrap=True,
                    highlight=False,
                )

        return contextlib.nullcontext(), line
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}  acc {task.fields[acc]:.3f}  test acc {task.fields[test_acc]:.3f}"),
        TimeRemainingColumn(),
        console=console,
        transient=True,  # gone when the run ends: its table (or its sweep line) says how it went
    )
    description = "train" if len(runs) == 1 else f"train {len(runs)} fused"
    task = progress.add_task(description, total=budget, **fields)
    return progress, lambda **fields: progress.update(task, **fields)


def _in_foreground(console: Console) -> bool:
    """Whether `console` is a terminal and this process its foreground process group (a worker of a parallel
    sweep has a group of its own: two live bars in one terminal would overwrite each other)."""
    try:
        return console.is_terminal and os.tcgetpgrp(console.file.fileno()) == os.getpgrp()
    except (OSError, ValueError, AttributeError):  # no file descriptor, or not a terminal after all
        return False


class Loop:
    """The training loop over an engine's steps, for the runs the engine trains (member n is runs[n])."""

    def __init__(self, runs: list[Run], engine: Engine, data: Dataset, show) -> None:
        self.runs, self.engine, self.data, self.show = runs, engine, data, show
        self.t = runs[0].cfg.trainer
        self.active = list(range(len(runs)))  # runs still training
        self.unread: list[tuple[Tensor, Tensor]] = []  # (losses, correct counts) of the steps not yet read
        self.start = time.perf_counter()

    def run(self, stop: StopOnSignal) -> None:
        t, first = self.t, self.runs[0].steps + 1
        if self.runs[0].last_eval < 0:
            self.evaluate(self.active, 0)
        for step in range(first, t.max_steps + 1):
            requested = self.engine.group.agree(stop.requested)
            if requested:
                self.interrupt(step - 1, requested)
                break
            if t.pause_at and step - 1 == t.pause_at:  # resumed with the same pause_at, a paused run stays there
                self.interrupt(step - 1, None)
                break
            self.unread.append(self.engine.step(step))
            due_eval = step % t.eval_every == 0
            # the last step's checkpoint is finish()'s
            due_checkpoint = t.checkpoint_every and step % t.checkpoint_every == 0 and step < t.max_steps
            due_point = step % t.log_every == 0 or step == t.max_steps
            if not (due_point or due_eval or due_checkpoint):
                continue  # nothing to read: the device runs ahead
            results = self.engine.evaluate() if due_eval else None  # queued behind the steps, read after them
            self.read(step, write=due_point)
            if not self.active:
                break
            if results is not None:
                self.record_eval(self.active, step, results)
            if due_checkpoint:
                for n in self.active:
                    self.save_checkpoint(n)
        self.finish(self.active)
        for run in self.runs:
            run.loop_time += time.perf_counter() - self.start
            if run.status == Status.RUNNING:
                run.status = run.end_status(self.data.num_classes)
        if stop.requested and not any(r.status == Status.INTERRUPTED for r in self.runs):
            # it came after the last step the loop looked at (while the runs ended or paused): never lost, it stops
            # the sweep once their summaries are written
            raise KeyboardInterrupt

    def read(self, step: int, write: bool) -> None:
        """Read the unread steps up to `step` and record them; runs that stop there leave `active`."""
        batch = self.runs[0].cfg.data.batch_size
        losses = torch.stack([loss for loss, _ in self.unread])  # (steps, members)
        accs = torch.stack([correct for _, correct in self.unread]).float() / batch
        losses, accs = torch.stack([losses, accs]).tolist()  # the host sync point
        first = step - len(self.unread) + 1
        self.unread.clear()
        stopped = [
            n
            for n in self.active
            if self.runs[n].record_steps(first, [row[n] for row in losses], [row[n] for row in accs], write)
        ]
        self.show(completed=step, loss=losses[-1][self.active[0]], acc=accs[-1][self.active[0]])
        if stopped:
            self.active = [n for n in self.active if n not in stopped]
            self.finish(stopped)

    def evaluate(self, members: list[int], step: int) -> None:
        self.record_eval(members, step, self.engine.evaluate())

    def record_eval(self, members: list[int], step: int, results: Tensor) -> None:
        """Record an evaluation at `step` (the engine's (members, 2) tensor) for these members."""
        values, lrs = results.tolist(), self.engine.lrs()
        for n in members:
            seconds = self.runs[n].loop_time + time.perf_counter() - self.start
            self.runs[n].record_eval(step, *values[n], lrs[n], seconds)
        self.show(test_acc=values[members[0]][1])

    def save_checkpoint(self, n: int, finished: bool = False) -> None:
        if self.engine.group.rank:  # a distributed run: rank 0 writes
            return
        run = self.runs[n]
        run.write_points()  # a resume from this checkpoint finds every point up to it
        state = {**run.state(time.perf_counter() - self.start), **self.engine.member_state(n)}
        checkpoint.save(run.run_dir, {**state, "rng": torch.get_rng_state(), "finished": finished})
        run.last_checkpoint = run.steps

    def interrupt(self, step: int, signal_name: str | None) -> None:
        """Ctrl-C or SIGTERM (`signal_name`), or trainer.pause_at (None): record what was trained and mark the active
        runs interrupted, or paused."""
        if self.unread:
            self.read(step, write=False)
        if signal_name:
            log.warning("step %d: %s received; the run stops here", step + 1, signal_name)
        else:
            log.info("paused after step %d (trainer.pause_at)", step)
        for n in self.active:
            self.runs[n].status = Status.INTERRUPTED if signal_name else Status.PAUSED

    def finish(self, members: list[int]) -> None:
        """The end of these runs: a last evaluation if their last step has none, eval modes, the final checkpoint."""
        runs = self.runs
        unevaluated = [n for n in members if runs[n].last_eval != runs[n].steps and not runs[n].status.unfinished]
        for step in sorted({runs[n].steps for n in unevaluated}):
            self.evaluate([n for n in unevaluated if runs[n].steps == step], step)
        for n in members:
            run = runs[n]
            t = run.cfg.trainer
            if (t.precise_bn or t.shift != NO_SHIFT) and not run.status.unfinished:
                modes = eval_modes(self.engine.member_model(n), self.data, run.cfg, self.engine.group)
                run.final.update(modes)
                accuracies = ", ".join(f"{METRICS[k].label} {v:.4f}" for k, v in modes.items())
                log.info("%s%s", run.label, accuracies)
            self.save_checkpoint(n, finished=not run.status.unfinished)


def eval_modes(model: nn.Module, data: Dataset, cfg: TrainConfig, group: Processes = LOCAL) -> dict[str, float]:
    """Test accuracy of a trained model in train mode (batch statistics of test batches of data.batch_size:
    the forgotten model.eval()) and in eval mode after precise BN over trainer.precise_bn batches; with
    trainer.shift, on the shifted test images as trained and after AdaBN. Precise BN and AdaBN work on a
    copy, so the model keeps its own running statistics. In a distributed run every process takes part,
    each with its share of every batch as in training: the sums are reduced and precise BN's statistics
    averaged over the processes."""
    t, out = cfg.trainer, {}

    def accuracy(model: nn.Module, test_x: Tensor, **kwargs: Any) -> float:
        ((_, acc),) = evaluate_shared(group, model, test_x, data.test_y, data.task, **kwargs).tolist()
        return acc

    def precise(train_x: Tensor) -> nn.Module:
        probe = copy.deepcopy(model)
        generator = torch.Generator(device=data.train_x.device).manual_seed(cfg.seed)
        precise_bn(probe, train_x, cfg.data.batch_size, t.precise_bn, generator, group)
        return probe

    if t.precise_bn:
        # on a copy: in train mode the norms update their running statistics
        probe = copy.deepcopy(model)
        out["test_acc_train_mode"] = accuracy(probe, data.test_x, chunk=cfg.data.batch_size, train_mode=True)
        out["test_acc_precise_bn"] = accuracy(precise(data.train_x), data.test_x)
    if t.shift != NO_SHIFT:  # AdaBN (Li et al. 2016): the statistics re-estimated on unlabelled shifted images
        test_x = shifted(data.test_x, data.train_x, t.shift)
        out["test_acc_shifted"] = accuracy(model, test_x)
        if t.precise_bn:
            unlabelled = shifted(data.train_x, data.train_x, t.shift, seed=1)  # other noise than the test images'
            out["test_acc_adabn"] = accuracy(precise(unlabelled), test_x)
    return out


def _log_hparams(writer: SummaryWriter, summary: Summary) -> None:
    """The run's session for TensorBoard's HParams view, and its iterations to each threshold it reached as a
    line from that step to its last (bnlab.record.hparams)."""
    for proto in session(summary, flatten(summary.config)):
        writer.file_writer.add_summary(proto)
    for tag, at in iterations(summary).items():
        for step in sorted({at, summary.steps}):
            writer.add_scalar(tag, at, step)
