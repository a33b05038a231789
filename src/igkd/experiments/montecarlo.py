"""``igkd experiment montecarlo``: repeated runs on random stratified subsets (METHOD.md 7).

Run r (r = 0 ... runs-1) draws its own stratified ``mc_subset`` share of the training
set (``subset_seed = seed + r``) and trains every method on it with ``seed = seed + r``
(initialisation, order, augmentation, validation split): within a run the methods differ
only by method, so their accuracies are paired. Per method: mean, standard deviation and
95% t-interval; for every pair of methods: paired t-test with Cohen's d_z, Wilcoxon
signed-rank test with the rank-biserial correlation, both Holm-corrected over all pairs
(:mod:`igkd.experiments.stats`). The store of teacher maps and logits covers the whole
training set once; subsets keep the samples' own indices, so every run reads aligned rows.
"""

from __future__ import annotations

from pathlib import Path

from ..config import to_dict
from ..report import (Shown, _plt, _save, accuracy_interval, accuracy_points, figure, figure_text, interval_note,
                      legend_outside, markdown_table, paired_differences, read_json, recipe, recipe_line,
                      saved_recipe, shown, teacher_line)
from .common import baseline_of, corruption_section, corruption_summary, methods_of, save_results, start
from .config import ExperimentConfig, corruption_names, distill_config, entry_point
from .runs import Job, corruption_scores, run_jobs, run_record
from .stats import compare, describe


def montecarlo_jobs(cfg: ExperimentConfig, methods: list[str]) -> list[Job]:
    return [Job(f"{m} run {r}", distill_config(cfg, method=m, seed=cfg.seed + r, subset=cfg.mc_subset,
                                               subset_seed=cfg.seed + r), {"method": m, "mc_run": r})
            for r in range(cfg.runs) for m in methods]


@entry_point
def run_montecarlo(cfg: ExperimentConfig, out: str | Path, quiet: bool = False) -> dict:
    """Train (or reuse) every method on ``cfg.runs`` random stratified subsets of the
    training set (``cfg.mc_subset`` of it, one seed per run, the methods of a run paired);
    write ``out/montecarlo.json``, ``.md`` and ``.yaml`` and return the results: the
    per-run test ``accuracy`` by method, ``runs`` (one record per trained run),
    ``summary`` (mean, std, CI per method), ``comparisons`` (paired t and Wilcoxon tests,
    Holm-corrected) and, with ``cfg.corruptions``, ``corruptions``."""
    methods = methods_of(cfg)
    out, ctx, data = start(cfg, out, "montecarlo", methods, quiet)
    jobs = montecarlo_jobs(cfg, methods)
    summaries = run_jobs(jobs, out, "montecarlo", quiet, data=data)
    names = corruption_names(cfg)
    scores = corruption_scores(jobs, out, names, cfg.corruption_seed, cfg.corruption_images, "montecarlo", quiet)
    runs = [run_record(s, j, out, c) for s, j, c in zip(summaries, jobs, scores)]
    acc = {m: [r["test_accuracy"] for r in sorted(runs, key=lambda r: r["mc_run"]) if r["method"] == m]
           for m in methods}
    base = baseline_of(methods)
    order, pairs = _order_and_pairs(methods, base)
    result = {**ctx, "baseline": base, "methods": methods, "runs_count": cfg.runs, "subset": cfg.mc_subset,
              "model": cfg.model, "epochs": cfg.epochs, "seed": cfg.seed,
              "train_images": runs[0]["train_images"], "accuracy": acc, "runs": runs,
              "recipe": recipe(to_dict(cfg), methods)}
    if names:  # the same statistics for each corruption (mean over severities) and their mean
        ordered = sorted(runs, key=lambda r: r["mc_run"])
        result["corruptions"] = corruption_summary(ordered, order, pairs, names, cfg)
    result = statistics(result)
    table = montecarlo_tables(result)
    save_results(out, "montecarlo", result, table, cfg)
    return result


