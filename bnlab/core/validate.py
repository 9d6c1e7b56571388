"""A config checked before it trains: `validate` against the registries (norms, models, data sets,
optimizers) on this machine, and `check_targets` for the user's own norm, model or data set. The keys
themselves, their types and defaults are in bnlab/schema/config.py.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from bnlab.core.data import CUSTOM_FORM, DATASETS, has_accuracy, shape
from bnlab.core.models import ACTIVATIONS, MODELS, RESIDUAL_INITS, build_model
from bnlab.core.norms import NORMS, create_norm
from bnlab.core.optim import OPTIMIZERS, SCHEDULES
from bnlab.core.targets import locate
from bnlab.schema.config import (
    BIAS_CHOICES,
    DEVICES,
    FUSE_CHOICES,
    INIT_CHOICES,
    NO_SHIFT,
    NORM_POSITIONS,
    PLACEMENTS,
    PRECISIONS,
    SHIFTS,
    SYNC_BUFFERS,
    ConfigError,
    DataConfig,
    DiagConfig,
    ModelConfig,
    NormConfig,
    OptimConfig,
    TrainConfig,
    TrainerConfig,
    check_choice,
    fuse_mode,
)
from bnlab.schema.metrics import THRESHOLD_METRICS, higher_is_better, measured


def _require(ok: bool, key: str, value, accepted: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not accepted; accepted values: {accepted}.")


# The configs that passed, by content: a sweep's job is checked once, by the preflight before anything is
# written, and not again when it trains (the check is of the config and this machine, both the same then).
_passed: set[str] = set()


def validate(cfg: TrainConfig) -> None:
    """Refuse a config that cannot train, before any data is loaded or any run directory written."""
    key = repr(cfg)
    if key in _passed:
        return
    _require(isinstance(cfg.seed, int) and 0 <= cfg.seed < 2**63, "seed", cfg.seed, "an integer from 0 to 2**63 - 1")
    _check_model(cfg.model, cfg.norm, cfg.data)
    _check_norm(cfg.norm, cfg.model)
    _check_data(cfg)
    _check_optim(cfg.optim)
    _check_trainer(cfg.trainer, cfg.diag)
    _check_diag_and_thresholds(cfg)
    _passed.add(key)


def _check_model(m: ModelConfig, n: NormConfig, d: DataConfig) -> None:
    """model.*, and the target and kwargs of every group that can be custom."""
    check_choice("model.name", m.name, MODELS)
    check_choice("model.activation", m.activation, ACTIVATIONS)
    check_choice("model.init", m.init, INIT_CHOICES)
    check_choice("model.bias", m.bias.lower(), BIAS_CHOICES)
    check_choice("model.residual_init", m.residual_init, RESIDUAL_INITS)
    accepted = f"default with model={m.name} (skipinit and fixup need model=resnet)"
    _require(m.residual_init == "default" or m.name == "resnet", "model.residual_init", m.residual_init, accepted)
    for group, c in (("model", m), ("norm", n), ("data", d)):
        accepted = f"an import path such as my_pkg.module.Name with {group}=custom"
        _require(c.name != "custom" or bool(c.target), f"{group}.target", c.target, accepted)
        accepted = f"a dict of keyword arguments, e.g. {group}.kwargs={{name:value}}"
        _require(c.kwargs is None or isinstance(c.kwargs, dict), f"{group}.kwargs", c.kwargs, accepted)
    widths_ok = len(m.widths) > 0 and all(w > 0 for w in m.widths)
    _require(widths_ok, "model.widths", m.widths, "a non-empty list of positive integers")
    _require(m.blocks >= 1, "model.blocks", m.blocks, "an integer >= 1")
    _require(m.init_std > 0, "model.init_std", m.init_std, "a number > 0")
    _require(0 <= m.dropout < 1, "model.dropout", m.dropout, "a fraction in [0, 1)")
    check_choice("model.norm_position", m.norm_position, NORM_POSITIONS)
    if m.name == "vit":
        _check_vit(m, n)
    else:
        accepted = f"pre (the default) with model={m.name}: only model=vit has residual blocks whose norm it places"
        _require(m.norm_position == "pre", "model.norm_position", m.norm_position, accepted)
    _require(not m.input_norm or m.name == "mlp", "model.input_norm", m.input_norm, f"false with model={m.name} (mlp)")


def _check_vit(m: ModelConfig, n: NormConfig) -> None:
    """model=vit's own keys, and what it does not take."""
    _require(len(m.widths) == 1, "model.widths", m.widths, "one width with model=vit, e.g. [64]")
    for key in ("depth", "heads", "mlp_ratio", "patch"):
        _require(getattr(m, key) >= 1, f"model.{key}", getattr(m, key), "an integer >= 1")
    accepted = f"a multiple of model.heads={m.heads} (each head takes widths[0] / heads channels)"
    _require(m.widths[0] % m.heads == 0, "model.widths", m.widths, accepted)
    accepted = "before_act with model=vit (model.norm_position=pre|post places its norms)"
    _require(n.placement == "before_act", "norm.placement", n.placement, accepted)
    _require(m.dropout == 0, "model.dropout", m.dropout, "0 with model=vit")


