"""The everyday flows around a run, as a user meets them: the resume hint and `bnlab resume`, a resume
that would change the config, folders of one's own, refusals that touch nothing, one exit-code
policy, standard JSON after a divergence, a step budget below the evaluation interval, a disk that
fills up. The README's "When things go wrong" quotes the messages of helpers.MESSAGES (test_readme checks)."""

from __future__ import annotations

import errno
import json
import multiprocessing
import re
import resource
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers import DONE, LONG, MESSAGES, TINY, TRAIN, assert_equal_runs, bnlab, scalars, start, wait_for
from omegaconf import OmegaConf

import bnlab.run.checkpoint as checkpoints
from bnlab.face.callbacks import _check_not_a_sweep
from bnlab.face.hydra_setup import claim_folder
from bnlab.face.overrides import quote
from bnlab.record import files
from bnlab.record.files import OutputError
from bnlab.run.checkpoint import CHECKPOINT
from bnlab.run.train import Loop, train
from bnlab.schema.config import ConfigError

pytestmark = pytest.mark.slow


def the_run(cwd: Path) -> Path:
    (folder,) = (cwd / "outputs" / "runs").glob("*/*")
    return folder


def first_checkpoint(cwd: Path) -> Path:
    deadline = time.monotonic() + 120
    while not list((cwd / "outputs" / "runs").glob(f"*/*/{CHECKPOINT}")):
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    path = the_run(cwd) / CHECKPOINT
    wait_for(path)
    return path


# 1. Following the resume hint resumes the run, in its own folder.


