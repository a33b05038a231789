"""Figures of the report: legible at any number of methods, legends off the data, no axis
squeezed by a far-away teacher, labelled log axes, readable heat-map cells. Checked on the
matplotlib objects (text extents, limits, legend boxes), not on pixels."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from igkd import report
from igkd.experiments import compression, montecarlo, search

RESULTS = Path(__file__).resolve().parents[1] / "results" / "cifar10-cpu"


def _legend_outside_axes(ax) -> bool:
    legend = ax.get_legend()
    assert legend is not None
    r = ax.figure.canvas.get_renderer()
    box, frame = legend.get_window_extent(r), ax.get_window_extent(r)
    return not box.overlaps(frame)


def test_paired_differences_fit_a_page_at_many_comparisons(figures, tmp_path):
    """Six methods make 15 comparisons: one column each made a figure 23.5 inches wide that a
    page shrank until its labels could not be read; one row each keeps it page-wide."""
    names = [f"method-{i}-long-name" for i in range(6)]
    comps = [(f"{a} - {b}", [0.5, -0.2, 1.0, 0.1, 0.3], {"mean_diff": 0.34, "ci_low": -0.2, "ci_high": 0.9})
             for i, a in enumerate(names) for b in names[:i]]
    report.paired_differences(tmp_path / "d.png", comps)
    fig = figures[0]
    assert fig.get_figwidth() <= 10
    ax = fig.axes[0]
    r = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(r) for t in ax.get_yticklabels() if t.get_text()]
    assert len(boxes) == 15
    assert not any(a.overlaps(b) for a, b in zip(boxes, boxes[1:]))
    assert _legend_outside_axes(ax)


def test_legends_cover_no_data(figures, tmp_path):
    """Corruption points of ten methods, ten training-curve groups and the Monte Carlo box plot:
    the legend sat over points ('best' with no free corner; a fixed 'lower right')."""
    rng = np.random.default_rng(0)
    methods = [f"kd+ig-variant-{i}" for i in range(10)]
    conds = ["clean", "gaussian_noise", "contrast", "mean of corruptions"]
    report.condition_points(tmp_path / "c.png", conds, {m: [{"mean": v, "ci_low": v - 2, "ci_high": v + 2}
                                                            for v in 50 + rng.normal(0, 5, len(conds))]
                                                        for m in methods})
    report.training_curves(tmp_path / "t.png", {f"ablation: {m} (5 ep)": [[{"epoch": e, "val_accuracy": 30 + 5 * e,
                                                                           "loss": 2 / e} for e in range(1, 6)]]
                                               for m in methods})
    acc = {m: [48.0 + i, 49.0 + i, 50.5] for i, m in enumerate(["student", "kd"])}
    montecarlo.distribution_plot(tmp_path / "m.png", {"methods": ["student", "kd"], "accuracy": acc, "runs_count": 3,
                                                      "subset": 0.2, "teacher": {"test_accuracy": 51.0}})
    for fig in figures:
        ax = next(a for a in fig.axes if a.get_legend() is not None)
        assert _legend_outside_axes(ax)


def test_more_than_ten_methods_stay_apart(figures, tmp_path):
    """tab10 has ten colours: the eleventh method was drawn exactly as the first."""
    methods = [f"m{i}" for i in range(12)]
    report.condition_points(tmp_path / "c.png", ["clean"], {m: [{"mean": 50.0}] for m in methods})
    handles, labels = figures[0].axes[0].get_legend_handles_labels()
    looks = {(tuple(h[0].get_color()) if not isinstance(h[0].get_color(), str) else h[0].get_color(), h[0].get_marker())
             for h in handles}
    assert len(labels) == 12 and len(looks) == 12


def test_far_teacher_does_not_squeeze_the_data(figures, tmp_path):
    """A teacher 35 points above students 2 points apart put the students into a sliver of
    the axis; it is named in the title instead. A near one stays a dashed line."""
    report.accuracy_points(tmp_path / "a.png", ["student", "kd", "kd+ig"], [48.2, 49.8, 48.9], 85.0,
                           errors=[(1.0, 1.0)] * 3)
    ax = figures[-1].axes[0]
    assert ax.get_ylim()[1] < 60
    assert "teacher: 85.00" in ax.get_title(loc="right")
    report.accuracy_points(tmp_path / "b.png", ["student", "kd"], [48.2, 49.8], 51.0)
    ax = figures[-1].axes[0]
    assert any(list(line.get_ydata()) == [51.0, 51.0] for line in ax.get_lines())
    montecarlo.distribution_plot(tmp_path / "m.png", {"methods": ["student", "kd"],
                                                      "accuracy": {"student": [47.0, 48.0], "kd": [49.0, 50.0]},
                                                      "runs_count": 2, "subset": 0.2, "teacher": {"test_accuracy": 85.0}})
    ax = figures[-1].axes[0]
    assert ax.get_ylim()[1] < 60 and "teacher: 85.00" in ax.get_title()


def test_compression_log_axes_have_numbers(figures, tmp_path):
    """Values within one decade (latency 4 to 9 ms) got no tick label at all: labels were at
    powers of ten only. MACs are in millions, as in the table."""
    runs = [{"method": "kd", "axis": "depth", "test_accuracy": 60.0 + i, "compression": 1.5 + i,
             "macs": (9 - i) * 1e6, "latency": {"median_ms": 9.0 - i}} for i in range(6)]
    result = {"teacher_cost": {"latency": {"median_ms": 9.5}, "macs": 1.2e7}, "teacher": {"test_accuracy": 70.0},
              "methods": ["kd"], "runs": runs}
    compression.curves(tmp_path / "c.png", result)
    axes = figures[0].axes
    assert len(axes) == 3 and "millions" in axes[2].get_xlabel()
    for ax in axes:
        lo, hi = ax.get_xlim()
        shown = [t.get_text() for t in ax.get_xticklabels() if t.get_text() and lo <= t.get_position()[0] <= hi]
        assert len(shown) >= 2, (ax.get_xlabel(), shown)
    assert _legend_outside_axes(axes[-1])


def test_search_heat_map_says_what_and_keeps_best_cells_legible(figures, tmp_path):
    trials = [{"state": "COMPLETE", "params": {"T": T, "alpha": a}, "val_accuracy": 40.0 + 10 * T * a}
              for T in (1.0, 4.0) for a in (0.1, 0.5)]
    search.heat_map(tmp_path / "s.png", {"trials": trials, "space": {"T": [1.0, 4.0], "alpha": [0.1, 0.5]},
                                         "sampler": "grid"})
    ax = figures[0].axes[0]
    assert "validation accuracy" in ax.get_title()
    best = max(ax.texts, key=lambda t: float(t.get_text()))
    worst = min(ax.texts, key=lambda t: float(t.get_text()))
    assert best.get_color() != "w" and worst.get_color() == "w"  # dark text on viridis' yellow end


def test_gallery_text_says_only_ten_of_twenty_classes_are_shown(figures, tmp_path, monkeypatch):
    """A 20-class set's gallery shows the first 10 classes; the text said 'each class'."""
    import igkd.data
    import igkd.store
    store = tmp_path / "store"
    store.mkdir()
    (store / "manifest.json").write_text("{}")
    (tmp_path / "ablation.json").write_text(json.dumps({"store": str(store), "data": "fake",
                                                        "maps": {"description": "IG", "completeness_delta": None}}))
    train = SimpleNamespace(labels=torch.arange(20), images=torch.zeros(20, 3, 8, 8, dtype=torch.uint8))
    monkeypatch.setattr(igkd.data, "load_dataset", lambda spec: SimpleNamespace(
        train=train, num_classes=20, classes=[f"c{i}" for i in range(20)], require_train=lambda why: None))
    monkeypatch.setattr(igkd.store, "open_store", lambda path: SimpleNamespace(
        maps=np.zeros((20, 8, 8), dtype="float16"), manifest={}))
    text = report.gallery_section(tmp_path)
    assert "each of the first 10 of the 20 classes" in text
    assert len(figures[0].axes) == 30


