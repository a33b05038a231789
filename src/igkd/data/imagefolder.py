"""``imagefolder:DIR[,size=N|HxW][,resize=fixed|shorter][,gray=1][,test=F,seed=S][,cache=0][,mmap=auto|0|1]``.

Four layouts:

* ``DIR/train/<class>/*`` and ``DIR/test/<class>/*`` (the same class folders in both);
* the ImageNet layout ``DIR/train/<wnid>/*.JPEG`` and ``DIR/val/<wnid>/*.JPEG``: ``val/``
  is the test split (used only when there is no ``test/``; igkd carves its own
  validation split from train). A ``val/`` of loose images, as ImageNet ships it, must
  first be sorted into one folder per class;
* ``DIR/test/<class>/*`` (or ``DIR/val/<class>/*``) alone: a held-out folder to score
  (``igkd evaluate``, often with ``--class-map``). Its classes and stored size come from
  it; the dataset has no train split (:attr:`Dataset.has_train` is False), so training,
  precomputing, ``normalize: dataset`` and int8 calibration on it are refused in one line;
* ``DIR/<class>/*`` with ``test=0.2``: a seeded stratified hold-out (``seed``, default 0)
  of each class becomes the test split.

Classes are the sorted subfolder names; files (.jpg .jpeg .png .bmp .gif .webp .tif
.tiff .ppm .pgm, in any letter case: ``.JPEG`` too) are sorted by name within each
class, so sample indices are stable. Other files, subfolders of a class folder (not
searched) and images beside the class folders are skipped with a warning that counts
them; a symbolic link to nothing is refused, naming it.

Images are decoded with Pillow as RGB (``gray=1``: as L). Every image of a split must
come out the same size, the stored size:

* no ``size``: each image's own; they must all share one (a mismatch names the file);
* ``size=N`` (N x N) or ``size=HxW`` with ``resize=fixed`` (the default): each image is
  resized to exactly H x W, bilinearly, aspect ratio not kept;
* ``size=...,resize=shorter``: each image is scaled, keeping its aspect ratio, to the
  smallest size that covers H x W, then center-cropped to H x W. For ``size=N`` that is
  the shorter side to N, the longer to ``floor(long * N / short)``, then an N x N crop at
  offsets ``round((new - N) / 2)`` (Python's round), as torchvision's
  ``Resize(N)`` + ``CenterCrop(N)`` on PIL images. For mixed sizes and aspect ratios
  (ImageNet: ``size=256,resize=shorter`` or ``size=224,resize=shorter``). An image whose
  resized whole would exceed 16 times the crop's area (a long strip) has only the crop's
  region resized, in bounded memory, within one grey level of the whole.

Bilinear is Pillow's (antialiased when shrinking); an image already at the target size is
not resampled. 8-bit files (L, P, RGB, RGBA, CMYK...) convert as Pillow does (alpha is
dropped). Deeper files are scaled to 8 bits by their format's range, never clipped:
16-bit integers (mode I;16*, or I with values in 0..65535) as round(v * 255 / 65535);
floats (mode F) must lie in [0, 1] and become round(v * 255). (16-bit colour files never
get here: Pillow opens them as RGB, keeping each value's high byte.) EXIF orientation is
not applied, as torchvision's loader does not. A float image outside
[0, 1], a mode igkd cannot decode faithfully, or a file that cannot be decoded is refused
with one line naming the file.

Decoded images are cached on disk, one file per split, under ``$IGKD_CACHE_DIR/datasets``
(default ``~/.cache/igkd/datasets``) in a folder named by the image folder, the split and
the decoding options; the cache also records the fingerprint of every file's name, size,
mtime, ctime and inode and is rebuilt when the folder changes (:mod:`igkd.data.image_cache`:
parallel, resumable, checksummed). A split whose decoded size fits the memory budget
(:func:`igkd.data.base.memory_budget`: ``$IGKD_DATA_MEMORY``, default half the available
memory) is read into memory; a larger one is memory-mapped from the cache (``mmap=auto``,
the default; ``mmap=1`` always maps, ``mmap=0`` never does). ``cache=0`` decodes into
memory with no cache (and cannot map). A test split is decoded only when first used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import UserError
from ..spec import Spec, reject_leftovers, take_option
from .base import Dataset, Split, available_memory, cache_dir, existing_dir, flag, memory_budget
from .image_cache import CacheUnwritable, decode_in_memory, human_bytes, load_cached
from .splits import stratified_split

log = logging.getLogger(__name__)
# what Pillow decodes without plug-ins; other files in a class folder are skipped with a warning
IMAGE_EXTS = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm",
              ".pbm", ".pnm", ".tga"}
OPTIONS = ["size", "resize", "gray", "test", "seed", "cache", "mmap"]
RESIZE = ("fixed", "shorter")
MAX_SIDE = 8192  # pixels; larger images are not classifier inputs
# 2: 16-bit and float images scaled by their range (were clipped);
# 3: one memory-mappable file per split (was an npz), resize=shorter, held-out splits decoded apart
CACHE_VERSION = 3


@dataclass
class _Part:
    """The files of one split: a folder of class folders (``train/``, ``test/``, ``val/``, DIR),
    or the held-out or kept rows of DIR (``role`` says which)."""

    folder: Path
    classes: list[str]
    files: list[str]        # relative to folder: "<class>/<name>"
    labels: np.ndarray      # int64, class index per file
    stats: list[tuple[int, int, int, int]]  # (size, mtime_ns, ctime_ns, inode) per file, for the cache key
    role: str = ""

    def take(self, idx: np.ndarray, role: str) -> "_Part":
        return _Part(self.folder, self.classes, [self.files[i] for i in idx], self.labels[idx].copy(),
                     [self.stats[i] for i in idx], role)


def _scan(folder: Path) -> _Part:
    try:
        return _scan_entries(folder)
    except OSError as e:  # a symlink loop, a dangling link, an unreadable folder
        raise _cannot_read(e, folder) from None


def _cannot_read(e: OSError, folder: Path) -> UserError:
    return UserError(f"cannot read {e.filename or folder} ({e.strerror or e}); fix or remove it")


def _dangling(e: os.DirEntry) -> bool:
    """A symlink to nothing: ``is_file()`` and ``is_dir()`` are both False for it, so without
    this check it vanished from the dataset without a word (a loop raises ELOOP in them)."""
    return e.is_symlink() and not e.is_file() and not e.is_dir()


def _refuse_dangling(e: os.DirEntry) -> None:
    try:
        target = os.readlink(e.path)
    except OSError:
        target = "?"
    try:
        os.stat(e.path)
        why = "it changed while the folder was read"
    except OSError as err:  # ENOENT, or ELOOP for a link loop
        why = err.strerror or str(err)
    raise UserError(f"cannot read {e.path} (a symbolic link to {target}: {why}); fix or remove the link")


def _scan_entries(folder: Path) -> _Part:
    classes, loose = [], []
    for e in os.scandir(folder):
        if e.name.startswith("."):
            continue
        if e.is_dir():
            classes.append(e.name)
        elif _dangling(e):  # a class folder (or image) linked from elsewhere that is gone
            _refuse_dangling(e)
        elif e.is_file() and Path(e.name).suffix.lower() in IMAGE_EXTS:
            loose.append(e.name)
    classes.sort()
    if not classes:
        hint = (f" (it holds {len(loose)} images directly: sort them into one folder per class, e.g. "
                f"{folder}/<wnid>/ for ImageNet's val/)") if loose else ""
        raise UserError(f"{folder} has no class subfolders; put images in {folder}/<class>/{hint}")
    files, labels, stats = [], [], []
    skipped: dict[str, list[str]] = {}  # extension -> files a user may have meant as images
    subfolders: list[str] = []  # folders inside class folders: their images are not read
    for label, name in enumerate(classes):
        entries = []
        for e in os.scandir(folder / name):
            if e.name.startswith("."):
                continue
            if not e.is_file():
                if e.is_dir():
                    subfolders.append(f"{name}/{e.name}")
                elif _dangling(e):  # a linked image whose target is gone: one image fewer, unsaid
                    _refuse_dangling(e)
                continue
            ext = Path(e.name).suffix.lower()
            if ext in IMAGE_EXTS:
                entries.append(e)
            else:
                skipped.setdefault(ext or "(none)", []).append(f"{name}/{e.name}")
        entries.sort(key=lambda e: e.name)
        if not entries:
            raise UserError(f"class folder {folder / name} holds no images ({' '.join(sorted(IMAGE_EXTS))})")
        for e in entries:
            files.append(f"{name}/{e.name}")
            labels.append(label)
            # size and mtime alone miss a file replaced with both kept (cp -p, rsync -t, tar x of a
            # fixed-size BMP): the cache would serve the old pixels under the old fingerprint. The
            # ctime cannot be set back (utime sets it to now) and a replacing file is a new inode.
            # The price: a folder copied back over the same path (new inodes), or files whose
            # metadata changed (chmod, a new hard link), are decoded again once; a copy at another
            # path has its own cache anyway (the path names it). Safe, if sometimes slower.
            st = e.stat()  # of the image a symlink points at, so replacing the target counts too
            stats.append((st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
    if skipped:  # said, not silent: a .heic or .JPG2 folder would otherwise train on fewer images
        counts = ", ".join(f"{len(v)} {k}" for k, v in sorted(skipped.items(), key=lambda kv: -len(kv[1])))
        example = next(iter(sorted(skipped.items(), key=lambda kv: -len(kv[1]))))[1][0]
        log.warning("%s: skipped %d files that are not images by their extension (%s; e.g. %s); igkd reads %s",
                    folder, sum(map(len, skipped.values())), counts, example, " ".join(sorted(IMAGE_EXTS)))
    # said too: images in a class's subfolders (torchvision's ImageFolder reads them) or beside
    # the class folders are not part of the dataset
    if subfolders:
        log.warning("%s: skipped %d folders inside class folders (e.g. %s); igkd reads only the images "
                    "directly in each class folder: move them up to count them", folder, len(subfolders),
                    sorted(subfolders)[0])
    if loose:
        log.warning("%s: skipped %d images that are not in a class folder (e.g. %s); move them into "
                    "%s/<class>/ to count them", folder, len(loose), sorted(loose)[0], folder)
    return _Part(folder, classes, files, np.asarray(labels, dtype=np.int64), stats)


def parse_size(raw: str, what: str, form: str = "N or HxW") -> tuple[int, int]:
    """``N`` or ``HxW`` as (H, W) pixels; ``what`` names the value in the one-line error
    (``size=... in dataset spec '...'``, ``--size ...``), ``form`` how to write it."""
    try:
        h, _, w = raw.lower().partition("x")
        size = (int(h), int(w or h))
    except ValueError:
        size = (0, 0)
    if min(size) < 1:
        raise UserError(f"{what} is not valid; use {form} (pixels)")
    if max(size) > MAX_SIDE:
        raise UserError(f"{what} is too large; use at most {MAX_SIDE} pixels a side")
    return size


def _parse_size(spec: Spec, raw: str | None) -> tuple[int, int] | None:
    return None if raw is None else parse_size(raw, f"size={raw} in dataset spec '{spec}'", "size=N or size=HxW")


def _peek_size(path: Path) -> tuple[int, int]:
    """(H, W) from the image header, without decoding the pixels."""
    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read image {path} ({e}); remove or replace the file") from None


# resize=shorter resizes the whole image when it is at most this many times the crop's area
# (every photo; ImageNet's most elongated are about 5:1); beyond, only the crop's region
LONG_RESIZE = 16


def shorter_geometry(w: int, h: int, out_h: int, out_w: int) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """``resize=shorter`` for a ``w x h`` image and an ``out_h x out_w`` target: the size
    (width, height) to resize to and the crop box (left, top, right, bottom) after it.

    The smallest aspect-keeping size covering the target: the side with the larger scale
    factor becomes exactly its target, the other ``floor(side * factor)`` (integers, so
    no float rounding); the crop is centred at ``round((new - out) / 2)`` as in
    torchvision's CenterCrop."""
    if out_w * h >= out_h * w:  # out_w / w >= out_h / h: the width reaches its target last
        new_w, new_h = out_w, max(out_h, h * out_w // w)
    else:
        new_w, new_h = max(out_w, w * out_h // h), out_h
    left, top = int(round((new_w - out_w) / 2)), int(round((new_h - out_h) / 2))
    return (new_w, new_h), (left, top, left + out_w, top + out_h)


# modes Pillow converts to L/RGB exactly (8 bits per channel, palettes, alpha dropped)
EIGHT_BIT_MODES = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}


def _to_mode(im: Image.Image, mode: str, path: Path) -> Image.Image:
    """``im`` as an 8-bit ``mode`` (L or RGB) image, scaling deep images by their range.

    Pillow's ``convert`` clips a 16-bit value to 255 (a 16-bit PNG came out 99.6% white)
    and truncates a float in [0, 1] to 0 (a float TIFF came out black)."""
    if im.mode == mode:
        return im
    if im.mode in EIGHT_BIT_MODES:
        try:
            return im.convert(mode)
        except ValueError:  # Pillow has no direct conversion for some pairs (LAB to L): go through RGB
            return im.convert("RGB").convert(mode)
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




def _decode_one(path: Path, mode: str, size: tuple[int, int], resize: str | None, ref: Path) -> np.ndarray:
    """One image as uint8 H x W (x 3), at ``size`` by the ``resize`` policy (None: as it is)."""
    h, w = size
    try:
        with Image.open(path) as im:
            im = _to_mode(im, mode, path)
            if resize == "fixed" and im.size != (w, h):
                im = im.resize((w, h), Image.BILINEAR)
            elif resize == "shorter" and im.size != (w, h):
                new, box = shorter_geometry(im.size[0], im.size[1], h, w)
                if new[0] * new[1] > LONG_RESIZE * w * h:
                    # an extreme aspect ratio (a 1 x 20000 strip made a 3 GB image at size 224):
                    # only the crop's source region is resized, which may differ from resizing
                    # the whole image by one grey level at some pixels (float rounding of the scale)
                    sx, sy = im.size[0] / new[0], im.size[1] / new[1]
                    im = im.resize((w, h), Image.BILINEAR, box=(box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy))
                else:  # torchvision's Resize then CenterCrop, pixel for pixel
                    if im.size != new:
                        im = im.resize(new, Image.BILINEAR)
                    im = im.crop(box)
            arr = np.asarray(im)
    except UserError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read image {path} ({e}); remove or replace the file") from None
    if arr.shape[:2] != (h, w):
        raise UserError(f"images differ in size ({path} is {arr.shape[1]}x{arr.shape[0]}, {ref} is "
                        f"{w}x{h}); add ',size=N' (or ',size=HxW', and ',resize=shorter' to keep aspect "
                        f"ratios) to the spec to resize them all")
    return arr


def input_recipe(spec: str, image_size, channels: int) -> dict:
    """How one image file becomes a model's input, as the dataset ``spec`` made the images it
    was trained on: what ``igkd predict`` does to a file, and what an export's ``FILE.json``
    tells a deployment to do (``image``). ``resize``: ``shorter`` where the spec is an image
    folder with ``resize=shorter`` (shorter side to the size, centre crop), else ``fixed``
    (straight to H x W: an image folder's default, and the way to CIFAR or Fashion-MNIST size)."""
    from ..spec import parse_spec
    try:
        parsed = parse_spec(spec or "")
        shorter = parsed.kind == "imagefolder" and str(parsed.options.get("resize", "")).strip() == "shorter"
    except UserError:  # a spec this igkd cannot read (a plug-in's): the plain way
        shorter = False
    return {"size": [int(image_size[0]), int(image_size[1])], "resize": "shorter" if shorter else "fixed",
            "mode": "L" if channels == 1 else "RGB", "decoder": "Pillow", "filter": "bilinear",
            "alpha": "dropped (Pillow's convert)", "exif_orientation": "not applied",
            "then": "uint8 H x W x C -> float32 C x H x W / 255 (NCHW, values in [0, 1])"}


def decode_image(path: str | Path, recipe: dict) -> np.ndarray:
    """One image file as uint8 C x H x W by ``recipe`` (:func:`input_recipe`): the decoding
    and resizing an image folder's images get, pixel for pixel."""
    h, w = recipe["size"]
    arr = _decode_one(Path(path), recipe["mode"], (h, w), recipe["resize"], Path(path))
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


class _Loader:
    """Decodes (or reads from the cache) the split of one :class:`_Part`."""

    def __init__(self, mode: str, size: tuple[int, int], resize: str | None, ref: Path, use_cache: bool,
                 mmap: str):
        self.mode, self.size, self.resize, self.ref = mode, size, resize, ref
        self.use_cache, self.mmap = use_cache, mmap

    def decoder(self, part: _Part):
        def decode(start: int, stop: int, out: np.ndarray) -> None:
            for j in range(stop - start):
                arr = _decode_one(part.folder / part.files[start + j], self.mode, self.size, self.resize, self.ref)
                out[j] = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        return decode

    def keys(self, part: _Part) -> tuple[str, str]:
        """(cache folder name: what the cache is of; source fingerprint: what its bytes depend on)."""
        what = [CACHE_VERSION, str(part.folder), part.role, self.mode, list(self.size), self.resize]
        name = hashlib.sha256(json.dumps(what).encode()).hexdigest()[:32]
        source = hashlib.sha256(json.dumps([what, part.classes, part.files, part.stats]).encode()).hexdigest()
        return f"imagefolder-{name}", source

    def __call__(self, part: _Part) -> Split:
        h, w = self.size
        shape = (len(part.files), 1 if self.mode == "L" else 3, h, w)
        need = int(np.prod(shape))
        desc = f"decoding {part.folder}" + (f" ({part.role})" if part.role else "")
        mmap = self.mmap == "1" or (self.mmap == "auto" and self.use_cache and need > memory_budget())
        if not mmap:
            self._check_memory(part, need)
        if self.use_cache:
            name, source = self.keys(part)
            try:
                return load_cached(cache_dir() / name, source, part.labels, shape, self.decoder(part), mmap, desc)
            except CacheUnwritable as e:
                if mmap:
                    why = "mmap=1" if self.mmap == "1" else "more than the memory budget"
                    raise UserError(f"{e}; {part.folder} ({human_bytes(need)} decoded, {why}) is to be "
                                    f"memory-mapped from that cache: set IGKD_CACHE_DIR to a writable folder") from None
                log.warning("%s; decoding into memory without a cache (set IGKD_CACHE_DIR to a writable folder "
                            "to keep the decoded images)", e)
        images = decode_in_memory(shape, self.decoder(part), desc)
        return Split(torch.from_numpy(images), torch.from_numpy(part.labels.copy()))

    def _check_memory(self, part: _Part, need: int) -> None:
        have = available_memory()
        if need > have:
            h, w = self.size
            fix = ("drop mmap=0 so it is memory-mapped from the disk cache" if self.use_cache
                   else "drop cache=0 so it is memory-mapped from the disk cache")
            raise UserError(f"decoding {part.folder} at {w}x{h} needs {need / 2**30:.1f} GiB, more than the "
                            f"{have / 2**30:.1f} GiB of memory available; {fix}, or add ',size=N' with a smaller N")


def _subfolders(folder: Path) -> list[str]:
    """The visible subfolders of ``folder``, or the UserError :func:`_scan` gives for a folder
    it cannot read: taking an unreadable folder as one with (or without) subfolders led to
    errors about the layout ("holds only test/", "no train/") instead of the cause."""
    try:
        return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    except OSError as e:
        raise _cannot_read(e, folder) from None


def _refuse_unlabelled_test(root: Path, held: str, has: dict[str, bool]) -> None:
    if held == "test" and has["val"] and not _subfolders(root / "test"):
        # ImageNet as distributed (ILSVRC/Data/CLS-LOC): test/ is loose unlabelled images beside
        # the val/<wnid>/ the user sorted; telling them to sort test/ into classes cannot be done
        raise UserError(f"{root}/test has no class subfolders (unlabelled images, like ImageNet's test set?), "
                        f"and test/ is the test split whenever it exists; move {root}/test out of {root} to "
                        f"use val/<class>/ as the test split, or sort test/ into test/<class>/")


def _test_alone(root: Path, held: str, has: dict[str, bool]) -> tuple[dict[str, _Part], list[str]]:
    """``root/held/<class>/*`` as the test split of a dataset with no train split."""
    _refuse_unlabelled_test(root, held, has)
    part = _scan(root / held)
    return {"test": part}, part.classes


def _layout(root: Path, spec: Spec, test: float | None, seed: int, seed_given: bool
            ) -> tuple[dict[str, _Part], list[str]]:
    """The :class:`_Part` of each split of ``root`` (no ``train`` for a folder of ``test/`` or
    ``val/`` alone) and the class names, by its layout."""
    has = {name: (root / name).is_dir() for name in ("train", "test", "val")}
    split_layout = has["train"] and (has["test"] or has["val"])
    held = "test" if has["test"] else "val" if has["val"] else None
    # test/ (or val/) and nothing else: a held-out folder to score; no train/ needed (users made
    # up a train/ of one image per class to evaluate on it). With test=, test/ and val/ holding
    # images are classes, as any folder is; holding class folders, they are splits, and test= is refused
    if not has["train"] and held is not None and set(_subfolders(root)) <= {"test", "val"}:
        if test is None and not seed_given:
            return _test_alone(root, held, has)
        if test is None or any(_subfolders(root / n) for n in ("test", "val") if has[n]):
            given = " and ".join(f"{o}=" for o, on in (("test", test is not None), ("seed", seed_given)) if on)
            raise UserError(f"{root} holds only {held}/, a test split to score; drop {given} (or use "
                            f"imagefolder:{root / held},test=0.2 to split its class folders into train and test)")
    # with test= the user says DIR holds class folders: one named train, test or val is a class
    # (it was read as half a train/test layout, and the error told them to add the test= they had given)
    if any(has.values()) and (test is None or split_layout):
        if not has["train"] or held is None:
            there = next(n for n in ("train", "test", "val") if has[n])
            missing = "test/ or val/" if has["train"] else "train/"
            others = [n for n in _subfolders(root) if n not in ("train", "test", "val")]
            if others and not has["train"]:  # neither a folder to score nor one of class folders
                raise UserError(f"{root} has {there}/ but no train/, and other folders beside it ("
                                f"{', '.join(others[:3])}{', ...' if len(others) > 3 else ''}); keep only "
                                f"{there}/<class>/ there to score it, add train/<class>/ to train on it, or add "
                                f"',test=0.2' if its folders are classes")
            raise UserError(f"{root} has {there}/ but no {missing}; add it, or point at a folder of class "
                            f"folders and add ',test=0.2'")
        if test is not None or seed_given:
            raise UserError(f"{root} already has train/ and {held}/; drop the test= and seed= options")
        _refuse_unlabelled_test(root, held, has)
        parts = {"train": _scan(root / "train"), "test": _scan(root / held)}
        classes = parts["train"].classes
        if parts["test"].classes != classes:
            a, b = set(classes), set(parts["test"].classes)
            raise UserError(f"train/ and {held}/ in {root} have different class folders (only in train: "
                            f"{sorted(a - b) or '-'}; only in {held}: {sorted(b - a) or '-'}); make them match")
        return parts, classes
    if test is None:
        raise UserError(f"{root} has no train/ and test/ folders; add ',test=0.2' to hold out a fraction of each "
                        f"class as the test split, or arrange it as train/<class>/ + test/<class>/ (or val/<class>/)")
    if not 0 < test < 1:
        raise UserError(f"test={test} in dataset spec '{spec}' is out of range; use a fraction in (0, 1)")
    pool = _scan(root)
    # split the file list, not decoded images: each side is decoded (and cached) on its own, on first use
    keep, held_idx = stratified_split(torch.from_numpy(pool.labels), test, seed)
    # a class of one image goes wholly to one side (the test side when test > 0.5): refuse a
    # class with no training image, or a test split of none, rather than fail later with an
    # IndexError or evaluate on nothing
    trained = np.bincount(pool.labels[keep.numpy()], minlength=len(pool.classes))
    missing = [c for c, n in zip(pool.classes, trained) if n == 0]
    if missing:
        names = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise UserError(f"test={test} leaves class{'es' if len(missing) > 1 else ''} {names} of {root} with no "
                        f"training image (a class of one image is held out whole); add images to "
                        f"{'those class folders' if len(missing) > 1 else 'that class folder'} or use test=0.5 or less")
    if len(held_idx) == 0:
        raise UserError(f"test={test} holds out no image of {root}: each of its {len(pool.classes)} classes has a "
                        f"single image; add images (at least 2 per class, one for each split)")
    role = f"test={test!r},seed={seed}"
    return {"train": pool.take(keep.numpy(), f"train of {role}"),
            "test": pool.take(held_idx.numpy(), f"test of {role}")}, pool.classes


def load_imagefolder(spec: Spec) -> Dataset:
    opts = dict(spec.options)
    what = "dataset spec"
    size = _parse_size(spec, take_option(spec, opts, "size", str, None, what))
    resize = take_option(spec, opts, "resize", str, "fixed", what)
    mode = "L" if take_option(spec, opts, "gray", flag, False, what) else "RGB"
    test = take_option(spec, opts, "test", float, None, what)
    seed = take_option(spec, opts, "seed", int, 0, what)
    use_cache = take_option(spec, opts, "cache", flag, True, what)
    mmap = take_option(spec, opts, "mmap", str, "auto", what).strip().lower()
    reject_leftovers(spec, opts, OPTIONS, what)
    if resize not in RESIZE:
        raise UserError(f"resize={resize} in dataset spec '{spec}' is not valid; use resize=fixed (exactly "
                        f"size=HxW) or resize=shorter (keep the aspect ratio, then center-crop)")
    if "resize" in spec.options and size is None:
        raise UserError(f"resize={resize} in dataset spec '{spec}' needs a size; add ',size=N' (or ',size=HxW')")
    mmap = {"auto": "auto", "1": "1", "yes": "1", "true": "1", "on": "1", "0": "0", "no": "0", "false": "0",
            "off": "0"}.get(mmap)
    if mmap is None:
        raise UserError(f"mmap={spec.options['mmap']} in dataset spec '{spec}' is not valid; use mmap=auto "
                        f"(memory-map splits larger than the memory budget), mmap=1 or mmap=0")
    if mmap == "1" and not use_cache:
        raise UserError(f"mmap=1 and cache=0 in dataset spec '{spec}' contradict each other: a split is "
                        f"memory-mapped from its disk cache; drop one of them")
    root = existing_dir(spec.arg, spec, "give a folder holding train/<class>/ and test/<class>/ (or val/<class>/), "
                                        "or <class>/ folders plus ',test=0.2'")
    parts, classes = _layout(root, spec, test, seed, "seed" in spec.options)
    first = parts.get("train", parts["test"])  # the stored size (without size=) is its first image's
    ref = first.folder / first.files[0]
    image_size = size or _peek_size(ref)
    load = _Loader(mode, image_size, resize if size is not None else None, ref, use_cache, mmap)
    channels = 1 if mode == "L" else 3
    if "train" not in parts:  # a held-out folder alone
        held = parts["test"].folder.name
        return Dataset(str(spec), classes, channels, image_size, train=None, test=lambda: load(parts["test"]),
                       no_train=f"{root} has {held}/ but no train/, so it can be scored (igkd evaluate), not "
                                f"trained on; add {root}/train/<class>/ with the class folders of {held}/")
    return Dataset(str(spec), classes, channels, image_size,
                   train=lambda: load(parts["train"]), test=lambda: load(parts["test"]))
