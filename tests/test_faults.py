"""Faults that used to lose results or hide them (issue 26's probe): a write that fails says so, two writers of one
file do not collide, the user's code cannot end bnlab as a success."""

from __future__ import annotations

import errno
import io
import json
import math
import os
import re
import signal
import subprocess
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import CLI, LONG, TINY, bnlab
from omegaconf import OmegaConf
from rich.console import Console
from torch.utils.tensorboard.writer import FileWriter

from bnlab.record import files
from bnlab.record.files import OutputError, write_json
from bnlab.record.summary import Summary
from bnlab.results.summarize import summarize
from bnlab.run import checkpoint
from bnlab.run import train as training
from bnlab.run.train import train


def test_a_summary_that_cannot_be_written_is_an_error_not_a_success(tiny_config, tmp_path, monkeypatch):
    write = files.write_bytes

    def no_summary(path, data):  # the checkpoints land, the summary does not (ENOSPC at summary.json's write)
        if path.name == "summary.json":
            raise OutputError(errno.ENOSPC, f"cannot write {path}: No space left on device")
        write(path, data)

    monkeypatch.setattr(files, "write_bytes", no_summary)
    with pytest.raises(OutputError, match="summary.json: No space left on device"):
        train(tiny_config("trainer.max_steps=6"), tmp_path)


def test_a_failing_tensorboard_writer_stops_the_run_with_its_summary_written_first(tiny_config, tmp_path, monkeypatch):
    written = []

    def full_disk(
        self, summary, step=None, walltime=None
    ):  # TensorBoard raises its thread's OSError at the next hand-over
        written.append(step)
        if len(written) > 3:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(FileWriter, "add_summary", full_disk)
    with pytest.raises(OutputError, match="cannot write the TensorBoard events"):
        train(tiny_config("trainer.max_steps=8", "trainer.eval_every=2"), tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and "No space left on device" in summary["error"]


def test_two_writers_of_one_file_never_collide(tmp_path):
    path, errors = tmp_path / "summary.json", []

    def write_many(n: int) -> None:
        for i in range(200):
            try:
                write_json(path, {"writer": n, "i": i})
            except OSError as e:
                errors.append(e)

    threads = [threading.Thread(target=write_many, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and json.loads(path.read_text())["i"] == 199  # whole, and the last of one of them
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temporary file left behind


@pytest.mark.parametrize("where", ["import", "forward"])
def test_user_code_that_calls_sys_exit_is_refused_or_failed_never_a_success(tmp_path, where):
    exit_at_import = "sys.exit(0)" if where == "import" else ""
    (tmp_path / "exiting.py").write_text(
        textwrap.dedent(f"""
            import sys
            import torch
            {exit_at_import}

            class Norm(torch.nn.Module):
                def __init__(self, channels):
                    super().__init__()
                    self.scale, self.calls = torch.nn.Parameter(torch.ones(())), 0

                def forward(self, x):
                    self.calls += 1
                    if self.calls > 5:  # past the probe's passes: in training
                        sys.exit(0)
                    return x * self.scale
        """)
    )
    args = ["train", *TINY, "norm=custom", "norm.target=exiting.Norm", "hydra.run.dir=run"]
    out = bnlab(*args, cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)})
    text = " ".join((out.stdout + out.stderr).split())
    if where == "import":  # refused before any folder: exit 2, the option named
        assert out.returncode == 2 and "norm.target='exiting.Norm' cannot be used" in text and "SystemExit" in text
        assert not (tmp_path / "run" / "summary.json").exists()
    else:  # in training: a failed run, exit 1, its summary says why
        assert out.returncode == 1, text
        summary = json.loads((tmp_path / "run" / "summary.json").read_text())
        assert summary["status"] == "failed" and "SystemExit" in summary["error"]


def test_a_finished_run_whose_summary_did_not_land_is_not_trained_again(tiny_config, tmp_path, monkeypatch):
    cfg = tiny_config("trainer.max_steps=6", "trainer.checkpoint_every=2")
    first = train(cfg, tmp_path)
    (tmp_path / "summary.json").unlink()  # killed at its rename: the final checkpoint is there, the summary not
    monkeypatch.setattr(training, "_train_together", None)  # training again would fail here
    cfg.trainer.resume = True
    again = train(cfg, tmp_path)
    same = ("status", "steps", "iterations_to_threshold", "seconds_to_threshold", "final", "flops_per_step", "device")
    assert {k: getattr(again, k) for k in same} == {k: getattr(first, k) for k in same}
    assert again.steps_per_s > 0 and Summary.load(tmp_path / "summary.json") == again


def corrupt(path, how: str) -> None:
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    else:  # four NaN weights in place, the file otherwise whole
        state = torch.load(path, weights_only=True)
        next(iter(state["model"].values())).view(-1)[:4] = math.nan
        torch.save(state, path)


@pytest.mark.parametrize("how", ["truncated", "nan weights"])
def test_a_corrupt_checkpoint_is_refused_by_name_and_the_one_before_it_used(tmp_path, how):
    for step in (2, 4):
        checkpoint.save(tmp_path, {"step": step, "model": {"w": torch.ones(3, 3) * step}})
    corrupt(tmp_path / checkpoint.CHECKPOINT, how)
    assert checkpoint.load(tmp_path)["step"] == 2  # the one before it, whole
    corrupt(tmp_path / checkpoint.PREVIOUS, how)
    with pytest.raises(checkpoint.CheckpointError, match=r"checkpoint\.pt: .*checkpoint\.previous\.pt: "):
        checkpoint.load(tmp_path)


class Payload:
    def __reduce__(self):
        return os.system, (f"touch {Path.cwd() / 'pwned'}",)


def test_a_checkpoint_from_someone_else_cannot_run_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"step": 2, "model": Payload()}, tmp_path / checkpoint.CHECKPOINT)
    with pytest.raises(checkpoint.CheckpointError, match="checkpoint.pt: UnpicklingError"):
        checkpoint.load(tmp_path)
    assert not (tmp_path / "pwned").exists()