def test_montecarlo_text_explains_the_box_plot(figures, tmp_path):
    copy = tmp_path / "mc"
    copy.mkdir()
    shutil.copy(RESULTS / "montecarlo.json", copy / "montecarlo.json")
    text = montecarlo.section(copy)
    assert "box: quartiles" in text and "triangle: mean" in text


NAMES = ("猫", "犬", "🐶", "Ⓐ", "a$b$c", "cat")  # CJK and emoji: no glyph in DejaVu Sans; Ⓐ: in STIX only


def test_class_names_no_font_can_draw_are_stand_ins_the_markdown_names(figures, tmp_path, monkeypatch, recwarn, caplog):
    """Class folders named 猫 or 🐶 drew empty boxes and printed "Glyph ... missing from font(s)
    DejaVu Sans": such a name is drawn in an installed font that has it, or as "class I" with
    the Markdown beside the gallery saying which name that is; '$' is no mathtext."""
    import igkd.store
    from helpers_data import write_image_folder
    write_image_folder(tmp_path / "data", 1, 8, classes=NAMES)
    store = tmp_path / "store"
    store.mkdir()
    (store / "manifest.json").write_text("{}")
    (tmp_path / "ablation.json").write_text(json.dumps({"store": str(store), "data": f"imagefolder:{tmp_path / 'data'}",
                                                        "maps": {"description": "IG", "completeness_delta": None}}))
    monkeypatch.setattr(igkd.store, "open_store", lambda path: SimpleNamespace(
        maps=np.zeros((len(NAMES), 8, 8), dtype="float16"), manifest={}))
    text = report.gallery_section(tmp_path)
    report.accuracy_points(tmp_path / "a.png", ["student", "蒸留"], [50.0, 51.0])  # a plug-in's method name
    method_key = report.names_key()
    assert not [w for w in recwarn if "Glyph" in str(w.message)]
    assert "Glyph" not in caplog.text
    from igkd.data import load_dataset
    classes = load_dataset(f"imagefolder:{tmp_path / 'data'}").classes
    titles = [ax.get_title() for ax in figures[0].axes[:len(NAMES)]]
    for i, name in enumerate(classes):
        shown = titles[i]
        assert shown == name.replace("$", r"\$") or (shown == f"class {i}" and f"class {i} = `{name}`" in text), \
            (name, shown)
    assert titles[classes.index("Ⓐ")] == "Ⓐ"  # STIXGeneral, shipped with matplotlib, has it
    assert "蒸留" in method_key or "蒸留" in [t.get_text() for t in figures[1].axes[0].get_xticklabels()]
    assert report.names_key() == ""  # listed once


