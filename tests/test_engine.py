"""What a sweep's jobs share and what an evaluation costs: each data set is loaded once per process and
shared read-only among its jobs, and the test set is evaluated in as few passes as memory allows (one
for the MLP on MNIST's test set), every member of a fused group in each pass, without a read from the
device until the loop needs the numbers."""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch

import bnlab.run.engine as engine
from bnlab.core.models import build_model
from bnlab.run.engine import Single, evaluate, examples_per_pass, prepare
from bnlab.run.fused.engine import Fused, build_fused
from bnlab.run.train import train


@pytest.fixture
def loads(monkeypatch) -> list[str]:
    """The data sets load_data reads from here on, in a process whose shared data starts empty."""
    read: list[str] = []
    load = engine.load_data
    monkeypatch.setattr(engine, "_DATASETS", OrderedDict())
    monkeypatch.setattr(engine, "load_data", lambda cfg, device: read.append(cfg.name) or load(cfg, device))
    return read


def test_a_process_loads_each_data_set_once_for_all_its_jobs(tiny_config, tmp_path, loads):
    train(tiny_config(), tmp_path / "a")
    train(tiny_config("seed=1", "norm=layer", "data.batch_size=8", "optim.lr=0.1"), tmp_path / "b")
    assert loads == ["synthetic"]
    train(tiny_config("data.seed=1"), tmp_path / "c")  # another task
    train(tiny_config("trainer.precision=fp64"), tmp_path / "d")  # the same task in float64
    assert loads == ["synthetic"] * 3


def test_jobs_share_the_data_read_only(tiny_config, loads):
    cfg = tiny_config()
    _, first = prepare(cfg)
    original = first.train_x.clone()
    first.train_x = first.train_x + 1  # a job may replace its own Dataset's tensors ...
    _, second = prepare(cfg)
    assert second is not first and torch.equal(second.train_x, original)  # ... which the next job never sees
    assert second.test_x is prepare(cfg)[1].test_x and loads == ["synthetic"]
    with pytest.raises(RuntimeError, match="[Ii]nference tensor"):
        second.train_x.mul_(0)  # torch refuses an in-place change (after making it)


def test_a_job_that_changes_the_shared_data_fails_and_the_next_job_loads_it_afresh(
    tiny_config, tmp_path, loads, monkeypatch
):
    cfg = tiny_config("trainer.precision=fp64")
    clean = train(copy.deepcopy(cfg), tmp_path / "clean")
    step = Single.step

    def vandal(self, i):
        self.data.train_x.mul_(0)
        return step(self, i)

    monkeypatch.setattr(Single, "step", vandal)
    with pytest.raises(RuntimeError, match="[Ii]nference tensor"):
        train(copy.deepcopy(cfg), tmp_path / "vandal")
    monkeypatch.setattr(Single, "step", step)
    after = train(copy.deepcopy(cfg), tmp_path / "after")
    assert after.final == clean.final and loads == ["synthetic"] * 2


def test_training_on_shared_data_equals_training_on_freshly_loaded_data(tiny_config, tmp_path, loads):
    cfg = tiny_config("trainer.precision=fp64")
    shared = [train(copy.deepcopy(cfg), tmp_path / f"shared{i}") for i in range(2)]
    engine._DATASETS.clear()
    fresh = train(copy.deepcopy(cfg), tmp_path / "fresh")
    assert shared[0].final == shared[1].final == fresh.final and loads == ["synthetic"] * 2


def mnist_mlp(tiny_config):
    cfg = tiny_config("model=mlp", "model.widths=[100,100,100]")
    return cfg, torch.zeros(10_000, 1, 28, 28)  # MNIST's test set, in shape


def passes(model: torch.nn.Module, run, members: int = 1) -> int:
    """How many forward passes of `model` over more than two examples run() makes (examples_per_pass probes
    the model with two)."""
    sizes = []
    hook = model.register_forward_hook(lambda m, inputs, out: sizes.append(inputs[0].shape[members > 1]))
    try:
        run()
    finally:
        hook.remove()
    return sum(size > 2 for size in sizes)


def test_the_mlp_evaluates_the_mnist_test_set_in_one_pass(tiny_config):
    cfg, x = mnist_mlp(tiny_config)
    model = build_model(cfg, (1, 28, 28), 10)
    assert examples_per_pass(model, x) >= len(x)
    assert passes(model, lambda: evaluate(model, x, torch.zeros(len(x), dtype=torch.long))) == 1


def test_a_norm_over_single_values_is_probed_with_the_two_examples_it_needs(tiny_config):
    cfg = tiny_config("model=mlp", "model.widths=[1]", "norm=group", "norm.groups=1")  # one value per group
    model = build_model(cfg, (1, 28, 28), 10)
    x = torch.zeros(100, 1, 28, 28)
    assert examples_per_pass(model, x) >= len(x)
    assert evaluate(model, x, torch.zeros(len(x), dtype=torch.long)).shape == (1, 2)


def test_a_fused_group_evaluates_every_member_in_each_pass(tiny_config):
    cfg, x = mnist_mlp(tiny_config)
    cfgs = [copy.deepcopy(cfg) for _ in range(4)]
    for seed, c in enumerate(cfgs):
        c.seed = seed
    fused = build_fused(cfgs, (1, 28, 28), 10)
    per_pass = examples_per_pass(fused, x, members=4)
    assert len(x) // 4 <= per_pass < len(x)  # four members' activations: about a quarter of the examples per pass
    y = torch.zeros(len(x), dtype=torch.long)
    assert passes(fused, lambda: evaluate(fused, x, y, members=4), members=4) == -(-len(x) // per_pass)


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_an_evaluation_in_any_number_of_passes_gives_the_same_numbers(tiny_config, model):
    cfg = tiny_config(f"model={model}", "trainer.precision=fp64")
    device, data = prepare(cfg)
    single = Single(cfg, data, device, None, None)
    whole = evaluate(single.model, data.test_x, data.test_y)
    assert whole.shape == (1, 2) and whole.device == data.test_x.device  # a tensor, not read from the device yet
    torch.testing.assert_close(evaluate(single.model, data.test_x, data.test_y, chunk=7), whole, rtol=1e-12, atol=0)
    cfgs = [copy.deepcopy(cfg) for _ in range(3)]
    for seed, c in enumerate(cfgs):
        c.seed = seed
    fused = Fused(cfgs, data, device).evaluate()
    assert fused.shape == (3, 2)
    torch.testing.assert_close(fused[0], whole[0], rtol=1e-12, atol=0)  # member 0 is the single run's model
