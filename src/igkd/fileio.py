"""Atomic file writing: nothing half-written is ever left under a final name."""

from __future__ import annotations

import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; rename it over ``path`` on success only."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
    with atomic_path(path) as tmp:
        tmp.write_text(dumps(obj, indent=2) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


# Pseudo file systems: creating a folder there fails in odd ways (ENOENT in /proc, EPERM in /sys)
_PSEUDO = ("/proc", "/sys", "/dev")


def _blocker(path: Path, flag: str) -> str | None:
    """Why nothing can be written at ``path`` (a folder or file to create), or None."""
    p = Path(os.path.abspath(path))
    if any(str(p) == root or str(p).startswith(root + "/") for root in _PSEUDO):
        return f"{flag} {path} is inside {p.parts[0]}{p.parts[1]}, a system folder; choose a folder of your own"
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                return f"{flag} {path} is under {parent}, which is a file, not a folder; choose another path"
            if not os.access(parent, os.W_OK | os.X_OK):
                return f"{flag} {path} cannot be created: {parent} is not writable; choose another path"
            return None
    return None


def writable_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """``path`` as a folder that can be written (created later), or a one-line UserError."""
    from .errors import UserError
    if not str(path).strip():
        raise UserError(f"no output directory given; pass {flag} DIR")
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{flag} {path} is an existing file, not a folder; give a folder path")
        if not os.access(path, os.W_OK | os.X_OK):
            raise UserError(f"{flag} {path} is not writable; choose another folder")
        return path
    why = _blocker(path, flag)
    if why:
        raise UserError(why)
    return path


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