def test_resume_replays_no_code_named_by_the_folder_unless_trusted(tmp_path):
    sweep = ["train", "-m", *TINY, "trainer.max_steps=2", "seed=0,1", "hydra.sweep.dir=s"]
    assert bnlab(*sweep, cwd=tmp_path).returncode == 0
    run = tmp_path / "s" / "seed=0"
    (run / "summary.json").unlink()  # a run to resume
    saved = OmegaConf.load(tmp_path / "s" / "multirun.yaml")  # as someone else's folder might say
    copy = f"+hydra.callbacks.c._target_=shutil.copyfile,+hydra.callbacks.c.src={tmp_path / 's' / 'multirun.yaml'}"
    saved.hydra.overrides.hydra.extend([*copy.split(","), f"+hydra.callbacks.c.dst={tmp_path / 'copied'}"])
    OmegaConf.save(saved, tmp_path / "s" / "multirun.yaml")
    out = bnlab("resume", "s", cwd=tmp_path)
    text = " ".join((out.stdout + out.stderr).split())
    assert out.returncode == 2 and "+hydra.callbacks.c._target_=shutil.copyfile" in text and "--trust" in text
    assert not (tmp_path / "copied").exists() and not (run / "summary.json").exists()
    (run / ".hydra" / "overrides.yaml").write_text("- data.target=os.system\n- seed=0\n")  # a run folder alike
    out = bnlab("resume", str(run), cwd=tmp_path)
    assert out.returncode == 2 and "data.target=os.system" in " ".join(out.stderr.split())


def test_a_corrupt_summary_is_named_and_the_other_runs_still_shown(tmp_path):
    sweep = ["train", "-m", *TINY, "trainer.max_steps=2", "norm=none,batch", "hydra.sweep.dir=s"]
    assert bnlab(*sweep, cwd=tmp_path).returncode == 0
    (tmp_path / "s" / "norm=batch" / "summary.json").write_text('{"status": "compl')  # cut off mid-write
    out = bnlab("summarize", "s", cwd=tmp_path)
    text = " ".join(out.stdout.split())
    assert out.returncode == 0 and "left out: s/norm=batch/summary.json cannot be read: JSONDecodeError" in text
    assert "norm=none" in text and json.loads((tmp_path / "s" / "sweep.json").read_text())["unreadable"]
    assert bnlab("report", "s", cwd=tmp_path).returncode == 0
    resumed = bnlab("resume", "s", cwd=tmp_path)  # the unreadable run is resumed from its final checkpoint
    assert resumed.returncode == 0 and json.loads((tmp_path / "s" / "norm=batch" / "summary.json").read_text())


