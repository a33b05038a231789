"""Atomic, durable file writing: nothing half-written is ever left under a final name.

A file is written to a temporary ``.NAME.*.tmp`` beside its final name, flushed to disk
(fsync), renamed over the final name, and the directory is fsynced so the rename itself
survives a crash. A full disk (ENOSPC, EDQUOT) raised while writing is re-raised with
the final path as ``OSError.filename``, so the command line can say where the disk is
full; the temporary is removed either way.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's or a directory's data and metadata to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems cannot fsync a directory; the data fsync already happened
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF) or Path(path).is_file():
            raise
    finally:
        os.close(fd)


def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in DISK_FULL


@contextmanager
def disk_full_names(path: str | os.PathLike):
    """Re-raise a disk-full OSError that does not name its file with ``path`` as its filename."""
    try:
        yield
    except OSError as e:
        if e.errno in DISK_FULL and not e.filename:
            raise OSError(e.errno, os.strerror(e.errno), str(path)) from e
        raise


def is_temporary(name: str) -> bool:
    """True for the temporaries :func:`atomic_path` creates (``.NAME.XXXXXXXX.tmp``)."""
    return name.startswith(".") and name.endswith(".tmp")


def remove_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete leftover temporaries of killed writers in ``folder`` (not recursive). Only call
    this while holding the folder's lock (:mod:`igkd.lock`): a live writer's temporary
    looks the same."""
    folder = Path(folder)
    gone = []
    if folder.is_dir():
        for p in folder.iterdir():
            if is_temporary(p.name) and p.is_file():
                p.unlink(missing_ok=True)
                gone.append(p)
    return gone


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, deepest first."""
    missing = []
    for p in (folder, *folder.parents):
        if p.exists():
            break
        missing.append(p)
    return missing


def _remove_created(folders: list[Path]) -> None:
    """Remove the (deepest first) folders a failed write created, as long as they are empty:
    a folder another writer has put something into meanwhile stays, and so do its parents."""
    for p in folders:
        try:
            p.rmdir()
        except OSError:
            break


@contextmanager
def new_folder(folder: str | os.PathLike):
    """Yield ``folder``, created with its missing parents; if the block fails, the folders this
    call created are removed again while empty (a download that failed leaves no empty
    ``data/cifar10/`` behind)."""
    folder = Path(folder)
    created = _missing_folders(folder)
    with disk_full_names(folder):
        folder.mkdir(parents=True, exist_ok=True)
    try:
        yield folder
    except BaseException:
        _remove_created(created)
        raise


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; on success fsync it, rename it over ``path`` and
    fsync the directory. On failure the temporary is removed and ``path`` is untouched, and
    so are the folders above it: those this call created for it are removed again (an export
    that failed its parity check left an empty ``newdir/sub/`` behind)."""
    path = Path(path)
    created = _missing_folders(path.parent)
    done = False
    try:
        with disk_full_names(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            try:
                os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
                yield Path(tmp)
                fsync_path(tmp)  # data on disk before the rename makes it visible (no empty file after a crash)
                os.replace(tmp, path)
                done = True
                fsync_path(path.parent)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
    finally:
        if not done and created:
            _remove_created(created)


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in 1 MiB blocks (never whole into memory)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    return file_digest(path, "sha256")


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def finite(obj):
    """``obj`` with every NaN or infinite float replaced by None (JSON's null).

    ``json.dumps`` writes NaN as a bare ``NaN`` token, which is not JSON: strict parsers
    (JavaScript, serde, Go) reject the whole file. An undefined figure (the accuracy of an
    empty validation split, a p-value of identical samples) is null instead."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps(obj, indent: int | None = None) -> str:
    """Strict JSON text of ``obj`` (non-finite floats as null; never a NaN token)."""
    return json.dumps(finite(obj), indent=indent, allow_nan=False)


def write_json(path: str | os.PathLike, obj) -> None:
    write_bytes(path, (dumps(obj, indent=2) + "\n").encode())


def write_text(path: str | os.PathLike, text: str) -> None:
    # a Python that is not in UTF-8 mode (PYTHONUTF8=0 under an ASCII locale) reads a non-ASCII
    # argument or file name as surrogate escapes: written back as the bytes they stand for, as
    # the file system does with them, where a plain encode() failed (a traceback after training)
    write_bytes(path, text.encode("utf-8", "surrogateescape"))


# Pseudo file systems: creating a folder there fails in odd ways (ENOENT in /proc, EPERM in /sys)
_PSEUDO = ("/proc", "/sys", "/dev")


def _blocker(path: Path, flag: str, fix: str | None = None) -> str | None:
    """Why nothing can be written at ``path`` (a folder or file to create), or None;
    ``fix`` replaces the advice after the ';'."""
    p = Path(os.path.abspath(path))
    if any(str(p) == root or str(p).startswith(root + "/") for root in _PSEUDO):
        return (f"{flag} {path} is inside {p.parts[0]}{p.parts[1]}, a system folder; "
                f"{fix or 'choose a folder of your own'}")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                return f"{flag} {path} is under {parent}, which is a file, not a folder; {fix or 'choose another path'}"
            if not os.access(parent, os.W_OK | os.X_OK):
                return f"{flag} {path} cannot be created: {parent} is not writable; {fix or 'choose another path'}"
            return None
    return None


def writable_dir(path: str | os.PathLike, flag: str = "--out", fix: str | None = None) -> Path:
    """``path`` as a folder that can be written (created later), or a one-line UserError
    naming it by ``flag``; ``fix`` replaces the advice where another folder is no fix (a
    folder whose own results are to be written into, a setting such as IGKD_CACHE_DIR)."""
    from .errors import UserError
    if not str(path).strip():
        raise UserError(f"no output directory given; pass {flag} DIR")
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{flag} {path} is an existing file, not a folder; {fix or 'give a folder path'}")
        if not os.access(path, os.W_OK | os.X_OK):
            raise UserError(f"{flag} {path} is not writable; {fix or 'choose another folder'}")
        return path
    why = _blocker(path, flag, fix)
    if why:
        raise UserError(why)
    return path


def native_path(path: str | os.PathLike, flag: str) -> Path:
    """``path`` for a library that opens the file itself (ONNX Runtime, TorchScript,
    safetensors), or a one-line UserError naming it by ``flag``. Those take the name as
    strict UTF-8: a name Python holds with surrogate escapes (bytes that are not UTF-8, or
    any non-ASCII name under an ASCII locale without UTF-8 mode) failed deep inside them with
    a TypeError traceback."""
    from .errors import UserError
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError:
        encoding = sys.getfilesystemencoding()
        hint = ("; or, if the name is UTF-8, run Python in UTF-8 mode (PYTHONUTF8=1 or a UTF-8 locale)"
                if encoding.lower().replace("-", "") != "utf8" else "")
        raise UserError(f"{flag} {path}: its name is not valid {encoding} text, and the library that opens it "
                        f"takes UTF-8 names only; rename it (or its folder) to plain ASCII{hint}") from None
    return Path(path)


def writable_file(path: str | os.PathLike, flag: str = "--out") -> Path:
    """``path`` as a file that can be (over)written, or a one-line UserError."""
    from .errors import UserError
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file name, e.g. {path / 'model.onnx'}")
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"{flag} {path} is not writable; choose another file")
    why = _blocker(path, flag)
    if why:
        raise UserError(why)
    return path
