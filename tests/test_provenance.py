"""Provenance: what a sweep records of how its numbers were made, and how scripts/reproduce.py re-runs a
record under the same numerics (thread count, CPU kernels)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import DONE, ROOT, TINY, bnlab, script


@pytest.mark.slow
@pytest.mark.parametrize("kernels", ["", "default"])
def test_a_sweep_records_its_command_threads_and_cpu_kernels(kernels, tmp_path):
    env = {"ATEN_CPU_CAPABILITY": kernels} if kernels else {}
    out = bnlab("train", "-m", *TINY, "norm=none,batch", "hydra.sweep.dir=s", cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    p = json.loads((tmp_path / "s" / "provenance.json").read_text())
    assert p["command"].startswith("bnlab train -m data=synthetic") and p["command"].endswith(
        "norm=none,batch hydra.sweep.dir=s"
    )
    assert p["torch_threads"] == 1 and sum(p["runs"].values()) == 2 and set(p["runs"]) <= set(DONE)
    if kernels:
        assert p["cpu_kernels"] == "DEFAULT"  # ATEN_CPU_CAPABILITY lowered them
    else:
        assert p["cpu_kernels"] in ("DEFAULT", "AVX2", "AVX512", "VSX", "ZVECTOR", "NO AVX", "SVE256")


RECORD = {"command": "bnlab train -m norm=none,batch", "torch_threads": 2, "cpu_kernels": "AVX2"}


def test_reproduce_takes_the_recorded_threads_and_lowers_the_cpu_kernels_to_the_recorded_ones(monkeypatch):
    reproduce = script("reproduce")
    monkeypatch.setattr(reproduce, "cpu_kernels", lambda: "AVX512")
    args, env = reproduce.same_numerics(["norm=none,batch"], RECORD, None)
    assert args == ["norm=none,batch", "trainer.threads=2"]
    assert (env["ATEN_CPU_CAPABILITY"], env["MKL_ENABLE_INSTRUCTIONS"]) == ("avx2", "AVX2")
    args, env = reproduce.same_numerics(["trainer.threads=1"], {**RECORD, "cpu_kernels": "AVX512"}, None)
    assert args == ["trainer.threads=1"] and "ATEN_CPU_CAPABILITY" not in env  # the command's own threads
    monkeypatch.setattr(reproduce, "cpu_kernels", lambda: "AVX2")  # an AVX2 CPU cannot rise to AVX512
    assert "ATEN_CPU_CAPABILITY" not in reproduce.same_numerics([], {**RECORD, "cpu_kernels": "AVX512"}, None)[1]


def test_the_provenance_block_names_the_cpu_kernels_where_the_record_has_them():
    record_result = script("record_result")
    p = {
        **RECORD,
        "bnlab_version": "0.1.0",
        "bnlab_commit": "0123456789abcdef",
        "torch": "2.14.1",
        "python": "3.11.7",
        "machine": "AMD EPYC (family 25, model 17), 2 cores, Linux x86_64",
        "device": "cpu",
        "launcher": "BnlabLauncher",
        "started": "2026-12-03T15:00:00+00:00",
        "wall_time_s": 60.0,
        "runs": {"completed": 2},
    }
    text = record_result.provenance_text("main", p)
    assert "(cpu, 2 torch threads per run, AVX2 CPU kernels, BnlabLauncher): 2 completed in 1.0 min" in text
    del p["cpu_kernels"]  # a record made before they were recorded
    assert "(cpu, 2 torch threads per run, BnlabLauncher)" in record_result.provenance_text("main", p)


def test_the_docs_records_each_name_the_numerics_they_were_made_with():
    for path in sorted((ROOT / "docs" / "results").glob("*.json")):
        p = json.loads(path.read_text())["provenance"]
        assert p["torch_threads"] >= 1 and p["torch"] and p["machine"], path.name
        assert Path(path).stem in (ROOT / "docs" / "results.md").read_text(), path.name
