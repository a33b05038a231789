"""``demo``: 3,000 Fashion-MNIST images shipped inside the package (no download, no DIR).

``igkd/assets/demo.npz`` (made by ``scripts/make_demo_dataset.py``) holds the first 200
images of each class of the Fashion-MNIST train set (2,000) and the first 100 of each
class of its test set (1,000), original order, 1 channel, 28x28; MIT licence (Zalando SE),
see ``igkd/assets/README.md`` and the npz's ``license`` and ``source`` fields.
"""

from __future__ import annotations

import io
from importlib import resources

import numpy as np
import torch

from ..errors import UserError
from ..spec import Spec, reject_leftovers
from .base import Dataset, Split


def _read_npz() -> dict[str, np.ndarray]:
    data = (resources.files("igkd") / "assets" / "demo.npz").read_bytes()
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def load_demo(spec: Spec) -> Dataset:
    opts = dict(spec.options)
    reject_leftovers(spec, opts, [], "dataset spec")
    if spec.arg:
        raise UserError(f"dataset spec '{spec}' takes no directory; the demo data ships with igkd, write 'demo'")
    z = _read_npz()

    def split(name: str) -> Split:
        return Split(torch.from_numpy(z[f"{name}_images"]).unsqueeze(1).contiguous(),
                     torch.from_numpy(z[f"{name}_labels"].astype(np.int64)))

    return Dataset(str(spec), [str(c) for c in z["classes"]], 1, (28, 28),
                   train=lambda: split("train"), test=lambda: split("test"))
