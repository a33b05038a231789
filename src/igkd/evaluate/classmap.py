"""Scoring a model on another dataset whose classes map onto its own (cross-dataset check).

A class map is a JSON or YAML file, either a plain mapping from the evaluated folder's
class names to the model's class names::

    {"plane": "airplane", "car": "automobile", "kitty": "cat"}

or, for checkpoints without igkd metadata (foreign .pt files), the model's classes in
output order next to the mapping::

    classes: [airplane, automobile, bird, cat, deer, dog, frog, horse, ship, truck]
    map: {plane: airplane, car: automobile, kitty: cat}

Several folder classes may map to one model class. Images of folder classes the map does
not name are dropped (and counted); predictions range over all the model's classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import read_yaml_file
from ..errors import UserError


# YAML reads unquoted 0, 1.5, no, on, null as numbers, booleans or None: classes named so (digit
# folders are common) were refused with no hint of why
QUOTE = "quote class names that YAML reads as numbers, booleans or null (write '0': zero, 'no': none)"


def shown(names: list[str], k: int = 6) -> str:
    """Class names for an error line: all of a short list, else the first ``k`` and the count
    (``[:3]...`` printed '...' after a complete list of three, and never the data's own)."""
    names = list(names)
    head = ", ".join(map(str, names[:k]))
    return f"{len(names)} classes: {head}" + (", ..." if len(names) > k else "")


def _first_not_text(items: list):
    return next(c for c in items if not isinstance(c, str))


@dataclass
class ClassMap:
    mapping: dict[str, str]
    classes: list[str] | None  # the model's classes, when the file lists them
    source: str


def read_class_map(source: str | Path | dict) -> ClassMap:
    """A :class:`ClassMap` from a JSON/YAML file (or an already-loaded dict)."""
    name = "class map" if isinstance(source, dict) else str(source)
    if isinstance(source, dict):
        doc = source
    else:
        doc = read_yaml_file(source, "class map")  # JSON is YAML
    if not isinstance(doc, dict) or not doc:
        raise UserError(f"{name} must be a non-empty mapping of folder class: model class")
    classes = None
    if "map" in doc and isinstance(doc["map"], dict):
        mapping, classes = doc["map"], doc.get("classes")
        extra = set(doc) - {"map", "classes"}
        if extra:  # as text: keys YAML read as numbers do not sort with names
            raise UserError(f"{name} has unknown keys {sorted(map(str, extra))}; use 'map:' and optionally 'classes:'")
        if classes is not None and (not isinstance(classes, list) or not all(isinstance(c, str) for c in classes)):
            raise UserError(f"'classes:' in {name} must be a list of the model's class names in output order, "
                            + (f"not {_first_not_text(classes)!r}; {QUOTE}" if isinstance(classes, list)
                               else "not one name; write classes: [name, name, ...]"))
    else:
        mapping = doc
    if not mapping:
        raise UserError(f"{name} maps no class; add lines 'folder class: model class'")
    bad = next(((k, v) for k, v in mapping.items() if not (isinstance(k, str) and isinstance(v, str))), None)
    if bad is not None:
        fix = "give one model class name per folder class" if isinstance(bad[1], (list, dict)) else QUOTE
        raise UserError(f"{name} must map folder class names to model class names (strings), not "
                        f"{bad[0]!r}: {bad[1]!r}; {fix}")
    return ClassMap(dict(mapping), classes, name)


def model_classes(cmap: ClassMap, meta_classes: list[str] | None, weights: str) -> list[str]:
    """The model's class names: from the checkpoint's metadata or the class map (they must agree)."""
    if cmap.classes and meta_classes and cmap.classes != meta_classes:
        raise UserError(f"'classes:' in {cmap.source} differs from the classes in {weights}'s metadata; "
                        "drop it from the class map or fix it")
    classes = meta_classes or cmap.classes
    if not classes:
        raise UserError(f"{weights} has no class names (no igkd metadata); list the model's classes in output "
                        f"order under 'classes:' in {cmap.source}, with the mapping under 'map:'")
    return list(classes)


def remap(labels: torch.Tensor, folder_classes: list[str], cmap: ClassMap, classes: list[str]) -> dict:
    """Indices of the kept images, their labels in the model's classes, and what was dropped."""
    unknown_folder = sorted(set(cmap.mapping) - set(folder_classes))
    if unknown_folder:
        raise UserError(f"{cmap.source} maps {unknown_folder[:3]}, not classes of the evaluated data "
                        f"({', '.join(folder_classes[:10])}); fix the class names")
    unknown_model = sorted(set(cmap.mapping.values()) - set(classes))
    if unknown_model:
        raise UserError(f"{cmap.source} maps to {unknown_model[:3]}, not classes of the model "
                        f"({', '.join(classes[:10])}); fix the class names")
    table = torch.full((len(folder_classes),), -1, dtype=torch.long)
    for i, c in enumerate(folder_classes):
        if c in cmap.mapping:
            table[i] = classes.index(cmap.mapping[c])
    new = table[labels]
    keep = torch.nonzero(new >= 0).reshape(-1)
    dropped = sorted(c for c in folder_classes if c not in cmap.mapping)
    return {"keep": keep, "labels": new[keep], "dropped_images": int(len(labels) - len(keep)),
            "dropped_classes": dropped}


__all__ = ["ClassMap", "model_classes", "read_class_map", "remap"]
