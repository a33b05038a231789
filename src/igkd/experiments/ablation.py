"""``igkd experiment ablation``: every selected method with the same budget, seeds and splits.

Writes ``ablation.json`` / ``ablation.md``: the paper's table (method, accuracy, gain over
the plain student, parameters, compression factor), the teacher on top. With ``--seeds N``
(N >= 2) each method is trained with seeds seed ... seed+N-1 and the table shows the
mean with its 95% t-interval; the paper's table is single runs (N = 1).
"""

from __future__ import annotations

from pathlib import Path

from ..config import to_dict
from ..report import (Shown, accuracy_interval, accuracy_points, interval_note, markdown_table, read_json, recipe,
                      recipe_line, saved_recipe, shown)
from .common import baseline_of, corruption_section, corruption_summary, methods_of, save_results, start
from .config import ExperimentConfig, corruption_names, distill_config, entry_point
from .runs import Job, corruption_scores, run_jobs, run_record
from .stats import describe


def ablation_jobs(cfg: ExperimentConfig, methods: list[str]) -> list[Job]:
    return [Job(f"{m} seed {cfg.seed + s}", distill_config(cfg, method=m, seed=cfg.seed + s),
                {"method": m, "seed_index": s}) for s in range(cfg.seeds) for m in methods]


@entry_point
def run_ablation(cfg: ExperimentConfig, out: str | Path, quiet: bool = False) -> dict:
    """Train (or reuse) every method x seed; write and return the table's data."""
    methods = methods_of(cfg)
    out, ctx, data = start(cfg, out, "ablation", methods, quiet)
    jobs = ablation_jobs(cfg, methods)
    summaries = run_jobs(jobs, out, "ablation", quiet, data=data)
    names = corruption_names(cfg)
    scores = corruption_scores(jobs, out, names, cfg.corruption_seed, cfg.corruption_images, "ablation", quiet)
    runs = [run_record(s, j, out, c) for s, j, c in zip(summaries, jobs, scores)]
    base = baseline_of(methods)
    acc = {m: [r["test_accuracy"] for r in runs if r["method"] == m] for m in methods}
    teacher = ctx["teacher"]
    rows = []
    for m in methods:
        d = describe(acc[m])
        params = next(r["params"] for r in runs if r["method"] == m)
        rows.append({"method": m, **{k: d[k] for k in ("n", "mean", "std", "ci_low", "ci_high")},
                     "gain": d["mean"] - describe(acc[base])["mean"], "params": params,
                     "compression": teacher["params"] / params if teacher else None,
                     "val_mean": _val_mean([r["val_accuracy"] for r in runs if r["method"] == m])})
    result = {**ctx, "baseline": base, "methods": methods, "seeds": cfg.seeds, "model": cfg.model,
              "epochs": cfg.epochs, "rows": rows, "runs": runs, "recipe": recipe(to_dict(cfg), methods)}
    if names:  # no paired tests here (single runs by default): the Monte Carlo has them
        result["corruptions"] = corruption_summary(runs, methods, None, names, cfg)
    table = ablation_table(result) + corruption_table(result)
    save_results(out, "ablation", result, table, cfg)
    return result


def _val_mean(values: list) -> float:
    """The mean validation accuracy, NaN without a validation split: --val-fraction 0 gives
    every run NaN (None once read back from its summary.json), which describe refused with a
    ValueError traceback after all the training."""
    return describe(values)["mean"] if all(v is not None and v == v for v in values) else float("nan")


def ablation_table(result: dict) -> str:
    t, base, several = result["teacher"], result["baseline"], result["seeds"] > 1
    header = ["method", "test accuracy (%)" + (" mean [95% CI]" if several else ""), f"gain over {base}",
              "params", "compression"]
    rows = []
    if t:
        rows.append([f"teacher ({t['model']})", t["test_accuracy"], "", t["params"], shown(1.0, ".2f", "x")])
    for r in result["rows"]:  # formatted for the eye, exact in the CSV (report.Shown)
        rows.append([r["method"], _mean_ci(r, several), "" if r["method"] == base else shown(r["gain"], "+.2f"),
                     r["params"], shown(r["compression"], ".2f", "x") if r["compression"] else ""])
    return markdown_table(header, rows)


def corruption_table(result: dict) -> str:
    """Clean and corrupted accuracy per method (the mean over seeds with 2 or more); empty
    without corruptions."""
    c = result.get("corruptions")
    if not c:
        return ""
    several = result["seeds"] > 1

    def cell(d: dict) -> Shown:
        return _mean_ci(d, several)
    scored = ["clean, scored images"] if c.get("subset") else []
    rows = [[r["method"], cell(r)] + ([cell(c["clean_on_scored_images"][r["method"]])] if scored else [])
            + [cell(c["stats"][k]["summary"][r["method"]]) for k in c["conditions"]] for r in result["rows"]]
    return "\n\n" + markdown_table(["method", "clean"] + scored + [c["labels"][k] for k in c["conditions"]], rows)


def _mean_ci(d: dict, several: bool) -> Shown:
    """The mean, with its 95% interval over several seeds."""
    if not several:
        return shown(d["mean"], ".2f")
    low, high, _ = accuracy_interval(d)  # clipped to [0, 100], as the footnote says
    return Shown(f"{d['mean']:.2f} [{low:.2f}, {high:.2f}]", {"mean": d["mean"], "ci_low": low, "ci_high": high})


def _clipped(result: dict) -> bool:
    """Whether a shown interval of the ablation's tables was clipped to [0, 100]."""
    c = result.get("corruptions") or {}
    shown = list(result["rows"]) + list((c.get("clean_on_scored_images") or {}).values()) + [
        d for k in c.get("conditions", []) for d in c["stats"][k]["summary"].values()]
    return result["seeds"] > 1 and any(accuracy_interval(d)[2] for d in shown)


def section(run_dir: Path) -> str | None:
    """Report section: the table and a plot of the accuracies (95% CIs when seeds >= 2)."""
    result = read_json(run_dir / "ablation.json")
    if result is None:
        return None
    rows = result["rows"]
    several = result["seeds"] > 1
    ci = [accuracy_interval(r) for r in rows]  # the error bars as the table: clipped to [0, 100]
    errors = [(r["mean"] - lo, hi - r["mean"]) for r, (lo, hi, _) in zip(rows, ci)] if several else None
    t = result["teacher"]
    accuracy_points(run_dir / "ablation.png", [r["method"] for r in rows], [r["mean"] for r in rows],
                  t["test_accuracy"] if t else None, errors=errors)
    runs = "single runs" if not several else f"mean of {result['seeds']} seeds, error bars: 95% t-interval"
    rec = recipe_line(saved_recipe(run_dir, "ablation", result, result["methods"]))
    note = interval_note(result["seeds"], _clipped(result)) if several else ""
    text = (f"## Ablation\n\nStudent `{result['model']}` on `{result['data']}`, every method with the same "
            f"budget ({result['epochs']} epoch{'s' * (result['epochs'] != 1)}), seeds and splits; test split accuracy ({runs}).\n\n"
            + (f"{rec}\n\n" if rec else "")
            + f"{ablation_table(result)}\n\n" + (f"{note}\n\n" if note else "") + "![ablation](ablation.png)\n")
    if result.get("corruptions"):
        text += "\n" + corruption_section(run_dir, result, "ablation", corruption_table(result).strip(),
                                          {r["method"]: r for r in rows},
                                          f"mean [95% CI] of {result['seeds']} seeds" if several else "single runs")
    return text


__all__ = ["ablation_jobs", "ablation_table", "corruption_table", "run_ablation", "section"]
