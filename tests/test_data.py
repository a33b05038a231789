"""igkd.data: every source on real files the tests write (or the shared/Debian data)."""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import http.server
import io
import os
import pickle
import json
import logging
import socket
import tarfile
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers_data import cifar10_jpg_dir
from helpers_fs import tmpfs
from igkd.data import DATASETS, Dataset, Split, load_dataset, stratified_split
from igkd.data.cifar10 import ensure_cifar10
from igkd.data.cifar100 import ensure_cifar100
from igkd.data.fashion_mnist import DEFAULT_DIR as FMNIST_DIR
from igkd.errors import UserError

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("IGKD_CACHE_DIR", str(tmp_path / "cache"))


def test_unknown_kind_lists_known_kinds():
    with pytest.raises(UserError, match="unknown dataset kind 'mnist'.*cifar10, cifar100, imagefolder, "
                       "fashion-mnist, demo"):
        load_dataset("mnist:/data")
    assert set(DATASETS) == {"cifar10", "cifar100", "imagefolder", "fashion-mnist", "demo"}


# ---------------------------------------------------------------- cifar10 (pickle)

def write_cifar_archive(path: Path, per_batch: int = 20, n_test: int = 10) -> dict:
    """A cifar-10-python.tar.gz in the official layout; returns the rows written."""
    rng = np.random.default_rng(0)
    written, members = {}, {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        n = n_test if name == "test_batch" else per_batch
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, 10, size=n)]
        written[name] = (data, labels)
        members[name] = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [f"{name}_{i}.png".encode() for i in range(n)]}
    members["batches.meta"] = {b"label_names": [c.encode() for c in CIFAR_CLASSES],
                               b"num_cases_per_batch": per_batch, b"num_vis": 3072}
    with tarfile.open(path, "w:gz") as tar:
        for name, obj in members.items():
            raw = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return written


def check_cifar(ds: Dataset, written: dict) -> None:
    assert ds.classes == CIFAR_CLASSES and ds.channels == 3 and ds.image_size == (32, 32)
    train, test = ds.train, ds.test
    assert train.images.shape == (100, 3, 32, 32) and test.images.shape == (10, 3, 32, 32)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    rows = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    labels = sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert train.labels.tolist() == labels and test.labels.tolist() == written["test_batch"][1]
    # channel-major rows: 1024 red, 1024 green, 1024 blue values, each row by row
    for i, c, y, x in [(0, 0, 0, 0), (0, 1, 0, 0), (0, 2, 31, 31), (37, 1, 5, 30), (99, 2, 17, 3)]:
        assert train.images[i, c, y, x].item() == rows[i, c * 1024 + y * 32 + x]
    assert np.array_equal(train.images.numpy().reshape(100, -1), rows)
    assert np.array_equal(test.images.numpy().reshape(10, -1), written["test_batch"][0])


def test_cifar10_from_local_archive(tmp_path):
    written = write_cifar_archive(tmp_path / "cifar-10-python.tar.gz")
    # an archive found in DIR must have the official md5 too (only downloads were checked before)
    with pytest.raises(UserError, match=r"cifar-10-python.tar.gz has md5 \w+, not the official "
                       r"c58f30108f718f92721af3b95e74349a.*verify=0"):
        load_dataset(f"cifar10:{tmp_path},download=0")
    assert not (tmp_path / "cifar-10-batches-py").exists()  # refused before extracting
    ds = load_dataset(f"cifar10:{tmp_path},download=0,verify=0")
    assert ds.spec == f"cifar10:{tmp_path},download=0,verify=0"
    check_cifar(ds, written)
    assert (tmp_path / "cifar-10-batches-py" / "batches.meta").is_file()
    # extracted files are checked against the release's per-file md5 as well
    with pytest.raises(UserError, match=r"batches.meta has md5 \w+, not the official release's "
                       r"5ff9c542aee3614f3951f8cda6e48888"):
        load_dataset(f"cifar10:{tmp_path}")
    check_cifar(load_dataset(f"cifar10:{tmp_path},verify=0"), written)  # the extracted folder is reused
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no extraction leftovers


@pytest.fixture
def http_dir(tmp_path):
    """(folder, base URL) of a real HTTP server on 127.0.0.1 serving that folder."""
    served = tmp_path / "served"
    served.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_cifar10_download_over_http(tmp_path, http_dir, capsys):
    served, base = http_dir
    written = write_cifar_archive(served / "cifar.tgz")
    md5 = hashlib.md5((served / "cifar.tgz").read_bytes()).hexdigest()
    root = tmp_path / "data"
    root.mkdir()
    folder = ensure_cifar10(root, url=f"{base}/cifar.tgz", md5=md5)
    assert folder == root / "cifar-10-batches-py"
    assert "downloading" in capsys.readouterr().err
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]
    check_cifar(load_dataset(f"cifar10:{root},download=0,verify=0"), written)


def test_cifar10_downloads_into_a_folder_it_creates_and_removes_it_on_failure(tmp_path, http_dir):
    # the README's `cifar10:data/cifar10` downloads on first use: the folder had to exist first
    from igkd.data.cifar10 import RELEASE
    from igkd.data.cifar_archive import release_dir
    from igkd.spec import parse_spec
    served, base = http_dir
    written = write_cifar_archive(served / "cifar.tgz")
    md5 = hashlib.md5((served / "cifar.tgz").read_bytes()).hexdigest()
    mirror = dataclasses.replace(RELEASE, url=f"{base}/cifar.tgz")
    new = tmp_path / "data" / "cifar10"
    assert release_dir(mirror, parse_spec(f"cifar10:{new}"), True, md5) == new / "cifar-10-batches-py"
    check_cifar(load_dataset(f"cifar10:{new},download=0,verify=0"), written)
    gone = tmp_path / "other" / "cifar10"
    with pytest.raises(UserError, match="could not download"):
        release_dir(dataclasses.replace(RELEASE, url=f"{base}/missing.tgz"), parse_spec(f"cifar10:{gone}"), True, md5)
    assert not (tmp_path / "other").exists()  # nothing half-made


