"""Datasets as whole splits of tensors on the device: small readers for the IDX and CIFAR pickle files of
bnlab/core/datafiles.py, the data sets made in memory (synthetic, linear regression), `custom`: the user's own
function that returns the tensors (data.target); and the task each data set poses (`TASKS`: its loss, and
whether a prediction can be right or wrong). The registry DATASETS names them all."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass
from math import prod
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from bnlab.core.datafiles import FILES, DataError, Files, require_files
from bnlab.core.targets import locate

if TYPE_CHECKING:
    from bnlab.schema.config import DataConfig

Split = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # train_x, train_y, test_x, test_y

SYNTHETIC_INK = 0.2  # synthetic: fraction of a class prototype's pixels that are lit (MNIST: about 0.19)
SYNTHETIC_CONTRAST = 0.4  # synthetic: value of a lit prototype pixel on a 0 background, in pixel units of [0, 1]
SYNTHETIC_NOISE = 0.6  # synthetic: per-pixel Gaussian noise std at 784 pixels an image, in pixel units (see _synthetic)


@dataclass(frozen=True)
class Task:
    """What a data set asks of a model: the loss of each example, and which predictions count as correct."""

    loss: Callable[[Tensor, Tensor], Tensor]  # (outputs (B, K), targets) -> loss per example (B,)
    correct: Callable[[Tensor, Tensor], Tensor] | None  # (outputs, targets) -> bool (B,); None: no accuracy
    # (outputs, targets) -> the mean of `loss` in one op (a run's step: fewer ops, bnlab.run.engine.run_scores)
    mean_loss: Callable[[Tensor, Tensor], Tensor]


TASKS: dict[str, Task] = {
    "classification": Task(
        lambda out, y: F.cross_entropy(out, y, reduction="none"),
        lambda out, y: out.argmax(-1) == y,
        F.cross_entropy,
    ),
    # mean over the K outputs of the squared error; its mean over a batch is torch's mse_loss
    "regression": Task(lambda out, y: (out - y).square().mean(-1), None, F.mse_loss),
}


@dataclass
class Dataset:
    train_x: torch.Tensor  # float32 (N, C, H, W) images, or (N, D) vectors, on the device
    train_y: torch.Tensor  # classification: int64 (N,) class indices; regression: float32 (N, K) targets
    test_x: torch.Tensor  # float32 (M, ...)
    test_y: torch.Tensor  # (M, ...)
    num_classes: int  # the model's outputs: classes, or the dimension K of a regression target
    task: Task = TASKS["classification"]

    @property
    def in_shape(self) -> tuple[int, ...]:
        """The shape of one example: (channels, height, width) of an image, (D,) of a vector."""
        return tuple(self.train_x.shape[1:])


@dataclass
class Spec:
    """One dataset: how to read its files, or how to make it in memory, and the task it poses."""

    read: Callable[[dict[str, bytes]], Split] | None = None  # verified file contents -> uint8 images, labels
    files: Files | None = None  # the files `read` takes (bnlab.core.datafiles)
    make: Callable[[DataConfig], tuple[Split, int]] | None = None  # no files: the split and class count from the config
    num_classes: int = 10
    task: str = "classification"  # a key of TASKS


def _spec(name: str) -> Spec:
    if name not in DATASETS:
        raise DataError(f"Unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}.")
    return DATASETS[name]


def has_accuracy(name: str) -> bool:
    """Whether data set `name` poses a task whose predictions are right or wrong (classification); an unknown
    name counts as one (bnlab.core.validate.validate refuses it)."""
    spec = DATASETS.get(name)
    return spec is None or TASKS[spec.task].correct is not None


# ---------------------------------------------------------------- readers


def _parse_idx(data: bytes, name: str) -> torch.Tensor:
    """An IDX file of unsigned bytes: 2 zero bytes, type 0x08, number of dims, big-endian uint32 dims, data."""
    ndim = data[3] if len(data) >= 4 else 0
    header = 4 + 4 * ndim  # bytes
    if len(data) < header or data[:3] != b"\x00\x00\x08":
        raise DataError(f"{name} is not an IDX file of unsigned bytes (magic number {data[:4].hex()}).")
    dims = np.frombuffer(data, dtype=">u4", count=ndim, offset=4).tolist()
    if len(data) != header + prod(dims):
        raise DataError(f"{name} has {len(data)} bytes, but its IDX header {dims} needs {header + prod(dims)}.")
    return torch.frombuffer(bytearray(memoryview(data)[header:]), dtype=torch.uint8).reshape(dims)


def _read_idx(files: dict[str, bytes]) -> Split:
    """MNIST-style IDX files -> uint8 images (N, 1, H, W) and int64 labels, train then test."""

    def pair(prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
        names = f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"
        x, y = (_parse_idx(files[name], name) for name in names)
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(f"{prefix} images {tuple(x.shape)} and labels {tuple(y.shape)} do not match.")
        return x.unsqueeze(1), y.long()

    return *pair("train"), *pair("t10k")


def _read_cifar(files: dict[str, bytes]) -> Split:
    """CIFAR-10 python batches (b"data": uint8 (N, 3072) as CHW, b"labels") -> uint8 (N, 3, 32, 32), int64."""

    def batches(names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        dicts = [pickle.loads(files[name], encoding="bytes") for name in names]  # only MD5-verified files
        x = np.concatenate([np.asarray(d[b"data"], dtype=np.uint8) for d in dicts]).reshape(-1, 3, 32, 32)
        y = np.concatenate([np.asarray(d[b"labels"], dtype=np.int64) for d in dicts])
        return torch.from_numpy(x), torch.from_numpy(y)

    train = [name for name in files if name.startswith("data_batch_")]
    return *batches(train), *batches(["test_batch"])


# ---------------------------------------------------------------- loading


def _synthetic(cfg: DataConfig) -> Split:
    """A random sparse prototype image per class plus Gaussian noise, clipped to [0, 1]; deterministic in cfg
    (data.seed).

    The distance between prototypes grows as sqrt(pixels), so the noise does too: the task is about as hard at
    any image size. Tuned so a 784-100-100-100-10 ReLU MLP at batch 60 passes 90% test accuracy after about
    200 SGD steps at lr 0.1 without BN (about 150 at lr 0.01 with BN), and tops out near 99%.
    """
    g = torch.Generator().manual_seed(cfg.seed)
    shape = (cfg.channels, cfg.image_size, cfg.image_size)
    prototypes = SYNTHETIC_CONTRAST * (torch.rand((cfg.num_classes, *shape), generator=g) < SYNTHETIC_INK).float()
    noise = SYNTHETIC_NOISE * (prod(shape) / 784) ** 0.5  # pixel units

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(cfg.num_classes, (n,), generator=g)
        x = prototypes[y] + noise * torch.randn((n, *shape), generator=g)
        return x.clamp_(0, 1), y

    return *sample(cfg.num_train), *sample(cfg.num_test)


CUSTOM_FORM = (
    "(train_x, train_y, test_x, test_y): examples as float tensors (N, C, H, W) (feature vectors as (N, D, 1, 1)) "
    "and class labels as integer tensors (N,) from 0 to K-1"
)


def _custom(cfg: DataConfig) -> tuple[Split, int]:
    """data=custom: the split that `target(**kwargs)` returns (CUSTOM_FORM), checked; K = the largest label + 1."""
    split = locate(cfg.target)(**(cfg.kwargs or {}))

    def refuse(problem: str) -> DataError:
        return DataError(f"data.target={cfg.target!r} returned {problem}; data=custom needs {CUSTOM_FORM}.")

    if not isinstance(split, (tuple, list)) or len(split) != 4 or not all(torch.is_tensor(t) for t in split):
        raise refuse(f"a {type(split).__name__}, not four tensors")
    train_x, train_y, test_x, test_y = split
    shapes = [tuple(t.shape) for t in split]
    if train_x.dim() != 4 or test_x.shape[1:] != train_x.shape[1:] or not train_x.is_floating_point():
        raise refuse(f"examples of shapes {shapes[0]} and {shapes[2]}, dtype {train_x.dtype}")
    labels = (train_y, test_y)
    counts_match = (len(train_y), len(test_y)) == (len(train_x), len(test_x))
    if not counts_match or any(y.dim() != 1 or y.is_floating_point() or y.is_complex() for y in labels):
        raise refuse(f"labels of shapes {shapes[1]} and {shapes[3]} for {len(train_x)} and {len(test_x)} examples")
    if min(int(y.min()) for y in labels) < 0:
        raise refuse("negative labels")
    return (train_x.float(), train_y.long(), test_x.float(), test_y.long()), int(max(y.max() for y in labels)) + 1


def shape(cfg: DataConfig) -> tuple[tuple[int, int, int], int]:
    """(channels, height, width) of an example and the class count, without loading the files (data=custom: by
    calling its target)."""
    spec = _spec(cfg.name)
    if spec.files is not None:
        return spec.files.in_shape, spec.num_classes
    data = load_data(cfg, torch.device("cpu"))
    return data.in_shape, data.num_classes


def _linear_regression(cfg: DataConfig) -> tuple[Split, int]:
    """Santurkar et al.'s deep-linear-network task: x ~ N(0, I) in data.dim dimensions and y = A x, with A a
    fixed data.dim x data.dim matrix of N(0, 1) entries; deterministic in cfg (data.seed). x and y are
    (N, dim); the model's output count is dim."""
    g = torch.Generator().manual_seed(cfg.seed)
    a = torch.randn((cfg.dim, cfg.dim), generator=g)

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn((n, cfg.dim), generator=g)
        return x, x @ a.T

    return (*sample(cfg.num_train), *sample(cfg.num_test)), cfg.dim


