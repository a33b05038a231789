"""``imagefolder:DIR[,size=N|HxW][,gray=1][,test=F,seed=S][,cache=0]``: folders of images.

Two layouts:

* ``DIR/train/<class>/*`` and ``DIR/test/<class>/*`` (the same class folders in both);
* ``DIR/<class>/*`` with ``test=0.2``: a seeded stratified hold-out (``seed``, default 0)
  of each class becomes the test split.

Classes are the sorted subfolder names; files (.jpg .jpeg .png .bmp .gif .webp .tif
.tiff .ppm .pgm) are sorted by name within each class, so sample indices are stable.
Images are decoded with Pillow as RGB (``gray=1``: as L) and, with ``size``, resized
bilinearly; without it all images must share one size. 8-bit files (L, P, RGB, RGBA,
CMYK...) convert as Pillow does (alpha is dropped). Deeper files are scaled to 8 bits by
their format's range, never clipped: 16-bit integers (mode I;16*, or I with values in
0..65535) as round(v * 255 / 65535); floats (mode F) must lie in [0, 1] and become
round(v * 255). A float image outside [0, 1], or a mode igkd cannot decode faithfully, is
refused with one line naming the file. Decoded arrays are cached as
.npz under ``$IGKD_CACHE_DIR/datasets`` (default ``~/.cache/igkd/datasets``), keyed by the folder,
the options and every file's name, size and mtime; ``cache=0`` turns that off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import UserError
from ..fileio import atomic_path
from ..progress import Progress
from ..spec import Spec, reject_leftovers, take_option
from .base import Dataset, Split, cache_dir, existing_dir, flag
from .splits import stratified_split

log = logging.getLogger(__name__)
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
OPTIONS = ["size", "gray", "test", "seed", "cache"]
MAX_SIDE = 8192  # pixels; larger images are not classifier inputs
CACHE_VERSION = 2  # 2: 16-bit and float images scaled by their range (were clipped)


@dataclass
class _Part:
    """The files of one folder of class folders (``train/``, ``test/`` or DIR itself)."""

    folder: Path
    classes: list[str]
    files: list[str]        # relative to folder: "<class>/<name>"
    labels: np.ndarray      # int64, class index per file
    stats: list[tuple[int, int]]  # (size, mtime_ns) per file, for the cache key


def _scan(folder: Path) -> _Part:
    try:
        return _scan_entries(folder)
    except OSError as e:  # a symlink loop, a dangling link, an unreadable folder
        raise UserError(f"cannot read {e.filename or folder} ({e.strerror or e}); fix or remove it") from None


def _scan_entries(folder: Path) -> _Part:
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise UserError(f"{folder} has no class subfolders; put images in {folder}/<class>/")
    files, labels, stats = [], [], []
    for label, name in enumerate(classes):
        entries = sorted((e for e in os.scandir(folder / name) if e.is_file()
                          and not e.name.startswith(".") and Path(e.name).suffix.lower() in IMAGE_EXTS),
                         key=lambda e: e.name)
        if not entries:
            raise UserError(f"class folder {folder / name} holds no images ({' '.join(sorted(IMAGE_EXTS))})")
        for e in entries:
            st = e.stat()
            files.append(f"{name}/{e.name}")
            labels.append(label)
            stats.append((st.st_size, st.st_mtime_ns))
    return _Part(folder, classes, files, np.asarray(labels, dtype=np.int64), stats)


def _parse_size(spec: Spec, raw: str | None) -> tuple[int, int] | None:
    if raw is None:
        return None
    try:
        h, _, w = raw.lower().partition("x")
        size = (int(h), int(w or h))
    except ValueError:
        size = (0, 0)
    if min(size) < 1:
        raise UserError(f"size={raw} in dataset spec '{spec}' is not valid; use size=N or size=HxW (pixels)")
    if max(size) > MAX_SIDE:
        raise UserError(f"size={raw} in dataset spec '{spec}' is too large; use at most {MAX_SIDE} pixels a side")
    return size


def _peek_size(path: Path) -> tuple[int, int]:
    """(H, W) from the image header, without decoding the pixels."""
    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read image {path} ({e}); remove or replace the file") from None


# modes Pillow converts to L/RGB exactly (8 bits per channel, palettes, alpha dropped)
EIGHT_BIT_MODES = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}


def _to_mode(im: Image.Image, mode: str, path: Path) -> Image.Image:
    """``im`` as an 8-bit ``mode`` (L or RGB) image, scaling deep images by their range.

    Pillow's ``convert`` clips a 16-bit value to 255 (a 16-bit PNG came out 99.6% white)
    and truncates a float in [0, 1] to 0 (a float TIFF came out black)."""
    if im.mode == mode:
        return im
    if im.mode in EIGHT_BIT_MODES:
        return im.convert(mode)
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        a = np.asarray(im)
        if im.mode == "F":
            if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
                raise UserError(f"float image {path} has values outside [0, 1] (min {np.nanmin(a):.4g}, max "
                                f"{np.nanmax(a):.4g}); save it scaled to [0, 1] or as 8/16-bit integers")
            out = np.rint(a.astype(np.float64) * 255)
        else:
            if a.min() < 0 or a.max() > 65535:
                raise UserError(f"32-bit image {path} has values outside 0..65535; save it as 8- or 16-bit")
            out = np.rint(a.astype(np.float64) * (255 / 65535))
        gray = Image.fromarray(out.astype(np.uint8), "L")
        return gray if mode == "L" else gray.convert(mode)
    raise UserError(f"image {path} has pixel mode {im.mode}, which igkd cannot decode faithfully; "
                    "convert it to an 8-bit (or 16-bit gray) PNG or JPEG")


def _decode(part: _Part, mode: str, size: tuple[int, int], resize: bool, ref: Path) -> np.ndarray:
    """All images of ``part`` as uint8 N x H x W (x 3 for RGB), decoded by a thread pool;
    without ``resize`` each must be ``size`` (that of the image ``ref``)."""
    h, w = size
    n = len(part.files)
    shape = (n, h, w, 3) if mode == "RGB" else (n, h, w)
    need, have = math.prod(shape), _memory_bytes()
    if need > have:
        raise UserError(f"decoding {part.folder} at {w}x{h} needs {need / 2**30:.1f} GiB, more than the "
                        f"{have / 2**30:.1f} GiB of memory available; add ',size=N' with a smaller N to the spec")
    out = np.empty(shape, dtype=np.uint8)
    failed = threading.Event()

    def work(start: int, stop: int) -> None:
        for i in range(start, stop):
            if failed.is_set():
                return
            path = part.folder / part.files[i]
            try:
                with Image.open(path) as im:
                    im = _to_mode(im, mode, path)
                    if resize and im.size != (w, h):
                        im = im.resize((w, h), Image.BILINEAR)
                    arr = np.asarray(im)
            except UserError:
                failed.set()
                raise
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                failed.set()
                raise UserError(f"cannot read image {path} ({e}); remove or replace the file") from None
            if arr.shape[:2] != (h, w):
                failed.set()
                raise UserError(f"images differ in size ({path} is {arr.shape[1]}x{arr.shape[0]}, {ref} is "
                                f"{w}x{h}); add ',size=N' (or ',size=HxW') to the spec to resize them all")
            out[i] = arr

    chunk = 512
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool, \
            Progress(n, f"decoding {part.folder}", "img", quiet=n < 5000) as progress:
        futures = {pool.submit(work, s, min(s + chunk, n)): min(chunk, n - s) for s in range(0, n, chunk)}
        for f in as_completed(futures):
            f.result()
            progress.update(futures[f])
    return out


def _memory_bytes() -> int:
    """Memory this process can still have: Linux's MemAvailable, else physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not POSIX: no check
        return 1 << 62