def test_cifar10_md5_mismatch_deletes_download(tmp_path, http_dir):
    served, base = http_dir
    write_cifar_archive(served / "cifar.tgz")
    root = tmp_path / "data"
    root.mkdir()
    with pytest.raises(UserError, match="md5 .* expected 0{32}"):
        ensure_cifar10(root, url=f"{base}/cifar.tgz", md5="0" * 32, quiet=True)
    assert list(root.iterdir()) == []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cifar10_offline_and_http_errors(tmp_path, http_dir):
    _, base = http_dir
    root = tmp_path / "data"
    root.mkdir()
    for url in [f"http://127.0.0.1:{free_port()}/cifar.tgz", f"{base}/missing.tgz"]:
        with pytest.raises(UserError, match=f"could not download .* place it in {root}") as e:
            ensure_cifar10(root, url=url, quiet=True)
        assert "\n" not in str(e.value) and "cifar-10-python.tar.gz" in str(e.value)
        assert list(root.iterdir()) == []


def test_cifar10_no_download_missing_dir_and_unsafe_archive(tmp_path):
    with pytest.raises(UserError, match="neither cifar-10-batches-py/ nor cifar-10-python.tar.gz"):
        load_dataset(f"cifar10:{tmp_path},download=0")
    with pytest.raises(UserError, match=f"dataset directory {tmp_path / 'nope'} does not exist; create it and place "
                                        "cifar-10-python.tar.gz there"):
        load_dataset(f"cifar10:{tmp_path / 'nope'},download=0")
    with pytest.raises(UserError, match="needs a directory"):
        load_dataset("cifar10")
    with pytest.raises(UserError, match="unknown option"):
        load_dataset(f"cifar10:{tmp_path},size=3")
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("../evil")
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(UserError, match="md5"):
        load_dataset(f"cifar10:{tmp_path}")
    with pytest.raises(UserError, match="unsafe entry '../evil'"):
        load_dataset(f"cifar10:{tmp_path},verify=0")
    assert not (tmp_path.parent / "evil").exists()


