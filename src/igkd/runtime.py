"""Device and thread selection, and the cache directory."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import UserError


def resolve_device(name: str = "auto") -> torch.device:
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
    if n and n > 0:
        torch.set_num_threads(n)


def cache_dir(*parts: str) -> Path:
    """``$IGKD_CACHE_DIR`` (default ``~/.cache/igkd``) joined with ``parts``."""
    root = Path(os.environ.get("IGKD_CACHE_DIR", Path.home() / ".cache" / "igkd"))
    return root.joinpath(*parts)