def _order_and_pairs(methods: list[str], base: str) -> tuple[list[str], list[tuple[str, str]]]:
    """The baseline first; every method against it, then every later pair (later first)."""
    order = [base] + [m for m in methods if m != base]
    return order, [(m, base) for m in order[1:]] + [(b, a) for i, a in enumerate(order[1:], 1) for b in order[i + 1:]]


def statistics(result: dict) -> dict:
    """``result`` with its statistics (``summary``, ``comparisons`` and, under corruptions,
    each condition's ``stats``) computed from its per-run accuracies alone. They are a pure
    function of those numbers, so the report recomputes them with the current
    :mod:`~igkd.experiments.stats` rather than trusting figures a results file stored."""
    from .stats import by_condition
    methods, acc = result["methods"], result["accuracy"]
    order, pairs = _order_and_pairs(methods, result["baseline"])
    out = {**result, "summary": {m: describe(acc[m]) for m in methods},
           "comparisons": compare({m: acc[m] for m in order}, pairs)}
    if out.get("corruptions"):
        c = out["corruptions"]
        out["corruptions"] = {**c, "stats": by_condition({k: {m: c["accuracy"][k][m] for m in order}
                                                          for k in c["conditions"]}, pairs)}
    return out


def _p(p: float) -> Shown:
    if p != p:
        return Shown("n/a", p)
    return Shown("< 0.001" if p < 0.001 else f"{p:.3f}", p)  # the CSV keeps the p-value itself


def _ci(low: float, high: float, spec: str = "+.2f") -> Shown:
    return Shown(f"[{low:{spec}}, {high:{spec}}]", {"ci_low": low, "ci_high": high})


def _diff_mean(mean: float) -> float:
    """A mean paired difference to the 9 decimals the differences are rounded to
    (stats._pair): the mean of 1.666666667, -3.333333333 and 5 printed as 1.1111111113333334."""
    return round(mean, 9)


def montecarlo_tables(result: dict) -> str:
    rows = []
    for m in result["methods"]:
        d = result["summary"][m]
        low, high, _ = accuracy_interval(d)  # clipped to [0, 100]: the section's note says so
        rows.append([m, d["n"], d["mean"], d["std"], _ci(low, high, ".2f"),
                     shown(d["mean"] - d["ci_low"], ".2f")])
    per_method = markdown_table(["method", "runs", "mean acc (%)", "std", "95% CI", "+/-"], rows)
    if not result["comparisons"]:  # one method: nothing to compare (an empty table said nothing)
        return per_method + corruption_tables(result)
    rows = []
    for c in result["comparisons"]:
        t, w = c["t"], c["wilcoxon"]
        rows.append([f"{c['a']} - {c['b']}", shown(_diff_mean(t["mean_diff"]), "+.2f"), _ci(t["ci_low"], t["ci_high"]),
                     shown(t["t"], ".2f"), _p(t["p"]), _p(t["p_holm"]), shown(t["cohen_dz"], ".2f"),
                     _p(w["p"]), _p(w["p_holm"]), shown(w["rank_biserial"], "+.2f"),
                     _detectable(t, len(result["comparisons"]))])
    tests = markdown_table(["difference", "mean", "95% CI", "t", "p (t)", "p Holm (t)", "d_z", "p (Wilcoxon)",
                            "p Holm (W)", "rank-biserial", "detectable (5% / Holm)"], rows)
    return per_method + "\n\n" + tests + corruption_tables(result)


def _detectable(t: dict, m: int) -> Shown:
    """The smallest difference the paired t-test would detect with 80% power, at 5% and at
    Holm's strictest level 5%/m (results written before it was stored: computed here)."""
    from .stats import detectable_difference
    if t["sd_diff"] == 0:  # compare() leaves it undefined (NaN, null in JSON): see stats.NO_SPREAD
        return Shown("n/a: all differences equal", float("nan"))
    a = t.get("detectable", detectable_difference(t["sd_diff"], t["n"], 0.05))
    b = t.get("detectable_holm", detectable_difference(t["sd_diff"], t["n"], 0.05 / m))
    return Shown(f"{a:.2f} / {b:.2f}", {"5%": a, "Holm": b})