class _Hostile:
    """Pickles to a call of os.system: what a poisoned dataset file would hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar10_hostile_pickles_run_nothing(tmp_path):
    """A pickle that would run a command, in an extracted folder or a local archive, with or
    without md5 verification: one-line error, and the command never ran."""
    marker = tmp_path / "PWNED"
    evil = pickle.dumps({b"label_names": [_Hostile(marker)]}, protocol=2)
    # 1. pre-extracted folder; also a plain pickle of another callable (builtins.eval)
    folder_root = tmp_path / "extracted"
    write_cifar_archive(tmp_path / "src.tar.gz")
    with tarfile.open(tmp_path / "src.tar.gz") as tar:
        tar.extractall(folder_root, filter="data")
    (folder_root / "cifar-10-batches-py" / "batches.meta").write_bytes(evil)
    for spec in (f"cifar10:{folder_root}", f"cifar10:{folder_root},verify=0"):
        with pytest.raises(UserError) as e:
            load_dataset(spec)
        assert "\n" not in str(e.value) and "batches.meta" in str(e.value)
    assert "os.system" in str(e.value) or "posix.system" in str(e.value)  # verify=0: the unpickler refused it
    # 2. inside a local archive
    archive_root = tmp_path / "archive"
    archive_root.mkdir()
    with tarfile.open(archive_root / "cifar-10-python.tar.gz", "w:gz") as tar:
        for name, raw in [("batches.meta", evil)] + [(n, pickle.dumps({}, protocol=2)) for n in
                                                      [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]]:
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    with pytest.raises(UserError, match="md5"):
        load_dataset(f"cifar10:{archive_root}")
    with pytest.raises(UserError, match="not a plain CIFAR-10 batch.*nothing in it was run"):
        load_dataset(f"cifar10:{archive_root},verify=0")
    assert not marker.exists()
    # a batch whose data is not a uint8 array is refused too, before any use
    d = folder_root / "cifar-10-batches-py"
    (d / "batches.meta").write_bytes(pickle.dumps({b"label_names": [c.encode() for c in CIFAR_CLASSES]}, protocol=2))
    (d / "test_batch").write_bytes(pickle.dumps({b"data": [1, 2], b"labels": [0]}, protocol=2))
    with pytest.raises(UserError, match="test_batch is not a valid CIFAR-10 batch"):
        load_dataset(f"cifar10:{folder_root},verify=0").test


def test_safe_pickle_reads_what_numpy_writes():
    """Arrays pickled at protocols 2 to 5 (numpy 1 and 2 module names) come back equal."""
    from igkd.data.safe_pickle import load_data_pickle
    arr = np.arange(24, dtype=np.uint8).reshape(2, 12)
    for protocol in (2, 3, 4, 5):
        raw = pickle.dumps({b"data": arr, b"labels": [1, 2], b"name": b"x"}, protocol=protocol)
        # the official files (Python 2, protocol 2) name numpy.core: text GLOBAL opcodes, safe to rename
        for variant in (raw, raw.replace(b"numpy._core", b"numpy.core")) if protocol == 2 else (raw,):
            f = Path(tempfile.mkstemp()[1])
            f.write_bytes(variant)
            d = load_data_pickle(f, "batch", "fix it")
            f.unlink()
            assert np.array_equal(d[b"data"], arr) and d[b"labels"] == [1, 2] and d[b"name"] == b"x"


# ---------------------------------------------------------------- cifar100 (pickle)

def write_cifar100_archive(path: Path, n_train: int = 30, n_test: int = 12, hostile_meta: bytes | None = None) -> dict:
    """A cifar-100-python.tar.gz in the official layout (train, test, meta); returns what it holds."""
    rng = np.random.default_rng(1)
    written, members = {}, {}
    for name, n in [("train", n_train), ("test", n_test)]:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        fine = [int(x) for x in rng.integers(0, 100, size=n)]
        coarse = [f // 5 for f in fine]
        written[name] = (data, fine, coarse)
        members[name] = {b"filenames": [f"{name}_{i}.png".encode() for i in range(n)], b"batch_label": name.encode(),
                         b"fine_labels": fine, b"coarse_labels": coarse, b"data": data}
    written["fine_names"] = [f"fine_{i:02d}" for i in range(100)]
    written["coarse_names"] = [f"coarse_{i:02d}" for i in range(20)]
    meta = {b"fine_label_names": [c.encode() for c in written["fine_names"]],
            b"coarse_label_names": [c.encode() for c in written["coarse_names"]]}
    with tarfile.open(path, "w:gz") as tar:
        for name, obj in [*members.items(), ("meta", meta)]:
            raw = hostile_meta if name == "meta" and hostile_meta is not None else pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return written


def test_cifar100_fine_and_coarse_labels_from_the_official_layout(tmp_path):
    written = write_cifar100_archive(tmp_path / "cifar-100-python.tar.gz")
    with pytest.raises(UserError, match=r"cifar-100-python.tar.gz has md5 \w+, not the official "
                       r"eb9058c3a382ffc7106e4002c42a8d85.*verify=0"):
        load_dataset(f"cifar100:{tmp_path},download=0")
    assert not (tmp_path / "cifar-100-python").exists()  # refused before extracting
    ds = load_dataset(f"cifar100:{tmp_path},verify=0")
    assert ds.classes == written["fine_names"] and ds.channels == 3 and ds.image_size == (32, 32)
    for split, name in [(ds.train, "train"), (ds.test, "test")]:
        data, fine, _ = written[name]
        assert split.images.shape == (len(data), 3, 32, 32) and split.images.dtype == torch.uint8
        assert np.array_equal(split.images.numpy().reshape(len(data), -1), data) and split.labels.tolist() == fine
    rows = written["train"][0]
    for i, c, y, x in [(0, 0, 0, 0), (3, 1, 0, 31), (29, 2, 31, 0)]:  # channel-major, row by row, as CIFAR-10
        assert ds.train.images[i, c, y, x].item() == rows[i, c * 1024 + y * 32 + x]
    coarse = load_dataset(f"cifar100:{tmp_path},labels=coarse,verify=0")
    assert coarse.classes == written["coarse_names"] and coarse.num_classes == 20
    assert coarse.train.labels.tolist() == written["train"][2] and coarse.test.labels.tolist() == written["test"][2]
    # the extracted files are checked against the release's per-file md5 too
    with pytest.raises(UserError, match=r"meta has md5 \w+, not the official release's "
                       r"7973b15100ade9c7d40fb424638fde48"):
        load_dataset(f"cifar100:{tmp_path}")
    with pytest.raises(UserError, match="labels=both .* use labels=fine .* or labels=coarse"):
        load_dataset(f"cifar100:{tmp_path},labels=both")
    # a batch without the label list asked for, or with labels out of range: one line, before any use
    d = tmp_path / "cifar-100-python"
    (d / "test").write_bytes(pickle.dumps({b"data": written["test"][0], b"fine_labels": [100] * 12}, protocol=2))
    with pytest.raises(UserError, match="test has fine labels outside 0..99"):
        load_dataset(f"cifar100:{tmp_path},verify=0").test
    with pytest.raises(UserError, match="test is not a valid CIFAR-100 batch .*'coarse_labels'"):
        load_dataset(f"cifar100:{tmp_path},verify=0,labels=coarse").test
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no extraction leftovers


def test_cifar100_download_and_hostile_pickle(tmp_path, http_dir):
    served, base = http_dir
    written = write_cifar100_archive(served / "c100.tgz", n_train=5, n_test=5)
    md5 = hashlib.md5((served / "c100.tgz").read_bytes()).hexdigest()
    root = tmp_path / "data"
    root.mkdir()
    with pytest.raises(UserError, match="md5 .* expected 0{32}"):
        ensure_cifar100(root, url=f"{base}/c100.tgz", md5="0" * 32, quiet=True)
    assert list(root.iterdir()) == []  # the bad download is deleted
    assert ensure_cifar100(root, url=f"{base}/c100.tgz", md5=md5, quiet=True) == root / "cifar-100-python"
    assert sorted(p.name for p in root.iterdir()) == ["cifar-100-python", "cifar-100-python.tar.gz"]
    assert load_dataset(f"cifar100:{root},download=0,verify=0").test.labels.tolist() == written["test"][1]
    # a meta file that would run a command: refused by the md5, and by the unpickler under verify=0
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil"
    evil.mkdir()
    write_cifar100_archive(evil / "cifar-100-python.tar.gz", n_train=2, n_test=2,
                           hostile_meta=pickle.dumps({b"fine_label_names": [_Hostile(marker)]}, protocol=2))
    with pytest.raises(UserError, match="md5"):
        load_dataset(f"cifar100:{evil}")
    with pytest.raises(UserError, match=r"meta is not a plain CIFAR-100 batch \(it refers to (posix|os)\.system.*"
                       "nothing in it was run") as e:
        load_dataset(f"cifar100:{evil},verify=0")
    assert "\n" not in str(e.value) and not marker.exists()


# ---------------------------------------------------------------- imagefolder

def test_imagefolder_scales_16_bit_and_float_images_by_their_range(tmp_path):
    """16-bit PNGs and float TIFFs become 8 bits by their format's range, not clipped
    (Pillow's convert made a 16-bit PNG 99.6% white and a [0, 1] float TIFF black)."""
    v16 = (np.arange(64, dtype=np.uint32).reshape(8, 8) * 1040).astype(np.uint16)  # 0 .. 65520
    vf = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
        Image.fromarray(v16).save(tmp_path / split / "a" / "deep.png")
        Image.fromarray(vf).save(tmp_path / split / "b" / "float.tif")
    assert Image.open(tmp_path / "train" / "a" / "deep.png").mode == "I;16"
    assert Image.open(tmp_path / "train" / "b" / "float.tif").mode == "F"
    want16 = np.floor(v16.astype(np.float64) * 255 / 65535 + 0.5)
    wantf = np.floor(vf.astype(np.float64) * 255 + 0.5)
    assert want16[0, 1] == 4 and want16[7, 7] == 255 and wantf[3, 0] == 97  # by hand: 1040 / 257 = 4.05, 24 / 63 * 255 = 97.1
    for gray in (1, 0):
        ds = load_dataset(f"imagefolder:{tmp_path},gray={gray},cache=0")
        images = ds.train.images.numpy()
        assert images.shape == (2, 1 if gray else 3, 8, 8)
        for c in range(images.shape[1]):
            assert np.array_equal(images[0, c], want16) and np.array_equal(images[1, c], wantf)
    # out of range floats and modes igkd cannot decode faithfully: one line naming the file
    Image.fromarray(vf * 3).save(tmp_path / "train" / "b" / "float.tif")
    with pytest.raises(UserError, match=r"float image .*float.tif has values outside \[0, 1\]"):
        _ = load_dataset(f"imagefolder:{tmp_path},cache=0").train
    Image.fromarray(vf).save(tmp_path / "train" / "b" / "float.tif")
    Image.new("I;16B", (8, 8)).save(tmp_path / "test" / "b" / "float.tif")  # still a 16-bit mode: decodes
    _ = load_dataset(f"imagefolder:{tmp_path},cache=0").test


CLASSES = ["ant", "cat", "dog"]  # written in another order below; loaded sorted


def write_folder(root: Path, counts: dict[str, int], size=(6, 5), seed=0) -> dict[str, list[np.ndarray]]:
    """PNG images root/<class>/img_<i>.png of random pixels; returns them per class in name order."""
    rng = np.random.default_rng(seed)
    out = {}
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True)
        out[cls] = []
        for i in range(n):
            arr = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / cls / f"img_{i:02d}.png")
            out[cls].append(arr)
    return out


