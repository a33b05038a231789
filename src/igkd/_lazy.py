"""Lazy package attributes, so ``igkd --help`` and ``--version`` need not import torch.

``import igkd.cli`` runs ``igkd/__init__.py`` first; importing the API there eagerly pulled
in torch and scipy (4-6 s) before argparse could print a line. Names are now imported on
first use. Some API names are also submodule names (``igkd.distill`` the function and
``igkd/distill/`` the package, likewise ``precompute`` and ``evaluate``): the import system
binds a submodule onto its parent when it is first imported, which would replace the
function. :func:`lazy_package` therefore makes each name a property of the package's
module class, whose setter keeps such bindings aside, so ``igkd.distill`` is the function
however the submodules were imported, as it was with eager imports.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types


def lazy_package(package: str, names: dict[str, str]) -> None:
    """Make each ``name`` of ``package`` resolve to ``getattr(import_module(module), name)``
    on first access (``names``: name -> absolute or package-relative module)."""
    module = sys.modules[package]

    class LazyPackage(types.ModuleType):
        def __dir__(self):
            return sorted(set(super().__dir__()) | set(names))

        def __getattr__(self, name):
            # a submodule not imported yet: eager imports had bound the API's (igkd.experiments.resolve,
            # as the README writes it after `import igkd`), so lazy ones made it an AttributeError
            if not name.startswith("_") and importlib.util.find_spec(f"{package}.{name}") is not None:
                return importlib.import_module(f"{package}.{name}")
            raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def attribute(name: str, source: str) -> property:
        def get(self):
            cache = self.__dict__.setdefault("_lazy_values", {})
            if name not in cache:
                cache[name] = getattr(importlib.import_module(source, package), name)
            return cache[name]

        def bind(self, value):  # a submodule being bound by the import system: keep it aside
            self.__dict__.setdefault("_lazy_submodules", {})[name] = value

        return property(get, bind)

    for name, source in names.items():
        setattr(LazyPackage, name, attribute(name, source))
    module.__class__ = LazyPackage
