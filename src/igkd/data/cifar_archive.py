"""What the CIFAR-10 and CIFAR-100 python releases share: download, md5, safe extraction, data-only unpickling.

Both are one ``.tar.gz`` holding one folder of pickles. A :class:`Release` names the
archive, its md5, the folder, the file whose presence marks a finished extraction, and the
official md5 of every file in the folder; :func:`ensure_release` and :func:`unpickle`
do the rest, so a source module only says how to read its pickles into a Split.

Nothing in DIR runs code: pickles are read by :mod:`igkd.data.safe_pickle`, and, unless
verification is off, the archive (downloaded or found) and every extracted file must have
the official md5, so a tampered or damaged copy is refused with one line before it is read.
"""

from __future__ import annotations

import hashlib
import http.client
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..fileio import file_digest, new_folder
from .safe_pickle import load_data_pickle

VERIFY_HINT = "or add ',verify=0' to the dataset spec for a re-packed copy (read as data only, never run)"


@dataclass(frozen=True)
class Release:
    name: str                 # "CIFAR-10", in messages
    url: str
    md5: str                  # of the archive
    archive: str              # file name of the archive in DIR
    folder: str               # the folder the archive holds
    marker: str               # a file of the folder that exists once extraction is complete
    file_md5: dict[str, str]  # official md5 of every file of the folder


def release_dir(release: Release, spec, download: bool, md5: str | None) -> Path:
    """The extracted release of a ``KIND:DIR`` dataset spec. A missing DIR is created when
    downloading is allowed (and removed again if the download fails): the README's
    ``cifar10:data/cifar10`` downloads on first use, where it had to exist first."""
    from .base import existing_dir, expand_user
    path = expand_user(spec.arg) if spec.arg else None
    if download and path is not None and not path.exists():
        with new_folder(path) as root:
            return ensure_release(release, root.resolve(), download=True, md5=md5)
    hint = "fix the path" if download else f"create it and place {release.archive} there, or fix the path"
    return ensure_release(release, existing_dir(spec.arg, spec, hint), download=download, md5=md5)


def ensure_release(release: Release, root: Path, download: bool = True, url: str | None = None,
                   md5: str | None = "official", quiet: bool = False) -> Path:
    """Return ``root/<release.folder>``, extracting or downloading the archive if needed.

    ``md5`` ("official": the release's; None: do not check) is required of the archive
    whether downloaded or found in ``root``."""
    root = Path(root)
    url = url or release.url
    md5 = release.md5 if md5 == "official" else md5
    folder = root / release.folder
    if (folder / release.marker).is_file():
        return folder
    archive = root / release.archive
    if not archive.is_file():
        if not download:
            raise UserError(f"{root} holds neither {release.folder}/ nor {release.archive}; place the archive there "
                            f"(from {url}) or drop download=0 to download it")
        _download(release, url, archive, md5, quiet)
    elif md5 is not None and (have := file_md5(archive)) != md5:
        raise UserError(f"{archive} has md5 {have}, not the official {md5} (damaged or altered); replace it with "
                        f"the official {release.archive}, {VERIFY_HINT}")
    _safe_extract(release, archive, root)
    if not (folder / release.marker).is_file():
        raise UserError(f"{folder / release.marker} is missing after extracting {archive}; delete {folder} "
                        f"if it is there, or replace the archive with the official {release.archive}")
    return folder


