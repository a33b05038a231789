"""In-memory datasets: a :class:`Split` is two tensors, a :class:`Dataset` two lazy splits.

Every source decodes to uint8 ``N x C x H x W`` images and int64 labels. A sample's index
is its row position, fixed by the source's documented order, so artifacts computed per
sample (teacher logits, IG maps) can be keyed by index and checked by :meth:`fingerprint`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

import torch

from .. import runtime
from ..errors import UserError


@dataclass
class Split:
    """One split: ``images`` uint8 N x C x H x W (contiguous), ``labels`` int64 N."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 N x C x H x W, got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dim() != 1 or len(self.labels) != len(self.images):
            raise ValueError(f"labels must be 1-D with {len(self.images)} entries, got {tuple(self.labels.shape)}")
        self.images = self.images.contiguous()
        self.labels = self.labels.to(torch.int64).contiguous()

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: torch.Tensor) -> "Split":
        """The rows ``idx`` (e.g. from :func:`stratified_split`), in that order."""
        return Split(self.images[idx], self.labels[idx])


SplitSource = Union[Split, Callable[[], Split]]


class Dataset:
    """Class names, image geometry and two splits loaded on first access.

    ``train`` and ``test`` may be given as :class:`Split` objects or as zero-argument
    callables that decode them; a callable runs once, on first access of its split.
    """

    def __init__(self, spec: str, classes: list[str], channels: int, image_size: tuple[int, int],
                 train: SplitSource, test: SplitSource):
        self.spec = str(spec)
        self.classes = list(classes)
        self.channels = int(channels)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self._sources = {"train": train, "test": test}
        self._splits: dict[str, Split] = {}
        self._fingerprints: dict[str, str] = {}
        self._stats: tuple[list[float], list[float]] | None = None

    def __repr__(self) -> str:
        h, w = self.image_size
        return f"Dataset('{self.spec}', {len(self.classes)} classes, {self.channels}x{h}x{w})"

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def train(self) -> Split:
        return self._split("train")

    @property
    def test(self) -> Split:
        return self._split("test")

    def _split(self, name: str) -> Split:
        if name not in self._sources:
            raise ValueError(f"unknown split {name!r}; use 'train' or 'test'")
        if name not in self._splits:
            source = self._sources[name]
            split = source if isinstance(source, Split) else source()
            self._check(name, split)
            self._splits[name] = split
        return self._splits[name]

    def _check(self, name: str, split: Split) -> None:
        want = (self.channels, *self.image_size)
        if tuple(split.images.shape[1:]) != want:
            raise ValueError(f"{self.spec} {name}: images are {tuple(split.images.shape[1:])}, expected {want}")
        if len(split) and not (0 <= int(split.labels.min()) and int(split.labels.max()) < len(self.classes)):
            raise ValueError(f"{self.spec} {name}: labels outside 0..{len(self.classes) - 1}")

    def fingerprint(self, split: str = "train") -> str:
        """sha256 (hex) over the split's shapes, image bytes and label bytes."""
        if split not in self._fingerprints:
            s = self._split(split)
            h = hashlib.sha256()
            h.update(f"{tuple(s.images.shape)}|{tuple(s.labels.shape)}|".encode())
            h.update(s.images.numpy().reshape(-1).data)
            h.update(s.labels.numpy().reshape(-1).data)
            self._fingerprints[split] = h.hexdigest()
        return self._fingerprints[split]

    def channel_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and (population) std of the train images, in [0, 1] units.

        Exact: computed from per-channel 256-bin histograms, so no float image copy."""
        if self._stats is None:
            images = self.train.images
            values = torch.arange(256, dtype=torch.float64)
            means, stds = [], []
            for c in range(images.shape[1]):
                hist = torch.bincount(images[:, c].reshape(-1), minlength=256).to(torch.float64)
                n = hist.sum().clamp(min=1)
                mean = (hist * values).sum() / n
                var = (hist * (values - mean) ** 2).sum() / n
                means.append(float(mean / 255))
                stds.append(float(var.sqrt() / 255))
            self._stats = (means, stds)
        return self._stats


def existing_dir(path: str | None, spec, hint: str) -> Path:
    """``path`` as a resolved directory, or a one-line UserError (``hint`` says what goes there)."""
    if not path:
        raise UserError(f"dataset spec '{spec}' needs a directory, e.g. '{spec.kind}:DIR'; {hint}")
    p = Path(path).expanduser()
    if not p.is_dir():
        raise UserError(f"dataset directory {p} does not exist; {hint}")
    return p.resolve()


def cache_dir() -> Path:
    """Where decoded datasets are cached: ``$IGKD_CACHE_DIR/datasets`` (default
    ``~/.cache/igkd/datasets``), beside igkd's other caches."""
    return runtime.cache_dir("datasets")


def flag(value: str) -> bool:
    """A 0/1 (or yes/no, true/false) option value; ``take_option(..., flag, ...)``."""
    v = value.strip().lower()
    if v in ("1", "yes", "true", "on"):
        return True
    if v in ("0", "no", "false", "off"):
        return False
    raise ValueError(value)