def _check_norm(n: NormConfig, m: ModelConfig) -> None:
    """norm.*, against the model's widths where the norm divides them into groups."""
    check_choice("norm.name", n.name, NORMS)
    check_choice("norm.placement", n.placement, PLACEMENTS)
    _require(n.eps > 0, "norm.eps", n.eps, "a number > 0")
    _require(0 <= n.momentum <= 1, "norm.momentum", n.momentum, "a number in [0, 1]")
    _require(n.groups >= 1, "norm.groups", n.groups, "an integer >= 1")
    if "groups" in NORMS[n.name].keys:
        bad = [w for w in m.widths if w % n.groups]
        accepted = f"a divisor of every width in model.widths={m.widths} (not of {bad})"
        _require(not bad, "norm.groups", n.groups, accepted)
    if NORMS[n.name].example_groups and m.name == "mlp":  # feature vectors: no positions to normalize over
        groups = n.groups if "groups" in NORMS[n.name].keys else 1
        accepted = f"widths of at least {2 * groups} with norm={n.name}: each example's group of features needs 2+"
        _require(all(w >= 2 * groups for w in m.widths), "model.widths", m.widths, accepted)
    _require(n.virtual_batch_size >= 2, "norm.virtual_batch_size", n.virtual_batch_size, "an integer >= 2")
    _require(n.r_max >= 1, "norm.r_max", n.r_max, "a number >= 1")
    _require(n.d_max >= 0, "norm.d_max", n.d_max, "a number >= 0")


def _check_data(cfg: TrainConfig) -> None:
    """data.*: the data set, what its task allows, and a batch that every process can normalize over."""
    m, n, d, t = cfg.model, cfg.norm, cfg.data, cfg.trainer
    check_choice("data.name", d.name, DATASETS)
    _require(t.devices >= 1, "trainer.devices", t.devices, "an integer >= 1")
    classes = has_accuracy(d.name)
    if not classes:  # regression: vectors in and out, no images for a conv net, no classes to be right about
        _require(m.name == "mlp", "model", m.name, f"mlp (data={d.name} gives vectors, not images)")
        _require(d.dim >= 1, "data.dim", d.dim, "an integer >= 1")
        _require(t.precise_bn == 0, "trainer.precise_bn", t.precise_bn, f"0 with data={d.name} (it measures accuracy)")
        _require(t.shift == NO_SHIFT, "trainer.shift", t.shift, f"{NO_SHIFT} with data={d.name} (it shifts images)")
    if m.name == "vit" and classes:
        (_, height, width), _ = shape(d)
        accepted = f"a divisor of the images' {height} x {width} pixels with model=vit"
        _require(height % m.patch == 0 and width % m.patch == 0, "model.patch", m.patch, accepted)
    norm = NORMS[n.name]
    per_process = 2 if norm.batch_stats and not norm.synced else 1  # examples each process normalizes over
    min_batch = max(per_process * t.devices, 2 if norm.batch_stats else 1)
    accepted = f"an integer >= {min_batch} with norm={n.name}" + (
        f" and trainer.devices={t.devices}" if t.devices > 1 else ""
    )
    _require(d.batch_size >= min_batch, "data.batch_size", d.batch_size, accepted)
    accepted = f"a multiple of trainer.devices={t.devices} (each process takes an equal share of every batch)"
    _require(d.batch_size % t.devices == 0, "data.batch_size", d.batch_size, accepted)
    _require(t.accumulate >= 1, "trainer.accumulate", t.accumulate, "an integer >= 1")
    share = d.batch_size // t.devices  # each process's examples per step, in trainer.accumulate micro-batches
    accepted = (
        f"a divisor of the {share} examples each process takes per step that leaves micro-batches of at least "
        f"{per_process} with norm={n.name}"
    )
    fits = share % t.accumulate == 0 and share // t.accumulate >= per_process
    _require(fits, "trainer.accumulate", t.accumulate, accepted)


