"""The models (MLP, CNN, ResNet), all built from one `Unit`: layer, norm and activation.

Where the norm sits (before or after the activation), which norm it is and whether the layer keeps
its bias are decided in `unit` alone, so every model treats them the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from math import prod
from typing import TYPE_CHECKING

import torch
from torch import nn

from bnlab.norms import create_norm

if TYPE_CHECKING:
    from bnlab.config import TrainConfig

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "identity": nn.Identity,  # no nonlinearity: the MLP becomes a deep linear network
}


class Unit(nn.Module):
    """layer -> norm -> act (norm before the activation) or layer -> act -> norm (after it)."""

    def __init__(self, layer: nn.Module, norm: nn.Module, act: nn.Module, norm_before_act: bool) -> None:
        super().__init__()
        self.layer, self.norm, self.act = layer, norm, act
        self.norm_before_act = norm_before_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer(x)
        return self.act(self.norm(x)) if self.norm_before_act else self.norm(self.act(x))


def use_bias(cfg: TrainConfig, norm_follows: bool) -> bool:
    """model.bias=auto drops the bias of a layer whose output goes straight into a norm (beta absorbs it)."""
    choice = cfg.model.bias.lower()
    if choice == "auto":
        return not (norm_follows and cfg.norm.name != "none")
    return choice == "true"


def unit(make_layer: Callable[[bool], nn.Module], channels: int, cfg: TrainConfig) -> Unit:
    """A Unit whose layer is `make_layer(bias)` with `channels` outputs."""
    before = cfg.norm.placement == "before_act"
    layer = make_layer(use_bias(cfg, norm_follows=before))
    return Unit(layer, create_norm(channels, cfg.norm), ACTIVATIONS[cfg.model.activation](), before)


def conv3x3(c_in: int, c_out: int, stride: int = 1) -> Callable[[bool], nn.Conv2d]:
    return lambda bias: nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=bias)


class MLP(nn.Sequential):
    """Flatten -> one Unit per hidden width -> Linear to the classes (784-100-100-100-10 by default).

    With model.activation=identity it is a deep linear network: len(widths) + 1 linear layers."""

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, cfg: TrainConfig) -> None:
        widths = [prod(in_shape), *cfg.model.widths]
        hidden = [unit(lambda b, i=i, o=o: nn.Linear(i, o, bias=b), o, cfg) for i, o in zip(widths, widths[1:])]
        super().__init__(nn.Flatten(), *hidden, nn.Linear(widths[-1], num_classes))


class CNN(nn.Sequential):
    """Per width a 3x3 conv Unit and a 2x2 max-pool, then global average pooling and a Linear head.

    Works on any input size of at least 2**len(widths) pixels (28x28 MNIST, 32x32 CIFAR-10).
    """

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int, cfg: TrainConfig) -> None:
        channels = [in_shape[0], *cfg.model.widths]
        stages = [nn.Sequential(unit(conv3x3(i, o), o, cfg), nn.MaxPool2d(2)) for i, o in zip(channels, channels[1:])]
        super().__init__(*stages, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels[-1], num_classes))


class BasicBlock(nn.Module):
    """conv-norm-act-conv-norm plus the shortcut, then act (norm before the activation).

    With the norm after the activation: conv-act-norm-conv, plus the shortcut, then act-norm.
    The shortcut is the identity, or a strided 1x1 conv and a norm where the shape changes.
    """

    def __init__(self, c_in: int, c_out: int, stride: int, cfg: TrainConfig) -> None:
        super().__init__()
        self.first = unit(conv3x3(c_in, c_out, stride), c_out, cfg)
        self.second = unit(conv3x3(c_out, c_out), c_out, cfg)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            conv = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=use_bias(cfg, norm_follows=True))
            self.shortcut = nn.Sequential(conv, create_norm(c_out, cfg.norm))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.second
        h = s.layer(self.first(x))
        if s.norm_before_act:
            return s.act(s.norm(h) + self.shortcut(x))
        return s.norm(s.act(h + self.shortcut(x)))


class ResNet(nn.Sequential):
    """CIFAR-style ResNet: a 3x3 conv stem, `blocks` BasicBlocks per width (stride 2 from the second
    stage on), global average pooling and a Linear head."""

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int, cfg: TrainConfig) -> None:
        widths = cfg.model.widths
        layers: list[nn.Module] = [unit(conv3x3(in_shape[0], widths[0]), widths[0], cfg)]
        c_in = widths[0]
        for stage, c_out in enumerate(widths):
            for b in range(cfg.model.blocks):
                layers.append(BasicBlock(c_in, c_out, 2 if stage > 0 and b == 0 else 1, cfg))
                c_in = c_out
        super().__init__(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes))


MODELS: dict[str, Callable[[tuple[int, ...], int, TrainConfig], nn.Module]] = {
    "mlp": MLP,
    "cnn": CNN,
    "resnet": ResNet,
}


def init_weights(model: nn.Module, cfg: TrainConfig) -> None:
    """model.init=normal: every Linear and Conv weight ~ N(0, init_std); glorot: ~ U(-a, a) with
    a = sqrt(6 / (fan_in + fan_out)) (Glorot & Bengio 2010); biases 0 either way; norms untouched."""
    if cfg.model.init == "default":
        return
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            if cfg.model.init == "glorot":
                nn.init.xavier_uniform_(m.weight)
            else:
                nn.init.normal_(m.weight, 0.0, cfg.model.init_std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def build_model(cfg: TrainConfig, in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    model = MODELS[cfg.model.name](in_shape, num_classes, cfg)
    init_weights(model, cfg)
    return model
