"""``igkd experiment compression``: accuracy against compression factor, MACs and latency.

Students are the ``sweep_base`` spec with its family's depth knob (or the one
``sweep_knobs`` names) set to each of
``depths`` (for MobileNetV2 the truncation ``drop=K``: the paper's sweep, K = 3 ... 17,
2.2x to 1122x for the CIFAR teacher; ``depth`` for ResNets and WRNs), with its width knob
set to each of ``widths`` (``width``, or a WRN's ``k``), and any ``students`` given as specs
of any family. Truncation removes parameters but few multiply-adds (the
removed blocks run at low resolution); width multipliers cut both, so the sweep reports
parameters, MACs (:func:`igkd.evaluate.cost.count_macs`) and measured CPU latency
(:func:`igkd.evaluate.cost.measure_latency`: warm-up, repeated calls, median and p10/p90,
fixed thread count) side by side. Every student x method is one run, same seed and budget.
Cost is measured on the bare network (no preprocessing), the same for every method.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from ..data import load_dataset
from ..evaluate.cost import count_macs, measure_latency
from ..errors import UserError
from ..models import bare, build_model, count_parameters, family_of
from ..models.user import keyword_names
from ..progress import log
from ..config import to_dict
from ..report import (Shown, _plt, _save, figure, figure_text, legend_outside, markdown_table, read_json, recipe,
                      recipe_line, saved_recipe, shown)
from ..spec import Spec, canonical_spec, parse_spec, split_specs
from .common import methods_of, save_results, start
from .config import ExperimentConfig, distill_config, entry_point, split_list
from .runs import Job, run_jobs, run_record


def student_specs(cfg: ExperimentConfig) -> list[tuple[str, float, str]]:
    """(axis, value, model spec) of every student of the sweep: depth students, width
    students, then the explicit ones (axis "spec", value = their position)."""
    base = parse_spec(cfg.sweep_base, "model spec")
    knobs = sweep_knobs(base, cfg.sweep_knobs)
    out = []
    for axis, flag, cast in (("depth", "--depths", int), ("width", "--widths", float)):
        values = split_list(getattr(cfg, flag[2:]), cast, flag)
        knob = knobs[axis]
        if values and knob is None:
            raise UserError(f"model '{base.kind}' has no {axis} knob to sweep; name the option {flag} sets with "
                            f"--sweep-knobs {axis}=NAME, or give students with --students and empty {flag}")
        for v in values:
            out.append((axis, v, str(Spec(base.kind, base.arg, {**base.options, knob: f"{v:g}"}))))
    out += [("spec", i, s) for i, s in enumerate(split_specs(cfg.students, "--students")) if s]
    if not out:
        raise UserError("the sweep is empty; give --depths, --widths and/or --students")
    return _once(out)


def sweep_knobs(base: Spec, text: str) -> dict[str, str | None]:
    """``{"depth": option, "width": option}`` that ``--depths`` and ``--widths`` set on ``base``:
    ``text`` ('depth=NAME,width=NAME', either alone) over its family's own knobs. A py: factory
    declares none (igkd cannot know its keyword arguments), so its user names them."""
    family = family_of(base)
    knobs = {"depth": family.depth_knob, "width": family.width_knob}
    for item in filter(None, (t.strip() for t in text.split(","))):
        axis, eq, name = (t.strip() for t in item.partition("="))
        if axis not in knobs or not eq or not name.isidentifier():
            raise UserError(f"--sweep-knobs '{text}' is not 'depth=NAME,width=NAME'; name, for depth and/or width, "
                            "the keyword option of --sweep-base that the values set (e.g. depth=blocks)")
        if base.kind == "py" and (names := keyword_names(base)) is not None and name not in names:
            # it was blamed on the factory ("make cannot be called with ..., blocks"), not on this option
            raise UserError(f"--sweep-knobs {axis}={name}: {base.arg} takes no keyword '{name}' (it takes "
                            f"{', '.join(sorted(names))}); name the one the {axis} values set")
        knobs[axis] = name
    return knobs


def _once(students: list[tuple[str, float, str]]) -> list[tuple[str, float, str]]:
    """The first of students that name one model (the same spec up to option order: --depths 5
    beside --students 'mobilenetv2:drop=5', or a value listed twice). Each was a row of the
    table and a point of the curves, twice, for one trained run."""
    seen: dict = {}
    for axis, value, spec in students:
        key = canonical_spec(spec)
        if key in seen:
            print(f"igkd: warning: student {spec} ({axis} {value:g}) is the same model as {seen[key][2]} "
                  f"({seen[key][0]} {seen[key][1]:g}); it is swept once", file=sys.stderr, flush=True)
        else:
            seen[key] = (axis, value, spec)
    return list(seen.values())


def cost(net, shape: tuple[int, int, int], cfg: ExperimentConfig) -> dict:
    c = {"params": count_parameters(net), "macs": count_macs(net, shape)}
    if cfg.latency:
        lat = measure_latency(net, shape, batch=cfg.latency_batch, threads=cfg.latency_threads,
                              min_time=cfg.latency_min_time)
        c["latency"] = {k: lat[k] for k in ("median_ms", "p10_ms", "p90_ms", "images_per_s", "reps", "threads",
                                            "batch")}
    return c


@entry_point
def run_compression(cfg: ExperimentConfig, out: str | Path, quiet: bool = False) -> dict:
    """Distill every method into students of ``cfg.depths`` and ``cfg.widths`` (and the
    specs of ``cfg.students``); write ``out/compression.json``, ``.md`` and ``.yaml`` and
    return the results: ``teacher_cost`` and ``students`` (parameters, MACs, latency and
    compression factor of each architecture) and ``runs`` (test accuracy of each method
    and student)."""
    from .. import api
    methods = methods_of(cfg)
    specs = student_specs(cfg)
    dataset = load_dataset(cfg.data)
    # bad specs fail before any training; built for the data's classes and channels, not CIFAR's
    # 10 and 3: a valid student of a grayscale folder (a stem with groups=in_channels) was refused
    for _, _, spec in specs:
        build_model(spec, dataset.num_classes, dataset.channels)
    out, ctx, data = start(cfg, out, "compression", methods, quiet, need_teacher=True,
                            dataset=dataset)
    shape = (dataset.channels, *dataset.image_size)
    teacher, _ = api.load_teacher(cfg.teacher, dataset, cfg.teacher_model, cfg.teacher_normalize)
    log(f"compression: measuring the cost of the teacher and {len(specs)} students"
        + (f" (latency: batch {cfg.latency_batch}, {cfg.latency_threads} thread(s))" if cfg.latency else ""), quiet)
    teacher_cost = cost(bare(teacher).eval(), shape, cfg)
    costs = {spec: cost(build_model(spec, dataset.num_classes, dataset.channels).eval(), shape, cfg)
             for _, _, spec in specs}
    jobs = [Job(f"{m} {spec}", distill_config(cfg, model=spec, method=m),
                {"method": m, "model": spec, "axis": axis, "value": value})
            for axis, value, spec in specs for m in methods]
    summaries = run_jobs(jobs, out, "compression", quiet, data=data)
    tp = ctx["teacher"]["params"]
    runs = []
    for s, j in zip(summaries, jobs):
        c = costs[j.tags["model"]]
        runs.append({**run_record(s, j, out), "compression": tp / s["params"], "macs": c["macs"],
                     "latency": c.get("latency")})
    result = {**ctx, "methods": methods, "epochs": cfg.epochs, "seed": cfg.seed, "input_shape": list(shape),
              "sweep_base": cfg.sweep_base, "recipe": recipe(to_dict(cfg), methods),
              "teacher_cost": teacher_cost, "students": [{"axis": a, "value": v, "model": sp, **costs[sp],
                                                           "compression": tp / costs[sp]["params"]}
                                                          for a, v, sp in specs],
              "runs": runs}
    table = compression_table(result)
    save_results(out, "compression", result, table, cfg)
    return result


def _lat(c: dict) -> Shown | str:
    lat = c.get("latency")
    return Shown(f"{lat['median_ms']:.2f} ({lat['p10_ms']:.2f}-{lat['p90_ms']:.2f})",
                 {k: lat[k] for k in ("median_ms", "p10_ms", "p90_ms")}) if lat else ""


def compression_table(result: dict) -> str:
    methods = result["methods"]
    acc = {(r["model"], r["method"]): r["test_accuracy"] for r in result["runs"]}
    t, tc = result["teacher"], result["teacher_cost"]
    header = ["model", "params", "compression", "MMACs", "latency ms median (p10-p90)"] + \
             [f"{m} acc (%)" for m in methods]
    rows = [[f"teacher {t['model']}", tc["params"], shown(1.0, ".2f", "x"), shown(tc["macs"] / 1e6, ".2f"), _lat(tc),
             *([t["test_accuracy"]] + [""] * (len(methods) - 1))]]
    for s in result["students"]:
        rows.append([s["model"], s["params"], shown(s["compression"], ".2f", "x"), shown(s["macs"] / 1e6, ".2f"),
                     _lat(s),
                     *[acc.get((s["model"], m), "") for m in methods]])
    return markdown_table(header, rows)


@figure
def curves(path: Path, result: dict) -> Path:
    """Accuracy against compression factor (log x), against latency and against MACs. The
    students given as specs are numbered beside their points, the legend names each number."""
    plt = _plt()
    with_lat = result["teacher_cost"].get("latency") is not None
    panels = [("compression", "compression factor (teacher params / student params)")]
    panels += [("latency", "CPU latency, median ms per call")] if with_lat else []
    panels += [("macs", "multiply-accumulates per image (millions)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    cmap = plt.get_cmap("tab10")
    t = result["teacher"]
    # no curve joins them, so nothing said which triangle was which model: a number beside each
    # (a spec's methods share its x: above the topmost), the spec in the legend
    spec_runs = [r for r in result["runs"] if r["axis"] == "spec"]
    specs = list(dict.fromkeys(r["model"] for r in sorted(spec_runs, key=lambda r: r.get("value", 0))))

    def xval(row: dict, what: str) -> float:
        return (row["latency"]["median_ms"] if what == "latency" else row[what] / 1e6 if what == "macs"
                else row[what])

    for ax, (what, label) in zip(axes[0], panels):
        for i, m in enumerate(result["methods"]):
            for axis, style in (("depth", "-o"), ("width", "--s"), ("spec", "^")):
                rows = sorted((r for r in result["runs"] if r["method"] == m and r["axis"] == axis),
                              key=lambda r: xval(r, what))
                if rows:
                    ax.plot([xval(r, what) for r in rows], [r["test_accuracy"] for r in rows], style, ms=4,
                            color=cmap(i % 10), label=f"{figure_text(m, 'method')} ({axis})")
        for k, spec in enumerate(specs, 1):
            x, y = max(((xval(r, what), r["test_accuracy"]) for r in spec_runs if r["model"] == spec),
                       key=lambda p: p[1])
            ax.annotate(str(k), (x, y), xytext=(0, 4), textcoords="offset points", ha="center", va="bottom",
                        fontsize=7, fontweight="bold", bbox={"boxstyle": "round,pad=0.1", "fc": "w", "ec": "none",
                                                             "alpha": 0.8})
        ax.axhline(t["test_accuracy"], color="k", ls=":", lw=1, label="teacher")
        if what != "compression":
            ax.plot([xval({**result["teacher_cost"], "latency": result["teacher_cost"].get("latency")}, what)],
                    [t["test_accuracy"]], "k*", ms=9)
        ax.set_xscale("log")
        log_ticks(ax, [xval(r, what) for r in result["runs"]]
                  + ([] if what == "compression" else [xval(result["teacher_cost"], what)]))
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3, which="both")
    for k, spec in enumerate(specs, 1):  # legend entries only: no data
        axes[0][-1].plot([], [], ls="none", marker=f"${k}$", ms=6, color="k",
                         label=figure_text(spec, "model"))
    legend_outside(axes[0][-1])  # right of the panels, as the other figures': "best" could cover points
    fig.tight_layout()
    return _save(fig, path)


def log_ticks(ax, values: list[float]) -> None:
    """Labelled ticks on a log x-axis at 1, 2 and 5 times powers of ten, or, over a range too
    narrow for two of those, at four points across it: labels only at powers of ten left a
    panel whose values lay within one decade (latencies of 4 to 9 ms) with no number at all."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter
    values = [float(v) for v in values if float(v) > 0]
    if not values:
        return
    lo, hi = min(values), max(values)
    ticks = [t for t in LogLocator(subs=(1.0, 2.0, 5.0)).tick_values(lo, hi) if lo / 1.05 <= t <= hi * 1.05]
    if len(ticks) < 2:
        ticks = sorted({float(f"{t:.2g}") for t in np.geomspace(lo, hi, 4)})
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())  # no crowded labels between the ticks


