"""Extensions from other packages: entry points in the groups ``igkd.<kind>``.

An installed package extends igkd without editing it by declaring, in its
``pyproject.toml``::

    [project.entry-points."igkd.models"]
    tinycnn = "mypkg.tinycnn:FAMILY"          # a models.Family
    [project.entry-points."igkd.datasets"]
    mydata = "mypkg.data:load_mydata"         # a function Spec -> Dataset
    [project.entry-points."igkd.attributions"]
    gradsq = "mypkg.gradsq:ATTRIBUTION"       # an attribution.registry.Attribution
    [project.entry-points."igkd.corruptions"]
    pixelate = "mypkg.corrupt:PIXELATE"       # an evaluate.corruptions.Corruption
    [project.entry-points."igkd.loggers"]
    jsonl = "mypkg.track:JsonlLogger"         # a tracker class (step, epoch, close)
    [project.entry-points."igkd.parts"]
    mypart = "mypkg.part:PART"                # a distill.parts.Part (or a list of them)

Each registry is a :class:`Registry`: a dict of igkd's own entries that merges its group
the first time it is read, not when its module is imported (a package providing a model
and a dataset imports igkd.data while igkd.models loads it: merged at import, each would
load the other half-initialised). A name that is already taken is one line naming it.
An entry point that fails to load (an import error in its package) is a warning, once per
process, naming the distribution and the failing line, and igkd goes on without it: one
broken package disabled every command, ``--help`` included. A command that asks for its
name (``--method kd+mine``, ``--model mine:...``) fails with that line
(:class:`PluginError`). Installed distributions are scanned once per process
(:func:`_installed`).
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
import traceback
from importlib.metadata import EntryPoint, EntryPoints, entry_points
from pathlib import Path

from .errors import UserError

_failed: dict[tuple[str, str], str] = {}  # (kind, entry point name) -> why it did not load, one line
_dists: dict[tuple[str, str], str] = {}  # (kind, entry point name) -> 'distribution version' that declares it


class PluginError(UserError):
    """An installed entry point that igkd was asked for could not be loaded."""


@functools.cache
def _installed() -> EntryPoints:
    return entry_points()


def load(kind: str, what: str) -> dict[str, object]:
    """``name -> object`` of every entry point in the group ``igkd.<kind>`` that loads; one
    that fails is left out with a warning on stderr (see the module docstring), and
    :func:`require` then refuses its name with the same line."""
    out: dict[str, object] = {}
    for ep in _installed().select(group=f"igkd.{kind}"):
        if ep.dist is not None:
            _dists[(kind, ep.name)] = f"{ep.dist.name} {ep.dist.version}"
        try:
            out[ep.name] = ep.load()
        except Exception as e:  # noqa: BLE001 - a broken plug-in must not stop igkd silently; say which
            line = _failure(ep, what, e)
            _failed[(kind, ep.name)] = line
            if os.environ.get("RANK", "0") == "0":  # under torchrun, once for the group
                print(f"igkd: warning: {line}; igkd goes on without it", file=sys.stderr, flush=True)
    return out


def _failure(ep: EntryPoint, what: str, e: Exception) -> str:
    """'cannot load method part 'mine' from entry point mypkg.parts:PARTS of walka-mypkg 0.0.1
    (ModuleNotFoundError: No module named 'x', at /…/mypkg/parts.py line 3); fix or uninstall
    walka-mypkg': the distribution to fix, and the line where its code failed."""
    dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist is not None else None
    fix = f"fix or uninstall {ep.dist.name}" if ep.dist is not None else "fix or uninstall the package that provides it"
    if isinstance(e, ImportError) and "partially initialized module 'igkd" in str(e):
        # igkd.config builds PrecomputeConfig and DistillConfig from the registries, so
        # while it loads a plug-in those names do not exist yet: a cycle, not a bug of
        # the plug-in's own code
        fix = ("the plug-in imports, at module level, an igkd name built from the plug-ins "
               "(PrecomputeConfig, DistillConfig, AuditConfig): import it inside the plug-in's functions")
    reason = str(e).splitlines()[0][:300] if str(e) else ""
    where = _where(e.__traceback__)
    detail = f"{type(e).__name__}{': ' + reason if reason else ''}{', ' + where if where else ''}"
    return (f"cannot load {what} {ep.name!r} from entry point {ep.value}{' of ' + dist if dist else ''} "
            f"({detail}); {fix}")


