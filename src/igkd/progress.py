"""Progress lines on stderr: count, rate and ETA; quiet when asked or not on rank 0."""

from __future__ import annotations

import os
import sys
import time


def is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def fmt_seconds(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def fmt_percent(v) -> str:
    """An accuracy in percent, ``n/a`` where there is none (no validation split: NaN, or null
    once read back from JSON)."""
    return "n/a" if v is None or v != v else f"{v:.2f}%"


class Progress:
    """``with Progress(total, "precompute", "img") as p: p.update(n)``.

    On a terminal the line is redrawn in place; otherwise a line is printed about every
    10% (and at the end), so logs stay short. ``delay``: print nothing before this many
    seconds have passed, and nothing at all for work done sooner (a step that is instant on
    small data and minutes on large data is silent where it does not keep anyone waiting).
    """

    def __init__(self, total: int, desc: str, unit: str = "it", quiet: bool = False, stream=None,
                 delay: float = 0.0):
        self.total, self.desc, self.unit, self.delay = total, desc, unit, delay
        self.shown = False
        self.stream = stream or sys.stderr
        self.quiet = quiet or not is_rank0()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.done = 0
        self.start = time.perf_counter()
        self.last_print = 0.0
        self.last_decile = -1
        self.extra = ""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if not self.quiet and exc[0] is None and (self.shown or not self.delay):
            self._print(final=True)
        elif exc[0] is not None and self.tty and self.shown:
            # the line redrawn in place ends here: the error (or "interrupted; resume with ...")
            # was printed on the end of the progress line
            self.stream.write("\n")
            self.stream.flush()

    def update(self, n: int = 1, extra: str = "") -> None:
        self.done += n
        self.extra = extra or self.extra
        if self.quiet:
            return
        now = time.perf_counter()
        if now - self.start < self.delay:
            return
        decile = int(10 * self.done / max(1, self.total))
        if (self.tty and now - self.last_print > 0.5) or (not self.tty and decile > self.last_decile):
            self.last_print, self.last_decile = now, decile
            self._print()

    @property
    def rate(self) -> float:
        return self.done / max(1e-9, time.perf_counter() - self.start)

    def _print(self, final: bool = False) -> None:
        self.shown = True
        elapsed = time.perf_counter() - self.start
        rate = self.rate
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        line = (f"{self.desc}: {self.done}/{self.total} {self.unit} ({100 * self.done / max(1, self.total):.0f}%), "
                f"{rate:.1f} {self.unit}/s, " + (f"took {fmt_seconds(elapsed)}" if final else f"ETA {fmt_seconds(eta)}"))
        if self.extra:
            line += f", {self.extra}"
        if self.tty:
            self.stream.write("\r\033[K" + line + ("\n" if final else ""))
        elif final or self.done < self.total:
            self.stream.write(line + "\n")
        self.stream.flush()


def log(msg: str, quiet: bool = False) -> None:
    if not quiet and is_rank0():
        print(msg, file=sys.stderr, flush=True)
