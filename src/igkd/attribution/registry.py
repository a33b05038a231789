"""Attributions by name: the one place that knows which attributions exist.

Each attribution is a module of this package that declares one :class:`Attribution`
as ``ATTRIBUTION``, and one line of :data:`MODULES` below names that module. Adding an
attribution is exactly that: the module and the line. Precompute, the audit and the
command line ask this registry (:func:`get`, :data:`NAMES`) and never test names.

No torch at import: the attribution modules import torch inside their functions, so
``igkd --help`` (whose ``--attribution`` choices and help come from here) starts
without it. Entries are loaded on first use (:func:`get`).

What an entry declares:

* ``name``, ``help``: the ``--attribution`` value and its one-line description.
* ``fields``: its own options (``igkd.options.opt``), which become fields of
  :class:`~igkd.config.PrecomputeConfig` (and so of ``DistillConfig``), ``--name``
  options of precompute, distill and the experiments, and lines of ``--help``: a new
  attribution brings its options with it, as a method part does.
* ``options``: the :class:`~igkd.config.PrecomputeConfig` fields it reads that other
  parts of igkd own too (IG's ``ig_*``, which the error estimate reads); ``ig_batch``,
  passes per batch, is read by all and not listed. :meth:`Attribution.option_names`
  gives both: what enters a run's key.
* ``settings(cfg) -> dict``: what of ``cfg`` decides its maps, part of a store's identity
  (changing it gives another store; existing stores keep their keys only while these
  dicts stay the same).
* ``compute(teacher, x, y, cfg, first_index=0, n_steps=None) -> (attributions, delta)``:
  attributions ``N x C' x H x W`` whose :func:`~igkd.attribution.attribution_map`
  (sum over channels of the absolute value) is the ``N x H x W`` overlay map, and the
  completeness delta per image (NaN without one). ``first_index`` is the dataset index
  of ``x[0]`` (seeds any noise, so a chunk is the same whoever computes it);
  ``n_steps`` overrides the step count of attributions that have one.
* ``completeness``: whether ``sum(attributions) - delta = F_y(x) - F_y(x')`` (IG). The
  store's completeness gap is then read from the delta; without it, precompute runs one
  extra pass on black images for the gap ``F_y(x) - F_y(black)``.
* ``describe(cfg) -> str``: a short phrase for progress lines.
* ``prepare(teacher, dataset, cfg, device, quiet, key) -> cfg`` (optional): settings
  resolved from the teacher and the data before the store's identity is taken (IG's
  fitted schedule); ``key`` is the teacher's and the dataset's fingerprints, to cache
  what it makes.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from .. import plugins
from ..errors import UserError

# name -> module (relative to this package) declaring ATTRIBUTION; order = order in --help
MODULES: dict[str, str] = {
    "ig": ".ig",
    "saliency": ".saliency",
    "input_x_gradient": ".input_x_gradient",
    "smoothgrad": ".smoothgrad",
    "gradcam": ".gradcam",
}
NAMES: tuple[str, ...] = tuple(MODULES)
DEFAULT = "ig"
REFERENCE = "ig"  # the attribution precompute's error estimate compares against (it reads ig_steps)


@dataclass(frozen=True)
class Attribution:
    name: str
    help: str
    settings: Callable[[Any], dict]
    compute: Callable[..., tuple]
    options: tuple[str, ...] = ()
    fields: dict = field(default_factory=dict)  # option name -> opt(...)
    completeness: bool = False
    describe: Callable[[Any], str] | None = field(default=None)
    prepare: Callable[..., Any] | None = field(default=None)

    def description(self, cfg) -> str:
        return self.describe(cfg) if self.describe is not None else self.name

    def option_names(self) -> tuple[str, ...]:
        """Every config field that decides its maps: shared ones and its own."""
        return (*self.options, *self.fields)


def names() -> tuple[str, ...]:
    """Every attribution's name: igkd's own (:data:`NAMES`), then installed packages'."""
    return (*MODULES, *(n for n in PLUGINS if n not in MODULES))


def get(name: str) -> Attribution:
    """The entry of attribution ``name``; a one-line UserError listing the known ones."""
    if name not in MODULES and name in PLUGINS:
        entry = PLUGINS[name]
        if entry.name != name:
            raise UserError(f"attribution {name!r} from an installed package is named {entry.name!r} inside; "
                            "name its entry point as the attribution")
        return entry
    if name not in MODULES:
        raise UserError(f"unknown attribution {name!r}; known attributions: {', '.join(names())}")
    entry = importlib.import_module(MODULES[name], __package__).ATTRIBUTION
    if entry.name != name:
        raise RuntimeError(f"module {MODULES[name]} declares attribution {entry.name!r}, registered as {name!r}")
    return entry


def entries() -> list[Attribution]:
    """Every registered attribution, in registry order."""
    return [get(n) for n in names()]


def config_fields() -> dict:
    """Option name -> field of every registered attribution's own options (what
    :class:`~igkd.config.PrecomputeConfig` adds to its base); a name two attributions
    declare is refused."""
    out: dict = {}
    for e in entries():
        for name, f in e.fields.items():
            if name in out:
                raise UserError(f"attribution {e.name!r} declares option {name!r}, which another attribution "
                                "declares too; name it after the attribution")
            out[name] = f
    return out


def help_text() -> str:
    """``name (help), ...`` of every attribution, for ``--attribution``'s help."""
    return ", ".join(f"{e.name} ({e.help})" for e in entries())


# installed packages' attributions (entry points igkd.attributions), loaded when first read
PLUGINS: dict[str, Attribution] = plugins.Registry(
    {}, "attributions", "attribution", plugins.expect(Attribution, "attribution"))

__all__ = ["Attribution", "DEFAULT", "MODULES", "NAMES", "PLUGINS", "REFERENCE", "config_fields", "entries", "get",
           "help_text", "names"]
