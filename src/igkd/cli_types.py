"""Argument types and the parser class of the command line.

Every numeric option outside the config dataclasses (which validate their own ranges) is
parsed by one of these, so a bad value is one line naming the option and the allowed
range, never a traceback later (``evaluate --batch-size 0`` reached ``range()``;
``export --atol nan`` silently turned the parity check off).
"""

from __future__ import annotations

import argparse
import math
import sys


class Parser(argparse.ArgumentParser):
    """argparse with igkd's error format: one line ``igkd: error: ...``, exit status 2."""

    def error(self, message: str):
        sub = self.prog.split(" ", 1)[1] if " " in self.prog else ""
        print(f"igkd: error: {message}{f' (see igkd {sub} --help)' if sub else ' (see igkd --help)'}",
              file=sys.stderr)
        sys.exit(2)


def _number(cast, lo, hi, what):
    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            bounds = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise argparse.ArgumentTypeError(f"{text} is out of range; use {what} {bounds}")
        return value
    parse.__name__ = what  # argparse names the type in some messages
    return parse


def int_range(lo: int | None = None, hi: int | None = None):
    return _number(int, lo, hi, "an integer")


def float_range(lo: float | None = None, hi: float | None = None):
    return _number(float, lo, hi, "a number")


POSITIVE = int_range(1)
NON_NEGATIVE = int_range(0)