def corruption_tables(result: dict) -> str:
    """Clean and corrupted accuracy per method (mean and sd over the runs), then the paired
    tests under each corruption and their mean; empty without corruptions."""
    c = result.get("corruptions")
    if not c:
        return ""
    conds = c["conditions"]
    scored = ["clean, scored images"] if c.get("subset") else []  # the clean figure on the corrupted images' set
    rows = [[m, result["summary"][m]["n"], _mean_sd(result["summary"][m])]
            + ([_mean_sd(c["clean_on_scored_images"][m])] if scored else [])
            + [_mean_sd(c["stats"][k]["summary"][m]) for k in conds] for m in result["methods"]]
    per_method = markdown_table(["method", "runs", "clean"] + scored + [c["labels"][k] for k in conds], rows)
    rows = []
    for k in conds:
        for row in c["stats"][k].get("comparisons", []):  # none with one method
            t, w = row["t"], row["wilcoxon"]
            rows.append([c["labels"][k], f"{row['a']} - {row['b']}", shown(_diff_mean(t["mean_diff"]), "+.2f"),
                         _ci(t["ci_low"], t["ci_high"]), _p(t["p"]), _p(t["p_holm"]),
                         shown(t["cohen_dz"], ".2f"), _p(w["p"]), _p(w["p_holm"])])
    if not rows:  # one method: no comparisons
        return "\n\n" + per_method
    tests = markdown_table(["condition", "difference", "mean", "95% CI", "p (t)", "p Holm (t)", "d_z", "p (Wilcoxon)",
                            "p Holm (W)"], rows)
    return "\n\n" + per_method + "\n\n" + tests


def _mean_sd(d: dict) -> Shown:
    if d["std"] != d["std"]:
        return shown(d["mean"], ".2f")
    return Shown(f"{d['mean']:.2f} ± {d['std']:.2f}", {"mean": d["mean"], "std": d["std"]})


