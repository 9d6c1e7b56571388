"""The structured configs: one dataclass per Hydra config group, every key with its type, unit and default,
written once, and the words a key accepts. No torch and no registry here: `bnlab summarize`, `report` and
`--help` read this without paying for torch; bnlab/core/validate.py checks a config against the registries.

The YAML files under conf/ name their option and set only what deliberately differs from these defaults
(cifar10's batch size, say). A typo in an override is refused by Hydra, and a value bnlab cannot train
with by bnlab.core.validate.validate, before any data is loaded or any run folder written.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, get_type_hints

# What a key is to a sweep, in its field's metadata; every other key must be equal in a fused group:
MEMBER = {"fuse": "member"}  # each member of a fused group (bnlab/run/fused/engine.py) trains with its own value
BOOKKEEPING = {"fuse": "bookkeeping"}  # leaves the trajectory alone: names no run folder or sweep group


def _marked(default: Any, marker: dict[str, str]) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=marker)
    return field(default=default, metadata=marker)


def member(default: Any) -> Any:
    """The field of a key that each member of a fused group may set to its own value: one its stacked
    form takes per member, leaving the computation's shape alone (tests/test_fused.py checks each one)."""
    return _marked(default, MEMBER)


def bookkeeping(default: Any) -> Any:
    """The field of a key that leaves a run's trajectory alone (where the data lives, threads, ...)."""
    return _marked(default, BOOKKEEPING)


@dataclass
class ModelConfig:
    name: str = "mlp"  # mlp | cnn | resnet | vit | custom
    widths: list[int] = field(
        default_factory=lambda: [100, 100, 100]
    )  # mlp: units per hidden layer; cnn, resnet: channels per stage; vit: [the tokens' channels]
    blocks: int = 1  # resnet: basic residual blocks per stage
    depth: int = 6  # vit: transformer blocks (attention + MLP, each with its residual)
    heads: int = 4  # vit: attention heads (each widths[0] / heads channels)
    mlp_ratio: int = 2  # vit: the MLP's hidden channels per channel of the tokens
    patch: int = 7  # vit: patch height and width in pixels (28 x 28 MNIST: 16 patches, and a class token)
    norm_position: str = (
        "pre"  # vit: pre (norm on each residual branch's input, and a final norm) | post (after the sum)
    )
    activation: str = "relu"  # relu | sigmoid | tanh | gelu | identity (no nonlinearity: a deep linear network)
    init: str = member("default")  # default: PyTorch's; normal: N(0, init_std) weights; glorot: Glorot; biases 0
    init_std: float = member(0.05)  # std of the normal init (docs/literature.md, section 4: 0.05 good, 5 bad)
    bias: str = "auto"  # auto: drop the bias of a layer that a norm follows | true | false
    residual_init: str = "default"  # resnet: default | skipinit (scalar 0 on each residual branch) | fixup
    weight_standardization: bool = False  # every layer but the classifier scaled-standardized (Brock et al.)
    dropout: float = 0.0  # fraction of each hidden unit's outputs zeroed in training (after its norm and act)
    input_norm: bool = False  # mlp, cnn: the norm also on the raw inputs, before the first layer
    target: str = ""  # custom: import path of a class or function called as target(in_shape, num_classes, **kwargs)
    kwargs: Any = None  # custom: keyword arguments of model.target (a dict)


LANDSCAPE_STEPS = (0.5, 4.0)  # diag.landscape_steps: Santurkar et al.'s range for VGG
NO_NORM = "none"  # the baseline every norm is compared with: no normalization layer (conf/norm/none.yaml)
NO_SHIFT = "none"  # trainer.shift: the test images as they are


@dataclass
class NormConfig:
    name: str = "batch"  # a key of bnlab.core.norms.NORMS (custom: the user's own, norm.target)
    placement: str = "before_act"  # before_act: layer -> norm -> act; after_act: layer -> act -> norm
    eps: float = member(1e-5)  # added to the variance before the square root
    momentum: float = member(0.1)  # running statistics: run = (1 - momentum) * run + momentum * batch
    affine: bool = True  # learn a per-channel scale gamma and shift beta
    groups: int = member(4)  # group: channel groups (must divide every layer's channel count)
    virtual_batch_size: int = member(16)  # ghost_batch: examples per virtual batch
    r_max: float = member(3.0)  # batch_renorm: final clip of r = sigma_B / sigma
    d_max: float = member(5.0)  # batch_renorm: final clip of d = (mu_B - mu) / sigma
    renorm_warmup: int = member(5000)  # batch_renorm: steps of plain BN (r_max = 1, d_max = 0)
    r_max_steps: int = member(40000)  # batch_renorm: step at which r_max is reached (linear ramp after warm-up)
    d_max_steps: int = member(25000)  # batch_renorm: step at which d_max is reached (linear ramp after warm-up)
    target: str = ""  # custom: import path of a class or function called as target(channels, **kwargs)
    kwargs: Any = None  # custom: keyword arguments of norm.target (a dict)