def test_compression_names_the_students_given_as_specs(figures, tmp_path):
    """--students 'SPEC;SPEC' were triangles with nothing saying which model each was: each
    is numbered beside its point (above its methods' topmost) and named in the legend."""
    specs = ["mobilenetv2:drop=5,width=0.5", "resnet8:width=0.25", "wrn:depth=10,k=1"]
    runs = [{"method": m, "axis": "depth", "model": f"mobilenetv2:drop={3 + 2 * i}", "test_accuracy": 60.0 - 3 * i + j,
             "compression": 2.0 * 2 ** i, "macs": (9 - 2 * i) * 1e6} for j, m in enumerate(["student", "kd"])
            for i in range(3)]
    runs += [{"method": m, "axis": "spec", "value": i, "model": s, "test_accuracy": 55.0 + 2 * i + j,
              "compression": 3.0 + i, "macs": (6 - i) * 1e6} for j, m in enumerate(["student", "kd"])
             for i, s in enumerate(specs)]
    compression.curves(tmp_path / "c.png", {"teacher_cost": {"macs": 1.2e7}, "teacher": {"test_accuracy": 70.0},
                                            "methods": ["student", "kd"], "runs": runs})
    axes = figures[0].axes
    legend = [t.get_text() for t in axes[-1].get_legend().get_texts()]
    assert all(s in legend for s in specs)
    for ax in axes:  # the number of spec k beside its topmost point, k as the legend's marker
        marks = {t.get_text(): t.xy for t in ax.texts}
        assert [marks[str(k)][1] for k in (1, 2, 3)] == [56.0, 58.0, 60.0]
    handles = dict(zip(*reversed(axes[-1].get_legend_handles_labels())))
    assert [handles[s].get_marker() for s in specs] == ["$1$", "$2$", "$3$"]


def test_audit_gallery_names_its_stand_ins_in_the_deployment_section(tmp_path, recwarn):
    """audit.png drew class names no font has as empty boxes (with Glyph warnings); its
    stand-ins are now named in audit.json, and in the report's Deployment section."""
    import igkd
    from conftest import TINY_TEACHER
    from helpers_data import write_image_folder
    from igkd.deploy.report import deployment_section
    from igkd.models import build_model, save_checkpoint
    classes = ["cat", "猫"]
    data = write_image_folder(tmp_path / "data", 1, 8, classes=classes)
    shutil.rmtree(data / "train")  # a folder to score: test/ alone
    weights = save_checkpoint(tmp_path / "m", build_model(TINY_TEACHER, 2, 3),
                              {"model": TINY_TEACHER, "num_classes": 2, "in_channels": 3, "classes": classes,
                               "preprocessing": {"normalize": "none"}})
    result = igkd.audit(weights, weights, f"imagefolder:{data}", images=2, ig_steps=2, gallery=2,
                        out=tmp_path / "run", quiet=True)
    assert not [w for w in recwarn if "Glyph" in str(w.message)]
    if "gallery_names" in result:  # no CJK font installed here: the stand-in is named
        assert "class 1 = `猫`" in result["gallery_names"]
        assert "class 1 = `猫`" in deployment_section(tmp_path / "run")
    else:  # drawn in an installed font that has it
        assert report.figure_text("猫") == "猫" and report._installed_fallbacks()
