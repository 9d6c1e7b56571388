"""The models (MLP, CNN, ResNet), all built from one `Unit`: layer, norm and activation; a small vision
transformer (ViT), its norms on tokens (`TokenNorm`) before or after each residual sum; and `custom`, the
user's own model built from model.target.

Where the norm sits (before or after the activation), which norm it is and whether the layer keeps
its bias are decided in `unit` alone, so every model treats them the same way. The no-normalization
baselines are options of these models: SkipInit and Fixup on the ResNet's residual branches
(model.residual_init), scaled weight standardization of any model's layers (model.weight_standardization);
their layers live in bnlab/core/baselines.py.
"""

from __future__ import annotations

from collections.abc import Callable
from math import prod
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnlab.core.baselines import Scalar, gamma, standardize_weights
from bnlab.core.norms import NORMS, create_norm
from bnlab.core.targets import locate
from bnlab.schema.config import NO_NORM

if TYPE_CHECKING:
    from bnlab.schema.config import ModelConfig, NormConfig, TrainConfig

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "identity": nn.Identity,  # no nonlinearity: the MLP becomes a deep linear network
}


RESIDUAL_INITS = ("default", "skipinit", "fixup")


class Unit(nn.Module):
    """layer -> norm -> act (norm before the activation) or layer -> act -> norm (after it).

    As the last unit of a residual branch it also takes the block's shortcut, added just before the
    activation: to the norm's output times `branch` (norm before act), or to the layer's output times
    `branch` (norm after act). With `fixup` it has Fixup's two scalar biases: one added to its input, one
    just before the activation.
    """

    def __init__(
        self,
        layer: nn.Module,
        norm: nn.Module,
        act: nn.Module,
        norm_before_act: bool,
        fixup: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        # registered before the layer: the parameters that come before W_i (bnlab.run.diagnostics' ICS)
        self.bias_in = Scalar(0.0, multiply=False) if fixup else None
        self.layer, self.norm, self.act = layer, norm, act
        self.norm_before_act = norm_before_act
        self.bias_act = Scalar(0.0, multiply=False) if fixup else None
        self.dropout = nn.Dropout(dropout) if dropout else None  # on the unit's output, whichever the placement

    def forward(self, x: Tensor, branch: nn.Module | None = None, shortcut: Tensor | None = None) -> Tensor:
        if self.bias_in is not None:
            x = self.bias_in(x)
        x = self.layer(x)
        if self.norm_before_act:
            x = self.norm(x)
        if shortcut is not None:
            x = (x if branch is None else branch(x)) + shortcut
        if self.bias_act is not None:
            x = self.bias_act(x)
        x = self.act(x)
        x = x if self.norm_before_act else self.norm(x)
        return x if self.dropout is None else self.dropout(x)


def use_bias(model: ModelConfig, norm: NormConfig, norm_follows: bool) -> bool:
    """model.bias=auto drops the bias of a layer whose output goes straight into a norm (beta absorbs it)."""
    choice = model.bias.lower()
    if choice == "auto":
        return not (norm_follows and norm.name != NO_NORM)
    return choice == "true"


def unit(make_layer: Callable[[bool], nn.Module], channels: int, model: ModelConfig, norm: NormConfig) -> Unit:
    """A Unit whose layer is `make_layer(bias)` with `channels` outputs."""
    before = norm.placement == "before_act"
    layer = make_layer(use_bias(model, norm, norm_follows=before))
    fixup = model.residual_init == "fixup"
    return Unit(layer, create_norm(channels, norm), ACTIVATIONS[model.activation](), before, fixup, model.dropout)


def conv3x3(c_in: int, c_out: int, stride: int = 1) -> Callable[[bool], nn.Conv2d]:
    return lambda bias: nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=bias)