@dataclass
class DataConfig:
    name: str = "mnist"  # mnist | fashion_mnist | cifar10 | synthetic | linear_regression | custom
    root: str = bookkeeping("${oc.env:BNLAB_DATA,'~/.cache/bnlab/data'}")  # torchvision's on-disk layout below it
    batch_size: int = 60  # examples per training step
    download: bool = bookkeeping(True)  # fetch missing files on first use
    normalize: bool = False  # standardize inputs per channel with train-set statistics (off: pixels in [0, 1])
    num_train: int = 2048  # synthetic, linear_regression: training examples
    num_test: int = 512  # synthetic, linear_regression: test examples
    num_classes: int = 10  # synthetic: classes
    channels: int = 1  # synthetic: image channels
    image_size: int = 28  # synthetic: image height and width in pixels
    dim: int = 10  # linear_regression: dimension of the inputs x and of the targets y = A x
    seed: int = 0  # synthetic, linear_regression: seed of the generated task (the run's seed leaves it as it is)
    target: str = ""  # custom: import path of a function called as target(**kwargs), see bnlab.core.data
    kwargs: Any = None  # custom: keyword arguments of data.target (a dict)


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | adam | adamw
    lr: float = member(0.01)  # learning rate per step
    momentum: float = member(0.0)  # sgd: heavy-ball momentum (0 = plain SGD)
    weight_decay: float = member(0.0)  # L2 penalty coefficient
    decay_norm: bool = True  # weight decay on the norm layers' gamma and beta too (false: on the other layers only)
    betas: list[float] = member([0.9, 0.999])  # adam: moving-average decays
    eps: float = member(1e-8)  # adam: added to the root of the second moment
    agc: float = member(0.0)  # > 0: adaptive gradient clipping at this lambda, e.g. 0.01 (Brock et al.; not the head)
    schedule: str = member("none")  # none | step | cosine: how the lr falls after the warm-up (core/optim.py lr_factor)
    warmup_steps: int = member(0)  # steps: the lr rises linearly from lr / warmup_steps to lr over this many steps
    decay_every: int = member(1000)  # step schedule: steps between two decays of the lr
    decay_factor: float = member(0.1)  # step schedule: the lr is multiplied by this (a fraction) at each decay


@dataclass
class TrainerConfig:
    max_steps: int = 3000  # optimizer steps (iterations)
    eval_every: int = 100  # steps between test evaluations (the resolution of iterations-to-threshold)
    device: str = "auto"  # auto | cpu | cuda | mps
    # torch CPU threads of each run: auto (bnlab/run/threads.py: 1 for small models, more only where a step has the
    # work for them, never more than the cores each run gets when several train at once) | a count >= 1
    threads: int | str = bookkeeping("auto")
    resume: bool = bookkeeping(False)  # skip a run whose summary.json says completed; continue one from its checkpoint
    # > 0: stop after this step with a checkpoint (status paused), as Ctrl-C would; trainer.resume=true with a later
    # pause_at (or 0) continues the run exactly. The tuning sweeper's rungs (hydra/sweeper=tune): a trial trains on
    # only while it is promising.
    pause_at: int = bookkeeping(0)
    checkpoint_every: int = 500  # steps between checkpoints (0: only at the end of a run)
    stop_loss: float = member(0.0)  # > 0: end the run as diverged once the training loss stays above this ...
    stop_patience: int = member(100)  # ... for this many consecutive steps
    deterministic: bool = False  # GPU: deterministic kernels only (slower); CPU runs are deterministic anyway
    precise_bn: int = member(0)  # > 0: after training, also test in train mode and after precise BN over N batches
    # after training, also test on shifted test images: none | noise (Gaussian, std = the training images' std);
    # with precise_bn > 0 also after AdaBN: precise BN over that many batches of shifted training images
    shift: str = member(NO_SHIFT)
    accumulate: int = 1  # micro-batches per step: data.batch_size examples in this many passes, gradients summed
    log_every: int = (
        10  # steps between reads of the training loss and accuracy from the device (TensorBoard gets their mean)
    )
    # In a sweep (hydra/launcher=bnlab): train the runs that differ only in keys marked MEMBER below as one
    # stacked model (bnlab/run/fused/). true: fuse, warning of groups that cannot be; auto: fuse where that is
    # exact and run the rest alone, one console line saying which; false: every run alone.
    fuse: bool | str = bookkeeping(False)
    precision: str = "fp32"  # fp32 | bf16 (autocast, norm layers in fp32) | fp64 (exactness checks)
    channels_last: bool = False  # conv models: NHWC feature maps (faster convolutions on GPUs with tensor cores)
    compile: bool = False  # torch.compile the model (its first steps compile; CPU needs a C++ compiler)
    # Processes one run trains on, with DistributedDataParallel (cpu: gloo; cuda: nccl, one GPU each); each
    # takes an equal share of every batch of data.batch_size (docs/guide.md, "Several GPUs or processes").
    devices: int = 1
    sync_buffers: str = "broadcast"  # devices > 1: running statistics after each step: broadcast (rank 0's) | average
    timeout_s: float = bookkeeping(300.0)  # devices > 1: seconds a process waits for the others before the run fails