def test_the_interrupt_hint_is_a_command_that_resumes_the_run(tmp_path, unbroken):
    proc = start(*LONG, cwd=tmp_path, output=True)
    first_checkpoint(tmp_path)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130
    hint = re.search(r"continue it with `(bnlab resume [^`]+)`", out)
    assert hint, out[-2000:]
    assert MESSAGES["interrupt"] in out
    resumed = bnlab(*shlex.split(hint.group(1))[1:], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert_equal_runs(the_run(tmp_path), unbroken)
    again = bnlab(*shlex.split(hint.group(1))[1:], cwd=tmp_path)
    assert again.returncode == 0 and MESSAGES["nothing"] in again.stdout


def test_a_killed_run_resumed_with_bnlab_resume_equals_the_unbroken_run(tmp_path, unbroken):
    proc = start(*LONG, cwd=tmp_path)
    checkpoint = first_checkpoint(tmp_path)
    proc.send_signal(signal.SIGKILL)  # no summary, no last checkpoint: only the periodic one
    proc.wait()
    assert torch.load(checkpoint, weights_only=False)["step"] < 1000
    resumed = bnlab("resume", str(the_run(tmp_path)), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert_equal_runs(the_run(tmp_path), unbroken)


def test_the_same_command_with_trainer_resume_continues_the_same_folder(tmp_path, unbroken):
    proc = start(*LONG, cwd=tmp_path)
    first_checkpoint(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = bnlab("train", *LONG, "trainer.resume=true", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "trainer.resume=true: continuing" in resumed.stdout
    assert_equal_runs(the_run(tmp_path), unbroken)  # the_run: still exactly one run folder


# 2. Resuming with a changed setting is refused and touches nothing.


def test_resuming_with_another_config_is_refused_and_leaves_the_folder_as_it_was(tmp_path):
    assert bnlab("train", *TINY, cwd=tmp_path).returncode == 0
    folder = the_run(tmp_path)
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    again = [*TINY, "norm=layer", "trainer.resume=true", f"hydra.run.dir={quote(str(folder))}"]
    out = bnlab("train", *again, cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    text = " ".join(out.stderr.split())
    assert "norm.name was 'batch', now 'layer'" in text and MESSAGES["changed"] in text
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before


# 3. Folders of one's own, and one process per run folder.


def test_two_sweeps_started_together_end_in_two_folders_with_separate_tables(tmp_path):
    sweep = " ".join(shlex.quote(a) for a in [*TRAIN, "-m", *TINY])
    line = f"{sweep} norm=none,batch > a.txt 2>&1 & {sweep} norm=layer,group > b.txt 2>&1 & wait"
    subprocess.run(["bash", "-c", line], cwd=tmp_path, check=True, timeout=300)
    sweeps = sorted((tmp_path / "outputs" / "sweeps").iterdir())
    assert len(sweeps) == 2

    def norms(sweep: Path) -> list[str]:
        return sorted(json.loads(p.read_text())["config"]["norm"]["name"] for p in sweep.glob("*/summary.json"))

    assert sorted(map(norms, sweeps)) == [["batch", "none"], ["group", "layer"]]
    for s in sweeps:
        assert len((s / "summary.csv").read_text().splitlines()) == 3  # a header and its own two groups


def test_a_claimed_folder_is_never_handed_out_twice(tmp_path):
    base = str(tmp_path / "outputs" / "sweeps" / "2026-11-22_10-00-00")
    assert claim_folder(base) == base and claim_folder(base) == base + "_2"
    with multiprocessing.get_context("spawn").Pool(6) as pool:  # six processes in the same instant
        claimed = pool.map(claim_folder, [base] * 6)
    assert len(set(claimed)) == 6 and base not in claimed


def test_two_processes_resuming_one_sweep_share_its_runs(tmp_path):
    short = [a for a in LONG if not a.startswith("trainer.max_steps=")] + ["trainer.max_steps=300"]
    args = ["-m", *short, "seed=0,1,2,3", "hydra.sweep.dir=sweep", "trainer.resume=true"]
    procs = [start(*args, cwd=tmp_path) for _ in range(2)]
    assert [p.wait(timeout=600) for p in procs] == [0, 0]
    runs = sorted(p.parent for p in (tmp_path / "sweep").glob("*/summary.json"))
    assert len(runs) == 4
    for run in runs:
        assert json.loads((run / "summary.json").read_text())["status"] in DONE
        trained = (run / "train.log").read_text().count("training from the start")
        assert trained == 1, run.name  # by one of the two processes


# 4. Refused input leaves no run folder; failed runs stay out of tables and figures unless asked for.


def test_a_failed_run_is_left_out_of_the_report_unless_asked_for(tmp_path):
    out = bnlab("train", "-m", *TINY, "data.batch_size=16,100", "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert out.returncode == 1
    assert bnlab("report", "sweep", cwd=tmp_path).returncode == 0
    text = (tmp_path / "sweep" / "report.md").read_text()
    assert "1 failed run left out" in text and re.search(r"\| all runs \| 1 \| (1/0|0/1)/0/0 \|", text)
    assert bnlab("report", "sweep", "--failed", cwd=tmp_path).returncode == 0
    assert "| data.batch_size=100 | 1 | 0/0/0/1 |" in (tmp_path / "sweep" / "report.md").read_text()


# 5. One exit-code policy: 0 done (diverged included), 1 some runs of a sweep failed, 2 refused, 130 interrupted.

EXIT_CASES = [
    (["train", *TINY, "optim.lr=abc"], 2, "optim.lr='abc' " + MESSAGES["type"]),
    (["train", *TINY, "threshold.values=0.9"], 2, "accepted values: a list in brackets"),
    (["train", "-m", *TINY, "optim.lr=0.01,", "0.1"], 2, MESSAGES["comma"]),
    (["train", "-m", "+experiment=init_lr_gird", *TINY], 2, "Did you mean 'init_lr_grid'?"),
    (["train", *TINY, "norm=none", "optim.lr=1e12"], 0, "diverged"),
    (["report", "outputs/nope"], 2, "outputs/nope is not a folder"),
    (["summarize", "outputs/nope"], 2, "outputs/nope is not a folder"),
    (["tb", "outputs/nope"], 2, "outputs/nope is not a folder"),
    (["resume", "."], 2, "is neither a run folder"),
    (["--version"], 0, "bnlab 0.1.0"),
]
if not shutil.which("sbatch"):
    EXIT_CASES.append((["train", "-m", *TINY, "hydra/launcher=slurm"], 2, MESSAGES["slurm"]))


@pytest.mark.parametrize("args, code, message", EXIT_CASES, ids=[" ".join(a[:4]) for a, _, _ in EXIT_CASES])
def test_exit_codes_and_messages(tmp_path, args, code, message):
    out = bnlab(*args, cwd=tmp_path)
    text = " ".join((out.stdout + out.stderr).split())
    assert out.returncode == code, text[-2000:]
    assert message in text and "Traceback" not in text
    if code == 2 and args[0] == "train":
        assert not (tmp_path / "outputs").exists()


def test_ctrl_c_during_start_up_exits_130_without_a_traceback(tmp_path):
    # a long run: a signal that a busy machine delivers late still finds it running, not ended with exit 0
    long = [*(o for o in TINY if not o.startswith("trainer.max_steps=")), "trainer.max_steps=100000"]
    proc = start(*long, cwd=tmp_path, output=True)
    maps, deadline = Path(f"/proc/{proc.pid}/maps"), time.monotonic() + 60
    while maps.exists() and "torch" not in maps.read_text() and time.monotonic() < deadline:
        time.sleep(0.01)  # wait for bnlab's own code to be importing torch (not the interpreter starting up)
    if not maps.exists():
        time.sleep(1.0)  # no /proc: still importing torch and composing the config, on a machine that is not busy
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err


# 6. A preset that sweeps is refused without -m.


def test_a_sweeping_preset_without_m_is_refused_with_the_m_command(tmp_path):
    out = bnlab("train", "+experiment=init_lr_grid", *TINY, cwd=tmp_path)
    assert out.returncode == 2 and MESSAGES["preset"] in " ".join(out.stderr.split())
    assert not (tmp_path / "outputs").exists()


def test_a_preset_runs_alone_when_the_command_line_fixes_every_key_it_sweeps_appends_included():
    sweeps = {"+baseline": "bn,none", "optim.lr": "0.01,0.1"}
    config = OmegaConf.create(
        {"hydra": {"overrides": {"task": []}, "sweeper": {"params": sweeps}, "runtime": {"choices": {}}}}
    )
    config.hydra.overrides.task = ["+baseline=none", "optim.lr=0.1"]
    _check_not_a_sweep(config)
    config.hydra.overrides.task = ["+baseline=none"]
    with pytest.raises(ConfigError, match="a sweep over optim.lr, so it runs with -m"):
        _check_not_a_sweep(config)


# 7. Every file bnlab writes is standard JSON, a diverged run's too.


def strict_json(text: str):
    def refuse(constant: str):
        raise ValueError(f"{constant} is not standard JSON")

    return json.loads(text, parse_constant=refuse)


def test_a_diverged_run_writes_standard_json_and_no_nan_to_tensorboard(tmp_path):
    args = ["norm=batch", "optim.lr=1000", "data=synthetic", "trainer.max_steps=200", "trainer.eval_every=50"]
    assert bnlab("train", *args, "trainer.device=cpu", "hydra.run.dir=run", cwd=tmp_path).returncode == 0
    summary = strict_json((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "diverged"
    for tag in ("test/loss", "test/acc", "train/loss"):
        assert all(v == v and abs(v) != float("inf") for _, v in scalars(tmp_path / "run")[tag]), tag


# 8. A step budget below the evaluation interval warns; the final evaluation still counts.


def test_a_budget_below_the_evaluation_interval_warns_and_the_last_evaluation_counts(tmp_path):
    args = [*TINY, "trainer.max_steps=30", "trainer.eval_every=1000", "threshold.values=[0.2]", "optim.lr=0.1"]
    out = bnlab("train", *args, "hydra.run.dir=run", cwd=tmp_path)
    assert out.returncode == 0
    assert "trainer.max_steps=30 is below trainer.eval_every=1000" in " ".join(out.stdout.split())
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    (reached,) = summary["iterations_to_threshold"]
    assert (reached["threshold"], reached["iterations"]) == (0.2, 30) and reached["seconds"] > 0


# 9. A disk that fills up mid-run: a clear stop, exit 2, and what was written stays valid.


def test_a_full_disk_stops_the_run_and_keeps_what_was_written(tiny_config, tmp_path, monkeypatch):
    cfg = tiny_config(*LONG[len(TINY) :], "trainer.max_steps=200")
    step = Loop.run

    def interrupted(self, stop):  # the first attempt is stopped at step 120 (its checkpoint is written there)
        stop.requested = None
        original = self.engine.step

        def step_or_stop(i):
            if i == 120:
                stop.requested = "SIGINT"
            return original(i)

        self.engine.step = step_or_stop
        return step(self, stop)

    monkeypatch.setattr(Loop, "run", interrupted)
    assert train(cfg, tmp_path).status == "interrupted"
    monkeypatch.setattr(Loop, "run", step)
    previous = (tmp_path / "summary.json").read_bytes()

    write = files.write_bytes

    def full_disk(path, data):  # from the first checkpoint of the resumed attempt (step 150) on
        raise OutputError(errno.ENOSPC, f"cannot write {path}: No space left on device")

    for module in (files, checkpoints):  # result files, and checkpoints
        monkeypatch.setattr(module, "write_bytes", full_disk)
    cfg.trainer.resume = True
    with pytest.raises(OutputError) as e:
        train(cfg, tmp_path)
    for module in (files, checkpoints):
        monkeypatch.setattr(module, "write_bytes", write)
    assert "No space left on device" in str(e.value) and "its last checkpoint (step 120)" in str(e.value)
    assert MESSAGES["disk"] in str(e.value)
    assert torch.load(tmp_path / CHECKPOINT, weights_only=False)["step"] == 120  # the interrupted attempt's
    assert (tmp_path / "summary.json").read_bytes() == previous  # the previous summary, whole
    assert scalars(tmp_path)["test/acc"][-1][0] >= 100  # the events are readable


def test_a_file_size_limit_stops_the_run_with_exit_2_and_a_failed_summary(tmp_path):
    def limit_file_size() -> None:  # a checkpoint of the LONG model (1.1 MB) cannot be written
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))

    cmd = [*TRAIN, *LONG, "hydra.run.dir=run"]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, preexec_fn=limit_file_size, timeout=300)
    text = " ".join((out.stdout + out.stderr).split())
    assert out.returncode == 2 and "File too large" in text and MESSAGES["disk"] in text and "Traceback" not in text
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["steps"] == 50 and "File too large" in summary["error"]
