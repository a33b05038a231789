"""Argument types, the parser class and config-driven subcommands of the command line.

Every numeric option outside the config dataclasses (which validate their own ranges) is
parsed by one of these, so a bad value is one line naming the option and the allowed
range, never a traceback later (``evaluate --batch-size 0`` reached ``range()``;
``export --atol nan`` silently turned the parity check off).
"""

from __future__ import annotations

import argparse
import math
import re
import sys


class Parser(argparse.ArgumentParser):
    """argparse with igkd's error format: one line ``igkd: error: ...``, exit status 2."""

    def error(self, message: str):
        sub = self.prog.split(" ", 1)[1] if " " in self.prog else ""
        if message.endswith(": expected one argument") and message.startswith("argument -"):
            # argparse takes a value starting with '-' (--out -run, --data -d) for an option and
            # said only this: say how such a path is written
            flag = message[len("argument "):-len(": expected one argument")].split("/")[-1]
            message += f"; a value starting with '-' is written {flag}=-VALUE (a path also as ./-NAME)"
        chosen = re.search(r"invalid choice: '([^']*)'", message)
        if chosen:  # --attribution NAME of an installed plug-in that did not load: why, not the list
            from . import plugins
            line = next((v for (_, name), v in plugins.failed().items() if name == chosen.group(1)), None)
            if line is not None:
                print(f"igkd: error: {line}", file=sys.stderr)
                sys.exit(2)
        print(f"igkd: error: {message}{f' (see igkd {sub} --help)' if sub else ' (see igkd --help)'}",
              file=sys.stderr)
        sys.exit(2)


def _number(cast, lo, hi, what):
    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            value = _whole(text) if cast is int else None
            if value is None:
                raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            bounds = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise argparse.ArgumentTypeError(f"{text} is out of range; use {what} {bounds}")
        return value
    parse.__name__ = what  # argparse names the type in some messages
    return parse


def _whole(text: str) -> int | None:
    """``'3.0'`` or ``'1e3'`` as the integer it spells (a recipe's YAML and the API accept them, so
    the command line does too); None for ``'3.5'``, ``'inf'`` or words."""
    try:
        value = float(text)
    except ValueError:
        return None
    return int(value) if math.isfinite(value) and value == int(value) else None


def int_range(lo: int | None = None, hi: int | None = None):
    return _number(int, lo, hi, "an integer")


def float_range(lo: float | None = None, hi: float | None = None):
    return _number(float, lo, hi, "a number")


POSITIVE = int_range(1)
NON_NEGATIVE = int_range(0)


class Deprecated(argparse.Action):
    """An old option name kept for one release: sets the new option's value and prints
    one warning line (``igkd: warning: --steps is deprecated; use --ig-steps``).

    ``append``: the new option is repeatable (argparse's 'append', a list of values), so
    the old name adds to that list. Set as a plain value, it replaced the values of the new
    option given before it, and a new option given after it crashed appending to a string
    (``bench latency --batch 2 --batch-size 4``)."""

    def __init__(self, option_strings, dest, new: str, append: bool = False, **kwargs):
        self.new = new
        self.append = append
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from .options import deprecation_warning
        # one warning per old name and command line: a repeated old name (--batch 1 --batch 2)
        # printed the same line once per use
        warned = getattr(namespace, "_deprecated_warned", set())
        if option_string not in warned:
            deprecation_warning(option_string, self.new)
        setattr(namespace, "_deprecated_warned", warned | {option_string})
        if self.append:
            values = [*(getattr(namespace, self.dest, None) or []), values]
        setattr(namespace, self.dest, values)


def config_command(sub, name: str, cls, *, help: str, description: str, epilog: str = "",
                   section: str | None = None, main: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """A subcommand whose options are the fields of the config dataclass ``cls``, with
    ``--config YAML`` (its ``section:``, default ``name``) and ``--quiet``/``--json``;
    the caller adds what is not an option of the work (where to write)."""
    from .config import add_arguments
    p = sub.add_parser(name, help=help, description=description, epilog=epilog,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="YAML", help=f"YAML recipe, a file or a shipped name (its '{section or name}:' "
                   "section, or the whole file where it has no sections); command-line options override it "
                   "(default: none)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors and the final summary")
    p.add_argument("--json", action="store_true", help="print the result as JSON (progress stays on stderr)")
    add_arguments(p, cls, main)
    return p


def resolve(args: argparse.Namespace, cls, section: str):
    """The config of a command: defaults <- ``--config`` YAML section <- options, with the
    options the command line requires checked (one line naming the option)."""
    from .config import build, load_yaml, overrides_from
    values = load_yaml(args.config, section) if args.config else {}
    return build(cls, values, overrides_from(args, cls), source=args.config or "options", cli=True)
