"""The registry of method parts (:mod:`.base` says what a part is).

A new part is one module in this folder and one line in ``BUILTIN``; or, from outside
the package, an entry point in the group ``igkd.parts`` (an object that is a
:class:`Part` or a list of them) or a call to :func:`register_part` before configs are
built. Method names join parts with ``+``; ``student`` is cross-entropy alone.
"""

from __future__ import annotations

import importlib
from ... import plugins
from ...errors import UserError
from .base import Batch, Method, Part, Step

# module -> the parts it defines (each module's PARTS list); one line per module
BUILTIN = (
    "kd",        # Hinton KD, with optional logit standardisation
    "dkd",       # decoupled KD
    "dist",      # DIST: inter- and intra-class Pearson correlation
    "overlay",   # ig, ig-shuffled, overlay-constant: the paper's overlay and its controls
    "explain",   # e2KD-style explanation matching
    "at",        # attention transfer
    "cutmix",    # CutMix, the augmentation control
)

# the paper's eight combinations and the shuffled-map controls (the trainer's full test list)
PAPER_METHODS = ["student", "kd", "ig", "at", "kd+ig", "kd+at", "ig+at", "kd+ig+at",
                 "ig-shuffled", "kd+ig-shuffled", "ig-shuffled+at", "kd+ig-shuffled+at"]
# modern baselines and controls the overlay must beat (issue 13), the demo ablation's list
MODERN_METHODS = ["dkd", "dist", "dkd+ig", "explain", "kd+explain", "kd+cutmix", "kd+overlay-constant"]

PLAIN = Method("student", ())  # cross-entropy alone: a teacher's training, or the plain student

_parts: dict[str, Part] = {}
_origins: dict[str, dict] = {}  # part name -> where a part from outside igkd came from (part_origin)
_loaded = False
_frozen_fields: set[str] | None = None  # option names DistillConfig was built with


def _add(part: Part, source: str) -> None:
    if not isinstance(part, Part):
        raise UserError(f"{source} gave {part!r}, not an igkd.distill.parts.Part")
    name = part.name
    if not name or "+" in name or name != name.lower() or name == "student":
        raise UserError(f"{source}: part name {name!r} must be lower case, non-empty, without '+', not 'student'")
    if name in _parts and _parts[name] is not part:
        raise UserError(f"{source}: a part named {name!r} is already registered")
    for fname, f in part.fields.items():
        for other in _parts.values():
            if fname in other.fields and other.fields[fname] is not f:
                raise UserError(f"{source}: option {fname!r} of part {name!r} is also an option of part "
                                f"{other.name!r}; name it after the part (e.g. {name.replace('-', '_')}_{fname})")
    _parts[name] = part


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in BUILTIN:
        for part in importlib.import_module(f"{__name__}.{module}").PARTS:
            _add(part, f"igkd.distill.parts.{module}")
    for name, obj in plugins.load("parts", "method part").items():  # the group igkd.parts
        for part in (obj if isinstance(obj, (list, tuple)) else [obj]):
            _add(part, f"entry point {name}")
            _origins[part.name] = {"package": plugins.distribution("parts", name), "entry_point": name}


def register_part(part: Part) -> Part:
    """Register a part from outside the package (``igkd.register_part``). Its options
    become config fields, so a part with options must be registered before
    :class:`igkd.config.DistillConfig` is first used; an entry point in the group
    ``igkd.parts`` always is. A part whose class has the module and name of a registered
    one's (a notebook cell run again) replaces it (once a config was built, only with the
    same options); another part of a registered name is refused. Returns ``part``."""
    if not isinstance(part, Part):
        raise UserError(f"register_part gave {part!r}, not an igkd.distill.parts.Part")
    _load()
    old = _parts.get(part.name)
    if old is not None and old is not part and _redefined(old, part):
        # a notebook cell run again defines the class anew; refused, it would need a restart
        # of the kernel. The new definition replaces the old one (its loss, its needs)
        del _parts[part.name]
        try:
            register_part(part)
        except UserError:
            _parts[part.name] = old
            raise
        return part
    new = set(part.fields) - set().union(*(p.fields for p in _parts.values()))
    if _frozen_fields is not None and new - _frozen_fields:
        raise UserError(f"part {part.name!r} brings options {', '.join(sorted(new))} after igkd.config was built; "
                        "register it before using any config, or through the 'igkd.parts' entry point")
    _add(part, "register_part")
    _origins[part.name] = {"package": None, "entry_point": None}
    return part


