"""A real size-limited filesystem for full-disk tests (a tmpfs the test mounts; needs root)."""

import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def tmpfs(path: Path, size: str, otherwise: str = ""):
    """A tmpfs of ``size`` at ``path``; yields a function that resizes it. Skips where it
    cannot be mounted, naming ``otherwise`` (what covers the code path there) if given."""
    path.mkdir(parents=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}; needs root)"
                    + (f": {otherwise}" if otherwise else ""))

    def resize(new: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={new}", str(path)], check=True)

    def read_only() -> None:  # the same files on a read-only mount: root cannot write them either
        subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
    resize.read_only = read_only
    try:
        yield resize
    finally:
        subprocess.run(["umount", str(path)], check=False)
