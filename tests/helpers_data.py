"""Test data helpers other test files may reuse.

``cifar10_jpg_dir()`` unpacks ``shared/data/cifar10-jpg.tar.gz`` (the folder ``shared``
beside the repository root) once into /tmp/igkd-test-data/cifar10-jpg and returns that
folder (``train/<class>/*.jpg``, ``test/<class>/*.jpg``), or None when the archive is absent.
"""

from __future__ import annotations

import shutil
import tarfile
import tempfile
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CIFAR10_JPG_ARCHIVE = SHARED / "data" / "cifar10-jpg.tar.gz"
UNPACKED = Path("/tmp/igkd-test-data/cifar10-jpg")


def cifar10_jpg_dir() -> Path | None:
    if (UNPACKED / "train").is_dir() and (UNPACKED / "test").is_dir():
        return UNPACKED
    if not CIFAR10_JPG_ARCHIVE.is_file():
        return None
    UNPACKED.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".cifar10-jpg.", dir=UNPACKED.parent))
    try:
        with tarfile.open(CIFAR10_JPG_ARCHIVE) as tar:
            extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(tmp, **extra)
        try:
            tmp.rename(UNPACKED)  # atomic: a folder under the final name is complete
        except OSError:
            if not (UNPACKED / "train").is_dir():  # not a concurrent unpacker winning the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return UNPACKED


def write_image_folder(root: Path, per_class: int, side: int, classes=("cat", "dog")) -> Path:
    """``root/{train,test}/<class>/<i>.png``: ``per_class`` random RGB PNGs of ``side`` x ``side``
    pixels per class and split (seeded), a real image folder for the CLI's tests."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root
