"""``cifar10:DIR[,download=0][,verify=0]``: the official CIFAR-10 python-pickle release.

Expects ``DIR/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``: pickles
(``encoding="bytes"``) with ``b"data"`` (N x 3072 uint8, channel-major: 1024 red, 1024
green, 1024 blue, rows top to bottom) and ``b"labels"``; class names are ``b"label_names"``
in ``batches.meta``. If that folder is missing but ``DIR/cifar-10-python.tar.gz`` is there,
it is extracted; if neither is, the archive is downloaded into DIR (md5-checked) unless
``download=0``. Sample order: the batch files in order, rows in file order.

Nothing in DIR runs code: the pickles are read by a restricted unpickler that allows data
only (:mod:`igkd.data.safe_pickle`), and, unless ``verify=0``, every archive (downloaded or
found in DIR) and every extracted file must have the official release's md5, so a
tampered or damaged copy is refused with one line before it is read. ``verify=0`` is for
a re-packed copy (other bytes, same layout); its files are still read as data only.
"""

from __future__ import annotations

import hashlib
import http.client
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..fileio import file_digest
from ..spec import Spec, reject_leftovers, take_option
from .base import Dataset, Split, existing_dir, flag
from .safe_pickle import load_data_pickle

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE = "cifar-10-python.tar.gz"
FOLDER = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILES = ["test_batch"]
# md5 of each file of the official release (published with the archive; torchvision checks the same)
FILE_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}
VERIFY_HINT = "or add ',verify=0' to the dataset spec for a re-packed copy (read as data only, never run)"


def ensure_cifar10(root: Path, download: bool = True, url: str = CIFAR10_URL, md5: str | None = CIFAR10_MD5,
                   quiet: bool = False) -> Path:
    """Return ``root/cifar-10-batches-py``, extracting or downloading the archive if needed.

    ``md5`` (None: do not check) is required of the archive whether downloaded or found."""
    root = Path(root)
    folder = root / FOLDER
    if (folder / "batches.meta").is_file():
        return folder
    archive = root / ARCHIVE
    if not archive.is_file():
        if not download:
            raise UserError(f"{root} holds neither {FOLDER}/ nor {ARCHIVE}; place the archive there "
                            f"(from {url}) or drop download=0 to download it")
        _download(url, archive, md5, quiet)
    elif md5 is not None and (have := file_md5(archive)) != md5:
        raise UserError(f"{archive} has md5 {have}, not the official {md5} (damaged or altered); replace it with "
                        f"the official {ARCHIVE}, {VERIFY_HINT}")
    _safe_extract(archive, root)
    if not (folder / "batches.meta").is_file():
        raise UserError(f"{folder / 'batches.meta'} is missing after extracting {archive}; delete {folder} "
                        f"if it is there, or replace the archive with the official {ARCHIVE}")
    return folder


def _download(url: str, dest: Path, md5: str, quiet: bool) -> None:
    """Stream ``url`` into a temporary file beside ``dest``, check its md5, rename it."""
    tmp = Path(tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)[1])
    digest = hashlib.md5()
    try:
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
                total = int(response.headers.get("Content-Length") or 0)
                done, last = 0, 0.0
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    if not quiet and (time.monotonic() - last > 0.5 or done == total):
                        last = time.monotonic()
                        of = f" of {total / 1e6:.1f} MB ({100 * done // total}%)" if total else " MB"
                        print(f"\rdownloading {url}: {done / 1e6:.1f}{of}", end="", file=sys.stderr, flush=True)
            if not quiet:
                print(file=sys.stderr)
        except (OSError, http.client.HTTPException) as e:  # URLError, HTTPError, timeouts are OSErrors
            reason = getattr(e, "reason", None) or e
            raise UserError(f"could not download {url} ({reason}); download {ARCHIVE} yourself and "
                            f"place it in {dest.parent}, or check the network") from None
        if md5 is not None and digest.hexdigest() != md5:
            raise UserError(f"downloaded {url} has md5 {digest.hexdigest()}, expected {md5} (corrupt or "
                            f"changed); try again, or place the official {ARCHIVE} in {dest.parent} yourself")
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)