def _check_optim(o: OptimConfig) -> None:
    """optim.*."""
    check_choice("optim.name", o.name, OPTIMIZERS)
    _require(o.lr > 0, "optim.lr", o.lr, "a number > 0")
    _require(o.momentum >= 0, "optim.momentum", o.momentum, "a number >= 0")
    _require(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "a number >= 0")
    betas_ok = len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas)
    _require(betas_ok, "optim.betas", list(o.betas), "two numbers in [0, 1), e.g. optim.betas=[0.9,0.999]")
    _require(o.eps > 0, "optim.eps", o.eps, "a number > 0")
    _require(o.agc >= 0, "optim.agc", o.agc, "a number >= 0 (0: off; Brock et al. use 0.01 to 0.16)")
    check_choice("optim.schedule", o.schedule, SCHEDULES)
    _require(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "an integer >= 0 (steps)")
    _require(o.decay_every >= 1, "optim.decay_every", o.decay_every, "an integer >= 1 (steps)")
    _require(0 < o.decay_factor <= 1, "optim.decay_factor", o.decay_factor, "a number in (0, 1]")


def _check_trainer(t: TrainerConfig, diag: DiagConfig) -> None:
    """trainer.*, and the diagnostics that need a single process."""
    _require(t.max_steps > 0, "trainer.max_steps", t.max_steps, "an integer > 0")
    _require(t.eval_every > 0, "trainer.eval_every", t.eval_every, "an integer > 0")
    check_choice("trainer.device", t.device, DEVICES)
    threads_ok = t.threads == "auto" or (isinstance(t.threads, int) and t.threads >= 1)
    _require(threads_ok, "trainer.threads", t.threads, "auto (bnlab decides from the model's size) or an integer >= 1")
    accepted = "an integer >= 0 (0: only at the end)"
    _require(t.checkpoint_every >= 0, "trainer.checkpoint_every", t.checkpoint_every, accepted)
    _require(t.stop_loss >= 0, "trainer.stop_loss", t.stop_loss, "a number >= 0 (0: off)")
    _require(t.stop_patience >= 1, "trainer.stop_patience", t.stop_patience, "an integer >= 1")
    _require(t.precise_bn >= 0, "trainer.precise_bn", t.precise_bn, "an integer >= 0 (0: off)")
    _require(t.log_every > 0, "trainer.log_every", t.log_every, "an integer > 0")
    check_choice("trainer.shift", t.shift, SHIFTS)
    check_choice("trainer.precision", t.precision, PRECISIONS)
    check_choice("trainer.fuse", fuse_mode(t), FUSE_CHOICES)
    check_choice("trainer.sync_buffers", t.sync_buffers, SYNC_BUFFERS)
    _require(t.timeout_s > 0, "trainer.timeout_s", t.timeout_s, "a number of seconds > 0")
    if t.devices > 1:
        alone = (
            f"false (a run over trainer.devices={t.devices} processes trains alone; fused runs need trainer.devices=1)"
        )
        _require(fuse_mode(t) != "true", "trainer.fuse", t.fuse, alone + " or auto")
        for switch in diag.switched_on():
            accepted = f"false with trainer.devices={t.devices} (the diagnostics run in single-process runs only)"
            _require(False, f"diag.{switch}", True, accepted)