@pytest.mark.parametrize("summary, config", [("kept", ""), ("lost", ""), ("lost", "norm: {name: ba")])
def test_an_empty_hydra_config_never_blocks_a_resume(tmp_path, summary, config):
    sweep = ["train", "-m", *TINY, "trainer.max_steps=2", "seed=0,1", "hydra.sweep.dir=s"]
    assert bnlab(*sweep, cwd=tmp_path).returncode == 0
    run = tmp_path / "s" / "seed=0"
    (run / ".hydra" / "config.yaml").write_text(config)  # Hydra writes it in place: a kill or a full disk does this
    if summary == "lost":
        (run / "summary.json").unlink()
    else:  # interrupted: its summary says so, and holds the config it started with
        record = json.loads((run / "summary.json").read_text())
        write_json(run / "summary.json", {**record, "status": "interrupted"})
    out = bnlab("resume", "s", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "config.yaml is empty or cut off" in " ".join((out.stdout + out.stderr).split())
    assert json.loads((run / "summary.json").read_text())["status"] in ("completed", "stalled")
    assert OmegaConf.load(run / ".hydra" / "config.yaml").seed == 0  # written anew


@pytest.mark.parametrize("after_s", [0.3, 2.0])
def test_sigterm_during_start_up_is_an_interruption_exit_130(tmp_path, after_s):
    # a run too long to end first: on a quick machine 2 s may already be its first steps, which end alike
    long = [*TINY, "trainer.max_steps=1000000", "hydra.run.dir=run"]
    proc = subprocess.Popen(
        [*CLI, "train", *long], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    time.sleep(after_s)  # importing torch and Hydra, or composing the config
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in out + err, (proc.returncode, err)


def test_the_first_error_of_a_failed_write_is_the_one_reported(tmp_path, monkeypatch):
    def read_only(*args):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(os, "replace", read_only)
    monkeypatch.setattr(os, "unlink", read_only)  # the temporary file's removal fails the same way
    with pytest.raises(OutputError, match="cannot write .*summary.json: Read-only file system"):
        write_json(tmp_path / "summary.json", {})


def test_a_sweep_that_cannot_be_written_is_printed_or_reported_elsewhere(tmp_path, monkeypatch):
    sweep = ["train", "-m", *TINY, "trainer.max_steps=2", "norm=none,batch", "hydra.sweep.dir=s"]
    assert bnlab(*sweep, cwd=tmp_path).returncode == 0
    report = bnlab("report", "s", "--out", "elsewhere", cwd=tmp_path)
    assert report.returncode == 0 and (tmp_path / "elsewhere" / "report.md").exists()
    assert not (tmp_path / "s" / "report.md").exists()
    assert bnlab("summarize", "s", "--out", "elsewhere", cwd=tmp_path).returncode == 0
    assert json.loads((tmp_path / "elsewhere" / "sweep.json").read_text())["groups"]

    def read_only(path, data):
        raise OutputError(errno.EROFS, f"cannot write {path}: Read-only file system")

    monkeypatch.setattr(files, "write_bytes", read_only)
    out = io.StringIO()
    assert summarize(tmp_path / "s", Console(file=out, width=80)) is not None
    assert "norm=batch" in out.getvalue() and "the table is printed only" in " ".join(out.getvalue().split())


@pytest.mark.parametrize(
    "folder, reason",
    [
        ("/proc/no/run", "no folder can be made in /proc"),
        ("x" * 300, "is longer than the 255 bytes a name may have here"),
        ("a_file/run", "a_file is a file, not a folder"),
    ],
)
def test_an_output_folder_that_cannot_be_made_is_refused_before_anything_is_written(tmp_path, folder, reason):
    (tmp_path / "a_file").write_text("")
    for option, mode in (("hydra.run.dir", []), ("hydra.sweep.dir", ["-m", "seed=0,1"])):
        out = bnlab("train", *mode, *TINY, f"{option}={folder}", cwd=tmp_path)
        text = " ".join((out.stdout + out.stderr).split())
        assert out.returncode == 2 and f"{option}=" in text and reason in text and "Traceback" not in text, text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def gone(pid: int) -> bool:
    """Exited (a zombie nobody reaps counts: the container's init may not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.slow
def test_workers_of_a_killed_launcher_stop_their_runs_and_exit(tmp_path):
    cmd = [*CLI, "train", "-m", *LONG, "trainer.fuse=false", "seed=0,1", "hydra.launcher.n_jobs=2", "hydra.sweep.dir=s"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list((tmp_path / "s").glob("*/checkpoint.pt"))) < 2:  # both workers train
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    workers = [p for p in children(proc.pid) if "python" in Path(f"/proc/{p}/cmdline").read_text()]
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 60
    while not all(gone(p) for p in workers):
        assert time.monotonic() < deadline, "the workers of a killed launcher did not exit within 60 s"
        time.sleep(0.2)
    statuses = {json.loads(p.read_text())["status"] for p in (tmp_path / "s").glob("*/summary.json")}
    assert statuses <= {"interrupted", "completed"} and statuses  # each stopped after its step, summary written


@pytest.mark.parametrize(
    "override, says",
    [
        ("model.widths=[50000,50000,50000]", "needs about 5"),  # 56 GiB: more than any machine running this has free
        ("seed=99999999999999999999", "seed=99999999999999999999 is not accepted"),
    ],
)
def test_a_run_that_cannot_fit_or_seed_is_refused_before_any_folder(tmp_path, override, says):
    out = bnlab("train", *TINY, override, cwd=tmp_path)
    text = " ".join((out.stdout + out.stderr).split())
    assert out.returncode == 2 and says in text and "Traceback" not in text, text
    assert not (tmp_path / "outputs").exists()


def test_events_cut_off_are_named_in_the_report(tmp_path):
    sweep = ["train", "-m", *TINY, "trainer.max_steps=20", "trainer.eval_every=5", "norm=none,batch"]
    assert bnlab(*sweep, "hydra.sweep.dir=s", cwd=tmp_path).returncode == 0
    (events,) = (tmp_path / "s" / "norm=batch").glob("events.out.tfevents.*")
    events.write_bytes(events.read_bytes()[:400])  # a full disk, or a kill mid-write: the first few points left
    assert bnlab("report", "s", cwd=tmp_path).returncode == 0
    text = (tmp_path / "s" / "report.md").read_text()
    assert re.search(r"TensorBoard events of norm=batch end at step \d+, before its last step 20", text)


def test_a_sweep_whose_run_lost_its_summary_exits_1_naming_it(tmp_path):
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(
        textwrap.dedent("""
            import errno
            from bnlab.record import files

            write = files.write_bytes

            def no_space_for_batch(path, data):  # ENOSPC at one run's summary.json, as on a full disk
                if path.name == "summary.json" and path.parent.name == "norm=batch":
                    raise files.OutputError(errno.ENOSPC, f"cannot write {path}: No space left on device")
                write(path, data)

            files.write_bytes = no_space_for_batch
        """)
    )
    sweep = ["train", "-m", *TINY, "trainer.max_steps=2", "norm=none,batch", "hydra.sweep.dir=s"]
    out = bnlab(*sweep, cwd=tmp_path, env={"PYTHONPATH": str(tmp_path / "inject")})
    text = " ".join((out.stdout + out.stderr).split())
    assert out.returncode == 1 and "1 run left no summary.json (not in the table): norm=batch" in text, text


def test_a_file_system_without_hard_links_keeps_the_previous_checkpoint_as_a_copy(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    for step in (2, 4):
        checkpoint.save(tmp_path, {"step": step, "model": {"w": torch.ones(2) * step}})
    assert checkpoint.load(tmp_path)["step"] == 4
    (tmp_path / checkpoint.CHECKPOINT).write_bytes(b"cut off")
    assert checkpoint.load(tmp_path)["step"] == 2
