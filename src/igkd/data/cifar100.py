"""``cifar100:DIR[,labels=fine|coarse][,download=0][,verify=0]``: the official CIFAR-100 python release.

Expects ``DIR/cifar-100-python/{train, test, meta}``: pickles (``encoding="bytes"``) with
``b"data"`` (N x 3072 uint8, channel-major as CIFAR-10: 1024 red, 1024 green, 1024 blue,
rows top to bottom), ``b"fine_labels"`` (100 classes) and ``b"coarse_labels"`` (the 20
superclasses); ``meta`` holds ``b"fine_label_names"`` and ``b"coarse_label_names"``.
``labels=fine`` (the default, the KD literature's benchmark) or ``labels=coarse`` picks
which. 50,000 train and 10,000 test images, in file order.

Download (``cifar-100-python.tar.gz`` into DIR unless ``download=0``), md5 checks of the
archive and of every extracted file (off with ``verify=0`` for a re-packed copy) and the
data-only unpickler are CIFAR-10's (:mod:`igkd.data.cifar_archive`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..spec import Spec, reject_leftovers, take_option
from .base import Dataset, Split, flag
from .cifar_archive import Release, class_names, ensure_release, label_array, release_dir, unpickle

CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
ARCHIVE = "cifar-100-python.tar.gz"
FOLDER = "cifar-100-python"
# md5 of each file of the official release (as torchvision checks them)
FILE_MD5 = {
    "train": "16019d7e3df5f24257cddd939b257f8d",
    "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
    "meta": "7973b15100ade9c7d40fb424638fde48",
}
RELEASE = Release("CIFAR-100", CIFAR100_URL, CIFAR100_MD5, ARCHIVE, FOLDER, "meta", FILE_MD5)
LABELS = {"fine": 100, "coarse": 20}  # label kind -> number of classes


def ensure_cifar100(root: Path, download: bool = True, url: str = CIFAR100_URL, md5: str | None = CIFAR100_MD5,
                    quiet: bool = False) -> Path:
    """Return ``root/cifar-100-python``, extracting or downloading the archive if needed.

    ``md5`` (None: do not check) is required of the archive whether downloaded or found."""
    return ensure_release(RELEASE, root, download=download, url=url, md5=md5, quiet=quiet)


def _read(path: Path, kind: str, verify: bool) -> Split:
    d = unpickle(RELEASE, path, verify)
    data, labels = d.get(b"data"), d.get(f"{kind}_labels".encode())
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or not isinstance(labels, list):
        raise UserError(f"{path} is not a valid CIFAR-100 batch (no uint8 'data' array and '{kind}_labels' "
                        f"list); re-extract {ARCHIVE}")
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise UserError(f"{path} is not a valid CIFAR-100 batch (data {data.shape}, {len(labels)} labels); "
                        f"re-extract {ARCHIVE}")
    y = label_array(RELEASE, labels, LABELS[kind], path, f"{kind} ")
    return Split(torch.from_numpy(data.reshape(-1, 3, 32, 32)), torch.from_numpy(y))


def load_cifar100(spec: Spec) -> Dataset:
    opts = dict(spec.options)
    what = "dataset spec"
    kind = take_option(spec, opts, "labels", str, "fine", what)
    download = take_option(spec, opts, "download", flag, True, what)
    verify = take_option(spec, opts, "verify", flag, True, what)
    reject_leftovers(spec, opts, ["labels", "download", "verify"], what)
    if kind not in LABELS:
        raise UserError(f"labels={kind} in dataset spec '{spec}' is not valid; use labels=fine (100 classes) "
                        f"or labels=coarse (20 superclasses)")
    folder = release_dir(RELEASE, spec, download, CIFAR100_MD5 if verify else None)
    classes = class_names(RELEASE, unpickle(RELEASE, folder / "meta", verify), f"{kind}_label_names".encode(),
                          folder / "meta", LABELS[kind])
    return Dataset(str(spec), classes, 3, (32, 32),
                   train=lambda: _read(folder / "train", kind, verify),
                   test=lambda: _read(folder / "test", kind, verify))