def stacked(images: dict[str, list[np.ndarray]]) -> tuple[np.ndarray, list[int]]:
    arrs = [a for c in CLASSES for a in images[c]]
    return np.stack(arrs).transpose(0, 3, 1, 2), [i for i, c in enumerate(CLASSES) for _ in images[c]]


@pytest.fixture
def split_folder(tmp_path):
    root = tmp_path / "pets"
    train = write_folder(root / "train", {"dog": 3, "cat": 4, "ant": 2}, seed=1)
    test = write_folder(root / "test", {"dog": 2, "cat": 1, "ant": 2}, seed=2)
    return root, train, test


def test_imagefolder_train_test_layout(split_folder):
    root, train, test = split_folder
    ds = load_dataset(f"imagefolder:{root}")
    assert ds.classes == CLASSES and ds.channels == 3 and ds.image_size == (6, 5)
    for split, written in [(ds.train, train), (ds.test, test)]:
        images, labels = stacked(written)
        assert split.images.dtype == torch.uint8 and split.images.is_contiguous()
        assert np.array_equal(split.images.numpy(), images) and split.labels.tolist() == labels
    gray = load_dataset(f"imagefolder:{root},gray=1")
    assert gray.channels == 1 and gray.train.images.shape == (9, 1, 6, 5)
    want = np.stack([np.asarray(Image.fromarray(a).convert("L")) for c in CLASSES for a in train[c]])
    assert np.array_equal(gray.train.images[:, 0].numpy(), want)


def test_imagefolder_single_folder_with_test_fraction(tmp_path):
    written = write_folder(tmp_path / "all", {"cat": 10, "ant": 6, "dog": 4})
    images, labels = stacked(written)
    ds = load_dataset(f"imagefolder:{tmp_path / 'all'},test=0.5,seed=3")
    keep, held = stratified_split(torch.tensor(labels), 0.5, 3)
    assert np.array_equal(ds.train.images.numpy(), images[keep.numpy()])
    assert np.array_equal(ds.test.images.numpy(), images[held.numpy()])
    assert ds.test.labels.bincount().tolist() == [3, 5, 2]
    other = load_dataset(f"imagefolder:{tmp_path / 'all'},test=0.5,seed=4")
    assert not torch.equal(other.test.images, ds.test.images)
    with pytest.raises(UserError, match="no train/ and test/ folders; add ',test=0.2'"):
        load_dataset(f"imagefolder:{tmp_path / 'all'}")
    with pytest.raises(UserError, match="out of range"):
        load_dataset(f"imagefolder:{tmp_path / 'all'},test=1.5")


def test_imagefolder_resize(split_folder):
    root, train, _ = split_folder
    ds = load_dataset(f"imagefolder:{root},size=8")
    assert ds.image_size == (8, 8) and ds.train.images.shape == (9, 3, 8, 8)
    ds = load_dataset(f"imagefolder:{root},size=4x7")
    assert ds.image_size == (4, 7) and ds.test.images.shape == (5, 3, 4, 7)
    want = np.asarray(Image.fromarray(train["ant"][0]).resize((7, 4), Image.BILINEAR)).transpose(2, 0, 1)
    assert np.array_equal(ds.train.images[0].numpy(), want)
    with pytest.raises(UserError, match="size=0 .* use size=N or size=HxW"):
        load_dataset(f"imagefolder:{root},size=0")


