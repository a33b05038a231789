"""``opt``: a config field with its help text, unit and allowed range or choices.

Its own module (no torch, no other igkd import) so that method parts
(:mod:`igkd.distill.parts`) can declare their options without importing the configs
those options are gathered into.
"""

from __future__ import annotations

from dataclasses import field


def opt(default, help: str, *, choices=None, low=None, high=None, unit: str = "", low_open=False):
    """A config field with its documentation and range."""
    return field(default=default, metadata=dict(help=help, choices=choices, low=low, high=high,
                                                unit=unit, low_open=low_open))


__all__ = ["opt"]
