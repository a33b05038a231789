"""Reports: Markdown tables and PNG plots (matplotlib, headless)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import torch

from .distill.augment import ig_overlay
from .fileio import atomic_path


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


# ---------------------------------------------------------------- user text in figures
# Class names and method names are the user's: a folder named 猫 or 🐶 drew an empty box and
# printed "Glyph ... missing from font(s) DejaVu Sans". Figures (functions decorated with
# @figure) draw with the installed fonts of FALLBACK_FONTS behind the user's own, and
# figure_text puts a stand-in ("class 3", listed by names_key in the Markdown beside the
# figure) in place of a text that none of those fonts can draw.
FALLBACK_FONTS = ("Noto Sans CJK JP", "Noto Sans CJK SC", "Noto Sans CJK TC", "Noto Sans CJK KR", "Source Han Sans",
                  "WenQuanYi Zen Hei", "WenQuanYi Micro Hei", "Droid Sans Fallback", "Microsoft YaHei", "SimHei",
                  "Yu Gothic", "MS Gothic", "Malgun Gothic", "PingFang SC", "Hiragino Sans", "Arial Unicode MS",
                  "Noto Sans", "Noto Sans Arabic", "Noto Sans Hebrew", "Noto Sans Devanagari", "Noto Sans Thai",
                  "Noto Emoji", "Symbola", "STIXGeneral")  # STIX ships with matplotlib: symbols, letterlike forms
_STAND_INS: dict[str, str] = {}  # text -> stand-in, since names_key last listed them


def _font_file(family: str) -> str | None:
    import logging
    from matplotlib import font_manager
    logger = logging.getLogger("matplotlib.font_manager")
    level = logger.level
    logger.setLevel(logging.ERROR)  # "findfont: Font family ... not found" of a user's family that is not installed
    try:
        return font_manager.findfont(font_manager.FontProperties(family=[family]), fallback_to_default=False)
    except ValueError:
        return None
    finally:
        logger.setLevel(level)


@functools.lru_cache(maxsize=65536)
def _has_glyph(path: str, char: str) -> bool:
    from matplotlib import font_manager
    try:
        return font_manager.get_font(path).get_char_index(ord(char)) != 0
    except (OSError, RuntimeError, ValueError):
        return False


@functools.lru_cache(maxsize=1)
def _installed_fallbacks() -> tuple[str, ...]:
    from matplotlib import font_manager
    names = {f.name for f in font_manager.fontManager.ttflist}
    return tuple(n for n in FALLBACK_FONTS if n in names)


def _families() -> list[str]:
    """``font.family`` and behind it the installed fallback fonts: what a figure draws with."""
    import matplotlib
    own = list(matplotlib.rcParams["font.family"])
    return own + [f for f in _installed_fallbacks() if f not in own]


def figure_text(text: str, kind: str = "name", stand_in: str | None = None) -> str:
    """``text`` (a class name, a method name: the user's) as a figure shows it: literally
    ('$' is no mathtext); where no font of the figure has all its glyphs, ``stand_in``
    (default "KIND N"), which :func:`names_key` lists; a leading "_" behind an invisible
    character (a legend drops labels that start with "_"). Idempotent: figure functions apply
    it to the labels they are given, which callers may have passed through it already."""
    import re
    text = str(text)
    if not text.isascii():
        files = [p for p in map(_font_file, _families()) if p]
        if not all(c == "\n" or any(_has_glyph(p, c) for p in files) for c in set(text)):
            if text not in _STAND_INS:
                n = sum(s.startswith(f"{kind} ") for s in _STAND_INS.values()) + 1
                _STAND_INS[text] = stand_in or f"{kind} {n}"
            return _STAND_INS[text]
    text = re.sub(r"(?<!\\)\$", r"\\$", text)
    # matplotlib leaves out of a legend every label starting with "_" (its mark for artists not
    # to list): a method named _mine had no legend entry. An invisible first character keeps it.
    return _legend_safe_prefix() + text if text.startswith("_") else text


def _legend_safe_prefix() -> str:
    """A zero-width space where a font of the figure draws one (DejaVu Sans, matplotlib's
    default, does), else a plain space: what :func:`figure_text` puts before a leading "_"."""
    files = [p for p in map(_font_file, _families()) if p]
    return "\u200b" if any(_has_glyph(p, "\u200b") for p in files) else " "


def class_label(classes: list[str], index: int) -> str:
    """Class ``index``'s name for a figure (:func:`figure_text`), "class INDEX" where it cannot be drawn."""
    return figure_text(classes[index], stand_in=f"class {index}")


def names_key() -> str:
    """Markdown naming what the figures drawn since the last call showed as stand-ins
    ('' when none); forgets them."""
    if not _STAND_INS:
        return ""
    pairs = "; ".join(f"{s} = {_code(t)}" for t, s in _STAND_INS.items())
    _STAND_INS.clear()
    return f"No installed font has every character of some names, so the figures show them as: {pairs}."


def _code(text: str) -> str:
    text = " ".join(text.splitlines())
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def figure(draw):
    """Decorator of a function that draws a figure: it draws with the installed fallback
    fonts behind ``font.family`` (the caller's rcParams are left as they were)."""
    @functools.wraps(draw)
    def drawn(*args, **kwargs):
        with _plt().rc_context({"font.family": _families()}):
            return draw(*args, **kwargs)
    return drawn


# While write_report runs, every table and figure is also kept for CSV/LaTeX and the
# extra figure formats; outside it (the demo, a caller's own plots) nothing is collected.
_REPORT: dict | None = None


class Shown(str):
    """A table cell shown as formatted text (``"< 0.001"``, ``"[-0.54, +3.13]"``, ``"2.19x"``)
    that keeps the figures it shows at full precision, ``exact`` (a number, or a text of
    numbers), for the CSV: formatted strings alone gave spreadsheets rounded p-values and
    ``"< 0.001"`` where the CSV promises full precision."""

    exact: object  # a number, a text, or {part: number} for a cell of several (table_csv: a column each)

    def __new__(cls, text: str, exact):
        cell = super().__new__(cls, text)
        cell.exact = exact
        return cell


def shown(value, spec: str, suffix: str = "") -> Shown:
    """``value`` formatted by ``spec`` (and ``suffix``) for the eye, exact in the CSV."""
    return Shown(format(value, spec) + suffix, value)


# ---------------------------------------------------------------- accuracy intervals
def accuracy_interval(d: dict) -> tuple[float, float, bool]:
    """``d``'s 95% interval (``ci_low``, ``ci_high``) as a table or plot shows an accuracy's:
    clipped to [0, 100] (a t-interval of few runs ran to 112.84%), and whether it was. The
    results files keep the t-interval itself."""
    low, high = d.get("ci_low"), d.get("ci_high")
    if low is None or high is None or low != low or high != high:  # one run: no interval (NaN, null in JSON)
        return low, high, False
    return max(low, 0.0), min(high, 100.0), low < 0.0 or high > 100.0


def interval_note(n: int, clipped: bool, t_crit: float | None = None) -> str:
    """The footnote of a table or plot of accuracy intervals: that they were clipped, and
    that a few runs' t-interval is wide by construction ('' when neither applies)."""
    notes = []
    if clipped:
        notes.append("95% intervals of accuracies are clipped to [0, 100] (the t-interval itself, kept in the "
                     "results file, runs past it)")
    if 2 <= n <= 3:
        from scipy import stats as sps
        t = t_crit if t_crit and t_crit == t_crit else float(sps.t.ppf(0.975, n - 1))
        notes.append(f"with {n} runs the t critical value is {t:.1f}, so each interval is wide "
                     f"(mean +/- {t:.1f} standard errors)")
    return ("Note: " + "; ".join(notes) + ".") if notes else ""


# ---------------------------------------------------------------- an experiment's recipe
# Options of the run config the recipe line leaves out: the section names them already (data,
# model, epochs, seed), the experiment sets them per run (subset), or they change speed or
# bookkeeping, not what is learned.
RECIPE_SKIP = frozenset({
    "data", "model", "teacher", "teacher_model", "store", "method", "epochs", "seed", "subset", "subset_seed",
    "device", "threads", "log", "log_every", "eval_batch_size", "stream", "optimizer_impl", "channels_last",
    "compile", "check_images", "check_steps", "verify_store", "chunk_size", "ig_batch", "sync_bn"})


def recipe(config: dict, methods: list[str], searched=()) -> dict:
    """What the methods of an experiment trained with, from its resolved config (``KIND.yaml``):
    ``shared``, the run options that differ from igkd's defaults, and ``methods``, each
    method's own part options (T, alpha of kd; p, blend of the overlay...). ``searched``
    options (a search's space) are left out of both. A "kd +1.67" could not be read without
    them."""
    from dataclasses import MISSING, fields
    from .config import DistillConfig, PrecomputeConfig, TrainConfig
    from .distill.parts import config_fields, parse_method
    own = set(config_fields())
    parsed = {m: parse_method(m) for m in methods}
    # the map options (ig_steps...) matter only to methods that read teacher maps
    maps_only = {f.name for f in fields(PrecomputeConfig)} - {f.name for f in fields(TrainConfig)}
    maps = any(p.needs_maps for p in parsed.values())
    shared = {}
    for f in fields(DistillConfig):
        name = f.name
        if (name in own or name in RECIPE_SKIP or name in searched or name not in config
                or (name in maps_only and not maps) or f.default is MISSING):
            continue
        if config[name] != f.default:
            shared[name] = config[name]
    per_method = {}
    for m, method in parsed.items():
        opts = {}
        for part in method.parts:
            for name, f in part.fields.items():
                if name in config and name not in searched and not (isinstance(f.default, bool)
                                                                    and config[name] == f.default):
                    opts[name] = config[name]  # a switch at its default (kd_standardize false) says nothing
        per_method[m] = opts
    return {"shared": shared, "methods": per_method}


def saved_recipe(run_dir: Path, kind: str, result: dict, methods: list[str], searched=()) -> dict | None:
    """``result``'s recipe, or for results written before they kept one, the recipe of the
    ``KIND.yaml`` beside them (None when that is gone or no longer parses)."""
    if isinstance(result.get("recipe"), dict):
        return result["recipe"]
    import yaml
    try:
        config = yaml.safe_load((run_dir / f"{kind}.yaml").read_text(encoding="utf-8"))
        return recipe(config, methods, searched) if isinstance(config, dict) else None
    except Exception:  # noqa: BLE001 - an old or foreign file: the section goes without the line
        return None


def recipe_line(rec: dict | None) -> str:
    """``rec`` in one paragraph: 'Recipe: batch_size=16, lr=0.01 (others at igkd's defaults);
    kd: T=2.5, alpha=0.5; kd+ig: as kd + p=0.25, blend=0.5' ('' without one)."""
    if not rec:
        return ""

    def value(v) -> str:
        return f"{v:g}" if isinstance(v, float) else str(v)

    def listed(opts: dict) -> str:
        return ", ".join(f"{k}={value(v)}" for k, v in opts.items())
    shared = rec.get("shared") or {}
    text = ("**Recipe**: " + (f"{listed(shared)} (other options at igkd's defaults)" if shared
                              else "igkd's default options"))
    seen: list[tuple[str, dict]] = []
    methods = []
    for m, opts in (rec.get("methods") or {}).items():
        if not opts:
            methods.append(f"{m}: no options of its own" if m != "student" else "student: cross-entropy alone")
            continue
        # a method that adds parts to an earlier one says only what it adds ("kd+ig: as kd + p=...")
        like = max((s for s in seen if s[1].items() <= opts.items()), key=lambda s: len(s[1]), default=None)
        if like:
            extra = {k: v for k, v in opts.items() if k not in like[1]}
            methods.append(f"{m}: as {like[0]}" + (f" + {listed(extra)}" if extra else ""))
        else:
            methods.append(f"{m}: {listed(opts)}")
        seen.append((m, opts))
    return text + ("; " + "; ".join(methods) if methods else "") + "."


def _cell(v) -> str:
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v)
    if isinstance(v, float):
        return "n/a" if v != v else f"{v:.2f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def markdown_table(header: list[str], rows: list[list]) -> str:
    if _REPORT is not None:
        _REPORT["tables"].append((_REPORT["section"], header, rows))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def table_csv(header: list[str], rows: list[list]) -> str:
    """The table as CSV, numbers at full precision (for spreadsheets and scripts)."""
    import csv
    import io
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    # A cell showing several numbers ("91.67 [70.49, 100.00]", "9.42 / 16.36") keeps them as a
    # dict in Shown.exact: one numeric column each ("HEADER: mean", "HEADER: ci_low", ...), where
    # one text cell of them was no number to a spreadsheet. A plain number in such a column (the
    # teacher's single accuracy) goes under its first part.
    parts = [list(dict.fromkeys(k for row in rows if isinstance(row[i], Shown) and isinstance(row[i].exact, dict)
                                for k in row[i].exact)) for i in range(len(header))]
    w.writerow([f"{h}: {k}" if keys else h for h, keys in zip(header, parts) for k in (keys or [None])])

    def cells(v, keys: list[str]) -> list:
        exact = v.exact if isinstance(v, Shown) else v
        if not keys:
            return ["" if exact is None else exact]
        if isinstance(exact, dict):
            return [exact.get(k, "") for k in keys]
        return ["" if exact in (None, "") else exact] + [""] * (len(keys) - 1)
    w.writerows([[c for v, keys in zip(row, parts) for c in cells(v, keys)] for row in rows])
    return buf.getvalue()