def test_imagefolder_imagenet_layout(tmp_path):
    """DIR/train/<wnid>/*.JPEG + DIR/val/<wnid>/*.JPEG: val/ is the test split; .JPEG matches."""
    root = tmp_path / "imagenet"
    rng = np.random.default_rng(5)
    for split, n in [("train", 3), ("val", 2)]:
        for wnid in ("n01530575", "n01440764"):
            (root / split / wnid).mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 256, (8, 10, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / wnid / f"{wnid}_{i}.JPEG", quality=90)
    (root / "train" / "n01440764" / "notes.txt").write_text("not an image")
    ds = load_dataset(f"imagefolder:{root}")
    assert ds.classes == ["n01440764", "n01530575"] and ds.image_size == (8, 10)
    for split, name, n in [(ds.train, "train", 3), (ds.test, "val", 2)]:
        files = sorted((root / name).glob("*/*.JPEG"))  # class folders sorted, then names
        want = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]).transpose(0, 3, 1, 2)
        assert np.array_equal(split.images.numpy(), want) and split.labels.tolist() == [0] * n + [1] * n
    with pytest.raises(UserError, match=r"already has train/ and val/; drop the test= and seed="):
        load_dataset(f"imagefolder:{root},test=0.1")
    for f in (root / "val" / "n01440764").iterdir():  # val/ as ImageNet ships it: loose images
        f.rename(root / "val" / f.name)
    for d in list((root / "val").iterdir()):
        if d.is_dir():
            for f in d.iterdir():
                f.rename(root / "val" / f.name)
            d.rmdir()
    with pytest.raises(UserError, match=r"val has no class subfolders.*holds 4 images directly: sort them into "
                       r"one folder per class"):
        load_dataset(f"imagefolder:{root}").test
    (root / "val").rename(tmp_path / "elsewhere")
    with pytest.raises(UserError, match="has train/ but no test/ or val/"):
        load_dataset(f"imagefolder:{root}")


def test_imagefolder_resize_shorter_side_then_center_crop(tmp_path):
    """Images of mixed sizes and aspect ratios, resized by hand with Pillow: the shorter side
    to N (the longer to floor(long * N / short)), then the centre N x N (offset round(d / 2))."""
    root = tmp_path / "mixed"
    rng = np.random.default_rng(7)
    sizes = {"a": (40, 30), "b": (30, 50), "c": (16, 16), "d": (17, 64)}  # (width, height)
    originals = {}
    for name, (w, h) in sizes.items():
        (root / "train" / name).mkdir(parents=True)
        (root / "test" / name).mkdir(parents=True)
        originals[name] = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(originals[name]).save(root / "train" / name / "x.png")
        Image.fromarray(originals[name][:, ::-1]).save(root / "test" / name / "x.png")
    # by hand, N = 16: landscape 40x30 -> 21x16 (21.3), crop left round(5 / 2) = 2 (half to even);
    # portrait 30x50 -> 16x26 (26.7), top round(10 / 2) = 5; 16x16 untouched; 17x64 -> 16x60 (60.2), top 22
    by_hand = {"a": ((21, 16), (2, 0, 18, 16)), "b": ((16, 26), (0, 5, 16, 21)), "c": (None, (0, 0, 16, 16)),
               "d": ((16, 60), (0, 22, 16, 38))}
    ds = load_dataset(f"imagefolder:{root},size=16,resize=shorter")
    assert ds.image_size == (16, 16) and ds.train.images.shape == (4, 3, 16, 16)
    for i, name in enumerate(sizes):
        im = Image.fromarray(originals[name])
        new, box = by_hand[name]
        want = np.asarray((im.resize(new, Image.BILINEAR) if new else im).crop(box)).transpose(2, 0, 1)
        assert np.array_equal(ds.train.images[i].numpy(), want), name
    # H x W: scaled until both sides cover, 40x30 to 12x20 (HxW): width factor 0.5 > 0.4 -> 20x15, top round(1.5) = 2
    ds = load_dataset(f"imagefolder:{root},size=12x20,resize=shorter")
    want = np.asarray(Image.fromarray(originals["a"]).resize((20, 15), Image.BILINEAR).crop((0, 2, 20, 14)))
    assert ds.image_size == (12, 20) and np.array_equal(ds.train.images[0].numpy(), want.transpose(2, 0, 1))
    fixed = load_dataset(f"imagefolder:{root},size=12x20,resize=fixed").train  # the default: stretched
    want = np.asarray(Image.fromarray(originals["b"]).resize((20, 12), Image.BILINEAR))
    assert np.array_equal(fixed.images[1].numpy(), want.transpose(2, 0, 1))
    assert torch.equal(fixed.images, load_dataset(f"imagefolder:{root},size=12x20").train.images)
    with pytest.raises(UserError, match="images differ in size .* add ',size=N' .*',resize=shorter'"):
        load_dataset(f"imagefolder:{root}").train
    with pytest.raises(UserError, match="resize=shorter .* needs a size; add ',size=N'"):
        load_dataset(f"imagefolder:{root},resize=shorter")
    with pytest.raises(UserError, match="resize=crop .* use resize=fixed .* or resize=shorter"):
        load_dataset(f"imagefolder:{root},size=8,resize=crop")


def test_imagefolder_mixed_sizes_need_size_option(tmp_path):
    root = tmp_path / "mixed"
    write_folder(root, {"ant": 2})
    write_folder(root, {"cat": 2}, size=(9, 9))
    with pytest.raises(UserError, match=r"cat/img_00.png is 9x9.*add ',size=N'"):
        load_dataset(f"imagefolder:{root},test=0.5").train
    assert load_dataset(f"imagefolder:{root},test=0.5,size=9").train.images.shape == (2, 3, 9, 9)


def test_imagefolder_corrupt_image_names_file_and_splits_are_lazy(split_folder):
    root, _, test = split_folder
    bad = root / "train" / "cat" / "zz_bad.jpg"
    bad.write_bytes(b"this is not a jpeg" * 10)
    ds = load_dataset(f"imagefolder:{root}")
    assert ds.test.images.shape == (5, 3, 6, 5)  # the test split never touches train/
    with pytest.raises(UserError, match=f"cannot read image {bad}"):
        ds.train


def test_imagefolder_layout_errors(tmp_path, split_folder):
    root, _, _ = split_folder
    with pytest.raises(UserError, match=f"dataset directory {tmp_path / 'none'} does not exist"):
        load_dataset(f"imagefolder:{tmp_path / 'none'}")
    with pytest.raises(UserError, match="already has train/ and test/"):
        load_dataset(f"imagefolder:{root},test=0.2")
    with pytest.raises(UserError, match="unknown option.*known options: size, resize, gray, test, seed, cache, mmap"):
        load_dataset(f"imagefolder:{root},crop=3")
    with pytest.raises(UserError, match="gray='maybe'.*not a valid flag"):
        load_dataset(f"imagefolder:{root},gray=maybe")
    (root / "test" / "eel").mkdir()
    Image.new("RGB", (5, 6)).save(root / "test" / "eel" / "a.png")
    with pytest.raises(UserError, match=r"different class folders \(only in train: -; only in test: \['eel'\]\)"):
        load_dataset(f"imagefolder:{root}")
    only_train = tmp_path / "t"
    write_folder(only_train / "train", {"ant": 1})
    with pytest.raises(UserError, match="has train/ but no test/"):
        load_dataset(f"imagefolder:{only_train}")


