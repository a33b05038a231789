"""Small leftovers of earlier reviews: legend labels starting with "_", the detectable
difference of runs that all differ alike, latency.json's warm-up, an unreadable image
folder, export to a path that is not UTF-8, and how often an experiment loads its data."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import igkd
from igkd import report
from igkd.errors import UserError

DEMO_TEACHER = Path(igkd.__file__).parent / "assets" / "demo_teacher.safetensors"


def test_a_name_starting_with_underscore_keeps_its_legend_entry(figures, tmp_path, recwarn):
    # matplotlib leaves labels starting with "_" out of legends: the method _mine had no entry
    report.condition_points(tmp_path / "c.png", ["clean", "blur"],
                            {m: [{"mean": 50.0}, {"mean": 40.0}] for m in ("student", "_mine")})
    report.training_curves(tmp_path / "t.png", {name: [[{"epoch": 1, "val_accuracy": 30.0, "loss": 2.0}]]
                                                for name in ("_mine", "kd")})
    legends = [[t.get_text() for t in ax.get_legend().get_texts()] for fig in figures for ax in fig.axes
               if ax.get_legend() is not None]
    assert [[t.lstrip("\u200b ") for t in legend] for legend in legends] == \
        [["student", "_mine"], ["_mine (1 run)", "kd (1 run)"]]
    assert not [w for w in recwarn if "Glyph" in str(w.message)]  # the invisible character is drawable
    assert report.figure_text(report.figure_text("_a$b")) == report.figure_text("_a$b")  # still idempotent


def test_detectable_difference_is_undefined_where_every_difference_is_equal():
    from igkd.experiments.montecarlo import montecarlo_tables, statistics
    from igkd.experiments.stats import NO_SPREAD
    from igkd.fileio import dumps
    # kd gains exactly one point in every run: sd 0, and "detectable 0.00 / 0.00" claimed any
    # difference would be found, from runs that measured no spread at all
    r = statistics({"methods": ["student", "kd"], "baseline": "student",
                    "accuracy": {"student": [50.0, 51.0, 52.0], "kd": [51.0, 52.0, 53.0]}})
    t = r["comparisons"][0]["t"]
    assert math.isnan(t["detectable"]) and math.isnan(t["detectable_holm"]) and t["detectable_note"] == NO_SPREAD
    saved = json.loads(dumps(t))
    assert saved["detectable"] is None and saved["detectable_holm"] is None and saved["detectable_note"] == NO_SPREAD
    row = montecarlo_tables(r).splitlines()[-1]
    assert row.endswith("| n/a: all differences equal |") and "0.00 / 0.00" not in row
    # differences that vary keep their figures and no note
    r = statistics({"methods": ["student", "kd"], "baseline": "student",
                    "accuracy": {"student": [50.0, 51.0, 52.0], "kd": [51.0, 52.5, 52.5]}})
    t = r["comparisons"][0]["t"]
    assert t["detectable"] > 0 and "detectable_note" not in t


def test_latency_json_keeps_the_warmup_asked_for_apart_from_the_one_made(tmp_path):
    from igkd.deploy.report import deployment_section
    r = igkd.bench_latency("mobilenetv2:width=0.25,drop=14", input="1x8x8", warmup=0, min_time=0.0, min_reps=2,
                           out=tmp_path, quiet=True)
    saved = json.loads((tmp_path / "latency.json").read_text())
    # a top-level "warmup" was the option, above rows that each made their own (compiled: at least 1)
    assert "warmup" not in saved and saved["warmup_requested"] == 0 == r["warmup_requested"]
    assert [row["warmup"] for row in saved["rows"]] == [0]
    assert "### Latency" in deployment_section(tmp_path)


def test_an_unreadable_folder_is_named_as_unreadable(tmp_path):
    from igkd.data.imagefolder import _subfolders
    # root reads every folder, so a path scandir cannot list stands in: a file. Such a folder
    # counted as having subfolders in one helper and none in the other
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=r"^cannot read .*file \(Not a directory\); fix or remove it$"):
        _subfolders(tmp_path / "file")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads a folder of mode 000")
def test_an_unreadable_test_folder_is_named_not_the_layout(tmp_path):
    (tmp_path / "test" / "a").mkdir(parents=True)
    (tmp_path / "test").chmod(0)
    try:
        with pytest.raises(UserError, match=r"^cannot read .*test \(Permission denied\)"):
            igkd.load_dataset(f"imagefolder:{tmp_path},test=0.2")
    finally:
        (tmp_path / "test").chmod(0o755)


def test_export_to_a_name_that_is_not_utf8_refuses_in_one_line(tmp_path):
    # without UTF-8 mode under the C locale, a non-ASCII name is held with surrogate escapes that
    # ONNX Runtime and TorchScript (which take UTF-8 names) failed on with a TypeError traceback
    folder = os.path.join(os.fsencode(tmp_path), b"caf\xe9")
    os.mkdir(folder)
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "igkd.cli", "export", "--weights", os.fsencode(DEMO_TEACHER),
                        "--data", "demo", "--output", os.path.join(folder, b"m.onnx")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("igkd: error: --output ")
    assert "not valid ascii text" in p.stderr and "PYTHONUTF8=1" in p.stderr
    assert os.listdir(folder) == []
    # a checkpoint there: safetensors cannot open it either (it was "truncated, damaged or of another format")
    weights = os.fsdecode(os.path.join(folder, b"t.safetensors"))
    Path(weights).write_bytes(DEMO_TEACHER.read_bytes())
    with pytest.raises(UserError, match=r"^--weights .*: its name is not valid"):
        igkd.export_model(weights, tmp_path / "m.onnx", data="demo", quiet=True)
    assert not (tmp_path / "m.onnx").exists()


def test_training_into_a_name_that_is_not_utf8_refuses_before_any_work(tmp_path):
    # train and experiments ran every epoch, then failed opening their own model.safetensors
    # (safetensors takes UTF-8 names only); a teacher there read as "damaged"
    folder = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"caf\xe9"))
    cfg = igkd.TrainConfig(data="demo", model="mobilenetv2:width=0.25", epochs=1, threads=1)
    with pytest.raises(UserError, match=r"^--out .*caf.*: its name is not valid"):
        igkd.train(cfg, os.path.join(folder, "run"), quiet=True)
    with pytest.raises(UserError, match=r"^--out .*: its name is not valid"):
        igkd.run_montecarlo(igkd.ExperimentConfig(data="demo", methods="student"), os.path.join(folder, "exp"), quiet=True)
    assert not os.path.exists(folder)
    os.mkdir(folder)
    teacher = os.path.join(folder, "t.safetensors")
    Path(teacher).write_bytes(DEMO_TEACHER.read_bytes())
    for read in (igkd.models.read_metadata, igkd.load_model):
        with pytest.raises(UserError, match=r"^weights file .*: its name is not valid .* rename it"):
            read(teacher)


def test_an_experiment_start_loads_its_dataset_once(tmp_path, monkeypatch):
    """setup, the teacher's score, the store and run_jobs each loaded the spec again (4 loads
    before the first run trained); a plug-in kind counts its own loads."""
    from igkd.data import DATASETS, Dataset, Split
    from igkd.experiments import resolve, run_montecarlo
    from igkd.models import build_model, save_checkpoint
    g = torch.Generator().manual_seed(0)
    data = {n: Split(torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=g), torch.arange(n) % 2)
            for n in (16, 8)}
    loads = []
    monkeypatch.setitem(DATASETS, "counted", lambda spec: loads.append(spec) or
                        Dataset(str(spec), ["a", "b"], 1, (8, 8), data[16], data[8]))
    model = "resnet:depth=8"
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "teacher", build_model(model, 2, 1),
                    {"model": model, "num_classes": 2, "in_channels": 1, "classes": ["a", "b"]})
    cfg = resolve("montecarlo", overrides={
        "data": "counted", "teacher": str(tmp_path / "teacher.safetensors"), "model": model, "methods": "kd",
        "runs": 2, "mc_subset": 0.5, "epochs": 1, "batch_size": 4, "val_fraction": 0, "normalize": "none",
        "threads": 1, "check_images": 0, "store": str(tmp_path / "store")})
    run_montecarlo(cfg, tmp_path / "exp", quiet=True)
    loads.clear()
    again = run_montecarlo(cfg, tmp_path / "exp", quiet=True)  # every run finished: the start alone loads
    assert len(loads) == 1 and len(again["runs"]) == 2