def _check_diag_and_thresholds(cfg: TrainConfig) -> None:
    """diag.* and threshold.*: the metric must be one the data set's task measures."""
    _require(cfg.diag.every > 0, "diag.every", cfg.diag.every, "an integer > 0")
    _require(cfg.diag.probe > 0, "diag.probe", cfg.diag.probe, "an integer > 0")
    lo_hi = list(cfg.diag.landscape_steps)
    steps_ok = len(lo_hi) == 2 and 0 < lo_hi[0] <= lo_hi[1]
    _require(steps_ok, "diag.landscape_steps", lo_hi, "[low, high] with 0 < low <= high (multiples of the lr)")
    _require(cfg.diag.landscape_points >= 2, "diag.landscape_points", cfg.diag.landscape_points, "an integer >= 2")
    metrics = measured(THRESHOLD_METRICS, accuracy=has_accuracy(cfg.data.name))
    check_choice("threshold.metric", cfg.threshold.metric, metrics, f"values with data={cfg.data.name}")
    if higher_is_better(cfg.threshold.metric):
        bad = [v for v in cfg.threshold.values if not 0 <= v <= 1]
        _require(not bad, "threshold.values", list(cfg.threshold.values), "accuracies in [0, 1]")


# ---------------------------------------------------------------- the user's own norm, model and data

TAKES = {
    "norm": "the import path of a class or function, called as target(channels, **norm.kwargs), that returns an "
    "nn.Module mapping (N, C) and (N, C, H, W) inputs to outputs of the same shape",
    "model": "the import path of a class or function, called as target((C, H, W), num_classes, **model.kwargs), "
    "that returns an nn.Module mapping examples (B, C, H, W) to logits (B, num_classes)",
    "data": f"the import path of a function, called as target(**data.kwargs), that returns {CUSTOM_FORM}",
}
PROBE_BATCH = 4  # examples in the batch a custom norm or model is tried on
T = TypeVar("T")


def _attempt(group: str, target: str, doing: str, step: Callable[..., T], *args: Any) -> T:
    """step(*args), or a ConfigError naming `group`.target, what was being done and the error."""
    try:
        return step(*args)
    except (Exception, SystemExit) as e:  # the user's code calling sys.exit() is refused like any error of it
        raise ConfigError(
            f"{group}.target={target!r} cannot be used: {doing} failed with {type(e).__name__}: {e}. "
            f"{group}=custom takes {TAKES[group]}; its module must be importable (installed, or on PYTHONPATH)."
        ) from e


def _probe(module: torch.nn.Module, x: torch.Tensor, out_shape: tuple[int, ...]) -> None:
    """Forward and backward in train mode, forward in eval mode, on a copy; the output must have out_shape."""
    module = copy.deepcopy(module)
    for training in (True, False):
        module.train(training)
        with torch.set_grad_enabled(training):
            y = module(x)
        if not torch.is_tensor(y) or tuple(y.shape) != out_shape:
            got = tuple(y.shape) if torch.is_tensor(y) else type(y).__name__
            raise ValueError(f"in {'train' if training else 'eval'} mode it returned {got}, not shape {out_shape}")
        if training:
            y.sum().backward()