def table_latex(header: list[str], rows: list[list]) -> str:
    """The table as a LaTeX tabular (booktabs rules), numbers as in the Markdown."""
    # <, > and | are no text characters in LaTeX's default OT1 font encoding: "< 0.001" printed "¡ 0.001"
    special = {"\\": "\\textbackslash{}", "&": "\\&", "%": "\\%", "_": "\\_", "#": "\\#", "$": "\\$",
               "{": "\\{", "}": "\\}", "~": "\\textasciitilde{}", "^": "\\textasciicircum{}",
               "<": "\\textless{}", ">": "\\textgreater{}", "|": "\\textbar{}"}

    def esc(text: str) -> str:  # one pass: a replacement's own braces must not be escaped again
        return "".join(special.get(c, c) for c in text)
    def numeric(v) -> bool:
        v = v.exact if isinstance(v, Shown) else v
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    align = "".join("r" if rows and numeric(rows[0][i]) else "l" for i in range(len(header)))
    lines = [f"\\begin{{tabular}}{{{align}}}", "\\toprule", " & ".join(esc(h) for h in header) + " \\\\",
             "\\midrule"]
    lines += [" & ".join(esc(_cell(v)) for v in row) + " \\\\" for row in rows]
    return "\n".join(lines + ["\\bottomrule", "\\end{tabular}"]) + "\n"


