"""The TensorBoard tags of a run, each named once: bnlab.run writes them, bnlab.results reads them. The four
metric curves are also each metric's `tag` (bnlab.schema.metrics)."""

from __future__ import annotations

import re

TRAIN_LOSS, TRAIN_ACC = "train/loss", "train/acc"  # means over the steps between two evaluations
TEST_LOSS, TEST_ACC = "test/loss", "test/acc"
LR = "train/lr"  # the lr of the last step, optim.schedule applied
TRAINING = "train/"  # the prefix of the curves measured on training batches

# Diagnostics (diag.*): `prefix/name`
LANDSCAPE = "landscape"  # loss_min, loss_max, grad_change_min, ..., loss_variation, beta_smoothness
ICS = "ics"  # ics/layer{i}/l2, ics/layer{i}/cos
ACTIVATION = "act"  # act/{layer}/p{q}, act/{layer}/unit0/p{q} and the histogram act/{layer}
GRAD_NORM = "grad_norm"
STAT_DRIFT = "stat_drift"
PERCENTILES = (15, 50, 85)  # of a layer's nonlinearity input, as Ioffe & Szegedy's Fig. 1 draws them


def landscape(name: str) -> str:
    return f"{LANDSCAPE}/{name}"


def ics(layer: int, kind: str = "") -> str:
    """Layer i's ICS tags: the prefix, or with kind (l2 or cos) the tag."""
    return f"{ICS}/layer{layer}" + (f"/{kind}" if kind else "")


def activation(layer: int | str, unit0: bool = False) -> str:
    """A layer's percentiles (over all its units, or unit 0 alone) are this prefix plus /p15, /p50, /p85."""
    return f"{ACTIVATION}/{layer}" + ("/unit0" if unit0 else "")


ICS_L2 = re.compile(rf"^{ICS}/layer(\d+)/l2$")  # group 1: the layer
UNIT0 = re.compile(rf"^{ACTIVATION}/(-?\d+)/unit0/p(\d+)$")  # group 1: the layer, group 2: the percentile