def check_targets(cfg: TrainConfig) -> None:
    """Refuse (ConfigError) a custom norm, model or data set that cannot be used, before any run folder is
    written: its target must import, build an nn.Module (data: return tensors in bnlab's form, so it is
    called here once) and run on a probe batch of PROBE_BATCH: forward and backward in train mode, forward
    in eval mode, with outputs of the right shape."""
    m, n, d = cfg.model, cfg.norm, cfg.data
    for group, c in (("data", d), ("model", m), ("norm", n)):
        if c.name == "custom":
            _attempt(group, c.target, "importing it", locate, c.target)
    examples = _attempt("data", d.target, "loading the data", shape, d) if d.name == "custom" else None
    probe = torch.Generator().manual_seed(0)
    if m.name == "custom":
        in_shape, classes = examples or shape(d)
        model = _attempt("model", m.target, "building it", build_model, cfg, in_shape, classes)
        x = torch.rand(PROBE_BATCH, *in_shape, generator=probe)
        doing = f"running it on a probe batch {tuple(x.shape)}"
        _attempt("model", m.target, doing, _probe, model, x, (PROBE_BATCH, classes))
    elif n.name == "custom":
        spatial = () if m.name == "mlp" else (5, 5)  # the MLP normalizes feature vectors, the conv nets maps
        for channels in sorted(set(m.widths)):
            norm = _attempt("norm", n.target, f"building it for {channels} channels", create_norm, channels, n)
            x = torch.randn(PROBE_BATCH, channels, *spatial, generator=probe)
            _attempt("norm", n.target, f"running it on a probe batch {tuple(x.shape)}", _probe, norm, x, tuple(x.shape))


# ---------------------------------------------------------------- memory, before any folder is made

GIB = 2**30
_estimates: dict[str, int | None] = {}


def memory_estimate(cfg: TrainConfig) -> int | None:
    """Bytes a run needs beyond its data set: its weights, their gradients and the optimizer's state (one copy
    for SGD's momentum, two for Adam's moments), and the outputs of its layers at data.batch_size, twice (kept
    for the backward pass, and their gradients). Counted on the model built on torch's meta device, which
    holds no memory; None where it cannot be built there (a custom layer, say)."""
    key = repr((cfg.model, cfg.norm, cfg.data, cfg.optim.name, cfg.trainer.precision))
    if key not in _estimates:
        outputs = 0

        def count(module: torch.nn.Module, inputs: tuple, out: Any) -> None:
            nonlocal outputs
            outputs += out.numel() if torch.is_tensor(out) and not list(module.children()) else 0

        try:
            in_shape, classes = shape(cfg.data)
            with torch.device("meta"), torch.random.fork_rng(devices=[]):
                model = build_model(cfg, in_shape, classes)
                for m in model.modules():
                    m.register_forward_hook(count)
                model(torch.zeros(cfg.data.batch_size, *in_shape))
            params = sum(p.numel() for p in model.parameters())
            slots = 2 if cfg.optim.name in ("adam", "adamw") else 1
            width = 8 if cfg.trainer.precision == "fp64" else 4
            _estimates[key] = width * (params * (2 + slots) + 2 * outputs)
        except Exception:
            _estimates[key] = None
    return _estimates[key]


def free_memory(device: torch.device) -> tuple[int, str] | None:
    """(bytes free, where that number comes from) on `device`, or None where it is not known."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], f"free on {torch.cuda.get_device_name(device)}"
    try:
        meminfo = dict(line.split(":", 1) for line in open("/proc/meminfo"))
        return int(meminfo["MemAvailable"].split()[0]) * 1024, "MemAvailable in /proc/meminfo"
    except (OSError, KeyError, ValueError):
        return None


def check_memory(cfg: TrainConfig, device: torch.device, members: int = 1) -> None:
    """Refuse a run (or `members` fused runs) whose memory estimate is over what `device` has free."""
    need, free = memory_estimate(cfg), free_memory(device)
    if need is None or free is None or need * members <= free[0]:
        return
    runs = f" for {members} fused runs" if members > 1 else ""
    raise ConfigError(
        f"model.widths={cfg.model.widths} at data.batch_size={cfg.data.batch_size} needs about "
        f"{need * members / GIB:.1f} GiB{runs} (weights, gradients, {cfg.optim.name}'s state and a step's "
        f"activations), more than the {free[0] / GIB:.1f} GiB free here ({free[1]}); make the model or the batch "
        "smaller."
    )
