"""Which code a method part from outside igkd is: what keys a run of it.

igkd's own parts are versioned with igkd. A plug-in part (an entry point, or
``igkd.register_part``) is known by its class and the sha256 of its module's source, or by
the ``version`` it declares: a researcher who edits their loss and runs the experiment again
gets new runs, not the old loss's numbers under the new code's name (helper-64 found
"8 runs, 8 already finished" after the loss was multiplied by 100)."""

from __future__ import annotations

import hashlib
import inspect
import sys
from importlib import metadata

from .base import Part

_OWN = "igkd.distill.parts."


def code_key(part: Part) -> dict | None:
    """What identifies ``part``'s code in a run key: None for igkd's own parts, else its
    class and declared version, or the sha256 of its source (the module file's bytes, or the
    class's source where there is no file: a notebook cell), or ``"unknown"``."""
    cls = type(part)
    if cls.__module__.startswith(_OWN):
        return None
    key = {"class": f"{cls.__module__}.{cls.__qualname__}"}
    if part.version is not None:
        return {**key, "version": str(part.version)}
    return {**key, "sha256": _source_sha256(cls)}


def _source_sha256(cls: type) -> str:
    module = sys.modules.get(cls.__module__)
    path = getattr(module, "__file__", None)
    try:
        if path and path.endswith(".py"):
            with open(path, "rb") as f:
                return hashlib.sha256(f.read()).hexdigest()
        return hashlib.sha256(inspect.getsource(cls).encode()).hexdigest()  # a notebook's class: its cell
    except (OSError, TypeError):
        return "unknown"  # compiled or generated code: known by its class alone


def provenance(part: Part) -> dict | None:
    """:func:`code_key` with the distribution that installed it, for the run's records."""
    key = code_key(part)
    if key is None:
        return None
    top = type(part).__module__.split(".")[0]
    try:
        dists = metadata.packages_distributions().get(top) or []
        if dists:
            key = {**key, "distribution": f"{dists[0]} {metadata.version(dists[0])}"}
    except Exception:  # noqa: BLE001 - broken metadata of some installed package: the record goes without
        pass
    return key


def method_code(method) -> dict:
    """Part name -> :func:`code_key` for the plug-in parts of ``method`` ({} for igkd's own)."""
    return {p.name: k for p in method.parts if (k := code_key(p)) is not None}


__all__ = ["code_key", "method_code", "provenance"]