def _redefined(old: Part, part: Part) -> bool:
    """Whether ``part`` is ``old``'s class defined again (same module and name), with the same
    options where igkd.config was already built from them (DistillConfig keeps its fields)."""
    a, b = type(old), type(part)
    if (a.__module__, a.__qualname__) != (b.__module__, b.__qualname__):
        return False
    if _frozen_fields is not None and any(
            name not in old.fields or (f.default, f.metadata) != (old.fields[name].default, old.fields[name].metadata)
            for name, f in part.fields.items()):
        raise UserError(f"part {part.name!r} is registered again with other options after igkd.config was built; "
                        "restart Python (the notebook's kernel) to use them")
    return True


def part_origin(name: str) -> dict | None:
    """Where part ``name`` came from, None for igkd's own: ``{"package": "walka-mypkg 0.0.1",
    "entry_point": "mine", "class": "mypkg.parts.CosLogit"}`` (package and entry point None
    for a part given to :func:`register_part`). ``igkd methods`` says it, as ``--help`` names
    the package of every plug-in."""
    part = parts().get(name)
    if part is None or type(part).__module__.startswith(__name__ + "."):
        return None
    origin = _origins.get(name, {"package": None, "entry_point": None})
    return {**origin, "class": f"{type(part).__module__}.{type(part).__qualname__}"}


def parts() -> dict[str, Part]:
    """Every registered part by name, in canonical order."""
    _load()
    return dict(sorted(_parts.items(), key=lambda kv: (kv[1].order, kv[0])))


def get_part(name: str) -> Part:
    known = parts()
    if name not in known:
        plugins.require("parts", name)  # an entry point of that name that did not load: why, not "unknown"
        # a part of a broken package is not known by name until it loads (an entry point may give
        # several): the load failure is named beside the list
        broken = "".join(f"; {line}" for line in plugins.failures("parts").values())
        raise UserError(f"unknown method part '{name}'; parts are {', '.join(known)} (join them with '+'; "
                        f"'student' is cross-entropy alone){broken}")
    return known[name]


def config_fields(freeze: bool = False) -> dict:
    """Option name -> field of every registered part (what DistillConfig adds to its base)."""
    global _frozen_fields
    out: dict = {}
    for part in parts().values():
        out.update(part.fields)
    if freeze:
        _frozen_fields = set(out)
    return out


def field_owners() -> dict[str, str]:
    """Option name -> ``method part 'x'`` (the configs name it when an option is taken)."""
    return {n: f"method part {p.name!r}" for p in parts().values() for n in p.fields}


def parse_method(name: str) -> Method:
    """``"at+kd"`` -> Method("kd+at", (kd, at)); one-line UserError for anything else."""
    text = str(name).strip().lower()
    if text == PLAIN.name:
        return PLAIN
    names = [p.strip() for p in text.split("+")]
    if not all(names):
        raise UserError(f"method '{name}' has an empty part; join part names with '+', e.g. kd+ig")
    if len(set(names)) != len(names):
        raise UserError(f"method '{name}' names a part twice")
    try:
        chosen = [get_part(n) for n in names]
    except plugins.PluginError:
        raise  # its own line: "unknown method 'kd+mine': cannot load..." read as a typo
    except UserError as e:
        raise UserError(f"unknown method '{name}': {e}") from None
    groups: dict[str, str] = {}
    for p in chosen:
        if p.group_name in groups:
            raise UserError(f"method '{name}' combines {groups[p.group_name]} and {p.name}, which do the same job "
                            f"({p.group_name}); keep one")
        groups[p.group_name] = p.name
    chosen.sort(key=lambda p: (p.order, p.name))
    return Method("+".join(p.name for p in chosen), tuple(chosen))


def method_label(name: str) -> str:
    """How a run names its method to people: ``cross-entropy`` for ``student`` (a teacher
    trained by igkd train called itself "student" in its log, summary line and model card)."""
    return "cross-entropy" if name == PLAIN.name else f"method {name}"


def methods_help() -> str:
    """One line per part, for --help."""
    return "; ".join(f"{p.name}: {p.help}" for p in parts().values())


__all__ = ["BUILTIN", "Batch", "MODERN_METHODS", "Method", "PAPER_METHODS", "PLAIN", "Part", "Step", "config_fields",
           "get_part", "methods_help", "parse_method", "part_origin", "parts", "register_part"]