def _where(tb) -> str:
    """'at FILE line N': the deepest frame outside importlib and igkd (the plug-in's code, or
    what it called), or ''."""
    skip = [str(Path(importlib.__file__).parent), str(Path(__file__).parent)]
    frames = [f for f in traceback.extract_tb(tb)
              if not f.filename.startswith("<") and not any(f.filename.startswith(d + os.sep) for d in skip)]
    return f"at {frames[-1].filename} line {frames[-1].lineno}" if frames else ""


def distribution(kind: str, name: str) -> str | None:
    """'walka-mypkg 0.0.1': the distribution declaring entry point ``name`` of ``igkd.<kind>``
    (after the group was read), or None."""
    return _dists.get((kind, name))


def failed() -> dict[tuple[str, str], str]:
    """``(kind, entry point name) -> why it did not load``, of the groups read so far."""
    return dict(_failed)


def failures(kind: str) -> dict[str, str]:
    """``entry point name -> why it did not load`` for the group ``igkd.<kind>`` (after it was read)."""
    return {name: line for (k, name), line in _failed.items() if k == kind}


def require(kind: str, name) -> None:
    """Refuse ``name`` with its load failure where it is a broken entry point of ``igkd.<kind>``."""
    line = _failed.get((kind, name)) if isinstance(name, str) else None
    if line is not None:
        raise PluginError(line)


KINDS = ("models", "datasets", "attributions", "corruptions", "loggers", "parts")


def installed() -> dict[str, list[tuple[str, str]]]:
    """``kind -> [(name, distribution)]`` of every installed entry point of igkd's groups,
    read from the packages' metadata without importing them (``igkd --help`` lists them)."""
    out: dict[str, list[tuple[str, str]]] = {}
    for kind in KINDS:
        for ep in _installed().select(group=f"igkd.{kind}"):
            out.setdefault(kind, []).append((ep.name, ep.dist.name if ep.dist is not None else ep.module))
    return out


def merge(registry: dict, kind: str, what: str, check=None) -> dict:
    """Add the entry points of ``igkd.<kind>`` to ``registry`` (name -> object), in place;
    ``check(name, obj)`` raises for an object of the wrong kind. Returns what was added."""
    added = load(kind, what)
    for name, obj in added.items():
        if name in registry:
            raise UserError(f"{what} {name!r} from an installed package clashes with igkd's own; rename it")
        if check is not None:
            check(name, obj)
        registry[name] = obj
    return added


class Registry(dict):
    """``name -> entry``: igkd's own, then (from the first read on) those of the entry points
    in the group ``igkd.<kind>``. Reads of any kind (``in``, ``[]``, iteration, ``keys``...)
    load them first; writes add entries as a dict's do."""

    def __init__(self, builtin: dict, kind: str, what: str, check=None):
        super().__init__(builtin)
        self._kind = kind
        self._plug = (kind, what, check)

    def _load(self) -> None:
        if self._plug is not None:
            kind, what, check = self._plug
            self._plug = None  # before loading: a plug-in that reads this registry meanwhile sees igkd's own
            merge(self, kind, what, check)

    def _asked(self, key) -> None:
        """Load, and refuse a name that only a broken entry point has (its load failure,
        not an 'unknown name')."""
        self._load()
        if not super().__contains__(key):
            require(self._kind, key)

    def __getitem__(self, key):
        self._asked(key)
        return super().__getitem__(key)

    def __contains__(self, key) -> bool:
        self._asked(key)
        return super().__contains__(key)

    def __iter__(self):
        self._load()
        return super().__iter__()

    def __len__(self) -> int:
        self._load()
        return super().__len__()

    def get(self, key, default=None):
        self._asked(key)
        return super().get(key, default)

    def keys(self):
        self._load()
        return super().keys()

    def values(self):
        self._load()
        return super().values()

    def items(self):
        self._load()
        return super().items()


def expect(cls: type, what: str):
    """A ``check`` for :func:`merge`: the object must be a ``cls``."""
    def check(name: str, obj) -> None:
        if not isinstance(obj, cls):
            raise UserError(f"{what} {name!r} from an installed package is a {type(obj).__name__}, not a "
                            f"{cls.__name__}")
    return check


__all__ = ["PluginError", "Registry", "distribution", "expect", "failed", "failures", "load", "merge", "require"]
