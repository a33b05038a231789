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
Download, md5 and extraction are shared with CIFAR-100 (:mod:`igkd.data.cifar_archive`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..spec import Spec, reject_leftovers, take_option
from .base import Dataset, Split, flag
from .cifar_archive import Release, class_names, ensure_release, label_array, release_dir, unpickle

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
RELEASE = Release("CIFAR-10", CIFAR10_URL, CIFAR10_MD5, ARCHIVE, FOLDER, "batches.meta", FILE_MD5)


def ensure_cifar10(root: Path, download: bool = True, url: str = CIFAR10_URL, md5: str | None = CIFAR10_MD5,
                   quiet: bool = False) -> Path:
    """Return ``root/cifar-10-batches-py``, extracting or downloading the archive if needed.

    ``md5`` (None: do not check) is required of the archive whether downloaded or found."""
    return ensure_release(RELEASE, root, download=download, url=url, md5=md5, quiet=quiet)


def _read_batches(folder: Path, names: list[str], verify: bool) -> Split:
    images, labels = [], []
    for name in names:
        d = unpickle(RELEASE, folder / name, verify)
        data = d.get(b"data")
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or not isinstance(d.get(b"labels"), list):
            raise UserError(f"{folder / name} is not a valid CIFAR-10 batch (no uint8 'data' array and 'labels' "
                            f"list); re-extract {ARCHIVE}")
        if data.ndim != 2 or data.shape[1] != 3072 or len(d.get(b"labels", [])) != len(data):
            raise UserError(f"{folder / name} is not a valid CIFAR-10 batch (data {data.shape}); "
                            f"re-extract {ARCHIVE}")
        labels.append(label_array(RELEASE, d[b"labels"], 10, folder / name))
        images.append(data.reshape(-1, 3, 32, 32))
    return Split(torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)))


def load_cifar10(spec: Spec) -> Dataset:
    opts = dict(spec.options)
    download = take_option(spec, opts, "download", flag, True, "dataset spec")
    verify = take_option(spec, opts, "verify", flag, True, "dataset spec")
    reject_leftovers(spec, opts, ["download", "verify"], "dataset spec")
    folder = release_dir(RELEASE, spec, download, CIFAR10_MD5 if verify else None)
    classes = class_names(RELEASE, unpickle(RELEASE, folder / "batches.meta", verify), b"label_names",
                          folder / "batches.meta", 10)
    return Dataset(str(spec), classes, 3, (32, 32),
                   train=lambda: _read_batches(folder, TRAIN_FILES, verify),
                   test=lambda: _read_batches(folder, TEST_FILES, verify))
