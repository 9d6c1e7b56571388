"""The engine of fused training: N runs that differ only in keys marked MEMBER in bnlab/schema/config.py
(seed, lr, init, norm and optimizer constants, thresholds, ...; `can_fuse`) trained as one stacked model
(bnlab.run.fused.stacking's FusedModel) with the stacked optimizer (bnlab.run.fused.optim, each member's
optim.* values), each member following its separate run to float rounding. The loss is the sum of the
members' mean losses; `Fused` is the engine that bnlab.run.train's loop drives for a fused group
(bnlab.face.launcher forms the groups of a sweep); each member's diagnostics run on a copy of its model,
as an ordinary model."""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import asdict, replace
from typing import Any

import torch
from torch import Tensor, nn

from bnlab.core.data import Dataset
from bnlab.core.models import MODELS, build_model
from bnlab.core.norms import NORMS, fusable
from bnlab.core.optim import OPTIMIZERS
from bnlab.run.diagnostics import DiagnosticLog
from bnlab.run.engine import (
    LOCAL,
    Single,
    autocast,
    batches,
    evaluate,
    forward_backward,
    member_scores,
    prepare_model,
    skip,
)
from bnlab.run.fused.optim import STACKED, build_stacked_optimizer
from bnlab.run.fused.stacking import FusedModel, member_part
from bnlab.schema.config import BOOKKEEPING_KEYS, MEMBER_KEYS, ConfigError, TrainConfig, flatten

log = logging.getLogger(__name__)


def shared_config(cfg: TrainConfig) -> dict[str, str]:
    """The flattened config that the members of a fused group must share: all but the keys marked MEMBER
    or BOOKKEEPING in bnlab/schema/config.py, values as strings."""
    return {k: str(v) for k, v in flatten(asdict(cfg)).items() if k not in MEMBER_KEYS and k not in BOOKKEEPING_KEYS}


def can_fuse(cfgs: Sequence[TrainConfig]) -> str | None:
    """None if these runs can train as one fused model, else a short reason why not."""
    if not cfgs:
        return "no configs"
    flat = [shared_config(c) for c in cfgs]
    for key, value in flat[0].items():
        others = {f.get(key) for f in flat[1:]} - {value}
        if others:
            return f"{key} differs ({value} vs {', '.join(sorted(others))}); only {', '.join(MEMBER_KEYS)} may"
    cfg = cfgs[0]
    if cfg.model.dropout:  # the members' masks would come from one stream of random numbers, not each its own
        return "model.dropout > 0 has no stacked form"
    if cfg.model.input_norm:  # the members share their inputs, so a norm on them has nothing to stack
        return "model.input_norm=true has no stacked form"
    if cfg.model.name == "custom":
        names = [name for name in MODELS if name != "custom"]
        return f"model=custom has no stacked form (fusable: {', '.join(names)})"
    if not fusable(cfg.norm):
        names = [name for name, norm in NORMS.items() if norm.fuse is not None and name != "custom"]
        return (
            f"norm={cfg.norm.name} has no stacked form (fusable: {', '.join(names)}, and custom when its target "
            "declares per_channel = True)"
        )
    if OPTIMIZERS[cfg.optim.name].cls not in STACKED:
        names = [name for name, o in OPTIMIZERS.items() if o.cls in STACKED]
        return f"optim={cfg.optim.name} has no stacked form (fusable: {', '.join(names)})"
    return None


def build_fused(cfgs: Sequence[TrainConfig], in_shape: tuple[int, ...], num_classes: int) -> FusedModel:
    """Each member built exactly as train.py builds its model (torch.manual_seed(seed), build_model), stacked."""
    models = []
    for cfg in cfgs:
        torch.manual_seed(cfg.seed)
        models.append(build_model(cfg, in_shape, num_classes))
    return FusedModel(models)


# ---------------------------------------------------------------- training and evaluation