def same_size_garbage(path: Path) -> bytes:
    """Overwrite ``path`` with zeros of the same size and mtime, so the cache key does not change
    (a load can then only succeed by reading the cache); returns the original bytes."""
    original, st = path.read_bytes(), path.stat()
    path.write_bytes(b"\0" * st.st_size)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    return original


def restore(path: Path, data: bytes) -> None:
    st = path.stat()
    path.write_bytes(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def cache_folders(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "cache" / "datasets").glob("imagefolder-*"))


def test_imagefolder_cache_is_checked_and_rebuilt(split_folder, tmp_path, caplog, monkeypatch):
    """A cache is used only while it matches its folder and its own header and checksum;
    otherwise one warning line names it and what is wrong, and it is rebuilt, never used."""
    root, train, _ = split_folder
    want, _ = stacked(train)
    a = load_dataset(f"imagefolder:{root}").train
    assert a.mapped is None and np.array_equal(a.images.numpy(), want)  # 9 tiny images: in memory
    [folder] = cache_folders(tmp_path)  # train only: the test split was not asked for
    assert sorted(p.name for p in folder.iterdir()) == ["images.bin", "images.bin.verified.json"]
    cache = folder / "images.bin"
    assert cache.stat().st_size == 4096 + (9 * 90 + 7) // 8 * 8 + 9 * 8  # header, images, int64 labels
    assert a.digest == Dataset("x", CLASSES, 3, (6, 5), Split(a.images.clone(), a.labels), a).fingerprint()
    path = root / "train" / "cat" / "img_00.png"
    built = (cache.stat().st_ino, cache.stat().st_mtime_ns)
    assert np.array_equal(load_dataset(f"imagefolder:{root}").train.images.numpy(), want)  # read from the cache
    assert (cache.stat().st_ino, cache.stat().st_mtime_ns) == built  # not rebuilt

    def reload(why: str) -> Split:
        caplog.clear()
        with caplog.at_level("WARNING", logger="igkd.data.image_cache"):
            split = load_dataset(f"imagefolder:{root}").train
        [line] = [r.getMessage() for r in caplog.records]
        assert f"dataset cache {cache} {why}" in line and line.endswith("rebuilding it") and "\n" not in line
        assert cache_folders(tmp_path) == [folder] and not list(folder.glob("*.partial*"))
        return split

    raw = cache.read_bytes()
    for damage, why in [(raw[:-100], "is truncated"), (raw + b"\0", "is too long"),
                        (b"[" + raw[1:], "has a damaged header"),
                        (raw[:4500] + bytes([raw[4500] ^ 1]) + raw[4501:], "is corrupt")]:
        cache.write_bytes(damage)
        assert np.array_equal(reload(why).images.numpy(), want)
        assert cache.read_bytes() == raw  # rebuilt to the same bytes
    # memory-mapped, the checksum is checked whenever the file changed since its last check
    cache.write_bytes(raw[:4500] + bytes([raw[4500] ^ 1]) + raw[4501:])
    monkeypatch.setenv("IGKD_DATA_MEMORY", "500")  # bytes, below the split's 810
    split = reload("is corrupt")
    monkeypatch.delenv("IGKD_DATA_MEMORY")
    assert split.mapped == cache and np.array_equal(split.images.numpy(), want)
    # a real edit changes size/mtime: the cache no longer matches its folder
    Image.fromarray(np.full((6, 5, 3), 7, np.uint8)).save(path)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    c = reload("no longer matches its image folder")
    assert (c.images[2] == 7).all() and np.array_equal(c.images[3:].numpy(), want[3:])


def test_imagefolder_memory_mapped_split(split_folder, tmp_path, monkeypatch):
    """Above the memory budget a split is a tensor over a copy-on-write map of the cache file."""
    root, train, test = split_folder
    want, labels = stacked(train)
    monkeypatch.setenv("IGKD_DATA_MEMORY", "500")  # bytes: the 810-byte train split is mapped
    ds = load_dataset(f"imagefolder:{root}")
    s = ds.train
    [folder] = cache_folders(tmp_path)
    assert s.mapped == folder / "images.bin" and s.images.dtype == torch.uint8 and s.images.is_contiguous()
    assert np.array_equal(s.images.numpy(), want) and s.labels.tolist() == labels
    assert ds.fingerprint() == Dataset("x", CLASSES, 3, (6, 5), Split(s.images.clone(), s.labels), s).fingerprint()
    assert np.array_equal(s.subset(torch.tensor([4, 0])).images.numpy(), want[[4, 0]])
    assert ds.channel_stats()[0][0] == pytest.approx(want[:, 0].mean() / 255, abs=1e-12)
    before = s.mapped.read_bytes()
    s.images[0] += 1  # a stray in-place write: private pages, never the file (a read-only map would SIGSEGV)
    assert s.mapped.read_bytes() == before
    assert load_dataset(f"imagefolder:{root},mmap=0").train.mapped is None  # forced into memory
    monkeypatch.setenv("IGKD_DATA_MEMORY", "1G")
    assert load_dataset(f"imagefolder:{root},mmap=1").test.mapped is not None  # forced onto the map
    assert load_dataset(f"imagefolder:{root}").test.mapped is None
    with pytest.raises(UserError, match="mmap=1 and cache=0 .* contradict"):
        load_dataset(f"imagefolder:{root},mmap=1,cache=0")
    with pytest.raises(UserError, match="mmap=sometimes .* use mmap=auto"):
        load_dataset(f"imagefolder:{root},mmap=sometimes")
    # a cache folder that cannot be created: in memory with a warning when it fits, else one line
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("IGKD_CACHE_DIR", str(tmp_path / "a-file"))
    assert np.array_equal(load_dataset(f"imagefolder:{root}").train.images.numpy(), want)
    with pytest.raises(UserError, match=r"cannot create the dataset cache .*a-file/datasets/imagefolder-\w+ .*; "
                       r".*memory-mapped from that cache: set IGKD_CACHE_DIR to a writable folder"):
        load_dataset(f"imagefolder:{root},mmap=1").train
    monkeypatch.setenv("IGKD_DATA_MEMORY", "lots")
    with pytest.raises(UserError, match="IGKD_DATA_MEMORY='lots' is not a size.*IGKD_DATA_MEMORY=8G"):
        load_dataset(f"imagefolder:{root}").train


