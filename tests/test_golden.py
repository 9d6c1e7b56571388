"""Golden numbers: every preset, reduced to one run of 20 steps on the synthetic task in float64 with one
torch thread, must end with the numbers stored in tests/golden.json (final metrics, iterations to two
thresholds, the last value of each diagnostic it logs), to 1e-6 (relative, and absolute near 0). float64
keeps the numbers nearly the same from machine to machine: the 25-layer deep linear network of the
Santurkar presets turns the last bits of another CPU's kernels into differences of about 1e-7 (an Intel
and an AMD AVX-512 machine), while changing a default such as BN's eps moves numbers by 1e-4. So a
failure means the numerics changed: a default, a layer, the loop. When that is on purpose, regenerate
the file and say why in the commit:

    python tests/test_golden.py --update
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from helpers import compose_config, scalars
from hydra import compose, initialize_config_module
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep

from bnlab.core.data import DATASETS
from bnlab.face.overrides import group_options
from bnlab.run.train import train

GOLDEN = Path(__file__).with_name("golden.json")
SETTINGS = [
    "data=synthetic",
    "data.num_train=256",
    "data.num_test=128",
    "data.image_size=8",
    "data.batch_size=32",
    "trainer.device=cpu",
    "trainer.threads=1",
    "trainer.precision=fp64",
    "trainer.max_steps=20",
    "trainer.eval_every=5",
    "trainer.checkpoint_every=0",
    "threshold.values=[0.3,0.5]",
    "diag.every=10",
    "diag.probe=64",
]
DIAGNOSTIC = re.compile(r"^(act|ics|landscape|grad_norm|stat_drift)/")
TOLERANCE = 1e-6  # relative, and absolute for numbers near 0 (a cosine near 0.001)


def one_run(preset: str) -> list[str]:
    """The preset's overrides for one of its runs: the first value of every key its sweep varies (batch norm
    where the sweep has it, since its numbers are the subject; a searched interval's start)."""
    with initialize_config_module("bnlab.conf", version_base="1.3"):
        cfg = compose("train", overrides=[f"+experiment={preset}"], return_hydra_config=True)
    params = [f"{k}={v}" for k, v in (cfg.hydra.sweeper.get("params") or {}).items()]
    first = []
    for o in OverridesParser.create().parse_overrides(params):
        if isinstance(o.value(), IntervalSweep):  # a tuning sweeper's search space: its start
            values = [str(o.value().start)]
        else:
            values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
        value = "batch" if o.key_or_group == "norm" and "batch" in values else values[0]
        first.append(f"{'+' if o.is_add() else ''}{o.key_or_group}={value}")
    return first


def numbers(preset: str, tmp_path: Path) -> dict:
    """What one reduced run of the preset ends with (on the synthetic task, unless the preset's own data is
    generated too: the deep linear network's regression keeps its task)."""
    own = compose_config([f"+experiment={preset}", *one_run(preset)])
    generated = DATASETS[own.data.name].make
    settings = [o for o in SETTINGS if not (generated and o.startswith(("data=", "data.image_size")))]
    settings += ["model.patch=4"] if own.model.name == "vit" else []  # 4 patches of the 8 x 8 images
    cfg = compose_config([f"+experiment={preset}", *one_run(preset), *settings])
    summary = train(cfg, tmp_path)
    logged = scalars(tmp_path)
    return {
        "status": summary.status.value,
        "final": summary.final,
        "iterations": {f"{t:g}": at for t, at in summary.iterations_to_threshold.items()},
        "diagnostics": {tag: points[-1][1] for tag, points in sorted(logged.items()) if DIAGNOSTIC.match(tag)},
    }


def close(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=TOLERANCE, abs=TOLERANCE)
    return a == b


@pytest.mark.parametrize("preset", group_options("experiment"))
def test_each_preset_ends_with_its_golden_numbers(preset, tmp_path):
    golden = json.loads(GOLDEN.read_text())
    assert preset in golden, f"no golden numbers for {preset}: run `python tests/test_golden.py --update`"
    got = numbers(preset, tmp_path)
    assert close(got, golden[preset]), f"{preset}: {got} != {golden[preset]} (numerics changed?)"


def update() -> None:
    import tempfile

    import torch

    torch.set_num_threads(1)
    out = {}
    for preset in group_options("experiment"):
        with tempfile.TemporaryDirectory() as tmp:
            out[preset] = numbers(preset, Path(tmp))
        print(preset, out[preset]["final"])
    GOLDEN.write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__" and sys.argv[1:] == ["--update"]:
    update()
