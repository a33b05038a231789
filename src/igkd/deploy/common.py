"""What the deployment commands share: comma lists of specs and numbers, image shapes,
existing input files, and the software environment recorded with measurements."""

from __future__ import annotations

import platform
from pathlib import Path

from ..errors import UserError


def _pieces(text: str) -> list[str]:
    """``text`` split at the commas outside quotes, the quotes kept: a spec's quoted path
    (``py:'/my nets, v2/net.py:make'``) is one piece. Where a quote is never closed (a path
    like ``/data/bob's/m.pt``), at every comma as before."""
    from ..spec import split_outside_quotes
    pieces, quote = split_outside_quotes(text, keep_quotes=True)
    return text.split(",") if quote else pieces


def _cut_at_comma(piece: str) -> bool:
    """Whether ``piece`` is missing because a file or folder name holding a comma was cut
    there: its folder has an entry named ``piece``'s name, a comma and more."""
    path = Path(piece)
    if not path.name or path.exists():
        return False
    try:
        return any(e.name.startswith(path.name + ",") for e in path.parent.iterdir())
    except OSError:
        return False


def split_specs(values: str | list[str] | tuple[str, ...]) -> list[str]:
    """Model specs from comma lists: ``"mobilenetv2,mobilenetv2:width=0.5,drop=3"`` is two
    specs (a piece ``key=value``, no ':' before its '=', is an option of the spec before it).
    Commas inside a spec's quotes do not split: the quoted path of
    ``py:'/a, b/net.py:make',width=4`` was cut in two and its halves read as two specs."""
    specs: list[str] = []
    for text in [values] if isinstance(values, str) else values:
        for piece in filter(None, (p.strip() for p in _pieces(text))):
            if specs and "=" in piece and ":" not in piece.partition("=")[0]:
                specs[-1] += "," + piece
            else:
                specs.append(piece)
    return specs


def split_files(values: str | list[str] | tuple[str, ...], flag: str) -> list[str]:
    """Checkpoint paths (or ``torchscript:FILE`` specs) from comma lists. A value that names
    an existing file as a whole is that file, commas and all; otherwise it is split at the
    commas outside quotes, and a piece in quotes is unquoted (``'/a, b/m.safetensors',c.pt``).
    A path holding a comma was cut at it, and no way of writing it was accepted."""
    from ..models import holds_own_weights
    from ..spec import parse_spec
    files: list[str] = []
    for text in [values] if isinstance(values, str) else values:
        whole = text.strip()
        try:
            own = holds_own_weights(whole) and Path(parse_spec(whole).arg or "").is_file()
        except UserError:
            own = False
        if own or Path(whole).is_file():
            files.append(whole)
            continue
        pieces = [p.strip() for p in _pieces(text) if p.strip()]
        pieces = [p[1:-1] if len(p) > 1 and p[0] == p[-1] and p[0] in "'\"" else p for p in pieces]
        if len(pieces) > 1:
            for p in pieces:
                if _cut_at_comma(p):
                    raise UserError(f"{flag} {whole!r}: no file {p}; a path holding a comma is given alone "
                                    f"({flag} 'DIR, 2/model.safetensors') or in quotes in a list "
                                    f"({flag} \"'DIR, 2/model.safetensors',other.safetensors\")")
        files += pieces
    return files


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