@dataclass
class ThresholdConfig:
    metric: str = member("test_acc")  # test_acc | train_acc | test_loss | train_loss
    values: list[float] = member([0.90, 0.95, 0.97])  # acc: reach >= value; loss: reach <= value


@dataclass
class DiagConfig:
    every: int = 100  # steps between the diagnostics switched on below (and at step 1, the initial weights)
    layers: list[int] = field(
        default_factory=lambda: [-1]
    )  # hidden layers whose activations are tracked (-1: the last)
    probe: int = 1000  # test examples the activation percentiles are computed on
    percentiles: bool = False  # 15/50/85th percentiles and histograms of the inputs to the nonlinearity
    ics: bool = False  # internal covariate shift per layer, ||G - G'|| and cos(G, G') (Santurkar et al.)
    landscape: bool = False  # loss variation, gradient predictiveness, effective beta-smoothness along the gradient
    # landscape: smallest and largest step along the gradient, in multiples of the lr
    landscape_steps: list[float] = field(default_factory=lambda: list(LANDSCAPE_STEPS))
    landscape_points: int = 8  # landscape: step sizes tried, spaced evenly over landscape_steps
    grad_norms: bool = False  # L2 norm of each layer's weight gradient
    stat_drift: bool = False  # change of the norm layers' running statistics since the last diagnostic

    def switched_on(self) -> list[str]:
        """The diagnostics switched on, by key (empty: none)."""
        return [k for k in ("percentiles", "ics", "landscape", "grad_norms", "stat_drift") if getattr(self, k)]


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    norm: NormConfig = field(default_factory=NormConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    threshold: ThresholdConfig = field(default_factory=ThresholdConfig)
    diag: DiagConfig = field(default_factory=DiagConfig)
    seed: int = member(0)  # seeds the weights and the batch order


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'norm': {'name': 'batch'}} -> {'norm.name': 'batch'}; lists become strings."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v) if isinstance(v, (list, tuple)) else v
    return out


def keys_marked(marker: dict[str, str], node: type = TrainConfig, prefix: str = "") -> tuple[str, ...]:
    """The dotted keys whose fields carry `marker` (MEMBER or BOOKKEEPING) in their metadata."""
    keys: list[str] = []
    types = get_type_hints(node)
    for f in fields(node):
        if is_dataclass(types[f.name]):
            keys.extend(keys_marked(marker, types[f.name], f"{prefix}{f.name}."))
        elif all(f.metadata.get(k) == v for k, v in marker.items()):
            keys.append(f"{prefix}{f.name}")
    return tuple(keys)


BOOKKEEPING_KEYS = keys_marked(BOOKKEEPING)  # the data's location, threads, the resume and fuse switches, ...
MEMBER_KEYS = keys_marked(MEMBER)  # seed, lr, init, norm and optimizer constants, thresholds, ...


def run_name(overrides: str, limit: int = 200) -> str:
    """A run directory's name: its overrides, `default` when none, cut to `limit` characters with a hash of
    the whole kept at the end (file systems refuse names over 255 bytes)."""
    if len(overrides) <= limit:
        return overrides or "default"
    return f"{overrides[: limit - 9]}-{hashlib.md5(overrides.encode()).hexdigest()[:8]}"


BIAS_CHOICES = ("auto", "true", "false")
INIT_CHOICES = ("default", "normal", "glorot")
PLACEMENTS = ("before_act", "after_act")
NORM_POSITIONS = ("pre", "post")  # model.norm_position, the ViT's
SHIFTS = (NO_SHIFT, "noise")
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("fp32", "bf16", "fp64")
SYNC_BUFFERS = ("broadcast", "average")
FUSE_CHOICES = ("false", "true", "auto")


def fuse_mode(t: TrainerConfig) -> str:
    """trainer.fuse as one of FUSE_CHOICES (the command line gives true and false as booleans)."""
    return str(t.fuse).lower()


class ConfigError(ValueError):
    """A config value that bnlab refuses; the message names the key, the value and what is accepted."""


def _edits(a: str, b: str) -> int:
    """Levenshtein distance: the fewest single-character insertions, deletions and substitutions from a to b."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def check_choice(key: str, value: str, accepted, what: str = "values") -> None:
    """Refuse `value` unless it is one of `accepted`, naming the closest accepted one."""
    accepted = list(accepted)
    if value in accepted:
        return
    value = str(value)
    distance, closest = min((_edits(value, a), a) for a in accepted)
    hint = f" Did you mean '{closest}'?" if distance <= max(2, len(value) // 2) else ""
    refused = f"{value} is not a config key" if what == "keys" else f"{key}={value!r} is not accepted"
    raise ConfigError(f"{refused}; accepted {what}: {', '.join(accepted)}.{hint}")
