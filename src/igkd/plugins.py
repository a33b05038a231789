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
load the other half-initialised). A name that is already taken, or an entry point that
fails to load, is one line naming it. Installed distributions are scanned once per
process (:func:`_installed`).
"""

from __future__ import annotations

import functools
from importlib.metadata import EntryPoints, entry_points

from .errors import UserError


@functools.cache
def _installed() -> EntryPoints:
    return entry_points()


def load(kind: str, what: str) -> dict[str, object]:
    """``name -> object`` of every entry point in the group ``igkd.<kind>``."""
    out: dict[str, object] = {}
    for ep in _installed().select(group=f"igkd.{kind}"):
        try:
            out[ep.name] = ep.load()
        except Exception as e:  # noqa: BLE001 - a broken plug-in must not stop igkd silently; say which
            fix = "fix or uninstall the package that provides it"
            if isinstance(e, ImportError) and "partially initialized module 'igkd" in str(e):
                # igkd.config builds PrecomputeConfig and DistillConfig from the registries, so
                # while it loads a plug-in those names do not exist yet: a cycle, not a bug of
                # the plug-in's own code
                fix = ("the plug-in imports, at module level, an igkd name built from the plug-ins "
                       "(PrecomputeConfig, DistillConfig, AuditConfig): import it inside the plug-in's functions")
            raise UserError(f"cannot load {what} {ep.name!r} from entry point {ep.value} ({type(e).__name__}: "
                            f"{e}); {fix}") from None
    return out


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
        self._plug = (kind, what, check)

    def _load(self) -> None:
        if self._plug is not None:
            kind, what, check = self._plug
            self._plug = None  # before loading: a plug-in that reads this registry meanwhile sees igkd's own
            merge(self, kind, what, check)

    def __getitem__(self, key):
        self._load()
        return super().__getitem__(key)

    def __contains__(self, key) -> bool:
        self._load()
        return super().__contains__(key)

    def __iter__(self):
        self._load()
        return super().__iter__()

    def __len__(self) -> int:
        self._load()
        return super().__len__()

    def get(self, key, default=None):
        self._load()
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


__all__ = ["Registry", "expect", "load", "merge"]