def _cache_path(part: _Part, mode: str, size: tuple[int, int], resize: bool) -> Path:
    key = json.dumps([CACHE_VERSION, str(part.folder), mode, list(size), resize, part.classes,
                      part.files, part.stats])
    return cache_dir() / f"imagefolder-{hashlib.sha256(key.encode()).hexdigest()[:32]}.npz"


def _load(part: _Part, mode: str, size: tuple[int, int], resize: bool, ref: Path, use_cache: bool) -> Split:
    """Decode ``part`` (or read it from the cache) into a Split."""
    path = _cache_path(part, mode, size, resize) if use_cache else None
    if path is not None and path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                images, labels = z["images"], z["labels"]
            if len(images) == len(part.files) and np.array_equal(labels, part.labels):
                return Split(torch.from_numpy(images), torch.from_numpy(labels))
        except (OSError, ValueError, KeyError):
            pass  # unreadable or stale cache: decode again and overwrite it
        log.warning("ignoring unusable dataset cache %s", path)
    t0 = time.perf_counter()
    arr = torch.from_numpy(_decode(part, mode, size, resize, ref))
    images = arr.unsqueeze(1) if arr.dim() == 3 else arr.permute(0, 3, 1, 2).contiguous()
    log.info("decoded %d images from %s in %.1f s", len(images), part.folder, time.perf_counter() - t0)
    if path is not None:
        try:
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                np.savez(f, images=images.numpy(), labels=part.labels)
        except OSError as e:
            log.warning("could not write dataset cache %s (%s); set IGKD_CACHE_DIR or add cache=0", path, e)
    return Split(images, torch.from_numpy(part.labels.copy()))