class MLP(nn.Sequential):
    """Flatten -> one Unit per hidden width -> Linear to the classes (784-100-100-100-10 by default).

    With model.activation=identity it is a deep linear network: len(widths) + 1 linear layers. With
    model.input_norm the norm also normalizes the raw input features, before the first layer."""

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, model: ModelConfig, norm: NormConfig) -> None:
        widths = [prod(in_shape), *model.widths]
        linear = [lambda b, i=i, o=o: nn.Linear(i, o, bias=b) for i, o in zip(widths, widths[1:])]
        hidden = [unit(make, o, model, norm) for make, o in zip(linear, widths[1:])]
        inputs = [create_norm(widths[0], norm)] if model.input_norm else []
        super().__init__(nn.Flatten(), *inputs, *hidden, nn.Linear(widths[-1], num_classes))


class CNN(nn.Sequential):
    """Per width a 3x3 conv Unit and a 2x2 max-pool, then global average pooling and a Linear head.

    Works on any input size of at least 2**len(widths) pixels (28x28 MNIST, 32x32 CIFAR-10).
    """

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int, model: ModelConfig, norm: NormConfig) -> None:
        channels = [in_shape[0], *model.widths]
        stages = [
            nn.Sequential(unit(conv3x3(i, o), o, model, norm), nn.MaxPool2d(2)) for i, o in zip(channels, channels[1:])
        ]
        super().__init__(*stages, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels[-1], num_classes))


class BasicBlock(nn.Module):
    """conv-norm-act-conv-norm plus the shortcut, then act (norm before the activation).

    With the norm after the activation: conv-act-norm-conv, plus the shortcut, then act-norm.
    The shortcut is the identity, or a strided 1x1 conv and a norm where the shape changes.
    model.residual_init puts a learnable scalar `branch` on the residual branch f, just before the shortcut
    s is added: out = act(s(x) + alpha * f(x)) (norm after act: norm(act(...))).
    - skipinit: SkipInit (De & Smith 2020, arXiv 2002.10444, Sec. 4): alpha starts at 0, so with ReLU (whose
      block inputs are non-negative) every block with an identity shortcut starts as the identity.
    - fixup: Fixup's multiplier (Zhang, Dauphin & Ma 2019, arXiv 1901.09321), starting at 1; the rest of
      Fixup is the units' scalar biases, one before the shortcut conv and `fixup_init`.
    """

    def __init__(self, c_in: int, c_out: int, stride: int, model: ModelConfig, norm: NormConfig) -> None:
        super().__init__()
        residual_init = model.residual_init
        self.first = unit(conv3x3(c_in, c_out, stride), c_out, model, norm)
        self.second = unit(conv3x3(c_out, c_out), c_out, model, norm)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            conv = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=use_bias(model, norm, norm_follows=True))
            bias = [Scalar(0.0, multiply=False)] if residual_init == "fixup" else []
            self.shortcut = nn.Sequential(*bias, conv, create_norm(c_out, norm))
        start = {"skipinit": 0.0, "fixup": 1.0}.get(residual_init)  # SkipInit's alpha, Fixup's multiplier
        self.branch = None if start is None else Scalar(start, multiply=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.second(self.first(x), self.branch, self.shortcut(x))


class ResNet(nn.Sequential):
    """CIFAR-style ResNet: a 3x3 conv stem, `blocks` BasicBlocks per width (stride 2 from the second
    stage on), global average pooling and a Linear head."""

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int, model: ModelConfig, norm: NormConfig) -> None:
        widths = model.widths
        layers: list[nn.Module] = [unit(conv3x3(in_shape[0], widths[0]), widths[0], model, norm)]
        c_in = widths[0]
        for stage, c_out in enumerate(widths):
            for b in range(model.blocks):
                layers.append(BasicBlock(c_in, c_out, 2 if stage > 0 and b == 0 else 1, model, norm))
                c_in = c_out
        head = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes)]
        if model.residual_init == "fixup":
            head.insert(2, Scalar(0.0, multiply=False))  # Fixup's scalar bias before the classifier
        super().__init__(*layers, *head)


