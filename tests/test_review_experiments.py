"""Review of the experiments and their report: a TorchScript teacher, the tables' CSV and
LaTeX, a Monte Carlo of one method."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

def _montecarlo_json(folder: Path, accuracy: dict[str, list[float]]) -> Path:
    """A montecarlo.json as run_montecarlo writes it, with the statistics left to the report
    (it recomputes them from the per-run accuracies)."""
    folder.mkdir(parents=True, exist_ok=True)
    methods = list(accuracy)
    n = len(accuracy[methods[0]])
    result = {"kind": "montecarlo", "data": "demo", "teacher": None, "store": None, "baseline": methods[0],
              "methods": methods, "runs_count": n, "subset": 0.8, "model": "mobilenetv2:width=0.25,drop=14",
              "epochs": 1, "seed": 0, "train_images": 1440, "accuracy": accuracy, "runs": []}
    (folder / "montecarlo.json").write_text(json.dumps(result))
    return folder


def test_csv_tables_keep_the_statistics_at_full_precision(tmp_path):
    """tables/*.csv promise full precision; the comparisons' cells were the Markdown's
    strings: p-values rounded to 3 decimals or '< 0.001', intervals to 2."""
    from igkd.report import write_report
    student = [50.0, 51.2, 49.7, 52.3, 50.9]
    kd = [s + g for s, g in zip(student, [1.0, 1.1, 0.95, 1.08, 1.02])]
    folder = _montecarlo_json(tmp_path / "mc", {"student": student, "kd": kd})
    write_report(folder)
    rows = list(csv.DictReader((folder / "tables" / "montecarlo_2.csv").open()))
    assert len(rows) == 1 and rows[0]["difference"] == "kd - student"
    ref = sps.ttest_rel(kd, student)
    assert ref.pvalue < 0.001  # shown as '< 0.001' in the Markdown
    assert float(rows[0]["p (t)"]) == pytest.approx(ref.pvalue, rel=1e-9)
    assert float(rows[0]["t"]) == pytest.approx(ref.statistic, rel=1e-9)
    low, high = float(rows[0]["95% CI: ci_low"]), float(rows[0]["95% CI: ci_high"])  # a column each
    ci = ref.confidence_interval(0.95)
    assert (low, high) == (pytest.approx(ci.low, rel=1e-12), pytest.approx(ci.high, rel=1e-12))
    d = np.subtract(kd, student)
    assert float(rows[0]["mean"]) == pytest.approx(d.mean(), rel=1e-12)
    assert float(rows[0]["d_z"]) == pytest.approx(d.mean() / d.std(ddof=1), rel=1e-9)
    assert float(rows[0]["p (Wilcoxon)"]) == pytest.approx(sps.wilcoxon(kd, student).pvalue, rel=1e-12)
    # the Markdown still shows the rounded figures
    text = (folder / "report.md").read_text()
    assert "| kd - student | +1.03 |" in text and "< 0.001" in text


def test_latex_escapes_the_characters_ot1_has_no_glyph_for():
    """'< 0.001' in a p column printed as '¡ 0.001' under LaTeX's default font encoding."""
    from igkd.report import table_latex
    tex = table_latex(["p", "a|b"], [["< 0.001", "x > y"]])
    assert "\\textless{} 0.001 & x \\textgreater{} y \\\\" in tex
    assert "a\\textbar{}b" in tex
    assert "<" not in tex and ">" not in tex and "|" not in tex


def test_a_one_method_montecarlo_reports_no_empty_comparisons(tmp_path):
    """One method has no pairs: the report said 'Holm-corrected over the 0 comparisons',
    '(5% / 0)', drew an empty table and an empty differences plot."""
    from igkd.report import write_report
    folder = _montecarlo_json(tmp_path / "one", {"student": [50.1, 49.3, 51.0]})
    text = write_report(folder)
    assert "0 comparisons" not in text and "5% / 0" not in text and "| difference |" not in text
    assert "One method: no paired comparisons." in text
    assert "| student | 3 | 50.13 |" in text
    assert not (folder / "montecarlo_differences.png").exists() and "montecarlo_differences.png" not in text


def _torchscript_teacher(path: Path) -> Path:
    """A tiny scripted teacher for the demo's 1-channel, 10-class images (90 parameters)."""
    import torch
    from torch import nn
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    torch.jit.script(net.eval()).save(str(path))
    return path


def test_an_experiment_takes_a_torchscript_teacher_as_distill_does(tmp_path, monkeypatch):
    """`igkd distill --teacher torchscript:FILE` trains; every experiment refused the same
    teacher ('teacher checkpoint torchscript:FILE does not exist'), and a run's key named
    the spec's text, not its file: another program saved there reused the old runs."""
    from igkd.config import DistillConfig
    from igkd.experiments.common import start
    from igkd.experiments.config import resolve
    from igkd.experiments.runs import run_key, semantic_config, teacher_file
    from igkd.fileio import file_sha256 as sha256_file
    monkeypatch.chdir(tmp_path)
    _torchscript_teacher(tmp_path / "t.pt")
    assert teacher_file("torchscript:t.pt") == Path("t.pt") and teacher_file("x.safetensors") == Path("x.safetensors")
    assert teacher_file("") is None
    cfg = resolve("ablation", None, {"data": "demo", "teacher": "torchscript:t.pt", "methods": "kd",
                                     "logits": "online", "threads": 1, "epochs": 1})
    out, ctx, _ = start(cfg, tmp_path / "exp", "ablation", ["kd"], quiet=True)
    assert ctx["teacher"]["params"] == 90 and ctx["teacher"]["test_images"] == 1000  # scored as igkd evaluate does
    assert ctx["teacher"]["sha256"] == sha256_file(tmp_path / "t.pt")
    run = DistillConfig(data="demo", method="kd", teacher="torchscript:t.pt", logits="online")
    assert semantic_config(run)["teacher"] == "sha256:" + sha256_file(tmp_path / "t.pt")
    key = run_key(run)
    with open(tmp_path / "t.pt", "ab") as f:  # another program at the same path: other runs
        f.write(b"\0")
    assert run_key(run) != key


def test_cached_teacher_facts_are_keyed_by_the_architecture_read_too(tmp_path):
    """teacher.json was reused for the same file, data and normalisation whatever
    --teacher-model said: one foreign .pt read as another architecture kept the first's facts."""
    import torch
    import igkd
    from igkd.experiments.common import teacher_facts
    from igkd.experiments.config import resolve
    spec = "mobilenetv2:width=0.25,drop=14"
    torch.manual_seed(0)
    foreign = tmp_path / "foreign.pt"
    torch.save(igkd.build_model(spec, 10, 1).state_dict(), foreign)  # a bare state_dict: no metadata
    cfg = resolve("ablation", overrides=dict(teacher=str(foreign), teacher_model=spec, data="demo"))
    first = teacher_facts(cfg, tmp_path, quiet=True)
    assert first["model"] == spec and first["teacher_model"] == spec
    cached = json.loads((tmp_path / "teacher.json").read_text())
    (tmp_path / "teacher.json").write_text(json.dumps({**cached, "model": "stale", "teacher_model": "other"}))
    assert teacher_facts(cfg, tmp_path, quiet=True)["model"] == spec  # another architecture: evaluated again
    assert teacher_facts(cfg, tmp_path, quiet=True)["model"] == spec  # and cached under this one


def test_a_value_list_the_search_does_not_try_is_said(capsys):
    """--p-values under a method without p, or --T-values beside --space T=..., were dropped
    without a word: the user believed those values searched."""
    from igkd.experiments.config import resolve
    from igkd.experiments.search import search_space
    space = search_space(resolve("search", None, {"search_method": "kd", "p_values": "0.1,0.5", "T_values": "2,4",
                                                  "space": "T=1,3"}))
    assert space == {"T": [1.0, 3.0], "alpha": [0.01, 0.1, 0.5, 0.9]}
    assert capsys.readouterr().err.splitlines() == [
        "igkd: warning: --T-values is not searched: --space T=... replaces it",
        "igkd: warning: --p-values is not searched: method 'kd' has no option p (pass --p-values '' to drop it)"]
    assert search_space(resolve("search", None, {"search_method": "kd+ig", "p_values": "0.1"}))["p"] == [0.1]
    assert capsys.readouterr().err == ""
