"""Datasets: a :class:`Split` is images and labels, a :class:`Dataset` two lazy splits
(or a test split alone: a held-out folder to score, :attr:`Dataset.has_train`).

Every source decodes to uint8 ``N x C x H x W`` images and int64 labels. A sample's index
is its row position, fixed by the source's documented order, so artifacts computed per
sample (teacher logits, IG maps) can be keyed by index and checked by :meth:`fingerprint`.

Where the images are: ``Split.images`` is always a contiguous uint8 torch tensor, either
in memory or, for an image folder larger than the memory budget (:func:`memory_budget`),
a view over the memory-mapped decoded-image cache (:mod:`igkd.data.image_cache`), made by
``torch.from_numpy`` of a copy-on-write ``np.memmap``: nothing is read until a row is
indexed, and the pages read are file-backed page cache that the kernel can drop, not the
process's own memory. ``Split.mapped`` names the file in that case (None in memory).
Code that indexes rows (``images[idx]``, ``images[i:j]``) works unchanged on both and
copies only those rows; code that needs every pixel goes through the images in row
blocks (:meth:`Dataset.channel_stats`, :func:`content_digest`) so no whole-split copy is
made; :class:`RowView` scores chosen rows without copying them. :meth:`Split.subset`
copies its rows into memory.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from .. import runtime
from ..errors import UserError


@dataclass
class Split:
    """One split: ``images`` uint8 N x C x H x W (contiguous), ``labels`` int64 N.

    ``mapped``: the cache file ``images`` is a memory map of (see the module docstring),
    None when the images are in memory. ``digest``: the split's :func:`content_digest`
    when it is already known (checked against the cache it was read from), so that
    :meth:`Dataset.fingerprint` need not read every pixel again; None otherwise."""

    images: torch.Tensor
    labels: torch.Tensor
    mapped: Optional[Path] = None
    digest: Optional[str] = None

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 N x C x H x W, got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dim() != 1 or len(self.labels) != len(self.images):
            raise ValueError(f"labels must be 1-D with {len(self.images)} entries, got {tuple(self.labels.shape)}")
        self.images = self.images.contiguous()
        self.labels = self.labels.to(torch.int64).contiguous()

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def nbytes(self) -> int:
        """Decoded size of the images in bytes (on disk when mapped)."""
        return self.images.numel()

    def subset(self, idx: torch.Tensor) -> "Split":
        """The rows ``idx`` (e.g. from :func:`stratified_split`), in that order, copied into memory."""
        return Split(self.images[idx], self.labels[idx])


class RowView:
    """``images[indices]`` without the copy: slicing it (as :func:`igkd.evaluate.predict`
    does, batch by batch) gathers only that slice's rows; indexing it with a tensor gives a
    narrower view. For scoring a chosen part of a split that may be memory-mapped."""

    def __init__(self, images: torch.Tensor, indices: torch.Tensor):
        self.images, self.indices = images, torch.as_tensor(indices).cpu()

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key) -> "torch.Tensor | RowView":
        if isinstance(key, slice):
            return self.images[self.indices[key]]
        return RowView(self.images, self.indices[torch.as_tensor(key).cpu()])


# images per block when a whole split is read (digest, statistics): bounded memory on mapped splits
BLOCK_BYTES = 64 << 20


def _row_blocks(images: torch.Tensor):
    step = max(1, BLOCK_BYTES // max(1, images[0].numel() if len(images) else 1))
    for i in range(0, len(images), step):
        yield images[i:i + step]


def digest_prefix(shape: tuple[int, ...]) -> bytes:
    """What :func:`content_digest` hashes before the pixels: both shapes (images ``shape``, labels N)."""
    return f"{tuple(int(d) for d in shape)}|{(int(shape[0]),)}|".encode()


def content_digest(images: torch.Tensor, labels: torch.Tensor) -> str:
    """sha256 (hex) over the shapes, the image bytes (row-major) and the int64 label bytes.

    Read in row blocks, so a memory-mapped split is never copied whole. The decoded-image
    cache stores the same digest of its contents (:mod:`igkd.data.image_cache`)."""
    h = hashlib.sha256(digest_prefix(tuple(images.shape)))
    for block in _row_blocks(images):
        h.update(block.contiguous().numpy().reshape(-1).data)
    h.update(labels.to(torch.int64).contiguous().numpy().reshape(-1).data)
    return h.hexdigest()


SplitSource = Union[Split, Callable[[], Split]]


class Dataset:
    """Class names, image geometry and two splits loaded on first access.

    ``train`` and ``test`` may be given as :class:`Split` objects or as zero-argument
    callables that decode them; a callable runs once, on first access of its split.

    ``train=None``: a dataset of a test split alone (an image folder of ``test/<class>/``
    only), which can be scored but not trained on. ``no_train`` is then the one-line
    error for anything that reads the train split (what the source lacks and what to add);
    training entry points call :meth:`require_train` before they write or load anything.
    """

    def __init__(self, spec: str, classes: list[str], channels: int, image_size: tuple[int, int],
                 train: Optional[SplitSource], test: SplitSource, no_train: str = ""):
        self.spec = str(spec)
        self.classes = list(classes)
        self.channels = int(channels)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self._sources = {"train": train, "test": test}
        self.no_train = no_train or f"dataset {self.spec} has no train split, only a test split to score"
        self._splits: dict[str, Split] = {}
        self._fingerprints: dict[str, str] = {}
        self._stats: tuple[list[float], list[float]] | None = None
        # how the API records it when given as data= (igkd.data.memory): as the spec string
        # load_dataset loaded it from, or (memory) as its spec, its content digest
        self.loaded_from: Optional[str] = None
        self.memory = False

    def __repr__(self) -> str:
        h, w = self.image_size
        alone = "" if self.has_train else ", test split only"
        return f"Dataset('{self.spec}', {len(self.classes)} classes, {self.channels}x{h}x{w}{alone})"

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def has_train(self) -> bool:
        """Whether there is a train split (cheap: nothing is decoded)."""
        return self._sources["train"] is not None

    def require_train(self, use: str = "") -> None:
        """A one-line UserError (:attr:`no_train`, after ``use``: what needs the train split)
        when there is no train split; nothing otherwise."""
        if not self.has_train:
            raise UserError(f"{use}: {self.no_train}" if use else self.no_train)

    @property
    def train(self) -> Split:
        return self._split("train")

    @property
    def test(self) -> Split:
        return self._split("test")

    def _split(self, name: str) -> Split:
        if name not in self._sources:
            raise ValueError(f"unknown split {name!r}; use 'train' or 'test'")
        if name == "train":
            self.require_train()  # fingerprint("train") too
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
        """sha256 (hex) over the split's shapes, image bytes and label bytes (:func:`content_digest`)."""
        if split not in self._fingerprints:
            s = self._split(split)
            self._fingerprints[split] = s.digest or content_digest(s.images, s.labels)
        return self._fingerprints[split]

    def channel_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and (population) std of the train images, in [0, 1] units.

        Exact: computed from per-channel 256-bin histograms, so no float image copy."""
        if self._stats is None:
            self.require_train("normalising by the dataset (normalize: dataset; the others are none and imagenet) "
                               "takes the mean and std of its train images")
            images = self.train.images
            values = torch.arange(256, dtype=torch.float64)
            # in row blocks: images[:, c].reshape(-1) would copy a third of the split (all of a mapped one's pages)
            hists = torch.zeros(images.shape[1], 256, dtype=torch.int64)
            for block in _row_blocks(images):
                for c in range(images.shape[1]):
                    hists[c] += torch.bincount(block[:, c].reshape(-1), minlength=256)
            means, stds = [], []
            for c in range(images.shape[1]):
                hist = hists[c].to(torch.float64)
                n = hist.sum().clamp(min=1)
                mean = (hist * values).sum() / n
                var = (hist * (values - mean) ** 2).sum() / n
                means.append(float(mean / 255))
                stds.append(float(var.sqrt() / 255))
            self._stats = (means, stds)
        return self._stats


def expand_user(path: str) -> Path:
    """``path`` with a leading ``~`` or ``~user`` expanded where there is such a home, else as
    written: ``Path.expanduser`` raised RuntimeError (a traceback) for a folder named ``~x`` or
    ``~`` without a home (HOME unset, no passwd entry), as ``os.path.expanduser`` does not."""
    return Path(os.path.expanduser(path))


def existing_dir(path: str | None, spec, hint: str) -> Path:
    """``path`` as a resolved directory, or a one-line UserError (``hint`` says what goes there)."""
    if not path:
        raise UserError(f"dataset spec '{spec}' needs a directory, e.g. '{spec.kind}:DIR'; {hint}")
    p = expand_user(path)
    if not p.is_dir():
        raise UserError(f"dataset directory {p} does not exist; {hint}")
    return p.resolve()


def cache_dir() -> Path:
    """Where decoded datasets are cached: ``$IGKD_CACHE_DIR/datasets`` (default
    ``~/.cache/igkd/datasets``), beside igkd's other caches."""
    return runtime.cache_dir("datasets")


