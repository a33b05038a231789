"""Spec strings: ``name``, ``name:arg`` or ``name:arg,key=value,...``.

Datasets and models are named by spec strings everywhere (command line, configs, API):

    cifar10:/data/cifar10            imagefolder:/data/pets,size=64
    mobilenetv2                      mobilenetv2:drop=5       mobilenetv2:width=0.5

The part before the first ``:`` is the kind; after it comes an optional positional
argument (a path for datasets) and ``key=value`` options, separated by commas. A path or
value holding a comma is quoted: ``imagefolder:"/data/cats, dogs",size=64``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePath

from .errors import UserError


@dataclass(frozen=True)
class Spec:
    kind: str
    arg: str | None = None
    options: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        # quoted where needed so that parse_spec(str(spec)) == spec (a store's or checkpoint's
        # recorded spec is parsed again later)
        parts = ([_quote(self.arg, arg=True)] if self.arg is not None else []) + \
            [f"{k}={_quote(v)}" for k, v in self.options.items()]
        return self.kind + (":" + ",".join(parts) if parts else "")

    def canonical(self) -> "Spec":
        """The same spec with its options in key order: one spec however they were ordered
        (``width=0.5,drop=5`` and ``drop=5,width=0.5`` build the same model)."""
        return Spec(self.kind, self.arg, dict(sorted(self.options.items())))


def _quote(text: str, arg: bool = False) -> str:
    """``text`` quoted when it would otherwise be read back differently: a comma or quote
    splits or confuses the spec, a ';' splits a list of specs (--students), outer spaces are
    stripped, and in the positional argument an
    ``=`` makes it an option (``key=value``) and an empty one vanishes. (``:`` needs no quotes:
    only the first one, after the kind, separates.) A text holding both quote characters is
    written as adjacent quoted runs (``'a"b'"c'd"``), which the parser joins."""
    if not (any(c in text for c in ',;"\'') or text != text.strip() or (arg and ("=" in text or not text))):
        return text
    if not ("'" in text and '"' in text):
        return "'" + text + "'" if "'" not in text else '"' + text + '"'
    out, quote = [], ""
    for c in text:
        if c == quote or not quote:  # (re)open with the other quote character
            out.append(quote)
            quote = '"' if c == "'" else "'"
            out.append(quote)
        out.append(c)
    return "".join(out) + quote


def split_outside_quotes(text: str, keep_quotes: bool = False, sep: str = ",") -> tuple[list[str], str]:
    """``text`` split at the ``sep`` characters outside single or double quotes, the quotes
    removed (or kept), and the quote left open at its end ("" when every quote is closed)."""
    items, current, quote = [], [], ""
    for c in text:
        if quote:
            if c == quote:
                quote = ""
                if not keep_quotes:
                    continue
        elif c in "'\"":
            quote = c
            if not keep_quotes:
                continue
        elif c == sep:
            items.append("".join(current))
            current = []
            continue
        current.append(c)
    items.append("".join(current))
    return items, quote


def split_specs(text: str, what: str) -> list[str]:
    """A list of specs separated by ';' (a spec holds commas itself), stripped; a ';' inside
    quotes belongs to its spec (``py:"/a;b/net.py":make``), and the quotes stay for
    :func:`parse_spec` to remove."""
    items, quote = split_outside_quotes(text, keep_quotes=True, sep=";")
    if quote:
        raise UserError(f"unclosed {quote} quote in {what} '{text}'; close it, e.g. py:\"/a;b/net.py\":make")
    return [item.strip() for item in items]


def _split(rest: str, text: str, what: str) -> list[str]:
    """Split at commas outside single or double quotes; the quotes themselves are removed."""
    items, quote = split_outside_quotes(rest)
    if quote:
        raise UserError(f"unclosed {quote} quote in {what} '{text}'; close it, e.g. imagefolder:\"/data/a,b\"")
    return items


def parse_spec(text: str, what: str = "spec") -> Spec:
    """Parse ``kind[:arg][,key=value...]``; a first item without ``=`` is the argument."""
    if text is not None and not isinstance(text, str):
        # a Path, a Dataset or a module from the Python API: one line, not an AttributeError from .strip()
        like = "'demo' or 'imagefolder:DIR'" if "dataset" in what else "'mobilenetv2:width=0.5'" if "model" in what \
            else "'mobilenetv2:width=0.5' or 'imagefolder:DIR'"
        folder = f" (a folder of images: 'imagefolder:{text}')" if "dataset" in what and isinstance(text, PurePath) \
            else ""
        raise UserError(f"{what} must be a string like {like}{folder}, got {type(text).__name__}")
    text = (text or "").strip()
    if not text:
        raise UserError(f"empty {what}; give one like 'mobilenetv2:drop=5' or 'imagefolder:DIR'")
    kind, _, rest = text.partition(":")
    kind = kind.strip().lower()
    arg: str | None = None
    options: dict[str, str] = {}
    if rest:
        items = _split(rest, text, what)
        first_quoted = rest.lstrip()[:1] in ("'", '"')
        if first_quoted or "=" not in items[0]:
            arg = items.pop(0)
        for item in items:
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise UserError(f"bad option '{item}' in {what} '{text}'; write options as key=value")
            key = key.strip().lower()
            if key in options:  # last-wins would silently drop one of two values the user wrote
                raise UserError(f"option '{key}' is given twice in {what} '{text}'; keep one {key}=...")
            options[key] = value.strip()
    return Spec(kind, arg, options)


def canonical_spec(text: str) -> str:
    """``text`` as :meth:`Spec.canonical` writes it, for the keys that find runs again; text
    that is no spec is returned as it is."""
    try:
        return str(parse_spec(text).canonical())
    except UserError:
        return text


def take_option(spec: Spec, opts: dict[str, str], key: str, cast, default, what: str):
    """Pop ``key`` from ``opts`` and convert it, with a one-line error on bad values."""
    if key not in opts:
        return default
    raw = opts.pop(key)
    try:
        return cast(raw)
    except (TypeError, ValueError):
        raise UserError(f"option {key}={raw!r} in {what} '{spec}' is not a valid {cast.__name__}") from None


def reject_leftovers(spec: Spec, opts: dict[str, str], allowed: list[str], what: str) -> None:
    if opts:
        bad = ", ".join(sorted(opts))
        raise UserError(f"unknown option(s) {bad} in {what} '{spec}'; known options: {', '.join(allowed) or 'none'}")