def test_imagefolder_cache_build_resumes_after_it_stopped(tmp_path, monkeypatch, caplog):
    """A build stopped by an image that cannot be decoded keeps its finished chunks in a
    .partial file, never taken for a cache; rerun with the same files, it decodes only the rest;
    once a file is replaced (size and mtime kept or not), it starts over."""
    from igkd.data import image_cache
    monkeypatch.setattr(image_cache, "CHUNK_BYTES", 4 * 90)  # 4 rows of 6x5 RGB a chunk: 3 chunks
    root = tmp_path / "f"
    written = write_folder(root / "train", {"ant": 4, "cat": 4, "dog": 4}, seed=3)
    write_folder(root / "test", {"ant": 1, "cat": 1, "dog": 1}, seed=4)
    want, _ = stacked(written)
    bad = root / "train" / "dog" / "img_03.png"  # the last chunk
    original = same_size_garbage(bad)
    with pytest.raises(UserError, match=f"cannot read image {bad} ") as e:
        load_dataset(f"imagefolder:{root}").train
    assert "\n" not in str(e.value)
    [folder] = cache_folders(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["images.bin.partial", "images.bin.progress.json"]
    progress = json.loads((folder / "images.bin.progress.json").read_text())
    assert progress["done"] == "010100" and progress["chunk_rows"] == 4  # chunks 0 and 1 were decoded
    # rerun with the same files: chunks 0 and 1 are kept, only chunk 2 is decoded (and fails again)
    with caplog.at_level(logging.INFO, logger="igkd.data.image_cache"):
        with pytest.raises(UserError, match=f"cannot read image {bad} "):
            load_dataset(f"imagefolder:{root}").train
    assert [r.levelno for r in caplog.records if "2 of 3 chunks were already decoded" in r.getMessage()] \
        == [logging.WARNING]  # a warning: an info record never reached the user's terminal
    assert json.loads((folder / "images.bin.progress.json").read_text())["done"] == "010100"
    # the image replaced: other files than the partial build's (even at the same size and mtime), so it starts over
    restore(bad, original)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="igkd.data.image_cache"):
        s = load_dataset(f"imagefolder:{root}").train
    assert "already decoded" not in caplog.text
    assert np.array_equal(s.images.numpy(), want)
    assert sorted(p.name for p in folder.iterdir()) == ["images.bin", "images.bin.verified.json"]


def test_imagefolder_cache_on_a_full_disk(split_folder, tmp_path, monkeypatch):
    """A disk too small for the cache, or one that fills during the build: one line, and no
    file is left behind; once the cache is preallocated, nothing else can fill it."""
    from igkd.data import image_cache
    root, train, _ = split_folder
    want, _ = stacked(train)
    with tmpfs(tmp_path / "disk", "8k") as resize:  # two 4 KiB pages: the lock, then not the 4.9 KB cache
        monkeypatch.setenv("IGKD_CACHE_DIR", str(tmp_path / "disk" / "cache"))
        for pages, sync_s in [(2, 3.0), (3, 0.0)]:  # 3 pages: the cache fits, its first progress record does not
            resize(f"{4 * pages}k")
            monkeypatch.setattr(image_cache, "SYNC_SECONDS", sync_s)  # 0: a record after every chunk
            with pytest.raises(UserError, match=r"disk full while writing the dataset cache .*imagefolder-\w+ "
                               r"\(it needs 4.9 KiB\); free space .* or add ',cache=0'") as e:
                load_dataset(f"imagefolder:{root}").train
            assert "\n" not in str(e.value)
            assert [p for p in (tmp_path / "disk").rglob("*") if not p.is_dir()] == []
        monkeypatch.setattr(image_cache, "SYNC_SECONDS", 3.0)
        assert np.array_equal(load_dataset(f"imagefolder:{root}").train.images.numpy(), want)  # 3 pages suffice


def test_imagefolder_real_cifar10_jpg():
    root = cifar10_jpg_dir()
    if root is None:
        reason = "needs shared/data/cifar10-jpg.tar.gz (the folder 'shared' beside the repo root)"
        if os.environ.get("IGKD_REQUIRE_SHARED"):
            pytest.fail(reason + "; IGKD_REQUIRE_SHARED is set, so it is mandatory here")
        pytest.skip(reason)
    # through the session's decoded cache (conftest), as users load it: test_deploy and
    # test_published then read these images instead of decoding the JPEGs again
    ds = load_dataset(f"imagefolder:{root}")
    assert ds.classes == CIFAR_CLASSES and ds.channels == 3 and ds.image_size == (32, 32)
    assert ds.train.images.shape == (50000, 3, 32, 32) and ds.test.images.shape == (10000, 3, 32, 32)
    assert ds.train.labels.bincount().tolist() == [5000] * 10
    assert ds.test.labels.bincount().tolist() == [1000] * 10
    assert ds.train.labels[:5000].eq(0).all() and ds.train.labels[-1].item() == 9
    assert 0.3 < ds.channel_stats()[0][0] < 0.7


# ---------------------------------------------------------------- fashion-mnist and demo