@figure
def distribution_plot(path: Path, result: dict) -> Path:
    """Box plot per method with every run as a point (same run = same colour), teacher line."""
    plt = _plt()
    methods, acc = result["methods"], result["accuracy"]
    fig, ax = plt.subplots(figsize=(1.3 * len(methods) + 2.5, 3.6))
    ax.boxplot([acc[m] for m in methods], widths=0.5, showmeans=True, showfliers=False)  # every run is a dot
    ax.set_xticks(range(1, len(methods) + 1), [figure_text(m, "method") for m in methods])
    cmap = plt.get_cmap("tab10")
    for i, m in enumerate(methods, 1):
        n = len(acc[m])
        xs = [i + (j - (n - 1) / 2) * min(0.05, 0.35 / max(1, n)) for j in range(n)]
        ax.scatter(xs, acc[m], s=14, c=[cmap(j % 10) for j in range(n)], zorder=3)
    note = None
    if result.get("teacher"):
        values = [v for m in methods for v in acc[m]]
        note = teacher_line(ax, result["teacher"]["test_accuracy"], min(values), max(values))
        if note is None:
            legend_outside(ax)  # "lower right" covered the last method's runs
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{result['runs_count']} runs, each on its own {100 * result['subset']:.0f}% subset"
                 + (f"\n{note}" if note else ""), fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def section(run_dir: Path) -> str | None:
    r = read_json(run_dir / "montecarlo.json")
    if r is None:
        return None
    r = statistics(r)
    distribution_plot(run_dir / "montecarlo.png", r)
    s = r["summary"]
    accuracy_points(run_dir / "montecarlo_bars.png", r["methods"], [s[m]["mean"] for m in r["methods"]],
                    r["teacher"]["test_accuracy"] if r.get("teacher") else None,
                    errors=[(s[m]["mean"] - lo, hi - s[m]["mean"])  # clipped to [0, 100], as in the table
                            for m, (lo, hi, _) in ((m, accuracy_interval(s[m])) for m in r["methods"])])
    acc = r["accuracy"]
    n, m = r["runs_count"], len(r["comparisons"])
    # one method has no pairs: no tests to describe and no differences to draw (the text spoke of
    # "Holm-corrected over the 0 comparisons" at "5% / 0" above an empty table and an empty plot)
    if m:
        paired_differences(run_dir / "montecarlo_differences.png",
                           [(f"{figure_text(c['a'], 'method')} - {figure_text(c['b'], 'method')}",
                             [x - y for x, y in zip(acc[c["a"]], acc[c["b"]])], c["t"]) for c in r["comparisons"]])
    # the floor is set by the differences the test ranks: zero differences are dropped, so a
    # comparison with 2 non-zero differences of 3 runs cannot go below 0.5, not 0.25
    nz = min((c["wilcoxon"].get("n_nonzero", n) for c in r["comparisons"]), default=n)
    dropped = (f" ({nz} non-zero difference{'s' * (nz != 1)} in a comparison: zero differences are dropped)"
               if nz < n else "")
    note = ((f" With {n} runs{dropped} a Wilcoxon test cannot give a two-sided p below {2 / 2 ** nz:.3f}"
             if nz else f" With {n} runs, all of a comparison's differences zero, its Wilcoxon p is 1")
            + "; the t-test assumes roughly normal differences." if nz < 10 else "")
    rec = recipe_line(saved_recipe(run_dir, "montecarlo", r, r["methods"]))
    ci_note = interval_note(n, any(accuracy_interval(s[m])[2] for m in r["methods"]))
    flat = ("; n/a where every run gave the same difference: no spread to size it by"
            if any(c["t"]["sd_diff"] == 0 for c in r["comparisons"]) else "")
    tests = (f" Paired tests on the per-run differences, Holm-corrected over the {m} comparisons. 'detectable': the "
             "smallest true difference (points) the paired t-test would find with 80% power given the observed spread "
             f"of the differences, at the 5% level and at Holm's strictest level (5% / {m}); a difference not found "
             f"may still exist below it{flat}.{note}" if m else " One method: no paired comparisons.")
    text = (f"## Monte Carlo\n\n{n} runs of student `{r['model']}` on `{r['data']}`: run r trains on its own stratified "
            f"{100 * r['subset']:.0f}% subset of the training set ({r['train_images']} training images after the "
            f"validation split) with seed {r['seed']}+r, shared by all methods of that run; {r['epochs']} epoch{'s' * (r['epochs'] != 1)}; "
            f"accuracy on the test split.{tests}\n\n" + (f"{rec}\n\n" if rec else "")
            + f"{montecarlo_tables({**r, 'corruptions': None})}\n\n" + (f"{ci_note}\n\n" if ci_note else "") +
            # the box plot's marks were explained nowhere (a green triangle, an orange line)
            "Figures: each run's accuracy per method (dots, one colour per run; box: quartiles, orange line: "
            "median, triangle: mean); the means with their 95% t-intervals"
            + ("; each comparison's per-run paired differences with their mean and 95% CI" if m else "") + ".\n\n"
            "![Monte Carlo distribution](montecarlo.png)\n\n![means with 95% CI](montecarlo_bars.png)\n"
            + ("\n![paired differences, every run and the mean with its 95% CI](montecarlo_differences.png)\n" if m
               else ""))
    if r.get("corruptions"):
        text += "\n" + corruption_section(run_dir, r, "montecarlo", corruption_tables(r).strip(), r["summary"])
    return text


__all__ = ["corruption_tables", "montecarlo_jobs", "montecarlo_tables", "run_montecarlo", "section", "statistics"]