class Fused:
    """The engine of a fused group, bnlab.run.train's loop driving it as it drives `bnlab.run.engine.Single`: the
    runs as one FusedModel with a stacked optimizer, member n drawing its batches as its separate run
    would. `step` hands back each member's loss and count of correct predictions (N,), unread. A member
    whose loss turns non-finite goes on in the stack (its values are its own, so it disturbs no other)
    while its Run records no more steps."""

    group = LOCAL

    def __init__(
        self,
        cfgs: Sequence[TrainConfig],
        data: Dataset,
        device: torch.device,
        checkpoints: Sequence[dict] | None = None,
        writers: Sequence | None = None,
    ) -> None:
        reason = can_fuse(cfgs)
        if reason:
            raise ConfigError(f"these runs cannot be fused: {reason}")
        self.cfgs, self.data, self.device, self.members = list(cfgs), data, device, len(cfgs)
        self.model = prepare_model(build_fused(cfgs, data.in_shape, data.num_classes), cfgs[0].trainer, device)
        # Each member as an ordinary model, prepared as its run's model is (compiling aside): copied and filled
        # with the member's state for its diagnostics and precise BN.
        with torch.random.fork_rng(devices=[]):  # building draws initial weights: keep the RNG as it was
            models = [build_model(c, data.in_shape, data.num_classes) for c in cfgs]
        self.templates = [prepare_model(m, replace(c.trainer, compile=False), device) for m, c in zip(models, cfgs)]
        self.diagnostics = self._diagnostics(writers or [None] * self.members) if cfgs[0].diag.switched_on() else []
        if checkpoints:
            self.model.load_member_state_dicts([c["model"] for c in checkpoints])
        self.optimizer = build_stacked_optimizer(self.model, [c.optim for c in cfgs])
        self.inputs = self._distinct_inputs()
        self.orders = [
            batches(len(data.train_y), c.data.batch_size, torch.Generator(device=device).manual_seed(c.seed))
            for c in cfgs[:: self.members // self.inputs]
        ]
        log.info(
            "%d %s runs fused: %s, %d parameters, %d training examples",
            self.members,
            cfgs[0].model.name,
            device,
            sum(p.numel() for p in self.model.parameters()),
            len(data.train_y),
        )
        if checkpoints:
            self.optimizer.load_member_states([c["optimizer"] for c in checkpoints])
            for order in self.orders:
                skip(order, checkpoints[0]["step"])

    def _diagnostics(self, writers: Sequence) -> list[DiagnosticLog]:
        """Each member's diagnostics, on a copy of its model at each call, as its separate run has them."""
        data = self.data
        return [
            DiagnosticLog(
                c.diag,
                self.member_model(n),
                writers[n],
                data.test_x[: c.diag.probe],
                lambda n=n: self.lrs()[n],
                data.task,
            )
            for n, c in enumerate(self.cfgs)
        ]

    def _distinct_inputs(self) -> int:
        """Members of one seed draw the same batches: where the group is K equal blocks of one seed each (the
        launcher sorts it by seed), K batches are drawn and fed to the model once each, not N."""
        seeds = [c.seed for c in self.cfgs]
        k = len(set(seeds))
        return k if seeds == [s for s in dict.fromkeys(seeds) for _ in range(self.members // k)] else self.members

    def step(self, step: int) -> tuple[Tensor, Tensor]:
        k, per = self.inputs, self.members // self.inputs
        idx = torch.stack([next(o) for o in self.orders], 1).flatten()  # (B*K,), example-major: the stacked layout
        data = self.data
        # (K, B, ...) views of the K batches' examples and targets; member n's are x[n // per], y[n // per]
        x, y = (t.index_select(0, idx).unflatten(0, (-1, k)).transpose(0, 1) for t in (data.train_x, data.train_y))
        self.optimizer.zero_grad(set_to_none=True)
        losses, correct = forward_backward(self.scores, x, y, self.cfgs[0].trainer.accumulate, dim=1)
        self.optimizer.schedule([c.optim for c in self.cfgs], step, self.cfgs[0].trainer.max_steps)
        due = [(n, d) for n, d in enumerate(self.diagnostics) if d.due(step)]
        for n, diagnostics in due:  # at the step's weights and gradients, before the update
            if diagnostics.needs_gradients:
                diagnostics.model = self.member_model(n, gradients=True)
                diagnostics.before_step(step, x[n // per], y[n // per])
        self.optimizer.step()
        for n, diagnostics in due:
            diagnostics.model = self.member_model(n)
            diagnostics.after_step(step, x[n // per], y[n // per])
        return losses.float(), correct

    def scores(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Each member's mean loss and correct count on (K, B, ...) batches, K distinct inputs for N members."""
        per = self.members // self.inputs
        with autocast(self.cfgs[0].trainer, self.device):
            return member_scores(self.data.task, self.model(x), y.repeat_interleave(per, 0) if per > 1 else y)

    def evaluate(self) -> Tensor:
        with autocast(self.cfgs[0].trainer, self.device):
            return evaluate(self.model, self.data.test_x, self.data.test_y, self.data.task, members=self.members)

    def lrs(self) -> list[float]:
        return self.optimizer.lrs()

    def member_state(self, n: int) -> dict[str, Any]:
        """Member n's checkpoint: its model as the ordinary model's state_dict, its part of the optimizer."""
        return {"model": self.model.member_state_dict(n), "optimizer": self.optimizer.member_state(n)}

    def member_model(self, n: int, gradients: bool = False) -> nn.Module:
        """Member n as an ordinary model (a copy), with its part of every gradient if asked."""
        model = copy.deepcopy(self.templates[n])
        model.load_state_dict(self.model.member_state_dict(n))
        if gradients:
            stacked = dict(self.model.net.named_parameters())
            for name, p in model.named_parameters():
                grad = stacked[name].grad
                p.grad = None if grad is None else member_part(grad, self.members, n).clone()
        return model


def activation_bytes(engine: Fused | Single) -> int:
    """Bytes of the activations autograd keeps for backward during one training step of `engine` (a fused
    group or, for comparison, one run): the storages of the tensors it saves, each counted once, the
    parameters' own left out. scripts/bench_fused.py prints it; a test holds N members to N runs' worth."""
    params = {p.untyped_storage().data_ptr() for p in engine.model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        engine.step(1)
    return sum(storages.values())