def write_idx(path: Path, arr: np.ndarray, magic: int | None = None) -> None:
    head = (magic if magic is not None else 0x0800 + arr.ndim).to_bytes(4, "big")
    raw = head + b"".join(d.to_bytes(4, "big") for d in arr.shape) + arr.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        raw = gzip.compress(raw)
    path.write_bytes(raw)


def test_fashion_mnist_idx_parsing(tmp_path):
    rng = np.random.default_rng(0)
    imgs = {k: rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for k, n in [("train", 7), ("t10k", 3)]}
    labs = {k: rng.integers(0, 10, len(v), dtype=np.uint8) for k, v in imgs.items()}
    for k in imgs:  # one split gzipped, one plain, as both occur in the wild
        gz = ".gz" if k == "train" else ""
        write_idx(tmp_path / f"{k}-images-idx3-ubyte{gz}", imgs[k])
        write_idx(tmp_path / f"{k}-labels-idx1-ubyte{gz}", labs[k])
    ds = load_dataset(f"fashion-mnist:{tmp_path}")
    assert ds.channels == 1 and ds.image_size == (28, 28) and ds.classes[0] == "T-shirt/top"
    assert np.array_equal(ds.train.images[:, 0].numpy(), imgs["train"])
    assert np.array_equal(ds.test.labels.numpy(), labs["t10k"].astype(np.int64))
    write_idx(tmp_path / "t10k-images-idx3-ubyte", imgs["t10k"], magic=0x0801)
    with pytest.raises(UserError, match="t10k-images-idx3-ubyte is not an IDX file of 3-D"):
        load_dataset(f"fashion-mnist:{tmp_path}").test
    write_idx(tmp_path / "t10k-images-idx3-ubyte", imgs["t10k"][:, :, :27])
    with pytest.raises(UserError, match="expected N x 28 x 28"):
        load_dataset(f"fashion-mnist:{tmp_path}").test
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\0\0\x08\x01\0\0\0\x09\1")
    with pytest.raises(UserError, match="truncated or padded"):
        load_dataset(f"fashion-mnist:{tmp_path}").test
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
        load_dataset(f"fashion-mnist:{tmp_path / 'none'}")


def needs_fashion_mnist(fn):
    """Skip without Debian's Fashion-MNIST, except where CI made it mandatory."""
    if Path(FMNIST_DIR).is_dir() or os.environ.get("IGKD_REQUIRE_FASHION_MNIST"):
        return fn
    return pytest.mark.skip(reason=f"{FMNIST_DIR} absent (apt-get install dataset-fashion-mnist)")(fn)


@needs_fashion_mnist
def test_fashion_mnist_debian():
    ds = load_dataset("fashion-mnist")
    assert ds.train.images.shape == (60000, 1, 28, 28) and ds.test.images.shape == (10000, 1, 28, 28)
    assert ds.train.labels.bincount().tolist() == [6000] * 10


def test_demo_dataset():
    ds = load_dataset("demo")
    assert ds.spec == "demo" and ds.channels == 1 and ds.image_size == (28, 28) and len(ds.classes) == 10
    assert len(ds.train) == 2000 and len(ds.test) == 1000
    assert ds.train.images.shape == (2000, 1, 28, 28) and ds.train.images.dtype == torch.uint8
    assert ds.train.labels.bincount().tolist() == [200] * 10 and ds.test.labels.bincount().tolist() == [100] * 10
    assert ds.train.images.float().std() > 50  # real images, not blanks
    with pytest.raises(UserError, match="takes no directory"):
        load_dataset("demo:/x")


@needs_fashion_mnist
def test_demo_is_first_per_class_of_fashion_mnist():
    demo, full = load_dataset("demo"), load_dataset("fashion-mnist")
    for split, k in [("train", 200), ("test", 100)]:
        labels = getattr(full, split).labels
        idx = torch.cat([torch.nonzero(labels == c).reshape(-1)[:k] for c in range(10)]).sort().values
        assert torch.equal(getattr(demo, split).images, getattr(full, split).images[idx])
        assert torch.equal(getattr(demo, split).labels, labels[idx])


# ---------------------------------------------------------------- splits, fingerprints, stats

def test_stratified_split():
    labels = torch.tensor([0] * 10 + [1] * 7 + [2] * 3 + [3] * 1 + [4] * 2)
    labels = labels[torch.randperm(23, generator=torch.Generator().manual_seed(5))]
    keep, held = stratified_split(labels, 0.3, seed=0)
    assert keep.dtype == held.dtype == torch.int64
    assert torch.equal(keep, keep.sort().values) and torch.equal(held, held.sort().values)
    assert torch.equal(torch.cat([keep, held]).sort().values, torch.arange(23))  # disjoint and covering
    assert labels[held].bincount(minlength=5).tolist() == [3, 2, 1, 0, 1]  # round(0.3 n), >= 1 if n >= 2
    again = stratified_split(labels, 0.3, seed=0)
    assert torch.equal(again[0], keep) and torch.equal(again[1], held)
    big = torch.arange(1000) % 10
    assert not torch.equal(stratified_split(big, 0.1, 0)[1], stratified_split(big, 0.1, 1)[1])
    assert len(stratified_split(big, 0.0, 0)[1]) == 0
    with pytest.raises(UserError, match="out of range"):
        stratified_split(big, 1.0, 0)


def test_fingerprint_and_channel_stats():
    a, b = load_dataset("demo"), load_dataset("demo")
    assert a.fingerprint() == b.fingerprint() and len(a.fingerprint()) == 64
    assert a.fingerprint("train") != a.fingerprint("test")
    images = a.train.images.clone()
    images[123, 0, 4, 5] ^= 1
    changed = Dataset("x", a.classes, 1, (28, 28), Split(images, a.train.labels), a.test)
    assert changed.fingerprint() != a.fingerprint()
    assert Dataset("x", a.classes, 1, (28, 28), a.train, a.test).fingerprint() == a.fingerprint()
    mean, std = a.channel_stats()
    x = a.train.images.double() / 255
    assert mean == pytest.approx([x.mean().item()], abs=1e-9)
    assert std == pytest.approx([x.std(unbiased=False).item()], abs=1e-9)
