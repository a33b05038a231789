"""``fashion-mnist[:DIR]``: Fashion-MNIST in its IDX files (1 channel, 28x28, 10 classes).

DIR (default ``/usr/share/datasets/fashion-mnist``, where Debian's package
``dataset-fashion-mnist`` puts them) holds ``train-images-idx3-ubyte``,
``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``,
each optionally gzipped (``.gz``). Sample order is file order.
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..spec import Spec, reject_leftovers
from .base import Dataset, Split, available_memory, existing_dir
from .image_cache import human_bytes

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _find(root: Path, name: str) -> Path:
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise UserError(f"{root} has no {name}[.gz]; it needs the four Fashion-MNIST IDX files "
                    f"({', '.join(n for pair in FILES.values() for n in pair)})")


READ_BYTES = 16 << 20  # block size of reads: memory grows only with bytes really there


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes (magic 0x0000 08 ``ndim``) as a uint8 array."""
    header = 4 + 4 * ndim
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            head = f.read(header)
            magic = int.from_bytes(head[:4], "big") if len(head) >= 4 else -1
            if magic != 0x0800 + ndim:
                raise UserError(f"{path} is not an IDX file of {ndim}-D unsigned bytes (magic {magic:#010x}, "
                                f"expected {0x0800 + ndim:#010x}); replace the file")
            shape = tuple(int.from_bytes(head[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
            # math.prod of Python ints: numpy's int64 product wraps for a forged header (2**31 x 2**31 x 4
            # is 0), which then passed for an empty file and failed in reshape with a traceback
            want = math.prod(shape)
            # at most the header's size and one byte more, in blocks: the whole file was decompressed
            # before any check, so a small .gz of padding (a gzip bomb) took memory without bound
            limit, data = available_memory(), bytearray()
            while len(data) <= want and (block := f.read(min(READ_BYTES, want + 1 - len(data)))):
                data += block
                if len(data) > limit:
                    raise UserError(f"{path} holds more than the {human_bytes(limit)} of memory available (its "
                                    f"header says {shape}); replace the file, or free memory")
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"cannot read {path} ({e}); replace the file") from None
    if len(head) != header or len(data) != want:
        raise UserError(f"{path} is truncated or padded: header says {shape}, "
                        f"{len(data)}{'+' if len(data) > want else ''} data bytes follow; replace the file")
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


def _read_split(images_path: Path, labels_path: Path) -> Split:
    images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
    if images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise UserError(f"{images_path} holds {images.shape} images and {labels_path} {len(labels)} labels; "
                        f"expected N x 28 x 28 and N; replace the files")
    if labels.max(initial=0) >= len(CLASSES):
        raise UserError(f"{labels_path} has labels above {len(CLASSES) - 1}; replace the file")
    return Split(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))


def load_fashion_mnist(spec: Spec) -> Dataset:
    opts = dict(spec.options)
    reject_leftovers(spec, opts, [], "dataset spec")
    root = existing_dir(spec.arg or DEFAULT_DIR, spec,
                        "install it with 'apt-get install dataset-fashion-mnist' (as root) or give "
                        "a folder holding the IDX files as 'fashion-mnist:DIR'")
    paths = {k: (_find(root, a), _find(root, b)) for k, (a, b) in FILES.items()}
    return Dataset(str(spec), CLASSES, 1, (28, 28),
                   train=lambda: _read_split(*paths["train"]), test=lambda: _read_split(*paths["test"]))
