"""Report defects an outside researcher met on a tiny image folder (session 22d): no recipe in
the sections, accuracy intervals past 100%, a clipped gallery title, the search plot's colour
bar past 100% and 10^0 labels, MobileNetV2's truncation sentence under any family, failed
trials unmentioned, several numbers in one CSV cell, the Wilcoxon floor with zero
differences dropped, and rounding noise in the CSV. Built from small dicts: seconds."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import torch
import yaml

from igkd import report
from igkd.experiments import ablation, compression, montecarlo, search

CONFIG = {"data": "imagefolder:imgs", "model": "py:mynet.py:make,width=8", "epochs": 2, "batch_size": 16,
          "optimizer": "adam", "lr": 0.01, "T": 2.5, "alpha": 0.5, "kd_standardize": False, "p": 0.25, "blend": 0.5,
          "exponent_min": 1.0, "exponent_max": 2.0, "ig_steps": 4, "check_images": 0, "threads": 1,
          "momentum": 0.9, "seed": 0}


def _ablation_dir(folder: Path, with_recipe: bool) -> Path:
    """An ablation.json of 2 seeds whose t-intervals run past 100% (the researcher's numbers)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"method": m, "n": 2, "mean": mean, "std": 2.357, "ci_low": mean - 21.18, "ci_high": mean + 21.18,
             "gain": mean - 91.67, "params": 867, "compression": None, "val_mean": 90.0}
            for m, mean in (("student", 91.67), ("kd", 93.33), ("kd+ig", 93.33))]
    methods = [r["method"] for r in rows]
    result = {"data": "imagefolder:imgs", "teacher": None, "store": None, "baseline": "student", "methods": methods,
              "seeds": 2, "model": "py:mynet.py:make,width=8", "epochs": 2, "rows": rows, "runs": []}
    if with_recipe:
        result["recipe"] = report.recipe(CONFIG, methods)
    (folder / "ablation.json").write_text(json.dumps(result))
    return folder


def test_recipe_names_the_shared_options_and_each_methods_own(tmp_path, figures):
    rec = report.recipe(CONFIG, ["student", "kd", "kd+ig"])
    assert rec["shared"] == {"ig_steps": 4, "batch_size": 16, "optimizer": "adam", "lr": 0.01}  # not at defaults
    assert rec["methods"]["kd"] == {"T": 2.5, "alpha": 0.5}  # kd_standardize false: a switch at its default
    text = report.recipe_line(rec)
    assert "kd: T=2.5, alpha=0.5" in text and "kd+ig: as kd + p=0.25, blend=0.5" in text
    assert "student: cross-entropy alone" in text
    # the section shows it, from the results or (results written before they kept it) from ablation.yaml
    folder = _ablation_dir(tmp_path / "a", with_recipe=True)
    assert "**Recipe**: " in ablation.section(folder) and "kd: T=2.5, alpha=0.5" in ablation.section(folder)
    old = _ablation_dir(tmp_path / "b", with_recipe=False)
    (old / "ablation.yaml").write_text(yaml.safe_dump(CONFIG))
    assert "kd+ig: as kd + p=0.25" in ablation.section(old)
    # a search leaves its searched options out
    assert "T" not in report.recipe(CONFIG, ["kd"], searched={"T": [1.0, 4.0]})["methods"]["kd"]


def test_accuracy_intervals_are_clipped_to_100_and_said_so(tmp_path, figures):
    folder = _ablation_dir(tmp_path / "a", with_recipe=True)
    text = ablation.section(folder)
    assert "| 91.67 [70.49, 100.00] |" in text and "112.85" not in text
    assert "clipped to [0, 100]" in text and "12.7" in text  # the n = 2 t critical value
    tops = [y for line in figures[0].axes[0].lines for y in line.get_ydata()]
    assert max(tops) <= 100.0  # the error bars, as the table
    assert json.loads((folder / "ablation.json").read_text())["rows"][0]["ci_high"] > 100  # the JSON keeps it
    # Monte Carlo: the per-method table and the bars
    folder = _mc_dir(tmp_path / "mc", {"student": [95.0, 91.66666666666667, 98.33333333333333],
                                       "kd": [100.0, 96.66666666666667, 98.33333333333333]})
    figures.clear()
    text = montecarlo.section(folder)
    assert "[86.72, 100.00]" in text and "clipped to [0, 100]" in text
    bars = figures[1].axes[0]  # after the box plot: the means with their error bars
    assert max(y for line in bars.lines for y in line.get_ydata()) <= 100.0


def test_gallery_title_fits_with_few_classes(figures):
    images = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    report.gallery("g.png", images, torch.rand(2, 8, 8), ["circle", "square"],
                   title="teacher maps (IG riemann_middle x 4 steps, baseline zero) and the overlays students see")
    fig = figures[0]
    box = fig._suptitle.get_window_extent(fig.canvas.get_renderer())
    assert box.x0 >= 0 and box.x1 <= fig.bbox.width and box.y1 <= fig.bbox.height