def overlay_examples(images: torch.Tensor, maps: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """The overlay the student would see with p = 1 (uint8 images, maps N x H x W)."""
    gen = torch.Generator().manual_seed(seed)
    return ig_overlay(images.float() / 255, maps.float(), 1.0, gen)


@figure
def gallery(path: str | Path, images: torch.Tensor, maps: torch.Tensor, labels: list[str],
            title: str = "teacher IG maps and overlays") -> Path:
    """A PNG with one column per image: the image, its IG map (sum_c |IG|), its overlay."""
    plt = _plt()
    n = len(images)
    over = overlay_examples(images, maps)
    # at least 5.5 inches: with two or three classes (1.3 inches each) the title ran off both sides
    width = max(1.3 * n, 5.5)
    fig, axes = plt.subplots(3, n, figsize=(width, 4.4), squeeze=False)
    gray = images.shape[1] == 1
    for j in range(n):
        img = images[j].permute(1, 2, 0).numpy()
        ov = over[j].permute(1, 2, 0).clamp(0, 1).numpy()
        panels = [(img[..., 0] if gray else img, "gray" if gray else None),
                  (maps[j].float().numpy(), "inferno"),
                  (ov[..., 0] if gray else ov, "gray" if gray else None)]
        for i, (data, cmap) in enumerate(panels):
            ax = axes[i, j]
            ax.imshow(data, cmap=cmap, vmin=0 if cmap == "gray" else None, vmax=(255 if data.dtype == np.uint8
                      else 1) if cmap == "gray" else None, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0, j].set_title(figure_text(labels[j]), fontsize=8)
    for i, name in enumerate(["image", "IG map", "overlay"]):
        axes[i, 0].set_ylabel(name, fontsize=9)
    # holds an attribution plug-in's description, of any length: wrapped to the figure's width
    # (about 13 characters of 10-point text per inch)
    import textwrap
    lines = textwrap.wrap(figure_text(title, "title"), max(20, int(width * 13)))
    fig.suptitle("\n".join(lines), fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


@figure
def training_curves(path: str | Path, histories: dict[str, list[dict] | list[list[dict]]]) -> Path:
    """Validation accuracy and training loss per epoch: per group, the mean over its runs
    and (with two or more runs) a band of +/- one standard deviation; integer epoch ticks."""
    plt = _plt()
    from matplotlib.ticker import FixedLocator, MaxNLocator
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    drawn: dict[object, set[int]] = {a: set(), b: set()}  # epochs with a value, per panel
    for name, runs in histories.items():
        runs = [runs] if runs and isinstance(runs[0], dict) else runs
        for ax, key in ((a, "val_accuracy"), (b, "loss")):
            series = [{r["epoch"]: r.get(key) for r in h} for h in runs]
            epochs = sorted(set().union(*series))
            values = [[s[e] for s in series if s.get(e) is not None] for e in epochs]
            keep = [i for i, v in enumerate(values) if v]
            ep = [epochs[i] for i in keep]
            drawn[ax].update(ep)
            mean = np.array([np.mean(values[i]) for i in keep])
            line, = ax.plot(ep, mean, marker="o", ms=3,
                            label=f"{figure_text(name, 'curve')} ({len(runs)} run{'s' * (len(runs) > 1)})")
            if len(runs) > 1:
                # sample sd (n - 1), as every table's; an epoch only one run reached has no band
                sd = np.array([np.std(values[i], ddof=1) if len(values[i]) > 1 else 0.0 for i in keep])
                ax.fill_between(ep, mean - sd, mean + sd, color=line.get_color(), alpha=0.15, lw=0)
    for ax, label, none in ((a, "validation accuracy (%)", "no validation accuracy: no validation split\n"
                             "(--val-fraction 0)"), (b, "training loss", "no training loss recorded")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        # MaxNLocator(integer=True) gives fractional ticks (0.945, 0.96, ...) on an axis narrower
        # than one epoch: a one-epoch run's curves had no epoch tick at all
        ax.xaxis.set_major_locator(MaxNLocator(integer=True) if len(drawn[ax]) > 1
                                   else FixedLocator(sorted(drawn[ax])))
        if not drawn[ax]:  # an empty panel with ticks round 0 (-0.045 ... 0.045) read as a plot of nothing
            ax.set_yticks([])
            ax.text(0.5, 0.5, none, ha="center", va="center", transform=ax.transAxes, fontsize=9, color="0.4")
        ax.grid(alpha=0.3)
    legend_outside(b if drawn[b] or not drawn[a] else a)  # right of the panels: one legend for both
    fig.tight_layout()
    return _save(fig, path)


@figure
def accuracy_points(path: str | Path, names: list[str], accuracies: list[float], reference: float | None = None,
                    errors: list[tuple[float, float]] | None = None, what: str = "test accuracy (%)") -> Path:
    """One point per method with its error bar (``errors``: (below, above) lengths, e.g. a
    95% CI), the teacher as a dashed line. Points, not bars: a bar's length reads as the
    value, so bars on an axis that starts near the smallest one exaggerate differences
    (1.8 points looked 25% taller in the demo), and bars from 0 hide them."""
    plt = _plt()
    names = [figure_text(n, "method") for n in names]
    fig, ax = plt.subplots(figsize=(1.1 * len(names) + 2.5, 3.2))
    x = np.arange(len(names))
    yerr = np.array(errors, dtype=float).T if errors else None
    ax.errorbar(x, accuracies, yerr=yerr, fmt="o", color="#4c72b0", capsize=4, ms=6,
                label="mean, 95% CI" if errors else "accuracy")
    for i, v in enumerate(accuracies):
        ax.annotate(f"{v:.2f}", (i, v), xytext=(8, 0), textcoords="offset points", va="center", fontsize=8)
    if reference is not None:
        lows = [v - (e[0] if errors else 0) for v, e in zip(accuracies, errors or accuracies)]
        highs = [v + (e[1] if errors else 0) for v, e in zip(accuracies, errors or accuracies)]
        note = teacher_line(ax, reference, float(np.nanmin(lows)), float(np.nanmax(highs)))
        if note:
            ax.set_title(note, fontsize=8, loc="right")
    ax.set_xticks(x, names, rotation=20 if max(map(len, names)) > 10 else 0, ha="right" if max(map(len, names)) > 10
                  else "center")
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_ylabel(what)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return _save(fig, path)


def teacher_line(ax, value: float, low: float, high: float, label: str = "teacher") -> str | None:
    """The teacher's accuracy as a dashed line; or, where drawing it would squeeze the data
    (``low`` .. ``high``) into under a third of the axis, no line and the note to show
    instead (returned, for the caller's title): a teacher 35 points above students 2 points
    apart left their differences a few pixels tall."""
    span = max(high - low, 1.0)
    if max(high, value) - min(low, value) <= 3 * span:
        ax.axhline(value, color="k", ls="--", lw=1, label=label)
        return None
    return f"{label}: {value:.2f}, {'above' if value > high else 'below'} this axis"


MARKERS = "os^Dv"  # per ten series: tab10's colours repeat from the eleventh


@figure
def condition_points(path: str | Path, conditions: list[str], points: dict[str, list[dict]],
                     what: str = "test accuracy (%)") -> Path:
    """Accuracy per condition (clean, each corruption, ...) on the x-axis, one series per
    method: the mean (``points[method][i]["mean"]``) with its 95% CI where it has one
    (``ci_low``/``ci_high`` not NaN), methods side by side within a condition."""
    plt = _plt()
    methods = list(points)
    cmap = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(1.2 * len(conditions) + 3, 3.6))
    x = np.arange(len(conditions))
    width = 0.7 / max(1, len(methods))
    for j, m in enumerate(methods):
        xs = x - 0.35 + width * (j + 0.5)
        means = np.array([p["mean"] for p in points[m]], dtype=float)
        # accuracies: the interval clipped to [0, 100], as the tables show it
        lo = np.clip(np.array([p.get("ci_low", float("nan")) for p in points[m]], dtype=float), 0.0, 100.0)
        hi = np.clip(np.array([p.get("ci_high", float("nan")) for p in points[m]], dtype=float), 0.0, 100.0)
        yerr = np.nan_to_num(np.vstack([means - lo, hi - means]), nan=0.0)
        # tab10 has ten colours: the eleventh method took the first one's, so its marker differs
        ax.errorbar(xs, means, yerr=yerr, fmt=MARKERS[j // 10 % len(MARKERS)], ms=4, capsize=2, color=cmap(j % 10),
                    label=figure_text(m, "method"))
    ax.set_xticks(x, [figure_text(c) for c in conditions], rotation=20, ha="right")
    ax.set_ylabel(what)
    ax.grid(axis="y", alpha=0.3)
    legend_outside(ax)
    fig.tight_layout()
    return _save(fig, path)


@figure
def paired_differences(path: str | Path, comparisons: list[tuple[str, list[float], dict]]) -> Path:
    """Per comparison 'a - b' (one row each): every run's paired difference as a dot, the
    mean with its 95% CI, and zero: what the paired tests are about (a difference is
    significant where its interval leaves zero). Rows, not columns: k methods make
    k (k - 1) / 2 comparisons, and a figure one column wider per comparison (24 inches at
    six methods) was shrunk by any page that showed it until its labels could not be read."""
    plt = _plt()
    n_rows = len(comparisons)
    fig, ax = plt.subplots(figsize=(7.0, 0.34 * n_rows + 1.3))
    cmap = plt.get_cmap("tab10")
    for i, (name, diffs, t) in enumerate(comparisons):
        n = len(diffs)
        ys = [i - 0.12 + (j - (n - 1) / 2) * min(0.04, 0.2 / max(1, n)) for j in range(n)]
        ax.scatter(diffs, ys, s=14, c=[cmap(j % 10) for j in range(n)], zorder=3,
                   label="runs (same colour = same run)" if i == 0 else None)
        if t.get("ci_low") is not None and t["ci_low"] == t["ci_low"]:
            ax.errorbar([t["mean_diff"]], [i + 0.22], xerr=[[t["mean_diff"] - t["ci_low"]], [t["ci_high"] - t["mean_diff"]]],
                        fmt="D", color="k", capsize=3, ms=4, label="mean, 95% CI" if i == 0 else None)
    ax.axvline(0, color="gray", lw=1)
    ax.set_yticks(range(n_rows), [figure_text(c[0], "comparison") for c in comparisons], fontsize=8)
    ax.set_ylim(n_rows - 0.5, -0.5)  # the first comparison on top, as in the table
    ax.set_xlabel("paired difference a - b (accuracy points)")
    ax.grid(axis="x", alpha=0.3)
    legend_outside(ax, above=True)
    fig.tight_layout()
    return _save(fig, path)


def legend_outside(ax, fontsize: int = 7, above: bool = False, **kwargs):
    """The legend outside the axes (right of them, or ``above``), where it covers no data:
    'best' inside the axes put it over points once a plot had many methods, and a fixed
    corner put it over the last one."""
    if above:
        return ax.legend(fontsize=fontsize, loc="lower left", bbox_to_anchor=(0, 1.01), borderaxespad=0,
                         ncol=kwargs.pop("ncol", 2), **kwargs)
    return ax.legend(fontsize=fontsize, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0, **kwargs)


FORMATS = ("png", "pdf", "svg")


def _save(fig, path: str | Path) -> Path:
    """Write ``path`` (PNG, linked from report.md) and, inside a report asked for them, the
    same figure as PDF/SVG beside it (vector formats for papers)."""
    path = Path(path)
    formats = _REPORT["formats"] if _REPORT is not None else ("png",)
    for fmt in dict.fromkeys(("png", *formats)):
        with atomic_path(path.with_suffix(f".{fmt}")) as tmp:
            fig.savefig(tmp, dpi=110, format=fmt)
    _plt().close(fig)
    return path


# ---------------------------------------------------------------- report of a folder
# ``igkd report DIR`` renders report.md from sections. A section renderer takes the folder
# and returns Markdown (writing any PNGs it links into the folder), or None when the folder
# holds nothing for it. Renderers are named "module:function" so that importing this module
# imports none of them. To add a section, append to SECTIONS, e.g.
#     SECTIONS.append(("deployment", "igkd.deploy:deployment_section"))
SECTIONS: list[tuple[str, str]] = [
    ("run", "igkd.report:run_section"),
    ("deployment", "igkd.deploy:deployment_section"),  # latency, size, export parity, audit: next to accuracy
    ("ablation", "igkd.experiments.ablation:section"),
    ("montecarlo", "igkd.experiments.montecarlo:section"),
    ("compression", "igkd.experiments.compression:section"),
    ("search", "igkd.experiments.search:section"),
    ("gallery", "igkd.report:gallery_section"),
    ("curves", "igkd.report:curves_section"),
]
MAX_CURVES = 10


def _renderer(ref):
    if callable(ref):
        return ref
    import importlib
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def write_report(run_dir: str | Path, sections: list[tuple[str, object]] | None = None,
                 formats: str | list[str] = ("png",)) -> str:
    """Render every section that has data in ``run_dir`` into ``run_dir/report.md``; return the text.

    Figures are PNG (linked from report.md) plus any other of ``formats`` (pdf, svg) beside
    them; every table is also written as ``tables/SECTION[_N].csv`` and ``.tex``."""
    global _REPORT
    from .errors import UserError
    from .fileio import writable_dir, write_text
    run_dir = Path(run_dir)
    formats = [f.strip().lower() for f in (formats.split(",") if isinstance(formats, str) else formats) if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise UserError(f"--format {','.join(bad) or '(empty)'} is not known; use a comma list of {', '.join(FORMATS)}")
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a folder; give an experiment folder (igkd experiment ... --out DIR) "
                        "or a run folder (igkd distill --out DIR)")
    # report.md, the figures and tables/ go into the folder itself: a read-only one is named
    # now, not by the temporary file of the first figure
    writable_dir(run_dir, "the folder", fix="make it writable, or copy it and report the copy")
    check_results(run_dir)
    parts = []
    _REPORT = {"formats": formats, "tables": [], "section": ""}
    names_key()  # stand-ins of figures drawn before are not this report's
    try:
        for name, ref in sections or SECTIONS:
            _REPORT["section"] = name
            try:
                text = _renderer(ref)(run_dir)
            except (KeyError, IndexError, TypeError, AttributeError, ValueError) as e:
                # well-formed JSON of another shape (a file another tool wrote under the same
                # name, or one edited by hand): the section cannot read it. One line naming the
                # file and what was missing, not a traceback from deep in the renderer
                what = SECTION_FILES.get(name, "its results files")
                raise UserError(f"cannot render the {name} section of {run_dir}: {what} is not as igkd writes it "
                                f"({type(e).__name__}: {e}); move the file out of the folder or rerun the command "
                                "that writes it") from None
            key = names_key()  # what its figures show as stand-ins, where the section did not list it
            if text:
                parts.append(text.rstrip() + "\n" + (f"\n{key}\n" if key else ""))
        tables = _REPORT["tables"]
    finally:
        _REPORT = None
    seen: dict[str, int] = {}
    for section, header, rows in tables:
        seen[section] = seen.get(section, 0) + 1
        stem = section + (f"_{seen[section]}" if seen[section] > 1 else "")
        write_text(run_dir / "tables" / f"{stem}.csv", table_csv(header, rows))
        write_text(run_dir / "tables" / f"{stem}.tex", table_latex(header, rows))
    kinds = kinds_of(run_dir)
    unfinished = unfinished_experiments(run_dir, kinds)
    if not parts and not unfinished:
        raise UserError(f"{run_dir} holds no experiment results (ablation.json, montecarlo.json, ...), no run "
                        "(summary.json) and no latency.json, export.json or audit.json; run 'igkd experiment', "
                        "'igkd train' or 'igkd distill' into it first")
    # the folder's own name: 'igkd report .' (or '..') titled the report with an empty name
    title = run_dir.resolve().name or str(run_dir.resolve())
    text = (f"# igkd report: {title}\n\n" + (f"Experiments in this folder: {', '.join(kinds)}.\n\n" if kinds
                                              else "") + (unfinished + "\n\n" if unfinished else "")
            + "\n".join(parts))
    write_text(run_dir / "report.md", text)
    return text


def kinds_of(run_dir: Path) -> list[str]:
    """The experiments ``experiment.json`` says ran in ``run_dir`` (none for other folders)."""
    kinds = (read_json(run_dir / "experiment.json") or {}).get("kinds")
    return [str(k) for k in kinds] if isinstance(kinds, list) else []


def unfinished_experiments(run_dir: Path, kinds: list[str]) -> str:
    """What did not finish, in words: an experiment is marked in experiment.json when it starts
    but writes ``KIND.json`` only once all its runs are done, so a killed one showed nothing but
    its runs' curves under "Experiments in this folder: montecarlo", and runs of a later
    invocation that did not finish (--runs raised, a method added) sat unmentioned beside the
    results of the last one that did. Counts the runs ``runs/*/run.json`` tag with each
    experiment and no results file lists; empty when everything finished."""
    kinds = [k for k in kinds if k in CURVE_KINDS]  # a search's trials are its own section's
    if not kinds or not (run_dir / "runs").is_dir():
        return ""
    results = {k: read_json(run_dir / f"{k}.json") for k in CURVE_KINDS}
    listed = {row.get("run") for r in results.values() if r and isinstance(r.get("runs"), list)
              for row in r["runs"] if isinstance(row, dict)}
    counts: dict[str, list[int]] = {k: [0, 0] for k in kinds}  # finished, unfinished
    for record in sorted((run_dir / "runs").glob("*/run.json")):
        kind = (read_json(record) or {}).get("experiment")
        if kind in counts and f"runs/{record.parent.name}" not in listed:
            counts[kind][not (record.parent / "summary.json").exists()] += 1
    notes = []
    for kind in kinds:
        done, open_ = counts[kind]
        runs = (f"{done} finished and {open_} unfinished run{'s' * (open_ != 1)}" if open_
                else f"{done} finished run{'s' * (done != 1)}")
        if results[kind] is None:
            notes.append(f"**{kind} has not finished**: no {kind}.json yet, so no {kind} results; runs/ holds "
                         f"{runs} of it. Its command, run again, reuses the finished runs and resumes the others.")
        elif done or open_:
            notes.append(f"runs/ also holds {runs} of {kind} that {kind}.json does not list (other settings, "
                         f"or a later {kind} that has not finished): the {kind} section shows the runs "
                         f"{kind}.json lists.")
    return "\n\n".join(notes)


def terminal_summary(markdown: str) -> str:
    """The headings and tables of a report, for the terminal."""
    out, previous = [], ""
    for line in markdown.splitlines():
        if line.startswith("#") or (line.startswith("|") and not previous.startswith("|")):
            if out and out[-1] != "":
                out.append("")
        if line.startswith(("#", "|")):
            out.append(line)
        previous = line
    # a heading with no table under it (before the next heading of its level or above) printed
    # as an empty section: "### Export" (its text is prose) read as "nothing was exported"
    kept = []
    for i, line in enumerate(out):
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            rest = out[i + 1:]
            end = next((j for j, x in enumerate(rest)
                        if x.startswith("#") and len(x) - len(x.lstrip("#")) <= level), len(rest))
            if not any(x.startswith("|") for x in rest[:end]):
                if kept and kept[-1] == "":
                    kept.pop()
                continue
        kept.append(line)
    return "\n".join(kept).strip("\n")


def _not_igkd(path: Path, why: str):
    """The one-line error for a results file igkd did not write (or that was damaged since)."""
    from .errors import UserError
    return UserError(f"{path} {why}, so it is no results file igkd wrote (or it is damaged); move it out of the "
                     "folder or rerun the command that writes it")


def read_json(path: Path) -> dict | None:
    """A results file of a run folder, or None when it is not there; a file that is not a
    JSON object (a foreign or damaged one) is a one-line UserError naming it, where
    json's own errors named no file and a list crashed later on ``.get``."""
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise _not_igkd(path, f"is not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise _not_igkd(path, f"is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(doc, dict):
        raise _not_igkd(path, f"holds a JSON {type(doc).__name__}, not an object")
    return doc


def read_history(path: Path) -> list[dict]:
    """``metrics.jsonl`` as the trainer writes it, one JSON object with an 'epoch' per line,
    or a one-line UserError naming the file and line. Read once per report: the check
    before rendering and the curves share the parse (cached on size and mtime).

    A last line with no newline that does not parse is a row the trainer is appending
    right now (a report run while an experiment trains): it is left out, not an error."""
    if not path.exists():
        return []
    st = path.stat()
    return [dict(r) for r in _parse_history(str(path), st.st_size, st.st_mtime_ns)]


@functools.lru_cache(maxsize=256)
def _parse_history(path_str: str, size: int, mtime_ns: int) -> tuple:
    path = Path(path_str)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise _not_igkd(path, f"is not UTF-8 text (byte {e.start})") from None
    lines = text.splitlines()
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines) and not text.endswith("\n"):
                break  # the row being appended
            raise _not_igkd(path, f"line {n} is not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("epoch"), int) or isinstance(row["epoch"], bool):
            raise _not_igkd(path, f"line {n} is not an epoch record (a JSON object with an integer 'epoch')")
        rows.append(row)
    return tuple(rows)


# The results files of the sections: checked before anything is rendered, so a damaged one
# is named in one line and no figure of the other sections is written first.
RESULTS_FILES = ("summary.json", "experiment.json", "ablation.json", "montecarlo.json", "compression.json",
                 "search.json")
# the file whose content a section renders, for the error when it holds something else
SECTION_FILES = {"run": "summary.json", "ablation": "ablation.json", "montecarlo": "montecarlo.json",
                 "compression": "compression.json", "search": "search.json",
                 "deployment": "latency.json, export.json or audit.json"}


def check_results(run_dir: Path) -> None:
    """Every results file and training history of ``run_dir`` that a section reads, parsed;
    the first foreign or damaged one is a one-line UserError naming it."""
    for name in RESULTS_FILES:
        read_json(run_dir / name)
    read_history(run_dir / "metrics.jsonl")
    if (run_dir / "runs").is_dir():
        for d in sorted((run_dir / "runs").iterdir()):
            if d.is_dir():
                read_json(d / "run.json")
                read_history(d / "metrics.jsonl")


RUN_KEYS = ("model", "params", "best_epoch", "val_accuracy", "test_accuracy", "dataset", "epochs")


def run_config(run_dir: Path) -> dict:
    """The config.yaml a run writes when it starts ({} when absent or unreadable: it only
    names an unfinished run's method and epoch budget)."""
    import yaml
    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def _last_epoch(history: list[dict]) -> int:
    return max((r["epoch"] for r in history), default=0)


def run_section(run_dir: Path) -> str | None:
    """A single training run folder (igkd train / distill): its summary, or what an unfinished
    run got through (it has no summary.json: the report showed its curves and nothing else)."""
    s = read_json(run_dir / "summary.json")
    if s is None:
        if not ((run_dir / "metrics.jsonl").exists() or (run_dir / "last.pt").exists()):
            return None
        cfg, hist = run_config(run_dir), read_history(run_dir / "metrics.jsonl")
        resume = ("its command with --resume continues it from last.pt" if (run_dir / "last.pt").exists()
                  else "it has no last.pt to resume from")
        return (f"## Run\n\n**Not finished**: no summary.json, so no test accuracy; epochs logged in metrics.jsonl: "
                f"{_last_epoch(hist)} of {cfg.get('epochs', '?')}; {resume}.\n")
    missing = [k for k in RUN_KEYS if k not in s]
    if missing:
        raise _not_igkd(run_dir / "summary.json", f"has no {', '.join(repr(k) for k in missing)}")
    rows = [[s.get("method", "train"), s["model"], s["params"], s["best_epoch"], s["val_accuracy"],
             s["test_accuracy"]]]
    comp = f" Compression {s['compression']:.2f}x against the teacher." if s.get("compression") else ""
    return (f"## Run\n\nDataset `{s['dataset']}`, {s['epochs']} epoch{'s' * (s['epochs'] != 1)}.{comp}\n\n"
            + markdown_table(["method", "model", "params", "best epoch", "val acc (%)", "test acc (%)"], rows) + "\n")


def gallery_section(run_dir: Path) -> str | None:
    """Images, the teacher's IG maps and the overlays, from the store an experiment used."""
    from .data import load_dataset
    from .store import open_store
    ctx = None
    for kind in ("ablation", "montecarlo", "compression", "search"):
        result = read_json(run_dir / f"{kind}.json")
        if result and result.get("store"):
            ctx = result
            break
    if ctx is None:
        return None
    maps = ctx.get("maps")
    if maps is None:  # results written before the maps were described by their attribution: IG's settings
        ig = ctx.get("ig") or {}
        maps = {"attribution": "ig", "description": f"IG {ig.get('method')} x {ig.get('steps')} steps, baseline "
                f"{ig.get('baseline')}", "completeness_delta": ig.get("completeness_delta")}
    d = maps.get("completeness_delta") or {}
    dataset, why = None, "The map store is gone from this machine; re-run the experiment to rebuild it."
    if (Path(ctx["store"]) / "manifest.json").exists():
        from .errors import UserError
        try:
            dataset = load_dataset(ctx["data"])
            dataset.require_train("the gallery shows training images")  # train/ removed since the run
        except UserError as e:
            # a relative folder (imagefolder:data/x) is the experiment's working directory's: a report
            # run from elsewhere failed as a whole, naming a dataset folder, over its one illustration
            why = (f"The images of `{ctx['data']}` cannot be read from here ({e}); run igkd report from the "
                   "folder the experiment ran in to draw the maps.")
    if dataset is not None:
        store = open_store(ctx["store"])
        train = dataset.train
        pick = [int((train.labels == c).nonzero()[0]) for c in range(dataset.num_classes) if (train.labels == c).any()]
        which = (f"each of the first 10 of the {len(pick)} classes" if len(pick) > 10  # "each class" over 10 of 20
                 else "each class")
        pick = torch.tensor(pick[:10])
        gallery(run_dir / "gallery.png", train.images[pick],
                torch.from_numpy(store.maps[pick.numpy()].astype("float32")),
                [class_label(dataset.classes, int(train.labels[i])) for i in pick],
                title=f"teacher maps ({maps['description']}) and the overlays students see")
        d = d or store.manifest.get("completeness_delta") or {}  # none without completeness
    elif not (run_dir / "gallery.png").exists():
        # The store is a cache (another machine's, or cleared), or the images are not found from
        # here: the maps cannot be drawn.
        return f"## Teacher maps\n\n{why}\n"
    else:  # a committed result keeps the gallery drawn when its store existed; its text comes from the record
        which = "each class"
    err = (f" Completeness error |sum IG - (F(x) - F(x'))| / |F(x) - F(x')|: median "
           f"{100 * d['median_relative']:.1f}%, 90th percentile {100 * d['p90_relative']:.1f}%." if d else "")
    return (f"## Teacher maps\n\nFirst training image of {which}, its map ({maps['description']}; sum over "
            f"channels of the absolute attribution) and the overlay (p = 1).{err}\n\n![gallery](gallery.png)\n"
            + (f"\n{key}\n" if (key := names_key()) else ""))


CURVE_KINDS = ("ablation", "montecarlo", "compression")  # search trials: one curve each would be noise


def curve_groups(run_dir: Path) -> dict[str, list[list[dict]]]:
    """Histories of the runs in ``run_dir``, grouped by experiment, method, student and epoch
    budget: only runs of one kind are averaged (one-epoch ablation runs were averaged with
    three-epoch Monte Carlo runs, and every curve cut to the shortest).

    An experiment's runs are those its ``KIND.json`` lists: ``runs/`` also holds runs of
    earlier settings (an ablation rerun with another lr) and search trials, which a glob of
    ``runs/*`` averaged into the experiment's curves. Search trials are left out (the search
    section shows them). Only a folder without results (an experiment stopped before its
    first ``KIND.json``) shows every run it holds."""
    groups: dict[str, list[list[dict]]] = {}

    def history(d: Path) -> list[dict]:
        return read_history(d / "metrics.jsonl")

    if (run_dir / "metrics.jsonl").exists():
        summary = read_json(run_dir / "summary.json")
        if summary is None:  # unfinished: "run (? ep)" said neither that nor how far it got
            cfg, hist = run_config(run_dir), history(run_dir)
            name = f"{cfg.get('method', 'run')} (unfinished: {_last_epoch(hist)} of {cfg.get('epochs', '?')} ep)"
        else:
            name = f"{summary.get('method', 'run')} ({summary.get('epochs', '?')} ep)"
        groups[name] = [history(run_dir)]
    listed: list[tuple[str | None, Path]] = []
    results = {kind: read_json(run_dir / f"{kind}.json") for kind in (*CURVE_KINDS, "search")}
    if any(results.values()):
        for kind in CURVE_KINDS:
            runs = (results[kind] or {}).get("runs") or []
            listed += [(kind, run_dir / r) for r in dict.fromkeys(row["run"] for row in runs if row.get("run"))]
    elif (run_dir / "runs").is_dir():
        listed = [(None, p.parent) for p in sorted((run_dir / "runs").glob("*/run.json"))]
    for experiment, d in listed:
        if not (d / "metrics.jsonl").exists():
            continue
        info = read_json(d / "run.json") or {}
        tags, cfg = info.get("tags", {}), info.get("config", {})
        if experiment is None and ("T" in tags or info.get("experiment") == "search"):
            continue
        experiment = experiment or info.get("experiment") or "runs"
        name = (f"{experiment}: {tags.get('method', d.name)}" + (f" {tags['model']}" if "model" in tags else "")
                + f" ({cfg.get('epochs', '?')} ep)")
        hist = history(d)
        if hist:
            groups.setdefault(name, []).append(hist)
    return groups


def curves_section(run_dir: Path) -> str | None:
    """Validation accuracy and training loss per epoch: mean and spread of each group of runs."""
    groups = curve_groups(run_dir)
    if not groups:
        return None
    names = list(groups)[:MAX_CURVES]
    training_curves(run_dir / "curves.png", {n: groups[n] for n in names})
    counts = ", ".join(f"{n} ({len(groups[n])})" for n in names)
    more = f" ({len(groups) - len(names)} more groups not drawn)" if len(groups) > len(names) else ""
    return (f"## Training curves\n\nMean over the runs of each experiment, method and epoch budget (count in "
            f"brackets), band: +/- one standard deviation: {counts}{more}.\n\n![curves](curves.png)\n")