def _download(release: Release, url: str, dest: Path, md5: str | None, quiet: bool) -> None:
    """Stream ``url`` into a temporary file beside ``dest``, check its md5, rename it."""
    tmp = Path(tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)[1])
    digest = hashlib.md5()
    try:
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
                total = int(response.headers.get("Content-Length") or 0)
                done, last = 0, 0.0
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    if not quiet and (time.monotonic() - last > 0.5 or done == total):
                        last = time.monotonic()
                        of = f" of {total / 1e6:.1f} MB ({100 * done // total}%)" if total else " MB"
                        print(f"\rdownloading {url}: {done / 1e6:.1f}{of}", end="", file=sys.stderr, flush=True)
            if not quiet:
                print(file=sys.stderr)
        except (OSError, http.client.HTTPException) as e:  # URLError, HTTPError, timeouts are OSErrors
            reason = getattr(e, "reason", None) or e
            raise UserError(f"could not download {url} ({reason}); download {release.archive} yourself and "
                            f"place it in {dest.parent}, or check the network") from None
        if md5 is not None and digest.hexdigest() != md5:
            raise UserError(f"downloaded {url} has md5 {digest.hexdigest()}, expected {md5} (corrupt or "
                            f"changed); try again, or place the official {release.archive} in {dest.parent} yourself")
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)


def _safe_extract(release: Release, archive: Path, root: Path) -> None:
    """Extract plain files and folders only, refusing absolute paths and ``..``; the
    folder appears under its final name only once complete."""
    tmp = Path(tempfile.mkdtemp(prefix=".extract.", dir=root))
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                members = tar.getmembers()
                for m in members:
                    parts = Path(m.name).parts
                    if m.name.startswith(("/", "\\")) or ".." in parts or not (m.isfile() or m.isdir()):
                        raise UserError(f"{archive} contains an unsafe entry '{m.name}'; "
                                        f"replace it with the official {release.archive}")
                extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(tmp, members=members, **extra)
        except (tarfile.TarError, EOFError, OSError) as e:
            raise UserError(f"cannot extract {archive} ({e}); delete it and try again, or replace it "
                            f"with the official {release.archive}") from None
        if (tmp / release.folder).is_dir() and not (root / release.folder).exists():
            (tmp / release.folder).rename(root / release.folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def file_md5(path: Path) -> str:
    return file_digest(path, "md5")


def unpickle(release: Release, path: Path, verify: bool) -> dict:
    """The dict pickled in ``path`` (a file of the release's folder), md5-checked unless
    ``verify`` is off, read as data only; a one-line UserError otherwise."""
    fix = f"re-extract the official {release.archive} (delete {path.parent} first)"
    want = release.file_md5.get(path.name)
    if verify and want and path.is_file() and (have := file_md5(path)) != want:
        raise UserError(f"{path} has md5 {have}, not the official release's {want} (damaged or altered); "
                        f"{fix}, {VERIFY_HINT}")
    d = load_data_pickle(path, f"{release.name} batch", fix)
    if not isinstance(d, dict):
        raise UserError(f"{path} is not a valid {release.name} batch (a {type(d).__name__}, not a dict); {fix}")
    return d


def class_names(release: Release, meta: dict, key: bytes, path: Path, count: int) -> list[str]:
    """The ``count`` class names listed under ``key`` in an unpickled meta file."""
    names = meta.get(key)
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names] if isinstance(names, list) else []
    if len(classes) != count:
        raise UserError(f"{path} lists {len(classes)} class names under '{key.decode()}', expected {count}; "
                        f"re-extract {release.archive}")
    return classes


def label_array(release: Release, labels: list, count: int, path: Path, kind: str = "") -> np.ndarray:
    """``labels`` (a batch's list) as int64, each an integer in ``0..count - 1``; a one-line
    UserError naming ``path`` otherwise (a re-packed ``verify=0`` copy is not checked by md5).
    ``kind`` ("fine ", "coarse ") names which labels in the message."""
    if not all(type(v) is int for v in labels):  # not bools or floats, which int64 would silently take
        raise UserError(f"{path} has {kind}labels that are not integers; re-extract {release.archive}")
    try:
        y = np.asarray(labels, dtype=np.int64)
    except OverflowError:
        y = None
    if y is None or (len(y) and not (0 <= y.min() and y.max() < count)):
        raise UserError(f"{path} has {kind}labels outside 0..{count - 1}; re-extract {release.archive}")
    return y