def _safe_extract(archive: Path, root: Path) -> None:
    """Extract plain files and folders only, refusing absolute paths and ``..``; the
    folder appears under its final name only once complete."""
    tmp = Path(tempfile.mkdtemp(prefix=".extract.", dir=root))
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                members = tar.getmembers()
                for m in members:
                    parts = Path(m.name).parts
                    if m.name.startswith(("/", "\\")) or ".." in parts or not (m.isfile() or m.isdir()):
                        raise UserError(f"{archive} contains an unsafe entry '{m.name}'; "
                                        f"replace it with the official {ARCHIVE}")
                extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(tmp, members=members, **extra)
        except (tarfile.TarError, EOFError, OSError) as e:
            raise UserError(f"cannot extract {archive} ({e}); delete it and try again, or replace it "
                            f"with the official {ARCHIVE}") from None
        if (tmp / FOLDER).is_dir() and not (root / FOLDER).exists():
            (tmp / FOLDER).rename(root / FOLDER)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def file_md5(path: Path) -> str:
    return file_digest(path, "md5")


def _unpickle(path: Path, verify: bool) -> dict:
    fix = f"re-extract the official {ARCHIVE} (delete {path.parent} first)"
    if verify and path.is_file() and path.name in FILE_MD5 and (have := file_md5(path)) != FILE_MD5[path.name]:
        raise UserError(f"{path} has md5 {have}, not the official release's {FILE_MD5[path.name]} (damaged or "
                        f"altered); {fix}, {VERIFY_HINT}")
    d = load_data_pickle(path, "CIFAR-10 batch", fix)
    if not isinstance(d, dict):
        raise UserError(f"{path} is not a valid CIFAR-10 batch (a {type(d).__name__}, not a dict); {fix}")
    return d


def _read_batches(folder: Path, names: list[str], verify: bool) -> Split:
    images, labels = [], []
    for name in names:
        d = _unpickle(folder / name, verify)
        data = d.get(b"data")
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or not isinstance(d.get(b"labels"), list):
            raise UserError(f"{folder / name} is not a valid CIFAR-10 batch (no uint8 'data' array and 'labels' "
                            f"list); re-extract {ARCHIVE}")
        if data.ndim != 2 or data.shape[1] != 3072 or len(d.get(b"labels", [])) != len(data):
            raise UserError(f"{folder / name} is not a valid CIFAR-10 batch (data {data.shape}); "
                            f"re-extract {ARCHIVE}")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(np.asarray(d[b"labels"], dtype=np.int64))
    return Split(torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)))


def load_cifar10(spec: Spec) -> Dataset:
    opts = dict(spec.options)
    download = take_option(spec, opts, "download", flag, True, "dataset spec")
    verify = take_option(spec, opts, "verify", flag, True, "dataset spec")
    reject_leftovers(spec, opts, ["download", "verify"], "dataset spec")
    root = existing_dir(spec.arg, spec, "create it (CIFAR-10 is downloaded into it) or fix the path")
    folder = ensure_cifar10(root, download=download, md5=CIFAR10_MD5 if verify else None)
    meta = _unpickle(folder / "batches.meta", verify)
    names = meta.get(b"label_names")
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names] if isinstance(names, list) else []
    if len(classes) != 10:
        raise UserError(f"{folder / 'batches.meta'} lists {len(classes)} class names, expected 10; "
                        f"re-extract {ARCHIVE}")
    return Dataset(str(spec), classes, 3, (32, 32),
                   train=lambda: _read_batches(folder, TRAIN_FILES, verify),
                   test=lambda: _read_batches(folder, TEST_FILES, verify))