def available_memory() -> int:
    """Memory this process can still have: Linux's MemAvailable, else physical memory, and
    never more than its cgroup's limit leaves (:func:`cgroup_memory_available`)."""
    have = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    have = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if have is None:
        try:
            have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):  # not POSIX: no check
            have = 1 << 62
    limited = cgroup_memory_available()
    return have if limited is None else min(have, limited)


_UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a page-rounded 2**63 - 1


def cgroup_memory_available(proc: str | Path = "/proc/self/cgroup", root: str | Path = "/sys/fs/cgroup") -> int | None:
    """What the memory limits of this process's cgroups leave: min over the limited levels of
    limit - usage + inactive file cache (reclaimable, as ``docker stats`` counts it); None
    without a limit or off Linux. MemAvailable inside a container (Docker, Kubernetes) is the
    host's: a split loaded into memory by it alone can get the process killed at its limit.

    Both hierarchies: v2 (``0::PATH``: ``memory.max``, ``memory.current``, ``inactive_file``)
    and v1 (``N:memory:PATH``: ``memory.limit_in_bytes``, ``memory.usage_in_bytes``,
    ``total_inactive_file``). A container usually mounts its own cgroup as the root of
    ``/sys/fs/cgroup`` while PATH names it from the host's root, so every existing folder
    from ``root/PATH`` up to ``root`` is read."""
    try:
        lines = Path(proc).read_text().splitlines()
    except OSError:
        return None
    root = Path(root)
    best = None
    for line in lines:
        hid, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hid == "0" and controllers == "":
            bases = [(root, "memory.max", "memory.current", "inactive_file")]
            if (root / "unified").is_dir():  # hybrid layout: v2 under unified/
                bases.append((root / "unified", "memory.max", "memory.current", "inactive_file"))
        elif "memory" in controllers.split(","):
            bases = [(root / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")]
        else:
            continue
        for base, limit_file, usage_file, inactive_key in bases:
            folder = base / path.lstrip("/")
            levels = [folder, *folder.parents] if folder.is_relative_to(base) else [base]
            for level in dict.fromkeys(p for p in levels if p.is_relative_to(base)):
                left = _cgroup_left(level, limit_file, usage_file, inactive_key)
                if left is not None:
                    best = left if best is None else min(best, left)
    return best


def _cgroup_left(folder: Path, limit_file: str, usage_file: str, inactive_key: str) -> int | None:
    try:
        raw = (folder / limit_file).read_text().strip()
        if raw == "max" or int(raw) >= _UNLIMITED:
            return None
        limit, usage = int(raw), int((folder / usage_file).read_text().strip())
    except (OSError, ValueError):
        return None
    inactive = 0
    try:
        for stat in (folder / "memory.stat").read_text().splitlines():
            key, _, value = stat.partition(" ")
            if key == inactive_key:
                inactive = int(value)
                break
    except (OSError, ValueError):
        pass
    return max(0, limit - usage + inactive)


MEMORY_ENV = "IGKD_DATA_MEMORY"
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bytes(text: str) -> int:
    """``"1500"``, ``"64k"``, ``"512M"``, ``"2G"``, ``"1.5g"`` (binary units) as bytes; ValueError otherwise."""
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = t[-1:] if t[-1:] in _UNITS and t[-1:] else ""
    value = float(t[:len(t) - len(unit)])
    if not value >= 0 or value == float("inf"):
        raise ValueError(text)
    return int(value * _UNITS[unit])


def memory_budget() -> int:
    """Bytes of decoded images one split may hold in memory before it is memory-mapped instead.

    ``$IGKD_DATA_MEMORY`` (e.g. ``8G``) when set, else half of :func:`available_memory`
    at the time of the call (the other half is left to the model, maps and logits)."""
    raw = os.environ.get(MEMORY_ENV)
    if raw is None or not raw.strip():
        return available_memory() // 2
    try:
        return parse_bytes(raw)
    except ValueError:
        raise UserError(f"{MEMORY_ENV}={raw!r} is not a size; use bytes or a number with K, M, G or T, "
                        f"e.g. {MEMORY_ENV}=8G") from None


def flag(value: str) -> bool:
    """A 0/1 (or yes/no, true/false) option value; ``take_option(..., flag, ...)``."""
    v = value.strip().lower()
    if v in ("1", "yes", "true", "on"):
        return True
    if v in ("0", "no", "false", "off"):
        return False
    raise ValueError(value)