def load_imagefolder(spec: Spec) -> Dataset:
    opts = dict(spec.options)
    what = "dataset spec"
    size = _parse_size(spec, take_option(spec, opts, "size", str, None, what))
    mode = "L" if take_option(spec, opts, "gray", flag, False, what) else "RGB"
    test = take_option(spec, opts, "test", float, None, what)
    seed = take_option(spec, opts, "seed", int, 0, what)
    use_cache = take_option(spec, opts, "cache", flag, True, what)
    reject_leftovers(spec, opts, OPTIONS, what)
    root = existing_dir(spec.arg, spec, "give a folder holding train/<class>/ and test/<class>/, "
                                        "or <class>/ folders plus ',test=0.2'")
    has_train, has_test = (root / "train").is_dir(), (root / "test").is_dir()
    if has_train or has_test:
        if not (has_train and has_test):
            missing = "test" if has_train else "train"
            raise UserError(f"{root} has {'train' if has_train else 'test'}/ but no {missing}/; add it, "
                            f"or point at a folder of class folders and add ',test=0.2'")
        if test is not None or "seed" in spec.options:
            raise UserError(f"{root} already has train/ and test/; drop the test= and seed= options")
        parts = {"train": _scan(root / "train"), "test": _scan(root / "test")}
        classes = parts["train"].classes
        if parts["test"].classes != classes:
            a, b = set(classes), set(parts["test"].classes)
            raise UserError(f"train/ and test/ in {root} have different class folders (only in train: "
                            f"{sorted(a - b) or '-'}; only in test: {sorted(b - a) or '-'}); make them match")
    else:
        if test is None:
            raise UserError(f"{root} has no train/ and test/ folders; add ',test=0.2' to hold out a "
                            f"fraction of each class as the test split")
        if not 0 < test < 1:
            raise UserError(f"test={test} in dataset spec '{spec}' is out of range; use a fraction in (0, 1)")
        parts = {"all": _scan(root)}
        classes = parts["all"].classes
    first = next(iter(parts.values()))
    ref = first.folder / first.files[0]
    image_size = size or _peek_size(ref)

    def load(part: _Part) -> Split:
        return _load(part, mode, image_size, size is not None, ref, use_cache)

    if "all" in parts:
        memo: dict = {}

        def pooled(which: int) -> Split:  # decode once; forget the pool once both halves are taken
            if "pool" not in memo:
                pool = load(parts["all"])
                memo.update(pool=pool, idx=stratified_split(pool.labels, test, seed), left={0, 1})
            out = memo["pool"].subset(memo["idx"][which])
            memo["left"].discard(which)
            if not memo["left"]:
                memo.clear()
            return out

        return Dataset(str(spec), classes, 1 if mode == "L" else 3, image_size,
                       train=lambda: pooled(0), test=lambda: pooled(1))
    return Dataset(str(spec), classes, 1 if mode == "L" else 3, image_size,
                   train=lambda: load(parts["train"]), test=lambda: load(parts["test"]))
