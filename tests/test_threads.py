"""trainer.threads=auto (bnlab/run/threads.py, bnlab.run.engine.thread_count) and hydra.launcher.n_jobs=auto: one
thread for the small models, more only where a step has the work for them, never more than the cores."""

from __future__ import annotations

import math

import pytest
from helpers import compose_config

from bnlab.face.fusing import at_once
from bnlab.run.engine import step_flops, thread_count
from bnlab.run.threads import MIN_FLOPS_PER_THREAD, auto_threads, usable_cores


def test_the_flops_of_a_step_are_torch_s_count_of_its_matrix_products_and_convolutions():
    # 2 FLOPs a multiply-add: forward, then backward the weights' gradients and the inputs' but the first layer's
    mlp = compose_config([])  # the MNIST MLP 784-100-100-100-10 at batch 60
    layers = [784 * 100, 100 * 100, 100 * 100, 100 * 10]
    assert step_flops(mlp) == 60 * 2 * (sum(layers) + sum(layers) + sum(layers[1:]))
    assert step_flops(compose_config(["norm=batch"])) == step_flops(mlp)  # a norm's elementwise work is not counted
    cnn = compose_config(["model=cnn", "model.widths=[8]", "data.batch_size=2"])
    conv, head = 8 * 28 * 28 * 1 * 3 * 3, 8 * 10  # one 3x3 conv, 1 -> 8 channels, same padding; the classifier
    assert step_flops(cnn) == 2 * 2 * (conv + head + conv + 2 * head)
    assert step_flops(compose_config(["trainer.devices=2"])) == step_flops(mlp) / 2  # each process's share


@pytest.mark.parametrize(
    "flops, cores, threads",
    [
        (0, 8, 1),
        (MIN_FLOPS_PER_THREAD - 1, 8, 1),
        (2 * MIN_FLOPS_PER_THREAD, 8, 2),
        (100 * MIN_FLOPS_PER_THREAD, 8, 8),
        (math.inf, 8, 8),
    ],
)
def test_auto_gives_a_thread_per_step_of_work_up_to_the_cores(flops, cores, threads):
    assert auto_threads(flops, cores) == threads
    assert auto_threads(flops, 1) == 1


def test_small_models_train_with_one_thread_and_large_ones_with_the_cores():
    assert thread_count([compose_config([])], cores=2) == 1  # the README's main job
    assert thread_count([compose_config(["model=cnn"])], cores=2) == 1
    big = compose_config(["model=resnet", "model.widths=[64,128,256]", "data.batch_size=256"])
    assert thread_count([big], cores=2) == 2
    assert thread_count([compose_config(["trainer.threads=2"])], cores=16) == 2  # a count is a count


def test_a_sweep_of_small_models_trains_one_group_per_core():
    small = [[compose_config(["data=synthetic"])]] * 5
    assert at_once("auto", small[:1]) == 1  # never more than there are groups
    assert at_once("auto", small) == min(5, usable_cores())
    assert at_once(3, small) == 3 and at_once(-1, small) == at_once("auto", small)
