"""Fused training: N runs that differ only in keys marked MEMBER in bnlab/schema.py (seed, lr, init, norm
and optimizer constants, thresholds, ...; `can_fuse`) trained as one stacked model, each member following
its separate run to float rounding. `FusedModel` walks the members' ordinary models and swaps each layer
for its stacked counterpart on activations laid out as bnlab.stacking describes: a Linear becomes a
batched matmul, a Conv2d a grouped conv, and a norm whatever its registry entry says (the same norm
over N*C channels, so no statistic crosses members), or, where the members' norm settings differ,
each member's own layer on its channels. Every stacked tensor is the members' tensors concatenated
along dim 0, which `member_state_dict` splits back. The optimizer is the registry's stacked form (each
member's optim.* values), the loss is the sum of the members' mean losses, and `Fused` is the engine
that bnlab.train's loop drives for a fused group (bnlab.launcher forms the groups of a sweep); each
member's diagnostics run on a copy of its model, as an ordinary model."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from typing import Any

import torch
from torch import Tensor, nn

from bnlab.baselines import Scalar, WSConv2d, WSLinear, standardize
from bnlab.data import Dataset
from bnlab.diagnostics import DiagnosticLog
from bnlab.engine import LOCAL, Single, autocast, batches, evaluate, member_scores, prepare_model, skip
from bnlab.models import CNN, MLP, MODELS, BasicBlock, ResNet, Unit, build_model
from bnlab.norms import NORMS, stackable, stackers
from bnlab.optim import OPTIMIZERS, build_stacked_optimizer, current_lrs, schedule_lr
from bnlab.schema import BOOKKEEPING_KEYS, MEMBER_KEYS, ConfigError, TrainConfig, flatten
from bnlab.stacking import Memberwise, member_part, settings, unchanged, widen

log = logging.getLogger(__name__)


def shared_config(cfg: TrainConfig) -> dict[str, str]:
    """The flattened config that the members of a fused group must share: all but the keys marked MEMBER
    or BOOKKEEPING in bnlab/schema.py, values as strings."""
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
    if cfg.model.name == "custom":
        fusable = [name for name in MODELS if name != "custom"]
        return f"model=custom has no stacked form (fusable: {', '.join(fusable)})"
    if not stackable(cfg.norm):
        fusable = [name for name, norm in NORMS.items() if norm.stack is not None and name != "custom"]
        return (
            f"norm={cfg.norm.name} has no stacked form (fusable: {', '.join(fusable)}, and custom when its target "
            "declares per_channel = True)"
        )
    if OPTIMIZERS[cfg.optim.name].stacked is None:
        fusable = [name for name, o in OPTIMIZERS.items() if o.stacked is not None]
        return f"optim={cfg.optim.name} has no stacked form (fusable: {', '.join(fusable)})"
    return None


# ---------------------------------------------------------------- stacked layers


class _BatchedLinear(torch.autograd.Function):
    """y[n] = x[:, n] W[n]^T + b[n] for x (B, N, in), W (N, out, in) and b (N, out) or None; y (N, B, out).

    torch.baddbmm computes the same, but its autograd hands back either the weight's gradient
    transposed (a copy of the largest tensor every step) or the input's gradient column-major
    (elementwise backward kernels downstream run several times slower on it). This backward is
    F.linear's, batched: each gradient comes out in the layout of its tensor. x is taken and saved as
    the (B, N, in) view of the layer's input, whose storage the previous activation keeps anyway, so
    the saved activations of N members take N times one run's memory, not more.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        xs, wt = x.transpose(0, 1), weight.transpose(1, 2)  # (N, B, in), (N, in, out): views
        return torch.bmm(xs, wt) if bias is None else torch.baddbmm(bias.unsqueeze(1), xs, wt)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        grad_x = torch.bmm(grad, weight).transpose(0, 1) if ctx.needs_input_grad[0] else None  # (B, N, in)
        grad_w = torch.bmm(grad.transpose(1, 2), x.transpose(0, 1)) if ctx.needs_input_grad[1] else None  # (N, out, in)
        grad_b = grad.sum(1) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


