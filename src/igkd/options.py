"""``opt``: a config field with its help text, unit and allowed range or choices.

Its own module (no torch, no other igkd import) so that method parts
(:mod:`igkd.distill.parts`) can declare their options without importing the configs
those options are gathered into.
"""

from __future__ import annotations

import sys
from dataclasses import field


def opt(default, help: str, *, choices=None, low=None, high=None, unit: str = "", low_open=False,
        required: bool = False, metavar: str | None = None, repeat: bool = False):
    """A config field with its documentation and range.

    ``required``: the command line needs a value (from an option or the ``--config``
    YAML; the dataclass default is then only the Python API's). ``repeat``: a comma list
    that may also be given by repeating the option (and as a YAML list); the values are
    joined with ','. ``metavar``: the placeholder in ``--help`` (default: the field name).
    """
    return field(default=default, metadata=dict(help=help, choices=choices, low=low, high=high, unit=unit,
                                                low_open=low_open, required=required, metavar=metavar,
                                                repeat=repeat))


def deprecation_warning(old: str, new: str, where: str = "") -> None:
    """One line on stderr: an old option name still works for one release."""
    print(f"igkd: warning: {old}{where} is deprecated; use {new}", file=sys.stderr)


__all__ = ["deprecation_warning", "opt"]