def section(run_dir: Path) -> str | None:
    r = read_json(run_dir / "compression.json")
    if r is None:
        return None
    curves(run_dir / "compression.png", r)
    lat = r["teacher_cost"].get("latency")
    how = (f"latency: eager PyTorch on CPU, batch {lat['batch']}, {lat['threads']} thread(s), 10 warm-up calls then "
           "repeated calls, median and p10-p90" if lat else "latency not measured (--no-latency)")
    c, h, w = r["input_shape"]
    rec = recipe_line(saved_recipe(run_dir, "compression", r, r["methods"]))
    return (f"## Compression sweep\n\nStudents by depth, width or spec on `{r['data']}`, "
            f"{r['epochs']} epochs, seed {r['seed']}; MACs per {c}x{h}x{w} image; {how}.{_truncation_note(run_dir, r)}"
            + (" Students given as specs: triangles, numbered as in the legend." if any(x["axis"] == "spec" for x in
                                                                                        r["runs"]) else "")
            + (f"\n\n{rec}" if rec else "") + f"\n\n{compression_table(r)}\n\n![compression](compression.png)\n")


def _truncation_note(run_dir: Path, r: dict) -> str:
    """What MobileNetV2's depth knob (truncation, drop=K) does to the cost, where the sweep
    truncated a MobileNetV2: of another family (a ResNet's depth, a py: factory's knob) the
    sentence was not true. The base is in the results (or, before they kept it, compression.yaml)."""
    base = r.get("sweep_base")
    if base is None:
        import yaml
        try:
            base = (yaml.safe_load((run_dir / "compression.yaml").read_text(encoding="utf-8")) or {}).get("sweep_base")
        except Exception:  # noqa: BLE001 - gone or foreign: no sentence rather than a wrong one
            base = None
    try:
        mobilenet = isinstance(base, str) and parse_spec(base, "model spec").kind == "mobilenetv2"
    except UserError:
        mobilenet = False
    if not mobilenet or not any(x["axis"] == "depth" for x in r["runs"]):
        return ""
    return " MobileNetV2's truncation (drop=K) cuts parameters but few MACs (the blocks it removes run at low " \
           "resolution); width cuts both."


__all__ = ["compression_table", "run_compression", "section", "student_specs"]