def test_search_colour_bar_stays_in_0_100_and_log_axis_has_plain_numbers(figures):
    trials = [{"state": "COMPLETE", "params": {"T": T, "alpha": a}, "val_accuracy": 100.0}
              for T, a in ((1.0, 0.25), (2.13, 0.44), (2.14, 0.67))]
    search.heat_map(Path("s.png"), {"trials": trials, "space": {"T": [1.0, 4.0], "alpha": [0.1, 0.9]},
                                    "sampler": "tpe"})
    ax, bar = figures[0].axes
    assert bar.get_ylim()[1] <= 100.0 and bar.get_ylim()[0] < 100.0
    labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert labels and not any("^" in s or "10" in s for s in labels), labels
    # the grid branch, one cell of 100%
    figures.clear()
    search.heat_map(Path("s.png"), {"trials": trials[:1], "space": {"T": [1.0], "alpha": [0.25]}, "sampler": "grid"})
    assert figures[0].axes[1].get_ylim()[1] <= 100.0


def _compression_result(base: str, axis: str) -> dict:
    runs = [{"method": "kd", "axis": axis, "model": f"{base}:{axis}={v}", "value": v, "test_accuracy": 60.0 + v,
             "compression": 2.0 * v, "macs": 1e6 * v, "latency": None} for v in (1, 2)]
    return {"data": "imagefolder:imgs", "epochs": 2, "seed": 0, "input_shape": [3, 32, 32], "methods": ["kd"],
            "teacher": {"model": "resnet:depth=20", "test_accuracy": 90.0, "params": 1000},
            "teacher_cost": {"params": 1000, "macs": 4e7, "latency": None}, "sweep_base": base,
            "students": [{"axis": axis, "value": r["value"], "model": r["model"], "params": 10, "macs": r["macs"],
                          "compression": 100.0} for r in runs], "runs": runs}


def test_truncation_sentence_only_for_a_truncated_mobilenetv2(tmp_path, figures):
    for base, axis, said in (("py:mynet.py:make", "depth", False), ("mobilenetv2", "depth", True),
                             ("mobilenetv2", "width", False)):
        folder = tmp_path / f"{base}-{axis}".replace(":", "_")
        folder.mkdir()
        (folder / "compression.json").write_text(json.dumps(_compression_result(base, axis)))
        assert ("truncation" in compression.section(folder)) is said, (base, axis)


def test_search_section_names_failed_trials(tmp_path, figures):
    trials = [{"number": 0, "state": "COMPLETE", "params": {"T": 1.0}, "val_accuracy": 90.0, "test_accuracy": 91.0},
              {"number": 1, "state": "FAIL", "params": {"T": 2.0}, "val_accuracy": None, "test_accuracy": None},
              {"number": 2, "state": "COMPLETE", "params": {"T": 2.0}, "val_accuracy": 92.0, "test_accuracy": 90.0}]
    r = {"sampler": "grid", "method": "kd", "model": "m", "epochs": 1, "space": {"T": [1.0, 2.0]}, "complete": 2,
         "study": "s", "storage": "sqlite:///x", "val_fraction": 0.1, "trials": trials, "best": trials[2]}
    (tmp_path / "search.json").write_text(json.dumps(r))
    assert "1 failed trial (1; interrupted or diverged)" in search.section(tmp_path)
    trials[1]["diverged"] = True  # recorded since collect() keeps why
    (tmp_path / "search.json").write_text(json.dumps(r))
    assert "1 failed trial (1): 1 diverged" in search.section(tmp_path)


def test_csv_cells_of_several_numbers_are_columns_each():
    rows = [["kd", report.Shown("93.33 [72.16, 100.00]", {"mean": 93.33, "ci_low": 72.16, "ci_high": 100.0})],
            ["teacher", 100.0]]
    got = list(csv.reader(io.StringIO(report.table_csv(["method", "acc"], rows))))
    assert got == [["method", "acc: mean", "acc: ci_low", "acc: ci_high"], ["kd", "93.33", "72.16", "100.0"],
                   ["teacher", "100.0", "", ""]]
    assert report.table_csv(["m", "acc"], [["kd", 91.234]]) == "m,acc\nkd,91.234\n"  # plain tables unchanged


def _mc_dir(folder: Path, accuracy: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    methods = list(accuracy)
    result = {"data": "d", "teacher": None, "store": None, "baseline": methods[0], "methods": methods,
              "runs_count": len(accuracy[methods[0]]), "subset": 0.8, "model": "m", "epochs": 1, "seed": 0,
              "train_images": 87, "accuracy": accuracy, "runs": []}
    (folder / "montecarlo.json").write_text(json.dumps(result))
    return folder


def test_wilcoxon_floor_counts_only_nonzero_differences_and_csv_mean_is_rounded(tmp_path, figures):
    # the researcher's runs: one of three differences is zero in every comparison
    acc = {"student": [95.0, 91.66666666666667, 98.33333333333333],
           "kd": [100.0, 96.66666666666667, 98.33333333333333],
           "kd+ig": [96.66666666666667, 93.33333333333333, 98.33333333333333]}
    text = montecarlo.section(_mc_dir(tmp_path / "mc", acc))
    assert "two-sided p below 0.500" in text and "below 0.250" not in text and "zero differences are dropped" in text
    r = montecarlo.statistics(json.loads((tmp_path / "mc" / "montecarlo.json").read_text()))
    table = report.table_csv(*_last_table(lambda: montecarlo.montecarlo_tables(r)))
    means = {row["difference"]: row["mean"] for row in csv.DictReader(io.StringIO(table))}
    assert means["kd+ig - student"] == "1.111111111", means  # not 1.1111111113333334


def _last_table(render) -> tuple[list, list]:
    """The header and rows of the last table ``render`` makes (as write_report collects them)."""
    report._REPORT = {"formats": ("png",), "tables": [], "section": "x"}
    try:
        render()
        return report._REPORT["tables"][-1][1:]
    finally:
        report._REPORT = None
