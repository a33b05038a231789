"""Method names (METHOD.md section 5): which loss terms and which overlay a run uses.

A method is a ``+``-joined set of parts: ``kd`` (distillation term on teacher logits),
``ig`` (IG overlay with each image's own map) or ``ig-shuffled`` (the control: maps of
other images), and ``at`` (attention transfer on hooked feature maps). ``student`` is
cross-entropy alone. Names are canonicalised to the order kd, ig, at, so ``at+kd`` is
``kd+at``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError

# the paper's eight combinations, then the shuffled-map controls
METHODS = ["student", "kd", "ig", "at", "kd+ig", "kd+at", "ig+at", "kd+ig+at",
           "ig-shuffled", "kd+ig-shuffled", "ig-shuffled+at", "kd+ig-shuffled+at"]
PARTS = ("kd", "ig", "ig-shuffled", "at")


@dataclass(frozen=True)
class Method:
    name: str
    kd: bool
    ig: bool
    shuffled: bool
    at: bool = False

    @property
    def needs_teacher(self) -> bool:
        return self.kd or self.ig or self.at


def parse_method(name: str) -> Method:
    """``"kd+ig+at"`` -> Method(kd, ig, at); one-line UserError for anything else."""
    parts = [p.strip() for p in str(name).lower().split("+")]
    known = name.lower() == "student" or (all(p in PARTS for p in parts) and len(set(parts)) == len(parts)
                                          and not {"ig", "ig-shuffled"} <= set(parts))
    if not known:
        raise UserError(f"unknown method '{name}'; choose one of {', '.join(METHODS)}")
    if name.lower() == "student":
        return Method("student", False, False, False, False)
    canonical = "+".join(p for p in PARTS if p in parts)
    return Method(canonical, kd="kd" in parts, ig=any(p.startswith("ig") for p in parts),
                  shuffled="ig-shuffled" in parts, at="at" in parts)


__all__ = ["METHODS", "Method", "parse_method"]
