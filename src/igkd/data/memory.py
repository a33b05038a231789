"""Data a notebook already holds, for the Python API: ``from_tensors`` and ``memory:`` specs.

``igkd.train``, ``distill``, ``precompute`` and ``evaluate`` take ``data=`` an
:class:`~igkd.data.Dataset` besides a spec string. Such data has no spec that loads it
again, so a run records it as ``memory:sha256=HEX``: the content digest of its classes and
both splits (:func:`memory_spec`). That spec says where the data was and which data it was,
and loads nothing: :func:`~igkd.data.load_dataset` refuses it (:func:`load_memory`) in one
line naming what to pass instead. Resuming a run compares the recorded spec, so only the
same images, labels and classes resume it; a store of teacher outputs is checked by the
train split's fingerprint as for any other data.

A dataset :func:`~igkd.data.load_dataset` returned keeps its spec string
(``Dataset.loaded_from``): given as ``data=``, it is recorded as that spec, as if it had
been given as ``cfg.data``.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..spec import Spec
from .base import BLOCK_BYTES, MEMORY_ENV, Dataset, Split, content_digest, memory_budget
from .image_cache import human_bytes

KIND = "memory"


def _tensor(value, what: str) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        if any(stride < 0 for stride in value.strides):  # a reversed view (x[::-1]): torch.from_numpy refuses it
            value = np.ascontiguousarray(value)
        try:
            with warnings.catch_warnings():  # a read-only array (np.load(mmap_mode="r")): it is only read
                warnings.filterwarnings("ignore", "The given NumPy array is not writable")
                value = torch.from_numpy(value)
        except TypeError:
            raise UserError(f"{what} are a numpy array of {value.dtype}; pass numbers (uint8 or float pixels, "
                            "integer class indices)") from None
    if not isinstance(value, torch.Tensor):
        raise UserError(f"{what} must be a torch.Tensor (or numpy array), got {type(value).__name__}")
    return value.detach()


def _file_map(value) -> tuple[np.ndarray, Path] | None:
    """A copy-on-write map of the file under ``value``, a C-contiguous uint8 array that
    ``np.load(FILE, mmap_mode="r")`` (or ``np.memmap(..., mode="r")``) gave, or a slice of
    one; None for any other array. Used in place: a split larger than memory stays on disk
    (README "Memory model"), and a stray in-place write copies a page, never into the file."""
    if not isinstance(value, np.memmap) or value.dtype != np.uint8 or value.mode != "r" \
            or not value.flags.c_contiguous or not value.filename:
        return None
    root = value
    while isinstance(root.base, np.ndarray):  # a slice's .offset is its parent's: measure from the root map
        root = root.base
    if not isinstance(root, np.memmap) or not isinstance(root.base, mmap.mmap):
        return None
    offset = root.offset + (value.ctypes.data - root.ctypes.data)
    try:
        mapped = np.memmap(value.filename, dtype=np.uint8, mode="c", offset=offset, shape=value.shape)
    except (OSError, ValueError):  # the file is gone or shorter now: copied instead, as any array
        return None
    return mapped, Path(value.filename)


def _images(value, what: str) -> tuple[torch.Tensor, Path | None]:
    """``(images, mapped file)``: uint8 N x C x H x W, contiguous, on the CPU. One copy of
    ``value`` (the caller's tensor may change later, and the digest recorded must stay true),
    float pixels converted in row blocks (no float copy of the whole split), and refused
    above the memory budget; a read-only uint8 ``np.memmap`` is mapped, not copied."""
    x = _tensor(value, what)  # an array's view, not a copy
    if x.dim() != 4:
        raise UserError(f"{what} must be 4-D N x C x H x W, got shape {tuple(x.shape)}"
                        + ("; add the channel dimension with images.unsqueeze(1)" if x.dim() == 3 else ""))
    if x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        raise UserError(f"{what} of shape {tuple(x.shape)} look channels-last (N x H x W x C); pass "
                        "images.permute(0, 3, 1, 2) (N x C x H x W)")
    if not len(x):
        raise UserError(f"{what} are empty (0 of shape {tuple(x.shape[1:])}); give at least one image")
    if not x.numel():
        raise UserError(f"{what} of shape {tuple(x.shape)} have no pixels; give images of at least 1 x 1 pixel")
    if x.dtype != torch.uint8 and not x.is_floating_point():
        raise UserError(f"{what} are {x.dtype}; pass uint8 pixels (0..255) or float pixels in [0, 1]")
    mapped = _file_map(value)
    if mapped is not None:
        return torch.from_numpy(mapped[0]), mapped[1]
    budget = memory_budget()
    if x.numel() > budget:  # the copy would take what the training needs, or get the process killed
        raise UserError(f"{what} take {human_bytes(x.numel())} as uint8, more than the memory budget of "
                        f"{human_bytes(budget)} (${MEMORY_ENV}, default half the available memory); save them "
                        "as a uint8 .npy file and pass np.load(FILE, mmap_mode='r') (mapped, not copied), "
                        f"or raise ${MEMORY_ENV}")
    if x.dtype == torch.uint8:
        return x.to(device="cpu", memory_format=torch.contiguous_format, copy=True), None
    out = torch.empty(x.shape, dtype=torch.uint8)
    step = max(1, BLOCK_BYTES // (4 * x[0].numel()))  # a float32 working copy of one block at a time
    for i in range(0, len(x), step):
        block = x[i:i + step]
        lo, hi = (float(v) for v in torch.aminmax(block))
        if not (0.0 <= lo and hi <= 1.0):  # NaN fails both
            lo, hi = (float(v) for v in torch.aminmax(x))
            raise UserError(f"{what} are float with values in [{lo:g}, {hi:g}]; float pixels must lie in [0, 1] "
                            "(divide uint8 pixels by 255, or pass them as uint8)")
        # exact for pixels that were uint8 / 255 (float32 at least: a bfloat16 255 * v is off by up to 0.5)
        out[i:i + step] = (block if block.element_size() >= 4 else block.float()).mul(255).round_()
    return out, None


def _labels(value, what: str, n: int, classes: int) -> torch.Tensor:
    y = _tensor(value, what)
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise UserError(f"{what} are {y.dtype}; pass integer class indices (e.g. labels.long())")
    if y.dim() != 1:
        raise UserError(f"{what} must be 1-D (one class index per image), got shape {tuple(y.shape)}")
    if len(y) != n:
        raise UserError(f"{what} hold {len(y)} entries for {n} images; give one label per image")
    y = y.to(device="cpu", dtype=torch.int64, copy=True)
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= classes:
        raise UserError(f"{what} run from {lo} to {hi}, outside 0..{classes - 1} ({classes} class names given); "
                        "pass one name per class or fix the labels")
    return y


def _pair(value, name: str) -> tuple:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise UserError(f"{name}= must be a pair (images, labels), got {type(value).__name__}"
                        + (f" of {len(value)}" if isinstance(value, (tuple, list)) else ""))
    return value[0], value[1]


def from_tensors(train, test, classes) -> Dataset:
    """A :class:`Dataset` of tensors a notebook holds, for ``data=`` of the API functions.

    ``train`` and ``test``: pairs ``(images, labels)``; images N x C x H x W, uint8 (0..255)
    or float in [0, 1] (stored as uint8: rounded to the nearest of 256 levels, exact for
    pixels that were uint8 / 255), labels integer class indices. ``train=None`` gives a
    dataset to score only (``evaluate``). ``classes``: the class names, index i naming
    label i. Each split is copied once to the CPU (refused above the memory budget), except a
    uint8 array ``np.load(FILE, mmap_mode="r")`` gave, which is mapped from its file; its
    ``spec`` is ``memory:sha256=HEX`` (:func:`memory_spec`). Bad input is a one-line UserError."""
    if isinstance(classes, np.ndarray) and classes.ndim == 1:  # np.unique(names), a pandas column's .values
        classes = classes.tolist()
    if isinstance(classes, str) or not isinstance(classes, (list, tuple)) or not classes \
            or not all(isinstance(c, str) and c for c in classes):
        shown = repr(classes)  # an array's repr runs over lines: the error stays one line
        shown = shown if len(shown) <= 120 and "\n" not in shown else f"a {type(classes).__name__}"
        raise UserError(f"classes must be a non-empty list of class names (strings), got {shown}")
    if len(set(classes)) != len(classes):
        dup = next(c for c in classes if list(classes).count(c) > 1)
        raise UserError(f"classes name {dup!r} twice; give each class its own name")
    splits = {}
    for name, pair in (("train", train), ("test", test)):
        if pair is None and name == "train":
            continue
        images, labels = _pair(pair, name)
        x, mapped = _images(images, f"{name} images")
        splits[name] = Split(x, _labels(labels, f"{name} labels", len(x), len(classes)), mapped=mapped)
    shapes = {name: tuple(s.images.shape[1:]) for name, s in splits.items()}
    if len(set(shapes.values())) > 1:
        raise UserError(f"train images are {'x'.join(map(str, shapes['train']))} but test images are "
                        f"{'x'.join(map(str, shapes['test']))} (C x H x W); give both splits the same shape")
    for split in splits.values():
        split.digest = content_digest(split.images, split.labels)
    c, h, w = shapes["test"]
    dataset = Dataset("memory", list(classes), c, (h, w), splits.get("train"), splits["test"],
                      no_train="this in-memory dataset has no train split (from_tensors(train=None, ...)); "
                      "pass train=(images, labels)")
    return _named(dataset)


def memory_spec(dataset: Dataset) -> str:
    """``memory:sha256=HEX``: sha256 over the class names and the fingerprints of both splits
    (shapes, pixels, labels), its first 16 bytes in hex. Reads every pixel once (cached)."""
    train = dataset.fingerprint("train") if dataset.has_train else None
    text = json.dumps({"classes": dataset.classes, "train": train, "test": dataset.fingerprint("test")})
    return str(Spec(KIND, None, {"sha256": hashlib.sha256(text.encode()).hexdigest()[:32]}))


def _named(dataset: Dataset) -> Dataset:
    dataset.spec = memory_spec(dataset)
    dataset.memory = True
    return dataset


def in_memory(dataset) -> tuple[Dataset, str]:
    """``(dataset, recorded spec)`` for ``data=`` given to an API function: a dataset
    :func:`~igkd.data.load_dataset` returned keeps the spec it was loaded from; any other is
    recorded by content (:func:`memory_spec`), as a dataset sharing its splits whose ``spec``
    says so (summaries, model metadata and store manifests then name it truly)."""
    if not isinstance(dataset, Dataset):
        raise UserError(f"data= takes an igkd.data.Dataset (igkd.data.from_tensors(train=(images, labels), "
                        f"test=(images, labels), classes=names), or igkd.load_dataset(SPEC)), or a spec string, "
                        f"got {type(dataset).__name__}")
    if getattr(dataset, "loaded_from", None):
        return dataset, dataset.loaded_from
    if getattr(dataset, "memory", False):
        return dataset, dataset.spec
    try:
        train = dataset.train if dataset.has_train else None
        test = dataset.test
    except ValueError as e:  # Dataset._check: a split of another shape, labels outside the classes
        raise UserError(str(e)) from None
    copy = Dataset("memory", dataset.classes, dataset.channels, dataset.image_size, train, test,
                   no_train=dataset.no_train)
    copy._fingerprints = dict(getattr(dataset, "_fingerprints", {}))
    return _named(copy), copy.spec


def given_data(data) -> tuple[Dataset, str]:
    """``(dataset, spec to record)`` for a ``data`` that is a spec string or a Dataset."""
    if isinstance(data, str):
        from . import load_dataset
        return load_dataset(data), data
    return in_memory(data)


def is_memory_spec(spec) -> bool:
    """Whether ``spec`` (a recorded dataset spec) is the record of data given in memory."""
    return isinstance(spec, str) and spec.partition(":")[0].strip() == KIND


def load_memory(spec: Spec) -> Dataset:
    """What ``load_dataset`` does with a ``memory:`` spec, the record of data given in memory:
    a one-line UserError saying what to pass instead (it is no source in ``DATASETS``)."""
    raise UserError(f"dataset {spec} was given to igkd's Python API in memory (data=) and cannot be loaded from "
                    "its spec; pass the same data again as data= (igkd.data.from_tensors(...)), or give a "
                    "dataset spec of data on disk (e.g. --data imagefolder:DIR)")


__all__ = ["KIND", "from_tensors", "given_data", "in_memory", "is_memory_spec", "load_memory", "memory_spec"]