def shifted(x: torch.Tensor, train_x: torch.Tensor, shift: str, seed: int = 0) -> torch.Tensor:
    """Images under trainer.shift, a change of domain the model never trained on: noise adds Gaussian noise
    whose std is the training images' std (a signal-to-noise ratio of 1), drawn from a generator seeded
    with `seed`, so every run sees the same noisy images."""
    if shift == "noise":
        generator = torch.Generator(device=x.device).manual_seed(seed)
        return x + train_x.std() * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x


def load_data(cfg: DataConfig, device: torch.device) -> Dataset:
    """The whole dataset on device: pixels in [0, 1] (custom: as its function returns them), or standardized
    per channel with train statistics."""
    spec = _spec(cfg.name)
    if spec.read is None:
        split, num_classes = spec.make(cfg)
        train_x, train_y, test_x, test_y = (t.to(device) for t in split)
    else:
        split = spec.read(require_files(cfg.name, cfg.root, cfg.download))
        train_x, train_y, test_x, test_y = (t.to(device) for t in split)  # uint8 on the wire: 4x less to copy
        train_x, test_x = train_x.float() / 255, test_x.float() / 255  # pixel values 0..255 -> [0, 1]
        num_classes = spec.num_classes
    if cfg.normalize:
        dims = (0, 2, 3) if train_x.dim() == 4 else (0,)  # per channel of an image, per entry of a vector
        mean = train_x.mean(dim=dims, keepdim=True)
        std = train_x.std(dim=dims, keepdim=True)
        train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    return Dataset(train_x, train_y, test_x, test_y, num_classes, TASKS[spec.task])


# ---------------------------------------------------------------- registry

DATASETS: dict[str, Spec] = {
    "mnist": Spec(read=_read_idx, files=FILES["mnist"]),
    "fashion_mnist": Spec(read=_read_idx, files=FILES["fashion_mnist"]),
    "cifar10": Spec(read=_read_cifar, files=FILES["cifar10"]),
    "synthetic": Spec(make=lambda cfg: (_synthetic(cfg), cfg.num_classes)),
    "custom": Spec(make=_custom),
    "linear_regression": Spec(task="regression", make=_linear_regression),
}
