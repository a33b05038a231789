#!/usr/bin/env python
"""Write src/igkd/assets/demo.npz, the small dataset behind the ``demo`` spec.

From Fashion-MNIST's IDX files (default: Debian's dataset-fashion-mnist under
/usr/share/datasets/fashion-mnist) it keeps the first 200 images of each class of the
train set and the first 100 of each class of the test set, in their original order,
28x28 grayscale uint8. Usage: python scripts/make_demo_dataset.py [FASHION_MNIST_DIR]
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np

from igkd.data.fashion_mnist import CLASSES, DEFAULT_DIR, FILES, _find, read_idx
from igkd.fileio import atomic_path

OUT = Path(__file__).resolve().parents[1] / "src" / "igkd" / "assets" / "demo.npz"
PER_CLASS = {"train": 200, "test": 100}
LICENSE = ("Fashion-MNIST, Copyright (c) 2017 Zalando SE (https://github.com/zalandoresearch/fashion-mnist), "
           "MIT licence (Expat): Permission is hereby granted, free of charge, to any person obtaining a copy "
           "of this software and associated documentation files (the \"Software\"), to deal in the Software "
           "without restriction, including without limitation the rights to use, copy, modify, merge, publish, "
           "distribute, sublicense, and/or sell copies of the Software, and to permit persons to whom the "
           "Software is furnished to do so, subject to the following conditions: The above copyright notice "
           "and this permission notice shall be included in all copies or substantial portions of the "
           "Software. THE SOFTWARE IS PROVIDED \"AS IS\", WITHOUT WARRANTY OF ANY KIND.")
SOURCE = ("Subset of Fashion-MNIST as packaged by Debian (dataset-fashion-mnist, "
          "/usr/share/datasets/fashion-mnist): the first 200 images of each class of the train set and the "
          "first 100 of each class of the t10k test set, original order kept; made by "
          "scripts/make_demo_dataset.py")


def first_per_class(labels: np.ndarray, k: int) -> np.ndarray:
    """Indices (ascending) of the first ``k`` samples of each class."""
    keep = np.zeros(len(labels), dtype=bool)
    for c in range(len(CLASSES)):
        keep[np.flatnonzero(labels == c)[:k]] = True
    return np.flatnonzero(keep)


def main(root: str = DEFAULT_DIR) -> None:
    arrays = {}
    for split, (img_name, lab_name) in FILES.items():
        images = read_idx(_find(Path(root), img_name), 3)
        labels = read_idx(_find(Path(root), lab_name), 1)
        idx = first_per_class(labels, PER_CLASS[split])
        assert len(idx) == PER_CLASS[split] * len(CLASSES)
        arrays[f"{split}_images"] = images[idx]
        arrays[f"{split}_labels"] = labels[idx]
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays, classes=np.array(CLASSES), license=np.array(LICENSE),
                        source=np.array(SOURCE))
    with atomic_path(OUT) as tmp:
        tmp.write_bytes(buf.getvalue())
        tmp.chmod(0o644)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e6:.2f} MB): "
          + ", ".join(f"{k} {v.shape}" for k, v in arrays.items()))


if __name__ == "__main__":
    main(*sys.argv[1:2])