class StackedLinear(nn.Module):
    """N Linear layers as one batched matmul, (B, N*in) -> (B, N*out); weight (N*out, in) and bias
    (N*out,) are the members' weights and biases one after another. As the model's first layer it may take
    K < N inputs (B, K*in), input k shared by the N/K members k*N/K, ... (`inputs`, set by FusedModel): K
    matmuls of N/K members' weights each, not N over K inputs copied N/K times."""

    def __init__(self, linear: nn.Linear, members: int) -> None:
        super().__init__()
        self.members, self.in_features, self.out_features = members, linear.in_features, linear.out_features
        self.inputs = members
        self.weight = nn.Parameter(linear.weight.new_empty(members * self.out_features, self.in_features))
        bias = None if linear.bias is None else nn.Parameter(linear.bias.new_empty(members * self.out_features))
        self.register_parameter("bias", bias)

    def _weight(self) -> Tensor:
        return self.weight

    def forward(self, x: Tensor) -> Tensor:
        k, b, out = self.inputs, x.shape[0], self.members * self.out_features
        w = self._weight().view(k, out // k, self.in_features)  # input k's members' weights, one after another
        bias = None if self.bias is None else self.bias.view(k, out // k)
        y = _BatchedLinear.apply(x.reshape(b, k, self.in_features), w, bias)  # (K, B, N/K*out)
        return y.transpose(0, 1).reshape(b, out)  # row-major again, as norms and activations like it


class StackedWSLinear(StackedLinear):
    """N scaled-standardized Linear layers (bnlab.baselines.WSLinear): each member's rows standardized on their
    own, with their gains (N*out,), then batched."""

    def __init__(self, linear: WSLinear, members: int) -> None:
        super().__init__(linear, members)
        self.gain = nn.Parameter(linear.gain.new_empty(members * self.out_features))
        self.gamma = linear.gamma

    def _weight(self) -> Tensor:
        return standardize(self.weight, self.gain, self.gamma)


def _flatten(m: nn.Flatten, n: int) -> nn.Flatten:
    """(B, N*C, H, W) -> (B, N*C*H*W) keeps each member's values together only when all dims but B flatten."""
    if (m.start_dim, m.end_dim) != (1, -1):
        raise TypeError(f"only Flatten(1, -1) stacks, not Flatten({m.start_dim}, {m.end_dim})")
    return unchanged(m, n)


STATELESS = (nn.Identity, nn.ReLU, nn.Sigmoid, nn.Tanh, nn.GELU, nn.MaxPool2d, nn.AdaptiveAvgPool2d)

# Layer type (exact, not subclasses) -> its stacked counterpart, built from one member's layer and N; the
# norms' come from their registry entries.
STACKERS: dict[type, Callable[[nn.Module, int], nn.Module]] = {
    nn.Linear: StackedLinear,
    nn.Conv2d: lambda m, n: widen(m, n, "in_channels", "out_channels", "groups"),
    WSLinear: StackedWSLinear,
    WSConv2d: lambda m, n: widen(m, n, "in_channels", "out_channels", "groups"),
    Scalar: widen,
    nn.Flatten: _flatten,
    **{t: unchanged for t in STATELESS},
    **stackers(),
}
# Modules without parameters of their own whose forward only calls children and adds their outputs.
CONTAINERS = (nn.Sequential, MLP, CNN, ResNet, Unit, BasicBlock)


def stack_module(layers: Sequence[nn.Module]) -> nn.Module:
    """The stacked counterpart of the members' layers, one per member, all of one kind (parameters and
    buffers not yet filled in): the layer's stacked form, or `Memberwise` where their settings differ."""
    m, n = layers[0], len(layers)
    kind = type(m)
    if kind in STACKERS:
        return Memberwise(layers) if any(settings(x) != settings(m) for x in layers[1:]) else STACKERS[kind](m, n)
    if kind in CONTAINERS and not m._parameters and not m._buffers:
        new = copy.copy(m)
        new._parameters, new._buffers = {}, {}
        new._modules = {name: stack_module([x._modules[name] for x in layers]) for name in m._modules}
        return new
    raise TypeError(f"{kind.__name__} has no stacked counterpart (see bnlab.fused.STACKERS)")


def entry_layer(net: nn.Module) -> StackedLinear | None:
    """The stacked model's first layer with parameters if it is a StackedLinear with only stateless layers
    before it (an MLP), which can take inputs that several members share; otherwise None. A convolution
    does not: over a shared input of one channel a CPU convolution leaves the channels-last layout and
    every later layer runs about twice as slow, so each member gets its copy of the input there."""
    for m in net.modules():  # the built-in models register their layers in the order they run
        if next(m.children(), None) is not None or isinstance(m, (nn.Flatten, *STATELESS)):
            continue
        return m if isinstance(m, StackedLinear) else None
    return None


class FusedModel(nn.Module):
    """N ordinary bnlab models of one architecture as one stacked model; member n starts as models[n]."""

    def __init__(self, models: Sequence[nn.Module]) -> None:
        super().__init__()
        if not models:
            raise ValueError("FusedModel needs at least one model")
        states = [m.state_dict() for m in models]
        layout = [(k, v.shape, v.dtype) for k, v in states[0].items()]
        for i, state in enumerate(states[1:], 1):
            if [(k, v.shape, v.dtype) for k, v in state.items()] != layout:
                raise ValueError(f"model {i} differs from model 0 in its parameters or buffers")
        self.members = len(models)
        self.net = stack_module(models)
        self.load_member_state_dicts(states)
        # Feature maps channels-last: CPU grouped convs (their backward most of all) and max-pooling run
        # markedly faster on them than on contiguous ones.
        self.channels_last = any(isinstance(m, nn.Conv2d) for m in self.net.modules())
        self.entry = entry_layer(self.net)
        self.train(models[0].training)

    def forward(self, x: Tensor) -> Tensor:
        """Inputs (K, B, *example shape) -> logits (N, B, classes) for K dividing N: member n applied to
        x[n // (N/K)], so K = N gives each member its own examples and K = 1 gives all the same ones (an
        evaluation; members drawing the same batches). The entry layer takes the K inputs as they are."""
        k, b = x.shape[:2]
        n = self.members
        if k == 0 or n % k:
            raise ValueError(f"expected inputs for {n} members or a divisor of {n}, got shape {tuple(x.shape)}")
        if k < n and self.entry is None:  # each member its own copy of its input (a conv model)
            x = x.unsqueeze(1).expand(k, n // k, *x.shape[1:]).reshape(n, *x.shape[1:])
            k = n
        stacked = x.transpose(0, 1).reshape(b, k * x.shape[2], *x.shape[3:])  # (B, K*C, ...)
        if self.channels_last and stacked.dim() == 4:
            stacked = stacked.contiguous(memory_format=torch.channels_last)
        if self.entry is not None:
            self.entry.inputs = k
        return self.net(stacked).view(b, n, -1).transpose(0, 1)

    def load_member_state_dicts(self, states: Sequence[dict[str, Tensor]]) -> None:
        """Load every member from its ordinary model's state_dict, in member order (values are copied
        into the stacked tensors, which keep their dtype and device)."""
        stacked = {}
        for k in states[0]:
            parts = [s[k] for s in states]
            if parts[0].dim() == 0 and any(not torch.equal(p, parts[0]) for p in parts):
                raise ValueError(f"{k} is shared by the stacked members but differs between the models")
            stacked[k] = parts[0] if parts[0].dim() == 0 else torch.cat(parts)
        self.net.load_state_dict(stacked)

    def member_state_dict(self, n: int) -> dict[str, Tensor]:
        """Member n's parameters and buffers as the ordinary model's state_dict (copies)."""
        return {k: member_part(v, self.members, n).clone() for k, v in self.net.state_dict().items()}


def build_fused(cfgs: Sequence[TrainConfig], in_shape: tuple[int, ...], num_classes: int) -> FusedModel:
    """Each member built exactly as train.py builds its model (torch.manual_seed(seed), build_model), stacked."""
    models = []
    for cfg in cfgs:
        torch.manual_seed(cfg.seed)
        models.append(build_model(cfg, in_shape, num_classes))
    return FusedModel(models)


# ---------------------------------------------------------------- training and evaluation


class Fused:
    """The engine of a fused group, bnlab.train's loop driving it as it drives `bnlab.engine.Single`: the
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
        writers = writers or [None] * self.members
        self.diagnostics = (
            [  # each member's, on a copy of its model at each call, as its separate run has them
                DiagnosticLog(
                    c.diag,
                    self.member_model(n),
                    writers[n],
                    data.test_x[: c.diag.probe],
                    lambda n=n: self.lrs()[n],
                    data.task,
                )
                for n, c in enumerate(cfgs)
            ]
            if cfgs[0].diag.switched_on()
            else []
        )
        if checkpoints:
            self.model.load_member_state_dicts([c["model"] for c in checkpoints])
        self.optimizer = build_stacked_optimizer(self.model, [c.optim for c in cfgs])
        # Members of one seed draw the same batches: where the group is K equal blocks of one seed each (the
        # launcher sorts it by seed), K batches are drawn and fed to the model once each, not N.
        seeds = [c.seed for c in cfgs]
        k = len(set(seeds))
        self.inputs = (
            k if seeds == [s for s in dict.fromkeys(seeds) for _ in range(self.members // k)] else self.members
        )
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

    def step(self, step: int) -> tuple[Tensor, Tensor]:
        k, per = self.inputs, self.members // self.inputs
        idx = torch.stack([next(o) for o in self.orders], 1).flatten()  # (B*K,), example-major: the stacked layout
        data = self.data
        # (K, B, ...) views of the K batches' examples and targets; member n's are x[n // per], y[n // per]
        x, y = (t.index_select(0, idx).unflatten(0, (-1, k)).transpose(0, 1) for t in (data.train_x, data.train_y))
        with autocast(self.cfgs[0].trainer, self.device):
            outputs = self.model(x)
            losses, correct = member_scores(data.task, outputs, y.repeat_interleave(per, 0) if per > 1 else y)
        self.optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()
        schedule_lr(self.optimizer, [c.optim for c in self.cfgs], step, self.cfgs[0].trainer.max_steps)
        due = [(n, d) for n, d in enumerate(self.diagnostics) if d.due(step)]
        for n, diagnostics in due:  # at the step's weights and gradients, before the update
            if diagnostics.needs_gradients:
                diagnostics.model = self.member_model(n, gradients=True)
                diagnostics.before_step(step, x[n // per], y[n // per])
        self.optimizer.step()
        for n, diagnostics in due:
            diagnostics.model = self.member_model(n)
            diagnostics.after_step(step, x[n // per], y[n // per])
        return losses.detach().float(), correct

    def evaluate(self) -> Tensor:
        with autocast(self.cfgs[0].trainer, self.device):
            return evaluate(self.model, self.data.test_x, self.data.test_y, self.data.task, members=self.members)

    def lrs(self) -> list[float]:
        return current_lrs(self.optimizer)

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
