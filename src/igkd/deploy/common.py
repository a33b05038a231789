"""What the deployment commands share: comma lists of specs and numbers, image shapes,
existing input files, and the software environment recorded with measurements."""

from __future__ import annotations

import platform
from pathlib import Path

from ..errors import UserError


def split_specs(values: str | list[str] | tuple[str, ...]) -> list[str]:
    """Model specs from comma lists: ``"mobilenetv2,mobilenetv2:width=0.5,drop=3"`` is two
    specs (a piece with '=' but no ':' is an option of the spec before it)."""
    specs: list[str] = []
    for text in [values] if isinstance(values, str) else values:
        for piece in filter(None, (p.strip() for p in text.split(","))):
            if specs and "=" in piece and ":" not in piece:
                specs[-1] += "," + piece
            else:
                specs.append(piece)
    return specs


def split_list(values: str | list[str] | tuple[str, ...]) -> list[str]:
    items = [values] if isinstance(values, str) else list(values)
    return [p.strip() for text in items for p in text.split(",") if p.strip()]


def parse_ints(values: str | list | tuple, what: str) -> list[int]:
    try:
        out = [int(v) for v in split_list([str(v) for v in ([values] if isinstance(values, (str, int)) else values)])]
    except ValueError:
        raise UserError(f"{what} must be whole numbers separated by commas, got {values!r}") from None
    if not out or min(out) <= 0:
        raise UserError(f"{what} must be positive numbers, got {values!r}")
    return out


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) <= 0:
        raise UserError(f"input shape {text!r} is not CxHxW (e.g. 3x32x32)")
    return shape  # type: ignore[return-value]


def existing(path: str | Path, what: str) -> Path:
    """``path`` if it is a file, else a one-line UserError saying it is missing."""
    if not Path(path).is_file():
        raise UserError(f"{what} {path} {'is a folder' if Path(path).is_dir() else 'does not exist'}; "
                        "check the path")
    return Path(path)


def environment(with_ort: bool = False) -> dict:
    import torch
    from .. import __version__
    env = {"igkd": __version__, "torch": torch.__version__, "python": platform.python_version(),
           "machine": platform.machine(), "cpu": platform.processor() or platform.machine()}
    if with_ort:
        import onnxruntime
        env["onnxruntime"] = onnxruntime.__version__
    return env