class TokenNorm(nn.Module):
    """The norm of a transformer block on its tokens (B, T, C): a norm that normalizes each example over its
    features (layer, group, rms: `Norm.token_rows`) sees each token as a row (B*T, C); any other sees the
    tokens as a feature map (B, C, 1, T), so batch norm's statistics (and running statistics) are per channel
    over the batch and the tokens, and instance norm's over each example's tokens."""

    def __init__(self, channels: int, norm: NormConfig) -> None:
        super().__init__()
        self.norm = create_norm(channels, norm)
        self.rows = NORMS[norm.name].token_rows

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        if self.rows:
            return self.norm(x.reshape(b * t, c)).view(b, t, c)
        # (B, C, 1, T), a channels-last view: as (B, C, T, 1) its layout would be both contiguous and channels-last,
        # and torch's CPU batch norm then computes some gradients of a chunk of it wrong (ghost batch norm's)
        return self.norm(x.transpose(1, 2).unsqueeze(2)).squeeze(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention over tokens (B, T, C): queries, keys and values by Linear layers, scaled
    dot-product attention per head of `head_dim` channels, and an output projection. The keys have no bias:
    it would add the same q.b to all of a query's scores, which the softmax ignores, so its gradient is
    rounding noise, which Adam scales up to full steps. The head count is read from the channels, so N fused
    members' stacked channels (bnlab.run.fused.stacking) are N times the heads, each member's in its own."""

    def __init__(self, width: int, heads: int, bias: bool) -> None:
        super().__init__()
        self.head_dim = width // heads
        self.q, self.v, self.proj = (nn.Linear(width, width, bias=bias) for _ in range(3))
        self.k = nn.Linear(width, width, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        heads = c // self.head_dim
        q, k, v = (f(x).view(b, t, heads, self.head_dim).transpose(1, 2) for f in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, head_dim)
        return self.proj(out.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    """A transformer block: attention and an MLP (Linear, activation, Linear), each with its residual.
    model.norm_position=pre (GPT-2 and later): x + attn(norm1(x)), then x + mlp(norm2(x)); post (the original
    transformer): norm1(x + attn(x)), then norm2(x + mlp(x))."""

    def __init__(self, width: int, model: ModelConfig, norm: NormConfig) -> None:
        super().__init__()
        bias = use_bias(model, norm, norm_follows=False)  # model.bias=auto keeps a transformer's biases
        self.pre = model.norm_position == "pre"
        self.norm1, self.attn = TokenNorm(width, norm), Attention(width, model.heads, bias)
        self.norm2 = TokenNorm(width, norm)
        hidden = model.mlp_ratio * width
        act = ACTIVATIONS[model.activation]()
        self.mlp = nn.Sequential(nn.Linear(width, hidden, bias=bias), act, nn.Linear(hidden, width, bias=bias))

    def forward(self, x: Tensor) -> Tensor:
        if self.pre:
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        x = self.norm1(x + self.attn(x))
        return self.norm2(x + self.mlp(x))


class Embedding(nn.Module):
    """The patches' feature map (B, C, H', W') as tokens (B, T, C), a learned class token put before them and a
    learned position embedding added to all T + 1; both per channel along dim 0, N(0, 0.02) at the start."""

    def __init__(self, width: int, tokens: int) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.randn(width) * 0.02)
        self.pos = nn.Parameter(torch.randn(width, tokens + 1) * 0.02)

    def forward(self, x: Tensor) -> Tensor:
        tokens = x.flatten(2).transpose(1, 2)
        return torch.cat([self.cls.expand(x.shape[0], 1, -1), tokens], 1) + self.pos.T


class ClassToken(nn.Module):
    """The class token's channels (B, C), what the head classifies."""

    def forward(self, x: Tensor) -> Tensor:
        return x[:, 0]


class ViT(nn.Sequential):
    """A small vision transformer: model.patch x model.patch patches embedded by a strided conv into
    widths[0] channels, a class token and position embeddings, model.depth Blocks (model.heads heads, an MLP
    of model.mlp_ratio times the width), with pre-norm a final norm, and a Linear head on the class token."""

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int, model: ModelConfig, norm: NormConfig) -> None:
        channels, height, width_px = in_shape
        width, p = model.widths[0], model.patch
        tokens = (height // p) * (width_px // p)
        blocks = [Block(width, model, norm) for _ in range(model.depth)]
        final = [TokenNorm(width, norm)] if model.norm_position == "pre" else []
        embed = [nn.Conv2d(channels, width, p, stride=p), Embedding(width, tokens)]
        super().__init__(*embed, *blocks, *final, ClassToken(), nn.Linear(width, num_classes))


def custom_model(in_shape: tuple[int, int, int], num_classes: int, model: ModelConfig, norm: NormConfig) -> nn.Module:
    """model=custom: the user's model `target(in_shape, num_classes, **kwargs)` (model.target, model.kwargs),
    in_shape (channels, height, width); it maps examples (B, *in_shape) to logits (B, num_classes)."""
    net = locate(model.target)(in_shape, num_classes, **(model.kwargs or {}))
    if not isinstance(net, nn.Module):
        raise TypeError(f"it returned a {type(net).__name__}, not an nn.Module")
    return net


# name -> the model from (input shape, classes, its model.* section, its norm.* section)
MODELS: dict[str, Callable[[tuple[int, ...], int, ModelConfig, NormConfig], nn.Module]] = {
    "mlp": MLP,
    "cnn": CNN,
    "resnet": ResNet,
    "vit": ViT,
    "custom": custom_model,
}


def init_weights(net: nn.Module, cfg: ModelConfig) -> None:
    """model.init=normal: every Linear and Conv weight ~ N(0, init_std); glorot: ~ U(-a, a) with
    a = sqrt(6 / (fan_in + fan_out)) (Glorot & Bengio 2010); biases 0 either way; norms untouched."""
    if cfg.init == "default":
        return
    for m in net.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            if cfg.init == "glorot":
                nn.init.xavier_uniform_(m.weight)
            else:
                nn.init.normal_(m.weight, 0.0, cfg.init_std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _standard_init(weight: Tensor, cfg: ModelConfig) -> None:
    """Fixup's "standard" init of a conv kernel: N(0, init_std) with model.init=normal, else He et al.'s
    N(0, 2 / fan_out) as the Fixup code has it."""
    if cfg.init == "normal":
        nn.init.normal_(weight, 0.0, cfg.init_std)
    else:
        nn.init.kaiming_normal_(weight, mode="fan_out", nonlinearity="relu")


@torch.no_grad()
def fixup_init(model: ResNet, cfg: ModelConfig) -> None:
    """Fixup (Zhang, Dauphin & Ma 2019, arXiv 1901.09321, Sec. 3): for L residual branches of m weight
    layers each (here m = 2, L = the number of BasicBlocks), initialise the classifier and the last layer of
    every branch to 0 (weights and biases), the other layers in the branches by a standard init
    (`_standard_init`) rescaled by L^(-1/(2m-2)) = L^(-1/2), and the shortcut convs by the standard init
    unscaled; the scalar multipliers (1) and biases (0) are made so by `Scalar`. The stem keeps the model's
    init. (The Fixup code trains the scalars at a tenth of the lr; bnlab trains them at the run's lr.)"""
    blocks = [b for b in model.modules() if isinstance(b, BasicBlock)]
    m = 2
    for block in blocks:
        _standard_init(block.first.layer.weight, cfg)
        block.first.layer.weight.mul_(len(blocks) ** (-1 / (2 * m - 2)))
        for conv in (c for c in block.shortcut.modules() if isinstance(c, nn.Conv2d)):
            _standard_init(conv.weight, cfg)
        for p in (block.second.layer.weight, block.second.layer.bias, model[-1].weight, model[-1].bias):
            if p is not None:
                p.zero_()


def build_model(cfg: TrainConfig, in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The run's model from its model.* and norm.* sections, initialised (the caller seeds torch first)."""
    model = MODELS[cfg.model.name](in_shape, num_classes, cfg.model, cfg.norm)
    init_weights(model, cfg.model)
    if cfg.model.residual_init == "fixup":
        fixup_init(model, cfg.model)
    if cfg.model.weight_standardization:
        standardize_weights(model, gamma(ACTIVATIONS[cfg.model.activation]()))
    return model
