"""Device and thread selection, and the cache directory."""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

from .errors import UserError


def tune_malloc() -> bool:
    """Keep freed large blocks in glibc's heap instead of unmapping them.

    PyTorch on CPU allocates activations of several MiB per layer; above glibc's mmap
    threshold each one is a fresh mmap whose pages fault in again on every pass, and
    the time goes to the kernel. Raising the mmap and trim thresholds made batched
    inference of the CIFAR student 1.6-2x faster on 2 cores (evaluating 10,000 JPEG CIFAR-10
    images with `igkd evaluate`: 49 s -> 18 s).
    Applied by the ``igkd`` command; set IGKD_NO_MALLOC_TUNING=1 to skip. Returns
    whether it was applied (glibc only).
    """
    if os.environ.get("IGKD_NO_MALLOC_TUNING") or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, (1 << 31) - 1))


def resolve_device(name: str = "auto"):
    """The torch.device a name means, refusing CUDA where there is none."""
    import torch  # here, not at import: the command line starts (--help, --version) without torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{name}' asked for, but no CUDA GPU is available; use --device cpu")
    return dev


def set_threads(n: int) -> None:
    """``torch.set_num_threads(n)`` for ``n > 0`` (0: torch's default), process-wide: an
    API function that calls it is decorated with :func:`keeps_threads`."""
    import torch
    if n and n > 0:
        torch.set_num_threads(n)


def keeps_threads(function):
    """``function`` with torch's thread count put back as the caller had it when it returns
    or raises: its ``threads=N`` holds for the call only, so a notebook's later work does
    not go on at ``igkd.distill``'s ``threads=1``."""
    import functools

    @functools.wraps(function)
    def call(*args, **kwargs):
        import torch
        before = torch.get_num_threads()
        try:
            return function(*args, **kwargs)
        finally:
            if torch.get_num_threads() != before:
                torch.set_num_threads(before)
    return call


def cache_dir(*parts: str) -> Path:
    """``$IGKD_CACHE_DIR`` (default ``~/.cache/igkd``) joined with ``parts``."""
    if os.environ.get("IGKD_CACHE_DIR"):
        # a '~' no shell expanded (a Dockerfile's ENV, a quoted export) made a folder named '~' in
        # the working directory, printed as if it were the home's
        return Path(os.path.expanduser(os.environ["IGKD_CACHE_DIR"])).joinpath(*parts)
    # looked up only without IGKD_CACHE_DIR: without HOME and a passwd entry (a container run
    # as an arbitrary uid) Path.home() raised RuntimeError, a traceback even where the variable
    # named the cache
    home = os.path.expanduser("~")
    if home == "~":
        raise UserError("no home folder for igkd's cache (~/.cache/igkd): HOME is unset and this user has "
                        "none; set IGKD_CACHE_DIR to a writable folder")
    return Path(home, ".cache", "igkd", *parts)
